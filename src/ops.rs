//! The operations `plan`, `apply`, `apply --watch` and `watch DIR` share, in their one order:
//! [`load`] the plan file with the virtplan.toml it inherits from → [`open`] each connection
//! once through the one connector ([`connect`]) → take the executor lock (the lockfile module)
//! → [`project`] the steps over observed state → [`check`] the plan against recorded progress.
//! Commands and the reconciler call these instead of repeating the sequence.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::config::{self, Config};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{HvResult, Hypervisor};
use crate::lockfile::{LockError, Lockfile};
use crate::plan_file::{self, Diagnostics, LoadContext, PlanFile};
use crate::planner::{self, Connections, Plan, PlanError, PlanInput, Progress};
use crate::uri::Uri;

/// A plan file and the configuration it was validated with.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub file: PlanFile,
}

/// Finds the plan's virtplan.toml (`config` when given) and validates the plan under it.
///
/// # Errors
/// Every problem of the configuration or the plan, located.
pub fn load(path: &Path, config: Option<&Path>) -> Result<Loaded, Diagnostics> {
    let config = config::discover(config, Some(path))?;
    let file = plan_file::load(path, &LoadContext::from(config.clone()))?;
    Ok(Loaded { config, file })
}

/// The one connector: every libvirt connection virtplan opens (to plan, to apply, to reopen a
/// lost one, in the reconciler's pool) is made here.
///
/// # Errors
/// libvirt cannot be reached at `uri` (the message names it, credentials redacted).
pub fn connect(uri: &Uri) -> HvResult<Arc<dyn Hypervisor>> {
    Libvirt::connect(uri.clone()).map(|hv| Arc::new(hv) as Arc<dyn Hypervisor>)
}

/// Opens each of `uris` once, all at the same time: a plan over many hypervisors waits for the
/// slowest handshake (an ssh login, a TLS setup), not for their sum.
///
/// # Errors
/// The first URI, in order, that cannot be reached.
pub fn open(uris: impl IntoIterator<Item = Uri>) -> HvResult<Connections> {
    let uris: Vec<Uri> = uris
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let opened: Vec<HvResult<Arc<dyn Hypervisor>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = uris
            .iter()
            .map(|uri| scope.spawn(move || connect(uri)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::hypervisor::HvError::new(
                        crate::hypervisor::ErrorKind::Other,
                        "a connection thread panicked",
                    ))
                })
            })
            .collect()
    });
    uris.into_iter()
        .zip(opened)
        .map(|(uri, hv)| hv.map(|hv| (uri, hv)))
        .collect()
}

/// Opens each of `uris` like [`open`], but a host that cannot be reached does not stop the
/// others: it gets an [`Unreachable`](crate::hypervisor::unreachable::Unreachable) stand-in,
/// which the executor reopens when that host's first step is due. For `apply SAVED`, whose
/// plan was reviewed while every host answered; returns the hosts that did not, with why.
#[must_use]
pub fn open_tolerant(
    uris: impl IntoIterator<Item = Uri>,
) -> (Connections, Vec<(Uri, crate::hypervisor::HvError)>) {
    let mut connections = Connections::new();
    let mut unreachable = Vec::new();
    let uris: std::collections::BTreeSet<Uri> = uris.into_iter().collect();
    let opened: Vec<(Uri, HvResult<Arc<dyn Hypervisor>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = uris
            .iter()
            .map(|uri| (uri, scope.spawn(move || connect(uri))))
            .collect();
        handles
            .into_iter()
            .map(|(uri, h)| {
                let hv = h.join().unwrap_or_else(|_| {
                    Err(crate::hypervisor::HvError::new(
                        crate::hypervisor::ErrorKind::Other,
                        "a connection thread panicked",
                    ))
                });
                (uri.clone(), hv)
            })
            .collect()
    });
    for (uri, hv) in opened {
        match hv {
            Ok(hv) => {
                connections.insert(uri, hv);
            }
            Err(e) => {
                let stand_in =
                    crate::hypervisor::unreachable::Unreachable::new(uri.clone(), e.clone());
                connections.insert(uri.clone(), Arc::new(stand_in));
                unreachable.push((uri, e));
            }
        }
    }
    (connections, unreachable)
}

/// Projects `file` over the live state of `connections` at `now`, with `progress` marking
/// the steps already done; `connect` (`--connect`) replaces every step's connection; `filter`
/// (`--only` / `--exclude`) keeps the domains it selects.
///
/// # Errors
/// As [`planner::project_selected`].
pub fn project(
    file: &PlanFile,
    connections: &Connections,
    connect: Option<&Uri>,
    now: DateTime<Utc>,
    progress: &dyn Progress,
    filter: Option<&crate::filter::Filter>,
) -> Result<Plan, PlanError> {
    planner::project_selected(
        &PlanInput {
            file,
            connections,
            connect_override: connect,
            now,
            progress,
        },
        filter,
    )
}

/// What apply would refuse before running anything (an edited or removed done step, a
/// recreated domain), checked on a copy of `recorded` so nothing is written.
///
/// # Errors
/// The lockfile's refusal, naming the step.
pub fn check(recorded: &Lockfile, lock_path: &Path, plan: &Plan) -> Result<(), LockError> {
    recorded.clone().reconcile(lock_path, plan)
}

/// Domains that match a `vms: {match: GLOB}` step of `file` now but are not in the reviewed
/// `plan`: one warning each (they are never touched; `virtplan plan` reviews them).
#[must_use]
pub fn unreviewed_matches(file: &PlanFile, plan: &Plan, connections: &Connections) -> Vec<String> {
    // One pass over the plan and one listing per connection, not one per pattern step.
    let mut by_id: std::collections::HashMap<&str, Vec<&crate::planner::PlannedStep>> =
        std::collections::HashMap::new();
    for s in &plan.steps {
        by_id.entry(s.step_id.as_str()).or_default().push(s);
    }
    let mut listings: std::collections::HashMap<&Uri, Option<Vec<crate::hypervisor::DomainId>>> =
        std::collections::HashMap::new();
    let mut warnings = Vec::new();
    for step in &file.steps {
        if step.targets.iter().all(|t| t.pattern().is_none()) {
            continue;
        }
        let id = step.id();
        let Some(reviewed) = by_id.get(id.as_str()) else {
            continue;
        };
        let uri = &reviewed[0].connection;
        let Some(hv) = connections.get(uri) else {
            continue;
        };
        let Some(listed) = listings
            .entry(uri)
            .or_insert_with(|| hv.list_domains().ok())
        else {
            continue;
        };
        for target in &step.targets {
            let Some(pattern) = target.pattern() else {
                continue;
            };
            for d in listed.iter() {
                if pattern.matches(&d.name) && !reviewed.iter().any(|s| s.domain.uuid == d.uuid) {
                    warnings.push(format!(
                        "{} ({}) now matches `{}` of step {} but was not in the reviewed plan: it is not touched; run `virtplan plan` to review it",
                        d.name, d.uuid, target.name_or_uuid, step.number
                    ));
                }
            }
        }
    }
    warnings
}

/// Before planning a resumed run: every domain an interrupted step was working on is waited
/// for (bounded) until it settles, so the plan starts from a settled state ("shutting down"
/// right after a kill during a forced power-off is not a state to plan from). `waiting` hears
/// each wait before it starts. `apply`, `apply --watch` and `watch` all call this.
///
/// # Errors
/// A libvirt failure, or a domain still unsettled after [`crate::hypervisor::SETTLE_LIMIT`]
/// (nothing is planned or applied then), as a message that names the domain.
pub fn settle_interrupted(
    lock: &Lockfile,
    connections: &Connections,
    clock: &dyn crate::clock::Clock,
    waiting: &mut dyn FnMut(&str),
) -> Result<(), String> {
    use crate::hypervisor::{wait_settled, ErrorKind, SETTLE_LIMIT};
    let limit = crate::plan_file::units::format_duration(SETTLE_LIMIT);
    let interrupted = lock
        .steps
        .iter()
        .filter(|r| r.status == crate::lockfile::StepStatus::Running);
    for record in interrupted {
        let vm = crate::text::escape(&record.vm);
        for hv in connections.values() {
            let reason = match hv.unsettled(&record.uuid) {
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.to_string()),
                Ok(None) => break,
                Ok(Some(reason)) => reason,
            };
            waiting(&format!(
                "Waiting (up to {limit}) for {vm} to settle: it is {reason} after an interrupted run."
            ));
            if let Some(reason) = wait_settled(hv.as_ref(), &record.uuid, clock, SETTLE_LIMIT)
                .map_err(|e| e.to_string())?
            {
                return Err(format!(
                    "{vm} is still {reason} after {limit}; nothing was planned or applied: run `virtplan apply` again once it settles"
                ));
            }
            break;
        }
    }
    Ok(())
}

/// Test-only crash switch, read in one place ([`failpoint`]): `after-running:<step id>` or
/// `before-done:<step id>` aborts the process at that point, to test that a resumed run
/// applies nothing twice.
pub const FAILPOINT_ENV: &str = "VIRTPLAN_FAILPOINT";

/// The failpoint every executor of this process gets (`apply`, `apply --watch`, `watch`).
#[must_use]
pub fn failpoint() -> Option<String> {
    std::env::var(FAILPOINT_ENV).ok().filter(|f| !f.is_empty())
}

/// The stop flag of a run: SIGINT or SIGTERM sets it (start nothing new; the step in flight
/// finishes and is recorded), and a second one exits at once (every lockfile write is atomic,
/// so the lockfile stays whole). `apply`, `apply --watch` and `watch` all stop through it.
///
/// # Errors
/// The handlers cannot be installed.
pub fn stop_on_signals() -> std::io::Result<Arc<std::sync::atomic::AtomicBool>> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// A plan's progress, owned: the executor lock (held for as long as the value lives) and the
/// plan's lockfile, opened under it.
pub struct Locked {
    pub lock: crate::lockfile::ExecutorLock,
    pub store: Arc<crate::lockfile::LockStore>,
}

/// Why [`lock`] could not take a plan's executor lock or open its lockfile.
#[derive(Debug, thiserror::Error)]
pub enum LockFailure {
    #[error("cannot create the state folder {} (state_dir in virtplan.toml): {source}", .folder.display())]
    StateFolder {
        folder: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Another executor holds the plan; `waited` is how long this one waited (`None`: it was
    /// not asked to wait).
    #[error("{source}")]
    Held {
        source: LockError,
        waited: Option<std::time::Duration>,
    },
    #[error(transparent)]
    Lockfile(#[from] LockError),
}

/// Takes the executor lock of the plan at `plan_path` and opens its lockfile (beside the plan,
/// or in `state_dir`), the one sequence `apply`, `apply --watch` and `watch` use. While
/// another executor holds the plan, waits up to `wait` for it to let go (polling: a held
/// `flock` cannot be waited on with a deadline), telling `waiting` once.
///
/// # Errors
/// The state folder cannot be created, the lock is held (after `wait`), or the lockfile
/// cannot be read.
pub fn lock(
    plan_path: &Path,
    state_dir: Option<&Path>,
    plan_sha256: &str,
    clock: &dyn crate::clock::Clock,
    wait: Option<std::time::Duration>,
    waiting: &mut dyn FnMut(&str),
) -> Result<Locked, LockFailure> {
    use crate::lockfile::{ExecutorLock, LockStore};
    let paths = crate::overview::StatePaths::of(plan_path, state_dir);
    paths.prepare().map_err(|source| LockFailure::StateFolder {
        folder: paths
            .lockfile
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        source,
    })?;
    let start = clock.now();
    let mut told = false;
    let lock = loop {
        match ExecutorLock::acquire(&paths.pid, clock.now()) {
            Ok(lock) => break lock,
            Err(source @ LockError::Held { .. }) => {
                let Some(wait) = wait else {
                    return Err(LockFailure::Held {
                        source,
                        waited: None,
                    });
                };
                let waited = (clock.now() - start).to_std().unwrap_or_default();
                if waited >= wait {
                    return Err(LockFailure::Held {
                        source,
                        waited: Some(wait),
                    });
                }
                if !told {
                    waiting(&format!(
                        "Waiting up to {} for the executor lock: {source}",
                        crate::plan_file::units::format_duration(wait)
                    ));
                    told = true;
                }
                clock.sleep(
                    wait.saturating_sub(waited)
                        .min(std::time::Duration::from_millis(250)),
                );
            }
            Err(e) => return Err(e.into()),
        }
    };
    let store = LockStore::open(&paths.lockfile, plan_sha256)?;
    Ok(Locked {
        lock,
        store: Arc::new(store),
    })
}

/// Why [`project_resumed`] made no plan.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// A domain an interrupted step was working on did not settle, or libvirt failed meanwhile
    /// (the message names the domain).
    #[error("{0}")]
    Unsettled(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Observe → project for a plan that may resume, the one sequence `apply`, `apply --watch`
/// and `watch` plan with: wait for every domain an interrupted step was working on to settle
/// ([`settle_interrupted`], `waiting` hears each wait), then project `file` with the
/// lockfile's progress; `filter` (`--only` / `--exclude`) keeps the domains it selects.
///
/// # Errors
/// As [`settle_interrupted`] and [`planner::project_selected`].
pub fn project_resumed(
    file: &PlanFile,
    connections: &Connections,
    connect: Option<&Uri>,
    clock: &dyn crate::clock::Clock,
    store: &crate::lockfile::LockStore,
    waiting: &mut dyn FnMut(&str),
    filter: Option<&crate::filter::Filter>,
) -> Result<Plan, ResumeError> {
    settle_interrupted(&store.snapshot(), connections, clock, waiting)
        .map_err(ResumeError::Unsettled)?;
    Ok(project(
        file,
        connections,
        connect,
        clock.now(),
        store,
        filter,
    )?)
}
