//! `plan` for people: grouped by time, one line per attribute, `before → after`, how, notes,
//! warnings, and XML diffs.

use std::fmt::Write as _;

use super::{step_time, zone_of};
use crate::planner::{ChangeAction, Plan};
use crate::printer::{escape, Printer, Tone};

/// Renders the plan; colour comes from `printer`.
#[must_use]
pub fn human(plan: &Plan, printer: &Printer) -> String {
    let zone = zone_of(&plan.meta);
    let mut out = String::new();
    let short_hash = plan.meta.sha256.get(..12).unwrap_or(&plan.meta.sha256);
    let _ = writeln!(
        out,
        "{} {} ({}, sha256 {short_hash})",
        printer.paint(Tone::Heading, "Plan"),
        printer.paint(Tone::Heading, &escape(&plan.meta.name)),
        escape(&plan.meta.file)
    );
    if let Some(selection) = &plan.selection {
        let _ = writeln!(
            out,
            "{}",
            printer.paint(Tone::Warning, &selection.describe())
        );
    }
    let mut heading = None;
    for c in &plan.changes {
        let this = (c.at, c.step, c.vm.clone());
        if heading.as_ref() != Some(&this) {
            let _ = writeln!(
                out,
                "\n{}  step {}  {}",
                printer.paint(Tone::Heading, &step_time(c.at, zone)),
                c.step,
                printer.paint(Tone::Heading, &escape(&c.vm))
            );
            heading = Some(this);
        }
        let (mark, tone) = match c.action {
            ChangeAction::Change => ("~", Tone::Changed),
            ChangeAction::Noop => ("=", Tone::Dim),
            ChangeAction::Done => ("✓", Tone::Added),
        };
        let before = c.before.to_string();
        let after = c.after.to_string();
        let value = match c.action {
            ChangeAction::Change => format!(
                "{} → {}",
                printer.paint(Tone::Removed, &before),
                printer.paint(Tone::Added, &after)
            ),
            ChangeAction::Noop => format!("{after} (unchanged)"),
            ChangeAction::Done => format!("{after} (done)"),
        };
        let how = match (&c.method, c.action) {
            (Some(m), ChangeAction::Change) => format!("  [{m}]"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} {:<12} {value}{}",
            printer.paint(tone, mark),
            c.attribute,
            printer.paint(Tone::Dim, &how)
        );
        for note in &c.notes {
            let _ = writeln!(out, "      note: {}", escape(note));
        }
        if let (Some(diff), ChangeAction::Change) = (&c.xml_diff, c.action) {
            let _ = writeln!(out, "      domain XML:");
            for line in diff.lines() {
                let tone = match line.chars().next() {
                    Some('+') if !line.starts_with("+++") => Tone::Added,
                    Some('-') if !line.starts_with("---") => Tone::Removed,
                    _ => Tone::Dim,
                };
                let _ = writeln!(out, "        {}", printer.paint(tone, &escape(line)));
            }
        }
    }
    rollouts(plan, printer, &mut out);
    if !plan.warnings.is_empty() {
        let _ = writeln!(out, "\n{}", printer.paint(Tone::Warning, "Warnings:"));
        for w in &plan.warnings {
            let _ = writeln!(out, "  ! {}", escape(w));
        }
    }
    let s = plan.summary;
    let _ = writeln!(
        out,
        "\nPlan: {} to change, {} unchanged, {} already done.",
        s.change, s.noop, s.done
    );
    out
}

/// The rollouts and host limits, when the plan has any: each rollout's policy and batches.
fn rollouts(plan: &Plan, printer: &Printer, out: &mut String) {
    let rollouts = plan.rollouts();
    if rollouts.is_empty() && plan.policy.host_caps.is_empty() {
        return;
    }
    let zone = zone_of(&plan.meta);
    let _ = writeln!(out, "\n{}", printer.paint(Tone::Heading, "Rollouts:"));
    for r in &rollouts {
        let _ = writeln!(
            out,
            "  {}  step {}  {} domain{} on {}: {}",
            step_time(r.at, zone),
            r.step,
            r.domains,
            if r.domains == 1 { "" } else { "s" },
            escape(&r.connection.to_string()),
            escape(&r.description)
        );
        for (i, batch) in r.batches.iter().enumerate() {
            let names: Vec<_> = batch.iter().map(|n| escape(n)).collect();
            let _ = writeln!(out, "    batch {}: {}", i + 1, names.join(", "));
        }
    }
    for (uri, n) in &plan.policy.host_caps {
        let _ = writeln!(
            out,
            "  host {}: at most {n} step{} at once (virtplan.toml max_parallel)",
            escape(&uri.to_string()),
            if *n == 1 { "" } else { "s" }
        );
    }
}
