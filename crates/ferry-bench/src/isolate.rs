//! Names of the bench's own: a bench never reads or writes the user's outbox or stream.

use std::path::Path;

use anyhow::{Context, bail};

use ferry::amqp::AmqpDeclare;
use ferry_cli::config::{Config, SinkConfig, StoreConfig};

/// Points `config` at names of the bench's own, derived from `tag`: tables `bench_<tag>_*`
/// (Redis keys `bench:<tag>:*`); for NATS the stream `<stream>_bench_<tag>` with subjects
/// `<stream>_bench_<tag>.>`; for Kafka the topic `ferry_bench_<tag>.bench` and transactional ids
/// `<prefix>-bench-<tag>-p<N>`; for Redis streams `bench_<tag>.<stream_template>`; for
/// RabbitMQ the exchange and queue `bench_<tag>`, declared by the sink (topic, bound with
/// `#`); for a file sink `<stem>.bench_<tag>.jsonl` next to the configured file. Refuses
/// stdout, which the bench cannot read back.
pub(crate) fn isolate(config: &mut Config, tag: &str) -> anyhow::Result<()> {
    config.outbox.table_prefix = format!("bench_{tag}_");
    if let StoreConfig::Redis { key_prefix, .. } = &mut config.store {
        *key_prefix = format!("bench:{tag}:");
    }
    match &mut config.sink {
        SinkConfig::Nats(nats) => {
            let name = format!("{}_bench_{tag}", nats.stream);
            nats.subject_template = bench_template(&nats.subject_template, &name, '.');
            nats.subjects = vec![format!("{name}.>")];
            nats.stream = name;
        }
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(kafka) => {
            kafka.topic_template = format!("ferry_bench_{tag}.{{aggregate_type}}");
            kafka.transactional_id_prefix =
                format!("{}-bench-{tag}", kafka.transactional_id_prefix);
        }
        #[cfg(not(feature = "kafka"))]
        SinkConfig::Kafka(_) => return Err(kafka_not_built()),
        SinkConfig::RedisStream(redis) => {
            redis.stream_template = format!("bench_{tag}.{}", redis.stream_template);
        }
        SinkConfig::Amqp(amqp) => {
            let name = format!("bench_{tag}");
            amqp.exchange_template = name.clone();
            amqp.declare = Some(AmqpDeclare {
                queue: Some(name),
                ..AmqpDeclare::default()
            });
        }
        SinkConfig::File(file) if file.path != Path::new("-") => {
            let stem = file
                .path
                .file_stem()
                .map_or_else(|| "ferry".into(), |s| s.to_string_lossy().into_owned());
            file.path = file
                .path
                .with_file_name(format!("{stem}.bench_{tag}.jsonl"));
        }
        SinkConfig::Mqtt(mqtt) => {
            mqtt.topic_template =
                bench_template(&mqtt.topic_template, &format!("bench_{tag}"), '/');
        }
        SinkConfig::Webhook(webhook) => {
            // The bench posts to a receiver of its own; Target::create puts its port in.
            webhook.url = format!("http://127.0.0.1:9/bench_{tag}/{{aggregate_type}}");
            webhook.signing_secret = None;
            webhook.bearer_token = None;
        }
        SinkConfig::File(_) | SinkConfig::Stdout { .. } => bail!(
            "ferry-bench cannot read its messages back from stdout: use a config whose sink is \
             nats or a file (e.g. examples/postgres-nats.toml)"
        ),
    }
    config
        .validate()
        .context("the bench's derived names do not make a valid config")
}

/// The configured subject or topic template with its first level (levels separated by
/// `separator`) replaced by `prefix` when that level is fixed text
/// (`ferry.{aggregate_type}.{event_type}` becomes `<prefix>.{aggregate_type}.{event_type}`),
/// else with `prefix` and the separator put in front.
fn bench_template(template: &str, prefix: &str, separator: char) -> String {
    match template.split_once(separator) {
        Some((first, rest)) if !first.contains('{') => format!("{prefix}{separator}{rest}"),
        _ => format!("{prefix}{separator}{template}"),
    }
}

/// The error for a Kafka sink in a bench built without it (`ferry-cli` may have Kafka on,
/// and so accept the config, while the bench has not).
#[cfg(not(feature = "kafka"))]
pub(crate) fn kafka_not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "sink.type = \"kafka\" needs a ferry-bench built with Kafka support: \
         cargo build -p ferry-bench --features kafka"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_move_under_the_bench_prefix() {
        assert_eq!(
            bench_template("ferry.{aggregate_type}.{event_type}", "FERRY_bench_1", '.'),
            "FERRY_bench_1.{aggregate_type}.{event_type}"
        );
        assert_eq!(
            bench_template("{aggregate_type}.{event_type}", "B", '.'),
            "B.{aggregate_type}.{event_type}"
        );
        assert_eq!(bench_template("{event_type}", "B", '.'), "B.{event_type}");
        assert_eq!(
            bench_template("x{partition}.y", "B", '.'),
            "B.x{partition}.y"
        );
    }

    fn config(sink: &str) -> Config {
        Config::from_toml(&format!(
            "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\n{sink}\n"
        ))
        .expect("valid config")
    }

    #[test]
    fn nats_and_file_sinks_get_names_of_their_own() {
        let mut nats = config("type = \"nats\"\nstream = \"ORDERS\"");
        isolate(&mut nats, "ab12").expect("isolated");
        assert_eq!(nats.outbox.table_prefix, "bench_ab12_");
        let SinkConfig::Nats(sink) = &nats.sink else {
            panic!("still nats")
        };
        assert_eq!(sink.stream, "ORDERS_bench_ab12");
        assert_eq!(sink.subjects, ["ORDERS_bench_ab12.>"]);
        assert_eq!(
            sink.subject_template,
            "ORDERS_bench_ab12.{aggregate_type}.{event_type}"
        );

        let mut file = config("type = \"file\"\npath = \"/var/events.jsonl\"");
        isolate(&mut file, "ab12").expect("isolated");
        let SinkConfig::File(sink) = &file.sink else {
            panic!("still a file")
        };
        assert_eq!(sink.path, Path::new("/var/events.bench_ab12.jsonl"));
    }

    #[test]
    fn redis_and_rabbitmq_get_names_of_their_own() {
        let mut redis = config("type = \"redis_stream\"");
        isolate(&mut redis, "ab12").expect("isolated");
        let SinkConfig::RedisStream(sink) = &redis.sink else {
            panic!("still redis")
        };
        assert_eq!(
            sink.stream_template,
            "bench_ab12.ferry.{aggregate_type}.{partition}"
        );
        let mut amqp = config("type = \"amqp\"\nexchange_template = \"shop.{aggregate_type}\"");
        isolate(&mut amqp, "ab12").expect("isolated");
        let SinkConfig::Amqp(sink) = &amqp.sink else {
            panic!("still amqp")
        };
        assert_eq!(sink.exchange_template, "bench_ab12");
        let declare = sink.declare.as_ref().expect("declares its own queue");
        assert_eq!(declare.queue.as_deref(), Some("bench_ab12"));
    }

    #[test]
    fn stdout_is_refused() {
        for sink in ["type = \"stdout\"", "type = \"file\"\npath = \"-\""] {
            let err = isolate(&mut config(sink), "ab12").expect_err("refused");
            assert!(err.to_string().contains("stdout"), "{err}");
        }
    }
}
