//! The lease path under attack (issue 10): the settle delay is handed back to the scheduler
//! (`Leaser::begin`, then `Leaser::confirm` on the domain's next turn), so records wait
//! without a worker. These tests run whole `apply` processes against real libvirt where two
//! processes or a kill matter (qemu:///system, small diskless domains of their own), and on
//! the test driver where one process suffices:
//! - two plans on the same domains, due at the same instant: each step runs once per plan,
//!   never while the other plan acts on its domain, and the one that waited says so, also
//!   when the two plan files carry the same name in two folders;
//! - `kill -9` while records wait to be read back: the resumed plan (however its path is
//!   spelled) takes its own dead records over at once; another plan waits for them to expire;
//! - SIGINT during the settle delay: every record written is removed, the steps are recorded
//!   cancelled, apply exits 1;
//! - a grace or a window that ends during the settle delay: the step is missed, never started
//!   late;
//! - a rollout with leases: its cap holds in the lockfile's times, in plan order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lease::{Lease, Metadata, Register};
use virtplan::lockfile::{StepRecord, StepStatus};

use crate::support::helpers::{at, command, lock_of, now, send_signal, text, wait_until};
use crate::support::qemu::{qemu_uri, TestDomain};

/// `apply plan --auto-approve` run from `cwd` with the plan named as `plan` (relative to
/// `cwd` or absolute), output piped.
fn apply_in(cwd: &Path, plan: &str) -> Command {
    let mut command = command(&["apply", plan, "--auto-approve"]);
    command
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn write(path: &Path, body: &str) -> PathBuf {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, body).unwrap();
    path.to_path_buf()
}

/// The lease record on `uuid`, if any.
fn lease_on(hv: &Libvirt, uuid: &str) -> Option<Lease> {
    Metadata(hv)
        .get(uuid)
        .unwrap()
        .map(|xml| Lease::parse(&xml).unwrap())
}

/// Each `(vm, plan)`'s `in`/`out` lines of the check commands' log, in order.
type Log = Vec<(String, String, &'static str)>;

fn read_log(path: &Path) -> Log {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let vm = words.next().unwrap().to_owned();
            let plan = words.next().unwrap().to_owned();
            let edge = match words.next().unwrap() {
                "in" => "in",
                _ => "out",
            };
            (vm, plan, edge)
        })
        .collect()
}

fn show(log: &Log) -> String {
    log.iter()
        .map(|(vm, plan, edge)| format!("{vm} {plan} {edge}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Per domain, the check commands never overlap: every `in` is followed by the same plan's
/// `out` before anything else happens on that domain. Returns how many `in`s each had.
fn assert_never_overlapping(log: &Log) -> BTreeMap<String, usize> {
    let mut open: BTreeMap<&str, &str> = BTreeMap::new();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (vm, plan, edge) in log {
        match *edge {
            "in" => {
                if let Some(other) = open.insert(vm, plan) {
                    panic!("{vm}: {plan} acted while {other} was acting\n{}", show(log));
                }
                *count.entry(vm.clone()).or_default() += 1;
            }
            _ => assert_eq!(
                open.remove(vm.as_str()),
                Some(plan.as_str()),
                "{}",
                show(log)
            ),
        }
    }
    assert!(open.is_empty(), "a check never ended: {open:?}");
    count
}

/// Whether two records' [started_at, finished_at] overlap.
fn overlap(a: &StepRecord, b: &StepRecord) -> bool {
    let span = |r: &StepRecord| (r.started_at.unwrap(), r.finished_at.unwrap());
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a0 < b1 && b0 < a1
}

/// How two plans share their domains in [`two_plans_on_shared_domains`].
struct Pair<'a> {
    test: &'a str,
    /// The two plan files' names, as given on the command line (from their own folders).
    a: &'a str,
    b: &'a str,
    domains: usize,
    /// Each folder's virtplan.toml.
    toml: &'a str,
    /// How long each step's check holds the lease, in seconds.
    hold: &'a str,
}

impl Default for Pair<'_> {
    fn default() -> Self {
        Self {
            test: "lease-pair",
            a: "nightly.yaml",
            b: "weekly.yaml",
            domains: 3,
            toml: "",
            hold: "1.5",
        }
    }
}

/// Two plans, one retitling and one redescribing every domain at the same instant with a
/// check that holds its lease `hold` seconds, started together. Every domain's step runs
/// exactly once per plan, never while the other plan acts on it (neither by the check
/// commands' log nor by the lockfiles' times), and the later one names the other plan's
/// executor as the one it waited for.
fn two_plans_on_shared_domains(pair: &Pair<'_>) {
    let Some(uri) = qemu_uri() else { return };
    let Pair { test, a, b, .. } = *pair;
    let doms: Vec<TestDomain> = (0..pair.domains)
        .map(|_| TestDomain::define(&uri, test))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("acts.log");
    let t0 = now();
    let when = at(t0, 6);
    let vms = doms
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    // Different attributes, so neither plan finds its domains drifted by the other.
    let plan = |tag: &str, attr: &str| {
        format!(
            "version: 1\nconnection: {uri}\ngrace: 1m\nsteps:\n  - at: {when}\n    vms: [{vms}]\n    {attr}: set by {tag}\n    check: {{ command: 'echo \"$VIRTPLAN_VM {tag} in\" >> {log}; sleep {hold}; echo \"$VIRTPLAN_VM {tag} out\" >> {log}', timeout: 20s, interval: 1s }}\n",
            log = log.display(),
            hold = pair.hold
        )
    };
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let path_a = write(&dir_a.join(a), &plan("A", "title"));
    let path_b = write(&dir_b.join(b), &plan("B", "description"));
    write(&dir_a.join("virtplan.toml"), pair.toml);
    write(&dir_b.join("virtplan.toml"), pair.toml);
    let first = apply_in(&dir_a, a).spawn().unwrap();
    let second = apply_in(&dir_b, b).spawn().unwrap();
    let (pid_a, pid_b) = (first.id(), second.id());
    let out_a = first.wait_with_output().unwrap();
    let out_b = second.wait_with_output().unwrap();
    assert_eq!(out_a.status.code(), Some(0), "{}", text(&out_a));
    assert_eq!(out_b.status.code(), Some(0), "{}", text(&out_b));

    let acts = read_log(&log);
    let count = assert_never_overlapping(&acts);
    for d in &doms {
        assert_eq!(count.get(&d.name), Some(&2), "{}: {}", d.name, show(&acts));
    }
    let (lock_a, lock_b) = (lock_of(&path_a), lock_of(&path_b));
    let hv = Libvirt::connect(&uri).unwrap();
    let mut waited = 0;
    for d in &doms {
        let ra = lock_a.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        let rb = lock_b.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        assert_eq!((ra.status, rb.status), (StepStatus::Done, StepStatus::Done));
        assert!(
            !overlap(ra, rb),
            "{}: both acted at once\n{ra:?}\n{rb:?}",
            d.name
        );
        // The later one started after the earlier one ended. If it found the earlier one's
        // lease it waited, and says whose, to the millisecond (it said "3s 122ms 552us
        // 941ns"); a plan whose workers reached the domain only after the other had released
        // it found no lease and says nothing. (The earlier one may have waited too, for a
        // record of the other plan that was then read back too late and removed: that one
        // never acted.)
        let (later, holder) = if ra.started_at < rb.started_at {
            (rb, pid_a)
        } else {
            (ra, pid_b)
        };
        if later.message.contains("waited") {
            waited += 1;
            assert!(
                later
                    .message
                    .contains(&format!("for the lease held by pid {holder} on ")),
                "{later:?}"
            );
            assert!(!later.message.contains("us "), "{later:?}");
        }
        // Both changes are there; both released their lease.
        let state = hv.observe(&d.uuid, false).unwrap();
        assert_eq!(
            (state.title.as_str(), state.description.as_str()),
            ("set by A", "set by B"),
            "{}",
            d.name
        );
        assert_eq!(lease_on(&hv, &d.uuid), None, "{}", d.name);
    }
    // Both due at the same instant: some domain was contended, and its later step waited.
    assert!(
        waited > 0,
        "no step waited for the other plan's lease: {}",
        show(&acts)
    );
}

#[test]
fn two_plans_due_at_once_on_three_qemu_domains_take_turns_on_each() {
    two_plans_on_shared_domains(&Pair::default());
}

/// Two different plans that happen to carry the same file name in two folders, each applied
/// as `plan.yaml` from its own folder: still two plans. (A lease named its plan by the path as
/// given, so each took the other's live lease for one left by a dead executor of its own plan
/// and took it over at once: both acted on a domain together.)
#[test]
fn two_plans_named_alike_in_two_folders_never_act_at_once() {
    two_plans_on_shared_domains(&Pair {
        test: "lease-alike",
        a: "plan.yaml",
        b: "plan.yaml",
        ..Pair::default()
    });
}

/// Two plans on twelve domains due at the same instant, eight workers each, default lease
/// timing (settle 300 ms): 24 records written at once on one daemon, each write measured
/// against the 100 ms the protocol allows.
#[test]
fn two_plans_due_at_once_on_twelve_qemu_domains_take_turns_on_each() {
    two_plans_on_shared_domains(&Pair {
        test: "lease-twelve",
        domains: 12,
        hold: "0.3",
        ..Pair::default()
    });
}

/// Two plans of one worker each (`parallelism = 1`) on three domains, due at once, with short
/// leases (settle 1 s, ttl 6 s: a record is trusted only while younger than 2 s) and steps
/// that hold their lease 2.2 s (past a renewal). Most records wait longer than that for the
/// one worker, so they are read back stale, removed and written again later; the records that
/// are renewed while their step acts outlive the other plan's patience. Still each step
/// runs once per plan and never with the other plan's on the same domain.
#[test]
fn two_plans_on_one_worker_each_with_short_leases_take_turns() {
    two_plans_on_shared_domains(&Pair {
        test: "lease-busy",
        domains: 3,
        toml: &format!("parallelism = 1\n{SHORT_LEASES}"),
        hold: "2.2",
        ..Pair::default()
    });
}

/// `[lease]` timing short enough for a test: a dead executor's records expire 6 s after they
/// were written (no clock-skew margin on one host), and a 1 s settle delay leaves room to
/// kill the executor while its records wait to be read back.
const SHORT_LEASES: &str = "[lease]\nsettle = \"1s\"\nttl = \"6s\"\nmax_clock_skew = \"0s\"\n";

/// `n` shut-off QEMU domains and a plan in a fresh folder (with `toml` as its
/// virtplan.toml) retitling all of them `at`, within `grace`.
struct Rig {
    doms: Vec<TestDomain>,
    dir: tempfile::TempDir,
    hv: Libvirt,
    uri: String,
}

impl Rig {
    fn new(uri: &str, test: &str, n: usize, toml: &str) -> Self {
        let doms: Vec<TestDomain> = (0..n).map(|_| TestDomain::define(uri, test)).collect();
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("virtplan.toml"), toml);
        Self {
            doms,
            dir,
            hv: Libvirt::connect(uri).unwrap(),
            uri: uri.to_owned(),
        }
    }

    /// Writes `name` in the rig's folder: one step on every domain, `attr: value`.
    fn plan(&self, name: &str, at: Option<&str>, grace: &str, attr: &str, value: &str) -> PathBuf {
        let vms = self
            .doms
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let at = at.map_or_else(String::new, |t| format!("at: {t}\n    "));
        write(
            &self.dir.path().join(name),
            &format!(
                "version: 1\nconnection: {}\ngrace: {grace}\nsteps:\n  - {at}vms: [{vms}]\n    {attr}: {value}\n",
                self.uri
            ),
        )
    }

    /// Waits until every domain carries a lease record of `pid`; returns them.
    fn records_of(&self, pid: u32) -> Vec<Lease> {
        wait_until(
            Duration::from_secs(20),
            "the records were never written",
            || {
                self.doms
                    .iter()
                    .all(|d| lease_on(&self.hv, &d.uuid).is_some_and(|l| l.holder.pid == pid))
            },
        );
        self.doms
            .iter()
            .map(|d| lease_on(&self.hv, &d.uuid).unwrap())
            .collect()
    }

    fn no_records_left(&self) {
        for d in &self.doms {
            assert_eq!(
                lease_on(&self.hv, &d.uuid),
                None,
                "{} keeps a lease",
                d.name
            );
        }
    }
}

/// Starts `apply` on `plan` (its output discarded), waits until every domain carries its
/// record, and kills it with SIGKILL before any is read back (settle 1 s): nothing started.
/// Returns the dead records.
fn kill_9_while_records_wait(rig: &Rig, plan: &Path) -> Vec<Lease> {
    let mut child = apply_in(rig.dir.path(), plan.file_name().unwrap().to_str().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let records = rig.records_of(child.id());
    send_signal(child.id(), "-KILL");
    child.wait().unwrap();
    // Killed between begin and confirm: no step started, every record is still there.
    let lock = lock_of(plan);
    for r in &lock.steps {
        assert_eq!(r.status, StepStatus::Pending, "killed too late: {r:?}");
        assert_eq!(r.started_at, None, "{r:?}");
    }
    for (d, dead) in rig.doms.iter().zip(&records) {
        assert_eq!(
            lease_on(&rig.hv, &d.uuid).as_ref(),
            Some(dead),
            "{}",
            d.name
        );
    }
    records
}

/// `kill -9` of apply while four domains' records wait to be read back; the plan is resumed
/// through another name of its file (absolute, from another folder). Its own dead records do
/// not hold it up: every step starts before they would have expired, runs once, and leaves
/// no record behind.
#[test]
fn a_resume_after_kill_9_in_the_settle_delay_takes_its_own_records_over_at_once() {
    let Some(uri) = qemu_uri() else { return };
    let rig = Rig::new(&uri, "lease-kill9-resume", 4, SHORT_LEASES);
    let plan = rig.plan("plan.yaml", Some(&at(now(), 3)), "30s", "title", "resumed");
    let dead = kill_9_while_records_wait(&rig, &plan);
    let absolute = plan.canonicalize().unwrap();
    let out = apply_in(Path::new("/"), absolute.to_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    for (d, dead) in rig.doms.iter().zip(&dead) {
        let r = lock.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        assert!(
            r.started_at.unwrap() < dead.expires,
            "{}: held up by its own dead record until it expired at {}: {r:?}",
            d.name,
            dead.expires
        );
        assert!(!r.message.contains("waited"), "{r:?}");
        assert_eq!(rig.hv.observe(&d.uuid, false).unwrap().title, "resumed");
        eprintln!(
            "{}: started {} before its dead record's expiry",
            d.name,
            dead.expires - r.started_at.unwrap()
        );
    }
    rig.no_records_left();
}

/// `kill -9` of one plan's apply while its records wait; another plan on the same domains is
/// held up by the dead records until they expire (never earlier), then acts and says whom it
/// waited for; the killed plan, resumed after it, runs each of its steps once.
#[test]
fn another_plan_waits_for_the_records_of_a_killed_apply_to_expire() {
    let Some(uri) = qemu_uri() else { return };
    let rig = Rig::new(&uri, "lease-kill9-other", 3, SHORT_LEASES);
    let killed = rig.plan(
        "killed.yaml",
        Some(&at(now(), 3)),
        "30s",
        "title",
        "from killed",
    );
    let dead = kill_9_while_records_wait(&rig, &killed);
    let other = rig.plan("other.yaml", None, "30s", "description", "from other");
    let out = apply_in(rig.dir.path(), "other.yaml").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&other);
    for (d, dead) in rig.doms.iter().zip(&dead) {
        let r = lock.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        let started = r.started_at.unwrap();
        assert!(
            started > dead.expires,
            "{}: took a live lease over: {r:?}",
            d.name
        );
        eprintln!(
            "{}: started {} after the dead record expired",
            d.name,
            started - dead.expires
        );
        // Held up only until then: one retry (1-1.5 s) and one settle delay (1 s) later.
        assert!(
            started - dead.expires < chrono::Duration::seconds(4),
            "{}: held up {} past the expiry",
            d.name,
            started - dead.expires
        );
        assert!(
            r.message.contains(&format!(
                "for the lease held by pid {} on ",
                dead.holder.pid
            )),
            "{r:?}"
        );
    }
    rig.no_records_left();
    let out = apply_in(rig.dir.path(), "killed.yaml").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for d in &rig.doms {
        let state = rig.hv.observe(&d.uuid, false).unwrap();
        assert_eq!(
            (state.title.as_str(), state.description.as_str()),
            ("from killed", "from other")
        );
    }
    assert!(lock_of(&killed)
        .steps
        .iter()
        .all(|r| r.status == StepStatus::Done));
    rig.no_records_left();
}

/// A signal while the records wait to be read back (settle 5 s): apply stops at once,
/// without waiting the delay out, removes every record it wrote, records the steps cancelled
/// and exits 1; nothing was changed.
fn signal_in_the_settle_delay(signal: &str) {
    let Some(uri) = qemu_uri() else { return };
    let rig = Rig::new(
        &uri,
        "lease-signal",
        4,
        "[lease]\nsettle = \"5s\"\nttl = \"30s\"\n",
    );
    let plan = rig.plan("plan.yaml", Some(&at(now(), 3)), "1m", "title", "never");
    let child = apply_in(rig.dir.path(), "plan.yaml").spawn().unwrap();
    rig.records_of(child.id());
    let sent = Instant::now();
    send_signal(child.id(), signal);
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    eprintln!("stopped {took:?} after {signal}");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        took < Duration::from_secs(3),
        "stopping took {took:?}: it waited the settle delay out"
    );
    rig.no_records_left();
    for r in &lock_of(&plan).steps {
        assert_eq!(r.status, StepStatus::Cancelled, "{r:?}");
        assert!(r.message.contains("interrupted by a signal"), "{r:?}");
        assert_eq!(r.started_at, None, "{r:?}");
    }
    for d in &rig.doms {
        assert_eq!(rig.hv.observe(&d.uuid, false).unwrap().title, "");
    }
}

#[test]
fn sigint_in_the_settle_delay_removes_every_record_and_cancels() {
    signal_in_the_settle_delay("-INT");
}

#[test]
fn sigterm_in_the_settle_delay_removes_every_record_and_cancels() {
    signal_in_the_settle_delay("-TERM");
}

/// A test-driver fleet of `n` shut-off domains `vm-0`... and a folder with `toml` as its
/// virtplan.toml; the plan `body` (after `version` and `connection`) is written there.
fn fleet_plan(n: usize, toml: &str, body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let doms: Vec<FleetDomain> = (0..n)
        .map(|i| FleetDomain::new(format!("vm-{i}")))
        .collect();
    let uri = write_fleet(dir.path(), &doms).unwrap();
    write(&dir.path().join("virtplan.toml"), toml);
    let plan = write(
        &dir.path().join("plan.yaml"),
        &format!("version: 1\nconnection: {uri}\n{body}"),
    );
    (dir, plan)
}

/// Runs `apply` on `plan`; asserts every step was missed (never started) for `why`, the
/// miss recorded once the settle delay had passed.
fn assert_missed_in_the_settle_delay(plan: &Path, why: &str) {
    let out = apply_in(plan.parent().unwrap(), "plan.yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    for r in &lock_of(plan).steps {
        assert_eq!(r.status, StepStatus::Missed, "{r:?}");
        assert!(r.message.contains(why), "{r:?}");
        assert_eq!(r.started_at, None, "started late: {r:?}");
        assert_eq!(r.after, None, "{r:?}");
        // Judged when the record was read back, 3 s after it was written at `at`.
        let judged = r.finished_at.unwrap() - r.at.unwrap();
        assert!(judged >= chrono::Duration::milliseconds(2900), "{r:?}");
    }
}

/// A step's grace (1 s) ends while its records wait out a 3 s settle delay: it is recorded
/// missed at the read-back, never started late.
#[test]
fn a_grace_that_ends_in_the_settle_delay_makes_the_step_missed() {
    let due = now() + chrono::Duration::seconds(4);
    let (_dir, plan) = fleet_plan(
        3,
        "[lease]\nsettle = \"3s\"\nttl = \"20s\"\n",
        &format!(
            "grace: 1s\nsteps:\n  - at: {}\n    vms: [vm-0, vm-1, vm-2]\n    title: late\n",
            at(due, 0)
        ),
    );
    assert_missed_in_the_settle_delay(&plan, "could not start by");
}

/// The window closes while the records wait out a 3 s settle delay: missed, never started.
#[test]
fn a_window_that_closes_in_the_settle_delay_makes_the_step_missed() {
    let t0 = now();
    let due = t0 + chrono::Duration::seconds(4);
    let (_dir, plan) = fleet_plan(
        3,
        "[lease]\nsettle = \"3s\"\nttl = \"20s\"\n",
        &format!(
            "window: {{start: {}, end: {}}}\nsteps:\n  - at: {}\n    vms: [vm-0, vm-1, vm-2]\n    title: late\n",
            at(t0, 1),
            at(t0, 6),
            at(due, 0)
        ),
    );
    assert_missed_in_the_settle_delay(&plan, "window closed");
}

/// A rollout of eight domains, two at a time, with leases whose settle delay (500 ms) is
/// longer than each domain's step (a 200 ms check): a domain's share is held from its
/// dispatch through the settle delay to its end, so no more than two act at once by the
/// lockfile's times, and they start in the order written, wave by wave.
#[test]
fn a_rollout_with_leases_keeps_its_cap_and_its_order() {
    let names: Vec<String> = (0..8).map(|i| format!("vm-{i}")).collect();
    let (_dir, plan) = fleet_plan(
        8,
        "[lease]\nsettle = \"500ms\"\n",
        &format!(
            "steps:\n  - vms: [{}]\n    title: rolled\n    check: {{ command: \"sleep 0.2\", timeout: 10s, interval: 1s }}\n    rollout: {{ max_parallel: 2 }}\n",
            names.join(", ")
        ),
    );
    let out = apply_in(plan.parent().unwrap(), "plan.yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    let records: Vec<&StepRecord> = names
        .iter()
        .map(|n| lock.steps.iter().find(|r| &r.vm == n).unwrap())
        .collect();
    assert!(records.iter().all(|r| r.status == StepStatus::Done));
    let mut peak = 0;
    for r in &records {
        let at_once = records
            .iter()
            .filter(|o| o.started_at <= r.started_at && o.finished_at > r.started_at)
            .count();
        peak = peak.max(at_once);
    }
    assert!(peak <= 2, "max_parallel 2: {peak} at once");
    // In order, wave by wave: a domain starts after every domain written two or more places
    // ahead of it.
    for (i, r) in records.iter().enumerate() {
        for earlier in &records[..i.saturating_sub(1)] {
            assert!(
                earlier.started_at < r.started_at,
                "{} started before {}",
                r.vm,
                earlier.vm
            );
        }
    }
    eprintln!(
        "rollout of 8, 2 at a time: peak {peak}, {} from first start to last end",
        records.iter().filter_map(|r| r.finished_at).max().unwrap()
            - records.iter().filter_map(|r| r.started_at).min().unwrap()
    );
}

/// Plan A holds one domain for 4 s; plan B, one worker (`parallelism = 1`), is due a second
/// later on that domain (first in its list) and three others. Waiting for A's lease holds no
/// worker: B's other three domains are done while A still holds the first, which B then
/// takes once A has released it, saying whom it waited for.
#[test]
fn waiting_for_another_plans_lease_holds_no_worker() {
    let Some(uri) = qemu_uri() else { return };
    let rig = Rig::new(&uri, "lease-noworker", 4, "parallelism = 1\n");
    let t0 = now();
    let held = &rig.doms[0];
    let a = write(
        &rig.dir.path().join("a.yaml"),
        &format!(
            "version: 1\nconnection: {uri}\ngrace: 1m\nsteps:\n  - at: {}\n    vm: {}\n    title: held by a\n    check: {{ command: 'sleep 4', timeout: 20s, interval: 1s }}\n",
            at(t0, 4),
            held.name
        ),
    );
    let b = rig.plan("b.yaml", Some(&at(t0, 5)), "1m", "description", "by b");
    let first = apply_in(rig.dir.path(), "a.yaml").spawn().unwrap();
    let second = apply_in(rig.dir.path(), "b.yaml").spawn().unwrap();
    let pid_a = first.id();
    let out_a = first.wait_with_output().unwrap();
    let out_b = second.wait_with_output().unwrap();
    assert_eq!(out_a.status.code(), Some(0), "{}", text(&out_a));
    assert_eq!(out_b.status.code(), Some(0), "{}", text(&out_b));
    let ra = lock_of(&a).steps[0].clone();
    let lock_b = lock_of(&b);
    let rb = |uuid: &str| lock_b.steps.iter().find(|r| r.uuid == uuid).unwrap();
    let waited = rb(&held.uuid);
    assert_eq!(waited.status, StepStatus::Done, "{waited:?}");
    assert!(waited.started_at > ra.finished_at, "{waited:?}\n{ra:?}");
    assert!(
        waited
            .message
            .contains(&format!("for the lease held by pid {pid_a} on ")),
        "{waited:?}"
    );
    for d in &rig.doms[1..] {
        let r = rb(&d.uuid);
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        assert!(
            r.finished_at < ra.finished_at,
            "{}: waited for the worker held up by {}: {r:?}\n{ra:?}",
            d.name,
            held.name
        );
    }
    let state = rig.hv.observe(&held.uuid, false).unwrap();
    assert_eq!(
        (state.title.as_str(), state.description.as_str()),
        ("held by a", "by b")
    );
    rig.no_records_left();
}
