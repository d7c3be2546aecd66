//! The SMART standalone patient launch in a real headless Chromium (Debian's `chromium`, driven
//! by `chromedriver` over W3C WebDriver): authorize with PKCE S256 → a wrong password, then the
//! right one, typed into the real login page → the consent page, one optional scope unticked →
//! the redirect to the app with code and state → the token exchange → reads with the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tests::webdriver::{Browser, Callback};
use tests::{patient, Harness, Tier};

const APP_SCOPES: &str = "launch/patient openid fhirUser offline_access patient/*.rs";
const PASSWORD: &str = "correct horse battery";

fn explanation_of_benefit(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "ExplanationOfBenefit",
        "id": id,
        "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim",
        "patient": {"reference": format!("Patient/{patient}")},
        "created": "2024-03-05T00:00:00Z",
        "insurer": {"reference": "Organization/payer"},
        "provider": {"reference": "Practitioner/npi-1234567890"},
        "outcome": "complete",
        "insurance": [{"focal": true, "coverage": {"reference": "Coverage/cov-m1"}}],
        "total": [{"category": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adjudication", "code": "submitted"}]},
                   "amount": {"value": 120.5, "currency": "USD"}}]
    })
}

fn query_of(url: &str) -> HashMap<String, String> {
    let u = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("not a URL ({e}): {url}"));
    u.query_pairs().into_owned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "integration tier: needs Debian's chromium and chromium-driver (installed by scripts/test-integration.sh)"]
async fn standalone_patient_launch_in_chromium() {
    // Never pass silently without a browser.
    tests::webdriver::require_chromium();

    let h = Harness::start(Tier::Embedded).await;
    // The payer feed (the harness's system client): the member, a claim, and someone else.
    for (path, body) in [
        ("/fhir/Patient/m1", patient("m1", "Member")),
        ("/fhir/ExplanationOfBenefit/eob-m1", explanation_of_benefit("eob-m1", "m1")),
        ("/fhir/Patient/other", patient("other", "Stranger")),
    ] {
        let r = h.put(path, &body).await;
        let status = r.status();
        assert!(status == 201 || status == 200, "PUT {path}: {status} {}", r.text().await.unwrap_or_default());
    }
    let db = h.backend.open_db().await.expect("views db");
    auth::admin::add_member(&db, "alice", PASSWORD, "Patient/m1").await.expect("member added");

    let callback = Callback::start().await;
    let redirect = format!("http://127.0.0.1:{}/callback", callback.port);
    let (client_id, _) = h.add_client("Member App", "public", APP_SCOPES, &[&redirect]).await;

    // PKCE S256.
    let verifier = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let state = format!("st-{}", uuid::Uuid::new_v4().simple());
    let aud = h.url("/fhir");
    let authorize = reqwest::Url::parse_with_params(
        &h.url("/auth/authorize"),
        &[
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("redirect_uri", redirect.as_str()),
            ("scope", APP_SCOPES),
            ("state", state.as_str()),
            ("aud", aud.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .expect("authorize URL");

    let browser = Browser::start().await;
    browser.goto(authorize.as_str()).await;
    assert_eq!(browser.title().await, "Sign in", "the login page: {}", browser.source().await);
    assert!(browser.source().await.contains("Member App"), "the login page names the app");

    // A wrong password: the login page again, with an error, the username kept.
    let username = browser.find("#username").await;
    browser.send_keys(&username, "alice").await;
    let password = browser.find("#password").await;
    browser.send_keys(&password, "not the password").await;
    browser.click(&browser.find("#sign-in").await).await;
    let error = browser.find("#error").await;
    let message = browser.text(&error).await;
    assert!(message.contains("incorrect"), "error shown after a wrong password: {message}");
    assert_eq!(browser.title().await, "Sign in");
    assert!(browser.try_find("#approve").await.is_none(), "no consent after a wrong password");
    let username = browser.find("#username").await;
    assert_eq!(browser.property(&username, "value").await, json!("alice"), "the username is kept");
    assert_eq!(browser.property(&browser.find("#password").await, "value").await, json!(""));

    // The right password: the consent page.
    let password = browser.find("#password").await;
    browser.send_keys(&password, PASSWORD).await;
    browser.click(&browser.find("#sign-in").await).await;
    let approve = browser.find("#approve").await;
    assert_eq!(browser.title().await, "Allow access");
    let source = browser.source().await;
    assert!(source.contains("Signed in as alice"), "consent page: {source}");

    // Every optional scope starts ticked; the member unticks offline_access.
    let offline = browser.find("input[name=\"scope\"][value=\"offline_access\"]").await;
    let everything = browser.find("input[name=\"scope\"][value=\"patient/*.rs\"]").await;
    assert!(browser.is_selected(&offline).await && browser.is_selected(&everything).await);
    browser.click(&offline).await;
    assert!(!browser.is_selected(&offline).await, "offline_access unticked");
    assert!(browser.is_selected(&everything).await, "patient/*.rs still ticked");
    browser.click(&approve).await;

    // The browser lands on the app's redirect URI with the code and the state.
    let landed = browser.wait_for_url(&redirect, Duration::from_secs(30)).await;
    let q = query_of(&landed);
    assert_eq!(q.get("state"), Some(&state), "state comes back unchanged: {landed}");
    assert!(!q.contains_key("error"), "no error: {landed}");
    let code = q.get("code").unwrap_or_else(|| panic!("no code in {landed}")).clone();
    browser.find("#done").await;
    assert!(
        callback.targets().iter().any(|t| t.starts_with("/callback?") && query_of(&format!("{redirect}{t}")) == q),
        "the app's listener got the redirect: {:?}",
        callback.targets()
    );
    browser.quit().await;

    // The app exchanges the code with its verifier.
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let r = http
        .post(h.url("/auth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier.as_str()),
            ("client_id", client_id.as_str()),
        ])
        .send()
        .await
        .expect("token request");
    let status = r.status();
    let body = r.text().await.expect("token body");
    assert_eq!(status, 200, "token: {body}");
    let t: Value = serde_json::from_str(&body).expect("token JSON");
    assert_eq!(t["token_type"], "Bearer", "{t}");
    assert_eq!(t["patient"], "m1", "{t}");
    let granted: Vec<&str> = t["scope"].as_str().expect("scope").split(' ').collect();
    for s in ["launch/patient", "openid", "fhirUser", "patient/*.rs"] {
        assert!(granted.contains(&s), "{s} granted: {t}");
    }
    assert!(!granted.contains(&"offline_access"), "the unticked scope is not granted: {t}");
    assert!(t.get("refresh_token").is_none(), "no refresh token without offline_access: {t}");
    assert!(t["id_token"].as_str().is_some_and(|s| s.split('.').count() == 3), "an id_token: {t}");
    let access = t["access_token"].as_str().expect("access_token");

    // The token reads the member's own records and nobody else's.
    let read = |path: &str| http.get(h.url(path)).bearer_auth(access).send();
    let r = read("/fhir/Patient/m1").await.expect("read m1");
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.expect("Patient JSON");
    assert_eq!(p["id"], "m1");
    let r = read("/fhir/ExplanationOfBenefit/eob-m1").await.expect("read the claim");
    assert_eq!(r.status(), 200);
    let r = read("/fhir/Patient/other").await.expect("read another patient");
    assert_eq!(r.status(), 404, "another patient is invisible to the member's token");

    h.stop().await;
}
