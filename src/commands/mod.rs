//! One thin file per subcommand, each a wrapper over a core operation.

use crate::cli::Cli;
use crate::printer::Printer;
use crate::ExitStatus;

/// Runs the parsed command.
///
/// # Errors
/// Any failure the command could not turn into an exit status of its own.
pub fn dispatch(cli: Cli, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let _ = (cli, printer);
    Ok(ExitStatus::Success)
}
