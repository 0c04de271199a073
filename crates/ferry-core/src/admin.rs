//! What an operator does with an outbox on a bad day, without editing tables by hand: see
//! the blocked partitions, have one retried now, skip (park) a message the sink rejects
//! for good, put parked messages back, and clean up what is kept.
//!
//! Parked messages leave the outbox's flow but keep everything they had (id, version,
//! sequence, headers), so a requeued message is the same message: consumers' inboxes treat
//! it as they would the original. A message parked by the `park-aggregate` policy *holds*
//! its aggregate: the aggregate's later messages stay in the outbox, unpublished, until the
//! parked ones are requeued, which puts them back with their original sequences, ahead of
//! every later message of the aggregate (G3). A message an operator skips holds nothing:
//! the operator chose to let its aggregate go on without it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::StoreError;
use crate::message::Message;

/// A partition that does not move: the sink rejects its head message for good.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedPartition {
    pub partition: u32,
    /// What the sink said, as the relay recorded it.
    pub reason: String,
    /// When the relay recorded it.
    pub since: Option<DateTime<Utc>>,
    /// The partition's first unpublished message: the one rejected. `None` if it was
    /// published or parked since.
    pub head: Option<Message>,
}

/// A message moved out of the outbox's flow.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedMessage {
    pub message: Message,
    pub parked_at: DateTime<Utc>,
    /// The operator who skipped it, or `relay <id>` for the `park-aggregate` policy.
    pub parked_by: String,
    pub reason: String,
    /// Whether it holds its aggregate's later messages back until it is requeued.
    pub holds_aggregate: bool,
}

/// Which parked messages to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParkedQuery {
    /// Only this aggregate's (type, id).
    pub aggregate: Option<(String, String)>,
    /// Messages after this sequence (the previous page's last).
    pub after_sequence: Option<i64>,
    pub limit: u32,
}

/// Which published messages kept for replay to select. Every bound is inclusive; `None`
/// leaves it open.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetainedFilter {
    pub partition: Option<u32>,
    pub from_sequence: Option<i64>,
    pub to_sequence: Option<i64>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created at or before.
    pub until: Option<DateTime<Utc>>,
    /// Only this aggregate's (type, id).
    pub aggregate: Option<(String, String)>,
}

impl RetainedFilter {
    /// Refuses a selection that cannot be meant: nothing chosen (unless `all` retained
    /// messages are), or a range empty by construction.
    pub fn check(&self, all: bool) -> Result<(), String> {
        if *self == Self::default() && !all {
            return Err(
                "choose what to replay: a partition, a sequence range (from/to), a time range \
                 (since/until), an aggregate (type and id), or all retained messages"
                    .into(),
            );
        }
        if let (Some(from), Some(to)) = (self.from_sequence, self.to_sequence)
            && from > to
        {
            return Err(format!(
                "from sequence {from} is above to sequence {to}: the range is empty"
            ));
        }
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since > until
        {
            return Err(format!(
                "since {since} is after until {until}: the range is empty"
            ));
        }
        Ok(())
    }
}

/// A replay bound in time: an RFC 3339 time (`2026-12-04T08:00:00Z`) or a duration
/// (`6h`, `2days`) before now.
pub fn parse_time_or_ago(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!(
            "{text:?} is neither an RFC 3339 time (2026-12-04T08:00:00Z) nor a duration ago (6h)"
        )
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{text:?} reaches too far back"))
}

/// How many published messages a filter selects, and their range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetainedSummary {
    pub count: u64,
    pub first_sequence: Option<i64>,
    pub last_sequence: Option<i64>,
    pub first_created_at: Option<DateTime<Utc>>,
    pub last_created_at: Option<DateTime<Utc>>,
}

/// What a cleanup removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cleaned {
    /// Published messages kept for replay past the bound.
    pub published: u64,
    /// Inbox records (processed ids) past the bound.
    pub inbox: u64,
    /// Parked messages past the bound.
    pub parked: u64,
}

/// Bounds for a cleanup; `None` leaves that kind alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupBounds {
    pub published_older_than: Option<Duration>,
    pub inbox_older_than: Option<Duration>,
    pub parked_older_than: Option<Duration>,
}

/// The operator's view of an outbox. Every method is safe while relays run: what changes
/// the flow (skip, requeue) is one transaction (or script) in the store, and a relay
/// retrying a skipped message finds it gone and moves on.
#[async_trait]
pub trait OutboxAdmin: Send + Sync + 'static {
    /// The blocked partitions, with the message at each one's head.
    async fn blocked(&self) -> Result<Vec<BlockedPartition>, StoreError>;

    /// Asks the relay owning `partition` to retry its head message now instead of at its
    /// next `retry_max`. Returns whether the partition was blocked.
    async fn request_retry(&self, partition: u32) -> Result<bool, StoreError>;

    /// Moves the unpublished message `id` to the parked messages, recording who and why,
    /// and asks its partition's relay to go on at once. `None` if no unpublished message
    /// has that id (already published, parked or never there).
    async fn skip(
        &self,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> Result<Option<ParkedMessage>, StoreError>;

    /// Parked messages in sequence order.
    async fn parked(&self, query: &ParkedQuery) -> Result<Vec<ParkedMessage>, StoreError>;

    /// Puts an aggregate's parked messages back into the outbox with their original
    /// sequences, ahead of anything newer of the aggregate, and releases the aggregate.
    /// Returns how many went back.
    async fn requeue_parked(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<u64, StoreError>;

    /// Deletes, in batches, published messages, inbox records and parked messages older
    /// than the bounds. Idempotent.
    async fn cleanup(&self, bounds: &CleanupBounds) -> Result<Cleaned, StoreError>;

    /// Up to `limit` published messages kept for replay (see the store's retention) that
    /// `filter` selects, with a sequence above `after_sequence`, in sequence order: the
    /// order in which a replay publishes them, which keeps every key's order (a key's
    /// messages are in one partition, in sequence order). Stores that keep no published
    /// messages keep the default, which refuses.
    async fn retained(
        &self,
        filter: &RetainedFilter,
        after_sequence: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let _ = (filter, after_sequence, limit);
        Err(no_replay())
    }

    /// How many messages [`retained`](Self::retained) would give, and their range.
    async fn retained_summary(
        &self,
        filter: &RetainedFilter,
    ) -> Result<RetainedSummary, StoreError> {
        let _ = filter;
        Err(no_replay())
    }
}

fn no_replay() -> StoreError {
    StoreError::Other("this outbox store cannot replay published messages yet".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        assert_eq!(
            parse_time_or_ago("2026-12-04T08:00:00Z")
                .expect("valid")
                .to_rfc3339(),
            "2026-12-04T08:00:00+00:00"
        );
        let ago = Utc::now() - parse_time_or_ago("2h").expect("valid");
        assert!((ago.num_seconds() - 7200).abs() < 5, "{ago}");
        assert!(
            parse_time_or_ago("yesterday-ish")
                .expect_err("neither")
                .contains("RFC 3339")
        );
    }

    #[test]
    fn a_selection_must_choose_something_and_not_be_empty_by_construction() {
        assert!(
            RetainedFilter::default()
                .check(false)
                .expect_err("nothing chosen")
                .contains("choose what to replay")
        );
        assert_eq!(RetainedFilter::default().check(true), Ok(()));
        let reversed = RetainedFilter {
            from_sequence: Some(9),
            to_sequence: Some(3),
            ..RetainedFilter::default()
        };
        assert!(
            reversed
                .check(false)
                .expect_err("empty")
                .contains("range is empty")
        );
    }
}
