//! `virtplan.toml`: defaults shared by a repository's plans (connection, named hosts, zone,
//! grace, shutdown policy, parallelism), found beside the plan or in a parent folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;

use crate::lease::LeaseConfig;
use crate::plan_file::diag::{did_you_mean, Diagnostic, Diagnostics, Pos};
use crate::plan_file::time::parse_zone;
use crate::plan_file::units::parse_duration;
use crate::plan_file::{ShutdownMode, ShutdownPolicy};
use crate::uri::Uri;

/// The configuration file's name.
pub const FILE_NAME: &str = "virtplan.toml";

/// Default number of domains changed at the same time.
pub use crate::plan_file::DEFAULT_PARALLELISM;

/// Checked configuration. `Default` is what applies with no file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from.
    pub path: Option<PathBuf>,
    /// The default connection, a host alias already resolved.
    pub connection: Option<Uri>,
    pub hosts: BTreeMap<String, Uri>,
    /// `[hosts.NAME] max_parallel = N`: at most N steps at once on that host's connection.
    pub host_caps: BTreeMap<Uri, usize>,
    pub timezone: Option<Tz>,
    pub grace: Option<Duration>,
    pub shutdown: ShutdownPolicy,
    pub parallelism: usize,
    /// `[lease]`: timing of domain leases; every executor of a fleet must share it.
    pub lease: LeaseConfig,
    /// Where lockfiles live instead of beside each plan (absolute; relative paths in the file
    /// are resolved against the file's folder).
    pub state_dir: Option<PathBuf>,
    /// `[[notify]]` targets: used by plans without a `notify` of their own.
    pub notify: Vec<crate::notify::Target>,
}

/// What a plan validated under this configuration inherits from it.
impl From<Config> for crate::plan_file::LoadContext {
    fn from(config: Config) -> Self {
        Self {
            connection: config.connection,
            hosts: config.hosts,
            host_caps: config.host_caps,
            timezone: config.timezone,
            grace: config.grace,
            shutdown: config.shutdown,
            parallelism: config.parallelism,
            notify: config.notify,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            path: None,
            connection: None,
            hosts: BTreeMap::new(),
            host_caps: BTreeMap::new(),
            timezone: None,
            grace: None,
            shutdown: ShutdownPolicy::default(),
            parallelism: DEFAULT_PARALLELISM,
            lease: LeaseConfig::default(),
            state_dir: None,
            notify: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    connection: Option<toml::Spanned<String>>,
    #[serde(default)]
    hosts: BTreeMap<String, toml::Spanned<RawHost>>,
    timezone: Option<toml::Spanned<String>>,
    grace: Option<toml::Spanned<String>>,
    shutdown: Option<RawShutdown>,
    parallelism: Option<toml::Spanned<i64>>,
    lease: Option<RawLease>,
    state_dir: Option<toml::Spanned<String>>,
    #[serde(default)]
    notify: Vec<toml::Spanned<RawNotify>>,
}

type Spanned<T> = toml::Spanned<T>;

/// One entry of `[hosts]`: `hv1 = "qemu+ssh://hv1/system"`, or a table
/// `[hosts.hv1] uri = "…"  max_parallel = 4` (`uri` may be left out when the table's name is
/// itself a URI: `[hosts."qemu:///system"] max_parallel = 4`). Read as a TOML value and checked
/// by hand: serde's untagged enums lose the positions errors need.
type RawHost = toml::Value;

/// One `[[notify]]` table (the same keys as a plan's `notify` entry).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    on: Option<Spanned<Vec<Spanned<String>>>>,
    webhook: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    email: Option<Spanned<RawNotifyEmail>>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    ttl: Option<toml::Spanned<String>>,
    settle: Option<toml::Spanned<String>>,
    max_clock_skew: Option<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifyEmail {
    to: Option<Spanned<Vec<Spanned<String>>>>,
    from: Option<Spanned<String>>,
    smtp: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    mode: Option<toml::Spanned<String>>,
    timeout: Option<toml::Spanned<String>>,
    force_after_timeout: Option<bool>,
}

const KEYS: &[&str] = &[
    "connection",
    "hosts",
    "timezone",
    "grace",
    "shutdown",
    "parallelism",
    "lease",
    "state_dir",
    "notify",
];

/// libvirt's own default connection, used (as virsh does) when nothing else names one.
pub const LIBVIRT_DEFAULT_URI: &str = "LIBVIRT_DEFAULT_URI";

/// Finds the configuration for a plan: `explicit` if given, else the nearest `virtplan.toml` in
/// the plan's folder or its parents, else the user's config folder, else defaults.
/// `LIBVIRT_DEFAULT_URI` is the connection when none of them sets one: the lowest precedence
/// (`--connect` > step > plan > virtplan.toml > `LIBVIRT_DEFAULT_URI`).
///
/// # Errors
/// A located diagnostic when the file found cannot be read or is invalid.
pub fn discover(explicit: Option<&Path>, plan: Option<&Path>) -> Result<Config, Diagnostics> {
    let mut config = discover_file(explicit, plan)?;
    if config.connection.is_none() {
        config.connection = std::env::var(LIBVIRT_DEFAULT_URI)
            .ok()
            .filter(|uri| !uri.trim().is_empty())
            .map(Uri::new);
    }
    Ok(config)
}

fn discover_file(explicit: Option<&Path>, plan: Option<&Path>) -> Result<Config, Diagnostics> {
    if let Some(path) = explicit {
        return load(path);
    }
    let start = plan
        .and_then(|p| std::path::absolute(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let nearest = start
        .iter()
        .flat_map(|dir| dir.ancestors())
        .map(|dir| dir.join(FILE_NAME))
        // Whatever is there counts, so a folder or FIFO named virtplan.toml is reported by
        // `load` rather than silently skipped.
        .find(|candidate| candidate.symlink_metadata().is_ok());
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|dir| dir.join("virtplan").join(FILE_NAME))
        .filter(|p| p.symlink_metadata().is_ok());
    nearest
        .or(user)
        .map_or_else(|| Ok(Config::default()), |p| load(&p))
}

/// Reads and checks one configuration file.
///
/// # Errors
/// A located diagnostic for unreadable files, TOML errors, unknown keys and bad values.
pub fn load(path: &Path) -> Result<Config, Diagnostics> {
    let fail = |text: Option<String>, items: Vec<Diagnostic>| Diagnostics {
        file: path.to_path_buf(),
        text,
        items,
    };
    let text = read(path).map_err(|item| fail(None, vec![item]))?;
    let at = |span: std::ops::Range<usize>| Pos::of_offset(&text, span.start);
    let raw: RawConfig = toml::from_str(&text).map_err(|e| {
        let pos = e.span().map_or(Pos::new(1, 1), at);
        let message = e.message().trim().to_owned();
        let help = unknown_key_help(&message);
        fail(
            Some(text.clone()),
            vec![
                Diagnostic::new(path, pos, format!("invalid virtplan.toml: {message}"))
                    .with_help(help),
            ],
        )
    })?;
    let mut diags = Vec::new();
    let mut config = Config {
        path: Some(path.to_path_buf()),
        ..Config::default()
    };
    diags.extend(connections(
        &mut config,
        raw.hosts,
        raw.connection,
        path,
        &text,
    ));
    if let Some(tz) = raw.timezone {
        match parse_zone(tz.get_ref()) {
            Ok(zone) => config.timezone = Some(zone),
            Err(e) => diags.push(Diagnostic::new(path, at(tz.span()), e.message).with_help(e.help)),
        }
    }
    let duration = |value: toml::Spanned<String>, diags: &mut Vec<Diagnostic>| {
        parse_duration(value.get_ref())
            .map_err(|e| {
                diags.push(Diagnostic::new(path, at(value.span()), e.message).with_help(e.help));
            })
            .ok()
    };
    if let Some(grace) = raw.grace {
        config.grace = duration(grace, &mut diags);
    }
    if let Some(shutdown) = raw.shutdown {
        if let Some(mode) = shutdown.mode {
            match mode.get_ref().as_str() {
                "graceful" => config.shutdown.mode = ShutdownMode::Graceful,
                "force" => config.shutdown.mode = ShutdownMode::Force,
                other => diags.push(
                    Diagnostic::new(
                        path,
                        at(mode.span()),
                        format!("shutdown mode must be `graceful` or `force`, found `{other}`"),
                    )
                    .with_help("`graceful` asks the guest and waits; `force` destroys at once"),
                ),
            }
        }
        if let Some(timeout) = shutdown.timeout.and_then(|t| duration(t, &mut diags)) {
            config.shutdown.timeout = timeout;
        }
        if let Some(force) = shutdown.force_after_timeout {
            config.shutdown.force_after_timeout = force;
        }
    }
    if let Some(dir) = raw.state_dir {
        match state_dir(path, &dir, at(dir.span())) {
            Ok(dir) => config.state_dir = Some(dir),
            Err(d) => diags.push(d),
        }
    }
    if let Some(p) = raw.parallelism {
        match parallelism(path, &p, at(p.span())) {
            Ok(n) => config.parallelism = n,
            Err(d) => diags.push(d),
        }
    }
    if let Some(lease) = raw.lease {
        lease_config(path, &text, lease, &mut config.lease, &mut diags);
    }
    config.notify = notify_targets(path, &text, raw.notify, &mut diags);
    if diags.is_empty() {
        Ok(config)
    } else {
        Err(fail(Some(text), diags))
    }
}

/// `[lease]`: each duration checked and bounded, with its position on error.
fn lease_config(
    path: &Path,
    text: &str,
    raw: RawLease,
    lease: &mut LeaseConfig,
    diags: &mut Vec<Diagnostic>,
) {
    let mut read =
        |value: Option<toml::Spanned<String>>, min: Duration, max: Duration, help: &str| {
            let value = value?;
            let pos = Pos::of_offset(text, value.span().start);
            match parse_duration(value.get_ref()) {
                Ok(d) if (min..=max).contains(&d) => Some(d),
                Ok(_) => {
                    diags.push(
                        Diagnostic::new(
                            path,
                            pos,
                            format!(
                                "lease duration `{}` is out of range ({} to {})",
                                value.get_ref(),
                                humantime::format_duration(min),
                                humantime::format_duration(max)
                            ),
                        )
                        .with_help(help),
                    );
                    None
                }
                Err(e) => {
                    diags.push(Diagnostic::new(path, pos, e.message).with_help(e.help));
                    None
                }
            }
        };
    // Where a settle delay too long for the lease's lifetime is reported: the settle value,
    // or the ttl when only that was given.
    let pair_pos = raw
        .settle
        .as_ref()
        .or(raw.ttl.as_ref())
        .map(|v| Pos::of_offset(text, v.span().start));
    let settle = read(
        raw.settle,
        Duration::from_millis(30),
        Duration::from_secs(60),
        "the settle delay must be far longer than one libvirt round trip to the farthest host, such as 300ms",
    );
    let ttl = read(
        raw.ttl,
        Duration::from_secs(5),
        Duration::from_secs(3600),
        "how long a lease outlives a dead executor, such as 60s",
    );
    let skew = read(
        raw.max_clock_skew,
        Duration::ZERO,
        Duration::from_secs(600),
        "how far apart the admin hosts' clocks may be, such as 5s",
    );
    if let Some(settle) = settle {
        *lease = lease.with_settle(settle);
    }
    if let Some(ttl) = ttl {
        lease.ttl = ttl;
    }
    if let Some(skew) = skew {
        lease.max_skew = skew;
    }
    // A record is read back `settle` after its write, and taken only while it is younger than
    // one renewal period (a third of ttl; see `lease::Leaser::confirm`): leave a read-back as
    // long again to come late.
    if let Some(pos) = pair_pos {
        if lease.settle.saturating_mul(6) > lease.ttl {
            diags.push(
                Diagnostic::new(
                    path,
                    pos,
                    format!(
                        "lease settle {} is too long for ttl {}: ttl must be at least 6 times settle",
                        humantime::format_duration(lease.settle),
                        humantime::format_duration(lease.ttl)
                    ),
                )
                .with_help(
                    "a lease is renewed every third of its ttl, and its record must be read back well within that; raise ttl (such as 60s) or shorten settle (such as 300ms)",
                ),
            );
        }
    }
}

/// `state_dir`: resolved against the configuration file's folder.
fn state_dir(path: &Path, dir: &toml::Spanned<String>, pos: Pos) -> Result<PathBuf, Diagnostic> {
    if dir.get_ref().trim().is_empty() {
        return Err(
            Diagnostic::new(path, pos, "state_dir is empty".to_owned()).with_help(
                "name the folder for lockfiles, such as \"/var/lib/virtplan\", or leave the key out to keep them beside each plan",
            ),
        );
    }
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    Ok(normalize(&base.join(dir.get_ref())))
}

/// An absolute path with `.` and `..` resolved lexically (the folder may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Checks the `[[notify]]` tables, adding located problems to `diags`.
fn notify_targets(
    path: &Path,
    text: &str,
    tables: Vec<Spanned<RawNotify>>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<crate::notify::Target> {
    let mut targets = Vec::new();
    for (i, table) in tables.into_iter().enumerate() {
        let what = format!("[[notify]] table {}", i + 1);
        let raw = notify_target(text, table);
        match crate::notify::target::check(&raw, &what) {
            Ok(target) => targets.push(target),
            Err(problems) => diags.extend(
                problems
                    .into_iter()
                    .map(|p| Diagnostic::new(path, p.pos, p.message).with_help(p.help)),
            ),
        }
    }
    targets
}

/// A `[[notify]]` table in the positioned form the plan's `notify` entries also take.
fn notify_target(text: &str, table: Spanned<RawNotify>) -> crate::notify::target::RawTarget {
    use crate::notify::target::{RawEmail, RawTarget};
    use crate::plan_file::Located;
    let at = |span: std::ops::Range<usize>| Pos::of_offset(text, span.start);
    let one = |s: Spanned<String>| Located {
        pos: at(s.span()),
        value: s.into_inner(),
    };
    let list = |s: Spanned<Vec<Spanned<String>>>| Located {
        pos: at(s.span()),
        value: s.into_inner().into_iter().map(one).collect(),
    };
    let pos = at(table.span());
    let raw = table.into_inner();
    RawTarget {
        pos,
        on: raw.on.map(list),
        webhook: raw.webhook.map(one),
        format: raw.format.map(one),
        email: raw.email.map(|e| {
            let pos = at(e.span());
            let e = e.into_inner();
            Located {
                pos,
                value: RawEmail {
                    to: e.to.map(list),
                    from: e.from.map(one),
                    smtp: e.smtp.map(one),
                    username: e.username.map(one),
                    password_env: e.password_env.map(one),
                    password_file: e.password_file.map(one),
                },
            }
        }),
        command: raw.command.map(list),
        timeout: raw.timeout.map(one),
    }
}

/// `parallelism`: 1 to 256.
fn parallelism(path: &Path, p: &toml::Spanned<i64>, pos: Pos) -> Result<usize, Diagnostic> {
    match usize::try_from(*p.get_ref()) {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(Diagnostic::new(
            path,
            pos,
            format!(
                "parallelism must be between 1 and 256, found {}",
                p.get_ref()
            ),
        )
        .with_help("how many domains virtplan changes at the same time, such as 8")),
    }
}

/// `[hosts.NAME] max_parallel`: 1 to 256.
fn host_cap(path: &Path, p: &toml::Value, pos: Pos) -> Result<usize, Diagnostic> {
    match p.as_integer().map(usize::try_from) {
        Some(Ok(n)) if (1..=256).contains(&n) => Ok(n),
        _ => Err(Diagnostic::new(
            path,
            pos,
            format!("a host's max_parallel must be a whole number between 1 and 256, found {p}"),
        )
        .with_help("how many steps may run at once on this host, such as 4")),
    }
}

impl Config {
    /// A connection as written in a plan, virtplan.toml or `--connect`: a libvirt URI (it has
    /// `:/`) as is, else the URI of the host alias of that name; `None` when it is neither.
    #[must_use]
    pub fn resolve_connection(&self, text: &str) -> Option<Uri> {
        crate::uri::resolve_connection(text, &self.hosts)
    }

    /// How to fix a connection that is neither a URI nor a known host.
    #[must_use]
    pub fn hosts_help(&self, text: &str) -> String {
        let names: Vec<&str> = self.hosts.keys().map(String::as_str).collect();
        if let Some(close) = did_you_mean(text, &names) {
            return format!("did you mean the host `{close}`?");
        }
        if self.hosts.is_empty() {
            "write a libvirt URI such as qemu:///system, or name a host from the `[hosts]` table of virtplan.toml".to_owned()
        } else {
            format!(
                "write a libvirt URI, or one of the hosts in virtplan.toml: {}",
                names.join(", ")
            )
        }
    }
}

/// The `[hosts]` table and the default `connection`, resolved through it.
fn connections(
    config: &mut Config,
    hosts: BTreeMap<String, toml::Spanned<RawHost>>,
    connection: Option<toml::Spanned<String>>,
    path: &Path,
    text: &str,
) -> Vec<Diagnostic> {
    let at = |span: std::ops::Range<usize>| Pos::of_offset(text, span.start);
    let mut diags = Vec::new();
    for (name, host) in hosts {
        let Some(uri) = host_entry(config, &name, host, path, text, &mut diags) else {
            continue;
        };
        match uri.get_ref().chars().find(|c| c.is_control()) {
            Some(c) => diags.push(
                Diagnostic::new(
                    path,
                    at(uri.span()),
                    format!(
                        "host `{}` has a URI with the control character U+{:04X}",
                        crate::text::escape(&name),
                        u32::from(c)
                    ),
                )
                .with_help("write the libvirt URI as plain text, such as qemu+ssh://hv1/system"),
            ),
            // A table named by its URI only sets limits: it is no alias.
            None if name.contains(":/") => {}
            None => {
                config.hosts.insert(name, Uri::new(uri.into_inner()));
            }
        }
    }
    if let Some(connection) = connection {
        match config.resolve_connection(connection.get_ref()) {
            Some(uri) => config.connection = Some(uri),
            None => diags.push(unknown_connection(
                config,
                path,
                at(connection.span()),
                connection.get_ref(),
            )),
        }
    }
    diags
}

/// One `[hosts]` entry: its URI (a string, or a table's `uri`), recording a table's
/// `max_parallel` in `config.host_caps`; `None` (with a diagnostic) when it is malformed.
fn host_entry(
    config: &mut Config,
    name: &str,
    host: toml::Spanned<RawHost>,
    path: &Path,
    text: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<toml::Spanned<String>> {
    let span = host.span();
    let at = |span: std::ops::Range<usize>| Pos::of_offset(text, span.start);
    // Where `key` is written inside this host's entry (else the entry itself).
    let key_pos = |key: &str| {
        let start = span.start.min(text.len());
        let end = span.end.min(text.len()).max(start);
        text.get(start..end)
            .and_then(|t| t.find(key))
            .map_or_else(|| at(span.clone()), |i| Pos::of_offset(text, start + i))
    };
    let uri = match host.into_inner() {
        toml::Value::String(uri) => toml::Spanned::new(span.clone(), uri),
        toml::Value::Table(table) => {
            if let Some(key) = table
                .keys()
                .find(|k| !["uri", "max_parallel"].contains(&k.as_str()))
            {
                diags.push(
                    Diagnostic::new(
                        path,
                        key_pos(key),
                        format!(
                            "unknown key `{}` in host `{}`",
                            crate::text::escape(key),
                            crate::text::escape(name)
                        ),
                    )
                    .with_help("a host table takes `uri` and `max_parallel`"),
                );
                return None;
            }
            let uri = match table.get("uri") {
                Some(toml::Value::String(uri)) => toml::Spanned::new(span.clone(), uri.clone()),
                None if name.contains(":/") => toml::Spanned::new(span.clone(), name.to_owned()),
                found => {
                    diags.push(
                        Diagnostic::new(
                            path,
                            found.map_or_else(|| at(span.clone()), |_| key_pos("uri")),
                            format!("host `{}` has no `uri` text", crate::text::escape(name)),
                        )
                        .with_help(format!(
                            "give its libvirt URI: `[hosts.{name}]` then `uri = \"qemu+ssh://{name}/system\"`"
                        )),
                    );
                    return None;
                }
            };
            if let Some(cap) = table.get("max_parallel") {
                match host_cap(path, cap, key_pos("max_parallel")) {
                    Ok(n) => {
                        config.host_caps.insert(Uri::new(uri.get_ref()), n);
                    }
                    Err(d) => diags.push(d),
                }
            }
            uri
        }
        other => {
            diags.push(
                Diagnostic::new(
                    path,
                    at(span.clone()),
                    format!("host `{}` must be a URI or a table, found {}", crate::text::escape(name), other.type_str()),
                )
                .with_help("write `hv1 = \"qemu+ssh://hv1/system\"`, or a `[hosts.hv1]` table with `uri` and `max_parallel`"),
            );
            return None;
        }
    };
    Some(uri)
}

/// Configuration files are small; anything larger is not one.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The file's text: a regular file (a folder named virtplan.toml is an error, not skipped),
/// bounded, without a byte-order mark.
fn read(path: &Path) -> Result<String, Diagnostic> {
    let text = crate::fsutil::read_regular_text(path, MAX_CONFIG_BYTES).map_err(|e| {
        Diagnostic::new(
            path,
            Pos::new(1, 1),
            format!("cannot read the configuration: {e}"),
        )
        .with_help("virtplan.toml must be a regular TOML file; fix or remove it, or name another with --config")
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

fn unknown_connection(config: &Config, path: &Path, pos: Pos, text: &str) -> Diagnostic {
    Diagnostic::new(
        path,
        pos,
        format!(
            "connection `{}` is neither a libvirt URI nor a host in [hosts]",
            crate::text::escape(text)
        ),
    )
    .with_help(config.hosts_help(text))
}

fn unknown_key_help(message: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    match unknown.and_then(|word| did_you_mean(word, KEYS)) {
        Some(close) => format!("did you mean `{close}`?"),
        None => format!(
            "known keys: {}; `[hosts]` maps names to libvirt URIs",
            KEYS.join(", ")
        ),
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, Diagnostics> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    #[test]
    fn lease_settings_set_settle_ttl_and_skew_and_derive_the_write_bound() {
        let config =
            load_text("[lease]\nsettle = \"900ms\"\nttl = \"2m\"\nmax_clock_skew = \"1s\"\n")
                .unwrap();
        assert_eq!(config.lease.settle, Duration::from_millis(900));
        assert_eq!(config.lease.max_write_delay, Duration::from_millis(300));
        assert_eq!(config.lease.ttl, Duration::from_secs(120));
        assert_eq!(config.lease.max_skew, Duration::from_secs(1));
    }

    #[test]
    fn host_tables_set_per_host_caps_and_keep_aliases() {
        let config = load_text(
            "[hosts]\nhv2 = \"qemu+ssh://hv2/system\"\n\n[hosts.hv1]\nuri = \"qemu+ssh://hv1/system\"\nmax_parallel = 4\n\n[hosts.\"qemu:///system\"]\nmax_parallel = 2\n",
        )
        .unwrap();
        assert_eq!(
            config.resolve_connection("hv1"),
            Some(Uri::new("qemu+ssh://hv1/system"))
        );
        assert_eq!(
            config.resolve_connection("hv2"),
            Some(Uri::new("qemu+ssh://hv2/system"))
        );
        assert_eq!(config.hosts.len(), 2, "a table named by a URI is no alias");
        assert_eq!(
            config.host_caps.get(&Uri::new("qemu+ssh://hv1/system")),
            Some(&4)
        );
        assert_eq!(config.host_caps.get(&Uri::new("qemu:///system")), Some(&2));
        assert_eq!(config.host_caps.len(), 2);
    }

    #[test]
    fn a_bad_host_cap_or_a_table_without_uri_is_a_located_error() {
        let err =
            load_text("[hosts.hv1]\nuri = \"qemu:///system\"\nmax_parallel = 0\n").unwrap_err();
        let item = &err.items[0];
        assert_eq!((item.pos.line, item.pos.column), (3, 1));
        assert!(
            item.message.contains("between 1 and 256"),
            "{}",
            item.message
        );
        let err = load_text("[hosts.hv1]\nmax_parallel = 3\n").unwrap_err();
        assert!(err.items[0].message.contains("has no `uri`"), "{err:?}");
        let err = load_text("[hosts]\nhv1 = 3\n").unwrap_err();
        assert!(
            err.items[0].message.contains("must be a URI or a table"),
            "{err:?}"
        );
        let err =
            load_text("[hosts.hv1]\nuri = \"qemu:///system\"\nmax_paralel = 3\n").unwrap_err();
        let message = &err.items[0].message;
        assert!(message.contains("max_paralel"), "{message}");
    }

    #[test]
    fn a_lease_settle_too_short_for_any_round_trip_is_a_located_error() {
        let err = load_text("[lease]\nsettle = \"1ms\"\n").unwrap_err();
        let item = &err.items[0];
        assert_eq!((item.pos.line, item.pos.column), (2, 10));
        assert!(item.message.contains("out of range"), "{}", item.message);
        let err = load_text("[lease]\nsetle = \"1s\"\n").unwrap_err();
        assert!(err.items[0].message.contains("setle"), "{err:?}");
    }

    #[test]
    fn a_lease_settle_too_long_for_its_ttl_is_a_located_error() {
        let err = load_text("[lease]\nttl = \"5s\"\nsettle = \"1s\"\n").unwrap_err();
        let item = &err.items[0];
        assert_eq!((item.pos.line, item.pos.column), (3, 10));
        assert!(
            item.message.contains(
                "lease settle 1s is too long for ttl 5s: ttl must be at least 6 times settle"
            ),
            "{}",
            item.message
        );
        // A ttl alone is checked against the default settle (300ms).
        assert!(load_text("[lease]\nttl = \"5s\"\n").is_ok());
        assert!(load_text("[lease]\nttl = \"5s\"\nsettle = \"800ms\"\n").is_ok());
    }
}
