//! Acquisition: reading Modbus devices as their manifests describe them.
//!
//! - [`plan`]: which requests a poll makes (coalescing, limits, splitting refused reads).
//! - [`decode`]: registers to values and back (byte orders, strings, scaling); pure.
//! - [`filter`]: deadband and heartbeat.
//! - [`connection`]: connecting (TCP, RTU over TCP, RTU) and one bounded read.
//! - [`transport`]: the stream under tokio-modbus: late answers dropped or drained.
//! - [`poller`]: one task per endpoint polling its devices, with backoff and quirks, and
//!   performing the writes routed to them between polls.
//! - [`write`]: one tag written: checked, laid out, read before and after.

pub mod connection;
pub mod decode;
pub mod filter;
pub mod plan;
pub mod poller;
pub mod transport;
pub mod write;
