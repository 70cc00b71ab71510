//! `ingest`: telemetry, configuration, then serve until SIGINT/SIGTERM.

use dedup_core::{config, shutdown, telemetry};
use ingest::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::parse()?;
    let _telemetry = telemetry::init(&config.log, "ingest")?;
    ingest::run(config, shutdown::shutdown_signal()).await
}
