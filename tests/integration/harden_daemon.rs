//! Issue 8 against real daemons: a hung libvirtd (item 4), on a daemon that is safe to freeze,
//! the `qemu:///session` libvirtd of a throw-away user, SIGSTOPped just before a step (the
//! system daemon is never touched); and honest resumes (item 3) on real QEMU domains.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use virtplan::clock::{Clock, SystemClock};

use crate::support::qemu::{qemu_uri, TestDomain};

const BIN: &str = env!("CARGO_BIN_EXE_virtplan");

/// A system user made for one test, with its own session libvirtd; removed (daemon, domains,
/// home) when dropped.
struct ThrowawayUser {
    name: String,
    home: PathBuf,
}

impl ThrowawayUser {
    /// `None` (a skip) when this process may not create users, unless real-daemon tests are
    /// required (`VIRTPLAN_REQUIRE_QEMU`, `CI`), where that is a failure.
    fn create(dir: &Path) -> Option<Self> {
        let root = uid_of_self().as_deref() == Some("0");
        if !root {
            let required = ["VIRTPLAN_REQUIRE_QEMU", "CI"]
                .iter()
                .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
            assert!(
                !required,
                "the hung-daemon test needs root to create a throw-away user"
            );
            eprintln!("skipping: not root, cannot create a throw-away user");
            return None;
        }
        let name = format!("vp-hang-{}", std::process::id());
        let home = dir.join("home");
        let status = Command::new("useradd")
            .args([
                "--system",
                "--create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--home-dir",
            ])
            .arg(&home)
            .arg(&name)
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name}");
        // The test's temporary folder must be passable for the user.
        let _ = Command::new("chmod").arg("755").arg(dir).status();
        Some(Self { name, home })
    }

    /// A command run as this user, in its home, with a plain environment plus `env`.
    fn command(&self, program: &str, env: &[&str]) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", &self.name, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg("NO_COLOR=1")
            .args(env)
            .arg(program)
            .current_dir(&self.home);
        c
    }

    fn virsh(&self, args: &[&str]) -> String {
        let out = self
            .command("virsh", &[])
            .args(["-c", "qemu:///session"])
            .args(args)
            .output()
            .expect("run virsh");
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pid of this user's session libvirtd, read from /proc (its processes are all ours).
    fn daemon_pid(&self) -> Option<i32> {
        let uid = uid_of(&self.name)?;
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let owned = status
                .lines()
                .find(|l| l.starts_with("Uid:"))?
                .split_whitespace()
                .nth(1)?
                == uid;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (owned && comm.trim() == "libvirtd").then_some(pid)
        })
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            signal(pid, "CONT");
            let _ = self
                .command("virsh", &[])
                .args(["-c", "qemu:///session", "undefine", "vp-hang"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            signal(pid, "TERM");
        }
        let _ = Command::new("userdel")
            .args(["--remove", "--force", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn uid_of(name: &str) -> Option<String> {
    let out = Command::new("id").args(["-u", name]).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn uid_of_self() -> Option<String> {
    let out = Command::new("id").arg("-u").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Sends `sig` to `pid`, the throw-away user's daemon (by pid, never by name).
fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn regression_hung_libvirtd_lands_changes_late() {
    let dir = tempfile::tempdir().unwrap();
    let Some(user) = ThrowawayUser::create(dir.path()) else {
        return;
    };
    let xml = user.home.join("vp-hang.xml");
    std::fs::write(
        &xml,
        "<domain type='qemu'><name>vp-hang</name><memory unit='KiB'>65536</memory>\
         <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
    )
    .unwrap();
    let _ = Command::new("chmod").arg("644").arg(&xml).status();
    user.virsh(&["define", xml.to_str().unwrap()]);
    let daemon = user.daemon_pid().expect("the user's session libvirtd runs");

    let at = SystemClock.now() + chrono::Duration::seconds(10);
    let plan = user.home.join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "version: 1\nconnection: qemu:///session\ngrace: 2s\nsteps:\n  - at: {}\n    vm: vp-hang\n    title: applied-late\n",
            rfc3339(at)
        ),
    )
    .unwrap();
    let _ = Command::new("chown")
        .arg(&user.name)
        .arg(&plan)
        .arg(&user.home)
        .status();
    // The user may not reach the build folder: run a copy from its home.
    let bin = user.home.join("virtplan");
    std::fs::copy(BIN, &bin).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&bin).status();
    // Dead after about 3 s without an answer, so the test takes seconds, not minutes.
    let mut apply = user
        .command(bin.to_str().unwrap(), &["VIRTPLAN_KEEPALIVE=1,2"])
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start apply");
    let wait_until = |t: DateTime<Utc>| {
        while SystemClock.now() < t {
            SystemClock.sleep(Duration::from_millis(100));
        }
    };
    // Planned and waiting for the step: freeze the daemon just before it is due.
    wait_until(at - chrono::Duration::seconds(3));
    signal(daemon, "STOP");
    // Thaw it well after the step's deadline (at + grace).
    wait_until(at + chrono::Duration::seconds(10));
    signal(daemon, "CONT");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = apply.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "apply is still blocked 90 s after the daemon was thawed"
        );
        SystemClock.sleep(Duration::from_millis(200));
    };
    let out = apply.wait_with_output().unwrap();
    let text = format!(
        "{status:?}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status.code(), Some(3), "missed or failed: {text}");
    let lock = virtplan::lockfile::LockStore::read(&user.home.join("plan.lock")).unwrap();
    let status = lock.steps[0].status;
    assert!(
        matches!(
            status,
            virtplan::lockfile::StepStatus::Missed | virtplan::lockfile::StepStatus::Failed
        ),
        "{status:?}: {}\n{text}",
        lock.steps[0].message
    );
    // And the change did not land after the daemon came back.
    SystemClock.sleep(Duration::from_secs(1));
    let title = user.virsh(&["desc", "--title", "vp-hang"]);
    assert!(
        !title.contains("applied-late"),
        "applied late: {title}\n{text}"
    );
}

// ---- honest resume (item 3), on real QEMU domains ----

/// Runs `apply PLAN --auto-approve` and SIGKILLs it once the lockfile records step 1
/// `running` and `after` more has passed (the libvirt call is then in flight).
fn kill_while_running(plan: &Path, after: Duration) {
    use virtplan::lockfile::{LockStore, StepStatus};
    let lock = plan.with_extension("lock");
    let mut child = Command::new(BIN)
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start apply");
    let started = Instant::now();
    loop {
        let running = LockStore::read(&lock)
            .is_ok_and(|l| l.steps.iter().any(|r| r.status == StepStatus::Running));
        if running {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "apply ended before its step was recorded running"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no running step"
        );
        SystemClock.sleep(Duration::from_millis(2));
    }
    SystemClock.sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

fn apply_to_the_end(plan: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["apply", plan.to_str().unwrap(), "--auto-approve"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run apply");
    (
        out.status.code(),
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn regression_false_done_after_kill_during_paused_step_from_shutoff() {
    use virtplan::hypervisor::libvirt::Libvirt;
    use virtplan::hypervisor::Hypervisor as _;
    use virtplan::state::PowerState;
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "resume-paused");
    let hv = Libvirt::connect(&uri).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "version: 1\nconnection: {uri}\ngrace: 5m\nsteps:\n  - vm: {}\n    power: paused\n",
            dom.name
        ),
    )
    .unwrap();
    // Killed while libvirt starts QEMU (CPUs held until start-up completes), at a few offsets.
    for after in [20, 60, 120, 250, 400] {
        if hv.observe(&dom.uuid, false).unwrap().power.is_active() {
            hv.destroy(&dom.uuid).unwrap();
        }
        let _ = std::fs::remove_file(dir.path().join("plan.lock"));
        kill_while_running(&plan, Duration::from_millis(after));
        let (code, text) = apply_to_the_end(&plan);
        assert_eq!(code, Some(0), "resume after a kill {after} ms in: {text}");
        // Whatever libvirt was doing when the first run died has finished by now.
        SystemClock.sleep(Duration::from_millis(500));
        let power = hv.observe(&dom.uuid, false).unwrap().power;
        assert_eq!(
            power,
            PowerState::Paused,
            "recorded done, but the domain is {power} (kill {after} ms in): {text}"
        );
    }
}

#[test]
fn regression_kill_during_forced_power_off_fails_the_resumed_plan() {
    use virtplan::hypervisor::libvirt::Libvirt;
    use virtplan::hypervisor::Hypervisor as _;
    use virtplan::state::PowerState;
    let Some(uri) = qemu_uri() else { return };
    let dom = TestDomain::define(&uri, "resume-force-off");
    let hv = Libvirt::connect(&uri).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "version: 1\nconnection: {uri}\ngrace: 5m\nsteps:\n  - vm: {}\n    power: shutoff\n    shutdown: {{mode: force}}\n",
            dom.name
        ),
    )
    .unwrap();
    for after in [0, 10, 20, 30, 60] {
        if !hv.observe(&dom.uuid, false).unwrap().power.is_active() {
            dom.start();
        }
        let _ = std::fs::remove_file(dir.path().join("plan.lock"));
        kill_while_running(&plan, Duration::from_millis(after));
        let (code, text) = apply_to_the_end(&plan);
        assert_eq!(code, Some(0), "resume after a kill {after} ms in: {text}");
        assert!(!text.contains("cannot plan a power change"), "{text}");
        let power = hv.observe(&dom.uuid, false).unwrap().power;
        assert_eq!(power, PowerState::Shutoff, "{text}");
    }
}
