//! A RabbitMQ cluster of its own: three nodes of the machine's RabbitMQ (Debian's package) on
//! free loopback ports, in a temporary directory with its own Erlang cookie, joined with
//! `rabbitmqctl join_cluster`; killed and removed on drop. For tests of what a cluster
//! changes: where quorum queues' leaders live, and a node lost under load.
//!
//! [`RabbitCluster::start`] configures the nodes as the docs tell users to configure theirs
//! for queue shards: `queue_leader_locator = balanced`, so each new queue's leader goes to the
//! node that leads the fewest. [`RabbitCluster::start_with_default_locator`] leaves RabbitMQ's
//! default, which puts it on the declaring client's node. Every node runs the management plugin.
//!
//! Every method blocks (it runs `rabbitmqctl`): call it from `spawn_blocking` or
//! `block_in_place` inside a test's runtime.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's package keeps the server and CLI scripts that run as the calling user (the
/// ones on PATH switch to the `rabbitmq` user, whose cookie is not this cluster's).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// The RabbitMQ CLI tools' own distribution ports: a node must not take one.
const CLI_PORTS: std::ops::RangeInclusive<u16> = 35_672..=35_682;
/// How long one node may take to boot, or to restart its application after joining.
const BOOT: Duration = Duration::from_secs(90);

/// A running three-node RabbitMQ cluster.
pub struct RabbitCluster {
    /// The nodes' AMQP ports, node 0 first.
    pub ports: Vec<u16>,
    /// The nodes' management API ports.
    pub management_ports: Vec<u16>,
    /// The nodes' Erlang names (`<name>@localhost`).
    pub nodes: Vec<String>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

/// Held while a cluster boots: between choosing its free ports and its nodes listening on
/// them, a second cluster booting in the same test process could choose the same ones.
static BOOTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` distinct free loopback ports outside the CLI tools' range: each stays bound until all
/// are chosen, so none is chosen twice.
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().expect("a bound port").port();
        if !CLI_PORTS.contains(&port) {
            held.push((port, listener));
        }
    }
    held.into_iter().map(|(port, _)| port).collect()
}

impl RabbitCluster {
    /// Boots three nodes, joins nodes 1 and 2 to node 0 and waits until all three run and
    /// accept AMQP connections (a few minutes at most; about 20 s on two cores).
    pub fn start(name: &str) -> Self {
        Self::boot(name, "balanced")
    }

    /// Like [`start`](Self::start), with RabbitMQ's default `queue_leader_locator`
    /// (`client-local`).
    pub fn start_with_default_locator(name: &str) -> Self {
        Self::boot(name, "client-local")
    }

    #[allow(
        clippy::disallowed_methods,
        reason = "runs before the test's runtime needs it, from plain blocking code"
    )]
    fn boot(name: &str, locator: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let _booting = BOOTING.lock().unwrap_or_else(|e| e.into_inner());
        let server = PathBuf::from(RABBITMQ_BIN).join("rabbitmq-server");
        assert!(
            server.exists(),
            "{} is missing: install Debian's rabbitmq-server package",
            server.display()
        );
        let tag: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "dedup-rabbitmq-cluster-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster directory");
        // The CLI and the nodes find the cookie in $HOME; it must be private to its owner.
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("dedup{tag}{}", std::process::id())).expect("cookie");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
                .expect("cookie mode");
        }
        let mut cluster = Self {
            ports: Vec::new(),
            management_ports: Vec::new(),
            nodes: Vec::new(),
            children: Vec::new(),
            dir: dir.clone(),
        };
        let ports = free_ports(9);
        for (i, node_ports) in ports.chunks_exact(3).enumerate() {
            let (port, dist, management) = (node_ports[0], node_ports[1], node_ports[2]);
            let node = format!("dedup_{tag}_{}_{i}@localhost", std::process::id());
            let node_dir = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).expect("node directory");
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.default = 127.0.0.1:{port}\n\
                     management.tcp.ip = 127.0.0.1\n\
                     management.tcp.port = {management}\n\
                     queue_leader_locator = {locator}\n"
                ),
            )
            .expect("node config");
            std::fs::write(node_dir.join("enabled_plugins"), "[rabbitmq_management].\n")
                .expect("node plugins");
            let log = std::fs::File::create(node_dir.join("server.log")).expect("log");
            let child = Command::new(&server)
                .current_dir(&node_dir)
                .env("HOME", &dir)
                .env("RABBITMQ_NODENAME", &node)
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_DIST_PORT", dist.to_string())
                .env("RABBITMQ_CONFIG_FILE", node_dir.join("rabbitmq.conf"))
                .env("RABBITMQ_MNESIA_BASE", node_dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", node_dir.join("log"))
                .env(
                    "RABBITMQ_ENABLED_PLUGINS_FILE",
                    node_dir.join("enabled_plugins"),
                )
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("rabbitmq-server starts");
            cluster.ports.push(port);
            cluster.management_ports.push(management);
            cluster.nodes.push(node);
            cluster.children.push(Some(child));
        }
        for i in 0..3 {
            cluster.await_amqp(i);
        }
        for i in 1..3 {
            let node = cluster.nodes[i].clone();
            cluster.ctl_ok(&node, &["stop_app"]);
            cluster.ctl_ok(&node, &["join_cluster", &cluster.nodes[0].clone()]);
            cluster.ctl_ok(&node, &["start_app"]);
            cluster.await_amqp(i);
        }
        let running = cluster.running_nodes(0);
        assert_eq!(
            running.len(),
            3,
            "the cluster has {running:?} running, not all of {:?}",
            cluster.nodes
        );
        cluster
    }

    /// The AMQP URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.ports[i])
    }

    /// The management API URL of node `i`.
    pub fn management_url(&self, i: usize) -> String {
        format!("http://guest:guest@127.0.0.1:{}", self.management_ports[i])
    }

    /// Moves quorum queues' leaders so each node leads about as many
    /// (`rabbitmq-queues rebalance quorum`, through node `via`).
    pub fn rebalance(&self, via: usize) {
        self.cli_ok(
            "rabbitmq-queues",
            &self.nodes[via],
            &["rebalance", "quorum"],
        );
    }

    /// Which node each quorum queue's leader is on, asked of live node `via`.
    pub fn leaders(&self, via: usize) -> HashMap<String, String> {
        let out = self.ctl_ok(
            &self.nodes[via],
            &["list_queues", "name", "leader", "--formatter", "json"],
        );
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("list_queues prints JSON");
        rows.iter()
            .filter_map(|row| {
                Some((
                    row["name"].as_str()?.to_owned(),
                    row["leader"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// The index of node `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} is not a node of this cluster ({:?})", self.nodes))
    }

    /// The nodes node `via` sees running.
    pub fn running_nodes(&self, via: usize) -> Vec<String> {
        let out = self.ctl_ok(&self.nodes[via], &["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("cluster_status prints JSON");
        status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| Some(n.as_str()?.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILLs node `i` (its whole process group), as a crashed machine.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            kill_group(&mut child);
        }
    }

    /// Waits until node `i` accepts TCP connections on its AMQP port, which it opens last.
    #[allow(
        clippy::disallowed_methods,
        reason = "called from start, plain blocking code"
    )]
    fn await_amqp(&self, i: usize) {
        let deadline = Instant::now() + BOOT;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not open port {} within {BOOT:?}: {}",
                self.nodes[i],
                self.ports[i],
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `rabbitmqctl -n node args…` with this cluster's cookie; panics with its output
    /// and the node's log when it fails.
    fn ctl_ok(&self, node: &str, args: &[&str]) -> Output {
        self.cli_ok("rabbitmqctl", node, args)
    }

    /// Runs the CLI tool `tool -n node args…` with this cluster's cookie; panics with its
    /// output and the node's log when it fails.
    fn cli_ok(&self, tool: &str, node: &str, args: &[&str]) -> Output {
        let out = Command::new(PathBuf::from(RABBITMQ_BIN).join(tool))
            .env("HOME", &self.dir)
            .args(["-n", node, "-q"])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "{tool} -n {node} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.nodes
                .iter()
                .position(|n| n == node)
                .map(|i| self.log(i))
                .unwrap_or_default()
        );
        out
    }

    /// The end of node `i`'s console output.
    fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("n{i}")).join("server.log"))
            .unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait();
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for mut child in self.children.iter_mut().filter_map(Option::take) {
            kill_group(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
