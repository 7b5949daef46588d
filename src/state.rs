//! Observed (and projected) state of one libvirt domain, in typed units.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A memory amount in KiB, libvirt's unit for every memory figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Kib(pub u64);

impl Kib {
    /// `n` MiB expressed in KiB.
    #[must_use]
    pub const fn from_mib(n: u64) -> Self {
        Self(n * 1024)
    }
}

impl fmt::Display for Kib {
    /// Human form: the largest binary unit that divides the amount exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("TiB", 1 << 30), ("GiB", 1 << 20), ("MiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}KiB", self.0)
    }
}

/// Power state of a domain, folded from libvirt's state codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Paused,
    Shutoff,
    /// A guest-initiated or requested shutdown is in progress.
    ShuttingDown,
    Crashed,
    /// Suspended by guest power management (S3/S4).
    PmSuspended,
    /// libvirt reports no state (transient, rarely seen).
    NoState,
}

impl PowerState {
    /// Whether the domain has a running QEMU process (live changes apply).
    #[must_use]
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Shutoff | Self::Crashed)
    }

    /// The state whose [`as_str`](Self::as_str) form is `text`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Paused,
            Self::Shutoff,
            Self::ShuttingDown,
            Self::Crashed,
            Self::PmSuspended,
            Self::NoState,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutoff => "shutoff",
            Self::ShuttingDown => "shutting-down",
            Self::Crashed => "crashed",
            Self::PmSuspended => "pmsuspended",
            Self::NoState => "nostate",
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `<clock>` element of the persistent domain XML: what the next boot uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClockState {
    /// `offset` attribute (`utc`, `localtime`, ...); `None` when absent.
    pub offset: Option<String>,
    /// `track` of `<timer name='rtc'>`; `None` when there is no RTC timer or no track.
    pub rtc_track: Option<String>,
}

/// What libvirt does when a guest powers off or reboots (`<on_poweroff>`, `<on_reboot>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleAction {
    /// The domain stops.
    Destroy,
    /// The domain starts again.
    Restart,
    /// The domain is started again under a new name.
    RenameRestart,
    /// The domain is kept in its state for inspection.
    Preserve,
}

impl LifecycleAction {
    pub const ALL: [Self; 4] = [
        Self::Destroy,
        Self::Restart,
        Self::RenameRestart,
        Self::Preserve,
    ];

    /// The spelling of the domain XML and the plan file.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Destroy => "destroy",
            Self::Restart => "restart",
            Self::RenameRestart => "rename-restart",
            Self::Preserve => "preserve",
        }
    }

    /// The action spelled `text`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

impl fmt::Display for LifecycleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A guest event libvirt acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleEvent {
    /// The guest powered itself off.
    Poweroff,
    /// The guest rebooted.
    Reboot,
}

/// `<on_poweroff>` and `<on_reboot>` of the persistent definition (libvirt's defaults when
/// absent: destroy and restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lifecycle {
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Restart,
        }
    }
}

/// Which `<on_poweroff>`/`<on_reboot>` values a libvirt driver takes. libvirt's QEMU driver
/// refuses `preserve` and `rename-restart` for both, and rebooting to `destroy` while a power-off
/// restarts (checked against libvirt 9 on a real daemon; `tests/integration/lifecycle.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LifecycleRules {
    /// Drivers without such limits (the test driver).
    #[default]
    Any,
    /// libvirt's QEMU driver.
    Qemu,
}

/// Why a driver refuses a lifecycle configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleRefusal {
    /// The driver never takes `action` for `event`.
    Action(LifecycleEvent, LifecycleAction),
    /// `on_reboot: destroy` with `on_poweroff: restart`.
    RebootDestroysWhilePoweroffRestarts,
}

impl LifecycleRules {
    /// Why the driver would refuse `lifecycle`, or `None` when it takes it.
    #[must_use]
    pub fn refusal(self, lifecycle: Lifecycle) -> Option<LifecycleRefusal> {
        if self == Self::Any {
            return None;
        }
        for event in [LifecycleEvent::Poweroff, LifecycleEvent::Reboot] {
            let action = lifecycle.get(event);
            if matches!(
                action,
                LifecycleAction::Preserve | LifecycleAction::RenameRestart
            ) {
                return Some(LifecycleRefusal::Action(event, action));
            }
        }
        (lifecycle.on_reboot == LifecycleAction::Destroy
            && lifecycle.on_poweroff == LifecycleAction::Restart)
            .then_some(LifecycleRefusal::RebootDestroysWhilePoweroffRestarts)
    }
}

impl Lifecycle {
    #[must_use]
    pub fn get(self, event: LifecycleEvent) -> LifecycleAction {
        match event {
            LifecycleEvent::Poweroff => self.on_poweroff,
            LifecycleEvent::Reboot => self.on_reboot,
        }
    }

    pub fn set(&mut self, event: LifecycleEvent, action: LifecycleAction) {
        match event {
            LifecycleEvent::Poweroff => self.on_poweroff = action,
            LifecycleEvent::Reboot => self.on_reboot = action,
        }
    }
}

/// What a running domain actually has right now, as opposed to its persistent config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LiveFigures {
    /// Current balloon size.
    pub memory: Kib,
    /// Online vCPUs.
    pub vcpus: u32,
}

/// Everything virtplan reads about one domain.
///
/// Configuration figures (`memory`, `vcpus`, maxima) are the persistent definition, which is
/// what survives a reboot and what the planner projects; `live` holds the running figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    pub name: String,
    pub uuid: String,
    pub power: PowerState,
    pub memory: Kib,
    pub max_memory: Kib,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub autostart: bool,
    pub persistent: bool,
    /// `None` when not read (only steps that touch the clock need the domain XML).
    pub clock: Option<ClockState>,
    /// `None` when not read (read with the clock, from the same persistent definition).
    #[serde(default)]
    pub lifecycle: Option<Lifecycle>,
    pub title: String,
    pub description: String,
    /// `Some` only for active domains.
    pub live: Option<LiveFigures>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_lifecycle_rules_match_what_libvirt_refuses() {
        use LifecycleAction::{Destroy, Preserve, RenameRestart, Restart};
        let pair = |on_poweroff, on_reboot| Lifecycle {
            on_poweroff,
            on_reboot,
        };
        let mut refused = 0;
        for p in LifecycleAction::ALL {
            for r in LifecycleAction::ALL {
                assert_eq!(LifecycleRules::Any.refusal(pair(p, r)), None);
                let verdict = LifecycleRules::Qemu.refusal(pair(p, r));
                let supported = matches!(p, Destroy | Restart) && matches!(r, Destroy | Restart);
                match verdict {
                    None => assert!(supported && !(p == Restart && r == Destroy)),
                    Some(LifecycleRefusal::Action(_, a)) => {
                        assert!(matches!(a, Preserve | RenameRestart));
                        refused += 1;
                    }
                    Some(LifecycleRefusal::RebootDestroysWhilePoweroffRestarts) => {
                        assert_eq!((p, r), (Restart, Destroy));
                        refused += 1;
                    }
                }
            }
        }
        // 16 pairs: 12 name `preserve` or `rename-restart`, 1 is the refused combination.
        assert_eq!(refused, 13);
    }
}
