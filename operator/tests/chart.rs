//! The Helm chart with the real `helm` binary: it lints, renders for the default values
//! and every documented example, every rendered object parses as its Kubernetes type,
//! the operator is locked down, RBAC is least privilege, and the CRDs are installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, PodSpec, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use serde::Deserialize;
use tagstream_operator::default_site;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/tagstream")
}

fn helm(args: &[&str]) -> Result<String, String> {
    let output = Command::new("helm")
        .args(args)
        .output()
        .expect("the `helm` binary is needed: run scripts/test.sh, which installs it, or put helm on PATH");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("helm {args:?} failed:\n{stdout}\n{stderr}"))
    }
}

/// The chart's objects, typed.
#[derive(Debug, Default)]
struct Rendered {
    deployment: Option<Deployment>,
    config_map: Option<ConfigMap>,
    cluster_role: Option<ClusterRole>,
    role: Option<Role>,
    bindings: usize,
    service_accounts: usize,
    services: usize,
    crds: Vec<String>,
}

fn template(values: &[&Path]) -> Rendered {
    let chart = chart();
    let mut args = vec![
        "template",
        "tagstream",
        chart.to_str().unwrap(),
        "--include-crds",
        "-n",
        "tagstream",
    ];
    for file in values {
        args.extend(["-f", file.to_str().unwrap()]);
    }
    let out = helm(&args).unwrap();
    let mut rendered = Rendered::default();
    for document in serde_yaml::Deserializer::from_str(&out) {
        let value = serde_yaml::Value::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "Deployment" => rendered.deployment = Some(typed(&value)),
            "ConfigMap" => rendered.config_map = Some(typed(&value)),
            "ClusterRole" => rendered.cluster_role = Some(typed(&value)),
            "Role" => rendered.role = Some(typed(&value)),
            "ClusterRoleBinding" => {
                let _: ClusterRoleBinding = typed(&value);
                rendered.bindings += 1;
            }
            "RoleBinding" => {
                let _: RoleBinding = typed(&value);
                rendered.bindings += 1;
            }
            "ServiceAccount" => {
                let _: ServiceAccount = typed(&value);
                rendered.service_accounts += 1;
            }
            "Service" => {
                let _: Service = typed(&value);
                rendered.services += 1;
            }
            "CustomResourceDefinition" => rendered
                .crds
                .push(value["metadata"]["name"].as_str().unwrap().to_owned()),
            other => panic!("the chart renders an unexpected {other}"),
        }
    }
    rendered
}

/// Parses a rendered object as its Kubernetes type and back: a field the type does not
/// know (a typo in a template) is dropped by the parse and fails the comparison.
fn typed<K: serde::de::DeserializeOwned + serde::Serialize>(value: &serde_yaml::Value) -> K {
    let object: K = serde_yaml::from_value(value.clone()).unwrap();
    let original: serde_json::Value = serde_yaml::from_value(value.clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&object).unwrap(),
        original,
        "a rendered {} has fields its type does not know",
        value["kind"].as_str().unwrap_or_default()
    );
    object
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn pod(rendered: &Rendered) -> PodSpec {
    let deployment = rendered.deployment.as_ref().unwrap();
    deployment.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn args(rendered: &Rendered) -> Vec<String> {
    pod(rendered).containers[0].args.clone().unwrap()
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| Some(items.iter().map(|s| (*s).to_owned()).collect());
    PolicyRule {
        api_groups: strings(groups),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

#[test]
fn chart_passes_strict_lint() {
    let out = helm(&["lint", "--strict", chart().to_str().unwrap()]).unwrap();
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn the_default_install_has_the_crds_a_locked_down_operator_and_least_privilege() {
    let rendered = template(&[]);
    assert_eq!(
        rendered.crds,
        ["sites.tagstream.io", "devices.tagstream.io", "formulas.tagstream.io"]
    );
    assert_eq!(
        (rendered.service_accounts, rendered.bindings, rendered.services),
        (1, 2, 1)
    );

    let pod = pod(&rendered);
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let security = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    assert_eq!(pod.service_account_name.as_deref(), Some("tagstream-operator"));

    let rules = rendered.cluster_role.unwrap().rules.unwrap();
    assert_eq!(
        rules,
        [
            rule(
                &["tagstream.io"],
                &["sites", "devices", "formulas"],
                &["get", "list", "watch"]
            ),
            rule(&["tagstream.io"], &["sites"], &["create"]),
            rule(
                &["tagstream.io"],
                &["sites/status", "devices/status", "formulas/status"],
                &["patch"]
            ),
            rule(
                &[""],
                &["configmaps", "services"],
                &["get", "list", "watch", "create", "patch"]
            ),
            rule(
                &["apps"],
                &["statefulsets"],
                &["get", "list", "watch", "create", "patch", "delete"]
            ),
            rule(&[""], &["services/proxy"], &["get"]),
            rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
        ]
    );
    let lease = rendered.role.unwrap().rules.unwrap();
    assert_eq!(lease[0].verbs, ["create"]);
    assert_eq!(
        lease[1].resource_names.as_deref(),
        Some(&["tagstream-operator".to_owned()][..])
    );
    assert_eq!(lease[1].verbs, ["get", "patch"]);

    let args = args(&template(&[]));
    assert!(
        args.contains(&"--ingestor-image=ghcr.io/tagstream/tagstream-ingestor:0.1.0".to_owned()),
        "{args:?}"
    );
    assert!(args.contains(&"--leader-election=true".to_owned()), "{args:?}");
}

#[test]
fn every_documented_values_example_renders_and_its_default_site_validates() {
    let examples = examples();
    assert!(examples.len() >= 3, "{examples:?}");
    for file in std::iter::once(None).chain(examples.iter().map(Some)) {
        let rendered = template(file.map(PathBuf::as_path).as_slice());
        let text = &rendered.config_map.as_ref().unwrap().data.as_ref().unwrap()["default-site.yaml"];
        let name = file.map_or("default values".into(), |f| f.display().to_string());
        default_site::parse(Path::new(&name), text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        for rule in rendered.cluster_role.as_ref().unwrap().rules.as_ref().unwrap() {
            let everything = rule.verbs.iter().chain(rule.resources.iter().flatten());
            assert!(everything.clone().all(|v| v != "*"), "{name}: wildcard rule {rule:?}");
            assert!(
                rule.resources.iter().flatten().all(|r| r != "secrets"),
                "{name}: reads Secrets"
            );
        }
    }
}

/// The Secrets a documented step creates: `kubectl create secret <type> <name>` lines in
/// README.md and docs/*.md.
fn documented_secrets() -> Vec<String> {
    let root = chart().join("../..");
    let mut documents = vec![root.join("README.md")];
    documents.extend(std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()));
    let mut names = Vec::new();
    for document in documents {
        let text = std::fs::read_to_string(document).unwrap();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.windows(3).position(|w| w == ["kubectl", "create", "secret"]) {
                names.extend(words.get(i + 4).map(|n| (*n).to_owned()));
            }
        }
    }
    names
}

/// With every documented values file, each ConfigMap and Secret a pod needs (the
/// operator's, and the ingestors' from the default Site) is made by the chart or by a
/// documented step (issue 29: the edge example's default Site named a Secret nothing
/// made, and its ingestors waited for it).
#[test]
fn every_secret_and_config_map_a_pod_needs_is_made_by_the_chart_or_a_documented_step() {
    let documented = documented_secrets();
    for file in std::iter::once(None).chain(examples().iter().map(Some)) {
        let rendered = template(file.map(PathBuf::as_path).as_slice());
        let name = file.map_or("default values".into(), |f| f.display().to_string());
        let pod = pod(&rendered);
        let config_map = rendered.config_map.as_ref().unwrap().metadata.name.clone().unwrap();
        for volume in pod.volumes.iter().flatten() {
            if let Some(source) = &volume.config_map {
                assert_eq!(
                    source.name, config_map,
                    "{name}: the pod mounts a ConfigMap the chart does not make"
                );
            }
            assert!(volume.secret.is_none(), "{name}: the operator mounts a Secret");
        }
        let text = &rendered.config_map.as_ref().unwrap().data.as_ref().unwrap()["default-site.yaml"];
        let site = default_site::parse(Path::new(&name), text).unwrap();
        let secrets = pod
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.clone())
            .chain(site.broker.credentials.map(|c| c.secret_name))
            .chain(site.broker.tls.map(|t| t.secret_name));
        for secret in secrets {
            assert!(
                documented.contains(&secret),
                "{name}: Secret {secret} is needed, and no `kubectl create secret` in the docs makes it ({documented:?})"
            );
        }
    }
}

#[test]
fn the_edge_example_calls_ingestors_directly_and_needs_no_proxy_rights() {
    let rendered = template(&[&chart().join("examples/edge-k3s.yaml")]);
    let args = args(&rendered);
    assert!(args.contains(&"--status-endpoint=http://{service}.{namespace}.svc:{port}/status".to_owned()));
    let rules = rendered.cluster_role.unwrap().rules.unwrap();
    assert!(
        rules
            .iter()
            .all(|r| r.resources.as_ref().unwrap()[0] != "services/proxy")
    );
    let text = &rendered.config_map.unwrap().data.unwrap()["default-site.yaml"];
    let site = default_site::parse(Path::new("edge"), text).unwrap();
    assert_eq!(site.storage.storage_class_name.as_deref(), Some("local-path"));
    // The NATS of deploy/nats/values.yaml has no users, and no document step makes the
    // Secret: a default Site naming one waited for it (issue 29). Nor may its stream
    // overlap the example plant's (TAGSTREAM on tagstream.>).
    assert_eq!(site.broker.credentials, None);
    assert_eq!(
        (site.stream.name.as_str(), site.stream.subject_prefix.as_str()),
        ("TAGSTREAM", "tagstream")
    );
}

/// The registry Secrets reach the ingestor pods too: the operator names them in every
/// StatefulSet it renders (issue 29: only the operator's pod could pull).
#[test]
fn image_pull_secrets_reach_the_ingestors() {
    let rendered = template(&[&chart().join("examples/high-availability.yaml")]);
    assert!(
        args(&rendered).contains(&"--ingestor-image-pull-secret=registry-example".to_owned()),
        "{:?}",
        args(&rendered)
    );
    let pull = pod(&rendered).image_pull_secrets.unwrap();
    assert_eq!(pull[0].name, "registry-example");
}

#[test]
fn values_outside_the_schema_are_refused_by_helm() {
    let chart = chart();
    for (value, field) in [
        ("defaultSite.storageSize=lots", "storageSize"),
        ("defaultSite.natsUrls[0]=http://nats", "natsUrls"),
        ("replicaCount=0", "replicaCount"),
        ("statusPeriod=soon", "statusPeriod"),
        ("unknownValue=1", "unknownValue"),
    ] {
        let error = helm(&["template", "t", chart.to_str().unwrap(), "--set", value]).unwrap_err();
        assert!(error.contains(field), "{value}: {error}");
    }
}

#[test]
fn clusters_older_than_the_crds_cel_library_are_refused_by_helm() {
    let chart = chart();
    let render = |kube_version: &str| {
        helm(&[
            "template",
            "tagstream",
            chart.to_str().unwrap(),
            "--kube-version",
            kube_version,
        ])
    };
    for old in ["1.26.15", "1.28.5"] {
        let refused = render(old).expect_err(old);
        assert!(
            refused.contains("chart requires kubeVersion: >=1.29.0-0"),
            "{old}: {refused}"
        );
    }
    for supported in ["1.29.0", "v1.29.3+k3s1", "1.33.1"] {
        render(supported).unwrap_or_else(|e| panic!("{supported}: {e}"));
    }
}
