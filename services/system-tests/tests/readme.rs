//! The README stays true: every setting of both binaries, as their own `--help` lists it,
//! appears in its configuration tables.

use std::process::Command;

/// Every environment variable `binary --help` names.
fn settings_of(binary: &str) -> Vec<String> {
    let path = test_support::process::built(binary);
    let output = Command::new(&path)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(output.status.success(), "{binary} --help failed");
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    // `[env: NAME=value]`, or `[env: NAME]` where the value is hidden (credentials).
    let settings: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next().map(str::to_owned))
        .collect();
    assert!(
        settings.len() > 10,
        "{binary} --help lists its settings: {help}"
    );
    settings
}

#[test]
fn readme_documents_every_setting_of_both_binaries() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let missing: Vec<String> = ["dedup-worker", "ingest"]
        .into_iter()
        .flat_map(settings_of)
        .filter(|env| !readme.contains(&format!("| `{env}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from the README's configuration tables: {missing:?}"
    );
}
