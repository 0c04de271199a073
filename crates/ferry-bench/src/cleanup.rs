//! Removing the bench's outbox: its tables and functions, or its Redis keys.

use ferry_cli::wiring::Store;

/// Drops every table and function of `store` whose name starts with `prefix`, or deletes
/// the Redis store's keys.
pub(crate) async fn remove_outbox(store: &Store, prefix: &str) -> anyhow::Result<()> {
    match store {
        Store::Postgres(outbox) => drop_postgres(outbox.pool(), prefix).await,
        Store::Sqlite(outbox) => drop_sqlite(outbox.pool(), prefix).await,
        Store::Mysql(outbox) => drop_mysql(outbox.pool(), prefix).await,
        Store::Redis(outbox) => outbox.remove().await.map(drop).map_err(Into::into),
    }
}

/// Drops every table and function whose name starts with `prefix` (the trigger, indexes
/// and identity sequences go with their tables).
async fn drop_postgres(pool: &sqlx::PgPool, prefix: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I', tablename) FROM pg_tables \
         WHERE schemaname = current_schema() AND starts_with(tablename, $1)",
    )
    .bind(prefix)
    .fetch_all(&mut *tx)
    .await?;
    if !tables.is_empty() {
        let sql = format!("DROP TABLE IF EXISTS {} CASCADE", tables.join(", "));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
         WHERE p.pronamespace = current_schema()::regnamespace AND starts_with(p.proname, $1)",
    )
    .bind(prefix)
    .fetch_all(&mut *tx)
    .await?;
    for function in functions {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP FUNCTION IF EXISTS {function}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    drop_postgres_capture(pool, prefix).await
}

/// Drops the publications and logical replication slots of `capture.mode = "log"` whose
/// names start with `prefix`: a slot left behind would pin the server's WAL. A slot is
/// still active for a moment after its relay stopped (its walsender exits afterwards).
async fn drop_postgres_capture(pool: &sqlx::PgPool, prefix: &str) -> anyhow::Result<()> {
    let publications: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I', pubname) FROM pg_publication WHERE starts_with(pubname, $1)",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    for publication in publications {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP PUBLICATION IF EXISTS {publication}"
        )))
        .execute(pool)
        .await?;
    }
    let slots = "SELECT slot_name::text, active FROM pg_replication_slots \
                 WHERE database = current_database() AND starts_with(slot_name::text, $1)";
    for _ in 0..50 {
        let found: Vec<(String, bool)> = sqlx::query_as(slots).bind(prefix).fetch_all(pool).await?;
        if found.is_empty() {
            return Ok(());
        }
        for (slot, active) in found {
            if !active {
                sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(&slot)
                    .execute(pool)
                    .await?;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("a replication slot named {prefix}* stayed active for 10 s; drop it by hand")
}

/// Drops every table, procedure and function of the current database whose name starts
/// with `prefix`.
async fn drop_mysql(pool: &sqlx::MySqlPool, prefix: &str) -> anyhow::Result<()> {
    // LIKE would read the prefix's '_' as a wildcard: compare the leading characters.
    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT 'TABLE', table_name FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND LEFT(table_name, CHAR_LENGTH(?)) = ? \
         UNION ALL SELECT routine_type, routine_name FROM information_schema.routines \
         WHERE routine_schema = DATABASE() AND LEFT(routine_name, CHAR_LENGTH(?)) = ?",
    )
    .bind(prefix)
    .bind(prefix)
    .bind(prefix)
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    for (kind, name) in objects {
        let quoted = name.replace('`', "``");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP {kind} IF EXISTS `{quoted}`"
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Drops every table whose name starts with `prefix` (indexes and triggers go with them).
async fn drop_sqlite(pool: &sqlx::SqlitePool, prefix: &str) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, length(?1)) = ?1",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    for table in tables {
        let quoted = table.replace('"', "\"\"");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS \"{quoted}\""
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}
