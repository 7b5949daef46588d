//! Command-line syntax (clap derive types): the only module that imports clap.
//!
//! Arguments are parsed here and handed to [`crate::commands`] as plain values.

use std::ffi::OsString;
use std::path::PathBuf;

use std::time::Duration;

use clap::{ArgAction, CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::ExitStatus;

/// `0.1.0 (built against libvirt 9.0.0)`: which libvirt matters as much as which virtplan.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (built against libvirt ",
    env!("VIRTPLAN_LIBVIRT_VERSION"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "virtplan",
    version = VERSION,
    about = "Apply code-reviewed, scheduled changes to libvirt virtual machines",
    propagate_version = true
)]
pub struct Cli {
    /// Configuration file (default: the nearest virtplan.toml beside the plan or above it).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// When to colour output (NO_COLOR=1 in the environment means never, unless `always`).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    /// Never colour output (the same as `--color never`).
    #[arg(long, global = true)]
    pub no_color: bool,

    /// Print only results and errors: no progress or status messages on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more: what is waited for, connections opened, each step's details.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The colour choice after `--no-color`.
    #[must_use]
    pub fn color_choice(&self) -> ColorChoice {
        if self.no_color {
            ColorChoice::Never
        } else {
            self.color
        }
    }

    /// How much to print, from `-q` / `-v`.
    #[must_use]
    pub fn verbosity(&self) -> Verbosity {
        if self.quiet {
            Verbosity::Quiet
        } else if self.verbose > 0 {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        }
    }
}

/// How much the printer says besides results and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verbosity {
    /// Results and errors only.
    Quiet,
    /// Results, errors, warnings and progress.
    #[default]
    Normal,
    /// Also what is waited for and why.
    Verbose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Colour on a terminal, unless NO_COLOR is set.
    Auto,
    /// Always colour, even when piped.
    Always,
    /// Never colour.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    /// For people: grouped by time, before → after, diffs.
    Human,
    /// Stable JSON (schemas/plan-output.schema.json).
    Json,
    /// A table for a pull-request comment.
    Markdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaKind {
    /// The plan file (YAML).
    Plan,
    /// `plan --format json` output.
    PlanOutput,
    /// `status --format json` output.
    Status,
    /// `ls --format json` output.
    Ls,
    /// The notification event sent to webhooks and commands.
    NotifyEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    /// For people.
    Human,
    /// Stable JSON (see `virtplan schema`).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event, for people.
    Human,
    /// JSON lines: ts, level, plan, event, message.
    Json,
}

/// Shells `completions` can write a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    #[value(name = "powershell")]
    PowerShell,
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
        /// The plan file (YAML); several plans are planned together and refused when two of
        /// them change one domain at overlapping times.
        #[arg(value_name = "PLAN", required = true, num_args = 1..)]
        plan: Vec<PathBuf>,
        /// libvirt URI for every step (overrides the plan and the config).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = PlanFormat::Human)]
        format: PlanFormat,
        /// Write a saved plan that `apply` can run exactly as reviewed.
        #[arg(long, value_name = "SAVED")]
        out: Option<PathBuf>,
        /// Exit 0 when nothing changes, 2 when something does, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Plan only these domains: a name, a UUID or a glob ('web-*'); repeatable. Like
        /// terraform's -target.
        #[arg(long = "only", value_name = "VM")]
        only: Vec<String>,
        /// Leave these domains out: a name, a UUID or a glob ('db-*'); repeatable.
        #[arg(long = "exclude", value_name = "VM")]
        exclude: Vec<String>,
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
        /// libvirt URI for every step (overrides the plan and the config).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// Wait up to DURATION (e.g. 30s, 5m) for another executor to release the plan,
        /// instead of failing at once.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        lock_timeout: Option<Duration>,
        /// Apply only to these domains: a name, a UUID or a glob ('web-*'); repeatable. Like
        /// terraform's -target.
        #[arg(long = "only", value_name = "VM")]
        only: Vec<String>,
        /// Leave these domains out: a name, a UUID or a glob ('db-*'); repeatable.
        #[arg(long = "exclude", value_name = "VM")]
        exclude: Vec<String>,
    },
    /// Show each step's progress from the lockfile.
    Status {
        /// The plan file (or a saved plan made from it).
        #[arg(value_name = "PLAN")]
        plan: PathBuf,
        /// Output format.
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
    /// List plans: next pending step and when, counts per status, executor, lockfile.
    ///
    /// Offline (no libvirt call). A folder lists every `*.yaml` directly in it (as `watch`
    /// runs them) and the lockfiles of plans removed from it.
    Ls {
        /// Folders of plans, or plan files (default: the current folder).
        #[arg(value_name = "DIR|PLAN")]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = StatusFormat::Human)]
        format: StatusFormat,
    },
    /// Cancel pending steps (or one): recorded with who and when; a running apply or watch
    /// never starts them, and later applies skip them.
    ///
    /// Works while an executor holds the plan. A step that has already started is not stopped.
    /// To run a cancelled step after all, edit it in a reviewed change (a new step id).
    Cancel {
        /// The plan file (or a saved plan made from it).
        #[arg(value_name = "PLAN")]
        plan: PathBuf,
        /// Only this step (numbered from 1, as `status` shows them).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        step: Option<u32>,
    },
    /// Print the plan file's JSON Schema (or that of another document virtplan writes).
    Schema {
        /// Which document.
        #[arg(value_enum, default_value_t = SchemaKind::Plan)]
        which: SchemaKind,
    },
    /// Print a shell completion script (e.g. `virtplan completions bash > /etc/bash_completion.d/virtplan`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff), or write one page per command into a folder.
    Man {
        /// Write virtplan.1 and virtplan-COMMAND.1 into this folder instead of printing virtplan.1.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::plan_file::units::parse_duration(text).map_err(|e| format!("{}; {}", e.message, e.help))
}

/// The clap definition, for completions, the man page and tests.
#[must_use]
pub fn command() -> clap::Command {
    Cli::command()
}

/// A completion script for `shell`.
#[must_use]
pub fn completions(shell: Shell) -> Vec<u8> {
    use clap_complete::Shell as S;
    let shell = match shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
        Shell::Elvish => S::Elvish,
        Shell::PowerShell => S::PowerShell,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "virtplan", &mut out);
    out
}

/// Man pages: `virtplan.1` first, then `virtplan-COMMAND.1` for each subcommand, as
/// (file name, roff text).
///
/// # Errors
/// Only if rendering into memory fails, which it does not.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let top = command();
    let mut pages = Vec::new();
    let mut text = Vec::new();
    clap_mangen::Man::new(top.clone()).render(&mut text)?;
    pages.push(("virtplan.1".to_owned(), text));
    for sub in top.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("virtplan-{}", sub.get_name());
        let mut text = Vec::new();
        let sub = sub.clone().name(name.clone()).version(VERSION);
        clap_mangen::Man::new(sub).render(&mut text)?;
        pages.push((format!("{name}.1"), text));
    }
    Ok(pages)
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    /// Every argument of every command says what it is for in `--help`, the man page and
    /// completions (an argument without help shows up as a bare name).
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let help = arg.get_help().or_else(|| arg.get_long_help());
                if help.is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command itself)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::command(), "virtplan", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        super::command().debug_assert();
    }

    #[test]
    fn no_color_wins_over_color_and_quiet_conflicts_with_verbose() {
        let cli =
            super::Cli::try_parse_from(["virtplan", "--color", "always", "--no-color", "schema"])
                .unwrap();
        assert_eq!(cli.color_choice(), super::ColorChoice::Never);
        assert_eq!(cli.verbosity(), super::Verbosity::Normal);
        let cli = super::Cli::try_parse_from(["virtplan", "schema", "-vv"]).unwrap();
        assert_eq!(cli.verbosity(), super::Verbosity::Verbose);
        assert!(super::Cli::try_parse_from(["virtplan", "-q", "-v", "schema"]).is_err());
    }
}
