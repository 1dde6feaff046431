//! tagstream's per-site ingestor.
//!
//! - [`calc`]: the calculation DAG that evaluates Formulas in dependency order, only where an
//!   input changed. The operator uses it too, to validate Formulas before deploying them.
//! - [`point`]: the values that flow through it.
//! - [`config`]: a site's objects, grouped from the manifests.
//! - [`check`]: the `check` command.

pub mod calc;
pub mod check;
pub mod config;
pub mod point;
