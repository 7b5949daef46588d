//! A debounced watcher of one folder. Editors save by writing a temporary file and renaming it
//! over the original, and a `git pull` touches many files at once: the reconciler acts only
//! after the folder has been quiet for a moment, and then re-reads the files themselves rather
//! than trusting the individual events.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// How long the folder must stay quiet before its files are read again.
pub const QUIET: Duration = Duration::from_millis(300);

type Events = notify::Result<notify::Event>;

/// Why [`Debouncer::wait`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Nothing to do yet.
    Tick,
    /// Relevant files changed and the folder has been quiet since: read them again.
    Settled,
    /// The watcher reported an error (a rescan is scheduled as well).
    Failed(String),
}

/// Watches a folder (not its subfolders) for changes to the files `relevant` accepts.
pub struct Debouncer {
    _watcher: RecommendedWatcher,
    rx: Receiver<Events>,
    /// Held so the channel never disconnects, even if the watcher's thread ends.
    _tx: Sender<Events>,
    relevant: Box<dyn Fn(&Path) -> bool + Send>,
    quiet: Duration,
    due: Option<Instant>,
}

impl Debouncer {
    /// Starts watching `dir`.
    ///
    /// # Errors
    /// The folder cannot be watched (missing, or out of inotify watches).
    pub fn watch(
        dir: &Path,
        quiet: Duration,
        relevant: impl Fn(&Path) -> bool + Send + 'static,
    ) -> notify::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(tx.clone())?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(Self {
            _watcher: watcher,
            rx,
            _tx: tx,
            relevant: Box::new(relevant),
            quiet,
            due: None,
        })
    }

    /// Waits at most `tick` for events. Returns [`Wake::Settled`] once relevant changes were
    /// followed by the quiet period without further relevant changes.
    pub fn wait(&mut self, tick: Duration) -> Wake {
        let timeout = self.due.map_or(tick, |due| {
            due.saturating_duration_since(Instant::now()).min(tick)
        });
        let mut failed = None;
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(event)) => {
                if event.need_rescan() || event.paths.iter().any(|p| (self.relevant)(p)) {
                    self.due = Some(Instant::now() + self.quiet);
                }
            }
            Ok(Err(e)) => {
                self.due = Some(Instant::now() + self.quiet);
                failed = Some(e.to_string());
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        if let Some(message) = failed {
            return Wake::Failed(message);
        }
        if self.due.is_some_and(|due| Instant::now() >= due) {
            self.due = None;
            return Wake::Settled;
        }
        Wake::Tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to `limit` for a settled wake, counting them.
    fn settle(d: &mut Debouncer, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        let mut settled = 0;
        while Instant::now() < end {
            if d.wait(Duration::from_millis(20)) == Wake::Settled {
                settled += 1;
            }
        }
        settled
    }

    #[test]
    fn a_write_rename_burst_settles_once_and_other_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Debouncer::watch(dir.path(), Duration::from_millis(150), |p| {
            p.extension().is_some_and(|e| e == "yaml")
        })
        .unwrap();
        // An editor's save: temporary file, then rename over the plan, twice in a row.
        for body in ["a", "b"] {
            std::fs::write(dir.path().join(".plan.yaml.tmp"), body).unwrap();
            std::fs::rename(
                dir.path().join(".plan.yaml.tmp"),
                dir.path().join("plan.yaml"),
            )
            .unwrap();
        }
        assert_eq!(settle(&mut d, Duration::from_millis(600)), 1);
        // Lockfile writes beside the plans do not wake anyone.
        std::fs::write(dir.path().join("plan.lock"), "x").unwrap();
        assert_eq!(settle(&mut d, Duration::from_millis(400)), 0);
    }
}
