//! tagstream's per-site ingestor.
//!
//! - [`acquisition`]: Modbus polling, decoding, deadband.
//! - [`calc`]: the calculation DAG that evaluates Formulas in dependency order, only where an
//!   input changed. The operator uses it too, to validate Formulas before deploying them.
//! - [`point`]: the values that flow through it.
//! - [`queue`]: the persistent queue on sled.
//! - [`publish`]: the ordered JetStream publisher.
//! - [`config`]: a site's objects, grouped from the manifests.
//! - [`check`]: the `check` command.
//! - [`simulate`], [`simulate_cmd`]: Device manifests served as Modbus servers.
//! - [`read`]: the `read` command; [`tail`]: the `tail` command.
//! - [`service`]: the `run` command: the whole ingestor.
//! - [`logging`]: logs and the shutdown signal.

pub mod acquisition;
pub mod calc;
pub mod check;
pub mod config;
pub mod logging;
pub mod point;
pub mod publish;
pub mod queue;
pub mod read;
pub mod service;
pub mod simulate;
pub mod simulate_cmd;
pub mod tail;
