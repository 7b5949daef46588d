//! A rig for end-to-end tests against a real libvirtd with QEMU: finding it, and small diskless
//! domains that clean up after themselves.
//!
//! Set `VIRTPLAN_REQUIRE_QEMU=1` (scripts/test.sh does) or `CI` to turn "no libvirtd" into a
//! failure instead of a skip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use virt::connect::Connect;
use virt::sys;

/// The libvirt URI of the system QEMU driver.
pub const QEMU_URI: &str = "qemu:///system";

/// `Some(QEMU_URI)` when libvirtd answers on it. When it does not: panics if the environment
/// demands real QEMU tests (`VIRTPLAN_REQUIRE_QEMU` or `CI`), else notes the skip and returns
/// `None`.
pub fn qemu_uri() -> Option<String> {
    static REACHABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let reachable = REACHABLE.get_or_init(|| {
        virtplan::hypervisor::libvirt::silence_stderr_printer();
        Connect::open(Some(QEMU_URI))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    match reachable {
        Ok(()) => Some(QEMU_URI.to_owned()),
        Err(e) => {
            let required = ["VIRTPLAN_REQUIRE_QEMU", "CI"]
                .iter()
                .find(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
            if let Some(var) = required {
                panic!(
                    "{var} is set but libvirtd is not reachable at {QEMU_URI}: {e}\n\
                     run `sudo scripts/setup-libvirt.sh` first (or use scripts/test.sh)"
                );
            }
            eprintln!("skipping: no libvirtd at {QEMU_URI} ({e})");
            None
        }
    }
}

/// A small diskless domain defined for one test, destroyed and undefined when dropped.
///
/// 128 MiB of 256 MiB, 1 of 2 vCPUs, `<clock offset='utc'>` with `<timer name='rtc'
/// track='guest'/>`, no disk and nothing to boot: the guest sits in the firmware and ignores
/// ACPI shutdown requests. Type `kvm` when `/dev/kvm` is writable, else `qemu` (TCG).
///
/// The rtc track is `guest` because the QEMU driver rejects `track='boot'` ("unsupported rtc
/// timer track 'boot'"); only the test driver accepts it.
pub struct TestDomain {
    pub name: String,
    pub uuid: String,
    conn: Connect,
}

impl TestDomain {
    /// Defines (does not start) a domain named `vpt-<test>-<pid>-<counter>`.
    ///
    /// # Panics
    ///
    /// When libvirt refuses the definition, e.g. because the name is taken.
    pub fn define(uri: &str, test: &str) -> Self {
        Self::define_with_devices(uri, test, "")
    }

    /// Like [`TestDomain::define`], with `devices` (trusted XML from the test) added inside
    /// `<devices>`, such as a guest agent channel.
    ///
    /// # Panics
    ///
    /// When libvirt refuses the definition.
    pub fn define_with_devices(uri: &str, test: &str, devices: &str) -> Self {
        Self::define_with(uri, test, |name| {
            format!(
                "<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
  </os>
  <clock offset='utc'>
    <timer name='rtc' track='guest'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <memballoon model='virtio'/>
{devices}
  </devices>
</domain>
",
                kind = domain_type()
            )
        })
    }

    /// Defines (does not start) the domain `xml(name)` describes, under a fresh name
    /// `vpt-<test>-<pid>-<counter>` (only `[a-z0-9-]`, so it needs no XML escaping). The XML must
    /// carry no `<uuid>`: defining then never replaces an existing domain.
    ///
    /// # Panics
    ///
    /// When libvirt refuses the definition, e.g. because the name is taken.
    pub fn define_with(uri: &str, test: &str, xml: impl FnOnce(&str) -> String) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let slug: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        // The random tail keeps a name unique across runs too: libvirt keeps each domain's
        // QEMU log (`/var/log/libvirt/qemu/NAME.log`) after it is undefined, and a process id
        // reused by a later run appended to an earlier run's log (tests count its lines).
        let name = format!(
            "vpt-{slug}-{}-{n}-{:04x}",
            std::process::id(),
            fastrand::u16(..)
        );
        let conn = Connect::open(Some(uri)).expect("connect for TestDomain");
        let xml = xml(&name);
        let dom = conn
            .define_domain_xml(&xml)
            .unwrap_or_else(|e| panic!("define test domain {name}: {e}"));
        let uuid = dom.uuid_string().expect("uuid of the test domain");
        Self { name, uuid, conn }
    }

    /// Starts the domain.
    ///
    /// # Panics
    ///
    /// When libvirt cannot start it.
    pub fn start(&self) {
        self.conn
            .lookup_domain_by_uuid_string(&self.uuid)
            .and_then(|d| d.create())
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        // Looked up by the UUID this guard created: never touches anyone else's domain.
        let Ok(dom) = self.conn.lookup_domain_by_uuid_string(&self.uuid) else {
            return;
        };
        if dom.is_active().unwrap_or(false) {
            if let Err(e) = dom.destroy() {
                eprintln!("cleanup: destroy {}: {e}", self.name);
            }
        }
        let flags = sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        if let Err(e) = dom.undefine_flags(flags) {
            eprintln!("cleanup: undefine {}: {e}", self.name);
        }
    }
}

/// `kvm` when this process may open `/dev/kvm` for writing, else `qemu` (TCG emulation).
pub fn domain_type() -> &'static str {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}
