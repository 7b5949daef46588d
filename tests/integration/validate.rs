//! `virtplan validate` and the plan file's schema: a corpus of broken plans with their exact
//! diagnostics, the examples, the checked-in JSON Schema, and a no-panic property test.
//!
//! Corpus: every `tests/corpus/invalid/**/NAME.yaml` has a `NAME.expected` beside it with the
//! one-line form of each diagnostic (`file:line:column: message (help: hint)`), paths relative
//! to the crate root. `VIRTPLAN_BLESS=1 cargo test` rewrites them; read the diff before
//! committing it, as an operator would read the messages at 4 a.m.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::Value;
use virtplan::config::{self, Config};
use virtplan::plan_file::{self, keys, Diagnostics, LoadContext};

use crate::support::cli::Cli;

const CORPUS: &str = "tests/corpus/invalid";

/// Every file under `dir` (recursively) whose name ends in `.{ext}`, sorted, as given.
fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a test folder") {
            let path = entry.expect("read a folder entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The configuration a corpus plan gets: the nearest `virtplan.toml` inside the corpus only,
/// so nothing on the machine running the tests leaks in.
fn corpus_config(plan: &Path) -> Config {
    plan.ancestors()
        .skip(1)
        .take_while(|dir| dir.starts_with(CORPUS))
        .map(|dir| dir.join(config::FILE_NAME))
        .find(|candidate| candidate.is_file())
        .map_or_else(Config::default, |path| {
            config::load(&path).unwrap_or_else(|e| panic!("{e}"))
        })
}

fn load_corpus_plan(plan: &Path) -> Diagnostics {
    let ctx = LoadContext::from(corpus_config(plan));
    match plan_file::load(plan, &ctx) {
        Ok(_) => panic!(
            "{} validated, but it is in the invalid corpus",
            plan.display()
        ),
        Err(diags) => diags,
    }
}

fn one_line_forms(diags: &Diagnostics) -> String {
    diags.items.iter().fold(String::new(), |mut out, d| {
        let _ = writeln!(out, "{d}");
        out
    })
}

#[test]
fn corpus_has_at_least_45_plans_each_with_expected_diagnostics() {
    let plans = files_with_extension(Path::new(CORPUS), "yaml");
    assert!(plans.len() >= 45, "only {} corpus plans", plans.len());
    for expected in files_with_extension(Path::new(CORPUS), "expected") {
        assert!(
            expected.with_extension("yaml").is_file(),
            "{} has no plan beside it",
            expected.display()
        );
    }
}

#[test]
fn corpus_diagnostics_match_expected_files() {
    let bless = std::env::var_os("VIRTPLAN_BLESS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for plan in files_with_extension(Path::new(CORPUS), "yaml") {
        let diags = load_corpus_plan(&plan);
        for d in &diags.items {
            assert!(
                d.pos.line >= 1 && d.pos.column >= 1,
                "{d}: positions are 1-based"
            );
            assert!(d.help.is_some(), "{d}: every diagnostic says how to fix it");
            assert!(
                !d.message.contains('\n') && !d.help.as_deref().unwrap_or("").contains('\n'),
                "{d}: one line each"
            );
        }
        let actual = one_line_forms(&diags);
        let expected_path = plan.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &actual).expect("write an expected file");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != actual {
            failures.push(format!(
                "{}\n--- expected ---\n{expected}--- actual ---\n{actual}",
                plan.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus files differ (rerun with VIRTPLAN_BLESS=1 to rewrite, then review the diff):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_plans_fail_on_the_command_line_with_every_diagnostic_located() {
    for plan in files_with_extension(Path::new(CORPUS), "yaml") {
        let diags = load_corpus_plan(&plan);
        let mut run = Cli::new()
            .args(["validate".as_ref(), plan.as_os_str()])
            .status(1)
            .stdout_lacks("ok ")
            .stderr_contains("1 of 1 plan files failed validation");
        for d in &diags.items {
            run = run
                .stderr_contains(format!("error: {}", d.message))
                .stderr_contains(format!("--> {}:{}", plan.display(), d.pos));
            if let Some(help) = &d.help {
                run = run.stderr_contains(format!("= help: {help}"));
            }
        }
        run.run();
    }
}

#[test]
fn deeply_nested_brackets_are_refused_without_overflowing_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.yaml");
    let depth = 100_000;
    let text = format!(
        "version: 1\nsteps: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    std::fs::write(&path, &text).unwrap();
    let diags = plan_file::parse(&path, text, &LoadContext::default()).unwrap_err();
    assert_eq!(diags.items.len(), 1, "{diags}");
    Cli::new()
        .args(["validate".as_ref(), path.as_os_str()])
        .status(1)
        .stderr_contains("recursion limit")
        .run();
}

#[test]
fn files_larger_than_4_mib_are_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let mut text = String::from("version: 1\n");
    let filler = "# padding to make the plan file larger than four mebibytes.....\n";
    while u64::try_from(text.len()).unwrap() <= plan_file::MAX_PLAN_BYTES {
        text.push_str(filler);
    }
    std::fs::write(&path, &text).unwrap();
    let diags = plan_file::load(&path, &LoadContext::default()).unwrap_err();
    let lines: Vec<String> = diags.items.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [format!(
            "{}:1:1: the file is {} bytes; plans are limited to 4194304 bytes (help: split the plan into several files)",
            path.display(),
            text.len()
        )]
    );
    Cli::new()
        .args(["validate".as_ref(), path.as_os_str()])
        .status(1)
        .stderr_contains("plans are limited to 4194304 bytes")
        .run();
}

#[test]
fn a_missing_file_and_a_folder_are_located_errors() {
    Cli::new()
        .args(["validate", "tests/corpus/no-such-plan.yaml"])
        .status(1)
        .stderr_contains("cannot read the plan file")
        .stderr_contains("--> tests/corpus/no-such-plan.yaml:1:1")
        .run();
    Cli::new()
        .args(["validate", "examples"])
        .status(1)
        .stderr_contains("this is a folder, not a plan file")
        .run();
}

fn example_plans() -> Vec<PathBuf> {
    files_with_extension(Path::new("examples"), "yaml")
}

#[test]
fn every_example_validates() {
    let examples = example_plans();
    assert!(examples.len() >= 3, "{examples:?}");
    for plan in &examples {
        let config = config::discover(None, Some(plan)).unwrap_or_else(|e| panic!("{e}"));
        if let Err(diags) = plan_file::load(plan, &LoadContext::from(config)) {
            panic!("{diags}");
        }
        Cli::new()
            .args(["validate".as_ref(), plan.as_os_str()])
            .stdout_contains(format!("ok {}: plan `", plan.display()))
            .run();
    }
}

#[test]
fn validating_good_and_bad_files_together_reports_both_and_fails() {
    Cli::new()
        .args([
            "validate",
            "examples/classic-window.yaml",
            "tests/corpus/invalid/power-typo.yaml",
            "examples/named-host/db-autostart.yaml",
        ])
        .status(1)
        .stdout_contains("ok examples/classic-window.yaml: plan `web-01-resize-2026-12-01`")
        .stdout_contains("ok examples/named-host/db-autostart.yaml: plan `db-autostart`")
        .stderr_contains("--> tests/corpus/invalid/power-typo.yaml:9:12")
        .stderr_contains("1 of 3 plan files failed validation")
        .stderr_lacks("classic-window")
        .run();
}

#[test]
fn the_config_beside_a_plan_is_found_from_its_own_folder() {
    Cli::new()
        .current_dir("examples/named-host")
        .args(["validate", "db-autostart.yaml"])
        .stdout_contains("ok db-autostart.yaml: plan `db-autostart`, 3 steps on 2 domains")
        .run();
}

/// Regression (issue 14): `validate` counted a `vms: {match:}` pattern as one domain
/// ("2 steps on 2 domains" for one domain and a pattern that may select fifty).
#[test]
fn validate_counts_a_pattern_as_a_pattern_not_as_one_domain() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fleet.yaml"),
        "version: 1\nconnection: qemu:///system\nsteps:\n  - vms: { match: \"web-*\" }\n    autostart: true\n  - vm: db-01\n    autostart: true\n",
    )
    .unwrap();
    Cli::new()
        .current_dir(dir.path())
        .args(["validate", "fleet.yaml"])
        .stdout_contains(
            "ok fleet.yaml: plan `fleet`, 2 steps on 1 domain and 1 pattern (`web-*`, resolved by `virtplan plan`)",
        )
        .run();
}

#[test]
fn the_machine_time_zone_is_never_assumed() {
    Cli::new()
        .env("TZ", "America/Toronto")
        .args([
            "validate",
            "tests/corpus/invalid/at-naive-without-timezone.yaml",
        ])
        .status(1)
        .stderr_contains("has no UTC offset and no time zone is set")
        .run();
}

const SCHEMA_FILE: &str = "schemas/plan.schema.json";

#[test]
fn checked_in_schema_matches_the_generated_one() {
    let checked_in = std::fs::read_to_string(SCHEMA_FILE).unwrap_or_default();
    let ran = Cli::new().arg("schema").run();
    assert!(
        checked_in == ran.stdout,
        "{SCHEMA_FILE} is out of date: run `cargo run -- schema > {SCHEMA_FILE}` and commit it"
    );
    assert_eq!(ran.stdout, plan_file::schema::plan_schema_json());
}

/// The schema object `value` stands for, following a local `$ref`.
fn resolve<'a>(root: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => root
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {pointer}")),
        None => value,
    }
}

fn property<'a>(root: &'a Value, object: &'a Value, name: &str) -> &'a Value {
    let value = object
        .get("properties")
        .and_then(|p| p.get(name))
        .unwrap_or_else(|| panic!("no property `{name}` in {object}"));
    resolve(root, value)
}

fn property_names(object: &Value) -> Vec<String> {
    let mut names: Vec<String> = object
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|&k| k.to_owned()).collect();
    keys.sort();
    keys
}

#[test]
fn validator_key_lists_match_the_schema_properties() {
    let root: Value = serde_json::from_str(&plan_file::schema::plan_schema_json()).unwrap();
    let defaults = property(&root, &root, "defaults");
    let step = resolve(&root, &property(&root, &root, "steps")["items"]);
    let notify = resolve(&root, &property(&root, &root, "notify")["items"]);
    // Objects nested under another, by the key they stand at: (what, parent, key, keys).
    let nested = [
        ("window", &root, "window", keys::WINDOW_KEYS),
        (
            "defaults.shutdown",
            defaults,
            "shutdown",
            keys::SHUTDOWN_KEYS,
        ),
        ("step.shutdown", step, "shutdown", keys::SHUTDOWN_KEYS),
        ("step.clock", step, "clock", keys::CLOCK_KEYS),
        ("step.snapshot", step, "snapshot", keys::SNAPSHOT_KEYS),
        ("notify.email", notify, "email", keys::NOTIFY_EMAIL_KEYS),
        ("step.check", step, "check", keys::CHECK_KEYS),
        ("step.rollout", step, "rollout", keys::ROLLOUT_KEYS),
    ]
    .map(|(what, parent, key, keys)| (what, property(&root, parent, key), keys));
    let objects = [
        ("the plan", &root, keys::TOP_KEYS),
        ("defaults", defaults, keys::DEFAULTS_KEYS),
        ("step", step, &keys::STEP_KEYS),
        ("notify entry", notify, keys::NOTIFY_KEYS),
    ]
    .into_iter()
    .chain(nested);
    for (what, object, keys) in objects {
        assert_eq!(property_names(object), sorted(keys), "keys of {what}");
        assert_eq!(
            object.get("additionalProperties"),
            Some(&Value::Bool(false)),
            "{what}: the schema must refuse unknown keys, as the validator does"
        );
    }
    for key in &keys::ATTRIBUTE_KEYS {
        assert!(
            keys::STEP_KEYS.contains(key),
            "attribute `{key}` is no step key"
        );
    }
}

/// One edit of an example plan, for the no-panic property test.
#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Indent { line: usize, by: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let yamlish = prop_oneof![
        Just(": ".to_owned()),
        Just("\n".to_owned()),
        Just("- ".to_owned()),
        Just("[".to_owned()),
        Just("{".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("!!str ".to_owned()),
        Just("\t".to_owned()),
        Just("---\n".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("+".to_owned()),
        Just("0".to_owned()),
        ".{0,12}",
    ];
    prop_oneof![
        (any::<usize>(), 0..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), yamlish).prop_map(|(at, text)| Mutation::Insert { at, text }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        (any::<usize>(), 1..5usize).prop_map(|(line, by)| Mutation::Indent { line, by }),
    ]
}

/// The nearest char boundary at or before `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut i = at % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let n = lines.len().max(1);
    match m {
        Mutation::Delete { at, len } => {
            let start = boundary(text, *at);
            let mut end = (start + len).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let mut out = text.to_owned();
            out.replace_range(start..end, "");
            return out;
        }
        Mutation::Insert { at, text: inserted } => {
            let mut out = text.to_owned();
            out.insert_str(boundary(text, *at), inserted);
            return out;
        }
        Mutation::DuplicateLine { line } if !lines.is_empty() => {
            let copy = lines[line % n].clone();
            lines.insert(line % n, copy);
        }
        Mutation::SwapLines { a, b } if !lines.is_empty() => lines.swap(a % n, b % n),
        Mutation::Indent { line, by } if !lines.is_empty() => {
            lines[line % n].insert_str(0, &" ".repeat(*by));
        }
        _ => {}
    }
    lines.join("\n")
}

fn example_texts() -> Vec<(PathBuf, String, Config)> {
    example_plans()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let config = config::discover(None, Some(&p)).unwrap_or_default();
            (p, text, config)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_text(text in "(?s).{0,300}") {
        let _ = plan_file::parse(Path::new("arbitrary.yaml"), text, &LoadContext::default());
    }

    #[test]
    fn parse_never_panics_on_mutated_examples(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let examples = example_texts();
        let (path, text, config) = &examples[which % examples.len()];
        let text = mutations.iter().fold(text.clone(), |t, m| apply(&t, m));
        let ctx = LoadContext::from(config.clone());
        if let Err(diags) = plan_file::parse(path, text, &ctx) {
            prop_assert!(!diags.items.is_empty());
            for d in &diags.items {
                prop_assert!(d.pos.line >= 1 && d.pos.column >= 1, "{}", d);
            }
        }
    }
}

/// A YAML file as a schema-checking editor sees it (the YAML 1.2 core schema): unquoted
/// `true`/`false`, null, whole numbers and decimals are typed; anything else, and anything
/// quoted, is text. `None`: the file is not YAML virtplan reads (its loader refuses anchors,
/// aliases, tags and duplicate keys), which an editor flags too.
fn yaml_as_json(text: &str) -> Option<Value> {
    use marked_yaml::Node;
    fn convert(node: &Node) -> Value {
        match node {
            Node::Scalar(s) if !s.may_coerce() => Value::String(s.as_str().to_owned()),
            Node::Scalar(s) => {
                let text = s.as_str();
                let numeric = text.bytes().any(|b| b.is_ascii_digit())
                    && text.bytes().all(|b| b"0123456789.eE+-".contains(&b));
                match text {
                    "" | "~" | "null" | "Null" | "NULL" => Value::Null,
                    "true" | "True" | "TRUE" => Value::Bool(true),
                    "false" | "False" | "FALSE" => Value::Bool(false),
                    _ if numeric => text
                        .parse::<i64>()
                        .map(Value::from)
                        .ok()
                        .or_else(|| text.parse::<f64>().ok().map(Value::from))
                        .unwrap_or_else(|| Value::String(text.to_owned())),
                    _ => Value::String(text.to_owned()),
                }
            }
            Node::Mapping(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.as_str().to_owned(), convert(v)))
                    .collect(),
            ),
            Node::Sequence(items) => Value::Array(items.iter().map(convert).collect()),
        }
    }
    let options = marked_yaml::LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    marked_yaml::parse_yaml_with_options(0, text, options)
        .ok()
        .map(|node| convert(&node))
}

/// Corpus plans the JSON Schema accepts although `validate` refuses them, each for a reason
/// only `validate` can know: what a time means (zones, DST, the window), what virtplan.toml
/// defines, how the values of a step or of several steps relate, and what bytes or YAML
/// features the file holds. Every other corpus plan is refused by both (and every example is
/// accepted by both). README "Validation decisions" names these classes.
const ONLY_VALIDATE_KNOWS: &[(&str, &str)] = &[
    (
        "at-naive-without-timezone.yaml",
        "config: the zone may come from virtplan.toml",
    ),
    (
        "connection-unknown-host-no-config.yaml",
        "config: host aliases live in virtplan.toml",
    ),
    (
        "named-host/connection-unknown-host.yaml",
        "config: host aliases live in virtplan.toml",
    ),
    (
        "dst-fold.yaml",
        "time: a local time the zone's DST change makes ambiguous",
    ),
    (
        "dst-gap.yaml",
        "time: a local time the zone's DST change skips",
    ),
    ("step-at-window-end.yaml", "time: a step at window.end"),
    (
        "step-outside-window.yaml",
        "time: a step outside the window",
    ),
    (
        "step-relative-past-window-end.yaml",
        "time: window.start + offset past window.end",
    ),
    ("window-end-before-start.yaml", "time: the window's order"),
    (
        "window-invalid-with-relative-steps.yaml",
        "time: the window's order",
    ),
    (
        "memory-above-max-memory.yaml",
        "values: memory above the step's max_memory",
    ),
    (
        "vcpus-above-max-vcpus.yaml",
        "values: vcpus above the step's max_vcpus",
    ),
    (
        "memory-fraction-of-kib.yaml",
        "values: a size that is not a whole KiB",
    ),
    ("memory-zero.yaml", "values: a zero size"),
    ("timeout-zero.yaml", "values: a zero timeout"),
    (
        "second-document.yaml",
        "file: a second YAML document (an editor checks each alone)",
    ),
];

/// Schema and validator agree on every plan of the corpus and every example: schema-valid ⇔
/// validate-ok, except the documented differences above (and the list holds no stale entry).
#[test]
fn schema_and_validator_agree_on_the_whole_corpus() {
    let schema: Value =
        serde_json::from_str(&plan_file::schema::plan_schema_json()).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let mut plans = files_with_extension(Path::new(CORPUS), "yaml");
    let examples = files_with_extension(Path::new("examples"), "yaml");
    assert!(examples.len() >= 5, "{examples:?}");
    plans.extend(examples);
    let mut disagreements = Vec::new();
    let mut differences = Vec::new();
    for plan in &plans {
        let config = if plan.starts_with(CORPUS) {
            corpus_config(plan)
        } else {
            config::discover(None, Some(plan)).expect("an example's virtplan.toml loads")
        };
        let validated = plan_file::load(plan, &LoadContext::from(config)).is_ok();
        let text = std::fs::read(plan).expect("read a corpus plan");
        let schema_valid = std::str::from_utf8(&text)
            .ok()
            .and_then(yaml_as_json)
            .is_some_and(|json| validator.is_valid(&json));
        let name = plan.display().to_string();
        if schema_valid && !validated {
            differences.push(name);
        } else if validated && !schema_valid {
            disagreements.push(format!("{name}: validates, but the schema refuses it"));
        }
    }
    let documented: Vec<String> = ONLY_VALIDATE_KNOWS
        .iter()
        .map(|(f, _)| format!("{CORPUS}/{f}"))
        .collect();
    for name in &differences {
        if !documented.contains(name) {
            disagreements.push(format!(
                "{name}: the schema accepts it, validate refuses it, and that is not a documented difference"
            ));
        }
    }
    for name in &documented {
        if !differences.contains(name) {
            disagreements.push(format!(
                "{name}: listed as a difference, but schema and validator agree on it now"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
