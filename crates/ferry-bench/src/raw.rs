//! The broker's own publish ceiling, measured in the same run as ferry's figures: a plain
//! client of the same library publishing the bench's payload, pipelined in windows of
//! [`WINDOW`] as ferry does, with no database and no relay.

use std::time::Instant;

use anyhow::Context;

use ferry::amqp::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use ferry::amqp::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use ferry::amqp::lapin::{self, BasicProperties, Confirmation};
use ferry::cloudevents::BINARY_ATTRIBUTE_NAMES;
use ferry::redis_stream::redis;

/// Messages per raw measurement at most: enough for a steady rate.
const RAW_MESSAGES_MAX: u64 = 200_000;

/// Publishes in flight (or per pipeline) at once.
const WINDOW: usize = 1000;

/// A broker whose raw ceiling is measured here, and where the raw loop publishes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawTarget<'a> {
    Redis {
        connection: &'a redis::aio::MultiplexedConnection,
        stream: &'a str,
    },
    Amqp {
        connection: &'a lapin::Connection,
        exchange: &'a str,
    },
}

/// Lines to print with the broker's raw ceiling: bare messages, then messages with fields
/// or headers shaped like ferry's.
pub(crate) async fn ceiling(
    target: RawTarget<'_>,
    messages: u64,
    payload: &str,
) -> anyhow::Result<Vec<String>> {
    let messages = messages.min(RAW_MESSAGES_MAX);
    let mut lines = Vec::new();
    match target {
        RawTarget::Redis { connection, stream } => {
            for with_fields in [false, true] {
                let rate = redis_rate(connection, stream, messages, payload, with_fields)
                    .await
                    .context("measuring raw XADD")?;
                lines.push(format!(
                    "raw ceiling: redis XADD * ({}) in pipelines of {WINDOW}, one connection: {messages} in {:.0} msg/s",
                    if with_fields { "data + ferry's 12 other fields" } else { "data field only" },
                    rate
                ));
            }
        }
        RawTarget::Amqp {
            connection,
            exchange,
        } => {
            for with_headers in [false, true] {
                let rate = amqp_rate(connection, exchange, messages, payload, with_headers)
                    .await
                    .context("measuring raw publishes with confirms")?;
                lines.push(format!(
                    "raw ceiling: lapin persistent mandatory publishes with confirms ({}), {WINDOW} in flight, one channel: {messages} in {:.0} msg/s",
                    if with_headers { "ferry's 11 headers" } else { "no headers" },
                    rate
                ));
            }
        }
    }
    Ok(lines)
}

fn rate(messages: u64, started: Instant) -> f64 {
    messages as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// Values shaped like ferry's attributes for message `n`.
fn attribute_values(n: u64) -> [String; 10] {
    [
        "1.0".into(),
        uuid::Uuid::now_v7().to_string(),
        "ferry://bench".into(),
        "bench.event".into(),
        (n % 1000).to_string(),
        chrono::Utc::now().to_rfc3339(),
        "bench".into(),
        n.to_string(),
        format!("bench/{}", n % 1000),
        n.to_string(),
    ]
}

async fn redis_rate(
    connection: &redis::aio::MultiplexedConnection,
    stream: &str,
    messages: u64,
    payload: &str,
    with_fields: bool,
) -> anyhow::Result<f64> {
    let mut connection = connection.clone();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < messages {
        let mut pipeline = redis::pipe();
        let count = (messages - sent).min(WINDOW as u64);
        for n in sent..sent + count {
            let mut fields: Vec<(String, String)> = Vec::with_capacity(13);
            if with_fields {
                let values = attribute_values(n);
                fields.extend(
                    BINARY_ATTRIBUTE_NAMES
                        .iter()
                        .zip(values)
                        .map(|(name, value)| (format!("ce_{name}"), value)),
                );
                fields.push(("content-type".into(), "application/json".into()));
            }
            fields.push(("data".into(), payload.to_owned()));
            pipeline.xadd(stream, "*", &fields).ignore();
        }
        let () = pipeline.query_async(&mut connection).await?;
        sent += count;
    }
    Ok(rate(messages, started))
}

async fn amqp_rate(
    connection: &lapin::Connection,
    exchange: &str,
    messages: u64,
    payload: &str,
    with_headers: bool,
) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < messages {
        let count = (messages - sent).min(WINDOW as u64);
        let mut confirms = Vec::with_capacity(WINDOW);
        for n in sent..sent + count {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(uuid::Uuid::now_v7().to_string()));
            if with_headers {
                let mut headers = FieldTable::default();
                for (name, value) in BINARY_ATTRIBUTE_NAMES.iter().zip(attribute_values(n)) {
                    headers.insert(
                        ShortString::from(format!("cloudEvents:{name}")),
                        AMQPValue::LongString(LongString::from(value)),
                    );
                }
                headers.insert(
                    ShortString::from("traceparent"),
                    AMQPValue::LongString(LongString::from("00-0-0-01")),
                );
                properties = properties
                    .with_headers(headers)
                    .with_content_type(ShortString::from("application/json"));
            }
            confirms.push(
                channel
                    .basic_publish(
                        ShortString::from(exchange),
                        ShortString::from("raw"),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        payload.as_bytes(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("raw publish not acked: {other:?}"),
            }
        }
        sent += count;
    }
    let _ = channel
        .close(200, ShortString::from("raw ceiling measured"))
        .await;
    Ok(rate(messages, started))
}
