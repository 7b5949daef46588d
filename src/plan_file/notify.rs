//! The plan's `notify:` list: its YAML shape, checked here with positions, and its values,
//! checked by [`crate::notify::target::check`] (shared with `[[notify]]` in virtplan.toml).

use marked_yaml::types::MarkedMappingNode;
use marked_yaml::Node;

use super::yaml::{pos, Checker};
use super::Located;
use crate::notify::target::{self, RawEmail, RawTarget, Target, EMAIL_KEYS, TARGET_KEYS};

/// Checks `notify:`; every problem goes to `c`.
pub fn check(c: &mut Checker<'_>, node: &Node) -> Vec<Target> {
    let example = "notify: [{on: [step-failed], webhook: https://chat.example.org/hooks/TOKEN}]";
    let Some(seq) = c.sequence(node, "`notify`", example) else {
        return Vec::new();
    };
    let mut targets = Vec::new();
    for (i, entry) in seq.iter().enumerate() {
        let what = format!("notify entry {}", i + 1);
        let Some(map) = c.mapping(
            entry,
            &what,
            "- webhook: https://chat.example.org/hooks/TOKEN",
        ) else {
            continue;
        };
        let before = c.diags.len();
        c.known_keys(map, TARGET_KEYS, &what);
        let raw = RawTarget {
            pos: pos(entry),
            on: map
                .get_node("on")
                .and_then(|n| words(c, n, "`on`", "on: [step-failed, plan-finished]")),
            webhook: text(
                c,
                map,
                "webhook",
                "webhook: https://chat.example.org/hooks/TOKEN",
            ),
            format: text(c, map, "format", "format: slack"),
            email: map.get_node("email").and_then(|n| email(c, n)),
            command: map.get_node("command").and_then(|n| argv(c, n)),
            timeout: text(c, map, "timeout", "timeout: 30s"),
        };
        if c.diags.len() > before {
            continue;
        }
        match target::check(&raw, &what) {
            Ok(t) => targets.push(t),
            Err(problems) => {
                for p in problems {
                    c.error(p.pos, p.message, p.help);
                }
            }
        }
    }
    targets
}

fn located<T>(node: &Node, value: T) -> Located<T> {
    Located {
        value,
        pos: pos(node),
    }
}

fn text(
    c: &mut Checker<'_>,
    map: &MarkedMappingNode,
    key: &str,
    example: &str,
) -> Option<Located<String>> {
    let node = map.get_node(key)?;
    c.text(node, &format!("`{key}`"), example)
        .map(|t| located(node, t.trim().to_owned()))
}

/// A list of words, or one word standing for a list of one.
fn words(
    c: &mut Checker<'_>,
    node: &Node,
    what: &str,
    example: &str,
) -> Option<Located<Vec<Located<String>>>> {
    if node.as_scalar().is_some() {
        let t = c.text(node, what, example)?;
        return Some(located(node, vec![located(node, t.trim().to_owned())]));
    }
    let seq = c.sequence(node, what, example)?;
    let items = seq
        .iter()
        .filter_map(|n| {
            c.text(n, &format!("an entry of {what}"), example)
                .map(|t| located(n, t.trim().to_owned()))
        })
        .collect();
    Some(located(node, items))
}

fn argv(c: &mut Checker<'_>, node: &Node) -> Option<Located<Vec<Located<String>>>> {
    let example = "command: [/usr/local/bin/page-oncall, --team, infra]";
    if node.as_scalar().is_some() {
        c.error(
            pos(node),
            "`command` must be a list: the program and its arguments (no shell)",
            format!("for example `{example}`; for shell syntax write `[sh, -c, \"...\"]`"),
        );
        return None;
    }
    let seq = c.sequence(node, "`command`", example)?;
    let items = seq
        .iter()
        .filter_map(|n| {
            c.any_text(n, "an argument of `command`", example)
                .map(|t| located(n, t.to_owned()))
        })
        .collect();
    Some(located(node, items))
}

fn email(c: &mut Checker<'_>, node: &Node) -> Option<Located<RawEmail>> {
    let map = c.mapping(
        node,
        "`email`",
        "email: {to: [ops@example.org], from: virtplan@admin1, smtp: \"smtp://localhost:25\"}",
    )?;
    let before = c.diags.len();
    c.known_keys(map, EMAIL_KEYS, "`email`");
    let raw = RawEmail {
        to: map
            .get_node("to")
            .and_then(|n| words(c, n, "`email.to`", "to: [ops@example.org]")),
        from: text(c, map, "from", "from: virtplan@admin1.example.org"),
        smtp: text(c, map, "smtp", "smtp: \"smtp://localhost:25\""),
        username: text(c, map, "username", "username: virtplan"),
        password_env: text(c, map, "password_env", "password_env: SMTP_PASSWORD"),
        password_file: text(
            c,
            map,
            "password_file",
            "password_file: /etc/virtplan/smtp.pass",
        ),
    };
    (c.diags.len() == before).then(|| located(node, raw))
}
