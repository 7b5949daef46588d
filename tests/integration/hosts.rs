//! Many hosts with real daemons: the system daemon (`qemu:///system`) and a throw-away user's
//! own libvirtd (`qemu:///session`, support/session.rs) as two hosts of one plan; killing the
//! session daemon mid-window fails only its own steps, while the system host's steps complete.

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::{LockStore, StepStatus};
use virtplan::state::PowerState;

use crate::support::helpers::{at, lock_of, text, virtplan, write_plan, BIN};
use crate::support::qemu::{qemu_uri, TestDomain};
use crate::support::session::SessionDaemon;

fn now() -> DateTime<Utc> {
    SystemClock.now()
}

/// A small diskless domain on the session daemon: TCG (`qemu`), since its user may not use
/// /dev/kvm.
fn session_domain(daemon: &SessionDaemon, test: &str) -> TestDomain {
    TestDomain::define_with(&daemon.uri, test, |name| {
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices><memballoon model='none'/></devices>
</domain>"
        )
    })
}

#[test]
fn two_real_daemons_are_two_hosts_of_one_plan() {
    let Some(system) = qemu_uri() else { return };
    let Some(daemon) = SessionDaemon::start() else {
        return;
    };
    let on_system = TestDomain::define(&system, "hosts-two");
    let on_session = session_domain(&daemon, "hosts-two");
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1
grace: 30s
steps:
  - at: {start}
    connection: {system}
    vm: {s}
    power: running
  - at: {start}
    connection: \"{session}\"
    vm: {u}
    power: running
  - at: {stop}
    connection: {system}
    vm: {s}
    power: shutoff
    shutdown: {{ mode: force }}
  - at: {stop}
    connection: \"{session}\"
    vm: {u}
    power: shutoff
    shutdown: {{ mode: force }}
",
            start = at(t0, 4),
            stop = at(t0, 6),
            s = on_system.name,
            u = on_session.name,
            session = daemon.uri,
        ),
    );
    // `plan` reads both daemons and shows both hosts' domains.
    let out = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&on_system.name) && shown.contains(&on_session.name),
        "{shown}"
    );

    let out = virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(lock.steps.len(), 4, "{lock:?}");
    for r in &lock.steps {
        assert_eq!(r.status, StepStatus::Done, "{r:?}");
        assert!(r.started_at.unwrap() >= r.at.unwrap(), "{r:?}");
        // Each step went to its own daemon: the record shows the domain ran, then stopped.
        let after = r.after.as_ref().unwrap();
        let expected = if r.step <= 2 {
            PowerState::Running
        } else {
            PowerState::Shutoff
        };
        assert_eq!(after.power, expected, "{r:?}");
    }
    for (uri, uuid) in [(&system, &on_system.uuid), (&daemon.uri, &on_session.uuid)] {
        let hv = Libvirt::connect(uri.as_str()).unwrap();
        assert_eq!(hv.observe(uuid, false).unwrap().power, PowerState::Shutoff);
    }
}

#[test]
fn killing_one_daemon_mid_window_fails_only_its_own_steps() {
    let Some(system) = qemu_uri() else { return };
    let Some(mut daemon) = SessionDaemon::start() else {
        return;
    };
    let on_system = TestDomain::define(&system, "hosts-kill");
    let on_session = session_domain(&daemon, "hosts-kill");
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let plan = write_plan(
        dir.path(),
        &format!(
            "version: 1
grace: 2s
steps:
  - at: {first}
    connection: {system}
    vm: {s}
    title: first
  - at: {first}
    connection: \"{session}\"
    vm: {u}
    title: first
  - at: {second}
    connection: {system}
    vm: {s}
    title: second
  - at: {second}
    connection: \"{session}\"
    vm: {u}
    title: second
",
            first = at(t0, 3),
            second = at(t0, 6),
            s = on_system.name,
            u = on_session.name,
            session = daemon.uri,
        ),
    );
    let child = Command::new(BIN)
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once both first steps are recorded done, the session host dies.
    let lock_path = plan.with_extension("lock");
    let first_done = || {
        LockStore::read(&lock_path).is_ok_and(|l| {
            l.steps
                .iter()
                .filter(|r| r.step <= 2 && r.status == StepStatus::Done)
                .count()
                == 2
        })
    };
    while !first_done() {
        assert!(
            now() < t0 + chrono::Duration::seconds(30),
            "the first steps never finished"
        );
        SystemClock.sleep(Duration::from_millis(50));
    }
    daemon.kill();
    let out = child.wait_with_output().unwrap();
    // Exit 3: a step missed.
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lock = lock_of(&plan);
    let record = |step: usize| lock.steps.iter().find(|r| r.step == step).unwrap();
    for step in [1, 2, 3] {
        assert_eq!(record(step).status, StepStatus::Done, "{:?}", record(step));
    }
    let lost = record(4);
    assert_eq!(lost.status, StepStatus::Missed, "{lost:?}");
    assert!(lost.message.contains("is unreachable"), "{}", lost.message);
    assert!(
        lost.message.contains("qemu+unix:///session"),
        "{}",
        lost.message
    );
    // The system host's second step ran at its time, untouched by the lost host.
    let second = record(3);
    assert!(
        second.started_at.unwrap() - second.at.unwrap() < chrono::Duration::seconds(2),
        "{second:?}"
    );
    let hv = Libvirt::connect(system.as_str()).unwrap();
    assert_eq!(hv.observe(&on_system.uuid, true).unwrap().title, "second");
    // The output names the lost host too.
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("is unreachable"), "{}", text(&out));
}
