//! Whether libvirt's QEMU driver can take an internal snapshot of a domain, judged from the
//! domain's disks before anything runs, so `plan` refuses what `apply` would fail on at 4 a.m.
//!
//! The rules are libvirt's (9.x), as observed on a real QEMU host (tests/integration/guest.rs):
//! an internal snapshot lives inside qcow2 images, so every writable disk must be qcow2 (a disk
//! without `<driver type>` is raw); empty drives and read-only disks (an ISO in a CD-ROM) are
//! left out; a domain with nothing left has nothing to snapshot ("nothing selected for
//! snapshot"); a running domain's snapshot must include every writable disk. For a shut-off
//! domain libvirt runs `qemu-img` on the images, found once when the daemon starts.

use super::domain_xml::DiskDef;

/// Whether a snapshot can be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// libvirt can take it.
    Possible,
    /// Possible as far as virtplan can tell; the note says what it could not check.
    Unverified(String),
    /// libvirt would refuse it: why, and how to fix it.
    Impossible { reason: String, help: String },
}

/// Verdicts for a snapshot of the domain while running and while shut off (a plan may power
/// it off before the snapshot step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSupport {
    pub running: Verdict,
    pub shut_off: Verdict,
}

impl Default for SnapshotSupport {
    /// Both possible: drivers without these limits (the test driver).
    fn default() -> Self {
        Self {
            running: Verdict::Possible,
            shut_off: Verdict::Possible,
        }
    }
}

impl SnapshotSupport {
    /// The verdict for the domain's state at the snapshot step.
    #[must_use]
    pub fn at(&self, running: bool) -> &Verdict {
        if running {
            &self.running
        } else {
            &self.shut_off
        }
    }
}

/// Whether `qemu-img` is on the libvirt host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuImg {
    Found,
    Missing,
    /// A remote host (named, without credentials): virtplan cannot look.
    Unknown(String),
}

/// The QEMU driver's verdicts for a domain with `disks` (its live definition's disks for the
/// running verdict, its persistent definition's for the shut-off one: pass each its own).
#[must_use]
pub fn qemu_verdict(disks: &[DiskDef], running: bool, qemu_img: &QemuImg) -> Verdict {
    let writable: Vec<&DiskDef> = disks.iter().filter(|d| !d.empty && !d.readonly).collect();
    if running {
        if let Some(d) = writable
            .iter()
            .find(|d| d.snapshot.as_deref() == Some("no"))
        {
            return Verdict::Impossible {
                reason: format!(
                    "disk {} is excluded from snapshots (snapshot='no'), and a snapshot of a running domain must include every disk",
                    d.target
                ),
                help: "take the snapshot while the domain is shut off, or remove snapshot='no' from the disk".to_owned(),
            };
        }
    }
    let selected: Vec<&DiskDef> = writable
        .into_iter()
        .filter(|d| d.snapshot.as_deref() != Some("no"))
        .collect();
    if selected.is_empty() {
        let reason = if disks.is_empty() {
            "the domain has no disk, and an internal snapshot is stored in a qcow2 disk image"
        } else {
            "the domain has no writable disk to snapshot (only empty or read-only drives, or disks with snapshot='no')"
        };
        return Verdict::Impossible {
            reason: reason.to_owned(),
            help: "give the domain a qcow2 disk, or drop the snapshot step".to_owned(),
        };
    }
    for d in &selected {
        if d.snapshot.as_deref() == Some("external") {
            return Verdict::Impossible {
                reason: format!(
                    "disk {} is set to external snapshots (snapshot='external'), and virtplan takes internal ones",
                    d.target
                ),
                help: "remove snapshot='external' from the disk, or take this snapshot outside virtplan".to_owned(),
            };
        }
        let format = d.format.as_deref().unwrap_or("raw");
        if format != "qcow2" {
            let shown = if d.format.is_some() {
                format!("is {format}")
            } else {
                "has no <driver type> (libvirt takes it as raw)".to_owned()
            };
            return Verdict::Impossible {
                reason: format!(
                    "disk {} {shown}: an internal snapshot needs every writable disk in qcow2 format",
                    d.target
                ),
                help: format!(
                    "convert the image (`qemu-img convert -O qcow2`) and set <driver type='qcow2'/> on disk {}, or drop the snapshot step",
                    d.target
                ),
            };
        }
    }
    if !running {
        if let Some(d) = selected
            .iter()
            .find(|d| !matches!(d.source_type.as_str(), "file" | "block" | "volume"))
        {
            return Verdict::Impossible {
                reason: format!(
                    "disk {} is a {} disk, and libvirt snapshots a shut-off domain with qemu-img on local images only",
                    d.target, d.source_type
                ),
                help: "take the snapshot while the domain runs".to_owned(),
            };
        }
        match qemu_img {
            QemuImg::Found => {}
            QemuImg::Missing => {
                return Verdict::Impossible {
                    reason: "libvirt runs qemu-img to snapshot a shut-off domain, and qemu-img is not installed on this host".to_owned(),
                    help: "install qemu-img (Debian/Ubuntu: qemu-utils) and restart libvirtd, which looks for it once, at start; or take the snapshot while the domain runs".to_owned(),
                };
            }
            QemuImg::Unknown(host) => {
                return Verdict::Unverified(format!(
                    "libvirt on {host} needs qemu-img for a snapshot of a shut-off domain; virtplan cannot check a remote host"
                ));
            }
        }
    } else if let Some(d) = selected.iter().find(|d| d.source_type == "network") {
        return Verdict::Unverified(format!(
            "disk {} is a network disk: whether its storage takes internal snapshots is not checked ahead",
            d.target
        ));
    }
    Verdict::Possible
}

/// The host of a libvirt URI without user or password (`qemu+ssh://root@hv1/system` → `hv1`),
/// `None` for a local URI (`qemu:///system`).
#[must_use]
pub fn remote_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then_some(host)
}

/// Whether an executable `qemu-img` is in one of the `PATH` folders. libvirtd searches its own
/// PATH; on a local host the two agree (the standard system folders).
#[must_use]
pub fn local_qemu_img(path: Option<&std::ffi::OsStr>) -> QemuImg {
    use std::os::unix::fs::PermissionsExt as _;
    let found = path
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .map(|dir| dir.join("qemu-img"))
        .any(|p| {
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    if found {
        QemuImg::Found
    } else {
        QemuImg::Missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::disks;

    fn domain(devices: &str) -> Vec<DiskDef> {
        disks(&format!(
            "<domain type='kvm'><name>d</name><devices>{devices}</devices></domain>"
        ))
        .unwrap()
    }

    const QCOW2: &str = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/var/lib/libvirt/images/d.qcow2'/><target dev='vda' bus='virtio'/></disk>";
    const RAW: &str = "<disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='/var/lib/libvirt/images/d.img'/><target dev='vdb' bus='virtio'/></disk>";
    const NO_FORMAT: &str = "<disk type='file' device='disk'>
        <source file='/var/lib/libvirt/images/d.img'/><target dev='vdc' bus='virtio'/></disk>";
    const EMPTY_CDROM: &str = "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
        <target dev='hdc' bus='ide'/><readonly/></disk>";
    const ISO: &str = "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
        <source file='/srv/debian.iso'/><target dev='hdd' bus='ide'/><readonly/></disk>";

    fn reason(v: &Verdict) -> &str {
        match v {
            Verdict::Impossible { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn reads_disks_targets_formats_and_flags() {
        let d = domain(&format!("{QCOW2}{NO_FORMAT}{ISO}{EMPTY_CDROM}"));
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].format.as_deref(), Some("qcow2"));
        assert!(!d[0].readonly && !d[0].empty);
        assert_eq!(d[1].format, None);
        assert_eq!(d[2].device, "cdrom");
        assert!(d[2].readonly && !d[2].empty);
        assert!(d[3].empty);
    }

    #[test]
    fn qcow2_disks_snapshot_running_and_shut_off_read_only_drives_aside() {
        let d = domain(&format!("{QCOW2}{ISO}{EMPTY_CDROM}"));
        assert_eq!(qemu_verdict(&d, true, &QemuImg::Found), Verdict::Possible);
        assert_eq!(qemu_verdict(&d, false, &QemuImg::Found), Verdict::Possible);
        // A running domain's snapshot is QEMU's savevm: no qemu-img needed.
        assert_eq!(qemu_verdict(&d, true, &QemuImg::Missing), Verdict::Possible);
    }

    #[test]
    fn no_disk_is_refused_either_way() {
        for running in [true, false] {
            let v = qemu_verdict(&domain(""), running, &QemuImg::Found);
            assert!(reason(&v).contains("has no disk"), "{v:?}");
            let v = qemu_verdict(&domain(EMPTY_CDROM), running, &QemuImg::Found);
            assert!(reason(&v).contains("no writable disk"), "{v:?}");
        }
    }

    #[test]
    fn a_raw_disk_is_refused_even_beside_a_qcow2_one() {
        for running in [true, false] {
            let v = qemu_verdict(&domain(&format!("{QCOW2}{RAW}")), running, &QemuImg::Found);
            assert!(reason(&v).contains("disk vdb is raw"), "{v:?}");
            let v = qemu_verdict(&domain(NO_FORMAT), running, &QemuImg::Found);
            assert!(
                reason(&v).contains("disk vdc has no <driver type>"),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_shut_off_snapshot_needs_qemu_img() {
        let d = domain(QCOW2);
        let v = qemu_verdict(&d, false, &QemuImg::Missing);
        assert!(reason(&v).contains("qemu-img is not installed"), "{v:?}");
        let v = qemu_verdict(&d, false, &QemuImg::Unknown("hv1".into()));
        assert!(
            matches!(&v, Verdict::Unverified(n) if n.contains("libvirt on hv1")),
            "{v:?}"
        );
    }

    #[test]
    fn snapshot_no_disks_are_left_out_when_shut_off_and_refused_when_running() {
        let excluded = RAW.replace("device='disk'", "device='disk' snapshot='no'");
        let d = domain(&format!("{QCOW2}{excluded}"));
        assert_eq!(qemu_verdict(&d, false, &QemuImg::Found), Verdict::Possible);
        let v = qemu_verdict(&d, true, &QemuImg::Found);
        assert!(reason(&v).contains("snapshot='no'"), "{v:?}");
    }

    #[test]
    fn remote_hosts_are_named_without_credentials() {
        assert_eq!(remote_host("qemu:///system"), None);
        assert_eq!(remote_host("test:///default"), None);
        assert_eq!(
            remote_host("qemu+ssh://root:s3cret@hv1/system"),
            Some("hv1")
        );
        assert_eq!(
            remote_host("qemu+tcp://hv2:16509/system?x=1"),
            Some("hv2:16509")
        );
    }

    #[test]
    fn qemu_img_is_looked_up_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(local_qemu_img(Some(&path)), QemuImg::Missing);
        let exe = dir.path().join("qemu-img");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        assert_eq!(
            local_qemu_img(Some(&path)),
            QemuImg::Missing,
            "not executable"
        );
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(local_qemu_img(Some(&path)), QemuImg::Found);
        assert_eq!(local_qemu_img(None), QemuImg::Missing);
    }
}
