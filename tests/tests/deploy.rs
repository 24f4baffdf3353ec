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
        assert!(
            names.contains(t.split(':').next().unwrap()),
            "scrape target {t}"
        );
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
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("promtool"));
    }
    assert!(
        std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
        "promtool is missing: run scripts/test.sh"
    );
    eprintln!("skipped: no promtool (scripts/test.sh installs it)");
    None
}

#[test]
fn prometheus_configurations_pass_promtool() {
    let Some(promtool) = promtool() else { return };
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
