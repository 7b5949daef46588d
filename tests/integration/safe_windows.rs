//! Safe windows (issue 11) end to end: `power: reboot`, `check`, `always` on real QEMU
//! domains, and what `plan` refuses before the window (an edited done step).
//!
//! Most domains are the rig's small diskless domains: nothing in them handles ACPI, so those
//! reboots take the ladder's force path (ACPI request, timeout, destroy, start). The agent
//! paths (agent reboot, `guest_agent` check, `clock.sync`) run on the rig's real guest
//! (support/guest.rs: kernel, busybox, qemu-guest-agent) in
//! `qemu_real_guest_reboot_through_its_agent_syncs_the_clock_and_passes_an_agent_check`, and the
//! agent's failure paths on a diskless domain with an agent channel but no agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::{Lockfile, StepRecord, StepStatus};
use virtplan::state::{Kib, PowerState};

use crate::support::helpers::{
    apply, lock_of, spawn_apply, text, virtplan, wait_for_lock, write_plan, write_steps,
};
use crate::support::qemu::{qemu_uri, TestDomain};

/// Applies `plan`, which must exit with `code`; returns its lockfile.
fn apply_exits(plan: &Path, code: i32) -> Lockfile {
    let out = apply(plan, &[]);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    lock_of(plan)
}

/// Applies the one-step `plan`, which must exit with `code` and leave its step `status`;
/// returns the step's record.
fn apply_one_step(plan: &Path, code: i32, status: StepStatus) -> StepRecord {
    let mut lock = apply_exits(plan, code);
    let step = lock.steps.swap_remove(0);
    assert_eq!(step.status, status, "{}", step.message);
    step
}

/// How many times QEMU was started for `name`: libvirt appends a "starting up" line to the
/// domain's log at every start (names are unique per test run, so the log is ours).
fn starts(name: &str) -> usize {
    std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log"))
        .map_or(0, |log| log.matches("starting up").count())
}

fn run_id(hv: &Libvirt, uuid: &str) -> Option<u32> {
    hv.run_id(uuid).expect("read the domain id")
}

/// A plan of one step in a temporary folder: reboot `vm` with `shutdown` (what goes inside its
/// `{ }`), then `more` (further keys of the step, each line indented by four).
fn reboot_plan(uri: &str, vm: &str, shutdown: &str, more: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let plan = write_steps(
        dir.path(),
        uri,
        &format!("  - vm: {vm}\n    power: reboot\n    shutdown: {{ {shutdown} }}\n{more}"),
    );
    (dir, plan)
}

#[test]
fn qemu_reboot_window_restarts_the_domain_and_its_check_passes() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "safe-reboot");
    dom.start();
    let hv = Libvirt::connect(&uri).unwrap();
    let before = run_id(&hv, &dom.uuid).expect("running");
    let (_dir, plan) = reboot_plan(
        &uri,
        &dom.name,
        "mode: graceful, timeout: 2s, force_after_timeout: true",
        &format!(
            "    check: {{ state: running, command: 'test \"$VIRTPLAN_VM\" = {vm} && test \"$VIRTPLAN_UUID\" = {uuid}', timeout: 30s, interval: 1s }}\n",
            vm = dom.name,
            uuid = dom.uuid
        ),
    );
    let shown = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert!(shown.status.success(), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains("reboot: ACPI graceful shutdown, force after 2s, then start"),
        "{stdout}"
    );
    assert!(
        stdout.contains("then waits for the check: state running"),
        "{stdout}"
    );

    let step = apply_one_step(&plan, 0, StepStatus::Done);
    let after = run_id(&hv, &dom.uuid).expect("running after the reboot");
    assert_ne!(before, after, "a reboot gives the domain a new id");
    assert_eq!(
        starts(&dom.name),
        2,
        "started once by the test, once by the reboot"
    );
    let message = &step.message;
    assert_eq!(step.reboot_from, Some(before));
    assert!(
        message.contains(&format!("rebooted: domain id {before} → {after}")),
        "{message}"
    );
    assert!(message.contains("forced off"), "{message}");
    assert!(message.contains("check passed on attempt 1"), "{message}");
    // Regression: status said "power running (no change)" for a reboot.
    assert_eq!(step.what, "power running → running");

    // Recorded done: a second apply does not reboot again.
    apply_exits(&plan, 0);
    assert_eq!(run_id(&hv, &dom.uuid), Some(after));
}

#[test]
fn qemu_failing_check_skips_the_next_step_and_always_power_on_leaves_it_running() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "safe-always");
    dom.start();
    let hv = Libvirt::connect(&uri).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The resize window of the issue: off, a gated change, more memory, and power back on.
    let plan = write_steps(
        dir.path(),
        &uri,
        &format!(
            "  - vm: {vm}
    power: shutoff
    shutdown: {{ mode: force }}
  - vm: {vm}
    vcpus: 2
    check: {{ command: 'echo backup not verified >&2; exit 4', timeout: 2s, interval: 1s }}
  - vm: {vm}
    memory: 192MiB
  - vm: {vm}
    power: running
    always: true
",
            vm = dom.name
        ),
    );
    let lock = apply_exits(&plan, 3);
    let statuses: Vec<StepStatus> = lock.steps.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Done,
            StepStatus::Failed,
            StepStatus::Skipped,
            StepStatus::Done
        ],
        "{lock:#?}"
    );
    let failed = &lock.steps[1].message;
    assert!(failed.contains("check timed out"), "{failed}");
    assert!(
        failed.contains("command exited 4: backup not verified"),
        "{failed}"
    );
    assert!(
        lock.steps[3].message.contains("always"),
        "{}",
        lock.steps[3].message
    );
    let state = hv.observe(&dom.uuid, false).unwrap();
    assert_eq!(
        state.power,
        PowerState::Running,
        "the always step restored service"
    );
    assert_eq!(
        state.memory,
        Kib::from_mib(128),
        "the skipped step changed nothing"
    );
}

#[test]
fn qemu_kill_9_in_the_middle_of_a_reboot_then_resume_reboots_exactly_once() {
    let Some(uri) = qemu_uri() else { return };
    let hv = Libvirt::connect(&uri).unwrap();

    // 1. SIGKILL while the guest ignores the ACPI request: the domain still runs under its id.
    let dom = TestDomain::define(&uri, "safe-kill-wait");
    dom.start();
    let first_id = run_id(&hv, &dom.uuid).unwrap();
    let (_dir, plan) = reboot_plan(
        &uri,
        &dom.name,
        "mode: graceful, timeout: 3s, force_after_timeout: true",
        "",
    );
    let mut child = spawn_apply(&plan);
    wait_for_lock(
        &plan,
        Duration::from_secs(20),
        "the reboot never started",
        |l| l.steps[0].reboot_from.is_some(),
    );
    SystemClock.sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        run_id(&hv, &dom.uuid),
        Some(first_id),
        "killed before the reboot happened"
    );
    assert_eq!(lock_of(&plan).steps[0].status, StepStatus::Running);

    apply_one_step(&plan, 0, StepStatus::Done);
    assert_ne!(run_id(&hv, &dom.uuid), Some(first_id));
    assert_eq!(starts(&dom.name), 2, "rebooted exactly once");

    // 2. Killed after the shutdown, before the start (a failpoint aborts the process there):
    //    the resume starts it, and does not shut it down again.
    let dom = TestDomain::define(&uri, "safe-kill-off");
    dom.start();
    let (_dir, plan) = reboot_plan(
        &uri,
        &dom.name,
        "mode: graceful, timeout: 1s, force_after_timeout: true",
        "",
    );
    let shown = virtplan(&["plan", plan.to_str().unwrap(), "--format", "json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("plan json");
    let id = json["changes"][0]["step_id"].as_str().unwrap().to_owned();
    let out = apply(
        &plan,
        &[("VIRTPLAN_FAILPOINT", &format!("mid-reboot:{id}"))],
    );
    assert_eq!(out.status.code(), None, "expected an abort: {}", text(&out));
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().power,
        PowerState::Shutoff
    );
    let lock = apply_exits(&plan, 0);
    assert_eq!(lock.steps[0].status, StepStatus::Done, "{lock:#?}");
    assert_eq!(
        hv.observe(&dom.uuid, false).unwrap().power,
        PowerState::Running
    );
    assert_eq!(starts(&dom.name), 2, "rebooted exactly once");
}

#[test]
fn plan_refuses_an_edited_done_step_with_applys_message() {
    let dir = tempfile::tempdir().unwrap();
    let uri = virtplan::hypervisor::fleet::write_fleet(
        dir.path(),
        &[virtplan::hypervisor::fleet::FleetDomain::new("web-01").running(true)],
    )
    .unwrap();
    let body = |title: &str| {
        format!("version: 1\nconnection: {uri}\nsteps:\n  - vm: web-01\n    title: {title}\n")
    };
    let plan = write_plan(dir.path(), &body("first"));
    apply_one_step(&plan, 0, StepStatus::Done);

    std::fs::write(&plan, body("second")).unwrap();
    let planned = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    let applied = apply(&plan, &[]);
    assert_eq!(planned.status.code(), Some(1), "{}", text(&planned));
    assert_eq!(applied.status.code(), Some(1), "{}", text(&applied));
    let planned_err = String::from_utf8_lossy(&planned.stderr);
    let applied_err = String::from_utf8_lossy(&applied.stderr);
    let why = "is recorded done in";
    assert!(planned_err.contains(why), "{planned_err}");
    assert!(applied_err.contains(why), "{applied_err}");
    assert!(
        planned_err.contains(&format!("{}:4:5", plan.display())),
        "located at the step: {planned_err}"
    );
    assert!(
        String::from_utf8_lossy(&planned.stdout).is_empty(),
        "no plan shown"
    );
}

#[test]
fn plan_of_two_files_refuses_overlapping_changes_of_one_domain_and_accepts_apart_ones() {
    let dir = tempfile::tempdir().unwrap();
    let uri = virtplan::hypervisor::fleet::write_fleet(
        dir.path(),
        // A fixed UUID: the test driver makes up a new one per connection otherwise.
        &[virtplan::hypervisor::fleet::FleetDomain::new("web-01")
            .uuid("5a1e0000-0000-4000-8000-000000000001")
            .running(true)],
    )
    .unwrap();
    let write = |name: &str, at: &str, change: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("version: 1\nconnection: {uri}\ngrace: 5m\nsteps:\n  - at: {at}\n    vm: web-01\n    {change}\n"),
        )
        .unwrap();
        path
    };
    let a = write("a.yaml", "2030-01-01T04:00:00Z", "power: shutoff");
    let b = write("b.yaml", "2030-01-01T04:03:00Z", "title: resized");
    let c = write("c.yaml", "2030-01-01T04:10:00Z", "title: resized");
    let both = virtplan(&["plan", a.to_str().unwrap(), b.to_str().unwrap()], &[]);
    assert_eq!(both.status.code(), Some(1), "{}", text(&both));
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains(&format!("{}:5:9", b.display())), "{err}");
    assert!(
        err.contains("between 2030-01-01 04:03:00 UTC and 2030-01-01 04:08:00 UTC")
            || err.contains("between"),
        "{err}"
    );
    assert!(
        err.contains("two plans would change one domain at the same time"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&both.stdout).is_empty());

    // Ten minutes apart with five minutes of grace: both are shown, green.
    let apart = virtplan(&["plan", a.to_str().unwrap(), c.to_str().unwrap()], &[]);
    assert_eq!(apart.status.code(), Some(0), "{}", text(&apart));
    let out = String::from_utf8_lossy(&apart.stdout);
    assert!(
        out.contains("a.yaml") || out.matches("web-01").count() >= 2,
        "{out}"
    );

    // One saved plan at a time.
    let saved = dir.path().join("saved.json");
    let refused = virtplan(
        &[
            "plan",
            a.to_str().unwrap(),
            c.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
}

/// A test-driver host with a running and a shut-off domain (fixed UUIDs).
fn fleet(dir: &Path) -> String {
    use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
    write_fleet(
        dir,
        &[
            FleetDomain::new("web-01")
                .uuid("5a1e0000-0000-4000-8000-0000000000a1")
                .running(true),
            FleetDomain::new("web-02").uuid("5a1e0000-0000-4000-8000-0000000000a2"),
        ],
    )
    .unwrap()
}

/// `plan.yaml` with `steps` against [`fleet`], in a temporary folder.
fn fleet_plan(steps: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let plan = write_steps(dir.path(), &uri, steps);
    (dir, plan)
}

#[test]
fn plan_shows_reboots_checks_and_always_steps() {
    let (_dir, plan) = fleet_plan(
        "  - at: 2030-01-01T04:00:00Z
    vms: [web-01, web-02]
    power: reboot
    check: { state: running, command: 'true', timeout: 2m, interval: 10s }
  - at: 2030-01-01T04:30:00Z
    vm: web-01
    power: running
    always: true
",
    );
    let human = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert_eq!(human.status.code(), Some(0), "{}", text(&human));
    let out = String::from_utf8_lossy(&human.stdout);
    for expected in [
        "power        running → running  [reboot: ACPI graceful shutdown, force after 2m, then start]",
        "power        shutoff → running  [the domain is off at this step: the reboot starts it]",
        "then waits for the check: state running, `true` exits 0 (within 2m, every 10s)",
        "always: runs even after an earlier step of this domain failed",
    ] {
        assert!(out.contains(expected), "no {expected:?} in\n{out}");
    }
    let json = virtplan(&["plan", plan.to_str().unwrap(), "--format", "json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let reboot = &json["changes"][0];
    assert_eq!(reboot["attribute"], "power");
    assert_eq!(
        reboot["action"], "change",
        "a reboot is never a noop: {reboot}"
    );
    assert_eq!(json["summary"]["change"], 2, "{json}");
}

#[test]
fn plan_refuses_checks_and_syncs_that_could_never_pass() {
    let (_dir, plan) = fleet_plan(
        "  - at: 2030-01-01T04:00:00Z
    vm: web-01
    power: reboot
    check: { guest_agent: true }
  - at: 2030-01-01T04:10:00Z
    vm: web-01
    power: shutoff
    check: { state: running }
  - at: 2030-01-01T04:20:00Z
    vm: web-02
    clock: { sync: true }
",
    );
    let out = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "plan.yaml:7:12",
        "the check waits for the guest agent, and web-01 has no guest agent channel: it could never pass",
        "plan.yaml:11:12",
        "the check waits for web-01 to be running, but this step leaves it shutoff",
        "plan.yaml:14:12",
        "`clock.sync` sets the guest's time through its agent, but web-02 is shutoff after this step",
    ] {
        assert!(err.contains(expected), "no {expected:?} in\n{err}");
    }
}

#[test]
fn qemu_agent_channel_without_an_agent_reboot_falls_back_to_acpi_and_sync_fails_the_step() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define_with_devices(
        &uri,
        "safe-agent",
        crate::libvirt_adapter::AGENT_CHANNEL_XML,
    );
    dom.start();
    let hv = Libvirt::connect(&uri).unwrap();
    let before = run_id(&hv, &dom.uuid).unwrap();
    let (dir, plan) = reboot_plan(
        &uri,
        &dom.name,
        "mode: graceful, timeout: 1s, force_after_timeout: true",
        "    clock: { sync: true }\n    check: { state: running, timeout: 3s, interval: 1s }\n",
    );
    // The domain has an agent channel: plan accepts the sync and says the agent shuts it down.
    let shown = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert_eq!(shown.status.code(), Some(0), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains("reboot: guest agent graceful shutdown"),
        "{stdout}"
    );
    assert!(stdout.contains("guest_time"), "{stdout}");

    // A clock edit on this running domain with an agent channel: plan suggests `sync`.
    let clock_plan = dir.path().join("clock.yaml");
    std::fs::write(
        &clock_plan,
        format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: {}\n    clock: {{ track: wall }}\n",
            dom.name
        ),
    )
    .unwrap();
    let shown = virtplan(&["plan", clock_plan.to_str().unwrap()], &[]);
    assert_eq!(shown.status.code(), Some(0), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains("`sync: true` on the step that boots it"),
        "{stdout}"
    );

    // Nothing answers on the channel (no OS): the ladder falls back to ACPI, then force; the
    // sync waits for the agent up to the check's timeout and fails the step, with the reboot
    // itself done (a new domain id).
    let message = apply_one_step(&plan, 3, StepStatus::Failed).message;
    assert!(
        message.contains("the guest agent did not take the shutdown request"),
        "{message}"
    );
    assert!(
        message.contains("clock sync: the guest agent did not answer within 3s"),
        "{message}"
    );
    assert_ne!(run_id(&hv, &dom.uuid), Some(before));
}

#[test]
fn qemu_real_guest_reboot_through_its_agent_syncs_the_clock_and_passes_an_agent_check() {
    let Some(uri) = qemu_uri() else { return };
    // The rig's real guest: kernel + busybox + qemu-guest-agent, with an agent channel.
    let spec = crate::support::guest::GuestSpec {
        disk: crate::support::guest::Disk::None,
        ..crate::support::guest::GuestSpec::default()
    };
    let guest = crate::support::guest::Guest::boot(&uri, "safe-agent-reboot", &spec);
    let hv = Libvirt::connect(&uri).unwrap();
    let before = run_id(&hv, guest.uuid()).expect("running");
    let (_dir, plan) = reboot_plan(
        &uri,
        guest.name(),
        "mode: graceful, timeout: 60s, force_after_timeout: false",
        "    clock: { sync: true }\n    check: { state: running, guest_agent: true, timeout: 2m, interval: 2s }\n",
    );
    let message = apply_one_step(&plan, 0, StepStatus::Done).message;
    assert!(
        message.contains("shut down gracefully (through the guest agent)"),
        "{message}"
    );
    assert!(
        message.contains("guest time set from the host"),
        "{message}"
    );
    assert!(message.contains("check passed"), "{message}");
    assert_ne!(
        run_id(&hv, guest.uuid()),
        Some(before),
        "rebooted: a new domain id"
    );
    // The agent answers after the reboot, and the guest's clock is the host's (to the second,
    // give or take the round trip).
    let time = guest.agent("guest-get-time").expect("guest-get-time");
    let guest_ns = time.as_i64().expect("nanoseconds since the epoch");
    let host_ns = SystemClock.now().timestamp_nanos_opt().unwrap();
    assert!(
        (host_ns - guest_ns).abs() < 5_000_000_000,
        "guest {guest_ns} host {host_ns}"
    );
}
