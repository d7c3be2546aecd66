//! The event contract, checked from outside payerx: a Python consumer with fastavro decodes the
//! events of a real pipeline run from the `.avsc` files and `registry.json` alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use schemas::topics;
use tests::{patient, Harness, Tier};

/// Decodes record values with `tests/external/decode_events.py` (fastavro and the `.avsc` files).
fn decode_in_python(values: &[Vec<u8>]) -> Vec<serde_json::Value> {
    let mut py = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/external/decode_events.py"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/avro"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        let mut stdin = py.stdin.take().unwrap();
        for v in values {
            writeln!(stdin, "{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
        }
    }
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "python decoder failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The values on a topic (relative name), from the beginning, as far as one poll reads.
async fn topic_values(h: &Harness, name: &str) -> Vec<Vec<u8>> {
    let topic = topics::full(&h.backend.topic_prefix, name);
    let parts = h.app().log.partitions(&topic).await.unwrap();
    let assignment: Vec<_> = (0..parts).map(|p| (topic.clone(), p, 0)).collect();
    let mut c = h.app().log.assigned_consumer(&assignment).await.unwrap();
    c.poll(100, Duration::from_millis(500)).await.unwrap().into_iter().map(|r| r.value).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "integration tier: needs python3 with fastavro (installed by scripts/test-integration.sh)"]
async fn python_fastavro_decodes_every_topic_from_the_avsc_files() {
    let h = Harness::start(Tier::Embedded).await;
    assert_eq!(h.put("/fhir/Patient/x1", &patient("x1", "Outside")).await.status(), 201);
    assert_eq!(h.client.delete(h.url("/fhir/Patient/x1")).send().await.unwrap().status(), 204);
    assert_eq!(
        h.put("/fhir/Patient/x2", &serde_json::json!({"resourceType": "Patient", "id": "x2", "gender": 1}))
            .await
            .status(),
        400
    );
    // Bad input refused at the API never reaches the log, and checked writes skip the
    // submissions topic: two writes, two change events.
    assert!(topic_values(&h, topics::FHIR_SUBMISSIONS).await.is_empty());
    let values = topic_values(&h, topics::FHIR_CHANGES).await;
    assert_eq!(values.len(), 2, "two writes, two changes");
    let decoded = decode_in_python(&values);
    assert_eq!(decoded.len(), values.len());
    for (raw, py) in values.iter().zip(&decoded) {
        let ours: schemas::ResourceChanged = schemas::decode_event(raw).unwrap();
        assert_eq!(py["schema_id"], 101);
        let v = &py["value"];
        assert_eq!(v["envelope"]["event_id"], ours.envelope.event_id);
        assert_eq!(v["envelope"]["correlation_id"], ours.envelope.correlation_id);
        assert_eq!(v["changes"][0]["resource_type"], ours.changes[0].resource_type);
        assert_eq!(v["changes"][0]["action"], serde_json::to_value(ours.changes[0].action).unwrap());
        assert_eq!(v["changes"][0]["resource"].as_str(), ours.changes[0].resource.as_deref());
    }
    h.stop().await;
}

/// The attachments topic too: a case, a submission and its link, decoded by fastavro from
/// `attachment-event/v1.avsc` alone (nested records, enums, the `final` field, arrays).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "integration tier: needs python3 with fastavro (installed by scripts/test-integration.sh)"]
async fn python_fastavro_decodes_the_attachments_topic() {
    use base64::Engine as _;
    let h = Harness::start(Tier::Embedded).await;
    let claim = serde_json::json!({"resourceType": "Claim", "id": "c-contract", "status": "active",
        "identifier": [{"system": "urn:payer:pa", "value": "T-CONTRACT"}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization", "patient": {"reference": "Patient/x", "identifier": {"value": "M-C"}}, "created": "2026-11-20",
        "provider": {"reference": "Organization/o"}, "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/c"}}],
        "item": [{"sequence": 1, "productOrService": {"coding": [{"code": "E0250"}]}}]});
    assert_eq!(h.put("/fhir/Claim/c-contract", &claim).await.status(), 201);
    let params = serde_json::json!({"resourceType": "Parameters", "parameter": [
        {"name": "TrackingId", "valueIdentifier": {"value": "T-CONTRACT"}},
        {"name": "AttachTo", "valueCode": "preauthorization"},
        {"name": "OrganizationId", "valueIdentifier": {"system": "urn:org", "value": "O-1"}},
        {"name": "MemberId", "valueIdentifier": {"value": "M-C"}},
        {"name": "Attachment", "part": [{"name": "LineItem", "valueString": "1"},
            {"name": "Content", "resource": {"resourceType": "DocumentReference", "status": "current",
                "content": [{"attachment": {"contentType": "application/pdf",
                    "data": base64::engine::general_purpose::STANDARD.encode(b"contract bytes")}}]}}]},
        {"name": "Final", "valueBoolean": false}
    ]});
    assert_eq!(h.post("/fhir/$submit-attachment", &params).await.status(), 200);
    let topic = topics::full(&h.backend.topic_prefix, topics::ATTACHMENTS);
    let parts = h.app().log.partitions(&topic).await.unwrap();
    let mut values: Vec<Vec<u8>> = vec![];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while values.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "case, submission and link expected, got {}", values.len());
        let mut c = h
            .app()
            .log
            .assigned_consumer(&(0..parts).map(|p| (topic.clone(), p, 0)).collect::<Vec<_>>())
            .await
            .unwrap();
        values = c.poll(100, Duration::from_millis(500)).await.unwrap().into_iter().map(|r| r.value).collect();
    }
    let decoded = decode_in_python(&values);
    let kinds: Vec<&str> = decoded.iter().map(|d| d["value"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["CASE_OPENED", "SUBMITTED", "LINKED"]);
    for (raw, py) in values.iter().zip(&decoded) {
        let ours: schemas::AttachmentEvent = schemas::decode_event(raw).unwrap();
        assert_eq!(py["schema_id"], 301);
        let v = &py["value"];
        assert_eq!(v["envelope"]["event_id"], ours.envelope.event_id);
        assert_eq!(v["tracking_id"], "T-CONTRACT");
        assert_eq!(v["final"].as_bool(), ours.is_final);
        assert_eq!(v["case_ref"].as_str(), ours.case_ref.as_deref());
        assert_eq!(v["attachments"].as_array().unwrap().len(), ours.attachments.len());
        if let Some(a) = ours.attachments.first() {
            assert_eq!(v["attachments"][0]["line_items"][0], "1");
            let blob = a.content[0].blob.as_ref().unwrap();
            assert_eq!(v["attachments"][0]["content"][0]["blob"]["sha256"], blob.sha256.as_str());
            assert_eq!(v["attachments"][0]["content"][0]["blob"]["size"], blob.size);
        }
    }
    assert_eq!(decoded[1]["value"]["organization_id"]["system"], "urn:org");
    assert_eq!(decoded[2]["value"]["case_ref"], "Claim/c-contract");
    h.stop().await;
}

/// Both member-match topics: a request and its decision, decoded by fastavro from
/// `member-match-request/v1.avsc` and `member-match-decision/v1.avsc` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "integration tier: needs python3 with fastavro (installed by scripts/test-integration.sh)"]
async fn python_fastavro_decodes_the_member_match_topics() {
    let h = Harness::start(Tier::Embedded).await;
    let params = serde_json::json!({"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": {"resourceType": "Patient", "id": "1", "name": [{"family": "Nobody"}], "birthDate": "2000-01-01"}},
        {"name": "CoverageToMatch", "resource": {"resourceType": "Coverage", "status": "active", "subscriberId": "S-C",
            "beneficiary": {"reference": "Patient/1"}, "payor": [{"display": "Old plan"}]}}
    ]});
    assert_eq!(h.post("/fhir/Patient/$member-match", &params).await.status(), 422);
    let mut values = topic_values(&h, topics::MEMBER_MATCH_REQUESTS).await;
    values.extend(topic_values(&h, topics::MEMBER_MATCH_DECISIONS).await);
    assert_eq!(values.len(), 2, "one request, one decision");
    let decoded = decode_in_python(&values);
    let request: schemas::MemberMatchRequested = schemas::decode_event(&values[0]).unwrap();
    assert_eq!(decoded[0]["schema_id"], 401);
    assert_eq!(decoded[0]["value"]["kind"], "SINGLE");
    assert_eq!(decoded[0]["value"]["request_hash"], request.request_hash);
    assert_eq!(decoded[0]["value"]["member_patient"].as_str(), request.member_patient.as_deref());
    assert_eq!(decoded[1]["schema_id"], 501);
    assert_eq!(decoded[1]["value"]["outcome"], "NO_MATCH");
    assert_eq!(decoded[1]["value"]["request_id"], request.envelope.event_id);
    assert_eq!(decoded[1]["value"]["repeated"], false);
    h.stop().await;
}
