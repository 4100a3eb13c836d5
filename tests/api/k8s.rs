//! The Kubernetes manifests and the Dockerfile agree with the service: the probes point at
//! paths it serves, on the port it listens on, with timeouts above its own, and the
//! settings they pass are ones its configuration accepts. (`make k8s-check` validates the
//! manifests against the Kubernetes schemas as well.)

use std::path::Path;

use serde_yaml::Value;

use crate::support::spawn_app;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn manifest(name: &str) -> Value {
    serde_yaml::from_str(&read(&format!("deploy/kubernetes/{name}"))).expect("valid YAML")
}

fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(value, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn text(value: &Value, path: &str) -> String {
    match at(value, path) {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("{path}: expected a scalar, got {other:?}"),
    }
}

fn number(value: &Value, path: &str) -> f64 {
    text(value, path)
        .parse()
        .unwrap_or_else(|_| panic!("{path} is not a number"))
}

/// The `value` of the container's environment variable `name`.
fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()
        .expect("env list")
        .iter()
        .find(|e| e["name"] == name)
}

/// PostgreSQL's default `max_connections` minus its default reserved slots
/// (`superuser_reserved_connections`).
const DEFAULT_SERVER_CONNECTIONS: f64 = 100.0 - 3.0;

#[tokio::test]
async fn the_manifests_probe_the_paths_and_port_the_service_serves() {
    let deployment = manifest("deployment.yaml");
    let pod = at(&deployment, "spec.template");
    let containers = pod["spec"]["containers"].as_sequence().expect("containers");
    let container = containers
        .iter()
        .find(|c| c["name"] == "ledger")
        .expect("a container named ledger");

    // The settings the manifest passes are accepted by the service's own configuration.
    let settings: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|e| e["name"] != "DATABASE_URL")
        .map(|e| (text(e, "name"), text(e, "value")))
        .collect();
    let config = ledger::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some("postgres://ledger@db.example/ledger".to_owned()),
        _ => settings
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
    })
    .expect("the manifest's settings are valid");
    assert_eq!(
        config.host.to_string(),
        "0.0.0.0",
        "HOST must listen on all interfaces"
    );
    let database_url = env(container, "DATABASE_URL").expect("DATABASE_URL");
    assert!(
        database_url["valueFrom"]["secretKeyRef"]["name"].is_string(),
        "DATABASE_URL comes from a Secret"
    );

    // One port, named http, the one the service listens on.
    let ports = container["ports"].as_sequence().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["name"], "http");
    assert_eq!(number(&ports[0], "containerPort"), f64::from(config.port));

    // Probes: the right paths, on that port, with timeouts above the service's own.
    let health_timeout = config.db.health_timeout.as_secs_f64();
    let mut probed = Vec::new();
    for (probe, allowed) in [
        ("startupProbe", ["/health/live", "/livez"]),
        ("livenessProbe", ["/health/live", "/livez"]),
        ("readinessProbe", ["/health/ready", "/readyz"]),
    ] {
        let probe_spec = &container[probe];
        let path = text(probe_spec, "httpGet.path");
        assert!(allowed.contains(&path.as_str()), "{probe} probes {path}");
        let port = text(probe_spec, "httpGet.port");
        assert!(
            port == "http" || port == config.port.to_string(),
            "{probe} probes port {port}"
        );
        assert!(
            number(probe_spec, "timeoutSeconds") > health_timeout,
            "{probe}: timeoutSeconds must exceed DB_HEALTH_TIMEOUT ({health_timeout} s)"
        );
        probed.push(path);
    }

    // Kubernetes waits longer than the drain and the in-flight wait together.
    let grace = number(pod, "spec.terminationGracePeriodSeconds");
    let shutdown = config.shutdown_drain.as_secs_f64() + config.shutdown_timeout.as_secs_f64();
    assert!(
        grace > shutdown,
        "grace {grace} s <= drain + timeout {shutdown} s"
    );
    assert!(
        container["lifecycle"]["preStop"].is_null(),
        "the service drains itself"
    );
    for resource in ["requests", "limits"] {
        for kind in ["cpu", "memory"] {
            assert!(
                container["resources"][resource][kind].is_string(),
                "resources.{resource}.{kind}"
            );
        }
    }

    // The connection budget fits a default PostgreSQL, even during a rolling update.
    let replicas = number(&deployment, "spec.replicas");
    let surge = number(&deployment, "spec.strategy.rollingUpdate.maxSurge");
    let per_pod = (config.db.max_connections() + 1) as f64;
    assert!(
        (replicas + surge) * per_pod < DEFAULT_SERVER_CONNECTIONS,
        "{replicas}+{surge} pods x {per_pod} connections"
    );

    // The Service and the PodDisruptionBudget select these pods, on the named port.
    let labels = &pod["metadata"]["labels"];
    let service = manifest("service.yaml");
    for (key, value) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&labels[key], value, "Service selector {key:?}");
    }
    assert_eq!(text(&service, "spec.ports.0.targetPort"), "http");
    let pdb = manifest("poddisruptionbudget.yaml");
    for (key, value) in pdb["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(&labels[key], value, "PodDisruptionBudget selector {key:?}");
    }

    // The image listens where the manifest expects and does not run as root.
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .expect("a multi-stage Dockerfile")
        .1;
    assert!(
        runtime.contains(&format!("EXPOSE {}", config.port)),
        "EXPOSE {}",
        config.port
    );
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user}"
    );
    assert_eq!(
        number(pod, "spec.securityContext.runAsUser").to_string(),
        user.split(':').next().unwrap()
    );

    // And the service really answers on those paths (the database is up here).
    let app = spawn_app().await;
    let annotations = pod["metadata"]["annotations"].as_mapping().unwrap();
    let metrics_path = annotations
        .get("prometheus.io/path")
        .and_then(Value::as_str)
        .expect("prometheus.io/path");
    for path in probed.iter().map(String::as_str).chain([metrics_path]) {
        let answer = app.get(path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text);
    }
    assert_eq!(
        annotations
            .get("prometheus.io/port")
            .and_then(Value::as_str),
        Some(config.port.to_string().as_str())
    );
}
