//! The brokers a scenario can relay to, as its tests see them: the `[sink]` section, what a
//! consumer reads back, and what is removed after the test. A scenario generic over
//! [`TestSink`] runs unchanged against each.

use ferry::ReceivedMessage;

use super::{delete_nats_stream, nats_sink_section, nats_stream, read_nats_stream};

/// A broker the scenario named `tag` relays to, into a stream or topic of its own.
#[allow(async_fn_in_trait)]
pub trait TestSink {
    /// The `[sink]` section. `duplicate_window_secs` is the broker's de-duplication window
    /// where it has one (NATS); a sink without one ignores it.
    fn section(tag: &str, duplicate_window_secs: u64) -> String;

    /// Every message the scenario's stream or topic holds, in the order a consumer gets
    /// them (per key, the order published).
    async fn read(tag: &str) -> Vec<ReceivedMessage>;

    /// Removes the scenario's stream or topic, where the test can.
    async fn remove(tag: &str);
}

/// The test NATS JetStream: stream `E2E_<tag>`, subjects `e<tag>.>`.
pub struct Nats;

impl TestSink for Nats {
    fn section(tag: &str, duplicate_window_secs: u64) -> String {
        nats_sink_section(tag, duplicate_window_secs)
    }

    async fn read(tag: &str) -> Vec<ReceivedMessage> {
        read_nats_stream(&nats_stream(tag)).await
    }

    async fn remove(tag: &str) {
        delete_nats_stream(&nats_stream(tag)).await;
    }
}

/// The transactional Kafka (noida-db, `FERRY_TEST_KAFKA_TXN_BROKERS`), read in
/// read_committed: a topic must hold every message exactly once. Every message of the
/// scenario goes to the one topic `e<tag>`, whatever its aggregate type, so that the
/// reader needs no list of topics; the record key is the partition key, so one key's
/// messages stay in one Kafka partition, in order.
#[cfg(feature = "kafka")]
pub struct Kafka;

#[cfg(feature = "kafka")]
impl Kafka {
    fn topic(tag: &str) -> String {
        format!("e{tag}")
    }
}

#[cfg(feature = "kafka")]
impl TestSink for Kafka {
    fn section(tag: &str, _duplicate_window_secs: u64) -> String {
        super::kafka_sink_section(tag, &ferry_core::testing::services::kafka_txn_brokers())
            .replace(".{aggregate_type}", "")
    }

    async fn read(tag: &str) -> Vec<ReceivedMessage> {
        let config = ferry::kafka::KafkaSinkConfig {
            brokers: ferry_core::testing::services::kafka_txn_brokers(),
            timeout_secs: 30,
            ..ferry::kafka::KafkaSinkConfig::default()
        };
        super::read_kafka_topic(&config, &Self::topic(tag)).await
    }

    /// Topics are left behind, as by every Kafka test: each scenario's is its own.
    async fn remove(_tag: &str) {}
}
