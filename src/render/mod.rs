//! Renderings of a [`crate::planner::Plan`] (human, JSON, Markdown) and of lockfile status.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// A time as the plan's readers wrote it: in the plan's zone when it has one, else UTC.
#[must_use]
pub fn show_time(t: DateTime<Utc>, zone: Option<Tz>) -> String {
    zone.map_or_else(
        || t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        |z| t.with_timezone(&z).format("%Y-%m-%d %H:%M:%S %Z").to_string(),
    )
}
