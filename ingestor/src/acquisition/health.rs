//! Per-device health, kept for the status endpoint and metrics.

/// What the ingestor knows of a device's recent polls (also its `/status` entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceHealth {
    /// Whether the last poll reached the device.
    pub connected: bool,
    /// Time of the last successful poll, ns since the Unix epoch.
    #[serde(rename = "lastPollNs")]
    pub last_success_ns: Option<i64>,
    pub polls: u64,
    pub failed_polls: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl DeviceHealth {
    pub fn record_success(&mut self, at_ns: i64) {
        self.connected = true;
        self.last_success_ns = Some(at_ns);
        self.polls += 1;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    pub fn record_failure(&mut self, error: String, consecutive: u32) {
        self.connected = false;
        self.polls += 1;
        self.failed_polls += 1;
        self.consecutive_failures = consecutive;
        self.last_error = Some(error);
    }
}
