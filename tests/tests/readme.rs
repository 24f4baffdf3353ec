//! The README's quick start, run as written against a real `tally serve`:
//! docs that match the code.

use std::path::Path;

use tally_tests::{Backend, OPERATOR_TOKEN, Tally};

/// The shell lines of the README's block marked `name`.
fn block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let block = readme
        .split(&format!("<!-- {name}:begin -->"))
        .nth(1)
        .and_then(|rest| rest.split(&format!("<!-- {name}:end -->")).next())
        .unwrap_or_else(|| panic!("README has no {name} block"));
    block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the README's block `name` in bash (`-e` with `errexit`) against
/// `url` as the operator, with `tally` on the PATH; its stdout, once it
/// succeeded.
fn run_block(name: &str, url: &str, errexit: bool) -> String {
    let bin = tally_tests::tally_bin();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let flags: &[&str] = if errexit { &["-e", "-c"] } else { &["-c"] };
    let out = std::process::Command::new("bash")
        .args(flags)
        .arg(block(name))
        .env("TALLY_URL", url)
        .env("TALLY_TOKEN", OPERATOR_TOKEN)
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_quickstart_works_as_written() {
    let tally = Tally::start(&Backend::sqlite("readme")).unwrap();
    let stdout = run_block("quickstart", &tally.url, false);
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

    // Then the CLI block, in the same shell variables, with `tally` on the
    // PATH.
    let stdout = run_block("cli", &tally.url, true);
    let lines: Vec<&str> = stdout.lines().collect();
    // The top three by spend: alice, at $52.50, first.
    assert!(lines[0].starts_with("ID "), "{stdout}");
    assert!(
        lines[1].starts_with("alice ") && lines[1].contains("$52.50"),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 users changed"), "{stdout}");
    assert!(
        stdout.contains("$20.00") && stdout.contains("user_limit_set"),
        "{stdout}"
    );
    tally.stop().unwrap();
}
