//! Rendering a site: pure functions, no API calls. The same inputs always give the same
//! objects, so the controller can compare before it writes and write nothing when nothing
//! changed.
//!
//! Per Site `<name>` (all in the Site's namespace, owned by the Site):
//! - ConfigMap `tagstream-<name>`: the Site, Device and Formula documents the ingestor reads
//!   (`site.yaml`, `devices.yaml`, `formulas.yaml`), the same manifests users apply; a site
//!   whose Devices do not fit Kubernetes' 1 MiB per ConfigMap continues in
//!   `tagstream-<name>-devices-<n>` (`devices-<n>.yaml`), all mounted in one directory
//!   (`tagstream_crds::site_files`). Invalid
//!   formulas are left out and reported, so one bad formula never stops a site. The
//!   ingestor reloads the mounted files itself: no pod restart, no config hash in the pod
//!   template.
//! - StatefulSet `tagstream-<name>`: one replica, a `queue` volume claim kept when the Site
//!   is deleted or scaled (unsent points survive), the Site's placement and resources,
//!   probes on `/healthz` and `/readyz`, a restricted security context, no service
//!   account token, the broker Secrets mounted read-only.
//! - Service `tagstream-<name>`: `/metrics` and `/status` on port 9464.

use std::{borrow::Borrow, collections::BTreeMap};

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
            HTTPGetAction, LocalObjectReference, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
            PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecretVolumeSource,
            SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
            VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kube::Resource;
use tagstream_core::{calc::FormulaError, config::SiteConfig};
use tagstream_crds::{
    Device, Formula, Site,
    site_files::{TooLarge, data_bytes, site_files},
};

/// Port of the ingestor's `/metrics`, `/healthz`, `/readyz` and `/status`.
pub const HTTP_PORT: u16 = 9464;
const CONFIG_DIR: &str = "/etc/tagstream/site";
const QUEUE_DIR: &str = "/var/lib/tagstream/queue";
const CREDENTIALS_DIR: &str = "/etc/tagstream/credentials";
const TLS_DIR: &str = "/etc/tagstream/tls";

/// Operator-wide settings for what it renders.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The ingestor image, e.g. `ghcr.io/tagstream/tagstream-ingestor:0.1.0`.
    pub ingestor_image: String,
    /// Secrets the ingestor pods pull their image with (each must exist in every Site's
    /// namespace: a pod can only name Secrets of its own).
    pub image_pull_secrets: Vec<String>,
}

/// Everything one site needs.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The site's configuration: one ConfigMap, or more when its Devices need them (each
    /// under Kubernetes' 1 MiB), the first holding the Site and the Formulas.
    pub config_maps: Vec<ConfigMap>,
    pub stateful_set: StatefulSet,
    pub service: Service,
    /// Formulas left out of the ConfigMap, and why (for their status).
    pub formula_issues: BTreeMap<String, FormulaError>,
    /// For each valid formula, the formulas it reads, in evaluation order.
    pub dependency_order: BTreeMap<String, Vec<String>>,
    /// The bytes of the ConfigMaps' data.
    pub config_bytes: usize,
}

/// The name of a site's objects.
pub fn object_name(site: &str) -> String {
    format!("tagstream-{site}")
}

/// The name of the `index`th ConfigMap of a site: the first is named as its other objects.
pub fn config_map_name(site: &str, index: usize) -> String {
    match index {
        0 => object_name(site),
        _ => format!("tagstream-{site}-devices-{index}"),
    }
}

fn labels(site: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "tagstream-ingestor".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), site.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "tagstream-operator".to_owned(),
        ),
    ])
}

fn selector(site: &str) -> BTreeMap<String, String> {
    labels(site)
        .into_iter()
        .filter(|(k, _)| k != "app.kubernetes.io/managed-by")
        .collect()
}

fn sorted<K: Resource>(objects: &[impl Borrow<K>]) -> Vec<&K> {
    let mut sorted: Vec<&K> = objects.iter().map(Borrow::borrow).collect();
    sorted.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
    sorted
}

/// Renders a site from the Devices and Formulas that name it (owned or shared, e.g. as
/// the watch stores hold them); `Err` when its configuration cannot be laid out in
/// ConfigMaps Kubernetes accepts.
pub fn render(
    site: &Site,
    devices: &[impl Borrow<Device>],
    formulas: &[impl Borrow<Formula>],
    settings: &Settings,
) -> Result<Rendered, TooLarge> {
    let name = site.meta().name.clone().unwrap_or_default();
    let namespace = site.meta().namespace.clone();
    let devices = sorted(devices);
    let formulas = sorted(formulas);

    // The same DAG the site's ingestor will build, to know which formulas it can run.
    let calc = SiteConfig {
        namespace: namespace.clone().unwrap_or_default(),
        name: name.clone(),
        spec: site.spec.clone(),
        defined: true,
        devices: devices.iter().map(|d| (*d).clone()).collect(),
        formulas: formulas.iter().map(|f| (*f).clone()).collect(),
    }
    .calc();
    let formula_issues = calc.issues().clone();
    let dependency_order = calc.dependency_order();
    let valid: Vec<&Formula> = formulas
        .iter()
        .filter(|f| !formula_issues.contains_key(f.meta().name.as_deref().unwrap_or_default()))
        .copied()
        .collect();
    let files = site_files(site, &devices, &valid)?;

    let owner = site.controller_owner_ref(&()).map(|o| vec![o]);
    let meta = |name: &str| ObjectMeta {
        name: Some(object_name(name)),
        namespace: namespace.clone(),
        labels: Some(labels(name)),
        owner_references: owner.clone(),
        ..ObjectMeta::default()
    };

    let config_bytes = files.iter().map(data_bytes).sum();
    let config_maps: Vec<ConfigMap> = files
        .into_iter()
        .enumerate()
        .map(|(index, data)| ConfigMap {
            metadata: ObjectMeta {
                name: Some(config_map_name(&name, index)),
                ..meta(&name)
            },
            data: Some(data),
            ..ConfigMap::default()
        })
        .collect();
    Ok(Rendered {
        stateful_set: stateful_set(site, &name, meta(&name), config_maps.len(), settings),
        config_maps,
        service: Service {
            metadata: meta(&name),
            spec: Some(ServiceSpec {
                selector: Some(selector(&name)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(HTTP_PORT),
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
        formula_issues,
        dependency_order,
        config_bytes,
    })
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// A Secret the ingestor reads its broker credentials or certificates from. Optional:
/// without it the pod still starts, polls and queues, and the ingestor reports the
/// missing file in its status (the Site's `QueueHealthy`: `BrokerMisconfigured`); a
/// required one kept the pod in `ContainerCreating`, where only `kubectl describe pod`
/// said why. The kubelet mounts the Secret once it exists, and the next connection
/// attempt reads it.
fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            optional: Some(true),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The ingestor container: its command line, port, probes and locked-down context.
fn ingestor_container(site: &Site, mounts: Vec<VolumeMount>, settings: &Settings) -> Container {
    let spec = &site.spec;
    Container {
        name: "ingestor".into(),
        image: Some(settings.ingestor_image.clone()),
        args: Some(
            [
                "run",
                "-f",
                CONFIG_DIR,
                "--queue-dir",
                QUEUE_DIR,
                "--credentials-dir",
                CREDENTIALS_DIR,
                "--tls-dir",
                TLS_DIR,
                "--http",
                &format!("0.0.0.0:{HTTP_PORT}"),
                "--log-json",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(HTTP_PORT),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: spec.placement.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// The directory of the site's configuration: its ConfigMap, or all of them projected
/// into one directory (one atomic update of the files when several change together). A
/// change in their number changes the pod template, so the ingestor restarts on it.
fn config_volume(site: &str, config_maps: usize) -> Volume {
    if config_maps <= 1 {
        return Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: object_name(site),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        };
    }
    Volume {
        name: "config".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(
                (0..config_maps)
                    .map(|index| VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: config_map_name(site, index),
                            ..ConfigMapProjection::default()
                        }),
                        ..VolumeProjection::default()
                    })
                    .collect(),
            ),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn stateful_set(site: &Site, name: &str, metadata: ObjectMeta, config_maps: usize, settings: &Settings) -> StatefulSet {
    let spec = &site.spec;
    let mut volumes = vec![config_volume(name, config_maps)];
    let mut mounts = vec![mount("config", CONFIG_DIR, true), mount("queue", QUEUE_DIR, false)];
    if let Some(credentials) = &spec.broker.credentials {
        volumes.push(secret_volume("credentials", &credentials.secret_name));
        mounts.push(mount("credentials", CREDENTIALS_DIR, true));
    }
    if let Some(tls) = &spec.broker.tls {
        volumes.push(secret_volume("tls", &tls.secret_name));
        mounts.push(mount("tls", TLS_DIR, true));
    }
    let container = ingestor_container(site, mounts, settings);
    let pod = PodSpec {
        automount_service_account_token: Some(false),
        containers: vec![container],
        image_pull_secrets: Some(
            settings
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect::<Vec<_>>(),
        )
        .filter(|s| !s.is_empty()),
        node_selector: Some(spec.placement.node_selector.clone()).filter(|s| !s.is_empty()),
        tolerations: Some(spec.placement.tolerations.clone()).filter(|t| !t.is_empty()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65_532),
            run_as_group: Some(65_532),
            fs_group: Some(65_532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        // SIGTERM drains the queue for up to 20 s (the ingestor's --drain-deadline).
        termination_grace_period_seconds: Some(30),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(object_name(name)),
            selector: LabelSelector {
                match_labels: Some(selector(name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("queue".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: spec.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_owned(), spec.storage.size.clone())])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            // Unsent points live on the claim: never delete it with the workload.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}
