//! The resource read view: the current version of every FHIR resource plus its full history,
//! kept from `fhir.changes` (and `fhir.submissions.dlq`, whose refusals become write outcomes).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use runtime::Consumed;
use schemas::topics::{self, headers};
use schemas::{ChangeAction, IssueType, OperationOutcome, ResourceChanged, WriteMode};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::{Any, Row, Transaction};

use crate::search;
use crate::worker::{active_generation, Applied, Projection};
use crate::{Db, EntryOutcome, ProjectionError, WriteOutcome};

pub const NAME: &str = "resources";

pub(crate) fn current_table(generation: i64) -> String {
    format!("res_current_g{generation}")
}

fn history_table(generation: i64) -> String {
    format!("res_history_g{generation}")
}

/// FHIR `instant` for microseconds since the epoch, e.g. `2026-11-22T20:48:39.123456Z`.
pub fn instant(micros: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    t.format(&f).unwrap_or_default()
}

pub struct ResourceProjection {
    changes: String,
    dead_letters: String,
}

impl ResourceProjection {
    pub fn new(topic_prefix: &str) -> Self {
        ResourceProjection {
            changes: topics::full(topic_prefix, topics::FHIR_CHANGES),
            dead_letters: topics::full(topic_prefix, topics::VALIDATE_DLQ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Current {
    version_id: i64,
    deleted: bool,
}

/// A history row to insert; the last one per resource also becomes its current row.
struct VersionRow {
    resource_type: String,
    id: String,
    version_id: i64,
    last_updated: String,
    last_updated_us: i64,
    content: Option<String>,
    event_id: String,
    method: &'static str,
}

type Key = (String, String);

/// The members of a JSON object with their values left unparsed: a resource is stamped without
/// building (and re-serializing) its whole tree.
pub(crate) struct Members<'a>(pub(crate) Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Sets `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta` and every other
/// member as it was (only `meta` is parsed).
fn stamp(resource: &str, version_id: i64, last_updated: &str) -> Result<String, String> {
    let members: Members = serde_json::from_str(resource).map_err(|e| e.to_string())?;
    let mut out = String::with_capacity(resource.len() + 96);
    let write_meta = |out: &mut String, existing: Option<&RawValue>| -> Result<(), String> {
        let mut meta = match existing.map(|m| serde_json::from_str::<Value>(m.get())) {
            Some(Ok(Value::Object(m))) => m,
            _ => serde_json::Map::new(),
        };
        meta.insert("versionId".into(), Value::String(version_id.to_string()));
        meta.insert("lastUpdated".into(), Value::String(last_updated.to_string()));
        out.push_str("\"meta\":");
        out.push_str(&serde_json::to_string(&meta).map_err(|e| e.to_string())?);
        Ok(())
    };
    out.push('{');
    let mut has_meta = false;
    for (i, (k, v)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if k == "meta" {
            has_meta = true;
            write_meta(&mut out, Some(v))?;
        } else {
            out.push_str(&serde_json::to_string(k).map_err(|e| e.to_string())?);
            out.push(':');
            out.push_str(v.get());
        }
    }
    if !has_meta {
        if !members.0.is_empty() {
            out.push(',');
        }
        write_meta(&mut out, None)?;
    }
    out.push('}');
    Ok(out)
}

/// Decides what one write event does, against the current versions (updated in place), and
/// appends the versions it creates to `rows`. Pure: the database work happens around it, per batch.
fn decide(ev: &ResourceChanged, currents: &mut HashMap<Key, Current>, rows: &mut Vec<VersionRow>) -> WriteOutcome {
    let last_updated = instant(ev.envelope.occurred_at);
    let key = |c: &schemas::ResourceChange| (c.resource_type.clone(), c.resource_id.clone());
    // Every If-Match is checked first, so a transaction fails before anything is written.
    let conflicts: Vec<(usize, i64, Option<i64>)> = ev
        .changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let actual = currents.get(&key(c)).map(|cur| cur.version_id);
            c.if_match.filter(|expected| actual != Some(*expected)).map(|expected| (i, expected, actual))
        })
        .collect();
    if !conflicts.is_empty() {
        let entries: Vec<EntryOutcome> = ev
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let conflict = conflicts.iter().find(|(j, _, _)| *j == i);
                EntryOutcome {
                    status: if conflict.is_some() { 412 } else { 409 },
                    resource_type: c.resource_type.clone(),
                    id: c.resource_id.clone(),
                    version_id: None,
                    last_updated: None,
                    outcome: conflict.map(|(_, expected, actual)| {
                        let now = actual.map_or("none (it does not exist)".to_string(), |v| v.to_string());
                        OperationOutcome::error(
                            IssueType::Conflict,
                            format!(
                                "{}/{} is at version {now}, not the version {expected} given in If-Match",
                                c.resource_type, c.resource_id
                            ),
                        )
                        .to_json()
                    }),
                }
            })
            .collect();
        let outcome = entries.iter().find_map(|e| e.outcome.clone());
        let status = if ev.mode == WriteMode::Transaction && ev.changes.len() > 1 { 412 } else { entries[0].status };
        return WriteOutcome { status, entries, outcome };
    }
    // Stamp every upsert before touching state, so a broken body refuses the whole event.
    let mut stamped = Vec::with_capacity(ev.changes.len());
    for c in &ev.changes {
        if c.action == ChangeAction::Delete {
            stamped.push(None);
            continue;
        }
        let version_id = currents.get(&key(c)).map_or(1, |cur| cur.version_id + 1);
        match stamp(c.resource.as_deref().unwrap_or(""), version_id, &last_updated) {
            Ok(s) => stamped.push(Some(s)),
            Err(e) => {
                // Validated upstream; a broken body here means a producer skipped validation.
                let oo =
                    OperationOutcome::error(IssueType::Structure, format!("resource body is not a JSON object: {e}"));
                return WriteOutcome { status: 400, entries: vec![], outcome: Some(oo.to_json()) };
            }
        }
    }
    let mut entries = Vec::with_capacity(ev.changes.len());
    for (c, content) in ev.changes.iter().zip(stamped) {
        let k = key(c);
        let cur = currents.get(&k).copied();
        let mut entry = EntryOutcome {
            status: 204,
            resource_type: c.resource_type.clone(),
            id: c.resource_id.clone(),
            version_id: None,
            last_updated: None,
            outcome: None,
        };
        match (c.action, cur) {
            (ChangeAction::Upsert, _) => {
                let version_id = cur.map_or(1, |c| c.version_id + 1);
                entry.status = if cur.is_none_or(|c| c.deleted) { 201 } else { 200 };
                entry.version_id = Some(version_id);
                entry.last_updated = Some(last_updated.clone());
                rows.push(VersionRow {
                    resource_type: c.resource_type.clone(),
                    id: c.resource_id.clone(),
                    version_id,
                    last_updated: last_updated.clone(),
                    last_updated_us: ev.envelope.occurred_at,
                    content,
                    event_id: ev.envelope.event_id.clone(),
                    method: if c.created { "POST" } else { "PUT" },
                });
                currents.insert(k, Current { version_id, deleted: false });
            }
            (ChangeAction::Delete, Some(cur)) if !cur.deleted => {
                let version_id = cur.version_id + 1;
                entry.version_id = Some(version_id);
                entry.last_updated = Some(last_updated.clone());
                rows.push(VersionRow {
                    resource_type: c.resource_type.clone(),
                    id: c.resource_id.clone(),
                    version_id,
                    last_updated: last_updated.clone(),
                    last_updated_us: ev.envelope.occurred_at,
                    content: None,
                    event_id: ev.envelope.event_id.clone(),
                    method: "DELETE",
                });
                currents.insert(k, Current { version_id, deleted: true });
            }
            // Deleting what is absent or already deleted succeeds and changes nothing.
            (ChangeAction::Delete, _) => {}
        }
        entries.push(entry);
    }
    let status = entries.first().map_or(200, |e| e.status);
    WriteOutcome { status, entries, outcome: None }
}

/// Rows per multi-row statement: few round trips, modest statements, a bounded set of shapes
/// in the prepared-statement cache.
const CHUNK: usize = 100;

/// Bind-parameter style. SQLite gets positional `?`: sqlx resolves every `$N` through SQLite's
/// name lookup, which is linear per parameter and so quadratic in a multi-row statement.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Params {
    Positional,
    Numbered,
}

impl Params {
    pub(crate) fn of(tx: &Transaction<'_, Any>) -> Params {
        if tx.backend_name().eq_ignore_ascii_case("sqlite") {
            Params::Positional
        } else {
            Params::Numbered
        }
    }

    pub(crate) fn one(self, n: usize) -> String {
        match self {
            Params::Positional => "?".to_string(),
            Params::Numbered => format!("${n}"),
        }
    }

    /// `(?, ?), (?, ?)` or `($1, $2), ($3, $4)` for `rows` rows of `cols` columns.
    pub(crate) fn rows(self, rows: usize, cols: usize) -> String {
        (0..rows)
            .map(|r| format!("({})", (0..cols).map(|c| self.one(r * cols + c + 1)).collect::<Vec<_>>().join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A list of `n` parameters, the first being number `from`.
    pub(crate) fn list(self, from: usize, n: usize) -> String {
        (from..from + n).map(|i| self.one(i)).collect::<Vec<_>>().join(", ")
    }
}

impl ResourceProjection {
    /// Event ids among `ids` that this generation has applied already.
    async fn already_applied(
        &self,
        tx: &mut Transaction<'_, Any>,
        hist_t: &str,
        ids: &[&str],
    ) -> Result<HashSet<String>, ProjectionError> {
        let mut seen = HashSet::new();
        for chunk in ids.chunks(CHUNK * 5) {
            let sql = format!(
                "SELECT DISTINCT event_id FROM {hist_t} WHERE event_id IN ({})",
                Params::of(tx).list(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut **tx).await? {
                seen.insert(row.try_get::<String, _>(0)?);
            }
        }
        Ok(seen)
    }

    /// The current version of every resource in `keys` that exists.
    async fn load_currents(
        &self,
        tx: &mut Transaction<'_, Any>,
        cur_t: &str,
        keys: &HashSet<Key>,
    ) -> Result<HashMap<Key, Current>, ProjectionError> {
        let mut by_type: HashMap<&str, Vec<&str>> = HashMap::new();
        for (t, id) in keys {
            by_type.entry(t.as_str()).or_default().push(id.as_str());
        }
        let mut out = HashMap::with_capacity(keys.len());
        for (rtype, ids) in by_type {
            for chunk in ids.chunks(CHUNK * 5) {
                let sql = format!(
                    "SELECT id, version_id, deleted FROM {cur_t} WHERE resource_type = {} AND id IN ({})",
                    Params::of(tx).one(1),
                    Params::of(tx).list(2, chunk.len())
                );
                let mut q = sqlx::query(&sql).bind(rtype);
                for id in chunk {
                    q = q.bind(*id);
                }
                for row in q.fetch_all(&mut **tx).await? {
                    let id: String = row.try_get(0)?;
                    out.insert(
                        (rtype.to_string(), id),
                        Current { version_id: row.try_get(1)?, deleted: row.try_get::<i64, _>(2)? != 0 },
                    );
                }
            }
        }
        Ok(out)
    }

    async fn write_rows(
        &self,
        tx: &mut Transaction<'_, Any>,
        generation: i64,
        rows: &[VersionRow],
    ) -> Result<(), ProjectionError> {
        let hist_t = history_table(generation);
        let cur_t = current_table(generation);
        for chunk in rows.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO {hist_t} (resource_type, id, version_id, last_updated, last_updated_us, deleted, content, event_id, method) VALUES {}",
                Params::of(tx).rows(chunk.len(), 9)
            );
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.resource_type.as_str())
                    .bind(r.id.as_str())
                    .bind(r.version_id)
                    .bind(r.last_updated.as_str())
                    .bind(r.last_updated_us)
                    .bind(i64::from(r.content.is_none()))
                    .bind(r.content.as_deref())
                    .bind(r.event_id.as_str())
                    .bind(r.method);
            }
            q.execute(&mut **tx).await?;
        }
        for chunk in finals(rows).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO {cur_t} (resource_type, id, version_id, last_updated, last_updated_us, deleted, content) VALUES {}
                 ON CONFLICT (resource_type, id) DO UPDATE SET version_id = excluded.version_id, last_updated = excluded.last_updated,
                 last_updated_us = excluded.last_updated_us, deleted = excluded.deleted, content = excluded.content",
                Params::of(tx).rows(chunk.len(), 7)
            );
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.resource_type.as_str())
                    .bind(r.id.as_str())
                    .bind(r.version_id)
                    .bind(r.last_updated.as_str())
                    .bind(r.last_updated_us)
                    .bind(i64::from(r.content.is_none()))
                    .bind(r.content.as_deref());
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The newest version of each resource in `rows`: its current row (one per key, since a
/// multi-row upsert may not touch a row twice) and what its search index rows come from.
fn finals(rows: &[VersionRow]) -> Vec<&VersionRow> {
    let mut last: HashMap<(&str, &str), &VersionRow> = HashMap::with_capacity(rows.len());
    for r in rows {
        last.insert((r.resource_type.as_str(), r.id.as_str()), r);
    }
    last.into_values().collect()
}

/// One consumed event, as the pure part of `apply` sees it.
enum Work {
    Change(ResourceChanged),
    /// A dead-lettered submission: its outcome, keyed by the submission.
    Refused(String, WriteOutcome),
}

/// What a batch does to the view.
type Decided = (Vec<VersionRow>, Vec<(String, WriteOutcome)>, search::index::Prepared);

/// Decides every event of a batch against the current versions, stamps the new versions and
/// works out their search index rows. Pure CPU work, run on a blocking thread.
fn decide_batch(
    work: Vec<Work>,
    mut applied: HashSet<String>,
    mut currents: HashMap<Key, Current>,
    live_before: &HashSet<Key>,
) -> Result<Decided, ProjectionError> {
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(work.len());
    for w in work {
        match w {
            Work::Change(ev) => {
                // A redelivered event (same id) was applied already: applying it again would
                // create a second version.
                if !applied.insert(ev.envelope.event_id.clone()) {
                    continue;
                }
                let outcome = decide(&ev, &mut currents, &mut rows);
                // Keyed by the submission the client waits on, not by this derived event.
                outcomes.push((ev.envelope.origin_id().to_string(), outcome));
            }
            Work::Refused(origin, outcome) => outcomes.push((origin, outcome)),
        }
    }
    // Search index rows follow the current rows, in the same transaction.
    let changed: Vec<search::index::Current> = finals(&rows)
        .into_iter()
        .map(|r| search::index::Current {
            resource_type: &r.resource_type,
            id: &r.id,
            content: r.content.as_deref(),
            had_rows: live_before.contains(&(r.resource_type.clone(), r.id.clone())),
        })
        .collect();
    let index = search::index::prepare(&changed)?;
    Ok((rows, outcomes, index))
}

async fn record_outcomes(
    tx: &mut Transaction<'_, Any>,
    outcomes: &[(String, WriteOutcome)],
) -> Result<(), ProjectionError> {
    let now = schemas::events::now_micros();
    for chunk in outcomes.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO write_outcomes (event_id, status, body, recorded_us) VALUES {} ON CONFLICT (event_id) DO NOTHING",
            Params::of(tx).rows(chunk.len(), 4)
        );
        let mut q = sqlx::query(&sql);
        for (id, o) in chunk {
            let body = serde_json::to_string(o).map_err(|e| ProjectionError::Other(e.to_string()))?;
            q = q.bind(id.as_str()).bind(i64::from(o.status)).bind(body).bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[async_trait]
impl Projection for ResourceProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        vec![self.changes.clone(), self.dead_letters.clone()]
    }

    async fn create_generation(&self, db: &Db, generation: i64) -> Result<(), ProjectionError> {
        let cur = current_table(generation);
        let hist = history_table(generation);
        for stmt in [
            format!(
                "CREATE TABLE IF NOT EXISTS {cur} (resource_type TEXT NOT NULL, id TEXT NOT NULL, version_id BIGINT NOT NULL,
                 last_updated TEXT NOT NULL, last_updated_us BIGINT NOT NULL, deleted BIGINT NOT NULL, content TEXT,
                 PRIMARY KEY (resource_type, id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {hist} (resource_type TEXT NOT NULL, id TEXT NOT NULL, version_id BIGINT NOT NULL,
                 last_updated TEXT NOT NULL, last_updated_us BIGINT NOT NULL, deleted BIGINT NOT NULL, content TEXT, event_id TEXT NOT NULL,
                 method TEXT NOT NULL,
                 PRIMARY KEY (resource_type, id, version_id))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {hist}_event ON {hist} (event_id)"),
            format!("CREATE INDEX IF NOT EXISTS {cur}_type_updated ON {cur} (resource_type, last_updated_us)"),
        ]
        .into_iter()
        .chain(search::index::ddl(db.backend, generation))
        {
            db.execute_ddl(&stmt).await?;
        }
        Ok(())
    }

    async fn drop_generation(&self, db: &Db, generation: i64) -> Result<(), ProjectionError> {
        let [idx, dates] = search::index::tables(generation);
        let tables = [current_table(generation), history_table(generation), idx, dates];
        crate::worker::drop_generation_tables(db, NAME, generation, &tables).await
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'_, Any>,
        generation: i64,
        records: &[Consumed],
    ) -> Result<Applied, ProjectionError> {
        let mut events = Vec::with_capacity(records.len());
        for r in records {
            match schemas::decode_event::<ResourceChanged>(&r.value) {
                Ok(ev) => events.push((r, ev)),
                Err(e) => {
                    // The validate processor only forwards decodable events; anything else was
                    // produced around it. Skip it visibly rather than block the view.
                    tracing::error!(source = r.coordinates(), error = %e, "undecodable event skipped by the resource projection");
                    metrics::counter!("payerx_projection_skipped_total", "projection" => NAME).increment(1);
                }
            }
        }
        let is_change = |r: &Consumed| r.topic == self.changes;
        let ids: Vec<&str> =
            events.iter().filter(|(r, _)| is_change(r)).map(|(_, ev)| ev.envelope.event_id.as_str()).collect();
        let applied = self.already_applied(tx, &history_table(generation), &ids).await?;
        let keys: HashSet<Key> = events
            .iter()
            .filter(|(r, _)| is_change(r))
            .flat_map(|(_, ev)| ev.changes.iter().map(|c| (c.resource_type.clone(), c.resource_id.clone())))
            .collect();
        let currents = self.load_currents(tx, &current_table(generation), &keys).await?;
        // Resources with index rows now: only those need their rows deleted before new ones.
        let live_before: HashSet<Key> = currents.iter().filter(|(_, c)| !c.deleted).map(|(k, _)| k.clone()).collect();
        let work: Vec<Work> = events
            .into_iter()
            .map(|(r, ev)| {
                if is_change(r) {
                    return Work::Change(ev);
                }
                let oo = r
                    .header(headers::ERROR_OUTCOME)
                    .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    .unwrap_or_else(|| {
                        OperationOutcome::error(
                            IssueType::Invalid,
                            r.header(headers::ERROR_REASON).unwrap_or("refused"),
                        )
                        .to_json()
                    });
                Work::Refused(
                    ev.envelope.origin_id().to_string(),
                    WriteOutcome { status: 400, entries: vec![], outcome: Some(oo) },
                )
            })
            .collect();
        // Stamping and index extraction take tens of milliseconds per batch: kept off the async
        // workers, which serve requests and run the other stages meanwhile.
        let (rows, outcomes, index) =
            tokio::task::spawn_blocking(move || decide_batch(work, applied, currents, &live_before))
                .await
                .map_err(|e| ProjectionError::Other(format!("the projection's batch task failed: {e}")))??;
        self.write_rows(tx, generation, &rows).await?;
        search::index::write(tx, generation, index).await?;
        record_outcomes(tx, &outcomes).await?;
        Ok(Applied { outcomes, emit: Vec::new() })
    }
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: String,
    pub last_updated_us: i64,
    pub deleted: bool,
    /// JSON with `meta.versionId`/`meta.lastUpdated` set; `None` when deleted.
    pub content: Option<String>,
    /// The interaction that made this version (`POST`, `PUT`, `DELETE`); history reads only.
    pub method: Option<String>,
}

/// The query side of the resource view.
pub struct ResourceStore {
    db: Db,
    projection: ResourceProjection,
    generation: Mutex<(i64, Instant)>,
}

const GENERATION_TTL: Duration = Duration::from_millis(500);

pub(crate) fn stored(r: &sqlx::any::AnyRow, rtype: &str, id: &str) -> Result<StoredResource, sqlx::Error> {
    Ok(StoredResource {
        resource_type: rtype.to_string(),
        id: id.to_string(),
        version_id: r.try_get(0)?,
        last_updated: r.try_get(1)?,
        last_updated_us: r.try_get(2)?,
        deleted: r.try_get::<i64, _>(3)? != 0,
        content: r.try_get(4)?,
        method: r.try_get::<String, _>(5).ok(),
    })
}

impl ResourceStore {
    pub fn new(db: Db, topic_prefix: &str) -> Self {
        ResourceStore {
            db,
            projection: ResourceProjection::new(topic_prefix),
            generation: Mutex::new((0, Instant::now() - GENERATION_TTL * 2)),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) async fn generation(&self) -> Result<i64, ProjectionError> {
        if let Ok(g) = self.generation.lock() {
            if g.0 > 0 && g.1.elapsed() < GENERATION_TTL {
                return Ok(g.0);
            }
        }
        let g = active_generation(&self.db, &self.projection).await?;
        let known = self.generation.lock().map(|slot| slot.0).unwrap_or(0);
        if known != g {
            // A view created before an upgrade may lack tables added since (e.g. the search
            // index): make them, empty, rather than fail every query until a replay.
            self.projection.create_generation(&self.db, g).await?;
        }
        if let Ok(mut slot) = self.generation.lock() {
            *slot = (g, Instant::now());
        }
        Ok(g)
    }

    /// The current version (possibly a deletion marker), if the resource was ever written.
    pub async fn read(&self, rtype: &str, id: &str) -> Result<Option<StoredResource>, ProjectionError> {
        let t = current_table(self.generation().await?);
        let row = sqlx::query(&format!("SELECT version_id, last_updated, last_updated_us, deleted, content FROM {t} WHERE resource_type = $1 AND id = $2"))
            .bind(rtype)
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|r| stored(&r, rtype, id)).transpose()?)
    }

    pub async fn vread(
        &self,
        rtype: &str,
        id: &str,
        version_id: i64,
    ) -> Result<Option<StoredResource>, ProjectionError> {
        let t = history_table(self.generation().await?);
        let row = sqlx::query(&format!(
            "SELECT version_id, last_updated, last_updated_us, deleted, content FROM {t} WHERE resource_type = $1 AND id = $2 AND version_id = $3"
        ))
        .bind(rtype)
        .bind(id)
        .bind(version_id)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.map(|r| stored(&r, rtype, id)).transpose()?)
    }

    /// Versions newest first, at most `count`, older than `before_version` when given (paging).
    pub async fn history(
        &self,
        rtype: &str,
        id: &str,
        count: i64,
        before_version: Option<i64>,
    ) -> Result<Vec<StoredResource>, ProjectionError> {
        let t = history_table(self.generation().await?);
        let rows = sqlx::query(&format!(
            "SELECT version_id, last_updated, last_updated_us, deleted, content, method FROM {t}
             WHERE resource_type = $1 AND id = $2 AND version_id < $3 ORDER BY version_id DESC LIMIT $4"
        ))
        .bind(rtype)
        .bind(id)
        .bind(before_version.unwrap_or(i64::MAX))
        .bind(count)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.iter().map(|r| stored(r, rtype, id)).collect::<Result<_, _>>()?)
    }

    /// Every current row of the view, ordered, for comparing two views (tests, replay checks).
    pub async fn snapshot(&self) -> Result<Vec<StoredResource>, ProjectionError> {
        let t = current_table(self.generation().await?);
        let rows = sqlx::query(&format!(
            "SELECT version_id, last_updated, last_updated_us, deleted, content, CAST(NULL AS TEXT), resource_type, id FROM {t} ORDER BY resource_type, id"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let rtype: String = r.try_get(6)?;
                let id: String = r.try_get(7)?;
                Ok(stored(r, &rtype, &id)?)
            })
            .collect()
    }

    pub async fn count(&self, rtype: &str) -> Result<i64, ProjectionError> {
        let t = current_table(self.generation().await?);
        let row = sqlx::query(&format!("SELECT COUNT(*) FROM {t} WHERE resource_type = $1 AND deleted = 0"))
            .bind(rtype)
            .fetch_one(&self.db.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The recorded outcome of a write event, if the projection has applied (or refused) it.
    pub async fn outcome(&self, event_id: &str) -> Result<Option<WriteOutcome>, ProjectionError> {
        let row = sqlx::query("SELECT body FROM write_outcomes WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.db.pool)
            .await?;
        match row {
            Some(r) => {
                let body: String = r.try_get(0)?;
                serde_json::from_str(&body).map(Some).map_err(|e| ProjectionError::Other(e.to_string()))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod stamp_tests {
    #![allow(clippy::unwrap_used)]
    use super::stamp;
    use serde_json::{json, Value};

    #[test]
    fn stamps_meta_and_keeps_everything_else() {
        let r = json!({"resourceType": "Patient", "id": "p", "meta": {"profile": ["x"], "versionId": "9"}, "name": [{"family": "O\"Neil"}]});
        let out: Value =
            serde_json::from_str(&stamp(&r.to_string(), 3, "2026-01-01T00:00:00.000000Z").unwrap()).unwrap();
        assert_eq!(
            out["meta"],
            json!({"profile": ["x"], "versionId": "3", "lastUpdated": "2026-01-01T00:00:00.000000Z"})
        );
        assert_eq!(out["name"], r["name"]);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "name"], "member order is kept");
        let bare: Value =
            serde_json::from_str(&stamp(r#"{"resourceType":"Basic","id":"b"}"#, 1, "t").unwrap()).unwrap();
        assert_eq!(bare["meta"]["versionId"], "1");
        assert!(stamp("[1,2]", 1, "t").is_err());
        assert!(stamp("{\"a\":", 1, "t").is_err());
    }
}
