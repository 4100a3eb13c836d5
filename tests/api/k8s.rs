//! The Kubernetes manifests and the Dockerfile agree with the service: the probes point at
//! paths it serves, on the port it listens on, with timeouts above its own, and the
//! settings they pass are ones its configuration accepts. (`make k8s-check` validates the
//! manifests against the Kubernetes schemas as well.)

use std::path::Path;

use serde::Deserialize;
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
        .filter(|e| e["valueFrom"].is_null())
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
    // Replicas too carry credentials; a cluster without them starts without the key.
    let replicas = &env(container, "DATABASE_REPLICA_URLS").expect("DATABASE_REPLICA_URLS")
        ["valueFrom"]["secretKeyRef"];
    assert!(
        replicas["name"].is_string(),
        "replica URLs come from a Secret"
    );
    assert_eq!(replicas["optional"], true, "replicas are optional");

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
    // And each read replica's, with its pool and the pod's lag monitor on it.
    let per_pod_on_replica = (config.db.replica_pool_size + config.db.max_overflow + 1) as f64;
    assert!(
        (replicas + surge) * per_pod_on_replica < DEFAULT_SERVER_CONNECTIONS,
        "{replicas}+{surge} pods x {per_pod_on_replica} connections on each replica"
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

/// Every document of a multi-document manifest.
fn manifests(name: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(&format!("deploy/kubernetes/{name}")))
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("a {kind} named {name}"))
}

/// `key = value` of an ini text, the first occurrence.
fn ini(text: &str, key: &str) -> String {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| panic!("{key} in pgbouncer.ini"))
}

#[test]
fn the_optional_pgbouncer_pools_in_transaction_mode_within_both_connection_budgets() {
    let docs = manifests("pgbouncer/pgbouncer.yaml");
    let ledger = manifest("deployment.yaml");
    let container = &ledger["spec"]["template"]["spec"]["containers"][0];

    // The settings the pooler needs reach the ledger pods, and the service accepts them.
    let settings = of_kind(&docs, "ConfigMap", "ledger-pooler-settings");
    let env_from = container["envFrom"].as_sequence().expect("envFrom");
    assert!(
        env_from
            .iter()
            .any(|e| e["configMapRef"]["name"] == "ledger-pooler-settings"
                && e["configMapRef"]["optional"] == true),
        "the ledger pods read the pooler settings when they exist, and start without them"
    );
    let config = ledger::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some("postgres://ledger@ledger-pgbouncer:6432/ledger".to_owned()),
        _ => settings["data"][name].as_str().map(str::to_owned),
    })
    .expect("the pooler settings are valid");
    // PgBouncer 1.18 (the image's) refuses `options` and keeps no prepared statements
    // across transactions: both must be off (contract section 12).
    assert!(
        read("deploy/pgbouncer/Dockerfile").contains("'pgbouncer=1.18.*'"),
        "the image's PgBouncer is the one these settings are for"
    );
    assert!(!config.db.startup_options, "DB_STARTUP_OPTIONS=false");
    assert!(!config.db.statement_cache, "DB_STATEMENT_CACHE=false");

    let ini_text = of_kind(&docs, "ConfigMap", "ledger-pgbouncer")["data"]["pgbouncer.ini"]
        .as_str()
        .expect("pgbouncer.ini")
        .to_owned();
    assert_eq!(ini(&ini_text, "pool_mode"), "transaction");

    // Clients: every ledger connection, during a rolling update, may land on one pooler pod.
    let ledger_settings = |name: &str| {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name && e["valueFrom"].is_null())
            .map(|e| text(e, "value"))
    };
    let ledger_config = ledger::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some("postgres://ledger@ledger-pgbouncer:6432/ledger".to_owned()),
        _ => ledger_settings(name),
    })
    .expect("the ledger's settings");
    let ledger_pods =
        number(&ledger, "spec.replicas") + number(&ledger, "spec.strategy.rollingUpdate.maxSurge");
    let clients = ledger_pods * (ledger_config.db.max_connections() + 1) as f64;
    let max_client_conn: f64 = ini(&ini_text, "max_client_conn").parse().unwrap();
    assert!(
        clients <= max_client_conn,
        "{clients} client connections > max_client_conn {max_client_conn}"
    );

    // Server: every pooler pod, during its own rolling update, at its limit.
    let pooler = of_kind(&docs, "Deployment", "ledger-pgbouncer");
    let pooler_pods =
        number(pooler, "spec.replicas") + number(pooler, "spec.strategy.rollingUpdate.maxSurge");
    let per_pooler: f64 = ini(&ini_text, "max_db_connections").parse().unwrap();
    let pool_size: f64 = ini(&ini_text, "default_pool_size").parse().unwrap();
    assert!(
        pool_size <= per_pooler,
        "default_pool_size <= max_db_connections"
    );
    assert!(
        pooler_pods * per_pooler < DEFAULT_SERVER_CONNECTIONS,
        "{pooler_pods} pooler pods x {per_pooler} server connections"
    );

    // The Service reaches the port PgBouncer listens on, and selects only its pods.
    let listen_port: f64 = ini(&ini_text, "listen_port").parse().unwrap();
    let pooler_container = &pooler["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        number(pooler_container, "ports.0.containerPort"),
        listen_port
    );
    let service = of_kind(&docs, "Service", "ledger-pgbouncer");
    assert_eq!(
        text(service, "spec.ports.0.targetPort"),
        text(pooler_container, "ports.0.name")
    );
    let labels = &pooler["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&labels[key], value, "Service selector {key:?}");
    }
    assert_ne!(
        labels["app.kubernetes.io/component"],
        ledger["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
        "the ledger's Service must not select the pooler's pods"
    );
    // The configuration and the user list are where the image's command looks.
    let dockerfile = read("deploy/pgbouncer/Dockerfile");
    let mounts = pooler_container["volumeMounts"].as_sequence().unwrap();
    let config_dir = mounts
        .iter()
        .find(|m| m["name"] == "config")
        .map(|m| text(m, "mountPath"))
        .expect("config mount");
    assert!(dockerfile.contains(&format!("\"{config_dir}/pgbouncer.ini\"")));
    let auth_dir = mounts
        .iter()
        .find(|m| m["name"] == "auth")
        .map(|m| text(m, "mountPath"))
        .expect("auth mount");
    assert_eq!(
        ini(&ini_text, "auth_file"),
        format!("{auth_dir}/userlist.txt")
    );
}
