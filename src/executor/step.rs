//! One step on one domain: wait for its time, record it `running`, check the live state
//! against the reviewed one, apply its actions with error classification and retries, read
//! the result back and verify it, record the outcome.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::leasing::Taking;
use super::{Next, Run};
use crate::attr::Attr;
use crate::cancel::Gate;
use crate::hypervisor::SETTLE_LIMIT;
use crate::hypervisor::{domain_xml, ErrorKind, HvError, HvResult, Hypervisor, Scope};
use crate::lockfile::{Figures, StepStatus};
use crate::plan_file::units::format_duration;
use crate::plan_file::{ClockOffset, RtcTrack, ShutdownMode, ShutdownPolicy};
use crate::planner::{Action, PlannedStep};
use crate::state::DomainState;
use crate::uri::Uri;

/// How a step ended, as far as the domain's later steps care.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ended {
    pub status: StepStatus,
    /// The domain no longer exists.
    pub gone: bool,
}

impl Ended {
    pub(super) fn with(status: StepStatus) -> Self {
        Self {
            status,
            gone: false,
        }
    }
}

/// A step failure with what the operator needs to know.
#[derive(Debug)]
struct StepError {
    message: String,
    gone: bool,
}

impl StepError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            gone: false,
        }
    }
}

impl From<HvError> for StepError {
    fn from(e: HvError) -> Self {
        let kind = match e.kind {
            ErrorKind::NotFound => "domain not found",
            ErrorKind::OperationInvalid => "operation invalid",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Transient => "connection failure, retries exhausted",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Other => "libvirt error",
        };
        Self {
            message: format!("{kind}: {}", e.message),
            gone: e.kind == ErrorKind::NotFound,
        }
    }
}

/// Whether the live state already shows what `action` does.
fn satisfied(action: &Action, s: &DomainState) -> bool {
    use crate::state::PowerState;
    match action {
        Action::PowerOff { .. } => !s.power.is_active(),
        Action::Suspend => s.power == PowerState::Paused,
        Action::Start => s.power.is_active(),
        Action::Resume => s.power == PowerState::Running,
        Action::SetMaxMemory { max } => s.max_memory == *max,
        Action::SetMemory { memory, .. } => s.memory == *memory,
        Action::SetMaxVcpus { max } => s.max_vcpus == *max,
        Action::SetVcpus { vcpus, .. } => s.vcpus == *vcpus,
        Action::SetClock { clock } => s.clock.as_ref().is_some_and(|c| {
            clock
                .offset
                .is_none_or(|o| c.offset.as_deref() == Some(o.as_str()))
                && clock
                    .track
                    .is_none_or(|t| c.rtc_track.as_deref() == Some(t.as_str()))
        }),
        Action::SetAutostart { on } => s.autostart == *on,
        Action::SetLifecycle { event, action } => {
            s.lifecycle.is_some_and(|l| l.get(*event) == *action)
        }
        Action::SetTitle { title } => s.title == *title,
        Action::SetDescription { description } => s.description == *description,
        // Setting the guest's time again is harmless; a snapshot is checked by name.
        Action::Snapshot { .. } | Action::SyncGuestTime => false,
    }
}

pub(super) fn show_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// How a step is applied.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// An interrupted run had started it: actions already made are not repeated.
    resuming: bool,
    /// A resumed reboot that had finished (the domain runs under a new id): the reboot's
    /// shutdown and start are not repeated.
    rebooted: bool,
    /// An `always` step after an earlier failure, skip, miss or abort: the live state is what
    /// it is, so no drift check, and actions already satisfied are not called.
    after_failure: bool,
}

impl Run<'_> {
    /// Runs `step`, whose lockfile status is `recorded`, and records how it ended.
    /// `after_failure`: an `always` step that runs although an earlier step did not succeed.
    /// `Err`: its domain's lease is being taken (`taking` says how far); hand the domain back
    /// to the scheduler, and call again with the same `taking` when it comes back.
    pub(super) fn step(
        &self,
        step: &PlannedStep,
        recorded: StepStatus,
        after_failure: bool,
        taking: &mut Option<Taking>,
    ) -> Result<Ended, Next> {
        let resuming = recorded == StepStatus::Running;
        let mut pending = if let Some(pending) = taking.take() {
            pending
        } else {
            if !self.ex.connections.contains_key(&step.connection) {
                let message = format!("no open connection to {}", step.connection);
                return Ok(self.end(step, StepStatus::Failed, message, None, None));
            }
            let Some(now) = self.start_time(step, resuming) else {
                self.cancel(step);
                return Ok(Ended::with(StepStatus::Cancelled));
            };
            // A step too late to start is recorded missed without its lease; one that may
            // start takes it over the domain's next turns.
            let leased = resuming || self.late(step, now).is_none();
            if self.ex.settings.lease.is_none() || !leased {
                return Ok(self.act(step, now, resuming, after_failure));
            }
            let due = self.due(step).filter(|_| !resuming);
            self.taking(step, now, due, after_failure)
        };
        let ended = self.leased(step, &mut pending, |now, after_failure| {
            self.act(step, now, resuming, after_failure)
        });
        if ended.is_err() {
            *taking = Some(pending);
        }
        ended
    }

    /// Resumes, records missed, or applies `step` at `now`.
    fn act(
        &self,
        step: &PlannedStep,
        now: DateTime<Utc>,
        resuming: bool,
        after_failure: bool,
    ) -> Ended {
        let late = self.late(step, now);
        if resuming {
            return self.resume(step, now, late, after_failure);
        }
        // An operator's cancel is checked last thing before the start, and none can land
        // until the step is recorded `running` (the gate is dropped in `apply`).
        let gate = match self.ex.store_cancels().gate(&step.step_id) {
            Ok((_, Some(record))) => {
                let zone = self
                    .ex
                    .plan
                    .meta
                    .timezone
                    .as_deref()
                    .and_then(|z| z.parse().ok());
                let message = format!("not run: {}", record.describe(zone));
                return self.end(step, StepStatus::Cancelled, message, None, None);
            }
            Ok((gate, None)) => gate,
            Err(e) => {
                let message = format!("not started: operator cancellations cannot be checked: {e}");
                return self.end(step, StepStatus::Failed, message, None, None);
            }
        };
        if let Some(reason) = late {
            return self.end(
                step,
                StepStatus::Missed,
                format!("missed, not run: {reason}"),
                None,
                None,
            );
        }
        let mode = Mode {
            after_failure,
            ..Mode::default()
        };
        self.apply(step, now, mode, Some(gate), None)
    }

    /// Whether `step` must not start: a signal stops everything; an abort stops every step
    /// but an `always` one.
    pub(super) fn stopping_for(&self, step: &PlannedStep) -> bool {
        if step.always {
            self.ex.stop.load(std::sync::atomic::Ordering::SeqCst)
        } else {
            self.stopping()
        }
    }

    /// When `step` may start: its `at`; a step without one runs when apply starts, but never
    /// before the window opens.
    pub(super) fn due(&self, step: &PlannedStep) -> Option<DateTime<Utc>> {
        step.at.or_else(|| self.ex.settings.window.map(|w| w.start))
    }

    /// Waits until the step is due; `None` when stopped meanwhile. The time returned is read
    /// after the wait, and is never before the step's [`Run::due`] time. (A worker runs one
    /// step at a time and there are at most `parallelism` workers, so no slot is waited for.)
    fn start_time(&self, step: &PlannedStep, resuming: bool) -> Option<DateTime<Utc>> {
        let due = self.due(step);
        loop {
            if let (Some(due), false) = (due, resuming) {
                self.wait_until(step, due)?;
            }
            if self.stopping_for(step) {
                return None;
            }
            let now = self.ex.clock.now();
            // The wall clock may have been stepped back since the wait ended.
            if resuming || due.is_none_or(|due| now >= due) {
                return Some(now);
            }
        }
    }

    /// Sleeps in slices of at most a second, re-reading the clock after every wake-up, so a
    /// clock jump or a suspended host can make a step neither early nor silently late.
    fn wait_until(&self, step: &PlannedStep, at: DateTime<Utc>) -> Option<()> {
        const SLICE: Duration = Duration::from_secs(1);
        loop {
            if self.stopping_for(step) {
                return None;
            }
            let now = self.ex.clock.now();
            if now >= at {
                return Some(());
            }
            let left = (at - now).to_std().unwrap_or(Duration::ZERO);
            self.ex.clock.sleep(left.min(SLICE));
        }
    }

    /// When `step`'s grace starts: its `at`, or for a domain a rollout dispatched later, the
    /// moment it was dispatched (waiting for its turn in the rollout is not being late).
    pub(super) fn effective_at(&self, step: &PlannedStep) -> Option<DateTime<Utc>> {
        let at = step.at?;
        Some(
            self.admission
                .dispatched(step)
                .map_or(at, |dispatched| dispatched.max(at)),
        )
    }

    /// Why a step starting at `now` would be too late, if it would.
    pub(super) fn late(&self, step: &PlannedStep, now: DateTime<Utc>) -> Option<String> {
        let settings = self.ex.settings;
        if let Some(w) = settings.window {
            if now >= w.end {
                return Some(format!(
                    "the maintenance window closed at {} (now {})",
                    show_time(w.end),
                    show_time(now)
                ));
            }
        }
        let at = self.effective_at(step)?;
        let deadline = crate::clock::later(at, settings.grace);
        (now > deadline).then(|| {
            format!(
                "due at {}, it could not start by {} (grace {}; now {})",
                show_time(at),
                show_time(deadline),
                format_duration(settings.grace),
                show_time(now)
            )
        })
    }

    /// Why no change of `step` may be sent now: its start deadline (`at + grace`, the
    /// window's end) has passed. A resumed reboot is exempt: an interrupted run shut the
    /// domain down, and finishing it beats leaving the domain off.
    fn too_late_to_change(&self, step: &PlannedStep, resuming: bool) -> Option<String> {
        if resuming && step.reboot {
            return None;
        }
        self.late(step, self.ex.clock.now())
    }

    /// A step recorded `running` by an interrupted run: never blindly repeated.
    fn resume(
        &self,
        step: &PlannedStep,
        now: DateTime<Utc>,
        late: Option<String>,
        after_failure: bool,
    ) -> Ended {
        // A domain caught between two states (QEMU starting with its CPUs held, a shutdown in
        // progress, a job in flight) would be misjudged: "paused" while QEMU starts is not the
        // paused a step asked for. Wait, bounded, until it settles.
        let settled = self.retry(&step.connection, |hv| {
            crate::hypervisor::wait_settled(hv, &step.domain.uuid, self.ex.clock, SETTLE_LIMIT)
        });
        match settled {
            Ok(None) => {}
            Ok(Some(reason)) => {
                return self.end(
                    step,
                    StepStatus::Failed,
                    format!(
                        "an interrupted run had started this step and the domain is still {reason} after {}; nothing was judged or called: run `virtplan apply` again once it settles",
                        format_duration(SETTLE_LIMIT)
                    ),
                    None,
                    None,
                )
            }
            Err(e) => return self.fail(step, e.into(), None),
        }
        let live = match self.observe(step) {
            Ok(live) => live,
            Err(e) => return self.fail(step, e, None),
        };
        let mut mode = Mode {
            resuming: true,
            rebooted: false,
            after_failure,
        };
        if step.reboot {
            // A reboot is an action: the state alone cannot say whether it happened.
            let from = self
                .ex
                .store
                .record(&step.step_id, &step.domain.uuid)
                .and_then(|r| r.reboot_from);
            let id = match self.retry(&step.connection, |hv| hv.run_id(&step.domain.uuid)) {
                Ok(id) => id,
                Err(e) => return self.fail(step, e.into(), Some(&live)),
            };
            match (live.power.is_active(), from, id) {
                // Shut down by the interrupted run: finish the reboot, late or not, rather
                // than leave the domain off.
                (false, _, _) => return self.apply(step, now, mode, None, Some(live)),
                (true, Some(from), Some(id)) if from != id => mode.rebooted = true,
                // Still under the id it had: the reboot did not happen yet.
                _ => {
                    if let Some(reason) = late {
                        return self.end(
                            step,
                            StepStatus::Failed,
                            format!("an interrupted run had started this reboot and the domain has not rebooted (domain id unchanged); not re-applied because {reason}"),
                            None,
                            Some(&live),
                        );
                    }
                    return self.apply(step, now, mode, None, Some(live));
                }
            }
        }
        let missing = match self.mismatches(step, &live, &step.after) {
            Ok(m) => m,
            Err(e) => return self.fail(step, e, Some(&live)),
        };
        if missing.is_empty() && step.check.is_none() {
            let message = if mode.rebooted {
                "an interrupted run had rebooted the domain (it runs under a new domain id); not rebooted again".to_owned()
            } else {
                "an interrupted run had started this step; the domain is at its target, so nothing was called again".to_owned()
            };
            return self.end(step, StepStatus::Done, message, None, Some(&live));
        }
        if let Some(reason) = late.filter(|_| !missing.is_empty()) {
            return self.end(
                step,
                StepStatus::Failed,
                format!(
                    "an interrupted run had started this step and it is not at its target ({}); not re-applied because {reason}",
                    missing.join("; ")
                ),
                None,
                Some(&live),
            );
        }
        self.apply(step, now, mode, None, Some(live))
    }

    /// Records `running`, checks for drift, runs the actions, verifies, runs the check,
    /// records the result. `gate` (held by a fresh start, `None` when resuming) keeps an
    /// operator's cancel out until `running` is on disk.
    // One sequence, in the order the lockfile promises; splitting it would scatter the order.
    #[allow(clippy::too_many_lines)]
    fn apply(
        &self,
        step: &PlannedStep,
        now: DateTime<Utc>,
        mode: Mode,
        gate: Option<Gate>,
        read: Option<DomainState>,
    ) -> Ended {
        let resuming = mode.resuming;
        let write = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
            r.status = StepStatus::Running;
            if !resuming || r.started_at.is_none() {
                r.started_at = Some(now);
            }
            r.finished_at = None;
            r.message = if resuming {
                format!("resumed at {} after an interrupted run", show_time(now))
            } else {
                String::new()
            };
        });
        drop(gate);
        if let Err(e) = write {
            // Nothing may touch libvirt that could not be recorded first.
            self.fail_hard(&e);
            let message = format!("not started: {e}");
            self.report(step, StepStatus::Cancelled, message, false);
            return Ended::with(StepStatus::Cancelled);
        }
        self.failpoint("after-running", step);

        // A resumed step was just read to decide whether to resume it: not read again.
        let before = match read.map_or_else(|| self.observe(step), Ok) {
            Ok(s) => s,
            // The host went away before anything was sent: nothing changed, the step missed.
            Err(e) if !resuming && self.host_down(&step.connection).is_some() => {
                let message = format!("missed, nothing was changed: {}", e.message);
                return self.end(step, StepStatus::Missed, message, None, None);
            }
            Err(e) => return self.fail(step, e, None),
        };
        if !resuming && !mode.after_failure {
            let drift = self.drift(step, &before);
            if !drift.is_empty() {
                let message = format!(
                    "refused: the domain drifted from the reviewed state: {}; nothing was changed; run `virtplan plan` to review the current state",
                    drift.join("; ")
                );
                return self.end(
                    step,
                    StepStatus::Failed,
                    message,
                    Some(&before),
                    Some(&before),
                );
            }
        }
        let mut notes = Vec::new();
        if mode.after_failure {
            notes.push("always: run although an earlier step did not succeed".to_owned());
        }
        let reboot_from = match self.reboot_from(step, &before, mode) {
            Ok(id) => id,
            Err(ended) => return ended,
        };
        let mut sent = 0;
        for action in &step.actions {
            let reboot_half = matches!(action, Action::PowerOff { .. } | Action::Start);
            if step.reboot && mode.rebooted && reboot_half {
                continue;
            }
            // A daemon that hung on the reads above may have held the step past its deadline:
            // no change is sent late (only a reboot an interrupted run began is finished).
            if let Some(reason) = self.too_late_to_change(step, resuming) {
                if sent == 0 {
                    return self.end(
                        step,
                        StepStatus::Missed,
                        format!(
                            "missed, nothing was changed: libvirt answered too late ({reason})"
                        ),
                        Some(&before),
                        Some(&before),
                    );
                }
                let e = StepError::new(format!(
                    "stopped partway: libvirt answered too late ({reason}); the remaining actions were not sent"
                ));
                let after = self.observe(step).ok();
                return self.fail_with(step, e, &notes, Some(&before), after.as_ref());
            }
            sent += 1;
            if let Err(e) = self.action(step, action, resuming || mode.after_failure, &mut notes) {
                let after = self.observe(step).ok();
                return self.fail_with(step, e, &notes, Some(&before), after.as_ref());
            }
            if reboot_half && step.reboot {
                self.failpoint("mid-reboot", step);
            }
        }
        self.failpoint("before-done", step);

        // A step with nothing to do changes nothing: the state read before it is its result.
        let read_after = if step.actions.is_empty() && reboot_from.is_none() {
            Ok(before.clone())
        } else {
            self.observe(step)
                .and_then(|after| self.settle_live(step, after))
        };
        let after = match read_after {
            Ok(s) => s,
            Err(e) => return self.fail_with(step, e, &notes, Some(&before), None),
        };
        let mut missing = match self.mismatches(step, &after, &step.after) {
            Ok(m) => m,
            Err(e) => return self.fail_with(step, e, &notes, Some(&before), Some(&after)),
        };
        if let Some(from) = reboot_from {
            match self.retry(&step.connection, |hv| hv.run_id(&step.domain.uuid)) {
                Ok(Some(id)) if id != from => {
                    notes.push(format!("rebooted: domain id {from} → {id}"));
                }
                Ok(id) => missing.push(format!(
                    "the domain did not reboot: domain id {from} before, {} now",
                    id.map_or_else(|| "none".to_owned(), |i| i.to_string())
                )),
                Err(e) => {
                    return self.fail_with(step, e.into(), &notes, Some(&before), Some(&after))
                }
            }
        }
        if !missing.is_empty() {
            let e = StepError::new(format!(
                "did not reach its desired state: {}",
                missing.join("; ")
            ));
            return self.fail_with(step, e, &notes, Some(&before), Some(&after));
        }
        notes.extend(live_warnings(step, &after));
        if step.actions.is_empty() && notes.is_empty() {
            notes.push("already as asked: nothing to change".to_owned());
        }
        if let Some(check) = &step.check {
            let verdict = self.gate(step, check, &notes);
            notes.push(verdict.message);
            if !verdict.passed {
                let message = notes.join("; ");
                return self.end(
                    step,
                    StepStatus::Failed,
                    message,
                    Some(&before),
                    Some(&after),
                );
            }
        }
        let message = notes.join("; ");
        self.end(step, StepStatus::Done, message, Some(&before), Some(&after))
    }

    /// A running guest follows a live memory or vCPU change at its own pace: its balloon
    /// driver inflates or deflates page by page (a 64 MiB cut takes about a second under TCG).
    /// Reading the live figures at once would call a guest that is still ballooning one without
    /// a balloon driver; so while they differ from the targets, read them again every poll as
    /// long as they keep moving, for at most [`LIVE_SETTLE`], giving up after [`LIVE_STALL`]
    /// without any movement (a guest without a driver never moves).
    fn settle_live(
        &self,
        step: &PlannedStep,
        mut after: DomainState,
    ) -> Result<DomainState, StepError> {
        let clock = self.ex.clock;
        let started = clock.now();
        let mut moved = started;
        while !live_warnings(step, &after).is_empty() {
            let now = clock.now();
            if now - started >= LIVE_SETTLE || now - moved >= LIVE_STALL {
                break;
            }
            clock.sleep(self.ex.settings.poll);
            let next = self.observe(step)?;
            if next.live != after.live {
                moved = clock.now();
            }
            after = next;
        }
        Ok(after)
    }

    /// For a reboot of a running domain: the id it runs under before the reboot, recorded
    /// durably before the shutdown request (or, resumed, as the interrupted run recorded it).
    fn reboot_from(
        &self,
        step: &PlannedStep,
        before: &DomainState,
        mode: Mode,
    ) -> Result<Option<u32>, Ended> {
        if !step.reboot {
            return Ok(None);
        }
        let recorded = self
            .ex
            .store
            .record(&step.step_id, &step.domain.uuid)
            .and_then(|r| r.reboot_from);
        if mode.resuming && (recorded.is_some() || !before.power.is_active()) {
            return Ok(recorded);
        }
        if !before.power.is_active() {
            return Ok(None);
        }
        let id = self
            .retry(&step.connection, |hv| hv.run_id(&step.domain.uuid))
            .map_err(|e| self.fail(step, e.into(), Some(before)))?;
        let write = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
            r.reboot_from = id;
        });
        if let Err(e) = write {
            self.fail_hard(&e);
            let message = format!("not rebooted: {e}");
            self.report(step, StepStatus::Cancelled, message, false);
            return Err(Ended::with(StepStatus::Cancelled));
        }
        Ok(id)
    }

    /// Runs the step's check, recording each attempt in the lockfile message as it goes.
    fn gate(
        &self,
        step: &PlannedStep,
        check: &crate::plan_file::CheckSpec,
        notes: &[String],
    ) -> super::gate::Verdict {
        let done_so_far = notes.join("; ");
        let progress = |text: &str| {
            let message = if done_so_far.is_empty() {
                text.to_owned()
            } else {
                format!("{done_so_far}; {text}")
            };
            if let Err(e) = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
                r.message = message;
            }) {
                self.fail_hard(&e);
            }
        };
        let stopping = || self.ex.stop.load(std::sync::atomic::Ordering::SeqCst);
        let hv = || self.connection(&step.connection).ok();
        super::gate::Gate {
            step,
            check,
            clock: self.ex.clock,
            progress: &progress,
            stopping: &stopping,
        }
        .run(&hv)
    }

    /// Test-only crash switch (`VIRTPLAN_FAILPOINT`).
    fn failpoint(&self, point: &str, step: &PlannedStep) {
        if self.ex.settings.failpoint.as_deref().is_some_and(|f| {
            f.strip_prefix(point).and_then(|r| r.strip_prefix(':')) == Some(step.step_id.as_str())
        }) {
            std::process::abort();
        }
    }

    fn touched(&self, step: &PlannedStep) -> &[Attr] {
        self.touched
            .get(&(step.step_id.clone(), step.domain.uuid.clone()))
            .map_or(&[], Vec::as_slice)
    }

    /// The figures a step depends on: what it changes, and what those changes depend on.
    fn figs(&self, step: &PlannedStep) -> Vec<Attr> {
        let mut figs: Vec<Attr> = self
            .touched(step)
            .iter()
            .flat_map(|a| a.depends_on().iter().copied())
            .collect();
        figs.sort();
        figs.dedup();
        figs
    }

    /// Differences between the live state and the reviewed before-state, on what the step touches.
    fn drift(&self, step: &PlannedStep, live: &DomainState) -> Vec<String> {
        self.figs(step)
            .into_iter()
            .filter_map(|f| match (f.figure(&step.before), f.figure(live)) {
                (Some(planned), Some(now)) if planned != now => {
                    Some(format!("{f} was {planned} when planned, is {now} now"))
                }
                _ => None,
            })
            .collect()
    }

    /// Differences between `state` and `target` on what the step touches, snapshots included.
    fn mismatches(
        &self,
        step: &PlannedStep,
        state: &DomainState,
        target: &DomainState,
    ) -> Result<Vec<String>, StepError> {
        let mut out: Vec<String> = self
            .figs(step)
            .into_iter()
            .filter_map(|f| match (f.figure(target), f.figure(state)) {
                (Some(want), Some(is)) if want != is => {
                    Some(format!("{f} is {is}, expected {want}"))
                }
                _ => None,
            })
            .collect();
        for action in &step.actions {
            if let Action::Snapshot { spec } = action {
                let names =
                    self.retry(&step.connection, |hv| hv.snapshot_names(&step.domain.uuid))?;
                if !names.contains(&spec.name) {
                    out.push(format!("snapshot {:?} does not exist", spec.name));
                }
            }
        }
        Ok(out)
    }

    /// Reads the domain, with its clock when the step touches it, retrying transient failures.
    fn observe(&self, step: &PlannedStep) -> Result<DomainState, StepError> {
        let with_clock = self.touched(step).iter().any(|a| a.needs_xml());
        Ok(self.retry(&step.connection, |hv| {
            hv.observe(&step.domain.uuid, with_clock)
        })?)
    }

    /// Calls `f`, retrying transient failures a bounded number of times with backoff. Every
    /// call addresses the domain by UUID, so a retry finds the same domain or none.
    pub(super) fn retry<T>(
        &self,
        uri: &Uri,
        f: impl Fn(&dyn Hypervisor) -> HvResult<T>,
    ) -> HvResult<T> {
        let settings = self.ex.settings;
        let mut wait = settings.backoff;
        let mut attempt = 0;
        loop {
            let hv = self.connection(uri)?;
            match f(hv.as_ref()) {
                Err(e) if e.kind == ErrorKind::Transient && attempt < settings.retries => {
                    attempt += 1;
                    self.ex.clock.sleep(wait);
                    wait = wait.saturating_mul(2);
                    self.reconnect(uri, &hv);
                }
                // Which host was lost, when the connection could not be reopened.
                Err(mut e) if e.kind == ErrorKind::Transient => {
                    if let Some(why) = self.host_down(uri) {
                        e.message = format!("{}; {why}", e.message);
                    }
                    return Err(e);
                }
                result => return result,
            }
        }
    }

    /// Runs one libvirt change for `action`: skipped when a resumed step finds it done,
    /// retried when transient, accepted when libvirt calls it invalid but the state is there.
    fn call(
        &self,
        step: &PlannedStep,
        action: &Action,
        resuming: bool,
        f: impl Fn(&dyn Hypervisor) -> HvResult<()>,
    ) -> Result<(), StepError> {
        if resuming && satisfied(action, &self.observe(step)?) {
            return Ok(());
        }
        // Every retry is a new change: sent only while the step's deadline holds.
        let first = std::cell::Cell::new(true);
        let attempt = |hv: &dyn Hypervisor| {
            if !first.replace(false) {
                if let Some(reason) = self.too_late_to_change(step, resuming) {
                    return Err(HvError::new(
                        ErrorKind::Other,
                        format!("not retried: {reason}"),
                    ));
                }
            }
            f(hv)
        };
        match self.retry(&step.connection, attempt) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == ErrorKind::OperationInvalid => {
                if satisfied(action, &self.observe(step)?) {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn action(
        &self,
        step: &PlannedStep,
        action: &Action,
        resuming: bool,
        notes: &mut Vec<String>,
    ) -> Result<(), StepError> {
        let uuid = step.domain.uuid.as_str();
        let scope = |planned_live: bool| -> Result<Scope, StepError> {
            // A resumed step asks libvirt, since the interrupted run may have changed power.
            let live = if resuming {
                self.observe(step)?.power.is_active()
            } else {
                planned_live
            };
            Ok(if live { Scope::BOTH } else { Scope::CONFIG })
        };
        match action {
            Action::PowerOff { policy } => self.power_off(step, *policy, resuming, notes),
            Action::Suspend => self.call(step, action, resuming, |hv| hv.suspend(uuid)),
            Action::Resume => self.call(step, action, resuming, |hv| hv.resume(uuid)),
            Action::Start => self.call(step, action, resuming, |hv| hv.start(uuid)),
            Action::Snapshot { spec } => {
                let names = self.retry(&step.connection, |hv| hv.snapshot_names(uuid))?;
                if names.contains(&spec.name) {
                    notes.push(format!("snapshot {:?} exists already", spec.name));
                    return Ok(());
                }
                self.call(step, action, false, |hv| {
                    hv.create_snapshot(uuid, &spec.name, spec.description.as_deref())
                })
            }
            Action::SetMaxMemory { max } => {
                self.call(step, action, resuming, |hv| hv.set_max_memory(uuid, *max))
            }
            Action::SetMemory { memory, live } => {
                let scope = scope(*live)?;
                self.call(step, action, resuming, |hv| {
                    hv.set_memory(uuid, *memory, scope)
                })
            }
            Action::SetMaxVcpus { max } => {
                self.call(step, action, resuming, |hv| hv.set_max_vcpus(uuid, *max))
            }
            Action::SetVcpus { vcpus, live } => {
                let scope = scope(*live)?;
                self.call(step, action, resuming, |hv| {
                    hv.set_vcpus(uuid, *vcpus, scope)
                })
            }
            Action::SetClock { clock } => self.call(step, action, resuming, |hv| {
                let xml = hv.domain_xml(uuid, true)?;
                let edited = domain_xml::set_clock(
                    &xml,
                    clock.offset.map(ClockOffset::as_str),
                    clock.track.map(RtcTrack::as_str),
                )
                .map_err(|e| HvError::new(ErrorKind::Other, e.to_string()))?;
                hv.define_xml(&edited)
            }),
            Action::SetLifecycle { event, action: to } => self.call(step, action, resuming, |hv| {
                hv.set_lifecycle(uuid, *event, *to)
            }),
            Action::SetAutostart { on } => {
                self.call(step, action, resuming, |hv| hv.set_autostart(uuid, *on))
            }
            Action::SetTitle { title } => {
                self.call(step, action, resuming, |hv| hv.set_title(uuid, title))
            }
            Action::SetDescription { description } => self.call(step, action, resuming, |hv| {
                hv.set_description(uuid, description)
            }),
            Action::SyncGuestTime => self.sync_guest_time(step, notes),
        }
    }

    /// `clock: {sync: true}`: waits (up to the check's timeout, else 2 minutes) for the
    /// freshly booted guest's agent to answer, then sets the guest's clock from the host.
    fn sync_guest_time(
        &self,
        step: &PlannedStep,
        notes: &mut Vec<String>,
    ) -> Result<(), StepError> {
        let uuid = step.domain.uuid.as_str();
        let clock = self.ex.clock;
        let limit = step
            .check
            .as_ref()
            .map_or(Duration::from_secs(120), |c| c.timeout);
        let deadline = crate::clock::later(clock.now(), limit);
        loop {
            let hv = self.connection(&step.connection)?;
            let answered = hv.agent_ping(uuid, Duration::from_secs(2));
            match answered {
                Ok(()) => break,
                Err(e) if clock.now() >= deadline || self.stopping() => {
                    return Err(StepError::new(format!(
                        "clock sync: the guest agent did not answer within {}: {}",
                        format_duration(limit),
                        e.message
                    )));
                }
                Err(_) => clock.sleep(Duration::from_secs(1)),
            }
        }
        let now = clock.now();
        self.retry(&step.connection, |hv| hv.set_guest_time(uuid, now))?;
        notes.push(format!("guest time set from the host ({})", show_time(now)));
        Ok(())
    }

    /// Graceful shutdown, polled through the clock until shut off or the timeout, then
    /// destroy when the policy allows it; `force` destroys at once.
    fn power_off(
        &self,
        step: &PlannedStep,
        policy: ShutdownPolicy,
        resuming: bool,
        notes: &mut Vec<String>,
    ) -> Result<(), StepError> {
        let uuid = step.domain.uuid.as_str();
        let action = Action::PowerOff { policy };
        if resuming && satisfied(&action, &self.observe(step)?) {
            return Ok(());
        }
        if policy.mode == ShutdownMode::Force {
            notes.push("forced off (destroy)".to_owned());
            return self.call(step, &action, false, |hv| hv.destroy(uuid));
        }
        let clock = self.ex.clock;
        // The timeout counts from the request, however long libvirt takes to deliver it.
        let deadline = crate::clock::later(clock.now(), policy.timeout);
        // The ladder: the guest agent when the domain has a channel, else (or when the agent
        // does not take the request) ACPI.
        let agent = self.retry(&step.connection, |hv| hv.has_agent_channel(uuid))?;
        let mut by = "ACPI";
        if agent {
            match self.retry(&step.connection, |hv| hv.agent_shutdown(uuid)) {
                Ok(()) => by = "the guest agent",
                Err(e) if e.kind == ErrorKind::OperationInvalid => by = "the guest agent",
                Err(e) => notes.push(format!(
                    "the guest agent did not take the shutdown request ({}): sent ACPI",
                    e.message
                )),
            }
        }
        if by == "ACPI" {
            match self.retry(&step.connection, |hv| hv.shutdown(uuid)) {
                Ok(()) => {}
                // Already shutting down or off: wait for it like for our own request.
                Err(e) if e.kind == ErrorKind::OperationInvalid => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut power = self.observe(step)?.power;
        loop {
            if !power.is_active() {
                notes.push(format!("shut down gracefully (through {by})"));
                return Ok(());
            }
            let now = clock.now();
            if now >= deadline {
                break;
            }
            let left = (deadline - now).to_std().unwrap_or(Duration::ZERO);
            clock.sleep(left.min(self.ex.settings.poll));
            power = self.observe(step)?.power;
        }
        if !policy.force_after_timeout {
            return Err(StepError::new(format!(
                "{} did not shut down within {} and force_after_timeout is false: it is still {power}; shut it down by hand or allow forcing",
                step.domain.name,
                format_duration(policy.timeout)
            )));
        }
        notes.push(format!(
            "the guest ignored the shutdown request for {}: forced off (destroy)",
            format_duration(policy.timeout)
        ));
        self.call(step, &action, false, |hv| hv.destroy(uuid))
    }

    fn fail(&self, step: &PlannedStep, e: StepError, before: Option<&DomainState>) -> Ended {
        self.fail_with(step, e, &[], before, None)
    }

    fn fail_with(
        &self,
        step: &PlannedStep,
        e: StepError,
        notes: &[String],
        before: Option<&DomainState>,
        after: Option<&DomainState>,
    ) -> Ended {
        let mut message = e.message;
        if !notes.is_empty() {
            message = format!("{message} (after: {})", notes.join("; "));
        }
        let mut ended = self.end(step, StepStatus::Failed, message, before, after);
        ended.gone = e.gone;
        ended
    }

    /// Records the step's final status with the observed figures, and reports it.
    pub(super) fn end(
        &self,
        step: &PlannedStep,
        status: StepStatus,
        message: String,
        before: Option<&DomainState>,
        after: Option<&DomainState>,
    ) -> Ended {
        let now = self.ex.clock.now();
        let write = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
            r.status = status;
            r.finished_at = Some(now);
            r.message.clone_from(&message);
            if let Some(b) = before {
                r.before = Some(Figures::from(b));
            }
            if let Some(a) = after {
                r.after = Some(Figures::from(a));
            }
        });
        let message = match write {
            Ok(()) => message,
            Err(e) => {
                self.fail_hard(&e);
                format!("{message} (NOT RECORDED: {e})")
            }
        };
        self.report(step, status, message, false);
        Ended::with(status)
    }
}

/// The longest a step waits for a running guest to follow a live memory or vCPU change.
const LIVE_SETTLE: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
/// How long live figures that stopped moving are given before the step stops waiting.
const LIVE_STALL: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// For a running domain the config is authoritative; the live figures are reported when a
/// guest did not follow (no balloon driver, vCPUs not released): a warning, not a failure.
fn live_warnings(step: &PlannedStep, after: &DomainState) -> Vec<String> {
    let Some(live) = after.live else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for action in &step.actions {
        match action {
            Action::SetMemory { memory, live: true } if live.memory != *memory => out.push(format!(
                "warning: the guest's live memory is {} (target {memory}); a guest without a balloon driver keeps its size until the next boot",
                live.memory
            )),
            Action::SetVcpus { vcpus, live: true } if live.vcpus != *vcpus => out.push(format!(
                "warning: the guest has {} vCPUs online (target {vcpus}) until it releases them or reboots",
                live.vcpus
            )),
            _ => {}
        }
    }
    out
}
