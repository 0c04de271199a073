//! MySQL / MariaDB store and inbox against the real server (`FERRY_TEST_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`). Each test uses its own table prefix.
#![cfg(all(feature = "mysql", feature = "file"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    Applied, InboxUnderTest, OutboxUnderTest,
    concurrent_writers_of_one_aggregate_get_versions_in_commit_order, enqueue_committed,
    inbox_rolls_back_with_the_handler, inbox_skips_duplicate_ids_and_stale_versions,
    mark_is_fenced_after_the_lease_is_taken_over, order_event, received, relay_into_file,
    retention_keeps_published_rows_until_purged, rolled_back_transaction_leaves_no_message,
    versions_per_aggregate,
};
use ferry::error_chain;
use ferry::mysql::{MyInbox, MyOutbox};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{
    EnqueueError, Enqueued, Headers, InvalidMessage, LeaseStore, NewMessage, OutboxStore,
    Processed, ReceivedMessage, StoreError, partition_for,
};
use sqlx::Row;
use sqlx::types::Json;
use uuid::Uuid;

fn mysql_url() -> String {
    std::env::var("FERRY_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

fn unique_prefix() -> TablePrefix {
    TablePrefix::new(format!("t{}_", &Uuid::now_v7().simple().to_string()[20..])).unwrap()
}

/// A fresh outbox with a unique prefix, migrated with `partitions`.
async fn outbox_with(partitions: u32, retention: Duration) -> MyOutbox {
    let settings = StoreSettings {
        table_prefix: unique_prefix(),
        max_payload_bytes: 64 * 1024,
        retention,
        ..StoreSettings::default()
    };
    let outbox = MyOutbox::connect(&mysql_url(), 8, settings).await.unwrap();
    outbox.migrate(partitions).await.unwrap();
    outbox
}

async fn outbox() -> MyOutbox {
    outbox_with(4, Duration::ZERO).await
}

impl OutboxUnderTest for MyOutbox {
    async fn write(
        &self,
        messages: Vec<NewMessage>,
        hold: Duration,
        commit: bool,
    ) -> Vec<Enqueued> {
        let mut tx = self.pool().begin().await.unwrap();
        let mut enqueued = Vec::with_capacity(messages.len());
        for message in messages {
            enqueued.push(self.enqueue(&mut tx, message).await.unwrap());
        }
        tokio::time::sleep(hold).await;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        enqueued
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = self
            .table_prefix()
            .render(&format!("SELECT COUNT(*) FROM {{p}}{table}"));
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(self.pool())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn migrate_is_idempotent_and_partitions_are_fixed() {
    let outbox = outbox().await;
    outbox.migrate(4).await.unwrap();
    assert_eq!(outbox.partitions().await.unwrap(), 4);
    assert_eq!(outbox.count("leases").await, 4);
    let err = outbox.migrate(8).await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("4 partitions"), "{err}");
}

#[tokio::test]
async fn concurrent_migrations_queue_on_the_lock_and_all_succeed() {
    let settings = StoreSettings {
        table_prefix: unique_prefix(),
        ..StoreSettings::default()
    };
    let outbox = MyOutbox::connect(&mysql_url(), 4, settings).await.unwrap();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.migrate(8).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    assert_eq!(outbox.partitions().await.unwrap(), 8);
    assert_eq!(outbox.count("leases").await, 8);
    enqueue_committed(&outbox, order_event("1", "order.created")).await;
}

#[tokio::test]
async fn missing_tables_point_to_migrate() {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new("never_migrated_").unwrap(),
        ..StoreSettings::default()
    };
    let outbox = MyOutbox::connect(&mysql_url(), 2, settings).await.unwrap();
    let err = outbox.partitions().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("ferry migrate"), "{err}");
    let err = outbox.fetch(0, 10).await.unwrap_err();
    assert!(err.to_string().contains("ferry migrate"), "{err}");
    // The producer path names the missing procedure the same way.
    let mut tx = outbox.pool().begin().await.unwrap();
    let err = outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnqueueError::Store(StoreError::Schema(_))),
        "{err}"
    );
    assert!(err.to_string().contains("ferry migrate"), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_named_and_not_retried() {
    let url = mysql_url().replacen("mysql://root@", "mysql://root:wrong-password@", 1);
    let err = MyOutbox::connect(&url, 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let text = error_chain(&err);
    assert!(
        text.contains("refused user \"root\"")
            && text.contains("store.url")
            && text.contains("Access denied"),
        "{text}"
    );
    let url = format!("{}_no_such_database", mysql_url());
    let err = MyOutbox::connect(&url, 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(error_chain(&err).contains("database"), "{err}");
}

#[tokio::test]
async fn unreachable_server_is_a_retryable_error_naming_the_address() {
    let err = MyOutbox::connect("mysql://root@127.0.0.1:1/test", 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = error_chain(&err);
    assert!(text.contains("cannot reach MySQL at 127.0.0.1:1"), "{text}");
}

#[tokio::test]
async fn g1_rolled_back_transaction_leaves_no_message() {
    rolled_back_transaction_leaves_no_message(&outbox().await).await;
}

#[tokio::test]
async fn invalid_message_is_refused_and_the_transaction_stays_usable() {
    let outbox = outbox().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let err = outbox
        .enqueue(
            &mut tx,
            NewMessage::new("order", "1", "order.created", vec![b'x'; 70_000]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EnqueueError::Invalid(InvalidMessage::PayloadTooLarge { size: 70_000, .. })
        ),
        "{err}"
    );
    outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.count("outbox").await, 1);
}

#[tokio::test]
async fn payloads_are_arbitrary_bytes_and_headers_round_trip() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(3 * 256 + 7).collect();
    let payloads = [
        every_byte,
        Vec::new(),
        b"\0\0\0".to_vec(),
        vec![0xff; 60_000],
        "{\"name\": \"\u{e9}lodie \u{65e5}\u{672c}\"}"
            .as_bytes()
            .to_vec(),
    ];
    let mut sent = Vec::new();
    for (n, payload) in payloads.iter().enumerate() {
        let message = NewMessage::new("blob", n.to_string(), "blob.stored", payload.clone())
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("content-type", "application/octet-stream")
            .with_header(
                "x-name",
                "\u{e9}l\u{f6}die \u{65e5}\u{672c} \"quoted\" \\ back",
            );
        sent.push((
            enqueue_committed(&outbox, message.clone()).await.id,
            message,
        ));
    }
    let fetched = outbox.fetch(0, 100).await.unwrap();
    assert_eq!(fetched.len(), sent.len());
    for (message, (id, original)) in fetched.iter().zip(&sent) {
        assert_eq!(message.id, *id);
        assert_eq!(message.payload, original.payload, "payload of {id}");
        assert_eq!(message.headers, original.headers, "headers of {id}");
        assert_eq!(message.content_type(), "application/octet-stream");
    }
}

/// MariaDB stores JSON as LONGTEXT and reports JSON values from functions or casts as
/// binary strings; the store decodes both, and the procedure accepts JSON built in SQL.
#[tokio::test]
async fn json_headers_decode_whether_reported_as_text_or_binary() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    let procedure = outbox.table_prefix().render("{p}enqueue");
    let sql = format!(
        "CALL {procedure}('order', '7', 'order.paid', '{{\"total\": 10}}', \
         JSON_OBJECT('traceparent', '00-abc-01', 'x-city', 'K\u{f6}ln'), NULL, NULL)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    let expected: Headers = [
        ("traceparent".to_owned(), "00-abc-01".to_owned()),
        ("x-city".to_owned(), "K\u{f6}ln".to_owned()),
    ]
    .into();
    let fetched = outbox.fetch(0, 10).await.unwrap();
    assert_eq!(fetched[0].headers, expected);
    assert_eq!(&fetched[0].payload[..], b"{\"total\": 10}");

    let table = outbox.table_prefix().render("{p}outbox");
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT headers, CAST(headers AS BINARY) AS binary_headers, \
         JSON_EXTRACT(headers, '$') AS extracted FROM {table}"
    )))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    for column in ["headers", "binary_headers", "extracted"] {
        let Json(headers): Json<Headers> = row.try_get(column).unwrap();
        assert_eq!(headers, expected, "{column}");
    }
}

#[tokio::test]
async fn the_enqueue_procedure_matches_the_rust_api() {
    let outbox = outbox_with(16, Duration::ZERO).await;
    let procedure = outbox.table_prefix().render("{p}enqueue");
    let call = format!("CALL {procedure}('invoice', ?, 'invoice.sent', '{{}}', NULL, ?, NULL)");
    let mut keys: Vec<String> = [
        "order/1",
        "order/42",
        "customer/\u{e9}lodie",
        "tenant-7",
        "x/\u{65e5}\u{672c}",
        " padded ",
        "emoji/\u{1f600}",
    ]
    .iter()
    .map(|k| (*k).to_owned())
    .collect();
    keys.extend((0..500).map(|i| format!("order/{i}")));
    for (n, key) in keys.iter().enumerate() {
        let row = sqlx::query(sqlx::AssertSqlSafe(call.clone()))
            .bind(n.to_string())
            .bind(key)
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        let partition: i32 = row.get("message_partition");
        assert_eq!(
            partition as u32,
            partition_for(key, 16),
            "partition of {key:?}"
        );
        let id: Uuid = row.get("message_id");
        assert_eq!(id.get_version_num(), 7, "SQL ids are UUID v7");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let millis = id.get_timestamp().unwrap().to_unix();
        let age = chrono::Utc::now().timestamp() - millis.0 as i64;
        assert!(age.abs() < 60, "the id's time is now, not {millis:?}");
    }
    // The default key, and versions shared with the Rust API on the same aggregate.
    let call = format!("CALL {procedure}('order', '9', 'order.created', '{{}}', NULL, NULL, NULL)");
    let v1: i64 = sqlx::query(sqlx::AssertSqlSafe(call))
        .fetch_one(outbox.pool())
        .await
        .unwrap()
        .get("message_version");
    let v2 = enqueue_committed(&outbox, order_event("9", "order.paid")).await;
    assert_eq!((v1, v2.version), (1, 2));
    assert_eq!(v2.partition, partition_for("order/9", 16));
    // Names are compared byte for byte: a trailing space is another aggregate.
    let padded = enqueue_committed(&outbox, order_event("9 ", "order.created")).await;
    assert_eq!(padded.version, 1);
    // Too long for the column: an error, never a silent truncation.
    let call = format!("CALL {procedure}('order', ?, 'order.created', '{{}}', NULL, NULL, NULL)");
    let err = sqlx::query(sqlx::AssertSqlSafe(call))
        .bind("x".repeat(300))
        .fetch_one(outbox.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
}

#[tokio::test]
async fn g3_concurrent_writers_of_one_aggregate_get_versions_in_commit_order() {
    concurrent_writers_of_one_aggregate_get_versions_in_commit_order(&outbox().await, 4).await;
}

#[tokio::test]
async fn deadlocks_lock_timeouts_and_lost_connections_are_retryable() {
    let outbox = outbox().await;
    // Two transactions lock aggregates a and b in opposite orders: InnoDB rolls one back.
    let mut first = outbox.pool().begin().await.unwrap();
    let mut second = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut first, order_event("a", "x"))
        .await
        .unwrap();
    outbox
        .enqueue(&mut second, order_event("b", "x"))
        .await
        .unwrap();
    let (one, two) = tokio::join!(outbox.enqueue(&mut first, order_event("b", "x")), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        outbox.enqueue(&mut second, order_event("a", "x")).await
    });
    let err = one
        .err()
        .or(two.err())
        .expect("one side is the deadlock victim");
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
    drop((first, second));

    // A lock wait timeout (1205) while another transaction holds the aggregate.
    let mut holder = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut holder, order_event("c", "x"))
        .await
        .unwrap();
    let mut waiter = outbox.pool().begin().await.unwrap();
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut *waiter)
        .await
        .unwrap();
    let err = outbox
        .enqueue(&mut waiter, order_event("c", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
    drop((holder, waiter));

    // The server kills the connection under an open transaction.
    let mut tx = outbox.pool().begin().await.unwrap();
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
        .execute(outbox.pool())
        .await
        .unwrap();
    let err = outbox
        .enqueue(&mut tx, order_event("d", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
}

#[tokio::test]
async fn g5_mark_is_fenced_after_the_lease_is_taken_over() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    let fenced = mark_is_fenced_after_the_lease_is_taken_over(&outbox).await;
    assert!(
        matches!(
            outbox.set_blocked(&fenced, Some("late")).await,
            Err(StoreError::Fenced { .. })
        ),
        "a fenced relay cannot record a blocked reason either"
    );
}

#[tokio::test]
async fn two_relays_acquiring_at_once_never_share_a_partition() {
    let outbox = outbox_with(32, Duration::ZERO).await;
    let grants: Vec<_> = (0..4)
        .map(|r| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox
                    .acquire(&format!("relay-{r}"), 32, Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut owned = HashSet::new();
    for grant in grants {
        for lease in grant.await.unwrap() {
            assert_eq!(lease.epoch, 1);
            assert!(
                owned.insert(lease.partition),
                "{} granted twice",
                lease.partition
            );
        }
    }
    assert_eq!(owned.len(), 32, "every partition granted once");
}

#[tokio::test]
async fn marks_any_number_of_ids_in_one_fenced_transaction() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..2500 {
        ids.push(
            outbox
                .enqueue(&mut tx, order_event(&i.to_string(), "order.created"))
                .await
                .unwrap()
                .id,
        );
    }
    tx.commit().await.unwrap();
    let lease = outbox
        .acquire("r", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    // 1024 + 1024 + 452 ids, with a repeat and an unknown id mixed in.
    let mut marking = ids[..2000].to_vec();
    marking.push(ids[0]);
    marking.push(Uuid::now_v7());
    assert_eq!(
        outbox.mark_published(&lease, &marking, None).await.unwrap(),
        2000
    );
    let left = outbox.fetch(0, 5000).await.unwrap();
    assert_eq!(
        left.iter().map(|m| m.id).collect::<Vec<_>>(),
        ids[2000..].to_vec()
    );
    assert_eq!(
        outbox
            .mark_published(&lease, &ids[2000..2003], None)
            .await
            .unwrap(),
        3
    );
}

/// Producers keep uncommitted rows in the partitions the relay is marking, and both go on.
/// (The mark locks only the rows it marks, through the id index: a scan of the partition
/// would wait on an uncommitted row while holding gaps producers insert into, a deadlock
/// that depends on the planner's choice; the end-to-end tests hit it when it was possible.)
#[tokio::test]
async fn marks_and_producers_of_the_same_partitions_both_proceed() {
    // Several partitions, so that the planner finds a scan of one partition selective.
    let outbox = outbox_with(8, Duration::ZERO).await;
    let leases = outbox
        .acquire("r", 8, Duration::from_secs(120))
        .await
        .unwrap();
    let (producers, transactions, per_tx) = (4, 30, 10);
    let producing = futures::future::join_all((0..producers).map(|p| {
        let outbox = outbox.clone();
        async move {
            for i in 0..transactions {
                let mut tx = outbox.pool().begin().await.unwrap();
                for a in 0..per_tx {
                    let id = format!("{p}-{a}");
                    outbox
                        .enqueue(&mut tx, order_event(&id, &format!("step{i}")))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tx.commit().await.unwrap();
            }
        }
    }));
    let marking = futures::future::join_all(leases.iter().map(|lease| {
        let outbox = &outbox;
        async move {
            let mut idle_rounds = 0;
            let mut marked = 0;
            while idle_rounds < 200 {
                let ids: Vec<Uuid> = outbox
                    .fetch(lease.partition, 200)
                    .await
                    .unwrap()
                    .iter()
                    .map(|m| m.id)
                    .collect();
                if ids.is_empty() {
                    idle_rounds += 1;
                } else {
                    idle_rounds = 0;
                    marked += outbox.mark_published(lease, &ids, None).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            marked
        }
    }));
    let ((), marked) = tokio::join!(
        async {
            producing.await;
        },
        marking
    );
    assert_eq!(
        marked.iter().sum::<u64>(),
        producers * transactions * per_tx
    );
}

#[tokio::test]
async fn heartbeat_counts_live_relays() {
    common::heartbeat_counts_live_relays(&outbox().await).await;
}

#[tokio::test]
async fn g6_retention_keeps_published_rows_until_purged() {
    retention_keeps_published_rows_until_purged(&outbox_with(1, Duration::from_secs(1)).await)
        .await;
}

#[tokio::test]
async fn status_shows_owner_backlog_and_blocked_reason() {
    common::status_shows_owner_backlog_and_blocked_reason(&outbox_with(2, Duration::ZERO).await)
        .await;
}

#[tokio::test]
async fn g2_a_late_commit_with_a_lower_sequence_is_still_published() {
    let outbox = outbox_with(1, Duration::ZERO).await;
    // The early transaction takes the lower AUTO_INCREMENT value and stays open.
    let mut early = outbox.pool().begin().await.unwrap();
    let held = outbox
        .enqueue(&mut early, order_event("early", "order.created"))
        .await
        .unwrap();
    let mut late = outbox.pool().begin().await.unwrap();
    let committed_first = outbox
        .enqueue(&mut late, order_event("late", "order.created"))
        .await
        .unwrap();
    late.commit().await.unwrap();
    assert!(held.sequence < committed_first.sequence);

    let publisher = {
        let outbox = outbox.clone();
        tokio::spawn(async move { relay_into_file(&outbox, 2).await })
    };
    // The relay publishes the higher sequence (the only committed row) while the lower one
    // is uncommitted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while outbox.count("outbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    early.commit().await.unwrap();
    let events = publisher.await.unwrap();
    let ids: Vec<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        [committed_first.id, held.id],
        "the late-committed lower sequence is published after, and nothing twice"
    );
    assert_eq!(outbox.count("outbox").await, 0);
}

#[tokio::test]
async fn relay_publishes_every_aggregate_in_version_order_with_concurrent_writers() {
    let outbox = outbox_with(8, Duration::ZERO).await;
    // Writers interleave on shared aggregates, committing in whatever order the locks allow.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for round in 0..10 {
                    let aggregates: Vec<_> = (0..5).map(|agg| (w * 5 + agg + round) % 20).collect();
                    commit_retrying_deadlocks(&outbox, &aggregates).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let events = relay_into_file(&outbox, 200).await;
    assert_eq!(events.len(), 200);
    let per_aggregate = versions_per_aggregate(&events);
    assert_eq!(per_aggregate.len(), 20);
    for (agg, versions) in per_aggregate {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "aggregate {agg}");
    }
}

/// Enqueues one message per aggregate in one transaction, as an application would: a
/// deadlock victim (the lock order wraps around, 19 then 0) is rolled back and retried.
async fn commit_retrying_deadlocks(outbox: &MyOutbox, aggregates: &[usize]) {
    'transaction: loop {
        let mut tx = outbox.pool().begin().await.unwrap();
        for id in aggregates {
            match outbox
                .enqueue(&mut tx, order_event(&id.to_string(), "step"))
                .await
            {
                Ok(_) => {}
                Err(EnqueueError::Store(err)) if err.is_retryable() => {
                    tx.rollback().await.unwrap();
                    continue 'transaction;
                }
                Err(err) => panic!("{err}"),
            }
        }
        tx.commit().await.unwrap();
        return;
    }
}

/// The MySQL inbox of consumer "billing", with an effects table (numbered in commit
/// order) for its handler.
struct MyInboxTest {
    outbox: MyOutbox,
    inbox: MyInbox,
    effects: String,
}

impl MyInboxTest {
    async fn new() -> Self {
        let outbox = outbox().await;
        let inbox = MyInbox::new("billing", outbox.table_prefix());
        let effects = outbox.table_prefix().render("{p}effects");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {effects} (n BIGINT AUTO_INCREMENT PRIMARY KEY, \
             id BINARY(16) NOT NULL UNIQUE, version BIGINT NOT NULL) ENGINE = InnoDB"
        )))
        .execute(outbox.pool())
        .await
        .unwrap();
        Self {
            outbox,
            inbox,
            effects,
        }
    }

    /// Another instance of the same consumer (or another consumer) on the same tables.
    fn instance(&self, consumer: &str) -> Self {
        Self {
            outbox: self.outbox.clone(),
            inbox: MyInbox::new(consumer, self.outbox.table_prefix()),
            effects: self.effects.clone(),
        }
    }
}

impl InboxUnderTest for MyInboxTest {
    async fn apply(&self, message: &ReceivedMessage, fail: bool) -> Applied {
        let mut tx = self.outbox.pool().begin().await.unwrap();
        let insert = format!("INSERT INTO {} (id, version) VALUES (?, ?)", self.effects);
        let result = self
            .inbox
            .process(&mut tx, message, async |tx, m| {
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(m.id)
                    .bind(m.version as i64)
                    .execute(&mut **tx)
                    .await?;
                if fail {
                    return Err(sqlx::Error::Protocol("handler failed on purpose".into()));
                }
                Ok(())
            })
            .await;
        if result.is_ok() {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        result
    }

    async fn count(&self, table: &str) -> i64 {
        self.outbox.count(table).await
    }
}

#[tokio::test]
async fn g4_inbox_skips_duplicate_ids_and_stale_versions() {
    inbox_skips_duplicate_ids_and_stale_versions(&MyInboxTest::new().await).await;
}

#[tokio::test]
async fn g4_handler_effects_and_inbox_record_roll_back_together() {
    inbox_rolls_back_with_the_handler(&MyInboxTest::new().await).await;
}

/// Aggregate ids are compared byte for byte (`1` and `1 ` are two aggregates), and each
/// consumer keeps its own record.
#[tokio::test]
async fn g4_inbox_keys_are_exact_and_consumers_separate() {
    let billing = MyInboxTest::new().await;
    let v2 = received("1", 2);
    assert!(billing.apply(&v2, false).await.unwrap().is_applied());
    assert_eq!(
        billing.apply(&received("1 ", 1), false).await.unwrap(),
        Processed::Applied {
            output: (),
            previous_version: 0
        }
    );
    let shipping = billing.instance("shipping");
    let mut tx = shipping.outbox.pool().begin().await.unwrap();
    let seen_by_shipping = shipping
        .inbox
        .process(&mut tx, &v2, async |_, _| Ok::<_, sqlx::Error>(()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(seen_by_shipping.is_applied());
    assert_eq!(
        billing.apply(&v2, false).await.unwrap(),
        Processed::Duplicate
    );
}

/// Instances of one consumer receiving the same stream at once: each id is applied once,
/// and applied versions commit in increasing order (the version row lock serialises them;
/// a snapshot read would let an older version commit after a newer one).
#[tokio::test]
async fn g4_concurrent_consumer_instances_apply_in_version_order() {
    let first = MyInboxTest::new().await;
    let messages: Vec<ReceivedMessage> = (1..=60).map(|v| received("hot", v)).collect();
    // Polled together in one task: the instances still interleave on the server's locks.
    let instances = (0..4).map(|i| {
        let (instance, messages) = (first.instance("billing"), &messages);
        async move {
            let mut applied = 0;
            for message in messages.iter().skip(i) {
                if instance.apply(message, false).await.unwrap().is_applied() {
                    applied += 1;
                }
            }
            applied
        }
    });
    let applied: usize = futures::future::join_all(instances).await.into_iter().sum();
    let versions: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {} ORDER BY n",
        first.effects
    )))
    .fetch_all(first.outbox.pool())
    .await
    .unwrap();
    assert_eq!(versions.len(), applied);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "applied out of order: {versions:?}"
    );
    assert_eq!(versions.last(), Some(&60));
}

#[tokio::test]
async fn blocked_partitions_are_listed_retried_and_skipped() {
    common::operations::blocked_partitions_are_listed_retried_and_skipped(
        &outbox_with(1, Duration::ZERO).await,
    )
    .await;
}

#[tokio::test]
async fn park_aggregate_holds_the_aggregate_until_requeued() {
    common::operations::park_aggregate_holds_the_aggregate_until_requeued(
        &outbox_with(1, Duration::ZERO).await,
    )
    .await;
}

#[tokio::test]
async fn cleanup_removes_what_is_past_its_bounds() {
    let outbox = outbox_with(1, Duration::from_secs(3600)).await;
    let inbox = MyInbox::new("cleanup", outbox.table_prefix());
    common::operations::cleanup_removes_what_is_past_its_bounds(&outbox, async || {
        let mut tx = outbox.pool().begin().await.unwrap();
        inbox
            .process(&mut tx, &common::received("1", 1), async |_, _| {
                Ok::<(), sqlx::Error>(())
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
}
