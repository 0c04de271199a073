//! The reliable message service's producer side (`ferry serve`), driven over HTTP.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

/// Prepares and confirms one message through the service at `base` with the producer
/// `token`; connection errors are retried for 30 s while the service starts.
pub async fn prepare_and_confirm(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    aggregate_id: &str,
    event_type: &str,
) -> Uuid {
    let id = Uuid::now_v7();
    let body = json!({
        "id": id.to_string(),
        "aggregate_type": "order",
        "aggregate_id": aggregate_id,
        "event_type": event_type,
        "payload": { "aggregate": aggregate_id },
        "check_url": "http://127.0.0.1:9/check",
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let prepared = loop {
        match http
            .post(format!("{base}/v1/messages"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
        {
            Ok(answer) => break answer,
            Err(err) => {
                assert!(Instant::now() < deadline, "ferry serve at {base}: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(prepared.status(), 201, "{}", prepared.text().await.unwrap());
    let confirmed = http
        .post(format!("{base}/v1/messages/{id}/confirm"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        confirmed.status(),
        200,
        "{}",
        confirmed.text().await.unwrap()
    );
    id
}
