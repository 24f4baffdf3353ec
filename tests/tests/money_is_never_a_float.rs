//! Money is integer micro-USD everywhere. clippy's `float_arithmetic` (denied
//! workspace-wide) stops float maths; this test stops float *types* from
//! creeping into the code, and float columns into the schema. The few floats
//! that are not money (a utilization ratio for display) are listed with why.

use std::path::{Path, PathBuf};

/// (file, why a float type may appear there).
const ALLOWED: &[(&str, &str)] = &[
    (
        "tests/tests/litellm.rs",
        "LiteLLM's response cost header is float dollars (converted to micro-USD as the integration does), and load figures",
    ),
    (
        "crates/core/src/ratio.rs",
        "utilization = spend / limit, a display ratio",
    ),
    (
        "crates/api/src/dto.rs",
        "the utilization field of orgs, users and groups",
    ),
    (
        "crates/engine/src/meter.rs",
        "a partition count for a metrics gauge",
    ),
    (
        "crates/engine/src/gauges.rs",
        "Prometheus gauge values: counts, and micro-USD exact as f64 below 2^53",
    ),
    (
        "crates/api/src/ops.rs",
        "a count of pending webhook deliveries for a metrics gauge",
    ),
    (
        "crates/kafka/src/consumer.rs",
        "consumer lag (a message count) for a metrics gauge",
    ),
    (
        "crates/kafka/src/relay.rs",
        "the relay backlog (an event count) for a metrics gauge",
    ),
    (
        "crates/tally/src/main.rs",
        "histogram bucket bounds, in seconds",
    ),
    (
        "tests/tests/kafka.rs",
        "Prometheus text values (counts) read back in a test",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name()
                .is_some_and(|n| n == "target" || n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn has_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

#[test]
fn no_float_types_outside_the_listed_places() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["crates", "tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    let me = Path::new(file!()).file_name().unwrap();
    let mut offences = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if f.file_name() == Some(me) || ALLOWED.iter().any(|(p, _)| rel == *p) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if has_word(code, "f32") || has_word(code, "f64") {
                offences.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "float types outside the allowed places:\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_schema_has_no_float_columns() {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/store/src/schema.rs");
    let text = std::fs::read_to_string(schema).unwrap().to_uppercase();
    for word in ["REAL", "FLOAT", "DOUBLE", "NUMERIC", "DECIMAL", "MONEY"] {
        assert!(
            !has_word(&text, word),
            "the schema declares a {word} column"
        );
    }
}
