//! A browser's side of the console without a browser: a cookie jar of one
//! cookie, forms posted as a browser posts them, redirects not followed
//! (the tests check where they go).

use reqwest::redirect::Policy;

/// One page or form answer.
#[derive(Debug, Clone)]
pub struct Page {
    pub status: u16,
    /// Where a 303 sends the browser.
    pub location: Option<String>,
    pub set_cookie: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub html: String,
}

impl Page {
    /// The CSRF token the page's forms carry.
    pub fn csrf(&self) -> String {
        let at = self
            .html
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field on the page: {}", self.html));
        let rest = &self.html[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').expect("end of csrf")].to_owned()
    }

    /// The secret a page shows once (`id="new-secret"`).
    pub fn shown_once(&self) -> String {
        let at = self
            .html
            .split("id=\"new-secret\">")
            .nth(1)
            .unwrap_or_else(|| panic!("no secret on the page: {}", self.text()));
        at[..at.find('<').expect("end of the secret")].to_owned()
    }

    /// The page's text between tags, whitespace collapsed: what a reader
    /// sees, for `contains` checks.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in self.html.chars() {
            match c {
                '<' => {
                    in_tag = true;
                    out.push(' ');
                }
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.replace("&amp;", "&")
            .replace("&#38;", "&")
            .replace("&quot;", "\"")
            .replace("&#34;", "\"")
            .replace("&#39;", "'")
            .replace("&#60;", "<")
            .replace("&lt;", "<")
            .replace("&#62;", ">")
            .replace("&gt;", ">")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn expect(self, status: u16) -> Page {
        assert_eq!(self.status, status, "page: {}", self.text());
        self
    }

    /// A 303 to `prefix…`.
    pub fn redirects_to(&self, prefix: &str) {
        assert_eq!(self.status, 303, "page: {}", self.text());
        let to = self.location.as_deref().unwrap_or("");
        assert!(
            to.starts_with(prefix),
            "redirected to {to:?}, not {prefix}…"
        );
    }
}

/// A console user: the session cookie, once signed in.
#[derive(Debug, Clone)]
pub struct Console {
    http: reqwest::Client,
    pub url: String,
    pub cookie: Option<String>,
}

impl Console {
    pub fn new(url: &str) -> Console {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Console {
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .expect("client"),
            url: url.to_owned(),
            cookie: None,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", format!("tally_session={c}")),
            None => req,
        };
        let resp = req.send().await.expect("request");
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Page {
            status: resp.status().as_u16(),
            location: header("location"),
            set_cookie: header("set-cookie"),
            headers: resp.headers().clone(),
            html: resp.text().await.expect("body"),
        }
    }

    pub async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.url)))
            .await
    }

    /// Posts a form as a browser does: urlencoded, with this site's
    /// `Origin`.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.post_from(path, fields, &self.url).await
    }

    /// Posts a form sent by a page of `origin`.
    pub async fn post_from(&self, path: &str, fields: &[(&str, &str)], origin: &str) -> Page {
        let mut body = String::new();
        for (k, v) in fields {
            if !body.is_empty() {
                body.push('&');
            }
            body.push_str(&urlencode(k));
            body.push('=');
            body.push_str(&urlencode(v));
        }
        self.send(
            self.http
                .post(format!("{}{path}", self.url))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("origin", origin)
                .body(body),
        )
        .await
    }

    /// Signs in with `token`; the session cookie is kept.
    pub async fn sign_in(&mut self, token: &str) -> Page {
        let page = self.post("/console/sign-in", &[("token", token)]).await;
        if let Some(c) = &page.set_cookie {
            let value = c
                .split(';')
                .next()
                .and_then(|kv| kv.strip_prefix("tally_session="))
                .expect("a tally_session cookie");
            self.cookie = Some(value.to_owned());
        }
        page
    }
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
