//! Real peers shared by the integration tests and the benchmarks.

pub mod child;
pub mod cluster;
pub mod forgetful_fs;
pub mod http;
pub mod nats;
pub mod points;
pub mod pty;
pub mod publisher;
pub mod pymodbus;
pub mod stream;
