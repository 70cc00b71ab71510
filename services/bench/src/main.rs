//! `dedup-bench`: measures the pipeline and the machine's ceilings; see `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dedup_bench::load::LoadSettings;
use dedup_bench::report::{self, Report};
use dedup_bench::services::{Backends, Binaries, Isolation};
use dedup_bench::{RunOptions, ceilings, run_pipeline};
use dedup_runtime::config::parse_duration;

/// The load generator shares the cores with what it measures: mimalloc keeps its own
/// allocation cost down.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark harness for dedup: drives the real ingest and dedup-worker binaries over HTTP and
/// measures RabbitMQ, PostgreSQL and Redis ceilings on the same machine in the same run.
#[derive(Debug, Parser)]
#[command(name = "dedup-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ceilings, then the pipeline run (the default).
    All(RunArgs),
    /// The pipeline under load only.
    Run(RunArgs),
    /// Load while the worker is killed and RabbitMQ, Redis and PostgreSQL are restarted in
    /// turn, then the proof that every accepted event is stored exactly once. It stops the
    /// machine's shared services: run nothing else meanwhile.
    Chaos(ChaosArgs),
    /// A/B: the same load against a baseline build and the candidate (--ingest-bin,
    /// --worker-bin), alternately, reporting each figure's ratio per pair, median and range.
    Compare(CompareArgs),
    /// RabbitMQ, PostgreSQL and Redis ceilings only.
    Ceilings {
        /// Rounds of measurements; each figure is reported as its median.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        /// The worker binary makes the ceilings' tables (`dedup-worker migrate`).
        #[command(flatten)]
        bins: BinArgs,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// PostgreSQL server URL without a database.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,
    /// Database the runs use (created if missing); each run works in a schema of its own.
    #[arg(long, global = true, default_value = "dedup_bench")]
    database: String,
    #[arg(
        long,
        global = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    rabbitmq: String,
    #[arg(
        long,
        global = true,
        default_value = "http://guest:guest@127.0.0.1:15672"
    )]
    rabbitmq_management: String,
    #[arg(long, global = true, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Events per ceiling measurement.
    #[arg(long, global = true, default_value_t = 20_000)]
    ceiling_events: usize,
    /// Batch size for the PostgreSQL and Redis ceilings (the worker's BATCH_SIZE).
    #[arg(long, global = true, default_value_t = 1000)]
    ceiling_batch: usize,
    /// Where the JSON and markdown reports (and the services' logs) go.
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
    /// A few seconds of light load with correctness checks only; exits 1 if they fail.
    #[arg(long, global = true)]
    smoke: bool,
}

#[derive(Debug, Parser, Clone)]
struct RunArgs {
    /// Concurrent keep-alive connections. A closed loop carries at most this many requests
    /// at once, and each waits for a quorum-queue confirm (several ms), so the default is
    /// enough to saturate the pipeline on a small machine (64 could not: the rate stayed
    /// below connections ÷ confirm latency with the broker half idle).
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Open loop: events per second to send (latency counted from the intended send time).
    /// Without it the load is closed-loop: every connection as fast as it goes.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    duration: Duration,
    /// Events per request: 1 for single events, more for the batch endpoint.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Share of sends that repeat an earlier event's exact key.
    #[arg(long, default_value_t = 0.3)]
    duplicates: f64,
    /// How long after its first copy a repeat is sent.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    duplicate_delay: Duration,
    /// Longest wait for every event to be stored after the load.
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    settle_timeout: Duration,
    #[command(flatten)]
    bins: BinArgs,
    /// Extra worker settings, KEY=VALUE (repeatable), e.g. BATCH_SIZE=1000.
    #[arg(long = "worker-env", value_parser = parse_key_value)]
    worker_env: Vec<(String, String)>,
    /// Extra ingest settings, KEY=VALUE (repeatable), e.g. COALESCE_FLUSHERS=4.
    #[arg(long = "ingest-env", value_parser = parse_key_value)]
    ingest_env: Vec<(String, String)>,
    /// Worker processes consuming the queue (the report's worker CPU is theirs together, its
    /// peak RSS the largest of one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    workers: u32,
    /// Queues the events are spread over by dedup key (AMQP_QUEUE_SHARDS of ingest and the
    /// workers); every worker consumes all of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queue_shards: u16,
    /// After each closed-loop run, an open-loop run this long at half of that run's end-to-end
    /// rate: latency at half the maximum, measured right after the maximum it is half of
    /// (the machine's speed drifts over an hour).
    #[arg(long, value_parser = parse_duration)]
    half_rate_latency: Option<Duration>,
    /// Rows put into the partition of the load's day before the load (random keys, small
    /// payloads), then a CHECKPOINT: the unique index a day partition holds later in the day,
    /// which makes each insert cost more (docs/scaling.md). 0: the run starts from an empty
    /// table.
    #[arg(long, default_value_t = 0)]
    prefill_rows: u64,
    /// Keep the run's schema, queues and Redis keys afterwards.
    #[arg(long)]
    keep: bool,
    /// Connections sending hostile requests beside the load (NUL, lone surrogates, numbers
    /// out of range, year 0, deep nesting, batch bodies of tiny items at and past the limit);
    /// every one must be refused, and the report's peak RSS shows what they cost.
    #[arg(long, default_value_t = 0)]
    hostile: usize,
    /// Slow clients beside the load: each holds a connection whose request head comes a
    /// byte a second and never ends, and opens another when ingest closes it (after its
    /// HEADER_READ_TIMEOUT). None may be answered but with a 4xx; the report's peak RSS
    /// shows what the held connections cost (ingest holds at most MAX_CONNECTIONS).
    #[arg(long, default_value_t = 0)]
    slow_clients: usize,
    /// Bytes of padding each slow client's head starts with, sent at once before the trickle
    /// (past ingest's MAX_HEADER_BYTES it is answered 431 at once; the client then waits a
    /// second before it connects again).
    #[arg(long, default_value_t = 0)]
    slow_head_bytes: usize,
    /// Runs of the same load, one after another; the report shows every run's rates and the
    /// run with the median end-to-end rate (this machine is shared and noisy).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The candidate's run: load, settings and binaries (--ingest-bin, --worker-bin).
    #[command(flatten)]
    run: RunArgs,
    /// The baseline's ingest binary.
    #[arg(long)]
    baseline_ingest_bin: PathBuf,
    /// The baseline's dedup-worker binary.
    #[arg(long)]
    baseline_worker_bin: PathBuf,
    /// Pairs of runs. The baseline runs first in odd pairs and second in even ones, so with an
    /// even number what a run leaves for the next falls on both builds equally.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pairs: u32,
}

/// The compare subcommand: runs the pairs, prints and writes the table, fails when a run's
/// correctness check failed.
async fn compare(
    args: CompareArgs,
    backends: Backends,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let candidate = run_options(
        &args.run,
        backends,
        out.join(format!("logs-compare-{stamp}")),
    )?;
    let mut baseline = candidate.clone();
    baseline.binaries = Binaries {
        ingest: args.baseline_ingest_bin.clone(),
        worker: args.baseline_worker_bin.clone(),
    };
    let name = format!("bench_compare_{}", std::process::id());
    let comparison =
        dedup_bench::compare::run(baseline, candidate, args.pairs as usize, &name).await?;
    let md = format!(
        "## dedup A/B — {} — {}\n\nMachine: {}\n\nBaseline: `{}`, `{}`; candidate: `{}`, `{}`.\n\n{}",
        chrono::Utc::now().to_rfc3339(),
        git_commit(),
        report::machine(),
        args.baseline_ingest_bin.display(),
        args.baseline_worker_bin.display(),
        args.run.bins.ingest_bin.display(),
        args.run.bins.worker_bin.display(),
        comparison.markdown()
    );
    println!("{md}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(format!("compare-{stamp}.md")), &md)?;
    std::fs::write(
        out.join(format!("compare-{stamp}.json")),
        serde_json::to_string_pretty(&comparison)?,
    )?;
    anyhow::ensure!(comparison.ok, "a run failed its correctness check");
    Ok(())
}

#[derive(Debug, Parser, Clone)]
struct ChaosArgs {
    /// How long to send.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    duration: Duration,
    /// Concurrent keep-alive connections (each resends what was not accepted).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Events per second (open loop), so the queue does not grow without bound meanwhile.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Share of sends that repeat an earlier event's exact key.
    #[arg(long, default_value_t = 0.3)]
    duplicates: f64,
    /// The faults, in the order they are injected (repeated until the load ends).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        dedup_bench::chaos::Fault::KillWorker,
        dedup_bench::chaos::Fault::RestartRabbitmq,
        dedup_bench::chaos::Fault::KillWorker,
        dedup_bench::chaos::Fault::RestartRedis,
        dedup_bench::chaos::Fault::KillWorker,
        dedup_bench::chaos::Fault::RestartPostgres,
    ])]
    faults: Vec<dedup_bench::chaos::Fault>,
    /// Time between two faults.
    #[arg(long, value_parser = parse_duration, default_value = "12s")]
    interval: Duration,
    /// How long a stopped service stays down.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    downtime: Duration,
    /// Longest wait for every accepted event to be stored after the load.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    settle_timeout: Duration,
    /// The script that starts the services that are down.
    #[arg(long, default_value = "scripts/ensure-services.sh")]
    services_script: PathBuf,
    #[command(flatten)]
    bins: BinArgs,
}

/// The binaries under test.
#[derive(Debug, Args, Clone)]
struct BinArgs {
    /// The ingest binary under test.
    #[arg(
        long,
        env = "DEDUP_BENCH_INGEST_BIN",
        default_value = "target/release/ingest"
    )]
    ingest_bin: PathBuf,
    /// The dedup-worker binary under test.
    #[arg(
        long,
        env = "DEDUP_BENCH_WORKER_BIN",
        default_value = "target/release/dedup-worker"
    )]
    worker_bin: PathBuf,
}

impl BinArgs {
    fn binaries(&self) -> Binaries {
        Binaries {
            ingest: self.ingest_bin.clone(),
            worker: self.worker_bin.clone(),
        }
    }
}

/// The chaos subcommand: runs it, prints and writes its report, fails when the proof fails.
async fn chaos(args: ChaosArgs, backends: Backends, out: &std::path::Path) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let options = dedup_bench::chaos::ChaosOptions {
        load: LoadSettings {
            addr: "127.0.0.1:0".parse()?,
            write_key: None,
            connections: args.connections,
            rate: Some(args.rate),
            duration: args.duration,
            batch: 1,
            resend: true,
        },
        duplicates: args.duplicates,
        faults: args.faults,
        interval: args.interval,
        downtime: args.downtime,
        settle_timeout: args.settle_timeout,
        binaries: args.bins.binaries(),
        backends,
        logs: out.join(format!("logs-chaos-{stamp}")),
        services_script: args.services_script,
    };
    let name = format!("bench_chaos_{}", std::process::id());
    let report = dedup_bench::chaos::run(options, &name).await?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(format!("chaos-{stamp}.json")), &json)?;
    anyhow::ensure!(
        report.ok,
        "the chaos run's proof failed: see the report above"
    );
    eprintln!(
        "chaos: every one of {} accepted events stored exactly once through {} faults",
        report.unique_accepted,
        report.faults.len()
    );
    Ok(())
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// The options of a pipeline run from its command-line arguments.
fn run_options(args: &RunArgs, backends: Backends, logs: PathBuf) -> anyhow::Result<RunOptions> {
    Ok(RunOptions {
        load: LoadSettings {
            addr: "127.0.0.1:0".parse()?,
            write_key: None,
            connections: args.connections,
            rate: args.rate,
            duration: args.duration,
            batch: args.batch.max(1),
            resend: false,
        },
        duplicates: args.duplicates,
        duplicate_delay: args.duplicate_delay,
        settle_timeout: args.settle_timeout,
        binaries: args.bins.binaries(),
        backends,
        logs,
        keep: args.keep,
        worker_env: args.worker_env.clone(),
        ingest_env: args.ingest_env.clone(),
        workers: args.workers as usize,
        queue_shards: args.queue_shards,
        prefill_rows: args.prefill_rows,
        quiet: false,
        hostile_connections: args.hostile,
        slow_clients: args.slow_clients,
        slow_head_bytes: args.slow_head_bytes,
    })
}

/// An open-loop run at half of `run`'s end-to-end rate, for latency below saturation.
async fn half_rate(
    options: &RunOptions,
    run: &report::RunFigures,
    duration: Duration,
    name: &str,
) -> anyhow::Result<report::HalfRate> {
    let mut half = options.clone();
    half.load.rate = Some(run.end_to_end_events_per_s / 2.0);
    half.load.duration = duration;
    eprintln!(
        "open loop at half of {:.0} events/s for {duration:?}",
        run.end_to_end_events_per_s
    );
    let figures = run_pipeline(half, name).await?;
    anyhow::ensure!(
        figures.correctness.ok,
        "correctness check failed at half rate: {:?}",
        figures.correctness
    );
    Ok(report::HalfRate {
        maximum_events_per_s: run.end_to_end_events_per_s,
        figures,
    })
}

/// Fails unless `run` (the `i`th) proved something: its correctness held and, for the smoke
/// run, it sent duplicates at all and ingest closed slow clients.
fn proved(run: &report::RunFigures, i: u32, smoke: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        run.correctness.ok,
        "correctness check failed in run {i}: {:?}; hostile requests: {:?}; slow clients: {:?}",
        run.correctness,
        run.hostile,
        run.slow
    );
    anyhow::ensure!(
        !smoke || run.correctness.duplicates_sent > 0,
        "the smoke run sent no duplicates, so it proved nothing about dedup: {:?}",
        run.correctness
    );
    anyhow::ensure!(
        !smoke || run.slow.as_ref().is_some_and(|s| s.closed_by_ingest > 0),
        "the smoke run's slow clients were never closed by ingest's header timeout: {:?}",
        run.slow
    );
    Ok(())
}

impl Common {
    fn backends(&self) -> Backends {
        Backends {
            postgres: self.postgres.clone(),
            database: self.database.clone(),
            rabbitmq: self.rabbitmq.clone(),
            rabbitmq_management: self.rabbitmq_management.clone(),
            redis: self.redis.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let c = &cli.common;
    let backends = c.backends();
    let default_run = || RunArgs::parse_from(["run"]);
    // Ceilings are measured in rounds: with a pipeline run, one round just before each run,
    // so every run is compared with the machine as it was at that moment.
    let (ceiling_rounds, binaries, run_args) = match cli.command {
        None => {
            let args = default_run();
            (u32::from(!c.smoke), args.bins.binaries(), Some(args))
        }
        Some(Command::All(args)) => (u32::from(!c.smoke), args.bins.binaries(), Some(args)),
        Some(Command::Run(args)) => (0, args.bins.binaries(), Some(args)),
        Some(Command::Ceilings { rounds, bins }) => (rounds, bins.binaries(), None),
        Some(Command::Chaos(args)) => return chaos(args, backends, &c.out).await,
        Some(Command::Compare(args)) => return compare(args, backends, &c.out).await,
    };
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let name = |what: &str| {
        format!(
            "bench_{what}_{}_{}",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        )
    };
    let mut report = Report::new(git_commit());
    let measure_ceilings = || async {
        let iso = Isolation::new(&backends, &name("ceiling"));
        iso.create(&backends).await?;
        let measured = ceilings::measure(
            &backends,
            &binaries,
            &iso,
            if c.smoke { 1000 } else { c.ceiling_events },
            c.ceiling_batch,
        )
        .await;
        iso.remove(&backends).await;
        measured
    };
    if run_args.is_none() {
        for round in 1..=ceiling_rounds {
            eprintln!("ceilings: round {round} of {ceiling_rounds}");
            report.ceiling_rounds.push(measure_ceilings().await?);
        }
    }
    if let Some(mut args) = run_args {
        if c.smoke {
            args.connections = args.connections.min(8);
            args.duration = Duration::from_secs(4);
            args.duplicate_delay = Duration::from_millis(200);
            args.settle_timeout = Duration::from_secs(60);
            // Two workers on two queues: the smoke run proves that both workers consuming
            // both shards store nothing twice.
            args.workers = args.workers.max(2);
            args.queue_shards = args.queue_shards.max(2);
            // And that rows already in the day's partition change nothing but the cost.
            args.prefill_rows = args.prefill_rows.max(1000);
            // And that slow clients are closed by the real binary's header timeout while the
            // load goes through.
            args.slow_clients = args.slow_clients.max(20);
            if !args
                .ingest_env
                .iter()
                .any(|(k, _)| k == "HEADER_READ_TIMEOUT")
            {
                args.ingest_env
                    .push(("HEADER_READ_TIMEOUT".to_owned(), "1s".to_owned()));
            }
        }
        let options = run_options(&args, backends.clone(), c.out.join(format!("logs-{stamp}")))?;
        let repeat = if c.smoke { 1 } else { args.repeat };
        let mut runs = Vec::new();
        for i in 1..=repeat {
            if repeat > 1 {
                eprintln!("run {i} of {repeat}");
            }
            if ceiling_rounds > 0 {
                report.ceiling_rounds.push(measure_ceilings().await?);
            }
            let run = run_pipeline(options.clone(), &name("run")).await?;
            proved(&run, i, c.smoke)?;
            if let (Some(duration), None, false) = (args.half_rate_latency, args.rate, c.smoke) {
                let half = half_rate(&options, &run, duration, &name("half")).await?;
                report.half_rate.push(half);
            }
            runs.push(run);
        }
        report.add_runs(runs);
    }
    report.ceilings = ceilings::Ceilings::median(&report.ceiling_rounds);
    println!("{}", report.markdown());
    report.write(&c.out, &format!("bench-{stamp}"))?;
    eprintln!(
        "report written to {}/bench-{stamp}.{{json,md}}",
        c.out.display()
    );
    if let Some(run) = &report.run
        && !run.correctness.ok
    {
        anyhow::bail!("correctness check failed: {:?}", run.correctness);
    }
    Ok(())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}
