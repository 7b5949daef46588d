//! A real test guest for end-to-end tests: Debian's cloud kernel and a busybox initramfs built
//! by `scripts/build-guest.sh`, booted by direct kernel boot in ~2-4 s under QEMU. It answers the
//! ACPI power button, runs qemu-guest-agent (when the domain has the agent channel), lets the
//! virtio balloon take memory and onlines hot-added vCPUs.
//!
//! ```ignore
//! let Some(uri) = qemu_uri() else { return };
//! let guest = Guest::boot(&uri, "my-test", &GuestSpec::default()); // running, agent answering
//! let vcpus = guest.agent("guest-get-vcpus").unwrap();            // serde_json::Value
//! // ... run virtplan against guest.name() ...
//! // dropped: destroyed, undefined with its snapshots, its disk and console log removed
//! ```
//!
//! Every guest is a domain of its own (a unique name, never a domain the test did not create),
//! so tests may run in parallel; boot one guest per test and exercise several features on it
//! rather than one guest per assertion (each boot costs a few seconds of TCG).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use virt::connect::Connect;
use virt::domain::Domain;
use virtplan::clock::{Clock, SystemClock};

use crate::support::qemu::TestDomain;

/// How long a boot may take before a test gives up: TCG on two loaded cores is slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The line the guest's init prints on the serial console once its drivers and acpid are up.
const UP_MARKER: &str = "virtplan-guest: up";

/// The built guest: kernel, initramfs and the domain type this host boots it with.
#[derive(Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `kvm` or `qemu` (TCG), as `scripts/build-guest.sh` found by booting the guest under KVM.
    pub domain_type: String,
}

/// The guest image, built or found up to date by `scripts/build-guest.sh` once per test process
/// (a cached run costs one `apt-cache policy` call; concurrent processes share one build).
///
/// # Panics
///
/// When the script fails and no earlier build is there to use.
pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-guest.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        let dir = if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        } else {
            // E.g. a user who may not write /var/cache, after root built it once.
            let cache = std::env::var_os("VIRTPLAN_GUEST_DIR")
                .map_or_else(|| PathBuf::from("/var/cache/virtplan-guest"), PathBuf::from);
            let Some(newest) = newest_build(&cache) else {
                panic!(
                    "scripts/build-guest.sh failed ({}) and there is no earlier build in {}:\n{}\n\
                     run `sudo scripts/build-guest.sh`",
                    out.status,
                    cache.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            eprintln!(
                "scripts/build-guest.sh failed; using the earlier build in {}:\n{}",
                newest.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            newest
        };
        let domain_type = std::fs::read_to_string(dir.join("domain-type"))
            .unwrap_or_else(|e| panic!("{}/domain-type: {e}", dir.display()))
            .trim()
            .to_owned();
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            domain_type,
        }
    })
}

/// The most recently used complete build in the cache (`domain-type` is a build's last file).
fn newest_build(cache: &Path) -> Option<PathBuf> {
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("domain-type").is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Hard-links (or, across file systems, copies) `from` to `to`: the guest's own copy of the
/// kernel and initramfs, which no rebuild or clean-up of the cache can pull from under it.
fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

/// The guest's disk, created per domain with `qemu-img`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// No disk: libvirt cannot snapshot the domain.
    None,
    /// A 16 MiB qcow2 image: internal snapshots, live and shut off.
    Qcow2,
    /// A 16 MiB raw image: no internal snapshots.
    Raw,
}

/// What the guest looks like. The default: agent channel, power button answered, a qcow2 disk, 256 MiB of a
/// 384 MiB maximum, 1 of 2 vCPUs.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The `org.qemu.guest_agent.0` channel (qemu-ga runs in the guest either way; without the
    /// channel it has no port to talk on).
    pub agent: bool,
    /// The guest powers off when the ACPI power button is pressed (busybox acpid); without,
    /// it ignores the button and only its agent can shut it down.
    pub power_button: bool,
    pub disk: Disk,
    /// The agent answers, but its `guest-shutdown` fails (the guest's `/sbin/shutdown` exits 1):
    /// a shutdown ladder must fall back to ACPI.
    pub agent_shutdown_fails: bool,
    /// Seconds the guest's clock is off at every boot (init sets it so): 0 for none.
    pub clock_skew_secs: i64,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub vcpus: u32,
    pub max_vcpus: u32,
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            agent: true,
            power_button: true,
            disk: Disk::Qcow2,
            agent_shutdown_fails: false,
            clock_skew_secs: 0,
            memory_kib: 256 * 1024,
            max_memory_kib: 384 * 1024,
            vcpus: 1,
            max_vcpus: 2,
        }
    }
}

/// A test guest: a domain of its own, destroyed and undefined (with its snapshots' metadata)
/// when dropped, and a temporary folder holding its disk and serial console log.
pub struct Guest {
    domain: TestDomain,
    uri: String,
    spec: GuestSpec,
    dir: TempDir,
}

impl Guest {
    /// Defines the guest, shut off. Its name is `vpt-<test>-<pid>-<counter>`.
    ///
    /// # Panics
    ///
    /// When the image cannot be built, `qemu-img` fails or libvirt refuses the definition.
    pub fn define(uri: &str, test: &str, spec: &GuestSpec) -> Self {
        let image = image();
        let dir = tempfile::Builder::new()
            .prefix("virtplan-guest-")
            .tempdir()
            .expect("guest folder");
        let disk = match spec.disk {
            Disk::None => String::new(),
            Disk::Qcow2 | Disk::Raw => {
                let format = if spec.disk == Disk::Qcow2 {
                    "qcow2"
                } else {
                    "raw"
                };
                let path = dir.path().join(format!("disk.{format}"));
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", format])
                    .arg(&path)
                    .arg("16M")
                    .output()
                    .expect("run qemu-img (package qemu-utils; scripts/setup-libvirt.sh)");
                assert!(
                    out.status.success(),
                    "qemu-img create: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                format!(
                    "<disk type='file' device='disk'>
      <driver name='qemu' type='{format}'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>",
                    path.display()
                )
            }
        };
        let agent = if spec.agent {
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        } else {
            ""
        };
        let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
        link_or_copy(&image.kernel, &kernel);
        link_or_copy(&image.initrd, &initrd);
        let console = dir.path().join("console.log");
        let mut cmdline = String::from("console=ttyS0 panic=-1");
        if spec.agent_shutdown_fails {
            cmdline.push_str(" virtplan.agent_shutdown=fail");
        }
        if spec.clock_skew_secs != 0 {
            let _ = write!(cmdline, " virtplan.clock_skew={}", spec.clock_skew_secs);
        }
        if !spec.power_button {
            cmdline.push_str(" virtplan.power_button=ignore");
        }
        let domain = TestDomain::define_with(uri, test, |name| {
            format!(
                "<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='KiB'>{max_mem}</memory>
  <currentMemory unit='KiB'>{mem}</currentMemory>
  <vcpu placement='static' current='{vcpus}'>{max_vcpus}</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'>
    <timer name='rtc' track='guest'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disk}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    {agent}
    <memballoon model='virtio'><stats period='1'/></memballoon>
  </devices>
</domain>
",
                kind = image.domain_type,
                max_mem = spec.max_memory_kib,
                mem = spec.memory_kib,
                vcpus = spec.vcpus,
                max_vcpus = spec.max_vcpus,
                kernel = kernel.display(),
                initrd = initrd.display(),
                console = console.display(),
            )
        });
        Self {
            domain,
            uri: uri.to_owned(),
            spec: spec.clone(),
            dir,
        }
    }

    /// Defines the guest, starts it and waits until it is ready (see [`Guest::wait_ready`]).
    ///
    /// # Panics
    ///
    /// As [`Guest::define`], and when the guest is not ready within [`BOOT_TIMEOUT`].
    pub fn boot(uri: &str, test: &str, spec: &GuestSpec) -> Self {
        let guest = Self::define(uri, test, spec);
        guest.start();
        guest.wait_ready();
        guest
    }

    /// The domain's name, for a plan's `vm:`.
    pub fn name(&self) -> &str {
        &self.domain.name
    }

    pub fn uuid(&self) -> &str {
        &self.domain.uuid
    }

    /// The libvirt domain, on a fresh connection.
    ///
    /// # Panics
    ///
    /// When libvirt cannot find it.
    pub fn domain(&self) -> Domain {
        Connect::open(Some(&self.uri))
            .and_then(|c| c.lookup_domain_by_uuid_string(&self.domain.uuid))
            .unwrap_or_else(|e| panic!("look up {}: {e}", self.name()))
    }

    /// Starts the guest (it must be shut off); does not wait for the boot.
    pub fn start(&self) {
        self.domain.start();
    }

    /// Waits until the guest is up: the agent answers `guest-ping` when the domain has the agent
    /// channel, else init printed its "up" line (drivers loaded, acpid listening); and its
    /// balloon has settled at the spec's memory (QEMU starts the guest with the maximum and the
    /// driver inflates down to it). Returns how long it waited.
    ///
    /// # Panics
    ///
    /// After [`BOOT_TIMEOUT`], with the tail of the serial console.
    pub fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        self.wait_for("the guest ready", BOOT_TIMEOUT, || {
            let ready = if self.spec.agent {
                self.agent("guest-ping").is_ok()
            } else {
                self.console().contains(UP_MARKER)
            };
            (ready && self.memstat().get("actual") == Some(&self.spec.memory_kib))
                .then(|| started.elapsed())
        })
    }

    /// Runs one guest agent command without arguments (`guest-ping`, `guest-get-vcpus`,
    /// `guest-get-time`, ...) through `virsh qemu-agent-command`; returns its `return` value.
    ///
    /// # Errors
    ///
    /// virsh's message when the agent does not answer (not connected, no channel, timeout).
    pub fn agent(&self, command: &str) -> Result<serde_json::Value, String> {
        let out = Command::new("virsh")
            .args([
                "-q",
                "-c",
                &self.uri,
                "qemu-agent-command",
                &self.domain.uuid,
            ])
            .arg(format!(r#"{{"execute":"{command}"}}"#))
            .args(["--timeout", "5"])
            .output()
            .map_err(|e| format!("run virsh: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("agent reply to {command} is not JSON: {e}"))?;
        Ok(reply["return"].clone())
    }

    /// The balloon's figures in KiB, as `virsh dommemstat` shows them: `actual` (what the balloon
    /// left the guest, set once the guest's driver took a change) and, from the guest's own
    /// statistics (refreshed every second), `available` (the guest's MemTotal) and `usable`.
    pub fn memstat(&self) -> std::collections::BTreeMap<String, u64> {
        self.virsh(&["dommemstat", self.uuid()])
            .lines()
            .filter_map(|l| {
                let (key, value) = l.split_once(' ')?;
                Some((key.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Polls `probe` every 200 ms until it returns `Some`, for at most `timeout`.
    ///
    /// # Panics
    ///
    /// After `timeout`, naming `what` and showing the console tail.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = probe() {
                return value;
            }
            assert!(
                started.elapsed() < timeout,
                "{}: {what} not seen within {timeout:?}; console:\n{}",
                self.name(),
                self.console_tail()
            );
            SystemClock.sleep(Duration::from_millis(200));
        }
    }

    /// The guest's own time, through its agent (`guest-get-time`).
    ///
    /// # Errors
    ///
    /// When the agent does not answer.
    pub fn guest_time(&self) -> Result<chrono::DateTime<chrono::Utc>, String> {
        let nanos = self.agent("guest-get-time")?;
        let nanos = nanos
            .as_i64()
            .ok_or_else(|| format!("guest-get-time returned {nanos}"))?;
        Ok(chrono::DateTime::from_timestamp_nanos(nanos))
    }

    /// Runs `virsh -c URI ARGS...` and returns its stdout.
    ///
    /// # Panics
    ///
    /// When virsh fails.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
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

    /// Names of the domain's snapshots, as `virsh snapshot-list --name` shows them.
    pub fn snapshots(&self) -> Vec<String> {
        self.virsh(&["snapshot-list", "--name", self.uuid()])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether the domain is running.
    pub fn is_active(&self) -> bool {
        self.domain().is_active().unwrap_or(false)
    }

    /// Everything the guest wrote to its serial console since it was defined.
    pub fn console(&self) -> String {
        std::fs::read(self.dir.path().join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last 40 lines of the console, for failure messages.
    pub fn console_tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
