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
    pub title: String,
    pub description: String,
    /// `Some` only for active domains.
    pub live: Option<LiveFigures>,
}
