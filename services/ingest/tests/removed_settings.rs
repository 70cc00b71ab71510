//! ingest refuses to start while a packing variable it no longer reads is set, naming it and
//! the one setting that replaced both.

use std::process::Command;

#[test]
fn removed_packing_variables_stop_ingest_with_what_to_do() {
    for name in ["EVENTS_PER_MESSAGE", "COALESCE_MAX_EVENTS"] {
        let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
            .env(name, "64")
            // Unreachable on purpose: the refusal must come before any connection.
            .env("RABBITMQ_URL", "amqp://nobody:secret@127.0.0.1:1/%2f")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "text")
            .output()
            .expect("run ingest");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name} is set but no longer read"))
                && stderr.contains("MAX_EVENTS_PER_MESSAGE"),
            "{name}: {stderr}"
        );
    }
}
