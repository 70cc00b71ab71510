//! W3C trace context across the queue: ingest writes each request's `traceparent` into the
//! AMQP message headers (through [`crate::message::Envelope`]), the worker reads them back to
//! link its batch span to the requests whose events it carries. With tracing off there is no
//! valid context and nothing is written.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(value.into()));
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// The `traceparent` value of `span`, for the message carrying its events.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut headers = FieldTable::default();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut headers));
    match headers.inner().get("traceparent")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Header with the W3C `traceparent` of the (first) request a message carries events of.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Header listing the `traceparent` of every request whose events a packed message carries.
pub const HEADER_TRACEPARENTS: &str = "x-traceparents";

/// Every trace context a message carries: its `traceparent` and, for a packed message, the
/// others listed in [`HEADER_TRACEPARENTS`].
pub fn extract(properties: &BasicProperties) -> Vec<SpanContext> {
    let Some(headers) = properties.headers().as_ref() else {
        return Vec::new();
    };
    let propagator = TraceContextPropagator::new();
    let mut out = Vec::new();
    let mut push = |context: opentelemetry::Context| {
        let span_context = context.span().span_context().clone();
        if span_context.is_valid() && !out.contains(&span_context) {
            out.push(span_context);
        }
    };
    push(propagator.extract(&HeaderExtractor(headers)));
    if let Some(AMQPValue::FieldArray(all)) = headers.inner().get(HEADER_TRACEPARENTS) {
        for value in all.as_slice() {
            let mut one = FieldTable::default();
            one.insert("traceparent".into(), value.clone());
            push(propagator.extract(&HeaderExtractor(&one)));
        }
    }
    out
}

/// The trace id of `span` as hex, for log lines; `None` when tracing is off.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    /// A traceparent written by another service is read back as the same span context.
    #[test]
    fn traceparent_header_is_read_back() {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        );
        let properties = BasicProperties::default().with_headers(headers);
        let context = extract(&properties).pop().expect("a valid context");
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(context.trace_flags(), TraceFlags::SAMPLED);
        assert_eq!(context.trace_state(), &TraceState::default());
    }

    /// No header, a garbled one, or an untraced span: no context, nothing written.
    #[test]
    fn missing_or_garbled_context_is_ignored() {
        assert!(extract(&BasicProperties::default()).is_empty());
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("garbage".into()),
        );
        assert!(extract(&BasicProperties::default().with_headers(headers)).is_empty());
        assert_eq!(traceparent(&tracing::Span::none()), None);
    }
}
