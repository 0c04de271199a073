//! A consumer of ferry's reliable message service: reads NATS JetStream with a durable
//! consumer, applies each message exactly once through ferry's inbox (here on SQLite, in
//! the same transaction as the consumer's own effect), then acknowledges it to the service
//! (`POST /v1/messages/{id}/ack`) and to JetStream.
//!
//! A message redelivered by the service (ack timeout) carries the same id and version, so
//! the inbox skips it as a duplicate; the consumer acks it all the same.
//!
//! ```sh
//! FERRY_CONSUMER_TOKEN=dev-consumer-token-change-me cargo run -p ferry-service --example consumer -- \
//!     --nats-url nats://127.0.0.1:4222 --stream FERRY --service-url http://127.0.0.1:8080 \
//!     --database consumer.db
//! ```

use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::pull};
use clap::Parser;
use futures::StreamExt as _;

use ferry::sql::{StoreSettings, TablePrefix};
use ferry::sqlite::{SqliteInbox, SqliteOutbox};
use ferry::{Processed, ReceivedMessage};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[arg(long, default_value = "FERRY")]
    stream: String,
    /// The durable JetStream consumer's name (shared by this consumer's instances).
    #[arg(long, default_value = "billing")]
    consumer: String,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    service_url: String,
    /// A token with the consumer scope.
    #[arg(long, env = "FERRY_CONSUMER_TOKEN", hide_env_values = true)]
    token: String,
    /// The consumer's own database, holding its inbox and its effects.
    #[arg(long, default_value = "consumer.db")]
    database: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = SqliteOutbox::connect(
        &format!("sqlite://{}", args.database),
        4,
        StoreSettings::default(),
    )
    .await?;
    // Creates ferry's tables in the consumer's database, the inbox among them.
    db.migrate(1).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS paid_orders (message_id BLOB PRIMARY KEY, body BLOB NOT NULL)",
    )
    .execute(db.pool())
    .await?;
    let inbox = SqliteInbox::new(&args.consumer, &TablePrefix::default());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let js = jetstream::new(async_nats::connect(&args.nats_url).await?);
    let stream = js
        .get_stream(&args.stream)
        .await
        .with_context(|| format!("no stream {} (has the relay run yet?)", args.stream))?;
    let consumer = stream
        .get_or_create_consumer(
            &args.consumer,
            pull::Config {
                durable_name: Some(args.consumer.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    eprintln!("consuming {} as {}", args.stream, args.consumer);
    while let Some(message) = messages.next().await {
        let message = message?;
        let received = ferry::nats::decode_message(&message)?;

        let mut tx = db.pool().begin_with("BEGIN IMMEDIATE").await?;
        let outcome = inbox
            .process(&mut tx, &received, async |tx, m: &ReceivedMessage| {
                // The consumer's effect, in the inbox's transaction.
                sqlx::query("INSERT INTO paid_orders (message_id, body) VALUES (?1, ?2)")
                    .bind(m.id)
                    .bind(m.payload.to_vec())
                    .execute(&mut **tx)
                    .await
            })
            .await?;
        tx.commit().await?;
        match outcome {
            Processed::Applied { .. } => {
                eprintln!("applied {} v{}", received.id, received.version)
            }
            Processed::Duplicate => eprintln!("duplicate {} skipped", received.id),
            Processed::Stale {
                last_applied_version,
            } => eprintln!(
                "stale {} v{} skipped (v{last_applied_version} applied)",
                received.id, received.version
            ),
        }

        // Acknowledge to the service whatever the inbox decided: the message is handled.
        let response = http
            .post(format!(
                "{}/v1/messages/{}/ack",
                args.service_url, received.id
            ))
            .bearer_auth(&args.token)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            // Not acked to JetStream either: it comes back and is tried again.
            bail!(
                "ack of {} refused: {status} {}",
                received.id,
                response.text().await?
            );
        }
        message
            .ack()
            .await
            .map_err(|err| anyhow::anyhow!("jetstream ack failed: {err}"))?;
    }
    Ok(())
}
