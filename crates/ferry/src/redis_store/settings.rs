//! The outbox's settings: the key prefix and the limits `RedisOutbox` enforces.

use std::time::Duration;

/// A validated key prefix (`ferry:` by default): every key of one outbox starts with it,
/// so several outboxes (and the application's own keys) can share one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

/// Longest key prefix accepted.
pub const MAX_KEY_PREFIX_LEN: usize = 64;

impl KeyPrefix {
    /// Accepts ASCII letters, digits and `_ : . - / { }`, 1 to [`MAX_KEY_PREFIX_LEN`]
    /// characters: no glob characters, so that `SCAN MATCH <prefix>*` finds exactly its keys.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidKeyPrefix> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_KEY_PREFIX_LEN
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:.-/{}".contains(c));
        if valid {
            Ok(Self(prefix))
        } else {
            Err(InvalidKeyPrefix(prefix))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("ferry:".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key_prefix {0:?} is not valid: use 1 to {MAX_KEY_PREFIX_LEN} ASCII letters, digits and '_', ':', '.', '-', '/', '{{', '}}' (e.g. \"ferry:\")"
)]
pub struct InvalidKeyPrefix(pub String);

/// Settings of a Redis outbox. Every default is what `RedisSettings::default` sets.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Defaults to `ferry:`.
    pub key_prefix: KeyPrefix,
    /// Largest payload `enqueue` accepts. Defaults to 1 MiB.
    pub max_payload_bytes: usize,
    /// Keep published messages this long (in `done:<n>` streams) instead of deleting them
    /// when marked. Defaults to zero: delete at once.
    pub retention: Duration,
    /// Leases are granted outside the store (Redis or etcd leases) and adopted by it:
    /// marks then check the adopted epoch and owner instead of the store's own expiry.
    pub external_leases: bool,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            key_prefix: KeyPrefix::default(),
            max_payload_bytes: 1024 * 1024,
            retention: Duration::ZERO,
            external_leases: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes_exclude_glob_characters() {
        for good in ["ferry:", "{ferry}:", "app.outbox/1-", "_"] {
            assert!(KeyPrefix::new(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a*", "a?", "a[b]", "a\\b", "a b", "é", &"a".repeat(65)] {
            assert!(KeyPrefix::new(bad).is_err(), "{bad:?}");
        }
    }
}
