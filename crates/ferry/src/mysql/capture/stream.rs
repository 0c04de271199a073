//! [`MyLogStream`]: MariaDB's binlog events, as a replica with GTID capability receives
//! them, grouped into committed transactions of outbox inserts.
//!
//! A transaction starts at its GTID event and ends at its XID event (InnoDB) or its
//! `COMMIT` query (other engines), or after its one statement when the GTID says it stands
//! alone (DDL). The binlog holds committed transactions only, in commit order, so a
//! rolled-back one never appears. Between start and end, the write-rows events of the
//! outbox table become messages; updates and deletes (the relay's marks) are skipped.
//!
//! A transaction is written to the binlog whole at its commit (the binlog write is the
//! commit point: crash recovery commits what the binlog holds), so its messages are
//! committed data as soon as they are read, and the stream hands them out in pieces as
//! they come, without holding the transaction whole.
//!
//! XA transactions are the exception. MariaDB (10.5+) binlogs an `XA PREPARE` as a group
//! of its own (GTID event flagged `FL_PREPARED_XA` and naming the XID, the rows events,
//! `XA END`, an `XA_PREPARE_LOG_EVENT`), and its `XA COMMIT` or `XA ROLLBACK` later, maybe
//! after other transactions, as a second group (GTID flagged `FL_COMPLETED_XA` with the same
//! XID, standalone, one query event). `XA COMMIT … ONE PHASE` is an ordinary transaction.
//! The prepared changes are not committed when read, so the stream keeps a prepared group's
//! messages (in [`Prepared`], by XID) and hands them out as one transaction at its
//! `XA COMMIT`, in commit order, with the commit's `maybe_published` (the commit group is
//! binlogged before InnoDB commits, like any transaction, so the drain could have seen the
//! rows only if it ends before the drain's binlog end); an `XA ROLLBACK` drops them.
//!
//! While such a group is held, no end the stream hands out goes past the point before its
//! PREPARE ([`MyLogStream::handed_end`]): the relay confirms the ends it is given, and a
//! stream restarted from a point past the PREPARE would never read its rows again, so they
//! would stay in the outbox, published at best by some later drain, after later versions of
//! their aggregates (a reorder the inbox turns into a loss). Transactions committed after
//! the PREPARE are therefore read again by the next stream if the relay restarts before the
//! XA completes; the relay publishes those that ended before its drain only if the store
//! still holds them unpublished, as after any restart. The cost: the server keeps its binlog
//! from the oldest held PREPARE on, and the held messages are in memory until the XA
//! completes.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use mysql_async::BinlogStream;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event, EventData, RowsEventData};
use sqlx::MySqlConnection;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use ferry_core::{CaptureLag, CapturedPiece, LogPosition, LogStream, Message, StoreError};

use super::columns::BinlogColumns;
use super::point::{BinlogPoint, Gtid, MARIADB_GTID_EVENT, XaGroup, Xid, not_after};
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
    /// It ends before the drain's binlog end: known at its GTID event, since transactions
    /// are written whole, one after the other, and the binlog end the drain reads is
    /// between two of them.
    maybe_published: bool,
    /// Its messages not yet handed out.
    messages: Vec<Message>,
    /// Whether pieces of it were handed out: it then ends with a last piece, even empty.
    pieces_handed_out: bool,
    /// Where the stream stood before it, if it is an XA PREPARE.
    before: Option<BinlogPoint>,
}

/// An XA transaction prepared with outbox inserts, waiting for its `XA COMMIT` or
/// `XA ROLLBACK`.
struct Prepared {
    xid: Xid,
    /// Where the stream stood before its PREPARE: a stream restarted there reads it again.
    before: BinlogPoint,
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
    /// XA transactions prepared with outbox inserts and not completed yet, in PREPARE order.
    prepared: Vec<Prepared>,
    /// The most messages a piece holds.
    max_messages: usize,
    /// Pieces read and not yet handed out.
    ready: VecDeque<CapturedPiece>,
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
    /// A stream that has read nothing past `confirmed`, holding the lock on `control`,
    /// handing transactions out in pieces of at most `max_messages`.
    pub(crate) fn new(
        capture: Capture,
        control: MySqlConnection,
        binlog: BinlogStream,
        confirmed: BinlogPoint,
        checksummed: bool,
        max_messages: usize,
    ) -> Self {
        Self {
            capture,
            control,
            binlog,
            read: confirmed.clone(),
            file: confirmed.file.clone(),
            confirmed,
            open: None,
            prepared: Vec::new(),
            max_messages,
            ready: VecDeque::new(),
            checksummed,
            format_known: false,
            drained_at: None,
            skipped: false,
            last_report: Instant::now(),
            last_lock_check: Instant::now(),
        }
    }

    /// Reads events until a piece is ready, or `deadline`.
    async fn read_piece(&mut self, deadline: Instant) -> Result<Option<CapturedPiece>, StoreError> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Ok(Some(piece));
            }
            let event = match timeout_at(deadline, self.binlog.next()).await {
                Err(_) => return Ok(self.report_skipped()),
                Ok(None) => {
                    return Err(StoreError::Unavailable(
                        "the server ended the binlog stream".into(),
                    ));
                }
                Ok(Some(event)) => event.map_err(|err| binlog_error(err, &self.capture))?,
            };
            self.apply(&event)?;
        }
    }

    /// Takes one event in; the pieces it completes go to `ready`.
    fn apply(&mut self, event: &Event) -> Result<(), StoreError> {
        let header = event.header();
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            let gtid = Gtid::read(header.server_id(), event.data())?;
            let gtid_event_end = u64::from(header.log_pos());
            self.open = Some(Open {
                before: gtid.prepares_xa().then(|| self.read.clone()),
                gtid,
                maybe_published: self.drained_at.as_ref().is_none_or(|(file, pos)| {
                    not_after((self.file.as_str(), gtid_event_end), (file.as_str(), *pos))
                }),
                messages: Vec::new(),
                pieces_handed_out: false,
            });
            return Ok(());
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
            // A commit (InnoDB), or the end of an XA PREPARE group, whose messages
            // `end_transaction` holds.
            Some(EventData::XidEvent(_) | EventData::XaPrepareLogEvent(_)) => true,
            Some(EventData::QueryEvent(query)) => {
                let text = query.query();
                let standalone = self.open.as_ref().is_some_and(|open| open.gtid.standalone);
                let completes = match self.open.as_ref().map(|open| &open.gtid.xa) {
                    Some(Some(XaGroup::Completes(xid))) => Some(xid.clone()),
                    _ => None,
                };
                if let Some(xid) = completes {
                    let committed = self.complete_xa(&xid, &text);
                    if let Some(open) = self.open.as_mut() {
                        open.messages = committed;
                    }
                    true
                } else if text.eq_ignore_ascii_case("ROLLBACK") {
                    // Non-transactional changes rolled back around: nothing of the outbox
                    // (InnoDB) is in it, so no piece of it was handed out, but the GTID is
                    // spent.
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
                self.cut_full_pieces();
                false
            }
            _ => {
                if header.event_type_raw() == EventType::HEARTBEAT_EVENT as u8 {
                    debug!(file = %self.file, pos = header.log_pos(), "binlog heartbeat");
                }
                false
            }
        };
        if ends {
            self.end_transaction(header.log_pos(), header.timestamp());
        }
        Ok(())
    }

    /// The open transaction ended at binlog position `pos`, committed at `timestamp`: its
    /// last piece goes to `ready`, or, for an XA PREPARE with outbox inserts, its messages
    /// wait in `prepared`.
    fn end_transaction(&mut self, pos: u32, timestamp: u32) {
        self.cut_full_pieces();
        let Some(open) = self.open.take() else {
            return;
        };
        let gtid = &open.gtid;
        self.read
            .gtid
            .advance(gtid.domain, gtid.server, gtid.sequence);
        self.read.file.clone_from(&self.file);
        self.read.pos = u64::from(pos);
        self.read.committed = i64::from(timestamp);
        if let (Some(XaGroup::Prepares(xid)), Some(before)) = (&open.gtid.xa, open.before)
            && !open.messages.is_empty()
        {
            debug!(%xid, messages = open.messages.len(), "binlog: XA PREPARE held until its XA COMMIT");
            self.prepared.push(Prepared {
                xid: xid.clone(),
                before,
                messages: open.messages,
            });
            return;
        }
        if open.messages.is_empty() && !open.pieces_handed_out {
            self.skipped = true;
            if self.last_report.elapsed() >= SKIPPED_REPORT_EVERY
                && let Some(report) = self.report_skipped()
            {
                self.ready.push_back(report);
            }
            return;
        }
        self.skipped = false;
        self.last_report = Instant::now();
        self.ready.push_back(CapturedPiece {
            end: Some(self.handed_end()),
            messages: open.messages,
            maybe_published: open.maybe_published,
        });
    }

    /// The messages an `XA COMMIT` (`query`) of `xid` commits: those its PREPARE left
    /// waiting. An `XA ROLLBACK` drops them and commits none.
    fn complete_xa(&mut self, xid: &Xid, query: &str) -> Vec<Message> {
        let Some(index) = self.prepared.iter().position(|held| held.xid == *xid) else {
            // Its PREPARE had no outbox insert (or lies before this stream's start, which
            // `handed_end` prevents once the PREPARE was read).
            return Vec::new();
        };
        let held = self.prepared.remove(index);
        let words: Vec<&str> = query.split_ascii_whitespace().take(2).collect();
        if words.len() == 2
            && words[0].eq_ignore_ascii_case("XA")
            && words[1].eq_ignore_ascii_case("COMMIT")
        {
            debug!(%xid, messages = held.messages.len(), "binlog: XA COMMIT hands out what its PREPARE held");
            held.messages
        } else {
            debug!(%xid, messages = held.messages.len(), "binlog: XA ROLLBACK drops what its PREPARE held");
            Vec::new()
        }
    }

    /// The end to hand out for what was read so far: where the last transaction ended, or,
    /// while XA transactions with outbox inserts are prepared and not completed, the point
    /// before the oldest one's PREPARE. The relay confirms the ends it is given, and the
    /// next stream starts after the confirmed one: past a PREPARE, it would never read the
    /// prepared messages, which the binlog does not repeat at their `XA COMMIT`.
    fn handed_end(&self) -> LogPosition {
        self.prepared
            .first()
            .map_or(&self.read, |oldest| &oldest.before)
            .position()
    }

    /// Moves the open transaction's full pieces to `ready`, unless its changes are not
    /// committed yet (an XA PREPARE). A rows event may carry several rows, so the last
    /// piece may be a full one too.
    fn cut_full_pieces(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if open.gtid.prepares_xa() {
            return;
        }
        while open.messages.len() >= self.max_messages {
            let rest = open.messages.split_off(self.max_messages);
            self.ready.push_back(CapturedPiece {
                end: None,
                messages: std::mem::replace(&mut open.messages, rest),
                maybe_published: open.maybe_published,
            });
            open.pieces_handed_out = true;
        }
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
    fn report_skipped(&mut self) -> Option<CapturedPiece> {
        if !self.skipped || self.open.is_some() {
            return None;
        }
        self.skipped = false;
        self.last_report = Instant::now();
        Some(CapturedPiece {
            end: Some(self.handed_end()),
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
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedPiece>, StoreError> {
        self.check_lock().await?;
        self.read_piece(Instant::now() + idle).await
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
