//! The manifest cases shared by the offline validator's tests (`manifests.rs`) and the
//! differential test against a real API server (`api_server.rs`): a valid Site, Device and
//! Formula, and a table of broken manifests, each with the field and message expected.

use serde_json::{Value, json};

pub fn site() -> Value {
    json!({"apiVersion": "tagstream.io/v1alpha1", "kind": "Site", "metadata": {"name": "plant-a"},
           "spec": {"broker": {"urls": ["nats://localhost:4222"]}}})
}

pub fn device() -> Value {
    json!({"apiVersion": "tagstream.io/v1alpha1", "kind": "Device", "metadata": {"name": "boiler"},
        "spec": {"site": "plant-a", "connection": {"tcp": {"host": "10.0.0.5", "port": 502}},
            "tags": [
                {"name": "temperature", "register": "holding", "address": 0, "type": "float32"},
                {"name": "running", "register": "coil", "address": 0, "type": "bool"}]}})
}

pub fn formula() -> Value {
    json!({"apiVersion": "tagstream.io/v1alpha1", "kind": "Formula", "metadata": {"name": "double"},
        "spec": {"site": "plant-a", "inputs": {"t": "boiler/temperature"}, "expression": "t * 2"}})
}

/// Sets (or with `Value::Null`, removes) the value at a JSON pointer, creating parents.
pub fn edit(mut doc: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let mut target = &mut doc;
        for part in parent.split('/').filter(|p| !p.is_empty()) {
            target = match target {
                Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
                _ => target.as_object_mut().unwrap().entry(part).or_insert_with(|| json!({})),
            };
        }
        match (target, value) {
            (Value::Array(items), v) => items[key.parse::<usize>().unwrap()] = v.clone(),
            (Value::Object(map), Value::Null) => {
                map.remove(key);
            }
            (Value::Object(map), v) => {
                map.insert(key.to_owned(), v.clone());
            }
            (other, _) => panic!("cannot edit {pointer} in {other}"),
        }
    }
    doc
}

pub struct Case {
    pub what: &'static str,
    pub docs: Vec<Value>,
    pub field: &'static str,
    pub message: &'static str,
}

fn case(what: &'static str, docs: Vec<Value>, field: &'static str, message: &'static str) -> Case {
    Case {
        what,
        docs,
        field,
        message,
    }
}

pub fn with_device(changes: &[(&str, Value)]) -> Vec<Value> {
    vec![site(), edit(device(), changes)]
}

pub fn with_formula(changes: &[(&str, Value)]) -> Vec<Value> {
    vec![site(), device(), edit(formula(), changes)]
}

#[allow(clippy::too_many_lines, reason = "a table of cases, one per bad manifest")]
pub fn bad_manifests() -> Vec<Case> {
    let rtu = json!({"path": "/dev/ttyUSB0"});
    vec![
        case(
            "missing site",
            with_device(&[("/spec/site", Value::Null)]),
            "spec.site",
            "\"site\" is a required property",
        ),
        case(
            "port 0",
            with_device(&[("/spec/connection/tcp/port", json!(0))]),
            "spec.connection.tcp.port",
            "less than the minimum of 1",
        ),
        case(
            "port 70000",
            with_device(&[("/spec/connection/tcp/port", json!(70000))]),
            "spec.connection.tcp.port",
            "greater than the maximum",
        ),
        case(
            "unit id 300",
            with_device(&[("/spec/unitId", json!(300))]),
            "spec.unitId",
            "greater than the maximum of 255",
        ),
        case(
            "unit id 0 on a serial bus",
            with_device(&[("/spec/connection", json!({"rtu": rtu})), ("/spec/unitId", json!(0))]),
            "spec.unitId",
            "1..247",
        ),
        case(
            "unit id 248 over rtuOverTcp",
            with_device(&[
                ("/spec/connection", json!({"rtuOverTcp": {"host": "gw"}})),
                ("/spec/unitId", json!(248)),
            ]),
            "spec.unitId",
            "1..247",
        ),
        case(
            "duplicate tag",
            with_device(&[(
                "/spec/tags/1",
                json!({"name": "temperature", "register": "holding", "address": 8, "type": "int16"}),
            )]),
            "spec.tags[1]",
            "duplicate entry with name \"temperature\"",
        ),
        case(
            "unknown data type",
            with_device(&[("/spec/tags/0/type", json!("float16"))]),
            "spec.tags[0].type",
            "is not one of",
        ),
        case(
            "unknown register kind",
            with_device(&[("/spec/tags/0/register", json!("holdings"))]),
            "spec.tags[0].register",
            "is not one of",
        ),
        case(
            "both tcp and rtu",
            with_device(&[("/spec/connection/rtu", rtu.clone())]),
            "spec.connection",
            "exactly one of tcp, rtu or rtuOverTcp",
        ),
        case(
            "no connection kind",
            with_device(&[("/spec/connection", json!({}))]),
            "spec.connection",
            "exactly one of tcp, rtu or rtuOverTcp",
        ),
        case(
            "relative serial path",
            with_device(&[("/spec/connection", json!({"rtu": {"path": "ttyUSB0"}}))]),
            "spec.connection.rtu.path",
            "does not match",
        ),
        case(
            "baud rate 100",
            with_device(&[(
                "/spec/connection",
                json!({"rtu": {"path": "/dev/ttyS0", "baudRate": 100}}),
            )]),
            "spec.connection.rtu.baudRate",
            "less than the minimum",
        ),
        case(
            "address past 65535",
            with_device(&[("/spec/tags/0/address", json!(70000))]),
            "spec.tags[0].address",
            "greater than the maximum of 65535",
        ),
        case(
            "float32 on the last register",
            with_device(&[("/spec/tags/0/address", json!(65535))]),
            "spec.tags[0].address",
            "runs past the last register address",
        ),
        case(
            "bit 16",
            with_device(&[("/spec/tags/0/type", json!("bit")), ("/spec/tags/0/bit", json!(16))]),
            "spec.tags[0].bit",
            "greater than the maximum of 15",
        ),
        case(
            "bit type without bit",
            with_device(&[("/spec/tags/0/type", json!("bit"))]),
            "spec.tags[0].bit",
            "required for type bit",
        ),
        case(
            "bit number on a float",
            with_device(&[("/spec/tags/0/bit", json!(3))]),
            "spec.tags[0].bit",
            "required for type bit and allowed only with it",
        ),
        case(
            "string without length",
            with_device(&[("/spec/tags/0/type", json!("string"))]),
            "spec.tags[0].length",
            "required for type string",
        ),
        case(
            "string of 126 registers",
            with_device(&[
                ("/spec/tags/0/type", json!("string")),
                ("/spec/tags/0/length", json!(126)),
            ]),
            "spec.tags[0].length",
            "greater than the maximum of 125",
        ),
        case(
            "charsPerRegister on a number",
            with_device(&[("/spec/tags/0/charsPerRegister", json!(1))]),
            "spec.tags[0].charsPerRegister",
            "applies only to type string",
        ),
        case(
            "coil read as float",
            with_device(&[("/spec/tags/1/type", json!("float32"))]),
            "spec.tags[1]",
            "type bool is for coils and discrete inputs",
        ),
        case(
            "holding register read as bool",
            with_device(&[("/spec/tags/0/type", json!("bool"))]),
            "spec.tags[0]",
            "type bool is for coils and discrete inputs",
        ),
        case(
            "scale on a bool",
            with_device(&[("/spec/tags/1/scale", json!(2.0))]),
            "spec.tags[1]",
            "apply only to numeric types",
        ),
        case(
            "negative deadband",
            with_device(&[("/spec/tags/0/deadband", json!(-1.0))]),
            "spec.tags[0].deadband",
            "less than the minimum",
        ),
        case(
            "heartbeat under 1s",
            with_device(&[("/spec/tags/0/heartbeat", json!("500ms"))]),
            "spec.tags[0].heartbeat",
            "must be at least 1s",
        ),
        case(
            "poll interval 5ms",
            with_device(&[("/spec/pollInterval", json!("5ms"))]),
            "spec.pollInterval",
            "must be at least 10ms",
        ),
        case(
            "poll interval not a duration",
            with_device(&[("/spec/pollInterval", json!("fast"))]),
            "spec.pollInterval",
            "does not match",
        ),
        case(
            "tag poll interval 1ms",
            with_device(&[("/spec/tags/0/pollInterval", json!("1ms"))]),
            "spec.tags[0].pollInterval",
            "must be at least 10ms",
        ),
        case(
            "zero timeout",
            with_device(&[("/spec/timeout", json!("0s"))]),
            "spec.timeout",
            "must be at least 10ms",
        ),
        case(
            "misspelt field",
            with_device(&[("/spec/pollIntervall", json!("1s"))]),
            "spec.pollIntervall",
            "unknown field",
        ),
        case(
            "no tags",
            with_device(&[("/spec/tags", json!([]))]),
            "spec.tags",
            "has less than 1 item",
        ),
        case(
            "oneBased address 0",
            with_device(&[("/spec/addressing", json!("oneBased"))]),
            "spec.tags",
            "with oneBased addressing every address must be at least 1",
        ),
        case(
            "max registers 126",
            with_device(&[("/spec/reads/maxRegisters", json!(126))]),
            "spec.reads.maxRegisters",
            "greater than the maximum of 125",
        ),
        case(
            "busy retries 11",
            with_device(&[("/spec/quirks/busyRetries", json!(11))]),
            "spec.quirks.busyRetries",
            "greater than the maximum of 10",
        ),
        case(
            "both write quirks",
            with_device(&[
                ("/spec/quirks/writeSingle", json!(true)),
                ("/spec/quirks/writeMultiple", json!(true)),
            ]),
            "spec.quirks",
            "writeSingle and writeMultiple exclude each other",
        ),
        case(
            "writable input register",
            with_device(&[
                ("/spec/tags/0/register", json!("input")),
                ("/spec/tags/0/writable", json!(true)),
            ]),
            "spec.tags[0].writable",
            "only holding registers and coils can be written",
        ),
        case(
            "write bounds on a read-only tag",
            with_device(&[("/spec/tags/0/max", json!(90))]),
            "spec.tags[0]",
            "min and max bound writes and apply only to writable tags",
        ),
        case(
            "write bounds on a coil",
            with_device(&[("/spec/tags/1/writable", json!(true)), ("/spec/tags/1/min", json!(0))]),
            "spec.tags[1]",
            "min and max apply only to numeric types",
        ),
        case(
            "write max below min",
            with_device(&[
                ("/spec/tags/0/writable", json!(true)),
                ("/spec/tags/0/min", json!(10)),
                ("/spec/tags/0/max", json!(5)),
            ]),
            "spec.tags[0].max",
            "a writable tag's max must not be below its min",
        ),
        case(
            "write subjects under the stream's",
            vec![edit(
                site(),
                &[("/spec/writes/subjectPrefix", json!("tagstream.write"))],
            )],
            "spec.writes.subjectPrefix",
            "must not be stream.subjectPrefix or under it",
        ),
        case(
            "simulation max below min",
            with_device(&[(
                "/spec/tags/0/simulation",
                json!({"waveform": "sine", "min": 5, "max": 1}),
            )]),
            "spec.tags[0].simulation",
            "max must not be below min",
        ),
        case(
            "simulation period 0s",
            with_device(&[("/spec/tags/0/simulation", json!({"waveform": "ramp", "period": "0s"}))]),
            "spec.tags[0].simulation.period",
            "must be at least 1ms",
        ),
        case(
            "device name with a dot",
            with_device(&[("/metadata/name", json!("boiler.1"))]),
            "metadata.name",
            "must be a DNS label",
        ),
        case(
            "missing name",
            with_device(&[("/metadata/name", Value::Null)]),
            "metadata.name",
            "required",
        ),
        case(
            "unsupported version",
            with_device(&[("/apiVersion", json!("tagstream.io/v1beta9"))]),
            "apiVersion",
            "unsupported version",
        ),
        case(
            "unknown kind",
            with_device(&[("/kind", json!("Gadget"))]),
            "kind",
            "unknown kind \"Gadget\"",
        ),
        case(
            "same device twice",
            vec![site(), device(), device()],
            "metadata.name",
            "Device default/boiler is already defined at",
        ),
        case(
            "formula with unknown device",
            with_formula(&[("/spec/inputs/t", json!("kettle/temperature"))]),
            "spec.inputs.t",
            "no valid Device default/kettle",
        ),
        case(
            "formula with unknown tag",
            with_formula(&[("/spec/inputs/t", json!("boiler/temp"))]),
            "spec.inputs.t",
            "has no tag \"temp\" (it has: running, temperature)",
        ),
        case(
            "formula with unknown formula",
            with_formula(&[("/spec/inputs/t", json!("halve"))]),
            "spec.inputs.t",
            "no valid Formula default/halve",
        ),
        case(
            "formula reading itself",
            with_formula(&[("/spec/inputs/t", json!("double"))]),
            "spec.inputs.t",
            "cannot read its own result",
        ),
        case(
            "formula variable not an identifier",
            with_formula(&[("/spec/inputs/1t", json!("boiler/temperature"))]),
            "spec.inputs.1t",
            "must be an identifier",
        ),
        case(
            "formula input malformed",
            with_formula(&[("/spec/inputs/t", json!("Boiler Temperature"))]),
            "spec.inputs.t",
            "does not match",
        ),
        case(
            "formula without expression",
            with_formula(&[("/spec/expression", Value::Null)]),
            "spec.expression",
            "\"expression\" is a required property",
        ),
        case(
            "formula named like a device",
            with_formula(&[("/metadata/name", json!("boiler"))]),
            "metadata.name",
            "Device default/boiler of the same site has this name",
        ),
        case(
            "formula reading another site",
            vec![site(), edit(device(), &[("/spec/site", json!("plant-b"))]), formula()],
            "spec.inputs.t",
            "belongs to site \"plant-b\", not \"plant-a\"",
        ),
        case(
            "formula name with a dot",
            with_formula(&[("/metadata/name", json!("boiler.double"))]),
            "metadata.name",
            "must be a DNS label",
        ),
        case(
            "formula stale limit 0s",
            with_formula(&[("/spec/staleAfter", json!("0s"))]),
            "spec.staleAfter",
            "must be at least 1s",
        ),
        case(
            "queue larger than volume",
            vec![edit(site(), &[("/spec/queue/maxSize", json!("4Gi"))])],
            "spec.queue.maxSize",
            "must be smaller than storage.size",
        ),
        case(
            "queue size not a quantity",
            vec![edit(site(), &[("/spec/queue/maxSize", json!("lots"))])],
            "spec.queue.maxSize",
            "must be a quantity above 16Mi",
        ),
        case(
            "storage size not a quantity",
            vec![edit(site(), &[("/spec/storage/size", json!("big"))])],
            "spec.storage.size",
            "must be a quantity such as 2Gi",
        ),
        case(
            "queue memory of 64Ki",
            vec![edit(site(), &[("/spec/queue/memorySize", json!("64Ki"))])],
            "spec.queue.memorySize",
            "must be a quantity from 256Ki to 1Gi",
        ),
        case(
            "flush interval 2s",
            vec![edit(site(), &[("/spec/queue/flushInterval", json!("2s"))])],
            "spec.queue.flushInterval",
            "must be between 1ms and 1s",
        ),
        case(
            "acked retention of two hours",
            vec![edit(site(), &[("/spec/queue/ackedRetention", json!("2h"))])],
            "spec.queue.ackedRetention",
            "must be at most 1h",
        ),
        case(
            "http broker url",
            vec![edit(site(), &[("/spec/broker/urls/0", json!("http://nats:4222"))])],
            "spec.broker.urls[0]",
            "does not match",
        ),
        case(
            "no broker url",
            vec![edit(site(), &[("/spec/broker/urls", json!([]))])],
            "spec.broker.urls",
            "has less than 1 item",
        ),
        case(
            "unknown credentials kind",
            vec![edit(
                site(),
                &[(
                    "/spec/broker/credentials",
                    json!({"secretName": "nats", "type": "kerberos"}),
                )],
            )],
            "spec.broker.credentials.type",
            "is not one of",
        ),
        case(
            "six stream replicas",
            vec![edit(site(), &[("/spec/stream/replicas", json!(6))])],
            "spec.stream.replicas",
            "greater than the maximum of 5",
        ),
        case(
            "subject prefix with a wildcard",
            vec![edit(site(), &[("/spec/stream/subjectPrefix", json!("plant.>"))])],
            "spec.stream.subjectPrefix",
            "does not match",
        ),
        case(
            "unknown full policy",
            vec![edit(site(), &[("/spec/queue/fullPolicy", json!("panic"))])],
            "spec.queue.fullPolicy",
            "is not one of",
        ),
        case(
            "site name too long for its objects",
            vec![edit(site(), &[("/metadata/name", json!("a".repeat(53)))])],
            "metadata.name",
            "at most 52 characters",
        ),
    ]
}
