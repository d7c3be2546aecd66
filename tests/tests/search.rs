//! FHIR search end to end on both tiers: every parameter type, AND/OR, modifiers, paging while
//! data changes, _include/_revinclude, unknown parameters, the patient compartment, deletes,
//! and a replay rebuilding the index.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use serde_json::json as j;
use serde_json::Value;
use tests::{both_tiers, expression, json, member_launch, Harness};

both_tiers!(
    every_parameter_type,
    paging_neither_repeats_nor_drops_while_writing,
    includes_and_revincludes,
    unknown_parameters_and_bad_values,
    patient_tokens_search_their_compartment_only,
    updates_and_deletes_change_results,
    replay_rebuilds_the_index
);

/// The ids of the entries with `search.mode` = `mode`, in order.
fn ids(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["search"]["mode"] == mode)
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap(),
                        e["resource"]["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Ids (without type) of the matches of `GET /fhir/{query}`; asserts 200.
async fn found(h: &Harness, query: &str) -> Vec<String> {
    let (status, b) = h.get_json(&format!("/fhir/{query}")).await;
    assert_eq!(status, 200, "{query}: {b}");
    assert_eq!(b["type"], "searchset");
    ids(&b, "match").into_iter().map(|s| s.split('/').nth(1).unwrap().to_string()).collect()
}

async fn put(h: &Harness, r: Value) {
    let path = format!("/fhir/{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
    let status = h.put(&path, &r).await.status();
    assert!(status.is_success(), "{path}: {status}");
}

fn eob(id: &str, patient: &str, provider: &str, created: &str, code: &str) -> Value {
    j!({"resourceType": "ExplanationOfBenefit", "id": id, "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": code}]},
        "use": "claim", "patient": {"reference": format!("Patient/{patient}")}, "created": created,
        "insurer": {"reference": "Organization/o1"}, "provider": {"reference": provider}, "outcome": "complete",
        "insurance": [{"focal": true, "coverage": {"reference": format!("Coverage/c-{patient}")}}]})
}

async fn seed_people(h: &Harness) {
    put(
        h,
        j!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["José"]}], "gender": "male",
        "birthDate": "1980-02-03", "identifier": [{"system": "urn:mbi", "value": "A1"}]}),
    )
    .await;
    put(h, j!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Muller-Smith", "given": ["Ana"]}], "gender": "female",
        "birthDate": "1990", "identifier": [{"system": "urn:mbi", "value": "B2"}]})).await;
    put(
        h,
        j!({"resourceType": "Patient", "id": "p3", "name": [{"family": "Smith", "given": ["Eve"]}], "gender": "female",
        "birthDate": "1980-12", "identifier": [{"system": "urn:other", "value": "A1"}]}),
    )
    .await;
    put(h, j!({"resourceType": "Patient", "id": "p4", "identifier": [{"value": "A1"}]})).await;
    put(h, j!({"resourceType": "Organization", "id": "o1", "name": "Acme Health Plan"})).await;
    let mut e1 = eob("e1", "p1", "Organization/o1", "2024-01-10", "pharmacy");
    e1["billablePeriod"] = j!({"start": "2024-01-01", "end": "2024-01-31"});
    e1["item"] = j!([{"sequence": 1, "servicedDate": "2024-01-05", "productOrService": {"text": "x"}}]);
    put(h, e1).await;
    put(h, eob("e2", "p2", "Practitioner/dr1", "2024-03-01T10:00:00Z", "professional")).await;
}

async fn every_parameter_type(h: Harness) {
    seed_people(&h).await;
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // string: prefix, accent- and case-insensitive by default; :exact; :contains
    assert_eq!(found(&h, "Patient?name=MULLER").await, set(&["p1", "p2"]));
    assert_eq!(found(&h, "Patient?family:exact=Müller").await, set(&["p1"]));
    assert_eq!(found(&h, "Patient?family:exact=muller").await, set(&[]));
    assert_eq!(found(&h, "Patient?family:contains=smith").await, set(&["p2", "p3"]));
    assert_eq!(found(&h, "Patient?given=jos").await, set(&["p1"]));
    // `name` covers `family` and `given`, whose values are stored once (registry::COVERS).
    assert_eq!(found(&h, "Patient?name=eve").await, set(&["p3"]));
    assert_eq!(found(&h, "Patient?name:exact=Smith").await, set(&["p3"]));
    assert_eq!(found(&h, "Patient?name:missing=true").await, set(&["p4"]));
    assert_eq!(found(&h, "Organization?name=acme%20health").await, set(&["o1"]));
    // token: code, system|code, |code, system|; OR with commas, AND with repeats
    assert_eq!(found(&h, "Patient?identifier=A1").await, set(&["p1", "p3", "p4"]));
    assert_eq!(found(&h, "Patient?identifier=urn:mbi%7CA1").await, set(&["p1"]));
    assert_eq!(found(&h, "Patient?identifier=%7CA1").await, set(&["p4"]));
    assert_eq!(found(&h, "Patient?identifier=urn:mbi%7C").await, set(&["p1", "p2"]));
    assert_eq!(found(&h, "Patient?gender=male,female").await, set(&["p1", "p2", "p3"]));
    assert_eq!(found(&h, "Patient?gender=female&identifier=A1").await, set(&["p3"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?type=pharmacy").await, set(&["e1"]));
    // date: precision-aware ranges and prefixes; :missing
    assert_eq!(found(&h, "Patient?birthdate=1980").await, set(&["p1", "p3"]));
    assert_eq!(found(&h, "Patient?birthdate=1980-02").await, set(&["p1"]));
    assert_eq!(found(&h, "Patient?birthdate=ge1985").await, set(&["p2"]));
    assert_eq!(found(&h, "Patient?birthdate=lt1980-06").await, set(&["p1"]));
    assert_eq!(found(&h, "Patient?birthdate=ge1980-06&birthdate=le1989").await, set(&["p3"]));
    assert_eq!(found(&h, "Patient?birthdate:missing=true").await, set(&["p4"]));
    assert_eq!(found(&h, "Patient?birthdate:missing=false&gender=male").await, set(&["p1"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?service-date=2024-01-05").await, set(&["e1"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?service-date=2024-02").await, set(&[]));
    assert_eq!(found(&h, "ExplanationOfBenefit?created=2024-03-01").await, set(&["e2"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?created=sa2024-01-10").await, set(&["e2"]));
    // reference: Type/id, bare id, absolute URL of this server, :Type
    assert_eq!(found(&h, "ExplanationOfBenefit?patient=p1").await, set(&["e1"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?patient=Patient/p2").await, set(&["e2"]));
    let absolute = format!("ExplanationOfBenefit?patient={}", h.url("/fhir/Patient/p1"));
    assert_eq!(found(&h, &absolute).await, set(&["e1"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?provider=o1").await, set(&["e1"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?provider:Practitioner=dr1").await, set(&["e2"]));
    assert_eq!(found(&h, "ExplanationOfBenefit?coverage=Coverage/c-p2").await, set(&["e2"]));
    // uri
    put(&h, j!({"resourceType": "Questionnaire", "id": "q1", "status": "active", "url": "http://example.org/Questionnaire/prior-auth"})).await;
    assert_eq!(found(&h, "Questionnaire?url=http://example.org/Questionnaire/prior-auth").await, set(&["q1"]));
    assert_eq!(found(&h, "Questionnaire?url=http://example.org/Questionnaire").await, set(&[]));
    // _id, _lastUpdated, _sort, _total, _summary=count
    assert_eq!(found(&h, "Patient?_id=p2,p4").await, set(&["p2", "p4"]));
    assert_eq!(found(&h, "Patient?_lastUpdated=ge2000-01-01&_sort=-_id").await, set(&["p4", "p3", "p2", "p1"]));
    assert_eq!(found(&h, "Patient?_lastUpdated=lt2000").await, set(&[]));
    let (_, b) = h.get_json("/fhir/Patient?gender=female&_total=accurate").await;
    assert_eq!(b["total"], 2);
    let (_, b) = h.get_json("/fhir/Patient?_summary=count").await;
    assert_eq!((b["total"].as_i64(), b["entry"].as_array().map(Vec::len)), (Some(4), Some(0)));
    // The entries: fullUrl, resource, search.mode; links absolute.
    let (_, b) = h.get_json("/fhir/Patient?_id=p1").await;
    assert_eq!(b["entry"][0]["fullUrl"], h.url("/fhir/Patient/p1"));
    assert_eq!(b["entry"][0]["resource"]["meta"]["versionId"], "1");
    assert!(b["link"][0]["url"].as_str().unwrap().starts_with(&h.url("/fhir/Patient?_id=p1")));
    // POST _search with a form body (plus URL parameters) is the same search.
    let r = h
        .client
        .post(h.url("/fhir/Patient/_search?gender=female"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("identifier=urn%3Aother%7CA1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(ids(&json(r).await, "match"), ["Patient/p3"]);
    let r = h
        .client
        .post(h.url("/fhir/Patient/_search"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    h.stop().await;
}

async fn paging_neither_repeats_nor_drops_while_writing(h: Harness) {
    let cov = |id: &str, status: &str| {
        j!({"resourceType": "Coverage", "id": id, "status": status, "beneficiary": {"reference": "Patient/p"},
            "payor": [{"reference": "Organization/o1"}]})
    };
    for i in 0..25 {
        put(&h, cov(&format!("c{i:02}"), "active")).await;
    }
    put(&h, cov("x-cancelled", "cancelled")).await;
    // Coverage `patient` and `beneficiary` are one element, stored once (registry::COVERS).
    for q in ["patient=p", "beneficiary=Patient/p", "patient:missing=false"] {
        let b = h.get_json(&format!("/fhir/Coverage?status=cancelled&{q}")).await.1;
        assert_eq!(ids(&b, "match"), ["Coverage/x-cancelled"], "{q}");
    }
    put(&h, j!({"resourceType": "Patient", "id": "p"})).await;
    let b = h.get_json("/fhir/Coverage?_id=x-cancelled&_include=Coverage:patient").await.1;
    assert_eq!(ids(&b, "match"), ["Coverage/x-cancelled"]);
    assert_eq!(ids(&b, "include"), ["Patient/p"]);
    let mut seen: Vec<String> = vec![];
    let mut url = h.url("/fhir/Coverage?status=active&_count=10");
    let mut pages = 0;
    loop {
        let r = h.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b = json(r).await;
        seen.extend(ids(&b, "match"));
        pages += 1;
        if pages == 1 {
            // Between pages: a seen one and an unseen one change, one is created before the
            // cursor and one after, one unseen is deleted.
            put(&h, cov("c03", "active")).await;
            put(&h, cov("c17", "active")).await;
            put(&h, cov("c00a", "active")).await;
            put(&h, cov("c99", "active")).await;
            assert_eq!(h.client.delete(h.url("/fhir/Coverage/c20")).send().await.unwrap().status(), 204);
        }
        let next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(n) => {
                assert!(n.starts_with(&h.url("/fhir/Coverage?")) && n.contains("status=active"), "{n}");
                url = n;
            }
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no resource twice: {seen:?}");
    for i in (0..25).filter(|i| *i != 20) {
        assert!(seen.contains(&format!("Coverage/c{i:02}")), "c{i:02} dropped: {seen:?}");
    }
    assert!(seen.contains(&"Coverage/c99".to_string()), "created after the cursor: found later");
    assert!(!seen.contains(&"Coverage/c20".to_string()) && !seen.contains(&"Coverage/x-cancelled".to_string()));
    assert_eq!(pages, 3);
    h.stop().await;
}

async fn includes_and_revincludes(h: Harness) {
    seed_people(&h).await;
    put(
        &h,
        j!({"resourceType": "Provenance", "id": "prov1", "recorded": "2024-01-11T00:00:00Z",
        "target": [{"reference": "ExplanationOfBenefit/e1"}],
        "agent": [{"who": {"reference": "Organization/o1"}}]}),
    )
    .await;
    let (status, b) =
        h.get_json("/fhir/ExplanationOfBenefit?_id=e1&_include=ExplanationOfBenefit:patient&_include=ExplanationOfBenefit:provider&_revinclude=Provenance:target").await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(ids(&b, "match"), ["ExplanationOfBenefit/e1"]);
    let mut inc = ids(&b, "include");
    inc.sort();
    assert_eq!(inc, ["Organization/o1", "Patient/p1", "Provenance/prov1"]);
    // A target type narrows; `*` takes every reference parameter; absent targets are skipped.
    let (_, b) = h.get_json("/fhir/ExplanationOfBenefit?_include=ExplanationOfBenefit:provider:Practitioner").await;
    assert_eq!(ids(&b, "match").len(), 2);
    assert!(ids(&b, "include").is_empty(), "Practitioner/dr1 does not exist");
    let (_, b) = h.get_json("/fhir/ExplanationOfBenefit?_id=e2&_include=*").await;
    assert_eq!(ids(&b, "include"), ["Organization/o1", "Patient/p2"], "insurer and patient");
    // From the other side: the EOBs of a patient.
    let (_, b) = h.get_json("/fhir/Patient?_id=p1,p3&_revinclude=ExplanationOfBenefit:patient").await;
    assert_eq!(ids(&b, "match"), ["Patient/p1", "Patient/p3"]);
    assert_eq!(ids(&b, "include"), ["ExplanationOfBenefit/e1"]);
    h.stop().await;
}

async fn unknown_parameters_and_bad_values(h: Harness) {
    seed_people(&h).await;
    let bad = |q: &'static str, param: &'static str| {
        let h = &h;
        async move {
            let (status, oo) = h.get_json(&format!("/fhir/{q}")).await;
            assert_eq!(status, 400, "{q}: {oo}");
            assert_eq!(oo["resourceType"], "OperationOutcome");
            assert_eq!(expression(&oo), param, "{q}");
        }
    };
    bad("Patient?shoe-size=42", "shoe-size").await;
    bad("Patient?birthdate=yesterday", "birthdate").await;
    bad("Patient?_count=5000", "_count").await;
    bad("Patient?gender:contains=fem", "gender:contains").await;
    bad("ExplanationOfBenefit?patient=Organization/o1", "patient").await;
    bad("ExplanationOfBenefit?_include=Patient:organization", "_include").await;
    bad("Patient?_sort=birthdate", "_sort").await;
    bad("Patient?_cursor=..%2F..", "_cursor").await;
    let (status, _) = h.get_json("/fhir/Patience?name=x").await;
    assert_eq!(status, 404);
    // Lenient: ignored, and said so in an outcome entry.
    let r = h
        .client
        .get(h.url("/fhir/Patient?shoe-size=42&gender=male"))
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(ids(&b, "match"), ["Patient/p1"]);
    let outcome =
        b["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome").expect("outcome entry");
    assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
    assert_eq!(outcome["resource"]["issue"][0]["expression"][0], "shoe-size");
    assert!(!b["link"][0]["url"].as_str().unwrap().contains("shoe-size"), "ignored parameters are not in the links");
    // A bad value stays an error even when lenient.
    let r =
        h.client.get(h.url("/fhir/Patient?birthdate=soon")).header("prefer", "handling=lenient").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // The CapabilityStatement lists what the registry serves.
    let (_, cs) = h.get_json("/fhir/metadata").await;
    let eob =
        cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "ExplanationOfBenefit").unwrap();
    let names: Vec<&str> = eob["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for n in [
        "_id",
        "_lastUpdated",
        "patient",
        "identifier",
        "type",
        "service-date",
        "created",
        "provider",
        "coverage",
        "claim",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let sd = eob["searchParam"].as_array().unwrap().iter().find(|p| p["name"] == "patient").unwrap();
    assert_eq!(sd["definition"], "http://hl7.org/fhir/SearchParameter/ExplanationOfBenefit-patient");
    assert!(eob["searchInclude"].as_array().unwrap().contains(&j!("ExplanationOfBenefit:patient")));
    assert!(eob["searchRevInclude"].as_array().unwrap().contains(&j!("Provenance:target")));
    assert!(eob["interaction"].as_array().unwrap().contains(&j!({"code": "search-type"})));
    h.stop().await;
}

const REDIRECT: &str = "https://app.example/callback";

async fn patient_tokens_search_their_compartment_only(h: Harness) {
    seed_people(&h).await;
    let db = h.backend.open_db().await.unwrap();
    auth::admin::add_member(&db, "jose", "correct horse battery", "Patient/p1").await.unwrap();
    let scope = "launch/patient openid fhirUser patient/*.rs";
    let (app, _) = h.add_client("member-app", "public", scope, &[REDIRECT]).await;
    let token = member_launch(&h, &app, REDIRECT, scope, "jose", "correct horse battery").await;
    let bearer = token["access_token"].as_str().unwrap().to_string();
    let c = reqwest::Client::new();
    let get = |path: String| {
        let (c, bearer, url) = (c.clone(), bearer.clone(), h.url(&path));
        async move {
            let r = c.get(url).bearer_auth(&bearer).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, b) = get("/fhir/ExplanationOfBenefit".into()).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&b, "match"), ["ExplanationOfBenefit/e1"]);
    assert_eq!(ids(&get("/fhir/ExplanationOfBenefit?patient=p2".into()).await.1, "match"), Vec::<String>::new());
    assert_eq!(ids(&get("/fhir/Patient?gender=male,female".into()).await.1, "match"), ["Patient/p1"]);
    let (_, b) = get("/fhir/Patient?_summary=count".into()).await;
    assert_eq!(b["total"], 1, "counts see the compartment too");
    // Organizations are not patient data.
    assert_eq!(ids(&get("/fhir/Organization?name=acme".into()).await.1, "match"), ["Organization/o1"]);
    // Includes are filtered as well: p2's EOB never comes back through p1's… and vice versa.
    let (_, b) = get("/fhir/Patient?_revinclude=ExplanationOfBenefit:patient&_include=*".into()).await;
    assert_eq!(ids(&b, "include"), ["ExplanationOfBenefit/e1"]);
    // A token limited to EOBs: the search works, included Patients are withheld and said so.
    let narrow_scope = "launch/patient patient/ExplanationOfBenefit.rs";
    let (narrow_app, _) = h.add_client("eob-app", "public", narrow_scope, &[REDIRECT]).await;
    let narrow = member_launch(&h, &narrow_app, REDIRECT, narrow_scope, "jose", "correct horse battery").await;
    let narrow = narrow["access_token"].as_str().unwrap();
    let r = c
        .get(h.url(
            "/fhir/ExplanationOfBenefit?_include=ExplanationOfBenefit:patient&_include=ExplanationOfBenefit:provider",
        ))
        .bearer_auth(narrow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(ids(&b, "match"), ["ExplanationOfBenefit/e1"]);
    assert!(ids(&b, "include").is_empty(), "{b}");
    let outcome = &ids_outcome(&b);
    assert!(outcome.contains("Organization") && outcome.contains("Patient"), "{outcome}");
    assert_eq!(c.get(h.url("/fhir/Coverage")).bearer_auth(narrow).send().await.unwrap().status(), 403);
    h.stop().await;
}

fn ids_outcome(b: &Value) -> String {
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .map(|e| e["resource"].to_string())
        .unwrap_or_default()
}

async fn updates_and_deletes_change_results(h: Harness) {
    seed_people(&h).await;
    assert_eq!(found(&h, "Patient?family=smith").await, ["p3"]);
    put(&h, j!({"resourceType": "Patient", "id": "p3", "name": [{"family": "Jones"}], "gender": "female"})).await;
    assert!(found(&h, "Patient?family=smith").await.is_empty(), "the old value no longer matches");
    assert_eq!(found(&h, "Patient?family=jones").await, ["p3"]);
    assert_eq!(found(&h, "Patient?birthdate:missing=true").await, ["p3", "p4"]);
    assert_eq!(h.client.delete(h.url("/fhir/ExplanationOfBenefit/e1")).send().await.unwrap().status(), 204);
    assert!(found(&h, "ExplanationOfBenefit?patient=p1").await.is_empty());
    assert_eq!(found(&h, "ExplanationOfBenefit").await, ["e2"]);
    // Recreated: found again.
    put(&h, eob("e1", "p1", "Organization/o1", "2024-01-10", "pharmacy")).await;
    assert_eq!(found(&h, "ExplanationOfBenefit?patient=p1").await, ["e1"]);
    h.stop().await;
}

async fn replay_rebuilds_the_index(h: Harness) {
    seed_people(&h).await;
    put(&h, j!({"resourceType": "Patient", "id": "p3", "name": [{"family": "Jones"}], "gender": "female"})).await;
    assert_eq!(h.client.delete(h.url("/fhir/Patient/p4")).send().await.unwrap().status(), 204);
    let queries = [
        "Patient?identifier=A1",
        "Patient?family=jones",
        "Patient?name=smith",
        "ExplanationOfBenefit?patient=p1",
        "ExplanationOfBenefit?service-date=ge2024-03",
    ];
    let mut before = vec![];
    for q in queries {
        before.push(found(&h, q).await);
    }
    assert_eq!(before[0], ["p1"]);
    let report = payerx::replay::replay(&h.backend, payerx::replay::ProjectionName::Resources, true).await.unwrap();
    assert_eq!(report.new_generation, report.old_generation + 1);
    h.eventually("the running app serves the new generation", || async {
        let mut same = true;
        for (q, b) in queries.iter().zip(&before) {
            same &= h.get_json(&format!("/fhir/{q}")).await.0 == 200 && &found(&h, q).await == b;
        }
        same
    })
    .await;
    // The rebuilt index keeps following writes.
    put(&h, j!({"resourceType": "Patient", "id": "p5", "name": [{"family": "Jones"}]})).await;
    assert_eq!(found(&h, "Patient?family=jones").await, ["p3", "p5"]);
    h.stop().await;
}
