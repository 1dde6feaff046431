//! A mocked Kubernetes API server on kube-rs's tower-test pattern (as kube-rs/controller-rs
//! does): the operator's real `kube::Client` sends its HTTP requests into a
//! `tower_test::mock` handle, which this module answers like a small API server (objects
//! by path, server-side apply, JSON merge patches of status, creates) and records, so
//! tests assert the exact requests a reconcile makes.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use kube::{Client, client::Body};
use serde_json::{Value, json};

/// One request the operator made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, e.g. `PATCH /api/v1/namespaces/plant/configmaps/x?force=true&...`.
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `METHOD path` without the query, for compact assertions. Event names carry a
    /// timestamp and read `<event>`.
    pub fn line(&self) -> String {
        let path = self.uri.split('?').next().unwrap_or_default();
        let path = match path.split_once("/events/") {
            Some((events, _)) => format!("{events}/events/<event>"),
            None => path.to_owned(),
        };
        format!("{} {path}", self.method)
    }
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Value>,
    /// Answers to `GET .../proxy/...` paths: (status code, body).
    proxied: BTreeMap<String, (u16, String)>,
    /// One-shot refusals: (method, path) -> (status code, message).
    refusals: BTreeMap<(String, String), (u16, String)>,
    requests: Vec<Recorded>,
    resource_version: u64,
}

/// The fake API server's objects and record.
#[derive(Clone, Debug, Default)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    /// A client whose requests this server answers, until the client and all its clones
    /// are dropped.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Answer>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = server.answer(request).await;
                respond.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    /// Stores an object at its API path (as `kubectl apply` would have).
    pub fn insert(&self, path: &str, object: &impl serde::Serialize) {
        let mut state = self.state.lock().unwrap();
        state
            .objects
            .insert(path.to_owned(), serde_json::to_value(object).unwrap());
    }

    /// Names of the objects directly under a collection path ending in `/`.
    pub fn names(&self, collection: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(collection))
            .filter(|name| !name.contains('/'))
            .map(str::to_owned)
            .collect()
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Sets what `GET <path>` through the service proxy answers.
    pub fn proxy(&self, path: &str, code: u16, body: String) {
        self.state.lock().unwrap().proxied.insert(path.to_owned(), (code, body));
    }

    /// Refuses the next `method` request on `path` with `code` and `message`, as an API
    /// server refusing a change (403 forbidden, 422 invalid, ...).
    pub fn refuse_next(&self, method: &str, path: &str, code: u16, message: &str) {
        let mut state = self.state.lock().unwrap();
        state
            .refusals
            .insert((method.to_owned(), path.to_owned()), (code, message.to_owned()));
    }

    /// The requests recorded since the last call.
    pub fn take_requests(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.state.lock().unwrap().requests)
    }

    async fn answer(&self, request: Request<Body>) -> Response<Answer> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        let uri = parts.uri.to_string();
        let path = parts.uri.path().to_owned();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        state.requests.push(Recorded {
            method: parts.method.to_string(),
            uri,
            content_type: content_type.clone(),
            body: body.clone(),
        });
        if let Some((code, message)) = state.refusals.remove(&(parts.method.to_string(), path.clone())) {
            let mut refusal = status(code, "Refused");
            refusal["message"] = json!(message);
            return respond(code, refusal.to_string());
        }
        let query = parts.uri.query().unwrap_or_default();
        let (code, answer) = match parts.method.as_str() {
            "GET" if query.split('&').any(|p| p == "watch=true") => return open_watch(),
            "GET" if path.contains("/proxy/") => match state.proxied.get(&path) {
                Some((code, text)) => return respond(*code, text.clone()),
                None => not_found(),
            },
            "GET" => match listed(&state.objects, &path) {
                Some(items) => {
                    let items: Vec<Value> = items.into_iter().cloned().collect();
                    let version = state.resource_version.to_string();
                    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items});
                    (200, list)
                }
                None => state.objects.get(&path).cloned().map_or_else(not_found, |o| (200, o)),
            },
            "POST" => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{path}/{name}");
                if state.objects.contains_key(&key) {
                    (409, status(409, "AlreadyExists"))
                } else {
                    let object = state.stamp(body);
                    state.objects.insert(key, object.clone());
                    (201, object)
                }
            }
            "PATCH" if content_type.starts_with("application/apply-patch") => {
                let previous_status = state.objects.get(&path).map(|o| o["status"].clone());
                let mut object = state.stamp(body);
                if let Some(status) = previous_status.filter(|s| !s.is_null()) {
                    object["status"] = status;
                }
                state.objects.insert(path, object.clone());
                (200, object)
            }
            "PATCH" => {
                let key = path.trim_end_matches("/status").to_owned();
                match state.objects.get(&key).cloned() {
                    Some(mut object) => {
                        merge(&mut object, &body);
                        let object = state.stamp(object);
                        state.objects.insert(key, object.clone());
                        (200, object)
                    }
                    None => not_found(),
                }
            }
            "DELETE" => state.objects.remove(&path).map_or_else(not_found, |o| (200, o)),
            _ => (405, status(405, "MethodNotAllowed")),
        };
        respond(code, answer.to_string())
    }
}

impl State {
    fn stamp(&mut self, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        object
    }
}

/// A response body: whole, or a watch that stays open without events.
type Answer = UnsyncBoxBody<Bytes, Infallible>;

fn respond(code: u16, body: String) -> Response<Answer> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap()
}

fn open_watch() -> Response<Answer> {
    let events = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(events).boxed_unsync())
        .unwrap()
}

/// The objects a collection path lists: `.../<plural>` (all namespaces) or
/// `.../namespaces/<ns>/<plural>`; `None` for an object's path.
fn listed<'a>(objects: &'a BTreeMap<String, Value>, path: &str) -> Option<Vec<&'a Value>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = if segments.first() == Some(&"api") { 2 } else { 3 };
    let rest = segments.get(base..)?;
    let prefix = segments[..base].join("/");
    let matches = |key: &str| -> bool {
        let key: Vec<&str> = key.trim_start_matches('/').split('/').collect();
        match rest {
            [plural] => key.len() == base + 4 && key[..base].join("/") == prefix && key[base + 2] == *plural,
            ["namespaces", ns, plural] => {
                key.len() == base + 4
                    && key[..base].join("/") == prefix
                    && key[base + 1] == *ns
                    && key[base + 2] == *plural
            }
            _ => false,
        }
    };
    matches!(rest.len(), 1 | 3).then(|| objects.iter().filter(|(k, _)| matches(k)).map(|(_, v)| v).collect())
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn not_found() -> (u16, Value) {
    (404, status(404, "NotFound"))
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    if let Value::Object(patch) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        let target = target.as_object_mut().unwrap();
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    } else {
        *target = patch.clone();
    }
}
