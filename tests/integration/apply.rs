//! `virtplan apply` and `status` through the CLI binary: the classic window on a real QEMU
//! domain in real time, the executor lock, confirmation, missed steps, drift of a saved plan,
//! and crashes at step boundaries followed by a resume.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::domain_xml;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lease::LeaseConfig;
use virtplan::lockfile::StepStatus;
use virtplan::state::{Kib, PowerState};

use crate::support::helpers::{
    apply, at, command, lock_of, now, save_plan, spawn_apply, text, virtplan, wait_for_lock,
    write_plan,
};
use crate::support::qemu::{qemu_uri, TestDomain};

/// Step ids by step number, from `plan --format json`.
fn step_ids(plan: &Path) -> Vec<String> {
    let out = virtplan(&["plan", plan.to_str().unwrap(), "--format", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<(u64, String)> = json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["step"].as_u64().unwrap(),
                c["step_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// Sets the persistent RTC track of a QEMU test domain (TestDomain starts with `guest`).
fn set_track(hv: &Libvirt, uuid: &str, track: &str) {
    let xml = hv.domain_xml(uuid, true).unwrap();
    let edited = domain_xml::set_clock(&xml, None, Some(track)).unwrap();
    hv.define_xml(&edited).unwrap();
}

#[test]
fn classic_window_on_a_real_qemu_domain() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "apply-classic");
    let hv = Libvirt::connect(&uri).unwrap();
    set_track(&hv, &dom.uuid, "wall");
    dom.start();
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let vm = &dom.name;
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1
connection: {uri}
grace: 1m
steps:
  - at: {}
    vm: {vm}
    power: shutoff
    shutdown: {{ mode: graceful, timeout: 3s, force_after_timeout: true }}
  - at: {}
    vm: {vm}
    memory: 384MiB
  - at: {}
    vm: {vm}
    vcpus: 2
  - at: {}
    vm: {vm}
    clock: {{ track: guest }}
  - at: {}
    vm: {vm}
    power: running
",
            // The first step leaves 8 s for apply to start, connect and plan: on a loaded CI
            // machine 3 s was not always enough, and the step then started late.
            at(t0, 8),
            at(t0, 13),
            at(t0, 14),
            at(t0, 15),
            at(t0, 17)
        ),
    );
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let lock = lock_of(&plan);
    assert_eq!(lock.steps.len(), 5);
    // A step starts at its time, or when its domain's previous step has ended if that ran
    // past it (steps 2-4 are a second apart). Its record starts once it holds the domain's
    // lease: one settle delay after its dispatch, plus the lease's own libvirt calls (a
    // metadata write on a running domain rewrites its status file), which took up to 0.7 s
    // more on a loaded 2-core machine. Quiet, every step here starts 0.30 s after its time.
    let settle = chrono::Duration::from_std(LeaseConfig::default().settle).unwrap();
    let mut previous_end = None;
    for r in &lock.steps {
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        let (due, started) = (r.at.unwrap(), r.started_at.unwrap());
        assert!(started >= due, "step {} started early: {r:?}", r.step);
        let free = previous_end.map_or(due, |end: chrono::DateTime<chrono::Utc>| end.max(due));
        assert!(
            started - free < chrono::Duration::seconds(2) + settle,
            "step {} started {} after its time ({} after it could)",
            r.step,
            started - due,
            started - free
        );
        previous_end = r.finished_at;
    }
    // The guest has no OS: it ignored the shutdown request and was forced off.
    assert!(
        lock.steps[0].message.contains("forced off"),
        "{:?}",
        lock.steps[0]
    );

    let state = hv.observe(&dom.uuid, true).unwrap();
    assert_eq!(state.power, PowerState::Running);
    assert_eq!(state.memory, Kib::from_mib(384));
    assert!(state.max_memory >= Kib::from_mib(384));
    assert_eq!(state.vcpus, 2);
    assert_eq!(
        state.clock.unwrap().rtc_track.as_deref(),
        Some("guest"),
        "persistent clock"
    );
    let live = domain_xml::read_clock(&hv.domain_xml(&dom.uuid, false).unwrap()).unwrap();
    assert_eq!(live.rtc_track.as_deref(), Some("guest"), "live clock");

    // `status` reads the same progress.
    let out = virtplan(&["status", plan.to_str().unwrap(), "--format", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    assert!(steps.iter().all(|s| s["status"] == "done"));
    assert!(steps[0]["started_at"].as_str().unwrap().ends_with('Z'));
}

/// A test-driver fleet with one shut-off domain `vm-01`.
fn fleet(dir: &Path, memory_mib: u64) -> String {
    write_fleet(
        dir,
        &[FleetDomain::new("vm-01")
            .uuid("5d1c2a34-52a5-4c41-9d0c-2f6c3c8b0001")
            .memory(Kib::from_mib(memory_mib), Kib::from_mib(512))],
    )
    .unwrap()
}

#[test]
fn a_second_executor_is_refused_and_sigterm_stops_the_first_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), 128);
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - at: {}\n    vm: vm-01\n    memory: 256MiB\n",
            at(now(), 60)
        ),
    );
    let mut first = command(&["apply", plan.to_str().unwrap(), "--auto-approve"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = first.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the first apply never started waiting");
        if line.starts_with("Applying") {
            break;
        }
    }

    // The executor writes the lockfile as it starts.
    while !plan.with_extension("lock").exists() {
        assert!(Instant::now() < deadline, "no lockfile");
        SystemClock.sleep(Duration::from_millis(10));
    }
    let before = std::fs::read_to_string(plan.with_extension("lock")).unwrap();
    let second = apply(&plan, &[]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("pid={}", first.id())), "{err}");
    assert!(err.contains("host=") && err.contains("since="), "{err}");
    assert_eq!(
        std::fs::read_to_string(plan.with_extension("lock")).unwrap(),
        before,
        "the refused executor wrote the lockfile"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(1), "interrupted run exits 1");
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Cancelled);
    // The lock died with the process: a new executor may take it.
    let out = virtplan(&["status", plan.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
}

#[test]
fn without_a_terminal_apply_needs_auto_approve_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), 128);
    let plan = write_plan(
        dir.path(),
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - vm: vm-01\n    memory: 256MiB\n"),
    );
    let out = virtplan(&["apply", plan.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--auto-approve"));
    assert!(!plan.with_extension("lock").exists());
    assert!(!plan.with_extension("lock.pid").exists());
}

#[test]
fn a_missed_step_never_runs() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "apply-missed");
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\ngrace: 1m\nsteps:\n  - at: {}\n    vm: {}\n    memory: 192MiB\n  - at: {}\n    vm: {}\n    vcpus: 2\n",
            at(now(), -600),
            dom.name,
            at(now(), 1),
            dom.name
        ),
    );
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Missed);
    assert!(lock.steps[0].started_at.is_none());
    assert_eq!(lock.steps[1].status, StepStatus::Skipped);
    let state = Libvirt::connect(&uri)
        .unwrap()
        .observe(&dom.uuid, false)
        .unwrap();
    assert_eq!(state.memory, Kib::from_mib(128));
    assert_eq!(state.vcpus, 1);
}

#[test]
fn a_saved_plan_refuses_drift_and_an_edited_plan_file() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), 128);
    let body =
        format!("version: 1\nconnection: {uri}\nsteps:\n  - vm: vm-01\n    memory: 256MiB\n");
    let plan = write_plan(dir.path(), &body);
    let saved = dir.path().join("saved.json");
    save_plan(&plan, &saved);

    // Someone resized the domain after the review (the test driver rereads its node file).
    fleet(dir.path(), 192);
    let out = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    assert!(
        lock.steps[0]
            .message
            .contains("memory was 128MiB when planned, is 192MiB now"),
        "{}",
        lock.steps[0].message
    );

    // The plan file changed after it was saved: nothing is applied.
    std::fs::write(&plan, body.replace("256MiB", "384MiB")).unwrap();
    let out = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("changed since the saved plan"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_crash_at_each_step_boundary_then_resume_applies_nothing_twice() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "apply-crash");
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - at: {}\n    vm: {vm}\n    memory: 192MiB\n  - at: {}\n    vm: {vm}\n    vcpus: 2\n",
            at(t0, 1),
            at(t0, 2),
            vm = dom.name
        ),
    );
    let ids = step_ids(&plan);
    let apply = |failpoint: &str| apply(&plan, &[("VIRTPLAN_FAILPOINT", failpoint)]);
    let hv = Libvirt::connect(&uri).unwrap();
    let crash = |failpoint: String| {
        let out = apply(&failpoint);
        assert_eq!(
            out.status.code(),
            None,
            "expected an abort at {failpoint}: {}",
            text(&out)
        );
        lock_of(&plan)
    };

    // Killed after step 1 is recorded running, before any libvirt call.
    let lock = crash(format!("after-running:{}", ids[0]));
    assert_eq!(lock.steps[0].status, StepStatus::Running);
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().memory,
        Kib::from_mib(128)
    );

    // Resumed: step 1 is not at its target and within its grace, so it is re-applied; killed
    // after the change, before it is recorded done.
    let lock = crash(format!("before-done:{}", ids[0]));
    assert_eq!(lock.steps[0].status, StepStatus::Running);
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().memory,
        Kib::from_mib(192)
    );

    // Resumed: step 1 is found at its target (no call); killed after step 2 is recorded running.
    let lock = crash(format!("after-running:{}", ids[1]));
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert!(
        lock.steps[0].message.contains("nothing was called again"),
        "{}",
        lock.steps[0].message
    );
    assert_eq!(lock.steps[1].status, StepStatus::Running);
    assert_eq!(hv.observe(&dom.uuid, false).unwrap().vcpus, 1);

    // Resumed: step 2 re-applied, killed before it is recorded done.
    let lock = crash(format!("before-done:{}", ids[1]));
    assert_eq!(lock.steps[1].status, StepStatus::Running);
    assert_eq!(hv.observe(&dom.uuid, false).unwrap().vcpus, 2);

    // Resumed: step 2 is at its target; everything done, step 1 untouched since.
    let out = apply("");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    assert!(
        lock.steps.iter().all(|r| r.status == StepStatus::Done),
        "{lock:?}"
    );
    assert!(lock.steps[1].message.contains("nothing was called again"));
    let state = hv.observe(&dom.uuid, false).unwrap();
    assert_eq!(state.memory, Kib::from_mib(192));
    assert_eq!(state.vcpus, 2);
}

/// Waits until the plan's first step is recorded running.
fn wait_until_running(plan: &Path) {
    wait_for_lock(
        plan,
        Duration::from_secs(20),
        "the step never started",
        |l| {
            l.steps
                .first()
                .is_some_and(|r| r.status == StepStatus::Running)
        },
    );
}

/// A running diskless guest and a plan that shuts it down gracefully with `timeout`.
fn graceful_shutdown_plan(
    uri: &str,
    test: &str,
    timeout: &str,
) -> (TestDomain, tempfile::TempDir, PathBuf) {
    let dom = TestDomain::define(uri, test);
    dom.start();
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: {}\n    power: shutoff\n    shutdown: {{ mode: graceful, timeout: {timeout}, force_after_timeout: true }}\n",
            dom.name
        ),
    );
    (dom, dir, plan)
}

#[test]
fn a_second_signal_exits_at_once_leaving_a_whole_lockfile() {
    let Some(uri) = qemu_uri() else { return };
    let (_dom, _dir, plan) = graceful_shutdown_plan(&uri, "apply-sig2", "60s");
    let mut child = spawn_apply(&plan);
    wait_until_running(&plan);
    let pid = child.id().to_string();
    let term = || {
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
    };
    term();
    SystemClock.sleep(Duration::from_millis(300));
    // The first signal lets the 60 s graceful shutdown go on; the second one ends it now.
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited on the first signal"
    );
    let started = Instant::now();
    term();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Running, "{lock:?}");
}

#[test]
fn kill_9_inside_a_graceful_shutdown_then_resume_finishes_the_step() {
    let Some(uri) = qemu_uri() else { return };
    let (dom, _dir, plan) = graceful_shutdown_plan(&uri, "apply-kill", "4s");
    let mut first = spawn_apply(&plan);
    wait_until_running(&plan);
    SystemClock.sleep(Duration::from_millis(500));
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let hv = Libvirt::connect(&uri).unwrap();
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().power,
        PowerState::Running
    );

    // The kernel freed the lock with the process: the resume starts at once and finishes.
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert!(
        lock.steps[0].message.contains("forced off"),
        "{}",
        lock.steps[0].message
    );
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().power,
        PowerState::Shutoff
    );
}

#[test]
fn memory_of_a_running_guest_without_balloon_driver_is_done_with_a_warning() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "apply-balloon");
    dom.start();
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: {}\n    memory: 192MiB\n",
            dom.name
        ),
    );
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    let r = &lock.steps[0];
    assert_eq!(r.status, StepStatus::Done);
    // The configuration is authoritative and verified; the guest keeps its size.
    assert_eq!(
        r.after.as_ref().unwrap().memory_kib,
        virtplan::state::Kib(192 * 1024)
    );
    assert!(
        r.message.contains("warning: the guest's live memory is"),
        "{}",
        r.message
    );
    let state = Libvirt::connect(&uri)
        .unwrap()
        .observe(&dom.uuid, false)
        .unwrap();
    assert_eq!(state.memory, Kib::from_mib(192));
    assert_eq!(state.power, PowerState::Running);
}

/// Regression: `apply` refused for want of a terminal, or printed a bare I/O error, before it
/// had looked at the plan, so a mistyped path or a binary file was never reported as such.
#[test]
fn a_missing_or_binary_plan_is_reported_with_its_location_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    crate::support::cli::Cli::new()
        .args(["apply".as_ref(), missing.as_os_str()])
        .status(1)
        .stderr_contains("cannot read the plan file")
        .stderr_contains(format!("--> {}:1:1", missing.display()))
        .stderr_lacks("without confirmation")
        .run();
    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, [0xd3, 0x00, 0xff, 0x7b]).unwrap();
    crate::support::cli::Cli::new()
        .args([
            "apply".as_ref(),
            binary.as_os_str(),
            "--auto-approve".as_ref(),
        ])
        .status(1)
        .stderr_contains("is not UTF-8 text")
        .stderr_lacks("stream did not contain")
        .run();
}

/// Regression (issue 9): `apply SAVED` re-read virtplan.toml, so a grace edited after review
/// (10m → 1s) made the reviewed step `missed` instead of running it as reviewed.
#[test]
fn a_saved_plan_runs_as_reviewed_after_virtplan_toml_grace_is_edited() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), 128);
    let config = dir.path().join("virtplan.toml");
    std::fs::write(&config, "grace = \"10m\"\n").unwrap();
    // Due 20 seconds ago: inside the reviewed grace (10m), far outside the edited one (1s).
    let body = format!(
        "version: 1\nconnection: {uri}\nsteps:\n  - at: {}\n    vm: vm-01\n    memory: 256MiB\n",
        at(now(), -20)
    );
    let plan = write_plan(dir.path(), &body);
    let saved = dir.path().join("saved.json");
    save_plan(&plan, &saved);

    std::fs::write(&config, "grace = \"1s\"\n").unwrap();
    let out = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps[0].status, StepStatus::Done, "{}", text(&out));
}

/// A saved plan written before plans carried their policy is refused with what to do.
#[test]
fn a_saved_plan_of_format_1_is_refused_with_how_to_remake_it() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("old.json");
    std::fs::write(
        &saved,
        r#"{"kind": "virtplan-saved-plan", "format_version": 1, "plan_file": "plan.yaml", "plan_source": "", "plan": {}}"#,
    )
    .unwrap();
    let out = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("format 1") && stderr.contains("virtplan plan plan.yaml --out"),
        "{}",
        text(&out)
    );
}

/// Regression: steps 1 and 3 of `memory 256 → 192 → 256 MiB` were one lockfile record (same
/// step id): step 3 ran first, step 1 stayed `pending`, the domain ended at 192 MiB, and apply
/// exited 0. Each step now runs once, in order, and the domain ends as the plan says.
#[test]
fn a_step_repeated_later_in_the_plan_runs_in_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), 128);
    let step = |mib: u32| format!("  - vm: vm-01\n    memory: {mib}MiB\n");
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n{}{}{}",
            step(256),
            step(192),
            step(256)
        ),
    );
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    let steps: Vec<(usize, StepStatus, &str)> = lock
        .steps
        .iter()
        .map(|r| (r.step, r.status, r.what.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (1, StepStatus::Done, "memory 128MiB → 256MiB"),
            (2, StepStatus::Done, "memory 256MiB → 192MiB"),
            (3, StepStatus::Done, "memory 192MiB → 256MiB"),
        ]
    );
    assert!(lock.steps[1].started_at > lock.steps[0].finished_at);
    assert!(lock.steps[2].started_at > lock.steps[1].finished_at);
    assert_eq!(
        lock.steps[2].after.as_ref().map(|f| f.memory_kib),
        Some(Kib::from_mib(256))
    );
}
