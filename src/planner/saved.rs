//! Saved plans (`plan --out`): the plan file's text and hash plus the projected [`Plan`], so
//! `apply SAVED` runs exactly what was reviewed and can detect drift.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Plan;

/// Saved plans larger than this are refused unread.
const MAX_SAVED_BYTES: u64 = 256 << 20;

/// The marker key that tells a saved plan from a YAML plan file.
const KIND: &str = "virtplan-saved-plan";

/// The saved-plan format this build writes and reads. Format 2 carries the plan's policy
/// (grace, window, on_failure, parallelism, connections), so `apply SAVED` needs neither the
/// plan file nor virtplan.toml to run as reviewed; format 1 did not, and is refused.
/// Format 3 is written only when the plan paces domains (a step's `rollout`, or per-host
/// `max_parallel`): a virtplan that knows only format 2 would ignore those limits, so it must
/// refuse the file as "newer" instead; every other plan is still written as format 2.
pub const SAVED_FORMAT_VERSION: u32 = 3;

/// The oldest saved-plan format this build reads.
const OLDEST_READ_FORMAT: u32 = 2;

/// The fields every saved-plan format has.
#[derive(Deserialize)]
struct Header {
    format_version: u32,
    #[serde(default)]
    plan_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub kind: String,
    pub format_version: u32,
    /// Path of the plan file as given to `plan`.
    pub plan_file: String,
    /// The plan file's text as reviewed.
    pub plan_source: String,
    pub plan: Plan,
}

impl SavedPlan {
    #[must_use]
    pub fn new(plan: Plan, plan_source: String) -> Self {
        Self {
            kind: KIND.to_owned(),
            format_version: if plan.policy.host_caps.is_empty()
                && plan.steps.iter().all(|s| s.rollout.is_none())
            {
                OLDEST_READ_FORMAT
            } else {
                SAVED_FORMAT_VERSION
            },
            plan_file: plan.meta.file.clone(),
            plan_source,
            plan,
        }
    }

    /// Writes the saved plan atomically (temporary file in the same folder, fsync, rename).
    ///
    /// Mode 0600 like the lockfile: a saved plan names hosts and domains, and is written
    /// without following a symlink at `path`.
    pub fn write(&self, path: &Path) -> Result<(), crate::fsutil::FileError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| crate::fsutil::FileError::Io(std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(path, text.as_bytes(), 0o600)
    }

    /// Reads a saved plan; `Ok(None)` when the file is not one (a YAML plan file).
    ///
    /// A file that cannot be read, or is not JSON, is left to the plan-file loader, which
    /// reports it with its location and a fix.
    pub fn read(path: &Path) -> anyhow::Result<Option<Self>> {
        // Regular, bounded files only (a FIFO must not hang `apply`); anything else is left
        // to the plan-file loader, which says what is wrong with it.
        let Ok(bytes) = crate::fsutil::read_regular(path, MAX_SAVED_BYTES) else {
            return Ok(None);
        };
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Ok(None);
        }
        let Ok(text) = String::from_utf8(bytes) else {
            return Ok(None);
        };
        if !text.contains(KIND) {
            return Ok(None);
        }
        let unreadable = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "{} looks like a saved plan but cannot be read: {e}; run `virtplan plan PLAN --out {}` again",
                path.display(),
                path.display()
            )
        };
        // The version first: an older or newer format is refused for what it is, not for
        // the fields it lacks.
        let header: Header = serde_json::from_str(&text).map_err(|e| unreadable(&e))?;
        if header.format_version > SAVED_FORMAT_VERSION {
            anyhow::bail!(
                "{} was saved by a newer virtplan (format {}); upgrade virtplan or re-run `virtplan plan`",
                path.display(),
                header.format_version
            );
        }
        if header.format_version < OLDEST_READ_FORMAT {
            anyhow::bail!(
                "{} is a saved plan of format {}, from a virtplan that did not record the plan's policy (grace, window, on_failure, parallelism) in it, so it cannot run as reviewed; nothing was applied: run `virtplan plan {} --out {}` again and review it",
                path.display(),
                header.format_version,
                if header.plan_file.is_empty() { "PLAN" } else { &header.plan_file },
                path.display()
            );
        }
        let saved: Self = serde_json::from_str(&text).map_err(|e| unreadable(&e))?;
        Ok(Some(saved))
    }
}
