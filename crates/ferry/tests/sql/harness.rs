//! What the scenarios are written against: a dialect's test database, outboxes on it with
//! a table prefix of their own, and the helpers they share.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::file::{FileSink, FileSinkConfig};
use ferry::sql::{Dialect, RowExt, SqlOutbox, StoreSettings, TablePrefix};
use ferry::{Enqueued, Lease, NewMessage, ReceivedMessage, Relay, RelayConfig};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// A SQL dialect the scenarios run on.
pub(crate) trait TestDialect: Dialect {
    /// The database the tests use: the shared server's, or for SQLite a file in `dir`.
    fn database_url(dir: &Path) -> String;

    /// Creates `{p}effects`, the table the inbox scenarios' handler writes: `n` numbered in
    /// insertion order, the message's `id` (unique, as the dialect binds a uuid) and its
    /// `version`.
    const CREATE_EFFECTS: &'static str;
}

/// Settings with a prefix no other test uses and payloads up to 64 KiB.
pub(crate) fn settings() -> StoreSettings {
    let tag = &uuid::Uuid::now_v7().simple().to_string()[20..];
    StoreSettings {
        table_prefix: TablePrefix::new(format!("t{tag}_")).unwrap(),
        max_payload_bytes: 64 * 1024,
        ..StoreSettings::default()
    }
}

/// An outbox of a test, on the dialect's test database; derefs to the store. Clones share
/// the database (SQLite's file lives as long as the last of them).
pub(crate) struct TestOutbox<D: Dialect> {
    outbox: SqlOutbox<D>,
    url: String,
    /// Where SQLite's file is; removed with the last clone.
    dir: Arc<TempDir>,
}

/// By hand: a derived `Clone` would require the dialect to be `Clone`.
impl<D: Dialect> Clone for TestOutbox<D> {
    fn clone(&self) -> Self {
        Self {
            outbox: self.outbox.clone(),
            url: self.url.clone(),
            dir: Arc::clone(&self.dir),
        }
    }
}

impl<D: Dialect> Deref for TestOutbox<D> {
    type Target = SqlOutbox<D>;

    fn deref(&self) -> &SqlOutbox<D> {
        &self.outbox
    }
}

impl<D: TestDialect> TestOutbox<D> {
    /// An outbox of `partitions` partitions with [`settings`].
    pub(crate) async fn new(partitions: u32) -> Self {
        Self::with(partitions, settings()).await
    }

    /// An outbox of `partitions` partitions with `settings`.
    pub(crate) async fn with(partitions: u32, settings: StoreSettings) -> Self {
        let outbox = Self::unmigrated(settings).await;
        outbox.migrate(partitions).await.unwrap();
        outbox
    }

    /// A store whose tables do not exist yet.
    pub(crate) async fn unmigrated(settings: StoreSettings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = D::database_url(dir.path());
        let outbox = SqlOutbox::connect(&url, 8, settings).await.unwrap();
        Self {
            outbox,
            url,
            dir: Arc::new(dir),
        }
    }

    /// The database's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Another store on the same database with `settings`, as another process opens it.
    pub(crate) async fn open(&self, settings: StoreSettings) -> SqlOutbox<D> {
        SqlOutbox::connect(&self.url, 4, settings).await.unwrap()
    }

    /// Another store on the same tables, as another relay's process opens it.
    pub(crate) async fn open_again(&self) -> SqlOutbox<D> {
        self.open(StoreSettings {
            table_prefix: self.table_prefix().clone(),
            ..settings()
        })
        .await
    }
}

/// Runs `sql` on `outbox`'s database (`{p}` is its prefix, `$n` the dialect's
/// placeholders).
pub(crate) async fn execute<D: Dialect>(outbox: &SqlOutbox<D>, sql: &str) {
    let mut conn = outbox.pool().acquire().await.unwrap();
    outbox
        .render(sql)
        .execute::<D>(&mut conn, &[])
        .await
        .unwrap();
}

/// Column `n` of the one row `sql` returns on `outbox`'s database.
pub(crate) async fn number<D: Dialect>(outbox: &SqlOutbox<D>, sql: &str) -> i64 {
    let mut conn = outbox.pool().acquire().await.unwrap();
    let row = outbox
        .render(sql)
        .fetch_one::<D>(&mut conn, &[])
        .await
        .unwrap();
    row.col("n").unwrap()
}

/// Committed rows in `outbox`'s table `<prefix><table>`.
pub(crate) async fn count<D: Dialect>(outbox: &SqlOutbox<D>, table: &str) -> i64 {
    number(outbox, &format!("SELECT COUNT(*) AS n FROM {{p}}{table}")).await
}

/// An event of order `id`.
pub(crate) fn order_event(id: &str, event: &str) -> NewMessage {
    NewMessage::new("order", id, event, format!(r#"{{"order":"{id}"}}"#))
}

/// A message as a consumer receives it, with a fresh id.
pub(crate) fn received(aggregate: &str, version: u64) -> ReceivedMessage {
    ReceivedMessage {
        id: uuid::Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate.into(),
        version,
        event_type: "order.paid".into(),
        partition_key: format!("order/{aggregate}"),
        payload: bytes::Bytes::from_static(b"{}"),
        headers: Default::default(),
        time: None,
    }
}

/// Enqueues `messages` in one transaction, holds it open for `hold` (so that other writers
/// overlap it), then commits, or rolls back unless `commit`.
pub(crate) async fn write<D: Dialect>(
    outbox: &SqlOutbox<D>,
    messages: Vec<NewMessage>,
    hold: Duration,
    commit: bool,
) -> Vec<Enqueued> {
    let mut tx = outbox.pool().begin().await.unwrap();
    let mut enqueued = Vec::with_capacity(messages.len());
    for message in messages {
        enqueued.push(outbox.enqueue(&mut tx, message).await.unwrap());
    }
    tokio::time::sleep(hold).await;
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    enqueued
}

/// Enqueues `messages` in one committed transaction.
pub(crate) async fn commit_messages<D: Dialect>(
    outbox: &SqlOutbox<D>,
    messages: Vec<NewMessage>,
) -> Vec<Enqueued> {
    write(outbox, messages, Duration::ZERO, true).await
}

/// Enqueues `message` in a committed transaction of its own.
pub(crate) async fn enqueue_committed<D: Dialect>(
    outbox: &SqlOutbox<D>,
    message: NewMessage,
) -> Enqueued {
    commit_messages(outbox, vec![message]).await.remove(0)
}

/// The lease of `partition` among `leases`.
pub(crate) fn lease_of(leases: &[Lease], partition: u32) -> &Lease {
    leases
        .iter()
        .find(|lease| lease.partition == partition)
        .expect("partition granted")
}

/// Versions per aggregate id, in arrival order.
pub(crate) fn versions_per_aggregate<'a>(
    events: impl IntoIterator<Item = (&'a str, u64)>,
) -> BTreeMap<String, Vec<u64>> {
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (aggregate, version) in events {
        per_aggregate
            .entry(aggregate.to_owned())
            .or_default()
            .push(version);
    }
    per_aggregate
}

/// Polls `done` every 20 ms for up to 60 s.
pub(crate) async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a relay on `outbox` into a JSON-lines file until `expected` events are there (or
/// 30 s passed); returns them.
pub(crate) async fn relay_into_file<D: Dialect>(
    outbox: &SqlOutbox<D>,
    expected: usize,
) -> Vec<ReceivedMessage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = FileSink::open(&FileSinkConfig {
        path: path.clone(),
        source: None,
    })
    .await
    .unwrap();
    let store = Arc::new(outbox.clone());
    let mut config = RelayConfig::new("file-relay");
    config.poll_interval = Duration::from_millis(50);
    config.lease_ttl = Duration::from_secs(3);
    let stop = CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(store.clone(), store, Arc::new(sink), config).run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let events: Vec<ReceivedMessage> = text
            .lines()
            .map(|l| ReceivedMessage::from_structured_json(l).unwrap())
            .collect();
        if events.len() >= expected || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    relay.await.unwrap().unwrap();
    events
}
