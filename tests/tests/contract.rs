//! The event contract, checked from outside payerx: a Python consumer with fastavro decodes the
//! events of a real pipeline run from the `.avsc` files and `registry.json` alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use schemas::topics;
use tests::{patient, Harness, Tier};

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
    // Bad input refused at the API never reaches the log: two writes, two events per topic.
    let mut values = vec![];
    for name in [topics::FHIR_SUBMISSIONS, topics::FHIR_CHANGES] {
        let topic = topics::full(&h.backend.topic_prefix, name);
        let parts = h.app().log.partitions(&topic).await.unwrap();
        let mut c = h
            .app()
            .log
            .assigned_consumer(&(0..parts).map(|p| (topic.clone(), p, 0)).collect::<Vec<_>>())
            .await
            .unwrap();
        for r in c.poll(100, Duration::from_millis(500)).await.unwrap() {
            values.push(r.value);
        }
    }
    assert_eq!(values.len(), 4, "two submissions, two changes");
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
        for v in &values {
            writeln!(stdin, "{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
        }
    }
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "python decoder failed: {}", String::from_utf8_lossy(&out.stderr));
    let decoded: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
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
