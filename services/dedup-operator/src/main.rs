//! `dedup-operator`: for now, prints the DedupPipeline CustomResourceDefinition.

use clap::{Parser, Subcommand};

/// dedup-operator: runs dedup pipelines on Kubernetes from DedupPipeline resources. This build
/// provides the resource definition; the controller is not part of it yet.
#[derive(Debug, Parser)]
#[command(name = "dedup-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the DedupPipeline CustomResourceDefinition as YAML (`| kubectl apply -f -`).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", dedup_operator::crd::crd_yaml()?),
    }
    Ok(())
}
