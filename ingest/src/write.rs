//! The write path shared by every writing endpoint: append a `ResourceChanged` event, then wait
//! (bounded) until the resource projection has recorded its outcome, so a client that writes and
//! then reads sees its write.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use projections::WriteOutcome;
use runtime::Record;
use schemas::topics::{self, headers};
use schemas::{Envelope, OperationOutcome, ResourceChange, ResourceChanged, WriteMode};

use crate::error::{fhir_response, ApiError};
use crate::SharedState;

/// How often a waiting request checks the view store, for outcomes recorded by a projection in
/// another process (split roles). In one process the projection hands outcomes over directly.
const OUTCOME_POLL: Duration = Duration::from_millis(25);

/// What became of a write within the wait.
pub enum Waited {
    Done(WriteOutcome),
    /// Still being processed: answer 202 with a link to `/fhir/_writes/{event_id}`.
    Pending(String),
}

pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// A write event; the envelope names the authenticated client.
pub fn event(
    correlation_id: &str,
    client_id: Option<&str>,
    mode: WriteMode,
    changes: Vec<ResourceChange>,
) -> ResourceChanged {
    ResourceChanged {
        envelope: Envelope::new(
            ResourceChanged::EVENT_TYPE,
            1,
            correlation_id.to_string(),
            client_id.map(str::to_string),
        ),
        mode,
        changes,
    }
}

/// Appends events to the change topic in one durable append. Every caller has run
/// `check_change`/`check_resource` on each change, the validate processor's rules, so the write
/// skips the submissions topic: one copy of the resource on the log, not two.
pub async fn append(state: &SharedState, events: &[ResourceChanged]) -> Result<(), ApiError> {
    let topic = topics::full(&state.config.topic_prefix, topics::FHIR_CHANGES);
    let mut records = Vec::with_capacity(events.len());
    for ev in events {
        let value = schemas::encode_event(ev).map_err(ApiError::internal)?;
        records.push(
            Record::new(topic.clone(), ev.key(), value)
                .header(headers::EVENT_TYPE, ResourceChanged::EVENT_TYPE)
                .header(headers::EVENT_ID, ev.envelope.event_id.clone())
                .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone()),
        );
    }
    state.log.append(records).await?;
    metrics::counter!("payerx_events_appended_total", "topic" => topic).increment(events.len() as u64);
    Ok(())
}

/// Appends and waits for every outcome, each until the configured deadline.
pub async fn submit(state: &SharedState, events: Vec<ResourceChanged>) -> Result<Vec<Waited>, ApiError> {
    let receivers: Vec<_> = events.iter().map(|e| state.notifier.register(&e.envelope.event_id)).collect();
    if let Err(e) = append(state, &events).await {
        for ev in &events {
            state.notifier.forget(&ev.envelope.event_id);
        }
        return Err(e);
    }
    let deadline = Instant::now() + state.config.write_wait;
    let waits = events.into_iter().zip(receivers).map(|(ev, rx)| wait(state, ev.envelope.event_id, rx, deadline));
    futures::future::try_join_all(waits).await
}

async fn wait(
    state: &SharedState,
    event_id: String,
    mut rx: tokio::sync::oneshot::Receiver<WriteOutcome>,
    deadline: Instant,
) -> Result<Waited, ApiError> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            state.notifier.forget(&event_id);
            return Ok(Waited::Pending(event_id));
        }
        let nap = (deadline - now).min(OUTCOME_POLL);
        tokio::select! {
            got = &mut rx => {
                if let Ok(o) = got {
                    return Ok(Waited::Done(o));
                }
                // Sender dropped (forgotten): fall back to the store.
                if let Some(o) = state.store.outcome(&event_id).await? {
                    return Ok(Waited::Done(o));
                }
                tokio::time::sleep(nap).await;
            }
            _ = tokio::time::sleep(nap) => {
                if let Some(o) = state.store.outcome(&event_id).await? {
                    state.notifier.forget(&event_id);
                    return Ok(Waited::Done(o));
                }
            }
        }
    }
}

/// 202 Accepted for a write still in flight.
pub fn pending_response(state: &SharedState, headers: &HeaderMap, event_id: &str) -> Response {
    let url = format!("{}/fhir/_writes/{event_id}", crate::fhir::base_url(state, headers));
    let oo = OperationOutcome::information(format!(
        "the write was accepted and is being processed; poll {url} for its outcome"
    ));
    let mut resp = fhir_response(StatusCode::ACCEPTED, &oo.to_json());
    if let Ok(v) = HeaderValue::from_str(&url) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    resp
}

/// `GET /fhir/_writes/{event_id}`: 200 with the outcome once recorded, 202 while pending.
pub async fn write_status(
    State(state): State<SharedState>,
    caller: crate::access::Caller,
    headers: HeaderMap,
    Path(event_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.authorize_write_status()?;
    if uuid::Uuid::parse_str(&event_id).is_err() {
        return Err(ApiError::bad_request(format!("'{event_id}' is not a write id")));
    }
    match state.store.outcome(&event_id).await? {
        Some(o) => Ok(fhir_response(StatusCode::OK, &outcome_json(&o)).into_response()),
        None => Ok(pending_response(&state, &headers, &event_id)),
    }
}

/// An outcome as FHIR JSON: the failure's OperationOutcome, or an informational one that lists
/// what was written.
pub fn outcome_json(o: &WriteOutcome) -> serde_json::Value {
    if let Some(oo) = &o.outcome {
        return oo.clone();
    }
    let mut oo = OperationOutcome::information(format!("write completed with status {}", o.status));
    for e in &o.entries {
        let what = match e.version_id {
            Some(v) => format!("{}/{}/_history/{v}: {}", e.resource_type, e.id, e.status),
            None => format!("{}/{}: {}", e.resource_type, e.id, e.status),
        };
        oo.push(schemas::outcome::Issue {
            severity: schemas::IssueSeverity::Information,
            code: schemas::IssueType::Informational,
            diagnostics: Some(what),
            expression: vec![],
        });
    }
    oo.to_json()
}
