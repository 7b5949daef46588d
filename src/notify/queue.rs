//! The notifier: turns step changes into events recorded in the lockfile (the outbox), and
//! delivers them off the executor's path, one bounded queue and one thread per target, with
//! retries and backoff, flushed with a deadline at exit.
//!
//! Delivery is at least once: an event is recorded pending in the same lockfile write as the
//! step change it announces, and marked sent only after its target took it; a run that
//! crashed in between re-sends it (same id) when `apply` runs again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::deliver::deliver;
use super::event::{event_id, Event, EventKind, EventSummary, PlanRef, EVENT_FORMAT_VERSION};
use super::target::Target;
use crate::lockfile::{Delivery, EventRecord, LockError, LockStore, Observer, StepRecord};
use crate::uri::Uri;

/// How often and how patiently a delivery is retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (the first included).
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time.
    pub backoff: Duration,
    /// Events one target's queue holds; beyond that an event stays pending in the lockfile
    /// for the next run, and the executor is never held up.
    pub queue: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 4,
            backoff: Duration::from_secs(1),
            queue: 1024,
        }
    }
}

/// Where the notifier reports delivery failures (never a secret: targets print redacted).
pub type Log = dyn Fn(&str) + Send + Sync;

/// The notifier of one plan run.
pub struct Notifier {
    inner: Arc<Inner>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

struct Inner {
    plan: PlanRef,
    /// libvirt URI of each (step id, domain UUID), printed redacted; replaced when a watched
    /// plan is re-planned.
    connections: Mutex<BTreeMap<(String, String), Uri>>,
    /// A stop for a re-plan is under way: the steps it leaves unstarted run under the new
    /// version, so their `cancelled` is no news.
    quiet_cancellations: std::sync::atomic::AtomicBool,
    targets: Vec<Target>,
    keys: Vec<String>,
    queues: Vec<Queue>,
    store: Weak<LockStore>,
    log: Box<Log>,
    retry: Retry,
    /// The order events were recorded in, so every target gets them in that order.
    order: Mutex<Order>,
}

/// Sequence numbers in recording order. An event is numbered while the lockfile write that
/// carries it is prepared (under the store's lock), and queued once that write is durable;
/// a target starts on an event only when no earlier-numbered one is still on its way, so two
/// threads finishing their writes in the other order cannot swap their events.
#[derive(Default)]
struct Order {
    next: u64,
    /// Number of each event not queued yet, by id.
    numbers: HashMap<String, u64>,
    /// Numbers handed out whose events are not queued (or abandoned) yet.
    outstanding: BTreeSet<u64>,
}

struct Queue {
    state: Mutex<QueueState>,
    cond: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Sorted by recording order.
    jobs: VecDeque<(u64, Arc<Event>)>,
    busy: bool,
    /// Set by [`Notifier::flush`]: give up what is left at this instant.
    deadline: Option<Instant>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a run's events say about the plan and its steps.
pub struct RunInfo {
    pub plan: PlanRef,
    /// libvirt URI of each (step id, domain UUID); events carry it redacted.
    pub connections: BTreeMap<(String, String), Uri>,
}

impl RunInfo {
    /// The plan's identity and each step's connection, from a projected plan.
    #[must_use]
    pub fn of(plan: &crate::planner::Plan) -> Self {
        Self {
            plan: PlanRef {
                name: plan.meta.name.clone(),
                file: plan.meta.file.clone(),
                sha256: plan.meta.sha256.clone(),
            },
            connections: step_connections(plan),
        }
    }
}

/// The libvirt URI of each (step id, domain UUID) of `plan`.
#[must_use]
pub fn step_connections(plan: &crate::planner::Plan) -> BTreeMap<(String, String), Uri> {
    plan.steps
        .iter()
        .map(|s| {
            (
                (s.step_id.clone(), s.domain.uuid.clone()),
                s.connection.clone(),
            )
        })
        .collect()
}

impl Notifier {
    /// Starts one delivery thread per target and makes `store` record events for step changes.
    /// Events a previous run left undelivered are queued first.
    pub fn start(
        targets: Vec<Target>,
        info: RunInfo,
        store: &Arc<LockStore>,
        log: Box<Log>,
        retry: Retry,
    ) -> Arc<Self> {
        let keys = targets.iter().map(Target::key).collect();
        let queues = targets
            .iter()
            .map(|_| Queue {
                state: Mutex::new(QueueState::default()),
                cond: Condvar::new(),
            })
            .collect();
        let inner = Arc::new(Inner {
            plan: info.plan,
            connections: Mutex::new(info.connections),
            quiet_cancellations: std::sync::atomic::AtomicBool::new(false),
            targets,
            keys,
            queues,
            store: Arc::downgrade(store),
            log,
            retry,
            order: Mutex::new(Order::default()),
        });
        let workers = (0..inner.targets.len())
            .map(|i| {
                let inner = Arc::clone(&inner);
                std::thread::spawn(move || inner.work(i))
            })
            .collect();
        let notifier = Arc::new(Self {
            inner,
            workers: Mutex::new(workers),
        });
        for record in store.snapshot().events {
            if record.delivery != Delivery::Sent && !record.body.is_empty() {
                notifier.inner.number(&record.id);
                notifier.inner.enqueue(&record);
            }
        }
        store.observe(Arc::clone(&notifier) as Arc<dyn Observer>);
        notifier
    }

    /// The libvirt URI of each (step id, domain UUID) of a new version of the plan.
    pub fn set_connections(&self, connections: BTreeMap<(String, String), Uri>) {
        *self
            .inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = connections;
    }

    /// While on, a step recorded `cancelled` raises no event: set while a watched plan's
    /// executor stops for a re-plan, whose steps then run under the new version.
    pub fn quiet_cancellations(&self, on: bool) {
        self.inner
            .quiet_cancellations
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records and queues `plan-started`.
    ///
    /// # Errors
    /// The lockfile could not be written.
    pub fn plan_started(&self, now: DateTime<Utc>) -> Result<(), LockError> {
        self.plan_event(EventKind::PlanStarted, now, None, String::new())
    }

    /// Records and queues `plan-finished` with the summary of the lockfile's steps.
    ///
    /// # Errors
    /// The lockfile could not be written.
    pub fn plan_finished(&self, now: DateTime<Utc>, message: String) -> Result<(), LockError> {
        let Some(store) = self.inner.store.upgrade() else {
            return Ok(());
        };
        let summary = EventSummary::count(store.snapshot().steps.iter().map(|r| r.status));
        self.plan_event(EventKind::PlanFinished, now, Some(summary), message)
    }

    fn plan_event(
        &self,
        kind: EventKind,
        now: DateTime<Utc>,
        summary: Option<EventSummary>,
        message: String,
    ) -> Result<(), LockError> {
        let inner = &self.inner;
        let targets = inner.wanting(kind);
        let Some(store) = inner.store.upgrade() else {
            return Ok(());
        };
        if targets.is_empty() {
            return Ok(());
        }
        let finished = kind == EventKind::PlanFinished;
        let event = Event {
            format_version: EVENT_FORMAT_VERSION,
            event: kind,
            id: event_id(&inner.plan.file, kind, None, None, Some(now)),
            plan: inner.plan.clone(),
            step: None,
            vm: None,
            uuid: None,
            connection: None,
            at: None,
            status: summary.as_ref().map(EventSummary::outcome),
            started_at: (!finished).then_some(now),
            finished_at: finished.then_some(now),
            message,
            summary,
        };
        let record = record_of(&event, targets);
        inner.number(&record.id);
        let result = store.record_event(record.clone());
        if result.is_err() {
            inner.abandon(&record.id);
        }
        result
    }

    /// Waits until every queue is empty or `timeout` has passed, then writes the delivery
    /// results. Returns how many deliveries were left undone (they stay pending in the
    /// lockfile and go out with the next `apply`).
    pub fn flush(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        for q in &self.inner.queues {
            q.lock().deadline = Some(deadline);
            q.cond.notify_all();
        }
        let mut left = 0;
        for q in &self.inner.queues {
            let mut state = q.lock();
            while state.busy || !state.jobs.is_empty() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = q
                    .cond
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            left += state.jobs.len() + usize::from(state.busy);
        }
        if left == 0 {
            let workers =
                std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
            for w in workers {
                let _ = w.join();
            }
        }
        if let Some(store) = self.inner.store.upgrade() {
            if let Err(e) = store.sync() {
                (self.inner.log)(&format!("cannot record notification deliveries: {e}"));
            }
        }
        left
    }
}

impl Observer for Notifier {
    fn on_change(
        &self,
        before: crate::lockfile::StepStatus,
        after: &StepRecord,
    ) -> Option<EventRecord> {
        let kind = EventKind::of_transition(before, after.status)?;
        let inner = &self.inner;
        if kind == EventKind::StepCancelled
            && inner
                .quiet_cancellations
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        let targets = inner.wanting(kind);
        if targets.is_empty() {
            return None;
        }
        let instant = if kind == EventKind::StepStarted {
            after.started_at
        } else {
            after.finished_at
        };
        let event = Event {
            format_version: EVENT_FORMAT_VERSION,
            event: kind,
            id: event_id(
                &inner.plan.file,
                kind,
                Some(&after.step_id),
                Some(&after.uuid),
                instant,
            ),
            plan: inner.plan.clone(),
            step: Some(after.step),
            vm: Some(after.vm.clone()),
            uuid: Some(after.uuid.clone()),
            connection: inner
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(after.step_id.clone(), after.uuid.clone()))
                .map(Uri::redacted),
            at: after.at,
            status: Some(after.status),
            started_at: after.started_at,
            finished_at: after.finished_at,
            message: after.message.clone(),
            summary: None,
        };
        let record = record_of(&event, targets);
        inner.number(&record.id);
        Some(record)
    }

    fn on_recorded(&self, event: &EventRecord) {
        self.inner.enqueue(event);
    }

    fn on_failed(&self, event: &EventRecord) {
        self.inner.abandon(&event.id);
    }
}

fn record_of(event: &Event, targets: Vec<String>) -> EventRecord {
    EventRecord {
        id: event.id.clone(),
        event: event.event.as_str().to_owned(),
        step: event.step,
        vm: event.vm.clone(),
        delivery: Delivery::Pending,
        targets,
        sent_to: Vec::new(),
        failed_to: Vec::new(),
        error: String::new(),
        body: serde_json::to_string(event).unwrap_or_default(),
    }
}

impl Inner {
    /// Keys of the targets that want `kind`.
    fn wanting(&self, kind: EventKind) -> Vec<String> {
        self.targets
            .iter()
            .zip(&self.keys)
            .filter(|(t, _)| t.wants(kind))
            .map(|(_, k)| k.clone())
            .collect()
    }

    fn order(&self) -> MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives the event `id` the next number in recording order.
    fn number(&self, id: &str) {
        let mut order = self.order();
        let n = order.next;
        order.next += 1;
        order.numbers.insert(id.to_owned(), n);
        order.outstanding.insert(n);
    }

    /// The number of `id` is no longer on its way (queued or abandoned): wake the targets.
    fn settle(&self, id: &str) {
        let mut order = self.order();
        if let Some(n) = order.numbers.remove(id) {
            order.outstanding.remove(&n);
        }
        drop(order);
        for q in &self.queues {
            // Taking the lock first: a worker between its check and its wait gets the wake-up.
            drop(q.lock());
            q.cond.notify_all();
        }
    }

    /// The write that carried `id` failed: later events must not wait for it.
    fn abandon(&self, id: &str) {
        self.settle(id);
    }

    /// The lowest number still on its way, if any.
    fn first_outstanding(&self) -> Option<u64> {
        self.order().outstanding.first().copied()
    }

    /// Queues a recorded event for each target that wants it and has not taken it yet.
    fn enqueue(&self, record: &EventRecord) {
        let number = self.order().numbers.get(&record.id).copied();
        let Ok(event) = serde_json::from_str::<Event>(&record.body) else {
            (self.log)(&format!(
                "notification {} in the lockfile cannot be read back; it is not sent",
                record.id
            ));
            self.settle(&record.id);
            return;
        };
        let number = number.unwrap_or(u64::MAX);
        let event = Arc::new(event);
        for (i, key) in self.keys.iter().enumerate() {
            if !record.targets.contains(key) || record.sent_to.contains(key) {
                continue;
            }
            let q = &self.queues[i];
            let mut state = q.lock();
            if state.jobs.len() >= self.retry.queue.max(1) {
                drop(state);
                (self.log)(&format!(
                    "notification queue of {} is full: {} ({}) stays pending in the lockfile and is sent by the next `virtplan apply`",
                    self.targets[i],
                    event.headline(),
                    event.id
                ));
                continue;
            }
            let at = state.jobs.partition_point(|(n, _)| *n <= number);
            state.jobs.insert(at, (number, Arc::clone(&event)));
            q.cond.notify_all();
        }
        self.settle(&record.id);
    }

    /// One target's delivery thread.
    fn work(&self, i: usize) {
        let q = &self.queues[i];
        loop {
            let event = {
                let mut state = q.lock();
                loop {
                    let now = Instant::now();
                    if state.deadline.is_some_and(|d| now >= d) {
                        return;
                    }
                    // An earlier event still on its way to the queue goes first.
                    let ready = state.jobs.front().is_some_and(|(n, _)| {
                        self.first_outstanding().is_none_or(|first| *n < first)
                    });
                    if ready {
                        if let Some((_, event)) = state.jobs.pop_front() {
                            state.busy = true;
                            break event;
                        }
                    }
                    if state.deadline.is_some() && state.jobs.is_empty() {
                        return;
                    }
                    state = match state.deadline {
                        Some(d) => {
                            q.cond
                                .wait_timeout(state, d.saturating_duration_since(now))
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                        None => q.cond.wait(state).unwrap_or_else(PoisonError::into_inner),
                    };
                }
            };
            self.deliver(i, &event);
            q.lock().busy = false;
            q.cond.notify_all();
        }
    }

    /// Delivers with retries; records the result unless the flush deadline cut it short.
    fn deliver(&self, i: usize, event: &Event) {
        let target = &self.targets[i];
        let mut wait = self.retry.backoff;
        for attempt in 1..=self.retry.attempts.max(1) {
            let error = match deliver(target, event) {
                Ok(()) => {
                    if let Some(store) = self.store.upgrade() {
                        store.note_delivery(&event.id, &self.keys[i], Ok(()));
                    }
                    return;
                }
                Err(e) => e.0,
            };
            if attempt == self.retry.attempts.max(1) {
                (self.log)(&format!(
                    "notification {} ({}) not delivered to {target} after {attempt} attempt(s): {error}; the next `virtplan apply` tries again",
                    event.headline(),
                    event.id
                ));
                if let Some(store) = self.store.upgrade() {
                    store.note_delivery(&event.id, &self.keys[i], Err(&error));
                }
                return;
            }
            (self.log)(&format!(
                "notification {} to {target} failed (attempt {attempt}): {error}; retrying in {}",
                event.headline(),
                humantime::format_duration(wait)
            ));
            if !self.pause(i, wait) {
                return;
            }
            wait = wait.saturating_mul(2);
        }
    }

    /// Waits `wait` between attempts; `false` when the flush deadline comes first.
    fn pause(&self, i: usize, wait: Duration) -> bool {
        let q = &self.queues[i];
        let until = Instant::now() + wait;
        let mut state = q.lock();
        loop {
            let now = Instant::now();
            if state.deadline.is_some_and(|d| now >= d) {
                return false;
            }
            if now >= until {
                return true;
            }
            let limit = state.deadline.map_or(until, |d| d.min(until));
            state = q
                .cond
                .wait_timeout(state, limit.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_target(argv: &[&str]) -> Target {
        use crate::notify::target::{check, RawTarget};
        use crate::plan_file::{Located, Pos};
        let l = |s: &str| Located {
            value: s.to_owned(),
            pos: Pos::new(1, 1),
        };
        check(
            &RawTarget {
                command: Some(Located {
                    value: argv.iter().map(|a| l(a)).collect(),
                    pos: Pos::new(1, 1),
                }),
                ..RawTarget::default()
            },
            "t",
        )
        .unwrap()
    }

    /// A new lockfile `p.lock` in `dir`, of the plan [`run_info`] names.
    fn store(dir: &std::path::Path) -> Arc<LockStore> {
        Arc::new(LockStore::open(&dir.join("p.lock"), "abc").unwrap())
    }

    /// A run of the plan `p` (`p.yaml`, sha256 `abc`) on `connections`.
    fn run_info(connections: BTreeMap<(String, String), Uri>) -> RunInfo {
        RunInfo {
            plan: PlanRef {
                name: "p".into(),
                file: "p.yaml".into(),
                sha256: "abc".into(),
            },
            connections,
        }
    }

    /// A target slower than the events it gets: its bounded queue overflows, the executor is
    /// not held up, and what did not fit stays pending in the lockfile for the next run.
    #[test]
    fn a_full_queue_leaves_the_event_pending_in_the_lockfile() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let logged = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&logged);
        let notifier = Notifier::start(
            vec![command_target(&["sh", "-c", "cat >/dev/null; sleep 0.3"])],
            run_info(BTreeMap::new()),
            &store,
            Box::new(move |m: &str| sink.lock().unwrap().push(m.to_owned())),
            Retry {
                attempts: 1,
                backoff: Duration::ZERO,
                queue: 1,
            },
        );
        let t0 = DateTime::parse_from_rfc3339("2026-12-01T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let started = Instant::now();
        for i in 0..4 {
            notifier
                .plan_started(t0 + chrono::Duration::seconds(i))
                .unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "recording four events waited for a delivery"
        );
        assert_eq!(notifier.flush(Duration::from_secs(10)), 0);
        let events = store.snapshot().events;
        let sent = events
            .iter()
            .filter(|e| e.delivery == Delivery::Sent)
            .count();
        let pending: Vec<_> = events
            .iter()
            .filter(|e| e.delivery == Delivery::Pending)
            .collect();
        assert_eq!(sent + pending.len(), 4, "{events:#?}");
        assert!(!pending.is_empty(), "{events:#?}");
        assert!(
            pending.iter().all(|e| !e.body.is_empty()),
            "kept for a re-send"
        );
        let logged = logged.lock().unwrap();
        assert!(logged.iter().any(|m| m.contains("is full")), "{logged:?}");
        // What the lockfile says on disk is what a resumed run re-sends.
        let on_disk = LockStore::read(&dir.path().join("p.lock")).unwrap();
        assert_eq!(on_disk.events, events);
    }

    /// An event names the step's connection with its credentials masked (the `Uri` type's
    /// redaction), and the lockfile's copy of the event too.
    #[test]
    fn an_events_connection_never_carries_a_password() {
        use crate::lockfile::{StepRecord, StepStatus};
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let uri = Uri::new("qemu+ssh://root:hunter2@hv1/system?password=hunter3");
        let notifier = Notifier::start(
            vec![command_target(&["true"])],
            run_info([(("s1".to_owned(), "uuid-a".to_owned()), uri)].into()),
            &store,
            Box::new(|_: &str| {}),
            Retry::default(),
        );
        let record = StepRecord::new(1, "s1", "a", "uuid-a", "", None, StepStatus::Failed);
        let event = notifier
            .on_change(StepStatus::Running, &record)
            .expect("an event");
        assert!(!event.body.contains("hunter"), "{}", event.body);
        let body: Event = serde_json::from_str(&event.body).unwrap();
        assert_eq!(
            body.connection.as_deref(),
            Some("qemu+ssh://root:***@hv1/system?password=***")
        );
        notifier.on_failed(&event);
        assert_eq!(notifier.flush(Duration::from_secs(5)), 0);
    }

    /// Two domains' threads finish their lockfile writes in the other order than they
    /// recorded their events: the target still gets them in recording order.
    #[test]
    fn events_reach_a_target_in_recording_order() {
        use crate::clock::{Clock as _, SystemClock};
        use crate::lockfile::{StepRecord, StepStatus};
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let got = dir.path().join("got");
        let append = format!("echo $VIRTPLAN_EVENT_ID >> {}", got.display());
        let notifier = Notifier::start(
            vec![command_target(&["sh", "-c", &append])],
            run_info(BTreeMap::new()),
            &store,
            Box::new(|_: &str| {}),
            Retry::default(),
        );
        let running = |vm: &str| {
            let mut r = StepRecord::new(
                1,
                "s1",
                vm,
                format!("uuid-{vm}"),
                "",
                None,
                StepStatus::Running,
            );
            r.started_at = Some(SystemClock.now());
            r
        };
        let a = notifier
            .on_change(StepStatus::Pending, &running("web-01"))
            .unwrap();
        let b = notifier
            .on_change(StepStatus::Pending, &running("web-02"))
            .unwrap();
        notifier.on_recorded(&b);
        SystemClock.sleep(Duration::from_millis(300));
        assert!(!got.exists(), "b went out while a was still on its way");
        notifier.on_recorded(&a);
        assert_eq!(notifier.flush(Duration::from_secs(10)), 0);
        let order = std::fs::read_to_string(&got).unwrap();
        assert_eq!(order, format!("{}\n{}\n", a.id, b.id));
    }
}
