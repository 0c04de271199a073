//! Redis Streams sink against a real server: `FERRY_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`. Every test writes streams under a prefix of its own and
//! deletes them at the end; the restart test runs a private `redis-server` on a free port.
#![cfg(feature = "redis-stream")]

#[path = "support/rebuilt.rs"]
mod rebuilt;

#[path = "support/redis_server.rs"]
mod redis_server;

#[path = "support/nodelay.rs"]
mod nodelay;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone as _, Utc};
use uuid::Uuid;

use ferry::redis_stream::redis::streams::StreamRangeReply;
use ferry::redis_stream::redis::{self, AsyncCommands as _};
use ferry::redis_stream::{RedisStreamSink, RedisStreamSinkConfig, decode_stream_id};
use ferry::{Delivery, Headers, Message, Sink, SinkError};
use ferry_core::testing::services;

use rebuilt::assert_rebuilt;
use redis_server::{PrivateRedis, free_port};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A config whose streams are `<prefix>.{aggregate_type}.{partition}` with a prefix of its own.
fn unique_config() -> (RedisStreamSinkConfig, String) {
    let tag = Uuid::now_v7().simple().to_string();
    let prefix = format!("ferrytest{}", &tag[20..]);
    let config = RedisStreamSinkConfig {
        url: services::redis_url().into(),
        stream_template: format!("{prefix}.{{aggregate_type}}.{{partition}}"),
        ..RedisStreamSinkConfig::default()
    };
    (config, prefix)
}

fn now_micros() -> DateTime<Utc> {
    Utc.timestamp_micros(Utc::now().timestamp_micros())
        .single()
        .unwrap_or_else(Utc::now)
}

fn message(aggregate_id: &str, version: u64, sequence: i64, payload: impl Into<Bytes>) -> Message {
    let mut headers = Headers::new();
    headers.insert(
        "traceparent".into(),
        format!("00-{version:032x}-{version:016x}-01"),
    );
    Message {
        id: Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        version,
        event_type: "order.paid".into(),
        payload: payload.into(),
        headers,
        partition_key: format!("order/{aggregate_id}"),
        partition: 3,
        created_at: now_micros(),
        sequence,
    }
}

fn all_ok(outcomes: Vec<std::result::Result<Delivery, SinkError>>) -> Result {
    for outcome in outcomes {
        outcome?;
    }
    Ok(())
}

async fn client(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let timeouts =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&timeouts)
        .await?)
}

/// Every entry of `stream`, in order.
async fn entries(url: &str, stream: &str) -> Result<StreamRangeReply> {
    Ok(client(url).await?.xrange_all(stream).await?)
}

fn ids(reply: &StreamRangeReply) -> Vec<&str> {
    reply.ids.iter().map(|entry| entry.id.as_str()).collect()
}

async fn delete_streams(url: &str, prefix: &str) -> Result {
    let mut connection = client(url).await?;
    let keys: Vec<String> = connection.keys(format!("{prefix}.*")).await?;
    if !keys.is_empty() {
        let _: () = connection.del(keys).await?;
    }
    Ok(())
}

/// The sink's connection sends at once: redis-rs leaves TCP_NODELAY off unless told.
#[tokio::test]
async fn the_connection_sends_without_waiting_for_acks() -> Result {
    let (config, _) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    sink.check().await?;
    nodelay::assert_connections_send_at_once(&services::redis_url(), 1, "redis-rs (TcpSettings)");
    Ok(())
}

#[tokio::test]
async fn publishes_cloudevents_fields_that_rebuild_the_message() -> Result {
    let (config, prefix) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    sink.check().await?;
    let mut batch = vec![
        message("42", 1, 10, r#"{"total":10}"#),
        message("42", 2, 11, r#"{"total":12}"#),
        message("7", 1, 15, vec![0u8, 159, 146, 150]),
    ];
    batch[2]
        .headers
        .insert("content-type".into(), "application/octet-stream".into());
    // A user header that clashes with ferry's field loses, as in the other sinks.
    batch[2].headers.insert("ce_id".into(), "spoofed".into());
    all_ok(sink.publish(&batch).await)?;

    let stream = format!("{prefix}.order.3");
    let stored = entries(&services::redis_url(), &stream).await?;
    assert_eq!(ids(&stored), ["10-0", "11-0", "15-0"]);
    for (sent, entry) in batch.iter().zip(&stored.ids) {
        let field = |name: &str| -> Option<String> {
            entry
                .map
                .get(name)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        };
        let expect = [
            ("ce_id", sent.id.to_string()),
            ("ce_type", sent.event_type.clone()),
            ("ce_source", format!("ferry://{}", sent.aggregate_type)),
            ("ce_subject", sent.aggregate_id.clone()),
            ("ce_time", ferry::cloudevents::format_time(&sent.created_at)),
            ("ce_specversion", "1.0".to_string()),
            ("ce_aggregatetype", sent.aggregate_type.clone()),
            ("ce_aggregateversion", sent.version.to_string()),
            ("ce_partitionkey", sent.partition_key.clone()),
            ("ce_sequence", sent.sequence.to_string()),
            ("content-type", sent.content_type().to_string()),
            ("traceparent", sent.headers["traceparent"].clone()),
            ("ce_traceparent", sent.headers["traceparent"].clone()),
        ];
        for (name, value) in expect {
            assert_eq!(field(name), Some(value), "field {name}");
        }
        assert_eq!(
            entry.map.len(),
            14,
            "no other fields: {:?}",
            entry.map.keys()
        );

        let received = decode_stream_id(entry)?;
        assert_rebuilt(&received, sent);
    }
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn a_batch_published_again_after_a_lost_ack_adds_nothing() -> Result {
    let (config, prefix) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    let batch: Vec<Message> = (1..=300)
        .map(|v| message("7", v, v as i64 * 3, "{}"))
        .collect();
    all_ok(sink.publish(&batch).await)?;
    // The relay saw no ack and sends the same batch again, then the next one.
    all_ok(sink.publish(&batch).await)?;
    let mut next = batch[250..].to_vec();
    next.push(message("7", 301, 1000, "{}"));
    all_ok(sink.publish(&next).await)?;

    let stored = entries(&services::redis_url(), &format!("{prefix}.order.3")).await?;
    assert_eq!(stored.ids.len(), 301, "each message once");
    let versions: Vec<u64> = stored
        .ids
        .iter()
        .map(|e| decode_stream_id(e).map(|m| m.version))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(versions, (1..=301).collect::<Vec<u64>>());
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn a_late_commit_goes_after_the_top_and_a_resend_of_it_is_recognised() -> Result {
    let (config, prefix) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    let stream = format!("{prefix}.order.3");
    let a1 = message("a", 1, 10, "{}");
    let b1 = message("b", 1, 20, "{}");
    all_ok(sink.publish(&[a1.clone(), b1.clone()]).await)?;
    // Sequence 15 committed after 20 was appended (another key: order per key holds).
    let c1 = message("c", 1, 15, "{}");
    let c2 = message("c", 2, 16, "{}");
    all_ok(sink.publish(&[c1.clone(), c2.clone()]).await)?;
    assert_eq!(
        ids(&entries(&services::redis_url(), &stream).await?),
        ["10-0", "20-0", "20-1", "20-2"]
    );
    // Re-sent (a lost ack, or a new owner), alone and with new messages: found, not added.
    all_ok(sink.publish(std::slice::from_ref(&c1)).await)?;
    all_ok(sink.publish(&[c1, c2, b1, message("b", 2, 30, "{}")]).await)?;
    let stored = entries(&services::redis_url(), &stream).await?;
    assert_eq!(ids(&stored), ["10-0", "20-0", "20-1", "20-2", "30-0"]);
    let keys: Vec<(String, u64)> = stored
        .ids
        .iter()
        .map(|e| decode_stream_id(e).map(|m| (m.aggregate_id, m.version)))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(
        keys,
        [("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2)].map(|(k, v)| (k.to_string(), v))
    );
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn a_late_commit_beyond_the_scan_is_appended_and_a_recent_copy_still_found() -> Result {
    let (mut config, prefix) = unique_config();
    config.dedup_scan_entries = 5;
    let sink = RedisStreamSink::connect(&config).await?;
    let stream = format!("{prefix}.order.3");
    let batch: Vec<Message> = (100..110)
        .map(|s| message("a", s as u64 - 99, s, "{}"))
        .collect();
    all_ok(sink.publish(&batch).await)?;
    let late = message("z", 1, 50, "{}");
    all_ok(sink.publish(std::slice::from_ref(&late)).await)?;
    all_ok(sink.publish(std::slice::from_ref(&late)).await)?;
    let stored = entries(&services::redis_url(), &stream).await?;
    assert_eq!(stored.ids.len(), 11);
    assert_eq!(stored.ids[10].id, "109-1");
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn another_message_at_the_same_id_blocks_with_a_conflict() -> Result {
    let (config, prefix) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    all_ok(
        sink.publish(&[message("a", 1, 5, "{}"), message("a", 2, 6, "{}")])
            .await,
    )?;
    // A recreated outbox hands out sequence 5 again, to another message.
    let outcomes = sink
        .publish(&[message("x", 1, 5, "{}"), message("x", 2, 7, "{}")])
        .await;
    let err = outcomes[0].as_ref().expect_err("conflict");
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("5-0") && err.to_string().contains("another message"),
        "{err}"
    );
    let not_sent = outcomes[1].as_ref().expect_err("nothing after it");
    assert!(not_sent.is_retryable());
    assert_eq!(
        entries(&services::redis_url(), &format!("{prefix}.order.3"))
            .await?
            .ids
            .len(),
        2
    );
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn streams_follow_the_template_and_a_key_of_another_type_is_permanent() -> Result {
    let (config, prefix) = unique_config();
    let sink = RedisStreamSink::connect(&config).await?;
    let mut invoice = message("9", 1, 1, "{}");
    invoice.aggregate_type = "invoice".into();
    invoice.partition = 5;
    let order = message("1", 1, 2, "{}");
    all_ok(sink.publish(&[invoice.clone(), order]).await)?;
    assert_eq!(
        ids(&entries(&services::redis_url(), &format!("{prefix}.invoice.5")).await?),
        ["1-0"]
    );
    assert_eq!(
        ids(&entries(&services::redis_url(), &format!("{prefix}.order.3")).await?),
        ["2-0"]
    );

    let mut connection = client(&services::redis_url()).await?;
    let _: () = connection
        .set(format!("{prefix}.note.1"), "not a stream")
        .await?;
    let mut note = message("n", 1, 3, "{}");
    note.aggregate_type = "note".into();
    note.partition = 1;
    let outcomes = sink.publish(&[note, message("1", 2, 4, "{}")]).await;
    let err = outcomes[0].as_ref().expect_err("wrong type");
    assert!(
        !err.is_retryable() && err.to_string().contains("not a stream"),
        "{err}"
    );
    assert!(
        outcomes[1].is_ok(),
        "another stream of the batch is not held up"
    );
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn a_batch_goes_in_windows_and_none_is_sent_after_a_failed_one() -> Result {
    let (mut config, prefix) = unique_config();
    config.max_entries_per_call = 3;
    let sink = RedisStreamSink::connect(&config).await?;
    let batch: Vec<Message> = (1..=10).map(|n| message("a", n, n as i64, "{}")).collect();
    all_ok(sink.publish(&batch).await)?;
    let stream = format!("{prefix}.order.3");
    let expected: Vec<String> = (1..=10).map(|n| format!("{n}-0")).collect();
    assert_eq!(
        ids(&entries(&services::redis_url(), &stream).await?),
        expected
    );

    // Windows [a11 a12 a13] [a14 a(seq 0) i1] [i2 i3 i4]: sequence 0 cannot be an entry id.
    // Within its window the failure holds up only its own stream (i1 is appended); the
    // window after it is not sent at all, whatever its stream.
    let mut batch: Vec<Message> = (11..=15)
        .map(|n| message("b", n - 10, n as i64, "{}"))
        .collect();
    batch[4].sequence = 0;
    for n in 1..=4 {
        let mut invoice = message("i", n, 15 + n as i64, "{}");
        invoice.aggregate_type = "invoice".into();
        batch.push(invoice);
    }
    let outcomes = sink.publish(&batch).await;
    assert_eq!(outcomes.len(), 9);
    assert!(outcomes[..4].iter().all(|o| o.is_ok()), "{outcomes:?}");
    let refused = outcomes[4].as_ref().expect_err("sequence 0");
    assert!(!refused.is_retryable(), "{refused}");
    assert!(outcomes[5].is_ok(), "{outcomes:?}");
    for outcome in &outcomes[6..] {
        let err = outcome.as_ref().expect_err("not sent");
        assert!(err.is_retryable(), "{err}");
    }
    let expected: Vec<String> = (1..=14).map(|n| format!("{n}-0")).collect();
    assert_eq!(
        ids(&entries(&services::redis_url(), &stream).await?),
        expected
    );
    assert_eq!(
        ids(&entries(&services::redis_url(), &format!("{prefix}.invoice.3")).await?),
        ["16-0"]
    );
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn max_len_trims_each_stream_approximately() -> Result {
    let (mut config, prefix) = unique_config();
    config.max_len = Some(1000);
    config.dedup_scan_entries = 1000;
    let sink = RedisStreamSink::connect(&config).await?;
    for round in 0..5i64 {
        let batch: Vec<Message> = (1..=1000)
            .map(|i| message("t", (round * 1000 + i) as u64, round * 1000 + i, "{}"))
            .collect();
        all_ok(sink.publish(&batch).await)?;
    }
    let length: u64 = client(&services::redis_url())
        .await?
        .xlen(format!("{prefix}.order.3"))
        .await?;
    assert!((1000..1200).contains(&length), "{length} entries kept");
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn two_relays_racing_on_one_partition_store_each_message_once_in_order() -> Result {
    let (config, prefix) = unique_config();
    let first = RedisStreamSink::connect(&config).await?;
    let second = RedisStreamSink::connect(&config).await?;
    // The new owner and a resumed zombie send overlapping batches, late commits included.
    let mut all: Vec<Message> = (1..=400)
        .map(|i| message(&format!("k{}", i % 7), i, i as i64 * 2, "{}"))
        .collect();
    let late: Vec<Message> = (1..=20)
        .map(|i| message(&format!("late{i}"), 1, i * 2 + 1, "{}"))
        .collect();
    all_ok(first.publish(&all[..200]).await)?;
    let new_owner = [late.clone(), all[200..].to_vec()].concat();
    let zombie = [all[100..300].to_vec(), late.clone(), all[300..].to_vec()].concat();
    let (a, b) = tokio::join!(first.publish(&new_owner), second.publish(&zombie));
    all_ok(a)?;
    all_ok(b)?;
    all.extend(late);
    let stored = entries(&services::redis_url(), &format!("{prefix}.order.3")).await?;
    let mut received: Vec<Uuid> = stored
        .ids
        .iter()
        .map(|e| decode_stream_id(e).map(|m| m.id))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(received.len(), all.len(), "no duplicate, nothing lost");
    let mut last_version = std::collections::HashMap::new();
    for entry in &stored.ids {
        let message = decode_stream_id(entry)?;
        let last = last_version.insert(message.aggregate_id.clone(), message.version);
        assert!(
            last < Some(message.version),
            "{} out of order",
            message.aggregate_id
        );
    }
    received.sort();
    let mut sent: Vec<Uuid> = all.iter().map(|m| m.id).collect();
    sent.sort();
    assert_eq!(received, sent);
    delete_streams(&services::redis_url(), &prefix).await
}

#[tokio::test]
async fn a_redis_down_at_start_or_restarted_is_retried_and_the_script_reloaded() -> Result {
    let port = free_port()?;
    let (mut config, prefix) = unique_config();
    config.url = format!("redis://127.0.0.1:{port}").into();
    config.response_timeout_secs = 2;
    let err = RedisStreamSink::connect(&config)
        .await
        .expect_err("nothing listens");
    assert!(
        err.is_retryable() && err.to_string().contains(&port.to_string()),
        "{err}"
    );

    let server = PrivateRedis::start(port)?;
    let sink = RedisStreamSink::connect(&config).await?;
    all_ok(sink.publish(&[message("a", 1, 1, "{}")]).await)?;

    server.stop();
    let outcomes = sink.publish(&[message("a", 2, 2, "{}")]).await;
    let err = outcomes[0].as_ref().expect_err("redis is down");
    assert!(err.is_retryable(), "{err}");

    // Down longer than the client's own reconnection attempts; no data survives the restart.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let server = PrivateRedis::start(port)?;
    let url = server.url();
    let deadline = Instant::now() + Duration::from_secs(20);
    let batch = [message("a", 2, 2, "{}"), message("a", 3, 3, "{}")];
    loop {
        let outcomes = sink.publish(&batch).await;
        match outcomes.iter().find_map(|o| o.as_ref().err()) {
            None => break,
            Some(err) => {
                assert!(err.is_retryable() && Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let stored = entries(&url, &format!("{prefix}.order.3")).await?;
    assert_eq!(ids(&stored), ["2-0", "3-0"]);
    server.stop();
    Ok(())
}
