//! A host that could not be reached when a run started: it stands in the run's connections so
//! the executor knows the host and can open it later (a saved plan's host that is down at
//! 04:00 may be back at 04:05). Every call fails as a lost connection would.

use chrono::{DateTime, Utc};

use super::{
    DomainId, DomainState, ErrorKind, HvError, HvResult, Hypervisor, Kib, LifecycleAction,
    LifecycleEvent, Scope,
};

/// See the module documentation.
#[derive(Debug)]
pub struct Unreachable {
    uri: crate::uri::Uri,
    error: HvError,
}

impl Unreachable {
    /// The host at `uri`, which could not be opened because of `error`.
    #[must_use]
    pub fn new(uri: crate::uri::Uri, error: HvError) -> Self {
        Self { uri, error }
    }

    fn fail<T>(&self) -> HvResult<T> {
        Err(HvError::new(
            ErrorKind::Transient,
            self.error.message.clone(),
        ))
    }
}

impl Hypervisor for Unreachable {
    fn uri(&self) -> &crate::uri::Uri {
        &self.uri
    }
    fn unreachable(&self) -> Option<&HvError> {
        Some(&self.error)
    }
    fn resolve(&self, _: &str) -> HvResult<DomainId> {
        self.fail()
    }
    fn observe(&self, _: &str, _: bool) -> HvResult<DomainState> {
        self.fail()
    }
    fn domain_xml(&self, _: &str, _: bool) -> HvResult<String> {
        self.fail()
    }
    fn host_cpus(&self) -> HvResult<u32> {
        self.fail()
    }
    fn snapshot_names(&self, _: &str) -> HvResult<Vec<String>> {
        self.fail()
    }
    fn start(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn shutdown(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn destroy(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn suspend(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn resume(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn set_memory(&self, _: &str, _: Kib, _: Scope) -> HvResult<()> {
        self.fail()
    }
    fn set_max_memory(&self, _: &str, _: Kib) -> HvResult<()> {
        self.fail()
    }
    fn set_vcpus(&self, _: &str, _: u32, _: Scope) -> HvResult<()> {
        self.fail()
    }
    fn set_max_vcpus(&self, _: &str, _: u32) -> HvResult<()> {
        self.fail()
    }
    fn define_xml(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn set_autostart(&self, _: &str, _: bool) -> HvResult<()> {
        self.fail()
    }
    fn set_lifecycle(&self, _: &str, _: LifecycleEvent, _: LifecycleAction) -> HvResult<()> {
        self.fail()
    }
    fn set_title(&self, _: &str, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn set_description(&self, _: &str, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn create_snapshot(&self, _: &str, _: &str, _: Option<&str>) -> HvResult<()> {
        self.fail()
    }
    fn list_domains(&self) -> HvResult<Vec<DomainId>> {
        self.fail()
    }
    fn metadata_element(&self, _: &str, _: &str) -> HvResult<Option<String>> {
        self.fail()
    }
    fn set_metadata_element(&self, _: &str, _: &str, _: &str, _: Option<&str>) -> HvResult<()> {
        self.fail()
    }
    fn run_id(&self, _: &str) -> HvResult<Option<u32>> {
        self.fail()
    }
    fn agent_shutdown(&self, _: &str) -> HvResult<()> {
        self.fail()
    }
    fn agent_ping(&self, _: &str, _: std::time::Duration) -> HvResult<()> {
        self.fail()
    }
    fn set_guest_time(&self, _: &str, _: DateTime<Utc>) -> HvResult<()> {
        self.fail()
    }
}
