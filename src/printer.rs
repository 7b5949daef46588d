//! The one place terminal output goes through: colour decisions, named styles, errors.

use std::io::{IsTerminal, Write};

use anstyle::{AnsiColor, Style};

use crate::cli::ColorChoice;

/// Named styles, so renderers say what a piece of text is, not which colour it gets.
#[derive(Debug, Clone, Copy)]
pub enum Tone {
    Added,
    Removed,
    Changed,
    Heading,
    Dim,
    Warning,
    Error,
}

impl Tone {
    fn style(self) -> Style {
        let color = |c: AnsiColor| Style::new().fg_color(Some(c.into()));
        match self {
            Self::Added => color(AnsiColor::Green),
            Self::Removed => color(AnsiColor::Red),
            Self::Changed => color(AnsiColor::Yellow),
            Self::Heading => Style::new().bold(),
            Self::Dim => Style::new().dimmed(),
            Self::Warning => color(AnsiColor::Yellow).bold(),
            Self::Error => color(AnsiColor::Red).bold(),
        }
    }
}

/// Writes to stdout/stderr, colouring only when allowed.
#[derive(Debug, Clone)]
pub struct Printer {
    stdout_color: bool,
    stderr_color: bool,
}

impl Printer {
    /// `Auto` colours a stream only when it is a terminal and `NO_COLOR` is unset.
    #[must_use]
    pub fn new(choice: ColorChoice) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let decide = |is_tty: bool| match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => is_tty && !no_color,
        };
        Self {
            stdout_color: decide(std::io::stdout().is_terminal()),
            stderr_color: decide(std::io::stderr().is_terminal()),
        }
    }

    /// A printer that never colours (tests, files).
    #[must_use]
    pub fn plain() -> Self {
        Self {
            stdout_color: false,
            stderr_color: false,
        }
    }

    /// Wraps `text` in the tone's style when stdout is coloured.
    #[must_use]
    pub fn paint(&self, tone: Tone, text: &str) -> String {
        paint(self.stdout_color, tone, text)
    }

    /// Like [`Printer::paint`], for text bound for stderr.
    #[must_use]
    pub fn paint_err(&self, tone: Tone, text: &str) -> String {
        paint(self.stderr_color, tone, text)
    }

    /// Prints to stdout. A closed pipe (`virtplan plan | head`) is not an error: output stops.
    pub fn out(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
    }

    /// Prints one line to stderr.
    pub fn err_line(&self, text: &str) {
        let _ = writeln!(std::io::stderr().lock(), "{text}");
    }

    /// Prints an error, prefixed with `error:`.
    pub fn error(&self, message: &str) {
        let prefix = paint(self.stderr_color, Tone::Error, "error:");
        self.err_line(&format!("{prefix} {message}"));
    }

    /// Prints a warning, prefixed with `warning:`.
    pub fn warning(&self, message: &str) {
        let prefix = paint(self.stderr_color, Tone::Warning, "warning:");
        self.err_line(&format!("{prefix} {message}"));
    }

    /// Whether stderr is coloured (for diagnostics rendering).
    #[must_use]
    pub fn stderr_color(&self) -> bool {
        self.stderr_color
    }
}

fn paint(enabled: bool, tone: Tone, text: &str) -> String {
    if enabled {
        let style = tone.style();
        format!("{style}{text}{style:#}")
    } else {
        text.to_owned()
    }
}
