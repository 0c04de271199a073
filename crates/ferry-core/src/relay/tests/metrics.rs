//! What the relay records through the `metrics` facade, read back from a debugging
//! recorder installed for the relay alone.

use std::collections::HashMap;
use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use super::{Running, config, enqueue, eventually, start};
use crate::message::Message;
use crate::metric_names::{
    OUTBOX_BACKLOG, OUTBOX_BLOCKED, OUTBOX_OLDEST_UNPUBLISHED_AGE, RELAY_ACK_LATENCY,
    RELAY_BATCH_SIZE, RELAY_LEASES_ACQUIRED, RELAY_LEASES_LOST, RELAY_MARKED,
    RELAY_OWNED_PARTITIONS, RELAY_PUBLISH_FAILURES, RELAY_PUBLISHED,
};
use crate::relay::record_outbox_status;
use crate::store::PartitionStatus;
use crate::testing::{MemoryStore, Outcome, ScriptedSink};

/// Every series, as `name` or `name{label=value,…}`.
fn series(snapshotter: &Snapshotter) -> HashMap<String, DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = if labels.is_empty() {
                key.name().to_owned()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            (name, value)
        })
        .collect()
}

fn counter(series: &HashMap<String, DebugValue>, name: &str) -> u64 {
    match series.get(name) {
        Some(DebugValue::Counter(value)) => *value,
        other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn gauge(series: &HashMap<String, DebugValue>, name: &str) -> f64 {
    match series.get(name) {
        Some(DebugValue::Gauge(value)) => value.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

fn histogram(series: &HashMap<String, DebugValue>, name: &str) -> Vec<f64> {
    match series.get(name) {
        Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

/// A relay whose metrics go to a recorder of its own.
fn start_recorded(
    store: &Arc<MemoryStore>,
    sink: &Arc<ScriptedSink>,
    relay_id: &str,
) -> (Running, Snapshotter) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let relay = metrics::with_local_recorder(&recorder, || start(store, sink, config(relay_id)));
    (relay, snapshotter)
}

#[tokio::test(start_paused = true)]
async fn publishes_marks_batches_and_failures_by_class_are_counted() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let messages: Vec<Message> = (1..=4).map(|i| enqueue(&store, &i.to_string())).collect();
    sink.script(messages[1].id, [Outcome::Transient]);
    sink.script(messages[2].id, [Outcome::Permanent]);
    let (relay, snapshotter) = start_recorded(&store, &sink, "a");
    eventually("every message is published", || {
        messages.iter().all(|m| store.is_published(m.id))
    })
    .await;

    let series = series(&snapshotter);
    assert_eq!(counter(&series, RELAY_PUBLISHED), 4);
    assert_eq!(counter(&series, RELAY_MARKED), 4);
    // Batch 1: one acked, the transient failure and the two not sent after it (transient).
    // Batch 2: one acked, the permanent rejection, the one not sent after it (transient).
    // Batch 3 passes.
    let failures = |class: &str| {
        counter(
            &series,
            &format!("{RELAY_PUBLISH_FAILURES}{{class={class}}}"),
        )
    };
    assert_eq!(failures("transient"), 4);
    assert_eq!(failures("permanent"), 1);
    assert_eq!(failures("fenced"), 0);
    assert_eq!(histogram(&series, RELAY_BATCH_SIZE), [4.0, 3.0, 2.0]);
    let latencies = histogram(&series, RELAY_ACK_LATENCY);
    assert_eq!(latencies.len(), 4, "one per ack: {latencies:?}");
    assert!(latencies.iter().all(|l| *l >= 0.0), "{latencies:?}");
    assert_eq!(counter(&series, RELAY_LEASES_ACQUIRED), 1);
    assert_eq!(counter(&series, RELAY_LEASES_LOST), 0);
    assert_eq!(gauge(&series, RELAY_OWNED_PARTITIONS), 1.0);
    assert_eq!(
        relay
            .stats
            .published
            .load(std::sync::atomic::Ordering::Relaxed),
        4,
        "RelayStats counts alike"
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_fenced_sink_counts_a_fenced_failure_and_a_lost_lease() {
    let store = Arc::new(MemoryStore::new(1));
    let sink = Arc::new(ScriptedSink::new());
    let message = enqueue(&store, "1");
    sink.script(message.id, [Outcome::Fenced]);
    let (relay, snapshotter) = start_recorded(&store, &sink, "a");
    eventually("the message is published under a new lease", || {
        store.is_published(message.id)
    })
    .await;

    let series = series(&snapshotter);
    assert_eq!(
        counter(
            &series,
            &format!("{RELAY_PUBLISH_FAILURES}{{class=fenced}}")
        ),
        1
    );
    assert_eq!(counter(&series, RELAY_LEASES_ACQUIRED), 2);
    relay.stop().await;
}

#[test]
fn the_outbox_status_becomes_per_partition_gauges() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let status = |partition, backlog, age: Option<f64>, blocked: bool| PartitionStatus {
        partition,
        owner: None,
        epoch: 1,
        lease_expires_at: None,
        backlog,
        oldest_unpublished_age_secs: age,
        blocked_reason: blocked.then(|| "rejected".to_owned()),
    };
    metrics::with_local_recorder(&recorder, || {
        record_outbox_status(&[status(0, 0, None, false), status(1, 7, Some(2.5), true)]);
    });

    let series = series(&snapshotter);
    assert_eq!(
        gauge(&series, &format!("{OUTBOX_BACKLOG}{{partition=0}}")),
        0.0
    );
    assert_eq!(
        gauge(&series, &format!("{OUTBOX_BACKLOG}{{partition=1}}")),
        7.0
    );
    assert_eq!(
        gauge(
            &series,
            &format!("{OUTBOX_OLDEST_UNPUBLISHED_AGE}{{partition=0}}")
        ),
        0.0
    );
    assert_eq!(
        gauge(
            &series,
            &format!("{OUTBOX_OLDEST_UNPUBLISHED_AGE}{{partition=1}}")
        ),
        2.5
    );
    assert_eq!(
        gauge(&series, &format!("{OUTBOX_BLOCKED}{{partition=0}}")),
        0.0
    );
    assert_eq!(
        gauge(&series, &format!("{OUTBOX_BLOCKED}{{partition=1}}")),
        1.0
    );
}
