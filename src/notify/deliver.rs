//! One delivery attempt of one event to one target: an HTTP POST (`ureq`), a mail (`lettre`),
//! or a program run with the event JSON on stdin. Errors name the target redacted and never
//! carry a webhook URL or a password.

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport as _};
use wait_timeout::ChildExt as _;

use super::event::Event;
use super::secret::{Secret, WebhookUrl};
use super::target::{Email, PasswordSource, SmtpTls, Target, TargetKind, WebhookFormat};

/// Why one attempt failed, in words safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// Sends `event` to `target` once.
///
/// # Errors
/// A redacted reason.
pub fn deliver(target: &Target, event: &Event) -> Result<(), DeliveryError> {
    match &target.kind {
        TargetKind::Webhook { url, format } => webhook(url, *format, event, target.timeout),
        TargetKind::Email(email) => mail(email, event, target.timeout),
        TargetKind::Command { argv } => command(argv, event, target.timeout),
    }
}

fn webhook(
    url: &WebhookUrl,
    format: WebhookFormat,
    event: &Event,
    timeout: Duration,
) -> Result<(), DeliveryError> {
    let body = match format {
        WebhookFormat::Json => serde_json::to_vec(event),
        WebhookFormat::Slack => serde_json::to_vec(&serde_json::json!({ "text": event.text() })),
    }
    .map_err(|e| DeliveryError(format!("cannot encode the event: {e}")))?;
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .user_agent(concat!("virtplan/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .into();
    let response = agent
        .post(url.expose().as_str())
        .header("Content-Type", "application/json")
        // Receivers that deduplicate on a header rather than the body.
        .header("Idempotency-Key", &event.id)
        .send(&body[..])
        .map_err(|e| DeliveryError(url.scrub(&format!("POST {url}: {e}"))))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let mut text = String::new();
    let _ = response
        .into_body()
        .into_reader()
        .take(200)
        .read_to_string(&mut text);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Err(DeliveryError(url.scrub(&format!(
        "POST {url}: HTTP {status}{}",
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    ))))
}

/// Reads the SMTP password from where the configuration says, at send time.
fn password(source: &PasswordSource) -> Result<Secret<String>, DeliveryError> {
    match source {
        PasswordSource::Env(name) => std::env::var(name).map(Secret::new).map_err(|_| {
            DeliveryError(format!(
                "the SMTP password variable ${name} is not set (or not UTF-8) where virtplan runs"
            ))
        }),
        PasswordSource::File(path) => std::fs::read_to_string(path)
            .map(|s| Secret::new(s.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| {
                DeliveryError(format!(
                    "cannot read the SMTP password file {}: {e}",
                    path.display()
                ))
            }),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn mail(email: &Email, event: &Event, timeout: Duration) -> Result<(), DeliveryError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        DeliveryError(format!("mail via {}: {what}: {e}", email.smtp))
    };
    let mut builder = Message::builder()
        .from(email.from.clone())
        .subject(format!("[virtplan] {}", event.headline()))
        // One Message-ID per event: a resent mail is recognisably the same one.
        .message_id(Some(format!("<{}@virtplan>", event.id)))
        .header(ContentType::TEXT_PLAIN);
    for to in &email.to {
        builder = builder.to(to.clone());
    }
    let json = serde_json::to_string_pretty(event).unwrap_or_default();
    let message = builder
        .body(format!("{}\n\n{json}\n", event.text()))
        .map_err(|e| fail("cannot build the message", &e))?;

    let host = email.smtp.host.as_str();
    let params = || TlsParameters::new(host.to_owned()).map_err(|e| fail("TLS setup", &e));
    let tls = match email.smtp.tls {
        // A password never crosses the network in clear: with a login, STARTTLS is required
        // unless the server is this machine.
        SmtpTls::Opportunistic if email.auth.is_some() && !is_loopback(host) => {
            Tls::Required(params()?)
        }
        SmtpTls::Opportunistic => Tls::Opportunistic(params()?),
        SmtpTls::Required => Tls::Required(params()?),
        SmtpTls::Implicit => Tls::Wrapper(params()?),
    };
    let mut transport = SmtpTransport::builder_dangerous(host)
        .port(email.smtp.port)
        .timeout(Some(timeout))
        .tls(tls);
    if let Some(auth) = &email.auth {
        let secret = password(&auth.password)?;
        transport = transport.credentials(Credentials::new(
            auth.username.clone(),
            secret.expose().clone(),
        ));
    }
    transport
        .build()
        .send(&message)
        .map(drop)
        .map_err(|e| fail("send failed", &e))
}

fn command(argv: &[String], event: &Event, timeout: Duration) -> Result<(), DeliveryError> {
    let shown = argv.first().map_or("", String::as_str);
    let fail = |what: String| DeliveryError(format!("command {shown}: {what}"));
    let json = serde_json::to_vec(event).map_err(|e| fail(format!("cannot encode: {e}")))?;
    let mut child = Command::new(shown)
        .args(&argv[1..])
        .env("VIRTPLAN_EVENT", event.event.as_str())
        .env("VIRTPLAN_EVENT_ID", &event.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    // The event is small (far below a pipe's buffer), so this write cannot block on a child
    // that never reads; a child that exits without reading is not an error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    // Read stderr on the side, so a chatty program cannot block on a full pipe.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = (&mut pipe).take(4096).read_to_end(&mut text);
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            String::from_utf8_lossy(&text).into_owned()
        })
    });
    let status = match child.wait_timeout(timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "killed after its timeout of {}",
                humantime::format_duration(timeout)
            )));
        }
        Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
    };
    if status.success() {
        return Ok(());
    }
    let said = stderr
        .and_then(|h| h.join().ok())
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .map(|s| format!(": {}", s.chars().take(300).collect::<String>()))
        .unwrap_or_default();
    Err(fail(format!("{status}{said}")))
}
