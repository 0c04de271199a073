//! [`PgLogStream`]: one replication session on the outbox's slot.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationEvent};
use sqlx::PgPool;
use tokio::time::{Instant, sleep, timeout_at};

use ferry_core::{CaptureLag, CapturedTransaction, LogPosition, LogStream, Message, StoreError};

use super::pgoutput::{Decoded, Decoder};
use super::{
    HEARTBEAT_PREFIX, current_wal_insert_lsn, replication_error, slot_lag_bytes, unavailable,
};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// An open replication stream of the outbox's inserts, transaction by transaction.
pub(super) struct PgLogStream {
    pub(super) client: ReplicationClient,
    pub(super) decoder: Decoder,
    pub(super) pool: PgPool,
    pub(super) slot: String,
    pub(super) heartbeat_interval: Duration,
    pub(super) last_heartbeat: Instant,
    /// The inserts of the transaction being received, once its Begin came.
    pub(super) open: Vec<Message>,
    /// The id of the transaction being received.
    pub(super) open_xid: u32,
    /// Where the log ended when the relay said it drained the table.
    pub(super) drained_at: Option<Lsn>,
    /// The transactions handed out and not yet confirmed: end and commit time (µs since
    /// 2000-01-01), for the lag in seconds.
    pub(super) unconfirmed: VecDeque<(Lsn, i64)>,
}

impl PgLogStream {
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
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedTransaction>, StoreError> {
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
                Some(ReplicationEvent::Begin { xid, .. }) => {
                    self.open.clear();
                    self.open_xid = xid;
                }
                Some(ReplicationEvent::XLogData { data, .. }) => {
                    match self
                        .decoder
                        .decode(&data)
                        .map_err(|err| StoreError::Other(Box::new(err)))?
                    {
                        Decoded::Insert(message) => self.open.push(*message),
                        Decoded::Other => {}
                    }
                }
                Some(ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                }) => {
                    let maybe_published = self.drained_at.is_none_or(|drained| end_lsn <= drained);
                    if maybe_published && !self.open.is_empty() {
                        wait_until_visible(&self.pool, self.open_xid).await?;
                    }
                    self.unconfirmed.push_back((end_lsn, commit_time_micros));
                    return Ok(Some(CapturedTransaction {
                        end: LogPosition(end_lsn.to_string()),
                        messages: std::mem::take(&mut self.open),
                        maybe_published,
                    }));
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

/// Waits until transaction `xid` is visible to new snapshots. Its commit is streamed once
/// the commit record is flushed, which is before the committing session leaves the
/// server's list of running transactions; the relay checks a maybe-published
/// transaction's rows against the table at once, and must not take rows it cannot see yet
/// for published ones.
pub(super) async fn wait_until_visible(pool: &PgPool, xid: u32) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(1);
    loop {
        let visible: bool = sqlx::query_scalar(include_str!("visible.sql"))
            .bind(i64::from(xid))
            .fetch_one(pool)
            .await
            .map_err(unavailable)?;
        if visible {
            return Ok(());
        }
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
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

    use super::wait_until_visible;

    #[tokio::test]
    async fn a_transaction_is_awaited_until_it_completes() {
        let pool = PgPool::connect(&postgres_url()).await.expect("PostgreSQL");
        let mut running = pool.begin().await.expect("a transaction");
        let xid: i64 = sqlx::query_scalar("SELECT (txid_current() % 4294967296)::bigint")
            .fetch_one(&mut *running)
            .await
            .expect("its id");
        let xid = u32::try_from(xid).expect("32 bits");
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { wait_until_visible(&pool, xid).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "still running: not visible");
        running.commit().await.expect("commit");
        timeout(Duration::from_secs(5), waiting)
            .await
            .expect("visible once committed")
            .expect("no panic")
            .expect("no error");
        let committed_long_ago = xid - 1;
        timeout(
            Duration::from_secs(5),
            wait_until_visible(&pool, committed_long_ago),
        )
        .await
        .expect("an earlier transaction is visible at once")
        .expect("no error");
    }
}
