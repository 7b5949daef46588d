//! `rollout` (max_parallel / max_errors / pause) and per-host caps on test-driver fleets:
//! `plan` shows the batches in every format, the policy travels in the saved plan, and
//! `apply` keeps the cap and the error budget.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::helpers::text;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{LockStore, StepStatus};

const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

/// A test-driver host with these running domains.
fn fleet(dir: &Path, names: &[&str]) -> String {
    let domains: Vec<FleetDomain> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            FleetDomain::new(*n)
                .uuid(format!("00000000-0000-4000-8000-{i:012x}"))
                .running(true)
        })
        .collect();
    write_fleet(dir, &domains).unwrap()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A plan over `names` with one autostart step under `rollout` (written as `rollout`).
fn plan_file(dir: &Path, uri: &str, rollout: &str, names: &[&str]) -> PathBuf {
    let path = dir.join("plan.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vms: [{}]\n    autostart: true\n    rollout: {rollout}\n",
            names.join(", ")
        ),
    )
    .unwrap();
    // A virtplan.toml of its own, so no configuration above the temporary folder applies.
    std::fs::write(dir.join("virtplan.toml"), "").unwrap();
    path
}

#[test]
fn plan_shows_the_batches_in_the_written_order_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["web-03", "web-01", "web-05", "web-02", "web-04"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(
        dir.path(),
        &uri,
        "{ max_parallel: \"40%\", max_errors: 1, pause: 30s }",
        &names,
    );
    let plan = plan.to_str().unwrap();
    let out = run(dir.path(), &["plan", plan]);
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("Rollouts:\n  when apply starts  step 1  5 domains on test:///")
            && human.contains(": 2 at a time (max_parallel 40% of 5 = 2); stops after more than 1 failed (max_errors); pause 30s before a freed slot is reused\n    batch 1: web-03, web-01\n    batch 2: web-05, web-02\n    batch 3: web-04\n"),
        "{human}"
    );

    let out = run(dir.path(), &["plan", plan, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json["rollouts"][0];
    assert_eq!(r["step"], 1);
    assert_eq!(r["domains"], 5);
    assert_eq!(r["max_parallel_written"], "40%");
    assert_eq!(r["max_parallel"], 2);
    assert_eq!(r["max_errors"], 1);
    assert_eq!(r["pause_seconds"], 30.0);
    assert_eq!(
        r["batches"],
        serde_json::json!([["web-03", "web-01"], ["web-05", "web-02"], ["web-04"]])
    );

    let out = run(dir.path(), &["plan", plan, "--format", "markdown"]);
    assert!(out.status.success(), "{}", text(&out));
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        md.contains("**Rollouts**")
            && md.contains("1: web-03, web-01 · 2: web-05, web-02 · 3: web-04"),
        "{md}"
    );
}

/// `rollout` is not part of a step's id: tightening it on a rollout half done edits pending
/// work; the done domains keep their records.
#[test]
fn editing_a_rollout_keeps_the_step_ids() {
    let ids = |rollout: &str| {
        let text = format!(
            "version: 1\nconnection: test:///default\nsteps:\n  - vms: [a, b]\n    power: reboot\n{rollout}"
        );
        let file = virtplan::plan_file::parse(
            Path::new("plan.yaml"),
            text,
            &virtplan::plan_file::LoadContext::default(),
        )
        .unwrap_or_else(|d| panic!("{}", d.render()));
        file.steps
            .iter()
            .map(virtplan::plan_file::Step::id)
            .collect::<Vec<_>>()
    };
    let before = ids("    rollout: { max_parallel: 2, max_errors: 1 }\n");
    assert_eq!(before, ids("    rollout: { max_parallel: 1, pause: 1m }\n"));
    assert_eq!(before, ids(""));
}

#[test]
fn a_host_cap_narrows_the_batches_and_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b", "c"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(dir.path(), &uri, "{ max_parallel: 3 }", &names);
    std::fs::write(
        dir.path().join("virtplan.toml"),
        format!("[hosts.hv]\nuri = \"{uri}\"\nmax_parallel = 1\n"),
    )
    .unwrap();
    let out = run(dir.path(), &["plan", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("1 at a time (max_parallel 3, host max_parallel 1)")
            && human.contains("    batch 1: a\n    batch 2: b\n    batch 3: c\n")
            && human.contains(&format!("  host {uri}: at most 1 step at once")),
        "{human}"
    );
}

#[test]
fn a_saved_plan_keeps_the_rollout_and_is_written_as_format_3() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(dir.path(), &uri, "{ max_parallel: 1, pause: 2s }", &names);
    let saved = dir.path().join("plan.saved.json");
    let out = run(
        dir.path(),
        &[
            "plan",
            plan.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(
        json["format_version"], 3,
        "a plan with a rollout is format 3"
    );
    let steps = json["plan"]["steps"].as_array().unwrap();
    assert!(steps
        .iter()
        .all(|s| s["rollout"]["max_parallel"] == 1 && s["rollout"]["spec"]["pause"] == 2000));
    // virtplan.toml now says otherwise: `apply SAVED` still runs under the reviewed rollout.
    std::fs::write(dir.path().join("virtplan.toml"), "parallelism = 8\n").unwrap();
    let out = run(
        dir.path(),
        &["apply", saved.to_str().unwrap(), "--auto-approve"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = LockStore::read(&dir.path().join("plan.lock")).unwrap();
    let records: Vec<_> = lock.steps.iter().collect();
    assert!(
        records.iter().all(|r| r.status == StepStatus::Done),
        "{records:?}"
    );
    let (a, b) = (records[0], records[1]);
    let gap = b.started_at.unwrap() - a.finished_at.unwrap();
    assert!(
        gap >= chrono::Duration::seconds(2),
        "the second domain started {gap} after the first finished, not after the 2s pause"
    );
}

/// The "done when" on real QEMU: a rolling reboot over a pattern, one domain at a
/// time (`max_parallel: 1`, each domain's share lasting through its check), stopping at the
/// first failure (`max_errors: 0`). The second domain's check fails, so the third is never
/// touched: it is recorded `skipped` with the reason, shown by `status`.
#[test]
fn qemu_rolling_reboot_over_a_pattern_holds_its_cap_and_stops_at_the_error_budget() {
    use virtplan::hypervisor::libvirt::Libvirt;
    use virtplan::hypervisor::Hypervisor;

    use crate::support::helpers::{lock_of, virtplan, write_plan};
    use crate::support::qemu::{qemu_uri, TestDomain};

    let Some(uri) = qemu_uri() else { return };
    let test = "rolling-reboot";
    let mut doms: Vec<TestDomain> = (0..3).map(|_| TestDomain::define(&uri, test)).collect();
    for d in &doms {
        d.start();
    }
    // The pattern selects these three only (names carry this process's id); the rollout
    // goes through them in name order.
    doms.sort_by(|a, b| a.name.cmp(&b.name));
    let pattern = format!("vpt-{test}-{}-*", std::process::id());
    let hv = Libvirt::connect(&uri).unwrap();
    let ids: Vec<Option<u32>> = doms.iter().map(|d| hv.run_id(&d.uuid).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("virtplan.toml"), "").unwrap();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1
connection: {uri}
steps:
  - vms: {{ match: \"{pattern}\" }}
    power: reboot
    shutdown: {{ mode: graceful, timeout: 1s, force_after_timeout: true }}
    check: {{ state: running, command: 'test \"$VIRTPLAN_VM\" != {bad}', timeout: 2s, interval: 1s }}
    rollout: {{ max_parallel: 1, max_errors: 0 }}
",
            bad = doms[1].name
        ),
    );
    let shown = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert!(shown.status.success(), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains(&format!(
            "    batch 1: {}\n    batch 2: {}\n    batch 3: {}\n",
            doms[0].name, doms[1].name, doms[2].name
        )),
        "{stdout}"
    );

    let out = virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lock = lock_of(&plan);
    let by_vm = |name: &str| lock.steps.iter().find(|r| r.vm == name).unwrap();
    let (first, second, third) = (
        by_vm(&doms[0].name),
        by_vm(&doms[1].name),
        by_vm(&doms[2].name),
    );
    assert_eq!(first.status, StepStatus::Done, "{}", first.message);
    assert_eq!(second.status, StepStatus::Failed, "{}", second.message);
    assert_eq!(third.status, StepStatus::Skipped, "{}", third.message);
    assert!(
        third
            .message
            .contains("the rollout of step 1 stopped after 1 of its 3 domains failed")
            && third.message.contains(&doms[1].name),
        "{}",
        third.message
    );
    // One at a time: the second started only after the first (and its check) finished.
    assert!(second.started_at.unwrap() >= first.finished_at.unwrap());
    assert!(third.started_at.is_none());
    // Rebooted: the first two run under new ids; the third was never touched.
    let now: Vec<Option<u32>> = doms.iter().map(|d| hv.run_id(&d.uuid).unwrap()).collect();
    assert_ne!(now[0], ids[0]);
    assert_ne!(now[1], ids[1]);
    assert_eq!(now[2], ids[2], "the skipped domain was not rebooted");

    let status = virtplan(&["status", plan.to_str().unwrap(), "--format", "json"], &[]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains("\"skipped\"") && said.contains("more than max_errors 0"),
        "{said}"
    );
}

/// The most records whose `[started_at, finished_at)` overlap at one instant.
fn peak(records: &[&virtplan::lockfile::StepRecord]) -> usize {
    let mut edges = Vec::new();
    for r in records {
        edges.push((r.started_at.unwrap(), 1i32));
        edges.push((r.finished_at.unwrap(), -1));
    }
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

/// A small run of the benchmark's shape (examples/bench_rollout.rs), through `apply`: four
/// test-driver hosts, one rollout step each, a per-host cap on one of them. Every cap holds,
/// counted from the lockfile's start and end times, and each step keeps its order.
#[test]
fn rollouts_on_four_hosts_hold_every_cap_through_apply() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = "version: 1\nsteps:\n".to_owned();
    // parallelism 10 = 1 + 3 × 3: every step can fill its width at once.
    let mut toml = "parallelism = 10\n[lease]\nsettle = \"30ms\"\n".to_owned();
    for h in 0..4 {
        let host_dir = dir.path().join(format!("host{h}"));
        std::fs::create_dir(&host_dir).unwrap();
        let names: Vec<String> = (0..6).map(|i| format!("h{h}-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let uri = fleet(&host_dir, &names);
        let _ = write!(
            plan,
            "  - connection: {uri}\n    vms: {{ match: \"h{h}-*\" }}\n    title: rolled\n    check: {{ command: \"sleep 0.05\", timeout: 30s, interval: 1s }}\n    rollout: {{ max_parallel: \"50%\" }}\n"
        );
        if h == 0 {
            let _ = write!(toml, "[hosts.h0]\nuri = \"{uri}\"\nmax_parallel = 1\n");
        }
    }
    let path = dir.path().join("plan.yaml");
    std::fs::write(&path, plan).unwrap();
    std::fs::write(dir.path().join("virtplan.toml"), toml).unwrap();
    let out = run(
        dir.path(),
        &["apply", path.to_str().unwrap(), "--auto-approve"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = LockStore::read(&dir.path().join("plan.lock")).unwrap();
    assert!(lock.steps.iter().all(|r| r.status == StepStatus::Done));
    let all: Vec<_> = lock.steps.iter().collect();
    assert!(peak(&all) <= 10, "parallelism 10: peak {}", peak(&all));
    for step in 1..=4 {
        let mine: Vec<_> = lock.steps.iter().filter(|r| r.step == step).collect();
        let cap = if step == 1 { 1 } else { 3 };
        assert!(
            peak(&mine) <= cap,
            "step {step}: peak {} above {cap}",
            peak(&mine)
        );
        let mut by_start = mine.clone();
        by_start.sort_by_key(|r| (r.started_at, r.vm.clone()));
        let order: Vec<&str> = by_start.iter().map(|r| r.vm.as_str()).collect();
        let written: Vec<String> = (0..6).map(|i| format!("h{}-{i}", step - 1)).collect();
        if cap == 1 {
            // One at a time: each starts after the one written ahead of it ended.
            assert_eq!(order, written, "step {step} started out of order");
        } else {
            // The first wave is the first three written (the rest wait for a slot).
            let mut wave: Vec<&str> = order[..cap].to_vec();
            wave.sort_unstable();
            assert_eq!(wave, written[..cap], "step {step}: first wave {order:?}");
        }
    }
}

/// Percentages are rounded down, so a limit never lets more through than written; a
/// `max_parallel` that rounds to 0 still lets one domain run.
#[test]
fn percentages_round_down_and_max_parallel_is_at_least_one() {
    use virtplan::plan_file::{RolloutSpec, Share};
    use virtplan::planner::Rollout;
    let spec = |parallel: Share, errors: Share| RolloutSpec {
        max_parallel: Some(parallel),
        max_errors: errors,
        pause: std::time::Duration::ZERO,
    };
    let r = Rollout::resolve(spec(Share::Percent(25), Share::Percent(10)), 6, 0);
    assert_eq!(
        (r.max_parallel, r.max_errors),
        (Some(1), 0),
        "25% of 6, 10% of 6"
    );
    let r = Rollout::resolve(spec(Share::Percent(1), Share::Percent(50)), 5, 0);
    assert_eq!(
        (r.max_parallel, r.max_errors),
        (Some(1), 2),
        "1% of 5, 50% of 5"
    );
    let r = Rollout::resolve(spec(Share::Percent(100), Share::Count(3)), 2000, 0);
    assert_eq!((r.max_parallel, r.max_errors), (Some(2000), 3));
    assert_eq!(r.width(50, Some(20)), 20, "bounded by the host cap");
    assert_eq!(r.width(8, None), 8, "bounded by parallelism");
}
