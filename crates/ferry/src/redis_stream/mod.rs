//! The Redis Streams sink (docs/DESIGN.md §3, §6).
//!
//! Each message becomes one entry of the stream rendered from `stream_template`, with the
//! CloudEvents attributes as fields (`ce_id`, `ce_type`, …), `content-type`, the user
//! headers, and the payload in `data`. There is no CloudEvents binding for Redis; the
//! fields follow the Kafka binding's `ce_` names, and [`decode_entry`] reads them back.
//!
//! # Entry ids: why a re-sent message is refused
//!
//! A message is appended with the explicit id `<outbox sequence>-0`. Redis accepts an
//! explicit id only above the stream's top, so a second copy of a message at its own id is
//! refused ("equal or smaller than the target stream top item"). Sequences order messages
//! only within one outbox partition, so every stream belongs to one partition
//! (`stream_template` must contain `{partition}`) and is written only by that partition's
//! lease owner, in sequence order: ids grow with every append.
//!
//! A refusal alone does not prove the message is there: a transaction that commits late
//! (its sequence was taken before, its commit came after, messages of higher sequence in
//! the same partition) arrives below the top too. So the append runs as one Lua script per
//! stream and batch (`append.lua`), atomic in Redis, which for a refused id reads the entry
//! at `<sequence>-0`:
//!
//! - it holds this message id: already there; the message counts as delivered;
//! - it holds another message: a conflict (another outbox writes this stream, or the
//!   outbox was recreated); the partition blocks with that reason;
//! - there is none: a late commit. The script looks for this message id among the entries
//!   above `<sequence>-0` (at most `dedup_scan_entries`, read top down) and, if absent,
//!   appends it right after the top (`<top ms>-<top seq + 1>`).
//!
//! Per-key order holds because the relay publishes a partition's messages in an order
//! where each key's messages follow their version order (a key's later version commits
//! after, and has a higher sequence than, its earlier one), and the stream keeps exactly
//! the order of appends. A paused relay that resumes is serialised with the new owner by
//! the script's atomicity: its re-sends are found as present.
//!
//! Limits: a late message whose earlier copy lies more than `dedup_scan_entries` entries
//! below the top (a relay paused while that many newer messages were appended) is appended
//! again, and reported in the log; so is a message whose first copy was trimmed away
//! (`max_len`) or deleted, or sent before the stream was deleted. Consumers' inboxes drop
//! those copies. Redis Cluster is not supported (one connection runs the whole batch).
//!
//! Reconciliation after an unclean takeover needs no read of the tail: the new owner's
//! re-sends of what the previous owner appended are refused and recognised as present by
//! message id, entry by entry, which is what reconciling would do.
//!
//! Where things are: `config.rs` has the settings and their validation, `append.rs` a
//! window's script calls and their replies, `wire.rs` the entry fields and
//! [`decode_entry`], `error.rs` the retry decision for Redis's errors.

mod append;
mod config;
mod error;
mod wire;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::info;
use uuid::Uuid;

use ferry_core::cloudevents::Source;
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use crate::sink_config::InvalidSinkConfig;
pub use config::{MAX_DEDUP_SCAN_ENTRIES, MAX_ENTRIES_PER_CALL, RedisStreamSinkConfig};
/// The client this sink uses, for consumers reading the streams back.
pub use redis;
pub use wire::{DATA_FIELD, decode_entry, decode_stream_id};

use crate::template::Template;
use append::APPEND;
use error::connect_error;

/// Longest pause between the client's own reconnection attempts.
const RECONNECT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes to Redis streams; see the module docs.
pub struct RedisStreamSink {
    connection: ConnectionManager,
    template: Template,
    source: Source,
    max_len: u64,
    dedup_scan_entries: u64,
    max_entries_per_call: usize,
    /// `host:port`, without credentials, for messages.
    server: String,
}

impl std::fmt::Debug for RedisStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSink")
            .field("server", &self.server)
            .field("max_len", &self.max_len)
            .field("dedup_scan_entries", &self.dedup_scan_entries)
            .field("max_entries_per_call", &self.max_entries_per_call)
            .finish_non_exhaustive()
    }
}

impl RedisStreamSink {
    /// Validates `config`, connects once (an unreachable server is a retryable error naming
    /// it, for the caller to back off on) and loads the append script. The connection
    /// reconnects by itself afterwards.
    pub async fn connect(config: &RedisStreamSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let server = checked.server;
        let client = checked.client;
        // Reconnection attempts in the background stay frequent: the relay backs off itself.
        let manager = ConnectionManagerConfig::new()
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_connection_timeout(Some(checked.response_timeout))
            .set_response_timeout(Some(checked.response_timeout));
        let mut connection = ConnectionManager::new_with_config(client, manager)
            .await
            .map_err(|err| connect_error(&server, err))?;
        APPEND
            .prepare_invoke()
            .load_async(&mut connection)
            .await
            .map_err(|err| connect_error(&server, err))?;
        info!(server = %server, template = %config.stream_template, "redis stream sink connected");
        Ok(Self {
            connection,
            template: checked.template,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            max_len: config.max_len.unwrap_or(0),
            dedup_scan_entries: config.dedup_scan_entries,
            max_entries_per_call: config.max_entries_per_call,
            server,
        })
    }

    /// The stream `message` goes to.
    pub fn stream_of(&self, message: &Message) -> String {
        self.template
            .render(message, |out, value| out.push_str(value))
    }
}

#[async_trait]
impl Sink for RedisStreamSink {
    /// Appends the batch in windows of `max_entries_per_call` messages, one pipeline
    /// round trip each; after a window with a failure nothing more is sent (reported
    /// retryable, "not sent").
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for window in batch.chunks(self.max_entries_per_call) {
            let sent = self.publish_window(window).await;
            let failed = sent.iter().any(Result::is_err);
            outcomes.extend(sent);
            if failed {
                break;
            }
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// Nothing to read: re-sends of what the previous owner appended are refused by their
    /// entry ids and recognised as present by message id (see the module docs).
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }

    /// One `PING`, bounded by `response_timeout`.
    async fn check(&self) -> Result<(), SinkError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| connect_error(&self.server, err))
    }
}
