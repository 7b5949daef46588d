//! `virtplan schema`: print the plan file's JSON Schema (or that of a JSON document virtplan
//! writes: `plan --format json`, `status --format json`).

use crate::cli::SchemaKind;
use crate::printer::Printer;
use crate::ExitStatus;

pub fn run(which: SchemaKind, printer: &Printer) -> ExitStatus {
    let text = match which {
        SchemaKind::Plan => crate::plan_file::schema::plan_schema_json(),
        SchemaKind::PlanOutput => crate::render::json_schema(),
        SchemaKind::Status => super::status::json_schema(),
        SchemaKind::Ls => crate::overview::ls_schema(),
        SchemaKind::NotifyEvent => crate::notify::event::json_schema(),
    };
    printer.out(&text);
    ExitStatus::Success
}
