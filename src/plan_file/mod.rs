//! The YAML plan file (format version 1): its validated model, and loading with located errors.
//!
//! [`load`] reads a file, refuses oversized or non-text input, parses YAML with positions
//! (`marked-yaml`, which also refuses anchors, aliases and tags, so no YAML bomb gets through),
//! and validates every key, collecting all problems with file:line:column before giving up.

pub mod diag;
mod notify;
pub mod schema;
pub mod step_id;
pub mod time;
mod tree;
pub mod units;
mod validate;
mod yaml;

/// The keys each mapping of a plan allows. Public so a test can hold them equal to the JSON
/// Schema's properties: the validator and the schema cannot drift apart.
pub mod keys {
    pub use super::validate::{
        ATTRIBUTE_KEYS, CHECK_KEYS, CLOCK_KEYS, DEFAULTS_KEYS, MATCH_KEYS, ROLLOUT_KEYS,
        SHUTDOWN_KEYS, SNAPSHOT_KEYS, STEP_KEYS, TOP_KEYS, WINDOW_KEYS,
    };
    pub use crate::notify::target::{EMAIL_KEYS as NOTIFY_EMAIL_KEYS, TARGET_KEYS as NOTIFY_KEYS};
}

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use diag::{Diagnostic, Diagnostics, Pos};

use crate::attr::Attr;
pub use crate::state::LifecycleAction;
use crate::state::{Kib, PowerState};
use crate::uri::Uri;

/// Files larger than this are refused before parsing: a plan is a page of YAML, not a data set.
pub const MAX_PLAN_BYTES: u64 = 4 * 1024 * 1024;

/// The only plan format version this build understands.
pub const FORMAT_VERSION: u64 = 1;

/// A value together with where it was written, so later stages can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub pos: Pos,
}

/// A validated plan file.
#[derive(Debug, Clone)]
pub struct PlanFile {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    /// The file's text (for diffs and saved plans).
    pub source: String,
    pub name: String,
    /// Resolved default libvirt URI (plan, else config); `None` when neither sets one.
    pub connection: Option<Uri>,
    pub timezone: Option<Tz>,
    pub window: Option<Window>,
    pub grace: Duration,
    pub on_failure: OnFailure,
    /// How many steps may run at once (virtplan.toml `parallelism`).
    pub parallelism: usize,
    /// How many steps may run at once on one connection (virtplan.toml `[hosts.NAME]
    /// max_parallel`), by resolved URI.
    pub host_caps: std::collections::BTreeMap<Uri, usize>,
    pub steps: Vec<Step>,
    /// Notification targets in effect: the plan's `notify`, else virtplan.toml's `[[notify]]`.
    pub notify: Vec<crate::notify::Target>,
}

/// The maintenance window: every step lies in `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// What happens to a domain's later steps when one of its steps fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Skip that domain's later steps; other domains go on.
    #[default]
    SkipVm,
    /// Stop the whole plan.
    Abort,
}

/// How a domain is powered off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownPolicy {
    pub mode: ShutdownMode,
    /// How long a graceful shutdown may take.
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    /// Pull the plug when the guest ignores the request for `timeout`.
    pub force_after_timeout: bool,
}

impl Default for ShutdownPolicy {
    fn default() -> Self {
        Self {
            mode: ShutdownMode::Graceful,
            timeout: Duration::from_secs(120),
            force_after_timeout: true,
        }
    }
}

/// Serde helper: durations as whole seconds in saved plans and lockfiles.
mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Ask the guest (ACPI) and wait up to the timeout.
    Graceful,
    /// Destroy at once.
    Force,
}

/// The power state a step asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerTarget {
    Running,
    Shutoff,
    Paused,
    /// An action, not a state: the shutdown ladder, then start. Never satisfied by a state,
    /// so it runs once and is then recorded done.
    Reboot,
}

impl PowerTarget {
    /// Whether `state` already satisfies this target.
    #[must_use]
    pub fn satisfied_by(self, state: PowerState) -> bool {
        matches!(
            (self, state),
            (Self::Running, PowerState::Running)
                | (Self::Shutoff, PowerState::Shutoff)
                | (Self::Paused, PowerState::Paused)
        )
    }

    /// The state the domain is in after the step: a reboot leaves it running.
    #[must_use]
    pub fn as_state(self) -> PowerState {
        match self {
            Self::Running | Self::Reboot => PowerState::Running,
            Self::Shutoff => PowerState::Shutoff,
            Self::Paused => PowerState::Paused,
        }
    }
}

impl fmt::Display for PowerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reboot => f.write_str("reboot"),
            _ => fmt::Display::fmt(&self.as_state(), f),
        }
    }
}

/// `<clock offset=…>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockOffset {
    Utc,
    Localtime,
}

/// `<timer name='rtc' track=…>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtcTrack {
    Boot,
    Guest,
    Wall,
    Realtime,
}

impl ClockOffset {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utc => "utc",
            Self::Localtime => "localtime",
        }
    }
}

impl RtcTrack {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Guest => "guest",
            Self::Wall => "wall",
            Self::Realtime => "realtime",
        }
    }
}

/// The clock a step asks for; unset fields are left as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClockTarget {
    pub offset: Option<ClockOffset>,
    pub track: Option<RtcTrack>,
    /// Set the guest's time from the host (libvirt's domain time API, through the guest
    /// agent) once the step's changes are made and the guest runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync: bool,
}

impl ClockTarget {
    /// Whether the step edits the domain XML (offset or track), as opposed to only syncing.
    #[must_use]
    pub fn edits_xml(&self) -> bool {
        self.offset.is_some() || self.track.is_some()
    }
}

/// A gate after a step's changes: the step is done only when every given condition holds
/// within `timeout`, polled every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckSpec {
    /// The libvirt state the domain must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PowerTarget>,
    /// The guest agent must answer a ping.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// Run with `sh -c`; exit 0 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    #[serde(with = "duration_millis")]
    pub interval: Duration,
}

impl CheckSpec {
    /// How long a check waits by default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
    /// How often a check polls by default.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

    /// `state=running, guest agent, command "curl …"`: what the check waits for, for plan
    /// output and messages.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(state) = self.state {
            parts.push(format!("state {state}"));
        }
        if self.guest_agent {
            parts.push("guest agent answers".to_owned());
        }
        if let Some(command) = &self.command {
            parts.push(format!("`{command}` exits 0"));
        }
        format!(
            "{} (within {}, every {})",
            parts.join(", "),
            units::format_duration(self.timeout),
            units::format_duration(self.interval)
        )
    }
}

/// Serde helper: short durations (check intervals) as whole milliseconds.
mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A number of a rollout's domains: a count, or a percentage of the reviewed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Share {
    Count(u32),
    /// 0 to 100.
    Percent(u8),
}

impl Share {
    /// The share of `domains`: a percentage is rounded down (`25%` of 6 is 1), like a
    /// playbook runner's `serial`/`max_fail_percentage`, so a limit never lets more through
    /// than written.
    #[must_use]
    pub fn of(self, domains: usize) -> usize {
        match self {
            Self::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Self::Percent(p) => domains.saturating_mul(usize::from(p)) / 100,
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `rollout`: how a step with several domains goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// At most this many domains at once (a domain's share includes its check); `None`: no
    /// limit beyond `parallelism`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<Share>,
    /// Once more domains than this failed, no further domain starts.
    pub max_errors: Share,
    /// How long a slot freed by a finished domain stays empty before the next domain starts.
    #[serde(with = "duration_millis")]
    pub pause: Duration,
}

/// A snapshot a step takes (idempotent by name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotSpec {
    pub name: String,
    pub description: Option<String>,
}

/// The desired state a step asks for. Unset attributes are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub power: Option<Located<PowerTarget>>,
    pub memory: Option<Located<Kib>>,
    pub max_memory: Option<Located<Kib>>,
    pub vcpus: Option<Located<u32>>,
    pub max_vcpus: Option<Located<u32>>,
    pub clock: Option<Located<ClockTarget>>,
    pub autostart: Option<Located<bool>>,
    pub title: Option<Located<String>>,
    pub description: Option<Located<String>>,
    pub snapshot: Option<Located<SnapshotSpec>>,
    pub on_poweroff: Option<Located<LifecycleAction>>,
    pub on_reboot: Option<Located<LifecycleAction>>,
}

impl Attributes {
    /// The attributes the step sets, each with where it was written.
    #[must_use]
    pub fn set(&self) -> Vec<(Attr, Pos)> {
        // Destructured without `..`: a new field must be listed here, and so in `Attr`.
        let Self {
            power,
            memory,
            max_memory,
            vcpus,
            max_vcpus,
            clock,
            autostart,
            title,
            description,
            snapshot,
            on_poweroff,
            on_reboot,
        } = self;
        [
            (Attr::Power, power.as_ref().map(|l| l.pos)),
            (Attr::Memory, memory.as_ref().map(|l| l.pos)),
            (Attr::MaxMemory, max_memory.as_ref().map(|l| l.pos)),
            (Attr::Vcpus, vcpus.as_ref().map(|l| l.pos)),
            (Attr::MaxVcpus, max_vcpus.as_ref().map(|l| l.pos)),
            (Attr::Clock, clock.as_ref().map(|l| l.pos)),
            (Attr::Autostart, autostart.as_ref().map(|l| l.pos)),
            (Attr::Title, title.as_ref().map(|l| l.pos)),
            (Attr::Description, description.as_ref().map(|l| l.pos)),
            (Attr::Snapshot, snapshot.as_ref().map(|l| l.pos)),
            (Attr::OnPoweroff, on_poweroff.as_ref().map(|l| l.pos)),
            (Attr::OnReboot, on_reboot.as_ref().map(|l| l.pos)),
        ]
        .into_iter()
        .filter_map(|(attr, pos)| Some((attr, pos?)))
        .collect()
    }

    /// Whether the step sets `attr` (without building [`Attributes::set`]: the planner asks
    /// this several times per step).
    #[must_use]
    pub fn has(&self, attr: Attr) -> bool {
        match attr {
            Attr::Power => self.power.is_some(),
            Attr::Memory => self.memory.is_some(),
            Attr::MaxMemory => self.max_memory.is_some(),
            Attr::Vcpus => self.vcpus.is_some(),
            Attr::MaxVcpus => self.max_vcpus.is_some(),
            Attr::Clock => self.clock.is_some(),
            Attr::Autostart => self.autostart.is_some(),
            Attr::Title => self.title.is_some(),
            Attr::Description => self.description.is_some(),
            Attr::Snapshot => self.snapshot.is_some(),
            Attr::OnPoweroff => self.on_poweroff.is_some(),
            Attr::OnReboot => self.on_reboot.is_some(),
            // Not a key of its own: never among the attributes a step sets.
            Attr::GuestTime => false,
        }
    }
}

/// One `vm`/`vms` entry: a domain name or UUID as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// A domain name or UUID; for [`TargetKind::Match`], a validated glob pattern.
    pub name_or_uuid: String,
    pub pos: Pos,
    pub kind: TargetKind,
}

/// How a [`Target`] names domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// `vm: NAME` or an entry of `vms: [..]`: one domain by name or UUID.
    Domain,
    /// `vms: {match: GLOB}`: every domain of the step's connection whose name matches, resolved
    /// when the plan is made (the reviewed set).
    Match,
}

impl Target {
    /// The glob of a [`TargetKind::Match`] target (validated when the file was loaded).
    #[must_use]
    pub fn pattern(&self) -> Option<glob::Pattern> {
        match self.kind {
            TargetKind::Domain => None,
            TargetKind::Match => glob::Pattern::new(&self.name_or_uuid).ok(),
        }
    }
}

/// One step of the plan.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based position in the file, as users count steps.
    pub number: usize,
    /// Where the step's mapping starts.
    pub pos: Pos,
    /// When the step is due; `None` runs as soon as `apply` starts.
    pub at: Option<Located<DateTime<Utc>>>,
    pub targets: Vec<Target>,
    /// Resolved libvirt URI for this step (step, plan, then config).
    pub connection: Option<Uri>,
    pub shutdown: ShutdownPolicy,
    pub attributes: Attributes,
    /// A gate after the step's changes.
    pub check: Option<Located<CheckSpec>>,
    /// Runs even after an earlier step of its domain failed, was skipped or missed, or the
    /// plan was aborted, so a window can always restore service.
    pub always: bool,
    /// How the step goes through its domains (a step with `vms` only).
    pub rollout: Option<Located<RolloutSpec>>,
    /// Which occurrence of an identical step this is (1 for a step written once; 2 for the
    /// second `autostart: true` of `true → false → true`), so every step has its own id.
    pub repeat: usize,
    /// [`Step::id`], hashed once: a step is not changed after validation, and `plan`,
    /// `status` and the executor ask for its id many times.
    id: std::sync::OnceLock<String>,
}

/// Default number of domains changed at the same time.
pub const DEFAULT_PARALLELISM: usize = 8;

/// What a plan inherits from its `virtplan.toml` and validation needs. The configuration
/// module fills it (`LoadContext::from(config)`); the plan file model imports nothing of the
/// configuration module, so the two form no cycle.
#[derive(Debug, Clone)]
pub struct LoadContext {
    /// The default connection, a host alias already resolved.
    pub connection: Option<Uri>,
    /// `[hosts]`: the aliases a plan's `connection` may name.
    pub hosts: std::collections::BTreeMap<String, Uri>,
    /// `[hosts.NAME] max_parallel`.
    pub host_caps: std::collections::BTreeMap<Uri, usize>,
    pub timezone: Option<Tz>,
    pub grace: Option<Duration>,
    pub shutdown: ShutdownPolicy,
    pub parallelism: usize,
    /// `[[notify]]` targets, for plans without a `notify` of their own.
    pub notify: Vec<crate::notify::Target>,
}

impl Default for LoadContext {
    /// What a plan inherits when there is no `virtplan.toml`.
    fn default() -> Self {
        Self {
            connection: None,
            hosts: std::collections::BTreeMap::new(),
            host_caps: std::collections::BTreeMap::new(),
            timezone: None,
            grace: None,
            shutdown: ShutdownPolicy::default(),
            parallelism: DEFAULT_PARALLELISM,
            notify: Vec::new(),
        }
    }
}

impl LoadContext {
    /// A connection as a plan writes it: a libvirt URI, or a host alias (see
    /// [`crate::uri::resolve_connection`]).
    #[must_use]
    pub fn resolve_connection(&self, text: &str) -> Option<Uri> {
        crate::uri::resolve_connection(text, &self.hosts)
    }
}

/// Reads and validates one plan file.
///
/// # Errors
/// Every problem found, each located at file:line:column with a hint.
pub fn load(path: &Path, ctx: &LoadContext) -> Result<PlanFile, Diagnostics> {
    let text = read_text(path)?;
    parse(path, text, ctx)
}

/// Validates plan text as if read from `path`.
///
/// # Errors
/// Every problem found, each located at file:line:column with a hint.
pub fn parse(path: &Path, text: String, ctx: &LoadContext) -> Result<PlanFile, Diagnostics> {
    match validate::validate(path, &text, ctx) {
        Ok(mut plan) => {
            plan.source = text;
            Ok(plan)
        }
        Err(mut items) => {
            items.sort_by_key(|d| d.pos);
            Err(Diagnostics {
                file: path.to_path_buf(),
                text: Some(text),
                items,
            })
        }
    }
}

/// Reads a file as UTF-8 text, refusing it before parsing when it is too large or binary.
fn read_text(path: &Path) -> Result<String, Diagnostics> {
    let fail = |pos: Pos, message: String, help: &str| Diagnostics {
        file: path.to_path_buf(),
        text: None,
        items: vec![Diagnostic::new(path, pos, message).with_help(help)],
    };
    let start = Pos::new(1, 1);
    // Checked on the opened file: a FIFO or device is refused before anything is read (a FIFO
    // would block forever, /dev/zero reports a size of 0 and never ends).
    let bytes = crate::fsutil::read_regular(path, MAX_PLAN_BYTES).map_err(|e| match e {
        crate::fsutil::FileError::NotRegular("a folder") => fail(
            start,
            "this is a folder, not a plan file".to_owned(),
            "name a .yaml plan file (use `virtplan watch DIR` for a folder of plans)",
        ),
        crate::fsutil::FileError::NotRegular(kind) => fail(
            start,
            format!("this is {kind}, not a plan file"),
            "name a regular .yaml file; virtplan reads plans only from regular files",
        ),
        crate::fsutil::FileError::TooLarge { limit, size } => fail(
            start,
            match size {
                Some(size) => {
                    format!("the file is {size} bytes; plans are limited to {limit} bytes")
                }
                None => format!("the file is larger than {limit} bytes, the limit for plans"),
            },
            "split the plan into several files",
        ),
        other => fail(
            start,
            format!("cannot read the plan file: {other}"),
            "check the path and that you may read it",
        ),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..valid]).into_owned();
        Diagnostics {
            file: path.to_path_buf(),
            items: vec![Diagnostic::new(
                path,
                Pos::of_offset(&text, valid),
                format!(
                    "the file is not UTF-8 text: byte 0x{:02X} here is not valid UTF-8",
                    e.as_bytes().get(valid).copied().unwrap_or_default()
                ),
            )
            .with_help("save the plan as UTF-8 (an editor may have used Latin-1), or check that this is the right file, not binary data")],
            text: Some(text),
        }
    })
}

impl PlanFile {
    /// The libvirt URIs the steps use; `--connect` (`connect`) replaces all of them.
    #[must_use]
    pub fn connection_uris(&self, connect: Option<&Uri>) -> std::collections::BTreeSet<Uri> {
        match connect {
            Some(uri) => std::iter::once(uri.clone()).collect(),
            None => self
                .steps
                .iter()
                .filter_map(|s| s.connection.clone())
                .collect(),
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`, the form plans, saved plans and lockfiles record.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    validate::hex(&Sha256::digest(bytes))
}

impl Step {
    /// A short description for messages: `step 3 (web-01, web-02)`.
    #[must_use]
    pub fn label(&self) -> String {
        let names: Vec<&str> = self
            .targets
            .iter()
            .map(|t| t.name_or_uuid.as_str())
            .collect();
        format!("step {} ({})", self.number, names.join(", "))
    }
}

impl Step {
    /// A stable identity for the lockfile: see [`step_id`]. Hashed on first use, then kept.
    #[must_use]
    pub fn id(&self) -> String {
        self.id
            .get_or_init(|| step_id::StepIdentity::of(self).id())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps are checked while the file is parsed, against the settings written above
    /// `steps`, and dropped from the tree; settings written below it must still apply to every
    /// step, and each step's problems must be reported once, as when the settings come first.
    #[test]
    fn settings_written_after_the_steps_apply_to_them_as_if_written_before() {
        let settings = "timezone: Europe/Paris\nconnection: qemu:///session\nwindow: {start: 2030-01-01 03:00, end: 2030-01-01 06:00}\ndefaults: {shutdown: {mode: graceful, timeout: 7m}}\n";
        // Many steps, then one with a problem and one relative to the window.
        let many = (0..600)
            .map(|i| {
                format!("  - {{at: 2030-01-01 04:00, vm: web-{i}, memory: 1GiB, power: shutoff}}\n")
            })
            .collect::<Vec<_>>()
            .concat();
        let steps = format!("steps:\n{many}  - {{at: +10m, vm: db, memory: lots}}\n  - {{at: +20m, vm: db, power: running}}\n");
        let blank = "#\n".repeat(settings.lines().count());
        let before = format!("version: 1\n{settings}{steps}{blank}");
        let after = format!("version: 1\n{blank}{steps}{settings}");
        let read = |text: &str| {
            parse(
                Path::new("p.yaml"),
                text.to_owned(),
                &LoadContext::default(),
            )
        };
        let (Err(before), Err(after)) = (read(&before), read(&after)) else {
            panic!("the step with `memory: lots` must be refused");
        };
        let step_problems = |d: &Diagnostics| -> Vec<String> {
            d.items
                .iter()
                .filter(|i| i.pos.line > 5 && i.pos.line < 610)
                .map(|i| format!("{}:{} {}", i.pos.line, i.pos.column, i.message))
                .collect()
        };
        assert_eq!(step_problems(&after), step_problems(&before));
        assert_eq!(step_problems(&before).len(), 1, "{:?}", before.items);

        let fixed = |text: String| text.replace("memory: lots", "memory: 2GiB");
        let before = read(&fixed(format!("version: 1\n{settings}{steps}{blank}"))).unwrap();
        let after = read(&fixed(format!("version: 1\n{blank}{steps}{settings}"))).unwrap();
        assert_eq!(format!("{:?}", after.steps), format!("{:?}", before.steps));
        // And the settings did reach them: 04:00 in Paris, graceful with 7 minutes, the session.
        let first = &after.steps[0];
        assert_eq!(
            first.at.as_ref().map(|a| a.value.to_rfc3339()),
            Some("2030-01-01T03:00:00+00:00".to_owned())
        );
        assert_eq!(first.shutdown.timeout, std::time::Duration::from_secs(420));
        assert_eq!(
            first.connection.as_ref().map(Uri::expose),
            Some("qemu:///session")
        );
        let last = &after.steps[601];
        assert_eq!(
            last.at.as_ref().map(|a| a.value.to_rfc3339()),
            Some("2030-01-01T02:20:00+00:00".to_owned())
        );
    }

    /// `has` answers from the fields directly; it must agree with `set` for every attribute.
    #[test]
    fn attributes_has_agrees_with_set_for_every_attribute() {
        fn at<T>(value: T) -> Option<Located<T>> {
            let pos = Pos::new(3, 1);
            (pos.line > 0).then_some(Located { value, pos })
        }
        let p = Pos::new(3, 1);
        for attr in Attr::ALL {
            let mut a = Attributes::default();
            match attr {
                Attr::Power => a.power = at(PowerTarget::Running),
                Attr::Memory => a.memory = at(Kib(1024)),
                Attr::MaxMemory => a.max_memory = at(Kib(1024)),
                Attr::Vcpus => a.vcpus = at(1),
                Attr::MaxVcpus => a.max_vcpus = at(1),
                Attr::Clock => {
                    let sync = ClockTarget {
                        offset: None,
                        track: None,
                        sync: true,
                    };
                    a.clock = at(sync);
                }
                Attr::Autostart => a.autostart = at(true),
                Attr::Title => a.title = at("t".to_owned()),
                Attr::Description => a.description = at("d".to_owned()),
                Attr::Snapshot => {
                    let spec = SnapshotSpec {
                        name: "s".into(),
                        description: None,
                    };
                    a.snapshot = at(spec);
                }
                Attr::OnPoweroff => a.on_poweroff = at(LifecycleAction::Destroy),
                Attr::OnReboot => a.on_reboot = at(LifecycleAction::Restart),
                Attr::GuestTime => {}
            }
            for other in Attr::ALL {
                assert_eq!(
                    a.has(other),
                    a.set().contains(&(other, p)),
                    "{other:?} with only {attr:?} set"
                );
            }
        }
    }
}
