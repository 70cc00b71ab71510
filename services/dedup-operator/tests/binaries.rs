//! What the operator writes into a pipeline's pods is what the binaries read: every variable
//! it sets is one the receiving binary declares, every value it writes parses there, the
//! ports and probe paths are the binaries' own defaults, and the CRD's defaults are the
//! binaries' defaults. Checked against each binary's own `Config::command()`, so renaming a
//! setting in a binary without the operator fails here.

use std::collections::BTreeMap;

use clap::CommandFactory;
use dedup_operator::crd::{DedupPipeline, DedupPipelineSpec};
use dedup_operator::resources::{self, INGEST_ADMIN_PORT, INGEST_PORT, WORKER_ADMIN_PORT};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;

fn pipeline() -> DedupPipeline {
    let spec: DedupPipelineSpec = serde_yaml::from_str(
        "secrets:\n  rabbitmqUrl: {name: s, key: amqp}\n  rabbitmqManagementUrl: {name: s, key: mgmt}\n  redisUrl: {name: s, key: redis}\n  databaseUrl: {name: s, key: db}\nobservability:\n  otlpEndpoint: http://collector:4318\n",
    )
    .expect("spec");
    let mut p = DedupPipeline::new("events", spec);
    p.metadata.namespace = Some("prod".into());
    p
}

fn container(deployment: &Deployment) -> Container {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].clone())
        .expect("one container")
}

/// Every environment variable `command` reads, with its long flag.
fn declared(command: &clap::Command) -> BTreeMap<String, String> {
    command
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            Some((env, a.get_long()?.to_owned()))
        })
        .collect()
}

/// Parses `values` as `command` would read them from the environment (through the flags the
/// variables belong to), so a value the binary would refuse fails here.
fn parses(command: clap::Command, values: &[(&String, &String)]) {
    let flags = declared(&command);
    let mut args = vec![command.get_name().to_owned()];
    for (name, value) in values {
        args.push(format!("--{}={value}", flags[*name]));
    }
    if let Err(e) = command.try_get_matches_from(&args) {
        panic!("{args:?}: {e}");
    }
}

fn default_of(command: &clap::Command, env: &str) -> Vec<String> {
    command
        .get_arguments()
        .find(|a| a.get_env().is_some_and(|e| e == env))
        .unwrap_or_else(|| panic!("{env} is not declared"))
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect()
}

fn port_of(command: &clap::Command, env: &str) -> i32 {
    let addr: std::net::SocketAddr = default_of(command, env)[0].parse().expect("address");
    i32::from(addr.port())
}

#[test]
fn every_variable_the_operator_sets_is_one_its_binary_reads_and_parses() {
    let p = pipeline();
    let shared: BTreeMap<String, String> = resources::config_map(&p).data.expect("data");
    let ingest = ingest::Config::command();
    let worker = dedup_worker::Config::command();
    let (ingest_vars, worker_vars) = (declared(&ingest), declared(&worker));

    // The shared ConfigMap: each variable read by at least one binary; each value parses in
    // every binary that reads it.
    let sdk = dedup_runtime::telemetry::SDK_VARIABLES;
    for name in shared.keys() {
        assert!(
            ingest_vars.contains_key(name)
                || worker_vars.contains_key(name)
                || sdk.contains(&name.as_str()),
            "the ConfigMap sets {name}, which neither binary reads"
        );
    }
    for (command, vars) in [(&ingest, &ingest_vars), (&worker, &worker_vars)] {
        let values: Vec<(&String, &String)> = shared
            .iter()
            .filter(|(k, _)| vars.contains_key(*k))
            .collect();
        parses(command.clone(), &values);
    }

    // Each container's own variables are read by its binary.
    for (deployment, command, vars) in [
        (resources::ingest_deployment(&p, "x"), &ingest, &ingest_vars),
        (
            resources::worker_deployment(&p, "x", Some(1)),
            &worker,
            &worker_vars,
        ),
    ] {
        let c = container(&deployment);
        for var in c.env.unwrap_or_default() {
            assert!(
                vars.contains_key(&var.name),
                "{} gets {}, which it does not read",
                command.get_name(),
                var.name
            );
        }
        let binary = c.command.expect("command")[0].clone();
        assert!(
            binary.ends_with(&format!("/{}", command.get_name())),
            "{binary} runs a binary other than {}",
            command.get_name()
        );
    }
}

#[test]
fn ports_probes_and_defaults_are_the_binaries_own() {
    let ingest = ingest::Config::command();
    let worker = dedup_worker::Config::command();
    assert_eq!(port_of(&ingest, "LISTEN_ADDR"), INGEST_PORT);
    assert_eq!(port_of(&ingest, "ADMIN_LISTEN_ADDR"), INGEST_ADMIN_PORT);
    assert_eq!(port_of(&worker, "ADMIN_LISTEN_ADDR"), WORKER_ADMIN_PORT);

    let p = pipeline();
    for (deployment, admin) in [
        (resources::ingest_deployment(&p, "x"), INGEST_ADMIN_PORT),
        (
            resources::worker_deployment(&p, "x", Some(1)),
            WORKER_ADMIN_PORT,
        ),
    ] {
        let c = container(&deployment);
        for (probe, path) in [
            (c.liveness_probe.expect("liveness"), "/healthz"),
            (c.readiness_probe.expect("readiness"), "/readyz"),
        ] {
            let get = probe.http_get.expect("HTTP probe");
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(admin)
            );
        }
    }

    // The CRD's defaults are the worker's.
    let spec = &p.spec;
    assert_eq!(
        spec.dedup.key_fields,
        default_of(&worker, "DEDUP_KEY_FIELDS"),
        "default key fields"
    );
    assert_eq!(
        default_of(&worker, "DEDUP_WINDOW"),
        [spec.dedup.window.as_str()],
        "default window"
    );
    assert_eq!(
        default_of(&worker, "AMQP_QUEUE"),
        [spec.dedup.queue.as_str()],
        "default queue"
    );
    for binary in [&worker, &ingest] {
        assert_eq!(
            default_of(binary, "AMQP_QUEUE_SHARDS"),
            [spec.dedup.queue_shards.to_string()],
            "default queue shards"
        );
        assert_eq!(
            spec.dedup.key_fields,
            default_of(binary, "DEDUP_KEY_FIELDS"),
            "default key fields"
        );
    }

    // The worker's shutdown grace ends before Kubernetes kills the pod.
    let config = resources::config_map(&p).data.expect("data");
    let grace = humantime::parse_duration(&config["SHUTDOWN_GRACE"]).expect("duration");
    let deployment = resources::worker_deployment(&p, "x", Some(1));
    let kill_after = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.termination_grace_period_seconds)
        .expect("termination grace");
    assert!(grace.as_secs() < u64::try_from(kill_after).expect("positive"));
}
