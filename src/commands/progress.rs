//! What `apply` says while it runs: on a terminal one live line, redrawn in place, saying what
//! runs next and when ("next: step 3 web-01 memory at 04:05 EST, in 4m12s"); without one, a
//! plain line each time the next step changes; a result line per step either way. `-q` keeps
//! only errors; every time is in the plan's zone with its abbreviation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono_tz::Tz;

use crate::cancel::CancelLog;
use crate::clock::Clock;
use crate::executor::Outcome;
use crate::lockfile::{LockStore, StepStatus};
use crate::overview;
use crate::printer::{Printer, Tone, Verbosity};
use crate::render::when;

/// The progress printer of one apply.
pub struct Progress<'a> {
    printer: &'a Printer,
    clock: &'a dyn Clock,
    zone: Option<Tz>,
    /// Redraw one line in place (stderr is a terminal).
    live: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A live line is on screen.
    drawn: bool,
    /// The last "next" line printed (plain mode prints only changes).
    last: Option<String>,
}

impl<'a> Progress<'a> {
    #[must_use]
    pub fn new(printer: &'a Printer, clock: &'a dyn Clock, zone: Option<Tz>) -> Self {
        Self {
            printer,
            clock,
            zone,
            live: printer.stderr_is_terminal() && printer.verbosity() > Verbosity::Quiet,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One result line per step: `04:05:00.012 EST step 3 web-01: done - message`.
    pub fn outcome(&self, o: &Outcome) {
        if o.earlier || self.printer.verbosity() == Verbosity::Quiet {
            return;
        }
        let tone = match o.status {
            StepStatus::Done => Tone::Added,
            StepStatus::Failed | StepStatus::Missed => Tone::Removed,
            _ => Tone::Changed,
        };
        let mut line = format!(
            "{} step {} {}: {}",
            when::stamp(self.clock.now(), self.zone),
            o.step,
            crate::text::escape(&o.vm),
            self.printer.paint_err(tone, o.status.as_str())
        );
        if !o.message.is_empty() {
            line.push_str(" - ");
            line.push_str(&crate::text::escape(&o.message));
        }
        let mut state = self.lock();
        if state.drawn {
            self.printer.err_raw("\r\x1b[2K");
            state.drawn = false;
        }
        self.printer.err_line(&line);
    }

    /// The line saying what runs next (or now), from the recorded progress.
    fn next_line(&self, store: &LockStore, cancels: &CancelLog) -> Option<String> {
        let now = self.clock.now();
        let lock = store.snapshot();
        if let Some(r) = lock.steps.iter().find(|r| r.status == StepStatus::Running) {
            let since = r
                .started_at
                .map(|t| format!(", started {}", when::relative(t, now)))
                .unwrap_or_default();
            return Some(format!(
                "running: step {} {} {}{since}",
                r.step,
                crate::text::escape(&r.vm),
                crate::text::escape(&r.what)
            ));
        }
        let cancelled = cancels.read().unwrap_or_default();
        let rows = overview::rows(None, Some(&lock), &cancelled, self.zone);
        let next = rows
            .iter()
            .filter(|r| r.status == StepStatus::Pending)
            .min_by_key(|r| (r.at, r.step))?;
        let vms: Vec<String> = rows
            .iter()
            .filter(|r| r.id == next.id && r.status == StepStatus::Pending)
            .map(|r| crate::text::escape(&r.vm).into_owned())
            .collect();
        let at = next.at.map_or_else(
            || "now".to_owned(),
            |at| {
                format!(
                    "at {}, {}",
                    when::near(at, now, self.zone),
                    when::relative(at, now)
                )
            },
        );
        Some(format!(
            "next: step {} {} {} {at}",
            next.step,
            vms.join(", "),
            crate::text::escape(&next.what)
        ))
    }

    /// Shows what runs next: redrawn on a terminal; printed when it changes otherwise.
    pub fn tick(&self, store: &LockStore, cancels: &CancelLog) {
        if self.printer.verbosity() == Verbosity::Quiet {
            return;
        }
        let Some(line) = self.next_line(store, cancels) else {
            return;
        };
        let mut state = self.lock();
        if self.live {
            let width = 200;
            let shown: String = line.chars().take(width).collect();
            self.printer.err_raw(&format!(
                "\r\x1b[2K{}",
                self.printer.paint_err(Tone::Dim, &shown)
            ));
            state.drawn = true;
        } else {
            // Plain lines: only when what is next changes, not every second ("in 4m11s").
            let key = line.split(" at ").next().unwrap_or(&line).to_owned();
            if state.last.as_deref() != Some(key.as_str()) {
                self.printer.err_line(&line);
                state.last = Some(key);
            }
        }
    }

    /// Clears the live line.
    pub fn finish(&self) {
        let mut state = self.lock();
        if state.drawn {
            self.printer.err_raw("\r\x1b[2K");
            state.drawn = false;
        }
    }

    /// Ticks until `done` is set (call from a scoped thread beside the executor).
    pub fn run(&self, store: &LockStore, done: &AtomicBool) {
        let cancels = CancelLog::for_lockfile(store.path());
        while !done.load(Ordering::SeqCst) {
            self.tick(store, &cancels);
            self.clock.sleep(Duration::from_millis(250));
        }
        self.finish();
    }
}
