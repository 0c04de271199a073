//! A relay's HTTP endpoints (`[metrics] listen`): the config section that turns them on,
//! and a client for `/metrics` and `/readyz`.

use std::time::{Duration, Instant};

use super::Relay;

/// The `[metrics]` section that serves `/metrics`, `/healthz` and `/readyz` on `port`.
pub fn metrics_section(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The relay's endpoints on `port`.
pub struct Endpoints {
    base: String,
    http: reqwest::Client,
}

impl Endpoints {
    pub fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    /// The status and body of `GET path`, or `None` while nothing listens.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap()))
    }

    pub async fn scrape(&self) -> String {
        let (status, text) = self.get("/metrics").await.expect("metrics served");
        assert_eq!(status, 200, "{text}");
        text
    }

    /// Waits until `/readyz` answers `status`; returns its body.
    pub async fn wait_ready(&self, status: u16, within: Duration, relay: &Relay) -> String {
        let deadline = Instant::now() + within;
        loop {
            let answer = self.get("/readyz").await;
            if let Some((got, body)) = &answer
                && *got == status
            {
                return body.clone();
            }
            assert!(
                Instant::now() < deadline,
                "/readyz did not answer {status} within {within:?} (last: {answer:?}):\n{}",
                relay.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
