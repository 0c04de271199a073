//! The bench's HTTP receiver: a minimal axum server on 127.0.0.1 that decodes each POST
//! as a consumer would ([`received_message`]) and answers 200, and its raw ceiling under a
//! simple load loop (plain POSTs without CloudEvents headers) for comparison.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use ferry::ErrorChain;
use ferry::webhook::received_message;

use crate::decoded::Decoded;

/// Where the load loop posts: answered 200 without being decoded or forwarded.
const RAW_PATH: &str = "/raw";

/// The bench's receiver; stops when dropped.
#[derive(Debug)]
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    messages: Mutex<Option<mpsc::UnboundedReceiver<Decoded>>>,
    _stop: DropGuard,
}

impl Receiver {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the bench's HTTP receiver")?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let app = axum::Router::new()
            .route(RAW_PATH, axum::routing::post(|| async { StatusCode::OK }))
            .fallback(receive)
            .with_state(Arc::new(tx));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
            {
                tracing::warn!(error = %ErrorChain(&err), "the bench's HTTP receiver stopped");
            }
        });
        Ok(Self {
            addr,
            messages: Mutex::new(Some(rx)),
            _stop: stop.drop_guard(),
        })
    }

    /// The decoded messages; the first caller gets them.
    pub(crate) fn take_messages(&self) -> anyhow::Result<mpsc::UnboundedReceiver<Decoded>> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .context("the bench's receiver is already read")
    }

    /// `concurrency` tasks POST `messages` in all, each one request after the other (as
    /// the sink does per partition), with `payload_bytes` bodies and no CloudEvents
    /// headers; returns the elapsed time.
    pub(crate) async fn raw_ceiling(
        &self,
        messages: u64,
        payload_bytes: usize,
        concurrency: u32,
    ) -> anyhow::Result<Duration> {
        let client = reqwest::Client::new();
        let url = format!("http://{}{RAW_PATH}", self.addr);
        let body = bytes::Bytes::from(vec![b'x'; payload_bytes]);
        let started = Instant::now();
        let tasks = (0..u64::from(concurrency)).map(|task| {
            let share = messages / u64::from(concurrency)
                + u64::from(task < messages % u64::from(concurrency));
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..share {
                    client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?
                        .error_for_status()?;
                }
                Ok::<_, reqwest::Error>(())
            })
        });
        for result in futures::future::join_all(tasks).await {
            result
                .context("a load task panicked")?
                .context("the raw load loop failed")?;
        }
        Ok(started.elapsed())
    }
}

async fn receive(
    State(messages): State<Arc<mpsc::UnboundedSender<Decoded>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let decoded = received_message(
        headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
        body,
    )
    .map_err(|err| err.to_string());
    // Forwarded before answering: once the sink has its ack, the consumer has the message.
    let _ = messages.send(decoded);
    StatusCode::OK
}
