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
}
