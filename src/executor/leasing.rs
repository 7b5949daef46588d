//! The executor's side of domain leases ([`crate::lease`]): a step takes its domain's lease
//! before it acts (waiting within its grace while another executor holds it), a background
//! thread renews it while the step runs, and it is released when the step has been recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, SecondsFormat, Utc};

use super::step::Ended;
use super::Run;
use crate::hypervisor::HvError;
use crate::lease::{self, Acquisition, Holder, Lease, LeaseConfig, Leaser, Register, Renewal};
use crate::lockfile::StepStatus;
use crate::planner::PlannedStep;
use crate::uri::Uri;

/// Who this executor is and how it takes leases.
#[derive(Debug, Clone)]
pub struct Leasing {
    pub holder: Holder,
    pub config: LeaseConfig,
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
        let grace = chrono::Duration::from_std(settings.grace).unwrap_or(chrono::Duration::MAX);
        let by_grace = self
            .effective_at(step)
            .unwrap_or(now)
            .checked_add_signed(grace)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        settings.window.map_or(by_grace, |w| by_grace.min(w.end))
    }

    /// Runs `act` (given the time the lease was taken) while holding the domain's lease.
    /// Without leasing it runs at once. When another executor holds the domain past the
    /// step's deadline the step is recorded `missed`, naming the holder.
    pub(super) fn leased(
        &self,
        step: &PlannedStep,
        now: DateTime<Utc>,
        act: impl FnOnce(DateTime<Utc>) -> Ended,
    ) -> Ended {
        let Some(leasing) = &self.ex.settings.lease else {
            return act(now);
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
        let deadline = self.start_deadline(step, now);
        let waited_for = match leaser.acquire_until(uuid, deadline, &|| self.stopping_for(step)) {
            Ok(Acquisition::Acquired { waited_for, .. }) => waited_for,
            Ok(Acquisition::GaveUp(_)) if self.stopping_for(step) => {
                self.cancel(step);
                return Ended::with(StepStatus::Cancelled);
            }
            Ok(Acquisition::GaveUp(rival)) => {
                let message = missed_message(&step.domain.name, rival.as_ref(), deadline);
                return self.end(step, StepStatus::Missed, message, None, None);
            }
            // The host went away while the lease was taken: nothing was changed.
            Err(e) if self.host_down(&step.connection).is_some() => {
                let message = format!("missed, nothing was changed: {e}");
                return self.end(step, StepStatus::Missed, message, None, None);
            }
            Err(e) => {
                let message = format!("not started: {e}");
                return self.end(step, StepStatus::Failed, message, None, None);
            }
        };
        // The step's record starts when it was dispatched (before the lease), unless waiting
        // for the lease made it late: then it is judged, and recorded, at the time it is now.
        let taken = self.ex.clock.now();
        let start = if self.late(step, taken).is_some() {
            taken
        } else {
            now
        };
        let done = AtomicBool::new(false);
        let lost: Mutex<Option<String>> = Mutex::new(None);
        let ended = std::thread::scope(|scope| {
            scope.spawn(|| self.keep(&leaser, uuid, &done, &lost));
            let ended = act(start);
            done.store(true, Ordering::SeqCst);
            ended
        });
        // A failed release leaves the record to expire on its own.
        let _ = leaser.release(uuid);
        let mut notes: Vec<String> = waited_for
            .map(|rival| {
                format!(
                    "waited {} for the lease held by {}",
                    crate::plan_file::units::format_duration(
                        (taken - now).to_std().unwrap_or_default()
                    ),
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
        ended
    }

    /// Renews the lease every third of its lifetime until `done`; records a lost lease.
    fn keep(
        &self,
        leaser: &Leaser<'_>,
        uuid: &str,
        done: &AtomicBool,
        lost: &Mutex<Option<String>>,
    ) {
        let every = chrono::Duration::from_std(leaser.config.renew_every())
            .unwrap_or(chrono::Duration::MAX);
        let clock = self.ex.clock;
        let mut next = clock
            .now()
            .checked_add_signed(every)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        loop {
            clock.wait_until(next, done);
            if done.load(Ordering::SeqCst) {
                return;
            }
            let now = clock.now();
            match leaser.renew(uuid) {
                Ok(Renewal::Renewed { .. }) => {
                    next = now
                        .checked_add_signed(every)
                        .unwrap_or(DateTime::<Utc>::MAX_UTC);
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
                    next = now
                        .checked_add_signed(every / 4)
                        .unwrap_or(DateTime::<Utc>::MAX_UTC);
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
             writes were too slow for the lease protocol)",
            show(deadline)
        ),
    }
}
