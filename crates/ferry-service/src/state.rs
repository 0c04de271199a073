//! The message states and the transitions between them.
//!
//! | from | to | by |
//! |---|---|---|
//! | (new) | prepared | `POST /v1/messages` |
//! | prepared, check_failed | confirmed | confirm; from prepared only: check-back `committed` |
//! | prepared, check_failed | cancelled | cancel; from prepared only: check-back `rolled_back` |
//! | prepared | check_failed | `max_checks` inconclusive check-backs |
//! | check_failed | prepared | retry (checked back again) |
//! | confirmed | delivered | the relay published the outbox row |
//! | delivered | confirmed | ack timeout: redelivery (same id and version) |
//! | delivered | dead_lettered | ack timeout after `max_deliveries` deliveries |
//! | dead_lettered | confirmed | retry (redelivered) |
//! | confirmed, delivered, dead_lettered | completed | ack |
//!
//! The store enforces these rules: every transition is one conditional `UPDATE … WHERE id
//! = ? AND status IN (<allowed sources>)`, so of two concurrent transitions of one message
//! (a producer's confirm and a check-back's rolled_back) exactly one changes it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored, not yet sent: waiting for the producer's confirm or cancel.
    Prepared,
    /// In ferry's outbox, waiting for the relay (first delivery or a redelivery).
    Confirmed,
    /// Published to the broker, waiting for the consumer's ack.
    Delivered,
    /// Acknowledged by the consumer. Final.
    Completed,
    /// Cancelled by the producer or by a check-back answer; never sent. Final.
    Cancelled,
    /// Check-backs were inconclusive `max_checks` times; waits for an operator.
    CheckFailed,
    /// Not acknowledged after `max_deliveries` deliveries; waits for an operator.
    DeadLettered,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Prepared,
        Status::Confirmed,
        Status::Delivered,
        Status::Completed,
        Status::Cancelled,
        Status::CheckFailed,
        Status::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Prepared => "prepared",
            Status::Confirmed => "confirmed",
            Status::Delivered => "delivered",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
            Status::CheckFailed => "check_failed",
            Status::DeadLettered => "dead_lettered",
        }
    }

    /// Statuses whose rows the retention purge may delete: nothing more can happen to them.
    pub const FINISHED: [Status; 2] = [Status::Completed, Status::Cancelled];
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`Status::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown status {0:?}: use one of prepared, confirmed, delivered, completed, cancelled, check_failed, dead_lettered"
)]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| UnknownStatus(text.to_owned()))
    }
}

/// A change of status, with what the store does besides setting the new status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// → confirmed, enqueued into the outbox in the same transaction (the outbox assigns
    /// the aggregate's next version).
    Confirm,
    /// → cancelled.
    Cancel,
    /// → completed.
    Ack,
    /// check_failed → prepared, checked back again from now with a fresh budget.
    RetryCheck,
    /// dead_lettered → confirmed, re-enqueued with the same id and version and a fresh
    /// delivery budget.
    RetryDelivery,
}

impl Transition {
    pub fn target(self) -> Status {
        match self {
            Transition::Confirm | Transition::RetryDelivery => Status::Confirmed,
            Transition::Cancel => Status::Cancelled,
            Transition::Ack => Status::Completed,
            Transition::RetryCheck => Status::Prepared,
        }
    }

    /// The statuses this transition may leave when asked for over the API. A check-back
    /// answer leaves `prepared` only (see [`CHECK_BACK_SOURCES`]).
    pub fn sources(self) -> &'static [Status] {
        match self {
            // The producer's word settles a check that failed too.
            Transition::Confirm | Transition::Cancel => &[Status::Prepared, Status::CheckFailed],
            // A consumer can ack before the delivery scan noticed the publish (confirmed),
            // while a redelivery waits in the outbox (confirmed), or late (dead_lettered).
            Transition::Ack => &[Status::Confirmed, Status::Delivered, Status::DeadLettered],
            Transition::RetryCheck => &[Status::CheckFailed],
            Transition::RetryDelivery => &[Status::DeadLettered],
        }
    }

    /// Statuses in which asking for this transition again changes nothing and succeeds:
    /// the request was already carried out (idempotent confirm, cancel and ack).
    pub fn already_done(self) -> &'static [Status] {
        match self {
            Transition::Confirm => &[
                Status::Confirmed,
                Status::Delivered,
                Status::Completed,
                Status::DeadLettered,
            ],
            Transition::Cancel => &[Status::Cancelled],
            Transition::Ack => &[Status::Completed],
            Transition::RetryCheck | Transition::RetryDelivery => &[],
        }
    }

    /// The verb, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            Transition::Confirm => "confirmed",
            Transition::Cancel => "cancelled",
            Transition::Ack => "acknowledged",
            Transition::RetryCheck | Transition::RetryDelivery => "retried",
        }
    }
}

/// What a check-back answer may leave: only `prepared`. A message the producer confirmed
/// or cancelled meanwhile, or an operator moved, keeps its status.
pub const CHECK_BACK_SOURCES: &[Status] = &[Status::Prepared];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).expect("serialises"),
                serde_json::Value::String(status.as_str().into())
            );
        }
        let err = "shipped".parse::<Status>().expect_err("unknown");
        assert!(err.to_string().contains("dead_lettered"), "{err}");
    }

    #[test]
    fn sources_and_idempotent_statuses_never_overlap() {
        for transition in [
            Transition::Confirm,
            Transition::Cancel,
            Transition::Ack,
            Transition::RetryCheck,
            Transition::RetryDelivery,
        ] {
            for status in transition.sources() {
                assert!(
                    !transition.already_done().contains(status),
                    "{transition:?} {status}"
                );
                assert_ne!(*status, transition.target(), "{transition:?}");
            }
        }
    }

    #[test]
    fn a_cancelled_message_can_never_be_confirmed_nor_the_reverse() {
        assert!(!Transition::Confirm.sources().contains(&Status::Cancelled));
        assert!(
            !Transition::Confirm
                .already_done()
                .contains(&Status::Cancelled)
        );
        for confirmed_like in [Status::Confirmed, Status::Delivered, Status::Completed] {
            assert!(!Transition::Cancel.sources().contains(&confirmed_like));
            assert!(!Transition::Cancel.already_done().contains(&confirmed_like));
        }
    }
}
