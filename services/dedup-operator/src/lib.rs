//! dedup-operator: runs dedup pipelines on Kubernetes from a `DedupPipeline` resource and
//! scales the workers from queue depth.
//!
//!
//! # Layout
//!
//! - [`controller`]: reconcile (server-side apply, scaling, status) and its error policy.
//! - [`crd`]: the `DedupPipeline` custom resource (spec, status, printer columns).
//! - [`leader`]: leader election on a Lease, so one replica of several acts.
//! - [`metrics`]: the operator's Prometheus metrics.
//! - [`resources`]: the ConfigMap, Deployments and Service a pipeline becomes.
//! - [`scale`]: the worker scaling decision, HPA-style, pure and table-tested.

pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod scale;
pub mod scope;
