//! The RabbitMQ sink, AMQP 0-9-1 (docs/DESIGN.md §3, §6).
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
//!
//! Where things are: `config.rs` has the settings and their validation, `publish.rs` the
//! confirm windows, returns and the probe of a blocked partition, `declare.rs` the
//! exchanges (and queues) declared or checked, `wire.rs` the properties and headers of a
//! message and [`decode_delivery`], `error.rs` the retry decision for lapin's errors.

mod config;
mod declare;
mod error;
mod publish;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::ConfirmSelectOptions;
use lapin::types::{LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::timeout;
use tracing::{info, warn};
use uuid::Uuid;

use ferry_core::ErrorChain;
use ferry_core::cloudevents::Source;
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError};

pub use crate::sink_config::InvalidSinkConfig;
pub use config::{AmqpDeclare, AmqpSinkConfig, MAX_CONFIRM_WINDOW};
/// The client this sink uses, for consumers reading the queues back.
pub use lapin;
pub use wire::{HEADER_PREFIX, decode_delivery};

use crate::template::Template;
use error::{broker_error, connect_error};

/// Publishes to RabbitMQ; see the module docs.
pub struct AmqpSink {
    uri: AMQPUri,
    tls: lapin::tcp::OwnedTLSConfig,
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
            tls: checked.tls,
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
        let runtime = lapin::runtime::default_runtime().map_err(|err| {
            SinkError::permanent("no tokio runtime for the amqp connection").with_source(err)
        })?;
        let connection = match timeout(
            self.confirm_timeout,
            Connection::connect_uri_with_config(
                self.uri.clone(),
                properties,
                self.tls.clone(),
                runtime,
            ),
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
}

#[async_trait]
impl Sink for AmqpSink {
    /// Publishes the batch on its partition's channel, confirms pipelined within each
    /// window of `confirm_window` messages; after a failure
    /// in the partition's previous batch, its first message goes alone first.
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        self.publish_batch(batch).await
    }

    /// RabbitMQ cannot be read back by message id; re-sends reach queues again and the
    /// consumer inbox drops them.
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }

    /// The connection is open, or reopens within `confirm_timeout`.
    async fn check(&self) -> Result<(), SinkError> {
        self.connection().await.map(drop)
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
            warn!(server = %self.server, error = %ErrorChain(&err), "closing the amqp connection failed");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
