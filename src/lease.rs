//! Domain leases: before acting on a domain an executor writes a lease into that domain's own
//! libvirt metadata, so two plans or two admin hosts never act on one domain at once, without
//! any store besides libvirt.
//!
//! The lease is one element in the virtplan XML namespace ([`NAMESPACE`]) of the domain's
//! persistent definition: who holds it (host, pid, a random token that tells two executors of
//! one process apart), for which plan, and until when.
//!
//! libvirt's metadata has no compare-and-set, so taking a lease is Fischer's timed mutual
//! exclusion protocol ([`Leaser::try_acquire`]): read; write our record only if there is none,
//! it is ours, or it expired; wait a settle delay far longer than one read-to-write round trip;
//! read again and act only if the surviving record is ours. Two contenders that both read
//! "free" both write, and the last writer wins; each waits `settle` after its own write, so the
//! loser sees the winner's record and backs off. This holds when
//! - every contender's read-to-write time is below `settle` (each contender checks its own:
//!   one that took longer than [`LeaseConfig::max_write_delay`] backs off without acting);
//! - the hosts' clocks agree within [`LeaseConfig::max_skew`] (expiry is an absolute time);
//! - no holder stalls longer than its lease's remaining time between renewals.
//!
//! A round comes in two halves, [`Leaser::begin`] (read, write) and [`Leaser::confirm`] (read
//! back), so a caller can wait out the settle delay without holding a thread (the executor
//! hands the domain back to its scheduler; [`Leaser::try_acquire`] just sleeps). The argument
//! above needs the read-back to come *at least* `settle` after our write, never earlier, and
//! a later one is as good provided our record is still alive when it is read: once it has
//! expired (plus the skew margin) a third contender may take it over legitimately. So
//! `confirm`
//! - refuses to read before `settle` has passed since the write, measured on the clock's
//!   monotonic reading ([`Clock::monotonic`]): a wall clock stepped forward cannot shorten the
//!   wait, one stepped back does not lengthen it;
//! - takes the lease only while our record is at most one renewal period old
//!   ([`LeaseConfig::renew_every`], a third of `ttl`) by that reading, and has at least
//!   `ttl - renew_every` to live by the wall clock: the holder's renewals, counted from the
//!   write, then keep it alive exactly as for a lease read back on time. A later read-back
//!   (the caller's workers were busy) begins again, which rewrites the record and waits
//!   `settle` once more.
//!
//! Hence one more bound: `settle` must be well below a third of `ttl` (the configuration
//! checks it), or no read-back would ever be young enough.
//!
//! The README states these assumptions and the consensus store to use when they cannot hold.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use crate::clock::Clock;
use crate::hypervisor::{HvError, Hypervisor};

/// The XML namespace of virtplan's lease element in a domain's `<metadata>`.
pub const NAMESPACE: &str = "https://virtplan.dev/xmlns/lease/1";

/// The namespace prefix libvirt writes for it (`<virtplan:lease ...>` in `virsh dumpxml`).
pub const PREFIX: &str = "virtplan";

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The admin host's name.
    pub host: String,
    pub pid: u32,
    /// Random per executor: two executors in one process, or a reused pid, differ here.
    pub token: String,
    /// The plan the holder runs (its file's path on the holder's host).
    pub plan: String,
}

impl Holder {
    /// This process, running `plan`, with a fresh random token.
    #[must_use]
    pub fn this_process(plan: impl Into<String>) -> Self {
        Self {
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            token: format!("{:016x}", fastrand::u64(..)),
            plan: plan.into(),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} on {} (plan {})", self.pid, self.host, self.plan)
    }
}

/// One lease record as stored in a domain's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: Holder,
    pub expires: DateTime<Utc>,
}

/// Timing of the protocol. See the module documentation for what each bound protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a written lease lives without renewal.
    pub ttl: Duration,
    /// How long a contender waits between writing its record and reading it back.
    pub settle: Duration,
    /// The longest read-to-write time a contender accepts of itself; above it, it backs off.
    /// Must stay well below `settle`.
    pub max_write_delay: Duration,
    /// How far apart the admin hosts' clocks may be: a lease counts as expired only this
    /// long after its expiry time.
    pub max_skew: Duration,
    /// How long a loser waits before trying again.
    pub retry: Duration,
    /// This executor holds its plan's executor lock on this host, so a lease of the same plan
    /// and host held by another pid whose process is gone was left by a dead executor and may
    /// be taken over at once. (A live one is another executor of the plan, which a second
    /// `state_dir` gives a lock of its own: it is waited for like any rival.)
    pub own_plan_exclusive: bool,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            settle: Duration::from_millis(300),
            max_write_delay: Duration::from_millis(100),
            max_skew: Duration::from_secs(5),
            retry: Duration::from_secs(1),
            own_plan_exclusive: false,
        }
    }
}

impl LeaseConfig {
    /// `settle` from virtplan.toml; the accepted read-to-write time is a third of it, so a
    /// settle delay always outlasts any contender's accepted write by the same margin.
    #[must_use]
    pub fn with_settle(self, settle: Duration) -> Self {
        Self {
            settle,
            max_write_delay: settle / 3,
            ..self
        }
    }

    /// How often a held lease is renewed: a third of its lifetime, so two renewals may fail
    /// before it lapses.
    #[must_use]
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// Why a lease operation could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read or write the lease of domain {uuid}: {source}")]
    Libvirt {
        uuid: String,
        #[source]
        source: HvError,
    },
    #[error(
        "domain {uuid} carries a virtplan lease this version cannot read ({detail}); if no \
         executor is running on it, remove it with `virsh metadata DOMAIN --uri {NAMESPACE} \
         --remove --config`"
    )]
    Unreadable { uuid: String, detail: String },
}

/// One try at taking a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Ours until `expires` (renew before then).
    Acquired { expires: DateTime<Utc> },
    /// Another holder's live lease; try again after it expires or is released.
    Busy(Lease),
    /// Our own read-to-write took longer than the protocol allows: we back off without acting.
    Slow { took: Duration },
}

/// Our record, written by [`Leaser::begin`]: what [`Leaser::confirm`] checks it against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// When the write returned (wall clock).
    pub at: DateTime<Utc>,
    /// The same moment by the clock's monotonic reading ([`Clock::monotonic`]).
    pub ticks: DateTime<Utc>,
}

impl Written {
    /// When the record may be read back: `settle` after the write, by the monotonic reading.
    #[must_use]
    pub fn settled(&self, settle: Duration) -> DateTime<Utc> {
        crate::clock::later(self.ticks, settle)
    }
}

/// How [`Leaser::begin`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Our record is written: read it back with [`Leaser::confirm`] `settle` after `at`.
    Written(Written),
    /// Another holder's live lease: nothing was written.
    Busy(Lease),
    /// Our own read-to-write took longer than the protocol allows: we back off without acting
    /// (our record is left to expire).
    Slow { took: Duration },
}

/// What [`Leaser::confirm`] read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    /// Ours until `expires` (renew, counting from the write, before then).
    Acquired { expires: DateTime<Utc> },
    /// A rival's record replaced ours: it won; we back off.
    Busy(Lease),
    /// The record is gone (its previous holder removed it, racing us): begin again.
    Gone,
    /// Called before `settle` had passed since the write: nothing was read; call again at
    /// `until` (a monotonic reading).
    Early { until: DateTime<Utc> },
    /// Read back `age` after the write: too late to trust our record to outlive the renewal
    /// schedule. Not taken; begin again (which renews it before the next read-back).
    Stale { age: Duration },
}

/// How [`Leaser::acquire_until`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquisition {
    /// Ours until `expires`; `waited_for` is the first rival that made us wait, if any.
    Acquired {
        expires: DateTime<Utc>,
        waited_for: Option<Lease>,
    },
    /// The deadline passed (or we were stopped); the last rival seen, if any.
    GaveUp(Option<Lease>),
}

/// What a renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    Renewed {
        expires: DateTime<Utc>,
    },
    /// The record is someone else's or gone: our lease lapsed.
    Lost(Option<Lease>),
}

/// Where lease records live: one text register per domain. The protocol needs nothing more,
/// which is the point (libvirt offers no compare-and-set).
pub trait Register: Sync {
    fn get(&self, uuid: &str) -> Result<Option<String>, HvError>;
    fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError>;
}

/// The lease element in a domain's libvirt metadata.
pub struct Metadata<'a>(pub &'a dyn Hypervisor);

impl Register for Metadata<'_> {
    fn get(&self, uuid: &str) -> Result<Option<String>, HvError> {
        self.0.metadata_element(uuid, NAMESPACE)
    }

    fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError> {
        self.0.set_metadata_element(uuid, NAMESPACE, PREFIX, xml)
    }
}

/// Whether a process with this id runs on this host (its `/proc` entry exists). A reused id
/// reads as alive, which only makes a takeover wait for the lease to expire.
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The lease protocol on one connection.
pub struct Leaser<'a> {
    pub register: &'a dyn Register,
    pub clock: &'a dyn Clock,
    pub me: &'a Holder,
    pub config: &'a LeaseConfig,
}

impl<'a> Leaser<'a> {
    #[must_use]
    pub fn new(
        register: &'a dyn Register,
        clock: &'a dyn Clock,
        me: &'a Holder,
        config: &'a LeaseConfig,
    ) -> Self {
        Self {
            register,
            clock,
            me,
            config,
        }
    }

    /// The domain's current lease record, if any.
    pub fn read(&self, uuid: &str) -> Result<Option<Lease>, LeaseError> {
        let xml = self
            .register
            .get(uuid)
            .map_err(|source| LeaseError::Libvirt {
                uuid: uuid.to_owned(),
                source,
            })?;
        xml.map(|xml| {
            Lease::parse(&xml).map_err(|detail| LeaseError::Unreadable {
                uuid: uuid.to_owned(),
                detail,
            })
        })
        .transpose()
    }

    fn write(&self, uuid: &str, lease: Option<&Lease>) -> Result<(), LeaseError> {
        let xml = lease.map(Lease::to_xml);
        self.register
            .set(uuid, xml.as_deref())
            .map_err(|source| LeaseError::Libvirt {
                uuid: uuid.to_owned(),
                source,
            })
    }

    /// Whether `lease` no longer keeps us out at `now`.
    fn is_free(&self, lease: &Lease, now: DateTime<Utc>) -> bool {
        let ours = lease.holder == *self.me;
        let skew = crate::clock::span(self.config.max_skew);
        let expired = lease
            .expires
            .checked_add_signed(skew)
            .is_none_or(|limit| now > limit);
        let left_by_dead_self = self.config.own_plan_exclusive
            && lease.holder.host == self.me.host
            && lease.holder.plan == self.me.plan
            && lease.holder.pid != self.me.pid
            && !process_exists(lease.holder.pid);
        ours || expired || left_by_dead_self
    }

    fn fresh_lease(&self, now: DateTime<Utc>) -> Lease {
        Lease {
            holder: self.me.clone(),
            expires: crate::clock::later(now, self.config.ttl),
        }
    }

    /// One round of Fischer's protocol: read, write if free, settle, read back
    /// ([`Leaser::begin`], a sleep of `settle`, [`Leaser::confirm`]).
    pub fn try_acquire(&self, uuid: &str) -> Result<Attempt, LeaseError> {
        let written = match self.begin(uuid)? {
            Begun::Written(written) => written,
            Begun::Busy(rival) => return Ok(Attempt::Busy(rival)),
            Begun::Slow { took } => return Ok(Attempt::Slow { took }),
        };
        self.clock.sleep(self.config.settle);
        loop {
            match self.confirm(uuid, &written)? {
                Confirmed::Acquired { expires } => return Ok(Attempt::Acquired { expires }),
                Confirmed::Busy(rival) => return Ok(Attempt::Busy(rival)),
                Confirmed::Gone => {
                    return Ok(Attempt::Slow {
                        took: self.config.settle,
                    })
                }
                Confirmed::Stale { age } => return Ok(Attempt::Slow { took: age }),
                // The clock says the delay has not passed yet (a stepped clock): wait the rest.
                Confirmed::Early { until } => self.clock.sleep(
                    (until - self.clock.monotonic())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .max(Duration::from_millis(1)),
                ),
            }
        }
    }

    /// The first half of a round: read; if free, write our record and say when it was
    /// written. The caller waits `settle` (without holding anything: an executor hands the
    /// domain back to its scheduler) and then calls [`Leaser::confirm`].
    pub fn begin(&self, uuid: &str) -> Result<Begun, LeaseError> {
        let started = self.clock.monotonic();
        if let Some(current) = self.read(uuid)? {
            if !self.is_free(&current, self.clock.now()) {
                return Ok(Begun::Busy(current));
            }
        }
        let mine = self.fresh_lease(self.clock.now());
        self.write(uuid, Some(&mine))?;
        let done = self.clock.monotonic();
        let took = (done - started).to_std().unwrap_or(Duration::ZERO);
        if took > self.config.max_write_delay {
            // Our write may have landed after a rival's settle delay ran out: it may already
            // act. Leave the record (removing it could free the domain for a third party
            // while that rival acts); it expires, or the rival's renewal overwrites it.
            return Ok(Begun::Slow { took });
        }
        Ok(Begun::Written(Written {
            at: self.clock.now(),
            ticks: done,
        }))
    }

    /// The second half: once `settle` has passed since `written` (by the clock's monotonic
    /// reading, so a wall clock stepped forward cannot shorten it), read the record back and
    /// take the lease only if it is still ours and young enough that the holder's renewals
    /// (every [`LeaseConfig::renew_every`], counted from the write) keep it alive: a
    /// read-back that comes later than that (the caller was held up) begins again rather than
    /// trust a record another executor may soon see expire.
    pub fn confirm(&self, uuid: &str, written: &Written) -> Result<Confirmed, LeaseError> {
        let settled = written.settled(self.config.settle);
        if self.clock.monotonic() < settled {
            return Ok(Confirmed::Early { until: settled });
        }
        let lease = self.read(uuid)?;
        let age = (self.clock.monotonic() - written.ticks)
            .to_std()
            .unwrap_or(Duration::ZERO);
        match lease {
            Some(lease) if lease.holder == *self.me => {
                // Our record must have at least the life left that a renewal leaves it, by
                // both clocks (rivals judge its expiry by their wall clocks).
                let left = lease.expires - self.clock.now();
                let floor =
                    crate::clock::span(self.config.ttl.saturating_sub(self.config.renew_every()));
                if age > self.config.renew_every() || left < floor {
                    return Ok(Confirmed::Stale { age });
                }
                Ok(Confirmed::Acquired {
                    expires: lease.expires,
                })
            }
            Some(rival) => Ok(Confirmed::Busy(rival)),
            // Removed meanwhile by its previous holder, racing us: go round again.
            None => Ok(Confirmed::Gone),
        }
    }

    /// Tries until the lease is ours, `deadline` passes or `stop` says so.
    pub fn acquire_until(
        &self,
        uuid: &str,
        deadline: DateTime<Utc>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Acquisition, LeaseError> {
        let mut first_rival: Option<Lease> = None;
        let mut last_rival: Option<Lease> = None;
        loop {
            match self.try_acquire(uuid)? {
                Attempt::Acquired { expires } => {
                    return Ok(Acquisition::Acquired {
                        expires,
                        waited_for: first_rival,
                    })
                }
                Attempt::Busy(rival) => {
                    first_rival.get_or_insert_with(|| rival.clone());
                    last_rival = Some(rival);
                }
                Attempt::Slow { .. } => {}
            }
            let now = self.clock.now();
            if now >= deadline || stop() {
                return Ok(Acquisition::GaveUp(last_rival));
            }
            // Jitter, so two losers do not meet again in lockstep.
            let jitter = self.config.retry.mul_f64(fastrand::f64() * 0.5);
            let wait = (self.config.retry + jitter)
                .min((deadline - now).to_std().unwrap_or(Duration::ZERO));
            self.clock.sleep(wait);
        }
    }

    /// Extends our lease, if it is still ours.
    pub fn renew(&self, uuid: &str) -> Result<Renewal, LeaseError> {
        match self.read(uuid)? {
            Some(lease) if lease.holder == *self.me => {
                let fresh = self.fresh_lease(self.clock.now());
                self.write(uuid, Some(&fresh))?;
                Ok(Renewal::Renewed {
                    expires: fresh.expires,
                })
            }
            other => Ok(Renewal::Lost(other)),
        }
    }

    /// Removes our lease; someone else's record is left alone. Returns whether ours was there.
    pub fn release(&self, uuid: &str) -> Result<bool, LeaseError> {
        match self.read(uuid)? {
            Some(lease) if lease.holder == *self.me => {
                self.write(uuid, None)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl Lease {
    /// The metadata element, escaped by the XML writer. libvirt adds the namespace.
    #[must_use]
    pub fn to_xml(&self) -> String {
        let mut w = Writer::new(Vec::new());
        let pid = self.holder.pid.to_string();
        let expires = self.expires.to_rfc3339_opts(SecondsFormat::Millis, true);
        // Writing into a Vec cannot fail.
        let _ = w.write_event(Event::Start(
            BytesStart::new("lease").with_attributes([("version", "1")]),
        ));
        let _ = w.write_event(Event::Empty(BytesStart::new("holder").with_attributes([
            ("host", self.holder.host.as_str()),
            ("pid", pid.as_str()),
            ("token", self.holder.token.as_str()),
        ])));
        for (tag, text) in [("plan", self.holder.plan.as_str()), ("expires", &expires)] {
            let _ = w.write_event(Event::Start(BytesStart::new(tag)));
            let _ = w.write_event(Event::Text(BytesText::new(text)));
            let _ = w.write_event(Event::End(BytesEnd::new(tag)));
        }
        let _ = w.write_event(Event::End(BytesEnd::new("lease")));
        String::from_utf8_lossy(&w.into_inner()).into_owned()
    }

    /// Reads an element written by [`Lease::to_xml`] (as libvirt returns it, with its
    /// namespace declaration); the error says what is wrong.
    pub fn parse(xml: &str) -> Result<Self, String> {
        let mut reader = Reader::from_str(xml);
        let mut host = None;
        let mut pid = None;
        let mut token = None;
        let mut plan = None;
        let mut expires = None;
        let mut version = None;
        let mut open: Option<Vec<u8>> = None;
        loop {
            let event = reader.read_event().map_err(|e| format!("not XML: {e}"))?;
            match event {
                Event::Start(e) | Event::Empty(e) => {
                    let name = e.local_name().as_ref().to_vec();
                    for attr in e.attributes() {
                        let attr = attr.map_err(|e| format!("bad attribute: {e}"))?;
                        let value = attr
                            .unescape_value()
                            .map_err(|e| format!("bad attribute: {e}"))?
                            .into_owned();
                        match (name.as_slice(), attr.key.local_name().as_ref()) {
                            (b"lease", b"version") => version = Some(value),
                            (b"holder", b"host") => host = Some(value),
                            (b"holder", b"pid") => pid = Some(value),
                            (b"holder", b"token") => token = Some(value),
                            _ => {}
                        }
                    }
                    open = Some(name);
                }
                Event::Text(t) => {
                    let text = t.unescape().map_err(|e| format!("bad text: {e}"))?;
                    match open.as_deref() {
                        Some(b"plan") => plan = Some(text.into_owned()),
                        Some(b"expires") => expires = Some(text.trim().to_owned()),
                        _ => {}
                    }
                }
                Event::End(_) => open = None,
                Event::Eof => break,
                _ => {}
            }
        }
        if version.as_deref() != Some("1") {
            return Err(format!(
                "lease format version {}, expected 1",
                version.as_deref().unwrap_or("missing")
            ));
        }
        let missing = |what: &str| format!("no {what}");
        let pid = pid.ok_or_else(|| missing("holder pid"))?;
        let expires = expires.ok_or_else(|| missing("expiry"))?;
        Ok(Self {
            holder: Holder {
                host: host.ok_or_else(|| missing("holder host"))?,
                pid: pid
                    .parse()
                    .map_err(|_| format!("holder pid {pid:?} is not a number"))?,
                token: token.ok_or_else(|| missing("holder token"))?,
                plan: plan.unwrap_or_default(),
            },
            expires: DateTime::parse_from_rfc3339(&expires)
                .map_err(|e| format!("expiry {expires:?}: {e}"))?
                .with_timezone(&Utc),
        })
    }
}

#[cfg(test)]
mod tests;
