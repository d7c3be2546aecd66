//! FHIR REST interactions on single resources: read, vread, history, create, update, delete.

use axum::body::Body;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use processors::validate::{is_resource_type, is_valid_id};
use projections::{StoredResource, WriteOutcome};
use schemas::{ChangeAction, IssueType, OperationOutcome, ResourceChange, WriteMode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{Caller, Interaction, Visibility};
use crate::error::{fhir_raw, fhir_response, ApiError};
use crate::write::{self, Waited};
use crate::SharedState;

/// `https://host/` of this request, without a trailing slash.
pub fn base_url(state: &SharedState, headers: &HeaderMap) -> String {
    if let Some(b) = &state.config.base_url {
        return b.trim_end_matches('/').to_string();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let proto = headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()).unwrap_or("http");
    format!("{proto}://{host}")
}

pub fn check_type(rtype: &str) -> Result<(), ApiError> {
    if is_resource_type(rtype) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            IssueType::NotSupported,
            format!("'{rtype}' is not a FHIR R4 resource type"),
        ))
    }
}

pub fn check_id(rtype: &str, id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Value,
            format!("'{id}' is not a valid id (1-64 of A-Z a-z 0-9 - .)"),
        )
        .at(format!("{rtype}.id")))
    }
}

/// Reads a JSON request body: checks the media type (415), the size (413, before parsing) and
/// the JSON itself (400).
/// 415 unless the body is declared as FHIR JSON.
pub fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !matches!(mime.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueType::NotSupported,
            format!("Content-Type '{ctype}' is not supported; send application/fhir+json"),
        ));
    }
    Ok(())
}

pub async fn json_body(state: &SharedState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    check_json_content_type(headers)?;
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooLong,
            format!("the request body exceeds the limit of {limit} bytes (--max-body-bytes)"),
        )
    };
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, IssueType::Structure, format!("the body is not valid JSON: {e}"))
    })
}

/// `W/"3"`, `"3"` or `3` → 3.
pub fn parse_etag(value: &str) -> Option<i64> {
    value.trim().trim_start_matches("W/").trim_matches('"').parse().ok()
}

fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_etag)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("If-Match must be a version ETag such as W/\"3\"")),
    }
}

pub fn http_date(micros: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64);
    httpdate::fmt_http_date(t)
}

/// A stored version as a response: body, `ETag`, `Last-Modified`.
pub fn resource_response(status: StatusCode, r: &StoredResource, location: Option<String>) -> Response {
    let mut resp = fhir_raw(status, r.content.clone().unwrap_or_default());
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", r.version_id)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(r.last_updated_us)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, l);
    }
    resp
}

fn gone(r: &StoredResource) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        IssueType::Deleted,
        format!("{}/{} was deleted (version {})", r.resource_type, r.id, r.version_id),
    )
}

pub async fn read(
    State(state): State<SharedState>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    check_id(&rtype, &id)?;
    let vis = caller.authorize(&rtype, Interaction::Read)?;
    let found = state.store.read(&rtype, &id).await?;
    // Outside the caller's compartment is answered exactly like absent: nothing leaks.
    let found = found.filter(|r| vis == Visibility::All || (!r.deleted && vis.allows_json(r.content.as_deref())));
    match found {
        Some(r) if r.deleted => {
            let mut resp = gone(&r).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", r.version_id)) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            Ok(resp)
        }
        Some(r) => Ok(resource_response(StatusCode::OK, &r, None)),
        None => Err(ApiError::not_found(format!("{rtype}/{id} is not known"))),
    }
}

pub async fn vread(
    State(state): State<SharedState>,
    caller: Caller,
    Path((rtype, id, vid)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    check_id(&rtype, &id)?;
    let vis = caller.authorize(&rtype, Interaction::Read)?;
    let v: i64 = vid.parse().map_err(|_| ApiError::not_found(format!("'{vid}' is not a version of {rtype}/{id}")))?;
    let found = state.store.vread(&rtype, &id, v).await?;
    let found = found.filter(|r| vis == Visibility::All || (!r.deleted && vis.allows_json(r.content.as_deref())));
    match found {
        Some(r) if r.deleted => Err(gone(&r)),
        Some(r) => Ok(resource_response(StatusCode::OK, &r, None)),
        None => Err(ApiError::not_found(format!("{rtype}/{id} has no version {v}"))),
    }
}

#[derive(Debug, Deserialize)]
pub struct HistoryParams {
    #[serde(rename = "_count")]
    count: Option<String>,
    /// Paging cursor: versions older than this one.
    #[serde(rename = "_before-version")]
    before_version: Option<i64>,
}

/// `GET /fhir/{type}/{id}/_history`: a history Bundle, newest first, paged by `_count`.
pub async fn history(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    Query(q): Query<HistoryParams>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    check_id(&rtype, &id)?;
    let count = match q.count.as_deref() {
        None => 50,
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|c| (1..=1000).contains(c))
            .ok_or_else(|| ApiError::bad_request("_count must be an integer from 1 to 1000").at("_count"))?,
    };
    let vis = caller.authorize(&rtype, Interaction::Read)?;
    let mut versions = state.store.history(&rtype, &id, count + 1, q.before_version).await?;
    if vis != Visibility::All {
        // Only versions the caller may see; deletion markers carry nothing to check, so they go.
        versions.retain(|r| !r.deleted && vis.allows_json(r.content.as_deref()));
    }
    if versions.is_empty() && q.before_version.is_none() {
        return Err(ApiError::not_found(format!("{rtype}/{id} is not known")));
    }
    let base = base_url(&state, &headers);
    let more = versions.len() as i64 > count;
    let page = &versions[..versions.len().min(count as usize)];
    let entries: Vec<Value> = page
        .iter()
        .map(|r| {
            let full_url = format!("{base}/fhir/{rtype}/{id}");
            let method = r.method.as_deref().unwrap_or(if r.deleted { "DELETE" } else { "PUT" });
            let mut e = json!({
                "fullUrl": full_url,
                "request": {"method": method, "url": format!("{rtype}/{id}")},
                "response": {"status": if r.deleted { "204" } else if r.version_id == 1 || method == "POST" { "201" } else { "200" },
                             "etag": format!("W/\"{}\"", r.version_id), "lastModified": r.last_updated},
            });
            if let Some(c) = &r.content {
                e["resource"] = serde_json::from_str(c).unwrap_or(Value::Null);
            }
            e
        })
        .collect();
    let self_url = format!("{base}/fhir/{rtype}/{id}/_history?_count={count}");
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if more {
        if let Some(last) = page.last() {
            links.push(json!({"relation": "next", "url": format!("{self_url}&_before-version={}", last.version_id)}));
        }
    }
    let bundle = json!({"resourceType": "Bundle", "type": "history", "link": links, "entry": entries});
    Ok(fhir_response(StatusCode::OK, &bundle))
}

/// Checks a resource body for a write of `rtype/id`, and turns it into a change.
fn upsert_change(
    rtype: &str,
    id: &str,
    mut body: Value,
    if_match: Option<i64>,
    created: bool,
) -> Result<ResourceChange, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the body must be a FHIR resource (a JSON object)"));
    }
    if created {
        // POST: the server assigns the id; an id in the body is ignored, as FHIR says.
        body["id"] = Value::String(id.to_string());
    }
    processors::validate_processor::check_resource(&body, rtype, id, None)
        .map_err(|oo| ApiError::with_outcome(StatusCode::BAD_REQUEST, oo))?;
    Ok(ResourceChange {
        action: ChangeAction::Upsert,
        resource_type: rtype.into(),
        resource_id: id.into(),
        resource: Some(body.to_string()),
        if_match,
        created,
    })
}

/// Answers a single-resource write from its outcome.
async fn respond(state: &SharedState, headers: &HeaderMap, waited: Waited) -> Result<Response, ApiError> {
    let o: WriteOutcome = match waited {
        Waited::Pending(event_id) => return Ok(write::pending_response(state, headers, &event_id)),
        Waited::Done(o) => o,
    };
    let entry = match o.entries.first() {
        Some(e) if o.status < 300 => e,
        _ => {
            let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::BAD_REQUEST);
            let oo = o.outcome.as_ref().or(o.entries.first().and_then(|e| e.outcome.as_ref()));
            let oo = oo
                .and_then(OperationOutcome::from_json)
                .unwrap_or_else(|| OperationOutcome::error(IssueType::Processing, "the write was refused"));
            return Err(ApiError::with_outcome(status, oo));
        }
    };
    if entry.status == 204 {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        if let Some(v) = entry.version_id.and_then(|v| HeaderValue::from_str(&format!("W/\"{v}\"")).ok()) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return Ok(resp);
    }
    let v = entry.version_id.unwrap_or(1);
    let stored = state.store.vread(&entry.resource_type, &entry.id, v).await?;
    let Some(stored) = stored else {
        // Applied, then superseded by a replay swap before we read it: report without a body.
        return Ok(StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK).into_response());
    };
    let location = format!("{}/fhir/{}/{}/_history/{v}", base_url(state, headers), entry.resource_type, entry.id);
    Ok(resource_response(StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK), &stored, Some(location)))
}

pub async fn update(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    caller.authorize_write(&rtype, Interaction::Update)?;
    check_id(&rtype, &id)?;
    let body = json_body(&state, &headers, body).await?;
    let change = upsert_change(&rtype, &id, body, if_match(&headers)?, false)?;
    let corr = write::request_id(&headers);
    let mut waited =
        write::submit(&state, vec![write::event(&corr, caller.client_id(), WriteMode::Single, vec![change])]).await?;
    respond(&state, &headers, waited.remove(0)).await
}

pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    caller.authorize_write(&rtype, Interaction::Create)?;
    if headers.contains_key("if-none-exist") {
        // Ignoring it would create the duplicate the client is guarding against.
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::NotSupported,
            "conditional create (If-None-Exist) is not supported",
        ));
    }
    let body = json_body(&state, &headers, body).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let change = upsert_change(&rtype, &id, body, None, true)?;
    let corr = write::request_id(&headers);
    let mut waited =
        write::submit(&state, vec![write::event(&corr, caller.client_id(), WriteMode::Single, vec![change])]).await?;
    respond(&state, &headers, waited.remove(0)).await
}

pub async fn delete(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    caller.authorize_write(&rtype, Interaction::Delete)?;
    check_id(&rtype, &id)?;
    let change = ResourceChange {
        action: ChangeAction::Delete,
        resource_type: rtype,
        resource_id: id,
        resource: None,
        if_match: if_match(&headers)?,
        created: false,
    };
    let corr = write::request_id(&headers);
    let mut waited =
        write::submit(&state, vec![write::event(&corr, caller.client_id(), WriteMode::Single, vec![change])]).await?;
    respond(&state, &headers, waited.remove(0)).await
}

pub async fn unknown_route(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::not_found(format!("no FHIR interaction at {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueType::NotSupported,
        format!("{method} is not supported on {}", uri.path()),
    )
}
