//! A real browser for the console's tests: Debian's `chromium`, headless,
//! driven through `chromedriver` by the W3C WebDriver protocol (plain HTTP
//! and JSON: no client library). scripts/services.sh installs both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// `chromedriver` and `chromium`, or `None` (a skip) when either is missing
/// and the suite does not require services.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let find = |var: &str, names: &[&str]| -> Option<PathBuf> {
        if let Ok(p) = std::env::var(var) {
            return Some(PathBuf::from(p));
        }
        names
            .iter()
            .flat_map(|n| ["/usr/bin", "/usr/local/bin"].map(|d| Path::new(d).join(n)))
            .find(|p| p.exists())
    };
    let driver = find("TALLY_TEST_CHROMEDRIVER", &["chromedriver"]);
    let browser = find("TALLY_TEST_CHROMIUM", &["chromium", "chromium-browser"]);
    match (driver, browser) {
        (Some(d), Some(b)) => Some((d, b)),
        _ => {
            assert!(
                std::env::var_os("TALLY_REQUIRE_SERVICES").is_none(),
                "chromium and chromedriver are required (scripts/services.sh installs them)"
            );
            eprintln!("skipped: chromium or chromedriver is not installed");
            None
        }
    }
}

/// A running chromedriver with one headless browser session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
}

impl Browser {
    pub async fn start(driver: &Path, chromium: &Path) -> anyhow::Result<Browser> {
        let port = crate::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut browser = Browser {
            driver: child,
            http,
            session: String::new(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         "--no-first-run", "--disable-extensions"],
            },
        }}});
        let v = browser
            .call("POST", &format!("{base}/session"), Some(caps))
            .await?;
        let id = v["sessionId"].as_str().context("no session id")?.to_owned();
        browser.session = format!("{base}/session/{id}");
        Ok(browser)
    }

    async fn call(&self, method: &str, url: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if !status.is_success() {
            bail!("WebDriver {url}: {status} {}", v["value"]);
        }
        Ok(v["value"].clone())
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(method, &format!("{}{path}", self.session), body)
            .await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let _ = self.cmd("POST", "/url", Some(json!({"url": url}))).await?;
        Ok(())
    }

    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", "/url", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The first element `css` selects, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .cmd(
                    "POST",
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            match r {
                // A web element is an object of one entry (its W3C key).
                Ok(v) => {
                    let id = v.as_object().and_then(|o| o.values().next());
                    return Ok(id.and_then(Value::as_str).context("element id")?.to_owned());
                }
                Err(e) if Instant::now() > deadline => {
                    bail!("no element {css:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let v = self
            .cmd(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(v.as_array().map_or(0, Vec::len))
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let el = self.find(css).await?;
        let _ = self
            .cmd("POST", &format!("/element/{el}/click"), Some(json!({})))
            .await?;
        Ok(())
    }

    /// Clears a field and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let el = self.find(css).await?;
        let _ = self
            .cmd("POST", &format!("/element/{el}/clear"), Some(json!({})))
            .await?;
        let _ = self
            .cmd(
                "POST",
                &format!("/element/{el}/value"),
                Some(json!({"text": text})),
            )
            .await?;
        Ok(())
    }

    /// Picks the option of `select_css` whose value is `value`.
    pub async fn select(&self, select_css: &str, value: &str) -> anyhow::Result<()> {
        self.click(&format!("{select_css} option[value=\"{value}\"]"))
            .await
    }

    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let el = self.find(css).await?;
        Ok(self
            .cmd("GET", &format!("/element/{el}/text"), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The visible text of the page.
    pub async fn page_text(&self) -> anyhow::Result<String> {
        self.text("body").await
    }

    /// Waits up to 10 s for the page's text to contain `want`.
    pub async fn wait_text(&self, want: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.page_text().await.unwrap_or_default();
            if text.contains(want) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{want:?} never appeared; the page reads: {text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Accepts the page's `confirm()` dialog, waiting up to 10 s for it.
    pub async fn accept_alert(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.cmd("POST", "/alert/accept", Some(json!({}))).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("no dialog to accept: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Runs `script` in the page; its `return` value.
    pub async fn script(&self, script: &str) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let b64 = self.cmd("GET", "/screenshot", None).await?;
        let png = base64_decode(b64.as_str().context("screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    /// Ends the session first: chromedriver then closes chromium and its
    /// renderers, which a kill of chromedriver alone leaves running (they
    /// outlived whole suites). Blocking, as a drop must be: one request
    /// over loopback, at most 10 s.
    fn drop(&mut self) {
        if let Some((addr, path)) = self
            .session
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        {
            let _ = delete_blocking(addr, &format!("/{path}"));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `DELETE path` on `addr` (host:port), waiting for the answer.
fn delete_blocking(addr: &str, path: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let limit = Some(Duration::from_secs(10));
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(limit)?;
    write!(
        stream,
        "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer)?;
    Ok(())
}

fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("not base64: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff)?);
        }
    }
    Ok(out)
}
