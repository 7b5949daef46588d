//! `virtplan schema`: print the plan file's JSON Schema.

use crate::printer::Printer;
use crate::ExitStatus;

pub fn run(printer: &Printer) -> ExitStatus {
    printer.out(&crate::plan_file::schema::plan_schema_json());
    ExitStatus::Success
}
