//! The consumer inbox: apply each message exactly once and never a stale version (G4).

use crate::cloudevents::ReceivedMessage;
use crate::error::StoreError;

/// The inbox's verdict on a received message, recorded in the consumer's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New id with a version above the last applied one: run the handler.
    Apply {
        /// The aggregate's last applied version before this one (0 if none). A value other
        /// than `version - 1` means versions were skipped (they can no longer be applied).
        previous_version: u64,
    },
    /// This id was processed before.
    Duplicate,
    /// A new id whose version is at or below the last applied one for its aggregate.
    Stale { last_applied_version: u64 },
}

/// The admit decision every inbox store makes, so that stores only run statements: record
/// the id (a repeat is a duplicate), read the aggregate's last applied version (0 if none),
/// then apply and advance only above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub admission: Admission,
    /// The version the store must record as the aggregate's last applied one; set exactly
    /// when the message is applied.
    pub advance_to: Option<u64>,
}

impl Decision {
    /// Decides for a message of `version` whose id the store did (or did not) newly record,
    /// given the aggregate's last applied version.
    pub fn new(version: u64, newly_recorded: bool, last_applied_version: u64) -> Self {
        let admission = if !newly_recorded {
            Admission::Duplicate
        } else if version <= last_applied_version {
            Admission::Stale {
                last_applied_version,
            }
        } else {
            Admission::Apply {
                previous_version: last_applied_version,
            }
        };
        let advance_to = matches!(admission, Admission::Apply { .. }).then_some(version);
        Self {
            admission,
            advance_to,
        }
    }
}

/// What [`process`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran and returned this.
    Applied { output: T, previous_version: u64 },
    /// Skipped: the id was seen before.
    Duplicate,
    /// Skipped: the aggregate is already at a newer or equal version.
    Stale { last_applied_version: u64 },
}

impl<T> Processed<T> {
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied { .. })
    }
}

/// A failure of [`process`]; either way the caller must roll back.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    #[error("inbox: {0}")]
    Store(#[from] StoreError),
    #[error("handler failed")]
    Handler(#[source] E),
}

/// The consumer-side record of processed ids and applied versions, kept in the consumer's
/// own transaction `Tx` so that the record and the handler's effects commit together.
pub trait Inbox<Tx: Send>: Sync {
    /// Records `message` in `tx` and says whether to apply it. Inserting the id and
    /// advancing the aggregate's version happen in `tx`: if the caller rolls back, the
    /// message counts as never seen.
    fn admit(
        &self,
        tx: &mut Tx,
        message: &ReceivedMessage,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;
}

/// Admits `message` through `inbox` and, if it is new and current, runs `handler` in the
/// same transaction. The caller commits `tx` on `Ok` and rolls back on `Err`.
///
/// A free function rather than a trait method so that the returned future is `Send`
/// whenever the handler's is (stable Rust cannot yet bound an async closure's future).
pub async fn process<Tx, I, T, E>(
    inbox: &I,
    tx: &mut Tx,
    message: &ReceivedMessage,
    handler: impl AsyncFnOnce(&mut Tx, &ReceivedMessage) -> Result<T, E>,
) -> Result<Processed<T>, ProcessError<E>>
where
    Tx: Send,
    I: Inbox<Tx>,
{
    match inbox.admit(tx, message).await? {
        Admission::Apply { previous_version } => {
            let output = handler(tx, message).await.map_err(ProcessError::Handler)?;
            Ok(Processed::Applied {
                output,
                previous_version,
            })
        }
        Admission::Duplicate => Ok(Processed::Duplicate),
        Admission::Stale {
            last_applied_version,
        } => Ok(Processed::Stale {
            last_applied_version,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_is_a_duplicate_whatever_its_version() {
        for (version, last) in [(1, 0), (5, 5), (3, 9)] {
            assert_eq!(
                Decision::new(version, false, last),
                Decision {
                    admission: Admission::Duplicate,
                    advance_to: None
                }
            );
        }
    }

    #[test]
    fn a_new_id_at_or_below_the_last_version_is_stale() {
        for (version, last) in [(2, 2), (1, 7)] {
            assert_eq!(
                Decision::new(version, true, last),
                Decision {
                    admission: Admission::Stale {
                        last_applied_version: last
                    },
                    advance_to: None
                }
            );
        }
    }

    #[test]
    fn a_new_id_above_the_last_version_is_applied_and_advances() {
        assert_eq!(
            Decision::new(1, true, 0),
            Decision {
                admission: Admission::Apply {
                    previous_version: 0
                },
                advance_to: Some(1)
            }
        );
        // A gap is applied too; previous_version reports it.
        assert_eq!(
            Decision::new(9, true, 4),
            Decision {
                admission: Admission::Apply {
                    previous_version: 4
                },
                advance_to: Some(9)
            }
        );
    }
}
