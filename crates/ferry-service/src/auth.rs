//! Bearer tokens with scopes. Tokens are kept only as SHA-256 digests and compared in
//! constant time against every configured one, so neither a token nor how much of it
//! matched leaks through memory dumps, logs or timing.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Prepare, confirm, cancel and read messages.
    Producer,
    /// Acknowledge and read messages.
    Consumer,
    /// Everything: list, retry, and what producers and consumers may do.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Producer => "producer",
            Scope::Consumer => "consumer",
            Scope::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name.
    pub name: String,
    scopes: Vec<Scope>,
}

impl Principal {
    /// Whether the caller holds any of `allowed` (admin holds every scope).
    pub fn may(&self, allowed: &[Scope]) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == Scope::Admin || allowed.contains(s))
    }
}

struct Entry {
    digest: [u8; 32],
    principal: Principal,
}

/// The configured tokens.
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.principal.name))
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    /// `(name, token, scopes)` per token.
    pub fn new(tokens: impl IntoIterator<Item = (String, SecretString, Vec<Scope>)>) -> Self {
        Self {
            entries: tokens
                .into_iter()
                .map(|(name, token, scopes)| Entry {
                    digest: digest(token.expose_secret().as_bytes()),
                    principal: Principal { name, scopes },
                })
                .collect(),
        }
    }

    /// The caller holding `presented`, if any. Every entry is compared, whichever matches.
    pub fn authenticate(&self, presented: &str) -> Option<&Principal> {
        let presented = digest(presented.as_bytes());
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(&entry.principal);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new([
            (
                "orders".to_owned(),
                SecretString::from("producer-token-0123456789"),
                vec![Scope::Producer],
            ),
            (
                "ops".to_owned(),
                SecretString::from("admin-token-0123456789"),
                vec![Scope::Admin],
            ),
        ])
    }

    #[test]
    fn authenticates_by_exact_token_only() {
        let tokens = tokens();
        assert_eq!(
            tokens
                .authenticate("producer-token-0123456789")
                .map(|p| p.name.as_str()),
            Some("orders")
        );
        assert!(tokens.authenticate("producer-token-012345678").is_none());
        assert!(tokens.authenticate("").is_none());
    }

    #[test]
    fn admin_may_everything_others_their_scope() {
        let tokens = tokens();
        let producer = tokens
            .authenticate("producer-token-0123456789")
            .expect("known");
        assert!(producer.may(&[Scope::Producer]));
        assert!(!producer.may(&[Scope::Consumer]));
        assert!(!producer.may(&[Scope::Admin]));
        let admin = tokens
            .authenticate("admin-token-0123456789")
            .expect("known");
        assert!(admin.may(&[Scope::Consumer]));
        assert!(!format!("{tokens:?}").contains("token-0123"));
    }
}
