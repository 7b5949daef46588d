//! `virtplan status PLAN`: each step's progress from the lockfile, like a change-request list.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::cli::StatusFormat;
use crate::lockfile::StepStatus;
use crate::overview;
use crate::planner::saved::SavedPlan;
use crate::printer::{escape, Printer, Tone};
use crate::render::when;
use crate::ExitStatus;

pub use crate::overview::{StatusDoc, StatusStep};

/// The JSON Schema of [`StatusDoc`], pretty-printed with a trailing newline.
#[must_use]
pub fn json_schema() -> String {
    crate::overview::status_schema()
}

/// The plan file whose lockfile `path` refers to (a saved plan points at its plan file).
pub fn plan_file_of(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(match SavedPlan::read(path)? {
        Some(saved) => PathBuf::from(saved.plan_file),
        None => path.to_path_buf(),
    })
}

pub fn run(
    plan: &Path,
    config: Option<&Path>,
    format: StatusFormat,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    // A removed plan whose lockfile remains still has its recorded progress shown.
    let plan_exists = plan.symlink_metadata().is_ok();
    let plan = if plan_exists {
        plan_file_of(plan)?
    } else {
        plan.to_path_buf()
    };
    // The plan gives the zone times are shown in, and the steps of a plan never applied; a
    // plan that no longer validates still has its recorded progress shown.
    let (inspected, lock) = overview::Inspected::with_lock(&plan, config);
    let lock = lock?;
    let (paths, zone, file) = (&inspected.paths, inspected.zone(), inspected.file.as_ref());
    if !plan_exists {
        if lock.is_none() {
            anyhow::bail!(
                "{}: no such plan file, and no lockfile {} either",
                plan.display(),
                paths.lockfile.display()
            );
        }
        printer.info(&format!(
            "The plan file {} is gone; showing the progress its lockfile {} recorded.",
            plan.display(),
            paths.lockfile.display()
        ));
    } else if let (None, Some(diags)) = (&lock, &inspected.problems) {
        // Nothing recorded and nothing readable (a FIFO, a broken plan): say why, not "0".
        super::validate::report(printer, diags);
        return Ok(ExitStatus::Error);
    } else if lock.is_none() {
        printer.info(&format!(
            "No progress recorded for {}: `virtplan apply` has not run it ({} does not exist).",
            plan.display(),
            paths.lockfile.display()
        ));
    }
    let cancels = paths.cancels.read()?;
    let doc = StatusDoc {
        steps: overview::rows(file, lock.as_ref(), &cancels, zone),
        notifications: lock.as_ref().map(overview::undelivered).unwrap_or_default(),
        filter: lock.as_ref().and_then(|l| l.filter.clone()),
    };
    let text = match format {
        StatusFormat::Json => {
            let mut text = serde_json::to_string_pretty(&doc)?;
            text.push('\n');
            text
        }
        StatusFormat::Human => human(&doc, zone, printer),
    };
    printer.out(&text);
    Ok(ExitStatus::Success)
}

fn time(t: Option<DateTime<Utc>>, zone: Option<Tz>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| when::stamp(t, zone))
}

/// One block per step: status, step, domain and time; then what, timings and message.
pub fn human(doc: &StatusDoc, zone: Option<Tz>, printer: &Printer) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(filter) = &doc.filter {
        let _ = writeln!(
            out,
            "{}",
            printer.paint(
                Tone::Dim,
                &format!(
                    "The last apply ran with {}: the steps of the domains it left out are pending.",
                    escape(&filter.describe())
                )
            )
        );
    }
    for s in &doc.steps {
        let tone = match s.status {
            StepStatus::Done => Tone::Added,
            StepStatus::Failed | StepStatus::Missed => Tone::Removed,
            StepStatus::Running | StepStatus::Skipped | StepStatus::Cancelled => Tone::Changed,
            StepStatus::Pending => Tone::Dim,
        };
        let status = format!("{:<9}", s.status.as_str());
        let _ = writeln!(
            out,
            "{} step {} {} at {}",
            printer.paint(tone, &status),
            s.step,
            printer.paint(Tone::Heading, &s.vm),
            s.at.map_or_else(|| "apply start".to_owned(), |t| when::date_time(t, zone)),
        );
        if !s.what.is_empty() {
            let _ = writeln!(out, "          {}", escape(&s.what));
        }
        match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => {
                let took = (b - a).as_seconds_f64();
                let _ = writeln!(
                    out,
                    "          started {}, finished {} ({took:.1}s)",
                    time(Some(a), zone),
                    time(Some(b), zone)
                );
            }
            (Some(a), None) => {
                let _ = writeln!(out, "          started {}", time(Some(a), zone));
            }
            (None, Some(b)) => {
                let _ = writeln!(out, "          recorded {}", time(Some(b), zone));
            }
            (None, None) => {}
        }
        if !s.message.is_empty() {
            let _ = writeln!(
                out,
                "          {}",
                printer.paint(Tone::Dim, &escape(&s.message))
            );
        }
    }
    let count = |st: StepStatus| doc.steps.iter().filter(|s| s.status == st).count();
    let _ = writeln!(
        out,
        "{} done, {} failed, {} missed, {} skipped, {} cancelled, {} running, {} pending",
        count(StepStatus::Done),
        count(StepStatus::Failed),
        count(StepStatus::Missed),
        count(StepStatus::Skipped),
        count(StepStatus::Cancelled),
        count(StepStatus::Running),
        count(StepStatus::Pending),
    );
    if !doc.notifications.is_empty() {
        let _ = writeln!(
            out,
            "{} notification(s) not delivered (the next `virtplan apply` sends them again):",
            doc.notifications.len()
        );
        for n in &doc.notifications {
            let about = match (n.step, &n.vm) {
                (Some(step), Some(vm)) => format!(" step {step} {vm}"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {} {}{about} ({}){}",
                printer.paint(Tone::Removed, &format!("{:<7}", n.delivery.as_str())),
                n.event,
                n.id,
                if n.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", n.error)
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::StatusDoc;
    use crate::lockfile::{Lockfile, StepRecord, StepStatus};
    use crate::printer::Printer;

    fn t(s: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    fn sample() -> Lockfile {
        let record = |step: usize, vm: &str, status: StepStatus| {
            let (id, uuid) = (format!("s00000000{step}"), format!("uuid-{vm}"));
            let at = t("2026-12-01T09:00:00Z");
            StepRecord::new(step, id, vm, uuid, "memory 1GiB → 2GiB", at, status)
        };
        let mut lock = Lockfile::new("abc");
        let mut done = record(1, "web-01", StepStatus::Done);
        done.started_at = t("2026-12-01T09:00:00.012Z");
        done.finished_at = t("2026-12-01T09:00:04.512Z");
        done.message = "the guest ignored the shutdown request for 3s: forced off (destroy)".into();
        lock.steps.push(done);
        let mut missed = record(1, "web-02", StepStatus::Missed);
        missed.finished_at = t("2026-12-01T09:06:00Z");
        missed.message = "missed, not run: due at 09:00, it could not start by 09:05".into();
        lock.steps.push(missed);
        lock.steps.push(record(2, "web-02", StepStatus::Skipped));
        lock.steps.push(record(3, "web-01", StepStatus::Pending));
        lock
    }

    #[test]
    fn status_human() {
        let doc = StatusDoc::from(&sample());
        insta::assert_snapshot!(super::human(&doc, None, &Printer::plain()));
    }

    /// Times in the plan's zone with its abbreviation; an operator's cancel shows who and when.
    #[test]
    fn status_human_in_the_plans_zone_with_a_cancel() {
        let zone: chrono_tz::Tz = "America/Toronto".parse().unwrap();
        let cancels = [crate::cancel::CancelRecord {
            step_id: "s000000003".into(),
            step: 3,
            by: "alice@admin1".into(),
            at: t("2026-12-01T08:58:30Z").unwrap(),
        }];
        let doc = StatusDoc {
            steps: crate::overview::rows(None, Some(&sample()), &cancels, Some(zone)),
            notifications: Vec::new(),
            filter: None,
        };
        insta::assert_snapshot!(super::human(&doc, Some(zone), &Printer::plain()));
    }

    #[test]
    fn status_json() {
        let doc = StatusDoc::from(&sample());
        insta::assert_json_snapshot!(doc);
    }

    #[test]
    fn checked_in_status_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/status.schema.json");
        let current = super::json_schema();
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::write(path, &current).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == current,
            "schemas/status.schema.json is out of date; regenerate it with `UPDATE_SCHEMAS=1 cargo test --lib checked_in_status_schema_is_current`"
        );
    }
}
