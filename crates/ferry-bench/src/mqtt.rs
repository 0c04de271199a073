//! The bench's MQTT side: a subscriber to the bench's topics, and the broker's raw QoS 1
//! publish ceiling (one rumqttc client, no properties) for comparison.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use ferry::mqtt::{MqttSinkConfig, received_publish};

use crate::decoded::Decoded;

fn options(config: &MqttSinkConfig, role: &str) -> anyhow::Result<MqttOptions> {
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[16..];
    Ok(config.client_options(format!("ferry-bench-{role}-{suffix}"))?)
}

/// Polls until the broker answers `wanted`, or fails after 10 s.
async fn poll_until(
    eventloop: &mut EventLoop,
    what: &str,
    wanted: fn(&Event) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, eventloop.poll())
            .await
            .with_context(|| format!("no {what} from the mqtt broker in 10 s"))?
            .with_context(|| format!("waiting for the mqtt broker's {what}"))?;
        if wanted(&event) {
            return Ok(());
        }
    }
}

/// Subscribes to `filter` at QoS 1 and forwards every message, decoded as a consumer would
/// ([`received_message`]), until the guard drops.
pub(crate) async fn subscribe(
    config: &MqttSinkConfig,
    filter: &str,
) -> anyhow::Result<(mpsc::UnboundedReceiver<Decoded>, DropGuard)> {
    let mut options = options(config, "sub")?;
    // Bursts of a drain: room for many deliveries in flight to this client.
    options.set_receive_maximum(Some(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .context("subscribing to the bench topics")?;
    poll_until(&mut eventloop, "SUBACK", |event| {
        matches!(event, Event::Incoming(Packet::SubAck(_)))
    })
    .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let _client = client;
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                () = stopped.cancelled() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let decoded = received_publish(&publish).map_err(|err| err.to_string());
                    if tx.send(decoded).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    let _ = tx.send(Err(format!(
                        "the bench subscriber lost its connection: {err}"
                    )));
                    return;
                }
            }
        }
    });
    Ok((rx, stop.drop_guard()))
}

/// One rumqttc client publishing `messages` QoS 1 messages of `payload_bytes` to `topic`
/// with up to `in_flight` unacknowledged, without properties; returns the elapsed time
/// from the first publish to the last PUBACK.
pub(crate) async fn raw_ceiling(
    config: &MqttSinkConfig,
    topic: &str,
    messages: u64,
    payload_bytes: usize,
) -> anyhow::Result<Duration> {
    let mut options = options(config, "raw")?;
    let in_flight = u16::try_from(config.max_in_flight).unwrap_or(u16::MAX - 1);
    options.set_outgoing_inflight_upper_limit(in_flight);
    let (client, mut eventloop) = AsyncClient::new(options, config.max_in_flight);
    poll_until(&mut eventloop, "CONNACK", |event| {
        matches!(event, Event::Incoming(Packet::ConnAck(_)))
    })
    .await?;
    let payload = Bytes::from(vec![b'x'; payload_bytes]);
    let topic = topic.to_owned();
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..messages {
            client
                .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
                .await?;
        }
        Ok::<_, rumqttc::v5::ClientError>(client)
    });
    let mut acked = 0;
    let mut sent = 0;
    while acked < messages {
        let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
            .await
            .context("the raw mqtt publisher stalled for 30 s")?
            .context("the raw mqtt publisher lost its connection")?;
        match event {
            Event::Outgoing(Outgoing::Publish(_)) => sent += 1,
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    if sent < messages {
        bail!("the raw mqtt publisher sent {sent} of {messages}");
    }
    let client = publisher.await.context("the raw publisher panicked")??;
    let _ = client.disconnect().await;
    Ok(elapsed)
}
