//! A small W3C WebDriver client for the browser test: starts Debian's `chromedriver` on a free
//! loopback port (killed on drop), opens one headless Chromium session with a fresh profile and
//! drives it over plain HTTP with `reqwest`.
//!
//! Every wait is bounded and ends in a panic that says what was awaited. If the test panics while
//! a [`Browser`] is alive, its drop saves a screenshot, the page source and the chromedriver log
//! to a kept folder under the system temp dir and prints where.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Panics (never skips) when Debian's `chromium` or `chromium-driver` is missing.
pub fn require_chromium() {
    for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install Debian's `{package}` package \
             (`apt-get install -y chromium chromium-driver`; scripts/test-integration.sh does it)"
        );
    }
}

/// A WebDriver error answer, or a transport failure.
#[derive(Debug)]
pub struct WdError {
    /// The WebDriver error code (`no such element`, …) or `transport`.
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

impl std::error::Error for WdError {}

/// A web element of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(pub String);

/// chromedriver plus one Chromium session.
pub struct Browser {
    driver: Child,
    port: u16,
    http: reqwest::Client,
    session: Option<String>,
    profile: tempfile::TempDir,
    /// Where failure artifacts go (a fresh folder is made inside).
    pub artifacts_root: PathBuf,
}

impl Browser {
    /// Starts chromedriver, waits (30 s at most) until it is ready, and opens a headless session.
    pub async fn start() -> Browser {
        require_chromium();
        let profile = tempfile::Builder::new().prefix("payerx-chromium-").tempdir().expect("profile temp dir");
        let port = crate::free_port();
        let log = profile.path().join("chromedriver.log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(90))
            .build()
            .expect("WebDriver HTTP client");
        let mut b = Browser { driver, port, http, session: None, profile, artifacts_root: std::env::temp_dir() };
        b.wait_ready().await;
        b.new_session().await;
        b
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last;
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("chromedriver exited before it was ready ({status}); log: {}", self.driver_log());
            }
            match self.http.get(format!("{}/status", self.base())).timeout(Duration::from_secs(5)).send().await {
                Ok(r) => match r.json::<Value>().await {
                    Ok(v) if v["value"]["ready"] == json!(true) => return,
                    Ok(v) => last = v.to_string(),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer GET /status with ready=true within 30 s (last: {last}); log: {}",
                self.driver_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn new_session(&mut self) {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": 30_000, "script": 30_000, "implicit": 0},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-proxy-server",
                    "--window-size=1024,900",
                    format!("--user-data-dir={}", self.profile.path().join("profile").display()),
                ],
            },
        }}});
        let v = self
            .send(reqwest::Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("cannot open a Chromium session: {e}; log: {}", self.driver_log()));
        let id = v["sessionId"].as_str().unwrap_or_else(|| panic!("no sessionId in {v}")).to_string();
        self.session = Some(id);
    }

    /// The chromedriver log so far (its tail), for panic messages.
    fn driver_log(&self) -> String {
        let text = std::fs::read_to_string(self.profile.path().join("chromedriver.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("\n{}", tail.join("\n"))
    }

    /// One WebDriver command; returns the answer's `value`.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        let transport = |e: reqwest::Error| WdError { error: "transport".into(), message: e.to_string() };
        let mut req = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(transport)?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() || value.get("error").is_some_and(Value::is_string) {
            return Err(WdError {
                error: value["error"].as_str().unwrap_or("unknown error").to_string(),
                message: value["message"].as_str().unwrap_or(&v.to_string()).to_string(),
            });
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session.as_deref().expect("an open session"))
    }

    /// A session command that must succeed.
    async fn cmd(&self, method: reqwest::Method, rest: &str, body: Option<Value>) -> Value {
        let path = self.session_path(rest);
        let what = format!("{method} {path}");
        self.send(method, &path, body).await.unwrap_or_else(|e| panic!("WebDriver {what} failed: {e}"))
    }

    /// Navigates and waits for the page to load (bounded by the session's 30 s page load timeout).
    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    pub async fn current_url(&self) -> String {
        let v = self.cmd(reqwest::Method::GET, "/url", None).await;
        v.as_str().unwrap_or_else(|| panic!("current URL is not a string: {v}")).to_string()
    }

    pub async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn title(&self) -> String {
        self.cmd(reqwest::Method::GET, "/title", None).await.as_str().unwrap_or_default().to_string()
    }

    /// The element matching `css` now, if any.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let path = self.session_path("/element");
        match self.send(reqwest::Method::POST, &path, Some(json!({"using": "css selector", "value": css}))).await {
            Ok(v) => {
                let id = v[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("no element reference in {v}"));
                Some(Element(id.to_string()))
            }
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("WebDriver find {css:?} failed: {e}"),
        }
    }

    /// Waits (at most `timeout`) for an element matching `css`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            if Instant::now() >= deadline {
                let url = self.current_url().await;
                let source = self.source().await;
                panic!("no element {css:?} within {timeout:?} on {url}; page source:\n{source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The element matching `css`, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> Element {
        self.wait_for(css, Duration::from_secs(10)).await
    }

    pub async fn send_keys(&self, e: &Element, text: &str) {
        self.cmd(reqwest::Method::POST, &format!("/element/{}/value", e.0), Some(json!({"text": text}))).await;
    }

    pub async fn clear(&self, e: &Element) {
        self.cmd(reqwest::Method::POST, &format!("/element/{}/clear", e.0), Some(json!({}))).await;
    }

    pub async fn click(&self, e: &Element) {
        self.cmd(reqwest::Method::POST, &format!("/element/{}/click", e.0), Some(json!({}))).await;
    }

    pub async fn text(&self, e: &Element) -> String {
        self.cmd(reqwest::Method::GET, &format!("/element/{}/text", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .into()
    }

    /// A DOM property (e.g. `value` of an input: what the user sees, not the HTML attribute).
    pub async fn property(&self, e: &Element, name: &str) -> Value {
        self.cmd(reqwest::Method::GET, &format!("/element/{}/property/{name}", e.0), None).await
    }

    pub async fn is_selected(&self, e: &Element) -> bool {
        self.cmd(reqwest::Method::GET, &format!("/element/{}/selected", e.0), None).await == json!(true)
    }

    /// Polls the current URL (at most `timeout`) until it starts with `prefix`.
    pub async fn wait_for_url(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let url = self.current_url().await;
            if url.starts_with(prefix) {
                return url;
            }
            if Instant::now() >= deadline {
                let source = self.source().await;
                panic!("the browser did not reach {prefix} within {timeout:?}; it is at {url}; page source:\n{source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page as a PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).expect("base64 screenshot")
    }

    /// Ends the session (Chromium exits) and stops chromedriver.
    pub async fn quit(mut self) {
        if let Some(id) = self.session.take() {
            let _ = self.send(reqwest::Method::DELETE, &format!("/session/{id}"), None).await;
        }
        // Drop kills chromedriver.
    }

    /// Saves a screenshot, the page source and the chromedriver log into a fresh folder under
    /// `artifacts_root`, with blocking I/O (this runs from `drop` while a test panics).
    fn dump_blocking(&self) -> Option<PathBuf> {
        let id = self.session.as_deref()?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis());
        let dir = self.artifacts_root.join(format!(
            "payerx-browser-failure-{}-{}",
            std::process::id(),
            stamp.unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        if let Some(v) = blocking_command(self.port, "GET", &format!("/session/{id}/screenshot")) {
            if let Ok(png) = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()) {
                let _ = std::fs::write(dir.join("screenshot.png"), png);
            }
        }
        if let Some(v) = blocking_command(self.port, "GET", &format!("/session/{id}/source")) {
            let _ = std::fs::write(dir.join("page.html"), v.as_str().unwrap_or_default());
        }
        if let Some(v) = blocking_command(self.port, "GET", &format!("/session/{id}/url")) {
            let _ = std::fs::write(dir.join("url.txt"), v.as_str().unwrap_or_default());
        }
        let _ = std::fs::copy(self.profile.path().join("chromedriver.log"), dir.join("chromedriver.log"));
        Some(dir)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dump_blocking() {
                eprintln!("browser test failed: screenshot, page source and chromedriver log in {}", dir.display());
            }
        }
        if let Some(id) = self.session.take() {
            // Closes Chromium; chromedriver may not take its browser along when killed.
            let _ = blocking_command(self.port, "DELETE", &format!("/session/{id}"));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A WebDriver command with a body-less request over a blocking socket (for `drop`): the
/// answer's `value`, or `None` on any failure. Bounded by 20 s socket timeouts.
fn blocking_command(port: u16, method: &str, path: &str) -> Option<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    // Read until the body is complete (by content-length or the last chunk) or the peer closes:
    // a server that keeps the connection open must not hold `drop` up.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if response_complete(&buf) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if is_chunked(head) { dechunk(body) } else { body.into() };
    let v: Value = serde_json::from_str(&body).ok()?;
    v.get("value").cloned()
}

fn is_chunked(head: &str) -> bool {
    head.to_ascii_lowercase().contains("transfer-encoding: chunked")
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&buf[..end]);
    let body = &buf[end + 4..];
    if is_chunked(&head) {
        return body.ends_with(b"0\r\n\r\n");
    }
    let len = head.lines().find_map(|l| {
        let l = l.to_ascii_lowercase();
        l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok())
    });
    len.is_some_and(|len| body.len() >= len)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A tiny HTTP server on 127.0.0.1 that answers every request with a fixed 200 "done" page and
/// remembers the request targets (path and query): the app's redirect URI in the browser test.
pub struct Callback {
    pub port: u16,
    targets: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Callback {
    pub async fn start() -> Callback {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind callback listener");
        let port = listener.local_addr().expect("callback addr").port();
        let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = targets.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let read_head = async {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(10), read_head).await;
                    let head = String::from_utf8_lossy(&buf);
                    if let Some(target) = head.lines().next().and_then(|l| l.split_whitespace().nth(1)) {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(target.to_string());
                    }
                    let page = "<!DOCTYPE html><html><head><title>done</title></head><body><p id=\"done\">done</p></body></html>";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{page}",
                        page.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Callback { port, targets, task }
    }

    /// Request targets received so far (e.g. `/callback?code=…&state=…`).
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        self.task.abort();
    }
}
