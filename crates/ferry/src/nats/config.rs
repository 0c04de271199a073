//! Settings of the NATS JetStream sink and their validation.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::ServerAddr;
use ferry_core::cloudevents::ContentMode;
use secrecy::SecretString;
use serde::Deserialize;

use super::subject::SubjectTemplate;
use crate::template::Field;

/// Largest accepted `max_acks_in_flight`: permits are taken per batch window with a `u32`
/// count, and more than this many unacknowledged publishes only adds memory, not speed.
pub const MAX_ACKS_IN_FLIGHT_LIMIT: usize = 1 << 20;

/// Settings of the NATS JetStream sink. Every key is optional; the defaults are:
///
/// - `url = "nats://127.0.0.1:4222"`: the server, or several separated by commas
///   (`"nats://a:4222,nats://b:4222"`) to try in turn.
/// - `stream = "FERRY"`: the JetStream stream, created if missing. Letters, digits, `-`
///   and `_` are safe; `.`, `*`, `>`, `/`, `\` and whitespace are refused.
/// - `subjects = ["ferry.>"]`: the stream's subjects when ferry creates it. An existing
///   stream keeps its own subjects (a warning says so when they differ).
/// - `subject_template = "ferry.{aggregate_type}.{event_type}"`: the subject of each
///   message, with the placeholders `{aggregate_type}`, `{aggregate_id}`, `{event_type}`
///   and `{partition}`. A value that contains a character NATS forbids inside a subject
///   token (space, `.`, `*`, `>`, control characters) has it replaced with `_`, so
///   `order.paid` becomes `order_paid`; an empty value becomes `_`.
/// - `duplicate_window_secs = 120`: the stream's `Nats-Msg-Id` dedup window. An existing
///   stream with another window is updated to this one, because reconciliation after a
///   takeover relies on it.
/// - `max_acks_in_flight = 4096`: publishes awaiting their ack, across all partitions.
///   JetStream is fast only with many in flight (87k msg/s at 256, 143k at 4096).
/// - `ack_timeout_secs = 10`: how long to wait for one ack (and for JetStream API replies)
///   before the publish counts as failed and is retried.
/// - `fencing`: whether a publish carries `Nats-Expected-Last-Subject-Sequence`, so that
///   JetStream itself refuses a message from a relay that lost the partition (see the
///   module docs of `nats`). It needs subjects that only one partition writes: unset
///   means on when `subject_template` has `{partition}` and no `{aggregate_id}` (one
///   check per subject per batch would then be one per message), off otherwise.
/// - `content_mode = "binary"`: how the CloudEvents travel. `"binary"`: the attributes as
///   `ce-*` headers and the payload untouched as the body. `"structured"`: the whole event
///   as one JSON object in the body (`content-type: application/cloudevents+json`, the
///   payload as `data`, or `data_base64` when it is not JSON), with `Nats-Msg-Id` and
///   `content-type` the only headers: for consumers that read only message bodies (the
///   original NATS binding, bridges that forward bodies). Both are CloudEvents NATS
///   bindings that stock SDKs read, at the same drain rate (BENCHMARKS.md section 7);
///   `ferry::nats::decode_message` reads either.
/// - `source`: the CloudEvents `source` of every event; unset means
///   `ferry://<aggregate_type>`.
/// - `credentials_file`: a NATS `.creds` file (JWT and NKey seed); unset means none.
/// - `token`: a NATS auth token; unset means none. Never logged or serialised.
/// - `tls_ca_file`: a PEM file of the CA that issued the server's certificate, trusted
///   instead of the system's roots; setting it requires TLS (as does a `tls://` url).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSinkConfig {
    pub url: String,
    pub stream: String,
    pub subjects: Vec<String>,
    pub subject_template: String,
    pub duplicate_window_secs: u64,
    pub max_acks_in_flight: usize,
    pub ack_timeout_secs: u64,
    pub fencing: Option<bool>,
    pub content_mode: ContentMode,
    pub source: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<SecretString>,
    pub tls_ca_file: Option<PathBuf>,
}

/// `url` may carry a user and password (`nats://user:password@host:4222`): not shown.
impl std::fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &"[redacted]")
            .field("stream", &self.stream)
            .field("subjects", &self.subjects)
            .field("subject_template", &self.subject_template)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("max_acks_in_flight", &self.max_acks_in_flight)
            .field("ack_timeout_secs", &self.ack_timeout_secs)
            .field("fencing", &self.fencing)
            .field("content_mode", &self.content_mode)
            .field("source", &self.source)
            .field("credentials_file", &self.credentials_file)
            .field("token", &self.token)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Default for NatsSinkConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "FERRY".into(),
            subjects: vec!["ferry.>".into()],
            subject_template: "ferry.{aggregate_type}.{event_type}".into(),
            duplicate_window_secs: 120,
            max_acks_in_flight: 4096,
            ack_timeout_secs: 10,
            fencing: None,
            content_mode: ContentMode::Binary,
            source: None,
            credentials_file: None,
            token: None,
            tls_ca_file: None,
        }
    }
}

/// A setting of [`NatsSinkConfig`] that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid nats sink setting `{key}`: {reason}")]
#[non_exhaustive]
pub struct InvalidNatsConfig {
    /// The config key, as written in the config file (e.g. `subject_template`).
    pub key: &'static str,
    /// What is wrong and what is allowed instead.
    pub reason: String,
}

impl InvalidNatsConfig {
    fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}

/// The checked form of a [`NatsSinkConfig`], ready to connect with.
#[derive(Debug)]
pub(crate) struct Checked {
    /// Without credentials: the client logs its server addresses.
    pub(crate) servers: Vec<ServerAddr>,
    /// The user and password the URL carried, sent in the CONNECT message instead.
    pub(crate) credentials: Option<Credentials>,
    pub(crate) template: SubjectTemplate,
    pub(crate) duplicate_window: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) fencing: bool,
}

impl NatsSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidNatsConfig> {
        self.check().map(drop)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidNatsConfig> {
        let (servers, credentials) = take_credentials(parse_servers(&self.url)?)?;
        check_stream_name(&self.stream)?;
        if self.subjects.is_empty() {
            return Err(InvalidNatsConfig::new(
                "subjects",
                "must list at least one subject, e.g. [\"ferry.>\"]",
            ));
        }
        for subject in &self.subjects {
            check_filter_subject(subject)
                .map_err(|reason| InvalidNatsConfig::new("subjects", reason))?;
        }
        let template = SubjectTemplate::parse(&self.subject_template)
            .map_err(|reason| InvalidNatsConfig::new("subject_template", reason))?;
        if !self.subjects.iter().any(|s| template.may_match(s)) {
            return Err(InvalidNatsConfig::new(
                "subject_template",
                format!(
                    "{:?} renders subjects that none of the stream's subjects {:?} match, so no \
                     message would be stored; make them agree (e.g. template \
                     \"ferry.{{aggregate_type}}.{{event_type}}\" with subjects [\"ferry.>\"])",
                    self.subject_template, self.subjects
                ),
            ));
        }
        if self.duplicate_window_secs == 0 {
            return Err(InvalidNatsConfig::new(
                "duplicate_window_secs",
                "must be at least 1 second (default 120): without a dedup window a re-sent \
                 message is stored twice",
            ));
        }
        if self.max_acks_in_flight == 0 || self.max_acks_in_flight > MAX_ACKS_IN_FLIGHT_LIMIT {
            return Err(InvalidNatsConfig::new(
                "max_acks_in_flight",
                format!(
                    "is {}; allowed is 1 to {MAX_ACKS_IN_FLIGHT_LIMIT} (default 4096)",
                    self.max_acks_in_flight
                ),
            ));
        }
        if self.ack_timeout_secs == 0 {
            return Err(InvalidNatsConfig::new(
                "ack_timeout_secs",
                "must be at least 1 second (default 10)",
            ));
        }
        if let Some(source) = &self.source
            && (source.is_empty() || source.chars().any(char::is_control))
        {
            return Err(InvalidNatsConfig::new(
                "source",
                "must be a non-empty URI without control characters (e.g. \"urn:shop:orders\"), \
                 or left unset for ferry://<aggregate_type>",
            ));
        }
        if let Some(path) = &self.credentials_file
            && !path.is_file()
        {
            return Err(InvalidNatsConfig::new(
                "credentials_file",
                format!(
                    "{} is not a readable file (a NATS .creds file)",
                    path.display()
                ),
            ));
        }
        if let Some(path) = &self.tls_ca_file {
            crate::tls::read_ca_file(path)
                .map_err(|reason| InvalidNatsConfig::new("tls_ca_file", reason))?;
        }
        let exclusive = template.uses(Field::Partition) && !template.uses(Field::AggregateId);
        let fencing = match self.fencing {
            None => exclusive,
            Some(true) if !exclusive => {
                return Err(InvalidNatsConfig::new(
                    "fencing",
                    "needs a subject_template with {partition} (so that only one relay writes \
                     each subject) and without {aggregate_id} (one server check per message \
                     would end pipelining), e.g. \"ferry.{aggregate_type}.p{partition}\"; or \
                     set fencing = false",
                ));
            }
            Some(on) => on,
        };
        Ok(Checked {
            servers,
            credentials,
            template,
            fencing,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            ack_timeout: Duration::from_secs(self.ack_timeout_secs),
        })
    }
}

fn parse_servers(url: &str) -> Result<Vec<ServerAddr>, InvalidNatsConfig> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            ServerAddr::from_str(part).map_err(|err| {
                InvalidNatsConfig::new(
                    "url",
                    format!("{err}; expected e.g. \"nats://127.0.0.1:4222\" (several separated by commas)"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(InvalidNatsConfig::new(
            "url",
            "is empty; expected e.g. \"nats://127.0.0.1:4222\"",
        ));
    }
    Ok(servers)
}

/// A user and password for the NATS servers.
pub(crate) type Credentials = (String, SecretString);

/// Moves the `user:password@` of the server URLs out of them, so that no address the
/// client logs carries a password; every server must carry the same ones, or none.
fn take_credentials(
    servers: Vec<ServerAddr>,
) -> Result<(Vec<ServerAddr>, Option<Credentials>), InvalidNatsConfig> {
    let mut found: Option<(String, String)> = None;
    let mut bare = Vec::with_capacity(servers.len());
    for server in servers {
        if let Some(user) = server.username() {
            let these = (user.to_owned(), server.password().unwrap_or("").to_owned());
            if found.as_ref().is_some_and(|f| *f != these) {
                return Err(InvalidNatsConfig::new(
                    "url",
                    "the servers carry different users or passwords: give them all the same",
                ));
            }
            found = Some(these);
        }
        let mut url = server.into_inner();
        // Cannot fail: the URL has a host (ServerAddr checked it).
        let _ = url.set_username("");
        let _ = url.set_password(None);
        bare.push(ServerAddr::from_url(url).map_err(|err| {
            InvalidNatsConfig::new(
                "url",
                format!("{err}; expected e.g. \"nats://127.0.0.1:4222\""),
            )
        })?);
    }
    Ok((
        bare,
        found.map(|(user, pass)| (user, SecretString::from(pass))),
    ))
}

fn check_stream_name(name: &str) -> Result<(), InvalidNatsConfig> {
    let bad =
        |c: char| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.contains(bad) {
        return Err(InvalidNatsConfig::new(
            "stream",
            format!(
                "{name:?} is not a valid stream name: use letters, digits, '-' and '_' \
                 (no '.', '*', '>', '/', '\\' or spaces), e.g. \"FERRY\""
            ),
        ));
    }
    Ok(())
}

/// Checks a stream subject, where `*` and a final `>` are wildcards.
fn check_filter_subject(subject: &str) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let valid = !token.is_empty()
            && !token.contains(|c: char| c.is_whitespace() || c.is_control())
            && match *token {
                "*" => true,
                ">" => i + 1 == tokens.len(),
                other => !other.contains(['*', '>']),
            };
        if !valid {
            return Err(format!(
                "{subject:?} is not a valid subject: use non-empty '.'-separated tokens without \
                 spaces, with '*' as a whole token and '>' only as the last token, e.g. \"ferry.>\""
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
