//! Reconciler mode through the CLI binary: `virtplan watch DIR` over a plan's whole life on a
//! real QEMU domain (added, edited, made invalid and fixed, a done step edited, removed), a
//! watcher killed with SIGKILL and restarted, and `apply --watch` following an edit.
//!
//! Steps are a few seconds apart and every wait is on a log line, never a fixed sleep.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::StepStatus;
use virtplan::state::Kib;

use crate::support::helpers::{at, lock_of, now, send_signal, spawn_piped};
use crate::support::qemu::{qemu_uri, TestDomain};

/// How long any one expected log line may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// Saves like an editor: a temporary file beside the plan, renamed over it.
fn save(path: &Path, body: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.swp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn statuses(plan: &Path) -> Vec<StepStatus> {
    lock_of(plan).steps.iter().map(|r| r.status).collect()
}

/// A running `virtplan` whose output lines arrive on a channel.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Self {
        let mut child = spawn_piped(args);
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    fn watch(dir: &Path) -> Self {
        Self::spawn(&["watch", dir.to_str().unwrap(), "--log-format", "json"])
    }

    /// The first line, printed so far or within `PATIENCE`, that `matches` accepts (the tests
    /// wait for lines that appear once, in whatever order the threads print them).
    #[track_caller]
    fn wait_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line {what} within {PATIENCE:?} ({e}); seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The next JSON log line of `plan` with `event` (and, for steps, `step` and `status`).
    #[track_caller]
    fn event(&mut self, plan: &str, event: &str, step: Option<(u64, &str)>) -> Value {
        let what = format!("{plan} {event} {step:?}");
        let line = self.wait_line(&what, |line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return false;
            };
            v["plan"] == plan
                && v["event"] == event
                && step.is_none_or(|(n, status)| v["step"] == n && v["status"] == status)
        });
        serde_json::from_str(&line).unwrap()
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit; returns its exit code and every line it printed.
    #[track_caller]
    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.seen.push(line),
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "virtplan did not exit ({e}); seen:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
            }
        };
        // The readers end with the process; collect what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        (status.code(), std::mem::take(&mut self.seen))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed test must not leave a watcher behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every line is a JSON object with the documented keys.
#[track_caller]
fn assert_json_lines(lines: &[String]) {
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["ts", "level", "plan", "event", "message"] {
            assert!(v.get(key).is_some(), "no {key} in {line}");
        }
        assert!(
            ["info", "warn", "error"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
    }
}

fn plan_body(uri: &str, steps: &[(String, &str, &str)]) -> String {
    let mut body = format!("version: 1\nconnection: {uri}\ngrace: 1m\nsteps:\n");
    for (when, vm, attribute) in steps {
        let _ = write!(body, "  - at: {when}\n    vm: {vm}\n    {attribute}\n");
    }
    body
}

#[test]
fn a_watched_plan_is_added_edited_broken_fixed_and_removed_on_a_real_qemu_domain() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "watch-life");
    let vm = dom.name.as_str();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    let t0 = now();
    std::fs::write(
        &a,
        plan_body(
            &uri,
            &[
                (at(t0, 2), vm, "memory: 192MiB"),
                (at(t0, 120), vm, "vcpus: 2"),
            ],
        ),
    )
    .unwrap();
    // A plan that will be removed before its step is due.
    std::fs::write(&b, plan_body(&uri, &[(at(t0, 300), vm, "memory: 160MiB")])).unwrap();
    let mut watch = Proc::watch(dir.path());
    watch.event("b.yaml", "running", None);
    watch.event("a.yaml", "step", Some((1, "done")));

    // Removed: its pending step is recorded cancelled.
    std::fs::remove_file(&b).unwrap();
    watch.event("b.yaml", "removed", None);
    let lock_b = lock_of(&b);
    assert_eq!(lock_b.steps[0].status, StepStatus::Cancelled);
    assert!(
        lock_b.steps[0].message.contains("plan file was removed"),
        "{:?}",
        lock_b.steps[0]
    );

    // Edited: the pending step moved closer, and a new step added.
    let t1 = now();
    let edited = plan_body(
        &uri,
        &[
            (at(t0, 2), vm, "memory: 192MiB"),
            (at(t1, 3), vm, "vcpus: 2"),
            (at(t1, 6), vm, "memory: 224MiB"),
        ],
    );
    save(&a, &edited);
    let changed = watch.event("a.yaml", "changed", None);
    let message = changed["message"].as_str().unwrap();
    assert!(message.contains("--- a/a.yaml"), "{message}");
    assert!(message.contains("+    memory: 224MiB"), "{message}");
    assert!(message.contains("vcpus 1 → 2"), "{message}");
    watch.event("a.yaml", "replanned", None);
    watch.event("a.yaml", "step", Some((2, "done")));

    // Broken: reported with its position, and the version in force runs its next step.
    save(&a, &edited.replace("vcpus: 2", "vcpus: two"));
    let invalid = watch.event("a.yaml", "invalid", None);
    let message = invalid["message"].as_str().unwrap();
    assert!(message.contains("a.yaml:10:"), "{message}");
    assert!(
        message.contains("version in force keeps running"),
        "{message}"
    );
    assert_eq!(invalid["level"], "error");
    watch.event("a.yaml", "step", Some((3, "done")));

    // A done step edited: refused, nothing changes.
    save(&a, &edited.replace("memory: 192MiB", "memory: 200MiB"));
    let refused = watch.event("a.yaml", "refused", None);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("a step that ran cannot be edited"),
        "{refused}"
    );

    // Fixed: back to the version in force.
    save(&a, &edited);
    watch.event("a.yaml", "unchanged", None);
    watch.event("a.yaml", "finished", None);

    watch.signal("-TERM");
    let (code, lines) = watch.finish();
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    assert_json_lines(&lines);
    assert_eq!(statuses(&a), [StepStatus::Done; 3]);
    let state = Libvirt::connect(&uri)
        .unwrap()
        .observe(&dom.uuid, false)
        .unwrap();
    assert_eq!(state.memory, Kib::from_mib(224));
    assert_eq!(state.vcpus, 2);
    // The removed plan's step never ran.
    assert_eq!(lock_of(&b).steps[0].status, StepStatus::Cancelled);
}

/// A test-driver fleet of `vm-01` and `vm-02` (fixed UUIDs) in `dir`.
fn fleet(dir: &Path) -> String {
    let domains: Vec<_> = (1..=2)
        .map(|i| {
            FleetDomain::new(format!("vm-0{i}"))
                .uuid(format!("7a3e1c52-0b1d-4d7e-9a51-3f0c2b4d000{i}"))
                .memory(Kib::from_mib(128), Kib::from_mib(512))
        })
        .collect();
    write_fleet(dir, &domains).unwrap()
}

fn started(plan: &Path) -> Vec<Option<DateTime<Utc>>> {
    lock_of(plan).steps.iter().map(|r| r.started_at).collect()
}

#[test]
fn a_watcher_killed_with_sigkill_resumes_every_plan_without_rerunning_done_steps() {
    let root = tempfile::tempdir().unwrap();
    let uri = fleet(root.path());
    let dir = root.path().join("plans");
    std::fs::create_dir(&dir).unwrap();
    let t0 = now();
    let plans: Vec<PathBuf> = ["p1", "p2"]
        .iter()
        .zip(["vm-01", "vm-02"])
        .map(|(name, vm)| {
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(
                &path,
                plan_body(
                    &uri,
                    &[
                        (at(t0, 1), vm, "memory: 192MiB"),
                        (at(t0, 5), vm, "vcpus: 2"),
                    ],
                ),
            )
            .unwrap();
            path
        })
        .collect();
    // A bad file beside them: reported, and the others run.
    std::fs::write(dir.join("bad.yaml"), "version: 1\nsteps: [\n").unwrap();

    let mut first = Proc::watch(&dir);
    first.event("bad.yaml", "invalid", None);
    first.event("p1.yaml", "step", Some((1, "done")));
    first.event("p2.yaml", "step", Some((1, "done")));
    // A second watcher on the same folder is refused each plan's executor lock.
    let mut second = Proc::watch(&dir);
    let refused = second.event("p1.yaml", "lock", None);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains(&format!("pid={}", first.child.id())),
        "{refused}"
    );
    second.signal("-TERM");
    assert_eq!(second.finish().0, Some(0));

    first.signal("-KILL");
    let (code, _) = first.finish();
    assert_eq!(code, None, "killed by a signal");
    let before: Vec<_> = plans.iter().map(|p| started(p)).collect();
    for plan in &plans {
        assert_eq!(
            statuses(plan),
            [StepStatus::Done, StepStatus::Pending],
            "{}",
            plan.display()
        );
    }

    let mut again = Proc::watch(&dir);
    again.event("p1.yaml", "step", Some((2, "done")));
    again.event("p2.yaml", "step", Some((2, "done")));
    again.signal("-TERM");
    let (code, lines) = again.finish();
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    assert_json_lines(&lines);
    let reran = lines.iter().any(|l| l.contains(r#""step":1"#));
    assert!(!reran, "a done step ran again:\n{}", lines.join("\n"));
    for (plan, before) in plans.iter().zip(before) {
        assert_eq!(statuses(plan), [StepStatus::Done; 2], "{}", plan.display());
        let after = started(plan);
        assert_eq!(
            after[0],
            before[0],
            "step 1 of {} ran again",
            plan.display()
        );
        let last = lock_of(plan).steps[1].after.clone().unwrap();
        assert_eq!(last.vcpus, 2);
    }
}

#[test]
fn apply_watch_follows_an_edit_and_exits_when_every_step_is_done() {
    let root = tempfile::tempdir().unwrap();
    let uri = fleet(root.path());
    let plan = root.path().join("plan.yaml");
    let t0 = now();
    std::fs::write(
        &plan,
        plan_body(
            &uri,
            &[
                (at(t0, 1), "vm-01", "memory: 192MiB"),
                (at(t0, 600), "vm-01", "vcpus: 2"),
            ],
        ),
    )
    .unwrap();
    let mut apply = Proc::spawn(&["apply", plan.to_str().unwrap(), "--auto-approve", "--watch"]);
    apply.wait_line("step 1 done", |l| l.contains("step 1 vm-01: done"));
    let t1 = now();
    save(
        &plan,
        &plan_body(
            &uri,
            &[
                (at(t0, 1), "vm-01", "memory: 192MiB"),
                (at(t1, 2), "vm-01", "vcpus: 2"),
            ],
        ),
    );
    apply.wait_line("the plan diff", |l| l.contains("--- a/plan.yaml"));
    apply.wait_line("step 2 done", |l| l.contains("step 2 vm-01: done"));
    let (code, lines) = apply.finish();
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    assert_eq!(statuses(&plan), [StepStatus::Done; 2]);
    // The edit is recorded: the lockfile belongs to the new version of the plan.
    let lock = lock_of(&plan);
    assert_eq!(
        lock.steps[1].at.unwrap().timestamp(),
        (t1 + chrono::Duration::seconds(2)).timestamp()
    );
}

#[test]
fn apply_watch_refuses_a_saved_plan_and_watch_needs_a_folder() {
    let root = tempfile::tempdir().unwrap();
    let uri = fleet(root.path());
    let plan = root.path().join("plan.yaml");
    std::fs::write(
        &plan,
        plan_body(&uri, &[(at(now(), 600), "vm-01", "vcpus: 2")]),
    )
    .unwrap();
    let saved = root.path().join("saved.json");
    let (code, lines) = Proc::spawn(&[
        "plan",
        plan.to_str().unwrap(),
        "--out",
        saved.to_str().unwrap(),
    ])
    .finish();
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    let (code, lines) = Proc::spawn(&["apply", saved.to_str().unwrap(), "--watch"]).finish();
    assert_eq!(code, Some(1));
    assert!(
        lines.iter().any(|l| l.contains("drop --watch")),
        "{}",
        lines.join("\n")
    );
    let (code, lines) = Proc::spawn(&["watch", plan.to_str().unwrap()]).finish();
    assert_eq!(code, Some(1));
    assert!(
        lines.iter().any(|l| l.contains("is not a folder")),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn two_plans_of_one_folder_changing_one_domain_at_overlapping_times_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uri = write_fleet(dir.path(), &[FleetDomain::new("web-01").running(true)]).unwrap();
    let t0 = now();
    // a.yaml shuts web-01 off in an hour; b.yaml hot-plugs it 30 s later, within a's grace.
    std::fs::write(
        dir.path().join("a.yaml"),
        plan_body(&uri, &[(at(t0, 3600), "web-01", "power: shutoff")]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        plan_body(&uri, &[(at(t0, 3630), "web-01", "vcpus: 2")]),
    )
    .unwrap();
    let mut p = Proc::watch(dir.path());
    p.event("a.yaml", "running", None);
    let refused = p.event("b.yaml", "overlap", None);
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("b.yaml:5:9"),
        "located at b's `at`: {message}"
    );
    assert!(
        message.contains("two plans would change one domain at the same time"),
        "{message}"
    );
    assert!(message.contains("step 1 of"), "{message}");
    assert!(
        !dir.path().join("b.lock").exists()
            || statuses(&dir.path().join("b.yaml"))
                .iter()
                .all(|s| *s == StepStatus::Pending)
    );
}
