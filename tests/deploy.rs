//! The files in `deploy/` against the server they deploy: every metric the
//! Grafana dashboard queries is one the server exports, and the container
//! recipe, the systemd unit and the Kubernetes example name only flags and
//! `CHORUS_*` variables that `chorus serve` has. What cannot run here (a
//! container build needs base images from a registry) is not faked.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `chorus_*` word in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("chorus_") {
        let tail = &rest[start..];
        let len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..len].to_owned());
        rest = &tail[len..];
    }
    names
}

/// The sample names a Prometheus exposition's `# TYPE` lines promise.
fn exported_samples(exposition: &str) -> BTreeSet<String> {
    let mut samples = BTreeSet::new();
    for line in exposition.lines() {
        let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        samples.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    samples
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(&deploy_file("grafana-dashboard.json")).unwrap();
    let mut queried = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
            queries += 1;
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("variables") {
        queried.extend(metric_names(variable["query"].as_str().unwrap_or_default()));
    }
    assert!(queries >= 10 && queried.len() >= 10, "{queried:?}");
    let server = TestServer::start(&[]).await;
    // A labelled family shows once it has a child: one refused token.
    assert_eq!(upgrade_refusal(&server.url("/ws?token=nope"), &[]).await.0, 401);
    let exported = exported_samples(&server.metrics().await);
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "the dashboard queries {missing:?}, which the server does not export ({exported:?})");
}

/// Flags and `CHORUS_*` variables `chorus serve --help` lists.
fn serve_options() -> (BTreeSet<String>, BTreeSet<String>) {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_chorus")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let mut flags = BTreeSet::new();
    let mut vars = BTreeSet::new();
    for word in help.split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == '=' || c == ',') {
        if word.starts_with("--") {
            flags.insert(word.to_owned());
        } else if word.starts_with("CHORUS_") {
            vars.insert(word.to_owned());
        }
    }
    assert!(flags.contains("--listen") && vars.contains("CHORUS_LISTEN"), "{help}");
    (flags, vars)
}

/// The `--flags` of the chorus command lines in a deploy file, and its `CHORUS_*` names.
fn named_options(name: &str) -> (Vec<String>, Vec<String>) {
    let text = deploy_file(name);
    // systemd continues a command line with a trailing backslash.
    let joined = text.replace("\\\n", " ");
    let mut flags = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        let chorus_line = match name {
            "chorus.service" => line.starts_with("ExecStart="),
            "kubernetes.yaml" => line.starts_with("- --"),
            _ => line.starts_with("CMD") || line.starts_with("ENTRYPOINT"),
        };
        if chorus_line {
            let words = line.split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '[' || c == ']');
            flags.extend(words.filter(|w| w.starts_with("--")).map(str::to_owned));
        }
    }
    let vars = env_names(&text, "CHORUS_");
    (flags, vars)
}

fn env_names(text: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(prefix) {
        let tail = &rest[start..];
        let len =
            tail.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        // A bare prefix is prose ("CHORUS_* variables"), not a name.
        if len > prefix.len() {
            found.push(tail[..len].to_owned());
        }
        rest = &tail[len.max(prefix.len())..];
    }
    found
}

#[test]
fn the_deploy_files_name_only_flags_and_variables_that_exist() {
    let (flags, vars) = serve_options();
    let mut checked = 0;
    for name in ["chorus.service", "kubernetes.yaml", "Dockerfile"] {
        let (used_flags, used_vars) = named_options(name);
        for flag in &used_flags {
            assert!(flags.contains(flag), "{name} passes {flag}, which chorus serve does not have");
        }
        for var in &used_vars {
            assert!(vars.contains(var), "{name} sets {var}, which chorus serve does not read");
        }
        checked += used_flags.len() + used_vars.len();
    }
    assert!(checked >= 10, "the check found almost nothing to check ({checked})");
    // The drain flags and the termination grace agree: grace >= preStop + drain + spread + 20 s.
    let k8s = deploy_file("kubernetes.yaml");
    let grace: u64 = k8s
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(grace >= 3 + 5 + 15 + 20, "terminationGracePeriodSeconds {grace} is shorter than the drain");
    assert!(deploy_file("chorus.service").contains("TimeoutStopSec=40"));
}
