//! `virtplan status PLAN`: each step's progress from the lockfile, like a change-request list.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cli::StatusFormat;
use crate::lockfile::{self, LockError, LockStore, Lockfile, StepStatus};
use crate::planner::saved::SavedPlan;
use crate::printer::{escape, Printer, Tone};
use crate::ExitStatus;

/// `status --format json`: its schema is `schemas/status.schema.json`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StatusDoc {
    /// One entry per step and domain, in time order.
    pub steps: Vec<StatusStep>,
}

/// One step on one domain.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StatusStep {
    /// Stable step id (a hash of what the step asks for).
    pub id: String,
    /// 1-based step number in the plan file.
    pub step: usize,
    /// When the step is due (RFC 3339); null when it runs as soon as apply starts.
    pub at: Option<DateTime<Utc>>,
    pub vm: String,
    pub uuid: String,
    /// What the step changes.
    pub what: String,
    pub status: StepStatus,
    /// When it started (RFC 3339).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended (RFC 3339).
    pub finished_at: Option<DateTime<Utc>>,
    pub message: String,
}

impl From<&Lockfile> for StatusDoc {
    fn from(lock: &Lockfile) -> Self {
        let mut lock = lock.clone();
        lock.sort();
        Self {
            steps: lock
                .steps
                .into_iter()
                .map(|r| StatusStep {
                    id: r.step_id,
                    step: r.step,
                    at: r.at,
                    vm: r.vm,
                    uuid: r.uuid,
                    what: r.what,
                    status: r.status,
                    started_at: r.started_at,
                    finished_at: r.finished_at,
                    message: r.message,
                })
                .collect(),
        }
    }
}

/// The JSON Schema of [`StatusDoc`], pretty-printed with a trailing newline.
#[must_use]
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(StatusDoc);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
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
    let plan_exists = plan.symlink_metadata().is_ok();
    let plan = if plan_exists {
        plan_file_of(plan)?
    } else {
        plan.to_path_buf()
    };
    let lock_path = lockfile::lock_path(&plan);
    let lock = match LockStore::read(&lock_path) {
        Ok(lock) => {
            if !plan_exists {
                printer.info(&format!(
                    "The plan file {} is gone; showing the progress its lockfile {} recorded.",
                    plan.display(),
                    lock_path.display()
                ));
            }
            lock
        }
        Err(LockError::Read { source, .. })
            if source.io_kind() == Some(std::io::ErrorKind::NotFound) =>
        {
            if !plan_exists {
                anyhow::bail!(
                    "{}: no such plan file, and no lockfile {} either",
                    plan.display(),
                    lock_path.display()
                );
            }
            let Some((_, file)) = super::common::load_plan(&plan, config, printer) else {
                return Ok(ExitStatus::Error);
            };
            printer.info(&format!(
                "No progress recorded for {}: `virtplan apply` has not run it ({} does not exist); every step is pending.",
                plan.display(),
                lock_path.display()
            ));
            never_applied(&file)
        }
        Err(e) => return Err(e.into()),
    };
    let doc = StatusDoc::from(&lock);
    let text = match format {
        StatusFormat::Json => {
            let mut text = serde_json::to_string_pretty(&doc)?;
            text.push('\n');
            text
        }
        StatusFormat::Human => human(&doc, printer),
    };
    printer.out(&text);
    Ok(ExitStatus::Success)
}

/// The progress of a plan that never ran: each step on each domain it names, pending. UUIDs
/// are unknown until `plan` or `apply` asks libvirt.
fn never_applied(file: &crate::plan_file::PlanFile) -> Lockfile {
    let mut lock = Lockfile::new(file.sha256.clone());
    for step in &file.steps {
        let a = &step.attributes;
        let keys: Vec<&str> = [
            ("power", a.power.is_some()),
            ("snapshot", a.snapshot.is_some()),
            ("max_memory", a.max_memory.is_some()),
            ("memory", a.memory.is_some()),
            ("max_vcpus", a.max_vcpus.is_some()),
            ("vcpus", a.vcpus.is_some()),
            ("clock", a.clock.is_some()),
            ("autostart", a.autostart.is_some()),
            ("title", a.title.is_some()),
            ("description", a.description.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        for target in &step.targets {
            lock.steps.push(lockfile::StepRecord::new(
                step.number,
                step.id(),
                target.name_or_uuid.clone(),
                "-",
                keys.join(", "),
                step.at.as_ref().map(|a| a.value),
                StepStatus::Pending,
            ));
        }
    }
    lock
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// One block per step: status, step, domain and time; then what, timings and message.
pub fn human(doc: &StatusDoc, printer: &Printer) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
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
            printer.paint(Tone::Heading, &escape(&s.vm)),
            s.at.map_or_else(
                || "apply start".to_owned(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
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
                    time(Some(a)),
                    time(Some(b))
                );
            }
            (Some(a), None) => {
                let _ = writeln!(out, "          started {}", time(Some(a)));
            }
            (None, Some(b)) => {
                let _ = writeln!(out, "          recorded {}", time(Some(b)));
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
        insta::assert_snapshot!(super::human(&doc, &Printer::plain()));
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
