//! Races the store must settle: concurrent transitions of one message, run many times at
//! once; two service instances claiming the same check-backs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::Headers;
use ferry_service::state::CHECK_BACK_SOURCES;
use ferry_service::store::{AckPolicy, Moved, Prepare, Prepared, ServiceStore};
use ferry_service::{Status, Transition};

use crate::harness::{Backend, Backing, CheckServer, Reply, Server, fast_settings, wait_for};

/// Messages raced per test.
const RACED: usize = 150;

/// Never asked: these messages are not due for check-back during the test.
const UNUSED_CHECK_URL: &str = "http://127.0.0.1:9/check";

/// Prepares `count` messages directly in the store, due for check-back after `check_after`.
async fn prepare_many(
    store: &dyn ServiceStore,
    count: usize,
    check_url: &str,
    check_after: Duration,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let prepare = Prepare {
            id: Uuid::now_v7(),
            aggregate_type: "account".into(),
            aggregate_id: format!("race-{n}"),
            event_type: "account.changed".into(),
            payload: Bytes::from(format!("{{\"n\":{n}}}")),
            headers: Headers::new(),
            partition_key: None,
            check_url: check_url.into(),
        };
        match store.prepare(&prepare, check_after).await.expect("prepare") {
            Prepared::Created(record) => ids.push(record.id),
            other => panic!("not created: {other:?}"),
        }
    }
    ids
}

/// The producer's confirm and a check-back's rolled_back answer arrive at once: exactly
/// one wins, and the outbox holds the message if and only if the confirm won.
pub(crate) async fn confirm_races_check_back_answer(backend: Backend) {
    let backing = Backing::new(backend).await;
    let store = Arc::clone(&backing.store);
    let ids = prepare_many(&*store, RACED, UNUSED_CHECK_URL, Duration::from_secs(3600)).await;
    let barrier = Arc::new(Barrier::new(RACED * 2));
    let mut tasks = Vec::new();
    for &id in &ids {
        for (transition, sources, reason) in [
            (
                Transition::Confirm,
                Transition::Confirm.sources(),
                "confirmed by producer",
            ),
            (
                Transition::Cancel,
                CHECK_BACK_SOURCES,
                "cancelled by check-back: rolled_back",
            ),
        ] {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let moved = loop {
                    // SQLite's single writer may be busy past its timeout under this load.
                    match store.transition(id, transition, sources, reason).await {
                        Ok(moved) => break moved,
                        Err(err) if err.is_retryable() => continue,
                        Err(err) => panic!("{err}"),
                    }
                };
                (id, transition, matches!(moved, Moved::Moved(_)))
            }));
        }
    }
    let mut winners = std::collections::HashMap::new();
    for task in tasks {
        let (id, transition, won) = task.await.expect("task");
        if won {
            assert!(
                winners.insert(id, transition).is_none(),
                "both transitions of {id} won"
            );
        }
    }
    assert_eq!(
        winners.len(),
        RACED,
        "every message was settled by one of them"
    );
    let mut confirmed = 0;
    for id in ids {
        let status = backing.status(id).await;
        let rows = backing.outbox_rows(id).await;
        match winners[&id] {
            Transition::Confirm => {
                confirmed += 1;
                assert!(
                    matches!(status, Status::Confirmed | Status::Delivered),
                    "{status}"
                );
                let record = store.get(id).await.expect("get").expect("exists");
                assert_eq!(record.version, Some(1));
            }
            _ => {
                assert_eq!(status, Status::Cancelled);
                assert_eq!(rows, 0, "a cancelled message never reaches the outbox");
            }
        }
    }
    eprintln!("{backend:?}: {confirmed} of {RACED} confirms won");
    backing.wait_drained().await;
    let stream = backing.stream_messages().await;
    assert_eq!(
        stream.len(),
        confirmed,
        "exactly the confirmed messages were sent"
    );
    backing.stop().await;
}

/// A consumer's ack and the redelivery of the same overdue message at once: whatever the
/// order, every message ends completed, none is dead-lettered or delivered again after
/// its ack, and each is redelivered at most once.
pub(crate) async fn ack_races_redelivery(backend: Backend) {
    let backing = Backing::new(backend).await;
    let store = Arc::clone(&backing.store);
    let ids = prepare_many(&*store, RACED, UNUSED_CHECK_URL, Duration::from_secs(3600)).await;
    for &id in &ids {
        let moved = store
            .transition(
                id,
                Transition::Confirm,
                Transition::Confirm.sources(),
                "test",
            )
            .await
            .expect("confirm");
        assert!(matches!(moved, Moved::Moved(_)));
    }
    backing.wait_drained().await;
    // Deliveries whose ack deadline has already passed.
    let overdue = AckPolicy {
        ack_timeout: Duration::ZERO,
        ack_timeout_max: Duration::ZERO,
        max_deliveries: 10,
    };
    let mut delivered = 0;
    while delivered < RACED {
        delivered += store
            .mark_delivered(1000, &overdue)
            .await
            .expect("mark delivered")
            .len();
    }
    // Acks spread over 100 ms against redeliverers taking a few overdue messages at a time.
    let acks_done = CancellationToken::new();
    let mut redeliverers = Vec::new();
    for _ in 0..3 {
        let store = Arc::clone(&store);
        let acks_done = acks_done.clone();
        redeliverers.push(tokio::spawn(async move {
            let mut redelivered = Vec::new();
            while !acks_done.is_cancelled() {
                match store.redeliver_due(3, &overdue).await {
                    Ok(round) => {
                        assert!(round.dead_lettered.is_empty());
                        redelivered.extend(round.redelivered);
                    }
                    Err(err) if err.is_retryable() => {}
                    Err(err) => panic!("{err}"),
                }
            }
            redelivered
        }));
    }
    let mut acks = Vec::new();
    for &id in &ids {
        let store = Arc::clone(&store);
        acks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..100))).await;
            loop {
                match store
                    .transition(id, Transition::Ack, Transition::Ack.sources(), "acked")
                    .await
                {
                    Ok(Moved::Moved(record)) => return record,
                    Ok(other) => panic!("ack of {id} refused: {other:?}"),
                    Err(err) if err.is_retryable() => continue,
                    Err(err) => panic!("{err}"),
                }
            }
        }));
    }
    for ack in acks {
        assert_eq!(ack.await.expect("ack").status, Status::Completed);
    }
    acks_done.cancel();
    let mut redelivered = Vec::new();
    for redeliverer in redeliverers {
        redelivered.extend(redeliverer.await.expect("redeliverer"));
    }
    assert!(
        !redelivered.is_empty(),
        "no redelivery came before an ack: the race did not happen"
    );
    let distinct: std::collections::HashSet<_> = redelivered.iter().collect();
    assert_eq!(
        distinct.len(),
        redelivered.len(),
        "no message redelivered twice"
    );
    eprintln!(
        "{backend:?}: {} of {RACED} redelivered before their ack",
        redelivered.len()
    );
    // Later rounds must not touch acknowledged messages.
    backing.wait_drained().await;
    assert!(
        store
            .mark_delivered(1000, &overdue)
            .await
            .expect("mark")
            .is_empty()
    );
    let round = store
        .redeliver_due(1000, &overdue)
        .await
        .expect("redeliver");
    assert!(round.redelivered.is_empty() && round.dead_lettered.is_empty());
    for &id in &ids {
        assert_eq!(backing.status(id).await, Status::Completed);
    }
    // Each redelivery that won reached the broker as its own attempt.
    let stream = backing.stream_messages().await;
    assert_eq!(stream.len(), RACED + redelivered.len());
    backing.stop().await;
}

/// Two `ferry serve` instances on one store: each due check-back is made once.
pub(crate) async fn two_instances_check_each_message_once(backend: Backend) {
    let backing = Backing::new(backend).await;
    let producer = CheckServer::start().await;
    // Due at once; no instance runs yet, so both start with every check-back due.
    let ids = prepare_many(&*backing.store, 60, &producer.url, Duration::ZERO).await;
    for &id in &ids {
        producer.reply(id, Reply::Committed);
    }
    let mut settings = fast_settings();
    settings.check_concurrency = 4;
    let a = Server::start(&backing, settings.clone()).await;
    let b = Server::start(&backing, settings).await;
    wait_for(
        "every message confirmed by check-back",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for &id in &ids {
                all &= matches!(
                    backing.status(id).await,
                    Status::Confirmed | Status::Delivered
                );
            }
            all
        },
    )
    .await;
    let hits = producer.all_hits();
    for id in &ids {
        assert_eq!(
            hits.get(id),
            Some(&1),
            "message {id} checked {:?} times",
            hits.get(id)
        );
    }
    a.stop().await;
    b.stop().await;
    backing.stop().await;
}
