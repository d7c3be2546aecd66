//! The attachment-link projection: joins CDex attachment submissions and cases (Claims and prior
//! authorizations) by tracking id, in whichever order they arrive.
//!
//! Its input is the attachments topic, keyed by tracking id, so a case and its attachments are
//! in order on one partition. The state per tracking id (cases, attachments and their link
//! status, whether the set is closed) is a view like any other: kept in the same transaction as
//! the offsets, so a link is decided exactly once, also across restarts, and a replay rebuilds
//! the same links. The decisions are a pure function ([`step`]); the projection emits them as
//! HELD/LINKED/REJECTED events and writes the DocumentReferences of linked attachments through
//! the normal write path (fhir.submissions), where they are validated and projected.

use std::collections::BTreeSet;

use async_trait::async_trait;
use runtime::{Consumed, Record};
use schemas::topics::{self, headers};
use schemas::{
    AttachTo, AttachmentEvent, AttachmentEventKind, Envelope, Identifier, ResourceChange, ResourceChanged,
    SubmittedAttachment, WriteMode,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{Any, Row, Transaction};

use crate::worker::{Applied, Projection};
use crate::{Db, ProjectionError};

pub const NAME: &str = "attachment-links";

fn cases_table(g: i64) -> String {
    format!("att_cases_g{g}")
}
fn items_table(g: i64) -> String {
    format!("att_items_g{g}")
}
fn sets_table(g: i64) -> String {
    format!("att_sets_g{g}")
}
fn blobs_table(g: i64) -> String {
    format!("att_blobs_g{g}")
}

/// A case an attachment can be linked to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRow {
    pub case_ref: String,
    pub attach_to: Option<AttachTo>,
    pub patient: Option<String>,
    pub items: Vec<String>,
    pub members: Vec<Identifier>,
    /// Every identifier of the Claim (`#[serde(default)]`: rows stored before it was kept).
    #[serde(default)]
    pub identifiers: Vec<Identifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkStatus {
    /// Waiting for its case.
    Held,
    Linked,
    Rejected,
    /// The same content was already received for this tracking id; nothing new was stored.
    Duplicate,
    /// Sent by URL: waiting for the fetcher to store the bytes (FETCHED or FETCH_FAILED).
    Fetching,
}

impl LinkStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkStatus::Held => "held",
            LinkStatus::Linked => "linked",
            LinkStatus::Rejected => "rejected",
            LinkStatus::Duplicate => "duplicate",
            LinkStatus::Fetching => "fetching",
        }
    }
}

/// One submitted attachment and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRow {
    pub submission_id: String,
    pub index: i32,
    pub tracking_id: String,
    pub status: LinkStatus,
    pub attach_to: Option<AttachTo>,
    pub member_id: Option<Identifier>,
    /// CDex AdminRefNumber, when the submission gave one.
    #[serde(default)]
    pub admin_ref: Option<Identifier>,
    pub is_final: bool,
    pub case_ref: Option<String>,
    /// The DocumentReference stored for it once linked (or the original's, for a duplicate).
    pub document_reference: Option<String>,
    pub unknown_line_items: Vec<String>,
    pub reason: Option<String>,
    pub received_at: i64,
    pub attachment: SubmittedAttachment,
}

/// Everything known about one tracking id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkState {
    pub cases: Vec<CaseRow>,
    pub items: Vec<ItemRow>,
    /// The submission that closed the set (`Final` true or absent).
    pub closed_by: Option<String>,
}

/// Does `item` fit `case`? `Ok` with the line items the case does not have, or why not.
fn fits(case: &CaseRow, item: &ItemRow) -> Result<Vec<String>, String> {
    if let (Some(want), Some(is)) = (item.attach_to, case.attach_to) {
        if want != is {
            return Err(format!(
                "AttachTo is {}, but {} is a {}",
                want.code(),
                case.case_ref,
                if is == AttachTo::Claim { "claim" } else { "prior authorization" }
            ));
        }
    }
    if let Some(member) = &item.member_id {
        // A case with no member identifiers known cannot contradict the MemberId.
        let known = |m: &Identifier| {
            m.value == member.value && (m.system.is_none() || member.system.is_none() || m.system == member.system)
        };
        if !case.members.is_empty() && !case.members.iter().any(known) {
            return Err(format!("MemberId {} is not the member of {}", member.value, case.case_ref));
        }
    }
    if let Some(admin) = &item.admin_ref {
        // The payer's administrative reference (solicited prior-auth attachments) must be one of
        // the case's identifiers; a case that lists none cannot contradict it.
        if !case.identifiers.is_empty() && !case.identifiers.iter().any(|i| i.value == admin.value) {
            return Err(format!("AdminRefNumber {} is not an identifier of {}", admin.value, case.case_ref));
        }
    }
    Ok(item.attachment.line_items.iter().filter(|l| !case.items.contains(l)).cloned().collect())
}

/// Links `item` to the best case of `cases`, or explains why none fits.
fn link(cases: &[CaseRow], item: &mut ItemRow) {
    let mut first_reason = None;
    for case in cases {
        match fits(case, item) {
            Ok(unknown) => {
                item.status = LinkStatus::Linked;
                item.case_ref = Some(case.case_ref.clone());
                item.document_reference = Some(document_reference_id(item));
                item.unknown_line_items = unknown;
                item.reason = None;
                return;
            }
            Err(reason) => {
                first_reason.get_or_insert(reason);
            }
        }
    }
    if let Some(reason) = first_reason {
        item.status = LinkStatus::Rejected;
        item.reason = Some(reason);
    }
}

/// The content identity of an attachment: its resource type and stored bytes (or its resource
/// text when it carries no bytes).
fn fingerprint(a: &SubmittedAttachment) -> String {
    let blobs: Vec<&str> = a.content.iter().filter_map(|c| c.blob.as_ref().map(|b| b.sha256.as_str())).collect();
    if blobs.is_empty() {
        format!("{}:{}", a.resource_type, a.resource)
    } else {
        format!("{}:{}", a.resource_type, blobs.join(","))
    }
}

const ID_NS: uuid::Uuid = uuid::Uuid::from_u128(0x3c1d_8e52_77a4_4f0b_a1d2_5e6f_9b80_c417);

/// A stable id for what payerx stores of one submitted attachment.
fn stored_id(item: &ItemRow, what: &str) -> String {
    let name = format!("{what}/{}/{}/{}", item.tracking_id, item.submission_id, item.index);
    format!("cdex-{}", uuid::Uuid::new_v5(&ID_NS, name.as_bytes()))
}

fn document_reference_id(item: &ItemRow) -> String {
    format!("DocumentReference/{}", stored_id(item, "DocumentReference"))
}

/// What a step changed: indexes into `LinkState::items` whose status is new.
pub type Changed = Vec<usize>;

/// Decides the item at `i` whose bytes are all stored: a duplicate of an earlier item with the
/// same content, else linked to a case, rejected by every case, or held.
fn decide(state: &mut LinkState, i: usize) {
    let print = fingerprint(&state.items[i].attachment);
    let earlier = state.items.iter().enumerate().find(|(j, e)| {
        *j != i
            && !matches!(e.status, LinkStatus::Rejected | LinkStatus::Duplicate | LinkStatus::Fetching)
            && fingerprint(&e.attachment) == print
    });
    if let Some((_, e)) = earlier {
        let (case_ref, doc, reason) = (
            e.case_ref.clone(),
            e.document_reference.clone(),
            format!("same content as attachment {} of submission {}", e.attachment.index, e.submission_id),
        );
        let item = &mut state.items[i];
        item.status = LinkStatus::Duplicate;
        item.case_ref = case_ref;
        item.document_reference = doc;
        item.reason = Some(reason);
    } else {
        let item = &mut state.items[i];
        item.status = LinkStatus::Held;
        item.reason = None;
        link(&state.cases, item);
    }
}

/// The pure core: applies one input event to the state of its tracking id and returns the
/// items whose status it decided. Outputs of the projection itself (HELD, LINKED, REJECTED)
/// are not inputs. Content sent by URL waits as `fetching` until the fetcher's FETCHED (then
/// it is decided like inline content) or FETCH_FAILED (then it is rejected with the reason).
pub fn step(state: &mut LinkState, ev: &AttachmentEvent) -> Changed {
    match ev.kind {
        AttachmentEventKind::CaseOpened => {
            let Some(case_ref) = ev.case_ref.clone() else { return Vec::new() };
            let case = CaseRow {
                case_ref,
                attach_to: ev.attach_to,
                patient: ev.case_patient.clone(),
                items: ev.case_items.clone(),
                members: ev.case_members.clone(),
                identifiers: ev.case_identifiers.clone(),
            };
            match state.cases.iter_mut().find(|c| c.case_ref == case.case_ref) {
                Some(c) => *c = case,
                None => state.cases.push(case),
            }
            let mut changed = Vec::new();
            for (i, item) in state.items.iter_mut().enumerate() {
                if item.status == LinkStatus::Held {
                    link(&state.cases, item);
                    if item.status != LinkStatus::Held {
                        changed.push(i);
                    }
                }
            }
            changed
        }
        AttachmentEventKind::Submitted => {
            let Some(submission_id) = ev.submission_id.clone() else { return Vec::new() };
            if state.items.iter().any(|i| i.submission_id == submission_id) {
                return Vec::new(); // seen already
            }
            let closed_by = state.closed_by.clone();
            let mut changed = Vec::new();
            for a in &ev.attachments {
                let mut item = ItemRow {
                    submission_id: submission_id.clone(),
                    index: a.index,
                    tracking_id: ev.tracking_id.clone(),
                    status: LinkStatus::Held,
                    attach_to: ev.attach_to,
                    member_id: ev.member_id.clone(),
                    admin_ref: ev.admin_ref_number.clone(),
                    is_final: ev.is_final != Some(false),
                    case_ref: None,
                    document_reference: None,
                    unknown_line_items: Vec::new(),
                    reason: None,
                    received_at: ev.envelope.occurred_at,
                    attachment: a.clone(),
                };
                let closed = closed_by.is_some();
                if let Some(closer) = &closed_by {
                    item.status = LinkStatus::Rejected;
                    item.reason = Some(format!(
                        "the attachment set of tracking id {} was closed by submission {closer} (Final=true)",
                        ev.tracking_id
                    ));
                } else if a.awaits_fetch() {
                    // Its identity (for duplicates) and its link wait for the bytes.
                    item.status = LinkStatus::Fetching;
                }
                state.items.push(item);
                let i = state.items.len() - 1;
                if !closed && !a.awaits_fetch() {
                    decide(state, i);
                }
                changed.push(i);
            }
            if ev.is_final != Some(false) && state.closed_by.is_none() {
                state.closed_by = Some(submission_id);
            }
            changed
        }
        AttachmentEventKind::Fetched => {
            let Some(submission_id) = ev.submission_id.as_deref() else { return Vec::new() };
            let mut changed = Vec::new();
            for fetched in ev.attachments.iter().filter(|a| !a.awaits_fetch()) {
                let Some(i) = state.items.iter().position(|i| {
                    i.submission_id == submission_id
                        && i.attachment.index == fetched.index
                        && i.status == LinkStatus::Fetching
                }) else {
                    continue; // decided already: a redelivered FETCHED changes nothing
                };
                let a = &mut state.items[i].attachment;
                a.resource = fetched.resource.clone();
                a.content = fetched.content.clone();
                decide(state, i);
                changed.push(i);
            }
            changed
        }
        AttachmentEventKind::FetchFailed => {
            let Some(submission_id) = ev.submission_id.as_deref() else { return Vec::new() };
            let reason = ev.reason.clone().unwrap_or_else(|| "the content sent by URL could not be fetched".into());
            let mut changed = Vec::new();
            for (i, item) in state.items.iter_mut().enumerate() {
                if item.submission_id == submission_id && item.status == LinkStatus::Fetching {
                    item.status = LinkStatus::Rejected;
                    item.reason = Some(reason.clone());
                    changed.push(i);
                }
            }
            changed
        }
        AttachmentEventKind::Held | AttachmentEventKind::Linked | AttachmentEventKind::Rejected => Vec::new(),
    }
}

/// The DocumentReference (and the QuestionnaireResponse it points at, for that content) that
/// payerx stores for a linked attachment.
pub fn stored_resources(item: &ItemRow, case: Option<&CaseRow>) -> Result<Vec<(String, String, Value)>, String> {
    let a = &item.attachment;
    let mut resource: Value = serde_json::from_str(&a.resource).map_err(|e| format!("content is not JSON: {e}"))?;
    let doc_id = stored_id(item, "DocumentReference");
    let related = item.case_ref.as_ref().map(|r| json!({"reference": r}));
    let code: Option<Value> = a.code.as_deref().and_then(|c| serde_json::from_str(c).ok());
    let patient = case.and_then(|c| c.patient.clone());
    let mut out = Vec::new();
    let mut doc = if a.resource_type == "DocumentReference" {
        resource
    } else {
        let qr_id = stored_id(item, "QuestionnaireResponse");
        resource["id"] = Value::String(qr_id.clone());
        out.push(("QuestionnaireResponse".to_string(), qr_id.clone(), resource));
        json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "content": [{"attachment": {
                "contentType": "application/fhir+json",
                "url": format!("QuestionnaireResponse/{qr_id}"),
                "title": "CDex attachment (QuestionnaireResponse)"
            }}]
        })
    };
    doc["id"] = Value::String(doc_id.clone());
    if doc.get("type").is_none() {
        if let Some(code) = code {
            doc["type"] = code;
        }
    }
    if doc.get("subject").is_none() {
        if let Some(p) = patient {
            doc["subject"] = json!({"reference": p});
        }
    }
    if let Some(related) = related {
        let context = doc.as_object_mut().map(|o| o.entry("context").or_insert_with(|| json!({})));
        if let Some(Value::Object(ctx)) = context {
            let list = ctx.entry("related").or_insert_with(|| json!([]));
            if let Value::Array(l) = list {
                if !l.contains(&related) {
                    l.push(related);
                }
            }
        }
    }
    out.push(("DocumentReference".to_string(), doc_id, doc));
    Ok(out)
}

pub struct LinkProjection {
    attachments: String,
    submissions: String,
}

impl LinkProjection {
    pub fn new(topic_prefix: &str) -> Self {
        LinkProjection {
            attachments: topics::full(topic_prefix, topics::ATTACHMENTS),
            submissions: topics::full(topic_prefix, topics::FHIR_SUBMISSIONS),
        }
    }
}

fn json_err(e: serde_json::Error) -> ProjectionError {
    ProjectionError::Other(e.to_string())
}

async fn load_state(tx: &mut Transaction<'_, Any>, g: i64, tracking: &str) -> Result<LinkState, ProjectionError> {
    let mut state = LinkState::default();
    for row in sqlx::query(&format!("SELECT body FROM {} WHERE tracking_id = $1 ORDER BY seq", cases_table(g)))
        .bind(tracking)
        .fetch_all(&mut **tx)
        .await?
    {
        state.cases.push(serde_json::from_str(&row.try_get::<String, _>(0)?).map_err(json_err)?);
    }
    for row in sqlx::query(&format!("SELECT body FROM {} WHERE tracking_id = $1 ORDER BY seq", items_table(g)))
        .bind(tracking)
        .fetch_all(&mut **tx)
        .await?
    {
        state.items.push(serde_json::from_str(&row.try_get::<String, _>(0)?).map_err(json_err)?);
    }
    state.closed_by = sqlx::query(&format!("SELECT closed_by FROM {} WHERE tracking_id = $1", sets_table(g)))
        .bind(tracking)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get::<String, _>(0))
        .transpose()?;
    Ok(state)
}

async fn save_state(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    tracking: &str,
    before: &LinkState,
    state: &LinkState,
) -> Result<(), ProjectionError> {
    for (seq, case) in state.cases.iter().enumerate() {
        if before.cases.get(seq) == Some(case) {
            continue;
        }
        sqlx::query(&format!(
            "INSERT INTO {} (tracking_id, seq, case_ref, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tracking_id, seq) DO UPDATE SET case_ref = excluded.case_ref, body = excluded.body",
            cases_table(g)
        ))
        .bind(tracking)
        .bind(seq as i64)
        .bind(case.case_ref.as_str())
        .bind(serde_json::to_string(case).map_err(json_err)?)
        .execute(&mut **tx)
        .await?;
    }
    for (seq, item) in state.items.iter().enumerate() {
        if before.items.get(seq) == Some(item) {
            continue;
        }
        sqlx::query(&format!(
            "INSERT INTO {} (tracking_id, seq, submission_id, idx, status, case_ref, body) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tracking_id, seq) DO UPDATE SET status = excluded.status, case_ref = excluded.case_ref, body = excluded.body",
            items_table(g)
        ))
        .bind(tracking)
        .bind(seq as i64)
        .bind(item.submission_id.as_str())
        .bind(i64::from(item.index))
        .bind(item.status.as_str())
        .bind(item.case_ref.as_deref())
        .bind(serde_json::to_string(item).map_err(json_err)?)
        .execute(&mut **tx)
        .await?;
        // Which attachment sets hold each blob: Binary reads find their content type and their
        // patient through it. Content fetched by URL gets its blob after the item was saved.
        let known: Vec<&str> = before
            .items
            .get(seq)
            .map(|b| b.attachment.content.iter().filter_map(|c| c.blob.as_ref().map(|b| b.sha256.as_str())).collect())
            .unwrap_or_default();
        for c in &item.attachment.content {
            let Some(b) = &c.blob else { continue };
            if known.contains(&b.sha256.as_str()) {
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO {} (sha256, tracking_id, seq, content_type) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (sha256, tracking_id, seq) DO NOTHING",
                blobs_table(g)
            ))
            .bind(b.sha256.as_str())
            .bind(tracking)
            .bind(seq as i64)
            .bind(c.content_type.as_deref())
            .execute(&mut **tx)
            .await?;
        }
    }
    if let (None, Some(closer)) = (&before.closed_by, &state.closed_by) {
        sqlx::query(&format!("INSERT INTO {} (tracking_id, closed_by) VALUES ($1, $2)", sets_table(g)))
            .bind(tracking)
            .bind(closer.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl LinkProjection {
    /// The events and writes that tell the world about the items `changed` by one input.
    fn outputs(&self, input: &Consumed, ev: &AttachmentEvent, state: &LinkState, changed: &[usize]) -> Vec<Record> {
        let mut out = Vec::new();
        let mut next = 0u32;
        let mut derive = |event_type: &str| {
            next += 1;
            ev.envelope.derived(event_type, 1, &input.topic, input.partition, input.offset, next - 1)
        };
        // One event per (submission, status), in the order the items were decided.
        let mut groups: Vec<(String, LinkStatus, Vec<usize>)> = Vec::new();
        for &i in changed {
            let item = &state.items[i];
            match groups.iter_mut().find(|(s, st, _)| *s == item.submission_id && *st == item.status) {
                Some(g) => g.2.push(i),
                None => groups.push((item.submission_id.clone(), item.status, vec![i])),
            }
        }
        for (submission, status, items) in groups {
            if matches!(status, LinkStatus::Duplicate | LinkStatus::Fetching) {
                continue;
            }
            let first = &state.items[items[0]];
            let case = first.case_ref.as_ref().and_then(|r| state.cases.iter().find(|c| &c.case_ref == r));
            if status == LinkStatus::Linked {
                let mut changes = Vec::new();
                for &i in &items {
                    match stored_resources(&state.items[i], case) {
                        Ok(resources) => changes.extend(
                            resources
                                .into_iter()
                                .map(|(rtype, id, v)| ResourceChange::upsert(&rtype, &id, v.to_string())),
                        ),
                        Err(e) => {
                            tracing::error!(tracking_id = %ev.tracking_id, error = %e, "attachment content not stored")
                        }
                    }
                }
                if !changes.is_empty() {
                    let write = ResourceChanged {
                        envelope: derive(ResourceChanged::EVENT_TYPE),
                        mode: if changes.len() > 1 { WriteMode::Transaction } else { WriteMode::Single },
                        changes,
                    };
                    if let Ok(value) = schemas::encode_event(&write) {
                        out.push(record(
                            &self.submissions,
                            write.key(),
                            value,
                            &write.envelope,
                            ResourceChanged::EVENT_TYPE,
                        ));
                    }
                }
            }
            let kind = match status {
                LinkStatus::Held => AttachmentEventKind::Held,
                LinkStatus::Linked => AttachmentEventKind::Linked,
                _ => AttachmentEventKind::Rejected,
            };
            let mut told = AttachmentEvent::new(derive(AttachmentEvent::EVENT_TYPE), kind, ev.tracking_id.clone());
            told.submission_id = Some(submission);
            told.attach_to = first.attach_to;
            told.member_id = first.member_id.clone();
            told.is_final = Some(first.is_final);
            told.case_ref = first.case_ref.clone();
            told.case_patient = case.and_then(|c| c.patient.clone());
            let mut unknown = BTreeSet::new();
            let mut reasons = BTreeSet::new();
            for &i in &items {
                let item = &state.items[i];
                let mut a = item.attachment.clone();
                a.document_reference = item.document_reference.clone();
                told.attachments.push(a);
                unknown.extend(item.unknown_line_items.iter().cloned());
                reasons.extend(item.reason.iter().cloned());
            }
            told.unknown_line_items = unknown.into_iter().collect();
            told.reason = match status {
                LinkStatus::Held => Some(format!(
                    "no claim or prior authorization with tracking id {} yet; held for association",
                    ev.tracking_id
                )),
                _ if reasons.is_empty() => None,
                _ => Some(reasons.into_iter().collect::<Vec<_>>().join("; ")),
            };
            if status == LinkStatus::Rejected {
                told.outcome = told.reason.as_ref().map(|r| {
                    schemas::OperationOutcome::error(schemas::IssueType::BusinessRule, r.clone()).to_json().to_string()
                });
            }
            if let Ok(value) = schemas::encode_event(&told) {
                out.push(record(&self.attachments, told.key(), value, &told.envelope, AttachmentEvent::EVENT_TYPE));
            }
        }
        out
    }
}

fn record(topic: &str, key: String, value: Vec<u8>, envelope: &Envelope, event_type: &str) -> Record {
    Record::new(topic.to_string(), key, value)
        .header(headers::EVENT_TYPE, event_type)
        .header(headers::EVENT_ID, envelope.event_id.clone())
        .header(headers::CORRELATION_ID, envelope.correlation_id.clone())
}

#[async_trait]
impl Projection for LinkProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        vec![self.attachments.clone()]
    }

    async fn create_generation(&self, db: &Db, g: i64) -> Result<(), ProjectionError> {
        let (cases, items, sets, blobs) = (cases_table(g), items_table(g), sets_table(g), blobs_table(g));
        for stmt in [
            format!(
                "CREATE TABLE IF NOT EXISTS {cases} (tracking_id TEXT NOT NULL, seq BIGINT NOT NULL, case_ref TEXT NOT NULL,
                 body TEXT NOT NULL, PRIMARY KEY (tracking_id, seq))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {cases}_case ON {cases} (case_ref)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {items} (tracking_id TEXT NOT NULL, seq BIGINT NOT NULL, submission_id TEXT NOT NULL,
                 idx BIGINT NOT NULL, status TEXT NOT NULL, case_ref TEXT, body TEXT NOT NULL, PRIMARY KEY (tracking_id, seq))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {items}_case ON {items} (case_ref)"),
            format!("CREATE INDEX IF NOT EXISTS {items}_submission ON {items} (submission_id)"),
            format!("CREATE TABLE IF NOT EXISTS {sets} (tracking_id TEXT PRIMARY KEY, closed_by TEXT NOT NULL)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {blobs} (sha256 TEXT NOT NULL, tracking_id TEXT NOT NULL, seq BIGINT NOT NULL,
                 content_type TEXT, PRIMARY KEY (sha256, tracking_id, seq))"
            ),
        ] {
            db.execute_ddl(&stmt).await?;
        }
        Ok(())
    }

    async fn drop_generation(&self, db: &Db, g: i64) -> Result<(), ProjectionError> {
        let tables = [cases_table(g), items_table(g), sets_table(g), blobs_table(g)];
        crate::worker::drop_generation_tables(db, NAME, g, &tables).await
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        records: &[Consumed],
    ) -> Result<Applied, ProjectionError> {
        let mut applied = Applied::default();
        for (i, r) in records.iter().enumerate() {
            let ev = match schemas::decode_event::<AttachmentEvent>(&r.value) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(source = r.coordinates(), error = %e, "undecodable event skipped by the attachment-link projection");
                    metrics::counter!("payerx_projection_skipped_total", "projection" => NAME).increment(1);
                    continue;
                }
            };
            if !matches!(
                ev.kind,
                AttachmentEventKind::CaseOpened
                    | AttachmentEventKind::Submitted
                    | AttachmentEventKind::Fetched
                    | AttachmentEventKind::FetchFailed
            ) {
                continue;
            }
            let before = load_state(tx, g, &ev.tracking_id).await?;
            let mut state = before.clone();
            let changed = step(&mut state, &ev);
            save_state(tx, g, &ev.tracking_id, &before, &state).await?;
            applied.emit.extend(self.outputs(r, &ev, &state, &changed).into_iter().map(|o| (i, o)));
        }
        Ok(applied)
    }
}

/// The query side: what the API shows of attachment sets.
#[derive(Clone)]
pub struct LinkStore {
    db: Db,
}

/// One attachment that carries a blob.
#[derive(Debug, Clone)]
pub struct BlobHolder {
    pub content_type: Option<String>,
    pub patient: Option<String>,
    pub case_ref: Option<String>,
}

/// A case with its attachments, for the case view.
#[derive(Debug, Clone, Serialize)]
pub struct CaseView {
    pub tracking_ids: Vec<String>,
    pub items: Vec<ItemRow>,
    pub closed_by: Vec<(String, String)>,
}

impl LinkStore {
    pub fn new(db: Db) -> Self {
        LinkStore { db }
    }

    async fn generation(&self) -> Result<Option<i64>, ProjectionError> {
        crate::worker::served_generation(&self.db, NAME).await
    }

    /// The state of one tracking id (empty if nothing is known).
    pub async fn tracking(&self, tracking_id: &str) -> Result<LinkState, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(LinkState::default()) };
        let mut tx = self.db.pool.begin().await?;
        let state = load_state(&mut tx, g, tracking_id).await?;
        tx.commit().await?;
        Ok(state)
    }

    /// Who holds a blob: for each attachment carrying it, its content type and the case's
    /// patient when it is linked (`None` while held, or for a case without a known patient).
    pub async fn blob_holders(&self, sha256: &str) -> Result<Vec<BlobHolder>, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(Vec::new()) };
        let rows =
            sqlx::query(&format!("SELECT tracking_id, seq, content_type FROM {} WHERE sha256 = $1", blobs_table(g)))
                .bind(sha256)
                .fetch_all(&self.db.pool)
                .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let tracking: String = row.try_get(0)?;
            let seq: i64 = row.try_get(1)?;
            let state = self.tracking(&tracking).await?;
            let item = usize::try_from(seq).ok().and_then(|s| state.items.get(s));
            let patient = item
                .filter(|i| i.status == LinkStatus::Linked || i.status == LinkStatus::Duplicate)
                .and_then(|i| i.case_ref.as_ref())
                .and_then(|r| state.cases.iter().find(|c| &c.case_ref == r))
                .and_then(|c| c.patient.clone());
            out.push(BlobHolder {
                content_type: row.try_get(2)?,
                patient,
                case_ref: item.and_then(|i| i.case_ref.clone()),
            });
        }
        Ok(out)
    }

    /// The attachments of the case `case_ref` (`Claim/{id}`): those linked to it and those
    /// still held or refused under its tracking ids.
    pub async fn case(&self, case_ref: &str) -> Result<CaseView, ProjectionError> {
        let mut view = CaseView { tracking_ids: Vec::new(), items: Vec::new(), closed_by: Vec::new() };
        let Some(g) = self.generation().await? else { return Ok(view) };
        let rows = sqlx::query(&format!("SELECT DISTINCT tracking_id FROM {} WHERE case_ref = $1", cases_table(g)))
            .bind(case_ref)
            .fetch_all(&self.db.pool)
            .await?;
        for row in rows {
            let tracking: String = row.try_get(0)?;
            let state = self.tracking(&tracking).await?;
            view.items.extend(
                state.items.into_iter().filter(|i| i.case_ref.is_none() || i.case_ref.as_deref() == Some(case_ref)),
            );
            if let Some(c) = state.closed_by {
                view.closed_by.push((tracking.clone(), c));
            }
            view.tracking_ids.push(tracking);
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use schemas::{AttachmentContent, Blob};

    fn envelope() -> Envelope {
        Envelope::new("AttachmentEvent", 1, "c".into(), None)
    }

    fn case(items: &[&str]) -> AttachmentEvent {
        let mut ev = AttachmentEvent::new(envelope(), AttachmentEventKind::CaseOpened, "T1".into());
        ev.case_ref = Some("Claim/c1".into());
        ev.case_patient = Some("Patient/p1".into());
        ev.attach_to = Some(AttachTo::Preauthorization);
        ev.case_items = items.iter().map(|s| s.to_string()).collect();
        ev.case_members = vec![Identifier { system: None, value: "M1".into() }];
        ev
    }

    fn submission(id: &str, sha: &str, line_items: &[&str], is_final: Option<bool>) -> AttachmentEvent {
        let mut ev = AttachmentEvent::new(envelope(), AttachmentEventKind::Submitted, "T1".into());
        ev.submission_id = Some(id.into());
        ev.attach_to = Some(AttachTo::Preauthorization);
        ev.member_id = Some(Identifier { system: None, value: "M1".into() });
        ev.is_final = is_final;
        ev.attachments = vec![SubmittedAttachment {
            index: 0,
            line_items: line_items.iter().map(|s| s.to_string()).collect(),
            code: None,
            resource_type: "DocumentReference".into(),
            resource: r#"{"resourceType":"DocumentReference","status":"current","content":[{"attachment":{"contentType":"application/pdf"}}]}"#.into(),
            document_reference: None,
            content: vec![AttachmentContent {
                path: "/content/0/attachment".into(),
                content_type: Some("application/pdf".into()),
                source_url: None,
                blob: Some(Blob { sha256: sha.into(), sha1: "x".into(), size: 3, location: "file:///x".into() }),
            }],
        }];
        ev
    }

    #[test]
    fn links_in_either_order_with_the_same_result() {
        let (sub, opened) = (submission("s1", "aa", &[], Some(false)), case(&["1"]));
        let mut a = LinkState::default();
        assert_eq!(step(&mut a, &sub), [0]);
        assert_eq!(a.items[0].status, LinkStatus::Held);
        assert_eq!(step(&mut a, &opened), [0], "the held attachment is linked when its case arrives");
        let mut b = LinkState::default();
        step(&mut b, &opened);
        step(&mut b, &sub);
        assert_eq!(a.items, b.items);
        assert_eq!(a.items[0].status, LinkStatus::Linked);
        assert_eq!(step(&mut a, &opened), Vec::<usize>::new(), "a case seen again links nothing twice");
    }

    #[test]
    fn unknown_line_items_are_reported_not_dropped() {
        let mut s = LinkState::default();
        step(&mut s, &case(&["1", "2"]));
        step(&mut s, &submission("s1", "aa", &["2", "9"], None));
        assert_eq!(s.items[0].status, LinkStatus::Linked);
        assert_eq!(s.items[0].unknown_line_items, ["9"]);
    }

    #[test]
    fn final_closes_the_set_and_duplicates_are_not_stored_twice() {
        let mut s = LinkState::default();
        step(&mut s, &case(&[]));
        step(&mut s, &submission("s1", "aa", &[], Some(false)));
        step(&mut s, &submission("s2", "aa", &[], Some(false)));
        assert_eq!(s.items[1].status, LinkStatus::Duplicate);
        assert_eq!(s.items[1].document_reference, s.items[0].document_reference);
        assert!(s.closed_by.is_none(), "Final=false keeps the set open");
        step(&mut s, &submission("s3", "bb", &[], None));
        assert_eq!(s.items[2].status, LinkStatus::Linked);
        assert_eq!(s.closed_by.as_deref(), Some("s3"), "Final absent means true");
        step(&mut s, &submission("s4", "cc", &[], None));
        assert_eq!(s.items[3].status, LinkStatus::Rejected);
        assert!(s.items[3].reason.as_deref().unwrap_or("").contains("closed by submission s3"));
        assert!(step(&mut s, &submission("s1", "aa", &[], None)).is_empty(), "a submission is applied once");
    }

    #[test]
    fn a_case_that_does_not_fit_rejects_with_the_reason() {
        let mut s = LinkState::default();
        let mut other_member = submission("s1", "aa", &[], None);
        other_member.member_id = Some(Identifier { system: None, value: "M2".into() });
        step(&mut s, &other_member);
        let mut claim = case(&[]);
        claim.attach_to = Some(AttachTo::Claim);
        step(&mut s, &claim);
        assert_eq!(s.items[0].status, LinkStatus::Rejected);
        assert!(
            s.items[0].reason.as_deref().unwrap_or("").contains("AttachTo is preauthorization"),
            "{:?}",
            s.items[0].reason
        );
    }

    /// A submission whose document was sent by URL, and the fetcher's FETCHED for it.
    fn by_url(id: &str) -> (AttachmentEvent, AttachmentEvent) {
        let mut sub = submission(id, "aa", &[], Some(false));
        let a = &mut sub.attachments[0];
        a.resource = r#"{"resourceType":"DocumentReference","status":"current","content":[{"attachment":{"url":"https://ehr.example/d.pdf"}}]}"#.into();
        let blob = a.content[0].blob.take();
        a.content[0].source_url = Some("https://ehr.example/d.pdf".into());
        let mut fetched = AttachmentEvent::new(envelope(), AttachmentEventKind::Fetched, "T1".into());
        fetched.submission_id = Some(id.into());
        let mut fa = sub.attachments[0].clone();
        fa.content[0].blob = blob;
        fa.resource = r#"{"resourceType":"DocumentReference","status":"current","content":[{"attachment":{"url":"Binary/aa","size":3}}]}"#.into();
        fetched.attachments = vec![fa];
        (sub, fetched)
    }

    #[test]
    fn content_by_url_waits_for_its_fetch_then_links_in_either_order() {
        let (sub, fetched) = by_url("s1");
        // Fetched, then the case.
        let mut a = LinkState::default();
        assert_eq!(step(&mut a, &sub), [0]);
        assert_eq!(a.items[0].status, LinkStatus::Fetching);
        assert!(step(&mut a, &case(&[])).is_empty(), "a case does not link what is still being fetched");
        assert_eq!(a.items[0].status, LinkStatus::Fetching);
        assert_eq!(step(&mut a, &fetched), [0]);
        assert_eq!(a.items[0].status, LinkStatus::Linked);
        assert_eq!(a.items[0].attachment.content[0].blob.as_ref().unwrap().sha256, "aa");
        assert!(a.items[0].attachment.resource.contains("Binary/aa"), "the stored resource points at payerx");
        assert!(step(&mut a, &fetched).is_empty(), "a redelivered FETCHED changes nothing");
        // Fetched before the case: held, then linked when the case arrives.
        let mut b = LinkState::default();
        step(&mut b, &sub);
        assert_eq!(step(&mut b, &fetched), [0]);
        assert_eq!(b.items[0].status, LinkStatus::Held);
        assert_eq!(step(&mut b, &case(&[])), [0]);
        assert_eq!(a.items, b.items);
    }

    #[test]
    fn a_failed_fetch_rejects_with_its_reason_and_a_fetched_duplicate_is_found() {
        let (sub, _) = by_url("s1");
        let mut s = LinkState::default();
        step(&mut s, &case(&[]));
        step(&mut s, &sub);
        let mut failed = AttachmentEvent::new(envelope(), AttachmentEventKind::FetchFailed, "T1".into());
        failed.submission_id = Some("s1".into());
        failed.reason = Some("https://ehr.example/d.pdf: HTTP status 404".into());
        assert_eq!(step(&mut s, &failed), [0]);
        assert_eq!(s.items[0].status, LinkStatus::Rejected);
        assert_eq!(s.items[0].reason.as_deref(), Some("https://ehr.example/d.pdf: HTTP status 404"));
        assert!(step(&mut s, &failed).is_empty(), "decided once");
        // The same bytes inline first, then by URL: the fetched copy is a duplicate.
        step(&mut s, &submission("s2", "aa", &[], Some(false)));
        let (sub3, fetched3) = by_url("s3");
        step(&mut s, &sub3);
        step(&mut s, &fetched3);
        assert_eq!(s.items[1].status, LinkStatus::Linked);
        assert_eq!(s.items[2].status, LinkStatus::Duplicate);
    }

    #[test]
    fn stored_document_reference_points_at_the_case() {
        let mut s = LinkState::default();
        step(&mut s, &case(&[]));
        step(&mut s, &submission("s1", "aa", &[], None));
        let stored = stored_resources(&s.items[0], s.cases.first()).unwrap();
        let (rtype, id, doc) = &stored[0];
        assert_eq!(rtype, "DocumentReference");
        assert_eq!(Some(format!("DocumentReference/{id}")), s.items[0].document_reference);
        assert_eq!(doc["context"]["related"][0]["reference"], "Claim/c1");
        assert_eq!(doc["subject"]["reference"], "Patient/p1");
        assert_eq!(doc["id"], id.as_str());
    }

    #[test]
    fn an_admin_ref_number_must_be_an_identifier_of_the_case() {
        let mut opened = case(&[]);
        opened.case_identifiers =
            vec![Identifier { system: None, value: "T1".into() }, Identifier { system: None, value: "AUTH-9".into() }];
        let mut s = LinkState::default();
        step(&mut s, &opened);
        let mut right = submission("s1", "aa", &[], Some(false));
        right.admin_ref_number = Some(Identifier { system: None, value: "AUTH-9".into() });
        let mut wrong = submission("s2", "bb", &[], Some(false));
        wrong.admin_ref_number = Some(Identifier { system: None, value: "AUTH-1".into() });
        step(&mut s, &right);
        step(&mut s, &wrong);
        assert_eq!(s.items[0].status, LinkStatus::Linked);
        assert_eq!(s.items[1].status, LinkStatus::Rejected);
        assert!(
            s.items[1].reason.as_deref().unwrap_or("").contains("AdminRefNumber AUTH-1"),
            "{:?}",
            s.items[1].reason
        );
    }

    #[test]
    fn a_questionnaire_response_is_stored_with_a_document_reference_pointing_at_it() {
        let mut sub = submission("s1", "aa", &[], None);
        sub.attachments[0].resource_type = "QuestionnaireResponse".into();
        sub.attachments[0].resource = r#"{"resourceType":"QuestionnaireResponse","status":"completed"}"#.into();
        sub.attachments[0].code = Some(r#"{"coding":[{"system":"http://loinc.org","code":"52016-3"}]}"#.into());
        sub.attachments[0].content.clear();
        let mut s = LinkState::default();
        step(&mut s, &case(&[]));
        step(&mut s, &sub);
        let stored = stored_resources(&s.items[0], s.cases.first()).unwrap();
        assert_eq!(
            stored.iter().map(|(t, _, _)| t.as_str()).collect::<Vec<_>>(),
            ["QuestionnaireResponse", "DocumentReference"]
        );
        let (qr_id, doc) = (&stored[0].1, &stored[1].2);
        assert_eq!(doc["content"][0]["attachment"]["url"], format!("QuestionnaireResponse/{qr_id}"));
        assert_eq!(doc["type"]["coding"][0]["code"], "52016-3", "the CDex Code becomes the document type");
        assert_eq!(doc["context"]["related"][0]["reference"], "Claim/c1");
        for (rtype, id, v) in &stored {
            assert_eq!(v["id"], id.as_str(), "{rtype}");
        }
    }
}
