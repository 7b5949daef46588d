//! Reconciler mode: plans keep running while their files change (`apply --watch` for one file,
//! `virtplan watch DIR` for every `*.yaml` plan directly in a folder).
//!
//! A [`debounce::Debouncer`] watches the folder; once it has been quiet, every plan file is read
//! again and compared with what was last seen. Per plan file a [`Slot`] holds the executor lock,
//! the lockfile, the version of the plan in force and a [`runner::Runner`] executing it:
//! - an invalid version is reported with its located errors; the version in force keeps running;
//! - a valid version is projected with the lockfile as progress and checked against it (a done
//!   step cannot change; a refused edit leaves the version in force running); then its diff is
//!   logged, the executor is stopped after its step in flight and started again on the new plan;
//! - a removed file stops its executor, and the steps that did not run are recorded `cancelled`.

pub mod debounce;
pub mod diff;
pub mod log;
mod runner;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::config::{self, Config};
use crate::executor::{Outcome, Report, Settings};
use crate::hypervisor::ErrorKind;
use crate::lockfile::{ExecutorLock, LockError, LockStore, StepStatus};
use crate::notify::event::PlanRef;
use crate::notify::{Notifier, Retry, RunInfo};
use crate::ops;
use crate::plan_file::{Diagnostics, PlanFile};
use crate::planner::{self, Connections, Plan, PlanError};
use crate::printer::Tone;

use debounce::{Debouncer, Wake, QUIET};
use log::{Log, LogFormat};
use runner::{Job, Runner};

/// How often the loop looks at signals and finished executors.
const TICK: Duration = Duration::from_millis(100);

/// Files are read again this often even without events, in case one was missed (and to retry
/// a plan whose executor lock another process held).
const RESCAN: Duration = Duration::from_secs(30);

/// What every plan of a reconciler shares.
pub struct Env<'a> {
    pub clock: &'a dyn Clock,
    pub log: &'a Log<'a>,
    /// `--config`; else each plan finds its nearest `virtplan.toml`.
    pub config: Option<&'a Path>,
    /// `--connect`: replaces every step's connection.
    pub connect: Option<&'a crate::uri::Uri>,
    /// Test-only crash switch handed to every executor (`ops::failpoint`).
    pub failpoint: Option<String>,
    pub pool: Pool,
}

/// Connections shared by every plan, one per URI, kept across re-plans: a libvirtd connection
/// is worth keeping, and the test driver gives each connection its own copy of the host.
#[derive(Default)]
pub struct Pool(Mutex<Connections>);

impl Pool {
    #[must_use]
    pub fn with(connections: Connections) -> Self {
        Self(Mutex::new(connections))
    }

    /// The connections `file`'s steps use, opening those not open yet.
    fn for_file(
        &self,
        file: &PlanFile,
        connect: Option<&crate::uri::Uri>,
    ) -> Result<Connections, String> {
        let uris = file.connection_uris(connect);
        let mut pool = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let missing: Vec<crate::uri::Uri> = uris
            .iter()
            .filter(|u| !pool.contains_key(*u))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let opened = ops::open(missing).map_err(|e| format!("cannot connect: {e}"))?;
            pool.extend(opened);
        }
        Ok(uris
            .into_iter()
            .filter_map(|uri| pool.get(&uri).map(|hv| (uri, Arc::clone(hv))))
            .collect())
    }

    /// Forgets connections that broke, so the next use opens them again.
    fn evict(&self, connections: &Connections) {
        let mut pool = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for uri in connections.keys() {
            pool.remove(uri);
        }
    }
}

use crate::ops::Loaded;

/// The version of a plan in force.
struct Accepted {
    loaded: Loaded,
    plan: Arc<Plan>,
}

/// What was last read for a plan file: its bytes' hash and its configuration.
#[derive(Debug, Clone, PartialEq)]
struct Inputs {
    sha256: String,
    config: Result<Config, String>,
}

/// What to do once the running executor has stopped.
enum Next {
    /// It ended by itself: every step is terminal.
    Nothing,
    /// Start again on this (checked) version.
    Replan(Box<Loaded>),
    /// The file is gone: record the steps that did not run as cancelled.
    Remove,
    /// SIGINT/SIGTERM.
    Shutdown,
}

/// One plan file under watch.
struct Slot<'scope> {
    path: PathBuf,
    /// The file name, in log lines.
    label: String,
    seen: Option<Inputs>,
    /// The executor lock, when this reconciler took it (`apply` takes its own).
    #[allow(dead_code)] // held for its Drop: the OS lock lasts as long as the value
    held: Option<ExecutorLock>,
    store: Option<Arc<LockStore>>,
    /// Delivers the plan's notifications (when it has targets).
    notifier: Option<Arc<Notifier>>,
    /// `plan-started` went out and `plan-finished` not yet.
    announced: bool,
    accepted: Option<Accepted>,
    run: Option<Runner<'scope>>,
    next: Next,
    /// The last run's end, for `apply --watch`'s summary.
    last: Option<Report>,
}

impl Slot<'_> {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            label: path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            seen: None,
            held: None,
            store: None,
            notifier: None,
            announced: false,
            accepted: None,
            run: None,
            next: Next::Nothing,
            last: None,
        }
    }

    /// The version the executor runs or is about to run.
    fn in_force(&self) -> Option<&Loaded> {
        match &self.next {
            Next::Replan(loaded) => Some(loaded),
            _ => self.accepted.as_ref().map(|a| &a.loaded),
        }
    }
}

/// What the reconciler watches.
#[derive(Clone)]
enum Target {
    /// Every `*.yaml` directly in the folder.
    Dir(PathBuf),
    /// One plan file (`apply --watch`).
    File(PathBuf),
}

impl Target {
    fn dir(&self) -> PathBuf {
        match self {
            Self::Dir(dir) => dir.clone(),
            Self::File(file) => file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        }
    }

    /// Plan files present now, sorted.
    fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        match self {
            Self::File(file) => Ok(if file.is_file() {
                vec![file.clone()]
            } else {
                Vec::new()
            }),
            Self::Dir(dir) => {
                let mut found = Vec::new();
                for entry in std::fs::read_dir(dir)? {
                    let path = entry?.path();
                    if is_plan_name(&path) && path.is_file() {
                        found.push(path);
                    }
                }
                found.sort();
                Ok(found)
            }
        }
    }

    /// Whether a file event about `path` may change what runs.
    fn relevant(&self, path: &Path) -> bool {
        let name = path.file_name();
        if name.is_some_and(|n| n == config::FILE_NAME) {
            return true;
        }
        match self {
            Self::File(file) => name.is_some() && name == file.file_name(),
            Self::Dir(_) => is_plan_name(path),
        }
    }
}

/// `*.yaml`, not hidden (editors' swap and temporary files start with a dot).
fn is_plan_name(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_none_or(|n| n.to_string_lossy().starts_with('.'));
    !hidden && path.extension().is_some_and(|e| e == "yaml")
}

/// `virtplan watch DIR`: reconciles every plan in `dir` until `stop` is set.
///
/// # Errors
/// The folder cannot be read or watched.
pub fn watch_dir(env: &Env<'_>, dir: &Path, stop: &AtomicBool) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        Reconciler::new(scope, env, Target::Dir(dir.to_path_buf())).run(stop)
    })
}

/// What `apply` has already done before handing a plan to the watcher.
pub struct Applying {
    pub config: Config,
    pub file: PlanFile,
    /// Projected and reconciled with `store`.
    pub plan: Plan,
    /// Under an executor lock the caller holds.
    pub store: Arc<LockStore>,
    /// The caller's notifier (it announces the plan's start and end itself).
    pub notifier: Option<Arc<Notifier>>,
}

/// `apply --watch`: runs `applying` and follows edits of its file until every step is terminal,
/// the file is removed, or `stop` is set. The report's outcomes are the final lockfile records.
///
/// # Errors
/// The plan's folder cannot be watched.
pub fn apply_watch(env: &Env<'_>, applying: Applying, stop: &AtomicBool) -> anyhow::Result<Report> {
    let path = applying.file.path.clone();
    std::thread::scope(|scope| {
        let mut r = Reconciler::new(scope, env, Target::File(path.clone()));
        let mut slot = Slot::new(&path);
        slot.seen = Some(Inputs {
            sha256: applying.file.sha256.clone(),
            config: Ok(applying.config.clone()),
        });
        slot.store = Some(Arc::clone(&applying.store));
        slot.notifier.clone_from(&applying.notifier);
        slot.announced = true;
        let loaded = Loaded {
            config: applying.config,
            file: applying.file,
        };
        match env.pool.for_file(&loaded.file, env.connect) {
            Ok(connections) => r.start(&mut slot, loaded, applying.plan, connections),
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        }
        r.slots.insert(path.clone(), slot);
        r.run(stop)?;
        let lock = applying.store.snapshot();
        let last = r.slots.get_mut(&path).and_then(|s| s.last.take());
        let mut report = last.unwrap_or_default();
        report.outcomes = lock
            .steps
            .iter()
            .map(|rec| Outcome {
                step: rec.step,
                step_id: rec.step_id.clone(),
                vm: rec.vm.clone(),
                uuid: rec.uuid.clone(),
                at: rec.at,
                status: rec.status,
                message: rec.message.clone(),
                earlier: false,
            })
            .collect();
        let unfinished = report
            .outcomes
            .iter()
            .any(|o| matches!(o.status, StepStatus::Cancelled | StepStatus::Pending));
        report.interrupted = unfinished && report.fatal.is_none();
        Ok(report)
    })
}

struct Reconciler<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    env: &'env Env<'env>,
    target: Target,
    slots: BTreeMap<PathBuf, Slot<'scope>>,
    shutting_down: bool,
    /// Rescan at the next turn of the loop.
    dirty: bool,
}

impl<'scope, 'env> Reconciler<'scope, 'env> {
    /// A reconciler with no plan seen yet. Its state machine moves only through [`Self::rescan`]
    /// (files changed), [`Self::poll`] (executors ended) and [`Self::shut_down`] (a signal);
    /// [`Self::run`] drives them from file events, and the unit tests drive them directly.
    fn new(scope: &'scope Scope<'scope, 'env>, env: &'env Env<'env>, target: Target) -> Self {
        Self {
            scope,
            env,
            target,
            slots: BTreeMap::new(),
            shutting_down: false,
            dirty: false,
        }
    }

    fn log(&self) -> &'env Log<'env> {
        self.env.log
    }

    /// The event loop: until a signal has stopped every executor, or (one file) the plan ended.
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let dir = self.target.dir();
        let relevant = {
            let target = self.target.clone();
            move |p: &Path| target.relevant(p)
        };
        let mut watcher = Debouncer::watch(&dir, QUIET, relevant)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        if let Target::Dir(dir) = &self.target {
            self.log().info(
                None,
                "started",
                &format!(
                    "watching {} for *.yaml plans (not its subfolders)",
                    dir.display()
                ),
            );
        }
        self.rescan();
        let mut rescanned = Instant::now();
        loop {
            if stop.load(Ordering::SeqCst) && !self.shutting_down {
                self.shut_down();
            }
            match watcher.wait(TICK) {
                Wake::Settled if !self.shutting_down => {
                    self.rescan();
                    rescanned = Instant::now();
                }
                Wake::Failed(e) => self.log().warn(None, "watch-error", &e),
                Wake::Settled | Wake::Tick => {}
            }
            if !self.shutting_down && (self.dirty || rescanned.elapsed() >= RESCAN) {
                self.dirty = false;
                self.rescan();
                rescanned = Instant::now();
            }
            self.poll();
            let idle = self.slots.values().all(|s| s.run.is_none());
            match self.target {
                _ if self.shutting_down && idle => break,
                Target::File(_) if idle => break,
                _ => {}
            }
        }
        if matches!(self.target, Target::Dir(_)) {
            self.flush_notifications();
            self.log().info(
                None,
                "stopped",
                "every executor stopped; progress is recorded",
            );
        }
        Ok(())
    }

    fn shut_down(&mut self) {
        self.shutting_down = true;
        let running = self.slots.values().filter(|s| s.run.is_some()).count();
        self.log().info(
            None,
            "stopping",
            &format!("signal received: stopping {running} executor(s) after their steps in flight"),
        );
        for slot in self.slots.values_mut() {
            if let Some(n) = &slot.notifier {
                n.quiet_cancellations(false);
            }
            if let Some(run) = &slot.run {
                run.stop();
                // A removed plan still has its steps recorded as cancelled for the removal.
                if !matches!(slot.next, Next::Remove) {
                    slot.next = Next::Shutdown;
                }
            }
        }
    }

    /// Reads every plan file again and acts on what changed.
    fn rescan(&mut self) {
        let present = match self.target.list() {
            Ok(found) => found,
            Err(e) => {
                self.log().error(
                    None,
                    "scan-error",
                    &format!("cannot list {}: {e}", self.target.dir().display()),
                );
                return;
            }
        };
        let gone: Vec<PathBuf> = self
            .slots
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.remove(&path);
        }
        for path in present {
            let inputs = self.inputs(&path);
            let mut slot = self.slots.remove(&path).unwrap_or_else(|| Slot::new(&path));
            if slot.seen.as_ref() != Some(&inputs) {
                slot.seen = Some(inputs);
                self.changed(&mut slot);
            }
            self.slots.insert(path, slot);
        }
    }

    fn inputs(&self, path: &Path) -> Inputs {
        // Bounded and regular files only: a FIFO named `*.yaml` must not hang the reconciler.
        let sha256 = match crate::fsutil::read_regular(path, crate::plan_file::MAX_PLAN_BYTES) {
            Ok(bytes) => crate::plan_file::sha256_hex(&bytes),
            Err(e) => format!("unreadable: {e}"),
        };
        let config = config::discover(self.env.config, Some(path)).map_err(|d| d.to_string());
        Inputs { sha256, config }
    }

    /// A plan file is new or its inputs changed.
    fn changed(&self, slot: &mut Slot<'scope>) {
        if matches!(slot.next, Next::Remove | Next::Shutdown) {
            return;
        }
        let log = self.log();
        let label = slot.label.clone();
        let label = Some(label.as_str());
        let loaded = match ops::load(&slot.path, self.env.config) {
            Ok(loaded) => loaded,
            Err(diags) => {
                let keep = if slot.in_force().is_some() {
                    "the version in force keeps running"
                } else {
                    "nothing of it runs until it is fixed"
                };
                log.error(
                    label,
                    "invalid",
                    &self.located(&diags, &format!("; {keep}")),
                );
                return;
            }
        };
        if let Some(current) = slot.in_force() {
            if current.file.sha256 == loaded.file.sha256 && current.config == loaded.config {
                log.info(
                    label,
                    "unchanged",
                    "the file is valid and the same as the version in force; nothing to re-plan",
                );
                return;
            }
        }
        if let Err(e) = self.ensure_store(slot, &loaded) {
            log.error(label, "lock", &e);
            // Try again at the next rescan: the holder may be gone by then.
            slot.seen = None;
            return;
        }
        let Some(store) = slot.store.clone() else {
            return;
        };
        let (plan, connections) = match self.project(&loaded.file, &store) {
            Ok(projected) => projected,
            Err(e) => {
                let keep = if slot.in_force().is_some() {
                    " (the version in force keeps running)"
                } else {
                    ""
                };
                log.error(label, "plan-error", &format!("cannot plan it{keep}: {e}"));
                return;
            }
        };
        if let Err(e) = check(&store, &plan) {
            let keep = if slot.in_force().is_some() {
                "the version in force keeps running"
            } else {
                "nothing of it runs"
            };
            log.error(label, "refused", &format!("edit refused: {e}; {keep}"));
            return;
        }
        if let Some(clash) = self.overlap(&loaded.file, &plan) {
            let keep = if slot.in_force().is_some() {
                "the version in force keeps running"
            } else {
                "nothing of it runs"
            };
            log.error(label, "overlap", &format!("{clash}; {keep}"));
            return;
        }
        self.describe(slot, &loaded, &plan);
        if let Some(run) = &slot.run {
            if let Some(n) = &slot.notifier {
                n.quiet_cancellations(true);
            }
            run.stop();
            slot.next = Next::Replan(Box::new(loaded));
            log.info(
                label,
                "replanning",
                "stopping the executor after its step in flight, to start again on the new version",
            );
        } else {
            self.start(slot, loaded, plan, connections);
        }
    }

    /// Whether `plan` would change a domain at a time another plan of the folder (one already
    /// accepted) changes it; the located problems when it would.
    fn overlap(&self, file: &PlanFile, plan: &Plan) -> Option<String> {
        let others: Vec<(&PlanFile, &Plan)> = self
            .slots
            .values()
            .filter(|s| s.path != file.path)
            .filter_map(|s| s.accepted.as_ref())
            .map(|a| (&a.loaded.file, a.plan.as_ref()))
            .collect();
        let mut problems = Vec::new();
        for other in others {
            problems.extend(planner::overlap::overlaps(&[other, (file, plan)]));
        }
        if problems.is_empty() {
            return None;
        }
        Some(self.located(&problem_diagnostics(file, &problems), ""))
    }

    /// Logs what a new version changes: the file's diff and the projected changes.
    fn describe(&self, slot: &Slot<'scope>, loaded: &Loaded, plan: &Plan) {
        let log = self.log();
        let label = Some(slot.label.as_str());
        let Some(current) = slot.in_force() else {
            log.info(
                label,
                "added",
                &format!("plan `{}`: {}", plan.meta.name, diff::counts(plan)),
            );
            return;
        };
        let mut message = format!("plan `{}` changed: {}", plan.meta.name, diff::counts(plan));
        if current.config != loaded.config {
            message.push_str("\nits configuration changed");
        }
        let file_diff = diff::plan_file(&slot.label, &current.file.source, &loaded.file.source);
        for (tag, line) in diff::tagged(&file_diff) {
            let tone = match tag {
                Some(similar::ChangeTag::Insert) => Some(Tone::Added),
                Some(similar::ChangeTag::Delete) => Some(Tone::Removed),
                _ => None,
            };
            message.push('\n');
            message.push_str(&tone.map_or_else(|| line.to_owned(), |t| log.paint(t, line)));
        }
        let old_plan = slot.accepted.as_ref().map(|a| a.plan.as_ref());
        let changes = diff::changes(old_plan, plan);
        if !changes.is_empty() {
            message.push_str("\nprojected changes:");
            for line in changes {
                let tone = if line.starts_with('+') {
                    Tone::Added
                } else {
                    Tone::Removed
                };
                message.push_str("\n  ");
                message.push_str(&log.paint(tone, &line));
            }
        }
        log.info(label, "changed", &message);
    }

    /// Takes the plan's executor lock and opens its lockfile, once.
    fn ensure_store(&self, slot: &mut Slot<'scope>, loaded: &Loaded) -> Result<(), String> {
        if slot.store.is_some() {
            return Ok(());
        }
        let file = &loaded.file;
        // No waiting here: a held plan is tried again at the next rescan.
        let locked = ops::lock(
            &file.path,
            loaded.config.state_dir.as_deref(),
            &file.sha256,
            self.env.clock,
            None,
            &mut |_| {},
        )
        .map_err(|e| e.to_string())?;
        let (lock, store) = (locked.lock, locked.store);
        if !file.notify.is_empty() {
            slot.notifier = Some(Notifier::start(
                file.notify.clone(),
                RunInfo {
                    plan: PlanRef {
                        name: file.name.clone(),
                        file: file.path.display().to_string(),
                        sha256: file.sha256.clone(),
                    },
                    connections: BTreeMap::new(),
                },
                &store,
                notify_log(self.env.log, &slot.label),
                Retry::default(),
            ));
        }
        slot.held = Some(lock);
        slot.store = Some(store);
        Ok(())
    }

    /// Projects `file` over live state with the lockfile as progress.
    fn project(&self, file: &PlanFile, store: &LockStore) -> Result<(Plan, Connections), String> {
        let mut retried = false;
        loop {
            let connections = self.env.pool.for_file(file, self.env.connect)?;
            // A resumed plan starts from settled domains, as `apply` does.
            let log = self.log();
            match ops::project_resumed(
                file,
                &connections,
                self.env.connect,
                self.env.clock,
                store,
                &mut |m| log.info(None, "settling", m),
                None,
            ) {
                Ok(plan) => return Ok((plan, connections)),
                // A long-lived connection may have broken: open it again, once.
                Err(ops::ResumeError::Plan(PlanError::Libvirt { ref source, .. }))
                    if source.kind == ErrorKind::Transient && !retried =>
                {
                    self.env.pool.evict(&connections);
                    retried = true;
                }
                Err(ops::ResumeError::Plan(PlanError::Problems(problems))) => {
                    return Err(self.located(&problem_diagnostics(file, &problems), ""));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Located problems followed by `tail`: with source lines for people, one line per
    /// problem (`file:line:column: message (help: ...)`) in JSON.
    fn located(&self, diags: &Diagnostics, tail: &str) -> String {
        let count = diags.items.len();
        match self.log().format {
            LogFormat::Human => format!(
                "{} has {count} problem{}{tail}\n{}",
                diags.file.display(),
                if count == 1 { "" } else { "s" },
                diags.render().trim_end()
            ),
            LogFormat::Json => format!("{diags}{tail}"),
        }
    }

    /// Starts an executor on `plan`, which was projected from `loaded` and checked.
    fn start(&self, slot: &mut Slot<'scope>, loaded: Loaded, plan: Plan, connections: Connections) {
        let Some(store) = slot.store.clone() else {
            return;
        };
        for warning in &plan.warnings {
            self.log().warn(Some(&slot.label), "warning", warning);
        }
        let mut settings = Settings::for_plan(&plan).with_lease_config(loaded.config.lease);
        settings.failpoint.clone_from(&self.env.failpoint);
        if let Some(n) = &slot.notifier {
            n.set_connections(crate::notify::queue::step_connections(&plan));
            n.quiet_cancellations(false);
            if !slot.announced {
                if let Err(e) = n.plan_started(self.env.clock.now()) {
                    self.log()
                        .warn(Some(&slot.label), "notify", &format!("plan-started: {e}"));
                }
                slot.announced = true;
            }
        }
        let plan = Arc::new(plan);
        let left = plan.steps.iter().filter(|s| !s.done).count();
        self.log().info(
            Some(&slot.label),
            "running",
            &format!(
                "executor started: {left} step(s) to run; progress in {}",
                store.path().display()
            ),
        );
        let job = Job {
            label: slot.label.clone(),
            plan: Arc::clone(&plan),
            connections,
            store,
            settings,
        };
        slot.run = Some(Runner::start(self.scope, self.env, job));
        slot.accepted = Some(Accepted { loaded, plan });
    }

    /// Handles executors that ended.
    fn poll(&mut self) {
        let ended: Vec<PathBuf> = self
            .slots
            .iter()
            .filter(|(_, s)| s.run.as_ref().is_some_and(Runner::is_finished))
            .map(|(p, _)| p.clone())
            .collect();
        for path in ended {
            let Some(mut slot) = self.slots.remove(&path) else {
                continue;
            };
            let Some(run) = slot.run.take() else {
                continue;
            };
            let result = run.join();
            let next = std::mem::replace(&mut slot.next, Next::Nothing);
            match next {
                Next::Nothing => {
                    self.ended(&slot, &result);
                    self.finish_notify(&mut slot, "");
                    slot.last = result.ok();
                }
                Next::Shutdown => {
                    self.stopped(&slot, &result);
                    self.finish_notify(&mut slot, "stopped by a signal; the steps left run when `virtplan watch` starts again");
                    slot.last = result.ok();
                }
                Next::Replan(loaded) => {
                    if let Err(e) = &result {
                        self.log()
                            .error(Some(&slot.label), "executor-error", &e.to_string());
                    }
                    self.restart(&mut slot, *loaded, result.ok().as_ref());
                }
                Next::Remove => {
                    self.cancel_left(&slot);
                    // The file may be back already: look again.
                    self.dirty = true;
                    continue;
                }
            }
            self.slots.insert(path, slot);
        }
    }

    /// Starts again on `loaded` after the old executor stopped; falls back to the version in
    /// force when the new one no longer fits (a step finished meanwhile, or libvirt failed).
    fn restart(&self, slot: &mut Slot<'scope>, loaded: Loaded, report: Option<&Report>) {
        let log = self.log();
        let Some(store) = slot.store.clone() else {
            return;
        };
        // Steps the stop cancelled are simply not started yet.
        for o in report.iter().flat_map(|r| &r.outcomes) {
            if o.status == StepStatus::Cancelled && !o.earlier {
                let reset = store.update(&o.step_id, &o.uuid, |r| {
                    r.status = StepStatus::Pending;
                    r.finished_at = None;
                    r.message.clear();
                });
                if let Err(e) = reset {
                    log.error(Some(&slot.label), "executor-error", &e.to_string());
                    return;
                }
            }
        }
        if let Some(n) = &slot.notifier {
            n.quiet_cancellations(false);
        }
        let attempt = self
            .project(&loaded.file, &store)
            .and_then(|(plan, conns)| {
                check(&store, &plan)
                    .map(|()| (plan, conns))
                    .map_err(|e| e.to_string())
            });
        match attempt {
            Ok((plan, connections)) => {
                log.info(Some(&slot.label), "replanned", "running the new version");
                self.start(slot, loaded, plan, connections);
            }
            Err(e) => {
                log.error(
                    Some(&slot.label),
                    "refused",
                    &format!("the new version cannot start after all: {e}"),
                );
                let Some(old) = slot.accepted.take() else {
                    return;
                };
                match self.project(&old.loaded.file, &store) {
                    Ok((plan, connections)) => {
                        log.info(Some(&slot.label), "resumed", "the version in force runs on");
                        self.start(slot, old.loaded, plan, connections);
                    }
                    Err(e) => {
                        log.error(
                            Some(&slot.label),
                            "plan-error",
                            &format!("the version in force cannot be planned either: {e}; nothing runs until the file changes"),
                        );
                        slot.accepted = Some(old);
                    }
                }
            }
        }
    }

    /// An executor ended by itself.
    fn ended(&self, slot: &Slot<'scope>, result: &Result<Report, LockError>) {
        let log = self.log();
        let label = Some(slot.label.as_str());
        match result {
            Err(e) => log.error(label, "executor-error", &e.to_string()),
            Ok(report) => {
                if let Some(fatal) = &report.fatal {
                    log.error(
                        label,
                        "executor-error",
                        &format!("stopped: progress could not be recorded: {fatal}"),
                    );
                    return;
                }
                let lock = slot.store.as_ref().map(|s| s.snapshot());
                let mut counts: BTreeMap<StepStatus, usize> = BTreeMap::new();
                for r in lock.iter().flat_map(|l| &l.steps) {
                    *counts.entry(r.status).or_default() += 1;
                }
                let summary = counts
                    .iter()
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let level = if report.any_failed() {
                    log::Level::Warn
                } else {
                    log::Level::Info
                };
                log.event(
                    level,
                    label,
                    "finished",
                    &format!("every step is settled: {summary}"),
                );
            }
        }
    }

    /// Waits (a bounded time, shared by every plan) for notifications still being delivered.
    fn flush_notifications(&self) {
        let deadline = Instant::now() + NOTIFY_FLUSH;
        for slot in self.slots.values() {
            let Some(n) = &slot.notifier else { continue };
            let left = n.flush(deadline.saturating_duration_since(Instant::now()));
            if left > 0 {
                self.log().warn(
                    Some(&slot.label),
                    "notify",
                    &format!("{left} notification delivery(ies) not done in time; they stay pending in the lockfile and go out when the plan runs again"),
                );
            }
        }
    }

    /// `plan-finished` for a watched folder's plan (`apply --watch` sends its own).
    fn finish_notify(&self, slot: &mut Slot<'scope>, message: &str) {
        if !matches!(self.target, Target::Dir(_)) || !slot.announced {
            return;
        }
        if let Some(n) = &slot.notifier {
            if let Err(e) = n.plan_finished(self.env.clock.now(), message.to_owned()) {
                self.log()
                    .warn(Some(&slot.label), "notify", &format!("plan-finished: {e}"));
            }
        }
        slot.announced = false;
    }

    /// An executor stopped for a signal.
    fn stopped(&self, slot: &Slot<'scope>, result: &Result<Report, LockError>) {
        let label = Some(slot.label.as_str());
        match result {
            Err(e) => self.log().error(label, "executor-error", &e.to_string()),
            Ok(report) => {
                let cancelled = report
                    .outcomes
                    .iter()
                    .filter(|o| o.status == StepStatus::Cancelled)
                    .count();
                self.log().info(
                    label,
                    "stopped",
                    &format!("{cancelled} step(s) not started, recorded cancelled; they run when the executor starts again"),
                );
            }
        }
    }

    /// The plan file is gone.
    fn remove(&mut self, path: &Path) {
        let Some(mut slot) = self.slots.remove(path) else {
            return;
        };
        if matches!(slot.next, Next::Remove) {
            self.slots.insert(path.to_path_buf(), slot);
            return;
        }
        if let Some(run) = &slot.run {
            run.stop();
            slot.next = Next::Remove;
            self.log().info(
                Some(&slot.label),
                "removing",
                "the plan file was removed: stopping its executor after the step in flight",
            );
            self.slots.insert(path.to_path_buf(), slot);
        } else {
            self.cancel_left(&slot);
        }
    }

    /// Records every step of a removed plan that did not run as cancelled; releases its lock.
    fn cancel_left(&self, slot: &Slot<'scope>) {
        let log = self.log();
        let label = Some(slot.label.as_str());
        let Some(store) = &slot.store else {
            log.info(
                label,
                "removed",
                "the plan file was removed; nothing of it had run",
            );
            return;
        };
        let now = self.env.clock.now();
        let mut cancelled = 0;
        for r in store.snapshot().steps {
            if !matches!(r.status, StepStatus::Pending | StepStatus::Cancelled) {
                continue;
            }
            let write = store.update(&r.step_id, &r.uuid, |r| {
                r.status = StepStatus::Cancelled;
                r.finished_at = Some(now);
                "not run: the plan file was removed".clone_into(&mut r.message);
            });
            if let Err(e) = write {
                log.error(label, "executor-error", &e.to_string());
                return;
            }
            cancelled += 1;
        }
        log.info(
            label,
            "removed",
            &format!(
                "the plan file was removed: {cancelled} step(s) that had not run are recorded cancelled in {}",
                store.path().display()
            ),
        );
    }
}

/// How long a stopping `watch` waits for notifications still being delivered.
const NOTIFY_FLUSH: Duration = Duration::from_secs(30);

/// A notifier's failure reports as `notify` warnings of the reconciler's log (format and
/// stream as configured; timestamps from the system clock, as the notifier's threads outlive
/// any borrowed clock).
fn notify_log(log: &Log<'_>, label: &str) -> Box<crate::notify::queue::Log> {
    let (format, stream, printer) = (log.format, log.stream, log.printer.clone());
    let label = label.to_owned();
    Box::new(move |message: &str| {
        let log = Log {
            format,
            stream,
            printer: printer.clone(),
            clock: &crate::clock::SystemClock,
        };
        log.warn(Some(&label), "notify", message);
    })
}

/// Whether `plan` may replace what the lockfile records: a done (or running) step must still be
/// in it, whatever changed (the plan file or only its configuration), and the domains must be
/// the same ones. Checked on a copy: nothing is written.
fn check(store: &LockStore, plan: &Plan) -> Result<(), LockError> {
    ops::check(&store.snapshot(), store.path(), plan)
}

/// Plan-time problems of `file` as its located diagnostics.
fn problem_diagnostics(file: &PlanFile, problems: &[planner::PlanProblem]) -> Diagnostics {
    Diagnostics {
        file: file.path.clone(),
        text: Some(file.source.clone()),
        items: problems.iter().map(|p| p.diagnostic(&file.path)).collect(),
    }
}
