//! The progress file `<plan stem>.lock` and the exclusive OS lock `<plan stem>.lock.pid` that
//! keeps a second executor off the same plan.
//!
//! The progress file is what makes `apply` resumable: a step is recorded `running` durably
//! before libvirt is called, and `done` only after its result was read back and verified.
//!
//! # Format: a journal of JSON lines (version 2)
//!
//! One JSON object per line, readable with `jq` or any editor: first a header (`version`,
//! `plan_sha256`), then one `{"step": {...}}` record per step and domain (the *compacted*
//! part, in a deterministic order), then, appended while `apply` runs, one `{"step": {...}}`
//! line per state change: the whole new record of that step on that domain, which supersedes
//! the earlier lines of the same (step id, UUID). Appending costs a few hundred bytes per change
//! and one `fdatasync` per group commit, however many steps the plan has; the previous design
//! rewrote the whole file per change (quadratic in steps). The file is *compacted* (rewritten
//! atomically: temporary file, fsync, rename, fsync of the folder) when an executor opens it
//! and when it finishes, so at rest it holds one line per record.
//!
//! A crash can leave the last append torn. A line counts only when it ends with its newline
//! and parses; unparsable or unterminated lines at the end of the file are a torn tail, dropped
//! (and cut off at the next compaction), never misread. An unparsable line followed by a good
//! one is not a torn write but damage: the file is refused as corrupt, never overwritten.
//! Version 1 files (one TOML document) are still read, and compacted to version 2 by `apply`.
//!
//! # Appending from another process (`cancel`)
//!
//! Every append, the executor's and anyone else's, happens under an exclusive `flock` of the
//! progress file itself, held only for that append: lock, check that the locked file is still
//! the one at the path (a compaction may have renamed a new one over it: then reopen and lock
//! again), read whatever was appended since this writer last looked, write the new lines with
//! one `write` at the end, `fdatasync`, unlock. [`append_external`] does exactly that for a
//! process that does not hold the executor lock (an operator's `cancel` while `apply` runs).
//! The executor merges lines others appended before writing its own, at every group commit
//! and at compaction, so nothing appended is lost, and [`LockStore::refresh`] lets it look
//! before starting a step. An external line never overrides a record the executor has made
//! `running` or `done`: those are the executor's alone.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::planner::{Plan, Progress};
use crate::state::{DomainState, Kib, PowerState};

/// The lockfile format this build writes (JSON lines); version 1 (TOML) is still read.
pub const LOCKFILE_VERSION: u32 = 2;

/// The format of a lockfile whose header records a `--only`/`--exclude` filter: version 3, so
/// a virtplan from before filters refuses it as newer ("upgrade virtplan") rather than as
/// corrupt. The newest format this build reads.
pub const LOCKFILE_VERSION_FILTERED: u32 = 3;

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
    /// The `--only` / `--exclude` filter of the last apply (absent: none): records of the
    /// domains it left out are kept as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<crate::filter::Filter>,
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

impl Delivery {
    /// The word `status` prints and the lockfile stores.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }
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
    /// The write that carried `event` failed: it will not be delivered.
    fn on_failed(&self, event: &EventRecord);
}

impl Lockfile {
    #[must_use]
    pub fn new(plan_sha256: impl Into<String>) -> Self {
        Self {
            version: LOCKFILE_VERSION,
            plan_sha256: plan_sha256.into(),
            steps: Vec::new(),
            events: Vec::new(),
            filter: None,
        }
    }

    /// The record of `step_id` on the domain `uuid` (a linear scan: for many look-ups, build
    /// an [`Index`]).
    #[must_use]
    pub fn get(&self, step_id: &str, uuid: &str) -> Option<&StepRecord> {
        self.steps
            .iter()
            .find(|r| r.step_id == step_id && r.uuid == uuid)
    }

    /// What to tell an operator whose run's `--only`/`--exclude` filter differs from the one
    /// the last apply recorded; `None` when it is the same, or when no apply has recorded
    /// anything yet (a first run has no "last apply" to differ from).
    #[must_use]
    pub fn filter_change_note(&self, now: Option<&crate::filter::Filter>) -> Option<String> {
        if self.steps.is_empty() {
            return None;
        }
        crate::filter::change_note(self.filter.as_ref(), now)
    }

    /// Sorts records deterministically, so the same progress always reads the same.
    pub fn sort(&mut self) {
        self.steps.sort_by(|a, b| {
            (a.at, a.step, &a.vm, &a.uuid, &a.step_id)
                .cmp(&(b.at, b.step, &b.vm, &b.uuid, &b.step_id))
        });
    }

    /// The compacted text: header line, then one line per record, in deterministic order.
    ///
    /// # Errors
    /// Only if a value cannot be written as JSON, which the types rule out.
    pub fn to_text(&self) -> Result<String, LockError> {
        let mut sorted = self.clone();
        sorted.sort();
        let mut text = header_line(&sorted.plan_sha256, sorted.filter.as_ref())?;
        for r in &sorted.steps {
            text.push_str(&record_line(r)?);
        }
        for e in &sorted.events {
            text.push_str(&line(None, Some(e))?);
        }
        Ok(text)
    }

    /// Parses a lockfile's text (either format), refusing newer formats and damage; a torn
    /// last append is dropped.
    ///
    /// # Errors
    /// [`LockError::Corrupt`] or [`LockError::NewerVersion`], both naming `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, LockError> {
        Ok(parse_text(path, text.as_bytes())?.lock)
    }

    /// Checks recorded progress against `plan` before anything runs, and brings the records in
    /// line with it: new steps become `pending`, records of removed steps that never ran are
    /// dropped. Linear in records and steps.
    ///
    /// # Errors
    /// A done (or interrupted) step that is no longer in the plan, or a domain whose UUID
    /// differs from the recorded one.
    pub fn reconcile(&mut self, path: &Path, plan: &Plan) -> Result<(), LockError> {
        let planned: HashSet<(&str, &str)> = plan
            .steps
            .iter()
            .map(|s| (s.step_id.as_str(), s.domain.uuid.as_str()))
            .collect();
        // Same step, same name, other UUID: the domain was deleted and re-created (or another
        // was renamed over it). Keyed by step too, since hosts of one plan may share names.
        let mut recorded_uuid: HashMap<(&str, &str), &str> = HashMap::new();
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
        // Records of the domains a `--only` / `--exclude` filter leaves out stay as they are.
        let matcher = plan.selection.as_ref().map(|s| s.filter.matcher());
        let outside = |r: &StepRecord| matcher.as_ref().is_some_and(|m| !m.selects(&r.vm, &r.uuid));
        // Checked whatever the plan's hash: a virtplan.toml change (time zone, host alias) can
        // move or re-target steps, and so change their ids, without touching the plan file.
        let lost: Vec<&StepRecord> = self
            .steps
            .iter()
            .filter(|r| matches!(r.status, StepStatus::Done | StepStatus::Running))
            .filter(|r| !planned.contains(&(r.step_id.as_str(), r.uuid.as_str())))
            .filter(|r| !outside(r))
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
            .retain(|r| planned.contains(&(r.step_id.as_str(), r.uuid.as_str())) || outside(r));
        self.filter = plan.selection.as_ref().map(|s| s.filter.clone());
        let descriptions = describe_all(plan);
        let describe = |step_id: &str, uuid: &str| {
            descriptions
                .get(&(step_id, uuid))
                .cloned()
                .unwrap_or_default()
        };
        let index = Index::of(self);
        let mut added = Vec::new();
        for s in &plan.steps {
            match index.position(&s.step_id, &s.domain.uuid) {
                Some(i) => {
                    let r = &mut self.steps[i];
                    r.step = s.step;
                    r.vm.clone_from(&s.domain.name);
                    r.at = s.at;
                    // A step that ran keeps the description of what it did.
                    if r.status == StepStatus::Pending || r.what.is_empty() {
                        r.what = describe(&s.step_id, &s.domain.uuid);
                    }
                }
                None => added.push(StepRecord::new(
                    s.step,
                    &s.step_id,
                    &s.domain.name,
                    &s.domain.uuid,
                    describe(&s.step_id, &s.domain.uuid),
                    s.at,
                    StepStatus::Pending,
                )),
            }
        }
        // The steps a filter left out are recorded `pending` (if they have no record yet), so
        // the lockfile keeps the whole set a pattern resolved to, and `status` shows them.
        if let Some(selection) = &plan.selection {
            let index = Index::of(self);
            for l in &selection.left_out_steps {
                if index.position(&l.step_id, &l.uuid).is_none() {
                    let mut r = StepRecord::new(
                        l.step,
                        &l.step_id,
                        &l.vm,
                        &l.uuid,
                        "",
                        l.at,
                        StepStatus::Pending,
                    );
                    r.message = format!(
                        "left out of a run by {}; not run yet",
                        selection.filter.describe()
                    );
                    self.steps.push(r);
                }
            }
        }
        self.steps.extend(added);
        self.sort();
        Ok(())
    }
}

/// Positions of a lockfile's records by (step id, domain UUID): constant-time look-ups.
#[derive(Debug, Default, Clone)]
pub struct Index(HashMap<(String, String), usize>);

impl Index {
    /// Indexes `lock`'s records as they are now.
    #[must_use]
    pub fn of(lock: &Lockfile) -> Self {
        Self(
            lock.steps
                .iter()
                .enumerate()
                .map(|(i, r)| ((r.step_id.clone(), r.uuid.clone()), i))
                .collect(),
        )
    }

    /// Where the record of `step_id` on `uuid` is in the indexed lockfile's `steps`.
    #[must_use]
    pub fn position(&self, step_id: &str, uuid: &str) -> Option<usize> {
        // Borrowed look-up without allocating would need a custom key type; the strings are
        // short and this is off the hot path of a step (one look-up per state change).
        self.0.get(&(step_id.to_owned(), uuid.to_owned())).copied()
    }

    fn insert(&mut self, r: &StepRecord, i: usize) {
        self.0.insert((r.step_id.clone(), r.uuid.clone()), i);
    }
}

/// The first line of a version 2 file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
    plan_sha256: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    about: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<crate::filter::Filter>,
}

/// The header line as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    header: Header,
}

/// Every line after the header: the whole record of one step on one domain, and/or one
/// notification event; a later line of the same (step id, UUID), or of the same event id,
/// supersedes earlier ones. A step change and the event it announces share one line, so a
/// torn write can never keep one without the other.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    step: Option<StepRecord>,
    #[serde(default)]
    event: Option<EventRecord>,
}

#[derive(Serialize)]
struct LineRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<&'a StepRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a EventRecord>,
}

fn header_line(
    plan_sha256: &str,
    filter: Option<&crate::filter::Filter>,
) -> Result<String, LockError> {
    #[derive(Serialize)]
    struct HeaderLine {
        header: Header,
    }
    let header = Header {
        version: if filter.is_some() {
            LOCKFILE_VERSION_FILTERED
        } else {
            LOCKFILE_VERSION
        },
        plan_sha256: plan_sha256.to_owned(),
        about: "virtplan progress file: written by `virtplan apply`, read by `virtplan status`; \
                one JSON object per line, later step lines supersede earlier ones; do not edit \
                by hand, move it aside to start the plan over"
            .to_owned(),
        filter: filter.cloned(),
    };
    let mut text = serde_json::to_string(&HeaderLine { header })
        .map_err(|e| LockError::Serialize(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

/// One `{"step": {...}}` line, newline included.
fn record_line(r: &StepRecord) -> Result<String, LockError> {
    line(Some(r), None)
}

/// One line with a step record, an event, or both; newline included.
fn line(step: Option<&StepRecord>, event: Option<&EventRecord>) -> Result<String, LockError> {
    let mut text = serde_json::to_string(&LineRef { step, event })
        .map_err(|e| LockError::Serialize(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

/// A parsed file: its progress, and how many bytes of it are whole lines (the rest is a torn
/// tail, if `torn`).
struct Parsed {
    lock: Lockfile,
    index: Index,
    good_len: usize,
    torn: bool,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> LockError {
    LockError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn parse_text(path: &Path, bytes: &[u8]) -> Result<Parsed, LockError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt(path, "not UTF-8 text"))?;
        let lock = parse_v1(path, text)?;
        let index = Index::of(&lock);
        return Ok(Parsed {
            lock,
            index,
            good_len: bytes.len(),
            torn: false,
        });
    }
    let Some(header_end) = bytes.iter().position(|b| *b == b'\n') else {
        return Err(corrupt(path, "the header line is incomplete"));
    };
    let header: serde_json::Value = serde_json::from_slice(&bytes[..header_end])
        .map_err(|e| corrupt(path, format!("line 1: {e}")))?;
    let version = header
        .get("header")
        .and_then(|h| h.get("version"))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt(path, "line 1 is not a virtplan header"))?;
    if version > u64::from(LOCKFILE_VERSION_FILTERED) {
        return Err(LockError::NewerVersion {
            path: path.to_path_buf(),
            version: u32::try_from(version).unwrap_or(u32::MAX),
        });
    }
    if version < 2 {
        return Err(corrupt(
            path,
            format!("version {version} is not a JSON-lines lockfile version"),
        ));
    }
    let header: HeaderIn =
        serde_json::from_value(header).map_err(|e| corrupt(path, format!("line 1: {e}")))?;
    let mut lock = Lockfile {
        version: header.header.version,
        plan_sha256: header.header.plan_sha256,
        steps: Vec::new(),
        events: Vec::new(),
        filter: header.header.filter,
    };
    let mut index = Index::default();
    let mut events = EventIndex::default();
    let mut offset = header_end + 1;
    let mut line_no = 1;
    // The first bad line, if any: a torn tail only if no good line follows it.
    let mut bad: Option<(usize, usize, String)> = None;
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            // No newline: the last append did not finish.
            bad.get_or_insert((offset, line_no, "an unterminated last line".to_owned()));
            break;
        };
        // serde_json checks the line is UTF-8: a torn multi-byte character is a bad line.
        match serde_json::from_slice::<Line>(&rest[..end]) {
            Ok(parsed) if parsed.step.is_some() || parsed.event.is_some() => {
                if let Some((_, at, reason)) = &bad {
                    return Err(corrupt(
                        path,
                        format!("line {at} is damaged ({reason}) and is followed by good lines, so it is not a torn last write"),
                    ));
                }
                if let Some(record) = parsed.step {
                    apply_line(&mut lock, &mut index, record);
                }
                if let Some(event) = parsed.event {
                    events.upsert(&mut lock.events, event);
                }
            }
            Ok(_) => {
                bad.get_or_insert((offset, line_no, "an empty record".to_owned()));
            }
            Err(e) => {
                bad.get_or_insert((offset, line_no, e.to_string()));
            }
        }
        offset += end + 1;
    }
    let (good_len, torn) = match bad {
        Some((at, _, _)) => (at, true),
        None => (bytes.len(), false),
    };
    Ok(Parsed {
        lock,
        index,
        good_len,
        torn,
    })
}

/// Positions of notification events by id: finding one was a scan of them all, so a run with
/// an event per step did quadratic work (reading its lockfile, recording each change).
#[derive(Debug, Default)]
struct EventIndex(HashMap<String, usize>);

impl EventIndex {
    /// The index of `events` (a later event of an id wins, as in the file).
    fn of(events: &[EventRecord]) -> Self {
        Self(
            events
                .iter()
                .enumerate()
                .map(|(i, e)| (e.id.clone(), i))
                .collect(),
        )
    }

    fn get<'a>(&self, events: &'a [EventRecord], id: &str) -> Option<&'a EventRecord> {
        self.0.get(id).and_then(|&i| events.get(i))
    }

    fn get_mut<'a>(&self, events: &'a mut [EventRecord], id: &str) -> Option<&'a mut EventRecord> {
        self.0.get(id).and_then(|&i| events.get_mut(i))
    }

    /// Upserts one event by id; their order is kept.
    fn upsert(&mut self, events: &mut Vec<EventRecord>, event: EventRecord) {
        if let Some(e) = self.get_mut(events, &event.id) {
            *e = event;
        } else {
            self.0.insert(event.id.clone(), events.len());
            events.push(event);
        }
    }
}

/// Upserts one record line.
fn apply_line(lock: &mut Lockfile, index: &mut Index, record: StepRecord) {
    if let Some(i) = index.position(&record.step_id, &record.uuid) {
        lock.steps[i] = record;
    } else {
        index.insert(&record, lock.steps.len());
        lock.steps.push(record);
    }
}

/// A version 1 file: one TOML document.
fn parse_v1(path: &Path, text: &str) -> Result<Lockfile, LockError> {
    let lock: Lockfile =
        toml::from_str(text).map_err(|e| corrupt(path, e.message().trim().to_owned()))?;
    if lock.version > 1 {
        return Err(LockError::NewerVersion {
            path: path.to_path_buf(),
            version: lock.version,
        });
    }
    if lock.version == 0 {
        return Err(corrupt(path, "version 0 is not a lockfile version"));
    }
    // Two records of one step on one domain: which one is true is unknowable (a hand edit
    // or a merge), and the executor would trust whichever it found first. (In version 2, a
    // later line superseding an earlier one is the format itself: the journal.)
    let mut seen = HashSet::new();
    for r in &lock.steps {
        if !seen.insert((r.step_id.as_str(), r.uuid.as_str())) {
            return Err(corrupt(
                path,
                format!(
                    "step {} ({}, id {}) is recorded twice",
                    r.step,
                    crate::text::escape(&r.vm),
                    r.step_id
                ),
            ));
        }
    }
    Ok(lock)
}

/// What each step does to each domain (see [`Plan::describe`]), for every step and domain of
/// `plan` in one pass over its changes: one `describe` per record made reconciling quadratic.
fn describe_all(plan: &Plan) -> HashMap<(&str, &str), String> {
    let mut out: HashMap<(&str, &str), String> = HashMap::new();
    for c in &plan.changes {
        let text = out
            .entry((c.step_id.as_str(), c.uuid.as_str()))
            .or_default();
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&c.describe());
    }
    out
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
    #[error("the lockfile {} has format version {version}, newer than this virtplan understands ({LOCKFILE_VERSION_FILTERED}); upgrade virtplan", path.display())]
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
#[must_use]
pub fn canonical(plan: &Path) -> PathBuf {
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
/// Every update returns only once a version of the file that contains it is durable. Updates
/// from several threads share appends (group commit): while one thread appends and syncs, the
/// others queue their changes, and the next append carries them all, each changed record once.
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
    index: Index,
    /// Where each of `data.events` is (kept with every change of the events).
    events: EventIndex,
    /// Records changed since the last append, by position in `data.steps`, each with the id
    /// of the event its change produced, if any (written on the same line).
    dirty: Vec<usize>,
    is_dirty: Vec<bool>,
    step_event: HashMap<usize, String>,
    /// Events changed since the last append, not tied to a step line.
    dirty_events: Vec<String>,
    /// Number of the latest change.
    seq: u64,
    /// Every change up to this number is on disk.
    durable: u64,
    /// A thread is appending.
    flushing: bool,
    /// The last append failed: changes up to this number may not be on disk.
    failed: Option<(u64, String)>,
    /// The file appended to, and how many of its bytes this store has read or written.
    file: Option<Appender>,
    io: IoStats,
}

/// What the store has written since it was opened: for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// Record changes committed (`update` calls).
    pub changes: u64,
    /// Bytes appended (journal lines).
    pub appended_bytes: u64,
    /// Appends (group commits), each followed by one `fdatasync`.
    pub appends: u64,
    /// Bytes written by compactions (whole-file atomic rewrites).
    pub compacted_bytes: u64,
    pub compactions: u64,
}

/// The progress file opened for appending, with the length this store knows of.
#[derive(Debug)]
struct Appender {
    file: File,
    len: u64,
}

impl Shared {
    fn mark(&mut self, i: usize) {
        if self.is_dirty.len() < self.data.steps.len() {
            self.is_dirty.resize(self.data.steps.len(), false);
        }
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(i);
        }
    }

    fn event(&self, id: &str) -> Option<&EventRecord> {
        self.events.get(&self.data.events, id)
    }

    /// The lines of every record and event changed since the last append.
    fn take_dirty_lines(&mut self) -> Result<String, LockError> {
        let mut text = String::new();
        let mut written: HashSet<String> = HashSet::new();
        for i in std::mem::take(&mut self.dirty) {
            self.is_dirty[i] = false;
            let event = self.step_event.remove(&i);
            let event = event.as_deref().and_then(|id| self.event(id));
            if let Some(e) = event {
                written.insert(e.id.clone());
            }
            text.push_str(&line(Some(&self.data.steps[i]), event)?);
        }
        for id in std::mem::take(&mut self.dirty_events) {
            if written.insert(id.clone()) {
                if let Some(e) = self.event(&id) {
                    text.push_str(&line(None, Some(e))?);
                }
            }
        }
        Ok(text)
    }

    /// Merges lines another process appended (see the module doc): never over a record this
    /// executor made `running` or `done`.
    fn merge_external(&mut self, records: Vec<StepRecord>) {
        for record in records {
            if let Some(i) = self.index.position(&record.step_id, &record.uuid) {
                let ours = matches!(
                    self.data.steps[i].status,
                    StepStatus::Running | StepStatus::Done
                );
                if !ours {
                    self.data.steps[i] = record;
                }
            } else {
                self.index.insert(&record, self.data.steps.len());
                self.data.steps.push(record);
            }
        }
    }
}

impl LockStore {
    /// Reads `path`, or starts empty progress for `plan_sha256` when it does not exist. The
    /// file is compacted by [`LockStore::reconcile`], which every run starts with.
    ///
    /// # Errors
    /// Unreadable, corrupt or newer-format files: never overwritten.
    pub fn open(path: &Path, plan_sha256: &str) -> Result<Self, LockError> {
        let (data, index) = match read_text(path)? {
            Some(text) => {
                let parsed = parse_text(path, &text)?;
                (parsed.lock, parsed.index)
            }
            None => (Lockfile::new(plan_sha256), Index::default()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            shared: Mutex::new(Shared {
                events: EventIndex::of(&data.events),
                data,
                index,
                dirty: Vec::new(),
                is_dirty: Vec::new(),
                step_event: HashMap::new(),
                dirty_events: Vec::new(),
                seq: 0,
                durable: 0,
                flushing: false,
                failed: None,
                file: None,
                io: IoStats::default(),
            }),
            flushed: Condvar::new(),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Reads an existing lockfile without the intent to write it (`status`): a torn last
    /// append is ignored.
    ///
    /// # Errors
    /// As [`LockStore::open`]; a missing file is an error too.
    pub fn read(path: &Path) -> Result<Lockfile, LockError> {
        let bytes = read_text(path)?.ok_or_else(|| LockError::Read {
            path: path.to_path_buf(),
            source: crate::fsutil::FileError::Io(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )),
        })?;
        Ok(parse_text(path, &bytes)?.lock)
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

    /// What this store has written so far.
    #[must_use]
    pub fn io_stats(&self) -> IoStats {
        self.lock().io
    }

    /// A copy of the record of `step_id` on `uuid`.
    #[must_use]
    pub fn record(&self, step_id: &str, uuid: &str) -> Option<StepRecord> {
        let shared = self.lock();
        shared
            .index
            .position(step_id, uuid)
            .map(|i| shared.data.steps[i].clone())
    }

    /// The recorded status of `step_id` on `uuid`.
    #[must_use]
    pub fn status(&self, step_id: &str, uuid: &str) -> Option<StepStatus> {
        let shared = self.lock();
        shared
            .index
            .position(step_id, uuid)
            .map(|i| shared.data.steps[i].status)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reconciles with `plan` (see [`Lockfile::reconcile`]) and compacts the file with the
    /// result.
    ///
    /// # Errors
    /// Refusals from reconciling (nothing is written then); write failures.
    pub fn reconcile(&self, plan: &Plan) -> Result<(), LockError> {
        let mut shared = self.wait_idle();
        let mut next = shared.data.clone();
        next.reconcile(&self.path, plan)?;
        shared.index = Index::of(&next);
        shared.events = EventIndex::of(&next.events);
        shared.data = next;
        self.compact_locked(&mut shared)
    }

    /// Rewrites the file atomically with one line per record (merging what others appended),
    /// dropping superseded lines and any torn tail. Called at the end of a run.
    ///
    /// # Errors
    /// Write failures; the journal then stays as it was, still whole.
    pub fn compact(&self) -> Result<(), LockError> {
        let mut shared = self.wait_idle();
        self.compact_locked(&mut shared)
    }

    /// Reads what other processes appended since this store last looked (an operator's
    /// `cancel`), so a step about to start sees it.
    ///
    /// # Errors
    /// The file cannot be read or locked.
    pub fn refresh(&self) -> Result<(), LockError> {
        let mut shared = self.wait_idle();
        let Some(appender) = shared.file.as_mut() else {
            return Ok(());
        };
        let guard = FileLock::exclusive(&appender.file).map_err(|e| self.write_err(e))?;
        let external = read_external(&self.path, &appender.file, &mut appender.len)?;
        drop(guard);
        shared.merge_external(external);
        Ok(())
    }

    /// Waits until no append is in flight, so the file can be replaced.
    fn wait_idle(&self) -> MutexGuard<'_, Shared> {
        let mut shared = self.lock();
        while shared.flushing {
            shared = self
                .flushed
                .wait(shared)
                .unwrap_or_else(PoisonError::into_inner);
        }
        shared
    }

    fn compact_locked(&self, shared: &mut Shared) -> Result<(), LockError> {
        // Lines others appended to the file about to be replaced are merged first, under its
        // lock, which is held until the new file is in place.
        let mut old = shared.file.take();
        let guard = match &mut old {
            Some(Appender { file, len }) => {
                let guard = FileLock::exclusive(file).map_err(|e| self.write_err(e))?;
                let external = read_external(&self.path, file, len)?;
                shared.merge_external(external);
                Some(guard)
            }
            None => None,
        };
        shared.data.sort();
        shared.index = Index::of(&shared.data);
        shared.dirty.clear();
        shared.is_dirty.clear();
        shared.step_event.clear();
        shared.dirty_events.clear();
        let text = shared.data.to_text()?;
        crate::fsutil::write_atomic(&self.path, text.as_bytes(), 0o600)
            .map_err(|e| self.write_err(e))?;
        drop(guard);
        shared.io.compacted_bytes += text.len() as u64;
        shared.io.compactions += 1;
        shared.file = Some(self.open_appender(text.len() as u64)?);
        shared.seq += 1;
        shared.durable = shared.seq;
        Ok(())
    }

    fn open_appender(&self, len: u64) -> Result<Appender, LockError> {
        let file = crate::fsutil::open_append_nofollow(&self.path, 0o600)
            .map_err(|e| self.write_err(e))?;
        Ok(Appender { file, len })
    }

    fn write_err(&self, source: impl Into<crate::fsutil::FileError>) -> LockError {
        LockError::Write {
            path: self.path.clone(),
            source: source.into(),
        }
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
        let Some(i) = shared.index.position(step_id, uuid) else {
            return Err(self.write_err(std::io::Error::other(format!(
                "no record of step {step_id} on {uuid}"
            ))));
        };
        let before = shared.data.steps[i].status;
        f(&mut shared.data.steps[i]);
        let event = self
            .observer
            .get()
            .and_then(|o| o.on_change(before, &shared.data.steps[i]));
        shared.mark(i);
        if let Some(e) = &event {
            shared.step_event.insert(i, e.id.clone());
            let Shared { data, events, .. } = &mut *shared;
            events.upsert(&mut data.events, e.clone());
        }
        shared.io.changes += 1;
        shared.seq += 1;
        let seq = shared.seq;
        let result = self.commit(shared, seq);
        if let (Some(e), Some(o)) = (event, self.observer.get()) {
            if result.is_ok() {
                o.on_recorded(&e);
            } else {
                o.on_failed(&e);
            }
        }
        result
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
        let recorded = event.clone();
        shared.dirty_events.push(event.id.clone());
        let Shared { data, events, .. } = &mut *shared;
        events.upsert(&mut data.events, event);
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
        let Shared { data, events, .. } = &mut *shared;
        let Some(e) = events.get_mut(&mut data.events, event_id) else {
            return;
        };
        e.note(target, result);
        shared.dirty_events.push(event_id.to_owned());
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

    /// Waits until change `seq` is on disk, appending itself when no one else is.
    fn commit<'a>(&'a self, mut shared: MutexGuard<'a, Shared>, seq: u64) -> Result<(), LockError> {
        loop {
            if shared.durable >= seq {
                return Ok(());
            }
            if let Some((upto, message)) = &shared.failed {
                if *upto >= seq {
                    return Err(self.write_err(std::io::Error::other(message.clone())));
                }
            }
            if shared.flushing {
                shared = self
                    .flushed
                    .wait(shared)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if shared.file.is_none() {
                // Never compacted by this store (no reconcile): start the file now.
                let result = self.compact_locked(&mut shared);
                self.flushed.notify_all();
                result?;
                continue;
            }
            let upto = shared.seq;
            let lines = shared.take_dirty_lines();
            let mut appender = shared.file.take();
            shared.flushing = true;
            drop(shared);
            let result = match (lines, appender.as_mut()) {
                (Ok(lines), Some(a)) => self.append(a, lines.as_bytes()),
                (Err(e), _) => Err(e),
                (Ok(_), None) => Ok((Vec::new(), 0)),
            };
            shared = self.lock();
            shared.flushing = false;
            shared.file = appender;
            match result {
                Ok((external, written)) => {
                    shared.durable = upto;
                    shared.io.appended_bytes += written;
                    shared.io.appends += 1;
                    shared.merge_external(external);
                }
                Err(e) => {
                    shared.failed = Some((upto, e.to_string()));
                    self.flushed.notify_all();
                    return Err(e);
                }
            }
            self.flushed.notify_all();
        }
    }

    /// One group commit: lock, pick up others' lines, append ours in one write, fdatasync.
    fn append(&self, a: &mut Appender, bytes: &[u8]) -> Result<(Vec<StepRecord>, u64), LockError> {
        let _guard = FileLock::exclusive(&a.file).map_err(|e| self.write_err(e))?;
        let external = read_external(&self.path, &a.file, &mut a.len)?;
        (&a.file)
            .write_all(bytes)
            .and_then(|()| a.file.sync_data())
            .map_err(|e| self.write_err(e))?;
        a.len += bytes.len() as u64;
        Ok((external, bytes.len() as u64))
    }
}

/// The file's bytes; `None` when it does not exist. A symlink is refused: virtplan never made
/// one there, and the file it points at is not this plan's progress.
fn read_text(path: &Path) -> Result<Option<Vec<u8>>, LockError> {
    match crate::fsutil::read_own(path, MAX_LOCKFILE_BYTES) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => Ok(None),
        Err(source) => Err(LockError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whole lines appended by other processes past `known` bytes of `file` (the caller holds the
/// file's lock); `known` moves to the end of the file.
fn read_external(path: &Path, file: &File, known: &mut u64) -> Result<Vec<StepRecord>, LockError> {
    let read_err = |source: std::io::Error| LockError::Read {
        path: path.to_path_buf(),
        source: crate::fsutil::FileError::Io(source),
    };
    let end = file.metadata().map_err(read_err)?.len();
    if end <= *known {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    let mut reader = file;
    reader
        .seek(std::io::SeekFrom::Start(*known))
        .and_then(|_| reader.take(end - *known).read_to_end(&mut buf))
        .map_err(read_err)?;
    // Only whole lines count: an appender holds the lock until its line is written, so a
    // partial line here is one that a crashed appender left torn.
    let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for line in buf[..whole]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
    {
        if let Ok(Line {
            step: Some(record), ..
        }) = serde_json::from_slice::<Line>(line)
        {
            out.push(record);
        }
    }
    *known = end;
    Ok(out)
}

/// An exclusive `flock` on an open file, released when dropped.
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a File) -> std::io::Result<Self> {
        fs4::fs_std::FileExt::lock_exclusive(file)?;
        Ok(Self(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = fs4::fs_std::FileExt::unlock(self.0);
    }
}

/// Appends `records` (whole records, superseding earlier lines of the same step and domain) to
/// the progress file at `path` from a process that does not hold the executor lock, following
/// the protocol in the module doc. `f` sees the current progress, under the file's lock, and
/// returns the records to append.
///
/// # Errors
/// The file is missing, corrupt, or cannot be locked or written.
pub fn append_external(
    path: &Path,
    f: impl FnOnce(&Lockfile) -> Vec<StepRecord>,
) -> Result<usize, LockError> {
    let write_err = |source: std::io::Error| LockError::Write {
        path: path.to_path_buf(),
        source: crate::fsutil::FileError::Io(source),
    };
    loop {
        // Never create it: progress is started by an executor, with its header.
        std::fs::symlink_metadata(path).map_err(|source| LockError::Read {
            path: path.to_path_buf(),
            source: crate::fsutil::FileError::Io(source),
        })?;
        let file = crate::fsutil::open_append_nofollow(path, 0o600).map_err(|source| {
            LockError::Write {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let guard = FileLock::exclusive(&file).map_err(write_err)?;
        // A compaction renamed a new file over the one we locked: lock that one instead.
        if !same_file(&file, path) {
            drop(guard);
            continue;
        }
        let mut text = Vec::new();
        (&file)
            .read_to_end(&mut text)
            .map_err(|e| LockError::Read {
                path: path.to_path_buf(),
                source: crate::fsutil::FileError::Io(e),
            })?;
        let parsed = parse_text(path, &text)?;
        if parsed.torn {
            // Never append after a torn line: it would turn a torn tail into damage.
            file.set_len(parsed.good_len as u64).map_err(write_err)?;
        }
        let records = f(&parsed.lock);
        let mut lines = String::new();
        for r in &records {
            lines.push_str(&record_line(r)?);
        }
        (&file)
            .write_all(lines.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(write_err)?;
        drop(guard);
        return Ok(records.len());
    }
}

impl Progress for LockStore {
    fn is_done(&self, step_id: &str, uuid: &str) -> bool {
        self.status(step_id, uuid) == Some(StepStatus::Done)
    }

    fn recorded_domains(&self, step_id: &str) -> Vec<(String, String)> {
        self.lock().data.recorded_domains(step_id)
    }
}

impl Progress for Lockfile {
    fn is_done(&self, step_id: &str, uuid: &str) -> bool {
        self.get(step_id, uuid)
            .is_some_and(|r| r.status == StepStatus::Done)
    }

    fn recorded_domains(&self, step_id: &str) -> Vec<(String, String)> {
        self.steps
            .iter()
            .filter(|r| r.step_id == step_id)
            .map(|r| (r.uuid.clone(), r.vm.clone()))
            .collect()
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
        let text = lock.to_text().unwrap();
        let back = Lockfile::parse(Path::new("x.lock"), &text).unwrap();
        let mut sorted = lock.clone();
        sorted.sort();
        assert_eq!(back, sorted);
        assert_eq!(back.to_text().unwrap(), text);
        // Same-time records come out in step, then domain order.
        let order: Vec<_> = back.steps.iter().map(|r| (r.step, r.vm.as_str())).collect();
        assert_eq!(order, [(1, "web-01"), (1, "web-02"), (2, "web-01")]);
        assert!(text.starts_with("{\"header\":{\"version\":2,"), "{text}");
        assert!(text.contains("\"status\":\"done\""));
        assert!(text.contains("\"power\":\"shutting-down\""), "{text}");
        assert_eq!(text.lines().count(), 4, "a header and one line per record");
    }

    /// Version 1 lockfiles (one TOML document) are still read.
    #[test]
    fn version_1_toml_lockfiles_are_read() {
        let text = "version = 1\nplan_sha256 = \"abc\"\n\n[[step]]\nstep = 1\nstep_id = \"s1\"\n\
                    vm = \"web-01\"\nuuid = \"u1\"\nstatus = \"done\"\n";
        let lock = Lockfile::parse(Path::new("p.lock"), text).unwrap();
        assert_eq!(lock.plan_sha256, "abc");
        assert_eq!(lock.steps[0].status, StepStatus::Done);
    }

    /// A store whose file holds `records`, compacted.
    fn seeded(path: &Path, records: Vec<StepRecord>) -> LockStore {
        let store = LockStore::open(path, "abc").unwrap();
        {
            let mut shared = store.lock();
            shared.data.steps.extend(records);
            shared.index = Index::of(&shared.data);
        }
        store.compact().unwrap();
        store
    }

    fn fleet(n: usize) -> Vec<StepRecord> {
        (0..n)
            .map(|i| {
                record(
                    i + 1,
                    &format!("s{i}"),
                    &format!("vm-{i:05}"),
                    StepStatus::Pending,
                )
            })
            .collect()
    }

    /// A crash can cut the last append anywhere: every cut of the last record reads as the
    /// progress before it (never a misread record), and compacting drops the torn tail.
    #[test]
    fn a_lockfile_cut_at_every_byte_of_its_last_record_reads_as_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let store = seeded(&path, fleet(3));
        store
            .update("s0", "uuid-vm-00000", |r| r.status = StepStatus::Running)
            .unwrap();
        let before_last = LockStore::read(&path).unwrap();
        let text_before = std::fs::read(&path).unwrap();
        store
            .update("s0", "uuid-vm-00000", |r| {
                r.status = StepStatus::Done;
                r.message = "applied; \"quoted\"\nsecond line".to_owned();
                r.finished_at = Some(t("2026-12-01T09:00:01Z"));
            })
            .unwrap();
        let after_last = LockStore::read(&path).unwrap();
        assert_eq!(
            after_last.get("s0", "uuid-vm-00000").unwrap().status,
            StepStatus::Done
        );
        let full = std::fs::read(&path).unwrap();
        assert!(full.len() > text_before.len() + 100);
        let cut_path = dir.path().join("cut.lock");
        for cut in text_before.len()..full.len() {
            std::fs::write(&cut_path, &full[..cut]).unwrap();
            let read = LockStore::read(&cut_path).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(read, before_last, "cut at byte {cut}");
            // An executor opening it compacts it: the torn tail is gone, the rest kept.
            let reopened = LockStore::open(&cut_path, "abc").unwrap();
            reopened.compact().unwrap();
            let text = std::fs::read_to_string(&cut_path).unwrap();
            assert!(text.ends_with('\n'), "cut at {cut}");
            assert_eq!(LockStore::read(&cut_path).unwrap().steps.len(), 3);
        }
        // Garbage (a torn write filled with zeros) reads the same.
        let mut zeros = text_before.clone();
        zeros.extend_from_slice(&[0; 300]);
        std::fs::write(&cut_path, &zeros).unwrap();
        assert_eq!(LockStore::read(&cut_path).unwrap(), before_last);
    }

    /// A damaged line followed by good ones is not a torn write: refused, never overwritten.
    #[test]
    fn a_damaged_line_before_good_ones_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let store = seeded(&path, fleet(2));
        store
            .update("s0", "uuid-vm-00000", |r| r.status = StepStatus::Running)
            .unwrap();
        drop(store);
        let text = std::fs::read_to_string(&path).unwrap();
        let damaged = text.replacen("\"step\":{", "\"step\":{{", 1);
        std::fs::write(&path, &damaged).unwrap();
        let err = LockStore::open(&path, "abc").unwrap_err();
        assert!(matches!(err, LockError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), damaged);
    }

    /// Appends cost the changed record, not the file: the bytes written per update do not grow
    /// with the number of records.
    #[test]
    fn bytes_written_per_update_do_not_grow_with_the_plan() {
        let per_update = |n: usize| {
            let dir = tempfile::tempdir().unwrap();
            let store = seeded(&dir.path().join("p.lock"), fleet(n));
            let start = store.io_stats();
            for i in 0..20 {
                store
                    .update(&format!("s{i}"), &format!("uuid-vm-{i:05}"), |r| {
                        r.status = StepStatus::Running;
                    })
                    .unwrap();
            }
            let end = store.io_stats();
            assert_eq!(end.appends - start.appends, 20);
            assert_eq!(end.compactions, start.compactions);
            (end.appended_bytes - start.appended_bytes) / 20
        };
        let (small, large) = (per_update(20), per_update(5000));
        assert!(small < 1024, "{small} bytes per update");
        assert_eq!(small, large, "bytes per update grew with the plan");
    }

    /// Another process (an operator's `cancel`) appends while the store has the file open:
    /// merged at the next group commit, and never over a step this executor runs.
    #[test]
    fn external_appends_are_merged_but_never_over_a_running_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let store = seeded(&path, fleet(3));
        store
            .update("s0", "uuid-vm-00000", |r| r.status = StepStatus::Running)
            .unwrap();
        let appended = append_external(&path, |lock| {
            ["s0", "s1"]
                .iter()
                .zip(["uuid-vm-00000", "uuid-vm-00001"])
                .map(|(id, uuid)| {
                    let mut r = lock.get(id, uuid).unwrap().clone();
                    r.status = StepStatus::Cancelled;
                    r.message = "cancelled by ops".to_owned();
                    r
                })
                .collect()
        })
        .unwrap();
        assert_eq!(appended, 2);
        store.refresh().unwrap();
        assert_eq!(
            store.status("s1", "uuid-vm-00001"),
            Some(StepStatus::Cancelled)
        );
        assert_eq!(
            store.status("s0", "uuid-vm-00000"),
            Some(StepStatus::Running)
        );
        // A compaction keeps what was merged.
        store
            .update("s2", "uuid-vm-00002", |r| r.status = StepStatus::Done)
            .unwrap();
        store.compact().unwrap();
        let on_disk = LockStore::read(&path).unwrap();
        assert_eq!(
            on_disk.get("s1", "uuid-vm-00001").unwrap().status,
            StepStatus::Cancelled
        );
        assert_eq!(
            on_disk.get("s0", "uuid-vm-00000").unwrap().status,
            StepStatus::Running
        );
        assert_eq!(
            on_disk.get("s2", "uuid-vm-00002").unwrap().status,
            StepStatus::Done
        );
        // After the compaction renamed a new file into place, an external append still lands.
        append_external(&path, |lock| {
            let mut r = lock.get("s2", "uuid-vm-00002").unwrap().clone();
            r.message = "noted".to_owned();
            vec![r]
        })
        .unwrap();
        assert_eq!(
            LockStore::read(&path)
                .unwrap()
                .get("s2", "uuid-vm-00002")
                .unwrap()
                .message,
            "noted"
        );
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
            selection: None,
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
        // Version 1 (one TOML document): a record twice is damage. (In version 2 a later line
        // superseding an earlier one is the journal itself.)
        lock.version = 1;
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
        let err = Lockfile::parse(
            Path::new("p.lock"),
            "{\"header\":{\"version\":4,\"plan_sha256\":\"x\",\"new\":1}}\n{\"whatever\":{}}\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, LockError::NewerVersion { version: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade virtplan"));
    }

    /// A header that records a filter is format 3, which a virtplan from before filters
    /// (reading up to 2) refuses as newer, not as corrupt; without a filter it stays 2.
    #[test]
    fn a_lockfile_with_a_filter_is_format_3_and_without_one_format_2() {
        let mut lock = Lockfile::new("x");
        let plain = lock.to_text().unwrap();
        assert!(plain.starts_with("{\"header\":{\"version\":2,"), "{plain}");
        lock.filter =
            Some(crate::filter::Filter::new(vec!["web-*".to_owned()], Vec::new()).unwrap());
        let filtered = lock.to_text().unwrap();
        assert!(
            filtered.starts_with("{\"header\":{\"version\":3,"),
            "{filtered}"
        );
        let back = Lockfile::parse(Path::new("p.lock"), &filtered).unwrap();
        assert_eq!(back.filter, lock.filter);
        assert_eq!(
            Lockfile::parse(Path::new("p.lock"), &plain).unwrap().filter,
            None
        );
    }

    #[test]
    fn updates_are_written_through_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let store = seeded(&path, vec![record(1, "s1", "a", StepStatus::Pending)]);
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
