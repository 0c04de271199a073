//! Fencing: a zombie's marks are refused, an unclean takeover reconciles first, a fenced
//! sink stops the partition.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::sleep;

use super::{
    TTL, batch_in_flight, config, enqueue, eventually, first_release, ids, marked_under,
    reconciliations, refused_marks, start,
};
use crate::lease::LeaseStore;
use crate::message::Message;
use crate::store::OutboxStore;
use crate::testing::{MemoryStore, Outcome, ScriptedSink, SinkEvent};

#[tokio::test(start_paused = true)]
async fn a_zombie_is_fenced_on_mark_and_stops_while_the_new_owner_marks() {
    let (store, zombie_sink, first, zombie) =
        batch_in_flight(Duration::from_secs(2), config("zombie")).await;

    // The store sees the zombie's lease run out while the zombie still believes in it:
    // another relay takes the partition and publishes the batch again.
    store.advance_clock(TTL);
    let sink = Arc::new(ScriptedSink::new());
    let owner = start(&store, &sink, config("owner"));
    eventually("the zombie's mark is refused", || {
        !refused_marks(&store).is_empty()
    })
    .await;
    let second = enqueue(&store, "2");
    eventually("the new owner publishes", || {
        store.is_published(first.id) && store.is_published(second.id)
    })
    .await;
    sleep(TTL).await;

    let refused = refused_marks(&store);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!((refused[0].epoch, &refused[0].ids), (1, &vec![first.id]));
    assert!(marked_under(&store, 1).is_empty());
    assert_eq!(
        marked_under(&store, 2).concat(),
        [first.id, second.id],
        "{:?}",
        store.marks()
    );
    assert_eq!(
        zombie_sink.batches(0),
        [[first.id]],
        "the zombie sent no more"
    );
    assert!(
        zombie_sink
            .events()
            .contains(&SinkEvent::Closed { partition: 0 })
    );
    assert_eq!(zombie.stats.leases_lost.load(Ordering::Relaxed), 1);
    assert!(store.releases().is_empty(), "{:?}", store.releases());
    zombie.stop().await;
    owner.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unclean_takeover_reconciles_and_marks_what_the_broker_already_has() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (0..4).map(|i| enqueue(&store, &i.to_string())).collect();
    // A previous owner marked the first message (checkpoint 7), published the next two
    // and vanished without releasing its lease.
    let vanished = store.acquire("vanished", 1, TTL).await.unwrap().remove(0);
    store
        .mark_published(&vanished, &[messages[0].id], Some(7))
        .await
        .unwrap();
    sleep(TTL).await;
    sink.reconcile_finds(0, ids(&messages[1..3]));

    let relay = start(&store, &sink, config("a"));
    eventually("every message is published", || {
        store.unpublished(0).is_empty()
    })
    .await;
    let reconciled = reconciliations(&sink);
    assert!(
        matches!(
            reconciled[..],
            [SinkEvent::Reconciled {
                partition: 0,
                checkpoint: Some(7),
                ..
            }]
        ),
        "{reconciled:?}"
    );
    assert_eq!(sink.batches(0), [[messages[3].id]], "only the rest is sent");
    assert_eq!(
        marked_under(&store, 2),
        [ids(&messages[1..3]), ids(&messages[3..])]
    );
    assert_eq!(store.marks()[1].checkpoint, None);
    assert_eq!(relay.stats.reconciled.load(Ordering::Relaxed), 2);
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_fenced_sink_stops_the_partition_without_marking_more() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (0..3).map(|i| enqueue(&store, &i.to_string())).collect();
    sink.script(messages[1].id, [Outcome::Fenced]);
    let relay = start(&store, &sink, config("a"));
    eventually("the partition is given up", || !store.releases().is_empty()).await;

    assert_eq!(store.releases(), [first_release(false)]);
    assert_eq!(marked_under(&store, 1), [[messages[0].id]]);
    assert!(sink.events().contains(&SinkEvent::Closed { partition: 0 }));

    // The next lease reconciles, then publishes the rest.
    eventually("the rest is published", || store.unpublished(0).is_empty()).await;
    assert_eq!(reconciliations(&sink).len(), 1);
    assert_eq!(marked_under(&store, 1), [[messages[0].id]]);
    assert_eq!(marked_under(&store, 2), [ids(&messages[1..])]);
    relay.stop().await;
}
