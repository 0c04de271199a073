//! [`OutboxAdmin`] for [`RedisOutbox`]: operators' tools on the Redis store, each change
//! one script (see `lua/skip.lua`, `park.lua`, `requeue.lua`, `purge_*.lua`).

use std::time::Duration;

use ::redis::{FromRedisValue, Script, Value};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::{
    BlockedPartition, Cleaned, CleanupBounds, Message, OutboxAdmin, OutboxStore, ParkedMessage,
    ParkedQuery, RetainedFilter, RetainedSummary, StoreError,
};

use super::error::{corrupt_reply, store_error};
use super::scripts::SCRIPTS;
use super::{RedisOutbox, millis, stream};

/// Entries removed per cleanup script call, so that none holds Redis for long.
const CLEANUP_BATCH: u64 = 1000;

/// Index entries of kept messages one `retained.lua` call looks at.
const RETAINED_BUDGET: u32 = 2000;

#[async_trait]
impl OutboxAdmin for RedisOutbox {
    async fn blocked(&self) -> Result<Vec<BlockedPartition>, StoreError> {
        let partitions = self.partitions().await?;
        let mut pipeline = ::redis::pipe();
        for partition in 0..partitions {
            pipeline
                .cmd("HMGET")
                .arg(self.settings.key_prefix.key(&format!("lease:{partition}")))
                .arg("blocked_reason")
                .arg("blocked_at");
        }
        let mut conn = self.conn.clone();
        let rows: Vec<(Option<String>, Option<i64>)> =
            pipeline.query_async(&mut conn).await.map_err(store_error)?;
        let mut blocked = Vec::new();
        for (partition, (reason, since)) in (0..partitions).zip(rows) {
            let Some(reason) = reason else { continue };
            blocked.push(BlockedPartition {
                partition,
                reason,
                since: since.and_then(DateTime::from_timestamp_millis),
                head: self.fetch(partition, 1).await?.into_iter().next(),
            });
        }
        Ok(blocked)
    }

    async fn request_retry(&self, partition: u32) -> Result<bool, StoreError> {
        let mut invocation = SCRIPTS.retry.prepare_invoke();
        invocation.arg(self.prefix()).arg(partition).arg("request");
        Ok(self.invoke::<i64>(&invocation).await? > 0)
    }

    /// One script moves the message and asks its partition's relay to go on: a relay that
    /// publishes the message meanwhile marks nothing (its id points at the parked record).
    async fn skip(
        &self,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> Result<Option<ParkedMessage>, StoreError> {
        let mut invocation = SCRIPTS.skip.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(id.to_string())
            .arg(by)
            .arg(reason);
        match self.invoke::<Value>(&invocation).await? {
            Value::Nil => Ok(None),
            Value::Array(fields) => stream::parked(fields).map(Some),
            _ => Err(corrupt_reply("a skip reply that is neither nil nor fields")),
        }
    }

    async fn parked(&self, query: &ParkedQuery) -> Result<Vec<ParkedMessage>, StoreError> {
        let (aggregate_type, aggregate_id) = aggregate_args(&query.aggregate);
        let mut invocation = SCRIPTS.parked.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(aggregate_type)
            .arg(aggregate_id)
            .arg(
                query
                    .after_sequence
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )
            .arg(query.limit);
        let rows: Vec<Vec<Value>> = self.invoke(&invocation).await?;
        rows.into_iter().map(stream::parked).collect()
    }

    /// One script writes the messages back and releases the aggregate: a relay sees the
    /// aggregate either held or back, never both or neither.
    async fn requeue_parked(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<u64, StoreError> {
        let mut invocation = SCRIPTS.requeue.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(aggregate_type)
            .arg(aggregate_id);
        self.invoke(&invocation).await
    }

    async fn cleanup(&self, bounds: &CleanupBounds) -> Result<Cleaned, StoreError> {
        Ok(Cleaned {
            published: match bounds.published_older_than {
                Some(bound) => self.purge(&SCRIPTS.purge_published, bound).await?,
                None => 0,
            },
            inbox: match bounds.inbox_older_than {
                Some(bound) => self.purge_inbox(bound).await?,
                None => 0,
            },
            parked: match bounds.parked_older_than {
                Some(bound) => self.purge(&SCRIPTS.purge_parked, bound).await?,
                None => 0,
            },
        })
    }

    async fn retained(
        &self,
        filter: &RetainedFilter,
        after_sequence: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let mut first = first_sequence(filter, after_sequence);
        let mut page = Vec::new();
        while page.len() < limit as usize {
            let left = limit - page.len() as u32;
            let reply: (String, i64, Vec<(u32, Vec<Value>)>) =
                self.retained_call("page", filter, &first, left).await?;
            let (looked_at, ended, found) = reply;
            page.extend(stream::retained(found)?);
            if ended == 1 || looked_at.is_empty() {
                break;
            }
            first = format!("({looked_at}");
        }
        Ok(page)
    }

    async fn retained_summary(
        &self,
        filter: &RetainedFilter,
    ) -> Result<RetainedSummary, StoreError> {
        let mut first = first_sequence(filter, None);
        let mut summary = RetainedSummary::default();
        loop {
            type Reply = (String, i64, u64, String, String, String, String);
            let (looked_at, ended, count, low, high, earliest, latest): Reply =
                self.retained_call("summary", filter, &first, 0).await?;
            summary.count += count;
            summary.first_sequence = summary.first_sequence.or(low.parse().ok());
            summary.last_sequence = high.parse().ok().or(summary.last_sequence);
            let time = |ms: &str| ms.parse().ok().and_then(DateTime::from_timestamp_millis);
            summary.first_created_at = earlier(summary.first_created_at, time(&earliest));
            summary.last_created_at = later(summary.last_created_at, time(&latest));
            if ended == 1 || looked_at.is_empty() {
                return Ok(summary);
            }
            first = format!("({looked_at}");
        }
    }
}

/// The lowest sequence `filter` selects after `after_sequence`, as a score bound.
fn first_sequence(filter: &RetainedFilter, after_sequence: Option<i64>) -> String {
    let from = filter.from_sequence.unwrap_or(i64::MIN);
    let from = after_sequence.map_or(from, |after| from.max(after.saturating_add(1)));
    if from == i64::MIN {
        "-inf".into()
    } else {
        from.to_string()
    }
}

/// An optional `(aggregate_type, aggregate_id)` filter as the scripts take it: empty for
/// none.
fn aggregate_args(aggregate: &Option<(String, String)>) -> (&str, &str) {
    match aggregate {
        Some((kind, id)) => (kind, id),
        None => ("", ""),
    }
}

fn earlier(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    a.into_iter().chain(b).min()
}

fn later(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    a.into_iter().chain(b).max()
}

impl RedisOutbox {
    /// One `retained.lua` call from score bound `first`.
    async fn retained_call<T: FromRedisValue>(
        &self,
        mode: &str,
        filter: &RetainedFilter,
        first: &str,
        limit: u32,
    ) -> Result<T, StoreError> {
        let text = |value: Option<String>| value.unwrap_or_default();
        let millis =
            |time: Option<DateTime<Utc>>| text(time.map(|t| t.timestamp_millis().to_string()));
        let (aggregate_type, aggregate_id) = aggregate_args(&filter.aggregate);
        let mut invocation = SCRIPTS.retained.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(mode)
            .arg(text(filter.partition.map(|p| p.to_string())))
            .arg(first)
            .arg(
                filter
                    .to_sequence
                    .map_or_else(|| "+inf".to_owned(), |s| s.to_string()),
            )
            .arg(millis(filter.since))
            .arg(millis(filter.until))
            .arg(aggregate_type)
            .arg(aggregate_id)
            .arg(RETAINED_BUDGET)
            .arg(limit);
        self.invoke(&invocation).await
    }

    /// Runs a purge script (`prefix, older than ms, batch`) until a batch comes back short;
    /// returns how many went.
    pub(super) async fn purge(
        &self,
        script: &Script,
        older_than: Duration,
    ) -> Result<u64, StoreError> {
        let mut purged = 0;
        loop {
            let mut invocation = script.prepare_invoke();
            invocation
                .arg(self.prefix())
                .arg(millis(older_than))
                .arg(CLEANUP_BATCH);
            let deleted: u64 = self.invoke(&invocation).await?;
            purged += deleted;
            if deleted < CLEANUP_BATCH {
                return Ok(purged);
            }
        }
    }

    /// Inbox id records under this outbox's key prefix older than `older_than`: found with
    /// SCAN, checked and deleted a page at a time by `purge_inbox.lua`.
    async fn purge_inbox(&self, older_than: Duration) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}inbox:*:id:*", self.prefix());
        let mut cursor = 0u64;
        let mut purged = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(CLEANUP_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if !keys.is_empty() {
                let mut invocation = SCRIPTS.purge_inbox.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                invocation.arg(millis(older_than));
                purged += self.invoke::<u64>(&invocation).await?;
            }
            if next == 0 {
                return Ok(purged);
            }
            cursor = next;
        }
    }
}
