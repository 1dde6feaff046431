//! A real serial line for RTU tests: two ptys joined by socat.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::child::KilledOnDrop;

/// A pty pair from socat, killed and reaped on drop.
pub struct PtyPair {
    _socat: KilledOnDrop,
    _dir: tempfile::TempDir,
    /// One end's path (the poller's side in the tests).
    pub a: String,
    /// The other end's path (the device's side).
    pub b: String,
}

impl PtyPair {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a").display().to_string();
        let b = dir.path().join("b").display().to_string();
        let child = Command::new("socat")
            .args([format!("pty,raw,echo=0,link={a}"), format!("pty,raw,echo=0,link={b}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is needed for the RTU tests: run scripts/test.sh, which installs it");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(std::path::Path::new(&a).exists() && std::path::Path::new(&b).exists()) {
            assert!(Instant::now() < deadline, "socat made no pty pair within 10s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            _socat: KilledOnDrop(child),
            _dir: dir,
            a,
            b,
        }
    }
}
