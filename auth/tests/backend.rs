//! Backend services (client_credentials with client_secret_basic and private_key_jwt), the
//! bearer-token check, key rotation and the external issuer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use auth::{admin, AuthError, ClientKind, Context, ExternalIssuer, Interaction, NewClient};
use axum::http::StatusCode;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

async fn asymmetric_client(env: &Env, jwks_url: Option<String>, jwks: Option<Value>) -> String {
    admin::add_client(
        &env.db,
        NewClient {
            name: "Payer B".into(),
            kind: ClientKind::ConfidentialAsymmetric,
            jwks_url,
            jwks,
            scope: "system/*.rs".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client_id
}

async fn with_assertion(env: &Env, assertion: &str, scope: &str) -> Resp {
    env.token(
        &[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", assertion),
        ],
        &[],
    )
    .await
}

#[tokio::test]
async fn client_credentials_with_client_secret_basic() {
    let env = env().await;
    let (client, secret) = env.symmetric_client("system/*.rs system/Claim.cruds").await;
    let r = env
        .token(&[("grant_type", "client_credentials"), ("scope", "system/Claim.rs")], &[basic(&client, &secret)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let t = r.json();
    assert_eq!(t["scope"], "system/Claim.rs");
    assert!(t.get("refresh_token").is_none() && t.get("patient").is_none() && t.get("id_token").is_none());
    let p = env.server.verify_bearer(t["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(p.client_id, client);
    assert_eq!(p.sub.as_deref(), Some(client.as_str()));
    assert_eq!(p.patient, None);
    assert!(p.scopes.allows(Context::System, "Claim", Interaction::Read));
    assert!(!p.scopes.allows(Context::System, "Claim", Interaction::Update));

    // No scope asked: everything system/ the registration allows. Scopes beyond it are dropped.
    let r = env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await;
    assert_eq!(r.json()["scope"], "system/*.rs system/Claim.cruds");
    let r = env
        .token(
            &[("grant_type", "client_credentials"), ("scope", "system/*.cruds patient/*.rs")],
            &[basic(&client, &secret)],
        )
        .await;
    assert_eq!(r.json()["scope"], "system/*.rs system/Claim.cruds");
    let r =
        env.token(&[("grant_type", "client_credentials"), ("scope", "patient/*.rs")], &[basic(&client, &secret)]).await;
    assert_eq!(r.json()["error"], "invalid_scope");

    // A wrong secret: 401 with a Basic challenge.
    let r = env.token(&[("grant_type", "client_credentials")], &[basic(&client, "wrong-secret")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let r = env.token(&[("grant_type", "client_credentials")], &[basic("unknown-client", &secret)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // client_secret_post is not offered.
    let r = env
        .token(&[("grant_type", "client_credentials"), ("client_id", &client), ("client_secret", &secret)], &[])
        .await;
    assert_eq!(r.json()["error"], "invalid_client");

    // Public clients cannot use client_credentials.
    let public = env.public_client("launch/patient patient/*.rs").await;
    let r = env.token(&[("grant_type", "client_credentials"), ("client_id", &public)], &[]).await;
    assert_eq!(r.json()["error"], "unauthorized_client");

    // A disabled client: refused, and its tokens stop working.
    let access = env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await.json()
        ["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    admin::disable_client(&env.db, &client).await.unwrap();
    let r = env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    assert!(env.server.verify_bearer(&access).await.is_err());
    admin::enable_client(&env.db, &client).await.unwrap();
    assert!(env.server.verify_bearer(&access).await.is_ok());
}

#[tokio::test]
async fn private_key_jwt_rs384_inline_jwks() {
    let env = env().await;
    let key = ClientKey::rs384("rsa-1");
    let client = asymmetric_client(&env, None, Some(key.jwks())).await;
    let r = with_assertion(&env, &key.assertion(&client), "system/*.rs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let p = env.server.verify_bearer(r.json()["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(p.client_id, client);
    assert!(p.scopes.allows(Context::System, "ExplanationOfBenefit", Interaction::Search));

    // Replay: the same assertion again.
    let assertion = key.assertion(&client);
    assert_eq!(with_assertion(&env, &assertion, "system/*.rs").await.status, StatusCode::OK);
    let r = with_assertion(&env, &assertion, "system/*.rs").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    assert!(r.json()["error_description"].as_str().unwrap().contains("jti"));
    assert!(r.header("www-authenticate").is_none(), "no Basic challenge when Basic was not tried");

    let claims = |over: Value| {
        let mut c = json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() + 120,
                           "jti": uuid::Uuid::new_v4().to_string()});
        for (k, v) in over.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let refused = |r: Resp, why: &str| {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{why}: {}", r.body);
        assert_eq!(r.json()["error"], "invalid_client", "{why}");
    };
    refused(with_assertion(&env, &key.sign(&claims(json!({"exp": now() + 600}))), "system/*.rs").await, "exp > 5 min");
    refused(with_assertion(&env, &key.sign(&claims(json!({"exp": now() - 60}))), "system/*.rs").await, "expired");
    refused(with_assertion(&env, &key.sign(&claims(json!({"exp": null}))), "system/*.rs").await, "no exp");
    refused(with_assertion(&env, &key.sign(&claims(json!({"jti": null}))), "system/*.rs").await, "no jti");
    refused(with_assertion(&env, &key.sign(&claims(json!({"aud": ISSUER}))), "system/*.rs").await, "wrong aud");
    refused(
        with_assertion(&env, &key.sign(&claims(json!({"sub": "someone-else"}))), "system/*.rs").await,
        "sub != iss",
    );
    // RS256 is not one of the advertised assertion algorithms.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let rs256 = jsonwebtoken::encode(&h, &claims(json!({})), &key.encoding).unwrap();
    refused(with_assertion(&env, &rs256, "system/*.rs").await, "RS256");
    // HS256 with the public key as the secret (the classic confusion attack).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let hs = jsonwebtoken::encode(&h, &claims(json!({})), &EncodingKey::from_secret(key.jwk.to_string().as_bytes()))
        .unwrap();
    refused(with_assertion(&env, &hs, "system/*.rs").await, "HS256");
    // Signed by a key the client never registered, under its kid.
    let other = ClientKey::es384("rsa-1");
    refused(with_assertion(&env, &other.sign(&claims(json!({}))), "system/*.rs").await, "foreign key");
    let stranger = ClientKey::es384("es-9");
    refused(with_assertion(&env, &stranger.sign(&claims(json!({}))), "system/*.rs").await, "unknown kid");
    // Tampered payload.
    let good = key.sign(&claims(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = base64_url(&claims(json!({"exp": now() + 200})).to_string());
    refused(
        with_assertion(&env, &format!("{}.{}.{}", parts[0], forged_payload, parts[2]), "system/*.rs").await,
        "tampered",
    );
    // client_id that disagrees with iss.
    let r = env
        .token(
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "someone-else"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &key.assertion(&client)),
            ],
            &[],
        )
        .await;
    refused(r, "client_id != iss");
    // The wrong assertion type.
    let r = env
        .token(
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:example:other"),
                ("client_assertion", &key.assertion(&client)),
            ],
            &[],
        )
        .await;
    refused(r, "assertion type");
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn private_key_jwt_es384_from_jwks_url() {
    let env = env().await;
    let key = ClientKey::es384("ec-1");
    let (url, published) = serve_jwks(key.jwks()).await;
    let client = asymmetric_client(&env, Some(url), None).await;
    let r = with_assertion(&env, &key.assertion(&client), "system/*.rs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["scope"], "system/*.rs");

    // The client rotates its key: the new kid is fetched on first sight.
    let key2 = ClientKey::es384("ec-2");
    *published.lock().unwrap() = json!({"keys": [key.jwk.clone(), key2.jwk.clone()]});
    let r = with_assertion(&env, &key2.assertion(&client), "system/*.rs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Its assertions authenticate introspection too.
    let access = r.json()["access_token"].as_str().unwrap().to_string();
    let i = env
        .post_form(
            "/auth/introspect",
            &[
                ("token", &access),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &key.assertion(&client)),
            ],
            &[],
        )
        .await;
    assert_eq!(i.status, StatusCode::OK, "{}", i.body);
    assert_eq!(i.json()["active"], true);
    assert_eq!(i.json()["client_id"], client.as_str());
}

#[tokio::test]
async fn verify_bearer_refuses_what_it_must() {
    let env = env().await;
    let (client, secret) = env.symmetric_client("system/*.rs").await;
    let t = env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await.json();
    let good = t["access_token"].as_str().unwrap().to_string();
    assert!(env.server.verify_bearer(&good).await.is_ok());
    let claims = claims_of(&good);
    let invalid = |r: Result<auth::Principal, AuthError>, why: &str| match r {
        Err(AuthError::InvalidToken(m)) => m,
        other => panic!("{why}: expected InvalidToken, got {other:?}"),
    };

    // alg: none
    let header = base64_url(&json!({"alg": "none", "typ": "at+jwt", "kid": header_of(&good)["kid"]}).to_string());
    let none = format!("{header}.{}.", base64_url(&claims.to_string()));
    let m = invalid(env.server.verify_bearer(&none).await, "alg none");
    assert!(m.contains("none"), "{m}");
    // A key payerx never published.
    let stranger = ClientKey::es256("not-ours");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("not-ours".into());
    h.typ = Some("at+jwt".into());
    let unknown = jsonwebtoken::encode(&h, &claims, &stranger.encoding).unwrap();
    let m = invalid(env.server.verify_bearer(&unknown).await, "unknown kid");
    assert!(m.contains("unknown signing key"), "{m}");
    // Our kid, someone else's signature.
    h.kid = header_of(&good)["kid"].as_str().map(str::to_string);
    let wrong_sig = jsonwebtoken::encode(&h, &claims, &stranger.encoding).unwrap();
    invalid(env.server.verify_bearer(&wrong_sig).await, "bad signature");
    // Tampered claims.
    let parts: Vec<&str> = good.split('.').collect();
    let mut widened = claims.clone();
    widened["scope"] = json!("system/*.cruds");
    let tampered = format!("{}.{}.{}", parts[0], base64_url(&widened.to_string()), parts[2]);
    invalid(env.server.verify_bearer(&tampered).await, "tampered");
    // Expired (beyond the leeway), signed with our real key.
    let mut expired = claims.clone();
    expired["exp"] = json!(now() - 120);
    expired["jti"] = json!("expired-1");
    let m = invalid(env.server.verify_bearer(&env.forge(&expired, "at+jwt").await).await, "expired");
    assert!(m.contains("expired"), "{m}");
    // Another audience.
    let mut other_aud = claims.clone();
    other_aud["aud"] = json!("https://other.example/fhir");
    let m = invalid(env.server.verify_bearer(&env.forge(&other_aud, "at+jwt").await).await, "aud");
    assert!(m.contains("not for"), "{m}");
    // Not an access token (an id_token shape).
    invalid(env.server.verify_bearer(&env.forge(&claims, "JWT").await).await, "typ");
    // Another issuer.
    let mut other_iss = claims.clone();
    other_iss["iss"] = json!("https://idp.example");
    invalid(env.server.verify_bearer(&env.forge(&other_iss, "at+jwt").await).await, "iss");
    // Garbage.
    invalid(env.server.verify_bearer("not a token").await, "garbage");
    invalid(env.server.verify_bearer("a.b.c").await, "garbage");
    // Small clock skew is tolerated.
    let mut skew = claims.clone();
    skew["exp"] = json!(now() - 2);
    skew["jti"] = json!("skew-1");
    assert!(env.server.verify_bearer(&env.forge(&skew, "at+jwt").await).await.is_ok());

    // The refusal renders as an OperationOutcome with a Bearer challenge for FHIR clients.
    let err = env.server.verify_bearer(&none).await.unwrap_err();
    let resp = axum::response::IntoResponse::into_response(err);
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
}

#[tokio::test]
async fn key_rotation_keeps_older_tokens_valid() {
    let env = env().await;
    let (client, secret) = env.symmetric_client("system/*.rs").await;
    let issue = || async {
        env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let old = issue().await;
    let old_kid = header_of(&old)["kid"].as_str().unwrap().to_string();
    let rotated = env.server.rotate_keys().await.unwrap();
    assert_ne!(rotated.kid, old_kid);
    let new = issue().await;
    assert_eq!(header_of(&new)["kid"], rotated.kid.as_str(), "the new key signs");
    assert!(env.server.verify_bearer(&old).await.is_ok(), "tokens of the previous key still verify");
    assert!(env.server.verify_bearer(&new).await.is_ok());
    let jwks = env.get("/auth/jwks", None).await.json();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, vec![rotated.kid.as_str(), old_kid.as_str()]);

    // Rotated out of the published set (3 keys), the oldest key no longer verifies.
    env.server.rotate_keys().await.unwrap();
    assert!(env.server.verify_bearer(&old).await.is_ok());
    let last = env.server.rotate_keys().await.unwrap();
    assert_eq!(last.published.len(), 3);
    assert!(!last.published.contains(&old_kid));
    assert!(env.server.verify_bearer(&old).await.is_err());
    assert!(env.server.verify_bearer(&new).await.is_ok());

    // A rotation by another process (the CLI) is picked up when its kid shows up.
    let elsewhere = admin::rotate_keys(&env.db).await.unwrap();
    let (kid, _) = env.current_signing_key().await;
    assert_eq!(kid, elsewhere.kid);
    let mut c = claims_of(&new);
    c["jti"] = json!("from-the-cli-key");
    tokio::time::sleep(Duration::from_secs(6)).await; // past the reload rate limit
    assert!(env.server.verify_bearer(&env.forge(&c, "at+jwt").await).await.is_ok());
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let env = env().await;
    let (client, secret) = env.symmetric_client("system/*.rs").await;
    let access = env.token(&[("grant_type", "client_credentials")], &[basic(&client, &secret)]).await.json()
        ["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let again = env_on(env.dir, env.db.clone(), |_| {}).await;
    assert!(again.server.verify_bearer(&access).await.is_ok());
    assert_eq!(again.get("/auth/jwks", None).await.json()["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn external_issuer_tokens_are_accepted() {
    let idp_key = ClientKey::rs384("idp-1");
    let mut jwk = idp_key.jwk.clone();
    jwk["alg"] = json!("RS256");
    let (url, published) = serve_jwks(json!({"keys": [jwk]})).await;
    let env = env_with(|c| c.external = Some(ExternalIssuer::new("https://idp.example", url.clone()))).await;
    let sign = |kid: &str, claims: &Value, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    };
    let claims = json!({
        "iss": "https://idp.example", "aud": FHIR_BASE, "sub": "member-42", "azp": "portal",
        "exp": now() + 300, "iat": now(), "jti": "idp-token-1",
        "scp": ["patient/ExplanationOfBenefit.rs", "openid"],
        "fhirUser": format!("{FHIR_BASE}/Patient/pat-42"),
    });
    let token = sign("idp-1", &claims, &idp_key.encoding);
    let p = env.server.verify_bearer(&token).await.unwrap();
    assert_eq!(p.issuer, "https://idp.example");
    assert_eq!(p.client_id, "portal");
    assert_eq!(p.sub.as_deref(), Some("member-42"));
    assert_eq!(p.patient.as_deref(), Some("pat-42"), "patient from fhirUser");
    assert_eq!(p.fhir_user.as_deref(), Some("Patient/pat-42"));
    assert!(p.scopes.allows(Context::Patient, "ExplanationOfBenefit", Interaction::Read));

    // A scope string and a patient claim work too.
    let mut c2 = claims.clone();
    c2.as_object_mut().unwrap().remove("scp");
    c2.as_object_mut().unwrap().remove("fhirUser");
    c2["scope"] = json!("patient/Coverage.rs");
    c2["patient"] = json!("pat-43");
    let p = env.server.verify_bearer(&sign("idp-1", &c2, &idp_key.encoding)).await.unwrap();
    assert_eq!(p.patient.as_deref(), Some("pat-43"));
    assert!(p.scopes.allows(Context::Patient, "Coverage", Interaction::Search));

    // Wrong audience, expired, and an unknown issuer are refused.
    let mut bad = claims.clone();
    bad["aud"] = json!("https://elsewhere.example/fhir");
    assert!(env.server.verify_bearer(&sign("idp-1", &bad, &idp_key.encoding)).await.is_err());
    let mut bad = claims.clone();
    bad["exp"] = json!(now() - 100);
    assert!(env.server.verify_bearer(&sign("idp-1", &bad, &idp_key.encoding)).await.is_err());
    let mut bad = claims.clone();
    bad["iss"] = json!("https://rogue.example");
    assert!(env.server.verify_bearer(&sign("idp-1", &bad, &idp_key.encoding)).await.is_err());

    // The IdP rotates: a new kid is fetched on first sight.
    let key2 = ClientKey::es256("idp-2");
    published.lock().unwrap()["keys"].as_array_mut().unwrap().push(key2.jwk.clone());
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("idp-2".into());
    let t2 = jsonwebtoken::encode(&h, &claims, &key2.encoding).unwrap();
    assert!(env.server.verify_bearer(&t2).await.is_ok());
    // A kid the IdP never published.
    let stranger = ClientKey::es256("idp-3");
    h.kid = Some("idp-3".into());
    assert!(env.server.verify_bearer(&jsonwebtoken::encode(&h, &claims, &stranger.encoding).unwrap()).await.is_err());
    // The cached set still serves the known keys.
    assert!(env.server.verify_bearer(&token).await.is_ok());
}

#[tokio::test]
async fn admin_validates_registrations() {
    let env = env().await;
    let bad = |c: NewClient| {
        let db = env.db.clone();
        async move { admin::add_client(&db, c).await.unwrap_err() }
    };
    let base = NewClient {
        name: "X".into(),
        kind: ClientKind::Public,
        redirect_uris: vec![REDIRECT.into()],
        scope: "patient/*.rs".into(),
        ..Default::default()
    };
    bad(NewClient { name: " ".into(), ..base.clone() }).await;
    bad(NewClient { redirect_uris: vec!["/relative".into()], ..base.clone() }).await;
    bad(NewClient { redirect_uris: vec!["https://a.example/cb#frag".into()], ..base.clone() }).await;
    bad(NewClient { redirect_uris: vec![], ..base.clone() }).await;
    bad(NewClient { scope: "".into(), ..base.clone() }).await;
    bad(NewClient { scope: "patient/*.rs made-up".into(), ..base.clone() }).await;
    bad(NewClient { scope: "system/*.rs".into(), ..base.clone() }).await;
    bad(NewClient { kind: ClientKind::ConfidentialAsymmetric, ..base.clone() }).await;
    bad(NewClient { jwks_url: Some("https://x.example/jwks".into()), ..base.clone() }).await;
    let private = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "a", "y": "b", "d": "secret"}]});
    bad(NewClient { kind: ClientKind::ConfidentialAsymmetric, jwks: Some(private), ..base.clone() }).await;

    // Created clients serialize to one JSON object, the secret shown once.
    let created = admin::add_client(&env.db, NewClient { kind: ClientKind::ConfidentialSymmetric, ..base.clone() })
        .await
        .unwrap();
    let text = serde_json::to_string(&created).unwrap();
    assert_eq!(text.matches("\"client_id\"").count(), 1, "{text}");
    let v = serde_json::to_value(&created).unwrap();
    assert_eq!(v["client_id"], created.client_id.as_str());
    assert!(v["client_secret"].is_string());
    assert_eq!(v["kind"], "confidential-symmetric");
    assert_eq!(v["token_endpoint_auth_method"], "client_secret_basic");
    assert_eq!(v["redirect_uris"], json!([REDIRECT]));
    let listed = serde_json::to_value(admin::list_clients(&env.db).await.unwrap()).unwrap();
    assert!(listed[0].get("client_secret").is_none());
    use sqlx::Row;
    let stored: String =
        sqlx::query("SELECT secret_hash FROM auth_clients").fetch_one(&env.db.pool).await.unwrap().get(0);
    assert!(stored.starts_with("$argon2id$"));
    assert!(!stored.contains(created.client_secret.as_deref().unwrap()));

    // Members.
    let m = admin::add_member(&env.db, "ivy", PASSWORD, "Patient/p-9").await.unwrap();
    assert_eq!(m.patient, "Patient/p-9");
    assert_eq!(admin::add_member(&env.db, "ivan", PASSWORD, "p-10").await.unwrap().patient, "Patient/p-10");
    assert!(admin::add_member(&env.db, "ivy", PASSWORD, "p-11").await.is_err(), "usernames are unique");
    assert!(admin::add_member(&env.db, "jo", "short", "p-12").await.is_err());
    assert!(admin::add_member(&env.db, "jo", PASSWORD, "Patient/not an id").await.is_err());
}
