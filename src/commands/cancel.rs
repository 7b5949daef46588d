//! `virtplan cancel PLAN [--step N]`: record pending steps (or one) as cancelled by the
//! operator, while an executor runs or not; see [`crate::cancel`] for why that is safe.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cancel::{self, CancelRecord};
use crate::clock::Clock;
use crate::lockfile::StepStatus;
use crate::overview::{self, StatusStep};
use crate::printer::Printer;
use crate::render::when;
use crate::ExitStatus;

pub struct Args<'a> {
    pub plan: &'a Path,
    pub config: Option<&'a Path>,
    /// Only this step (1-based, as `status` numbers them).
    pub step: Option<usize>,
}

/// Statuses a cancel can still stop: the step has not started (or would be retried).
fn cancellable(status: StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Pending | StepStatus::Skipped | StepStatus::Cancelled | StepStatus::Failed
    )
}

pub fn run(args: &Args<'_>, clock: &dyn Clock, printer: &Printer) -> anyhow::Result<ExitStatus> {
    if !args.plan.exists() {
        anyhow::bail!("{}: no such plan file", args.plan.display());
    }
    let plan = super::status::plan_file_of(args.plan)?;
    let inspected = overview::Inspected::of(&plan, args.config);
    let paths = &inspected.paths;
    let lock = paths.read_lock()?;
    // Offline: the plan names its steps; an executor may run a version of it that has been
    // edited since, so the lockfile's records count too.
    if let Some(problems) = &inspected.problems {
        super::validate::report(printer, problems);
        if lock.is_none() {
            return Ok(ExitStatus::Error);
        }
        printer.warning(
            "the plan does not validate (above); cancelling by the steps its lockfile records",
        );
    }
    let zone = inspected.zone();
    let file = inspected.file.as_ref();
    let existing = paths.cancels.read()?;
    let rows = overview::rows(file, lock.as_ref(), &existing, zone);

    let chosen = match args.step {
        Some(n) => {
            let Some(open) = one_step(&rows, n, &plan)? else {
                printer.info(&format!(
                    "Step {n} of {} is already cancelled.",
                    plan.display()
                ));
                return Ok(ExitStatus::Success);
            };
            open
        }
        None => rows
            .iter()
            .filter(|r| r.cancelled_by.is_none() && cancellable(r.status))
            .collect(),
    };
    if chosen.is_empty() {
        printer.info(&format!(
            "Nothing to cancel in {}: every step is done, running, missed or already cancelled.",
            plan.display()
        ));
        return Ok(ExitStatus::Success);
    }

    let by = cancel::who();
    let now = clock.now();
    let mut steps: BTreeMap<&str, &StatusStep> = BTreeMap::new();
    for r in &chosen {
        steps.entry(r.id.as_str()).or_insert(r);
    }
    let records: Vec<CancelRecord> = steps
        .values()
        .map(|r| CancelRecord {
            step_id: r.id.clone(),
            step: r.step,
            by: by.clone(),
            at: now,
        })
        .collect();
    // Read under the lock: a step recorded running by now started before the cancel landed.
    let started = paths.cancels.append(&records, || paths.read_lock())??;
    let started: Vec<String> = started
        .iter()
        .flat_map(|l| &l.steps)
        .filter(|r| steps.contains_key(r.step_id.as_str()))
        .filter(|r| matches!(r.status, StepStatus::Running | StepStatus::Done))
        .map(|r| format!("step {} on {} ({})", r.step, r.vm, r.status))
        .collect();

    printer.out(&cancelled_lines(&steps, &chosen, zone, now));
    printer.info(&format!(
        "Recorded by {by} in {}. A running `apply` or `watch` will not start these steps, and later applies skip them; to run one after all, edit it in a reviewed change (that gives it a new step id).",
        paths.cancels.path().display()
    ));
    if !started.is_empty() {
        printer.warning(&format!(
            "already started before the cancel landed, so not stopped: {}",
            started.join(", ")
        ));
    }
    Ok(ExitStatus::Success)
}

/// The records of step `n` a cancel can stop; `None` when an operator already cancelled it.
fn one_step<'a>(
    rows: &'a [StatusStep],
    n: usize,
    plan: &Path,
) -> anyhow::Result<Option<Vec<&'a StatusStep>>> {
    let of_step: Vec<&StatusStep> = rows.iter().filter(|r| r.step == n).collect();
    if of_step.is_empty() {
        let last = rows.iter().map(|r| r.step).max().unwrap_or(0);
        anyhow::bail!(
            "{} has no step {n}: its steps are numbered 1 to {last} (see `virtplan status {}`)",
            plan.display(),
            plan.display()
        );
    }
    if of_step.iter().any(|r| r.cancelled_by.is_some()) {
        return Ok(None);
    }
    let open: Vec<&StatusStep> = of_step
        .iter()
        .copied()
        .filter(|r| cancellable(r.status))
        .collect();
    if open.is_empty() {
        let states: Vec<String> = of_step
            .iter()
            .map(|r| format!("{} on {}", r.status, r.vm))
            .collect();
        anyhow::bail!(
            "step {n} of {} cannot be cancelled: it is {}; a cancel stops steps that have not started",
            plan.display(),
            states.join(", ")
        );
    }
    Ok(Some(open))
}

/// `Cancelled step 2 (web-01: vcpus 1 → 2), due 2026-12-01 04:05 EST (in 4m12s)`, one per step.
fn cancelled_lines(
    steps: &BTreeMap<&str, &StatusStep>,
    chosen: &[&StatusStep],
    zone: Option<chrono_tz::Tz>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut lines = String::new();
    for r in steps.values() {
        use std::fmt::Write as _;
        let vms: Vec<&str> = chosen
            .iter()
            .filter(|c| c.id == r.id)
            .map(|c| c.vm.as_str())
            .collect();
        let due = r.at.map_or_else(
            || "when apply starts".to_owned(),
            |at| {
                format!(
                    "due {} ({})",
                    when::date_time(at, zone),
                    when::relative(at, now)
                )
            },
        );
        let _ = writeln!(
            lines,
            "Cancelled step {} ({}: {}), {due}",
            r.step,
            vms.join(", "),
            if r.what.is_empty() { "-" } else { &r.what }
        );
    }
    lines
}
