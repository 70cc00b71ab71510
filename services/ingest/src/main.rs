//! `ingest`: telemetry, configuration, then serve until SIGINT/SIGTERM.

use dedup_core::{config, shutdown, telemetry};
use ingest::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::parse()?;
    if let Some(ingest::config::Command::Probe) = config.command {
        return dedup_core::admin::probe(config.admin_listen_addr).await;
    }
    let _telemetry = telemetry::init(&config.log, "ingest")?;
    ingest::run(config, shutdown::shutdown_signal()).await
}
