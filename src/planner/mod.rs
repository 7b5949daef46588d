//! Projection of a plan's steps over observed domain state into a [`Plan`] value: every change
//! with its before and after, how it will be applied, notes and warnings.
//!
//! `plan` renders this value, `plan --out` saves it, and `apply` executes it: nothing is
//! planned twice in two different ways.

pub mod overlap;
mod project;
pub mod saved;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::attr::{Attr, Figure};
use crate::hypervisor::{DomainId, HvError, Hypervisor};
use crate::plan_file::{
    CheckSpec, ClockTarget, OnFailure, PlanFile, Pos, RolloutSpec, ShutdownPolicy, SnapshotSpec,
    Window,
};
use crate::state::{DomainState, Kib, LifecycleAction, LifecycleEvent};
use crate::uri::Uri;

pub use project::{project, project_selected};

/// Version of the JSON output and of saved plans.
pub const FORMAT_VERSION: u32 = 1;

/// Open hypervisor connections, one per URI.
pub type Connections = BTreeMap<Uri, Arc<dyn Hypervisor>>;

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    /// The attribute will change.
    Change,
    /// Already as asked: nothing to do.
    Noop,
    /// The lockfile records this step as done.
    Done,
}

/// One attribute of one domain at one step: the unit of `plan` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "ChangeRepr")]
pub struct Change {
    /// 1-based step number in the plan file.
    pub step: usize,
    /// Stable step id (as recorded in the lockfile).
    pub step_id: String,
    /// When the step is due (RFC 3339); null when it runs as soon as `apply` starts.
    #[serde(serialize_with = "rfc3339")]
    pub at: Option<DateTime<Utc>>,
    pub vm: String,
    pub uuid: String,
    pub connection: Uri,
    pub attribute: Attr,
    pub before: Figure,
    pub after: Figure,
    pub action: ChangeAction,
    /// How it is applied: `live+config`, `config`, `graceful shutdown, force after 2m`, ...
    pub method: Option<String>,
    pub notes: Vec<String>,
    /// Unified diff of the persistent domain XML, for XML-level changes (clock).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub xml_diff: Option<String>,
}

/// Serde helper: a time as chrono writes it (RFC 3339 with `Z`, fractional seconds only when
/// there are some), handed to the serializer as one string. chrono's own `Serialize` writes it
/// a character at a time, each through serde_json's escaper: that was a quarter of
/// `plan --format json`'s instructions per change.
#[allow(clippy::ref_option)] // serde's serialize_with passes the field by reference
pub(crate) fn rfc3339<S: serde::Serializer>(
    at: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => s.serialize_some(&at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        None => s.serialize_none(),
    }
}

/// [`Change`] as read back from JSON: its figures are read by their attribute.
#[derive(Deserialize, schemars::JsonSchema)]
struct ChangeRepr {
    step: usize,
    step_id: String,
    at: Option<DateTime<Utc>>,
    vm: String,
    uuid: String,
    connection: Uri,
    attribute: Attr,
    before: serde_json::Value,
    after: serde_json::Value,
    action: ChangeAction,
    method: Option<String>,
    notes: Vec<String>,
    #[serde(default)]
    xml_diff: Option<String>,
}

impl TryFrom<ChangeRepr> for Change {
    type Error = String;

    fn try_from(r: ChangeRepr) -> Result<Self, String> {
        Ok(Self {
            before: r.attribute.figure_from_json(&r.before)?,
            after: r.attribute.figure_from_json(&r.after)?,
            step: r.step,
            step_id: r.step_id,
            at: r.at,
            vm: r.vm,
            uuid: r.uuid,
            connection: r.connection,
            attribute: r.attribute,
            action: r.action,
            method: r.method,
            notes: r.notes,
            xml_diff: r.xml_diff,
        })
    }
}

impl Change {
    /// `memory 128MiB → 3GiB`, or `memory 3GiB (no change)`. An action that leaves the figure
    /// as it was (a reboot: `power running → running`) is a change, not "no change".
    #[must_use]
    pub fn describe(&self) -> String {
        if self.before == self.after && self.action != ChangeAction::Change {
            format!("{} {} (no change)", self.attribute, self.after)
        } else {
            format!("{} {} → {}", self.attribute, self.before, self.after)
        }
    }
}

/// One libvirt operation the executor performs, in order, for one step on one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Action {
    /// Graceful shutdown (with the policy's timeout and force), or destroy for `force` mode.
    PowerOff {
        policy: ShutdownPolicy,
    },
    Suspend,
    Snapshot {
        spec: SnapshotSpec,
    },
    SetMaxMemory {
        max: Kib,
    },
    SetMemory {
        memory: Kib,
        live: bool,
    },
    SetMaxVcpus {
        max: u32,
    },
    SetVcpus {
        vcpus: u32,
        live: bool,
    },
    SetClock {
        clock: ClockTarget,
    },
    SetAutostart {
        on: bool,
    },
    SetTitle {
        title: String,
    },
    SetDescription {
        description: String,
    },
    SetLifecycle {
        event: LifecycleEvent,
        action: LifecycleAction,
    },
    Start,
    Resume,
    /// Sets the guest's clock from the host through the guest agent (`clock: {sync: true}`),
    /// once the guest runs and its agent answers.
    SyncGuestTime,
}

/// One step applied to one domain: what the executor runs and what it verifies against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub step: usize,
    pub step_id: String,
    pub at: Option<DateTime<Utc>>,
    pub domain: PlannedDomain,
    pub connection: Uri,
    /// The projected state before the step (what the reviewer saw).
    pub before: DomainState,
    /// The state the step must leave behind (verified after applying).
    pub after: DomainState,
    pub actions: Vec<Action>,
    /// Recorded done in the lockfile: nothing to run.
    pub done: bool,
    /// `power: reboot`: the `PowerOff` and `Start` actions are one reboot, recorded done once
    /// and finished, never repeated, by a resumed run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot: bool,
    /// A gate after the step's changes: done only when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// Runs even after an earlier step of its domain failed, was skipped or missed, or the
    /// plan was aborted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub always: bool,
    /// The plan file, for the check command's `VIRTPLAN_PLAN`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan_file: String,
    /// The step's `rollout`, resolved over its reviewed domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A step's `rollout` resolved over the domains the plan selected: percentages are counts
/// now, and each domain has its place in the order the domains start in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// As written.
    pub spec: RolloutSpec,
    /// How many domains the step selected.
    pub domains: usize,
    /// At most this many at once (a percentage rounded down, at least 1); `None`: no limit
    /// beyond `parallelism`.
    pub max_parallel: Option<usize>,
    /// More failures than this stop the rollout.
    pub max_errors: usize,
    /// This domain's place in the order (0-based): the order written in `vms`, name order
    /// for a pattern.
    pub position: usize,
}

impl Rollout {
    /// Resolves `spec` over `domains` domains, for the domain at `position`.
    #[must_use]
    pub fn resolve(spec: RolloutSpec, domains: usize, position: usize) -> Self {
        Self {
            spec,
            domains,
            max_parallel: spec.max_parallel.map(|s| s.of(domains).max(1)),
            max_errors: spec.max_errors.of(domains),
            position,
        }
    }

    /// How many domains start at once at most: `max_parallel`, bounded by `parallelism` and
    /// the host's cap.
    #[must_use]
    pub fn width(&self, parallelism: usize, host_cap: Option<usize>) -> usize {
        let mut width = parallelism.max(1).min(self.domains.max(1));
        if let Some(n) = self.max_parallel {
            width = width.min(n);
        }
        if let Some(n) = host_cap {
            width = width.min(n.max(1));
        }
        width
    }

    /// `2 at a time; stops after more than 0 failures; 30s pause`: the policy in words, with
    /// how percentages resolved.
    #[must_use]
    pub fn describe(&self, parallelism: usize, host_cap: Option<usize>) -> String {
        use crate::plan_file::Share;
        let width = self.width(parallelism, host_cap);
        let mut parts = Vec::new();
        let bound = match (self.spec.max_parallel, self.max_parallel) {
            (Some(Share::Percent(p)), Some(n)) => {
                format!("max_parallel {p}% of {} = {n}", self.domains)
            }
            (Some(_), Some(n)) => format!("max_parallel {n}"),
            _ => "no max_parallel".to_owned(),
        };
        let mut why = vec![bound];
        if width < self.max_parallel.unwrap_or(usize::MAX).min(self.domains) {
            if host_cap.is_some_and(|c| c == width) {
                why.push(format!("host max_parallel {width}"));
            } else {
                why.push(format!("parallelism {parallelism}"));
            }
        }
        parts.push(format!("{width} at a time ({})", why.join(", ")));
        let errors = match self.spec.max_errors {
            Share::Percent(p) => format!("{p}% of {} = {}", self.domains, self.max_errors),
            Share::Count(n) => n.to_string(),
        };
        parts.push(format!(
            "stops after more than {errors} failed (max_errors)"
        ));
        if !self.spec.pause.is_zero() {
            parts.push(format!(
                "pause {} before a freed slot is reused",
                crate::plan_file::units::format_duration(self.spec.pause)
            ));
        }
        parts.join("; ")
    }
}

/// A domain as resolved at plan time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlannedDomain {
    pub name: String,
    pub uuid: String,
}

impl From<DomainId> for PlannedDomain {
    fn from(id: DomainId) -> Self {
        Self {
            name: id.name,
            uuid: id.uuid,
        }
    }
}

/// Identity of the plan file a [`Plan`] was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanMeta {
    pub name: String,
    /// The plan file as given on the command line.
    pub file: String,
    /// SHA-256 of the plan file's bytes.
    pub sha256: String,
    /// The plan's IANA zone, for showing times as the plan's authors wrote them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timezone: Option<String>,
}

/// Counts of changes by action.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct Summary {
    pub change: usize,
    pub noop: usize,
    pub done: usize,
}

/// How a plan runs, fixed when it is made: `apply SAVED` runs under the policy that was
/// reviewed, whatever virtplan.toml says by then. Each power-off action carries its step's
/// shutdown policy, and each step its resolved connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// How late a step may still start.
    pub grace: Duration,
    /// No step starts at or after `window.end`.
    pub window: Option<Window>,
    pub on_failure: OnFailure,
    /// How many steps run at the same time.
    pub parallelism: usize,
    /// Every libvirt URI the steps use, host aliases and `--connect` resolved.
    pub connections: BTreeSet<Uri>,
    /// At most this many steps at once on a connection (virtplan.toml `[hosts.NAME]
    /// max_parallel`), for the connections the plan uses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_caps: BTreeMap<Uri, usize>,
}

impl Policy {
    /// The policy `file` asks for (its own keys, else virtplan.toml's, else the defaults);
    /// `connections` is filled in by the planner.
    #[must_use]
    pub fn of(file: &PlanFile) -> Self {
        Self {
            grace: file.grace,
            window: file.window,
            on_failure: file.on_failure,
            parallelism: file.parallelism,
            connections: BTreeSet::new(),
            host_caps: file.host_caps.clone(),
        }
    }
}

/// The whole projected plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub meta: PlanMeta,
    pub policy: Policy,
    /// When the plan was made (the `now` it was projected at).
    pub planned_at: DateTime<Utc>,
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
    pub summary: Summary,
    /// The executor's view, ordered by time then step.
    pub steps: Vec<PlannedStep>,
    /// `--only` / `--exclude`: the filter this plan was made with and the domains it left out
    /// (absent without a filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<crate::filter::Selection>,
}

/// One rollout as `plan` shows it: the step, its resolved policy and the batches its
/// domains start in.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct RolloutView {
    /// 1-based step number in the plan file.
    pub step: usize,
    pub step_id: String,
    pub at: Option<DateTime<Utc>>,
    pub connection: Uri,
    /// How many domains the step selected.
    pub domains: usize,
    /// `max_parallel` as written (`2`, `25%`); null when not set.
    pub max_parallel_written: Option<String>,
    /// `max_errors` as written (`0`, `10%`).
    pub max_errors_written: String,
    /// How many domains run at once at most: `max_parallel` resolved (a percentage rounded
    /// down, at least 1), bounded by `parallelism` and the host's `max_parallel`.
    pub max_parallel: usize,
    /// More failed domains than this stop the rollout (a percentage rounded down).
    pub max_errors: usize,
    /// Seconds a freed slot stays empty before the next domain starts.
    pub pause_seconds: f64,
    /// The policy in words.
    pub description: String,
    /// The domains in the order they start, `max_parallel` to a batch: the first batch
    /// starts at the step's time, each later domain as a slot frees up (after `pause`).
    pub batches: Vec<Vec<String>>,
}

impl Plan {
    /// The plan's rollouts, in step order, with their batches.
    #[must_use]
    pub fn rollouts(&self) -> Vec<RolloutView> {
        // Per step: its rollout, one of its planned steps, and (position, name) of each domain.
        type Gathered<'p> = (Rollout, &'p PlannedStep, Vec<(usize, &'p str)>);
        let mut by_step: BTreeMap<usize, Gathered<'_>> = BTreeMap::new();
        for s in &self.steps {
            if let Some(r) = s.rollout {
                by_step
                    .entry(s.step)
                    .or_insert_with(|| (r, s, Vec::new()))
                    .2
                    .push((r.position, s.domain.name.as_str()));
            }
        }
        by_step
            .into_values()
            .map(|(r, s, mut names)| {
                names.sort_unstable();
                let cap = self.host_cap(&s.connection);
                let width = r.width(self.policy.parallelism, cap);
                RolloutView {
                    step: s.step,
                    step_id: s.step_id.clone(),
                    at: s.at,
                    connection: s.connection.clone(),
                    domains: r.domains,
                    max_parallel_written: r.spec.max_parallel.map(|m| m.to_string()),
                    max_errors_written: r.spec.max_errors.to_string(),
                    max_parallel: width,
                    max_errors: r.max_errors,
                    pause_seconds: r.spec.pause.as_secs_f64(),
                    description: r.describe(self.policy.parallelism, cap),
                    batches: names
                        .chunks(width.max(1))
                        .map(|c| c.iter().map(|(_, n)| (*n).to_owned()).collect())
                        .collect(),
                }
            })
            .collect()
    }

    /// The `[hosts.NAME] max_parallel` of `uri`, if one applies (matched on the redacted form,
    /// which is what a saved plan keeps).
    #[must_use]
    pub fn host_cap(&self, uri: &Uri) -> Option<usize> {
        let shown = uri.redacted();
        self.policy
            .host_caps
            .iter()
            .find(|(u, _)| u.redacted() == shown)
            .map(|(_, n)| *n)
    }

    /// What a step does to one domain, in one line: `power running → shutoff; memory 128MiB → 3GiB`.
    #[must_use]
    pub fn describe(&self, step_id: &str, uuid: &str) -> String {
        self.changes
            .iter()
            .filter(|c| c.step_id == step_id && c.uuid == uuid)
            .map(Change::describe)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The attributes a step changes (or checks) on one domain.
    pub fn attributes(&self, step_id: &str, uuid: &str) -> impl Iterator<Item = Attr> + '_ {
        let (step_id, uuid) = (step_id.to_owned(), uuid.to_owned());
        self.changes
            .iter()
            .filter(move |c| c.step_id == step_id && c.uuid == uuid)
            .map(|c| c.attribute)
    }

    /// Whether anything would change.
    #[must_use]
    pub fn has_changes(&self) -> bool {
        self.summary.change > 0
    }
}

/// A step libvirt would refuse, found at plan time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanProblem {
    pub file: String,
    pub pos: Pos,
    pub step: usize,
    pub vm: String,
    pub message: String,
    pub help: String,
}

impl PlanProblem {
    /// The problem as a located diagnostic of the plan file at `path`, rendered like
    /// validation problems (source line, caret, help).
    pub fn diagnostic(&self, path: &std::path::Path) -> crate::plan_file::Diagnostic {
        crate::plan_file::Diagnostic::new(
            path,
            self.pos,
            format!("step {} ({}): {}", self.step, self.vm, self.message),
        )
        .with_help(self.help.clone())
    }
}

impl std::fmt::Display for PlanProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: step {} ({}): {} (help: {})",
            self.file, self.pos, self.step, self.vm, self.message, self.help
        )
    }
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Problems(Vec<PlanProblem>),
    /// `--only` / `--exclude` values that match none of the plan's domains.
    #[error("{0}")]
    Filter(String),
    #[error("{context}: {source}")]
    Libvirt {
        context: String,
        #[source]
        source: HvError,
    },
}

/// Where lockfile progress comes from, so `plan` shows done steps as done.
pub trait Progress {
    /// Whether step `step_id` is recorded done for the domain with `uuid`.
    fn is_done(&self, step_id: &str, uuid: &str) -> bool;

    /// The domains (UUID, name) recorded for step `step_id`: for a `vms: {match:}` step, the
    /// set it resolved to when it was first applied, which re-planning keeps.
    fn recorded_domains(&self, _step_id: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// No lockfile: nothing is done yet.
pub struct NoProgress;

impl Progress for NoProgress {
    fn is_done(&self, _: &str, _: &str) -> bool {
        false
    }
}

/// Everything the planner needs besides the plan file.
pub struct PlanInput<'a> {
    pub file: &'a PlanFile,
    pub connections: &'a Connections,
    /// `--connect`, which overrides every step's connection.
    pub connect_override: Option<&'a Uri>,
    pub now: DateTime<Utc>,
    pub progress: &'a dyn Progress,
}
