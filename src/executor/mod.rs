//! Runs a [`Plan`]: each domain's steps in order, different domains concurrently (bounded),
//! every step at its time and never outside its grace or window, recorded in the lockfile
//! before and after each libvirt change.
//!
//! A scheduler (the calling thread) keeps each domain's next due time in a heap and hands a
//! domain to a bounded pool of `parallelism` worker threads when its next step is due; the
//! worker runs that domain's steps while they are due (or need no waiting: skipped, cancelled,
//! done before) and gives the domain back with its next due time. Nothing sleeps per domain:
//! only the scheduler waits, for the earliest due time or a finished turn, and re-reads the
//! clock after every wake-up. A step's domain lease is taken the same way: a turn writes the
//! record and gives the domain back for the settle delay; the next turn reads it back and
//! acts (`leasing.rs`), so a batch due at once waits one settle delay, not one per worker.
//! Time comes only from the [`Clock`], so tests run on a fake one.

mod admission;
mod gate;
mod leasing;
mod step;

pub use admission::Peaks;
pub use leasing::Leasing;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::attr::Attr;
use crate::clock::Clock;
use crate::hypervisor::{ErrorKind, HvError, HvResult, Hypervisor};
use crate::lockfile::{LockError, LockStore, StepStatus};
use crate::plan_file::{OnFailure, Window};
use crate::planner::{Connections, Plan, PlannedStep, Policy};
use crate::uri::Uri;
use admission::Arrival;

/// How the executor behaves: the plan's timing and failure policy, and its own limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How late a step may still start.
    pub grace: Duration,
    /// No step starts at or after `window.end`.
    pub window: Option<Window>,
    pub on_failure: OnFailure,
    /// How many steps run at the same time.
    pub parallelism: usize,
    /// Attempts after a transient libvirt failure (connection lost, RPC timeout).
    pub retries: u32,
    /// First wait before a retry; doubled each time.
    pub backoff: Duration,
    /// How often a graceful shutdown is checked.
    pub poll: Duration,
    /// Test-only crash switch: `after-running:<step_id>` or `before-done:<step_id>` aborts
    /// the process at that point.
    pub failpoint: Option<String>,
    /// Domain leases (on by default); `None` acts without them.
    pub lease: Option<Leasing>,
}

impl Settings {
    /// The plan's own grace, window, failure policy and parallelism (as reviewed), with
    /// default limits.
    #[must_use]
    /// Domain leases are on, held as this process running `plan`'s file: every caller holds
    /// the plan's executor lock (apply, watch), so a lease of this plan from this host with
    /// another pid was left by a dead executor of it. The plan is named by its file's real
    /// path, as its executor lock is ([`crate::lockfile::canonical`]): named as given, two
    /// plans called `plan.yaml` in two folders would each take the other's live lease for a
    /// dead executor's and act at once, and a resume through another name of the same file
    /// would wait a whole ttl for its own dead records.
    pub fn for_plan(plan: &Plan) -> Self {
        let file = crate::lockfile::canonical(std::path::Path::new(&plan.meta.file))
            .display()
            .to_string();
        Self {
            lease: Some(Leasing {
                holder: crate::lease::Holder::this_process(file),
                config: crate::lease::LeaseConfig {
                    own_plan_exclusive: true,
                    ..crate::lease::LeaseConfig::default()
                },
            }),
            ..Self::new(&plan.policy)
        }
    }

    /// `policy` with default limits, without leases.
    #[must_use]
    pub fn new(policy: &Policy) -> Self {
        Self {
            grace: policy.grace,
            window: policy.window,
            on_failure: policy.on_failure,
            parallelism: policy.parallelism.max(1),
            retries: 3,
            backoff: Duration::from_secs(1),
            poll: Duration::from_millis(250),
            failpoint: None,
            lease: None,
        }
    }
}

impl Settings {
    /// Takes leases with `config`'s timing (virtplan.toml `[lease]`).
    #[must_use]
    pub fn with_lease_config(mut self, config: crate::lease::LeaseConfig) -> Self {
        if let Some(lease) = &mut self.lease {
            lease.config = crate::lease::LeaseConfig {
                own_plan_exclusive: lease.config.own_plan_exclusive,
                ..config
            };
        }
        self
    }
}

/// What happened to one step on one domain during this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub step: usize,
    pub step_id: String,
    pub vm: String,
    pub uuid: String,
    pub at: Option<DateTime<Utc>>,
    pub status: StepStatus,
    pub message: String,
    /// Recorded done by an earlier run: nothing was done now.
    pub earlier: bool,
}

/// The result of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// In plan order.
    pub outcomes: Vec<Outcome>,
    /// A signal stopped the run before every step was tried.
    pub interrupted: bool,
    /// Progress could not be recorded: the run stopped.
    pub fatal: Option<String>,
    /// The most domains each rollout step and each capped host had in flight at once.
    pub peaks: Peaks,
}

impl Report {
    /// Whether any step failed, was missed or skipped.
    #[must_use]
    pub fn any_failed(&self) -> bool {
        self.outcomes.iter().any(|o| o.status.is_failure())
    }
}

/// Everything a run needs.
pub struct Executor<'a> {
    pub plan: &'a Plan,
    pub connections: &'a Connections,
    pub clock: &'a dyn Clock,
    pub store: &'a LockStore,
    pub settings: &'a Settings,
    /// Set by SIGINT/SIGTERM: start nothing new.
    pub stop: &'a AtomicBool,
    /// Called as each step ends (for live progress output).
    pub on_outcome: &'a (dyn Fn(&Outcome) + Sync),
    /// Opens a fresh connection to a URI after a transient failure (connection lost).
    pub reconnect: Option<&'a Reconnect<'a>>,
}

/// Opens a new connection to a URI.
pub type Reconnect<'a> = dyn Fn(&Uri) -> HvResult<Arc<dyn Hypervisor>> + Sync + 'a;

/// Shared state of one run.
struct Run<'a> {
    ex: &'a Executor<'a>,
    abort: AtomicBool,
    fatal: Mutex<Option<String>>,
    outcomes: Mutex<Vec<Outcome>>,
    /// The connections in use, one per host: replaced when a lost one is reopened.
    conns: Mutex<BTreeMap<Uri, Host>>,
    /// Attributes each (step id, uuid) changes, from the plan's changes.
    touched: BTreeMap<(String, String), Vec<Attr>>,
    /// Rollouts and per-host caps.
    admission: admission::Admission,
    /// The scheduler's hand-off to the workers.
    pool: Pool,
    /// How long a leased step has been acting, on average (an exponential moving average of
    /// the latest ones; `None` before the first): how many lease records may wait at once.
    acting: Mutex<Option<chrono::Duration>>,
}

/// Where a domain's turn stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Its next step is due then.
    Due(DateTime<Utc>),
    /// Its step's lease record is written, to be read back once the clock's monotonic
    /// reading ([`Clock::monotonic`]) reaches this: a settle delay is a duration, which a
    /// stepped wall clock must not shorten. Handed to a worker before any other due domain,
    /// as a record read back late must be written again ([`crate::lease::Leaser::confirm`]).
    Settle(DateTime<Utc>),
    /// Its next step waits for a share of a rollout or of its host's cap.
    Parked,
    /// No steps left.
    Finished,
}

/// One host's connection, and whether the host can be reached.
struct Host {
    conn: Arc<dyn Hypervisor>,
    /// Set while the host cannot be reached (it was unreachable when the run started, or a
    /// lost connection could not be reopened); cleared by a successful reopen.
    down: Option<Down>,
    /// A worker is opening a fresh connection: the others do not queue behind it.
    reopening: bool,
}

/// A host that cannot be reached, and when it is tried next.
#[derive(Debug, Clone)]
struct Down {
    since: DateTime<Utc>,
    error: String,
    /// Failed attempts to reopen it so far.
    attempts: u32,
    /// No reopen is tried before this (bounded exponential backoff).
    next_try: DateTime<Utc>,
}

/// The longest wait between two attempts to reopen a lost host.
pub const HOST_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What a due step finds of its host.
enum HostGate {
    /// Reachable: run the step.
    Up,
    /// Down: come back at this time (the next reopen attempt, or the step's deadline).
    Wait(DateTime<Utc>),
    /// Down past the step's deadline: not run, for this reason.
    Lost(String),
}

/// Where one domain is in its steps.
#[derive(Default)]
struct Cursor {
    /// Index of its next step.
    next: usize,
    /// Why its later steps do not run, once one failed.
    blocked: Option<Blocked>,
    /// The lease its next step is taking, between turns.
    taking: Option<leasing::Taking>,
}

/// The scheduler's hand-off to the workers.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Workers wait here for domains; the scheduler for finished turns.
    wake: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Domains due now, by index.
    jobs: VecDeque<usize>,
    /// Domains whose lease record is to be read back now: taken before `jobs`.
    settling: VecDeque<usize>,
    /// Turns ended: the domain and where it stopped.
    finished: Vec<(usize, Next)>,
    /// A share of a rollout or host was freed: the scheduler hands parked domains out.
    kicked: bool,
    /// No more work: workers exit.
    closed: bool,
    /// A worker panicked: re-raised by the scheduler.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Domains waiting in the scheduler, by when they are due.
type Waiting = BinaryHeap<Reverse<(DateTime<Utc>, usize)>>;

/// Moves the domains of `heap` due by `now` (all of them on `flush`), at most `most` (unless
/// `flush`), to `into`; how many.
fn pop_due(
    heap: &mut Waiting,
    now: DateTime<Utc>,
    flush: bool,
    most: usize,
    into: &mut VecDeque<usize>,
) -> usize {
    let mut n = 0;
    while let Some(Reverse((due, i))) = heap.peek().copied() {
        if (due > now || n >= most) && !flush {
            break;
        }
        heap.pop();
        into.push_back(i);
        n += 1;
    }
    n
}

/// Why a step ended the way it did, for the domain's later steps.
enum Blocked {
    /// The domain is gone: its later steps fail.
    Gone(String),
    /// An earlier step failed or was missed: later steps are skipped.
    Earlier(String),
}

impl Executor<'_> {
    /// The run's hosts: an [`Unreachable`](crate::hypervisor::unreachable::Unreachable)
    /// stand-in starts down, to be opened when its first step is due.
    fn hosts(&self) -> BTreeMap<Uri, Host> {
        let now = self.clock.now();
        self.connections
            .iter()
            .map(|(uri, conn)| {
                let down = conn.unreachable().map(|e| Down {
                    since: now,
                    error: e.message.clone(),
                    attempts: 0,
                    next_try: now,
                });
                let host = Host {
                    conn: Arc::clone(conn),
                    down,
                    reopening: false,
                };
                (uri.clone(), host)
            })
            .collect()
    }

    /// The operator's cancellations of this plan: the side file beside the lockfile.
    fn store_cancels(&self) -> crate::cancel::CancelLog {
        crate::cancel::CancelLog::for_lockfile(self.store.path())
    }

    /// Reconciles the lockfile with the plan, then runs every step.
    ///
    /// # Errors
    /// The lockfile refuses the plan (edited done step, changed UUID) or cannot be written;
    /// nothing has run then.
    pub fn run(&self) -> Result<Report, LockError> {
        self.store.reconcile(self.plan)?;
        let mut touched: BTreeMap<(String, String), Vec<Attr>> = BTreeMap::new();
        for c in &self.plan.changes {
            touched
                .entry((c.step_id.clone(), c.uuid.clone()))
                .or_default()
                .push(c.attribute);
        }
        let run = Run {
            ex: self,
            abort: AtomicBool::new(false),
            fatal: Mutex::new(None),
            outcomes: Mutex::new(Vec::new()),
            conns: Mutex::new(self.hosts()),
            touched,
            admission: admission::Admission::new(self.plan, self.settings.on_failure),
            pool: Pool::default(),
            acting: Mutex::new(None),
        };
        // Each domain's steps in plan (time) order, grouped in one pass.
        let mut slots: HashMap<(&Uri, &str), usize> = HashMap::new();
        let mut domains: Vec<Vec<&PlannedStep>> = Vec::new();
        for s in &self.plan.steps {
            let key = (&s.connection, s.domain.uuid.as_str());
            let i = *slots.entry(key).or_insert_with(|| {
                domains.push(Vec::new());
                domains.len() - 1
            });
            domains[i].push(s);
        }
        run.schedule(&domains);
        let mut outcomes = run
            .outcomes
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let order: BTreeMap<(&str, &str), usize> = self
            .plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.step_id.as_str(), s.domain.uuid.as_str()), i))
            .collect();
        outcomes.sort_by_key(|o| order.get(&(o.step_id.as_str(), o.uuid.as_str())).copied());
        let peaks = run.admission.peaks();
        let fatal = run
            .fatal
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        // The journal is whole either way; compacting only folds it back to one line per
        // record, so a failure here loses nothing and is not the run's failure.
        let _ = self.store.compact();
        let interrupted = self.stop.load(Ordering::SeqCst)
            && outcomes.iter().any(|o| o.status == StepStatus::Cancelled);
        Ok(Report {
            outcomes,
            interrupted,
            fatal,
            peaks,
        })
    }
}

impl Run<'_> {
    fn hosts(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uri, Host>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current connection to `uri`.
    fn connection(&self, uri: &Uri) -> HvResult<Arc<dyn Hypervisor>> {
        self.hosts()
            .get(uri)
            .map(|h| Arc::clone(&h.conn))
            .ok_or_else(|| HvError::new(ErrorKind::Other, format!("no open connection to {uri}")))
    }

    /// Replaces the connection `failed` to `uri` by a fresh one, once, however many threads
    /// saw it fail; returns whether the host is reachable now. The opening happens outside
    /// the lock of the run's connections, so a host that hangs at connect holds up only the
    /// worker that tries it, never another host's steps; meanwhile the others see it down. A
    /// failed open marks the host down (the first failure's time kept) and schedules the next
    /// attempt after a doubling backoff of at most [`HOST_BACKOFF_MAX`].
    fn reconnect(&self, uri: &Uri, failed: &Arc<dyn Hypervisor>) -> bool {
        let Some(open) = self.ex.reconnect else {
            return false;
        };
        {
            let mut hosts = self.hosts();
            let Some(host) = hosts.get_mut(uri) else {
                return false;
            };
            if !Arc::ptr_eq(&host.conn, failed) {
                return host.down.is_none();
            }
            if host.reopening {
                return false;
            }
            // Another worker may have tried (and failed) since this one looked: its backoff
            // stands, so two due steps on one lost host never make two attempts at once.
            if host
                .down
                .as_ref()
                .is_some_and(|d| self.ex.clock.now() < d.next_try)
            {
                return false;
            }
            host.reopening = true;
        }
        let opened = open(uri);
        let now = self.ex.clock.now();
        let mut hosts = self.hosts();
        let Some(host) = hosts.get_mut(uri) else {
            return false;
        };
        host.reopening = false;
        match opened {
            Ok(fresh) => {
                host.conn = fresh;
                host.down = None;
                true
            }
            Err(e) => {
                let (since, attempts) = host
                    .down
                    .as_ref()
                    .map_or((now, 1), |d| (d.since, d.attempts + 1));
                let backoff = self
                    .ex
                    .settings
                    .backoff
                    .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
                    .min(HOST_BACKOFF_MAX);
                host.down = Some(Down {
                    since,
                    error: e.message,
                    attempts,
                    next_try: crate::clock::later(now, backoff),
                });
                false
            }
        }
    }

    /// Why `uri` cannot be reached, when it is down: names the host, since when, and its
    /// last error (credentials redacted).
    fn host_down(&self, uri: &Uri) -> Option<String> {
        let hosts = self.hosts();
        let down = hosts.get(uri)?.down.as_ref()?;
        Some(format!(
            "host {} is unreachable (since {}; {} reconnect attempt(s): {})",
            uri.redacted(),
            step::show_time(down.since),
            down.attempts,
            down.error
        ))
    }

    /// A due step's host: reachable (run it), down but worth waiting for (the next reopen
    /// attempt comes before the step's deadline), or down past the deadline. A down host is
    /// reopened here, by one worker at a time, never in a loop: the domain goes back to the
    /// scheduler until its next attempt, so waiting for a lost host holds no worker and no
    /// slot that another host's steps could use.
    fn host_gate(&self, step: &PlannedStep) -> HostGate {
        let (down, conn, reopening) = {
            let hosts = self.hosts();
            let Some(host) = hosts.get(&step.connection) else {
                return HostGate::Up;
            };
            let Some(down) = host.down.clone() else {
                return HostGate::Up;
            };
            (down, Arc::clone(&host.conn), host.reopening)
        };
        let now = self.ex.clock.now();
        let deadline = self.start_deadline(step, now);
        let reason = || self.host_down(&step.connection).unwrap_or_default();
        if now > deadline {
            return HostGate::Lost(reason());
        }
        // Back for the deadline itself, so the step is recorded as soon as it is lost.
        let by_deadline = |t: DateTime<Utc>| t.min(deadline + chrono::Duration::milliseconds(1));
        if reopening {
            return HostGate::Wait(by_deadline(now + chrono::Duration::seconds(1)));
        }
        if now < down.next_try {
            return HostGate::Wait(by_deadline(down.next_try));
        }
        if self.reconnect(&step.connection, &conn) {
            return HostGate::Up;
        }
        let next = self
            .hosts()
            .get(&step.connection)
            .and_then(|h| h.down.as_ref().map(|d| d.next_try))
            .unwrap_or(now + chrono::Duration::seconds(1));
        if self.ex.reconnect.is_none() {
            // Nothing can reopen it: wait for the deadline, then record the step lost.
            return HostGate::Wait(by_deadline(DateTime::<Utc>::MAX_UTC));
        }
        HostGate::Wait(by_deadline(next))
    }

    /// Records a step whose host stayed down past its deadline: `missed` when it never
    /// started, `failed` when an interrupted run had started it (it may have changed things).
    fn host_lost(&self, step: &PlannedStep, recorded: StepStatus, reason: &str) -> StepStatus {
        let late = self
            .late(step, self.ex.clock.now())
            .unwrap_or_else(|| "its deadline passed".to_owned());
        let (status, message) = if recorded == StepStatus::Running {
            (
                StepStatus::Failed,
                format!("an interrupted run had started this step and {reason}; not resumed because {late}"),
            )
        } else {
            (
                StepStatus::Missed,
                format!("missed, not run: {reason}; {late}"),
            )
        };
        self.finish(step, status, message);
        status
    }

    fn stopping(&self) -> bool {
        self.ex.stop.load(Ordering::SeqCst) || self.abort.load(Ordering::SeqCst)
    }

    /// Runs domains on a pool of at most `parallelism` workers, each domain's steps in order,
    /// every step when it is due and, when paced, when its rollout or host gives it a share.
    fn schedule(&self, domains: &[Vec<&PlannedStep>]) {
        const SLICE: Duration = Duration::from_secs(1);
        let workers = self.ex.settings.parallelism.clamp(1, domains.len().max(1));
        let pool = &self.pool;
        let cursors: Vec<Mutex<Cursor>> = domains.iter().map(|_| Mutex::default()).collect();
        let panic = std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| self.work(pool, domains, &cursors));
            }
            let mut waiting = Waiting::new();
            // Domains with a lease record to read back, by when (the clock's monotonic reading).
            let mut settling = Waiting::new();
            let mut in_flight = domains.len();
            let mut parked = 0usize;
            pool.lock().jobs.extend(0..domains.len());
            pool.wake.notify_all();
            let mut signals = self.signals();
            let mut state = pool.lock();
            loop {
                if state.closed {
                    break;
                }
                state.kicked = false;
                for (i, next) in state.finished.drain(..) {
                    in_flight -= 1;
                    match next {
                        Next::Due(due) => waiting.push(Reverse((due, i))),
                        Next::Settle(due) => settling.push(Reverse((due, i))),
                        Next::Parked => {
                            parked += 1;
                            self.admission.confirm(i);
                        }
                        Next::Finished => {}
                    }
                }
                // A signal or an abort changes what waiting domains do (cancel their steps
                // at once): hand them all out; those that still wait come back.
                let now_signals = self.signals();
                let flush = now_signals != signals;
                signals = now_signals;
                let now = self.ex.clock.now();
                let ticks = self.ex.clock.monotonic();
                let mut out = pop_due(&mut settling, ticks, flush, usize::MAX, &mut state.settling);
                // Domains that may write a lease record: no more than the workers can act on
                // while the records are young (see `lease_room`).
                let room = self
                    .lease_room(workers)
                    .saturating_sub(settling.len() + state.settling.len());
                let held_back = !flush && room == 0;
                out += pop_due(&mut waiting, now, flush, room, &mut state.jobs);
                in_flight += out;
                let mut dispatched = out > 0;
                let mut wake = None;
                if parked > 0 {
                    // Nothing running and nothing due that could free a share: relax the
                    // rollout order rather than wait forever (never its caps).
                    let stuck = in_flight == 0 && waiting.is_empty() && settling.is_empty();
                    let (go, next) = self.admission.pump(now, flush, stuck);
                    parked -= go.len();
                    in_flight += go.len();
                    dispatched |= !go.is_empty();
                    state.jobs.extend(go);
                    wake = next;
                }
                if dispatched {
                    pool.wake.notify_all();
                }
                if in_flight == 0 && waiting.is_empty() && settling.is_empty() && parked == 0 {
                    state.closed = true;
                    pool.wake.notify_all();
                    break;
                }
                // Due domains held back wait for a finished turn, not for their (past) time.
                let waiting_due = if held_back { None } else { waiting.peek() };
                let next = match (waiting_due, wake) {
                    (Some(Reverse((due, _))), Some(w)) => Some((*due).min(w)),
                    (Some(Reverse((due, _))), None) => Some(*due),
                    (None, w) => w,
                };
                let mut left = next.map_or(SLICE, |due| {
                    (due - now).to_std().unwrap_or(Duration::ZERO).min(SLICE)
                });
                if let Some(Reverse((due, _))) = settling.peek() {
                    left = left.min((*due - ticks).to_std().unwrap_or(Duration::ZERO));
                }
                if in_flight > 0 {
                    // Woken by a finished turn, a freed share, or when the next domain is due.
                    if !state.kicked && state.finished.is_empty() {
                        state = pool
                            .wake
                            .wait_timeout(state, left.max(Duration::from_millis(1)))
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                } else {
                    drop(state);
                    self.ex.clock.sleep(left);
                    state = pool.lock();
                }
            }
            let panic = state.panic.take();
            drop(state);
            pool.wake.notify_all();
            panic
        });
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }

    /// How many domains may hold a lease record waiting to be read back (or be handed out to
    /// write one) at once. A record is trusted only while young (a third of the lease's
    /// lifetime, [`crate::lease::Leaser::confirm`]); one that waited longer for a worker is
    /// removed and written again later. So, once the run knows how long a leased step acts,
    /// no more records wait than the workers can take up in half that time (at least one per
    /// worker); before, and for quick steps, there is no limit: a batch due at once settles
    /// together.
    fn lease_room(&self, workers: usize) -> usize {
        let Some(leasing) = &self.ex.settings.lease else {
            return usize::MAX;
        };
        let acting = *self.acting.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(acting) = acting.and_then(|d| d.to_std().ok()) else {
            return usize::MAX;
        };
        let budget = leasing.config.renew_every() / 2;
        let per_worker = budget.as_secs_f64() / acting.as_secs_f64().max(1e-6);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let room = (per_worker * workers as f64).min(usize::MAX as f64) as usize;
        room.max(workers)
    }

    /// Counts how long a leased step acted, for [`Run::lease_room`].
    fn acted(&self, took: chrono::Duration) {
        let mut acting = self.acting.lock().unwrap_or_else(PoisonError::into_inner);
        *acting = Some(acting.map_or(took, |avg| (avg * 4 + took) / 5));
    }

    /// Tells the scheduler a share was freed, so parked domains are handed out at once.
    fn kick(&self) {
        self.pool.lock().kicked = true;
        self.pool.wake.notify_all();
    }

    /// Whether a signal or an abort stopped the run, as one comparable value.
    fn signals(&self) -> (bool, bool) {
        (
            self.ex.stop.load(Ordering::SeqCst),
            self.abort.load(Ordering::SeqCst),
        )
    }

    /// A worker: takes a due domain, runs its turn, gives it back.
    fn work(&self, pool: &Pool, domains: &[Vec<&PlannedStep>], cursors: &[Mutex<Cursor>]) {
        loop {
            let i = {
                let mut state = pool.lock();
                loop {
                    if let Some(i) = state
                        .settling
                        .pop_front()
                        .or_else(|| state.jobs.pop_front())
                    {
                        break i;
                    }
                    if state.closed {
                        return;
                    }
                    state = pool
                        .wake
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut cursor = cursors[i].lock().unwrap_or_else(PoisonError::into_inner);
                self.turn(i, &domains[i], &mut cursor)
            }));
            let mut state = pool.lock();
            match turn {
                Ok(next) => state.finished.push((i, next)),
                // A panic (a simulated crash in tests) ends the run as it ends this worker:
                // the scheduler stops handing out work and re-raises it once all have exited.
                Err(panic) => {
                    state.panic.get_or_insert(panic);
                    state.closed = true;
                }
            }
            drop(state);
            pool.wake.notify_all();
        }
    }

    /// When `step` is about to run but not due yet: its due time. A step recorded `running`
    /// by an interrupted run is re-checked at once; one without `at` runs when apply starts,
    /// but never before the window opens.
    fn not_yet(&self, step: &PlannedStep, recorded: StepStatus) -> Option<DateTime<Utc>> {
        if recorded == StepStatus::Running {
            return None;
        }
        let due = self.due(step)?;
        (self.ex.clock.now() < due).then_some(due)
    }

    /// A step whose turn has come: waits for its time, then its host (a lost host first, so
    /// its domain takes no rollout share while it waits), then its rollout share, and runs
    /// (`after_failure`: an `always` step run after a failure or an abort). `Ok`: the status it
    /// ended with and whether its domain is gone; `Err`: hand the domain back to the scheduler.
    fn attempt(
        &self,
        step: &PlannedStep,
        domain: usize,
        recorded: StepStatus,
        gated: bool,
        after_failure: bool,
        taking: &mut Option<leasing::Taking>,
    ) -> Result<(StepStatus, bool), Next> {
        if let Some(due) = self.not_yet(step, recorded) {
            return Err(Next::Due(due));
        }
        match self.host_gate(step) {
            HostGate::Wait(until) => Err(Next::Due(until)),
            HostGate::Lost(reason) => Ok((self.host_lost(step, recorded, &reason), false)),
            HostGate::Up => match self.admit(step, domain, recorded, gated) {
                Some(Arrival::Parked) => Err(Next::Parked),
                Some(Arrival::Skip(reason)) => {
                    self.finish(step, StepStatus::Skipped, reason);
                    Ok((StepStatus::Skipped, false))
                }
                _ => {
                    let ended = self.step(step, recorded, after_failure, taking)?;
                    Ok((ended.status, ended.gone))
                }
            },
        }
    }

    /// Runs one domain's steps in order from its cursor, while they are due (and, when paced,
    /// admitted); says where it stopped.
    // One match over what the lockfile and the domain's history say, then one epilogue;
    // splitting it would scatter the order the statuses are decided in.
    #[allow(clippy::too_many_lines)]
    fn turn(&self, domain: usize, steps: &[&PlannedStep], cursor: &mut Cursor) -> Next {
        while let Some(&step) = steps.get(cursor.next) {
            let gated = self.admission.gated(step);
            // Read once: a rollout past its error budget stays so.
            let tripped = gated.then(|| self.admission.tripped(step)).flatten();
            let recorded = self
                .ex
                .store
                .status(&step.step_id, &step.domain.uuid)
                .unwrap_or(StepStatus::Pending);
            // The status it ended with, whether a failure blocks the domain's later steps
            // (`false` when it was only a consequence of an earlier block or a stop), and
            // whether the domain is gone; `Err`: hand the domain back to the scheduler.
            let decided = match (recorded, &cursor.blocked, tripped) {
                // Its lease is being taken: it passed its time, host and share checks on the
                // turn that began it (a rollout share is held, not asked for again); a stop
                // is handled there, as the record we wrote must go. (`after_failure` was
                // decided on that turn and is kept with the lease.)
                _ if cursor.taking.is_some() => self
                    .step(step, recorded, false, &mut cursor.taking)
                    .map(|ended| (ended.status, true, ended.gone)),
                (StepStatus::Done, _, _) => {
                    self.report(
                        step,
                        StepStatus::Done,
                        "done in an earlier run".to_owned(),
                        true,
                    );
                    Ok((StepStatus::Done, false, false))
                }
                (StepStatus::Missed, _, _) => {
                    let message = "missed in an earlier run; a missed step never runs".to_owned();
                    self.report(step, StepStatus::Missed, message, true);
                    Ok((StepStatus::Missed, true, false))
                }
                // An `always` step runs whatever happened before it (but never twice, and
                // never after a signal).
                _ if step.always && !self.ex.stop.load(Ordering::SeqCst) => {
                    let after_failure =
                        cursor.blocked.is_some() || self.abort.load(Ordering::SeqCst);
                    self.attempt(
                        step,
                        domain,
                        recorded,
                        gated,
                        after_failure,
                        &mut cursor.taking,
                    )
                    .map(|(status, gone)| (status, true, gone))
                }
                (_, Some(b), _) => {
                    let (status, message) = match b {
                        Blocked::Gone(m) => (StepStatus::Failed, m.clone()),
                        Blocked::Earlier(m) => (StepStatus::Skipped, m.clone()),
                    };
                    self.finish(step, status, message);
                    Ok((status, false, false))
                }
                // A rollout past its error budget: its domains not started are skipped, not
                // cancelled, whatever `on_failure` did to the rest of the plan.
                (_, None, Some(reason)) => {
                    self.finish(step, StepStatus::Skipped, reason);
                    Ok((StepStatus::Skipped, true, false))
                }
                _ if self.stopping() => {
                    self.cancel(step);
                    Ok((StepStatus::Cancelled, false, false))
                }
                _ => self
                    .attempt(step, domain, recorded, gated, false, &mut cursor.taking)
                    .map(|(status, gone)| (status, true, gone)),
            };
            let (status, blocks, gone) = match decided {
                Ok(decided) => decided,
                Err(next) => return next,
            };
            if gated {
                // The budget is spent under `on_failure: abort`: the plan stops.
                if self
                    .admission
                    .leave(step, status, self.ex.clock.now())
                    .is_some()
                {
                    self.abort.store(true, Ordering::SeqCst);
                }
                self.kick();
            }
            cursor.next += 1;
            if blocks && status.is_failure() {
                cursor.blocked = Some(if gone {
                    Blocked::Gone(format!(
                        "domain {} ({}) no longer exists",
                        step.domain.name, step.domain.uuid
                    ))
                } else {
                    Blocked::Earlier(format!(
                        "step {} of {} was {}",
                        step.step, step.domain.name, status
                    ))
                });
            }
        }
        Next::Finished
    }

    /// Asks the pacing whether `step` may start on its domain now (`None`: not paced).
    /// A step recorded `running` by an interrupted run is re-checked at once, holding a share.
    fn admit(
        &self,
        step: &PlannedStep,
        domain: usize,
        recorded: StepStatus,
        gated: bool,
    ) -> Option<Arrival> {
        if !gated {
            return None;
        }
        let now = self.ex.clock.now();
        let late = recorded != StepStatus::Running && self.late(step, now).is_some();
        let deadline = self.start_deadline(step, now);
        Some(
            self.admission
                .arrive(step, domain, now, late, Some(deadline)),
        )
    }

    /// Records a final status without running anything (skipped, failed because gone).
    fn finish(&self, step: &PlannedStep, status: StepStatus, message: String) {
        let now = self.ex.clock.now();
        let write = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
            r.status = status;
            r.finished_at = Some(now);
            r.message.clone_from(&message);
        });
        if let Err(e) = write {
            self.fail_hard(&e);
        }
        self.report(step, status, message, false);
    }

    fn cancel(&self, step: &PlannedStep) {
        let message = if self.abort.load(Ordering::SeqCst) {
            if self.fatal_set() {
                "not started: progress could not be recorded".to_owned()
            } else {
                "not started: the plan was aborted after a failure (on_failure: abort)".to_owned()
            }
        } else {
            "not started: interrupted by a signal; run `virtplan apply` again to resume".to_owned()
        };
        self.finish(step, StepStatus::Cancelled, message);
    }

    fn fatal_set(&self) -> bool {
        self.fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The lockfile cannot be written: nothing more may run, since nothing could be recorded.
    fn fail_hard(&self, e: &LockError) {
        self.fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| e.to_string());
        self.abort.store(true, Ordering::SeqCst);
    }

    /// Publishes a step's outcome. Under `on_failure: abort` a failure stops every other
    /// domain here, before anyone hears of it.
    fn report(&self, step: &PlannedStep, status: StepStatus, message: String, earlier: bool) {
        // A rollout's failures abort only once they exceed its `max_errors` (see `turn`).
        if status.is_failure()
            && self.ex.settings.on_failure == OnFailure::Abort
            && step.rollout.is_none()
        {
            self.abort.store(true, Ordering::SeqCst);
        }
        let outcome = Outcome {
            step: step.step,
            step_id: step.step_id.clone(),
            vm: step.domain.name.clone(),
            uuid: step.domain.uuid.clone(),
            at: step.at,
            status,
            message,
            earlier,
        };
        (self.ex.on_outcome)(&outcome);
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(outcome);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hosts;
