//! End-to-end guarantees with real `ferry relay` processes, the real Redis as the outbox
//! and the real NATS JetStream: kill -9 at random points, two relays sharing, a paused
//! zombie relay, a blocked partition, graceful shutdown, bad input. The checker reads the
//! whole stream back and reports, per aggregate, missing versions, duplicate ids and
//! versions out of order.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::scenarios::StoreSink;
use common::sinks::Nats;
use common::{FAST_RELAY, Producer, Scenario, nats_sink_section, outbox_section, unique_tag};
use ferry::NewMessage;
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

impl StoreSink for RedisNats {
    type Sink = Nats;

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

/// `ferry <args>` in `scenario`'s config; fails on a non-zero exit, returns stdout.
fn ferry_ok(scenario: &common::Scenario, args: &[&str]) -> String {
    let output = scenario.ferry(args);
    assert!(
        output.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn ferry_json(scenario: &common::Scenario, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ferry_ok(scenario, args)).unwrap()
}

/// The scenario's stream, created up front refusing messages over 2 KB (the `blob/big`
/// ones, rejected for good until `raise` lifts the limit).
async fn size_limited_stream(tag: &str, raise: bool) {
    let client = async_nats::connect(services::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = async_nats::jetstream::stream::Config {
        name: common::nats_stream(tag),
        subjects: vec![format!("e{tag}.>")],
        duplicate_window: Duration::from_secs(120),
        max_message_size: if raise { -1 } else { 2048 },
        ..Default::default()
    };
    if raise {
        js.update_stream(&config).await.unwrap();
    } else {
        js.create_stream(config).await.unwrap();
    }
}

fn blob(id: &str, bytes: usize) -> NewMessage {
    NewMessage::new("blob", id, "blob.stored", vec![b'x'; bytes])
}

/// The operators' tools on the Redis store, end to end with real processes: a blocked
/// partition's head skipped, the `park-aggregate` policy parking an aggregate while the
/// rest flows and holding what comes after, a requeue that restores the aggregate's order
/// once the broker accepts it, and a replay restoring a lost stream from the kept messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_skip_park_requeue_and_replay_on_the_redis_store() {
    let e2e = RedisNats::new(1, 120, "retention_secs = 3600").await;
    let scenario = e2e.scenario();
    size_limited_stream(&scenario.tag, false).await;
    let outbox = &e2e.outbox;
    let mut produced = HashSet::new();

    // "block": the oversized head blocks the partition until an operator skips it.
    let first = outbox
        .commit(vec![blob("big", 5000), blob("small", 10)])
        .await;
    produced.extend(first.iter().copied());
    produced.extend(e2e.produce(4, 5, 1).await.unwrap());
    let relay = scenario.relay("relay-block");
    scenario.wait_blocked(0, &relay).await;
    let blocked = ferry_json(scenario, &["blocked", "--json"]);
    assert_eq!(blocked[0]["head"]["id"], first[0].to_string(), "{blocked}");
    ferry_ok(
        scenario,
        &[
            "skip",
            "--message",
            &first[0].to_string(),
            "--reason",
            "too large for the stream",
            "--by",
            "ops",
        ],
    );
    scenario.wait_drained(Duration::from_secs(20)).await;
    assert!(relay.terminate(Duration::from_secs(10)).success());

    // "park-aggregate", one message per batch: big v2 is rejected and parked with v3;
    // small v2 flows; big v4, committed afterwards, waits.
    let park = scenario.config_variant(
        "park",
        "[relay]\nbatch_size = 200\n",
        "[relay]\non_permanent_failure = \"park-aggregate\"\nbatch_size = 1\n",
    );
    for message in [blob("big", 5000), blob("big", 10), blob("small", 10)] {
        produced.extend(outbox.commit(vec![message]).await);
    }
    let relay = scenario.relay_with_config("relay-park", &park);
    scenario.wait_drained(Duration::from_secs(20)).await;
    relay
        .wait_for_log("parked it with its aggregate", Duration::from_secs(10))
        .await;
    produced.extend(outbox.commit(vec![blob("big", 10)]).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(scenario.backlog(), 1, "big v4 waits behind the parked ones");
    let parked = ferry_json(
        scenario,
        &[
            "parked",
            "--aggregate-type",
            "blob",
            "--aggregate-id",
            "big",
            "--json",
        ],
    );
    let parked: Vec<(u64, bool)> = parked
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["message"]["version"].as_u64().unwrap(),
                p["holds_aggregate"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(parked, [(1, false), (2, true), (3, true)]);

    // The operator lifts the limit and requeues: big goes out 1, 2, 3, 4.
    size_limited_stream(&scenario.tag, true).await;
    ferry_ok(
        scenario,
        &[
            "requeue-parked",
            "--aggregate-type",
            "blob",
            "--aggregate-id",
            "big",
        ],
    );
    scenario.wait_drained(Duration::from_secs(20)).await;
    assert!(relay.terminate(Duration::from_secs(10)).success());
    assert!(
        ferry_json(scenario, &["parked", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let stream = common::nats_stream(&scenario.tag);
    let received = common::read_nats_stream(&stream).await;
    let big: Vec<u64> = received
        .iter()
        .filter(|m| m.aggregate_id == "big")
        .map(|m| m.version)
        .collect();
    assert_eq!(big, [1, 2, 3, 4]);
    common::Report::of(received, &produced).assert_perfect(produced.len());

    // The broker loses the stream; a replay of the kept messages restores it.
    common::delete_nats_stream(&stream).await;
    let dry_run = ferry_ok(
        scenario,
        &["replay", "--name", "restore", "--all", "--dry-run"],
    );
    assert!(
        dry_run.contains(&format!("{} retained messages selected", produced.len())),
        "{dry_run}"
    );
    let progress = scenario.dir.path().join("restore.json");
    let replay = ferry_ok(
        scenario,
        &[
            "replay",
            "--name",
            "restore",
            "--all",
            "--progress-file",
            progress.to_str().unwrap(),
        ],
    );
    assert!(
        replay.contains(&format!("finished: {} messages sent", produced.len())),
        "{replay}"
    );
    let replayed = common::read_nats_stream(&stream).await;
    common::Report::of(replayed.clone(), &produced).assert_perfect(produced.len());
    assert!(
        replayed
            .iter()
            .all(|m| m.headers.get("ferry-replay").map(String::as_str) == Some("restore"))
    );

    // Cleanup removes the kept messages past its bound; nothing is left to replay.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cleaned = ferry_ok(scenario, &["cleanup", "--published-older-than", "1s"]);
    assert!(
        cleaned.contains(&format!("deleted {} published message(s)", produced.len())),
        "{cleaned}"
    );
    let dry_run = ferry_ok(
        scenario,
        &["replay", "--name", "again", "--all", "--dry-run"],
    );
    assert!(
        dry_run.contains("0 retained messages selected"),
        "{dry_run}"
    );
    e2e.cleanup().await;
}
