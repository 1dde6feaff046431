//! tagstream's per-site ingestor.
//!
//! - [`acquisition`]: Modbus polling, decoding, deadband; its points go through
//!   `tagstream_core`'s calculation DAG.
//! - [`queue`]: the persistent queue on sled.
//! - [`publish`]: the ordered JetStream publisher.
//! - [`check`]: the `check` command.
//! - [`simulate`], [`simulate_cmd`]: Device manifests served as Modbus servers.
//! - [`read`]: the `read` command; [`tail`]: the `tail` command; [`write_cmd`]: the
//!   `write` command.
//! - [`service`]: the `run` command: the whole ingestor.
//! - [`writes`]: setpoint writes taken over NATS, performed by the pollers, audited.

pub mod acquisition;
pub mod check;
pub mod nats_cli;
pub mod publish;
pub mod queue;
pub mod read;
pub mod service;
pub mod simulate;
pub mod simulate_cmd;
pub mod tail;
pub mod write_cmd;
pub mod writes;
