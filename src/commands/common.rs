//! Steps shared by the commands that read a plan and talk to libvirt.

use std::path::Path;

use anyhow::Context as _;

use crate::config::Config;
use crate::ops;
use crate::plan_file::{self, PlanFile};
use crate::planner::{Connections, PlanError};
use crate::printer::Printer;
use crate::uri::Uri;

/// Loads configuration and plan, printing located diagnostics; `None` when invalid.
pub fn load_plan(
    path: &Path,
    config_path: Option<&Path>,
    printer: &Printer,
) -> Option<(Config, PlanFile)> {
    match ops::load(path, config_path) {
        Ok(loaded) => Some((loaded.config, loaded.file)),
        Err(diags) => {
            super::validate::report(printer, &diags);
            None
        }
    }
}

/// `--connect` resolved like any connection: a libvirt URI, or a host alias of virtplan.toml.
pub fn resolve_connect(config: &Config, connect: Option<&str>) -> anyhow::Result<Option<Uri>> {
    let Some(text) = connect else {
        return Ok(None);
    };
    config.resolve_connection(text).map(Some).ok_or_else(|| {
        let hosts: Vec<&str> = config.hosts.keys().map(String::as_str).collect();
        anyhow::anyhow!(
            "--connect {}: neither a libvirt URI (such as qemu:///system) nor a host in the [hosts] table of {}{}",
            crate::printer::escape(text),
            config.path.as_ref().map_or_else(
                || "virtplan.toml (none was found)".to_owned(),
                |p| p.display().to_string()
            ),
            if hosts.is_empty() {
                String::new()
            } else {
                format!(" (hosts: {})", hosts.join(", "))
            }
        )
    })
}

/// Opens each connection the plan uses once (`--connect` replaces all of them).
pub fn open_connections(file: &PlanFile, connect: Option<&Uri>) -> anyhow::Result<Connections> {
    open_uris(file.connection_uris(connect))
        .with_context(|| format!("plan {}", file.path.display()))
}

/// Opens each of `uris` once.
pub fn open_uris(uris: impl IntoIterator<Item = Uri>) -> anyhow::Result<Connections> {
    Ok(ops::open(uris)?)
}

/// Prints a lockfile refusal (apply's message) located at the step it names, when the plan
/// still has a step with that number; else at the top of the file.
pub fn report_lock_refusal(printer: &Printer, file: &PlanFile, error: &crate::lockfile::LockError) {
    use crate::lockfile::LockError;
    let pos = match error {
        LockError::DoneStepChanged { step, .. } => {
            file.steps.iter().find(|s| s.number == *step).map(|s| s.pos)
        }
        LockError::UuidChanged { vm, .. } => file
            .steps
            .iter()
            .flat_map(|s| s.targets.iter())
            .find(|t| t.name_or_uuid == *vm)
            .map(|t| t.pos),
        _ => None,
    }
    .unwrap_or(plan_file::Pos::new(1, 1));
    let diag = plan_file::Diagnostic::new(&file.path, pos, error.to_string());
    printer.error(&diag.render(Some(&file.source)));
    printer.err_line("");
}

/// Prints why a plan could not be made, with source lines for located problems.
pub fn report_plan_error(printer: &Printer, file: &PlanFile, error: &PlanError) {
    match error {
        PlanError::Problems(problems) => {
            for p in problems {
                printer.error(&p.diagnostic(&file.path).render(Some(&file.source)));
                printer.err_line("");
            }
        }
        PlanError::Filter(message) => printer.error(message),
        PlanError::Libvirt { context, source } => {
            printer.error(&format!("{context}: {source}"));
        }
    }
}
