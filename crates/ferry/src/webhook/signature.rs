//! Request signatures in the Standard Webhooks format (<https://www.standardwebhooks.com>),
//! so that receivers can verify with any of its libraries or a few lines of their own.
//!
//! Each signed request carries three headers:
//!
//! - `webhook-id`: the message id (also `ce-id` and `Idempotency-Key`);
//! - `webhook-timestamp`: Unix seconds when the request was signed;
//! - `webhook-signature`: `v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
//!
//! A receiver recomputes the HMAC over `id.timestamp.body` (the raw body bytes, before any
//! parsing) with the shared key, compares it in constant time with each space-separated
//! `v1,` entry of `webhook-signature`, and refuses timestamps more than a few minutes
//! from its own clock, so that a captured request cannot be replayed later
//! ([`verify`] does all of this). The key is the configured secret's bytes, or, for a
//! secret written `whsec_<base64>` (the Standard Webhooks form), the decoded bytes.

use std::time::Duration;

use base64::Engine as _;
use hmac::Mac as _;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Shortest accepted key: 192 bits, as Standard Webhooks asks.
pub const MIN_KEY_BYTES: usize = 24;

/// The prefix of a base64-encoded Standard Webhooks secret.
const ENCODED_PREFIX: &str = "whsec_";

pub(crate) const ID_HEADER: &str = "webhook-id";
pub(crate) const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub(crate) const SIGNATURE_HEADER: &str = "webhook-signature";

/// The HMAC key, decoded from the configured secret.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// `whsec_<base64>` is decoded; any other text is used as its UTF-8 bytes. Either way
    /// the key must have at least [`MIN_KEY_BYTES`] bytes.
    pub fn from_secret(secret: &str) -> Result<Self, String> {
        let key = match secret.strip_prefix(ENCODED_PREFIX) {
            Some(encoded) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|err| {
                    format!("starts with {ENCODED_PREFIX:?} but the rest is not base64 ({err})")
                })?,
            None => secret.as_bytes().to_vec(),
        };
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "is too short: {} bytes of key, at least {MIN_KEY_BYTES} are needed; generate \
                 one with `openssl rand -base64 32` (optionally prefixed with {ENCODED_PREFIX:?})",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for a request.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }
}

/// Why a received request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("the {0} header is missing")]
    Missing(&'static str),
    #[error("the webhook-timestamp header is not a Unix time in seconds")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from now, more than the tolerance")]
    Expired(u64),
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// Verifies a signed request: `header` looks a header up by its lowercase name, `body` is
/// the raw request body, `now` the receiver's Unix time in seconds; timestamps further
/// than `tolerance` from `now` are refused (5 minutes is usual).
pub fn verify<'h>(
    key: &SigningKey,
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let id = header(ID_HEADER).ok_or(SignatureError::Missing(ID_HEADER))?;
    let timestamp: u64 = header(TIMESTAMP_HEADER)
        .ok_or(SignatureError::Missing(TIMESTAMP_HEADER))?
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now.abs_diff(timestamp);
    if skew > tolerance.as_secs() {
        return Err(SignatureError::Expired(skew));
    }
    let signatures = header(SIGNATURE_HEADER).ok_or(SignatureError::Missing(SIGNATURE_HEADER))?;
    let matches = signatures
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
        })
        .any(|tag| key.mac(id, timestamp, body).verify_slice(&tag).is_ok());
    if matches {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification, checked against its published
    /// signature.
    #[test]
    fn matches_the_standard_webhooks_example() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let signature = key.sign(id, 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let headers = [
            (ID_HEADER, id.to_owned()),
            (TIMESTAMP_HEADER, "1614265330".to_owned()),
            (SIGNATURE_HEADER, format!("v1,bm9wZQ== {signature}")),
        ];
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        let tolerance = Duration::from_secs(300);
        assert_eq!(verify(&key, lookup, body, 1614265400, tolerance), Ok(()));
        assert_eq!(
            verify(&key, lookup, b"{}", 1614265400, tolerance),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&key, lookup, body, 1614266000, tolerance),
            Err(SignatureError::Expired(670))
        );
    }

    #[test]
    fn short_or_malformed_secrets_are_refused() {
        assert!(
            SigningKey::from_secret("short")
                .expect_err("short")
                .contains("too short")
        );
        assert!(
            SigningKey::from_secret("whsec_!!!")
                .expect_err("base64")
                .contains("base64")
        );
        assert!(SigningKey::from_secret("whsec_c2hvcnQ=").is_err());
        assert!(SigningKey::from_secret("a-long-enough-shared-secret-text").is_ok());
    }
}
