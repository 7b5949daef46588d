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
    /// The first stdout write error other than a closed pipe (a full disk): the run fails.
    stdout_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
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
            stdout_error: std::sync::Arc::default(),
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
            stdout_error: std::sync::Arc::default(),
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
    /// Any other failure (a full disk behind `> plan.txt`) is kept for [`Printer::stdout_error`],
    /// so the run exits non-zero instead of leaving a truncated file that looks complete.
    pub fn out(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let result = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let mut slot = self
                    .stdout_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                slot.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// The first stdout write failure other than a closed pipe, if any.
    #[must_use]
    pub fn stdout_error(&self) -> Option<String> {
        self.stdout_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

    /// Prints an error, prefixed with `error:`. Messages quote user text (names, paths,
    /// libvirt's words), so every control character but the line breaks is escaped.
    pub fn error(&self, message: &str) {
        let prefix = paint(self.stderr_color, Tone::Error, "error:");
        self.err_line(&format!("{prefix} {}", escape_lines(message)));
    }

    /// Prints a warning, prefixed with `warning:` (also under `-q`: warnings are results);
    /// escaped like [`Printer::error`].
    pub fn warning(&self, message: &str) {
        let prefix = paint(self.stderr_color, Tone::Warning, "warning:");
        self.err_line(&format!("{prefix} {}", escape_lines(message)));
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

pub use crate::text::{escape, escape_lines};
