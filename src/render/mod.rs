//! Renderings of a [`crate::planner::Plan`] (human, JSON, Markdown) and of lockfile status.

mod human;
mod markdown;
pub mod when;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::Value;

use crate::planner::{Change, Plan, PlanMeta, Summary, FORMAT_VERSION};

pub use human::human;
pub use markdown::markdown;

pub use crate::plan_file::time::show_time;

/// The time heading of a step: its `at`, or "when apply starts".
fn step_time(at: Option<DateTime<Utc>>, zone: Option<Tz>) -> String {
    at.map_or_else(|| "when apply starts".to_owned(), |t| show_time(t, zone))
}

fn zone_of(meta: &PlanMeta) -> Option<Tz> {
    meta.timezone.as_deref().and_then(|z| z.parse().ok())
}

/// The stable JSON document of SPEC §3 (its schema is `schemas/plan-output.schema.json`).
#[derive(Serialize, schemars::JsonSchema)]
pub struct JsonPlan<'a> {
    pub format_version: u32,
    #[schemars(with = "PlanMetaSchema")]
    pub plan: &'a PlanMeta,
    pub planned_at: DateTime<Utc>,
    #[schemars(with = "Vec<ChangeSchema>")]
    pub changes: &'a [Change],
    pub warnings: &'a [String],
    #[schemars(with = "SummarySchema")]
    pub summary: Summary,
}

/// `plan --format json`.
#[must_use]
pub fn json(plan: &Plan) -> String {
    let doc = JsonPlan {
        format_version: FORMAT_VERSION,
        plan: &plan.meta,
        planned_at: plan.planned_at,
        changes: &plan.changes,
        warnings: &plan.warnings,
        summary: plan.summary,
    };
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// JSON Schema of [`json`]'s output.
#[must_use]
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(JsonPlan<'static>);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// Schema mirror of [`PlanMeta`].
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct PlanMetaSchema {
    name: String,
    /// The plan file as given on the command line.
    file: String,
    /// SHA-256 of the plan file's bytes.
    sha256: String,
    timezone: Option<String>,
}

/// Schema mirror of [`Change`].
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct ChangeSchema {
    /// 1-based step number in the plan file.
    step: usize,
    /// Stable step id (as recorded in the lockfile).
    step_id: String,
    /// RFC 3339; null when the step runs as soon as apply starts.
    at: Option<DateTime<Utc>>,
    vm: String,
    uuid: String,
    connection: String,
    attribute: crate::attr::Attr,
    /// Memory values are integers in KiB.
    before: Value,
    after: Value,
    #[schemars(extend("enum" = ["change", "noop", "done"]))]
    action: String,
    /// How the change is applied (live+config, config, graceful shutdown, ...).
    method: Option<String>,
    notes: Vec<String>,
    /// Unified diff of the persistent domain XML, for XML-level changes.
    xml_diff: Option<String>,
}

/// Schema mirror of [`Summary`].
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct SummarySchema {
    change: usize,
    noop: usize,
    done: usize,
}
