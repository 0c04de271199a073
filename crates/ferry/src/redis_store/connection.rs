//! Connecting to Redis, refusing servers older than 7.0.

use std::time::Duration;

use ::redis::Client;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use ferry_core::StoreError;

use super::error::store_error;

/// Opens a connection manager (one multiplexed connection, re-established after errors)
/// with `client`. Fails at once, naming the cause, if the server cannot be reached, refuses
/// the credentials or its TLS certificate, or is older than Redis 7.0.
pub async fn connect(client: Client) -> Result<(Client, ConnectionManager), StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let mut conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|err| {
            let server = client.get_connection_info().addr().to_string();
            crate::tls::redis_store_error(err, &server, "store.tls_ca_file", store_error)
        })?;
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(store_error)?;
    check_server_version(&info)?;
    Ok((client, conn))
}

/// Refuses servers whose `redis_version` is below 7.0 (Valkey reports a compatible one).
fn check_server_version(info: &str) -> Result<(), StoreError> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major >= 7 {
        Ok(())
    } else {
        Err(StoreError::Other(
            format!("Redis {version} is too old: ferry's scripts need Redis 7.0 or later").into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_before_7_are_refused_by_name() {
        assert!(check_server_version("# Server\r\nredis_version:7.0.15\r\n").is_ok());
        let err = check_server_version("redis_version:6.2.14\r\n").expect_err("too old");
        assert!(err.to_string().contains("6.2.14"), "{err}");
    }
}
