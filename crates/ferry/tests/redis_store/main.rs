//! The Redis store and inbox against the real server (`FERRY_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each test uses its own key prefix. The persistence tests
//! start `redis-server` processes of their own on free loopback ports. `operations.rs`:
//! the operators' tools (blocked, skip, park, requeue, cleanup, replay selection).
#![cfg(all(feature = "redis-store", feature = "file"))]
#![allow(clippy::unwrap_used)]

#[path = "../support/nodelay.rs"]
mod nodelay;
mod operations;
#[path = "../shared/operations.rs"]
mod shared_operations;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry::file::{FileSink, FileSinkConfig};
use ferry::redis_store::{
    KeyPrefix, RedisInbox, RedisOutbox, RedisSettings, RedisWrites, parse_enqueued,
};
use ferry::{
    Admission, EnqueueError, Enqueued, InvalidMessage, LeaseStore, NewMessage, OutboxStore,
    Processed, ReceivedMessage, Relay, RelayConfig, StoreError, Takeover, Wakers, partition_for,
};
use ferry_core::testing::services;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use shared_operations::backlog;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn unique_prefix() -> KeyPrefix {
    KeyPrefix::new(format!("t{}:", &Uuid::now_v7().simple().to_string()[20..])).unwrap()
}

fn settings(prefix: KeyPrefix, retention: Duration) -> RedisSettings {
    RedisSettings {
        key_prefix: prefix,
        max_payload_bytes: 1024,
        retention,
        external_leases: false,
    }
}

/// A fresh outbox under a unique prefix on the shared Redis, migrated with `partitions`.
/// Its keys are removed when the test passes (`cleanup`).
async fn outbox_with(partitions: u32, retention: Duration) -> RedisOutbox {
    let outbox = RedisOutbox::connect(&services::redis_url(), settings(unique_prefix(), retention))
        .await
        .unwrap();
    outbox.migrate(partitions).await.unwrap();
    outbox
}

async fn outbox() -> RedisOutbox {
    outbox_with(4, Duration::ZERO).await
}

async fn cleanup(outbox: &RedisOutbox) {
    outbox.remove().await.unwrap();
}

/// The store's connection sends at once: redis-rs leaves TCP_NODELAY off unless told.
#[tokio::test]
async fn the_connection_sends_without_waiting_for_acks() {
    let outbox = outbox().await;
    nodelay::assert_connections_send_at_once(&services::redis_url(), 1, "redis-rs (TcpSettings)");
    cleanup(&outbox).await;
}

fn order_event(id: &str, event: &str) -> NewMessage {
    NewMessage::new("order", id, event, format!(r#"{{"order":"{id}"}}"#))
}

/// A plain client connection, as an application (or another language) would use.
async fn raw(outbox: &RedisOutbox) -> ConnectionManager {
    outbox.connection()
}

/// The keys under the outbox's prefix.
async fn keys_of(outbox: &RedisOutbox) -> Vec<String> {
    let mut conn = raw(outbox).await;
    let mut keys: Vec<String> = conn
        .keys(format!("{}*", outbox.key_prefix().as_str()))
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn fetch_all(outbox: &RedisOutbox) -> Vec<ferry::Message> {
    let mut all = Vec::new();
    for partition in 0..outbox.partitions().await.unwrap() {
        all.extend(outbox.fetch(partition, 100_000).await.unwrap());
    }
    all
}

fn lease_of(leases: &[ferry::Lease], partition: u32) -> &ferry::Lease {
    leases.iter().find(|l| l.partition == partition).unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_partitions_are_fixed() {
    let outbox = outbox().await;
    outbox.migrate(4).await.unwrap();
    assert_eq!(outbox.partitions().await.unwrap(), 4);
    let err = outbox.migrate(8).await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("4 partitions"), "{err}");
    assert!(err.to_string().contains("ferry migrate"), "{err}");
    let err = outbox.migrate(0).await.unwrap_err();
    assert!(err.to_string().contains("between 1 and 4096"), "{err}");
    // The enqueue script and its SHA are there for producers in other languages.
    let mut conn = raw(&outbox).await;
    let meta = format!("{}meta", outbox.key_prefix().as_str());
    let (text, sha): (String, String) = redis::cmd("HMGET")
        .arg(&meta)
        .arg("enqueue_script")
        .arg("enqueue_sha")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(text, RedisOutbox::enqueue_script());
    assert_eq!(sha, RedisOutbox::enqueue_script_sha());
    let loaded: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(&text)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(loaded, sha);
    // Leases start at an epoch taken from the server's clock, not at 0.
    let status = outbox.status().await.unwrap();
    assert_eq!(status.len(), 4);
    assert!(
        status.iter().all(|p| p.epoch > 1_600_000_000_000),
        "{status:?}"
    );
    cleanup(&outbox).await;
}

#[tokio::test]
async fn unmigrated_store_points_at_migrate() {
    let outbox = RedisOutbox::connect(
        &services::redis_url(),
        settings(unique_prefix(), Duration::ZERO),
    )
    .await
    .unwrap();
    let err = outbox.partitions().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(
        err.to_string().contains("no ferry outbox") && err.to_string().contains("ferry migrate"),
        "{err}"
    );
    let err = outbox.status().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    let err = outbox
        .acquire("r", 1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    let err = outbox
        .enqueue(&RedisWrites::new(), order_event("1", "order.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnqueueError::Store(StoreError::Schema(_))),
        "{err}"
    );
    assert!(keys_of(&outbox).await.is_empty(), "nothing was written");
}

#[tokio::test]
async fn bad_urls_and_credentials_are_named() {
    let settings = || settings(unique_prefix(), Duration::ZERO);
    let err = RedisOutbox::connect("http://127.0.0.1:6379", settings())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid Redis url"), "{err}");
    assert!(!err.is_retryable());

    let port = free_port();
    let err = RedisOutbox::connect(&format!("redis://127.0.0.1:{port}"), settings())
        .await
        .unwrap_err();
    assert!(
        err.is_retryable(),
        "an unreachable server is an outage: {err}"
    );

    let url = services::redis_url().replace("redis://", "redis://nobody:wrong@");
    let err = RedisOutbox::connect(&url, settings()).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("credentials"), "{err}");

    assert!(KeyPrefix::new("bad prefix*").is_err());
}

#[tokio::test]
async fn enqueue_writes_business_keys_and_the_message_together() {
    let outbox = outbox().await;
    let business = format!("app:{}", outbox.key_prefix().as_str());
    let mut writes = RedisWrites::new();
    writes
        .set(format!("{business}order:42"), r#"{"status":"paid"}"#)
        .hset(format!("{business}order:42:meta"), "paid_by", "card")
        .zadd(format!("{business}paid"), "42", 1700.5)
        .sadd(format!("{business}customers"), "c-7")
        .rpush(format!("{business}log"), "paid 42");
    let message = order_event("42", "order.paid").with_header(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    let enqueued = outbox.enqueue(&writes, message).await.unwrap();
    assert_eq!(enqueued.version, 1);
    assert_eq!(enqueued.partition, partition_for("order/42", 4));

    let mut conn = raw(&outbox).await;
    let order: String = conn.get(format!("{business}order:42")).await.unwrap();
    assert_eq!(order, r#"{"status":"paid"}"#);
    let paid_by: String = conn
        .hget(format!("{business}order:42:meta"), "paid_by")
        .await
        .unwrap();
    assert_eq!(paid_by, "card");
    let score: f64 = conn.zscore(format!("{business}paid"), "42").await.unwrap();
    assert_eq!(score, 1700.5);

    let fetched = outbox.fetch(enqueued.partition, 10).await.unwrap();
    assert_eq!(fetched.len(), 1);
    let m = &fetched[0];
    assert_eq!(m.id, enqueued.id);
    assert_eq!(m.sequence, enqueued.sequence);
    assert_eq!(
        (m.aggregate_type.as_str(), m.aggregate_id.as_str()),
        ("order", "42")
    );
    assert_eq!(m.event_type, "order.paid");
    assert_eq!(m.payload, Bytes::from(r#"{"order":"42"}"#));
    assert_eq!(
        m.headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(m.partition_key, "order/42");
    assert!((chrono::Utc::now() - m.created_at).num_seconds().abs() < 60);

    let next = outbox
        .enqueue(&RedisWrites::new(), order_event("42", "order.shipped"))
        .await
        .unwrap();
    assert_eq!(next.version, 2);
    assert!(next.sequence > enqueued.sequence);
    let _: () = redis::cmd("DEL")
        .arg(format!("{business}order:42"))
        .arg(format!("{business}order:42:meta"))
        .arg(format!("{business}paid"))
        .arg(format!("{business}customers"))
        .arg(format!("{business}log"))
        .query_async(&mut conn)
        .await
        .unwrap();
    cleanup(&outbox).await;
}

/// G1: when any part of the call is refused, nothing is written: not the business keys,
/// not the message, not its version.
#[tokio::test]
async fn g1_a_refused_call_writes_nothing_at_all() {
    let outbox = outbox().await;
    let business = format!("app:{}", outbox.key_prefix().as_str());
    let mut conn = raw(&outbox).await;
    let string_key = format!("{business}a-string");
    let _: () = conn.set(&string_key, "x").await.unwrap();
    let before = keys_of(&outbox).await;

    // The second write would fail at run time (WRONGTYPE): the first must not happen either.
    let mut writes = RedisWrites::new();
    writes
        .set(format!("{business}order:1"), "paid")
        .hset(&string_key, "field", "value");
    let err = outbox
        .enqueue(&writes, order_event("1", "order.paid"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs a hash"), "{err}");
    let written: bool = conn.exists(format!("{business}order:1")).await.unwrap();
    assert!(!written, "the business write was applied");
    assert_eq!(keys_of(&outbox).await, before, "ferry's keys changed");

    // A non-finite score, ferry's own keys, and an invalid message are refused the same way.
    let mut writes = RedisWrites::new();
    writes
        .set(format!("{business}order:1"), "paid")
        .zadd(format!("{business}z"), "m", f64::NAN);
    let err = outbox
        .enqueue(&writes, order_event("1", "order.paid"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("score"), "{err}");
    let mut writes = RedisWrites::new();
    writes.del(format!("{}p:0", outbox.key_prefix().as_str()));
    let err = outbox
        .enqueue(&writes, order_event("1", "order.paid"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("key prefix"), "{err}");
    let err = outbox
        .enqueue(&RedisWrites::new(), NewMessage::new("order", "", "x", "{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EnqueueError::Invalid(InvalidMessage::Empty {
                field: "aggregate_id"
            })
        ),
        "{err}"
    );
    // An id already in the outbox, within one call or across calls.
    let id = Uuid::now_v7();
    let mut duplicate = order_event("2", "order.paid");
    duplicate.id = Some(id);
    let err = outbox
        .enqueue_all(
            &RedisWrites::new(),
            vec![duplicate.clone(), duplicate.clone()],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already in the outbox"), "{err}");
    assert_eq!(keys_of(&outbox).await, before, "ferry's keys changed");
    assert_eq!(backlog(&outbox).await, 0);

    outbox
        .enqueue(&RedisWrites::new(), duplicate.clone())
        .await
        .unwrap();
    let err = outbox
        .enqueue(&RedisWrites::new(), duplicate)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already in the outbox"), "{err}");
    assert_eq!(backlog(&outbox).await, 1);
    let _: () = conn.del(&string_key).await.unwrap();
    cleanup(&outbox).await;
}

/// A producer in another language: loads the script text from the meta hash, calls it with
/// EVALSHA and the documented KEYS/ARGV, with a business write, and reads the reply.
#[tokio::test]
async fn another_language_calls_the_script_with_evalsha() {
    let outbox = outbox_with(8, Duration::ZERO).await;
    let prefix = outbox.key_prefix().as_str().to_owned();
    let business = format!("app:{prefix}invoice:9");
    let mut conn = raw(&outbox).await;
    let sha: String = conn
        .hget(format!("{prefix}meta"), "enqueue_sha")
        .await
        .unwrap();
    let id = Uuid::now_v7().to_string();
    let reply: redis::Value = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(1)
        .arg(&business)
        // key prefix, message count, write count
        .arg(&prefix)
        .arg(1)
        .arg(1)
        // id, aggregate_type, aggregate_id, event_type, payload, headers, partition_key
        .arg(&id)
        .arg("invoice")
        .arg("9")
        .arg("invoice.issued")
        .arg(r#"{"total":12}"#)
        .arg(r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#)
        .arg("")
        // SET on KEYS[1] with one argument
        .arg("SET")
        .arg(1)
        .arg(1)
        .arg("issued")
        .query_async(&mut conn)
        .await
        .unwrap();
    let enqueued = parse_enqueued(reply).unwrap();
    assert_eq!(enqueued.len(), 1);
    assert_eq!(enqueued[0].id.to_string(), id);
    assert_eq!(enqueued[0].version, 1);
    assert_eq!(enqueued[0].partition, partition_for("invoice/9", 8));
    let status: String = conn.get(&business).await.unwrap();
    assert_eq!(status, "issued");
    let fetched = outbox.fetch(enqueued[0].partition, 10).await.unwrap();
    assert_eq!(fetched[0].event_type, "invoice.issued");
    assert_eq!(
        fetched[0].headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );

    // Bad input from another language gets a FERRY_INVALID reply naming the problem.
    let err = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(0)
        .arg(&prefix)
        .arg(1)
        .arg(0)
        .arg("not-a-uuid")
        .arg("invoice")
        .arg("9")
        .arg("invoice.issued")
        .arg("{}")
        .arg("")
        .arg("")
        .query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("FERRY_INVALID"), "{err}");
    assert!(err.to_string().contains("not a UUID"), "{err}");
    assert_eq!(backlog(&outbox).await, 1);
    let _: () = conn.del(&business).await.unwrap();
    cleanup(&outbox).await;
}

/// The trace context: from Rust (`with_traceparent`), or as the script's optional trailing
/// arguments from another language; stored with the headers, malformed ones refused with
/// nothing written.
#[tokio::test]
async fn the_trace_context_is_stored_from_rust_and_from_the_script() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let outbox = outbox_with(1, Duration::ZERO).await;
    let traced = order_event("1", "order.paid")
        .with_traceparent(PARENT)
        .with_tracestate("rojo=1");
    outbox
        .enqueue(&RedisWrites::new(), traced.clone())
        .await
        .unwrap();
    let err = outbox
        .enqueue(
            &RedisWrites::new(),
            order_event("1", "order.paid").with_traceparent("00-abc-def-01"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("traceparent"), "{err}");

    let prefix = outbox.key_prefix().as_str().to_owned();
    let mut conn = raw(&outbox).await;
    let sha: String = conn
        .hget(format!("{prefix}meta"), "enqueue_sha")
        .await
        .unwrap();
    // id, aggregate_type, aggregate_id, event_type, payload, headers, partition_key, no
    // writes, then the trailing traceparent and tracestate.
    let call = |headers: &str, trace: &[&str]| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha).arg(0).arg(&prefix).arg(1).arg(0);
        cmd.arg(Uuid::now_v7().to_string())
            .arg("order")
            .arg("2")
            .arg("order.paid")
            .arg("{}")
            .arg(headers)
            .arg("");
        for value in trace {
            cmd.arg(*value);
        }
        cmd
    };
    let reply: redis::Value = call(r#"{"x-user":"7"}"#, &[PARENT, "congo=2"])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(parse_enqueued(reply).unwrap().len(), 1);
    for (headers, trace, named) in [
        ("", &["00-abc-def-01"][..], "traceparent"),
        ("", &[&PARENT.to_uppercase()[..]][..], "traceparent"),
        (r#"{"traceparent":"00-abc"}"#, &[][..], "traceparent"),
        (
            "",
            &["", "congo=2"][..],
            "tracestate goes with a traceparent",
        ),
        (
            &format!(r#"{{"traceparent":"{PARENT}"}}"#)[..],
            &[PARENT][..],
            "given twice",
        ),
    ] {
        let err = call(headers, trace)
            .query_async::<redis::Value>(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("FERRY_INVALID"), "{err}");
        assert!(err.to_string().contains(named), "{named}: {err}");
    }

    let fetched = outbox.fetch(0, 10).await.unwrap();
    assert_eq!(fetched.len(), 2, "the refused calls wrote nothing");
    assert_eq!(fetched[0].headers, traced.headers);
    assert_eq!(fetched[1].headers["traceparent"], PARENT);
    assert_eq!(fetched[1].headers["tracestate"], "congo=2");
    assert_eq!(fetched[1].headers["x-user"], "7");
    cleanup(&outbox).await;
}

/// The partition the script computes in Lua is Rust's `partition_for`, for many keys.
#[tokio::test]
async fn lua_partitions_equal_rust_partitions() {
    for partitions in [1, 7, 64, 4096] {
        let outbox = outbox_with(partitions, Duration::ZERO).await;
        let mut keys: Vec<String> = (0..600).map(|i| format!("order/{i}")).collect();
        keys.extend(["é", "日本語/キー", "a b\tc", "\u{1F600}", "x"].map(String::from));
        keys.extend((0..100).map(|i| "k".repeat(i + 1)));
        keys.extend((0..=255u8).map(|b| format!("byte-{}", char::from(b))));
        for chunk in keys.chunks(500) {
            let messages = chunk
                .iter()
                .map(|key| NewMessage::new("t", "1", "e", "{}").with_partition_key(key))
                .collect();
            let enqueued = outbox
                .enqueue_all(&RedisWrites::new(), messages)
                .await
                .unwrap();
            for (key, e) in chunk.iter().zip(&enqueued) {
                assert_eq!(
                    e.partition,
                    partition_for(key, partitions),
                    "key {key:?}, P {partitions}"
                );
            }
        }
        cleanup(&outbox).await;
    }
}

/// G2, G3: concurrent writers of the same aggregates get versions 1, 2, 3, … in the order
/// their calls ran, which is the order they are read back in; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_g3_concurrent_writers_get_versions_in_commit_order() {
    let outbox = outbox_with(4, Duration::ZERO).await;
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 150;
    const AGGREGATES: usize = 5;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..PER_WRITER {
                    let aggregate = (w + i) % AGGREGATES;
                    let messages = (0..1 + i % 3)
                        .map(|_| order_event(&aggregate.to_string(), "order.updated"))
                        .collect();
                    done.extend(
                        outbox
                            .enqueue_all(&RedisWrites::new(), messages)
                            .await
                            .unwrap(),
                    );
                }
                done
            })
        })
        .collect();
    let mut enqueued: Vec<Enqueued> = Vec::new();
    for task in tasks {
        enqueued.extend(task.await.unwrap());
    }
    let fetched = fetch_all(&outbox).await;
    assert_eq!(fetched.len(), enqueued.len());
    let ids: HashSet<Uuid> = fetched.iter().map(|m| m.id).collect();
    assert_eq!(ids, enqueued.iter().map(|e| e.id).collect());
    let mut per_aggregate: BTreeMap<&str, Vec<(i64, u64)>> = BTreeMap::new();
    for m in &fetched {
        per_aggregate
            .entry(&m.aggregate_id)
            .or_default()
            .push((m.sequence, m.version));
    }
    for (aggregate, mut rows) in per_aggregate {
        rows.sort_unstable();
        let versions: Vec<u64> = rows.iter().map(|(_, v)| *v).collect();
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(
            versions, expected,
            "aggregate {aggregate}: versions not in sequence order"
        );
    }
    // Each partition's stream is in sequence order.
    for partition in 0..4 {
        let messages = outbox.fetch(partition, 100_000).await.unwrap();
        assert!(messages.windows(2).all(|w| w[0].sequence < w[1].sequence));
    }
    cleanup(&outbox).await;
}

/// G5: a relay whose lease expired, and was granted to another, can mark nothing; the new
/// owner is told the takeover was unclean, with the old owner's checkpoint.
#[tokio::test]
async fn g5_marks_after_expiry_or_takeover_are_fenced() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    for i in 0..6 {
        outbox
            .enqueue(
                &RedisWrites::new(),
                order_event(&i.to_string(), "order.created"),
            )
            .await
            .unwrap();
    }
    let ttl = Duration::from_millis(400);
    let first = outbox.acquire("relay-a", 4, ttl).await.unwrap();
    assert_eq!(first.len(), 1);
    let a = first[0].clone();
    assert_eq!(a.takeover, Takeover::Clean, "never granted before");
    assert!(
        outbox.acquire("relay-b", 1, ttl).await.unwrap().is_empty(),
        "held by a"
    );

    let batch = outbox.fetch(0, 2).await.unwrap();
    let ids: Vec<Uuid> = batch.iter().map(|m| m.id).collect();
    assert_eq!(outbox.mark_published(&a, &ids, Some(17)).await.unwrap(), 2);
    assert_eq!(
        outbox.mark_published(&a, &ids, None).await.unwrap(),
        0,
        "marking twice is harmless"
    );
    assert_eq!(backlog(&outbox).await, 4);

    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let next = outbox.fetch(0, 2).await.unwrap();
    let next_ids: Vec<Uuid> = next.iter().map(|m| m.id).collect();
    let err = outbox
        .mark_published(&a, &next_ids, Some(99))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { partition: 0, .. }),
        "{err}"
    );
    assert_eq!(backlog(&outbox).await, 4, "an expired lease marks nothing");

    let taken = outbox
        .acquire("relay-b", 1, Duration::from_secs(5))
        .await
        .unwrap();
    let b = taken[0].clone();
    assert!(b.epoch > a.epoch);
    match b.takeover {
        Takeover::Unclean {
            since_expiry,
            checkpoint,
        } => {
            assert_eq!(
                checkpoint,
                Some(17),
                "the fenced mark did not move the checkpoint"
            );
            assert!(since_expiry < Duration::from_secs(5), "{since_expiry:?}");
        }
        Takeover::Clean => panic!("a's lease ran out unreleased: the takeover is unclean"),
    }
    let err = outbox
        .mark_published(&a, &next_ids, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(
        outbox.renew(std::slice::from_ref(&a), ttl).await.unwrap(),
        Vec::<u32>::new()
    );
    // a's late release and blocked reason change nothing either; the blocked reason is
    // refused as fenced, as every store does.
    outbox.release(&a, true).await.unwrap();
    let err = outbox.set_blocked(&a, Some("zombie")).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    let status = outbox.status().await.unwrap();
    assert_eq!(status[0].owner.as_deref(), Some("relay-b"));
    assert_eq!(status[0].blocked_reason, None);
    assert_eq!(outbox.mark_published(&b, &next_ids, None).await.unwrap(), 2);
    assert_eq!(backlog(&outbox).await, 2);
    cleanup(&outbox).await;
}

#[tokio::test]
async fn renew_release_heartbeat_and_takeover_kinds() {
    let outbox = outbox_with(4, Duration::ZERO).await;
    let ttl = Duration::from_secs(5);
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);
    assert_eq!(outbox.heartbeat("b", ttl).await.unwrap(), 2);
    assert_eq!(
        outbox
            .heartbeat("c", Duration::from_millis(1))
            .await
            .unwrap(),
        3
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        outbox.heartbeat("a", ttl).await.unwrap(),
        2,
        "c's heartbeat expired"
    );
    outbox.leave("b").await.unwrap();
    assert_eq!(outbox.heartbeat("a", ttl).await.unwrap(), 1);

    let leases = outbox.acquire("a", 2, ttl).await.unwrap();
    assert_eq!(leases.len(), 2);
    let rest = outbox.acquire("b", 10, ttl).await.unwrap();
    assert_eq!(rest.len(), 2);
    let mut all: Vec<u32> = leases.iter().chain(&rest).map(|l| l.partition).collect();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3]);

    let mut renewed = outbox.renew(&leases, ttl).await.unwrap();
    renewed.sort_unstable();
    let mut held: Vec<u32> = leases.iter().map(|l| l.partition).collect();
    held.sort_unstable();
    assert_eq!(renewed, held);
    let mut stale = leases[0].clone();
    stale.epoch -= 1;
    assert!(outbox.renew(&[stale], ttl).await.unwrap().is_empty());

    let (clean, unclean) = (&leases[0], &leases[1]);
    outbox.release(clean, true).await.unwrap();
    outbox.mark_published(unclean, &[], Some(5)).await.unwrap();
    outbox.release(unclean, false).await.unwrap();
    let again = outbox.acquire("c", 10, ttl).await.unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(lease_of(&again, clean.partition).takeover, Takeover::Clean);
    assert!(matches!(
        lease_of(&again, unclean.partition).takeover,
        Takeover::Unclean {
            checkpoint: Some(5),
            ..
        }
    ));
    cleanup(&outbox).await;
}

#[tokio::test]
async fn status_reports_owner_backlog_age_and_blocked_reason() {
    let outbox = outbox_with(2, Duration::ZERO).await;
    let first = outbox
        .enqueue(&RedisWrites::new(), order_event("1", "order.created"))
        .await
        .unwrap();
    outbox
        .enqueue(&RedisWrites::new(), order_event("1", "order.paid"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let leases = outbox
        .acquire("relay-a", 2, Duration::from_secs(5))
        .await
        .unwrap();
    let lease = lease_of(&leases, first.partition);
    outbox
        .set_blocked(lease, Some("message x rejected: too large"))
        .await
        .unwrap();
    let status = outbox.status().await.unwrap();
    let p = &status[first.partition as usize];
    assert_eq!(p.owner.as_deref(), Some("relay-a"));
    assert_eq!(p.epoch, lease.epoch);
    assert!(p.lease_expires_at.unwrap() > chrono::Utc::now());
    assert_eq!(p.backlog, 2);
    assert!(p.oldest_unpublished_age_secs.unwrap() >= 0.04, "{p:?}");
    assert_eq!(
        p.blocked_reason.as_deref(),
        Some("message x rejected: too large")
    );
    let other = &status[1 - first.partition as usize];
    assert_eq!(
        (other.backlog, other.oldest_unpublished_age_secs),
        (0, None)
    );

    outbox.set_blocked(lease, None).await.unwrap();
    outbox.release(lease, true).await.unwrap();
    let status = outbox.status().await.unwrap();
    let p = &status[first.partition as usize];
    assert_eq!(
        (p.owner.as_deref(), p.blocked_reason.as_deref()),
        (None, None)
    );
    cleanup(&outbox).await;
}

/// G6: published messages are deleted when marked, or kept for the retention and then purged.
#[tokio::test]
async fn g6_retention_keeps_published_messages_until_purged() {
    let kept = outbox_with(1, Duration::from_millis(800)).await;
    let dropped = outbox_with(1, Duration::ZERO).await;
    for outbox in [&kept, &dropped] {
        for i in 0..3 {
            outbox
                .enqueue(
                    &RedisWrites::new(),
                    order_event(&i.to_string(), "order.created"),
                )
                .await
                .unwrap();
        }
        let lease = outbox
            .acquire("r", 1, Duration::from_secs(5))
            .await
            .unwrap()
            .remove(0);
        let ids: Vec<Uuid> = outbox
            .fetch(0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(outbox.mark_published(&lease, &ids, None).await.unwrap(), 3);
        assert_eq!(backlog(outbox).await, 0);
        assert!(outbox.fetch(0, 10).await.unwrap().is_empty());
    }
    let mut conn = raw(&kept).await;
    let done = format!("{}done:0", kept.key_prefix().as_str());
    let kept_len: u64 = redis::cmd("XLEN")
        .arg(&done)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept_len, 3, "published messages are kept for the retention");
    assert_eq!(
        kept.purge_published().await.unwrap(),
        0,
        "not yet past the retention"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(kept.purge_published().await.unwrap(), 3);
    let kept_len: u64 = redis::cmd("XLEN")
        .arg(&done)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept_len, 0);

    let dropped_done: bool = conn
        .exists(format!("{}done:0", dropped.key_prefix().as_str()))
        .await
        .unwrap();
    assert!(!dropped_done, "without retention nothing is kept");
    assert_eq!(dropped.purge_published().await.unwrap(), 0);
    // The ids index holds unpublished messages only.
    for outbox in [&kept, &dropped] {
        let ids: u64 = conn
            .hlen(format!("{}ids", outbox.key_prefix().as_str()))
            .await
            .unwrap();
        assert_eq!(ids, 0);
    }
    cleanup(&kept).await;
    cleanup(&dropped).await;
}

/// The watcher's blocking read wakes the partition an enqueue wrote to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_wakes_the_partition_written_to() {
    let outbox = outbox_with(8, Duration::ZERO).await;
    let wakers = Arc::new(Wakers::new(8));
    let watcher = {
        let (outbox, wakers) = (outbox.clone(), Arc::clone(&wakers));
        tokio::spawn(async move { outbox.watch(&wakers).await })
    };
    let message = order_event("77", "order.created");
    let partition = partition_for("order/77", 8);
    // The watcher wakes every partition once when it starts; consume that first.
    tokio::time::timeout(Duration::from_secs(5), wakers.wait(partition))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    outbox.enqueue(&RedisWrites::new(), message).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), wakers.wait(partition))
        .await
        .expect("woken by the enqueue");
    let other = (partition + 1) % 8;
    let idle = tokio::time::timeout(Duration::from_millis(300), async {
        wakers.wait(other).await;
        wakers.wait(other).await;
    })
    .await;
    assert!(
        idle.is_err(),
        "an untouched partition is woken once (at start), not again"
    );
    watcher.abort();
    cleanup(&outbox).await;
}

/// The enqueue inside the caller's WATCH/MULTI/EXEC: a conflicting change to a watched key
/// aborts it, and nothing is written.
#[tokio::test]
async fn enqueue_command_in_a_watched_transaction() {
    let outbox = outbox().await;
    let client = redis::Client::open(services::redis_url()).unwrap();
    let mut tx_conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut other = raw(&outbox).await;
    let balance = format!("app:{}balance", outbox.key_prefix().as_str());
    let _: () = other.set(&balance, 10).await.unwrap();

    let attempt = async |conn: &mut redis::aio::MultiplexedConnection, interfere: bool| {
        let _: () = redis::cmd("WATCH")
            .arg(&balance)
            .query_async(conn)
            .await
            .unwrap();
        let current: i64 = redis::cmd("GET")
            .arg(&balance)
            .query_async(conn)
            .await
            .unwrap();
        if interfere {
            let _: () = raw(&outbox).await.set(&balance, 1000).await.unwrap();
        }
        let mut writes = RedisWrites::new();
        writes.set(&balance, (current + 5).to_string());
        let command = outbox
            .enqueue_command(&writes, vec![order_event("acct", "balance.changed")])
            .unwrap();
        let reply: Option<(redis::Value,)> = redis::pipe()
            .atomic()
            .add_command(command)
            .query_async(conn)
            .await
            .unwrap();
        reply.map(|(value,)| parse_enqueued(value).unwrap())
    };
    assert!(
        attempt(&mut tx_conn, true).await.is_none(),
        "EXEC aborted by the WATCH"
    );
    assert_eq!(backlog(&outbox).await, 0);
    let value: i64 = other.get(&balance).await.unwrap();
    assert_eq!(value, 1000);

    let enqueued = attempt(&mut tx_conn, false).await.expect("EXEC ran");
    assert_eq!(enqueued[0].version, 1);
    let value: i64 = other.get(&balance).await.unwrap();
    assert_eq!(value, 1005);
    assert_eq!(backlog(&outbox).await, 1);
    let _: () = other.del(&balance).await.unwrap();
    cleanup(&outbox).await;
}

fn received(id: Uuid, aggregate: &str, version: u64) -> ReceivedMessage {
    ReceivedMessage {
        id,
        aggregate_type: "order".into(),
        aggregate_id: aggregate.into(),
        version,
        event_type: "order.updated".into(),
        partition_key: format!("order/{aggregate}"),
        payload: Bytes::from_static(b"{}"),
        headers: Default::default(),
        time: None,
    }
}

/// G4 on Redis: a duplicate id or a version at or below the last applied one is never
/// applied, effects are written only with the record, and an expired id is still refused
/// by the version it carried.
#[tokio::test]
async fn g4_inbox_applies_each_message_once_and_never_a_stale_version() {
    let outbox = outbox().await;
    let prefix = outbox.key_prefix().clone();
    let inbox = RedisInbox::new(
        outbox.connection(),
        prefix.clone(),
        "billing",
        Duration::from_millis(300),
    )
    .unwrap();
    let effect = format!("app:{}invoices", prefix.as_str());
    let mut conn = raw(&outbox).await;
    let apply = async |message: &ReceivedMessage, writes: &mut RedisWrites| {
        writes.rpush(
            &effect,
            format!("{}@{}", message.aggregate_id, message.version),
        );
        Ok::<_, std::convert::Infallible>(message.version)
    };
    let v1 = received(Uuid::now_v7(), "1", 1);
    let v2 = received(Uuid::now_v7(), "1", 2);
    let v3 = received(Uuid::now_v7(), "1", 3);

    assert_eq!(
        inbox.process(&v1, apply).await.unwrap(),
        Processed::Applied {
            output: 1,
            previous_version: 0
        }
    );
    assert_eq!(
        inbox.process(&v1, apply).await.unwrap(),
        Processed::Duplicate
    );
    assert_eq!(
        inbox.process(&v3, apply).await.unwrap(),
        Processed::Applied {
            output: 3,
            previous_version: 1
        },
        "a gap is applied and reported through previous_version"
    );
    assert_eq!(
        inbox.process(&v2, apply).await.unwrap(),
        Processed::Stale {
            last_applied_version: 3
        }
    );
    let applied: Vec<String> = conn.lrange(&effect, 0, -1).await.unwrap();
    assert_eq!(applied, ["1@1", "1@3"], "effects only of applied messages");

    // Ids expire; the version record does not, so a late redelivery is still refused.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let expired: bool = conn
        .exists(format!("{}inbox:billing:id:{}", prefix.as_str(), v1.id))
        .await
        .unwrap();
    assert!(!expired, "the id record expired");
    assert_eq!(
        inbox.process(&v1, apply).await.unwrap(),
        Processed::Stale {
            last_applied_version: 3
        }
    );

    // A failing handler records nothing; a refused effect write records nothing either.
    let v4 = received(Uuid::now_v7(), "1", 4);
    let failed = inbox
        .process(&v4, async |_: &ReceivedMessage, _: &mut RedisWrites| {
            Err::<(), _>("handler failed")
        })
        .await;
    assert!(failed.is_err());
    let mut bad = RedisWrites::new();
    bad.set(format!("app:{}x", prefix.as_str()), "1")
        .hset(&effect, "f", "v");
    let err = inbox.admit(&v4, &bad).await.unwrap_err();
    assert!(err.to_string().contains("needs a hash"), "{err}");
    assert_eq!(
        inbox.check(&v4).await.unwrap(),
        Admission::Apply {
            previous_version: 3
        }
    );

    // Another consumer keeps its own record.
    let shipping = RedisInbox::new(
        outbox.connection(),
        prefix.clone(),
        "shipping",
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        shipping.admit(&v2, &RedisWrites::new()).await.unwrap()
            == Admission::Apply {
                previous_version: 0
            }
    );
    assert!(
        RedisInbox::new(
            outbox.connection(),
            prefix,
            "bad name",
            Duration::from_secs(1)
        )
        .is_err()
    );
    let _: () = conn.del(&effect).await.unwrap();
    cleanup(&outbox).await;
}

/// Two consumer instances racing on the same messages: each message is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_racing_consumer_instances_apply_each_message_once() {
    let outbox = outbox().await;
    let prefix = outbox.key_prefix().clone();
    let effect = format!("app:{}applied", prefix.as_str());
    let messages: Arc<Vec<ReceivedMessage>> = Arc::new(
        (1..=200)
            .map(|v| received(Uuid::now_v7(), &(v % 4).to_string(), v / 4 + 1))
            .collect(),
    );
    let instances: Vec<_> = (0..2)
        .map(|_| {
            let inbox = RedisInbox::new(
                outbox.connection(),
                prefix.clone(),
                "race",
                Duration::from_secs(60),
            )
            .unwrap();
            let messages = Arc::clone(&messages);
            let effect = effect.clone();
            tokio::spawn(async move {
                let mut applied = 0;
                for message in messages.iter() {
                    let outcome = inbox
                        .process(message, async |m: &ReceivedMessage, w: &mut RedisWrites| {
                            w.sadd(&effect, m.id.to_string());
                            Ok::<_, std::convert::Infallible>(())
                        })
                        .await
                        .unwrap();
                    applied += usize::from(outcome.is_applied());
                }
                applied
            })
        })
        .collect();
    let mut applied = 0;
    for instance in instances {
        applied += instance.await.unwrap();
    }
    let mut conn = raw(&outbox).await;
    let distinct: usize = conn.scard(&effect).await.unwrap();
    assert_eq!(applied, distinct, "a message applied twice");
    assert_eq!(distinct, 200);
    let _: () = conn.del(&effect).await.unwrap();
    cleanup(&outbox).await;
}

/// Reads a file sink's output back: one structured CloudEvent per line.
fn read_events(path: &Path) -> Vec<ReceivedMessage> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| ReceivedMessage::from_structured_json(line).unwrap())
        .collect()
}

/// Checks a consumer's view: every id in `produced` arrived, and what an inbox applies
/// (new id, version above the last) is each aggregate's versions 1, 2, 3, … without a gap.
fn assert_complete_and_in_order(events: &[ReceivedMessage], produced: &HashSet<Uuid>) {
    let seen: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    let missing = produced.difference(&seen).count();
    assert_eq!(missing, 0, "{missing} message(s) never arrived");
    let mut applied_ids = HashSet::new();
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for event in events {
        let last = last.entry(&event.aggregate_id).or_default();
        if event.version > *last && applied_ids.insert(event.id) {
            assert_eq!(
                event.version,
                *last + 1,
                "gap in aggregate {}",
                event.aggregate_id
            );
            *last = event.version;
        }
    }
    assert_eq!(applied_ids.len(), produced.len());
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct RunningRelay {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ferry::RelayError>>,
}

async fn start_relay(outbox: &RedisOutbox, name: &str, path: &Path) -> RunningRelay {
    let sink = FileSink::open(&FileSinkConfig {
        path: path.to_path_buf(),
        source: None,
    })
    .await
    .unwrap();
    let store = Arc::new(outbox.clone());
    let config = RelayConfig {
        batch_size: 100,
        lease_ttl: Duration::from_secs(2),
        poll_interval: Duration::from_secs(5),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        ..RelayConfig::new(name)
    };
    let relay = Relay::new(store.clone(), store, Arc::new(sink), config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    RunningRelay { shutdown, task }
}

impl RunningRelay {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Enqueues `rounds` events for each of `aggregates` aggregates, from 4 concurrent
/// producers, 5 messages per call, each producer pausing `pace` between calls; returns the
/// ids. A call whose outcome is unknown (the
/// server went away) is retried with the same ids, as an application should: if the first
/// attempt landed, the script refuses the ids as already in the outbox.
async fn produce(
    outbox: &RedisOutbox,
    aggregates: usize,
    rounds: std::ops::Range<usize>,
    pace: Duration,
) -> HashSet<Uuid> {
    let tasks: Vec<_> = (0..4)
        .map(|p| {
            let outbox = outbox.clone();
            let rounds = rounds.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                let mine: Vec<usize> = (0..aggregates).filter(|a| a % 4 == p).collect();
                for round in rounds {
                    for chunk in mine.chunks(5) {
                        tokio::time::sleep(pace).await;
                        let messages: Vec<NewMessage> = chunk
                            .iter()
                            .map(|a| NewMessage {
                                id: Some(Uuid::now_v7()),
                                ..NewMessage::new(
                                    "account",
                                    a.to_string(),
                                    "account.changed",
                                    format!(r#"{{"round":{round}}}"#),
                                )
                            })
                            .collect();
                        ids.extend(messages.iter().filter_map(|m| m.id));
                        let mut retried = false;
                        loop {
                            match outbox
                                .enqueue_all(&RedisWrites::new(), messages.clone())
                                .await
                            {
                                Ok(_) => break,
                                Err(EnqueueError::Store(err)) if err.is_retryable() => {
                                    retried = true;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Err(err)
                                    if retried
                                        && err.to_string().contains("already in the outbox") =>
                                {
                                    break;
                                }
                                Err(err) => panic!("enqueue failed: {err}"),
                            }
                        }
                    }
                }
                ids
            })
        })
        .collect();
    let mut all = HashSet::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// The relay loop end to end through a real sink: messages produced while it runs all
/// arrive once, in order per aggregate, the outbox drains, and shutdown releases leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delivers_everything_in_order_through_the_file_sink() {
    let outbox = outbox_with(8, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let relay = start_relay(&outbox, "relay-a", &path).await;
    let produced = produce(&outbox, 40, 0..25, Duration::ZERO).await;
    wait_until("the outbox drains", Duration::from_secs(60), async || {
        backlog(&outbox).await == 0
    })
    .await;
    relay.stop().await;
    let events = read_events(&path);
    assert_eq!(
        events.len(),
        produced.len(),
        "no duplicates without a crash"
    );
    assert_complete_and_in_order(&events, &produced);
    let status = outbox.status().await.unwrap();
    assert!(status.iter().all(|p| p.owner.is_none()), "{status:?}");
    cleanup(&outbox).await;
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own on a free loopback port, killed when dropped.
struct OwnRedis {
    dir: PathBuf,
    port: u16,
    appendonly: bool,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start(dir: &Path, appendonly: bool) -> Self {
        let mut server = Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            appendonly,
            child: None,
        };
        server.spawn().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let persistence: &[&str] = if self.appendonly {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        wait_until(
            "redis-server answers",
            Duration::from_secs(10),
            async || match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
        )
        .await;
    }

    /// kill -9: no shutdown save, no goodbye to clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// With `appendfsync always`, a Redis killed with -9 while messages are being produced and
/// relayed comes back with every acknowledged enqueue; the relay reconnects by itself and
/// delivers everything, in order per aggregate (re-sends of unmarked messages allowed, as
/// the file sink has no dedup: an inbox drops them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_kill_and_restart_with_aof_always() {
    let data = tempfile::tempdir().unwrap();
    let mut server = OwnRedis::start(data.path(), true).await;
    let outbox = RedisOutbox::connect(
        &server.url(),
        settings(KeyPrefix::default(), Duration::ZERO),
    )
    .await
    .unwrap();
    outbox.migrate(4).await.unwrap();
    let before = produce(&outbox, 20, 0..10, Duration::ZERO).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("events.jsonl");
    let relay = start_relay(&outbox, "relay-a", &path).await;
    let producing = {
        let outbox = outbox.clone();
        tokio::spawn(async move { produce(&outbox, 20, 10..40, Duration::from_millis(30)).await })
    };
    wait_until(
        "the relay has published some",
        Duration::from_secs(10),
        async || read_events(&path).len() > 100,
    )
    .await;
    assert!(
        !producing.is_finished(),
        "the kill must come while producers write"
    );
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.spawn().await;
    let mut produced = producing.await.unwrap();
    produced.extend(before);
    assert_eq!(produced.len(), 20 * 40);
    wait_until(
        "the outbox drains after the restart",
        Duration::from_secs(60),
        async || {
            outbox
                .status()
                .await
                .is_ok_and(|s| s.iter().all(|p| p.backlog == 0))
        },
    )
    .await;
    wait_until(
        "every message reaches the sink",
        Duration::from_secs(30),
        async || {
            let seen: HashSet<Uuid> = read_events(&path).iter().map(|e| e.id).collect();
            produced.is_subset(&seen)
        },
    )
    .await;
    relay.stop().await;
    assert_complete_and_in_order(&read_events(&path), &produced);
    // The scripts were gone after the restart (no persistence of the script cache): the
    // NOSCRIPT fallback reloaded them.
    outbox
        .enqueue(&RedisWrites::new(), order_event("after", "order.created"))
        .await
        .unwrap();
}

/// What happens without persistence: a restart loses the outbox, and ferry says so (the
/// relay and producers get a schema error pointing at `ferry migrate`) rather than going
/// on as if nothing happened.
#[tokio::test]
async fn without_persistence_a_restart_loses_the_outbox_and_says_so() {
    let data = tempfile::tempdir().unwrap();
    let mut server = OwnRedis::start(data.path(), false).await;
    let outbox = RedisOutbox::connect(
        &server.url(),
        settings(KeyPrefix::default(), Duration::ZERO),
    )
    .await
    .unwrap();
    outbox.migrate(2).await.unwrap();
    outbox
        .enqueue(&RedisWrites::new(), order_event("1", "order.created"))
        .await
        .unwrap();
    server.kill();
    server.spawn().await;
    wait_until(
        "the connection comes back",
        Duration::from_secs(10),
        async || !matches!(outbox.partitions().await, Err(StoreError::Unavailable(_))),
    )
    .await;
    let err = outbox.partitions().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    let err = outbox
        .enqueue(&RedisWrites::new(), order_event("1", "order.paid"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ferry migrate"), "{err}");
}
