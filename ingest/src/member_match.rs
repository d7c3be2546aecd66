//! Da Vinci HRex `POST /fhir/Patient/$member-match` and PDex `POST /fhir/Group/$bulk-member-match`.
//!
//! Ingest only reads the request and appends it to `member-match.requests`; the member-match
//! processor decides. A single match awaits its decision on `member-match.decisions` (by
//! correlation id) until the deadline, then answers 503 with `Retry-After`: the request stays on
//! the log, is decided once the processor runs, and a retry with the same content gets that same
//! decision. A bulk request streams its `MemberBundle`s onto the log as they are read (memory does
//! not grow with the batch) and is followed like a Bulk Data job.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use processors::member_match::{self as mm, IdKey, MatchRequest, RequestProblem};
use projections::member_match::{managing_entity, BulkJob, CATEGORIES, RESULT_SYSTEM};
use runtime::{Log, LogError, Record};
use schemas::smart::Interaction;
use schemas::topics::{self, headers};
use schemas::{
    Envelope, IssueType, MemberMatchDecided, MemberMatchOutcome, MemberMatchRequestKind, MemberMatchRequested,
    OperationOutcome,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

use crate::access::{Caller, Visibility};
use crate::error::{fhir_response, ApiError};
use crate::fhir::{base_url, check_json_content_type, json_body};
use crate::SharedState;

/// `MemberIdentifier.type`: HRex's temporary code system, code UMB (member number).
pub const UMB_SYSTEM: &str = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp";
/// Extension linking a bulk output member to the request's demographics.
const MATCH_PARAMETERS_EXT: &str = "http://hl7.org/fhir/us/davinci-pdex/StructureDefinition/base-ext-match-parameters";

/// Decisions awaited by this ingest process, and the clients the processor throttled.
#[derive(Default)]
pub struct MatchReplies {
    waiters: Mutex<HashMap<String, oneshot::Sender<MemberMatchDecided>>>,
    lockouts: Mutex<HashMap<String, Instant>>,
}

impl MatchReplies {
    /// Follows the decisions topic from its end until `stop`, handing each decision to the
    /// request waiting for it.
    pub fn start(
        log: Arc<dyn Log>,
        topic_prefix: &str,
        stop: CancellationToken,
    ) -> (Arc<MatchReplies>, tokio::task::JoinHandle<Result<(), LogError>>) {
        let replies = Arc::new(MatchReplies::default());
        let topic = topics::full(topic_prefix, topics::MEMBER_MATCH_DECISIONS);
        let me = replies.clone();
        let task = tokio::spawn(async move {
            let ends = log.end_offsets(&topic).await?;
            let assignment: Vec<(String, i32, i64)> =
                ends.iter().enumerate().map(|(p, o)| (topic.clone(), p as i32, *o)).collect();
            let mut consumer = log.assigned_consumer(&assignment).await?;
            loop {
                let batch = tokio::select! {
                    b = consumer.poll(500, Duration::from_millis(500)) => b,
                    _ = stop.cancelled() => return Ok(()),
                };
                match batch {
                    Ok(records) => {
                        for r in records {
                            if let Ok(d) = schemas::decode_event::<MemberMatchDecided>(&r.value) {
                                me.deliver(d);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "member-match decisions unavailable; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        (replies, task)
    }

    fn register(&self, correlation: &str) -> oneshot::Receiver<MemberMatchDecided> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(correlation.to_string(), tx);
        }
        rx
    }

    fn forget(&self, correlation: &str) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(correlation);
        }
    }

    fn deliver(&self, d: MemberMatchDecided) {
        if let (MemberMatchOutcome::Throttled, Some(client), Some(secs)) =
            (d.outcome, &d.envelope.client_id, d.retry_after_s)
        {
            if let Ok(mut l) = self.lockouts.lock() {
                l.insert(client.clone(), Instant::now() + Duration::from_secs(secs.max(0) as u64));
            }
        }
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&d.envelope.correlation_id));
        if let Some(tx) = waiter {
            let _ = tx.send(d);
        }
    }

    /// Seconds a throttled client must still wait (answered here, without the log).
    fn locked(&self, client: &str) -> Option<u64> {
        let mut l = self.lockouts.lock().ok()?;
        let until = *l.get(client)?;
        match until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Some(left.as_secs().max(1)),
            _ => {
                l.remove(client);
                None
            }
        }
    }
}

fn problem(p: RequestProblem) -> ApiError {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST);
    let code = if status == StatusCode::UNPROCESSABLE_ENTITY { IssueType::Processing } else { IssueType::Invalid };
    ApiError::new(status, code, p.message).at(p.expression)
}

/// Member match is for payers' backend clients: a `system/` scope that reads `rtype`.
fn authorize_payer(caller: &Caller, rtype: &str, op: &str) -> Result<(), ApiError> {
    match caller.authorize(rtype, Interaction::Read)? {
        Visibility::All => Ok(()),
        Visibility::Compartment(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            IssueType::Forbidden,
            format!("{op} is for payer backend clients with system scopes (system/{rtype}.read or system/{rtype}.rs)"),
        )),
    }
}

fn throttled(secs: u64) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        IssueType::Throttled,
        format!("too many failed member-match attempts by this client; try again in {secs} s"),
    );
    e.retry_after = Some(secs);
    e
}

fn text(v: &Value) -> Option<String> {
    Some(v.to_string())
}

/// The requesting payer, whom a Consent must name as its recipient: the organizations the
/// calling client is registered to act for; for a client registered without any (or with
/// `--insecure-no-auth`), the payor that CoverageToLink names.
fn requester(req: &MatchRequest, caller: &Caller) -> Vec<IdKey> {
    let registered: Vec<IdKey> =
        caller.organizations().iter().map(|o| IdKey { system: o.system.clone(), value: o.value.clone() }).collect();
    if !registered.is_empty() {
        return registered;
    }
    req.coverage_to_link.as_ref().map(mm::requester_identifiers).unwrap_or_default()
}

/// The request event of one match.
fn request_event(
    req: &MatchRequest,
    kind: MemberMatchRequestKind,
    correlation: String,
    caller: &Caller,
) -> MemberMatchRequested {
    let env = Envelope::new(MemberMatchRequested::EVENT_TYPE, 1, correlation, caller.client_id().map(str::to_string));
    let requester = requester(req, caller);
    let mut ev = MemberMatchRequested::new(env, kind, mm::request_hash(req, &requester));
    ev.member_patient = text(&req.member_patient);
    ev.coverage_to_match = text(&req.coverage_to_match);
    ev.coverage_to_link = req.coverage_to_link.as_ref().and_then(text);
    ev.consent = req.consent.as_ref().and_then(text);
    if !requester.is_empty() {
        ev.requester = serde_json::to_string(&requester).ok();
    }
    ev
}

fn record(state: &SharedState, ev: &MemberMatchRequested) -> Result<Record, ApiError> {
    let value = schemas::encode_event(ev).map_err(ApiError::internal)?;
    Ok(Record::new(topics::full(&state.config.topic_prefix, topics::MEMBER_MATCH_REQUESTS), ev.key(), value)
        .header(headers::EVENT_TYPE, MemberMatchRequested::EVENT_TYPE)
        .header(headers::EVENT_ID, ev.envelope.event_id.clone())
        .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone()))
}

/// The answer to a single match from its decision.
fn answer(d: &MemberMatchDecided) -> Response {
    let refusal = |status: StatusCode, code: IssueType, default: &str| {
        let msg = d.reason.clone().unwrap_or_else(|| default.to_string());
        ApiError::new(status, code, msg).into_response()
    };
    match d.outcome {
        MemberMatchOutcome::Matched => {
            let mut identifier = json!({
                "type": {"coding": [{"system": UMB_SYSTEM, "code": "UMB", "display": "Member Number"}]},
                "value": d.member_identifier_value,
            });
            if let Some(s) = &d.member_identifier_system {
                identifier["system"] = json!(s);
            }
            let mut parameter = vec![json!({"name": "MemberIdentifier", "valueIdentifier": identifier})];
            if let Some(pid) = &d.patient_id {
                parameter.push(json!({"name": "MemberId", "valueReference": {"reference": format!("Patient/{pid}")}}));
            }
            fhir_response(StatusCode::OK, &json!({"resourceType": "Parameters", "parameter": parameter}))
        }
        MemberMatchOutcome::NoMatch => {
            refusal(StatusCode::UNPROCESSABLE_ENTITY, IssueType::Processing, "no member match found")
        }
        MemberMatchOutcome::MultipleMatches => {
            refusal(StatusCode::UNPROCESSABLE_ENTITY, IssueType::Processing, "more than one member matches")
        }
        MemberMatchOutcome::ConsentRefused => {
            refusal(StatusCode::UNPROCESSABLE_ENTITY, IssueType::BusinessRule, "the consent cannot be honoured")
        }
        MemberMatchOutcome::Throttled => throttled(d.retry_after_s.unwrap_or(1).max(1) as u64).into_response(),
        MemberMatchOutcome::Invalid | MemberMatchOutcome::BulkCompleted => {
            refusal(StatusCode::BAD_REQUEST, IssueType::Invalid, "the request could not be read")
        }
    }
}

/// `POST /fhir/Patient/$member-match`.
pub async fn member_match(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_payer(&caller, "Patient", "$member-match")?;
    let client = caller.client_id();
    if let Some(secs) = client.and_then(|c| state.replies.locked(c)) {
        return Err(throttled(secs));
    }
    let params = json_body(&state, &headers, body).await?;
    let req = mm::parse_request(&params).map_err(problem)?;
    let correlation = uuid::Uuid::now_v7().to_string();
    let ev = request_event(&req, MemberMatchRequestKind::Single, correlation.clone(), &caller);
    let rx = state.replies.register(&correlation);
    if let Err(e) = state.log.append(vec![record(&state, &ev)?]).await {
        state.replies.forget(&correlation);
        return Err(e.into());
    }
    let deadline = state.config.member_match_deadline;
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(d)) => Ok(answer(&d)),
        _ => {
            state.replies.forget(&correlation);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Timeout,
                format!(
                    "the member-match processor did not decide within {} ms; the request is kept and will be decided: \
                     send it again (same content) to get the decision",
                    deadline.as_millis()
                ),
            );
            e.retry_after = Some(deadline.as_secs().max(1));
            Err(e)
        }
    }
}

// ---- bulk ----

mod stream {
    //! Reads a Parameters body one `parameter` element at a time.
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    pub struct Body<F>(pub F);

    impl<'de, F: FnMut(Value) -> Result<(), String>> DeserializeSeed<'de> for Body<F> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de, F: FnMut(Value) -> Result<(), String>> Visitor<'de> for Body<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a Parameters resource")
        }
        fn visit_map<M: MapAccess<'de>>(mut self, mut map: M) -> Result<(), M::Error> {
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "resourceType" => {
                        let t: String = map.next_value()?;
                        if t != "Parameters" {
                            return Err(de::Error::custom(format!(
                                "$bulk-member-match expects a Parameters resource, not {t}"
                            )));
                        }
                    }
                    "parameter" => map.next_value_seed(Elements(&mut self.0))?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }

    struct Elements<'a, F>(&'a mut F);

    impl<'de, F: FnMut(Value) -> Result<(), String>> DeserializeSeed<'de> for Elements<'_, F> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de, F: FnMut(Value) -> Result<(), String>> Visitor<'de> for Elements<'_, F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of parameters")
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
            while let Some(v) = seq.next_element::<Value>()? {
                (self.0)(v).map_err(de::Error::custom)?;
            }
            Ok(())
        }
    }
}

/// Counts bytes read and stops at the limit.
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(format!(
                "the request body exceeds the limit of {} bytes (--max-bulk-member-match-bytes)",
                self.limit
            )));
        }
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

/// MemberBundles appended per log append.
const BULK_CHUNK: usize = 500;

/// `POST /fhir/Group/$bulk-member-match`.
pub async fn bulk_member_match(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_payer(&caller, "Group", "$bulk-member-match")?;
    let prefer = headers.get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !prefer.split([',', ';']).any(|p| p.trim().eq_ignore_ascii_case("respond-async")) {
        return Err(ApiError::bad_request(
            "$bulk-member-match is asynchronous: send the header 'Prefer: respond-async'",
        ));
    }
    check_json_content_type(&headers)?;
    let limit = state.config.max_bulk_member_match_bytes;
    if crate::attachment_body::content_length(&headers).is_some_and(|n| n > limit) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooLong,
            format!("the request body exceeds the limit of {limit} bytes (--max-bulk-member-match-bytes)"),
        ));
    }
    let client = caller.client_id().map(str::to_string);
    let job = uuid::Uuid::now_v7().to_string();

    // The blocking JSON reader hands parameters over a bounded channel; this task appends them in
    // chunks. Memory holds at most the channel and one chunk, whatever the batch size.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(BULK_CHUNK);
    let reader = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let handle = tokio::runtime::Handle::current();
    let parse = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let src = Bounded { inner: SyncIoBridge::new_with_handle(reader, handle), left: limit, limit };
        let mut de = serde_json::Deserializer::from_reader(src);
        let seed = stream::Body(|v: Value| tx.blocking_send(v).map_err(|_| "stopped".to_string()));
        serde::de::DeserializeSeed::deserialize(seed, &mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())
    });

    let mut index: i32 = 0;
    let mut chunk: Vec<Record> = Vec::with_capacity(BULK_CHUNK);
    let mut request_problem: Option<ApiError> = None;
    let mut requester: Option<String> = None;
    while let Some(param) = rx.recv().await {
        let at = format!("Parameters.parameter[{index}]");
        if param.get("name").and_then(Value::as_str) != Some("MemberBundle") {
            request_problem = Some(
                ApiError::bad_request("$bulk-member-match takes only MemberBundle parameters").at(format!("{at}.name")),
            );
            break;
        }
        let mut ev = match mm::parse_member_bundle(&param, &at) {
            Ok(req) => request_event(&req, MemberMatchRequestKind::BulkMember, job.clone(), &caller),
            Err(p) => {
                // One member's problem never fails the batch: it is decided INVALID.
                let env = Envelope::new(MemberMatchRequested::EVENT_TYPE, 1, job.clone(), client.clone());
                let mut ev = MemberMatchRequested::new(env, MemberMatchRequestKind::BulkMember, String::new());
                ev.problem = Some(format!("{} ({})", p.message, p.expression));
                ev.member_patient = member_patient_part(&param).map(|v| v.to_string());
                ev
            }
        };
        if requester.is_none() {
            requester = ev.requester.clone();
        }
        ev.requester = ev.requester.or_else(|| requester.clone());
        ev.bulk_job = Some(job.clone());
        ev.bulk_index = Some(index);
        chunk.push(record(&state, &ev)?);
        index += 1;
        if chunk.len() >= BULK_CHUNK {
            state.log.append(std::mem::take(&mut chunk)).await?;
        }
    }
    drop(rx);
    let parsed = parse.await.map_err(ApiError::internal)?;
    let failure = match (request_problem, parsed) {
        (Some(e), _) => Some(e),
        (None, Err(msg)) if msg.contains("--max-bulk-member-match-bytes") => {
            Some(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, IssueType::TooLong, msg))
        }
        (None, Err(msg)) => Some(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Structure,
            format!("the body is not a readable Parameters resource: {msg}"),
        )),
        (None, Ok(())) if index == 0 => {
            Some(ApiError::bad_request("$bulk-member-match needs at least one MemberBundle parameter"))
        }
        (None, Ok(())) => None,
    };
    let env = Envelope::new(MemberMatchRequested::EVENT_TYPE, 1, job.clone(), client.clone());
    let mut closed = MemberMatchRequested::new(env, MemberMatchRequestKind::BulkClosed, String::new());
    closed.bulk_job = Some(job.clone());
    closed.bulk_total = Some(index);
    closed.requester = requester;
    closed.problem = failure.as_ref().map(|e| e.outcome.to_json().to_string());
    chunk.push(record(&state, &closed)?);
    state.log.append(chunk).await?;
    if let Some(e) = failure {
        return Err(e);
    }
    let location = format!("{}/fhir/bulk-member-match-status/{job}", base_url(&state, &headers));
    let mut resp = fhir_response(
        StatusCode::ACCEPTED,
        &OperationOutcome::information(format!("{index} members accepted for matching; poll {location}")).to_json(),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(resp)
}

fn member_patient_part(param: &Value) -> Option<&Value> {
    param
        .get("part")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("MemberPatient"))?
        .get("resource")
}

/// A job id payerx issued (UUIDv7) less than a day ago: not yet seen by the processor, rather
/// than unknown.
fn recently_issued(job: &str) -> bool {
    let Ok(id) = uuid::Uuid::parse_str(job) else { return false };
    let Some(ts) = id.get_timestamp() else { return false };
    let (secs, _) = ts.to_unix();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    id.get_version_num() == 7 && secs <= now + 60 && now.saturating_sub(secs) < 86_400
}

async fn job_of(state: &SharedState, caller: &Caller, job: &str) -> Result<Option<BulkJob>, ApiError> {
    authorize_payer(caller, "Group", "$bulk-member-match")?;
    let found = state.matches.job(job).await?;
    match (&found, caller.client_id()) {
        (Some(j), Some(c)) if j.client_id != c => Err(ApiError::not_found(format!("no bulk member-match job {job}"))),
        _ => Ok(found),
    }
}

fn in_progress(progress: String) -> Response {
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&progress) {
        resp.headers_mut().insert("x-progress", v);
    }
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    resp
}

/// `GET /fhir/bulk-member-match-status/{job}`: 202 with `X-Progress` while members are being
/// decided, then the manifest of the three output Groups.
pub async fn bulk_status(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(job) = job_of(&state, &caller, &job_id).await? else {
        if recently_issued(&job_id) {
            return Ok(in_progress("queued: waiting for the member-match processor".into()));
        }
        return Err(ApiError::not_found(format!("no bulk member-match job {job_id}")));
    };
    if let Some(p) = &job.problem {
        let outcome: Value = serde_json::from_str(p)
            .unwrap_or_else(|_| OperationOutcome::error(IssueType::Invalid, p.clone()).to_json());
        return Ok(fhir_response(StatusCode::BAD_REQUEST, &outcome));
    }
    let Some(completed) = job.completed_at else {
        let progress = match job.total {
            Some(t) => format!("{} of {t} members decided", job.decided),
            None => format!("{} members decided; reading the request", job.decided),
        };
        return Ok(in_progress(progress));
    };
    let base = base_url(&state, &headers);
    let output: Vec<Value> = CATEGORIES
        .iter()
        .map(|(name, _, _)| {
            json!({"type": "Group", "url": format!("{base}/fhir/bulk-member-match-status/{job_id}/{name}.ndjson"), "count": 1})
        })
        .collect();
    let manifest = json!({
        "transactionTime": projections::resources::instant(completed),
        "request": format!("{base}/fhir/Group/$bulk-member-match"),
        "requiresAccessToken": true,
        "output": output,
        "error": [],
        "extension": {
            "members": job.total,
            "MatchedMembers": job.counts[0],
            "NonMatchedMembers": job.counts[1],
            "ConsentConstrainedMembers": job.counts[2],
        },
    });
    let mut resp = (StatusCode::OK, manifest.to_string()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// Rows read per query while streaming an output Group.
const PAGE: i64 = 500;

/// `GET /fhir/bulk-member-match-status/{job}/{Group}.ndjson`: one Group per file, streamed from
/// the decisions page by page (its size does not depend on memory).
pub async fn bulk_output(
    State(state): State<SharedState>,
    caller: Caller,
    Path((job_id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = job_of(&state, &caller, &job_id)
        .await?
        .filter(|j| j.completed_at.is_some())
        .ok_or_else(|| ApiError::not_found(format!("no completed bulk member-match job {job_id}")))?;
    let name = file.strip_suffix(".ndjson").unwrap_or(&file).to_string();
    let (slot, (_, code, display)) = CATEGORIES
        .iter()
        .copied()
        .enumerate()
        .find(|(_, (n, _, _))| *n == name)
        .ok_or_else(|| ApiError::not_found(format!("no output {file}; the outputs are MatchedMembers.ndjson, NonMatchedMembers.ndjson and ConsentConstrainedMembers.ndjson")))?;
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let store = state.matches.clone();
    let mut head = json!({
        "resourceType": "Group",
        "id": format!("{job_id}-{name}"),
        "meta": {"profile": [if code == "match" {
            "http://hl7.org/fhir/us/davinci-pdex/StructureDefinition/pdex-member-match-group"
        } else {
            "http://hl7.org/fhir/us/davinci-pdex/StructureDefinition/pdex-member-no-match-group"
        }]},
        "type": "person",
        "actual": true,
        "code": {"coding": [{"system": RESULT_SYSTEM, "code": code, "display": display}]},
    });
    if let Some(m) = managing_entity(job.requester.as_deref()) {
        head["managingEntity"] = m;
    }
    let count = job.counts[slot];
    head["quantity"] = json!(count);
    let head = head.to_string();
    if count == 0 {
        // FHIR allows no empty arrays: an empty Group has neither contained nor member.
        let mut resp = Body::from(format!("{head}\n")).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+ndjson"));
        return Ok(resp);
    }
    tokio::spawn(async move {
        use futures::SinkExt;
        let mut tx = tx;
        // `{…head…, "contained": [patients], "member": [entries]}` on one line.
        let mut out = head[..head.len() - 1].to_string();
        for pass in 0..2 {
            out.push_str(if pass == 0 { ",\"contained\":[" } else { "],\"member\":[" });
            let mut after = -1;
            let mut first = true;
            loop {
                let page = match store.job_members(&job_id, &name, after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { break };
                after = last.index;
                for m in &page {
                    let local = format!("m{}", m.index);
                    let item = if pass == 0 {
                        let mut p: Value = m
                            .member_patient
                            .as_deref()
                            .and_then(|t| serde_json::from_str(t).ok())
                            .unwrap_or_else(|| json!({"resourceType": "Patient"}));
                        p["id"] = json!(local);
                        p
                    } else {
                        let reference = match &m.patient_id {
                            Some(pid) => format!("Patient/{pid}"),
                            None => format!("#{local}"),
                        };
                        json!({"entity": {
                            "extension": [{"url": MATCH_PARAMETERS_EXT, "valueReference": {"reference": format!("#{local}")}}],
                            "reference": reference,
                        }})
                    };
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(&item.to_string());
                }
                if tx.send(Ok(Bytes::from(std::mem::take(&mut out)))).await.is_err() {
                    return;
                }
            }
        }
        out.push_str("]}\n");
        let _ = tx.send(Ok(Bytes::from(out))).await;
    });
    let mut resp = Body::from_stream(rx).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+ndjson"));
    Ok(resp)
}
