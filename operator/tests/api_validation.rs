//! `tagstream-ingestor check` validates manifests "the way the API server would" with an
//! evaluator of the project's own (schema, CEL rules, unknown fields). This differential
//! test holds it to that: every manifest case the project has is sent to a real
//! kube-apiserver (server-side apply, dry run, strict field validation) and checked
//! offline; both must accept or both refuse, naming the same fields.
//!
//! The cases: the example plant's documents, the table of broken manifests of
//! `crds/tests`, and the example documents mutated field by field (each leaf removed, or
//! set to a wrong type, a negative, a huge number, an empty and a long string).
//! Cross-object checks (a formula input naming a missing tag) are not the API server's
//! business and are left out: each document is judged alone.

#[path = "../../crds/tests/cases/mod.rs"]
#[allow(dead_code, reason = "shared with the offline tests, which use all of it")]
mod cases;
#[path = "support/cluster.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod cluster;

use std::{collections::BTreeSet, fmt, path::Path};

use cluster::Cluster;
use futures::{StreamExt, stream};
use http_body_util::BodyExt;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tagstream_crds::{
    Device, Formula, Site,
    manifest::{Report, parse_into},
};

/// What a validator said of one document.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Accepted,
    /// Refused, naming these fields (`spec.tags[0].address`; empty for the whole object).
    Refused(BTreeSet<String>),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accepted => f.write_str("accepted"),
            Self::Refused(fields) => write!(f, "refused {fields:?}"),
        }
    }
}

fn examples() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/plant");
    let mut docs = Vec::new();
    for file in tagstream_crds::manifest::yaml_files(&dir).unwrap() {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
            if doc["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("tagstream.io/"))
            {
                docs.push(doc);
            }
        }
    }
    docs
}

/// Every leaf under `spec`, as a JSON pointer.
fn leaves(value: &Value, pointer: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => map.iter().for_each(|(k, v)| leaves(v, &format!("{pointer}/{k}"), out)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| leaves(v, &format!("{pointer}/{i}"), out)),
        _ => out.push(pointer.to_owned()),
    }
}

fn name_of(doc: &Value) -> String {
    format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The corpus: `(what, document)`.
fn corpus() -> Vec<(String, Value)> {
    let mut corpus = Vec::new();
    for doc in examples() {
        corpus.push((format!("example {}", name_of(&doc)), doc.clone()));
        let mut pointers = Vec::new();
        leaves(&doc["spec"], "/spec", &mut pointers);
        for pointer in pointers {
            let mutations = [
                Value::Null,
                json!(-1),
                json!(4_294_967_296_u64),
                json!(""),
                json!("x".repeat(300)),
                json!(true),
                json!([]),
            ];
            for value in mutations {
                let what = format!("{} {pointer} = {value:.20}", name_of(&doc));
                corpus.push((what, cases::edit(doc.clone(), &[(pointer.as_str(), value)])));
            }
        }
        corpus.push((
            format!("{} with an unknown field", name_of(&doc)),
            cases::edit(doc.clone(), &[("/spec/colour", json!("red"))]),
        ));
    }
    // A document of another kind or version reaches no resource of this API on the
    // server (kubectl says "no matches for kind"); check refuses it by name. Not compared.
    let ours = |doc: &Value| {
        doc["apiVersion"] == tagstream_crds::API_VERSION
            && matches!(doc["kind"].as_str(), Some("Site" | "Device" | "Formula"))
    };
    for case in cases::bad_manifests() {
        for (i, doc) in case.docs.into_iter().enumerate().filter(|(_, doc)| ours(doc)) {
            corpus.push((format!("case {:?}, document {}", case.what, i + 1), doc));
        }
    }
    corpus
}

fn offline(doc: &Value) -> Verdict {
    let mut report = Report::default();
    parse_into(
        &mut report,
        Path::new("case.yaml"),
        &serde_yaml::to_string(doc).unwrap(),
    );
    let fields: BTreeSet<String> = report.errors().map(|d| d.field.clone()).collect();
    if fields.is_empty() {
        Verdict::Accepted
    } else {
        Verdict::Refused(fields)
    }
}

/// `kubectl create --dry-run=server --validate=strict` of one document, which is what a
/// client-side `kubectl apply` sends for a new object. (Server-side apply answers a field
/// of the wrong type with a 500 "failed to create typed patch object" instead of naming
/// it as invalid.)
async fn api_server(client: &Client, namespace: &str, doc: &Value) -> Verdict {
    let plural = match doc["kind"].as_str() {
        Some("Site") => Site::plural(&()),
        Some("Device") => Device::plural(&()),
        Some("Formula") => Formula::plural(&()),
        other => panic!("not a tagstream kind: {other:?}"),
    };
    let mut doc = doc.clone();
    doc["metadata"]["namespace"] = json!(namespace);
    let uri = format!("/apis/tagstream.io/v1alpha1/namespaces/{namespace}/{plural}?dryRun=All&fieldValidation=Strict");
    let request = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(&doc).unwrap()))
        .unwrap();
    let response = client.send(request).await.expect("the API server answers");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    if status.is_success() {
        return Verdict::Accepted;
    }
    let answer: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    assert!(
        status.is_client_error(),
        "the API server failed ({status}) on {doc}: {answer}"
    );
    Verdict::Refused(refused_fields(&answer))
}

/// The fields a refusal names: its causes, or for a strict decoding error the unknown
/// field of its message. A rule on the object root is a cause on no field whose message
/// names the field; the note that CEL rules were skipped for an object already invalid is
/// also on no field and names none.
fn refused_fields(answer: &Value) -> BTreeSet<String> {
    let causes = answer["details"]["causes"].as_array().into_iter().flatten();
    let mut fields: BTreeSet<String> = causes
        .filter_map(|cause| match cause["field"].as_str().unwrap_or_default() {
            // 1.37 says `Invalid value: metadata.name: ...`, 1.29 with the value first,
            // `Invalid value: "object": metadata.name: ...`.
            "<nil>" | "" => {
                let message = cause["message"].as_str()?;
                let named = &message[message.find("metadata.")?..];
                Some(named.split_once(": ")?.0.to_owned())
            }
            field => Some(field.to_owned()),
        })
        .collect();
    let message = answer["message"].as_str().unwrap_or_default();
    for part in message.split("unknown field \"").skip(1) {
        fields.extend(part.split('"').next().map(str::to_owned));
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_the_api_server_agree_on_every_manifest() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let namespace = cluster.namespace("check-agrees").await;
    let corpus = corpus();
    let total = corpus.len();
    let client = &cluster.client;
    let namespace_name: &str = &namespace;
    let judged: Vec<(String, Verdict, Verdict)> = stream::iter(corpus)
        .map(|(what, doc)| async move {
            let server = api_server(client, namespace_name, &doc).await;
            (what, offline(&doc), server)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut accepted = 0;
    let mut disagreements = Vec::new();
    for (what, check, server) in &judged {
        accepted += usize::from(*server == Verdict::Accepted);
        if check != server {
            disagreements.push(format!("{what}: check {check}, API server {server}"));
        }
    }
    disagreements.sort();
    eprintln!(
        "{total} documents on Kubernetes {}: {accepted} accepted by the API server, {} disagreements",
        cluster.minor,
        disagreements.len()
    );
    assert!(
        accepted > 0 && accepted < total,
        "the corpus has both valid and invalid documents"
    );
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
