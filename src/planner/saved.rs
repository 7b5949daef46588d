//! Saved plans (`plan --out`): the plan file's text and hash plus the projected [`Plan`], so
//! `apply SAVED` runs exactly what was reviewed and can detect drift.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Plan, FORMAT_VERSION};

/// Saved plans larger than this are refused unread.
const MAX_SAVED_BYTES: u64 = 256 << 20;

/// The marker key that tells a saved plan from a YAML plan file.
const KIND: &str = "virtplan-saved-plan";

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
            format_version: FORMAT_VERSION,
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
        let saved: Self = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} looks like a saved plan but cannot be read: {e}; run `virtplan plan PLAN --out {}` again",
                path.display(),
                path.display()
            )
        })?;
        if saved.format_version > FORMAT_VERSION {
            anyhow::bail!(
                "{} was saved by a newer virtplan (format {}); upgrade virtplan or re-run `virtplan plan`",
                path.display(),
                saved.format_version
            );
        }
        Ok(Some(saved))
    }
}
