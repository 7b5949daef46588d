//! Renderings of a [`crate::planner::Plan`] (human, JSON, Markdown) and of lockfile status.

mod changes_json;
mod human;
mod markdown;
pub mod when;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::attr::Figure;
use crate::planner::{Change, Plan, PlanMeta, RolloutView, Summary, FORMAT_VERSION};

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
    /// Steps with a `rollout`: their resolved limits and the batches their domains start in
    /// (left out when the plan has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutView>,
    /// virtplan.toml `[hosts.NAME] max_parallel` for the connections the plan uses, by
    /// connection (left out when none applies).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub host_limits: std::collections::BTreeMap<String, usize>,
    /// `--only` / `--exclude`: the filter and the domains it left out (left out without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<&'a crate::filter::Selection>,
}

/// `plan --format json`.
#[must_use]
pub fn json(plan: &Plan) -> String {
    let doc = JsonPlan {
        format_version: FORMAT_VERSION,
        plan: &plan.meta,
        planned_at: plan.planned_at,
        // Written apart, then put in place (see [`changes_json`]).
        changes: &[],
        warnings: &plan.warnings,
        summary: plan.summary,
        rollouts: plan.rollouts(),
        host_limits: plan
            .policy
            .host_caps
            .iter()
            .map(|(uri, n)| (uri.redacted(), *n))
            .collect(),
        filter: plan.selection.as_ref(),
    };
    // Sized up front: growing a string of hundreds of kilobytes by doubling copied it several
    // times, and room far beyond what is written still made the process touch memory it never
    // used (2000 domains: a fit estimate keeps 3 MB less resident than 640 bytes per change).
    let warnings: usize = plan.warnings.iter().map(|w| w.len() + 8).sum();
    let mut rest = Vec::with_capacity(4096 + warnings);
    if serde_json::to_writer_pretty(&mut rest, &doc).is_err() {
        return "\n".to_owned();
    }
    // The document's own `"changes": []`, on its line at the first level (no string holds a
    // line break unescaped): its elements go between the brackets.
    let empty = b"\n  \"changes\": []";
    let Some(at) = rest.windows(empty.len()).position(|w| w == empty) else {
        return "\n".to_owned();
    };
    let split = at + empty.len() - 1;
    let mut out = Vec::with_capacity(rest.len() + 1 + json_size(&plan.changes));
    out.extend_from_slice(&rest[..split]);
    if changes_json::write(&mut out, &plan.changes).is_err() {
        return "\n".to_owned();
    }
    out.extend_from_slice(&rest[split..]);
    out.push(b'\n');
    String::from_utf8(out).unwrap_or_default()
}

/// About how many bytes `changes` take in [`json`]'s output: their text, and what every
/// change writes besides (keys, indentation, numbers, its time: some 300 bytes).
fn json_size(changes: &[Change]) -> usize {
    let figure = |f: &Figure| match f {
        Figure::Text(text) => text.len(),
        _ => 0,
    };
    changes
        .iter()
        .map(|c| {
            300 + c.step_id.len()
                + c.vm.len()
                + c.uuid.len()
                + c.connection.expose().len()
                + c.method.as_ref().map_or(0, String::len)
                + c.notes.iter().map(|n| n.len() + 10).sum::<usize>()
                + c.xml_diff.as_ref().map_or(0, String::len)
                + figure(&c.before)
                + figure(&c.after)
        })
        .sum()
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
