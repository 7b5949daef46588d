//! `virtplan apply PLAN|SAVED`: plan (or load the reviewed plan), confirm, take the executor
//! lock, run every step at its time, and summarize.

use std::collections::BTreeSet;
use std::io::{BufRead as _, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::common;
use crate::clock::Clock;
use crate::executor::{Executor, Outcome, Settings};
use crate::lockfile::LockStore;
use crate::notify::{Notifier, Retry, RunInfo};
use crate::ops;
use crate::planner::saved::SavedPlan;
use crate::planner::{Connections, Plan};
use crate::printer::{Printer, Tone};
use crate::uri::Uri;
use crate::{render, ExitStatus};

pub struct Args<'a> {
    pub plan: &'a Path,
    pub config: Option<&'a Path>,
    pub connect: Option<&'a str>,
    pub auto_approve: bool,
    pub watch: bool,
    /// How long to wait for another executor to release the plan.
    pub lock_timeout: Option<Duration>,
    /// `--only` / `--exclude`.
    pub filter: crate::filter::Filter,
}

// One linear procedure, each stage a few lines; splitting it would hide the order of checks.
#[allow(clippy::too_many_lines)]
pub fn run(args: &Args<'_>, clock: &dyn Clock, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let saved = SavedPlan::read(args.plan)
        .with_context(|| format!("cannot read {}", args.plan.display()))?;
    if saved.is_some() && args.watch {
        anyhow::bail!(
            "{} is a saved plan, applied exactly as reviewed, so there are no edits to follow: drop --watch, or apply the plan file itself with --watch",
            args.plan.display()
        );
    }
    if let (Some(saved), false) = (&saved, args.filter.is_empty()) {
        let carried = saved.plan.selection.as_ref().map_or_else(
            || crate::filter::Filter::default().describe(),
            |s| s.filter.describe(),
        );
        anyhow::bail!(
            "{} is a saved plan and runs exactly as reviewed, with the filter it was made with ({carried}); drop {}, or make a new saved plan with it (`virtplan plan PLAN {} --out FILE`)",
            args.plan.display(),
            args.filter.describe(),
            args.filter.describe()
        );
    }
    if args.watch && !args.filter.is_empty() {
        anyhow::bail!(
            "--watch follows every edit of the whole plan: drop {} (or apply with the filter without --watch)",
            args.filter.describe()
        );
    }
    let interactive = std::io::stdin().is_terminal();
    if saved.is_some() && args.connect.is_some() {
        anyhow::bail!(
            "{} is a saved plan and carries its connections; drop --connect",
            args.plan.display()
        );
    }
    // A saved plan runs from itself alone: its policy and connections were reviewed with it,
    // so neither the plan file's validation nor virtplan.toml is read again.
    let loaded = match &saved {
        Some(saved) => {
            unchanged_since_review(saved, args.plan)?;
            None
        }
        None => match common::load_plan(args.plan, args.config, printer) {
            Some(loaded) => Some(loaded),
            None => return Ok(ExitStatus::Error),
        },
    };
    let (plan_path, plan_sha256) = match (&saved, &loaded) {
        (Some(saved), _) => (
            PathBuf::from(&saved.plan_file),
            saved.plan.meta.sha256.clone(),
        ),
        (None, Some((_, file))) => (file.path.clone(), file.sha256.clone()),
        (None, None) => return Ok(ExitStatus::Error),
    };

    let targets = match (&saved, &loaded) {
        (_, Some((_, file))) => file.notify.clone(),
        (Some(_), None) => saved_plan_targets(&plan_path, args.config, printer),
        (None, None) => Vec::new(),
    };

    // A saved plan was reviewed when it was made; anything else needs a yes or the flag. Asked
    // after loading, so a mistyped path or a broken plan is reported as what it is.
    if saved.is_none() && !args.auto_approve && !interactive {
        printer.error(&format!(
            "refusing to apply {} without confirmation: there is no terminal to ask on; review it with `virtplan plan {}` and pass --auto-approve, or apply a saved plan (`virtplan plan {} --out FILE`)",
            args.plan.display(),
            args.plan.display(),
            args.plan.display()
        ));
        return Ok(ExitStatus::Error);
    }

    // Where state lives is not part of the reviewed plan but of the host: a saved plan and
    // its plan file must share one lockfile and one executor lock.
    let state_dir = match &loaded {
        Some((config, _)) => config.state_dir.clone(),
        None => match crate::config::discover(args.config, Some(&plan_path)) {
            Ok(config) => config.state_dir,
            Err(diags) => {
                super::validate::report(printer, &diags);
                return Ok(ExitStatus::Error);
            }
        },
    };
    let locked = ops::lock(
        &plan_path,
        state_dir.as_deref(),
        &plan_sha256,
        clock,
        args.lock_timeout,
        &mut |m| printer.info(m),
    )
    .map_err(lock_failure)?;
    let (_lock, store) = (locked.lock, locked.store);
    let (plan, connections, loaded) = if let Some(saved) = saved {
        let mut plan = saved.plan;
        restore_credentials(&mut plan, args.config)?;
        // The reviewed plan needs no live state to run: a host that cannot be reached now
        // fails only its own steps (each waits for it within its grace), never the others.
        let (connections, unreachable) =
            ops::open_tolerant(plan.policy.connections.iter().cloned());
        for (uri, e) in &unreachable {
            let steps = plan
                .steps
                .iter()
                .filter(|s| &s.connection == uri && !s.done)
                .count();
            printer.warning(&format!(
                "host {} cannot be reached now ({e}); its {steps} step(s) wait for it, reopened with backoff within each step's grace, and are recorded missed if it is not back in time; the other hosts' steps go on",
                uri.redacted()
            ));
        }
        for warning in unreviewed_matches(&plan, &connections, args.config) {
            printer.warning(&warning);
        }
        (plan, connections, None)
    } else {
        let Some((config, file)) = loaded else {
            return Ok(ExitStatus::Error);
        };
        let connect = common::resolve_connect(&config, args.connect)?;
        let connections = common::open_connections(&file, connect.as_ref()).context(
            "`apply PLAN` plans from live state, so it needs every host of the plan; a saved plan (`virtplan plan PLAN --out FILE`, made while every host answered) runs the other hosts' steps and waits for this one within each step's grace",
        )?;
        match ops::project_resumed(
            &file,
            &connections,
            connect.as_ref(),
            clock,
            &store,
            &mut |m| {
                printer.info(m);
            },
            Some(&args.filter),
        ) {
            Ok(plan) => (plan, connections, Some((config, file, connect))),
            Err(ops::ResumeError::Plan(e)) => {
                common::report_plan_error(printer, &file, &e);
                return Ok(ExitStatus::Error);
            }
            Err(e) => return Err(e.into()),
        }
    };
    // Refuse an edited done step or a recreated domain before asking anything (and write
    // nothing yet: a declined prompt leaves the lockfile as it was).
    store.snapshot().reconcile(store.path(), &plan)?;
    filter_change(&store.snapshot(), &plan, args.plan, printer)?;
    printer.out(&render::human(&plan, printer));
    printer.out(&crate::notify::describe_targets(&targets));
    if !args.auto_approve && interactive && !confirm(&plan, printer)? {
        printer.info("Nothing applied.");
        return Ok(ExitStatus::Error);
    }

    let stop = ops::stop_on_signals()?;
    let file_zone: Option<chrono_tz::Tz> =
        plan.meta.timezone.as_deref().and_then(|z| z.parse().ok());
    let mut settings = Settings::for_plan(&plan).with_lease_config(lease_config(
        loaded.as_ref().map(|(config, _, _)| config),
        args.config,
        &plan_path,
    )?);
    settings.failpoint = ops::failpoint();
    let progress = super::progress::Progress::new(printer, clock, file_zone);
    let on_outcome = |o: &Outcome| progress.outcome(o);
    let notifier = start_notifier(targets, &plan, &store, printer);
    if let Some(n) = &notifier {
        n.plan_started(clock.now())?;
    }
    let pending = plan.steps.len();
    // What this run must leave finished (a watched plan may change under the run).
    let reviewed = (!args.watch).then(|| {
        plan.steps
            .iter()
            .map(|s| {
                (
                    s.step_id.clone(),
                    s.domain.uuid.clone(),
                    format!("step {} {}", s.step, s.domain.name),
                )
            })
            .collect::<Vec<_>>()
    });
    printer.info(&format!(
        "Applying {pending} step(s); progress is recorded in {} (Ctrl-C stops after the step in flight).",
        store.path().display()
    ));
    let report = if let (true, Some((config, file, connect))) = (args.watch, loaded) {
        printer.info(&format!(
            "Watching {} for edits: a valid edit is re-planned, an invalid one is reported and ignored.",
            file.path.display()
        ));
        watch(
            args,
            notifier.clone(),
            connect.as_ref(),
            config,
            file,
            plan,
            connections,
            &store,
            &stop,
            clock,
            printer,
        )?
    } else {
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| progress.run(&store, &done));
            let report = Executor {
                plan: &plan,
                connections: &connections,
                clock,
                store: &store,
                settings: &settings,
                stop: &stop,
                on_outcome: &on_outcome,
                reconnect: Some(&ops::connect),
            }
            .run();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            report
        })?
    };

    if let Some(n) = &notifier {
        finish_notifier(n, &report, &store, clock, printer);
    }
    let io = store.io_stats();
    printer.detail(&format!(
        "lockfile: {} changes in {} group commits ({} bytes appended, one fdatasync each); {} compactions ({} bytes)",
        io.changes, io.appends, io.appended_bytes, io.compactions, io.compacted_bytes
    ));
    let lock = store.snapshot();
    let doc = super::status::StatusDoc::from(&lock);
    printer.out(&format!(
        "\n{}\n{}",
        printer.paint(Tone::Heading, "Result:"),
        super::status::human(&doc, file_zone, printer)
    ));
    if let Some(fatal) = report.fatal {
        printer.error(&format!(
            "stopped: progress could not be recorded: {fatal}; fix that, then run `virtplan apply` again"
        ));
        return Ok(ExitStatus::Error);
    }
    if report.any_failed() {
        return Ok(ExitStatus::StepsFailed);
    }
    if report.interrupted {
        printer.error("interrupted: the step in flight was finished and recorded; run `virtplan apply` again to resume");
        return Ok(ExitStatus::Error);
    }
    if let Some(reviewed) = &reviewed {
        if let Some(left) = unfinished(reviewed, &lock) {
            // Never "success" while the lockfile says a reviewed step has not run.
            printer.error(&format!(
                "{left} still recorded pending or running after the run ended: this is a virtplan bug; run `virtplan apply` again to resume, and report it"
            ));
            return Ok(ExitStatus::Error);
        }
    }
    Ok(ExitStatus::Success)
}

/// The reviewed steps (id, domain UUID, label) the lockfile still holds as pending or running
/// (`step 3 web-01, ...`).
fn unfinished(
    reviewed: &[(String, String, String)],
    lock: &crate::lockfile::Lockfile,
) -> Option<String> {
    use crate::lockfile::{Index, StepStatus};
    let index = Index::of(lock);
    let left: Vec<&str> = reviewed
        .iter()
        .filter(|(id, uuid, _)| {
            index.position(id, uuid).is_none_or(|i| {
                matches!(
                    lock.steps[i].status,
                    StepStatus::Pending | StepStatus::Running
                )
            })
        })
        .map(|(.., label)| label.as_str())
        .collect();
    (!left.is_empty()).then(|| left.join(", "))
}

/// A run whose `--only` / `--exclude` differs from the last apply's (recorded in the
/// lockfile): refused while a step that run started is recorded `running` (an interrupted
/// run is resumed with its own filter, so its step is finished, never left half done);
/// otherwise said, then run.
fn filter_change(
    recorded: &crate::lockfile::Lockfile,
    plan: &Plan,
    plan_path: &Path,
    printer: &Printer,
) -> anyhow::Result<()> {
    let now = plan.selection.as_ref().map(|s| &s.filter);
    let Some(note) = recorded.filter_change_note(now) else {
        return Ok(());
    };
    let was = recorded.filter.clone().unwrap_or_default();
    if let Some(r) = recorded
        .steps
        .iter()
        .find(|r| r.status == crate::lockfile::StepStatus::Running)
    {
        anyhow::bail!(
            "step {} on {} was interrupted in a run with {}; resume that run with the same filter first (`virtplan apply {} {}`), then change it (this run has {}); nothing was applied",
            r.step,
            crate::text::escape(&r.vm),
            was.describe(),
            plan_path.display(),
            if was.is_empty() { String::new() } else { was.describe() },
            now.map_or_else(|| crate::filter::Filter::default().describe(), crate::filter::Filter::describe)
        );
    }
    printer.info(&format!("Note: {note}."));
    Ok(())
}

/// `--watch`: the reconciler runs the plan and follows edits of its file.
#[allow(clippy::too_many_arguments)] // the pieces apply has already checked, handed over
fn watch(
    args: &Args<'_>,
    notifier: Option<Arc<Notifier>>,
    connect: Option<&Uri>,
    config: crate::config::Config,
    file: crate::plan_file::PlanFile,
    plan: Plan,
    connections: Connections,
    store: &Arc<LockStore>,
    stop: &AtomicBool,
    clock: &dyn Clock,
    printer: &Printer,
) -> anyhow::Result<crate::executor::Report> {
    use crate::reconciler::{self, log};
    let log = log::Log {
        format: log::LogFormat::Human,
        stream: log::Stream::Stderr,
        printer: printer.clone(),
        clock,
    };
    let env = reconciler::Env {
        clock,
        log: &log,
        config: args.config,
        connect,
        failpoint: ops::failpoint(),
        pool: reconciler::Pool::with(connections),
    };
    let applying = reconciler::Applying {
        config,
        file,
        plan,
        store: Arc::clone(store),
        notifier,
    };
    reconciler::apply_watch(&env, applying, stop)
}

/// How long `apply` waits at exit for notifications still being delivered.
const NOTIFY_FLUSH: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts delivering notifications when the plan has targets (re-sending what an earlier run
/// left undelivered).
fn start_notifier(
    targets: Vec<crate::notify::Target>,
    plan: &Plan,
    store: &Arc<LockStore>,
    printer: &Printer,
) -> Option<Arc<Notifier>> {
    if targets.is_empty() {
        return None;
    }
    let info = RunInfo::of(plan);
    let log_printer = printer.clone();
    let log = Box::new(move |m: &str| log_printer.warning(&format!("notify: {m}")));
    Some(Notifier::start(targets, info, store, log, Retry::default()))
}

/// A saved plan carries no notification targets (webhook URLs and SMTP settings are secrets,
/// and a saved plan is not): they come from its plan file, whose sha256 was just checked, and
/// that file's virtplan.toml. When those no longer load, the run goes on without notifications.
fn saved_plan_targets(
    plan_path: &Path,
    config: Option<&Path>,
    printer: &Printer,
) -> Vec<crate::notify::Target> {
    let loaded = crate::config::discover(config, Some(plan_path)).and_then(|config| {
        crate::plan_file::load(plan_path, &crate::plan_file::LoadContext::from(config))
    });
    match loaded {
        Ok(file) => file.notify,
        Err(diags) => {
            printer.warning(&format!(
                "no notifications for this run: their targets come from {}, which does not load now ({diags})",
                plan_path.display()
            ));
            Vec::new()
        }
    }
}

/// Records `plan-finished` and waits (a bounded time) for deliveries to finish.
fn finish_notifier(
    notifier: &Notifier,
    report: &crate::executor::Report,
    store: &LockStore,
    clock: &dyn Clock,
    printer: &Printer,
) {
    let message = match (&report.fatal, report.interrupted) {
        (Some(fatal), _) => format!("stopped: progress could not be recorded: {fatal}"),
        (None, true) => "interrupted; run `virtplan apply` again to resume".to_owned(),
        (None, false) => String::new(),
    };
    if let Err(e) = notifier.plan_finished(clock.now(), message) {
        printer.warning(&format!(
            "cannot record the plan-finished notification: {e}"
        ));
    }
    let left = notifier.flush(NOTIFY_FLUSH);
    if left > 0 {
        printer.warning(&format!(
            "{left} notification delivery(ies) not done within {}s; they stay pending in {} and go out with the next `virtplan apply`",
            NOTIFY_FLUSH.as_secs(),
            store.path().display()
        ));
    }
}

/// The executor lock could not be taken: with the way to wait for it (`--lock-timeout`), or
/// how long apply waited.
fn lock_failure(failure: ops::LockFailure) -> anyhow::Error {
    match failure {
        ops::LockFailure::Held {
            source,
            waited: None,
        } => anyhow::Error::new(source)
            .context("pass --lock-timeout DURATION (e.g. 10m) to wait for it instead"),
        ops::LockFailure::Held {
            source,
            waited: Some(waited),
        } => anyhow::Error::new(source).context(format!(
            "still held after waiting {} (--lock-timeout)",
            crate::plan_file::units::format_duration(waited)
        )),
        other => other.into(),
    }
}

/// Refuses a saved plan whose plan file changed since it was made: its lockfile records that
/// file's progress, and an edit made since would be silently ignored.
fn unchanged_since_review(saved: &SavedPlan, saved_path: &Path) -> anyhow::Result<()> {
    let plan_path = Path::new(&saved.plan_file);
    let bytes = std::fs::read(plan_path).with_context(|| {
        format!(
            "cannot read {}, the plan file the saved plan {} was made from (its lockfile lives beside it); nothing was applied",
            plan_path.display(),
            saved_path.display()
        )
    })?;
    let now = crate::plan_file::sha256_hex(&bytes);
    if now != saved.plan.meta.sha256 {
        anyhow::bail!(
            "{} changed since the saved plan {} was made from it (sha256 {} then, {} now); nothing was applied: run `virtplan plan {} --out {}` again and review it",
            plan_path.display(),
            saved_path.display(),
            short(&saved.plan.meta.sha256),
            short(&now),
            plan_path.display(),
            saved_path.display()
        );
    }
    Ok(())
}

/// The fleet's lease timing (virtplan.toml `[lease]`): not part of a reviewed plan, since every
/// executor of a fleet must use the same one whatever plan it runs. A saved plan reads the
/// configuration its plan file would find.
fn lease_config(
    loaded: Option<&crate::config::Config>,
    explicit: Option<&Path>,
    plan_path: &Path,
) -> anyhow::Result<crate::lease::LeaseConfig> {
    if let Some(config) = loaded {
        return Ok(config.lease);
    }
    crate::config::discover(explicit, Some(plan_path))
        .map(|c| c.lease)
        .map_err(|d| anyhow::anyhow!("{}", d.render()))
}

/// Saved plans hold redacted connections (no password is ever written to disk by virtplan):
/// give each masked one back its credentials from where the operator keeps them, the plan
/// file (only while it is byte for byte the reviewed one) or virtplan.toml. Nothing else of
/// the plan file or configuration is used: the saved plan runs from itself.
/// `vms: {match:}` domains that match now but were not reviewed (the plan file is read only
/// while it is byte for byte the reviewed one; otherwise apply refused already).
fn unreviewed_matches(
    plan: &Plan,
    connections: &crate::planner::Connections,
    config: Option<&Path>,
) -> Vec<String> {
    let plan_path = PathBuf::from(&plan.meta.file);
    let Ok(config) = crate::config::discover(config, Some(&plan_path)) else {
        return Vec::new();
    };
    match crate::plan_file::load(&plan_path, &crate::plan_file::LoadContext::from(config)) {
        Ok(file) if file.sha256 == plan.meta.sha256 => {
            crate::ops::unreviewed_matches(&file, plan, connections)
        }
        _ => Vec::new(),
    }
}

fn restore_credentials(plan: &mut Plan, config: Option<&Path>) -> anyhow::Result<()> {
    let masked = |u: &Uri| u.expose().contains(crate::uri::MASK);
    if !plan.policy.connections.iter().any(masked) {
        return Ok(());
    }
    let plan_path = PathBuf::from(&plan.meta.file);
    let mut known: Vec<Uri> = Vec::new();
    if let Ok(config) = crate::config::discover(config, Some(&plan_path)) {
        known.extend(config.hosts.values().cloned());
        known.extend(config.connection.clone());
        let context = crate::plan_file::LoadContext::from(config);
        if let Ok(file) = crate::plan_file::load(&plan_path, &context) {
            if file.sha256 == plan.meta.sha256 {
                known.extend(file.connection_uris(None));
            }
        }
    }
    let restore = |saved: &Uri| -> anyhow::Result<Uri> {
        if !masked(saved) {
            return Ok(saved.clone());
        }
        known
            .iter()
            .find(|k| k.redacted() == saved.expose())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!(
                "the saved plan's connection {saved} had credentials, which saved plans never store, and neither the unchanged plan file nor virtplan.toml names it; name the URI in virtplan.toml `[hosts]` (or keep the password in libvirt's auth.conf) and run `virtplan plan --out` again"
            ))
    };
    plan.policy.connections = plan
        .policy
        .connections
        .iter()
        .map(restore)
        .collect::<anyhow::Result<_>>()?;
    for step in &mut plan.steps {
        step.connection = restore(&step.connection)?;
    }
    for change in &mut plan.changes {
        change.connection = restore(&change.connection)?;
    }
    Ok(())
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Opens each URI once.
/// Asks on the terminal; only `yes` goes on.
fn confirm(plan: &Plan, printer: &Printer) -> anyhow::Result<bool> {
    let domains: BTreeSet<&str> = plan.steps.iter().map(|s| s.domain.uuid.as_str()).collect();
    printer.out(&format!(
        "\nApply {} step(s) to {} domain(s), each at its time? Only `yes` is accepted: ",
        plan.steps.iter().filter(|s| !s.done).count(),
        domains.len()
    ));
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

#[cfg(test)]
mod tests {
    use super::unfinished;
    use crate::lockfile::{Lockfile, StepRecord, StepStatus};

    #[test]
    fn a_reviewed_step_left_pending_or_unrecorded_is_named() {
        let reviewed: Vec<(String, String, String)> = [
            ("s1", "u1", "step 1 a"),
            ("s2", "u1", "step 2 a"),
            ("s3", "u2", "step 3 b"),
        ]
        .iter()
        .map(|(i, u, l)| ((*i).to_owned(), (*u).to_owned(), (*l).to_owned()))
        .collect();
        let mut lock = Lockfile::new("sha");
        lock.steps.push(StepRecord::new(
            1,
            "s1",
            "a",
            "u1",
            "",
            None,
            StepStatus::Done,
        ));
        lock.steps.push(StepRecord::new(
            2,
            "s2",
            "a",
            "u1",
            "",
            None,
            StepStatus::Pending,
        ));
        assert_eq!(
            unfinished(&reviewed, &lock).as_deref(),
            Some("step 2 a, step 3 b")
        );
        lock.steps[1].status = StepStatus::Skipped;
        lock.steps.push(StepRecord::new(
            3,
            "s3",
            "b",
            "u2",
            "",
            None,
            StepStatus::Missed,
        ));
        assert_eq!(unfinished(&reviewed, &lock), None);
    }
}
