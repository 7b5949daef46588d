//! From a positioned YAML tree to a [`PlanFile`], collecting every problem with its location.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use marked_yaml::types::MarkedMappingNode;
use marked_yaml::Node;

use super::diag::{did_you_mean, Diagnostic, Pos};
use super::time::show_time;
use super::time::{parse_at, parse_instant, parse_zone};
use super::units::{self, parse_duration, parse_size};
use super::yaml::{self, pos, Checker};
use super::{
    Attributes, CheckSpec, ClockOffset, ClockTarget, LoadContext, Located, OnFailure, PlanFile,
    PowerTarget, RolloutSpec, RtcTrack, Share, ShutdownMode, ShutdownPolicy, SnapshotSpec, Step,
    Target, TargetKind, Window, FORMAT_VERSION,
};
use crate::attr::Attr;
use crate::state::LifecycleAction;
use crate::uri::Uri;

pub const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "connection",
    "timezone",
    "window",
    "grace",
    "defaults",
    "steps",
    "notify",
];
pub const WINDOW_KEYS: &[&str] = &["start", "end"];
pub const DEFAULTS_KEYS: &[&str] = &["shutdown", "on_failure"];
pub const SHUTDOWN_KEYS: &[&str] = &["mode", "timeout", "force_after_timeout"];
/// `vms: {match: GLOB}`.
pub const MATCH_KEYS: &[&str] = &["match"];
pub const CLOCK_KEYS: &[&str] = &["offset", "track", "sync"];
pub const CHECK_KEYS: &[&str] = &["state", "guest_agent", "command", "timeout", "interval"];
pub const SNAPSHOT_KEYS: &[&str] = &["name", "description"];
pub const ROLLOUT_KEYS: &[&str] = &["max_parallel", "max_errors", "pause"];
/// The attribute keys, as [`Attr`] spells them.
pub const ATTRIBUTE_KEYS: [&str; Attr::KEYS.len()] = {
    let mut keys = [""; Attr::KEYS.len()];
    let mut i = 0;
    while i < keys.len() {
        keys[i] = Attr::KEYS[i].key();
        i += 1;
    }
    keys
};
/// A step's own keys, before its attributes.
const STEP_OWN_KEYS: [&str; 5] = ["at", "vm", "vms", "connection", "shutdown"];
/// A step's keys after its attributes: how it is gated and when it runs.
const STEP_GATE_KEYS: [&str; 3] = ["check", "always", "rollout"];
/// Every key a step allows: its own, the attributes, then the gates.
pub const STEP_KEYS: [&str; STEP_OWN_KEYS.len() + ATTRIBUTE_KEYS.len() + STEP_GATE_KEYS.len()] = {
    let mut keys = [""; STEP_OWN_KEYS.len() + ATTRIBUTE_KEYS.len() + STEP_GATE_KEYS.len()];
    let own = STEP_OWN_KEYS.len();
    let attrs = own + ATTRIBUTE_KEYS.len();
    let mut i = 0;
    while i < keys.len() {
        keys[i] = if i < own {
            STEP_OWN_KEYS[i]
        } else if i < attrs {
            ATTRIBUTE_KEYS[i - own]
        } else {
            STEP_GATE_KEYS[i - attrs]
        };
        i += 1;
    }
    keys
};

const DEFAULT_GRACE: Duration = Duration::from_secs(300);

/// Plan-level settings steps inherit.
#[derive(PartialEq)]
struct Settings {
    zone: Option<Tz>,
    window: Option<Window>,
    /// The plan has a `window` key, even if it did not validate.
    window_written: bool,
    connection: Option<Uri>,
    shutdown: ShutdownPolicy,
}

// The plan's top-level keys in the order they depend on each other, then the one result.
pub fn validate(path: &Path, text: &str, ctx: &LoadContext) -> Result<PlanFile, Vec<Diagnostic>> {
    // Editors on Windows may start the file with a byte-order mark: it is not part of the YAML
    // (the hash still covers the file's bytes as they are).
    let yaml_text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let config = ctx;
    // Steps are checked as the parser reaches them, against the settings written above
    // `steps`, and their nodes dropped at once: the tree of a large plan is never held whole
    // (2000 domains x 2 steps: 1.6 ms of 53 less for `plan`). The steps are kept when the whole
    // plan's settings are those (`steps` comes last in plans).
    let mut early = EarlySteps {
        checker: Checker::new(path),
        config,
        settings: None,
        // Room for about as many steps as lines start a list item (grown from nothing by
        // doubling, the steps of a large plan were copied over several times).
        steps: Vec::with_capacity(
            yaml_text
                .lines()
                .filter(|line| line.trim_start().starts_with('-'))
                .count(),
        ),
        seen: 0,
    };
    let root = yaml::parse(path, yaml_text, Some(&mut early)).map_err(|d| vec![d])?;
    let mut c = Checker::new(path);
    let Some(map) = root.as_mapping() else {
        c.error(
            pos(&root),
            "a plan must be a YAML mapping",
            "start the file with `version: 1`",
        );
        return Err(c.diags);
    };
    if map.is_empty() {
        c.error(
            Pos::new(1, 1),
            if text.trim().is_empty() {
                "the plan file is empty"
            } else {
                "the plan file holds only comments"
            },
            "a plan needs at least `version: 1` and a `steps:` list (see `virtplan schema`)",
        );
        return Err(c.diags);
    }
    c.known_keys(map, TOP_KEYS, "the plan");

    check_version(&mut c, map);
    let name = match map.get_node("name") {
        Some(node) => c
            .text(node, "`name`", "name: web-tier-2026-12-01")
            .map(str::to_owned),
        None => Some(
            path.file_stem()
                .map_or_else(|| "plan".to_owned(), |s| s.to_string_lossy().into_owned()),
        ),
    };
    let (settings, on_failure) = settings(&mut c, map, config);
    let grace = match map.get_node("grace") {
        Some(node) => duration(&mut c, node, "`grace`", "grace: 5m"),
        None => Some(config.grace.unwrap_or(DEFAULT_GRACE)),
    };
    // A plan's own `notify` replaces the configuration's, like every other setting (`notify: []`
    // turns the configuration's targets off for this plan).
    let notify = match map.get_node("notify") {
        Some(node) => super::notify::check(&mut c, node),
        None => config.notify.clone(),
    };

    let steps = match map.get_node("steps") {
        None => {
            c.error(
                Pos::new(1, 1),
                "the plan has no `steps`",
                "add `steps:` with at least one step, such as `- {vm: web-01, power: shutoff}`",
            );
            Vec::new()
        }
        Some(node) => plan_steps(&mut c, node, &settings, early, || {
            yaml::parse(path, yaml_text, None).map_err(|d| vec![d])
        })?,
    };
    let zone = settings.zone;
    let window = settings.window;

    match (name, grace) {
        (Some(name), Some(grace)) if c.diags.is_empty() => Ok(PlanFile {
            path: path.to_path_buf(),
            sha256: super::sha256_hex(text.as_bytes()),
            // `parse` moves the text in (a copy of a large plan is memory to fault in).
            source: String::new(),
            name,
            connection: settings.connection,
            timezone: zone,
            window,
            grace,
            on_failure,
            parallelism: config.parallelism,
            host_caps: config.host_caps.clone(),
            steps,
            notify,
        }),
        _ => Err(c.diags),
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn check_version(c: &mut Checker<'_>, map: &MarkedMappingNode) {
    let Some(node) = map.get_node("version") else {
        c.error(
            Pos::new(1, 1),
            "the plan has no `version`",
            "add `version: 1` as the first line",
        );
        return;
    };
    if let Some(v) = c.count(node, "`version`", 1) {
        if u64::from(v) != FORMAT_VERSION {
            c.error(
                pos(node),
                format!("plan format version {v} is not supported; this virtplan reads version {FORMAT_VERSION}"),
                if u64::from(v) > FORMAT_VERSION {
                    "upgrade virtplan, or write the plan for version 1"
                } else {
                    "write `version: 1`"
                },
            );
        }
    }
}

fn duration(c: &mut Checker<'_>, node: &Node, what: &str, example: &str) -> Option<Duration> {
    let text = c.text(node, what, example)?;
    parse_duration(text)
        .map_err(|e| c.error(pos(node), format!("{what}: {}", e.message), e.help))
        .ok()
}

fn connection(c: &mut Checker<'_>, node: &Node, config: &LoadContext) -> Option<Uri> {
    let text = c.text(node, "`connection`", "connection: qemu:///system")?;
    if let Some(uri) = config.resolve_connection(text) {
        return Some(uri);
    }
    let names: Vec<&str> = config.hosts.keys().map(String::as_str).collect();
    let help = match (did_you_mean(text, &names), names.is_empty()) {
        (Some(close), _) => format!("did you mean the host `{close}`?"),
        (None, true) => "write a libvirt URI such as qemu:///system, or name a host from the `[hosts]` table of virtplan.toml".to_owned(),
        (None, false) => format!("write a libvirt URI, or one of the hosts in virtplan.toml: {}", names.join(", ")),
    };
    c.error(
        pos(node),
        format!("connection `{text}` is neither a libvirt URI nor a host named in virtplan.toml"),
        help,
    );
    None
}

fn check_window(c: &mut Checker<'_>, node: &Node, zone: Option<Tz>) -> Option<Window> {
    let example = "window: {start: 2026-12-01 04:00, end: 2026-12-01 05:00}";
    let map = c.mapping(node, "`window`", example)?;
    let before = c.diags.len();
    c.known_keys(map, WINDOW_KEYS, "`window`");
    // A misspelt key (`ned: ...`) already says what is missing; don't report it twice.
    let has_unknown_keys = c.diags.len() > before;
    let mut bound = |key: &str| -> Option<(DateTime<Utc>, Pos)> {
        let Some(n) = map.get_node(key) else {
            if has_unknown_keys {
                return None;
            }
            c.error(
                pos(node),
                format!("`window` has no `{key}`"),
                format!("a window needs both ends: {example}"),
            );
            return None;
        };
        let text = c.text(n, &format!("`window.{key}`"), "2026-12-01 04:00")?;
        if text.trim_start().starts_with('+') {
            c.error(
                pos(n),
                format!("`window.{key}` must be an absolute time"),
                "relative `+DURATION` times count from window.start, so the window itself needs absolute times",
            );
            return None;
        }
        parse_instant(text, zone)
            .map_err(|e| c.error(pos(n), format!("`window.{key}`: {}", e.message), e.help))
            .ok()
            .map(|t| (t, pos(n)))
    };
    let start = bound("start");
    let end = bound("end");
    let ((start, _), (end, end_pos)) = (start?, end?);
    if end <= start {
        c.error(
            end_pos,
            "`window.end` must be after `window.start`",
            "swap the two times, or move the end later",
        );
        return None;
    }
    Some(Window { start, end })
}

fn check_defaults(
    c: &mut Checker<'_>,
    node: &Node,
    base: ShutdownPolicy,
) -> (ShutdownPolicy, OnFailure) {
    let fallback = (base, OnFailure::default());
    let Some(map) = c.mapping(node, "`defaults`", "defaults: {on_failure: abort}") else {
        return fallback;
    };
    c.known_keys(map, DEFAULTS_KEYS, "`defaults`");
    let shutdown = map
        .get_node("shutdown")
        .map_or(base, |n| check_shutdown(c, n, base));
    let on_failure = map
        .get_node("on_failure")
        .and_then(|n| {
            c.choice(
                n,
                "`on_failure`",
                &[("skip-vm", OnFailure::SkipVm), ("abort", OnFailure::Abort)],
                "`skip-vm` or `abort`",
                "`skip-vm` skips the failed domain's later steps; `abort` stops the whole plan",
            )
        })
        .unwrap_or_default();
    (shutdown, on_failure)
}

fn check_shutdown(c: &mut Checker<'_>, node: &Node, base: ShutdownPolicy) -> ShutdownPolicy {
    let Some(map) = c.mapping(
        node,
        "`shutdown`",
        "shutdown: {mode: graceful, timeout: 120s, force_after_timeout: true}",
    ) else {
        return base;
    };
    c.known_keys(map, SHUTDOWN_KEYS, "`shutdown`");
    let mut policy = base;
    if let Some(n) = map.get_node("mode") {
        if let Some(mode) = c.choice(
            n,
            "`shutdown.mode`",
            &[
                ("graceful", ShutdownMode::Graceful),
                ("force", ShutdownMode::Force),
            ],
            "`graceful` or `force`",
            "`graceful` asks the guest and waits; `force` pulls the plug at once",
        ) {
            policy.mode = mode;
        }
    }
    if let Some(n) = map.get_node("timeout") {
        if let Some(d) = duration(c, n, "`shutdown.timeout`", "timeout: 120s") {
            if d.is_zero() {
                c.error(
                    pos(n),
                    "`shutdown.timeout` must be longer than zero",
                    "give the guest time to shut down, such as 120s; use `mode: force` to skip waiting",
                );
            }
            policy.timeout = d;
        }
    }
    if let Some(n) = map.get_node("force_after_timeout") {
        if let Some(b) = c.boolean(n, "`shutdown.force_after_timeout`") {
            policy.force_after_timeout = b;
        }
    }
    policy
}

/// The settings steps inherit from the top of the plan (or virtplan.toml), and `on_failure`,
/// which is written with them under `defaults`.
fn settings(
    c: &mut Checker<'_>,
    map: &MarkedMappingNode,
    config: &LoadContext,
) -> (Settings, OnFailure) {
    let zone = match map.get_node("timezone") {
        // A zone that is written but wrong is reported once; checking the times in UTC (or the
        // config's zone) meanwhile spares every local time a misleading "no time zone is set".
        Some(node) => c
            .text(node, "`timezone`", "timezone: America/Toronto")
            .and_then(|t| {
                parse_zone(t)
                    .map_err(|e| c.error(pos(node), e.message, e.help))
                    .ok()
            })
            .or(Some(config.timezone.unwrap_or(Tz::UTC))),
        None => config.timezone,
    };
    let window = map
        .get_node("window")
        .and_then(|node| check_window(c, node, zone));
    let connection = map
        .get_node("connection")
        .and_then(|node| connection(c, node, config))
        .or_else(|| config.connection.clone());
    let (shutdown, on_failure) = match map.get_node("defaults") {
        Some(node) => check_defaults(c, node, config.shutdown),
        None => (config.shutdown, OnFailure::default()),
    };
    let settings = Settings {
        zone,
        window,
        window_written: map.get_node("window").is_some(),
        connection,
        shutdown,
    };
    (settings, on_failure)
}

/// Checks each step of the top-level `steps` list as the parser reaches it, against the
/// settings written above the list, and drops its nodes (see `tree`).
struct EarlySteps<'a> {
    /// The steps' own problems.
    checker: Checker<'a>,
    config: &'a LoadContext,
    /// What the entries above `steps` set, once the list starts.
    settings: Option<Settings>,
    steps: Vec<Step>,
    /// Items taken, checked or not.
    seen: usize,
}

impl yaml::StepListener for EarlySteps<'_> {
    fn steps_start(&mut self, before: &MarkedMappingNode) {
        // Their own problems are reported from the whole plan.
        let mut scratch = Checker::new(self.checker.file);
        self.settings = Some(settings(&mut scratch, before, self.config).0);
        self.checker.diags.clear();
        self.steps.clear();
        self.seen = 0;
    }

    fn step(&mut self, item: Node) {
        self.seen += 1;
        if let Some(settings) = &self.settings {
            self.steps.extend(check_step(
                &mut self.checker,
                &item,
                self.seen,
                settings,
                self.config,
            ));
        }
    }
}

/// The plan's steps: checked as the file was parsed when the plan's settings are the ones
/// written above `steps` (as plans are written), else checked here.
fn plan_steps(
    c: &mut Checker<'_>,
    node: &Node,
    settings: &Settings,
    early: EarlySteps<'_>,
    reread: impl FnOnce() -> Result<Node, Vec<Diagnostic>>,
) -> Result<Vec<Step>, Vec<Diagnostic>> {
    let mut steps = match &early.settings {
        // `steps` is not a list: the tree holds it whole, and says what it is.
        None => return Ok(check_steps(c, node, settings, early.config)),
        Some(heard) if heard == settings => {
            if early.seen == 0 {
                steps_empty(c, node);
            }
            c.diags.extend(early.checker.diags);
            early.steps
        }
        // A setting written below `steps` changes what the steps mean. Their nodes are gone
        // from the tree: they are checked again from a second reading of the file.
        Some(_) => {
            let whole = reread()?;
            let node = whole
                .as_mapping()
                .and_then(|map| map.get_node("steps"))
                .unwrap_or(node);
            return Ok(check_steps(c, node, settings, early.config));
        }
    };
    number_repeats(&mut steps);
    Ok(steps)
}

fn steps_empty(c: &mut Checker<'_>, node: &Node) {
    c.error(
        pos(node),
        "`steps` is empty",
        "add at least one step, such as `- {vm: web-01, power: shutoff}`",
    );
}

fn check_steps(
    c: &mut Checker<'_>,
    node: &Node,
    settings: &Settings,
    config: &LoadContext,
) -> Vec<Step> {
    let Some(seq) = c.sequence(node, "`steps`", "steps: [{vm: web-01, power: shutoff}]") else {
        return Vec::new();
    };
    if seq.is_empty() {
        steps_empty(c, node);
    }
    // Sized up front: steps are large, and growing the vector by doubling copied them over.
    let mut steps: Vec<Step> = Vec::with_capacity(seq.len());
    steps.extend(
        seq.iter()
            .enumerate()
            .filter_map(|(i, n)| check_step(c, n, i + 1, settings, config)),
    );
    number_repeats(&mut steps);
    steps
}

/// Identical steps (a toggle back, `true → false → true`) would share an id and one lockfile
/// record: numbers the repeats, so the first keeps the id it always had. Only steps due at the
/// same time on the same first domain and connection can be identical, so only those are
/// hashed here; every other step's id is hashed when first asked for (`plan` does it while
/// libvirt answers its bulk read).
fn number_repeats(steps: &mut [Step]) {
    type Alike<'s> = (Option<DateTime<Utc>>, Option<&'s str>, Option<&'s str>);
    let mut alike: HashMap<Alike<'_>, Vec<usize>> = HashMap::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let key = (
            step.at.as_ref().map(|a| a.value),
            step.targets.first().map(|t| t.name_or_uuid.as_str()),
            step.connection.as_ref().map(Uri::expose),
        );
        alike.entry(key).or_default().push(i);
    }
    // (step, its occurrence, the id of a first occurrence), hashed without the number: a
    // repeat's id changes with it.
    let mut numbered: Vec<(usize, usize, Option<String>)> = Vec::new();
    for group in alike.values().filter(|g| g.len() > 1) {
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(group.len());
        for &i in group {
            let id = super::step_id::StepIdentity::of(&steps[i]).id();
            let count = seen.entry(id.clone()).or_default();
            *count += 1;
            numbered.push((i, *count, (*count == 1).then_some(id)));
        }
    }
    for step in steps.iter_mut() {
        step.repeat = 1;
    }
    for (i, repeat, id) in numbered {
        steps[i].repeat = repeat;
        if let Some(id) = id {
            steps[i].id = id.into();
        }
    }
}

fn check_step(
    c: &mut Checker<'_>,
    node: &Node,
    number: usize,
    settings: &Settings,
    config: &LoadContext,
) -> Option<Step> {
    let what = format!("step {number}");
    let map = c.mapping(
        node,
        &what,
        "- {at: 2026-12-01 04:00, vm: web-01, power: shutoff}",
    )?;
    let errors_before = c.diags.len();
    let keys = StepNodes::read(c, map, &what);
    let has_unknown_keys = c.diags.len() > errors_before;

    let at = keys.at.and_then(|n| {
        let text = c.text(n, "`at`", "at: 2026-12-01 04:00")?;
        if settings.window.is_none() && settings.window_written && text.trim().starts_with('+') {
            // The window's own error explains it; "needs a window" on every step would mislead.
            return None;
        }
        let t = parse_at(text, settings.zone, settings.window.map(|w| w.start))
            .map_err(|e| c.error(pos(n), format!("`at`: {}", e.message), e.help))
            .ok()?;
        if let Some(w) = settings.window {
            if t < w.start || t >= w.end {
                // A step due exactly at the window's end looks "inside" to a reader; say why not.
                let why = if t < w.start {
                    "it is before the start"
                } else if t == w.end {
                    "a step must start before the window ends, not at its end"
                } else {
                    "it is after the end"
                };
                c.error(
                    pos(n),
                    format!(
                        "{what} at {} is outside the window {} to {}: {why}",
                        show_time(t, settings.zone),
                        show_time(w.start, settings.zone),
                        show_time(w.end, settings.zone)
                    ),
                    "move the step into the window, or widen the window",
                );
                return None;
            }
        }
        Some(Located {
            value: t,
            pos: pos(n),
        })
    });

    let targets = check_targets(c, keys.vm, keys.vms, node, &what);
    let connection = keys
        .connection
        .and_then(|n| connection(c, n, config))
        .or_else(|| settings.connection.clone());
    let shutdown = keys.shutdown.map_or(settings.shutdown, |n| {
        check_shutdown(c, n, settings.shutdown)
    });
    let attributes = check_attributes(c, &keys.attributes);
    let check = keys
        .check
        .and_then(|n| check_gate(c, n).map(|v| located(n, v)));
    let always = keys
        .always
        .and_then(|n| c.boolean(n, "`always`"))
        .unwrap_or(false);
    let rollout = keys.rollout.and_then(|n| {
        let spec = rollout(c, n)?;
        if keys.vm.is_some() {
            c.error(
                pos(n),
                format!("{what} has `rollout` but names one domain (`vm`)"),
                "a rollout paces a step over several domains: select them with `vms: [A, B]` or `vms: {match: \"web-*\"}`, or remove `rollout`",
            );
            return None;
        }
        Some(located(n, spec))
    });

    if !has_unknown_keys && keys.attributes.iter().all(Option::is_none) {
        c.error(
            pos(node),
            format!("{what} changes nothing"),
            format!("give it at least one of: {}", ATTRIBUTE_KEYS.join(", ")),
        );
    }
    (c.diags.len() == errors_before).then(|| Step {
        number,
        pos: pos(node),
        at,
        targets,
        connection,
        shutdown,
        attributes,
        check,
        always,
        rollout,
        repeat: 1,
        id: std::sync::OnceLock::new(),
    })
}

/// A step's mapping read in one pass: the value of each key a step allows (in the order of
/// [`STEP_KEYS`]), unknown keys reported as they are met. Two dozen look-ups by key, each
/// hashing the key, cost a step more than this pass.
struct StepNodes<'n> {
    at: Option<&'n Node>,
    vm: Option<&'n Node>,
    vms: Option<&'n Node>,
    connection: Option<&'n Node>,
    shutdown: Option<&'n Node>,
    /// By [`Attr::KEYS`] (the order of [`ATTRIBUTE_KEYS`]).
    attributes: [Option<&'n Node>; ATTRIBUTE_KEYS.len()],
    check: Option<&'n Node>,
    always: Option<&'n Node>,
    rollout: Option<&'n Node>,
}

impl<'n> StepNodes<'n> {
    fn read(c: &mut Checker<'_>, map: &'n MarkedMappingNode, what: &str) -> Self {
        let mut nodes = Self {
            at: None,
            vm: None,
            vms: None,
            connection: None,
            shutdown: None,
            attributes: [None; ATTRIBUTE_KEYS.len()],
            check: None,
            always: None,
            rollout: None,
        };
        for (key, value) in map.iter() {
            let slot = match key.as_str() {
                "at" => &mut nodes.at,
                "vm" => &mut nodes.vm,
                "vms" => &mut nodes.vms,
                "connection" => &mut nodes.connection,
                "shutdown" => &mut nodes.shutdown,
                "check" => &mut nodes.check,
                "always" => &mut nodes.always,
                "rollout" => &mut nodes.rollout,
                other => {
                    let Some(i) = ATTRIBUTE_KEYS.iter().position(|k| *k == other) else {
                        c.unknown_key(key, &STEP_KEYS, what);
                        continue;
                    };
                    &mut nodes.attributes[i]
                }
            };
            *slot = Some(value);
        }
        nodes
    }
}

/// `rollout: {max_parallel, max_errors, pause}`.
fn rollout(c: &mut Checker<'_>, node: &Node) -> Option<RolloutSpec> {
    let example = "rollout: {max_parallel: 2, max_errors: 0, pause: 30s}";
    let map = c.mapping(node, "`rollout`", example)?;
    let before = c.diags.len();
    c.known_keys(map, ROLLOUT_KEYS, "`rollout`");
    let mut spec = RolloutSpec {
        max_parallel: None,
        max_errors: Share::Count(0),
        pause: Duration::ZERO,
    };
    if let Some(n) = map.get_node("max_parallel") {
        spec.max_parallel = share(c, n, "max_parallel", 1);
    }
    if let Some(n) = map.get_node("max_errors") {
        if let Some(s) = share(c, n, "max_errors", 0) {
            spec.max_errors = s;
        }
    }
    if let Some(n) = map.get_node("pause") {
        if let Some(d) = duration(c, n, "`rollout.pause`", "pause: 30s") {
            spec.pause = d;
        }
    }
    (c.diags.len() == before).then_some(spec)
}

/// A rollout limit: a whole number at least `min`, or a percentage `"N%"` from `min` (above 0
/// for `max_parallel`) to 100.
fn share(c: &mut Checker<'_>, node: &Node, key: &str, min: u8) -> Option<Share> {
    let what = format!("`rollout.{key}`");
    let help = if min == 0 {
        format!("write a count of failed domains the rollout tolerates, such as `{key}: 1`, or a share of them, such as `{key}: \"10%\"`")
    } else {
        format!("write how many domains may run at once, such as `{key}: 2`, or a share of them, such as `{key}: \"25%\"`")
    };
    let text = node
        .as_scalar()
        .filter(|_| !yaml::is_null(node))
        .map(|s| s.as_str().trim());
    let Some(text) = text else {
        c.error(
            pos(node),
            format!(
                "{what} must be a whole number or a percentage, found {}",
                yaml::describe(node)
            ),
            help,
        );
        return None;
    };
    if let Some(number) = text.strip_suffix('%') {
        return match number.trim().parse::<u32>() {
            Ok(p) if p > 100 => {
                c.error(
                    pos(node),
                    format!("{what} `{text}` is above 100%"),
                    "a percentage of the step's domains is at most `100%`",
                );
                None
            }
            Ok(p) if p < u32::from(min) => {
                c.error(
                    pos(node),
                    format!("{what} `{text}` lets no domain start"),
                    help,
                );
                None
            }
            Ok(p) => Some(Share::Percent(u8::try_from(p).unwrap_or(100))),
            Err(_) => {
                c.error(
                    pos(node),
                    format!("{what} `{text}` is not a percentage"),
                    help,
                );
                None
            }
        };
    }
    match text.parse::<i64>() {
        Ok(n) if n < 0 => {
            c.error(
                pos(node),
                format!("{what} cannot be negative, found `{text}`"),
                help,
            );
            None
        }
        Ok(n) if n < i64::from(min) => {
            c.error(
                pos(node),
                format!("{what} `{text}` lets no domain start"),
                help,
            );
            None
        }
        Ok(n) => {
            let count = u32::try_from(n).ok().map(Share::Count);
            if count.is_none() {
                c.error(pos(node), format!("{what} `{text}` is too large"), help);
            }
            count
        }
        Err(_) => {
            c.error(
                pos(node),
                format!("{what} must be a whole number or a percentage, found `{text}`"),
                help,
            );
            None
        }
    }
}

/// `vms: {match: GLOB}`: one pattern, checked by the glob crate so a broken one (`web-[`) is
/// refused here with its position, not at plan time.
fn check_match(c: &mut Checker<'_>, node: &Node) -> Option<Target> {
    let map = c.mapping(node, "`vms`", "vms: {match: \"web-*\"}")?;
    c.known_keys(map, MATCH_KEYS, "`vms`");
    let Some(pattern_node) = map.get_node("match") else {
        c.error(
            pos(node),
            "`vms` as a mapping needs `match`",
            "select domains by name pattern: `vms: {match: \"web-*\"}`, or list them: `vms: [web-01, web-02]`",
        );
        return None;
    };
    let text = c.text(pattern_node, "`vms.match`", "\"web-*\"")?.trim();
    if text.is_empty() {
        c.error(
            pos(pattern_node),
            "`vms.match` is empty",
            "give a glob over domain names, such as \"web-*\"",
        );
        return None;
    }
    if let Err(e) = glob::Pattern::new(text) {
        c.error(
            pos(pattern_node),
            format!("`vms.match` is not a valid pattern: {}", e.msg),
            "`*` matches any run of characters, `?` one, `[abc]` one of a set, `[!abc]` one outside it; write `[[]` for a literal `[`",
        );
        return None;
    }
    Some(Target {
        name_or_uuid: text.to_owned(),
        pos: pos(pattern_node),
        kind: TargetKind::Match,
    })
}

/// A step's `vm` or `vms` (`node` is the step).
fn check_targets(
    c: &mut Checker<'_>,
    vm: Option<&Node>,
    vms: Option<&Node>,
    node: &Node,
    what: &str,
) -> Vec<Target> {
    let mut targets = Vec::new();
    match (vm, vms) {
        (Some(_), Some(vms)) => c.error(
            pos(vms),
            format!("{what} has both `vm` and `vms`"),
            "use `vm: NAME` for one domain or `vms: [A, B]` for several, not both",
        ),
        (None, None) => c.error(
            pos(node),
            format!("{what} names no domain"),
            "add `vm: NAME` (a domain name or UUID) or `vms: [A, B]`",
        ),
        (Some(vm), None) => {
            if let Some(name) = c.text(vm, "`vm`", "vm: web-01") {
                // Room for exactly one: a vector's first push makes room for four.
                targets = vec![Target {
                    name_or_uuid: name.trim().to_owned(),
                    pos: pos(vm),
                    kind: TargetKind::Domain,
                }];
            }
        }
        (None, Some(vms)) if vms.as_mapping().is_some() => {
            targets.extend(check_match(c, vms));
        }
        (None, Some(vms)) => {
            if let Some(seq) = c.sequence(vms, "`vms`", "vms: [web-01, web-02]") {
                if seq.is_empty() {
                    c.error(
                        pos(vms),
                        "`vms` is empty",
                        "list at least one domain: `vms: [web-01, web-02]`",
                    );
                }
                for item in seq.iter() {
                    let Some(name) = c.text(item, "an entry of `vms`", "web-01") else {
                        continue;
                    };
                    let name = name.trim();
                    if targets.iter().any(|t: &Target| t.name_or_uuid == name) {
                        c.error(
                            pos(item),
                            format!("`{name}` is listed twice in `vms`"),
                            "remove the repeated entry; a step changes each domain once",
                        );
                        continue;
                    }
                    targets.push(Target {
                        name_or_uuid: name.to_owned(),
                        pos: pos(item),
                        kind: TargetKind::Domain,
                    });
                }
            }
        }
    }
    targets
}

/// The attributes of a step, from their values by [`Attr::KEYS`].
fn check_attributes(
    c: &mut Checker<'_>,
    nodes: &[Option<&Node>; ATTRIBUTE_KEYS.len()],
) -> Attributes {
    let mut a = Attributes::default();
    for (attr, node) in Attr::KEYS.into_iter().zip(nodes) {
        let Some(n) = *node else {
            continue;
        };
        let key = attr.key();
        match attr {
            Attr::Power => a.power = power(c, n).map(|v| located(n, v)),
            Attr::Memory => {
                a.memory = size(c, n, "`memory`", "memory: 3GiB").map(|v| located(n, v));
            }
            Attr::MaxMemory => {
                a.max_memory =
                    size(c, n, "`max_memory`", "max_memory: 3GiB").map(|v| located(n, v));
            }
            Attr::Vcpus => a.vcpus = c.count(n, "`vcpus`", 1).map(|v| located(n, v)),
            Attr::MaxVcpus => a.max_vcpus = c.count(n, "`max_vcpus`", 1).map(|v| located(n, v)),
            Attr::Clock => a.clock = clock(c, n).map(|v| located(n, v)),
            Attr::Autostart => a.autostart = c.boolean(n, "`autostart`").map(|v| located(n, v)),
            Attr::Title => {
                a.title = c.any_text(n, "`title`", "title: web server").and_then(|t| {
                    if t.contains('\n') {
                        c.error(
                            pos(n),
                            "`title` must be a single line",
                            "libvirt titles are one line; put longer text in `description`",
                        );
                        return None;
                    }
                    Some(located(n, t.to_owned()))
                });
            }
            Attr::Description => {
                a.description = c
                    .any_text(n, "`description`", "description: serves the shop")
                    .map(|t| located(n, t.to_owned()));
            }
            Attr::Snapshot => a.snapshot = snapshot(c, n).map(|v| located(n, v)),
            Attr::OnPoweroff => a.on_poweroff = lifecycle(c, n, key).map(|v| located(n, v)),
            Attr::OnReboot => a.on_reboot = lifecycle(c, n, key).map(|v| located(n, v)),
            // Not a key: `clock: {sync: true}` asks for it.
            Attr::GuestTime => {}
        }
    }
    check_limits(c, &a);
    a
}

/// A step that sets both a value and its maximum must keep the value within the maximum.
fn check_limits(c: &mut Checker<'_>, a: &Attributes) {
    if let (Some(mem), Some(max)) = (&a.memory, &a.max_memory) {
        if mem.value > max.value {
            c.error(
                mem.pos,
                format!(
                    "`memory` {} is above `max_memory` {} in the same step",
                    mem.value, max.value
                ),
                "raise `max_memory` or lower `memory`",
            );
        }
    }
    if let (Some(n), Some(max)) = (&a.vcpus, &a.max_vcpus) {
        if n.value > max.value {
            c.error(
                n.pos,
                format!(
                    "`vcpus` {} is above `max_vcpus` {} in the same step",
                    n.value, max.value
                ),
                "raise `max_vcpus` or lower `vcpus`",
            );
        }
    }
}

fn located<T>(node: &Node, value: T) -> Located<T> {
    Located {
        value,
        pos: pos(node),
    }
}

fn power(c: &mut Checker<'_>, node: &Node) -> Option<PowerTarget> {
    c.choice(
        node,
        "`power`",
        &[
            ("running", PowerTarget::Running),
            ("shutoff", PowerTarget::Shutoff),
            ("paused", PowerTarget::Paused),
            ("reboot", PowerTarget::Reboot),
            ("on", PowerTarget::Running),
            ("poweredOn", PowerTarget::Running),
            ("off", PowerTarget::Shutoff),
            ("poweredOff", PowerTarget::Shutoff),
            ("suspended", PowerTarget::Paused),
        ],
        "`running`, `shutoff`, `paused` or `reboot`",
        "use `running` (alias `on`), `shutoff` (alias `off`), `paused` (alias `suspended`) or `reboot`",
    )
}

fn lifecycle(c: &mut Checker<'_>, node: &Node, key: &str) -> Option<LifecycleAction> {
    let choices: Vec<(&str, LifecycleAction)> = LifecycleAction::ALL
        .into_iter()
        .map(|a| (a.as_str(), a))
        .collect();
    c.choice(
        node,
        &format!("`{key}`"),
        &choices,
        "`destroy`, `restart`, `rename-restart` or `preserve`",
        &format!("use `{key}: destroy` (the domain stops) or `{key}: restart` (it starts again)"),
    )
}

/// A memory size; `what` is the key as messages show it (`` `memory` ``), `example` a value
/// for it (spelled out by the callers: formatting them for each step cost more than parsing).
fn size(c: &mut Checker<'_>, node: &Node, what: &str, example: &str) -> Option<crate::state::Kib> {
    let text = c.text(node, what, example)?;
    parse_size(text)
        .map_err(|e| c.error(pos(node), format!("{what}: {}", e.message), e.help))
        .ok()
}

fn clock(c: &mut Checker<'_>, node: &Node) -> Option<ClockTarget> {
    let map = c.mapping(node, "`clock`", "clock: {offset: utc, track: guest}")?;
    let before = c.diags.len();
    c.known_keys(map, CLOCK_KEYS, "`clock`");
    let has_unknown_keys = c.diags.len() > before;
    let mut target = ClockTarget {
        offset: None,
        track: None,
        sync: false,
    };
    if let Some(n) = map.get_node("offset") {
        target.offset = c.choice(
            n,
            "`clock.offset`",
            &[
                ("utc", ClockOffset::Utc),
                ("localtime", ClockOffset::Localtime),
            ],
            "`utc` or `localtime`",
            "Linux guests want `utc`; Windows guests usually want `localtime`",
        );
    }
    if let Some(n) = map.get_node("track") {
        if n.as_scalar().is_some_and(|s| s.as_str() == "host") {
            c.error(
                pos(n),
                "`clock.track: host` is not a libvirt value",
                "libvirt calls a clock that follows the host `wall`: write `track: wall` (`host` is ZStack's spelling)",
            );
            return None;
        }
        target.track = c.choice(
            n,
            "`clock.track`",
            &[
                ("boot", RtcTrack::Boot),
                ("guest", RtcTrack::Guest),
                ("wall", RtcTrack::Wall),
                ("realtime", RtcTrack::Realtime),
            ],
            "`boot`, `guest`, `wall` or `realtime`",
            "the RTC timer tracks `boot`, `guest`, `wall` or `realtime` time",
        );
    }
    if let Some(n) = map.get_node("sync") {
        target.sync = c.boolean(n, "`clock.sync`").unwrap_or(false);
    }
    // A misspelt key already explains why nothing is set.
    if !has_unknown_keys && !target.edits_xml() && !target.sync && c.diags.len() == before {
        c.error(
            pos(node),
            "`clock` sets nothing",
            "give `offset: utc|localtime`, `track: boot|guest|wall|realtime`, `sync: true`, or several",
        );
    }
    (c.diags.len() == before).then_some(target)
}

/// `check: {state, guest_agent, command, timeout, interval}`.
fn check_gate(c: &mut Checker<'_>, node: &Node) -> Option<CheckSpec> {
    let example = "check: {state: running, guest_agent: true, timeout: 5m, interval: 5s}";
    let map = c.mapping(node, "`check`", example)?;
    let before = c.diags.len();
    c.known_keys(map, CHECK_KEYS, "`check`");
    let has_unknown_keys = c.diags.len() > before;
    let mut spec = CheckSpec {
        state: None,
        guest_agent: false,
        command: None,
        timeout: CheckSpec::DEFAULT_TIMEOUT,
        interval: CheckSpec::DEFAULT_INTERVAL,
    };
    if let Some(n) = map.get_node("state") {
        spec.state = c.choice(
            n,
            "`check.state`",
            &[
                ("running", PowerTarget::Running),
                ("shutoff", PowerTarget::Shutoff),
                ("paused", PowerTarget::Paused),
                ("on", PowerTarget::Running),
                ("off", PowerTarget::Shutoff),
                ("suspended", PowerTarget::Paused),
            ],
            "`running`, `shutoff` or `paused`",
            "a check waits for a libvirt state: `running`, `shutoff` or `paused` (a reboot is an action, not a state)",
        );
    }
    if let Some(n) = map.get_node("guest_agent") {
        spec.guest_agent = c.boolean(n, "`check.guest_agent`").unwrap_or(false);
    }
    if let Some(n) = map.get_node("command") {
        spec.command = c
            .text(
                n,
                "`check.command`",
                "command: curl -fsS http://$VIRTPLAN_VM/health",
            )
            .map(str::to_owned);
    }
    let positive = |c: &mut Checker<'_>, key: &str, example: &str| -> Option<(Duration, Pos)> {
        let n = map.get_node(key)?;
        let d = duration(c, n, &format!("`check.{key}`"), example)?;
        if d.is_zero() {
            c.error(
                pos(n),
                format!("`check.{key}` must be longer than zero"),
                format!("for example `{example}`"),
            );
            return None;
        }
        Some((d, pos(n)))
    };
    if let Some((d, _)) = positive(c, "timeout", "timeout: 5m") {
        spec.timeout = d;
    }
    if let Some((d, at)) = positive(c, "interval", "interval: 5s") {
        spec.interval = d;
        if d > spec.timeout {
            c.error(
                at,
                format!(
                    "`check.interval` {} is longer than `check.timeout` {}: the check would be tried once",
                    units::format_duration(d),
                    units::format_duration(spec.timeout)
                ),
                "poll more often than the timeout, such as `interval: 5s`",
            );
        }
    }
    if !has_unknown_keys
        && c.diags.len() == before
        && spec.state.is_none()
        && !spec.guest_agent
        && spec.command.is_none()
    {
        c.error(
            pos(node),
            "`check` waits for nothing",
            "give at least one of `state: running`, `guest_agent: true`, `command: ...`",
        );
    }
    (c.diags.len() == before).then_some(spec)
}

fn snapshot(c: &mut Checker<'_>, node: &Node) -> Option<SnapshotSpec> {
    let example = "snapshot: {name: before-upgrade}";
    let map = c.mapping(node, "`snapshot`", example)?;
    let before = c.diags.len();
    c.known_keys(map, SNAPSHOT_KEYS, "`snapshot`");
    let Some(name_node) = map.get_node("name") else {
        // A misspelt `name` key already explains it.
        if c.diags.len() > before {
            return None;
        }
        c.error(
            pos(node),
            "`snapshot` has no `name`",
            format!("for example `{example}`"),
        );
        return None;
    };
    let name = c
        .text(name_node, "`snapshot.name`", "before-upgrade")?
        .trim();
    if name.contains('/') || name.starts_with('.') || name.chars().any(char::is_control) {
        c.error(
            pos(name_node),
            format!(
                "snapshot name `{name}` cannot contain `/` or control characters or start with `.`"
            ),
            "use letters, digits, `-`, `_` and `.`, such as `before-upgrade`",
        );
        return None;
    }
    let description = match map.get_node("description") {
        Some(n) => Some(
            c.any_text(n, "`snapshot.description`", "taken before the upgrade")?
                .to_owned(),
        ),
        None => None,
    };
    Some(SnapshotSpec {
        name: name.to_owned(),
        description,
    })
}
