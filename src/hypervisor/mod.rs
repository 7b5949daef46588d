//! The hypervisor boundary: a trait the planner and executor use, its libvirt implementation
//! (the only code that touches the `virt` crate), domain-XML editing, and test-driver fleets.

pub mod domain_xml;
pub mod fake;
pub mod fleet;
// The bulk-stats FFI needs `unsafe`; it is confined to this module, each block with a SAFETY note.
#[allow(unsafe_code)]
pub mod libvirt;
pub mod snapshot;
pub mod unreachable;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::state::{DomainState, Kib, LifecycleAction, LifecycleEvent};

/// A domain as resolved from a plan's `vm:` entry: its real name and UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainId {
    pub name: String,
    pub uuid: String,
}

/// What a bulk read ([`Hypervisor::observe_wanted`]) must return for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub uuid: String,
    /// Fill in `clock` and return the persistent XML (clock steps diff and edit it).
    pub clock: bool,
    /// Read `title` and `description` (title and description steps).
    pub metadata: bool,
}

/// A plan's `vm:` value (a name or a UUID, as written) and what its steps need read of the
/// domain it names, for [`Hypervisor::resolve_and_observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedWant {
    pub name: String,
    /// As [`Want::clock`].
    pub clock: bool,
    /// As [`Want::metadata`].
    pub metadata: bool,
}

/// What [`Hypervisor::resolve_and_observe`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedRead {
    /// Per name, in the order given: the domain it names, `None` when it names none.
    pub ids: Vec<Option<DomainId>>,
    /// Each domain found, read once, as deeply as the wants of all its names together ask.
    pub observations: Vec<Observation>,
}

/// The [`Want`]s of the domains `ids` found for `names`: one per domain (in the order first
/// found), asking for everything any of its names asked for.
#[must_use]
pub fn merge_wants(names: &[NamedWant], ids: &[Option<DomainId>]) -> Vec<Want> {
    merged_depths(names, ids)
        .into_iter()
        .map(|(uuid, clock, metadata)| Want {
            uuid: uuid.to_owned(),
            clock,
            metadata,
        })
        .collect()
}

/// [`merge_wants`] with the UUIDs borrowed: each domain once, as (UUID, clock, metadata).
#[must_use]
pub fn merged_depths<'a>(
    names: &[NamedWant],
    ids: &'a [Option<DomainId>],
) -> Vec<(&'a str, bool, bool)> {
    let mut depths: Vec<(&str, bool, bool)> = Vec::with_capacity(names.len());
    let mut index: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(names.len());
    for (named, id) in names.iter().zip(ids) {
        let Some(id) = id else { continue };
        let i = *index.entry(id.uuid.as_str()).or_insert_with(|| {
            depths.push((id.uuid.as_str(), false, false));
            depths.len() - 1
        });
        depths[i].1 |= named.clock;
        depths[i].2 |= named.metadata;
    }
    depths
}

/// One domain from a bulk read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub state: DomainState,
    /// The persistent (inactive) XML, when the [`Want`] asked for the clock.
    pub definition: Option<String>,
}

/// How libvirt failed, classified by its error code so callers can decide to retry or fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such domain (`VIR_ERR_NO_DOMAIN`).
    NotFound,
    /// The operation is not valid in the domain's current state (`VIR_ERR_OPERATION_INVALID`).
    OperationInvalid,
    /// A bad argument (`VIR_ERR_INVALID_ARG`): retrying cannot help.
    InvalidArgument,
    /// The connection broke, an RPC failed or timed out: reconnect and retry.
    Transient,
    /// The hypervisor does not support this operation.
    Unsupported,
    /// Anything else.
    Other,
}

/// A libvirt failure with its classification and libvirt's own message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HvError {
    pub kind: ErrorKind,
    pub message: String,
}

impl HvError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

pub type HvResult<T> = Result<T, HvError>;

/// Which parts of a domain's definition a change touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The running domain (hotplug / balloon).
    pub live: bool,
    /// The persistent definition.
    pub config: bool,
}

impl Scope {
    pub const CONFIG: Self = Self {
        live: false,
        config: true,
    };
    pub const BOTH: Self = Self {
        live: true,
        config: true,
    };
}

/// One connection to one hypervisor. Every call is synchronous; implementations must be
/// usable from several threads (the executor runs domains concurrently).
pub trait Hypervisor: Send + Sync {
    /// The URI this connection was opened with.
    fn uri(&self) -> &crate::uri::Uri;

    /// `Some(why)` for a stand-in of a host that could not be opened
    /// ([`unreachable::Unreachable`]); a real connection is `None`.
    fn unreachable(&self) -> Option<&HvError> {
        None
    }

    /// Resolves a plan's `vm:` value, a domain name or a UUID string.
    fn resolve(&self, name_or_uuid: &str) -> HvResult<DomainId>;

    /// Why the domain is still between two states (QEMU starting with its CPUs held, a shutdown
    /// in progress, a libvirt job in flight), or `None` once it has settled. A resumed run
    /// judges "already at the target" only on a settled domain.
    fn unsettled(&self, _uuid: &str) -> HvResult<Option<String>> {
        Ok(None)
    }

    /// Reads one domain's state; `with_clock` also reads and parses the persistent XML.
    fn observe(&self, uuid: &str, with_clock: bool) -> HvResult<DomainState>;

    /// Resolves several `vm:` values at once, in order; `None` for those that match nothing.
    /// Implementations may answer from one listing of every domain.
    fn resolve_many(&self, names: &[String]) -> HvResult<Vec<Option<DomainId>>> {
        names
            .iter()
            .map(|n| match self.resolve(n) {
                Ok(id) => Ok(Some(id)),
                Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Reads several domains at once, each only as deeply as its [`Want`] asks: `title` and
    /// `description` are empty unless `metadata` (or the domain is running), `clock` is `None`
    /// unless `clock`. Implementations may use one bulk call.
    fn observe_wanted(&self, wants: &[Want]) -> HvResult<Vec<Observation>> {
        wants
            .iter()
            .map(|w| {
                let state = self.observe(&w.uuid, w.clock)?;
                let definition = if w.clock {
                    Some(self.domain_xml(&w.uuid, true)?)
                } else {
                    None
                };
                Ok(Observation { state, definition })
            })
            .collect()
    }

    /// Resolves a plan's `vm:` values and reads the domains they name (each once, as deeply
    /// as its names' wants together ask). Implementations may answer both from one bulk call;
    /// this one resolves ([`Hypervisor::resolve_many`]), then reads
    /// ([`Hypervisor::observe_wanted`]).
    fn resolve_and_observe(&self, names: &[NamedWant]) -> HvResult<NamedRead> {
        let plain: Vec<String> = names.iter().map(|n| n.name.clone()).collect();
        let ids = self.resolve_many(&plain)?;
        let observations = self.observe_wanted(&merge_wants(names, &ids))?;
        Ok(NamedRead { ids, observations })
    }

    /// Reads several domains completely (as [`Hypervisor::observe`] does) in one bulk read.
    fn observe_many(&self, uuids: &[String], with_clock: bool) -> HvResult<Vec<DomainState>> {
        let wants: Vec<Want> = uuids
            .iter()
            .map(|u| Want {
                uuid: u.clone(),
                clock: with_clock,
                metadata: true,
            })
            .collect();
        Ok(self
            .observe_wanted(&wants)?
            .into_iter()
            .map(|o| o.state)
            .collect())
    }

    /// The domain XML: `inactive` selects the persistent definition (what the next boot uses).
    fn domain_xml(&self, uuid: &str, inactive: bool) -> HvResult<String>;

    /// Number of physical CPUs on the host.
    fn host_cpus(&self) -> HvResult<u32>;

    /// Names of the domain's snapshots.
    fn snapshot_names(&self, uuid: &str) -> HvResult<Vec<String>>;

    fn start(&self, uuid: &str) -> HvResult<()>;
    /// Asks the guest to shut down (ACPI); returns at once.
    fn shutdown(&self, uuid: &str) -> HvResult<()>;
    /// Pulls the plug.
    fn destroy(&self, uuid: &str) -> HvResult<()>;
    fn suspend(&self, uuid: &str) -> HvResult<()>;
    fn resume(&self, uuid: &str) -> HvResult<()>;
    fn set_memory(&self, uuid: &str, memory: Kib, scope: Scope) -> HvResult<()>;
    /// Raises or lowers the maximum memory of the persistent definition.
    fn set_max_memory(&self, uuid: &str, max: Kib) -> HvResult<()>;
    fn set_vcpus(&self, uuid: &str, vcpus: u32, scope: Scope) -> HvResult<()>;
    /// Sets the vCPU maximum of the persistent definition.
    fn set_max_vcpus(&self, uuid: &str, max: u32) -> HvResult<()>;
    /// Replaces the persistent definition (used for clock edits).
    fn define_xml(&self, xml: &str) -> HvResult<()>;
    fn set_autostart(&self, uuid: &str, on: bool) -> HvResult<()>;
    /// Sets what the persistent definition does on a guest power-off or reboot.
    fn set_lifecycle(
        &self,
        uuid: &str,
        event: LifecycleEvent,
        action: LifecycleAction,
    ) -> HvResult<()>;
    fn set_title(&self, uuid: &str, title: &str) -> HvResult<()>;
    fn set_description(&self, uuid: &str, description: &str) -> HvResult<()>;
    fn create_snapshot(&self, uuid: &str, name: &str, description: Option<&str>) -> HvResult<()>;

    /// Every domain of this connection, active or not, sorted by name (for `vms: {match:}`).
    fn list_domains(&self) -> HvResult<Vec<DomainId>>;

    /// The element of XML namespace `namespace` in the domain's metadata (of the persistent
    /// definition when there is one, so it survives power changes); `None` when there is none.
    fn metadata_element(&self, uuid: &str, namespace: &str) -> HvResult<Option<String>>;

    /// Replaces (`Some`) or removes (`None`) that element; `prefix` is its namespace prefix.
    fn set_metadata_element(
        &self,
        uuid: &str,
        namespace: &str,
        prefix: &str,
        xml: Option<&str>,
    ) -> HvResult<()>;
    /// libvirt's id of the running domain, new at every start (a reboot shows as a new id);
    /// `None` when the domain is not running.
    fn run_id(&self, uuid: &str) -> HvResult<Option<u32>>;

    /// Whether the domain's definition has a QEMU guest agent channel
    /// (`<channel><target type='virtio' name='org.qemu.guest_agent.0'/>`).
    fn has_agent_channel(&self, uuid: &str) -> HvResult<bool> {
        let xml = self.domain_xml(uuid, false)?;
        domain_xml::has_agent_channel(&xml).map_err(|e| {
            HvError::new(
                ErrorKind::Other,
                format!("cannot read the definition of {uuid}: {e}"),
            )
        })
    }

    /// Asks the guest agent to shut the guest down; returns at once, like [`Self::shutdown`].
    fn agent_shutdown(&self, uuid: &str) -> HvResult<()>;

    /// Pings the guest agent (`guest-ping`), waiting at most `timeout` for the answer.
    fn agent_ping(&self, uuid: &str, timeout: Duration) -> HvResult<()>;

    /// Sets the guest's clock to `time` (libvirt's domain time API, through the guest agent).
    fn set_guest_time(&self, uuid: &str, time: DateTime<Utc>) -> HvResult<()>;

    /// Which lifecycle actions the driver takes. The default, for drivers without limits: any.
    fn lifecycle_rules(&self) -> crate::state::LifecycleRules {
        crate::state::LifecycleRules::Any
    }

    /// Whether libvirt can take an internal snapshot of the domain, running and shut off
    /// (see [`snapshot`]). The default, for drivers without such limits: always.
    fn snapshot_support(&self, _uuid: &str) -> HvResult<snapshot::SnapshotSupport> {
        Ok(snapshot::SnapshotSupport::default())
    }
}

/// How long a graceful shutdown may take before the executor decides what to do next.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a resumed run waits for a domain caught between two states to settle.
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls [`Hypervisor::unsettled`] until the domain settles (`Ok(None)`) or `limit` passes
/// (`Ok(Some(reason))`, the last reason seen). Sleeps through `clock`.
pub fn wait_settled(
    hv: &dyn Hypervisor,
    uuid: &str,
    clock: &dyn crate::clock::Clock,
    limit: std::time::Duration,
) -> HvResult<Option<String>> {
    const POLL: std::time::Duration = std::time::Duration::from_millis(250);
    let start = clock.now();
    loop {
        let Some(reason) = hv.unsettled(uuid)? else {
            return Ok(None);
        };
        let waited = (clock.now() - start).to_std().unwrap_or_default();
        if waited >= limit {
            return Ok(Some(reason));
        }
        clock.sleep(POLL.min(limit.saturating_sub(waited)));
    }
}
