//! The executor's side of domain leases ([`crate::lease`]): a step takes its domain's lease
//! before it acts (waiting within its grace while another executor holds it), a background
//! thread renews it while the step runs, and it is released when the step has been recorded.
//!
//! Taking a lease holds no worker: a turn writes the record ([`Leaser::begin`]) and hands the
//! domain back to the scheduler until the settle delay has passed; the domain's next turn
//! reads it back ([`Leaser::confirm`]) and acts. Its [`Taking`] (in the domain's cursor)
//! carries what the turns share. A domain waiting for a rival's lease is handed back the same
//! way until its next try.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use super::step::Ended;
use super::{Next, Run};
use crate::hypervisor::HvError;
use crate::lease::{
    self, Begun, Confirmed, Holder, Lease, LeaseConfig, Leaser, Register, Renewal, Written,
};
use crate::lockfile::StepStatus;
use crate::planner::PlannedStep;
use crate::uri::Uri;

/// Who this executor is and how it takes leases.
#[derive(Debug, Clone)]
pub struct Leasing {
    pub holder: Holder,
    pub config: LeaseConfig,
}

/// A lease being taken for a domain's current step, kept in its cursor between turns.
#[derive(Debug)]
pub(super) struct Taking {
    /// When the step was dispatched: its record starts then (unless waiting made it late).
    now: DateTime<Utc>,
    /// The last moment the step may start.
    deadline: DateTime<Utc>,
    /// An `always` step after a failure or an abort (decided when it was dispatched).
    after_failure: bool,
    /// The step's time by the wall clock (`None` for a resumed step, re-checked at once): the
    /// settle delay is measured on the monotonic clock, so a wall clock stepped back meanwhile
    /// is checked again before the step acts.
    not_before: Option<DateTime<Utc>>,
    /// Our record, written and waiting to be read back.
    written: Option<Written>,
    /// The first rival that made us wait (named in the step's record).
    first_rival: Option<Lease>,
    /// The last rival seen (named if the step is missed).
    last_rival: Option<Lease>,
}

impl Taking {
    fn saw(&mut self, rival: Lease) {
        self.first_rival.get_or_insert_with(|| rival.clone());
        self.last_rival = Some(rival);
    }
}

/// How one turn of taking a lease ended.
enum Take {
    Acquired(Written),
    /// Not yet: hand the domain back until then.
    Wait(Next),
    /// Stopped, or the deadline passed.
    GaveUp,
}

/// Lease records through the run's connections: transient failures are retried and a lost
/// connection is reopened, like every other libvirt call of a step. A retried write only
/// lengthens the measured read-to-write time, which the protocol checks.
struct Retrying<'r, 'a> {
    run: &'r Run<'a>,
    uri: &'r Uri,
}

impl Register for Retrying<'_, '_> {
    fn get(&self, uuid: &str) -> Result<Option<String>, HvError> {
        self.run
            .retry(self.uri, |hv| hv.metadata_element(uuid, lease::NAMESPACE))
    }

    fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError> {
        self.run.retry(self.uri, |hv| {
            hv.set_metadata_element(uuid, lease::NAMESPACE, lease::PREFIX, xml)
        })
    }
}

fn show(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Run<'_> {
    /// The last moment `step` may start: `at + grace` (for a rollout's domain, from when the
    /// rollout dispatched it), and never after the window closes.
    pub(super) fn start_deadline(&self, step: &PlannedStep, now: DateTime<Utc>) -> DateTime<Utc> {
        let settings = self.ex.settings;
        let by_grace = crate::clock::later(self.effective_at(step).unwrap_or(now), settings.grace);
        settings.window.map_or(by_grace, |w| by_grace.min(w.end))
    }

    /// The lease `step`, dispatched at `now` once its time `not_before` had come, is about to
    /// take (its first turn's state).
    pub(super) fn taking(
        &self,
        step: &PlannedStep,
        now: DateTime<Utc>,
        not_before: Option<DateTime<Utc>>,
        after_failure: bool,
    ) -> Taking {
        Taking {
            now,
            deadline: self.start_deadline(step, now),
            after_failure,
            not_before,
            written: None,
            first_rival: None,
            last_rival: None,
        }
    }

    /// Runs `act` (given the time the step starts and `after_failure`) while holding the
    /// domain's lease. Without leasing it runs at once. Taking the lease spans several turns
    /// of the domain: `Err` hands it back to the scheduler until then, with the state to
    /// carry on from, so the settle delay (and a wait for a rival) holds no worker. When
    /// another executor holds the domain past the step's deadline the step is recorded
    /// `missed`, naming the holder.
    pub(super) fn leased(
        &self,
        step: &PlannedStep,
        taking: &mut Taking,
        act: impl FnOnce(DateTime<Utc>, bool) -> Ended,
    ) -> Result<Ended, Next> {
        let Some(leasing) = &self.ex.settings.lease else {
            return Ok(act(taking.now, taking.after_failure));
        };
        let register = Retrying {
            run: self,
            uri: &step.connection,
        };
        let leaser = Leaser {
            register: &register,
            clock: self.ex.clock,
            me: &leasing.holder,
            config: &leasing.config,
        };
        let uuid = step.domain.uuid.as_str();
        let now = taking.now;
        let written = match self.take(&leaser, step, taking) {
            Ok(Take::Acquired(written)) => written,
            Ok(Take::Wait(next)) => return Err(next),
            Ok(Take::GaveUp) if self.stopping_for(step) => {
                self.cancel(step);
                return Ok(Ended::with(StepStatus::Cancelled));
            }
            Ok(Take::GaveUp) => {
                let message = missed_message(
                    &step.domain.name,
                    taking.last_rival.as_ref(),
                    taking.deadline,
                );
                return Ok(self.end(step, StepStatus::Missed, message, None, None));
            }
            // The host went away while the lease was taken: nothing was changed.
            Err(e) if self.host_down(&step.connection).is_some() => {
                let message = format!("missed, nothing was changed: {e}");
                return Ok(self.end(step, StepStatus::Missed, message, None, None));
            }
            Err(e) => {
                let message = format!("not started: {e}");
                return Ok(self.end(step, StepStatus::Failed, message, None, None));
            }
        };
        // The step starts now, holding its lease and a worker: its record starts, and it is
        // judged, at this time. (Starting it from its dispatch, before the settle delay, would
        // let more than `parallelism` records be open at once: domains settle without a
        // worker.)
        let taken = self.ex.clock.now();
        // The wall clock was stepped back during the settle delay (NTP, an operator): a step
        // never starts before its time. Nothing acts under the record, so it goes; the domain
        // comes back at its time and takes the lease again.
        if let Some(due) = taking.not_before.filter(|due| taken < *due) {
            let _ = leaser.release(uuid);
            return Err(Next::Due(due));
        }
        let done = AtomicBool::new(false);
        let lost: Mutex<Option<String>> = Mutex::new(None);
        let ended = std::thread::scope(|scope| {
            let keeper = scope.spawn(|| self.keep(&leaser, uuid, written.at, &done, &lost));
            let ended = act(taken, taking.after_failure);
            done.store(true, Ordering::SeqCst);
            self.acted(self.ex.clock.now() - taken);
            // Ends its wait now: the worker is not held until its next poll.
            keeper.thread().unpark();
            ended
        });
        // A failed release leaves the record to expire on its own.
        let _ = leaser.release(uuid);
        let mut notes: Vec<String> = taking
            .first_rival
            .take()
            .map(|rival| {
                format!(
                    "waited {} for the lease held by {}",
                    // In whole milliseconds: "3s 122ms", not "3s 122ms 552us 941ns".
                    crate::plan_file::units::format_duration(Duration::from_millis(
                        u64::try_from((taken - now).num_milliseconds()).unwrap_or_default()
                    )),
                    rival.holder
                )
            })
            .into_iter()
            .collect();
        notes.extend(lost.into_inner().unwrap_or_else(PoisonError::into_inner));
        if !notes.is_empty() {
            let write = self.ex.store.update(&step.step_id, &step.domain.uuid, |r| {
                for note in &notes {
                    if !r.message.is_empty() {
                        r.message.push_str("; ");
                    }
                    r.message.push_str(note);
                }
            });
            if let Err(e) = write {
                self.fail_hard(&e);
            }
        }
        Ok(ended)
    }

    /// One turn of taking the lease: read our record back once the settle delay has passed,
    /// or write it, or wait for a rival, or give up (stopped, or past the deadline). A stop
    /// that comes while our record waits to be read back removes it.
    fn take(
        &self,
        leaser: &Leaser<'_>,
        step: &PlannedStep,
        taking: &mut Taking,
    ) -> Result<Take, lease::LeaseError> {
        let uuid = step.domain.uuid.as_str();
        let clock = self.ex.clock;
        if self.stopping_for(step) {
            if taking.written.take().is_some() {
                // Nothing acts under it: a failed removal leaves it to expire.
                let _ = leaser.release(uuid);
            }
            return Ok(Take::GaveUp);
        }
        if let Some(written) = taking.written.take() {
            match leaser.confirm(uuid, &written)? {
                Confirmed::Acquired { .. } => return Ok(Take::Acquired(written)),
                // Handed back before the delay passed by the clock's own measure.
                Confirmed::Early { until } => {
                    taking.written = Some(written);
                    return Ok(Take::Wait(Next::Settle(until)));
                }
                Confirmed::Busy(rival) => {
                    taking.saw(rival);
                    return Ok(self.retry_lease(leaser, taking));
                }
                Confirmed::Gone => return Ok(self.retry_lease(leaser, taking)),
                // Read back too late (no worker was free for a long time): nothing acts under
                // our record, so it goes; the domain waits its turn to write it again, when
                // the workers can take it up (`Run::lease_room`), or gives up at the deadline.
                Confirmed::Stale { .. } => {
                    let _ = leaser.release(uuid);
                    if clock.now() >= taking.deadline {
                        return Ok(Take::GaveUp);
                    }
                    return Ok(Take::Wait(Next::Due(clock.now())));
                }
            }
        }
        match leaser.begin(uuid)? {
            Begun::Written(written) => {
                let due = written.settled(leaser.config.settle);
                taking.written = Some(written);
                Ok(Take::Wait(Next::Settle(due)))
            }
            Begun::Busy(rival) => {
                taking.saw(rival);
                Ok(self.retry_lease(leaser, taking))
            }
            Begun::Slow { .. } => Ok(self.retry_lease(leaser, taking)),
        }
    }

    /// After a try that did not take the lease: give up at the deadline, else try again after
    /// `retry` (jittered, so two losers do not meet again in lockstep), never after the
    /// deadline, so the last try comes at it.
    fn retry_lease(&self, leaser: &Leaser<'_>, taking: &Taking) -> Take {
        let now = self.ex.clock.now();
        if now >= taking.deadline {
            return Take::GaveUp;
        }
        let retry = leaser.config.retry;
        let wait = (retry + retry.mul_f64(fastrand::f64() * 0.5))
            .min((taking.deadline - now).to_std().unwrap_or(Duration::ZERO));
        Take::Wait(Next::Due(crate::clock::later(now, wait)))
    }

    /// Renews the lease every third of its lifetime until `done`; records a lost lease.
    /// The first renewal counts from `written`, when the record was written, however late
    /// it was read back.
    fn keep(
        &self,
        leaser: &Leaser<'_>,
        uuid: &str,
        written: DateTime<Utc>,
        done: &AtomicBool,
        lost: &Mutex<Option<String>>,
    ) {
        let every = leaser.config.renew_every();
        let clock = self.ex.clock;
        let mut next = crate::clock::later(written, every);
        loop {
            clock.wait_until(next, done);
            if done.load(Ordering::SeqCst) {
                return;
            }
            let now = clock.now();
            match leaser.renew(uuid) {
                Ok(Renewal::Renewed { .. }) => {
                    next = crate::clock::later(now, every);
                }
                Ok(Renewal::Lost(by)) => {
                    let by = by.map_or_else(|| "nobody".to_owned(), |l| l.holder.to_string());
                    *lost.lock().unwrap_or_else(PoisonError::into_inner) = Some(format!(
                        "warning: the domain's lease lapsed while the step ran (this executor stalled past its expiry; now held by {by})"
                    ));
                    return;
                }
                // libvirt is unreachable: try again soon; the lease lives two more periods.
                Err(_) => {
                    next = crate::clock::later(now, every / 4);
                }
            }
        }
    }
}

fn missed_message(vm: &str, rival: Option<&Lease>, deadline: DateTime<Utc>) -> String {
    match rival {
        Some(rival) => format!(
            "missed, not run: {vm} is leased by {} until {} and the step could not start by {}; \
             another executor is acting on it (if that executor is dead, its lease expires on its own)",
            rival.holder,
            show(rival.expires),
            show(deadline)
        ),
        None => format!(
            "missed, not run: the lease on {vm} could not be taken by {} (this executor's own \
             writes, or its read-backs of them, came too late for the lease protocol)",
            show(deadline)
        ),
    }
}
