//! The log capture contract: a second way to feed the relay, reading committed outbox
//! inserts from the database's log (PostgreSQL logical replication, the MySQL/MariaDB
//! binlog) instead of polling the outbox table.
//!
//! The relay ([`crate::relay`], `capture` mode "log") owns the log exclusively (a
//! replication slot, a lock), holds the leases of every partition so that its marks are
//! fenced as in poll mode, drains what the table holds by the poll path, then publishes
//! each captured transaction's messages per partition in log order, piece by piece as the
//! stream hands them out, and marks them by id. Only once every piece of a transaction is
//! acknowledged and marked does it [`confirm`](LogStream::confirm) the transaction's end,
//! so the database keeps the log of everything not yet acknowledged by the broker and
//! marked.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::message::Message;

/// Where a committed transaction ends in the database's log (PostgreSQL LSN, MySQL GTID
/// set or binlog file:position): opaque to the core, which only hands back positions the
/// stream gave it, in the order it gave them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogPosition(pub String);

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A piece of one committed transaction's outbox inserts, in insert order: at most the
/// `max_messages` the stream was opened with, so that neither the stream nor the relay
/// ever holds a whole large transaction. A transaction comes as one or more pieces in a
/// row, the last one carrying its [`end`](Self::end); a transaction without inserts (a
/// heartbeat, or one that touched the outbox with no insert) is one empty last piece,
/// whose end the relay confirms like any other so that an idle outbox does not pin the
/// log. Streams hand out committed transactions only, so every piece is committed data.
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedPiece {
    /// Where the transaction ends in the log, on its last piece; `None` on the pieces
    /// before, whose transaction the relay may confirm only once the last one came. It is
    /// where the next stream starts once confirmed, so a stream may hand out an earlier
    /// point, the same for several transactions, when starting after the transaction's own
    /// end would skip something it has read but not handed out yet (MariaDB: an XA
    /// transaction prepared and not committed). The transactions a restarted stream then
    /// reads again ended before its drain: they come `maybe_published`, and only what the
    /// store still holds unpublished of them is published.
    pub end: Option<LogPosition>,
    pub messages: Vec<Message>,
    /// The transaction ended before [`LogStream::mark_drained`] was called (the same for
    /// each of its pieces): its messages may already be published and marked (by the
    /// drain, or by a relay before a crash), so the relay publishes only those the store
    /// still holds unpublished ([`crate::OutboxStore::unpublished`]). The stream hands
    /// such a piece out only once that check can see its rows (a database may stream a
    /// commit before it makes the rows visible to other sessions), so no unpublished row
    /// is taken for a published one.
    pub maybe_published: bool,
}

/// How far a stream is behind the database's log, where the source can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CaptureLag {
    /// Log bytes the database keeps for the stream past its confirmed position.
    pub bytes: Option<u64>,
    /// Seconds since the last confirmed transaction committed (0 when caught up).
    pub seconds: Option<f64>,
}

/// A database log the relay can stream the outbox from.
///
/// Contract: at most one stream is open at a time across every relay sharing the outbox
/// (the database enforces it: an active replication slot, a held lock); `start` fails with
/// [`StoreError::HeldElsewhere`] while another holds it, and the relay then waits as a
/// standby and tries again.
#[async_trait]
pub trait LogCapture: Send + Sync + 'static {
    /// Opens the stream after the last confirmed position, handing transactions out in
    /// pieces of at most `max_messages` (at least 1) messages.
    async fn start(&self, max_messages: usize) -> Result<Box<dyn LogStream>, StoreError>;

    /// How far the log's confirmed position is behind the database's, without streaming
    /// (for `ferry status` and a standby's metrics).
    async fn lag(&self) -> Result<CaptureLag, StoreError>;
}

/// An open stream of committed transactions touching the outbox, in pieces. Dropping it
/// gives the log up (the slot or lock is released), unconfirmed transactions are sent
/// again, whole, to the next stream.
///
/// Contract: the stream keeps its connection alive between calls (keepalives, heartbeats)
/// however long the relay takes to call `next` again; unread pieces wait in a bounded
/// buffer, so a relay that stops reading backpressures the database's sender, never
/// buffers without bound. It never acknowledges a position by itself.
#[async_trait]
pub trait LogStream: Send {
    /// The next piece of the committed transactions touching the outbox (or heartbeats), in
    /// commit order; `Ok(None)` when nothing came within `idle`, so the relay can check its
    /// leases and stop. An error ends the stream: the relay drops it and starts another.
    async fn next(&mut self, idle: Duration) -> Result<Option<CapturedPiece>, StoreError>;

    /// Called once the relay has published what the outbox table held (the drain): every
    /// transaction that ended before this call is flagged
    /// [`maybe_published`](CapturedPiece::maybe_published), later ones are not.
    async fn mark_drained(&mut self) -> Result<(), StoreError>;

    /// Every transaction up to and including `end` is acknowledged by the broker and
    /// marked: the database may drop that log. Never called automatically by the source.
    async fn confirm(&mut self, end: &LogPosition) -> Result<(), StoreError>;

    /// How far the stream is behind the database's log.
    async fn lag(&mut self) -> Result<CaptureLag, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_prints_as_the_database_wrote_it() {
        assert_eq!(LogPosition("0/16B3748".into()).to_string(), "0/16B3748");
    }
}
