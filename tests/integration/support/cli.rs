//! A small builder for running the built `virtplan` binary and checking what it did, in the
//! spirit of casey/just's `tests/test.rs` `Test`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One run of the `virtplan` binary: arguments, environment and folder in; checks on the way out.
#[must_use]
pub struct Cli {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    current_dir: PathBuf,
    status: i32,
    stdout_contains: Vec<String>,
    stderr_contains: Vec<String>,
    stdout_lacks: Vec<String>,
    stderr_lacks: Vec<String>,
}

impl Cli {
    /// A run in the crate root, with `NO_COLOR=1` and an empty user config folder, expecting
    /// exit code 0.
    pub fn new() -> Self {
        // An empty folder as $HOME and $XDG_CONFIG_HOME keeps the user's own virtplan.toml out.
        let home = std::env::temp_dir().join("virtplan-tests-empty-home");
        Self {
            args: Vec::new(),
            env: vec![
                ("NO_COLOR".into(), "1".into()),
                ("HOME".into(), home.clone().into()),
                ("XDG_CONFIG_HOME".into(), home.into()),
            ],
            env_remove: Vec::new(),
            current_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            status: 0,
            stdout_contains: Vec::new(),
            stderr_contains: Vec::new(),
            stdout_lacks: Vec::new(),
            stderr_lacks: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs without `SUDO_USER`, so `cancel` records `USER` as who cancelled.
    pub fn env_remove_sudo(mut self) -> Self {
        self.env_remove.push("SUDO_USER".into());
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.current_dir = dir.as_ref().to_path_buf();
        self
    }

    pub fn status(mut self, code: i32) -> Self {
        self.status = code;
        self
    }

    pub fn stdout_contains(mut self, text: impl Into<String>) -> Self {
        self.stdout_contains.push(text.into());
        self
    }

    pub fn stderr_contains(mut self, text: impl Into<String>) -> Self {
        self.stderr_contains.push(text.into());
        self
    }

    pub fn stdout_lacks(mut self, text: impl Into<String>) -> Self {
        self.stdout_lacks.push(text.into());
        self
    }

    pub fn stderr_lacks(mut self, text: impl Into<String>) -> Self {
        self.stderr_lacks.push(text.into());
        self
    }

    /// Runs the binary and checks every expectation; returns what it printed for further checks.
    #[track_caller]
    pub fn run(self) -> Ran {
        let home = std::env::temp_dir().join("virtplan-tests-empty-home");
        std::fs::create_dir_all(&home).expect("create the empty home folder");
        let mut command = Command::new(env!("CARGO_BIN_EXE_virtplan"));
        command
            .args(&self.args)
            .current_dir(&self.current_dir)
            .env_remove("LIBVIRT_DEFAULT_URI")
            .stdin(std::process::Stdio::null());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        for key in &self.env_remove {
            command.env_remove(key);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().expect("run the virtplan binary");
        let ran = Ran {
            command: format!("virtplan {}", shown(&self.args)),
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        };
        ran.check(
            ran.code == Some(self.status),
            &format!("exit code {}", self.status),
        );
        ran.check(!ran.stderr.contains("panicked"), "no panic");
        ran.check(!ran.stderr.contains("RUST_BACKTRACE"), "no panic");
        for text in &self.stdout_contains {
            ran.check(
                ran.stdout.contains(text),
                &format!("stdout contains {text:?}"),
            );
        }
        for text in &self.stderr_contains {
            ran.check(
                ran.stderr.contains(text),
                &format!("stderr contains {text:?}"),
            );
        }
        for text in &self.stdout_lacks {
            ran.check(
                !ran.stdout.contains(text),
                &format!("stdout lacks {text:?}"),
            );
        }
        for text in &self.stderr_lacks {
            ran.check(
                !ran.stderr.contains(text),
                &format!("stderr lacks {text:?}"),
            );
        }
        ran
    }
}

/// What a run printed.
pub struct Ran {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    #[track_caller]
    pub fn check(&self, ok: bool, expected: &str) {
        assert!(
            ok,
            "`{}`: expected {expected}\nexit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        );
    }
}

fn shown(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
