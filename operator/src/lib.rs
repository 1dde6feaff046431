//! tagstream's operator. Today: [`render`], the pure step that turns a Site and its
//! Devices and Formulas into the objects that run its ingestor. The controller that
//! applies them (server-side apply, status from the ingestors) builds on it.

pub mod render;
