//! Exchanges: declared with `[sink.declare]` (with a queue bound to them), else checked.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use ferry_core::SinkError;

use super::error::broker_error;
use super::wire::short_string;
use super::{AmqpSink, lock};

impl AmqpSink {
    /// Makes sure exchange `name` exists: declared with `[sink.declare]`, else checked
    /// with a passive declare on a channel of its own (a missing exchange closes it).
    pub(super) async fn ensure_exchange(
        &self,
        connection: &Connection,
        name: &str,
    ) -> Result<(), SinkError> {
        if name.is_empty() || lock(&self.exchanges).contains(name) {
            return Ok(());
        }
        let exchange = short_string("exchange", name)?;
        let channel = self.open_channel(connection).await?;
        let checked = match &self.declare {
            Some((kind, queue, binding_key)) => {
                declare(&channel, exchange, kind, queue.as_deref(), binding_key).await
            }
            None => channel
                .exchange_declare(
                    exchange,
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|err| {
                    broker_error(
                        &format!(
                            "exchange {name:?} is not usable on {}; declare it (or bind it \
                             where messages should go)",
                            self.server
                        ),
                        err,
                    )
                }),
        };
        if channel.status().connected() {
            let _ = channel
                .close(200, ShortString::from("ferry: exchange checked"))
                .await;
        }
        checked?;
        lock(&self.exchanges).insert(name.to_owned());
        Ok(())
    }
}

/// Declares `exchange` and, if given, `queue` bound to it (`[sink.declare]`).
async fn declare(
    channel: &Channel,
    exchange: ShortString,
    kind: &ExchangeKind,
    queue: Option<&str>,
    binding_key: &str,
) -> Result<(), SinkError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.clone(),
            kind.clone(),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|err| broker_error(&format!("cannot declare exchange {exchange}"), err))?;
    if let Some(queue) = queue {
        channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|err| broker_error(&format!("cannot declare queue {queue}"), err))?;
        channel
            .queue_bind(
                ShortString::from(queue),
                exchange.clone(),
                ShortString::from(binding_key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| {
                broker_error(&format!("cannot bind queue {queue} to {exchange}"), err)
            })?;
    }
    Ok(())
}
