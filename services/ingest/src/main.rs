//! `ingest`: telemetry, configuration, then serve until SIGINT/SIGTERM.

use dedup_runtime::{config, shutdown, telemetry};
use ingest::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::parse()?;
    if let Some(ingest::config::Command::Probe) = config.command {
        return dedup_runtime::admin::probe(config.admin_listen_addr).await;
    }
    let _telemetry = telemetry::init(&config.log, "ingest")?;
    ingest::run(config, shutdown::shutdown_signal()).await
}
