//! What the browser tests of the dashboard share: a webhook receiver that can hold or
//! refuse deliveries, `chromedriver` with headless Chromium, and waits and clicks that
//! survive the page's refreshes.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{free_port, wait_listening};

pub const ADMIN: &str = "dashboard-admin-token-0123456789";
pub const PRODUCER: &str = "dashboard-producer-token-0123456789";
/// Event type the receiver answers 400 while `reject` is set.
pub const REJECTED: &str = "order.rejected";

/// The webhook receiver: holds requests while the gate is shut, answers 400 to
/// [`REJECTED`] events while `reject` is set, 200 otherwise, and keeps the `ce-id` of
/// every event it accepted.
#[derive(Clone)]
pub struct Receiver {
    pub gate: watch::Sender<bool>,
    pub reject: Arc<AtomicBool>,
    pub accepted: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn new(open: bool) -> Self {
        Self {
            gate: watch::channel(open).0,
            reject: Arc::default(),
            accepted: Arc::default(),
        }
    }

    /// How many times each event was accepted, by id.
    pub fn accepted_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for id in self.accepted.lock().unwrap().iter() {
            *counts.entry(id.clone()).or_insert(0) += 1;
        }
        counts
    }

    pub async fn serve(&self) -> u16 {
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
        return StatusCode::BAD_REQUEST;
    }
    if let Some(id) = headers.get("ce-id").and_then(|v| v.to_str().ok()) {
        receiver.accepted.lock().unwrap().push(id.to_owned());
    }
    StatusCode::OK
}

/// `chromedriver` on a free port; killed when dropped.
pub struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    pub async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver not found: install Debian's chromium and chromium-driver (scripts/services.sh does)");
        wait_listening(port, "chromedriver").await;
        Self { child, port }
    }

    pub async fn browser(&self) -> Client {
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

    /// Signs in with the admin token on the login form `base`/dashboard shows; clears the
    /// console of the sign-in page's 401 (logged as a failed resource, which shows that the
    /// console is read), so that what counts comes after.
    pub async fn sign_in(&self, browser: &Client, base: &str) {
        browser.goto(&format!("{base}/dashboard")).await.unwrap();
        browser
            .find(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(ADMIN)
            .await
            .unwrap();
        click(browser, "#sign-in").await;
        wait_text(browser, ".signout span", "signed in", |t| {
            t.contains("operator")
        })
        .await;
        let signing_in = self.console(browser).await;
        assert!(
            signing_in
                .iter()
                .any(|e| e["message"].as_str().is_some_and(|m| m.contains("401"))),
            "the browser's console log is readable: {signing_in:?}"
        );
    }

    /// Fails on any error the browser's console logged since the last read.
    pub async fn assert_no_console_errors(&self, browser: &Client) {
        let errors: Vec<Value> = self
            .console(browser)
            .await
            .into_iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");
    }

    /// The browser's console messages since the last call (chromedriver's log endpoint).
    pub async fn console(&self, browser: &Client) -> Vec<Value> {
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

/// Waits until `css` is on the page and its text satisfies `wanted`; returns the text.
pub async fn wait_text(
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
pub async fn click(browser: &Client, css: &str) {
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

pub async fn screenshot(browser: &Client, name: &str) {
    if let Ok(dir) = std::env::var("FERRY_DASHBOARD_SCREENSHOTS") {
        let png = browser.screenshot().await.unwrap();
        std::fs::write(format!("{dir}/dashboard-{name}.png"), png).unwrap();
    }
}

/// What a client without the admin token, or another site, gets.
pub async fn refusals(http: &reqwest::Client, base: &str, port: u16) {
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

pub fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

pub fn base64_url_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}
