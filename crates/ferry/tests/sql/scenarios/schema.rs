//! Migrations, table prefixes and connecting.

use ferry::sql::{Arg, RowExt, TablePrefix};
use ferry::{EnqueueError, OutboxStore, StoreError};

use crate::harness::{TestDialect, TestOutbox, count, enqueue_committed, order_event, settings};

/// `ferry migrate` runs again harmlessly; the partition count is fixed at set-up, recorded
/// in the database and checked.
pub(crate) async fn migrate_is_idempotent_and_partitions_are_fixed<D: TestDialect>() {
    let outbox = TestOutbox::<D>::new(4).await;
    outbox
        .migrate(4)
        .await
        .expect("a second migrate is a no-op");
    assert_eq!(outbox.partitions().await.unwrap(), 4);
    assert_eq!(count(&outbox, "leases").await, 4);
    let mut conn = outbox.pool().acquire().await.unwrap();
    let version: String = outbox
        .render(D::QUERIES.meta_read)
        .fetch_one::<D>(&mut conn, &[Arg::Text("schema_version")])
        .await
        .unwrap()
        .col("value")
        .unwrap();
    drop(conn);
    assert_eq!(
        version,
        D::MIGRATIONS.len().to_string(),
        "the latest schema version"
    );

    let err = outbox.migrate(8).await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("has 4 partitions"), "{text}");
    assert!(text.contains("fixed at set-up"), "{text}");
    assert_eq!(count(&outbox, "leases").await, 4);

    let later = outbox.open_again().await;
    assert_eq!(
        later.partitions().await.unwrap(),
        4,
        "a store opened later reads P from the database"
    );

    for bad in [0, 4097] {
        let err = outbox.migrate(bad).await.unwrap_err();
        assert!(err.to_string().contains("between 1 and 4096"), "{err}");
    }
}

/// Migrations started at once queue on the dialect's lock, and every one succeeds.
pub(crate) async fn concurrent_migrations_queue_on_the_lock_and_all_succeed<D: TestDialect>() {
    let outbox = TestOutbox::<D>::unmigrated(settings()).await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.migrate(8).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    assert_eq!(outbox.partitions().await.unwrap(), 8);
    assert_eq!(count(&outbox, "leases").await, 8);
    enqueue_committed(&outbox, order_event("1", "order.created")).await;
}

/// Before `ferry migrate`, the relay's and the producer's paths both say to run it.
pub(crate) async fn unmigrated_store_points_at_migrate<D: TestDialect>() {
    let outbox = TestOutbox::<D>::unmigrated(settings()).await;
    let err = outbox.partitions().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err}");
    assert!(err.to_string().contains("ferry migrate"), "{err}");
    let err = outbox.fetch(0, 10).await.unwrap_err();
    assert!(err.to_string().contains("ferry migrate"), "{err}");
    // The producer path names the missing routine or table the same way.
    let mut tx = outbox.pool().begin().await.unwrap();
    let err = outbox
        .enqueue(&mut tx, order_event("1", "order.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnqueueError::Store(StoreError::Schema(_))),
        "{err}"
    );
    assert!(err.to_string().contains("ferry migrate"), "{err}");
}

/// A prefix is spliced into SQL, so only identifiers pass; outboxes of two prefixes share a
/// database without seeing each other.
pub(crate) async fn invalid_prefix_is_refused_and_prefixes_keep_outboxes_apart<D: TestDialect>() {
    for bad in ["ferry-", "Ferry_", "x; DROP TABLE y", ""] {
        let err = TablePrefix::new(bad).unwrap_err();
        assert!(err.to_string().contains("not a valid identifier"), "{err}");
    }
    let outbox = TestOutbox::<D>::new(4).await;
    let other = outbox.open(settings()).await;
    other
        .migrate(2)
        .await
        .expect("a second outbox in the same database");
    enqueue_committed(&other, order_event("1", "order.created")).await;
    assert_eq!(count(&outbox, "outbox").await, 0);
    assert_eq!(count(&other, "outbox").await, 1);
}
