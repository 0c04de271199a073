//! Log capture from PostgreSQL (feature `postgres-capture`): the outbox's inserts streamed
//! through logical replication (pgoutput, `pgwire-replication`) from a permanent slot, for
//! the relay's `capture.mode = "log"` ([`ferry_core::capture`]).
//!
//! [`PgCapture::setup`] (run by `ferry migrate` in log mode) checks the server's
//! prerequisites and creates a publication of the outbox table for inserts only and a
//! logical slot. The slot is confirmed only with the positions the relay hands back
//! ([`LogStream::confirm`](ferry_core::LogStream::confirm)): never automatically.

mod pgoutput;
mod stream;

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, TlsConfig};
use sqlx::{AssertSqlSafe, PgPool, Row as _};
use tokio::time::Instant;
use tracing::info;

use ferry_core::{CaptureLag, LogCapture, LogStream, StoreError};

use self::pgoutput::Decoder;
use self::stream::{PgLogStream, Snapshot, slot_in_use};
use super::PgOutbox;

/// The prefix of the relay's heartbeat messages (`pg_logical_emit_message`).
const HEARTBEAT_PREFIX: &str = "ferry-heartbeat";

/// How log capture uses PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCaptureSettings {
    /// The logical replication slot. Defaults to `<table prefix>outbox`.
    pub slot: String,
    /// The publication of the outbox table. Defaults to `<table prefix>outbox`.
    pub publication: String,
    /// How often an idle stream emits a heartbeat, so that the slot moves on and the
    /// server can recycle WAL. Defaults to 10 s.
    pub heartbeat_interval: Duration,
}

impl PgCaptureSettings {
    /// The defaults for an outbox whose tables start with `table_prefix`.
    pub fn for_prefix(table_prefix: &str) -> Self {
        Self {
            slot: format!("{table_prefix}outbox"),
            publication: format!("{table_prefix}outbox"),
            heartbeat_interval: Duration::from_secs(10),
        }
    }
}

/// The outbox's log in PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgCapture {
    replication: ReplicationConfig,
    pool: PgPool,
    /// The outbox table's name.
    table: String,
    settings: PgCaptureSettings,
}

impl PgCapture {
    /// Log capture of `outbox`, whose server `url` (a `postgres://` URL; `sslmode` and
    /// `sslrootcert` are honoured) the replication connection also uses.
    pub fn new(
        url: &str,
        outbox: &PgOutbox,
        settings: PgCaptureSettings,
    ) -> Result<Self, StoreError> {
        for (what, name) in [
            ("slot", &settings.slot),
            ("publication", &settings.publication),
        ] {
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(StoreError::Other(
                    format!("capture.{what} = {name:?}: use 1-63 lowercase letters, digits or _")
                        .into(),
                ));
            }
        }
        Ok(Self {
            replication: replication_config(url, &settings)?,
            pool: outbox.pool().clone(),
            table: format!("{}outbox", outbox.table_prefix().as_str()),
            settings,
        })
    }

    pub fn settings(&self) -> &PgCaptureSettings {
        &self.settings
    }

    /// Checks the prerequisites and creates the publication and the slot if missing.
    /// Errors say what to change on the server.
    pub async fn setup(&self) -> Result<(), StoreError> {
        let wal_level: String = self.scalar("SELECT current_setting('wal_level')").await?;
        if wal_level != "logical" {
            return Err(StoreError::Other(format!(
                "PostgreSQL runs with wal_level = {wal_level}; log capture needs wal_level = logical: run ALTER SYSTEM SET wal_level = logical and restart the server (or use capture.mode = \"poll\")"
            ).into()));
        }
        let may_replicate: bool = self
            .scalar("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
            .await?;
        if !may_replicate {
            let user: String = self.scalar("SELECT current_user::text").await?;
            return Err(StoreError::Other(format!(
                "role {user} may not stream replication; log capture needs ALTER ROLE {user} REPLICATION"
            ).into()));
        }
        let publication = &self.settings.publication;
        let published: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(publication)
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
        if !published {
            // Both names are checked identifiers (PgCapture::new, TablePrefix).
            sqlx::query(AssertSqlSafe(format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish = 'insert')",
                self.table
            )))
            .execute(&self.pool)
            .await
            .map_err(|err| {
                StoreError::Other(format!("creating publication {publication}: {err}").into())
            })?;
            info!(publication, table = %self.table, "created the outbox's publication (inserts only)");
        }
        let slot = &self.settings.slot;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(slot)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        if exists {
            return Ok(());
        }
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM pg_replication_slots), current_setting('max_replication_slots')::bigint",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        let (used, max): (i64, i64) = (row.get(0), row.get(1));
        if used >= max {
            return Err(StoreError::Other(format!(
                "all {max} replication slots of the server are in use: raise max_replication_slots (and restart), or drop an unused slot with pg_drop_replication_slot"
            ).into()));
        }
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(&self.pool)
            .await
            .map_err(|err| {
                StoreError::Other(format!("creating replication slot {slot}: {err}").into())
            })?;
        info!(slot, "created the outbox's logical replication slot");
        Ok(())
    }

    async fn scalar<T>(&self, sql: &'static str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl LogCapture for PgCapture {
    async fn start(&self, max_messages: usize) -> Result<Box<dyn LogStream>, StoreError> {
        let slot = &self.settings.slot;
        let mut client = ReplicationClient::connect_gated(self.replication.clone())
            .await
            .map_err(|err| replication_error(slot, err))?;
        client
            .start()
            .await
            .map_err(|err| replication_error(slot, err))?;
        client
            .wait_started()
            .await
            .map_err(|err| replication_error(slot, err))?;
        Ok(Box::new(PgLogStream {
            client,
            decoder: Decoder::new(&self.table),
            pool: self.pool.clone(),
            slot: slot.clone(),
            max_messages,
            heartbeat_interval: self.settings.heartbeat_interval,
            last_heartbeat: Instant::now(),
            open: None,
            drained_at: None,
            snapshot: Snapshot::default(),
            unconfirmed: VecDeque::new(),
        }))
    }

    async fn lag(&self) -> Result<CaptureLag, StoreError> {
        Ok(CaptureLag {
            bytes: slot_lag_bytes(&self.pool, &self.settings.slot).await?,
            seconds: None,
        })
    }
}

/// The replication session's settings from the store's URL. The walsender renders values
/// in the formats [`pgoutput`] reads.
fn replication_config(
    url: &str,
    settings: &PgCaptureSettings,
) -> Result<ReplicationConfig, StoreError> {
    let invalid = |why: &str| {
        StoreError::Other(
            format!("store.url is not a usable PostgreSQL URL for log capture: {why}").into(),
        )
    };
    let parsed = url::Url::parse(url).map_err(|_| invalid("it does not parse"))?;
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| invalid("a percent-encoding that is not UTF-8"))
    };
    let host = parsed
        .host_str()
        .ok_or_else(|| invalid("no host"))?
        .to_owned();
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        user => decode(user)?,
    };
    let password = decode(parsed.password().unwrap_or_default())?;
    let database = decode(parsed.path().trim_start_matches('/'))?;
    let mut tls = TlsConfig::disabled();
    let query: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    let root = query
        .iter()
        .find(|(k, _)| k == "sslrootcert")
        .map(|(_, v)| v.into());
    if let Some((_, mode)) = query.iter().find(|(k, _)| k == "sslmode") {
        tls = match mode.as_str() {
            "disable" | "allow" | "prefer" => TlsConfig::disabled(),
            "require" => TlsConfig::require(),
            "verify-ca" => TlsConfig::verify_ca(root),
            "verify-full" => TlsConfig::verify_full(root),
            other => return Err(invalid(&format!("sslmode={other}"))),
        };
    }
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        settings.slot.clone(),
        settings.publication.clone(),
    )
    .with_port(parsed.port().unwrap_or(5432))
    .with_tls(tls)
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(4096)
    .with_options(
        "-c DateStyle=ISO,YMD -c TimeZone=UTC -c bytea_output=hex -c extra_float_digits=3",
    )
    .with_application_name("ferry relay"))
}

/// A replication error as the relay reads it: the slot streamed elsewhere is a standby's
/// wait, a missing slot or publication a set-up to run, a lost connection an outage.
fn replication_error(slot: &str, err: PgWireError) -> StoreError {
    if slot_in_use(&err) {
        return StoreError::HeldElsewhere(format!("replication slot {slot} is active: {err}"));
    }
    match &err {
        PgWireError::Server(text) if text.contains("SQLSTATE 42704") => {
            StoreError::Schema(format!(
                "log capture: {text} (the slot and publication are created by `ferry migrate` with capture.mode = \"log\")"
            ))
        }
        PgWireError::Server(text) if text.contains("SQLSTATE 55000") => StoreError::Other(
            format!("log capture cannot stream slot {slot}: {text} (is wal_level = logical?)")
                .into(),
        ),
        PgWireError::Auth(_) | PgWireError::Tls(_) | PgWireError::MessageTooLarge { .. } => {
            StoreError::Other(Box::new(err))
        }
        _ => StoreError::Unavailable(Box::new(err)),
    }
}

fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(Box::new(err))
}

/// Where the server inserts WAL now: every transaction visible to a read made before
/// ends at or before it.
async fn current_wal_insert_lsn(pool: &PgPool) -> Result<Lsn, StoreError> {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    Lsn::parse(&text)
        .map_err(|err| StoreError::Other(format!("the server's LSN {text}: {}", err.0).into()))
}

/// The WAL the server keeps for `slot` past its confirmed position, if the slot exists.
async fn slot_lag_bytes(pool: &PgPool, slot: &str) -> Result<Option<u64>, StoreError> {
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .map_err(unavailable)?
    .flatten();
    Ok(bytes.map(|bytes| bytes.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_session_takes_the_stores_url() {
        let settings = PgCaptureSettings::for_prefix("ferry_");
        let config = replication_config(
            "postgres://rep%40lica:p%2Fss@db.example:5434/orders?sslmode=verify-full&sslrootcert=/ca.pem",
            &settings,
        )
        .expect("a usable URL");
        assert_eq!(
            (
                config.host.as_str(),
                config.port,
                config.user.as_str(),
                config.password.as_str(),
                config.database.as_str()
            ),
            ("db.example", 5434, "rep@lica", "p/ss", "orders")
        );
        assert_eq!(config.slot, "ferry_outbox");
        assert!(config.tls.mode.verifies_hostname());
        assert!(replication_config("postgres://h/db?sslmode=bogus", &settings).is_err());
    }
}
