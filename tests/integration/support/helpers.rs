//! Small helpers the integration tests share: plan files, `at` times, lockfiles and CLI output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use virtplan::clock::{Clock, SystemClock};
use virtplan::lockfile::{LockStore, Lockfile};

/// The wall clock, for tests that schedule real steps seconds ahead.
pub fn now() -> DateTime<Utc> {
    SystemClock.now()
}

/// `base + secs` in RFC 3339, whole seconds.
pub fn at(base: DateTime<Utc>, secs: i64) -> String {
    (base + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Writes `body` as `plan.yaml` in `dir`.
pub fn write_plan(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("plan.yaml");
    std::fs::write(&path, body).expect("write plan");
    path
}

/// Writes `plan.yaml` in `dir`: `version: 1`, `connection: {uri}`, then `steps`, the YAML list
/// under `steps:` (each line indented, newline-terminated).
pub fn write_steps(dir: &Path, uri: &str, steps: &str) -> PathBuf {
    write_plan(
        dir,
        &format!("version: 1\nconnection: {uri}\nsteps:\n{steps}"),
    )
}

/// The lockfile next to `plan`.
pub fn lock_of(plan: &Path) -> Lockfile {
    LockStore::read(&plan.with_extension("lock")).expect("lockfile")
}

/// A CLI run's status, stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The virtplan binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

/// virtplan with `args`, no colour, stdin closed: to run, or to start in the background.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env("NO_COLOR", "1").stdin(Stdio::null());
    command
}

/// Runs virtplan with `args` and extra `env`, no colour, stdin closed.
pub fn virtplan(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args)
        .envs(env.iter().copied())
        .output()
        .expect("run virtplan")
}

/// `apply PLAN --auto-approve` with extra `env`.
pub fn apply(plan: &Path, env: &[(&str, &str)]) -> Output {
    virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], env)
}

/// Starts `apply PLAN --auto-approve` in the background, its output discarded.
pub fn spawn_apply(plan: &Path) -> Child {
    command(&["apply", plan.to_str().unwrap(), "--auto-approve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start virtplan apply")
}

/// Starts virtplan with `args` in the background, its stdout and stderr piped.
pub fn spawn_piped(args: &[&str]) -> Child {
    command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start virtplan")
}

/// Waits (in real time, at most `limit`, polling every 10 ms) until `ready` holds. Panics
/// with `what` (say, "the step never started") when time runs out.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        SystemClock.sleep(Duration::from_millis(10));
    }
}

/// Waits (as [`wait_until`]) until the lockfile next to `plan` can be read and `ready` holds
/// of it; returns that lockfile.
#[track_caller]
pub fn wait_for_lock(
    plan: &Path,
    limit: Duration,
    what: &str,
    mut ready: impl FnMut(&Lockfile) -> bool,
) -> Lockfile {
    let path = plan.with_extension("lock");
    let mut found = None;
    wait_until(limit, what, || {
        found = LockStore::read(&path).ok().filter(|lock| ready(lock));
        found.is_some()
    });
    found.expect("the lockfile was ready")
}

/// Sends `signal` (`-TERM`, `-KILL`, ...) to the process `pid`, which must exist.
pub fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// `plan PLAN --out SAVED`, which must succeed: the reviewed plan a test then applies.
pub fn save_plan(plan: &Path, saved: &Path) {
    let out = virtplan(
        &[
            "plan",
            plan.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
}
