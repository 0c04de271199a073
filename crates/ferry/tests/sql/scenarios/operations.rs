//! Operators' tools on each dialect: the scenarios every store passes
//! (`tests/shared/operations.rs`), on [`TestOutbox`].

use std::time::Duration;

use ferry::sql::{SqlInbox, SqlOutbox, StoreSettings};
use ferry::{Enqueued, NewMessage, StoreError};

use crate::harness::{TestDialect, TestOutbox, enqueue_committed, received, settings};
use crate::shared_operations::{self as shared, OpsOutbox};

impl<D: TestDialect> OpsOutbox for TestOutbox<D> {
    type Store = SqlOutbox<D>;

    fn store(&self) -> &SqlOutbox<D> {
        self
    }

    async fn create(partitions: u32, retention: Duration) -> Self {
        let settings = StoreSettings {
            retention,
            ..settings()
        };
        TestOutbox::with(partitions, settings).await
    }

    async fn commit(&self, message: NewMessage) -> Enqueued {
        enqueue_committed(self, message).await
    }

    async fn record_in_inbox(&self, consumer: &str) {
        let inbox = SqlInbox::<D>::new(consumer, self.table_prefix());
        let mut tx = self.pool().begin().await.unwrap();
        inbox
            .process(&mut tx, &received("1", 1), async |_, _| {
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// The tables stay with the test database (SQLite's file goes with the last clone).
    async fn dispose(&self) {}
}

pub(crate) async fn blocked_partitions_are_listed_retried_and_skipped<D: TestDialect>() {
    shared::blocked_partitions_are_listed_retried_and_skipped::<TestOutbox<D>>().await;
}

pub(crate) async fn park_aggregate_holds_the_aggregate_until_requeued<D: TestDialect>() {
    shared::park_aggregate_holds_the_aggregate_until_requeued::<TestOutbox<D>>().await;
}

pub(crate) async fn cleanup_removes_what_is_past_its_bounds<D: TestDialect>() {
    shared::cleanup_removes_what_is_past_its_bounds::<TestOutbox<D>>().await;
}

pub(crate) async fn retained_messages_are_selected_for_replay<D: TestDialect>() {
    shared::retained_messages_are_selected_for_replay::<TestOutbox<D>>().await;
}
