//! A Redis Cluster of its own: three primaries (no replicas) on free loopback ports, in a
//! temporary directory, made with `redis-cli --cluster create`; killed and removed on drop.
//! For tests of what a cluster changes (keys spread over slots, pipelines within one slot).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running three-node Redis Cluster.
pub struct RedisCluster {
    /// The nodes' client ports (each also uses port + 10000 for the cluster bus).
    pub ports: Vec<u16>,
    nodes: Vec<Child>,
    dir: PathBuf,
}

/// A free port whose cluster-bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().expect("address").port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn redis_cli(args: &[String]) -> Output {
    Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server")
}

impl RedisCluster {
    /// Starts the nodes, joins them into one cluster and waits (30 s at most) until every
    /// slot is served.
    #[allow(
        clippy::disallowed_methods,
        reason = "runs before the test's runtime needs it, from plain blocking code"
    )]
    pub fn start(name: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let dir =
            std::env::temp_dir().join(format!("dedup-redis-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let ports: Vec<u16> = (0..3).map(|_| free_cluster_port()).collect();
        let mut cluster = Self {
            ports: ports.clone(),
            nodes: Vec::new(),
            dir: dir.clone(),
        };
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node directory");
            let log = std::fs::File::create(node_dir.join("redis.log")).expect("log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("redis-server starts");
            cluster.nodes.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &ports {
            while redis_cli(&["-p".into(), port.to_string(), "PING".into()]).stdout != b"PONG\n" {
                assert!(
                    Instant::now() < deadline,
                    "Redis node {port} did not start: {}",
                    cluster.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        let made = redis_cli(&create);
        assert!(
            made.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&made.stdout),
            String::from_utf8_lossy(&made.stderr)
        );
        for port in &ports {
            loop {
                let info = redis_cli(&[
                    "-p".into(),
                    port.to_string(),
                    "CLUSTER".into(),
                    "INFO".into(),
                ]);
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not come up: {}",
                    cluster.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// A URL of one node (a cluster client discovers the others from it).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|port| {
                let out = redis_cli(&["-p".into(), port.to_string(), "DBSIZE".into()]);
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn logs(&self) -> String {
        self.ports
            .iter()
            .map(|p| {
                std::fs::read_to_string(self.dir.join(p.to_string()).join("redis.log"))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Ok(pid) = i32::try_from(node.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
