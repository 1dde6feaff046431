//! Rendering the example plant: a golden file, the ingestor's loader accepting what the
//! ConfigMap holds, the security context, and a bad formula left out.

use std::path::Path;

#[path = "support/plant.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod plant;

use plant::{large_site, plant, settings};
use tagstream_crds::{
    manifest::load_report,
    site::{BrokerCredentials, BrokerTls, CredentialsKind},
    site_files::{CONFIG_MAP_LIMIT, data_bytes},
};
use tagstream_operator::render::{Rendered, config_map_name, render};

fn yaml(rendered: &Rendered) -> String {
    rendered
        .config_maps
        .iter()
        .map(|c| serde_yaml::to_string(c).unwrap())
        .chain([
            serde_yaml::to_string(&rendered.stateful_set).unwrap(),
            serde_yaml::to_string(&rendered.service).unwrap(),
        ])
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn the_example_plant_renders_as_the_golden_file() {
    let (site, devices, formulas) = plant();
    let text = yaml(&render(&site, &devices, &formulas, &settings()).unwrap());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/plant-a.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        text == expected,
        "rendering changed; review it and run with UPDATE_GOLDEN=1 to accept:\n{text}"
    );
    // The same inputs in another order render the same objects: no write when nothing changed.
    let mut reversed = devices.clone();
    reversed.reverse();
    assert_eq!(yaml(&render(&site, &reversed, &formulas, &settings()).unwrap()), text);
}

#[test]
fn the_ingestor_loads_what_the_config_map_holds() {
    let (site, devices, formulas) = plant();
    let rendered = render(&site, &devices, &formulas, &settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in rendered.config_maps[0].data.as_ref().unwrap() {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let report = load_report(&[dir.path().to_path_buf()]).unwrap();
    let shown: Vec<String> = report.diagnostics.iter().map(ToString::to_string).collect();
    assert!(shown.is_empty(), "{shown:#?}");
    assert_eq!(
        (report.sites.len(), report.devices.len(), report.formulas.len()),
        (1, 3, 5)
    );
    assert_eq!(report.devices[0].namespace(), "plant");
    assert_eq!(
        report
            .devices
            .iter()
            .find(|d| d.name() == "boiler")
            .unwrap()
            .object
            .spec,
        devices[0].spec
    );
}

#[test]
fn the_ingestor_pod_is_locked_down_and_keeps_its_queue() {
    let (site, devices, formulas) = plant();
    let rendered = render(&site, &devices, &formulas, &settings()).unwrap();
    let set = rendered.stateful_set.spec.unwrap();
    assert_eq!(set.replicas, Some(1));
    let retention = set.persistent_volume_claim_retention_policy.unwrap();
    assert_eq!(
        (retention.when_deleted.as_deref(), retention.when_scaled.as_deref()),
        (Some("Retain"), Some("Retain"))
    );
    let claim = &set.volume_claim_templates.unwrap()[0];
    assert_eq!(
        claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "1Gi"
    );
    let pod = set.template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let container = &pod.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    let owner = &rendered.config_maps[0].metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Site", "plant-a", Some(true))
    );
}

#[test]
fn the_ingestor_pod_pulls_with_the_operators_image_pull_secrets() {
    let (site, devices, formulas) = plant();
    let mut settings = settings();
    let pod = |settings: &tagstream_operator::render::Settings| {
        render(&site, &devices, &formulas, settings)
            .unwrap()
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .image_pull_secrets
    };
    assert_eq!(pod(&settings), None);
    settings.image_pull_secrets = vec!["registry".into()];
    let names: Vec<String> = pod(&settings).unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["registry"]);
}

#[test]
fn broker_secrets_are_mounted_read_only_when_the_site_names_them() {
    let (mut site, devices, formulas) = plant();
    site.spec.broker.credentials = Some(BrokerCredentials {
        secret_name: "nats-user".into(),
        kind: CredentialsKind::UserPassword,
    });
    site.spec.broker.tls = Some(BrokerTls {
        secret_name: "nats-tls".into(),
        client_certificate: true,
    });
    let pod = render(&site, &devices, &formulas, &settings())
        .unwrap()
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    // Optional: a Secret not created yet must not keep the pod from starting and queueing
    // (the ingestor reports the missing files).
    let secrets: Vec<(String, Option<bool>)> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.secret.as_ref())
        .map(|s| (s.secret_name.clone().unwrap_or_default(), s.optional))
        .collect();
    assert_eq!(
        secrets,
        [("nats-user".into(), Some(true)), ("nats-tls".into(), Some(true))]
    );
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    for path in ["/etc/tagstream/credentials", "/etc/tagstream/tls"] {
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(mount.read_only, Some(true));
    }
}

#[test]
fn an_invalid_formula_is_left_out_and_reported_while_the_rest_deploy() {
    let (site, devices, mut formulas) = plant();
    let mut broken = formulas[0].clone();
    broken.metadata.name = Some("broken".into());
    broken.spec.expression = "t_out -".into();
    formulas.push(broken);
    let rendered = render(&site, &devices, &formulas, &settings()).unwrap();
    assert!(rendered.formula_issues["broken"].to_string().contains("operand"));
    let deployed = &rendered.config_maps[0].data.as_ref().unwrap()["formulas.yaml"];
    assert!(!deployed.contains("name: broken"));
    assert_eq!(deployed.matches("kind: Formula").count(), 5);
}

#[test]
fn a_site_over_one_config_map_is_split_and_the_ingestor_reads_it_whole() {
    let (site, devices, formulas) = large_site(200);
    let rendered = render(&site, &devices, &formulas, &settings()).unwrap();
    let count = rendered.config_maps.len();
    assert!(count >= 3, "20,000 tags take 2 MB and more: {count} ConfigMaps");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for config_map in &rendered.config_maps {
        let data = config_map.data.as_ref().unwrap();
        assert!(data_bytes(data) <= CONFIG_MAP_LIMIT);
        names.push(config_map.metadata.name.clone().unwrap());
        for (file, text) in data {
            assert!(!dir.path().join(file).exists(), "{file} is in one ConfigMap only");
            std::fs::write(dir.path().join(file), text).unwrap();
        }
    }
    let expected: Vec<String> = (0..count).map(|n| config_map_name("plant-a", n)).collect();
    assert_eq!(names, expected);
    assert_eq!(names[1], "tagstream-plant-a-devices-1");
    let report = load_report(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(report.errors().count(), 0);
    assert_eq!(report.devices.len(), 200);
    assert_eq!(report.sites.len(), 1);

    // The pod mounts all of them in one directory.
    let pod = rendered.stateful_set.spec.unwrap().template.spec.unwrap();
    let config = pod.volumes.unwrap().into_iter().find(|v| v.name == "config").unwrap();
    let sources: Vec<String> = config
        .projected
        .unwrap()
        .sources
        .unwrap()
        .into_iter()
        .map(|s| s.config_map.unwrap().name)
        .collect();
    assert_eq!(sources, names);
}

#[test]
fn a_site_that_cannot_be_laid_out_is_refused_with_its_name() {
    let (site, devices, mut formulas) = plant();
    // Formulas stay in the first ConfigMap: 1 MiB of them cannot be split.
    let formula = formulas[0].clone();
    formulas.extend((0..8000).map(|n| {
        let mut copy = formula.clone();
        copy.metadata.name = Some(format!("copy-{n:05}-of-a-formula-with-a-long-descriptive-name"));
        copy
    }));
    let error = render(&site, &devices, &formulas, &settings()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("site plant/plant-a"), "{message}");
    assert!(message.contains("1048576 bytes (1 MiB)"), "{message}");
}
