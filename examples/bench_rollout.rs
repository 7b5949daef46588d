//! Rollout benchmark (issue 14): a fleet of test-driver domains over several connections,
//! rolled through `virtplan apply` with `rollout: {max_parallel: CAP}`, measured from the
//! lockfile the run wrote.
//!
//!     cargo build --release && cargo run --release --example bench_rollout -- [N=2000] [HOSTS=4] [CAP=50] [CHECK_SECONDS=0.25]
//!
//! N running domains spread over HOSTS `test:///` node files (one connection each). A step
//! names one connection, so the plan has one rollout step per host, all due at the same
//! instant, each `vms: {match: "h<k>-*"}` with `rollout: {max_parallel: CAP}`, and
//! virtplan.toml's `parallelism = CAP`, so at most CAP domains are in flight across the whole
//! fleet. Every domain's step sets a title and waits for a `check` command (`sleep
//! CHECK_SECONDS`): its share of the cap lasts through the check, as SPEC §7 says, so each
//! domain takes a known, non-trivial time. Domain leases are on (the default), as in
//! production: a domain's lease is taken after its dispatch, without a worker, and its record
//! starts once the lease is taken.
//!
//! Reported, all from the lockfile's `started_at`/`finished_at` of each domain:
//! - peak in flight, fleet-wide and per step (must be <= CAP);
//! - total time (first start to last end) against the ideal `ceil(N / CAP) × step time`,
//!   where the step time is the mean `finished_at - started_at` measured in this same run;
//! - lateness: how long each domain waited after its slot was free (the k-th start, k >= CAP,
//!   is due when the (k - CAP + 1)-th domain finished; the first CAP are due at `at`):
//!   p50, p99 and max. A negative lateness would mean the cap was broken.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use chrono::{DateTime, SubsecRound, Utc};
use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{LockStore, StepRecord, StepStatus};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let hosts: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let cap: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let check: f64 = args.next().map_or(Ok(0.25), |a| a.parse())?;
    anyhow::ensure!(
        n > 0 && hosts > 0 && cap > 0,
        "N, HOSTS and CAP must be positive"
    );
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/virtplan");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: run `cargo build --release` first",
        exe.display()
    );
    run(&exe, n, hosts, cap, check)
}

/// The `p`-th percentile (0..=100) of sorted values.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() - 1) * p / 100]
}

fn secs(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    // Millisecond resolution is plenty for a benchmark of seconds.
    #[allow(clippy::cast_precision_loss)]
    let ms = (to - from).num_microseconds().unwrap_or(i64::MAX) as f64;
    ms / 1e6
}

/// The most of `records` whose `[started_at, finished_at)` overlap at one instant.
fn peak(records: &[&StepRecord]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for r in records {
        if let (Some(s), Some(f)) = (r.started_at, r.finished_at) {
            edges.push((s, 1));
            edges.push((f, -1));
        }
    }
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

// One measurement, top to bottom; splitting it would hide the order of what is timed.
#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
fn run(exe: &Path, n: usize, hosts: usize, cap: usize, check: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut uris = Vec::new();
    for h in 0..hosts {
        let host_dir = dir.path().join(format!("host{h}"));
        std::fs::create_dir(&host_dir)?;
        let domains: Vec<FleetDomain> = (0..n)
            .filter(|i| i % hosts == h)
            .map(|i| {
                FleetDomain::new(format!("h{h}-{i:05}"))
                    .uuid(format!("00000000-0000-4000-8000-{i:012}"))
                    .running(true)
            })
            .collect();
        uris.push(write_fleet(&host_dir, &domains)?);
    }
    std::fs::write(
        dir.path().join("virtplan.toml"),
        format!("parallelism = {cap}\n"),
    )?;
    // Due a few seconds ahead, so planning (inside `apply`) is over before the step is due.
    let at = (SystemClock.now() + chrono::Duration::seconds(8)).trunc_subsecs(0);
    let mut plan = "version: 1\ngrace: 5m\nsteps:\n".to_owned();
    for (h, uri) in uris.iter().enumerate() {
        let _ = write!(
            plan,
            "  - at: {}\n    connection: {uri}\n    vms: {{ match: \"h{h}-*\" }}\n    title: rolled\n    check: {{ command: \"sleep {check}\", timeout: 1m, interval: 1s }}\n    rollout: {{ max_parallel: {cap} }}\n",
            at.to_rfc3339()
        );
    }
    let plan_path = dir.path().join("rollout.yaml");
    std::fs::write(&plan_path, plan)?;

    let shown = Command::new(exe).arg("plan").arg(&plan_path).output()?;
    anyhow::ensure!(
        shown.status.success(),
        "plan failed: {}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let started = Instant::now();
    let out = Command::new(exe)
        .args(["apply", "--auto-approve", "-q"])
        .arg(&plan_path)
        .output()?;
    let wall = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = LockStore::read(&plan_path.with_extension("lock"))?;
    let records: Vec<&StepRecord> = lock.steps.iter().collect();
    anyhow::ensure!(
        records.len() == n,
        "{} records for {n} domains",
        records.len()
    );
    let done = records
        .iter()
        .filter(|r| r.status == StepStatus::Done)
        .count();
    anyhow::ensure!(done == n, "only {done} of {n} domains done");

    let fleet_peak = peak(&records);
    let step_peaks: Vec<usize> = (1..=hosts)
        .map(|s| {
            peak(
                &records
                    .iter()
                    .copied()
                    .filter(|r| r.step == s)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let first = records
        .iter()
        .filter_map(|r| r.started_at)
        .min()
        .unwrap_or(at);
    let last = records
        .iter()
        .filter_map(|r| r.finished_at)
        .max()
        .unwrap_or(at);
    let total = secs(first, last);
    let durations: Vec<f64> = records
        .iter()
        .filter_map(|r| Some(secs(r.started_at?, r.finished_at?)))
        .collect();
    let step_time = durations.iter().sum::<f64>() / durations.len() as f64;
    let waves = n.div_ceil(cap);
    let ideal = waves as f64 * step_time;

    // Lateness against the moment each domain's slot was free.
    let mut starts: Vec<DateTime<Utc>> = records.iter().filter_map(|r| r.started_at).collect();
    let mut ends: Vec<DateTime<Utc>> = records.iter().filter_map(|r| r.finished_at).collect();
    starts.sort();
    ends.sort();
    let mut late: Vec<f64> = starts
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let free = if k < cap { at } else { ends[k - cap] };
            secs(free.max(at), *s)
        })
        .collect();
    late.sort_by(f64::total_cmp);
    let first_wave = secs(at, first);

    println!("rollout: {n} test-driver domains on {hosts} connections, one rollout step per connection (max_parallel {cap}), parallelism {cap}, check `sleep {check}`");
    println!(
        "  peak in flight: {fleet_peak} fleet-wide (cap {cap}); per step {step_peaks:?} (cap {cap} each){}",
        if fleet_peak <= cap && step_peaks.iter().all(|p| *p <= cap) {
            ""
        } else {
            "  ** CAP EXCEEDED **"
        }
    );
    println!("  step time (mean started→finished: title + check; the lease is taken, without a worker, before the record starts): {step_time:.3} s");
    println!(
        "  total (first start → last end): {total:.2} s; ideal ceil({n}/{cap}) × step time = {waves} × {step_time:.3} = {ideal:.2} s; ratio {:.3}",
        total / ideal
    );
    println!(
        "  lateness after the slot was free: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; min {:.1} ms (negative = cap broken); first start {:.1} ms after `at`",
        percentile(&late, 50) * 1e3,
        percentile(&late, 99) * 1e3,
        late.last().copied().unwrap_or(0.0) * 1e3,
        late.first().copied().unwrap_or(0.0) * 1e3,
        first_wave * 1e3
    );
    println!(
        "  apply process wall time {:.2} s (planning {n} domains, waiting for `at`, the rollout, exit)",
        wall.as_secs_f64()
    );
    anyhow::ensure!(
        fleet_peak <= cap && step_peaks.iter().all(|p| *p <= cap),
        "the cap was exceeded"
    );
    Ok(())
}
