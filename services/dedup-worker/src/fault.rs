//! Crash injection between the steps of a batch, for the exactly-once tests. Compiled only
//! for tests: the production binary has no hook and no checkpoint.

use std::sync::Arc;

/// Points between the steps of a batch where a test can inject a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Deliveries decoded, nothing written anywhere yet.
    Decoded,
    /// Redis asked, PostgreSQL not yet written.
    AfterRedisCheck,
    /// Rows committed, Redis not yet updated, nothing acked.
    AfterCommit,
    /// Redis updated, nothing acked.
    AfterRedisRecord,
}

/// Called with the stage and the first delivery tag of the batch:
/// returning `true` makes the worker behave as if it crashed there (it drops its broker
/// connection without acking).
pub type FaultHook = Arc<dyn Fn(Stage, u64) -> bool + Send + Sync>;
