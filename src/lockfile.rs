//! The progress file `<plan stem>.lock` (versioned TOML, replaced atomically) and the exclusive
//! OS lock `<plan stem>.lock.pid` that keeps a second executor off the same plan.
//!
//! The progress file is what makes `apply` resumable: a step is recorded `running` durably
//! before libvirt is called, and `done` only after its result was read back and verified.
//! The OS lock lives on a separate file that is never renamed: locking the progress file itself
//! would not work, because every atomic replace puts a new, unlocked inode at its path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::planner::{Plan, Progress};
use crate::state::{DomainState, Kib, PowerState};

/// The lockfile format this build reads and writes.
pub const LOCKFILE_VERSION: u32 = 1;

/// Where a step is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Not started yet.
    Pending,
    /// Recorded before the first libvirt call; still `running` after a crash.
    Running,
    /// Applied (or found already applied) and verified.
    Done,
    /// Did not reach its desired state.
    Failed,
    /// Not run because an earlier step of the same domain failed or was missed.
    Skipped,
    /// Could not start by `at + grace` or before the window closed; never run.
    Missed,
    /// Not run because the plan was aborted or the executor was interrupted.
    Cancelled,
}

impl StepStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Missed => "missed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Failed, missed or skipped: the plan did not complete as reviewed.
    #[must_use]
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::Missed | Self::Skipped)
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The figures of a domain recorded before and after a step: compact, for humans and audits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    #[serde(with = "power_text")]
    pub power: PowerState,
    pub memory_kib: Kib,
    pub max_memory_kib: Kib,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub autostart: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub live_memory_kib: Option<Kib>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub live_vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clock_offset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rtc_track: Option<String>,
}

impl From<&DomainState> for Figures {
    fn from(s: &DomainState) -> Self {
        Self {
            power: s.power,
            memory_kib: s.memory,
            max_memory_kib: s.max_memory,
            vcpus: s.vcpus,
            max_vcpus: s.max_vcpus,
            autostart: s.autostart,
            live_memory_kib: s.live.map(|l| l.memory),
            live_vcpus: s.live.map(|l| l.vcpus),
            clock_offset: s.clock.as_ref().and_then(|c| c.offset.clone()),
            rtc_track: s.clock.as_ref().and_then(|c| c.rtc_track.clone()),
        }
    }
}

/// A power state as `status` and the lockfile spell it (`shutting-down`).
mod power_text {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::state::PowerState;

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` signature
    pub fn serialize<S: Serializer>(p: &PowerState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PowerState, D::Error> {
        let text = String::deserialize(d)?;
        PowerState::parse(&text)
            .ok_or_else(|| D::Error::custom(format!("`{text}` is not a power state")))
    }
}

/// One step on one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number in the plan file (informative: ids are what count).
    pub step: usize,
    pub step_id: String,
    pub vm: String,
    pub uuid: String,
    /// What the step changes, in one line.
    #[serde(default)]
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub at: Option<DateTime<Utc>>,
    pub status: StepStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<Figures>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<Figures>,
    /// `power: reboot`: libvirt's id of the running domain before the reboot began, recorded
    /// before the shutdown request, so a resumed run can tell a finished reboot (a new id)
    /// from one that never happened (the same id).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reboot_from: Option<u32>,
}

impl StepRecord {
    /// A record with no times, message or observed figures yet.
    #[must_use]
    pub fn new(
        step: usize,
        step_id: impl Into<String>,
        vm: impl Into<String>,
        uuid: impl Into<String>,
        what: impl Into<String>,
        at: Option<DateTime<Utc>>,
        status: StepStatus,
    ) -> Self {
        Self {
            step,
            step_id: step_id.into(),
            vm: vm.into(),
            uuid: uuid.into(),
            what: what.into(),
            at,
            status,
            started_at: None,
            finished_at: None,
            message: String::new(),
            before: None,
            after: None,
            reboot_from: None,
        }
    }
}

/// The whole progress file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lockfile {
    pub version: u32,
    /// SHA-256 of the plan file the recorded progress belongs to.
    pub plan_sha256: String,
    /// Sorted by time, step number, domain name and UUID.
    #[serde(default, rename = "step")]
    pub steps: Vec<StepRecord>,
    /// Notification events and whether they were delivered (see `notify`); written in the
    /// same atomic replacement as the step change they announce.
    #[serde(default, rename = "event", skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
}

/// Where a notification event is in its delivery.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Not yet delivered to every target that wants it (sent at the next chance, or by the
    /// next `apply`).
    #[default]
    Pending,
    /// Every target took it.
    Sent,
    /// A target refused it after every retry; the next `apply` tries again.
    Failed,
}

/// One notification event in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The event's stable id (receivers deduplicate on it).
    pub id: String,
    /// `step-failed`, `plan-finished`, ...
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vm: Option<String>,
    pub delivery: Delivery,
    /// Keys of the targets that want it (hashes: no secret is written here).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Keys of the targets that took it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent_to: Vec<String>,
    /// Keys of the targets that refused it after every retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_to: Vec<String>,
    /// The last failure, with the target redacted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The event JSON, kept until every target took it, so a resumed run re-sends exactly it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

impl EventRecord {
    /// Records one target's result and updates [`EventRecord::delivery`].
    pub fn note(&mut self, target: &str, result: Result<(), &str>) {
        self.sent_to.retain(|t| t != target);
        self.failed_to.retain(|t| t != target);
        match result {
            Ok(()) => self.sent_to.push(target.to_owned()),
            Err(e) => {
                self.failed_to.push(target.to_owned());
                e.clone_into(&mut self.error);
            }
        }
        let settled = |t: &String| self.sent_to.contains(t) || self.failed_to.contains(t);
        if self.targets.iter().all(|t| self.sent_to.contains(t)) {
            self.delivery = Delivery::Sent;
            self.error.clear();
            // Delivered: the body has served its purpose; keep the lockfile small.
            self.body.clear();
        } else if self.targets.iter().all(settled) {
            self.delivery = Delivery::Failed;
        }
    }
}

/// Sees every change of a step record as it is made, so the notification it announces is
/// written in the same atomic replacement: a crash cannot separate a step's status from its
/// event. Implemented by `notify`.
pub trait Observer: Send + Sync {
    /// The event to record for a record whose status was `before`, if any.
    fn on_change(&self, before: StepStatus, after: &StepRecord) -> Option<EventRecord>;
    /// `event` is durable: deliver it.
    fn on_recorded(&self, event: &EventRecord);
}

impl Lockfile {
    #[must_use]
    pub fn new(plan_sha256: impl Into<String>) -> Self {
        Self {
            version: LOCKFILE_VERSION,
            plan_sha256: plan_sha256.into(),
            steps: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The record of `step_id` on the domain `uuid`.
    #[must_use]
    pub fn get(&self, step_id: &str, uuid: &str) -> Option<&StepRecord> {
        self.steps
            .iter()
            .find(|r| r.step_id == step_id && r.uuid == uuid)
    }

    fn get_mut(&mut self, step_id: &str, uuid: &str) -> Option<&mut StepRecord> {
        self.steps
            .iter_mut()
            .find(|r| r.step_id == step_id && r.uuid == uuid)
    }

    /// Sorts records deterministically, so the same progress always reads the same.
    pub fn sort(&mut self) {
        self.steps.sort_by(|a, b| {
            (a.at, a.step, &a.vm, &a.uuid, &a.step_id)
                .cmp(&(b.at, b.step, &b.vm, &b.uuid, &b.step_id))
        });
    }

    /// The TOML text (deterministic order).
    ///
    /// # Errors
    /// Only if a value cannot be written as TOML, which the types rule out.
    pub fn to_toml(&self) -> Result<String, LockError> {
        let mut sorted = self.clone();
        sorted.sort();
        let mut text = sorted.header_toml()?;
        for r in &sorted.steps {
            text.push_str(&record_toml(r)?);
        }
        for e in &sorted.events {
            text.push_str(&event_toml(e)?);
        }
        Ok(text)
    }

    /// The comment, `version` and `plan_sha256`.
    fn header_toml(&self) -> Result<String, LockError> {
        #[derive(Serialize)]
        struct Header<'a> {
            version: u32,
            plan_sha256: &'a str,
        }
        let header = toml::to_string(&Header {
            version: self.version,
            plan_sha256: &self.plan_sha256,
        })
        .map_err(|e| LockError::Serialize(e.to_string()))?;
        Ok(format!(
            "# virtplan progress file: written by `virtplan apply`, read by `virtplan status`.\n\
             # Do not edit by hand; move it aside to start the plan over.\n{header}"
        ))
    }

    /// Parses a lockfile's text, refusing newer formats.
    ///
    /// # Errors
    /// [`LockError::Corrupt`] or [`LockError::NewerVersion`], both naming `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, LockError> {
        let lock: Self = toml::from_str(text).map_err(|e| LockError::Corrupt {
            path: path.to_path_buf(),
            reason: e.message().trim().to_owned(),
        })?;
        if lock.version > LOCKFILE_VERSION {
            return Err(LockError::NewerVersion {
                path: path.to_path_buf(),
                version: lock.version,
            });
        }
        if lock.version == 0 {
            return Err(LockError::Corrupt {
                path: path.to_path_buf(),
                reason: "version 0 is not a lockfile version".to_owned(),
            });
        }
        // Two records of one step on one domain: which one is true is unknowable (a hand edit
        // or a merge), and the executor would trust whichever it found first.
        let mut seen = BTreeSet::new();
        for r in &lock.steps {
            if !seen.insert((r.step_id.as_str(), r.uuid.as_str())) {
                return Err(LockError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "step {} ({}, id {}) is recorded twice",
                        r.step,
                        crate::text::escape(&r.vm),
                        r.step_id
                    ),
                });
            }
        }
        Ok(lock)
    }

    /// Checks recorded progress against `plan` before anything runs, and brings the records in
    /// line with it: new steps become `pending`, records of removed steps that never ran are
    /// dropped.
    ///
    /// # Errors
    /// A done (or interrupted) step that is no longer in the plan, or a domain whose UUID
    /// differs from the recorded one.
    pub fn reconcile(&mut self, path: &Path, plan: &Plan) -> Result<(), LockError> {
        let planned: BTreeSet<(&str, &str)> = plan
            .steps
            .iter()
            .map(|s| (s.step_id.as_str(), s.domain.uuid.as_str()))
            .collect();
        // Same step, same name, other UUID: the domain was deleted and re-created (or another
        // was renamed over it). Keyed by step too, since hosts of one plan may share names.
        let mut recorded_uuid: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for r in &self.steps {
            recorded_uuid.insert((r.step_id.as_str(), r.vm.as_str()), r.uuid.as_str());
        }
        for s in &plan.steps {
            let key = (s.step_id.as_str(), s.domain.name.as_str());
            if let Some(old) = recorded_uuid.get(&key) {
                if *old != s.domain.uuid {
                    return Err(LockError::UuidChanged {
                        path: path.to_path_buf(),
                        vm: s.domain.name.clone(),
                        recorded: (*old).to_owned(),
                        now: s.domain.uuid.clone(),
                    });
                }
            }
        }
        // Checked whatever the plan's hash: a virtplan.toml change (time zone, host alias) can
        // move or re-target steps, and so change their ids, without touching the plan file.
        let lost: Vec<&StepRecord> = self
            .steps
            .iter()
            .filter(|r| matches!(r.status, StepStatus::Done | StepStatus::Running))
            .filter(|r| !planned.contains(&(r.step_id.as_str(), r.uuid.as_str())))
            .collect();
        if let Some(r) = lost.first() {
            return Err(LockError::DoneStepChanged {
                path: path.to_path_buf(),
                step: r.step,
                step_id: r.step_id.clone(),
                vm: r.vm.clone(),
                status: r.status,
                count: lost.len(),
            });
        }
        self.plan_sha256.clone_from(&plan.meta.sha256);
        self.steps
            .retain(|r| planned.contains(&(r.step_id.as_str(), r.uuid.as_str())));
        for s in &plan.steps {
            match self.get_mut(&s.step_id, &s.domain.uuid) {
                Some(r) => {
                    r.step = s.step;
                    r.vm.clone_from(&s.domain.name);
                    r.at = s.at;
                    // A step that ran keeps the description of what it did.
                    if r.status == StepStatus::Pending || r.what.is_empty() {
                        r.what = plan.describe(&s.step_id, &s.domain.uuid);
                    }
                }
                None => self.steps.push(StepRecord::new(
                    s.step,
                    &s.step_id,
                    &s.domain.name,
                    &s.domain.uuid,
                    plan.describe(&s.step_id, &s.domain.uuid),
                    s.at,
                    StepStatus::Pending,
                )),
            }
        }
        self.sort();
        Ok(())
    }
}

/// One `[[step]]` table. Records are written one by one so the store can keep the text of
/// records that did not change (serializing TOML is the costly part of a write).
fn record_toml(r: &StepRecord) -> Result<String, LockError> {
    #[derive(Serialize)]
    struct One<'a> {
        step: [&'a StepRecord; 1],
    }
    let text =
        toml::to_string(&One { step: [r] }).map_err(|e| LockError::Serialize(e.to_string()))?;
    Ok(format!("\n{text}"))
}

/// One `[[event]]` table.
fn event_toml(e: &EventRecord) -> Result<String, LockError> {
    #[derive(Serialize)]
    struct One<'a> {
        event: [&'a EventRecord; 1],
    }
    let text =
        toml::to_string(&One { event: [e] }).map_err(|e| LockError::Serialize(e.to_string()))?;
    Ok(format!("\n{text}"))
}

/// Why the lockfile or the executor lock could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read the lockfile {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: crate::fsutil::FileError,
    },
    #[error("cannot write the lockfile {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: crate::fsutil::FileError,
    },
    #[error("the lockfile {} is corrupt ({reason}); virtplan will not overwrite it: inspect it, and if the progress it recorded is known, move it aside (e.g. `mv {0} {0}.bad`) and run `virtplan plan` to see what still needs doing", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("the lockfile {} has format version {version}, newer than this virtplan understands ({LOCKFILE_VERSION}); upgrade virtplan", path.display())]
    NewerVersion { path: PathBuf, version: u32 },
    #[error("cannot serialize the lockfile: {0}")]
    Serialize(String),
    #[error("step {step} ({vm}, id {step_id}) is recorded {status} in {} but is no longer in the plan ({count} such step(s)): a step that ran cannot be edited; restore the step as it was, or move the lockfile aside to treat the plan as new", path.display())]
    DoneStepChanged {
        path: PathBuf,
        step: usize,
        step_id: String,
        vm: String,
        status: StepStatus,
        count: usize,
    },
    #[error("domain {vm} now has UUID {now}, but {} recorded UUID {recorded}: it is not the same domain; check it with `virsh dominfo {vm}`, and move the lockfile aside if the new domain is intended", path.display())]
    UuidChanged {
        path: PathBuf,
        vm: String,
        recorded: String,
        now: String,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: crate::fsutil::FileError,
    },
    #[error("another virtplan is applying this plan: {holder} holds {}; wait for it to finish (check with `virtplan status`), or stop that process", path.display())]
    Held { path: PathBuf, holder: String },
}

/// Lockfiles larger than this are refused unread (a plan of thousands of steps stays far below).
pub const MAX_LOCKFILE_BYTES: u64 = 64 << 20;

/// The plan's real path: every name of one file (a symlink, `./`, `..`) gives the same lock
/// and lockfile, so two `apply`s through two names cannot both run it. A file that does not
/// exist (yet) keeps the path as given.
fn canonical(plan: &Path) -> PathBuf {
    std::fs::canonicalize(plan).unwrap_or_else(|_| plan.to_path_buf())
}

/// `plans/web.yaml` -> `plans/web.lock`, beside the plan's real file.
#[must_use]
pub fn lock_path(plan: &Path) -> PathBuf {
    canonical(plan).with_extension("lock")
}

/// `plans/web.yaml` -> `plans/web.lock.pid`, beside the plan's real file.
#[must_use]
pub fn pid_path(plan: &Path) -> PathBuf {
    canonical(plan).with_extension("lock.pid")
}

/// The progress file on disk, shared by the executor's threads.
///
/// Every update returns only once a version of the file that contains it is durable (written
/// atomically, mode 0600). Updates from several threads share writes (group commit): while
/// one thread writes, the others queue their changes, and the next write carries them all.
#[derive(Debug)]
pub struct LockStore {
    path: PathBuf,
    shared: Mutex<Shared>,
    flushed: Condvar,
    /// Turns step changes into notification events (set when the plan has targets).
    observer: std::sync::OnceLock<std::sync::Arc<dyn Observer>>,
}

impl fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

#[derive(Debug)]
struct Shared {
    data: Lockfile,
    /// Number of the latest change.
    seq: u64,
    /// Every change up to this number is on disk.
    durable: u64,
    /// A thread is writing the file.
    flushing: bool,
    /// The last write failed: changes up to this number may not be on disk.
    failed: Option<(u64, String)>,
    /// TOML text of records unchanged since the last write, by (step id, uuid).
    rendered: HashMap<(String, String), String>,
    /// TOML text of events unchanged since the last write, by id.
    rendered_events: HashMap<String, String>,
}

impl Shared {
    /// The whole file, re-serializing only records that changed.
    fn render(&mut self) -> Result<String, LockError> {
        let mut text = self.data.header_toml()?;
        for r in &self.data.steps {
            let key = (r.step_id.clone(), r.uuid.clone());
            if let Some(cached) = self.rendered.get(&key) {
                text.push_str(cached);
            } else {
                let fresh = record_toml(r)?;
                text.push_str(&fresh);
                self.rendered.insert(key, fresh);
            }
        }
        for e in &self.data.events {
            if let Some(cached) = self.rendered_events.get(&e.id) {
                text.push_str(cached);
            } else {
                let fresh = event_toml(e)?;
                text.push_str(&fresh);
                self.rendered_events.insert(e.id.clone(), fresh);
            }
        }
        Ok(text)
    }
}

impl LockStore {
    /// Reads `path`, or starts empty progress for `plan_sha256` when it does not exist.
    ///
    /// # Errors
    /// Unreadable, corrupt or newer-format files: never overwritten.
    pub fn open(path: &Path, plan_sha256: &str) -> Result<Self, LockError> {
        let data = match crate::fsutil::read_regular_text(path, MAX_LOCKFILE_BYTES) {
            Ok(text) => Lockfile::parse(path, &text)?,
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {
                Lockfile::new(plan_sha256)
            }
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::InvalidData) => {
                return Err(LockError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "not UTF-8 text".to_owned(),
                })
            }
            Err(source) => {
                return Err(LockError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            shared: Mutex::new(Shared {
                data,
                seq: 0,
                durable: 0,
                flushing: false,
                failed: None,
                rendered: HashMap::new(),
                rendered_events: HashMap::new(),
            }),
            flushed: Condvar::new(),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Reads an existing lockfile without the intent to write it (`status`).
    ///
    /// # Errors
    /// As [`LockStore::open`]; a missing file is an error too.
    pub fn read(path: &Path) -> Result<Lockfile, LockError> {
        let text =
            crate::fsutil::read_regular_text(path, MAX_LOCKFILE_BYTES).map_err(|source| {
                LockError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        Lockfile::parse(path, &text)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the current progress.
    #[must_use]
    pub fn snapshot(&self) -> Lockfile {
        self.lock().data.clone()
    }

    /// A copy of the record of `step_id` on `uuid`.
    #[must_use]
    pub fn record(&self, step_id: &str, uuid: &str) -> Option<StepRecord> {
        self.lock().data.get(step_id, uuid).cloned()
    }

    /// The recorded status of `step_id` on `uuid`.
    #[must_use]
    pub fn status(&self, step_id: &str, uuid: &str) -> Option<StepStatus> {
        self.lock().data.get(step_id, uuid).map(|r| r.status)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reconciles with `plan` (see [`Lockfile::reconcile`]) and writes the result.
    ///
    /// # Errors
    /// Refusals from reconciling (nothing is written then); write failures.
    pub fn reconcile(&self, plan: &Plan) -> Result<(), LockError> {
        let mut shared = self.lock();
        let mut next = shared.data.clone();
        next.reconcile(&self.path, plan)?;
        shared.data = next;
        shared.rendered.clear();
        shared.seq += 1;
        let seq = shared.seq;
        self.commit(shared, seq)
    }

    /// Applies `f` to the record of (`step_id`, `uuid`) and returns once that is on disk.
    ///
    /// # Errors
    /// The record does not exist, or the file could not be written.
    pub fn update(
        &self,
        step_id: &str,
        uuid: &str,
        f: impl FnOnce(&mut StepRecord),
    ) -> Result<(), LockError> {
        let mut shared = self.lock();
        let Some(record) = shared.data.get_mut(step_id, uuid) else {
            return Err(LockError::Write {
                path: self.path.clone(),
                source: crate::fsutil::FileError::Io(std::io::Error::other(format!(
                    "no record of step {step_id} on {uuid}"
                ))),
            });
        };
        let before = record.status;
        f(record);
        let event = self
            .observer
            .get()
            .and_then(|o| o.on_change(before, record));
        shared
            .rendered
            .remove(&(step_id.to_owned(), uuid.to_owned()));
        if let Some(e) = &event {
            shared.data.events.push(e.clone());
        }
        shared.seq += 1;
        let seq = shared.seq;
        self.commit(shared, seq)?;
        if let (Some(e), Some(o)) = (event, self.observer.get()) {
            o.on_recorded(&e);
        }
        Ok(())
    }

    /// Sets the observer that turns step changes into notification events; only the first
    /// call has an effect.
    pub fn observe(&self, observer: std::sync::Arc<dyn Observer>) {
        let _ = self.observer.set(observer);
    }

    /// Records a plan-level event durably, then hands it to the observer for delivery.
    ///
    /// # Errors
    /// The file could not be written (the event is not delivered then).
    pub fn record_event(&self, event: EventRecord) -> Result<(), LockError> {
        let mut shared = self.lock();
        shared.rendered_events.remove(&event.id);
        shared.data.events.retain(|e| e.id != event.id);
        let recorded = event.clone();
        shared.data.events.push(event);
        shared.seq += 1;
        let seq = shared.seq;
        self.commit(shared, seq)?;
        if let Some(o) = self.observer.get() {
            o.on_recorded(&recorded);
        }
        Ok(())
    }

    /// Notes one target's delivery result in memory. It reaches the disk with the next write
    /// (or [`LockStore::sync`]): losing it in a crash only means the event is sent again,
    /// with the same id.
    pub fn note_delivery(&self, event_id: &str, target: &str, result: Result<(), &str>) {
        let mut shared = self.lock();
        let Some(e) = shared.data.events.iter_mut().find(|e| e.id == event_id) else {
            return;
        };
        e.note(target, result);
        shared.rendered_events.remove(event_id);
        shared.seq += 1;
    }

    /// Writes whatever changed since the last write (delivery results).
    ///
    /// # Errors
    /// The file could not be written.
    pub fn sync(&self) -> Result<(), LockError> {
        let shared = self.lock();
        let seq = shared.seq;
        self.commit(shared, seq)
    }

    /// Waits until change `seq` is on disk, writing the file itself when no one else is.
    fn commit<'a>(&'a self, mut shared: MutexGuard<'a, Shared>, seq: u64) -> Result<(), LockError> {
        loop {
            if shared.durable >= seq {
                return Ok(());
            }
            if let Some((upto, message)) = &shared.failed {
                if *upto >= seq {
                    return Err(LockError::Write {
                        path: self.path.clone(),
                        source: crate::fsutil::FileError::Io(std::io::Error::other(
                            message.clone(),
                        )),
                    });
                }
            }
            if shared.flushing {
                shared = self
                    .flushed
                    .wait(shared)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let upto = shared.seq;
            let text = shared.render();
            shared.flushing = true;
            drop(shared);
            let result = text.and_then(|text| self.write(&text));
            shared = self.lock();
            shared.flushing = false;
            match &result {
                Ok(()) => shared.durable = upto,
                Err(e) => shared.failed = Some((upto, e.to_string())),
            }
            self.flushed.notify_all();
            result?;
        }
    }

    fn write(&self, text: &str) -> Result<(), LockError> {
        crate::fsutil::write_atomic(&self.path, text.as_bytes(), 0o600).map_err(|source| {
            LockError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

impl Progress for LockStore {
    fn is_done(&self, step_id: &str, uuid: &str) -> bool {
        self.lock()
            .data
            .get(step_id, uuid)
            .is_some_and(|r| r.status == StepStatus::Done)
    }
}

impl Progress for Lockfile {
    fn is_done(&self, step_id: &str, uuid: &str) -> bool {
        self.get(step_id, uuid)
            .is_some_and(|r| r.status == StepStatus::Done)
    }
}

/// The exclusive executor lock, held for as long as this value lives. The kernel releases it
/// when the process dies, however it dies.
#[derive(Debug)]
pub struct ExecutorLock {
    file: File,
    path: PathBuf,
}

impl ExecutorLock {
    /// Takes the lock on `path` (created if needed, never renamed), or says who holds it.
    ///
    /// # Errors
    /// [`LockError::Held`] naming pid, host and since; I/O failures.
    pub fn acquire(path: &Path, now: DateTime<Utc>) -> Result<Self, LockError> {
        use fs4::fs_std::FileExt as _;
        let lock_err = |source: crate::fsutil::FileError| LockError::Lock {
            path: path.to_path_buf(),
            source,
        };
        // Never through a symlink: `ln -s /etc/passwd plan.lock.pid` must not truncate it.
        // The file is removed when the lock is dropped, so a holder may find that the file it
        // locked was unlinked meanwhile: then it locks the new file instead.
        let mut attempts = 0;
        let mut file = loop {
            let mut file =
                crate::fsutil::open_write_nofollow(path, true, 0o600).map_err(lock_err)?;
            if !file.try_lock_exclusive().map_err(|e| lock_err(e.into()))? {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
                let holder = if holder.is_empty() {
                    "a process that has not written its details yet".to_owned()
                } else {
                    holder
                };
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            if same_file(&file, path) || attempts >= 10 {
                break file;
            }
            attempts += 1;
        };
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let info = format!(
            "pid={} host={host} since={}\n",
            std::process::id(),
            now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(info.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(|e| lock_err(e.into()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the lock file while still holding the lock: no `.lock.pid` is left behind. A
/// process that opened the old file before the unlink sees (by [`same_file`]) that it
/// locked a removed file and starts over.
impl Drop for ExecutorLock {
    fn drop(&mut self) {
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `file` is still the file at `path` (same device and inode, not a replacement).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn record(step: usize, id: &str, vm: &str, status: StepStatus) -> StepRecord {
        let at = Some(t("2026-12-01T09:00:00Z"));
        StepRecord::new(
            step,
            id,
            vm,
            format!("uuid-{vm}"),
            "memory 1GiB → 2GiB",
            at,
            status,
        )
    }

    fn sample() -> Lockfile {
        let mut lock = Lockfile::new("abc123");
        let mut done = record(2, "s2", "web-01", StepStatus::Done);
        done.started_at = Some(t("2026-12-01T09:00:00.012Z"));
        done.finished_at = Some(t("2026-12-01T09:00:01Z"));
        done.message = "applied; \"quoted\" 'single'\nsecond line\ttab \\ backslash".to_owned();
        done.before = Some(Figures {
            power: PowerState::ShuttingDown,
            memory_kib: Kib(1 << 20),
            max_memory_kib: Kib(4 << 20),
            vcpus: 1,
            max_vcpus: 2,
            autostart: false,
            live_memory_kib: Some(Kib(1 << 20)),
            live_vcpus: Some(1),
            clock_offset: Some("utc".into()),
            rtc_track: None,
        });
        lock.steps.push(done);
        lock.steps
            .push(record(1, "s1", "web-02", StepStatus::Pending));
        lock.steps
            .push(record(1, "s1", "web-01", StepStatus::Missed));
        lock
    }

    #[test]
    fn round_trip_is_lossless_and_deterministic() {
        let lock = sample();
        let text = lock.to_toml().unwrap();
        let back = Lockfile::parse(Path::new("x.lock"), &text).unwrap();
        let mut sorted = lock.clone();
        sorted.sort();
        assert_eq!(back, sorted);
        assert_eq!(back.to_toml().unwrap(), text);
        // Same-time records come out in step, then domain order.
        let order: Vec<_> = back.steps.iter().map(|r| (r.step, r.vm.as_str())).collect();
        assert_eq!(order, [(1, "web-01"), (1, "web-02"), (2, "web-01")]);
        assert!(text.contains("version = 1"));
        assert!(text.contains("status = \"done\""));
        assert!(text.contains("power = \"shutting-down\""), "{text}");
    }

    /// Regression: done records were only checked when the plan file's hash changed, so a
    /// virtplan.toml edit that moved step times (new ids) silently dropped them.
    #[test]
    fn done_step_missing_from_the_plan_is_refused_even_with_the_same_plan_hash() {
        let mut lock = sample();
        let plan = Plan {
            policy: crate::planner::Policy::default(),
            meta: crate::planner::PlanMeta {
                name: "p".into(),
                file: "p.yaml".into(),
                sha256: lock.plan_sha256.clone(),
                timezone: None,
            },
            planned_at: t("2026-11-30T00:00:00Z"),
            changes: Vec::new(),
            warnings: Vec::new(),
            summary: crate::planner::Summary::default(),
            steps: Vec::new(),
        };
        let err = lock.reconcile(Path::new("p.lock"), &plan).unwrap_err();
        assert!(matches!(err, LockError::DoneStepChanged { .. }), "{err}");
        assert_eq!(lock.steps.len(), 3, "nothing was dropped");
    }

    #[test]
    fn corrupt_lockfile_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        std::fs::write(&path, "version = 1\nplan_sha256 = \n[[step").unwrap();
        let err = LockStore::open(&path, "x").unwrap_err();
        assert!(matches!(err, LockError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "version = 1\nplan_sha256 = \n[[step"
        );
    }

    #[test]
    fn regression_duplicate_lockfile_records_accepted() {
        let mut lock = sample();
        lock.steps.push(lock.steps[0].clone());
        let text = toml::to_string(&lock).unwrap();
        let err = Lockfile::parse(Path::new("p.lock"), &text).unwrap_err();
        assert!(matches!(err, LockError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("recorded twice"), "{err}");
    }

    #[test]
    fn regression_lock_pid_left_behind_by_plans_that_never_ran() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock.pid");
        let now = t("2026-12-01T09:00:00Z");
        let lock = ExecutorLock::acquire(&path, now).unwrap();
        assert!(matches!(
            ExecutorLock::acquire(&path, now),
            Err(LockError::Held { .. })
        ));
        drop(lock);
        assert!(!path.exists(), "the lock file is removed with the lock");
        let again = ExecutorLock::acquire(&path, now).unwrap();
        assert!(path.exists());
        drop(again);
    }

    #[test]
    fn newer_lockfile_is_refused() {
        let err =
            Lockfile::parse(Path::new("p.lock"), "version = 2\nplan_sha256 = \"x\"\n").unwrap_err();
        assert!(matches!(err, LockError::NewerVersion { version: 2, .. }));
        assert!(err.to_string().contains("upgrade virtplan"));
    }

    #[test]
    fn updates_are_written_through_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let store = LockStore::open(&path, "abc").unwrap();
        {
            let mut shared = store.lock();
            shared
                .data
                .steps
                .push(record(1, "s1", "a", StepStatus::Pending));
        }
        store
            .update("s1", "uuid-a", |r| r.status = StepStatus::Running)
            .unwrap();
        let on_disk = LockStore::read(&path).unwrap();
        assert_eq!(on_disk.steps[0].status, StepStatus::Running);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(store.is_done("s1", "uuid-a").eq(&false));
    }

    #[test]
    fn second_executor_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock.pid");
        let now = t("2026-12-01T09:00:00Z");
        let first = ExecutorLock::acquire(&path, now).unwrap();
        let err = ExecutorLock::acquire(&path, now).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid={}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("since=2026-12-01T09:00:00Z"), "{text}");
        drop(first);
        ExecutorLock::acquire(&path, now).unwrap();
    }
}
