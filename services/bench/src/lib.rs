//! dedup-bench: drives the real pipeline over HTTP and measures the machine's own ceilings
//! in the same run, so the pipeline's figures read as ratios of what the box can do.
//!
//! # Layout
//!
//! - [`workload`]: the events sent (the 2 KB TV sample, unique keys, timed exact repeats).
//! - [`load`]: keep-alive HTTP/1.1 load, closed or open loop, latency histograms.
//! - [`hostile`]: hostile requests beside the load, each of which must be refused.
//! - [`services`]: the binaries under test, their isolated names, their CPU and memory.
//! - [`ceilings`]: RabbitMQ, PostgreSQL and Redis measured with the pipeline's own code.
//! - [`chaos`]: load while the worker is killed and the services restarted; exactly-once
//!   proved afterwards.
//! - [`report`]: the printed table, JSON and markdown.

pub mod ceilings;
pub mod chaos;
pub mod hostile;
pub mod load;
pub mod report;
pub mod services;
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
use crate::services::{Backends, Binaries, Isolation, Pipeline};
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
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
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
    pub quiet: bool,
    /// Connections sending hostile requests beside the load (0: none).
    pub hostile_connections: usize,
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
    let iso = Isolation::new(&opts.backends, name);
    iso.create(&opts.backends).await?;
    let result = run_isolated(&mut opts, &iso).await;
    if !opts.keep {
        iso.remove(&opts.backends).await;
    }
    result
}

async fn run_isolated(opts: &mut RunOptions, iso: &Isolation) -> anyhow::Result<RunFigures> {
    let pipeline = Pipeline::start(
        &opts.binaries,
        &opts.backends,
        iso,
        &opts.logs,
        &opts.worker_env,
        &opts.ingest_env,
    )
    .await?;
    opts.load.addr = pipeline.ingest_addr;
    let workload = Arc::new(Workload::new(
        &iso.name,
        opts.duplicates,
        opts.duplicate_delay,
    )?);
    let counters = Arc::new(Counters::default());
    let depth_reader =
        DepthReader::new(&opts.backends.rabbitmq_management, Duration::from_secs(2)).ok();
    let vhost = dedup_runtime::queue_depth::vhost_of(&opts.backends.rabbitmq);

    // Progress: once a second, what was sent and what the worker settled.
    let stop_progress = tokio_util::sync::CancellationToken::new();
    let progress = tokio::spawn({
        let (counters, stop, quiet) = (counters.clone(), stop_progress.clone(), opts.quiet);
        let (worker_admin, queue) = (pipeline.worker_admin, iso.topology.queue.clone());
        let (reader, vhost) = (depth_reader.clone(), vhost.clone());
        async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut last_requests = 0;
            loop {
                let scrape = http_get(worker_admin, "/metrics")
                    .await
                    .map(|(_, b)| b)
                    .unwrap_or_default();
                let settled = metric_sum(&scrape, "dedup_worker_events_consumed_total");
                let stored = metric_sum(&scrape, "dedup_worker_events_stored_total");
                let depth = match &reader {
                    Some(r) => r
                        .read(&vhost, &queue)
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
    });

    let servers_before = services::ServerSnapshot::take();
    let redis_before = services::redis_memory(&opts.backends, iso).await?;
    let hostile = (opts.hostile_connections > 0).then(|| {
        let mut event = Vec::new();
        workload.body(u64::MAX, &mut event);
        tokio::spawn(hostile::run(
            pipeline.ingest_addr,
            String::from_utf8_lossy(&event).into_owned(),
            max_batch_body_bytes(&opts.ingest_env),
            opts.hostile_connections,
            opts.load.duration,
        ))
    });
    let outcome = load::run(&opts.load, workload.clone(), counters.clone()).await?;
    let hostile = match hostile {
        Some(task) => Some(task.await.context("hostile sender")?),
        None => None,
    };
    let load_end = Instant::now();
    let load_start = load_end - outcome.elapsed;
    let unique_sent = counters.unique_accepted.load(Ordering::Relaxed);
    let duplicates_sent = counters.duplicates_accepted.load(Ordering::Relaxed);

    // Settle: wait until every unique event is stored.
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(&iso.database_url)
        .await?;
    let rows = loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM product_events")
            .fetch_one(&db)
            .await?;
        if rows as u64 >= unique_sent || load_end.elapsed() > opts.settle_timeout {
            break rows as u64;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let settled_at = Instant::now();
    // Let the last duplicates be counted too.
    let scrape = loop {
        let scrape = http_get(pipeline.worker_admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        let consumed = metric_sum(&scrape, "dedup_worker_events_consumed_total") as u64;
        if consumed >= unique_sent + duplicates_sent || load_end.elapsed() > opts.settle_timeout {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop_progress.cancel();
    let samples = progress.await.context("progress task")?;
    let ingest_scrape = http_get(pipeline.ingest_admin, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let route = if opts.load.batch > 1 {
        "batch"
    } else {
        "single"
    };
    let latency_breakdown =
        crate::report::LatencyBreakdown::from_scrape(&ingest_scrape, route, &outcome.latency);

    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT r FROM product_events GROUP BY r HAVING count(*) > 1) t",
    )
    .fetch_one(&db)
    .await?;
    db.close().await;
    let tiers = ["in_batch", "recent_keys", "postgres"];
    let duplicates_by_tier: Vec<(String, u64)> = tiers
        .iter()
        .map(|t| {
            (
                t.to_string(),
                metric_sum(
                    &scrape,
                    &format!("dedup_worker_duplicates_total{{tier=\"{t}\"}}"),
                ) as u64,
            )
        })
        .collect();
    let duplicates_dropped = metric_sum(&scrape, "dedup_worker_duplicates_total") as u64;
    let dead_lettered = metric_sum(&scrape, "dedup_worker_dead_lettered_total") as u64;
    let failed_requests = counters.failed_requests.load(Ordering::Relaxed);
    let servers_cpu = services::ServerSnapshot::take().since(&servers_before);
    let redis_after = services::redis_memory(&opts.backends, iso).await?;
    let redis_bytes_per_key = (redis_after.1 > redis_before.1).then(|| {
        redis_after.0.saturating_sub(redis_before.0) as f64
            / (redis_after.1 - redis_before.1) as f64
    });
    let ingest_usage = services::usage(pipeline.ingest.id());
    let worker_usage = services::usage(pipeline.worker.id());
    pipeline.stop().await?;

    // Steady state: the middle half of the load.
    let (a, b) = (
        load_start + outcome.elapsed / 4,
        load_start + outcome.elapsed * 3 / 4,
    );
    let first = samples.iter().find(|s| s.at >= a).copied();
    let last = samples.iter().rev().find(|s| s.at <= b).copied();
    let (steady, depth) = match (first, last) {
        (Some(f), Some(l)) if l.at > f.at => (
            (l.settled - f.settled) / l.at.duration_since(f.at).as_secs_f64(),
            (f.depth, l.depth),
        ),
        _ => (0.0, (-1, -1)),
    };
    let events_accepted = unique_sent + duplicates_sent;
    let secs = outcome.elapsed.as_secs_f64();
    let correctness = Correctness {
        unique_sent,
        duplicates_sent,
        rows_stored: rows,
        keys_stored_twice: twice as u64,
        duplicates_dropped,
        dead_lettered,
        failed_requests,
        // A run that sent nothing proves nothing.
        ok: unique_sent > 0
            && rows == unique_sent
            && twice == 0
            && duplicates_dropped == duplicates_sent
            && dead_lettered == 0
            && failed_requests == 0
            && hostile.as_ref().is_none_or(hostile::HostileOutcome::ok),
    };
    Ok(RunFigures {
        mode: match opts.load.rate {
            Some(r) => format!("open loop at {r:.0} events/s"),
            None => "closed loop".to_owned(),
        },
        connections: opts.load.connections,
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
        settle_s: settled_at.duration_since(load_end).as_secs_f64(),
        ingest: ingest_usage,
        worker: worker_usage,
        servers_cpu,
        redis_keys: redis_after.1,
        redis_bytes_per_key,
        duplicates_by_tier,
        hostile,
        correctness,
    })
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
    }
}
