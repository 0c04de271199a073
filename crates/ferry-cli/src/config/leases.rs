//! `[leases]`: where partition leases live.

use std::path::PathBuf;

use anyhow::bail;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Where partition leases live. Leases outside the store are adopted by it, and the
/// store keeps refusing marks made under older epochs (fencing).
#[derive(Debug, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LeasesConfig {
    /// In the outbox store's own lease table. The default.
    #[default]
    Store,
    /// In Redis: `SET NX PX` ownership keys, epochs from `INCR`.
    Redis {
        /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS); a secret, never
        /// logged.
        url: SecretString,
        /// With `rediss://`: a PEM file of the CA that issued the server's certificate,
        /// trusted instead of the public roots.
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
        /// Prefix of every lease key, one per outbox. Defaults to `ferry:`.
        #[serde(default = "default_redis_key_prefix")]
        key_prefix: String,
    },
    /// In etcd v3: a lease with keep-alive per partition; revisions are the epochs.
    Etcd {
        /// `http://host:port` (`https://` for TLS) of one or more cluster members.
        endpoints: Vec<String>,
        /// With `https://` endpoints: a PEM file of the CA that issued the members'
        /// certificates, trusted instead of the public roots.
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
        /// Prefix of every lease key, one per outbox. Defaults to `ferry/`.
        #[serde(default = "default_etcd_key_prefix")]
        key_prefix: String,
        /// For clusters with authentication on; with `password`.
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<SecretString>,
    },
}

fn default_redis_key_prefix() -> String {
    "ferry:".into()
}

fn default_etcd_key_prefix() -> String {
    "ferry/".into()
}

impl LeasesConfig {
    pub fn is_external(&self) -> bool {
        !matches!(self, Self::Store)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let key_prefix = match self {
            Self::Store => return Ok(()),
            Self::Redis {
                url,
                tls_ca_file,
                key_prefix,
            } => {
                let url = url.expose_secret();
                if tls_ca_file.is_some() && !url.starts_with("rediss://") {
                    bail!(
                        "leases.tls_ca_file is set but leases.url is not rediss://: use rediss://host:port for TLS"
                    );
                }
                if !["redis://", "rediss://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme))
                {
                    bail!(
                        "leases.url must start with redis:// (rediss:// for TLS, unix:// for a socket), e.g. redis://127.0.0.1:6379"
                    );
                }
                key_prefix
            }
            Self::Etcd {
                endpoints,
                tls_ca_file,
                key_prefix,
                username,
                password,
            } => {
                if endpoints.is_empty() {
                    bail!(
                        "leases.endpoints is empty: list the etcd members, e.g. [\"http://127.0.0.1:2379\"]"
                    );
                }
                if let Some(bad) = endpoints.iter().find(|e| {
                    let rest = e
                        .strip_prefix("http://")
                        .or_else(|| e.strip_prefix("https://"))
                        .unwrap_or_default();
                    rest.is_empty() || rest.contains(char::is_whitespace)
                }) {
                    bail!(
                        "leases.endpoints: {bad:?} is not an http://host:port (or https://host:port) address"
                    );
                }
                if tls_ca_file.is_some() && !endpoints.iter().all(|e| e.starts_with("https://")) {
                    bail!(
                        "leases.tls_ca_file is set but not every leases.endpoints entry is https://"
                    );
                }
                if username.is_some() != password.is_some() {
                    bail!("leases.username and leases.password go together: set both or neither");
                }
                key_prefix
            }
        };
        if key_prefix.is_empty() || key_prefix.contains(char::is_whitespace) {
            bail!(
                "leases.key_prefix = {key_prefix:?} must be non-empty without spaces, one per outbox (e.g. \"ferry:orders:\")"
            );
        }
        Ok(())
    }
}
