//! A real `nats-server -js` for tests and benchmarks: a free loopback port, a temporary
//! store, killed (a real outage) and reaped on drop.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A nats-server child with JetStream, killed and reaped on drop.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub store: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(config: Option<&str>) -> Self {
        let store = tempfile::tempdir().unwrap();
        let config = config.map(|text| {
            let path = store.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut nats = Self {
            child: None,
            port: free_port(),
            store,
            config,
        };
        nats.restart();
        nats
    }

    /// Starts the server (again) on the same port and store.
    pub fn restart(&mut self) {
        let mut command = Command::new("nats-server");
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        self.child = Some(
            command
                .spawn()
                .expect("nats-server is needed: run scripts/test.sh, which installs it"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen within 10s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A real outage: the process is killed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
