//! [`MyLogStream`]: MariaDB's binlog events, as a replica with GTID capability receives
//! them, grouped into committed transactions of outbox inserts.
//!
//! A transaction starts at its GTID event and ends at its XID event (InnoDB) or its
//! `COMMIT` query (other engines), or after its one statement when the GTID says it stands
//! alone (DDL). The binlog holds committed transactions only, in commit order, so a
//! rolled-back one never appears. Between start and end, the write-rows events of the
//! outbox table become messages; updates and deletes (the relay's marks) are skipped.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use mysql_async::BinlogStream;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event, EventData, RowsEventData};
use sqlx::MySqlConnection;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use ferry_core::{CaptureLag, CapturedTransaction, LogPosition, LogStream, Message, StoreError};

use super::columns::BinlogColumns;
use super::point::{BinlogPoint, Gtid, MARIADB_GTID_EVENT};
use super::{Capture, binlog_error};
use crate::sql::row;

/// How often, at most, the stream reports the position of transactions that did not touch
/// the outbox (as a transaction without messages, which the relay confirms), so that a
/// quiet outbox in a busy database does not hold the binlog back.
const SKIPPED_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How often, at most, the stream checks that its control connection still holds the
/// capture lock: once it does not, another relay may stream, and this one must stop.
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A transaction being read.
struct Open {
    gtid: Gtid,
    messages: Vec<Message>,
}

/// An open binlog stream, holding the capture lock on its control connection.
pub(crate) struct MyLogStream {
    capture: Capture,
    control: MySqlConnection,
    binlog: BinlogStream,
    /// Where the last transaction read ended (the GTID state includes it).
    read: BinlogPoint,
    /// The last confirmed point.
    confirmed: BinlogPoint,
    /// The binlog file the events come from (rotate events say).
    file: String,
    open: Option<Open>,
    /// The server's binlog events carry a CRC32 that mysql_common cannot strip from the
    /// rotate event it receives before the first format description event.
    checksummed: bool,
    format_known: bool,
    /// The server's binlog end when the relay's drain finished: transactions ending at or
    /// before it may have been published by the drain.
    drained_at: Option<(String, u64)>,
    /// Transactions without outbox inserts read since the last report, and when it was.
    skipped: bool,
    last_report: Instant,
    last_lock_check: Instant,
}

impl MyLogStream {
    /// A stream that has read nothing past `confirmed`, holding the lock on `control`.
    pub(crate) fn new(
        capture: Capture,
        control: MySqlConnection,
        binlog: BinlogStream,
        confirmed: BinlogPoint,
        checksummed: bool,
    ) -> Self {
        Self {
            capture,
            control,
            binlog,
            read: confirmed.clone(),
            file: confirmed.file.clone(),
            confirmed,
            open: None,
            checksummed,
            format_known: false,
            drained_at: None,
            skipped: false,
            last_report: Instant::now(),
            last_lock_check: Instant::now(),
        }
    }

    /// Reads events until a transaction to report ends, or `deadline`.
    async fn read_transaction(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<CapturedTransaction>, StoreError> {
        loop {
            let event = match timeout_at(deadline, self.binlog.next()).await {
                Err(_) => return Ok(self.report_skipped()),
                Ok(None) => {
                    return Err(StoreError::Unavailable(
                        "the server ended the binlog stream".into(),
                    ));
                }
                Ok(Some(event)) => event.map_err(|err| binlog_error(err, &self.capture))?,
            };
            if let Some(done) = self.apply(&event)? {
                return Ok(Some(done));
            }
        }
    }

    /// Takes one event in; returns the transaction it ended, if that is to be reported.
    fn apply(&mut self, event: &Event) -> Result<Option<CapturedTransaction>, StoreError> {
        let header = event.header();
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            let gtid = Gtid::read(header.server_id(), event.data())?;
            self.open = Some(Open {
                gtid,
                messages: Vec::new(),
            });
            return Ok(None);
        }
        let data = event
            .read_data()
            .map_err(|err| StoreError::Other(format!("undecodable binlog event: {err}").into()))?;
        let ends = match data {
            Some(EventData::RotateEvent(rotate)) => {
                let mut name = rotate.name_raw();
                if self.checksummed && !self.format_known {
                    name = &name[..name.len().saturating_sub(4)];
                }
                self.file = String::from_utf8_lossy(name).into_owned();
                false
            }
            Some(EventData::FormatDescriptionEvent(_)) => {
                self.format_known = true;
                false
            }
            Some(EventData::XidEvent(_)) => true,
            Some(EventData::QueryEvent(query)) => {
                let text = query.query();
                let standalone = self.open.as_ref().is_some_and(|open| open.gtid.standalone);
                if text.eq_ignore_ascii_case("ROLLBACK") {
                    // Non-transactional changes rolled back around: nothing of the outbox
                    // (InnoDB) is in it, but the GTID is spent.
                    if let Some(open) = self.open.as_mut() {
                        open.messages.clear();
                    }
                    true
                } else {
                    standalone || text.eq_ignore_ascii_case("COMMIT")
                }
            }
            Some(EventData::RowsEvent(rows)) => {
                self.read_rows(&rows)?;
                false
            }
            _ => {
                if header.event_type_raw() == EventType::HEARTBEAT_EVENT as u8 {
                    debug!(file = %self.file, pos = header.log_pos(), "binlog heartbeat");
                }
                false
            }
        };
        if !ends {
            return Ok(None);
        }
        let Some(open) = self.open.take() else {
            return Ok(None);
        };
        let gtid = open.gtid;
        self.read
            .gtid
            .advance(gtid.domain, gtid.server, gtid.sequence);
        self.read.file.clone_from(&self.file);
        self.read.pos = u64::from(header.log_pos());
        self.read.committed = i64::from(header.timestamp());
        if open.messages.is_empty() {
            self.skipped = true;
            if self.last_report.elapsed() < SKIPPED_REPORT_EVERY {
                return Ok(None);
            }
            return Ok(self.report_skipped());
        }
        self.skipped = false;
        self.last_report = Instant::now();
        let maybe_published = self
            .drained_at
            .as_ref()
            .is_none_or(|(file, pos)| self.read.not_after(file, *pos));
        Ok(Some(CapturedTransaction {
            end: self.read.position(),
            messages: open.messages,
            maybe_published,
        }))
    }

    /// The outbox inserts of a rows event; other tables' and other kinds are skipped.
    fn read_rows(&mut self, rows: &RowsEventData<'_>) -> Result<(), StoreError> {
        let (RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_)) = rows else {
            return Ok(());
        };
        let Some(table) = self.binlog.get_tme(rows.table_id()) else {
            return Err(StoreError::Other(
                format!(
                    "a binlog rows event of table id {} came without its table map",
                    rows.table_id()
                )
                .into(),
            ));
        };
        if !self
            .capture
            .is_outbox(&table.database_name(), &table.table_name())
        {
            return Ok(());
        }
        let Some(open) = self.open.as_mut() else {
            return Err(StoreError::Other(
                "an outbox insert in the binlog outside a transaction".into(),
            ));
        };
        for image in rows.rows(table) {
            let (_, after) = image.map_err(|err| {
                StoreError::Other(format!("undecodable outbox row in the binlog: {err}").into())
            })?;
            let Some(after) = after else { continue };
            let message = row::message(&BinlogColumns(&after)).map_err(|err| {
                StoreError::Other(format!("outbox row in the binlog: {err}").into())
            })?;
            open.messages.push(message);
        }
        Ok(())
    }

    /// The position past the transactions that did not touch the outbox, as a transaction
    /// without messages, if there were any since the last report.
    fn report_skipped(&mut self) -> Option<CapturedTransaction> {
        if !self.skipped || self.open.is_some() {
            return None;
        }
        self.skipped = false;
        self.last_report = Instant::now();
        Some(CapturedTransaction {
            end: self.read.position(),
            messages: Vec::new(),
            maybe_published: false,
        })
    }

    async fn check_lock(&mut self) -> Result<(), StoreError> {
        if self.last_lock_check.elapsed() < LOCK_CHECK_EVERY {
            return Ok(());
        }
        self.capture.check_lock(&mut self.control).await?;
        self.last_lock_check = Instant::now();
        Ok(())
    }
}

#[async_trait]
impl LogStream for MyLogStream {
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedTransaction>, StoreError> {
        self.check_lock().await?;
        self.read_transaction(Instant::now() + idle).await
    }

    async fn mark_drained(&mut self) -> Result<(), StoreError> {
        self.drained_at = Some(self.capture.binlog_end(&mut self.control).await?);
        Ok(())
    }

    async fn confirm(&mut self, end: &LogPosition) -> Result<(), StoreError> {
        let point = BinlogPoint::parse(end)?;
        self.capture.confirm(&mut self.control, &point).await?;
        self.confirmed = point;
        Ok(())
    }

    async fn lag(&mut self) -> Result<CaptureLag, StoreError> {
        self.capture
            .lag_of(&mut self.control, &self.confirmed)
            .await
    }
}
