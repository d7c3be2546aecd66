//! SMART on FHIR, end to end on both tiers: discovery, the 401/403 answers, a member's
//! standalone launch seeing only their own compartment on every read path, backend scopes,
//! and the audit trail on payerx.audit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json as j;
use serde_json::Value;
use tests::{both_tiers, json, member_launch, patient, Harness};

both_tiers!(
    discovery_and_challenges,
    member_sees_only_their_compartment,
    backend_scopes_limit_types_and_writes,
    accesses_are_audited
);

const REDIRECT: &str = "https://app.example/callback";

async fn discovery_and_challenges(h: Harness) {
    let anon = reqwest::Client::new();
    // Open: metadata and discovery.
    let cs: Value = anon.get(h.url("/fhir/metadata")).send().await.unwrap().json().await.unwrap();
    let ext = &cs["rest"][0]["security"]["extension"][0];
    assert_eq!(ext["url"], "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris");
    let uris: Vec<&str> = ext["extension"].as_array().unwrap().iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert_eq!(uris, ["token", "authorize", "introspect", "revoke"]);
    let r =
        anon.get(h.url("/fhir/.well-known/smart-configuration")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let smart: Value = r.json().await.unwrap();
    assert_eq!(smart["code_challenge_methods_supported"], j!(["S256"]));
    for key in [
        "issuer",
        "jwks_uri",
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
    ] {
        assert!(smart[key].as_str().unwrap().starts_with("http://127.0.0.1:"), "{key} is absolute");
    }
    let caps: Vec<&str> = smart["capabilities"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    for c in [
        "launch-standalone",
        "client-confidential-asymmetric",
        "context-standalone-patient",
        "permission-v2",
        "sso-openid-connect",
    ] {
        assert!(caps.contains(&c), "{c}");
    }
    // Everything else needs a token: 401 with a Bearer challenge and an OperationOutcome.
    for r in [
        anon.get(h.url("/fhir/Patient/x")).send().await.unwrap(),
        anon.get(h.url("/fhir/Patient/x")).bearer_auth("not-a-jwt").send().await.unwrap(),
        anon.put(h.url("/fhir/Patient/x"))
            .header("content-type", "application/fhir+json")
            .body(patient("x", "A").to_string())
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        assert_eq!(json(r).await["resourceType"], "OperationOutcome");
    }
    assert_eq!(anon.get(h.url("/healthz")).send().await.unwrap().status(), 200);
    h.stop().await;
}

/// m1's and m2's data, an organization, and member alice → Patient/m1.
async fn seed_members(h: &Harness) {
    for (id, name) in [("m1", "Alice"), ("m2", "Bob")] {
        assert_eq!(h.put(&format!("/fhir/Patient/{id}"), &patient(id, name)).await.status(), 201);
    }
    assert_eq!(
        h.put("/fhir/Organization/payer", &j!({"resourceType": "Organization", "id": "payer", "name": "Payer"}))
            .await
            .status(),
        201
    );
    for (id, pid) in [("e1", "m1"), ("e2", "m2")] {
        let eob = j!({"resourceType": "ExplanationOfBenefit", "id": id, "status": "active",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
            "use": "claim", "patient": {"reference": format!("Patient/{pid}")}, "created": "2026-01-02",
            "insurer": {"reference": "Organization/payer"}, "provider": {"reference": "Organization/payer"}, "outcome": "complete",
            "insurance": [{"focal": true, "coverage": {"reference": format!("Coverage/c-{pid}")}}]});
        assert_eq!(h.put(&format!("/fhir/ExplanationOfBenefit/{id}"), &eob).await.status(), 201);
        let cov = j!({"resourceType": "Coverage", "id": format!("c-{pid}"), "status": "active",
            "beneficiary": {"reference": format!("Patient/{pid}")}, "payor": [{"reference": "Organization/payer"}]});
        assert_eq!(h.put(&format!("/fhir/Coverage/c-{pid}"), &cov).await.status(), 201);
    }
    // A second version of m2's EOB, so history and vread have something to leak.
    let (_, mut e2) = h.get_json("/fhir/ExplanationOfBenefit/e2").await;
    e2["outcome"] = j!("partial");
    assert_eq!(h.put("/fhir/ExplanationOfBenefit/e2", &e2).await.status(), 200);
    let db = h.backend.open_db().await.unwrap();
    auth::admin::add_member(&db, "alice", "correct horse battery", "Patient/m1").await.unwrap();
}

async fn member_sees_only_their_compartment(h: Harness) {
    seed_members(&h).await;
    let (app, _) = h
        .add_client("member-app", "public", "launch/patient openid fhirUser offline_access patient/*.rs", &[REDIRECT])
        .await;
    let token = member_launch(
        &h,
        &app,
        REDIRECT,
        "launch/patient openid fhirUser offline_access patient/*.rs",
        "alice",
        "correct horse battery",
    )
    .await;
    assert_eq!(token["patient"], "m1");
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["refresh_token"].is_string() && token["id_token"].is_string());
    let bearer = token["access_token"].as_str().unwrap().to_string();
    let c = reqwest::Client::new();
    let get = |path: &str| c.get(h.url(path)).bearer_auth(&bearer).send();

    for ok in [
        "/fhir/Patient/m1",
        "/fhir/ExplanationOfBenefit/e1",
        "/fhir/Coverage/c-m1",
        "/fhir/Organization/payer",
        "/fhir/ExplanationOfBenefit/e1/_history",
        "/fhir/ExplanationOfBenefit/e1/_history/1",
        "/fhir/Patient/m1/_history",
    ] {
        assert_eq!(get(ok).await.unwrap().status(), 200, "{ok}");
    }
    // Another member's data, by every read path: answered as if it did not exist.
    for hidden in [
        "/fhir/Patient/m2",
        "/fhir/ExplanationOfBenefit/e2",
        "/fhir/Coverage/c-m2",
        "/fhir/ExplanationOfBenefit/e2/_history",
        "/fhir/ExplanationOfBenefit/e2/_history/1",
        "/fhir/ExplanationOfBenefit/e2/_history/2",
        "/fhir/Patient/m2/_history",
    ] {
        let r = get(hidden).await.unwrap();
        assert_eq!(r.status(), 404, "{hidden}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("Bob") && !body.contains("partial"), "{hidden} leaked: {body}");
    }
    // A member's app cannot feed data: writes need system scopes.
    let r = c
        .put(h.url("/fhir/Patient/m1"))
        .bearer_auth(&bearer)
        .header("content-type", "application/fhir+json")
        .body(patient("m1", "Mallory").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await["issue"][0]["code"], "forbidden");
    let batch = j!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "PUT", "url": "Patient/m1"}, "resource": patient("m1", "Mallory")}]});
    let r = c
        .post(h.url("/fhir"))
        .bearer_auth(&bearer)
        .header("content-type", "application/fhir+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["entry"][0]["response"]["status"], "403");
    assert_eq!(h.get_json("/fhir/Patient/m1").await.1["name"][0]["given"][0], "Ana", "nothing was written");

    // SMART v2 granular type scope: only EOBs.
    let (eob_app, _) =
        h.add_client("eob-app", "public", "launch/patient patient/ExplanationOfBenefit.rs", &[REDIRECT]).await;
    let narrow = member_launch(
        &h,
        &eob_app,
        REDIRECT,
        "launch/patient patient/ExplanationOfBenefit.rs",
        "alice",
        "correct horse battery",
    )
    .await;
    let narrow = narrow["access_token"].as_str().unwrap();
    assert_eq!(c.get(h.url("/fhir/ExplanationOfBenefit/e1")).bearer_auth(narrow).send().await.unwrap().status(), 200);
    assert_eq!(c.get(h.url("/fhir/Coverage/c-m1")).bearer_auth(narrow).send().await.unwrap().status(), 403);
    h.stop().await;
}

async fn backend_scopes_limit_types_and_writes(h: Harness) {
    assert_eq!(h.put("/fhir/Patient/b1", &patient("b1", "Backend")).await.status(), 201);
    // SMART v1 read-only system scope for one type.
    let (id, secret) = h.add_client("reader", "confidential-symmetric", "system/Patient.read", &[]).await;
    let token = h.client_credentials(&id, &secret, "system/Patient.read").await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(h.url("/fhir/Patient/b1")).bearer_auth(&token).send().await.unwrap().status(), 200);
    assert_eq!(c.get(h.url("/fhir/Coverage/x")).bearer_auth(&token).send().await.unwrap().status(), 403);
    let r = c
        .put(h.url("/fhir/Patient/b1"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(patient("b1", "Changed").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // v2 create/update only: may write Coverage, not delete it.
    let (id, secret) = h.add_client("writer", "confidential-symmetric", "system/Coverage.cu", &[]).await;
    let token = h.client_credentials(&id, &secret, "system/Coverage.cu").await;
    let cov = j!({"resourceType": "Coverage", "id": "cv", "status": "active", "beneficiary": {"reference": "Patient/b1"}, "payor": [{"reference": "Organization/o"}]});
    let r = c
        .put(h.url("/fhir/Coverage/cv"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(cov.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(c.delete(h.url("/fhir/Coverage/cv")).bearer_auth(&token).send().await.unwrap().status(), 403);
    h.stop().await;
}

async fn accesses_are_audited(h: Harness) {
    assert_eq!(h.put("/fhir/Patient/a1", &patient("a1", "Audited")).await.status(), 201);
    assert_eq!(h.get("/fhir/Patient/a1").await.status(), 200);
    assert_eq!(reqwest::Client::new().get(h.url("/fhir/Patient/a1")).send().await.unwrap().status(), 401);
    let topic = schemas::topics::full(&h.backend.topic_prefix, schemas::topics::AUDIT);
    let log = h.app().log.clone();
    let parts = log.partitions(&topic).await.unwrap();
    let mut consumer =
        log.assigned_consumer(&(0..parts).map(|p| (topic.clone(), p, 0)).collect::<Vec<_>>()).await.unwrap();
    let mut events: Vec<schemas::AuditRecorded> = vec![];
    for _ in 0..100 {
        for r in consumer.poll(100, Duration::from_millis(100)).await.unwrap() {
            events.push(schemas::decode_event(&r.value).unwrap());
        }
        let has = |action: &str, ok: bool| {
            events.iter().any(|e| e.action == action && (e.outcome == schemas::AuditOutcome::Success) == ok)
        };
        if has("token.issued", true)
            && has("fhir.read", true)
            && has("fhir.update", true)
            && has("access.denied", false)
        {
            break;
        }
    }
    let read = events.iter().find(|e| e.action == "fhir.read").expect("the read is audited");
    assert_eq!(read.resource_type.as_deref(), Some("Patient"));
    assert_eq!(read.resource_id.as_deref(), Some("a1"));
    assert_eq!(read.http_status, Some(200));
    assert!(read.client_id.is_some() && read.scope.as_deref() == Some("system/*.*"), "{read:?}");
    assert_eq!(read.request.as_deref(), Some("GET /fhir/Patient/a1"));
    let denied = events.iter().find(|e| e.action == "access.denied").expect("the refusal is audited");
    assert_eq!(denied.http_status, Some(401));
    assert!(
        events.iter().any(|e| e.action == "token.issued" && e.client_id == read.client_id),
        "the token grant is audited"
    );
    h.stop().await;
}

/// `--insecure-no-auth` opens the API (and says so in the CapabilityStatement); without it the
/// same request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insecure_mode_is_opt_in() {
    let open = Harness::start_with(tests::Tier::Embedded, |a| a.insecure_no_auth = true).await;
    assert!(open.token.is_none(), "no authorization server, no token");
    assert_eq!(open.put("/fhir/Patient/o1", &patient("o1", "Open")).await.status(), 201);
    assert_eq!(open.get("/fhir/Patient/o1").await.status(), 200);
    let cs = open.get_json("/fhir/metadata").await.1;
    assert!(cs["rest"][0]["security"]["description"].as_str().unwrap().contains("WITHOUT authorization"));
    assert_eq!(open.get("/fhir/.well-known/smart-configuration").await.status(), 404);
    open.stop().await;
    let closed = Harness::start(tests::Tier::Embedded).await;
    assert_eq!(reqwest::Client::new().get(closed.url("/fhir/Patient/o1")).send().await.unwrap().status(), 401);
    closed.stop().await;
}
