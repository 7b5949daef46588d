//! `virtplan validate PLAN...`: offline checks, every problem of every file, no libvirt call.

use std::path::Path;

use crate::config;
use crate::plan_file::{self, Diagnostics, LoadContext};
use crate::printer::{Printer, Tone};
use crate::ExitStatus;

pub fn run(
    plans: &[std::path::PathBuf],
    config_path: Option<&Path>,
    printer: &Printer,
) -> ExitStatus {
    let mut failed = 0;
    for path in plans {
        match check(path, config_path) {
            Ok(summary) => printer.out(&format!(
                "{} {}\n",
                printer.paint(Tone::Added, "ok"),
                summary
            )),
            Err(diags) => {
                failed += 1;
                report(printer, &diags);
            }
        }
    }
    if failed == 0 {
        ExitStatus::Success
    } else {
        printer.err_line(&format!(
            "{failed} of {} plan files failed validation",
            plans.len()
        ));
        ExitStatus::Error
    }
}

fn check(path: &Path, config_path: Option<&Path>) -> Result<String, Diagnostics> {
    let config = config::discover(config_path, Some(path))?;
    let plan = plan_file::load(path, &LoadContext::from(config))?;
    Ok(format!(
        "{}: plan `{}`, {}",
        crate::printer::escape(&path.display().to_string()),
        crate::printer::escape(&plan.name),
        targets_summary(&plan)
    ))
}

/// `3 steps on 2 domains`; a `vms: {match:}` pattern is counted as what it is, since how many
/// domains it selects is known only when `plan` reads libvirt:
/// `2 steps on 1 domain and 1 pattern (`web-*`, resolved by `virtplan plan`)`.
fn targets_summary(plan: &crate::plan_file::PlanFile) -> String {
    let mut domains = std::collections::BTreeSet::new();
    let mut patterns = std::collections::BTreeSet::new();
    for t in plan.steps.iter().flat_map(|s| s.targets.iter()) {
        if t.pattern().is_some() {
            patterns.insert(t.name_or_uuid.as_str());
        } else {
            domains.insert(t.name_or_uuid.as_str());
        }
    }
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let steps = count(plan.steps.len(), "step", "steps");
    if patterns.is_empty() {
        return format!("{steps} on {}", count(domains.len(), "domain", "domains"));
    }
    let listed = patterns
        .iter()
        .map(|p| format!("`{}`", crate::printer::escape(p)))
        .collect::<Vec<_>>()
        .join(", ");
    let patterns = format!(
        "{} ({listed}, resolved by `virtplan plan`)",
        count(patterns.len(), "pattern", "patterns")
    );
    if domains.is_empty() {
        format!("{steps} on {patterns}")
    } else {
        format!(
            "{steps} on {} and {patterns}",
            count(domains.len(), "domain", "domains")
        )
    }
}

/// Prints every diagnostic of a file with its source line.
pub fn report(printer: &Printer, diags: &Diagnostics) {
    for d in &diags.items {
        printer.error(&d.render(diags.text.as_deref()));
        printer.err_line("");
    }
}
