//! Operator conventions through the CLI binary: `--no-color`, `-q`/`-v`, `--version`,
//! completions and man pages, `schema status`, `LIBVIRT_DEFAULT_URI`, host aliases for
//! `--connect`, `apply --lock-timeout`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{ExecutorLock, StepStatus};
use virtplan::state::Kib;

use crate::support::cli::Cli;
use crate::support::helpers::{at, now, spawn_piped, wait_for_lock};

/// A test-driver host with one shut-off domain `web-01` (1 GiB of 2 GiB) in a temporary folder.
struct Rig {
    dir: tempfile::TempDir,
    uri: String,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let web = FleetDomain::new("web-01")
            .uuid("7b0c4f4e-3c1a-4c36-9f6e-0a6d1c2b3e01")
            .memory(Kib(1 << 20), Kib(2 << 20))
            .vcpus(1, 2)
            .running(false);
        let uri = write_fleet(dir.path(), &[web]).unwrap();
        Self { dir, uri }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A plan against the rig's host: `version: 1`, `connection:`, then `rest` (settings and
    /// `steps:`).
    fn connected(&self, name: &str, rest: &str) -> PathBuf {
        self.write(
            name,
            &format!("version: 1\nconnection: {}\n{rest}", self.uri),
        )
    }

    /// A plan whose one step (no `at`: it runs when apply starts) sets memory to 1 GiB.
    fn plan(&self, name: &str, connection: Option<&str>) -> PathBuf {
        let connection = connection.map_or_else(String::new, |c| format!("connection: {c}\n"));
        self.write(
            name,
            &format!("version: 1\n{connection}steps:\n  - vm: web-01\n    memory: 1GiB\n"),
        )
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn version_names_the_libvirt_it_was_built_against() {
    let expected = Command::new("pkg-config")
        .args(["--modversion", "libvirt"])
        .output()
        .expect("pkg-config is needed to build virtplan");
    let expected = String::from_utf8_lossy(&expected.stdout).trim().to_owned();
    assert!(!expected.is_empty());
    let ran = Cli::new().arg("--version").run();
    assert_eq!(
        ran.stdout.trim(),
        format!(
            "virtplan {} (built against libvirt {expected})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn no_color_wins_over_color_always() {
    let rig = Rig::new();
    let bad = rig.write("bad.yaml", "version: 1\nsteps: []\nbogus: 1\n");
    let coloured = Cli::new()
        .args(["--color", "always", "validate", s(&bad)])
        .status(1)
        .run();
    assert!(coloured.stderr.contains('\u{1b}'), "{}", coloured.stderr);
    let plain = Cli::new()
        .args(["--color", "always", "--no-color", "validate", s(&bad)])
        .status(1)
        .stderr_contains("error:")
        .run();
    assert!(!plain.stderr.contains('\u{1b}'), "{}", plain.stderr);
}

#[test]
fn quiet_keeps_results_and_drops_status_messages() {
    let rig = Rig::new();
    let plan = rig.plan("web.yaml", Some(&rig.uri));
    let saved = rig.path("web.plan.json");
    Cli::new()
        .args(["plan", s(&plan), "--out", s(&saved)])
        .stderr_contains("Saved the plan")
        .run();
    let quiet = Cli::new()
        .args(["-q", "plan", s(&plan), "--out", s(&saved)])
        .stdout_contains("web-01")
        .run();
    assert_eq!(quiet.stderr, "", "-q prints nothing but errors");
    let applied = Cli::new()
        .args(["-q", "apply", s(&plan), "--auto-approve"])
        .stdout_contains("Result:")
        .run();
    assert_eq!(applied.stderr, "", "-q apply: no progress lines");
    // An error still shows under -q.
    Cli::new()
        .args(["-q", "status", s(&rig.path("nope.yaml"))])
        .status(1)
        .stderr_contains("no such plan file")
        .run();
}

#[test]
fn schema_status_is_the_checked_in_file() {
    let ran = Cli::new().args(["schema", "status"]).run();
    let checked_in = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/status.schema.json"
    ))
    .unwrap();
    assert_eq!(ran.stdout, checked_in);
    let json: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(json["title"], "StatusDoc");
}

/// Commands that completions and the man page must name.
const COMMANDS: [&str; 6] = ["validate", "plan", "apply", "status", "watch", "schema"];

#[test]
fn completions_are_generated_for_every_command() {
    let bash = Cli::new().args(["completions", "bash"]).run();
    for word in COMMANDS.into_iter().chain(["--lock-timeout", "--no-color"]) {
        assert!(bash.stdout.contains(word), "bash completion lacks {word}");
    }
    // The script is valid bash.
    if let Ok(out) = Command::new("bash")
        .args(["-n", "-c", &bash.stdout])
        .stdin(Stdio::null())
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Cli::new()
        .args(["completions", "zsh"])
        .stdout_contains("#compdef virtplan")
        .run();
    Cli::new()
        .args(["completions", "fish"])
        .stdout_contains("complete -c virtplan")
        .run();
    Cli::new()
        .args(["completions", "tcsh"])
        .status(1)
        .stderr_contains("possible values: bash, zsh, fish, elvish, powershell")
        .run();
}

#[test]
fn man_page_lists_every_command_and_writes_one_page_each() {
    let ran = Cli::new().arg("man").run();
    assert!(ran.stdout.starts_with(".ie"), "{}", &ran.stdout[..40]);
    assert!(ran.stdout.contains(".TH virtplan 1"));
    for sub in COMMANDS.into_iter().chain(["completions", "man"]) {
        assert!(ran.stdout.contains(sub), "man page lacks {sub}");
    }
    let dir = tempfile::tempdir().unwrap();
    Cli::new()
        .args(["man", "--out-dir", s(dir.path())])
        .stderr_contains("man pages to")
        .run();
    let apply = std::fs::read_to_string(dir.path().join("virtplan-apply.1")).unwrap();
    assert!(apply.contains(".TH virtplan-apply 1"), "{apply}");
    assert!(apply.contains("lock\\-timeout"), "{apply}");
}

#[test]
fn libvirt_default_uri_is_the_lowest_precedence_connection() {
    let rig = Rig::new();
    let bare = rig.plan("bare.yaml", None);
    // Nothing names a connection: the environment's default is used.
    Cli::new()
        .args(["plan", s(&bare), "--format", "json"])
        .env("LIBVIRT_DEFAULT_URI", &rig.uri)
        .stdout_contains(format!("\"connection\": \"{}\"", rig.uri))
        .run();
    // Without it, the error says how to name one.
    Cli::new()
        .args(["plan", s(&bare)])
        .status(1)
        .stderr_contains("the step has no libvirt connection")
        .run();
    // The plan's connection wins over the environment (a bogus default is never opened).
    let named = rig.plan("named.yaml", Some(&rig.uri));
    Cli::new()
        .args(["plan", s(&named)])
        .env("LIBVIRT_DEFAULT_URI", "test:///nonexistent/node.xml")
        .run();
    // virtplan.toml wins over the environment too.
    let sub = rig.write(
        "repo/virtplan.toml",
        &format!("connection = \"{}\"\n", rig.uri),
    );
    let bare_in_repo = rig.plan("repo/bare.yaml", None);
    assert!(sub.exists());
    Cli::new()
        .args(["plan", s(&bare_in_repo)])
        .env("LIBVIRT_DEFAULT_URI", "test:///nonexistent/node.xml")
        .run();
}

#[test]
fn host_aliases_resolve_for_connect_and_the_config_default() {
    let rig = Rig::new();
    rig.write(
        "repo/virtplan.toml",
        &format!("connection = \"lab\"\n[hosts]\nlab = \"{}\"\n", rig.uri),
    );
    let plan = rig.plan("repo/web.yaml", None);
    Cli::new()
        .args(["plan", s(&plan), "--format", "json"])
        .stdout_contains(format!("\"connection\": \"{}\"", rig.uri))
        .run();
    Cli::new()
        .args(["plan", s(&plan), "--connect", "lab", "--format", "json"])
        .stdout_contains(format!("\"connection\": \"{}\"", rig.uri))
        .run();
    Cli::new()
        .args(["plan", s(&plan), "--connect", "labb"])
        .status(1)
        .stderr_contains("--connect labb: neither a libvirt URI")
        .stderr_contains("(hosts: lab)")
        .run();
    // An unknown alias as the config's default is a located error.
    rig.write("other/virtplan.toml", "connection = \"nowhere\"\n");
    let other = rig.plan("other/web.yaml", None);
    Cli::new()
        .args(["validate", s(&other)])
        .status(1)
        .stderr_contains("virtplan.toml:1:14")
        .stderr_contains("connection `nowhere` is neither a libvirt URI nor a host in [hosts]")
        .run();
}

#[test]
fn lock_timeout_waits_for_the_holder_then_applies() {
    let rig = Rig::new();
    let plan = rig.plan("web.yaml", Some(&rig.uri));
    let pid = plan.with_extension("lock.pid");
    let held = ExecutorLock::acquire(&pid, SystemClock.now()).unwrap();
    // Without --lock-timeout a held plan is refused at once, with the way to wait.
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve"])
        .status(1)
        .stderr_contains("another virtplan is applying this plan")
        .stderr_contains("--lock-timeout")
        .run();
    // With a timeout shorter than the hold, it gives up after the timeout.
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve", "--lock-timeout", "1s"])
        .status(1)
        .stderr_contains("Waiting up to 1s for the executor lock")
        .stderr_contains("still held after waiting 1s")
        .run();
    // With a longer one, it applies once the holder lets go.
    let release = std::thread::spawn(move || {
        SystemClock.sleep(Duration::from_millis(800));
        drop(held);
    });
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve", "--lock-timeout", "30s"])
        .stderr_contains("Waiting up to 30s for the executor lock")
        .stdout_contains("done")
        .run();
    release.join().unwrap();
    Cli::new()
        .args([
            "apply",
            s(&plan),
            "--auto-approve",
            "--lock-timeout",
            "soon",
        ])
        .status(1)
        .stderr_contains("invalid value 'soon' for '--lock-timeout <DURATION>'")
        .run();
}

fn status_json(plan: &Path) -> serde_json::Value {
    let ran = Cli::new()
        .args(["status", s(plan), "--format", "json"])
        .env("USER", "tester")
        .run();
    serde_json::from_str(&ran.stdout).unwrap()
}

/// Waits (in real time, bounded) until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = SystemClock.now();
    while !ready() {
        assert!(
            SystemClock.now() - start < chrono::Duration::seconds(20),
            "timed out waiting for {what}"
        );
        SystemClock.sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancel_a_step_of_a_plan_never_applied_then_apply_skips_it() {
    let rig = Rig::new();
    let plan = rig.connected(
        "web.yaml",
        "steps:\n  - vm: web-01\n    memory: 1GiB\n  - vm: web-01\n    vcpus: 2\n",
    );
    Cli::new()
        .args(["cancel", s(&plan), "--step", "2"])
        .env("USER", "tester")
        .env_remove_sudo()
        .stdout_contains("Cancelled step 2 (web-01: vcpus), when apply starts")
        .stderr_contains("Recorded by tester@")
        .run();
    let json = status_json(&plan);
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["status"], "pending");
    assert_eq!(steps[1]["status"], "cancelled");
    assert!(steps[1]["cancelled_by"]
        .as_str()
        .unwrap()
        .starts_with("tester@"));
    assert!(steps[1]["cancelled_at"].is_string());
    // Cancelling it again says so and changes nothing.
    Cli::new()
        .args(["cancel", s(&plan), "--step", "2"])
        .stderr_contains("already cancelled")
        .run();
    Cli::new()
        .args(["cancel", s(&plan), "--step", "3"])
        .status(1)
        .stderr_contains("has no step 3: its steps are numbered 1 to 2")
        .run();
    // apply runs step 1 and records step 2 cancelled, with who.
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve"])
        .stdout_contains("cancelled by tester@")
        .run();
    let lock = virtplan::lockfile::LockStore::read(&plan.with_extension("lock")).unwrap();
    let statuses: Vec<_> = lock.steps.iter().map(|r| (r.step, r.status)).collect();
    assert_eq!(
        statuses,
        [(1, StepStatus::Done), (2, StepStatus::Cancelled)]
    );
    // A done step cannot be cancelled; with nothing left, a plain cancel is a no-op.
    Cli::new()
        .args(["cancel", s(&plan), "--step", "1"])
        .status(1)
        .stderr_contains("step 1 of")
        .stderr_contains("cannot be cancelled: it is done on web-01")
        .run();
    Cli::new()
        .args(["cancel", s(&plan)])
        .stderr_contains("Nothing to cancel")
        .run();
}

#[test]
fn cancel_while_apply_waits_stops_the_step_before_it_starts() {
    let rig = Rig::new();
    // Far enough ahead that step 1 and the cancel finish first on a loaded machine.
    let later = at(now(), 8);
    let plan = rig.connected(
        "web.yaml",
        &format!(
            "grace: 1m\nsteps:\n  - vm: web-01\n    memory: 1GiB\n  - at: {later}\n    vm: web-01\n    vcpus: 2\n  - at: {later}\n    vm: web-01\n    autostart: true\n"
        ),
    );
    let apply = spawn_piped(&["apply", s(&plan), "--auto-approve"]);
    let lock_path = plan.with_extension("lock");
    wait_for_lock(&plan, Duration::from_secs(20), "step 1 never done", |l| {
        l.steps
            .iter()
            .any(|r| r.step == 1 && r.status.as_str() == "done")
    });
    // The executor holds the plan and sleeps towards steps 2 and 3.
    Cli::new()
        .args(["cancel", s(&plan), "--step", "2"])
        .env("USER", "night-operator")
        .stdout_contains("Cancelled step 2 (web-01: vcpus 1 → 2), due ")
        .run();
    let out = apply.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = virtplan::lockfile::LockStore::read(&lock_path).unwrap();
    let by_step: Vec<_> = lock
        .steps
        .iter()
        .map(|r| (r.step, r.status.as_str(), r.started_at.is_some()))
        .collect();
    assert_eq!(
        by_step,
        [
            (1, "done", true),
            (2, "cancelled", false),
            (3, "done", true)
        ]
    );
    assert!(lock.steps[1]
        .message
        .contains("cancelled by night-operator@"));
    // status shows it, with who.
    let json = status_json(&plan);
    assert!(json["steps"][1]["cancelled_by"]
        .as_str()
        .unwrap()
        .starts_with("night-operator@"));
}

fn ls_json(args: &[&str], dir: &Path) -> serde_json::Value {
    let ran = Cli::new()
        .arg("ls")
        .args(args)
        .args(["--format", "json"])
        .current_dir(dir)
        .run();
    serde_json::from_str(&ran.stdout).unwrap()
}

fn plan_named<'a>(doc: &'a serde_json::Value, file: &str) -> &'a serde_json::Value {
    doc["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plan"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("{file} not listed: {doc:#}"))
}

#[test]
fn ls_lists_never_applied_applied_held_invalid_and_removed_plans() {
    let rig = Rig::new();
    let uri = &rig.uri;
    rig.write(
        "plans/web.yaml",
        &format!(
            "version: 1\nname: web-tier\nconnection: {uri}\ntimezone: America/Toronto\nsteps:\n  - at: 2030-01-15 04:05\n    vms: [web-01, web-02]\n    memory: 1GiB\n  - at: 2030-01-15 04:10\n    vm: web-01\n    vcpus: 2\n"
        ),
    );
    let applied = rig.plan("plans/applied.yaml", Some(uri));
    let gone = rig.plan("plans/gone.yaml", Some(uri));
    rig.write(
        "plans/broken.yaml",
        "version: 1\nsteps:\n  - vm: web-01\n    memroy: 1GiB\n",
    );
    for plan in [&applied, &gone] {
        Cli::new().args(["apply", s(plan), "--auto-approve"]).run();
    }
    std::fs::remove_file(&gone).unwrap();
    let held = ExecutorLock::acquire(&rig.path("plans/web.lock.pid"), SystemClock.now()).unwrap();

    let doc = ls_json(&[], &rig.path("plans"));
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["plans"].as_array().unwrap().len(), 4, "{doc:#}");

    let web = plan_named(&doc, "web.yaml");
    assert_eq!(web["name"], "web-tier");
    assert_eq!(web["state"], "ok");
    assert_eq!(web["timezone"], "America/Toronto");
    assert_eq!(web["lockfile_exists"], false);
    assert_eq!(
        web["counts"]["pending"], 3,
        "two domains of step 1, one of step 2"
    );
    assert_eq!(web["next"]["step"], 1);
    assert_eq!(web["next"]["vms"], serde_json::json!(["web-01", "web-02"]));
    assert_eq!(web["next"]["what"], "memory");
    assert_eq!(web["next"]["at"], "2030-01-15T09:05:00Z");
    assert!(web["next"]["in_seconds"].as_i64().unwrap() > 0);
    assert_eq!(web["holder"]["pid"], std::process::id());

    let applied = plan_named(&doc, "applied.yaml");
    assert_eq!(applied["state"], "ok");
    assert_eq!(applied["counts"]["done"], 1);
    assert_eq!(applied["next"], serde_json::Value::Null);
    assert_eq!(applied["holder"], serde_json::Value::Null);
    assert_eq!(applied["lockfile_exists"], true);

    let gone = plan_named(&doc, "gone.yaml");
    assert_eq!(gone["state"], "removed");
    assert_eq!(gone["counts"]["done"], 1);

    let broken = plan_named(&doc, "broken.yaml");
    assert_eq!(broken["state"], "invalid");
    assert!(
        broken["problem"]
            .as_str()
            .unwrap()
            .contains("broken.yaml:4:5"),
        "{broken:#}"
    );
    drop(held);

    // Human output: the plan's zone with its abbreviation, and how far away.
    Cli::new()
        .args(["ls", "web.yaml"])
        .current_dir(rig.path("plans"))
        .stdout_contains("web.yaml (web-tier)")
        .stdout_contains("next:     step 1 web-01, web-02 memory at 2030-01-15 04:05 EST (in ")
        .stdout_contains("steps:    3 pending")
        .stdout_contains("plans/web.lock (not created yet: never applied)")
        .run();
    Cli::new()
        .args(["ls", "nowhere.yaml"])
        .current_dir(rig.path("plans"))
        .status(1)
        .stderr_contains("nowhere.yaml: no such plan file or folder")
        .run();
}

#[test]
fn state_dir_keeps_lockfiles_out_of_the_plan_folder() {
    let rig = Rig::new();
    rig.write("repo/virtplan.toml", "state_dir = \"../state\"\n");
    let plan = rig.plan("repo/plans/web.yaml", Some(&rig.uri));
    // Same stem in another folder of the same repository: its own lockfile.
    let other = rig.plan("repo/other/web.yaml", Some(&rig.uri));
    Cli::new().args(["apply", s(&plan), "--auto-approve"]).run();
    Cli::new().args(["cancel", s(&other), "--step", "1"]).run();
    Cli::new()
        .args(["apply", s(&other), "--auto-approve"])
        .run();
    let in_plans: Vec<String> = std::fs::read_dir(rig.path("repo/plans"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(in_plans, ["web.yaml"], "nothing but the plan in its folder");
    let mut state: Vec<String> = std::fs::read_dir(rig.path("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    state.sort();
    // Per plan a lockfile, beside it the cancel file (the executor creates it to lock it) and,
    // while an executor runs, its pid file.
    let lockfiles: Vec<&String> = state
        .iter()
        .filter(|n| Path::new(n).extension().is_some_and(|e| e == "lock"))
        .collect();
    assert_eq!(lockfiles.len(), 2, "{state:?}");
    assert!(state.iter().all(|n| n.starts_with("web-")), "{state:?}");
    // status, ls and plan find it there.
    let json = status_json(&plan);
    assert_eq!(json["steps"][0]["status"], "done");
    let json = status_json(&other);
    assert_eq!(json["steps"][0]["status"], "cancelled");
    Cli::new()
        .args(["plan", s(&plan)])
        .stdout_contains("✓")
        .run();
    let doc = ls_json(&["plans"], &rig.path("repo"));
    let web = plan_named(&doc, "web.yaml");
    let lockfile = web["lockfile"].as_str().unwrap();
    assert!(lockfile.contains("/state/web-"), "{lockfile}");
    assert_eq!(web["lockfile_exists"], true);
    // A removed plan's leftover lockfile in the state folder is still listed.
    std::fs::remove_file(&plan).unwrap();
    let doc = ls_json(&["plans"], &rig.path("repo"));
    let gone = plan_named(&doc, "web.yaml");
    assert_eq!(gone["state"], "removed");
    assert_eq!(gone["counts"]["done"], 1);
    // An empty state_dir is a located error.
    rig.write("bad/virtplan.toml", "state_dir = \"\"\n");
    let bad = rig.plan("bad/web.yaml", Some(&rig.uri));
    Cli::new()
        .args(["validate", s(&bad)])
        .status(1)
        .stderr_contains("virtplan.toml:1:13")
        .stderr_contains("state_dir is empty")
        .run();
}

/// On a terminal the next step is one live line redrawn in place (`script` gives apply a pty).
#[test]
fn on_a_terminal_apply_redraws_one_live_line() {
    let rig = Rig::new();
    let plan = rig.connected(
        "web.yaml",
        &format!(
            "timezone: America/Toronto\ngrace: 1m\nsteps:\n  - at: {}\n    vm: web-01\n    vcpus: 2\n",
            // Far enough ahead that a loaded machine still shows a countdown ("in 4s"), not "now".
            at(now(), 6)
        ),
    );
    let command = format!(
        "{} apply {} --auto-approve",
        env!("CARGO_BIN_EXE_virtplan"),
        s(&plan)
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux runs apply on a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\r\u{1b}[2Knext: step 1 web-01 vcpus 1 → 2 at "),
        "{text:?}"
    );
    assert!(
        text.contains(" EST, in ") || text.contains(" EDT, in "),
        "{text:?}"
    );
    // The live line is cleared before the result line.
    assert!(text.contains("\r\u{1b}[2K"), "{text:?}");
    assert!(
        text.lines()
            .any(|l| l.contains(" EST step 1 web-01: done")
                || l.contains(" EDT step 1 web-01: done")),
        "{text:?}"
    );
}

/// `ExecStart=` of an example unit, with `/srv/plans` replaced by `checkout`.
fn exec_start(unit: &str, checkout: &Path) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/ops")
            .join(unit),
    )
    .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .replace("/srv/plans", s(checkout))
}

fn sh(dir: &Path, command: &str) {
    let out = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{command}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CI model replayed: two plans merged in one commit reach the watch service's checkout
/// through the pull unit's own command, and both run at their times; no CI job waits.
#[test]
#[allow(clippy::too_many_lines)] // one replayed story, in the order it happens
fn ci_model_two_plans_merged_together_both_run_at_their_times() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let web = |name: &str, uuid: &str| {
        FleetDomain::new(name)
            .uuid(uuid)
            .memory(Kib(1 << 20), Kib(2 << 20))
            .vcpus(1, 2)
            .running(false)
    };
    let uri = write_fleet(
        root,
        &[
            web("web-01", "7b0c4f4e-3c1a-4c36-9f6e-0a6d1c2b3e01"),
            web("db-01", "7b0c4f4e-3c1a-4c36-9f6e-0a6d1c2b3e02"),
        ],
    )
    .unwrap();
    sh(
        root,
        "git init -q --bare origin.git && git clone -q origin.git work 2>/dev/null",
    );
    let work = root.join("work");
    std::fs::create_dir_all(work.join("plans")).unwrap();
    std::fs::write(
        work.join("plans/virtplan.toml"),
        format!(
            "connection = \"{uri}\"\nstate_dir = \"{}\"\ngrace = \"1m\"\n",
            s(&root.join("state"))
        ),
    )
    .unwrap();
    sh(
        &work,
        "git add -A && git commit -qm init && git push -q origin HEAD",
    );
    // The host: its own checkout, and the watch service on it.
    sh(root, "git clone -q origin.git srv");
    let srv = root.join("srv");
    let watch = spawn_piped(&["watch", s(&srv.join("plans"))]);

    // A pull request with two plans, merged in one commit. Its CI job: validate and plan.
    let one_step = |file: &str, secs: i64, vm: &str, change: &str| {
        let at = at(now(), secs);
        let body = format!("version: 1\nsteps:\n  - at: {at}\n    vm: {vm}\n    {change}\n");
        std::fs::write(work.join("plans").join(file), body).unwrap();
    };
    one_step("web.yaml", 6, "web-01", "vcpus: 2");
    one_step("db.yaml", 7, "db-01", "memory: 2GiB");
    Cli::new()
        .args(["validate", "plans/web.yaml", "plans/db.yaml"])
        .current_dir(&work)
        .run();
    Cli::new()
        .args(["plan", "plans/web.yaml", "--format", "markdown"])
        .current_dir(&work)
        .stdout_contains("web-01")
        .run();
    sh(
        &work,
        "git add -A && git commit -qm 'two plans' && git push -q origin HEAD",
    );
    // The pull timer fires: the unit's own command, on the host's checkout.
    sh(root, &exec_start("virtplan-pull.service", &srv));

    let state = root.join("state");
    let done = |plan: &str| {
        let paths = virtplan::overview::StatePaths::of(&srv.join("plans").join(plan), Some(&state));
        virtplan::lockfile::LockStore::read(&paths.lockfile)
            .ok()
            .filter(|l| l.steps.iter().all(|r| r.status == StepStatus::Done) && !l.steps.is_empty())
    };
    wait_for("both plans done", || {
        done("web.yaml").is_some() && done("db.yaml").is_some()
    });
    for plan in ["web.yaml", "db.yaml"] {
        let lock = done(plan).unwrap();
        for r in &lock.steps {
            let (due, started) = (r.at.unwrap(), r.started_at.unwrap());
            assert!(started >= due, "{plan} started early: {r:?}");
            assert!(
                started - due < chrono::Duration::seconds(5),
                "{plan} late: {r:?}"
            );
        }
    }
    assert!(
        !srv.join("plans/web.lock").exists(),
        "state lives outside the checkout"
    );
    // The service stops cleanly.
    sh(root, &format!("kill -TERM {}", watch.id()));
    let out = watch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The README's two-minute tour, command by command: test driver only, no root, no daemon.
#[test]
fn readme_tour_runs_without_root_or_daemon() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tour.yaml"),
        dir.path().join("tour.yaml"),
    )
    .unwrap();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let run = |args: &[&str]| {
        Cli::new()
            .args(args.iter().copied())
            .current_dir(dir.path())
    };
    for command in [
        "virtplan validate tour.yaml",
        "virtplan plan tour.yaml",
        "virtplan ls",
        "virtplan cancel tour.yaml --step 3",
        "virtplan apply tour.yaml --auto-approve",
        "virtplan status tour.yaml",
    ] {
        assert!(
            readme.contains(command),
            "the README's tour runs `{command}`"
        );
    }
    run(&["validate", "tour.yaml"])
        .stdout_contains("ok tour.yaml")
        .run();
    run(&["plan", "tour.yaml"])
        .stdout_contains("power        running → shutoff")
        .stdout_contains("memory       2GiB → 1GiB")
        .run();
    run(&["ls"])
        .stdout_contains("next:     step 1 test power when apply starts")
        .run();
    run(&["cancel", "tour.yaml", "--step", "3"])
        .stdout_contains("Cancelled step 3 (test: autostart)")
        .run();
    run(&["apply", "tour.yaml", "--auto-approve"])
        .stdout_contains("2 done, 0 failed, 0 missed, 0 skipped, 1 cancelled")
        .run();
    run(&["status", "tour.yaml"])
        .stdout_contains("cancelled step 3 test")
        .stdout_contains(" EST")
        .run();
}
