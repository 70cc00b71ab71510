//! The load: N keep-alive HTTP/1.1 connections, closed-loop (each as fast as it goes) or
//! open-loop (a fixed arrival rate; latency counts from the intended send time, so queueing
//! inside the server is not hidden by a slow client — no coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::workload::{Pick, Workload};

/// How to drive the load.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub addr: SocketAddr,
    /// Sent as `Authorization: Bearer`; `None` for an ingest that takes events from anyone.
    pub write_key: Option<String>,
    pub connections: usize,
    /// Events per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Events per request: 1 posts single events, more posts JSON arrays to the batch endpoint.
    pub batch: usize,
    /// Resend a request that was not accepted (503, a broken connection) as a client should:
    /// after Retry-After, until it is accepted or `RESEND_GIVE_UP` after the load's end. A
    /// chaos run uses it; a measuring run counts failures instead.
    pub resend: bool,
}

/// How long after the load's end a resending client keeps trying one request.
pub const RESEND_GIVE_UP: Duration = Duration::from_secs(180);

/// Counters shared by the connections, read by the progress line.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub accepted_requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub unique_accepted: AtomicU64,
    pub duplicates_accepted: AtomicU64,
    /// Requests sent again after a 503 or a broken connection.
    pub resends: AtomicU64,
    /// Requests a resending client gave up on (never accepted).
    pub abandoned: AtomicU64,
    /// The numbers of the unique events accepted, kept by resending (chaos) runs only.
    pub accepted_unique: std::sync::Mutex<Vec<u64>>,
}

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// What the load did.
pub struct LoadOutcome {
    /// Request latency in microseconds.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
    /// Non-202 answers by status (0: connection error).
    pub failures: std::collections::BTreeMap<u16, u64>,
}

/// Runs the load until the duration is over.
pub async fn run(
    settings: &LoadSettings,
    workload: Arc<Workload>,
    counters: Arc<Counters>,
) -> anyhow::Result<LoadOutcome> {
    let started = Instant::now();
    let deadline = started + settings.duration;
    let slot = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..settings.connections.max(1) {
        let settings = settings.clone();
        let (workload, counters, slot) = (workload.clone(), counters.clone(), slot.clone());
        tasks.push(tokio::spawn(async move {
            connection(settings, workload, counters, slot, started, deadline).await
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut failures = std::collections::BTreeMap::new();
    for task in tasks {
        let (hist, fails) = task.await??;
        latency.add(&hist)?;
        for (status, n) in fails {
            *failures.entry(status).or_insert(0) += n;
        }
    }
    Ok(LoadOutcome {
        latency,
        elapsed: started.elapsed(),
        failures,
    })
}

type ConnectionResult = anyhow::Result<(Histogram<u64>, std::collections::BTreeMap<u16, u64>)>;

async fn connection(
    settings: LoadSettings,
    workload: Arc<Workload>,
    counters: Arc<Counters>,
    slot: Arc<AtomicU64>,
    started: Instant,
    deadline: Instant,
) -> ConnectionResult {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut failures = std::collections::BTreeMap::new();
    let path = if settings.batch > 1 {
        "/product_events/batch"
    } else {
        "/product_events/"
    };
    let mut sender = None;
    let mut body = Vec::with_capacity(workload.event_size() * settings.batch.max(1) + 16);
    let mut picks = Vec::with_capacity(settings.batch.max(1));
    while let Some(intended) = next_start(&settings, &slot, started, deadline).await {
        fill(&settings, &workload, &mut body, &mut picks);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let intended = intended.min(Instant::now());
        let mut status = send(&mut sender, &settings, path, &body).await;
        while settings.resend && status.0 != 202 && Instant::now() < deadline + RESEND_GIVE_UP {
            counters.resends.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(status.1.unwrap_or(Duration::from_millis(500))).await;
            status = send(&mut sender, &settings, path, &body).await;
        }
        let status = status.0;
        if settings.resend && status != 202 {
            counters.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        let done = Instant::now();
        latency.saturating_record(
            u64::try_from(done.duration_since(intended).as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        if status == 202 {
            count_accepted(&settings, &workload, &counters, &picks, done);
        } else {
            counters.failed_requests.fetch_add(1, Ordering::Relaxed);
            *failures.entry(status).or_insert(0) += 1;
        }
    }
    Ok((latency, failures))
}

/// When the next request should start, or `None` past the deadline. Open loop: each request
/// has an intended start, and latency counts from it; closed loop: now.
async fn next_start(
    settings: &LoadSettings,
    slot: &AtomicU64,
    started: Instant,
    deadline: Instant,
) -> Option<Instant> {
    let Some(rate) = settings.rate else {
        let now = Instant::now();
        return (now < deadline).then_some(now);
    };
    let k = slot.fetch_add(1, Ordering::Relaxed);
    let at = started + Duration::from_secs_f64(k as f64 * settings.batch.max(1) as f64 / rate);
    if at >= deadline {
        return None;
    }
    // tokio's timer ticks in whole milliseconds and fires at the first tick at or after its
    // deadline, which would add up to a tick of the generator's own to every latency. So wake
    // a tick early and count from the earlier of the intended and the actual send (the
    // caller): a send the generator itself delays (every connection busy) still counts from
    // its intended time.
    tokio::time::sleep_until(at.checked_sub(TIMER_TICK).unwrap_or(at).into()).await;
    Some(at)
}

/// Writes the next request's body (one event, or a JSON array of `batch`) and what it sends.
fn fill(settings: &LoadSettings, workload: &Workload, body: &mut Vec<u8>, picks: &mut Vec<Pick>) {
    body.clear();
    picks.clear();
    let now = Instant::now();
    if settings.batch > 1 {
        body.push(b'[');
    }
    for i in 0..settings.batch.max(1) {
        if i > 0 {
            body.push(b',');
        }
        let pick = workload.next(now);
        let n = match pick {
            Pick::Unique(n) | Pick::Duplicate(n) => n,
        };
        workload.body(n, body);
        picks.push(pick);
    }
    if settings.batch > 1 {
        body.push(b']');
    }
}

/// Counts an accepted request's events: unique ones may now be repeated.
fn count_accepted(
    settings: &LoadSettings,
    workload: &Workload,
    counters: &Counters,
    picks: &[Pick],
    done: Instant,
) {
    counters.accepted_requests.fetch_add(1, Ordering::Relaxed);
    for pick in picks {
        match *pick {
            Pick::Unique(n) => {
                counters.unique_accepted.fetch_add(1, Ordering::Relaxed);
                workload.accepted(n, done);
                if settings.resend {
                    counters
                        .accepted_unique
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(n);
                }
            }
            Pick::Duplicate(_) => {
                counters.duplicates_accepted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

/// Posts `body` on the connection in `sender` (opening one when there is none): the status
/// (0 when the connection failed, which drops it) and the Retry-After of a 503.
async fn send(
    sender: &mut Option<Sender>,
    settings: &LoadSettings,
    path: &str,
    body: &[u8],
) -> (u16, Option<Duration>) {
    if sender.is_none() {
        *sender = connect(settings.addr).await.ok();
    }
    let Some(client) = sender.as_mut() else {
        return (0, None);
    };
    let mut request = hyper::Request::post(path)
        .header("host", "bench")
        .header("content-type", "application/json");
    if let Some(key) = &settings.write_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body)));
    let Ok(request) = request else {
        return (0, None);
    };
    match client.send_request(request).await {
        Ok(response) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(Duration::from_secs);
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            (status, retry_after)
        }
        Err(_) => {
            *sender = None;
            (0, None)
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
