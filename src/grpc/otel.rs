//! W3C trace-context propagation (feature `opentelemetry`): the `traceparent` and
//! `tracestate` of an attempt's span, as `tracing-opentelemetry` knows it, written into the
//! attempt's request metadata with OpenTelemetry's `TraceContextPropagator`, so that the
//! server's spans join the caller's trace.
#![deny(unsafe_code)]

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a mut HeaderMap);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Writes `span`'s trace context into `headers` (replacing one an earlier attempt wrote).
/// Without an OpenTelemetry layer (the span has no valid context) it writes nothing.
pub(crate) fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return;
    }
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(&context, &mut Headers(headers));
    // The propagator writes an empty `tracestate` when there is none: send none.
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
}
