//! The product-event contract: what an accepted event is, and when two events are the same.
//! Pure functions over text; nothing here does I/O.
//!
//! # Layout
//!
//! - [`event`]: one product event: required fields, limits, the time window and the original
//!   service's error messages, checked over the client's own text.
//! - [`datetime`]: the ISO 8601 date-times the original accepted.
//! - [`storable`]: what PostgreSQL's `jsonb` and `text` accept, checked before an event is.
//! - [`key`]: the dedup key, a 128-bit hash over an unambiguous encoding of the key fields.

pub mod datetime;
pub mod event;
pub mod key;
pub mod storable;

pub use event::FieldErrors;
pub use key::{DedupKey, KeySpec};
