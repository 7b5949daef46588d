//! Executor and lockfile benchmarks, each against a baseline measured in the same run.
//!
//!     cargo build --release && cargo run --release --example bench_apply -- [N=2000] [PARALLELISM=8] [STATUS_STEPS=10000]
//!
//! 1. **apply**: N running test-driver domains, one step each (a title), all due in the same
//!    second. Runs the real `virtplan apply --auto-approve -v` binary and reads the lockfile:
//!    start lateness (`started_at - at`: the step started, its domain's lease taken, which
//!    costs one settle delay) p50/p99/max, when each step was done (`finished_at - at`)
//!    p50/p99, and the lockfile's own count of appends
//!    (one `fdatasync` each), bytes appended and compactions. Baselines: the same N libvirt
//!    calls made one after another in-process (the floor), and the previous lockfile design,
//!    which rewrote the whole file (TOML, atomically) at every group commit: one such rewrite of
//!    this run's final progress is timed here, and multiplied by this run's group commits.
//! 2. **lockfile at scale**: a STATUS_STEPS-step plan over as many shut-off test-driver
//!    domains, projected in-process; times `Lockfile::reconcile` (new and steady state),
//!    STATUS_STEPS record look-ups, and an executor pass in which every step is recorded done
//!    (scheduling, grouping and look-ups with no libvirt calls).
//! 3. **status**: `virtplan status` of that plan with a STATUS_STEPS-record lockfile (every
//!    step done, figures and message recorded, plus an uncompacted journal of two appended
//!    lines per record) against `virtplan validate` of the same plan, whole processes, medians
//!    of 5.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use virtplan::clock::{Clock, SystemClock};
use virtplan::config::Config;
use virtplan::executor::{Executor, Settings};
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::{Figures, LockStore, Lockfile, StepStatus};
use virtplan::plan_file::{self, LoadContext};
use virtplan::planner::{self, Connections, NoProgress, PlanInput};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let parallelism: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let status_steps: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/virtplan");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: run `cargo build --release` first",
        exe.display()
    );
    apply(&exe, n, parallelism)?;
    scale_and_status(&exe, status_steps)?;
    Ok(())
}

fn now() -> DateTime<Utc> {
    SystemClock.now()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn plan_text(uri: &str, names: impl Iterator<Item = String>, at: Option<DateTime<Utc>>) -> String {
    let mut plan = format!("version: 1\nconnection: {uri}\ngrace: 1h\nsteps:\n");
    for name in names {
        match at {
            Some(at) => {
                let _ = writeln!(
                    plan,
                    "  - {{at: {}, vm: {name}, title: benchmarked}}",
                    at.to_rfc3339()
                );
            }
            None => {
                let _ = writeln!(plan, "  - {{vm: {name}, title: benchmarked}}");
            }
        }
    }
    plan
}

// One measurement, top to bottom; splitting it would hide the order of what is timed.
#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
fn apply(exe: &Path, n: usize, parallelism: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let domains: Vec<FleetDomain> = (0..n)
        .map(|i| {
            FleetDomain::new(format!("bench-{i:05}"))
                .uuid(format!("00000000-0000-4000-8000-{i:012}"))
                .running(true)
        })
        .collect();
    let uri = write_fleet(dir.path(), &domains)?;

    // Floor: the same N changes, one after another, in-process.
    let hv = Libvirt::connect(&uri)?;
    let started = Instant::now();
    for d in &domains {
        let id = hv.resolve(&d.name)?;
        hv.set_title(&id.uuid, "baseline")?;
    }
    let floor = started.elapsed();

    std::fs::write(
        dir.path().join("virtplan.toml"),
        format!("parallelism = {parallelism}\n"),
    )?;
    let plan_path = dir.path().join("bench.yaml");
    // Time a plan first, so every step is still ahead when apply has planned.
    std::fs::write(
        &plan_path,
        plan_text(&uri, domains.iter().map(|d| d.name.clone()), None),
    )?;
    let started = Instant::now();
    let out = Command::new(exe).arg("plan").arg(&plan_path).output()?;
    anyhow::ensure!(
        out.status.success(),
        "plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lead = chrono::Duration::from_std(started.elapsed() * 2)? + chrono::Duration::seconds(2);
    let at = (now() + lead).trunc_subsecs(0) + chrono::Duration::seconds(1);
    std::fs::write(
        &plan_path,
        plan_text(&uri, domains.iter().map(|d| d.name.clone()), Some(at)),
    )?;

    let out = Command::new(exe)
        .args(["apply", "--auto-approve", "-v"])
        .arg(&plan_path)
        .stdout(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let io_line = stderr
        .lines()
        .find(|l| l.starts_with("lockfile: "))
        .ok_or_else(|| anyhow::anyhow!("apply -v printed no lockfile statistics"))?;
    let numbers: Vec<u64> = io_line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [changes, appends, appended, compactions, compacted] = numbers[..] else {
        anyhow::bail!("unexpected statistics line: {io_line}");
    };

    let lock_path = plan_path.with_extension("lock");
    let lock = LockStore::read(&lock_path)?;
    let mut lateness = Vec::new();
    let mut done_after = Vec::new();
    let mut last = at;
    for r in &lock.steps {
        anyhow::ensure!(
            r.status == StepStatus::Done,
            "step {} is {:?}",
            r.step,
            r.status
        );
        let started = r.started_at.unwrap_or(at);
        anyhow::ensure!(started >= at, "step {} started early", r.step);
        lateness.push((started - at).to_std()?);
        let finished = r.finished_at.unwrap_or(started);
        done_after.push((finished - at).to_std()?);
        last = last.max(finished);
    }
    lateness.sort();
    done_after.sort();
    let pct = |p: usize| lateness[(lateness.len() * p / 100).min(lateness.len() - 1)];
    let done_pct = |p: usize| done_after[(done_after.len() * p / 100).min(done_after.len() - 1)];
    let all_done = (last - at).to_std()?;

    // The previous design: the whole lockfile rewritten (TOML, atomically) per group commit.
    let toml_text = toml::to_string(&lock)?;
    let probe = dir.path().join("probe.lock");
    let rewrites: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let text = toml::to_string(&lock).unwrap_or_default();
            virtplan::fsutil::write_atomic(&probe, text.as_bytes(), 0o600).map(|()| t.elapsed())
        })
        .collect::<Result<_, _>>()?;
    let rewrite = median(rewrites);
    let per_step = |bytes: u64| bytes as f64 / n as f64;
    println!("== apply: {n} steps due at the same second, parallelism {parallelism}");
    println!(
        "start lateness: p50 {}, p99 {}, max {}; all done {} after `at`",
        ms(pct(50)),
        ms(pct(99)),
        ms(*lateness.last().unwrap_or(&Duration::ZERO)),
        ms(all_done)
    );
    println!(
        "done (`finished_at - at`, the change made and verified): p50 {}, p99 {}",
        ms(done_pct(50)),
        ms(done_pct(99)),
    );
    println!(
        "floor (the same {n} libvirt calls in sequence, in-process): {}",
        ms(floor)
    );
    println!(
        "lockfile: {changes} changes in {appends} group commits: {:.0} bytes appended per step ({:.2} fdatasync per step), plus {compactions} compactions ({compacted} bytes, {:.0} per step)",
        per_step(appended),
        appends as f64 / n as f64,
        per_step(compacted)
    );
    println!(
        "previous design (whole {}-byte TOML file rewritten per group commit, {} each here): {:.0} bytes per step, {} in all, vs {:.0} bytes per step now",
        toml_text.len(),
        ms(rewrite),
        per_step(appends * toml_text.len() as u64),
        ms(rewrite * u32::try_from(appends)?),
        per_step(appended + compacted)
    );
    Ok(())
}

// One measurement, top to bottom; splitting it would hide the order of what is timed.
#[allow(clippy::too_many_lines)]
fn scale_and_status(exe: &Path, steps: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let domains: Vec<FleetDomain> = (0..steps)
        .map(|i| {
            FleetDomain::new(format!("s-{i:05}")).uuid(format!("00000000-0000-4000-9000-{i:012}"))
        })
        .collect();
    let uri = write_fleet(dir.path(), &domains)?;
    let plan_path = dir.path().join("big.yaml");
    let at = now() + chrono::Duration::days(3650);
    std::fs::write(
        &plan_path,
        plan_text(
            &uri,
            domains.iter().map(|d| d.name.clone()),
            Some(at.trunc_subsecs(0)),
        ),
    )?;
    let file = plan_file::load(&plan_path, &LoadContext::from(Config::default()))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect(&uri)?);
    let mut connections = Connections::new();
    connections.insert(uri.as_str().into(), hv);
    let plan = planner::project(&PlanInput {
        file: &file,
        connections: &connections,
        connect_override: None,
        now: now(),
        progress: &NoProgress,
    })?;

    println!("\n== lockfile at {steps} steps");
    let path = dir.path().join("big.lock");
    let mut lock = Lockfile::new(&plan.meta.sha256);
    let t = Instant::now();
    lock.reconcile(&path, &plan)?;
    println!("Lockfile::reconcile, new: {}", ms(t.elapsed()));
    let t = Instant::now();
    lock.reconcile(&path, &plan)?;
    println!("Lockfile::reconcile, steady state: {}", ms(t.elapsed()));

    // Every record done, with figures and a message, as after a finished run.
    let state = &plan.steps[0].before;
    for r in &mut lock.steps {
        r.status = StepStatus::Done;
        r.started_at = Some(at);
        r.finished_at = Some(at + chrono::Duration::milliseconds(250));
        "applied".clone_into(&mut r.message);
        r.before = Some(Figures::from(state));
        r.after = Some(Figures::from(state));
    }
    std::fs::write(&path, lock.to_text()?)?;
    let store = LockStore::open(&path, &plan.meta.sha256)?;
    let t = Instant::now();
    let found = plan
        .steps
        .iter()
        .filter(|s| store.status(&s.step_id, &s.domain.uuid) == Some(StepStatus::Done))
        .count();
    println!("{found} record look-ups: {}", ms(t.elapsed()));
    let stop = AtomicBool::new(false);
    let settings = Settings::for_plan(&plan);
    let t = Instant::now();
    let report = Executor {
        plan: &plan,
        connections: &connections,
        clock: &SystemClock,
        store: &store,
        settings: &settings,
        stop: &stop,
        on_outcome: &|_| {},
        reconnect: None,
    }
    .run()?;
    anyhow::ensure!(report.outcomes.len() == steps && !report.any_failed());
    println!(
        "executor pass over {steps} done steps (reconcile, compaction, grouping, scheduling, look-ups): {}",
        ms(t.elapsed())
    );

    // `status` against `validate` of the same plan, at 2000 steps and at all of them; each
    // with the lockfile compacted (as a finished run leaves it) and as an uncompacted journal
    // (as an interrupted run leaves it: two more lines per record).
    let time = |cmd: &str, plan: &Path| -> anyhow::Result<Duration> {
        let runs = (0..7)
            .map(|_| {
                let t = Instant::now();
                let status = Command::new(exe)
                    .arg(cmd)
                    .arg(plan)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?;
                anyhow::ensure!(status.success(), "{cmd} failed");
                Ok(t.elapsed())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(median(runs))
    };
    println!("\n== status vs validate (whole processes, medians of 7)");
    for size in [2000.min(steps), steps] {
        let plan = dir.path().join(format!("status-{size}.yaml"));
        std::fs::write(
            &plan,
            plan_text(
                &uri,
                domains[..size].iter().map(|d| d.name.clone()),
                Some(at.trunc_subsecs(0)),
            ),
        )?;
        let mut part = lock.clone();
        part.steps.truncate(size);
        let compacted = part.to_text()?;
        let mut journal = compacted.clone();
        for r in &part.steps {
            for status in [StepStatus::Running, StepStatus::Done] {
                let mut r = r.clone();
                r.status = status;
                journal.push_str(&serde_json::to_string(&serde_json::json!({ "step": r }))?);
                journal.push('\n');
            }
        }
        let validate = time("validate", &plan)?;
        for (kind, text) in [("compacted", &compacted), ("journal", &journal)] {
            std::fs::write(plan.with_extension("lock"), text)?;
            let status = time("status", &plan)?;
            println!(
                "{size} steps, lockfile {kind} ({} bytes): status {} vs validate {}: {:.2}x",
                text.len(),
                ms(status),
                ms(validate),
                status.as_secs_f64() / validate.as_secs_f64()
            );
        }
    }
    Ok(())
}
