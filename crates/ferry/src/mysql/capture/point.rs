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
/// (DDL, and an `XA COMMIT` or `XA ROLLBACK`); `xa` when the group is an XA transaction's
/// PREPARE, whose changes are committed (or rolled back) later, or that later completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gtid {
    pub(crate) domain: u32,
    pub(crate) server: u32,
    pub(crate) sequence: u64,
    pub(crate) standalone: bool,
    pub(crate) xa: Option<XaGroup>,
}

/// What a GTID group does to an XA transaction (MariaDB 10.5+ binlogs its PREPARE and its
/// completion as two groups, each GTID event naming the XID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum XaGroup {
    /// The changes of `XA PREPARE`: not committed yet.
    Prepares(Xid),
    /// `XA COMMIT` or `XA ROLLBACK` (the query event says which) of a prepared transaction.
    Completes(Xid),
}

/// An XA transaction's id: format id, global transaction id and branch qualifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Xid {
    format: u32,
    gtrid: Vec<u8>,
    bqual: Vec<u8>,
}

impl fmt::Display for Xid {
    /// As the server writes it in `XA COMMIT X'…',X'…',<format>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        write!(
            f,
            "X'{}',X'{}',{}",
            hex(&self.gtrid),
            hex(&self.bqual),
            self.format
        )
    }
}

/// The event type of MariaDB's GTID event, which mysql_common does not decode.
pub(crate) const MARIADB_GTID_EVENT: u8 = 162;

/// `FL_STANDALONE` in a GTID event's flags.
const GTID_STANDALONE: u8 = 1;
/// `FL_GROUP_COMMIT_ID`: a commit id (8 bytes) follows the flags.
const GTID_GROUP_COMMIT_ID: u8 = 2;
/// `FL_PREPARED_XA`: the group is an XA PREPARE; its XID follows.
const GTID_PREPARED_XA: u8 = 64;
/// `FL_COMPLETED_XA`: the group is an XA COMMIT or XA ROLLBACK; its XID follows.
const GTID_COMPLETED_XA: u8 = 128;

impl Gtid {
    /// Reads the event's body (after the common header, without the checksum): sequence
    /// number (8 bytes), domain id (4), flags (1), the commit id (8) if flagged, the XID if
    /// flagged (format id (4), the lengths of gtrid (1) and bqual (1), then both), then what
    /// ferry does not need.
    pub(crate) fn read(server: u32, body: &[u8]) -> Result<Self, StoreError> {
        let short = || {
            StoreError::Other(
                format!("a MariaDB GTID event of {} bytes is too short", body.len()).into(),
            )
        };
        let bytes = |from: usize, len: usize| body.get(from..from + len).ok_or_else(short);
        let sequence = bytes(0, 8)?;
        let domain = bytes(8, 4)?;
        let flags = *body.get(12).ok_or_else(short)?;
        let mut at = 13;
        if flags & GTID_GROUP_COMMIT_ID != 0 {
            at += 8;
        }
        let xa = if flags & (GTID_PREPARED_XA | GTID_COMPLETED_XA) == 0 {
            None
        } else {
            let format = bytes(at, 4)?;
            let (gtrid_len, bqual_len) = (
                usize::from(bytes(at + 4, 1)?[0]),
                usize::from(bytes(at + 5, 1)?[0]),
            );
            let xid = Xid {
                format: u32::from_le_bytes(format.try_into().map_err(|_| short())?),
                gtrid: bytes(at + 6, gtrid_len)?.to_vec(),
                bqual: bytes(at + 6 + gtrid_len, bqual_len)?.to_vec(),
            };
            Some(if flags & GTID_PREPARED_XA != 0 {
                XaGroup::Prepares(xid)
            } else {
                XaGroup::Completes(xid)
            })
        };
        Ok(Self {
            domain: u32::from_le_bytes(domain.try_into().map_err(|_| short())?),
            server,
            sequence: u64::from_le_bytes(sequence.try_into().map_err(|_| short())?),
            standalone: flags & GTID_STANDALONE != 0,
            xa,
        })
    }

    /// Whether the group is an XA PREPARE, whose changes are not committed when read.
    pub(crate) fn prepares_xa(&self) -> bool {
        matches!(self.xa, Some(XaGroup::Prepares(_)))
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
}

/// Whether binlog place `(file, pos)` is at or before `other` (file names sort in log
/// order: a fixed-width counter after the base name).
pub(crate) fn not_after(place: (&str, u64), other: (&str, u64)) -> bool {
    place <= other
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
    }

    #[test]
    fn places_order_by_file_then_position() {
        let place = ("binlog.000002", 1234);
        assert!(not_after(place, ("binlog.000002", 1234)));
        assert!(not_after(place, ("binlog.000003", 4)));
        assert!(!not_after(place, ("binlog.000002", 1000)));
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
                standalone: true,
                xa: None,
            }
        );
        assert!(Gtid::read(1, &body[..10]).is_err());
    }

    /// The bodies of the GTID events MariaDB 10.11 wrote for `XA PREPARE 'g1','b1',7` and
    /// its `XA COMMIT` (read with `mysqlbinlog --raw`).
    #[test]
    fn an_xa_groups_gtid_event_names_its_xid() {
        let prepare = hex("0700000000000000000000004c0700000002026731623101ff");
        let commit = hex("0800000000000000000000008d07000000020267316231");
        let prepared = Gtid::read(3308, &prepare).expect("reads");
        let completed = Gtid::read(3308, &commit).expect("reads");
        let Some(XaGroup::Prepares(xid)) = &prepared.xa else {
            panic!("{prepared:?}");
        };
        assert_eq!(xid.to_string(), "X'6731',X'6231',7");
        assert!(prepared.prepares_xa() && !prepared.standalone);
        assert_eq!(completed.xa, Some(XaGroup::Completes(xid.clone())));
        assert!(completed.standalone && !completed.prepares_xa());
        assert_eq!(completed.sequence, 8);
        assert!(Gtid::read(3308, &commit[..commit.len() - 1]).is_err());
        let mut with_commit_id = prepare[..13].to_vec();
        with_commit_id[12] |= GTID_GROUP_COMMIT_ID;
        with_commit_id.extend_from_slice(&[9; 8]);
        with_commit_id.extend_from_slice(&prepare[13..]);
        assert_eq!(
            Gtid::read(3308, &with_commit_id).expect("reads").xa,
            prepared.xa
        );
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }
}
