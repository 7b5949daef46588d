//! `virtplan man [--out-dir DIR]`: man pages generated from the clap definitions.

use std::path::Path;

use anyhow::Context as _;

use crate::cli;
use crate::printer::Printer;
use crate::ExitStatus;

pub fn run(out_dir: Option<&Path>, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let pages = cli::man_pages().context("cannot render the man page")?;
    let Some(dir) = out_dir else {
        if let Some((_, text)) = pages.first() {
            printer.out(&String::from_utf8_lossy(text));
        }
        return Ok(ExitStatus::Success);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in &pages {
        let path = dir.join(name);
        crate::fsutil::write_atomic(&path, text, 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    printer.info(&format!(
        "Wrote {} man pages to {} (try `man -l {}`).",
        pages.len(),
        dir.display(),
        dir.join("virtplan.1").display()
    ));
    Ok(ExitStatus::Success)
}
