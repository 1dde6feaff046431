//! Three real `nats-server -js` processes on loopback routed as one JetStream cluster, each
//! with its own store; a node can be killed (SIGKILL) and restarted on the same ports and
//! store. Every process is killed and reaped on drop.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::nats::free_port;

struct Node {
    binary: PathBuf,
    name: String,
    port: u16,
    monitor: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of three nodes named `n0`, `n1`, `n2`.
pub struct NatsCluster {
    nodes: Vec<Node>,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Three nodes of the nats-server at `binary`.
    pub fn start(binary: &Path) -> Self {
        let store = tempfile::tempdir().unwrap();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|i| {
                let name = format!("n{i}");
                let (port, monitor) = (free_port(), free_port());
                let mut text = format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
                     jetstream {{ store_dir: \"{}\" }}\ncluster {{\n  name: tagstream\n  listen: 127.0.0.1:{}\n  routes: [\n",
                    store.path().join(&name).display(),
                    routes[i]
                );
                for (j, route) in routes.iter().enumerate().filter(|(j, _)| *j != i) {
                    let _ = writeln!(text, "    nats-route://127.0.0.1:{route}  # n{j}");
                }
                text.push_str("  ]\n}\n");
                let config = store.path().join(format!("{name}.conf"));
                std::fs::write(&config, text).unwrap();
                Node {
                    binary: binary.to_path_buf(),
                    name,
                    port,
                    monitor,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { nodes, _store: store };
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster
    }

    /// Starts node `i` (again) on its ports and store.
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.child = Some(
            Command::new(&node.binary)
                .arg("-c")
                .arg(&node.config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server is needed: run scripts/test.sh, which installs it"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not listen within 10 s", node.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A real failure: node `i` is killed with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    /// Node `i`'s monitoring address (`/connz`, `/jsz`, `/healthz`).
    pub fn monitor(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].monitor))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
