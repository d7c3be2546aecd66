//! The standalone patient launch over HTTP: authorize → login → consent → code → token →
//! refresh → introspect → revoke, and what must be refused on the way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use auth::{Context, Interaction};
use axum::http::StatusCode;
use common::*;
use serde_json::json;

const APP_SCOPES: &str = "launch/patient openid fhirUser offline_access patient/*.rs";

#[tokio::test]
async fn discovery_documents_are_absolute_and_complete() {
    let env = env().await;
    let c = env.server.smart_configuration();
    for k in [
        "issuer",
        "jwks_uri",
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
    ] {
        assert!(c[k].as_str().unwrap().starts_with("http://payerx.test/auth"), "{k}: {}", c[k]);
    }
    assert_eq!(c["token_endpoint"], TOKEN_URL);
    assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(c["response_types_supported"], json!(["code"]));
    assert_eq!(c["grant_types_supported"], json!(["authorization_code", "refresh_token", "client_credentials"]));
    assert_eq!(c["token_endpoint_auth_methods_supported"], json!(["client_secret_basic", "private_key_jwt"]));
    assert_eq!(c["token_endpoint_auth_signing_alg_values_supported"], json!(["RS384", "ES384"]));
    let caps: Vec<&str> = c["capabilities"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for cap in [
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "context-standalone-patient",
        "permission-offline",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
        "sso-openid-connect",
    ] {
        assert!(caps.contains(&cap), "missing capability {cap}");
    }
    assert!(c["scopes_supported"].as_array().unwrap().contains(&json!("patient/*.rs")));

    let oidc = env.get("/auth/.well-known/openid-configuration", None).await;
    assert_eq!(oidc.status, StatusCode::OK);
    assert_eq!(oidc.json()["issuer"], ISSUER);
    assert_eq!(oidc.json()["jwks_uri"], "http://payerx.test/auth/jwks");
    let smart = env.get("/auth/.well-known/smart-configuration", None).await;
    assert_eq!(smart.json(), c);

    let jwks = env.get("/auth/jwks", None).await.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["alg"], "ES256");
    assert!(keys[0]["kid"].is_string());
    assert!(keys[0].get("d").is_none());
}

#[tokio::test]
async fn whole_launch_with_refresh_introspection_and_revocation() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    let (rs, rs_secret) = env.symmetric_client("system/*.rs").await; // the introspecting resource server
    env.member("alice", "Patient/pat-1").await;

    // Browser: authorize → login page.
    let verifier = new_verifier();
    let (page, cookie) =
        env.start(&app, &format!("{APP_SCOPES} patient/Coverage.rs"), &challenge(&verifier), "xyz").await;
    assert!(page.body.contains("name=\"username\" id=\"username\""));
    assert!(page.body.contains("name=\"password\" id=\"password\""));
    assert!(page.body.contains("name=\"csrf\" id=\"csrf\""));
    assert!(page.body.contains("Member App"));
    assert_eq!(page.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(cookie.starts_with("payerx_authz_"));

    // Login → consent page listing the scopes in plain words; launch scopes are not optional.
    let consent = env.login(&page, &cookie, "alice", PASSWORD).await;
    assert_eq!(consent.status, StatusCode::OK);
    assert!(consent.body.contains("See and search all your health plan records"), "{}", consent.body);
    assert!(consent.body.contains("name=\"decision\" value=\"deny\""));
    let boxes = checkbox_values(&consent.body);
    assert_eq!(boxes, vec!["offline_access", "patient/*.rs", "patient/Coverage.rs"]);
    assert_ne!(input_value(&consent.body, "csrf"), input_value(&page.body, "csrf"), "the CSRF token rotates at login");

    // The member unticks Coverage.
    let done = env.consent(&consent, &cookie, Some(&["offline_access", "patient/*.rs"]), "approve").await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    let loc = done.location();
    assert!(loc.starts_with(REDIRECT), "{loc}");
    let q = query_of(&loc);
    assert_eq!(q["state"], "xyz");
    let code = &q["code"];

    // Code → tokens.
    let resp = env
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
                ("client_id", &app),
            ],
            &[],
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
    assert_eq!(resp.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(resp.header("pragma").as_deref(), Some("no-cache"));
    let t = resp.json();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 900);
    assert_eq!(t["patient"], "pat-1");
    assert_eq!(t["scope"], "launch/patient openid fhirUser offline_access patient/*.rs");
    let access = t["access_token"].as_str().unwrap();
    let refresh = t["refresh_token"].as_str().unwrap();
    let claims = claims_of(access);
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], FHIR_BASE);
    assert_eq!(claims["client_id"], app.as_str());
    assert_eq!(claims["patient"], "pat-1");
    assert_eq!(claims["fhirUser"], "Patient/pat-1");
    assert!(claims["jti"].is_string() && claims["exp"].is_i64() && claims["iat"].is_i64());
    assert_eq!(header_of(access)["typ"], "at+jwt");

    // id_token: for the app, naming the member's Patient.
    let id = claims_of(t["id_token"].as_str().unwrap());
    assert_eq!(id["aud"], app.as_str());
    assert_eq!(id["iss"], ISSUER);
    assert_eq!(id["fhirUser"], "Patient/pat-1");
    assert_eq!(id["sub"], claims["sub"]);
    assert!(env.server.verify_bearer(t["id_token"].as_str().unwrap()).await.is_err(), "an id_token is no access token");

    // The resource server's view.
    let p = env.server.verify_bearer(access).await.unwrap();
    assert_eq!(p.client_id, app);
    assert_eq!(p.patient.as_deref(), Some("pat-1"));
    assert_eq!(p.fhir_user.as_deref(), Some("Patient/pat-1"));
    assert_eq!(p.issuer, ISSUER);
    assert!(p.scopes.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Search));
    assert!(!p.scopes.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Update));

    // Refresh: a new pair; the old refresh token is spent.
    let r = env.token(&[("grant_type", "refresh_token"), ("refresh_token", refresh), ("client_id", &app)], &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let t2 = r.json();
    let access2 = t2["access_token"].as_str().unwrap();
    let refresh2 = t2["refresh_token"].as_str().unwrap();
    assert_ne!(refresh2, refresh);
    assert_eq!(t2["scope"], t["scope"], "no scope asked: the grant's scopes");
    assert_eq!(t2["patient"], "pat-1");

    // Introspection by the resource server (a confidential client).
    let auth = [basic(&rs, &rs_secret)];
    let i = env.post_form("/auth/introspect", &[("token", access2)], &auth).await;
    assert_eq!(i.status, StatusCode::OK, "{}", i.body);
    assert_eq!(i.header("cache-control").as_deref(), Some("no-store"));
    let i = i.json();
    assert_eq!(i["active"], true);
    assert_eq!(i["client_id"], app.as_str());
    assert_eq!(i["patient"], "pat-1");
    assert_eq!(i["scope"], t["scope"]);
    assert_eq!(i["token_type"], "Bearer");
    assert_eq!(i["iss"], ISSUER);
    assert!(i["exp"].is_i64() && i["iat"].is_i64() && i["sub"].is_string());
    let ir =
        env.post_form("/auth/introspect", &[("token", refresh2), ("token_type_hint", "refresh_token")], &auth).await;
    assert_eq!(ir.json()["active"], true);
    assert_eq!(ir.json()["client_id"], app.as_str());
    let old = env.post_form("/auth/introspect", &[("token", refresh)], &auth).await;
    assert_eq!(old.json(), json!({"active": false}), "a rotated refresh token is inactive");
    // Public clients may not introspect.
    let refused = env.post_form("/auth/introspect", &[("token", access2), ("client_id", &app)], &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    // Revocation by the app: the access token, then the refresh token (and its grant).
    let rv = env.post_form("/auth/revoke", &[("token", access2), ("client_id", &app)], &[]).await;
    assert_eq!(rv.status, StatusCode::OK);
    let i = env.post_form("/auth/introspect", &[("token", access2)], &auth).await.json();
    assert_eq!(i, json!({"active": false}));
    let err = env.server.verify_bearer(access2).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    let rv = env.post_form("/auth/revoke", &[("token", refresh2), ("client_id", &app)], &[]).await;
    assert_eq!(rv.status, StatusCode::OK);
    let i = env.post_form("/auth/introspect", &[("token", refresh2)], &auth).await.json();
    assert_eq!(i, json!({"active": false}));
    let r = env.token(&[("grant_type", "refresh_token"), ("refresh_token", refresh2), ("client_id", &app)], &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_grant");
    // Unknown tokens: still 200.
    let rv = env.post_form("/auth/revoke", &[("token", "no-such-token"), ("client_id", &app)], &[]).await;
    assert_eq!(rv.status, StatusCode::OK);

    // The audit trail saw it all, and never a token.
    let actions = env.actions();
    for a in ["login.succeeded", "consent.approved", "token.issued", "token.revoked"] {
        assert!(actions.iter().any(|x| x == a), "no {a} in {actions:?}");
    }
    let dump = format!("{:?}", env.audit.records());
    for secret in [access, refresh, access2, refresh2, code.as_str(), PASSWORD, rs_secret.as_str()] {
        assert!(!dump.contains(secret), "the audit trail holds a secret");
    }
}

#[tokio::test]
async fn confidential_client_exchanges_its_code_with_basic_auth_as_payer_pages_show() {
    let env = env().await;
    let (client, secret) = env.symmetric_client("launch/patient patient/ExplanationOfBenefit.rs").await;
    env.member("bob", "pat-2").await;
    let verifier = new_verifier();
    let code = env.authorize(&client, "launch/patient patient/ExplanationOfBenefit.rs", &verifier, "bob").await;

    // Without its secret the client is refused.
    let r = env
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
                ("client_id", &client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");

    // A JSON body with Basic credentials, as the seed pages document; the code was not spent by
    // the unauthenticated attempt.
    let body =
        json!({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier});
    let (k, v) = basic(&client, &secret);
    let req = axum::http::Request::post("/auth/token")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header(k, v)
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let r = env.send(req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t = r.json();
    assert_eq!(t["patient"], "pat-2");
    assert!(t.get("refresh_token").is_none(), "no offline_access, no refresh token");
    assert!(t.get("id_token").is_none(), "no openid, no id_token");
}

#[tokio::test]
async fn authorize_refuses_bad_requests() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    let ch = challenge(&new_verifier());
    let base = |over: &[(&str, &str)], drop: &[&str]| {
        let mut p: Vec<(&str, String)> = vec![
            ("response_type", "code".into()),
            ("client_id", app.clone()),
            ("redirect_uri", REDIRECT.into()),
            ("scope", APP_SCOPES.into()),
            ("state", "s1".into()),
            ("aud", FHIR_BASE.into()),
            ("code_challenge", ch.clone()),
            ("code_challenge_method", "S256".into()),
        ];
        p.retain(|(k, _)| !drop.contains(k));
        for (k, v) in over {
            p.retain(|(x, _)| x != k);
            p.push((k, v.to_string()));
        }
        let refs: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        authorize_uri(&refs)
    };
    let redirected = |r: &Resp, error: &str| {
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let q = query_of(&r.location());
        assert_eq!(q["error"], error, "{q:?}");
        assert!(r.location().starts_with(REDIRECT));
        q
    };

    // PKCE: plain is refused, and so is no PKCE at all.
    let q = redirected(&env.get(&base(&[("code_challenge_method", "plain")], &[]), None).await, "invalid_request");
    assert_eq!(q["state"], "s1");
    assert!(q["error_description"].contains("plain"));
    redirected(&env.get(&base(&[], &["code_challenge", "code_challenge_method"]), None).await, "invalid_request");
    redirected(&env.get(&base(&[("code_challenge", "too-short")], &[]), None).await, "invalid_request");
    // state is required; response_type must be code; aud must be this server.
    redirected(&env.get(&base(&[], &["state"]), None).await, "invalid_request");
    redirected(&env.get(&base(&[("response_type", "token")], &[]), None).await, "unsupported_response_type");
    redirected(&env.get(&base(&[("aud", "https://other.example/fhir")], &[]), None).await, "invalid_request");
    // Nothing the app may have.
    redirected(&env.get(&base(&[("scope", "user/*.cruds system/*.rs")], &[]), None).await, "invalid_scope");

    // A redirect URI that is not registered exactly: an error page, never a redirect.
    for uri in ["https://evil.example/callback", "https://app.example/callback/", "https://app.example/callback?x=1"] {
        let r = env.get(&base(&[("redirect_uri", uri)], &[]), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.header("location").is_none());
        assert!(r.body.contains("redirect"), "{}", r.body);
    }
    let r = env.get(&base(&[], &["redirect_uri"]), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.header("location").is_none());
    // Unknown client: an error page too.
    let r = env.get(&base(&[("client_id", "nobody")], &[]), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.header("location").is_none());

    // A disabled client cannot start a launch.
    auth::admin::disable_client(&env.db, &app).await.unwrap();
    let r = env.get(&base(&[], &[]), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.header("location").is_none());
    assert!(env.actions().iter().any(|a| a == "authorize.refused"));
}

#[tokio::test]
async fn login_failures_csrf_and_lockout() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    env.member("carol", "pat-3").await;
    let (page, cookie) = env.start(&app, APP_SCOPES, &challenge(&new_verifier()), "s").await;

    // Wrong password: the login page again, with an error.
    let r = env.login(&page, &cookie, "carol", "wrong password").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("id=\"error\""));
    assert!(r.body.contains("incorrect"));
    assert!(r.body.contains("id=\"password\""));
    let r = env.login(&page, &cookie, "nobody", "whatever password").await;
    assert!(r.body.contains("incorrect"), "unknown users get the same answer");

    // The forms are bound to this browser and this request.
    let pending = input_value(&page.body, "pending");
    let csrf = input_value(&page.body, "csrf");
    let forged = env
        .post_form(
            "/auth/login",
            &[("pending", &pending), ("csrf", "forged"), ("username", "carol"), ("password", PASSWORD)],
            &[("cookie", cookie.clone())],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let no_cookie = env
        .post_form(
            "/auth/login",
            &[("pending", &pending), ("csrf", &csrf), ("username", "carol"), ("password", PASSWORD)],
            &[],
        )
        .await;
    assert_eq!(no_cookie.status, StatusCode::FORBIDDEN);
    // Consent cannot be posted before login.
    let early = env
        .post_form(
            "/auth/consent",
            &[("pending", &pending), ("csrf", &csrf), ("decision", "approve")],
            &[("cookie", cookie.clone())],
        )
        .await;
    assert_eq!(early.status, StatusCode::BAD_REQUEST);
    assert!(early.header("location").is_none());

    // Four more failures lock the account (five in a row), even for the right password.
    for _ in 0..4 {
        env.login(&page, &cookie, "carol", "still wrong").await;
    }
    let r = env.login(&page, &cookie, "carol", PASSWORD).await;
    assert!(r.body.contains("locked"), "{}", r.body);
    let actions = env.actions();
    assert!(actions.iter().filter(|a| *a == "login.failed").count() >= 6);
    assert!(actions.iter().any(|a| a == "login.locked"));
    // Unlock (as an operator would, or as time does) and the right password works.
    sqlx::query("UPDATE auth_members SET locked_until = 0").execute(&env.db.pool).await.unwrap();
    let r = env.login(&page, &cookie, "carol", PASSWORD).await;
    assert!(r.body.contains("id=\"approve\""), "{}", r.body);

    // Denying consent sends access_denied back to the app.
    let r = env.consent(&r, &cookie, None, "deny").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let q = query_of(&r.location());
    assert_eq!(q["error"], "access_denied");
    assert_eq!(q["state"], "s");
    assert!(!q.contains_key("code"));
    assert!(env.actions().iter().any(|a| a == "consent.denied"));
}

#[tokio::test]
async fn consent_submits_once() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    env.member("dave", "pat-4").await;
    let (page, cookie) = env.start(&app, APP_SCOPES, &challenge(&new_verifier()), "s").await;
    let consent = env.login(&page, &cookie, "dave", PASSWORD).await;
    let first = env.consent(&consent, &cookie, None, "approve").await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    let second = env.consent(&consent, &cookie, None, "approve").await;
    assert_eq!(second.status, StatusCode::BAD_REQUEST);
    assert!(second.header("location").is_none());
}

#[tokio::test]
async fn code_exchange_refusals() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    env.member("erin", "pat-5").await;
    let exchange = |code: String, verifier: String, redirect: &'static str| {
        let env = &env;
        let app = app.clone();
        async move {
            env.token(
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("code_verifier", &verifier),
                    ("client_id", &app),
                ],
                &[],
            )
            .await
        }
    };

    // Missing code_verifier: invalid_request, and the code survives it.
    let verifier = new_verifier();
    let code = env.authorize(&app, APP_SCOPES, &verifier, "erin").await;
    let r = env
        .token(
            &[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT), ("client_id", &app)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_request");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"), "errors are not cached either");
    assert_eq!(r.header("pragma").as_deref(), Some("no-cache"));
    // Wrong verifier: invalid_grant, and the code is spent.
    let r = exchange(code.clone(), new_verifier(), REDIRECT).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    let r = exchange(code.clone(), verifier.clone(), REDIRECT).await;
    assert_eq!(r.json()["error"], "invalid_grant");

    // Wrong redirect_uri at the token endpoint.
    let verifier = new_verifier();
    let code = env.authorize(&app, APP_SCOPES, &verifier, "erin").await;
    let r = exchange(code, verifier, "https://app.example/other").await;
    assert_eq!(r.json()["error"], "invalid_grant");

    // A reused code: refused, and the tokens of its first exchange are revoked.
    let verifier = new_verifier();
    let code = env.authorize(&app, APP_SCOPES, &verifier, "erin").await;
    let first = exchange(code.clone(), verifier.clone(), REDIRECT).await;
    assert_eq!(first.status, StatusCode::OK);
    let access = first.json()["access_token"].as_str().unwrap().to_string();
    let refresh = first.json()["refresh_token"].as_str().unwrap().to_string();
    assert!(env.server.verify_bearer(&access).await.is_ok());
    let again = exchange(code, verifier, REDIRECT).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.json()["error"], "invalid_grant");
    assert!(env.server.verify_bearer(&access).await.is_err(), "replaying a code revokes its tokens");
    let r = env.token(&[("grant_type", "refresh_token"), ("refresh_token", &refresh), ("client_id", &app)], &[]).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(env.actions().iter().any(|a| a == "token.reuse_detected"));

    // An expired code.
    let verifier = new_verifier();
    let code = env.authorize(&app, APP_SCOPES, &verifier, "erin").await;
    sqlx::query("UPDATE auth_codes SET expires_at = 1").execute(&env.db.pool).await.unwrap();
    let r = exchange(code, verifier, REDIRECT).await;
    assert_eq!(r.json()["error"], "invalid_grant");

    // Another client's code.
    let other = env.public_client(APP_SCOPES).await;
    let verifier = new_verifier();
    let code = env.authorize(&app, APP_SCOPES, &verifier, "erin").await;
    let r = env
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
                ("client_id", &other),
            ],
            &[],
        )
        .await;
    assert_eq!(r.json()["error"], "invalid_grant");

    // Odd requests.
    let r = env.token(&[("grant_type", "password"), ("client_id", &app)], &[]).await;
    assert_eq!(r.json()["error"], "unsupported_grant_type");
    let r = env.token(&[("client_id", &app)], &[]).await;
    assert_eq!(r.json()["error"], "invalid_request");
    let r = env.token(&[("grant_type", "refresh_token"), ("grant_type", "refresh_token")], &[]).await;
    assert_eq!(r.json()["error"], "invalid_request");
    assert!(env.actions().iter().any(|a| a == "token.refused"));
}

#[tokio::test]
async fn refresh_rotation_narrowing_and_reuse() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    env.member("frank", "pat-6").await;
    let t = env.tokens(&app, APP_SCOPES, "frank").await;
    let r1 = t["refresh_token"].as_str().unwrap().to_string();
    let refresh = |token: String, scope: Option<&'static str>| {
        let env = &env;
        let app = app.clone();
        async move {
            let mut p =
                vec![("grant_type", "refresh_token"), ("refresh_token", token.as_str()), ("client_id", app.as_str())];
            if let Some(s) = scope {
                p.push(("scope", s));
            }
            env.token(&p, &[]).await
        }
    };

    // Widening is refused (and does not spend the token).
    for wider in ["patient/*.cruds", "user/*.rs", "patient/*.rs online_access", "system/*.rs"] {
        let r = refresh(r1.clone(), Some(wider)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"], "invalid_scope", "{wider}");
    }
    // Narrowing works; the next refresh without scope gets the full grant back.
    let r = refresh(r1.clone(), Some("patient/Coverage.rs offline_access")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t2 = r.json();
    assert_eq!(t2["scope"], "patient/Coverage.rs offline_access");
    let p = env.server.verify_bearer(t2["access_token"].as_str().unwrap()).await.unwrap();
    assert!(p.scopes.allows(Context::Patient, "Coverage", Interaction::Read));
    assert!(!p.scopes.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Read));
    let r2 = t2["refresh_token"].as_str().unwrap().to_string();
    let r = refresh(r2.clone(), None).await;
    assert_eq!(r.json()["scope"], APP_SCOPES);
    let t3 = r.json();
    let r3 = t3["refresh_token"].as_str().unwrap().to_string();
    let a3 = t3["access_token"].as_str().unwrap().to_string();

    // Reusing a rotated token: refused, and the whole grant is revoked.
    let r = refresh(r1, None).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(refresh(r3, None).await.json()["error"] == "invalid_grant");
    assert!(env.server.verify_bearer(&a3).await.is_err());
    assert!(env.actions().iter().any(|a| a == "token.reuse_detected"));

    // Expired refresh tokens.
    let t = env.tokens(&app, APP_SCOPES, "frank").await;
    sqlx::query("UPDATE auth_refresh_tokens SET expires_at = 1 WHERE status = 'active'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    let r = refresh(t["refresh_token"].as_str().unwrap().to_string(), None).await;
    assert_eq!(r.json()["error"], "invalid_grant");
}

#[tokio::test]
async fn disabled_clients_lose_their_tokens() {
    let env = env().await;
    let app = env.public_client(APP_SCOPES).await;
    env.member("gina", "pat-7").await;
    let t = env.tokens(&app, APP_SCOPES, "gina").await;
    let access = t["access_token"].as_str().unwrap();
    assert!(env.server.verify_bearer(access).await.is_ok());
    auth::admin::disable_client(&env.db, &app).await.unwrap();
    let err = env.server.verify_bearer(access).await.unwrap_err();
    assert!(err.to_string().contains("disabled"), "{err}");
    let r = env
        .token(
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", t["refresh_token"].as_str().unwrap()),
                ("client_id", &app),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    let listed = auth::admin::list_clients(&env.db).await.unwrap();
    assert!(!listed.iter().find(|c| c.client_id == app).unwrap().enabled);
    assert!(auth::admin::disable_client(&env.db, "no-such-client").await.is_err());
}

#[tokio::test]
async fn online_access_gets_a_refresh_token_and_user_scopes_work() {
    let env = env().await;
    let app = env.public_client("launch/patient openid fhirUser online_access user/*.rs").await;
    env.member("hana", "pat-8").await;
    let t =
        env.tokens(&app, "launch/patient openid fhirUser online_access user/ExplanationOfBenefit.read", "hana").await;
    assert!(t["refresh_token"].is_string());
    assert_eq!(t["scope"], "launch/patient openid fhirUser online_access user/ExplanationOfBenefit.read");
    let p = env.server.verify_bearer(t["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(p.scopes.contexts_allowing("ExplanationOfBenefit", Interaction::Search), vec![Context::User]);
}
