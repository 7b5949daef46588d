//! Domain leases in the executor, on the fake hypervisor (its metadata holds the records) and
//! the fake clock: taking a lease holds no worker, so many steps due at once all start one
//! settle delay after their time, whatever `parallelism` is; a rival's lease is waited for
//! (or the step is missed, naming it) without holding up other domains; a stop while a record
//! waits to be read back removes it.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::clock::Clock as _;

use super::super::{Leasing, Settings};
use super::{assert_all_done, t, Rig, A};
use crate::hypervisor::fake::FakeDomain;
use crate::hypervisor::ErrorKind;
use crate::lease::{Holder, Lease, LeaseConfig, Metadata, Register};
use crate::lockfile::StepStatus;

const AT: &str = "2026-12-01T04:00:00Z";

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// `n` running domains `d00`.., each with one title step at [`AT`].
fn titles(n: usize) -> (String, Vec<FakeDomain>) {
    let mut steps = String::new();
    let mut domains = Vec::new();
    for i in 0..n {
        let name = format!("d{i:02}");
        let _ = write!(steps, "  - at: {AT}\n    vm: {name}\n    title: leased\n");
        domains.push(FakeDomain::new(&name, &uuid(i)).running());
    }
    (steps, domains)
}

/// The rig's settings with leases on (default timing: settle 300 ms, retry 1 s, ttl 60 s).
fn leased(rig: &Rig, parallelism: usize) -> Settings {
    Settings {
        parallelism,
        lease: Some(Leasing {
            holder: Holder::this_process("plan.yaml"),
            config: LeaseConfig::default(),
        }),
        ..rig.settings()
    }
}

fn settle() -> chrono::Duration {
    chrono::Duration::from_std(LeaseConfig::default().settle).unwrap()
}

/// When the fake hypervisor set each domain's title, by uuid.
fn titled_at(rig: &Rig) -> Vec<(String, DateTime<Utc>)> {
    rig.hv
        .successful_calls()
        .into_iter()
        .filter(|c| c.op == "set_title")
        .map(|c| (c.uuid, c.at.unwrap()))
        .collect()
}

fn foreign(expires: DateTime<Utc>) -> Lease {
    Lease {
        holder: Holder {
            host: "other-admin".to_owned(),
            pid: 4242,
            token: "feedface".to_owned(),
            plan: "/srv/plans/other.yaml".to_owned(),
        },
        expires,
    }
}

fn lease_of(rig: &Rig, uuid: &str) -> Option<String> {
    Metadata(rig.hv.as_ref()).get(uuid).unwrap()
}

/// One worker, twenty domains due at the same instant: every record is written, the worker
/// goes on to the next domain during each settle delay, and all start one settle delay after
/// their time (holding the worker through each delay started the last 20 delays late).
#[test]
fn twenty_steps_due_at_once_on_one_worker_all_start_within_one_settle_delay() {
    let (steps, domains) = titles(20);
    let rig = Rig::new(&steps, "", domains, "2026-12-01T03:59:59Z");
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    assert_all_done(&report);
    let at = t(AT);
    for r in &rig.lock().steps {
        let started = r.started_at.unwrap();
        assert!(
            started >= at && started - at <= settle(),
            "started {started} for {at}: {r:?}"
        );
    }
    // One worker: the records (from the start, lease taken, to the end) never overlap.
    let mut spans: Vec<_> = rig
        .lock()
        .steps
        .iter()
        .map(|r| (r.started_at.unwrap(), r.finished_at.unwrap()))
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "{pair:?}");
    }
    let calls = titled_at(&rig);
    assert_eq!(calls.len(), 20);
    for (uuid, when) in &calls {
        // Never before the settle delay ran out: the record was read back first.
        assert!(
            *when >= at + settle() && *when - at < settle() * 2,
            "{uuid} titled at {when}"
        );
        assert_eq!(lease_of(&rig, uuid), None, "{uuid} still leased");
    }
}

/// A rival's live lease on one domain: it is tried again every second or so, without a
/// worker, and taken once the rival's lease expired (plus the clock-skew margin); meanwhile
/// the other domain, due at the same time, started at once on the only worker. The waiting
/// step says whom it waited for, and how long.
#[test]
fn a_rival_lease_is_waited_for_without_holding_the_worker_from_other_domains() {
    let (steps, domains) = titles(2);
    let rig = Rig::new(&steps, "grace: 1m\n", domains, "2026-12-01T03:59:59Z");
    let rival = foreign(t("2026-12-01T04:00:10Z"));
    Metadata(rig.hv.as_ref())
        .set(&uuid(0), Some(&rival.to_xml()))
        .unwrap();
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    assert_all_done(&report);
    let calls = titled_at(&rig);
    let when = |u: &str| calls.iter().find(|(uuid, _)| uuid == u).unwrap().1;
    // Expired at 04:00:10, free for us 5 s (max_skew) later.
    assert!(when(&uuid(0)) > t("2026-12-01T04:00:15Z"), "{calls:?}");
    assert!(
        when(&uuid(0)) < t("2026-12-01T04:00:18Z"),
        "tried again every second or so: {calls:?}"
    );
    assert!(when(&uuid(1)) - t(AT) < settle() * 2, "{calls:?}");
    let lock = rig.lock();
    let waited = lock.steps.iter().find(|r| r.uuid == uuid(0)).unwrap();
    assert!(
        waited
            .message
            .contains("for the lease held by pid 4242 on other-admin (plan /srv/plans/other.yaml)"),
        "{waited:?}"
    );
    assert!(waited.message.contains("waited 1"), "{waited:?}");
    // Its record starts once it holds the lease and a worker, the step's time being judged
    // then: when it set the title.
    assert_eq!(waited.started_at, Some(when(&uuid(0))), "{waited:?}");
    assert_eq!(lease_of(&rig, &uuid(0)), None);
}

/// A rival's lease that outlives the step's grace: missed, naming the holder, nothing called,
/// the rival's record left as it was.
#[test]
fn a_rival_lease_past_the_grace_makes_the_step_missed_naming_the_holder() {
    let steps = format!("  - at: {AT}\n    vm: web\n    title: leased\n");
    let rig = Rig::new(
        &steps,
        "grace: 3s\n",
        vec![FakeDomain::new("web", A).running()],
        "2026-12-01T03:59:59Z",
    );
    let rival = foreign(t("2026-12-01T04:10:00Z"));
    Metadata(rig.hv.as_ref())
        .set(A, Some(&rival.to_xml()))
        .unwrap();
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    assert_eq!(report.outcomes[0].status, StepStatus::Missed, "{report:#?}");
    let message = &rig.lock().steps[0].message;
    assert!(
        message.contains(
            "web is leased by pid 4242 on other-admin (plan /srv/plans/other.yaml) until 2026-12-01T04:10:00Z and the step could not start by 2026-12-01T04:00:03Z"
        ),
        "{message}"
    );
    assert!(titled_at(&rig).is_empty());
    assert_eq!(lease_of(&rig, A), Some(rival.to_xml()));
}

/// Under `on_failure: abort`, the first domain's step fails after both wrote their records:
/// the second's record, waiting to be read back, is removed and its step cancelled.
#[test]
fn an_abort_while_a_record_waits_to_be_read_back_removes_it_and_cancels_the_step() {
    let (steps, domains) = titles(2);
    let rig = Rig::new(
        &steps,
        "defaults: { on_failure: abort }\n",
        domains,
        "2026-12-01T03:59:59Z",
    );
    rig.hv.fail("set_title", 1, 1, ErrorKind::InvalidArgument);
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    let status = |u: &str| {
        report
            .outcomes
            .iter()
            .find(|o| o.uuid == u)
            .map(|o| o.status)
    };
    assert_eq!(status(&uuid(0)), Some(StepStatus::Failed), "{report:#?}");
    assert_eq!(status(&uuid(1)), Some(StepStatus::Cancelled), "{report:#?}");
    assert_eq!(rig.hv.count("set_title"), 1);
    for i in 0..2 {
        assert_eq!(lease_of(&rig, &uuid(i)), None, "domain {i} still leased");
    }
    // Both records were written before either was read back.
    assert_eq!(rig.hv.count("set_metadata_element"), 4);
}

/// A rollout's share is taken once, when the domain is admitted, and held through the settle
/// delay: at most `max_parallel` domains at once, every domain run once.
#[test]
fn a_rollout_with_leases_admits_each_domain_once_and_keeps_its_cap() {
    let names: Vec<String> = (0..6).map(|i| format!("d{i:02}")).collect();
    let domains = names
        .iter()
        .enumerate()
        .map(|(i, n)| FakeDomain::new(n, &uuid(i)).running())
        .collect();
    let steps = format!(
        "  - at: {AT}\n    vms: [{}]\n    title: leased\n    rollout: {{ max_parallel: 2 }}\n",
        names.join(", ")
    );
    let rig = Rig::new(&steps, "", domains, "2026-12-01T03:59:59Z");
    let report = rig.run_with(&leased(&rig, 4), &|_| {});
    assert_all_done(&report);
    assert_eq!(report.peaks.rollouts.get(&1), Some(&2));
    assert_eq!(rig.hv.count("set_title"), 6);
    // Three pairs, each one settle delay after the last.
    let mut calls: Vec<DateTime<Utc>> = titled_at(&rig).into_iter().map(|(_, w)| w).collect();
    calls.sort();
    assert!(*calls.last().unwrap() - t(AT) <= settle() * 3, "{calls:?}");
}

/// Twenty slow steps (a graceful power-off that times out after 30 s of fake time) due at
/// once on one worker: the records written at once cannot all be acted on while they are
/// young. Each too old to be trusted is removed and written again only when the worker can
/// take it up soon, not rewritten over and over while the worker is busy.
#[test]
fn slow_steps_due_at_once_do_not_keep_rewriting_their_lease_records() {
    let mut steps = String::new();
    let mut domains = Vec::new();
    for i in 0..20 {
        let name = format!("d{i:02}");
        let _ = write!(
            steps,
            "  - at: {AT}\n    vm: {name}\n    power: shutoff\n    shutdown: {{ mode: graceful, timeout: 30s, force_after_timeout: true }}\n"
        );
        domains.push(FakeDomain::new(&name, &uuid(i)).running().stubborn());
    }
    let rig = Rig::new(&steps, "grace: 1h\n", domains, "2026-12-01T03:59:59Z");
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    assert_all_done(&report);
    // 20 first writes, the 19 that got too old removed, written again one at a time when the
    // worker could take them up, 20 removals after the steps, and a few renewals: not one
    // rewrite per record per worker turn (232 writes when every stale record was rewritten at
    // once).
    let writes = rig.hv.count("set_metadata_element");
    assert!(writes <= 100, "{writes} lease writes for 20 steps");
}

/// The wall clock is stepped back 2 s during the settle delay (which runs on the monotonic
/// clock): when the record is read back the wall clock says 1.7 s before the step's time. The
/// step must not start early: its record goes, the domain comes back at its time, takes the
/// lease again and starts then (before, it acted at once and recorded a start 1.7 s early).
#[test]
fn a_wall_clock_stepped_back_during_the_settle_delay_never_starts_a_step_early() {
    let (steps, domains) = titles(1);
    let rig = Rig::new(&steps, "", domains, "2026-12-01T03:59:59Z");
    let at = t(AT);
    let shift = std::sync::Arc::clone(&rig.clock.wall_shift);
    let mut stepped = false;
    *rig.clock.on_sleep.lock().unwrap() = Box::new(move |c| {
        // The first sleep that ends after the step's time is the settle delay's.
        if !stepped && c.now() > at {
            *shift.lock().unwrap() = chrono::Duration::seconds(-2);
            stepped = true;
        }
    });
    let report = rig.run_with(&leased(&rig, 1), &|_| {});
    assert_eq!(report.outcomes.len(), 1, "{:#?}", report.outcomes);
    assert_eq!(
        report.outcomes[0].status,
        StepStatus::Done,
        "{:#?}",
        report.outcomes
    );
    let record = &rig.lock().steps[0];
    let started = record.started_at.unwrap();
    assert!(
        started >= at,
        "started {started}, before its time {at}: {record:?}"
    );
    let calls = titled_at(&rig);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].1 >= at, "titled at {}, before {at}", calls[0].1);
    assert_eq!(lease_of(&rig, &uuid(0)), None, "still leased");
}
