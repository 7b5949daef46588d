//! What is scheduled, offline: each step's status from the plan file, its lockfile and the
//! operator's cancellations, and who holds the plan. Shared by `status`, `ls` and `cancel`;
//! no libvirt call (a plan never applied lists its steps by the names written in it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::cancel::{CancelLog, CancelRecord};
use crate::lockfile::{self, LockError, LockStore, Lockfile, StepStatus};
use crate::plan_file::{Attributes, PlanFile};

/// `status --format json`: its schema is `schemas/status.schema.json`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StatusDoc {
    /// One entry per step and domain, in time order.
    pub steps: Vec<StatusStep>,
    /// Notification events not delivered to every target yet (absent when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<StatusNotification>,
    /// The `--only` / `--exclude` filter of the last apply (absent when it had none): the
    /// steps of the domains it left out are still pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<crate::filter::Filter>,
}

/// A notification event that some target has not taken.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct StatusNotification {
    /// The event's stable id.
    pub id: String,
    /// `step-failed`, `plan-finished`, ...
    pub event: String,
    pub step: Option<usize>,
    pub vm: Option<String>,
    /// `pending` (not tried to the end yet) or `failed` (refused after every retry); the next
    /// `apply` sends both again.
    pub delivery: lockfile::Delivery,
    /// The last failure, with the target redacted.
    pub error: String,
}

/// The lockfile's notification events that some target has not taken.
#[must_use]
pub fn undelivered(lock: &Lockfile) -> Vec<StatusNotification> {
    lock.events
        .iter()
        .filter(|e| e.delivery != lockfile::Delivery::Sent)
        .map(|e| StatusNotification {
            id: e.id.clone(),
            event: e.event.clone(),
            step: e.step,
            vm: e.vm.clone(),
            delivery: e.delivery,
            error: e.error.clone(),
        })
        .collect()
}

/// One step on one domain.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct StatusStep {
    /// Stable step id (a hash of what the step asks for).
    pub id: String,
    /// 1-based step number in the plan file.
    pub step: usize,
    /// When the step is due (RFC 3339); null when it runs as soon as apply starts.
    pub at: Option<DateTime<Utc>>,
    /// The domain as named in the plan (or as libvirt named it when it ran).
    pub vm: String,
    /// The domain's UUID; empty until an apply has resolved the name.
    pub uuid: String,
    /// What the step changes.
    pub what: String,
    pub status: StepStatus,
    /// When it started (RFC 3339).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended (RFC 3339).
    pub finished_at: Option<DateTime<Utc>>,
    pub message: String,
    /// Who cancelled it with `virtplan cancel` (`user@host`); null when nobody did.
    pub cancelled_by: Option<String>,
    /// When it was cancelled (RFC 3339).
    pub cancelled_at: Option<DateTime<Utc>>,
}

impl From<&Lockfile> for StatusDoc {
    fn from(lock: &Lockfile) -> Self {
        Self {
            steps: rows(None, Some(lock), &[], None),
            notifications: undelivered(lock),
            filter: lock.filter.clone(),
        }
    }
}

/// The JSON Schema of [`StatusDoc`], pretty-printed with a trailing newline.
#[must_use]
pub fn status_schema() -> String {
    let schema = schemars::schema_for!(StatusDoc);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// `power, memory`: the attribute keys a step sets, as written in the plan.
#[must_use]
pub fn attribute_names(a: &Attributes) -> String {
    let keys = [
        ("power", a.power.is_some()),
        ("snapshot", a.snapshot.is_some()),
        ("max_memory", a.max_memory.is_some()),
        ("memory", a.memory.is_some()),
        ("max_vcpus", a.max_vcpus.is_some()),
        ("vcpus", a.vcpus.is_some()),
        ("clock", a.clock.is_some()),
        ("autostart", a.autostart.is_some()),
        ("title", a.title.is_some()),
        ("description", a.description.is_some()),
    ];
    keys.iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each step on each domain: the lockfile's records, plus steps of the plan it has no record
/// of yet (pending), with the operator's cancellations applied. `zone` words the messages.
#[must_use]
pub fn rows(
    file: Option<&PlanFile>,
    lock: Option<&Lockfile>,
    cancels: &[CancelRecord],
    zone: Option<Tz>,
) -> Vec<StatusStep> {
    let mut out: Vec<StatusStep> = Vec::new();
    if let Some(lock) = lock {
        let mut lock = lock.clone();
        lock.sort();
        out.extend(lock.steps.into_iter().map(|r| StatusStep {
            id: r.step_id,
            step: r.step,
            at: r.at,
            vm: r.vm,
            uuid: r.uuid,
            what: r.what,
            status: r.status,
            started_at: r.started_at,
            finished_at: r.finished_at,
            message: r.message,
            cancelled_by: None,
            cancelled_at: None,
        }));
    }
    if let Some(file) = file {
        // A set, not a scan of the rows per step: that made `status` quadratic in steps.
        let recorded: std::collections::HashSet<String> =
            out.iter().map(|r| r.id.clone()).collect();
        for step in &file.steps {
            let id = step.id();
            if recorded.contains(&id) {
                continue;
            }
            for target in &step.targets {
                out.push(StatusStep {
                    id: id.clone(),
                    step: step.number,
                    at: step.at.as_ref().map(|a| a.value),
                    vm: target.name_or_uuid.clone(),
                    uuid: String::new(),
                    what: attribute_names(&step.attributes),
                    status: StepStatus::Pending,
                    started_at: None,
                    finished_at: None,
                    message: String::new(),
                    cancelled_by: None,
                    cancelled_at: None,
                });
            }
        }
    }
    let mut cancelled: std::collections::HashMap<&str, &CancelRecord> =
        std::collections::HashMap::new();
    for c in cancels {
        cancelled.entry(c.step_id.as_str()).or_insert(c);
    }
    for row in &mut out {
        if let Some(c) = cancelled.get(row.id.as_str()) {
            row.cancelled_by = Some(c.by.clone());
            row.cancelled_at = Some(c.at);
            // A step that never ran stays cancelled; one that ran keeps what happened.
            if matches!(
                row.status,
                StepStatus::Pending | StepStatus::Skipped | StepStatus::Cancelled
            ) {
                row.status = StepStatus::Cancelled;
                row.message = format!("not run: {}", c.describe(zone));
            }
        }
    }
    out.sort_by(|a, b| (a.at, a.step, &a.vm, &a.uuid).cmp(&(b.at, b.step, &b.vm, &b.uuid)));
    out
}

/// The process holding a plan's executor lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// When it took the lock (RFC 3339).
    pub since: Option<DateTime<Utc>>,
}

/// Who holds the executor lock `pid_path`, without touching the lock: taking it even for an
/// instant could make an `apply` starting at that moment fail. On Linux the kernel's lock
/// table (`/proc/locks`) says whether the file is locked; the file says by whom.
#[must_use]
pub fn holder(pid_path: &Path) -> Option<Holder> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(pid_path).ok()?;
    let text = std::fs::read_to_string(pid_path).ok()?;
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let pid: u32 = field("pid")?.parse().ok()?;
    let host = field("host").unwrap_or_default();
    let since = field("since")
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc));
    let locked = match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => {
            let (major, minor) = (dev_major(meta.dev()), dev_minor(meta.dev()));
            let ino = meta.ino();
            locks.lines().any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // `1: FLOCK  ADVISORY  WRITE 4242 08:01:131 0 EOF`
                f.get(1) == Some(&"FLOCK")
                    && f.get(5).is_some_and(|dev| {
                        let mut parts = dev.split(':');
                        let maj = parts.next().and_then(|m| u64::from_str_radix(m, 16).ok());
                        let min = parts.next().and_then(|m| u64::from_str_radix(m, 16).ok());
                        let i = parts.next().and_then(|i| i.parse::<u64>().ok());
                        maj == Some(major) && min == Some(minor) && i == Some(ino)
                    })
            })
        }
        // No lock table: trust a live process of that pid on this host.
        Err(_) => {
            host == gethostname::gethostname().to_string_lossy()
                && Path::new(&format!("/proc/{pid}")).exists()
        }
    };
    locked.then_some(Holder { pid, host, since })
}

fn dev_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

/// Where a plan's state lives.
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub lockfile: PathBuf,
    pub pid: PathBuf,
    pub cancels: CancelLog,
}

impl StatePaths {
    /// The files of the plan at `plan`: beside it (`web.lock`, `web.lock.pid`), or in
    /// `state_dir` when virtplan.toml sets one, named after the plan's stem and a hash of its
    /// canonical path (`web-1a2b3c4d.lock`), so plans of the same name in different folders
    /// never share a lockfile.
    #[must_use]
    pub fn of(plan: &Path, state_dir: Option<&Path>) -> Self {
        let (lockfile, pid) = match state_dir {
            None => (lockfile::lock_path(plan), lockfile::pid_path(plan)),
            Some(dir) => {
                let name = state_name(plan);
                (
                    dir.join(format!("{name}.lock")),
                    dir.join(format!("{name}.lock.pid")),
                )
            }
        };
        Self {
            cancels: CancelLog::for_lockfile(&lockfile),
            pid,
            lockfile,
        }
    }

    /// Creates the state folder when it is not the plan's own (mode 0700: lockfiles record
    /// what ran where).
    ///
    /// # Errors
    /// The folder cannot be created.
    pub fn prepare(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        match self.lockfile.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir),
            _ => Ok(()),
        }
    }

    /// The lockfile, or `None` when no apply has run yet.
    ///
    /// # Errors
    /// An unreadable, corrupt or newer-format lockfile.
    pub fn read_lock(&self) -> Result<Option<Lockfile>, LockError> {
        match LockStore::read(&self.lockfile) {
            Ok(lock) => Ok(Some(lock)),
            Err(LockError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// `web-1a2b3c4d`: the plan's stem and the first 8 hex digits of the SHA-256 of its canonical
/// path (symlinks resolved; the absolute path when the plan no longer exists).
#[must_use]
pub fn state_name(plan: &Path) -> String {
    // A removed plan's folder usually remains: resolve it the same way.
    let canonical = std::fs::canonicalize(plan)
        .or_else(|_| {
            let parent = plan.parent().filter(|p| !p.as_os_str().is_empty());
            let dir = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))?;
            Ok::<_, std::io::Error>(dir.join(plan.file_name().unwrap_or_default()))
        })
        .or_else(|_| std::path::absolute(plan))
        .unwrap_or_else(|_| plan.to_path_buf());
    let hash = crate::plan_file::sha256_hex(canonical.as_os_str().as_encoded_bytes());
    let stem = plan
        .file_stem()
        .map_or_else(|| "plan".into(), |s| s.to_string_lossy());
    format!("{stem}-{}", &hash[..8])
}

/// A plan looked at offline: its configuration, the plan itself when it validates, and where
/// its state lives.
#[derive(Debug)]
pub struct Inspected {
    pub file: Option<PlanFile>,
    /// Why the plan (or its virtplan.toml) does not validate.
    pub problems: Option<crate::plan_file::Diagnostics>,
    pub paths: StatePaths,
}

impl Inspected {
    /// Discovers the configuration and validates the plan at `plan` (which may be gone: its
    /// state can outlive it). An invalid virtplan.toml leaves the state beside the plan.
    #[must_use]
    pub fn of(plan: &Path, config: Option<&Path>) -> Self {
        Self::reading(plan, config, false, |_| ()).0
    }

    /// [`Inspected::of`], and the lockfile it names read ([`StatePaths::read_lock`]) while
    /// the plan is validated: two files that do not depend on each other, each costing about
    /// as much as the other for a large plan, so `status` waits for the longer, not the sum.
    /// The steps' ids, by which `status` finds their records, are hashed on this side too.
    pub fn with_lock(
        plan: &Path,
        config: Option<&Path>,
    ) -> (Self, Result<Option<crate::lockfile::Lockfile>, LockError>) {
        Self::reading(plan, config, true, StatePaths::read_lock)
    }

    /// Validates the plan (and, with `hash_ids`, hashes its steps' ids: validation leaves most
    /// unhashed) while `also` reads from its state paths on another thread.
    fn reading<T: Send>(
        plan: &Path,
        config: Option<&Path>,
        hash_ids: bool,
        also: impl FnOnce(&StatePaths) -> T + Send,
    ) -> (Self, T) {
        let config = crate::config::discover(config, Some(plan));
        let state_dir = config.as_ref().ok().and_then(|c| c.state_dir.clone());
        let paths = StatePaths::of(plan, state_dir.as_deref());
        let (loaded, also) = std::thread::scope(|scope| {
            let also = scope.spawn(|| also(&paths));
            let loaded = config.and_then(|config| {
                crate::plan_file::load(plan, &crate::plan_file::LoadContext::from(config))
            });
            if let (Ok(file), true) = (&loaded, hash_ids) {
                file.steps.iter().for_each(|s| drop(s.id()));
            }
            (loaded, also.join())
        });
        let also = match also {
            Ok(also) => also,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let inspected = match loaded {
            Ok(file) => Self {
                file: Some(file),
                problems: None,
                paths,
            },
            Err(d) => Self {
                file: None,
                problems: Some(d),
                paths,
            },
        };
        (inspected, also)
    }

    /// The plan's zone, for showing times.
    #[must_use]
    pub fn zone(&self) -> Option<Tz> {
        self.file.as_ref().and_then(|f| f.timezone)
    }
}

/// Counts of step records per status (every status present, zeros included).
#[must_use]
pub fn counts(rows: &[StatusStep]) -> BTreeMap<StepStatus, usize> {
    let mut counts: BTreeMap<StepStatus, usize> = [
        StepStatus::Pending,
        StepStatus::Running,
        StepStatus::Done,
        StepStatus::Failed,
        StepStatus::Skipped,
        StepStatus::Missed,
        StepStatus::Cancelled,
    ]
    .into_iter()
    .map(|s| (s, 0))
    .collect();
    for r in rows {
        *counts.entry(r.status).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_is_seen_through_the_kernel_lock_table_without_taking_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("p.lock.pid");
        let now = DateTime::parse_from_rfc3339("2026-12-01T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(holder(&pid), None, "no file, no holder");
        let lock = lockfile::ExecutorLock::acquire(&pid, now).unwrap();
        let seen = holder(&pid).expect("held");
        assert_eq!(seen.pid, std::process::id());
        assert_eq!(seen.since, Some(now));
        // Looking did not take it: the holder still holds it exclusively.
        assert!(lockfile::ExecutorLock::acquire(&pid, now).is_err());
        drop(lock);
        assert_eq!(
            holder(&pid),
            None,
            "released: the file stays but nobody holds it"
        );
    }
}

/// `ls --format json`: its schema is printed by `virtplan schema ls`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LsDoc {
    pub format_version: u32,
    /// When the listing was made (RFC 3339); `in_seconds` counts from here.
    pub now: DateTime<Utc>,
    pub plans: Vec<PlanSummary>,
}

/// One plan (or the leftover state of a removed one).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PlanSummary {
    /// The plan file as given or found.
    pub plan: PathBuf,
    /// `name` in the plan (its stem when the plan is gone or invalid).
    pub name: String,
    /// `ok`, `invalid` (does not validate; its recorded progress is still shown) or `removed`
    /// (the plan file is gone; only its lockfile remains).
    pub state: PlanState,
    /// Why the plan does not validate (the first problem, located).
    pub problem: Option<String>,
    /// The plan's IANA zone (times for people are shown in it).
    pub timezone: Option<String>,
    /// The progress file, and whether it exists (an apply has run).
    pub lockfile: PathBuf,
    pub lockfile_exists: bool,
    /// The executor holding the plan right now (`apply` or `watch`), if any.
    pub holder: Option<Holder>,
    /// The earliest step not started yet.
    pub next: Option<NextStep>,
    /// Step records per status (per step and domain; per step and named domain before the
    /// first apply).
    pub counts: BTreeMap<StepStatus, usize>,
}

/// The state of a listed plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlanState {
    Ok,
    Invalid,
    Removed,
}

/// The next step to start.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct NextStep {
    pub step: usize,
    pub vms: Vec<String>,
    /// What it changes.
    pub what: String,
    /// When it is due (RFC 3339); null: as soon as apply starts.
    pub at: Option<DateTime<Utc>>,
    /// Seconds from `now` until `at` (negative: overdue).
    pub in_seconds: Option<i64>,
    /// Its grace has passed: an apply would record it missed.
    pub overdue: bool,
}

/// The JSON Schema of [`LsDoc`], pretty-printed with a trailing newline.
#[must_use]
pub fn ls_schema() -> String {
    let schema = schemars::schema_for!(LsDoc);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// Summarizes the plan at `plan` (which may be gone, leaving its lockfile).
#[must_use]
pub fn summarize(plan: &Path, config: Option<&Path>, now: DateTime<Utc>) -> PlanSummary {
    let inspected = Inspected::of(plan, config);
    let stem = plan
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let mut problems: Vec<String> = Vec::new();
    let state = if !plan.exists() {
        PlanState::Removed
    } else if let Some(d) = &inspected.problems {
        if let Some(first) = d.items.first() {
            problems.push(format!(
                "{}:{}: {}",
                first.file.display(),
                first.pos,
                first.message
            ));
        }
        PlanState::Invalid
    } else {
        PlanState::Ok
    };
    let paths = &inspected.paths;
    let lock = paths.read_lock().unwrap_or_else(|e| {
        problems.push(e.to_string());
        None
    });
    let cancels = paths.cancels.read().unwrap_or_else(|e| {
        problems.push(e.to_string());
        Vec::new()
    });
    let file = inspected.file.as_ref();
    let zone = inspected.zone();
    let rows = rows(file, lock.as_ref(), &cancels, zone);
    let grace = file.map_or(std::time::Duration::from_secs(300), |f| f.grace);
    PlanSummary {
        plan: plan.to_path_buf(),
        name: file.map_or(stem, |f| f.name.clone()),
        state,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        timezone: zone.map(|z| z.name().to_owned()),
        lockfile: paths.lockfile.clone(),
        lockfile_exists: paths.lockfile.exists(),
        holder: holder(&paths.pid),
        next: next_step(&rows, now, grace),
        counts: counts(&rows),
    }
}

fn next_step(
    rows: &[StatusStep],
    now: DateTime<Utc>,
    grace: std::time::Duration,
) -> Option<NextStep> {
    let first = rows
        .iter()
        .filter(|r| r.status == StepStatus::Pending)
        .min_by_key(|r| (r.at, r.step))?;
    let vms = rows
        .iter()
        .filter(|r| r.id == first.id && r.status == StepStatus::Pending)
        .map(|r| r.vm.clone())
        .collect();
    let grace = crate::clock::span(grace);
    Some(NextStep {
        step: first.step,
        vms,
        what: first.what.clone(),
        at: first.at,
        in_seconds: first.at.map(|at| (at - now).num_seconds()),
        overdue: first
            .at
            .and_then(|at| at.checked_add_signed(grace))
            .is_some_and(|deadline| now > deadline),
    })
}

/// The plans to list for `paths` (folders: every `*.yaml` directly in them, plus lockfiles
/// whose plan is gone), in the order given, each folder's sorted by name.
///
/// # Errors
/// A path that is neither a folder, a plan file, nor the former place of a plan whose
/// lockfile remains; an unreadable folder.
pub fn plans_in(paths: &[PathBuf], config: Option<&Path>) -> Result<Vec<PathBuf>, String> {
    let mut out: Vec<PathBuf> = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(path)
                .map_err(|e| format!("cannot list {}: {e}", path.display()))?;
            for entry in entries.flatten() {
                let p = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                // Exactly `*.yaml`, as `watch` picks plans up.
                if p.extension().is_some_and(|e| e == "yaml") && p.is_file() {
                    found.push(p);
                } else if let Some(stem) = name.strip_suffix(".lock") {
                    // A lockfile beside where its plan was.
                    let plan = path.join(format!("{stem}.yaml"));
                    if !plan.exists() {
                        found.push(plan);
                    }
                }
            }
            // Leftover state of removed plans in a state_dir shared by the folder's plans.
            if let Ok(cfg) = crate::config::discover(config, Some(&path.join("_.yaml"))) {
                if let Some(dir) = cfg.state_dir {
                    found.extend(orphans_in_state_dir(&dir, path, &found));
                }
            }
            found.sort();
            found.dedup();
            out.extend(found);
        } else if path.is_file() || Inspected::of(path, config).paths.lockfile.exists() {
            out.push(path.clone());
        } else {
            return Err(format!(
                "{}: no such plan file or folder (and no lockfile of a removed plan there)",
                path.display()
            ));
        }
    }
    Ok(out)
}

/// Lockfiles in `state_dir` named after a plan of `folder` (`<stem>-<hash>.lock`) whose plan is
/// gone: the hash of `folder/<stem>.yaml` identifies them.
fn orphans_in_state_dir(state_dir: &Path, folder: &Path, known: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".lock")?;
            let (stem, _) = base.rsplit_once('-')?;
            let plan = folder.join(format!("{stem}.yaml"));
            (!known.contains(&plan) && state_name(&plan) == base).then_some(plan)
        })
        .collect()
}
