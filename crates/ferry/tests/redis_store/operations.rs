//! Operators' tools on the Redis store: the scenarios every store passes
//! (`tests/shared/operations.rs`), and what only Redis has: a selective replay reading past
//! many kept messages a bounded number per script call, and the kept index of an outbox
//! made before it.

use std::time::Duration;

use ferry::redis_store::{RedisInbox, RedisOutbox, RedisWrites};
use ferry::{Enqueued, NewMessage, OutboxAdmin, OutboxStore, RetainedFilter, StoreError};
use uuid::Uuid;

use crate::shared_operations::{
    self as shared, OpsOutbox, enqueued_ids, event, ids, lease, mark_all,
};
use crate::{cleanup, outbox_with, raw, received};

impl OpsOutbox for RedisOutbox {
    type Store = Self;

    fn store(&self) -> &Self {
        self
    }

    async fn create(partitions: u32, retention: Duration) -> Self {
        outbox_with(partitions, retention).await
    }

    async fn commit(&self, message: NewMessage) -> Enqueued {
        self.enqueue(&RedisWrites::new(), message).await.unwrap()
    }

    async fn record_in_inbox(&self, consumer: &str) {
        let inbox = RedisInbox::new(
            self.connection(),
            self.key_prefix().clone(),
            consumer,
            Duration::from_secs(3600),
        )
        .unwrap();
        inbox
            .process(&received(Uuid::now_v7(), "1", 1), async |_, _| {
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
    }

    async fn dispose(&self) {
        cleanup(self).await;
    }
}

/// A test on Redis per shared scenario, named after it.
macro_rules! shared_scenarios {
    ($($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $scenario() {
                shared::$scenario::<RedisOutbox>().await;
            }
        )*
    };
}

shared_scenarios!(
    blocked_partitions_are_listed_retried_and_skipped,
    park_aggregate_holds_the_aggregate_until_requeued,
    cleanup_removes_what_is_past_its_bounds,
    retained_messages_are_selected_for_replay,
);

/// A selective filter over more kept messages than one script call looks at (2000) still
/// finds every match, and the summary counts all of them.
#[tokio::test]
async fn a_selective_replay_reads_past_many_kept_messages() {
    let outbox = &RedisOutbox::create(1, Duration::from_secs(3600)).await;
    let mut messages: Vec<NewMessage> = (0..4500).map(|n| event(&n.to_string(), 1)).collect();
    messages.push(event("needle", 1));
    let enqueued = outbox
        .enqueue_all(&RedisWrites::new(), messages)
        .await
        .unwrap();
    let lease = lease(outbox).await;
    outbox
        .mark_published(&lease, &enqueued_ids(&enqueued), None)
        .await
        .unwrap();
    let needle = RetainedFilter {
        aggregate: Some(("order".into(), "needle".into())),
        ..RetainedFilter::default()
    };
    assert_eq!(
        ids(&outbox.retained(&needle, None, 10).await.unwrap()),
        [enqueued[4500].id]
    );
    let all = outbox
        .retained_summary(&RetainedFilter::default())
        .await
        .unwrap();
    assert_eq!(all.count, 4501);
    assert_eq!(all.last_sequence, Some(enqueued[4500].sequence));
    let page = outbox
        .retained(
            &RetainedFilter::default(),
            Some(enqueued[99].sequence),
            3000,
        )
        .await
        .unwrap();
    assert_eq!(ids(&page), enqueued_ids(&enqueued[100..3100]));
    outbox.dispose().await;
}

/// An outbox of schema version 1 kept published messages without the sequence index;
/// `migrate` indexes them, so that they can be replayed.
#[tokio::test]
async fn migrate_indexes_messages_kept_before_version_2() {
    let outbox = &RedisOutbox::create(2, Duration::from_secs(3600)).await;
    let mut published = Vec::new();
    for n in 0..4 {
        published.push(outbox.commit(event(&n.to_string(), 1)).await);
    }
    mark_all(outbox, 2, &published).await;
    let prefix = outbox.key_prefix().as_str();
    let mut conn = raw(outbox).await;
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(format!("{prefix}kept"))
        .cmd("HSET")
        .arg(format!("{prefix}meta"))
        .arg("schema_version")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        outbox
            .retained(&RetainedFilter::default(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    outbox.migrate(2).await.unwrap();
    assert_eq!(
        ids(&outbox
            .retained(&RetainedFilter::default(), None, 10)
            .await
            .unwrap()),
        enqueued_ids(&published)
    );
    outbox.dispose().await;
}
