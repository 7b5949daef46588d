//! `rollout` (max_parallel / max_errors / pause) and per-host caps on test-driver fleets:
//! `plan` shows the batches in every format, the policy travels in the saved plan, and
//! `apply` keeps the cap and the error budget.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{LockStore, StepStatus};

const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

/// A test-driver host with these running domains.
fn fleet(dir: &Path, names: &[&str]) -> String {
    let domains: Vec<FleetDomain> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            FleetDomain::new(*n)
                .uuid(format!("00000000-0000-4000-8000-{i:012x}"))
                .running(true)
        })
        .collect();
    write_fleet(dir, &domains).unwrap()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A plan over `names` with one autostart step under `rollout` (written as `rollout`).
fn plan_file(dir: &Path, uri: &str, rollout: &str, names: &[&str]) -> PathBuf {
    let path = dir.join("plan.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vms: [{}]\n    autostart: true\n    rollout: {rollout}\n",
            names.join(", ")
        ),
    )
    .unwrap();
    // A virtplan.toml of its own, so no configuration above the temporary folder applies.
    std::fs::write(dir.join("virtplan.toml"), "").unwrap();
    path
}

#[test]
fn plan_shows_the_batches_in_the_written_order_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["web-03", "web-01", "web-05", "web-02", "web-04"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(
        dir.path(),
        &uri,
        "{ max_parallel: \"40%\", max_errors: 1, pause: 30s }",
        &names,
    );
    let plan = plan.to_str().unwrap();
    let out = run(dir.path(), &["plan", plan]);
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("Rollouts:\n  when apply starts  step 1  5 domains on test:///")
            && human.contains(": 2 at a time (max_parallel 40% of 5 = 2); stops after more than 1 failed (max_errors); pause 30s before a freed slot is reused\n    batch 1: web-03, web-01\n    batch 2: web-05, web-02\n    batch 3: web-04\n"),
        "{human}"
    );

    let out = run(dir.path(), &["plan", plan, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json["rollouts"][0];
    assert_eq!(r["step"], 1);
    assert_eq!(r["domains"], 5);
    assert_eq!(r["max_parallel_written"], "40%");
    assert_eq!(r["max_parallel"], 2);
    assert_eq!(r["max_errors"], 1);
    assert_eq!(r["pause_seconds"], 30.0);
    assert_eq!(
        r["batches"],
        serde_json::json!([["web-03", "web-01"], ["web-05", "web-02"], ["web-04"]])
    );

    let out = run(dir.path(), &["plan", plan, "--format", "markdown"]);
    assert!(out.status.success(), "{}", text(&out));
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        md.contains("**Rollouts**")
            && md.contains("1: web-03, web-01 · 2: web-05, web-02 · 3: web-04"),
        "{md}"
    );
}

#[test]
fn a_host_cap_narrows_the_batches_and_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b", "c"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(dir.path(), &uri, "{ max_parallel: 3 }", &names);
    std::fs::write(
        dir.path().join("virtplan.toml"),
        format!("[hosts.hv]\nuri = \"{uri}\"\nmax_parallel = 1\n"),
    )
    .unwrap();
    let out = run(dir.path(), &["plan", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("1 at a time (max_parallel 3, host max_parallel 1)")
            && human.contains("    batch 1: a\n    batch 2: b\n    batch 3: c\n")
            && human.contains(&format!("  host {uri}: at most 1 step at once")),
        "{human}"
    );
}

#[test]
fn a_saved_plan_keeps_the_rollout_and_is_written_as_format_3() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b"];
    let uri = fleet(dir.path(), &names);
    let plan = plan_file(dir.path(), &uri, "{ max_parallel: 1, pause: 2s }", &names);
    let saved = dir.path().join("plan.saved.json");
    let out = run(
        dir.path(),
        &[
            "plan",
            plan.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(
        json["format_version"], 3,
        "a plan with a rollout is format 3"
    );
    let steps = json["plan"]["steps"].as_array().unwrap();
    assert!(steps
        .iter()
        .all(|s| s["rollout"]["max_parallel"] == 1 && s["rollout"]["spec"]["pause"] == 2000));
    // virtplan.toml now says otherwise: `apply SAVED` still runs under the reviewed rollout.
    std::fs::write(dir.path().join("virtplan.toml"), "parallelism = 8\n").unwrap();
    let out = run(
        dir.path(),
        &["apply", saved.to_str().unwrap(), "--auto-approve"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = LockStore::read(&dir.path().join("plan.lock")).unwrap();
    let records: Vec<_> = lock.steps.iter().collect();
    assert!(
        records.iter().all(|r| r.status == StepStatus::Done),
        "{records:?}"
    );
    let (a, b) = (records[0], records[1]);
    let gap = b.started_at.unwrap() - a.finished_at.unwrap();
    assert!(
        gap >= chrono::Duration::seconds(2),
        "the second domain started {gap} after the first finished, not after the 2s pause"
    );
}
