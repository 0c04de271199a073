//! TLS to every store, lease backend and sink, with the server's certificate checked
//! against the throwaway CA of `scripts/tls-certs.sh`: a relay round trip over each TLS
//! connection (messages enqueued over TLS, published over TLS, read back over TLS and
//! checked per aggregate), and a CA that did not issue the server's certificate refused
//! with an error that says so and names the endpoint.
//!
//! The TLS endpoints are the extra ones `scripts/services.sh` starts (ports in
//! `ferry_core::testing::services`); a test whose endpoint is missing fails saying so.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls::{assert_names_the_certificate, ca_for, refused};
use common::{FAST_RELAY, Report, Scenario, outbox_section, produce, read_amqp_queue, unique_tag};
use ferry::ReceivedMessage;
use ferry::amqp::lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use ferry::amqp::lapin::tcp::OwnedTLSConfig;
use ferry::amqp::lapin::types::FieldTable;
use ferry::amqp::lapin::{Connection, ConnectionProperties, ExchangeKind};
use ferry::mysql::MyOutbox;
use ferry::postgres::PgOutbox;
use ferry::redis_store::{RedisOutbox, RedisSettings, RedisWrites};
use ferry::redis_stream::redis::AsyncCommands as _;
use ferry::redis_stream::redis::streams::StreamRangeReply;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry_core::testing::services;

fn store_settings(tag: &str) -> StoreSettings {
    StoreSettings {
        table_prefix: TablePrefix::new(format!("e{tag}_")).unwrap(),
        ..StoreSettings::default()
    }
}

/// `[store]` on PostgreSQL over TLS (`sslmode=verify-full`) with `ca` as the root.
fn pg_tls_store(ca: &Path) -> String {
    format!(
        "[store]\ntype = \"postgres\"\nurl = \"{}\"\n",
        services::postgres_tls_url(ca)
    )
}

fn pg_ca() -> PathBuf {
    ca_for(&services::postgres_url())
}

/// A scenario on PostgreSQL over TLS relayed to `sink` (whole sections: `[sink]`, and
/// `[leases]` if any), and a producer that enqueues over TLS too.
async fn pg_tls_scenario(tag: &str, partitions: u32, sink: &str) -> (Scenario, PgOutbox) {
    let ca = pg_ca();
    let scenario = Scenario::new(
        tag,
        &[
            &pg_tls_store(&ca),
            &outbox_section(tag, partitions, ""),
            sink,
            FAST_RELAY,
        ],
    );
    let outbox = PgOutbox::connect(&services::postgres_tls_url(&ca), 2, store_settings(tag))
        .await
        .unwrap();
    (scenario, outbox)
}

/// `[sink]` on NATS over TLS, into stream `E2E_<tag>`.
fn nats_tls_sink(tag: &str, ca: &Path) -> String {
    format!(
        "[sink]\ntype = \"nats\"\nurl = \"{}\"\ntls_ca_file = \"{}\"\nstream = \"E2E_{tag}\"\n\
         subjects = [\"e{tag}.>\"]\nsubject_template = \"e{tag}.{{aggregate_type}}.{{event_type}}\"\n",
        services::nats_tls_url(),
        ca.display()
    )
}

async fn nats_tls_client(ca: &Path) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .add_root_certificates(ca.to_owned())
        .require_tls(true)
        .connect(services::nats_tls_url())
        .await
        .unwrap()
}

/// Reads stream `E2E_<tag>` over TLS from its start, then deletes it.
async fn read_nats_tls(tag: &str, ca: &Path) -> Vec<ReceivedMessage> {
    let client = nats_tls_client(ca).await;
    let received = common::read_nats_stream_with(client.clone(), &format!("E2E_{tag}")).await;
    async_nats::jetstream::new(client)
        .delete_stream(format!("E2E_{tag}"))
        .await
        .unwrap();
    received
}

/// Runs a relay on `scenario` until its outbox is drained, then stops it.
async fn relay_until_drained(scenario: &Scenario) {
    let relay = scenario.relay("relay");
    scenario.wait_drained(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert!(relay.terminate(Duration::from_secs(15)).success(), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_to_nats_over_tls_round_trip() {
    let ca = ca_for(&services::nats_tls_url());
    let tag = unique_tag();
    let (scenario, outbox) = pg_tls_scenario(&tag, 4, &nats_tls_sink(&tag, &ca)).await;
    let produced = produce(outbox, 20, 5, 2).await;
    relay_until_drained(&scenario).await;
    Report::of(read_nats_tls(&tag, &ca).await, &produced).assert_perfect(produced.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_tls_round_trip() {
    let ca = ca_for(&services::mysql_tls_url(Path::new("")));
    ca_for(&services::nats_tls_url());
    let tag = unique_tag();
    let url = services::mysql_tls_url(&ca);
    let scenario = Scenario::new(
        &tag,
        &[
            &format!("[store]\ntype = \"mysql\"\nurl = \"{url}\"\n"),
            &outbox_section(&tag, 4, ""),
            &nats_tls_sink(&tag, &ca),
            FAST_RELAY,
        ],
    );
    let outbox = MyOutbox::connect(&url, 4, store_settings(&tag))
        .await
        .unwrap();
    let produced = produce(outbox, 20, 5, 2).await;
    relay_until_drained(&scenario).await;
    Report::of(read_nats_tls(&tag, &ca).await, &produced).assert_perfect(produced.len());
}

/// The Redis store, its leases and the Streams sink, all over `rediss://`; the inbox of a
/// consumer over the same TLS connection admits each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_leases_inbox_and_streams_over_tls_round_trip() {
    let url = services::redis_tls_url();
    let ca = ca_for(&url);
    let tag = unique_tag();
    let prefix = format!("e{tag}:");
    let scenario = Scenario::new(
        &tag,
        &[
            &format!(
                "[store]\ntype = \"redis\"\nurl = \"{url}\"\ntls_ca_file = \"{ca}\"\nkey_prefix = \"{prefix}\"\n\
                 [leases]\ntype = \"redis\"\nurl = \"{url}\"\ntls_ca_file = \"{ca}\"\nkey_prefix = \"{prefix}leases:\"\n",
                ca = ca.display()
            ),
            &outbox_section(&tag, 4, ""),
            &format!(
                "[sink]\ntype = \"redis_stream\"\nurl = \"{url}\"\ntls_ca_file = \"{}\"\n\
                 stream_template = \"e{tag}.{{aggregate_type}}.{{partition}}\"\n",
                ca.display()
            ),
            FAST_RELAY,
        ],
    );
    let client = ferry::tls::redis_client(url.as_str(), Some(&ca)).unwrap();
    let settings = RedisSettings {
        key_prefix: ferry::redis_store::KeyPrefix::new(prefix.clone()).unwrap(),
        external_leases: true,
        ..RedisSettings::default()
    };
    let outbox = RedisOutbox::connect_client(client.clone(), settings)
        .await
        .unwrap();
    let produced = produce(outbox.clone(), 20, 5, 2).await;
    relay_until_drained(&scenario).await;

    let mut connection = outbox.connection();
    let mut streams: Vec<String> = connection.keys(format!("e{tag}.*")).await.unwrap();
    streams.sort();
    let mut received = Vec::new();
    for stream in &streams {
        let reply: StreamRangeReply = connection.xrange_all(stream).await.unwrap();
        received.extend(
            reply
                .ids
                .iter()
                .map(|entry| ferry::redis_stream::decode_stream_id(entry).unwrap()),
        );
    }
    let inbox = ferry::redis_store::RedisInbox::new(
        outbox.connection(),
        ferry::redis_store::KeyPrefix::new(prefix.clone()).unwrap(),
        "tls-consumer",
        Duration::from_secs(60),
    )
    .unwrap();
    let first = &received[0];
    let writes = RedisWrites::new();
    assert!(matches!(
        inbox.admit(first, &writes).await.unwrap(),
        ferry::Admission::Apply { .. }
    ));
    assert_eq!(
        inbox.admit(first, &writes).await.unwrap(),
        ferry::Admission::Duplicate
    );
    Report::of(received, &produced).assert_perfect(produced.len());
    let keys: Vec<String> = connection.keys(format!("{prefix}*")).await.unwrap();
    let () = connection.del([streams, keys].concat()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_round_trip() {
    let url = services::amqp_tls_url();
    let ca = ca_for(&url);
    let tag = unique_tag();
    let name = format!("e{tag}");
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(std::fs::read_to_string(&ca).unwrap()),
    };
    let connection = Connection::connect_with_config(
        &url,
        ConnectionProperties::default(),
        tls,
        ferry::amqp::lapin::runtime::default_runtime().unwrap(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (scenario, outbox) = pg_tls_scenario(&tag, 4, &format!(
                "[sink]\ntype = \"amqp\"\nurl = \"{url}\"\ntls_ca_file = \"{}\"\nexchange_template = \"{name}\"\n",
                ca.display()
            )).await;
    let produced = produce(outbox, 20, 5, 2).await;
    relay_until_drained(&scenario).await;

    let received = read_amqp_queue(&channel, &name).await;
    Report::of(received, &produced).assert_perfect(produced.len());
    channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_round_trip() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};

    let url = services::mqtt_tls_url();
    let ca = ca_for(&url);
    let tag = unique_tag();
    let subscriber = ferry::mqtt::MqttSinkConfig {
        url: url.clone(),
        tls_ca_file: Some(ca.clone()),
        ..ferry::mqtt::MqttSinkConfig::default()
    }
    .client_options(format!("ferry-e2e-tls-{tag}"))
    .unwrap();
    let (client, mut eventloop) = AsyncClient::new(subscriber, 100);
    client
        .subscribe(format!("e{tag}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let sink = received.clone();
    let reader = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => sink
                    .lock()
                    .unwrap()
                    .push(ferry::mqtt::received_publish(&publish).unwrap()),
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(done) = subscribed_tx.take() {
                        let _ = done.send(());
                    }
                }
                Ok(_) => {}
                Err(err) => panic!("the TLS subscriber failed: {err}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .unwrap()
        .unwrap();

    let (scenario, outbox) = pg_tls_scenario(
        &tag,
        4,
        &format!(
            "[sink]\ntype = \"mqtt\"\nurl = \"{url}\"\ntls_ca_file = \"{}\"\n\
                 topic_template = \"e{tag}/{{aggregate_type}}/{{aggregate_id}}\"\n",
            ca.display()
        ),
    )
    .await;
    let produced = produce(outbox, 20, 5, 2).await;
    relay_until_drained(&scenario).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < produced.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.abort();
    let received = received.lock().unwrap().clone();
    Report::of(received, &produced).assert_perfect(produced.len());
}

/// An HTTPS receiver with the test server certificate: records each message it is sent.
async fn https_receiver() -> (SocketAddr, Arc<Mutex<Vec<ReceivedMessage>>>) {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::HeaderMap;

    type Inbox = Arc<Mutex<Vec<ReceivedMessage>>>;
    async fn receive(State(inbox): State<Inbox>, headers: HeaderMap, body: Bytes) {
        let message = ferry::webhook::received_message(
            headers
                .iter()
                .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))),
            body,
        )
        .unwrap();
        inbox.lock().unwrap().push(message);
    }

    let dir = services::tls_dir();
    let listener =
        tls_listener::TlsListener::bind(&dir.join("server.pem"), &dir.join("server.key")).await;
    let address = listener.address();
    let inbox = Inbox::default();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(inbox.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, inbox)
}

mod tls_listener {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::server::TlsStream;

    /// A TCP listener on a free loopback port whose connections are TLS-accepted before
    /// axum sees them; failed handshakes (a client that refused the certificate) are
    /// dropped.
    pub(crate) struct TlsListener {
        tcp: TcpListener,
        acceptor: TlsAcceptor,
    }

    impl TlsListener {
        pub(crate) async fn bind(cert: &Path, key: &Path) -> Self {
            let certs = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            Self {
                tcp: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                acceptor: TlsAcceptor::from(Arc::new(config)),
            }
        }

        pub(crate) fn address(&self) -> SocketAddr {
            self.tcp.local_addr().unwrap()
        }
    }

    impl axum::serve::Listener for TlsListener {
        type Io = TlsStream<TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, peer)) = self.tcp.accept().await else {
                    continue;
                };
                if let Ok(tls) = self.acceptor.accept(tcp).await {
                    return (tls, peer);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }
}

fn webhook_sink(address: SocketAddr, ca: &Path) -> String {
    format!(
        "[sink]\ntype = \"webhook\"\nurl = \"https://{address}/events\"\ntls_ca_file = \"{}\"\n",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_over_https_with_a_custom_ca_round_trip() {
    let (address, inbox) = https_receiver().await;
    let tag = unique_tag();
    let (scenario, outbox) =
        pg_tls_scenario(&tag, 4, &webhook_sink(address, &services::tls_ca_file())).await;
    let produced = produce(outbox, 20, 5, 2).await;
    relay_until_drained(&scenario).await;
    let received = inbox.lock().unwrap().clone();
    Report::of(received, &produced).assert_perfect(produced.len());
}

#[cfg(feature = "etcd-lease")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leases_over_https_round_trip() {
    let endpoint = services::etcd_tls_url();
    let ca = ca_for(&endpoint);
    ca_for(&services::nats_tls_url());
    let tag = unique_tag();
    let leases_and_sink = format!(
        "[leases]\ntype = \"etcd\"\nendpoints = [\"{endpoint}\"]\ntls_ca_file = \"{}\"\nkey_prefix = \"e{tag}/\"\n{}",
        ca.display(),
        nats_tls_sink(&tag, &ca)
    );
    let (scenario, outbox) = pg_tls_scenario(&tag, 4, &leases_and_sink).await;
    let produced = produce(outbox, 20, 5, 2).await;
    let relay = scenario.relay("relay");
    scenario.wait_drained(Duration::from_secs(60)).await;
    // `ferry status` reads the owners from etcd too (the store cannot know them).
    assert!(
        scenario.owners().iter().all(Option::is_some),
        "every partition should be owned through etcd:\n{}",
        relay.logs()
    );
    assert!(relay.terminate(Duration::from_secs(15)).success());
    Report::of(read_nats_tls(&tag, &ca).await, &produced).assert_perfect(produced.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_with_an_error_that_says_so_for_every_store_and_sink() {
    let wrong = services::tls_wrong_ca_file();
    let pg_ca = pg_ca();
    let tag = unique_tag();
    let outbox = outbox_section(&tag, 2, "[sink]\ntype = \"stdout\"\n");
    // The stores: `ferry migrate` refuses the server before touching anything.
    let pg = refused("migrate", &[&pg_tls_store(&wrong), &outbox]);
    assert_names_the_certificate(&pg, "127.0.0.1:5432");
    let mysql_url = services::mysql_tls_url(&wrong);
    ca_for(&mysql_url);
    let mysql = refused(
        "migrate",
        &[
            &format!("[store]\ntype = \"mysql\"\nurl = \"{mysql_url}\"\n"),
            &outbox,
        ],
    );
    assert_names_the_certificate(&mysql, "127.0.0.1:3307");
    let redis_url = services::redis_tls_url();
    ca_for(&redis_url);
    let redis = refused(
        "migrate",
        &[
            &format!(
                "[store]\ntype = \"redis\"\nurl = \"{redis_url}\"\ntls_ca_file = \"{}\"\nkey_prefix = \"e{tag}:\"\n",
                wrong.display()
            ),
            &outbox,
        ],
    );
    assert_names_the_certificate(&redis, "127.0.0.1:6380");

    // The lease backends and sinks: a relay on a good store stops at start-up.
    let good_store = pg_tls_store(&pg_ca);
    let outbox = outbox_section(&tag, 2, "");
    // Migrated, so that the relays below get as far as their leases and sinks.
    Scenario::new(&tag, &[&good_store, &outbox, "[sink]\ntype = \"stdout\""]);
    let relay_with = |extra: &str| refused("relay", &[&good_store, &outbox, extra, FAST_RELAY]);
    let leases = relay_with(&format!(
        "[leases]\ntype = \"redis\"\nurl = \"{redis_url}\"\ntls_ca_file = \"{}\"\nkey_prefix = \"e{tag}:\"\n\
         [sink]\ntype = \"stdout\"\n",
        wrong.display()
    ));
    assert_names_the_certificate(&leases, "127.0.0.1:6380");
    ca_for(&services::nats_tls_url());
    let nats = relay_with(&nats_tls_sink(&tag, &wrong));
    assert_names_the_certificate(&nats, "127.0.0.1:4223");
    let redis_sink = relay_with(&format!(
        "[sink]\ntype = \"redis_stream\"\nurl = \"{redis_url}\"\ntls_ca_file = \"{}\"\n\
         stream_template = \"e{tag}.{{partition}}\"\n",
        wrong.display()
    ));
    assert_names_the_certificate(&redis_sink, "127.0.0.1:6380");
    let amqp_url = services::amqp_tls_url();
    ca_for(&amqp_url);
    let amqp = relay_with(&format!(
        "[sink]\ntype = \"amqp\"\nurl = \"{amqp_url}\"\ntls_ca_file = \"{}\"\nexchange_template = \"e{tag}\"\n",
        wrong.display()
    ));
    assert_names_the_certificate(&amqp, "127.0.0.1:5671");
    let mqtt_url = services::mqtt_tls_url();
    ca_for(&mqtt_url);
    let mqtt = relay_with(&format!(
        "[sink]\ntype = \"mqtt\"\nurl = \"{mqtt_url}\"\ntls_ca_file = \"{}\"\n",
        wrong.display()
    ));
    assert_names_the_certificate(&mqtt, "127.0.0.1:8883");
    #[cfg(feature = "etcd-lease")]
    {
        let endpoint = services::etcd_tls_url();
        ca_for(&endpoint);
        let etcd = relay_with(&format!(
            "[leases]\ntype = \"etcd\"\nendpoints = [\"{endpoint}\"]\ntls_ca_file = \"{}\"\nkey_prefix = \"e{tag}/\"\n\
             [sink]\ntype = \"stdout\"\n",
            wrong.display()
        ));
        assert_names_the_certificate(&etcd, "127.0.0.1:23791");
    }
}

/// The webhook sink connects per request, so a relay keeps retrying (the receiver may be
/// given a trusted certificate) and says why each attempt failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_with_an_untrusted_certificate_is_named_in_the_relay_log() {
    let (address, inbox) = https_receiver().await;
    let tag = unique_tag();
    let (scenario, outbox) = pg_tls_scenario(
        &tag,
        1,
        &webhook_sink(address, &services::tls_wrong_ca_file()),
    )
    .await;
    produce(outbox, 1, 1, 1).await;
    let relay = scenario.relay("relay");
    relay
        .wait_for_log(
            "TLS certificate verification failed",
            Duration::from_secs(30),
        )
        .await;
    assert!(
        relay.logs().contains(&address.to_string()),
        "{}",
        relay.logs()
    );
    assert!(inbox.lock().unwrap().is_empty());
    assert_eq!(scenario.backlog(), 1);
    assert!(relay.terminate(Duration::from_secs(15)).success());
}
