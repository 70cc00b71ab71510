//! ingest's errors are HTTP outcomes: each variant knows its status and body. 5xx are logged;
//! internals never reach the client.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dedup_event::FieldErrors;
use serde_json::json;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event broke the contract; the body maps each field to its messages.
    #[error("invalid event")]
    Invalid(FieldErrors),
    #[error("JSON parse error - {0}")]
    MalformedJson(String),
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{count} events in one batch, the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("the batch holds no events")]
    EmptyBatch,
    /// The broker is unreachable or refused the message; the client should retry.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    /// No write key, or not a known one.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A token bucket (the key's or the client address's) is empty.
    #[error("too many requests for this {scope}")]
    RateLimited {
        scope: &'static str,
        retry_after: Duration,
    },
    /// A batch larger than the key's whole burst: it could never pass.
    #[error("{events} events in one request, more than this key's burst of {burst}")]
    OverBurst { events: usize, burst: u32 },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        match self {
            Error::Invalid(errors) => (StatusCode::BAD_REQUEST, Json(errors)).into_response(),
            Error::MalformedJson(_) => (StatusCode::BAD_REQUEST, Json(json!({ "detail": detail }))).into_response(),
            Error::UnsupportedMediaType(media) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({
                    "detail": format!(
                        "Unsupported media type \"{media}\" in request. Send Content-Type: \
                         application/json (or application/x-ndjson to the batch endpoint)."
                    )
                })),
            )
                .into_response(),
            Error::BodyTooLarge { limit } => too_large(format!(
                "Request body is larger than the {limit}-byte limit. Send fewer or smaller events per request."
            )),
            Error::TooManyEvents { count, limit } => too_large(format!(
                "The batch holds {count} events; at most {limit} are accepted per request. Split it."
            )),
            Error::EmptyBatch => (
                StatusCode::BAD_REQUEST,
                Json(json!({ "detail": "The batch holds no events. Send a JSON array or NDJSON lines." })),
            )
                .into_response(),
            Error::Unauthorized(detail) => {
                let mut response =
                    (StatusCode::UNAUTHORIZED, Json(json!({ "detail": detail }))).into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"dedup\""),
                );
                response
            }
            Error::RateLimited { scope, retry_after } => {
                // Whole seconds, rounded up: a client that waits this long finds a token.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({ "detail": format!(
                        "Request was throttled: too many events for this {scope}. Expected available in {} second{}.",
                        seconds.max(1), if seconds.max(1) == 1 { "" } else { "s" }
                    ) })),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                response
            }
            Error::OverBurst { .. } => too_large(format!(
                "{}. Send at most that many events per request.",
                capitalise(&detail)
            )),
            Error::Unavailable { reason, retry_after } => {
                tracing::warn!(%reason, "Answering 503: the broker did not take the events.");
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "detail": format!("Events not queued: {reason}. Retry later; resending is safe.") })),
                )
                    .into_response();
                let seconds = retry_after.as_secs().max(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                response
            }
            Error::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "Request failed with an internal error.");
                (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "detail": "Internal error." }))).into_response()
            }
        }
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn too_large(detail: String) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(json!({ "detail": detail })),
    )
        .into_response()
}
