//! deploy/ cannot be started here (no container engine), so it is checked
//! by the tools that do run: every YAML file parses; the compose file and
//! the Kubernetes manifests refer only to things they define; Prometheus
//! configurations pass `promtool check config`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn load(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn keys(y: &Yaml) -> BTreeSet<String> {
    y.as_hash().map_or_else(BTreeSet::new, |h| {
        h.keys()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect()
    })
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            out.push(p);
        }
    }
}

#[test]
fn every_yaml_file_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    assert!(files.len() >= 9, "{files:?}");
    for f in files {
        assert!(!load(&f).is_empty(), "{} is empty", f.display());
    }
}

#[test]
fn the_compose_file_is_consistent() {
    let doc = &load(&deploy().join("docker-compose.yml"))[0];
    let services = &doc["services"];
    let names = keys(services);
    for expected in ["kafka", "postgres", "tally-1", "tally-2", "prometheus"] {
        assert!(names.contains(expected), "service {expected} is missing");
    }
    let volumes = keys(&doc["volumes"]);
    for name in &names {
        let s = &services[name.as_str()];
        assert!(
            !s["image"].is_badvalue() || !s["build"].is_badvalue(),
            "{name} has neither image nor build"
        );
        for dep in keys(&s["depends_on"]) {
            assert!(names.contains(&dep), "{name} depends on unknown {dep}");
        }
        for v in s["volumes"].as_vec().into_iter().flatten() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            if !source.starts_with('.') && !source.starts_with('/') {
                assert!(
                    volumes.contains(source),
                    "{name} mounts undeclared volume {source}"
                );
            } else {
                assert!(
                    deploy().join(source).exists(),
                    "{name} mounts missing {source}"
                );
            }
        }
    }
    for t in ["tally-1", "tally-2"] {
        let env = &services[t]["environment"];
        let brokers = env["TALLY_KAFKA_BROKERS"].as_str().unwrap();
        assert!(
            names.contains(brokers.split(':').next().unwrap()),
            "{t}: {brokers}"
        );
        let db = env["TALLY_DATABASE_URL"].as_str().unwrap();
        assert!(
            db.starts_with("postgres://") && db.contains("@postgres:"),
            "{t}: {db}"
        );
        assert!(
            env["TALLY_OPERATOR_TOKEN"]
                .as_str()
                .unwrap()
                .contains("TALLY_OPERATOR_TOKEN")
        );
    }
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked -p tally"));
    assert_eq!(
        services["tally-1"]["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    // Prometheus scrapes both Tally processes.
    let prom = &load(&deploy().join("prometheus/prometheus.yml"))[0];
    let targets: Vec<&str> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in targets {
        let (host, port) = t.split_once(':').unwrap();
        assert!(names.contains(host), "scrape target {t}");
        // On the port the process serves metrics on without a token.
        let listen = services[host]["environment"]["TALLY_METRICS_LISTEN"]
            .as_str()
            .unwrap_or_else(|| panic!("{host} has no TALLY_METRICS_LISTEN"));
        assert!(listen.ends_with(&format!(":{port}")), "{t}: {listen}");
    }
}

#[test]
fn the_kubernetes_manifests_are_consistent() {
    let dir = deploy().join("kubernetes");
    let kustomization = &load(&dir.join("kustomization.yaml"))[0];
    let mut docs = Vec::new();
    for r in kustomization["resources"].as_vec().unwrap() {
        let f = dir.join(r.as_str().unwrap());
        assert!(f.exists(), "kustomization lists missing {}", f.display());
        docs.extend(load(&f));
    }
    let mut by_kind: HashMap<String, BTreeSet<String>> = HashMap::new();
    for d in &docs {
        for field in ["apiVersion", "kind"] {
            assert!(
                d[field].as_str().is_some(),
                "a manifest lacks {field}: {d:?}"
            );
        }
        let name = d["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let kind = d["kind"].as_str().unwrap();
        if kind != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("tally"),
                "{kind}/{name}"
            );
        }
        let _ = by_kind.entry(kind.to_owned()).or_default().insert(name);
    }
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
    ] {
        assert!(by_kind.contains_key(kind), "no {kind}");
    }
    let workloads: Vec<&Yaml> = docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        .collect();
    for w in &workloads {
        let name = w["metadata"]["name"].as_str().unwrap();
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        for (k, v) in w["spec"]["selector"]["matchLabels"].as_hash().unwrap() {
            assert_eq!(
                &labels[k.as_str().unwrap()],
                v,
                "{name}: selector does not match its pods"
            );
        }
        for c in w["spec"]["template"]["spec"]["containers"]
            .as_vec()
            .unwrap()
        {
            let ports: BTreeSet<&str> = c["ports"]
                .as_vec()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            for probe in ["readinessProbe", "livenessProbe"] {
                let p = &c[probe];
                for port in [&p["httpGet"]["port"], &p["tcpSocket"]["port"]] {
                    if let Some(port) = port.as_str() {
                        assert!(ports.contains(port), "{name}: {probe} port {port}");
                    }
                }
            }
            for env in c["envFrom"].as_vec().into_iter().flatten() {
                if let Some(cm) = env["configMapRef"]["name"].as_str() {
                    assert!(by_kind["ConfigMap"].contains(cm), "{name}: configMap {cm}");
                }
            }
            for env in c["env"].as_vec().into_iter().flatten() {
                if let Some(secret) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    assert!(
                        by_kind["Secret"].contains(secret),
                        "{name}: secret {secret}"
                    );
                    let key = env["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
                    let doc = docs
                        .iter()
                        .find(|d| d["kind"].as_str() == Some("Secret"))
                        .unwrap();
                    assert!(
                        !doc["stringData"][key].is_badvalue(),
                        "{name}: secret key {key}"
                    );
                }
            }
        }
    }
    // Every Service selects pods that exist, on ports they expose.
    for s in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
    {
        let name = s["metadata"]["name"].as_str().unwrap();
        let selector = s["spec"]["selector"].as_hash().unwrap();
        let target = workloads.iter().find(|w| {
            let labels = &w["spec"]["template"]["metadata"]["labels"];
            selector
                .iter()
                .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
        });
        let target = target.unwrap_or_else(|| panic!("service {name} selects no pods"));
        let ports: BTreeSet<&str> = target["spec"]["template"]["spec"]["containers"]
            .as_vec()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_vec().into_iter().flatten())
            .filter_map(|p| p["name"].as_str())
            .collect();
        for p in s["spec"]["ports"].as_vec().unwrap() {
            let t = p["targetPort"].as_str().unwrap();
            assert!(ports.contains(t), "service {name} targets missing port {t}");
        }
    }
    // Tally's environment names options that exist.
    let cm = docs
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("tally-config"))
        .unwrap();
    let help = Command::new(tally_tests::tally_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for key in keys(&cm["data"]) {
        assert!(
            help.contains(&format!("[env: {key}")),
            "tally serve has no option for {key}"
        );
    }
    // Prometheus scrapes the port the processes serve metrics on without a
    // token, through the headless service.
    let listen = cm["data"]["TALLY_METRICS_LISTEN"].as_str().unwrap();
    let port = listen.rsplit(':').next().unwrap().parse::<i64>().unwrap();
    let metrics_service = docs
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("tally-metrics"))
        .unwrap();
    assert_eq!(
        metrics_service["spec"]["ports"][0]["port"].as_i64(),
        Some(port)
    );
    let prometheus = load(&deploy().join("kubernetes/prometheus.yaml"));
    let config = prometheus
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .unwrap();
    let config =
        &YamlLoader::load_from_str(config["data"]["prometheus.yml"].as_str().unwrap()).unwrap()[0];
    let sd = &config["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(sd["port"].as_i64(), Some(port));
    assert!(
        sd["names"][0]
            .as_str()
            .unwrap()
            .starts_with("tally-metrics."),
        "{sd:?}"
    );
}

#[test]
fn prometheus_configurations_pass_promtool() {
    let Some(promtool) = tally_tests::promtool() else {
        return;
    };
    let check = |path: &Path| {
        let out = Command::new(&promtool)
            .args(["check", "config"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    check(&deploy().join("prometheus/prometheus.yml"));
    // The Kubernetes one lives inside a ConfigMap.
    let docs = load(&deploy().join("kubernetes/prometheus.yaml"));
    let cm = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .unwrap();
    let dir = tally_tests::temp_dir("promtool");
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, cm["data"]["prometheus.yml"].as_str().unwrap()).unwrap();
    check(&path);
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = tally_tests::promtool() else {
        return;
    };
    let run = |args: &[&str], path: &Path| {
        let out = Command::new(&promtool)
            .args(args)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = deploy().join("prometheus/rules/tally.rules.yml");
    let _ = run(&["check", "rules"], &rules);
    let _ = run(
        &["test", "rules"],
        &deploy().join("prometheus/tests/tally.rules.test.yml"),
    );
    // Every alert has a runbook line and a test that fires it.
    let doc = &load(&rules)[0];
    let tests =
        std::fs::read_to_string(deploy().join("prometheus/tests/tally.rules.test.yml")).unwrap();
    let mut alerts = 0;
    for group in doc["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            assert!(
                rule["annotations"]["runbook"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{name} has no runbook line"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no promtool test case"
            );
        }
    }
    assert!(alerts >= 15, "{alerts} alerts");
    // The Kubernetes ConfigMap carries the same rules.
    let docs = load(&deploy().join("kubernetes/prometheus.yaml"));
    let cm = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .unwrap();
    assert_eq!(
        cm["data"]["tally.rules.yml"].as_str(),
        Some(std::fs::read_to_string(&rules).unwrap().as_str()),
        "deploy/kubernetes/prometheus.yaml embeds a different copy of the rules"
    );
}

/// Every metric name Tally's code declares (`pub const …: &str = "tally_…"`).
fn declared_metrics() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&deploy().join("../crates"), &mut files);
    let mut names = BTreeSet::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let line = line.trim();
            if line.starts_with("pub const") && line.contains(": &str = \"tally_") {
                let name = line.split('"').nth(1).unwrap();
                let _ = names.insert(name.to_owned());
            }
        }
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `tally_…` names in a text, histogram suffixes taken off.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("tally_") {
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '/')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
            .unwrap_or(&name);
        let _ = out.insert(base.to_owned());
    }
    out
}

#[test]
fn rules_dashboard_and_docs_name_only_real_metrics() {
    let declared = declared_metrics();
    assert!(declared.len() >= 30, "{declared:?}");
    let dashboard =
        std::fs::read_to_string(deploy().join("grafana/dashboards/tally.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert_eq!(parsed["uid"], "tally");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    for (what, text) in [
        (
            "alert rules",
            std::fs::read_to_string(deploy().join("prometheus/rules/tally.rules.yml")).unwrap(),
        ),
        ("dashboard", dashboard.clone()),
        (
            "docs/operations.md",
            std::fs::read_to_string(deploy().join("../docs/operations.md")).unwrap(),
        ),
    ] {
        let used = referenced_metrics(&text);
        assert!(!used.is_empty(), "{what} names no metric");
        let unknown: Vec<&String> = used.iter().filter(|m| !declared.contains(*m)).collect();
        assert!(
            unknown.is_empty(),
            "{what} names metrics Tally does not have: {unknown:?}"
        );
    }
    // The dashboard's panels cover the pipeline and the money.
    let used = referenced_metrics(&dashboard);
    for m in [
        "tally_org_spend_micros",
        "tally_group_spend_micros",
        "tally_org_users_over_threshold",
        "tally_consumer_lag_messages",
        "tally_checkpoint_duration_seconds",
        "tally_webhook_deliveries_total",
    ] {
        assert!(used.contains(m), "the dashboard shows no {m}");
    }
}
