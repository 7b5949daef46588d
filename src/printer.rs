//! The one place terminal output goes through: colour decisions, named styles, errors.

use std::io::{IsTerminal, Write};

use anstyle::{AnsiColor, Style};

use crate::cli::ColorChoice;
pub use crate::cli::Verbosity;

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
    verbosity: Verbosity,
    stderr_tty: bool,
}

impl Printer {
    /// `Auto` colours a stream only when it is a terminal and `NO_COLOR` is unset.
    #[must_use]
    pub fn new(choice: ColorChoice, verbosity: Verbosity) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let decide = |is_tty: bool| match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => is_tty && !no_color,
        };
        Self {
            stdout_color: decide(std::io::stdout().is_terminal()),
            stderr_color: decide(std::io::stderr().is_terminal()),
            verbosity,
            stderr_tty: std::io::stderr().is_terminal(),
        }
    }

    /// The same printer saying more or less.
    #[must_use]
    pub fn with_verbosity(mut self, verbosity: Verbosity) -> Self {
        self.verbosity = verbosity;
        self
    }

    /// How much is printed besides results and errors.
    #[must_use]
    pub fn verbosity(&self) -> Verbosity {
        self.verbosity
    }

    /// Whether stderr is a terminal, where a live line may be redrawn in place.
    #[must_use]
    pub fn stderr_is_terminal(&self) -> bool {
        self.stderr_tty
    }

    /// A printer that never colours (tests, files).
    #[must_use]
    pub fn plain() -> Self {
        Self {
            stdout_color: false,
            stderr_color: false,
            verbosity: Verbosity::Normal,
            stderr_tty: false,
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

    /// A status or progress message on stderr; `-q` silences it.
    pub fn info(&self, text: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.err_line(text);
        }
    }

    /// A detail only `-v` shows.
    pub fn detail(&self, text: &str) {
        if self.verbosity >= Verbosity::Verbose {
            self.err_line(text);
        }
    }

    /// Writes `text` to stderr without a newline (a live line redrawn with `\r`).
    pub fn err_raw(&self, text: &str) {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr
            .write_all(text.as_bytes())
            .and_then(|()| stderr.flush());
    }

    /// Prints an error, prefixed with `error:`.
    pub fn error(&self, message: &str) {
        let prefix = paint(self.stderr_color, Tone::Error, "error:");
        self.err_line(&format!("{prefix} {message}"));
    }

    /// Prints a warning, prefixed with `warning:` (also under `-q`: warnings are results).
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
