//! Located diagnostics for user input: what is wrong, where (file:line:column) and how to fix it.

use crate::text::escape;
use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based position in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    #[must_use]
    pub const fn new(line: usize, column: usize) -> Self {
        Self { line, column }
    }

    /// The position of byte `offset` in `text` (columns count characters).
    #[must_use]
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Self { line, column }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem in an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    /// What is wrong, and what was expected.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, pos: Pos, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            pos,
            message: message.into(),
            help: None,
        }
    }

    #[must_use]
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Multi-line rendering with the offending source line and a caret, like rustc.
    #[must_use]
    pub fn render(&self, source: Option<&str>) -> String {
        use fmt::Write as _;
        let number = self.pos.line.to_string();
        let pad = " ".repeat(number.len());
        let mut out = format!(
            "{}\n{pad}--> {}:{}",
            escape(&self.message),
            escape(&self.file.display().to_string()),
            self.pos
        );
        if let Some(text) = source.and_then(|s| s.lines().nth(self.pos.line.saturating_sub(1))) {
            // A webhook URL carries its token in the path: never shown, even in a plan's own line.
            // One column per character, so the caret stays under the problem.
            let shown: String = crate::notify::secret::redact_urls(text)
                .chars()
                .take(200)
                .map(|c| if c == '\t' { ' ' } else { c })
                .collect();
            let shown = escape(&shown);
            let caret_at = " ".repeat(self.pos.column.saturating_sub(1).min(200));
            let _ = write!(out, "\n{pad} |\n{number} | {shown}\n{pad} | {caret_at}^");
        }
        if let Some(help) = &self.help {
            let _ = write!(out, "\n{pad} = help: {}", escape(help));
        }
        out
    }
}

/// One line: `file:line:column: message (help: ...)`, the form tests and logs use.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}",
            escape(&self.file.display().to_string()),
            self.pos,
            escape(&self.message)
        )?;
        if let Some(help) = &self.help {
            write!(f, " (help: {})", escape(help))?;
        }
        Ok(())
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    pub file: PathBuf,
    /// The file's text, when it could be read as text (for rendering source lines).
    pub text: Option<String>,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Renders every diagnostic with its source line, separated by blank lines.
    #[must_use]
    pub fn render(&self) -> String {
        self.items
            .iter()
            .map(|d| d.render(self.text.as_deref()))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.items.len();
        write!(
            f,
            "{} has {count} problem{}",
            self.file.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for item in &self.items {
            write!(f, "\n{item}")?;
        }
        Ok(())
    }
}

/// The closest candidate to a mistyped word, when it is close enough to be a likely typo.
#[must_use]
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    // Jaro-Winkler misses short words with swapped letters (`ned` for `end`); one edit or swap
    // catches those.
    let one_edit = |c: &str| word.len() >= 3 && strsim::osa_distance(&word, c) <= 1;
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&word, c), *c))
        .filter(|(score, c)| *score > 0.8 || one_edit(c))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
