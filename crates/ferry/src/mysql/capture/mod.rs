//! Log-based capture from MariaDB's binlog (feature `mysql-capture`): [`MyLogCapture`]
//! streams the outbox table's inserts as a replica would, instead of polling the table.
//!
//! - Needs `log_bin` on, `binlog_format = ROW`, `binlog_row_image = FULL` (an insert's
//!   image must carry the columns filled by defaults, `created_at`), uncompressed binlog
//!   events, and a user with `REPLICATION SLAVE` and `BINLOG MONITOR` (MariaDB 10.5+;
//!   `REPLICATION CLIENT` before). [`MyLogCapture::start`] checks each and says what to
//!   change. MariaDB only: MySQL's GTIDs and binary JSON are another format, refused by name.
//! - The position is MariaDB's GTID state (`@slave_connect_state`, with
//!   `@mariadb_slave_capability = 4` so the server sends its GTID events), stored in
//!   `<prefix>capture_position` by [`confirm`](ferry_core::LogStream::confirm) only. The
//!   first start records the server's position then as the origin: rows already in the
//!   outbox are the relay's drain's.
//! - One stream at a time: the stream holds the named lock `<prefix>capture.<database>`
//!   (`GET_LOCK`) on a control connection, writes the position on that connection only
//!   while it holds the lock, and checks it every second; a second relay is refused with
//!   [`StoreError::HeldElsewhere`] and waits as a standby. The server frees the lock when
//!   the connection ends: at once for a killed relay, after
//!   [`CaptureSettings::lock_idle_timeout`] for a paused or cut-off one (whose position
//!   writes then change nothing). Marks stay fenced by the leases.

mod columns;
mod error;
mod point;
mod stream;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, OptsBuilder, SslOpts};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{MySqlConnection, Row};
use url::Url;

use ferry_core::partition::partition_for;
use ferry_core::{CaptureLag, LogCapture, LogStream, StoreError, error_chain};

pub(crate) use self::error::binlog_error;
use self::error::{lost_lock, privilege_error};
use self::point::{BinlogPoint, GtidState};
use self::stream::MyLogStream;
use super::MyOutbox;
use crate::mysql::MyDialect;
use crate::sql::{Arg, Statement, store_error};

/// How the relay's replica connection presents itself to the server.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// The server id the binlog connection registers with: unique among the server's
    /// replicas (a second connection with the same id makes the server drop the first).
    /// Defaults to one derived from the database and table prefix, in 3000000000..3001000000.
    pub server_id: Option<u32>,
    /// How long the server keeps the capture lock of a relay that stopped talking (paused,
    /// cut off) before it ends that connection and frees the lock for a standby: the
    /// session's `wait_timeout` on the control connection, which a streaming relay uses at
    /// least every second while it reads. Defaults to 10 s.
    pub lock_idle_timeout: Duration,
    /// How often the server sends a heartbeat on an idle stream, which shows a dead
    /// connection. Defaults to 1 s.
    pub heartbeat: Duration,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            server_id: None,
            heartbeat: Duration::from_secs(1),
            lock_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// The outbox of a MariaDB database, captured from its binlog.
#[derive(Debug, Clone)]
pub struct MyLogCapture {
    capture: Capture,
}

/// What the capture and its streams share.
#[derive(Debug, Clone)]
pub(crate) struct Capture {
    outbox: MyOutbox,
    binlog_opts: OptsBuilder,
    /// `host:port` of the binlog connection, for messages.
    endpoint: String,
    database: String,
    outbox_table: String,
    lock_name: String,
    server_id: u32,
    heartbeat: Duration,
    lock_idle_timeout: Duration,
    statements: Arc<Statements>,
}

#[derive(Debug)]
struct Statements {
    read: Statement,
    origin: Statement,
    confirm: Statement,
}

impl MyLogCapture {
    /// Captures `outbox`, whose database is at `url` (the store's URL: the binlog connection
    /// uses its host, port or socket, user, password, database and TLS settings).
    pub fn new(outbox: MyOutbox, url: &str, settings: CaptureSettings) -> Result<Self, StoreError> {
        let invalid = |what: String| {
            StoreError::Other(format!("invalid MySQL url (store.url): {what}").into())
        };
        let options = MySqlConnectOptions::from_str(url).map_err(|err| invalid(err.to_string()))?;
        let parsed = Url::parse(url).map_err(|err| invalid(err.to_string()))?;
        let database = options
            .get_database()
            .ok_or_else(|| invalid("log capture needs the database in the url".into()))?
            .to_owned();
        let password = percent_decoded(parsed.password().unwrap_or_default());
        let binlog_opts = OptsBuilder::default()
            .ip_or_hostname(options.get_host())
            .tcp_port(options.get_port())
            .socket(options.get_socket().map(|s| s.display().to_string()))
            .user(Some(options.get_username()))
            .pass((!password.is_empty()).then_some(password))
            .db_name(Some(database.clone()))
            .ssl_opts(binlog_tls(&parsed).map_err(invalid)?);
        let prefix = outbox.table_prefix().as_str();
        let lock_name = format!("{prefix}capture.{database}");
        // MariaDB's lock names are at most 64 characters.
        let lock_name = if lock_name.len() <= 64 {
            lock_name
        } else {
            format!("ferry_capture.{:08x}", partition_for(&lock_name, u32::MAX))
        };
        let server_id = settings.server_id.unwrap_or_else(|| {
            3_000_000_000 + partition_for(&format!("{database}/{prefix}"), 1_000_000)
        });
        let statements = Arc::new(Statements {
            read: outbox.render(include_str!("position_read.sql")),
            origin: outbox.render(include_str!("position_origin.sql")),
            confirm: outbox.render(include_str!("position_confirm.sql")),
        });
        Ok(Self {
            capture: Capture {
                outbox_table: format!("{prefix}outbox"),
                outbox,
                binlog_opts,
                endpoint: format!("{}:{}", options.get_host(), options.get_port()),
                database,
                lock_name,
                server_id,
                heartbeat: settings.heartbeat,
                lock_idle_timeout: settings.lock_idle_timeout,
                statements,
            },
        })
    }
}

impl MyLogCapture {
    /// Checks the prerequisites and records the server's position now as where the first
    /// stream begins, unless a position is recorded (`ferry migrate` in log mode). Errors
    /// say what to change on the server.
    pub async fn setup(&self) -> Result<(), StoreError> {
        let mut control = self.capture.control_connection().await?;
        self.capture.check_prerequisites(&mut control).await?;
        if self.capture.stored(&mut control).await?.is_none() {
            self.capture.record_origin(&mut control).await?;
        }
        Ok(())
    }

    /// The named lock a streaming relay holds (`IS_USED_LOCK(name)` shows its connection).
    pub fn lock_name(&self) -> &str {
        &self.capture.lock_name
    }
}

/// The binlog connection's TLS, from the store URL's `ssl-mode` and `ssl-ca` as sqlx reads
/// them: `REQUIRED` encrypts without checking the certificate, `VERIFY_CA` checks it against
/// `ssl-ca`, `VERIFY_IDENTITY` also checks the host name. `PREFERRED` (sqlx's default) and
/// `DISABLED` stream in plain text: mysql_async cannot fall back from TLS as sqlx does.
fn binlog_tls(url: &Url) -> Result<Option<SslOpts>, String> {
    let param = |names: [&str; 2]| {
        url.query_pairs()
            .find(|(key, _)| names.contains(&key.as_ref()))
            .map(|(_, value)| value.into_owned())
    };
    let mode = param(["ssl-mode", "sslmode"]).unwrap_or_else(|| "PREFERRED".into());
    let ca = param(["ssl-ca", "sslca"]);
    let verified = |check_host: bool| {
        let ca = ca.as_deref().ok_or_else(|| {
            format!("ssl-mode={mode} needs ssl-ca=<CA certificate file> for the binlog connection")
        })?;
        Ok(Some(
            SslOpts::default()
                .with_root_certs(vec![PathBuf::from(ca).into()])
                .with_disable_built_in_roots(true)
                .with_danger_skip_domain_validation(!check_host),
        ))
    };
    match mode.to_ascii_uppercase().as_str() {
        "DISABLED" | "PREFERRED" => Ok(None),
        "REQUIRED" => Ok(Some(
            SslOpts::default().with_danger_accept_invalid_certs(true),
        )),
        "VERIFY_CA" => verified(false),
        "VERIFY_IDENTITY" => verified(true),
        other => Err(format!(
            "ssl-mode={other} is not one of DISABLED, PREFERRED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY"
        )),
    }
}

fn percent_decoded(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl LogCapture for MyLogCapture {
    async fn start(&self, max_messages: usize) -> Result<Box<dyn LogStream>, StoreError> {
        let capture = &self.capture;
        let mut control = capture.control_connection().await?;
        let checksummed = capture.check_prerequisites(&mut control).await?;
        capture.lock(&mut control).await?;
        let confirmed = match capture.stored(&mut control).await? {
            Some(point) => point,
            None => capture.record_origin(&mut control).await?,
        };
        let binlog = capture.open_binlog(&confirmed.gtid).await?;
        Ok(Box::new(MyLogStream::new(
            capture.clone(),
            control,
            binlog,
            confirmed,
            checksummed,
            max_messages,
        )))
    }

    async fn lag(&self) -> Result<CaptureLag, StoreError> {
        let mut control = self.capture.control_connection().await?;
        let Some(confirmed) = self.capture.stored(&mut control).await? else {
            return Ok(CaptureLag::default());
        };
        self.capture.lag_of(&mut control, &confirmed).await
    }
}

impl Capture {
    pub(crate) fn is_outbox(&self, database: &str, table: &str) -> bool {
        database == self.database && table == self.outbox_table
    }

    /// A connection of its own (not the pool's): the lock lives as long as it does.
    async fn control_connection(&self) -> Result<MySqlConnection, StoreError> {
        let conn = self
            .outbox
            .pool()
            .acquire()
            .await
            .map_err(store_error::<MyDialect>)?;
        Ok(conn.detach())
    }

    /// Checks what log capture needs of the server; returns whether its binlog events carry
    /// checksums.
    async fn check_prerequisites(&self, conn: &mut MySqlConnection) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT @@version AS version, @@log_bin AS log_bin, @@binlog_format AS format, \
             @@binlog_row_image AS image",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error::<MyDialect>)?;
        let version: String = row.try_get("version").map_err(store_error::<MyDialect>)?;
        let log_bin: i64 = row.try_get("log_bin").map_err(store_error::<MyDialect>)?;
        let format: String = row.try_get("format").map_err(store_error::<MyDialect>)?;
        let image: String = row.try_get("image").map_err(store_error::<MyDialect>)?;
        let refuse = |what: String| Err(StoreError::Other(what.into()));
        if !version.contains("MariaDB") {
            return refuse(format!(
                "log capture reads MariaDB's binlog, and this server is MySQL {version}: use capture.mode = \"poll\""
            ));
        }
        if log_bin != 1 {
            return refuse(
                "log capture needs the binary log, and the server runs with log_bin off: start it with --log-bin (and --binlog-format=ROW --binlog-row-image=FULL), or use capture.mode = \"poll\"".into(),
            );
        }
        if !format.eq_ignore_ascii_case("ROW") {
            return refuse(format!(
                "log capture needs binlog_format = ROW, the server has {format}: SET GLOBAL binlog_format = 'ROW' (and in the server's configuration)"
            ));
        }
        if !image.eq_ignore_ascii_case("FULL") {
            return refuse(format!(
                "log capture needs binlog_row_image = FULL (an insert's image must hold the columns filled by defaults), the server has {image}: SET GLOBAL binlog_row_image = 'FULL'"
            ));
        }
        let compressed: i64 = sqlx::query_scalar("SELECT @@log_bin_compress")
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        if compressed != 0 {
            return refuse(
                "log capture does not read compressed binlog events: SET GLOBAL log_bin_compress = OFF".into(),
            );
        }
        let checksum: String = sqlx::query_scalar("SELECT @@binlog_checksum")
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        Ok(!checksum.eq_ignore_ascii_case("NONE"))
    }

    /// Takes the capture lock without waiting, or says who holds it. The server ends the
    /// connection, and frees the lock, once it is idle for `lock_idle_timeout`.
    async fn lock(&self, conn: &mut MySqlConnection) -> Result<(), StoreError> {
        sqlx::query("SET SESSION wait_timeout = ?")
            .bind(self.lock_idle_timeout.as_secs().max(1))
            .execute(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&self.lock_name)
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        if got == Some(1) {
            return Ok(());
        }
        let holder: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?)")
            .bind(&self.lock_name)
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        Err(StoreError::HeldElsewhere(format!(
            "the binlog of outbox {}.{} is streamed by another relay (lock {:?} held by connection {})",
            self.database,
            self.outbox_table,
            self.lock_name,
            holder.map_or_else(|| "that just ended".to_owned(), |id| id.to_string())
        )))
    }

    /// Fails once `conn` no longer holds the capture lock (or is gone).
    pub(crate) async fn check_lock(&self, conn: &mut MySqlConnection) -> Result<(), StoreError> {
        let held: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?) = CONNECTION_ID()")
            .bind(&self.lock_name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| lost_lock(&self.lock_name, &err.to_string()))?;
        if held == Some(1) {
            Ok(())
        } else {
            Err(lost_lock(&self.lock_name, "another connection holds it"))
        }
    }

    async fn stored(&self, conn: &mut MySqlConnection) -> Result<Option<BinlogPoint>, StoreError> {
        let Some(row) = self
            .statements
            .read
            .fetch_optional::<MyDialect>(conn, &[])
            .await?
        else {
            return Ok(None);
        };
        let read = |err| store_error::<MyDialect>(err);
        let gtid: String = row.try_get("gtid_position").map_err(read)?;
        Ok(Some(BinlogPoint {
            gtid: gtid.parse().map_err(|err: String| {
                StoreError::Other(format!("{} capture_position: {err}", self.database).into())
            })?,
            file: row.try_get("binlog_file").map_err(read)?,
            pos: u64::try_from(row.try_get::<i64, _>("binlog_pos").map_err(read)?).unwrap_or(0),
            committed: row.try_get("committed_at").map_err(read)?,
        }))
    }

    /// The first start: the server's position now is where the stream begins.
    async fn record_origin(&self, conn: &mut MySqlConnection) -> Result<BinlogPoint, StoreError> {
        let gtid: String = sqlx::query_scalar("SELECT @@gtid_binlog_pos")
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        let (file, pos) = self.binlog_end(conn).await?;
        let committed: i64 = sqlx::query_scalar("SELECT UNIX_TIMESTAMP()")
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        let pos_arg = i64::try_from(pos).unwrap_or(i64::MAX);
        self.statements
            .origin
            .execute::<MyDialect>(
                conn,
                &[
                    Arg::Text(&gtid),
                    Arg::Text(&file),
                    Arg::Int(pos_arg),
                    Arg::Int(committed),
                ],
            )
            .await?;
        self.stored(conn)
            .await?
            .ok_or_else(|| StoreError::Other("the capture origin was not recorded".into()))
    }

    /// The server's binlog file and position now (`SHOW MASTER STATUS`).
    pub(crate) async fn binlog_end(
        &self,
        conn: &mut MySqlConnection,
    ) -> Result<(String, u64), StoreError> {
        let row = sqlx::query("SHOW MASTER STATUS")
            .fetch_optional(&mut *conn)
            .await
            .map_err(|err| privilege_error(err, "BINLOG MONITOR"))?
            .ok_or_else(|| {
                StoreError::Other("SHOW MASTER STATUS returned nothing: is log_bin on?".into())
            })?;
        let file: String = row.try_get(0).map_err(store_error::<MyDialect>)?;
        let pos: u64 = row.try_get(1).map_err(store_error::<MyDialect>)?;
        Ok((file, pos))
    }

    pub(crate) async fn confirm(
        &self,
        conn: &mut MySqlConnection,
        point: &BinlogPoint,
    ) -> Result<(), StoreError> {
        let gtid = point.gtid.to_string();
        let changed = self
            .statements
            .confirm
            .execute::<MyDialect>(
                conn,
                &[
                    Arg::Text(&gtid),
                    Arg::Text(&point.file),
                    Arg::Int(i64::try_from(point.pos).unwrap_or(i64::MAX)),
                    Arg::Int(point.committed),
                    Arg::Text(&self.lock_name),
                ],
            )
            .await
            .map_err(|err| lost_lock(&self.lock_name, &error_chain(&err)))?;
        if changed == 1 {
            Ok(())
        } else {
            Err(lost_lock(&self.lock_name, "the position was not written"))
        }
    }

    /// How far `confirmed` is behind the server's binlog end: the bytes of binlog past it
    /// (`SHOW BINARY LOGS`), and the seconds since it committed (0 when caught up).
    pub(crate) async fn lag_of(
        &self,
        conn: &mut MySqlConnection,
        confirmed: &BinlogPoint,
    ) -> Result<CaptureLag, StoreError> {
        let logs = sqlx::query("SHOW BINARY LOGS")
            .fetch_all(&mut *conn)
            .await
            .map_err(|err| privilege_error(err, "BINLOG MONITOR"))?;
        let mut bytes = 0u64;
        for log in &logs {
            let name: String = log.try_get(0).map_err(store_error::<MyDialect>)?;
            let size: u64 = log.try_get(1).map_err(store_error::<MyDialect>)?;
            if name == confirmed.file {
                bytes += size.saturating_sub(confirmed.pos);
            } else if name > confirmed.file {
                bytes += size;
            }
        }
        let now: i64 = sqlx::query_scalar("SELECT UNIX_TIMESTAMP()")
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error::<MyDialect>)?;
        let seconds = if bytes == 0 {
            0.0
        } else {
            (now - confirmed.committed).max(0) as f64
        };
        Ok(CaptureLag {
            bytes: Some(bytes),
            seconds: Some(seconds),
        })
    }

    /// A replica connection asking for the binlog after `gtid`.
    async fn open_binlog(&self, gtid: &GtidState) -> Result<mysql_async::BinlogStream, StoreError> {
        let mut conn = Conn::new(self.binlog_opts.clone())
            .await
            .map_err(|err| binlog_error(err, self))?;
        let heartbeat_ns = u64::try_from(self.heartbeat.as_nanos()).unwrap_or(u64::MAX);
        conn.exec_drop(
            "SET @mariadb_slave_capability = 4, @slave_connect_state = ?, \
             @slave_gtid_strict_mode = 0, @slave_gtid_ignore_duplicates = 0, \
             @master_heartbeat_period = ?",
            (gtid.to_string(), heartbeat_ns),
        )
        .await
        .map_err(|err| binlog_error(err, self))?;
        conn.get_binlog_stream(BinlogStreamRequest::new(self.server_id))
            .await
            .map_err(|err| binlog_error(err, self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_of(url: &str) -> Result<Option<SslOpts>, String> {
        binlog_tls(&Url::parse(url).expect("a URL"))
    }

    #[test]
    fn the_binlog_connection_takes_the_store_urls_tls_mode() {
        assert!(
            tls_of("mysql://h/db").unwrap().is_none(),
            "PREFERRED: plain"
        );
        assert!(tls_of("mysql://h/db?ssl-mode=DISABLED").unwrap().is_none());
        let required = tls_of("mysql://h/db?ssl-mode=REQUIRED").unwrap().unwrap();
        assert!(required.accept_invalid_certs());
        let verify_ca = tls_of("mysql://h/db?ssl-mode=VERIFY_CA&ssl-ca=/ca.pem")
            .unwrap()
            .unwrap();
        assert!(!verify_ca.accept_invalid_certs() && verify_ca.skip_domain_validation());
        assert_eq!(verify_ca.root_certs().len(), 1);
        let verify_identity = tls_of("mysql://h/db?sslmode=verify_identity&sslca=/ca.pem")
            .unwrap()
            .unwrap();
        assert!(!verify_identity.skip_domain_validation());
    }

    #[test]
    fn a_tls_mode_without_its_ca_or_unknown_is_named() {
        let missing = tls_of("mysql://h/db?ssl-mode=VERIFY_IDENTITY").unwrap_err();
        assert!(missing.contains("needs ssl-ca="), "{missing}");
        let unknown = tls_of("mysql://h/db?ssl-mode=SOMETIMES").unwrap_err();
        assert!(
            unknown.contains("ssl-mode=SOMETIMES is not one of"),
            "{unknown}"
        );
    }
}
