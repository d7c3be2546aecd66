//! A standalone authorization server to try the launch in a browser:
//!
//! ```sh
//! cargo run -p auth --example demo -- 8090
//! ```
//!
//! It registers a public app whose redirect URI is this server's `/callback` (which exchanges
//! the code and shows the token response's claims), and a member `demo` / `demo-password`
//! linked to `Patient/example`. It prints the URL that starts the launch.

use std::sync::Arc;

use auth::{admin, AuthConfig, AuthServer, ClientKind, NewClient, TracingAudit};
use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

const VERIFIER: &str = "demo-verifier-demo-verifier-demo-verifier-0123456789";

#[derive(Clone)]
struct Demo {
    base: String,
    client_id: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8090);
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir()?;
    let db = projections::Db::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("views.sqlite").display()), 4)
        .await?;
    let server = AuthServer::new(db.clone(), AuthConfig::new(&base), Arc::new(TracingAudit)).await?;
    let client = admin::add_client(
        &db,
        NewClient {
            name: "Demo App".into(),
            kind: ClientKind::Public,
            redirect_uris: vec![format!("{base}/callback")],
            scope: "launch/patient openid fhirUser offline_access patient/*.rs patient/Coverage.rs".into(),
            ..Default::default()
        },
    )
    .await?;
    admin::add_member(&db, "demo", "demo-password", "Patient/example").await?;
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(VERIFIER.as_bytes()));
    let start = format!(
        "{base}/auth/authorize?response_type=code&client_id={}&redirect_uri={}&scope={}&state=demo-state&aud={}&code_challenge={challenge}&code_challenge_method=S256",
        client.client_id,
        enc(&format!("{base}/callback")),
        enc("launch/patient openid fhirUser offline_access patient/*.rs patient/Coverage.rs"),
        enc(&format!("{base}/fhir")),
    );
    println!("start the launch at:\n{start}\nmember: demo / demo-password");
    let demo = Demo { base: base.clone(), client_id: client.client_id };
    let app = server.router().merge(Router::new().route("/callback", get(callback)).with_state(demo));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn callback(State(d): State<Demo>, Query(q): Query<std::collections::HashMap<String, String>>) -> Html<String> {
    let Some(code) = q.get("code") else {
        return Html(format!("<h1>No code</h1><pre>{q:?}</pre>"));
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/token", d.base))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &format!("{}/callback", d.base)),
            ("code_verifier", VERIFIER),
            ("client_id", &d.client_id),
        ])
        .send()
        .await;
    let body = match resp {
        Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    let claims = body["access_token"]
        .as_str()
        .and_then(|t| t.split('.').nth(1))
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    Html(format!(
        "<h1>Token response</h1><p>state: {}</p><p>scope: {}</p><p>patient: {}</p><h2>Access token claims</h2><pre>{}</pre>",
        q.get("state").map(String::as_str).unwrap_or(""),
        body["scope"],
        body["patient"],
        serde_json::to_string_pretty(&claims).unwrap_or_default()
    ))
}
