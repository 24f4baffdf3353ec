//! Usage by model and provider on a real `tally serve`, on SQLite and on
//! PostgreSQL: the rollups equal the sums of the distinct events exactly,
//! through duplicates and a kill -9; past the org's cap of (model,
//! provider) pairs, usage counts under `other`; the CSV parses and matches
//! the JSON; the CLI prints the same figures; bad requests are 400s.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_ms, rfc3339};

const PAIRS: [(&str, &str); 5] = [
    ("gpt-4o", "openai"),
    ("gpt-4o", "azure"),
    ("claude", "anthropic"),
    ("mistral", "mistral"),
    ("llama", "groq"),
];

/// The events of the test, deterministic: (request id, user, key, model,
/// provider, cost, input tokens, output tokens).
fn events(at: i64) -> Vec<Value> {
    (0..90u64)
        .map(|i| {
            let user = ["alice", "bob", "carol"][(i % 3) as usize];
            let key = match user {
                "alice" if i % 2 == 0 => json!("alice-key"),
                _ => Value::Null,
            };
            // The first three pairs in order of use are gpt-4o/openai,
            // gpt-4o/azure, claude/anthropic; the others come later.
            let (model, provider) = PAIRS[((i * 7 / 3) % 5) as usize];
            json!({
                "request_id": format!("r{i}"), "org_id": "acme", "user_id": user,
                "api_key_id": key, "model": model, "provider": provider,
                "input_tokens": 100 + i, "output_tokens": 10 + i % 7,
                "cost_micros": 1_000 + 37 * i as i64, "occurred_at": rfc3339(at + i as i64),
            })
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    spend: i64,
    requests: i64,
    input: i64,
    output: i64,
}

impl Sums {
    fn of(v: &Value) -> Sums {
        Sums {
            spend: v["spend_micros"].as_i64().unwrap(),
            requests: v["requests"].as_i64().unwrap(),
            input: v["input_tokens"].as_i64().unwrap(),
            output: v["output_tokens"].as_i64().unwrap(),
        }
    }

    fn add(&mut self, e: &Value) {
        self.spend += e["cost_micros"].as_i64().unwrap();
        self.requests += 1;
        self.input += e["input_tokens"].as_i64().unwrap();
        self.output += e["output_tokens"].as_i64().unwrap();
    }
}

/// What the rollups must hold, worked out from the events: by group key.
fn expected(
    events: &[Value],
    cap: usize,
    keep: impl Fn(&Value) -> bool,
    key_of: impl Fn(&Value, &str, &str) -> Option<String>,
) -> BTreeMap<String, Sums> {
    let mut named: Vec<(String, String)> = Vec::new();
    let mut out: BTreeMap<String, Sums> = BTreeMap::new();
    for e in events {
        let pair = (
            e["model"].as_str().unwrap().to_owned(),
            e["provider"].as_str().unwrap().to_owned(),
        );
        if !named.contains(&pair) && named.len() < cap {
            named.push(pair.clone());
        }
        let (m, p) = if named.contains(&pair) {
            (pair.0.as_str(), pair.1.as_str())
        } else {
            ("other", "other")
        };
        if !keep(e) {
            continue;
        }
        if let Some(k) = key_of(e, m, p) {
            out.entry(k).or_default().add(e);
        }
    }
    out
}

async fn report(op: &Client, query: &str) -> Value {
    op.get(&format!("/v1/orgs/acme/usage?{query}"))
        .await
        .expect(200)
}

fn groups(v: &Value) -> BTreeMap<String, Sums> {
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_owned(),
                Sums::of(&g["totals"]),
            )
        })
        .collect()
}

async fn seed(op: &Client) {
    let _ = op.acme_with_alice(None).await;
    for u in ["bob", "carol"] {
        let _ = op.add_active_user("acme", u).await;
    }
    op.add_group("acme", "eng", "Engineering", None, &["alice", "bob"])
        .await;
}

async fn post(op: &Client, events: &[Value]) -> Value {
    op.post("/v1/usage", json!({ "events": events }))
        .await
        .expect(200)
}

/// Every grouping and filter of the report equals the sums of `all` (the
/// distinct events, all on `day`), a cap of 3 pairs applied in their order.
async fn assert_rollups(op: &Client, all: &[Value], day: &str) {
    let range = format!("from={day}&to={day}");
    let by_model = |_: &Value, m: &str, _: &str| Some(m.to_owned());
    let everyone = |_: &Value| true;
    let org = report(op, &format!("{range}&group_by=model")).await;
    let want = expected(all, 3, everyone, by_model);
    assert_eq!(groups(&org), want, "the org by model: {org}");
    assert!(want.contains_key("other"), "past the cap: {want:?}");
    assert_eq!(org["group_count"], want.len());
    let mut whole = Sums::default();
    all.iter().for_each(|e| whole.add(e));
    assert_eq!(Sums::of(&org["totals"]), whole);
    assert_eq!(Sums::of(&org["rest"]), Sums::default());
    assert_eq!(org["series"][0]["period"], day);
    assert_eq!(Sums::of(&org["series"][0]), whole);

    let by_provider = report(op, &format!("{range}&group_by=provider")).await;
    let want = expected(all, 3, everyone, |_, _, p| Some(p.to_owned()));
    assert_eq!(groups(&by_provider), want);

    let alice = report(op, &format!("{range}&user=alice&group_by=model")).await;
    let want = expected(all, 3, |e| e["user_id"] == "alice", by_model);
    assert_eq!(groups(&alice), want, "{alice}");

    // Her detail has the month's breakdown by model too.
    let detail = op
        .get(&format!("/v1/orgs/acme/users/alice?month={}", &day[..7]))
        .await
        .expect(200);
    let models: BTreeMap<String, Sums> = detail["history"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["model"].as_str().unwrap().to_owned(), Sums::of(m)))
        .collect();
    assert_eq!(models, groups(&alice), "{detail}");

    let key = report(op, &format!("{range}&key=alice-key&group_by=model")).await;
    let want = expected(all, 3, |e| e["api_key_id"] == "alice-key", by_model);
    assert_eq!(groups(&key), want);

    let eng = report(op, &format!("{range}&group=eng&group_by=model")).await;
    let want = expected(all, 3, |e| e["user_id"] != "carol", by_model);
    assert_eq!(groups(&eng), want);

    let users = report(op, &format!("{range}&group_by=user&top=2")).await;
    let want = expected(all, 3, everyone, |e, _, _| {
        Some(e["user_id"].as_str().unwrap().to_owned())
    });
    assert_eq!(users["group_count"], 3);
    let listed = groups(&users);
    assert_eq!(listed.len(), 2, "top=2: {users}");
    for (k, s) in &listed {
        assert_eq!(want[k], *s, "{k}");
    }
    let missing: Vec<&String> = want.keys().filter(|k| !listed.contains_key(*k)).collect();
    assert_eq!(Sums::of(&users["rest"]), want[missing[0]], "the rest");
    let first = &users["groups"][0];
    assert!(
        Sums::of(&first["totals"]).spend >= Sums::of(&users["groups"][1]["totals"]).spend,
        "largest spend first"
    );
    assert_eq!(first["name"], first["key"], "a user's name beside the id");

    let gpt_users = report(op, &format!("{range}&model=gpt-4o&group_by=user")).await;
    // The model as counted: a pair past the cap is not gpt-4o's any more.
    let want = expected(all, 3, everyone, |e, m, _| {
        (m == "gpt-4o").then(|| e["user_id"].as_str().unwrap().to_owned())
    });
    assert_eq!(groups(&gpt_users), want);

    // By month: one period, the same totals.
    let month = report(
        op,
        &format!(
            "from={}&to={}&granularity=month&group_by=model",
            &day[..7],
            &day[..7]
        ),
    )
    .await;
    assert_eq!(month["series"].as_array().unwrap().len(), 1);
    assert_eq!(Sums::of(&month["totals"]), whole);
    assert_eq!(groups(&month), groups(&org));
}

async fn rollups_are_exact(backend: Backend) {
    let flags = ["--usage-models-max", "3"];
    let tally = Tally::start_with(&backend, &flags).unwrap();
    let op = tally.operator();
    seed(&op).await;
    let at = now_ms() - 60_000;
    let all = events(at);
    // In batches; some sent twice; a kill -9 between them.
    for chunk in all[..60].chunks(20) {
        assert_eq!(post(&op, chunk).await["accepted"], chunk.len());
    }
    assert_eq!(post(&op, &all[20..40]).await["duplicates"], 20);
    let tally = tally.crash_restart().unwrap();
    let op = tally.operator();
    assert_eq!(post(&op, &all[50..70]).await["duplicates"], 10);
    assert_eq!(post(&op, &all[70..]).await["accepted"], 20);

    let day = &rfc3339(at)[..10];
    assert_rollups(&op, &all, day).await;
    let range = format!("from={day}&to={day}");
    let org = report(&op, &format!("{range}&group_by=model")).await;
    // The CSV: a row per period and group, dollars to the micro-dollar.
    let csv = tally_tests::http_client()
        .get(format!(
            "{}/v1/orgs/acme/usage?{range}&group_by=model",
            tally.url
        ))
        .bearer_auth(tally_tests::OPERATOR_TOKEN)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("period,group,name,spend_usd,requests,input_tokens,output_tokens")
    );
    let mut from_csv: BTreeMap<String, Sums> = BTreeMap::new();
    for l in lines {
        let c: Vec<&str> = l.split(',').collect();
        assert_eq!(c.len(), 7, "{l}");
        assert_eq!(c[0], day);
        let (whole_usd, frac) = c[3].split_once('.').unwrap();
        let s = from_csv.entry(c[1].to_owned()).or_default();
        s.spend += whole_usd.parse::<i64>().unwrap() * 1_000_000 + frac.parse::<i64>().unwrap();
        s.requests += c[4].parse::<i64>().unwrap();
        s.input += c[5].parse::<i64>().unwrap();
        s.output += c[6].parse::<i64>().unwrap();
    }
    assert_eq!(from_csv, groups(&org), "the CSV matches the JSON");

    // The CLI prints the same figures in dollars.
    let out = std::process::Command::new(tally_tests::tally_bin())
        .args(["usage", "--by", "model", "--from", day, "--to", day])
        .env("TALLY_URL", &tally.url)
        .env("TALLY_TOKEN", tally_tests::OPERATOR_TOKEN)
        .env("TALLY_ORG", "acme")
        .output()
        .unwrap();
    let printed = tally_tests::succeeded(&out);
    let other = &groups(&org)["other"];
    assert!(
        printed.lines().any(|l| {
            l.starts_with("other ")
                && l.contains(&tally_core::money::format_usd(other.spend))
                && l.contains(&format!(" {} ", other.requests))
        }),
        "{printed}"
    );
    assert!(
        printed.lines().last().unwrap().starts_with("total "),
        "{printed}"
    );

    // Bad requests say what is wrong.
    for (q, says) in [
        ("group_by=team", "group_by"),
        ("granularity=week", "granularity"),
        ("from=2026-02-30", "from"),
        ("from=2026-12-05&to=2026-12-01", "before"),
        ("from=2024-01-01&to=2026-01-01", "400 days"),
        ("user=alice&key=alice-key", "one of user"),
        ("group_by=user&key=alice-key", "not across"),
        ("top=0", "top"),
        ("user=nobody", "no such user"),
        ("colour=red", "colour"),
    ] {
        let r = op.get(&format!("/v1/orgs/acme/usage?{q}")).await;
        assert!(matches!(r.status, 400 | 404), "{q}: {}", r.body);
        assert!(r.body.to_string().contains(says), "{q}: {}", r.body);
    }
    tally.stop().unwrap();
}

#[tokio::test]
async fn rollups_are_exact_on_sqlite() {
    rollups_are_exact(Backend::sqlite("usage_report")).await;
}

#[tokio::test]
async fn rollups_are_exact_on_postgres() {
    let Some(backend) = Backend::postgres("usage_report").await.unwrap() else {
        return;
    };
    rollups_are_exact(backend).await;
}

/// Distributed: two processes on the real broker and PostgreSQL. The
/// partition's owner counts the first events and is killed (-9); the other
/// takes the partition over from the checkpoint and replays the topic after
/// it, with the rest and repeats sent to it: the rollups are exact, every
/// pair under the name the first owner gave it.
#[tokio::test]
async fn rollups_are_exact_across_a_kill_9_in_distributed_mode() {
    let Some(cluster) = tally_tests::Cluster::new("1", &["--usage-models-max", "3"]).unwrap()
    else {
        return;
    };
    let (owner, other) = cluster.owner_and_other().await.unwrap();
    let op = owner.operator();
    seed(&op).await;
    let at = now_ms() - 60_000;
    let all = events(at);
    assert_eq!(post(&op, &all[..50]).await["accepted"], 50);
    let first: i64 = all[..50]
        .iter()
        .map(|e| e["cost_micros"].as_i64().unwrap())
        .sum();
    wait_for_org_spend(&op, first).await;
    owner.kill9().unwrap();
    let op = other.operator();
    // Published to the topic, repeats too: the owner drops them as it
    // applies them (docs/gateways.md).
    let r = post(&op, &all[40..]).await;
    assert_eq!(r["accepted"], 50, "{r}");
    let total: i64 = all.iter().map(|e| e["cost_micros"].as_i64().unwrap()).sum();
    wait_for_org_spend(&op, total).await;
    assert_rollups(&op, &all, &rfc3339(at)[..10]).await;
}

async fn wait_for_org_spend(op: &Client, want: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = op.get("/v1/orgs/acme").await;
        if r.status == 200 && r.body["spend_micros"] == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the org's spend never reached {want}: {}",
            r.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
