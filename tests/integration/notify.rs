//! Notifications end to end with real servers started by the tests: an HTTP server receiving
//! webhooks (tiny_http), an SMTP server (Python's aiosmtpd), and a command target; a kill -9
//! between a step and its notification, then a resume that delivers it.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtplan::clock::{Clock, SystemClock};
use virtplan::hypervisor::fleet::{write_fleet, FleetDomain};
use virtplan::lockfile::{Delivery, Lockfile, StepStatus};
use virtplan::state::Kib;

use crate::support::helpers::{
    at, command, lock_of, now, save_plan, spawn_apply, text, wait_for_lock,
};

const TOKEN: &str = "T0KEN-s3cr3t";

fn sleep_ms(ms: u64) {
    SystemClock.sleep(Duration::from_millis(ms));
}

/// One request the webhook server received.
#[derive(Debug, Clone)]
struct Received {
    url: String,
    idempotency_key: Option<String>,
    body: serde_json::Value,
}

/// A real HTTP server on 127.0.0.1 recording every POST. It answers with `status`, or, while
/// `hang` is set, holds requests without answering.
struct WebhookServer {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    hang: Arc<AtomicBool>,
}

impl WebhookServer {
    fn start() -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind a webhook server");
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let hang = Arc::new(AtomicBool::new(false));
        let (r, s, h) = (received.clone(), status.clone(), hang.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for mut request in server.incoming_requests() {
                if h.load(Ordering::SeqCst) {
                    held.push(request); // never answered: the client waits for its timeout
                    continue;
                }
                let mut body = String::new();
                let _ = request.as_reader().read_to_string(&mut body);
                let key = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Idempotency-Key"))
                    .map(|h| h.value.as_str().to_owned());
                r.lock().unwrap().push(Received {
                    url: request.url().to_owned(),
                    idempotency_key: key,
                    body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
                });
                let code = s.load(Ordering::SeqCst);
                let _ =
                    request.respond(tiny_http::Response::from_string("ok").with_status_code(code));
            }
        });
        Self {
            port,
            received,
            status,
            hang,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Bodies posted to `path`.
    fn bodies(&self, path: &str) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|r| r.url == path)
            .map(|r| r.body)
            .collect()
    }
}

/// A real SMTP server (aiosmtpd) writing each mail it accepts into a folder; with a login
/// required when `login` is given.
struct SmtpServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

const SMTP_SCRIPT: &str = r#"
import os, sys
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
out, port = sys.argv[1], int(sys.argv[2])
user, password = os.environ.get("SMTP_USER"), os.environ.get("SMTP_PASS")
class Handler:
    count = 0
    async def handle_DATA(self, server, session, envelope):
        Handler.count += 1
        path = os.path.join(out, "%04d.eml" % Handler.count)
        head = "X-Test-Rcpt: %s\r\nX-Test-Authenticated: %s\r\n" % (",".join(envelope.rcpt_tos), session.authenticated)
        with open(path + ".tmp", "wb") as f:
            f.write(head.encode() + envelope.content)
        os.rename(path + ".tmp", path)
        return "250 OK"
def check(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
    return AuthResult(success=ok)
options = {}
if user:
    options = dict(authenticator=check, auth_require_tls=False, auth_required=True)
controller = Controller(Handler(), hostname="127.0.0.1", port=port, **options)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
"#;

impl SmtpServer {
    fn start(login: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Debian's interpreter, where `python3-aiosmtpd` is installed (not a pyenv shim).
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let mut cmd = Command::new(python);
        cmd.args([
            "-c",
            SMTP_SCRIPT,
            dir.path().to_str().unwrap(),
            &port.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some((user, pass)) = login {
            cmd.env("SMTP_USER", user).env("SMTP_PASS", pass);
        }
        let mut child = cmd
            .spawn()
            .expect("python3 with aiosmtpd (scripts/setup-libvirt.sh installs python3-aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the SMTP server did not start (is python3-aiosmtpd installed? scripts/setup-libvirt.sh installs it)"
        );
        Self { child, port, dir }
    }

    /// The mails received so far, in order.
    fn mails(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fleet(dir: &Path) -> String {
    fleet_with(dir, 128)
}

/// Two shut-off test-driver domains; `web-01` has `web01_mib` of memory.
fn fleet_with(dir: &Path, web01_mib: u64) -> String {
    write_fleet(
        dir,
        &[
            FleetDomain::new("web-01")
                .uuid("7a1c2a34-52a5-4c41-9d0c-2f6c3c8b0001")
                .memory(Kib::from_mib(web01_mib), Kib::from_mib(512)),
            FleetDomain::new("web-02")
                .uuid("7a1c2a34-52a5-4c41-9d0c-2f6c3c8b0002")
                .memory(Kib::from_mib(128), Kib::from_mib(512)),
        ],
    )
    .unwrap()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

fn virtplan(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args)
        .envs(env.iter().copied())
        .env(
            "HOME",
            std::env::temp_dir().join("virtplan-tests-empty-home"),
        )
        .env(
            "XDG_CONFIG_HOME",
            std::env::temp_dir().join("virtplan-tests-empty-home"),
        )
        .output()
        .expect("run virtplan")
}

fn kinds(bodies: &[serde_json::Value]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| {
            let kind = b["event"].as_str().unwrap_or("?");
            match b["vm"].as_str() {
                Some(vm) => format!("{kind} {vm}"),
                None => kind.to_owned(),
            }
        })
        .collect()
}

#[test]
fn checked_in_notify_event_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/notify-event.schema.json");
    assert!(
        std::fs::read_to_string(path).unwrap_or_default()
            == virtplan::notify::event::json_schema(),
        "schemas/notify-event.schema.json is stale; run `cargo run -- schema notify-event > schemas/notify-event.schema.json`"
    );
}

#[test]
fn every_step_boundary_reaches_a_webhook_a_chat_hook_a_mailbox_and_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let hooks = WebhookServer::start();
    let smtp = SmtpServer::start(Some(("virtplan", "hunter2-pw")));
    let pass_file = write(dir.path(), "smtp.pass", "hunter2-pw\n");
    let got = dir.path().join("command-events");
    std::fs::create_dir(&got).unwrap();
    let plan = write(
        dir.path(),
        "web-tier.yaml",
        &format!(
            "version: 1
connection: {uri}
notify:
  - webhook: {}
  - on: [step-failed, plan-finished]
    webhook: {}
    format: slack
  - on: [step-done, plan-finished]
    email: {{ to: [ops@example.org], from: virtplan@admin1.example.org, smtp: \"smtp://127.0.0.1:{}\", username: virtplan, password_file: {} }}
  - on: [plan-finished]
    command: [sh, -c, 'cat > {}/$VIRTPLAN_EVENT_ID.json']
steps:
  - vm: web-01
    memory: 256MiB
  - vms: [web-01, web-02]
    vcpus: 1
",
            hooks.url(&format!("/hooks/{TOKEN}")),
            hooks.url(&format!("/chat/{TOKEN}")),
            smtp.port,
            pass_file.display(),
            got.display(),
        ),
    );
    let out = virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("Notifications (4 target(s))"), "{all}");
    assert!(
        all.contains("webhook http://127.0.0.1:")
            && all.contains("/*** (slack), on step-failed, plan-finished"),
        "{all}"
    );
    assert!(
        !all.contains(TOKEN) && !all.contains("hunter2"),
        "a secret was printed: {all}"
    );

    // The JSON webhook: every event, each with a distinct id.
    let events = hooks.bodies(&format!("/hooks/{TOKEN}"));
    assert_eq!(events.len(), 8, "{:#?}", kinds(&events));
    assert_eq!(events[0]["event"], "plan-started");
    assert_eq!(events[7]["event"], "plan-finished");
    // One domain's events keep their order.
    let web01: Vec<String> = kinds(&events)
        .into_iter()
        .filter(|k| k.ends_with("web-01"))
        .collect();
    assert_eq!(
        web01,
        [
            "step-started web-01",
            "step-done web-01",
            "step-started web-01",
            "step-done web-01"
        ]
    );
    let ids: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 8, "ids are unique");
    let done = events
        .iter()
        .find(|e| e["event"] == "step-done" && e["step"] == 1)
        .expect("step 1 done");
    assert_eq!(done["format_version"], 1);
    assert_eq!(done["plan"]["name"], "web-tier");
    assert_eq!(done["step"], 1);
    assert_eq!(done["status"], "done");
    assert_eq!(done["connection"], uri.as_str());
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());
    let finished = &events[7];
    assert_eq!(finished["status"], "done");
    assert_eq!(finished["summary"]["total"], 3);
    assert_eq!(finished["summary"]["done"], 3);
    let received = hooks.received();
    assert!(received
        .iter()
        .filter(|r| r.url.starts_with("/hooks/"))
        .all(|r| r.idempotency_key.as_deref() == r.body["id"].as_str()));

    // The chat hook: only plan-finished (nothing failed), as one readable line.
    let chat = hooks.bodies(&format!("/chat/{TOKEN}"));
    assert_eq!(chat.len(), 1, "{chat:#?}");
    assert_eq!(
        chat[0]["text"], "web-tier: plan finished, done (3 done)",
        "{chat:#?}"
    );

    // Mail: one per step-done and one for plan-finished, after a login.
    let mails = smtp.mails();
    assert_eq!(mails.len(), 4, "{mails:#?}");
    assert!(
        mails
            .iter()
            .any(|m| m.contains("Subject: [virtplan] web-tier: step 1 web-01 done")),
        "{mails:#?}"
    );
    assert!(mails
        .iter()
        .all(|m| m.contains("X-Test-Rcpt: ops@example.org")
            && m.contains("X-Test-Authenticated: True")));
    assert!(mails[3].contains("Subject: [virtplan] web-tier: plan finished"));

    // The command got the plan-finished event on stdin.
    let files: Vec<PathBuf> = std::fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(event["event"], "plan-finished");
    assert_eq!(files[0].file_stem().unwrap().to_str(), event["id"].as_str());

    // The lockfile records every event as sent, without secrets.
    let lock_text = std::fs::read_to_string(plan.with_extension("lock")).unwrap();
    assert!(!lock_text.contains(TOKEN) && !lock_text.contains("hunter2"));
    let lock = lock_of(&plan);
    assert_eq!(lock.events.len(), 8);
    assert!(
        lock.events.iter().all(|e| e.delivery == Delivery::Sent),
        "{:#?}",
        lock.events
    );
    let status = virtplan(&["status", plan.to_str().unwrap()], &[]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains("not delivered"));
}

#[test]
fn a_failed_step_pages_and_a_refused_delivery_shows_in_status_until_a_later_apply_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let hooks = WebhookServer::start();
    hooks.status.store(500, Ordering::SeqCst);
    let page = dir.path().join("paged.json");
    let plan = write(
        dir.path(),
        "db.yaml",
        &format!(
            "version: 1
connection: {uri}
notify:
  - on: [step-failed]
    command: [sh, -c, 'cat > {}']
  - on: [plan-finished]
    webhook: {}
steps:
  - vm: web-01
    memory: 256MiB
",
            page.display(),
            hooks.url(&format!("/hooks/{TOKEN}")),
        ),
    );
    let saved = dir.path().join("saved.json");
    save_plan(&plan, &saved);
    // Someone resized the domain after the review: the step fails as drift.
    fleet_with(dir.path(), 192);
    let started = Instant::now();
    let out = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    let took = started.elapsed();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(!all.contains(TOKEN), "{all}");

    // The page went out.
    let paged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&page).expect("paged")).unwrap();
    assert_eq!(paged["event"], "step-failed");
    assert_eq!(paged["vm"], "web-01");
    assert_eq!(paged["status"], "failed");
    assert!(
        paged["message"].as_str().unwrap().contains("drifted"),
        "{paged}"
    );

    // The webhook refused plan-finished four times; that was logged, and did not change the
    // exit status (3, for the failed step).
    assert!(
        all.contains("not delivered to webhook http://127.0.0.1:"),
        "{all}"
    );
    assert!(all.contains("HTTP 500"), "{all}");
    assert!(took < Duration::from_secs(25), "flush took {took:?}");
    assert_eq!(hooks.received().len(), 4, "four attempts of plan-finished");

    let status = virtplan(&["status", plan.to_str().unwrap()], &[]);
    let shown = text(&status);
    assert!(shown.contains("1 notification(s) not delivered"), "{shown}");
    assert!(shown.contains("failed  plan-finished"), "{shown}");
    assert!(shown.contains("HTTP 500"), "{shown}");
    assert!(!shown.contains(TOKEN), "{shown}");
    let json = virtplan(&["status", plan.to_str().unwrap(), "--format", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let id = doc["notifications"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(doc["notifications"][0]["delivery"], "failed");

    // The receiver is back: the next apply re-sends that very event (same id), and it is gone
    // from status.
    hooks.status.store(200, Ordering::SeqCst);
    let again = virtplan(&["apply", saved.to_str().unwrap()], &[]);
    assert_eq!(again.status.code(), Some(3), "{}", text(&again));
    let later: Vec<String> = hooks
        .received()
        .iter()
        .skip(4)
        .map(|r| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(later.contains(&id), "{later:?} lacks {id}");
    let status = virtplan(&["status", plan.to_str().unwrap()], &[]);
    assert!(
        !text(&status).contains("not delivered"),
        "{}",
        text(&status)
    );
}

#[test]
fn a_missed_step_pages_the_command_target() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let page = dir.path().join("paged.json");
    let past = at(now(), -30 * 60);
    let plan = write(
        dir.path(),
        "late.yaml",
        &format!(
            "version: 1
connection: {uri}
grace: 1m
notify:
  - on: [step-failed, step-missed]
    command: [sh, -c, 'cat >> {}']
steps:
  - at: {past}
    vm: web-02
    memory: 256MiB
",
            page.display(),
        ),
    );
    let out = virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let paged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&page).expect("paged")).unwrap();
    assert_eq!(paged["event"], "step-missed");
    assert_eq!(paged["vm"], "web-02");
    assert_eq!(paged["status"], "missed");
    assert!(paged["message"]
        .as_str()
        .unwrap()
        .contains("missed, not run"));
}

/// kill -9 after a step is recorded done but before its notification went out; the resumed
/// executor delivers it, with the id recorded before the crash, and never runs the step again.
#[test]
fn kill_9_between_a_step_and_its_notification_then_resume_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let hooks = WebhookServer::start();
    hooks.hang.store(true, Ordering::SeqCst);
    let plan = write(
        dir.path(),
        "crash.yaml",
        &format!(
            "version: 1
connection: {uri}
notify:
  - webhook: {}
    timeout: 60s
steps:
  - vm: web-01
    memory: 256MiB
",
            hooks.url(&format!("/hooks/{TOKEN}")),
        ),
    );
    let mut child = spawn_apply(&plan);
    // Wait until the step is durably done and its event recorded, undelivered (the webhook
    // holds the first request, so nothing can be delivered).
    let step_done = |lock: &Lockfile| lock.events.iter().find(|e| e.event == "step-done").cloned();
    let lock = wait_for_lock(
        &plan,
        Duration::from_secs(30),
        "the step never finished",
        |lock| lock.steps.iter().all(|s| s.status == StepStatus::Done) && step_done(lock).is_some(),
    );
    let event = step_done(&lock).expect("recorded");
    assert_eq!(event.delivery, Delivery::Pending);
    let done_id = event.id;
    assert!(Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = child.wait();
    assert!(
        !hooks
            .received()
            .iter()
            .any(|r| r.body["event"] == "step-done"),
        "nothing was answered while the receiver hung"
    );

    hooks.hang.store(false, Ordering::SeqCst);
    let out = virtplan(&["apply", plan.to_str().unwrap(), "--auto-approve"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let received = hooks.bodies(&format!("/hooks/{TOKEN}"));
    let step_done: Vec<&serde_json::Value> = received
        .iter()
        .filter(|b| b["event"] == "step-done")
        .collect();
    assert_eq!(step_done.len(), 1, "{:#?}", kinds(&received));
    assert_eq!(
        step_done[0]["id"],
        done_id.as_str(),
        "the recorded event, same id"
    );
    // The resumed run announces its own start and end; the step did not run again.
    assert_eq!(
        received
            .iter()
            .filter(|b| b["event"] == "step-started")
            .count(),
        1,
        "{:#?}",
        kinds(&received)
    );
    let lock = lock_of(&plan);
    assert!(
        lock.events.iter().all(|e| e.delivery == Delivery::Sent),
        "{:#?}",
        lock.events
    );
}

#[test]
fn notify_problems_are_located_and_never_echo_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let plan = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "version: 1
connection: test:///default
notify:
  - webhook: ftp://chat.example.org/{TOKEN}
  - on: [step-faild]
    command: []
  - email: {{ to: [not-an-address], from: a@b.org, smtp: \"smtp://u:hunter2@mail\" }}
  - webhok: https://chat.example.org/{TOKEN}
  - email: {{ to: [a@b.org], from: a@b.org, username: u, password_env: \"hunter2 pw\" }}
steps:
  - vm: test
    memory: 256MiB
"
        ),
    );
    let out = virtplan(&["validate", plan.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "bad.yaml:4:14",
        "`webhook` is not a usable URL: the scheme `ftp` is not http or https",
        "bad.yaml:5:10",
        "unknown event `step-faild` in `on`",
        "did you mean `step-failed`?",
        "bad.yaml:6:14",
        "`command` is empty",
        "`email.to` entry `not-an-address` is not a mail address",
        "`email.smtp` carries credentials",
        "bad.yaml:8:5",
        "unknown key `webhok` in notify entry 4",
        "`password_env` must be the NAME of an environment variable",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains(TOKEN), "{err}");
    // The one place a pasted password still shows is the user's own line quoted back by the
    // `password_env` error; the message itself never repeats it.
    let without_that_line: String = err
        .lines()
        .filter(|l| !l.contains("password_env: \"hunter2"))
        .collect();
    assert!(!without_that_line.contains("hunter2"), "{err}");
}

#[test]
fn config_notify_tables_apply_unless_the_plan_has_its_own() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "virtplan.toml",
        &format!(
            "[[notify]]\non = [\"step-failed\"]\nwebhook = \"https://chat.example.org/{TOKEN}\"\n\n[[notify]]\ncommand = [\"/usr/local/bin/page\", \"--team\", \"infra\"]\n"
        ),
    );
    let plan = write(
        dir.path(),
        "p.yaml",
        "version: 1\nconnection: test:///default\nsteps:\n  - vm: test\n    memory: 256MiB\n",
    );
    let out = virtplan(&["plan", plan.to_str().unwrap()], &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("Notifications (2 target(s))"), "{all}");
    assert!(
        all.contains("webhook https://chat.example.org/***, on step-failed"),
        "{all}"
    );
    assert!(
        all.contains("command /usr/local/bin/page --team infra, every event"),
        "{all}"
    );
    assert!(!all.contains(TOKEN), "{all}");

    // A saved plan keeps the plan text, with its webhook masked.
    let own = write(
        dir.path(),
        "own.yaml",
        &format!("version: 1\nconnection: test:///default\nnotify:\n  - webhook: https://chat.example.org/{TOKEN}\nsteps:\n  - vm: test\n    memory: 256MiB\n"),
    );
    let saved = dir.path().join("saved.json");
    let out = virtplan(
        &[
            "plan",
            own.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
        &[],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("Notifications (1 target(s))"), "{all}");
    assert!(
        !all.contains("page --team"),
        "the plan's notify replaces the config's: {all}"
    );
    let saved_text = std::fs::read_to_string(&saved).unwrap();
    assert!(!saved_text.contains(TOKEN), "{saved_text}");
    assert!(saved_text.contains("https://chat.example.org/***"));

    // A bad table is located in virtplan.toml.
    write(
        dir.path(),
        "virtplan.toml",
        "[[notify]]\non = [\"plan-done\"]\ncommand = [\"/bin/true\"]\n",
    );
    let out = virtplan(&["validate", plan.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("virtplan.toml:2:7"), "{err}");
    assert!(err.contains("unknown event `plan-done`"), "{err}");
}

/// The command target's timeout: a program that never exits is killed, logged, and the plan
/// is not held up beyond the flush deadline.
#[test]
fn a_hanging_command_is_killed_after_its_timeout() {
    use virtplan::notify::deliver::deliver;
    use virtplan::notify::event::{Event, EventKind, PlanRef};
    use virtplan::notify::target::{check, RawTarget};
    use virtplan::plan_file::{Located, Pos};
    let l = |s: &str| Located {
        value: s.to_owned(),
        pos: Pos::new(1, 1),
    };
    let raw = RawTarget {
        command: Some(Located {
            value: vec![l("sleep"), l("30")],
            pos: Pos::new(1, 1),
        }),
        timeout: Some(l("1s")),
        ..RawTarget::default()
    };
    let target = check(&raw, "t").unwrap();
    let event = Event {
        format_version: 1,
        event: EventKind::PlanStarted,
        id: "e1".into(),
        plan: PlanRef {
            name: "p".into(),
            file: "p.yaml".into(),
            sha256: "x".into(),
        },
        step: None,
        vm: None,
        uuid: None,
        connection: None,
        at: None,
        status: None,
        started_at: None,
        finished_at: None,
        message: String::new(),
        summary: None,
    };
    let started = Instant::now();
    let err = deliver(&target, &event).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.0.contains("killed after its timeout of 1s"), "{err}");
}

/// `watch DIR`: a watched plan announces its start, steps and end; an edit that re-plans stops
/// the executor, whose unstarted steps then run under the new version: no `step-cancelled`.
#[test]
fn a_watched_plan_notifies_and_a_replan_is_not_a_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let uri = fleet(dir.path());
    let hooks = WebhookServer::start();
    let plan = dir.path().join("plan.yaml");
    let body = |second: &str| {
        format!(
            "version: 1
connection: {uri}
grace: 1m
notify:
  - webhook: {}
steps:
  - vm: web-01
    memory: 256MiB
  - at: {second}
    vm: web-01
    vcpus: 1
",
            hooks.url(&format!("/hooks/{TOKEN}"))
        )
    };
    let later = |secs: i64| at(now(), secs);
    std::fs::write(&plan, body(&later(3600))).unwrap();
    let mut watch = command(&[
        "watch",
        dir.path().to_str().unwrap(),
        "--log-format",
        "json",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let wait_for = |what: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = kinds(&hooks.bodies(&format!("/hooks/{TOKEN}")));
            if got.iter().filter(|k| k.starts_with(what)).count() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "no {what} (x{n}): {got:?}");
            sleep_ms(50);
        }
    };
    wait_for("step-done", 1);
    // Move step 2 to now: the executor stops (step 2 unstarted) and starts on the new version.
    let tmp = dir.path().join(".plan.yaml.swp");
    std::fs::write(&tmp, body(&later(2))).unwrap();
    std::fs::rename(&tmp, &plan).unwrap();
    let got = wait_for("plan-finished", 1);
    let _ = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status();
    let status = watch.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        got,
        [
            "plan-started",
            "step-started web-01",
            "step-done web-01",
            "step-started web-01",
            "step-done web-01",
            "plan-finished"
        ],
        "a re-plan is no cancellation"
    );
    let finished = &hooks.bodies(&format!("/hooks/{TOKEN}"))[5];
    assert_eq!(finished["summary"]["done"], 2, "{finished}");
    assert_eq!(finished["status"], "done");
}

/// `?tls=required` and `smtps://` never fall back to plain text: against a server without TLS
/// the mail is not sent, and the error names the server, never the password.
#[test]
fn required_tls_is_never_downgraded_to_plain_smtp() {
    use virtplan::notify::deliver::deliver;
    use virtplan::notify::event::{Event, EventKind, PlanRef};
    use virtplan::notify::target::{check, RawEmail, RawTarget};
    use virtplan::plan_file::{Located, Pos};
    let smtp = SmtpServer::start(None);
    let dir = tempfile::tempdir().unwrap();
    let pass = write(dir.path(), "pass", "hunter2-pw\n");
    let l = |s: &str| Located {
        value: s.to_owned(),
        pos: Pos::new(1, 1),
    };
    let event = Event {
        format_version: 1,
        event: EventKind::StepFailed,
        id: "e1".into(),
        plan: PlanRef {
            name: "web-tier".into(),
            file: "web-tier.yaml".into(),
            sha256: "x".into(),
        },
        step: Some(3),
        vm: Some("web-01".into()),
        uuid: None,
        connection: None,
        at: None,
        status: Some(StepStatus::Failed),
        started_at: None,
        finished_at: None,
        message: "did not reach its desired state".into(),
        summary: None,
    };
    let target = |url: &str, login: bool| {
        let raw = RawTarget {
            email: Some(Located {
                value: RawEmail {
                    to: Some(Located {
                        value: vec![l("ops@example.org")],
                        pos: Pos::new(1, 1),
                    }),
                    from: Some(l("virtplan@admin1.example.org")),
                    smtp: Some(l(url)),
                    username: login.then(|| l("virtplan")),
                    password_file: login.then(|| l(pass.to_str().unwrap())),
                    ..RawEmail::default()
                },
                pos: Pos::new(1, 1),
            }),
            timeout: Some(l("5s")),
            ..RawTarget::default()
        };
        check(&raw, "t").unwrap()
    };
    for url in [
        format!("smtp://127.0.0.1:{}?tls=required", smtp.port),
        format!("smtps://127.0.0.1:{}", smtp.port),
    ] {
        let err = deliver(&target(&url, true), &event).unwrap_err();
        assert!(err.0.contains("mail via smtp"), "{err}");
        assert!(!err.0.contains("hunter2"), "{err}");
    }
    assert!(smtp.mails().is_empty(), "nothing went out in clear");
    // Plain smtp:// to a server without STARTTLS delivers (opportunistic), with the subject
    // the issue asks for.
    deliver(
        &target(&format!("smtp://127.0.0.1:{}", smtp.port), false),
        &event,
    )
    .unwrap();
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains("Subject: [virtplan] web-tier: step 3 web-01 failed"),
        "{}",
        mails[0]
    );
}
