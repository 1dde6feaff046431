//! tagstream's operator: one ingestor per Site, kept current without churn, with health
//! from the ingestors written where users look (`kubectl get devices`).
//!
//! - [`render`]: the pure step from a Site and its Devices and Formulas to its objects.
//! - [`apply`]: server-side apply, skipped when the rendering did not change.
//! - [`reconcile`]: one Site's reconcile and its retry policy.
//! - [`membership`] and [`site_creation`]: which sites a Device or Formula change touches,
//!   and the Site created for one naming a missing site.
//! - [`status`], [`report`] and [`status_loop`]: status from the ingestors' reports.
//! - [`controller`]: the watches and the controller that tie them together.

pub mod apply;
pub mod context;
pub mod controller;
pub mod default_site;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod site_creation;
pub mod status;
pub mod status_loop;
