//! Trace context for applications that trace with OpenTelemetry through `tracing`
//! (`tracing-opentelemetry`'s layer): the producer's span goes into the message at enqueue,
//! and a consumer's span continues the producer's trace.
//!
//! ```no_run
//! use ferry::NewMessage;
//! use ferry::otel::{TraceContextExt as _, continue_trace};
//!
//! # fn produce() {
//! let message = NewMessage::new("order", "42", "order.paid", r#"{"total":10}"#)
//!     .with_current_trace_context();
//! # }
//! # fn consume(received: &ferry::ReceivedMessage) {
//! let span = tracing::info_span!("apply order event");
//! continue_trace(&span, received);
//! # }
//! ```

use std::str::FromStr;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use ferry_core::{NewMessage, ReceivedMessage};

/// The current `tracing` span's OpenTelemetry context as W3C `traceparent` and `tracestate`
/// (`None` when no span is being traced, e.g. no OpenTelemetry layer is installed).
pub fn current_trace_context() -> Option<(String, Option<String>)> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let tracestate = Some(span_context.trace_state().header()).filter(|state| !state.is_empty());
    Some((traceparent, tracestate))
}

/// Puts the producer's trace context into a message.
pub trait TraceContextExt {
    /// Carries the current `tracing` span's trace context ([`current_trace_context`]); the
    /// message is unchanged when there is none.
    fn with_current_trace_context(self) -> Self;
}

impl TraceContextExt for NewMessage {
    fn with_current_trace_context(self) -> Self {
        match current_trace_context() {
            Some((traceparent, tracestate)) => {
                let message = self.with_traceparent(traceparent);
                match tracestate {
                    Some(tracestate) => message.with_tracestate(tracestate),
                    None => message,
                }
            }
            None => self,
        }
    }
}

/// The producer's span as a remote parent, if the message carries a valid trace context.
pub fn producer_span_context(message: &ReceivedMessage) -> Option<SpanContext> {
    let parent = message.traceparent()?;
    Some(SpanContext::new(
        TraceId::from_hex(parent.trace_id).ok()?,
        SpanId::from_hex(parent.parent_id).ok()?,
        TraceFlags::new(u8::from_str_radix(parent.flags, 16).ok()?),
        true,
        message
            .tracestate()
            .and_then(|state| TraceState::from_str(state).ok())
            .unwrap_or_default(),
    ))
}

/// Makes `span` a child of the producer's span, so that the consumer's work joins the
/// producer's trace; does nothing if the message carries no trace context.
pub fn continue_trace(span: &tracing::Span, message: &ReceivedMessage) {
    if let Some(parent) = producer_span_context(message) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn the_current_span_goes_into_the_message_and_comes_back_as_the_parent() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            assert!(current_trace_context().is_none(), "no span, no context");
            let producer = tracing::info_span!("produce");
            let message = producer.in_scope(|| {
                NewMessage::new("order", "42", "order.paid", "{}").with_current_trace_context()
            });
            assert_eq!(message.validate(1024), Ok(()));
            let producer_context = producer.context();
            let producer_span = producer_context.span();
            let expected = producer_span.span_context();
            let traceparent = &message.headers["traceparent"];
            assert_eq!(
                traceparent,
                &format!("00-{}-{}-01", expected.trace_id(), expected.span_id())
            );

            let mut received = ReceivedMessage {
                id: uuid::Uuid::now_v7(),
                aggregate_type: "order".into(),
                aggregate_id: "42".into(),
                version: 1,
                event_type: "order.paid".into(),
                partition_key: "order/42".into(),
                payload: bytes::Bytes::new(),
                headers: message.headers.clone(),
                time: None,
            };
            let consumer = tracing::info_span!("consume");
            continue_trace(&consumer, &received);
            let consumer_context = consumer.context();
            assert_eq!(
                consumer_context.span().span_context().trace_id(),
                expected.trace_id(),
                "the consumer joined the producer's trace"
            );
            received.headers.clear();
            assert!(producer_span_context(&received).is_none());
        });
    }
}
