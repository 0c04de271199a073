//! The fakes keep the contracts the relay relies on.

use std::time::Duration;

use tokio::time::sleep;

use super::{MemoryStore, Outcome, ScriptedSink};
use crate::error::StoreError;
use crate::lease::{LeaseStore, Takeover};
use crate::message::NewMessage;
use crate::sink::Sink;
use crate::store::OutboxStore;

const TTL: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn marks_need_the_current_unexpired_epoch() {
    let store = MemoryStore::new(1);
    let message = store.enqueue(NewMessage::new("order", "1", "order.paid", "{}"));
    let first = store.acquire("a", 1, TTL).await.unwrap().remove(0);
    assert_eq!((first.epoch, &first.takeover), (1, &Takeover::Clean));
    sleep(TTL).await;
    assert!(matches!(
        store.mark_published(&first, &[message.id], Some(3)).await,
        Err(StoreError::Fenced { epoch: 1, .. })
    ));
    assert!(matches!(
        store.set_blocked(&first, Some("no")).await,
        Err(StoreError::Fenced { .. })
    ));

    let second = store.acquire("b", 1, TTL).await.unwrap().remove(0);
    assert_eq!(second.epoch, 2);
    assert!(matches!(
        second.takeover,
        Takeover::Unclean {
            checkpoint: None,
            ..
        }
    ));
    assert_eq!(store.fetch(0, 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .mark_published(&second, &[message.id], Some(3))
            .await
            .unwrap(),
        1
    );
    assert!(store.fetch(0, 10).await.unwrap().is_empty());
    store.release(&second, false).await.unwrap();

    let third = store.acquire("a", 1, TTL).await.unwrap().remove(0);
    assert!(matches!(
        third.takeover,
        Takeover::Unclean {
            checkpoint: Some(3),
            ..
        }
    ));
    store.release(&third, true).await.unwrap();
    let fourth = store.acquire("a", 1, TTL).await.unwrap().remove(0);
    assert_eq!((fourth.epoch, fourth.takeover), (4, Takeover::Clean));
}

#[tokio::test(start_paused = true)]
async fn an_unexpired_lease_is_not_granted_again() {
    let store = MemoryStore::new(2);
    assert_eq!(store.heartbeat("a", TTL).await.unwrap(), 1);
    assert_eq!(store.heartbeat("b", TTL).await.unwrap(), 2);
    let held = store.acquire("a", 2, TTL).await.unwrap();
    assert_eq!(held.len(), 2);
    assert!(store.acquire("b", 2, TTL).await.unwrap().is_empty());
    sleep(TTL / 2).await;
    assert_eq!(store.renew(&held, TTL).await.unwrap(), [0, 1]);
    sleep(TTL / 2).await;
    assert!(store.acquire("b", 2, TTL).await.unwrap().is_empty());
    assert_eq!(store.heartbeat("b", TTL).await.unwrap(), 1, "a's expired");
    store.heartbeat("a", TTL).await.unwrap();
    store.leave("b").await.unwrap();
    assert_eq!(store.live_relays(), ["a"]);
    store.set_leases_unavailable(true);
    assert!(store.heartbeat("a", TTL).await.unwrap_err().is_retryable());
}

#[tokio::test]
async fn the_sink_stops_at_the_first_failure() {
    let store = MemoryStore::new(1);
    let batch: Vec<_> = (0..3)
        .map(|i| store.enqueue(NewMessage::new("order", i.to_string(), "order.paid", "{}")))
        .collect();
    let sink = ScriptedSink::new();
    sink.script(batch[1].id, [Outcome::Permanent]);
    let outcomes = sink.publish(&batch).await;
    assert!(outcomes[0].is_ok());
    assert!(!outcomes[1].as_ref().unwrap_err().is_retryable());
    assert!(outcomes[2].as_ref().unwrap_err().is_retryable(), "not sent");
    assert_eq!(sink.acked(0), [batch[0].id]);
    assert!(sink.publish(&batch).await.iter().all(Result::is_ok));
}
