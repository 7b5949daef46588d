//! `virtplan watch DIR`: a long-running reconciler for a folder of reviewed plans (typically a
//! git checkout). Every `*.yaml` directly in DIR runs with its own lockfile and executor lock;
//! no confirmation is asked, since what lands there was reviewed and merged.

use std::path::Path;

use crate::cli::LogFormat;
use crate::clock::Clock;
use crate::printer::Printer;
use crate::reconciler::log::{self, Log, Stream};
use crate::reconciler::{self, Env, Pool};
use crate::ExitStatus;

pub struct Args<'a> {
    pub dir: &'a Path,
    pub config: Option<&'a Path>,
    pub log_format: LogFormat,
}

pub fn run(args: &Args<'_>, clock: &dyn Clock, printer: &Printer) -> anyhow::Result<ExitStatus> {
    if !args.dir.is_dir() {
        anyhow::bail!(
            "{} is not a folder: name the folder that holds the plan files (e.g. `virtplan watch /srv/plans`)",
            args.dir.display()
        );
    }
    let stop = crate::ops::stop_on_signals()?;
    let log = Log {
        format: match args.log_format {
            LogFormat::Human => log::LogFormat::Human,
            LogFormat::Json => log::LogFormat::Json,
        },
        stream: Stream::Stdout,
        printer: printer.clone(),
        clock,
    };
    let env = Env {
        clock,
        log: &log,
        config: args.config,
        connect: None,
        failpoint: crate::ops::failpoint(),
        pool: Pool::default(),
    };
    reconciler::watch_dir(&env, args.dir, &stop)?;
    Ok(ExitStatus::Success)
}
