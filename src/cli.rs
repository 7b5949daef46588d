//! Command-line syntax (clap derive types): the only module that imports clap.
//!
//! Arguments are parsed here and handed to [`crate::commands`] as plain values.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::ExitStatus;

#[derive(Debug, Parser)]
#[command(
    name = "virtplan",
    version,
    about = "Apply code-reviewed, scheduled changes to libvirt virtual machines",
    propagate_version = true
)]
pub struct Cli {
    /// Configuration file (default: the nearest virtplan.toml beside the plan or above it).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// When to colour output.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Colour on a terminal, unless NO_COLOR is set.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Human,
    Json,
    Markdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaKind {
    /// The plan file (YAML).
    Plan,
    /// `plan --format json` output.
    PlanOutput,
    /// The notification event sent to webhooks and commands.
    NotifyEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check plan files offline: syntax, schema, times, units, window. No libvirt call.
    Validate {
        /// Plan files to check.
        #[arg(required = true, value_name = "PLAN")]
        plans: Vec<PathBuf>,
    },
    /// Read live libvirt state and show what each step would change.
    Plan {
        #[arg(value_name = "PLAN")]
        plan: PathBuf,
        /// libvirt URI for every step (overrides the plan and the config).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        #[arg(long, value_enum, default_value_t = PlanFormat::Human)]
        format: PlanFormat,
        /// Write a saved plan that `apply` can run exactly as reviewed.
        #[arg(long, value_name = "SAVED")]
        out: Option<PathBuf>,
        /// Exit 0 when nothing changes, 2 when something does, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Run each step at its time, verify it and record progress in the lockfile.
    Apply {
        /// A plan file or a saved plan written by `plan --out`.
        #[arg(value_name = "PLAN|SAVED")]
        plan: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Keep watching the plan file and pick up reviewed edits.
        #[arg(long)]
        watch: bool,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Show each step's progress from the lockfile.
    Status {
        #[arg(value_name = "PLAN")]
        plan: PathBuf,
        #[arg(long, value_enum, default_value_t = StatusFormat::Human)]
        format: StatusFormat,
    },
    /// Reconcile every plan in a directory, picking up changes (no confirmation asked).
    ///
    /// Runs every `*.yaml` directly in DIR (not in its subfolders), each with its own lockfile
    /// and executor lock; picks up new plans, re-plans edited ones (done steps cannot change),
    /// keeps the version in force running when an edit is invalid, and records the steps of a
    /// removed plan as cancelled. Stops cleanly on SIGTERM/SIGINT.
    Watch {
        /// The folder of plans (non-recursive).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Log lines for people, or JSON lines (ts, level, plan, event, message).
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Print the plan file's JSON Schema (or that of another document virtplan writes).
    Schema {
        #[arg(value_enum, default_value_t = SchemaKind::Plan)]
        which: SchemaKind,
    },
}

/// Parses arguments; on `--help`, `--version` or a usage error prints clap's message and
/// returns the exit status to use.
pub fn parse<I, T>(args: I) -> Result<Cli, ExitStatus>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|err| {
        let status = if err.use_stderr() {
            ExitStatus::Error
        } else {
            ExitStatus::Success
        };
        // Printing can only fail on a closed stream, which is not worth reporting.
        let _ = err.print();
        status
    })
}
