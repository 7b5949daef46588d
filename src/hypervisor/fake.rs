//! An in-memory [`Hypervisor`] for tests: domains as plain state, libvirt's rules about what
//! may change while a domain runs, error injection by call count, and a record of every
//! mutating call (with the time it was made, when given a clock).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

use super::{domain_xml, DomainId, ErrorKind, HvError, HvResult, Hypervisor, Scope};
use crate::clock::Clock;
use crate::state::{
    ClockState, DomainState, Kib, Lifecycle, LifecycleAction, LifecycleEvent, LiveFigures,
    PowerState,
};

/// One domain of a [`FakeHypervisor`].
#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub state: DomainState,
    pub snapshots: Vec<String>,
    /// Whether the guest honours an ACPI shutdown request (a guest without an OS does not).
    pub acpi: bool,
    /// Whether the domain has a guest agent channel with an agent that answers.
    pub agent: bool,
    /// libvirt's id while running; a new one at every start.
    pub run_id: Option<u32>,
    /// The guest's clock as last set through the agent.
    pub guest_time: Option<DateTime<Utc>>,
    /// How long (on the hypervisor's clock) a live memory change takes to land, as a real
    /// balloon driver inflates page by page; zero (or no clock): at once.
    pub balloon_lag: chrono::Duration,
    /// A live memory target the balloon has not reached yet, and when it will.
    balloon_pending: Option<(Kib, DateTime<Utc>)>,
    /// libvirt still moving the domain between two states (see [`Settling`]).
    pub settling: Option<Settling>,
}

/// libvirt still moving a domain between two states, as QEMU starting with its CPUs held
/// ("paused, starting up") or a shutdown in progress: [`Hypervisor::unsettled`] gives `reason`
/// until the hypervisor's clock reaches `until`; then the domain is `then`.
#[derive(Debug, Clone)]
pub struct Settling {
    pub reason: String,
    pub until: DateTime<Utc>,
    pub then: PowerState,
}

impl FakeDomain {
    /// A shut-off domain with 1 GiB of 4 GiB, 1 of 4 vCPUs, `<clock offset='utc'>`.
    #[must_use]
    pub fn new(name: &str, uuid: &str) -> Self {
        Self {
            state: DomainState {
                name: name.to_owned(),
                uuid: uuid.to_owned(),
                power: PowerState::Shutoff,
                memory: Kib::from_mib(1024),
                max_memory: Kib::from_mib(4096),
                vcpus: 1,
                max_vcpus: 4,
                autostart: false,
                persistent: true,
                clock: Some(ClockState {
                    offset: Some("utc".to_owned()),
                    rtc_track: None,
                }),
                lifecycle: Some(Lifecycle::default()),
                title: String::new(),
                description: String::new(),
                live: None,
            },
            snapshots: Vec::new(),
            acpi: true,
            agent: false,
            run_id: None,
            guest_time: None,
            balloon_lag: chrono::Duration::zero(),
            balloon_pending: None,
            settling: None,
        }
    }

    /// A guest whose balloon takes a live memory change `lag` after the call (needs a clock:
    /// [`FakeHypervisor::with_clock`]).
    #[must_use]
    pub fn slow_balloon(mut self, lag: chrono::Duration) -> Self {
        self.balloon_lag = lag;
        self
    }

    /// Lands a pending balloon change that is due at `now`.
    fn balloon_step(&mut self, now: Option<DateTime<Utc>>) {
        let Some((target, due)) = self.balloon_pending else {
            return;
        };
        if now.is_some_and(|now| now < due) {
            return;
        }
        self.balloon_pending = None;
        if let Some(live) = self.state.live.as_mut() {
            live.memory = target;
        }
    }

    /// A domain with a guest agent channel whose agent answers.
    #[must_use]
    pub fn with_agent(mut self) -> Self {
        self.agent = true;
        self
    }

    #[must_use]
    pub fn running(mut self) -> Self {
        self.state.power = PowerState::Running;
        self.run_id = Some(1);
        self.state.live = Some(LiveFigures {
            memory: self.state.memory,
            vcpus: self.state.vcpus,
        });
        self
    }

    /// A guest that ignores ACPI shutdown requests.
    #[must_use]
    pub fn stubborn(mut self) -> Self {
        self.acpi = false;
        self
    }
}

/// A mutating call as the executor made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: &'static str,
    pub uuid: String,
    /// The argument, formatted (`2GiB live+config`, `guest`, ...).
    pub arg: String,
    /// When it was made, if the hypervisor has a clock.
    pub at: Option<DateTime<Utc>>,
    /// Whether it succeeded.
    pub ok: bool,
    /// Whether it changed the domain (a repeated identical call does not).
    pub changed: bool,
    /// The failure was injected, not a rule of libvirt's.
    pub injected: bool,
}

/// A simulated process death: the call counted `at` (1-based, every call on this hypervisor)
/// panics, before or after making its change.
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    pub at: usize,
    pub after_effect: bool,
}

/// The panic payload of a simulated crash.
#[derive(Debug)]
pub struct SimulatedCrash;

/// An injected failure: calls number `from ..= from + count - 1` of `op` (1-based, counted per
/// operation name, reads included) fail with `kind`.
#[derive(Debug, Clone)]
struct Fault {
    op: &'static str,
    from: usize,
    count: usize,
    kind: ErrorKind,
    /// The change happens and then the error is reported (a lost reply).
    effect_first: bool,
}

#[derive(Debug, Default)]
struct Inner {
    domains: BTreeMap<String, FakeDomain>,
    calls: Vec<Call>,
    counts: BTreeMap<&'static str, usize>,
    faults: Vec<Fault>,
    /// Calls so far, all operations together (for crashes).
    total: usize,
    crash: Option<Crash>,
    /// Metadata elements by (UUID, namespace), as libvirt would return them.
    metadata: BTreeMap<(String, String), String>,
    /// The id the next started domain gets.
    next_run_id: u32,
    /// The host is unreachable: every call fails as a lost connection would.
    down: bool,
}

/// See the module documentation.
pub struct FakeHypervisor {
    uri: crate::uri::Uri,
    inner: Mutex<Inner>,
    clock: Option<Arc<dyn Clock>>,
}

impl std::fmt::Debug for FakeHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHypervisor")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl FakeHypervisor {
    #[must_use]
    pub fn new(uri: &str, domains: Vec<FakeDomain>) -> Self {
        let domains = domains
            .into_iter()
            .map(|d| (d.state.uuid.clone(), d))
            .collect();
        Self {
            uri: crate::uri::Uri::new(uri),
            inner: Mutex::new(Inner {
                domains,
                next_run_id: 100,
                ..Inner::default()
            }),
            clock: None,
        }
    }

    /// Stamps every recorded call with this clock's time.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finishes a transition in progress at once (QEMU completed its start-up meanwhile).
    pub fn settle_now(&self, uuid: &str) {
        self.edit(uuid, |d| {
            if let Some(s) = d.settling.take() {
                d.state.power = s.then;
            }
        });
    }

    /// Makes calls `from ..` (1-based) of `op` fail `count` times with `kind`.
    pub fn fail(&self, op: &'static str, from: usize, count: usize, kind: ErrorKind) {
        self.inner().faults.push(Fault {
            op,
            from,
            count,
            kind,
            effect_first: false,
        });
    }

    /// Like [`FakeHypervisor::fail`], but the change is made before the error is reported.
    pub fn fail_after_effect(&self, op: &'static str, from: usize, kind: ErrorKind) {
        self.inner().faults.push(Fault {
            op,
            from,
            count: 1,
            kind,
            effect_first: true,
        });
    }

    /// Makes a call panic with [`SimulatedCrash`], as if the process died there.
    pub fn crash(&self, crash: Option<Crash>) {
        let mut inner = self.inner();
        inner.crash = crash.map(|c| Crash {
            at: inner.total + c.at,
            ..c
        });
    }

    /// Counts a call; `Some(after_effect)` when it is the one that crashes.
    fn crash_point(inner: &mut Inner) -> Option<bool> {
        inner.total += 1;
        inner
            .crash
            .filter(|c| c.at == inner.total)
            .map(|c| c.after_effect)
    }

    /// Takes the whole host away (`true`: every call fails like a lost connection) or brings
    /// it back.
    pub fn set_down(&self, down: bool) {
        self.inner().down = down;
    }

    /// Whether the host is down (see [`FakeHypervisor::set_down`]).
    #[must_use]
    pub fn is_down(&self) -> bool {
        self.inner().down
    }

    /// Removes every injected failure (a reconnect that cures a lost connection).
    pub fn clear_faults(&self) {
        self.inner().faults.clear();
    }

    /// Every mutating call so far, in order.
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        self.inner().calls.clone()
    }

    /// How many times `op` (a read such as `observe`, or a change) was called so far.
    #[must_use]
    pub fn count(&self, op: &str) -> usize {
        self.inner().counts.get(op).copied().unwrap_or(0)
    }

    /// Successful mutating calls so far.
    #[must_use]
    pub fn successful_calls(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.ok).collect()
    }

    /// A copy of a domain's state.
    ///
    /// # Panics
    /// When there is no such domain.
    #[must_use]
    pub fn state(&self, uuid: &str) -> DomainState {
        self.inner().domains[uuid].state.clone()
    }

    #[must_use]
    pub fn snapshots(&self, uuid: &str) -> Vec<String> {
        self.inner()
            .domains
            .get(uuid)
            .map(|d| d.snapshots.clone())
            .unwrap_or_default()
    }

    /// Changes a domain behind the executor's back (drift, a recreated domain, ...).
    ///
    /// # Panics
    /// When there is no such domain.
    pub fn edit(&self, uuid: &str, f: impl FnOnce(&mut FakeDomain)) {
        f(self.inner().domains.get_mut(uuid).expect("no such domain"));
    }

    /// Removes a domain (the next calls on it fail with `NotFound`).
    pub fn remove(&self, uuid: &str) {
        self.inner().domains.remove(uuid);
    }

    /// Counts a call of `op` and returns the injected fault, if any.
    fn fault(inner: &mut Inner, op: &'static str) -> Option<Fault> {
        let n = {
            let count = inner.counts.entry(op).or_insert(0);
            *count += 1;
            *count
        };
        if inner.down {
            return Some(Fault {
                op,
                from: n,
                count: 1,
                kind: ErrorKind::Transient,
                effect_first: false,
            });
        }
        inner
            .faults
            .iter()
            .find(|f| f.op == op && n >= f.from && n < f.from + f.count)
            .cloned()
    }

    fn read<T>(
        &self,
        op: &'static str,
        uuid: &str,
        f: impl FnOnce(&mut FakeDomain) -> T,
    ) -> HvResult<T> {
        let mut inner = self.inner();
        if Self::crash_point(&mut inner).is_some() {
            drop(inner);
            std::panic::panic_any(SimulatedCrash);
        }
        if let Some(fault) = Self::fault(&mut inner, op) {
            return Err(HvError::new(fault.kind, format!("injected {op} failure")));
        }
        inner
            .domains
            .get_mut(uuid)
            .map(f)
            .ok_or_else(|| not_found(uuid))
    }

    /// Runs a mutating call: fault injection, the change, and the record.
    fn mutate(
        &self,
        op: &'static str,
        uuid: &str,
        arg: String,
        f: impl FnOnce(&mut FakeDomain) -> HvResult<()>,
    ) -> HvResult<()> {
        let at = self.clock.as_ref().map(|c| c.now());
        let mut inner = self.inner();
        let crash = Self::crash_point(&mut inner);
        if crash == Some(false) {
            drop(inner);
            std::panic::panic_any(SimulatedCrash);
        }
        let fault = Self::fault(&mut inner, op);
        let injected = fault.is_some();
        let before = inner
            .domains
            .get(uuid)
            .map(|d| (d.state.clone(), d.snapshots.clone()));
        let result = match &fault {
            Some(fault) if !fault.effect_first => {
                Err(HvError::new(fault.kind, format!("injected {op} failure")))
            }
            _ => {
                let applied = match inner.domains.get_mut(uuid) {
                    Some(domain) => f(domain),
                    None => Err(not_found(uuid)),
                };
                match (applied, fault) {
                    (Ok(()), Some(fault)) => Err(HvError::new(
                        fault.kind,
                        format!("injected {op} failure after the change"),
                    )),
                    (result, _) => result,
                }
            }
        };
        let after = inner
            .domains
            .get(uuid)
            .map(|d| (d.state.clone(), d.snapshots.clone()));
        inner.calls.push(Call {
            op,
            uuid: uuid.to_owned(),
            arg,
            at,
            ok: result.is_ok(),
            changed: before != after,
            injected,
        });
        if crash == Some(true) {
            drop(inner);
            std::panic::panic_any(SimulatedCrash);
        }
        result
    }
}

fn not_found(uuid: &str) -> HvError {
    HvError::new(
        ErrorKind::NotFound,
        format!("Domain not found: no domain with matching uuid '{uuid}'"),
    )
}

fn invalid(message: &str) -> HvError {
    HvError::new(ErrorKind::OperationInvalid, message)
}

fn scope_text(scope: Scope) -> &'static str {
    match (scope.live, scope.config) {
        (true, true) => "live+config",
        (true, false) => "live",
        _ => "config",
    }
}

fn xml_of(d: &FakeDomain) -> String {
    let s = &d.state;
    let mut clock = String::new();
    if let Some(c) = &s.clock {
        clock.push_str("  <clock");
        if let Some(offset) = &c.offset {
            let _ = write!(clock, " offset='{offset}'");
        }
        match &c.rtc_track {
            Some(track) => {
                let _ = write!(
                    clock,
                    ">\n    <timer name='rtc' track='{track}'/>\n  </clock>\n"
                );
            }
            None => clock.push_str("/>\n"),
        }
    }
    if let Some(l) = s.lifecycle {
        let _ = write!(
            clock,
            "  <on_poweroff>{}</on_poweroff>\n  <on_reboot>{}</on_reboot>\n",
            l.on_poweroff, l.on_reboot
        );
    }
    let devices = if d.agent {
        format!(
            "  <devices>\n    <channel type='unix'>\n      <target type='virtio' name='{}'/>\n    </channel>\n  </devices>\n",
            domain_xml::AGENT_CHANNEL
        )
    } else {
        String::new()
    };
    format!(
        "<domain type='test'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <memory unit='KiB'>{}</memory>\n  <currentMemory unit='KiB'>{}</currentMemory>\n  <vcpu current='{}'>{}</vcpu>\n{clock}{devices}</domain>\n",
        s.name, s.uuid, s.max_memory.0, s.memory.0, s.vcpus, s.max_vcpus
    )
}

impl Hypervisor for FakeHypervisor {
    fn uri(&self) -> &crate::uri::Uri {
        &self.uri
    }

    fn resolve(&self, name_or_uuid: &str) -> HvResult<DomainId> {
        let inner = self.inner();
        inner
            .domains
            .values()
            .find(|d| d.state.uuid == name_or_uuid || d.state.name == name_or_uuid)
            .map(|d| DomainId {
                name: d.state.name.clone(),
                uuid: d.state.uuid.clone(),
            })
            .ok_or_else(|| {
                HvError::new(
                    ErrorKind::NotFound,
                    format!("Domain not found: no domain with matching name '{name_or_uuid}'"),
                )
            })
    }

    fn unsettled(&self, uuid: &str) -> HvResult<Option<String>> {
        let now = self.clock.as_ref().map(|c| c.now());
        self.read("unsettled", uuid, |d| {
            let s = d.settling.clone()?;
            if now.is_none_or(|now| now >= s.until) {
                d.state.power = s.then;
                d.settling = None;
                None
            } else {
                Some(s.reason)
            }
        })
    }

    fn observe(&self, uuid: &str, with_clock: bool) -> HvResult<DomainState> {
        let now = self.clock.as_ref().map(|c| c.now());
        self.read("observe", uuid, |d| {
            d.balloon_step(now);
            let mut state = d.state.clone();
            if !with_clock {
                state.clock = None;
                state.lifecycle = None;
            }
            state
        })
    }

    fn domain_xml(&self, uuid: &str, _inactive: bool) -> HvResult<String> {
        self.read("domain_xml", uuid, |d| xml_of(d))
    }

    fn host_cpus(&self) -> HvResult<u32> {
        Ok(16)
    }

    fn snapshot_names(&self, uuid: &str) -> HvResult<Vec<String>> {
        self.read("snapshot_names", uuid, |d| d.snapshots.clone())
    }

    fn start(&self, uuid: &str) -> HvResult<()> {
        let run_id = {
            let mut inner = self.inner();
            inner.next_run_id += 1;
            inner.next_run_id
        };
        self.mutate("start", uuid, String::new(), |d| {
            if d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: domain is already running",
                ));
            }
            d.run_id = Some(run_id);
            d.state.power = PowerState::Running;
            d.state.live = Some(LiveFigures {
                memory: d.state.memory,
                vcpus: d.state.vcpus,
            });
            Ok(())
        })
    }

    fn shutdown(&self, uuid: &str) -> HvResult<()> {
        self.mutate("shutdown", uuid, String::new(), |d| {
            if !d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: domain is not running",
                ));
            }
            if d.acpi {
                d.state.power = PowerState::Shutoff;
                d.state.live = None;
                d.run_id = None;
            }
            Ok(())
        })
    }

    fn destroy(&self, uuid: &str) -> HvResult<()> {
        self.mutate("destroy", uuid, String::new(), |d| {
            if !d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: domain is not running",
                ));
            }
            d.state.power = PowerState::Shutoff;
            d.state.live = None;
            d.run_id = None;
            Ok(())
        })
    }

    fn suspend(&self, uuid: &str) -> HvResult<()> {
        self.mutate("suspend", uuid, String::new(), |d| {
            if d.state.power != PowerState::Running {
                return Err(invalid(
                    "Requested operation is not valid: domain is not running",
                ));
            }
            d.state.power = PowerState::Paused;
            Ok(())
        })
    }

    fn resume(&self, uuid: &str) -> HvResult<()> {
        self.mutate("resume", uuid, String::new(), |d| {
            if d.state.power != PowerState::Paused {
                return Err(invalid(
                    "Requested operation is not valid: domain is not paused",
                ));
            }
            d.state.power = PowerState::Running;
            Ok(())
        })
    }

    fn set_memory(&self, uuid: &str, memory: Kib, scope: Scope) -> HvResult<()> {
        let now = self.clock.as_ref().map(|c| c.now());
        self.mutate(
            "set_memory",
            uuid,
            format!("{memory} {}", scope_text(scope)),
            |d| {
                if scope.live && !d.state.power.is_active() {
                    return Err(invalid(
                        "Requested operation is not valid: domain is not running",
                    ));
                }
                if memory > d.state.max_memory {
                    return Err(HvError::new(
                        ErrorKind::InvalidArgument,
                        "invalid argument: cannot set memory higher than max memory",
                    ));
                }
                if scope.config {
                    d.state.memory = memory;
                }
                let lagging = now.filter(|_| d.balloon_lag > chrono::Duration::zero());
                if let (true, Some(now)) = (scope.live, lagging) {
                    d.balloon_pending = Some((memory, now + d.balloon_lag));
                } else if scope.live {
                    if let Some(live) = d.state.live.as_mut() {
                        live.memory = memory;
                    }
                }
                Ok(())
            },
        )
    }

    fn set_max_memory(&self, uuid: &str, max: Kib) -> HvResult<()> {
        self.mutate("set_max_memory", uuid, max.to_string(), |d| {
            if d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: cannot resize the maximum memory on an active domain",
                ));
            }
            d.state.max_memory = max;
            d.state.memory = d.state.memory.min(max);
            Ok(())
        })
    }

    fn set_vcpus(&self, uuid: &str, vcpus: u32, scope: Scope) -> HvResult<()> {
        self.mutate(
            "set_vcpus",
            uuid,
            format!("{vcpus} {}", scope_text(scope)),
            |d| {
                if scope.live && !d.state.power.is_active() {
                    return Err(invalid(
                        "Requested operation is not valid: domain is not running",
                    ));
                }
                if vcpus > d.state.max_vcpus || vcpus == 0 {
                    return Err(HvError::new(
                        ErrorKind::InvalidArgument,
                        "invalid argument: requested vcpus is greater than max allowable vcpus",
                    ));
                }
                if scope.config {
                    d.state.vcpus = vcpus;
                }
                if scope.live {
                    if let Some(live) = d.state.live.as_mut() {
                        live.vcpus = vcpus;
                    }
                }
                Ok(())
            },
        )
    }

    fn set_max_vcpus(&self, uuid: &str, max: u32) -> HvResult<()> {
        self.mutate("set_max_vcpus", uuid, max.to_string(), |d| {
            if d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: cannot change the vCPU maximum of an active domain",
                ));
            }
            d.state.max_vcpus = max;
            d.state.vcpus = d.state.vcpus.min(max);
            Ok(())
        })
    }

    fn define_xml(&self, xml: &str) -> HvResult<()> {
        let uuid = xml
            .split("<uuid>")
            .nth(1)
            .and_then(|rest| rest.split("</uuid>").next())
            .unwrap_or_default()
            .to_owned();
        let clock = domain_xml::read_clock(xml)
            .map_err(|e| HvError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let arg = format!(
            "clock offset={} track={}",
            clock.offset.as_deref().unwrap_or("-"),
            clock.rtc_track.as_deref().unwrap_or("-")
        );
        let lifecycle = domain_xml::read_lifecycle(xml)
            .map_err(|e| HvError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        self.mutate("define_xml", &uuid, arg, |d| {
            d.state.clock = Some(clock);
            d.state.lifecycle = Some(lifecycle);
            Ok(())
        })
    }

    fn set_autostart(&self, uuid: &str, on: bool) -> HvResult<()> {
        self.mutate("set_autostart", uuid, on.to_string(), |d| {
            d.state.autostart = on;
            Ok(())
        })
    }

    fn set_lifecycle(
        &self,
        uuid: &str,
        event: LifecycleEvent,
        action: LifecycleAction,
    ) -> HvResult<()> {
        self.mutate("set_lifecycle", uuid, format!("{event:?} {action}"), |d| {
            d.state
                .lifecycle
                .get_or_insert_with(Lifecycle::default)
                .set(event, action);
            Ok(())
        })
    }

    fn set_title(&self, uuid: &str, title: &str) -> HvResult<()> {
        self.mutate("set_title", uuid, title.to_owned(), |d| {
            title.clone_into(&mut d.state.title);
            Ok(())
        })
    }

    fn set_description(&self, uuid: &str, description: &str) -> HvResult<()> {
        self.mutate("set_description", uuid, description.to_owned(), |d| {
            description.clone_into(&mut d.state.description);
            Ok(())
        })
    }

    fn create_snapshot(&self, uuid: &str, name: &str, _description: Option<&str>) -> HvResult<()> {
        self.mutate("create_snapshot", uuid, name.to_owned(), |d| {
            if d.snapshots.iter().any(|s| s == name) {
                return Err(invalid("snapshot already exists"));
            }
            d.snapshots.push(name.to_owned());
            Ok(())
        })
    }

    fn list_domains(&self) -> HvResult<Vec<DomainId>> {
        if self.is_down() {
            return Err(HvError::new(
                ErrorKind::Transient,
                "injected list_domains failure",
            ));
        }
        let mut ids: Vec<DomainId> = self
            .inner()
            .domains
            .values()
            .map(|d| DomainId {
                name: d.state.name.clone(),
                uuid: d.state.uuid.clone(),
            })
            .collect();
        ids.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ids)
    }

    fn metadata_element(&self, uuid: &str, namespace: &str) -> HvResult<Option<String>> {
        self.read("metadata_element", uuid, |_| ())?;
        let key = (uuid.to_owned(), namespace.to_owned());
        Ok(self.inner().metadata.get(&key).cloned())
    }

    /// Not recorded in [`FakeHypervisor::calls`]: those are changes to the domain itself.
    fn set_metadata_element(
        &self,
        uuid: &str,
        namespace: &str,
        _prefix: &str,
        xml: Option<&str>,
    ) -> HvResult<()> {
        self.read("set_metadata_element", uuid, |_| ())?;
        let key = (uuid.to_owned(), namespace.to_owned());
        let mut inner = self.inner();
        match xml {
            Some(xml) => inner.metadata.insert(key, xml.to_owned()),
            None => inner.metadata.remove(&key),
        };
        Ok(())
    }
    fn run_id(&self, uuid: &str) -> HvResult<Option<u32>> {
        self.read("run_id", uuid, |d| d.run_id)
    }

    fn agent_shutdown(&self, uuid: &str) -> HvResult<()> {
        self.mutate("agent_shutdown", uuid, String::new(), |d| {
            if !d.state.power.is_active() {
                return Err(invalid(
                    "Requested operation is not valid: domain is not running",
                ));
            }
            if !d.agent {
                return Err(agent_missing());
            }
            d.state.power = PowerState::Shutoff;
            d.state.live = None;
            d.run_id = None;
            Ok(())
        })
    }

    fn agent_ping(&self, uuid: &str, _timeout: std::time::Duration) -> HvResult<()> {
        self.read("agent_ping", uuid, |d| {
            if d.agent && d.state.power == PowerState::Running {
                Ok(())
            } else {
                Err(agent_missing())
            }
        })?
    }

    fn set_guest_time(&self, uuid: &str, time: DateTime<Utc>) -> HvResult<()> {
        self.mutate("set_guest_time", uuid, time.to_rfc3339(), |d| {
            if !(d.agent && d.state.power == PowerState::Running) {
                return Err(agent_missing());
            }
            d.guest_time = Some(time);
            Ok(())
        })
    }
}

fn agent_missing() -> HvError {
    HvError::new(
        ErrorKind::Transient,
        "Guest agent is not responding: QEMU guest agent is not connected",
    )
}
