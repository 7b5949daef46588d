//! The reconciler's slot state machine on the fake hypervisor and a fake clock: a plan file
//! appears, is edited, is removed, is locked by another executor, or resumes over a domain
//! still moving between two states. The tests drive [`Reconciler::rescan`] and
//! [`Reconciler::poll`] themselves (no file watcher), and fake time moves only when a test
//! says so (or, in `auto` mode, when someone sleeps on it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Env, Next, Pool, Reconciler, Target};
use crate::clock::{Clock, FakeClock, SystemClock};
use crate::hypervisor::fake::{FakeDomain, FakeHypervisor, Settling};
use crate::hypervisor::Hypervisor;
use crate::lockfile::{ExecutorLock, LockStore, StepStatus};
use crate::planner::Connections;
use crate::printer::Printer;
use crate::state::{Kib, PowerState};

use super::log::{Log, LogFormat, Stream};

const URI: &str = "test:///fake";
const A: &str = "00000000-0000-0000-0000-00000000000a";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Fake time that stands still while the executor waits (its sleeps yield a moment of real
/// time instead), so a test can edit a plan while a step is still ahead; in `auto` mode a
/// sleep moves it, as [`FakeClock`] does.
struct TestClock {
    inner: FakeClock,
    auto: AtomicBool,
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) {
        if self.auto.load(Ordering::SeqCst) {
            self.inner.sleep(duration);
        } else {
            SystemClock.sleep(duration.min(Duration::from_millis(2)));
        }
    }
}

struct Rig {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    hv: Arc<FakeHypervisor>,
}

impl Rig {
    fn new(domain: FakeDomain) -> Self {
        let clock = Arc::new(TestClock {
            inner: FakeClock::new(t("2026-12-01T04:00:00Z")),
            auto: AtomicBool::new(false),
        });
        let hv = Arc::new(FakeHypervisor::new(URI, vec![domain]).with_clock(clock.clone()));
        Self {
            dir: tempfile::tempdir().unwrap(),
            clock,
            hv,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a plan of `steps` (YAML list items) as `name`.
    fn write(&self, name: &str, steps: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(
            &path,
            format!("version: 1\nconnection: {URI}\ntimezone: UTC\nsteps:\n{steps}"),
        )
        .unwrap();
        path
    }

    /// Runs `test` with a reconciler of the rig's folder.
    fn with(&self, test: impl for<'s, 'e> FnOnce(&mut Reconciler<'s, 'e>)) {
        let log = Log {
            format: LogFormat::Human,
            stream: Stream::Stdout,
            printer: Printer::plain(),
            clock: self.clock.as_ref(),
        };
        let mut connections = Connections::new();
        connections.insert(
            crate::uri::Uri::new(URI),
            Arc::clone(&self.hv) as Arc<dyn Hypervisor>,
        );
        let env = Env {
            clock: self.clock.as_ref(),
            log: &log,
            config: None,
            connect: None,
            failpoint: None,
            pool: Pool::with(connections),
        };
        std::thread::scope(|scope| {
            let mut r = Reconciler::new(scope, &env, Target::Dir(self.dir.path().to_path_buf()));
            test(&mut r);
            // Whatever the test left running stops before the scope ends.
            r.shut_down();
            settle(&mut r, |r| r.slots.values().all(|s| s.run.is_none()));
        });
    }
}

/// What the plan's lockfile records.
fn recorded(plan: &Path) -> crate::lockfile::Lockfile {
    LockStore::read(&crate::lockfile::lock_path(plan)).unwrap()
}

/// Polls the reconciler until `done` holds (half a minute of real time at most: a loaded CI
/// machine may be slow to schedule the executor's thread).
fn settle(r: &mut Reconciler<'_, '_>, done: impl Fn(&Reconciler<'_, '_>) -> bool) {
    for _ in 0..15_000 {
        r.poll();
        if done(r) {
            return;
        }
        SystemClock.sleep(Duration::from_millis(2));
    }
    panic!("the reconciler did not get there in time");
}

fn running(r: &Reconciler<'_, '_>, path: &Path) -> bool {
    r.slots.get(path).is_some_and(|s| s.run.is_some())
}

fn sha_in_force(r: &Reconciler<'_, '_>, path: &Path) -> Option<String> {
    r.slots
        .get(path)
        .and_then(|s| s.accepted.as_ref())
        .map(|a| a.loaded.file.sha256.clone())
}

fn memory_step(mib: u64) -> String {
    format!("  - at: 2026-12-01 04:10\n    vm: a\n    memory: {mib}MiB\n")
}

#[test]
fn a_new_plan_file_takes_its_lock_and_runs_to_the_end() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let plan = rig.write("web.yaml", &memory_step(2048));
    rig.with(|r| {
        r.rescan();
        let slot = &r.slots[&plan];
        assert!(slot.store.is_some() && slot.held.is_some(), "no lock taken");
        assert!(running(r, &plan), "no executor started");
        // Nothing happens before the step's time.
        settle(r, |_| true);
        assert_eq!(rig.hv.state(A).memory, Kib::from_mib(1024));
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        settle(r, |r| !running(r, &plan));
        assert!(matches!(r.slots[&plan].next, Next::Nothing));
    });
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(2048));
    let lock = recorded(&plan);
    assert_eq!(lock.steps.len(), 1);
    assert_eq!(lock.steps[0].status, StepStatus::Done);
}

#[test]
fn an_edit_before_the_step_replans_and_only_the_new_version_runs() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let plan = rig.write("web.yaml", &memory_step(2048));
    rig.with(|r| {
        r.rescan();
        let first = sha_in_force(r, &plan).unwrap();
        rig.write("web.yaml", &memory_step(3072));
        r.rescan();
        assert!(
            matches!(r.slots[&plan].next, Next::Replan(_)),
            "the running executor is not being replaced"
        );
        // The old executor stops; the new version starts on the same lock.
        settle(r, |r| {
            running(r, &plan) && sha_in_force(r, &plan).is_some_and(|s| s != first)
        });
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        settle(r, |r| !running(r, &plan));
    });
    let set: Vec<String> = rig
        .hv
        .successful_calls()
        .into_iter()
        .filter(|c| c.op == "set_memory")
        .map(|c| c.arg)
        .collect();
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(
        set[0].starts_with("3GiB") || set[0].starts_with("3072"),
        "{set:?}"
    );
    let lock = recorded(&plan);
    let done: Vec<_> = lock
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Done)
        .collect();
    assert_eq!(done.len(), 1, "{:?}", lock.steps);
}

#[test]
fn an_invalid_edit_leaves_the_version_in_force_running() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let plan = rig.write("web.yaml", &memory_step(2048));
    rig.with(|r| {
        r.rescan();
        let first = sha_in_force(r, &plan).unwrap();
        rig.write(
            "web.yaml",
            "  - at: 2026-12-01 04:10\n    vm: a\n    memory: 3GB\n",
        );
        r.rescan();
        settle(r, |_| true);
        assert!(running(r, &plan), "the version in force stopped");
        assert!(matches!(r.slots[&plan].next, Next::Nothing));
        assert_eq!(sha_in_force(r, &plan), Some(first));
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        settle(r, |r| !running(r, &plan));
    });
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(2048));
}

#[test]
fn a_removed_plan_stops_and_records_its_steps_cancelled() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let plan = rig.write("web.yaml", &memory_step(2048));
    rig.with(|r| {
        r.rescan();
        assert!(running(r, &plan));
        std::fs::remove_file(&plan).unwrap();
        r.rescan();
        assert!(matches!(r.slots[&plan].next, Next::Remove));
        settle(r, |r| !r.slots.contains_key(&plan));
        // Time passing changes nothing: the plan is gone.
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        r.rescan();
        assert!(r.slots.is_empty());
    });
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(1024));
    assert_eq!(rig.hv.count("set_memory"), 0);
    let lock = recorded(&plan);
    assert_eq!(lock.steps.len(), 1);
    assert_eq!(lock.steps[0].status, StepStatus::Cancelled);
    assert_eq!(lock.steps[0].message, "not run: the plan file was removed");
}

#[test]
fn a_plan_locked_by_another_executor_waits_and_runs_once_it_is_free() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let plan = rig.write("web.yaml", &memory_step(2048));
    let other = ExecutorLock::acquire(&crate::lockfile::pid_path(&plan), rig.clock.now()).unwrap();
    rig.with(|r| {
        r.rescan();
        let slot = &r.slots[&plan];
        assert!(slot.store.is_none() && slot.held.is_none() && slot.run.is_none());
        // Not marked seen, so the next rescan tries again even though the file is unchanged.
        assert!(slot.seen.is_none());
        r.rescan();
        assert!(
            !running(r, &plan),
            "ran while another executor held the plan"
        );
        drop(other);
        r.rescan();
        assert!(running(r, &plan), "did not start once the lock was free");
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        settle(r, |r| !running(r, &plan));
    });
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(2048));
}

#[test]
fn a_resumed_plan_waits_for_a_transitional_domain_to_settle_before_planning() {
    let rig = Rig::new(FakeDomain::new("a", A).running());
    let plan = rig.write(
        "web.yaml",
        "  - at: 2026-12-01 04:10\n    vm: a\n    power: shutoff\n",
    );
    // A first run records the step; then it is left `running`, as a kill during the
    // power-off leaves it, with the domain still shutting down.
    rig.with(|r| {
        r.rescan();
        assert!(running(r, &plan));
    });
    {
        let store = LockStore::open(&crate::lockfile::lock_path(&plan), "x").unwrap();
        let record = store.snapshot().steps[0].clone();
        store
            .update(&record.step_id, &record.uuid, |r| {
                r.status = StepStatus::Running;
            })
            .unwrap();
    }
    rig.hv.edit(A, |d| {
        d.settling = Some(Settling {
            reason: "shutting down".into(),
            until: t("2026-12-01T04:00:30Z"),
            then: PowerState::Shutoff,
        });
    });
    rig.with(|r| {
        rig.clock.auto.store(true, Ordering::SeqCst);
        r.rescan();
        rig.clock.auto.store(false, Ordering::SeqCst);
        // It waited (on the fake clock) for the shutdown to finish, then planned from shutoff:
        // the step is already satisfied, so nothing is powered off again.
        assert!(rig.clock.now() >= t("2026-12-01T04:00:30Z"));
        let accepted = r.slots[&plan].accepted.as_ref().expect("not planned");
        assert_eq!(accepted.plan.steps[0].before.power, PowerState::Shutoff);
        assert!(accepted.plan.steps[0].actions.is_empty());
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        settle(r, |r| !running(r, &plan));
    });
    assert_eq!(rig.hv.count("shutdown") + rig.hv.count("destroy"), 0);
    assert_eq!(recorded(&plan).steps[0].status, StepStatus::Done);
}

#[test]
fn an_edit_of_a_done_step_is_refused_and_the_version_in_force_runs_on() {
    let rig = Rig::new(FakeDomain::new("a", A));
    let two = |first_mib: u64| {
        format!(
            "{}  - at: 2026-12-01 04:20\n    vm: a\n    vcpus: 2\n",
            memory_step(first_mib)
        )
    };
    let plan = rig.write("web.yaml", &two(2048));
    rig.with(|r| {
        r.rescan();
        let first = sha_in_force(r, &plan).unwrap();
        rig.clock.inner.set(t("2026-12-01T04:10:00Z"));
        let done = |r: &Reconciler<'_, '_>| {
            r.slots[&plan].store.as_ref().is_some_and(|s| {
                s.snapshot()
                    .steps
                    .iter()
                    .any(|x| x.status == StepStatus::Done)
            })
        };
        settle(r, done);
        // Step 1 ran: changing it now is refused, and step 2 still runs as reviewed.
        rig.write("web.yaml", &two(3072));
        r.rescan();
        assert!(matches!(r.slots[&plan].next, Next::Nothing), "replanned");
        assert!(running(r, &plan), "the version in force stopped");
        assert_eq!(sha_in_force(r, &plan), Some(first));
        rig.clock.inner.set(t("2026-12-01T04:20:00Z"));
        settle(r, |r| !running(r, &plan));
    });
    assert_eq!(rig.hv.state(A).memory, Kib::from_mib(2048));
    assert_eq!(rig.hv.state(A).vcpus, 2);
    let lock = recorded(&plan);
    assert!(
        lock.steps.iter().all(|s| s.status == StepStatus::Done),
        "{:?}",
        lock.steps
    );
}
