//! The query planner: a `SearchQuery` becomes one SQL statement over the current resources and
//! the index tables of the served generation, the same on SQLite and PostgreSQL. Pages are
//! keyset-paged on the resource id, so a page never repeats or drops a resource because of
//! writes made since the previous page.

use std::collections::{BTreeMap, HashSet};

use sqlx::any::AnyArguments;
use sqlx::{Any, Row};

use super::query::{DateCond, Filter, Prefix, SearchQuery, TextMatch};
use super::registry::{self, ParamType};
use super::{date_table, text_table};
use crate::db::Backend;
use crate::resources::{current_table, stored, ResourceStore, StoredResource};
use crate::ProjectionError;

/// Most resources `_include` and `_revinclude` add to one page together.
pub const MAX_INCLUDES: usize = 1000;

/// Whose resources a search may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compartment {
    All,
    /// Only this patient's compartment (types outside any patient compartment stay visible).
    Patient(String),
}

/// One page of results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchPage {
    pub matches: Vec<StoredResource>,
    /// `_include` / `_revinclude` results not among the matches, not yet filtered by the
    /// caller's access (the types are the caller's to check).
    pub includes: Vec<StoredResource>,
    /// `_cursor` of the next page, when there is one.
    pub next_cursor: Option<String>,
    /// With `_total` or `_summary=count`.
    pub total: Option<i64>,
    /// More included resources existed than `MAX_INCLUDES`.
    pub includes_truncated: bool,
}

enum Bind {
    Text(String),
    Int(i64),
}

/// SQL text with its bind values, placeholders in the backend's style.
struct Sql {
    text: String,
    binds: Vec<Bind>,
    numbered: bool,
}

impl Sql {
    fn new(backend: Backend) -> Sql {
        // SQLite gets `?`: sqlx resolves `$N` there by a linear name lookup per parameter.
        Sql { text: String::with_capacity(512), binds: Vec::new(), numbered: backend == Backend::Postgres }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    fn bind(&mut self, b: Bind) -> &mut Self {
        self.binds.push(b);
        if self.numbered {
            let n = self.binds.len();
            self.text.push_str(&format!("${n}"));
        } else {
            self.text.push('?');
        }
        self
    }

    fn text(&mut self, s: impl Into<String>) -> &mut Self {
        self.bind(Bind::Text(s.into()))
    }

    fn int(&mut self, i: i64) -> &mut Self {
        self.bind(Bind::Int(i))
    }

    fn list<'a>(&mut self, items: impl IntoIterator<Item = &'a str>) -> &mut Self {
        self.push("(");
        let mut empty = true;
        for (i, s) in items.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.text(s);
            empty = false;
        }
        // `IN ()` is SQLite only; `IN (NULL)` matches nothing on both.
        if empty {
            self.push("NULL");
        }
        self.push(")")
    }

    fn query(&self) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for b in &self.binds {
            q = match b {
                Bind::Text(s) => q.bind(s.as_str()),
                Bind::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

/// `%`, `_` and `\` taken literally in a `LIKE … ESCAPE '\'` pattern.
fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// One date condition over a stored range `[lo, hi]` (both inclusive).
fn date_cond(sql: &mut Sql, lo: &str, hi: &str, c: &DateCond) {
    let (slo, shi) = (c.range.lo, c.range.hi);
    match c.prefix {
        // The stored range lies within the searched one.
        Prefix::Eq => sql.push(&format!("({lo} >= ")).int(slo).push(&format!(" AND {hi} <= ")).int(shi).push(")"),
        Prefix::Ne => sql.push(&format!("NOT ({lo} >= ")).int(slo).push(&format!(" AND {hi} <= ")).int(shi).push(")"),
        Prefix::Gt => sql.push(&format!("{hi} > ")).int(shi),
        Prefix::Lt => sql.push(&format!("{lo} < ")).int(slo),
        Prefix::Ge => sql.push(&format!("{hi} >= ")).int(slo),
        Prefix::Le => sql.push(&format!("{lo} <= ")).int(shi),
        Prefix::Sa => sql.push(&format!("{lo} > ")).int(shi),
        Prefix::Eb => sql.push(&format!("{hi} < ")).int(slo),
    };
}

fn text_match(sql: &mut Sql, m: &TextMatch) {
    match m {
        TextMatch::Eq { value, system: None } => {
            sql.push("i.value = ").text(value.as_str());
        }
        TextMatch::Eq { value, system: Some(s) } => {
            sql.push("(i.value = ").text(value.as_str()).push(" AND i.system = ").text(s.as_str()).push(")");
        }
        TextMatch::EqAnyType { value, types } if types.is_empty() => {
            sql.push("i.value = ").text(value.as_str());
        }
        TextMatch::EqAnyType { value, types } => {
            sql.push("(i.value = ").text(value.as_str()).push(" AND i.system IN ");
            sql.list(types.iter().map(String::as_str)).push(")");
        }
        TextMatch::System(s) => {
            sql.push("i.system = ").text(s.as_str());
        }
        // A range on the index's byte order (COLLATE "C" on PostgreSQL) rather than LIKE, which
        // SQLite does not serve from an ordinary index.
        TextMatch::Prefix(p) => {
            sql.push("(i.value >= ").text(p.as_str()).push(" AND i.value < ").text(format!("{p}\u{10FFFF}")).push(")");
        }
        TextMatch::Contains(s) => {
            sql.push("i.value LIKE ").text(format!("%{}%", like_escape(s))).push(" ESCAPE '\\'");
        }
    }
}

impl ResourceStore {
    /// Ids of the `rtype` resources with an identifier `value` (in `system` when given): the
    /// in-process form of `GET /fhir/{rtype}?identifier=system|value`, across compartments, first
    /// page only. The value is escaped, so commas and bars in it match literally.
    pub async fn ids_by_identifier(
        &self,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> Result<Vec<String>, ProjectionError> {
        let escape = |s: &str| s.replace('\\', "\\\\").replace(',', "\\,").replace('|', "\\|");
        let token = match system {
            Some(system) => format!("{}|{}", escape(system), escape(value)),
            None => escape(value),
        };
        let q = super::SearchQuery::parse(rtype, &[("identifier".to_string(), token)], &Default::default())?;
        Ok(self.search(&q, &Compartment::All).await?.matches.into_iter().map(|m| m.id).collect())
    }

    /// Runs a parsed search: one page of matches (keyset-paged on the id), the included
    /// resources, and the total when asked. `compartment` limits the matches; includes are
    /// returned for the caller to filter by type and compartment.
    pub async fn search(&self, q: &SearchQuery, compartment: &Compartment) -> Result<SearchPage, ProjectionError> {
        let generation = self.generation().await?;
        let backend = self.db().backend;
        let cur = current_table(generation);
        let mut page = SearchPage::default();

        if q.total || q.summary_count {
            let mut sql = Sql::new(backend);
            sql.push(&format!("SELECT COUNT(*) FROM {cur} c WHERE "));
            where_clause(&mut sql, q, compartment, generation, false);
            page.total = Some(sql.query().fetch_one(&self.db().pool).await?.try_get(0)?);
            if q.summary_count {
                return Ok(page);
            }
        }

        let mut sql = Sql::new(backend);
        sql.push(&format!(
            "SELECT c.version_id, c.last_updated, c.last_updated_us, c.deleted, c.content, CAST(NULL AS TEXT), c.resource_type, c.id FROM {cur} c WHERE "
        ));
        where_clause(&mut sql, q, compartment, generation, true);
        sql.push(if q.descending { " ORDER BY c.id DESC LIMIT " } else { " ORDER BY c.id LIMIT " });
        sql.int(q.count as i64 + 1);
        let rows = sql.query().fetch_all(&self.db().pool).await?;
        for r in &rows {
            let id: String = r.try_get(7)?;
            page.matches.push(stored(r, &q.resource_type, &id)?);
        }
        if page.matches.len() > q.count {
            page.matches.truncate(q.count);
            page.next_cursor = page.matches.last().map(|r| r.id.clone());
        }
        if !page.matches.is_empty() && (!q.includes.is_empty() || !q.revincludes.is_empty()) {
            self.add_includes(q, generation, &mut page).await?;
        }
        Ok(page)
    }

    async fn add_includes(
        &self,
        q: &SearchQuery,
        generation: i64,
        page: &mut SearchPage,
    ) -> Result<(), ProjectionError> {
        let backend = self.db().backend;
        let (cur, idx) = (current_table(generation), text_table(generation));
        let ids: Vec<String> = page.matches.iter().map(|r| r.id.clone()).collect();
        let mut seen: HashSet<(String, String)> =
            page.matches.iter().map(|r| (r.resource_type.clone(), r.id.clone())).collect();
        // Forward: the targets of the matches' references, grouped by type.
        let mut targets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for inc in q.includes.iter().filter(|i| !i.params.is_empty()) {
            let mut sql = Sql::new(backend);
            sql.push(&format!("SELECT i.system, i.value FROM {idx} i WHERE i.resource_type = "));
            sql.text(inc.source.as_str()).push(" AND i.param IN ");
            sql.list(inc.params.iter().flat_map(|p| registry::row_codes(&inc.source, p))).push(" AND i.id IN ");
            sql.list(ids.iter().map(String::as_str));
            for r in sql.query().fetch_all(&self.db().pool).await? {
                let (t, id): (String, String) = (r.try_get(0)?, r.try_get(1)?);
                // Only local references resolve here; absolute and urn: targets stay outside.
                let local = !t.is_empty() && !id.contains('/') && !id.contains(':');
                if local && inc.target.as_deref().is_none_or(|want| want == t) && seen.insert((t.clone(), id.clone())) {
                    targets.entry(t).or_default().push(id);
                }
            }
        }
        for (t, ids) in &targets {
            for chunk in ids.chunks(500) {
                let mut sql = Sql::new(backend);
                sql.push(&format!(
                    "SELECT c.version_id, c.last_updated, c.last_updated_us, c.deleted, c.content, CAST(NULL AS TEXT), c.resource_type, c.id FROM {cur} c WHERE c.resource_type = "
                ));
                sql.text(t.as_str()).push(" AND c.deleted = 0 AND c.id IN ").list(chunk.iter().map(String::as_str));
                sql.push(" ORDER BY c.id");
                self.take_includes(&sql, page).await?;
            }
        }
        // Reverse: resources whose references point at the matches.
        for inc in q.revincludes.iter().filter(|i| !i.params.is_empty()) {
            let mut sql = Sql::new(backend);
            sql.push(&format!(
                "SELECT c.version_id, c.last_updated, c.last_updated_us, c.deleted, c.content, CAST(NULL AS TEXT), c.resource_type, c.id FROM {cur} c WHERE c.resource_type = "
            ));
            sql.text(inc.source.as_str());
            sql.push(&format!(" AND c.deleted = 0 AND c.id IN (SELECT i.id FROM {idx} i WHERE i.resource_type = "));
            sql.text(inc.source.as_str())
                .push(" AND i.param IN ")
                .list(inc.params.iter().flat_map(|p| registry::row_codes(&inc.source, p)));
            sql.push(" AND i.system = ").text(q.resource_type.as_str());
            sql.push(" AND i.value IN ").list(ids.iter().map(String::as_str)).push(") ORDER BY c.id LIMIT ");
            sql.int((MAX_INCLUDES + 1) as i64);
            let before = page.includes.len();
            self.take_includes(&sql, page).await?;
            // Dedupe against what is already on the page.
            let added: Vec<StoredResource> = page.includes.drain(before..).collect();
            for r in added {
                if seen.insert((r.resource_type.clone(), r.id.clone())) {
                    page.includes.push(r);
                }
            }
        }
        if page.includes.len() > MAX_INCLUDES {
            page.includes.truncate(MAX_INCLUDES);
            page.includes_truncated = true;
        }
        Ok(())
    }

    async fn take_includes(&self, sql: &Sql, page: &mut SearchPage) -> Result<(), ProjectionError> {
        for r in sql.query().fetch_all(&self.db().pool).await? {
            let (t, id): (String, String) = (r.try_get(6)?, r.try_get(7)?);
            page.includes.push(stored(&r, &t, &id)?);
        }
        Ok(())
    }
}

/// `{alias}.param = …` for the index rows of parameter `code`, or `IN (…)` when it covers others
/// (registry::COVERS).
fn param_cond(sql: &mut Sql, alias: &str, rtype: &str, code: &'static str) {
    if registry::covered_by(rtype, code).is_empty() {
        sql.push(&format!("{alias}.param = ")).text(code);
    } else {
        sql.push(&format!("{alias}.param IN ")).list(registry::row_codes(rtype, code));
    }
}

/// `WHERE …` of a search (without the cursor when counting).
fn where_clause(sql: &mut Sql, q: &SearchQuery, compartment: &Compartment, generation: i64, with_cursor: bool) {
    let (idx, didx) = (text_table(generation), date_table(generation));
    sql.push("c.resource_type = ").text(q.resource_type.as_str()).push(" AND c.deleted = 0");
    let rtype = q.resource_type.as_str();
    for f in &q.filters {
        sql.push(" AND ");
        match f {
            Filter::Ids(ids) => {
                sql.push("c.id IN ").list(ids.iter().map(String::as_str));
            }
            Filter::LastUpdated(conds) => {
                sql.push("(");
                for (i, c) in conds.iter().enumerate() {
                    if i > 0 {
                        sql.push(" OR ");
                    }
                    date_cond(sql, "c.last_updated_us", "c.last_updated_us", c);
                }
                sql.push(")");
            }
            Filter::Missing { param, missing } => {
                let table = if param.kind == ParamType::Date { &didx } else { &idx };
                sql.push(if *missing { "c.id NOT IN " } else { "c.id IN " });
                sql.push(&format!("(SELECT i.id FROM {table} i WHERE i.resource_type = "));
                sql.text(rtype).push(" AND ");
                param_cond(sql, "i", rtype, param.code);
                sql.push(")");
            }
            Filter::Text { param, any_of } => {
                sql.push(&format!("c.id IN (SELECT i.id FROM {idx} i WHERE i.resource_type = "));
                sql.text(rtype).push(" AND ");
                param_cond(sql, "i", rtype, param.code);
                sql.push(" AND (");
                for (i, m) in any_of.iter().enumerate() {
                    if i > 0 {
                        sql.push(" OR ");
                    }
                    text_match(sql, m);
                }
                sql.push("))");
            }
            Filter::Dates { param, any_of } => {
                sql.push(&format!("c.id IN (SELECT d.id FROM {didx} d WHERE d.resource_type = "));
                sql.text(rtype).push(" AND ");
                param_cond(sql, "d", rtype, param.code);
                sql.push(" AND (");
                for (i, c) in any_of.iter().enumerate() {
                    if i > 0 {
                        sql.push(" OR ");
                    }
                    date_cond(sql, "d.lo", "d.hi", c);
                }
                sql.push("))");
            }
        }
    }
    if let Compartment::Patient(pid) = compartment {
        if rtype == "Patient" {
            sql.push(" AND c.id = ").text(pid.as_str());
        } else if schemas::compartment::has_patient_compartment(rtype) {
            sql.push(&format!(" AND c.id IN (SELECT i.id FROM {idx} i WHERE i.resource_type = "));
            sql.text(rtype).push(" AND i.param = ").text(registry::COMPARTMENT);
            sql.push(" AND i.system = 'Patient' AND i.value = ").text(pid.as_str()).push(")");
        }
    }
    if let (true, Some(cursor)) = (with_cursor, &q.cursor) {
        sql.push(if q.descending { " AND c.id < " } else { " AND c.id > " }).text(cursor.as_str());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::search::query::ParseOptions;

    fn sql_of(backend: Backend, q: &str, compartment: Compartment) -> (String, usize) {
        let pairs: Vec<(String, String)> = q
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let q = SearchQuery::parse_issue("ExplanationOfBenefit", &pairs, &ParseOptions::default()).unwrap();
        let mut sql = Sql::new(backend);
        where_clause(&mut sql, &q, &compartment, 3, true);
        (sql.text, sql.binds.len())
    }

    #[test]
    fn placeholders_follow_the_backend() {
        let q = "patient=p1,p2&created=ge2024&_cursor=e5";
        let (pg, n) = sql_of(Backend::Postgres, q, Compartment::Patient("p1".into()));
        assert!(pg.contains("$1") && pg.contains(&format!("${n}")) && !pg.contains('?'), "{pg}");
        assert!(pg.contains("res_idx_g3") && pg.contains("res_idx_date_g3"));
        let (lite, m) = sql_of(Backend::Sqlite, q, Compartment::Patient("p1".into()));
        assert_eq!(n, m);
        assert_eq!(lite.matches('?').count(), m);
        assert!(lite.contains("i.system = 'Patient'") && lite.ends_with("AND c.id > ?"), "{lite}");
    }

    #[test]
    fn empty_lists_stay_valid_sql() {
        let mut sql = Sql::new(Backend::Postgres);
        sql.push("x IN ").list(std::iter::empty());
        assert_eq!(sql.text, "x IN (NULL)");
    }

    #[test]
    fn like_patterns_are_literal() {
        assert_eq!(like_escape(r"50%_a\b"), r"50\%\_a\\b");
    }
}
