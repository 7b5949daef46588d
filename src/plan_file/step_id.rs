//! Stable step ids: the lockfile's key for a step on a domain.
//!
//! An id hashes a [`StepIdentity`], a serde struct whose field and type names are pinned by
//! `#[serde(rename)]`, so renaming a Rust field or type cannot change what is on disk. The
//! bytes hashed are written by [`Notation`], a small serde serializer in the notation the first
//! release wrote by hand (`at=Some("…");targets=["web-01"];…`), so lockfiles written since keep
//! their ids without a migration. Tests pin literal ids for every attribute.

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::ser::{self, Serialize};

use super::{
    Attributes, ClockOffset, LifecycleAction, PowerTarget, RtcTrack, ShutdownMode, Step, TargetKind,
};

/// Everything a step asks for, and nothing about where it sits in the file: reordering or
/// inserting steps keeps ids, editing a step gives it a new id.
#[derive(serde::Serialize)]
#[serde(rename = "StepIdentity")]
pub struct StepIdentity<'a> {
    #[serde(rename = "at")]
    pub at: Option<String>,
    #[serde(rename = "targets")]
    pub targets: Vec<&'a str>,
    #[serde(rename = "conn")]
    pub connection: Option<&'a str>,
    #[serde(rename = "shutdown")]
    pub shutdown: ShutdownId,
    #[serde(rename = "power")]
    pub power: Option<PowerTarget>,
    #[serde(rename = "memory")]
    pub memory: Option<KibId>,
    #[serde(rename = "max_memory")]
    pub max_memory: Option<KibId>,
    #[serde(rename = "vcpus")]
    pub vcpus: Option<u32>,
    #[serde(rename = "max_vcpus")]
    pub max_vcpus: Option<u32>,
    #[serde(rename = "clock")]
    pub clock: Option<ClockId>,
    #[serde(rename = "autostart")]
    pub autostart: Option<bool>,
    #[serde(rename = "title")]
    pub title: Option<&'a str>,
    #[serde(rename = "description")]
    pub description: Option<&'a str>,
    #[serde(rename = "snapshot")]
    pub snapshot: Option<SnapshotId<'a>>,
    // Left out when unset, so steps written before these keys existed keep their ids.
    #[serde(rename = "on_poweroff", skip_serializing_if = "Option::is_none")]
    pub on_poweroff: Option<LifecycleAction>,
    #[serde(rename = "on_reboot", skip_serializing_if = "Option::is_none")]
    pub on_reboot: Option<LifecycleAction>,
    #[serde(rename = "check", skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckId<'a>>,
    #[serde(rename = "always", skip_serializing_if = "std::ops::Not::not")]
    pub always: bool,
    /// `vms: {match: GLOB}`: the pattern (then `targets` is empty), so `vms: [web-*]`, a
    /// domain literally named `web-*`, keeps a different id.
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub matching: Option<&'a str>,
    /// The occurrence of an identical step (see [`Step::repeat`]): left out for the first, so
    /// only repeats, which shared an id before, get new ones.
    #[serde(rename = "repeat", skip_serializing_if = "is_first")]
    pub repeat: usize,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_first(repeat: &usize) -> bool {
    *repeat <= 1
}

#[derive(serde::Serialize)]
#[serde(rename = "CheckSpec")]
pub struct CheckId<'a> {
    #[serde(rename = "state")]
    state: Option<PowerTarget>,
    #[serde(rename = "guest_agent")]
    guest_agent: bool,
    #[serde(rename = "command")]
    command: Option<&'a str>,
    #[serde(rename = "timeout")]
    timeout: DurationId,
    #[serde(rename = "interval")]
    interval: DurationId,
}

#[derive(serde::Serialize)]
#[serde(rename = "ShutdownPolicy")]
pub struct ShutdownId {
    #[serde(rename = "mode")]
    mode: ShutdownMode,
    #[serde(rename = "timeout")]
    timeout: DurationId,
    #[serde(rename = "force_after_timeout")]
    force_after_timeout: bool,
}

#[derive(serde::Serialize)]
#[serde(rename = "Kib")]
pub struct KibId(u64);

#[derive(serde::Serialize)]
#[serde(rename = "ClockTarget")]
pub struct ClockId {
    #[serde(rename = "offset")]
    offset: Option<ClockOffset>,
    #[serde(rename = "track")]
    track: Option<RtcTrack>,
    #[serde(rename = "sync", skip_serializing_if = "std::ops::Not::not")]
    sync: bool,
}

#[derive(serde::Serialize)]
#[serde(rename = "SnapshotSpec")]
pub struct SnapshotId<'a> {
    #[serde(rename = "name")]
    name: &'a str,
    #[serde(rename = "description")]
    description: Option<&'a str>,
}

/// A duration, written as `120s`, `1.5s` or `250ms`.
pub struct DurationId(Duration);

/// The newtype name that tells [`Notation`] to write a duration.
const DURATION: &str = "$duration";

impl Serialize for DurationId {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::new();
        write_duration(&mut text, self.0.as_secs(), self.0.subsec_nanos());
        s.serialize_newtype_struct(DURATION, &text)
    }
}

impl<'a> StepIdentity<'a> {
    #[must_use]
    pub fn of(step: &'a Step) -> Self {
        // Destructured without `..`: a new attribute must be added to the identity. Give its
        // field `skip_serializing_if = "Option::is_none"`, so the ids of steps without it stay.
        let Attributes {
            power,
            memory,
            max_memory,
            vcpus,
            max_vcpus,
            clock,
            autostart,
            title,
            description,
            snapshot,
            on_poweroff,
            on_reboot,
        } = &step.attributes;
        Self {
            at: step.at.as_ref().map(|a| a.value.to_rfc3339()),
            targets: step
                .targets
                .iter()
                .filter(|t| t.kind == TargetKind::Domain)
                .map(|t| t.name_or_uuid.as_str())
                .collect(),
            matching: step
                .targets
                .iter()
                .find(|t| t.kind == TargetKind::Match)
                .map(|t| t.name_or_uuid.as_str()),
            connection: step.connection.as_ref().map(crate::uri::Uri::expose),
            shutdown: ShutdownId {
                mode: step.shutdown.mode,
                timeout: DurationId(step.shutdown.timeout),
                force_after_timeout: step.shutdown.force_after_timeout,
            },
            power: power.as_ref().map(|l| l.value),
            memory: memory.as_ref().map(|l| KibId(l.value.0)),
            max_memory: max_memory.as_ref().map(|l| KibId(l.value.0)),
            vcpus: vcpus.as_ref().map(|l| l.value),
            max_vcpus: max_vcpus.as_ref().map(|l| l.value),
            clock: clock.as_ref().map(|l| ClockId {
                offset: l.value.offset,
                track: l.value.track,
                sync: l.value.sync,
            }),
            autostart: autostart.as_ref().map(|l| l.value),
            title: title.as_ref().map(|l| l.value.as_str()),
            description: description.as_ref().map(|l| l.value.as_str()),
            snapshot: snapshot.as_ref().map(|l| SnapshotId {
                name: &l.value.name,
                description: l.value.description.as_deref(),
            }),
            on_poweroff: on_poweroff.as_ref().map(|l| l.value),
            on_reboot: on_reboot.as_ref().map(|l| l.value),
            check: step.check.as_ref().map(|l| CheckId {
                state: l.value.state,
                guest_agent: l.value.guest_agent,
                command: l.value.command.as_deref(),
                timeout: DurationId(l.value.timeout),
                interval: DurationId(l.value.interval),
            }),
            always: step.always,
            repeat: step.repeat,
        }
    }

    /// The id: `s` and the first ten hex digits of the SHA-256 of the identity's notation.
    #[must_use]
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(notation(self).as_bytes());
        // Ten hex digits are the first five bytes: only those are written out.
        let mut id = String::with_capacity(11);
        id.push('s');
        id.push_str(&super::validate::hex(&digest[..5]));
        id
    }
}

/// The text an identity hashes.
#[must_use]
pub fn notation(identity: &StepIdentity<'_>) -> String {
    let mut n = Notation {
        // Room for a usual step's notation (300-400 bytes), so it is not grown several times.
        out: String::with_capacity(512),
        depth: 0,
        raw: false,
    };
    // The types above serialize only through the methods `Notation` implements.
    let _ = identity.serialize(&mut n);
    n.out
}

/// Serde serializer for identities: the top-level struct as `name=value` joined by `;`,
/// nested structs as `Name { field: value }`, newtypes as `Name(value)`, options as
/// `Some(value)`/`None`, unit variants capitalised (`Shutoff`), strings quoted and escaped.
struct Notation {
    out: String,
    depth: usize,
    /// Write the next string as it is (a duration's text).
    raw: bool,
}

#[derive(Debug)]
struct NotationError(String);

impl fmt::Display for NotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotationError {}

impl ser::Error for NotationError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

type NResult = Result<(), NotationError>;

fn unsupported(what: &str) -> NResult {
    Err(NotationError(format!("{what} has no identity notation")))
}

/// Writes a duration as `120s`, `1.5s`, `250ms`, `3µs` or `7ns`: whole units, then the
/// significant fraction digits (the form the first release's ids hashed).
fn write_duration(out: &mut String, secs: u64, nanos: u32) {
    let (int, mut frac, mut div, unit) = if secs > 0 {
        (secs, nanos, 100_000_000, "s")
    } else if nanos >= 1_000_000 {
        (
            u64::from(nanos / 1_000_000),
            nanos % 1_000_000,
            100_000,
            "ms",
        )
    } else if nanos >= 1_000 {
        (u64::from(nanos / 1_000), nanos % 1_000, 100, "µs")
    } else {
        (u64::from(nanos), 0, 1, "ns")
    };
    let _ = write!(out, "{int}");
    if frac > 0 {
        out.push('.');
        while frac > 0 && div > 0 {
            let _ = write!(out, "{}", frac / div);
            frac %= div;
            div /= 10;
        }
    }
    out.push_str(unit);
}

impl<'a> ser::Serializer for &'a mut Notation {
    type Ok = ();
    type Error = NotationError;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Seq<'a>;
    type SerializeTupleStruct = ser::Impossible<(), NotationError>;
    type SerializeTupleVariant = ser::Impossible<(), NotationError>;
    type SerializeMap = ser::Impossible<(), NotationError>;
    type SerializeStruct = Seq<'a>;
    type SerializeStructVariant = ser::Impossible<(), NotationError>;

    fn serialize_bool(self, v: bool) -> NResult {
        self.out.push_str(if v { "true" } else { "false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> NResult {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> NResult {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> NResult {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> NResult {
        let _ = write!(self.out, "{v}");
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> NResult {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> NResult {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> NResult {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> NResult {
        let _ = write!(self.out, "{v}");
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> NResult {
        unsupported("a float")
    }
    fn serialize_f64(self, _: f64) -> NResult {
        unsupported("a float")
    }
    fn serialize_char(self, v: char) -> NResult {
        let _ = write!(self.out, "{v:?}");
        Ok(())
    }
    fn serialize_str(self, v: &str) -> NResult {
        if self.raw {
            self.out.push_str(v);
        } else if v
            .bytes()
            .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
        {
            // Printable ASCII without quote or backslash is its own `Debug` text: written
            // directly, as the formatter's escaping cost a fifth of hashing a step's id.
            self.out.push('"');
            self.out.push_str(v);
            self.out.push('"');
        } else {
            let _ = write!(self.out, "{v:?}");
        }
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> NResult {
        unsupported("bytes")
    }
    fn serialize_none(self) -> NResult {
        self.out.push_str("None");
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> NResult {
        self.out.push_str("Some(");
        value.serialize(&mut *self)?;
        self.out.push(')');
        Ok(())
    }
    fn serialize_unit(self) -> NResult {
        self.out.push_str("()");
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> NResult {
        self.out.push_str(name);
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> NResult {
        let mut chars = variant.chars();
        if let Some(first) = chars.next() {
            self.out.extend(first.to_uppercase());
            self.out.push_str(chars.as_str());
        }
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> NResult {
        if name == DURATION {
            self.raw = true;
            let written = value.serialize(&mut *self);
            self.raw = false;
            return written;
        }
        self.out.push_str(name);
        self.out.push('(');
        value.serialize(&mut *self)?;
        self.out.push(')');
        Ok(())
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> NResult {
        unsupported("a newtype variant")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Seq<'a>, NotationError> {
        self.out.push('[');
        Ok(Seq {
            n: self,
            first: true,
            close: "]",
            top: false,
        })
    }
    fn serialize_tuple(self, _: usize) -> Result<Seq<'a>, NotationError> {
        self.out.push('(');
        Ok(Seq {
            n: self,
            first: true,
            close: ")",
            top: false,
        })
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotationError> {
        Err(NotationError(
            "a tuple struct has no identity notation".into(),
        ))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotationError> {
        Err(NotationError(
            "a tuple variant has no identity notation".into(),
        ))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotationError> {
        Err(NotationError("a map has no identity notation".into()))
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Seq<'a>, NotationError> {
        let top = self.depth == 0;
        if !top {
            self.out.push_str(name);
            self.out.push_str(" { ");
        }
        self.depth += 1;
        Ok(Seq {
            n: self,
            first: true,
            close: if top { "" } else { " }" },
            top,
        })
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotationError> {
        Err(NotationError(
            "a struct variant has no identity notation".into(),
        ))
    }
}

/// The elements of a sequence, tuple or struct.
struct Seq<'a> {
    n: &'a mut Notation,
    first: bool,
    close: &'static str,
    /// The identity itself: `name=value;name=value`.
    top: bool,
}

impl Seq<'_> {
    fn separate(&mut self) {
        if !self.first {
            self.n.out.push_str(if self.top { ";" } else { ", " });
        }
        self.first = false;
    }
}

impl ser::SerializeSeq for Seq<'_> {
    type Ok = ();
    type Error = NotationError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> NResult {
        self.separate();
        value.serialize(&mut *self.n)
    }
    fn end(self) -> NResult {
        self.n.out.push_str(self.close);
        Ok(())
    }
}

impl ser::SerializeTuple for Seq<'_> {
    type Ok = ();
    type Error = NotationError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> NResult {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> NResult {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeStruct for Seq<'_> {
    type Ok = ();
    type Error = NotationError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> NResult {
        self.separate();
        self.n.out.push_str(key);
        self.n.out.push_str(if self.top { "=" } else { ": " });
        value.serialize(&mut *self.n)
    }
    fn end(self) -> NResult {
        self.n.depth -= 1;
        self.n.out.push_str(self.close);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::plan_file::{parse, LoadContext, PlanFile, Step};

    /// `text` parsed as `pin.yaml`, which must be valid.
    pub(super) fn pinned(text: &str) -> PlanFile {
        parse(
            Path::new("pin.yaml"),
            text.to_owned(),
            &LoadContext::default(),
        )
        .unwrap_or_else(|d| panic!("{d}"))
    }

    /// Each step's id, in plan order.
    pub(super) fn ids(file: &PlanFile) -> Vec<String> {
        file.steps.iter().map(Step::id).collect()
    }

    const PLAN: &str = r#"version: 1
connection: qemu:///system
timezone: UTC
steps:
  - at: 2026-12-01 04:00
    vm: web-01
    power: shutoff
  - at: 2026-12-01 04:05
    vms: [web-01, "we\"b-02"]
    memory: 3GiB
    max_memory: 4GiB
    vcpus: 2
    max_vcpus: 4
  - at: 2026-12-01 04:06
    vm: web-01
    clock: { offset: localtime, track: guest }
    autostart: true
    title: "Web ünïcode"
    description: ""
    snapshot: { name: pre, description: before the window }
    shutdown: { mode: graceful, timeout: 1500ms, force_after_timeout: false }
  - vm: db
    connection: test:///default
    power: running
    shutdown: { mode: force }
  - at: 2026-12-01T04:07:00+01:00
    vm: db
    power: paused
    clock: { track: wall }
    snapshot: { name: s2 }
"#;

    #[test]
    fn durations_are_written_as_the_first_release_hashed_them() {
        for (d, text) in [
            (Duration::from_secs(120), "120s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::new(1, 1), "1.000000001s"),
            (Duration::from_micros(3), "3µs"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0ns"),
        ] {
            let mut out = String::new();
            super::write_duration(&mut out, d.as_secs(), d.subsec_nanos());
            assert_eq!(out, text);
            assert_eq!(
                out,
                format!("{d:?}"),
                "std's Debug form, which format 1 hashed"
            );
        }
    }

    /// Strings are written as `{:?}` writes them, whether or not they take the direct path.
    #[test]
    fn strings_are_written_as_their_debug_form() {
        let mut samples: Vec<String> = (0u8..=0x7f)
            .map(|b| format!("a{}b", char::from(b)))
            .collect();
        samples.extend(
            [
                "",
                "web-01",
                "qemu:///system",
                "we\"b",
                "c:\\x",
                "ünï",
                "tab\tnl\n",
                "\u{200b}",
            ]
            .map(str::to_owned),
        );
        for s in samples {
            let mut n = super::Notation {
                out: String::new(),
                depth: 0,
                raw: false,
            };
            serde::Serializer::serialize_str(&mut n, &s).unwrap();
            assert_eq!(n.out, format!("{s:?}"));
        }
    }

    #[test]
    fn the_notation_names_every_field() {
        let file = pinned(PLAN);
        assert_eq!(
            super::notation(&super::StepIdentity::of(&file.steps[2])),
            "at=Some(\"2026-12-01T04:06:00+00:00\");targets=[\"web-01\"];conn=Some(\"qemu:///system\");\
             shutdown=ShutdownPolicy { mode: Graceful, timeout: 1.5s, force_after_timeout: false };\
             power=None;memory=None;max_memory=None;vcpus=None;max_vcpus=None;\
             clock=Some(ClockTarget { offset: Some(Localtime), track: Some(Guest) });autostart=Some(true);\
             title=Some(\"Web ünïcode\");description=Some(\"\");\
             snapshot=Some(SnapshotSpec { name: \"pre\", description: Some(\"before the window\") })"
        );
    }

    #[test]
    fn ids_of_format_1_are_pinned() {
        let file = pinned(PLAN);
        assert_eq!(
            ids(&file),
            [
                "safed153580",
                "sa930857ef0",
                "sc5b666a81f",
                "sb2d891d355",
                "sd0ad222910"
            ]
        );
    }

    #[test]
    fn reboot_check_always_and_sync_are_in_the_notation_only_when_set() {
        let text = "version: 1
connection: qemu:///system
steps:
  - at: 2026-12-01T04:00:00Z
    vm: web-01
    power: reboot
    clock: { sync: true }
    check: { state: running, guest_agent: true, command: \"curl -fsS http://$VIRTPLAN_VM/\", timeout: 2m, interval: 500ms }
    always: true
";
        let file = pinned(text);
        assert_eq!(
            super::notation(&super::StepIdentity::of(&file.steps[0])),
            "at=Some(\"2026-12-01T04:00:00+00:00\");targets=[\"web-01\"];conn=Some(\"qemu:///system\");\
             shutdown=ShutdownPolicy { mode: Graceful, timeout: 120s, force_after_timeout: true };\
             power=Some(Reboot);memory=None;max_memory=None;vcpus=None;max_vcpus=None;\
             clock=Some(ClockTarget { offset: None, track: None, sync: true });autostart=None;\
             title=None;description=None;snapshot=None;\
             check=Some(CheckSpec { state: Some(Running), guest_agent: true, command: Some(\"curl -fsS http://$VIRTPLAN_VM/\"), timeout: 120s, interval: 500ms });\
             always=true"
        );
        assert_eq!(file.steps[0].id(), "s47872aaa3c");
    }
}

#[cfg(test)]
mod lifecycle_ids {
    use super::tests::{ids, pinned};

    /// `on_poweroff`/`on_reboot` join the notation only when set: the step without them keeps
    /// the id it had before they existed (`sb2d891d355`, pinned above).
    #[test]
    fn lifecycle_actions_are_pinned_and_leave_other_ids_alone() {
        let plan = "version: 1\nconnection: qemu:///system\nsteps:\n  - vm: db\n    connection: test:///default\n    power: running\n    shutdown: { mode: force }\n  - vm: db\n    on_poweroff: preserve\n    on_reboot: rename-restart\n";
        let file = pinned(plan);
        assert_eq!(ids(&file), ["sb2d891d355", "sf2a4826c43"]);
        assert!(super::notation(&super::StepIdentity::of(&file.steps[1]))
            .ends_with(";on_poweroff=Some(Preserve);on_reboot=Some(Rename-restart)"));
    }
}

#[cfg(test)]
mod repeat_ids {
    use super::tests::{ids, pinned};

    /// Regression: `autostart: true → false → true` gave steps 1 and 3 one id, so they shared
    /// one lockfile record: step 3 ran before step 2, step 1 stayed `pending`, and the domain
    /// ended with autostart off. The first occurrence keeps its id; repeats get their own.
    #[test]
    fn identical_steps_get_their_own_ids_and_the_first_keeps_its_id() {
        let plan = "version: 1\nconnection: test:///default\nsteps:\n  - vm: test\n    autostart: true\n  - vm: test\n    autostart: false\n  - vm: test\n    autostart: true\n  - vm: test\n    autostart: true\n";
        let file = pinned(plan);
        assert_eq!(
            ids(&file),
            ["s3484643050", "s87d0fcb66a", "s5c2fc24e51", "s87e0dd308d"]
        );
        let repeats: Vec<usize> = file.steps.iter().map(|s| s.repeat).collect();
        assert_eq!(repeats, [1, 1, 2, 3]);
        assert!(super::notation(&super::StepIdentity::of(&file.steps[3])).ends_with(";repeat=3"));
    }

    /// Validation hashes only steps that could be identical (same time, first domain and
    /// connection); a repeat among other steps is still numbered, and steps that differ only
    /// in their time or their other domains are not repeats.
    #[test]
    fn repeats_are_found_among_steps_of_other_times_and_domains() {
        let head = "version: 1\nconnection: test:///default\ntimezone: UTC\nsteps:\n";
        let steps = [
            "  - {at: 2030-01-01 04:00, vm: a, autostart: true}\n",
            "  - {at: 2030-01-01 04:00, vm: b, autostart: true}\n",
            "  - {at: 2030-01-01 04:05, vm: a, autostart: true}\n",
            "  - {at: 2030-01-01 04:00, vm: a, autostart: true}\n",
            "  - {at: 2030-01-01 04:00, vms: [a, b], autostart: true}\n",
            "  - {at: 2030-01-01 04:00, vm: a, autostart: false}\n",
        ];
        let file = pinned(&format!("{head}{}", steps.concat()));
        let repeats: Vec<usize> = file.steps.iter().map(|s| s.repeat).collect();
        assert_eq!(repeats, [1, 1, 1, 2, 1, 1]);
        let all = ids(&file);
        let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        // A first occurrence has the id the step has alone in a plan.
        for (i, step) in steps.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert_eq!(
                ids(&pinned(&format!("{head}{step}"))),
                [all[i].clone()],
                "step {}",
                i + 1
            );
        }
    }
}
