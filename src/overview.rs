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
    /// The files of the plan at `plan`.
    #[must_use]
    pub fn of(plan: &Path) -> Self {
        let lockfile = lockfile::lock_path(plan);
        Self {
            cancels: CancelLog::for_lockfile(&lockfile),
            pid: lockfile::pid_path(plan),
            lockfile,
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
