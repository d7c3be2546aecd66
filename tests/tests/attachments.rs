//! CDex attachments end to end, on both tiers: PAS `Claim/$submit` gives a tracking id;
//! `$submit-attachment` stores the bytes once, and the attachment-link projection ties them to
//! the case in either arrival order, exactly once, across restarts and replays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use payerx::Role;
use schemas::{topics, AttachmentEvent, AttachmentEventKind};
use serde_json::{json, Value};
use tests::{both_tiers, expression, Harness};

both_tiers!(
    pas_submit_answers_a_tracking_id,
    the_members_own_app_sees_their_prior_auth_documents_only,
    attachment_after_its_case_is_linked,
    attachment_before_its_case_is_held_then_linked_once_across_a_restart,
    final_false_accumulates_final_true_closes_and_duplicates_are_idempotent,
    line_items_and_mismatches_are_reported,
    replay_of_the_link_projection_gives_the_same_links,
    bad_submissions_get_operation_outcomes,
);

// Fetching by URL needs the allow-list (the document server is on loopback), plain http and
// short retries.
both_tiers!(with fetching:
    attachment_by_url_is_fetched_stored_and_linked,
    refused_and_unreachable_urls_are_rejected_with_the_reason,
);

fn fetching(args: &mut payerx::ServeArgs) {
    args.fetch.allow = vec!["127.0.0.1".parse().unwrap()];
    args.fetch.allow_http = true;
    args.fetch.retries = 2;
    args.fetch.retry_backoff_ms = 20;
    args.fetch.connect_timeout_secs = 2;
    args.fetch.timeout_secs = 10;
}

fn pas_bundle(identifier: &str, member: &str) -> Value {
    json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:claim", "resource": {"resourceType": "Claim", "status": "active",
            "identifier": [{"system": "urn:ehr:claims", "value": identifier}],
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
            "use": "preauthorization", "patient": {"reference": "Patient/p"}, "created": "2026-11-20",
            "insurer": {"reference": "Organization/ins"}, "provider": {"reference": "urn:uuid:prac"},
            "priority": {"coding": [{"code": "normal"}]},
            "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov"}}],
            "item": [{"sequence": 1, "productOrService": {"coding": [{"code": "E0250"}]}},
                     {"sequence": 2, "productOrService": {"coding": [{"code": "E0260"}]}}]}},
        {"fullUrl": "http://ehr/fhir/Patient/p", "resource": {"resourceType": "Patient", "id": "p",
            "identifier": [{"system": "urn:payer:member", "value": member}]}},
        {"fullUrl": "http://ehr/fhir/Coverage/cov", "resource": {"resourceType": "Coverage", "id": "cov", "status": "active",
            "subscriberId": member, "beneficiary": {"reference": "Patient/p"}, "payor": [{"reference": "Organization/ins"}]}},
        {"fullUrl": "urn:uuid:prac", "resource": {"resourceType": "Practitioner",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}},
        {"fullUrl": "http://ehr/fhir/Organization/ins", "resource": {"resourceType": "Organization", "id": "ins", "name": "Payer"}}
    ]})
}

/// A `$submit-attachment` Parameters with one PDF-ish document inline.
fn submission(tracking: &str, member: &str, bytes: &[u8], line_items: &[&str], is_final: Option<bool>) -> Value {
    let mut attachment =
        vec![json!({"name": "Content", "resource": {"resourceType": "DocumentReference", "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "content": [{"attachment": {"contentType": "application/pdf",
            "data": base64::engine::general_purpose::STANDARD.encode(bytes)}}]}})];
    for l in line_items {
        attachment.insert(0, json!({"name": "LineItem", "valueString": l}));
    }
    let mut p = vec![
        json!({"name": "TrackingId", "valueIdentifier": {"value": tracking}}),
        json!({"name": "AttachTo", "valueCode": "preauthorization"}),
        json!({"name": "ProviderId", "valueIdentifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}}),
        json!({"name": "MemberId", "valueIdentifier": {"value": member}}),
        json!({"name": "Attachment", "part": attachment}),
    ];
    if let Some(f) = is_final {
        p.push(json!({"name": "Final", "valueBoolean": f}));
    }
    json!({"resourceType": "Parameters", "parameter": p})
}

/// A `$submit-attachment` Parameters whose document is sent by `attachment.url`.
fn submission_by_url(tracking: &str, member: &str, url: &str) -> Value {
    let mut p = submission(tracking, member, b"", &[], Some(false));
    p["parameter"][4]["part"][0]["resource"]["content"][0]["attachment"] =
        json!({"contentType": "application/pdf", "url": url});
    p
}

/// A document server on loopback: `GET /doc.pdf` answers `body`. Returns its base URL.
async fn document_server(body: &'static [u8]) -> String {
    let app = axum::Router::new()
        .route("/doc.pdf", axum::routing::get(move || async move { ([("content-type", "application/pdf")], body) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Submits a PAS request; returns (Claim id, tracking id).
async fn prior_auth(h: &Harness, identifier: &str, member: &str) -> (String, String) {
    let r = h.post("/fhir/Claim/$submit", &pas_bundle(identifier, member)).await;
    assert_eq!(r.status(), 200);
    let bundle = tests::json(r).await;
    let response = &bundle["entry"][0]["resource"];
    assert_eq!(response["resourceType"], "ClaimResponse");
    assert_eq!(response["outcome"], "queued");
    let tracking = response["preAuthRef"].as_str().unwrap().to_string();
    let claim = response["request"]["reference"].as_str().unwrap().trim_start_matches("Claim/").to_string();
    (claim, tracking)
}

/// The case view's attachments, once `n` of them are there and none is still held (unless
/// `held` is expected).
async fn case_attachments(h: &Harness, claim: &str, n: usize, settled: bool) -> Vec<Value> {
    h.until("the case view shows the attachments", || {
        let claim = claim.to_string();
        async move {
            let (status, view) = h.get_json(&format!("/fhir/Claim/{claim}/$attachments")).await;
            if status != 200 {
                return None;
            }
            let items: Vec<Value> =
                view["parameter"].as_array().unwrap().iter().filter(|p| p["name"] == "attachment").cloned().collect();
            let held =
                items.iter().any(|i| part(i, "status") == json!("held") || part(i, "status") == json!("fetching"));
            (items.len() == n && (!settled || !held)).then_some(items)
        }
    })
    .await
}

fn part(item: &Value, name: &str) -> Value {
    item["part"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| {
            p.as_object()
                .unwrap()
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null)
}

/// A linked document's DocumentReference: written through the pipeline after the link, so
/// eventually readable.
async fn stored_doc(h: &Harness, doc_ref: &str) -> Value {
    h.until("the DocumentReference is stored", || async {
        let (status, doc) = h.get_json(&format!("/fhir/{doc_ref}")).await;
        (status == 200).then_some(doc)
    })
    .await
}

/// Every event on the attachments topic for `tracking`, in order.
async fn attachment_events(h: &Harness, tracking: &str) -> Vec<AttachmentEvent> {
    let topic = topics::full(&h.backend.topic_prefix, topics::ATTACHMENTS);
    let parts = h.app().log.partitions(&topic).await.unwrap();
    let mut c =
        h.app().log.assigned_consumer(&(0..parts).map(|p| (topic.clone(), p, 0)).collect::<Vec<_>>()).await.unwrap();
    let mut out = Vec::new();
    loop {
        let batch = c.poll(1000, Duration::from_millis(300)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        out.extend(batch.into_iter().filter(|r| r.key == tracking).map(|r| schemas::decode_event(&r.value).unwrap()));
    }
    out
}

async fn pas_submit_answers_a_tracking_id(h: Harness) {
    let (claim, tracking) = prior_auth(&h, "EHR-100", "M-100").await;
    let (status, stored) = h.get_json(&format!("/fhir/Claim/{claim}")).await;
    assert_eq!(status, 200);
    assert!(stored["identifier"].as_array().unwrap().iter().any(|i| i["value"] == tracking.as_str()));
    assert_eq!(stored["contained"].as_array().unwrap().len(), 4, "the provider's resources stay with the request");
    // A resubmission of the same provider claim keeps its tracking id.
    let (claim2, tracking2) = prior_auth(&h, "EHR-100", "M-100").await;
    assert_eq!((claim2, tracking2), (claim.clone(), tracking.clone()));
    // The case opens under the tracking id.
    h.eventually("the case is opened", || async {
        let events = attachment_events(&h, &tracking).await;
        events.iter().any(|e| e.kind == AttachmentEventKind::CaseOpened)
    })
    .await;
    // A tracking id with search syntax in it (a comma, a bar) is still matched literally.
    let odd = "T,ODD|1";
    let claim = json!({"resourceType": "Claim", "id": "odd-claim", "status": "active",
        "identifier": [{"system": "urn:payer:pa", "value": odd}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization", "patient": {"reference": "Patient/x", "identifier": {"value": "M-ODD"}},
        "created": "2026-11-20", "provider": {"reference": "Organization/prov"}, "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/c"}}]});
    assert_eq!(h.put("/fhir/Claim/odd-claim", &claim).await.status(), 201);
    let r = h.post("/fhir/$submit-attachment", &submission(odd, "M-ODD", b"odd", &[], None)).await;
    let said = tests::json(r).await["issue"][0]["diagnostics"].as_str().unwrap().to_string();
    assert!(said.contains("(Claim/odd-claim)"), "{said}");
    let r = h.post("/fhir/Claim/$submit", &json!({"resourceType": "Bundle", "type": "collection", "entry": []})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(expression(&tests::json(r).await), "Bundle.entry[0].resource");
    h.stop().await;
}

async fn attachment_after_its_case_is_linked(h: Harness) {
    let (claim, tracking) = prior_auth(&h, "EHR-200", "M-200").await;
    h.eventually("the case is opened", || async {
        attachment_events(&h, &tracking).await.iter().any(|e| e.kind == AttachmentEventKind::CaseOpened)
    })
    .await;
    let pdf = b"%PDF-1.4 discharge summary".to_vec();
    let r = h.post("/fhir/$submit-attachment", &submission(&tracking, "M-200", &pdf, &[], None)).await;
    assert_eq!(r.status(), 200);
    let oo = tests::json(r).await;
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(!oo.to_string().contains("held"), "{oo}");
    let items = case_attachments(&h, &claim, 1, true).await;
    assert_eq!(part(&items[0], "status"), "linked");
    let doc_ref = part(&items[0], "documentReference")["reference"].as_str().unwrap().to_string();
    let doc = stored_doc(&h, &doc_ref).await;
    assert_eq!(doc["context"]["related"][0]["reference"], format!("Claim/{claim}"));
    // The read side searches: the case by tracking id, its answer by request, its documents.
    let (_, found) = h.get_json(&format!("/fhir/Claim?identifier={tracking}")).await;
    assert_eq!(found["entry"][0]["resource"]["id"], claim.as_str(), "{found}");
    let (_, found) = h.get_json(&format!("/fhir/ClaimResponse?request=Claim/{claim}")).await;
    assert_eq!(found["entry"][0]["resource"]["preAuthRef"], tracking.as_str(), "{found}");
    let (_, found) = h.get_json(&format!("/fhir/DocumentReference?related=Claim/{claim}")).await;
    assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found["entry"][0]["resource"]["id"], doc["id"]);
    let url = doc["content"][0]["attachment"]["url"].as_str().unwrap().to_string();
    assert!(url.contains("/fhir/Binary/"), "{url}");
    assert_eq!(doc["content"][0]["attachment"]["size"], pdf.len());
    let r = h.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    assert_eq!(r.bytes().await.unwrap().to_vec(), pdf);
    h.stop().await;
}

async fn attachment_before_its_case_is_held_then_linked_once_across_a_restart(mut h: Harness) {
    let tracking = "T-EARLY-1";
    let r = h.post("/fhir/$submit-attachment", &submission(tracking, "M-300", b"early bytes", &["1"], None)).await;
    assert_eq!(r.status(), 200);
    let oo = tests::json(r).await;
    assert_eq!(oo["issue"][0]["severity"], "information");
    assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("held for association"), "{oo}");
    h.eventually("the attachment is held", || async {
        attachment_events(&h, tracking).await.iter().any(|e| e.kind == AttachmentEventKind::Held)
    })
    .await;
    h.restart(&[Role::Ingest, Role::Processors, Role::Projections]).await;
    // The case arrives through the payer feed: a Claim with the tracking id as identifier.
    let claim = json!({"resourceType": "Claim", "id": "feed-claim-1", "status": "active",
        "identifier": [{"system": "urn:payer:pa", "value": tracking}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization", "patient": {"reference": "Patient/m300", "identifier": {"value": "M-300"}},
        "created": "2026-11-20", "provider": {"reference": "Organization/prov"}, "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/c300"}}],
        "item": [{"sequence": 1, "productOrService": {"coding": [{"code": "E0250"}]}}]});
    assert_eq!(h.put("/fhir/Claim/feed-claim-1", &claim).await.status(), 201);
    let items = case_attachments(&h, "feed-claim-1", 1, true).await;
    assert_eq!(part(&items[0], "status"), "linked");
    h.restart(&[Role::Ingest, Role::Processors, Role::Projections]).await;
    // A Claim update re-opens the case; the link must not be made again.
    let mut claim2 = claim.clone();
    claim2["status"] = json!("active");
    claim2["created"] = json!("2026-11-21");
    assert_eq!(h.put("/fhir/Claim/feed-claim-1", &claim2).await.status(), 200);
    h.eventually("the second case event is seen", || async {
        let n =
            attachment_events(&h, tracking).await.iter().filter(|e| e.kind == AttachmentEventKind::CaseOpened).count();
        n == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = attachment_events(&h, tracking).await;
    let linked = events.iter().filter(|e| e.kind == AttachmentEventKind::Linked).count();
    assert_eq!(linked, 1, "linked exactly once: {:?}", events.iter().map(|e| e.kind).collect::<Vec<_>>());
    h.stop().await;
}

async fn final_false_then_true_and_duplicates(h: &Harness) -> (String, String) {
    let (claim, tracking) = prior_auth(h, "EHR-400", "M-400").await;
    for (bytes, fin) in [(&b"one"[..], Some(false)), (&b"one"[..], Some(false)), (&b"two"[..], Some(true))] {
        let r = h.post("/fhir/$submit-attachment", &submission(&tracking, "M-400", bytes, &[], fin)).await;
        assert_eq!(r.status(), 200);
        // Sent right after the PAS answer: the Claim is stored, so nothing is "held".
        let oo = tests::json(r).await;
        let said = oo["issue"][0]["diagnostics"].as_str().unwrap().to_string();
        assert!(said.contains(&format!("accepted for tracking id {tracking}")), "{said}");
    }
    (claim, tracking)
}

async fn final_false_accumulates_final_true_closes_and_duplicates_are_idempotent(h: Harness) {
    let (claim, tracking) = final_false_then_true_and_duplicates(&h).await;
    let items = case_attachments(&h, &claim, 3, true).await;
    let statuses: Vec<Value> = items.iter().map(|i| part(i, "status")).collect();
    assert_eq!(statuses, [json!("linked"), json!("duplicate"), json!("linked")]);
    assert_eq!(
        part(&items[0], "documentReference"),
        part(&items[1], "documentReference"),
        "no second DocumentReference"
    );
    // The set is closed: a later submission is refused at the door.
    let r = h.post("/fhir/$submit-attachment", &submission(&tracking, "M-400", b"three", &[], None)).await;
    assert_eq!(r.status(), 422);
    assert!(tests::json(r).await["issue"][0]["diagnostics"].as_str().unwrap().contains("closed"));
    h.stop().await;
}

async fn line_items_and_mismatches_are_reported(h: Harness) {
    let (claim, tracking) = prior_auth(&h, "EHR-500", "M-500").await;
    let r =
        h.post("/fhir/$submit-attachment", &submission(&tracking, "M-500", b"lines", &["2", "7"], Some(false))).await;
    assert_eq!(r.status(), 200);
    let r =
        h.post("/fhir/$submit-attachment", &submission(&tracking, "SOMEONE-ELSE", b"other", &[], Some(false))).await;
    assert_eq!(r.status(), 200);
    let items = case_attachments(&h, &claim, 2, true).await;
    assert_eq!(part(&items[0], "status"), "linked");
    assert_eq!(part(&items[0], "unknownLineItem"), "7");
    assert_eq!(part(&items[1], "status"), "rejected");
    assert!(part(&items[1], "reason").as_str().unwrap().contains("MemberId SOMEONE-ELSE"));
    h.stop().await;
}

async fn replay_of_the_link_projection_gives_the_same_links(h: Harness) {
    let (claim, _) = final_false_then_true_and_duplicates(&h).await;
    let before = case_attachments(&h, &claim, 3, true).await;
    let r = payerx::replay::replay(&h.backend, payerx::replay::ProjectionName::AttachmentLinks, true).await.unwrap();
    assert!(r.new_generation > r.old_generation);
    let after = case_attachments(&h, &claim, 3, true).await;
    assert_eq!(before, after);
    h.stop().await;
}

async fn bad_submissions_get_operation_outcomes(h: Harness) {
    let good = submission("T-BAD", "M-1", b"x", &[], None);
    // Method and media type.
    let r = h.get("/fhir/$submit-attachment").await;
    assert_eq!(r.status(), 405);
    assert_eq!(tests::json(r).await["resourceType"], "OperationOutcome");
    let r = h.client.put(h.url("/fhir/$submit-attachment")).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = h
        .client
        .post(h.url("/fhir/$submit-attachment"))
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = h
        .client
        .post(h.url("/fhir/$submit-attachment"))
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\": \"Parameters\", \"parameter\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(tests::json(r).await["issue"][0]["diagnostics"].as_str().unwrap().contains("not valid JSON"));
    let r = h.post("/fhir/$submit-attachment", &json!({"resourceType": "Patient"})).await;
    assert_eq!(r.status(), 400);
    // Invalid base64 names the element.
    let mut bad64 = good.clone();
    bad64["parameter"][4]["part"][0]["resource"]["content"][0]["attachment"]["data"] = json!("not*base64");
    let r = h.post("/fhir/$submit-attachment", &bad64).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        expression(&tests::json(r).await),
        "Parameters.parameter[4].part[0].resource.content[0].attachment.data"
    );
    // Size mismatch.
    let mut size = good.clone();
    size["parameter"][4]["part"][0]["resource"]["content"][0]["attachment"]["size"] = json!(99);
    let r = h.post("/fhir/$submit-attachment", &size).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        expression(&tests::json(r).await),
        "Parameters.parameter[4].part[0].resource.content[0].attachment.size"
    );
    // A missing required parameter (the rules themselves are unit-tested one by one).
    let mut no_member = good.clone();
    no_member["parameter"].as_array_mut().unwrap().remove(3);
    let r = h.post("/fhir/$submit-attachment", &no_member).await;
    assert_eq!(r.status(), 400);
    assert!(tests::json(r).await["issue"][0]["diagnostics"].as_str().unwrap().contains("MemberId"));
    // Nothing of the refused requests reached the log.
    assert!(attachment_events(&h, "T-BAD").await.is_empty());
    h.stop().await;
}

const REDIRECT: &str = "https://app.example/callback";

/// A PAS request for a member the payer knows lands on the payer's Patient, so the linked
/// document is in that member's compartment: their app reads it, another member's does not.
async fn the_members_own_app_sees_their_prior_auth_documents_only(h: Harness) {
    for (id, member) in [("m-ana", "M-600"), ("m-bo", "M-601")] {
        let p = json!({"resourceType": "Patient", "id": id, "identifier": [{"system": "urn:payer:member", "value": member}]});
        assert_eq!(h.put(&format!("/fhir/Patient/{id}"), &p).await.status(), 201);
    }
    let (claim, tracking) = prior_auth(&h, "EHR-600", "M-600").await;
    let (_, stored) = h.get_json(&format!("/fhir/Claim/{claim}")).await;
    assert_eq!(stored["patient"]["reference"], "Patient/m-ana", "the PAS member is resolved by identifier");
    let r = h.post("/fhir/$submit-attachment", &submission(&tracking, "M-600", b"ana's notes", &[], None)).await;
    assert_eq!(r.status(), 200);
    let items = case_attachments(&h, &claim, 1, true).await;
    let doc_ref = part(&items[0], "documentReference")["reference"].as_str().unwrap().to_string();
    let doc = stored_doc(&h, &doc_ref).await;
    assert_eq!(doc["subject"]["reference"], "Patient/m-ana");
    let (_, found) = h.get_json("/fhir/DocumentReference?patient=Patient/m-ana").await;
    assert_eq!(found["entry"][0]["resource"]["id"], doc["id"], "{found}");
    let binary = doc["content"][0]["attachment"]["url"].as_str().unwrap().to_string();

    let db = h.backend.open_db().await.unwrap();
    auth::admin::add_member(&db, "ana", "correct horse battery", "Patient/m-ana").await.unwrap();
    auth::admin::add_member(&db, "bo", "correct horse battery", "Patient/m-bo").await.unwrap();
    let scope = "launch/patient openid fhirUser patient/*.rs";
    let (app, _) = h.add_client("member-app", "public", scope, &[REDIRECT]).await;
    for (user, sees) in [("ana", true), ("bo", false)] {
        let token = tests::member_launch(&h, &app, REDIRECT, scope, user, "correct horse battery").await;
        let bearer = token["access_token"].as_str().unwrap();
        let r = reqwest::Client::new().get(&binary).bearer_auth(bearer).send().await.unwrap();
        if sees {
            assert_eq!(r.status(), 200);
            assert_eq!(r.bytes().await.unwrap().as_ref(), b"ana's notes");
        } else {
            assert_eq!(r.status(), 404, "another member's document is answered like an absent one");
        }
        let r =
            reqwest::Client::new().get(h.url(&format!("/fhir/{doc_ref}"))).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(r.status(), if sees { 200 } else { 404 });
    }
    h.stop().await;
}

async fn attachment_by_url_is_fetched_stored_and_linked(h: Harness) {
    const PDF: &[u8] = b"%PDF-1.4 operative report fetched by URL";
    let server = document_server(PDF).await;
    let (claim, tracking) = prior_auth(&h, "EHR-600", "M-600").await;
    let r =
        h.post("/fhir/$submit-attachment", &submission_by_url(&tracking, "M-600", &format!("{server}/doc.pdf"))).await;
    assert_eq!(r.status(), 200, "the request does not wait for the fetch");
    let items = case_attachments(&h, &claim, 1, true).await;
    assert_eq!(part(&items[0], "status"), "linked", "{items:?}");
    let doc_ref = part(&items[0], "documentReference")["reference"].as_str().unwrap().to_string();
    let doc = stored_doc(&h, &doc_ref).await;
    let attachment = &doc["content"][0]["attachment"];
    let url = attachment["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&h.url("/fhir/Binary/")), "points at payerx, not the EHR: {url}");
    assert_eq!(attachment["size"], PDF.len());
    let r = h.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    assert_eq!(r.bytes().await.unwrap().to_vec(), PDF);
    let kinds: Vec<AttachmentEventKind> = attachment_events(&h, &tracking).await.iter().map(|e| e.kind).collect();
    let pos = |k| kinds.iter().position(|x| *x == k).unwrap();
    assert!(pos(AttachmentEventKind::Submitted) < pos(AttachmentEventKind::Fetched));
    assert!(pos(AttachmentEventKind::Fetched) < pos(AttachmentEventKind::Linked), "{kinds:?}");
    h.stop().await;
}

async fn refused_and_unreachable_urls_are_rejected_with_the_reason(h: Harness) {
    let (claim, tracking) = prior_auth(&h, "EHR-700", "M-700").await;
    let closed = tests::free_port();
    let urls =
        ["file:///etc/passwd".to_string(), "http://10.255.255.1/x".to_string(), format!("http://127.0.0.1:{closed}/x")];
    for url in &urls {
        let r = h.post("/fhir/$submit-attachment", &submission_by_url(&tracking, "M-700", url)).await;
        assert_eq!(r.status(), 200);
    }
    let items = case_attachments(&h, &claim, 3, true).await;
    let reasons: Vec<String> = items
        .iter()
        .map(|i| {
            assert_eq!(part(i, "status"), "rejected", "{i}");
            part(i, "reason").as_str().unwrap().to_string()
        })
        .collect();
    // The case view lists items in arrival order.
    assert!(
        reasons[0].contains("file:///etc/passwd") && reasons[0].contains("refused by the fetch policy"),
        "{}",
        reasons[0]
    );
    assert!(reasons[0].contains("scheme 'file'"), "{}", reasons[0]);
    assert!(reasons[1].contains("10.255.255.1") && reasons[1].contains("private"), "{}", reasons[1]);
    assert!(reasons[1].contains("--attachment-fetch-allow"), "{}", reasons[1]);
    assert!(reasons[2].contains(&format!("127.0.0.1:{closed}")), "{}", reasons[2]);
    assert!(reasons[2].contains("connection failed") && reasons[2].contains("after 3 attempts"), "{}", reasons[2]);
    let events = attachment_events(&h, &tracking).await;
    let failed = events.iter().filter(|e| e.kind == AttachmentEventKind::FetchFailed).count();
    let rejected = events.iter().filter(|e| e.kind == AttachmentEventKind::Rejected).count();
    assert_eq!((failed, rejected), (3, 3), "never a silent drop");
    h.stop().await;
}
