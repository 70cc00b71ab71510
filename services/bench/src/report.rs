//! The benchmark report: printed as a table, written as JSON and markdown.

use std::path::Path;

use serde::Serialize;

use crate::ceilings::Ceilings;
use crate::services::{MachineCpu, ServerCpu, Usage};

/// The original Python service on this machine kind, for comparison.
pub const ORIGINAL_REQUESTS_PER_S: f64 = 150.0;
pub const ORIGINAL_STORED_PER_S: f64 = 85.0;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_micros(h: &hdrhistogram::Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// Where a request's time goes, as means over the run: the load generator's view, ingest's own
/// (request in to answer out) and, inside that, the broker's publish-to-confirm of the message
/// carrying the event; the rest of ingest's time is parsing and waiting for a coalescing
/// flusher, the rest of the client's is the kernel, the scheduler and the client itself.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyBreakdown {
    pub client_mean_ms: f64,
    pub ingest_mean_ms: f64,
    pub confirm_mean_ms: f64,
    /// Events per published message (packing of concurrent requests and batches).
    pub events_per_message: f64,
    /// The 99th percentiles of the time inside ingest and of the broker's confirm, from
    /// ingest's histograms (interpolated within a bucket, as Prometheus' histogram_quantile):
    /// with the client's p99, where the tail's time goes.
    pub ingest_p99_ms: f64,
    pub confirm_p99_ms: f64,
}

/// The `q` quantile in milliseconds of the histogram `name` (its `_bucket` series whose labels
/// contain `labels`) in a Prometheus scrape, interpolated linearly within the bucket it falls
/// in; 0 without observations.
pub fn histogram_quantile_ms(scrape: &str, name: &str, labels: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = scrape
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(labels))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse::<f64>().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                // Past the last finite bound: that bound is all that is known.
                return 1000.0 * lower;
            }
            let within = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return 1000.0 * (lower + (le - lower) * within);
        }
        (lower, below) = (le, count);
    }
    1000.0 * lower
}

impl LatencyBreakdown {
    /// From ingest's Prometheus scrape at the end of the load and the client's histogram.
    pub fn from_scrape(scrape: &str, route: &str, client: &hdrhistogram::Histogram<u64>) -> Self {
        let sum = |name: &str| crate::metric_sum(scrape, name);
        let mean_ms = |total: f64, count: f64| {
            if count > 0.0 {
                1000.0 * total / count
            } else {
                0.0
            }
        };
        let request = format!("{{route=\"{route}\"}}");
        Self {
            client_mean_ms: client.mean() / 1000.0,
            ingest_mean_ms: mean_ms(
                sum(&format!(
                    "dedup_ingest_request_duration_seconds_sum{request}"
                )),
                sum(&format!(
                    "dedup_ingest_request_duration_seconds_count{request}"
                )),
            ),
            confirm_mean_ms: mean_ms(
                sum("dedup_ingest_publish_confirm_duration_seconds_sum"),
                sum("dedup_ingest_publish_confirm_duration_seconds_count"),
            ),
            events_per_message: {
                let messages = sum("dedup_ingest_message_bytes_count");
                if messages > 0.0 {
                    sum("dedup_ingest_events_total{outcome=\"accepted\"") / messages
                } else {
                    0.0
                }
            },
            ingest_p99_ms: histogram_quantile_ms(
                scrape,
                "dedup_ingest_request_duration_seconds",
                &format!("route=\"{route}\""),
                0.99,
            ),
            confirm_p99_ms: histogram_quantile_ms(
                scrape,
                "dedup_ingest_publish_confirm_duration_seconds",
                "",
                0.99,
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Correctness {
    pub unique_sent: u64,
    pub duplicates_sent: u64,
    pub rows_stored: u64,
    pub keys_stored_twice: u64,
    pub duplicates_dropped: u64,
    pub dead_lettered: u64,
    pub failed_requests: u64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub mode: String,
    pub connections: usize,
    /// Worker processes consuming the queue.
    pub workers: usize,
    /// Queues the events were spread over.
    pub queue_shards: u16,
    /// Rows in the partition of the load's day before the load.
    pub prefill_rows: u64,
    /// Events each worker process consumed (how the queue split them).
    pub consumed_per_worker: Vec<u64>,
    pub batch: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub events_accepted_per_s: f64,
    pub latency: Latency,
    pub latency_breakdown: LatencyBreakdown,
    /// Events sent (unique and repeats) per second, first request to the last one settled.
    pub end_to_end_events_per_s: f64,
    /// Unique events stored per second over the same span (the original stored ~85/s).
    pub end_to_end_stored_per_s: f64,
    /// Events (unique + duplicate) the worker settled per second in the middle half of the run.
    pub steady_events_per_s: f64,
    /// Ready + unacked messages at the start and end of the middle half.
    pub queue_depth_steady: (i64, i64),
    pub settle_s: f64,
    pub ingest: Usage,
    pub worker: Usage,
    /// CPU of the local PostgreSQL, Redis and RabbitMQ from the first request to the last
    /// event settled; `None` when they do not run on this machine.
    pub servers_cpu: Option<ServerCpu>,
    /// How the machine's CPUs spent the load (busy, waiting on the disk, stolen); `None` where
    /// /proc/stat cannot be read.
    #[serde(default)]
    pub machine_cpu: Option<MachineCpu>,
    /// Keys the worker left in Redis (one per remembered event).
    #[serde(default)]
    pub redis_keys: u64,
    /// Growth of Redis' `used_memory` per key left (`None` when no key was written).
    #[serde(default)]
    pub redis_bytes_per_key: Option<f64>,
    /// Duplicates caught per tier (in_batch, recent_keys, postgres).
    pub duplicates_by_tier: Vec<(String, u64)>,
    /// The hostile requests sent beside the load, when the run sent any.
    pub hostile: Option<crate::hostile::HostileOutcome>,
    /// The slow clients beside the load, when the run had any.
    pub slow: Option<crate::slow::SlowOutcome>,
    pub correctness: Correctness,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub commit: String,
    pub machine: String,
    /// Each ceiling's median over the rounds below.
    pub ceilings: Option<Ceilings>,
    /// Every round of ceilings measured (one before each run when the pipeline ran too).
    pub ceiling_rounds: Vec<Ceilings>,
    /// The run with the median end-to-end rate when the load was repeated.
    pub run: Option<RunFigures>,
    /// Every run's (end-to-end, steady-state) events/s, in the order they ran.
    pub repeats: Vec<(f64, f64)>,
    /// Every run's end-to-end rate over the lowest ceiling of the round measured just before
    /// it, in the order they ran.
    pub ratios: Vec<f64>,
    /// Open-loop runs at half the end-to-end rate of the closed-loop run just before each.
    pub half_rate: Vec<HalfRate>,
}

/// Latency at half the maximum: an open-loop run at half of the rate a closed-loop run
/// reached just before it.
#[derive(Debug, Clone, Serialize)]
pub struct HalfRate {
    /// The closed-loop run's end-to-end events/s.
    pub maximum_events_per_s: f64,
    pub figures: RunFigures,
}

impl HalfRate {
    /// The pairs as a markdown table, with the medians of p50 and p99 over them.
    fn markdown(pairs: &[HalfRate]) -> String {
        let mut md = String::from(
            "\n| Latency at half the maximum (open loop, right after each run) | Rate, events/s | Latency p50 / p90 / p99 / p99.9 | Means: client / inside ingest / confirm | p99: inside ingest / confirm | CPU busy / iowait / steal | Queue depth |\n|---|---|---|---|---|---|---|\n",
        );
        for (i, pair) in pairs.iter().enumerate() {
            let f = &pair.figures;
            md += &format!(
                "| after run {} (maximum {:.0}) | {:.0} sent, {:.0} settled | {:.2} / {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} / {:.2} ms ({:.1} events/message) | {:.1} / {:.1} ms | {} | {} → {} |\n",
                i + 1,
                pair.maximum_events_per_s,
                f.events_accepted_per_s,
                f.end_to_end_events_per_s,
                f.latency.p50_ms,
                f.latency.p90_ms,
                f.latency.p99_ms,
                f.latency.p999_ms,
                f.latency_breakdown.client_mean_ms,
                f.latency_breakdown.ingest_mean_ms,
                f.latency_breakdown.confirm_mean_ms,
                f.latency_breakdown.events_per_message,
                f.latency_breakdown.ingest_p99_ms,
                f.latency_breakdown.confirm_p99_ms,
                f.machine_cpu.map_or("–".to_owned(), |m| format!(
                    "{:.0} / {:.1} / {:.1} %",
                    m.busy_pct, m.iowait_pct, m.steal_pct
                )),
                f.queue_depth_steady.0,
                f.queue_depth_steady.1,
            );
        }
        let median = |pick: fn(&Latency) -> f64| {
            let mut v: Vec<f64> = pairs.iter().map(|p| pick(&p.figures.latency)).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        md += &format!(
            "\nLatency at half the maximum, median of {} run(s): p50 {:.2} ms, p99 {:.2} ms.\n",
            pairs.len(),
            median(|l| l.p50_ms),
            median(|l| l.p99_ms),
        );
        md
    }
}

/// The markdown row of CPU per event, every process of the pipeline and the servers; empty
/// when the servers are not on this machine.
fn cpu_per_event_row(run: &RunFigures) -> String {
    let events = (run.correctness.unique_sent + run.correctness.duplicates_sent).max(1) as f64;
    let us = |seconds: f64| seconds * 1e6 / events;
    match &run.servers_cpu {
        Some(cpu) => format!(
            "| CPU per event: ingest / worker / PostgreSQL / Redis / RabbitMQ (the servers' every process, first request → last settled) | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} µs |\n",
            us(run.ingest.cpu_seconds),
            us(run.worker.cpu_seconds),
            us(cpu.postgresql_s),
            us(cpu.redis_s),
            us(cpu.rabbitmq_s),
        ),
        None => String::new(),
    }
}

/// The markdown row of how the machine's CPUs spent the load; empty where unknown.
fn machine_cpu_row(run: &RunFigures) -> String {
    match &run.machine_cpu {
        Some(m) => format!(
            "| Machine CPU during the load: busy / waiting on disk / stolen by the hypervisor | {:.0} / {:.1} / {:.1} % |\n",
            m.busy_pct, m.iowait_pct, m.steal_pct
        ),
        None => String::new(),
    }
}

/// The markdown row of Redis memory per remembered event; empty when nothing was remembered.
fn redis_memory_row(run: &RunFigures) -> String {
    match run.redis_bytes_per_key {
        Some(bytes) => format!(
            "| Redis memory per remembered event (used_memory growth / keys left) | {bytes:.0} B ({} keys) |\n",
            run.redis_keys
        ),
        None => String::new(),
    }
}

impl Report {
    /// An empty report for `commit`, dated now, on this machine.
    pub fn new(commit: String) -> Self {
        Self {
            date: chrono::Utc::now().to_rfc3339(),
            commit,
            machine: machine(),
            ceilings: None,
            ceiling_rounds: Vec::new(),
            run: None,
            repeats: Vec::new(),
            ratios: Vec::new(),
            half_rate: Vec::new(),
        }
    }

    /// Takes the repeated runs: each one's rates, its ratio to the ceiling round measured just
    /// before it, and the run with the median end-to-end rate as the headline.
    pub fn add_runs(&mut self, mut runs: Vec<RunFigures>) {
        self.repeats = runs
            .iter()
            .map(|r| (r.end_to_end_events_per_s, r.steady_events_per_s))
            .collect();
        self.ratios = runs
            .iter()
            .zip(&self.ceiling_rounds)
            .map(|(r, c)| r.end_to_end_events_per_s / c.lowest().1)
            .collect();
        runs.sort_by(|a, b| {
            a.end_to_end_events_per_s
                .total_cmp(&b.end_to_end_events_per_s)
        });
        if !runs.is_empty() {
            self.run = Some(runs.swap_remove(runs.len() / 2));
        }
    }

    /// The report as markdown, the same figures as the printed table.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "## dedup benchmark — {} — commit {}\n\nMachine: {}\n\n",
            self.date, self.commit, self.machine
        );
        if let Some(run) = &self.run {
            md += &self.run_markdown(run);
        }
        if !self.half_rate.is_empty() {
            md += &HalfRate::markdown(&self.half_rate);
        }
        if let Some(c) = &self.ceilings {
            md += &self.ceilings_markdown(c);
        }
        md
    }

    /// The headline run's table, its hostile requests and the repeats.
    fn run_markdown(&self, run: &RunFigures) -> String {
        let mut md = String::new();
        let c = &run.correctness;
        md += &format!(
            "| Figure | Value |\n|---|---|\n\
             | Load | {} , {} connections, {} event(s)/request, {:.0} s, {} worker process(es), {} queue(s), table prefilled with {} rows |\n\
             | Requests/s accepted | {:.0} ({:.0}× the original's {:.0}) |\n\
             | Events/s accepted | {:.0} |\n\
             | Latency p50 / p90 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} ms |\n\
             | Latency means: client / inside ingest / of which broker publish→confirm | {:.2} / {:.2} / {:.2} ms ({:.1} events per message) |\n\
             | Latency p99: inside ingest / broker publish→confirm (ingest's histograms) | {:.1} / {:.1} ms |\n\
             | End-to-end events/s (first request → last settled) | {:.0} |\n\
             | End-to-end unique events stored/s | {:.0} ({:.0}× the original's {:.0}) |\n\
             | Steady-state events/s settled by the worker | {:.0} (queue depth {} → {}) |\n\
             | Duplicates by tier | {} |\n\
             | ingest peak RSS / CPU | {:.1} MiB / {:.1} s |\n\
             | worker peak RSS (largest process) / CPU (all) | {:.1} MiB / {:.1} s |\n\
             | Events consumed per worker process | {} |\n\
             {}{}{}\
             | Correctness | {}: {} unique sent, {} rows stored, {} keys stored twice, {} of {} duplicates dropped, {} dead-lettered, {} failed requests |\n",
            run.mode,
            run.connections,
            run.batch,
            run.duration_s,
            run.workers,
            run.queue_shards,
            run.prefill_rows,
            run.requests_per_s,
            run.requests_per_s / ORIGINAL_REQUESTS_PER_S,
            ORIGINAL_REQUESTS_PER_S,
            run.events_accepted_per_s,
            run.latency.p50_ms,
            run.latency.p90_ms,
            run.latency.p99_ms,
            run.latency.p999_ms,
            run.latency.max_ms,
            run.latency_breakdown.client_mean_ms,
            run.latency_breakdown.ingest_mean_ms,
            run.latency_breakdown.confirm_mean_ms,
            run.latency_breakdown.events_per_message,
            run.latency_breakdown.ingest_p99_ms,
            run.latency_breakdown.confirm_p99_ms,
            run.end_to_end_events_per_s,
            run.end_to_end_stored_per_s,
            run.end_to_end_stored_per_s / ORIGINAL_STORED_PER_S,
            ORIGINAL_STORED_PER_S,
            run.steady_events_per_s,
            run.queue_depth_steady.0,
            run.queue_depth_steady.1,
            run.duplicates_by_tier
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            run.ingest.peak_rss_mib,
            run.ingest.cpu_seconds,
            run.worker.peak_rss_mib,
            run.worker.cpu_seconds,
            run.consumed_per_worker
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            cpu_per_event_row(run),
            machine_cpu_row(run),
            redis_memory_row(run),
            if c.ok { "OK" } else { "FAILED" },
            c.unique_sent,
            c.rows_stored,
            c.keys_stored_twice,
            c.duplicates_dropped,
            c.duplicates_sent,
            c.dead_lettered,
            c.failed_requests,
        );
        if let Some(h) = &run.hostile {
            md += &format!(
                "| Hostile requests beside the load | {} sent, {} |\n",
                h.sent,
                if h.not_refused.is_empty() {
                    "every one refused with a 4xx".to_owned()
                } else {
                    format!("NOT refused: {:?}", h.not_refused)
                }
            );
        }
        if let Some(slow) = &run.slow {
            md += &format!(
                "| Slow clients beside the load (heads of {} bytes, then a byte a second, never \
                 finished) | {} \
                 connections opened, {} closed by ingest (the longest after {:.1} s), {} \
                 answered with a 4xx, {} |\n",
                slow.head_bytes,
                slow.opened,
                slow.closed_by_ingest,
                slow.longest_until_closed_s,
                slow.answered_4xx,
                if slow.answered_not_4xx.is_empty() {
                    "none answered but with a 4xx".to_owned()
                } else {
                    format!("ANSWERED: {:?}", slow.answered_not_4xx)
                }
            );
        }
        if self.repeats.len() > 1 {
            let list = |f: fn(&(f64, f64)) -> f64| {
                self.repeats
                    .iter()
                    .map(|r| format!("{:.0}", f(r)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            md += &format!(
                "\n{} runs; the table shows the median one. End-to-end events/s: {}; steady state: {}.\n",
                self.repeats.len(),
                list(|r| r.0),
                list(|r| r.1),
            );
        }
        md
    }

    /// The ceilings' table and the run's share of the lowest.
    fn ceilings_markdown(&self, c: &Ceilings) -> String {
        let mut md = String::new();
        let (name, lowest) = c.lowest();
        md += &format!(
            "\n| Ceiling (same machine, same run; median of {} round(s)) | events/s |\n|---|---|\n\
             | RabbitMQ publish + confirm (1 event/message, lz4 as ingest sends it; confirm p50 {:.2} ms, p99 {:.2} ms) | {:.0} |\n\
             | RabbitMQ consume + ack | {:.0} |\n\
             | PostgreSQL insert, the worker's statement, batches of {} | {:.0} |\n\
             | Redis MGET + SET PX pipeline, batches of {} | {:.0} |\n\
             | **Lowest: {name}** | **{lowest:.0}** |\n",
            self.ceiling_rounds.len(),
            c.rabbitmq_confirm_p50_ms,
            c.rabbitmq_confirm_p99_ms,
            c.rabbitmq_publish_per_s,
            c.rabbitmq_consume_ack_per_s,
            c.batch,
            c.postgres_insert_rows_per_s,
            c.batch,
            c.redis_events_per_s,
        );
        if let Some(run) = &self.run {
            md += &format!(
                "\nPipeline end-to-end rate as a share of the lowest ceiling: **{:.0} %** (steady state: {:.0} %).\n",
                100.0 * run.end_to_end_events_per_s / lowest,
                100.0 * run.steady_events_per_s / lowest
            );
            if self.ratios.len() > 1 {
                md += &format!(
                    "Each run against the lowest ceiling measured just before it: {}.\n",
                    self.ratios
                        .iter()
                        .map(|r| format!("{:.0} %", 100.0 * r))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        md
    }

    /// Writes `<stem>.json` and `<stem>.md` under `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(format!("{stem}.json")),
            serde_json::to_vec_pretty(self)?,
        )?;
        std::fs::write(dir.join(format!("{stem}.md")), self.markdown())?;
        Ok(())
    }
}

/// What this machine is: cores, CPU model, memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or_default();
    format!("{cores} cores, {model}, {mem_gib:.0} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ingest's scrape: 100 single requests took 0.8 s in all, 20 messages 0.3 s to confirm,
    /// carrying 100 events; the batch route and the rejected events must not count.
    const SCRAPE: &str = "\
dedup_ingest_request_duration_seconds_sum{route=\"batch\"} 50
dedup_ingest_request_duration_seconds_count{route=\"batch\"} 1
dedup_ingest_request_duration_seconds_sum{route=\"single\"} 0.8
dedup_ingest_request_duration_seconds_count{route=\"single\"} 100
dedup_ingest_publish_confirm_duration_seconds_sum 0.3
dedup_ingest_publish_confirm_duration_seconds_count 20
dedup_ingest_events_total{outcome=\"accepted\",source=\"web\"} 60
dedup_ingest_events_total{outcome=\"accepted\",source=\"ios\"} 40
dedup_ingest_events_total{outcome=\"rejected\",source=\"web\"} 7
dedup_ingest_message_bytes_count 20
dedup_ingest_request_duration_seconds_bucket{route=\"single\",le=\"0.005\"} 50
dedup_ingest_request_duration_seconds_bucket{route=\"single\",le=\"0.01\"} 90
dedup_ingest_request_duration_seconds_bucket{route=\"single\",le=\"0.02\"} 98
dedup_ingest_request_duration_seconds_bucket{route=\"single\",le=\"0.05\"} 100
dedup_ingest_request_duration_seconds_bucket{route=\"single\",le=\"+Inf\"} 100
dedup_ingest_request_duration_seconds_bucket{route=\"batch\",le=\"+Inf\"} 1
dedup_ingest_publish_confirm_duration_seconds_bucket{le=\"0.01\"} 10
dedup_ingest_publish_confirm_duration_seconds_bucket{le=\"0.02\"} 19
dedup_ingest_publish_confirm_duration_seconds_bucket{le=\"+Inf\"} 20
";

    /// Means come from the scrape's sums and counts of the run's route only.
    #[test]
    fn latency_breakdown_reads_means_from_the_scrape() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
        h.record(9_000).unwrap();
        h.record(11_000).unwrap();
        let b = LatencyBreakdown::from_scrape(SCRAPE, "single", &h);
        assert!((b.client_mean_ms - 10.0).abs() < 0.05, "{b:?}");
        assert!((b.ingest_mean_ms - 8.0).abs() < 1e-9, "{b:?}");
        assert!((b.confirm_mean_ms - 15.0).abs() < 1e-9, "{b:?}");
        assert!((b.events_per_message - 5.0).abs() < 1e-9, "{b:?}");
        // The 99th of 100 falls in (20, 50] ms, where 98 → 100: halfway, 35 ms.
        assert!((b.ingest_p99_ms - 35.0).abs() < 1e-9, "{b:?}");
        // The 19.8th of 20 is past the last finite bound: that bound.
        assert!((b.confirm_p99_ms - 20.0).abs() < 1e-9, "{b:?}");
        let empty = LatencyBreakdown::from_scrape("", "single", &h);
        assert_eq!(
            (
                empty.ingest_mean_ms,
                empty.confirm_mean_ms,
                empty.events_per_message
            ),
            (0.0, 0.0, 0.0)
        );
    }

    fn figures(ok: bool) -> RunFigures {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        RunFigures {
            mode: "closed loop".into(),
            connections: 8,
            workers: 1,
            queue_shards: 1,
            prefill_rows: 0,
            consumed_per_worker: vec![1500],
            batch: 1,
            duration_s: 10.0,
            requests_per_s: 1500.0,
            events_accepted_per_s: 1500.0,
            latency: Latency::from_micros(&h),
            latency_breakdown: LatencyBreakdown::from_scrape(SCRAPE, "single", &h),
            end_to_end_events_per_s: 850.0,
            end_to_end_stored_per_s: 650.0,
            steady_events_per_s: 900.0,
            queue_depth_steady: (3, 4),
            machine_cpu: None,
            settle_s: 0.5,
            ingest: Usage {
                peak_rss_mib: 30.0,
                cpu_seconds: 0.13,
            },
            worker: Usage::default(),
            servers_cpu: Some(ServerCpu {
                postgresql_s: 0.26,
                redis_s: 0.013,
                rabbitmq_s: 0.0,
            }),
            redis_keys: 10,
            redis_bytes_per_key: Some(104.4),
            duplicates_by_tier: vec![("in_batch".into(), 1)],
            hostile: None,
            slow: None,
            correctness: Correctness {
                unique_sent: 10,
                duplicates_sent: 3,
                rows_stored: 10,
                keys_stored_twice: 0,
                duplicates_dropped: 3,
                dead_lettered: 0,
                failed_requests: 0,
                ok,
            },
        }
    }

    /// Percentiles come from the histogram; ratios to the original and to the lowest ceiling
    /// are computed in the markdown.
    #[test]
    fn report_shows_percentiles_ratios_and_the_lowest_ceiling() {
        let run = figures(true);
        assert!(
            (run.latency.p50_ms - 0.5).abs() < 0.01 && (run.latency.p99_ms - 0.99).abs() < 0.01
        );
        let round = |postgres: f64, redis: f64| Ceilings {
            rabbitmq_publish_per_s: 2000.0,
            rabbitmq_confirm_p50_ms: 1.0,
            rabbitmq_confirm_p99_ms: 2.0,
            rabbitmq_consume_ack_per_s: 3000.0,
            postgres_insert_rows_per_s: postgres,
            redis_events_per_s: redis,
            batch: 500,
        };
        // Each figure's median on its own: PostgreSQL's from round 3, Redis' from round 1.
        let rounds = vec![
            round(1600.0, 50_000.0),
            round(2100.0, 40_000.0),
            round(1700.0, 60_000.0),
        ];
        let ceilings = Ceilings::median(&rounds).unwrap();
        assert_eq!(ceilings.postgres_insert_rows_per_s, 1700.0);
        assert_eq!(ceilings.redis_events_per_s, 50_000.0);
        assert!(Ceilings::median(&[]).is_none());
        let report = Report {
            date: "2026-11-24".into(),
            commit: "abc".into(),
            machine: "2 cores".into(),
            ceilings: Some(ceilings),
            ceiling_rounds: rounds,
            run: Some(run),
            repeats: vec![(840.0, 880.0), (850.0, 900.0), (870.0, 910.0)],
            ratios: vec![0.525, 0.425, 0.5118],
            half_rate: Vec::new(),
        };
        let md = report.markdown();
        assert!(
            md.contains(
                "3 runs; the table shows the median one. End-to-end events/s: 840, 850, 870"
            ),
            "{md}"
        );
        assert!(md.contains("10× the original's 150"), "{md}");
        assert!(
            md.contains("**Lowest: PostgreSQL insert** | **1700**"),
            "{md}"
        );
        assert!(md.contains("share of the lowest ceiling: **50 %**"), "{md}");
        assert!(md.contains("median of 3 round(s)"), "{md}");
        assert!(
            md.contains(
                "of which broker publish→confirm | 0.50 / 8.00 / 15.00 ms (5.0 events per message)"
            ),
            "{md}"
        );
        assert!(
            md.contains("lowest ceiling measured just before it: 52 %, 42 %, 51 %."),
            "{md}"
        );
        // 13 events: 0.13 s of ingest is 10 ms each, 0.26 s of PostgreSQL 20 ms, …
        assert!(
            md.contains("RabbitMQ (the servers' every process, first request → last settled) | 10000.0 / 0.0 / 20000.0 / 1000.0 / 0.0 µs |"),
            "{md}"
        );
        assert!(
            md.contains("| Redis memory per remembered event (used_memory growth / keys left) | 104 B (10 keys) |"),
            "{md}"
        );
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["run"]["correctness"]["ok"], true);
        assert_eq!(json["run"]["servers_cpu"]["postgresql_s"], 0.26);
        let mut remote = report;
        if let Some(run) = remote.run.as_mut() {
            run.servers_cpu = None;
        }
        assert!(
            !remote.markdown().contains("CPU per event"),
            "no servers here, no row"
        );
        assert_eq!(json["ceilings"]["batch"], 500);
    }

    /// Each half-rate run is shown with the maximum it halves; the medians are per figure.
    #[test]
    fn half_rate_runs_show_their_maximum_and_median_latency() {
        let pair = |maximum: f64, p50_us: u64, p99_us: u64| {
            let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
            h.record_n(p50_us, 90).unwrap();
            h.record_n(p99_us, 10).unwrap();
            let mut figures = figures(true);
            figures.latency = Latency::from_micros(&h);
            figures.events_accepted_per_s = maximum / 2.0;
            HalfRate {
                maximum_events_per_s: maximum,
                figures,
            }
        };
        let pairs = vec![
            pair(9000.0, 3000, 40_000),
            pair(11_000.0, 7000, 20_000),
            pair(10_000.0, 4000, 60_000),
        ];
        let md = HalfRate::markdown(&pairs);
        assert!(
            md.contains("| after run 2 (maximum 11000) | 5500 sent"),
            "{md}"
        );
        assert!(
            md.contains("median of 3 run(s): p50 4.00 ms, p99 40."),
            "{md}"
        );
        assert!(HalfRate::markdown(&[]).contains("median of 0 run(s)"));
    }
}
