//! The HTTP webhook sink (docs/DESIGN.md §3, §6).
//!
//! Each message is one `POST` in CloudEvents HTTP binary content mode: the attributes as
//! `ce-*` headers (`ce-id`, `ce-type`, `ce-source`, `ce-specversion`, `ce-time`,
//! `ce-subject`, and ferry's `ce-aggregatetype`, `ce-aggregateversion`,
//! `ce-partitionkey`, `ce-sequence`; values percent-encoded outside printable ASCII as the
//! binding asks), `Content-Type` = `datacontenttype`, the payload as the body untouched,
//! the message's own headers (`traceparent`, …), and `Idempotency-Key` = message id, by
//! which the receiver drops repeats. With a `signing_secret` the request is signed
//! ([`signature`]). [`received_message`] turns a received request back into a
//! [`ReceivedMessage`] for the inbox.
//!
//! A 2xx answer is the ack. 408, 429 and 5xx, timeouts and connection failures are
//! retried with backoff; a `Retry-After` (seconds or an HTTP date) on such an answer holds
//! every request to that origin until then. Redirects are not followed (a 301/302 would
//! turn the POST into a GET) and, like every other 4xx, are permanent: the partition
//! blocks with the status and the start of the answer as the reason, visible in
//! `ferry status`.
//!
//! Order: the messages of one batch (one partition) are POSTed one after the other, each
//! after the previous one's answer, and nothing after a failure; batches of different
//! partitions run concurrently. A partition thus moves at most one message per round
//! trip, and the sink as a whole at most `partitions / round trip` messages per second.
//! Webhooks cannot be read back, so [`Sink::reconcile`] returns nothing: after a crash
//! the unmarked messages are POSTed again with the same `Idempotency-Key`.

mod config;
pub mod signature;
mod url_template;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, StatusCode};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use ferry_core::cloudevents::{
    DecodeError, ReceivedMessage, Source, binary_attributes, user_headers,
};
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use config::{InvalidWebhookConfig, WebhookSinkConfig};
use signature::SigningKey;
use url_template::UrlTemplate;

/// The header carrying the message id for the receiver's dedup.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// How much of a refusing answer's body goes into the error (and `ferry status`).
const REASON_BODY_BYTES: usize = 300;

/// Request headers a message's own headers may not set: they belong to the HTTP
/// connection or to ferry.
const RESERVED_HEADERS: [&str; 13] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "authorization",
    IDEMPOTENCY_KEY_HEADER,
    signature::ID_HEADER,
    signature::TIMESTAMP_HEADER,
    signature::SIGNATURE_HEADER,
];

/// POSTs each message to a webhook; see the module docs.
pub struct WebhookSink {
    client: Client,
    url: UrlTemplate,
    signing_key: Option<SigningKey>,
    source: Source,
    retry_after_max: Duration,
    /// Per origin (`scheme://host:port`), the instant before which no request is sent,
    /// from the last `Retry-After`.
    not_before: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &self.url)
            .field("signed", &self.signing_key.is_some())
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// Validates `config` and builds the HTTP client (no request is made: a receiver that
    /// is down shows up as retried publishes).
    pub fn new(config: &WebhookSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let mut default_headers = HeaderMap::new();
        if let Some(token) = &config.bearer_token {
            let mut value = HeaderValue::from_str(&format!(
                "Bearer {}",
                secrecy::ExposeSecret::expose_secret(token)
            ))
            .map_err(|err| SinkError::permanent("invalid bearer_token").with_source(err))?;
            value.set_sensitive(true);
            default_headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = Client::builder();
        if let Some(certificates) = checked.ca_certificates {
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .connect_timeout(checked.connect_timeout)
            .timeout(checked.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .default_headers(default_headers)
            .build()
            .map_err(|err| SinkError::permanent("cannot build the HTTP client").with_source(err))?;
        info!(url = %config.url, signed = checked.signing_key.is_some(), "webhook sink ready");
        Ok(Self {
            client,
            url: checked.url,
            signing_key: checked.signing_key,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            retry_after_max: checked.retry_after_max,
            not_before: Mutex::default(),
        })
    }

    /// POSTs one message and classifies the answer.
    async fn post(&self, message: &Message) -> Result<Delivery, SinkError> {
        let url = self.url.render(message).map_err(SinkError::permanent)?;
        let origin = url.origin().ascii_serialization();
        self.wait_for(&origin).await;
        let headers = self.headers(message)?;
        let sent = self
            .client
            .post(url.clone())
            .headers(headers)
            .body(message.payload.clone())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                // Retryable still: the receiver may be given a trusted certificate.
                if crate::tls::is_certificate_failure(&err) {
                    let message = crate::tls::certificate_failure(
                        "the webhook receiver",
                        &origin,
                        "sink.tls_ca_file",
                    );
                    return Err(SinkError::retryable(message).with_source(err));
                }
                let what = if err.is_timeout() {
                    "timed out"
                } else if err.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                // The URL without query: a query may carry a token.
                return Err(
                    SinkError::retryable(format!("POST to {origin}{} {what}", url.path()))
                        .with_source(err),
                );
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(Delivery::default());
        }
        let retryable = status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        if retryable && let Some(delay) = retry_after {
            self.hold(&origin, delay.min(self.retry_after_max));
        }
        let body = read_reason(response).await;
        let hint = if status.is_redirection() {
            " (redirects are not followed, as they would turn the POST into a GET: configure the final URL)"
        } else {
            ""
        };
        let reason = format!(
            "the webhook {origin}{} answered {status}{hint}{}{body}",
            url.path(),
            if body.is_empty() { "" } else { ": " }
        );
        Err(if retryable {
            SinkError::retryable(reason)
        } else {
            SinkError::permanent(reason)
        })
    }

    fn headers(&self, message: &Message) -> Result<HeaderMap, SinkError> {
        let mut headers = HeaderMap::with_capacity(16 + message.headers.len());
        for (name, value) in user_headers(message) {
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("ce-") {
                continue;
            }
            let header = HeaderName::from_bytes(lower.as_bytes()).map_err(|_| {
                SinkError::permanent(format!(
                    "the message header {name:?} is not a valid HTTP header name"
                ))
            })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                SinkError::permanent(format!(
                    "the message header {name:?} has a value HTTP cannot carry (line breaks or \
                     control characters)"
                ))
            })?;
            headers.insert(header, value);
        }
        let id = message.id.to_string();
        for (attribute, value) in binary_attributes(message, &self.source) {
            let name =
                HeaderName::from_bytes(format!("ce-{attribute}").as_bytes()).map_err(|err| {
                    SinkError::permanent(format!("invalid CloudEvents attribute {attribute:?}"))
                        .with_source(err)
                })?;
            headers.insert(name, encoded_value(&value));
        }
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_str(message.content_type()).map_err(|_| {
                SinkError::permanent(format!(
                    "the content type {:?} cannot be sent as an HTTP header",
                    message.content_type()
                ))
            })?,
        );
        let id_value = encoded_value(&id);
        headers.insert(
            HeaderName::from_static(IDEMPOTENCY_KEY_HEADER),
            id_value.clone(),
        );
        if let Some(key) = &self.signing_key {
            let timestamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            let signature = key.sign(&id, timestamp, &message.payload);
            headers.insert(HeaderName::from_static(signature::ID_HEADER), id_value);
            headers.insert(
                HeaderName::from_static(signature::TIMESTAMP_HEADER),
                encoded_value(&timestamp.to_string()),
            );
            headers.insert(
                HeaderName::from_static(signature::SIGNATURE_HEADER),
                encoded_value(&signature),
            );
        }
        Ok(headers)
    }

    /// Waits until `origin` may be sent to again.
    async fn wait_for(&self, origin: &str) {
        let until = self
            .not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(origin)
            .copied();
        if let Some(until) = until
            && until > Instant::now()
        {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Holds every request to `origin` for `delay` (keeping a later hold already set).
    fn hold(&self, origin: &str, delay: Duration) {
        let until = Instant::now() + delay;
        let mut not_before = self
            .not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = not_before.entry(origin.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
        warn!(
            origin,
            retry_after_ms = delay.as_millis() as u64,
            "webhook asked to retry later; holding requests to it"
        );
    }
}

#[async_trait]
impl Sink for WebhookSink {
    /// POSTs the batch in order, one request at a time; stops at the first failure, and
    /// reports the rest retryable ("not sent").
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for message in batch {
            let outcome = self.post(message).await;
            let failed = outcome.is_err();
            outcomes.push(outcome);
            if failed {
                break;
            }
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    /// A webhook cannot be read back: nothing to reconcile; re-sent messages carry their
    /// `Idempotency-Key`.
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }
}

/// A header value in the CloudEvents HTTP binding's encoding: printable ASCII except
/// space, `"` and `%` as is, every other byte of the UTF-8 text percent-encoded.
fn encoded_value(value: &str) -> HeaderValue {
    let plain = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    let text: Cow<'_, str> = if value.bytes().all(plain) {
        Cow::Borrowed(value)
    } else {
        let mut out = String::with_capacity(value.len() * 3);
        for byte in value.bytes() {
            if plain(byte) {
                out.push(char::from(byte));
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        Cow::Owned(out)
    };
    // Only printable ASCII remains, which every header value accepts.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("_"))
}

/// Percent-decodes a binding-encoded header value; malformed escapes stay as they are.
fn decoded_value(value: &str) -> Cow<'_, str> {
    if !value.contains('%') {
        return Cow::Borrowed(value);
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `Retry-After` as a delay from `now`: delta-seconds or an HTTP date (RFC 9110 §10.2.3).
/// A date in the past means no wait.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The start of a refusing answer's body, on one line, for the error and `ferry status`.
async fn read_reason(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < REASON_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_BODY_BYTES)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Rebuilds a message from a request this sink made: its headers (name, value) and body.
/// `ce-*` values are percent-decoded as the CloudEvents HTTP binding asks.
pub fn received_message<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: Bytes,
) -> Result<ReceivedMessage, DecodeError> {
    let decoded: Vec<(&str, Cow<'_, str>)> = headers
        .into_iter()
        .map(|(name, value)| {
            let is_attribute = name
                .get(..3)
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case("ce-"));
            let value = if is_attribute {
                decoded_value(value)
            } else {
                Cow::Borrowed(value)
            };
            (name, value)
        })
        .collect();
    ReceivedMessage::from_binary(
        decoded.iter().map(|(name, value)| (*name, value.as_ref())),
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_round_trip_through_the_binding_encoding() {
        for text in [
            "plain-ASCII_1.0",
            "with space",
            "100%",
            "quote\"d",
            "zürich",
            "a\nb",
        ] {
            let encoded = encoded_value(text);
            let encoded = encoded.to_str().expect("ascii");
            assert!(
                encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{encoded}"
            );
            assert_eq!(decoded_value(encoded), text);
        }
        assert_eq!(encoded_value("a b").to_str().expect("ascii"), "a%20b");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
