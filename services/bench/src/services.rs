//! The system under test: the real `ingest` and `dedup-worker` binaries started as child
//! processes on free ports, against a fresh PostgreSQL schema, queue names and Redis prefix
//! of their own; all removed afterwards.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dedup_message::topology::{Topology, close_connection};
use sqlx::postgres::PgPoolOptions;
use test_support::process::free_port;
use tokio::process::{Child, Command};
use tokio::time::error::Elapsed;

/// Where the local services are.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Server URL without a database name, e.g. `postgres://postgres@127.0.0.1:5432`.
    pub postgres: String,
    pub database: String,
    pub rabbitmq: String,
    pub rabbitmq_management: String,
    pub redis: String,
}

/// One run's isolated names.
#[derive(Debug, Clone)]
pub struct Isolation {
    pub name: String,
    pub topology: Topology,
    /// DATABASE_URL whose search_path is the run's schema.
    pub database_url: String,
}

impl Isolation {
    pub fn new(backends: &Backends, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            topology: Topology::prefixed(name),
            database_url: format!(
                "{}/{}?options[search_path]={name}",
                backends.postgres, backends.database
            ),
        }
    }

    /// Creates the database if missing and the run's schema.
    pub async fn create(&self, backends: &Backends) -> anyhow::Result<()> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", backends.postgres))
            .await
            .with_context(|| {
                format!(
                    "cannot reach PostgreSQL at {}; run scripts/ensure-services.sh",
                    backends.postgres
                )
            })?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(&backends.database)
                .fetch_optional(&admin)
                .await?;
        if exists.is_none() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE \"{}\"",
                backends.database
            )))
            .execute(&admin)
            .await?;
        }
        admin.close().await;
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/{}", backends.postgres, backends.database))
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {}", self.name)))
            .execute(&db)
            .await?;
        db.close().await;
        Ok(())
    }

    /// Drops the schema, the queues and exchanges, and the Redis keys of the run. Whatever
    /// could not be removed is reported on stderr with how to remove it by hand.
    pub async fn remove(&self, backends: &Backends) {
        for problem in self.try_remove(backends, REMOVE_WAIT).await {
            eprintln!("bench: {problem}");
        }
    }

    /// [`Isolation::remove`]'s work: each service gets at most `wait`, so one that hangs
    /// neither hangs the benchmark's end nor keeps the others' objects; returns what was left
    /// and why.
    async fn try_remove(&self, backends: &Backends, wait: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |what: String, outcome: Result<anyhow::Result<()>, Elapsed>| {
            let reason = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {} s", wait.as_secs()),
            };
            problems.push(format!("could not remove {what} ({reason})"));
        };
        let schema = tokio::time::timeout(wait, self.drop_schema(backends)).await;
        check(
            format!(
                "the run's schema; by hand: DROP SCHEMA {} CASCADE in database {}",
                self.name, backends.database
            ),
            schema,
        );
        let broker = tokio::time::timeout(wait, self.delete_topology(backends)).await;
        let t = &self.topology;
        check(
            format!(
                "the run's queues {} and exchanges {}, {}; by hand: `rabbitmqctl delete_queue \
                 QUEUE` and `rabbitmqadmin delete exchange name=EXCHANGE` for each",
                t.all_queues().join(", "),
                t.exchange,
                t.dead_letter_exchange()
            ),
            broker,
        );
        let keys = tokio::time::timeout(wait, self.delete_keys(backends)).await;
        check(
            format!(
                "the run's Redis keys; by hand: redis-cli --scan --pattern '{}' | xargs redis-cli del",
                self.key_pattern()
            ),
            keys,
        );
        problems
    }

    async fn drop_schema(&self, backends: &Backends) -> anyhow::Result<()> {
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/{}", backends.postgres, backends.database))
            .await?;
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        )))
        .execute(&db)
        .await;
        db.close().await;
        dropped?;
        Ok(())
    }

    async fn delete_topology(&self, backends: &Backends) -> anyhow::Result<()> {
        let conn =
            lapin::Connection::connect(&backends.rabbitmq, lapin::ConnectionProperties::default())
                .await?;
        let deleted = async {
            let channel = conn.create_channel().await?;
            let t = &self.topology;
            for q in &t.all_queues() {
                channel
                    .queue_delete(q.as_str().into(), Default::default())
                    .await?;
            }
            for e in [&t.exchange, &t.dead_letter_exchange()] {
                channel
                    .exchange_delete(e.as_str().into(), Default::default())
                    .await?;
            }
            anyhow::Ok(())
        }
        .await;
        close_connection(&conn, 200, "bench done").await;
        deleted
    }

    /// The run's keys, with the prefix as the hash tag, alone (`{name}:…`) or with a bucket
    /// (`{name:N}:…`) when keys are spread over slots.
    fn key_pattern(&self) -> String {
        format!("{{{}[:}}]*", self.name)
    }

    async fn delete_keys(&self, backends: &Backends) -> anyhow::Result<()> {
        let client = redis::Client::open(backends.redis.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys = test_support::env::scan_keys(&mut conn, &self.key_pattern()).await?;
        for chunk in keys.chunks(1000) {
            let () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
        }
        Ok(())
    }
}

/// How long removing a run's objects may wait for each service: dropping a schema of a long
/// run's millions of rows takes a few seconds.
const REMOVE_WAIT: Duration = Duration::from_secs(30);

/// Asks PostgreSQL to write every dirty page now (`CHECKPOINT`). Only a superuser or a member
/// of `pg_checkpoint` may; otherwise the run goes on, and the error says what the run's
/// PostgreSQL figures may then include and how to allow it.
pub async fn checkpoint(backends: &Backends) -> Result<(), String> {
    let url = format!("{}/{}", backends.postgres, backends.database);
    let done = async {
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        let result = sqlx::query("CHECKPOINT").execute(&db).await;
        db.close().await;
        result.map(drop)
    };
    done.await.map_err(|e: sqlx::Error| {
        format!(
            "CHECKPOINT before the run failed ({e}); PostgreSQL's CPU in this run may include \
             writing what an earlier one left (grant pg_checkpoint to the benchmark's user)"
        )
    })
}

/// The `source` of prefilled rows, which no event of the load has.
const PREFILL_SOURCE: &str = "dedup-bench prefill";

/// SQL condition for the rows the load stored, leaving out the prefilled ones. Without a
/// prefill it names no column, so a build whose table has no `source` column (a compare's
/// older baseline) can still be measured.
pub fn not_prefilled(prefilled: bool) -> String {
    if prefilled {
        format!("source IS DISTINCT FROM '{PREFILL_SOURCE}'")
    } else {
        "TRUE".to_owned()
    }
}

/// Puts `rows` rows into the partition of `day` (the UTC day the load's events carry) in steps
/// of a million, saying how far it got, then checkpoints so the run does not pay for writing
/// them. Their keys are random and their payloads small: what they add is the unique index
/// the load's inserts go into, ~53 bytes a row.
pub async fn prefill(
    backends: &Backends,
    iso: &Isolation,
    day: chrono::NaiveDate,
    rows: u64,
) -> anyhow::Result<()> {
    const STEP: u64 = 1_000_000;
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(&iso.database_url)
        .await?;
    sqlx::query("SELECT dedup_ensure_partitions(ARRAY[$1::date])")
        .bind(day)
        .execute(&db)
        .await
        .with_context(|| format!("creating the partition of {day} for the prefill"))?;
    let started = std::time::Instant::now();
    let (mut done, mut stored) = (0, 0);
    while done < rows {
        let step = STEP.min(rows - done);
        let inserted = sqlx::query(
            "INSERT INTO product_events (event_date, dedup_key, event_datetime, event_name, \
             product_id, sid, r, payload, received_at, source) \
             SELECT $1, gen_random_uuid(), now(), 'prefill', 'prefill', 'prefill', \
             'prefill-' || ($2 + g), '{}', now(), $3 FROM generate_series(1, $4) g",
        )
        .bind(day)
        .bind(i64::try_from(done)?)
        .bind(PREFILL_SOURCE)
        .bind(i64::try_from(step)?)
        .execute(&db)
        .await
        .with_context(|| format!("prefilling the partition of {day}"))?;
        stored += inserted.rows_affected();
        done += step;
        eprintln!(
            "prefill: {done} of {rows} rows ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    db.close().await;
    anyhow::ensure!(
        stored == rows,
        "the prefill stored {stored} rows, not {rows}"
    );
    if let Err(warning) = checkpoint(backends).await {
        eprintln!("warning: after the prefill: {warning}");
    }
    Ok(())
}

/// Creates the tables in the isolation's schema with `dedup-worker migrate`.
pub async fn migrate(worker: &Path, backends: &Backends, iso: &Isolation) -> anyhow::Result<()> {
    let mut migrate = Command::new(worker);
    common_env(&mut migrate, backends, iso);
    let status = migrate
        .arg("migrate")
        .env("DATABASE_URL", &iso.database_url)
        .status()
        .await
        .with_context(|| format!("cannot run {}", worker.display()))?;
    anyhow::ensure!(status.success(), "dedup-worker migrate failed");
    Ok(())
}

/// Redis' `used_memory` and this isolation's key count, for memory per remembered event.
pub async fn redis_memory(backends: &Backends, iso: &Isolation) -> anyhow::Result<(u64, u64)> {
    let client = redis::Client::open(backends.redis.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO memory has no used_memory")?;
    let keys = test_support::env::scan_keys(&mut conn, &format!("{{{}}}:*", iso.name)).await?;
    Ok((used, keys.len() as u64))
}

/// Growth of Redis' `used_memory` per key added between two [`redis_memory`] readings.
pub fn bytes_per_key(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    (after.1 > before.1)
        .then(|| after.0.saturating_sub(before.0) as f64 / (after.1 - before.1) as f64)
}

impl Binaries {
    /// Fails, saying how to build them, when a binary is missing.
    pub fn check(&self) -> anyhow::Result<()> {
        for bin in [&self.ingest, &self.worker] {
            if !bin.exists() {
                bail!(
                    "{} does not exist; build it with `cargo build --release -p ingest -p dedup-worker`",
                    bin.display()
                );
            }
        }
        Ok(())
    }
}

/// A log file in `logs` for a child's output, appended to (a restarted worker keeps its
/// earlier lines).
fn log(logs: &Path, name: &str) -> anyhow::Result<Stdio> {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(logs.join(name))?;
    Ok(Stdio::from(file))
}

/// Waits (30 s at most) until every admin server answers `/readyz` with 200.
async fn ready(admins: Vec<SocketAddr>, logs: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for admin in admins {
        while crate::http_get(admin, "/readyz").await.map(|(s, _)| s) != Ok(200) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{admin} not ready within 30s; see the logs in {}",
                logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The running binaries.
pub struct Processes {
    pub ingest: Child,
    /// The key the load sends (`None` for an ingest without write keys).
    pub write_key: Option<String>,
    /// One or more worker processes on the same queue, schema and Redis prefix.
    pub workers: Vec<Child>,
    pub ingest_addr: SocketAddr,
    pub ingest_admin: SocketAddr,
    pub worker_admins: Vec<SocketAddr>,
    /// How the first worker was started, to start it again after a kill.
    worker_spec: WorkerSpec,
}

/// Everything needed to start (or restart) the worker process.
#[derive(Debug, Clone)]
struct WorkerSpec {
    bin: PathBuf,
    backends: Backends,
    iso: Isolation,
    logs: PathBuf,
    env: Vec<(String, String)>,
    admin: SocketAddr,
    /// Its log files: worker.log / worker.err, worker-2.log … for the others.
    log_name: String,
}

impl WorkerSpec {
    /// Starts the worker; its output is appended to the run's logs.
    fn spawn(&self) -> anyhow::Result<Child> {
        let mut worker = Command::new(&self.bin);
        common_env(&mut worker, &self.backends, &self.iso);
        worker
            .env("DATABASE_URL", &self.iso.database_url)
            .env("REDIS_URL", &self.backends.redis)
            .env("REDIS_PREFIX", &self.iso.name)
            .env("ADMIN_LISTEN_ADDR", self.admin.to_string())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log(&self.logs, &format!("{}.log", self.log_name))?)
            .stderr(log(&self.logs, &format!("{}.err", self.log_name))?)
            .kill_on_drop(true);
        worker.spawn().context("starting dedup-worker")
    }
}

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ingest: PathBuf,
    pub worker: PathBuf,
}

/// The bench's write key file, in the run's log directory.
const WRITE_KEYS_FILE: &str = "write-keys.yaml";

/// Makes a write key with `ingest write-key` and writes the key file for it into `logs`, so
/// the load pays for checking keys as deployments do. An ingest without write keys (a baseline
/// from before them) gets `None` and runs open.
async fn write_key(ingest: &Path, logs: &Path) -> anyhow::Result<Option<String>> {
    let output = Command::new(ingest)
        .args(["write-key", "--source", "bench"])
        .env_remove("DEDUP_CONFIG")
        .output()
        .await
        .with_context(|| format!("running {} write-key", ingest.display()))?;
    if !output.status.success() {
        return Ok(None);
    }
    let key = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let said = String::from_utf8_lossy(&output.stderr);
    let entry = said
        .find("  - source:")
        .map(|at| &said[at..])
        .context("ingest write-key printed no key file entry")?;
    std::fs::write(logs.join(WRITE_KEYS_FILE), format!("keys:\n{entry}"))?;
    Ok(Some(key))
}

fn common_env(command: &mut Command, backends: &Backends, iso: &Isolation) {
    let t = &iso.topology;
    command
        .env("RABBITMQ_URL", &backends.rabbitmq)
        .env("RABBITMQ_MANAGEMENT_URL", &backends.rabbitmq_management)
        .env("AMQP_EXCHANGE", &t.exchange)
        .env("AMQP_QUEUE", &t.queue)
        .env("AMQP_QUEUE_SHARDS", t.shards.to_string())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .env_remove("DEDUP_CONFIG");
}

impl Processes {
    /// Migrates, starts `workers` worker processes and ingest, and waits until all are ready.
    pub async fn start(
        bins: &Binaries,
        backends: &Backends,
        iso: &Isolation,
        logs: &Path,
        (workers, extra_worker_env): (usize, &[(String, String)]),
        extra_ingest_env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        bins.check()?;
        migrate(&bins.worker, backends, iso).await?;

        let (ingest_addr, ingest_admin) = (free_port(), free_port());
        std::fs::create_dir_all(logs)?;

        let mut specs = Vec::new();
        for i in 0..workers.max(1) {
            specs.push(WorkerSpec {
                bin: bins.worker.clone(),
                backends: backends.clone(),
                iso: iso.clone(),
                logs: logs.to_owned(),
                env: extra_worker_env.to_vec(),
                admin: free_port(),
                log_name: if i == 0 {
                    "worker".to_owned()
                } else {
                    format!("worker-{}", i + 1)
                },
            });
        }
        let workers = specs
            .iter()
            .map(WorkerSpec::spawn)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let worker_admins: Vec<SocketAddr> = specs.iter().map(|s| s.admin).collect();
        let worker_spec = specs.swap_remove(0);
        let write_key = write_key(&bins.ingest, logs).await?;
        let mut ingest = Command::new(&bins.ingest);
        common_env(&mut ingest, backends, iso);
        match &write_key {
            Some(_) => ingest
                .env("AUTH", "keys")
                .env("WRITE_KEYS_PATH", logs.join(WRITE_KEYS_FILE)),
            None => ingest.env("AUTH", "none"),
        };
        ingest
            // As the image sets it (Dockerfile): measure ingest as it is deployed.
            .env("MALLOC_MMAP_THRESHOLD_", "1048576")
            .env("LISTEN_ADDR", ingest_addr.to_string())
            .env("ADMIN_LISTEN_ADDR", ingest_admin.to_string())
            .envs(extra_ingest_env.iter().map(|(k, v)| (k, v)))
            .stdout(log(logs, "ingest.log")?)
            .stderr(log(logs, "ingest.err")?)
            .kill_on_drop(true);
        let ingest = ingest.spawn().context("starting ingest")?;
        let mut admins = worker_admins.clone();
        admins.push(ingest_admin);
        let processes = Self {
            ingest,
            write_key,
            workers,
            ingest_addr,
            ingest_admin,
            worker_admins,
            worker_spec,
        };
        ready(admins, logs).await?;
        Ok(processes)
    }

    /// Kills the first worker with SIGKILL (no shutdown of any kind) and starts a new one,
    /// which gets back from the broker whatever the dead one had not acked.
    pub async fn kill_and_restart_worker(&mut self) -> anyhow::Result<()> {
        let worker = &mut self.workers[0];
        if let Some(pid) = worker.id() {
            Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status()
                .await?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), worker.wait()).await;
        *worker = self.worker_spec.spawn()?;
        Ok(())
    }

    /// The workers' CPU seconds together, and the largest peak RSS of one of them.
    pub fn workers_usage(&self) -> Usage {
        self.workers
            .iter()
            .map(|w| usage(w.id()))
            .fold(Usage::default(), |all, one| Usage {
                peak_rss_mib: all.peak_rss_mib.max(one.peak_rss_mib),
                cpu_seconds: all.cpu_seconds + one.cpu_seconds,
            })
    }

    /// Sends SIGTERM to every process and waits for them to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for child in std::iter::once(&mut self.ingest).chain(self.workers.iter_mut()) {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
        Ok(())
    }
}

/// Peak resident memory and CPU time of a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// CPU seconds the servers on this machine spent over a span of the run: every process of
/// PostgreSQL (backends and helpers), Redis and RabbitMQ (its Erlang VM). Only meaningful when
/// they run here, as in the default setup; anything else using them in that span counts too.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ServerCpu {
    pub postgresql_s: f64,
    pub redis_s: f64,
    pub rabbitmq_s: f64,
}

/// How the machine's CPUs spent a span of the run, in percent of their time: whether the load
/// left them idle, waited on the disk (fsync), or had the hypervisor take them (steal) — what
/// a latency tail on a shared machine comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MachineCpu {
    pub busy_pct: f64,
    pub iowait_pct: f64,
    pub steal_pct: f64,
}

/// The machine's CPU time by state at one moment: /proc/stat's `cpu` line (Linux), in ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    busy: u64,
    iowait: u64,
    steal: u64,
    total: u64,
}

impl MachineTicks {
    pub fn take() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let t: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let at = |i: usize| t.get(i).copied().unwrap_or(0);
        Some(Self {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            iowait: at(4),
            steal: at(7),
            total: (0..8).map(at).sum(),
        })
    }

    /// The shares of the span since `earlier`; `None` for an empty span.
    pub fn since(&self, earlier: &MachineTicks) -> Option<MachineCpu> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)? as f64;
        let pct = |now: u64, then: u64| 100.0 * now.saturating_sub(then) as f64 / total;
        Some(MachineCpu {
            busy_pct: pct(self.busy, earlier.busy),
            iowait_pct: pct(self.iowait, earlier.iowait),
            steal_pct: pct(self.steal, earlier.steal),
        })
    }
}

/// Process names of the servers, in [`ServerCpu`]'s field order.
const SERVER_PROCESSES: [&str; 3] = ["postgres", "redis-server", "beam.smp"];

/// CPU seconds of every server process at one moment, by pid.
#[derive(Debug, Clone, Default)]
pub struct ServerSnapshot(std::collections::HashMap<u32, (usize, f64)>);

impl ServerSnapshot {
    /// Reads every server process's CPU time from /proc (Linux).
    pub fn take() -> Self {
        let mut by_pid = std::collections::HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self(by_pid);
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((name, seconds)) = parse_stat(&stat)
                && let Some(server) = SERVER_PROCESSES.iter().position(|s| *s == name)
            {
                by_pid.insert(pid, (server, seconds));
            }
        }
        Self(by_pid)
    }

    /// CPU spent since `earlier`; a process started in between counts from zero. `None` when
    /// no server process is on this machine.
    pub fn since(&self, earlier: &ServerSnapshot) -> Option<ServerCpu> {
        if self.0.is_empty() {
            return None;
        }
        let mut spent = [0.0; 3];
        for (pid, (server, seconds)) in &self.0 {
            let before = earlier.0.get(pid).map_or(0.0, |(_, s)| *s);
            spent[*server] += (seconds - before).max(0.0);
        }
        Some(ServerCpu {
            postgresql_s: spent[0],
            redis_s: spent[1],
            rabbitmq_s: spent[2],
        })
    }
}

/// A process's command name and CPU seconds (user + system) from its /proc stat line.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let (head, after) = stat.rsplit_once(')')?;
    let (_, name) = head.split_once('(')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name; 100 Hz.
    Some((name, (ticks(11)? + ticks(12)?) / 100.0))
}

/// Reads [`Usage`] from /proc (Linux).
pub fn usage(pid: Option<u32>) -> Usage {
    let Some(pid) = pid else {
        return Usage::default();
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    Usage {
        peak_rss_mib: hwm_kib / 1024.0,
        cpu_seconds: parse_stat(&stat).map_or(0.0, |(_, seconds)| seconds),
    }
}

#[cfg(test)]
mod machine_tests {
    use super::*;

    #[test]
    fn machine_shares_come_from_the_cpu_line() {
        let before =
            MachineTicks::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n").expect("cpu");
        let after = MachineTicks::parse("cpu  160 0 70 880 30 5 5 50 0 0\n").expect("cpu");
        // 200 ticks passed: 90 busy (60 user, 20 system, 10 irq), 20 iowait, 10 stolen.
        let shares = after.since(&before).expect("a span");
        assert_eq!(
            (shares.busy_pct, shares.iowait_pct, shares.steal_pct),
            (45.0, 10.0, 5.0)
        );
        assert_eq!(after.since(&after), None);
        assert!(MachineTicks::parse("intr 1 2").is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_the_name_and_cpu_seconds_even_with_spaces_in_the_name() {
        // Real line shape: pid (comm) state ppid ... utime stime ...
        let line = "4242 (tokio rt) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 9 0 1";
        assert_eq!(parse_stat(line), Some(("tokio rt", 3.25)));
        assert_eq!(parse_stat("4242 (postgres) S 1"), None, "a cut-off line");
        assert_eq!(parse_stat("garbage"), None);
    }

    fn snapshot(entries: &[(u32, usize, f64)]) -> ServerSnapshot {
        ServerSnapshot(entries.iter().map(|&(p, s, c)| (p, (s, c))).collect())
    }

    #[test]
    fn server_cpu_adds_what_each_process_spent_and_counts_new_ones_from_zero() {
        let before = snapshot(&[(1, 0, 10.0), (2, 0, 5.0), (3, 1, 1.0), (9, 2, 7.0)]);
        // pid 2 exited, pid 4 is a new PostgreSQL backend.
        let after = snapshot(&[(1, 0, 12.5), (3, 1, 1.5), (4, 0, 0.25), (9, 2, 8.0)]);
        assert_eq!(
            after.since(&before),
            Some(ServerCpu {
                postgresql_s: 2.75,
                redis_s: 0.5,
                rabbitmq_s: 1.0,
            })
        );
        assert_eq!(snapshot(&[]).since(&before), None, "no servers here");
    }

    #[test]
    fn the_local_servers_are_found_in_proc() {
        // The tests run against the local PostgreSQL, Redis and RabbitMQ.
        let now = ServerSnapshot::take();
        for (i, name) in SERVER_PROCESSES.iter().enumerate() {
            assert!(
                now.0.values().any(|(s, _)| *s == i),
                "no {name} process in /proc: the local services must be running (scripts/ensure-services.sh)"
            );
        }
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;

    fn backends_as(user: &str) -> Backends {
        Backends {
            postgres: format!("postgres://{user}@127.0.0.1:5432"),
            database: "test".into(),
            rabbitmq: String::new(),
            rabbitmq_management: String::new(),
            redis: String::new(),
        }
    }

    /// Role statements from the test itself (the role's name is made here, not input).
    async fn admin_sql(admin: &sqlx::PgPool, sql: String, what: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(admin)
            .await
            .expect(what);
    }

    /// The run's CHECKPOINT against the real server: done as a superuser; refused to a role
    /// without `pg_checkpoint` with a message that says what to grant; and that grant is
    /// enough.
    #[tokio::test]
    async fn checkpoint_refused_says_what_to_grant_and_the_grant_is_enough() {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(test_support::env::POSTGRES_URL)
            .await
            .expect("PostgreSQL is not running: start it with scripts/ensure-services.sh");
        let role = format!("dedup_bench_plain_{}", std::process::id());
        admin_sql(&admin, format!("DROP ROLE IF EXISTS {role}"), "drop role").await;
        admin_sql(&admin, format!("CREATE ROLE {role} LOGIN"), "create role").await;

        let as_superuser = checkpoint(&backends_as("postgres")).await;
        let refused = checkpoint(&backends_as(&role)).await;
        admin_sql(&admin, format!("GRANT pg_checkpoint TO {role}"), "grant").await;
        let granted = checkpoint(&backends_as(&role)).await;
        admin_sql(&admin, format!("DROP ROLE {role}"), "drop role").await;

        assert_eq!(as_superuser, Ok(()));
        let warning = refused.expect_err("a role without pg_checkpoint may not CHECKPOINT");
        assert!(
            warning.starts_with("CHECKPOINT before the run failed")
                && warning.contains("must be superuser")
                && warning.contains("grant pg_checkpoint to the benchmark's user"),
            "{warning}"
        );
        assert_eq!(granted, Ok(()));
    }
}

#[cfg(test)]
mod remove_tests {
    use super::*;
    use dedup_message::topology::close_channel;
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use test_support::client::amqp_url_via;
    use test_support::env::{RABBITMQ_URL, REDIS_URL, scan_keys};
    use test_support::proxy::{AMQP_CHANNEL_OPEN, Proxy};

    fn backends_with_broker(rabbitmq: String) -> Backends {
        Backends {
            postgres: "postgres://postgres@127.0.0.1:5432".into(),
            database: "test".into(),
            rabbitmq,
            rabbitmq_management: String::new(),
            redis: REDIS_URL.into(),
        }
    }

    async fn redis() -> redis::aio::MultiplexedConnection {
        redis::Client::open(REDIS_URL)
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis is not running: start it with scripts/ensure-services.sh")
    }

    /// Whether `queue` exists, by a passive declare on a channel of its own (a missing queue
    /// closes the channel).
    async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
        let channel = conn.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await;
        close_channel(&channel, 200, "checked").await;
        declared.is_ok()
    }

    async fn schema_exists(name: &str) -> bool {
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(test_support::env::POSTGRES_URL)
            .await
            .expect("PostgreSQL is not running: start it with scripts/ensure-services.sh");
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_namespace WHERE nspname = $1")
                .bind(name)
                .fetch_optional(&db)
                .await
                .expect("pg_namespace");
        db.close().await;
        found.is_some()
    }

    /// A broker that hangs after the handshake: the run's schema and Redis keys (both key
    /// shapes, and no other key) still go, the removal ends after its wait, and it says which
    /// queues and exchanges were left and how to remove them. With the broker answering
    /// again, a second removal takes the rest, and a third finds nothing and reports nothing.
    #[tokio::test]
    async fn a_hung_broker_keeps_only_its_own_objects_and_is_named() {
        let name = format!("bench_remove_{}", std::process::id());
        let direct = backends_with_broker(RABBITMQ_URL.into());
        let iso = Isolation::new(&direct, &name);
        iso.create(&direct).await.expect("the run's schema");
        let conn = lapin::Connection::connect(RABBITMQ_URL, Default::default())
            .await
            .expect("RabbitMQ is not running: start it with scripts/ensure-services.sh");
        let channel = conn.create_channel().await.expect("channel");
        iso.topology.declare(&channel).await.expect("declare");
        let mut keys = redis().await;
        let run_keys = [format!("{{{name}}}:k:1"), format!("{{{name}:3}}:k:2")];
        let other = format!("{{{name}x}}:k:1");
        for key in run_keys.iter().chain([&other]) {
            let () = redis::cmd("SET")
                .arg(key)
                .arg(1)
                .query_async(&mut keys)
                .await
                .expect("SET");
        }

        let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
        proxy.stall_on(AMQP_CHANNEL_OPEN);
        let hung = backends_with_broker(amqp_url_via(proxy.addr()));
        let started = Instant::now();
        let problems = iso.try_remove(&hung, Duration::from_secs(2)).await;
        let took = started.elapsed();

        let left_keys = scan_keys(&mut keys, &format!("{{{name}*"))
            .await
            .expect("SCAN");
        let schema_left = schema_exists(&name).await;
        let queue_left = queue_exists(&conn, &iso.topology.queue).await;
        let problems_after = iso.try_remove(&direct, REMOVE_WAIT).await;
        let queue_after = queue_exists(&conn, &iso.topology.queue).await;
        let problems_again = iso.try_remove(&direct, REMOVE_WAIT).await;
        let () = redis::cmd("DEL")
            .arg(&other)
            .query_async(&mut keys)
            .await
            .expect("DEL");
        close_connection(&conn, 200, "done").await;

        assert_eq!(proxy.stalled(), 1, "the removal met the hung broker");
        assert!(took < Duration::from_secs(10), "the removal took {took:?}");
        assert!(!schema_left, "the schema goes whatever the broker does");
        assert_eq!(left_keys, vec![other], "the run's keys go, no other");
        assert!(queue_left, "the hung broker kept the queue");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("could not remove the run's queues")
                && problems[0].contains(&iso.topology.queue)
                && problems[0].contains("by hand")
                && problems[0].contains("no answer within 2 s"),
            "{}",
            problems[0]
        );
        assert!(problems_after.is_empty(), "{problems_after:?}");
        assert!(!queue_after, "the broker answering, its objects go");
        assert!(problems_again.is_empty(), "{problems_again:?}");
    }
}
