//! Enqueueing: the enqueue script's arguments, sent with `EVALSHA` or handed to the caller
//! as an `EVAL` command for a `MULTI` of its own, and the script's reply.

use ::redis::{Cmd, FromRedisValue, Value};
use uuid::Uuid;

use ferry_core::{EnqueueError, Enqueued, NewMessage, StoreError};

use super::error::store_error;
use super::scripts::{self, ArgSink, SCRIPTS};
use super::{MAX_MESSAGES_PER_CALL, RedisOutbox, RedisWrites};

impl RedisOutbox {
    /// SHA1 of the enqueue script, for `EVALSHA` from other languages.
    pub fn enqueue_script_sha() -> &'static str {
        SCRIPTS.enqueue.get_hash()
    }

    /// The enqueue script's text (also stored in the outbox's `meta` hash by `migrate`).
    pub fn enqueue_script() -> &'static str {
        scripts::ENQUEUE_SOURCE
    }

    /// Appends `message` to the outbox and applies `writes`, all or nothing, in one script
    /// run: the aggregate's next version, the sequence and the partition are assigned there,
    /// so version order is the order in which the calls reach Redis (G3).
    ///
    /// An invalid message is refused before anything is sent. An error can leave the
    /// outcome unknown (a timeout, a lost connection): to retry without a second copy, set
    /// `NewMessage::id` yourself and retry with the same id; while the message is
    /// unpublished the script refuses the id as already in the outbox, and after that the
    /// copy carries the same id, which the broker's dedup and the inbox drop.
    pub async fn enqueue(
        &self,
        writes: &RedisWrites,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        self.enqueue_all(writes, vec![message])
            .await?
            .pop()
            .ok_or_else(|| {
                EnqueueError::Store(StoreError::Other("enqueue returned nothing".into()))
            })
    }

    /// Like [`enqueue`](Self::enqueue) for several messages (1 to
    /// [`MAX_MESSAGES_PER_CALL`]), appended in order in one atomic step.
    pub async fn enqueue_all(
        &self,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Enqueued>, EnqueueError> {
        self.check_messages(&messages)?;
        let mut invocation = SCRIPTS.enqueue.prepare_invoke();
        for key in writes.keys() {
            invocation.key(key.as_slice());
        }
        self.enqueue_args(&mut invocation, writes, messages);
        let mut conn = self.conn.clone();
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(parse_enqueued(reply)?)
    }

    /// The enqueue as an `EVAL` command, for a transaction of the caller's own: on a
    /// dedicated connection, `WATCH` the keys the business change was computed from, then
    /// send this command alone in `MULTI`/`EXEC` (a `redis::pipe().atomic()`). If a watched
    /// key changed, `EXEC` returns nil and nothing is written; otherwise decode its single
    /// reply with [`parse_enqueued`].
    ///
    /// Why the business writes still go inside the script rather than as separate commands
    /// of the `MULTI`: Redis runs every queued command even if one fails at run time (a
    /// `WRONGTYPE`, say), so a failing business write would not stop the outbox entry, and
    /// the version number cannot be read and used within one `MULTI`. The script checks
    /// everything first and then writes all or nothing; `MULTI` adds only the `WATCH`.
    pub fn enqueue_command(
        &self,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) -> Result<Cmd, EnqueueError> {
        self.check_messages(&messages)?;
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(scripts::ENQUEUE_SOURCE)
            .arg(writes.keys().len())
            .arg(writes.keys());
        self.enqueue_args(&mut cmd, writes, messages);
        Ok(cmd)
    }

    fn check_messages(&self, messages: &[NewMessage]) -> Result<(), EnqueueError> {
        if messages.is_empty() || messages.len() > MAX_MESSAGES_PER_CALL {
            return Err(EnqueueError::Store(StoreError::Other(
                format!(
                    "an enqueue call takes 1 to {MAX_MESSAGES_PER_CALL} messages, got {}",
                    messages.len()
                )
                .into(),
            )));
        }
        for message in messages {
            message.validate(self.settings.max_payload_bytes)?;
        }
        Ok(())
    }

    /// The enqueue script's ARGV (see `lua/enqueue.lua`).
    fn enqueue_args(
        &self,
        sink: &mut impl ArgSink,
        writes: &RedisWrites,
        messages: Vec<NewMessage>,
    ) {
        sink.push(self.prefix());
        sink.push(messages.len());
        sink.push(writes.len());
        for message in messages {
            let headers = if message.headers.is_empty() {
                String::new()
            } else {
                serde_json::Value::from_iter(
                    message
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))),
                )
                .to_string()
            };
            sink.push(message.id.unwrap_or_else(Uuid::now_v7).to_string());
            sink.push(&message.aggregate_type);
            sink.push(&message.aggregate_id);
            sink.push(&message.event_type);
            sink.push(message.payload.as_ref());
            sink.push(headers);
            sink.push(message.partition_key.as_deref().unwrap_or(""));
        }
        writes.write_args(sink);
    }
}

/// Decodes the enqueue script's reply: one `{id, version, partition, sequence}` per message.
pub fn parse_enqueued(reply: Value) -> Result<Vec<Enqueued>, StoreError> {
    let rows: Vec<(String, u64, u32, i64)> = FromRedisValue::from_redis_value(reply)
        .map_err(|e| StoreError::Other(format!("unexpected enqueue reply: {e}").into()))?;
    rows.into_iter()
        .map(|(id, version, partition, sequence)| {
            Ok(Enqueued {
                id: Uuid::parse_str(&id).map_err(|e| {
                    StoreError::Other(format!("enqueue replied with id {id:?}: {e}").into())
                })?,
                version,
                partition,
                sequence,
            })
        })
        .collect()
}
