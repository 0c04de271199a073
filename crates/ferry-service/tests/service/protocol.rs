//! The protocol end to end: prepare → confirm → NATS → ack; cancel; check-back; consumer
//! ack timeouts, redelivery, dead letters and retry.

use std::time::Duration;

use ferry::message::DELIVERY_ATTEMPT_HEADER;
use ferry::sql::TablePrefix;
use ferry::sqlite::{SqliteInbox, SqliteOutbox};
use ferry::{Processed, ReceivedMessage};
use uuid::Uuid;

use crate::harness::{
    ADMIN, Backend, Backing, CONSUMER, CheckServer, PRODUCER, Reply, Server, fast_settings,
    wait_for,
};

const WAIT: Duration = Duration::from_secs(20);

fn copies(
    messages: &[crate::harness::StreamMessage],
    id: Uuid,
) -> Vec<&crate::harness::StreamMessage> {
    messages.iter().filter(|m| m.received.id == id).collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

pub(crate) async fn prepare_confirm_deliver_ack(backend: Backend) {
    let backing = Backing::new(backend).await;
    let server = Server::start(&backing, fast_settings()).await;
    let check = CheckServer::start().await;
    let id = server.prepare("1", &check.url).await;
    assert_eq!(server.message(id).await["status"], "prepared");
    assert_eq!(
        backing.outbox_rows(id).await,
        0,
        "nothing is sent before confirm"
    );

    let (status, body) = server
        .post(&format!("/v1/messages/{id}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "confirmed");
    assert_eq!(body["version"], 1);
    let delivered = server.wait_status(id, "delivered", WAIT).await;
    assert!(delivered["ack_deadline"].is_string(), "{delivered}");

    let stream = backing.stream_messages().await;
    let sent = copies(&stream, id);
    assert_eq!(sent.len(), 1, "delivered exactly once");
    let received = &sent[0].received;
    assert_eq!(received.version, 1);
    assert_eq!(
        (
            received.aggregate_type.as_str(),
            received.aggregate_id.as_str()
        ),
        ("order", "1")
    );
    let payload: serde_json::Value = serde_json::from_slice(&received.payload).expect("JSON");
    assert_eq!(payload, serde_json::json!({"order": "1", "total": 10}));
    assert!(
        received.headers.contains_key("traceparent"),
        "{:?}",
        received.headers
    );
    assert!(!received.headers.contains_key(DELIVERY_ATTEMPT_HEADER));
    assert_eq!(sent[0].headers["Nats-Msg-Id"], id.to_string());

    let (status, body) = server
        .post(&format!("/v1/messages/{id}/ack"), Some(CONSUMER))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
    // Idempotent.
    let (status, _) = server
        .post(&format!("/v1/messages/{id}/ack"), Some(CONSUMER))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        server.message(id).await["reason"],
        "acknowledged by consumer"
    );

    // A second message of the same aggregate gets the next version.
    let second = server.prepare("1", &check.url).await;
    let (_, body) = server
        .post(&format!("/v1/messages/{second}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(body["version"], 2);
    server.wait_status(second, "delivered", WAIT).await;

    let metrics = server.text("/metrics").await;
    assert_eq!(
        metric(&metrics, "ferry_service_messages{status=\"completed\"}"),
        1.0
    );
    assert_eq!(
        metric(&metrics, "ferry_service_messages{status=\"delivered\"}"),
        1.0
    );
    assert!(metric(&metrics, "ferry_service_oldest_unacked_age_seconds") > 0.0);
    assert_eq!(metric(&metrics, "ferry_service_delivered_total"), 2.0);
    let backlog: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("ferry_outbox_backlog{partition="))
        .collect();
    assert!(!backlog.is_empty(), "per-partition backlog in:\n{metrics}");
    assert!(
        backlog.iter().all(|line| line.ends_with(" 0")),
        "{backlog:?}"
    );
    server.stop().await;
    backing.stop().await;
}

pub(crate) async fn prepare_cancel_is_never_sent(backend: Backend) {
    let backing = Backing::new(backend).await;
    let server = Server::start(&backing, fast_settings()).await;
    let check = CheckServer::start().await;
    let cancelled = server.prepare("2", &check.url).await;
    let confirmed = server.prepare("3", &check.url).await;
    let (status, body) = server
        .post(&format!("/v1/messages/{cancelled}/cancel"), Some(PRODUCER))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    let (status, _) = server
        .post(&format!("/v1/messages/{cancelled}/cancel"), Some(PRODUCER))
        .await;
    assert_eq!(status, 200, "cancel is idempotent");
    let (status, body) = server
        .post(&format!("/v1/messages/{cancelled}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "illegal_transition");
    assert_eq!(body["error"]["current_status"], "cancelled");

    // A message confirmed after it shows the relay has run past the cancelled one.
    server
        .post(&format!("/v1/messages/{confirmed}/confirm"), Some(PRODUCER))
        .await;
    server.wait_status(confirmed, "delivered", WAIT).await;
    let metrics = server.text("/metrics").await;
    assert_eq!(
        metric(&metrics, "ferry_service_messages{status=\"cancelled\"}"),
        1.0
    );
    server.stop().await;
    assert_eq!(backing.outbox_rows(cancelled).await, 0);
    let stream = backing.stream_messages().await;
    assert!(
        copies(&stream, cancelled).is_empty(),
        "a cancelled message is never sent"
    );
    assert_eq!(copies(&stream, confirmed).len(), 1);
    assert_eq!(
        backing.status(cancelled).await,
        ferry_service::Status::Cancelled
    );
    backing.stop().await;
}

/// A producer that dies after prepare: check-back settles the message.
pub(crate) async fn check_back_settles_abandoned_messages(backend: Backend) {
    let backing = Backing::new(backend).await;
    let mut settings = fast_settings();
    // Long enough for the test to set the producer's answers before the first check.
    settings.prepare_timeout = Duration::from_secs(1);
    settings.check_bearer_token = Some("check-secret-0123456789".to_owned().into());
    let server = Server::start(&backing, settings).await;
    let producer = CheckServer::start().await;
    let committed = server.prepare("10", &producer.url).await;
    let rolled_back = server.prepare("11", &producer.url).await;
    let unsure = server.prepare("12", &producer.url).await;
    let failing = server.prepare("13", &producer.url).await;
    producer.reply(committed, Reply::Committed);
    producer.reply(rolled_back, Reply::RolledBack);
    producer.reply(unsure, Reply::Unknown);
    producer.reply(failing, Reply::Fail);
    // A producer that is down: its check_url refuses connections.
    let gone = CheckServer::start().await;
    let unreachable = server.prepare("14", &gone.url).await;
    gone.stop();
    gone.reply(unreachable, Reply::Committed);

    let body = server.wait_status(committed, "delivered", WAIT).await;
    assert_eq!(body["reason"], "confirmed by check-back: committed");
    assert_eq!(body["version"], 1);
    let body = server.wait_status(rolled_back, "cancelled", WAIT).await;
    assert_eq!(body["reason"], "cancelled by check-back: rolled_back");
    for id in [unsure, failing, unreachable] {
        let body = server.wait_status(id, "check_failed", WAIT).await;
        assert_eq!(body["checks"], 3, "max_checks inconclusive checks: {body}");
        assert!(
            body["reason"]
                .as_str()
                .expect("reason")
                .starts_with("check-back 3 of 3"),
            "{body}"
        );
    }
    assert_eq!(producer.hits(unsure), 3);
    assert_eq!(producer.hits(failing), 3);
    assert_eq!(producer.hits(committed), 1);
    assert!(
        producer
            .authorizations()
            .iter()
            .all(|a| a.as_deref() == Some("Bearer check-secret-0123456789")),
        "check-backs carry the configured bearer token"
    );
    let unreachable_reason = server.message(unreachable).await["reason"].to_string();
    assert!(
        unreachable_reason.contains("request failed"),
        "{unreachable_reason}"
    );
    assert!(
        !unreachable_reason.contains(&gone.url),
        "no URL in reasons: {unreachable_reason}"
    );
    let metrics = server.text("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ferry_service_check_backs_total{outcome=\"committed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ferry_service_check_backs_total{outcome=\"rolled_back\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ferry_service_check_backs_total{outcome=\"unknown\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ferry_service_check_backs_total{outcome=\"error\"}"
        ),
        6.0
    );
    assert_eq!(metric(&metrics, "ferry_service_check_failed_total"), 3.0);
    assert_eq!(
        metric(&metrics, "ferry_service_messages{status=\"check_failed\"}"),
        3.0
    );

    // The producer learns the answers and comes back: an operator's retry settles them.
    producer.reply(unsure, Reply::Committed);
    producer.reply(failing, Reply::RolledBack);
    let back = CheckServer::start_on(gone.addr).await;
    back.reply(unreachable, Reply::Committed);
    for id in [unsure, failing, unreachable] {
        let (status, body) = server
            .post(&format!("/v1/messages/{id}/retry"), Some(ADMIN))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "prepared");
        assert_eq!(body["checks"], 0);
    }
    server.wait_status(unsure, "delivered", WAIT).await;
    server.wait_status(failing, "cancelled", WAIT).await;
    server.wait_status(unreachable, "delivered", WAIT).await;
    assert_eq!(back.hits(unreachable), 1);

    // A producer may also settle a check_failed message itself.
    let late = server.prepare("15", &producer.url).await;
    server.wait_status(late, "check_failed", WAIT).await;
    let (status, body) = server
        .post(&format!("/v1/messages/{late}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );
    server.wait_status(late, "delivered", WAIT).await;

    server.stop().await;
    let stream = backing.stream_messages().await;
    for id in [committed, unsure, unreachable, late] {
        assert_eq!(copies(&stream, id).len(), 1, "{id} sent once");
    }
    for id in [rolled_back, failing] {
        assert!(copies(&stream, id).is_empty(), "{id} never sent");
    }
    backing.stop().await;
}

/// A consumer that never acks: redelivered (reaching the consumer through the broker's
/// dedup window each time) up to max_deliveries, dead-lettered, retried, delivered again.
/// The consumer's inbox applies the message once.
pub(crate) async fn unacked_messages_are_redelivered_then_dead_lettered(backend: Backend) {
    let backing = Backing::new(backend).await;
    let mut settings = fast_settings();
    settings.ack.ack_timeout = Duration::from_millis(300);
    settings.ack.ack_timeout_max = Duration::from_millis(600);
    settings.ack.max_deliveries = 3;
    let server = Server::start(&backing, settings).await;
    let check = CheckServer::start().await;
    let id = server.prepare("20", &check.url).await;
    server
        .post(&format!("/v1/messages/{id}/confirm"), Some(PRODUCER))
        .await;
    let body = server.wait_status(id, "dead_lettered", WAIT).await;
    assert_eq!(body["deliveries"], 3);
    assert_eq!(body["reason"], "not acknowledged after 3 deliveries");
    let metrics = server.text("/metrics").await;
    assert_eq!(metric(&metrics, "ferry_service_redeliveries_total"), 2.0);
    assert_eq!(metric(&metrics, "ferry_service_dead_lettered_total"), 1.0);
    assert_eq!(
        metric(&metrics, "ferry_service_messages{status=\"dead_lettered\"}"),
        1.0
    );

    let stream = backing.stream_messages().await;
    let sent = copies(&stream, id);
    assert_eq!(
        sent.len(),
        3,
        "every delivery reached the stream within its dedup window"
    );
    let dedup_ids: Vec<&str> = sent
        .iter()
        .map(|m| m.headers["Nats-Msg-Id"].as_str())
        .collect();
    assert_eq!(
        dedup_ids,
        [id.to_string(), format!("{id}:2"), format!("{id}:3")]
    );
    assert!(
        sent.iter().all(|m| m.received.version == 1),
        "same version every time"
    );
    assert!(
        sent.iter().all(|m| m.headers["ce-id"] == id.to_string()),
        "same id every time"
    );

    let (status, body) = server
        .post(&format!("/v1/messages/{id}/retry"), Some(ADMIN))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );
    assert_eq!(
        body["deliveries"], 1,
        "a retry gives a fresh delivery budget"
    );
    server.wait_status(id, "delivered", WAIT).await;
    wait_for("the retried delivery in the stream", WAIT, || async {
        copies(&backing.stream_messages().await, id).len() == 4
    })
    .await;
    let stream = backing.stream_messages().await;
    let sent = copies(&stream, id);
    assert_eq!(sent[3].headers["Nats-Msg-Id"], format!("{id}:4"));
    assert_eq!(sent[3].received.headers[DELIVERY_ATTEMPT_HEADER], "4");

    // The consumer: every copy through its inbox, one application.
    let inbox_dir = tempfile::tempdir().expect("temp dir");
    let consumer_db = SqliteOutbox::connect(
        &format!(
            "sqlite://{}",
            inbox_dir.path().join("consumer.db").display()
        ),
        2,
        Default::default(),
    )
    .await
    .expect("consumer database");
    consumer_db.migrate(1).await.expect("inbox tables");
    let inbox = SqliteInbox::new("billing", &TablePrefix::default());
    let mut applied = 0;
    for message in &sent {
        let mut tx = consumer_db.pool().begin().await.expect("tx");
        let outcome = inbox
            .process(
                &mut tx,
                &message.received,
                async |_tx, _m: &ReceivedMessage| Ok::<_, std::convert::Infallible>(()),
            )
            .await
            .expect("processed");
        tx.commit().await.expect("commit");
        if let Processed::Applied { .. } = outcome {
            applied += 1;
        }
    }
    assert_eq!(applied, 1, "the inbox applies a redelivered message once");
    let (status, body) = server
        .post(&format!("/v1/messages/{id}/ack"), Some(CONSUMER))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
    server.stop().await;
    backing.stop().await;
}

/// Listing by status, page by page.
pub(crate) async fn listing_pages_through_every_message(backend: Backend) {
    let backing = Backing::new(backend).await;
    let server = Server::start(&backing, fast_settings()).await;
    let check = CheckServer::start().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(server.prepare(&format!("l{n}"), &check.url).await);
    }
    server
        .post(&format!("/v1/messages/{}/cancel", ids[1]), Some(PRODUCER))
        .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/messages?limit=2&cursor={c}"),
            None => "/v1/messages?limit=2".to_owned(),
        };
        let (status, page) = server.get(&path, Some(ADMIN)).await;
        assert_eq!(status, 200, "{page}");
        for message in page["messages"].as_array().expect("array") {
            assert!(
                message.get("payload").is_none(),
                "listings leave payloads out"
            );
            seen.push(
                message["id"]
                    .as_str()
                    .expect("id")
                    .parse::<Uuid>()
                    .expect("uuid"),
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    let (_, page) = server
        .get("/v1/messages?status=cancelled,confirmed", Some(ADMIN))
        .await;
    let listed: Vec<&str> = page["messages"]
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, [ids[1].to_string()]);
    assert!(page["next_cursor"].is_null());
    server.stop().await;
    backing.stop().await;
}
