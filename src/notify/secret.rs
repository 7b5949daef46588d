//! Secrets at the type level: a webhook URL (its path carries the token) and an SMTP password
//! print redacted wherever they are formatted, and neither implements `Serialize`, so no log
//! line, error, status or saved plan can carry one by accident.

use std::fmt;
use std::fmt::Write as _;

/// A value that must never be printed. `Display` and `Debug` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself, for the one call that needs it (an HTTP request, an SMTP login).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A webhook URL: shown as `https://chat.example.org/***`, scheme, host and port only.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(Secret<url::Url>);

impl WebhookUrl {
    /// Parses an `http` or `https` URL with a host.
    ///
    /// # Errors
    /// A message that never repeats the URL (it may hold a token).
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text.trim()).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "the scheme `{}` is not http or https",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("the URL has no host".to_owned());
        }
        Ok(Self(Secret::new(url)))
    }

    /// The full URL, for the request only.
    pub fn expose(&self) -> &url::Url {
        self.0.expose()
    }

    /// Removes every occurrence of the URL (and of its path and query, which carry tokens) from
    /// `text`, e.g. an HTTP client's error message.
    #[must_use]
    pub fn scrub(&self, text: &str) -> String {
        let url = self.expose();
        let mut out = text.replace(url.as_str(), &self.to_string());
        let path_and_query = &url[url::Position::BeforePath..];
        if path_and_query.len() > 1 {
            out = out.replace(path_and_query, "/***");
        }
        out
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.expose();
        write!(f, "{}://{}", url.scheme(), url.host_str().unwrap_or(""))?;
        if let Some(port) = url.port() {
            write!(f, ":{port}")?;
        }
        f.write_str("/***")
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({self})")
    }
}

/// libvirt URI drivers: their paths (`qemu:///system`) are no secret and stay readable.
const LIBVIRT_DRIVERS: &[&str] = &[
    "qemu",
    "test",
    "xen",
    "lxc",
    "vbox",
    "esx",
    "gsx",
    "vpx",
    "ch",
    "bhyve",
    "vz",
    "openvz",
    "hyperv",
    "vmwarews",
    "vmwareplayer",
    "vmwarefusion",
    "libxl",
];

/// Masks secrets in URLs written in `text`, for showing lines of a file that may hold a
/// webhook: every password in a URL (`smtp://u:***@mail`), and the path and query of every
/// URL but libvirt's (`https://chat.example.org/***`).
#[must_use]
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: the letters, digits, `+`, `-`, `.` right before `://`.
        let scheme_start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .map_or(0, |j| j + 1);
        let scheme = &rest[scheme_start..i];
        out.push_str(&rest[..i + 3]);
        let tail = &rest[i + 3..];
        let end = tail
            .find(|c: char| c.is_whitespace() || "\"'<>`,]}".contains(c))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        let authority = &url[..authority_end];
        match authority.rsplit_once('@') {
            Some((user, host)) => {
                let name = user.split_once(':').map_or(user, |(name, _)| name);
                let _ = write!(out, "{name}:***@{host}");
            }
            None => out.push_str(authority),
        }
        let driver = scheme.split('+').next().unwrap_or("").to_ascii_lowercase();
        if authority_end < url.len() {
            if LIBVIRT_DRIVERS.contains(&driver.as_str()) {
                out.push_str(&url[authority_end..]);
            } else {
                out.push_str("/***");
            }
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_text_are_masked() {
        assert_eq!(
            redact_urls("  - webhook: https://u:p@chat.example.org/hooks/T0KEN?a=b # x"),
            "  - webhook: https://u:***@chat.example.org/*** # x"
        );
        assert_eq!(
            redact_urls("{webhook: \"http://h:8080/x\", on: [a]}"),
            "{webhook: \"http://h:8080/***\", on: [a]}"
        );
        assert_eq!(redact_urls("no url here"), "no url here");
        assert_eq!(
            redact_urls("smtp: \"smtp://u:hunter2@mail:25\", c: qemu+ssh://root@hv1/system"),
            "smtp: \"smtp://u:***@mail:25\", c: qemu+ssh://root:***@hv1/system"
        );
        assert_eq!(redact_urls("ftp://h/T0KEN"), "ftp://h/***");
    }

    #[test]
    fn webhook_url_never_prints_its_path_or_query() {
        let url = WebhookUrl::parse("https://user:pw@chat.example.org:8443/hooks/T0KEN?x=S3CRET")
            .unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("T0KEN"), "{shown}");
            assert!(!shown.contains("S3CRET"), "{shown}");
            assert!(!shown.contains("pw"), "{shown}");
            assert!(
                shown.contains("https://chat.example.org:8443/***"),
                "{shown}"
            );
        }
        let scrubbed = url.scrub(&format!("error sending to {}: refused", url.expose()));
        assert!(!scrubbed.contains("T0KEN"), "{scrubbed}");
        assert_eq!(format!("{:?}", Secret::new("pw")), "***");
    }

    #[test]
    fn webhook_url_errors_do_not_repeat_the_url() {
        let err = WebhookUrl::parse("ftp://chat.example.org/T0KEN").unwrap_err();
        assert!(!err.contains("T0KEN"), "{err}");
        assert!(WebhookUrl::parse("not a url T0KEN")
            .unwrap_err()
            .starts_with("not a URL"));
    }
}
