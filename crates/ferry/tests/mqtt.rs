//! MQTT sink against real Mosquitto brokers: the shared one at `FERRY_TEST_MQTT_URL`
//! (default `mqtt://127.0.0.1:1883`, unique topics per test) for the wire format and
//! ordering, and brokers of the test's own (`mosquitto -p <free port>`) for outages and
//! access rules, so that the shared broker is never stopped.
#![cfg(all(feature = "mqtt", feature = "sqlite"))]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::mqtt::{MqttSink, MqttSinkConfig, received_publish};
use ferry::sql::StoreSettings;
use ferry::sqlite::SqliteOutbox;
use ferry::{Message, NewMessage, OutboxStore, ReceivedMessage, Relay, RelayConfig, Sink};
use ferry_core::testing::services;

mod common;
#[path = "support/nodelay.rs"]
mod nodelay;

use common::order_message as message;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn shared_broker() -> (String, u16) {
    let url = services::mqtt_url();
    let rest = url
        .trim_start_matches("mqtt://")
        .trim_start_matches("tcp://");
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    (host.to_owned(), port.parse().unwrap_or(1883))
}

fn tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

fn sink_config(host: &str, port: u16, prefix: &str) -> MqttSinkConfig {
    MqttSinkConfig {
        url: format!("mqtt://{host}:{port}"),
        topic_template: format!("{prefix}/{{aggregate_type}}/{{aggregate_id}}"),
        ack_timeout_secs: 5,
        connect_timeout_secs: 3,
        ..MqttSinkConfig::default()
    }
}

/// The sink's connection sends at once: rumqttc leaves TCP_NODELAY off unless told.
#[tokio::test]
async fn the_connection_sends_without_waiting_for_acks() -> Result {
    let (host, port) = shared_broker();
    let _sink = MqttSink::connect(&sink_config(&host, port, &tag())).await?;
    nodelay::assert_connections_send_at_once(&services::mqtt_url(), 1, "rumqttc (NetworkOptions)");
    Ok(())
}

/// A subscriber to `filter` with a persistent session (clean start off, one hour expiry),
/// so that messages published while it is disconnected, or while its broker restarts
/// cleanly, are queued for it. Reconnects by itself.
struct Subscriber {
    received: mpsc::UnboundedReceiver<Publish>,
    stop: CancellationToken,
}

impl Subscriber {
    async fn start(host: &str, port: u16, filter: &str) -> Result<Self> {
        let mut options = MqttOptions::new(format!("ferry-test-sub-{}", tag()), host, port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let (tx, received) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
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
                        let _ = tx.send(publish);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(done) = subscribed_tx.take() {
                            let _ = done.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed).await??;
        Ok(Self { received, stop })
    }

    /// The next message, or an error after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Result<Publish> {
        Ok(tokio::time::timeout(timeout, self.received.recv())
            .await?
            .ok_or("subscriber ended")?)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn decode(publish: &Publish) -> Result<ReceivedMessage> {
    Ok(received_publish(publish)?)
}

fn user_property<'a>(publish: &'a Publish, name: &str) -> Option<&'a str> {
    publish
        .properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn attributes_travel_as_user_properties_and_decode_back() -> Result {
    let (host, port) = shared_broker();
    let prefix = format!("ferrytest/{}", tag());
    let mut subscriber = Subscriber::start(&host, port, &format!("{prefix}/#")).await?;
    let sink = MqttSink::connect(&sink_config(&host, port, &prefix)).await?;
    sink.check().await?;
    let batch: Vec<Message> = (1..=3).map(|v| message("a/42", v, 3)).collect();
    for outcome in sink.publish(&batch).await {
        outcome?;
    }
    for sent in &batch {
        let publish = subscriber.next(Duration::from_secs(5)).await?;
        // The `/` of the aggregate id stays inside one topic level.
        assert_eq!(
            &publish.topic[..],
            format!("{prefix}/order/a_42").as_bytes()
        );
        assert_eq!(publish.qos, QoS::AtLeastOnce);
        // CloudEvents MQTT binding: attribute names unchanged, datacontenttype as the
        // PUBLISH content type.
        assert_eq!(user_property(&publish, "specversion"), Some("1.0"));
        assert_eq!(
            user_property(&publish, "id"),
            Some(sent.id.to_string().as_str())
        );
        assert_eq!(user_property(&publish, "source"), Some("ferry://order"));
        assert_eq!(user_property(&publish, "type"), Some("order.paid"));
        assert_eq!(
            user_property(&publish, "sequence"),
            Some(sent.sequence.to_string().as_str())
        );
        assert_eq!(user_property(&publish, "content-type"), None);
        let properties = publish.properties.as_ref().ok_or("no properties")?;
        assert_eq!(
            properties.content_type.as_deref(),
            Some("application/vnd.shop+json")
        );
        let received = decode(&publish)?;
        assert_eq!(received.id, sent.id);
        assert_eq!(received.aggregate_type, "order");
        assert_eq!(received.aggregate_id, "a/42");
        assert_eq!(received.version, sent.version);
        assert_eq!(received.event_type, "order.paid");
        assert_eq!(received.partition_key, "order/a/42");
        assert_eq!(received.payload, sent.payload);
        assert_eq!(received.time, Some(sent.created_at));
        assert_eq!(
            received.headers.get("traceparent"),
            sent.headers.get("traceparent")
        );
    }
    assert!(reconciled(&sink).await?.is_empty());
    sink.shutdown().await;
    Ok(())
}

/// What `reconcile` finds for a partition (MQTT cannot read back: nothing).
async fn reconciled(sink: &MqttSink) -> Result<Vec<Uuid>> {
    let owns_key = |_: &str| true;
    Ok(sink
        .reconcile(ferry::ReconcileRequest {
            partition: 3,
            checkpoint: None,
            since_expiry: Duration::ZERO,
            owns_key: &owns_key,
        })
        .await?)
}

#[tokio::test]
async fn qos2_completes_and_concurrent_partitions_keep_their_order() -> Result {
    let (host, port) = shared_broker();
    let prefix = format!("ferrytest/{}", tag());
    let mut subscriber = Subscriber::start(&host, port, &format!("{prefix}/#")).await?;
    let sink = Arc::new(
        MqttSink::connect(&MqttSinkConfig {
            qos: 2,
            max_in_flight: 64,
            ..sink_config(&host, port, &prefix)
        })
        .await?,
    );
    const PARTITIONS: u32 = 6;
    const PER_AGGREGATE: u64 = 300;
    let mut tasks = Vec::new();
    for partition in 0..PARTITIONS {
        let sink = Arc::clone(&sink);
        tasks.push(tokio::spawn(async move {
            let messages: Vec<Message> = (1..=PER_AGGREGATE)
                .map(|v| message(&format!("agg{partition}"), v, partition))
                .collect();
            for batch in messages.chunks(100) {
                for outcome in sink.publish(batch).await {
                    outcome.map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..u64::from(PARTITIONS) * PER_AGGREGATE {
        let publish = subscriber.next(Duration::from_secs(10)).await?;
        assert_eq!(
            publish.qos,
            QoS::AtLeastOnce,
            "delivered at the subscription's QoS"
        );
        let received = decode(&publish)?;
        versions
            .entry(received.aggregate_id)
            .or_default()
            .push(received.version);
    }
    assert_eq!(versions.len(), PARTITIONS as usize);
    for (aggregate, seen) in versions {
        let expected: Vec<u64> = (1..=PER_AGGREGATE).collect();
        assert_eq!(
            seen, expected,
            "aggregate {aggregate}: gap, duplicate or reorder"
        );
    }
    sink.shutdown().await;
    Ok(())
}

/// A Mosquitto of the test's own on a free port, with persistence in its directory.
struct OwnBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    fn new(extra_config: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Mosquitto started as root drops to its own user, which must write its database.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nlog_dest stderr\n{extra_config}\n",
                dir.path().display()
            ),
        )?;
        Ok(Self {
            dir,
            port,
            child: None,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the broker and waits until it accepts connections.
    async fn start(&mut self) -> Result {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("own mosquitto did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the broker cleanly (SIGTERM: it saves its sessions) and waits for its exit.
    async fn stop(&mut self) -> Result {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()?;
            tokio::task::spawn_blocking(move || child.wait()).await??;
        }
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn relay_recovers_from_a_broker_down_at_start_and_restarted_mid_run() -> Result {
    let mut broker = OwnBroker::new("")?;
    let prefix = format!("ferrytest/{}", tag());
    let config = sink_config("127.0.0.1", broker.port, &prefix);

    // Down at start: a retryable error naming the broker.
    let err = MqttSink::connect(&config).await.expect_err("broker down");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains(&broker.port.to_string()), "{err}");

    broker.start().await?;
    let mut subscriber =
        Subscriber::start("127.0.0.1", broker.port, &format!("{prefix}/#")).await?;
    let sink = Arc::new(MqttSink::connect(&config).await?);

    let url = format!("sqlite://{}", broker.path().join("outbox.db").display());
    let outbox = Arc::new(SqliteOutbox::connect(&url, 4, StoreSettings::default()).await?);
    outbox.migrate(4).await?;
    let mut relay_config = RelayConfig::new("mqtt-test");
    relay_config.batch_size = 50;
    relay_config.poll_interval = Duration::from_millis(50);
    relay_config.retry_initial = Duration::from_millis(20);
    relay_config.retry_max = Duration::from_millis(500);
    relay_config.lease_ttl = Duration::from_secs(3);
    let relay = Relay::new(outbox.clone(), outbox.clone(), sink.clone(), relay_config);
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));

    const AGGREGATES: usize = 10;
    const PER_AGGREGATE: usize = 150;
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            for round in 0..PER_AGGREGATE {
                let mut tx = outbox.pool().begin().await?;
                for aggregate in 0..AGGREGATES {
                    let message = NewMessage::new(
                        "order",
                        format!("o{aggregate}"),
                        "order.changed",
                        format!(r#"{{"round":{round}}}"#),
                    );
                    ids.insert(outbox.enqueue(&mut tx, message).await?.id);
                }
                tx.commit().await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ids)
        })
    };

    // Mid-run: the broker goes away for a while, then comes back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.start().await?;

    let produced = producer.await??;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let backlog: u64 = outbox.status().await?.iter().map(|p| p.backlog).sum();
        if backlog == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not drained: {backlog} left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stats.publish_failures.load(Ordering::Relaxed) > 0,
        "the outage did not hit the relay; the test proves nothing"
    );

    // Consumer with ferry's inbox semantics: apply only the next version of each aggregate.
    let mut seen = HashSet::new();
    let mut applied: BTreeMap<String, u64> = BTreeMap::new();
    let mut reordered = 0;
    while seen.len() < produced.len() {
        let publish = subscriber
            .next(Duration::from_secs(15))
            .await
            .map_err(|err| {
                format!(
                    "{err}: received {} of {} distinct",
                    seen.len(),
                    produced.len()
                )
            })?;
        let received = decode(&publish)?;
        seen.insert(received.id);
        let last = applied.entry(received.aggregate_id.clone()).or_insert(0);
        if received.version == *last + 1 {
            *last = received.version;
        } else if received.version > *last + 1 {
            reordered += 1;
        }
    }
    assert_eq!(seen, produced, "every committed message arrived");
    assert_eq!(reordered, 0, "a version arrived before its predecessor");
    for (aggregate, last) in &applied {
        assert_eq!(
            *last, PER_AGGREGATE as u64,
            "aggregate {aggregate} has a gap"
        );
    }
    stop.cancel();
    relay_task.await??;
    Ok(())
}

#[tokio::test]
async fn a_denied_topic_is_a_permanent_rejection() -> Result {
    let tag = tag();
    let mut broker = OwnBroker::new("")?;
    std::fs::write(
        broker.path().join("acl"),
        format!("topic readwrite allowed{tag}/#\n"),
    )?;
    let acl = broker.path().join("acl");
    let conf = broker.path().join("mosquitto.conf");
    let mut text = std::fs::read_to_string(&conf)?;
    text.push_str(&format!("acl_file {}\n", acl.display()));
    std::fs::write(&conf, text)?;
    broker.start().await?;

    let sink = MqttSink::connect(&MqttSinkConfig {
        topic_template: format!("{{aggregate_type}}{tag}/{{aggregate_id}}"),
        ..sink_config("127.0.0.1", broker.port, "unused")
    })
    .await?;
    let mut batch = vec![message("1", 1, 0), message("2", 1, 0), message("3", 1, 0)];
    batch[0].aggregate_type = "allowed".into();
    batch[1].aggregate_type = "denied".into();
    batch[2].aggregate_type = "allowed".into();
    let outcomes = sink.publish(&batch).await;
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    let denied = outcomes[1].as_ref().expect_err("denied");
    assert!(!denied.is_retryable(), "{denied}");
    assert!(denied.to_string().contains("NotAuthorized"), "{denied}");
    // The third was pipelined behind the second before the rejection came back: the broker
    // took it (another topic), and its own ack says so.
    assert!(outcomes[2].is_ok(), "{:?}", outcomes[2]);
    // The rejection repeats: the relay blocks the partition on it.
    let again = sink.publish(&batch[1..2]).await;
    assert!(!again[0].as_ref().expect_err("denied again").is_retryable());
    sink.shutdown().await;
    Ok(())
}
