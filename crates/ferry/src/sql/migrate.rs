//! Versioned schemas: each is a list of migration scripts whose version (how many were
//! applied) is kept in `<prefix>meta` under a key of its own. ferry's tables are one such
//! schema; others kept beside them (the reliable message service's) are another, migrated
//! the same way and under the same lock.

use sqlx::{AssertSqlSafe, SqlSafeStr};
use tracing::info;

use ferry_core::StoreError;

use sqlx::Transaction;
use sqlx::pool::PoolConnection;

use super::dialect::Dialect;
use super::driver::{Exec, RowExt};
use super::error::store_error;
use super::outbox::{Connection, SqlOutbox, Statements, fills};
use super::{MAX_PARTITIONS, TablePrefix, check_partitions};

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

/// The name of the lock concurrent migrations of one prefix queue on.
const MIGRATION_LOCK_NAME: &str = "{p}migrate";

/// The schema of ferry's own tables in dialect `D`.
pub(crate) fn outbox_schema<D: Dialect>() -> Schema {
    Schema {
        name: "ferry",
        version_key: "schema_version",
        migrations: D::MIGRATIONS,
    }
}

/// The meta key of the outbox's partition count.
pub(crate) const PARTITIONS_KEY: &str = "partitions";

/// Migrations run on a connection of their own, in one write transaction (where the
/// database's DDL is transactional), under a lock that concurrent runs queue on.
impl<D: Dialect> SqlOutbox<D> {
    /// Creates or upgrades ferry's tables (and, where the database has them, the routines
    /// producers in other languages call), with `partitions` partitions (1 to
    /// [`MAX_PARTITIONS`](crate::sql::MAX_PARTITIONS)). Idempotent; concurrent runs queue
    /// on a lock. The partition count is fixed at set-up, because it decides which
    /// partition (and so which ordered stream) every key's messages are in; asking for
    /// another count later is refused before anything changes. Where DDL is transactional
    /// (PostgreSQL, SQLite) a failure leaves the previous version intact; elsewhere
    /// (MySQL) every statement is idempotent and a run cut short is completed by the next.
    /// Where the database notifies, the notify trigger is created or dropped to follow
    /// [`StoreSettings::wake`](super::StoreSettings::wake).
    pub async fn migrate(&self, partitions: u32) -> Result<(), StoreError> {
        check_partitions(partitions)?;
        let count = partitions.to_string();
        let mut conn = self.migration_connection().await?;
        let mut tx = self.begin_migration(&mut conn).await?;
        let existing = read_number::<D>(&mut tx, &self.statements, PARTITIONS_KEY).await?;
        check_partitions_unchanged(existing, partitions)?;
        if existing.is_none() {
            // Written before the migrations that hard-code P, so that a run cut short and
            // retried with another count is refused.
            write::<D>(
                &mut tx,
                &self.statements,
                PARTITIONS_KEY,
                u64::from(partitions),
            )
            .await?;
        }
        let fills = fills::<D>(self.table_prefix(), &[("{partitions}", &count)]);
        apply::<D>(
            &mut tx,
            &self.statements,
            self.table_prefix(),
            &outbox_schema::<D>(),
            &fills,
        )
        .await?;
        // Every partition has a lease row; inserting the missing ones also covers a leases
        // table emptied by hand.
        self.statements
            .leases_create
            .execute::<D>(&mut tx, &[partitions.into()])
            .await?;
        if let Some(trigger) = &self.statements.notify_trigger {
            trigger.follow::<D>(&mut tx, self.settings().wake).await?;
        }
        tx.commit().await.map_err(store_error::<D>)?;
        // A count cached before is this one: it came from this database, checked above.
        let _ = self.partitions.set(partitions);
        info!(
            database = D::NAME,
            partitions,
            schema_version = outbox_schema::<D>().latest(),
            prefix = self.table_prefix().as_str(),
            "outbox ready"
        );
        Ok(())
    }

    /// Creates or upgrades a schema kept beside ferry's tables (same prefix, same lock as
    /// [`Self::migrate`]), e.g. the reliable message service's. ferry's tables must exist.
    pub async fn migrate_schema(
        &self,
        schema: &Schema,
        fills: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        let mut conn = self.migration_connection().await?;
        let mut tx = self.begin_migration(&mut conn).await?;
        let fills = self::fills::<D>(self.table_prefix(), fills);
        apply::<D>(
            &mut tx,
            &self.statements,
            self.table_prefix(),
            schema,
            &fills,
        )
        .await?;
        tx.commit().await.map_err(store_error::<D>)
    }

    /// A connection of its own for a migration, closed afterwards: session settings and
    /// session locks must not go back to the pool.
    async fn migration_connection(&self) -> Result<PoolConnection<D::Db>, StoreError> {
        let mut conn = self.acquire().await?;
        conn.close_on_drop();
        if let Some(setup) = D::MIGRATION_SESSION {
            <D::Db as Exec>::execute_script(&mut conn, setup.into_sql_str())
                .await
                .map_err(store_error::<D>)?;
        }
        Ok(conn)
    }

    /// Opens the migration's write transaction on `conn`, takes the migration lock and
    /// makes sure the meta table exists.
    async fn begin_migration<'c>(
        &self,
        conn: &'c mut PoolConnection<D::Db>,
    ) -> Result<Transaction<'c, D::Db>, StoreError> {
        let conn: &mut Connection<D> = conn;
        let mut tx = match D::BEGIN_WRITE {
            Some(begin) => sqlx::Connection::begin_with(conn, begin.into_sql_str()).await,
            None => sqlx::Connection::begin(conn).await,
        }
        .map_err(store_error::<D>)?;
        if let Some(lock) = &self.statements.migration_lock {
            let name = self.table_prefix().render(MIGRATION_LOCK_NAME);
            let row = lock
                .fetch_one::<D>(&mut tx, &[name.as_str().into()])
                .await?;
            let locked: bool = row.col("locked").map_err(store_error::<D>)?;
            if !locked {
                return Err(StoreError::Unavailable(
                    format!("another `ferry migrate` has held the lock {name:?} for 60 s").into(),
                ));
            }
        }
        self.statements
            .meta_create
            .execute::<D>(&mut tx, &[])
            .await?;
        Ok(tx)
    }
}

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
