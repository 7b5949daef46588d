//! Plans given together (`plan A B`, the plans of one `watch` folder) must not change one
//! domain at overlapping times: two executors would power it off and hot-plug it in the same
//! second. Each step occupies `[at, at + grace]` (bounded by the window); a step without `at`
//! runs whenever its apply starts, so it occupies its whole window, or all time.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{ChangeAction, Plan, PlanProblem};
use crate::plan_file::time::show_time;
use crate::plan_file::PlanFile;

/// When one step of one plan may run on one domain.
struct Slot<'a> {
    file: &'a PlanFile,
    step: usize,
    vm: &'a str,
    key: (&'a str, &'a str),
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    timed: bool,
}

fn slots<'a>(file: &'a PlanFile, plan: &'a Plan) -> Vec<Slot<'a>> {
    plan.steps
        .iter()
        .filter(|s| !s.done)
        // Only steps that change something (or reboot, or always restore) can collide.
        .filter(|s| {
            !s.actions.is_empty()
                || plan.changes.iter().any(|c| {
                    c.step_id == s.step_id
                        && c.uuid == s.domain.uuid
                        && c.action == ChangeAction::Change
                })
        })
        .map(|s| {
            let (start, end) = span(s.at, file.grace, file.window);
            Slot {
                file,
                step: s.step,
                vm: &s.domain.name,
                key: (s.connection.expose(), s.domain.uuid.as_str()),
                start,
                end,
                timed: s.at.is_some(),
            }
        })
        .collect()
}

fn span(
    at: Option<DateTime<Utc>>,
    grace: Duration,
    window: Option<crate::plan_file::Window>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    match at {
        Some(at) => {
            let end = crate::clock::later(at, grace);
            (at, window.map_or(end, |w| end.min(w.end)))
        }
        None => window.map_or((DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC), |w| {
            (w.start, w.end)
        }),
    }
}

fn describe(slot: &Slot<'_>) -> String {
    if slot.timed {
        format!(
            "between {} and {}",
            show_time(slot.start, slot.file.timezone),
            show_time(slot.end, slot.file.timezone)
        )
    } else if slot.start == DateTime::<Utc>::MIN_UTC {
        "whenever its apply starts (it has no `at`)".to_owned()
    } else {
        format!(
            "whenever its apply starts in its window ({} to {})",
            show_time(slot.start, slot.file.timezone),
            show_time(slot.end, slot.file.timezone)
        )
    }
}

/// Every pair of steps of different plans that may change one domain at the same time,
/// located at the later plan's step.
#[must_use]
pub fn overlaps(plans: &[(&PlanFile, &Plan)]) -> Vec<PlanProblem> {
    // One plan alone makes no pair (`plan` of one file need not gather its steps' times).
    if plans.len() < 2 {
        return Vec::new();
    }
    let all: Vec<Vec<Slot<'_>>> = plans.iter().map(|(f, p)| slots(f, p)).collect();
    let mut problems = Vec::new();
    for (i, earlier) in all.iter().enumerate() {
        for later in &all[i + 1..] {
            for b in later {
                let Some(a) = earlier
                    .iter()
                    .find(|a| a.key == b.key && a.start <= b.end && b.start <= a.end)
                else {
                    continue;
                };
                let step = b.file.steps.iter().find(|s| s.number == b.step);
                let pos = step
                    .and_then(|s| s.at.as_ref().map(|at| at.pos))
                    .or(step.map(|s| s.pos))
                    .unwrap_or(crate::plan_file::Pos::new(1, 1));
                problems.push(PlanProblem {
                    file: b.file.path.display().to_string(),
                    pos,
                    step: b.step,
                    vm: b.vm.to_owned(),
                    message: format!(
                        "changes {} {}, while step {} of {} changes it {}: two plans would change one domain at the same time",
                        b.vm,
                        describe(b),
                        a.step,
                        a.file.path.display(),
                        describe(a),
                    ),
                    help: "move one of the steps so that their times plus grace do not overlap, or merge the two plans into one".to_owned(),
                });
            }
        }
    }
    problems
}
