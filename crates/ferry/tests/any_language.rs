//! The inbox from clients that are not Rust: PostgreSQL's `<prefix>inbox_admit` from
//! `psql`, MySQL's procedure from the `mysql` client, the Redis inbox script from
//! `redis-cli`, and the Python consumer of `examples/consumer.py` reading ferry's events
//! from NATS. Each decides as the Rust inbox does: apply, duplicate or stale.
#![cfg(all(
    feature = "postgres",
    feature = "mysql",
    feature = "redis-store",
    feature = "nats"
))]
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ferry::mysql::MyOutbox;
use ferry::nats::{NatsSink, NatsSinkConfig};
use ferry::postgres::PgOutbox;
use ferry::redis_store::RedisInbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{NewMessage, OutboxStore, Relay, RelayConfig};
use ferry_core::testing::services;

fn unique_prefix() -> TablePrefix {
    TablePrefix::new(format!("l{}_", &Uuid::now_v7().simple().to_string()[20..])).unwrap()
}

fn settings(prefix: &TablePrefix) -> StoreSettings {
    StoreSettings {
        table_prefix: prefix.clone(),
        ..StoreSettings::default()
    }
}

/// Runs `program args`; its standard output, or a failure with its standard error.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The decisions a consumer sees for one aggregate: a first message, its repeat, an older
/// version under a new id, a gap, a version below the last, and a rolled-back admit that
/// leaves no trace.
const EXPECTED: [&str; 6] = [
    "apply,0",
    "duplicate,0",
    "stale,1",
    "apply,1",
    "stale,3",
    "apply,3",
];

#[tokio::test]
async fn postgres_inbox_function_decides_for_psql() {
    let url = services::postgres_url();
    let prefix = unique_prefix();
    PgOutbox::connect(&url, 2, settings(&prefix))
        .await
        .unwrap()
        .migrate(1)
        .await
        .unwrap();
    let p = prefix.as_str();
    let [a, b, c, d, e] = [(); 5].map(|()| Uuid::now_v7());
    let admit = |id: Uuid, version: u64| {
        format!(
            "SELECT decision, last_version FROM {p}inbox_admit('billing', '{id}', 'order', '42', {version});"
        )
    };
    // Each `-c` is a transaction of its own, as each message of a consumer would be.
    let statements = [
        admit(a, 1),
        admit(a, 1),
        admit(b, 1),
        admit(c, 3),
        admit(d, 2),
        format!("BEGIN; {} ROLLBACK;", admit(e, 4)),
        admit(e, 4),
    ];
    let mut args = vec![
        "-X",
        "-q",
        "-At",
        "-F,",
        "-v",
        "ON_ERROR_STOP=1",
        url.as_str(),
    ];
    for statement in &statements {
        args.extend(["-c", statement.as_str()]);
    }
    let out = run("psql", &args).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    // The rolled-back admit answered too; what counts is that its repeat applies again.
    assert_eq!(
        lines,
        [EXPECTED[..5].to_vec(), vec!["apply,3", "apply,3"]].concat()
    );
    let refused = run(
        "psql",
        &["-X", "-q", "-At", &url, "-c", &admit(Uuid::now_v7(), 0)],
    )
    .unwrap_err();
    assert!(refused.contains("version must be 1 or more"), "{refused}");
}

#[tokio::test]
async fn mysql_inbox_procedure_decides_for_the_mysql_client() {
    let url = services::mysql_url();
    let prefix = unique_prefix();
    MyOutbox::connect(&url, 2, settings(&prefix))
        .await
        .unwrap()
        .migrate(1)
        .await
        .unwrap();
    let database = url.rsplit('/').next().unwrap();
    let p = prefix.as_str();
    let [a, b, c, d, e] = [(); 5].map(|()| Uuid::now_v7());
    let admit = |id: Uuid, version: u64| {
        format!(
            "CALL {p}inbox_admit('billing', UNHEX('{}'), 'order', '42', {version});",
            id.simple()
        )
    };
    let script = [
        admit(a, 1),
        admit(a, 1),
        admit(b, 1),
        admit(c, 3),
        admit(d, 2),
        format!("START TRANSACTION; {} ROLLBACK;", admit(e, 4)),
        admit(e, 4),
    ]
    .join("\n");
    let out = run(
        "mysql",
        &[
            "-h",
            "127.0.0.1",
            "-u",
            "root",
            "-N",
            "-B",
            database,
            "-e",
            &script,
        ],
    )
    .unwrap();
    let lines: Vec<String> = out.lines().map(|l| l.replace('\t', ",")).collect();
    assert_eq!(
        lines,
        [EXPECTED[..5].to_vec(), vec!["apply,3", "apply,3"]].concat()
    );
    let refused = run(
        "mysql",
        &[
            "-h",
            "127.0.0.1",
            "-u",
            "root",
            database,
            "-e",
            &admit(Uuid::now_v7(), 0),
        ],
    )
    .unwrap_err();
    assert!(refused.contains("version must be 1 or more"), "{refused}");
}

#[tokio::test]
async fn redis_inbox_script_decides_for_redis_cli() {
    let url = services::redis_url();
    let host_port = url.trim_start_matches("redis://").trim_end_matches('/');
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "6379"));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("inbox.lua");
    std::fs::write(&script, RedisInbox::script()).unwrap();
    let prefix = format!("ferry.test.{}:", &Uuid::now_v7().simple().to_string()[20..]);
    let admit = |id: Uuid, version: u64| -> String {
        let id = id.to_string();
        let version = version.to_string();
        let out = run(
            "redis-cli",
            &[
                "-h",
                host,
                "-p",
                port,
                "--eval",
                script.to_str().unwrap(),
                ",",
                &prefix,
                "billing",
                "admit",
                &id,
                "order",
                "42",
                &version,
                "600000",
                "0",
            ],
        )
        .unwrap();
        out.lines().collect::<Vec<_>>().join(",")
    };
    let [a, b, c, d] = [(); 4].map(|()| Uuid::now_v7());
    let decisions = [
        admit(a, 1),
        admit(a, 1),
        admit(b, 1),
        admit(c, 3),
        admit(d, 2),
    ];
    assert_eq!(decisions, EXPECTED[..5]);
}

/// ferry's events on NATS, consumed by the Python consumer of `examples/consumer.py`
/// through the PostgreSQL inbox: every event applied once; read again, every one a
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_applies_each_event_once() {
    let url = services::postgres_url();
    let prefix = unique_prefix();
    let outbox = Arc::new(PgOutbox::connect(&url, 4, settings(&prefix)).await.unwrap());
    outbox.migrate(2).await.unwrap();
    for round in 1..=10 {
        let mut tx = outbox.pool().begin().await.unwrap();
        for aggregate in 0..20 {
            outbox
                .enqueue(
                    &mut tx,
                    NewMessage::new(
                        "order",
                        aggregate.to_string(),
                        "order.changed",
                        format!("{{\"round\":{round}}}"),
                    ),
                )
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let tag = &prefix.as_str()[1..prefix.as_str().len() - 1];
    let stream = format!("PY_{tag}");
    let sink = NatsSink::connect(&NatsSinkConfig {
        url: services::nats_url(),
        stream: stream.clone(),
        subjects: vec![format!("py{tag}.>")],
        subject_template: format!("py{tag}.{{partition}}"),
        ..NatsSinkConfig::default()
    })
    .await
    .unwrap();
    let mut config = RelayConfig::new("python-test");
    config.poll_interval = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let relay = tokio::spawn(
        Relay::new(outbox.clone(), outbox.clone(), Arc::new(sink), config).run(stop.clone()),
    );
    let drained = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.status().await.unwrap().iter().any(|p| p.backlog > 0) {
        assert!(tokio::time::Instant::now() < drained, "not relayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    relay.await.unwrap().unwrap();

    let python = services::python();
    let consumer = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/consumer.py");
    let consume = || {
        run(
            python.to_str().unwrap(),
            &[
                consumer,
                "--pg-url",
                &url.replacen("postgres://", "postgresql://", 1),
                "--nats-url",
                &services::nats_url(),
                "--stream",
                &stream,
                "--prefix",
                prefix.as_str(),
                "--consumer",
                "billing",
                "--table",
                &format!("{}effects", prefix.as_str()),
                "--idle-secs",
                "1",
            ],
        )
        .unwrap_or_else(|err| panic!("the Python consumer failed: {err}"))
    };
    let counts: serde_json::Value = serde_json::from_str(consume().trim()).unwrap();
    assert_eq!(
        counts,
        serde_json::json!({"apply": 200, "duplicate": 0, "stale": 0})
    );
    let again: serde_json::Value = serde_json::from_str(consume().trim()).unwrap();
    assert_eq!(
        again,
        serde_json::json!({"apply": 0, "duplicate": 200, "stale": 0})
    );
    let table = format!("{}effects", prefix.as_str());
    let per_aggregate: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT aggregate_id, count(*), max(version) FROM {table} GROUP BY aggregate_id"
    )))
    .fetch_all(outbox.pool())
    .await
    .unwrap();
    assert_eq!(per_aggregate.len(), 20);
    assert!(
        per_aggregate
            .iter()
            .all(|(_, n, max)| (*n, *max) == (10, 10)),
        "{per_aggregate:?}"
    );
    let client = async_nats::connect(services::nats_url()).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await
        .unwrap();
}
