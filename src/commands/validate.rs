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
    let domains: std::collections::BTreeSet<&str> = plan
        .steps
        .iter()
        .flat_map(|s| s.targets.iter().map(|t| t.name_or_uuid.as_str()))
        .collect();
    Ok(format!(
        "{}: plan `{}`, {} steps on {} domains",
        crate::printer::escape(&path.display().to_string()),
        crate::printer::escape(&plan.name),
        plan.steps.len(),
        domains.len()
    ))
}

/// Prints every diagnostic of a file with its source line.
pub fn report(printer: &Printer, diags: &Diagnostics) {
    for d in &diags.items {
        printer.error(&d.render(diags.text.as_deref()));
        printer.err_line("");
    }
}
