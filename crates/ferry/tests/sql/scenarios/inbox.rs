//! The consumer inbox (G4): each message applied at most once, never at or below its
//! aggregate's last applied version, in the consumer's own transaction.

use ferry::sql::{Arg, RowExt, SqlInbox, Statement};
use ferry::{OutboxStore, ProcessError, Processed, ReceivedMessage, StoreError};

use crate::harness::{
    TestDialect, TestOutbox, commit_messages, count, execute, order_event, received,
};

/// An instance of a consumer: its inbox and a handler that records each message it
/// applies in `{p}effects`.
struct Consumer<D: TestDialect> {
    db: TestOutbox<D>,
    inbox: SqlInbox<D>,
    insert_effect: Statement,
}

impl<D: TestDialect> Consumer<D> {
    /// Consumer "billing" on a new database with its effects table.
    async fn billing() -> Self {
        let db = TestOutbox::<D>::new(4).await;
        execute(&db, D::CREATE_EFFECTS).await;
        Self::on(db, "billing")
    }

    fn on(db: TestOutbox<D>, consumer: &str) -> Self {
        Self {
            inbox: SqlInbox::new(consumer, db.table_prefix()),
            insert_effect: db.render("INSERT INTO {p}effects (id, version) VALUES ($1, $2)"),
            db,
        }
    }

    /// Another instance of `consumer` on the same tables.
    fn instance(&self, consumer: &str) -> Self {
        Self::on(self.db.clone(), consumer)
    }

    /// Runs `message` through the inbox in one transaction, with a handler that returns the
    /// message's version, failing after its write if `fail`; commits on `Ok`, rolls back on
    /// `Err`.
    async fn apply(
        &self,
        message: &ReceivedMessage,
        fail: bool,
    ) -> Result<Processed<u64>, ProcessError<StoreError>> {
        let mut tx = self.db.pool().begin().await.unwrap();
        let result = self
            .inbox
            .process(&mut tx, message, async |tx, m| {
                self.insert_effect
                    .execute::<D>(&mut **tx, &[Arg::Id(m.id), Arg::Int(m.version as i64)])
                    .await?;
                if fail {
                    return Err(StoreError::Other("handler failed on purpose".into()));
                }
                Ok(m.version)
            })
            .await;
        if result.is_ok() {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        result
    }
}

/// A repeated id is a duplicate, an older version is stale, aggregates are independent,
/// and a gap shows in `previous_version`.
pub(crate) async fn g4_inbox_skips_duplicate_ids_and_stale_versions<D: TestDialect>() {
    let inbox = Consumer::<D>::billing().await;
    let v1 = received("1", 1);
    let v2 = received("1", 2);
    assert_eq!(
        inbox.apply(&v1, false).await.unwrap(),
        Processed::Applied {
            output: 1,
            previous_version: 0
        }
    );
    assert_eq!(
        inbox.apply(&v2, false).await.unwrap(),
        Processed::Applied {
            output: 2,
            previous_version: 1
        }
    );
    assert_eq!(inbox.apply(&v2, false).await.unwrap(), Processed::Duplicate);
    assert_eq!(
        inbox.apply(&received("1", 1), false).await.unwrap(),
        Processed::Stale {
            last_applied_version: 2
        }
    );
    assert_eq!(
        inbox.apply(&received("2", 3), false).await.unwrap(),
        Processed::Applied {
            output: 3,
            previous_version: 0
        }
    );
    assert_eq!(
        count(&inbox.db, "effects").await,
        3,
        "the handler ran once per applied message"
    );
}

/// A failing handler rolls the inbox record back with its effects, and a redelivery
/// applies the message.
pub(crate) async fn g4_handler_effects_and_inbox_record_roll_back_together<D: TestDialect>() {
    let inbox = Consumer::<D>::billing().await;
    let message = received("1", 1);
    let err = inbox.apply(&message, true).await.unwrap_err();
    assert!(matches!(err, ProcessError::Handler(_)), "{err}");
    assert_eq!(count(&inbox.db, "effects").await, 0);
    assert_eq!(
        count(&inbox.db, "inbox").await,
        0,
        "the inbox record rolled back with the handler"
    );
    assert!(
        inbox.apply(&message, false).await.unwrap().is_applied(),
        "a redelivery applies it"
    );
    assert_eq!(count(&inbox.db, "effects").await, 1);
}

/// Messages as the relay fetched them: the handler's output comes back, its own error
/// type is passed on, and each consumer keeps its own record.
pub(crate) async fn g4_inbox_applies_each_message_once_and_never_a_stale_version<D: TestDialect>() {
    let billing = Consumer::<D>::billing().await;
    let enqueued = commit_messages(
        &billing.db,
        (0..3)
            .map(|i| order_event("1", &format!("order.e{i}")))
            .collect(),
    )
    .await;
    let received: Vec<ReceivedMessage> = billing
        .db
        .fetch(enqueued[0].partition, 10)
        .await
        .unwrap()
        .into_iter()
        .map(ReceivedMessage::from)
        .collect();
    assert_eq!(
        billing.apply(&received[0], false).await.unwrap(),
        Processed::Applied {
            output: 1,
            previous_version: 0
        }
    );
    assert_eq!(
        billing.apply(&received[0], false).await.unwrap(),
        Processed::Duplicate
    );
    // A handler error: the caller rolls back, taking the handler's write and the inbox
    // record with it.
    let err = billing.apply(&received[2], true).await.unwrap_err();
    assert!(
        matches!(&err, ProcessError::Handler(e) if e.to_string().contains("failed on purpose")),
        "the handler's own error: {err:?}"
    );
    assert_eq!(count(&billing.db, "effects").await, 1);
    // Processing it again applies it, skipping version 2 (it is reported).
    assert_eq!(
        billing.apply(&received[2], false).await.unwrap(),
        Processed::Applied {
            output: 3,
            previous_version: 1
        }
    );
    // Version 2 arrives late: stale.
    assert_eq!(
        billing.apply(&received[1], false).await.unwrap(),
        Processed::Stale {
            last_applied_version: 3
        }
    );
    assert_eq!(count(&billing.db, "effects").await, 2);
    // Another consumer has its own record.
    let shipping = billing.instance("shipping");
    assert!(
        shipping
            .apply(&received[1], false)
            .await
            .unwrap()
            .is_applied()
    );
}

/// Aggregate ids are compared byte for byte (`1` and `1 ` are two aggregates), and each
/// consumer keeps its own record.
pub(crate) async fn g4_inbox_keys_are_exact_and_consumers_separate<D: TestDialect>() {
    let billing = Consumer::<D>::billing().await;
    let v2 = received("1", 2);
    assert!(billing.apply(&v2, false).await.unwrap().is_applied());
    assert_eq!(
        billing.apply(&received("1 ", 1), false).await.unwrap(),
        Processed::Applied {
            output: 1,
            previous_version: 0
        }
    );
    let shipping = billing.instance("shipping");
    let mut tx = shipping.db.pool().begin().await.unwrap();
    let seen_by_shipping = shipping
        .inbox
        .process(&mut tx, &v2, async |_, _| Ok::<_, StoreError>(()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(seen_by_shipping.is_applied());
    assert_eq!(
        billing.apply(&v2, false).await.unwrap(),
        Processed::Duplicate
    );
}

/// Instances of one consumer receiving the same stream at once: each id is applied once,
/// and applied versions commit in increasing order.
pub(crate) async fn g4_concurrent_consumer_instances_apply_in_version_order<D: TestDialect>() {
    let first = Consumer::<D>::billing().await;
    let messages: Vec<ReceivedMessage> = (1..=60).map(|v| received("hot", v)).collect();
    // Polled together in one task: the instances still interleave on the server's locks.
    let instances = (0..4).map(|i| {
        let (instance, messages) = (first.instance("billing"), &messages);
        async move {
            let mut applied = 0;
            for message in messages.iter().skip(i) {
                if instance.apply(message, false).await.unwrap().is_applied() {
                    applied += 1;
                }
            }
            applied
        }
    });
    let applied: usize = futures::future::join_all(instances).await.into_iter().sum();
    let mut conn = first.db.pool().acquire().await.unwrap();
    let versions: Vec<i64> = first
        .db
        .render("SELECT version FROM {p}effects ORDER BY n")
        .fetch_all::<D>(&mut conn, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.col("version").unwrap())
        .collect();
    assert_eq!(versions.len(), applied);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "applied out of order: {versions:?}"
    );
    assert_eq!(versions.last(), Some(&60));
}
