//! Executor benchmark: N steps on N test-driver domains, all due in the same second.
//!
//! Runs the real `virtplan apply` binary (whole process) on a generated fleet, then reads the
//! lockfile: lateness of each step's start against its `at` (p50, p99, max) and the total
//! time. The baseline, in the same run, is the floor: the same N libvirt calls made one after
//! another in-process with no scheduling, locking or lockfile.
//!
//!     cargo build --release && cargo run --release --example bench_apply -- [N=500] [PARALLELISM=8]

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::{LockStore, StepStatus};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(500), |a| a.parse())?;
    let parallelism: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let domains: Vec<FleetDomain> = (0..n)
        .map(|i| {
            FleetDomain::new(format!("bench-{i:04}"))
                .uuid(format!("00000000-0000-4000-8000-{i:012}"))
                .running(true)
        })
        .collect();
    let uri = write_fleet(dir.path(), &domains)?;

    // Baseline: the same N metadata changes, sequentially, in-process.
    let hv = Libvirt::connect(&uri)?;
    let started = Instant::now();
    for d in &domains {
        let id = hv.resolve(&d.name)?;
        hv.set_title(&id.uuid, "baseline")?;
    }
    let baseline = started.elapsed();

    std::fs::write(
        dir.path().join("virtplan.toml"),
        format!("parallelism = {parallelism}\n"),
    )?;
    #[allow(clippy::disallowed_methods)] // a benchmark measures the real clock
    let at = (Utc::now() + chrono::Duration::seconds(4)).trunc_subsecs(0);
    let mut plan = format!("version: 1\nconnection: {uri}\nsteps:\n");
    for d in &domains {
        let _ = writeln!(
            plan,
            "  - {{at: {}, vm: {}, title: benchmarked}}",
            at.to_rfc3339(),
            d.name
        );
    }
    let plan_path = dir.path().join("bench.yaml");
    std::fs::write(&plan_path, plan)?;

    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/virtplan");
    let started = Instant::now();
    let status = Command::new(&exe)
        .args(["apply", "--auto-approve"])
        .arg(&plan_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    let wall = started.elapsed();
    anyhow::ensure!(status.success(), "apply failed: {status}");

    let lock = LockStore::read(&plan_path.with_extension("lock"))?;
    let mut lateness: Vec<Duration> = Vec::new();
    let mut last_finish: Option<DateTime<Utc>> = None;
    for r in &lock.steps {
        anyhow::ensure!(
            r.status == StepStatus::Done,
            "step {} is {:?}",
            r.step,
            r.status
        );
        let (Some(at), Some(start), Some(end)) = (r.at, r.started_at, r.finished_at) else {
            anyhow::bail!("step {} has no times", r.step);
        };
        anyhow::ensure!(start >= at, "step {} started early", r.step);
        lateness.push((start - at).to_std()?);
        last_finish = last_finish.max(Some(end));
    }
    lateness.sort();
    let pct = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lateness.len() as f64 * p).ceil() as usize).saturating_sub(1);
        lateness[i.min(lateness.len() - 1)]
    };
    let busy = (last_finish.unwrap_or(at) - at).to_std()?;
    println!("steps: {n} on {n} test-driver domains, all due at the same second, parallelism {parallelism}");
    println!(
        "start lateness: p50 {:?}, p99 {:?}, max {:?} (target p99 < 100ms)",
        pct(0.50),
        pct(0.99),
        lateness[lateness.len() - 1]
    );
    println!("from `at` to the last step done: {busy:?}; whole apply process: {wall:?}");
    println!("baseline (same {n} calls, sequential, in-process): {baseline:?}");
    #[allow(clippy::cast_precision_loss)]
    let ratio = busy.as_secs_f64() / baseline.as_secs_f64().max(1e-9);
    println!("executor time / baseline = {ratio:.2}x");
    let text = lock.to_text()?;
    let started = Instant::now();
    virtplan::fsutil::write_atomic(&dir.path().join("probe.lock"), text.as_bytes(), 0o600)?;
    let write = started.elapsed();
    let started = Instant::now();
    let _ = lock.to_text()?;
    println!(
        "one lockfile write of {} bytes: {write:?} (of which serializing: {:?})",
        text.len(),
        started.elapsed()
    );
    Ok(())
}
