//! Notification targets (webhook, email, command) and their checking from a positioned raw
//! form that both front-ends fill: `notify:` in a plan (YAML) and `[[notify]]` in
//! virtplan.toml (TOML). Every problem is located and says how to fix it; no message repeats a
//! webhook URL or a password.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lettre::message::Mailbox;

use super::event::EventKind;
use super::secret::WebhookUrl;
use crate::plan_file::diag::did_you_mean;
use crate::plan_file::units::parse_duration;
use crate::plan_file::{Located, Pos};

/// Keys of one target.
pub const TARGET_KEYS: &[&str] = &["on", "webhook", "format", "email", "command", "timeout"];
/// Keys of `email`.
pub const EMAIL_KEYS: &[&str] = &[
    "to",
    "from",
    "smtp",
    "username",
    "password_env",
    "password_file",
];

const DEFAULT_SMTP: &str = "smtp://localhost:25";
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
const EMAIL_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One place events are sent, with the events it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where it was written (for messages).
    pub pos: Pos,
    /// `None`: every event.
    pub on: Option<BTreeSet<EventKind>>,
    pub kind: TargetKind,
    /// How long one delivery attempt may take.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// HTTP POST of the event.
    Webhook {
        url: WebhookUrl,
        format: WebhookFormat,
    },
    Email(Email),
    /// Runs argv (no shell) with the event JSON on stdin.
    Command {
        argv: Vec<String>,
    },
}

/// What a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// The event JSON itself.
    Json,
    /// `{"text": "<one line>"}` for Slack/Mattermost-style incoming webhooks.
    Slack,
}

impl WebhookFormat {
    /// Its part of a target's delivery key (on disk: never rename).
    const fn identity(self) -> &'static str {
        match self {
            Self::Json => "Json",
            Self::Slack => "Slack",
        }
    }
}

/// One mail per event, over SMTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub to: Vec<Mailbox>,
    pub from: Mailbox,
    pub smtp: Smtp,
    pub auth: Option<SmtpAuth>,
}

/// An SMTP server, without credentials (they never come from plan text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// `smtp://`: STARTTLS when the server offers it, else plain (never plain with a password,
    /// except to a loopback address).
    Opportunistic,
    /// `smtp://…?tls=required`: STARTTLS or fail.
    Required,
    /// `smtps://`: TLS from the first byte.
    Implicit,
}

impl SmtpTls {
    /// Its part of a target's delivery key (on disk: never rename).
    const fn identity(self) -> &'static str {
        match self {
            Self::Opportunistic => "Opportunistic",
            Self::Required => "Required",
            Self::Implicit => "Implicit",
        }
    }
}

/// SMTP login: a user name, and where the password is read at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpAuth {
    pub username: String,
    pub password: PasswordSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// An environment variable's name.
    Env(String),
    /// A file holding the password (trailing newline ignored).
    File(PathBuf),
}

impl Target {
    /// Whether this target wants `kind`.
    #[must_use]
    pub fn wants(&self, kind: EventKind) -> bool {
        self.on.as_ref().is_none_or(|on| on.contains(&kind))
    }

    /// A short stable key for delivery records in the lockfile: a hash, so a webhook's token
    /// is not written there. Built from explicit names, never derived `Debug` output, so a
    /// rename cannot change what is on disk (pinned by `delivery_keys_are_pinned`).
    #[must_use]
    pub fn key(&self) -> String {
        let canon = match &self.kind {
            TargetKind::Webhook { url, format } => {
                format!("webhook {} {}", url.expose(), format.identity())
            }
            TargetKind::Email(e) => format!(
                "email {:?} {} {}:{} {}",
                e.to.iter().map(ToString::to_string).collect::<Vec<_>>(),
                e.from,
                e.smtp.host,
                e.smtp.port,
                e.smtp.tls.identity()
            ),
            TargetKind::Command { argv } => format!("command {argv:?}"),
        };
        let hex = crate::plan_file::sha256_hex(canon.as_bytes());
        format!("{}-{}", self.kind.word(), &hex[..8])
    }
}

impl TargetKind {
    #[must_use]
    pub fn word(&self) -> &'static str {
        match self {
            Self::Webhook { .. } => "webhook",
            Self::Email(_) => "email",
            Self::Command { .. } => "command",
        }
    }
}

impl fmt::Display for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tls {
            SmtpTls::Opportunistic => write!(f, "smtp://{}:{}", self.host, self.port),
            SmtpTls::Required => write!(f, "smtp://{}:{}?tls=required", self.host, self.port),
            SmtpTls::Implicit => write!(f, "smtps://{}:{}", self.host, self.port),
        }
    }
}

/// The redacted one-line description `plan` lists: never a webhook's path or a password.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            TargetKind::Webhook { url, format } => {
                write!(f, "webhook {url}")?;
                if *format == WebhookFormat::Slack {
                    f.write_str(" (slack)")?;
                }
            }
            TargetKind::Email(e) => {
                let to: Vec<String> = e.to.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "email to {} from {} via {}",
                    to.join(", "),
                    e.from,
                    e.smtp
                )?;
                if let Some(auth) = &e.auth {
                    let source = match &auth.password {
                        PasswordSource::Env(name) => format!("${name}"),
                        PasswordSource::File(path) => path.display().to_string(),
                    };
                    write!(f, " as {} (password from {source})", auth.username)?;
                }
            }
            TargetKind::Command { argv } => {
                write!(f, "command {}", shell_words(argv))?;
            }
        }
        match &self.on {
            None => f.write_str(", every event"),
            Some(on) => {
                let names: Vec<&str> = on.iter().map(|k| k.as_str()).collect();
                write!(f, ", on {}", names.join(", "))
            }
        }
    }
}

/// argv as a reader would type it.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A target as written, with positions: what a front-end hands to [`check`]. Shape problems
/// (wrong types, unknown keys) are the front-end's; values are checked here.
#[derive(Debug, Clone, Default)]
pub struct RawTarget {
    pub pos: Pos,
    pub on: Option<Located<Vec<Located<String>>>>,
    pub webhook: Option<Located<String>>,
    pub format: Option<Located<String>>,
    pub email: Option<Located<RawEmail>>,
    pub command: Option<Located<Vec<Located<String>>>>,
    pub timeout: Option<Located<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct RawEmail {
    pub to: Option<Located<Vec<Located<String>>>>,
    pub from: Option<Located<String>>,
    pub smtp: Option<Located<String>>,
    pub username: Option<Located<String>>,
    pub password_env: Option<Located<String>>,
    pub password_file: Option<Located<String>>,
}

/// A value problem: where, what, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub pos: Pos,
    pub message: String,
    pub help: String,
}

fn problem(pos: Pos, message: impl Into<String>, help: impl Into<String>) -> Problem {
    Problem {
        pos,
        message: message.into(),
        help: help.into(),
    }
}

/// Checks one target; `what` names it in messages (`notify entry 2`).
///
/// # Errors
/// Every problem found.
pub fn check(raw: &RawTarget, what: &str) -> Result<Target, Vec<Problem>> {
    let mut problems = Vec::new();
    let on = raw
        .on
        .as_ref()
        .and_then(|on| check_on(on, what, &mut problems));
    let kinds = [
        raw.webhook.as_ref().map(|l| l.pos),
        raw.email.as_ref().map(|l| l.pos),
        raw.command.as_ref().map(|l| l.pos),
    ];
    let given = kinds.iter().flatten().count();
    if given == 0 {
        problems.push(problem(
            raw.pos,
            format!("{what} has no target"),
            "give one of `webhook: URL`, `email: {to: [...], from: ...}` or `command: [PROGRAM, ARGS...]`",
        ));
    } else if given > 1 {
        let second = kinds.iter().flatten().nth(1).copied().unwrap_or(raw.pos);
        problems.push(problem(
            second,
            format!("{what} has more than one of `webhook`, `email` and `command`"),
            "write each target as its own list entry",
        ));
    }
    if let Some(format) = &raw.format {
        if raw.webhook.is_none() {
            problems.push(problem(
                format.pos,
                "`format` applies to `webhook` targets only",
                "remove `format`, or use it beside `webhook: URL`",
            ));
        }
    }
    let timeout = raw.timeout.as_ref().and_then(|t| {
        match parse_duration(&t.value) {
            Ok(d) if d.is_zero() => problems.push(problem(
                t.pos,
                "`timeout` must be longer than zero",
                "such as `timeout: 30s`",
            )),
            Ok(d) => return Some(d),
            Err(e) => problems.push(problem(t.pos, format!("`timeout`: {}", e.message), e.help)),
        }
        None
    });

    let kind = if let Some(url) = &raw.webhook {
        check_webhook(url, raw.format.as_ref(), &mut problems)
    } else if let Some(email) = &raw.email {
        check_email(email, &mut problems).map(TargetKind::Email)
    } else if let Some(argv) = &raw.command {
        check_command(argv, &mut problems)
    } else {
        None
    };
    match kind {
        Some(kind) if problems.is_empty() => {
            let timeout = timeout.unwrap_or(match kind {
                TargetKind::Webhook { .. } => WEBHOOK_TIMEOUT,
                TargetKind::Email(_) => EMAIL_TIMEOUT,
                TargetKind::Command { .. } => COMMAND_TIMEOUT,
            });
            Ok(Target {
                pos: raw.pos,
                on,
                kind,
                timeout,
            })
        }
        _ => Err(problems),
    }
}

fn check_on(
    on: &Located<Vec<Located<String>>>,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<BTreeSet<EventKind>> {
    if on.value.is_empty() {
        problems.push(problem(
            on.pos,
            format!("`on` of {what} is empty, so it would never send anything"),
            "list events such as `on: [step-failed, plan-finished]`, or leave `on` out for every event",
        ));
        return None;
    }
    let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    let mut set = BTreeSet::new();
    for word in &on.value {
        match EventKind::parse(word.value.trim()) {
            Some(kind) => {
                set.insert(kind);
            }
            None => problems.push(problem(
                word.pos,
                format!("unknown event `{}` in `on`", word.value),
                did_you_mean(&word.value, &names).map_or_else(
                    || format!("events: {}", names.join(", ")),
                    |close| format!("did you mean `{close}`?"),
                ),
            )),
        }
    }
    Some(set)
}

fn check_webhook(
    url: &Located<String>,
    format: Option<&Located<String>>,
    problems: &mut Vec<Problem>,
) -> Option<TargetKind> {
    let format = match format.map(|f| (f.value.as_str(), f.pos)) {
        None | Some(("json", _)) => WebhookFormat::Json,
        Some(("slack", _)) => WebhookFormat::Slack,
        Some((other, pos)) => {
            problems.push(problem(
                pos,
                format!("`format` must be `json` or `slack`, found `{other}`"),
                "`json` posts the event itself; `slack` posts {\"text\": \"...\"} for chat incoming-webhooks",
            ));
            return None;
        }
    };
    match WebhookUrl::parse(&url.value) {
        Ok(url) => Some(TargetKind::Webhook { url, format }),
        Err(why) => {
            problems.push(problem(
                url.pos,
                format!("`webhook` is not a usable URL: {why}"),
                "write an http(s) URL such as https://chat.example.org/hooks/TOKEN",
            ));
            None
        }
    }
}

fn check_command(
    argv: &Located<Vec<Located<String>>>,
    problems: &mut Vec<Problem>,
) -> Option<TargetKind> {
    let Some(program) = argv.value.first() else {
        problems.push(problem(
            argv.pos,
            "`command` is empty",
            "name the program and its arguments: `command: [/usr/local/bin/page-oncall, --team, infra]`",
        ));
        return None;
    };
    if program.value.trim().is_empty() {
        problems.push(problem(
            program.pos,
            "the program of `command` is empty",
            "name the program to run, such as /usr/local/bin/page-oncall",
        ));
        return None;
    }
    if argv.value.iter().any(|a| a.value.contains('\0')) {
        problems.push(problem(
            argv.pos,
            "an argument of `command` contains a NUL character",
            "remove it; arguments are passed to the program as C strings",
        ));
        return None;
    }
    Some(TargetKind::Command {
        argv: argv.value.iter().map(|a| a.value.clone()).collect(),
    })
}

fn mailbox(text: &Located<String>, what: &str, problems: &mut Vec<Problem>) -> Option<Mailbox> {
    text.value
        .trim()
        .parse::<Mailbox>()
        .map_err(|e| {
            problems.push(problem(
                text.pos,
                format!("{what} `{}` is not a mail address ({e})", text.value),
                "write an address such as ops@example.org or \"Ops <ops@example.org>\"",
            ));
        })
        .ok()
}

fn check_email(email: &Located<RawEmail>, problems: &mut Vec<Problem>) -> Option<Email> {
    let raw = &email.value;
    let before = problems.len();
    let to: Vec<Mailbox> = match &raw.to {
        None => {
            problems.push(problem(
                email.pos,
                "`email` has no `to`",
                "add `to: [ops@example.org]`",
            ));
            Vec::new()
        }
        Some(list) if list.value.is_empty() => {
            problems.push(problem(
                list.pos,
                "`email.to` is empty",
                "list at least one address: `to: [ops@example.org]`",
            ));
            Vec::new()
        }
        Some(list) => list
            .value
            .iter()
            .filter_map(|a| mailbox(a, "`email.to` entry", problems))
            .collect(),
    };
    let from = match &raw.from {
        None => {
            problems.push(problem(
                email.pos,
                "`email` has no `from`",
                "add `from: virtplan@admin1.example.org` (an address your mail server accepts)",
            ));
            None
        }
        Some(from) => mailbox(from, "`email.from`", problems),
    };
    let smtp = match &raw.smtp {
        Some(url) => check_smtp(url, problems),
        None => check_smtp(
            &Located {
                value: DEFAULT_SMTP.to_owned(),
                pos: email.pos,
            },
            problems,
        ),
    };
    let auth = match (&raw.username, &raw.password_env, &raw.password_file) {
        (None, None, None) => None,
        (Some(_), Some(_), Some(file)) => {
            problems.push(problem(
                file.pos,
                "`email` has both `password_env` and `password_file`",
                "keep one of them",
            ));
            None
        }
        (Some(user), env, file) => {
            let password = match (env, file) {
                (Some(env), None) => check_env_name(env, problems).map(PasswordSource::Env),
                (None, Some(file)) => Some(PasswordSource::File(PathBuf::from(&file.value))),
                _ => {
                    problems.push(problem(
                        user.pos,
                        "`email.username` is set but no password source is",
                        "add `password_env: SMTP_PASSWORD` (an environment variable) or `password_file: /etc/virtplan/smtp.pass`; a password is never written in the plan",
                    ));
                    None
                }
            };
            password.map(|password| SmtpAuth {
                username: user.value.clone(),
                password,
            })
        }
        (None, env, file) => {
            let pos = env.as_ref().or(file.as_ref()).map_or(email.pos, |l| l.pos);
            problems.push(problem(
                pos,
                "`email` has a password source but no `username`",
                "add `username: NAME` for the SMTP login",
            ));
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    Some(Email {
        to,
        from: from?,
        smtp: smtp?,
        auth,
    })
}

fn check_env_name(env: &Located<String>, problems: &mut Vec<Problem>) -> Option<String> {
    let name = env.value.trim();
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Some(name.to_owned())
    } else {
        // Likely the password itself pasted in: never echo it.
        problems.push(problem(
            env.pos,
            "`password_env` must be the NAME of an environment variable (letters, digits, `_`), not a password",
            "such as `password_env: SMTP_PASSWORD`, and export SMTP_PASSWORD where virtplan runs",
        ));
        None
    }
}

fn check_smtp(url: &Located<String>, problems: &mut Vec<Problem>) -> Option<Smtp> {
    let help = "write smtp://HOST[:PORT] (STARTTLS when offered), smtp://HOST[:PORT]?tls=required, or smtps://HOST[:PORT]";
    let parsed = match url::Url::parse(url.value.trim()) {
        Ok(u) => u,
        Err(e) => {
            problems.push(problem(
                url.pos,
                format!("`email.smtp` is not a URL ({e})"),
                help,
            ));
            return None;
        }
    };
    if parsed.password().is_some() || !parsed.username().is_empty() {
        problems.push(problem(
            url.pos,
            "`email.smtp` carries credentials; credentials are never taken from plan text",
            "remove them from the URL and use `username` with `password_env` or `password_file`",
        ));
        return None;
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        problems.push(problem(url.pos, "`email.smtp` has no host", help));
        return None;
    };
    let tls_param: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let tls = match (parsed.scheme(), tls_param.as_slice()) {
        ("smtp", []) => SmtpTls::Opportunistic,
        ("smtp", [(k, v)]) if k == "tls" && v == "required" => SmtpTls::Required,
        ("smtp", [(k, v)]) if k == "tls" && v == "opportunistic" => SmtpTls::Opportunistic,
        ("smtps", []) => SmtpTls::Implicit,
        ("smtp" | "smtps", _) => {
            problems.push(problem(
                url.pos,
                "`email.smtp` has an unknown query; only `?tls=required` (on smtp://) is understood",
                help,
            ));
            return None;
        }
        (scheme, _) => {
            problems.push(problem(
                url.pos,
                format!("`email.smtp` scheme `{scheme}` is not smtp or smtps"),
                help,
            ));
            return None;
        }
    };
    let port = parsed.port().unwrap_or(match tls {
        SmtpTls::Opportunistic => 25,
        SmtpTls::Required => 587,
        SmtpTls::Implicit => 465,
    });
    Some(Smtp {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize) -> Pos {
        Pos::new(line, 3)
    }

    fn l(s: &str, line: usize) -> Located<String> {
        Located {
            value: s.to_owned(),
            pos: at(line),
        }
    }

    fn list(items: &[&str], line: usize) -> Located<Vec<Located<String>>> {
        Located {
            value: items.iter().map(|s| l(s, line)).collect(),
            pos: at(line),
        }
    }

    fn email(smtp: &str) -> RawTarget {
        RawTarget {
            pos: at(1),
            email: Some(Located {
                value: RawEmail {
                    to: Some(list(&["ops@example.org"], 2)),
                    from: Some(l("virtplan@admin1.example.org", 3)),
                    smtp: Some(l(smtp, 4)),
                    ..RawEmail::default()
                },
                pos: at(2),
            }),
            ..RawTarget::default()
        }
    }

    #[test]
    fn smtp_url_forms() {
        let tls = |u: &str| match check(&email(u), "t").unwrap().kind {
            TargetKind::Email(e) => (e.smtp.tls, e.smtp.port),
            _ => unreachable!(),
        };
        assert_eq!(tls("smtp://mail"), (SmtpTls::Opportunistic, 25));
        assert_eq!(tls("smtp://mail:2525"), (SmtpTls::Opportunistic, 2525));
        assert_eq!(tls("smtp://mail?tls=required"), (SmtpTls::Required, 587));
        assert_eq!(tls("smtps://mail"), (SmtpTls::Implicit, 465));
        let err = check(&email("smtp://u:hunter2@mail"), "t").unwrap_err();
        assert!(err[0].message.contains("credentials"), "{err:?}");
        assert!(!format!("{err:?}").contains("hunter2"));
        let err = check(&email("imap://mail"), "t").unwrap_err();
        assert_eq!(err[0].pos, at(4));
    }

    #[test]
    fn one_target_kind_per_entry_and_argv_not_empty() {
        let mut raw = email("smtp://mail");
        raw.command = Some(list(&["/bin/true"], 5));
        let err = check(&raw, "notify entry 1").unwrap_err();
        assert!(err[0].message.contains("more than one"), "{err:?}");
        let raw = RawTarget {
            pos: at(1),
            command: Some(list(&[], 2)),
            ..RawTarget::default()
        };
        let err = check(&raw, "notify entry 1").unwrap_err();
        assert_eq!(err[0].message, "`command` is empty");
    }

    #[test]
    fn on_filters_are_checked_with_suggestions() {
        let raw = RawTarget {
            pos: at(1),
            on: Some(list(&["step-failed", "step-faild"], 2)),
            command: Some(list(&["/bin/true"], 3)),
            ..RawTarget::default()
        };
        let err = check(&raw, "t").unwrap_err();
        assert!(err[0].help.contains("`step-failed`"), "{err:?}");
        let ok = RawTarget {
            on: Some(list(&["step-failed", "plan-finished"], 2)),
            ..raw
        };
        let target = check(&ok, "t").unwrap();
        assert!(target.wants(EventKind::StepFailed));
        assert!(!target.wants(EventKind::StepDone));
    }

    /// Delivery keys are on disk (lockfile records of sent notifications): pinned with literal
    /// values, so a renamed variant or field cannot silently re-send after an upgrade.
    #[test]
    fn delivery_keys_are_pinned() {
        let webhook = |format: &str| RawTarget {
            pos: at(1),
            webhook: Some(l("https://chat.example.org/hooks/T0KEN", 2)),
            format: Some(l(format, 3)),
            ..RawTarget::default()
        };
        let command = RawTarget {
            pos: at(1),
            command: Some(list(&["/bin/notify", "--to", "ops"], 2)),
            ..RawTarget::default()
        };
        let keys: Vec<String> = [
            webhook("json"),
            webhook("slack"),
            command,
            email("smtp://mail"),
            email("smtp://mail?tls=required"),
            email("smtps://mail"),
        ]
        .iter()
        .map(|raw| check(raw, "t").unwrap().key())
        .collect();
        assert_eq!(
            keys,
            [
                "webhook-6885fc93",
                "webhook-55e92be4",
                "command-795364a3",
                "email-104a4f1d",
                "email-19a39754",
                "email-9979eb52"
            ]
        );
    }

    #[test]
    fn descriptions_are_redacted() {
        let raw = RawTarget {
            pos: at(1),
            webhook: Some(l("https://chat.example.org/hooks/T0KEN", 2)),
            format: Some(l("slack", 3)),
            ..RawTarget::default()
        };
        let target = check(&raw, "t").unwrap();
        let shown = format!("{target} {target:?} {}", target.key());
        assert!(!shown.contains("T0KEN"), "{shown}");
        assert!(
            target
                .to_string()
                .starts_with("webhook https://chat.example.org/*** (slack)"),
            "{target}"
        );
        let mut raw = email("smtp://mail");
        if let Some(e) = raw.email.as_mut() {
            e.value.username = Some(l("virtplan", 5));
            e.value.password_env = Some(l("hunter2 is my password", 6));
        }
        let err = check(&raw, "t").unwrap_err();
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }
}
