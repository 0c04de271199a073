//! End-to-end guarantees with real `ferry relay` processes, the real Redis as the outbox
//! and the real NATS JetStream: kill -9 at random points, two relays sharing, a paused
//! zombie relay, a blocked partition, graceful shutdown, bad input. The checker reads the
//! whole stream back and reports, per aggregate, missing versions, duplicate ids and
//! versions out of order.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::scenarios::StoreNats;
use common::{FAST_RELAY, Producer, Scenario, nats_sink_section, outbox_section, unique_tag};
use ferry::redis_store::{KeyPrefix, RedisOutbox, RedisSettings};
use ferry_core::testing::services;

fn key_prefix(tag: &str) -> String {
    format!("e{tag}:")
}

/// `[store]` for the test Redis, with the scenario's own key prefix.
fn redis_store_section(tag: &str) -> String {
    format!(
        "[store]\ntype = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{}\"\n",
        services::redis_url(),
        key_prefix(tag)
    )
}

/// A Redis outbox relayed to a NATS stream, both named after the scenario's tag.
struct RedisNats {
    scenario: Scenario,
    outbox: RedisOutbox,
}

impl StoreNats for RedisNats {
    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let scenario = Scenario::new(
            &tag,
            &[
                &redis_store_section(&tag),
                &outbox_section(&tag, partitions, extra_outbox),
                &nats_sink_section(&tag, duplicate_window_secs),
                FAST_RELAY,
            ],
        );
        let settings = RedisSettings {
            key_prefix: KeyPrefix::new(key_prefix(&tag)).unwrap(),
            max_payload_bytes: 4 * 1024 * 1024,
            ..RedisSettings::default()
        };
        let outbox = RedisOutbox::connect(&services::redis_url(), settings)
            .await
            .unwrap();
        Self { scenario, outbox }
    }

    fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    fn outbox(&self) -> &impl Producer {
        &self.outbox
    }

    async fn remove_outbox(&self) {
        self.outbox.remove().await.unwrap();
    }
}

common::scenarios::scenario_tests!(RedisNats);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_redis_settings_get_clear_errors() {
    let e2e = RedisNats::new(2, 120, "").await;
    let scenario = e2e.scenario();
    let stderr_of = |output: std::process::Output| {
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let run = |name: &str, from: &str, to: &str, command: &str| {
        let config = scenario.config_variant(name, from, to);
        stderr_of(
            std::process::Command::new(common::ferry_bin())
                .args([command, "--config"])
                .arg(&config)
                .output()
                .unwrap(),
        )
    };
    let prefix = key_prefix(&scenario.tag);

    // A different partition count than the outbox was created with.
    let err = run("eight", "partitions = 2", "partitions = 8", "migrate");
    assert!(err.contains("created with 2 partitions"), "{err}");

    // An outbox never migrated: status and relay point at `ferry migrate`.
    let fresh = format!("n{}:", unique_tag());
    let err = run("fresh", &prefix, &fresh, "status");
    assert!(
        err.contains("no ferry outbox") && err.contains("ferry migrate"),
        "{err}"
    );
    let err = run("fresh", &prefix, &fresh, "relay");
    assert!(err.contains("ferry migrate"), "{err}");

    // Wrong credentials, a bad url, a bad prefix.
    let url = services::redis_url();
    let err = run(
        "auth",
        &url,
        &url.replace("redis://", "redis://nobody:s3cr3t-pw@"),
        "migrate",
    );
    assert!(
        err.contains("Redis") && err.contains("credentials"),
        "{err}"
    );
    assert!(
        !err.contains("s3cr3t"),
        "the password must not be printed: {err}"
    );
    let err = run("url", &url, "http://127.0.0.1:6379", "migrate");
    assert!(err.contains("invalid Redis url"), "{err}");
    let err = run("prefix", &prefix, "bad prefix*", "migrate");
    assert!(err.contains("store.key_prefix"), "{err}");

    // An unreachable Redis is an outage: the relay waits, saying so, and stops on SIGTERM.
    let config = scenario.config_variant("down", &url, "redis://127.0.0.1:1");
    let relay = scenario.relay_with_config("down", &config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = relay.logs();
    assert!(
        logs.contains("Redis") && logs.contains("not ready"),
        "{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(10)).success());
    e2e.cleanup().await;
}
