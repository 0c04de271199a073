//! Log-based capture from MariaDB's binlog, against the MariaDB with a row-format binlog of
//! `scripts/services.sh` (`FERRY_TEST_MYSQL_BINLOG_URL`): commit order, rollbacks, confirm
//! and resume, one stream at a time, and the prerequisites' errors (the shared server runs
//! with `log_bin` off). Each test has an outbox of its own prefix, so streams of tests
//! running at once see only their own inserts.
#![cfg(feature = "mysql-capture")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::mysql::MyOutbox;
use ferry::mysql::capture::{CaptureSettings, MyLogCapture};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{
    CapturedTransaction, LogCapture, LogStream, Message, NewMessage, OutboxStore, StoreError,
    error_chain,
};
use ferry_core::testing::services;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

const PARTITIONS: u32 = 4;

/// An outbox of a prefix no other test uses on the binlog server, and its capture.
async fn captured_outbox() -> (MyOutbox, MyLogCapture) {
    captured_outbox_at(&services::mysql_binlog_url()).await
}

/// The same on the server at `url`.
async fn captured_outbox_at(url: &str) -> (MyOutbox, MyLogCapture) {
    let tag = &Uuid::now_v7().simple().to_string()[20..];
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(format!("c{tag}_")).unwrap(),
        ..StoreSettings::default()
    };
    let outbox = MyOutbox::connect(url, 4, settings).await.unwrap();
    outbox.migrate(PARTITIONS).await.unwrap();
    let capture = MyLogCapture::new(outbox.clone(), url, CaptureSettings::default()).unwrap();
    (outbox, capture)
}

/// Commits `messages` in one transaction.
async fn commit(outbox: &MyOutbox, messages: Vec<NewMessage>) {
    let mut tx = outbox.pool().begin().await.unwrap();
    for message in messages {
        outbox.enqueue(&mut tx, message).await.unwrap();
    }
    tx.commit().await.unwrap();
}

fn event(aggregate_id: &str, n: u32) -> NewMessage {
    NewMessage::new(
        "order",
        aggregate_id,
        "order.paid",
        format!("{{\"n\": {n}}}"),
    )
}

/// The next transaction with messages (other transactions only move the position on).
async fn next_with_messages(stream: &mut Box<dyn LogStream>) -> CapturedTransaction {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no transaction within 10 s"
        );
        if let Some(tx) = stream.next(Duration::from_millis(500)).await.unwrap()
            && !tx.messages.is_empty()
        {
            return tx;
        }
    }
}

/// Asserts that nothing with messages arrives within `wait`.
async fn assert_nothing_more(stream: &mut Box<dyn LogStream>, wait: Duration) {
    if let Some(tx) = stream.next(wait).await.unwrap() {
        assert!(tx.messages.is_empty(), "unexpected {tx:?}");
    }
}

fn ids(tx: &CapturedTransaction) -> Vec<(String, u64)> {
    tx.messages
        .iter()
        .map(|m| (m.aggregate_id.clone(), m.version))
        .collect()
}

/// Every unpublished message of the outbox, as the poll path reads it.
async fn polled(outbox: &MyOutbox) -> Vec<Message> {
    let mut all = Vec::new();
    for partition in 0..PARTITIONS {
        all.extend(outbox.fetch(partition, 1000).await.unwrap());
    }
    all.sort_by_key(|m| m.sequence);
    all
}

#[tokio::test]
async fn committed_enqueues_arrive_whole_in_commit_order() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start().await.unwrap();
    // An id ending in zero bytes (the binlog trims them from BINARY columns), binary
    // payload, headers with non-ASCII text, a partition key of its own.
    let zero_tailed = Uuid::from_bytes([7, 1, 2, 3, 4, 5, 0x70, 7, 0x80, 9, 10, 11, 0, 0, 0, 0]);
    let mut first = event("1", 1);
    first.id = Some(zero_tailed);
    first.payload = vec![0u8, 255, 0, 1].into();
    let first = first
        .with_header("x-city", "K\u{f6}ln")
        .with_header("content-type", "application/octet-stream");
    commit(
        &outbox,
        vec![first, event("2", 1).with_partition_key("custom")],
    )
    .await;
    commit(&outbox, vec![event("1", 2)]).await;

    let one = next_with_messages(&mut stream).await;
    let two = next_with_messages(&mut stream).await;
    assert_eq!(ids(&one), [("1".into(), 1), ("2".into(), 1)]);
    assert_eq!(ids(&two), [("1".into(), 2)]);
    assert_eq!(one.messages[0].id, zero_tailed);
    // Field for field what the poll path reads.
    let captured: Vec<Message> = one.messages.iter().chain(&two.messages).cloned().collect();
    assert_eq!(captured, polled(&outbox).await);
    assert!(
        one.maybe_published,
        "before the drain, everything may be published"
    );
    assert_ne!(one.end, two.end);
    stream.mark_drained().await.unwrap();
    commit(&outbox, vec![event("1", 3)]).await;
    let after_drain = next_with_messages(&mut stream).await;
    assert_eq!(ids(&after_drain), [("1".into(), 3)]);
    assert!(!after_drain.maybe_published, "committed after the drain");
}

#[tokio::test]
async fn the_unpublished_check_waits_for_a_transaction_the_binlog_holds_but_innodb_has_not_committed()
 {
    let (outbox, _capture) = captured_outbox().await;
    // The id is a fresh UUID's hex digits. An XA transaction between PREPARE and COMMIT is where a binlogged transaction
    // stands before InnoDB makes its rows visible.
    let xid = format!("'{}'", Uuid::now_v7().simple());
    let mut producer = outbox.pool().acquire().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("XA START {xid}")))
        .execute(&mut *producer)
        .await
        .unwrap();
    let enqueued = outbox.enqueue(&mut producer, event("1", 1)).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("XA END {xid}; XA PREPARE {xid}")))
        .execute(&mut *producer)
        .await
        .unwrap();
    let checking = tokio::spawn({
        let outbox = outbox.clone();
        async move { outbox.unpublished(enqueued.partition, &[enqueued.id]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !checking.is_finished(),
        "waits for the prepared transaction"
    );
    sqlx::raw_sql(AssertSqlSafe(format!("XA COMMIT {xid}")))
        .execute(&mut *producer)
        .await
        .unwrap();
    let unpublished = tokio::time::timeout(Duration::from_secs(10), checking)
        .await
        .expect("answers once committed")
        .unwrap()
        .unwrap();
    assert_eq!(unpublished, vec![enqueued.id]);
}

#[tokio::test]
async fn a_rolled_back_transaction_never_arrives() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start().await.unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, event("rolled", 1)).await.unwrap();
    tx.rollback().await.unwrap();
    commit(&outbox, vec![event("kept", 1)]).await;
    let arrived = next_with_messages(&mut stream).await;
    assert_eq!(ids(&arrived), [("kept".into(), 1)]);
    assert_nothing_more(&mut stream, Duration::from_secs(1)).await;
}

/// A transaction that took its sequence first but commits last arrives last; one
/// aggregate's versions keep their order.
#[tokio::test]
async fn transactions_arrive_in_commit_order_not_sequence_order() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start().await.unwrap();
    let mut early = outbox.pool().begin().await.unwrap();
    let early_seq = outbox
        .enqueue(&mut early, event("a", 1))
        .await
        .unwrap()
        .sequence;
    commit(&outbox, vec![event("b", 1), event("b", 2)]).await;
    outbox.enqueue(&mut early, event("a", 2)).await.unwrap();
    early.commit().await.unwrap();
    commit(&outbox, vec![event("a", 3)]).await;

    let first = next_with_messages(&mut stream).await;
    let second = next_with_messages(&mut stream).await;
    let third = next_with_messages(&mut stream).await;
    assert_eq!(ids(&first), [("b".into(), 1), ("b".into(), 2)]);
    assert!(first.messages[0].sequence > early_seq);
    assert_eq!(ids(&second), [("a".into(), 1), ("a".into(), 2)]);
    assert_eq!(ids(&third), [("a".into(), 3)]);
}

#[tokio::test]
async fn a_restarted_stream_resumes_after_the_confirmed_position() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start().await.unwrap();
    for n in 1..=3 {
        commit(&outbox, vec![event("r", n)]).await;
    }
    let one = next_with_messages(&mut stream).await;
    let two = next_with_messages(&mut stream).await;
    let three = next_with_messages(&mut stream).await;
    assert_eq!(ids(&three), [("r".into(), 3)]);
    stream.confirm(&two.end).await.unwrap();
    let lag = stream.lag().await.unwrap();
    assert!(lag.bytes.is_some_and(|b| b > 0), "{lag:?}");
    drop(stream);

    let mut resumed = start_when_free(&capture).await;
    let again = next_with_messages(&mut resumed).await;
    assert_eq!(again, three, "only the unconfirmed transaction comes again");
    assert_nothing_more(&mut resumed, Duration::from_secs(1)).await;
    // Not confirmed by reading: a third stream gets it again.
    drop(resumed);
    let mut third = start_when_free(&capture).await;
    assert_eq!(next_with_messages(&mut third).await.end, three.end);
    third.confirm(&three.end).await.unwrap();
    // Other tests write to the same binlog: the lag lies between the bytes past the
    // confirmed point just before and just after it is measured.
    let before = binlog_bytes_past(&outbox, &three.end).await;
    let lag = capture.lag().await.unwrap().bytes.unwrap();
    let after = binlog_bytes_past(&outbox, &three.end).await;
    assert!(
        before <= lag && lag <= after,
        "{before} <= {lag} <= {after}"
    );
    drop(third);
    assert_eq!(ids(&one), [("r".into(), 1)]);

    let mut after_all = start_when_free(&capture).await;
    assert_nothing_more(&mut after_all, Duration::from_secs(1)).await;
    commit(&outbox, vec![event("r", 4)]).await;
    assert_eq!(
        ids(&next_with_messages(&mut after_all).await),
        [("r".into(), 4)]
    );
}

/// The binlog connection takes the store URL's TLS settings: it streams from the server
/// with TLS and a binlog, and a CA that did not issue the server's certificate is refused
/// at once, naming the setting to fix.
#[tokio::test]
async fn the_binlog_streams_over_tls_and_a_wrong_ca_is_named() {
    ferry::tls::install_ring_provider();
    let url = services::mysql_binlog_tls_url(&services::tls_ca_file());
    let (outbox, capture) = captured_outbox_at(&url).await;
    let mut stream = capture.start().await.unwrap();
    commit(&outbox, vec![event("t", 1)]).await;
    assert_eq!(
        ids(&next_with_messages(&mut stream).await),
        [("t".into(), 1)]
    );

    let (other, _) = captured_outbox_at(&url).await;
    let wrong_ca = services::mysql_binlog_tls_url(&services::tls_wrong_ca_file());
    let untrusting = MyLogCapture::new(other, &wrong_ca, CaptureSettings::default()).unwrap();
    let Err(refused) = untrusting.start().await else {
        panic!("streamed with a CA that did not issue the server's certificate");
    };
    let chain = error_chain(&refused);
    assert!(
        chain.contains("TLS certificate verification failed for MariaDB's binlog at 127.0.0.1:")
            && chain.contains("ssl-ca in store.url"),
        "{chain}"
    );
}

/// How many binlog bytes the server has written past `end` (`<gtid> <file>:<pos> @<time>`)
/// in its file.
async fn binlog_bytes_past(outbox: &MyOutbox, end: &ferry::LogPosition) -> u64 {
    let file_pos = end.0.split(' ').nth(1).unwrap();
    let (file, pos) = file_pos.rsplit_once(':').unwrap();
    let row = sqlx::query("SHOW MASTER STATUS")
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    assert_eq!(
        row.get::<String, _>(0),
        file,
        "the binlog rotated during the test"
    );
    row.get::<u64, _>(1) - pos.parse::<u64>().unwrap()
}

/// Starts a stream, waiting for the server to see the previous holder's connection end.
async fn start_when_free(capture: &MyLogCapture) -> Box<dyn LogStream> {
    start_when_free_within(capture, Duration::from_secs(5)).await
}

async fn start_when_free_within(capture: &MyLogCapture, wait: Duration) -> Box<dyn LogStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match capture.start().await {
            Ok(stream) => return stream,
            Err(StoreError::HeldElsewhere(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{}", error_chain(&err)),
        }
    }
}

#[tokio::test]
async fn a_second_stream_is_refused_while_one_streams() {
    let (outbox, capture) = captured_outbox().await;
    let first = capture.start().await.unwrap();
    let Err(refused) = capture.start().await else {
        panic!("a second stream started while the first streams");
    };
    assert!(
        matches!(refused, StoreError::HeldElsewhere(_)),
        "{}",
        error_chain(&refused)
    );
    assert!(
        refused.to_string().contains("streamed by another relay"),
        "{refused}"
    );
    drop(first);
    let mut second = start_when_free(&capture).await;
    commit(&outbox, vec![event("s", 1)]).await;
    assert_eq!(
        ids(&next_with_messages(&mut second).await),
        [("s".into(), 1)]
    );
}

/// A relay that stops talking (paused, cut off) loses the lock after the idle timeout: a
/// standby takes over, and the old stream can neither read on nor confirm.
#[tokio::test]
async fn a_silent_stream_loses_the_lock_to_a_standby() {
    let (outbox, _) = captured_outbox().await;
    let settings = CaptureSettings {
        lock_idle_timeout: Duration::from_secs(1),
        ..CaptureSettings::default()
    };
    let capture =
        MyLogCapture::new(outbox.clone(), &services::mysql_binlog_url(), settings).unwrap();
    let mut silent = capture.start().await.unwrap();
    commit(&outbox, vec![event("z", 1)]).await;
    let read = next_with_messages(&mut silent).await;
    let mut standby = start_when_free_within(&capture, Duration::from_secs(10)).await;
    assert_eq!(next_with_messages(&mut standby).await, read);
    let lost = silent.confirm(&read.end).await.unwrap_err();
    assert!(
        error_chain(&lost).contains("lost the capture lock"),
        "{}",
        error_chain(&lost)
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lost = silent.next(Duration::from_millis(100)).await.unwrap_err();
    assert!(
        error_chain(&lost).contains("lost the capture lock"),
        "{}",
        error_chain(&lost)
    );
}

#[tokio::test]
async fn a_server_without_a_binlog_is_refused_with_the_fix() {
    let url = services::mysql_url();
    let outbox = MyOutbox::connect(&url, 2, StoreSettings::default())
        .await
        .unwrap();
    let capture = MyLogCapture::new(outbox, &url, CaptureSettings::default()).unwrap();
    let Err(err) = capture.start().await else {
        panic!("log capture started on a server with log_bin off");
    };
    let text = error_chain(&err);
    assert!(!err.is_retryable(), "{text}");
    assert!(
        text.contains("log_bin off") && text.contains("--log-bin"),
        "{text}"
    );
}
