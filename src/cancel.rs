//! Operator cancellations (`virtplan cancel`): an append-only side file beside the lockfile,
//! `<plan stem>.lock.cancel`, one JSON line per cancelled step.
//!
//! It is separate from the progress file on purpose: the executor owns the progress file (it
//! holds the executor lock and replaces the file atomically), while a cancel must work while an
//! executor runs. The side file is never renamed, so an `flock` on it is meaningful: `cancel`
//! appends under an exclusive lock, and the executor holds a shared lock from the moment it
//! checks a step until that step is recorded `running` ([`CancelLog::gate`]). So once `cancel`
//! returns, a step it cancelled either had already started (it says so) or never will.
//! A cancellation persists: later applies read the same file and skip the step. Running a
//! cancelled step after all is a reviewed edit of the step (which gives it a new id).

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One cancelled step, as appended by `virtplan cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRecord {
    /// The stable id of the cancelled step (every domain of it).
    pub step_id: String,
    /// 1-based step number when it was cancelled (informative: ids are what count).
    pub step: usize,
    /// Who cancelled it: `user@host`.
    pub by: String,
    /// When (RFC 3339).
    pub at: DateTime<Utc>,
}

impl CancelRecord {
    /// `cancelled by alice@admin1 at 2026-12-01 04:02:10 EST`.
    #[must_use]
    pub fn describe(&self, zone: Option<chrono_tz::Tz>) -> String {
        format!(
            "cancelled by {} at {} (virtplan cancel)",
            self.by,
            crate::render::show_time(self.at, zone)
        )
    }
}

/// Why the cancel file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("cannot use the cancel file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cancel file {} is corrupt at line {line} ({reason}); fix or remove that line (every line is one JSON record)", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// `plans/web.lock` -> `plans/web.lock.cancel`: it follows the lockfile wherever that lives.
#[must_use]
pub fn path_for(lock_path: &Path) -> PathBuf {
    let mut name = lock_path.as_os_str().to_owned();
    name.push(".cancel");
    PathBuf::from(name)
}

/// The cancel file of one plan.
#[derive(Debug, Clone)]
pub struct CancelLog {
    path: PathBuf,
}

/// Held while a step is checked and recorded `running`: no cancel can land in between.
#[derive(Debug)]
pub struct Gate {
    _file: File,
}

impl CancelLog {
    /// The cancel file beside the lockfile `lock_path`.
    #[must_use]
    pub fn for_lockfile(lock_path: &Path) -> Self {
        Self {
            path: path_for(lock_path),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CancelError {
        CancelError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Every record, oldest first; none when the file does not exist.
    ///
    /// # Errors
    /// Unreadable file, or a complete line that is not a record. A last line without its
    /// newline (a writer that died mid-append) is ignored.
    pub fn read(&self) -> Result<Vec<CancelRecord>, CancelError> {
        // Regular, bounded files only: a FIFO here must not hang `status` or an executor.
        let text = match crate::fsutil::read_own_text(&self.path, 64 << 20) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(std::io::Error::new(e.kind(), e.to_string()))),
        };
        parse(&self.path, &text)
    }

    /// The record cancelling `step_id`, if any.
    ///
    /// # Errors
    /// As [`CancelLog::read`].
    pub fn find(&self, step_id: &str) -> Result<Option<CancelRecord>, CancelError> {
        Ok(self.read()?.into_iter().find(|r| r.step_id == step_id))
    }

    /// Appends `records` under an exclusive lock; `then` runs while the lock is still held
    /// (to read which steps had already started when the cancel landed).
    ///
    /// # Errors
    /// The file cannot be opened, locked or written.
    pub fn append<T>(
        &self,
        records: &[CancelRecord],
        then: impl FnOnce() -> T,
    ) -> Result<T, CancelError> {
        let mut file = self.open()?;
        fs4::fs_std::FileExt::lock_exclusive(&file).map_err(|e| self.io(e))?;
        let mut text = String::new();
        for r in records {
            let line = serde_json::to_string(r).map_err(|e| self.io(std::io::Error::other(e)))?;
            text.push_str(&line);
            text.push('\n');
        }
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| self.io(e))?;
        let result = then();
        drop(file); // releases the lock
        Ok(result)
    }

    /// Takes the shared lock and checks `step_id`: `Ok((gate, None))` means it is not
    /// cancelled and cannot be until `gate` is dropped (after recording `running`).
    ///
    /// # Errors
    /// As [`CancelLog::read`]; a file that cannot be locked.
    pub fn gate(&self, step_id: &str) -> Result<(Gate, Option<CancelRecord>), CancelError> {
        // Created if missing: a cancel landing now must find the same file locked.
        let file = self.open()?;
        // fs4's flock, as `append` uses (std's own File::lock needs a newer Rust).
        fs4::fs_std::FileExt::lock_shared(&file).map_err(|e| self.io(e))?;
        let found = self.find(step_id)?;
        Ok((Gate { _file: file }, found))
    }

    /// Never through a symlink, and only a regular file (a FIFO would hang the read).
    fn open(&self) -> Result<File, CancelError> {
        crate::fsutil::open_append_nofollow(&self.path, 0o600)
            .map_err(|e| self.io(std::io::Error::new(e.kind(), e.to_string())))
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<CancelRecord>, CancelError> {
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| CancelError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// `user@host` of this process: `SUDO_USER` (who ran sudo) before `USER`/`LOGNAME`.
#[must_use]
pub fn who() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let user = match (env("SUDO_USER"), env("USER").or_else(|| env("LOGNAME"))) {
        (Some(sudo), Some(user)) if sudo != user => format!("{sudo} (as {user})"),
        (Some(sudo), _) => sudo,
        (None, Some(user)) => user,
        (None, None) => "unknown user".to_owned(),
    };
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> CancelRecord {
        CancelRecord {
            step_id: id.to_owned(),
            step: 1,
            by: "alice@admin1".to_owned(),
            at: DateTime::parse_from_rfc3339("2026-12-01T09:02:00Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn appended_records_read_back_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let log = CancelLog::for_lockfile(&dir.path().join("web.lock"));
        assert_eq!(log.path(), dir.path().join("web.lock.cancel"));
        assert!(log.read().unwrap().is_empty());
        let seen = log.append(&[record("s1"), record("s2")], || 7).unwrap();
        assert_eq!(seen, 7);
        log.append(&[record("s3")], || ()).unwrap();
        let mut text = std::fs::read_to_string(log.path()).unwrap();
        text.push_str("{\"step_id\":\"s4\",\"st");
        std::fs::write(log.path(), &text).unwrap();
        let ids: Vec<String> = log.read().unwrap().into_iter().map(|r| r.step_id).collect();
        assert_eq!(ids, ["s1", "s2", "s3"]);
        assert_eq!(log.find("s2").unwrap().unwrap().by, "alice@admin1");
        assert!(log.find("s9").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = CancelLog::for_lockfile(&dir.path().join("web.lock"));
        std::fs::write(log.path(), "not json\n").unwrap();
        let err = log.read().unwrap_err().to_string();
        assert!(err.contains("corrupt at line 1"), "{err}");
    }

    #[test]
    fn a_cancel_waits_for_a_step_being_recorded_running() {
        let dir = tempfile::tempdir().unwrap();
        let log = CancelLog::for_lockfile(&dir.path().join("web.lock"));
        log.append(&[record("other")], || ()).unwrap();
        let (gate, found) = log.gate("s1").unwrap();
        assert!(found.is_none());
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                log.append(&[record("s1")], || tx.send(()).unwrap())
                    .unwrap();
            })
        };
        // The cancel cannot land while the gate is held.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(gate);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        assert!(log.gate("s1").unwrap().1.is_some());
    }
}
