//! Where the services of the integration tests are: each address from its `FERRY_TEST_*`
//! environment variable, or the local default that `.env.example` lists and
//! `scripts/test.sh` uses. Every test crate reads its addresses here, so a variable means
//! the same in each.

use std::path::PathBuf;

/// PostgreSQL: `FERRY_TEST_PG_URL`.
pub fn postgres_url() -> String {
    var_or(
        "FERRY_TEST_PG_URL",
        "postgres://postgres@127.0.0.1:5432/ferry_test",
    )
}

/// PostgreSQL with `wal_level = logical`, for log capture: `FERRY_TEST_PG_LOGICAL_URL`
/// (the second cluster of `scripts/services.sh`).
pub fn postgres_logical_url() -> String {
    var_or(
        "FERRY_TEST_PG_LOGICAL_URL",
        "postgres://postgres@127.0.0.1:5434/ferry_test",
    )
}

/// MySQL or MariaDB: `FERRY_TEST_MYSQL_URL`.
pub fn mysql_url() -> String {
    var_or(
        "FERRY_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/ferry_test",
    )
}

/// MariaDB with a row-format binary log, for log-based capture:
/// `FERRY_TEST_MYSQL_BINLOG_URL`.
pub fn mysql_binlog_url() -> String {
    var_or(
        "FERRY_TEST_MYSQL_BINLOG_URL",
        "mysql://root@127.0.0.1:3308/ferry_test",
    )
}

/// MariaDB with TLS and a row-format binary log (`FERRY_TEST_MYSQL_BINLOG_TLS_URL`), its
/// certificate checked against `ca_file`.
pub fn mysql_binlog_tls_url(ca_file: &std::path::Path) -> String {
    with_tls_params(
        &var_or(
            "FERRY_TEST_MYSQL_BINLOG_TLS_URL",
            "mysql://root@127.0.0.1:3309/ferry_test",
        ),
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file.display()),
    )
}

/// NATS with JetStream: `FERRY_TEST_NATS_URL`.
pub fn nats_url() -> String {
    var_or("FERRY_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

/// Redis: `FERRY_TEST_REDIS_URL`.
pub fn redis_url() -> String {
    var_or("FERRY_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// RabbitMQ: `FERRY_TEST_AMQP_URL`.
pub fn amqp_url() -> String {
    var_or(
        "FERRY_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

/// An MQTT 5 broker: `FERRY_TEST_MQTT_URL`.
pub fn mqtt_url() -> String {
    var_or("FERRY_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
}

/// etcd v3: `FERRY_TEST_ETCD_URL`.
pub fn etcd_url() -> String {
    var_or("FERRY_TEST_ETCD_URL", "http://127.0.0.1:23790")
}

/// Kafka-protocol brokers for the record mapping (Tansu): `FERRY_TEST_KAFKA_BROKERS`.
pub fn kafka_brokers() -> String {
    var_or("FERRY_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// Kafka-protocol brokers with transactions and fencing (noida-db):
/// `FERRY_TEST_KAFKA_TXN_BROKERS`.
pub fn kafka_txn_brokers() -> String {
    var_or("FERRY_TEST_KAFKA_TXN_BROKERS", "127.0.0.1:9192")
}

/// A Kafka-protocol broker reached over TLS only (the test certificate):
/// `FERRY_TEST_KAFKA_TLS_BROKERS`.
pub fn kafka_tls_brokers() -> String {
    var_or("FERRY_TEST_KAFKA_TLS_BROKERS", "127.0.0.1:9093")
}

/// The noida-db executable, for tests that start a broker of their own:
/// `FERRY_TEST_NOIDA_DB`.
pub fn noida_db() -> PathBuf {
    var_or("FERRY_TEST_NOIDA_DB", "/opt/ferry-venv/bin/noida-db").into()
}

/// A Python with nats-py and psycopg, for the Python consumer example:
/// `FERRY_TEST_PYTHON`.
pub fn python() -> PathBuf {
    var_or("FERRY_TEST_PYTHON", "/opt/ferry-venv/bin/python").into()
}

/// The directory of the throwaway TLS files that `scripts/tls-certs.sh` makes
/// (`ca.pem`, `server.pem`, `server.key`, `wrong-ca.pem`): `FERRY_TEST_TLS_DIR`.
pub fn tls_dir() -> PathBuf {
    var_or("FERRY_TEST_TLS_DIR", "/var/lib/ferry-tls").into()
}

/// The test CA, which issued every TLS endpoint's certificate.
pub fn tls_ca_file() -> PathBuf {
    tls_dir().join("ca.pem")
}

/// A CA that issued none of them, for the tests that a server is then refused.
pub fn tls_wrong_ca_file() -> PathBuf {
    tls_dir().join("wrong-ca.pem")
}

/// PostgreSQL over TLS with the certificate checked: [`postgres_url`] with
/// `sslmode=verify-full` and `sslrootcert=<ca>` (the server has TLS on its usual port).
pub fn postgres_tls_url(ca_file: &std::path::Path) -> String {
    with_tls_params(
        &postgres_url(),
        &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
    )
}

/// MySQL or MariaDB over TLS with the certificate checked: `FERRY_TEST_MYSQL_TLS_URL`
/// (a second server with TLS, see `scripts/services.sh`) with `ssl-mode=VERIFY_IDENTITY`
/// and `ssl-ca=<ca>`.
pub fn mysql_tls_url(ca_file: &std::path::Path) -> String {
    with_tls_params(
        &var_or(
            "FERRY_TEST_MYSQL_TLS_URL",
            "mysql://root@127.0.0.1:3307/ferry_test",
        ),
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file.display()),
    )
}

/// Redis with TLS only: `FERRY_TEST_REDIS_TLS_URL`.
pub fn redis_tls_url() -> String {
    var_or("FERRY_TEST_REDIS_TLS_URL", "rediss://127.0.0.1:6380")
}

/// NATS with JetStream and TLS required: `FERRY_TEST_NATS_TLS_URL`.
pub fn nats_tls_url() -> String {
    var_or("FERRY_TEST_NATS_TLS_URL", "tls://127.0.0.1:4223")
}

/// RabbitMQ's AMQPS listener: `FERRY_TEST_AMQP_TLS_URL`.
pub fn amqp_tls_url() -> String {
    var_or(
        "FERRY_TEST_AMQP_TLS_URL",
        "amqps://guest:guest@127.0.0.1:5671/%2f",
    )
}

/// An MQTT 5 broker over TLS: `FERRY_TEST_MQTT_TLS_URL`.
pub fn mqtt_tls_url() -> String {
    var_or("FERRY_TEST_MQTT_TLS_URL", "mqtts://127.0.0.1:8883")
}

/// etcd v3 over https: `FERRY_TEST_ETCD_TLS_URL`.
pub fn etcd_tls_url() -> String {
    var_or("FERRY_TEST_ETCD_TLS_URL", "https://127.0.0.1:23791")
}

fn with_tls_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

fn var_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}
