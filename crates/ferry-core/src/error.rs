//! The error every store and lease backend returns. It has a module of its own, depending
//! on no other, so that the contracts returning it (`store`, `lease`, `message`, `inbox`)
//! depend on it rather than on each other.

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error from a store (outbox or leases).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The lease's epoch is no longer current (expired or granted to another relay): the
    /// statement changed nothing. Never retried with the same lease.
    #[error("partition {partition} is fenced: lease epoch {epoch} is no longer current")]
    Fenced { partition: u32, epoch: i64 },
    /// The store could not be reached or failed transiently; retry with backoff.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// ferry's tables are missing or from another version.
    #[error("{0} (run `ferry migrate --config <file>` first)")]
    Schema(String),
    /// Anything else the store rejected; not retried.
    #[error("store error: {0}")]
    Other(#[source] BoxError),
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}
