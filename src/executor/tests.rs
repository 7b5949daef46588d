//! Executor tests on the fake hypervisor and a fake clock: no test waits for real time.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Executor, Outcome, Report, Settings};
use crate::clock::{Clock, FakeClock};
use crate::hypervisor::fake::{FakeDomain, FakeHypervisor};
use crate::hypervisor::{ErrorKind, Hypervisor};
use crate::lockfile::{LockError, LockStore, Lockfile, StepStatus};
use crate::plan_file::{self, LoadContext, PlanFile};
use crate::planner::{self, Connections, Plan, PlanInput};
use crate::state::{Kib, PowerState};

const URI: &str = "test:///fake";
const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

/// Every step of the run ended done (the outcomes are shown when not).
fn assert_all_done(report: &Report) {
    assert!(
        report.outcomes.iter().all(|o| o.status == StepStatus::Done),
        "{:#?}",
        report.outcomes
    );
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

type SleepHook = Box<dyn FnMut(&FakeClock) + Send>;

/// A fake clock whose sleeps can be held until a test opens the gate, so several domain
/// threads sharing one fake time cannot race ahead of each other.
struct GatedClock {
    inner: FakeClock,
    open: Mutex<bool>,
    cond: Condvar,
    /// Called with the time after each sleep (to model clock jumps).
    on_sleep: Mutex<SleepHook>,
    /// How far the wall clock ([`Clock::now`]) is set off the monotonic one: a wall clock
    /// stepped by NTP or an operator, which a settle delay must not follow.
    wall_shift: Arc<Mutex<chrono::Duration>>,
}

impl GatedClock {
    fn new(start: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self {
            inner: FakeClock::new(start),
            open: Mutex::new(true),
            cond: Condvar::new(),
            on_sleep: Mutex::new(Box::new(|_| {})),
            wall_shift: Arc::new(Mutex::new(chrono::Duration::zero())),
        })
    }

    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cond.notify_all();
    }
}

impl Clock for GatedClock {
    fn now(&self) -> DateTime<Utc> {
        self.inner.now() + *self.wall_shift.lock().unwrap()
    }

    fn sleep(&self, duration: Duration) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
        drop(open);
        self.inner.sleep(duration);
        (self.on_sleep.lock().unwrap())(&self.inner);
    }

    /// Settle delays pass on fake time too (the lease tests).
    fn monotonic(&self) -> DateTime<Utc> {
        self.inner.now()
    }
}

struct Rig {
    clock: Arc<GatedClock>,
    hv: Arc<FakeHypervisor>,
    connections: Connections,
    file: PlanFile,
    _dir: tempfile::TempDir,
    lock_path: PathBuf,
}

impl Rig {
    fn new(steps: &str, extra: &str, domains: Vec<FakeDomain>, start: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.yaml");
        let text = format!("version: 1\nconnection: {URI}\n{extra}steps:\n{steps}");
        std::fs::write(&path, &text).unwrap();
        let file = plan_file::parse(&path, text, &LoadContext::default()).unwrap_or_else(|d| {
            panic!(
                "{}",
                d.items
                    .iter()
                    .map(|i| i.render(None))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        let clock = GatedClock::new(t(start));
        let hv = Arc::new(FakeHypervisor::new(URI, domains).with_clock(clock.clone()));
        let mut connections = Connections::new();
        connections.insert(crate::uri::Uri::new(URI), hv.clone() as Arc<dyn Hypervisor>);
        Self {
            clock,
            hv,
            connections,
            file,
            lock_path: dir.path().join("plan.lock"),
            _dir: dir,
        }
    }

    fn plan(&self, store: &LockStore) -> Plan {
        planner::project(&PlanInput {
            file: &self.file,
            connections: &self.connections,
            connect_override: None,
            now: self.clock.now(),
            progress: store,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Without leases: their settle delay would move every step on the fake clock; the
    /// lease tests turn them on.
    fn settings(&self) -> Settings {
        let mut policy = planner::Policy::of(&self.file);
        policy.parallelism = 4;
        Settings::new(&policy)
    }

    fn run(&self) -> Report {
        self.run_with(&self.settings(), &|_| {})
    }

    fn run_with(&self, settings: &Settings, on: &(dyn Fn(&Outcome) + Sync)) -> Report {
        let store = LockStore::open(&self.lock_path, &self.file.sha256).unwrap();
        let plan = self.plan(&store);
        self.run_plan(&plan, settings, on).unwrap()
    }

    fn run_plan(
        &self,
        plan: &Plan,
        settings: &Settings,
        on: &(dyn Fn(&Outcome) + Sync),
    ) -> Result<Report, LockError> {
        let store = LockStore::open(&self.lock_path, &self.file.sha256)?;
        let stop = AtomicBool::new(false);
        Executor {
            plan,
            connections: &self.connections,
            clock: self.clock.as_ref(),
            store: &store,
            settings,
            stop: &stop,
            on_outcome: on,
            reconnect: None,
        }
        .run()
    }

    fn lock(&self) -> Lockfile {
        LockStore::read(&self.lock_path).unwrap()
    }

    fn statuses(&self) -> Vec<(usize, String, StepStatus)> {
        self.lock()
            .steps
            .iter()
            .map(|r| (r.step, r.vm.clone(), r.status))
            .collect()
    }

    fn ops(&self) -> Vec<&'static str> {
        self.hv.successful_calls().iter().map(|c| c.op).collect()
    }
}

fn web() -> FakeDomain {
    FakeDomain::new("web", A).running()
}

const CLASSIC: &str = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: shutoff
    shutdown: { mode: graceful, timeout: 30s, force_after_timeout: true }
  - at: 2026-12-01T04:05:00Z
    vm: web
    memory: 2GiB
  - at: 2026-12-01T04:06:00Z
    vm: web
    vcpus: 2
  - at: 2026-12-01T04:07:00Z
    vm: web
    clock: { track: guest }
  - at: 2026-12-01T04:10:00Z
    vm: web
    power: running
";

#[test]
fn classic_window_runs_every_step_at_its_time_and_never_before() {
    let rig = Rig::new(CLASSIC, "", vec![web().stubborn()], "2026-12-01T03:59:00Z");
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    assert_eq!(
        rig.ops(),
        [
            "shutdown",
            "destroy",
            "set_memory",
            "set_vcpus",
            "define_xml",
            "start"
        ]
    );
    let state = rig.hv.state(A);
    assert_eq!(state.power, PowerState::Running);
    assert_eq!(state.memory, Kib::from_mib(2048));
    assert_eq!(state.vcpus, 2);
    assert_eq!(state.clock.unwrap().rtc_track.as_deref(), Some("guest"));
    // No change before its step's time, and each step started within a second of it.
    let lock = rig.lock();
    for r in &lock.steps {
        let (at, started) = (r.at.unwrap(), r.started_at.unwrap());
        assert!(
            started >= at && started - at < chrono::Duration::seconds(1),
            "{r:?}"
        );
        assert_eq!(r.status, StepStatus::Done);
        assert!(r.before.is_some() && r.after.is_some());
    }
    for call in rig.hv.calls() {
        let step = lock
            .steps
            .iter()
            .rfind(|r| r.at.unwrap() <= call.at.unwrap())
            .unwrap();
        assert!(call.at.unwrap() >= step.at.unwrap());
    }
    let forced = &lock.steps[0].message;
    assert!(forced.contains("forced off"), "{forced}");
}

#[test]
fn a_clock_stepped_back_cannot_make_a_step_early() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T03:59:58Z");
    let jumped = Arc::new(AtomicBool::new(false));
    let flag = jumped.clone();
    *rig.clock.on_sleep.lock().unwrap() = Box::new(move |c: &FakeClock| {
        // The first time the step's time is reached, NTP steps the clock back a minute.
        if c.now() >= t("2026-12-01T04:00:00Z")
            && !flag.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            c.advance(chrono::Duration::seconds(-60));
        }
    });
    rig.run();
    assert!(jumped.load(std::sync::atomic::Ordering::SeqCst));
    let call = &rig.hv.successful_calls()[0];
    assert!(call.at.unwrap() >= t("2026-12-01T04:00:00Z"), "{call:?}");
}

#[test]
fn a_step_past_its_grace_is_missed_and_later_steps_skipped() {
    let rig = Rig::new(CLASSIC, "grace: 2m\n", vec![web()], "2026-12-01T04:02:01Z");
    let report = rig.run();
    assert!(report.any_failed());
    assert!(rig.hv.calls().is_empty(), "{:?}", rig.hv.calls());
    let statuses: Vec<StepStatus> = rig.statuses().into_iter().map(|s| s.2).collect();
    assert_eq!(statuses[0], StepStatus::Missed);
    assert!(
        statuses[1..].iter().all(|s| *s == StepStatus::Skipped),
        "{statuses:?}"
    );
    let lock = rig.lock();
    assert!(
        lock.steps[0].message.contains("could not start by"),
        "{}",
        lock.steps[0].message
    );
    assert!(lock.steps[0].started_at.is_none());
}

#[test]
fn a_step_after_the_window_closed_is_missed() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let window = "window: { start: 2026-12-01T04:00:00Z, end: 2026-12-01T04:01:00Z }\ngrace: 1h\n";
    let rig = Rig::new(steps, window, vec![web()], "2026-12-01T04:01:00Z");
    rig.run();
    assert_eq!(rig.statuses()[0].2, StepStatus::Missed);
    assert!(rig.hv.calls().is_empty());
}

#[test]
fn a_step_without_a_time_waits_for_the_window_to_open() {
    let steps = "  - vm: web\n    memory: 2GiB\n";
    let window = "window: { start: 2026-12-01T04:00:00Z, end: 2026-12-01T05:00:00Z }\n";
    let rig = Rig::new(steps, window, vec![web()], "2026-12-01T03:59:30Z");
    rig.run();
    let call = &rig.hv.successful_calls()[0];
    assert!(call.at.unwrap() >= t("2026-12-01T04:00:00Z"), "{call:?}");
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
}

#[test]
fn a_guest_that_ignores_shutdown_without_force_fails_the_step() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: shutoff
    shutdown: { mode: graceful, timeout: 10s, force_after_timeout: false }
  - at: 2026-12-01T04:05:00Z
    vm: web
    memory: 2GiB
";
    let rig = Rig::new(steps, "", vec![web().stubborn()], "2026-12-01T04:00:00Z");
    rig.run();
    assert_eq!(rig.ops(), ["shutdown"]);
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    assert!(lock.steps[0]
        .message
        .contains("did not shut down within 10s"));
    assert_eq!(lock.steps[1].status, StepStatus::Skipped);
    assert_eq!(rig.hv.state(A).power, PowerState::Running);
}

#[test]
fn a_ballooning_guest_is_not_reported_as_one_without_a_balloon_driver() {
    // The balloon takes the cut a second and a half after the call: the step waits for it.
    let steps = "  - vm: web\n    memory: 512MiB\n";
    let rig = Rig::new(
        steps,
        "",
        vec![web().slow_balloon(chrono::Duration::milliseconds(1500))],
        "2026-12-01T04:00:00Z",
    );
    rig.run();
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert!(
        !lock.steps[0].message.contains("balloon"),
        "{:?}",
        lock.steps[0]
    );
    let after = lock.steps[0].after.as_ref().unwrap();
    assert_eq!(after.live_memory_kib, Some(Kib::from_mib(512)));
}

#[test]
fn a_guest_without_a_balloon_driver_is_done_with_a_warning_after_a_bounded_wait() {
    // The balloon would take the cut after an hour: the step stops waiting once it stalls.
    let steps = "  - vm: web\n    memory: 512MiB\n";
    let rig = Rig::new(
        steps,
        "",
        vec![web().slow_balloon(chrono::Duration::hours(1))],
        "2026-12-01T04:00:00Z",
    );
    rig.run();
    let lock = rig.lock();
    let step = &lock.steps[0];
    assert_eq!(step.status, StepStatus::Done);
    assert!(
        step.message.contains("without a balloon driver"),
        "{step:?}"
    );
    let waited = step.finished_at.unwrap() - step.started_at.unwrap();
    assert!(
        waited <= chrono::Duration::seconds(3),
        "waited {waited} for a balloon that never moves"
    );
}

#[test]
fn force_mode_destroys_at_once() {
    let steps = "  - vm: web\n    power: shutoff\n    shutdown: { mode: force }\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.run();
    assert_eq!(rig.ops(), ["destroy"]);
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
}

#[test]
fn transient_failures_are_retried_with_backoff() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv.fail("set_memory", 1, 2, ErrorKind::Transient);
    rig.run();
    let calls: Vec<bool> = rig.hv.calls().iter().map(|c| c.ok).collect();
    assert_eq!(calls, [false, false, true]);
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(2048));
}

#[test]
fn transient_failures_give_up_after_the_retries() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv.fail("set_memory", 1, 100, ErrorKind::Transient);
    rig.run();
    assert_eq!(rig.hv.calls().len(), 4);
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    assert!(lock.steps[0].message.contains("retries exhausted"));
}

#[test]
fn a_lost_connection_is_reopened_and_the_call_retried() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    // The connection is dead: every call fails until it is reopened.
    rig.hv.fail("set_memory", 1, 1000, ErrorKind::Transient);
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    let reopened = std::sync::atomic::AtomicUsize::new(0);
    let hv = rig.hv.clone();
    let reconnect = |uri: &crate::uri::Uri| {
        assert_eq!(uri.expose(), URI);
        reopened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        hv.clear_faults();
        Ok(hv.clone() as Arc<dyn Hypervisor>)
    };
    let stop = AtomicBool::new(false);
    Executor {
        plan: &plan,
        connections: &rig.connections,
        clock: rig.clock.as_ref(),
        store: &store,
        settings: &rig.settings(),
        stop: &stop,
        on_outcome: &|_| {},
        reconnect: Some(&reconnect),
    }
    .run()
    .unwrap();
    assert_eq!(reopened.load(std::sync::atomic::Ordering::SeqCst), 1);
    let ok: Vec<bool> = rig.hv.calls().iter().map(|c| c.ok).collect();
    assert_eq!(ok, [false, true]);
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
}

#[test]
fn invalid_argument_fails_without_retry() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv
        .fail("set_memory", 1, 100, ErrorKind::InvalidArgument);
    rig.run();
    assert_eq!(rig.hv.calls().len(), 1);
    assert_eq!(rig.statuses()[0].2, StepStatus::Failed);
}

#[test]
fn operation_invalid_with_the_change_made_counts_as_done() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv
        .fail_after_effect("set_memory", 1, ErrorKind::OperationInvalid);
    rig.run();
    assert_eq!(rig.hv.calls().len(), 1);
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
}

#[test]
fn a_domain_that_vanished_fails_its_steps_only() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vms: [web, db]
    memory: 2GiB
  - at: 2026-12-01T04:05:00Z
    vms: [web, db]
    vcpus: 2
";
    let db = FakeDomain::new("db", B).running();
    let rig = Rig::new(steps, "", vec![web(), db], "2026-12-01T04:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    drop(store);
    rig.hv.remove(A);
    let report = rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(report.any_failed());
    let lock = rig.lock();
    let of = |uuid: &str| -> Vec<StepStatus> {
        lock.steps
            .iter()
            .filter(|r| r.uuid == uuid)
            .map(|r| r.status)
            .collect()
    };
    assert_eq!(of(A), [StepStatus::Failed, StepStatus::Failed]);
    assert_eq!(of(B), [StepStatus::Done, StepStatus::Done]);
    let gone = &lock
        .steps
        .iter()
        .find(|r| r.uuid == A && r.step == 2)
        .unwrap()
        .message;
    assert!(gone.contains("no longer exists"), "{gone}");
}

/// `web` fails at 04:00; `db` has a step at 04:30. Sleeping is held until `web`'s failure is
/// reported, so `db` cannot run first.
fn failure_policy_rig(policy: &str) -> (Rig, Report) {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    memory: 2GiB
  - at: 2026-12-01T04:30:00Z
    vm: web
    vcpus: 2
  - at: 2026-12-01T04:30:00Z
    vm: db
    vcpus: 2
";
    let db = FakeDomain::new("db", B).running();
    let extra = format!("defaults: {{ on_failure: {policy} }}\n");
    let rig = Rig::new(steps, &extra, vec![web(), db], "2026-12-01T04:00:00Z");
    rig.hv.fail("set_memory", 1, 1, ErrorKind::InvalidArgument);
    rig.clock.set_open(false);
    let clock = rig.clock.clone();
    let report = rig.run_with(&rig.settings(), &move |o: &Outcome| {
        if o.step == 1 {
            clock.set_open(true);
        }
    });
    (rig, report)
}

#[test]
fn skip_vm_skips_the_failed_domain_and_goes_on_with_others() {
    let (rig, report) = failure_policy_rig("skip-vm");
    assert!(report.any_failed());
    assert_eq!(
        rig.statuses(),
        [
            (1, "web".into(), StepStatus::Failed),
            (2, "web".into(), StepStatus::Skipped),
            (3, "db".into(), StepStatus::Done),
        ]
    );
}

#[test]
fn abort_cancels_every_remaining_step() {
    let (rig, _) = failure_policy_rig("abort");
    assert_eq!(
        rig.statuses(),
        [
            (1, "web".into(), StepStatus::Failed),
            (2, "web".into(), StepStatus::Skipped),
            (3, "db".into(), StepStatus::Cancelled),
        ]
    );
    assert!(rig.hv.successful_calls().is_empty());
}

#[test]
fn drift_from_the_reviewed_state_is_refused_and_named() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T03:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    drop(store);
    rig.hv.edit(A, |d| d.state.memory = Kib::from_mib(1536));
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.hv.calls().is_empty());
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    assert!(
        lock.steps[0]
            .message
            .contains("memory was 1GiB when planned, is 1536MiB now"),
        "{}",
        lock.steps[0].message
    );
}

#[test]
fn a_done_step_is_never_run_again() {
    let rig = Rig::new(CLASSIC, "", vec![web()], "2026-12-01T03:59:00Z");
    rig.run();
    let before = rig.hv.calls().len();
    // Undo by hand: a second apply must not redo done steps.
    rig.hv.edit(A, |d| d.state.memory = Kib::from_mib(1024));
    let report = rig.run();
    assert_eq!(rig.hv.calls().len(), before);
    assert!(report
        .outcomes
        .iter()
        .all(|o| o.earlier && o.status == StepStatus::Done));
}

#[test]
fn a_running_step_already_at_its_target_is_done_without_a_call() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:10Z");
    // A crashed run recorded `running` and had made the change.
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    store.reconcile(&plan).unwrap();
    let id = plan.steps[0].step_id.clone();
    store
        .update(&id, A, |r| {
            r.status = StepStatus::Running;
            r.started_at = Some(t("2026-12-01T04:00:00Z"));
        })
        .unwrap();
    rig.hv.edit(A, |d| d.state.memory = Kib::from_mib(2048));
    drop(store);
    // The saved plan still says 1GiB -> 2GiB.
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.hv.calls().is_empty(), "{:?}", rig.hv.calls());
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert_eq!(lock.steps[0].started_at, Some(t("2026-12-01T04:00:00Z")));
}

#[test]
fn a_running_step_not_at_target_is_reapplied_within_grace_only() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: shutoff
    memory: 2GiB
";
    for (now, expect) in [
        ("2026-12-01T04:01:00Z", StepStatus::Done),
        ("2026-12-01T04:06:00Z", StepStatus::Failed),
    ] {
        let rig = Rig::new(steps, "", vec![web()], now);
        let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
        let plan = {
            let clock_now = rig.clock.now();
            rig.clock.inner.set(t("2026-12-01T03:00:00Z"));
            let plan = rig.plan(&store);
            rig.clock.inner.set(clock_now);
            plan
        };
        store.reconcile(&plan).unwrap();
        store
            .update(&plan.steps[0].step_id, A, |r| {
                r.status = StepStatus::Running;
            })
            .unwrap();
        drop(store);
        // The interrupted run had powered the domain off but not resized it.
        rig.hv.edit(A, |d| {
            d.state.power = PowerState::Shutoff;
            d.state.live = None;
        });
        rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
        assert_eq!(
            rig.lock().steps[0].status,
            expect,
            "{now}: {}",
            rig.lock().steps[0].message
        );
        // Power-off was never repeated.
        let ops = rig.ops();
        assert!(
            !ops.contains(&"shutdown") && !ops.contains(&"destroy"),
            "{ops:?}"
        );
        if expect == StepStatus::Done {
            assert_eq!(ops, ["set_memory"]);
        } else {
            assert!(ops.is_empty());
        }
    }
}

#[test]
fn an_edited_done_step_is_refused() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.run();
    let edited = Rig::new(
        "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 3GiB\n",
        "",
        vec![web()],
        "2026-12-01T04:00:00Z",
    );
    std::fs::copy(&rig.lock_path, &edited.lock_path).unwrap();
    let store = LockStore::open(&edited.lock_path, &edited.file.sha256).unwrap();
    let plan = edited.plan(&store);
    drop(store);
    let err = edited
        .run_plan(&plan, &edited.settings(), &|_| {})
        .unwrap_err();
    assert!(
        matches!(err, LockError::DoneStepChanged { step: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("restore the step"), "{err}");
    assert!(edited.hv.calls().is_empty());
}

#[test]
fn an_edited_pending_step_is_accepted() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let later = "  - at: 2026-12-01T05:00:00Z\n    vm: web\n    vcpus: 2\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.run();
    let edited = Rig::new(
        &format!("{steps}{later}"),
        "",
        vec![web()],
        "2026-12-01T04:00:00Z",
    );
    std::fs::copy(&rig.lock_path, &edited.lock_path).unwrap();
    let report = edited.run();
    assert!(!report.any_failed(), "{report:#?}");
    assert_eq!(edited.ops(), ["set_vcpus"]);
    assert_eq!(edited.lock().plan_sha256, edited.file.sha256);
}

#[test]
fn a_recreated_domain_with_another_uuid_is_refused() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.run();
    let recreated = Rig::new(
        steps,
        "",
        vec![FakeDomain::new("web", B).running()],
        "2026-12-01T04:00:00Z",
    );
    std::fs::copy(&rig.lock_path, &recreated.lock_path).unwrap();
    let store = LockStore::open(&recreated.lock_path, &recreated.file.sha256).unwrap();
    let plan = recreated.plan(&store);
    drop(store);
    let err = recreated
        .run_plan(&plan, &recreated.settings(), &|_| {})
        .unwrap_err();
    assert!(matches!(err, LockError::UuidChanged { .. }), "{err}");
    assert!(recreated.hv.calls().is_empty());
}

#[test]
fn a_corrupt_lockfile_is_refused_before_anything_runs() {
    let steps = "  - vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    std::fs::write(&rig.lock_path, "this is = = not toml").unwrap();
    let err = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap_err();
    assert!(matches!(err, LockError::Corrupt { .. }));
    assert_eq!(
        std::fs::read_to_string(&rig.lock_path).unwrap(),
        "this is = = not toml"
    );
}

#[test]
fn a_stop_request_starts_nothing_new() {
    let rig = Rig::new(CLASSIC, "", vec![web()], "2026-12-01T03:59:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    let stop = AtomicBool::new(true);
    let report = Executor {
        plan: &plan,
        connections: &rig.connections,
        clock: rig.clock.as_ref(),
        store: &store,
        settings: &rig.settings(),
        stop: &stop,
        on_outcome: &|_| {},
        reconnect: None,
    }
    .run()
    .unwrap();
    assert!(report.interrupted);
    assert!(rig.hv.calls().is_empty());
    assert!(rig.statuses().iter().all(|s| s.2 == StepStatus::Cancelled));
    // Cancelled steps run on the next apply.
    drop(store);
    rig.run();
    assert!(rig.statuses().iter().all(|s| s.2 == StepStatus::Done));
}

#[test]
fn snapshots_are_idempotent_by_name() {
    let steps = "  - vm: web\n    snapshot: { name: before-resize }\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    drop(store);
    // Someone took it between plan and apply: not taken twice, and the step is done.
    rig.hv.edit(A, |d| d.snapshots.push("before-resize".into()));
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.hv.calls().is_empty());
    assert_eq!(rig.statuses()[0].2, StepStatus::Done);
}

/// State-machine property test: random plans on one domain, run through random sequences of
/// crashes (a panic at some libvirt call, before or after its change), restarts, clock jumps
/// and injected libvirt errors.
mod state_machine {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Once;

    use proptest::prelude::*;

    use super::*;
    use crate::hypervisor::fake::{Crash, SimulatedCrash};

    #[derive(Debug, Clone)]
    enum Attr {
        Off,
        On,
        Memory(u64),
        MaxMemory(u64),
        Vcpus(u32),
        Track(&'static str),
    }

    impl Attr {
        fn yaml(&self) -> String {
            match self {
                Self::Off => "power: shutoff\n    shutdown: { mode: graceful, timeout: 20s, force_after_timeout: true }".to_owned(),
                Self::On => "power: running".to_owned(),
                Self::Memory(mib) => format!("memory: {mib}MiB"),
                Self::MaxMemory(mib) => format!("max_memory: {mib}MiB"),
                Self::Vcpus(n) => format!("vcpus: {n}"),
                Self::Track(t) => format!("clock: {{ track: {t} }}"),
            }
        }
    }

    fn attr() -> impl Strategy<Value = Attr> {
        prop_oneof![
            Just(Attr::Off),
            Just(Attr::On),
            (1u64..=6).prop_map(|n| Attr::Memory(n * 512)),
            (4u64..=8).prop_map(|n| Attr::MaxMemory(n * 512)),
            (1u32..=4).prop_map(Attr::Vcpus),
            prop::sample::select(vec!["guest", "wall"]).prop_map(Attr::Track),
        ]
    }

    #[derive(Debug, Clone)]
    struct Fault {
        op: &'static str,
        from: usize,
        count: usize,
        kind: ErrorKind,
        after_effect: bool,
    }

    fn fault() -> impl Strategy<Value = Fault> {
        (
            prop::sample::select(vec![
                "shutdown",
                "destroy",
                "start",
                "set_memory",
                "set_max_memory",
                "set_vcpus",
                "define_xml",
            ]),
            1usize..3,
            1usize..5,
            prop::sample::select(vec![
                ErrorKind::Transient,
                ErrorKind::OperationInvalid,
                ErrorKind::InvalidArgument,
            ]),
            any::<bool>(),
        )
            .prop_map(|(op, from, count, kind, after_effect)| Fault {
                op,
                from,
                count,
                kind,
                after_effect,
            })
    }

    #[derive(Debug, Clone)]
    struct Scenario {
        steps: Vec<Attr>,
        running: bool,
        acpi: bool,
        faults: Vec<Fault>,
        /// Per run: the call that crashes it (relative to the run's first call).
        crashes: Vec<(usize, bool)>,
        /// (n-th sleep, seconds to jump).
        jumps: Vec<(usize, i64)>,
        /// Seconds before the first step at which apply starts (negative: late).
        lead: i64,
        /// The maintenance window closes this many seconds after the first step.
        window_end: Option<i64>,
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        (
            prop::collection::vec(attr(), 1..=4),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(fault(), 0..=2),
            prop::collection::vec((1usize..25, any::<bool>()), 0..=3),
            prop::collection::vec((1usize..40, -200i64..=400), 0..=2),
            -400i64..=30,
            prop::option::of(181i64..=600),
        )
            .prop_map(
                |(steps, running, acpi, faults, crashes, jumps, lead, window_end)| Scenario {
                    steps,
                    running,
                    acpi,
                    faults,
                    crashes,
                    jumps,
                    lead,
                    window_end,
                },
            )
    }

    /// Simulated crashes are expected panics: keep them out of the test output.
    fn quiet_simulated_crashes() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // A scope re-raises a thread's panic with this message; the thread's own panic
                // was shown already unless it was a simulated crash.
                let rethrown =
                    info.payload().downcast_ref::<&str>() == Some(&"a scoped thread panicked");
                if info.payload().downcast_ref::<SimulatedCrash>().is_none() && !rethrown {
                    default(info);
                }
            }));
        });
    }

    // One scenario read top to bottom: setup, runs with crashes, then every invariant.
    #[allow(clippy::too_many_lines)]
    fn check(s: &Scenario) -> Result<(), TestCaseError> {
        use std::fmt::Write as _;
        let base = t("2026-12-01T04:00:00Z");
        let mut steps = String::new();
        for (i, a) in s.steps.iter().enumerate() {
            let at = base + chrono::Duration::seconds(60 * i64::try_from(i).unwrap());
            let _ = writeln!(
                steps,
                "  - at: {}\n    vm: web\n    {}",
                at.to_rfc3339(),
                a.yaml()
            );
        }
        let mut dom = FakeDomain::new("web", A);
        if s.running {
            dom = dom.running();
        }
        dom.acpi = s.acpi;
        let start = base - chrono::Duration::seconds(s.lead);
        let window_end = s
            .window_end
            .map(|secs| base + chrono::Duration::seconds(secs));
        let extra = match window_end {
            Some(end) => format!(
                "grace: 5m\nwindow: {{ start: {}, end: {} }}\n",
                base.to_rfc3339(),
                end.to_rfc3339()
            ),
            None => "grace: 5m\n".to_owned(),
        };
        let rig = Rig::new(&steps, &extra, vec![dom], &start.to_rfc3339());

        // The plan as first reviewed; libvirt would refuse some random plans: nothing to test.
        let initial = {
            let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
            let Ok(plan) = planner::project(&PlanInput {
                file: &rig.file,
                connections: &rig.connections,
                connect_override: None,
                now: rig.clock.now(),
                progress: &store,
            }) else {
                REFUSED.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            };
            plan
        };
        let planned_actions: usize = initial.steps.iter().map(|st| st.actions.len()).sum();

        for f in &s.faults {
            if f.after_effect {
                rig.hv.fail_after_effect(f.op, f.from, f.kind);
            } else {
                rig.hv.fail(f.op, f.from, f.count, f.kind);
            }
        }
        let sleeps = Arc::new(AtomicUsize::new(0));
        let jumps = s.jumps.clone();
        let counter = sleeps.clone();
        *rig.clock.on_sleep.lock().unwrap() = Box::new(move |c: &FakeClock| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            for (at, secs) in &jumps {
                if *at == n {
                    c.advance(chrono::Duration::seconds(*secs));
                }
            }
        });

        let mut settings = rig.settings();
        settings.poll = Duration::from_secs(2);
        let runs = s
            .crashes
            .iter()
            .map(|c| Some(*c))
            .chain(std::iter::once(None));
        for crash in runs {
            let Ok(store) = LockStore::open(&rig.lock_path, &rig.file.sha256) else {
                return Err(TestCaseError::fail("the lockfile became unreadable"));
            };
            let plan = match planner::project(&PlanInput {
                file: &rig.file,
                connections: &rig.connections,
                connect_override: None,
                now: rig.clock.now(),
                progress: &store,
            }) {
                Ok(plan) => plan,
                Err(e) => return Err(TestCaseError::fail(format!("cannot plan the restart: {e}"))),
            };
            rig.hv
                .crash(crash.map(|(at, after_effect)| Crash { at, after_effect }));
            let stop = AtomicBool::new(false);
            let result = catch_unwind(AssertUnwindSafe(|| {
                Executor {
                    plan: &plan,
                    connections: &rig.connections,
                    clock: rig.clock.as_ref(),
                    store: &store,
                    settings: &settings,
                    stop: &stop,
                    on_outcome: &|_| {},
                    reconnect: None,
                }
                .run()
            }));
            rig.hv.crash(None);
            if let Ok(Err(e)) = result {
                return Err(TestCaseError::fail(format!("refused to resume: {e}")));
            }
            // Restarting takes a while.
            rig.clock.inner.advance(chrono::Duration::seconds(5));
        }

        let calls = rig.hv.calls();
        // libvirt never saw a configuration change it forbids (the fake enforces its rules).
        for c in &calls {
            let config_op = matches!(
                c.op,
                "set_memory" | "set_max_memory" | "set_vcpus" | "set_max_vcpus"
            );
            prop_assert!(c.ok || c.injected || !config_op, "forbidden call {c:?}");
        }
        // At most one effective change per planned action: nothing applied twice.
        let changes = calls.iter().filter(|c| c.changed).count();
        prop_assert!(
            changes <= planned_actions,
            "{changes} changes for {planned_actions} planned actions: {calls:#?}"
        );
        // No step started outside its time.
        let lock = rig.lock();
        for r in &lock.steps {
            prop_assert!(r.status != StepStatus::Running, "left running: {r:?}");
            if let (Some(at), Some(started)) = (r.at, r.started_at) {
                prop_assert!(started >= at, "early: {r:?}");
                prop_assert!(started <= at + chrono::Duration::minutes(5), "late: {r:?}");
                prop_assert!(
                    window_end.is_none_or(|end| started < end),
                    "after the window: {r:?}"
                );
            }
        }
        // When everything was done, the domain is where the reviewed plan said.
        if lock.steps.iter().all(|r| r.status == StepStatus::Done) {
            let last = &initial.steps[initial.steps.len() - 1].after;
            let now = rig.hv.state(A);
            prop_assert_eq!(now.power, last.power);
            prop_assert_eq!(now.memory, last.memory);
            prop_assert_eq!(now.max_memory, last.max_memory);
            prop_assert_eq!(now.vcpus, last.vcpus);
            if let Some(clock) = &last.clock {
                prop_assert_eq!(&now.clock.unwrap().rtc_track, &clock.rtc_track);
            }
        }
        Ok(())
    }

    /// Scenarios the planner refused (libvirt would refuse some random plans): nothing was
    /// tested for them, so the property below counts them.
    static REFUSED: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn crashes_restarts_clock_jumps_and_errors_never_apply_twice_or_out_of_time() {
        const CASES: u32 = 64;
        quiet_simulated_crashes();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: CASES,
            ..ProptestConfig::default()
        });
        if let Err(e) = runner.run(&scenario(), |s| check(&s)) {
            panic!("{e}");
        }
        // Not vacuous: most scenarios are planned and run, not refused before the executor.
        let refused = REFUSED.load(Ordering::SeqCst);
        assert!(
            refused * 2 < CASES as usize,
            "{refused} of {CASES} scenarios were refused by the planner: the property tested little"
        );
    }
}

/// `virtplan cancel` appends to the side file; this is what it writes.
fn cancel_record(rig: &Rig, step_id: &str, step: usize) -> crate::cancel::CancelRecord {
    crate::cancel::CancelRecord {
        step_id: step_id.to_owned(),
        step,
        by: "alice@admin1".to_owned(),
        at: rig.clock.now(),
    }
}

fn step_id(rig: &Rig, number: usize) -> String {
    rig.file.steps[number - 1].id()
}

#[test]
fn a_step_cancelled_while_the_executor_waits_is_never_started_and_stays_cancelled() {
    let rig = Rig::new(CLASSIC, "", vec![web().stubborn()], "2026-12-01T03:59:00Z");
    let log = crate::cancel::CancelLog::for_lockfile(&rig.lock_path);
    // The operator cancels step 2 (memory) at 04:02, while the executor sleeps towards it.
    let id = step_id(&rig, 2);
    let record = cancel_record(&rig, &id, 2);
    let cancelled = Arc::new(AtomicBool::new(false));
    {
        let (log, cancelled) = (log.clone(), cancelled.clone());
        *rig.clock.on_sleep.lock().unwrap() = Box::new(move |clock| {
            use std::sync::atomic::Ordering;
            if clock.now() >= t("2026-12-01T04:02:00Z") && !cancelled.swap(true, Ordering::SeqCst) {
                let mut r = record.clone();
                r.at = clock.now();
                log.append(&[r], || ()).unwrap();
            }
        });
    }
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    let statuses = rig.statuses();
    assert_eq!(statuses[1], (2, "web".to_owned(), StepStatus::Cancelled));
    assert!(statuses
        .iter()
        .enumerate()
        .all(|(i, s)| i == 1 || s.2 == StepStatus::Done));
    assert!(!rig.ops().contains(&"set_memory"), "{:?}", rig.ops());
    let message = &rig.lock().steps[1].message;
    assert!(
        message.starts_with("not run: cancelled by alice@admin1 at 2026-12-01 04:0"),
        "{message}"
    );
    // A later apply of the same plan does not run it either.
    rig.run();
    assert_eq!(rig.statuses()[1].2, StepStatus::Cancelled);
    assert!(!rig.ops().contains(&"set_memory"), "{:?}", rig.ops());
}

#[test]
fn a_cancel_recorded_before_apply_starts_skips_only_that_step() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vms: [web, db]
    memory: 2GiB
  - at: 2026-12-01T04:01:00Z
    vm: db
    vcpus: 2
";
    let db = FakeDomain::new("db", B).running();
    let rig = Rig::new(steps, "", vec![web(), db], "2026-12-01T03:59:00Z");
    let log = crate::cancel::CancelLog::for_lockfile(&rig.lock_path);
    log.append(&[cancel_record(&rig, &step_id(&rig, 1), 1)], || ())
        .unwrap();
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    let mut statuses = rig.statuses();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            (1, "db".to_owned(), StepStatus::Cancelled),
            (1, "web".to_owned(), StepStatus::Cancelled),
            (2, "db".to_owned(), StepStatus::Done),
        ]
    );
}

// ---- issue 11: reboot, check, always --------------------------------------------------------

/// Marks the plan's step `index` running on `uuid` as an interrupted run leaves it.
fn interrupted(rig: &Rig, index: usize, uuid: &str, reboot_from: Option<u32>) -> Plan {
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    store.reconcile(&plan).unwrap();
    store
        .update(&plan.steps[index].step_id, uuid, |r| {
            r.status = StepStatus::Running;
            r.started_at = Some(rig.clock.now());
            r.reboot_from = reboot_from;
        })
        .unwrap();
    plan
}

const REBOOT: &str = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: reboot
    shutdown: { mode: graceful, timeout: 30s, force_after_timeout: true }
";

#[test]
fn reboot_shuts_down_by_acpi_then_starts_and_records_the_new_domain_id() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:00:00Z");
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    assert_eq!(rig.ops(), ["shutdown", "start"]);
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert_eq!(lock.steps[0].reboot_from, Some(1));
    assert!(
        lock.steps[0]
            .message
            .contains("rebooted: domain id 1 → 101"),
        "{}",
        lock.steps[0].message
    );
    // Done is done: a second apply reboots nothing.
    rig.run();
    assert_eq!(rig.ops(), ["shutdown", "start"]);
}

#[test]
fn reboot_uses_the_guest_agent_when_the_domain_has_a_channel() {
    let rig = Rig::new(
        REBOOT,
        "",
        vec![web().stubborn().with_agent()],
        "2026-12-01T04:00:00Z",
    );
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    assert_eq!(rig.ops(), ["agent_shutdown", "start"]);
    assert!(rig.lock().steps[0]
        .message
        .contains("through the guest agent"));
}

#[test]
fn reboot_of_a_guest_ignoring_acpi_is_forced_after_the_timeout() {
    let rig = Rig::new(REBOOT, "", vec![web().stubborn()], "2026-12-01T04:00:00Z");
    rig.run();
    assert_eq!(rig.ops(), ["shutdown", "destroy", "start"]);
    assert_eq!(rig.lock().steps[0].status, StepStatus::Done);
}

#[test]
fn resumed_reboot_found_shut_off_is_started_not_shut_down_again() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:00:05Z");
    let plan = interrupted(&rig, 0, A, Some(1));
    rig.hv.edit(A, |d| {
        d.state.power = PowerState::Shutoff;
        d.state.live = None;
        d.run_id = None;
    });
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert_eq!(rig.ops(), ["start"]);
    assert_eq!(rig.lock().steps[0].status, StepStatus::Done);
}

#[test]
fn resumed_reboot_found_running_under_a_new_id_is_done_without_a_call() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:00:05Z");
    let plan = interrupted(&rig, 0, A, Some(1));
    rig.hv.edit(A, |d| d.run_id = Some(7));
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.ops().is_empty(), "{:?}", rig.ops());
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Done);
    assert!(
        lock.steps[0].message.contains("not rebooted again"),
        "{}",
        lock.steps[0].message
    );
}

#[test]
fn resumed_reboot_found_running_under_the_same_id_reboots_once() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:00:05Z");
    let plan = interrupted(&rig, 0, A, Some(1));
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert_eq!(rig.ops(), ["shutdown", "start"]);
    assert_eq!(rig.lock().steps[0].status, StepStatus::Done);
}

#[test]
fn resumed_reboot_that_never_happened_is_not_started_after_its_grace() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:20:00Z");
    let plan = interrupted(&rig, 0, A, Some(1));
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.ops().is_empty());
    assert_eq!(rig.lock().steps[0].status, StepStatus::Failed);
}

#[test]
fn resumed_reboot_found_shut_off_after_its_grace_is_still_finished() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T04:20:00Z");
    let plan = interrupted(&rig, 0, A, Some(1));
    rig.hv.edit(A, |d| {
        d.state.power = PowerState::Shutoff;
        d.state.live = None;
        d.run_id = None;
    });
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert_eq!(
        rig.ops(),
        ["start"],
        "the window must not end with the domain off"
    );
    assert_eq!(rig.lock().steps[0].status, StepStatus::Done);
}

#[test]
fn check_state_and_agent_pass_and_each_attempt_is_in_the_message() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: running
    check: { state: running, guest_agent: true, timeout: 1m, interval: 5s }
";
    let rig = Rig::new(
        steps,
        "",
        vec![FakeDomain::new("web", A).with_agent()],
        "2026-12-01T04:00:00Z",
    );
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    let message = &rig.lock().steps[0].message;
    assert!(message.contains("check passed on attempt 1"), "{message}");
}

#[test]
fn check_command_gets_the_documented_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let steps = format!(
        "  - at: 2026-12-01T04:00:00Z
    vm: web
    autostart: true
    check: {{ command: 'echo \"$VIRTPLAN_VM $VIRTPLAN_UUID $VIRTPLAN_CONNECTION $VIRTPLAN_STEP\" > {}; echo \"$VIRTPLAN_PLAN\" >> {}', timeout: 1m, interval: 5s }}
",
        out.display(),
        out.display()
    );
    let rig = Rig::new(&steps, "", vec![web()], "2026-12-01T04:00:00Z");
    let report = rig.run();
    assert!(!report.any_failed(), "{report:#?}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        format!("web {A} {URI} 1\n{}\n", rig.file.path.display())
    );
}

#[test]
fn failing_check_fails_the_step_after_its_timeout_listing_attempts() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    autostart: true
    check: { command: 'echo unhealthy >&2; exit 3', timeout: 30s, interval: 10s }
  - at: 2026-12-01T04:02:00Z
    vm: web
    memory: 2GiB
";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    let report = rig.run();
    assert!(report.any_failed());
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    let message = &lock.steps[0].message;
    assert!(
        message.contains("check timed out after 4 attempts"),
        "{message}"
    );
    assert!(
        message.contains("#1 +0s: command exited 3: unhealthy"),
        "{message}"
    );
    assert!(message.contains("#4 +30s"), "{message}");
    assert_eq!(lock.steps[1].status, StepStatus::Skipped);
    // The change itself was made: the check only gates "done".
    assert!(rig.hv.state(A).autostart);
}

const RESIZE: &str = "  - at: 2026-12-01T04:00:00Z
    vm: web
    power: shutoff
    shutdown: { mode: force }
  - at: 2026-12-01T04:01:00Z
    vm: web
    memory: 2GiB
  - at: 2026-12-01T04:05:00Z
    vm: web
    power: running
    always: true
";

#[test]
fn always_power_on_runs_after_a_failed_step_and_the_domain_ends_running() {
    let rig = Rig::new(RESIZE, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv
        .fail("set_memory", 1, 10, ErrorKind::OperationInvalid);
    let report = rig.run();
    let statuses: Vec<StepStatus> = rig.lock().steps.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Done, StepStatus::Failed, StepStatus::Done],
        "{report:#?}"
    );
    assert_eq!(rig.hv.state(A).power, PowerState::Running);
    assert!(rig.lock().steps[2].message.contains("always"));
}

#[test]
fn always_step_runs_after_an_abort_of_another_domain_but_ordinary_steps_do_not() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: other
    memory: 2GiB
  - at: 2026-12-01T04:05:00Z
    vm: web
    autostart: true
  - at: 2026-12-01T04:06:00Z
    vm: web
    title: restored
    always: true
";
    let rig = Rig::new(
        steps,
        "defaults: { on_failure: abort }\n",
        vec![web(), FakeDomain::new("other", B)],
        "2026-12-01T04:00:00Z",
    );
    rig.hv
        .fail("set_memory", 1, 10, ErrorKind::OperationInvalid);
    // Sleeping is held until the failure is reported, so `web` cannot run first.
    rig.clock.set_open(false);
    let clock = rig.clock.clone();
    rig.run_with(&rig.settings(), &move |o: &Outcome| {
        if o.step == 1 {
            clock.set_open(true);
        }
    });
    let statuses: Vec<(usize, StepStatus)> = rig
        .lock()
        .steps
        .iter()
        .map(|r| (r.step, r.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (1, StepStatus::Failed),
            (2, StepStatus::Cancelled),
            (3, StepStatus::Done)
        ]
    );
    assert_eq!(rig.hv.state(A).title, "restored");
}

#[test]
fn shutoff_takes_the_agent_rung_of_the_ladder_too() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    power: shutoff\n";
    let rig = Rig::new(
        steps,
        "",
        vec![web().stubborn().with_agent()],
        "2026-12-01T04:00:00Z",
    );
    rig.run();
    assert_eq!(rig.ops(), ["agent_shutdown"]);
    assert_eq!(rig.lock().steps[0].status, StepStatus::Done);
}

#[test]
fn always_step_after_a_failure_calls_nothing_already_satisfied() {
    // The shutdown fails, so the domain still runs when the always power-on comes.
    let rig = Rig::new(RESIZE, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv.fail("destroy", 1, 10, ErrorKind::InvalidArgument);
    rig.run();
    let statuses: Vec<StepStatus> = rig.lock().steps.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Failed, StepStatus::Skipped, StepStatus::Done]
    );
    assert!(rig.ops().is_empty(), "{:?}", rig.ops());
    assert_eq!(rig.hv.state(A).power, PowerState::Running);
}

#[test]
fn always_steps_do_not_run_after_a_signal() {
    let rig = Rig::new(RESIZE, "", vec![web()], "2026-12-01T04:00:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    let stop = AtomicBool::new(true);
    Executor {
        plan: &plan,
        connections: &rig.connections,
        clock: rig.clock.as_ref(),
        store: &store,
        settings: &rig.settings(),
        stop: &stop,
        on_outcome: &|_| {},
        reconnect: None,
    }
    .run()
    .unwrap();
    drop(store);
    assert!(rig.ops().is_empty());
    assert!(rig
        .lock()
        .steps
        .iter()
        .all(|r| r.status == StepStatus::Cancelled));
}

#[test]
fn check_command_still_running_at_the_deadline_is_killed_with_its_children() {
    let steps = "  - at: 2026-12-01T04:00:00Z
    vm: web
    autostart: true
    check: { command: 'sleep 30', timeout: 1s, interval: 1s }
";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:00Z");
    rig.run();
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed);
    assert!(
        lock.steps[0]
            .message
            .contains("command still running at the check's deadline, killed"),
        "{}",
        lock.steps[0].message
    );
}

#[test]
fn reboot_of_a_paused_domain_is_refused_at_plan_time() {
    let rig = Rig::new(REBOOT, "", vec![web()], "2026-12-01T03:00:00Z");
    rig.hv.edit(A, |d| d.state.power = PowerState::Paused);
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let err = planner::project(&PlanInput {
        file: &rig.file,
        connections: &rig.connections,
        connect_override: None,
        now: rig.clock.now(),
        progress: &store,
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("web is paused at this step"), "{text}");
}

#[test]
fn regression_hung_libvirtd_lands_changes_late() {
    // The reads before the change stall (each wait of the retry stretched to three minutes by
    // a hung daemon): the step's deadline passes before anything is sent.
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "grace: 1m\n", vec![web()], "2026-12-01T04:00:00Z");
    // Call 1 is the planner's read; the executor's reads 2 and 3 fail like a lost connection.
    rig.hv.fail("observe", 2, 2, ErrorKind::Transient);
    *rig.clock.on_sleep.lock().unwrap() =
        Box::new(|c: &FakeClock| c.advance(chrono::Duration::minutes(3)));
    let report = rig.run();
    assert!(report.any_failed());
    assert!(
        rig.hv.successful_calls().is_empty(),
        "{:?}",
        rig.hv.successful_calls()
    );
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Missed, "{lock:?}");
    assert!(
        lock.steps[0].message.contains("libvirt answered too late"),
        "{}",
        lock.steps[0].message
    );
}

#[test]
fn regression_a_change_is_retried_past_its_deadline() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    memory: 2GiB\n";
    let rig = Rig::new(steps, "grace: 1m\n", vec![web()], "2026-12-01T04:00:00Z");
    rig.hv.fail("set_memory", 1, 1, ErrorKind::Transient);
    *rig.clock.on_sleep.lock().unwrap() =
        Box::new(|c: &FakeClock| c.advance(chrono::Duration::minutes(3)));
    rig.run();
    assert!(
        rig.hv.successful_calls().is_empty(),
        "{:?}",
        rig.hv.successful_calls()
    );
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed, "{lock:?}");
    assert!(
        lock.steps[0].message.contains("not retried"),
        "{}",
        lock.steps[0].message
    );
}

/// Regression (issue 10): a step with nothing to change read its domain twice, before and
/// after; the read before it is its result.
#[test]
fn a_step_with_nothing_to_change_reads_its_domain_once() {
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    autostart: false\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T03:59:00Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    drop(store);
    assert!(
        plan.steps[0].actions.is_empty(),
        "{:?}",
        plan.steps[0].actions
    );
    let reads = rig.hv.count("observe");
    let report = rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert_eq!(report.outcomes[0].status, StepStatus::Done);
    assert_eq!(rig.hv.count("observe") - reads, 1);
}

/// Regression (issue 10): one OS thread per domain, each waking every second; domains now
/// run on a pool of `parallelism` workers, and every step still runs at its time.
#[test]
fn many_domains_run_on_a_pool_of_parallelism_workers() {
    let names: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
    let domains = names
        .iter()
        .enumerate()
        .map(|(i, n)| FakeDomain::new(n, &format!("00000000-0000-4000-8000-{i:012}")).running())
        .collect();
    let steps = format!(
        "  - at: 2026-12-01T04:00:00Z\n    vms: [{}]\n    autostart: true\n  - at: 2026-12-01T04:01:00Z\n    vms: [{}]\n    autostart: false\n",
        names.join(", "),
        names.join(", ")
    );
    let rig = Rig::new(&steps, "", domains, "2026-12-01T03:59:00Z");
    let threads = Mutex::new(std::collections::HashSet::new());
    let report = rig.run_with(&rig.settings(), &|o| {
        threads.lock().unwrap().insert(std::thread::current().id());
        assert!(
            o.at.is_some_and(|at| rig.clock.now() >= at),
            "{o:?} ran early"
        );
    });
    assert_eq!(report.outcomes.len(), 80);
    assert_all_done(&report);
    let used = threads.lock().unwrap().len();
    assert!(used <= 4, "{used} threads ran steps with parallelism 4");
}

#[test]
fn regression_false_done_after_kill_during_paused_step_from_shutoff_fake() {
    use crate::hypervisor::fake::Settling;
    use crate::state::LiveFigures;
    // `power: paused` from shut-off is start, then suspend. The run that started QEMU died;
    // the resumed run finds the domain "paused" only because QEMU holds its CPUs until its
    // start-up completes, five seconds later, after which it runs.
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    power: paused\n";
    let rig = Rig::new(
        steps,
        "",
        vec![FakeDomain::new("web", A)],
        "2026-12-01T04:00:01Z",
    );
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    store.reconcile(&plan).unwrap();
    store
        .update(&plan.steps[0].step_id, A, |r| {
            r.status = StepStatus::Running;
        })
        .unwrap();
    drop(store);
    rig.hv.edit(A, |d| {
        d.state.power = PowerState::Paused;
        d.state.live = Some(LiveFigures {
            memory: d.state.memory,
            vcpus: d.state.vcpus,
        });
        d.run_id = Some(7);
        d.settling = Some(Settling {
            reason: "starting".to_owned(),
            until: t("2026-12-01T04:00:06Z"),
            then: PowerState::Running,
        });
    });
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    // Whatever libvirt was doing has finished by the time anyone looks.
    rig.hv.settle_now(A);
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Done, "{lock:?}");
    assert_eq!(
        rig.hv.state(A).power,
        PowerState::Paused,
        "recorded done, but the domain ended {}",
        rig.hv.state(A).power
    );
}

#[test]
fn a_domain_that_never_settles_fails_its_resumed_step_without_a_call() {
    use crate::hypervisor::fake::Settling;
    let steps = "  - at: 2026-12-01T04:00:00Z\n    vm: web\n    power: shutoff\n";
    let rig = Rig::new(steps, "", vec![web()], "2026-12-01T04:00:01Z");
    let store = LockStore::open(&rig.lock_path, &rig.file.sha256).unwrap();
    let plan = rig.plan(&store);
    store.reconcile(&plan).unwrap();
    store
        .update(&plan.steps[0].step_id, A, |r| {
            r.status = StepStatus::Running;
        })
        .unwrap();
    drop(store);
    rig.hv.edit(A, |d| {
        d.state.power = PowerState::ShuttingDown;
        d.settling = Some(Settling {
            reason: "shutting down".to_owned(),
            until: t("2026-12-01T05:00:00Z"),
            then: PowerState::Shutoff,
        });
    });
    rig.run_plan(&plan, &rig.settings(), &|_| {}).unwrap();
    assert!(rig.hv.calls().is_empty(), "{:?}", rig.hv.calls());
    let lock = rig.lock();
    assert_eq!(lock.steps[0].status, StepStatus::Failed, "{lock:?}");
    assert!(
        lock.steps[0]
            .message
            .contains("still shutting down after 1m"),
        "{}",
        lock.steps[0].message
    );
}

/// Rollouts and per-host caps on the fake clock.
mod rollout;

/// Domain leases on the fake clock.
mod leases;
