//! A second real libvirt daemon for many-hosts tests: a throw-away unprivileged user's own
//! libvirtd (`qemu:///session`), started by the test in a temporary folder of its own and
//! reached over its socket. A test may kill it (a host lost mid-window) without ever
//! disturbing the system daemon (`qemu:///system`) the other tests use.
//!
//! The user (`virtplan-session`) is created by `scripts/setup-libvirt.sh`. Each daemon lives
//! in its own folder (`XDG_RUNTIME_DIR`, `XDG_CONFIG_HOME`, ...), so tests running at once
//! each get their own, and its domains vanish with the folder.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use virtplan::clock::{Clock, SystemClock};

/// The throw-away user whose session daemons the tests start.
pub const SESSION_USER: &str = "virtplan-session";

/// A running per-user libvirtd, killed (with the QEMU processes it started) when dropped.
pub struct SessionDaemon {
    /// `qemu+unix:///session?socket=…`: how root reaches this user's daemon.
    pub uri: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    uid: u32,
    gid: u32,
}

fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id")
        .args([flag, SESSION_USER])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl SessionDaemon {
    /// Starts a fresh daemon, `None` (a noted skip) when this machine cannot run one; panics
    /// instead under `VIRTPLAN_REQUIRE_QEMU` or `CI`.
    pub fn start() -> Option<Self> {
        let required = ["VIRTPLAN_REQUIRE_QEMU", "CI"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        let why = match (id_of("-u"), id_of("-g")) {
            (Some(uid), Some(gid)) => match Self::spawn(uid, gid) {
                Ok(daemon) => return Some(daemon),
                Err(e) => e,
            },
            _ => format!(
                "no user {SESSION_USER}: run `sudo scripts/setup-libvirt.sh` (it creates it)"
            ),
        };
        assert!(!required, "cannot start a qemu:///session daemon: {why}");
        eprintln!("skipping: cannot start a qemu:///session daemon: {why}");
        None
    }

    fn spawn(uid: u32, gid: u32) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("virtplan-session-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut daemon = Self {
            uri: format!(
                "qemu+unix:///session?socket={}",
                dir.path().join("run/libvirt/libvirt-sock").display()
            ),
            child: None,
            dir,
            uid,
            gid,
        };
        for sub in ["run", "config", "cache", "data"] {
            let path = daemon.dir.path().join(sub);
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            chown(&path, uid, gid)?;
        }
        chown(daemon.dir.path(), uid, gid)?;
        daemon.launch()?;
        Ok(daemon)
    }

    /// Starts the daemon (again, after [`SessionDaemon::kill`]: it finds its domains again)
    /// and waits, bounded, until it answers.
    pub fn launch(&mut self) -> Result<(), String> {
        let root = self.dir.path();
        let log = std::fs::File::create(root.join("libvirtd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("libvirtd")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", root)
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_CACHE_HOME", root.join("cache"))
            .env("XDG_DATA_HOME", root.join("data"))
            .current_dir(root)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run libvirtd as {SESSION_USER}: {e}"))?;
        self.child = Some(child);
        for _ in 0..200 {
            if virt::connect::Connect::open(Some(&self.uri)).is_ok() {
                return Ok(());
            }
            SystemClock.sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(root.join("libvirtd.log")).unwrap_or_default();
        Err(format!(
            "it did not answer on {} within 10 s: {log}",
            self.uri
        ))
    }

    /// Kills the daemon at once (SIGKILL): its clients see the connection drop. The QEMU
    /// processes it started keep running, as they would on a real host.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The pids of the QEMU processes this daemon started (from its own pid files).
    fn qemu_pids(&self) -> Vec<i32> {
        let run = self.dir.path().join("run/libvirt/qemu/run");
        let Ok(entries) = std::fs::read_dir(run) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| t.trim().parse().ok())
            .collect()
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

impl Drop for SessionDaemon {
    fn drop(&mut self) {
        self.kill();
        // Only the QEMU processes this daemon started (their pid files are in its folder).
        for pid in self.qemu_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
