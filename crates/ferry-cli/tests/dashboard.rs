//! The web dashboard in a real headless browser: Debian's `chromium` driven through
//! `chromedriver` (WebDriver) by fantoccini, against a real `ferry serve` process (SQLite,
//! the relay in process) publishing to an HTTP receiver in the test. The page signs in,
//! shows the backlog change while the relay drains (refreshed in place, no reload), and
//! clears a blocked partition with its "Retry now" button; a message is skipped and
//! requeued from the page; requests without the token, or from another site, are refused;
//! the browser logs no console error. With `FERRY_DASHBOARD_SCREENSHOTS=<dir>` it saves
//! a screenshot of each page there (`docs/dashboard-*.png` were made so).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use fantoccini::Locator;
use serde_json::json;

use common::browser::{
    ADMIN, Driver, PRODUCER, REJECTED, Receiver, click, refusals, screenshot, wait_text,
};
use common::service::prepare_and_confirm;
use common::{Scenario, free_port, unique_tag, wait_listening};

fn config(receiver_port: u16, port: u16, db: &std::path::Path) -> String {
    format!(
        r#"[store]
type = "sqlite"
path = "{db}"

[outbox]
partitions = 4

[sink]
type = "webhook"
url = "http://127.0.0.1:{receiver_port}/events"
request_timeout_secs = 30

[relay]
poll_interval_ms = 100
# A blocked partition is retried only when the operator asks (within the test): with a
# short first delay the relay's own retry could pass the head before the click, and the
# click would then be refused as "not blocked".
retry_initial_ms = 600000
retry_max_ms = 600000

[service]
listen = "127.0.0.1:{port}"

[[service.tokens]]
name = "operator"
token = "{ADMIN}"
scopes = ["admin"]

[[service.tokens]]
name = "orders"
token = "{PRODUCER}"
scopes = ["producer"]

[dashboard]
enabled = true
refresh_ms = 300
sample_interval_secs = 1
"#,
        db = db.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_outbox_and_acts_on_it_in_a_browser() {
    let receiver = Receiver::new(false);
    let receiver_port = receiver.serve().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = config(receiver_port, port, &dir.path().join("outbox.db"));
    let scenario = Scenario::new(&unique_tag(), &[&text]);
    let _serve = scenario.spawn("serve", "serve", &scenario.config, "info");
    let driver = Driver::start().await;
    wait_listening(port, "ferry serve").await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    refusals(&http, &base, port).await;

    let browser = driver.browser().await;
    driver.sign_in(&browser, &base).await;

    // Backlog while the receiver holds every request, then drained, in the same page.
    for n in 0..12 {
        prepare_and_confirm(&http, &base, PRODUCER, &format!("o-{n}"), "order.placed").await;
    }
    wait_text(&browser, "#total-backlog", "backlog while held", |t| {
        t == "12"
    })
    .await;
    browser
        .execute("window.ferryTestMarker = 'same page';", vec![])
        .await
        .unwrap();
    screenshot(&browser, "partitions").await;
    receiver.gate.send_replace(true);
    wait_text(&browser, "#total-backlog", "backlog after draining", |t| {
        t == "0"
    })
    .await;
    let marker = browser
        .execute("return window.ferryTestMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(
        marker,
        json!("same page"),
        "the figure changed without a reload"
    );

    // A rejected message blocks its partition; "Retry now" clears it once the receiver
    // accepts (the relay would not retry by itself within the test: retry_initial_ms).
    receiver.reject.store(true, Ordering::SeqCst);
    prepare_and_confirm(&http, &base, PRODUCER, "bad-1", REJECTED).await;
    browser
        .goto(&format!("{base}/dashboard/problems"))
        .await
        .unwrap();
    let reason = wait_text(
        &browser,
        "#blocked tbody tr .reason",
        "blocked reason",
        |t| !t.is_empty(),
    )
    .await;
    assert!(
        reason.contains("400"),
        "the receiver's answer is shown: {reason}"
    );
    screenshot(&browser, "problems").await;
    receiver.reject.store(false, Ordering::SeqCst);
    click(&browser, "#blocked tbody tr button.retry").await;
    wait_text(&browser, "#flash", "retry requested", |t| {
        t.contains("retry requested")
    })
    .await;
    wait_text(&browser, "#no-blocked", "unblocked", |t| {
        t.contains("No partition")
    })
    .await;
    browser.goto(&format!("{base}/dashboard")).await.unwrap();
    wait_text(&browser, "#total-backlog", "backlog after the retry", |t| {
        t == "0"
    })
    .await;

    // Skip a rejected message with a reason, then requeue it from the parked list.
    receiver.reject.store(true, Ordering::SeqCst);
    prepare_and_confirm(&http, &base, PRODUCER, "bad-2", REJECTED).await;
    browser
        .goto(&format!("{base}/dashboard/problems"))
        .await
        .unwrap();
    wait_text(
        &browser,
        "#blocked tbody tr .reason",
        "blocked again",
        |t| t.contains("400"),
    )
    .await;
    browser
        .find(Locator::Css("#blocked tbody tr input[name=reason]"))
        .await
        .unwrap()
        .send_keys("receiver refuses it; fixed in the next deploy")
        .await
        .unwrap();
    click(&browser, "#blocked tbody tr button.skip").await;
    wait_text(&browser, "#flash", "skipped", |t| t.contains("parked")).await;
    wait_text(
        &browser,
        "#parked tbody tr .reason",
        "parked with its reason",
        |t| t.contains("next deploy"),
    )
    .await;
    receiver.reject.store(false, Ordering::SeqCst);
    click(&browser, "#parked tbody tr button.requeue").await;
    wait_text(&browser, "#flash", "requeued", |t| t.contains("requeued")).await;
    wait_text(&browser, "#no-parked", "requeued and published", |t| {
        t.contains("No message")
    })
    .await;

    browser
        .goto(&format!("{base}/dashboard/transactions"))
        .await
        .unwrap();
    wait_text(&browser, "#tx-delivered", "delivered transactions", |t| {
        t == "14"
    })
    .await;
    screenshot(&browser, "transactions").await;
    browser
        .goto(&format!("{base}/dashboard/metrics"))
        .await
        .unwrap();
    wait_text(&browser, "table.metrics", "metrics", |t| {
        t.contains("ferry_relay_published_total")
    })
    .await;
    screenshot(&browser, "metrics").await;

    driver.assert_no_console_errors(&browser).await;
    browser.close().await.unwrap();
}
