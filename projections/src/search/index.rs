//! The index tables of a generation and their upkeep, inside the resource projection's
//! transaction: whenever a resource's current version changes, its rows are replaced.

use std::collections::BTreeMap;

use sqlx::{Any, Transaction};

use super::extract::{extract, IndexValue};
use super::{date_table, text_table};
use crate::db::Backend;
use crate::resources::Params;
use crate::ProjectionError;

/// Rows per insert statement (one JSON array each).
const ROWS: usize = 5000;
/// Ids per `DELETE … IN (…)`.
const IDS: usize = 500;

/// `CREATE` statements for the index tables of `generation`. Both are clustered by resource
/// (cheap replacement) with a second index for lookups by parameter and value.
pub(crate) fn ddl(backend: Backend, generation: i64) -> Vec<String> {
    let (t, d) = (text_table(generation), date_table(generation));
    // SQLite: WITHOUT ROWID stores rows in primary-key order, so the key is the only copy.
    // PostgreSQL: byte order ("C") for `value`, so string prefix ranges use the index.
    let (rowid, collate) = match backend {
        Backend::Sqlite => (" WITHOUT ROWID", ""),
        Backend::Postgres => ("", " COLLATE \"C\""),
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (resource_type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
             value TEXT{collate} NOT NULL, system TEXT NOT NULL, PRIMARY KEY (resource_type, id, param, value, system)){rowid}"
        ),
        format!("CREATE INDEX IF NOT EXISTS {t}_lookup ON {t} (resource_type, param, value)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {d} (resource_type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
             lo BIGINT NOT NULL, hi BIGINT NOT NULL, PRIMARY KEY (resource_type, id, param, lo, hi)){rowid}"
        ),
        format!("CREATE INDEX IF NOT EXISTS {d}_lookup ON {d} (resource_type, param, lo)"),
    ]
}

pub(crate) fn tables(generation: i64) -> [String; 2] {
    [text_table(generation), date_table(generation)]
}

/// The new current state of one resource.
pub(crate) struct Current<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    /// `None` when deleted.
    pub content: Option<&'a str>,
    /// It had index rows before this batch (a live current version).
    pub had_rows: bool,
}

/// The index rows of a batch, worked out off the async runtime (extraction is pure CPU work):
/// the resources whose old rows go, and the new rows as JSON arrays ready to insert.
#[derive(Default)]
pub(crate) struct Prepared {
    /// Resource ids by type whose existing rows are deleted first.
    stale: BTreeMap<String, Vec<String>>,
    /// `[[resource_type, id, param, value, system], …]`, at most `ROWS` rows each.
    texts: Vec<String>,
    /// `[[resource_type, id, param, lo, hi], …]`, at most `ROWS` rows each.
    dates: Vec<String>,
}

/// Works out the index rows of every resource in `currents` (one entry per resource).
pub(crate) fn prepare(currents: &[Current<'_>]) -> Result<Prepared, ProjectionError> {
    let mut stale: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in currents.iter().filter(|c| c.had_rows) {
        stale.entry(c.resource_type.to_string()).or_default().push(c.id.to_string());
    }
    // (resource_type, id, param, value, system) and (resource_type, id, param, lo, hi).
    let mut texts: Vec<(&str, &str, &'static str, String, String)> = Vec::new();
    let mut dates: Vec<(&str, &str, &'static str, i64, i64)> = Vec::new();
    for c in currents {
        let Some(content) = c.content else { continue };
        let entries = match extract(c.resource_type, content) {
            Ok(e) => e,
            Err(e) => {
                // Stamped bodies are JSON objects; should one not be, the resource stays
                // readable, only unsearchable: never block the view on it.
                tracing::error!(resource_type = c.resource_type, id = c.id, error = %e, "resource not indexed for search");
                continue;
            }
        };
        for e in entries {
            match e.value {
                IndexValue::Token { system, code } => texts.push((c.resource_type, c.id, e.param, code, system)),
                IndexValue::String { normalized, exact } => {
                    texts.push((c.resource_type, c.id, e.param, normalized, exact))
                }
                IndexValue::Reference { target_type, target } => {
                    texts.push((c.resource_type, c.id, e.param, target, target_type))
                }
                IndexValue::Uri(u) => texts.push((c.resource_type, c.id, e.param, u, String::new())),
                IndexValue::Date(r) => dates.push((c.resource_type, c.id, e.param, r.lo, r.hi)),
            }
        }
    }
    // Many small rows: sent as one JSON array per statement and unpacked by the database,
    // rather than as five bind parameters a row (binding dominated the projection's time).
    let json = |e: serde_json::Error| ProjectionError::Other(e.to_string());
    Ok(Prepared {
        stale,
        texts: texts.chunks(ROWS).map(serde_json::to_string).collect::<Result<_, _>>().map_err(json)?,
        dates: dates.chunks(ROWS).map(serde_json::to_string).collect::<Result<_, _>>().map_err(json)?,
    })
}

/// Replaces the index rows of the resources `prepared` was made from.
pub(crate) async fn write(
    tx: &mut Transaction<'_, Any>,
    generation: i64,
    prepared: Prepared,
) -> Result<(), ProjectionError> {
    let params = Params::of(tx);
    for table in tables(generation) {
        for (rtype, ids) in &prepared.stale {
            for chunk in ids.chunks(IDS) {
                let sql = format!(
                    "DELETE FROM {table} WHERE resource_type = {} AND id IN ({})",
                    params.one(1),
                    params.list(2, chunk.len())
                );
                let mut q = sqlx::query(&sql).bind(rtype.as_str());
                for id in chunk {
                    q = q.bind(id.as_str());
                }
                q.execute(&mut **tx).await?;
            }
        }
    }
    let (t, d) = (text_table(generation), date_table(generation));
    let pg = params == Params::Numbered;
    for json in prepared.texts {
        let sql = if pg {
            format!(
                "INSERT INTO {t} (resource_type, id, param, value, system)
                 SELECT x->>0, x->>1, x->>2, x->>3, x->>4 FROM jsonb_array_elements(CAST($1 AS jsonb)) x ON CONFLICT DO NOTHING"
            )
        } else {
            format!(
                "INSERT INTO {t} (resource_type, id, param, value, system)
                 SELECT x.value->>0, x.value->>1, x.value->>2, x.value->>3, x.value->>4 FROM json_each(?) x WHERE true ON CONFLICT DO NOTHING"
            )
        };
        sqlx::query(&sql).bind(json).execute(&mut **tx).await?;
    }
    for json in prepared.dates {
        let sql = if pg {
            format!(
                "INSERT INTO {d} (resource_type, id, param, lo, hi)
                 SELECT x->>0, x->>1, x->>2, CAST(x->>3 AS BIGINT), CAST(x->>4 AS BIGINT) FROM jsonb_array_elements(CAST($1 AS jsonb)) x ON CONFLICT DO NOTHING"
            )
        } else {
            format!(
                "INSERT INTO {d} (resource_type, id, param, lo, hi)
                 SELECT x.value->>0, x.value->>1, x.value->>2, x.value->>3, x.value->>4 FROM json_each(?) x WHERE true ON CONFLICT DO NOTHING"
            )
        };
        sqlx::query(&sql).bind(json).execute(&mut **tx).await?;
    }
    Ok(())
}
