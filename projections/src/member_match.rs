//! The member-match processor (Da Vinci HRex `$member-match`, PDex `$bulk-member-match`).
//!
//! It keeps a member index from the payer's Patient and Coverage changes, decides each request
//! with the pure matcher in `processors::member_match`, and answers on the decisions topic. Like
//! the attachment links it needs keyed state and decide-once semantics, so it is hosted by the
//! projection worker: the index and the decisions live in the views database in the same
//! transaction as its offsets, and the decisions are appended before that transaction commits.
//!
//! When a generation is built (replay), the decisions topic is also one of its inputs, and the
//! authority on what was decided: a request whose decision is recorded is not decided again, so
//! the replay restores every decision, brute-force counter and member link from the topic (while
//! the index is rebuilt from the changes) and yields the decisions the clients were given. Live,
//! the processor wrote every decision itself and does not read them back.

use std::collections::BTreeMap;

use async_trait::async_trait;
use processors::member_match::{self as mm, ConsentPolicy, IdKey, MatchRequest, MemberRecord, Verdict};
use runtime::{Consumed, Record};
use schemas::topics::{self, headers};
use schemas::{
    ChangeAction, Envelope, MemberMatchDecided, MemberMatchOutcome, MemberMatchRequestKind, MemberMatchRequested,
    ResourceChange, ResourceChanged, WriteMode,
};
use serde_json::{json, Value};
use sqlx::{Any, Row, Transaction};

use crate::worker::{Applied, Projection};
use crate::{Db, ProjectionError};

pub const NAME: &str = "member-match";

/// System of the `MemberIdentifier` returned for a Patient that has no identifier of its own.
pub const PATIENT_ID_SYSTEM: &str = "urn:payerx:patient-id";

/// The PDex code system of the bulk output Groups.
pub const RESULT_SYSTEM: &str = "http://hl7.org/fhir/us/davinci-pdex/CodeSystem/PdexMultiMemberMatchResultCS";

fn members_table(g: i64) -> String {
    format!("mm_members_g{g}")
}
fn names_table(g: i64) -> String {
    format!("mm_names_g{g}")
}
fn ids_table(g: i64) -> String {
    format!("mm_ids_g{g}")
}
fn decisions_table(g: i64) -> String {
    format!("mm_decisions_g{g}")
}
fn links_table(g: i64) -> String {
    format!("mm_links_g{g}")
}
fn jobs_table(g: i64) -> String {
    format!("mm_jobs_g{g}")
}
fn job_members_table(g: i64) -> String {
    format!("mm_job_members_g{g}")
}

/// How the processor decides; from configuration.
#[derive(Debug, Clone)]
pub struct MemberMatchConfig {
    pub consent: ConsentPolicy,
    /// Failed attempts (no match, several matches) a client may make within `failure_window_s`
    /// before its requests are refused as THROTTLED.
    pub max_failures: u32,
    pub failure_window_s: i64,
    /// A request repeating an earlier one (same client, same content) within this window gets the
    /// earlier decision again.
    pub retry_window_s: i64,
}

impl Default for MemberMatchConfig {
    fn default() -> Self {
        MemberMatchConfig {
            consent: ConsentPolicy { supported: vec![mm::POLICY_REGULAR.to_string()], payer_identifiers: Vec::new() },
            max_failures: 5,
            failure_window_s: 900,
            retry_window_s: 86_400,
        }
    }
}

pub struct MemberMatchProjection {
    changes: String,
    requests: String,
    decisions: String,
    submissions: String,
    dead_letters: String,
    config: MemberMatchConfig,
}

impl MemberMatchProjection {
    pub fn new(topic_prefix: &str, config: MemberMatchConfig) -> Self {
        MemberMatchProjection {
            changes: topics::full(topic_prefix, topics::FHIR_CHANGES),
            requests: topics::full(topic_prefix, topics::MEMBER_MATCH_REQUESTS),
            decisions: topics::full(topic_prefix, topics::MEMBER_MATCH_DECISIONS),
            submissions: topics::full(topic_prefix, topics::FHIR_SUBMISSIONS),
            dead_letters: topics::full(topic_prefix, topics::MEMBER_MATCH_DLQ),
            config,
        }
    }
}

fn json_err(e: serde_json::Error) -> ProjectionError {
    ProjectionError::Other(e.to_string())
}

const MICROS: i64 = 1_000_000;

/// `YYYY-MM-DD` (UTC) of a time in microseconds since the epoch.
fn date_of(micros: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(micros.div_euclid(MICROS))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

// ---- the member index ----

async fn forget_source(tx: &mut Transaction<'_, Any>, g: i64, source: &str) -> Result<(), ProjectionError> {
    sqlx::query(&format!("DELETE FROM {} WHERE source = $1", ids_table(g))).bind(source).execute(&mut **tx).await?;
    Ok(())
}

async fn index_ids(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    source: &str,
    patient_id: &str,
    ids: &[IdKey],
) -> Result<(), ProjectionError> {
    for id in ids {
        sqlx::query(&format!(
            "INSERT INTO {} (value, system, patient_id, source) VALUES ($1, $2, $3, $4)",
            ids_table(g)
        ))
        .bind(id.value.as_str())
        .bind(id.system.clone().unwrap_or_default())
        .bind(patient_id)
        .bind(source)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn apply_change(tx: &mut Transaction<'_, Any>, g: i64, c: &ResourceChange) -> Result<(), ProjectionError> {
    let content = match (c.action, &c.resource) {
        (ChangeAction::Upsert, Some(text)) => Some(serde_json::from_str::<Value>(text).map_err(json_err)?),
        _ => None,
    };
    match c.resource_type.as_str() {
        "Patient" => {
            let source = format!("Patient/{}", c.resource_id);
            forget_source(tx, g, &source).await?;
            for t in [members_table(g), names_table(g)] {
                sqlx::query(&format!("DELETE FROM {t} WHERE patient_id = $1"))
                    .bind(c.resource_id.as_str())
                    .execute(&mut **tx)
                    .await?;
            }
            let Some(mut member) = content.as_ref().and_then(mm::member_from_patient) else { return Ok(()) };
            member.patient_id = c.resource_id.clone();
            sqlx::query(&format!("INSERT INTO {} (patient_id, record) VALUES ($1, $2)", members_table(g)))
                .bind(c.resource_id.as_str())
                .bind(serde_json::to_string(&member).map_err(json_err)?)
                .execute(&mut **tx)
                .await?;
            let mut families = member.families.clone();
            families.sort();
            families.dedup();
            for family in families {
                sqlx::query(&format!(
                    "INSERT INTO {} (family, birth_date, patient_id) VALUES ($1, $2, $3)",
                    names_table(g)
                ))
                .bind(family)
                .bind(member.birth_date.clone().unwrap_or_default())
                .bind(c.resource_id.as_str())
                .execute(&mut **tx)
                .await?;
            }
            index_ids(tx, g, &source, &c.resource_id, &member.identifiers).await
        }
        "Coverage" => {
            let source = format!("Coverage/{}", c.resource_id);
            forget_source(tx, g, &source).await?;
            let Some(cov) = content.as_ref().and_then(mm::coverage_from) else { return Ok(()) };
            let Some(patient) = cov.beneficiary.as_deref() else { return Ok(()) };
            let mut ids = cov.identifiers.clone();
            if let Some(s) = &cov.subscriber_id {
                ids.push(IdKey { system: None, value: s.clone() });
            }
            index_ids(tx, g, &source, patient, &ids).await
        }
        _ => Ok(()),
    }
}

/// Members reached through the probe's identifiers (directly, or as a Coverage's beneficiary).
async fn by_identifier(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    ids: &[IdKey],
) -> Result<Vec<MemberRecord>, ProjectionError> {
    let mut out: Vec<MemberRecord> = Vec::new();
    for id in ids {
        let rows = sqlx::query(&format!(
            "SELECT i.system, m.record FROM {} i JOIN {} m ON m.patient_id = i.patient_id WHERE i.value = $1",
            ids_table(g),
            members_table(g)
        ))
        .bind(id.value.as_str())
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let system: String = row.try_get(0)?;
            // A system on both sides must agree; a subscriber id (no system) matches any.
            let agrees = match (&id.system, system.as_str()) {
                (Some(want), have) if !have.is_empty() => want == have,
                _ => true,
            };
            if !agrees {
                continue;
            }
            let member: MemberRecord = serde_json::from_str(&row.try_get::<String, _>(1)?).map_err(json_err)?;
            if !out.iter().any(|m| m.patient_id == member.patient_id) {
                out.push(member);
            }
        }
    }
    Ok(out)
}

async fn by_demographics(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    member: &MemberRecord,
) -> Result<Vec<MemberRecord>, ProjectionError> {
    let Some(birth_date) = &member.birth_date else { return Ok(Vec::new()) };
    let mut out: Vec<MemberRecord> = Vec::new();
    for family in &member.families {
        let rows = sqlx::query(&format!(
            "SELECT m.record FROM {} n JOIN {} m ON m.patient_id = n.patient_id WHERE n.family = $1 AND n.birth_date = $2",
            names_table(g),
            members_table(g)
        ))
        .bind(family.as_str())
        .bind(birth_date.as_str())
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let m: MemberRecord = serde_json::from_str(&row.try_get::<String, _>(0)?).map_err(json_err)?;
            if !out.iter().any(|o| o.patient_id == m.patient_id) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

// ---- decisions ----

/// The row kept per decision: the decision itself, and what the counters and memo need.
/// How a decision row meets one already recorded for the same request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// From the decisions topic, the authority: it replaces what is there.
    Replace,
    /// Just decided here: kept only if the request has no decision yet (a rebuild may have
    /// read it from the topic first). Returns whether it was new.
    IfNew,
}

async fn record_decision(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    d: &MemberMatchDecided,
    member_patient: Option<&str>,
    how: Recorded,
) -> Result<bool, ProjectionError> {
    let client = d.envelope.client_id.clone().unwrap_or_default();
    let failed = i64::from(d.outcome.is_failed_attempt() && !d.repeated && d.bulk_job.is_none());
    let body = serde_json::to_string(d).map_err(json_err)?;
    let conflict = match how {
        Recorded::IfNew => "DO NOTHING",
        Recorded::Replace => {
            "DO UPDATE SET request_hash = excluded.request_hash, client_id = excluded.client_id,
               outcome = excluded.outcome, decided_at = excluded.decided_at, failed = excluded.failed,
               bulk_job = excluded.bulk_job, body = excluded.body"
        }
    };
    let inserted = sqlx::query(&format!(
        "INSERT INTO {} (request_id, request_hash, client_id, outcome, decided_at, failed, bulk_job, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (request_id) {conflict}",
        decisions_table(g)
    ))
    .bind(d.request_id.as_str())
    .bind(d.request_hash.as_str())
    .bind(client.as_str())
    .bind(d.outcome.as_str())
    .bind(d.envelope.occurred_at)
    .bind(failed)
    .bind(d.bulk_job.as_deref())
    .bind(body)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        > 0;
    if !inserted {
        return Ok(false);
    }
    if how == Recorded::Replace {
        // A rebuild may have decided the request itself before reading the decision given.
        sqlx::query(&format!("DELETE FROM {} WHERE request_id = $1", links_table(g)))
            .bind(d.request_id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    if d.outcome == MemberMatchOutcome::Matched {
        if let Some(pid) = &d.patient_id {
            sqlx::query(&format!(
                "INSERT INTO {} (request_id, patient_id, client_id, policy, period_start, period_end, coverage_to_link, consent)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (request_id) DO NOTHING",
                links_table(g)
            ))
            .bind(d.request_id.as_str())
            .bind(pid.as_str())
            .bind(client.as_str())
            .bind(d.consent_policy.as_deref())
            .bind(d.consent_start.as_deref())
            .bind(d.consent_end.as_deref())
            .bind(d.coverage_to_link.as_deref())
            .bind(d.consent.as_deref())
            .execute(&mut **tx)
            .await?;
        }
    }
    match (d.outcome, &d.bulk_job, d.bulk_index) {
        (MemberMatchOutcome::BulkCompleted, Some(job), _) => {
            sqlx::query(&format!("UPDATE {} SET completed_at = $1 WHERE job_id = $2", jobs_table(g)))
                .bind(d.envelope.occurred_at)
                .bind(job.as_str())
                .execute(&mut **tx)
                .await?;
        }
        (outcome, Some(job), Some(index)) => {
            // The member's MemberPatient is known when the decision is made here; a decision
            // replayed from the topic keeps the one stored then.
            sqlx::query(&format!(
                "INSERT INTO {} (job_id, idx, outcome, patient_id, member_patient, reason) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (job_id, idx) DO UPDATE SET outcome = excluded.outcome, patient_id = excluded.patient_id,
                   reason = excluded.reason, member_patient = COALESCE(excluded.member_patient, {t}.member_patient)",
                job_members_table(g),
                t = job_members_table(g)
            ))
            .bind(job.as_str())
            .bind(i64::from(index))
            .bind(category(outcome))
            .bind(d.patient_id.as_deref().filter(|_| outcome == MemberMatchOutcome::Matched))
            .bind(member_patient)
            .bind(d.reason.as_deref())
            .execute(&mut **tx)
            .await?;
        }
        _ => {}
    }
    Ok(true)
}

/// The bulk output Group a decision puts its member in.
pub fn category(outcome: MemberMatchOutcome) -> &'static str {
    match outcome {
        MemberMatchOutcome::Matched => "MatchedMembers",
        MemberMatchOutcome::ConsentRefused => "ConsentConstrainedMembers",
        _ => "NonMatchedMembers",
    }
}

/// The three bulk output Groups, with their PDex result codes.
pub const CATEGORIES: [(&str, &str, &str); 3] = [
    ("MatchedMembers", "match", "Matched"),
    ("NonMatchedMembers", "nomatch", "Not Matched"),
    ("ConsentConstrainedMembers", "consentconstraint", "Consent Constraint"),
];

fn parse_resource(text: Option<&str>, what: &str) -> Result<Option<Value>, String> {
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(t).map(Some).map_err(|e| format!("{what} is not JSON: {e}")),
    }
}

fn request_of(ev: &MemberMatchRequested) -> Result<MatchRequest, String> {
    if let Some(p) = &ev.problem {
        return Err(p.clone());
    }
    Ok(MatchRequest {
        member_patient: parse_resource(ev.member_patient.as_deref(), "MemberPatient")?
            .ok_or("MemberPatient is missing")?,
        coverage_to_match: parse_resource(ev.coverage_to_match.as_deref(), "CoverageToMatch")?
            .ok_or("CoverageToMatch is missing")?,
        coverage_to_link: parse_resource(ev.coverage_to_link.as_deref(), "CoverageToLink")?,
        consent: parse_resource(ev.consent.as_deref(), "Consent")?,
    })
}

impl MemberMatchProjection {
    fn derive(&self, input: &Consumed, env: &Envelope, event_type: &str, index: u32) -> Envelope {
        env.derived(event_type, 1, &input.topic, input.partition, input.offset, index)
    }

    fn decision_record(&self, d: &MemberMatchDecided) -> Result<Record, ProjectionError> {
        let value = schemas::encode_event(d).map_err(|e| ProjectionError::Other(e.to_string()))?;
        Ok(Record::new(self.decisions.clone(), d.key(), value)
            .header(headers::EVENT_TYPE, MemberMatchDecided::EVENT_TYPE)
            .header(headers::EVENT_ID, d.envelope.event_id.clone())
            .header(headers::CORRELATION_ID, d.envelope.correlation_id.clone()))
    }

    /// The earlier decision on the same content from the same client, within the retry window.
    async fn earlier(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        ev: &MemberMatchRequested,
    ) -> Result<Option<MemberMatchDecided>, ProjectionError> {
        let row = sqlx::query(&format!(
            "SELECT body FROM {} WHERE request_hash = $1 AND client_id = $2 AND decided_at >= $3 AND decided_at <= $4
               AND outcome <> 'THROTTLED' AND bulk_job IS NULL ORDER BY decided_at DESC LIMIT 1",
            decisions_table(g)
        ))
        .bind(ev.request_hash.as_str())
        .bind(ev.envelope.client_id.clone().unwrap_or_default())
        .bind(ev.envelope.occurred_at - self.config.retry_window_s * MICROS)
        .bind(ev.envelope.occurred_at)
        .fetch_optional(&mut **tx)
        .await?;
        row.map(|r| serde_json::from_str(&r.try_get::<String, _>(0)?).map_err(json_err)).transpose()
    }

    /// Seconds until the client may try again, when its failed attempts reached the limit.
    async fn throttled(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        ev: &MemberMatchRequested,
    ) -> Result<Option<i64>, ProjectionError> {
        let since = ev.envelope.occurred_at - self.config.failure_window_s * MICROS;
        let row = sqlx::query(&format!(
            "SELECT COUNT(*), MIN(decided_at) FROM {} WHERE client_id = $1 AND failed = 1 AND decided_at > $2 AND decided_at <= $3",
            decisions_table(g)
        ))
        .bind(ev.envelope.client_id.clone().unwrap_or_default())
        .bind(since)
        .bind(ev.envelope.occurred_at)
        .fetch_one(&mut **tx)
        .await?;
        let count: i64 = row.try_get(0)?;
        if count < i64::from(self.config.max_failures) {
            return Ok(None);
        }
        let oldest: i64 = row.try_get::<Option<i64>, _>(1)?.unwrap_or(ev.envelope.occurred_at);
        let free_at = oldest + self.config.failure_window_s * MICROS;
        Ok(Some(((free_at - ev.envelope.occurred_at + MICROS - 1) / MICROS).max(1)))
    }

    /// Decides one request against the index.
    async fn decide(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        input: &Consumed,
        ev: &MemberMatchRequested,
    ) -> Result<MemberMatchDecided, ProjectionError> {
        let env = self.derive(input, &ev.envelope, MemberMatchDecided::EVENT_TYPE, 0);
        let mut d = MemberMatchDecided::new(
            env,
            MemberMatchOutcome::NoMatch,
            ev.envelope.event_id.clone(),
            ev.request_hash.clone(),
        );
        d.bulk_job = ev.bulk_job.clone();
        d.bulk_index = ev.bulk_index;
        let single = ev.kind == MemberMatchRequestKind::Single;
        if single {
            if let Some(earlier) = self.earlier(tx, g, ev).await? {
                let mut again = earlier;
                again.envelope = d.envelope;
                again.request_id = d.request_id;
                again.repeated = true;
                return Ok(again);
            }
            if let Some(secs) = self.throttled(tx, g, ev).await? {
                d.outcome = MemberMatchOutcome::Throttled;
                d.retry_after_s = Some(secs);
                d.reason = Some(format!(
                    "too many failed member-match attempts by this client ({} within {} s); try again in {secs} s",
                    self.config.max_failures, self.config.failure_window_s
                ));
                return Ok(d);
            }
        }
        let req = match request_of(ev) {
            Ok(r) => r,
            Err(reason) => {
                d.outcome = MemberMatchOutcome::Invalid;
                d.reason = Some(reason);
                return Ok(d);
            }
        };
        let probe = mm::probe(&req);
        let (ids_hash, demo_hash) = mm::input_hashes(&probe);
        d.identifiers_hash = Some(ids_hash);
        d.demographics_hash = Some(demo_hash);
        let found = by_identifier(tx, g, &probe.identifiers).await?;
        let by_demo = if found.is_empty() { by_demographics(tx, g, &probe.member).await? } else { Vec::new() };
        match mm::decide(&probe, &found, &by_demo) {
            Verdict::NoMatch { reason } => {
                d.reason = Some(reason);
            }
            Verdict::Multiple { rule, count } => {
                d.outcome = MemberMatchOutcome::MultipleMatches;
                d.rule = Some(rule.as_str().into());
                d.reason = Some(format!(
                    "{count} members match by {}; refine the request (member id, subscriber id)",
                    rule.as_str()
                ));
            }
            Verdict::Matched { patient_id, rule } => {
                d.rule = Some(rule.as_str().into());
                d.patient_id = Some(patient_id.clone());
                let member = found.iter().chain(&by_demo).find(|m| m.patient_id == patient_id);
                let id = member
                    .and_then(|m| m.member_identifier.clone())
                    .unwrap_or(IdKey { system: Some(PATIENT_ID_SYSTEM.into()), value: patient_id.clone() });
                let requester = req.coverage_to_link.as_ref().map(mm::requester_identifiers).unwrap_or_default();
                let consent = match &req.consent {
                    None => Ok(None),
                    Some(c) => mm::check_consent(
                        c,
                        &req.member_patient,
                        &requester,
                        &self.config.consent,
                        &date_of(ev.envelope.occurred_at),
                    )
                    .map(Some),
                };
                match consent {
                    Err(reason) => {
                        d.outcome = MemberMatchOutcome::ConsentRefused;
                        d.reason = Some(format!("the member matched, but the consent cannot be honoured: {reason}"));
                    }
                    Ok(terms) => {
                        d.outcome = MemberMatchOutcome::Matched;
                        d.member_identifier_system = id.system;
                        d.member_identifier_value = Some(id.value);
                        if let Some(t) = terms {
                            d.consent_policy = Some(t.policy);
                            d.consent_start = t.period_start;
                            d.consent_end = t.period_end;
                        }
                        d.consent = ev.consent.clone();
                        d.coverage_to_link = ev.coverage_to_link.clone();
                    }
                }
            }
        }
        Ok(d)
    }

    /// When every member of `job` is decided: the completion event and the MatchedMembers Group
    /// (stored as a FHIR resource through the payer feed, readable at `/fhir/Group/{job}`).
    async fn completion(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        input: &Consumed,
        env: &Envelope,
        job: &str,
    ) -> Result<Vec<Record>, ProjectionError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT total, completed_at, requester, problem FROM {} WHERE job_id = $1",
            jobs_table(g)
        ))
        .bind(job)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(Vec::new());
        };
        let (total, completed, requester, problem): (Option<i64>, Option<i64>, Option<String>, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        let Some(total) = total else { return Ok(Vec::new()) };
        if completed.is_some() || problem.is_some() {
            return Ok(Vec::new());
        }
        let decided: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM {} WHERE job_id = $1", job_members_table(g)))
            .bind(job)
            .fetch_one(&mut **tx)
            .await?
            .try_get(0)?;
        if decided < total {
            return Ok(Vec::new());
        }
        let env = self.derive(input, env, MemberMatchDecided::EVENT_TYPE, 1);
        let mut done = MemberMatchDecided::new(
            env.clone(),
            MemberMatchOutcome::BulkCompleted,
            env.event_id.clone(),
            String::new(),
        );
        done.request_id = format!("{job}/completed");
        done.bulk_job = Some(job.to_string());
        done.bulk_total = i32::try_from(total).ok();
        record_decision(tx, g, &done, None, Recorded::IfNew).await?;

        let mut members = Vec::new();
        for row in sqlx::query(&format!(
            "SELECT patient_id FROM {} WHERE job_id = $1 AND outcome = 'MatchedMembers' ORDER BY idx",
            job_members_table(g)
        ))
        .bind(job)
        .fetch_all(&mut **tx)
        .await?
        {
            if let Some(pid) = row.try_get::<Option<String>, _>(0)? {
                members.push(json!({"entity": {"reference": format!("Patient/{pid}")}}));
            }
        }
        let group = matched_group(job, requester.as_deref(), members);
        let change_env = self.derive(input, &done.envelope, ResourceChanged::EVENT_TYPE, 2);
        let change = ResourceChanged {
            envelope: change_env,
            mode: WriteMode::Single,
            changes: vec![ResourceChange::upsert("Group", job, group.to_string())],
        };
        let value = schemas::encode_event(&change).map_err(|e| ProjectionError::Other(e.to_string()))?;
        let write = Record::new(self.submissions.clone(), change.key(), value)
            .header(headers::EVENT_TYPE, ResourceChanged::EVENT_TYPE)
            .header(headers::EVENT_ID, change.envelope.event_id.clone())
            .header(headers::CORRELATION_ID, change.envelope.correlation_id.clone());
        Ok(vec![self.decision_record(&done)?, write])
    }
}

/// The requesting payer as a `managingEntity` reference (its first organization identifier).
pub fn managing_entity(requester: Option<&str>) -> Option<Value> {
    let ids: Vec<IdKey> = requester.and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    ids.into_iter().next().map(|id| {
        let mut identifier = json!({"value": id.value});
        if let Some(s) = id.system {
            identifier["system"] = json!(s);
        }
        json!({"identifier": identifier})
    })
}

/// The MatchedMembers Group as stored in the read view: its members reference the payer's
/// Patients; the requester's copies of the demographics stay in the bulk output file.
fn matched_group(job: &str, requester: Option<&str>, members: Vec<Value>) -> Value {
    let mut group = json!({
        "resourceType": "Group",
        "id": job,
        "meta": {"profile": ["http://hl7.org/fhir/us/davinci-pdex/StructureDefinition/pdex-member-match-group"]},
        "type": "person",
        "actual": true,
        "code": {"coding": [{"system": RESULT_SYSTEM, "code": "match", "display": "Matched"}]},
        "quantity": members.len(),
    });
    if let Some(m) = managing_entity(requester) {
        group["managingEntity"] = m;
    }
    if !members.is_empty() {
        group["member"] = Value::Array(members);
    }
    group
}

#[async_trait]
impl Projection for MemberMatchProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        vec![self.changes.clone(), self.decisions.clone(), self.requests.clone()]
    }

    /// Live, every decision on the topic was recorded here before it was appended.
    fn live_topics(&self) -> Vec<String> {
        vec![self.changes.clone(), self.requests.clone()]
    }

    async fn create_generation(&self, db: &Db, g: i64) -> Result<(), ProjectionError> {
        let (members, names, ids) = (members_table(g), names_table(g), ids_table(g));
        let (decisions, links, jobs, job_members) =
            (decisions_table(g), links_table(g), jobs_table(g), job_members_table(g));
        for stmt in [
            format!("CREATE TABLE IF NOT EXISTS {members} (patient_id TEXT PRIMARY KEY, record TEXT NOT NULL)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {names} (family TEXT NOT NULL, birth_date TEXT NOT NULL, patient_id TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {names}_key ON {names} (family, birth_date)"),
            format!("CREATE INDEX IF NOT EXISTS {names}_patient ON {names} (patient_id)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {ids} (value TEXT NOT NULL, system TEXT NOT NULL, patient_id TEXT NOT NULL, source TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {ids}_value ON {ids} (value)"),
            format!("CREATE INDEX IF NOT EXISTS {ids}_source ON {ids} (source)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {decisions} (request_id TEXT PRIMARY KEY, request_hash TEXT NOT NULL,
                 client_id TEXT NOT NULL, outcome TEXT NOT NULL, decided_at BIGINT NOT NULL, failed BIGINT NOT NULL,
                 bulk_job TEXT, body TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {decisions}_hash ON {decisions} (request_hash, client_id)"),
            // The brute-force counter reads only a client's failed attempts.
            format!("CREATE INDEX IF NOT EXISTS {decisions}_failed ON {decisions} (client_id, failed, decided_at)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {links} (request_id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, client_id TEXT NOT NULL,
                 policy TEXT, period_start TEXT, period_end TEXT, coverage_to_link TEXT, consent TEXT)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {links}_patient ON {links} (patient_id, client_id)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {jobs} (job_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, created_at BIGINT NOT NULL,
                 total BIGINT, completed_at BIGINT, requester TEXT, problem TEXT)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {job_members} (job_id TEXT NOT NULL, idx BIGINT NOT NULL, outcome TEXT NOT NULL,
                 patient_id TEXT, member_patient TEXT, reason TEXT, PRIMARY KEY (job_id, idx))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {job_members}_outcome ON {job_members} (job_id, outcome, idx)"),
        ] {
            db.execute_ddl(&stmt).await?;
        }
        Ok(())
    }

    async fn drop_generation(&self, db: &Db, g: i64) -> Result<(), ProjectionError> {
        let tables = [
            members_table(g),
            names_table(g),
            ids_table(g),
            decisions_table(g),
            links_table(g),
            jobs_table(g),
            job_members_table(g),
        ];
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
            if r.topic == self.changes {
                let Ok(ev) = schemas::decode_event::<ResourceChanged>(&r.value) else { continue };
                for c in ev.changes.iter().filter(|c| matches!(c.resource_type.as_str(), "Patient" | "Coverage")) {
                    apply_change(tx, g, c).await?;
                }
            } else if r.topic == self.decisions {
                // Only a generation being built reads the decisions (see `live_topics`).
                match schemas::decode_event::<MemberMatchDecided>(&r.value) {
                    Ok(d) => {
                        record_decision(tx, g, &d, None, Recorded::Replace).await?;
                    }
                    Err(e) => {
                        tracing::error!(source = r.coordinates(), error = %e, "undecodable member-match decision skipped")
                    }
                }
            } else {
                let ev = match schemas::decode_event::<MemberMatchRequested>(&r.value) {
                    Ok(ev) => ev,
                    Err(e) => {
                        // Nobody can decide it: to the dead letters with the reason, and on.
                        tracing::error!(source = r.coordinates(), error = %e, "undecodable member-match request dead-lettered");
                        metrics::counter!("payerx_projection_skipped_total", "projection" => NAME).increment(1);
                        let reason = format!("undecodable MemberMatchRequested: {e}");
                        applied
                            .emit
                            .push((i, runtime::processor::dead_letter(r, &self.dead_letters, NAME, &reason, None)));
                        continue;
                    }
                };
                for out in self.request(tx, g, r, &ev).await? {
                    applied.emit.push((i, out));
                }
            }
        }
        Ok(applied)
    }
}

impl MemberMatchProjection {
    async fn request(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        input: &Consumed,
        ev: &MemberMatchRequested,
    ) -> Result<Vec<Record>, ProjectionError> {
        let client = ev.envelope.client_id.clone().unwrap_or_default();
        if let Some(job) = &ev.bulk_job {
            sqlx::query(&format!(
                "INSERT INTO {} (job_id, client_id, created_at, requester) VALUES ($1, $2, $3, $4) ON CONFLICT (job_id) DO NOTHING",
                jobs_table(g)
            ))
            .bind(job.as_str())
            .bind(client.as_str())
            .bind(ev.envelope.occurred_at)
            .bind(ev.requester.as_deref())
            .execute(&mut **tx)
            .await?;
        }
        if ev.kind == MemberMatchRequestKind::BulkClosed {
            let Some(job) = &ev.bulk_job else { return Ok(Vec::new()) };
            sqlx::query(&format!("UPDATE {} SET total = $1, problem = $2 WHERE job_id = $3", jobs_table(g)))
                .bind(ev.bulk_total.map(i64::from))
                .bind(ev.problem.as_deref())
                .bind(job.as_str())
                .execute(&mut **tx)
                .await?;
            return self.completion(tx, g, input, &ev.envelope, job).await;
        }
        let d = self.decide(tx, g, input, ev).await?;
        if !record_decision(tx, g, &d, ev.member_patient.as_deref(), Recorded::IfNew).await? {
            // Rebuilding: the decision came first from the decisions topic, which carries no
            // demographics; the bulk output needs this member's MemberPatient.
            if let (Some(job), Some(index)) = (&ev.bulk_job, ev.bulk_index) {
                sqlx::query(&format!(
                    "UPDATE {} SET member_patient = $1 WHERE job_id = $2 AND idx = $3 AND member_patient IS NULL",
                    job_members_table(g)
                ))
                .bind(ev.member_patient.as_deref())
                .bind(job.as_str())
                .bind(i64::from(index))
                .execute(&mut **tx)
                .await?;
            }
            return Ok(Vec::new());
        }
        metrics::counter!("payerx_member_match_decisions_total", "outcome" => d.outcome.as_str()).increment(1);
        let mut out = vec![self.decision_record(&d)?];
        if let Some(job) = &ev.bulk_job {
            out.extend(self.completion(tx, g, input, &ev.envelope, job).await?);
        }
        Ok(out)
    }
}

/// A bulk member-match job, as its status endpoint shows it.
#[derive(Debug, Clone)]
pub struct BulkJob {
    pub job_id: String,
    pub client_id: String,
    /// When the request was accepted, microseconds since the epoch.
    pub created_at: i64,
    /// Members in the request (known once the whole request was read).
    pub total: Option<i64>,
    pub decided: i64,
    pub completed_at: Option<i64>,
    pub problem: Option<String>,
    pub requester: Option<String>,
    /// Members per output Group, in [`CATEGORIES`] order.
    pub counts: [i64; 3],
}

/// A member of a bulk output Group.
#[derive(Debug, Clone)]
pub struct BulkMember {
    pub index: i64,
    pub patient_id: Option<String>,
    pub member_patient: Option<String>,
}

/// A member link: a matched request's consent and the requesting payer's coverage.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberLink {
    pub request_id: String,
    pub client_id: String,
    pub policy: Option<String>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub coverage_to_link: Option<String>,
    pub consent: Option<String>,
}

/// The query side of the member-match state.
#[derive(Clone)]
pub struct MemberMatchStore {
    db: Db,
}

impl MemberMatchStore {
    pub fn new(db: Db) -> Self {
        MemberMatchStore { db }
    }

    async fn generation(&self) -> Result<Option<i64>, ProjectionError> {
        crate::worker::served_generation(&self.db, NAME).await
    }

    pub async fn job(&self, job_id: &str) -> Result<Option<BulkJob>, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(None) };
        let Some(row) = sqlx::query(&format!(
            "SELECT client_id, created_at, total, completed_at, problem, requester FROM {} WHERE job_id = $1",
            jobs_table(g)
        ))
        .bind(job_id)
        .fetch_optional(&self.db.pool)
        .await?
        else {
            return Ok(None);
        };
        let mut job = BulkJob {
            job_id: job_id.to_string(),
            client_id: row.try_get(0)?,
            created_at: row.try_get(1)?,
            total: row.try_get(2)?,
            completed_at: row.try_get(3)?,
            problem: row.try_get(4)?,
            requester: row.try_get(5)?,
            decided: 0,
            counts: [0; 3],
        };
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for row in sqlx::query(&format!(
            "SELECT outcome, COUNT(*) FROM {} WHERE job_id = $1 GROUP BY outcome",
            job_members_table(g)
        ))
        .bind(job_id)
        .fetch_all(&self.db.pool)
        .await?
        {
            counts.insert(row.try_get(0)?, row.try_get(1)?);
        }
        for (i, (name, _, _)) in CATEGORIES.iter().enumerate() {
            job.counts[i] = counts.get(*name).copied().unwrap_or(0);
        }
        job.decided = job.counts.iter().sum();
        Ok(Some(job))
    }

    /// A page of one output Group's members, by position after `after`.
    pub async fn job_members(
        &self,
        job_id: &str,
        category: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BulkMember>, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(Vec::new()) };
        let rows = sqlx::query(&format!(
            "SELECT idx, patient_id, member_patient FROM {} WHERE job_id = $1 AND outcome = $2 AND idx > $3 ORDER BY idx LIMIT $4",
            job_members_table(g)
        ))
        .bind(job_id)
        .bind(category)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok(BulkMember { index: r.try_get(0)?, patient_id: r.try_get(1)?, member_patient: r.try_get(2)? }))
            .collect()
    }

    /// Members in the index.
    pub async fn member_count(&self) -> Result<i64, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(0) };
        let row = sqlx::query(&format!("SELECT COUNT(*) FROM {}", members_table(g))).fetch_one(&self.db.pool).await?;
        Ok(row.try_get(0)?)
    }

    /// The matcher called in-process on the current index: the same lookups and rules as the
    /// processor, without the log (the floor of `payerx bench member-match`).
    pub async fn decide_direct(&self, req: &MatchRequest) -> Result<Verdict, ProjectionError> {
        let g = self.generation().await?.ok_or_else(|| ProjectionError::Other("no member index yet".into()))?;
        let mut tx = self.db.pool.begin().await?;
        let probe = mm::probe(req);
        let found = by_identifier(&mut tx, g, &probe.identifiers).await?;
        let by_demo = if found.is_empty() { by_demographics(&mut tx, g, &probe.member).await? } else { Vec::new() };
        tx.commit().await?;
        Ok(mm::decide(&probe, &found, &by_demo))
    }

    /// Whether the member index holds this Patient (the index follows the changes topic on its
    /// own, a moment behind the resource view).
    pub async fn indexed(&self, patient_id: &str) -> Result<bool, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(false) };
        let row = sqlx::query(&format!("SELECT 1 FROM {} WHERE patient_id = $1", members_table(g)))
            .bind(patient_id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The links (consents) recorded for a member, newest first: what later data requests from
    /// each payer are judged by.
    pub async fn links(&self, patient_id: &str) -> Result<Vec<MemberLink>, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(Vec::new()) };
        let rows = sqlx::query(&format!(
            "SELECT l.request_id, l.client_id, l.policy, l.period_start, l.period_end, l.coverage_to_link, l.consent
             FROM {} l JOIN {} d ON d.request_id = l.request_id WHERE l.patient_id = $1 ORDER BY d.decided_at DESC",
            links_table(g),
            decisions_table(g)
        ))
        .bind(patient_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(MemberLink {
                    request_id: r.try_get(0)?,
                    client_id: r.try_get(1)?,
                    policy: r.try_get(2)?,
                    period_start: r.try_get(3)?,
                    period_end: r.try_get(4)?,
                    coverage_to_link: r.try_get(5)?,
                    consent: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Every decision, oldest first, as `(request_id, outcome, patient_id, rule)`: what a replay
    /// must reproduce.
    pub async fn decisions(&self) -> Result<Vec<(String, String, Option<String>, Option<String>)>, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(Vec::new()) };
        let rows = sqlx::query(&format!("SELECT body FROM {} ORDER BY decided_at, request_id", decisions_table(g)))
            .fetch_all(&self.db.pool)
            .await?;
        rows.into_iter()
            .map(|r| {
                let d: MemberMatchDecided = serde_json::from_str(&r.try_get::<String, _>(0)?).map_err(json_err)?;
                Ok((d.request_id, d.outcome.as_str().to_string(), d.patient_id, d.rule))
            })
            .collect()
    }
}
