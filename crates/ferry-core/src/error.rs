//! The error every store and lease backend returns, and how errors are printed. It has a
//! module of its own, depending on no other, so that the contracts returning it (`store`,
//! `lease`, `message`, `inbox`) depend on it rather than on each other.
//!
//! Errors that wrap another (ferry's and many libraries') repeat its message in their own
//! and return it as [`Error::source`] too; logs and reports print the chain with
//! [`ErrorChain`], which says each message once.

use std::error::Error;
use std::fmt;

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
    /// What the call needs is held by another process (a replication slot streamed by
    /// another relay, a lock): not an outage, so the caller waits as a standby and tries
    /// again, without counting it as a failure.
    #[error("held by another process: {0}")]
    HeldElsewhere(String),
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

/// An error and its causes on one line, `error: cause: cause`, for logs and for reasons
/// stored where no log formatter walks the chain. A cause whose text the line already holds
/// is left out: an error that wraps another usually repeats its message.
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(err) = cause {
            let text = err.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = err.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// [`ErrorChain`] as a string.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    ErrorChain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Layer {
        message: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(messages: &[&'static str]) -> Layer {
        messages
            .iter()
            .rev()
            .fold(None, |source, message| {
                Some(Layer {
                    message,
                    source: source.map(Box::new),
                })
            })
            .expect("at least one layer")
    }

    #[test]
    fn every_cause_is_printed_once() {
        let err = layers(&[
            "store unavailable",
            "error communicating with database: Connection refused (os error 111)",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            error_chain(&err),
            "store unavailable: error communicating with database: Connection refused (os error 111)"
        );
        let unavailable = StoreError::Unavailable(Box::new(layers(&["timed out"])));
        assert_eq!(error_chain(&unavailable), "store unavailable: timed out");
    }
}
