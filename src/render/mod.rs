//! Renderings of a [`crate::planner::Plan`] (human, JSON, Markdown) and of lockfile status.

mod human;
mod markdown;
pub mod when;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

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
    pub plan: &'a PlanMeta,
    pub planned_at: DateTime<Utc>,
    pub changes: &'a [Change],
    pub warnings: &'a [String],
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
    // The output's schema (what serializing writes), from the very types that write it.
    let schema = schemars::generate::SchemaSettings::default()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<JsonPlan<'static>>();
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
