//! `dedup-operator`: telemetry, configuration, then run the controller until SIGINT/SIGTERM;
//! or print the CRD.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dedup_operator::controller::{self, Context};
use dedup_operator::leader::{self, LeaderArgs, Term};
use dedup_operator::metrics::Metrics;
use dedup_runtime::admin;
use dedup_runtime::telemetry::{self, LogArgs};
use kube::Client;

/// dedup-operator: runs dedup pipelines on Kubernetes from DedupPipeline resources — applies
/// their workloads and scales the workers from the queue depth (ready plus unacknowledged).
#[derive(Debug, Parser)]
#[command(name = "dedup-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or with a kubeconfig).
    Run(RunArgs),
    /// Print the DedupPipeline CustomResourceDefinition as YAML (`| kubectl apply -f -`).
    Crd,
    /// Print what the operator applies for the DedupPipelines in a YAML file (`-` for stdin):
    /// the ConfigMap, Deployments and Service, and KEDA's objects in `keda` mode.
    Render {
        /// A YAML file of one or more DedupPipelines (other kinds are skipped).
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "0.0.0.0:9102")]
    admin_listen_addr: SocketAddr,
    /// Namespaces to watch (comma-separated); empty: every namespace. With a list the
    /// operator needs only a Role in each (charts/dedup: operator.watchNamespaces).
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    #[command(flatten)]
    leader: LeaderArgs,
    #[command(flatten)]
    tls: dedup_runtime::tls::TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", dedup_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::Render { file } => render(&file),
    }
}

fn render(file: &std::path::Path) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut out = String::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("{} is not YAML", file.display()))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("DedupPipeline") {
            continue;
        }
        let mut pipeline: dedup_operator::crd::DedupPipeline = serde_yaml::from_value(value)
            .with_context(|| format!("{}: not a valid DedupPipeline", file.display()))?;
        if pipeline.metadata.namespace.is_none() {
            pipeline.metadata.namespace = Some("default".to_owned());
        }
        let refused = dedup_operator::resources::refused_settings(&pipeline);
        anyhow::ensure!(refused.is_empty(), "{}", refused.join("; "));
        for object in dedup_operator::resources::all(&pipeline)? {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object)?);
        }
    }
    print!("{out}");
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(&args.log, "dedup-operator")?;
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API: run in a cluster or set KUBECONFIG")?;
    let metrics = Metrics::new();
    let ctx = Arc::new(Context::new(
        client.clone(),
        controller::broker_depth(args.tls.clone()),
        chrono::Utc::now,
        metrics.clone(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let admin_listener = admin::bind(args.admin_listen_addr, "ADMIN_LISTEN_ADDR").await?;
    // Ready once the DedupPipeline API answered (CRD installed, RBAC in place).
    let watching = Arc::new(AtomicBool::new(false));
    let ready: admin::Readiness = {
        let watching = watching.clone();
        Arc::new(move || {
            if watching.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("cannot list DedupPipelines yet".to_owned())
            }
        })
    };
    let admin_task = admin::spawn(
        admin_listener,
        admin::router(metrics.registry.clone(), ready),
        stop.clone(),
    );
    let scopes = dedup_operator::scope::watched(&client, &args.watch_namespaces);
    for scope in &scopes {
        let within = scope.namespace.as_deref().unwrap_or("any namespace");
        scope.pipelines.list(&Default::default()).await.with_context(|| {
            format!(
                "cannot list DedupPipelines in {within}: install the CRD (`dedup-operator crd | \
                 kubectl apply -f -`) and the RBAC in k8s/rbac.yaml (a Role in each of \
                 WATCH_NAMESPACES, or the ClusterRole)"
            )
        })?;
    }
    watching.store(true, Ordering::Relaxed);
    let namespaces: Vec<&str> = scopes
        .iter()
        .filter_map(|s| s.namespace.as_deref())
        .collect();
    tracing::info!(
        ?namespaces,
        "Watching DedupPipelines (no namespaces listed: all of them)."
    );
    // One signal ends both the wait for the Lease and the controllers.
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            dedup_runtime::shutdown::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let controllers = scopes
        .into_iter()
        .map(|scope| scope.run(ctx.clone(), shutdown.clone()));
    let work = futures::future::join_all(controllers);
    let term = if args.leader.leader_election {
        leader::lead(
            client,
            &args.leader,
            &metrics.leader,
            shutdown.clone(),
            async {
                work.await;
            },
        )
        .await?
    } else {
        metrics.leader.set(1);
        work.await;
        Term::Finished
    };
    stop.cancel();
    let _ = admin_task.await;
    match term {
        Term::Lost => anyhow::bail!(
            "another replica took the Lease {:?}: exiting so that only one operator scales the \
             workers (Kubernetes restarts this one as a standby)",
            args.leader.lease_name
        ),
        Term::NotRenewed => anyhow::bail!(
            "could not renew the Lease {:?} within LEASE_DURATION less half LEASE_RENEW_MARGIN: \
             exiting before it expires, so that a standby can take over (Kubernetes restarts \
             this one as a standby); check this pod's access to the API server",
            args.leader.lease_name
        ),
        Term::Finished | Term::Stopped => {}
    }
    tracing::info!("dedup-operator stopped.");
    Ok(())
}
