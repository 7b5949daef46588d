//! Generated test-driver node XML fleets, for fast tests and benchmarks.
//!
//! libvirt's `test` driver reads a whole fake host from one file: `test:///abs/path/node.xml`.
//! Each connection to such a URI gets its own private copy of the host, so tests using their own
//! file never see each other's changes (unlike `test:///default`, shared by the whole process).
//! See <https://libvirt.org/drvtest.html>.
//!
//! The node file cannot express autostart; set it through the API after connecting.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

use crate::state::Kib;

/// The namespace of the test driver's per-domain extensions, such as `<test:runstate>`.
pub const TEST_NAMESPACE: &str = "http://libvirt.org/schemas/domain/test/1.0";

/// libvirt's `VIR_DOMAIN_SHUTOFF`, for `<test:runstate>`.
const RUNSTATE_SHUTOFF: &str = "5";

/// CPUs of the generated host (1 NUMA node, 1 socket, 8 cores, 2 threads).
pub const FLEET_HOST_CPUS: u32 = 16;

/// Memory of the generated host.
pub const FLEET_HOST_MEMORY: Kib = Kib::from_mib(64 * 1024);

/// One domain of a generated fleet. Start from [`FleetDomain::new`] and adjust with the
/// builder methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetDomain {
    pub name: String,
    /// Fixed UUID; libvirt generates one when `None`.
    pub uuid: Option<String>,
    /// `<currentMemory>`.
    pub memory: Kib,
    /// `<memory>`.
    pub max_memory: Kib,
    /// `current` attribute of `<vcpu>`.
    pub vcpus: u32,
    /// Content of `<vcpu>`.
    pub max_vcpus: u32,
    /// Running at connection time; shut off otherwise.
    pub running: bool,
    /// `offset` of `<clock>`; no `<clock>` element when this and `rtc_track` are `None`.
    pub clock_offset: Option<String>,
    /// `track` of `<timer name='rtc'>`.
    pub rtc_track: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
}

impl FleetDomain {
    /// A shut-off domain with 128 MiB of 256 MiB, 1 of 2 vCPUs, `<clock offset='utc'>` and no
    /// RTC timer.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            uuid: None,
            memory: Kib::from_mib(128),
            max_memory: Kib::from_mib(256),
            vcpus: 1,
            max_vcpus: 2,
            running: false,
            clock_offset: Some("utc".to_owned()),
            rtc_track: None,
            title: None,
            description: None,
        }
    }

    #[must_use]
    pub fn uuid(mut self, uuid: impl Into<String>) -> Self {
        self.uuid = Some(uuid.into());
        self
    }

    #[must_use]
    pub fn memory(mut self, memory: Kib, max_memory: Kib) -> Self {
        self.memory = memory;
        self.max_memory = max_memory;
        self
    }

    #[must_use]
    pub fn vcpus(mut self, vcpus: u32, max_vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self.max_vcpus = max_vcpus;
        self
    }

    #[must_use]
    pub fn running(mut self, running: bool) -> Self {
        self.running = running;
        self
    }

    #[must_use]
    pub fn clock(mut self, offset: Option<&str>, rtc_track: Option<&str>) -> Self {
        self.clock_offset = offset.map(str::to_owned);
        self.rtc_track = rtc_track.map(str::to_owned);
        self
    }

    #[must_use]
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    #[must_use]
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

/// The test driver's node document: a host section and one `<domain>` per entry.
#[must_use]
pub fn node_xml(domains: &[FleetDomain]) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    // Writing into a Vec cannot fail, so the io::Results below are infallible.
    let _ = write_node(&mut w, domains);
    String::from_utf8_lossy(&w.into_inner()).into_owned()
}

fn write_node(w: &mut Writer<Vec<u8>>, domains: &[FleetDomain]) -> io::Result<()> {
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    w.write_event(Event::Start(BytesStart::new("node")))?;

    w.write_event(Event::Start(BytesStart::new("cpu")))?;
    for (name, value) in [
        ("mhz", "2000"),
        ("model", "x86_64"),
        ("nodes", "1"),
        ("sockets", "1"),
        ("cores", "8"),
        ("threads", "2"),
    ] {
        text_element(w, name, value, &[])?;
    }
    text_element(w, "active", &FLEET_HOST_CPUS.to_string(), &[])?;
    w.write_event(Event::End(BytesEnd::new("cpu")))?;
    text_element(w, "memory", &FLEET_HOST_MEMORY.0.to_string(), &[])?;

    for d in domains {
        write_domain(w, d)?;
    }
    w.write_event(Event::End(BytesEnd::new("node")))?;
    Ok(())
}

fn write_domain(w: &mut Writer<Vec<u8>>, d: &FleetDomain) -> io::Result<()> {
    let mut domain = BytesStart::new("domain");
    domain.push_attribute(("type", "test"));
    domain.push_attribute(("xmlns:test", TEST_NAMESPACE));
    w.write_event(Event::Start(domain))?;
    text_element(w, "name", &d.name, &[])?;
    if let Some(uuid) = &d.uuid {
        text_element(w, "uuid", uuid, &[])?;
    }
    if let Some(title) = &d.title {
        text_element(w, "title", title, &[])?;
    }
    if let Some(description) = &d.description {
        text_element(w, "description", description, &[])?;
    }
    let unit = [("unit", "KiB")];
    text_element(w, "memory", &d.max_memory.0.to_string(), &unit)?;
    text_element(w, "currentMemory", &d.memory.0.to_string(), &unit)?;
    let current = d.vcpus.to_string();
    text_element(
        w,
        "vcpu",
        &d.max_vcpus.to_string(),
        &[("current", &current)],
    )?;

    w.write_event(Event::Start(BytesStart::new("os")))?;
    text_element(w, "type", "hvm", &[("arch", "x86_64")])?;
    w.write_event(Event::End(BytesEnd::new("os")))?;

    if d.clock_offset.is_some() || d.rtc_track.is_some() {
        let mut clock = BytesStart::new("clock");
        if let Some(offset) = &d.clock_offset {
            clock.push_attribute(("offset", offset.as_str()));
        }
        match &d.rtc_track {
            None => w.write_event(Event::Empty(clock))?,
            Some(track) => {
                w.write_event(Event::Start(clock))?;
                let mut timer = BytesStart::new("timer");
                timer.push_attribute(("name", "rtc"));
                timer.push_attribute(("track", track.as_str()));
                w.write_event(Event::Empty(timer))?;
                w.write_event(Event::End(BytesEnd::new("clock")))?;
            }
        }
    }
    if !d.running {
        text_element(w, "test:runstate", RUNSTATE_SHUTOFF, &[])?;
    }
    w.write_event(Event::End(BytesEnd::new("domain")))?;
    Ok(())
}

fn text_element(
    w: &mut Writer<Vec<u8>>,
    name: &str,
    text: &str,
    attributes: &[(&str, &str)],
) -> io::Result<()> {
    let mut start = BytesStart::new(name);
    for attr in attributes {
        start.push_attribute(*attr);
    }
    w.write_event(Event::Start(start))?;
    w.write_event(Event::Text(BytesText::new(text)))?;
    w.write_event(Event::End(BytesEnd::new(name)))?;
    Ok(())
}

/// Writes `node.xml` for `domains` into `dir` and returns its connection URI,
/// `test:///<absolute path>/node.xml`.
///
/// # Errors
///
/// Fails when the file cannot be written or the path is not UTF-8.
pub fn write_fleet(dir: &Path, domains: &[FleetDomain]) -> io::Result<String> {
    let path = std::path::absolute(dir.join("node.xml"))?;
    std::fs::write(&path, node_xml(domains))?;
    let path = path.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not UTF-8: it cannot go in a URI", path.display()),
        )
    })?;
    Ok(format!("test://{}", percent_encode_path(path)))
}

/// Escapes what a URI path cannot hold; libvirt decodes it again when parsing the URI.
fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_xml_escapes_names_and_marks_shutoff_domains() {
        let xml = node_xml(&[
            FleetDomain::new("a<&>'\"b").title("x & y"),
            FleetDomain::new("up")
                .running(true)
                .clock(None, Some("wall")),
        ]);
        assert!(
            xml.contains("<name>a&lt;&amp;&gt;&apos;&quot;b</name>"),
            "{xml}"
        );
        assert!(xml.contains("<title>x &amp; y</title>"));
        assert_eq!(xml.matches("<test:runstate>5</test:runstate>").count(), 1);
        assert!(xml.contains(r#"<timer name="rtc" track="wall"/>"#));
        assert!(xml.contains(&format!(r#"xmlns:test="{TEST_NAMESPACE}""#)));
        assert!(xml.contains("<active>16</active>"));
    }

    #[test]
    fn write_fleet_returns_an_absolute_test_uri() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("with space");
        std::fs::create_dir(&sub).unwrap();
        let uri = write_fleet(&sub, &[FleetDomain::new("a")]).unwrap();
        assert!(uri.starts_with("test:///"), "{uri}");
        assert!(uri.ends_with("/with%20space/node.xml"), "{uri}");
        assert!(sub.join("node.xml").is_file());
    }
}
