//! Real peers shared by the integration tests and the benchmarks.

pub mod nats;
pub mod stream;
