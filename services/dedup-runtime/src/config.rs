//! Settings every binary reads: the broker, the optional YAML file and the duration syntax.
//!
//! Precedence, highest first: command-line flag, environment variable, YAML file, built-in
//! default. The YAML file is a flat mapping whose keys are either the flag names
//! (`batch-size`) or the environment variable names (`BATCH_SIZE`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, FromArgMatches};

/// Environment variable naming the YAML file.
pub const CONFIG_ENV: &str = "DEDUP_CONFIG";

/// Fails naming the first of `removed` (variable, what replaced it) that is set: a setting a
/// binary silently ignores leaves its operator believing it holds.
pub fn refuse_removed(removed: &[(&str, &str)]) -> anyhow::Result<()> {
    for (name, instead) in removed {
        if std::env::var_os(name).is_some() {
            bail!("{name} is set but no longer read: {instead} Unset it.");
        }
    }
    Ok(())
}

/// The optional YAML file with settings.
#[derive(Debug, Clone, Args)]
pub struct ConfigFileArg {
    /// YAML file with settings (keys are flag or environment variable names). Flags and
    /// environment variables override it.
    #[arg(long = "config", env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses `T` from the process arguments and environment, with defaults from the YAML file.
/// Prints help or a usage error and exits, as clap does, when the arguments are wrong.
pub fn parse<T: CommandFactory + FromArgMatches>() -> anyhow::Result<T> {
    parse_from(std::env::args_os())
}

/// [`parse`] over explicit arguments (the first one is the program name).
pub fn parse_from<T, I>(args: I) -> anyhow::Result<T>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = OsString>,
{
    let args: Vec<OsString> = args.into_iter().collect();
    let mut command = T::command();
    if let Some(path) = config_path(&args) {
        command = apply_yaml_defaults(command, &path)?;
    }
    command = apply_files(command, |name| std::env::var_os(name))?;
    let matches = command
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    T::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))
}

fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn apply_yaml_defaults(mut command: clap::Command, path: &Path) -> anyhow::Result<clap::Command> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the config file {}; fix the path in --config or {CONFIG_ENV}",
            path.display()
        )
    })?;
    let mapping: serde_yaml::Mapping = serde_yaml::from_str(&text).with_context(|| {
        format!(
            "{} is not a YAML mapping of setting names to values",
            path.display()
        )
    })?;
    for (key, value) in mapping {
        let Some(key) = key.as_str() else {
            bail!(
                "{}: every key must be a setting name, found {key:?}",
                path.display()
            );
        };
        let wanted = key.to_ascii_lowercase().replace('_', "-");
        let id = command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(wanted.as_str()) || a.get_env().is_some_and(|e| e == key)
            })
            .map(|a| a.get_id().clone());
        let Some(id) = id else {
            let known: Vec<String> = command
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect();
            bail!(
                "{}: unknown setting {key:?}; known settings: {}",
                path.display(),
                known.join(", ")
            );
        };
        let text = yaml_scalar(&value).with_context(|| {
            format!(
                "{}: setting {key:?} must be a scalar or a list of scalars",
                path.display()
            )
        })?;
        command = command.mut_arg(id, |arg| arg.default_value(text));
    }
    Ok(command)
}

/// Suffix of a variable naming a file that holds a setting's value, as Kubernetes mounts a
/// Secret: `DATABASE_URL_FILE=/run/secrets/db` reads `DATABASE_URL` from that file.
pub const FILE_SUFFIX: &str = "_FILE";

/// Makes every `NAME_FILE` set in the environment (`env` looks variables up) the value of
/// `NAME`, above the YAML file and below the variable itself and flags; setting both `NAME`
/// and `NAME_FILE` is an error. The value is the file's text without its trailing newline,
/// and `--help` never shows it.
fn apply_files(
    mut command: clap::Command,
    env: impl Fn(&str) -> Option<OsString>,
) -> anyhow::Result<clap::Command> {
    let wanted: Vec<(clap::Id, String)> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_id().clone(), a.get_env()?.to_str()?.to_owned())))
        .collect();
    for (id, name) in wanted {
        let file_var = format!("{name}{FILE_SUFFIX}");
        let Some(path) = env(&file_var) else {
            continue;
        };
        if env(&name).is_some() {
            bail!("both {name} and {file_var} are set; set one of them");
        }
        let path = PathBuf::from(path);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{file_var}: cannot read {}; mount the file or unset {file_var}",
                path.display()
            )
        })?;
        let value = text.trim_end_matches(['\n', '\r']).to_owned();
        command = command.mut_arg(id, |arg| arg.default_value(value).hide_default_value(true));
    }
    Ok(command)
}

fn yaml_scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Sequence(items) => {
            let parts: Option<Vec<String>> = items.iter().map(yaml_scalar).collect();
            Some(parts?.join(","))
        }
        _ => None,
    }
}

/// Reads a duration such as `250ms`, `5s`, `1h 30m` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 250ms, 5s, 10m, 7d)"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        #[command(flatten)]
        file: ConfigFileArg,
        /// Items per batch.
        #[arg(long, env = "DEMO_BATCH_SIZE", default_value_t = 10)]
        batch_size: usize,
        #[arg(
            long,
            env = "DEMO_FIELDS",
            value_delimiter = ',',
            default_value = "a,b"
        )]
        fields: Vec<String>,
        #[arg(long, env = "DEMO_WINDOW", value_parser = parse_duration, default_value = "7d")]
        window: Duration,
    }

    fn yaml(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A YAML file supplies defaults under either naming; flags still win.
    #[test]
    fn yaml_file_sets_defaults_and_flags_override_it() {
        let file = yaml("DEMO_BATCH_SIZE: 42\nfields: [x, y]\nwindow: 90s\n");
        let args = |extra: &[&str]| {
            let mut v: Vec<OsString> = vec!["demo".into(), "--config".into(), file.path().into()];
            v.extend(extra.iter().map(OsString::from));
            v
        };
        let demo: Demo = parse_from(args(&[])).unwrap();
        assert_eq!(
            (demo.batch_size, demo.fields.clone()),
            (42, vec!["x".to_owned(), "y".to_owned()])
        );
        assert_eq!(demo.window, Duration::from_secs(90));
        let demo: Demo = parse_from(args(&["--batch-size", "7"])).unwrap();
        assert_eq!(demo.batch_size, 7);
    }

    /// A misspelt setting is an error that lists the real ones, not silently ignored.
    #[test]
    fn unknown_yaml_setting_is_reported_with_the_known_ones() {
        let file = yaml("batch_sise: 3\n");
        let err = parse_from::<Demo, _>(["demo".into(), "--config".into(), file.path().into()])
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("unknown setting \"batch_sise\"") && text.contains("batch-size"),
            "{text}"
        );
    }

    #[test]
    fn missing_yaml_file_says_which_path() {
        let err = parse_from::<Demo, _>(
            ["demo", "--config", "/nonexistent/dedup.yaml"].map(OsString::from),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/dedup.yaml"));
    }

    #[test]
    fn durations_read_human_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").unwrap_err().contains("examples"));
    }

    /// A tiny self-deleting temporary file, enough for these tests.
    mod tempfile_path {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct TempPath(PathBuf);

        impl TempPath {
            pub fn with(text: &str) -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "dedup-config-test-{}-{}.yaml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                Self(path)
            }

            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }

        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Secrets {
        #[arg(
            long,
            env = "TEST_DB_URL",
            default_value = "postgres://localhost/dedup"
        )]
        db_url: String,
        #[arg(long, env = "TEST_TOKEN")]
        token: Option<String>,
    }

    /// `NAME_FILE` supplies `NAME` from a file (newline trimmed, never shown by `--help`); a
    /// flag still wins; both `NAME` and `NAME_FILE` set, or an unreadable file, is an error
    /// that names the variable and the path but not the content.
    #[test]
    fn file_variables_supply_values_from_mounted_files() {
        let dir = std::env::temp_dir().join(format!("dedup-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("db");
        std::fs::write(&secret, "postgres://u:S3CRET@db/dedup\n").unwrap();
        let env = |set: Vec<(&'static str, OsString)>| {
            move |name: &str| set.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        };
        let with_file = env(vec![("TEST_DB_URL_FILE", secret.clone().into())]);
        let command = apply_files(Secrets::command(), &with_file).unwrap();
        let parsed = Secrets::from_arg_matches(&command.clone().get_matches_from(["t"])).unwrap();
        assert_eq!(parsed.db_url, "postgres://u:S3CRET@db/dedup");
        assert_eq!(parsed.token, None);
        let help = command.clone().render_help().to_string();
        assert!(!help.contains("S3CRET"), "{help}");
        let flag = Secrets::from_arg_matches(&command.get_matches_from([
            "t",
            "--db-url",
            "postgres://flag/x",
        ]))
        .unwrap();
        assert_eq!(flag.db_url, "postgres://flag/x");

        let both = env(vec![
            ("TEST_DB_URL_FILE", secret.into()),
            ("TEST_DB_URL", "postgres://env/x".into()),
        ]);
        let error = apply_files(Secrets::command(), &both)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("both TEST_DB_URL and TEST_DB_URL_FILE"),
            "{error}"
        );
        let missing = env(vec![("TEST_TOKEN_FILE", dir.join("absent").into())]);
        let error = format!(
            "{:#}",
            apply_files(Secrets::command(), &missing).unwrap_err()
        );
        assert!(
            error.contains("TEST_TOKEN_FILE") && error.contains("absent"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
