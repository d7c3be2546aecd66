//! `POST /fhir/$submit-attachment` (Da Vinci CDex 2.1): a provider sends clinical documents for
//! a claim or a prior authorization, named by its tracking id.
//!
//! The body streams through [`crate::attachment_body`]: inline bytes go to the blob store while
//! they arrive, and only the Parameters without them reach [`submission`], which checks every
//! rule of the OperationDefinition and builds the SUBMITTED event. The attachment-link
//! projection decides, downstream, whether it is linked, held or rejected.

use axum::http::StatusCode;
use schemas::{
    AttachTo, AttachmentContent, AttachmentEvent, AttachmentEventKind, Blob, Envelope, Identifier, IssueType,
    OperationOutcome, SubmittedAttachment,
};
use serde_json::Value;

use crate::error::ApiError;

/// The parameters of the CDex 2.1.0 OperationDefinition, and their cardinality (max 1 or many).
const PARAMETERS: &[(&str, bool)] = &[
    ("TrackingId", false),
    ("AdminRefNumber", false),
    ("AttachTo", false),
    ("PayerId", false),
    ("OrganizationId", false),
    ("ProviderId", false),
    ("MemberId", false),
    ("ServiceDate", false),
    ("Attachment", true),
    ("Final", false),
];

/// Inline bytes already in the blob store, by the JSON pointer of their Attachment object.
#[derive(Debug, Clone)]
pub struct StoredBytes {
    pub pointer: String,
    pub blob: Blob,
}

fn invalid(code: IssueType, msg: impl Into<String>, at: impl Into<String>) -> ApiError {
    ApiError::with_outcome(StatusCode::BAD_REQUEST, OperationOutcome::error(code, msg).at(at))
}

fn required(name: &str, at: &str) -> ApiError {
    invalid(IssueType::Required, format!("the {name} parameter is required"), at)
}

fn identifier(p: &Value, name: &str, at: &str) -> Result<Identifier, ApiError> {
    let v = p.get("valueIdentifier").ok_or_else(|| {
        invalid(IssueType::Invalid, format!("{name} must be a valueIdentifier"), format!("{at}.value"))
    })?;
    let value = v.get("value").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
        invalid(IssueType::Required, format!("{name} needs an identifier value"), format!("{at}.valueIdentifier.value"))
    })?;
    Ok(Identifier { system: v.get("system").and_then(Value::as_str).map(str::to_string), value: value.to_string() })
}

/// A submission that passed every rule: the event to append, less its envelope.
#[derive(Debug, Clone)]
pub struct Submission {
    pub tracking_id: String,
    pub event: AttachmentEvent,
}

/// Checks a `$submit-attachment` Parameters (inline bytes already extracted to `stored`) and
/// builds its SUBMITTED event. `binary_base` is where payerx serves the bytes
/// (`{base}/fhir/Binary`).
pub fn submission(
    params: &Value,
    stored: &[StoredBytes],
    envelope: Envelope,
    submission_id: &str,
    binary_base: &str,
) -> Result<Submission, ApiError> {
    if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(
            IssueType::Invalid,
            format!(
                "$submit-attachment expects a Parameters resource, not {}",
                params.get("resourceType").and_then(Value::as_str).unwrap_or("a resource without resourceType")
            ),
            "resourceType",
        ));
    }
    let list = params.get("parameter").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut seen: Vec<(&str, usize, &Value)> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("Parameters.parameter[{i}]");
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some((_, many)) = PARAMETERS.iter().find(|(n, _)| *n == name) else {
            return Err(invalid(
                IssueType::NotSupported,
                format!("'{name}' is not a parameter of $submit-attachment"),
                format!("{at}.name"),
            ));
        };
        if !many && seen.iter().any(|(n, _, _)| *n == name) {
            return Err(invalid(IssueType::Structure, format!("{name} may appear only once"), at));
        }
        seen.push((name, i, p));
    }
    let one = |name: &str| {
        seen.iter().find(|(n, _, _)| *n == name).map(|(_, i, p)| (format!("Parameters.parameter[{i}]"), *p))
    };

    let (at, p) = one("TrackingId").ok_or_else(|| required("TrackingId", "Parameters.parameter"))?;
    let tracking = identifier(p, "TrackingId", &at)?;
    let (at, p) = one("AttachTo").ok_or_else(|| required("AttachTo", "Parameters.parameter"))?;
    let code = p.get("valueCode").and_then(Value::as_str).unwrap_or_default();
    let attach_to = AttachTo::from_code(code).ok_or_else(|| {
        invalid(
            IssueType::Value,
            format!("AttachTo must be 'claim' or 'preauthorization', not '{code}'"),
            format!("{at}.valueCode"),
        )
    })?;
    let (at, p) = one("MemberId").ok_or_else(|| required("MemberId", "Parameters.parameter"))?;
    let member = identifier(p, "MemberId", &at)?;
    let optional = |name: &str| one(name).map(|(at, p)| identifier(p, name, &at)).transpose();
    let (payer, organization, provider, admin_ref) =
        (optional("PayerId")?, optional("OrganizationId")?, optional("ProviderId")?, optional("AdminRefNumber")?);
    if organization.is_none() && provider.is_none() {
        return Err(invalid(
            IssueType::Required,
            "ProviderId or OrganizationId (or both) must be present",
            "Parameters.parameter",
        ));
    }
    let service_date = match one("ServiceDate") {
        None => None,
        Some((at, p)) => Some(
            p.get("valueDateTime")
                .or_else(|| p.get("valueDate"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(IssueType::Invalid, "ServiceDate must be a valueDateTime", format!("{at}.value"))
                })?
                .to_string(),
        ),
    };
    if attach_to == AttachTo::Claim {
        // Day precision: YYYY-MM-DD, optionally with a time.
        let day_precise = service_date.as_deref().is_some_and(|d| {
            d.len() >= 10
                && d.as_bytes()[4] == b'-'
                && d.as_bytes()[7] == b'-'
                && d[..4].bytes().all(|b| b.is_ascii_digit())
        });
        if !day_precise {
            return Err(invalid(
                IssueType::Required,
                "ServiceDate, precise to the day, is required when AttachTo is 'claim'",
                one("ServiceDate").map_or("Parameters.parameter".to_string(), |(at, _)| at),
            ));
        }
    }
    let is_final = match one("Final") {
        None => None,
        Some((at, p)) => Some(p.get("valueBoolean").and_then(Value::as_bool).ok_or_else(|| {
            invalid(IssueType::Invalid, "Final must be a valueBoolean", format!("{at}.valueBoolean"))
        })?),
    };
    let attachments: Vec<_> = seen.iter().filter(|(n, _, _)| *n == "Attachment").collect();
    if attachments.is_empty() {
        return Err(required("Attachment", "Parameters.parameter"));
    }
    let mut out = Vec::with_capacity(attachments.len());
    for (_, i, p) in attachments {
        out.push(attachment(*i, p, stored, binary_base)?);
    }
    let mut event = AttachmentEvent::new(envelope, AttachmentEventKind::Submitted, tracking.value.clone());
    event.submission_id = Some(submission_id.to_string());
    event.attach_to = Some(attach_to);
    event.member_id = Some(member);
    (event.payer_id, event.organization_id, event.provider_id, event.admin_ref_number) =
        (payer, organization, provider, admin_ref);
    event.service_date = service_date;
    event.is_final = is_final;
    event.attachments = out;
    Ok(Submission { tracking_id: tracking.value, event })
}

/// One `Attachment` parameter: its parts checked, its Content's attachments pointing at the
/// stored bytes (or at the URL they will be fetched from).
fn attachment(i: usize, p: &Value, stored: &[StoredBytes], binary_base: &str) -> Result<SubmittedAttachment, ApiError> {
    let at = format!("Parameters.parameter[{i}]");
    let mut line_items = Vec::new();
    let mut code = None;
    let mut content: Option<(usize, &Value)> = None;
    for (j, part) in p.get("part").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let pat = format!("{at}.part[{j}]");
        match part.get("name").and_then(Value::as_str).unwrap_or_default() {
            "LineItem" => line_items.push(
                part.get("valueString")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid(IssueType::Invalid, "LineItem must be a valueString", format!("{pat}.valueString"))
                    })?
                    .to_string(),
            ),
            "Code" if code.is_some() => return Err(invalid(IssueType::Structure, "Code may appear only once", pat)),
            "Code" => {
                let c = part.get("valueCodeableConcept").ok_or_else(|| {
                    invalid(
                        IssueType::Invalid,
                        "Code must be a valueCodeableConcept",
                        format!("{pat}.valueCodeableConcept"),
                    )
                })?;
                code = Some(c.to_string());
            }
            "Content" if content.is_some() => {
                return Err(invalid(IssueType::Structure, "Content may appear only once per Attachment", pat))
            }
            "Content" => content = Some((j, part)),
            other => {
                return Err(invalid(
                    IssueType::NotSupported,
                    format!("'{other}' is not a part of the Attachment parameter"),
                    format!("{pat}.name"),
                ))
            }
        }
    }
    let Some((j, part)) = content else {
        return Err(invalid(IssueType::Required, "every Attachment needs a Content part", format!("{at}.part")));
    };
    let rat = format!("{at}.part[{j}].resource");
    let Some(resource) = part.get("resource") else {
        return Err(invalid(IssueType::Required, "Content must carry a resource", rat));
    };
    let rtype = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_string();
    if !matches!(rtype.as_str(), "DocumentReference" | "QuestionnaireResponse") {
        return Err(invalid(
            IssueType::NotSupported,
            format!("Content must be a DocumentReference or a QuestionnaireResponse, not {rtype}"),
            format!("{rat}.resourceType"),
        ));
    }
    let pointer = format!("/parameter/{i}/part/{j}/resource");
    let mut resource = resource.clone();
    let mut contents = Vec::new();
    // Every Attachment object of the resource: DocumentReference.content[].attachment and
    // QuestionnaireResponse answers' valueAttachment.
    let mut places = Vec::new();
    attachment_objects(&resource, String::new(), &mut places);
    for path in places {
        let Some(obj) = resource.pointer_mut(&path) else { continue };
        let fhir_at = format!("{rat}{}", fhir_path(&path));
        let from_store = stored.iter().find(|s| s.pointer == format!("{pointer}{path}"));
        let content_type = obj.get("contentType").and_then(Value::as_str).map(str::to_string);
        match from_store {
            Some(s) => {
                if let Some(size) = obj.get("size").and_then(Value::as_i64) {
                    if size != s.blob.size {
                        return Err(invalid(
                            IssueType::Value,
                            format!("attachment.size is {size}, but the data decodes to {} bytes", s.blob.size),
                            format!("{fhir_at}.size"),
                        ));
                    }
                }
                if let Some(hash) = obj.get("hash").and_then(Value::as_str) {
                    if hash != s.blob.sha1 {
                        return Err(invalid(
                            IssueType::Value,
                            format!("attachment.hash is {hash}, but the SHA-1 of the data is {}", s.blob.sha1),
                            format!("{fhir_at}.hash"),
                        ));
                    }
                }
                obj["url"] = Value::String(format!("{binary_base}/{}", s.blob.sha256));
                obj["size"] = Value::from(s.blob.size);
                obj["hash"] = Value::String(s.blob.sha1.clone());
                contents.push(AttachmentContent { path, content_type, source_url: None, blob: Some(s.blob.clone()) });
            }
            None => match obj.get("url").and_then(Value::as_str) {
                Some(url) => contents.push(AttachmentContent {
                    path,
                    content_type,
                    source_url: Some(url.to_string()),
                    blob: None,
                }),
                None => {
                    return Err(invalid(
                        IssueType::Required,
                        "an attachment needs its bytes: inline in data, or by url",
                        fhir_at,
                    ))
                }
            },
        }
    }
    if contents.is_empty() && rtype == "DocumentReference" {
        return Err(invalid(
            IssueType::Required,
            "the DocumentReference has no content[].attachment",
            format!("{rat}.content"),
        ));
    }
    Ok(SubmittedAttachment {
        index: i32::try_from(i).unwrap_or(i32::MAX),
        line_items,
        code,
        resource_type: rtype,
        resource: resource.to_string(),
        document_reference: None,
        content: contents,
    })
}

/// JSON pointers (relative to the resource) of the Attachment objects inside it.
fn attachment_objects(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                if matches!(k.as_str(), "attachment" | "valueAttachment") && child.is_object() {
                    out.push(here);
                } else if k != "contained" {
                    attachment_objects(child, here, out);
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                attachment_objects(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `/content/0/attachment` → `.content[0].attachment`, to name elements the FHIR way.
fn fhir_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        if seg.bytes().all(|b| b.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(seg);
        }
    }
    out
}

/// `GET /fhir/Claim/{id}/$attachments`: the case view. The Claim (or prior authorization) with
/// every attachment sent under its tracking ids and what became of each: linked, held,
/// rejected (with the reason), or a duplicate of an earlier one.
pub async fn case_view(
    axum::extract::State(state): axum::extract::State<crate::SharedState>,
    caller: crate::access::Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use schemas::smart::Interaction;
    let vis = caller.authorize("Claim", Interaction::Read)?;
    let claim = state
        .store
        .read("Claim", &id)
        .await?
        .filter(|r| !r.deleted && (vis == crate::access::Visibility::All || vis.allows_json(r.content.as_deref())))
        .and_then(|r| r.content)
        .and_then(|c| serde_json::from_str::<Value>(&c).ok())
        .ok_or_else(|| ApiError::not_found(format!("Claim/{id} is not known")))?;
    let view = state.links.case(&format!("Claim/{id}")).await?;
    let mut parameter = vec![serde_json::json!({"name": "case", "resource": claim})];
    for t in &view.tracking_ids {
        parameter.push(serde_json::json!({"name": "trackingId", "valueString": t}));
    }
    for (tracking, by) in &view.closed_by {
        parameter.push(serde_json::json!({"name": "closedBy", "part": [
            {"name": "trackingId", "valueString": tracking}, {"name": "submission", "valueString": by}]}));
    }
    for item in &view.items {
        let mut part = vec![
            serde_json::json!({"name": "submission", "valueString": item.submission_id}),
            serde_json::json!({"name": "index", "valueInteger": item.index}),
            serde_json::json!({"name": "trackingId", "valueString": item.tracking_id}),
            serde_json::json!({"name": "status", "valueCode": item.status.as_str()}),
            serde_json::json!({"name": "final", "valueBoolean": item.is_final}),
            serde_json::json!({"name": "received", "valueInstant": projections::resources::instant(item.received_at)}),
        ];
        if let Some(d) = &item.document_reference {
            part.push(serde_json::json!({"name": "documentReference", "valueReference": {"reference": d}}));
        }
        if let Some(r) = &item.reason {
            part.push(serde_json::json!({"name": "reason", "valueString": r}));
        }
        for l in &item.attachment.line_items {
            part.push(serde_json::json!({"name": "lineItem", "valueString": l}));
        }
        for l in &item.unknown_line_items {
            part.push(serde_json::json!({"name": "unknownLineItem", "valueString": l}));
        }
        if let Ok(content) = serde_json::from_str::<Value>(&item.attachment.resource) {
            part.push(serde_json::json!({"name": "content", "resource": content}));
        }
        parameter.push(serde_json::json!({"name": "attachment", "part": part}));
    }
    Ok(crate::error::fhir_response(
        StatusCode::OK,
        &serde_json::json!({"resourceType": "Parameters", "parameter": parameter}),
    ))
}

/// `GET /fhir/Binary/{id}`: the bytes of an attachment (the id is their SHA-256), streamed with
/// the content type it was sent with. A patient-scoped token sees only the attachments linked
/// to a case of its patient; other Binary ids are ordinary stored resources.
pub async fn binary(
    axum::extract::State(state): axum::extract::State<crate::SharedState>,
    caller: crate::access::Caller,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::{header, HeaderValue};
    use schemas::smart::Interaction;
    let is_hash = id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hash {
        return crate::fhir::read(axum::extract::State(state), caller, axum::extract::Path(("Binary".to_string(), id)))
            .await;
    }
    let vis = caller.authorize("Binary", Interaction::Read)?;
    let holders = state.links.blob_holders(&id).await?;
    let visible: Vec<_> = holders
        .iter()
        .filter(|h| match &vis {
            crate::access::Visibility::All => true,
            crate::access::Visibility::Compartment(pid) => h.patient.as_deref() == Some(&format!("Patient/{pid}")),
        })
        .collect();
    let not_found = || ApiError::not_found(format!("Binary/{id} is not known"));
    if visible.is_empty() {
        return Err(not_found());
    }
    let content_type =
        visible.iter().find_map(|h| h.content_type.clone()).unwrap_or_else(|| "application/octet-stream".into());
    let etag = format!("\"{id}\"");
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok(axum::response::IntoResponse::into_response(StatusCode::NOT_MODIFIED));
    }
    let blob = state.blobs.open(&id).await.map_err(|e| {
        if e.is_retriable() {
            ApiError::unavailable(format!("the attachment store is unavailable: {e}"))
        } else {
            ApiError::internal(e)
        }
    })?;
    let Some(blob) = blob else { return Err(not_found()) };
    let mut resp = axum::response::Response::new(axum::body::Body::from_stream(blob.stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.size));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    Ok(resp)
}

/// `POST /fhir/$submit-attachment`.
pub async fn submit_attachment(
    axum::extract::State(state): axum::extract::State<crate::SharedState>,
    caller: crate::access::Caller,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<axum::response::Response, ApiError> {
    use crate::attachment_body::{content_length, read_attachment_body, Limits};
    use schemas::smart::Interaction;
    caller.authorize_write("DocumentReference", Interaction::Create)?;
    crate::fhir::check_json_content_type(&headers)?;
    let limits = Limits { max_request_bytes: state.config.max_attachment_request_bytes, ..Limits::default() };
    let read = read_attachment_body(body, content_length(&headers), &state.blobs, &limits).await?;
    let stored: Vec<StoredBytes> = read
        .attachments
        .iter()
        .map(|a| StoredBytes {
            pointer: a.pointer.clone(),
            blob: Blob {
                sha256: a.blob.sha256.clone(),
                sha1: a.blob.sha1_base64.clone(),
                size: i64::try_from(a.blob.size).unwrap_or(i64::MAX),
                location: a.blob.location.clone(),
            },
        })
        .collect();
    let correlation = crate::write::request_id(&headers);
    let envelope = Envelope::new(AttachmentEvent::EVENT_TYPE, 1, correlation, caller.client_id().map(str::to_string));
    let submission_id = envelope.event_id.clone();
    let base = crate::fhir::base_url(&state, &headers);
    let sub = submission(&read.parameters, &stored, envelope, &submission_id, &format!("{base}/fhir/Binary"))?;
    // The whole Parameters (bytes aside) against the R4 structure rules.
    processors::validate::validate_resource(&read.parameters)
        .map_err(|issues| ApiError::with_outcome(StatusCode::BAD_REQUEST, OperationOutcome { issue: issues }))?;
    let known = state.links.tracking(&sub.tracking_id).await?;
    if let Some(closer) = &known.closed_by {
        return Err(ApiError::with_outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            OperationOutcome::error(
                IssueType::BusinessRule,
                format!(
                    "the attachment set of tracking id {} was closed by submission {closer} (Final=true); \
                     nothing more is accepted for it",
                    sub.tracking_id
                ),
            )
            .at("Parameters.parameter"),
        ));
    }
    let value = schemas::encode_event(&sub.event).map_err(ApiError::internal)?;
    let topic = schemas::topics::full(&state.config.topic_prefix, schemas::topics::ATTACHMENTS);
    let record = runtime::Record::new(topic.clone(), sub.event.key(), value)
        .header(schemas::topics::headers::EVENT_TYPE, AttachmentEvent::EVENT_TYPE)
        .header(schemas::topics::headers::EVENT_ID, sub.event.envelope.event_id.clone())
        .header(schemas::topics::headers::CORRELATION_ID, sub.event.envelope.correlation_id.clone());
    state.log.append(vec![record]).await?;
    metrics::counter!("payerx_attachments_submitted_total").increment(sub.event.attachments.len() as u64);
    let n = sub.event.attachments.len();
    // The link view learns of a case a moment after its Claim is stored (through the cases
    // processor); the Claims themselves say whether one exists already.
    let mut cases: Vec<String> = known.cases.iter().map(|c| c.case_ref.clone()).collect();
    if cases.is_empty() {
        // Any system: the tracking id is matched by value, as the link projection does.
        cases = state.store.ids_by_identifier("Claim", None, &sub.tracking_id).await?;
        cases.iter_mut().for_each(|id| *id = format!("Claim/{id}"));
    }
    let message = if cases.is_empty() {
        format!(
            "{n} attachment(s) accepted and held for association with a future claim/prior authorization: \
             no claim or prior authorization with tracking id {} is known yet (submission {submission_id})",
            sub.tracking_id
        )
    } else {
        format!(
            "{n} attachment(s) accepted for tracking id {} ({}) (submission {submission_id})",
            sub.tracking_id,
            cases.join(", ")
        )
    };
    let mut resp = crate::error::fhir_response(StatusCode::OK, &OperationOutcome::information(message).to_json());
    if let Ok(v) = axum::http::HeaderValue::from_str(&submission_id) {
        resp.headers_mut().insert("x-payerx-submission", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn blob() -> Blob {
        Blob {
            sha256: "ab".repeat(32),
            sha1: "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=".into(),
            size: 11,
            location: "file:///b".into(),
        }
    }

    fn params() -> Value {
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "TrackingId", "valueIdentifier": {"system": "urn:payer", "value": "PA-1"}},
            {"name": "AttachTo", "valueCode": "preauthorization"},
            {"name": "PayerId", "valueIdentifier": {"value": "PAYER"}},
            {"name": "OrganizationId", "valueIdentifier": {"value": "ORG"}},
            {"name": "ProviderId", "valueIdentifier": {"value": "NPI"}},
            {"name": "MemberId", "valueIdentifier": {"value": "M-1"}},
            {"name": "ServiceDate", "valueDate": "2026-11-20"},
            {"name": "Attachment", "part": [
                {"name": "LineItem", "valueString": "1"},
                {"name": "Code", "valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}},
                {"name": "Content", "resource": {"resourceType": "DocumentReference", "status": "current",
                    "content": [{"attachment": {"contentType": "application/pdf"}}]}}
            ]},
            {"name": "Final", "valueBoolean": false}
        ]})
    }

    fn stored() -> Vec<StoredBytes> {
        vec![StoredBytes { pointer: "/parameter/7/part/2/resource/content/0/attachment".into(), blob: blob() }]
    }

    fn check(p: &Value, s: &[StoredBytes]) -> Result<Submission, ApiError> {
        submission(p, s, Envelope::new("AttachmentEvent", 1, "c".into(), None), "sub-1", "http://x/fhir/Binary")
    }

    fn expression(e: ApiError) -> (String, String) {
        let i = &e.outcome.issue[0];
        (i.expression.first().cloned().unwrap_or_default(), i.diagnostics.clone().unwrap_or_default())
    }

    #[test]
    fn a_complete_submission_becomes_its_event() {
        let s = check(&params(), &stored()).unwrap();
        assert_eq!(s.tracking_id, "PA-1");
        let ev = s.event;
        assert_eq!(ev.kind, AttachmentEventKind::Submitted);
        assert_eq!(ev.attach_to, Some(AttachTo::Preauthorization));
        assert_eq!(ev.is_final, Some(false));
        assert_eq!(ev.member_id.as_ref().map(|m| m.value.as_str()), Some("M-1"));
        let a = &ev.attachments[0];
        assert_eq!((a.index, a.line_items.as_slice()), (7, ["1".to_string()].as_slice()));
        let doc: Value = serde_json::from_str(&a.resource).unwrap();
        assert_eq!(doc["content"][0]["attachment"]["url"], format!("http://x/fhir/Binary/{}", "ab".repeat(32)));
        assert_eq!(doc["content"][0]["attachment"]["size"], 11);
        assert!(doc["content"][0]["attachment"].get("data").is_none());
        assert_eq!(a.content[0].blob.as_ref().map(|b| b.size), Some(11));
    }

    #[test]
    fn each_rule_names_its_parameter() {
        type Case = (Box<dyn Fn(&mut Value)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|p| p["resourceType"] = json!("Bundle")), "resourceType", "Parameters"),
            (
                Box::new(|p| {
                    p["parameter"].as_array_mut().unwrap().remove(0);
                }),
                "Parameters.parameter",
                "TrackingId",
            ),
            (
                Box::new(|p| {
                    p["parameter"].as_array_mut().unwrap().remove(1);
                }),
                "Parameters.parameter",
                "AttachTo",
            ),
            (
                Box::new(|p| {
                    p["parameter"].as_array_mut().unwrap().remove(5);
                }),
                "Parameters.parameter",
                "MemberId",
            ),
            (
                Box::new(|p| p["parameter"][1]["valueCode"] = json!("encounter")),
                "Parameters.parameter[1].valueCode",
                "'claim' or 'preauthorization'",
            ),
            (
                Box::new(|p| {
                    let a = p["parameter"].as_array_mut().unwrap();
                    a.remove(4);
                    a.remove(3);
                }),
                "Parameters.parameter",
                "ProviderId or OrganizationId",
            ),
            (
                Box::new(|p| {
                    p["parameter"][1]["valueCode"] = json!("claim");
                    p["parameter"].as_array_mut().unwrap().remove(6);
                }),
                "Parameters.parameter",
                "precise to the day",
            ),
            (
                Box::new(|p| {
                    p["parameter"][1]["valueCode"] = json!("claim");
                    p["parameter"][6] = json!({"name": "ServiceDate", "valueDateTime": "2026-11"});
                }),
                "Parameters.parameter[6]",
                "precise to the day",
            ),
            (
                Box::new(|p| {
                    p["parameter"][7]["part"].as_array_mut().unwrap().pop();
                }),
                "Parameters.parameter[7].part",
                "Content",
            ),
            (
                Box::new(|p| {
                    p["parameter"][7]["part"][2]["resource"] = json!({"resourceType": "Binary", "contentType": "x"})
                }),
                "Parameters.parameter[7].part[2].resource.resourceType",
                "not Binary",
            ),
            (
                Box::new(|p| {
                    let a = p["parameter"].as_array_mut().unwrap();
                    a.remove(7);
                }),
                "Parameters.parameter",
                "Attachment",
            ),
            (
                Box::new(|p| p["parameter"][0]["name"] = json!("Tracking")),
                "Parameters.parameter[0].name",
                "not a parameter",
            ),
            (
                Box::new(|p| {
                    let t = p["parameter"][0].clone();
                    p["parameter"].as_array_mut().unwrap().push(t);
                }),
                "Parameters.parameter[9]",
                "only once",
            ),
            (
                Box::new(|p| p["parameter"][8]["valueBoolean"] = json!("no")),
                "Parameters.parameter[8].valueBoolean",
                "valueBoolean",
            ),
            (
                Box::new(|p| p["parameter"][7]["part"][2]["resource"]["content"][0]["attachment"]["size"] = json!(12)),
                "Parameters.parameter[7].part[2].resource.content[0].attachment.size",
                "decodes to 11",
            ),
            (
                Box::new(|p| {
                    p["parameter"][7]["part"][2]["resource"]["content"][0]["attachment"]["hash"] = json!("AAAA")
                }),
                "Parameters.parameter[7].part[2].resource.content[0].attachment.hash",
                "SHA-1",
            ),
        ];
        for (mutate, at, says) in cases {
            let mut p = params();
            mutate(&mut p);
            let (expr, diag) =
                expression(check(&p, &stored()).err().unwrap_or_else(|| panic!("{at} / {says}: accepted")));
            assert_eq!(expr, at, "{says}: {diag}");
            assert!(diag.contains(says), "{at}: {diag}");
        }
        let (expr, diag) = expression(check(&params(), &[]).err().unwrap());
        assert_eq!(expr, "Parameters.parameter[7].part[2].resource.content[0].attachment");
        assert!(diag.contains("inline in data, or by url"), "{diag}");
    }

    #[test]
    fn content_by_url_and_questionnaire_responses() {
        let mut p = params();
        p["parameter"][7]["part"][2]["resource"]["content"][0]["attachment"]["url"] =
            json!("https://ehr.example/doc.pdf");
        let s = check(&p, &[]).unwrap();
        assert_eq!(s.event.attachments[0].content[0].source_url.as_deref(), Some("https://ehr.example/doc.pdf"));
        p["parameter"][7]["part"][2]["resource"] = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
            "item": [{"linkId": "1", "answer": [{"valueString": "yes"}]}]});
        let s = check(&p, &[]).unwrap();
        assert_eq!(s.event.attachments[0].resource_type, "QuestionnaireResponse");
        assert!(s.event.attachments[0].content.is_empty());
    }
}
