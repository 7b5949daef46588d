//! The executor's paths on a real guest (support/guest.rs): graceful shutdowns on each rung of
//! the ladder, snapshots of a qcow2 disk, a balloon that takes a live memory cut, vCPU hotplug
//! the guest agent reports, a reboot through the agent with a `guest_agent` check and a clock
//! sync; and `plan` refusing snapshots libvirt cannot take. Every change goes through `virtplan
//! apply`; the assertions read what an operator would look at: the step's status and message,
//! libvirt, and the guest itself.

use std::path::Path;
use std::time::Duration;

use virtplan::clock::{Clock, SystemClock};
use virtplan::lockfile::{StepRecord, StepStatus};

use crate::support::cli::Cli;
use crate::support::guest::{Disk, Guest, GuestSpec};
use crate::support::helpers::{lock_of, write_steps};
use crate::support::qemu::qemu_uri;

/// Writes `steps` (YAML list items, indented by two) as a plan on `uri` in `dir` and applies
/// it; returns the first step's record, which must be done.
fn apply(dir: &Path, uri: &str, steps: &str) -> StepRecord {
    let plan = write_steps(dir, uri, steps);
    Cli::new()
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .run();
    let step = lock_of(&plan).steps[0].clone();
    assert_eq!(step.status, StepStatus::Done, "{}: {step:?}", dir.display());
    step
}

/// How long the step took, from its record.
fn took(record: &StepRecord) -> chrono::Duration {
    record.finished_at.expect("finished_at") - record.started_at.expect("started_at")
}

#[test]
fn acpi_rung_shuts_down_a_guest_without_an_agent_channel() {
    let Some(uri) = qemu_uri() else { return };
    let spec = GuestSpec {
        agent: false,
        disk: Disk::None,
        ..GuestSpec::default()
    };
    let guest = Guest::boot(&uri, "acpi-rung", &spec);
    // No force: a guest that ignored the power button would fail the step, not be destroyed.
    let step = &shut_down_gracefully(&guest, &uri);
    assert!(
        step.message.contains("shut down gracefully (through ACPI)"),
        "{step:?}"
    );
    eprintln!("ACPI shutdown took {}", took(step));
    assert!(
        took(step) < chrono::Duration::seconds(30),
        "a guest answering the power button took {}",
        took(step)
    );
}

/// Online vCPUs as the guest agent reports them (`guest-get-vcpus`).
fn online_vcpus(guest: &Guest) -> Option<usize> {
    let vcpus = guest.agent("guest-get-vcpus").ok()?;
    Some(
        vcpus
            .as_array()?
            .iter()
            .filter(|v| v["online"] == true)
            .count(),
    )
}

/// One guest, one change after another, each through `virtplan apply`: a live memory cut the
/// balloon takes, a live raise within the maximum, a hot-added vCPU the agent reports, a snapshot
/// of the running guest, a graceful shutdown, and a snapshot of the shut-off guest.
#[test]
fn live_changes_and_snapshots_on_a_real_guest() {
    let Some(uri) = qemu_uri() else { return };
    let guest = Guest::boot(&uri, "live", &GuestSpec::default());
    let vm = guest.name().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let apply = |name: &str, steps: &str| {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        apply(&sub, &uri, steps)
    };
    // The guest's own MemTotal, from statistics it sent after the balloon settled (it sends
    // them every second).
    let guest_total = || {
        let since = guest.memstat().get("last_update").copied().unwrap_or(0);
        guest.wait_for("fresh guest statistics", Duration::from_secs(20), || {
            let stats = guest.memstat();
            (stats.get("last_update").copied()? > since + 1).then(|| stats["available"])
        })
    };
    let total_before = guest_total();

    // A live cut: the balloon driver inflates and the guest itself sees 64 MiB less.
    let step = apply("cut", &format!("  - vm: {vm}\n    memory: 192MiB\n"));
    assert!(!step.message.contains("balloon"), "{step:?}");
    assert_eq!(guest.memstat()["actual"], 192 * 1024);
    let total_cut = guest_total();
    assert_eq!(total_before - total_cut, 64 * 1024, "the guest's MemTotal");

    // A live raise within the maximum (384 MiB): the balloon deflates.
    apply("raise", &format!("  - vm: {vm}\n    memory: 320MiB\n"));
    assert_eq!(guest.memstat()["actual"], 320 * 1024);
    let total_raised = guest_total();
    assert_eq!(total_raised - total_cut, 128 * 1024, "the guest's MemTotal");

    // vCPU hotplug: the guest onlines the new vCPU and its agent reports two.
    assert_eq!(online_vcpus(&guest), Some(1));
    apply("vcpus", &format!("  - vm: {vm}\n    vcpus: 2\n"));
    guest.wait_for("two online vCPUs", Duration::from_secs(20), || {
        online_vcpus(&guest).filter(|&n| n == 2)
    });

    // A snapshot of the running guest (memory and disk state in the qcow2 image).
    apply(
        "snap-live",
        &format!("  - vm: {vm}\n    snapshot: {{ name: live-1 }}\n"),
    );
    assert!(
        guest.is_active(),
        "a live snapshot leaves the guest running"
    );
    assert_eq!(guest.snapshots(), ["live-1"]);

    // A graceful shutdown that needs no force.
    let step = apply(
        "off",
        &format!(
            "  - vm: {vm}
    power: shutoff
    shutdown: {{ mode: graceful, timeout: 60s, force_after_timeout: false }}
"
        ),
    );
    assert!(step.message.contains("shut down gracefully"), "{step:?}");
    assert!(!guest.is_active());
    eprintln!("graceful shutdown took {}", took(&step));

    // A snapshot of the shut-off guest (qemu-img, run by libvirtd).
    apply(
        "snap-off",
        &format!("  - vm: {vm}\n    snapshot: {{ name: off-1, description: shut off }}\n"),
    );
    let mut names = guest.snapshots();
    names.sort();
    assert_eq!(names, ["live-1", "off-1"]);
}

/// A graceful shutdown of `guest` without force, through `virtplan apply`; returns the record.
fn shut_down_gracefully(guest: &Guest, uri: &str) -> StepRecord {
    let dir = tempfile::tempdir().unwrap();
    let step = apply(
        dir.path(),
        uri,
        &format!(
            "  - vm: {}
    power: shutoff
    shutdown: {{ mode: graceful, timeout: 60s, force_after_timeout: false }}
",
            guest.name()
        ),
    );
    assert!(!guest.is_active(), "the guest is still running");
    step
}

#[test]
fn agent_rung_shuts_down_a_guest_that_ignores_the_power_button() {
    let Some(uri) = qemu_uri() else { return };
    // The guest ignores ACPI: only its agent can shut it down.
    let spec = GuestSpec {
        power_button: false,
        disk: Disk::None,
        ..GuestSpec::default()
    };
    let guest = Guest::boot(&uri, "agent-rung", &spec);
    let step = shut_down_gracefully(&guest, &uri);
    assert!(
        step.message
            .contains("shut down gracefully (through the guest agent)"),
        "{step:?}"
    );
    eprintln!("agent shutdown took {}", took(&step));
    assert!(took(&step) < chrono::Duration::seconds(30), "{step:?}");
}

#[test]
fn a_failed_agent_shutdown_falls_back_to_acpi() {
    let Some(uri) = qemu_uri() else { return };
    let spec = GuestSpec {
        agent_shutdown_fails: true,
        disk: Disk::None,
        ..GuestSpec::default()
    };
    let guest = Guest::boot(&uri, "agent-fallback", &spec);
    let step = shut_down_gracefully(&guest, &uri);
    assert!(
        step.message
            .contains("the guest agent did not take the shutdown request"),
        "{step:?}"
    );
    assert!(
        step.message.contains("shut down gracefully (through ACPI)"),
        "{step:?}"
    );
    eprintln!("agent failure, then ACPI shutdown, took {}", took(&step));
}

/// `virtplan plan` of `steps` on `uri` with `PATH` set to `path`; returns stdout and stderr.
fn plan_with_path(uri: &str, steps: &str, path: &str, status: i32) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let plan = write_steps(dir.path(), uri, steps);
    let ran = Cli::new()
        .args(["plan", plan.to_str().unwrap()])
        .env("PATH", path)
        .status(status)
        .run();
    (ran.stdout, ran.stderr)
}

/// The system PATH, and one without qemu-img (an empty folder: virtplan runs no program).
fn paths() -> (String, String) {
    let system = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    (system, "/nonexistent".to_owned())
}

#[test]
fn plan_refuses_a_snapshot_of_a_domain_without_a_disk() {
    let Some(uri) = qemu_uri() else { return };
    let spec = GuestSpec {
        disk: Disk::None,
        ..GuestSpec::default()
    };
    let guest = Guest::define(&uri, "snap-nodisk", &spec);
    let steps = format!("  - vm: {}\n    snapshot: {{ name: s1 }}\n", guest.name());
    let (_, stderr) = plan_with_path(&uri, &steps, &paths().0, 1);
    assert!(
        stderr.contains(&format!(
            "step 1 ({}): libvirt cannot snapshot {} (shut off at this step): the domain has no disk",
            guest.name(),
            guest.name()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("plan.yaml:5:15"), "{stderr}");
    assert!(stderr.contains("give the domain a qcow2 disk"), "{stderr}");
}

#[test]
fn plan_refuses_a_snapshot_of_a_raw_disk() {
    let Some(uri) = qemu_uri() else { return };
    let spec = GuestSpec {
        disk: Disk::Raw,
        ..GuestSpec::default()
    };
    let guest = Guest::define(&uri, "snap-raw", &spec);
    let steps = format!("  - vm: {}\n    snapshot: {{ name: s1 }}\n", guest.name());
    let (_, stderr) = plan_with_path(&uri, &steps, &paths().0, 1);
    assert!(
        stderr.contains(
            "disk vda is raw: an internal snapshot needs every writable disk in qcow2 format"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("plan.yaml:5:15"), "{stderr}");
}

/// libvirt runs qemu-img only for a shut-off domain: without it, `plan` refuses the snapshot
/// of a shut-off qcow2 domain (and of a running one the plan powers off first), and accepts the
/// snapshot of a running one (QEMU's own savevm).
#[test]
fn plan_refuses_a_shut_off_snapshot_without_qemu_img() {
    let Some(uri) = qemu_uri() else { return };
    let (system, no_qemu_img) = paths();
    let off = Guest::define(&uri, "snap-noimg-off", &GuestSpec::default());
    let steps = format!("  - vm: {}\n    snapshot: {{ name: s1 }}\n", off.name());
    let (_, stderr) = plan_with_path(&uri, &steps, &no_qemu_img, 1);
    assert!(
        stderr.contains("(shut off at this step): libvirt runs qemu-img to snapshot a shut-off domain, and qemu-img is not installed on this host"),
        "{stderr}"
    );
    assert!(stderr.contains("qemu-utils"), "{stderr}");
    // With qemu-img: green.
    let (stdout, _) = plan_with_path(&uri, &steps, &system, 0);
    assert!(stdout.contains("snapshot"), "{stdout}");

    // A running domain (booting is enough: plan only reads it).
    let on = Guest::define(&uri, "snap-noimg-on", &GuestSpec::default());
    on.start();
    let steps = format!("  - vm: {}\n    snapshot: {{ name: s1 }}\n", on.name());
    plan_with_path(&uri, &steps, &no_qemu_img, 0);
    let steps = format!(
        "  - vm: {}\n    power: shutoff\n    snapshot: {{ name: s1 }}\n",
        on.name()
    );
    let (_, stderr) = plan_with_path(&uri, &steps, &no_qemu_img, 1);
    assert!(
        stderr.contains("(shut off at this step): libvirt runs qemu-img"),
        "{stderr}"
    );
}

/// The safe-windows features that need a real agent, on the real guest: a reboot whose
/// shutdown goes through the agent, a `guest_agent` check that passes once the rebooted guest's
/// agent answers, and `clock: {sync: true}` setting the guest's clock (a day off at every boot)
/// from the host, seen through the agent.
#[test]
fn reboot_through_the_agent_with_check_and_clock_sync() {
    let Some(uri) = qemu_uri() else { return };
    let day = 86_400;
    let spec = GuestSpec {
        disk: Disk::None,
        clock_skew_secs: -day,
        ..GuestSpec::default()
    };
    let guest = Guest::boot(&uri, "reboot-sync", &spec);
    let skew = |guest: &Guest| guest.guest_time().expect("guest time") - SystemClock.now();
    assert!(
        skew(&guest) < -chrono::Duration::hours(23),
        "the guest boots a day behind: {}",
        skew(&guest)
    );
    let dir = tempfile::tempdir().unwrap();
    let step = apply(
        dir.path(),
        &uri,
        &format!(
            "  - vm: {}
    power: reboot
    shutdown: {{ mode: graceful, timeout: 60s, force_after_timeout: false }}
    clock: {{ track: wall, sync: true }}
    check: {{ state: running, guest_agent: true, timeout: 2m, interval: 1s }}
",
            guest.name()
        ),
    );
    for expected in [
        "shut down gracefully (through the guest agent)",
        "rebooted: domain id",
        "guest time set from the host",
        "check passed",
    ] {
        assert!(step.message.contains(expected), "{expected:?}: {step:?}");
    }
    // The guest rebooted a day behind again; the sync put it right.
    let skew = skew(&guest);
    assert!(
        skew.abs() < chrono::Duration::seconds(10),
        "the guest's clock is {skew} off the host's after the sync"
    );
    assert!(guest
        .virsh(&["dumpxml", "--inactive", guest.uuid()])
        .contains("track='wall'"));
    eprintln!("reboot with check and clock sync took {}", took(&step));
}
