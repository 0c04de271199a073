//! `ferry replay` end to end, with real processes, the real PostgreSQL and NATS JetStream:
//! a lost stream restored in order, a consumer restored from a backup catching up through
//! its inbox, an interrupted replay resumed, a replay to a second target by aggregate.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

use common::{
    PgScenario, Report, delete_nats_stream, ferry_bin, nats_sink_section, nats_stream,
    read_nats_stream, unique_tag,
};
use ferry::ReceivedMessage;
use ferry::postgres::PgInbox;
use ferry::sql::TablePrefix;

/// `ferry replay --config <scenario> <args>` to completion.
fn replay(scenario: &PgScenario, args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .arg("replay")
        .arg("--config")
        .arg(&scenario.scenario.config)
        .args(args)
        .current_dir(scenario.scenario.dir.path())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Applies `messages` through a PostgreSQL inbox of consumer `consumer`; returns how many
/// it applied and how many it dropped as already applied, and checks that every applied
/// version follows the aggregate's last one (no gap, no reordering).
async fn consume(
    scenario: &PgScenario,
    consumer: &str,
    messages: &[ReceivedMessage],
) -> (usize, usize) {
    let prefix = TablePrefix::new(format!("e{}_", scenario.scenario.tag)).unwrap();
    let inbox = PgInbox::new(consumer, &prefix);
    let (mut applied, mut dropped) = (0, 0);
    for message in messages {
        let mut tx = scenario.outbox.pool().begin().await.unwrap();
        let processed = inbox
            .process(&mut tx, message, async |_, _| {
                Ok::<(), ferry::StoreError>(())
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
        match processed {
            ferry::Processed::Applied {
                previous_version, ..
            } => {
                assert_eq!(previous_version + 1, message.version, "{message:?}");
                applied += 1;
            }
            _ => dropped += 1,
        }
    }
    (applied, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_restores_a_lost_stream_in_order_and_a_restored_consumer_catches_up() {
    let tag = unique_tag();
    let e2e = PgScenario::new(
        &tag,
        4,
        &nats_sink_section(&tag, 120),
        "retention_secs = 3600",
    )
    .await;
    let produced = e2e.produce(20, 25, 2).await.unwrap();
    let relay = e2e.scenario.relay("relay");
    e2e.scenario.wait_drained(Duration::from_secs(60)).await;
    assert!(relay.terminate(Duration::from_secs(10)).success());
    let stream = nats_stream(&tag);
    let original = read_nats_stream(&stream).await;
    Report::of(original.clone(), &produced).assert_perfect(500);

    // A consumer whose database came back from a backup: it holds the effects of the
    // first 200 messages only.
    let (applied, _) = consume(&e2e, "restored", &original[..200]).await;
    assert_eq!(applied, 200);

    let refused = replay(&e2e, &["--name", "restore"]);
    assert!(!refused.status.success());
    assert!(
        stdout(&refused).contains("choose what to replay"),
        "{}",
        stdout(&refused)
    );
    let dry_run = replay(&e2e, &["--name", "restore", "--all", "--dry-run"]);
    assert!(dry_run.status.success(), "{}", stdout(&dry_run));
    assert!(
        stdout(&dry_run).contains("500 retained messages selected"),
        "{}",
        stdout(&dry_run)
    );

    // The broker loses the stream; a replay interrupted by Ctrl-C, then resumed.
    delete_nats_stream(&stream).await;
    let progress = e2e.scenario.dir.path().join("restore.json");
    let interrupted = interrupt_replay(&e2e, &progress);
    assert!(interrupted.status.success(), "{}", stdout(&interrupted));
    assert!(
        stdout(&interrupted).contains("stopped after sequence"),
        "{}",
        stdout(&interrupted)
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress).unwrap()).unwrap();
    let sent = saved["checkpoint"]["sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 500, "{saved}");

    let resumed = replay(
        &e2e,
        &[
            "--name",
            "restore",
            "--all",
            "--progress-file",
            progress.to_str().unwrap(),
        ],
    );
    assert!(resumed.status.success(), "{}", stdout(&resumed));
    let text = stdout(&resumed);
    assert!(text.contains("resuming replay"), "{text}");
    assert!(text.contains("finished: 500 messages sent"), "{text}");

    let replayed = read_nats_stream(&stream).await;
    Report::of(replayed.clone(), &produced).assert_perfect(500);
    let original_ids: Vec<Uuid> = original.iter().map(|m| m.id).collect();
    let mut replayed_ids: Vec<Uuid> = replayed.iter().map(|m| m.id).collect();
    replayed_ids.sort();
    let mut sorted = original_ids.clone();
    sorted.sort();
    assert_eq!(replayed_ids, sorted, "the same message ids come back");
    assert!(
        replayed
            .iter()
            .all(|m| m.headers.get("ferry-replay").map(String::as_str) == Some("restore")),
        "replayed messages say so"
    );

    let (applied, dropped) = consume(&e2e, "restored", &replayed).await;
    assert_eq!(
        (applied, dropped),
        (300, 200),
        "the inbox drops what it had and applies what it lost, in order"
    );

    let again = replay(
        &e2e,
        &[
            "--name",
            "restore",
            "--all",
            "--progress-file",
            progress.to_str().unwrap(),
        ],
    );
    assert!(!again.status.success());
    assert!(
        stdout(&again).contains("already finished"),
        "{}",
        stdout(&again)
    );

    replay_one_aggregate_elsewhere(&e2e, &produced).await;
    delete_nats_stream(&stream).await;
}

/// Starts a slow replay of everything and interrupts it with SIGINT after its first pages.
fn interrupt_replay(e2e: &PgScenario, progress: &Path) -> Output {
    let child = Command::new(ferry_bin())
        .args(["replay", "--config"])
        .arg(&e2e.scenario.config)
        .args([
            "--name", "restore", "--all", "--rate", "200", "--batch", "20",
        ])
        .arg("--progress-file")
        .arg(progress)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !progress.exists() {
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    child.wait_with_output().unwrap()
}

/// One aggregate's history, replayed into a second stream named by `--sink-config`.
async fn replay_one_aggregate_elsewhere(e2e: &PgScenario, produced: &HashSet<Uuid>) {
    let other = unique_tag();
    let sink_config = e2e.scenario.dir.path().join("other-sink.toml");
    std::fs::write(&sink_config, nats_sink_section(&other, 120)).unwrap();
    let output = replay(
        e2e,
        &[
            "--name",
            "account-7",
            "--aggregate-type",
            "account",
            "--aggregate-id",
            "7",
            "--sink-config",
            sink_config.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stdout(&output));
    let received = read_nats_stream(&nats_stream(&other)).await;
    assert!(received.iter().all(|m| m.aggregate_id == "7"));
    assert!(received.iter().all(|m| produced.contains(&m.id)));
    let versions: Vec<u64> = received.iter().map(|m| m.version).collect();
    assert_eq!(versions, (1..=25).collect::<Vec<_>>());
    delete_nats_stream(&nats_stream(&other)).await;
}
