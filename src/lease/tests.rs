//! The lease protocol against libvirt's test driver (the metadata really goes through
//! virDomainSetMetadata / virDomainGetMetadata), on the fake clock.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::clock::FakeClock;
use crate::hypervisor::fleet::{write_fleet, FleetDomain};

const UUID: &str = "6f2f4a57-0b0c-4c1e-9a8e-000000000001";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn holder(host: &str, pid: u32, token: &str) -> Holder {
    Holder {
        host: host.to_owned(),
        pid,
        token: token.to_owned(),
        plan: "/srv/plans/web.yaml".to_owned(),
    }
}

/// Begins a round on [`UUID`], which must write our record.
fn begin_written(leaser: &Leaser<'_>) -> Written {
    match leaser.begin(UUID).unwrap() {
        Begun::Written(written) => written,
        other => panic!("not written: {other:?}"),
    }
}

/// A test-driver host with one running domain (the tempdir must outlive the connection).
fn libvirt() -> (tempfile::TempDir, Arc<dyn Hypervisor>) {
    let dir = tempfile::tempdir().unwrap();
    let uri = write_fleet(
        dir.path(),
        &[FleetDomain::new("web-01").uuid(UUID).running(true)],
    )
    .unwrap();
    let hv = crate::ops::connect(&uri.into()).unwrap();
    (dir, hv)
}

fn config() -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_secs(30),
        settle: Duration::from_secs(2),
        max_write_delay: Duration::from_millis(500),
        max_skew: Duration::from_secs(5),
        retry: Duration::from_secs(3),
        own_plan_exclusive: false,
    }
}

/// What most tests start from: the fake clock at 04:00, us (`admin1`, pid 10), [`config`].
struct Us {
    clock: FakeClock,
    me: Holder,
    config: LeaseConfig,
}

impl Us {
    fn new() -> Self {
        Self {
            clock: FakeClock::new(t("2026-12-01T04:00:00Z")),
            me: holder("admin1", 10, "a"),
            config: config(),
        }
    }

    /// Our leaser over `register`.
    fn leaser<'a>(&'a self, register: &'a dyn Register) -> Leaser<'a> {
        Leaser::new(register, &self.clock, &self.me, &self.config)
    }
}

/// Each leaser tries to acquire [`UUID`] on a thread of its own, all together once `start` (if
/// any) lets them go; returns their attempts, in order.
fn race<'a>(leasers: impl Iterator<Item = Leaser<'a>>, start: Option<&Barrier>) -> Vec<Attempt> {
    std::thread::scope(|s| {
        let handles: Vec<_> = leasers
            .map(|leaser| {
                s.spawn(move || {
                    if let Some(start) = start {
                        start.wait();
                    }
                    leaser.try_acquire(UUID).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// How many of `attempts` acquired the lease.
fn winners(attempts: &[Attempt]) -> usize {
    attempts
        .iter()
        .filter(|r| matches!(r, Attempt::Acquired { .. }))
        .count()
}

/// `leaser` acquires the lease on [`UUID`] now.
fn assert_acquires(leaser: &Leaser<'_>) {
    let attempt = leaser.try_acquire(UUID).unwrap();
    assert!(matches!(attempt, Attempt::Acquired { .. }), "{attempt:?}");
}

#[test]
fn lease_xml_round_trips_with_awkward_text() {
    let lease = Lease {
        holder: Holder {
            host: "admin<1>&co".to_owned(),
            pid: 4242,
            token: "00ff".to_owned(),
            plan: "/srv/plans/a \"b\" & <c>.yaml".to_owned(),
        },
        expires: t("2026-12-01T04:00:30.250Z"),
    };
    assert_eq!(Lease::parse(&lease.to_xml()).unwrap(), lease);
}

#[test]
fn lease_element_is_stored_in_the_domains_libvirt_metadata() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    assert_eq!(
        leaser.try_acquire(UUID).unwrap(),
        Attempt::Acquired {
            expires: t("2026-12-01T04:00:30Z")
        }
    );
    // What `virsh dumpxml --inactive` shows: our namespace, the holder, the expiry.
    let xml = hv.domain_xml(UUID, true).unwrap();
    assert!(xml.contains(NAMESPACE), "{xml}");
    assert!(xml.contains("<virtplan:lease"), "{xml}");
    assert!(xml.contains("2026-12-01T04:00:30.000Z"), "{xml}");
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, us.me);
    assert!(leaser.release(UUID).unwrap());
    assert_eq!(leaser.read(UUID).unwrap(), None);
    assert!(!hv.domain_xml(UUID, true).unwrap().contains(NAMESPACE));
}

/// Both contenders read "free" before either writes (a barrier holds each read and each write
/// until the other's is done too): both write, and after the settle delay exactly one sees its
/// own record; the other backs off.
#[test]
fn two_contenders_that_both_read_free_never_both_acquire() {
    struct Lockstep<'a> {
        inner: Metadata<'a>,
        barrier: Barrier,
    }
    impl Register for Lockstep<'_> {
        fn get(&self, uuid: &str) -> Result<Option<String>, HvError> {
            let value = self.inner.get(uuid);
            self.barrier.wait();
            value
        }
        /// Both writes land before either contender reads back: what a settle delay longer
        /// than every read-to-write time guarantees in real time.
        fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError> {
            let result = self.inner.set(uuid, xml);
            self.barrier.wait();
            result
        }
    }
    let (_dir, hv) = libvirt();
    for round in 0..5 {
        let register = Lockstep {
            inner: Metadata(hv.as_ref()),
            barrier: Barrier::new(2),
        };
        // One clock each: a shared fake clock would count the rival's settle delay as ours.
        let clocks = [
            FakeClock::new(t("2026-12-01T04:00:00Z")),
            FakeClock::new(t("2026-12-01T04:00:00Z")),
        ];
        let config = config();
        let a = holder("admin1", 10, "a");
        let b = holder("admin2", 10, "b");
        let leasers = [&a, &b]
            .into_iter()
            .zip(&clocks)
            .map(|(me, clock)| Leaser::new(&register, clock, me, &config));
        let results = race(leasers, None);
        assert_eq!(winners(&results), 1, "round {round}: {results:?}");
        let lost = results
            .iter()
            .find_map(|r| match r {
                Attempt::Busy(rival) => Some(rival.holder.clone()),
                _ => None,
            })
            .unwrap();
        let winner = Metadata(hv.as_ref()).get(UUID).unwrap().unwrap();
        assert_eq!(Lease::parse(&winner).unwrap().holder, lost, "round {round}");
        Metadata(hv.as_ref()).set(UUID, None).unwrap();
    }
}

/// Many executors start at once on one domain (real threads, real libvirt, a short real
/// settle delay): exactly one acquires.
#[test]
fn eight_racing_contenders_on_the_system_clock_elect_exactly_one() {
    let (_dir, hv) = libvirt();
    let clock = crate::clock::SystemClock;
    let config = LeaseConfig {
        settle: Duration::from_millis(300),
        max_write_delay: Duration::from_millis(100),
        ..config()
    };
    let holders: Vec<Holder> = (0..8)
        .map(|i| holder("admin1", i, &i.to_string()))
        .collect();
    let start = Barrier::new(holders.len());
    let register = Metadata(hv.as_ref());
    let leasers = holders
        .iter()
        .map(|me| Leaser::new(&register, &clock, me, &config));
    let results = race(leasers, Some(&start));
    // A contender whose own write was slow backs off; it never acts.
    assert_eq!(winners(&results), 1, "{results:?}");
}

#[test]
fn a_live_lease_of_another_holder_keeps_us_out_until_the_deadline() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let rival = holder("admin2", 77, "r");
    let register = Metadata(hv.as_ref());
    Leaser::new(&register, &us.clock, &rival, &us.config)
        .try_acquire(UUID)
        .unwrap();
    let leaser = us.leaser(&register);
    let deadline = t("2026-12-01T04:00:20Z");
    let outcome = leaser.acquire_until(UUID, deadline, &|| false).unwrap();
    let Acquisition::GaveUp(Some(rival_lease)) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(rival_lease.holder, rival);
    assert!(us.clock.now() >= deadline);
    // Nothing of ours was written.
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, rival);
}

#[test]
fn an_expired_lease_is_taken_over_once_the_clock_skew_margin_passed() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let dead = Lease {
        holder: holder("admin2", 77, "dead"),
        expires: t("2026-12-01T03:59:57Z"),
    };
    register.set(UUID, Some(&dead.to_xml())).unwrap();
    let leaser = us.leaser(&register);
    // Expired 3 s ago, but clocks may be 5 s apart: not yet.
    assert_eq!(leaser.try_acquire(UUID).unwrap(), Attempt::Busy(dead));
    us.clock.advance(chrono::Duration::seconds(3));
    assert_acquires(&leaser);
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, us.me);
}

/// A process id no host ever gives out (Linux's ceiling is 2^22): its executor is gone.
const DEAD_PID: u32 = u32::MAX - 1;

#[test]
fn a_lease_left_by_a_dead_executor_of_the_same_plan_on_this_host_is_taken_over_at_once() {
    let (_dir, hv) = libvirt();
    let clock = FakeClock::new(t("2026-12-01T04:00:00Z"));
    let register = Metadata(hv.as_ref());
    let left = Lease {
        holder: holder("admin1", DEAD_PID, "old"),
        expires: t("2026-12-01T04:00:50Z"),
    };
    register.set(UUID, Some(&left.to_xml())).unwrap();
    let me = holder("admin1", 10, "new");
    let plain = config();
    let leaser = |config| Leaser::new(&register, &clock, &me, config);
    assert_eq!(
        leaser(&plain).try_acquire(UUID).unwrap(),
        Attempt::Busy(left)
    );
    let exclusive = LeaseConfig {
        own_plan_exclusive: true,
        ..plain
    };
    assert_acquires(&leaser(&exclusive));
    // Another plan's live lease on this host is still respected.
    let other_plan = Lease {
        holder: Holder {
            plan: "/srv/plans/db.yaml".to_owned(),
            ..holder("admin1", 11, "db")
        },
        expires: t("2026-12-01T04:05:00Z"),
    };
    register.set(UUID, Some(&other_plan.to_xml())).unwrap();
    assert_eq!(
        leaser(&exclusive).try_acquire(UUID).unwrap(),
        Attempt::Busy(other_plan)
    );
}

/// The same plan on this host, held by a process that is alive: another executor of the plan
/// (run with another `state_dir`, so with an executor lock of its own), not a dead one. Its
/// lease is waited for; taking it over let both act on the domain at once.
#[test]
fn a_live_executor_of_the_same_plan_on_this_host_keeps_its_lease() {
    let (_dir, hv) = libvirt();
    let clock = FakeClock::new(t("2026-12-01T04:00:00Z"));
    let register = Metadata(hv.as_ref());
    let alive = Lease {
        holder: holder("admin1", std::process::id(), "other-state-dir"),
        expires: t("2026-12-01T04:00:50Z"),
    };
    register.set(UUID, Some(&alive.to_xml())).unwrap();
    let me = holder("admin1", DEAD_PID - 1, "new");
    let exclusive = LeaseConfig {
        own_plan_exclusive: true,
        ..config()
    };
    let leaser = Leaser::new(&register, &clock, &me, &exclusive);
    assert_eq!(
        leaser.try_acquire(UUID).unwrap(),
        Attempt::Busy(alive.clone())
    );
    // Once it has expired (with the skew margin) it is taken over, as any rival's.
    clock.advance(chrono::Duration::seconds(56));
    assert_acquires(&leaser);
}

#[test]
fn a_contender_whose_own_write_was_slow_backs_off_without_acting_or_erasing() {
    struct Slow<'a> {
        inner: Metadata<'a>,
        clock: &'a FakeClock,
    }
    impl Register for Slow<'_> {
        fn get(&self, uuid: &str) -> Result<Option<String>, HvError> {
            self.inner.get(uuid)
        }
        fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError> {
            self.clock.advance(chrono::Duration::milliseconds(800));
            self.inner.set(uuid, xml)
        }
    }
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Slow {
        inner: Metadata(hv.as_ref()),
        clock: &us.clock,
    };
    let leaser = us.leaser(&register);
    assert_eq!(
        leaser.try_acquire(UUID).unwrap(),
        Attempt::Slow {
            took: Duration::from_millis(800)
        }
    );
    assert!(leaser.read(UUID).unwrap().is_some());
}

#[test]
fn renew_extends_our_lease_and_reports_a_lost_one() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    assert_acquires(&leaser);
    us.clock.advance(chrono::Duration::seconds(10));
    assert_eq!(
        leaser.renew(UUID).unwrap(),
        Renewal::Renewed {
            expires: t("2026-12-01T04:00:42Z")
        }
    );
    // Someone took it over (we stalled past expiry): renewal says so and writes nothing.
    let thief = Lease {
        holder: holder("admin2", 5, "t"),
        expires: t("2026-12-01T04:01:30Z"),
    };
    register.set(UUID, Some(&thief.to_xml())).unwrap();
    assert_eq!(
        leaser.renew(UUID).unwrap(),
        Renewal::Lost(Some(thief.clone()))
    );
    // Release leaves someone else's record alone.
    assert!(!leaser.release(UUID).unwrap());
    assert_eq!(leaser.read(UUID).unwrap(), Some(thief));
}

#[test]
fn an_unreadable_lease_is_an_error_that_says_how_to_remove_it() {
    let (_dir, hv) = libvirt();
    let register = Metadata(hv.as_ref());
    register
        .set(UUID, Some("<lease version='9'><future/></lease>"))
        .unwrap();
    let us = Us::new();
    let leaser = us.leaser(&register);
    let err = leaser.try_acquire(UUID).unwrap_err().to_string();
    assert!(err.contains("version 9"), "{err}");
    assert!(err.contains("virsh metadata"), "{err}");
    assert!(err.contains(UUID), "{err}");
}

#[test]
fn leases_live_in_the_persistent_definition_across_power_changes() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    assert_acquires(&leaser);
    hv.destroy(UUID).unwrap();
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, us.me);
    hv.start(UUID).unwrap();
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, us.me);
}

/// The two halves of a round, as the executor uses them (the settle delay waited by its
/// scheduler): a read-back before the delay passed reads nothing and says when to come back;
/// one on time takes the lease; the expiry is the record's.
#[test]
fn confirm_reads_back_only_once_the_settle_delay_has_passed() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    let written = begin_written(&leaser);
    assert_eq!(leaser.read(UUID).unwrap().unwrap().holder, us.me);
    us.clock.advance(chrono::Duration::milliseconds(1999));
    assert_eq!(
        leaser.confirm(UUID, &written).unwrap(),
        Confirmed::Early {
            until: t("2026-12-01T04:00:02Z")
        }
    );
    us.clock.advance(chrono::Duration::milliseconds(1));
    assert_eq!(
        leaser.confirm(UUID, &written).unwrap(),
        Confirmed::Acquired {
            expires: t("2026-12-01T04:00:30Z")
        }
    );
}

/// A clock stepped back a minute while the record settles cannot make the read-back early,
/// and the delay still ends `settle` after the write by the clock's monotonic reading.
#[test]
fn a_clock_stepped_back_during_the_settle_delay_does_not_shorten_it() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    let written = begin_written(&leaser);
    us.clock.advance(chrono::Duration::seconds(-60));
    assert!(matches!(
        leaser.confirm(UUID, &written).unwrap(),
        Confirmed::Early { .. }
    ));
}

/// A read-back later than one renewal period after the write (the caller's workers were all
/// busy) does not trust the record: another executor may soon see it expire. Beginning again
/// rewrites it, and a read-back on time takes it.
#[test]
fn a_read_back_later_than_a_renewal_period_is_stale_and_a_new_round_takes_the_lease() {
    let (_dir, hv) = libvirt();
    let us = Us::new();
    let register = Metadata(hv.as_ref());
    let leaser = us.leaser(&register);
    let written = begin_written(&leaser);
    // ttl 30 s: renewed every 10 s.
    us.clock.advance(chrono::Duration::milliseconds(10_001));
    assert_eq!(
        leaser.confirm(UUID, &written).unwrap(),
        Confirmed::Stale {
            age: Duration::from_millis(10_001)
        }
    );
    // Still ours: a new round may take it (nobody else could while it lived).
    let again = begin_written(&leaser);
    us.clock.advance(chrono::Duration::seconds(2));
    assert_eq!(
        leaser.confirm(UUID, &again).unwrap(),
        Confirmed::Acquired {
            expires: t("2026-12-01T04:00:40.001Z")
        }
    );
}

/// Two contenders that both read "free" and both write, read back in either order and as
/// late as a renewal period allows: exactly one takes the lease.
#[test]
fn two_contenders_read_back_late_and_in_either_order_never_both_acquire() {
    /// The first `blind` reads see no record: both contenders read before either wrote.
    struct Blind<'a> {
        inner: Metadata<'a>,
        blind: std::sync::atomic::AtomicUsize,
    }
    impl Register for Blind<'_> {
        fn get(&self, uuid: &str) -> Result<Option<String>, HvError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .blind
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Ok(None);
            }
            self.inner.get(uuid)
        }
        fn set(&self, uuid: &str, xml: Option<&str>) -> Result<(), HvError> {
            self.inner.set(uuid, xml)
        }
    }
    let (_dir, hv) = libvirt();
    let config = config();
    for a_first in [true, false] {
        let register = Blind {
            inner: Metadata(hv.as_ref()),
            blind: 2.into(),
        };
        let clock = FakeClock::new(t("2026-12-01T04:00:00Z"));
        let a = holder("admin1", 10, "a");
        let b = holder("admin2", 10, "b");
        let la = Leaser::new(&register, &clock, &a, &config);
        let lb = Leaser::new(&register, &clock, &b, &config);
        let (Begun::Written(wa), Begun::Written(wb)) =
            (la.begin(UUID).unwrap(), lb.begin(UUID).unwrap())
        else {
            panic!("both write")
        };
        clock.advance(chrono::Duration::seconds(9));
        let (first, second) = if a_first {
            (
                la.confirm(UUID, &wa).unwrap(),
                lb.confirm(UUID, &wb).unwrap(),
            )
        } else {
            (
                lb.confirm(UUID, &wb).unwrap(),
                la.confirm(UUID, &wa).unwrap(),
            )
        };
        let won = [&first, &second]
            .iter()
            .filter(|c| matches!(c, Confirmed::Acquired { .. }))
            .count();
        assert_eq!(won, 1, "{first:?} {second:?}");
        Metadata(hv.as_ref()).set(UUID, None).unwrap();
    }
}
