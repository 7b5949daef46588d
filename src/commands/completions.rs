//! `virtplan completions SHELL`: a completion script generated from the clap definitions.

use crate::cli::{self, Shell};
use crate::printer::Printer;
use crate::ExitStatus;

pub fn run(shell: Shell, printer: &Printer) -> ExitStatus {
    printer.out(&String::from_utf8_lossy(&cli::completions(shell)));
    ExitStatus::Success
}
