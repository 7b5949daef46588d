//! `vms: {match: GLOB}` on test-driver fleets: resolved at plan time on the step's connection,
//! in name order; zero matches is a located error; a saved plan applies the reviewed set only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use crate::support::helpers::text;
use chrono::{DateTime, TimeZone, Utc};
use virtplan::config::Config;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::lockfile::{LockStore, StepStatus};
use virtplan::plan_file::{self, LoadContext};
use virtplan::planner::{self, Connections, NoProgress, Plan, PlanError, PlanInput};

const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
}

/// A test-driver host with these running domains; each name always gets the same UUID, so a
/// rewritten host file keeps its domains' identities.
fn fleet(dir: &Path, names: &[&str]) -> String {
    let domains: Vec<FleetDomain> = names
        .iter()
        .map(|n| {
            let id = n
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)))
                % (1 << 48);
            FleetDomain::new(*n)
                .uuid(format!("00000000-0000-4000-8000-{id:012x}"))
                .running(true)
        })
        .collect();
    write_fleet(dir, &domains).unwrap()
}

fn project(dir: &Path, uri: &str, steps: &str) -> Result<Plan, PlanError> {
    let path = dir.join("plan.yaml");
    std::fs::write(&path, format!("version: 1\nsteps:\n{steps}")).unwrap();
    let file = plan_file::load(&path, &LoadContext::from(Config::default()))
        .unwrap_or_else(|d| panic!("{}", d.render()));
    let mut connections = Connections::new();
    connections.insert(uri.into(), Arc::new(Libvirt::connect(uri).unwrap()));
    planner::project(&PlanInput {
        file: &file,
        connections: &connections,
        connect_override: Some(&uri.into()),
        now: now(),
        progress: &NoProgress,
    })
}

#[test]
fn a_match_selector_resolves_to_the_matching_domains_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), &["web-02", "db-01", "web-10", "web-01"]);
    let plan = project(
        dir.path(),
        &uri,
        "  - vms: { match: \"web-0?\" }\n    autostart: true\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = plan.steps.iter().map(|s| s.domain.name.as_str()).collect();
    assert_eq!(names, ["web-01", "web-02"]);
    let changed: Vec<&str> = plan.changes.iter().map(|c| c.vm.as_str()).collect();
    assert_eq!(changed, ["web-01", "web-02"]);
    // The plan pins each domain by UUID, like a listed one.
    assert!(plan.steps.iter().all(|s| s.domain.uuid.len() == 36));
}

#[test]
fn a_match_selecting_nothing_is_an_error_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), &["web-01"]);
    let err = project(
        dir.path(),
        &uri,
        "  - vms: { match: \"cache-*\" }\n    autostart: true\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("plan.yaml:3:19"), "{err}");
    assert!(
        err.contains("`vms: {match: \"cache-*\"}` matches no domain on test:///"),
        "{err}"
    );
    assert!(err.contains("virsh -c"), "{err}");
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A domain that starts matching after review (here: web-03 appears before `apply SAVED`) is
/// never touched: the saved plan carries the reviewed set, by UUID.
#[test]
fn a_saved_plan_applies_the_reviewed_set_only() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), &["web-01", "web-02", "db-01"]);
    let plan: PathBuf = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        format!("version: 1\nconnection: {uri}\nsteps:\n  - vms: {{ match: \"web-*\" }}\n    autostart: true\n"),
    )
    .unwrap();
    let saved = dir.path().join("plan.saved.json");
    let out = run(&[
        "plan",
        plan.to_str().unwrap(),
        "--out",
        saved.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("web-01") && shown.contains("web-02"),
        "{shown}"
    );
    assert!(!shown.contains("db-01"), "{shown}");

    fleet(dir.path(), &["web-01", "web-02", "web-03", "db-01"]);
    let out = run(&["apply", saved.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("web-03 (")
            && said.contains(
                "now matches `web-*` of step 1 but was not in the reviewed plan: it is not touched"
            ),
        "{said}"
    );
    let lock = LockStore::read(&plan.with_extension("lock")).unwrap();
    let vms: Vec<(&str, StepStatus)> = lock
        .steps
        .iter()
        .map(|r| (r.vm.as_str(), r.status))
        .collect();
    assert_eq!(
        vms,
        [("web-01", StepStatus::Done), ("web-02", StepStatus::Done)]
    );
}

/// Many hosts are opened at once; one that cannot be reached is named in the error.
#[test]
fn connections_to_many_hosts_open_together_and_an_unreachable_one_is_named() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let uris: Vec<String> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| fleet(d.path(), &[&format!("vm-{i}")]))
        .collect();
    let connections = virtplan::ops::open(uris.iter().map(virtplan::uri::Uri::from)).unwrap();
    assert_eq!(connections.len(), 4);
    let missing = "test:///nonexistent-virtplan-host/node.xml";
    let err = virtplan::ops::open(
        uris.iter()
            .map(String::as_str)
            .chain([missing])
            .map(virtplan::uri::Uri::from),
    )
    .err()
    .expect("an unreachable host fails the open")
    .to_string();
    assert!(err.contains(missing), "{err}");
}

/// Regression (issue 14): a re-planned `apply PLAN` (a resume, not a saved plan) re-resolved a
/// pattern whose set its lockfile had already recorded, so a domain that started matching
/// since was planned and acted on without ever being reviewed with the others.
#[test]
fn regression_a_replanned_apply_widened_the_set_its_lockfile_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path(), &["web-01", "web-02", "db-01"]);
    let plan: PathBuf = dir.path().join("plan.yaml");
    // The lockfile records each step's set, web-01 and web-02, before anything runs (here
    // written as the first `apply` writes it, then nothing ran: an interrupted window).
    std::fs::write(
        &plan,
        format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vms: {{ match: \"web-*\" }}\n    autostart: true\n  - at: 2020-01-01T04:00:00Z\n    vms: {{ match: \"web-*\" }}\n    title: patched\n"
        ),
    )
    .unwrap();
    let lock_path = plan.with_extension("lock");
    let recorded = |lock: &virtplan::lockfile::Lockfile, step: usize| -> Vec<String> {
        lock.steps
            .iter()
            .filter(|r| r.step == step)
            .map(|r| r.vm.clone())
            .collect()
    };
    {
        let store = LockStore::open(&lock_path, "").unwrap();
        let file = plan_file::load(&plan, &LoadContext::from(Config::default())).unwrap();
        let mut connections = Connections::new();
        connections.insert(
            uri.as_str().into(),
            Arc::new(Libvirt::connect(uri.as_str()).unwrap()),
        );
        let reviewed = planner::project(&PlanInput {
            file: &file,
            connections: &connections,
            connect_override: None,
            now: now(),
            progress: &store,
        })
        .unwrap();
        // What the first `apply` writes before it runs anything.
        store.reconcile(&reviewed).unwrap();
        assert_eq!(recorded(&store.snapshot(), 2), ["web-01", "web-02"]);
    }
    // web-03 appears; nobody reviewed it.
    fleet(dir.path(), &["web-01", "web-02", "web-03", "db-01"]);

    let out = run(&["plan", plan.to_str().unwrap(), "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms: Vec<&str> = json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["step"] == 2)
        .map(|c| c["vm"].as_str().unwrap())
        .collect();
    assert_eq!(vms, ["web-01", "web-02"], "{json}");
    let warnings = json["warnings"].to_string();
    assert!(
        warnings.contains("web-03 (")
            && warnings.contains("now matches `web-*` of step 2 but is not in the set the lockfile recorded for it: it is not touched"),
        "{warnings}"
    );

    // The resumed `apply PLAN` runs step 1 on the recorded web-01 and web-02 only (step 2's
    // time is long past: missed), and records nothing for web-03.
    let out = run(&["apply", plan.to_str().unwrap(), "--auto-approve"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("now matches `web-*` of step 1 but is not in the set"),
        "{said}"
    );
    let lock = LockStore::read(&lock_path).unwrap();
    assert_eq!(recorded(&lock, 1), ["web-01", "web-02"], "{said}");
    assert_eq!(recorded(&lock, 2), ["web-01", "web-02"], "{said}");

    // A recorded domain that was deleted since is an error at the pattern, never dropped
    // silently.
    fleet(dir.path(), &["web-01", "web-03", "db-01"]);
    let out = run(&["plan", plan.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("plan.yaml:4:")
            && said.contains("web-02 (")
            && said.contains("was matched by `vms: {match: \"web-*\"}` and recorded in the lockfile, but no longer exists on test:///"),
        "{said}"
    );
}
