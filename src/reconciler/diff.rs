//! What an edit changes: a unified diff of the plan file, and which projected changes appear
//! or disappear.

use std::collections::BTreeSet;

use similar::{ChangeTag, TextDiff};

use crate::planner::{Change, ChangeAction, Plan};
use crate::render::show_time;

/// A unified diff of two versions of a plan file (`a/<name>` → `b/<name>`).
#[must_use]
pub fn plan_file(name: &str, old: &str, new: &str) -> String {
    TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(2)
        .header(&format!("a/{name}"), &format!("b/{name}"))
        .to_string()
}

/// One line per projected change that is new (`+`) or gone (`-`) between two plans. Changes
/// are compared as people read them (time, step number, domain, attribute, values, action), so
/// a moved step shows as one line out and one line in.
#[must_use]
pub fn changes(old: Option<&Plan>, new: &Plan) -> Vec<String> {
    let zone = new
        .meta
        .timezone
        .as_deref()
        .and_then(|z| z.parse::<chrono_tz::Tz>().ok());
    let lines = |plan: &Plan| -> Vec<String> {
        plan.changes
            .iter()
            .map(|c| line(c, zone))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let before = old.map(lines).unwrap_or_default();
    let after = lines(new);
    let removed = before.iter().filter(|l| !after.contains(l));
    let added = after.iter().filter(|l| !before.contains(l));
    removed
        .map(|l| format!("- {l}"))
        .chain(added.map(|l| format!("+ {l}")))
        .collect()
}

/// Summary counts for a log line: `3 change(s), 1 no-op, 2 done`.
#[must_use]
pub fn counts(plan: &Plan) -> String {
    let s = plan.summary;
    format!(
        "{} step(s): {} change(s), {} no-op, {} done",
        plan.steps.len(),
        s.change,
        s.noop,
        s.done
    )
}

fn line(c: &Change, zone: Option<chrono_tz::Tz>) -> String {
    let when =
        c.at.map_or_else(|| "at start".to_owned(), |t| show_time(t, zone));
    let value = match c.action {
        ChangeAction::Change => format!("{} → {}", c.before, c.after),
        ChangeAction::Noop => format!("{} (unchanged)", c.after),
        ChangeAction::Done => format!("{} (done)", c.after),
    };
    format!("{when} {} {} {value}", c.vm, c.attribute)
}

/// Lines of a unified diff, each marked for colouring.
pub fn tagged(diff: &str) -> impl Iterator<Item = (Option<ChangeTag>, &str)> {
    diff.lines().map(|l| {
        let tag = if l.starts_with("+++") || l.starts_with("---") {
            None
        } else if l.starts_with('+') {
            Some(ChangeTag::Insert)
        } else if l.starts_with('-') {
            Some(ChangeTag::Delete)
        } else {
            None
        };
        (tag, l)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_file_diff_is_unified_with_names() {
        let d = plan_file("web.yaml", "a\nb\nc\n", "a\nB\nc\n");
        assert!(d.contains("--- a/web.yaml"), "{d}");
        assert!(d.contains("+++ b/web.yaml"), "{d}");
        assert!(d.contains("-b\n+B"), "{d}");
        let tags: Vec<_> = tagged(&d).filter_map(|(t, _)| t).collect();
        assert_eq!(tags, [ChangeTag::Delete, ChangeTag::Insert]);
    }
}
