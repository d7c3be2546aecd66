//! The resource read view: the current version of every FHIR resource plus its full history,
//! kept from `fhir.changes` (and `fhir.submissions.dlq`, whose refusals become write outcomes).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use runtime::Consumed;
use schemas::topics::{self, headers};
use schemas::{ChangeAction, IssueType, OperationOutcome, ResourceChanged, WriteMode};
use serde_json::Value;
use sqlx::{Any, Row, Transaction};

use crate::worker::{active_generation, Projection};
use crate::{Db, EntryOutcome, ProjectionError, WriteOutcome};

pub const NAME: &str = "resources";

fn current_table(generation: i64) -> String {
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

struct Current {
    version_id: i64,
    deleted: bool,
}

async fn current(
    tx: &mut Transaction<'static, Any>,
    table: &str,
    rtype: &str,
    id: &str,
) -> Result<Option<Current>, ProjectionError> {
    let row = sqlx::query(&format!("SELECT version_id, deleted FROM {table} WHERE resource_type = $1 AND id = $2"))
        .bind(rtype)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => Some(Current { version_id: r.try_get(0)?, deleted: r.try_get::<i64, _>(1)? != 0 }),
        None => None,
    })
}

async fn record_outcome(
    tx: &mut Transaction<'static, Any>,
    event_id: &str,
    outcome: &WriteOutcome,
) -> Result<(), ProjectionError> {
    let body = serde_json::to_string(outcome).map_err(|e| ProjectionError::Other(e.to_string()))?;
    sqlx::query("INSERT INTO write_outcomes (event_id, status, body, recorded_us) VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING")
        .bind(event_id)
        .bind(i64::from(outcome.status))
        .bind(body)
        .bind(schemas::events::now_micros())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Sets `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta`.
fn stamp(resource: &str, version_id: i64, last_updated: &str) -> Result<String, String> {
    let mut v: Value = serde_json::from_str(resource).map_err(|e| e.to_string())?;
    let obj = v.as_object_mut().ok_or("resource is not a JSON object")?;
    let meta = obj.entry("meta").or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    if let Some(m) = meta.as_object_mut() {
        m.insert("versionId".into(), Value::String(version_id.to_string()));
        m.insert("lastUpdated".into(), Value::String(last_updated.to_string()));
    }
    serde_json::to_string(&v).map_err(|e| e.to_string())
}

impl ResourceProjection {
    async fn apply_change_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        generation: i64,
        ev: &ResourceChanged,
    ) -> Result<WriteOutcome, ProjectionError> {
        let cur_t = current_table(generation);
        let hist_t = history_table(generation);
        let last_updated = instant(ev.envelope.occurred_at);
        // Pre-check every If-Match first, so a transaction fails before writing anything.
        let mut currents = Vec::with_capacity(ev.changes.len());
        let mut conflicts = Vec::new();
        for (i, c) in ev.changes.iter().enumerate() {
            let cur = current(tx, &cur_t, &c.resource_type, &c.resource_id).await?;
            if let Some(expected) = c.if_match {
                let actual = cur.as_ref().map(|c| c.version_id);
                if actual != Some(expected) {
                    conflicts.push((i, expected, actual));
                }
            }
            currents.push(cur);
        }
        if !conflicts.is_empty() {
            let entries = ev
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
                            OperationOutcome::error(
                                IssueType::Conflict,
                                format!(
                                    "{}/{} is at version {}, not the version {expected} given in If-Match",
                                    c.resource_type,
                                    c.resource_id,
                                    actual.map_or("none (it does not exist)".to_string(), |v| v.to_string())
                                ),
                            )
                            .to_json()
                        }),
                    }
                })
                .collect::<Vec<_>>();
            let outcome = entries.iter().find_map(|e| e.outcome.clone());
            let status =
                if ev.mode == WriteMode::Transaction && ev.changes.len() > 1 { 412 } else { entries[0].status };
            return Ok(WriteOutcome { status, entries, outcome });
        }
        let mut entries = Vec::with_capacity(ev.changes.len());
        for (c, cur) in ev.changes.iter().zip(currents) {
            match c.action {
                ChangeAction::Upsert => {
                    let version_id = cur.as_ref().map_or(1, |c| c.version_id + 1);
                    let created = cur.as_ref().is_none_or(|c| c.deleted);
                    let content = match stamp(c.resource.as_deref().unwrap_or(""), version_id, &last_updated) {
                        Ok(s) => s,
                        Err(e) => {
                            // Validated upstream; a broken body here means a producer skipped validation.
                            let oo = OperationOutcome::error(
                                IssueType::Structure,
                                format!("resource body is not a JSON object: {e}"),
                            );
                            return Ok(WriteOutcome { status: 400, entries: vec![], outcome: Some(oo.to_json()) });
                        }
                    };
                    sqlx::query(&format!(
                        "INSERT INTO {hist_t} (resource_type, id, version_id, last_updated, last_updated_us, deleted, content, event_id, method) VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8)"
                    ))
                    .bind(c.resource_type.as_str())
                    .bind(c.resource_id.as_str())
                    .bind(version_id)
                    .bind(last_updated.as_str())
                    .bind(ev.envelope.occurred_at)
                    .bind(content.as_str())
                    .bind(ev.envelope.event_id.as_str())
                    .bind(if c.created { "POST" } else { "PUT" })
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query(&format!(
                        "INSERT INTO {cur_t} (resource_type, id, version_id, last_updated, last_updated_us, deleted, content) VALUES ($1, $2, $3, $4, $5, 0, $6)
                         ON CONFLICT (resource_type, id) DO UPDATE SET version_id = excluded.version_id, last_updated = excluded.last_updated,
                         last_updated_us = excluded.last_updated_us, deleted = 0, content = excluded.content"
                    ))
                    .bind(c.resource_type.as_str())
                    .bind(c.resource_id.as_str())
                    .bind(version_id)
                    .bind(last_updated.as_str())
                    .bind(ev.envelope.occurred_at)
                    .bind(content.as_str())
                    .execute(&mut **tx)
                    .await?;
                    entries.push(EntryOutcome {
                        status: if created { 201 } else { 200 },
                        resource_type: c.resource_type.clone(),
                        id: c.resource_id.clone(),
                        version_id: Some(version_id),
                        last_updated: Some(last_updated.clone()),
                        outcome: None,
                    });
                }
                ChangeAction::Delete => match cur {
                    Some(cur) if !cur.deleted => {
                        let version_id = cur.version_id + 1;
                        sqlx::query(&format!(
                            "INSERT INTO {hist_t} (resource_type, id, version_id, last_updated, last_updated_us, deleted, content, event_id, method) VALUES ($1, $2, $3, $4, $5, 1, NULL, $6, 'DELETE')"
                        ))
                        .bind(c.resource_type.as_str())
                        .bind(c.resource_id.as_str())
                        .bind(version_id)
                        .bind(last_updated.as_str())
                        .bind(ev.envelope.occurred_at)
                        .bind(ev.envelope.event_id.as_str())
                        .execute(&mut **tx)
                        .await?;
                        sqlx::query(&format!(
                            "UPDATE {cur_t} SET version_id = $1, last_updated = $2, last_updated_us = $3, deleted = 1, content = NULL WHERE resource_type = $4 AND id = $5"
                        ))
                        .bind(version_id)
                        .bind(last_updated.as_str())
                        .bind(ev.envelope.occurred_at)
                        .bind(c.resource_type.as_str())
                        .bind(c.resource_id.as_str())
                        .execute(&mut **tx)
                        .await?;
                        entries.push(EntryOutcome {
                            status: 204,
                            resource_type: c.resource_type.clone(),
                            id: c.resource_id.clone(),
                            version_id: Some(version_id),
                            last_updated: Some(last_updated.clone()),
                            outcome: None,
                        });
                    }
                    // Deleting what is absent or already deleted succeeds and changes nothing.
                    _ => entries.push(EntryOutcome {
                        status: 204,
                        resource_type: c.resource_type.clone(),
                        id: c.resource_id.clone(),
                        version_id: None,
                        last_updated: None,
                        outcome: None,
                    }),
                },
            }
        }
        let status = entries.first().map_or(200, |e| e.status);
        Ok(WriteOutcome { status, entries, outcome: None })
    }
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
        ] {
            sqlx::query(&stmt).execute(&db.pool).await?;
        }
        Ok(())
    }

    async fn drop_generation(&self, db: &Db, generation: i64) -> Result<(), ProjectionError> {
        for t in [current_table(generation), history_table(generation)] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {t}")).execute(&db.pool).await?;
        }
        sqlx::query("DELETE FROM projection_offsets WHERE projection = $1 AND generation = $2")
            .bind(NAME)
            .bind(generation)
            .execute(&db.pool)
            .await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        generation: i64,
        records: &[Consumed],
    ) -> Result<Vec<(String, WriteOutcome)>, ProjectionError> {
        let hist_t = history_table(generation);
        let mut outcomes = Vec::with_capacity(records.len());
        for r in records {
            let ev: ResourceChanged = match schemas::decode_event(&r.value) {
                Ok(ev) => ev,
                Err(e) => {
                    // The validate processor only forwards decodable events; anything else was
                    // produced around it. Skip it visibly rather than block the view.
                    tracing::error!(source = r.coordinates(), error = %e, "undecodable event skipped by the resource projection");
                    metrics::counter!("payerx_projection_skipped_total", "projection" => NAME).increment(1);
                    continue;
                }
            };
            let outcome = if r.topic == self.dead_letters {
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
                WriteOutcome { status: 400, entries: vec![], outcome: Some(oo) }
            } else {
                // A redelivered event (same id) was applied already: applying it again would
                // create a second version.
                let seen = sqlx::query(&format!("SELECT 1 FROM {hist_t} WHERE event_id = $1 LIMIT 1"))
                    .bind(ev.envelope.event_id.as_str())
                    .fetch_optional(&mut **tx)
                    .await?
                    .is_some();
                if seen {
                    continue;
                }
                self.apply_change_event(tx, generation, &ev).await?
            };
            // Keyed by the submission the client waits on, not by this derived event.
            let origin = ev.envelope.origin_id().to_string();
            record_outcome(tx, &origin, &outcome).await?;
            outcomes.push((origin, outcome));
        }
        Ok(outcomes)
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

fn stored(r: &sqlx::any::AnyRow, rtype: &str, id: &str) -> Result<StoredResource, sqlx::Error> {
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

    async fn generation(&self) -> Result<i64, ProjectionError> {
        if let Ok(g) = self.generation.lock() {
            if g.0 > 0 && g.1.elapsed() < GENERATION_TTL {
                return Ok(g.0);
            }
        }
        let g = active_generation(&self.db, &self.projection).await?;
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
