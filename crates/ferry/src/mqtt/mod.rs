//! The MQTT 5 sink (docs/DESIGN.md §3, §6).
//!
//! Each message is published with QoS 1 (or 2) to a topic rendered from `topic_template`,
//! in CloudEvents binary content mode for MQTT 5: every attribute but `datacontenttype`
//! is a user property under its own name (`id`, `type`, `source`, …, `aggregateversion`),
//! `datacontenttype` is the PUBLISH content type, and the payload is the message body. The
//! message's own headers (`traceparent`, …) follow as further user properties; an
//! attribute name wins over a header of the same name. [`received_message`] turns what a
//! subscriber receives back into a [`ReceivedMessage`] for the inbox.
//!
//! The ack is the broker's PUBACK (QoS 1) or PUBCOMP (QoS 2). A batch is queued whole,
//! then its acks are awaited in order (pipelined, up to `max_in_flight` across
//! partitions); one connection carries every partition, so a partition's messages reach
//! the broker in order, and MQTT forwards each topic's messages to subscribers in the
//! order received (MQTT 5 §4.6). A rejection (PUBACK reason ≥ 0x80) fails that message
//! only: publishes pipelined behind it were already sent and keep their own acks, and the
//! relay sends nothing more of the partition until the rejected one passes. `NotAuthorized`,
//! `TopicNameInvalid` and `PayloadFormatInvalid` are permanent (the partition blocks, the
//! reason shows in `ferry status`); the other reasons and lost connections are retried.
//!
//! MQTT has no broker-side dedup and no way to read a topic back: a publish whose ack was
//! lost (connection drop, relay crash) is sent again and delivered twice, and the consumer
//! inbox drops the repeat; [`Sink::reconcile`] returns nothing.

mod config;
mod session;
mod topic;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt as _;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, ConnectionError, Event};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use uuid::Uuid;

use ferry_core::ErrorChain;
use ferry_core::cloudevents::{
    DecodeError, ReceivedMessage, Source, TRACE_ATTRIBUTE_NAMES, binary_attributes, user_headers,
};
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use config::{InvalidMqttConfig, MAX_IN_FLIGHT_LIMIT, MqttSinkConfig};
use session::Session;
use topic::{MAX_TOPIC_BYTES, TopicTemplate};

/// The CloudEvents attributes a ferry event carries as user properties, plus the optional
/// ones of the spec: what [`received_message`] reads as attributes rather than headers.
const ATTRIBUTE_NAMES: [&str; 12] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "dataschema",
    "datacontenttype",
    ferry_core::cloudevents::ext::AGGREGATE_TYPE,
    ferry_core::cloudevents::ext::AGGREGATE_VERSION,
    ferry_core::cloudevents::ext::PARTITION_KEY,
    ferry_core::cloudevents::ext::SEQUENCE,
];

/// How long shutdown waits for the DISCONNECT to go out.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to an MQTT 5 broker; see the module docs.
pub struct MqttSink {
    client: AsyncClient,
    session: Arc<Session>,
    driver: std::sync::Mutex<Option<JoinHandle<()>>>,
    template: TopicTemplate,
    source: Source,
    qos: QoS,
    /// Publishes awaiting their ack, across concurrent batches; a batch takes its permits
    /// all at once per window, so batches never deadlock holding part of what they need.
    in_flight: Semaphore,
    window: usize,
    ack_timeout: Duration,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("broker", &self.session.broker)
            .field("qos", &self.qos)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Validates `config` and connects once (no retry loop: an unreachable broker is a
    /// retryable error naming it, for the caller to back off on; refused credentials and a
    /// broker without MQTT 5 are permanent). From then on a task of its own keeps the
    /// connection, reconnecting with backoff whenever it drops.
    pub async fn connect(config: &MqttSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let broker = format!("{}:{}", checked.host, checked.port);
        let tail = Uuid::now_v7().simple().to_string();
        let client_id = format!("{}{}", config.client_id_prefix, &tail[16..]);
        let mut options = config
            .client_options(client_id)
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let in_flight_limit = u16::try_from(config.max_in_flight).unwrap_or(u16::MAX - 1);
        options
            // A fresh session per connection: the relay re-publishes what was not acked.
            .set_clean_start(true)
            .set_connection_timeout(checked.connect_timeout.as_secs())
            .set_outgoing_inflight_upper_limit(in_flight_limit)
            .set_request_channel_capacity(config.max_in_flight);
        // Each publish goes out at once instead of waiting, behind Nagle's algorithm, for the
        // broker's TCP acknowledgement of the previous segment (BENCHMARKS.md section 20).
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, mut eventloop) = AsyncClient::new(options, config.max_in_flight);
        let session = Arc::new(Session::new(broker.clone()));

        let first = tokio::time::timeout(checked.connect_timeout, eventloop.poll())
            .await
            .map_err(|_| {
                SinkError::retryable(format!(
                    "no answer from the mqtt broker at {broker} within {} s",
                    checked.connect_timeout.as_secs()
                ))
            })?;
        match first {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let max_qos = ack.properties.as_ref().and_then(|p| p.max_qos);
                if let Some(max_qos) = max_qos
                    && max_qos < config.qos
                {
                    return Err(SinkError::permanent(format!(
                        "the mqtt broker at {broker} accepts at most QoS {max_qos}, below the \
                         configured qos = {}; configure qos = {max_qos} if it is at least 1",
                        config.qos
                    )));
                }
                session.connected(&ack);
            }
            Ok(other) => {
                return Err(SinkError::retryable(format!(
                    "the mqtt broker at {broker} answered the connect with {other:?}"
                )));
            }
            Err(err) => return Err(connect_error(&broker, err)),
        }
        info!(broker = %broker, qos = config.qos, max_packet_size = session.max_packet_size(), "mqtt sink connected");
        let driver = tokio::spawn(session::drive(eventloop, Arc::clone(&session)));
        Ok(Self {
            client,
            session,
            driver: std::sync::Mutex::new(Some(driver)),
            template: checked.template,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            qos: checked.qos,
            in_flight: Semaphore::new(config.max_in_flight),
            window: config.max_in_flight,
            ack_timeout: checked.ack_timeout,
        })
    }

    /// Publishes one window of a batch: all of it queued, then the acks awaited in order.
    /// Appends one outcome per message sent or refused; returns whether all succeeded, so
    /// that the caller sends nothing after a failure (which would reorder the topic).
    async fn publish_window(
        &self,
        window: &[Message],
        outcomes: &mut Vec<Result<Delivery, SinkError>>,
    ) -> bool {
        // A window is at most `max_in_flight` long, which validation caps below u16::MAX.
        let Ok(_permits) = self.in_flight.acquire_many(window.len() as u32).await else {
            outcomes.push(Err(SinkError::retryable("the mqtt sink is shut down")));
            return false;
        };
        let mut acks = Vec::with_capacity(window.len());
        let mut refused = None;
        for message in window {
            let queued = match self.encode(message) {
                Ok((topic, properties)) => {
                    self.session
                        .submit(
                            &self.client,
                            topic,
                            self.qos,
                            message.payload.clone(),
                            properties,
                        )
                        .await
                }
                Err(err) => Err(err),
            };
            match queued {
                Ok(ack) => acks.push(ack),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        // Each ack's timeout starts when it is awaited, so after one timeout the rest are
        // only checked for an ack already received: a stuck connection costs one
        // ack_timeout per window, not one per message.
        let mut all_ok = true;
        let mut stalled = false;
        for ack in acks {
            let result = if stalled {
                ack.now_or_never()
            } else {
                match tokio::time::timeout(self.ack_timeout, ack).await {
                    Ok(result) => Some(result),
                    Err(_) => {
                        stalled = true;
                        None
                    }
                }
            };
            let outcome = match result {
                Some(Ok(outcome)) => outcome,
                Some(Err(_)) => Err(SinkError::retryable(
                    "the mqtt connection task ended before the ack",
                )),
                None => Err(SinkError::retryable(format!(
                    "no ack from the mqtt broker at {} within {} s",
                    self.session.broker,
                    self.ack_timeout.as_secs()
                ))),
            };
            all_ok &= outcome.is_ok();
            outcomes.push(outcome);
        }
        match refused {
            Some(err) => {
                outcomes.push(Err(err));
                false
            }
            None => all_ok,
        }
    }

    /// The topic and properties of `message`, or a permanent error when the broker could
    /// never accept it (too large, NUL in a string).
    fn encode(&self, message: &Message) -> Result<(String, PublishProperties), SinkError> {
        let topic = self.template.render(message);
        if topic.len() > MAX_TOPIC_BYTES {
            return Err(SinkError::permanent(format!(
                "the topic is {} bytes long; MQTT allows {MAX_TOPIC_BYTES}",
                topic.len()
            )));
        }
        let attributes = binary_attributes(message, &self.source);
        let mut user_properties = Vec::with_capacity(attributes.len() + message.headers.len());
        for (name, value) in attributes {
            user_properties.push((name.to_owned(), value.into_owned()));
        }
        for (name, value) in user_headers(message) {
            // The trace context went out as attributes of the same names.
            if !ATTRIBUTE_NAMES
                .iter()
                .chain(&TRACE_ATTRIBUTE_NAMES)
                .any(|attribute| attribute.eq_ignore_ascii_case(name))
            {
                user_properties.push((name.to_owned(), value.to_owned()));
            }
        }
        if let Some((name, _)) = user_properties
            .iter()
            .find(|(name, value)| name.contains('\0') || value.contains('\0'))
        {
            return Err(SinkError::permanent(format!(
                "the user property {name:?} contains a NUL character, which MQTT strings must not"
            )));
        }
        let properties = PublishProperties {
            content_type: Some(message.content_type().to_owned()),
            user_properties,
            ..PublishProperties::default()
        };
        if let Some(max) = self.session.max_packet_size() {
            let size = Publish::new(
                topic.as_str(),
                self.qos,
                message.payload.clone(),
                Some(properties.clone()),
            )
            .size();
            if size > max as usize {
                return Err(SinkError::permanent(format!(
                    "the message makes a {size}-byte MQTT packet; the broker at {} accepts at most \
                     {max} (its Maximum Packet Size); raise it on the broker or publish a \
                     reference to the data",
                    self.session.broker
                )));
            }
        }
        Ok((topic, properties))
    }
}

#[async_trait]
impl Sink for MqttSink {
    /// Queues the batch in windows of at most `max_in_flight` messages; each window is
    /// queued whole before its acks are awaited. Once a message fails, nothing after it is
    /// sent: those messages are reported retryable ("not sent").
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for window in batch.chunks(self.window) {
            if !self.publish_window(window, &mut outcomes).await {
                break;
            }
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// MQTT cannot read a topic back, so there is nothing to reconcile: what the previous
    /// owner sent but did not mark is sent again, and the inbox drops the repeats.
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }

    /// The connection's state, as the last CONNACK or drop left it.
    async fn check(&self) -> Result<(), SinkError> {
        self.session.ensure_connected()
    }

    async fn shutdown(&self) {
        self.in_flight.close();
        self.session.stop();
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut driver) = driver else { return };
        if let Err(err) = self.client.disconnect().await {
            warn!(broker = %self.session.broker, error = %ErrorChain(&err), "mqtt disconnect failed");
        }
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut driver)
            .await
            .is_err()
        {
            warn!(broker = %self.session.broker, "mqtt connection did not close in time; dropping it");
            driver.abort();
        }
    }
}

/// Rebuilds a message from an MQTT 5 PUBLISH in CloudEvents binary mode (what this sink
/// sends): `user_properties` as received, the PUBLISH content type, and the payload.
/// Attribute names are read case-insensitively; other user properties become headers.
pub fn received_message<'a>(
    user_properties: impl IntoIterator<Item = (&'a str, &'a str)>,
    content_type: Option<&str>,
    payload: Bytes,
) -> Result<ReceivedMessage, DecodeError> {
    let mut headers: Vec<(String, &str)> = user_properties
        .into_iter()
        .map(|(name, value)| {
            let is_attribute = ATTRIBUTE_NAMES
                .iter()
                .any(|attribute| attribute.eq_ignore_ascii_case(name));
            let name = if is_attribute {
                format!("ce-{name}")
            } else {
                name.to_owned()
            };
            (name, value)
        })
        .collect();
    if let Some(content_type) = content_type {
        headers.push((
            ferry_core::message::CONTENT_TYPE_HEADER.to_owned(),
            content_type,
        ));
    }
    ReceivedMessage::from_binary(
        headers.iter().map(|(name, value)| (name.as_str(), *value)),
        payload,
    )
}

/// [`received_message`] for a PUBLISH as rumqttc delivers it to a subscriber.
pub fn received_publish(publish: &Publish) -> Result<ReceivedMessage, DecodeError> {
    let properties = publish.properties.as_ref();
    received_message(
        properties
            .into_iter()
            .flat_map(|p| &p.user_properties)
            .map(|(name, value)| (name.as_str(), value.as_str())),
        properties.and_then(|p| p.content_type.as_deref()),
        publish.payload.clone(),
    )
}

fn connect_error(broker: &str, err: ConnectionError) -> SinkError {
    if crate::tls::is_certificate_failure(&err) {
        let message =
            crate::tls::certificate_failure("the mqtt broker", broker, "sink.tls_ca_file");
        return SinkError::permanent(message).with_source(err);
    }
    match &err {
        ConnectionError::ConnectionRefused(code) => {
            let permanent = matches!(
                code,
                ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::Banned
                    | ConnectReturnCode::BadAuthenticationMethod
                    | ConnectReturnCode::BadClientId
                    | ConnectReturnCode::ClientIdentifierNotValid
                    | ConnectReturnCode::RefusedProtocolVersion
                    | ConnectReturnCode::UnsupportedProtocolVersion
            );
            let hint = match code {
                ConnectReturnCode::RefusedProtocolVersion
                | ConnectReturnCode::UnsupportedProtocolVersion => {
                    ": the broker does not speak MQTT 5, which the CloudEvents user properties need"
                }
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    ": check `username` and `password`"
                }
                _ => "",
            };
            let message =
                format!("the mqtt broker at {broker} refused the connection ({code:?}){hint}");
            if permanent {
                SinkError::permanent(message).with_source(err)
            } else {
                SinkError::retryable(message).with_source(err)
            }
        }
        _ => SinkError::retryable(format!("cannot reach the mqtt broker at {broker}"))
            .with_source(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_message_reads_unprefixed_attributes() {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let properties = [
            ("specversion", "1.0"),
            ("id", id_text.as_str()),
            ("type", "order.paid"),
            ("subject", "42"),
            ("aggregatetype", "order"),
            ("AggregateVersion", "3"),
            ("traceparent", "00-abc-def-01"),
        ];
        let received = received_message(
            properties,
            Some("application/json"),
            Bytes::from_static(b"{}"),
        )
        .expect("decodes");
        assert_eq!(received.id, id);
        assert_eq!(received.version, 3);
        assert_eq!(received.partition_key, "order/42");
        assert_eq!(
            received.headers.get("traceparent").map(String::as_str),
            Some("00-abc-def-01")
        );
        assert_eq!(
            received.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        let missing = received_message([("type", "x")], None, Bytes::new()).expect_err("no id");
        assert_eq!(missing, DecodeError::Missing("id"));
    }
}
