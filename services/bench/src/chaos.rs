//! The chaos run: load from clients that resend on 503 as Retry-After says (and on a broken
//! connection), while the worker is killed with SIGKILL and RabbitMQ, Redis and PostgreSQL
//! are stopped and started again in turn; then the proof that every event that got `202` is
//! stored exactly once. It owns the machine: it stops the shared services, so run nothing
//! else meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Command;

use crate::load::{self, Counters, LoadSettings};
use crate::services::{Backends, Binaries, Isolation, Processes};
use crate::workload::Workload;

/// One thing that goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Fault {
    /// SIGKILL the worker, then start a new one.
    KillWorker,
    /// Stop the RabbitMQ node, then start it.
    RestartRabbitmq,
    /// Shut Redis down (its keys are gone: it keeps nothing on disk), then start it.
    RestartRedis,
    /// Stop PostgreSQL in immediate mode (a crash: recovery on start), then start it.
    RestartPostgres,
}

/// Options of a chaos run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub load: LoadSettings,
    pub duplicates: f64,
    pub faults: Vec<Fault>,
    /// Time between two faults.
    pub interval: Duration,
    /// How long a stopped service stays down.
    pub downtime: Duration,
    pub settle_timeout: Duration,
    pub binaries: Binaries,
    pub backends: Backends,
    pub logs: PathBuf,
    /// The script that starts whatever service is down (scripts/ensure-services.sh).
    pub services_script: PathBuf,
}

/// One fault as it happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Injected {
    pub at_seconds: f64,
    pub fault: Fault,
    /// `None` when the service came back; the error otherwise.
    pub error: Option<String>,
}

/// What the chaos run proved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosReport {
    pub faults: Vec<Injected>,
    /// Unique events that got 202.
    pub unique_accepted: u64,
    pub duplicates_accepted: u64,
    /// Requests sent again after a 503 or a broken connection.
    pub resends: u64,
    /// Requests never accepted before the clients gave up (may or may not be stored).
    pub abandoned: u64,
    pub rows: u64,
    /// Accepted events not stored after the settle timeout.
    pub missing: u64,
    /// Keys stored more than once.
    pub stored_twice: u64,
    /// Messages in the dead-letter queue at the end.
    pub dead_lettered: u64,
    pub ok: bool,
}

/// Runs the load with the faults in turn, waits for every accepted event, and checks.
pub async fn run(mut opts: ChaosOptions, name: &str) -> anyhow::Result<ChaosReport> {
    let iso = Isolation::new(&opts.backends, name);
    iso.create(&opts.backends).await?;
    let mut processes = Processes::start(
        &opts.binaries,
        &opts.backends,
        &iso,
        &opts.logs,
        (1, &[]),
        &[],
    )
    .await?;
    opts.load.addr = processes.ingest_addr;
    opts.load.write_key = processes.write_key.clone();
    opts.load.resend = true;
    let workload = Arc::new(Workload::new(
        &iso.name,
        opts.duplicates,
        Duration::from_secs(2),
    )?);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let progress = tokio::spawn(progress(counters.clone(), started));
    let (outcome, faults) = tokio::join!(
        load::run(&opts.load, workload.clone(), counters.clone()),
        inject(&mut processes, &opts, started)
    );
    progress.abort();
    outcome?;
    // Whatever the last fault left down comes back before the check.
    ensure_services(&opts).await?;
    let accepted: HashSet<String> = counters
        .accepted_unique
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|n| workload.r(*n))
        .collect();
    let stored = settle(&iso, &accepted, opts.settle_timeout).await?;
    let dead_lettered = dead_letters(&opts.backends, &iso).await;
    let _ = processes.stop().await;
    iso.remove(&opts.backends).await;

    let missing = accepted.iter().filter(|r| !stored.contains_key(*r)).count() as u64;
    let stored_twice = stored.values().filter(|n| **n > 1).count() as u64;
    let report = ChaosReport {
        faults,
        unique_accepted: accepted.len() as u64,
        duplicates_accepted: counters.duplicates_accepted.load(Ordering::Relaxed),
        resends: counters.resends.load(Ordering::Relaxed),
        abandoned: counters.abandoned.load(Ordering::Relaxed),
        rows: stored.values().sum::<i64>() as u64,
        missing,
        stored_twice,
        dead_lettered,
        ok: missing == 0 && stored_twice == 0 && dead_lettered == 0 && !accepted.is_empty(),
    };
    Ok(report)
}

/// A line every five seconds: what was sent, accepted and resent so far.
async fn progress(counters: Arc<Counters>, started: Instant) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!(
            "[{:>4.0}s] requests {}, accepted {}, resent {}",
            started.elapsed().as_secs_f64(),
            counters.requests.load(Ordering::Relaxed),
            counters.accepted_requests.load(Ordering::Relaxed),
            counters.resends.load(Ordering::Relaxed),
        );
    }
}

/// Injects the faults in turn, one every `interval`, until the load's duration is over.
async fn inject(processes: &mut Processes, opts: &ChaosOptions, started: Instant) -> Vec<Injected> {
    let mut done = Vec::new();
    let end = started + opts.load.duration;
    for fault in opts.faults.iter().cycle() {
        tokio::time::sleep(opts.interval).await;
        if Instant::now() + opts.downtime >= end || opts.faults.is_empty() {
            break;
        }
        let at_seconds = started.elapsed().as_secs_f64();
        eprintln!("[{at_seconds:>4.0}s] chaos: {fault:?}");
        let error = apply(*fault, processes, opts)
            .await
            .err()
            .map(|e| format!("{e:#}"));
        if let Some(e) = &error {
            eprintln!("chaos: {fault:?} failed: {e}");
        }
        done.push(Injected {
            at_seconds,
            fault: *fault,
            error,
        });
    }
    done
}

async fn apply(fault: Fault, processes: &mut Processes, opts: &ChaosOptions) -> anyhow::Result<()> {
    match fault {
        Fault::KillWorker => return processes.kill_and_restart_worker().await,
        Fault::RestartRabbitmq => run_command("rabbitmqctl", &["stop"]).await?,
        Fault::RestartRedis => {
            run_command("redis-cli", &["-p", "6379", "shutdown", "nosave"]).await?;
        }
        Fault::RestartPostgres => {
            let version = postgres_version()?;
            run_command(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &version,
                    "main",
                    "stop",
                    "-m",
                    "immediate",
                ],
            )
            .await?;
        }
    }
    tokio::time::sleep(opts.downtime).await;
    ensure_services(opts).await
}

async fn run_command(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    // redis-cli's shutdown loses its connection on success; any other failure says so.
    anyhow::ensure!(
        output.status.success() || program == "redis-cli",
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn postgres_version() -> anyhow::Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("no /etc/postgresql: the chaos run needs the local PostgreSQL cluster")?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no PostgreSQL cluster in /etc/postgresql")
}

async fn ensure_services(opts: &ChaosOptions) -> anyhow::Result<()> {
    let status = Command::new(&opts.services_script)
        .status()
        .await
        .with_context(|| format!("running {}", opts.services_script.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} failed",
        opts.services_script.display()
    );
    Ok(())
}

/// Waits until every accepted event is stored (or the timeout), then returns the stored
/// count of every `r`.
async fn settle(
    iso: &Isolation,
    accepted: &HashSet<String>,
    timeout: Duration,
) -> anyhow::Result<HashMap<String, i64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let stored = match stored_counts(iso).await {
            Ok(stored) => stored,
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: reading the stored rows failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let missing = accepted.iter().filter(|r| !stored.contains_key(*r)).count();
        if missing == 0 || Instant::now() >= deadline {
            return Ok(stored);
        }
        eprintln!("chaos: {missing} accepted events not stored yet");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn stored_counts(iso: &Isolation) -> anyhow::Result<HashMap<String, i64>> {
    let db = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&iso.database_url)
        .await?;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT r, count(*) FROM product_events GROUP BY r")
            .fetch_all(&db)
            .await?;
    db.close().await;
    Ok(rows.into_iter().collect())
}

async fn dead_letters(backends: &Backends, iso: &Isolation) -> u64 {
    let Ok(reader) = dedup_runtime::queue_depth::DepthReader::new(
        &backends.rabbitmq_management,
        Duration::from_secs(5),
    ) else {
        return u64::MAX;
    };
    let vhost = dedup_runtime::queue_depth::vhost_of(&backends.rabbitmq);
    // The management API refreshes its figures every few seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    reader
        .read(&vhost, &iso.topology.dead_letter_queue())
        .await
        .map(|d| d.total())
        .unwrap_or(u64::MAX)
}
