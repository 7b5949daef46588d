//! `virtplan plan`: read live state, project the steps, show (and optionally save) the plan.

use std::path::Path;

use anyhow::Context as _;

use super::common;
use crate::cli::PlanFormat;
use crate::clock::Clock;
use crate::lockfile::{self, LockStore};
use crate::planner::saved::SavedPlan;
use crate::planner::{self, NoProgress, PlanInput, Progress};
use crate::printer::Printer;
use crate::{render, ExitStatus};

pub struct Args<'a> {
    pub plan: &'a Path,
    pub config: Option<&'a Path>,
    pub connect: Option<&'a str>,
    pub format: PlanFormat,
    pub out: Option<&'a Path>,
    pub detailed_exitcode: bool,
}

pub fn run(args: &Args<'_>, clock: &dyn Clock, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let Some((config, file)) = common::load_plan(args.plan, args.config, printer) else {
        return Ok(ExitStatus::Error);
    };
    let connect = common::resolve_connect(&config, args.connect)?;
    // With a lockfile beside the plan, done steps are shown as done rather than as changes.
    let lock_path = lockfile::lock_path(args.plan);
    let recorded = if lock_path.exists() {
        Some(
            LockStore::read(&lock_path)
                .with_context(|| format!("cannot use the progress file {}", lock_path.display()))?,
        )
    } else {
        None
    };
    let progress: &dyn Progress = match &recorded {
        Some(lock) => lock,
        None => &NoProgress,
    };
    let connections = common::open_connections(&file, connect.as_ref())?;
    let input = PlanInput {
        file: &file,
        connections: &connections,
        connect_override: connect.as_ref(),
        now: clock.now(),
        progress,
    };
    let plan = match planner::project(&input) {
        Ok(plan) => plan,
        Err(e) => {
            common::report_plan_error(printer, &file, &e);
            return Ok(ExitStatus::Error);
        }
    };
    // What apply would refuse (an edited or removed done step, a recreated domain) is
    // refused here too, with apply's own message: a green plan cannot fail at apply for it.
    if let Some(lock) = &recorded {
        if let Err(e) = lock.clone().reconcile(&lock_path, &plan) {
            common::report_lock_refusal(printer, &file, &e);
            return Ok(ExitStatus::Error);
        }
    }
    let text = match args.format {
        PlanFormat::Human => render::human(&plan, printer),
        PlanFormat::Json => render::json(&plan),
        PlanFormat::Markdown => render::markdown(&plan),
    };
    printer.out(&text);
    if let Some(out) = args.out {
        // The plan text keeps no credentials either (the connections inside are redacted).
        let source = crate::uri::redact_in(
            &file.source,
            file.connection_uris(None)
                .iter()
                .chain(config.hosts.values())
                .chain(connect.as_ref()),
        );
        SavedPlan::new(plan.clone(), source)
            .write(out)
            .with_context(|| format!("cannot write the saved plan {}", out.display()))?;
        printer.info(&format!(
            "Saved the plan to {}; run `virtplan apply {}` to apply exactly this.",
            out.display(),
            out.display()
        ));
    }
    Ok(if args.detailed_exitcode && plan.has_changes() {
        ExitStatus::Changes
    } else {
        ExitStatus::Success
    })
}
