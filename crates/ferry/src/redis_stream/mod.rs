//! The Redis Streams sink (DESIGN.md §3, §6).
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

mod config;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult, Script, ScriptInvocation};
use tracing::{debug, info, warn};
use uuid::Uuid;

use ferry_core::cloudevents::{
    BINARY_ATTRIBUTE_NAMES, DecodeError, ReceivedMessage, Source, binary_attributes, ext,
};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use crate::sink_config::InvalidSinkConfig;
pub use config::{MAX_DEDUP_SCAN_ENTRIES, MAX_ENTRIES_PER_CALL, RedisStreamSinkConfig};
/// The client this sink uses, for consumers reading the streams back.
pub use redis;

use crate::template::Template;

/// The field holding the payload.
pub const DATA_FIELD: &str = "data";

/// Longest pause between the client's own reconnection attempts.
const RECONNECT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The append script; see `append.lua` and the module docs.
static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("append.lua")));

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

/// The messages of one batch that go to one stream, as batch indices in batch order.
#[derive(Debug)]
struct StreamGroup {
    stream: String,
    indices: Vec<usize>,
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
        let client = redis::Client::open(checked.connection).map_err(|err| {
            SinkError::permanent(format!("invalid redis connection settings for {server}"))
                .with_source(err)
        })?;
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

    /// Splits `batch` by stream. A message whose sequence cannot be an entry id gets its
    /// error, and nothing after it in its stream is sent.
    fn group(
        &self,
        batch: &[Message],
        outcomes: &mut [Option<Result<Delivery, SinkError>>],
    ) -> Vec<StreamGroup> {
        let mut groups: Vec<StreamGroup> = Vec::new();
        let mut by_stream: HashMap<String, usize> = HashMap::new();
        let mut stopped: Vec<String> = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            let stream = self.stream_of(message);
            if stopped.contains(&stream) {
                continue;
            }
            if message.sequence < 1 {
                outcomes[index] = Some(Err(SinkError::permanent(format!(
                    "sequence {} cannot be a redis stream entry id (ids start at 1-0)",
                    message.sequence
                ))));
                stopped.push(stream);
                continue;
            }
            match by_stream.get(&stream) {
                Some(&at) => groups[at].indices.push(index),
                None => {
                    by_stream.insert(stream.clone(), groups.len());
                    groups.push(StreamGroup {
                        stream,
                        indices: vec![index],
                    });
                }
            }
        }
        groups
    }

    /// The script call appending `group`'s messages.
    fn invocation<'a>(&self, group: &StreamGroup, batch: &[Message]) -> ScriptInvocation<'a> {
        let mut invocation = APPEND.prepare_invoke();
        invocation
            .key(&group.stream)
            .arg(self.max_len)
            .arg(self.dedup_scan_entries);
        for &index in &group.indices {
            let message = &batch[index];
            let user: Vec<(&str, &str)> = message
                .headers
                .iter()
                .filter(|(name, _)| !is_reserved(name))
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            let attributes = binary_attributes(message, &self.source);
            // The attributes, content-type, the user headers and data.
            let fields = attributes.len() + 1 + user.len() + 1;
            invocation
                .arg(message.sequence)
                .arg(message.id.to_string())
                .arg(fields);
            for (attribute, value) in attributes {
                invocation
                    .arg(field_name(attribute).as_ref())
                    .arg(value.as_ref());
            }
            invocation
                .arg(CONTENT_TYPE_HEADER)
                .arg(message.content_type());
            for (name, value) in user {
                invocation.arg(name).arg(value);
            }
            invocation.arg(DATA_FIELD).arg(&message.payload[..]);
        }
        invocation
    }

    /// Runs the scripts of all groups in one pipeline (one round trip), loading the script
    /// and running them again if Redis lost it (a restart, `SCRIPT FLUSH`): a second run
    /// finds what the first appended as present.
    async fn run(
        &self,
        invocations: &[ScriptInvocation<'_>],
    ) -> RedisResult<Vec<RedisResult<Vec<String>>>> {
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors();
        for invocation in invocations {
            pipeline.invoke_script(invocation);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<RedisResult<Vec<String>>> = pipeline.query_async(&mut connection).await?;
        let lost_script = replies.iter().any(|reply| {
            matches!(reply, Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        });
        if !lost_script {
            return Ok(replies);
        }
        info!(server = %self.server, "redis lost the append script; loading it again");
        APPEND.prepare_invoke().load_async(&mut connection).await?;
        pipeline.query_async(&mut connection).await
    }

    /// Turns one group's script reply into outcomes.
    fn settle(
        &self,
        group: &StreamGroup,
        batch: &[Message],
        reply: RedisResult<Vec<String>>,
        outcomes: &mut [Option<Result<Delivery, SinkError>>],
    ) {
        let stream = &group.stream;
        let statuses = match reply {
            Ok(statuses) => statuses,
            Err(err) => {
                let error = classify_reply(stream, &err.to_string()).with_source(err);
                outcomes[group.indices[0]] = Some(Err(error));
                return;
            }
        };
        for (pair, &index) in statuses.chunks(2).zip(&group.indices) {
            let [status, detail] = pair else {
                outcomes[index] = Some(Err(SinkError::retryable(format!(
                    "unreadable reply from the append script on stream {stream}"
                ))));
                return;
            };
            let message = &batch[index];
            let outcome = match status.as_str() {
                "added" | "present" => Ok(Delivery::default()),
                "late" => {
                    debug!(stream = %stream, message_id = %message.id, sequence = message.sequence, entry = %detail, "late commit appended after the stream's top");
                    Ok(Delivery::default())
                }
                "late_unverified" => {
                    warn!(stream = %stream, message_id = %message.id, sequence = message.sequence, entry = %detail, scanned = self.dedup_scan_entries, "late commit appended without a full duplicate check: more than dedup_scan_entries entries lie above its sequence");
                    Ok(Delivery::default())
                }
                "conflict" => Err(SinkError::permanent(format!(
                    "stream {stream} already holds another message at entry {detail}: another \
                     outbox writes this stream, or the outbox was recreated; point \
                     stream_template elsewhere or delete the stream"
                ))),
                "error" => Err(classify_reply(stream, detail)),
                other => Err(SinkError::retryable(format!(
                    "unexpected status {other:?} from the append script on stream {stream}"
                ))),
            };
            let failed = outcome.is_err();
            outcomes[index] = Some(outcome);
            if failed {
                return;
            }
        }
    }

    /// Appends one window of a batch with one script call per stream, all in one pipeline.
    /// Within a stream, nothing after a failed message is appended; those messages are
    /// reported retryable ("not sent").
    async fn publish_window(&self, window: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes: Vec<Option<Result<Delivery, SinkError>>> =
            std::iter::repeat_with(|| None).take(window.len()).collect();
        let groups = self.group(window, &mut outcomes);
        let invocations: Vec<ScriptInvocation<'_>> = groups
            .iter()
            .map(|group| self.invocation(group, window))
            .collect();
        if !invocations.is_empty() {
            match self.run(&invocations).await {
                Ok(replies) => {
                    for (group, reply) in groups.iter().zip(replies) {
                        self.settle(group, window, reply, &mut outcomes);
                    }
                }
                Err(err) => {
                    let error = request_error(&self.server, err);
                    let first = groups.iter().map(|g| g.indices[0]).min().unwrap_or(0);
                    outcomes[first] = Some(Err(error));
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(SinkError::retryable(
                        "not sent: an earlier message of its stream failed",
                    ))
                })
            })
            .collect()
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
}

/// Whether a user header would clash with a field ferry writes; ferry's field wins, as
/// its header does in the other sinks.
fn is_reserved(name: &str) -> bool {
    name == DATA_FIELD
        || name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER)
        || name
            .strip_prefix("ce_")
            .is_some_and(|attribute| BINARY_ATTRIBUTE_NAMES.contains(&attribute))
}

/// `ce_<attribute>`, without allocating for the attributes ferry sends.
fn field_name(attribute: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(match attribute {
        "specversion" => "ce_specversion",
        "id" => "ce_id",
        "source" => "ce_source",
        "type" => "ce_type",
        "subject" => "ce_subject",
        "time" => "ce_time",
        ext::AGGREGATE_TYPE => "ce_aggregatetype",
        ext::AGGREGATE_VERSION => "ce_aggregateversion",
        ext::PARTITION_KEY => "ce_partitionkey",
        ext::SEQUENCE => "ce_sequence",
        other => return Cow::Owned(format!("ce_{other}")),
    })
}

/// Rebuilds the message a stream entry carries, as a consumer does: `data` is the
/// payload, the other fields are CloudEvents attributes (`ce_*`) and headers.
pub fn decode_entry<'f>(
    fields: impl IntoIterator<Item = (&'f str, &'f [u8])>,
) -> Result<ReceivedMessage, DecodeError> {
    let mut payload = Bytes::new();
    let mut headers: Vec<(&str, Cow<'_, str>)> = Vec::new();
    for (name, value) in fields {
        if name == DATA_FIELD {
            payload = Bytes::copy_from_slice(value);
        } else {
            headers.push((name, String::from_utf8_lossy(value)));
        }
    }
    ReceivedMessage::from_binary(
        headers.iter().map(|(name, value)| (*name, value.as_ref())),
        payload,
    )
}

/// [`decode_entry`] for an entry read with the `redis` crate (`XRANGE`, `XREAD`).
pub fn decode_stream_id(entry: &redis::streams::StreamId) -> Result<ReceivedMessage, DecodeError> {
    decode_entry(entry.map.iter().filter_map(|(name, value)| match value {
        redis::Value::BulkString(bytes) => Some((name.as_str(), bytes.as_slice())),
        redis::Value::SimpleString(text) => Some((name.as_str(), text.as_bytes())),
        _ => None,
    }))
}

fn connect_error(server: &str, err: RedisError) -> SinkError {
    if err.is_io_error() || err.is_timeout() || err.is_connection_refusal() {
        SinkError::retryable(format!("cannot reach redis at {server}")).with_source(err)
    } else {
        SinkError::permanent(format!("redis at {server} refused the connection")).with_source(err)
    }
}

/// A failed round trip: the scripts may or may not have run, which a retry sorts out (it
/// finds what they appended as present).
fn request_error(server: &str, err: RedisError) -> SinkError {
    let message = if err.is_timeout() {
        format!("no reply from redis at {server} in time")
    } else if err.is_io_error() || err.is_connection_dropped() {
        format!("connection to redis at {server} lost")
    } else {
        format!("redis at {server} failed the append")
    };
    SinkError::retryable(message).with_source(err)
}

/// Classifies an error reply to an append: a key of another type or a missing permission
/// stays until an operator acts; anything else (out of memory, a replica, loading) may pass.
fn classify_reply(stream: &str, reply: &str) -> SinkError {
    let code = reply.split_whitespace().next().unwrap_or_default();
    match code {
        "WRONGTYPE" => SinkError::permanent(format!(
            "key {stream} exists and is not a stream ({reply}); point stream_template elsewhere \
             or remove the key"
        )),
        "NOPERM" => SinkError::permanent(format!(
            "the redis user may not append to {stream} ({reply}); grant it XADD, XRANGE, \
             XREVRANGE, XINFO and EVALSHA on these keys"
        )),
        _ => SinkError::retryable(format!("redis refused the append to {stream}: {reply}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferrys_fields_are_reserved() {
        for name in [
            "data",
            "content-type",
            "Content-Type",
            "ce_id",
            "ce_sequence",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        for name in ["traceparent", "ce_custom", "dataset"] {
            assert!(!is_reserved(name), "{name}");
        }
        for attribute in BINARY_ATTRIBUTE_NAMES {
            assert_eq!(field_name(attribute), format!("ce_{attribute}"));
        }
    }

    #[test]
    fn error_replies_carry_the_retry_decision() {
        assert!(!classify_reply("s", "WRONGTYPE Operation against a key").is_retryable());
        assert!(!classify_reply("s", "NOPERM this user has no permissions").is_retryable());
        assert!(classify_reply("s", "OOM command not allowed").is_retryable());
        assert!(classify_reply("s", "READONLY You can't write against a replica").is_retryable());
    }

    #[test]
    fn entries_decode_with_data_as_the_payload() {
        let fields: [(&str, &[u8]); 6] = [
            ("ce_id", b"0190c3a4-6c2e-7d3a-9b1e-3f4a5b6c7d8e"),
            ("ce_type", b"order.paid"),
            ("ce_subject", b"42"),
            ("ce_aggregatetype", b"order"),
            ("ce_aggregateversion", b"7"),
            ("data", &[0, 159, 146, 150]),
        ];
        let message = decode_entry(fields).expect("decodes");
        assert_eq!(message.version, 7);
        assert_eq!(message.partition_key, "order/42");
        assert_eq!(&message.payload[..], &[0, 159, 146, 150]);
        assert!(message.headers.is_empty());
    }
}
