//! `virtplan ls [DIR|PLAN...]`: every plan, its next step, counts per status, who holds it and
//! where its lockfile is. Offline: no libvirt call.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::cli::StatusFormat;
use crate::clock::Clock;
use crate::lockfile::StepStatus;
use crate::overview::{self, LsDoc, PlanState, PlanSummary};
use crate::printer::{Printer, Tone};
use crate::render::when;
use crate::ExitStatus;

/// The `ls --format json` format version.
pub const LS_FORMAT_VERSION: u32 = 1;

pub fn run(
    paths: &[PathBuf],
    config: Option<&Path>,
    format: StatusFormat,
    clock: &dyn Clock,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let default = [PathBuf::from(".")];
    let paths = if paths.is_empty() {
        &default[..]
    } else {
        paths
    };
    let plans = overview::plans_in(paths, config).map_err(anyhow::Error::msg)?;
    let now = clock.now();
    let doc = LsDoc {
        format_version: LS_FORMAT_VERSION,
        now,
        plans: plans
            .iter()
            .map(|p| overview::summarize(p, config, now))
            .collect(),
    };
    let text = match format {
        StatusFormat::Json => {
            let mut text = serde_json::to_string_pretty(&doc)?;
            text.push('\n');
            text
        }
        StatusFormat::Human => human(&doc, printer),
    };
    printer.out(&text);
    if doc.plans.is_empty() {
        printer.info(&format!(
            "No plans (*.yaml) or lockfiles in {}.",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(ExitStatus::Success)
}

/// One block per plan: heading, next step, counts, executor, lockfile.
pub fn human(doc: &LsDoc, printer: &Printer) -> String {
    let mut out = String::new();
    for (i, p) in doc.plans.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        plan_block(&mut out, p, doc.now, printer);
    }
    out
}

fn plan_block(out: &mut String, p: &PlanSummary, now: DateTime<Utc>, printer: &Printer) {
    let zone: Option<Tz> = p.timezone.as_deref().and_then(|z| z.parse().ok());
    let state = match p.state {
        PlanState::Ok => String::new(),
        PlanState::Invalid => format!("  {}", printer.paint(Tone::Warning, "does not validate")),
        PlanState::Removed => format!(
            "  {}",
            printer.paint(Tone::Dim, "plan removed: only its lockfile remains")
        ),
    };
    let _ = writeln!(
        out,
        "{} ({}){state}",
        printer.paint(Tone::Heading, &p.plan.display().to_string()),
        p.name
    );
    if let Some(problem) = &p.problem {
        let _ = writeln!(out, "  problem:  {problem}");
    }
    match &p.next {
        Some(n) => {
            let when_text = match n.at {
                Some(at) => format!(
                    "at {} ({})",
                    when::near(at, now, zone),
                    when::relative(at, now)
                ),
                None => "when apply starts".to_owned(),
            };
            let overdue = if n.overdue {
                format!(
                    " {}",
                    printer.paint(Tone::Removed, "overdue: its grace has passed")
                )
            } else {
                String::new()
            };
            let what = if n.what.is_empty() {
                String::new()
            } else {
                format!(" {}", n.what)
            };
            let _ = writeln!(
                out,
                "  next:     step {} {}{what} {when_text}{overdue}",
                n.step,
                n.vms.join(", ")
            );
        }
        None => {
            let _ = writeln!(out, "  next:     nothing pending");
        }
    }
    let counts: Vec<String> = p
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| {
            let tone = match s {
                StepStatus::Done => Tone::Added,
                StepStatus::Failed | StepStatus::Missed => Tone::Removed,
                StepStatus::Pending => Tone::Dim,
                _ => Tone::Changed,
            };
            printer.paint(tone, &format!("{n} {s}"))
        })
        .collect();
    let _ = writeln!(
        out,
        "  steps:    {}",
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts.join(", ")
        }
    );
    let executor = p.holder.as_ref().map_or_else(
        || "none".to_owned(),
        |h| {
            let since = h
                .since
                .map(|t| format!(" since {}", when::near(t, now, zone)))
                .unwrap_or_default();
            format!("pid {} on {}{since}", h.pid, h.host)
        },
    );
    let _ = writeln!(out, "  executor: {executor}");
    let lockfile = if p.lockfile_exists {
        p.lockfile.display().to_string()
    } else {
        format!("{} (not created yet: never applied)", p.lockfile.display())
    };
    let _ = writeln!(out, "  lockfile: {lockfile}");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::overview::{Holder, NextStep};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn counts(pairs: &[(StepStatus, usize)]) -> BTreeMap<StepStatus, usize> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn ls_human() {
        let now = t("2026-12-01T05:52:48Z");
        let doc = LsDoc {
            format_version: 1,
            now,
            plans: vec![
                PlanSummary {
                    plan: PathBuf::from("plans/web.yaml"),
                    name: "web-tier".into(),
                    state: PlanState::Ok,
                    problem: None,
                    timezone: Some("America/Toronto".into()),
                    lockfile: PathBuf::from("/var/lib/virtplan/web-1a2b3c4d.lock"),
                    lockfile_exists: true,
                    holder: Some(Holder {
                        pid: 4242,
                        host: "admin1".into(),
                        since: Some(t("2026-12-01T05:50:00Z")),
                    }),
                    next: Some(NextStep {
                        step: 3,
                        vms: vec!["web-01".into()],
                        what: "memory".into(),
                        at: Some(t("2026-12-01T09:05:00Z")),
                        in_seconds: Some(11_532),
                        overdue: false,
                    }),
                    counts: counts(&[
                        (StepStatus::Pending, 3),
                        (StepStatus::Done, 2),
                        (StepStatus::Cancelled, 1),
                    ]),
                },
                PlanSummary {
                    plan: PathBuf::from("plans/db.yaml"),
                    name: "db".into(),
                    state: PlanState::Ok,
                    problem: None,
                    timezone: None,
                    lockfile: PathBuf::from("plans/db.lock"),
                    lockfile_exists: false,
                    holder: None,
                    next: Some(NextStep {
                        step: 1,
                        vms: vec!["db-01".into(), "db-02".into()],
                        what: "power".into(),
                        at: Some(t("2026-12-02T04:00:00Z")),
                        in_seconds: Some(79_632),
                        overdue: false,
                    }),
                    counts: counts(&[(StepStatus::Pending, 2)]),
                },
                PlanSummary {
                    plan: PathBuf::from("plans/old.yaml"),
                    name: "old".into(),
                    state: PlanState::Removed,
                    problem: None,
                    timezone: None,
                    lockfile: PathBuf::from("plans/old.lock"),
                    lockfile_exists: true,
                    holder: None,
                    next: None,
                    counts: counts(&[(StepStatus::Done, 4), (StepStatus::Missed, 1)]),
                },
            ],
        };
        insta::assert_snapshot!(human(&doc, &Printer::plain()));
    }

    #[test]
    fn checked_in_ls_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/ls.schema.json");
        let current = overview::ls_schema();
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::write(path, &current).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == current,
            "schemas/ls.schema.json is out of date; regenerate it with `UPDATE_SCHEMAS=1 cargo test --lib checked_in_ls_schema_is_current`"
        );
    }
}
