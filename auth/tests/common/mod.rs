//! Test harness: an authorization server on a SQLite database in a temp folder, driven through
//! its router with `oneshot`, plus helpers that act like a SMART app and a member's browser.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use auth::{admin, AuthConfig, AuthServer, ClientKind, MemoryAudit, NewClient};
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use projections::Db;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const BASE: &str = "http://payerx.test";
pub const FHIR_BASE: &str = "http://payerx.test/fhir";
pub const ISSUER: &str = "http://payerx.test/auth";
pub const TOKEN_URL: &str = "http://payerx.test/auth/token";
pub const REDIRECT: &str = "https://app.example/callback";
pub const PASSWORD: &str = "correct horse battery";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: Db,
    pub server: Arc<AuthServer>,
    pub app: Router,
    pub audit: Arc<MemoryAudit>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn location(&self) -> String {
        self.headers.get(header::LOCATION).expect("a Location header").to_str().unwrap().to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
}

pub async fn env() -> Env {
    env_with(|_| {}).await
}

pub async fn env_with(tweak: impl FnOnce(&mut AuthConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("views.sqlite").display());
    let db = Db::connect(&url, 4).await.unwrap();
    env_on(dir, db, tweak).await
}

pub async fn env_on(dir: tempfile::TempDir, db: Db, tweak: impl FnOnce(&mut AuthConfig)) -> Env {
    let mut config = AuthConfig::new(BASE);
    tweak(&mut config);
    let audit = MemoryAudit::new();
    let server = AuthServer::new(db.clone(), config, audit.clone()).await.unwrap();
    let app = server.router();
    Env { dir, db, server, app, audit }
}

impl Env {
    pub async fn send(&self, req: Request<Body>) -> Resp {
        use tower::ServiceExt;
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    pub async fn get(&self, uri: &str, cookie: Option<&str>) -> Resp {
        let mut b = Request::builder().method(Method::GET).uri(uri);
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    /// A form POST; `headers` adds e.g. Authorization or Cookie.
    pub async fn post_form(&self, uri: &str, pairs: &[(&str, &str)], headers: &[(&str, String)]) -> Resp {
        let body = form_encode(pairs);
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        self.send(b.body(Body::from(body)).unwrap()).await
    }

    pub async fn token(&self, pairs: &[(&str, &str)], headers: &[(&str, String)]) -> Resp {
        self.post_form("/auth/token", pairs, headers).await
    }

    pub async fn public_client(&self, scope: &str) -> String {
        admin::add_client(
            &self.db,
            NewClient {
                name: "Member App".into(),
                kind: ClientKind::Public,
                redirect_uris: vec![REDIRECT.into()],
                scope: scope.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .client_id
    }

    /// (client_id, client_secret)
    pub async fn symmetric_client(&self, scope: &str) -> (String, String) {
        let c = admin::add_client(
            &self.db,
            NewClient {
                name: "Confidential App".into(),
                kind: ClientKind::ConfidentialSymmetric,
                redirect_uris: vec![REDIRECT.into()],
                scope: scope.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        (c.client_id, c.client_secret.unwrap())
    }

    pub async fn member(&self, username: &str, patient: &str) {
        admin::add_member(&self.db, username, PASSWORD, patient).await.unwrap();
    }

    /// GET /authorize as a browser would: the login page and the cookie it set.
    pub async fn start(&self, client_id: &str, scope: &str, challenge: &str, state: &str) -> (Resp, String) {
        let uri = authorize_uri(&[
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", state),
            ("aud", FHIR_BASE),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ]);
        let resp = self.get(&uri, None).await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
        let cookie = cookie_of(&resp);
        (resp, cookie)
    }

    pub async fn login(&self, page: &Resp, cookie: &str, username: &str, password: &str) -> Resp {
        let pending = input_value(&page.body, "pending");
        let csrf = input_value(&page.body, "csrf");
        self.post_form(
            "/auth/login",
            &[("pending", &pending), ("csrf", &csrf), ("username", username), ("password", password)],
            &[("cookie", cookie.to_string())],
        )
        .await
    }

    /// Posts the consent form with the given boxes ticked (`None`: all of them).
    pub async fn consent(&self, page: &Resp, cookie: &str, ticked: Option<&[&str]>, decision: &str) -> Resp {
        let pending = input_value(&page.body, "pending");
        let csrf = input_value(&page.body, "csrf");
        let boxes = checkbox_values(&page.body);
        let mut pairs: Vec<(&str, &str)> = vec![("pending", &pending), ("csrf", &csrf), ("decision", decision)];
        for b in &boxes {
            if ticked.is_none_or(|t| t.contains(&b.as_str())) {
                pairs.push(("scope", b));
            }
        }
        self.post_form("/auth/consent", &pairs, &[("cookie", cookie.to_string())]).await
    }

    /// The whole browser part of the launch; returns the code.
    pub async fn authorize(&self, client_id: &str, scope: &str, verifier: &str, username: &str) -> String {
        let state = "st-123";
        let (page, cookie) = self.start(client_id, scope, &challenge(verifier), state).await;
        let consent = self.login(&page, &cookie, username, PASSWORD).await;
        assert_eq!(consent.status, StatusCode::OK);
        assert!(consent.body.contains("id=\"approve\""), "{}", consent.body);
        let done = self.consent(&consent, &cookie, None, "approve").await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
        let q = query_of(&done.location());
        assert_eq!(q["state"], state);
        q["code"].clone()
    }

    /// authorize + exchange for a public client.
    pub async fn tokens(&self, client_id: &str, scope: &str, username: &str) -> Value {
        let verifier = new_verifier();
        let code = self.authorize(client_id, scope, &verifier, username).await;
        let resp = self
            .token(
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", &verifier),
                    ("client_id", client_id),
                ],
                &[],
            )
            .await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
        resp.json()
    }

    /// (kid, PKCS#8 PEM) of the server's current signing key, read from the database.
    pub async fn current_signing_key(&self) -> (String, String) {
        use sqlx::Row;
        let row = sqlx::query("SELECT kid, private_pem FROM auth_signing_keys ORDER BY created_us DESC LIMIT 1")
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        (row.get("kid"), row.get("private_pem"))
    }

    /// A token signed with the server's own current key, with any claims.
    pub async fn forge(&self, claims: &Value, typ: &str) -> String {
        let (kid, pem) = self.current_signing_key().await;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid);
        h.typ = Some(typ.into());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
    }

    pub fn actions(&self) -> Vec<String> {
        self.audit.records().into_iter().map(|r| r.action).collect()
    }
}

pub fn basic(id: &str, secret: &str) -> (&'static str, String) {
    ("authorization", format!("Basic {}", STANDARD.encode(format!("{id}:{secret}"))))
}

pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

pub fn authorize_uri(pairs: &[(&str, &str)]) -> String {
    format!("/auth/authorize?{}", form_encode(pairs))
}

pub fn new_verifier() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The cookie a response set, as a `Cookie` header value.
pub fn cookie_of(resp: &Resp) -> String {
    let set = resp.header("set-cookie").expect("a cookie");
    set.split(';').next().unwrap().to_string()
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

/// The value of the input with `id`.
pub fn input_value(html: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\" value=\"");
    let start = html.find(&marker).unwrap_or_else(|| panic!("no input {id} in {html}")) + marker.len();
    let end = html[start..].find('"').unwrap() + start;
    unescape(&html[start..end])
}

/// The values of the `scope` checkboxes.
pub fn checkbox_values(html: &str) -> Vec<String> {
    html.match_indices("name=\"scope\"")
        .map(|(i, _)| {
            let rest = &html[i..];
            let start = rest.find("value=\"").unwrap() + 7;
            let end = rest[start..].find('"').unwrap() + start;
            unescape(&rest[start..end])
        })
        .collect()
}

pub fn query_of(location: &str) -> HashMap<String, String> {
    let u = url::Url::parse(location).unwrap();
    u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// The claims of a JWT, unverified.
pub fn claims_of(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

pub fn header_of(jwt: &str) -> Value {
    let h = jwt.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

/// A client's asymmetric key: signs assertions, publishes its JWK.
pub struct ClientKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
}

impl ClientKey {
    pub fn es384(kid: &str) -> ClientKey {
        use p384::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p384::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let mut jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!("ES384");
        ClientKey {
            kid: kid.into(),
            alg: Algorithm::ES384,
            encoding: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            jwk,
        }
    }

    pub fn es256(kid: &str) -> ClientKey {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let mut jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = json!(kid);
        ClientKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            jwk,
        }
    }

    /// RSA keys are slow to generate in debug builds: one per test process.
    pub fn rs384(kid: &str) -> ClientKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        static KEY: std::sync::OnceLock<rsa::RsaPrivateKey> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap());
        let der = key.to_pkcs1_der().unwrap();
        let jwk = json!({
            "kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        });
        ClientKey { kid: kid.into(), alg: Algorithm::RS384, encoding: EncodingKey::from_rsa_der(der.as_bytes()), jwk }
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk.clone()]})
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }

    /// A SMART Backend Services client assertion.
    pub fn assertion(&self, client_id: &str) -> String {
        self.sign(&json!({
            "iss": client_id, "sub": client_id, "aud": TOKEN_URL,
            "exp": now() + 240, "jti": uuid::Uuid::new_v4().to_string(),
        }))
    }
}

/// Serves `body` as JSON at `http://127.0.0.1:PORT/jwks` until the test ends; the body can be
/// swapped (a key rotation at the other side).
pub async fn serve_jwks(body: Value) -> (String, Arc<std::sync::Mutex<Value>>) {
    let shared = Arc::new(std::sync::Mutex::new(body));
    let s2 = shared.clone();
    let app = Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let s = s2.clone();
            async move { axum::Json(s.lock().unwrap().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    (format!("http://{addr}/jwks"), shared)
}
