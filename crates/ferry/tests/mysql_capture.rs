//! Log-based capture from MariaDB's binlog, against the MariaDB with a row-format binlog of
//! `scripts/services.sh` (`FERRY_TEST_MYSQL_BINLOG_URL`): commit order, rollbacks, a large
//! transaction in pieces, XA transactions prepared and committed later, confirm and resume, one stream at a time, and the prerequisites' errors (the shared server runs
//! with `log_bin` off). Each test has an outbox of its own prefix, so streams of tests
//! running at once see only their own inserts.
#![cfg(feature = "mysql-capture")]
#![allow(clippy::unwrap_used)]

#[path = "shared/pieces.rs"]
mod pieces;

use std::time::Duration;

use ferry::mysql::MyOutbox;
use ferry::mysql::capture::{CaptureSettings, MyLogCapture};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{
    CapturedPiece, LogCapture, LogStream, Message, NewMessage, OutboxStore, StoreError, error_chain,
};
use ferry_core::testing::services;
use pieces::assert_pieces_around_the_drain;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

const PARTITIONS: u32 = 4;
/// The most messages a piece of a transaction holds, in the tests that do not split one.
const PIECE: usize = 1000;

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

/// The next piece with messages (other transactions only move the position on).
async fn next_with_messages(stream: &mut Box<dyn LogStream>) -> CapturedPiece {
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

fn ids(tx: &CapturedPiece) -> Vec<(String, u64)> {
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
    let mut stream = capture.start(PIECE).await.unwrap();
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
    assert!(
        one.end.is_some() && two.end.is_some(),
        "each whole in one piece"
    );
    assert_ne!(one.end, two.end);
    stream.mark_drained().await.unwrap();
    commit(&outbox, vec![event("1", 3)]).await;
    let after_drain = next_with_messages(&mut stream).await;
    assert_eq!(ids(&after_drain), [("1".into(), 3)]);
    assert!(!after_drain.maybe_published, "committed after the drain");
}

/// The pieces of the next transaction with messages, up to its last.
async fn next_transaction_in_pieces(stream: &mut Box<dyn LogStream>) -> Vec<CapturedPiece> {
    let mut pieces = vec![next_with_messages(stream).await];
    while pieces.last().unwrap().end.is_none() {
        let piece = stream.next(Duration::from_secs(10)).await.unwrap();
        pieces.push(piece.expect("the transaction's next piece"));
    }
    pieces
}

/// A transaction of more messages than a piece holds comes in full pieces, in insert
/// order, the last alone carrying its end; all of a transaction that ended before the
/// drain may be published, none of one after it.
#[tokio::test]
async fn a_large_transaction_comes_in_pieces_in_insert_order() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start(100).await.unwrap();
    commit(&outbox, (1..=250).map(|n| event("large", n)).collect()).await;
    let before_drain = next_transaction_in_pieces(&mut stream).await;
    stream.mark_drained().await.unwrap();
    commit(&outbox, (251..=550).map(|n| event("large", n)).collect()).await;
    let after_drain = next_transaction_in_pieces(&mut stream).await;

    assert_pieces_around_the_drain(&before_drain, &after_drain);
    let versions: Vec<(String, u64)> = before_drain
        .iter()
        .chain(&after_drain)
        .flat_map(ids)
        .collect();
    let in_insert_order: Vec<(String, u64)> = (1..=550).map(|n| ("large".into(), n)).collect();
    assert_eq!(versions, in_insert_order);
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

/// An XA transaction on a connection of its own, enqueueing through ferry like any other.
/// A test failing between its PREPARE and its end leaves it prepared on the server, which
/// keeps it after the connection ends: `XA RECOVER` lists it (format id 3, branch `b`),
/// `XA ROLLBACK '<gtrid>','b',3` ends it.
struct Xa {
    conn: sqlx::pool::PoolConnection<sqlx::MySql>,
    gtrid: String,
    xid: String,
}

impl Xa {
    /// Starts an XA transaction with a fresh XID, enqueues `messages` in it and prepares it.
    async fn prepare(outbox: &MyOutbox, messages: Vec<NewMessage>) -> Self {
        let gtrid = Uuid::now_v7().simple().to_string();
        let mut xa = Self {
            conn: outbox.pool().acquire().await.unwrap(),
            xid: format!("'{gtrid}','b',3"),
            gtrid,
        };
        xa.run("XA START").await;
        for message in messages {
            outbox.enqueue(&mut xa.conn, message).await.unwrap();
        }
        xa.run("XA END").await;
        xa.run("XA PREPARE").await;
        xa
    }

    /// Where its PREPARE group starts in the binlog (its GTID event, which names the XID),
    /// looked for from `from`.
    async fn prepare_place(&self, outbox: &MyOutbox, from: &(String, u64)) -> (String, u64) {
        let gtid_info = format!(
            "XA START X'{}'",
            self.gtrid
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let events = sqlx::query(AssertSqlSafe(format!(
            "SHOW BINLOG EVENTS IN '{}' FROM {}",
            from.0, from.1
        )))
        .fetch_all(outbox.pool())
        .await
        .unwrap();
        let gtid_event = events
            .iter()
            .find(|event| {
                event.get::<String, _>("Event_type") == "Gtid"
                    && event.get::<String, _>("Info").starts_with(&gtid_info)
            })
            .expect("the PREPARE's GTID event");
        (from.0.clone(), gtid_event.get("Pos"))
    }

    async fn commit(mut self) {
        self.run("XA COMMIT").await;
    }

    async fn rollback(mut self) {
        self.run("XA ROLLBACK").await;
    }

    async fn run(&mut self, statement: &str) {
        sqlx::raw_sql(AssertSqlSafe(format!("{statement} {}", self.xid)))
            .execute(&mut *self.conn)
            .await
            .unwrap();
    }
}

/// Commits `messages` in an XA transaction of one phase (`XA COMMIT … ONE PHASE`).
async fn commit_xa_one_phase(outbox: &MyOutbox, messages: Vec<NewMessage>) {
    let mut conn = outbox.pool().acquire().await.unwrap();
    let xid = format!("'{}'", Uuid::now_v7().simple());
    sqlx::raw_sql(AssertSqlSafe(format!("XA START {xid}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    for message in messages {
        outbox.enqueue(&mut conn, message).await.unwrap();
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "XA END {xid}; XA COMMIT {xid} ONE PHASE"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
}

/// The server's binlog end now (`SHOW MASTER STATUS`).
async fn binlog_end(outbox: &MyOutbox) -> (String, u64) {
    let row = sqlx::query("SHOW MASTER STATUS")
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The binlog file and position of a handed-out end (`<gtid> <file>:<pos> @<time>`).
fn place_of(end: &ferry::LogPosition) -> (String, u64) {
    let file_pos = end.0.split(' ').nth(1).unwrap();
    let (file, pos) = file_pos.rsplit_once(':').unwrap();
    (file.to_owned(), pos.parse().unwrap())
}

/// MariaDB binlogs an XA transaction's PREPARE (with its rows) and, later, its
/// `XA COMMIT` as two groups: the prepared messages come once, at the commit, in commit
/// order among the transactions around it, in pieces like any transaction; no end handed
/// out meanwhile goes past the PREPARE; whether they may be published is the commit's
/// (prepared before the drain, committed after it: not). Rolled back, they never come; a
/// one-phase XA commit is an ordinary transaction.
#[tokio::test]
async fn an_xa_transactions_messages_arrive_at_its_commit_and_never_past_a_rollback() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start(2).await.unwrap();
    commit(&outbox, vec![event("a", 1)]).await;
    let binlog_before = binlog_end(&outbox).await;
    let xa = Xa::prepare(&outbox, (1..=3).map(|n| event("x", n)).collect()).await;
    commit(&outbox, vec![event("b", 1)]).await;
    let prepare = xa.prepare_place(&outbox, &binlog_before).await;

    let a1 = next_with_messages(&mut stream).await;
    let b1 = next_with_messages(&mut stream).await;
    assert_eq!(ids(&a1), [("a".into(), 1)]);
    assert_eq!(ids(&b1), [("b".into(), 1)]);
    assert!(b1.maybe_published, "before the drain");
    let b1_end = b1.end.clone().unwrap();
    assert_eq!(
        place_of(&b1_end),
        prepare,
        "committed after the PREPARE, its end {b1_end} stops right before it"
    );
    assert_nothing_more(&mut stream, Duration::from_secs(1)).await;

    stream.mark_drained().await.unwrap();
    xa.commit().await;
    commit(&outbox, vec![event("a", 2)]).await;
    let xa_pieces = next_transaction_in_pieces(&mut stream).await;
    let sizes: Vec<usize> = xa_pieces.iter().map(|piece| piece.messages.len()).collect();
    assert_eq!(sizes, [2, 1], "in pieces of 2, the last carrying the end");
    assert_eq!(
        xa_pieces.iter().flat_map(ids).collect::<Vec<_>>(),
        [("x".into(), 1), ("x".into(), 2), ("x".into(), 3)]
    );
    assert!(
        xa_pieces.iter().all(|piece| !piece.maybe_published),
        "committed after the drain"
    );
    let xa_end = xa_pieces.last().unwrap().end.clone().unwrap();
    assert!(
        place_of(&xa_end) > place_of(&b1_end),
        "{xa_end} past the commit"
    );
    let a2 = next_with_messages(&mut stream).await;
    assert_eq!(ids(&a2), [("a".into(), 2)]);

    let binlog_before = binlog_end(&outbox).await;
    let rolled_back = Xa::prepare(&outbox, vec![event("y", 1)]).await;
    let prepare = rolled_back.prepare_place(&outbox, &binlog_before).await;
    rolled_back.rollback().await;
    commit_xa_one_phase(&outbox, vec![event("z", 1)]).await;
    commit(&outbox, vec![event("c", 1)]).await;
    let z1 = next_with_messages(&mut stream).await;
    assert_eq!(ids(&z1), [("z".into(), 1)]);
    assert!(z1.end.is_some());
    let c1 = next_with_messages(&mut stream).await;
    assert_eq!(
        ids(&c1),
        [("c".into(), 1)],
        "nothing of the rolled-back one"
    );
    assert!(
        place_of(c1.end.as_ref().unwrap()) > prepare,
        "nothing is held after the rollback: ends go past its PREPARE"
    );
    assert_nothing_more(&mut stream, Duration::from_secs(1)).await;
}

/// A relay restarted between an XA transaction's PREPARE and its COMMIT starts from the
/// confirmed point, which the stream kept before the PREPARE: it reads the prepared
/// messages again and hands them out at the COMMIT, whether that came while no stream ran
/// or after the new one started. What committed after the PREPARE comes again too (the
/// relay publishes only what is still unpublished of it).
#[tokio::test]
async fn a_stream_restarted_between_prepare_and_commit_still_hands_out_the_prepared_messages() {
    let (outbox, capture) = captured_outbox().await;
    let mut first = capture.start(PIECE).await.unwrap();
    commit(&outbox, vec![event("a", 1)]).await;
    let committed_while_down = Xa::prepare(&outbox, vec![event("x", 1), event("x", 2)]).await;
    commit(&outbox, vec![event("b", 1)]).await;
    let committed_later = Xa::prepare(&outbox, vec![event("y", 1)]).await;
    commit(&outbox, vec![event("c", 1)]).await;
    assert_eq!(
        ids(&next_with_messages(&mut first).await),
        [("a".into(), 1)]
    );
    let b1 = next_with_messages(&mut first).await;
    let c1 = next_with_messages(&mut first).await;
    assert_eq!(ids(&c1), [("c".into(), 1)]);
    first.confirm(c1.end.as_ref().unwrap()).await.unwrap();
    drop(first);

    committed_while_down.commit().await;
    let mut second = start_when_free(&capture).await;
    assert_eq!(next_with_messages(&mut second).await, b1, "read again");
    let again = next_with_messages(&mut second).await;
    assert_eq!(ids(&again), [("c".into(), 1)]);
    assert_eq!(
        ids(&next_with_messages(&mut second).await),
        [("x".into(), 1), ("x".into(), 2)],
        "committed while no stream ran"
    );
    assert_nothing_more(&mut second, Duration::from_secs(1)).await;
    committed_later.commit().await;
    commit(&outbox, vec![event("a", 2)]).await;
    let y1 = next_with_messages(&mut second).await;
    assert_eq!(ids(&y1), [("y".into(), 1)]);
    assert_eq!(
        ids(&next_with_messages(&mut second).await),
        [("a".into(), 2)]
    );
    second.confirm(y1.end.as_ref().unwrap()).await.unwrap();
    drop(second);

    let mut third = start_when_free(&capture).await;
    assert_eq!(
        ids(&next_with_messages(&mut third).await),
        [("a".into(), 2)],
        "every XA completed: the confirmed point is past them"
    );
    assert_nothing_more(&mut third, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_rolled_back_transaction_never_arrives() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start(PIECE).await.unwrap();
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
    let mut stream = capture.start(PIECE).await.unwrap();
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
    let mut stream = capture.start(PIECE).await.unwrap();
    for n in 1..=3 {
        commit(&outbox, vec![event("r", n)]).await;
    }
    let one = next_with_messages(&mut stream).await;
    let two = next_with_messages(&mut stream).await;
    let three = next_with_messages(&mut stream).await;
    assert_eq!(ids(&three), [("r".into(), 3)]);
    stream.confirm(two.end.as_ref().unwrap()).await.unwrap();
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
    let three_end = three.end.clone().unwrap();
    third.confirm(&three_end).await.unwrap();
    // Other tests write to the same binlog: the lag lies between the bytes past the
    // confirmed point just before and just after it is measured.
    let before = binlog_bytes_past(&outbox, &three_end).await;
    let lag = capture.lag().await.unwrap().bytes.unwrap();
    let after = binlog_bytes_past(&outbox, &three_end).await;
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
    let mut stream = capture.start(PIECE).await.unwrap();
    commit(&outbox, vec![event("t", 1)]).await;
    assert_eq!(
        ids(&next_with_messages(&mut stream).await),
        [("t".into(), 1)]
    );

    let (other, _) = captured_outbox_at(&url).await;
    let wrong_ca = services::mysql_binlog_tls_url(&services::tls_wrong_ca_file());
    let untrusting = MyLogCapture::new(other, &wrong_ca, CaptureSettings::default()).unwrap();
    let Err(refused) = untrusting.start(PIECE).await else {
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
        match capture.start(PIECE).await {
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
    let first = capture.start(PIECE).await.unwrap();
    let Err(refused) = capture.start(PIECE).await else {
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
    let mut silent = capture.start(PIECE).await.unwrap();
    commit(&outbox, vec![event("z", 1)]).await;
    let read = next_with_messages(&mut silent).await;
    let mut standby = start_when_free_within(&capture, Duration::from_secs(10)).await;
    assert_eq!(next_with_messages(&mut standby).await, read);
    let lost = silent
        .confirm(read.end.as_ref().unwrap())
        .await
        .unwrap_err();
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
    let Err(err) = capture.start(PIECE).await else {
        panic!("log capture started on a server with log_bin off");
    };
    let text = error_chain(&err);
    assert!(!err.is_retryable(), "{text}");
    assert!(
        text.contains("log_bin off") && text.contains("--log-bin"),
        "{text}"
    );
}
