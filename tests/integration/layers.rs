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
