//! `--only VM` / `--exclude VM` for `plan` and `apply` on a test-driver host: what plan shows,
//! what apply runs, the filter kept in a saved plan and recorded in the lockfile, a changed
//! filter explained (or refused while a step is interrupted), and values that match nothing.

use std::path::{Path, PathBuf};

use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{LockStore, StepStatus};

use crate::support::helpers::{text, virtplan};

/// A test-driver host with web-01, web-02 and db-01 (shut off), and a plan: step 1 on
/// `web-*`, step 2 on db-01, both `autostart: true`, run at once.
fn rig(dir: &Path, extra_step: &str) -> PathBuf {
    let domains: Vec<FleetDomain> = [("web-01", 1), ("web-02", 2), ("db-01", 3)]
        .into_iter()
        .map(|(n, i)| FleetDomain::new(n).uuid(format!("00000000-0000-4000-8000-{i:012}")))
        .collect();
    let uri = write_fleet(dir, &domains).unwrap();
    let plan = dir.join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vms: {{ match: \"web-*\" }}\n    autostart: true\n  - vm: db-01\n    autostart: true\n{extra_step}"
        ),
    )
    .unwrap();
    plan
}

/// Each recorded step's domain and status, sorted by domain.
fn records(plan: &Path) -> Vec<(String, StepStatus)> {
    let mut got: Vec<_> = LockStore::read(&plan.with_extension("lock"))
        .unwrap()
        .steps
        .iter()
        .map(|r| (r.vm.clone(), r.status))
        .collect();
    got.sort();
    got
}

#[test]
fn plan_shows_and_apply_runs_only_what_the_filter_selects() {
    let dir = tempfile::tempdir().unwrap();
    let plan = rig(dir.path(), "");
    let p = plan.to_str().unwrap();

    let out = virtplan(&["plan", p, "--only", "web-01"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("Filter --only web-01: 2 of the plan's domains left out, not planned or run: db-01, web-02."),
        "{shown}"
    );
    assert!(
        shown.contains("web-01") && !shown.contains("step 1  web-02"),
        "{shown}"
    );

    // Globs, repeated flags, and --exclude; JSON carries the filter.
    let out = virtplan(
        &[
            "plan",
            p,
            "--only",
            "web-*",
            "--only",
            "db-01",
            "--exclude",
            "web-0[2-9]",
            "--format",
            "json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["filter"]["only"],
        serde_json::json!(["web-*", "db-01"]),
        "{json}"
    );
    assert_eq!(
        json["filter"]["exclude"],
        serde_json::json!(["web-0[2-9]"]),
        "{json}"
    );
    assert_eq!(
        json["filter"]["left_out"],
        serde_json::json!(["web-02"]),
        "{json}"
    );
    let vms: Vec<&str> = json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["vm"].as_str().unwrap())
        .collect();
    assert_eq!(vms, ["web-01", "db-01"], "{json}");

    // apply acts on the selection only and records the filter.
    let out = virtplan(&["apply", p, "--only", "web-01", "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The domains it left out are recorded pending (not run), so the pattern's set stays whole.
    assert_eq!(
        records(&plan),
        [
            ("db-01".to_owned(), StepStatus::Pending),
            ("web-01".to_owned(), StepStatus::Done),
            ("web-02".to_owned(), StepStatus::Pending),
        ]
    );
    let lock = LockStore::read(&plan.with_extension("lock")).unwrap();
    assert!(
        lock.steps
            .iter()
            .any(|r| r.message == "left out of a run by --only web-01; not run yet"),
        "{lock:?}"
    );
    assert_eq!(lock.filter.unwrap().only, ["web-01"]);
    status_names_the_filter(p, "--only web-01", &serde_json::json!({"only": ["web-01"]}));

    // A later apply with another filter is explained, keeps web-01's record, and runs the
    // rest; the pattern's set is not pinned to the one domain the first filter let through.
    let out = virtplan(&["apply", p, "--exclude", "web-01", "--auto-approve"], &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("Note: the last apply of this plan ran with --only web-01; this run has --exclude web-01"),
        "{said}"
    );
    assert!(
        !said.contains("not in the set the lockfile recorded"),
        "{said}"
    );
    assert_eq!(
        records(&plan),
        [
            ("db-01".to_owned(), StepStatus::Done),
            ("web-01".to_owned(), StepStatus::Done),
            ("web-02".to_owned(), StepStatus::Done),
        ]
    );
    let lock = LockStore::read(&plan.with_extension("lock")).unwrap();
    assert_eq!(lock.filter.unwrap().exclude, ["web-01"]);
}

#[test]
fn a_filter_value_that_matches_no_domain_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let plan = rig(dir.path(), "");
    let p = plan.to_str().unwrap();
    for cmd in ["plan", "apply"] {
        let mut args = vec![
            cmd,
            p,
            "--only",
            "web-9",
            "--exclude",
            "db-*",
            "--exclude",
            "cache-*",
        ];
        if cmd == "apply" {
            args.push("--auto-approve");
        }
        let out = virtplan(&args, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(
            said.contains("--only web-9, --exclude 'cache-*' match no domain of")
                && said.contains("its domains are: db-01, web-01, web-02."),
            "{said}"
        );
    }
    assert!(!plan.with_extension("lock").exists() || records(&plan).is_empty());
    let out = virtplan(&["plan", p, "--exclude", "web-["], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--exclude web-[: not a valid pattern"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_excluded_domain_is_not_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    // `ghost` does not exist: planning fails, unless the run leaves it out.
    let plan = rig(dir.path(), "  - vm: ghost\n    autostart: true\n");
    let p = plan.to_str().unwrap();
    let out = virtplan(&["plan", p], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no domain named `ghost`"),
        "{}",
        text(&out)
    );
    let out = virtplan(&["plan", p, "--exclude", "ghost"], &[]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_saved_plan_carries_its_filter_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let plan = rig(dir.path(), "");
    let p = plan.to_str().unwrap();
    let saved = dir.path().join("plan.saved.json");
    let s = saved.to_str().unwrap();
    let out = virtplan(&["plan", p, "--exclude", "web-*", "--out", s], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = virtplan(&["apply", s, "--only", "web-01"], &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("is a saved plan and runs exactly as reviewed, with the filter it was made with (--exclude 'web-*')"),
        "{said}"
    );
    let out = virtplan(&["apply", s], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        records(&plan),
        [
            ("db-01".to_owned(), StepStatus::Done),
            ("web-01".to_owned(), StepStatus::Pending),
            ("web-02".to_owned(), StepStatus::Pending),
        ]
    );
    let lock = LockStore::read(&plan.with_extension("lock")).unwrap();
    assert_eq!(lock.filter.unwrap().exclude, ["web-*"]);
}

#[test]
fn a_resume_with_another_filter_is_refused_while_a_step_is_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let plan = rig(dir.path(), "");
    let p = plan.to_str().unwrap();
    let out = virtplan(&["apply", p, "--only", "web-01", "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // As if the run had been killed in the middle of web-01's step.
    let lock_path = plan.with_extension("lock");
    let lock = LockStore::read(&lock_path).unwrap();
    let r = lock
        .steps
        .iter()
        .find(|r| r.vm == "web-01")
        .unwrap()
        .clone();
    let store = LockStore::open(&lock_path, &lock.plan_sha256).unwrap();
    store
        .update(&r.step_id, &r.uuid, |r| r.status = StepStatus::Running)
        .unwrap();
    drop(store);
    let out = virtplan(&["apply", p, "--auto-approve"], &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("step 1 on web-01 was interrupted in a run with --only web-01; resume that run with the same filter first")
            && said.contains("nothing was applied"),
        "{said}"
    );
    assert!(records(&plan).contains(&("web-01".to_owned(), StepStatus::Running)));
}

/// `status` says which filter of the last apply left steps pending (it did not before), in
/// human and JSON output.
fn status_names_the_filter(p: &str, flags: &str, json_filter: &serde_json::Value) {
    let out = virtplan(&["status", p], &[]);
    let expected = format!(
        "The last apply ran with {flags}: the steps of the domains it left out are pending.\n"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&expected),
        "{}",
        text(&out)
    );
    let out = virtplan(&["status", p, "--format", "json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(&json["filter"], json_filter, "{json}");
}

/// Regression: the first apply of a plan with `--only` said "Note: the last apply of this
/// plan ran with no --only/--exclude filter", when no apply had run. Only a real change of
/// filter between applies is noted.
#[test]
fn a_first_filtered_apply_notes_no_change_of_filter() {
    let dir = tempfile::tempdir().unwrap();
    let plan = rig(dir.path(), "");
    let p = plan.to_str().unwrap();
    let out = virtplan(&["apply", p, "--only", "web-01", "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !text(&out).contains("Note: the last apply"),
        "{}",
        text(&out)
    );
    let out = virtplan(&["apply", p, "--auto-approve"], &[]);
    assert!(
        text(&out).contains("Note: the last apply of this plan ran with --only web-01"),
        "{}",
        text(&out)
    );
}
