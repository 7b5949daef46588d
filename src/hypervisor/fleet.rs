//! Generated test-driver node XML fleets, for fast tests and benchmarks.
