//! Check-back: asking a producer whether the local transaction behind a prepared message
//! committed.
//!
//! The request is `GET <check_url>?id=<message id>` (with `Authorization: Bearer
//! <service.check_bearer_token>` when set, `Accept: application/json`), and the producer
//! answers `200` with `{"status": "committed" | "rolled_back" | "unknown"}` (other fields
//! are ignored). `committed` confirms the message, `rolled_back` cancels it; `unknown`,
//! any other status code, a redirect, a timeout or an unreadable body is inconclusive and
//! checked again with backoff, up to `max_checks`, after which the message is
//! `check_failed`. A producer that does not know the id must answer `rolled_back` only if
//! it knows the transaction cannot commit later; otherwise `unknown`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use ferry::ErrorChain;
use ferry::backoff::Backoff;

use crate::config::ServiceSettings;
use crate::metrics::{CheckOutcome, Metrics};
use crate::state::{CHECK_BACK_SOURCES, Transition};
use crate::store::{CheckClaim, Moved, ServiceStore};

/// Largest check-back answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The producer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Committed,
    RolledBack,
    Unknown,
}

#[derive(Deserialize)]
struct AnswerBody {
    status: Answer,
}

/// Makes check-back requests.
#[derive(Debug, Clone)]
pub struct CheckClient {
    http: reqwest::Client,
    bearer: Option<SecretString>,
}

impl CheckClient {
    /// A client whose requests give up after `timeout` and follow no redirect.
    pub fn new(timeout: Duration, bearer: Option<SecretString>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry-service/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, bearer })
    }

    /// Asks `check_url` about `id`. The error says why there is no answer, without the URL
    /// (which may carry secrets in its query).
    pub async fn check(&self, check_url: &str, id: Uuid) -> Result<Answer, String> {
        let mut url =
            reqwest::Url::parse(check_url).map_err(|err| format!("bad check_url: {err}"))?;
        url.query_pairs_mut().append_pair("id", &id.to_string());
        let mut request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token.expose_secret());
        }
        let mut response = request
            .send()
            .await
            .map_err(|err| format!("request failed: {}", error_chain(err)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the producer answered HTTP {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| format!("reading the answer failed: {}", error_chain(err)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!(
                    "the answer is longer than {MAX_ANSWER_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice::<AnswerBody>(&body)
            .map(|answer| answer.status)
            .map_err(|err| {
                format!(
                    "the answer is not {{\"status\": \"committed\" | \"rolled_back\" | \"unknown\"}}: {err}"
                )
            })
    }
}

/// The error and its causes, without the request URL.
fn error_chain(err: reqwest::Error) -> String {
    ferry::error_chain(&err.without_url())
}

/// Claims due check-backs and settles them until `shutdown`; a claim in flight is finished
/// first (bounded by the request timeout).
pub(crate) async fn run(
    store: Arc<dyn ServiceStore>,
    client: CheckClient,
    settings: ServiceSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(
        settings.poll_interval,
        settings.check_backoff_max.max(settings.poll_interval),
    );
    let mut wait = settings.poll_interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let limit = settings.check_concurrency;
        match store.claim_check_backs(limit, settings.check_claim()).await {
            Ok(claims) => {
                backoff.reset();
                let full = claims.len() == limit as usize;
                join_all(
                    claims
                        .iter()
                        .map(|claim| settle(&*store, &client, &settings, &metrics, claim)),
                )
                .await;
                // A full batch may mean more are due: go on at once.
                wait = if full {
                    Duration::ZERO
                } else {
                    settings.poll_interval
                };
            }
            Err(err) => {
                wait = backoff.next_delay();
                warn!(error = %ErrorChain(&err), retry_in_ms = wait.as_millis() as u64, "claiming check-backs failed");
            }
        }
    }
}

/// Asks the producer about one claimed message and records the outcome.
pub(crate) async fn settle(
    store: &dyn ServiceStore,
    client: &CheckClient,
    settings: &ServiceSettings,
    metrics: &Metrics,
    claim: &CheckClaim,
) {
    let id = claim.id;
    let answer = client.check(&claim.check_url, id).await;
    let outcome = match &answer {
        Ok(Answer::Committed) => CheckOutcome::Committed,
        Ok(Answer::RolledBack) => CheckOutcome::RolledBack,
        Ok(Answer::Unknown) => CheckOutcome::Unknown,
        Err(_) => CheckOutcome::Error,
    };
    metrics.count_check(outcome);
    let result = match answer {
        Ok(Answer::Committed) => {
            resolve(
                store,
                id,
                Transition::Confirm,
                "confirmed by check-back: committed",
            )
            .await
        }
        Ok(Answer::RolledBack) => {
            resolve(
                store,
                id,
                Transition::Cancel,
                "cancelled by check-back: rolled_back",
            )
            .await
        }
        Ok(Answer::Unknown) => {
            inconclusive(
                store,
                settings,
                metrics,
                claim,
                "the producer answered unknown",
            )
            .await
        }
        Err(why) => inconclusive(store, settings, metrics, claim, &why).await,
    };
    if let Err(err) = result {
        // The claim runs out and the message is checked again.
        warn!(message_id = %id, error = %ErrorChain(&err), "recording a check-back outcome failed");
    }
}

async fn resolve(
    store: &dyn ServiceStore,
    id: Uuid,
    transition: Transition,
    reason: &str,
) -> Result<(), ferry::StoreError> {
    match store
        .transition(id, transition, CHECK_BACK_SOURCES, reason)
        .await?
    {
        Moved::Moved(_) => info!(message_id = %id, reason, "check-back settled the message"),
        Moved::Stayed(record) => {
            debug!(message_id = %id, status = %record.status, "check-back answer came after the message moved on")
        }
        Moved::NotFound => {}
    }
    Ok(())
}

async fn inconclusive(
    store: &dyn ServiceStore,
    settings: &ServiceSettings,
    metrics: &Metrics,
    claim: &CheckClaim,
    why: &str,
) -> Result<(), ferry::StoreError> {
    let exhausted = claim.checks >= settings.max_checks;
    let reason = format!(
        "check-back {} of {}: {why}",
        claim.checks, settings.max_checks
    );
    let retry_in = (!exhausted).then(|| settings.check_delay(claim.checks));
    let changed = store.check_inconclusive(claim, retry_in, &reason).await?;
    if changed && exhausted {
        metrics.count_check_failed();
        warn!(message_id = %claim.id, checks = claim.checks, reason, "check-backs exhausted: message is check_failed until an operator retries, confirms or cancels it");
    } else if changed {
        debug!(message_id = %claim.id, checks = claim.checks, reason, "check-back inconclusive; checking again later");
    }
    Ok(())
}
