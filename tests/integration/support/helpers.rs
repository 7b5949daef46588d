//! Small helpers the integration tests share: plan files, `at` times, lockfiles and CLI output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chrono::{DateTime, Utc};
use virtplan::lockfile::{LockStore, Lockfile};

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

/// Runs virtplan with `args` and extra `env`, no colour, stdin closed.
pub fn virtplan(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run virtplan")
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
