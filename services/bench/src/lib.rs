//! dedup-bench: drives the real pipeline over HTTP and measures the machine's own ceilings
//! in the same run, so the pipeline's figures read as ratios of what the box can do.
//!
//! # Layout
//!
//! - [`workload`]: the events sent (the 2 KB TV sample, unique keys, timed exact repeats).
//! - [`load`]: keep-alive HTTP/1.1 load, closed or open loop, latency histograms.
//! - [`hostile`]: hostile requests beside the load, each of which must be refused.
//! - [`slow`]: slow clients beside the load, whose heads never end.
//! - [`services`]: the binaries under test, their isolated names, their CPU and memory.
//! - [`ceilings`]: RabbitMQ, PostgreSQL and Redis measured with their own clients on the
//!   pipeline's data and statements.
//! - [`compare`]: A/B runs of two builds, alternately, as ratios per pair.
//! - [`chaos`]: load while the worker is killed and the services restarted; exactly-once
//!   proved afterwards.
//! - [`report`]: the printed table, JSON and markdown.

pub mod ceilings;
pub mod chaos;
pub mod compare;
pub mod hostile;
pub mod load;
pub mod report;
pub mod services;
pub mod slow;
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use dedup_runtime::queue_depth::DepthReader;
use http_body_util::{BodyExt, Empty};
use sqlx::postgres::PgPoolOptions;

use crate::load::{Counters, LoadSettings};
use crate::report::{Correctness, Latency, RunFigures};
use crate::services::{Backends, Binaries, Isolation, Processes};
use crate::workload::Workload;

/// One GET over a fresh connection: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", "bench")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sum of every series of `name` in a Prometheus text scrape (0 when absent).
pub fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ', ',']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Options of a pipeline run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub load: LoadSettings,
    pub duplicates: f64,
    pub duplicate_delay: Duration,
    pub settle_timeout: Duration,
    pub binaries: Binaries,
    pub backends: Backends,
    pub logs: PathBuf,
    pub keep: bool,
    pub worker_env: Vec<(String, String)>,
    pub ingest_env: Vec<(String, String)>,
    /// Worker processes consuming the one queue (1 unless `--workers`).
    pub workers: usize,
    /// Queues the events are spread over (1 unless `--queue-shards`).
    pub queue_shards: u16,
    /// Rows in the partition of the load's day before the load (0 unless `--prefill-rows`).
    pub prefill_rows: u64,
    pub quiet: bool,
    /// Connections sending hostile requests beside the load (0: none).
    pub hostile_connections: usize,
    /// Slow clients holding unfinished request heads beside the load (0: none).
    pub slow_clients: usize,
    /// Bytes of padding each slow client's head starts with.
    pub slow_head_bytes: usize,
}

/// ingest's default MAX_BATCH_BODY_BYTES, unless the run sets it.
fn max_batch_body_bytes(ingest_env: &[(String, String)]) -> usize {
    ingest_env
        .iter()
        .find(|(k, _)| k == "MAX_BATCH_BODY_BYTES")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(8 << 20)
}

/// One stored-count sample of the progress loop.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    settled: f64,
    depth: i64,
}

/// Starts the pipeline, drives the load, waits for every event to settle, checks correctness.
pub async fn run_pipeline(mut opts: RunOptions, name: &str) -> anyhow::Result<RunFigures> {
    let mut iso = Isolation::new(&opts.backends, name);
    iso.topology.shards = opts.queue_shards.max(1);
    iso.create(&opts.backends).await?;
    // Dirty pages an earlier run (or its dropped schema) left would be written by
    // PostgreSQL's checkpointer during this run and counted in its CPU: write them first.
    if let Err(warning) = services::checkpoint(&opts.backends).await {
        eprintln!("warning: {warning}");
    }
    let result = run_isolated(&mut opts, &iso).await;
    if !opts.keep {
        iso.remove(&opts.backends).await;
    }
    result
}

async fn run_isolated(opts: &mut RunOptions, iso: &Isolation) -> anyhow::Result<RunFigures> {
    let processes = Processes::start(
        &opts.binaries,
        &opts.backends,
        iso,
        &opts.logs,
        (opts.workers, &opts.worker_env),
        &opts.ingest_env,
    )
    .await?;
    let workload = Arc::new(Workload::new(
        &iso.name,
        opts.duplicates,
        opts.duplicate_delay,
    )?);
    // The day the events carry, even when a long prefill runs past midnight UTC.
    if opts.prefill_rows > 0 {
        services::prefill(&opts.backends, iso, workload.day(), opts.prefill_rows).await?;
    }
    opts.load.addr = processes.ingest_addr;
    opts.load.write_key = processes.write_key.clone();
    let counters = Arc::new(Counters::default());

    // Progress: once a second, what was sent and what the worker settled.
    let stop_progress = tokio_util::sync::CancellationToken::new();
    let progress = tokio::spawn(progress(
        counters.clone(),
        stop_progress.clone(),
        opts.quiet,
        processes.worker_admins.clone(),
        iso.topology.queues(),
        DepthReader::new(&opts.backends.rabbitmq_management, Duration::from_secs(2)).ok(),
        dedup_runtime::queue_depth::vhost_of(&opts.backends.rabbitmq),
    ));

    let servers_before = services::ServerSnapshot::take();
    let redis_before = services::redis_memory(&opts.backends, iso).await?;
    let machine_before = services::MachineTicks::take();
    let (outcome, hostile, slow) = drive(opts, &processes, &workload, &counters).await?;
    let machine_cpu = services::MachineTicks::take()
        .zip(machine_before)
        .and_then(|(after, before)| after.since(&before));
    let load_end = Instant::now();
    let load_start = load_end - outcome.elapsed;
    let unique_sent = counters.unique_accepted.load(Ordering::Relaxed);
    let duplicates_sent = counters.duplicates_accepted.load(Ordering::Relaxed);

    // Settle: wait until every unique event is stored and every duplicate counted.
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(&iso.database_url)
        .await?;
    let deadline = load_end + opts.settle_timeout;
    let (settled_at, scrape) = settle(
        &processes.worker_admins,
        (unique_sent, duplicates_sent),
        deadline,
    )
    .await;
    // The servers' and the binaries' CPU up to here: the correctness queries below scan the
    // whole table and are the benchmark's work, not the pipeline's.
    let servers_cpu = services::ServerSnapshot::take().since(&servers_before);
    let ingest_usage = services::usage(processes.ingest.id());
    let worker_usage = processes.workers_usage();
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM product_events WHERE {}",
        services::not_prefilled(opts.prefill_rows > 0)
    )))
    .fetch_one(&db)
    .await?;
    let rows = rows as u64;
    stop_progress.cancel();
    let samples = progress.await.context("progress task")?;
    let mut consumed_per_worker = Vec::new();
    for admin in &processes.worker_admins {
        let scrape = scrape_workers(std::slice::from_ref(admin)).await;
        consumed_per_worker.push(metric_sum(&scrape, "dedup_worker_events_consumed_total") as u64);
    }
    let latency_breakdown = latency_breakdown(&processes, opts.load.batch, &outcome).await;
    // The workload gives every unique event its own `r`.
    let twice: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM (SELECT r FROM product_events WHERE {} GROUP BY r \
         HAVING count(*) > 1) t",
        services::not_prefilled(opts.prefill_rows > 0)
    )))
    .fetch_one(&db)
    .await?;
    db.close().await;
    let duplicates_by_tier = duplicates_by_tier(&scrape);
    let redis_after = services::redis_memory(&opts.backends, iso).await?;
    processes.stop().await?;

    let (steady, depth) = steady_state(&samples, load_start, outcome.elapsed);
    let events_accepted = unique_sent + duplicates_sent;
    let secs = outcome.elapsed.as_secs_f64();
    let correctness = Correctness::judge(
        (unique_sent, duplicates_sent),
        rows,
        twice as u64,
        &scrape,
        counters.failed_requests.load(Ordering::Relaxed),
        hostile.as_ref(),
        slow.as_ref(),
    );
    Ok(RunFigures {
        mode: match opts.load.rate {
            Some(r) => format!("open loop at {r:.0} events/s"),
            None => "closed loop".to_owned(),
        },
        connections: opts.load.connections,
        workers: opts.workers,
        queue_shards: opts.queue_shards.max(1),
        prefill_rows: opts.prefill_rows,
        consumed_per_worker,
        batch: opts.load.batch,
        duration_s: secs,
        requests_per_s: counters.accepted_requests.load(Ordering::Relaxed) as f64 / secs,
        events_accepted_per_s: events_accepted as f64 / secs,
        latency: Latency::from_micros(&outcome.latency),
        latency_breakdown,
        end_to_end_events_per_s: events_accepted as f64
            / settled_at.duration_since(load_start).as_secs_f64(),
        end_to_end_stored_per_s: unique_sent as f64
            / settled_at.duration_since(load_start).as_secs_f64(),
        steady_events_per_s: steady,
        queue_depth_steady: depth,
        machine_cpu,
        settle_s: settled_at.duration_since(load_end).as_secs_f64(),
        ingest: ingest_usage,
        worker: worker_usage,
        servers_cpu,
        redis_keys: redis_after.1,
        redis_bytes_per_key: services::bytes_per_key(redis_before, redis_after),
        duplicates_by_tier,
        hostile,
        slow,
        correctness,
    })
}

/// The load, with the hostile requests and the slow clients beside it when asked for.
async fn drive(
    opts: &RunOptions,
    processes: &Processes,
    workload: &Arc<Workload>,
    counters: &Arc<Counters>,
) -> anyhow::Result<(
    load::LoadOutcome,
    Option<hostile::HostileOutcome>,
    Option<slow::SlowOutcome>,
)> {
    let hostile = (opts.hostile_connections > 0).then(|| {
        let mut event = Vec::new();
        workload.body(u64::MAX, &mut event);
        tokio::spawn(hostile::run(
            processes.ingest_addr,
            processes.write_key.clone(),
            String::from_utf8_lossy(&event).into_owned(),
            max_batch_body_bytes(&opts.ingest_env),
            opts.hostile_connections,
            opts.load.duration,
        ))
    });
    let slow = (opts.slow_clients > 0).then(|| {
        tokio::spawn(slow::run(
            processes.ingest_addr,
            opts.slow_clients,
            opts.slow_head_bytes,
            opts.load.duration,
        ))
    });
    let outcome = load::run(&opts.load, workload.clone(), counters.clone()).await?;
    let hostile = match hostile {
        Some(task) => Some(task.await.context("hostile sender")?),
        None => None,
    };
    let slow = match slow {
        Some(task) => Some(task.await.context("slow clients")?),
        None => None,
    };
    Ok((outcome, hostile, slow))
}

/// Where a request's time went, from ingest's own histograms.
async fn latency_breakdown(
    processes: &Processes,
    batch: usize,
    outcome: &load::LoadOutcome,
) -> crate::report::LatencyBreakdown {
    let scrape = http_get(processes.ingest_admin, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let route = if batch > 1 { "batch" } else { "single" };
    crate::report::LatencyBreakdown::from_scrape(&scrape, route, &outcome.latency)
}

/// Once a second until `stop`: samples the worker's settled count and the queue depth, and
/// prints the progress unless `quiet`.
async fn progress(
    counters: Arc<Counters>,
    stop: tokio_util::sync::CancellationToken,
    quiet: bool,
    worker_admins: Vec<SocketAddr>,
    queues: Vec<String>,
    reader: Option<DepthReader>,
    vhost: String,
) -> Vec<Sample> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last_requests = 0;
    loop {
        let scrape = scrape_workers(&worker_admins).await;
        let settled = metric_sum(&scrape, "dedup_worker_events_consumed_total");
        let stored = metric_sum(&scrape, "dedup_worker_events_stored_total");
        let depth = match &reader {
            Some(r) => r
                .read_sum(&vhost, &queues)
                .await
                .map(|d| d.total() as i64)
                .unwrap_or(-1),
            None => -1,
        };
        samples.push(Sample {
            at: Instant::now(),
            settled,
            depth,
        });
        let requests = counters.requests.load(Ordering::Relaxed);
        if !quiet {
            eprintln!(
                "[{:>4.0}s] requests {requests} ({} req/s), accepted {}, failed {}, stored {stored:.0}, queue {depth}",
                started.elapsed().as_secs_f64(),
                requests - last_requests,
                counters.accepted_requests.load(Ordering::Relaxed),
                counters.failed_requests.load(Ordering::Relaxed),
            );
        }
        last_requests = requests;
        tokio::select! {
            () = stop.cancelled() => return samples,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Every worker's `/metrics`, one after the other: summing a metric over the text sums it over
/// the workers.
async fn scrape_workers(admins: &[SocketAddr]) -> String {
    let mut all = String::new();
    for admin in admins {
        if let Ok((_, body)) = http_get(*admin, "/metrics").await {
            all.push_str(&body);
            all.push('\n');
        }
    }
    all
}

/// Waits until the workers report every one of `sent.0` unique events stored and all
/// `sent.0 + sent.1` events consumed, or `deadline`. Returns when the last unique event was
/// stored, and the workers' last scrape.
///
/// It reads only the workers' metrics (a row counts as stored there once its transaction
/// committed): counting the table instead scans all of it, ~2.8 GB and half a second of both
/// cores by the end of a 30 s batch run, so polling it took the cores the drain needed and
/// was counted as PostgreSQL's CPU per event. The rows are counted once, afterwards.
async fn settle(
    worker_admins: &[SocketAddr],
    (unique, duplicates): (u64, u64),
    deadline: Instant,
) -> (Instant, String) {
    let mut stored_at = None;
    loop {
        let scrape = scrape_workers(worker_admins).await;
        let now = Instant::now();
        let stored = metric_sum(&scrape, "dedup_worker_events_stored_total") as u64;
        let consumed = metric_sum(&scrape, "dedup_worker_events_consumed_total") as u64;
        if stored >= unique && stored_at.is_none() {
            stored_at = Some(now);
        }
        let done = stored_at.is_some() && consumed >= unique + duplicates;
        if done || now > deadline {
            return (stored_at.unwrap_or(now), scrape);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The settled rate and the queue depth at both ends over the middle half of the load.
fn steady_state(samples: &[Sample], load_start: Instant, elapsed: Duration) -> (f64, (i64, i64)) {
    let (a, b) = (load_start + elapsed / 4, load_start + elapsed * 3 / 4);
    let first = samples.iter().find(|s| s.at >= a).copied();
    let last = samples.iter().rev().find(|s| s.at <= b).copied();
    match (first, last) {
        (Some(f), Some(l)) if l.at > f.at => (
            (l.settled - f.settled) / l.at.duration_since(f.at).as_secs_f64(),
            (f.depth, l.depth),
        ),
        _ => (0.0, (-1, -1)),
    }
}

impl Correctness {
    /// The run's proof: every unique event sent stored once, every duplicate dropped, nothing
    /// dead-lettered or failed, every hostile request answered as it should be, and no slow
    /// client's unfinished head answered but with a 4xx.
    fn judge(
        (unique_sent, duplicates_sent): (u64, u64),
        rows_stored: u64,
        keys_stored_twice: u64,
        worker_scrape: &str,
        failed_requests: u64,
        hostile: Option<&hostile::HostileOutcome>,
        slow: Option<&slow::SlowOutcome>,
    ) -> Self {
        let duplicates_dropped = metric_sum(worker_scrape, "dedup_worker_duplicates_total") as u64;
        let dead_lettered = metric_sum(worker_scrape, "dedup_worker_dead_lettered_total") as u64;
        Self {
            unique_sent,
            duplicates_sent,
            rows_stored,
            keys_stored_twice,
            duplicates_dropped,
            dead_lettered,
            failed_requests,
            // A run that sent nothing proves nothing.
            ok: unique_sent > 0
                && rows_stored == unique_sent
                && keys_stored_twice == 0
                && duplicates_dropped == duplicates_sent
                && dead_lettered == 0
                && failed_requests == 0
                && hostile.is_none_or(hostile::HostileOutcome::ok)
                && slow.is_none_or(slow::SlowOutcome::ok),
        }
    }
}

/// Duplicates the worker dropped, by tier, from its scrape.
fn duplicates_by_tier(scrape: &str) -> Vec<(String, u64)> {
    ["in_batch", "recent_keys", "postgres"]
        .iter()
        .map(|t| {
            let name = format!("dedup_worker_duplicates_total{{tier=\"{t}\"}}");
            (t.to_string(), metric_sum(scrape, &name) as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_every_series_of_one_name_only() {
        let scrape = "# HELP x\nfoo_total 2\nfoo_total_other 5\nbar{a=\"1\"} 1.5\nbar{a=\"2\"} 2\nbar_sum 9\n";
        assert_eq!(metric_sum(scrape, "foo_total"), 2.0);
        assert_eq!(metric_sum(scrape, "bar"), 3.5);
        assert_eq!(metric_sum(scrape, "missing"), 0.0);
        assert_eq!(metric_sum(scrape, "bar{a=\"2\"}"), 2.0);
        // A name with some of its labels sums the series that have them.
        let labelled = "ev{outcome=\"a\",source=\"x\"} 1\nev{outcome=\"a\",source=\"y\"} 2\nev{outcome=\"b\",source=\"x\"} 4\n";
        assert_eq!(metric_sum(labelled, "ev{outcome=\"a\""), 3.0);
    }
}
