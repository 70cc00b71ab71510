//! Throw-away TLS servers for tests: a CA made for the test, and private instances of Redis,
//! PostgreSQL and RabbitMQ (with its management API) that speak only TLS with a certificate
//! that CA signed, on ports of their own. The machine's shared services are never touched.
//! Each server stops (its whole process group) when dropped.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA, a server certificate it signed for `localhost` and `127.0.0.1`, and an unrelated CA
/// (for the "unknown CA" failure paths), as PEM files in a directory removed on drop.
pub struct TestCa {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    pub other_ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dedup-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("TLS dir");
        // Servers running as other users (postgres, rabbitmq) read from here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (ca, ca_key) = new_ca("dedup test CA");
        let (other, _) = new_ca("some other CA");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write PEM");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        };
        Self {
            ca_file: write("ca.pem", &ca.pem(), 0o644),
            other_ca_file: write("other-ca.pem", &other.pem(), 0o644),
            cert_file: write("server.pem", &cert.pem(), 0o644),
            key_file: write("server.key", &key.serialize_pem(), 0o600),
            dir,
        }
    }

    /// A copy of the server key readable only by `user` (PostgreSQL insists).
    fn key_owned_by(&self, user: &str) -> PathBuf {
        let path = self.dir.join(format!("server-{user}.key"));
        std::fs::copy(&self.key_file, &path).expect("copy key");
        run("chown", &[user, path.to_str().expect("path")]);
        path
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA cert");
    (cert, key)
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

fn free_port() -> u16 {
    crate::process::free_port().port()
}

/// A server process in its own process group, killed whole on drop.
pub struct TlsServer {
    pub port: u16,
    /// Extra ports (RabbitMQ's management API).
    pub management_port: Option<u16>,
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl TlsServer {
    fn spawn(what: &'static str, mut command: Command, log: PathBuf, port: u16) -> Self {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(&log).expect("server log");
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the TLS {what}: {e}"));
        Self {
            port,
            management_port: None,
            child,
            what,
            log,
        }
    }

    /// Waits until `port` accepts connections (the server is up), or fails with its log.
    /// Blocking: the servers are started from plain threads, side by side.
    #[allow(
        clippy::disallowed_methods,
        reason = "runs on a plain thread, not a runtime's"
    )]
    fn wait_for(&mut self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the TLS {} exited ({status}): {}",
                    self.what,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the TLS {} did not listen on {port} within {within:?}: {}",
            self.what,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        // The whole group: the servers start helpers (PostgreSQL's backends, Erlang's epmd
        // and port programs) that would outlive their parent.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

/// Redis with TLS only (no plaintext port), requiring a password for the default user and
/// with the ACL user `dedup-worker` (password `worker-secret`) that the chart gives the workers.
pub fn redis(ca: &TestCa) -> TlsServer {
    let port = free_port();
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ]);
    command.args([
        "--tls-cert-file",
        path(&ca.cert_file),
        "--tls-key-file",
        path(&ca.key_file),
    ]);
    command.args([
        "--tls-ca-cert-file",
        path(&ca.ca_file),
        "--tls-auth-clients",
        "no",
    ]);
    command.args(["--save", "", "--appendonly", "no", "--dir", path(&ca.dir)]);
    command.args(["--requirepass", "admin-secret"]);
    command.args([
        "--user",
        "dedup-worker",
        "on",
        ">worker-secret",
        "~*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    let mut server = TlsServer::spawn("Redis", command, ca.dir.join("redis.log"), port);
    server.wait_for(port, Duration::from_secs(20));
    server
}

/// A PostgreSQL cluster of its own (initdb as `postgres`) that takes only TLS connections
/// (`hostssl` in pg_hba.conf, trust), database `postgres`, user `postgres`.
pub fn postgres(ca: &TestCa) -> TlsServer {
    let bin = Path::new("/usr/lib/postgresql/15/bin");
    assert!(
        bin.exists(),
        "PostgreSQL 15's binaries are not in {}",
        bin.display()
    );
    let data = ca.dir.join("pgdata");
    run(
        "install",
        &["-d", "-o", "postgres", "-m", "700", path(&data)],
    );
    let initdb = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args([
            "-D",
            path(&data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])
        .output()
        .expect("initdb");
    assert!(
        initdb.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&initdb.stderr)
    );
    std::fs::write(
        data.join("pg_hba.conf"),
        "hostssl all all 127.0.0.1/32 trust\n",
    )
    .expect("pg_hba");
    let key = ca.key_owned_by("postgres");
    let port = free_port();
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(bin.join("postgres"));
    command.args(["-D", path(&data), "-p", &port.to_string()]);
    command.args([
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
    ]);
    command.args(["-c", "ssl=on", "-c", "fsync=off"]);
    command
        .arg("-c")
        .arg(format!("ssl_cert_file={}", ca.cert_file.display()));
    command
        .arg("-c")
        .arg(format!("ssl_key_file={}", key.display()));
    let mut server = TlsServer::spawn("PostgreSQL", command, ca.dir.join("postgres.log"), port);
    server.wait_for(port, Duration::from_secs(30));
    server
}

/// A RabbitMQ node of its own (node name, ports and data directory apart from the shared
/// one) listening only with TLS, for AMQP and for its management API; user guest/guest may
/// connect from anywhere.
pub fn rabbitmq(ca: &TestCa) -> TlsServer {
    let (amqps, management, dist) = (free_port(), free_port(), free_port());
    let config = ca.dir.join("rabbitmq.conf");
    std::fs::write(
        &config,
        format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{amqps}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             management.tcp.port = 0\n\
             management.ssl.port = {management}\n\
             management.ssl.ip = 127.0.0.1\n\
             management.ssl.cacertfile = {ca}\n\
             management.ssl.certfile = {cert}\n\
             management.ssl.keyfile = {key}\n\
             loopback_users = none\n",
            ca = ca.ca_file.display(),
            cert = ca.cert_file.display(),
            key = ca.key_file.display(),
        ),
    )
    .expect("rabbitmq.conf");
    let plugins = ca.dir.join("enabled_plugins");
    std::fs::write(&plugins, "[rabbitmq_management].\n").expect("plugins");
    let node = format!("dedup-tls-{}@localhost", std::process::id());
    let mut command = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    command
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_CONFIG_FILE", ca.dir.join("rabbitmq"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
        .env("RABBITMQ_MNESIA_BASE", ca.dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", ca.dir.join("rabbitmq-log"))
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_NODE_PORT", free_port().to_string());
    let mut server = TlsServer::spawn("RabbitMQ", command, ca.dir.join("rabbitmq.out"), amqps);
    // The management listener starts last: once it listens, AMQP does too.
    server.wait_for(management, Duration::from_secs(90));
    server.wait_for(amqps, Duration::from_secs(10));
    server.management_port = Some(management);
    server
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
