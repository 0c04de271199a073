//! Enqueueing in the producer's transaction (G1, G3) and fetching in sequence order; G2
//! (a late commit with a lower sequence) is in `servers`.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry::sql::StoreSettings;
use ferry::{EnqueueError, InvalidMessage, LeaseStore, NewMessage, OutboxStore, partition_for};
use uuid::Uuid;

use crate::harness::{
    TestDialect, TestOutbox, commit_messages, count, enqueue_committed, execute, lease_of,
    order_event, relay_into_file, settings, write,
};

/// G1: a message exists if and only if the business transaction it was enqueued in
/// committed; a rolled-back one takes no version; a committed one is fetched with every
/// field the store assigned.
pub(crate) async fn g1_enqueue_is_atomic_with_the_business_transaction<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    execute(
        &outbox,
        "CREATE TABLE {p}orders (id VARCHAR(64) PRIMARY KEY)",
    )
    .await;
    let insert_order = outbox.render("INSERT INTO {p}orders (id) VALUES ('1')");

    let mut tx = outbox.pool().begin().await.unwrap();
    insert_order.execute::<D>(&mut tx, &[]).await.unwrap();
    outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&outbox, "outbox").await, 0);
    assert_eq!(count(&outbox, "orders").await, 0);
    assert_eq!(
        count(&outbox, "aggregate_versions").await,
        0,
        "the rolled-back write took no version"
    );

    let mut tx = outbox.pool().begin().await.unwrap();
    insert_order.execute::<D>(&mut tx, &[]).await.unwrap();
    let mut enqueued = Vec::new();
    for (aggregate, event) in [
        ("1", "created"),
        ("2", "created"),
        ("1", "paid"),
        ("1", "shipped"),
    ] {
        enqueued.push(
            outbox
                .enqueue(&mut tx, order_event(aggregate, event))
                .await
                .unwrap(),
        );
    }
    tx.commit().await.unwrap();
    let versions: Vec<u64> = enqueued.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 1, 2, 3]);
    assert!(enqueued.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(enqueued[0].partition, partition_for("order/1", 4));
    assert_eq!(enqueued[1].partition, partition_for("order/2", 4));
    assert_eq!(count(&outbox, "outbox").await, 4);
    assert_eq!(count(&outbox, "orders").await, 1);

    let fetched = outbox.fetch(enqueued[0].partition, 10).await.unwrap();
    let in_partition: Vec<Uuid> = enqueued
        .iter()
        .filter(|e| e.partition == enqueued[0].partition)
        .map(|e| e.id)
        .collect();
    assert_eq!(
        fetched.iter().map(|m| m.id).collect::<Vec<_>>(),
        in_partition,
        "the committed messages, nothing of the rolled-back write"
    );
    let first = &fetched[0];
    assert_eq!(first.sequence, enqueued[0].sequence);
    assert_eq!(first.partition_key, "order/1");
    assert_eq!(first.id.get_version_num(), 7, "ids are UUID v7");
    let age = chrono::Utc::now() - first.created_at;
    assert!(
        age.num_seconds().abs() < 60,
        "created_at is UTC: {}",
        first.created_at
    );
}

/// A message the store refuses runs no statement: the producer's transaction goes on.
pub(crate) async fn invalid_message_is_refused_and_the_transaction_stays_usable<D: TestDialect>() {
    let settings = StoreSettings {
        max_payload_bytes: 1024,
        ..settings()
    };
    let outbox = TestOutbox::<D>::with(4, settings).await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let oversize = NewMessage::new("order", "1", "order.created", vec![b'x'; 2000]);
    let err = outbox.enqueue(&mut tx, oversize).await.unwrap_err();
    assert!(
        matches!(
            err,
            EnqueueError::Invalid(InvalidMessage::PayloadTooLarge {
                size: 2000,
                limit: 1024
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_payload_bytes"), "{err}");
    let enqueued = outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .expect("the same transaction goes on");
    tx.commit().await.unwrap();
    assert_eq!(enqueued.version, 1, "the refused message took no version");
    assert_eq!(count(&outbox, "outbox").await, 1);
}

/// Payloads are bytes (empty, NUL, invalid UTF-8, up to the limit) and headers any UTF-8
/// text; both come back as they went in.
pub(crate) async fn payloads_are_arbitrary_bytes_and_headers_round_trip<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(1).await;
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

/// `fetch` returns a partition's unpublished rows in sequence order, up to the limit,
/// with every field; there is no cursor: a marked row disappears, every other one stays.
pub(crate) async fn fetch_returns_unpublished_rows_in_sequence_order<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    let key = "tenant-7";
    let partition = partition_for(key, 4);
    let messages = (0..5)
        .map(|i| {
            NewMessage::new("order", i.to_string(), "order.created", vec![i as u8])
                .with_partition_key(key)
                .with_traceparent(format!("00-{:032x}-{:016x}-01", i + 1, i + 1))
        })
        .collect();
    let enqueued = commit_messages(&outbox, messages).await;
    let forced_id = Uuid::now_v7();
    let mut replay = order_event("99", "order.replayed").with_partition_key(key);
    replay.id = Some(forced_id);
    enqueue_committed(&outbox, replay).await;

    let first = outbox.fetch(partition, 3).await.unwrap();
    assert_eq!(first.len(), 3, "limit is respected");
    let all = outbox.fetch(partition, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(first[..], all[..3]);

    let message = &all[2];
    assert_eq!(message.id, enqueued[2].id);
    assert_eq!(message.sequence, enqueued[2].sequence);
    assert_eq!(message.partition, partition);
    assert_eq!(message.partition_key, key);
    assert_eq!(message.aggregate_id, "2");
    assert_eq!(message.payload.as_ref(), [2]);
    assert_eq!(
        message.headers,
        BTreeMap::from([(
            "traceparent".to_owned(),
            format!("00-{:032x}-{:016x}-01", 3, 3)
        )])
    );
    let age = chrono::Utc::now() - message.created_at;
    assert!(
        age < chrono::TimeDelta::seconds(60),
        "created_at from the clock: {age}"
    );
    assert_eq!(all[5].id, forced_id, "a given id is kept");

    let leases = outbox
        .acquire("relay-a", 4, Duration::from_secs(10))
        .await
        .unwrap();
    let lease = lease_of(&leases, partition);
    let marked = outbox
        .mark_published(lease, &[all[1].id], None)
        .await
        .unwrap();
    assert_eq!(marked, 1);
    let rest: Vec<Uuid> = outbox
        .fetch(partition, 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(rest.len(), 5);
    assert!(!rest.contains(&all[1].id));
    assert_eq!(rest[0], all[0].id);
}

/// G3: writers of one aggregate that overlap get versions in commit order, and sequence
/// order equals version order.
pub(crate) async fn g3_concurrent_writers_of_one_aggregate_get_versions_in_commit_order<
    D: TestDialect,
>() {
    let outbox = TestOutbox::<D>::new(4).await;
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for i in 0..15 {
                    let message = order_event("hot", &format!("w{w}.{i}"));
                    write(&outbox, vec![message], Duration::from_millis(1), true).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let rows = outbox
        .fetch(partition_for("order/hot", 4), 1000)
        .await
        .unwrap();
    let versions: Vec<u64> = rows.iter().map(|m| m.version).collect();
    assert_eq!(
        versions,
        (1..=90).collect::<Vec<_>>(),
        "sequence order must equal version order"
    );
}

/// The producer's trace context is stored with the message, reaches the consumer as the
/// CloudEvents distributed-tracing extension, and a malformed one is refused before any
/// statement runs, naming the field.
pub(crate) async fn trace_context_is_stored_and_reaches_the_consumer<D: TestDialect>() {
    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let outbox = TestOutbox::<D>::new(2).await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let refused = outbox
        .enqueue(
            &mut tx,
            order_event("1", "order.paid").with_traceparent("00-0af7651916cd43dd-01"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            EnqueueError::Invalid(InvalidMessage::TraceContext {
                field: "traceparent",
                ..
            })
        ),
        "{refused}"
    );
    let traced = order_event("1", "order.paid")
        .with_traceparent(PARENT)
        .with_tracestate("congo=t61rcWkgMzE");
    let enqueued = outbox.enqueue(&mut tx, traced.clone()).await.unwrap();
    tx.commit().await.unwrap();

    let fetched = outbox.fetch(enqueued.partition, 10).await.unwrap();
    assert_eq!(fetched[0].headers, traced.headers);
    let events = relay_into_file(&outbox, 1).await;
    let parent = events[0].traceparent().expect("the trace context arrived");
    assert_eq!(parent.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(parent.parent_id, "b7ad6b7169203331");
    assert!(parent.sampled());
    assert_eq!(events[0].tracestate(), Some("congo=t61rcWkgMzE"));
}
