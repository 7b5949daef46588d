//! The reconciler's log: one line per event, human by default or JSON lines for machines.
//!
//! JSON lines carry `ts`, `level`, `plan` (the plan's file name, or null), `event` and
//! `message`; step events add `step`, `vm` and `status`.

use chrono::SecondsFormat;
use serde_json::json;

use crate::clock::Clock;
use crate::executor::Outcome;
use crate::lockfile::StepStatus;
use crate::printer::{Printer, Tone};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `virtplan watch`: the log is the command's output.
    Stdout,
    /// `apply --watch`: beside apply's own progress lines.
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Writes log lines through the printer; safe to share between threads (each line is one write).
pub struct Log<'a> {
    pub format: LogFormat,
    pub stream: Stream,
    pub printer: Printer,
    pub clock: &'a dyn Clock,
}

impl Log<'_> {
    /// One event. `plan` names the plan file; `message` may span lines (human) and is escaped
    /// into one line (JSON).
    pub fn event(&self, level: Level, plan: Option<&str>, event: &str, message: &str) {
        self.write(level, plan, event, message, None);
    }

    pub fn info(&self, plan: Option<&str>, event: &str, message: &str) {
        self.event(Level::Info, plan, event, message);
    }

    pub fn warn(&self, plan: Option<&str>, event: &str, message: &str) {
        self.event(Level::Warn, plan, event, message);
    }

    pub fn error(&self, plan: Option<&str>, event: &str, message: &str) {
        self.event(Level::Error, plan, event, message);
    }

    /// A step ended.
    pub fn step(&self, plan: &str, o: &Outcome) {
        let level = if o.status.is_failure() {
            Level::Error
        } else if o.status == StepStatus::Cancelled {
            Level::Warn
        } else {
            Level::Info
        };
        let mut message = format!("step {} {}: {}", o.step, o.vm, o.status);
        if !o.message.is_empty() {
            message.push_str(" - ");
            message.push_str(&o.message);
        }
        self.write(level, Some(plan), "step", &message, Some(o));
    }

    fn write(
        &self,
        level: Level,
        plan: Option<&str>,
        event: &str,
        message: &str,
        step: Option<&Outcome>,
    ) {
        // `-q`: warnings and errors only.
        if matches!(level, Level::Info)
            && self.printer.verbosity() == crate::printer::Verbosity::Quiet
        {
            return;
        }
        let line = self.line(level, plan, event, message, step);
        match self.stream {
            Stream::Stdout => self.printer.out(&format!("{line}\n")),
            Stream::Stderr => self.printer.err_line(&line),
        }
    }

    /// One log line, without its newline.
    fn line(
        &self,
        level: Level,
        plan: Option<&str>,
        event: &str,
        message: &str,
        step: Option<&Outcome>,
    ) -> String {
        let ts = self
            .clock
            .now()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        match self.format {
            LogFormat::Json => {
                let mut doc = json!({
                    "ts": ts,
                    "level": level.as_str(),
                    "plan": plan,
                    "event": event,
                    "message": message,
                });
                if let (Some(o), Some(map)) = (step, doc.as_object_mut()) {
                    map.insert("step".into(), json!(o.step));
                    map.insert("vm".into(), json!(o.vm));
                    map.insert("status".into(), json!(o.status.as_str()));
                }
                doc.to_string()
            }
            LogFormat::Human => {
                let tone = match level {
                    Level::Info => Tone::Dim,
                    Level::Warn => Tone::Warning,
                    Level::Error => Tone::Error,
                };
                let level = self.paint(tone, &format!("{:<5}", level.as_str()));
                match plan {
                    Some(plan) => format!("{ts} {level} {plan}: {message}"),
                    None => format!("{ts} {level} {message}"),
                }
            }
        }
    }

    /// Colours `text` when the log's stream is coloured (never in JSON).
    #[must_use]
    pub fn paint(&self, tone: Tone, text: &str) -> String {
        match (self.format, self.stream) {
            (LogFormat::Json, _) => text.to_owned(),
            (LogFormat::Human, Stream::Stdout) => self.printer.paint(tone, text),
            (LogFormat::Human, Stream::Stderr) => self.printer.paint_err(tone, text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn log(format: LogFormat, clock: &FakeClock) -> Log<'_> {
        Log {
            format,
            stream: Stream::Stdout,
            printer: Printer::plain(),
            clock,
        }
    }

    fn outcome() -> Outcome {
        Outcome {
            step: 2,
            step_id: "s1".into(),
            vm: "web-01".into(),
            uuid: "u".into(),
            at: None,
            status: StepStatus::Done,
            message: "applied".into(),
            earlier: false,
        }
    }

    #[test]
    fn json_lines_carry_the_documented_keys_and_step_fields() {
        let clock = FakeClock::new("2026-12-01T04:00:00.012Z".parse().unwrap());
        let log = log(LogFormat::Json, &clock);
        let line = log.line(
            Level::Info,
            Some("web.yaml"),
            "step",
            "x\ny",
            Some(&outcome()),
        );
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ts"], "2026-12-01T04:00:00.012Z");
        assert_eq!(v["level"], "info");
        assert_eq!(v["plan"], "web.yaml");
        assert_eq!(v["event"], "step");
        assert_eq!(v["message"], "x\ny");
        assert_eq!(v["step"], 2);
        assert_eq!(v["vm"], "web-01");
        assert_eq!(v["status"], "done");
        let folder = log.line(Level::Warn, None, "stopping", "m", None);
        let v: serde_json::Value = serde_json::from_str(&folder).unwrap();
        assert!(v["plan"].is_null());
        assert!(v.get("step").is_none());
    }

    #[test]
    fn human_lines_name_the_plan_and_level() {
        let clock = FakeClock::new("2026-12-01T04:00:00Z".parse().unwrap());
        let log = log(LogFormat::Human, &clock);
        assert_eq!(
            log.line(Level::Error, Some("web.yaml"), "invalid", "bad", None),
            "2026-12-01T04:00:00.000Z error web.yaml: bad"
        );
        assert_eq!(
            log.line(Level::Info, None, "started", "watching", None),
            "2026-12-01T04:00:00.000Z info  watching"
        );
    }
}
