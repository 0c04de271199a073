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

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use common::{Scenario, unique_tag};

const ADMIN: &str = "dashboard-admin-token-0123456789";
const PRODUCER: &str = "dashboard-producer-token-0123456789";
/// Event type the receiver answers 400 while `reject` is set.
const REJECTED: &str = "order.rejected";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The webhook receiver: holds requests while the gate is shut, answers 400 to
/// [`REJECTED`] events while `reject` is set, 200 otherwise.
#[derive(Clone)]
struct Receiver {
    gate: watch::Sender<bool>,
    reject: Arc<AtomicBool>,
}

impl Receiver {
    async fn serve(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }
}

async fn receive(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    headers: HeaderMap,
) -> StatusCode {
    let mut gate = receiver.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let event = headers.get("ce-type").and_then(|v| v.to_str().ok());
    if receiver.reject.load(Ordering::SeqCst) && event == Some(REJECTED) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    }
}

/// `chromedriver` on a free port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver not found: install Debian's chromium and chromium-driver (scripts/services.sh does)");
        wait_port(port, "chromedriver").await;
        Self { child, port }
    }

    async fn browser(&self) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860"],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }

    /// The browser's console messages since the last call (chromedriver's log endpoint).
    async fn console(&self, browser: &Client) -> Vec<Value> {
        let session = browser.session_id().await.unwrap().unwrap();
        let answer: Value = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/session/{session}/se/log",
                self.port
            ))
            .header("content-type", "application/json")
            .body(json!({ "type": "browser" }).to_string())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|body| serde_json::from_slice(&body).unwrap())
            .unwrap();
        answer["value"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prepares and confirms one message through the service's API.
async fn produce(http: &reqwest::Client, base: &str, aggregate_id: &str, event_type: &str) {
    let id = Uuid::now_v7();
    let prepared = http
        .post(format!("{base}/v1/messages"))
        .bearer_auth(PRODUCER)
        .header("content-type", "application/json")
        .body(
            json!({
                "id": id.to_string(),
                "aggregate_type": "order",
                "aggregate_id": aggregate_id,
                "event_type": event_type,
                "payload": { "aggregate": aggregate_id },
                "check_url": "http://127.0.0.1:9/check",
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(prepared.status(), 201, "{}", prepared.text().await.unwrap());
    let confirmed = http
        .post(format!("{base}/v1/messages/{id}/confirm"))
        .bearer_auth(PRODUCER)
        .send()
        .await
        .unwrap();
    assert_eq!(confirmed.status(), 200);
}

/// Waits until `css` is on the page and its text satisfies `wanted`; returns the text.
async fn wait_text(
    browser: &Client,
    css: &str,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if wanted(&text) {
                return text;
            }
            last = text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {css} still shows {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks `css`, finding it again if a refresh replaced it in between.
async fn click(browser: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clicked = match browser.find(Locator::Css(css)).await {
            Ok(element) => element.click().await.is_ok(),
            Err(_) => false,
        };
        if clicked {
            return;
        }
        assert!(Instant::now() < deadline, "no {css} to click");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(browser: &Client, name: &str) {
    if let Ok(dir) = std::env::var("FERRY_DASHBOARD_SCREENSHOTS") {
        let png = browser.screenshot().await.unwrap();
        std::fs::write(format!("{dir}/dashboard-{name}.png"), png).unwrap();
    }
}

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

/// What a client without the admin token, or another site, gets.
async fn refusals(http: &reqwest::Client, base: &str, port: u16) {
    let page = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 401, "the pages need the token");
    assert!(page.text().await.unwrap().contains("Sign in"));
    let producer = http
        .get(format!("{base}/dashboard/problems"))
        .bearer_auth(PRODUCER)
        .send()
        .await
        .unwrap();
    assert_eq!(
        producer.status(),
        401,
        "a producer token is not an admin token"
    );
    let action = http
        .post(format!("{base}/dashboard/partitions/0/retry"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("back=problems")
        .send()
        .await
        .unwrap();
    assert_eq!(action.status(), 401, "actions need the token");
    let cross_site = http
        .post(format!("{base}/dashboard/partitions/0/retry"))
        .bearer_auth(ADMIN)
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("back=problems")
        .send()
        .await
        .unwrap();
    assert_eq!(
        cross_site.status(),
        403,
        "a post from another site is refused"
    );
    let cookie = format!("ferry_dashboard={}", base64_url(ADMIN));
    let forged = http
        .post(format!("{base}/dashboard/partitions/0/retry"))
        .header("cookie", cookie)
        .header("origin", format!("http://127.0.0.1:{port}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("back=problems&csrf=guessed")
        .send()
        .await
        .unwrap();
    assert_eq!(
        forged.status(),
        403,
        "a cookie session needs the form's CSRF token"
    );
    let get_action = http
        .get(format!("{base}/dashboard/partitions/0/retry"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(get_action.status(), 405, "actions are POST only");
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_outbox_and_acts_on_it_in_a_browser() {
    let (gate, _) = watch::channel(false);
    let receiver = Receiver {
        gate,
        reject: Arc::default(),
    };
    let receiver_port = receiver.serve().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = config(receiver_port, port, &dir.path().join("outbox.db"));
    let scenario = Scenario::new(&unique_tag(), &[&text]);
    let _serve = scenario.spawn("serve", "serve", &scenario.config, "info");
    let driver = Driver::start().await;
    wait_port(port, "ferry serve").await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    refusals(&http, &base, port).await;

    let browser = driver.browser().await;
    browser.goto(&format!("{base}/dashboard")).await.unwrap();
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(ADMIN)
        .await
        .unwrap();
    click(&browser, "#sign-in").await;
    wait_text(&browser, ".signout span", "signed in", |t| {
        t.contains("operator")
    })
    .await;
    // The 401 of the sign-in page is logged as a failed resource, which shows that the
    // console is read; what counts comes after.
    let signing_in = driver.console(&browser).await;
    assert!(
        signing_in
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains("401"))),
        "the browser's console log is readable: {signing_in:?}"
    );

    // Backlog while the receiver holds every request, then drained, in the same page.
    for n in 0..12 {
        produce(&http, &base, &format!("o-{n}"), "order.placed").await;
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
    produce(&http, &base, "bad-1", REJECTED).await;
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
    produce(&http, &base, "bad-2", REJECTED).await;
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

    let errors: Vec<Value> = driver
        .console(&browser)
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    browser.close().await.unwrap();
}
