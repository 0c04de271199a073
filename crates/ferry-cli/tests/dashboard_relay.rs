//! The web dashboard served by `ferry relay` on its metrics listener (no `ferry serve`),
//! in headless Chromium like `dashboard.rs`: a relay over PostgreSQL publishing to an HTTP
//! receiver in the test, with `[[dashboard.tokens]]` of its own. The pages need the admin
//! token and refuse actions from another site; the partitions page shows the relay's
//! outbox draining; the metrics page shows the relay's own figures; the replay page counts
//! the retained messages (dry run), shows a rate-limited replay's progress and stops it,
//! then replays every message again to the receiver, to the end. With
//! `FERRY_DASHBOARD_SCREENSHOTS=<dir>` it saves the replay page there
//! (`docs/dashboard-replay.png`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use fantoccini::{Client, Locator};
use uuid::Uuid;

use common::browser::{
    ADMIN, Driver, PRODUCER, Receiver, base64_url_decode, click, refusals, screenshot, wait_text,
};
use common::{PgScenario, free_port, unique_tag, wait_listening};

fn sections(tag: &str, receiver_port: u16, port: u16) -> Vec<String> {
    vec![
        common::pg_store_section(),
        common::outbox_section(tag, 4, "retention_secs = 3600"),
        format!("[sink]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{receiver_port}/events\"\n"),
        "[relay]\npoll_interval_ms = 100\nretry_initial_ms = 50\nretry_max_ms = 1000\n".into(),
        common::health::metrics_section(port),
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
async fn the_relay_serves_the_dashboard_and_replays_from_it() {
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
    replay_refusals(&http, &base).await;
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

    replay_from_the_page(&browser, &base, &receiver, &produced).await;
    driver.assert_no_console_errors(&browser).await;
    browser.close().await.unwrap();
}

/// The replay's POST needs the admin token and the dashboard's own origin like every
/// action; a start the core replay refuses (a bad name) is answered before anything runs.
async fn replay_refusals(http: &reqwest::Client, base: &str) {
    let post = |form: &'static str| {
        http.post(format!("{base}/dashboard/replay"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
    };
    let start = "all=on&action=start&name=restore";
    assert_eq!(post(start).send().await.unwrap().status(), 401);
    let cross_site = post(start)
        .bearer_auth(ADMIN)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    let bad_name = post("all=on&action=start&name=no%20spaces%21")
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_name.status(), 303);
    let flash = bad_name
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|c| c.to_str().ok()?.strip_prefix("ferry_dashboard_flash="))
        .map(|c| c.split(';').next().unwrap_or(""))
        .map(|c| String::from_utf8(base64_url_decode(c)).unwrap())
        .collect::<String>();
    assert!(flash.contains("invalid replay name"), "{flash}");
    let page = http
        .get(format!("{base}/dashboard/replay"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("No replay has run"),
        "nothing started: {page}"
    );
}

/// Fills the replay form: every retained message, under `name`, at `rate` per second if
/// given; then clicks `button`.
async fn submit_replay(browser: &Client, name: &str, rate: Option<u32>, button: &str) {
    click(browser, "#replay-all").await;
    let field = browser
        .find(Locator::Css("#replay-form input[name=name]"))
        .await
        .unwrap();
    field.clear().await.unwrap();
    field.send_keys(name).await.unwrap();
    if let Some(rate) = rate {
        browser
            .find(Locator::Css("#replay-form input[name=rate]"))
            .await
            .unwrap()
            .send_keys(&rate.to_string())
            .await
            .unwrap();
    }
    click(browser, button).await;
}

/// The replay page: a dry run counts the retained messages; a slow replay shows its
/// progress and stops on the button; a second one runs to the end, and the receiver got
/// every message again.
async fn replay_from_the_page(
    browser: &Client,
    base: &str,
    receiver: &Receiver,
    produced: &HashSet<Uuid>,
) {
    browser
        .goto(&format!("{base}/dashboard/replay"))
        .await
        .unwrap();
    wait_text(browser, "#no-replay", "no replay yet", |t| {
        t.contains("No replay")
    })
    .await;
    submit_replay(browser, "count-only", None, "#replay-dry-run").await;
    let count = format!("{} retained message(s) selected", produced.len());
    wait_text(browser, "#flash", "the dry run's count", |t| {
        t.contains(&count)
    })
    .await;

    submit_replay(browser, "slow-one", Some(2), "#replay-start").await;
    wait_text(browser, "#flash", "started", |t| t.contains("started")).await;
    wait_text(browser, "#replay-sent", "progress while running", |t| {
        t.parse::<u64>().is_ok_and(|n| n >= 1)
    })
    .await;
    wait_text(browser, "#replay-eta", "an ETA", |t| t != "…").await;
    screenshot(browser, "replay").await;
    click(browser, "#replay-stop").await;
    wait_text(browser, "#replay-state", "stopped", |t| t == "stopped").await;

    submit_replay(browser, "restore-all", None, "#replay-start").await;
    wait_text(browser, "#replay-state", "done", |t| t == "done").await;
    let total = produced.len().to_string();
    wait_text(browser, "#replay-sent", "all sent", |t| t == total).await;
    let accepted = receiver.accepted_counts();
    for id in produced {
        let times = accepted.get(&id.to_string()).copied().unwrap_or(0);
        assert!(
            times >= 2,
            "message {id} reached the receiver {times} time(s): once, then by the replay"
        );
    }
}
