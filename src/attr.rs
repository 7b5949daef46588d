//! The attributes a step can set ([`Attr`]) and the value of one attribute of one domain
//! ([`Figure`]), with the one formatter every output uses.
//!
//! Every `match` on [`Attr`] here and in the planner, executor and validator is exhaustive, so
//! a new attribute that is not handled somewhere is a compile error (CONTRIBUTING.md has the
//! recipe).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::{ClockState, DomainState, Kib, LifecycleAction, PowerState};

/// An attribute a step can set, spelled as its key in the plan file and in `plan` output.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Attr {
    Power,
    Memory,
    MaxMemory,
    Vcpus,
    MaxVcpus,
    Clock,
    Autostart,
    Title,
    Description,
    Snapshot,
    /// What libvirt does when the guest powers off (`<on_poweroff>`).
    OnPoweroff,
    /// What libvirt does when the guest reboots (`<on_reboot>`).
    OnReboot,
    /// The guest's clock set from the host through the agent (`clock: {sync: true}`): an
    /// action shown as its own line, not a key of its own in the plan file.
    GuestTime,
}

impl Attr {
    /// The attributes that are keys of a step, in the order the plan file documents them.
    pub const KEYS: [Self; 12] = [
        Self::Power,
        Self::Memory,
        Self::MaxMemory,
        Self::Vcpus,
        Self::MaxVcpus,
        Self::Clock,
        Self::Autostart,
        Self::Title,
        Self::Description,
        Self::Snapshot,
        Self::OnPoweroff,
        Self::OnReboot,
    ];

    /// Every attribute a plan's `plan` output can show: the [`KEYS`](Self::KEYS), then
    /// [`GuestTime`](Self::GuestTime).
    pub const ALL: [Self; 13] = {
        let mut all = [Self::GuestTime; 13];
        let mut i = 0;
        while i < Self::KEYS.len() {
            all[i] = Self::KEYS[i];
            i += 1;
        }
        all
    };

    /// The key in the plan file and the `attribute` in `plan` output.
    #[must_use]
    pub const fn key(self) -> &'static str {
        match self {
            Self::Power => "power",
            Self::Memory => "memory",
            Self::MaxMemory => "max_memory",
            Self::Vcpus => "vcpus",
            Self::MaxVcpus => "max_vcpus",
            Self::Clock => "clock",
            Self::Autostart => "autostart",
            Self::Title => "title",
            Self::Description => "description",
            Self::Snapshot => "snapshot",
            Self::OnPoweroff => "on_poweroff",
            Self::OnReboot => "on_reboot",
            Self::GuestTime => "guest_time",
        }
    }

    /// The attribute whose `plan` output name is `key`.
    #[must_use]
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.key() == key)
    }

    /// The domain figures a change of this attribute depends on: checked for drift before a
    /// step and verified after it. Memory and vCPU changes also depend on the power state
    /// (live or config) and on their maximum. A snapshot is verified by name, not by a figure.
    #[must_use]
    pub fn depends_on(self) -> &'static [Self] {
        match self {
            Self::Power => &[Self::Power],
            Self::Memory | Self::MaxMemory => &[Self::Power, Self::Memory, Self::MaxMemory],
            Self::Vcpus | Self::MaxVcpus => &[Self::Power, Self::Vcpus, Self::MaxVcpus],
            Self::Clock => &[Self::Clock],
            Self::Autostart => &[Self::Autostart],
            Self::Title => &[Self::Title],
            Self::Description => &[Self::Description],
            Self::OnPoweroff => &[Self::OnPoweroff],
            Self::OnReboot => &[Self::OnReboot],
            // Verified by their own action: a snapshot by name, the guest time by the agent.
            Self::Snapshot | Self::GuestTime => &[],
        }
    }

    /// Whether observing this attribute needs the persistent domain XML.
    #[must_use]
    pub fn needs_xml(self) -> bool {
        match self {
            Self::Clock | Self::OnPoweroff | Self::OnReboot => true,
            Self::Power
            | Self::Memory
            | Self::MaxMemory
            | Self::Vcpus
            | Self::MaxVcpus
            | Self::Autostart
            | Self::Title
            | Self::Description
            | Self::Snapshot
            | Self::GuestTime => false,
        }
    }

    /// This attribute's figure in `state`; `None` when it was not read (the clock without
    /// the domain XML) or is not a figure of the domain (snapshots live beside it).
    #[must_use]
    pub fn figure(self, s: &DomainState) -> Option<Figure> {
        Some(match self {
            Self::Power => Figure::Power(s.power),
            Self::Memory => Figure::Memory(s.memory),
            Self::MaxMemory => Figure::Memory(s.max_memory),
            Self::Vcpus => Figure::Count(s.vcpus),
            Self::MaxVcpus => Figure::Count(s.max_vcpus),
            Self::Clock => Figure::Clock(s.clock.clone()?),
            Self::Autostart => Figure::Flag(s.autostart),
            Self::Title => Figure::Text(s.title.clone()),
            Self::Description => Figure::Text(s.description.clone()),
            Self::OnPoweroff => Figure::Lifecycle(s.lifecycle?.on_poweroff),
            Self::OnReboot => Figure::Lifecycle(s.lifecycle?.on_reboot),
            Self::Snapshot | Self::GuestTime => return None,
        })
    }

    /// Reads a figure of this attribute back from `plan` JSON (saved plans).
    ///
    /// # Errors
    /// The value does not have this attribute's JSON form.
    pub fn figure_from_json(self, value: &Value) -> Result<Figure, String> {
        let wrong = || format!("{value} is not a value of `{}`", self.key());
        let text = || value.as_str().map(str::to_owned).ok_or_else(wrong);
        let count = || {
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(wrong)
        };
        if value.is_null() {
            return Ok(Figure::None);
        }
        match self {
            Self::Power => value
                .as_str()
                .and_then(PowerState::parse)
                .map(Figure::Power)
                .ok_or_else(wrong),
            Self::Memory | Self::MaxMemory => value
                .as_u64()
                .map(|k| Figure::Memory(Kib(k)))
                .ok_or_else(wrong),
            Self::Vcpus | Self::MaxVcpus => count().map(Figure::Count),
            Self::Clock => {
                let part = |key: &str| -> Result<Option<String>, String> {
                    match value.get(key) {
                        None | Some(Value::Null) => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s.clone())),
                        Some(_) => Err(wrong()),
                    }
                };
                if !value.is_object() {
                    return Err(wrong());
                }
                Ok(Figure::Clock(ClockState {
                    offset: part("offset")?,
                    rtc_track: part("track")?,
                }))
            }
            Self::Autostart => value.as_bool().map(Figure::Flag).ok_or_else(wrong),
            Self::OnPoweroff | Self::OnReboot => value
                .as_str()
                .and_then(LifecycleAction::parse)
                .map(Figure::Lifecycle)
                .ok_or_else(wrong),
            Self::Title | Self::Description | Self::Snapshot | Self::GuestTime => {
                text().map(Figure::Text)
            }
        }
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.key())
    }
}

/// The value of one attribute of one domain: what `plan` shows before and after a change,
/// what drift checks and verification compare.
///
/// Its JSON form is the stable `plan --format json` one (memory as an integer in KiB, the
/// clock as `{offset, track}`, no value as `null`); its [`Display`](fmt::Display) is the one
/// human form (memory in binary units, the clock as `offset=… track=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Figure {
    /// No value (a snapshot that does not exist yet).
    None,
    Power(PowerState),
    Memory(Kib),
    Count(u32),
    Flag(bool),
    Text(String),
    Clock(ClockState),
    Lifecycle(LifecycleAction),
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("(none)"),
            Self::Power(p) => fmt::Display::fmt(p, f),
            Self::Memory(k) => fmt::Display::fmt(k, f),
            Self::Count(n) => fmt::Display::fmt(n, f),
            Self::Flag(b) => fmt::Display::fmt(b, f),
            Self::Text(s) if s.is_empty() => f.write_str("\"\""),
            // User text (titles, descriptions, names read back from libvirt): shown escaped,
            // so no figure can drive the terminal of whoever reads a plan or a status.
            Self::Text(s) => f.write_str(&crate::text::escape(s)),
            Self::Lifecycle(a) => fmt::Display::fmt(a, f),
            Self::Clock(c) => write!(
                f,
                "offset={} track={}",
                crate::text::escape(c.offset.as_deref().unwrap_or("-")),
                crate::text::escape(c.rtc_track.as_deref().unwrap_or("-"))
            ),
        }
    }
}

impl schemars::JsonSchema for Figure {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Figure".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "The attribute's value: memory as an integer in KiB, vCPUs as an integer, power and text as strings, the clock as {offset, track}, null for none."
        })
    }
}

impl Serialize for Figure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Clock<'a> {
            offset: &'a Option<String>,
            track: &'a Option<String>,
        }
        match self {
            Self::None => s.serialize_none(),
            Self::Power(p) => s.serialize_str(p.as_str()),
            Self::Memory(k) => s.serialize_u64(k.0),
            Self::Count(n) => s.serialize_u32(*n),
            Self::Flag(b) => s.serialize_bool(*b),
            Self::Text(t) => s.serialize_str(t),
            Self::Lifecycle(a) => s.serialize_str(a.as_str()),
            Self::Clock(c) => Clock {
                offset: &c.offset,
                track: &c.rtc_track,
            }
            .serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_match_serde() {
        for attr in Attr::ALL {
            assert_eq!(Attr::from_key(attr.key()), Some(attr));
            assert_eq!(
                serde_json::to_value(attr).ok(),
                Some(Value::String(attr.key().to_owned()))
            );
        }
    }

    #[test]
    fn figures_read_back_from_their_json() {
        let figures = [
            (Attr::Power, Figure::Power(PowerState::ShuttingDown)),
            (Attr::Memory, Figure::Memory(Kib(3 << 20))),
            (Attr::MaxVcpus, Figure::Count(4)),
            (
                Attr::Clock,
                Figure::Clock(ClockState {
                    offset: Some("utc".into()),
                    rtc_track: None,
                }),
            ),
            (Attr::Autostart, Figure::Flag(true)),
            (Attr::Title, Figure::Text(String::new())),
            (Attr::Snapshot, Figure::None),
        ];
        for (attr, figure) in figures {
            let json = serde_json::to_value(&figure).unwrap_or_default();
            assert_eq!(attr.figure_from_json(&json), Ok(figure));
        }
        assert!(Attr::Memory.figure_from_json(&Value::from("3GiB")).is_err());
    }

    #[test]
    fn one_human_form() {
        assert_eq!(Figure::Memory(Kib(3 << 20)).to_string(), "3GiB");
        assert_eq!(Figure::Text(String::new()).to_string(), "\"\"");
        assert_eq!(Figure::None.to_string(), "(none)");
        let clock = Figure::Clock(ClockState {
            offset: None,
            rtc_track: Some("guest".into()),
        });
        assert_eq!(clock.to_string(), "offset=- track=guest");
    }
}
