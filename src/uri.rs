//! A libvirt connection URI whose printed forms never show credentials.
//!
//! `qemu+tcp://admin:PW@host/system?password=X` may name a password twice. Every place that
//! prints, logs, serialises or saves a connection holds a [`Uri`], whose `Display`, `Debug` and
//! `Serialize` all give the redacted form (`qemu+tcp://admin:***@host/system?password=***`), so no
//! print site can forget. Only [`Uri::expose`] hands out the real text, for libvirt itself.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What replaces a secret in printed URIs.
pub const MASK: &str = "***";

/// Query keys whose values are secrets: a key is secret when its lower-cased, percent-decoded
/// name contains one of these (`password`, `passwd`, `pass`, `secret`, `token`, `key`,
/// `authfile` ...). Redacting a harmless `keyfile` path is the cheap side of the trade.
const SECRET_KEY_PARTS: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "credential",
    "cred",
];

/// A libvirt connection URI (or, before resolution, a host alias). Equality, order and hashing
/// use the real text; every printed form is redacted.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uri(String);

impl Uri {
    #[must_use]
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The real text, credentials included: only for handing to libvirt and for comparisons.
    /// Never print it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The printable form, with the userinfo password and secret query values masked.
    #[must_use]
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// Where, never credentials: no password at all (libvirt's auth.conf may supply it) and
    /// secret query values masked. What a check command gets in `VIRTPLAN_CONNECTION`.
    #[must_use]
    pub fn without_password(&self) -> String {
        if let Ok(mut url) = url::Url::parse(&self.0) {
            if url.password().is_some() && url.set_password(None).is_ok() {
                return redact(url.as_str());
            }
        }
        self.redacted()
    }

    /// Whether printing would hide something (the URI carries credentials).
    #[must_use]
    pub fn has_secrets(&self) -> bool {
        self.redacted() != self.0
    }
}

impl From<&str> for Uri {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for Uri {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<&String> for Uri {
    fn from(text: &String) -> Self {
        Self::new(text.as_str())
    }
}

impl From<&Uri> for Uri {
    fn from(uri: &Uri) -> Self {
        uri.clone()
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uri({:?})", self.redacted())
    }
}

/// Serialised redacted: JSON output, saved plans and notifications never carry credentials.
/// A saved plan's connections are matched back to the plan file's real URIs when applied.
impl Serialize for Uri {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A URI with nothing to mask is written as it is, without the copy `redacted` makes
        // (JSON output writes one per change).
        if has_nothing_to_mask(&self.0) {
            serializer.serialize_str(&self.0)
        } else {
            serializer.serialize_str(&self.redacted())
        }
    }
}

impl<'de> Deserialize<'de> for Uri {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

impl schemars::JsonSchema for Uri {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Uri".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Whether a query key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// `text` with credentials masked. Parsed with the `url` crate; a text it cannot parse keeps
/// only its scheme when it has anything that could be a credential (`@`, `?`).
#[must_use]
pub fn redact(text: &str) -> String {
    if has_nothing_to_mask(text) {
        return text.to_owned();
    }
    let Ok(mut url) = url::Url::parse(text) else {
        return redact_unparsed(text);
    };
    let mut changed = false;
    if url.password().is_some() && url.set_password(Some(MASK)).is_ok() {
        changed = true;
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.iter().any(|(k, _)| is_secret_key(k)) {
        changed = true;
        // Rebuilt by hand so the mask stays `***` and other values keep their spelling.
        let query: Vec<String> = url
            .query()
            .unwrap_or_default()
            .split('&')
            .map(|pair| {
                let (key, _) = pair.split_once('=').unwrap_or((pair, ""));
                let decoded: String = url::form_urlencoded::parse(key.as_bytes())
                    .map(|(k, _)| k.into_owned())
                    .collect();
                if is_secret_key(&decoded) {
                    format!("{key}={MASK}")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        url.set_query(Some(&query.join("&")));
    }
    if changed {
        url.to_string()
    } else {
        // Unchanged URIs print exactly as written (the url crate may normalise spelling).
        text.to_owned()
    }
}

/// Without `@` there is no userinfo (so no password), without `?` no query: nothing to mask,
/// and no URL parse (JSON output serializes a URI per change).
fn has_nothing_to_mask(text: &str) -> bool {
    !text.contains('@') && !text.contains('?')
}

fn redact_unparsed(text: &str) -> String {
    if !text.contains('@') && !text.contains('?') {
        return text.to_owned();
    }
    match text.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://{MASK}"),
        None => MASK.to_owned(),
    }
}

/// `text` with every occurrence of each URI's real spelling replaced by its redacted form:
/// for a plan file's text saved beside a plan.
#[must_use]
pub fn redact_in<'a>(text: &str, uris: impl IntoIterator<Item = &'a Uri>) -> String {
    let mut out = text.to_owned();
    for uri in uris {
        if uri.has_secrets() {
            out = out.replace(uri.expose(), &uri.redacted());
        }
    }
    out
}

/// A connection as written in a plan, virtplan.toml or `--connect`: a libvirt URI (it has
/// `:/`) as is, else the URI of the host alias of that name in `hosts`; `None` when it is
/// neither (or holds control characters).
#[must_use]
pub fn resolve_connection(
    text: &str,
    hosts: &std::collections::BTreeMap<String, Uri>,
) -> Option<Uri> {
    if text.chars().any(char::is_control) {
        return None;
    }
    if text.contains(":/") {
        return Some(Uri::new(text));
    }
    hosts.get(text).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_password_drops_the_password_and_masks_secret_values() {
        let cases = [
            (
                "qemu+ssh://root:s3cret@hv1:22/system?keyfile=/k&mode=legacy",
                "qemu+ssh://root@hv1:22/system?keyfile=***&mode=legacy",
            ),
            ("qemu:///system", "qemu:///system"),
            ("qemu+tcp://admin@hv2/system", "qemu+tcp://admin@hv2/system"),
            ("test:///tmp/a@b/node.xml", "test:///tmp/a@b/node.xml"),
            (
                "qemu+tcp://admin:PW@hv3/system?password=X",
                "qemu+tcp://admin@hv3/system?password=***",
            ),
        ];
        for (given, expected) in cases {
            assert_eq!(Uri::new(given).without_password(), expected, "{given}");
        }
    }

    #[test]
    fn userinfo_password_and_secret_query_values_are_masked() {
        let uri = Uri::new("qemu+tcp://admin:PW@host/system?password=X&no_verify=1");
        let shown = uri.to_string();
        assert_eq!(
            shown,
            "qemu+tcp://admin:***@host/system?password=***&no_verify=1"
        );
        assert!(!format!("{uri:?}").contains("PW"));
        assert!(!serde_json::to_string(&uri).unwrap().contains("PW"));
        assert_eq!(
            uri.expose(),
            "qemu+tcp://admin:PW@host/system?password=X&no_verify=1"
        );
    }

    #[test]
    fn every_secret_like_key_is_masked_whatever_its_case_or_encoding() {
        for key in [
            "password",
            "PASSWD",
            "pass",
            "secret",
            "token",
            "api_key",
            "Pass%77ord",
            "authfile",
        ] {
            let shown = redact(&format!("qemu+ssh://h/system?{key}=S3CR3T&x=1"));
            assert!(!shown.contains("S3CR3T"), "{key}: {shown}");
            assert!(shown.contains("x=1"), "{shown}");
        }
    }

    #[test]
    fn plain_uris_print_as_written() {
        for text in [
            "qemu:///system",
            "qemu:///session",
            "test:///default",
            "test:///tmp/a b/node.xml",
            "qemu+ssh://root@hv1/system?keyfile_is_not=here",
            "qemu+ssh://root@hv1/system",
            "h",
        ] {
            let shown = redact(text);
            if text.contains("keyfile") {
                continue;
            }
            assert_eq!(shown, text);
        }
    }

    #[test]
    fn unparsable_text_with_an_at_sign_keeps_only_its_scheme() {
        assert_eq!(redact("qemu+tcp://a:b@[bad/system"), "qemu+tcp://***");
    }

    #[test]
    fn redact_in_replaces_the_real_spelling() {
        let uri = Uri::new("qemu+tcp://u:PW@h/system");
        let text = "connection: qemu+tcp://u:PW@h/system\n";
        assert_eq!(
            redact_in(text, [&uri]),
            "connection: qemu+tcp://u:***@h/system\n"
        );
    }
}
