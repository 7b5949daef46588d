//! Domain leases end to end: two `virtplan apply` processes on one real QEMU domain never act
//! at once, a live lease of another executor makes a step missed (naming the holder), and an
//! expired one is taken over.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use chrono::{DateTime, Utc};
use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lease::{Holder, Lease, Metadata, Register};
use virtplan::lockfile::StepStatus;
use virtplan::state::PowerState;

use crate::support::helpers::{at, lock_of, text};
use crate::support::qemu::{qemu_uri, TestDomain};

const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

fn write_plan(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write plan");
    path
}

fn apply(plan: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn foreign_lease(expires: DateTime<Utc>) -> Lease {
    Lease {
        holder: Holder {
            host: "other-admin".to_owned(),
            pid: 4242,
            token: "feedface".to_owned(),
            plan: "/srv/plans/other.yaml".to_owned(),
        },
        expires,
    }
}

/// Plan A shuts the guest down (it ignores ACPI, so that takes the 3 s timeout, then a forced
/// off); plan B retitles it at the same second. Whichever takes the lease first acts; the
/// other waits for its release, then acts, and says whom it waited for.
#[test]
fn two_applies_on_one_qemu_domain_never_act_at_once() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lease-two");
    dom.start();
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemClock.now();
    // 8 s ahead: both processes are started, planned and waiting before the second comes, even
    // on a loaded CI machine (3 s once let one start 6 s late, after the other had finished).
    let when = at(t0, 8);
    let a = write_plan(
        dir.path(),
        "a.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - at: {when}\n    vm: {}\n    power: shutoff\n    shutdown: {{ mode: graceful, timeout: 3s, force_after_timeout: true }}\n",
            dom.name
        ),
    );
    let b = write_plan(
        dir.path(),
        "b.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - at: {when}\n    vm: {}\n    title: retitled by plan b\n",
            dom.name
        ),
    );
    let first = apply(&a).spawn().unwrap();
    let second = apply(&b).spawn().unwrap();
    let (pid_a, pid_b) = (first.id(), second.id());
    let out_a = first.wait_with_output().unwrap();
    let out_b = second.wait_with_output().unwrap();
    assert_eq!(out_a.status.code(), Some(0), "{}", text(&out_a));
    assert_eq!(out_b.status.code(), Some(0), "{}", text(&out_b));

    let ra = lock_of(&a).steps[0].clone();
    let rb = lock_of(&b).steps[0].clone();
    assert_eq!((ra.status, rb.status), (StepStatus::Done, StepStatus::Done));
    // Exactly one waited, for the other's pid, and finished after the other had finished.
    let (winner, loser, winner_pid) =
        match (ra.message.contains("waited"), rb.message.contains("waited")) {
            (false, true) => (&ra, &rb, pid_a),
            (true, false) => (&rb, &ra, pid_b),
            other => panic!("exactly one step must have waited: {other:?}\n{ra:?}\n{rb:?}"),
        };
    assert!(
        loser
            .message
            .contains(&format!("for the lease held by pid {winner_pid} on ")),
        "{loser:?}"
    );
    assert!(
        loser.finished_at.unwrap() >= winner.finished_at.unwrap(),
        "{winner:?}\n{loser:?}"
    );
    let hv = Libvirt::connect(&uri).unwrap();
    let state = hv.observe(&dom.uuid, false).unwrap();
    assert_eq!(state.power, PowerState::Shutoff);
    assert_eq!(state.title, "retitled by plan b");
    // Both released their lease.
    assert_eq!(Metadata(&hv).get(&dom.uuid).unwrap(), None);
}

#[test]
fn a_live_lease_of_another_executor_makes_the_step_missed_naming_it() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lease-live");
    let hv = Libvirt::connect(&uri).unwrap();
    let now = SystemClock.now();
    let held = foreign_lease(now + chrono::Duration::minutes(10));
    Metadata(&hv).set(&dom.uuid, Some(&held.to_xml())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "plan.yaml",
        &format!(
            "version: 1\nconnection: {uri}\ngrace: 3s\nsteps:\n  - vm: {}\n    autostart: true\n",
            dom.name
        ),
    );
    let out = apply(&plan).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let record = lock_of(&plan).steps[0].clone();
    assert_eq!(record.status, StepStatus::Missed, "{record:?}");
    assert!(
        record
            .message
            .contains("leased by pid 4242 on other-admin (plan /srv/plans/other.yaml)"),
        "{record:?}"
    );
    assert!(!hv.observe(&dom.uuid, false).unwrap().autostart);
    // The other executor's lease is left as it was.
    let after = Lease::parse(&Metadata(&hv).get(&dom.uuid).unwrap().unwrap()).unwrap();
    assert_eq!(after.holder, held.holder);
    assert_eq!(
        after.expires.timestamp_millis(),
        held.expires.timestamp_millis()
    );
}

#[test]
fn an_expired_lease_of_a_dead_executor_is_taken_over() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lease-expired");
    let hv = Libvirt::connect(&uri).unwrap();
    let now = SystemClock.now();
    // Expired a minute ago: beyond the default 5 s clock-skew margin.
    let dead = foreign_lease(now - chrono::Duration::minutes(1));
    Metadata(&hv).set(&dom.uuid, Some(&dead.to_xml())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "plan.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: {}\n    autostart: true\n",
            dom.name
        ),
    );
    let out = apply(&plan).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lock_of(&plan).steps[0].status, StepStatus::Done);
    assert!(hv.observe(&dom.uuid, false).unwrap().autostart);
    assert_eq!(Metadata(&hv).get(&dom.uuid).unwrap(), None);
}
