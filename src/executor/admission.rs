//! Pacing: a step's `rollout` (at most `max_parallel` of its domains at once, in the reviewed
//! order, `pause` before a freed slot is reused, no new start once more than `max_errors`
//! failed) and virtplan.toml's per-host `max_parallel` (at most N steps at once on one
//! connection).
//!
//! A domain whose step may not start yet is *parked* here and its worker is freed: nothing
//! holds a thread while it waits. The scheduler calls [`Admission::pump`] after every change
//! (a finished turn, a freed slot, a timer); `pump` admits parked domains in order and hands
//! them back with a ticket, which their next turn redeems. All bookkeeping lives under one
//! lock: a few thousand domains cost microseconds per decision.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::lockfile::StepStatus;
use crate::plan_file::OnFailure;
use crate::planner::{Plan, PlannedStep};

/// `(step id, domain uuid)`.
type Key = (String, String);

/// What a domain arriving at a paced step may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arrival {
    /// Start now; its share is held until [`Admission::leave`].
    Go,
    /// Not now: the domain waits here, without a worker, until `pump` hands it back.
    Parked,
    /// The rollout's error budget is spent: recorded `skipped` with this reason.
    Skip(String),
    /// It came after its own deadline: run it through the ordinary path, which records it
    /// `missed`, and take no share.
    Late,
}

/// One rollout step's state.
struct RolloutState {
    step: usize,
    /// At most this many of its domains at once (`usize::MAX`: no own limit).
    max_parallel: usize,
    max_errors: usize,
    pause: Duration,
    on_failure: OnFailure,
    /// Position of each domain in the reviewed order, by uuid.
    positions: HashMap<String, usize>,
    /// Names in the reviewed order (for messages).
    names: Vec<String>,
    /// Admitted or passed by, per position.
    resolved: Vec<bool>,
    /// The first position not resolved yet: the only one that may be admitted next.
    front: usize,
    in_flight: usize,
    /// When each recently freed slot may be used again (`pause` after its domain ended).
    cooling: Vec<DateTime<Utc>>,
    /// Names of its failed domains, in the order they failed.
    failed: Vec<String>,
    /// Set once failures exceed `max_errors`: why no further domain starts.
    tripped: Option<String>,
    /// Most of its domains ever in flight at once.
    peak: usize,
}

impl RolloutState {
    fn resolve(&mut self, position: usize) {
        if let Some(r) = self.resolved.get_mut(position) {
            *r = true;
        }
        while self.resolved.get(self.front).copied().unwrap_or(false) {
            self.front += 1;
        }
    }

    /// Slots still cooling at `now` (expired ones are dropped).
    fn cooling_at(&mut self, now: DateTime<Utc>) -> usize {
        self.cooling.retain(|t| *t > now);
        self.cooling.len()
    }

    fn has_room(&mut self, now: DateTime<Utc>) -> bool {
        self.in_flight + self.cooling_at(now) < self.max_parallel
    }
}

/// One connection with a cap.
struct HostState {
    cap: usize,
    in_flight: usize,
    peak: usize,
}

/// A domain waiting for its share.
struct Parked {
    domain: usize,
    key: Key,
    step: usize,
    host: String,
    position: Option<usize>,
    /// Arrival order, for fairness among steps without a rollout.
    seq: u64,
    /// When it must be handed back even without a share (its start deadline), for steps
    /// without a rollout.
    deadline: Option<DateTime<Utc>>,
    /// The scheduler has seen the turn that parked it end ([`Admission::confirm`]): only then
    /// may `pump` hand it out, or it would run while its worker still holds it.
    confirmed: bool,
}

#[derive(Default)]
struct State {
    rollouts: HashMap<String, RolloutState>,
    hosts: HashMap<String, HostState>,
    parked: Vec<Parked>,
    /// Admitted while parked: redeemed by the domain's next turn.
    tickets: HashSet<Key>,
    /// Holding a share (admitted, not yet left).
    held: HashSet<Key>,
    /// When each rollout domain was admitted: its grace counts from then.
    dispatched: HashMap<Key, DateTime<Utc>>,
    seq: u64,
}

/// Rollout and host pacing for one run.
pub(super) struct Admission {
    state: Mutex<State>,
}

/// Most domains in flight at once, as the pacing itself counted them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Per rollout step number.
    pub rollouts: BTreeMap<usize, usize>,
    /// Per capped connection (redacted URI).
    pub hosts: BTreeMap<String, usize>,
}

fn key(step: &PlannedStep) -> Key {
    (step.step_id.clone(), step.domain.uuid.clone())
}

impl Admission {
    /// The pacing `plan` asks for: its steps' rollouts and its hosts' caps.
    pub(super) fn new(plan: &Plan, on_failure: OnFailure) -> Self {
        let mut state = State::default();
        let mut order: HashMap<&str, Vec<(usize, &str, &str)>> = HashMap::new();
        for s in &plan.steps {
            if let Some(r) = s.rollout {
                order.entry(s.step_id.as_str()).or_default().push((
                    r.position,
                    s.domain.uuid.as_str(),
                    s.domain.name.as_str(),
                ));
            }
        }
        for s in &plan.steps {
            let Some(r) = s.rollout else { continue };
            if state.rollouts.contains_key(&s.step_id) {
                continue;
            }
            let mut domains = order.remove(s.step_id.as_str()).unwrap_or_default();
            domains.sort_unstable();
            // Positions as the plan numbered them; a domain the plan left out (filtered)
            // never arrives, so positions are renumbered densely over those present.
            let positions = domains
                .iter()
                .enumerate()
                .map(|(i, (_, uuid, _))| ((*uuid).to_owned(), i))
                .collect();
            let names = domains.iter().map(|(_, _, n)| (*n).to_owned()).collect();
            state.rollouts.insert(
                s.step_id.clone(),
                RolloutState {
                    step: s.step,
                    // Without its own limit a rollout is as wide as `parallelism` lets it be,
                    // so `pause` still spaces its domains.
                    max_parallel: r.max_parallel.unwrap_or(plan.policy.parallelism).max(1),
                    max_errors: r.max_errors,
                    pause: r.spec.pause,
                    on_failure,
                    positions,
                    names,
                    resolved: vec![false; domains.len()],
                    front: 0,
                    in_flight: 0,
                    cooling: Vec::new(),
                    failed: Vec::new(),
                    tripped: None,
                    peak: 0,
                },
            );
        }
        for (uri, cap) in &plan.policy.host_caps {
            state.hosts.insert(
                uri.redacted(),
                HostState {
                    cap: (*cap).max(1),
                    in_flight: 0,
                    peak: 0,
                },
            );
        }
        Self {
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `step` is paced at all (a rollout, or a capped host).
    pub(super) fn gated(&self, step: &PlannedStep) -> bool {
        let state = self.lock();
        state.rollouts.contains_key(&step.step_id)
            || state.hosts.contains_key(&step.connection.redacted())
    }

    /// Why no further domain of `step`'s rollout starts, once its budget is spent.
    pub(super) fn tripped(&self, step: &PlannedStep) -> Option<String> {
        self.lock()
            .rollouts
            .get(&step.step_id)
            .and_then(|r| r.tripped.clone())
    }

    /// When the rollout admitted this domain: its grace counts from then, not from `at`.
    pub(super) fn dispatched(&self, step: &PlannedStep) -> Option<DateTime<Utc>> {
        self.lock().dispatched.get(&key(step)).copied()
    }

    /// A domain reaches `step` (due now). `late`: its start deadline passed already.
    /// `deadline`: when a step without a rollout must stop waiting for its host's cap.
    pub(super) fn arrive(
        &self,
        step: &PlannedStep,
        domain: usize,
        now: DateTime<Utc>,
        late: bool,
        deadline: Option<DateTime<Utc>>,
    ) -> Arrival {
        let mut state = self.lock();
        let k = key(step);
        state.parked.retain(|p| p.key != k);
        if state.tickets.remove(&k) {
            return Arrival::Go;
        }
        if !step.always {
            if let Some(reason) = state
                .rollouts
                .get(&step.step_id)
                .and_then(|r| r.tripped.clone())
            {
                return Arrival::Skip(reason);
            }
        }
        if late {
            return Arrival::Late;
        }
        let host = step.connection.redacted();
        let position = state
            .rollouts
            .get(&step.step_id)
            .and_then(|r| r.positions.get(&step.domain.uuid).copied());
        if state.admissible(&step.step_id, position, &host, now, false) {
            state.admit(&k, &host, position, now);
            return Arrival::Go;
        }
        state.seq += 1;
        let seq = state.seq;
        state.parked.push(Parked {
            domain,
            key: k,
            step: step.step,
            host,
            position,
            seq,
            deadline: if position.is_some() { None } else { deadline },
            confirmed: false,
        });
        Arrival::Parked
    }

    /// `step` ended for its domain with `status` (run, or passed by without a share: done
    /// before, skipped, cancelled, missed). Frees its share, counts a failure against the
    /// budget. Returns the reason when this failure spent the budget and the plan's
    /// `on_failure` is `abort`.
    pub(super) fn leave(
        &self,
        step: &PlannedStep,
        status: StepStatus,
        now: DateTime<Utc>,
    ) -> Option<String> {
        let mut state = self.lock();
        let k = key(step);
        let held = state.held.remove(&k);
        state.tickets.remove(&k);
        let host = step.connection.redacted();
        if held {
            if let Some(h) = state.hosts.get_mut(&host) {
                h.in_flight = h.in_flight.saturating_sub(1);
            }
        }
        let r = state.rollouts.get_mut(&step.step_id)?;
        if let Some(position) = r.positions.get(&step.domain.uuid).copied() {
            r.resolve(position);
        }
        if !held {
            return None;
        }
        r.in_flight = r.in_flight.saturating_sub(1);
        if !r.pause.is_zero() {
            let until = crate::clock::later(now, r.pause);
            r.cooling.push(until);
        }
        if status != StepStatus::Failed {
            return None;
        }
        r.failed.push(step.domain.name.clone());
        if r.tripped.is_some() || r.failed.len() <= r.max_errors {
            return None;
        }
        let left = r.resolved.iter().filter(|done| !**done).count();
        let reason = format!(
            "not started: the rollout of step {} stopped after {} of its {} domains failed ({}), more than max_errors {}; {}",
            r.step,
            r.failed.len(),
            r.names.len(),
            r.failed.join(", "),
            r.max_errors,
            match r.on_failure {
                OnFailure::SkipVm => format!(
                    "on_failure skip-vm: the {left} {} not started {} skipped, with their later steps",
                    if left == 1 { "domain" } else { "domains" },
                    if left == 1 { "is" } else { "are" }
                ),
                OnFailure::Abort => "on_failure abort: the plan is aborted".to_owned(),
            }
        );
        r.tripped = Some(reason.clone());
        (r.on_failure == OnFailure::Abort).then_some(reason)
    }

    /// The scheduler saw the turn of `domain` end parked: it may be handed out from now on.
    pub(super) fn confirm(&self, domain: usize) {
        let mut state = self.lock();
        for p in state.parked.iter_mut().filter(|p| p.domain == domain) {
            p.confirmed = true;
        }
    }

    /// Hands parked domains back (those whose parking the scheduler confirmed): those admitted now (with a ticket), those whose rollout
    /// stopped, those past their deadline, or all of them when `flush` (a signal or an abort).
    /// `stuck`: nothing else can free a share, so order is relaxed rather than waiting
    /// forever. Returns the domains to run and when to pump again at the latest.
    pub(super) fn pump(
        &self,
        now: DateTime<Utc>,
        flush: bool,
        stuck: bool,
    ) -> (Vec<usize>, Option<DateTime<Utc>>) {
        let mut state = self.lock();
        if state.parked.is_empty() {
            return (Vec::new(), None);
        }
        let mut parked = std::mem::take(&mut state.parked);
        // Rollout domains in their order, the rest in arrival order.
        parked.sort_by_key(|p| (p.step, p.position, p.seq));
        // A timer (a cooling slot, a deadline) will change things: not stuck.
        let stuck = stuck
            && parked.iter().all(|p| {
                p.deadline.is_none()
                    && state
                        .rollouts
                        .get_mut(&p.key.0)
                        .is_none_or(|r| r.cooling_at(now) == 0)
            });
        let mut out = Vec::new();
        let mut wake: Option<DateTime<Utc>> = None;
        let mut relaxed = false;
        for p in parked {
            if !p.confirmed {
                state.parked.push(p);
                continue;
            }
            let tripped = state
                .rollouts
                .get(&p.key.0)
                .is_some_and(|r| r.tripped.is_some());
            let past = p.deadline.is_some_and(|d| now >= d);
            if flush || tripped || past {
                out.push(p.domain);
                continue;
            }
            let relax = stuck && !relaxed && out.is_empty();
            if state.admissible(&p.key.0, p.position, &p.host, now, relax) {
                relaxed |= relax;
                state.admit(&p.key, &p.host, p.position, now);
                state.tickets.insert(p.key.clone());
                out.push(p.domain);
                continue;
            }
            if let Some(d) = p.deadline {
                wake = Some(wake.map_or(d, |w| w.min(d)));
            }
            if let Some(t) = state
                .rollouts
                .get(&p.key.0)
                .and_then(|r| r.cooling.iter().min().copied())
            {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            state.parked.push(p);
        }
        (out, wake)
    }

    /// The most domains each rollout and each capped host had in flight at once.
    pub(super) fn peaks(&self) -> Peaks {
        let state = self.lock();
        Peaks {
            rollouts: state.rollouts.values().map(|r| (r.step, r.peak)).collect(),
            hosts: state
                .hosts
                .iter()
                .map(|(h, s)| (h.clone(), s.peak))
                .collect(),
        }
    }
}

impl State {
    /// Whether a domain (at `position` of its step's rollout, on `host`) may start now.
    /// `relax`: ignore the rollout's order (and cooling), never its cap.
    fn admissible(
        &mut self,
        step_id: &str,
        position: Option<usize>,
        host: &str,
        now: DateTime<Utc>,
        relax: bool,
    ) -> bool {
        if let Some(h) = self.hosts.get(host) {
            if h.in_flight >= h.cap {
                return false;
            }
        }
        let Some(r) = self.rollouts.get_mut(step_id) else {
            return true;
        };
        if relax {
            return r.in_flight < r.max_parallel;
        }
        position.is_none_or(|p| p == r.front) && r.has_room(now)
    }

    fn admit(&mut self, k: &Key, host: &str, position: Option<usize>, now: DateTime<Utc>) {
        self.held.insert(k.clone());
        if let Some(h) = self.hosts.get_mut(host) {
            h.in_flight += 1;
            h.peak = h.peak.max(h.in_flight);
        }
        if let Some(r) = self.rollouts.get_mut(&k.0) {
            if let Some(p) = position {
                r.resolve(p);
            }
            r.in_flight += 1;
            r.peak = r.peak.max(r.in_flight);
            // A slot that cooled is consumed by this start.
            r.cooling_at(now);
            self.dispatched.insert(k.clone(), now);
        }
    }
}
