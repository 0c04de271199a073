//! End-to-end with real `ferry relay` processes, the real PostgreSQL and Mosquitto: kill -9
//! while messages flow, two relays sharing (one killed), and a broker that is down when the
//! relay starts and restarts mid-run. A subscriber receives everything and checks it per
//! aggregate with ferry's inbox semantics: MQTT has no broker-side dedup, so repeats may
//! arrive, but nothing may be missing, and an inbox must apply every version in order.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use common::{PgScenario, Report, kill_nine_repeatedly, unique_tag};
use ferry::ReceivedMessage;
use ferry_core::testing::services;

/// Host and port of the shared Mosquitto.
fn shared_broker() -> (String, u16) {
    let url = url::Url::parse(&services::mqtt_url()).unwrap();
    (
        url.host_str().unwrap().to_owned(),
        url.port().unwrap_or(1883),
    )
}

/// A subscriber with a persistent session on `e<tag>/#`: messages published while it is
/// disconnected (a broker restart) are queued for it. Reconnects by itself.
struct Subscriber {
    received: Arc<Mutex<Vec<ReceivedMessage>>>,
    last_at: Arc<Mutex<Instant>>,
    _stop: DropGuard,
}

impl Subscriber {
    async fn start(host: &str, port: u16, tag: &str) -> Self {
        let mut options = MqttOptions::new(format!("ferry-e2e-sub-{tag}"), host, port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_receive_maximum(Some(u16::MAX))
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client
            .subscribe(format!("e{tag}/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let last_at = Arc::new(Mutex::new(Instant::now()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let stop = CancellationToken::new();
        let (stopped, sink, last) = (stop.clone(), received.clone(), last_at.clone());
        tokio::spawn(async move {
            let _client = client;
            loop {
                let event = tokio::select! {
                    event = eventloop.poll() => event,
                    () = stopped.cancelled() => return,
                };
                match event {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let message = ferry::mqtt::received_publish(&publish).unwrap();
                        sink.lock().unwrap().push(message);
                        *last.lock().unwrap() = Instant::now();
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
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .unwrap()
            .unwrap();
        Self {
            received,
            last_at,
            _stop: stop.drop_guard(),
        }
    }

    /// Waits until every produced id arrived and nothing more came for a second (so late
    /// repeats are counted too), then checks.
    async fn report(&self, produced: &HashSet<Uuid>) -> Report {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen: HashSet<Uuid> = self.received.lock().unwrap().iter().map(|m| m.id).collect();
            let quiet = self.last_at.lock().unwrap().elapsed() > Duration::from_secs(1);
            if (produced.is_subset(&seen) && quiet) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Report::of(self.received.lock().unwrap().clone(), produced)
    }
}

/// A PostgreSQL outbox relayed to topics `e<tag>/{aggregate_type}/{aggregate_id}`.
async fn pg_to_mqtt(partitions: u32, host: &str, port: u16) -> PgScenario {
    let tag = unique_tag();
    let sink = format!(
        "[sink]\ntype = \"mqtt\"\nurl = \"mqtt://{host}:{port}\"\n\
             topic_template = \"e{tag}/{{aggregate_type}}/{{aggregate_id}}\"\n\
             ack_timeout_secs = 3\nconnect_timeout_secs = 2\n"
    );
    PgScenario::new(&tag, partitions, &sink, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_while_messages_flow_loses_nothing_and_the_inbox_applies_all_in_order() {
    let (host, port) = shared_broker();
    let e2e = pg_to_mqtt(8, &host, port).await;
    let subscriber = Subscriber::start(&host, port, &e2e.scenario.tag).await;
    let producing = e2e.produce(100, 60, 4);
    let (relay, mut logs) = kill_nine_repeatedly(&e2e.scenario, 5).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len(), 6_000);
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    let report = subscriber.report(&produced).await;
    report.assert_perfect_after_inbox();
    logs.push_str(&relay.logs());
    assert!(
        logs.contains("Unclean"),
        "restarted relays should have taken partitions over from killed ones:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_partitions_and_one_killed_loses_nothing() {
    let (host, port) = shared_broker();
    let e2e = pg_to_mqtt(8, &host, port).await;
    let subscriber = Subscriber::start(&host, port, &e2e.scenario.tag).await;
    let a = e2e.scenario.relay("relay-a");
    let b = e2e.scenario.relay("relay-b");
    e2e.scenario.wait_for_shares(2, 4).await;
    let producing = e2e.produce(80, 50, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill_nine();
    let produced = producing.await.unwrap();
    e2e.scenario.wait_for_shares(1, 8).await;
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    subscriber
        .report(&produced)
        .await
        .assert_perfect_after_inbox();
    assert!(b.terminate(Duration::from_secs(15)).success());
}

/// A Mosquitto of the test's own (never the shared one) with persistence, so that a clean
/// restart keeps the subscriber's session and queued messages.
struct OwnBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user, which must write its database.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = common::free_port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nlog_dest stderr\nmax_queued_messages 0\n",
                dir.path().display()
            ),
        )
        .unwrap();
        Self {
            dir,
            port,
            child: None,
        }
    }

    async fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        self.child = Some(
            Command::new("mosquitto")
                .arg("-c")
                .arg(self.dir.path().join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        common::wait_listening(self.port, "own mosquitto").await;
    }

    /// SIGTERM (the broker saves its sessions), then waits for the exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            child.wait().unwrap();
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_and_restarted_mid_run_the_relay_recovers_by_itself() {
    let mut broker = OwnBroker::new();
    let e2e = pg_to_mqtt(4, "127.0.0.1", broker.port).await;
    // The subscriber's session is made first and kept across the broker's restarts, so
    // that it misses nothing published before it reconnects.
    broker.start().await;
    let subscriber = Subscriber::start("127.0.0.1", broker.port, &e2e.scenario.tag).await;
    broker.stop();

    let relay = e2e.scenario.relay("relay");
    let producing = e2e.produce(40, 40, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = relay.logs();
    assert!(
        logs.contains("not ready") && logs.contains(&broker.port.to_string()),
        "{logs}"
    );

    broker.start().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.start().await;

    let produced = producing.await.unwrap();
    e2e.scenario.wait_drained(Duration::from_secs(120)).await;
    subscriber
        .report(&produced)
        .await
        .assert_perfect_after_inbox();
    let logs = relay.logs();
    assert!(
        logs.contains("mqtt connection lost"),
        "the restart did not reach the relay:\n{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
}
