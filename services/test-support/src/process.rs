//! The real `ingest` and `dedup-worker` binaries as child processes, wired to a [`TestEnv`]
//! through their environment variables, the way an operator runs them. Tests that use this
//! are clients: they talk HTTP, AMQP and SQL and read `/metrics`, never the crates' internals.
//!
//! The binaries are the ones `cargo build --workspace` left beside the test executable
//! (`target/<profile>/`), or in `DEDUP_TEST_BIN_DIR`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::http_request;
use crate::env::{RABBITMQ_URL, REDIS_URL, TestEnv};

/// Where the binaries under test are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEDUP_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test executable>
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps")
        .to_owned()
}

/// The path of one of the workspace's binaries; panics, saying what to do, when it has not
/// been built.
pub fn built(binary: &str) -> PathBuf {
    let path = bin_dir().join(binary);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A loopback address no one listens on at the moment of asking, for a server to bind next.
///
/// It lies below the kernel's range of ephemeral ports, which binding port 0 would pick from:
/// between this answer and the server's bind, any outgoing connection on the machine may take
/// an ephemeral port as its own, and did (a benchmark run's ingest failed with "Address
/// already in use"). Outgoing connections never take a port below that range.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static ASKED: AtomicU32 = AtomicU32::new(0);
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(first_ephemeral / 2);
    let span = first_ephemeral.saturating_sub(low);
    // A different starting point in every process, and a different port at every call in one.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
    let asked = ASKED.fetch_add(1, Ordering::Relaxed);
    for step in 0..span {
        let offset = (seed
            .wrapping_add(asked.wrapping_mul(7_919))
            .wrapping_add(step))
            % span.max(1);
        let Ok(port) = u16::try_from(low + offset) else {
            continue;
        };
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("a bound port");
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A binary about to start, with its environment.
pub struct Launch {
    binary: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen: Option<SocketAddr>,
    admin: SocketAddr,
    open_files: Option<(u64, u64)>,
    refuse_raising_limits: bool,
    capture_log: bool,
}

impl Launch {
    /// `ingest` publishing to `amqp_url` with `env`'s queues and test-friendly timings.
    pub fn ingest(env: &TestEnv, amqp_url: &str) -> Self {
        let listen = free_port();
        Self::new("ingest", env, amqp_url)
            .set("LISTEN_ADDR", listen)
            // Write keys are the default; tests of them turn them back on.
            .set("AUTH", "none")
            .set("CONFIRM_TIMEOUT", "3s")
            .set("RECONNECT_MAX_BACKOFF", "300ms")
            .set("RETRY_AFTER", "2s")
            .listening(listen)
    }

    /// `dedup-worker` on `env`'s queues, schema and Redis prefix, migrating at start, with
    /// small batches and short timings.
    pub fn worker(env: &TestEnv) -> Self {
        Self::new("dedup-worker", env, RABBITMQ_URL)
            .set("DATABASE_URL", &env.database_url)
            .set("REDIS_URL", REDIS_URL)
            .set("REDIS_PREFIX", &env.redis_prefix)
            .set("MIGRATE_ON_START", "true")
            .set("BATCH_SIZE", 50)
            .set("PREFETCH", 200)
            .set("BATCH_LINGER", "20ms")
            .set("RECONNECT_MAX_BACKOFF", "300ms")
            .set("REDIS_TIMEOUT", "300ms")
            .set("REDIS_RETRY_INTERVAL", "300ms")
            .set("DEDUP_WINDOW", "1h")
            .set("SHUTDOWN_GRACE", "10s")
    }

    /// `dedup-operator run` against the Kubernetes API server a kubeconfig file names, as a
    /// single replica (no leader election).
    pub fn operator(kubeconfig: &std::path::Path) -> Self {
        let admin = free_port();
        Self {
            binary: "dedup-operator",
            args: vec!["run".to_owned()],
            env: Vec::new(),
            listen: None,
            admin,
            open_files: None,
            refuse_raising_limits: false,
            capture_log: false,
        }
        .set("ADMIN_LISTEN_ADDR", admin)
        .set("KUBECONFIG", kubeconfig.display())
        .set("LEADER_ELECTION", "false")
        .set("LOG_FORMAT", "text")
    }

    fn new(binary: &'static str, env: &TestEnv, amqp_url: &str) -> Self {
        let admin = free_port();
        let t = &env.topology;
        Self {
            binary,
            args: Vec::new(),
            env: Vec::new(),
            listen: None,
            admin,
            open_files: None,
            refuse_raising_limits: false,
            capture_log: false,
        }
        .set("ADMIN_LISTEN_ADDR", admin)
        .set("RABBITMQ_URL", amqp_url)
        .set("AMQP_EXCHANGE", &t.exchange)
        .set("AMQP_QUEUE", &t.queue)
        .set("LOG_FORMAT", "text")
        .set("QUEUE_DEPTH_INTERVAL", "500ms")
    }

    fn listening(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Sets (or overrides) one variable.
    pub fn set(mut self, name: &str, value: impl ToString) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_string()));
        self
    }

    /// Starts the binary with this soft and hard limit on open files, through util-linux's
    /// `prlimit`, which sets them and then executes the binary in its own place (same process,
    /// so stopping and killing it work as without).
    pub fn open_file_limit(mut self, soft: u64, hard: u64) -> Self {
        self.open_files = Some((soft, hard));
        self
    }

    /// Starts the binary where every attempt to change a resource limit is refused (EPERM), as
    /// in some sandboxes: through this crate's `refuse-raising-limits`, after any
    /// [`open_file_limit`](Self::open_file_limit) is set.
    pub fn refuse_raising_limits(mut self) -> Self {
        self.refuse_raising_limits = true;
        self
    }

    /// Keeps what the binary logs (its standard output) for [`Service::log`], instead of
    /// dropping it.
    pub fn capture_log(mut self) -> Self {
        self.capture_log = true;
        self
    }

    /// Removes a variable the launch would set.
    pub fn unset(mut self, name: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self
    }

    /// Starts the binary and waits (20 s at most) until its `/readyz` answers 200.
    pub async fn start(self) -> Service {
        let service = self.spawn();
        let admin = service.admin;
        crate::eventually(
            Duration::from_secs(20),
            &format!("{} to be ready", service.binary),
            || async {
                // Refused until the admin server listens.
                tokio::net::TcpStream::connect(admin).await.ok()?;
                (http_request(admin, "GET", "/readyz", "text/plain", b"")
                    .await
                    .0
                    == 200)
                    .then_some(())
            },
        )
        .await;
        service
    }

    /// Runs a subcommand (`migrate`, `maintain`, `probe`) to its end; returns its output.
    pub async fn run(self, args: &[&str]) -> std::process::Output {
        let mut command = self.command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", self.binary))
    }

    fn command(&self) -> Command {
        let path = built(self.binary);
        // Each wrapper executes the next in its own place (same process, so stopping and
        // killing it work as without).
        let mut program = vec![path.into_os_string()];
        if self.refuse_raising_limits {
            program.insert(0, built("refuse-raising-limits").into_os_string());
        }
        if let Some((soft, hard)) = self.open_files {
            program.splice(
                0..0,
                [
                    "prlimit".into(),
                    format!("--nofile={soft}:{hard}").into(),
                    "--".into(),
                ],
            );
        }
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]);
        command
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command
    }

    /// Starts the binary without waiting for it to be ready.
    pub fn spawn(self) -> Service {
        let mut command = self.command();
        if self.capture_log {
            command.stdout(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary));
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stdout) = child.stdout.take() {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Service {
            binary: self.binary,
            child,
            addr: self.listen,
            admin: self.admin,
            log,
        }
    }
}

/// A running binary; killed when dropped.
pub struct Service {
    binary: &'static str,
    child: Child,
    /// The public listener (ingest only).
    pub addr: Option<SocketAddr>,
    /// The admin server: /metrics, /healthz, /readyz.
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// ingest's public address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("a binary with a public listener")
    }

    /// What it has logged so far, with [`Launch::capture_log`]; empty without.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What its `/readyz` says: ready, or the reason it is not.
    pub async fn ready(&self) -> Result<(), String> {
        match http_request(self.admin, "GET", "/readyz", "text/plain", b"").await {
            (200, _) => Ok(()),
            (_, reason) => Err(reason),
        }
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_request(self.admin, "GET", "/metrics", "text/plain", b"").await;
        assert_eq!(status, 200, "{} /metrics: {body}", self.binary);
        body
    }

    /// The sum of every series of `name` in its metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGTERM, then waits (30 s at most) for the exit; returns whether it exited cleanly.
    pub async fn stop(mut self) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }

    /// SIGKILL, as a crashed process.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    /// Ports come from below the kernel's ephemeral range, where no outgoing connection can
    /// take them, and each is free to bind; two calls in a row give two ports.
    #[test]
    fn free_ports_lie_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("the kernel's ephemeral port range");
        let first_ephemeral: u16 = range
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port number");
        let ports: Vec<u16> = (0..20).map(|_| super::free_port().port()).collect();
        for port in &ports {
            assert!(
                *port < first_ephemeral,
                "{port} is in the ephemeral range {range}"
            );
            std::net::TcpListener::bind(("127.0.0.1", *port)).expect("the port is free");
        }
        assert!(ports.windows(2).all(|w| w[0] != w[1]), "{ports:?}");
    }
}
