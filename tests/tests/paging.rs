//! Paging through users sorted by spend while spend moves: every user of the
//! first page's listing shows up exactly once, in the first page's order,
//! with current figures; a cursor whose snapshot is gone (here: the process
//! restarted) still pages on, by keyset.

use serde_json::{Value, json};
use tally_tests::{Backend, Client, Tally, now_rfc3339};

const USERS: usize = 30;
const PAGE: usize = 7;

fn id(i: usize) -> String {
    format!("u{i:02}")
}

async fn spend(op: &Client, req: &str, user: &str, cost: i64) {
    let ev = json!({
        "request_id": req, "org_id": "acme", "user_id": user, "model": "m",
        "provider": "p", "input_tokens": 1, "output_tokens": 1,
        "cost_micros": cost, "occurred_at": now_rfc3339(),
    });
    let r = op
        .post("/v1/usage", json!({ "events": [ev] }))
        .await
        .expect(200);
    assert_eq!(r["accepted"], 1, "{r}");
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect()
}

fn cursor(page: &Value) -> Option<String> {
    page["next_cursor"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn pages_sorted_by_spend_hold_still_while_spend_moves() {
    let backend = Backend::sqlite("paging");
    let tally = Tally::start(&backend).unwrap();
    let op = tally.operator();
    let _ = op
        .post("/v1/orgs", json!({"id": "acme", "name": "Acme"}))
        .await
        .expect(201);
    for i in 0..USERS {
        let u = id(i);
        let _ = op.add_active_user("acme", &u).await;
        // u29 spends most: the listing by -spend is u29, u28, …, u00.
        spend(&op, &format!("first-{i}"), &u, (i as i64 + 1) * 1_000).await;
    }
    let order: Vec<String> = (0..USERS).rev().map(id).collect();
    let list = format!("/v1/orgs/acme/users?sort=-spend&limit={PAGE}");

    let first = op.get(&list).await.expect(200);
    assert_eq!(ids(&first), order[..PAGE]);
    // Between pages: the two smallest spenders overtake everyone, a newcomer
    // spends, and one user of a later page is removed.
    spend(&op, "jump-u00", "u00", 1_000_000).await;
    spend(&op, "jump-u10", "u10", 900_000).await;
    let _ = op
        .post(
            "/v1/orgs/acme/users",
            json!({"id": "new", "email": "new@a.test", "name": "new", "status": "active"}),
        )
        .await
        .expect(201);
    spend(&op, "new", "new", 500_000).await;
    let _ = op.delete("/v1/orgs/acme/users/u05").await.expect(200);

    let mut seen = ids(&first);
    let mut next = cursor(&first);
    let mut pages = 1;
    while let Some(c) = next {
        let page = op.get(&format!("{list}&cursor={c}")).await.expect(200);
        for u in page["items"].as_array().unwrap() {
            if u["id"] == "u00" {
                assert_eq!(u["spend_micros"], 1_001_000, "figures are current: {u}");
            }
        }
        seen.extend(ids(&page));
        next = cursor(&page);
        pages += 1;
        assert!(pages <= USERS, "paging does not end");
    }
    let expected: Vec<String> = order.iter().filter(|u| *u != "u05").cloned().collect();
    assert_eq!(seen, expected, "each user once, in the first page's order");

    // A fresh listing has the new order.
    let fresh = op.get(&list).await.expect(200);
    assert_eq!(ids(&fresh)[..3], ["u00", "u10", "new"]);

    // Snapshots live in the process: after a restart the cursor pages on
    // from its last row by keyset.
    let c = cursor(&fresh).unwrap();
    let tally = tally.restart().unwrap();
    let op = tally.operator();
    let page = op.get(&format!("{list}&cursor={c}")).await.expect(200);
    let whole = op
        .get("/v1/orgs/acme/users?sort=-spend&limit=100")
        .await
        .expect(200);
    assert_eq!(ids(&page), ids(&whole)[PAGE..2 * PAGE]);
    assert!(cursor(&page).is_some());

    // A snapshot reaches 100 pages deep; a longer listing goes on by keyset
    // after its last row, without a gap or a repeat at the seam.
    for i in USERS..120 {
        let u = id(i);
        let _ = op.add_active_user("acme", &u).await;
    }
    let whole = op
        .get("/v1/orgs/acme/users?sort=spend&limit=1000")
        .await
        .expect(200);
    let (mut seen, mut next) = (Vec::new(), None::<String>);
    loop {
        let path = match &next {
            Some(c) => format!("/v1/orgs/acme/users?sort=spend&limit=1&cursor={c}"),
            None => "/v1/orgs/acme/users?sort=spend&limit=1".to_owned(),
        };
        let page = op.get(&path).await.expect(200);
        seen.extend(ids(&page));
        next = cursor(&page);
        if next.is_none() {
            break;
        }
        assert!(seen.len() <= 200, "paging does not end");
    }
    assert_eq!(seen.len(), 120, "u05 went, new came, 90 joined");
    assert_eq!(seen, ids(&whole));
}
