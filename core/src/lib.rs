//! What tagstream's two binaries share: the operator validates and renders what the
//! ingestor runs, and reads what it reports. Nothing here polls, queues or publishes, so
//! the operator links no Modbus, sled or NATS code.
//!
//! - [`calc`]: the calculation DAG that evaluates Formulas in dependency order, only where
//!   an input changed; the operator uses it to validate Formulas before deploying them.
//! - [`config`]: a site's objects, grouped from the manifests.
//! - [`point`]: the values that flow through the ingestor.
//! - [`report`]: the ingestor's `/status` document.
//! - [`http`]: serving `/metrics` and friends; [`logging`]: logs and the shutdown signal.

pub mod calc;
pub mod config;
pub mod http;
pub mod logging;
pub mod point;
pub mod report;
