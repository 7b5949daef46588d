//! Runs one plan's executor in a background thread with its own stop flag, so the reconciler
//! can stop it after the step in flight (which is recorded) and start it again with a new plan.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};

use crate::executor::{Executor, Outcome, Report, Settings};
use crate::lockfile::{LockError, LockStore, StepStatus};
use crate::planner::{Connections, Plan};

use super::Env;

/// Everything one run needs, owned by its thread.
pub struct Job {
    /// The plan's file name, for log lines.
    pub label: String,
    pub plan: Arc<Plan>,
    pub connections: Connections,
    pub store: Arc<LockStore>,
    pub settings: Settings,
}

/// A running executor.
pub struct Runner<'scope> {
    stop: Arc<AtomicBool>,
    handle: ScopedJoinHandle<'scope, Result<Report, LockError>>,
}

impl<'scope> Runner<'scope> {
    /// Starts `job` on a thread of `scope`.
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, env: &'env Env<'env>, job: Job) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = scope.spawn(move || {
            let log = env.log;
            let label = job.label.as_str();
            let stopped = &*flag;
            // Steps a stop leaves unstarted are the reconciler's to report: for a re-plan they
            // simply run under the new version.
            let on_outcome = |o: &Outcome| {
                let unstarted = o.status == StepStatus::Cancelled && stopped.load(Ordering::SeqCst);
                if !o.earlier && !unstarted {
                    log.step(label, o);
                }
            };
            let reconnect = crate::ops::connect;
            Executor {
                plan: &job.plan,
                connections: &job.connections,
                clock: env.clock,
                store: &job.store,
                settings: &job.settings,
                stop: stopped,
                on_outcome: &on_outcome,
                reconnect: Some(&reconnect),
            }
            .run()
        });
        Self { stop, handle }
    }

    /// Asks the executor to start no new step; the one in flight finishes and is recorded.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the executor to end.
    ///
    /// # Errors
    /// The lockfile refused the plan or could not be written.
    pub fn join(self) -> Result<Report, LockError> {
        self.handle.join().unwrap_or_else(|panic| {
            // The executor does not panic on input; if it ever does, say so instead of dying.
            let what = panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Ok(Report {
                fatal: Some(format!("the executor thread panicked: {what}")),
                ..Report::default()
            })
        })
    }
}
