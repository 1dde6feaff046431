//! The deployment files in deploy/: they parse as the Kubernetes types they claim to be,
//! and the simulator serves every example Device on the port its manifest names.

use std::{collections::BTreeSet, path::Path};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use serde::Deserialize;
use tagstream_crds::{device::ConnectionKind, manifest::load};

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect()
}

#[test]
fn the_simulator_serves_every_example_device() {
    let docs = documents("simulator.yaml");
    let deployment: Deployment = serde_yaml::from_value(docs[0].clone()).unwrap();
    let service: Service = serde_yaml::from_value(docs[1].clone()).unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.containers[0].args.as_ref().unwrap()[0], "simulate");

    let served: BTreeSet<i32> = service.spec.unwrap().ports.unwrap().iter().map(|p| p.port).collect();
    let report = load(&[deploy().join("examples")]).unwrap();
    for device in &report.devices {
        let Some(ConnectionKind::Tcp(endpoint)) = device.object.spec.connection.kind() else {
            continue;
        };
        assert_eq!(endpoint.host, "tagstream-simulator", "{}", device.name());
        assert!(
            served.contains(&i32::from(endpoint.port)),
            "{} port {} is not served",
            device.name(),
            endpoint.port
        );
    }

    // kustomize packs every example Device file into the simulator's ConfigMap.
    let kustomization = &documents("kustomization.yaml")[0];
    let packed: BTreeSet<String> = kustomization["configMapGenerator"][0]["files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    for device in &report.devices {
        let file = device.source.file.strip_prefix(deploy()).unwrap().display().to_string();
        assert!(packed.contains(&file), "{file} is not in the simulator's ConfigMap");
    }
}
