//! The payer feed, end to end, on both tiers: feed, read, history, delete, batch with one bad
//! entry, transaction all-or-nothing, replay, dead letters, write status, bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use payerx::Role;
use runtime::Record;
use schemas::topics::{self, headers};
use schemas::{ChangeAction, Envelope, ResourceChange, ResourceChanged, WriteMode};
use tests::{both_tiers, expression, json, patient, Harness};

both_tiers!(
    feed_read_history_delete,
    batch_with_one_bad_entry,
    transaction_is_all_or_nothing,
    stale_if_match_is_refused,
    replay_yields_the_identical_view,
    dead_letters_reach_the_submitter,
    slow_view_answers_202_then_status,
    bad_input_gets_operation_outcomes,
);

async fn feed_read_history_delete(h: Harness) {
    let r = h.put("/fhir/Patient/p1", &patient("p1", "Lopez")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    assert!(r.headers()["location"].to_str().unwrap().ends_with("/fhir/Patient/p1/_history/1"));
    let created = json(r).await;
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(created["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));

    // Read-your-write: the answer came after the view had it.
    let (status, read) = h.get_json("/fhir/Patient/p1").await;
    assert_eq!(status, 200);
    assert_eq!(read, created);

    let r = h.put("/fhir/Patient/p1", &patient("p1", "Lopez-Garcia")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    let (_, v1) = h.get_json("/fhir/Patient/p1/_history/1").await;
    assert_eq!(v1["name"][0]["family"], "Lopez");
    let (_, v2) = h.get_json("/fhir/Patient/p1/_history/2").await;
    assert_eq!(v2["name"][0]["family"], "Lopez-Garcia");

    // POST assigns the id.
    let r = h
        .post(
            "/fhir/Coverage",
            &serde_json::json!({"resourceType": "Coverage", "status": "active",
        "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/payer"}]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let cov = json(r).await;
    let id = cov["id"].as_str().unwrap();
    assert!(location.contains(&format!("/fhir/Coverage/{id}/_history/1")));
    assert_eq!(h.get(&format!("/fhir/Coverage/{id}")).await.status(), 200);

    let r = h.client.delete(h.url("/fhir/Patient/p1")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, oo) = h.get_json("/fhir/Patient/p1").await;
    assert_eq!(status, 410);
    assert_eq!(oo["resourceType"], "OperationOutcome");
    // Deleting again changes nothing; the history keeps every version, newest first.
    assert_eq!(h.client.delete(h.url("/fhir/Patient/p1")).send().await.unwrap().status(), 204);
    let (status, hist) = h.get_json("/fhir/Patient/p1/_history").await;
    assert_eq!(status, 200);
    assert_eq!(hist["type"], "history");
    let etags: Vec<&str> =
        hist["entry"].as_array().unwrap().iter().map(|e| e["response"]["etag"].as_str().unwrap()).collect();
    assert_eq!(etags, ["W/\"3\"", "W/\"2\"", "W/\"1\""]);
    assert_eq!(hist["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(hist["entry"][2]["request"]["method"], "PUT", "version 1 was made by a PUT");
    assert_eq!(hist["entry"][2]["response"]["status"], "201");

    // History pages with _count and a next link that neither drops nor repeats a version.
    let (_, page1) = h.get_json("/fhir/Patient/p1/_history?_count=2").await;
    assert_eq!(page1["entry"].as_array().unwrap().len(), 2);
    let next = page1["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let path = &next[next.find("/fhir").unwrap()..];
    let (_, page2) = h.get_json(path).await;
    assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
    assert_eq!(page2["entry"][0]["response"]["etag"], "W/\"1\"");

    assert_eq!(h.get("/fhir/Patient/never").await.status(), 404);
    assert_eq!(h.get("/fhir/Patient/p1/_history/9").await.status(), 404);
    h.stop().await;
}

async fn batch_with_one_bad_entry(h: Harness) {
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "PUT", "url": "Patient/b1"}, "resource": patient("b1", "One")},
        {"request": {"method": "PUT", "url": "Patient/b2"}, "resource": {"resourceType": "Patient", "id": "b2", "birthDate": "not-a-date"}},
        {"request": {"method": "POST", "url": "Organization"}, "resource": {"resourceType": "Organization", "name": "Payer"}},
    ]});
    let r = h.post("/fhir", &bundle).await;
    assert_eq!(r.status(), 200);
    let resp = json(r).await;
    assert_eq!(resp["type"], "batch-response");
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(e[0]["response"]["status"], "201");
    assert_eq!(e[1]["response"]["status"], "400");
    assert_eq!(expression(&e[1]["response"]["outcome"]), "Bundle.entry[1].resource.birthDate");
    assert_eq!(e[2]["response"]["status"], "201");
    assert_eq!(h.get("/fhir/Patient/b1").await.status(), 200);
    assert_eq!(h.get("/fhir/Patient/b2").await.status(), 404);
    h.stop().await;
}

async fn transaction_is_all_or_nothing(h: Harness) {
    // One bad entry: 400 naming it, and nothing written.
    let bad = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/t1"}, "resource": patient("t1", "One")},
        {"request": {"method": "PUT", "url": "Patient/t2"}, "resource": {"resourceType": "Patient", "id": "t2", "active": "yes"}},
    ]});
    let r = h.post("/fhir", &bad).await;
    assert_eq!(r.status(), 400);
    assert_eq!(expression(&json(r).await), "Bundle.entry[1].resource.active");
    assert_eq!(h.get("/fhir/Patient/t1").await.status(), 404);

    // A good one: every entry applied, urn:uuid references resolved to the assigned ids.
    let good = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "name": [{"family": "New"}]}},
        {"request": {"method": "PUT", "url": "Coverage/c1"}, "resource": {"resourceType": "Coverage", "id": "c1", "status": "active",
         "beneficiary": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}, "payor": [{"reference": "Organization/o1"}]}},
    ]});
    let r = h.post("/fhir", &good).await;
    assert_eq!(r.status(), 200);
    let resp = json(r).await;
    assert_eq!(resp["type"], "transaction-response");
    let loc = resp["entry"][0]["response"]["location"].as_str().unwrap();
    let pid = loc.split("/Patient/").nth(1).unwrap().split('/').next().unwrap().to_string();
    let (_, cov) = h.get_json("/fhir/Coverage/c1").await;
    assert_eq!(cov["beneficiary"]["reference"], format!("Patient/{pid}"));
    assert_eq!(h.get(&format!("/fhir/Patient/{pid}")).await.status(), 200);

    // A stale If-Match inside a transaction refuses the whole transaction at apply time.
    let stale = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/t3"}, "resource": patient("t3", "Three")},
        {"request": {"method": "PUT", "url": "Coverage/c1", "ifMatch": "W/\"7\""}, "resource": {"resourceType": "Coverage", "id": "c1",
         "status": "cancelled", "beneficiary": {"reference": "Patient/x"}, "payor": [{"reference": "Organization/o1"}]}},
    ]});
    let r = h.post("/fhir", &stale).await;
    assert_eq!(r.status(), 412);
    assert_eq!(json(r).await["resourceType"], "OperationOutcome");
    assert_eq!(h.get("/fhir/Patient/t3").await.status(), 404, "nothing of a refused transaction is applied");
    assert_eq!(h.get_json("/fhir/Coverage/c1").await.1["status"], "active");
    h.stop().await;
}

async fn stale_if_match_is_refused(h: Harness) {
    assert_eq!(h.put("/fhir/Patient/m1", &patient("m1", "A")).await.status(), 201);
    let r = h
        .client
        .put(h.url("/fhir/Patient/m1"))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(patient("m1", "B").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .client
        .put(h.url("/fhir/Patient/m1"))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(patient("m1", "C").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let oo = json(r).await;
    assert_eq!(oo["issue"][0]["code"], "conflict");
    assert_eq!(h.get_json("/fhir/Patient/m1").await.1["name"][0]["family"], "B");
    h.stop().await;
}

async fn replay_yields_the_identical_view(mut h: Harness) {
    for i in 0..30 {
        let id = format!("r{}", i % 10);
        assert!(h.put(&format!("/fhir/Patient/{id}"), &patient(&id, &format!("F{i}"))).await.status().is_success());
    }
    assert_eq!(h.client.delete(h.url("/fhir/Patient/r3")).send().await.unwrap().status(), 204);
    let before = h.app().store().snapshot().await.unwrap();
    assert_eq!(before.len(), 10);
    let report = payerx::replay::replay(&h.backend, payerx::replay::ProjectionName::Resources, true).await.unwrap();
    assert_eq!(report.new_generation, report.old_generation + 1);
    h.eventually("the running app serves the new generation", || async {
        h.app().store().snapshot().await.map(|s| s == before).unwrap_or(false)
    })
    .await;
    assert_eq!(h.app().store().snapshot().await.unwrap(), before);
    // The live worker follows the swap: new writes land in the new generation.
    assert_eq!(h.put("/fhir/Patient/after", &patient("after", "Z")).await.status(), 201);
    assert_eq!(h.get_json("/fhir/Patient/r9/_history/3").await.1["name"][0]["family"], "F29");
    h.restart(&[Role::Ingest, Role::Processors, Role::Projections]).await;
    assert_eq!(h.get("/fhir/Patient/after").await.status(), 200);
    h.stop().await;
}

async fn dead_letters_reach_the_submitter(h: Harness) {
    // A producer that bypasses the API and puts a malformed resource on the submissions topic.
    let ev = ResourceChanged {
        envelope: Envelope::new(ResourceChanged::EVENT_TYPE, 1, "direct".into(), Some("payer-etl".into())),
        mode: WriteMode::Single,
        changes: vec![ResourceChange {
            action: ChangeAction::Upsert,
            resource_type: "Patient".into(),
            resource_id: "d1".into(),
            resource: Some(r#"{"resourceType":"Patient","id":"d1","gender":42}"#.into()),
            if_match: None,
            created: false,
        }],
    };
    let event_id = ev.envelope.event_id.clone();
    let topic = topics::full(&h.backend.topic_prefix, topics::FHIR_SUBMISSIONS);
    h.app().log.append(vec![Record::new(topic, ev.key(), schemas::encode_event(&ev).unwrap())]).await.unwrap();
    // Also an undecodable record: dead-lettered, and the pipeline keeps going.
    let topic = topics::full(&h.backend.topic_prefix, topics::FHIR_SUBMISSIONS);
    h.app().log.append(vec![Record::new(topic, "junk", b"not avro".to_vec())]).await.unwrap();

    let status_path = format!("/fhir/_writes/{event_id}");
    h.eventually("the refusal is recorded", || async { h.get(&status_path).await.status() != 202 }).await;
    let (status, oo) = h.get_json(&status_path).await;
    assert_eq!(status, 200);
    assert_eq!(expression(&oo), "Patient.gender");

    let dlq = topics::full(&h.backend.topic_prefix, topics::VALIDATE_DLQ);
    let parts = h.app().log.partitions(&dlq).await.unwrap();
    let mut consumer =
        h.app().log.assigned_consumer(&(0..parts).map(|p| (dlq.clone(), p, 0)).collect::<Vec<_>>()).await.unwrap();
    let mut got = vec![];
    for _ in 0..100 {
        got.extend(consumer.poll(10, Duration::from_millis(200)).await.unwrap());
        if got.len() >= 2 {
            break;
        }
    }
    assert_eq!(got.len(), 2, "both bad records are dead-lettered");
    let reasons: Vec<&str> = got.iter().map(|r| r.header(headers::ERROR_REASON).unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("Patient.gender")), "{reasons:?}");
    assert!(got.iter().all(|r| r.header(headers::ERROR_STAGE) == Some("validate")));
    assert_eq!(h.get("/fhir/Patient/d1").await.status(), 404);
    // The pipeline is not blocked by them.
    assert_eq!(h.put("/fhir/Patient/d2", &patient("d2", "Fine")).await.status(), 201);
    h.stop().await;
}

async fn slow_view_answers_202_then_status(h: Harness) {
    // Only ingest runs, with a short wait: the write is durable but not yet visible.
    let mut h = h;
    h.restart(&[Role::Ingest]).await;
    let r = h.put("/fhir/Patient/s1", &patient("s1", "Slow")).await;
    assert_eq!(r.status(), 202);
    let status_url = r.headers()["content-location"].to_str().unwrap().to_string();
    assert!(status_url.contains("/fhir/_writes/"));
    let path = &status_url[status_url.find("/fhir").unwrap()..];
    assert_eq!(h.get(path).await.status(), 202);
    // Processors and projections come up: the write is applied, the status link says so.
    h.restart(&[Role::Ingest, Role::Processors, Role::Projections]).await;
    let path = path.to_string();
    h.eventually("the write is applied", || async { h.get(&path).await.status() == 200 }).await;
    assert_eq!(h.get("/fhir/Patient/s1").await.status(), 200);
    h.stop().await;
}

async fn bad_input_gets_operation_outcomes(h: Harness) {
    let send = |method: reqwest::Method, path: &str, ctype: &str, body: String| {
        h.client.request(method, h.url(path)).header("content-type", ctype).body(body).send()
    };
    let check = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status(), status);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/fhir+json"));
        let oo = r.json::<serde_json::Value>().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        oo
    };
    check(
        send(reqwest::Method::PUT, "/fhir/Patient/x", "text/plain", patient("x", "A").to_string()).await.unwrap(),
        415,
    )
    .await;
    let oo = check(
        send(reqwest::Method::PUT, "/fhir/Patient/x", "application/fhir+json", "{\"resourceType\":".into())
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(oo["issue"][0]["code"], "structure");
    check(send(reqwest::Method::PUT, "/fhir/Patience/x", "application/fhir+json", "{}".into()).await.unwrap(), 404)
        .await;
    let oo = check(
        send(reqwest::Method::PUT, "/fhir/Patient/bad$id", "application/fhir+json", "{}".into()).await.unwrap(),
        400,
    )
    .await;
    assert_eq!(expression(&oo), "Patient.id");
    let oo = check(h.put("/fhir/Patient/x", &patient("y", "A")).await, 400).await;
    assert_eq!(expression(&oo), "Patient.id");
    let oo = check(
        h.put("/fhir/Patient/x", &serde_json::json!({"resourceType": "Patient", "id": "x", "foo": 1})).await,
        400,
    )
    .await;
    assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("foo"));
    check(h.post("/fhir", &serde_json::json!({"resourceType": "Bundle", "type": "collection"})).await, 400).await;
    check(h.post("/fhir", &patient("x", "A")).await, 400).await;
    let oo = check(h.client.patch(h.url("/fhir/Patient/x")).send().await.unwrap(), 405).await;
    assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("/fhir/Patient/x"), "{oo}");
    let r = h
        .client
        .post(h.url("/fhir/Patient"))
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", "identifier=x|1")
        .body(patient("x", "A").to_string())
        .send()
        .await
        .unwrap();
    let oo = check(r, 400).await;
    assert_eq!(oo["issue"][0]["code"], "not-supported");
    check(h.get("/fhir/Patient/x/_history?_count=0").await, 400).await;
    // Too large: refused from the headers alone, before any of the body is read.
    let (status, body) = tests::raw_request(&h.url(""), &format!("PUT /fhir/Patient/x HTTP/1.1\r\nhost: x\r\n{}content-type: application/fhir+json\r\ncontent-length: 17000000\r\n\r\n{{", h.auth_line())).await;
    assert_eq!(status, 413);
    assert!(body.contains("OperationOutcome") && body.contains("too-long"), "{body}");
    // Without a Content-Length (chunked), the limit is enforced while reading.
    let size = 17 * 1024 * 1024;
    let chunked = format!("PUT /fhir/Patient/x HTTP/1.1\r\nhost: x\r\n{}content-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n{size:x}\r\n{}", h.auth_line(), "a".repeat(size));
    let (status, body) = tests::raw_request(&h.url(""), &chunked).await;
    assert_eq!(status, 413);
    assert!(body.contains("OperationOutcome"), "{body}");
    // Nothing of the above was written.
    assert_eq!(h.get("/fhir/Patient/x").await.status(), 404);

    let (status, cs) = h.get_json("/fhir/metadata").await;
    assert_eq!(status, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let patient_cs = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap();
    let codes: Vec<&str> =
        patient_cs["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["read", "vread", "history-instance", "update", "create", "delete", "search-type"]);
    assert_eq!(h.get("/healthz").await.status(), 200);
    assert_eq!(h.get("/readyz").await.status(), 200);
    assert_eq!(h.put("/fhir/Patient/ok", &patient("ok", "A")).await.status(), 201);
    // Metrics live on the admin listener only.
    assert_eq!(h.get("/metrics").await.status(), 404);
    let admin = format!("http://{}", h.app().admin_addr);
    assert_eq!(h.client.get(format!("{admin}/readyz")).send().await.unwrap().status(), 200);
    let metrics = h.client.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("payerx_http_request_duration_seconds"), "{metrics}");
    assert!(metrics.contains("payerx_events_appended_total"));
    h.stop().await;
}

/// Processes starting together on a fresh database (ingest, projections, replay) all set up
/// the views; none of them may fail because another got there first.
async fn concurrent_setup_on_a_fresh_database(tier: tests::Tier) {
    let dir = tempfile::tempdir().unwrap();
    let b = tests::backend(tier, dir.path()).await;
    let db = b.open_db().await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (db, prefix) = (db.clone(), b.topic_prefix.clone());
            tokio::spawn(async move { projections::ResourceStore::new(db, &prefix).count("Patient").await })
        })
        .collect();
    let auth_tasks: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { auth::init(&db).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 0);
    }
    for t in auth_tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_setup_on_a_fresh_database_embedded() {
    concurrent_setup_on_a_fresh_database(tests::Tier::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "integration tier: needs Kafka + PostgreSQL; run scripts/test-integration.sh"]
async fn concurrent_setup_on_a_fresh_database_kafka_postgres() {
    concurrent_setup_on_a_fresh_database(tests::Tier::KafkaPostgres).await
}
