//! `virtplan.toml`: defaults shared by a repository's plans.
