//! Notifications: events at every step boundary, sent to webhook, email and command targets.
//!
//! [`target`] is the checked configuration (from `notify:` in a plan or `[[notify]]` in
//! virtplan.toml), [`event`] the JSON every target receives, [`deliver`] one attempt per target,
//! and [`queue`] the [`Notifier`]: it records each event in the lockfile with the step change it
//! announces (see [`crate::lockfile::Observer`]) and delivers it off the executor's path.
//! Webhook URLs and SMTP passwords are [`secret`]s: they never print.

pub mod deliver;
pub mod event;
pub mod queue;
pub mod secret;
pub mod target;

pub use event::{Event, EventKind};
pub use queue::{Notifier, Retry, RunInfo};
pub use target::Target;

use std::fmt::Write as _;

use crate::plan_file::PlanFile;
use target::TargetKind;

/// The plan file's text with every webhook URL's secret part masked (for saved plans).
#[must_use]
pub fn redact_source(file: &PlanFile) -> String {
    file.notify
        .iter()
        .fold(file.source.clone(), |text, t| match &t.kind {
            TargetKind::Webhook { url, .. } => url.scrub(&text),
            _ => text,
        })
}

/// `Notifications:` and one redacted line per target, for `plan` and `apply`; empty without
/// targets.
#[must_use]
pub fn describe_targets(targets: &[Target]) -> String {
    if targets.is_empty() {
        return String::new();
    }
    let mut text = format!("\nNotifications ({} target(s)):\n", targets.len());
    for t in targets {
        let _ = writeln!(text, "  - {t}");
    }
    text
}
