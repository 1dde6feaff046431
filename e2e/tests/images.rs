//! The container images, run the way the operator's pod spec runs them: UID 65532, a
//! read-only root filesystem, every capability dropped, no privilege escalation, the
//! config mounted read-only and the queue on a mounted volume.
//!
//! `scripts/images.sh` builds the images and runs this with their names in
//! `TAGSTREAM_INGESTOR_IMAGE`, `TAGSTREAM_OPERATOR_IMAGE` and `TAGSTREAM_NATS_IMAGE` (and
//! the docker client in `TAGSTREAM_IMAGES_DOCKER`); without them each test prints one
//! `SKIPPED images: ...` line and passes.

#[path = "../../ingestor/tests/support/http.rs"]
mod http;
#[path = "../../ingestor/tests/support/stream.rs"]
mod stream;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use http::http_get;
use serde_json::Value;
use stream::{assert_exactly_once_in_order, stream_contents};
use tagstream_crds::manifest::load;
use tagstream_operator::render::{Settings, render};
use tokio::process::Command;

/// The container's user: the image's nonroot user and the pod's `runAsUser`/`fsGroup`.
const NONROOT: u32 = 65_532;

/// The pod spec's security context, as docker flags (checked against the rendered pod
/// spec by [`rendered_ingestor`]).
const LOCKED_DOWN: [&str; 7] = [
    "--user",
    "65532:65532",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
];

/// How the operator runs the ingestor for the example Site: its arguments and where it
/// mounts the config and the queue, from the operator's own rendering.
struct IngestorRun {
    args: Vec<String>,
    config_dir: String,
    queue_dir: String,
}

fn rendered_ingestor() -> IngestorRun {
    let report = load(&[example_plant()]).unwrap();
    let site = &report.sites[0].object;
    let devices: Vec<_> = report.devices.iter().map(|d| d.object.clone()).collect();
    let formulas: Vec<_> = report.formulas.iter().map(|f| f.object.clone()).collect();
    let settings = Settings {
        ingestor_image: "ignored".into(),
        image_pull_secrets: Vec::new(),
    };
    let pod = render(site, &devices, &formulas, &settings)
        .expect("the example plant fits its ConfigMap")
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let security = pod.security_context.clone().unwrap();
    assert_eq!(
        (security.run_as_user, security.run_as_group, security.fs_group),
        (
            Some(i64::from(NONROOT)),
            Some(i64::from(NONROOT)),
            Some(i64::from(NONROOT))
        )
    );
    let container = &pod.containers[0];
    let context = container.security_context.clone().unwrap();
    assert_eq!(context.read_only_root_filesystem, Some(true));
    assert_eq!(context.allow_privilege_escalation, Some(false));
    assert_eq!(context.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    let mount = |name: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .map(|m| m.mount_path.clone())
            .unwrap()
    };
    IngestorRun {
        args: container.args.clone().unwrap(),
        config_dir: mount("config"),
        queue_dir: mount("queue"),
    }
}

struct Images {
    docker: String,
    ingestor: String,
    operator: String,
    nats: String,
}

fn images(test: &str) -> Option<Images> {
    let var = |name: &str| std::env::var(name).ok();
    let named = || {
        Some(Images {
            docker: var("TAGSTREAM_IMAGES_DOCKER").unwrap_or_else(|| "docker".into()),
            ingestor: var("TAGSTREAM_INGESTOR_IMAGE")?,
            operator: var("TAGSTREAM_OPERATOR_IMAGE")?,
            nats: var("TAGSTREAM_NATS_IMAGE")?,
        })
    };
    let images = named();
    if images.is_none() {
        // Straight to stderr, past the test harness's capture, so the skip is always seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED images: {test}: no images named; scripts/images.sh builds and runs them"
        );
    }
    images
}

fn example_plant() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/plant")
}

fn mount(host: &Path, container: &str, read_only: bool) -> String {
    let mode = if read_only { ":ro" } else { "" };
    format!("{}:{container}{mode}", host.display())
}

/// The containers and network of one test, removed when it ends, passed or not.
struct Scene {
    docker: String,
    suffix: String,
    containers: Vec<String>,
    network: Option<String>,
}

impl Scene {
    fn new(docker: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Self {
            docker: docker.to_owned(),
            suffix: format!("{}-{nanos}", std::process::id()),
            containers: Vec::new(),
            network: None,
        }
    }

    /// Runs `docker args`, bounded by two minutes.
    async fn docker(&self, args: &[&str]) -> Output {
        let run = Command::new(&self.docker).args(args).kill_on_drop(true).output();
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("docker {args:?} did not finish within 2 minutes"))
            .expect("run docker")
    }

    async fn docker_ok(&self, args: &[&str]) -> String {
        let output = self.docker(args).await;
        assert!(
            output.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    async fn network(&mut self) -> String {
        let name = format!("tagstream-images-{}", self.suffix);
        self.docker_ok(&["network", "create", &name]).await;
        self.network = Some(name.clone());
        name
    }

    /// Starts a detached container named `<role>-<suffix>`; `args` go before the image's.
    async fn start(&mut self, role: &str, args: &[&str]) -> String {
        let name = format!("{role}-{}", self.suffix);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        self.docker_ok(&all).await;
        self.containers.push(name.clone());
        name
    }

    /// The host address a container's port is published on.
    async fn published(&self, container: &str, port: &str) -> String {
        let line = self.docker_ok(&["port", container, port]).await;
        line.lines().next().unwrap_or_default().to_owned()
    }

    async fn logs(&self, container: &str) -> String {
        let output = self.docker(&["logs", container]).await;
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = std::process::Command::new(&self.docker)
                .args(["rm", "-f", container])
                .output();
        }
        if let Some(network) = &self.network {
            let _ = std::process::Command::new(&self.docker)
                .args(["network", "rm", network])
                .output();
        }
    }
}

/// Polls `check` every 500 ms until it gives a value, for at most `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Result<Option<T>, String>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::from("not checked yet");
    while tokio::time::Instant::now() < deadline {
        match check().await {
            Ok(Some(value)) => return value,
            Ok(None) => last = "not yet".into(),
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}; last: {last}");
}

#[tokio::test]
async fn both_images_answer_help_locked_down_and_carry_no_shell() {
    let Some(images) = images("help") else { return };
    let scene = Scene::new(&images.docker);
    for image in [&images.ingestor, &images.operator] {
        let mut args = vec!["run", "--rm"];
        args.extend(LOCKED_DOWN);
        args.extend([image.as_str(), "--help"]);
        let help = scene.docker_ok(&args).await;
        assert!(help.contains("Usage:"), "{image} --help: {help}");

        let shell = scene
            .docker(&["run", "--rm", "--entrypoint", "/bin/sh", image, "-c", "true"])
            .await;
        assert!(!shell.status.success(), "{image} has a shell");
    }
}

#[tokio::test]
async fn the_ingestor_refuses_a_queue_volume_it_cannot_write() {
    let Some(images) = images("unwritable queue") else {
        return;
    };
    let scene = Scene::new(&images.docker);
    let root_owned = tempfile::tempdir().unwrap();
    let owned = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(owned.path(), Some(NONROOT), Some(NONROOT)).unwrap();
    let run = rendered_ingestor();
    let cases = [
        (mount(root_owned.path(), &run.queue_dir, false), "Permission denied"),
        (mount(owned.path(), &run.queue_dir, true), "Read-only file system"),
    ];
    for (queue, cause) in cases {
        let config = mount(&example_plant(), &run.config_dir, true);
        let mut args = vec!["run", "--rm"];
        args.extend(LOCKED_DOWN);
        args.extend(["-v", &config, "-v", &queue, &images.ingestor]);
        args.extend(run.args.iter().map(String::as_str));
        let output = scene.docker(&args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{queue}: started");
        let refused = format!("the queue directory {} is not writable", run.queue_dir);
        assert!(stderr.contains(&refused) && stderr.contains(cause), "{queue}: {stderr}");
    }
}

#[tokio::test]
async fn the_ingestor_image_publishes_the_example_plant_from_a_simulator_container() {
    let Some(images) = images("example plant") else { return };
    let mut scene = Scene::new(&images.docker);
    let network = scene.network().await;
    let plant = example_plant();
    let queue = tempfile::tempdir().unwrap();
    // What the pod's fsGroup does for the claim.
    std::os::unix::fs::chown(queue.path(), Some(NONROOT), Some(NONROOT)).unwrap();

    // The example Site's broker and the example Devices' host, as names on the network.
    let mut nats_args = vec!["--network", &network, "--network-alias", "nats.nats.svc"];
    nats_args.extend(LOCKED_DOWN);
    nats_args.extend([
        "--tmpfs",
        "/data:rw,uid=65532,gid=65532",
        "-p",
        "127.0.0.1::4222",
        &images.nats,
        "-js",
        "-sd",
        "/data",
    ]);
    let nats = scene.start("nats", &nats_args).await;
    let devices = mount(&plant, "/etc/tagstream/devices", true);
    let mut simulator_args = vec!["--network", &network, "--network-alias", "tagstream-simulator"];
    simulator_args.extend(LOCKED_DOWN);
    simulator_args.extend([
        "-v",
        &devices,
        &images.ingestor,
        "simulate",
        "-f",
        "/etc/tagstream/devices",
        "--listen",
        "0.0.0.0",
    ]);
    scene.start("simulator", &simulator_args).await;
    let run = rendered_ingestor();
    let config = mount(&plant, &run.config_dir, true);
    let queue_mount = mount(queue.path(), &run.queue_dir, false);
    let mut ingestor_args = vec!["--network", &network];
    ingestor_args.extend(LOCKED_DOWN);
    ingestor_args.extend([
        "-v",
        &config,
        "-v",
        &queue_mount,
        "-p",
        "127.0.0.1::9464",
        &images.ingestor,
    ]);
    ingestor_args.extend(run.args.iter().map(String::as_str));
    let ingestor = scene.start("ingestor", &ingestor_args).await;
    let http = scene.published(&ingestor, "9464/tcp").await;

    let status: Value = wait_for(
        "every device connected, every formula valid, records acked",
        Duration::from_secs(90),
        async || {
            let address = http.parse().map_err(|e| format!("{http}: {e}"))?;
            let body = http_get(address, "/status")
                .await
                .ok_or_else(|| format!("no HTTP answer from {http}"))?;
            let status: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let devices = status["devices"]
                .as_object()
                .map_or(0, |d| d.values().filter(|d| d["connected"] == true).count());
            let formulas = status["formulas"]
                .as_object()
                .map_or(0, |f| f.values().filter(|f| f["valid"] == true).count());
            let acked = status["publisher"]["ackedRecords"].as_u64().unwrap_or(0);
            Ok((devices == 3 && formulas == 5 && acked > 0).then_some(status))
        },
    )
    .await;
    println!(
        "images: ingestor container: {} points polled, {} derived, {} records acked",
        status["pointsPolled"], status["pointsDerived"], status["publisher"]["ackedRecords"]
    );

    // SIGTERM, as the kubelet sends it: the ingestor drains its queue and exits 0.
    scene.docker_ok(&["stop", "-t", "30", &ingestor]).await;
    let exit = scene
        .docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &ingestor])
        .await;
    assert_eq!(
        exit,
        "0",
        "exit code after SIGTERM; logs:\n{}",
        scene.logs(&ingestor).await
    );

    let nats_url = format!("nats://{}", scene.published(&nats, "4222/tcp").await);
    let client = async_nats::connect(&nats_url).await.unwrap();
    let stored = stream_contents(client, "TAGSTREAM").await;
    let sources: std::collections::BTreeSet<&str> = stored.iter().map(|(_, b)| b.source.as_str()).collect();
    assert_eq!(sources.len(), 8, "3 devices and 5 formulas in the stream: {sources:?}");
    assert_exactly_once_in_order(&stored, 0);
    println!(
        "images: {} batches in JetStream, every queue record once and in order",
        stored.len()
    );
}
