//! Hostile requests sent beside the normal load: the inputs that once stalled every worker or
//! blew up ingest's memory, each over and over on its own connection. Every one must be
//! refused with a 4xx while the normal load settles; the run's peak RSS shows what they cost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// One kind of hostile request.
struct Hostile {
    name: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Bytes,
    /// Announce this many bytes and send none: ingest must answer 413 from the header alone,
    /// without reading (or buffering) the body.
    announce_only: Option<usize>,
}

/// A valid event's text with one member replaced: `member` set to `value` (raw JSON text), or
/// a member named `name` (raw JSON text) added.
fn altered(event: &str, member: &str, value: &str) -> Bytes {
    let mut v: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
    v[member] = MARKER.into();
    Bytes::from(v.to_string().replacen(&format!("\"{MARKER}\""), value, 1))
}

const MARKER: &str = "hostile-marker";

/// The requests: the five inputs of the poison-pipeline issue and the oversized bodies.
fn requests(event: &str, max_batch_body_bytes: usize) -> Vec<Hostile> {
    let nested = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    let single = |name, body| Hostile {
        name,
        path: "/product_events/",
        content_type: "application/json",
        body,
        announce_only: None,
    };
    let with_name = {
        let mut v: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
        v[MARKER] = 1.into();
        Bytes::from(
            v.to_string()
                .replacen(&format!("\"{MARKER}\""), r#""x\u0000y""#, 1),
        )
    };
    vec![
        single("nul", altered(event, "platform", r#""\u0000""#)),
        single("lone_surrogate", altered(event, "platform", r#""\ud800""#)),
        single("number_1e200000", altered(event, "platform", "1e200000")),
        single(
            "nul_in_required_field",
            altered(event, "sid", r#""s\u0000""#),
        ),
        single("nul_in_member_name", with_name),
        single(
            "year_zero",
            altered(event, "event_datetime", r#""0001-01-01T00:30:00+01:00""#),
        ),
        single("nested_client_id", altered(event, "client_id", &nested)),
        // Read whole (just under ingest's 1 MiB default limit), then refused for its NUL.
        single(
            "big_event_with_nul",
            altered(
                event,
                "padding",
                &format!("\"{}\\u0000\"", "x".repeat(1_000_000)),
            ),
        ),
        Hostile {
            name: "ndjson_of_tiny_items_at_the_limit",
            path: "/product_events/batch",
            content_type: "application/x-ndjson",
            body: Bytes::from(b"1\n".repeat(max_batch_body_bytes / 2)),
            announce_only: None,
        },
        Hostile {
            name: "ndjson_32mib_announced",
            path: "/product_events/batch",
            content_type: "application/x-ndjson",
            body: Bytes::new(),
            announce_only: Some(32 << 20),
        },
    ]
}

/// What the hostile sender saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostileOutcome {
    pub sent: u64,
    /// Answers that were not a 4xx, by request kind and status (0: connection error).
    pub not_refused: Vec<(String, u16)>,
}

impl HostileOutcome {
    pub fn ok(&self) -> bool {
        self.sent > 0 && self.not_refused.is_empty()
    }
}

/// Sends every hostile request in turn, `connections` senders at once, until `duration` is
/// over. `event` is a valid event's JSON text the single-event requests are made from.
pub async fn run(
    addr: SocketAddr,
    write_key: Option<String>,
    event: String,
    max_batch_body_bytes: usize,
    connections: usize,
    duration: Duration,
) -> HostileOutcome {
    let requests = Arc::new(requests(&event, max_batch_body_bytes));
    // The key lets the hostile bodies past the door, to the checks they are meant to meet.
    let authorization = Arc::new(write_key.map(|k| format!("Bearer {k}")));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for start in 0..connections.max(1) {
        let requests = requests.clone();
        let authorization = authorization.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = HostileOutcome::default();
            let mut i = start;
            while Instant::now() < deadline {
                let request = &requests[i % requests.len()];
                i += 1;
                let status = post(addr, request, authorization.as_deref()).await;
                outcome.sent += 1;
                if !(400..500).contains(&status) {
                    outcome.not_refused.push((request.name.to_owned(), status));
                }
            }
            outcome
        }));
    }
    let mut total = HostileOutcome::default();
    for task in tasks {
        if let Ok(outcome) = task.await {
            total.sent += outcome.sent;
            total.not_refused.extend(outcome.not_refused);
        }
    }
    total
}

/// One request on a fresh connection (ingest may close it after a 413): the status, or 0
/// when the connection failed before an answer.
async fn post(addr: SocketAddr, request: &Hostile, authorization: Option<&str>) -> u16 {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    if let Some(length) = request.announce_only {
        return announce(stream, request, length, authorization).await;
    }
    let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await else {
        return 0;
    };
    tokio::spawn(conn);
    let mut http = hyper::Request::post(request.path)
        .header("host", "bench")
        .header("content-type", request.content_type);
    if let Some(authorization) = authorization {
        http = http.header("authorization", authorization);
    }
    let Ok(http) = http.body(Full::new(request.body.clone())) else {
        return 0;
    };
    match sender.send_request(http).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

/// Sends only the head of a request announcing `length` bytes and reads the status line.
async fn announce(
    mut stream: tokio::net::TcpStream,
    request: &Hostile,
    length: usize,
    authorization: Option<&str>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authorization = authorization
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: bench\r\ncontent-type: {}\r\n{authorization}content-length: {length}\r\n\r\n",
        request.path, request.content_type
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    let mut answer = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer)).await {
        // "HTTP/1.1 413"
        Ok(Ok(_)) => std::str::from_utf8(&answer[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hostile single event is one the validator refuses (or, for year 0, one outside
    /// any window): none of them is the valid event it was made from.
    #[test]
    fn every_hostile_single_event_is_invalid() {
        let mut event = Vec::new();
        crate::workload::Workload::new("t", 0.0, Duration::ZERO)
            .expect("workload")
            .body(1, &mut event);
        let event = String::from_utf8(event).expect("UTF-8");
        assert!(dedup_event::event::validate_raw(event.as_bytes()).is_ok());
        let requests = requests(&event, 1 << 20);
        assert_eq!(requests.len(), 10);
        for request in requests.iter().filter(|r| r.path == "/product_events/") {
            match dedup_event::event::validate_raw(&request.body) {
                Err(_) => {}
                Ok(fields) => assert!(
                    fields.event_date() < chrono::NaiveDate::from_ymd_opt(2, 1, 1).expect("date"),
                    "{} is a valid event",
                    request.name
                ),
            }
        }
    }
}
