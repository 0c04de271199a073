//! The outbox as the relay reads it: [`OutboxStore`] on the partition streams, fenced
//! marks and blocked reasons through scripts, and the wake-up watcher.

use std::time::Duration;

use ::redis::{AsyncConnectionConfig, FromRedisValue, Value};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::{Lease, Message, OutboxStore, PartitionStatus, StoreError, Wakers};

use super::error::{corrupt_reply, store_error};
use super::scripts::SCRIPTS;
use super::{RedisOutbox, SCHEMA_VERSION, millis, stream};

/// How long the watcher's `XREAD` blocks before it asks again.
const WAKE_BLOCK: Duration = Duration::from_secs(5);

/// Wake-up entries read at once; a full read may mean some were trimmed unseen.
const WAKE_READ: usize = 1024;

fn timestamp(millis: &str) -> Option<DateTime<Utc>> {
    millis
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_millis)
}

#[async_trait]
impl OutboxStore for RedisOutbox {
    async fn partitions(&self) -> Result<u32, StoreError> {
        let mut conn = self.conn.clone();
        let (partitions, version): (Option<u32>, Option<u32>) = ::redis::cmd("HMGET")
            .arg(self.settings.key_prefix.key("meta"))
            .arg("partitions")
            .arg("schema_version")
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        match (partitions, version) {
            (Some(_), Some(version)) if version > SCHEMA_VERSION => {
                Err(StoreError::Schema(format!(
                    "the outbox under the key prefix {:?} has ferry schema version {version}, newer than this ferry ({SCHEMA_VERSION}); upgrade ferry",
                    self.prefix()
                )))
            }
            (Some(partitions), _) => Ok(partitions),
            (None, _) => Err(StoreError::Schema(format!(
                "there is no ferry outbox under the key prefix {:?} in this Redis",
                self.prefix()
            ))),
        }
    }

    /// Reads the partition's stream and its requeued messages (`front:<n>`) in one round
    /// trip and merges them by sequence. While some aggregate is held by parked messages,
    /// both are read in one script that leaves the held aggregates out.
    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let key = |name: &str| self.settings.key_prefix.key(&format!("{name}:{partition}"));
        let mut conn = self.conn.clone();
        let (holds, front, stream): (u64, Value, Value) = ::redis::pipe()
            .cmd("HLEN")
            .arg(self.settings.key_prefix.key("holds"))
            .cmd("XRANGE")
            .arg(key("front"))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .cmd("XRANGE")
            .arg(key("p"))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let (front, stream) = if holds == 0 {
            (front, stream)
        } else {
            let mut invocation = SCRIPTS.fetch_held.prepare_invoke();
            invocation.arg(self.prefix()).arg(partition).arg(limit);
            self.invoke(&invocation).await?
        };
        let front = stream::messages(front, partition)?;
        let mut messages = stream::messages(stream, partition)?;
        if !front.is_empty() {
            messages.extend(front);
            messages.sort_by_key(|m| m.sequence);
            messages.truncate(limit);
        }
        Ok(messages)
    }

    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut invocation = SCRIPTS.mark.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(u8::from(!self.settings.retention.is_zero()))
            .arg(checkpoint.map(|c| c.to_string()).unwrap_or_default())
            .arg(self.adopted_owner(lease));
        for id in ids {
            invocation.arg(id.to_string());
        }
        let marked: i64 = self.invoke(&invocation).await?;
        u64::try_from(marked).map_err(|_| StoreError::fenced(lease))
    }

    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError> {
        let mut invocation = SCRIPTS.set_blocked.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch);
        if let Some(reason) = reason {
            invocation.arg(reason);
        }
        let recorded: i64 = self.invoke(&invocation).await?;
        if recorded == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    async fn take_retry_request(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut invocation = SCRIPTS.retry.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg("take")
            .arg(lease.epoch)
            .arg(self.adopted_owner(lease));
        Ok(self.invoke::<i64>(&invocation).await? > 0)
    }

    /// One script checks the lease and moves the aggregate's messages, as a mark does (G5).
    async fn park_aggregate(
        &self,
        lease: &Lease,
        message: &Message,
        by: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let mut invocation = SCRIPTS.park.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(self.adopted_owner(lease))
            .arg(&message.aggregate_type)
            .arg(&message.aggregate_id)
            .arg(by)
            .arg(reason);
        let parked: i64 = self.invoke(&invocation).await?;
        u64::try_from(parked).map_err(|_| StoreError::fenced(lease))
    }

    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let mut invocation = SCRIPTS.adopt.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(&lease.owner);
        match self.invoke::<Value>(&invocation).await? {
            Value::Int(_) => Err(StoreError::fenced(lease)),
            reply => {
                let checkpoint: String = FromRedisValue::from_redis_value(reply).map_err(|e| {
                    StoreError::Other(format!("unexpected adopt reply: {e}").into())
                })?;
                Ok(checkpoint.parse().ok())
            }
        }
    }

    /// Blocks in `XREAD` on the wake-up stream (on a connection of its own, so that the
    /// blocking read holds up no other command) and wakes the partitions each entry names.
    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(WAKE_BLOCK + Duration::from_secs(10)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(store_error)?;
        let key = self.settings.key_prefix.key("wake");
        // Start after the newest entry; anything enqueued before is found by the wake below.
        let newest: Vec<(String, Value)> = ::redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut last = newest
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id);
        wakers.wake_all();
        loop {
            let reply: Value = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(WAKE_READ)
                .arg("BLOCK")
                .arg(millis(WAKE_BLOCK))
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if let Some((newest, partitions, read)) = stream::wake_ups(reply)? {
                last = newest;
                if read >= WAKE_READ {
                    // Behind by a full read: entries may have been trimmed unseen.
                    wakers.wake_all();
                }
                for partition in partitions {
                    wakers.wake(partition);
                }
            }
        }
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let mut invocation = SCRIPTS.status.prepare_invoke();
        invocation.arg(self.prefix());
        type Row = (String, i64, String, String, u64, String);
        let (now, rows): (String, Vec<Row>) = self.invoke(&invocation).await?;
        let now = timestamp(&now).ok_or_else(|| corrupt_reply("status without a clock"))?;
        Ok(rows
            .into_iter()
            .enumerate()
            .map(
                |(partition, (owner, epoch, expires_at, blocked, backlog, oldest))| {
                    let expires_at =
                        timestamp(&expires_at).filter(|at| *at > now && !owner.is_empty());
                    PartitionStatus {
                        partition: partition as u32,
                        owner: expires_at.map(|_| owner),
                        epoch,
                        lease_expires_at: expires_at,
                        backlog,
                        oldest_unpublished_age_secs: timestamp(&oldest)
                            .map(|created| (now - created).as_seconds_f64().max(0.0)),
                        blocked_reason: Some(blocked).filter(|b| !b.is_empty()),
                    }
                },
            )
            .collect())
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        if self.settings.retention.is_zero() {
            return Ok(0);
        }
        self.purge(&SCRIPTS.purge_published, self.settings.retention)
            .await
    }

    fn retention(&self) -> Duration {
        self.settings.retention
    }
}
