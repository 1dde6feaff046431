//! A Modbus TCP server written by someone else: pymodbus (`pymodbus_server.py`), from the
//! virtualenv `scripts/test.sh` makes and names in `TAGSTREAM_PYMODBUS_PYTHON`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{child::KilledOnDrop, nats::free_port};

/// The server on a free loopback port, and the port; `None` (saying SKIPPED) without
/// `TAGSTREAM_PYMODBUS_PYTHON`.
pub async fn start() -> Option<(KilledOnDrop, u16)> {
    let Some(python) = std::env::var_os("TAGSTREAM_PYMODBUS_PYTHON") else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED pymodbus: TAGSTREAM_PYMODBUS_PYTHON is not set (scripts/test.sh sets it)\n",
        );
        return None;
    };
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/pymodbus_server.py");
    let server = KilledOnDrop(
        Command::new(python)
            .args([script, &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the pymodbus server"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "pymodbus did not listen within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some((server, port))
}
