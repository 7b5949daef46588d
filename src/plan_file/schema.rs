//! The plan file's JSON Schema, generated from these types with `schemars`.
//!
//! These types mirror the YAML exactly and exist for the schema (editor completion through the
//! `yaml-language-server` modeline, and `virtplan schema`). Validation itself walks the
//! positioned YAML tree so that it can report every problem with its line and column; a test
//! keeps the key lists of both in step.

#![allow(dead_code)] // fields are read by the schema generator only

use schemars::JsonSchema;

const SIZE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?\s*(B|KiB|MiB|GiB|TiB)$";
const DURATION_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?\s*[a-z]+(\s*[0-9]+(\.[0-9]+)?\s*[a-z]+)*$";
use super::time::{AT_PATTERN, INSTANT_PATTERN};

/// The schema's `$id`: the checked-in `schemas/plan.schema.json` in the package's repository
/// (Cargo.toml `repository`), so an editor can use it without a local copy
/// (`# yaml-language-server: $schema=<this URL>`; README "Editor support").
pub const SCHEMA_ID: &str = concat!(
    env!("CARGO_PKG_REPOSITORY"),
    "/raw/main/schemas/plan.schema.json"
);

/// A virtplan plan file (format version 1): timed steps that change libvirt domains.
#[derive(JsonSchema)]
#[schemars(title = "virtplan plan", deny_unknown_fields)]
pub struct PlanSchema {
    /// Plan format version. Always 1.
    #[schemars(range(min = 1, max = 1))]
    version: u32,
    /// Plan name; defaults to the file's stem.
    name: Option<String>,
    /// Default libvirt URI (or a host named in virtplan.toml `[hosts]`) for every step.
    connection: Option<String>,
    /// IANA time zone for times written without an offset, such as America/Toronto.
    timezone: Option<String>,
    window: Option<WindowSchema>,
    /// How late a step may still start (default 5m).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    grace: Option<String>,
    defaults: Option<DefaultsSchema>,
    /// The steps, each applied at its time.
    #[schemars(length(min = 1))]
    steps: Vec<StepSchema>,
    /// Where events are sent (replaces virtplan.toml's `[[notify]]`; `[]` turns them off).
    notify: Option<Vec<NotifySchema>>,
}

/// One notification target: exactly one of `webhook`, `email`, `command`.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct NotifySchema {
    /// Events sent to this target (default: every event).
    #[schemars(length(min = 1))]
    on: Option<Vec<crate::notify::EventKind>>,
    /// http(s) URL the event JSON is POSTed to. A secret: never printed.
    #[schemars(regex(pattern = r"^[Hh][Tt][Tt][Pp][Ss]?://\S+$"))]
    webhook: Option<String>,
    /// `json` (default) posts the event; `slack` posts {"text": "..."} for chat webhooks.
    #[schemars(extend("enum" = ["json", "slack"]))]
    format: Option<String>,
    email: Option<EmailSchema>,
    /// Program and arguments (no shell); the event JSON arrives on stdin.
    #[schemars(length(min = 1))]
    command: Option<Vec<String>>,
    /// How long one delivery attempt may take (default 10s webhook, 30s email and command).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    timeout: Option<String>,
}

/// One mail per event over SMTP. Credentials never come from the plan text.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct EmailSchema {
    #[schemars(length(min = 1))]
    to: Vec<String>,
    from: String,
    /// `smtp://HOST[:PORT]` (STARTTLS when offered), `smtp://HOST[:PORT]?tls=required`, or
    /// `smtps://HOST[:PORT]`; default smtp://localhost:25. No credentials in the URL.
    #[schemars(regex(pattern = r"^smtps?://[^@]+$"))]
    smtp: Option<String>,
    /// SMTP login name; needs `password_env` or `password_file`.
    username: Option<String>,
    /// Name of the environment variable holding the SMTP password.
    password_env: Option<String>,
    /// File holding the SMTP password.
    password_file: Option<String>,
}

/// The maintenance window; every step must lie inside it.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct WindowSchema {
    /// `YYYY-MM-DD HH:MM[:SS]` in the plan's zone, or RFC 3339 with an offset.
    #[schemars(regex(pattern = INSTANT_PATTERN))]
    start: String,
    /// `YYYY-MM-DD HH:MM[:SS]` in the plan's zone, or RFC 3339 with an offset.
    #[schemars(regex(pattern = INSTANT_PATTERN))]
    end: String,
}

/// Defaults for every step.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct DefaultsSchema {
    shutdown: Option<ShutdownSchema>,
    /// `skip-vm` skips the failed domain's later steps (default); `abort` stops the plan.
    #[schemars(extend("enum" = ["skip-vm", "abort"]))]
    on_failure: Option<String>,
}

/// How a domain is powered off.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct ShutdownSchema {
    /// `graceful` asks the guest (ACPI) and waits; `force` destroys at once.
    #[schemars(extend("enum" = ["graceful", "force"]))]
    mode: Option<String>,
    /// How long a graceful shutdown may take (default 120s).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    timeout: Option<String>,
    /// Destroy the domain when the guest ignores the shutdown request (default true).
    force_after_timeout: Option<bool>,
}

/// One step: when, which domains, and the desired state.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct StepSchema {
    /// `YYYY-MM-DD HH:MM[:SS]`, RFC 3339 with an offset, or `+DURATION` from window.start.
    /// Without `at` the step runs as soon as `apply` starts.
    #[schemars(regex(pattern = AT_PATTERN))]
    at: Option<String>,
    /// One domain, by name or UUID.
    vm: Option<String>,
    /// Several domains: a list of names or UUIDs, or `{match: GLOB}` over the domain names of
    /// the step's connection, resolved when the plan is made.
    vms: Option<VmsSchema>,
    /// libvirt URI or virtplan.toml host for this step.
    connection: Option<String>,
    shutdown: Option<ShutdownSchema>,
    /// Desired power state (aliases: on, poweredOn, off, poweredOff, suspended), or `reboot`:
    /// the shutdown ladder then start, an action recorded done and never repeated.
    #[schemars(extend("enum" = ["running", "shutoff", "paused", "reboot", "on", "off", "poweredOn", "poweredOff", "suspended"]))]
    power: Option<String>,
    /// Current memory, such as 3GiB (binary units).
    #[schemars(regex(pattern = SIZE_PATTERN))]
    memory: Option<String>,
    /// Maximum memory, such as 4GiB; needs the domain off.
    #[schemars(regex(pattern = SIZE_PATTERN))]
    max_memory: Option<String>,
    /// Virtual CPUs.
    #[schemars(range(min = 1, max = 4_294_967_295_u32))]
    vcpus: Option<u32>,
    /// Maximum virtual CPUs; needs the domain off.
    #[schemars(range(min = 1, max = 4_294_967_295_u32))]
    max_vcpus: Option<u32>,
    clock: Option<ClockSchema>,
    /// Start the domain when the host boots.
    autostart: Option<bool>,
    /// One-line title (libvirt metadata).
    #[schemars(regex(pattern = r"^[^\n]*$"))]
    title: Option<String>,
    /// Description (libvirt metadata).
    description: Option<String>,
    snapshot: Option<SnapshotSchema>,
    /// What libvirt does when the guest powers off (persistent definition; next start).
    #[schemars(extend("enum" = ["destroy", "restart", "rename-restart", "preserve"]))]
    on_poweroff: Option<String>,
    /// What libvirt does when the guest reboots (persistent definition; next start).
    #[schemars(extend("enum" = ["destroy", "restart", "rename-restart", "preserve"]))]
    on_reboot: Option<String>,
    check: Option<CheckSchema>,
    /// Run this step even after an earlier step of its domain failed, was skipped or missed,
    /// or the plan was aborted (at its own time and grace), so the window restores service.
    always: Option<bool>,
    rollout: Option<RolloutSchema>,
}

/// How a step with several domains goes through them: in the reviewed order, at most
/// `max_parallel` at once (a domain's share includes its check), `pause` before a freed slot
/// is reused; once more than `max_errors` domains failed, the rest are skipped and
/// `on_failure` applies.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct RolloutSchema {
    /// At least 1 (or `"1%"`..`"100%"`; a percentage of the domains, rounded down, at least 1).
    max_parallel: Option<ShareSchema>,
    /// Failed domains tolerated (default 0; a percentage is rounded down).
    max_errors: Option<ShareSchema>,
    /// How long a freed slot stays empty before the next domain starts (default 0s).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pause: Option<String>,
}

/// A count, or a percentage of the step's domains such as `"25%"`.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its schema is used
enum ShareSchema {
    Count(#[schemars(range(min = 0))] u32),
    Percent(#[schemars(regex(pattern = r"^[0-9]{1,3}%$"))] String),
}

/// The domain clock; offset and track take effect at the next boot.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct ClockSchema {
    #[schemars(extend("enum" = ["utc", "localtime"]))]
    offset: Option<String>,
    /// What the RTC timer tracks (ZStack's `host` is libvirt's `wall`).
    #[schemars(extend("enum" = ["boot", "guest", "wall", "realtime"]))]
    track: Option<String>,
    /// Set the guest's time from the host through the guest agent once the step's changes are
    /// made (the domain must run and have an agent channel).
    sync: Option<bool>,
}

/// A gate after the step's changes: the step is done only when every given condition holds
/// within `timeout`; a timed-out check fails the step.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct CheckSchema {
    /// The libvirt state the domain must reach.
    #[schemars(extend("enum" = ["running", "shutoff", "paused", "on", "off", "suspended"]))]
    state: Option<String>,
    /// The guest agent must answer a ping.
    guest_agent: Option<bool>,
    /// Run with `sh -c` (env VIRTPLAN_VM, VIRTPLAN_UUID, VIRTPLAN_CONNECTION, VIRTPLAN_STEP,
    /// VIRTPLAN_PLAN); exit 0 passes.
    #[schemars(length(min = 1))]
    command: Option<String>,
    /// How long to wait for the check to pass (default 5m).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    timeout: Option<String>,
    /// How often to try (default 5s).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    interval: Option<String>,
}

/// `vms`: a list, or a pattern.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its schema is used
enum VmsSchema {
    /// Domain names or UUIDs.
    List(#[schemars(length(min = 1), extend("uniqueItems" = true))] Vec<String>),
    Match(MatchSchema),
}

/// `{match: GLOB}`: `*`, `?`, `[abc]`, `[!abc]` over domain names; zero matches is an error.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct MatchSchema {
    #[serde(rename = "match")]
    #[schemars(length(min = 1))]
    pattern: String,
}

/// A snapshot, idempotent by name.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct SnapshotSchema {
    /// Letters, digits, `-`, `_` and `.`; no `/` or control characters, not starting with `.`.
    #[schemars(regex(pattern = r"^[^./\x00-\x1f\x7f-\x9f][^/\x00-\x1f\x7f-\x9f]*$"))]
    name: String,
    description: Option<String>,
}

/// The plan file's JSON Schema, pretty-printed with a trailing newline.
#[must_use]
pub fn plan_schema_json() -> String {
    let mut schema = schemars::schema_for!(PlanSchema).to_value();
    strip_null(&mut schema);
    if let serde_json::Value::Object(top) = &mut schema {
        top.insert("$id".to_owned(), SCHEMA_ID.into());
    }
    // The zones `timezone` accepts are the ones the validator parses (`Tz::from_str`, case
    // and all): an editor completes them and flags a misspelt one.
    if let Some(zone) = schema.pointer_mut("/properties/timezone") {
        zone["enum"] = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect();
    }
    // A relative `at` counts from `window.start`: a plan with one needs a window.
    if let serde_json::Value::Object(top) = &mut schema {
        top.insert(
            "if".to_owned(),
            serde_json::json!({
                "properties": { "steps": { "contains": {
                    "required": ["at"],
                    "properties": { "at": { "pattern": "^\\+" } }
                } } },
                "required": ["steps"]
            }),
        );
        top.insert(
            "then".to_owned(),
            serde_json::json!({ "required": ["window"] }),
        );
    }
    // What the validator asks of every step beyond its keys: exactly one of `vm` and `vms`,
    // and at least one attribute (the keys of `Attr`, so a new attribute counts at once).
    if let Some(step) = schema.pointer_mut("/$defs/StepSchema") {
        let required = |key: &str| serde_json::json!({ "required": [key] });
        step["oneOf"] = serde_json::json!([required("vm"), required("vms")]);
        step["anyOf"] = super::keys::ATTRIBUTE_KEYS
            .iter()
            .map(|k| required(k))
            .collect();
    }
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// Plans never mean `null`: an optional key is left out, not set to nothing. schemars marks
/// `Option` fields nullable; this takes `null` back out of every `type` and `anyOf`.
fn strip_null(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".to_owned(), only);
                }
            }
            if let Some(Value::Array(any_of)) = map.get_mut("anyOf") {
                any_of.retain(|s| s.get("type").is_none_or(|t| t != "null"));
                if any_of.len() == 1 {
                    let only = any_of.remove(0);
                    map.remove("anyOf");
                    if let Value::Object(inner) = only {
                        map.extend(inner);
                    }
                }
            }
            map.values_mut().for_each(strip_null);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_null),
        _ => {}
    }
}

#[cfg(test)]
mod step_rules {
    /// The schema asks of a step what the validator asks: exactly one of `vm`/`vms`, at least
    /// one attribute (every key of `Attr`), and it carries an `$id` editors can fetch.
    #[test]
    fn steps_need_one_target_and_an_attribute() {
        let schema: serde_json::Value = serde_json::from_str(&super::plan_schema_json()).unwrap();
        assert_eq!(schema["$id"], super::SCHEMA_ID);
        let step = &schema["$defs"]["StepSchema"];
        assert_eq!(
            step["oneOf"],
            serde_json::json!([{"required": ["vm"]}, {"required": ["vms"]}])
        );
        let any: Vec<&str> = step["anyOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["required"][0].as_str().unwrap())
            .collect();
        assert_eq!(any, crate::plan_file::keys::ATTRIBUTE_KEYS);
    }

    /// The `$id` is the repository's checked-in schema, and the README tells editors that URL.
    #[test]
    fn the_schema_id_is_the_repository_file_the_readme_names() {
        assert_eq!(
            super::SCHEMA_ID,
            format!(
                "{}/raw/main/schemas/plan.schema.json",
                env!("CARGO_PKG_REPOSITORY")
            )
        );
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&format!("`$id` is `{}`", super::SCHEMA_ID)),
            "README does not name the schema's $id"
        );
        assert!(readme.contains(&format!(
            "yaml-language-server: $schema={}",
            super::SCHEMA_ID
        )));
    }
}
