//! `rollout` and per-host caps on the fake hypervisor and clock: the cap holds (counted from
//! the lockfile's start and end times, not only by the pacing itself), the reviewed order is
//! kept, `pause` spaces the domains, and a spent error budget skips the rest.

use super::{assert_all_done, t, Rig};
use crate::hypervisor::fake::FakeDomain;
use crate::hypervisor::ErrorKind;
use crate::lockfile::{LockStore, StepRecord, StepStatus};

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// `n` running domains `d00`.. that ignore ACPI, so a graceful power-off with a 30s timeout
/// takes 30 s of fake time before the forced one: every domain's share lasts a while.
fn fleet(n: usize) -> (Vec<String>, Vec<FakeDomain>) {
    let (names, domains) = instant_fleet(n);
    (
        names,
        domains.into_iter().map(FakeDomain::stubborn).collect(),
    )
}

/// `n` running domains `d00`.. whose steps take no fake time.
fn instant_fleet(n: usize) -> (Vec<String>, Vec<FakeDomain>) {
    let names: Vec<String> = (0..n).map(|i| format!("d{i:02}")).collect();
    let domains = names
        .iter()
        .enumerate()
        .map(|(i, name)| FakeDomain::new(name, &uuid(i)).running())
        .collect();
    (names, domains)
}

/// One instant step (autostart) over `names` with `rollout: { ROLLOUT }`: only pacing moves
/// time, so every start is exact.
fn autostart_rollout(names: &[String], rollout: &str) -> String {
    format!(
        "  - at: 2026-12-01T04:00:00Z\n    vms: [{}]\n    autostart: true\n    rollout: {{ {rollout} }}\n",
        names.join(", ")
    )
}

/// One power-off step over `names` (in this order) with `rollout` (a line, or nothing).
fn rollout_step(names: &[String], rollout: &str) -> String {
    format!(
        "  - at: 2026-12-01T04:00:00Z\n    vms: [{}]\n    power: shutoff\n    shutdown: {{ mode: graceful, timeout: 30s, force_after_timeout: true }}\n{rollout}",
        names.join(", ")
    )
}

fn records(rig: &Rig, step: usize) -> Vec<StepRecord> {
    rig.lock()
        .steps
        .into_iter()
        .filter(|r| r.step == step)
        .collect()
}

/// The most records whose `[started_at, finished_at)` overlap at one instant.
fn peak_overlap(records: &[StepRecord]) -> usize {
    let mut edges: Vec<(chrono::DateTime<chrono::Utc>, i32)> = Vec::new();
    for r in records {
        if let (Some(s), Some(f)) = (r.started_at, r.finished_at) {
            edges.push((s, 1));
            edges.push((f, -1));
        }
    }
    // An end at the same instant as a start frees its slot first.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}

/// Holds the fake clock still until `op` was called `n` times (or 10 s of real time passed),
/// so domains sharing the one fake time cannot run ahead of each other's start.
fn open_after_calls(rig: &Rig, op: &'static str, n: usize) -> std::thread::JoinHandle<()> {
    rig.clock.set_open(false);
    let (clock, hv) = (rig.clock.clone(), rig.hv.clone());
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while hv.count(op) < n && started.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::yield_now();
        }
        clock.set_open(true);
    })
}

/// Names in the order their records started.
fn start_order(records: &[StepRecord]) -> Vec<String> {
    let mut started: Vec<_> = records
        .iter()
        .filter_map(|r| Some((r.started_at?, r.vm.clone())))
        .collect();
    started.sort();
    started.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn a_rollout_never_runs_more_than_max_parallel_domains_and_keeps_the_written_order() {
    let (mut names, domains) = fleet(12);
    // Written out of name order: the rollout follows the list, not the names.
    names.reverse();
    let steps = rollout_step(&names, "    rollout: { max_parallel: 3 }\n");
    let rig = Rig::new(&steps, "", domains, "2026-12-01T04:00:00Z");
    let mut settings = rig.settings();
    settings.parallelism = 8;
    // Time stands still until three power-offs were requested: had a fourth domain been let
    // in, it would be in flight too before anyone finished.
    let opener = open_after_calls(&rig, "shutdown", 3);
    let report = rig.run_with(&settings, &|_| {});
    opener.join().unwrap();
    assert_all_done(&report);
    let records = records(&rig, 1);
    assert_eq!(peak_overlap(&records), 3, "{records:#?}");
    assert_eq!(report.peaks.rollouts.get(&1), Some(&3));
    // The first three written start first, together at 04:00, before time moves (the rest
    // follow in order as slots free: `pause_keeps_…` and the budget tests pin the order of
    // each start one at a time).
    let mut first: Vec<&str> = records
        .iter()
        .filter(|r| r.started_at == Some(t("2026-12-01T04:00:00Z")))
        .map(|r| r.vm.as_str())
        .collect();
    first.sort_unstable();
    let mut written: Vec<&str> = names[..3].iter().map(String::as_str).collect();
    written.sort_unstable();
    assert_eq!(first, written, "{:?}", start_order(&records));
}

#[test]
fn waiting_for_its_turn_in_a_rollout_is_not_being_late() {
    let (names, domains) = instant_fleet(4);
    let steps = autostart_rollout(&names, "max_parallel: 1, pause: 40s");
    // One at a time, 40 s apart: the last starts 2 minutes after `at`, past the 1m grace.
    let rig = Rig::new(&steps, "grace: 1m\n", domains, "2026-12-01T04:00:00Z");
    let report = rig.run();
    assert_all_done(&report);
    let starts = start_order(&records(&rig, 1));
    assert_eq!(starts, names);
    let last = records(&rig, 1)
        .iter()
        .filter_map(|r| r.started_at)
        .max()
        .unwrap();
    assert_eq!(last, t("2026-12-01T04:02:00Z"));
}

#[test]
fn a_host_cap_bounds_every_step_on_that_connection() {
    let (names, domains) = fleet(8);
    // No rollout: eight ordinary domains due at once, on a host capped at 2.
    let steps = rollout_step(&names, "");
    let rig = Rig::new(&steps, "", domains, "2026-12-01T04:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let mut plan = rig.plan(&store);
    drop(store);
    plan.policy
        .host_caps
        .insert(crate::uri::Uri::new(super::URI), 2);
    let mut settings = rig.settings();
    settings.parallelism = 8;
    let opener = open_after_calls(&rig, "shutdown", 2);
    let report = rig.run_plan(&plan, &settings, &|_| {}).unwrap();
    opener.join().unwrap();
    assert_all_done(&report);
    assert_eq!(peak_overlap(&records(&rig, 1)), 2);
    assert_eq!(report.peaks.hosts.get(super::URI), Some(&2));
}

#[test]
fn a_host_cap_that_keeps_a_step_past_its_grace_makes_it_missed_not_late() {
    let (names, domains) = fleet(2);
    let steps = rollout_step(&names, "");
    // Each power-off takes 30 s; with one at a time the second would start 30 s late.
    let rig = Rig::new(&steps, "grace: 10s\n", domains, "2026-12-01T04:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let mut plan = rig.plan(&store);
    drop(store);
    plan.policy
        .host_caps
        .insert(crate::uri::Uri::new(super::URI), 1);
    let report = rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    // Without a rollout there is no order between the two: whichever got the host first is
    // done, the other waited past its grace and is missed, untouched.
    let mut statuses: Vec<StepStatus> = report.outcomes.iter().map(|o| o.status).collect();
    statuses.sort_by_key(|s| s.as_str());
    assert_eq!(
        statuses,
        [StepStatus::Done, StepStatus::Missed],
        "{:#?}",
        report.outcomes
    );
    let missed = report
        .outcomes
        .iter()
        .find(|o| o.status == StepStatus::Missed)
        .unwrap();
    assert!(rig.hv.calls().iter().all(|c| c.uuid != missed.uuid));
    assert!(
        missed.message.contains("could not start by"),
        "{}",
        missed.message
    );
}

#[test]
fn past_the_error_budget_no_further_domain_starts_and_the_rest_are_skipped_with_the_reason() {
    let (names, domains) = fleet(6);
    // A later step of every domain, and a domain outside the rollout.
    let steps = format!(
        "{}  - at: 2026-12-01T04:30:00Z\n    vms: [{}, other]\n    autostart: true\n",
        rollout_step(&names, "    rollout: { max_parallel: 1, max_errors: 1 }\n"),
        names.join(", ")
    );
    let mut domains = domains;
    domains.push(FakeDomain::new("other", &uuid(99)).running());
    let rig = Rig::new(&steps, "grace: 1h\n", domains, "2026-12-01T04:00:00Z");
    // The 2nd and 4th forced power-offs fail: d01 and d03 (one at a time, in order).
    rig.hv.fail("destroy", 2, 1, ErrorKind::InvalidArgument);
    rig.hv.fail("destroy", 4, 1, ErrorKind::InvalidArgument);
    let report = rig.run();
    let first: Vec<(String, StepStatus)> = report
        .outcomes
        .iter()
        .filter(|o| o.step == 1)
        .map(|o| (o.vm.clone(), o.status))
        .collect();
    assert_eq!(
        first,
        [
            ("d00".to_owned(), StepStatus::Done),
            ("d01".to_owned(), StepStatus::Failed),
            ("d02".to_owned(), StepStatus::Done),
            ("d03".to_owned(), StepStatus::Failed),
            ("d04".to_owned(), StepStatus::Skipped),
            ("d05".to_owned(), StepStatus::Skipped),
        ]
    );
    // Nothing was called on the skipped domains.
    assert!(rig
        .hv
        .calls()
        .iter()
        .all(|c| c.uuid != uuid(4) && c.uuid != uuid(5)));
    let record = records(&rig, 1)
        .into_iter()
        .find(|r| r.vm == "d04")
        .unwrap();
    assert!(
        record.message.contains("the rollout of step 1 stopped after 2 of its 6 domains failed (d01, d03), more than max_errors 1")
            && record.message.contains("on_failure skip-vm"),
        "{}",
        record.message
    );
    assert!(
        record.started_at.is_none(),
        "a skipped domain never started"
    );
    // skip-vm: the domains of the rollout that failed or were skipped skip their later step;
    // the others and the domain outside the rollout go on.
    let second: Vec<(String, StepStatus)> = report
        .outcomes
        .iter()
        .filter(|o| o.step == 2)
        .map(|o| (o.vm.clone(), o.status))
        .collect();
    let expect = |vm: &str| {
        if ["d00", "d02", "other"].contains(&vm) {
            StepStatus::Done
        } else {
            StepStatus::Skipped
        }
    };
    assert!(second.iter().all(|(vm, s)| *s == expect(vm)), "{second:?}");
}

#[test]
fn failures_within_the_budget_do_not_abort_and_past_it_on_failure_abort_stops_the_plan() {
    let (names, domains) = fleet(5);
    let mut steps = rollout_step(&names, "    rollout: { max_parallel: 1, max_errors: 1 }\n");
    steps.push_str("  - at: 2026-12-01T04:30:00Z\n    vm: other\n    autostart: true\n");
    let mut domains = domains;
    domains.push(FakeDomain::new("other", &uuid(99)).running());
    let rig = Rig::new(
        &steps,
        "grace: 1h\ndefaults: { on_failure: abort }\n",
        domains,
        "2026-12-01T04:00:00Z",
    );
    rig.hv.fail("destroy", 1, 1, ErrorKind::InvalidArgument);
    rig.hv.fail("destroy", 3, 1, ErrorKind::InvalidArgument);
    let report = rig.run();
    let statuses: Vec<(String, StepStatus)> = report
        .outcomes
        .iter()
        .map(|o| (o.vm.clone(), o.status))
        .collect();
    assert_eq!(
        statuses,
        [
            // One failure is within max_errors 1: the rollout goes on despite `abort`.
            ("d00".to_owned(), StepStatus::Failed),
            ("d01".to_owned(), StepStatus::Done),
            ("d02".to_owned(), StepStatus::Failed),
            ("d03".to_owned(), StepStatus::Skipped),
            ("d04".to_owned(), StepStatus::Skipped),
            ("other".to_owned(), StepStatus::Cancelled),
        ]
    );
    let message = &report.outcomes[3].message;
    assert!(message.contains("on_failure abort"), "{message}");
}

#[test]
fn pause_keeps_a_freed_slot_empty_before_the_next_domain_starts() {
    let (names, domains) = instant_fleet(5);
    let steps = autostart_rollout(&names, "max_parallel: 2, pause: 90s");
    let rig = Rig::new(&steps, "", domains, "2026-12-01T04:00:00Z");
    let report = rig.run();
    assert_all_done(&report);
    let records = records(&rig, 1);
    let mut starts: Vec<_> = records.iter().filter_map(|r| r.started_at).collect();
    starts.sort();
    // Two at 04:00; each freed slot stays empty 90 s, then the next two, then the last.
    assert_eq!(
        starts,
        [
            t("2026-12-01T04:00:00Z"),
            t("2026-12-01T04:00:00Z"),
            t("2026-12-01T04:01:30Z"),
            t("2026-12-01T04:01:30Z"),
            t("2026-12-01T04:03:00Z"),
        ]
    );
    assert_eq!(start_order(&records), names);
}

#[test]
fn a_rollout_still_waiting_when_the_window_closes_records_the_rest_missed() {
    let (names, domains) = instant_fleet(4);
    let steps = autostart_rollout(&names, "max_parallel: 1, pause: 30s");
    let rig = Rig::new(
        &steps,
        "grace: 1h\nwindow: { start: 2026-12-01T04:00:00Z, end: 2026-12-01T04:01:10Z }\n",
        domains,
        "2026-12-01T04:00:00Z",
    );
    let report = rig.run();
    let statuses: Vec<StepStatus> = report.outcomes.iter().map(|o| o.status).collect();
    // One at a time, 30 s apart: 04:00, 04:00:30, 04:01; the fourth's turn (04:01:30) comes
    // after the window closed at 04:01:10.
    assert_eq!(
        statuses,
        [
            StepStatus::Done,
            StepStatus::Done,
            StepStatus::Done,
            StepStatus::Missed
        ],
        "{:#?}",
        report.outcomes
    );
    assert!(report.outcomes[3].message.contains("window closed"));
    assert!(rig.hv.calls().iter().all(|c| c.uuid != uuid(3)));
}

#[test]
fn an_always_rollout_keeps_its_cap_but_not_its_budget() {
    let (names, domains) = fleet(4);
    let steps = rollout_step(
        &names,
        "    always: true\n    rollout: { max_parallel: 1, max_errors: 0 }\n",
    );
    let rig = Rig::new(&steps, "grace: 1h\n", domains, "2026-12-01T04:00:00Z");
    rig.hv.fail("destroy", 1, 1, ErrorKind::InvalidArgument);
    let report = rig.run();
    let statuses: Vec<StepStatus> = report.outcomes.iter().map(|o| o.status).collect();
    // The first fails; a restore step still goes through every domain, one at a time.
    assert_eq!(
        statuses,
        [
            StepStatus::Failed,
            StepStatus::Done,
            StepStatus::Done,
            StepStatus::Done
        ],
        "{:#?}",
        report.outcomes
    );
    assert_eq!(peak_overlap(&records(&rig, 1)), 1);
}
