//! [`PgLogStream`]: one replication session on the outbox's slot.
//!
//! The session asks for pgoutput protocol version 1 (`pgwire-replication` sends
//! `proto_version '1'` and no `streaming` option, which needs version 2): the server
//! decodes a transaction's changes once its commit record is written and sends them only
//! then, Begin … Commit. So every insert the stream reads belongs to a committed
//! transaction, and the stream hands them out in pieces as they arrive, before the Commit
//! message, without ever holding a whole transaction.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationEvent};
use sqlx::PgPool;
use tokio::time::{Instant, sleep, timeout_at};

use ferry_core::backoff::Backoff;
use ferry_core::{CaptureLag, CapturedPiece, LogPosition, LogStream, Message, StoreError};

use super::pgoutput::{Decoded, Decoder};
use super::{
    HEARTBEAT_PREFIX, current_wal_insert_lsn, replication_error, slot_lag_bytes, unavailable,
};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// An open replication stream of the outbox's inserts, in pieces of transactions.
pub(super) struct PgLogStream {
    pub(super) client: ReplicationClient,
    pub(super) decoder: Decoder,
    pub(super) pool: PgPool,
    pub(super) slot: String,
    /// The most inserts a piece holds.
    pub(super) max_messages: usize,
    pub(super) heartbeat_interval: Duration,
    pub(super) last_heartbeat: Instant,
    /// The transaction being received, once its Begin came.
    pub(super) open: Option<OpenTransaction>,
    /// Where the log ended when the relay said it drained the table.
    pub(super) drained_at: Option<Lsn>,
    /// The last snapshot a visibility check read.
    pub(super) snapshot: Snapshot,
    /// The transactions handed out and not yet confirmed: end and commit time (µs since
    /// 2000-01-01), for the lag in seconds.
    pub(super) unconfirmed: VecDeque<(Lsn, i64)>,
}

/// A transaction whose Begin came and whose Commit has not.
pub(super) struct OpenTransaction {
    xid: u32,
    /// Known at Begin: see [`PgLogStream::begin`].
    maybe_published: bool,
    /// Whether a new snapshot sees it: awaited once, before its first piece of a maybe
    /// published transaction goes out.
    visible: bool,
    /// Its inserts not yet handed out: fewer than a piece.
    messages: Vec<Message>,
}

impl PgLogStream {
    /// Opens the transaction a Begin message announces. Whether it ended before the drain
    /// is known from the Begin already: `final_lsn` is where its commit record starts, and
    /// the server reserves a record's WAL whole, so a commit record starting before the
    /// WAL insert position read at [`LogStream::mark_drained`] also ends at or before it
    /// (and one starting at or after it ends after it).
    fn begin(&mut self, xid: u32, final_lsn: Lsn) {
        self.open = Some(OpenTransaction {
            xid,
            maybe_published: self.drained_at.is_none_or(|drained| final_lsn < drained),
            visible: false,
            messages: Vec::new(),
        });
    }

    /// A piece of the open transaction, of what it holds: its last if `end` is given.
    /// A piece of a transaction that may already be published waits until the transaction
    /// is visible, so that the relay's check of which of its rows are unpublished sees them.
    async fn piece(&mut self, end: Option<Lsn>) -> Result<CapturedPiece, StoreError> {
        let open = open_transaction(&mut self.open)?;
        if open.maybe_published && !open.visible && !open.messages.is_empty() {
            wait_until_visible(&self.pool, open.xid, &mut self.snapshot).await?;
            open.visible = true;
        }
        let piece = CapturedPiece {
            end: end.map(|end| LogPosition(end.to_string())),
            messages: std::mem::take(&mut open.messages),
            maybe_published: open.maybe_published,
        };
        if end.is_some() {
            self.open = None;
        }
        Ok(piece)
    }

    /// Emits a transactional logical message: it comes back as an empty transaction,
    /// whose confirmation moves the slot on while the outbox is idle (other tables' and
    /// databases' WAL would otherwise stay pinned behind the last outbox transaction).
    async fn heartbeat(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_logical_emit_message(true, $1, '')")
            .bind(HEARTBEAT_PREFIX)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        self.last_heartbeat = Instant::now();
        Ok(())
    }
}

#[async_trait]
impl LogStream for PgLogStream {
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedPiece>, StoreError> {
        let deadline = Instant::now() + idle;
        loop {
            if self.last_heartbeat.elapsed() >= self.heartbeat_interval {
                self.heartbeat().await?;
            }
            let wake = deadline.min(self.last_heartbeat + self.heartbeat_interval);
            let event = match timeout_at(wake, self.client.recv()).await {
                Err(_) if Instant::now() >= deadline => return Ok(None),
                Err(_) => continue,
                Ok(event) => event.map_err(|err| replication_error(&self.slot, err))?,
            };
            match event {
                None => {
                    return Err(StoreError::Unavailable(
                        format!("the replication stream of slot {} ended", self.slot).into(),
                    ));
                }
                Some(ReplicationEvent::Begin { xid, final_lsn, .. }) => self.begin(xid, final_lsn),
                Some(ReplicationEvent::XLogData { data, .. }) => {
                    match self
                        .decoder
                        .decode(&data)
                        .map_err(|err| StoreError::Other(Box::new(err)))?
                    {
                        Decoded::Insert(message) => {
                            let open = open_transaction(&mut self.open)?;
                            open.messages.push(*message);
                            if open.messages.len() >= self.max_messages {
                                return self.piece(None).await.map(Some);
                            }
                        }
                        Decoded::Other => {}
                    }
                }
                Some(ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                }) => {
                    let last = self.piece(Some(end_lsn)).await?;
                    self.unconfirmed.push_back((end_lsn, commit_time_micros));
                    return Ok(Some(last));
                }
                Some(ReplicationEvent::StoppedAt { reached }) => {
                    return Err(StoreError::Unavailable(
                        format!(
                            "the replication stream of slot {} stopped at {reached}",
                            self.slot
                        )
                        .into(),
                    ));
                }
                Some(_) => {}
            }
        }
    }

    async fn mark_drained(&mut self) -> Result<(), StoreError> {
        self.drained_at = Some(current_wal_insert_lsn(&self.pool).await?);
        Ok(())
    }

    async fn confirm(&mut self, end: &LogPosition) -> Result<(), StoreError> {
        let lsn = Lsn::parse(&end.0).map_err(|err| {
            StoreError::Other(format!("not a PostgreSQL LSN: {end}: {}", err.0).into())
        })?;
        self.client.update_applied_lsn(lsn);
        while self.unconfirmed.front().is_some_and(|(end, _)| *end <= lsn) {
            self.unconfirmed.pop_front();
        }
        Ok(())
    }

    async fn lag(&mut self) -> Result<CaptureLag, StoreError> {
        let bytes = slot_lag_bytes(&self.pool, &self.slot).await?;
        let seconds = match self.unconfirmed.front() {
            None => 0.0,
            Some((_, committed)) => {
                let now = chrono::Utc::now().timestamp_micros();
                (now - (committed + PG_EPOCH_MICROS)).max(0) as f64 / 1e6
            }
        };
        Ok(CaptureLag {
            bytes,
            seconds: Some(seconds),
        })
    }
}

/// The transaction a change or a Commit belongs to: the one whose Begin came.
fn open_transaction(
    open: &mut Option<OpenTransaction>,
) -> Result<&mut OpenTransaction, StoreError> {
    open.as_mut().ok_or_else(|| {
        StoreError::Other("pgoutput: a change or Commit outside a transaction (no Begin)".into())
    })
}

/// A snapshot of the server's transactions (`pg_current_snapshot`): every id below its
/// xmax that is not among the running ones had completed when it was taken. The stream
/// keeps the last one it read, so that the transactions a restarted stream reads again,
/// long committed, need no query each (one per transaction is slower than small
/// transactions are committed), even while a long transaction holds the server's xmin back.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    xmax: u64,
    running: Vec<u64>,
}

impl Snapshot {
    /// Whether transaction `xid` (its low 32 bits, as the protocol sends it) had completed:
    /// the 64-bit id it stands for is the one among the 2^31 before xmax with those bits,
    /// and it was not running. Ids at or past xmax had not started; the default snapshot
    /// shows nothing completed.
    fn shows_completed(&self, xid: u32) -> bool {
        // xmax's low 32 bits against xid's.
        let distance = (self.xmax as u32).wrapping_sub(xid);
        distance > 0
            && distance < 1 << 31
            && self
                .xmax
                .checked_sub(u64::from(distance))
                .is_some_and(|full| !self.running.contains(&full))
    }
}

/// Waits until transaction `xid` is visible to new snapshots. Its commit is streamed once
/// the commit record is flushed, which is before the committing session leaves the
/// server's list of running transactions; the relay checks a maybe-published
/// transaction's rows against the table at once, and must not take rows it cannot see yet
/// for published ones. No query when `snapshot` shows it completed already; a query
/// replaces it with the current one.
pub(super) async fn wait_until_visible(
    pool: &PgPool,
    xid: u32,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
    if snapshot.shows_completed(xid) {
        return Ok(());
    }
    loop {
        *snapshot = current_snapshot(pool).await?;
        if snapshot.shows_completed(xid) {
            return Ok(());
        }
        sleep(backoff.next_delay()).await;
    }
}

/// The server's snapshot now (`visible.sql`).
async fn current_snapshot(pool: &PgPool) -> Result<Snapshot, StoreError> {
    let (xmax, running): (i64, Vec<i64>) = sqlx::query_as(include_str!("visible.sql"))
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    let as_id = |id: i64| {
        u64::try_from(id).map_err(|_| {
            StoreError::Other(format!("pg_current_snapshot gave a negative id {id}").into())
        })
    };
    Ok(Snapshot {
        xmax: as_id(xmax)?,
        running: running.into_iter().map(as_id).collect::<Result<_, _>>()?,
    })
}

/// Whether a replication error says the slot is streamed by another session.
pub(super) fn slot_in_use(err: &PgWireError) -> bool {
    matches!(err, PgWireError::Server(text) if text.contains("SQLSTATE 55006"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_core::testing::services::postgres_url;
    use sqlx::PgPool;
    use tokio::time::timeout;

    use super::{Snapshot, wait_until_visible};

    #[test]
    fn a_snapshot_shows_completed_the_ids_before_its_xmax_that_were_not_running() {
        let snapshot = Snapshot {
            xmax: 105,
            running: vec![100, 103],
        };
        assert!(snapshot.shows_completed(99));
        assert!(!snapshot.shows_completed(100), "running");
        assert!(snapshot.shows_completed(101), "above a running one");
        assert!(!snapshot.shows_completed(103), "running");
        assert!(snapshot.shows_completed(104));
        assert!(!snapshot.shows_completed(105), "xmax had not started");
        assert!(!snapshot.shows_completed(4000), "a later id");
        assert!(
            !Snapshot::default().shows_completed(5),
            "no snapshot read yet"
        );
        // Past a wraparound of the 32-bit ids: xmax in the second epoch.
        let wrapped = Snapshot {
            xmax: (1 << 32) + 20,
            running: vec![(1 << 32) + 15],
        };
        assert!(wrapped.shows_completed(5), "id 2^32 + 5");
        assert!(
            wrapped.shows_completed(u32::MAX),
            "id 2^32 - 1, before the wraparound"
        );
        assert!(!wrapped.shows_completed(15), "id 2^32 + 15 was running");
    }

    #[tokio::test]
    async fn a_transaction_is_awaited_until_it_completes() {
        let pool = PgPool::connect(&postgres_url()).await.expect("PostgreSQL");
        let mut running = pool.begin().await.expect("a transaction");
        let xid: i64 = sqlx::query_scalar("SELECT (txid_current() % 4294967296)::bigint")
            .fetch_one(&mut *running)
            .await
            .expect("its id");
        let xid = u32::try_from(xid).expect("32 bits");
        // A later transaction completes, so that snapshots list the running one among
        // their running ids (below their xmax) rather than leave it past their xmax.
        sqlx::query("SELECT txid_current()")
            .execute(&pool)
            .await
            .expect("a later transaction");
        // An earlier transaction: visible at once, and the snapshot read for it, kept as
        // the stream keeps it, has the running one among its running ids.
        let mut kept = Snapshot::default();
        let committed_long_ago = xid - 1;
        timeout(
            Duration::from_secs(5),
            wait_until_visible(&pool, committed_long_ago, &mut kept),
        )
        .await
        .expect("an earlier transaction is visible at once")
        .expect("no error");
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { wait_until_visible(&pool, xid, &mut kept).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "still running: not visible");
        running.commit().await.expect("commit");
        timeout(Duration::from_secs(5), waiting)
            .await
            .expect("visible once committed")
            .expect("no panic")
            .expect("no error");
    }
}
