//! User text made safe to show: every character a terminal could act on (C0/C1 controls,
//! DEL, bidirectional overrides) written as a visible escape. Shared by the model (messages it
//! builds) and the printer.

/// `text` with every character a terminal could act on shown as an escape (`\u{1b}`, `\n`):
/// C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a reviewer sees.
/// Every piece of user text (titles, descriptions, names, messages) printed for a human goes
/// through here, so a plan cannot drive the reviewer's terminal.
#[must_use]
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// [`escape`] for multi-line text of our own making: line breaks stay, everything else that a
/// terminal could act on is escaped.
#[must_use]
pub fn escape_lines(text: &str) -> String {
    text.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
