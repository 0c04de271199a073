//! What only database servers have: they are reached over the network, their writers
//! commit concurrently (so a transaction can commit after one that took a higher
//! sequence), and producers in other languages call the `enqueue` routine `ferry migrate`
//! installs.

use std::time::Duration;

use ferry::sql::{Arg, RowExt, SqlOutbox, StoreSettings};
use ferry::{OutboxStore, error_chain, partition_for};
use uuid::Uuid;

use crate::harness::{
    TestDialect, TestOutbox, count, enqueue_committed, order_event, relay_into_file,
};

/// A server that does not answer is a retryable error that names its address.
pub(crate) async fn unreachable_server_is_a_retryable_error_naming_the_address<D: TestDialect>() {
    let dir = tempfile::tempdir().unwrap();
    let url = D::database_url(dir.path());
    // The same URL on port 1, where nothing listens.
    let (server, port_and_path) = url.rsplit_once(':').unwrap();
    let path = port_and_path.trim_start_matches(|c: char| c.is_ascii_digit());
    let host = server.rsplit(['@', '/']).next().unwrap();
    let err = SqlOutbox::<D>::connect(&format!("{server}:1{path}"), 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = error_chain(&err);
    let expected = format!("cannot reach {} at {host}:1", D::NAME);
    assert!(text.contains(&expected), "{text}");
}

/// Every connection to the server sends at once (TCP_NODELAY): sqlx 0.9.0 left Nagle's
/// algorithm on, and over TLS a 20 KB payload or a mark of a thousand ids waited ~40 ms.
pub(crate) async fn connections_send_without_waiting_for_acks<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(1).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(outbox.pool().acquire().await.unwrap());
    }
    crate::nodelay::assert_connections_send_at_once(
        outbox.url(),
        held.len(),
        "sqlx (0.9.1 or later)",
    );
}

/// G2: a transaction that took a lower sequence and commits after a higher one was
/// published is still published, after it, and nothing twice.
pub(crate) async fn g2_a_late_commit_with_a_lower_sequence_is_still_published<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(1).await;
    // The early transaction takes the lower sequence and stays open.
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
    while count(&outbox, "outbox").await > 0 {
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
    assert_eq!(count(&outbox, "outbox").await, 0);
}

/// Producers in other languages call the `{p}enqueue` routine `ferry migrate` installs
/// where the database has routines. `with_key` runs it for aggregate `$1` with partition key
/// `$2`, `default_key` for order 9 without a key; both return the routine's row. Each key
/// must land in the partition the Rust API computes, with a UUID v7 id of now, and the
/// routine and the Rust API must share the aggregate's versions (order 9 is at version 2
/// after).
pub(crate) async fn enqueue_routine_matches_the_rust_api<D: TestDialect>(
    outbox: &TestOutbox<D>,
    with_key: &str,
    default_key: &str,
) {
    let partitions = outbox.partitions().await.unwrap();
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
    let with_key = outbox.render(with_key);
    let mut conn = outbox.pool().acquire().await.unwrap();
    for (n, key) in keys.iter().enumerate() {
        let row = with_key
            .fetch_one::<D>(&mut conn, &[Arg::Text(&n.to_string()), Arg::Text(key)])
            .await
            .unwrap();
        let partition: i32 = row.col("message_partition").unwrap();
        assert_eq!(
            partition as u32,
            partition_for(key, partitions),
            "partition of {key:?}"
        );
        let id: Uuid = row.col("message_id").unwrap();
        assert_eq!(id.get_version_num(), 7, "SQL ids are UUID v7");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let millis = id.get_timestamp().unwrap().to_unix();
        let age = chrono::Utc::now().timestamp() - millis.0 as i64;
        assert!(age.abs() < 60, "the id's time is now, not {millis:?}");
    }
    let v1: i64 = outbox
        .render(default_key)
        .fetch_one::<D>(&mut conn, &[])
        .await
        .unwrap()
        .col("message_version")
        .unwrap();
    drop(conn);
    let v2 = enqueue_committed(outbox, order_event("9", "order.paid")).await;
    assert_eq!((v1, v2.version), (1, 2));
    assert_eq!(v2.partition, partition_for("order/9", partitions));
}

/// The `enqueue` routine takes the producer's trace context: it is stored with the
/// message's headers, relayed as the CloudEvents extension, and a malformed one is refused
/// naming it. `traced` binds $1 aggregate id, $2 traceparent, $3 tracestate (NULL for none).
pub(crate) async fn enqueue_routine_takes_the_trace_context<D: TestDialect>(
    outbox: &TestOutbox<D>,
    traced: &str,
) {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const PARENT_UPPER: &str = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    let traced = outbox.render(traced);
    let mut conn = outbox.pool().acquire().await.unwrap();
    let call = |id: &'static str, parent: Option<&'static str>, state: Option<&'static str>| {
        [Arg::Text(id), Arg::OptText(parent), Arg::OptText(state)]
    };
    traced
        .fetch_one::<D>(&mut conn, &call("1", Some(PARENT), Some("rojo=1")))
        .await
        .unwrap();
    traced
        .fetch_one::<D>(&mut conn, &call("2", None, None))
        .await
        .unwrap();
    for (bad, named) in [
        (call("3", Some("00-abc-def-01"), None), "traceparent"),
        (call("3", Some(PARENT_UPPER), None), "traceparent"),
        (call("3", None, Some("rojo=1")), "tracestate"),
    ] {
        let err = traced
            .fetch_one::<D>(&mut conn, &bad)
            .await
            .err()
            .expect("refused");
        assert!(error_chain(&err).contains(named), "{}", error_chain(&err));
    }
    drop(conn);
    let events = relay_into_file(outbox, 2).await;
    assert_eq!(events.len(), 2, "the refused calls enqueued nothing");
    let traced = events.iter().find(|e| e.aggregate_id == "1").unwrap();
    assert_eq!(
        traced.traceparent().map(|t| t.trace_id),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(traced.tracestate(), Some("rojo=1"));
    let untraced = events.iter().find(|e| e.aggregate_id == "2").unwrap();
    assert!(untraced.traceparent().is_none());
}
