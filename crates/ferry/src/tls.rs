//! What the TLS connections of every store and sink share: reading the CA file a
//! connection trusts instead of the system's roots (`tls_ca_file`), and recognising a
//! server certificate that failed verification. Such a failure is permanent, unlike a
//! server that is down: retrying does not make a certificate trusted, so callers report it
//! at once, naming the endpoint and the setting that fixes it.

use std::error::Error;
use std::path::Path;
#[cfg(feature = "mqtt")]
use std::sync::Arc;

use ferry_core::ErrorChain;

/// Makes ring this process's rustls crypto provider. With `postgres-capture`,
/// pgwire-replication links aws-lc-rs beside the ring every other client uses, and rustls
/// then cannot pick a provider by itself (it panics at the first TLS connection): a
/// process built with that feature calls this once before it opens any TLS connection
/// (both binaries do at start, in `ferry_cli::runtime::run`). Idempotent.
#[cfg(feature = "postgres-capture")]
pub fn install_ring_provider() {
    // Err only when a provider is installed already, which is what is wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM text of the CA certificates in `path`; the error names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path)
        .map_err(|err| format!("cannot read CA file {}: {err}", path.display()))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(pem)
}

/// A Redis client for `url` whose connections send without Nagle's delay (redis-rs leaves
/// TCP_NODELAY off: a command written while an earlier one is unacknowledged would wait for
/// the server's delayed ACK, BENCHMARKS.md section 20). With `ca_file`, `url` must be
/// `rediss://` and the server's certificate is checked against that CA instead of the
/// webpki roots. The error never holds the URL, which may hold a password.
#[cfg(any(
    feature = "redis-store",
    feature = "redis-lease",
    feature = "redis-stream"
))]
pub fn redis_client(
    url: impl redis::IntoConnectionInfo,
    ca_file: Option<&Path>,
) -> Result<redis::Client, String> {
    let info = url
        .into_connection_info()
        .map_err(|err| format!("invalid Redis url: {err}"))?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let info = info.set_tcp_settings(tcp);
    let Some(ca_file) = ca_file else {
        return redis::Client::open(info).map_err(|err| format!("invalid Redis url: {err}"));
    };
    if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        return Err(
            "a CA file is set but the url is not rediss://: use rediss://host:port for TLS".into(),
        );
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(read_ca_file(ca_file)?),
    };
    redis::Client::build_with_tls(info, certificates)
        .map_err(|err| format!("the Redis TLS settings are not usable: {err}"))
}

/// A rustls client config (ring) that trusts the CA certificates in `ca_file`, or the
/// webpki roots (Mozilla's) when unset.
#[cfg(feature = "mqtt")]
pub fn rustls_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = read_ca_file(path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|err| format!("{}: {err}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|err| format!("{}: {err}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("TLS setup: {err}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether `err` or one of its causes is rustls refusing the server's certificate
/// (unknown issuer, expired, wrong name). Matched on rustls's message, which every driver
/// keeps in its error chain, some only as text.
pub fn is_certificate_failure(err: &(dyn Error + 'static)) -> bool {
    let line = ErrorChain(err).to_string();
    line.contains("invalid peer certificate") || line.contains("certificate verify failed")
}

/// A Redis connection error as a store error: a refused certificate is permanent and
/// named, anything else is mapped by `otherwise`.
#[cfg(any(feature = "redis-store", feature = "redis-lease"))]
pub(crate) fn redis_store_error(
    err: redis::RedisError,
    server: &str,
    setting: &str,
    otherwise: fn(redis::RedisError) -> ferry_core::StoreError,
) -> ferry_core::StoreError {
    if is_certificate_failure(&err) {
        let message = certificate_failure("Redis", server, setting);
        ferry_core::StoreError::Other(format!("{message}: {err}").into())
    } else {
        otherwise(err)
    }
}

/// The message for a refused server certificate of `what` at `endpoint`.
pub fn certificate_failure(what: &str, endpoint: &str, setting: &str) -> String {
    format!(
        "TLS certificate verification failed for {what} at {endpoint}: the server's certificate \
         is not trusted (unknown issuer, or not issued for this host name); set {setting} to the \
         CA certificate that issued it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let err = read_ca_file(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let file = std::env::temp_dir().join(format!("ferry-not-a-ca-{}", std::process::id()));
        std::fs::write(&file, "hello").expect("write");
        let err = read_ca_file(&file).expect_err("not PEM");
        std::fs::remove_file(&file).ok();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn rustls_refusals_are_recognised_through_wrappers() {
        let inner = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        let outer = std::io::Error::other(inner);
        assert!(is_certificate_failure(&outer));
        assert!(!is_certificate_failure(&std::io::Error::other(
            "connection refused"
        )));
    }
}
