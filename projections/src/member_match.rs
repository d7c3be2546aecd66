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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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

use crate::resources::Params;
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
/// Coverages in the index: who they cover, and when.
fn coverages_table(g: i64) -> String {
    format!("mm_coverages_g{g}")
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
            sqlx::query(&format!("DELETE FROM {} WHERE coverage_id = $1", coverages_table(g)))
                .bind(c.resource_id.as_str())
                .execute(&mut **tx)
                .await?;
            let Some(cov) = content.as_ref().and_then(mm::coverage_from) else { return Ok(()) };
            let Some(patient) = cov.beneficiary.as_deref() else { return Ok(()) };
            if cov.status.as_deref() != Some("entered-in-error") {
                sqlx::query(&format!(
                    "INSERT INTO {} (coverage_id, patient_id, status, period_start, period_end, payors) VALUES ($1, $2, $3, $4, $5, $6)",
                    coverages_table(g)
                ))
                .bind(c.resource_id.as_str())
                .bind(patient)
                .bind(cov.status.as_deref())
                .bind(cov.period_start.as_deref())
                .bind(cov.period_end.as_deref())
                .bind(serde_json::to_string(&cov.payors).map_err(json_err)?)
                .execute(&mut **tx)
                .await?;
            }
            let mut ids = cov.identifiers.clone();
            if let Some(s) = &cov.subscriber_id {
                ids.push(IdKey { system: None, value: s.clone() });
            }
            index_ids(tx, g, &source, patient, &ids).await
        }
        _ => Ok(()),
    }
}

/// Values per `IN (…)` lookup: statements stay small on either database.
const LOOKUP_CHUNK: usize = 400;

/// What the index holds for a group of probes, read with one statement per chunk of keys
/// rather than one per key and request.
#[derive(Default)]
struct Candidates {
    members: Vec<MemberRecord>,
    slot: HashMap<String, usize>,
    /// Identifier value → (its system, the member it leads to).
    by_value: HashMap<String, Vec<(String, usize)>>,
    /// (family, birth date) → members.
    by_name: HashMap<(String, String), Vec<usize>>,
}

impl Candidates {
    fn member(&mut self, patient_id: String, record: &str) -> Result<usize, ProjectionError> {
        if let Some(i) = self.slot.get(&patient_id) {
            return Ok(*i);
        }
        self.members.push(serde_json::from_str(record).map_err(json_err)?);
        self.slot.insert(patient_id, self.members.len() - 1);
        Ok(self.members.len() - 1)
    }

    async fn load_identifiers(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        values: BTreeSet<&str>,
    ) -> Result<(), ProjectionError> {
        let values: Vec<&str> = values.into_iter().collect();
        for chunk in values.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT i.value, i.system, m.patient_id, m.record FROM {} i JOIN {} m ON m.patient_id = i.patient_id
                 WHERE i.value IN ({})",
                ids_table(g),
                members_table(g),
                Params::of(tx).list(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for v in chunk {
                query = query.bind(*v);
            }
            for row in query.fetch_all(&mut **tx).await? {
                let slot = self.member(row.try_get(2)?, &row.try_get::<String, _>(3)?)?;
                self.by_value.entry(row.try_get(0)?).or_default().push((row.try_get(1)?, slot));
            }
        }
        Ok(())
    }

    async fn load_demographics(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        keys: BTreeSet<(&str, &str)>,
    ) -> Result<(), ProjectionError> {
        let keys: Vec<(&str, &str)> = keys.into_iter().collect();
        let params = Params::of(tx);
        for chunk in keys.chunks(LOOKUP_CHUNK / 2) {
            let wanted: Vec<String> = (0..chunk.len())
                .map(|k| format!("(n.family = {} AND n.birth_date = {})", params.one(2 * k + 1), params.one(2 * k + 2)))
                .collect();
            let sql = format!(
                "SELECT n.family, n.birth_date, m.patient_id, m.record FROM {} n JOIN {} m ON m.patient_id = n.patient_id
                 WHERE {}",
                names_table(g),
                members_table(g),
                wanted.join(" OR ")
            );
            let mut query = sqlx::query(&sql);
            for (family, birth_date) in chunk {
                query = query.bind(*family).bind(*birth_date);
            }
            for row in query.fetch_all(&mut **tx).await? {
                let slot = self.member(row.try_get(2)?, &row.try_get::<String, _>(3)?)?;
                self.by_name.entry((row.try_get(0)?, row.try_get(1)?)).or_default().push(slot);
            }
        }
        Ok(())
    }

    /// Members reached through the probe's identifiers (directly, or as a Coverage's beneficiary).
    fn by_identifier(&self, ids: &[IdKey]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for id in ids {
            for (system, slot) in self.by_value.get(&id.value).map(Vec::as_slice).unwrap_or_default() {
                // A system on both sides must agree; a subscriber id (no system) matches any.
                let agrees = match (&id.system, system.as_str()) {
                    (Some(want), have) if !have.is_empty() => want == have,
                    _ => true,
                };
                if agrees && !out.contains(slot) {
                    out.push(*slot);
                }
            }
        }
        out
    }

    fn by_demographics(&self, member: &MemberRecord) -> Vec<usize> {
        let Some(birth_date) = &member.birth_date else { return Vec::new() };
        let mut out: Vec<usize> = Vec::new();
        for family in &member.families {
            for slot in self.by_name.get(&(family.clone(), birth_date.clone())).map(Vec::as_slice).unwrap_or_default() {
                if !out.contains(slot) {
                    out.push(*slot);
                }
            }
        }
        out
    }

    /// Attaches the coverage periods held for every member found.
    async fn load_coverage_periods(&mut self, tx: &mut Transaction<'_, Any>, g: i64) -> Result<(), ProjectionError> {
        let ids: Vec<String> = self.slot.keys().cloned().collect();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT patient_id, period_start, period_end FROM {} WHERE patient_id IN ({})",
                coverages_table(g),
                Params::of(tx).list(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&mut **tx).await? {
                let Some(slot) = self.slot.get(&row.try_get::<String, _>(0)?).copied() else { continue };
                self.members[slot].coverage_periods.push(mm::Period { start: row.try_get(1)?, end: row.try_get(2)? });
            }
        }
        Ok(())
    }

    fn records(&self, slots: &[usize]) -> Vec<MemberRecord> {
        slots.iter().map(|i| self.members[*i].clone()).collect()
    }
}

/// The index's candidates for each probe, `(by identifier, by demographics)`: demographics are
/// looked at only when no identifier led anywhere. Two round trips for the whole group.
async fn candidates(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    probes: &[&mm::Probe],
) -> Result<Vec<(Vec<MemberRecord>, Vec<MemberRecord>)>, ProjectionError> {
    let mut index = Candidates::default();
    let values = probes.iter().flat_map(|p| p.identifiers.iter().map(|id| id.value.as_str())).collect();
    index.load_identifiers(tx, g, values).await?;
    let found: Vec<Vec<usize>> = probes.iter().map(|p| index.by_identifier(&p.identifiers)).collect();
    let mut keys = BTreeSet::new();
    for (probe, found) in probes.iter().zip(&found) {
        if let (true, Some(birth_date)) = (found.is_empty(), &probe.member.birth_date) {
            keys.extend(probe.member.families.iter().map(|f| (f.as_str(), birth_date.as_str())));
        }
    }
    if !keys.is_empty() {
        index.load_demographics(tx, g, keys).await?;
    }
    // Coverage periods matter only to a request that gives CoverageToMatch.period.
    if probes.iter().any(|p| p.coverage_period.is_some()) {
        index.load_coverage_periods(tx, g).await?;
    }
    Ok(probes
        .iter()
        .zip(found)
        .map(|(probe, found)| {
            let by_demo = if found.is_empty() { index.by_demographics(&probe.member) } else { Vec::new() };
            (index.records(&found), index.records(&by_demo))
        })
        .collect())
}

// ---- decisions ----

fn client_of(env: &Envelope) -> String {
    env.client_id.clone().unwrap_or_default()
}

/// The earlier attempts a run of requests must take into account: what the decisions table
/// holds about their content and clients, and what the run itself decided so far.
#[derive(Default)]
struct History {
    /// (request hash, client) pairs with a decision on record around the run's time; only
    /// these are looked up one by one.
    on_record: HashSet<(String, String)>,
    /// Each client's failed attempts (decided_at), on record and in the run.
    failures: HashMap<String, Vec<i64>>,
    /// The run's own decisions, the latest per (request hash, client).
    decided: HashMap<(String, String), MemberMatchDecided>,
}

impl History {
    async fn load(
        tx: &mut Transaction<'_, Any>,
        g: i64,
        singles: &[&MemberMatchRequested],
        config: &MemberMatchConfig,
    ) -> Result<History, ProjectionError> {
        let mut history = History::default();
        let times = singles.iter().map(|ev| ev.envelope.occurred_at);
        let (Some(first), Some(last)) = (times.clone().min(), times.max()) else { return Ok(history) };
        let hashes: BTreeSet<&str> = singles.iter().map(|ev| ev.request_hash.as_str()).collect();
        let hashes: Vec<&str> = hashes.into_iter().collect();
        let params = Params::of(tx);
        for chunk in hashes.chunks(LOOKUP_CHUNK) {
            let n = chunk.len();
            let sql = format!(
                "SELECT DISTINCT request_hash, client_id FROM {} WHERE request_hash IN ({}) AND decided_at >= {}
                   AND decided_at <= {} AND outcome <> 'THROTTLED' AND bulk_job IS NULL",
                decisions_table(g),
                params.list(1, n),
                params.one(n + 1),
                params.one(n + 2)
            );
            let mut query = sqlx::query(&sql);
            for h in chunk {
                query = query.bind(*h);
            }
            let query = query.bind(first - config.retry_window_s * MICROS).bind(last);
            for row in query.fetch_all(&mut **tx).await? {
                history.on_record.insert((row.try_get(0)?, row.try_get(1)?));
            }
        }
        let clients: BTreeSet<String> = singles.iter().map(|ev| client_of(&ev.envelope)).collect();
        let clients: Vec<String> = clients.into_iter().collect();
        for chunk in clients.chunks(LOOKUP_CHUNK) {
            let n = chunk.len();
            // Bounded: past the limit a client's attempts are THROTTLED, which do not count.
            let sql = format!(
                "SELECT client_id, decided_at FROM {} WHERE failed = 1 AND client_id IN ({}) AND decided_at > {}
                   AND decided_at <= {}",
                decisions_table(g),
                params.list(1, n),
                params.one(n + 1),
                params.one(n + 2)
            );
            let mut query = sqlx::query(&sql);
            for c in chunk {
                query = query.bind(c.as_str());
            }
            let query = query.bind(first - config.failure_window_s * MICROS).bind(last);
            for row in query.fetch_all(&mut **tx).await? {
                history.failures.entry(row.try_get(0)?).or_default().push(row.try_get(1)?);
            }
        }
        Ok(history)
    }

    fn key(ev: &MemberMatchRequested) -> (String, String) {
        (ev.request_hash.clone(), client_of(&ev.envelope))
    }

    /// The run's own decision on the same content from the same client, within the window.
    fn earlier(&self, ev: &MemberMatchRequested, retry_window_s: i64) -> Option<MemberMatchDecided> {
        let at = ev.envelope.occurred_at;
        self.decided
            .get(&Self::key(ev))
            .filter(|d| d.envelope.occurred_at <= at && d.envelope.occurred_at >= at - retry_window_s * MICROS)
            .cloned()
    }

    fn may_have_earlier(&self, ev: &MemberMatchRequested) -> bool {
        self.on_record.contains(&Self::key(ev))
    }

    /// Seconds until the client may try again, when its failed attempts reached the limit.
    fn throttled(&self, ev: &MemberMatchRequested, config: &MemberMatchConfig) -> Option<i64> {
        let at = ev.envelope.occurred_at;
        let since = at - config.failure_window_s * MICROS;
        let within: Vec<i64> = self
            .failures
            .get(&client_of(&ev.envelope))
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|t| *t > since && *t <= at)
            .collect();
        if within.len() < config.max_failures as usize {
            return None;
        }
        let oldest = within.iter().copied().min().unwrap_or(at);
        let free_at = oldest + config.failure_window_s * MICROS;
        Some(((free_at - at + MICROS - 1) / MICROS).max(1))
    }

    /// Counts a decision of the run, as `record_decision` stores it.
    fn note(&mut self, d: &MemberMatchDecided) {
        if d.bulk_job.is_some() {
            return;
        }
        let client = client_of(&d.envelope);
        if d.outcome.is_failed_attempt() && !d.repeated {
            self.failures.entry(client.clone()).or_default().push(d.envelope.occurred_at);
        }
        if d.outcome != MemberMatchOutcome::Throttled {
            self.decided.insert((d.request_hash.clone(), client), d.clone());
        }
    }
}

/// Where a bulk job stands while a run of its members is recorded: when the members still
/// undecided reach none, the job may complete.
struct JobProgress {
    /// Members left to decide, once the job's size is known and it is still open.
    remaining: Option<i64>,
}

impl JobProgress {
    async fn load(tx: &mut Transaction<'_, Any>, g: i64, job: &str) -> Result<JobProgress, ProjectionError> {
        let row = sqlx::query(&format!(
            "SELECT j.total, j.completed_at, j.problem, (SELECT COUNT(*) FROM {} WHERE job_id = $1) FROM {} j
             WHERE j.job_id = $1",
            job_members_table(g),
            jobs_table(g)
        ))
        .bind(job)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(JobProgress { remaining: None }) };
        let (total, completed, problem, decided): (Option<i64>, Option<i64>, Option<String>, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        let open = completed.is_none() && problem.is_none();
        Ok(JobProgress { remaining: total.filter(|_| open).map(|t| t - decided) })
    }

    /// One more member decided: whether the job may now be complete ([`completion`] checks).
    ///
    /// [`completion`]: MemberMatchProjection::completion
    fn one_more(&mut self) -> bool {
        match &mut self.remaining {
            Some(r) => {
                *r -= 1;
                *r <= 0
            }
            None => false,
        }
    }
}

/// How a decision row meets one already recorded for the same request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// From the decisions topic, the authority: it replaces what is there.
    Replace,
    /// Just decided here: kept only if the request has no decision yet (a rebuild may have
    /// read it from the topic first). Returns whether it was new.
    IfNew,
}

/// [`record_decisions`] for one decision: whether it was recorded.
async fn record_decision(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    d: &MemberMatchDecided,
    member_patient: Option<&str>,
    how: Recorded,
) -> Result<bool, ProjectionError> {
    Ok(record_decisions(tx, g, &[(d, member_patient)], how).await?.first().copied().unwrap_or(false))
}

/// Rows per multi-row statement when recording decisions (8 columns each).
const RECORD_CHUNK: usize = 100;

/// Records decisions (each with the member's MemberPatient, for a bulk member) in a few
/// multi-row statements: the decision rows, and for each one recorded now, its member link, its
/// bulk member row, or its job's completion. Which were recorded, in order: with
/// [`Recorded::IfNew`], a decision already there (or repeated within `items`, as a redelivered
/// request may be) is not.
async fn record_decisions(
    tx: &mut Transaction<'_, Any>,
    g: i64,
    items: &[(&MemberMatchDecided, Option<&str>)],
    how: Recorded,
) -> Result<Vec<bool>, ProjectionError> {
    let conflict = match how {
        Recorded::IfNew => "DO NOTHING",
        Recorded::Replace => {
            "DO UPDATE SET request_hash = excluded.request_hash, client_id = excluded.client_id,
               outcome = excluded.outcome, decided_at = excluded.decided_at, failed = excluded.failed,
               bulk_job = excluded.bulk_job, body = excluded.body"
        }
    };
    let mut recorded: HashSet<String> = HashSet::new();
    for chunk in items.chunks(RECORD_CHUNK) {
        let rows = Params::of(tx).rows(chunk.len(), 8);
        let sql = format!(
            "INSERT INTO {} (request_id, request_hash, client_id, outcome, decided_at, failed, bulk_job, body)
             VALUES {} ON CONFLICT (request_id) {conflict} RETURNING request_id",
            decisions_table(g),
            rows
        );
        let mut query = sqlx::query(&sql);
        for (d, _) in chunk {
            let failed = i64::from(d.outcome.is_failed_attempt() && !d.repeated && d.bulk_job.is_none());
            query = query
                .bind(d.request_id.as_str())
                .bind(d.request_hash.as_str())
                .bind(client_of(&d.envelope))
                .bind(d.outcome.as_str())
                .bind(d.envelope.occurred_at)
                .bind(failed)
                .bind(d.bulk_job.as_deref())
                .bind(serde_json::to_string(d).map_err(json_err)?);
        }
        for row in query.fetch_all(&mut **tx).await? {
            recorded.insert(row.try_get(0)?);
        }
    }
    let new: Vec<bool> = items.iter().map(|(d, _)| recorded.remove(&d.request_id)).collect();
    let now: Vec<(&MemberMatchDecided, Option<&str>)> =
        items.iter().zip(&new).filter(|(_, new)| **new).map(|(item, _)| *item).collect();

    if how == Recorded::Replace {
        // A rebuild may have decided the request itself before reading the decision given.
        for chunk in now.chunks(RECORD_CHUNK) {
            let sql =
                format!("DELETE FROM {} WHERE request_id IN ({})", links_table(g), Params::of(tx).list(1, chunk.len()));
            let mut query = sqlx::query(&sql);
            for (d, _) in chunk {
                query = query.bind(d.request_id.as_str());
            }
            query.execute(&mut **tx).await?;
        }
    }

    let links: Vec<&MemberMatchDecided> = now
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| d.outcome == MemberMatchOutcome::Matched && d.patient_id.is_some())
        .collect();
    for chunk in links.chunks(RECORD_CHUNK) {
        let rows = Params::of(tx).rows(chunk.len(), 8);
        let sql = format!(
            "INSERT INTO {} (request_id, patient_id, client_id, policy, period_start, period_end, coverage_to_link, consent)
             VALUES {} ON CONFLICT (request_id) DO NOTHING",
            links_table(g),
            rows
        );
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query
                .bind(d.request_id.as_str())
                .bind(d.patient_id.as_deref())
                .bind(client_of(&d.envelope))
                .bind(d.consent_policy.as_deref())
                .bind(d.consent_start.as_deref())
                .bind(d.consent_end.as_deref())
                .bind(d.coverage_to_link.as_deref())
                .bind(d.consent.as_deref());
        }
        query.execute(&mut **tx).await?;
    }

    for (d, _) in now.iter().filter(|(d, _)| d.outcome == MemberMatchOutcome::BulkCompleted) {
        sqlx::query(&format!("UPDATE {} SET completed_at = $1 WHERE job_id = $2", jobs_table(g)))
            .bind(d.envelope.occurred_at)
            .bind(d.bulk_job.as_deref())
            .execute(&mut **tx)
            .await?;
    }

    // Bulk members, the last decision per (job, index): one statement may not update a row
    // twice. The MemberPatient is known when the decision is made here; a decision replayed from
    // the topic keeps the one stored then.
    let mut members: BTreeMap<(&str, i32), (&MemberMatchDecided, Option<&str>)> = BTreeMap::new();
    for (d, member_patient) in &now {
        if let (Some(job), Some(index)) = (d.bulk_job.as_deref(), d.bulk_index) {
            members.insert((job, index), (*d, *member_patient));
        }
    }
    let members: Vec<_> = members.into_iter().collect();
    for chunk in members.chunks(RECORD_CHUNK) {
        let rows = Params::of(tx).rows(chunk.len(), 6);
        let t = job_members_table(g);
        let sql = format!(
            "INSERT INTO {t} (job_id, idx, outcome, patient_id, member_patient, reason) VALUES {}
             ON CONFLICT (job_id, idx) DO UPDATE SET outcome = excluded.outcome, patient_id = excluded.patient_id,
               reason = excluded.reason, member_patient = COALESCE(excluded.member_patient, {t}.member_patient)",
            rows
        );
        let mut query = sqlx::query(&sql);
        for ((job, index), (d, member_patient)) in chunk {
            query = query
                .bind(*job)
                .bind(i64::from(*index))
                .bind(category(d.outcome))
                .bind(d.patient_id.as_deref().filter(|_| d.outcome == MemberMatchOutcome::Matched))
                .bind(*member_patient)
                .bind(d.reason.as_deref());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(new)
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

    /// The decision on record for the same content from the same client, within the retry window.
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
        .bind(client_of(&ev.envelope))
        .bind(ev.envelope.occurred_at - self.config.retry_window_s * MICROS)
        .bind(ev.envelope.occurred_at)
        .fetch_optional(&mut **tx)
        .await?;
        row.map(|r| serde_json::from_str(&r.try_get::<String, _>(0)?).map_err(json_err)).transpose()
    }

    /// Decides a run of requests with no index change between them, each in order and as if
    /// alone: the index is read once for the whole run (see [`candidates`]), the memo and the
    /// brute-force counters once per run, and what the run decided so far counts for the
    /// requests after it. A batch of requests thus costs a few statements, not a few per request.
    async fn decide_group(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        records: &[Consumed],
        group: &[(usize, MemberMatchRequested)],
    ) -> Result<Vec<MemberMatchDecided>, ProjectionError> {
        let parsed: Vec<Result<(MatchRequest, mm::Probe), String>> = group
            .iter()
            .map(|(_, ev)| {
                request_of(ev).map(|req| {
                    let probe = mm::probe(&req);
                    (req, probe)
                })
            })
            .collect();
        let probes: Vec<&mm::Probe> = parsed.iter().filter_map(|p| p.as_ref().ok().map(|(_, probe)| probe)).collect();
        let mut looked_up = candidates(tx, g, &probes).await?.into_iter();
        let singles: Vec<&MemberMatchRequested> =
            group.iter().map(|(_, ev)| ev).filter(|ev| ev.kind == MemberMatchRequestKind::Single).collect();
        let mut history = History::load(tx, g, &singles, &self.config).await?;

        let mut out = Vec::with_capacity(group.len());
        for ((i, ev), parsed) in group.iter().zip(parsed) {
            let found = if parsed.is_ok() { looked_up.next() } else { None };
            let env = self.derive(&records[*i], &ev.envelope, MemberMatchDecided::EVENT_TYPE, 0);
            let mut d = MemberMatchDecided::new(
                env,
                MemberMatchOutcome::NoMatch,
                ev.envelope.event_id.clone(),
                ev.request_hash.clone(),
            );
            d.bulk_job = ev.bulk_job.clone();
            d.bulk_index = ev.bulk_index;
            if ev.kind == MemberMatchRequestKind::Single {
                let earlier = match history.earlier(ev, self.config.retry_window_s) {
                    Some(e) => Some(e),
                    None if history.may_have_earlier(ev) => self.earlier(tx, g, ev).await?,
                    None => None,
                };
                if let Some(mut again) = earlier {
                    again.envelope = d.envelope;
                    again.request_id = d.request_id;
                    again.repeated = true;
                    history.note(&again);
                    out.push(again);
                    continue;
                }
                if let Some(secs) = history.throttled(ev, &self.config) {
                    d.outcome = MemberMatchOutcome::Throttled;
                    d.retry_after_s = Some(secs);
                    d.reason = Some(format!(
                        "too many failed member-match attempts by this client ({} within {} s); try again in {secs} s",
                        self.config.max_failures, self.config.failure_window_s
                    ));
                    history.note(&d);
                    out.push(d);
                    continue;
                }
            }
            match (parsed, found) {
                (Ok((req, probe)), Some((found, by_demo))) => self.conclude(&mut d, ev, &req, &probe, &found, &by_demo),
                (Err(reason), _) => {
                    d.outcome = MemberMatchOutcome::Invalid;
                    d.reason = Some(reason);
                }
                (Ok(_), None) => return Err(ProjectionError::Other("member index lookup out of step".into())),
            }
            history.note(&d);
            out.push(d);
        }
        Ok(out)
    }

    /// The matcher's verdict on one request, and the consent check of a match.
    fn conclude(
        &self,
        d: &mut MemberMatchDecided,
        ev: &MemberMatchRequested,
        req: &MatchRequest,
        probe: &mm::Probe,
        found: &[MemberRecord],
        by_demo: &[MemberRecord],
    ) {
        let (ids_hash, demo_hash) = mm::input_hashes(probe);
        d.identifiers_hash = Some(ids_hash);
        d.demographics_hash = Some(demo_hash);
        match mm::decide(probe, found, by_demo) {
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
                let member = found.iter().chain(by_demo).find(|m| m.patient_id == patient_id);
                let id = member
                    .and_then(|m| m.member_identifier.clone())
                    .unwrap_or(IdKey { system: Some(PATIENT_ID_SYSTEM.into()), value: patient_id.clone() });
                // Who asked, as ingest established it (the caller's registered organizations,
                // else CoverageToLink's payor).
                let requester: Vec<IdKey> = match ev.requester.as_deref().map(serde_json::from_str) {
                    Some(Ok(ids)) => ids,
                    _ => req.coverage_to_link.as_ref().map(mm::requester_identifiers).unwrap_or_default(),
                };
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
        let (members, names, ids, coverages) = (members_table(g), names_table(g), ids_table(g), coverages_table(g));
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
            format!(
                "CREATE TABLE IF NOT EXISTS {coverages} (coverage_id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, status TEXT,
                 period_start TEXT, period_end TEXT, payors TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {coverages}_patient ON {coverages} (patient_id)"),
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
            coverages_table(g),
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
        // Requests are decided in runs: everything up to the next index change, recorded
        // decision or closed bulk job, which must see the run's decisions.
        let mut run: Vec<(usize, MemberMatchRequested)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if r.topic == self.requests {
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
                if ev.kind != MemberMatchRequestKind::BulkClosed {
                    run.push((i, ev));
                    continue;
                }
                self.decide_run(tx, g, records, &mut run, &mut applied).await?;
                for out in self.close_job(tx, g, r, &ev).await? {
                    applied.emit.push((i, out));
                }
                continue;
            }
            self.decide_run(tx, g, records, &mut run, &mut applied).await?;
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
            }
        }
        self.decide_run(tx, g, records, &mut run, &mut applied).await?;
        Ok(applied)
    }
}

impl MemberMatchProjection {
    async fn open_job(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        ev: &MemberMatchRequested,
        job: &str,
    ) -> Result<(), ProjectionError> {
        sqlx::query(&format!(
            "INSERT INTO {} (job_id, client_id, created_at, requester) VALUES ($1, $2, $3, $4) ON CONFLICT (job_id) DO NOTHING",
            jobs_table(g)
        ))
        .bind(job)
        .bind(client_of(&ev.envelope))
        .bind(ev.envelope.occurred_at)
        .bind(ev.requester.as_deref())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The end of a bulk request: its size (or the problem that ended it), then completion.
    async fn close_job(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        input: &Consumed,
        ev: &MemberMatchRequested,
    ) -> Result<Vec<Record>, ProjectionError> {
        let Some(job) = &ev.bulk_job else { return Ok(Vec::new()) };
        self.open_job(tx, g, ev, job).await?;
        sqlx::query(&format!("UPDATE {} SET total = $1, problem = $2 WHERE job_id = $3", jobs_table(g)))
            .bind(ev.bulk_total.map(i64::from))
            .bind(ev.problem.as_deref())
            .bind(job.as_str())
            .execute(&mut **tx)
            .await?;
        self.completion(tx, g, input, &ev.envelope, job).await
    }

    /// Decides the run of requests gathered so far, records the decisions and queues them, and
    /// the completion of any bulk job whose last member was among them.
    async fn decide_run(
        &self,
        tx: &mut Transaction<'_, Any>,
        g: i64,
        records: &[Consumed],
        run: &mut Vec<(usize, MemberMatchRequested)>,
        applied: &mut Applied,
    ) -> Result<(), ProjectionError> {
        if run.is_empty() {
            return Ok(());
        }
        let run = std::mem::take(run);
        let mut jobs: HashMap<String, JobProgress> = HashMap::new();
        for (_, ev) in &run {
            if let Some(job) = ev.bulk_job.as_deref().filter(|j| !jobs.contains_key(*j)) {
                self.open_job(tx, g, ev, job).await?;
                jobs.insert(job.to_string(), JobProgress::load(tx, g, job).await?);
            }
        }
        let decisions = self.decide_group(tx, g, records, &run).await?;
        let items: Vec<(&MemberMatchDecided, Option<&str>)> =
            decisions.iter().zip(&run).map(|(d, (_, ev))| (d, ev.member_patient.as_deref())).collect();
        let new = record_decisions(tx, g, &items, Recorded::IfNew).await?;
        for (((i, ev), d), new) in run.iter().zip(&decisions).zip(new) {
            if !new {
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
                continue;
            }
            metrics::counter!("payerx_member_match_decisions_total", "outcome" => d.outcome.as_str()).increment(1);
            applied.emit.push((*i, self.decision_record(d)?));
            if let Some(job) = &ev.bulk_job {
                if jobs.get_mut(job).is_some_and(JobProgress::one_more) {
                    for out in self.completion(tx, g, &records[*i], &ev.envelope, job).await? {
                        applied.emit.push((*i, out));
                    }
                }
            }
        }
        Ok(())
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
        let (found, by_demo) = candidates(&mut tx, g, &[&probe]).await?.pop().unwrap_or_default();
        tx.commit().await?;
        Ok(mm::decide(&probe, &found, &by_demo))
    }

    /// Whether the member index holds this Coverage (with its period).
    pub async fn coverage_indexed(&self, coverage_id: &str) -> Result<bool, ProjectionError> {
        let Some(g) = self.generation().await? else { return Ok(false) };
        let row = sqlx::query(&format!("SELECT 1 FROM {} WHERE coverage_id = $1", coverages_table(g)))
            .bind(coverage_id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.is_some())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const PREFIX: &str = "t.";

    fn consumed(topic: &str, offset: i64, value: Vec<u8>) -> Consumed {
        Consumed {
            topic: topics::full(PREFIX, topic),
            partition: 0,
            offset,
            key: String::new(),
            value,
            headers: Vec::new(),
            timestamp_ms: 0,
        }
    }

    fn patient(id: &str, family: &str, member_id: Option<&str>) -> Value {
        let mut p = json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Jane"]}],
                           "birthDate": "1980-02-03", "gender": "female"});
        if let Some(m) = member_id {
            p["identifier"] = json!([{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                                      "system": "http://payer.example/member", "value": m}]);
        }
        p
    }

    fn change(offset: i64) -> Consumed {
        let ev = ResourceChanged {
            envelope: Envelope::new(ResourceChanged::EVENT_TYPE, 1, "c".into(), None),
            mode: WriteMode::Single,
            changes: vec![ResourceChange::upsert("Patient", "p1", patient("p1", "Doe", Some("M1")).to_string())],
        };
        consumed(topics::FHIR_CHANGES, offset, schemas::encode_event(&ev).unwrap())
    }

    /// A $member-match request from `client` at second `at`; `family` decides whether it matches.
    fn request(offset: i64, client: &str, at: i64, family: &str) -> Consumed {
        let mut env = Envelope::new(MemberMatchRequested::EVENT_TYPE, 1, format!("corr-{offset}"), Some(client.into()));
        env.occurred_at = 1_800_000_000 * MICROS + at * MICROS;
        let mut ev = MemberMatchRequested::new(env, MemberMatchRequestKind::Single, format!("hash-{family}"));
        let member = if family == "Doe" { patient("1", family, Some("M1")) } else { patient("1", family, None) };
        ev.member_patient = Some(member.to_string());
        ev.coverage_to_match = Some(
            json!({"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/1"},
                   "payor": [{"identifier": {"value": "old-payer"}}]})
            .to_string(),
        );
        consumed(topics::MEMBER_MATCH_REQUESTS, offset, schemas::encode_event(&ev).unwrap())
    }

    /// Applies `batches` to a fresh generation; the decisions emitted, as (outcome, repeated),
    /// then the rows recorded: decisions, failed attempts, member links.
    async fn decide(batches: &[&[Consumed]]) -> Vec<(MemberMatchOutcome, bool)> {
        let (out, rows) = decide_and_count(batches).await;
        assert_eq!(rows, (out.len() as i64, 4, 3), "every decision recorded, with its counters and links");
        out
    }

    async fn decide_and_count(batches: &[&[Consumed]]) -> (Vec<(MemberMatchOutcome, bool)>, (i64, i64, i64)) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&Db::sqlite_url(dir.path()), 2).await.unwrap();
        let p = MemberMatchProjection::new(PREFIX, MemberMatchConfig { max_failures: 3, ..Default::default() });
        p.create_generation(&db, 1).await.unwrap();
        let mut out = Vec::new();
        for batch in batches {
            let mut tx = db.pool.begin().await.unwrap();
            let applied = p.apply(&mut tx, 1, batch).await.unwrap();
            tx.commit().await.unwrap();
            for (_, r) in applied.emit {
                let d = schemas::decode_event::<MemberMatchDecided>(&r.value).unwrap();
                out.push((d.outcome, d.repeated));
            }
        }
        let count = |sql: String| {
            let pool = db.pool.clone();
            async move { sqlx::query(&sql).fetch_one(&pool).await.unwrap().try_get::<i64, _>(0).unwrap() }
        };
        let rows = (
            count(format!("SELECT COUNT(*) FROM {}", decisions_table(1))).await,
            count(format!("SELECT COUNT(*) FROM {} WHERE failed = 1", decisions_table(1))).await,
            count(format!("SELECT COUNT(*) FROM {}", links_table(1))).await,
        );
        (out, rows)
    }

    #[tokio::test]
    async fn a_batch_decides_as_its_requests_would_one_at_a_time() {
        use MemberMatchOutcome::*;
        let records = vec![
            change(0),
            request(0, "a", 1, "Doe"),
            request(1, "a", 2, "Doe"), // the same content again: the same decision, repeated
            request(2, "a", 3, "Roe"),
            request(3, "a", 4, "Poe"),
            request(4, "b", 5, "Roe"), // another client's failures are its own
            request(5, "a", 6, "Zoe"),
            request(6, "a", 7, "Moe"), // a's fourth failure in the window: over the limit of 3
            request(7, "a", 8, "Doe"), // a repeat is answered even while throttled
        ];
        let expected = vec![
            (Matched, false),
            (Matched, true),
            (NoMatch, false),
            (NoMatch, false),
            (NoMatch, false),
            (NoMatch, false),
            (Throttled, false),
            (Matched, true),
        ];
        let one_by_one: Vec<&[Consumed]> = records.iter().map(std::slice::from_ref).collect();
        assert_eq!(decide(&one_by_one).await, expected);
        assert_eq!(decide(&[&records]).await, expected, "one batch, the same decisions");
        let (head, tail) = records.split_at(4);
        assert_eq!(decide(&[head, tail]).await, expected, "split across batches, the same decisions");
    }
}
