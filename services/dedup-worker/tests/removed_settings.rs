//! The worker refuses to start while a variable it no longer reads is set, naming it and what
//! replaced it, instead of silently running without the setting its operator believes holds.

use std::process::Command;

#[test]
fn removed_variables_stop_the_worker_with_what_to_do() {
    for (name, value, says) in [
        ("BLOOM_SLICE", "1d", "no Bloom filter"),
        ("BLOOM_EXPECTED_RATE", "100", "no Bloom filter"),
        (
            "RECENT_KEYS_TTL",
            "1d",
            "DEDUP_WINDOW is the recent keys' TTL",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_dedup-worker"))
            .arg("maintain")
            .env(name, value)
            // Unreachable on purpose: the refusal must come before any connection.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("LOG_FORMAT", "text")
            .output()
            .expect("run dedup-worker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name} is set but no longer read")) && stderr.contains(says),
            "{name}: {stderr}"
        );
        assert!(
            !stderr.contains("connect"),
            "refused before connecting: {stderr}"
        );
    }
}
