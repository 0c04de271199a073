//! Points in MariaDB's binlog: the GTID state a replica connects with, and the binlog file
//! and position of the same point (for the lag in bytes).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ferry_core::{LogPosition, StoreError};

/// MariaDB's GTID state: per replication domain, the last transaction's server id and
/// sequence number. Printed as `domain-server-sequence,…`, the form of `@@gtid_binlog_pos`
/// and `@slave_connect_state`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GtidState(BTreeMap<u32, (u32, u64)>);

impl GtidState {
    /// Records that transaction `domain-server-sequence` committed.
    pub(crate) fn advance(&mut self, domain: u32, server: u32, sequence: u64) {
        self.0.insert(domain, (server, sequence));
    }
}

impl fmt::Display for GtidState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (domain, (server, sequence)) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{domain}-{server}-{sequence}")?;
        }
        Ok(())
    }
}

impl FromStr for GtidState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut state = Self::default();
        for gtid in text.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            let bad = || format!("{gtid:?} is not a MariaDB GTID (domain-server-sequence)");
            let mut parts = gtid.split('-');
            let (Some(domain), Some(server), Some(sequence), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            state.advance(
                domain.parse().map_err(|_| bad())?,
                server.parse().map_err(|_| bad())?,
                sequence.parse().map_err(|_| bad())?,
            );
        }
        Ok(state)
    }
}

/// A MariaDB GTID event (type 162): the transaction that follows is
/// `domain-server-sequence`; `standalone` when it is one statement without BEGIN/COMMIT
/// (DDL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gtid {
    pub(crate) domain: u32,
    pub(crate) server: u32,
    pub(crate) sequence: u64,
    pub(crate) standalone: bool,
}

/// The event type of MariaDB's GTID event, which mysql_common does not decode.
pub(crate) const MARIADB_GTID_EVENT: u8 = 162;

/// `FL_STANDALONE` in a GTID event's flags.
const GTID_STANDALONE: u8 = 1;

impl Gtid {
    /// Reads the event's body (after the common header, without the checksum): sequence
    /// number (8 bytes), domain id (4), flags (1), then what ferry does not need.
    pub(crate) fn read(server: u32, body: &[u8]) -> Result<Self, StoreError> {
        let short = || {
            StoreError::Other(
                format!("a MariaDB GTID event of {} bytes is too short", body.len()).into(),
            )
        };
        let sequence = body.get(0..8).ok_or_else(short)?;
        let domain = body.get(8..12).ok_or_else(short)?;
        let flags = *body.get(12).ok_or_else(short)?;
        Ok(Self {
            domain: u32::from_le_bytes(domain.try_into().map_err(|_| short())?),
            server,
            sequence: u64::from_le_bytes(sequence.try_into().map_err(|_| short())?),
            standalone: flags & GTID_STANDALONE != 0,
        })
    }
}

/// Where a transaction ends: the GTID state after it, the binlog file and the position
/// just past its last event there, and its commit time (unix seconds, the server's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BinlogPoint {
    pub(crate) gtid: GtidState,
    pub(crate) file: String,
    pub(crate) pos: u64,
    pub(crate) committed: i64,
}

impl BinlogPoint {
    /// The point as the relay carries it: `<gtid state> <file>:<pos> @<commit time>`, which
    /// reads as what it is in logs.
    pub(crate) fn position(&self) -> LogPosition {
        LogPosition(format!(
            "{} {}:{} @{}",
            self.gtid, self.file, self.pos, self.committed
        ))
    }

    /// Reads back a [`Self::position`].
    pub(crate) fn parse(position: &LogPosition) -> Result<Self, StoreError> {
        let bad = || {
            StoreError::Other(
                format!(
                    "log position {:?} is not a MariaDB binlog point (`<gtid state> <file>:<pos> @<time>`)",
                    position.0
                )
                .into(),
            )
        };
        let (rest, committed) = position.0.rsplit_once(" @").ok_or_else(bad)?;
        let (gtid, file_pos) = rest.rsplit_once(' ').unwrap_or(("", rest));
        let (file, pos) = file_pos.rsplit_once(':').ok_or_else(bad)?;
        Ok(Self {
            gtid: gtid.parse().map_err(|_| bad())?,
            file: file.to_owned(),
            pos: pos.parse().map_err(|_| bad())?,
            committed: committed.parse().map_err(|_| bad())?,
        })
    }

    /// Whether this point is at or before `(file, pos)` in the binlog (file names sort in
    /// log order: a fixed-width counter after the base name).
    pub(crate) fn not_after(&self, file: &str, pos: u64) -> bool {
        (self.file.as_str(), self.pos) <= (file, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_states_print_as_mariadb_reads_them() {
        let state: GtidState = "1-7-3, 0-3308-42".parse().expect("valid state");
        assert_eq!(state.to_string(), "0-3308-42,1-7-3");
        assert_eq!("".parse::<GtidState>(), Ok(GtidState::default()));
        for bad in ["0-1", "0-1-2-3", "a-1-2", "0-1-x"] {
            assert!(bad.parse::<GtidState>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_point_reads_back_as_written() {
        let mut gtid = GtidState::default();
        gtid.advance(0, 3308, 42);
        let point = BinlogPoint {
            gtid,
            file: "binlog.000002".into(),
            pos: 1234,
            committed: 1_700_000_000,
        };
        let position = point.position();
        assert_eq!(position.0, "0-3308-42 binlog.000002:1234 @1700000000");
        assert_eq!(BinlogPoint::parse(&position).expect("parses"), point);
        let empty = BinlogPoint {
            gtid: GtidState::default(),
            ..point
        };
        assert_eq!(
            BinlogPoint::parse(&empty.position()).expect("parses"),
            empty
        );
        assert!(BinlogPoint::parse(&LogPosition("0/16B3748".into())).is_err());
        assert!(empty.not_after("binlog.000002", 1234));
        assert!(empty.not_after("binlog.000003", 4));
        assert!(!empty.not_after("binlog.000002", 1000));
    }

    #[test]
    fn a_gtid_event_gives_domain_sequence_and_standalone() {
        let mut body = 42u64.to_le_bytes().to_vec();
        body.extend_from_slice(&7u32.to_le_bytes());
        body.push(GTID_STANDALONE);
        body.extend_from_slice(&[0; 6]);
        let gtid = Gtid::read(3308, &body).expect("reads");
        assert_eq!(
            gtid,
            Gtid {
                domain: 7,
                server: 3308,
                sequence: 42,
                standalone: true
            }
        );
        assert!(Gtid::read(1, &body[..10]).is_err());
    }
}
