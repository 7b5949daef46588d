//! Data flows one way: the model layers (plan file, configuration, attributes, state, planner,
//! lockfile, executor, hypervisor) import no presentation code (renderings, the printer,
//! commands, the command line, the reconciler's logs).

use std::path::{Path, PathBuf};

const MODEL: &[&str] = &[
    "src/plan_file",
    "src/config.rs",
    "src/attr.rs",
    "src/state.rs",
    "src/planner",
    "src/lockfile.rs",
    "src/executor",
    "src/hypervisor",
    "src/ops.rs",
];

/// Paths into presentation modules, however the `use` is written (`crate::render::x`,
/// `crate::{render, ..}`, `render::x` after such an import).
const PRESENTATION: &[&str] = &[
    "render::",
    "printer::",
    "commands::",
    "cli::",
    "reconciler::",
    "crate::{render",
    "crate::{printer",
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn model_layers_import_no_presentation_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for layer in MODEL {
        rust_files(&root.join(layer), &mut files);
    }
    assert!(files.len() > 20, "{files:?}");
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if PRESENTATION.iter().any(|p| line.contains(p)) && !line.trim_start().starts_with("//")
            {
                offences.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// One connector: every libvirt connection is opened by `ops::connect` (the adapter's own
/// constructor aside), so a connection setting (keepalive, redaction) is made in one place.
#[test]
fn libvirt_connections_are_opened_in_one_place() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let callers: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(root.join("src/hypervisor")))
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .contains("Libvirt::connect(")
        })
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert_eq!(callers, ["src/ops.rs"]);
}

/// The plan file model and the configuration form no cycle: `config` fills the plan's
/// `LoadContext`, and nothing in `plan_file` names the configuration module.
#[test]
fn plan_file_imports_nothing_of_the_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/plan_file"), &mut files);
    assert!(files.len() > 5, "{files:?}");
    let offences: Vec<String> = files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim_start().starts_with("//"))
                .filter(|(_, l)| l.contains("config::") || l.contains("crate::{config"))
                .map(|(n, l)| format!("{}:{}: {}", file.display(), n + 1, l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// One orchestration path: the signal handlers, the failpoint variable and the executor-lock
/// sequence are each written once, in `ops`, for `apply`, `apply --watch` and `watch`.
#[test]
fn signals_failpoint_and_locking_are_set_up_in_ops_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    for needle in [
        "signal_hook::",
        "\"VIRTPLAN_FAILPOINT\"",
        "ExecutorLock::acquire(",
    ] {
        let users: Vec<String> = files
            .iter()
            .filter(|f| !f.ends_with("tests.rs") && !f.starts_with(root.join("src/lockfile.rs")))
            .filter(|f| {
                // Unit tests at the end of a file may take a lock themselves.
                let text = std::fs::read_to_string(f).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                code.contains(needle)
            })
            .map(|f| f.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(users, ["src/ops.rs"], "{needle}");
    }
}
