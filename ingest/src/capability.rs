//! `GET /fhir/metadata`: a CapabilityStatement that states exactly what this build implements.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::error::fhir_response;
use crate::fhir::base_url;
use crate::SharedState;

/// `rest.security` for a server behind SMART: the OAuth URIs extension from the discovery document.
fn security(smart: Option<&Value>) -> Value {
    let Some(smart) = smart else {
        return json!({"description": "This server runs WITHOUT authorization (--insecure-no-auth): for local experiments only."});
    };
    let uris: Vec<Value> = [
        ("token", "token_endpoint"),
        ("authorize", "authorization_endpoint"),
        ("introspect", "introspection_endpoint"),
        ("revoke", "revocation_endpoint"),
    ]
    .iter()
    .filter_map(|(name, key)| smart.get(*key).and_then(Value::as_str).map(|u| json!({"url": name, "valueUri": u})))
    .collect();
    json!({
        "cors": false,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
                     "text": "OAuth2 using SMART App Launch 2.x"}],
        "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": uris}],
        "description": "Every request except metadata and .well-known/smart-configuration needs a bearer token; scopes and the patient compartment limit what it sees."
    })
}

pub fn capability_statement(base: &str, max_body_bytes: usize, smart: Option<&Value>) -> Value {
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "history-instance"},
        {"code": "update"}, {"code": "create"}, {"code": "delete"}, {"code": "search-type"}
    ]);
    let resources: Vec<Value> = processors::validate::resource_types()
        .map(|t| {
            // Every type answers _id and _lastUpdated; the registry adds the rest.
            let (search_params, includes, revincludes) = crate::search::capability(t);
            json!({
                "type": t,
                "interaction": interactions,
                "searchParam": search_params,
                "searchInclude": includes,
                "searchRevInclude": revincludes,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": false,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported"
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "software": {"name": "payerx", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "payerx payer interoperability platform", "url": format!("{base}/fhir")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": security(smart),
            "documentation": format!(
                "Every write becomes an event on the log and is answered once the read view shows it; if that takes longer than the \
                 configured wait, the answer is 202 with a Content-Location to poll. Request bodies are limited to {max_body_bytes} bytes \
                 (413 beyond); Bundles to 10000 entries. Search: GET [type]?… and POST [type]/_search; repeated parameters AND, \
                 commas OR; string :exact/:contains, :missing, reference :[type]; date prefixes eq ne gt lt ge le sa eb; _count up to {} \
                 (default {}); results ordered by _id (_sort=_id or -_id), paged with next links that neither repeat nor drop \
                 resources while data changes; _include/_revinclude (not :iterate), at most {} included resources a page; \
                 _total=accurate and _summary=count. Unknown parameters are refused (400) unless Prefer: handling=lenient.",
                projections::search::MAX_COUNT,
                projections::search::DEFAULT_COUNT,
                projections::search::plan::MAX_INCLUDES
            ),
            "resource": resources,
            "interaction": [
                {"code": "batch", "documentation": "Each entry is applied on its own; POST, PUT and DELETE entries."},
                {"code": "transaction", "documentation": "All entries apply together or none does; urn:uuid fullUrls are resolved."}
            ]
        }]
    })
}

/// The Da Vinci operations: CDex `$submit-attachment` at the system level (with its size limit
/// and what to do beyond it), PAS `Claim/$submit` and the `Claim/{id}/$attachments` case view.
pub fn add_operations(cs: &mut Value, max_attachment_request_bytes: u64) {
    let submit_attachment = json!({
        "name": "submit-attachment",
        "definition": "http://hl7.org/fhir/us/davinci-cdex/OperationDefinition/submit-attachment",
        "documentation": format!(
            "Da Vinci CDex 2.1 $submit-attachment (POST only). Content: DocumentReference (attachment.data inline, or attachment.url) \
             and QuestionnaireResponse. Requests are limited to {max_attachment_request_bytes} bytes including the base64 data \
             (413 beyond): send larger documents by attachment.url instead. Inline data streams to a content-addressed store \
             (SHA-256) and is served at Binary/{{sha256}}; attachment.size and attachment.hash (SHA-1), when given, must match. \
             Content by attachment.url is fetched after the answer by a worker (https only; private, loopback and link-local \
             addresses refused unless allow-listed); a refused or unreachable URL rejects the attachment, shown with its reason \
             by Claim/{{id}}/$attachments and as a REJECTED event. 200 = accepted; 200 with an informational OperationOutcome = \
             held for association with a future claim/prior authorization; 422 = the tracking id's attachment set was closed by an \
             earlier Final=true submission."
        )
    });
    if let Some(rest) = cs.pointer_mut("/rest/0").and_then(Value::as_object_mut) {
        let ops = rest.entry("operation").or_insert_with(|| json!([]));
        if let Some(list) = ops.as_array_mut() {
            list.push(submit_attachment);
        }
    }
    let claim_ops = json!([
        {"name": "submit", "definition": "http://hl7.org/fhir/us/davinci-pas/OperationDefinition/Claim-submit",
         "documentation": "Da Vinci PAS prior authorization request (Claim.use = preauthorization). Answers a ClaimResponse with \
             outcome queued and preAuthRef = the tracking id to use as CDex TrackingId."},
        {"name": "attachments", "definition": "urn:payerx:OperationDefinition/Claim-attachments",
         "documentation": "GET Claim/{id}/$attachments: the case view, a Parameters with the Claim and every attachment sent under \
             its tracking ids with its link status (linked, held, rejected with the reason, duplicate)."}
    ]);
    if let Some(resources) = cs.pointer_mut("/rest/0/resource").and_then(Value::as_array_mut) {
        if let Some(claim) = resources.iter_mut().find(|r| r["type"] == "Claim").and_then(Value::as_object_mut) {
            claim.insert("operation".into(), claim_ops);
        }
    }
}

/// Declares `$member-match` on Patient and `$bulk-member-match` on Group, with the consent
/// policies this payer honours.
pub fn add_member_match(cs: &mut Value, config: &crate::IngestConfig) {
    let policies = config.consent_policies.join(", ");
    let deadline = config.member_match_deadline.as_millis();
    let bulk_limit = config.max_bulk_member_match_bytes;
    let single = json!({
        "name": "member-match",
        "definition": "http://hl7.org/fhir/us/davinci-hrex/OperationDefinition/member-match",
        "documentation": format!(
            "Da Vinci HRex 1.1 $member-match, for payer backend clients (system scopes). In: MemberPatient, CoverageToMatch, \
             CoverageToLink, Consent (also OldCoverage/NewCoverage); references must point at the MemberPatient. Matching rules, \
             in order: identifier (CoverageToMatch subscriberId/identifier, MemberPatient identifiers, confirmed by birth date, \
             family name, first given name and gender), then demographics (normalized family and given name, birth date, gender; \
             postal code or telecom to tell apart). Exactly one match: 200 with MemberIdentifier (type hrex-temp#UMB) and MemberId. \
             No match, several matches, or a Consent that cannot be honoured: 422. Consent policies honoured: {policies}; the \
             Consent must be active, its period must include today, and its recipient must be the calling payer (the organizations its client is registered for, else the payor of CoverageToLink). \
             The decision is awaited for {deadline} ms, then 503 with Retry-After (send the same request again for its decision). \
             Repeated failed matches by a client answer 429 with Retry-After."
        )
    });
    let bulk = json!({
        "name": "bulk-member-match",
        "definition": "http://hl7.org/fhir/us/davinci-pdex/OperationDefinition/BulkMemberMatch",
        "documentation": format!(
            "Da Vinci PDex 2.x $bulk-member-match (Prefer: respond-async; 202 with Content-Location). MemberBundle 1..* with \
             MemberPatient, CoverageToMatch, CoverageToLink, Consent. Poll the status URL (202 with X-Progress and Retry-After, \
             then a manifest); outputs: MatchedMembers, NonMatchedMembers and ConsentConstrainedMembers Groups as NDJSON. The \
             MatchedMembers Group is also readable at Group/{{job id}}. Requests are limited to {bulk_limit} bytes (413 beyond)."
        )
    });
    if let Some(resources) = cs.pointer_mut("/rest/0/resource").and_then(Value::as_array_mut) {
        for (rtype, op) in [("Patient", single), ("Group", bulk)] {
            if let Some(r) = resources.iter_mut().find(|r| r["type"] == rtype).and_then(Value::as_object_mut) {
                let ops = r.entry("operation").or_insert_with(|| json!([]));
                if let Some(list) = ops.as_array_mut() {
                    list.push(op);
                }
            }
        }
    }
}

pub async fn metadata(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let base = base_url(&state, &headers);
    let mut cs = capability_statement(&base, state.config.max_body_bytes, state.smart_configuration.as_ref());
    add_operations(&mut cs, state.config.max_attachment_request_bytes);
    add_member_match(&mut cs, &state.config);
    fhir_response(StatusCode::OK, &cs)
}

/// `GET /fhir/.well-known/smart-configuration`: JSON whatever the `Accept`; 404 when this server
/// runs without authorization (`--insecure-no-auth`).
pub async fn smart_configuration(State(state): State<SharedState>) -> Response {
    match &state.smart_configuration {
        Some(doc) => {
            let mut resp = (StatusCode::OK, doc.to_string()).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        None => {
            crate::ApiError::not_found("this server runs without authorization (--insecure-no-auth)").into_response()
        }
    }
}
