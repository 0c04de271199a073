//! MySQL / MariaDB: the scenarios, and what only MySQL has: the SQL `enqueue` procedure,
//! its connection and credential errors, deadlocks and lost connections, marks that must
//! not gap-lock against producers, and JSON reported as text or binary.

use std::path::Path;
use std::time::Duration;

use ferry::mysql::{MyDialect, MyOutbox};
use ferry::sql::StoreSettings;
use ferry::{EnqueueError, Headers, LeaseStore, OutboxStore, error_chain};
use ferry_core::testing::services;
use sqlx::Row;
use sqlx::types::Json;
use uuid::Uuid;

use crate::harness::{TestDialect, TestOutbox, enqueue_committed, order_event};
use crate::scenarios::servers::{
    enqueue_routine_matches_the_rust_api, enqueue_routine_takes_the_trace_context,
};

impl TestDialect for MyDialect {
    fn database_url(_dir: &Path) -> String {
        services::mysql_url()
    }

    const CREATE_EFFECTS: &'static str = "CREATE TABLE {p}effects \
        (n BIGINT AUTO_INCREMENT PRIMARY KEY, id BINARY(16) NOT NULL UNIQUE, \
        version BIGINT NOT NULL) ENGINE = InnoDB";
}

every_dialect_passes!(MyDialect);
every_server_passes!(MyDialect);

#[tokio::test]
async fn wrong_credentials_are_named_and_not_retried() {
    let url = services::mysql_url().replacen("mysql://root@", "mysql://root:wrong-password@", 1);
    let err = MyOutbox::connect(&url, 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let text = error_chain(&err);
    assert!(
        text.contains("refused user \"root\"")
            && text.contains("store.url")
            && text.contains("Access denied"),
        "{text}"
    );
    let url = format!("{}_no_such_database", services::mysql_url());
    let err = MyOutbox::connect(&url, 2, StoreSettings::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(error_chain(&err).contains("database"), "{err}");
}

#[tokio::test]
async fn sql_enqueue_procedure_takes_the_trace_context() {
    let outbox = TestOutbox::<MyDialect>::new(2).await;
    enqueue_routine_takes_the_trace_context(
        &outbox,
        "CALL {p}enqueue_traced('order', $1, 'order.paid', '{}', NULL, NULL, NULL, $2, $3)",
    )
    .await;
}

/// MariaDB stores JSON as LONGTEXT and reports JSON values from functions or casts as
/// binary strings; the store decodes both, and the procedure accepts JSON built in SQL.
#[tokio::test]
async fn json_headers_decode_whether_reported_as_text_or_binary() {
    let outbox = TestOutbox::<MyDialect>::new(1).await;
    let procedure = outbox.table_prefix().render("{p}enqueue");
    let sql = format!(
        "CALL {procedure}('order', '7', 'order.paid', '{{\"total\": 10}}', \
         JSON_OBJECT('traceparent', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', 'x-city', 'K\u{f6}ln'), NULL, NULL)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    let expected: Headers = [
        (
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        ),
        ("x-city".to_owned(), "K\u{f6}ln".to_owned()),
    ]
    .into();
    let fetched = outbox.fetch(0, 10).await.unwrap();
    assert_eq!(fetched[0].headers, expected);
    assert_eq!(&fetched[0].payload[..], b"{\"total\": 10}");

    let table = outbox.table_prefix().render("{p}outbox");
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT headers, CAST(headers AS BINARY) AS binary_headers, \
         JSON_EXTRACT(headers, '$') AS extracted FROM {table}"
    )))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    for column in ["headers", "binary_headers", "extracted"] {
        let Json(headers): Json<Headers> = row.try_get(column).unwrap();
        assert_eq!(headers, expected, "{column}");
    }
}

#[tokio::test]
async fn the_enqueue_procedure_matches_the_rust_api() {
    let outbox = TestOutbox::<MyDialect>::new(16).await;
    enqueue_routine_matches_the_rust_api(
        &outbox,
        "CALL {p}enqueue('invoice', $1, 'invoice.sent', '{}', NULL, $2, NULL)",
        "CALL {p}enqueue('order', '9', 'order.created', '{}', NULL, NULL, NULL)",
    )
    .await;
    let procedure = outbox.table_prefix().render("{p}enqueue");
    // Names are compared byte for byte: a trailing space is another aggregate.
    let padded = enqueue_committed(&outbox, order_event("9 ", "order.created")).await;
    assert_eq!(padded.version, 1);
    // Too long for the column: an error, never a silent truncation.
    let call = format!("CALL {procedure}('order', ?, 'order.created', '{{}}', NULL, NULL, NULL)");
    let err = sqlx::query(sqlx::AssertSqlSafe(call))
        .bind("x".repeat(300))
        .fetch_one(outbox.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
}

#[tokio::test]
async fn deadlocks_lock_timeouts_and_lost_connections_are_retryable() {
    let outbox = TestOutbox::<MyDialect>::new(4).await;
    // Two transactions lock aggregates a and b in opposite orders: InnoDB rolls one back.
    let mut first = outbox.pool().begin().await.unwrap();
    let mut second = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut first, order_event("a", "x"))
        .await
        .unwrap();
    outbox
        .enqueue(&mut second, order_event("b", "x"))
        .await
        .unwrap();
    let (one, two) = tokio::join!(outbox.enqueue(&mut first, order_event("b", "x")), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        outbox.enqueue(&mut second, order_event("a", "x")).await
    });
    let err = one
        .err()
        .or(two.err())
        .expect("one side is the deadlock victim");
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
    drop((first, second));

    // A lock wait timeout (1205) while another transaction holds the aggregate.
    let mut holder = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut holder, order_event("c", "x"))
        .await
        .unwrap();
    let mut waiter = outbox.pool().begin().await.unwrap();
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut *waiter)
        .await
        .unwrap();
    let err = outbox
        .enqueue(&mut waiter, order_event("c", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
    drop((holder, waiter));

    // The server kills the connection under an open transaction.
    let mut tx = outbox.pool().begin().await.unwrap();
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
        .execute(outbox.pool())
        .await
        .unwrap();
    let err = outbox
        .enqueue(&mut tx, order_event("d", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnqueueError::Store(e) if e.is_retryable()),
        "{err}"
    );
}

/// Producers keep uncommitted rows in the partitions the relay is marking, and both go on.
/// (The mark locks only the rows it marks, through the id index: a scan of the partition
/// would wait on an uncommitted row while holding gaps producers insert into, a deadlock
/// that depends on the planner's choice; the end-to-end tests hit it when it was possible.)
#[tokio::test]
async fn marks_and_producers_of_the_same_partitions_both_proceed() {
    // Several partitions, so that the planner finds a scan of one partition selective.
    let outbox = TestOutbox::<MyDialect>::new(8).await;
    let leases = outbox
        .acquire("r", 8, Duration::from_secs(120))
        .await
        .unwrap();
    let (producers, transactions, per_tx) = (4, 30, 10);
    let producing = futures::future::join_all((0..producers).map(|p| {
        let outbox = outbox.clone();
        async move {
            for i in 0..transactions {
                let mut tx = outbox.pool().begin().await.unwrap();
                for a in 0..per_tx {
                    let id = format!("{p}-{a}");
                    outbox
                        .enqueue(&mut tx, order_event(&id, &format!("step{i}")))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tx.commit().await.unwrap();
            }
        }
    }));
    let marking = futures::future::join_all(leases.iter().map(|lease| {
        let outbox = &outbox;
        async move {
            let mut idle_rounds = 0;
            let mut marked = 0;
            while idle_rounds < 200 {
                let ids: Vec<Uuid> = outbox
                    .fetch(lease.partition, 200)
                    .await
                    .unwrap()
                    .iter()
                    .map(|m| m.id)
                    .collect();
                if ids.is_empty() {
                    idle_rounds += 1;
                } else {
                    idle_rounds = 0;
                    marked += outbox.mark_published(lease, &ids, None).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            marked
        }
    }));
    let ((), marked) = tokio::join!(
        async {
            producing.await;
        },
        marking
    );
    assert_eq!(
        marked.iter().sum::<u64>(),
        producers * transactions * per_tx
    );
}
