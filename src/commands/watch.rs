//! `virtplan watch DIR`: a long-running reconciler for a folder of reviewed plans (typically a
//! git checkout). Every `*.yaml` directly in DIR runs with its own lockfile and executor lock;
//! no confirmation is asked, since what lands there was reviewed and merged.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::apply::FAILPOINT_ENV;
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
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The second signal exits at once: every lockfile write is atomic, so it stays whole.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
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
        failpoint: std::env::var(FAILPOINT_ENV).ok().filter(|f| !f.is_empty()),
        pool: Pool::default(),
    };
    reconciler::watch_dir(&env, args.dir, &stop)?;
    Ok(ExitStatus::Success)
}
