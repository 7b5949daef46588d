//! `plan`: projection over generated test-driver fleets and a real QEMU domain, and the three
//! renderings (insta snapshots).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use virtplan::config::Config;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::plan_file::{self, LoadContext, PlanFile};
use virtplan::planner::{
    self, Action, ChangeAction, Connections, NoProgress, Plan, PlanError, PlanInput,
};
use virtplan::printer::Printer;
use virtplan::render;
use virtplan::state::Kib;

use crate::support::qemu::{qemu_uri, TestDomain};

/// Before every example's window, so nothing is in the past.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
}

fn gib(n: u64) -> Kib {
    Kib(n * 1024 * 1024)
}

/// A running web-01 with 1 GiB of 2 GiB, 1 of 2 vCPUs, RTC tracking boot.
fn web(name: &str) -> FleetDomain {
    FleetDomain::new(name)
        .memory(gib(1), gib(2))
        .vcpus(1, 2)
        .running(true)
        .clock(Some("utc"), Some("boot"))
}

struct Fixture {
    dir: tempfile::TempDir,
    uri: String,
}

impl Fixture {
    fn new(domains: &[FleetDomain]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uri = write_fleet(dir.path(), domains).unwrap();
        Self { dir, uri }
    }

    fn write_plan(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(path: &Path) -> PlanFile {
        plan_file::load(path, &LoadContext::from(Config::default()))
            .unwrap_or_else(|d| panic!("{}", d.render()))
    }

    fn project(&self, file: &PlanFile) -> Result<Plan, PlanError> {
        let mut connections = Connections::new();
        connections.insert(
            self.uri.clone().into(),
            Arc::new(Libvirt::connect(&self.uri).unwrap()),
        );
        planner::project(&PlanInput {
            file,
            connections: &connections,
            connect_override: Some(&self.uri.clone().into()),
            now: now(),
            progress: &NoProgress,
        })
    }

    fn plan(&self, text: &str) -> Plan {
        let path = self.write_plan("plan.yaml", text);
        let file = Self::load(&path);
        self.project(&file).unwrap_or_else(|e| panic!("{e}"))
    }

    fn problems(&self, text: &str) -> String {
        let path = self.write_plan("plan.yaml", text);
        let file = Self::load(&path);
        match self.project(&file) {
            Ok(plan) => panic!("expected problems, got a plan: {plan:?}"),
            Err(e) => e
                .to_string()
                .replace(&self.dir.path().display().to_string(), "[DIR]"),
        }
    }
}

fn classic(vm: &str) -> String {
    format!(
        "version: 1
timezone: America/Toronto
window: {{start: 2026-12-01 04:00, end: 2026-12-01 05:00}}
steps:
  - at: 2026-12-01 04:00
    vm: {vm}
    power: shutoff
  - at: +5m
    vm: {vm}
    memory: 3GiB
  - at: 2026-12-01 04:07
    vm: {vm}
    vcpus: 2
  - at: 2026-12-01 04:08
    vm: {vm}
    clock: {{ track: guest }}
  - at: 2026-12-01 04:10
    vm: {vm}
    power: running
"
    )
}

fn snapshot_settings(fx: &Fixture) -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(&regex_escape(&fx.dir.path().display().to_string()), "[DIR]");
    settings.add_filter(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[UUID]",
    );
    settings.add_filter(r#""sha256": "[0-9a-f]{64}""#, r#""sha256": "[SHA256]""#);
    settings.add_filter(r"sha256 `?[0-9a-f]{12}`?", "sha256 [SHA]");
    settings
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '/' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

#[test]
fn classic_window_renders_in_all_three_formats() {
    let fx = Fixture::new(&[web("web-01")]);
    let plan = fx.plan(&classic("web-01"));
    assert_eq!(plan.summary.change, 5, "{plan:#?}");
    snapshot_settings(&fx).bind(|| {
        insta::assert_snapshot!("classic_human", render::human(&plan, &Printer::plain()));
        insta::assert_snapshot!("classic_json", render::json(&plan));
        insta::assert_snapshot!("classic_markdown", render::markdown(&plan));
    });
}

#[test]
fn each_step_starts_from_the_state_the_previous_one_leaves() {
    let fx = Fixture::new(&[web("web-01")]);
    let plan = fx.plan(&classic("web-01"));
    let memory = plan.steps.iter().find(|s| s.step == 2).unwrap();
    assert_eq!(
        memory.before.power.as_str(),
        "shutoff",
        "step 1 powered it off"
    );
    // 3 GiB is above the 2 GiB maximum, but the domain is off then: the maximum is raised first.
    assert_eq!(
        memory.actions,
        vec![
            Action::SetMaxMemory { max: gib(3) },
            Action::SetMemory {
                memory: gib(3),
                live: false
            }
        ]
    );
    let boot = plan.steps.iter().find(|s| s.step == 5).unwrap();
    assert_eq!(boot.before.memory, gib(3));
    assert_eq!(boot.before.vcpus, 2);
    assert_eq!(boot.actions, vec![Action::Start]);
    let clock = plan
        .changes
        .iter()
        .find(|c| c.attribute == virtplan::attr::Attr::Clock)
        .unwrap();
    assert!(
        clock.notes.iter().any(|n| n.contains("step 5 boots")),
        "{clock:?}"
    );
    assert!(clock
        .xml_diff
        .as_deref()
        .unwrap()
        .contains("track=\"guest\""));
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn satisfied_steps_are_noops_not_hidden() {
    let fx = Fixture::new(&[web("web-01")]);
    let plan = fx.plan(
        "version: 1\nsteps:\n  - vm: web-01\n    power: running\n    memory: 1GiB\n    vcpus: 1\n    clock: {offset: utc, track: boot}\n",
    );
    assert_eq!(plan.summary.change, 0);
    assert_eq!(plan.summary.noop, 4);
    assert!(plan.changes.iter().all(|c| c.action == ChangeAction::Noop));
    assert!(plan.steps[0].actions.is_empty());
}

#[test]
fn memory_above_max_on_a_running_domain_is_refused_at_its_line() {
    let fx = Fixture::new(&[web("web-01")]);
    let msg = fx.problems("version: 1\nsteps:\n  - vm: web-01\n    memory: 3GiB\n");
    assert_eq!(
        msg,
        "[DIR]/plan.yaml:4:13: step 1 (web-01): `memory` 3GiB is above the maximum 2GiB of web-01, which is running at this step (help: a running domain cannot grow past its maximum: power it off in this step or an earlier one (the maximum is then raised), or raise `max_memory` while it is off)"
    );
}

#[test]
fn maxima_need_the_domain_off() {
    let fx = Fixture::new(&[web("web-01")]);
    let msg = fx.problems("version: 1\nsteps:\n  - vm: web-01\n    max_vcpus: 4\n  - vm: web-01\n    max_memory: 4GiB\n");
    assert!(
        msg.contains(
            "plan.yaml:4:16: step 1 (web-01): `max_vcpus` needs web-01 off, but it is running"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("plan.yaml:6:17: step 2 (web-01): `max_memory` needs web-01 off"),
        "{msg}"
    );
    // In the same step as a power-off it is fine: power-off is applied first.
    let plan = fx.plan(
        "version: 1\nsteps:\n  - vm: web-01\n    power: off\n    max_vcpus: 4\n    vcpus: 3\n",
    );
    assert_eq!(
        plan.steps[0].actions[1..],
        [
            Action::SetMaxVcpus { max: 4 },
            Action::SetVcpus {
                vcpus: 3,
                live: false
            }
        ]
    );
}

#[test]
fn vcpus_above_max_on_a_running_domain_is_refused() {
    let fx = Fixture::new(&[web("web-01")]);
    let msg = fx.problems("version: 1\nsteps:\n  - vm: web-01\n    vcpus: 3\n");
    assert!(
        msg.contains("`vcpus` 3 is above the maximum 2 of web-01"),
        "{msg}"
    );
}

#[test]
fn live_changes_within_the_maximum_use_live_and_config() {
    let fx = Fixture::new(&[web("web-01")]);
    let plan = fx.plan("version: 1\nsteps:\n  - vm: web-01\n    memory: 1536MiB\n    vcpus: 2\n");
    assert_eq!(
        plan.steps[0].actions,
        vec![
            Action::SetMemory {
                memory: Kib(1536 * 1024),
                live: true
            },
            Action::SetVcpus {
                vcpus: 2,
                live: true
            }
        ]
    );
    let methods: Vec<_> = plan
        .changes
        .iter()
        .map(|c| c.method.clone().unwrap())
        .collect();
    assert_eq!(methods, ["live+config", "live (hotplug)+config"]);
}

#[test]
fn missing_domain_is_an_error_naming_the_step_and_line() {
    let fx = Fixture::new(&[web("web-01")]);
    let msg = fx.problems("version: 1\nsteps:\n  - vms: [web-01, web-99]\n    autostart: true\n");
    assert!(
        msg.starts_with("[DIR]/plan.yaml:3:19: step 1 (web-99): no domain named `web-99`"),
        "{msg}"
    );
    assert!(msg.contains("virsh -c"), "{msg}");
}

#[test]
fn warnings_for_clock_without_boot_past_steps_unforced_shutdown_and_host_cpus() {
    let fx = Fixture::new(&[web("web-01"), web("web-02")]);
    let plan = fx.plan(
        "version: 1
timezone: UTC
steps:
  - at: 2026-11-20 04:00
    vm: web-01
    clock: {track: wall}
  - at: 2026-12-01 04:00
    vm: web-02
    power: shutoff
    shutdown: {force_after_timeout: false}
  - at: 2026-12-01 04:01
    vm: web-02
    max_vcpus: 64
",
    );
    let w = plan.warnings.join("\n");
    assert!(
        w.contains("clock change of web-01 in step 1 takes effect only at its next boot"),
        "{w}"
    );
    assert!(
        w.contains(
            "step 1 (web-01) was due at 2026-11-20 04:00:00 UTC and its grace (5m) has passed"
        ),
        "{w}"
    );
    assert!(w.contains("force_after_timeout: false"), "{w}");
    assert!(w.contains("64 vCPUs is more than the"), "{w}");
}

#[test]
fn existing_snapshot_is_a_noop() {
    let fx = Fixture::new(&[web("web-01")]);
    let plan = fx.plan("version: 1\nsteps:\n  - vm: web-01\n    snapshot: {name: before}\n  - vm: web-01\n    snapshot: {name: before}\n");
    let actions: Vec<_> = plan.changes.iter().map(|c| c.action).collect();
    assert_eq!(actions, [ChangeAction::Change, ChangeAction::Noop]);
}

#[test]
fn several_domains_and_connections_each_opened_once() {
    let a = Fixture::new(&[web("web-01")]);
    let b = Fixture::new(&[web("web-02").running(false)]);
    let path = a.write_plan(
        "multi.yaml",
        &format!(
            "version: 1\nconnection: {}\nsteps:\n  - vm: web-01\n    power: off\n  - vm: web-02\n    connection: {}\n    power: on\n",
            a.uri, b.uri
        ),
    );
    let file = Fixture::load(&path);
    let mut connections = Connections::new();
    for uri in [&a.uri, &b.uri] {
        connections.insert(uri.into(), Arc::new(Libvirt::connect(uri).unwrap()));
    }
    let plan = planner::project(&PlanInput {
        file: &file,
        connections: &connections,
        connect_override: None,
        now: now(),
        progress: &NoProgress,
    })
    .unwrap();
    let by_vm: Vec<_> = plan
        .changes
        .iter()
        .map(|c| (c.vm.as_str(), c.connection.expose() == a.uri))
        .collect();
    assert_eq!(by_vm, [("web-01", true), ("web-02", false)]);
}

#[test]
fn every_example_plans_against_a_matching_fleet() {
    // `test`: the domain of test:///default, which examples/tour.yaml (the README tour) uses.
    let names = ["web-01", "web-02", "web-03", "db-01", "cache-01", "test"];
    let fleet: Vec<_> = names.iter().map(|n| web(n)).collect();
    let fx = Fixture::new(&fleet);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut planned = 0;
    for entry in walk(&root) {
        let config = virtplan::config::discover(None, Some(&entry)).unwrap();
        let file = plan_file::load(&entry, &LoadContext::from(config)).unwrap();
        let plan = fx
            .project(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
        assert!(plan.has_changes(), "{}", entry.display());
        planned += 1;
    }
    assert!(planned >= 3);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn classic_window_against_a_real_qemu_domain() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "plan-classic");
    dom.start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("classic.yaml");
    // The rig's domain already tracks `guest`; move it to `wall`.
    std::fs::write(
        &path,
        classic(&dom.name).replace("track: guest", "track: wall"),
    )
    .unwrap();
    let file = plan_file::load(&path, &LoadContext::from(Config::default())).unwrap();
    let mut connections = Connections::new();
    connections.insert(
        uri.clone().into(),
        Arc::new(Libvirt::connect(&uri).unwrap()),
    );
    let plan = planner::project(&PlanInput {
        file: &file,
        connections: &connections,
        connect_override: Some(&uri.clone().into()),
        now: now(),
        progress: &NoProgress,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<String> = plan
        .changes
        .iter()
        .map(|c| format!("{} {} -> {} {:?}", c.attribute, c.before, c.after, c.action))
        .collect();
    assert_eq!(
        lines,
        [
            "power running -> shutoff Change",
            "memory 128MiB -> 3GiB Change",
            "vcpus 1 -> 2 Change",
            "clock offset=utc track=guest -> offset=utc track=wall Change",
            "power shutoff -> running Change",
        ]
    );
    assert_eq!(plan.steps[0].before.uuid, dom.uuid);
}

/// The libvirt procedures (remote protocol numbers) `virtplan plan PLAN` called, in the order
/// sent, read from libvirt's own client log.
fn rpc_calls(plan: &Path, log: &Path) -> Vec<String> {
    let out = crate::support::helpers::virtplan(
        &["plan", plan.to_str().unwrap(), "--format", "json"],
        &[
            ("LIBVIRT_LOG_OUTPUTS", &format!("1:file:{}", log.display())),
            ("LIBVIRT_LOG_FILTERS", "1:rpc 4:*"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        crate::support::helpers::text(&out)
    );
    let calls = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        // The remote protocol's calls only (keepalive pings are another program).
        .filter(|l| l.contains("RPC_CLIENT_MSG_TX_QUEUE") && l.contains("prog=536903814 "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("proc=")))
        .map(str::to_owned)
        .collect();
    std::fs::remove_file(log).unwrap();
    calls
}

/// Regression (issue 10): `plan` of shut-off domains read them with per-domain lookups and
/// XML reads, and resolved their names with a listing of its own. It now makes the same calls
/// for 2 domains as for 12: the connection's handshake, one bulk statistics call (which also
/// resolves the names), one autostart listing, the host's CPUs for the vCPU steps, and the
/// close.
#[test]
fn plan_of_shut_off_domains_makes_the_same_libvirt_calls_for_2_and_12_domains() {
    let Some(uri) = qemu_uri() else { return };
    let doms: Vec<TestDomain> = (0..12)
        .map(|_| TestDomain::define(&uri, "plan-rpc"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let write = |n: usize| {
        use std::fmt::Write as _;
        let mut text = format!("version: 1\nconnection: {uri}\ntimezone: UTC\nsteps:\n");
        for d in &doms[..n] {
            let _ = write!(
                text,
                "  - {{at: 2030-01-01 04:00, vm: {}, memory: 192MiB}}\n  - {{at: 2030-01-01 04:05, vm: {}, vcpus: 2, autostart: false}}\n",
                d.name, d.uuid
            );
        }
        let path = dir.path().join(format!("rpc-{n}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let log = dir.path().join("libvirt.log");
    let mut two = rpc_calls(&write(2), &log);
    let mut twelve = rpc_calls(&write(12), &log);
    // The same calls, whatever order the two planning threads sent them in (the host CPU
    // count and the statistics may cross).
    two.sort();
    twelve.sort();
    assert_eq!(two, twelve);
    // REMOTE_PROC_CONNECT_GET_ALL_DOMAIN_STATS, once; no lookup (23, 38) nor XML read (14).
    assert_eq!(
        twelve.iter().filter(|p| *p == "proc=344").count(),
        1,
        "{twelve:?}"
    );
    for per_domain in ["proc=14", "proc=23", "proc=38"] {
        assert!(!twelve.iter().any(|p| p == per_domain), "{twelve:?}");
    }
    // Handshake (auth list, open, 3 feature checks), statistics, autostart, host CPUs, close:
    // 9. Before: also a listing of every domain to resolve names, and the driver type.
    assert!(twelve.len() <= 9, "{twelve:?}");
}

mod cli {
    //! `virtplan plan` through the binary: exit codes, colour, saved plans, errors.

    use super::{classic, web, Fixture};
    use crate::support::cli::Cli;

    fn setup() -> (Fixture, std::path::PathBuf) {
        let fx = Fixture::new(&[web("web-01")]);
        let path = fx.write_plan("classic.yaml", &classic("web-01"));
        (fx, path)
    }

    #[test]
    fn detailed_exitcode_is_2_with_changes_and_0_without() {
        let (fx, path) = setup();
        Cli::new()
            .args([
                "plan",
                path.to_str().unwrap(),
                "--connect",
                &fx.uri,
                "--detailed-exitcode",
            ])
            .status(2)
            .stdout_contains("Plan: 5 to change")
            .run();
        let noop = fx.write_plan(
            "noop.yaml",
            "version: 1\nsteps:\n  - vm: web-01\n    power: running\n",
        );
        Cli::new()
            .args([
                "plan",
                noop.to_str().unwrap(),
                "--connect",
                &fx.uri,
                "--detailed-exitcode",
            ])
            .status(0)
            .stdout_contains("Plan: 0 to change, 1 unchanged")
            .run();
    }

    #[test]
    fn colour_only_when_asked_or_on_a_terminal() {
        let (fx, path) = setup();
        // Piped, NO_COLOR set by the builder: no escape codes.
        Cli::new()
            .args(["plan", path.to_str().unwrap(), "--connect", &fx.uri])
            .status(0)
            .stdout_lacks("\u{1b}[")
            .run();
        Cli::new()
            .args([
                "plan",
                path.to_str().unwrap(),
                "--connect",
                &fx.uri,
                "--color",
                "always",
            ])
            .status(0)
            .stdout_contains("\u{1b}[")
            .run();
    }

    #[test]
    fn out_writes_a_saved_plan_with_before_states() {
        let (fx, path) = setup();
        let saved = fx.dir.path().join("saved.json");
        Cli::new()
            .args([
                "plan",
                path.to_str().unwrap(),
                "--connect",
                &fx.uri,
                "--format",
                "markdown",
                "--out",
                saved.to_str().unwrap(),
            ])
            .status(0)
            .stdout_contains("| When | Step | VM |")
            .stderr_contains("Saved the plan to")
            .run();
        let saved: virtplan::planner::saved::SavedPlan =
            serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        assert_eq!(saved.plan.steps.len(), 5);
        assert_eq!(saved.plan.steps[0].before.power.as_str(), "running");
        assert_eq!(saved.plan_source, std::fs::read_to_string(&path).unwrap());
    }

    #[test]
    fn unreachable_libvirt_is_a_clear_error() {
        let (fx, path) = setup();
        Cli::new()
            .args([
                "plan",
                path.to_str().unwrap(),
                "--connect",
                "test:///nonexistent/node.xml",
            ])
            .status(1)
            .stderr_contains("cannot connect to libvirt at test:///nonexistent/node.xml")
            .stderr_contains("virsh -c test:///nonexistent/node.xml version")
            .run();
        drop(fx);
    }

    #[test]
    fn refused_steps_print_located_errors_and_exit_1() {
        let fx = Fixture::new(&[web("web-01")]);
        let path = fx.write_plan(
            "bad.yaml",
            "version: 1\nsteps:\n  - vm: web-01\n    memory: 3GiB\n",
        );
        Cli::new()
            .args(["plan", path.to_str().unwrap(), "--connect", &fx.uri])
            .status(1)
            .stderr_contains("bad.yaml:4:13")
            .stderr_contains("is above the maximum 2GiB")
            .stderr_contains("= help:")
            .run();
    }

    #[test]
    fn invalid_plan_makes_no_libvirt_call() {
        let fx = Fixture::new(&[web("web-01")]);
        let path = fx.write_plan(
            "typo.yaml",
            "version: 1\nsteps:\n  - vm: web-01\n    memroy: 3GiB\n",
        );
        // An unreachable URI proves no connection is attempted: the error is the validation one.
        Cli::new()
            .args([
                "plan",
                path.to_str().unwrap(),
                "--connect",
                "test:///nonexistent/node.xml",
            ])
            .status(1)
            .stderr_contains("unknown key `memroy`")
            .stderr_lacks("cannot connect")
            .run();
    }
}

#[test]
fn steps_done_in_the_lockfile_show_as_done_not_as_changes() {
    use virtplan::lockfile::{lock_path, Lockfile, StepRecord, StepStatus};
    // The test driver invents a new UUID per connection unless the node file fixes one.
    // Shut off, as the done power-off step left it: done steps are not projected again.
    let fx = Fixture::new(&[web("web-01")
        .uuid("6c1b1b8e-3f0e-4a57-9d7e-0b5a4a1f0c01")
        .running(false)]);
    let path = fx.write_plan("classic.yaml", &classic("web-01"));
    let file = Fixture::load(&path);
    let plan = fx.project(&file).unwrap();
    let mut lock = Lockfile::new(file.sha256.clone());
    let first = &plan.steps[0];
    let mut record = StepRecord::new(
        first.step,
        &first.step_id,
        &first.domain.name,
        &first.domain.uuid,
        "power shutoff",
        first.at,
        StepStatus::Done,
    );
    record.started_at = first.at;
    record.finished_at = first.at;
    lock.steps.push(record);
    std::fs::write(lock_path(&path), lock.to_text().unwrap()).unwrap();
    crate::support::cli::Cli::new()
        .args([
            "plan",
            path.to_str().unwrap(),
            "--connect",
            &fx.uri,
            "--format",
            "json",
        ])
        .status(0)
        .stdout_contains("\"action\": \"done\"")
        .stdout_contains("\"done\": 1")
        .stdout_contains("\"change\": 4")
        .run();
}

#[test]
fn checked_in_plan_output_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/plan-output.schema.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == render::json_schema(),
        "schemas/plan-output.schema.json is stale; run `cargo run -- schema plan-output > schemas/plan-output.schema.json`"
    );
}

/// Regression: a done step was re-projected with the plan's warnings machinery, so a resumed
/// plan kept warning about steps that had long run (here: more vCPUs than the host has).
#[test]
fn done_steps_raise_no_warnings() {
    struct FirstDone(String);
    impl virtplan::planner::Progress for FirstDone {
        fn is_done(&self, step_id: &str, _: &str) -> bool {
            step_id == self.0
        }
    }
    let fx = Fixture::new(&[web("web-01").running(false)]);
    let path = fx.write_plan(
        "p.yaml",
        "version: 1\nsteps:\n  - vm: web-01\n    max_vcpus: 64\n  - vm: web-01\n    title: resized\n",
    );
    let file = Fixture::load(&path);
    let mut connections = Connections::new();
    connections.insert(
        fx.uri.clone().into(),
        Arc::new(Libvirt::connect(&fx.uri).unwrap()),
    );
    let input = |progress: &dyn virtplan::planner::Progress| {
        planner::project(&PlanInput {
            file: &file,
            connections: &connections,
            connect_override: Some(&fx.uri.clone().into()),
            now: now(),
            progress,
        })
        .unwrap()
    };
    let pending = input(&NoProgress);
    assert!(
        pending.warnings.iter().any(|w| w.contains("64 vCPUs")),
        "{:?}",
        pending.warnings
    );
    let first_id = file.steps[0].id();
    let plan = input(&FirstDone(first_id));
    assert_eq!(plan.changes[0].action, ChangeAction::Done);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}
