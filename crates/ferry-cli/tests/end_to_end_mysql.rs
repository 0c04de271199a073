//! End-to-end guarantees with real `ferry relay` processes, the real MariaDB (or MySQL) and
//! the real NATS JetStream: the scenarios every store runs (kill -9 at random points, two
//! relays sharing the partitions, a paused zombie relay, SIGTERM, a blocked partition) and
//! an unreachable database. MySQL has no notifications, so every wake-up here is a poll.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::scenarios::StoreSink;
use common::sinks::Nats;
use common::{FAST_RELAY, Producer, Scenario, nats_sink_section, outbox_section, unique_tag};
use ferry::mysql::MyOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry_core::testing::services;

/// A MySQL outbox relayed to a NATS stream, both named after the scenario's tag.
struct MyNats {
    scenario: Scenario,
    outbox: MyOutbox,
}

impl StoreSink for MyNats {
    type Sink = Nats;

    async fn new(partitions: u32, duplicate_window_secs: u64, extra_outbox: &str) -> Self {
        let tag = unique_tag();
        let scenario = Scenario::new(
            &tag,
            &[
                &format!(
                    "[store]\ntype = \"mysql\"\nurl = \"{}\"\n",
                    services::mysql_url()
                ),
                &outbox_section(&tag, partitions, extra_outbox),
                &nats_sink_section(&tag, duplicate_window_secs),
                FAST_RELAY,
            ],
        );
        let settings = StoreSettings {
            table_prefix: TablePrefix::new(format!("e{tag}_")).unwrap(),
            max_payload_bytes: 4 * 1024 * 1024,
            ..StoreSettings::default()
        };
        let outbox = MyOutbox::connect(&services::mysql_url(), 6, settings)
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
}

common::scenarios::scenario_tests!(MyNats);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_waits_for_an_unreachable_mysql_and_stops_on_sigterm() {
    let e2e = MyNats::new(2, 120, "").await;
    let config = e2e
        .scenario()
        .config_variant("unreachable", "127.0.0.1:3306", "127.0.0.1:1");
    let relay = e2e.scenario().relay_with_config("unreachable", &config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = relay.logs();
    assert!(
        logs.contains("cannot reach MySQL at 127.0.0.1:1") && logs.contains("not ready"),
        "{logs}"
    );
    assert!(relay.terminate(Duration::from_secs(10)).success());

    let config =
        e2e.scenario()
            .config_variant("wrong-password", "mysql://root@", "mysql://root:wrong@");
    let output = std::process::Command::new(common::ferry_bin())
        .args(["relay", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "wrong credentials are not waited out"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("check the user and password"), "{stderr}");
    e2e.cleanup().await;
}
