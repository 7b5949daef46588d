//! A host that cannot be reached (down when the run starts, or lost mid-window) fails only its
//! own domains' steps; it is reopened with bounded backoff within each step's deadline, and a
//! host that returns in time gets its later steps run. Fake hypervisors on a fake clock.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::{Executor, Report, Settings};
use crate::clock::{Clock, FakeClock};
use crate::hypervisor::fake::{FakeDomain, FakeHypervisor};
use crate::hypervisor::unreachable::Unreachable;
use crate::hypervisor::{ErrorKind, HvError, HvResult, Hypervisor};
use crate::lockfile::{LockStore, Lockfile, StepStatus};
use crate::plan_file::{self, LoadContext};
use crate::planner::{self, Connections, Plan, PlanInput};
use crate::uri::Uri;

const HOST_A: &str = "test:///a";
const HOST_B: &str = "test:///b";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// web-a on host A; web-b1, web-b2, web-b3 on host B. Steps 1 and 2 at 04:00 (grace 2m), steps
/// 3 and 4 at 04:10.
const PLAN: &str = "version: 1
grace: 2m
steps:
  - at: 2026-12-01T04:00:00Z
    connection: test:///a
    vm: web-a
    memory: 2GiB
  - at: 2026-12-01T04:00:00Z
    connection: test:///b
    vms: [web-b1, web-b2]
    memory: 2GiB
  - at: 2026-12-01T04:10:00Z
    connection: test:///a
    vm: web-a
    vcpus: 2
  - at: 2026-12-01T04:10:00Z
    connection: test:///b
    vm: web-b3
    memory: 2GiB
";

struct Fleet {
    clock: Arc<FakeClock>,
    a: Arc<FakeHypervisor>,
    b: Arc<FakeHypervisor>,
    plan: Plan,
    dir: tempfile::TempDir,
    sha: String,
}

impl Fleet {
    fn new() -> Self {
        Self::with_header("")
    }

    /// The fleet, with `header` (such as `on_failure: abort`) added to the plan.
    fn with_header(header: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.yaml");
        let text = PLAN.replacen("version: 1\n", &format!("version: 1\n{header}"), 1);
        std::fs::write(&path, &text).unwrap();
        let file = plan_file::parse(&path, text, &LoadContext::default())
            .unwrap_or_else(|d| panic!("{}", d.render()));
        let clock = Arc::new(FakeClock::new(t("2026-12-01T03:59:00Z")));
        let a = Arc::new(
            FakeHypervisor::new(HOST_A, vec![FakeDomain::new("web-a", &uuid(1)).running()])
                .with_clock(clock.clone()),
        );
        let b = Arc::new(
            FakeHypervisor::new(
                HOST_B,
                vec![
                    FakeDomain::new("web-b1", &uuid(2)).running(),
                    FakeDomain::new("web-b2", &uuid(3)).running(),
                    FakeDomain::new("web-b3", &uuid(4)).running(),
                ],
            )
            .with_clock(clock.clone()),
        );
        let mut connections = Connections::new();
        connections.insert(Uri::new(HOST_A), a.clone() as Arc<dyn Hypervisor>);
        connections.insert(Uri::new(HOST_B), b.clone() as Arc<dyn Hypervisor>);
        let plan = planner::project(&PlanInput {
            file: &file,
            connections: &connections,
            connect_override: None,
            now: clock.now(),
            progress: &planner::NoProgress,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Self {
            clock,
            a,
            b,
            plan,
            sha: file.sha256,
            dir,
        }
    }

    /// Runs the plan over `connections` (host B as given), reopening B with `reopen`.
    fn run(
        &self,
        b: Arc<dyn Hypervisor>,
        parallelism: usize,
        reopen: &(dyn Fn(&Uri) -> HvResult<Arc<dyn Hypervisor>> + Sync),
    ) -> Report {
        let mut connections = Connections::new();
        connections.insert(Uri::new(HOST_A), self.a.clone() as Arc<dyn Hypervisor>);
        connections.insert(Uri::new(HOST_B), b);
        let store = LockStore::open(&self.dir.path().join("plan.lock"), &self.sha).unwrap();
        let mut settings = Settings::new(&self.plan.policy);
        settings.parallelism = parallelism;
        let stop = AtomicBool::new(false);
        Executor {
            plan: &self.plan,
            connections: &connections,
            clock: self.clock.as_ref(),
            store: &store,
            settings: &settings,
            stop: &stop,
            on_outcome: &|_| {},
            reconnect: Some(reopen),
        }
        .run()
        .unwrap()
    }

    fn lock(&self) -> Lockfile {
        LockStore::read(&self.dir.path().join("plan.lock")).unwrap()
    }

    fn record(&self, step: usize, vm: &str) -> crate::lockfile::StepRecord {
        self.lock()
            .steps
            .into_iter()
            .find(|r| r.step == step && r.vm == vm)
            .unwrap_or_else(|| panic!("no record of step {step} on {vm}"))
    }
}

/// Host B is back (reachable again) from `back` on: reopening it before fails like a refused
/// connection. Every attempt's time is kept.
fn reopener<'a>(
    fleet: &'a Fleet,
    back: DateTime<Utc>,
    attempts: &'a Mutex<Vec<DateTime<Utc>>>,
) -> impl Fn(&Uri) -> HvResult<Arc<dyn Hypervisor>> + Sync + 'a {
    move |uri: &Uri| {
        assert_eq!(uri.expose(), HOST_B, "only the lost host is reopened");
        let now = fleet.clock.now();
        attempts.lock().unwrap().push(now);
        if now < back {
            return Err(HvError::new(
                ErrorKind::Transient,
                "cannot connect to libvirt at test:///b: Connection refused",
            ));
        }
        fleet.b.set_down(false);
        Ok(fleet.b.clone() as Arc<dyn Hypervisor>)
    }
}

fn assert_backoff(attempts: &[DateTime<Utc>], until: DateTime<Utc>) {
    // While down, attempts are spaced by a doubling backoff (never a busy loop), capped.
    let gaps: Vec<i64> = attempts
        .windows(2)
        .filter(|w| w[1] <= until)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    assert!(gaps.len() >= 3, "{attempts:?}");
    for pair in gaps.windows(2) {
        assert!(
            pair[1] >= pair[0] || pair[1] >= 29_000,
            "backoff must not shrink: {gaps:?}"
        );
    }
    assert!(
        gaps.iter()
            .all(|g| *g <= i64::try_from(super::HOST_BACKOFF_MAX.as_millis()).unwrap() + 1000),
        "{gaps:?}"
    );
}

#[test]
fn a_host_lost_mid_window_fails_only_its_own_steps_and_its_later_steps_run_when_it_returns() {
    let fleet = Fleet::new();
    // Host B dies just before the window: every call on its connection fails.
    fleet.b.set_down(true);
    let attempts = Mutex::new(Vec::new());
    let back = t("2026-12-01T04:05:00Z");
    let reopen = reopener(&fleet, back, &attempts);
    // One worker: waiting for the lost host must not hold it from host A's steps.
    let report = fleet.run(fleet.b.clone(), 1, &reopen);

    // Host A's steps all ran, each at its time.
    for step in [1, 3] {
        let r = fleet.record(step, "web-a");
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        let late = r.started_at.unwrap() - r.at.unwrap();
        assert!(
            late < chrono::Duration::seconds(10),
            "step {step} of web-a started {late} late"
        );
    }
    // Host B's 04:00 steps could not run: missed (nothing was sent), naming the host.
    for vm in ["web-b1", "web-b2"] {
        let r = fleet.record(2, vm);
        assert_eq!(r.status, StepStatus::Missed, "{r:?}");
        assert!(
            r.message.contains("host test:///b is unreachable"),
            "{}",
            r.message
        );
        assert!(r.message.contains("Connection refused"), "{}", r.message);
    }
    // Back at 04:05, host B's 04:10 step ran.
    let r = fleet.record(4, "web-b3");
    assert_eq!(r.status, StepStatus::Done, "{r:?}");
    assert_eq!(
        fleet.b.state(&uuid(4)).memory,
        crate::state::Kib::from_mib(2048)
    );
    // No change reached B while it was down, and none after a step's deadline.
    for call in fleet.b.successful_calls() {
        assert!(call.at.unwrap() >= t("2026-12-01T04:10:00Z"), "{call:?}");
    }
    // Reopen attempts backed off, stopped with the 04:00 steps' deadline, and resumed
    // only when the next step of B was due.
    let attempts = attempts.lock().unwrap().clone();
    let deadline = t("2026-12-01T04:02:00Z");
    assert_backoff(&attempts, deadline);
    assert!(
        attempts
            .iter()
            .all(|a| *a <= deadline + chrono::Duration::seconds(1)
                || *a >= t("2026-12-01T04:10:00Z")),
        "{attempts:?}"
    );
    assert!(attempts.len() < 20, "{attempts:?}");
    assert!(report.any_failed());
}

#[test]
fn a_host_unreachable_when_the_run_starts_misses_only_its_steps_and_is_opened_when_back() {
    let fleet = Fleet::new();
    fleet.b.set_down(true);
    let attempts = Mutex::new(Vec::new());
    let back = t("2026-12-01T04:05:00Z");
    let reopen = reopener(&fleet, back, &attempts);
    // A saved plan's host that is down at start stands in as unreachable.
    let stand_in = Arc::new(Unreachable::new(
        Uri::new(HOST_B),
        HvError::new(
            ErrorKind::Transient,
            "cannot connect to libvirt at test:///b: Connection refused",
        ),
    ));
    fleet.run(stand_in, 4, &reopen);
    assert_eq!(fleet.record(1, "web-a").status, StepStatus::Done);
    assert_eq!(fleet.record(3, "web-a").status, StepStatus::Done);
    for vm in ["web-b1", "web-b2"] {
        let r = fleet.record(2, vm);
        assert_eq!(r.status, StepStatus::Missed, "{r:?}");
        assert!(
            r.message.contains("host test:///b is unreachable"),
            "{}",
            r.message
        );
        // Missed at the deadline, not before: it waited for the host.
        assert!(r.finished_at.unwrap() >= t("2026-12-01T04:02:00Z"), "{r:?}");
        assert!(r.started_at.is_none(), "never started: {r:?}");
    }
    assert_eq!(fleet.record(4, "web-b3").status, StepStatus::Done);
    let attempts = attempts.lock().unwrap().clone();
    // The first attempt is made when B's first step is due, not before.
    assert!(attempts[0] >= t("2026-12-01T04:00:00Z"), "{attempts:?}");
    assert_backoff(&attempts, t("2026-12-01T04:02:00Z"));
}

#[test]
fn a_host_back_within_the_grace_runs_the_step_that_waited_for_it() {
    let fleet = Fleet::new();
    fleet.b.set_down(true);
    let attempts = Mutex::new(Vec::new());
    // Back 70 s after 04:00, inside the 2-minute grace.
    let reopen = reopener(&fleet, t("2026-12-01T04:01:10Z"), &attempts);
    let stand_in = Arc::new(Unreachable::new(
        Uri::new(HOST_B),
        HvError::new(ErrorKind::Transient, "Connection refused"),
    ));
    fleet.run(stand_in, 4, &reopen);
    for vm in ["web-b1", "web-b2"] {
        let r = fleet.record(2, vm);
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        let started = r.started_at.unwrap();
        assert!(
            started >= t("2026-12-01T04:01:10Z") && started <= t("2026-12-01T04:02:00Z"),
            "{r:?}"
        );
    }
}

#[test]
fn under_on_failure_abort_a_lost_host_aborts_the_plan_on_every_host() {
    let fleet = Fleet::with_header("defaults: { on_failure: abort }\n");
    fleet.b.set_down(true);
    let attempts = Mutex::new(Vec::new());
    let reopen = reopener(&fleet, t("2026-12-01T04:05:00Z"), &attempts);
    fleet.run(fleet.b.clone(), 4, &reopen);
    assert_eq!(fleet.record(1, "web-a").status, StepStatus::Done);
    // Host A's later step does not start: the plan was aborted by the lost host's step.
    let r = fleet.record(3, "web-a");
    assert_eq!(r.status, StepStatus::Cancelled, "{r:?}");
    assert!(r.message.contains("on_failure: abort"), "{}", r.message);
}
