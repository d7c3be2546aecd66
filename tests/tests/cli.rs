//! `payerx load` and `payerx events`, on both tiers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Command;

use payerx::load::{load_into, LoadArgs};
use tests::{both_tiers, patient, payerx_binary, Harness};

both_tiers!(load_feeds_ndjson_and_bundles, events_prints_decoded_json_lines);

async fn load_feeds_ndjson_and_bundles(h: Harness) {
    let folder = h.dir.path().join("feed");
    std::fs::create_dir_all(folder.join("nested")).unwrap();
    let mut nd = std::fs::File::create(folder.join("patients.ndjson")).unwrap();
    for i in 0..200 {
        writeln!(nd, "{}", patient(&format!("l{i}"), "Load")).unwrap();
    }
    writeln!(nd).unwrap(); // blank lines are skipped
    writeln!(nd, "{{\"resourceType\":\"Patient\",\"id\":\"bad\",\"birthDate\":\"1980-99-01\"}}").unwrap();
    writeln!(nd, "{{not json").unwrap();
    drop(nd);
    let tx = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Organization", "id": "org1", "name": "Payer One"}, "request": {"method": "PUT", "url": "Organization/org1"}},
        {"resource": {"resourceType": "Coverage", "id": "cov1", "status": "active", "beneficiary": {"reference": "Patient/l1"},
                      "payor": [{"reference": "Organization/org1"}]}, "request": {"method": "PUT", "url": "Coverage/cov1"}},
    ]});
    std::fs::write(folder.join("nested/tx.json"), tx.to_string()).unwrap();
    let collection = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient("coll1", "C")}]});
    std::fs::write(folder.join("nested/collection.json"), collection.to_string()).unwrap();

    let args = LoadArgs { chunk: 64, show_rejects: 0, workers: Some(3), ..LoadArgs::new(h.backend.clone(), folder) };
    let report = load_into(h.app().log.clone(), &args).await.unwrap();
    assert_eq!(report.files, 3);
    assert_eq!(report.accepted, 200 + 1 + 1, "200 patients, one transaction event, one collection entry");
    assert_eq!(report.rejected, 2);
    // Every partition progresses on its own: wait for all of them, not for one resource.
    h.eventually("loaded resources are visible", || async {
        h.app().store().count("Patient").await.unwrap() == 201 && h.get("/fhir/Coverage/cov1").await.status() == 200
    })
    .await;
    assert_eq!(h.get("/fhir/Patient/l199").await.status(), 200);
    assert_eq!(h.get("/fhir/Organization/org1").await.status(), 200);
    assert_eq!(h.get("/fhir/Patient/bad").await.status(), 404);
    h.stop().await;
}

async fn events_prints_decoded_json_lines(h: Harness) {
    assert_eq!(h.put("/fhir/Patient/e1", &patient("e1", "Events")).await.status(), 201);
    assert_eq!(h.client.delete(h.url("/fhir/Patient/e1")).send().await.unwrap().status(), 204);
    let b = h.backend.clone();
    let mut cmd = Command::new(payerx_binary());
    cmd.args(["events", "--topic", "fhir.changes", "--from-beginning", "--data-dir"])
        .arg(&b.data_dir)
        .args(["--topic-prefix", &b.topic_prefix]);
    if let Some(k) = &b.kafka_brokers {
        cmd.args(["--kafka-brokers", k]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["type"], "ResourceChanged");
    assert_eq!(lines[0]["schema_id"], 101);
    assert_eq!(lines[0]["key"], "Patient/e1");
    assert_eq!(lines[0]["value"]["changes"][0]["action"], "UPSERT");
    assert_eq!(lines[1]["value"]["changes"][0]["action"], "DELETE");
    // The API appended these itself (checked at the edge): they start their flow, nothing caused them.
    assert!(lines[1]["value"]["envelope"]["causation_id"].is_null(), "{}", lines[1]);
    assert_eq!(lines[0]["headers"]["payerx.event-type"], "ResourceChanged");
    assert_eq!(lines[0]["headers"]["payerx.event-id"], lines[0]["value"]["envelope"]["event_id"]);
    h.stop().await;
}

/// `payerx generate` writes CARIN-BB-shaped data that the feed accepts as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_data_loads_cleanly() {
    let h = Harness::start(tests::Tier::Embedded).await;
    let file = h.dir.path().join("synthetic.ndjson");
    let out =
        Command::new(payerx_binary()).args(["generate", "--resources", "60", "--out"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args = LoadArgs { chunk: 16, show_rejects: 5, ..LoadArgs::new(h.backend.clone(), file) };
    let report = load_into(h.app().log.clone(), &args).await.unwrap();
    assert_eq!((report.accepted, report.rejected), (60, 0));
    h.eventually("generated data is visible", || async {
        h.app().store().count("ExplanationOfBenefit").await.unwrap() == 20
    })
    .await;
    assert_eq!(h.app().store().count("Patient").await.unwrap(), 20);
    h.stop().await;
}

/// `payerx clients add --organization` and `payerx clients organizations`: who a payer client
/// acts for, as the member-match Consent check reads it.
#[test]
fn clients_carry_the_organizations_they_act_for() {
    let dir = tempfile::tempdir().unwrap();
    let payerx = |args: &[&str]| {
        let out = Command::new(payerx_binary()).args(args).arg("--data-dir").arg(dir.path()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let npi = "http://hl7.org/fhir/sid/us-npi|1234567893";
    let (ok, out, err) = payerx(&[
        "clients",
        "add",
        "--name",
        "new-plan",
        "--kind",
        "confidential-symmetric",
        "--scope",
        "system/*.*",
        "--organization",
        npi,
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["organizations"], serde_json::json!([npi]));
    let id = created["client_id"].as_str().unwrap().to_string();
    let listed = |s: &str| -> serde_json::Value { serde_json::from_str(s).unwrap() };
    let (_, out, _) = payerx(&["clients", "list"]);
    assert_eq!(listed(&out)[0]["organizations"], serde_json::json!([npi]));
    // Replaced, then cleared.
    let (ok, _, err) =
        payerx(&["clients", "organizations", &id, "--organization", "urn:oid:2.16.840.1.113883.4.6|999"]);
    assert!(ok, "{err}");
    let (_, out, _) = payerx(&["clients", "list"]);
    assert_eq!(listed(&out)[0]["organizations"], serde_json::json!(["urn:oid:2.16.840.1.113883.4.6|999"]));
    assert!(payerx(&["clients", "organizations", &id]).0);
    let (_, out, _) = payerx(&["clients", "list"]);
    assert!(listed(&out)[0].get("organizations").is_none(), "{out}");
    // An identifier without a system is refused with how to write it.
    let (ok, _, err) = payerx(&["clients", "organizations", &id, "--organization", "1234567893"]);
    assert!(!ok);
    assert!(err.contains("SYSTEM|VALUE"), "{err}");
    let (ok, _, err) = payerx(&["clients", "organizations", "no-such-client"]);
    assert!(!ok && err.contains("no-such-client"), "{err}");
}
