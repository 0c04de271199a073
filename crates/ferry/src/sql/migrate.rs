//! Versioned schemas: each is a list of migration scripts whose version (how many were
//! applied) is kept in `<prefix>meta` under a key of its own. ferry's tables are one such
//! schema; others kept beside them (the reliable message service's) are another, migrated
//! the same way and under the same lock.

use sqlx::{AssertSqlSafe, SqlSafeStr};
use tracing::info;

use ferry_core::StoreError;

use super::dialect::Dialect;
use super::driver::{Exec, RowExt};
use super::error::store_error;
use super::outbox::{Connection, Statements};
use super::{MAX_PARTITIONS, TablePrefix};

/// A versioned schema.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// What it is, in messages ("ferry", "ferry service").
    pub name: &'static str,
    /// Its key in `<prefix>meta`.
    pub version_key: &'static str,
    /// Its migration scripts, oldest first: version `n` is entry `n - 1`. Released entries
    /// never change; a new version appends one. `{p}` is the table prefix.
    pub migrations: &'static [&'static str],
}

impl Schema {
    /// The version this code reads and writes.
    pub fn latest(&self) -> u64 {
        self.migrations.len() as u64
    }

    /// Checks that the database is at the version this code needs, neither older (not
    /// migrated) nor newer (written by a newer ferry).
    pub fn check(&self, recorded: Option<u64>) -> Result<(), StoreError> {
        match recorded.unwrap_or(0) {
            version if version > self.latest() => Err(self.newer(version)),
            version if version < self.latest() => Err(StoreError::Schema(format!(
                "the {} schema is at version {version}, this ferry needs {}",
                self.name,
                self.latest()
            ))),
            _ => Ok(()),
        }
    }

    fn newer(&self, version: u64) -> StoreError {
        StoreError::Schema(format!(
            "the database has {} schema version {version}, newer than this ferry's {}: upgrade ferry",
            self.name,
            self.latest()
        ))
    }
}

/// The meta key of the outbox's partition count.
pub(crate) const PARTITIONS_KEY: &str = "partitions";

/// Applies the migrations of `schema` that the database does not have yet, rendered with
/// `fills` (after `{p}`), and records the version. Runs inside the migration's transaction
/// and lock (see [`SqlOutbox::migrate_with`](super::SqlOutbox::migrate_with)).
pub(crate) async fn apply<D: Dialect>(
    conn: &mut Connection<D>,
    statements: &Statements,
    prefix: &TablePrefix,
    schema: &Schema,
    fills: &[(&str, &str)],
) -> Result<(), StoreError> {
    let current = read_number::<D>(conn, statements, schema.version_key)
        .await?
        .unwrap_or(0);
    if current > schema.latest() {
        return Err(schema.newer(current));
    }
    for (index, migration) in schema.migrations.iter().enumerate().skip(current as usize) {
        let sql = fills
            .iter()
            .fold(prefix.render(migration), |sql, (name, fill)| {
                sql.replace(name, fill)
            });
        <D::Db as Exec>::execute_script(conn, AssertSqlSafe(sql).into_sql_str())
            .await
            .map_err(store_error::<D>)?;
        info!(
            schema = schema.name,
            version = index + 1,
            prefix = prefix.as_str(),
            "applied schema migration"
        );
    }
    write::<D>(conn, statements, schema.version_key, schema.latest()).await
}

/// Refuses, before anything changes, a partition count other than the one the outbox was
/// created with.
pub(crate) fn check_partitions_unchanged(
    existing: Option<u64>,
    partitions: u32,
) -> Result<(), StoreError> {
    match existing {
        Some(existing) if existing != u64::from(partitions) => Err(StoreError::Schema(format!(
            "the outbox has {existing} partitions; the partition count is fixed at set-up (it decides which partition every key's messages are in) and cannot be changed to {partitions}: keep partitions = {existing}"
        ))),
        _ => Ok(()),
    }
}

/// P as `migrate` recorded it.
pub(crate) fn recorded_partitions(partitions: Option<u64>) -> Result<u32, StoreError> {
    partitions
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| (1..=MAX_PARTITIONS).contains(p))
        .ok_or_else(|| {
            StoreError::Schema(format!(
                "the meta table has no valid partition count ({partitions:?})"
            ))
        })
}

/// A number from the meta table (`None` if the row is missing).
pub(crate) async fn read_number<D: Dialect>(
    conn: &mut Connection<D>,
    statements: &Statements,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    let row = statements
        .meta_read
        .fetch_optional::<D>(conn, &[key.into()])
        .await?;
    let value: Option<String> = row
        .map(|row| row.col("value"))
        .transpose()
        .map_err(store_error::<D>)?;
    value
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                StoreError::Schema(format!("the meta row {key:?} is not a number: {v:?}"))
            })
        })
        .transpose()
}

pub(crate) async fn write<D: Dialect>(
    conn: &mut Connection<D>,
    statements: &Statements,
    key: &str,
    value: u64,
) -> Result<(), StoreError> {
    statements
        .meta_write
        .execute::<D>(conn, &[key.into(), value.to_string().as_str().into()])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Schema = Schema {
        name: "test",
        version_key: "test_version",
        migrations: &["-- 1", "-- 2"],
    };

    #[test]
    fn a_schema_must_be_at_this_codes_version() {
        assert!(TWO.check(Some(2)).is_ok());
        for recorded in [None, Some(1), Some(3)] {
            assert!(
                matches!(TWO.check(recorded), Err(StoreError::Schema(_))),
                "{recorded:?}"
            );
        }
    }

    #[test]
    fn the_partition_count_is_fixed() {
        assert!(check_partitions_unchanged(None, 8).is_ok());
        assert!(check_partitions_unchanged(Some(8), 8).is_ok());
        assert!(check_partitions_unchanged(Some(8), 16).is_err());
        assert_eq!(recorded_partitions(Some(16)).ok(), Some(16));
        assert!(recorded_partitions(Some(0)).is_err());
        assert!(recorded_partitions(None).is_err());
    }
}
