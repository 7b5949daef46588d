//! Reading and editing the domain XML `<clock>` element with an XML library; reading the other
//! parts of a definition virtplan needs (figures, agent channel, disks).
//!
//! libvirt has no API for clock timers, so a clock change reads the persistent XML, rewrites the
//! `<clock>` element here and defines the result. The rewrite streams every other event through
//! unchanged, so a diff of the before and after XML shows only the clock lines.

use std::borrow::Cow;

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use crate::state::{ClockState, Kib, Lifecycle, LifecycleAction, LifecycleEvent};

/// The domain XML could not be read or rewritten.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed XML.
    #[error("malformed domain XML at byte {position}: {source}")]
    Syntax {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    /// Well-formed, but an element libvirt always writes is missing or unreadable.
    #[error("unexpected domain XML: {0}")]
    Invalid(String),
}

/// The figures and texts of a domain definition that virtplan reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionSummary {
    /// `<currentMemory>`, or `<memory>` when absent or when there is no balloon device.
    pub memory: Kib,
    /// `<memory>`: the maximum the domain boots with.
    pub max_memory: Kib,
    /// `current` attribute of `<vcpu>`, or its content when absent.
    pub vcpus: u32,
    /// Content of `<vcpu>`.
    pub max_vcpus: u32,
    /// `<title>`, empty when absent.
    pub title: String,
    /// `<description>`, empty when absent.
    pub description: String,
    /// The `<clock>` element.
    pub clock: ClockState,
    /// `<on_poweroff>` and `<on_reboot>`.
    pub lifecycle: Lifecycle,
}

/// Memory, maximum memory, vCPUs and maximum vCPUs of a domain definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigFigures {
    pub memory: Kib,
    pub max_memory: Kib,
    pub vcpus: u32,
    pub max_vcpus: u32,
}

/// Reads the `<clock>` element: its `offset` and the `track` of `<timer name='rtc'>`.
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed.
pub fn read_clock(xml: &str) -> Result<ClockState, XmlError> {
    Ok(scan(xml)?.clock)
}

/// Reads `<on_poweroff>` and `<on_reboot>` (libvirt's defaults where absent).
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed or names an unknown action.
pub fn read_lifecycle(xml: &str) -> Result<Lifecycle, XmlError> {
    Ok(scan(xml)?.lifecycle)
}

/// Reads memory, maximum memory, vCPUs and maximum vCPUs from a domain definition.
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed or lacks `<memory>` or `<vcpu>`.
pub fn read_config_figures(xml: &str) -> Result<ConfigFigures, XmlError> {
    let s = summarize(xml)?;
    Ok(ConfigFigures {
        memory: s.memory,
        max_memory: s.max_memory,
        vcpus: s.vcpus,
        max_vcpus: s.max_vcpus,
    })
}

/// The channel name QEMU's guest agent listens on.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// Whether a domain definition has a QEMU guest agent channel: a `<devices><channel>` whose
/// `<target type='virtio'>` is named [`AGENT_CHANNEL`].
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed.
pub fn has_agent_channel(xml: &str) -> Result<bool, XmlError> {
    find_element(xml, |path, name, e| {
        Ok(path == ["domain", "devices", "channel"]
            && name == "target"
            && attribute(e, "type")?.as_deref() == Some("virtio")
            && attribute(e, "name")?.as_deref() == Some(AGENT_CHANNEL))
    })
}

/// Calls `visit` with each element's ancestors (outermost first), its name and the element,
/// in document order, until it returns `true`; says whether it did.
fn find_element(
    xml: &str,
    mut visit: impl FnMut(&[String], &str, &BytesStart<'_>) -> Result<bool, XmlError>,
) -> Result<bool, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| syntax(&reader, e))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = element_name(e);
                if visit(&path, &name, e)? {
                    return Ok(true);
                }
                if matches!(event, Event::Start(_)) {
                    path.push(name);
                }
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => return Ok(false),
            _ => {}
        }
    }
}

/// One `<disk>` of a domain definition, as far as snapshots care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// `<target dev>`: `vda`, `hdc`, ...
    pub target: String,
    /// The `device` attribute: `disk` (the default), `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// The `type` attribute: `file` (the default), `block`, `network`, `volume`, ...
    pub source_type: String,
    /// `<driver type>`: the image format; `None` when not given (libvirt then uses raw).
    pub format: Option<String>,
    /// `<readonly/>`.
    pub readonly: bool,
    /// No `<source>` with a file, device, volume or network name: an empty drive.
    pub empty: bool,
    /// The disk's `snapshot` attribute (`internal`, `external`, `no`), when given.
    pub snapshot: Option<String>,
}

/// Reads every `<disk>` under `<devices>`.
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed.
pub fn disks(xml: &str) -> Result<Vec<DiskDef>, XmlError> {
    let mut out: Vec<DiskDef> = Vec::new();
    find_element(xml, |path, name, e| {
        if path == ["domain", "devices"] && name == "disk" {
            out.push(DiskDef {
                target: String::new(),
                device: attribute(e, "device")?.unwrap_or_else(|| "disk".to_owned()),
                source_type: attribute(e, "type")?.unwrap_or_else(|| "file".to_owned()),
                format: None,
                readonly: false,
                empty: true,
                snapshot: attribute(e, "snapshot")?,
            });
        } else if path == ["domain", "devices", "disk"] {
            if let Some(disk) = out.last_mut() {
                match name {
                    "driver" => disk.format = attribute(e, "type")?,
                    "readonly" => disk.readonly = true,
                    "target" => disk.target = attribute(e, "dev")?.unwrap_or_default(),
                    "source" => {
                        for key in ["file", "dev", "volume", "name", "dir"] {
                            if attribute(e, key)?.is_some_and(|v| !v.is_empty()) {
                                disk.empty = false;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(false)
    })?;
    Ok(out)
}

/// Reads everything [`DefinitionSummary`] holds in one pass over the XML.
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed or lacks `<memory>` or `<vcpu>`.
pub fn summarize(xml: &str) -> Result<DefinitionSummary, XmlError> {
    let raw = scan(xml)?;
    let max_memory = raw
        .memory
        .ok_or_else(|| XmlError::Invalid("no <memory> element".into()))?;
    let max_vcpus = raw
        .max_vcpus
        .ok_or_else(|| XmlError::Invalid("no <vcpu> element".into()))?;
    // Without a balloon device the guest boots with all of `<memory>`, whatever
    // `<currentMemory>` says; libvirt's `balloon.current` statistic reports it so, and the
    // bulk read of shut-off domains uses that statistic: both reads must agree.
    let memory = if raw.no_balloon {
        max_memory
    } else {
        raw.current_memory.unwrap_or(max_memory)
    };
    Ok(DefinitionSummary {
        memory,
        max_memory,
        vcpus: raw.vcpus_current.unwrap_or(max_vcpus),
        max_vcpus,
        title: raw.title.unwrap_or_default(),
        description: raw.description.unwrap_or_default(),
        clock: raw.clock,
        lifecycle: raw.lifecycle,
    })
}

/// What one pass over the document found; `None` for absent elements.
#[derive(Default)]
struct RawSummary {
    memory: Option<Kib>,
    current_memory: Option<Kib>,
    vcpus_current: Option<u32>,
    max_vcpus: Option<u32>,
    title: Option<String>,
    description: Option<String>,
    clock: ClockState,
    lifecycle: Lifecycle,
    /// `<devices><memballoon model='none'/>`.
    no_balloon: bool,
}

/// Walks the document keeping the element path, so that only direct children of `<domain>`
/// count (`<numatune><memory>` and `<devices><memory>` are not the domain's memory).
fn scan(xml: &str) -> Result<RawSummary, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut out = RawSummary::default();
    // Element whose text we are collecting, with its unit attribute for memory elements.
    let mut text_target: Option<(String, Option<String>)> = None;
    let mut text = String::new();
    loop {
        let event = reader.read_event().map_err(|e| syntax(&reader, e))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = element_name(e);
                let is_empty = matches!(event, Event::Empty(_));
                if path.len() == 1 {
                    match name.as_str() {
                        "memory" | "currentMemory" | "vcpu" | "title" | "description"
                        | "on_poweroff" | "on_reboot" => {
                            if name == "vcpu" {
                                if let Some(current) = attribute(e, "current")? {
                                    out.vcpus_current = Some(parse_number(&name, &current)?);
                                }
                            }
                            text_target = Some((name.clone(), attribute(e, "unit")?));
                            text.clear();
                            if is_empty {
                                finish_text(&mut out, &name, None, "")?;
                                text_target = None;
                            }
                        }
                        "clock" => out.clock.offset = attribute(e, "offset")?,
                        _ => {}
                    }
                } else if path.len() == 2
                    && path[1] == "clock"
                    && name == "timer"
                    && attribute(e, "name")?.as_deref() == Some("rtc")
                {
                    out.clock.rtc_track = attribute(e, "track")?;
                } else if path.len() == 2
                    && path[1] == "devices"
                    && name == "memballoon"
                    && attribute(e, "model")?.as_deref() == Some("none")
                {
                    out.no_balloon = true;
                }
                if !is_empty {
                    path.push(name);
                }
            }
            Event::Text(ref t) if text_target.is_some() => {
                text.push_str(&t.unescape().map_err(|e| syntax(&reader, e))?);
            }
            Event::CData(ref c) if text_target.is_some() => {
                text.push_str(&String::from_utf8_lossy(c));
            }
            Event::End(_) => {
                let closed = path.pop();
                if let (Some((target, unit)), Some(closed)) = (text_target.take(), closed) {
                    if target == closed {
                        finish_text(&mut out, &target, unit.as_deref(), &text)?;
                    } else {
                        text_target = Some((target, unit));
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

fn finish_text(
    out: &mut RawSummary,
    name: &str,
    unit: Option<&str>,
    text: &str,
) -> Result<(), XmlError> {
    match name {
        "memory" => out.memory = Some(parse_memory(text, unit)?),
        "currentMemory" => out.current_memory = Some(parse_memory(text, unit)?),
        "vcpu" => out.max_vcpus = Some(parse_number(name, text)?),
        "title" => out.title = Some(text.to_owned()),
        "description" => out.description = Some(text.to_owned()),
        "on_poweroff" | "on_reboot" => {
            let action = LifecycleAction::parse(text.trim()).ok_or_else(|| {
                XmlError::Invalid(format!("<{name}> holds {text:?}, not a lifecycle action"))
            })?;
            let event = if name == "on_poweroff" {
                LifecycleEvent::Poweroff
            } else {
                LifecycleEvent::Reboot
            };
            out.lifecycle.set(event, action);
        }
        _ => {}
    }
    Ok(())
}

fn parse_number(what: &str, text: &str) -> Result<u32, XmlError> {
    text.trim()
        .parse()
        .map_err(|_| XmlError::Invalid(format!("<{what}> holds {text:?}, not a count")))
}

/// Converts a libvirt memory figure to KiB. libvirt writes `unit='KiB'`, but hand-written XML
/// may use any unit of the domain XML schema (`b`, `k`, `KiB`, `MB`, `G`, ...).
fn parse_memory(text: &str, unit: Option<&str>) -> Result<Kib, XmlError> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| XmlError::Invalid(format!("memory figure {text:?} is not a number")))?;
    let bytes_per_unit: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1_000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => return Err(XmlError::Invalid(format!("unknown memory unit {other:?}"))),
    };
    let bytes = value
        .checked_mul(bytes_per_unit)
        .ok_or_else(|| XmlError::Invalid(format!("memory figure {text} {unit:?} overflows")))?;
    // libvirt rounds up to whole KiB.
    Ok(Kib(bytes.div_ceil(1024)))
}

/// Rewrites the `<clock>` element of a domain definition and leaves the rest untouched.
///
/// `offset` sets the `offset` attribute; `rtc_track` sets `track` on `<timer name='rtc'>`,
/// creating the timer (and `<clock>` itself) when absent. `None` leaves that part alone. Other
/// timers and every byte outside the edited tags are kept as they were; the edited tags are
/// written with double-quoted attributes.
///
/// # Errors
///
/// Returns [`XmlError`] when the XML is not well-formed or has no `<domain>` root.
pub fn set_clock(
    xml: &str,
    offset: Option<&str>,
    rtc_track: Option<&str>,
) -> Result<String, XmlError> {
    if offset.is_none() && rtc_track.is_none() {
        return Ok(xml.to_owned());
    }
    let mut reader = Reader::from_str(xml);
    let mut writer = Writer::new(Vec::with_capacity(xml.len() + 64));
    let mut depth = 0usize;
    let mut in_clock = false;
    let mut seen_clock = false;
    let mut seen_rtc = false;
    let mut seen_root = false;
    // Whitespace before the element being opened, to indent what we insert like its siblings.
    let mut last_ws = String::new();
    let mut clock_indent: Option<String> = None;
    // Inside `<clock>` a whitespace text is held back, so a new timer can go before `</clock>`'s
    // own indentation.
    let mut held: Option<BytesText<'static>> = None;

    loop {
        let event = reader.read_event().map_err(|e| syntax(&reader, e))?;
        if in_clock {
            if let Event::Text(t) = &event {
                if let Some(h) = held.take() {
                    write(&mut writer, Event::Text(h))?;
                }
                held = Some(t.clone().into_owned());
                continue;
            }
        }
        match event {
            Event::Text(t) => {
                last_ws = indentation_of(&t);
                write(&mut writer, Event::Text(t))?;
            }
            Event::Start(e) => {
                let name = element_name(&e);
                if depth == 0 {
                    seen_root = name == "domain";
                }
                if depth == 1 && name == "clock" && !seen_clock {
                    seen_clock = true;
                    in_clock = true;
                    clock_indent = Some(last_ws.clone());
                    write(&mut writer, Event::Start(edit_attr(&e, "offset", offset)?))?;
                } else if in_clock && depth == 2 && name == "timer" && is_rtc(&e)? {
                    seen_rtc = true;
                    flush(&mut writer, &mut held)?;
                    write(
                        &mut writer,
                        Event::Start(edit_attr(&e, "track", rtc_track)?),
                    )?;
                } else {
                    flush(&mut writer, &mut held)?;
                    write(&mut writer, Event::Start(e))?;
                }
                depth += 1;
            }
            Event::Empty(e) => {
                let name = element_name(&e);
                if depth == 1 && name == "clock" && !seen_clock {
                    seen_clock = true;
                    let start = edit_attr(&e, "offset", offset)?;
                    write_clock(&mut writer, start, &last_ws, rtc_track)?;
                } else if in_clock && depth == 2 && name == "timer" && is_rtc(&e)? {
                    seen_rtc = true;
                    flush(&mut writer, &mut held)?;
                    write(
                        &mut writer,
                        Event::Empty(edit_attr(&e, "track", rtc_track)?),
                    )?;
                } else {
                    flush(&mut writer, &mut held)?;
                    write(&mut writer, Event::Empty(e))?;
                }
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                if in_clock && depth == 1 {
                    in_clock = false;
                    if let (false, Some(track)) = (seen_rtc, rtc_track) {
                        let indent = clock_indent.clone().unwrap_or_default();
                        write_rtc_timer(&mut writer, &indent, track)?;
                    }
                    flush(&mut writer, &mut held)?;
                } else if depth == 0 && seen_root && !seen_clock {
                    // No `<clock>` at all: add one as the last child of `<domain>`.
                    write_new_clock(&mut writer, &last_ws, offset, rtc_track)?;
                    seen_clock = true;
                }
                flush(&mut writer, &mut held)?;
                write(&mut writer, Event::End(e))?;
            }
            Event::Eof => break,
            other => {
                flush(&mut writer, &mut held)?;
                write(&mut writer, other)?;
            }
        }
    }
    if !seen_root {
        return Err(XmlError::Invalid("the root element is not <domain>".into()));
    }
    String::from_utf8(writer.into_inner())
        .map_err(|e| XmlError::Invalid(format!("rewritten XML is not UTF-8: {e}")))
}

/// Writes `start` (a `<clock>` tag) as a self-closing element, or, with a track, as an element
/// holding one rtc timer. `ws` is the whitespace before the clock tag.
fn write_clock(
    writer: &mut Writer<Vec<u8>>,
    start: BytesStart<'_>,
    ws: &str,
    rtc_track: Option<&str>,
) -> Result<(), XmlError> {
    match rtc_track {
        None => write(writer, Event::Empty(start)),
        Some(track) => {
            write(writer, Event::Start(start))?;
            write_rtc_timer(writer, ws, track)?;
            write_ws(writer, newline_indent(ws, 0).as_deref())?;
            write(writer, Event::End(BytesEnd::new("clock")))
        }
    }
}

/// Adds a `<clock>` before `</domain>`; `last_ws` is the whitespace already written before it.
fn write_new_clock(
    writer: &mut Writer<Vec<u8>>,
    last_ws: &str,
    offset: Option<&str>,
    rtc_track: Option<&str>,
) -> Result<(), XmlError> {
    let child = newline_indent(last_ws, 1);
    // The newline before `</domain>` is already written: indent, clock, then a newline again.
    write_ws(writer, child.as_deref().map(|s| s.trim_start_matches('\n')))?;
    let mut clock = BytesStart::new("clock");
    if let Some(offset) = offset {
        clock.push_attribute(("offset", offset));
    }
    write_clock(writer, clock, &child.unwrap_or_default(), rtc_track)?;
    write_ws(writer, Some(last_ws))
}

/// Writes `<timer name="rtc" track=".."/>` indented one level below `parent_ws` (the whitespace
/// that precedes the parent's tag).
fn write_rtc_timer(
    writer: &mut Writer<Vec<u8>>,
    parent_ws: &str,
    track: &str,
) -> Result<(), XmlError> {
    write_ws(writer, newline_indent(parent_ws, 1).as_deref())?;
    let mut timer = BytesStart::new("timer");
    timer.push_attribute(("name", "rtc"));
    timer.push_attribute(("track", track));
    write(writer, Event::Empty(timer))
}

/// `"\n" + indentation + levels * two spaces` when the document is indented (the preceding
/// whitespace holds a newline), else `None` (compact XML gets no whitespace).
fn newline_indent(preceding_ws: &str, levels: usize) -> Option<String> {
    preceding_ws.starts_with('\n').then(|| {
        let mut s = preceding_ws.to_owned();
        for _ in 0..levels {
            s.push_str("  ");
        }
        s
    })
}

/// The newline and indentation at the end of a whitespace text, or empty.
fn indentation_of(t: &BytesText<'_>) -> String {
    let s = String::from_utf8_lossy(t);
    match s.rfind('\n') {
        Some(i) if s[i..].chars().all(char::is_whitespace) => s[i..].to_owned(),
        _ => String::new(),
    }
}

fn write_ws(writer: &mut Writer<Vec<u8>>, ws: Option<&str>) -> Result<(), XmlError> {
    match ws {
        Some(ws) if !ws.is_empty() => write(writer, Event::Text(BytesText::from_escaped(ws))),
        _ => Ok(()),
    }
}

fn flush(
    writer: &mut Writer<Vec<u8>>,
    held: &mut Option<BytesText<'static>>,
) -> Result<(), XmlError> {
    match held.take() {
        Some(t) => write(writer, Event::Text(t)),
        None => Ok(()),
    }
}

fn write(writer: &mut Writer<Vec<u8>>, event: Event<'_>) -> Result<(), XmlError> {
    writer
        .write_event(event)
        .map_err(|e| XmlError::Invalid(format!("cannot write XML: {e}")))
}

/// `start` with attribute `key` set to `value`; the original, byte for byte, when `value` is
/// `None` or already the attribute's value.
fn edit_attr<'a>(
    start: &BytesStart<'a>,
    key: &str,
    value: Option<&str>,
) -> Result<BytesStart<'a>, XmlError> {
    let Some(value) = value else {
        return Ok(start.clone());
    };
    if attribute(start, key)?.as_deref() == Some(value) {
        return Ok(start.clone());
    }
    let mut edited = BytesStart::new(element_name(start));
    let mut replaced = false;
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError::Invalid(format!("bad attribute: {e}")))?;
        let name = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        if name == key {
            edited.push_attribute((key, value));
            replaced = true;
        } else {
            let v = attr
                .unescape_value()
                .map_err(|e| XmlError::Invalid(format!("bad attribute {name}: {e}")))?;
            edited.push_attribute((name.as_str(), v.as_ref()));
        }
    }
    if !replaced {
        edited.push_attribute((key, value));
    }
    Ok(edited)
}

fn is_rtc(e: &BytesStart<'_>) -> Result<bool, XmlError> {
    Ok(attribute(e, "name")?.as_deref() == Some("rtc"))
}

fn element_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

fn attribute(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, XmlError> {
    let attr = e
        .try_get_attribute(key)
        .map_err(|err| XmlError::Invalid(format!("bad attribute {key}: {err}")))?;
    attr.map(|a| {
        a.unescape_value()
            .map(Cow::into_owned)
            .map_err(|err| XmlError::Invalid(format!("bad attribute {key}: {err}")))
    })
    .transpose()
}

fn syntax(reader: &Reader<&[u8]>, source: quick_xml::Error) -> XmlError {
    XmlError::Syntax {
        position: reader.error_position(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBVIRT: &str = "<domain type='kvm'>
  <name>web-01</name>
  <uuid>abf5f9ff-6d72-4ca1-a391-83b7c9ec2935</uuid>
  <title>Web &amp; mail</title>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <numatune>
    <memory mode='strict' nodeset='0'/>
  </numatune>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' track='guest' tickpolicy='catchup'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <memballoon model='virtio'/>
  </devices>
</domain>
";

    fn changed_lines(before: &str, after: &str) -> (Vec<String>, Vec<String>) {
        let b: Vec<&str> = before.lines().collect();
        let a: Vec<&str> = after.lines().collect();
        let removed = b
            .iter()
            .filter(|l| !a.contains(l))
            .map(|s| (*s).to_owned())
            .collect();
        let added = a
            .iter()
            .filter(|l| !b.contains(l))
            .map(|s| (*s).to_owned())
            .collect();
        (removed, added)
    }

    #[test]
    fn agent_channel_is_a_virtio_channel_target_under_devices() {
        let with = "<domain><devices><channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel></devices></domain>";
        assert!(has_agent_channel(with).unwrap());
        let spice = "<domain><devices><channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel></devices></domain>";
        assert!(!has_agent_channel(spice).unwrap());
        let misplaced = "<domain><metadata><devices><channel><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></metadata></domain>";
        assert!(!has_agent_channel(misplaced).unwrap());
        assert!(
            has_agent_channel("<domain><devices>").is_err()
                || !has_agent_channel("<domain><devices>").unwrap()
        );
    }

    #[test]
    fn summarize_reads_direct_children_of_domain_only() {
        let s = summarize(LIBVIRT).unwrap();
        assert_eq!(s.memory, Kib(131_072));
        assert_eq!(s.max_memory, Kib(262_144));
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.max_vcpus, 2);
        assert_eq!(s.title, "Web & mail");
        assert_eq!(s.description, "");
        assert_eq!(
            s.clock,
            ClockState {
                offset: Some("utc".into()),
                rtc_track: Some("guest".into())
            }
        );
    }

    /// libvirt's `balloon.current` (what the bulk read of shut-off domains uses) is the whole
    /// `<memory>` of a domain without a balloon device; the XML read must say the same, or a
    /// step planned from one read would be refused as drift by the other.
    #[test]
    fn summarize_without_a_balloon_device_reports_the_full_memory() {
        let xml = |balloon: &str| {
            format!(
                "<domain><memory unit='MiB'>256</memory><currentMemory unit='MiB'>128</currentMemory>\
                 <vcpu>1</vcpu><devices>{balloon}</devices></domain>"
            )
        };
        let none = summarize(&xml("<memballoon model='none'/>")).unwrap();
        assert_eq!((none.memory, none.max_memory), (Kib(262_144), Kib(262_144)));
        let virtio = summarize(&xml("<memballoon model='virtio'/>")).unwrap();
        assert_eq!(virtio.memory, Kib(131_072));
        let absent = summarize(&xml("")).unwrap();
        assert_eq!(
            absent.memory,
            Kib(131_072),
            "the test driver lists no balloon"
        );
    }

    #[test]
    fn config_figures_default_current_to_maximum_and_convert_units() {
        let xml = "<domain><memory unit='MiB'>512</memory><vcpu>4</vcpu></domain>";
        let f = read_config_figures(xml).unwrap();
        assert_eq!(
            f,
            ConfigFigures {
                memory: Kib(524_288),
                max_memory: Kib(524_288),
                vcpus: 4,
                max_vcpus: 4
            }
        );
        let bytes = "<domain><memory unit='b'>1025</memory><vcpu>1</vcpu></domain>";
        assert_eq!(read_config_figures(bytes).unwrap().memory, Kib(2));
    }

    #[test]
    fn config_figures_require_memory_and_vcpu() {
        assert!(matches!(
            read_config_figures("<domain><vcpu>1</vcpu></domain>"),
            Err(XmlError::Invalid(_))
        ));
        assert!(matches!(
            read_config_figures("<domain><memory>1</memory><vcpu>x</vcpu></domain>"),
            Err(XmlError::Invalid(_))
        ));
    }

    #[test]
    fn read_clock_variants() {
        assert_eq!(
            read_clock("<domain><clock offset='localtime'/></domain>").unwrap(),
            ClockState {
                offset: Some("localtime".into()),
                rtc_track: None
            }
        );
        assert_eq!(read_clock("<domain/>").unwrap(), ClockState::default());
        assert_eq!(
            read_clock("<domain><clock><timer name='hpet' present='no'/><timer name='rtc'/></clock></domain>")
                .unwrap(),
            ClockState::default()
        );
        assert!(matches!(
            read_clock("<domain><clock></domain>"),
            Err(XmlError::Syntax { .. })
        ));
    }

    #[test]
    fn set_clock_changes_only_the_rtc_timer_line() {
        let after = set_clock(LIBVIRT, None, Some("wall")).unwrap();
        let (removed, added) = changed_lines(LIBVIRT, &after);
        assert_eq!(
            removed,
            ["    <timer name='rtc' track='guest' tickpolicy='catchup'/>"]
        );
        assert_eq!(
            added,
            [r#"    <timer name="rtc" track="wall" tickpolicy="catchup"/>"#]
        );
        assert_eq!(
            read_clock(&after).unwrap().rtc_track.as_deref(),
            Some("wall")
        );
    }

    #[test]
    fn set_clock_offset_and_track_keep_other_timers() {
        let after = set_clock(LIBVIRT, Some("localtime"), Some("guest")).unwrap();
        let (removed, added) = changed_lines(LIBVIRT, &after);
        assert_eq!(removed, ["  <clock offset='utc'>"]);
        assert_eq!(added, [r#"  <clock offset="localtime">"#]);
        assert!(after.contains("<timer name='pit' tickpolicy='delay'/>"));
    }

    #[test]
    fn set_clock_with_same_values_is_byte_identical() {
        assert_eq!(
            set_clock(LIBVIRT, Some("utc"), Some("guest")).unwrap(),
            LIBVIRT
        );
        assert_eq!(set_clock(LIBVIRT, None, None).unwrap(), LIBVIRT);
    }

    #[test]
    fn set_clock_expands_a_self_closing_clock() {
        let before = "<domain type='test'>\n  <name>a</name>\n  <clock offset='utc'/>\n  <on_crash>destroy</on_crash>\n</domain>\n";
        let after = set_clock(before, None, Some("wall")).unwrap();
        assert_eq!(
            after,
            "<domain type='test'>\n  <name>a</name>\n  <clock offset='utc'>\n    <timer name=\"rtc\" track=\"wall\"/>\n  </clock>\n  <on_crash>destroy</on_crash>\n</domain>\n"
        );
        let offset_only = set_clock(before, Some("localtime"), None).unwrap();
        assert_eq!(
            offset_only,
            before.replace("<clock offset='utc'/>", "<clock offset=\"localtime\"/>")
        );
    }

    #[test]
    fn set_clock_adds_rtc_timer_after_other_timers() {
        let before = "<domain>\n  <clock offset='utc'>\n    <timer name='pit' tickpolicy='delay'/>\n  </clock>\n</domain>";
        let after = set_clock(before, None, Some("guest")).unwrap();
        assert_eq!(
            after,
            "<domain>\n  <clock offset='utc'>\n    <timer name='pit' tickpolicy='delay'/>\n    <timer name=\"rtc\" track=\"guest\"/>\n  </clock>\n</domain>"
        );
    }

    #[test]
    fn set_clock_creates_an_absent_clock() {
        let before =
            "<domain type='kvm'>\n  <name>a</name>\n  <devices>\n  </devices>\n</domain>\n";
        let after = set_clock(before, Some("utc"), Some("wall")).unwrap();
        assert_eq!(
            after,
            "<domain type='kvm'>\n  <name>a</name>\n  <devices>\n  </devices>\n  <clock offset=\"utc\">\n    <timer name=\"rtc\" track=\"wall\"/>\n  </clock>\n</domain>\n"
        );
        let compact = set_clock("<domain><name>a</name></domain>", None, Some("wall")).unwrap();
        assert_eq!(
            compact,
            "<domain><name>a</name><clock><timer name=\"rtc\" track=\"wall\"/></clock></domain>"
        );
    }

    #[test]
    fn set_clock_escapes_values_and_keeps_comments() {
        let before =
            "<?xml version='1.0'?>\n<!-- keep me -->\n<domain><clock offset='utc'/></domain>";
        let after = set_clock(before, Some("a\"<b"), None).unwrap();
        assert!(after.starts_with("<?xml version='1.0'?>\n<!-- keep me -->\n"));
        assert_eq!(read_clock(&after).unwrap().offset.as_deref(), Some("a\"<b"));
    }

    #[test]
    fn set_clock_ignores_nested_clock_like_elements() {
        let before = "<domain><devices><clock offset='x'/></devices></domain>";
        let after = set_clock(before, Some("utc"), None).unwrap();
        assert_eq!(
            after,
            "<domain><devices><clock offset='x'/></devices><clock offset=\"utc\"/></domain>"
        );
    }

    #[test]
    fn set_clock_rejects_non_domain_documents() {
        assert!(set_clock("<network/>", Some("utc"), None).is_err());
        assert!(set_clock("<domain><clock></domain>", Some("utc"), None).is_err());
    }
}
