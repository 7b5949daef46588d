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

use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lease::{Lease, Metadata, Register};
use virtplan::lockfile::{StepRecord, StepStatus};

use crate::support::helpers::{at, lock_of, now, text, BIN};
use crate::support::qemu::{qemu_uri, TestDomain};

/// `apply plan --auto-approve` run from `cwd` with the plan named as `plan` (relative to
/// `cwd` or absolute), output piped.
fn apply_in(cwd: &Path, plan: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["apply", plan, "--auto-approve"])
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
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

/// Two plans, one retitling and one redescribing every domain of `doms` at the same instant with a check that
/// holds its lease ~1.5 s, started together; `a` and `b` name the two plan files as given on
/// the command line (from their own folders). Every domain's step runs exactly once per plan,
/// never while the other plan acts on it (neither by the check commands' log nor by the
/// lockfiles' times), and the step that waited says for whom.
fn two_plans_on_shared_domains(test: &str, a: &str, b: &str) {
    let Some(uri) = qemu_uri() else { return };
    let doms: Vec<TestDomain> = (0..3).map(|_| TestDomain::define(&uri, test)).collect();
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
            "version: 1\nconnection: {uri}\ngrace: 1m\nsteps:\n  - at: {when}\n    vms: [{vms}]\n    {attr}: set by {tag}\n    check: {{ command: 'echo \"$VIRTPLAN_VM {tag} in\" >> {log}; sleep 1.5; echo \"$VIRTPLAN_VM {tag} out\" >> {log}', timeout: 20s, interval: 1s }}\n",
            log = log.display()
        )
    };
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let path_a = write(&dir_a.join(a), &plan("A", "title"));
    let path_b = write(&dir_b.join(b), &plan("B", "description"));
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
    for d in &doms {
        let ra = lock_a.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        let rb = lock_b.steps.iter().find(|r| r.uuid == d.uuid).unwrap();
        assert_eq!((ra.status, rb.status), (StepStatus::Done, StepStatus::Done));
        assert!(
            !overlap(ra, rb),
            "{}: both acted at once\n{ra:?}\n{rb:?}",
            d.name
        );
        // The later one waited for the earlier one's lease, and says whose.
        let (earlier, later, holder) = if ra.started_at < rb.started_at {
            (ra, rb, pid_a)
        } else {
            (rb, ra, pid_b)
        };
        assert!(!earlier.message.contains("waited"), "{earlier:?}");
        assert!(
            later
                .message
                .contains(&format!("for the lease held by pid {holder} on ")),
            "{later:?}"
        );
        // How long, to the millisecond (it said "3s 122ms 552us 941ns").
        assert!(!later.message.contains("us "), "{later:?}");
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
}

#[test]
fn two_plans_due_at_once_on_three_qemu_domains_take_turns_on_each() {
    two_plans_on_shared_domains("lease-pair", "nightly.yaml", "weekly.yaml");
}

/// Two different plans that happen to carry the same file name in two folders, each applied
/// as `plan.yaml` from its own folder: still two plans. (A lease named its plan by the path as
/// given, so each took the other's live lease for one left by a dead executor of its own plan
/// and took it over at once: both acted on a domain together.)
#[test]
fn two_plans_named_alike_in_two_folders_never_act_at_once() {
    two_plans_on_shared_domains("lease-alike", "plan.yaml", "plan.yaml");
}
