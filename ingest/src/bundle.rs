//! `POST /fhir` with a `batch` or `transaction` Bundle. A batch becomes one event per entry
//! (each succeeds or fails alone); a transaction becomes one event whose changes the projection
//! applies all together or not at all.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use projections::WriteOutcome;
use schemas::{ChangeAction, IssueType, OperationOutcome, ResourceChange, WriteMode};
use serde_json::{json, Value};

use crate::access::{Caller, Interaction};
use crate::error::{fhir_response, ApiError};
use crate::fhir::{base_url, json_body, parse_etag};
use crate::write::{self, Waited};
use crate::SharedState;

/// Most entries one Bundle may carry; larger loads go through `payerx load`.
pub const MAX_ENTRIES: usize = 10_000;

/// One parsed entry: either a change, or why it cannot be one.
type Parsed = Result<ResourceChange, OperationOutcome>;

fn entry_error(i: usize, code: IssueType, msg: impl Into<String>, field: &str) -> OperationOutcome {
    OperationOutcome::error(code, msg).at(format!("Bundle.entry[{i}].{field}"))
}

/// Turns `entry[i]` into a change. POSTed resources get a fresh id, recorded in `assigned`
/// under the entry's `fullUrl` so references to it can be rewritten.
fn parse_entry(i: usize, entry: &Value, assigned: &mut HashMap<String, String>) -> Parsed {
    let request =
        entry.get("request").ok_or_else(|| entry_error(i, IssueType::Required, "entry has no request", "request"))?;
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let url = request.get("url").and_then(Value::as_str).unwrap_or("").trim_start_matches('/');
    if url.contains('?') || request.get("ifNoneExist").is_some() || request.get("ifNoneMatch").is_some() {
        return Err(entry_error(i, IssueType::NotSupported, "conditional operations are not supported", "request.url"));
    }
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        None => None,
        Some(v) => Some(parse_etag(v).ok_or_else(|| {
            entry_error(i, IssueType::Value, "ifMatch must be a version ETag such as W/\"3\"", "request.ifMatch")
        })?),
    };
    let parts: Vec<&str> = url.split('/').collect();
    let (rtype, id, created) = match (method, parts.as_slice()) {
        ("POST", [t]) => ((*t).to_string(), uuid::Uuid::new_v4().to_string(), true),
        ("PUT" | "DELETE", [t, id]) => ((*t).to_string(), (*id).to_string(), false),
        ("POST" | "PUT" | "DELETE", _) => {
            return Err(entry_error(
                i,
                IssueType::Invalid,
                format!("{method} needs request.url '{{type}}{}'", if method == "POST" { "" } else { "/{id}" }),
                "request.url",
            ))
        }
        _ => {
            return Err(entry_error(
                i,
                IssueType::NotSupported,
                format!("request.method '{method}' is not supported (POST, PUT, DELETE)"),
                "request.method",
            ))
        }
    };
    if !processors::validate::is_resource_type(&rtype) {
        return Err(entry_error(
            i,
            IssueType::NotSupported,
            format!("'{rtype}' is not a FHIR R4 resource type"),
            "request.url",
        ));
    }
    if !processors::validate::is_valid_id(&id) {
        return Err(entry_error(i, IssueType::Value, format!("'{id}' is not a valid id"), "request.url"));
    }
    if let Some(full) = entry.get("fullUrl").and_then(Value::as_str) {
        if full.starts_with("urn:uuid:") || full.starts_with("urn:oid:") {
            assigned.insert(full.to_string(), format!("{rtype}/{id}"));
        }
    }
    if method == "DELETE" {
        return Ok(ResourceChange {
            action: ChangeAction::Delete,
            resource_type: rtype,
            resource_id: id,
            resource: None,
            if_match,
            created: false,
        });
    }
    let mut resource = entry
        .get("resource")
        .cloned()
        .ok_or_else(|| entry_error(i, IssueType::Required, format!("{method} needs a resource"), "resource"))?;
    if created {
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".into(), Value::String(id.clone()));
        }
    }
    Ok(ResourceChange {
        action: ChangeAction::Upsert,
        resource_type: rtype,
        resource_id: id,
        resource: Some(resource.to_string()),
        if_match,
        created,
    })
}

/// Rewrites `reference` values found in `assigned` (a transaction-local `fullUrl`, or a PAS
/// entry turned contained) to what they now point at.
pub(crate) fn rewrite_references(v: &mut Value, assigned: &HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "reference" {
                    if let Some(target) = child.as_str().and_then(|s| assigned.get(s)) {
                        *child = Value::String(target.clone());
                        continue;
                    }
                }
                rewrite_references(child, assigned);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| rewrite_references(c, assigned)),
        _ => {}
    }
}

/// Writes to the payer feed need system scopes for the entry's type and interaction.
fn authorize(caller: &Caller, i: usize, change: &ResourceChange) -> Result<(), OperationOutcome> {
    let interaction = match change.action {
        ChangeAction::Delete => Interaction::Delete,
        ChangeAction::Upsert if change.created => Interaction::Create,
        ChangeAction::Upsert => Interaction::Update,
    };
    caller
        .authorize_write(&change.resource_type, interaction)
        .map_err(|e| e.outcome.at(format!("Bundle.entry[{i}].request")))
}

/// Validates the (possibly rewritten) resource of a change.
fn check(i: usize, change: &ResourceChange) -> Result<(), OperationOutcome> {
    processors::check_change(change, Some(&format!("Bundle.entry[{i}].resource")))
}

fn response_entry(base: &str, status: u16, e: Option<&projections::EntryOutcome>, outcome: Option<&Value>) -> Value {
    let mut response = json!({"status": status.to_string()});
    if let Some(e) = e {
        if let Some(v) = e.version_id {
            if status != 204 {
                response["location"] = Value::String(format!("{base}/fhir/{}/{}/_history/{v}", e.resource_type, e.id));
            }
            response["etag"] = Value::String(format!("W/\"{v}\""));
        }
        if let Some(lu) = &e.last_updated {
            response["lastModified"] = Value::String(lu.clone());
        }
    }
    if let Some(o) = outcome {
        response["outcome"] = o.clone();
    }
    json!({"response": response})
}

fn pending_entry(base: &str, event_id: &str) -> Value {
    let url = format!("{base}/fhir/_writes/{event_id}");
    let oo = OperationOutcome::information(format!("accepted and still being processed; poll {url}"));
    json!({"response": {"status": "202", "location": url, "outcome": oo.to_json()}})
}

pub async fn batch_or_transaction(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bundle = json_body(&state, &headers, body).await?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::bad_request("POST /fhir takes a Bundle of type batch or transaction").at("resourceType"));
    }
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    let entries = match bundle.get("entry") {
        None => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, IssueType::Structure, "Bundle.entry must be an array")
                .at("Bundle.entry"))
        }
    };
    if entries.len() > MAX_ENTRIES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooLong,
            format!(
                "{} entries exceed the limit of {MAX_ENTRIES} per Bundle; split it or use payerx load",
                entries.len()
            ),
        ));
    }
    let base = base_url(&state, &headers);
    let corr = write::request_id(&headers);
    match kind {
        "batch" => batch(&state, &caller, &base, &corr, entries).await,
        "transaction" => transaction(&state, &caller, &headers, &base, &corr, entries).await,
        other => {
            Err(ApiError::bad_request(format!("Bundle.type '{other}' cannot be processed; use batch or transaction"))
                .at("Bundle.type"))
        }
    }
}

async fn batch(
    state: &SharedState,
    caller: &Caller,
    base: &str,
    corr: &str,
    entries: &[Value],
) -> Result<Response, ApiError> {
    let mut parsed: Vec<Parsed> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let mut assigned = HashMap::new();
        parsed.push(
            parse_entry(i, entry, &mut assigned)
                .and_then(|c| authorize(caller, i, &c).map(|_| c))
                .and_then(|c| check(i, &c).map(|_| c)),
        );
    }
    let events: Vec<_> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|c| write::event(corr, caller.client_id(), WriteMode::BatchEntry, vec![c.clone()]))
        .collect();
    let mut waited = write::submit(state, events).await?.into_iter();
    let out: Vec<Value> = parsed
        .iter()
        .map(|p| match p {
            Err(oo) => {
                let status = if oo.issue.iter().any(|i| i.code == IssueType::Forbidden) { 403 } else { 400 };
                response_entry(base, status, None, Some(&oo.to_json()))
            }
            Ok(_) => match waited.next() {
                Some(Waited::Done(o)) => single_entry(base, &o),
                Some(Waited::Pending(id)) => pending_entry(base, &id),
                None => response_entry(base, 500, None, None),
            },
        })
        .collect();
    Ok(fhir_response(StatusCode::OK, &json!({"resourceType": "Bundle", "type": "batch-response", "entry": out})))
}

fn single_entry(base: &str, o: &WriteOutcome) -> Value {
    let e = o.entries.first();
    let outcome = o.outcome.as_ref().or(e.and_then(|e| e.outcome.as_ref()));
    response_entry(base, o.status, e, outcome)
}

async fn transaction(
    state: &SharedState,
    caller: &Caller,
    headers: &HeaderMap,
    base: &str,
    corr: &str,
    entries: &[Value],
) -> Result<Response, ApiError> {
    let mut assigned = HashMap::new();
    let mut changes = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        changes.push(
            parse_entry(i, entry, &mut assigned).map_err(|oo| ApiError::with_outcome(StatusCode::BAD_REQUEST, oo))?,
        );
    }
    for (i, c) in changes.iter().enumerate() {
        authorize(caller, i, c).map_err(|oo| ApiError::with_outcome(StatusCode::FORBIDDEN, oo))?;
    }
    let mut seen = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        if let Some(j) = seen.insert((c.resource_type.clone(), c.resource_id.clone()), i) {
            return Err(ApiError::with_outcome(
                StatusCode::BAD_REQUEST,
                entry_error(
                    i,
                    IssueType::Duplicate,
                    format!(
                        "{}/{} is also written by entry {j}; a transaction may touch a resource once",
                        c.resource_type, c.resource_id
                    ),
                    "request.url",
                ),
            ));
        }
    }
    for (i, c) in changes.iter_mut().enumerate() {
        if !assigned.is_empty() {
            if let Some(body) = c.resource.as_deref() {
                if let Ok(mut v) = serde_json::from_str::<Value>(body) {
                    rewrite_references(&mut v, &assigned);
                    c.resource = Some(v.to_string());
                }
            }
        }
        check(i, c).map_err(|oo| ApiError::with_outcome(StatusCode::BAD_REQUEST, oo))?;
    }
    if changes.is_empty() {
        return Ok(fhir_response(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": []}),
        ));
    }
    let mut waited =
        write::submit(state, vec![write::event(corr, caller.client_id(), WriteMode::Transaction, changes)]).await?;
    let o = match waited.remove(0) {
        Waited::Pending(id) => return Ok(write::pending_response(state, headers, &id)),
        Waited::Done(o) => o,
    };
    if o.status >= 300 {
        let oo = o.outcome.as_ref().and_then(OperationOutcome::from_json).unwrap_or_else(|| {
            OperationOutcome::error(IssueType::Processing, "the transaction was refused; nothing was written")
        });
        return Err(ApiError::with_outcome(StatusCode::from_u16(o.status).unwrap_or(StatusCode::BAD_REQUEST), oo));
    }
    let out: Vec<Value> = o.entries.iter().map(|e| response_entry(base, e.status, Some(e), None)).collect();
    Ok(fhir_response(StatusCode::OK, &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": out})))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references_to_local_full_urls_are_rewritten() {
        let mut assigned = HashMap::new();
        assigned.insert("urn:uuid:1".to_string(), "Patient/abc".to_string());
        let mut v = json!({"subject": {"reference": "urn:uuid:1"}, "x": [{"reference": "Patient/other"}]});
        rewrite_references(&mut v, &assigned);
        assert_eq!(v["subject"]["reference"], "Patient/abc");
        assert_eq!(v["x"][0]["reference"], "Patient/other");
    }

    #[test]
    fn entries_are_parsed_with_precise_errors() {
        let mut a = HashMap::new();
        let e = parse_entry(3, &json!({"request": {"method": "PATCH", "url": "Patient/1"}}), &mut a).unwrap_err();
        assert_eq!(e.issue[0].expression, vec!["Bundle.entry[3].request.method"]);
        let e = parse_entry(0, &json!({"request": {"method": "PUT", "url": "Patient"}}), &mut a).unwrap_err();
        assert_eq!(e.issue[0].expression, vec!["Bundle.entry[0].request.url"]);
        let c = parse_entry(0, &json!({"fullUrl": "urn:uuid:x", "request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}), &mut a).unwrap();
        assert!(c.created);
        assert_eq!(a["urn:uuid:x"], format!("Patient/{}", c.resource_id));
        let c =
            parse_entry(0, &json!({"request": {"method": "DELETE", "url": "Patient/1", "ifMatch": "W/\"2\""}}), &mut a)
                .unwrap();
        assert_eq!((c.action, c.if_match), (ChangeAction::Delete, Some(2)));
    }
}
