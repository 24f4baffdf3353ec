//! The README's quick start, run as written against a real `tally serve`:
//! docs that match the code.

use std::path::Path;

use tally_tests::{Backend, OPERATOR_TOKEN, Tally};

fn quickstart() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let block = readme
        .split("<!-- quickstart:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- quickstart:end -->").next())
        .expect("README has a quickstart block");
    block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_quickstart_works_as_written() {
    let tally = Tally::start(&Backend::sqlite("readme")).unwrap();
    let out = std::process::Command::new("bash")
        .args(["-c", &quickstart()])
        .env("TALLY", &tally.url)
        .env("TOKEN", OPERATOR_TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let authorize: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("{\"allowed\""))
        .collect();
    assert_eq!(authorize.len(), 4, "{stdout}");
    assert!(authorize[0].starts_with("{\"allowed\":true"), "{stdout}");
    assert!(
        authorize[1].contains("\"allowed\":false,\"reason\":\"user_monthly_limit\""),
        "{stdout}"
    );
    assert!(authorize[1].contains("monthly limit of $50.00"), "{stdout}");
    assert!(authorize[2].starts_with("{\"allowed\":true"), "{stdout}");
    assert!(
        authorize[2].contains("\"remaining_micros\":49000000"),
        "{stdout}"
    );
    assert!(authorize[3].starts_with("{\"allowed\":true"), "{stdout}");
    assert!(
        authorize[3].contains("\"hold\":{\"request_id\":\"req-3\",\"held_micros\":2000000"),
        "{stdout}"
    );
    assert!(
        authorize[3].contains("\"remaining_micros\":47000000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("{\"accepted\":0,\"duplicates\":1,\"rejected\":[]}"),
        "{stdout}"
    );
    assert!(stdout.contains("\"spend_micros\":51000000"), "{stdout}");
    assert!(!stdout.contains("\"error\""), "{stdout}");
    tally.stop().unwrap();
}
