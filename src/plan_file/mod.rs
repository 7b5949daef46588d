//! The YAML plan file.
