//! The public HTTP API: `POST /product_events/` (one event), `POST /product_events/batch`
//! (many), `GET /healthz`, `GET /readyz`. Routers come from [`app`] so tests drive them directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use dedup_event::event::RawError;
use dedup_event::{FieldErrors, event};
use dedup_message::message::{self, Envelope};
use dedup_message::trace_context;
use dedup_runtime::admin::{Readiness, readiness_response};
use serde::Serialize;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{Caller, Guard};
use crate::body;
use crate::coalesce::Coalescer;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::publish::{PublishError, Publisher};

/// Request limits, from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub max_batch_events: usize,
    /// Most events in one message (`MAX_EVENTS_PER_MESSAGE`).
    pub max_events_per_message: usize,
    /// The accepted range of `event_datetime`.
    pub window: event::Window,
    /// The dedup key events are routed to their queue by (`DEDUP_KEY_FIELDS`).
    pub key: dedup_event::key::KeySpec,
    /// Queues the events are spread over (`AMQP_QUEUE_SHARDS`).
    pub shards: u16,
    pub request_timeout: Duration,
    pub retry_after: Duration,
}

/// What every handler shares. The router holds it behind one `Arc`: axum clones the state
/// for every extractor and middleware of every request, and one reference count is cheaper
/// than a dozen bounced between cores.
#[derive(Clone)]
pub struct AppState {
    /// Rate limits and write keys.
    pub guard: Arc<Guard>,
    pub publisher: Arc<Publisher>,
    /// Packs concurrent single events into shared messages.
    pub coalescer: Arc<Coalescer>,
    pub limits: Arc<Limits>,
    pub metrics: Metrics,
    pub ready: Readiness,
    /// Bytes of single-event bodies being read or processed, in KiB permits: a request waits
    /// for its body's share before reading it, so bodies in flight are bounded together.
    pub body_bytes: Arc<tokio::sync::Semaphore>,
    /// The same for batch bodies, apart: a flood of big batches never holds up single events.
    pub batch_bytes: Arc<tokio::sync::Semaphore>,
}

/// Permits of [`AppState::body_bytes`] or [`AppState::batch_bytes`] for a body of `bytes`.
pub fn kib_permits(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// The public router.
pub fn app(state: AppState) -> Router {
    let state = Arc::new(state);
    let limits = state.limits.clone();
    // The handlers read their bodies themselves, within their limits (`read_gated`).
    let single = post(post_event);
    let batch = post(post_batch);
    let events = Router::new()
        .route("/product_events/", single.clone())
        .route("/product_events", single)
        .route("/product_events/batch", batch.clone())
        .route("/product_events/batch/", batch)
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    events
        .route("/healthz", get(dedup_runtime::admin::healthz))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// Lets a request on to the event routes only within its client address's rate and with a
/// valid write key; its [`Caller`] goes along as an extension.
async fn admit(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    // The TCP peer, plain or TLS: the client, or the proxy in front of it.
    let peer = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>();
    match state.guard.admit(request.headers(), peer) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    readiness_response(&state.ready)
}

/// One event: validate, publish, answer 202 once the broker confirmed it. It runs in the
/// request span (no span of its own: one span per request is enough to trace it, and each
/// span costs every request its bookkeeping).
async fn post_event(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response> {
    body::kind(&headers, false)?;
    caller.take(1)?;
    let (bytes, _permit) = read_gated(
        &state.body_bytes,
        &headers,
        body,
        state.limits.max_body_bytes,
    )
    .await?;
    // Only the required fields are parsed; the client's own text travels on as the event.
    let shard = match judge(&state.limits, &bytes, Utc::now()) {
        Ok(shard) => shard,
        Err(RawError::Malformed(detail)) => return Err(Error::MalformedJson(detail)),
        Err(RawError::Invalid(errors)) => {
            caller.rejected.inc();
            return Err(Error::Invalid(errors));
        }
    };
    let line = message::ndjson_line(&bytes).map_err(|e| Error::MalformedJson(e.to_string()))?;
    let traceparent = trace_context::traceparent(&tracing::Span::current());
    state
        .coalescer
        .publish(shard, line, Utc::now(), traceparent, caller.source.clone())
        .await
        .map_err(|e| unavailable(e, &state.limits))?;
    caller.accepted.inc();
    Ok(queued())
}

/// The 202 answer to one event: always the same bytes, so built from a constant.
fn queued() -> Response {
    (
        StatusCode::ACCEPTED,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"status":"queued"}"#,
    )
        .into_response()
}

/// One item's problems in a batch answer.
#[derive(Debug, Serialize)]
struct ItemErrors {
    index: usize,
    errors: FieldErrors,
}

#[derive(Debug, Serialize)]
struct BatchAnswer {
    status: &'static str,
    queued: usize,
    rejected: usize,
    errors: Vec<ItemErrors>,
}

/// Reads a body of at most `limit` bytes once its share of `gate` is free; the permit is
/// held while the request is processed. A body announced over the limit is 413 unread; one
/// of unknown length takes the limit's share.
async fn read_gated<'a>(
    gate: &'a tokio::sync::Semaphore,
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<(Bytes, tokio::sync::SemaphorePermit<'a>)> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::BodyTooLarge { limit });
    }
    let permit = gate
        .acquire_many(kib_permits(declared.unwrap_or(limit)))
        .await
        .map_err(|_| Error::Internal(anyhow::anyhow!("the body gate is closed")))?;
    let bytes = body::read_limited(body, limit, declared).await?;
    Ok((bytes, permit))
}

/// Whether ingest accepts one event's text (valid, storable, inside the accepted window), and
/// if so the queue shard its dedup key routes it to.
fn judge(limits: &Limits, text: &[u8], now: DateTime<Utc>) -> Result<u16, RawError> {
    let event = event::parse_raw(text)?;
    limits
        .window
        .check_fields(&event.fields, now)
        .map_err(RawError::Invalid)?;
    if limits.shards <= 1 {
        return Ok(0);
    }
    let key = limits.key.key_of_raw(&event);
    Ok(dedup_message::topology::shard_of(&key.0, limits.shards))
}

/// Many events (JSON array or NDJSON): every valid one queued and confirmed, every invalid one
/// reported by its index. The body is read only once its bytes fit the batch bytes in flight.
#[tracing::instrument(skip_all, fields(events))]
async fn post_batch(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response> {
    let kind = body::kind(&headers, true)?;
    let (bytes, _permit) = read_gated(
        &state.batch_bytes,
        &headers,
        body,
        state.limits.max_batch_body_bytes,
    )
    .await?;
    let items = body::batch(&bytes, kind, state.limits.max_batch_events)?;
    tracing::Span::current().record("events", items.len());
    let traceparent = trace_context::traceparent(&tracing::Span::current());
    let (messages, errors) = pack(
        &state.limits,
        items,
        traceparent.as_deref(),
        caller.source.as_deref(),
    );
    let rejected = errors.len();
    caller.rejected.inc_by(rejected as u64);
    if messages.is_empty() {
        let answer = BatchAnswer {
            status: "rejected",
            queued: 0,
            rejected,
            errors,
        };
        return Ok((StatusCode::BAD_REQUEST, Json(answer)).into_response());
    }
    // The key's bucket pays for the events that would be queued; none are when it is empty.
    caller.take(messages.iter().map(|(_, m)| m.events()).sum())?;
    let outcomes = futures::future::join_all(
        messages
            .iter()
            .map(|(shard, m)| state.publisher.publish(m, *shard)),
    )
    .await;
    let mut queued = 0;
    let mut first_error = None;
    for (outcome, (_, message)) in outcomes.into_iter().zip(&messages) {
        match outcome {
            Ok(()) => queued += message.events(),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    caller.accepted.inc_by(queued as u64);
    if let Some(error) = first_error {
        let total: usize = messages.iter().map(|(_, m)| m.events()).sum();
        let reason = format!(
            "{error} ({queued} of {total} valid events were queued; resend the whole batch)"
        );
        return Err(Error::Unavailable {
            reason,
            retry_after: state.limits.retry_after,
        });
    }
    let answer = BatchAnswer {
        status: "queued",
        queued,
        rejected,
        errors,
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Judges every item of a batch as a single event and packs the accepted ones into
/// envelopes, each for one queue shard (an event alone may be up to the single-event limit).
/// Returns the envelopes with their shards and each refused item's errors by index.
fn pack(
    limits: &Limits,
    items: Vec<&[u8]>,
    traceparent: Option<&str>,
    source: Option<&str>,
) -> (Vec<(u16, Envelope)>, Vec<ItemErrors>) {
    let now = Utc::now();
    let mut errors = Vec::new();
    let mut messages: Vec<(u16, Envelope)> = Vec::new();
    // Per shard, the index in `messages` of the envelope still being filled.
    let mut open: Vec<Option<usize>> = vec![None; usize::from(limits.shards.max(1))];
    for (index, text) in items.into_iter().enumerate() {
        let outcome = judge_item(limits, text, now).and_then(|shard| {
            // A line is at most the trimmed text and a newline (a multi-line item
            // re-serialises shorter), so room is checked against that.
            let line_len = text.trim_ascii().len() + 1;
            let slot = &mut open[usize::from(shard)];
            let at = match *slot {
                Some(at)
                    if messages[at]
                        .1
                        .has_room(line_len, limits.max_events_per_message) =>
                {
                    at
                }
                _ => {
                    messages.push((shard, Envelope::new()));
                    *slot = Some(messages.len() - 1);
                    messages.len() - 1
                }
            };
            messages[at]
                .1
                .push(text, now, traceparent, source)
                .map_err(|e| event::non_field_error(&format!("JSON parse error - {e}")))
        });
        if let Err(field_errors) = outcome {
            errors.push(ItemErrors {
                index,
                errors: field_errors,
            });
        }
    }
    // An envelope opened for an item that then failed to re-serialise holds nothing.
    messages.retain(|(_, m)| m.events() > 0);
    (messages, errors)
}

/// One batch item judged as a single event would be (its shard, or its errors in the
/// original's shape).
fn judge_item(limits: &Limits, text: &[u8], now: DateTime<Utc>) -> Result<u16, FieldErrors> {
    if text.len() > limits.max_body_bytes {
        return Err(event::non_field_error(&format!(
            "Event larger than the {}-byte limit of a single event.",
            limits.max_body_bytes
        )));
    }
    judge(limits, text, now).map_err(|e| match e {
        RawError::Malformed(detail) => {
            event::non_field_error(&format!("JSON parse error - {detail}"))
        }
        RawError::Invalid(errors) => errors,
    })
}

/// One span per request; its trace id (when tracing is on) goes on every log line of the request.
fn request_span(request: &Request) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        trace_id = tracing::field::Empty,
    );
    if let Some(id) = trace_context::trace_id(&span) {
        span.record("trace_id", id);
    }
    span
}

fn unavailable(error: PublishError, limits: &Limits) -> Error {
    Error::Unavailable {
        reason: error.to_string(),
        retry_after: limits.retry_after,
    }
}

/// Counts and times every request, and gives the bare 503 of the timeout layer the JSON body
/// and `Retry-After` the handlers' own answers have.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some(p) if p.starts_with("/product_events/batch") => "batch",
        Some(p) if p.starts_with("/product_events") => "single",
        Some(_) => "health",
        None => "unmatched",
    };
    let started = Instant::now();
    let mut response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        if !is_json {
            let detail =
                json!({ "detail": "The request took too long. Retry later; resending is safe." });
            response = (StatusCode::SERVICE_UNAVAILABLE, Json(detail)).into_response();
        }
        let seconds = state.limits.retry_after.as_secs().max(1).to_string();
        if let Ok(value) = HeaderValue::from_str(&seconds) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let seconds = started.elapsed().as_secs_f64();
    let metrics = &state.metrics;
    if route == "single" {
        metrics.hot.single_seconds.observe(seconds);
    } else {
        metrics
            .request_seconds
            .with_label_values(&[route])
            .observe(seconds);
    }
    if (route, class) == ("single", "2xx") {
        metrics.hot.single_2xx.inc();
    } else {
        metrics.requests.with_label_values(&[route, class]).inc();
    }
    response
}
