//! Load figure for `ferry serve`: concurrent producers each doing prepare + confirm in a
//! loop against a running service; prints pairs/s, HTTP requests/s and latencies, then
//! waits until every confirmed message was delivered (relayed to the broker).
//!
//! ```sh
//! ferry serve --config ferry.toml &
//! FERRY_PRODUCER_TOKEN=… FERRY_ADMIN_TOKEN=… cargo run --release -p ferry-service --example load -- \
//!     --url http://127.0.0.1:8080 --clients 32 --seconds 20
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A token with the producer scope.
    #[arg(long, env = "FERRY_PRODUCER_TOKEN", hide_env_values = true)]
    token: String,
    /// A token with the admin scope, to wait for delivery at the end.
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Concurrent producers, each one request at a time.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Payload size in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Aggregates the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
}

struct Totals {
    pairs: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

async fn post(
    http: &reqwest::Client,
    url: String,
    token: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut request = http.post(url).bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await?;
    let status = response.status();
    let bytes = response.bytes().await?;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

async fn producer(
    args: Arc<Args>,
    http: reqwest::Client,
    totals: Arc<Totals>,
    until: Instant,
    n: usize,
) {
    let payload = "x".repeat(args.payload_bytes);
    let mut i = n;
    while Instant::now() < until {
        let body = json!({
            "aggregate_type": "order",
            "aggregate_id": (i % args.aggregates).to_string(),
            "event_type": "order.paid",
            "payload": {"data": payload},
            "check_url": "http://127.0.0.1:9/check",
        });
        i += args.clients;
        let started = Instant::now();
        let outcome = async {
            let prepared = post(
                &http,
                format!("{}/v1/messages", args.url),
                &args.token,
                Some(&body),
            )
            .await?;
            let id = prepared["id"].as_str().context("no id")?.to_owned();
            post(
                &http,
                format!("{}/v1/messages/{id}/confirm", args.url),
                &args.token,
                None,
            )
            .await
        }
        .await;
        match outcome {
            Ok(_) => {
                totals.pairs.fetch_add(1, Ordering::Relaxed);
                let micros = started.elapsed().as_micros() as u64;
                let _ = totals.latency_us.lock().await.record(micros.max(1));
            }
            Err(err) => {
                if totals.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("error: {}", ferry::ErrorChain(err.as_ref()));
                }
            }
        }
    }
}

/// Count of messages in `status`, from the listing (admin scope).
async fn count(http: &reqwest::Client, args: &Args, status: &str) -> anyhow::Result<usize> {
    let mut total = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/messages?status={status}&limit=1000", args.url);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = serde_json::from_slice(
            &http
                .get(url)
                .bearer_auth(&args.admin_token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?,
        )?;
        total += page["messages"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(total),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let totals = Arc::new(Totals {
        pairs: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency_us: Mutex::new(Histogram::new(3)?),
    });
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|n| {
            tokio::spawn(producer(
                Arc::clone(&args),
                http.clone(),
                Arc::clone(&totals),
                until,
                n,
            ))
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pairs = totals.pairs.load(Ordering::Relaxed);
    let latency = totals.latency_us.lock().await;
    println!(
        "load: {} clients, {:.1} s, {}-byte payloads over {} aggregates",
        args.clients, elapsed, args.payload_bytes, args.aggregates
    );
    println!(
        "prepare+confirm: {pairs} pairs, {:.0} pairs/s, {:.0} HTTP requests/s, {} errors",
        pairs as f64 / elapsed,
        2.0 * pairs as f64 / elapsed,
        totals.errors.load(Ordering::Relaxed)
    );
    println!(
        "pair latency ms: p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}",
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.9) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    let waiting = Instant::now();
    loop {
        let confirmed = count(&http, &args, "confirmed").await?;
        if confirmed == 0 {
            break;
        }
        if waiting.elapsed() > Duration::from_secs(300) {
            bail!("{confirmed} confirmed messages still not delivered after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "all confirmed messages delivered {:.1} s after the load stopped",
        waiting.elapsed().as_secs_f64()
    );
    Ok(())
}
