//! Da Vinci `$member-match` and `$bulk-member-match` end to end, on both tiers: ingest appends the
//! request, the member-match processor decides from its member index, and ingest answers from the
//! decision event (or 503 when the deadline passes, 429 when a client keeps failing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use payerx::Role;
use schemas::{topics, MemberMatchDecided, MemberMatchOutcome};
use serde_json::{json, Value};
use tests::{both_tiers, expression, Harness};

both_tiers!(
    one_match_answers_the_member_identifier_the_patient_is_found_by,
    no_match_and_two_matches_are_422_and_decisions_hide_the_inputs,
    consent_that_cannot_be_honoured_and_foreign_references_are_refused,
    the_consent_recipient_is_the_calling_organization,
    coverage_to_match_period_must_meet_the_coverage_held,
    the_seed_request_with_old_parameter_names_matches,
    replay_yields_the_same_decisions,
    bulk_member_match_with_mixed_outcomes,
    an_undecodable_request_goes_to_the_dead_letters,
);

both_tiers!(with strict: repeated_failures_trip_the_limit_per_client);
both_tiers!(with short_deadline: deadline_passed_answers_503_and_the_retry_gets_the_decision);
both_tiers!(with small_bulk: bulk_requests_that_cannot_be_read_are_refused_whole);

fn small_bulk(args: &mut payerx::ServeArgs) {
    args.member_match.max_bulk_bytes = 20_000;
}

fn strict(args: &mut payerx::ServeArgs) {
    args.member_match.max_failures = 3;
}

fn short_deadline(args: &mut payerx::ServeArgs) {
    args.member_match.deadline_ms = 1000;
}

const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
const NEW_PAYER: &str = "0123456789";
const REGULAR: &str = "http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html#regular";
const SENSITIVE: &str = "http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html#sensitive";

/// A payer's member: Patient with an MB identifier and a Coverage with a subscriber id.
async fn enrol(h: &Harness, id: &str, family: &str, given: &[&str], birth: &str, member: &str, subscriber: &str) {
    let p = json!({"resourceType": "Patient", "id": id,
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                        "system": "https://payer.example/member", "value": member}],
        "name": [{"family": family, "given": given}], "gender": "female", "birthDate": birth,
        "address": [{"postalCode": "02139"}]});
    assert_eq!(h.put(&format!("/fhir/Patient/{id}"), &p).await.status(), 201);
    let c = json!({"resourceType": "Coverage", "id": format!("cov-{id}"), "status": "active", "subscriberId": subscriber,
        "beneficiary": {"reference": format!("Patient/{id}")}, "payor": [{"reference": "Organization/payer"}],
        "period": {"start": "2020-01-01", "end": "2025-12-31"}});
    assert_eq!(h.put(&format!("/fhir/Coverage/cov-{id}"), &c).await.status(), 201);
    // The member index follows the changes on its own, a moment behind the read view.
    let store = h.app().matches.clone().unwrap();
    h.eventually("the member index has the patient and its coverage", || {
        let store = store.clone();
        let id = id.to_string();
        async move { store.indexed(&id).await.unwrap() && store.coverage_indexed(&format!("cov-{id}")).await.unwrap() }
    })
    .await;
}

fn consent(policy: &str, start: &str, end: &str, recipient: &str) -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IDSCL"}]}],
        "patient": {"reference": "Patient/1"}, "performer": [{"reference": "Patient/1"}],
        "sourceReference": {"reference": "http://new-payer.example/fhir/DocumentReference/consent-1"},
        "policy": [{"uri": policy}],
        "provision": {"type": "permit", "period": {"start": start, "end": end},
            "actor": [
                {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "performer"}]},
                 "reference": {"identifier": {"system": NPI, "value": "9876543210"}}},
                {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                 "reference": {"identifier": {"system": NPI, "value": recipient}}}],
            "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "disclose"}]}]}})
}

fn good_consent() -> Value {
    consent(REGULAR, "2026-01-01", "2099-12-31", NEW_PAYER)
}

fn member_patient(family: &str, given: &[&str], birth: &str) -> Value {
    json!({"resourceType": "Patient", "id": "1", "name": [{"family": family, "given": given}],
        "gender": "female", "birthDate": birth})
}

fn coverage_to_match(subscriber: Option<&str>) -> Value {
    let mut c = json!({"resourceType": "Coverage", "id": "old", "status": "active",
        "beneficiary": {"reference": "Patient/1"}, "payor": [{"identifier": {"system": NPI, "value": "9876543210"}}]});
    if let Some(s) = subscriber {
        c["subscriberId"] = json!(s);
    }
    c
}

fn coverage_to_link() -> Value {
    json!({"resourceType": "Coverage", "id": "new", "status": "active",
        "contained": [{"resourceType": "Organization", "id": "newpayer", "identifier": [{"system": NPI, "value": NEW_PAYER}],
                       "name": "New Health Plan"}],
        "beneficiary": {"reference": "Patient/1"}, "payor": [{"reference": "#newpayer"}]})
}

fn request(patient: Value, to_match: Value, consent: Option<Value>) -> Value {
    let mut p = vec![
        json!({"name": "MemberPatient", "resource": patient}),
        json!({"name": "CoverageToMatch", "resource": to_match}),
        json!({"name": "CoverageToLink", "resource": coverage_to_link()}),
    ];
    if let Some(c) = consent {
        p.push(json!({"name": "Consent", "resource": c}));
    }
    json!({"resourceType": "Parameters", "parameter": p})
}

async fn member_match(h: &Harness, body: &Value) -> (u16, Value, Option<String>) {
    let r = h.post("/fhir/Patient/$member-match", body).await;
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

fn param<'a>(params: &'a Value, name: &str) -> &'a Value {
    params["parameter"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or(&Value::Null)
}

fn diagnostics(oo: &Value) -> String {
    oo["issue"][0]["diagnostics"].as_str().unwrap_or_default().to_string()
}

async fn decisions(h: &Harness) -> Vec<(MemberMatchDecided, Value)> {
    let topic = topics::full(&h.backend.topic_prefix, topics::MEMBER_MATCH_DECISIONS);
    let log = &h.app().log;
    let ends = log.end_offsets(&topic).await.unwrap();
    let assignment: Vec<_> = (0..ends.len()).map(|p| (topic.clone(), p as i32, 0)).collect();
    let mut c = log.assigned_consumer(&assignment).await.unwrap();
    let total: i64 = ends.iter().sum();
    let mut out = Vec::new();
    while (out.len() as i64) < total {
        for r in c.poll(1000, Duration::from_secs(2)).await.unwrap() {
            let (_, _, json) = schemas::registry::decode_to_json(&r.value).unwrap();
            out.push((schemas::decode_event::<MemberMatchDecided>(&r.value).unwrap(), json));
        }
    }
    out
}

async fn one_match_answers_the_member_identifier_the_patient_is_found_by(h: Harness) {
    enrol(&h, "mm-1", "Núñez-García", &["María", "José"], "1980-02-03", "M1001", "S1001").await;
    enrol(&h, "mm-2", "Smith", &["Ann"], "1975-05-06", "M1002", "S1002").await;
    // Another spelling of the same member: case, accents, a space for the hyphen, one given name.
    let body = request(
        member_patient("NUNEZ GARCIA", &["maria"], "1980-02-03"),
        coverage_to_match(Some("S1001")),
        Some(good_consent()),
    );
    let (status, out, _) = member_match(&h, &body).await;
    assert_eq!(status, 200, "{out}");
    let id = &param(&out, "MemberIdentifier")["valueIdentifier"];
    assert_eq!(id["type"]["coding"][0]["system"], "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp");
    assert_eq!(id["type"]["coding"][0]["code"], "UMB");
    assert_eq!(id["value"], "M1001");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/mm-1");

    // The identifier finds the Patient, which the new payer then uses.
    let (status, found) =
        h.get_json(&format!("/fhir/Patient?identifier={}|M1001", id["system"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    assert_eq!(found["entry"].as_array().unwrap().len(), 1);
    assert_eq!(found["entry"][0]["resource"]["id"], "mm-1");

    // The consent and the requesting payer's coverage are kept for its later data requests.
    let store = h.app().matches.clone().unwrap();
    let links = h
        .until("the member link", || {
            let store = store.clone();
            async move { store.links("mm-1").await.ok().filter(|l| !l.is_empty()) }
        })
        .await;
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].policy.as_deref(), Some(REGULAR));
    assert_eq!(links[0].period_end.as_deref(), Some("2099-12-31"));
    assert!(links[0].coverage_to_link.as_deref().unwrap().contains(NEW_PAYER));

    // The decision names its rule; a match by demographics alone is recorded as such.
    let body = request(member_patient("Smith", &["Ann"], "1975-05-06"), coverage_to_match(None), None);
    let (status, out, _) = member_match(&h, &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/mm-2");
    let rules: Vec<(String, Option<String>)> =
        decisions(&h).await.into_iter().map(|(d, _)| (d.patient_id.unwrap_or_default(), d.rule)).collect();
    assert!(rules.contains(&("mm-1".into(), Some("identifier".into()))), "{rules:?}");
    assert!(rules.contains(&("mm-2".into(), Some("demographics".into()))), "{rules:?}");
    h.stop().await;
}

async fn no_match_and_two_matches_are_422_and_decisions_hide_the_inputs(h: Harness) {
    // Two members with the same demographics and no way to tell them apart.
    enrol(&h, "tw-1", "Okafor", &["Ada"], "1990-01-01", "M2001", "S2001").await;
    enrol(&h, "tw-2", "Okafor", &["Ada"], "1990-01-01", "M2002", "S2002").await;
    let (status, out, _) =
        member_match(&h, &request(member_patient("Okafor", &["Ada"], "1990-01-01"), coverage_to_match(None), None))
            .await;
    assert_eq!(status, 422, "{out}");
    assert_eq!(out["resourceType"], "OperationOutcome");
    assert!(diagnostics(&out).contains("2 members match by demographics"), "{out}");
    // The subscriber id tells them apart.
    let (status, out, _) = member_match(
        &h,
        &request(member_patient("Okafor", &["Ada"], "1990-01-01"), coverage_to_match(Some("S2002")), None),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/tw-2");
    // Nobody: 422. A known subscriber id with another birth date is no match either.
    let (status, out, _) =
        member_match(&h, &request(member_patient("Zed", &["Nobody"], "2001-01-01"), coverage_to_match(None), None))
            .await;
    assert_eq!(status, 422, "{out}");
    let (status, out, _) = member_match(
        &h,
        &request(member_patient("Okafor", &["Ada"], "1991-01-01"), coverage_to_match(Some("S2001")), None),
    )
    .await;
    assert_eq!(status, 422, "{out}");

    let all = decisions(&h).await;
    let outcomes: Vec<MemberMatchOutcome> = all.iter().map(|(d, _)| d.outcome).collect();
    assert_eq!(
        outcomes,
        [
            MemberMatchOutcome::MultipleMatches,
            MemberMatchOutcome::Matched,
            MemberMatchOutcome::NoMatch,
            MemberMatchOutcome::NoMatch
        ]
    );
    for (d, json) in &all {
        // Analysts see hashed inputs, the rule and the client, never the demographics.
        assert_eq!(d.identifiers_hash.as_ref().map(String::len), Some(64));
        assert_eq!(d.demographics_hash.as_ref().map(String::len), Some(64));
        assert!(d.envelope.client_id.is_some());
        let text = json.to_string().to_lowercase();
        assert!(!text.contains("okafor") && !text.contains("1990-01-01") && !text.contains("nobody"), "{text}");
    }
    h.stop().await;
}

async fn consent_that_cannot_be_honoured_and_foreign_references_are_refused(h: Harness) {
    enrol(&h, "cs-1", "Lindqvist", &["Eva"], "1966-06-06", "M3001", "S3001").await;
    let patient = || member_patient("Lindqvist", &["Eva"], "1966-06-06");
    let cases = [
        (consent(REGULAR, "2019-01-01", "2020-12-31", NEW_PAYER), "expired"),
        (consent(REGULAR, "2098-01-01", "2099-12-31", NEW_PAYER), "not yet in force"),
        (consent(SENSITIVE, "2026-01-01", "2099-12-31", NEW_PAYER), "sensitive"),
        (consent(REGULAR, "2026-01-01", "2099-12-31", "5555555555"), "recipient"),
    ];
    for (c, why) in cases {
        let (status, out, _) = member_match(&h, &request(patient(), coverage_to_match(Some("S3001")), Some(c))).await;
        assert_eq!(status, 422, "{why}: {out}");
        let text = diagnostics(&out);
        assert!(text.contains("consent cannot be honoured"), "{why}: {text}");
        assert!(text.to_lowercase().contains(why), "{why}: {text}");
        assert!(!out.to_string().contains("cs-1"), "no patient id on a consent refusal: {out}");
    }
    // The CapabilityStatement lists the policies honoured.
    let (_, cs) = h.get_json("/fhir/metadata").await;
    let patient_ops = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap();
    let op = patient_ops["operation"].as_array().unwrap().iter().find(|o| o["name"] == "member-match").unwrap();
    assert_eq!(op["definition"], "http://hl7.org/fhir/us/davinci-hrex/OperationDefinition/member-match");
    assert!(op["documentation"].as_str().unwrap().contains(REGULAR));
    let group = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Group").unwrap();
    assert!(group["operation"].as_array().unwrap().iter().any(|o| o["name"] == "bulk-member-match"));

    // A CoverageToMatch about someone else is refused before it reaches the log.
    let mut foreign = coverage_to_match(Some("S3001"));
    foreign["beneficiary"] = json!({"reference": "http://old-payer.example/fhir/Patient/77"});
    let (status, out, _) = member_match(&h, &request(patient(), foreign, None)).await;
    assert_eq!(status, 422, "{out}");
    assert!(expression(&out).contains("beneficiary"), "{out}");
    // Not a Parameters at all.
    let (status, out, _) = member_match(&h, &json!({"resourceType": "Patient"})).await;
    assert_eq!(status, 400, "{out}");
    assert_eq!(decisions(&h).await.len(), 4, "only the four consent cases were decided");
    h.stop().await;
}

/// `$member-match` as the client `id` (a fresh token each time, so registration changes show).
async fn member_match_as(h: &Harness, id: &str, secret: &str, body: &Value) -> (u16, Value) {
    let token = h.client_credentials(id, secret, "system/*.*").await;
    let r = h
        .client
        .post(h.url("/fhir/Patient/$member-match"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn the_consent_recipient_is_the_calling_organization(h: Harness) {
    enrol(&h, "org-1", "Okafor", &["Ada"], "1971-07-07", "M5001", "S5001").await;
    const CALLER: &str = "1112223333";
    let (id, secret) = h.add_payer_client("registered-payer", &[&format!("{NPI}|{CALLER}")]).await;
    let ask = |recipient: &str| {
        request(
            member_patient("Okafor", &["Ada"], "1971-07-07"),
            coverage_to_match(Some("S5001")),
            Some(consent(REGULAR, "2026-01-01", "2099-12-31", recipient)),
        )
    };
    // CoverageToLink names NEW_PAYER, and so does the Consent; but the caller is registered as
    // CALLER, so the Consent does not authorize disclosure to it.
    let (status, out) = member_match_as(&h, &id, &secret, &ask(NEW_PAYER)).await;
    assert_eq!(status, 422, "{out}");
    let text = diagnostics(&out);
    assert!(text.contains("recipient") && text.contains(CALLER), "{text}");
    // A Consent naming the caller is honoured, whatever CoverageToLink says.
    let (status, out) = member_match_as(&h, &id, &secret, &ask(CALLER)).await;
    assert_eq!(status, 200, "{out}");
    // Registered without organizations, the client is taken at CoverageToLink's word.
    let db = h.backend.open_db().await.unwrap();
    auth::admin::set_client_organizations(&db, &id, &[]).await.unwrap();
    let (status, out) = member_match_as(&h, &id, &secret, &ask(NEW_PAYER)).await;
    assert_eq!(status, 200, "{out}");
    h.stop().await;
}

async fn coverage_to_match_period_must_meet_the_coverage_held(h: Harness) {
    // Covered here 2020-01-01 .. 2025-12-31 (see `enrol`).
    enrol(&h, "per-1", "Tanaka", &["Yui"], "1988-08-08", "M6001", "S6001").await;
    let ask = |start: &str, end: &str| {
        let mut to_match = coverage_to_match(Some("S6001"));
        to_match["period"] = json!({"start": start, "end": end});
        request(member_patient("Tanaka", &["Yui"], "1988-08-08"), to_match, None)
    };
    let (status, out, _) = member_match(&h, &ask("2026-01-01", "2026-12-31")).await;
    assert_eq!(status, 422, "{out}");
    let text = diagnostics(&out);
    assert!(text.contains("CoverageToMatch.period") && !text.contains("2020"), "{text}");
    let (status, out, _) = member_match(&h, &ask("2025-06-01", "2026-05-31")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/per-1");
    h.stop().await;
}

async fn the_seed_request_with_old_parameter_names_matches(h: Harness) {
    let seed: Value =
        serde_json::from_str(include_str!("../../processors/src/validate/testdata/seed001-member-match-request.json"))
            .unwrap();
    let mp = &param(&seed, "MemberPatient")["resource"];
    let p = json!({"resourceType": "Patient", "id": "bene-1", "identifier": mp["identifier"], "name": mp["name"],
        "gender": mp["gender"], "birthDate": mp["birthDate"]});
    assert_eq!(h.put("/fhir/Patient/bene-1", &p).await.status(), 201);
    let store = h.app().matches.clone().unwrap();
    h.eventually("indexed", || {
        let s = store.clone();
        async move { s.indexed("bene-1").await.unwrap() }
    })
    .await;
    assert!(seed["parameter"].as_array().unwrap().iter().any(|p| p["name"] == "OldCoverage"));
    let (status, out, _) = member_match(&h, &seed).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(param(&out, "MemberIdentifier")["valueIdentifier"]["value"], "564730725596728");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/bene-1");
    h.stop().await;
}

async fn repeated_failures_trip_the_limit_per_client(h: Harness) {
    enrol(&h, "bf-1", "Moreau", &["Luc"], "1955-03-03", "M4001", "S4001").await;
    let guess = |n: u32| {
        request(
            member_patient("Moreau", &["Luc"], &format!("1955-03-{:02}", 10 + n)),
            coverage_to_match(Some("S4001")),
            None,
        )
    };
    for n in 0..3 {
        let (status, out, _) = member_match(&h, &guess(n)).await;
        assert_eq!(status, 422, "attempt {n}: {out}");
    }
    // The limit (3) is reached: even the right answer is refused now, with Retry-After.
    let right = request(member_patient("Moreau", &["Luc"], "1955-03-03"), coverage_to_match(Some("S4001")), None);
    let (status, out, retry) = member_match(&h, &right).await;
    assert_eq!(status, 429, "{out}");
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!(secs > 0 && secs <= 900, "{secs}");
    assert_eq!(out["issue"][0]["code"], "throttled");
    // Another client is not affected.
    let (id, secret) = h.add_client("other-payer", "confidential-symmetric", "system/*.*", &[]).await;
    let (status, out) = member_match_as(&h, &id, &secret, &right).await;
    assert_eq!(status, 200, "{out}");
    let throttled = decisions(&h).await.into_iter().filter(|(d, _)| d.outcome == MemberMatchOutcome::Throttled).count();
    assert_eq!(throttled, 1, "the processor decided the fourth attempt THROTTLED");
    h.stop().await;
}

async fn deadline_passed_answers_503_and_the_retry_gets_the_decision(mut h: Harness) {
    enrol(&h, "dl-1", "Tanaka", &["Yui"], "1988-08-08", "M5001", "S5001").await;
    // Ingest without the member-match processor (it runs with the projections).
    h.restart_with(&[Role::Ingest, Role::Processors], short_deadline).await;
    let body = request(
        member_patient("Tanaka", &["Yui"], "1988-08-08"),
        coverage_to_match(Some("S5001")),
        Some(good_consent()),
    );
    let (status, out, retry) = member_match(&h, &body).await;
    assert_eq!(status, 503, "{out}");
    assert!(retry.is_some());
    assert_eq!(out["issue"][0]["code"], "timeout");
    // The processor comes back and decides the waiting request; the retry gets that decision.
    h.restart_with(&[Role::Ingest, Role::Processors, Role::Projections], short_deadline).await;
    let (status, out, _) = loop {
        let r = member_match(&h, &body).await;
        if r.0 != 503 {
            break r;
        }
    };
    assert_eq!(status, 200, "{out}");
    assert_eq!(param(&out, "MemberId")["valueReference"]["reference"], "Patient/dl-1");
    let all = decisions(&h).await;
    assert!(all.len() >= 2);
    assert!(!all[0].0.repeated, "the request kept on the log was decided first");
    assert!(all.last().unwrap().0.repeated, "the retry repeats that decision");
    assert_eq!(all.last().unwrap().0.patient_id, all[0].0.patient_id);
    h.stop().await;
}

async fn replay_yields_the_same_decisions(h: Harness) {
    enrol(&h, "rp-1", "Haddad", &["Omar"], "1970-10-10", "M6001", "S6001").await;
    let store = h.app().matches.clone().unwrap();
    let good = request(
        member_patient("Haddad", &["Omar"], "1970-10-10"),
        coverage_to_match(Some("S6001")),
        Some(good_consent()),
    );
    assert_eq!(member_match(&h, &good).await.0, 200);
    let bad = request(
        member_patient("Haddad", &["Omar"], "1970-10-10"),
        coverage_to_match(Some("S6001")),
        Some(consent(SENSITIVE, "2026-01-01", "2099-12-31", NEW_PAYER)),
    );
    assert_eq!(member_match(&h, &bad).await.0, 422);
    let none = request(member_patient("Nemo", &["Nobody"], "2000-01-01"), coverage_to_match(None), None);
    assert_eq!(member_match(&h, &none).await.0, 422);
    // The answer can precede the commit of the processor's batch by a moment.
    let before = h
        .until("three decisions recorded", || {
            let store = store.clone();
            async move { store.decisions().await.ok().filter(|d| d.len() == 3) }
        })
        .await;
    let links_before = store.links("rp-1").await.unwrap();

    let r = payerx::replay::replay(&h.backend, payerx::replay::ProjectionName::MemberMatch, true).await.unwrap();
    assert!(r.events > 0 && r.new_generation > r.old_generation);
    assert_eq!(store.decisions().await.unwrap(), before);
    assert_eq!(store.links("rp-1").await.unwrap(), links_before);
    // Nothing was decided twice: the replay restored the decisions instead of re-emitting them.
    assert_eq!(decisions(&h).await.len(), 3);
    // And the rebuilt index matches a request it has not seen.
    let fresh = request(member_patient("Haddad", &["Omar"], "1970-10-10"), coverage_to_match(Some("S6001")), None);
    assert_eq!(member_match(&h, &fresh).await.0, 200);
    h.stop().await;
}

fn member_bundle(patient: Value, to_match: Value, consent: Value) -> Value {
    json!({"name": "MemberBundle", "part": [
        {"name": "MemberPatient", "resource": patient},
        {"name": "CoverageToMatch", "resource": to_match},
        {"name": "CoverageToLink", "resource": coverage_to_link()},
        {"name": "Consent", "resource": consent}]})
}

async fn bulk_member_match_with_mixed_outcomes(h: Harness) {
    enrol(&h, "bk-1", "Kowalski", &["Jan"], "1961-01-11", "M7001", "S7001").await;
    enrol(&h, "bk-2", "Silva", &["Ana"], "1962-02-12", "M7002", "S7002").await;
    let body = json!({"resourceType": "Parameters", "parameter": [
        member_bundle(member_patient("Kowalski", &["Jan"], "1961-01-11"), coverage_to_match(Some("S7001")), good_consent()),
        member_bundle(member_patient("Unknown", &["Person"], "1999-09-09"), coverage_to_match(None), good_consent()),
        member_bundle(member_patient("Silva", &["Ana"], "1962-02-12"), coverage_to_match(Some("S7002")),
                      consent(SENSITIVE, "2026-01-01", "2099-12-31", NEW_PAYER)),
        // One member's problem never fails the batch: no CoverageToMatch.
        json!({"name": "MemberBundle", "part": [{"name": "MemberPatient", "resource": member_patient("Broken", &["B"], "2000-01-01")}]}),
    ]});
    // Without Prefer: respond-async the operation is refused.
    assert_eq!(h.post("/fhir/Group/$bulk-member-match", &body).await.status(), 400);
    let r = h
        .client
        .post(h.url("/fhir/Group/$bulk-member-match"))
        .header("content-type", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status_url = r.headers()["content-location"].to_str().unwrap().to_string();
    assert!(status_url.starts_with("http"), "{status_url}");
    let job = status_url.rsplit('/').next().unwrap().to_string();

    let manifest: Value = h
        .until("the bulk job completes", || {
            let (client, url) = (h.client.clone(), status_url.clone());
            async move {
                let r = client.get(&url).send().await.unwrap();
                match r.status().as_u16() {
                    202 => {
                        assert!(r.headers().contains_key("x-progress"));
                        assert!(r.headers().contains_key("retry-after"));
                        None
                    }
                    200 => Some(r.json().await.unwrap()),
                    other => panic!("status {other}: {}", r.text().await.unwrap()),
                }
            }
        })
        .await;
    assert!(manifest["transactionTime"].is_string());
    assert_eq!(manifest["requiresAccessToken"], true);
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 3);
    let mut groups = std::collections::HashMap::new();
    for o in outputs {
        assert_eq!(o["type"], "Group");
        let text = h.client.get(o["url"].as_str().unwrap()).send().await.unwrap().text().await.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one Group per file");
        let g: Value = serde_json::from_str(lines[0]).unwrap();
        groups.insert(g["code"]["coding"][0]["code"].as_str().unwrap().to_string(), g);
    }
    let matched = &groups["match"];
    assert_eq!(matched["quantity"], 1);
    assert_eq!(matched["member"][0]["entity"]["reference"], "Patient/bk-1");
    assert_eq!(matched["managingEntity"]["identifier"]["value"], NEW_PAYER);
    let nomatch = &groups["nomatch"];
    assert_eq!(nomatch["quantity"], 2, "the unknown person and the broken member: {nomatch}");
    let contained: Vec<&str> =
        nomatch["contained"].as_array().unwrap().iter().map(|p| p["name"][0]["family"].as_str().unwrap()).collect();
    assert_eq!(contained, ["Unknown", "Broken"]);
    assert!(nomatch["member"][0]["entity"]["reference"].as_str().unwrap().starts_with('#'));
    let constrained = &groups["consentconstraint"];
    assert_eq!(constrained["quantity"], 1);
    assert_eq!(constrained["contained"][0]["name"][0]["family"], "Silva");

    // The MatchedMembers Group is a resource for the later data export.
    let (status, group) = h
        .until("the Group is in the read view", || async {
            let (s, g) = h.get_json(&format!("/fhir/Group/{job}")).await;
            (s == 200).then_some((s, g))
        })
        .await;
    assert_eq!(status, 200);
    assert_eq!(group["member"][0]["entity"]["reference"], "Patient/bk-1");
    // Unknown jobs are 404 with an OperationOutcome.
    let (status, out) = h.get_json("/fhir/bulk-member-match-status/not-a-job").await;
    assert_eq!(status, 404);
    assert_eq!(out["resourceType"], "OperationOutcome");
    h.stop().await;
}

async fn an_undecodable_request_goes_to_the_dead_letters(h: Harness) {
    let requests = topics::full(&h.backend.topic_prefix, topics::MEMBER_MATCH_REQUESTS);
    let dlq = topics::full(&h.backend.topic_prefix, topics::MEMBER_MATCH_DLQ);
    let log = h.app().log.clone();
    log.append(vec![runtime::Record::new(requests, "client/x", b"not avro".to_vec())]).await.unwrap();
    let dead = h
        .until("the dead letter", || {
            let (log, dlq) = (log.clone(), dlq.clone());
            async move {
                let ends = log.end_offsets(&dlq).await.unwrap();
                let assignment: Vec<_> = (0..ends.len()).map(|p| (dlq.clone(), p as i32, 0)).collect();
                let mut c = log.assigned_consumer(&assignment).await.unwrap();
                c.poll(10, Duration::from_millis(200)).await.unwrap().into_iter().next()
            }
        })
        .await;
    assert_eq!(dead.value, b"not avro");
    assert!(dead.header(schemas::topics::headers::ERROR_REASON).unwrap().contains("undecodable"));
    assert_eq!(dead.header(schemas::topics::headers::ERROR_STAGE), Some("member-match"));
    // And the processor went on: a request after it is decided.
    enrol(&h, "dq-1", "Ito", &["Ren"], "1977-07-07", "M8001", "S8001").await;
    let (status, out, _) = member_match(
        &h,
        &request(member_patient("Ito", &["Ren"], "1977-07-07"), coverage_to_match(Some("S8001")), None),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    h.stop().await;
}

async fn bulk_post(h: &Harness, body: reqwest::Body) -> (u16, Value) {
    let r = h
        .client
        .post(h.url("/fhir/Group/$bulk-member-match"))
        .header("content-type", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn bulk_requests_that_cannot_be_read_are_refused_whole(h: Harness) {
    let member = member_bundle(member_patient("Big", &["B"], "1950-01-01"), coverage_to_match(None), good_consent());
    // Over --max-bulk-member-match-bytes: refused from Content-Length, before the body is read
    // (the client waits after the headers, so it sees the answer whatever it would send next)...
    let head = format!(
        "POST /fhir/Group/$bulk-member-match HTTP/1.1\r\nhost: x\r\n{}content-type: application/fhir+json\r\n\
         prefer: respond-async\r\ncontent-length: 1000000\r\n\r\n",
        h.auth_line()
    );
    let (status, text) = tests::raw_request(&h.url(""), &head).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("OperationOutcome") && text.contains("--max-bulk-member-match-bytes"), "{text}");
    // ...and while streaming when the body has no length. The body is just over the limit, so
    // the client has sent everything when the answer comes.
    let mut padded = json!({"resourceType": "Parameters", "parameter": [member.clone()]}).to_string();
    padded.push_str(&" ".repeat(20_100 - padded.len()));
    let chunks: Vec<Result<String, std::io::Error>> =
        padded.as_bytes().chunks(4096).map(|c| Ok(String::from_utf8_lossy(c).into_owned())).collect();
    let (status, out) = bulk_post(&h, reqwest::Body::wrap_stream(futures::stream::iter(chunks))).await;
    assert_eq!(status, 413, "{out}");
    assert!(diagnostics(&out).contains("--max-bulk-member-match-bytes"), "{out}");
    // A parameter other than MemberBundle, none at all, or JSON that breaks off: 400.
    let other =
        json!({"resourceType": "Parameters", "parameter": [member.clone(), {"name": "Other", "valueString": "x"}]});
    let (status, out) = bulk_post(&h, other.to_string().into()).await;
    assert_eq!(status, 400, "{out}");
    assert_eq!(expression(&out), "Parameters.parameter[1].name");
    let (status, out) = bulk_post(&h, json!({"resourceType": "Parameters"}).to_string().into()).await;
    assert_eq!(status, 400, "{out}");
    assert!(diagnostics(&out).contains("at least one MemberBundle"), "{out}");
    let cut = json!({"resourceType": "Parameters", "parameter": [member]}).to_string();
    let (status, out) = bulk_post(&h, cut[..cut.len() / 2].to_string().into()).await;
    assert_eq!(status, 400, "{out}");
    assert_eq!(out["issue"][0]["code"], "structure");
    h.stop().await;
}
