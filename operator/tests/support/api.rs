//! A fake Kubernetes API server on kube-rs's tower-test pattern (as kube-rs/controller-rs
//! does): the operator's real `kube::Client` sends its HTTP requests into a
//! `tower_test::mock` handle, or over real HTTP on loopback ([`ApiServer::serve`]), and
//! this module answers them like an API server and records them, so tests assert the
//! exact requests the operator makes.
//!
//! It behaves like a real API server where the operator's correctness depends on it:
//! - every write stamps a new `resourceVersion` and is a watch event;
//! - lists are paginated (`limit`, `continue`) and every page of one list comes from the
//!   same snapshot, at the `resourceVersion` of the first page;
//! - a watch starts at the `resourceVersion` it names: it replays the changes after it,
//!   then follows new ones; one older than the kept window of changes gets `410 Gone`, as
//!   a compacted etcd answers, and the client must list again;
//! - requests are answered concurrently, each after a configurable latency.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, request::Parts};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tokio::sync::watch;

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

    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// One rendered ConfigMap as the operator wrote it: how many members it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapWrite {
    pub name: String,
    pub devices: usize,
    pub formulas: usize,
    pub at_ms: u64,
}

/// A change to an object, as a watch delivers it.
#[derive(Debug)]
struct Change {
    version: u64,
    key: String,
    kind: &'static str,
    object: Arc<Value>,
}

/// One list's snapshot, served page by page.
#[derive(Debug)]
struct Snapshot {
    version: u64,
    items: Vec<Arc<Value>>,
}

#[derive(Debug)]
struct State {
    objects: BTreeMap<String, Arc<Value>>,
    /// The kept window of changes, oldest first.
    changes: VecDeque<Change>,
    /// The newest version no longer in `changes`: a watch from before it is gone.
    compacted: u64,
    window: usize,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    /// Answers to `GET .../proxy/...` paths: (status code, body).
    proxied: BTreeMap<String, (u16, String)>,
    /// One-shot refusals: (method, path) -> (status code, message).
    refusals: BTreeMap<(String, String), (u16, String)>,
    requests: Vec<Recorded>,
    config_map_writes: Vec<ConfigMapWrite>,
    resource_version: u64,
    /// Per object, the status fields each field manager applied last: a field of `status`
    /// by name, a condition as `conditions/<type>`.
    status_owners: HashMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            changes: VecDeque::new(),
            compacted: 0,
            window: 100_000,
            snapshots: HashMap::new(),
            next_snapshot: 0,
            proxied: BTreeMap::new(),
            refusals: BTreeMap::new(),
            requests: Vec::new(),
            config_map_writes: Vec::new(),
            resource_version: 0,
            status_owners: HashMap::new(),
        }
    }
}

/// The fake API server's objects and record.
#[derive(Clone, Debug)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    /// The newest `resourceVersion`, which wakes the watches.
    newest: Arc<watch::Sender<u64>>,
    latency: Duration,
    started: Instant,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            newest: Arc::new(watch::channel(0).0),
            latency: Duration::ZERO,
            started: Instant::now(),
        }
    }
}

impl ApiServer {
    /// A server answering each request after `latency`, as a real one across a network.
    pub fn with_latency(latency: Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    /// Keeps only the last `changes` changes for watches (a real API server's watch cache
    /// and etcd compaction): a watch from an older version is answered `410 Gone`.
    pub fn keep_changes(&self, changes: usize) {
        let mut state = self.state.lock().unwrap();
        state.window = changes;
        state.compact();
    }

    /// A client whose requests this server answers, until the client and all its clones
    /// are dropped.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Answer>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let (parts, body) = request.into_parts();
                    let bytes = body.collect().await.unwrap().to_bytes();
                    respond.send_response(server.answer(parts, &bytes).await);
                });
            }
        });
        Client::new(service, "default")
    }

    /// Serves the API over HTTP on `listener` until the process ends (for a benchmark that
    /// keeps the server's memory out of the operator's process).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let server = self.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(http_body_util::Collected::to_bytes)
                    .unwrap_or_default();
                server.answer(parts, &bytes).await.map(axum::body::Body::new)
            }
        });
        axum::serve(listener, app).await
    }

    /// Stores an object at its API path, as `kubectl apply` would: a new version and a
    /// watch event.
    pub fn insert(&self, path: &str, object: &impl serde::Serialize) {
        let mut state = self.state.lock().unwrap();
        let object = state.stamp(serde_json::to_value(object).unwrap());
        state.store(path.to_owned(), object);
        self.wake(&state);
    }

    /// Stores many objects at once, as one burst no watch can follow change by change.
    pub fn insert_all(&self, objects: impl IntoIterator<Item = (String, Value)>) {
        let mut state = self.state.lock().unwrap();
        for (path, object) in objects {
            let object = state.stamp(object);
            state.store(path, object);
        }
        self.wake(&state);
    }

    /// Deletes the object at `path`, as `kubectl delete` would.
    pub fn remove(&self, path: &str) {
        let mut state = self.state.lock().unwrap();
        state.delete(path);
        self.wake(&state);
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
        self.state.lock().unwrap().objects.get(path).map(|o| (**o).clone())
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

    /// Every ConfigMap the operator applied, in order, with its member counts.
    pub fn config_map_writes(&self) -> Vec<ConfigMapWrite> {
        self.state.lock().unwrap().config_map_writes.clone()
    }

    fn wake(&self, state: &State) {
        self.newest.send_replace(state.resource_version);
    }

    async fn answer(&self, parts: Parts, bytes: &[u8]) -> Response<Answer> {
        // Even a zero sleep waits for the timer's next millisecond tick.
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into()))
        };
        let path = parts.uri.path().to_owned();
        let query: HashMap<&str, &str> = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|p| p.split_once('='))
            .collect();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let method = parts.method.to_string();
        let mut state = self.state.lock().unwrap();
        state.requests.push(Recorded {
            method: method.clone(),
            uri: parts.uri.to_string(),
            content_type: content_type.clone(),
            body: body.clone(),
        });
        if let Some((code, message)) = state.refusals.remove(&(method.clone(), path.clone())) {
            let mut refusal = status(code, "Refused");
            refusal["message"] = json!(message);
            return respond(code, refusal.to_string());
        }
        let collection = Collection::parse(&path);
        let (code, answer) = match method.as_str() {
            "GET" if matches!(query.get("watch"), Some(&"true" | &"1")) => {
                // Without a version a watch starts now, with no replay.
                let since = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(state.resource_version);
                return match collection {
                    Some(collection) => self.watch(collection, since),
                    None => respond(400, status(400, "BadRequest").to_string()),
                };
            }
            "GET" if path.contains("/proxy/") => match state.proxied.get(&path) {
                Some((code, text)) => return respond(*code, text.clone()),
                None => not_found(),
            },
            "GET" => match collection {
                Some(collection) => return state.list(&collection, &query),
                None => state
                    .objects
                    .get(&path)
                    .map_or_else(not_found, |o| (200, (**o).clone())),
            },
            _ => {
                let manager = query.get("fieldManager").copied().unwrap_or_default();
                let force = query.get("force") == Some(&"true");
                self.write(&mut state, &method, &content_type, (manager, force), path, body)
            }
        };
        self.wake(&state);
        respond(code, answer.to_string())
    }

    /// A POST, PATCH (server-side apply) or DELETE.
    fn write(
        &self,
        state: &mut State,
        method: &str,
        content_type: &str,
        (manager, force): (&str, bool),
        path: String,
        body: Value,
    ) -> (u16, Value) {
        match method {
            "POST" => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{path}/{name}");
                if state.objects.contains_key(&key) {
                    (409, status(409, "AlreadyExists"))
                } else {
                    let object = state.stamp(body);
                    state.store(key, object.clone());
                    (201, object)
                }
            }
            "PATCH" if content_type.starts_with("application/apply-patch") && path.ends_with("/status") => {
                let key = path.trim_end_matches("/status").to_owned();
                state.apply_status(key, manager, force, &body["status"])
            }
            "PATCH" if content_type.starts_with("application/apply-patch") => {
                let previous_status = state.objects.get(&path).map(|o| o["status"].clone());
                let mut object = state.stamp(body);
                if let Some(status) = previous_status.filter(|s| !s.is_null()) {
                    object["status"] = status;
                }
                if path.contains("/configmaps/") {
                    let write = config_map_write(&object, self.started.elapsed());
                    state.config_map_writes.push(write);
                }
                state.store(path, object.clone());
                (200, object)
            }
            // Deleted at once (the fake has no finalizers): a real server answers a
            // Status then, and the object itself only while its deletion is pending.
            "DELETE" => state.delete(&path).map_or_else(not_found, |_| {
                let mut success = status(200, "");
                success["status"] = json!("Success");
                (200, success)
            }),
            _ => (405, status(405, "MethodNotAllowed")),
        }
    }

    /// A watch of `collection` from version `since`: the kept changes after it, then the
    /// new ones as they come; `410 Gone` when changes after `since` were compacted away.
    fn watch(&self, collection: Collection, since: u64) -> Response<Answer> {
        struct Cursor {
            server: ApiServer,
            collection: Collection,
            since: u64,
            newest: watch::Receiver<u64>,
            ready: VecDeque<Bytes>,
            gone: bool,
        }
        let cursor = Cursor {
            server: self.clone(),
            collection,
            since,
            newest: self.newest.subscribe(),
            ready: VecDeque::new(),
            gone: false,
        };
        let events = futures::stream::unfold(cursor, |mut cursor| async move {
            loop {
                if let Some(line) = cursor.ready.pop_front() {
                    return Some((Ok::<_, Infallible>(Frame::data(line)), cursor));
                }
                if cursor.gone {
                    return None;
                }
                cursor.newest.borrow_and_update();
                {
                    let state = cursor.server.state.lock().unwrap();
                    if cursor.since < state.compacted {
                        let mut gone = status(410, "Expired");
                        gone["message"] = json!(format!("too old resource version: {}", cursor.since));
                        cursor.ready.push_back(event_line("ERROR", &gone));
                        cursor.gone = true;
                        continue;
                    }
                    let first = state.changes.partition_point(|c| c.version <= cursor.since);
                    for change in state.changes.range(first..) {
                        if cursor.collection.contains(&change.key) {
                            cursor.ready.push_back(event_line(change.kind, &change.object));
                        }
                    }
                    cursor.since = state.resource_version;
                }
                if cursor.ready.is_empty() && cursor.newest.changed().await.is_err() {
                    return None;
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(events).boxed_unsync())
            .unwrap()
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn config_map_write(object: &Value, at: Duration) -> ConfigMapWrite {
    let count = |key: &str, kind: &str| {
        object["data"][key]
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == kind)
            .count()
    };
    ConfigMapWrite {
        name: object["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        devices: count("devices.yaml", "kind: Device"),
        formulas: count("formulas.yaml", "kind: Formula"),
        at_ms: at.as_millis() as u64,
    }
}

/// Now, as the API server writes `metadata.creationTimestamp`: RFC 3339, whole seconds.
fn creation_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    k8s_openapi::jiff::Timestamp::from_second(now.as_secs() as i64)
        .expect("a representable time")
        .to_string()
}

impl State {
    /// A server-side apply of `status` to the status subresource of the object at `key`
    /// by `manager`: what the manager applied is set (conditions merged by `type`), what
    /// it applied before and no longer does is removed unless another manager owns it,
    /// and a field another manager owns is taken from it when `force`d, a conflict
    /// otherwise (stricter than a real server, which lets an equal value be co-owned).
    fn apply_status(&mut self, key: String, manager: &str, force: bool, status: &Value) -> (u16, Value) {
        let Some(mut object) = self.objects.get(&key).map(|o| (**o).clone()) else {
            return not_found();
        };
        let Value::Object(fields) = status else {
            return (400, self::status(400, "BadRequest"));
        };
        let applied = owned_fields(fields);
        let owners = self.status_owners.entry(key.clone()).or_default();
        let taken: Vec<&String> = owners
            .iter()
            .filter(|(other, _)| other.as_str() != manager)
            .flat_map(|(_, owned)| owned.intersection(&applied))
            .collect();
        if !taken.is_empty() && !force {
            let mut conflict = self::status(409, "Conflict");
            conflict["message"] = json!(format!("Apply failed with conflicts: {taken:?}"));
            return (409, conflict);
        }
        for (_, owned) in owners.iter_mut().filter(|(other, _)| other.as_str() != manager) {
            owned.retain(|f| !applied.contains(f));
        }
        let released: Vec<String> = owners
            .remove(manager)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| !applied.contains(f) && !owners.values().any(|owned| owned.contains(f)))
            .collect();
        owners.insert(manager.to_owned(), applied);
        if !object["status"].is_object() {
            object["status"] = json!({});
        }
        let target = object["status"].as_object_mut().unwrap();
        for field in released {
            match field.strip_prefix("conditions/") {
                Some(type_) => {
                    if let Some(Value::Array(conditions)) = target.get_mut("conditions") {
                        conditions.retain(|c| c["type"] != type_);
                    }
                }
                None => {
                    target.remove(&field);
                }
            }
        }
        for (name, value) in fields {
            if name != "conditions" {
                target.insert(name.clone(), value.clone());
                continue;
            }
            let list = target.entry("conditions").or_insert_with(|| json!([]));
            for condition in value.as_array().into_iter().flatten() {
                let conditions = list.as_array_mut().unwrap();
                match conditions.iter_mut().find(|c| c["type"] == condition["type"]) {
                    Some(existing) => *existing = condition.clone(),
                    None => conditions.push(condition.clone()),
                }
            }
        }
        let object = self.stamp(object);
        self.store(key, object.clone());
        (200, object)
    }

    fn stamp(&mut self, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        object
    }

    fn store(&mut self, key: String, mut object: Value) {
        let kind = if let Some(stored) = self.objects.get(&key) {
            // Set once, by the server, at creation; a write cannot change it.
            object["metadata"]["creationTimestamp"] = stored["metadata"]["creationTimestamp"].clone();
            "MODIFIED"
        } else {
            if object["metadata"]["creationTimestamp"].is_null() {
                object["metadata"]["creationTimestamp"] = json!(creation_timestamp());
            }
            "ADDED"
        };
        let object = Arc::new(object);
        self.objects.insert(key.clone(), Arc::clone(&object));
        self.record(key, kind, object);
    }

    fn delete(&mut self, key: &str) -> Option<Value> {
        let removed = self.objects.remove(key)?;
        self.status_owners.remove(key);
        self.resource_version += 1;
        let mut object = (*removed).clone();
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.record(key.to_owned(), "DELETED", Arc::new(object.clone()));
        Some(object)
    }

    fn record(&mut self, key: String, kind: &'static str, object: Arc<Value>) {
        self.changes.push_back(Change {
            version: self.resource_version,
            key,
            kind,
            object,
        });
        self.compact();
    }

    fn compact(&mut self) {
        while self.changes.len() > self.window {
            if let Some(change) = self.changes.pop_front() {
                self.compacted = change.version;
            }
        }
    }

    /// One page of a list: the first from a new snapshot, the next ones (`continue`)
    /// from the same snapshot.
    fn list(&mut self, collection: &Collection, query: &HashMap<&str, &str>) -> Response<Answer> {
        let limit = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0);
        let (id, offset) = if let Some(token) = query.get("continue") {
            match token
                .split_once('-')
                .and_then(|(i, o)| Some((i.parse().ok()?, o.parse().ok()?)))
            {
                Some((id, offset)) if self.snapshots.contains_key(&id) => (id, offset),
                _ => return respond(410, status(410, "Expired").to_string()),
            }
        } else {
            let items = self
                .objects
                .iter()
                .filter(|(k, _)| collection.contains(k))
                .map(|(_, v)| Arc::clone(v))
                .collect();
            self.next_snapshot += 1;
            let snapshot = Snapshot {
                version: self.resource_version,
                items,
            };
            self.snapshots.insert(self.next_snapshot, snapshot);
            (self.next_snapshot, 0)
        };
        let snapshot = &self.snapshots[&id];
        let end = limit.map_or(snapshot.items.len(), |l: usize| (offset + l).min(snapshot.items.len()));
        let items: Vec<String> = snapshot.items[offset..end]
            .iter()
            .map(|o| serde_json::to_string(&**o).unwrap())
            .collect();
        let mut metadata = json!({"resourceVersion": snapshot.version.to_string()});
        if end < snapshot.items.len() {
            metadata["continue"] = json!(format!("{id}-{end}"));
            metadata["remainingItemCount"] = json!(snapshot.items.len() - end);
        } else {
            self.snapshots.remove(&id);
        }
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"List","metadata":{metadata},"items":[{}]}}"#,
            items.join(",")
        );
        respond(200, body)
    }
}

/// A response body: whole, or a watch's stream of events.
type Answer = UnsyncBoxBody<Bytes, Infallible>;

fn respond(code: u16, body: String) -> Response<Answer> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap()
}

/// A collection path: `<prefix>/<plural>` (all namespaces) or
/// `<prefix>/namespaces/<ns>/<plural>`, where the prefix is `/api/v1` or
/// `/apis/<group>/<version>`.
#[derive(Clone, Debug)]
struct Collection {
    prefix: String,
    namespace: Option<String>,
    plural: String,
}

impl Collection {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let base = if segments.first() == Some(&"api") { 2 } else { 3 };
        let prefix = segments.get(..base)?.join("/");
        match segments.get(base..)? {
            [plural] => Some(Self {
                prefix,
                namespace: None,
                plural: (*plural).to_owned(),
            }),
            ["namespaces", namespace, plural] => Some(Self {
                prefix,
                namespace: Some((*namespace).to_owned()),
                plural: (*plural).to_owned(),
            }),
            _ => None,
        }
    }

    /// Whether the object at `key` (`<prefix>/namespaces/<ns>/<plural>/<name>`) is in it.
    fn contains(&self, key: &str) -> bool {
        let Some(rest) = key.trim_start_matches('/').strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        match rest.trim_start_matches('/').split('/').collect::<Vec<_>>().as_slice() {
            ["namespaces", namespace, plural, _name] => {
                *plural == self.plural && self.namespace.as_deref().is_none_or(|n| n == *namespace)
            }
            _ => false,
        }
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn not_found() -> (u16, Value) {
    (404, status(404, "NotFound"))
}

/// The fields of `status` an apply of it owns: each field by name, each condition as
/// `conditions/<type>`.
fn owned_fields(status: &serde_json::Map<String, Value>) -> BTreeSet<String> {
    status
        .iter()
        .flat_map(|(name, value)| match (name.as_str(), value) {
            ("conditions", Value::Array(conditions)) => conditions
                .iter()
                .map(|c| format!("conditions/{}", c["type"].as_str().unwrap_or_default()))
                .collect(),
            _ => vec![name.clone()],
        })
        .collect()
}
