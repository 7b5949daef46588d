//! virtplan applies code-reviewed, scheduled changes to libvirt virtual machines.
//!
//! Data flows one way:
//! plan file ([`plan_file`]) -> validated [`plan_file::PlanFile`] -> observed [`state`] read through a
//! [`hypervisor::Hypervisor`] -> a [`planner::Plan`] value -> [`render`]ed for humans and machines,
//! or executed by [`executor`], which records progress in a [`lockfile`].
//!
//! [`cli`] is the only module that knows about clap; [`commands`] are thin wrappers, one per
//! subcommand over [`ops`] (load → connect → project → check, shared with the reconciler);
//! [`clock`] is the only place that reads the wall clock or sleeps. [`reconciler`]
//! keeps executors running while plan files change (`apply --watch`, `watch DIR`).

pub mod attr;
pub mod cancel;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod executor;
pub mod filter;
pub mod fsutil;
pub mod hypervisor;
pub mod lease;
pub mod lockfile;
pub mod notify;
pub mod ops;
pub mod overview;
pub mod plan_file;
pub mod planner;
pub mod printer;
pub mod reconciler;
pub mod render;
pub mod state;
pub mod text;
pub mod uri;

use std::ffi::OsString;

/// The process outcome, mapped to the exit codes of the product contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: success (and, with `--detailed-exitcode`, no changes).
    Success,
    /// 1: bad input, libvirt unreachable, lock held, refused drift.
    Error,
    /// 2: `plan --detailed-exitcode` found changes.
    Changes,
    /// 3: `apply` ended with failed or missed steps.
    StepsFailed,
}

impl ExitStatus {
    #[must_use]
    pub fn code(self) -> i32 {
        match self {
            Self::Success => 0,
            Self::Error => 1,
            Self::Changes => 2,
            Self::StepsFailed => 3,
        }
    }
}

/// Parses the command line, runs the command, prints any error, and returns the exit status.
pub fn run<I, T>(args: I) -> ExitStatus
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::parse(args) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    let printer = printer::Printer::new(cli.color_choice(), cli.verbosity());
    let status = match commands::dispatch(cli, &printer) {
        Ok(status) => status,
        Err(err) => {
            printer.error(&error_chain(&err));
            ExitStatus::Error
        }
    };
    match printer.stdout_error() {
        Some(e) => {
            printer.error(&format!(
                "cannot write to standard output: {e}; the output is incomplete"
            ));
            ExitStatus::Error
        }
        None => status,
    }
}

/// An error and its causes, `: `-separated like `{:#}`, leaving out a cause whose text an outer
/// message already quotes (thiserror messages often embed their source), so nothing is said
/// twice ("Is a directory (os error 21): Is a directory (os error 21)").
#[must_use]
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn io_errors_print_their_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read x: {source}")]
        struct E {
            source: std::io::Error,
        }
        let err = anyhow::Error::new(E {
            source: std::io::Error::from_raw_os_error(21),
        })
        .context("plan p.yaml");
        let text = super::error_chain(&err);
        assert_eq!(text.matches("os error 21").count(), 1, "{text}");
        assert!(text.starts_with("plan p.yaml: cannot read x: "), "{text}");
    }
}
