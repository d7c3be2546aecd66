//! The test harness: starts the real payerx assembly in-process (or the real binary, for crash
//! tests) on one of two tiers, and talks to it over HTTP like a client.
//!
//! - **embedded**: embedded log + SQLite in a temp folder. No services.
//! - **kafka_postgres**: Kafka protocol broker at `PAYERX_TEST_KAFKA_BROKERS` and PostgreSQL at
//!   `PAYERX_TEST_DATABASE_URL` (an admin URL; each test gets its own database and topic prefix).
//!   `scripts/test-integration.sh` starts both and runs these tests with `--ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use payerx::{App, BackendArgs, Role, ServeArgs};
use serde_json::Value;

pub use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Embedded,
    KafkaPostgres,
}

pub struct Harness {
    pub tier: Tier,
    pub backend: BackendArgs,
    pub app: Option<App>,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    base: String,
    /// The bearer token `client` sends, if any.
    pub token: Option<String>,
}

/// Runs a scenario on both tiers: `embedded` always, `kafka_postgres` in the integration tier.
/// `both_tiers!(with tweak: a, b)` starts them with `Harness::start_with(tier, tweak)`.
#[macro_export]
macro_rules! both_tiers {
    (with $tweak:ident: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                super::$name($crate::Harness::start_with($crate::Tier::Embedded, super::$tweak).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "integration tier: needs Kafka + PostgreSQL; run scripts/test-integration.sh"]
            async fn kafka_postgres() {
                super::$name($crate::Harness::start_with($crate::Tier::KafkaPostgres, super::$tweak).await).await
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                super::$name($crate::Harness::start($crate::Tier::Embedded).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "integration tier: needs Kafka + PostgreSQL; run scripts/test-integration.sh"]
            async fn kafka_postgres() {
                super::$name($crate::Harness::start($crate::Tier::KafkaPostgres).await).await
            }
        }
    )*};
}

fn env_required(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: the integration tier runs through scripts/test-integration.sh"))
}

/// A fresh backend for one test.
pub async fn backend(tier: Tier, dir: &std::path::Path) -> BackendArgs {
    let mut b = BackendArgs::embedded(dir);
    b.partitions = 3;
    if tier == Tier::KafkaPostgres {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        b.kafka_brokers = Some(env_required("PAYERX_TEST_KAFKA_BROKERS"));
        b.topic_prefix = format!("t{suffix}.");
        b.database_url =
            Some(fresh_database(&env_required("PAYERX_TEST_DATABASE_URL"), &format!("payerx_{suffix}")).await);
    }
    b
}

/// Creates database `name` on the server of `admin_url` and returns its URL.
pub async fn fresh_database(admin_url: &str, name: &str) -> String {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(admin_url).await.expect("connect to PostgreSQL admin URL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.expect("create test database");
    pool.close().await;
    let (head, _) = admin_url.rsplit_once('/').expect("URL with a database path");
    format!("{head}/{name}")
}

impl Harness {
    pub async fn start(tier: Tier) -> Harness {
        Self::start_with(tier, |_| {}).await
    }

    /// Starts with every role, after `tweak` adjusts the configuration.
    /// Starts with every role, after `tweak` adjusts the configuration. The harness's client is
    /// a backend service with `system/*.*` (a payer feed), so scenarios exercise the pipeline;
    /// the SMART tests make their own clients and tokens.
    pub async fn start_with(tier: Tier, tweak: impl FnOnce(&mut ServeArgs)) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = backend(tier, dir.path()).await;
        let mut args = ServeArgs::new(backend.clone());
        tweak(&mut args);
        let app = App::start(args).await.expect("payerx starts");
        let base = app.base_url();
        let mut h = Harness { tier, backend, app: Some(app), client: reqwest::Client::new(), dir, base, token: None };
        if h.app().auth.is_some() {
            let (id, secret) = h.add_client("feed", "confidential-symmetric", "system/*.*", &[]).await;
            let token = h.client_credentials(&id, &secret, "system/*.*").await;
            h.use_token(&token);
        }
        h
    }

    /// Sends `Authorization: Bearer <token>` on every request of `self.client` from now on.
    pub fn use_token(&mut self, token: &str) {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
        self.client = reqwest::Client::builder().default_headers(headers).build().expect("client");
        self.token = Some(token.to_string());
    }

    /// Registers a client (as `payerx clients add` does) and returns its id and secret.
    pub async fn add_client(&self, name: &str, kind: &str, scope: &str, redirect_uris: &[&str]) -> (String, String) {
        let kind: auth::ClientKind = serde_json::from_value(json!(kind)).expect("client kind");
        self.register(auth::NewClient {
            name: name.into(),
            kind,
            redirect_uris: redirect_uris.iter().map(|s| s.to_string()).collect(),
            scope: scope.into(),
            ..Default::default()
        })
        .await
    }

    /// Registers a confidential `system/*.*` backend client acting for `organizations`
    /// (`SYSTEM|VALUE`), as `payerx clients add --organization` does; its id and secret.
    pub async fn add_payer_client(&self, name: &str, organizations: &[&str]) -> (String, String) {
        self.register(auth::NewClient {
            name: name.into(),
            kind: auth::ClientKind::ConfidentialSymmetric,
            scope: "system/*.*".into(),
            organizations: organizations.iter().map(|o| o.parse().expect("SYSTEM|VALUE")).collect(),
            ..Default::default()
        })
        .await
    }

    async fn register(&self, new: auth::NewClient) -> (String, String) {
        let db = self.backend.open_db().await.expect("views db");
        let created = auth::admin::add_client(&db, new).await.expect("client added");
        (created.client_id, created.client_secret.unwrap_or_default())
    }

    /// `client_credentials` with `client_secret_basic`, exactly as the seed pages show.
    pub async fn client_credentials(&self, id: &str, secret: &str, scope: &str) -> String {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let r = reqwest::Client::new()
            .post(self.url("/auth/token"))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&scope={}",
                scope.replace(' ', "%20").replace('/', "%2F").replace('*', "%2A")
            ))
            .send()
            .await
            .expect("token request");
        assert_eq!(r.status(), 200, "token: {}", r.text().await.unwrap_or_default());
        let body: Value = r.json().await.expect("token JSON");
        body["access_token"].as_str().expect("access_token").to_string()
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops and starts again on the same log and views (a clean restart).
    pub async fn restart(&mut self, roles: &[Role]) {
        self.restart_with(roles, |_| {}).await
    }

    /// [`Harness::restart`] with `tweak` applied to the configuration.
    pub async fn restart_with(&mut self, roles: &[Role], tweak: impl FnOnce(&mut ServeArgs)) {
        if let Some(app) = self.app.take() {
            app.stop().await.expect("clean stop");
        }
        let mut args = ServeArgs::new(self.backend.clone());
        tweak(&mut args);
        args.roles = roles.to_vec();
        // Same address as before, like a real deployment: tokens are issued for this base URL.
        if let Some(addr) = self.base.strip_prefix("http://").and_then(|a| a.parse().ok()) {
            args.listen = addr;
        }
        let app = App::start(args).await.expect("payerx restarts");
        if app.addr.is_some() {
            self.base = app.base_url();
        }
        self.app = Some(app);
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await.expect("clean stop");
        }
    }

    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .expect("PUT")
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.get(path).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `check` holds (bounded: the view is eventually consistent for direct producers).
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// Waits until `check` gives a value (bounded like [`Harness::eventually`]) and returns it.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for: {what}");
    }
}

pub async fn json(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

/// The first issue's expression of an OperationOutcome.
pub fn expression(oo: &Value) -> String {
    oo["issue"][0]["expression"][0].as_str().unwrap_or("").to_string()
}

pub fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Ana"]}], "gender": "female", "birthDate": "1980-02-03"})
}

/// The `payerx` binary built next to this test executable (by `cargo test --workspace`).
pub fn payerx_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("payerx");
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--bin", "payerx"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(status.success(), "building payerx failed");
    }
    bin
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Sends raw bytes to the server at `base` (`http://host:port`) and reads the answer without
/// sending anything more: status and body. Used where a client library would insist on
/// sending a body the server has already refused.
/// The `Authorization` header line for raw requests, if the harness has a token.
impl Harness {
    pub fn auth_line(&self) -> String {
        self.token.as_ref().map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default()
    }
}

pub async fn raw_request(base: &str, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before everything is written: that is the point.
    let _ = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(idx) = text.find("\r\n\r\n") {
                        let len = text[..idx].lines().find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        });
                        if len.is_some_and(|len| buf.len() >= idx + 4 + len) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A member's standalone patient launch over HTTP, as a browser would do it (cookie, CSRF
/// fields, consent with every box ticked), then the code exchange. Returns the token response.
pub async fn member_launch(
    h: &Harness,
    client_id: &str,
    redirect: &str,
    scope: &str,
    username: &str,
    password: &str,
) -> Value {
    use base64::Engine;
    use sha2::Digest;
    let verifier = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let mut authorize = url::Url::parse(&h.url("/auth/authorize")).expect("url");
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", scope)
        .append_pair("state", "st-1")
        .append_pair("aud", &h.url("/fhir"))
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let r = browser.get(authorize).send().await.expect("authorize");
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("cookie").to_string();
    let page = r.text().await.expect("login page");
    let form = |html: &str, id: &str| -> String {
        let marker = format!("id=\"{id}\" value=\"");
        let start = html.find(&marker).unwrap_or_else(|| panic!("no input {id}")) + marker.len();
        html[start..start + html[start..].find('"').expect("quote")].replace("&amp;", "&")
    };
    let r = browser
        .post(h.url("/auth/login"))
        .header("cookie", &cookie)
        .form(&[
            ("pending", form(&page, "pending")),
            ("csrf", form(&page, "csrf")),
            ("username", username.into()),
            ("password", password.into()),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let consent = r.text().await.expect("consent page");
    let mut pairs = vec![
        ("pending".to_string(), form(&consent, "pending")),
        ("csrf".to_string(), form(&consent, "csrf")),
        ("decision".to_string(), "approve".to_string()),
    ];
    for (i, _) in consent.match_indices("name=\"scope\"") {
        let rest = &consent[i..];
        let start = rest.find("value=\"").expect("value") + 7;
        pairs.push(("scope".into(), rest[start..start + rest[start..].find('"').expect("quote")].to_string()));
    }
    let r = browser.post(h.url("/auth/consent")).header("cookie", &cookie).form(&pairs).send().await.expect("consent");
    assert_eq!(r.status(), 303);
    let location = url::Url::parse(r.headers()["location"].to_str().expect("location")).expect("redirect");
    let q: std::collections::HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(q.get("state").map(String::as_str), Some("st-1"));
    let r = reqwest::Client::new()
        .post(h.url("/auth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", q["code"].as_str()),
            ("redirect_uri", redirect),
            ("code_verifier", &verifier),
            ("client_id", client_id),
        ])
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200);
    r.json().await.expect("token JSON")
}

pub mod webdriver;

/// A backend client registered with `payerx clients add`, and a token from `/auth/token`: the
/// way an operator sets up a payer feed.
pub async fn feed_client(serve_args: &[String], base: &str, timeout: Duration) -> reqwest::Client {
    let token = feed_token(serve_args, base).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).timeout(timeout).build().unwrap()
}

/// The access token behind [`feed_client`].
pub async fn feed_token(serve_args: &[String], base: &str) -> String {
    // The backend flags of `serve` apply to `clients`; its listener options do not.
    let mut backend: Vec<&String> = Vec::new();
    let mut args = serve_args.iter().skip_while(|a| *a == "serve");
    while let Some(a) = args.next() {
        if a == "--listen" || a == "--admin-listen" {
            args.next();
        } else {
            backend.push(a);
        }
    }
    let out = std::process::Command::new(payerx_binary())
        .args(["clients", "add", "--name", "feed", "--kind", "confidential-symmetric", "--scope", "system/*.*"])
        .args(backend)
        .output()
        .expect("payerx clients add");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let (id, secret) = (created["client_id"].as_str().unwrap(), created["client_secret"].as_str().unwrap());
    let r = reqwest::Client::new()
        .post(format!("{base}/auth/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("scope", "system/*.*")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token: serde_json::Value = r.json().await.unwrap();
    token["access_token"].as_str().unwrap().to_string()
}

/// Starts the real binary with `args`, its stderr appended to `log`.
pub fn spawn(args: &[String], log: &std::path::Path) -> std::process::Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    std::process::Command::new(payerx_binary())
        .args(args)
        .env("PAYERX_LOG", "info,sqlx=warn")
        .stdout(std::process::Stdio::null())
        .stderr(out)
        .spawn()
        .expect("start payerx")
}

/// Waits (bounded) until `/readyz` answers 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("payerx did not become ready:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}
