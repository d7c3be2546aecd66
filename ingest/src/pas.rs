//! `POST /fhir/Claim/$submit` (Da Vinci PAS): a provider asks for a prior authorization and
//! gets back the tracking id under which it later sends attachments (CDex).
//!
//! The request Bundle's Claim is stored with the other Bundle resources *contained*: they are the
//! provider's copies of the member, the coverage and the practitioners, and must not overwrite
//! the payer's own. The Claim gains the payer's tracking identifier; a ClaimResponse with
//! `outcome = queued` and `preAuthRef` = the tracking id records that the request is pended for
//! review. Both are written in one transaction event, and the cases processor opens the CDex case.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use schemas::smart::Interaction;
use schemas::{IssueType, OperationOutcome, ResourceChange, WriteMode};
use serde_json::{json, Value};

use crate::access::Caller;
use crate::bundle::rewrite_references;
use crate::error::{fhir_response, ApiError};
use crate::fhir::json_body;
use crate::write::{self, Waited};
use crate::SharedState;

/// The identifier system of the tracking ids payerx assigns to prior authorizations.
pub const TRACKING_ID_SYSTEM: &str = "urn:payerx:prior-auth-tracking-id";

const ID_NS: uuid::Uuid = uuid::Uuid::from_u128(0x9d2e_41f7_0c3b_4a86_b5e1_7f20_d63c_18aa);

fn invalid(msg: impl Into<String>, at: &str) -> ApiError {
    ApiError::with_outcome(StatusCode::BAD_REQUEST, OperationOutcome::error(IssueType::Invalid, msg).at(at))
}

/// The pieces of a PAS request Bundle payerx stores.
pub struct PasRequest {
    pub claim_id: String,
    pub response_id: String,
    pub tracking_id: String,
    pub claim: Value,
    pub response: Value,
}

/// A tracking id a person can read out over the phone: `PA` + 10 characters of Crockford
/// base32, derived from the provider's claim identifier so a resubmission keeps its id.
fn tracking_id(seed: &uuid::Uuid) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut n = seed.as_u128();
    let mut out = String::from("PA");
    for _ in 0..10 {
        out.push(ALPHABET[(n % 32) as usize] as char);
        n /= 32;
    }
    out
}

/// Checks a PAS request Bundle and builds what payerx stores of it. Pure, so it is tested
/// without a server.
pub fn prepare(bundle: &Value, now: &str) -> Result<PasRequest, ApiError> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(invalid("Claim/$submit expects a PAS request Bundle", "Bundle"));
    }
    let entries = bundle.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut claim = match entries.first().and_then(|e| e.get("resource")) {
        Some(c) if c.get("resourceType").and_then(Value::as_str) == Some("Claim") => c.clone(),
        _ => {
            return Err(invalid("the first entry of a PAS request Bundle must be a Claim", "Bundle.entry[0].resource"))
        }
    };
    if claim.get("use").and_then(Value::as_str) != Some("preauthorization") {
        return Err(invalid(
            "Claim.use must be 'preauthorization' for Claim/$submit (claims are fed through the payer feed)",
            "Bundle.entry[0].resource.use",
        ));
    }
    // Every other entry becomes contained; references to it (by fullUrl or Type/id) become `#id`.
    let mut contained = Vec::new();
    let mut rename: HashMap<String, String> = HashMap::new();
    for (i, e) in entries.iter().enumerate().skip(1) {
        let Some(r) = e.get("resource") else {
            return Err(invalid("every entry needs a resource", &format!("Bundle.entry[{i}]")));
        };
        let rtype = r.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        let local = format!("r{i}");
        if let Some(full) = e.get("fullUrl").and_then(Value::as_str) {
            rename.insert(full.to_string(), format!("#{local}"));
        }
        if let Some(id) = r.get("id").and_then(Value::as_str) {
            rename.insert(format!("{rtype}/{id}"), format!("#{local}"));
        }
        let mut r = r.clone();
        r["id"] = Value::String(local);
        if let Some(o) = r.as_object_mut() {
            o.remove("meta");
        }
        contained.push(r);
    }
    let identifier = claim
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| ids.first())
        .map(|i| format!("{}|{}", i["system"].as_str().unwrap_or(""), i["value"].as_str().unwrap_or("")));
    // Resubmitting the same provider claim identifier reaches the same case; without one, each
    // request is a case of its own.
    let seed = match &identifier {
        Some(i) => uuid::Uuid::new_v5(&ID_NS, i.as_bytes()),
        None => uuid::Uuid::new_v4(),
    };
    let tracking = tracking_id(&seed);
    let claim_id = format!("pas-{seed}");
    let response_id = format!("pas-{seed}-response");
    rewrite_references(&mut claim, &rename);
    for r in &mut contained {
        rewrite_references(r, &rename);
    }
    claim["id"] = Value::String(claim_id.clone());
    if !contained.is_empty() {
        claim["contained"] = Value::Array(contained);
    }
    let ids = claim.as_object_mut().map(|o| o.entry("identifier").or_insert_with(|| json!([])));
    if let Some(Value::Array(ids)) = ids {
        ids.retain(|i| i.get("system").and_then(Value::as_str) != Some(TRACKING_ID_SYSTEM));
        ids.push(json!({"system": TRACKING_ID_SYSTEM, "value": tracking}));
    }
    // ClaimResponse.patient and .insurer are required and may not point into the Claim.
    let logical = |r: Option<&Value>| -> Value {
        let contained = r.and_then(|r| r.get("reference")).and_then(Value::as_str).and_then(|at| {
            claim["contained"].as_array()?.iter().find(|c| format!("#{}", c["id"].as_str().unwrap_or("")) == at)
        });
        match contained.and_then(|c| c.get("identifier")).and_then(|i| i.as_array()).and_then(|i| i.first()) {
            Some(i) => json!({"identifier": i}),
            None => {
                json!({"display": r.and_then(|r| r.get("display")).and_then(Value::as_str).unwrap_or("as in the request")})
            }
        }
    };
    let response = json!({
        "resourceType": "ClaimResponse",
        "id": response_id,
        "identifier": [{"system": TRACKING_ID_SYSTEM, "value": tracking}],
        "status": "active",
        "type": claim.get("type").cloned().unwrap_or_else(|| json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]})),
        "use": "preauthorization",
        "patient": logical(claim.get("patient")),
        "created": now,
        "insurer": logical(claim.get("insurer")),
        "request": {"reference": format!("Claim/{claim_id}")},
        "outcome": "queued",
        "disposition": "Pended for review; send additional documentation with $submit-attachment using the preAuthRef as TrackingId",
        "preAuthRef": tracking,
    });
    Ok(PasRequest { claim_id, response_id, tracking_id: tracking, claim, response })
}

/// The payer's own Patient for the member in a PAS request: the one Patient found by the
/// identifiers of the request's (contained) patient. None when no or several Patients match.
async fn member(state: &SharedState, claim: &Value) -> Result<Option<String>, ApiError> {
    let at = claim.pointer("/patient/reference").and_then(Value::as_str).unwrap_or_default();
    let Some(patient) = claim["contained"]
        .as_array()
        .and_then(|c| c.iter().find(|r| format!("#{}", r["id"].as_str().unwrap_or("")) == at))
    else {
        return Ok(None);
    };
    let mut found = std::collections::BTreeSet::new();
    for i in patient["identifier"].as_array().into_iter().flatten() {
        let Some(value) = i["value"].as_str() else { continue };
        found.extend(state.store.ids_by_identifier("Patient", i["system"].as_str(), value).await?);
    }
    Ok(match found.len() {
        1 => found.into_iter().next().map(|id| format!("Patient/{id}")),
        _ => None,
    })
}

pub async fn submit(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.authorize_write("Claim", Interaction::Create)?;
    let bundle = json_body(&state, &headers, body).await?;
    let now = projections::resources::instant(schemas::events::now_micros());
    let mut pas = prepare(&bundle, &now)?;
    if let Some(patient) = member(&state, &pas.claim).await? {
        // The payer knows this member: the case (and the documents linked to it later) belong
        // to the payer's Patient, so the member's own apps see them.
        let reference = json!({"reference": patient});
        pas.claim["patient"] = reference.clone();
        pas.response["patient"] = reference;
    }
    let change = |rtype: &str, id: &str, v: &Value| -> Result<ResourceChange, ApiError> {
        processors::validate_processor::check_resource(v, rtype, id, None)
            .map_err(|oo| ApiError::with_outcome(StatusCode::BAD_REQUEST, oo))?;
        Ok(ResourceChange::upsert(rtype, id, v.to_string()))
    };
    let changes =
        vec![change("Claim", &pas.claim_id, &pas.claim)?, change("ClaimResponse", &pas.response_id, &pas.response)?];
    let corr = write::request_id(&headers);
    let mut waited =
        write::submit(&state, vec![write::event(&corr, caller.client_id(), WriteMode::Transaction, changes)]).await?;
    match waited.remove(0) {
        Waited::Pending(id) => Ok(write::pending_response(&state, &headers, &id)),
        Waited::Done(o) if o.status >= 300 => {
            let oo = o.outcome.as_ref().and_then(OperationOutcome::from_json).unwrap_or_else(|| {
                OperationOutcome::error(IssueType::Processing, "the prior authorization was refused")
            });
            Err(ApiError::with_outcome(StatusCode::from_u16(o.status).unwrap_or(StatusCode::BAD_REQUEST), oo))
        }
        Waited::Done(_) => {
            let base = crate::fhir::base_url(&state, &headers);
            let response = state.store.read("ClaimResponse", &pas.response_id).await?;
            let stored = response
                .and_then(|r| r.content)
                .and_then(|c| serde_json::from_str::<Value>(&c).ok())
                .unwrap_or(pas.response);
            let bundle = json!({
                "resourceType": "Bundle",
                "type": "collection",
                "timestamp": now,
                "entry": [
                    {"fullUrl": format!("{base}/fhir/ClaimResponse/{}", pas.response_id), "resource": stored},
                ]
            });
            Ok(fhir_response(StatusCode::OK, &bundle))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    pub fn pas_bundle(identifier: &str) -> Value {
        json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:claim", "resource": {"resourceType": "Claim", "status": "active",
                "identifier": [{"system": "urn:ehr", "value": identifier}],
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
                "use": "preauthorization", "patient": {"reference": "Patient/p"}, "created": "2026-11-20",
                "insurer": {"reference": "Organization/ins"}, "provider": {"reference": "urn:uuid:prac"},
                "priority": {"coding": [{"code": "normal"}]},
                "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov"}}],
                "item": [{"sequence": 1, "productOrService": {"coding": [{"code": "E0250"}]}}]}},
            {"fullUrl": "http://ehr/fhir/Patient/p", "resource": {"resourceType": "Patient", "id": "p", "identifier": [{"system": "urn:mb", "value": "M-1"}]}},
            {"fullUrl": "http://ehr/fhir/Coverage/cov", "resource": {"resourceType": "Coverage", "id": "cov", "status": "active", "subscriberId": "S-1",
                "beneficiary": {"reference": "Patient/p"}, "payor": [{"reference": "Organization/ins"}]}},
            {"fullUrl": "urn:uuid:prac", "resource": {"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}},
            {"fullUrl": "http://ehr/fhir/Organization/ins", "resource": {"resourceType": "Organization", "id": "ins", "identifier": [{"value": "PAYER-1"}], "name": "Payer"}}
        ]})
    }

    #[test]
    fn stores_the_request_contained_with_a_stable_tracking_id() {
        let a = prepare(&pas_bundle("EHR-1"), "2026-11-22T10:00:00Z").unwrap();
        let b = prepare(&pas_bundle("EHR-1"), "2026-11-22T11:00:00Z").unwrap();
        let c = prepare(&pas_bundle("EHR-2"), "2026-11-22T11:00:00Z").unwrap();
        assert_eq!(a.tracking_id, b.tracking_id, "a resubmission keeps its tracking id");
        assert_ne!(a.tracking_id, c.tracking_id);
        assert!(a.tracking_id.starts_with("PA") && a.tracking_id.len() == 12);
        assert_eq!(a.claim["patient"]["reference"], "#r1");
        assert_eq!(a.claim["provider"]["reference"], "#r3");
        assert_eq!(a.claim["insurance"][0]["coverage"]["reference"], "#r2");
        assert_eq!(a.claim["contained"][1]["beneficiary"]["reference"], "#r1");
        assert_eq!(a.claim["identifier"][1]["value"], a.tracking_id.as_str());
        assert_eq!(a.response["preAuthRef"], a.tracking_id.as_str());
        assert_eq!(a.response["outcome"], "queued");
        assert_eq!(a.response["patient"]["identifier"]["value"], "M-1");
        assert_eq!(a.response["request"]["reference"], format!("Claim/{}", a.claim_id));
        for (rtype, id, v) in [("Claim", &a.claim_id, &a.claim), ("ClaimResponse", &a.response_id, &a.response)] {
            processors::validate_processor::check_resource(v, rtype, id, None).unwrap();
        }
    }

    #[test]
    fn refuses_what_is_not_a_prior_auth_request() {
        let mut claim_use = pas_bundle("X");
        claim_use["entry"][0]["resource"]["use"] = json!("claim");
        let e = prepare(&claim_use, "2026-11-22").err().unwrap();
        assert_eq!(e.outcome.issue[0].expression, ["Bundle.entry[0].resource.use"]);
        let mut first = pas_bundle("X");
        first["entry"].as_array_mut().unwrap().swap(0, 1);
        assert!(prepare(&first, "2026-11-22").is_err());
        assert!(prepare(&json!({"resourceType": "Patient"}), "2026-11-22").is_err());
    }
}
