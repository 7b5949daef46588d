//! `virtplan plan`: read live state, project the steps, show (and optionally save) the plan.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::common;
use crate::cli::PlanFormat;
use crate::clock::Clock;
use crate::lockfile::LockStore;
use crate::ops;
use crate::plan_file::PlanFile;
use crate::planner::saved::SavedPlan;
use crate::planner::{self, NoProgress, Plan, PlanError, Progress};
use crate::printer::Printer;
use crate::{render, ExitStatus};

pub struct Args<'a> {
    /// One plan, or several given together (checked for overlapping changes of one domain).
    pub plans: &'a [PathBuf],
    pub config: Option<&'a Path>,
    pub connect: Option<&'a str>,
    pub format: PlanFormat,
    pub out: Option<&'a Path>,
    pub detailed_exitcode: bool,
    /// `--only` / `--exclude`.
    pub filter: crate::filter::Filter,
}

/// One plan file, validated and projected.
struct Planned {
    file: PlanFile,
    plan: Plan,
    /// Every URI the plan may name, credentials included: masked in the saved plan's text.
    uris: Vec<crate::uri::Uri>,
}

pub fn run(args: &Args<'_>, clock: &dyn Clock, printer: &Printer) -> anyhow::Result<ExitStatus> {
    if args.plans.len() > 1 && !args.filter.is_empty() {
        anyhow::bail!("--only and --exclude select domains of one plan: give one PLAN with them");
    }
    if args.plans.len() > 1 && args.out.is_some() {
        anyhow::bail!("--out saves one plan: give one PLAN with --out, or leave --out away to review several plans together");
    }
    let mut planned = Vec::new();
    let mut failed = false;
    for path in args.plans {
        match project_one(path, args, clock, printer)? {
            Some(p) => planned.push(p),
            None => failed = true,
        }
    }
    if failed {
        return Ok(ExitStatus::Error);
    }
    // Plans given together must not change one domain at the same time.
    let pairs: Vec<(&PlanFile, &Plan)> = planned.iter().map(|p| (&p.file, &p.plan)).collect();
    let clashes = planner::overlap::overlaps(&pairs);
    if !clashes.is_empty() {
        for problem in clashes {
            let file = planned
                .iter()
                .find(|p| p.file.path.display().to_string() == problem.file)
                .map(|p| &p.file);
            if let Some(file) = file {
                common::report_plan_error(printer, file, &PlanError::Problems(vec![problem]));
            }
        }
        return Ok(ExitStatus::Error);
    }
    for Planned { file, plan, uris } in &planned {
        let text = match args.format {
            PlanFormat::Human => render::human(plan, printer),
            PlanFormat::Json => render::json(plan),
            PlanFormat::Markdown => render::markdown(plan),
        };
        printer.out(&text);
        if args.format != PlanFormat::Json {
            printer.out(&crate::notify::describe_targets(&file.notify));
        }
        if let Some(out) = args.out {
            // The plan text as reviewed, with webhook tokens and connection credentials masked:
            // a saved plan is no secret.
            let source = crate::uri::redact_in(&crate::notify::redact_source(file), uris);
            SavedPlan::new(plan.clone(), source)
                .write(out)
                .with_context(|| format!("cannot write the saved plan {}", out.display()))?;
            printer.info(&format!(
                "Saved the plan to {}; run `virtplan apply {}` to apply exactly this.",
                out.display(),
                out.display()
            ));
        }
    }
    let changes = planned.iter().any(|p| p.plan.has_changes());
    // The process exits next: freeing every planned step's strings one by one would cost
    // about as much as rendering them (connections are already closed).
    std::mem::forget(planned);
    Ok(if args.detailed_exitcode && changes {
        ExitStatus::Changes
    } else {
        ExitStatus::Success
    })
}

/// Loads, connects and projects one plan; `None` when it was refused (already reported).
fn project_one(
    path: &Path,
    args: &Args<'_>,
    clock: &dyn Clock,
    printer: &Printer,
) -> anyhow::Result<Option<Planned>> {
    let Some((config, file)) = common::load_plan(path, args.config, printer) else {
        return Ok(None);
    };
    let connect = common::resolve_connect(&config, args.connect)?;
    // With a lockfile, done steps are shown as done rather than as changes.
    let lock_path = crate::overview::StatePaths::of(path, config.state_dir.as_deref()).lockfile;
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
    let plan = match ops::project(
        &file,
        &connections,
        connect.as_ref(),
        clock.now(),
        progress,
        Some(&args.filter),
    ) {
        Ok(plan) => plan,
        Err(e) => {
            common::report_plan_error(printer, &file, &e);
            return Ok(None);
        }
    };
    // What apply would refuse (an edited or removed done step, a recreated domain) is
    // refused here too, with apply's own message: a green plan cannot fail at apply for it.
    if let Some(lock) = &recorded {
        if let Err(e) = lock.clone().reconcile(&lock_path, &plan) {
            common::report_lock_refusal(printer, &file, &e);
            return Ok(None);
        }
        let filter = plan.selection.as_ref().map(|s| &s.filter);
        if let Some(note) = lock.filter_change_note(filter) {
            printer.info(&format!("Note: {note}."));
        }
    }
    let uris = file
        .connection_uris(None)
        .into_iter()
        .chain(config.hosts.values().cloned())
        .chain(connect)
        .collect();
    Ok(Some(Planned { file, plan, uris }))
}
