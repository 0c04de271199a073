//! `ferry relay` exporting its spans over OTLP/HTTP: a receiver in the test (axum on
//! 127.0.0.1, `POST /v1/traces`, protobuf) collects what a relay from PostgreSQL to NATS
//! exports: its batches as spans with their partition and size, the publish and mark inside
//! them, under the configured service name, flushed when the relay stops; `ferry serve`
//! exports its in-process relay's batches the same way. A bad endpoint is a config error
//! naming the key.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

use common::service::prepare_and_confirm;
use common::{
    PgScenario, Scenario, ferry_bin, free_port, nats_sink_section, nats_stream, unique_tag,
};

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

type Received = Arc<Mutex<Vec<Exported>>>;

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut received = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| text(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Exported {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    parent_span_id: span.parent_span_id,
                    span_id: span.span_id,
                    attributes: text(&span.attributes),
                });
            }
        }
    }
    StatusCode::OK
}

/// Serves `POST /v1/traces` on a free port; returns its base URL.
async fn otlp_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_batches_are_exported_as_spans_over_otlp() {
    let received = Received::default();
    let endpoint = otlp_receiver(received.clone()).await;
    let tag = unique_tag();
    let service = format!("ferry-e2e-{tag}");
    let tracing =
        format!("[tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"{service}\"\n");
    let pg = PgScenario::new(
        &tag,
        2,
        &format!("{}\n{tracing}", nats_sink_section(&tag, 120)),
        "",
    )
    .await;
    pg.produce(20, 5, 2).await.unwrap();
    let relay = pg.scenario.relay("relay");
    pg.scenario.wait_drained(Duration::from_secs(60)).await;
    // The batch exporter sends on its own schedule; a clean stop sends what is queued.
    assert!(relay.terminate(Duration::from_secs(30)).success());

    let spans = received.lock().unwrap().clone();
    let batches: Vec<&Exported> = spans.iter().filter(|s| s.name == "relay_batch").collect();
    assert!(!batches.is_empty(), "no batch span arrived: {spans:?}");
    assert!(spans.iter().all(|s| s.service == service), "{spans:?}");
    let relayed: u64 = batches
        .iter()
        .map(|b| b.attributes["batch_size"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(relayed, 100, "every message in exactly one exported batch");
    for batch in &batches {
        assert!(
            ["0", "1"].contains(&batch.attributes["partition"].as_str()),
            "{batch:?}"
        );
        for step in ["publish", "mark"] {
            assert!(
                spans.iter().any(|s| s.name == step
                    && s.trace_id == batch.trace_id
                    && s.parent_span_id == batch.span_id),
                "no {step} span inside {batch:?}"
            );
        }
    }

    let client = async_nats::connect(ferry_core::testing::services::nats_url())
        .await
        .unwrap();
    async_nats::jetstream::new(client)
        .delete_stream(nats_stream(&tag))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_exports_its_relays_batches_as_spans_too() {
    const PRODUCER: &str = "tracing-producer-token";
    let received = Received::default();
    let endpoint = otlp_receiver(received.clone()).await;
    let service = format!("ferry-serve-{}", unique_tag());
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        r#"[store]
type = "sqlite"
path = "{db}"

[outbox]
partitions = 1

[sink]
type = "file"
path = "{events}"

[relay]
poll_interval_ms = 50

[service]
listen = "127.0.0.1:{port}"

[[service.tokens]]
name = "producer"
token = "{PRODUCER}"
scopes = ["producer"]

[tracing]
otlp_endpoint = "{endpoint}"
service_name = "{service}"
"#,
        db = files.path().join("outbox.db").display(),
        events = files.path().join("events.jsonl").display(),
    );
    let scenario = Scenario::new(&unique_tag(), &[&config]);
    let serve = scenario.spawn("serve", "serve", &scenario.config, "info");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for n in 0..3 {
        prepare_and_confirm(&http, &base, PRODUCER, &format!("o-{n}"), "order.placed").await;
    }
    let events = files.path().join("events.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&events).map_or(0, |text| text.lines().count()) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not write the 3 events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A clean stop flushes the batch exporter.
    assert!(serve.terminate(Duration::from_secs(30)).success());

    let spans = received.lock().unwrap().clone();
    let relayed: u64 = spans
        .iter()
        .filter(|s| s.name == "relay_batch")
        .map(|b| b.attributes["batch_size"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        relayed, 3,
        "every message in exactly one exported batch: {spans:?}"
    );
    assert!(spans.iter().all(|s| s.service == service), "{spans:?}");
}

#[tokio::test]
async fn a_bad_otlp_endpoint_is_a_config_error_naming_the_key() {
    let tag = unique_tag();
    let pg = PgScenario::new(&tag, 1, &nats_sink_section(&tag, 120), "").await;
    let config = pg.scenario.config_variant(
        "bad-endpoint",
        "[relay]",
        "[tracing]\notlp_endpoint = \"collector:4318\"\n\n[relay]",
    );
    let output = Command::new(ferry_bin())
        .args(["relay", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tracing.otlp_endpoint") && stderr.contains("http(s)"),
        "{stderr}"
    );
}
