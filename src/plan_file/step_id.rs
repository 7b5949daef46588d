//! Stable step ids: the lockfile's key for a step on a domain.
//!
//! An id hashes a [`StepIdentity`], a serde struct whose field and type names are pinned by
//! `#[serde(rename)]`, so renaming a Rust field or type cannot change what is on disk. The
//! bytes hashed are written by [`Notation`], a small serde serializer in the notation the first
//! release wrote by hand (`at=Some("…");targets=["web-01"];…`), so lockfiles written since keep
//! their ids without a migration. Tests pin literal ids for every attribute.

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::plan_file::{parse, LoadContext};

    const PLAN: &str = r#"version: 1
connection: qemu:///system
timezone: UTC
steps:
  - at: 2026-12-01 04:00
    vm: web-01
    power: shutoff
  - at: 2026-12-01 04:05
    vms: [web-01, "we\"b-02"]
    memory: 3GiB
    max_memory: 4GiB
    vcpus: 2
    max_vcpus: 4
  - at: 2026-12-01 04:06
    vm: web-01
    clock: { offset: localtime, track: guest }
    autostart: true
    title: "Web ünïcode"
    description: ""
    snapshot: { name: pre, description: before the window }
    shutdown: { mode: graceful, timeout: 1500ms, force_after_timeout: false }
  - vm: db
    connection: test:///default
    power: running
    shutdown: { mode: force }
  - at: 2026-12-01T04:07:00+01:00
    vm: db
    power: paused
    clock: { track: wall }
    snapshot: { name: s2 }
"#;

    #[test]
    fn ids_of_format_1_are_pinned() {
        let file = parse(Path::new("pin.yaml"), PLAN.to_owned(), &LoadContext::default())
            .unwrap_or_else(|d| panic!("{d}"));
        let ids: Vec<String> = file.steps.iter().map(super::super::Step::id).collect();
        assert_eq!(
            ids,
            ["safed153580", "sa930857ef0", "sc5b666a81f", "sb2d891d355", "sd0ad222910"]
        );
    }
}
