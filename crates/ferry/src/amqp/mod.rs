//! The RabbitMQ sink, AMQP 0-9-1 (DESIGN.md §3, §6).
//!
//! Each message is published to the exchange and with the routing key rendered from the
//! templates, persistent (`delivery_mode` 2), with `message_id` = message id, the
//! CloudEvents attributes as `cloudEvents:*` headers (the AMQP binding's prefix), the user
//! headers, `content_type` = the payload's media type, `type` = the event type and
//! `timestamp` = the message's creation time.
//!
//! Publisher confirms are pipelined: a batch is published whole on the partition's own
//! channel (one channel per partition, so the broker stores a partition's messages in
//! publish order), then its confirms are awaited. Every publish is `mandatory`: a message
//! that no queue takes comes back as `basic.return` followed by an ack, and is reported as
//! a permanent failure, never as delivered. lapin hands a returned message to whichever
//! confirm completes next (with a multiple ack, any of them), so returned messages are
//! matched to the batch by their `message_id`, not by the confirm that carried them.
//!
//! After a failed message, the partition's next batch starts with that message alone,
//! and the rest follows only once it is confirmed: while a partition is blocked, nothing
//! behind the blocked message reaches the broker. Within the batch that failed, messages
//! after the failed one were already sent (pipelining); those the broker confirmed are
//! reported delivered, so one key's later message can precede an unroutable earlier one.
//!
//! RabbitMQ has no broker-side deduplication: a message re-sent after a lost confirm
//! reaches queues twice, and the consumer inbox drops the copy (G4); there is nothing to
//! reconcile. A lost connection fails the batch as retryable and the next publish
//! reconnects.

mod config;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{info, warn};
use uuid::Uuid;

use ferry_core::cloudevents::{DecodeError, ReceivedMessage, Source, binary_attributes, ext};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use crate::sink_config::InvalidSinkConfig;
pub use config::{AmqpDeclare, AmqpSinkConfig, MAX_CONFIRM_WINDOW};
/// The client this sink uses, for consumers reading the queues back.
pub use lapin;

use crate::template::Template;

/// The CloudEvents AMQP binding's header prefix.
pub const HEADER_PREFIX: &str = "cloudEvents:";

/// AMQP reply codes that repeat for the same message until an operator acts.
const NO_ROUTE: u16 = 312;
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;

/// Publishes to RabbitMQ; see the module docs.
pub struct AmqpSink {
    uri: AMQPUri,
    server: String,
    exchange: Template,
    routing_key: Template,
    source: Source,
    confirm_timeout: Duration,
    confirm_window: usize,
    declare: Option<(ExchangeKind, Option<String>, String)>,
    /// The connection, replaced when it is lost. Held across `connect`, so that concurrent
    /// batches wait for one reconnection instead of each making their own.
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// One confirm-mode channel per partition, dropped after any failure but a return.
    channels: Mutex<HashMap<u32, Channel>>,
    /// Exchanges known to exist (checked or declared) on the current connection.
    exchanges: Mutex<HashSet<String>>,
    /// Partitions whose last batch had a failure: their next batch starts with one message.
    cautious: Mutex<HashSet<u32>>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("server", &self.server)
            .field("confirm_timeout", &self.confirm_timeout)
            .finish_non_exhaustive()
    }
}

/// A message ready to publish: where to and how.
struct Prepared {
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

impl AmqpSink {
    /// Validates `config` and connects once (an unreachable broker is a retryable error
    /// naming it, for the caller to back off on). With `[sink.declare]`, an exchange whose
    /// name has no placeholder is declared now.
    pub async fn connect(config: &AmqpSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let sink = Self {
            uri: checked.uri,
            server: checked.server,
            exchange: checked.exchange,
            routing_key: checked.routing_key,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            confirm_timeout: checked.confirm_timeout,
            confirm_window: checked.confirm_window,
            declare: checked.declare,
            connection: tokio::sync::Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            exchanges: Mutex::new(HashSet::new()),
            cautious: Mutex::new(HashSet::new()),
        };
        let connection = sink.connection().await?;
        if sink.declare.is_some() && sink.exchange.is_fixed() {
            let name = config.exchange_template.clone();
            sink.ensure_exchange(&connection, &name).await?;
        }
        info!(server = %sink.server, exchange = %config.exchange_template, routing_key = %config.routing_key_template, "amqp sink connected");
        Ok(sink)
    }

    /// The open connection, connecting (again) if there is none or it was lost.
    async fn connection(&self) -> Result<Arc<Connection>, SinkError> {
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref()
            && connection.status().connected()
        {
            return Ok(Arc::clone(connection));
        }
        if current.take().is_some() {
            lock(&self.channels).clear();
            lock(&self.exchanges).clear();
            warn!(server = %self.server, "amqp connection lost; reconnecting");
        }
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from("ferry-relay"));
        let connection = match timeout(
            self.confirm_timeout,
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => Arc::new(connection),
            Ok(Err(err)) => return Err(connect_error(&self.server, err)),
            Err(_) => {
                return Err(SinkError::retryable(format!(
                    "no answer from amqp broker at {} in time",
                    self.server
                )));
            }
        };
        *current = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// The partition's confirm-mode channel, opened if needed.
    async fn channel(&self, connection: &Connection, partition: u32) -> Result<Channel, SinkError> {
        if let Some(channel) = lock(&self.channels).get(&partition)
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.open_channel(connection).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| broker_error("cannot enable publisher confirms", err))?;
        lock(&self.channels).insert(partition, channel.clone());
        Ok(channel)
    }

    async fn open_channel(&self, connection: &Connection) -> Result<Channel, SinkError> {
        connection
            .create_channel()
            .await
            .map_err(|err| broker_error(&format!("cannot open a channel to {}", self.server), err))
    }

    /// Forgets the partition's channel after a failure and closes it in the background
    /// (late confirms or returns on it must not meet a later batch).
    fn discard_channel(&self, partition: u32) {
        let Some(channel) = lock(&self.channels).remove(&partition) else {
            return;
        };
        let wait = self.confirm_timeout;
        tokio::spawn(async move {
            let _ = timeout(
                wait,
                channel.close(200, ShortString::from("ferry: discarded after a failure")),
            )
            .await;
        });
    }

    /// Makes sure exchange `name` exists: declared with `[sink.declare]`, else checked
    /// with a passive declare on a channel of its own (a missing exchange closes it).
    async fn ensure_exchange(&self, connection: &Connection, name: &str) -> Result<(), SinkError> {
        if name.is_empty() || lock(&self.exchanges).contains(name) {
            return Ok(());
        }
        let exchange = short_string("exchange", name)?;
        let channel = self.open_channel(connection).await?;
        let checked = match &self.declare {
            Some((kind, queue, binding_key)) => {
                declare(&channel, exchange, kind, queue.as_deref(), binding_key).await
            }
            None => channel
                .exchange_declare(
                    exchange,
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|err| {
                    broker_error(
                        &format!(
                            "exchange {name:?} is not usable on {}; declare it (or bind it \
                             where messages should go)",
                            self.server
                        ),
                        err,
                    )
                }),
        };
        if channel.status().connected() {
            let _ = channel
                .close(200, ShortString::from("ferry: exchange checked"))
                .await;
        }
        checked?;
        lock(&self.exchanges).insert(name.to_owned());
        Ok(())
    }

    /// Where `message` goes and with which properties; fails, permanently, for values
    /// AMQP cannot carry (names or header names over 255 bytes).
    fn prepare(&self, message: &Message) -> Result<Prepared, SinkError> {
        let verbatim = |out: &mut String, value: &str| out.push_str(value);
        let exchange = short_string("exchange", &self.exchange.render(message, verbatim))?;
        let routing_key = short_string("routing key", &self.routing_key.render(message, verbatim))?;
        let mut headers = FieldTable::default();
        for (name, value) in &message.headers {
            if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
                continue;
            }
            headers.insert(
                short_string("header name", name)?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        // After the user headers, so that the attributes win on a name clash.
        for (attribute, value) in binary_attributes(message, &self.source) {
            headers.insert(
                ShortString::from(header_name(attribute)),
                AMQPValue::LongString(LongString::from(value.as_ref())),
            );
        }
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(message.id.to_string()))
            .with_delivery_mode(2)
            .with_content_type(short_string("content-type", message.content_type())?)
            .with_type(short_string("event type", &message.event_type)?)
            .with_timestamp(u64::try_from(message.created_at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        Ok(Prepared {
            exchange,
            routing_key,
            properties,
        })
    }

    /// Publishes `messages` on the partition's channel and awaits their confirms; one
    /// outcome per message sent or refused, in order, then nothing for the messages not
    /// sent after a refusal.
    async fn publish_run(
        &self,
        partition: u32,
        messages: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(err) => {
                outcomes.push(Err(err));
                return outcomes;
            }
        };
        let channel = match self.channel(&connection, partition).await {
            Ok(channel) => channel,
            Err(err) => {
                outcomes.push(Err(err));
                return outcomes;
            }
        };
        let mut confirms = Vec::with_capacity(messages.len());
        let mut refused = None;
        for message in messages {
            let sent = match self.prepare(message) {
                Ok(prepared) => match self
                    .ensure_exchange(&connection, prepared.exchange.as_str())
                    .await
                {
                    Ok(()) => channel
                        .basic_publish(
                            prepared.exchange,
                            prepared.routing_key,
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &message.payload,
                            prepared.properties,
                        )
                        .await
                        .map_err(|err| broker_error("publishing failed", err)),
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        // One deadline for the batch: a stuck broker costs one timeout, not one per message.
        let deadline = Instant::now() + self.confirm_timeout;
        let mut returned: Vec<BasicReturnMessage> = Vec::new();
        let mut channel_failed = false;
        for confirm in confirms {
            let outcome = match timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(carried))) => {
                    returned.extend(carried);
                    Ok(Delivery::default())
                }
                Ok(Ok(Confirmation::Nack(carried))) => {
                    returned.extend(carried);
                    Err(SinkError::retryable(
                        "the broker refused to take responsibility for the message (basic.nack)",
                    ))
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    channel_failed = true;
                    Err(SinkError::retryable("the channel is not in confirm mode"))
                }
                Ok(Err(err)) => {
                    channel_failed = true;
                    Err(broker_error("no publisher confirm", err))
                }
                Err(_) => {
                    channel_failed = true;
                    Err(SinkError::retryable(format!(
                        "no publisher confirm from {} in time",
                        self.server
                    )))
                }
            };
            outcomes.push(outcome);
        }
        for message in returned {
            self.settle_return(messages, &mut outcomes, message);
        }
        if let Some(err) = refused {
            channel_failed |= err.is_retryable();
            outcomes.push(Err(err));
        }
        if channel_failed || !channel.status().connected() {
            self.discard_channel(partition);
        }
        outcomes
    }

    /// Publishes `messages` in windows of `confirm_window`, each window's confirms awaited
    /// before the next is sent; stops after a window with a failure.
    async fn publish_windows(
        &self,
        partition: u32,
        messages: &[Message],
    ) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for window in messages.chunks(self.confirm_window) {
            let sent = self.publish_run(partition, window).await;
            let failed = sent.len() < window.len() || sent.iter().any(Result::is_err);
            outcomes.extend(sent);
            if failed {
                break;
            }
        }
        outcomes
    }

    /// Marks the message `returned` names as failed: the broker could not route it.
    fn settle_return(
        &self,
        messages: &[Message],
        outcomes: &mut [Result<Delivery, SinkError>],
        returned: BasicReturnMessage,
    ) {
        let id = returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let reason = format!(
            "the broker returned the message as unroutable ({} {}): no queue is bound to \
             exchange {:?} for routing key {:?}; bind one (or an alternate exchange) and the \
             partition resumes",
            returned.reply_code,
            returned.reply_text,
            returned.delivery.exchange.as_str(),
            returned.delivery.routing_key.as_str()
        );
        match messages
            .iter()
            .position(|message| Some(message.id) == id)
            .and_then(|at| outcomes.get_mut(at))
        {
            Some(outcome) => *outcome = Err(SinkError::permanent(reason)),
            // Not ours (cannot happen: every publish carries its id); fail the whole run
            // rather than count an unroutable message as delivered.
            None => {
                warn!(message_id = ?id, "a returned message matches no message of the batch");
                for outcome in outcomes.iter_mut() {
                    *outcome = Err(SinkError::retryable(reason.clone()));
                }
            }
        }
    }
}

#[async_trait]
impl Sink for AmqpSink {
    /// Publishes the batch on its partition's channel, confirms pipelined within each
    /// window of `confirm_window` messages; after a failure
    /// in the partition's previous batch, its first message goes alone first.
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let Some(first) = batch.first() else {
            return Vec::new();
        };
        let partition = first.partition;
        let cautious = lock(&self.cautious).contains(&partition);
        let mut outcomes = if cautious {
            let probe = self.publish_run(partition, &batch[..1]).await;
            if probe.iter().all(Result::is_ok) && batch.len() > 1 {
                let mut outcomes = probe;
                outcomes.extend(self.publish_windows(partition, &batch[1..]).await);
                outcomes
            } else {
                probe
            }
        } else {
            self.publish_windows(partition, batch).await
        };
        let failed = outcomes.len() < batch.len() || outcomes.iter().any(Result::is_err);
        if failed {
            lock(&self.cautious).insert(partition);
        } else if cautious {
            lock(&self.cautious).remove(&partition);
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// RabbitMQ cannot be read back by message id; re-sends reach queues again and the
    /// consumer inbox drops them.
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }

    async fn shutdown(&self) {
        let channels: Vec<Channel> = lock(&self.channels).drain().map(|(_, c)| c).collect();
        for channel in channels {
            let _ = timeout(
                self.confirm_timeout,
                channel.close(200, ShortString::from("ferry: shutdown")),
            )
            .await;
        }
        if let Some(connection) = self.connection.lock().await.take()
            && let Err(err) = connection
                .close(200, ShortString::from("ferry: shutdown"))
                .await
        {
            warn!(server = %self.server, error = %err, "closing the amqp connection failed");
        }
    }
}

/// Declares `exchange` and, if given, `queue` bound to it (`[sink.declare]`).
async fn declare(
    channel: &Channel,
    exchange: ShortString,
    kind: &ExchangeKind,
    queue: Option<&str>,
    binding_key: &str,
) -> Result<(), SinkError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.clone(),
            kind.clone(),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|err| broker_error(&format!("cannot declare exchange {exchange}"), err))?;
    if let Some(queue) = queue {
        channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|err| broker_error(&format!("cannot declare queue {queue}"), err))?;
        channel
            .queue_bind(
                ShortString::from(queue),
                exchange.clone(),
                ShortString::from(binding_key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| {
                broker_error(&format!("cannot bind queue {queue} to {exchange}"), err)
            })?;
    }
    Ok(())
}

/// `cloudEvents:<attribute>`, without allocating for the attributes ferry sends.
fn header_name(attribute: &'static str) -> String {
    match attribute {
        "specversion" => "cloudEvents:specversion",
        "id" => "cloudEvents:id",
        "source" => "cloudEvents:source",
        "type" => "cloudEvents:type",
        "subject" => "cloudEvents:subject",
        "time" => "cloudEvents:time",
        ext::AGGREGATE_TYPE => "cloudEvents:aggregatetype",
        ext::AGGREGATE_VERSION => "cloudEvents:aggregateversion",
        ext::PARTITION_KEY => "cloudEvents:partitionkey",
        ext::SEQUENCE => "cloudEvents:sequence",
        other => return format!("{HEADER_PREFIX}{other}"),
    }
    .to_owned()
}

/// A short string (at most 255 bytes), or a permanent error naming what is too long.
fn short_string(what: &str, value: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(value.to_owned()).map_err(|err| {
        SinkError::permanent(format!(
            "the {what} {:?}… is {} bytes; AMQP allows at most 255",
            value.chars().take(40).collect::<String>(),
            value.len()
        ))
        .with_source(err)
    })
}

/// Rebuilds the message an AMQP delivery carries, as a consumer does: the
/// `cloudEvents:*` headers, the other string headers, `content_type`, and the body.
pub fn decode_delivery(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<ReceivedMessage, DecodeError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            let text = match value {
                AMQPValue::LongString(text) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                AMQPValue::ShortString(text) => text.as_str().to_owned(),
                _ => continue,
            };
            headers.push((name.as_str().to_owned(), text));
        }
    }
    if let Some(content_type) = properties.content_type() {
        headers.push((
            CONTENT_TYPE_HEADER.to_owned(),
            content_type.as_str().to_owned(),
        ));
    }
    ReceivedMessage::from_binary(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
        Bytes::copy_from_slice(body),
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn connect_error(server: &str, err: lapin::Error) -> SinkError {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == ACCESS_REFUSED => {
            SinkError::permanent(format!(
                "amqp broker at {server} refused the login or the virtual host"
            ))
            .with_source(err)
        }
        _ => SinkError::retryable(format!("cannot reach amqp broker at {server}")).with_source(err),
    }
}

/// Classifies a lapin error: the broker's refusals that repeat for the same message
/// (not found, access refused, precondition failed, e.g. too large) are permanent;
/// connection trouble and everything else may pass on retry.
fn broker_error(context: &str, err: lapin::Error) -> SinkError {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.get_id(),
                NO_ROUTE | ACCESS_REFUSED | NOT_FOUND | PRECONDITION_FAILED
            ) =>
        {
            SinkError::permanent(format!("{context}: {}", amqp.get_message())).with_source(err)
        }
        _ => SinkError::retryable(context.to_owned()).with_source(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_carry_the_binding_prefix() {
        for attribute in ["id", "type", "time", ext::SEQUENCE] {
            assert_eq!(header_name(attribute), format!("cloudEvents:{attribute}"));
        }
    }

    #[test]
    fn long_names_are_permanent_errors() {
        let err = short_string("routing key", &"x".repeat(256)).expect_err("too long");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert_eq!(short_string("x", "ok").expect("fits").as_str(), "ok");
    }

    #[test]
    fn deliveries_decode_with_the_content_type() {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("cloudEvents:id", "0190c3a4-6c2e-7d3a-9b1e-3f4a5b6c7d8e"),
            ("cloudEvents:type", "order.paid"),
            ("cloudEvents:subject", "42"),
            ("cloudEvents:aggregatetype", "order"),
            ("cloudEvents:aggregateversion", "3"),
            ("traceparent", "00-abc-def-01"),
        ] {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type(ShortString::from("application/json"));
        let message = decode_delivery(&properties, b"{}").expect("decodes");
        assert_eq!(message.version, 3);
        assert_eq!(
            message.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            message.headers.get("traceparent").map(String::as_str),
            Some("00-abc-def-01")
        );
    }
}
