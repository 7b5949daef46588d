//! `on_poweroff` / `on_reboot`: the attribute added through CONTRIBUTING.md's recipe, planned,
//! applied and verified on the test driver and on a real QEMU domain.

use std::path::Path;

use virtplan::hypervisor::domain_xml;
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::hypervisor::libvirt::Libvirt;
use virtplan::hypervisor::Hypervisor;
use virtplan::lockfile::StepStatus;
use virtplan::state::{Kib, LifecycleAction};

use crate::support::helpers::{apply, lock_of, text, virtplan, write_steps};
use crate::support::qemu::{qemu_uri, TestDomain};

fn lifecycle_of(uri: &str, uuid: &str) -> (LifecycleAction, LifecycleAction) {
    let hv = Libvirt::connect(uri).unwrap();
    let l = domain_xml::read_lifecycle(&hv.domain_xml(uuid, true).unwrap()).unwrap();
    (l.on_poweroff, l.on_reboot)
}

/// Plans, applies and re-plans `on_poweroff`/`on_reboot` on `uri`'s domain `vm`: the first
/// kept as it is, the second flipped between `restart` and `destroy`. `check_live` reads the
/// result back through a connection of its own (the test driver gives each connection its own
/// copy of the host, so there only the executor's own verification can see it).
fn plan_apply_replan(dir: &Path, uri: &str, vm: &str, uuid: &str, check_live: bool) {
    let (poweroff, reboot) = lifecycle_of(uri, uuid);
    let target = if reboot == LifecycleAction::Restart {
        LifecycleAction::Destroy
    } else {
        LifecycleAction::Restart
    };
    let plan = write_steps(
        dir,
        uri,
        &format!("  - vm: {vm}\n    on_poweroff: {poweroff}\n    on_reboot: {target}\n"),
    );
    let plan_arg = plan.to_str().unwrap();

    let out = virtplan(&["plan", plan_arg, "--format", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changes: Vec<(String, String, String, String)> = json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["attribute"].as_str().unwrap().to_owned(),
                c["before"].as_str().unwrap().to_owned(),
                c["after"].as_str().unwrap().to_owned(),
                c["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let owned = |a: &str, b: &str, c: &str, d: &str| {
        (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned())
    };
    assert_eq!(
        changes,
        [
            owned("on_poweroff", poweroff.as_str(), poweroff.as_str(), "noop"),
            owned("on_reboot", reboot.as_str(), target.as_str(), "change"),
        ]
    );
    let out = virtplan(&["plan", plan_arg], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("on_reboot    {reboot} → {target}  [config]")),
        "{}",
        text(&out)
    );

    let out = virtplan(&["apply", plan_arg, "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    assert_eq!(
        lock.steps[0].status,
        StepStatus::Done,
        "{:?}",
        lock.steps[0]
    );
    assert_eq!(
        lock.steps[0].what,
        format!("on_poweroff {poweroff} (no change); on_reboot {reboot} → {target}")
    );
    if check_live {
        assert_eq!(lifecycle_of(uri, uuid), (poweroff, target));
    }

    // Applied and verified: the plan now shows it done, nothing left to change.
    let out = virtplan(&["plan", plan_arg, "--detailed-exitcode"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn on_reboot_is_planned_applied_and_verified_on_the_test_driver() {
    let dir = tempfile::tempdir().unwrap();
    let uri = write_fleet(
        dir.path(),
        &[FleetDomain::new("vm-01")
            .uuid("5d1c2a34-52a5-4c41-9d0c-2f6c3c8b00a1")
            .memory(Kib::from_mib(128), Kib::from_mib(256))],
    )
    .unwrap();
    plan_apply_replan(
        dir.path(),
        &uri,
        "vm-01",
        "5d1c2a34-52a5-4c41-9d0c-2f6c3c8b00a1",
        false,
    );
}

#[test]
fn on_reboot_is_planned_applied_and_verified_on_a_real_qemu_domain() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lifecycle");
    let dir = tempfile::tempdir().unwrap();
    plan_apply_replan(dir.path(), &uri, &dom.name, &dom.uuid, true);
}

#[test]
fn an_unknown_lifecycle_action_is_refused_with_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let plan = write_steps(
        dir.path(),
        "test:///default",
        "  - vm: a\n    on_reboot: reboot\n",
    );
    let out = virtplan(&["validate", plan.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plan.yaml:5:16") && stderr.contains("`destroy`, `restart`"),
        "{}",
        text(&out)
    );
}

/// libvirt's QEMU driver refuses `preserve`, `rename-restart`, and `on_reboot: destroy` with
/// `on_poweroff: restart`: `plan` says so at the value's line, so `apply` never meets it.
#[test]
fn qemu_refuses_unsupported_lifecycle_actions_at_plan_time() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lifecycle-refused");
    let dir = tempfile::tempdir().unwrap();
    let before = lifecycle_of(&uri, &dom.uuid);
    for (attrs, line, column, says) in [
        (
            "    on_poweroff: preserve\n",
            5,
            18,
            "`on_poweroff: preserve` is not supported by libvirt's QEMU driver",
        ),
        (
            "    on_reboot: rename-restart\n",
            5,
            16,
            "`on_reboot: rename-restart` is not supported by libvirt's QEMU driver",
        ),
        (
            "    on_poweroff: restart\n    on_reboot: destroy\n",
            6,
            16,
            "`on_reboot: destroy` with `on_poweroff: restart` is refused",
        ),
    ] {
        let plan = write_steps(dir.path(), &uri, &format!("  - vm: {}\n{attrs}", dom.name));
        let path = plan.to_str().unwrap();
        for args in [&["plan", path][..], &["apply", path, "--auto-approve"]] {
            let command = args[0];
            let out = virtplan(args, &[]);
            assert_eq!(out.status.code(), Some(1), "{command}: {}", text(&out));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(says) && stderr.contains(&format!("plan.yaml:{line}:{column}")),
                "{command} of {attrs:?}: {}",
                text(&out)
            );
        }
        assert_eq!(lifecycle_of(&uri, &dom.uuid), before, "nothing was changed");
    }
}

/// From `on_poweroff: destroy, on_reboot: destroy` to `restart, restart`: changing
/// `on_poweroff` first would pass through a pair QEMU refuses, so `on_reboot` goes first.
#[test]
fn qemu_lifecycle_changes_are_ordered_so_libvirt_never_sees_a_refused_pair() {
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "lifecycle-order");
    let dir = tempfile::tempdir().unwrap();
    let plan = write_steps(
        dir.path(),
        &uri,
        &format!(
            "  - vm: {0}\n    on_poweroff: destroy\n    on_reboot: destroy\n  - vm: {0}\n    on_poweroff: restart\n    on_reboot: restart\n  - vm: {0}\n    on_poweroff: destroy\n    on_reboot: destroy\n",
            dom.name
        ),
    );
    let out = apply(&plan, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lock = lock_of(&plan);
    assert!(
        lock.steps.iter().all(|s| s.status == StepStatus::Done),
        "{:?}",
        lock.steps
    );
    assert_eq!(
        lifecycle_of(&uri, &dom.uuid),
        (LifecycleAction::Destroy, LifecycleAction::Destroy)
    );
}
