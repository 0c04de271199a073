//! Small runs of the real `ferry-bench` binary against the real services: each fails on
//! any consistency defect the bench reports (missing, duplicate, out-of-order, unexpected
//! or undecodable messages), never on time. The bench makes tables, streams and files of
//! its own (`bench_<random>_…`) and removes them afterwards.

use std::path::Path;
use std::process::Command;

use ferry_core::testing::services;

/// Messages per run: enough for many batches on every partition, little enough to stay
/// within a few seconds of test time.
const MESSAGES: &str = "20000";

/// Runs the bench on `config` with `extra` flags; asserts that it succeeded and printed
/// `checks` check lines, each with no defect. Returns its output.
fn bench(dir: &Path, config: &str, extra: &[&str], checks: usize) -> String {
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).expect("write the config");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .arg("--config")
        .arg(&path)
        .args([
            "--messages",
            MESSAGES,
            "--aggregates",
            "500",
            "--per-tx",
            "500",
        ])
        .args(extra)
        .env("FERRY_LOG", "warn")
        .output()
        .expect("run ferry-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ferry-bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("check: received"))
        .collect();
    assert_eq!(lines.len(), checks, "check lines:\n{stdout}");
    for line in lines {
        assert_eq!(
            defects(line),
            Vec::<(String, u64)>::new(),
            "{line}\n{stdout}"
        );
        assert!(line.contains(&format!("distinct {MESSAGES},")), "{line}");
    }
    stdout
}

/// The non-zero defect counts of a check line (`check: received N, distinct N, missing
/// 0, duplicates 0, …`).
fn defects(line: &str) -> Vec<(String, u64)> {
    let counts = line.trim_start_matches("check:").split(',').map(|part| {
        let part = part.trim();
        let (name, count) = part.rsplit_once(' ').expect("`<name> <count>`");
        (name.to_owned(), count.parse::<u64>().expect("a count"))
    });
    let wanted = [
        "missing",
        "duplicates",
        "out of order",
        "unexpected",
        "undecodable",
    ];
    let counts: Vec<(String, u64)> = counts.collect();
    for name in wanted {
        assert!(
            counts.iter().any(|(n, _)| n == name),
            "no {name} count in {line}"
        );
    }
    counts
        .into_iter()
        .filter(|(name, count)| wanted.contains(&name.as_str()) && *count > 0)
        .collect()
}

#[test]
fn sqlite_to_file_drain_is_consistent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[store]\ntype = \"sqlite\"\npath = \"{db}\"\n\
         [outbox]\npartitions = 8\n\
         [sink]\ntype = \"file\"\npath = \"{events}\"\n",
        db = dir.path().join("outbox.db").display(),
        events = dir.path().join("events.jsonl").display(),
    );
    let stdout = bench(dir.path(), &config, &["--relay-alone"], 1);
    assert!(
        stdout.contains("relay drained (relay start -> all "),
        "{stdout}"
    );
    // SQLite is embedded: its work is the bench process's.
    for part in [
        "cpu during the drain (",
        "  this process (the relays): ",
        "  box idle: ",
    ] {
        assert!(stdout.contains(part), "no {part:?} line:\n{stdout}");
    }
}

/// Runs the bench in `dir` with `args`; asserts that it failed, and returns what it said.
fn refused(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run ferry-bench");
    assert!(!output.status.success(), "ferry-bench {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn relay_alone_is_refused_for_mqtt() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("bench.toml"),
        "[store]\ntype = \"sqlite\"\npath = \"unused.db\"\n\
         [sink]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1883\"\n",
    )
    .expect("write the config");
    let stderr = refused(dir.path(), &["--config", "bench.toml", "--relay-alone"]);
    assert!(
        stderr.contains("--relay-alone cannot check an MQTT drain"),
        "{stderr}"
    );
}

#[test]
fn relay_alone_is_refused_in_live_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["--config", "unread.toml", "--mode", "live", "--relay-alone"];
    let stderr = refused(dir.path(), &args);
    assert!(
        stderr.contains("--relay-alone measures a drain"),
        "{stderr}"
    );
}

#[test]
fn a_live_run_times_every_message_to_the_ack_and_to_the_consumer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[store]\ntype = \"sqlite\"\npath = \"{db}\"\n\
         [outbox]\npartitions = 4\n\
         [sink]\ntype = \"file\"\npath = \"{events}\"\n",
        db = dir.path().join("outbox.db").display(),
        events = dir.path().join("events.jsonl").display(),
    );
    // Below what SQLite commits here (~1,800 msg/s in 500-message transactions, in CI):
    // producers that saturate its one writer starve the relay's lease renewals (SQLite's
    // busy handler is not fair), the relay loses its leases, and the file sink, which has
    // no de-duplication, gets the unmarked batches again.
    let stdout = bench(
        dir.path(),
        &config,
        &["--mode", "live", "--rate", "1000"],
        1,
    );
    for what in ["commit -> broker ack (the relay's)", "commit -> consume"] {
        assert!(
            stdout.contains(&format!("latency {what} (n={MESSAGES}): p50 ")),
            "no {what} latency over every message:\n{stdout}"
        );
    }
}

#[test]
fn postgres_to_nats_drain_and_baseline_are_consistent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[store]\ntype = \"postgres\"\nurl = \"{pg}\"\n\
         [outbox]\npartitions = 8\n\
         [sink]\ntype = \"nats\"\nurl = \"{nats}\"\nstream = \"BENCHTEST\"\n",
        pg = services::postgres_url(),
        nats = services::nats_url(),
    );
    let stdout = bench(dir.path(), &config, &["--baseline"], 2);
    assert!(stdout.contains("ratio: ferry "), "{stdout}");
    assert!(stdout.contains("  this process (the relays): "), "{stdout}");
}

#[test]
fn a_check_line_with_a_defect_is_caught() {
    let line = "check: received 5, distinct 4, missing 1, duplicates 1, out of order 0, \
                unexpected 0, undecodable 0";
    assert_eq!(
        defects(line),
        [("missing".to_owned(), 1), ("duplicates".to_owned(), 1)]
    );
}
