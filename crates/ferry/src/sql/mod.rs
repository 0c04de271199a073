//! The SQL stores as one family: outbox, leases, inbox, status, purge and migrations
//! written once, generic over a [`Dialect`] that supplies what differs (the statements, in
//! `.sql` files under each dialect's `queries/`, the placeholder syntax, how a write
//! transaction starts, what error codes mean). PostgreSQL ([`crate::postgres`]), MySQL /
//! MariaDB ([`crate::mysql`]) and SQLite ([`crate::sqlite`]) each are a dialect folder of
//! the same shape: `mod.rs` (the dialect), `queries/`, `migrations/`.
//!
//! - `driver`: the sqlx capabilities the generic code uses, proven once.
//! - `statement`: rendering `$n` statements for a dialect and binding their arguments.
//! - `dialect`: the [`Dialect`] trait and the [`Queries`] every dialect provides.
//! - `outbox`: [`SqlOutbox`] (connect, migrate, enqueue, requeue) and its statements.
//! - `store`, `lease`: its [`OutboxStore`](ferry_core::OutboxStore) and
//!   [`LeaseStore`](ferry_core::LeaseStore) implementations.
//! - `inbox`: [`SqlInbox`], the consumer inbox.
//! - `migrate`: versioned schemas in `<prefix>meta`, for ferry's tables and others'.
//! - `row`, `error`: rows as the core's types; driver errors as [`StoreError`]s.
//! - `wake`: [`Wake`], notified or polling, and the notify trigger `migrate` keeps in line.

mod admin;
mod dialect;
mod driver;
mod error;
mod inbox;
mod lease;
mod migrate;
mod outbox;
pub(crate) mod row;
mod statement;
#[cfg(test)]
pub(crate) mod statement_arity;
mod store;
mod wake;

use std::time::Duration;

use ferry_core::StoreError;

pub(crate) use dialect::queries;
pub use dialect::{ConnectOptions, Dialect, Enqueue, Fault, InboxQueries, Queries, QueryResult};
pub use driver::{Bind, Driver, Exec, Get, RowExt, SqlQuery};
pub use error::store_error;
pub use inbox::SqlInbox;
pub use migrate::Schema;
pub use outbox::{Connection, SqlOutbox};
pub use statement::{Arg, IdListStatement, Placeholders, Statement};
pub use wake::{NotifyTrigger, Wake};

/// A validated table-name prefix (`ferry_` by default): every ferry table is
/// `<prefix><name>`, so several outboxes can share one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePrefix(String);

/// Longest prefix accepted, leaving room for the table names within identifier limits.
pub const MAX_PREFIX_LEN: usize = 40;

impl TablePrefix {
    /// Accepts `[a-z_][a-z0-9_]*`, at most [`MAX_PREFIX_LEN`] characters: it is spliced
    /// into SQL, so nothing else may pass.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidPrefix> {
        let prefix = prefix.into();
        let mut chars = prefix.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_start && valid_rest && prefix.len() <= MAX_PREFIX_LEN {
            Ok(Self(prefix))
        } else {
            Err(InvalidPrefix(prefix))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sql` with every `{p}` replaced by the prefix.
    pub fn render(&self, sql: &str) -> String {
        sql.replace("{p}", &self.0)
    }
}

impl Default for TablePrefix {
    fn default() -> Self {
        Self("ferry_".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "table_prefix {0:?} is not a valid identifier: use lowercase letters, digits and '_', starting with a letter or '_', at most {MAX_PREFIX_LEN} characters (e.g. \"ferry_\")"
)]
pub struct InvalidPrefix(pub String);

/// Settings every SQL store shares. Every default is what `StoreSettings::default` sets.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Defaults to `ferry_`.
    pub table_prefix: TablePrefix,
    /// Largest payload `enqueue` accepts. Defaults to 1 MiB.
    pub max_payload_bytes: usize,
    /// Keep published rows this long (for replay) instead of deleting them when marked.
    /// Defaults to zero: delete at once.
    pub retention: Duration,
    /// Leases come from a backend outside the store (Redis, etcd) and are adopted
    /// ([`OutboxStore::adopt`](ferry_core::OutboxStore::adopt)): marks then check the
    /// adopted epoch and owner instead of the store's own lease expiry. Defaults to false.
    pub external_leases: bool,
    /// How the relay learns of committed rows (PostgreSQL; other databases poll): each
    /// `migrate` creates or drops the notify trigger to match. With [`Wake::Poll`], set
    /// `RelayConfig::poll_interval` to the pick-up delay wanted (e.g. 100 ms). Defaults to
    /// [`Wake::Notify`].
    pub wake: Wake,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            table_prefix: TablePrefix::default(),
            max_payload_bytes: 1024 * 1024,
            retention: Duration::ZERO,
            external_leases: false,
            wake: Wake::Notify,
        }
    }
}

/// Most partitions an outbox may have.
pub const MAX_PARTITIONS: u32 = 4096;

/// Refuses a partition count outside 1..=[`MAX_PARTITIONS`] before anything is created.
pub(crate) fn check_partitions(partitions: u32) -> Result<(), StoreError> {
    if (1..=MAX_PARTITIONS).contains(&partitions) {
        Ok(())
    } else {
        Err(StoreError::Other(
            format!("partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}").into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_accepts_identifiers_only() {
        assert!(TablePrefix::new("ferry_").is_ok());
        assert!(TablePrefix::new("_t1_").is_ok());
        for bad in [
            "",
            "1abc",
            "Ferry",
            "a-b",
            "a;drop table x",
            &"a".repeat(41),
        ] {
            assert!(TablePrefix::new(bad).is_err(), "{bad:?}");
        }
        let p = TablePrefix::new("x_").expect("valid prefix");
        assert_eq!(
            p.render("SELECT * FROM {p}outbox"),
            "SELECT * FROM x_outbox"
        );
    }
}
