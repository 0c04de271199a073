//! Log capture from PostgreSQL's logical replication, against the cluster with `wal_level =
//! logical` of `scripts/services.sh` (`FERRY_TEST_PG_LOGICAL_URL`): a large transaction
//! handed out in pieces. Each test has an outbox, publication and slot of its own prefix,
//! and drops the slot when done.
#![cfg(feature = "postgres-capture")]
#![allow(clippy::unwrap_used)]

#[path = "shared/pieces.rs"]
mod pieces;

use std::time::Duration;

use ferry::postgres::PgOutbox;
use ferry::postgres::capture::{PgCapture, PgCaptureSettings};
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{CapturedPiece, LogCapture, LogStream, NewMessage};
use ferry_core::testing::services;
use pieces::assert_pieces_around_the_drain;
use uuid::Uuid;

/// An outbox of a prefix no other test uses, with its publication and slot.
async fn captured_outbox() -> (PgOutbox, PgCapture) {
    let url = services::postgres_logical_url();
    let prefix = format!("c{}_", &Uuid::now_v7().simple().to_string()[20..]);
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(prefix.clone()).unwrap(),
        ..StoreSettings::default()
    };
    let outbox = PgOutbox::connect(&url, 4, settings).await.unwrap();
    outbox.migrate(4).await.unwrap();
    let capture = PgCapture::new(&url, &outbox, PgCaptureSettings::for_prefix(&prefix)).unwrap();
    capture.setup().await.unwrap();
    (outbox, capture)
}

/// Drops the test's slot once its stream is gone, so that it pins no WAL.
async fn drop_slot(outbox: &PgOutbox, capture: &PgCapture) {
    for _ in 0..50 {
        let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&capture.settings().slot)
            .execute(outbox.pool())
            .await;
        if dropped.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the slot {} stayed active", capture.settings().slot);
}

/// Commits `messages` in one transaction.
async fn commit(outbox: &PgOutbox, messages: Vec<NewMessage>) {
    let mut tx = outbox.pool().begin().await.unwrap();
    for message in messages {
        outbox.enqueue(&mut tx, message).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// The pieces of the next transaction with messages (heartbeats skipped), up to its last.
async fn next_transaction_in_pieces(stream: &mut Box<dyn LogStream>) -> Vec<CapturedPiece> {
    let mut pieces: Vec<CapturedPiece> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no whole transaction within 20 s: {} pieces",
            pieces.len()
        );
        let Some(piece) = stream.next(Duration::from_millis(500)).await.unwrap() else {
            continue;
        };
        if pieces.is_empty() && piece.messages.is_empty() {
            continue;
        }
        let last = piece.end.is_some();
        pieces.push(piece);
        if last {
            return pieces;
        }
    }
}

/// A transaction of more messages than a piece holds comes in full pieces, in insert
/// order, the last alone carrying its end; all of a transaction that ended before the
/// drain may be published (decided at its Begin), none of one after it.
#[tokio::test]
async fn a_large_transaction_comes_in_pieces_in_insert_order() {
    let (outbox, capture) = captured_outbox().await;
    let mut stream = capture.start(100).await.unwrap();
    let event = |n: u64| NewMessage::new("order", "large", "order.paid", format!("{{\"n\": {n}}}"));
    commit(&outbox, (1..=250).map(event).collect()).await;
    let before_drain = next_transaction_in_pieces(&mut stream).await;
    stream.mark_drained().await.unwrap();
    commit(&outbox, (251..=550).map(event).collect()).await;
    let after_drain = next_transaction_in_pieces(&mut stream).await;

    assert_pieces_around_the_drain(&before_drain, &after_drain);
    let versions: Vec<u64> = before_drain
        .iter()
        .chain(&after_drain)
        .flat_map(|piece| piece.messages.iter().map(|m| m.version))
        .collect();
    assert_eq!(versions, (1..=550).collect::<Vec<u64>>());
    drop(stream);
    drop_slot(&outbox, &capture).await;
}
