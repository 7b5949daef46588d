//! `plan --format markdown`: a table for a pull-request comment.

use std::fmt::Write as _;

use super::{step_time, zone_of};
use crate::planner::{ChangeAction, Plan};

/// Renders the plan as GitHub-flavoured Markdown.
#[must_use]
pub fn markdown(plan: &Plan) -> String {
    let zone = zone_of(&plan.meta);
    let s = plan.summary;
    let mut out = format!(
        "### virtplan plan `{}`\n\n`{}` · sha256 `{}`\n\n**{} to change, {} unchanged, {} already done.**\n\n",
        cell(&plan.meta.name),
        cell(&plan.meta.file),
        plan.meta.sha256.get(..12).unwrap_or(&plan.meta.sha256),
        s.change,
        s.noop,
        s.done
    );
    if let Some(selection) = &plan.selection {
        let _ = writeln!(out, "{}\n", cell(&selection.describe()));
    }
    out.push_str("| When | Step | VM | Attribute | Before | After | Action | How / notes |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for c in &plan.changes {
        let action = match c.action {
            ChangeAction::Change => "**change**",
            ChangeAction::Noop => "noop",
            ChangeAction::Done => "done",
        };
        let mut how: Vec<String> = c.method.iter().cloned().collect();
        how.extend(c.notes.iter().cloned());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {action} | {} |",
            cell(&step_time(c.at, zone)),
            c.step,
            cell(&c.vm),
            c.attribute,
            cell(&c.before.to_string()),
            cell(&c.after.to_string()),
            cell(&how.join("; "))
        );
    }
    let rollouts = plan.rollouts();
    if !rollouts.is_empty() || !plan.policy.host_caps.is_empty() {
        out.push_str("\n**Rollouts**\n\n| When | Step | Domains | Policy | Batches |\n|---|---|---|---|---|\n");
        for r in &rollouts {
            let batches: Vec<String> = r
                .batches
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{}: {}", i + 1, b.join(", ")))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} on {} | {} | {} |",
                cell(&step_time(r.at, zone)),
                r.step,
                r.domains,
                cell(&r.connection.to_string()),
                cell(&r.description),
                cell(&batches.join(" · "))
            );
        }
        for (uri, n) in &plan.policy.host_caps {
            let _ = writeln!(
                out,
                "\nHost `{}`: at most {n} at once (virtplan.toml `max_parallel`).",
                cell(&uri.to_string())
            );
        }
    }
    if !plan.warnings.is_empty() {
        out.push_str("\n**Warnings**\n\n");
        for w in &plan.warnings {
            let _ = writeln!(out, "- ⚠️ {}", cell(w));
        }
    }
    for c in plan
        .changes
        .iter()
        .filter(|c| c.action == ChangeAction::Change)
    {
        if let Some(diff) = &c.xml_diff {
            let _ = write!(
                out,
                "\n<details><summary>Domain XML of {} (step {})</summary>\n\n```diff\n{diff}```\n\n</details>\n",
                cell(&c.vm),
                c.step
            );
        }
    }
    out
}

/// Text safe inside a table cell: no pipes or line breaks.
fn cell(text: &str) -> String {
    let text = text.replace('|', "\\|").replace(['\n', '\r'], " ");
    crate::printer::escape(&text).into_owned()
}
