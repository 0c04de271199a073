//! Settings of the Redis Streams sink and their validation.

use std::path::PathBuf;
use std::time::Duration;

use redis::IntoConnectionInfo as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::sink_config::{InvalidSinkConfig, check_count, check_source};
use crate::template::{Field, PLACEHOLDERS, Segment, Template};

/// Largest accepted `dedup_scan_entries`: the scan runs inside Redis, which serves nothing
/// else meanwhile.
pub const MAX_DEDUP_SCAN_ENTRIES: u64 = 1_000_000;

/// Largest accepted `max_entries_per_call`.
pub const MAX_ENTRIES_PER_CALL: usize = 10_000;

/// Settings of the Redis Streams sink. Every key is optional; the defaults are:
///
/// - `url = "redis://127.0.0.1:6379"`: the server (`redis://[user:password@]host:port/db`,
///   `rediss://` for TLS). A secret: never logged, errors name only host and port.
/// - `tls_ca_file`: a PEM file of the CA that issued the server's certificate, trusted
///   instead of the public roots (`rediss://` only).
/// - `stream_template = "ferry.{aggregate_type}.{partition}"`: the stream of each message,
///   with the placeholders `{aggregate_type}`, `{aggregate_id}`, `{event_type}` and
///   `{partition}` (values inserted as they are). It must contain `{partition}`: entry ids
///   come from the outbox sequence, which orders messages only within one partition, so a
///   stream written by several partitions would refuse their interleaved ids.
/// - `max_len`: trim each stream to about this many entries (`XADD MAXLEN ~`); unset keeps
///   everything. At least `dedup_scan_entries`: a re-sent message whose first copy was
///   trimmed away cannot be recognised.
/// - `dedup_scan_entries = 10000`: how far below a stream's top a message that committed
///   late (after messages of higher sequence were appended) is looked for before it is
///   appended. Must exceed the relay's `batch_size`, which bounds how far back a copy sent
///   by a crashed relay can lie.
/// - `max_entries_per_call = 250`: messages appended per pipeline round trip; a batch
///   goes in windows of this many. Each message in flight is held encoded twice (script
///   arguments and the request), so this bounds the relay's memory: 16 partitions with
///   whole 1000-message batches in flight peaked at 84 MiB, windows of 250 at 33 MiB, at
///   the same rate (BENCHMARKS.md section 6).
/// - `response_timeout_secs = 10`: how long to wait for Redis's reply to a batch (and for a
///   connection) before the batch counts as failed and is retried.
/// - `source`: the CloudEvents `source` of every event; unset means
///   `ferry://<aggregate_type>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisStreamSinkConfig {
    pub url: SecretString,
    pub tls_ca_file: Option<PathBuf>,
    pub stream_template: String,
    pub max_len: Option<u64>,
    pub dedup_scan_entries: u64,
    pub max_entries_per_call: usize,
    pub response_timeout_secs: u64,
    pub source: Option<String>,
}

impl std::fmt::Debug for RedisStreamSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSinkConfig")
            .field("url", &"[redacted]")
            .field("tls_ca_file", &self.tls_ca_file)
            .field("stream_template", &self.stream_template)
            .field("max_len", &self.max_len)
            .field("dedup_scan_entries", &self.dedup_scan_entries)
            .field("max_entries_per_call", &self.max_entries_per_call)
            .field("response_timeout_secs", &self.response_timeout_secs)
            .field("source", &self.source)
            .finish()
    }
}

impl Default for RedisStreamSinkConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            tls_ca_file: None,
            stream_template: "ferry.{aggregate_type}.{partition}".into(),
            max_len: None,
            dedup_scan_entries: 10_000,
            max_entries_per_call: 250,
            response_timeout_secs: 10,
            source: None,
        }
    }
}

/// The checked form of a [`RedisStreamSinkConfig`], ready to connect with.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) client: redis::Client,
    /// `host:port`, without credentials, for messages.
    pub(crate) server: String,
    pub(crate) template: Template,
    pub(crate) response_timeout: Duration,
}

impl RedisStreamSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidSinkConfig> {
        self.check().map(drop)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidSinkConfig> {
        let connection = self.url.expose_secret().into_connection_info().map_err(|err| {
            invalid(
                "url",
                format!(
                    "{}; expected e.g. \"redis://127.0.0.1:6379\" or \"rediss://user:password@host:6380/0\"",
                    err.detail().unwrap_or("not a redis URL")
                ),
            )
        })?;
        let server = connection.addr().to_string();
        let client = crate::tls::redis_client(connection, self.tls_ca_file.as_deref())
            .map_err(|reason| invalid("tls_ca_file", reason))?;
        let template = Template::parse(&self.stream_template)
            .map_err(|reason| invalid("stream_template", reason))?;
        if !template
            .segments()
            .contains(&Segment::Field(Field::Partition))
        {
            return Err(invalid(
                "stream_template",
                format!(
                    "{:?} has no {{partition}}: entry ids are outbox sequences, which are ordered \
                     only within a partition, so each stream must belong to one partition, e.g. \
                     \"ferry.{{aggregate_type}}.{{partition}}\" (placeholders are {PLACEHOLDERS})",
                    self.stream_template
                ),
            ));
        }
        if !(1..=MAX_DEDUP_SCAN_ENTRIES).contains(&self.dedup_scan_entries) {
            return Err(invalid(
                "dedup_scan_entries",
                format!(
                    "is {}; allowed is 1 to {MAX_DEDUP_SCAN_ENTRIES} (default 10000), above the \
                     relay's batch_size",
                    self.dedup_scan_entries
                ),
            ));
        }
        if let Some(max_len) = self.max_len
            && max_len < self.dedup_scan_entries
        {
            return Err(invalid(
                "max_len",
                format!(
                    "is {max_len}, below dedup_scan_entries = {}: a message re-sent after its \
                     first copy was trimmed away would be stored twice; raise max_len or lower \
                     dedup_scan_entries, or leave max_len unset to keep every entry",
                    self.dedup_scan_entries
                ),
            ));
        }
        check_count(
            "redis_stream",
            "max_entries_per_call",
            self.max_entries_per_call,
            MAX_ENTRIES_PER_CALL,
            250,
        )?;
        if self.response_timeout_secs == 0 {
            return Err(invalid(
                "response_timeout_secs",
                "must be at least 1 second (default 10)",
            ));
        }
        check_source("redis_stream", self.source.as_deref())?;
        Ok(Checked {
            client,
            server,
            template,
            response_timeout: Duration::from_secs(self.response_timeout_secs),
        })
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidSinkConfig {
    InvalidSinkConfig::new("redis_stream", key, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: &RedisStreamSinkConfig) -> &'static str {
        config.validate().expect_err("must be rejected").key
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RedisStreamSinkConfig::default().validate(), Ok(()));
    }

    #[test]
    fn bad_keys_are_named() {
        let base = RedisStreamSinkConfig::default;
        for url in ["", "http://x", "redis://[::1"] {
            let config = RedisStreamSinkConfig {
                url: url.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "url", "{url:?}");
        }
        for template in [
            "ferry.{aggregate_type}",
            "x{nope}{partition}",
            "x{partition",
        ] {
            let config = RedisStreamSinkConfig {
                stream_template: template.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "stream_template", "{template:?}");
        }
        for scan in [0, MAX_DEDUP_SCAN_ENTRIES + 1] {
            let config = RedisStreamSinkConfig {
                dedup_scan_entries: scan,
                ..base()
            };
            assert_eq!(key_of(&config), "dedup_scan_entries");
        }
        let config = RedisStreamSinkConfig {
            max_len: Some(500),
            ..base()
        };
        assert_eq!(key_of(&config), "max_len");
        for entries in [0, MAX_ENTRIES_PER_CALL + 1] {
            let config = RedisStreamSinkConfig {
                max_entries_per_call: entries,
                ..base()
            };
            assert_eq!(key_of(&config), "max_entries_per_call");
        }
        let config = RedisStreamSinkConfig {
            response_timeout_secs: 0,
            ..base()
        };
        assert_eq!(key_of(&config), "response_timeout_secs");
        let config = RedisStreamSinkConfig {
            source: Some(String::new()),
            ..base()
        };
        assert_eq!(key_of(&config), "source");
    }

    #[test]
    fn a_template_without_partition_explains_why_it_needs_one() {
        let config = RedisStreamSinkConfig {
            stream_template: "orders".into(),
            ..RedisStreamSinkConfig::default()
        };
        let err = config.validate().expect_err("refused");
        assert!(
            err.reason.contains("{partition}") && err.reason.contains("sequence"),
            "{err}"
        );
    }

    #[test]
    fn the_url_is_secret_and_errors_name_only_the_server() {
        let config: RedisStreamSinkConfig = serde_json::from_str(
            r#"{"url":"redis://user:s3cret@cache.internal:6380/2","max_len":20000}"#,
        )
        .expect("parses");
        assert!(!format!("{config:?}").contains("s3cret"));
        let checked = config.check().expect("valid");
        assert_eq!(checked.server, "cache.internal:6380");
        let err = serde_json::from_str::<RedisStreamSinkConfig>(r#"{"maxlen":5}"#)
            .expect_err("unknown key");
        assert!(err.to_string().contains("maxlen"), "{err}");
    }
}
