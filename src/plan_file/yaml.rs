//! Typed access to a positioned YAML tree (`marked-yaml`), recording a located diagnostic for
//! every value of the wrong shape instead of stopping at the first.

use std::path::Path;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError, Node, Span};

use super::diag::{did_you_mean, Diagnostic, Pos};
pub use super::tree::StepListener;

/// Parses text into a positioned tree: one mapping, no anchors, aliases, tags or duplicate keys.
/// `listener` takes the items of the top-level `steps` list (see `tree`).
pub fn parse(
    file: &Path,
    text: &str,
    listener: Option<&mut dyn StepListener>,
) -> Result<Node, Diagnostic> {
    if let Some((offset, c)) = text
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(Diagnostic::new(
            file,
            Pos::of_offset(text, offset),
            format!(
                "the file contains the control character U+{:04X}",
                u32::from(c)
            ),
        )
        .with_help("a plan file is YAML text; check that this is the right file"));
    }
    if let Some(offset) = second_document(text) {
        return Err(Diagnostic::new(
            file,
            Pos::of_offset(text, offset),
            "a second YAML document starts here; a plan file holds exactly one",
        )
        .with_help("put each plan in its own file, or remove the `---` line"));
    }
    super::tree::parse(text, listener).map_err(|e| load_error(file, text, &e))
}

/// The byte offset of a `---` that starts a second document, if any.
fn second_document(text: &str) -> Option<usize> {
    let mut offset = 0;
    let mut seen_content = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        let is_marker = trimmed == "---" || trimmed.starts_with("--- ");
        if is_marker && seen_content {
            return Some(offset);
        }
        let t = trimmed.trim_start();
        if !is_marker && !t.is_empty() && !t.starts_with('#') && !t.starts_with('%') && t != "..." {
            seen_content = true;
        }
        offset += line.len();
    }
    None
}

fn load_error(file: &Path, text: &str, error: &LoadError) -> Diagnostic {
    let at = |m: &marked_yaml::Marker| Pos::new(m.line(), m.column());
    match error {
        LoadError::TopLevelMustBeMapping(m) => Diagnostic::new(
            file,
            at(m),
            "a plan must be a YAML mapping with `version` and `steps`",
        )
        .with_help("start the file with `version: 1` (see `virtplan schema`)"),
        LoadError::TopLevelMustBeSequence(m) => {
            Diagnostic::new(file, at(m), "unexpected top-level list")
        }
        LoadError::UnexpectedAnchor(m) => Diagnostic::new(
            file,
            back_to_sigil(text, at(m), &['&', '*']),
            "YAML anchors and aliases (`&name`, `*name`) are not allowed in plans",
        )
        .with_help("write each value out in full; plans are reviewed, so explicit beats clever"),
        LoadError::MappingKeyMustBeScalar(m) => {
            Diagnostic::new(file, at(m), "a mapping key must be a plain word")
                .with_help("keys are names such as `vm` or `memory`")
        }
        LoadError::UnexpectedTag(m) => Diagnostic::new(
            file,
            back_to_sigil(text, at(m), &['!']),
            "YAML tags (`!!str`, `!custom`) are not allowed in plans",
        )
        .with_help("remove the tag; quote the value if it must be text"),
        LoadError::DuplicateKey(inner) => {
            let first = inner
                .prev_key
                .span()
                .start()
                .map_or_else(|| "earlier".to_owned(), |m| format!("at line {}", m.line()));
            Diagnostic::new(
                file,
                span_pos(inner.key.span()),
                format!(
                    "duplicate key `{}` (first written {first})",
                    inner.key.as_str()
                ),
            )
            .with_help("keep one of them; a later key would silently replace the earlier one")
        }
        LoadError::ScanError(m, scan) => {
            let info = scan.info();
            let mut pos = Pos::new(m.line(), m.column());
            let line = text.lines().nth(m.line().saturating_sub(1)).unwrap_or("");
            let help = if info.contains("tab") || line.starts_with('\t') {
                // The scanner names where the scalar or token began, often a line above the tab.
                if let Some(tab) = first_tab_from_line(text, m.line()) {
                    pos = tab;
                }
                "YAML does not allow tabs for indentation; indent with spaces"
            } else if info.contains("recursion limit") {
                "a plan needs only a few levels of nesting; check for unbalanced brackets"
            } else {
                "check the indentation and quoting near this position"
            };
            Diagnostic::new(file, pos, format!("invalid YAML: {info}")).with_help(help)
        }
    }
}

/// The loader places an anchor, alias or tag error at the value after it; move back to the
/// `&`, `*` or `!` that starts it on the same line, so the caret lands on what to remove.
fn back_to_sigil(text: &str, at: Pos, sigils: &[char]) -> Pos {
    let Some(line) = text.lines().nth(at.line.saturating_sub(1)) else {
        return at;
    };
    let before: Vec<char> = line.chars().take(at.column.saturating_sub(1)).collect();
    let Some(mut i) = before.iter().rposition(|c| sigils.contains(c)) else {
        return at;
    };
    // Back to the start of the token, so `!!str` is shown from its first `!`.
    while i > 0 && !before[i - 1].is_whitespace() && !"[{,".contains(before[i - 1]) {
        i -= 1;
    }
    Pos::new(at.line, i + 1)
}

/// The first tab on or after 1-based line `line`.
fn first_tab_from_line(text: &str, line: usize) -> Option<Pos> {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    text.get(start..)?
        .find('\t')
        .map(|i| Pos::of_offset(text, start + i))
}

/// The 1-based start of a span (a blank span, which the loader never produces, maps to 1:1).
pub fn span_pos(span: &Span) -> Pos {
    span.start()
        .map_or(Pos::new(1, 1), |m| Pos::new(m.line(), m.column()))
}

/// The position of a node. A block mapping's span starts at its first `:`, so a mapping is
/// placed at its first key (or its `{`, whichever comes first) where a reader would look.
pub fn pos(node: &Node) -> Pos {
    let own = span_pos(node.span());
    match node {
        Node::Mapping(map) => map
            .keys()
            .next()
            .map_or(own, |key| own.min(span_pos(key.span()))),
        _ => own,
    }
}

/// Whether a scalar is YAML null (`~`, `null` or nothing), which plans never mean on purpose.
pub fn is_null(node: &Node) -> bool {
    node.as_scalar().is_some_and(|s| {
        s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
    })
}

/// How a node reads in a message: "a list", "a mapping", "`text`", "nothing".
pub fn describe(node: &Node) -> String {
    match node {
        Node::Scalar(_) if is_null(node) => "nothing".to_owned(),
        Node::Scalar(s) => format!("`{}`", s.as_str()),
        Node::Mapping(_) => "a mapping".to_owned(),
        Node::Sequence(_) => "a list".to_owned(),
    }
}

/// Collects diagnostics for one file.
pub struct Checker<'a> {
    pub file: &'a Path,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub fn new(file: &'a Path) -> Self {
        Self {
            file,
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>, help: impl Into<String>) {
        self.diags
            .push(Diagnostic::new(self.file, pos, message).with_help(help));
    }

    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str, example: &str) {
        self.error(
            pos(node),
            format!("{what} must be {expected}, found {}", describe(node)),
            format!("for example `{example}`"),
        );
    }

    /// Checks every key of `map` against `allowed`, reporting unknown keys with a likely fix.
    pub fn known_keys(&mut self, map: &MarkedMappingNode, allowed: &[&str], context: &str) {
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                self.unknown_key(key, allowed, context);
            }
        }
    }

    /// Reports `key`, which is not among `allowed`, with a likely fix.
    pub fn unknown_key(&mut self, key: &MarkedScalarNode, allowed: &[&str], context: &str) {
        let help = did_you_mean(key.as_str(), allowed).map_or_else(
            || format!("known keys here: {}", allowed.join(", ")),
            |close| format!("did you mean `{close}`?"),
        );
        self.error(
            span_pos(key.span()),
            format!("unknown key `{}` in {context}", key.as_str()),
            help,
        );
    }

    /// `node` as a mapping, or a diagnostic.
    pub fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        example: &str,
    ) -> Option<&'n MarkedMappingNode> {
        let map = node.as_mapping();
        if map.is_none() {
            self.wrong_type(node, what, "a mapping", example);
        }
        map
    }

    /// `node` as a list, or a diagnostic.
    pub fn sequence<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        example: &str,
    ) -> Option<&'n MarkedSequenceNode> {
        let seq = node.as_sequence();
        if seq.is_none() {
            self.wrong_type(node, what, "a list", example);
        }
        seq
    }

    /// `node` as non-empty text, or a diagnostic.
    pub fn text<'n>(&mut self, node: &'n Node, what: &str, example: &str) -> Option<&'n str> {
        match node.as_scalar() {
            Some(s) if !is_null(node) && !s.as_str().trim().is_empty() => {
                self.no_controls(node, what, s.as_str(), &[])
            }
            _ => {
                self.wrong_type(node, what, "text", example);
                None
            }
        }
    }

    /// `node` as text that may be empty (titles and descriptions can be cleared).
    pub fn any_text<'n>(&mut self, node: &'n Node, what: &str, example: &str) -> Option<&'n str> {
        match node.as_scalar() {
            Some(s) if !is_null(node) || !s.may_coerce() => {
                // Only a description may span lines (and hold tabs); a line break in a title
                // gets the title's own message from its caller.
                let allowed: &[char] = if what.contains("description") {
                    &['\t', '\n']
                } else if what == "`title`" {
                    &['\n']
                } else {
                    &[]
                };
                self.no_controls(node, what, s.as_str(), allowed)
            }
            Some(s) if s.as_str().is_empty() => Some(""),
            _ => {
                self.wrong_type(node, what, "text", example);
                None
            }
        }
    }

    /// `text`, unless it holds a control character (a YAML escape such as `"\0"` or `"\e"`
    /// writes one): libvirt's C strings end at a NUL, and an ESC would drive the terminal of
    /// whoever reads the plan. `allowed` lists the control characters this value may hold.
    fn no_controls<'n>(
        &mut self,
        node: &Node,
        what: &str,
        text: &'n str,
        allowed: &[char],
    ) -> Option<&'n str> {
        // Printable ASCII, what nearly every value is, holds no control character: answered
        // a byte at a time rather than decoding characters.
        if text.bytes().all(|b| matches!(b, b' '..=b'~')) {
            return Some(text);
        }
        let multi_line = allowed.contains(&'\t');
        let bad = text
            .chars()
            .find(|&c| c.is_control() && !allowed.contains(&c));
        match bad {
            None => Some(text),
            Some(c) => {
                self.error(
                    pos(node),
                    format!(
                        "{what} contains the control character U+{:04X}",
                        u32::from(c)
                    ),
                    if multi_line {
                        "remove it; only tab and line feed are allowed in a description"
                    } else {
                        "remove it; this value is one line of printable text"
                    },
                );
                None
            }
        }
    }

    /// `node` as `true`/`false`, or a diagnostic.
    pub fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.as_scalar().map(MarkedScalarNode::as_str) {
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other @ ("yes" | "no" | "on" | "off" | "True" | "False" | "TRUE" | "FALSE")) => {
                let fixed = matches!(other, "yes" | "on" | "True" | "TRUE");
                self.error(
                    pos(node),
                    format!("{what} must be `true` or `false`, found `{other}`"),
                    format!("write `{fixed}`"),
                );
                None
            }
            _ => {
                self.wrong_type(node, what, "`true` or `false`", "true");
                None
            }
        }
    }

    /// `node` as a whole number at least `min`, or a diagnostic.
    pub fn count(&mut self, node: &Node, what: &str, min: u32) -> Option<u32> {
        let Some(s) = node.as_scalar().filter(|_| !is_null(node)) else {
            self.wrong_type(node, what, "a whole number", "2");
            return None;
        };
        match s.as_str().parse::<u32>() {
            Ok(n) if n >= min && s.may_coerce() => Some(n),
            Ok(n) if n >= min => {
                self.error(
                    pos(node),
                    format!("{what} must be a number, found the quoted text \"{n}\""),
                    format!("remove the quotes: `{n}`"),
                );
                None
            }
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
                self.error(
                    pos(node),
                    format!("{what} `{}` is too large", s.as_str()),
                    format!("write a whole number from {min} to {}", u32::MAX),
                );
                None
            }
            _ => {
                self.error(
                    pos(node),
                    format!(
                        "{what} must be a whole number of at least {min}, found `{}`",
                        s.as_str()
                    ),
                    format!("for example `{}`", min.max(2)),
                );
                None
            }
        }
    }
}

impl Checker<'_> {
    /// `node` as one of a fixed set of words. `expected` lists them for the message; a close
    /// misspelling gets a "did you mean", anything else `help`.
    pub fn choice<T: Copy>(
        &mut self,
        node: &Node,
        what: &str,
        options: &[(&str, T)],
        expected: &str,
        help: &str,
    ) -> Option<T> {
        let word = node.as_scalar().map_or("", MarkedScalarNode::as_str);
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == word) {
            return Some(*value);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let help = did_you_mean(word, &names)
            .filter(|_| !word.is_empty())
            .map_or_else(
                || help.to_owned(),
                |close| format!("did you mean `{close}`?"),
            );
        self.error(
            pos(node),
            format!("{what} must be {expected}, found {}", describe(node)),
            help,
        );
        None
    }
}
