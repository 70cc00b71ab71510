//! `ingest`: telemetry, configuration, then serve until SIGINT/SIGTERM.

use dedup_runtime::{config, shutdown, telemetry};
use ingest::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::parse()?;
    match &config.command {
        Some(ingest::config::Command::Probe) => {
            return dedup_runtime::admin::probe(config.admin_listen_addr).await;
        }
        Some(ingest::config::Command::WriteKey { source }) => {
            let (key, entry) = ingest::new_write_key(source)?;
            println!("{key}");
            eprintln!(
                "Give the key above to the {source} app. Add this entry under `keys:` in the \
                 write key file (it holds only the key's hash):\n{entry}"
            );
            return Ok(());
        }
        None => {}
    }
    let _telemetry = telemetry::init(&config.log, "ingest")?;
    ingest::run(config, shutdown::shutdown_signal()).await
}
