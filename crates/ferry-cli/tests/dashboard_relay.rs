//! The web dashboard served by `ferry relay` on its metrics listener (no `ferry serve`),
//! in headless Chromium like `dashboard.rs`: a relay over PostgreSQL publishing to an HTTP
//! receiver in the test, with `[[dashboard.tokens]]` of its own. The pages need the admin
//! token and refuse actions from another site; the partitions page shows the relay's
//! outbox draining; the metrics page shows the relay's own figures.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::browser::{ADMIN, Driver, PRODUCER, Receiver, refusals, screenshot, wait_text};
use common::{PgScenario, free_port, unique_tag, wait_listening};

fn sections(tag: &str, receiver_port: u16, port: u16) -> Vec<String> {
    vec![
        common::pg_store_section(),
        common::outbox_section(tag, 4, "retention_secs = 3600"),
        format!("[sink]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{receiver_port}/events\"\n"),
        "[relay]\npoll_interval_ms = 100\nretry_initial_ms = 50\nretry_max_ms = 1000\n".into(),
        format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        format!(
            r#"[dashboard]
enabled = true
refresh_ms = 300
sample_interval_secs = 1

[[dashboard.tokens]]
name = "operator"
token = "{ADMIN}"
scopes = ["admin"]

[[dashboard.tokens]]
name = "orders"
token = "{PRODUCER}"
scopes = ["producer"]
"#
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_serves_the_dashboard_on_its_metrics_listener() {
    let receiver = Receiver::new(true);
    let receiver_port = receiver.serve().await;
    let port = free_port();
    let tag = unique_tag();
    let sections = sections(&tag, receiver_port, port);
    let sections: Vec<&str> = sections.iter().map(String::as_str).collect();
    let e2e = PgScenario::from_sections(&tag, &sections).await;
    let _relay = e2e.scenario.relay("relay");
    let driver = Driver::start().await;
    wait_listening(port, "ferry relay's metrics listener").await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The dashboard is mounted once the store is open; until then it answers 503.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("{base}/dashboard"))
        .send()
        .await
        .unwrap()
        .status()
        == 503
    {
        assert!(
            std::time::Instant::now() < deadline,
            "dashboard not mounted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refusals(&http, &base, port).await;
    let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200, "the health endpoints stay beside it");

    let produced = e2e.produce(6, 2, 1).await.unwrap();
    let browser = driver.browser().await;
    driver.sign_in(&browser, &base).await;

    wait_text(&browser, "#total-backlog", "drained", |t| t == "0").await;
    let accepted = receiver.accepted_counts();
    assert!(
        produced
            .iter()
            .all(|id| accepted.contains_key(&id.to_string())),
        "every message reached the receiver"
    );
    wait_text(&browser, "#publish-rate", "the relay's publish rate", |t| {
        t.contains("/s")
    })
    .await;
    browser
        .goto(&format!("{base}/dashboard/metrics"))
        .await
        .unwrap();
    wait_text(&browser, "table.metrics", "the relay's metrics", |t| {
        t.contains("ferry_relay_published_total")
    })
    .await;
    screenshot(&browser, "relay-metrics").await;

    driver.assert_no_console_errors(&browser).await;
    browser.close().await.unwrap();
}
