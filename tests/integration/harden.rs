//! Regression tests of issue 8 (hardening), each named after the defect it pins: secrets in
//! connection URIs, host aliases, hostile files (symlinks, FIFOs, devices), small input edge
//! cases. Each failed on the code before the fix.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};

use crate::support::cli::Cli;

/// A fleet with one shut-off domain `vm1`, its URI and folder.
fn fleet() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    // A fixed UUID: each process gets its own copy of the test host, and the lockfile checks
    // that a domain keeps its UUID between runs.
    let vm1 = FleetDomain::new("vm1")
        .running(false)
        .uuid("6c0d3b9e-58a2-4b6f-9a51-0f8f4a3e2d11");
    let uri = write_fleet(dir.path(), &[vm1]).unwrap();
    (dir, uri)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- secrets (item 6) ----

#[test]
fn regression_uri_password_printed_in_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nconnection: qemu+tcp://admin:PW-S3CRET@127.0.0.1:1/system?password=QS-S3CRET\nsteps:\n  - {vm: a, power: on}\n",
    );
    for args in [
        vec!["plan", s(&plan)],
        vec!["apply", s(&plan), "--auto-approve"],
    ] {
        Cli::new()
            .args(args)
            .status(1)
            .stderr_contains("admin:***@127.0.0.1:1/system?password=***")
            .stderr_lacks("S3CRET")
            .stdout_lacks("S3CRET")
            .run();
    }
}

#[test]
fn regression_uri_password_in_plan_json_and_saved_plan_written_0644() {
    let (dir, uri) = fleet();
    let secret_uri = format!("{uri}?password=QS-S3CRET");
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {secret_uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    let saved = dir.path().join("p.saved.json");
    Cli::new()
        .args(["plan", s(&plan), "--format", "json"])
        .stdout_contains("password=***")
        .stdout_lacks("S3CRET")
        .run();
    for format in ["human", "markdown", "json"] {
        Cli::new()
            .args(["plan", s(&plan), "--format", format, "--out", s(&saved)])
            .stdout_lacks("S3CRET")
            .stderr_lacks("S3CRET")
            .run();
    }
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(!text.contains("S3CRET"), "{text}");
    assert!(text.contains("password=***"), "{text}");
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "saved plans are private like the lockfile");
    // The saved plan still applies: its connection gets its credentials back from the plan.
    Cli::new()
        .args(["apply", s(&saved)])
        .stdout_lacks("S3CRET")
        .stderr_lacks("S3CRET")
        .stdout_contains("done")
        .run();
    let lock = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
    assert!(!lock.contains("S3CRET"), "{lock}");
}

#[test]
fn regression_saved_plan_made_with_secret_connect_flag_refuses_without_printing_it() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nsteps:\n  - {vm: vm1, title: hello}\n",
    );
    let saved = dir.path().join("p.saved.json");
    Cli::new()
        .args([
            "plan",
            s(&plan),
            "--connect",
            &format!("{uri}?token=T0K3N"),
            "--out",
            s(&saved),
        ])
        .stdout_lacks("T0K3N")
        .run();
    Cli::new()
        .args(["apply", s(&saved)])
        .status(1)
        .stderr_contains("saved plans never store")
        .stderr_lacks("T0K3N")
        .run();
}

// ---- host aliases (item 7) ----

#[test]
fn regression_config_connection_host_alias_not_resolved() {
    let (dir, uri) = fleet();
    write(
        dir.path(),
        "virtplan.toml",
        &format!("connection = \"h\"\n[hosts]\nh = \"{uri}\"\n"),
    );
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nsteps:\n  - {vm: vm1, title: hello}\n",
    );
    Cli::new()
        .args(["plan", s(&plan)])
        .stdout_contains("vm1")
        .run();
}

#[test]
fn regression_config_connection_that_is_neither_uri_nor_host_passes_validate() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "virtplan.toml",
        "connection = \"nohost\"\n[hosts]\nh = \"qemu:///system\"\n",
    );
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nsteps:\n  - {vm: vm1, title: hello}\n",
    );
    Cli::new()
        .args(["validate", s(&plan)])
        .status(1)
        .stderr_contains("virtplan.toml:1:")
        .stderr_contains("connection `nohost` is neither a libvirt URI nor a host")
        .stderr_contains("one of the hosts in virtplan.toml: h")
        .stderr_lacks("did you mean")
        .run();
}

#[test]
fn regression_connect_flag_host_alias_not_resolved() {
    let (dir, uri) = fleet();
    write(
        dir.path(),
        "virtplan.toml",
        &format!("[hosts]\nh = \"{uri}\"\n"),
    );
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nconnection: qemu:///nowhere\nsteps:\n  - {vm: vm1, title: hello}\n",
    );
    Cli::new()
        .args(["plan", s(&plan), "--connect", "h"])
        .stdout_contains("vm1")
        .run();
    Cli::new()
        .args(["plan", s(&plan), "--connect", "nohost"])
        .status(1)
        .stderr_contains("--connect nohost: neither a libvirt URI")
        .run();
}

// ---- hostile files (items 1, 2, 8) ----

#[test]
fn regression_symlinked_lock_pid_is_followed_and_truncated() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "sym.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    let important = write(dir.path(), "important", "keep me\n");
    std::os::unix::fs::symlink(&important, dir.path().join("sym.lock.pid")).unwrap();
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve"])
        .status(1)
        .stderr_contains("symbolic link")
        .run();
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me\n");
}

#[test]
fn regression_symlinked_lockfile_and_saved_plan_are_written_through() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    let important = write(dir.path(), "important", "keep me\n");
    let out = dir.path().join("out.json");
    std::os::unix::fs::symlink(&important, &out).unwrap();
    Cli::new()
        .args(["plan", s(&plan), "--out", s(&out)])
        .status(1)
        .stderr_contains("symbolic link")
        .run();
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me\n");
}

/// Regression: a lockfile that is a symlink was read through (`status` showed the other
/// file's contents as progress; `apply` showed the plan and started before refusing at its first
/// write). Both now refuse before anything else, and the target stays untouched.
#[test]
fn regression_symlinked_lockfile_is_read_through() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    let other = write(
        dir.path(),
        "other.lock",
        "{\"header\":{\"version\":2,\"plan_sha256\":\"x\"}}\n",
    );
    std::os::unix::fs::symlink(&other, dir.path().join("p.lock")).unwrap();
    for args in [
        &["status", s(&plan)][..],
        &["apply", s(&plan), "--auto-approve"],
    ] {
        Cli::new()
            .args(args)
            .status(1)
            .stderr_contains("p.lock: it is a symbolic link")
            .stderr_lacks("Applying")
            .run();
    }
    assert!(std::fs::read_to_string(&other)
        .unwrap()
        .ends_with("\"x\"}}\n"));
}

#[test]
fn regression_symlinked_plan_path_applies_the_step_twice() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "plan.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    let other = tempfile::tempdir().unwrap();
    let link = other.path().join("link-to-plan.yaml");
    std::os::unix::fs::symlink(&plan, &link).unwrap();
    Cli::new().args(["apply", s(&plan), "--auto-approve"]).run();
    // Through the link, the same lockfile says the step is done: nothing runs again.
    Cli::new()
        .args(["apply", s(&link), "--auto-approve"])
        .stderr_lacks("step 1 vm1: done")
        .run();
    assert!(!other.path().join("link-to-plan.lock").exists());
    Cli::new()
        .args(["status", s(&link)])
        .stdout_contains("done")
        .run();
}

#[test]
fn regression_fifo_plan_hangs_validate_plan_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("p.yaml");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for args in [
        vec!["validate", s(&fifo)],
        vec!["plan", s(&fifo)],
        vec!["apply", s(&fifo), "--auto-approve"],
        vec!["status", s(&fifo)],
    ] {
        Cli::new()
            .args(args)
            .status(1)
            .stderr_contains("FIFO")
            .run();
    }
}

#[test]
fn regression_dev_zero_plan_grows_without_bound() {
    Cli::new()
        .args(["validate", "/dev/zero"])
        .status(1)
        .stderr_contains("a device, not a plan file")
        .run();
}

// ---- smaller ones (item 9) ----

#[test]
fn regression_utf8_bom_gives_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let plan = write(
        dir.path(),
        "p.yaml",
        "\u{feff}version: 1\nconnection: test:///default\nsteps:\n  - {vm: test, title: hello}\n",
    );
    Cli::new().args(["validate", s(&plan)]).run();
    write(
        dir.path(),
        "virtplan.toml",
        "\u{feff}connection = \"test:///default\"\n",
    );
    Cli::new().args(["validate", s(&plan)]).run();
}

#[test]
fn regression_virtplan_toml_directory_silently_ignored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("virtplan.toml")).unwrap();
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nconnection: test:///default\nsteps:\n  - {vm: test, title: hello}\n",
    );
    Cli::new()
        .args(["validate", s(&plan)])
        .status(1)
        .stderr_contains("virtplan.toml")
        .stderr_contains("a folder, not a regular file")
        .run();
}

#[test]
fn regression_io_error_cause_printed_twice() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    std::fs::create_dir(dir.path().join("p.lock")).unwrap();
    let ran = Cli::new().args(["status", s(&plan)]).status(1).run();
    assert!(ran.stderr.contains("folder"), "{}", ran.stderr);
    let ran = Cli::new().args(["plan", s(&plan)]).status(1).run();
    assert_eq!(ran.stderr.matches("folder").count(), 1, "{}", ran.stderr);
}

// ---- control characters (item 5) ----

#[test]
fn regression_nul_in_title_passes_validate_and_panics_apply() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - vm: vm1\n    title: \"a\\0b\"\n"),
    );
    Cli::new()
        .args(["validate", s(&plan)])
        .status(1)
        .stderr_contains("`title` contains the control character U+0000")
        .stderr_contains("p.yaml:5:")
        .run();
    Cli::new()
        .args(["apply", s(&plan), "--auto-approve"])
        .status(1)
        .stderr_contains("U+0000")
        .run();
    assert!(!dir.path().join("p.lock").exists(), "nothing was recorded");
}

#[test]
fn regression_esc_in_description_printed_raw_by_plan() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: vm1\n    description: \"x\\e]0;pwned\\a\"\n"
        ),
    );
    Cli::new()
        .args(["validate", s(&plan)])
        .status(1)
        .stderr_contains("`description` contains the control character U+001B")
        .stderr_lacks("\u{1b}]0")
        .run();
    // Tab and line feed stay allowed in a description, and are shown escaped.
    let plan = write(
        dir.path(),
        "q.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - vm: vm1\n    description: \"one\\ttwo\\nthree\"\n"
        ),
    );
    Cli::new()
        .args(["plan", s(&plan)])
        .stdout_contains("one\\ttwo\\nthree")
        .run();
}

#[test]
fn regression_c1_and_bidi_controls_in_live_title_printed_raw_by_plan() {
    let dir = tempfile::tempdir().unwrap();
    // XML cannot carry ESC, but it can carry the C1 control CSI (U+009B, ESC [ on 8-bit
    // terminals) and a right-to-left override that reorders what the reviewer reads.
    let evil = FleetDomain::new("vm1")
        .running(false)
        .title("\u{9b}2J\u{202e}evil");
    let uri = write_fleet(dir.path(), &[evil]).unwrap();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: clean}}\n"),
    );
    for format in ["human", "markdown"] {
        let ran = Cli::new()
            .args(["plan", s(&plan), "--format", format])
            .stdout_contains("\\u{9b}2J\\u{202e}evil")
            .run();
        assert!(!ran.stdout.contains('\u{9b}'), "{}", ran.stdout);
        assert!(!ran.stdout.contains('\u{202e}'), "{}", ran.stdout);
    }
}

#[test]
fn regression_nul_in_config_host_uri_panics_connect() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "virtplan.toml",
        "[hosts]\nh = \"test:///default\\u0000x\"\n",
    );
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nconnection: h\nsteps:\n  - {vm: test, title: hello}\n",
    );
    Cli::new()
        .args(["plan", s(&plan)])
        .status(1)
        .stderr_contains("control character U+0000")
        .run();
}

#[test]
fn regression_nul_reaching_virt_metadata_call_panics() {
    use virtplan::hypervisor::libvirt::Libvirt;
    use virtplan::hypervisor::Hypervisor as _;
    let (_dir, uri) = fleet();
    let hv = Libvirt::connect(&uri).unwrap();
    let id = hv.resolve("vm1").unwrap();
    let err = hv.set_title(&id.uuid, "a\0b").unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
    let err = hv.set_description(&id.uuid, "a\0b").unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
    assert!(Libvirt::connect("test:///default\0x").is_err());
}

#[test]
fn regression_status_of_removed_plan_says_no_such_plan_file() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!("version: 1\nconnection: {uri}\nsteps:\n  - {{vm: vm1, title: hello}}\n"),
    );
    Cli::new()
        .args(["status", s(&plan)])
        .stdout_contains("pending")
        .run();
    Cli::new().args(["apply", s(&plan), "--auto-approve"]).run();
    std::fs::remove_file(&plan).unwrap();
    Cli::new()
        .args(["status", s(&plan)])
        .stdout_contains("done")
        .stderr_contains("is gone")
        .run();
    std::fs::remove_file(dir.path().join("p.lock")).unwrap();
    Cli::new()
        .args(["status", s(&plan)])
        .status(1)
        .stderr_contains("no such plan file, and no lockfile")
        .run();
}

#[test]
fn regression_symlinked_cancel_log_is_appended_through() {
    let (dir, uri) = fleet();
    let plan = write(
        dir.path(),
        "p.yaml",
        &format!(
            "version: 1\nconnection: {uri}\nsteps:\n  - {{at: 2099-01-01T00:00:00Z, vm: vm1, title: hello}}\n"
        ),
    );
    let important = write(dir.path(), "important", "keep me\n");
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    Cli::new().args(["cancel", s(&plan)]).run();
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !before.contains(&p.file_name().unwrap().to_owned()))
        .expect("cancel wrote a log");
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink(&important, &log).unwrap();
    Cli::new()
        .args(["cancel", s(&plan)])
        .status(1)
        .stderr_contains("symbolic link")
        .run();
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me\n");
}

#[test]
fn regression_man_pages_written_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let important = write(dir.path(), "important", "keep me\n");
    std::os::unix::fs::symlink(&important, dir.path().join("virtplan.1")).unwrap();
    Cli::new()
        .args(["man", "--out-dir", s(dir.path())])
        .status(1)
        .stderr_contains("symbolic link")
        .run();
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me\n");
}
