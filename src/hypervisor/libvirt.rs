//! libvirt through the `virt` crate: the only module that imports `virt`.
//!
//! Reading one domain (`observe`) takes the power state and live figures from the running
//! domain and every configuration figure from the persistent definition (the inactive XML),
//! because that is what survives a reboot and what the planner projects.
//!
//! `plan` reads in bulk, with a fixed number of round trips however many domains it targets,
//! through `resolve_and_observe`: one `virConnectGetAllDomainStats` over the inactive domains
//! both resolves the plan's names (each record carries its domain's name and UUID) and reads
//! those domains, as `observe_wanted` below; a name not among them is looked for in one listing
//! of the active domains (whose handles then serve the per-domain reads), and only a miss there
//! falls back to a lookup by name, which reports "not found" exactly as libvirt does. A record
//! keeps a reference on its domain only when more calls will read it: libvirt formats the UUID
//! on every call that takes a domain, including taking and dropping a reference.
//! - `resolve_many`: one `virConnectListAllDomains` gives every name and UUID (both are kept in
//!   the client's domain handles, so reading them costs no round trip); only a miss falls back
//!   to a lookup by name.
//! - `observe_wanted`: one `virConnectGetAllDomainStats` over the inactive domains with the
//!   `state`, `balloon` and `vcpu` groups. For a shut-off domain those are its persistent
//!   figures (`balloon.current`/`maximum` = `<currentMemory>`/`<memory>`, `vcpu.current`/
//!   `maximum` = `<vcpu current>`/`<vcpu>`), so it needs no other call unless a step reads its
//!   clock, title or description (then one `virDomainGetXMLDesc`). Running domains are not in
//!   that call (for them the `balloon` and `vcpu` groups query the QEMU monitor, slower than
//!   reading their definition): each costs a lookup, `virDomainGetInfo` (live figures) and its
//!   inactive XML. Plus one listing for autostart, and one for transient domains when any
//!   targeted domain runs (a shut-off domain is always persistent).
//!
//! The test driver's bulk statistics carry the `state` group only; its domains are read from
//! their XML, through the handles of the bulk records. A domain without a balloon device
//! (`<memballoon model='none'/>`) boots with all of `<memory>` whatever `<currentMemory>` says,
//! and libvirt's `balloon.current` says so: [`domain_xml::summarize`] follows the same rule,
//! so the bulk and the per-domain reads agree.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::sync::{Mutex, Once};

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirtState, DomainStateEnum};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

use super::domain_xml::{self, DefinitionSummary};
use super::snapshot::{self, QemuImg, SnapshotSupport};
use super::{
    DomainId, ErrorKind, HvError, HvResult, Hypervisor, NamedRead, NamedWant, Observation, Scope,
    Want,
};
use crate::state::{DomainState, Kib, LifecycleAction, LifecycleEvent, LiveFigures, PowerState};
use crate::uri::Uri;

/// Stops libvirt from printing every handled error to stderr; call once before connecting.
pub fn silence_stderr_printer() {
    virt::error::clear_error_callback();
}

static SILENCE: Once = Once::new();

/// libvirt's keepalive, on every connection: after `interval` seconds without a word from the
/// daemon the client pings it, and after `count` unanswered pings it closes the connection,
/// which fails every call waiting on it. A hung libvirtd (stopped, deadlocked) therefore costs
/// a call at most about `interval * (count + 1)` seconds instead of blocking it forever.
const KEEPALIVE: Keepalive = Keepalive {
    interval_secs: 5,
    count: 3,
};

/// Test knob: `INTERVAL,COUNT` replaces [`KEEPALIVE`] (the hung-daemon test uses `1,2`).
pub const KEEPALIVE_ENV: &str = "VIRTPLAN_KEEPALIVE";

#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval_secs: u16,
    count: u16,
}

impl Keepalive {
    fn current() -> Self {
        std::env::var(KEEPALIVE_ENV)
            .ok()
            .and_then(|v| {
                let (i, c) = v.split_once(',')?;
                Some(Self {
                    interval_secs: i.trim().parse().ok().filter(|&i| i > 0)?,
                    count: c.trim().parse().ok()?,
                })
            })
            .unwrap_or(KEEPALIVE)
    }

    /// How long a dead daemon can keep a call waiting: also the bound on opening a connection,
    /// which happens before keepalive can run.
    fn bound(self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.interval_secs) * (u64::from(self.count) + 1))
    }
}

static EVENT_LOOP: Once = Once::new();

/// Keepalive needs libvirt's event loop: registered before the first connection opens, and
/// run by a thread of its own for the life of the process.
fn start_event_loop() {
    if virt::event::event_register_default_impl().is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("libvirt-events".to_owned())
        .spawn(|| while virt::event::event_run_default_impl().is_ok() {});
}

/// One libvirt connection.
///
/// `virt::connect::Connect` is `Send + Sync` (libvirt connections are thread-safe: every public
/// API call takes the connection's lock), so `Libvirt` is too and may be shared through an `Arc`
/// by the executor's worker threads. Each call keeps its own `Domain` handle.
pub struct Libvirt {
    uri: Uri,
    conn: Connect,
    /// The driver's name (`QEMU`, `Test`, ...), asked on first use: `plan` of shut-off domains
    /// never needs it, and it is a round trip. The test driver refuses
    /// `VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG` in one memory call ("mutually
    /// exclusive"), so live+config memory changes go in two calls there; the QEMU driver's
    /// snapshots have limits ([`super::snapshot`]).
    driver: std::sync::OnceLock<String>,
    /// Record lists being freed on threads of their own ([`Libvirt::free_in_background`]),
    /// joined before the connection closes: a record still holding it would leave it open
    /// past this drop, and a process that then exits leaves libvirtd an "End of file while
    /// reading data" error in its log.
    freeing: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let freeing = self
            .freeing
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for handle in freeing.drain(..) {
            // A panic while freeing leaves nothing to undo.
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl Libvirt {
    /// One domain of a bulk read: from its statistics alone when they carry every figure and no
    /// definition is wanted, else from its definition (and live figures when it runs).
    fn read_wanted(
        &self,
        Job {
            want,
            record,
            active,
        }: &Job<'_>,
        autostart: &HashSet<String>,
        transient: Option<&HashSet<String>>,
    ) -> HvResult<Observation> {
        let (want, record) = (*want, *record);
        let key = want.uuid.to_ascii_lowercase();
        let needs_xml = want.clock || want.metadata;
        if let Some((record, figures)) = record.and_then(|r| Some((r, r.figures?))) {
            let power = power_state(DomainStateEnum::from_raw(record.state.unwrap_or(0)));
            if !needs_xml && !power.is_active() {
                let autostart = autostart.contains(&key);
                return Ok(Observation {
                    state: DomainState {
                        name: record.name.clone(),
                        uuid: key,
                        power,
                        memory: Kib(figures.memory),
                        max_memory: Kib(figures.max_memory),
                        vcpus: figures.vcpus,
                        max_vcpus: figures.max_vcpus,
                        autostart,
                        persistent: true,
                        clock: None,
                        lifecycle: None,
                        title: String::new(),
                        description: String::new(),
                        live: None,
                    },
                    definition: None,
                });
            }
        }
        let looked_up;
        let dom = if let Some(dom) = record.and_then(|r| r.domain.as_ref()).or(*active) {
            dom
        } else {
            looked_up = self.conn.lookup_domain_by_uuid_string(&key).map_err(|e| {
                if classify(&e) == ErrorKind::NotFound {
                    HvError::new(
                        ErrorKind::NotFound,
                        format!("domain {}: no domain with this UUID", want.uuid),
                    )
                } else {
                    hv_error(&format!("domain {}", want.uuid), &e)
                }
            })?;
            &looked_up
        };
        let what = format!("read domain {}", want.uuid);
        let err = |e: VirtError| hv_error(&what, &e);
        let (power, info) = if let Some(state) = record.and_then(|r| r.state) {
            (power_state(DomainStateEnum::from_raw(state)), None)
        } else {
            let info = dom.info().map_err(err)?;
            (power_state(info.state), Some(info))
        };
        let live = if power.is_active() {
            let info = match info {
                Some(info) => info,
                None => dom.info().map_err(err)?,
            };
            Some(LiveFigures {
                memory: Kib(info.memory),
                vcpus: info.nr_virt_cpu,
            })
        } else {
            None
        };
        // Inactive domains are always persistent; a running one asks the transient listing
        // (or libvirt, when the listing was not made).
        let persistent = match (record, transient) {
            (Some(_), _) => true,
            (None, Some(transient)) => !transient.contains(&key),
            (None, None) => dom.is_persistent().map_err(err)?,
        };
        let xml = Self::inactive_xml(dom, &want.uuid)?;
        let summary = Self::summarize(&xml, &want.uuid)?;
        Ok(Observation {
            state: DomainState {
                name: dom.name().map_err(err)?,
                uuid: key.clone(),
                power,
                memory: summary.memory,
                max_memory: summary.max_memory,
                vcpus: summary.vcpus,
                max_vcpus: summary.max_vcpus,
                autostart: autostart.contains(&key),
                persistent,
                clock: want.clock.then_some(summary.clock),
                lifecycle: want.clock.then_some(summary.lifecycle),
                title: summary.title,
                description: summary.description,
                live,
            },
            definition: want.clock.then_some(xml),
        })
    }

    /// Opens a read-write connection to `uri` (`qemu:///system`, `test:///abs/node.xml`, ...).
    ///
    /// # Errors
    ///
    /// Fails with a message naming the URI and how to check it when libvirt cannot be reached.
    pub fn connect(uri: impl Into<Uri>) -> HvResult<Self> {
        let uri = &uri.into();
        SILENCE.call_once(silence_stderr_printer);
        // virt 0.5 turns an `Option<&str>` into a C string with `unwrap`: a NUL would panic.
        no_nul(&format!("connect to {uri}"), uri.expose())?;
        EVENT_LOOP.call_once(start_event_loop);
        let keepalive = Keepalive::current();
        // Opening talks to the daemon before keepalive can run: a thread of its own with a
        // deadline bounds it. A thread that gives up stays blocked until the daemon answers
        // (or the process exits); the connection it then opens is dropped unused.
        let (tx, rx) = std::sync::mpsc::channel();
        let text = uri.expose().to_owned();
        let spawned = std::thread::Builder::new()
            .name("libvirt-open".to_owned())
            .spawn(move || {
                let _ = tx.send(Connect::open(Some(&text)));
            });
        if let Err(e) = spawned {
            return Err(HvError::new(
                ErrorKind::Other,
                format!("cannot connect to libvirt at {uri}: cannot start a thread: {e}"),
            ));
        }
        let opened = rx.recv_timeout(keepalive.bound()).map_err(|_| {
            HvError::new(
                ErrorKind::Transient,
                format!(
                    "cannot connect to libvirt at {uri}: no answer within {}s; is libvirtd hung \
                     (stopped, overloaded)? try `virsh -c {uri} version`",
                    keepalive.bound().as_secs()
                ),
            )
        })?;
        // libvirt may quote the URI in its message: redact the message as well.
        let conn = opened.map_err(|e| {
            let kind = classify(&e);
            HvError::new(
                kind,
                format!(
                    "cannot connect to libvirt at {uri}: {}; is libvirtd running and may this \
                     user use it? try `virsh -c {uri} version`",
                    redact_message(e.message().trim_end(), uri)
                ),
            )
        })?;
        // Drivers without a daemon (test:///) do not support keepalive, and need none.
        let _ = conn.set_keep_alive(
            i32::from(keepalive.interval_secs),
            u32::from(keepalive.count),
        );
        Ok(Self {
            uri: uri.clone(),
            conn,
            driver: std::sync::OnceLock::new(),
            freeing: Mutex::new(Vec::new()),
        })
    }

    /// Whether the connection's driver is `name` (case-insensitive); an unreadable driver type
    /// is none of them.
    fn driver_is(&self, name: &str) -> bool {
        self.driver
            .get_or_init(|| self.conn.driver_type().unwrap_or_default())
            .eq_ignore_ascii_case(name)
    }

    /// A `vm:` value no listing matched (defined since, or a form a listing cannot match):
    /// libvirt's own lookup decides, and says "not found" (`None`) as it always does.
    fn resolve_unlisted(&self, name_or_uuid: &str) -> HvResult<Option<DomainId>> {
        match self.resolve(name_or_uuid) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn lookup(&self, uuid: &str) -> HvResult<Domain> {
        self.conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|e| hv_error(&format!("domain {uuid}"), &e))
    }

    fn set_metadata_text(&self, uuid: &str, kind: u32, text: &str) -> HvResult<()> {
        let dom = self.lookup(uuid)?;
        let what = format!("set metadata of {uuid}");
        let active = dom.is_active().map_err(|e| hv_error(&what, &e))?;
        let persistent = dom.is_persistent().map_err(|e| hv_error(&what, &e))?;
        let mut flags = 0;
        if active {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if persistent {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        // virt 0.5 converts this `Option<&str>` with `unwrap`: a NUL would panic mid-step.
        no_nul(&what, text)?;
        // An empty text removes the element rather than leaving `<title></title>`.
        let text = (!text.is_empty()).then_some(text);
        dom.set_metadata(metadata_kind(kind), text, None, None, flags)
            .map_err(|e| hv_error(&what, &e))
    }

    fn inactive_xml(dom: &Domain, uuid: &str) -> HvResult<String> {
        dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| hv_error(&format!("read the definition of {uuid}"), &e))
    }

    fn summarize(xml: &str, uuid: &str) -> HvResult<DefinitionSummary> {
        domain_xml::summarize(xml).map_err(|e| {
            HvError::new(
                ErrorKind::Other,
                format!("cannot read the definition of {uuid}: {e}"),
            )
        })
    }

    /// UUIDs of the domains a listing with `flags` returns (lower-case, as libvirt writes them).
    fn listed_uuids(&self, flags: sys::virConnectListAllDomainsFlags) -> HvResult<HashSet<String>> {
        let domains = self
            .conn
            .list_all_domains(flags)
            .map_err(|e| hv_error("list domains", &e))?;
        domains
            .iter()
            .map(|d| uuid_text(d).map_err(|e| hv_error("list domains", &e)))
            .collect()
    }

    /// One `virConnectGetAllDomainStats` over the inactive domains (`state`, `balloon`,
    /// `vcpu`). A record keeps a handle on its domain only where more calls will follow:
    /// `deep(uuid, name)` (a step reads its definition) or figures the driver left out.
    /// The records' list comes along, to be freed once the calls that follow are made (see
    /// [`Libvirt::free_in_background`]).
    fn inactive_stats(
        &self,
        deep: &dyn Fn(&str, &str) -> bool,
    ) -> HvResult<(Vec<StatsRecord>, StatsList)> {
        all_domain_stats(
            &self.conn,
            sys::VIR_DOMAIN_STATS_STATE
                | sys::VIR_DOMAIN_STATS_BALLOON
                | sys::VIR_DOMAIN_STATS_VCPU,
            sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_INACTIVE,
            deep,
        )
        .map_err(|e| hv_error("read domain statistics", &e))
    }

    /// Frees `list` on a thread of its own (here if none can be started), joined when the
    /// connection closes. Freeing drops each record's domain handle, for which libvirt formats
    /// the UUID of a debug message: 1.8 ms at 2000 domains, while `plan` goes on with the
    /// records. Called once the calls that follow the bulk read are made: a free at the same
    /// time slowed the autostart listing down.
    fn free_in_background(&self, list: StatsList) {
        let Ok(handle) = std::thread::Builder::new()
            .name("free-stats".to_owned())
            .spawn(move || drop(list))
        else {
            return;
        };
        let mut freeing = self
            .freeing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        freeing.retain(|h| !h.is_finished());
        freeing.push(handle);
    }

    /// Reads each job's domain (see [`Libvirt::read_wanted`]), with one listing for autostart
    /// and, when a job's domain may be running, one for transient domains.
    fn read_jobs(&self, jobs: &[Job<'_>]) -> HvResult<Vec<Observation>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let autostart = self.listed_uuids(sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?;
        let transient = if jobs.iter().any(|j| j.record.is_none()) {
            Some(self.listed_uuids(sys::VIR_CONNECT_LIST_DOMAINS_TRANSIENT)?)
        } else {
            None
        };
        let needs_call = |j: &&Job<'_>| {
            j.want.clock || j.want.metadata || j.record.is_none_or(|r| r.figures.is_none())
        };
        let read = |j: &Job<'_>| self.read_wanted(j, &autostart, transient.as_ref());
        let calls = jobs.iter().filter(needs_call).count();
        if calls < 8 {
            return jobs.iter().map(read).collect();
        }
        // The per-domain reads are independent round trips: a few threads keep several in
        // flight on the (thread-safe) connection.
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get() * 2)
            .min(8);
        let chunk = jobs.len().div_ceil(workers).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(read).collect::<Vec<_>>()))
                .collect();
            let mut out = Vec::with_capacity(jobs.len());
            for handle in handles {
                let part = handle.join().map_err(|_| {
                    HvError::new(ErrorKind::Other, "a domain-state reader thread panicked")
                })?;
                for one in part {
                    out.push(one?);
                }
            }
            Ok(out)
        })
    }

    fn with_domain<T>(
        &self,
        uuid: &str,
        what: &str,
        f: impl FnOnce(&Domain) -> Result<T, VirtError>,
    ) -> HvResult<T> {
        let dom = self.lookup(uuid)?;
        f(&dom).map_err(|e| hv_error(&format!("{what} {uuid}"), &e))
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn resolve(&self, name_or_uuid: &str) -> HvResult<DomainId> {
        let by_name = || {
            self.conn
                .lookup_domain_by_name(name_or_uuid)
                .map_err(|e| hv_error(&format!("domain {name_or_uuid:?}"), &e))
        };
        let dom = if looks_like_uuid(name_or_uuid) {
            match self.conn.lookup_domain_by_uuid_string(name_or_uuid) {
                Ok(dom) => dom,
                // A name may look like a UUID; try it as a name before giving up.
                Err(e) if classify(&e) == ErrorKind::NotFound => by_name()?,
                Err(e) => return Err(hv_error(&format!("domain {name_or_uuid}"), &e)),
            }
        } else {
            by_name()?
        };
        domain_id(&dom, &format!("domain {name_or_uuid:?}"))
    }

    fn resolve_many(&self, names: &[String]) -> HvResult<Vec<Option<DomainId>>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.list_domains()?;
        let listing = Listing::new(ids.iter().map(|id| (id.name.as_str(), id.uuid.as_str())));
        names
            .iter()
            .map(|name| match listing.find(name) {
                Some(i) => Ok(Some(ids[i].clone())),
                None => self.resolve_unlisted(name),
            })
            .collect()
    }

    fn observe(&self, uuid: &str, with_clock: bool) -> HvResult<DomainState> {
        let dom = self.lookup(uuid)?;
        let what = format!("read domain {uuid}");
        let err = |e: VirtError| hv_error(&what, &e);
        // `info()` rather than `state()`: virt 0.5's `state()` ignores errors.
        let info = dom.info().map_err(err)?;
        let power = power_state(info.state);
        let persistent = dom.is_persistent().map_err(err)?;
        let autostart = dom.autostart().map_err(err)?;
        let name = dom.name().map_err(err)?;
        // Title and description come from the same definition: the inactive XML of a
        // persistent domain is what `virDomainGetMetadata(.., AFFECT_CONFIG)` reads, and of a
        // transient one its live definition.
        let summary = Self::summarize(&Self::inactive_xml(&dom, uuid)?, uuid)?;
        let live = power.is_active().then_some(LiveFigures {
            memory: Kib(info.memory),
            vcpus: info.nr_virt_cpu,
        });
        Ok(DomainState {
            name,
            uuid: uuid_text(&dom).map_err(err)?,
            power,
            memory: summary.memory,
            max_memory: summary.max_memory,
            vcpus: summary.vcpus,
            max_vcpus: summary.max_vcpus,
            autostart,
            persistent,
            clock: with_clock.then_some(summary.clock),
            lifecycle: with_clock.then_some(summary.lifecycle),
            title: summary.title,
            description: summary.description,
            live,
        })
    }

    fn observe_wanted(&self, wants: &[Want]) -> HvResult<Vec<Observation>> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let deep: HashSet<String> = wants
            .iter()
            .filter(|w| w.clock || w.metadata)
            .map(|w| w.uuid.to_ascii_lowercase())
            .collect();
        let (records, list) = self.inactive_stats(&|uuid, _| deep.contains(uuid))?;
        let by_uuid: HashMap<&str, &StatsRecord> =
            records.iter().map(|r| (r.uuid.as_str(), r)).collect();
        let jobs: Vec<Job<'_>> = wants
            .iter()
            .map(|w| Job {
                want: w,
                record: by_uuid.get(w.uuid.to_ascii_lowercase().as_str()).copied(),
                active: None,
            })
            .collect();
        let observations = self.read_jobs(&jobs);
        self.free_in_background(list);
        observations
    }

    /// One `virConnectGetAllDomainStats` over the inactive domains both resolves the plan's
    /// names and reads those domains; the running ones come from one listing of the active
    /// domains, made only when a name is not among the inactive ones.
    fn resolve_and_observe(&self, names: &[NamedWant]) -> HvResult<NamedRead> {
        if names.is_empty() {
            return Ok(NamedRead::default());
        }
        // Which domains a step reads the definition of, by every form a name may take.
        let mut deep_names: HashSet<&str> = HashSet::new();
        let mut deep_uuids: HashSet<String> = HashSet::new();
        for n in names.iter().filter(|n| n.clock || n.metadata) {
            deep_names.insert(&n.name);
            deep_uuids.extend(canonical_uuid(&n.name));
        }
        let (records, list) = self
            .inactive_stats(&|uuid, name| deep_uuids.contains(uuid) || deep_names.contains(name))?;
        let inactive = Listing::new(records.iter().map(|r| (r.name.as_str(), r.uuid.as_str())));
        let mut ids: Vec<Option<DomainId>> = names
            .iter()
            .map(|n| inactive.find(&n.name).map(|i| records[i].id()))
            .collect();
        let mut active: Vec<(Domain, DomainId)> = Vec::new();
        if ids.iter().any(Option::is_none) {
            let listed = self
                .conn
                .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .map_err(|e| hv_error("list domains", &e))?;
            for dom in listed {
                let id = domain_id(&dom, "list domains")?;
                active.push((dom, id));
            }
            let running = Listing::new(
                active
                    .iter()
                    .map(|(_, id)| (id.name.as_str(), id.uuid.as_str())),
            );
            for (slot, named) in ids.iter_mut().zip(names) {
                if slot.is_some() {
                    continue;
                }
                *slot = match running.find(&named.name) {
                    Some(i) => Some(active[i].1.clone()),
                    None => self.resolve_unlisted(&named.name)?,
                };
            }
        }
        let wants = super::merge_wants(names, &ids);
        let record_of: HashMap<&str, &StatsRecord> =
            records.iter().map(|r| (r.uuid.as_str(), r)).collect();
        let active_of: HashMap<&str, &Domain> = active
            .iter()
            .map(|(dom, id)| (id.uuid.as_str(), dom))
            .collect();
        let jobs: Vec<Job<'_>> = wants
            .iter()
            .map(|w| Job {
                want: w,
                record: record_of.get(w.uuid.as_str()).copied(),
                active: active_of.get(w.uuid.as_str()).copied(),
            })
            .collect();
        let observations = self.read_jobs(&jobs)?;
        self.free_in_background(list);
        Ok(NamedRead { ids, observations })
    }

    fn unsettled(&self, uuid: &str) -> HvResult<Option<String>> {
        let dom = self.lookup(uuid)?;
        let (state, reason) =
            domain_state(&dom).map_err(|e| hv_error(&format!("read the state of {uuid}"), &e))?;
        if state == sys::VIR_DOMAIN_SHUTDOWN {
            return Ok(Some("shutting down".to_owned()));
        }
        if state == sys::VIR_DOMAIN_PAUSED
            && u32::try_from(reason).ok() == Some(sys::VIR_DOMAIN_PAUSED_STARTING_UP)
        {
            return Ok(Some(
                "starting (QEMU holds its CPUs until start-up completes)".to_owned(),
            ));
        }
        if state == sys::VIR_DOMAIN_SHUTOFF {
            return Ok(None);
        }
        let control = match control_state(&dom) {
            Ok(control) => control,
            // It stopped between the two reads: a shut-off domain has settled.
            Err(e) if classify(&e) == ErrorKind::OperationInvalid => return Ok(None),
            Err(e) => return Err(hv_error(&format!("read the control state of {uuid}"), &e)),
        };
        Ok(match control {
            sys::VIR_DOMAIN_CONTROL_OK | sys::VIR_DOMAIN_CONTROL_ERROR => None,
            sys::VIR_DOMAIN_CONTROL_JOB => Some("a libvirt job is in flight".to_owned()),
            _ => Some("libvirt is busy with it (monitor occupied)".to_owned()),
        })
    }

    fn domain_xml(&self, uuid: &str, inactive: bool) -> HvResult<String> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.with_domain(uuid, "read the XML of", |d| d.xml_desc(flags))
    }

    fn host_cpus(&self) -> HvResult<u32> {
        self.conn
            .node_info()
            .map(|n| n.cpus)
            .map_err(|e| hv_error(&format!("read host information of {}", self.uri), &e))
    }

    fn snapshot_names(&self, uuid: &str) -> HvResult<Vec<String>> {
        self.with_domain(uuid, "list snapshots of", |d| {
            d.list_all_snapshots(0)?
                .iter()
                .map(virt::domain_snapshot::DomainSnapshot::name)
                .collect()
        })
    }

    fn start(&self, uuid: &str) -> HvResult<()> {
        self.with_domain(uuid, "start", Domain::create)
    }

    fn shutdown(&self, uuid: &str) -> HvResult<()> {
        // The ACPI power button, explicitly: with no flags the QEMU driver asks a connected guest
        // agent first, so the ladder's ACPI rung would ask an agent that already failed it
        // (waiting out its timeout again). Drivers that take no flags (the test driver refuses
        // any) get the plain request.
        self.with_domain(uuid, "shut down", |d| {
            match d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                Err(e) if classify(&e) == ErrorKind::InvalidArgument => d.shutdown(),
                other => other,
            }
        })
    }

    fn destroy(&self, uuid: &str) -> HvResult<()> {
        self.with_domain(uuid, "destroy", Domain::destroy)
    }

    fn suspend(&self, uuid: &str) -> HvResult<()> {
        self.with_domain(uuid, "suspend", Domain::suspend)
    }

    fn resume(&self, uuid: &str) -> HvResult<()> {
        self.with_domain(uuid, "resume", Domain::resume)
    }

    fn set_memory(&self, uuid: &str, memory: Kib, scope: Scope) -> HvResult<()> {
        let what = format!("set memory to {memory} on");
        if scope.live && scope.config && self.driver_is("test") {
            // Config first: if the live change then fails, the next boot still gets it.
            return self.with_domain(uuid, &what, |d| {
                d.set_memory_flags(memory.0, sys::VIR_DOMAIN_MEM_CONFIG)?;
                d.set_memory_flags(memory.0, sys::VIR_DOMAIN_MEM_LIVE)
            });
        }
        let flags = impact(scope);
        self.with_domain(uuid, &what, |d| d.set_memory_flags(memory.0, flags))
    }

    fn set_max_memory(&self, uuid: &str, max: Kib) -> HvResult<()> {
        self.with_domain(uuid, &format!("set maximum memory to {max} on"), |d| {
            d.set_memory_flags(
                max.0,
                sys::VIR_DOMAIN_MEM_MAXIMUM | sys::VIR_DOMAIN_MEM_CONFIG,
            )
        })
    }

    fn set_vcpus(&self, uuid: &str, vcpus: u32, scope: Scope) -> HvResult<()> {
        let flags = impact(scope);
        self.with_domain(uuid, &format!("set {vcpus} vCPUs on"), |d| {
            d.set_vcpus_flags(vcpus, flags)
        })
    }

    fn set_max_vcpus(&self, uuid: &str, max: u32) -> HvResult<()> {
        self.with_domain(uuid, &format!("set a maximum of {max} vCPUs on"), |d| {
            d.set_vcpus_flags(
                max,
                sys::VIR_DOMAIN_VCPU_MAXIMUM | sys::VIR_DOMAIN_VCPU_CONFIG,
            )
        })
    }

    fn define_xml(&self, xml: &str) -> HvResult<()> {
        self.conn
            .define_domain_xml(xml)
            .map(drop)
            .map_err(|e| hv_error("define domain", &e))
    }

    fn set_autostart(&self, uuid: &str, on: bool) -> HvResult<()> {
        self.with_domain(uuid, "set autostart of", |d| d.set_autostart(on))
    }

    fn set_lifecycle(
        &self,
        uuid: &str,
        event: LifecycleEvent,
        action: LifecycleAction,
    ) -> HvResult<()> {
        let kind = match event {
            LifecycleEvent::Poweroff => sys::VIR_DOMAIN_LIFECYCLE_POWEROFF,
            LifecycleEvent::Reboot => sys::VIR_DOMAIN_LIFECYCLE_REBOOT,
        };
        let value = match action {
            LifecycleAction::Destroy => sys::VIR_DOMAIN_LIFECYCLE_ACTION_DESTROY,
            LifecycleAction::Restart => sys::VIR_DOMAIN_LIFECYCLE_ACTION_RESTART,
            LifecycleAction::RenameRestart => sys::VIR_DOMAIN_LIFECYCLE_ACTION_RESTART_RENAME,
            LifecycleAction::Preserve => sys::VIR_DOMAIN_LIFECYCLE_ACTION_PRESERVE,
        };
        // The persistent definition only, like the clock: it takes effect at the next start.
        self.with_domain(uuid, &format!("set on_{event:?} of").to_lowercase(), |d| {
            d.set_lifecycle_action(kind, value, sys::VIR_DOMAIN_AFFECT_CONFIG)
        })
    }

    fn set_title(&self, uuid: &str, title: &str) -> HvResult<()> {
        self.set_metadata_text(uuid, sys::VIR_DOMAIN_METADATA_TITLE, title)
    }

    fn set_description(&self, uuid: &str, description: &str) -> HvResult<()> {
        self.set_metadata_text(uuid, sys::VIR_DOMAIN_METADATA_DESCRIPTION, description)
    }

    fn create_snapshot(&self, uuid: &str, name: &str, description: Option<&str>) -> HvResult<()> {
        let xml = snapshot_xml(name, description);
        self.with_domain(uuid, &format!("create snapshot {name:?} of"), |d| {
            d.create_snapshot_xml(&xml, 0).map(drop)
        })
    }

    fn run_id(&self, uuid: &str) -> HvResult<Option<u32>> {
        let dom = self.lookup(uuid)?;
        let active = dom
            .is_active()
            .map_err(|e| hv_error(&format!("read the state of {uuid}"), &e))?;
        // virDomainGetID answers -1 for an inactive domain, and for an error: ask first.
        Ok(if active { dom.id() } else { None })
    }

    fn agent_shutdown(&self, uuid: &str) -> HvResult<()> {
        match self.with_domain(uuid, "shut down (guest agent)", |d| {
            d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        }) {
            // `guest-shutdown` has no reply: when the guest goes down before libvirt sees the
            // agent's shutdown event, libvirt reports the socket's end as an error. The agent
            // took the request; the caller waits for shut-off (and forces after the policy's
            // timeout) as for any accepted request.
            Err(e) if e.message.contains("End of file from agent socket") => Ok(()),
            other => other,
        }
    }

    fn agent_ping(&self, uuid: &str, timeout: std::time::Duration) -> HvResult<()> {
        // libvirt takes whole seconds; 0 would mean "do not wait at all".
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        self.with_domain(uuid, "ping the guest agent of", |d| {
            d.qemu_agent_command(r#"{"execute":"guest-ping"}"#, seconds, 0)
                .map(drop)
        })
    }

    fn set_guest_time(&self, uuid: &str, time: chrono::DateTime<chrono::Utc>) -> HvResult<()> {
        let nanos = i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0);
        self.with_domain(uuid, "set the guest time of", |d| {
            d.set_time(time.timestamp(), nanos, 0)
        })
    }

    fn lifecycle_rules(&self) -> crate::state::LifecycleRules {
        if self.driver_is("qemu") {
            crate::state::LifecycleRules::Qemu
        } else {
            crate::state::LifecycleRules::Any
        }
    }

    fn snapshot_support(&self, uuid: &str) -> HvResult<SnapshotSupport> {
        if !self.driver_is("qemu") {
            return Ok(SnapshotSupport::default());
        }
        // A running snapshot takes the running domain's disks; a shut-off one the persistent
        // definition's (they differ after a disk hotplug).
        let persistent = self.domain_xml(uuid, true)?;
        let active = self.with_domain(uuid, "read the state of", Domain::is_active)?;
        let live = if active {
            self.domain_xml(uuid, false)?
        } else {
            persistent.clone()
        };
        let disks = |xml: &str| {
            domain_xml::disks(xml).map_err(|e| {
                HvError::new(
                    ErrorKind::Other,
                    format!("reading the disks of {uuid}: {e}"),
                )
            })
        };
        let qemu_img = match snapshot::remote_host(self.uri.expose()) {
            Some(host) => QemuImg::Unknown(host.to_owned()),
            None => snapshot::local_qemu_img(std::env::var_os("PATH").as_deref()),
        };
        Ok(SnapshotSupport {
            running: snapshot::qemu_verdict(&disks(&live)?, true, &qemu_img),
            shut_off: snapshot::qemu_verdict(&disks(&persistent)?, false, &qemu_img),
        })
    }

    fn list_domains(&self) -> HvResult<Vec<DomainId>> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| hv_error("list domains", &e))?;
        let mut ids = domains
            .iter()
            .map(|d| domain_id(d, "list domains"))
            .collect::<HvResult<Vec<_>>>()?;
        ids.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ids)
    }

    fn metadata_element(&self, uuid: &str, namespace: &str) -> HvResult<Option<String>> {
        let dom = self.lookup(uuid)?;
        let what = format!("read metadata of {uuid}");
        let flags = metadata_scope(&dom).map_err(|e| hv_error(&what, &e))?;
        match dom.metadata(
            metadata_kind(sys::VIR_DOMAIN_METADATA_ELEMENT),
            Some(namespace),
            flags,
        ) {
            Ok(xml) => Ok(Some(xml)),
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomainMetadata) => Ok(None),
            Err(e) => Err(hv_error(&what, &e)),
        }
    }

    fn set_metadata_element(
        &self,
        uuid: &str,
        namespace: &str,
        prefix: &str,
        xml: Option<&str>,
    ) -> HvResult<()> {
        let dom = self.lookup(uuid)?;
        let what = format!("write metadata of {uuid}");
        let flags = metadata_scope(&dom).map_err(|e| hv_error(&what, &e))?;
        dom.set_metadata(
            metadata_kind(sys::VIR_DOMAIN_METADATA_ELEMENT),
            xml,
            Some(prefix),
            Some(namespace),
            flags,
        )
        .map_err(|e| hv_error(&what, &e))
    }
}

/// Where our own metadata elements live: the persistent definition of a persistent domain
/// (it survives shutdown and is what every reader looks at, whatever the power state does
/// meanwhile), the live one of a transient domain (it has no other).
fn metadata_scope(dom: &Domain) -> Result<u32, VirtError> {
    Ok(if dom.is_persistent()? {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    } else {
        sys::VIR_DOMAIN_AFFECT_LIVE
    })
}

/// `<domainsnapshot>` with a name and an optional description, escaped by the XML writer.
fn snapshot_xml(name: &str, description: Option<&str>) -> String {
    let mut w = Writer::new(Vec::new());
    let text_element = |w: &mut Writer<Vec<u8>>, tag: &str, text: &str| {
        // Writing into a Vec cannot fail.
        let _ = w.write_event(Event::Start(BytesStart::new(tag)));
        let _ = w.write_event(Event::Text(BytesText::new(text)));
        let _ = w.write_event(Event::End(BytesEnd::new(tag)));
    };
    let _ = w.write_event(Event::Start(BytesStart::new("domainsnapshot")));
    text_element(&mut w, "name", name);
    if let Some(description) = description {
        text_element(&mut w, "description", description);
    }
    let _ = w.write_event(Event::End(BytesEnd::new("domainsnapshot")));
    String::from_utf8_lossy(&w.into_inner()).into_owned()
}

/// `VIR_DOMAIN_AFFECT_*` flags; with neither live nor config, libvirt's "current" state.
/// The memory (`VIR_DOMAIN_MEM_*`) and vCPU (`VIR_DOMAIN_VCPU_*`) flags share these values.
fn impact(scope: Scope) -> u32 {
    let mut flags = sys::VIR_DOMAIN_AFFECT_CURRENT;
    if scope.live {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if scope.config {
        flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    flags
}

fn metadata_kind(kind: u32) -> i32 {
    // The metadata kinds are 0..=2.
    i32::try_from(kind).unwrap_or(i32::MAX)
}

/// Whether `s` is a UUID as libvirt parses them: 32 hex digits, optionally split by dashes.
fn looks_like_uuid(s: &str) -> bool {
    let canonical = s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    let bare = s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit());
    canonical || bare
}

/// The lower-case, dashed form libvirt lists a UUID in; `None` when `s` is not a UUID.
fn canonical_uuid(s: &str) -> Option<String> {
    if !looks_like_uuid(s) {
        return None;
    }
    let hex: String = s
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn power_state(state: Enum<VirtState, sys::virDomainState>) -> PowerState {
    match state {
        Enum::Known(VirtState::Running | VirtState::Blocked) => PowerState::Running,
        Enum::Known(VirtState::Paused) => PowerState::Paused,
        Enum::Known(VirtState::Shutdown) => PowerState::ShuttingDown,
        Enum::Known(VirtState::Shutoff) => PowerState::Shutoff,
        Enum::Known(VirtState::Crashed) => PowerState::Crashed,
        Enum::Known(VirtState::PMSuspended) => PowerState::PmSuspended,
        Enum::Known(VirtState::NoState) | Enum::Unknown(_) => PowerState::NoState,
    }
}

/// Classifies a libvirt error by its code, so callers can tell "retry" from "give up".
fn classify(e: &VirtError) -> ErrorKind {
    // The RPC layer reports a connection it closed (keepalive gave up on a hung daemon, the
    // daemon restarted) as an internal error: "client socket is closed". It is a lost
    // connection, so the executor reconnects, and re-checks the deadline before any change.
    if e.code() == Enum::Known(ErrorNumber::InternalError)
        && e.domain() == Enum::Known(virt::error::ErrorDomain::Rpc)
    {
        return ErrorKind::Transient;
    }
    match e.code() {
        Enum::Known(ErrorNumber::NoDomain) => ErrorKind::NotFound,
        Enum::Known(ErrorNumber::OperationInvalid) => ErrorKind::OperationInvalid,
        Enum::Known(ErrorNumber::InvalidArg) => ErrorKind::InvalidArgument,
        Enum::Known(
            ErrorNumber::Rpc
            | ErrorNumber::SystemError
            | ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::OperationTimeout
            | ErrorNumber::AgentUnresponsive,
        ) => ErrorKind::Transient,
        Enum::Known(ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported) => {
            ErrorKind::Unsupported
        }
        _ => ErrorKind::Other,
    }
}

/// A domain's name and UUID, both read from the client's handle (no round trip); `what` names
/// the call in an error.
fn domain_id(dom: &Domain, what: &str) -> HvResult<DomainId> {
    Ok(DomainId {
        name: dom.name().map_err(|e| hv_error(what, &e))?,
        uuid: uuid_text(dom).map_err(|e| hv_error(what, &e))?,
    })
}

/// A domain's UUID as libvirt writes it (lower-case, hyphenated), formatted here from its 16
/// bytes: `virDomainGetUUIDString` formats each byte through `snprintf`, which cost more than
/// the rest of a bulk read's per-domain work.
fn uuid_text(dom: &Domain) -> Result<String, VirtError> {
    Ok(dom.uuid()?.hyphenated().to_string())
}

fn hv_error(what: &str, e: &VirtError) -> HvError {
    HvError::new(classify(e), format!("{what}: {}", e.message().trim_end()))
}

/// `virDomainGetState`: virt 0.5's `Domain::state` ignores errors, so it is called directly.
#[allow(unsafe_code)] // raw libvirt FFI; see SAFETY
fn domain_state(dom: &Domain) -> Result<(sys::virDomainState, i32), VirtError> {
    let mut state: std::os::raw::c_int = -1;
    let mut reason: std::os::raw::c_int = -1;
    // SAFETY: the domain pointer is valid while `dom` is borrowed; both out-parameters are
    // plain integers this frame owns.
    let rc = unsafe {
        sys::virDomainGetState(
            dom.as_ptr(),
            std::ptr::addr_of_mut!(state),
            std::ptr::addr_of_mut!(reason),
            0,
        )
    };
    if rc < 0 {
        return Err(VirtError::last_error());
    }
    Ok((
        sys::virDomainState::try_from(state).unwrap_or_default(),
        reason,
    ))
}

/// `virDomainGetControlInfo`'s state: whether libvirt is busy with the domain (a job, the
/// monitor); virt 0.5 has no wrapper.
#[allow(unsafe_code)] // raw libvirt FFI; see SAFETY
fn control_state(dom: &Domain) -> Result<u32, VirtError> {
    let mut info = sys::virDomainControlInfo {
        state: 0,
        details: 0,
        stateTime: 0,
    };
    // SAFETY: the domain pointer is valid while `dom` is borrowed; `info` is a plain struct
    // this frame owns, which libvirt fills in.
    let rc = unsafe { sys::virDomainGetControlInfo(dom.as_ptr(), std::ptr::addr_of_mut!(info), 0) };
    if rc < 0 {
        return Err(VirtError::last_error());
    }
    Ok(info.state)
}

/// Refuses text with a NUL before it reaches a `virt` call that would panic converting it.
fn no_nul(what: &str, text: &str) -> HvResult<()> {
    if text.contains('\0') {
        return Err(HvError::new(
            ErrorKind::InvalidArgument,
            format!("{what}: the text contains a NUL character, which libvirt cannot take"),
        ));
    }
    Ok(())
}

/// A libvirt message with the URI's secrets masked, in case libvirt quoted the URI or a part.
fn redact_message(message: &str, uri: &Uri) -> String {
    let mut out = crate::uri::redact_in(message, [uri]);
    if let Ok(url) = url::Url::parse(uri.expose()) {
        if let Some(password) = url.password().filter(|p| p.len() > 2) {
            out = out.replace(password, crate::uri::MASK);
        }
        for (key, value) in url.query_pairs() {
            if crate::uri::is_secret_key(&key) && value.len() > 2 {
                out = out.replace(&*value, crate::uri::MASK);
            }
        }
    }
    out
}

/// One domain of a bulk read: what to read, and what is already at hand.
struct Job<'a> {
    want: &'a Want,
    /// Its record of the inactive statistics, when it is shut off.
    record: Option<&'a StatsRecord>,
    /// Its handle from a listing of the active domains.
    active: Option<&'a Domain>,
}

/// Finds a `vm:` value in a listing, as libvirt would: as a UUID in any of libvirt's forms,
/// else as a name.
struct Listing<'a> {
    by_name: HashMap<&'a str, usize>,
    by_uuid: HashMap<&'a str, usize>,
}

impl<'a> Listing<'a> {
    /// `domains`: (name, lower-case UUID) pairs; `find` answers with their position.
    fn new(domains: impl ExactSizeIterator<Item = (&'a str, &'a str)>) -> Self {
        // Sized up front: grown by doubling, the maps were rehashed a dozen times over.
        let mut listing = Self {
            by_name: HashMap::with_capacity(domains.len()),
            by_uuid: HashMap::with_capacity(domains.len()),
        };
        for (i, (name, uuid)) in domains.enumerate() {
            listing.by_name.insert(name, i);
            listing.by_uuid.insert(uuid, i);
        }
        listing
    }

    fn find(&self, name_or_uuid: &str) -> Option<usize> {
        canonical_uuid(name_or_uuid)
            .and_then(|u| self.by_uuid.get(u.as_str()).copied())
            .or_else(|| self.by_name.get(name_or_uuid).copied())
    }
}

/// What one domain's record of a bulk statistics call holds.
struct StatsRecord {
    /// Our own reference, valid after the record list is freed; taken only for a domain that
    /// more calls will read (every reference costs libvirt a UUID formatting to take and
    /// another to drop).
    domain: Option<Domain>,
    name: String,
    uuid: String,
    /// `state.state`; `None` if the driver left it out.
    state: Option<sys::virDomainState>,
    /// The `balloon` and `vcpu` groups, when the driver gave all four figures.
    figures: Option<StatsFigures>,
}

impl StatsRecord {
    fn id(&self) -> DomainId {
        DomainId {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
        }
    }
}

/// `balloon.current`, `balloon.maximum` (KiB), `vcpu.current`, `vcpu.maximum`.
#[derive(Debug, Clone, Copy)]
struct StatsFigures {
    memory: u64,
    max_memory: u64,
    vcpus: u32,
    max_vcpus: u32,
}

/// Frees a record list returned by `virConnectGetAllDomainStats` when dropped.
struct StatsList(*mut sys::virDomainStatsRecordPtr);

// SAFETY: the list is owned by one `StatsList` and only freed, once, by its drop; libvirt's
// objects (the records' domains and their connection) are reference-counted thread-safely, so
// the free may run on any thread.
#[allow(unsafe_code)]
unsafe impl Send for StatsList {}

impl Drop for StatsList {
    #[allow(unsafe_code)] // frees the C list; see SAFETY
    fn drop(&mut self) {
        // SAFETY: the pointer came from virConnectGetAllDomainStats (or is null, which the
        // function accepts) and is freed exactly once, here.
        unsafe { sys::virDomainStatsRecordListFree(self.0) };
    }
}

/// One `virConnectGetAllDomainStats` call for every domain of the connection.
///
/// virt 0.5's `all_domain_stats` exposes raw record pointers and never frees the list, so
/// this wraps the C call directly.
#[allow(unsafe_code)] // raw libvirt FFI; each block states its SAFETY
fn all_domain_stats(
    conn: &Connect,
    stats: u32,
    flags: u32,
    deep: &dyn Fn(&str, &str) -> bool,
) -> Result<(Vec<StatsRecord>, StatsList), VirtError> {
    let mut list: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: the connection pointer stays valid while `conn` is borrowed; `list` is an
    // out-parameter that libvirt sets to a NULL-terminated array it allocated.
    let n = unsafe {
        sys::virConnectGetAllDomainStats(conn.as_ptr(), stats, std::ptr::addr_of_mut!(list), flags)
    };
    let list = StatsList(list);
    let Ok(n) = usize::try_from(n) else {
        return Err(VirtError::last_error());
    };
    let records = (0..n)
        .map(|i| {
            // SAFETY: libvirt returned `n` non-null record pointers in `list.0`, alive until
            // `list` is dropped.
            let record = unsafe { &**list.0.add(i) };
            read_record(record, deep)
        })
        .collect::<Result<_, _>>()?;
    Ok((records, list))
}

/// Copies what we need out of one stats record, and takes a reference on its domain when
/// `deep(uuid, name)` or the record lacks a figure (see [`StatsRecord::domain`]).
#[allow(unsafe_code)] // raw libvirt FFI; each block states its SAFETY
fn read_record(
    record: &sys::virDomainStatsRecord,
    deep: &dyn Fn(&str, &str) -> bool,
) -> Result<StatsRecord, VirtError> {
    // SAFETY: `record.dom` is a valid domain pointer while the record list lives. Taking a
    // reference (virDomainRef) lets the `Domain` wrapper own it and free it on drop; the
    // borrowed handle is forgotten without freeing, as the list still owns its reference.
    let borrowed = std::mem::ManuallyDrop::new(unsafe { Domain::from_ptr(record.dom) });
    let uuid = uuid_text(&borrowed)?;
    let name = borrowed.name()?;
    let mut state = None;
    let (mut memory, mut max_memory, mut vcpus, mut max_vcpus) = (None, None, None, None);
    for param in typed_params(record) {
        let Some(value) = typed_param_u64(param) else {
            continue;
        };
        // SAFETY: libvirt NUL-terminates the fixed-size field name.
        let field = unsafe { CStr::from_ptr(param.field.as_ptr()) };
        match field.to_bytes() {
            b"state.state" => state = sys::virDomainState::try_from(value).ok(),
            b"balloon.current" => memory = Some(value),
            b"balloon.maximum" => max_memory = Some(value),
            b"vcpu.current" => vcpus = u32::try_from(value).ok(),
            b"vcpu.maximum" => max_vcpus = u32::try_from(value).ok(),
            _ => {}
        }
    }
    let figures = match (memory, max_memory, vcpus, max_vcpus) {
        (Some(memory), Some(max_memory), Some(vcpus), Some(max_vcpus)) => Some(StatsFigures {
            memory,
            max_memory,
            vcpus,
            max_vcpus,
        }),
        _ => None,
    };
    let domain = if figures.is_none() || deep(&uuid, &name) {
        // SAFETY: as above; the new reference is owned by the returned `Domain`.
        unsafe {
            if sys::virDomainRef(record.dom) < 0 {
                return Err(VirtError::last_error());
            }
            Some(Domain::from_ptr(record.dom))
        }
    } else {
        None
    };
    Ok(StatsRecord {
        domain,
        name,
        uuid,
        state,
        figures,
    })
}

#[allow(unsafe_code)] // raw libvirt FFI; each block states its SAFETY
fn typed_params(record: &sys::virDomainStatsRecord) -> &[sys::virTypedParameter] {
    let len = usize::try_from(record.nparams).unwrap_or(0);
    if record.params.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: libvirt guarantees `params` points at `nparams` initialised parameters that live
    // as long as the record.
    unsafe { std::slice::from_raw_parts(record.params, len) }
}

/// The value of an integer typed parameter; `None` for other types or negative values.
#[allow(unsafe_code)] // raw libvirt FFI; each block states its SAFETY
fn typed_param_u64(param: &sys::virTypedParameter) -> Option<u64> {
    let kind = u32::try_from(param.type_).ok()?;
    // SAFETY: the union member read is the one `type_` says libvirt wrote.
    unsafe {
        match kind {
            sys::VIR_TYPED_PARAM_INT => u64::try_from(param.value.i).ok(),
            sys::VIR_TYPED_PARAM_UINT => Some(u64::from(param.value.ui)),
            sys::VIR_TYPED_PARAM_LLONG => u64::try_from(param.value.l).ok(),
            sys::VIR_TYPED_PARAM_ULLONG => Some(param.value.ul),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_detection() {
        assert!(looks_like_uuid("abf5f9ff-6d72-4ca1-a391-83b7c9ec2935"));
        assert!(looks_like_uuid("ABF5F9FF6D724CA1A39183B7C9EC2935"));
        assert!(!looks_like_uuid("web-01"));
        assert!(!looks_like_uuid("abf5f9ff-6d72-4ca1-a391-83b7c9ec293z"));
    }

    #[test]
    fn snapshot_xml_is_escaped() {
        assert_eq!(
            snapshot_xml("a<b", Some("x & y")),
            "<domainsnapshot><name>a&lt;b</name><description>x &amp; y</description></domainsnapshot>"
        );
        assert_eq!(
            snapshot_xml("s", None),
            "<domainsnapshot><name>s</name></domainsnapshot>"
        );
    }

    #[test]
    fn scope_flags() {
        assert_eq!(impact(Scope::BOTH), 3);
        assert_eq!(impact(Scope::CONFIG), sys::VIR_DOMAIN_MEM_CONFIG);
    }
}
