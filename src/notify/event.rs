//! The notification event: what every target receives, as JSON (its schema is
//! `schemas/notify-event.schema.json`), with a stable id receivers can deduplicate on.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::lockfile::StepStatus;

/// The version of the event document.
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// What happened.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// `apply` started running the plan.
    PlanStarted,
    /// A step was recorded `running` on a domain (before the first libvirt call).
    StepStarted,
    StepDone,
    StepFailed,
    StepMissed,
    StepSkipped,
    StepCancelled,
    /// The run ended; the event carries the summary.
    PlanFinished,
}

impl EventKind {
    pub const ALL: [Self; 8] = [
        Self::PlanStarted,
        Self::StepStarted,
        Self::StepDone,
        Self::StepFailed,
        Self::StepMissed,
        Self::StepSkipped,
        Self::StepCancelled,
        Self::PlanFinished,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlanStarted => "plan-started",
            Self::StepStarted => "step-started",
            Self::StepDone => "step-done",
            Self::StepFailed => "step-failed",
            Self::StepMissed => "step-missed",
            Self::StepSkipped => "step-skipped",
            Self::StepCancelled => "step-cancelled",
            Self::PlanFinished => "plan-finished",
        }
    }

    /// The event a step's record moving from `before` to `after` announces, if any.
    /// A resumed `running` step, or a reset to `pending`, announces nothing.
    #[must_use]
    pub fn of_transition(before: StepStatus, after: StepStatus) -> Option<Self> {
        if before == after {
            return None;
        }
        match after {
            StepStatus::Pending => None,
            StepStatus::Running => Some(Self::StepStarted),
            StepStatus::Done => Some(Self::StepDone),
            StepStatus::Failed => Some(Self::StepFailed),
            StepStatus::Missed => Some(Self::StepMissed),
            StepStatus::Skipped => Some(Self::StepSkipped),
            StepStatus::Cancelled => Some(Self::StepCancelled),
        }
    }

    /// Parses the kebab-case name.
    #[must_use]
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == word)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The plan an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PlanRef {
    pub name: String,
    /// The plan file as given to `apply`.
    pub file: String,
    /// SHA-256 of the plan file (hex).
    pub sha256: String,
}

/// Step counts by status at the end of a run (`plan-finished`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EventSummary {
    /// Steps on domains in the plan (a step on two domains counts twice).
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub missed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    /// Not run yet (their time has not come, or the run was interrupted before them).
    pub pending: usize,
}

impl EventSummary {
    /// Counts `statuses`.
    pub fn count(statuses: impl IntoIterator<Item = StepStatus>) -> Self {
        let mut s = Self::default();
        for status in statuses {
            s.total += 1;
            match status {
                StepStatus::Done => s.done += 1,
                StepStatus::Failed => s.failed += 1,
                StepStatus::Missed => s.missed += 1,
                StepStatus::Skipped => s.skipped += 1,
                StepStatus::Cancelled => s.cancelled += 1,
                StepStatus::Pending | StepStatus::Running => s.pending += 1,
            }
        }
        s
    }

    /// The run's outcome as a step status: `done` when every step is done, `failed` when any
    /// failed, was missed or skipped, else `cancelled` (interrupted) or `pending`.
    #[must_use]
    pub fn outcome(&self) -> StepStatus {
        if self.failed + self.missed + self.skipped > 0 {
            StepStatus::Failed
        } else if self.done == self.total {
            StepStatus::Done
        } else if self.cancelled > 0 {
            StepStatus::Cancelled
        } else {
            StepStatus::Pending
        }
    }
}

/// One notification. Every key is always present (null when it does not apply), so receivers
/// can rely on the shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "virtplan notification event")]
pub struct Event {
    /// Always 1.
    pub format_version: u32,
    pub event: EventKind,
    /// Stable id: the same event delivered twice (after a crash and resume) has the same id.
    pub id: String,
    pub plan: PlanRef,
    /// 1-based step number, as in `status`; null for plan events.
    pub step: Option<usize>,
    /// Domain name; null for plan events.
    pub vm: Option<String>,
    /// Domain UUID; null for plan events.
    pub uuid: Option<String>,
    /// libvirt URI of the step, credentials redacted; null for plan events.
    pub connection: Option<String>,
    /// When the step was due (RFC 3339); null for steps without a time and plan events.
    pub at: Option<DateTime<Utc>>,
    /// The step's status; for `plan-finished` the run's outcome (`done`, `failed`,
    /// `cancelled` when interrupted, `pending` when steps are left for later).
    pub status: Option<StepStatus>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub message: String,
    /// Step counts; only on `plan-finished`.
    pub summary: Option<EventSummary>,
}

/// What an event id is a hash of: serialized with serde, so renaming a Rust field cannot
/// silently change the ids receivers have stored.
#[derive(Serialize)]
struct IdentityKey<'a> {
    plan_file: &'a str,
    event: EventKind,
    step_id: Option<&'a str>,
    uuid: Option<&'a str>,
    /// The instant the event is about (a step's start or end, a run's start or end), so a
    /// step that fails in two runs raises two events, and one event re-sent keeps its id.
    instant: Option<DateTime<Utc>>,
}

/// `e` + 20 hex digits of SHA-256 over the identity.
#[must_use]
pub fn event_id(
    plan_file: &str,
    event: EventKind,
    step_id: Option<&str>,
    uuid: Option<&str>,
    instant: Option<DateTime<Utc>>,
) -> String {
    let key = IdentityKey {
        plan_file,
        event,
        step_id,
        uuid,
        instant,
    };
    let json = serde_json::to_string(&key).unwrap_or_default();
    let hex = crate::plan_file::sha256_hex(json.as_bytes());
    format!("e{}", &hex[..20])
}

impl Event {
    /// The one-line text of chat messages and mail subjects:
    /// `web-tier: step 3 web-01 failed` / `web-tier: plan finished (4 done, 1 failed)`.
    #[must_use]
    pub fn headline(&self) -> String {
        let name = &self.plan.name;
        match (self.event, self.step, &self.vm) {
            (EventKind::PlanStarted, ..) => format!("{name}: plan started"),
            (EventKind::PlanFinished, ..) => {
                let s = self.summary.clone().unwrap_or_default();
                let mut parts = vec![format!("{} done", s.done)];
                for (n, what) in [
                    (s.failed, "failed"),
                    (s.missed, "missed"),
                    (s.skipped, "skipped"),
                    (s.cancelled, "cancelled"),
                    (s.pending, "pending"),
                ] {
                    if n > 0 {
                        parts.push(format!("{n} {what}"));
                    }
                }
                format!(
                    "{name}: plan finished, {} ({})",
                    self.status.map_or("done", StepStatus::as_str),
                    parts.join(", ")
                )
            }
            (kind, step, vm) => {
                let word = match kind {
                    EventKind::StepStarted => "started",
                    EventKind::StepDone => "done",
                    EventKind::StepFailed => "failed",
                    EventKind::StepMissed => "missed",
                    EventKind::StepSkipped => "skipped",
                    _ => "cancelled",
                };
                format!(
                    "{name}: step {} {} {word}",
                    step.unwrap_or_default(),
                    vm.as_deref().unwrap_or("-")
                )
            }
        }
    }

    /// The headline plus the message, for chat and mail bodies.
    #[must_use]
    pub fn text(&self) -> String {
        if self.message.is_empty() {
            self.headline()
        } else {
            format!("{}: {}", self.headline(), self.message)
        }
    }
}

/// The event's JSON Schema, pretty-printed with a trailing newline.
#[must_use]
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Event);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Ids are data: a refactor that changes them breaks every receiver's deduplication.
    #[test]
    fn event_ids_are_pinned() {
        assert_eq!(
            event_id(
                "plans/web.yaml",
                EventKind::StepFailed,
                Some("s0123456789"),
                Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
                Some(t("2026-12-01T09:00:01Z")),
            ),
            "e1e8969e9b57efb098a1c"
        );
        assert_eq!(
            event_id(
                "plans/web.yaml",
                EventKind::PlanStarted,
                None,
                None,
                Some(t("2026-12-01T09:00:00Z")),
            ),
            "e03aa2327e7502a5c537f"
        );
    }

    #[test]
    fn transitions_announce_the_new_status_once() {
        use StepStatus as S;
        assert_eq!(
            EventKind::of_transition(S::Pending, S::Running),
            Some(EventKind::StepStarted)
        );
        assert_eq!(EventKind::of_transition(S::Running, S::Running), None);
        assert_eq!(EventKind::of_transition(S::Cancelled, S::Pending), None);
        assert_eq!(
            EventKind::of_transition(S::Running, S::Failed),
            Some(EventKind::StepFailed)
        );
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn summary_outcome() {
        use StepStatus as S;
        let s = EventSummary::count([S::Done, S::Done, S::Failed]);
        assert_eq!((s.total, s.done, s.failed), (3, 2, 1));
        assert_eq!(s.outcome(), S::Failed);
        assert_eq!(EventSummary::count([S::Done]).outcome(), S::Done);
        assert_eq!(
            EventSummary::count([S::Done, S::Cancelled]).outcome(),
            S::Cancelled
        );
    }
}
