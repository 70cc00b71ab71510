//! The README stays true: every setting of both binaries appears in its configuration tables.

use clap::CommandFactory;

fn undocumented(command: clap::Command, readme: &str) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .filter(|env| !readme.contains(&format!("| `{env}` |")))
        .collect()
}

#[test]
fn readme_documents_every_setting_of_both_binaries() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let missing: Vec<String> = undocumented(dedup_worker::Config::command(), &readme)
        .into_iter()
        .chain(undocumented(ingest::Config::command(), &readme))
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from the README's configuration tables: {missing:?}"
    );
}
