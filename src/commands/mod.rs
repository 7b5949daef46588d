//! One thin file per subcommand, each a wrapper over a core operation.

mod apply;
mod cancel;
mod common;
mod completions;
mod ls;
mod man;
mod plan;
mod progress;
mod schema;
pub mod status;
mod validate;
mod watch;

use crate::cli::{Cli, Command};
use crate::printer::Printer;
use crate::ExitStatus;

/// Runs the parsed command.
///
/// # Errors
/// Any failure the command could not turn into an exit status of its own.
pub fn dispatch(cli: Cli, printer: &Printer) -> anyhow::Result<ExitStatus> {
    match cli.command {
        Command::Validate { plans } => Ok(validate::run(&plans, cli.config.as_deref(), printer)),
        Command::Schema { which } => Ok(schema::run(which, printer)),
        Command::Ls { paths, format } => ls::run(
            &paths,
            cli.config.as_deref(),
            format,
            &crate::clock::SystemClock,
            printer,
        ),
        Command::Cancel { plan, step } => cancel::run(
            &cancel::Args {
                plan: &plan,
                config: cli.config.as_deref(),
                step: step.map(|n| n as usize),
            },
            &crate::clock::SystemClock,
            printer,
        ),
        Command::Completions { shell } => Ok(completions::run(shell, printer)),
        Command::Man { out_dir } => man::run(out_dir.as_deref(), printer),
        Command::Plan {
            plan,
            connect,
            format,
            out,
            detailed_exitcode,
            only,
            exclude,
        } => plan::run(
            &plan::Args {
                plans: &plan,
                config: cli.config.as_deref(),
                connect: connect.as_deref(),
                format,
                out: out.as_deref(),
                detailed_exitcode,
                filter: crate::filter::Filter::new(only, exclude)?,
            },
            &crate::clock::SystemClock,
            printer,
        ),
        Command::Apply {
            plan,
            auto_approve,
            watch,
            connect,
            lock_timeout,
            only,
            exclude,
        } => apply::run(
            &apply::Args {
                plan: &plan,
                config: cli.config.as_deref(),
                connect: connect.as_deref(),
                auto_approve,
                watch,
                lock_timeout,
                filter: crate::filter::Filter::new(only, exclude)?,
            },
            &crate::clock::SystemClock,
            printer,
        ),
        Command::Status { plan, format } => {
            status::run(&plan, cli.config.as_deref(), format, printer)
        }
        Command::Watch { dir, log_format } => watch::run(
            &watch::Args {
                dir: &dir,
                config: cli.config.as_deref(),
                log_format,
            },
            &crate::clock::SystemClock,
            printer,
        ),
    }
}
