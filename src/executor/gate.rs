//! `check`: the gate after a step's changes. Every condition must hold within the timeout,
//! polled every interval through the [`Clock`]; each attempt's outcome goes into the
//! lockfile message as it happens, so `status` shows a check in progress.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use wait_timeout::ChildExt as _;

use crate::clock::Clock;
use crate::hypervisor::Hypervisor;
use crate::plan_file::units::format_duration;
use crate::plan_file::CheckSpec;
use crate::planner::PlannedStep;
use crate::state::PowerState;

/// Attempts kept in full in a message; earlier ones are counted.
const KEPT_ATTEMPTS: usize = 5;

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verdict {
    pub passed: bool,
    /// `check passed on attempt 3 after 10s (1: state is shutoff, want running; ...)`.
    pub message: String,
}

/// One attempt's outcome, for the message.
fn attempt_line(n: usize, at: DateTime<Utc>, start: DateTime<Utc>, outcome: &str) -> String {
    let after = (at - start).to_std().unwrap_or(Duration::ZERO);
    format!("#{n} +{}: {outcome}", format_duration_short(after))
}

fn format_duration_short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return "0s".to_owned();
    }
    format_duration(Duration::from_secs(d.as_secs()))
}

/// The attempts, the last [`KEPT_ATTEMPTS`] in full.
fn summary(lines: &[String]) -> String {
    let skip = lines.len().saturating_sub(KEPT_ATTEMPTS);
    let kept = lines[skip..].join("; ");
    if skip > 0 {
        format!("{skip} earlier attempts failed; {kept}")
    } else {
        kept
    }
}

/// What a check runs against: the step's domain and connection, and where progress goes.
pub(super) struct Gate<'a> {
    pub step: &'a PlannedStep,
    pub check: &'a CheckSpec,
    pub clock: &'a dyn Clock,
    /// Records an attempt's outcome (the lockfile message); errors are the caller's to handle.
    pub progress: &'a dyn Fn(&str),
    /// Whether the run is being stopped (a signal): the check gives up early.
    pub stopping: &'a dyn Fn() -> bool,
}

impl Gate<'_> {
    /// Polls until every condition holds, the timeout passes, or the run is stopped.
    pub fn run(&self, hv: &dyn Fn() -> Option<std::sync::Arc<dyn Hypervisor>>) -> Verdict {
        let start = self.clock.now();
        let deadline = crate::clock::later(start, self.check.timeout);
        let mut lines = Vec::new();
        for n in 1.. {
            let outcome = match hv() {
                Some(hv) => self.attempt(hv.as_ref(), deadline),
                None => Err("no connection to libvirt".to_owned()),
            };
            let now = self.clock.now();
            match outcome {
                Ok(()) => {
                    lines.push(attempt_line(n, now, start, "passed"));
                    return Verdict {
                        passed: true,
                        message: format!("check passed on attempt {n} ({})", summary(&lines)),
                    };
                }
                Err(why) => lines.push(attempt_line(n, now, start, &why)),
            }
            (self.progress)(&format!("check running: {}", summary(&lines)));
            if now >= deadline || (self.stopping)() {
                break;
            }
            let left = (deadline - now).to_std().unwrap_or(Duration::ZERO);
            self.clock.sleep(self.check.interval.min(left));
        }
        let why = if (self.stopping)() && self.clock.now() < deadline {
            "interrupted"
        } else {
            "timed out"
        };
        Verdict {
            passed: false,
            message: format!(
                "check {why} after {} attempts within {}: {} ({})",
                lines.len(),
                format_duration(self.check.timeout),
                self.check.describe(),
                summary(&lines)
            ),
        }
    }

    /// One attempt: every condition, in order; the first that fails says why.
    fn attempt(&self, hv: &dyn Hypervisor, deadline: DateTime<Utc>) -> Result<(), String> {
        let uuid = &self.step.domain.uuid;
        if let Some(want) = self.check.state {
            let power = hv
                .observe(uuid, false)
                .map_err(|e| format!("state unreadable: {e}"))?
                .power;
            if !want.satisfied_by(power) {
                return Err(format!("state is {power}, want {want}"));
            }
        }
        if self.check.guest_agent {
            let power = hv.observe(uuid, false).map(|s| s.power);
            if power.as_ref().is_ok_and(|p| *p != PowerState::Running) {
                return Err(format!(
                    "guest agent: the domain is {}",
                    power.map_or_else(|e| e.to_string(), |p| p.to_string())
                ));
            }
            // Each ping waits at most one interval, so a silent agent cannot outlast the check.
            let wait = self.check.interval.max(Duration::from_secs(1));
            hv.agent_ping(uuid, wait)
                .map_err(|e| format!("guest agent: {}", one_line(&e.message)))?;
        }
        if let Some(command) = &self.check.command {
            self.command(command, deadline)?;
        }
        Ok(())
    }

    /// Runs the check command with `sh -c`; it may run until the check's deadline.
    fn command(&self, command: &str, deadline: DateTime<Utc>) -> Result<(), String> {
        let step = self.step;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("VIRTPLAN_VM", &step.domain.name)
            .env("VIRTPLAN_UUID", &step.domain.uuid)
            .env("VIRTPLAN_CONNECTION", step.connection.without_password())
            .env("VIRTPLAN_STEP", step.step.to_string())
            .env("VIRTPLAN_PLAN", &step.plan_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so a timed-out command is killed with its children
            // (`sh -c 'curl ...'` leaves curl holding the pipes otherwise).
            .process_group(0)
            .spawn()
            .map_err(|e| format!("command could not start: {e}"))?;
        // Read stderr on a thread so a chatty command cannot fill the pipe and block.
        let stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = stderr {
                let _ = pipe.by_ref().take(64 * 1024).read_to_end(&mut text);
                // Drain the rest so the command never blocks on a full pipe.
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            }
            String::from_utf8_lossy(&text).into_owned()
        });
        // The command runs in real time: its budget is what is left of the check at its start,
        // waited for in slices of at most a second (a slice that times out has fully passed),
        // so a signal stops it soon.
        let budget = (deadline - self.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let mut waited = Duration::ZERO;
        let status = loop {
            let left = budget.saturating_sub(waited);
            if left.is_zero() || (self.stopping)() {
                kill_group(&mut child);
                break None;
            }
            let slice = left.min(Duration::from_secs(1));
            match child.wait_timeout(slice) {
                Ok(Some(status)) => break Some(status),
                Ok(None) => waited += slice,
                Err(e) => {
                    kill_group(&mut child);
                    return Err(format!("command: {e}"));
                }
            }
        };
        let stderr = reader.join().unwrap_or_default();
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(one_line)
            .unwrap_or_default();
        let said = if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        };
        match status {
            None => Err(format!(
                "command still running at the check's deadline, killed{said}"
            )),
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(match s.code() {
                Some(code) => format!("command exited {code}{said}"),
                None => format!("command killed by a signal{said}"),
            }),
        }
    }
}

/// Kills a check command and everything it started (its process group), and reaps it.
fn kill_group(child: &mut std::process::Child) {
    // `kill -KILL -- -PGID`: the group the command leads (see `process_group(0)`); no unsafe
    // FFI needed for one signal.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// One line, control characters replaced, at most 200 characters: safe for a TOML message
/// and a terminal.
fn one_line(text: &str) -> String {
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() > 200 {
        let cut: String = clean.chars().take(200).collect();
        format!("{cut}…")
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_keeps_the_last_attempts() {
        let lines: Vec<String> = (1..=8).map(|n| format!("#{n}")).collect();
        assert_eq!(
            summary(&lines),
            "3 earlier attempts failed; #4; #5; #6; #7; #8"
        );
        assert_eq!(summary(&lines[..2]), "#1; #2");
    }

    #[test]
    fn one_line_strips_control_characters_and_truncates() {
        assert_eq!(one_line("a\u{1b}[31mb\n"), "a [31mb");
        assert_eq!(one_line(&"x".repeat(300)).chars().count(), 201);
    }
}
