//! `dedup-worker`: telemetry, configuration, then migrate or consume until SIGINT/SIGTERM.

use dedup_runtime::{config, shutdown, telemetry};
use dedup_worker::Config;
use dedup_worker::config::Command;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::parse()?;
    let _telemetry = telemetry::init(&config.log, "dedup-worker")?;
    config.check()?;
    match config.command {
        Some(Command::Migrate) => dedup_worker::migrate(&config).await,
        Some(Command::Maintain) => dedup_worker::maintain(config).await,
        Some(Command::Probe) => dedup_runtime::admin::probe(config.admin_listen_addr).await,
        None => dedup_worker::run(config, shutdown::shutdown_signal()).await,
    }
}
