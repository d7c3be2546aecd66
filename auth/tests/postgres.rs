//! The same flows on PostgreSQL (integration tier: `scripts/test-integration.sh` sets
//! `PAYERX_TEST_DATABASE_URL` to an admin URL; each test makes its own database).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use auth::{admin, ClientKind, Context, Interaction, NewClient};
use axum::http::StatusCode;
use common::*;
use projections::Db;

async fn pg_env() -> Env {
    let admin_url = std::env::var("PAYERX_TEST_DATABASE_URL")
        .expect("PAYERX_TEST_DATABASE_URL is not set: the integration tier runs through scripts/test-integration.sh");
    sqlx::any::install_default_drivers();
    let name = format!("payerx_auth_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = sqlx::AnyPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.unwrap();
    pool.close().await;
    let (head, _) = admin_url.rsplit_once('/').unwrap();
    let db = Db::connect(&format!("{head}/{name}"), 4).await.unwrap();
    env_on(tempfile::tempdir().unwrap(), db, |_| {}).await
}

#[tokio::test]
#[ignore = "integration tier: needs PostgreSQL; run scripts/test-integration.sh"]
async fn launch_refresh_revoke_and_backend_services_on_postgres() {
    let env = pg_env().await;
    // Tables and keys are created once; a second server on the same database reuses them.
    auth::init(&env.db).await.unwrap();
    let scopes = "launch/patient openid fhirUser offline_access patient/*.rs";
    let app = env.public_client(scopes).await;
    env.member("alice", "Patient/pg-1").await;

    // A failed login is counted; then the launch.
    let (page, cookie) = env.start(&app, scopes, &challenge(&new_verifier()), "s").await;
    assert!(env.login(&page, &cookie, "alice", "wrong password").await.body.contains("incorrect"));
    let t = env.tokens(&app, scopes, "alice").await;
    assert_eq!(t["patient"], "pg-1");
    let p = env.server.verify_bearer(t["access_token"].as_str().unwrap()).await.unwrap();
    assert!(p.scopes.allows(Context::Patient, "Coverage", Interaction::Read));

    // Rotation, reuse detection (revokes the family), revocation.
    let r1 = t["refresh_token"].as_str().unwrap().to_string();
    let refresh = |tok: String| {
        let env = &env;
        let app = app.clone();
        async move { env.token(&[("grant_type", "refresh_token"), ("refresh_token", &tok), ("client_id", &app)], &[]).await }
    };
    let t2 = refresh(r1.clone()).await.json();
    let a2 = t2["access_token"].as_str().unwrap().to_string();
    assert_eq!(refresh(r1).await.json()["error"], "invalid_grant");
    assert!(env.server.verify_bearer(&a2).await.is_err());
    let t3 = env.tokens(&app, scopes, "alice").await;
    let rv = env
        .post_form("/auth/revoke", &[("token", t3["access_token"].as_str().unwrap()), ("client_id", &app)], &[])
        .await;
    assert_eq!(rv.status, StatusCode::OK);
    assert!(env.server.verify_bearer(t3["access_token"].as_str().unwrap()).await.is_err());

    // Backend services with an ES384 assertion; replay refused.
    let key = ClientKey::es384("k1");
    let client = admin::add_client(
        &env.db,
        NewClient {
            name: "Payer B".into(),
            kind: ClientKind::ConfidentialAsymmetric,
            jwks: Some(key.jwks()),
            scope: "system/*.rs".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client_id;
    let assertion = key.assertion(&client);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
        ("client_assertion", assertion.as_str()),
    ];
    assert_eq!(env.token(&form, &[]).await.status, StatusCode::OK);
    assert_eq!(env.token(&form, &[]).await.json()["error"], "invalid_client");

    // Key rotation, listing, disabling, the sweep.
    let before = env.tokens(&app, scopes, "alice").await;
    env.server.rotate_keys().await.unwrap();
    assert!(env.server.verify_bearer(before["access_token"].as_str().unwrap()).await.is_ok());
    assert_eq!(admin::list_clients(&env.db).await.unwrap().len(), 2);
    admin::disable_client(&env.db, &app).await.unwrap();
    assert!(env.server.verify_bearer(before["access_token"].as_str().unwrap()).await.is_err());
    env.server.sweep_expired().await.unwrap();
}
