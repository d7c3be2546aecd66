//! `GET /fhir/{type}?…` and `POST /fhir/{type}/_search`: parse, authorize, run the one search
//! engine (`ResourceStore::search`), answer a `searchset` Bundle.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use projections::search::{Compartment, ParseOptions, SearchPage, SearchQuery};
use projections::StoredResource;
use schemas::{IssueSeverity, IssueType, OperationOutcome};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::access::{Caller, Interaction, Visibility};
use crate::error::{fhir_raw, ApiError};
use crate::fhir::{base_url, check_type};
use crate::SharedState;

/// `a=1&b=2` → pairs, percent- and `+`-decoded.
pub fn decode_params(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn lenient(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim().eq_ignore_ascii_case("handling=lenient")))
}

fn compartment_of(vis: &Visibility) -> Compartment {
    match vis {
        Visibility::All => Compartment::All,
        Visibility::Compartment(pid) => Compartment::Patient(pid.clone()),
    }
}

#[derive(Serialize)]
struct Link {
    relation: &'static str,
    url: String,
}

#[derive(Serialize)]
struct EntrySearch {
    mode: &'static str,
}

#[derive(Serialize)]
struct Entry<'a> {
    #[serde(rename = "fullUrl", skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    resource: &'a RawValue,
    search: EntrySearch,
}

#[derive(Serialize)]
struct Bundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<i64>,
    link: Vec<Link>,
    entry: Vec<Entry<'a>>,
}

/// Runs a search for `caller` and renders the Bundle.
pub async fn run(
    state: &SharedState,
    caller: &Caller,
    headers: &HeaderMap,
    rtype: &str,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    check_type(rtype)?;
    let vis = caller.authorize(rtype, Interaction::Search)?;
    let base = base_url(state, headers);
    let opts = ParseOptions { lenient: lenient(headers), base: Some(format!("{base}/fhir")) };
    let query = SearchQuery::parse(rtype, params, &opts)?;
    let mut page = state.store.search(&query, &compartment_of(&vis)).await?;
    if vis != Visibility::All {
        // The index decided membership; the stored body has the last word.
        page.matches.retain(|r| vis.allows_json(r.content.as_deref()));
    }
    let withheld = filter_includes(caller, &mut page);
    let mut notes = OperationOutcome { issue: vec![] };
    for i in &query.ignored {
        notes.push(schemas::outcome::Issue {
            severity: IssueSeverity::Warning,
            code: IssueType::NotSupported,
            diagnostics: Some(format!("ignored (Prefer: handling=lenient): {}", i.message)),
            expression: vec![i.parameter.clone()],
        });
    }
    if !withheld.is_empty() {
        let types: Vec<&str> = withheld.iter().map(String::as_str).collect();
        notes.push(schemas::outcome::Issue {
            severity: IssueSeverity::Warning,
            code: IssueType::Forbidden,
            diagnostics: Some(format!(
                "included resources of types the token may not read were left out: {}",
                types.join(", ")
            )),
            expression: vec![],
        });
    }
    if page.includes_truncated {
        notes.push(schemas::outcome::Issue {
            severity: IssueSeverity::Warning,
            code: IssueType::TooLong,
            diagnostics: Some(format!(
                "more than {} resources to include: the rest were left out; ask for fewer results per page (_count)",
                projections::search::plan::MAX_INCLUDES
            )),
            expression: vec![],
        });
    }
    render(&base, &query, &page, &notes)
}

/// Keeps only included resources the caller may read: scopes per type, compartment per resource.
/// Returns the types withheld for want of scopes.
fn filter_includes(caller: &Caller, page: &mut SearchPage) -> BTreeSet<String> {
    let mut withheld = BTreeSet::new();
    let mut cache: Vec<(String, Option<Visibility>)> = Vec::new();
    page.includes.retain(|r| {
        let vis = match cache.iter().find(|(t, _)| *t == r.resource_type) {
            Some((_, v)) => v.clone(),
            None => {
                let v = caller.authorize(&r.resource_type, Interaction::Read).ok();
                cache.push((r.resource_type.clone(), v.clone()));
                v
            }
        };
        match vis {
            None => {
                withheld.insert(r.resource_type.clone());
                false
            }
            Some(v) => v.allows_json(r.content.as_deref()),
        }
    });
    withheld
}

fn link(base: &str, q: &SearchQuery, cursor: Option<&str>) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &q.link_params {
        s.append_pair(k, v);
    }
    s.append_pair("_count", &q.count.to_string());
    if let Some(c) = cursor {
        s.append_pair("_cursor", c);
    }
    format!("{base}/fhir/{}?{}", q.resource_type, s.finish())
}

fn entry<'a>(base: &str, r: &'a StoredResource, mode: &'static str) -> Option<Entry<'a>> {
    let body: &RawValue = serde_json::from_str(r.content.as_deref()?).ok()?;
    Some(Entry {
        full_url: Some(format!("{base}/fhir/{}/{}", r.resource_type, r.id)),
        resource: body,
        search: EntrySearch { mode },
    })
}

fn render(base: &str, q: &SearchQuery, page: &SearchPage, notes: &OperationOutcome) -> Result<Response, ApiError> {
    let mut links = vec![Link { relation: "self", url: link(base, q, q.cursor.as_deref()) }];
    if let Some(next) = &page.next_cursor {
        links.push(Link { relation: "next", url: link(base, q, Some(next)) });
    }
    let outcome = (!notes.issue.is_empty())
        .then(|| RawValue::from_string(notes.to_json().to_string()))
        .transpose()
        .map_err(ApiError::internal)?;
    let mut entries: Vec<Entry> = page.matches.iter().filter_map(|r| entry(base, r, "match")).collect();
    entries.extend(page.includes.iter().filter_map(|r| entry(base, r, "include")));
    if let Some(o) = &outcome {
        entries.push(Entry { full_url: None, resource: o, search: EntrySearch { mode: "outcome" } });
    }
    let bundle = Bundle { resource_type: "Bundle", kind: "searchset", total: page.total, link: links, entry: entries };
    let body = serde_json::to_string(&bundle).map_err(ApiError::internal)?;
    Ok(fhir_raw(StatusCode::OK, body))
}

/// `GET /fhir/{type}?…`
pub async fn search_get(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = decode_params(query.as_deref().unwrap_or(""));
    run(&state, &caller, &headers, &rtype, &params).await
}

/// `POST /fhir/{type}/_search` with `application/x-www-form-urlencoded` parameters (and any in
/// the URL).
pub async fn search_post(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ctype.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueType::NotSupported,
            format!("Content-Type '{ctype}' is not supported for _search; send application/x-www-form-urlencoded"),
        ));
    }
    let limit = state.config.max_body_bytes;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                IssueType::TooLong,
                format!("the request body exceeds the limit of {limit} bytes (--max-body-bytes)"),
            ))
        }
        Err(e) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    };
    let mut params = decode_params(query.as_deref().unwrap_or(""));
    params.extend(form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())));
    run(&state, &caller, &headers, &rtype, &params).await
}

/// What the CapabilityStatement says about search on `rtype`: `searchParam`, `searchInclude`,
/// `searchRevInclude`, all from the registry.
pub fn capability(rtype: &str) -> (Vec<Value>, Vec<String>, Vec<String>) {
    use projections::search::registry::{self, ParamType, COMMON, PARAMS};
    let mut params: Vec<Value> = COMMON
        .iter()
        .map(|(code, kind, def)| serde_json::json!({"name": code, "type": kind.as_str(), "definition": def}))
        .collect();
    let own = registry::params_of(rtype);
    params.extend(own.iter().map(|p| {
        serde_json::json!({"name": p.code, "type": p.kind.as_str(), "definition": p.definition, "documentation": p.expression})
    }));
    let mut includes: Vec<String> =
        own.iter().filter(|p| p.kind == ParamType::Reference).map(|p| format!("{rtype}:{}", p.code)).collect();
    if !includes.is_empty() {
        includes.push("*".into());
    }
    let revincludes: Vec<String> = PARAMS
        .iter()
        .filter(|p| p.kind == ParamType::Reference && (p.targets.is_empty() || p.targets.contains(&rtype)))
        .map(|p| format!("{}:{}", p.base, p.code))
        .collect();
    (params, includes, revincludes)
}

impl From<projections::search::SearchIssue> for ApiError {
    fn from(i: projections::search::SearchIssue) -> Self {
        let code = if i.unknown { IssueType::NotSupported } else { IssueType::Value };
        ApiError::new(StatusCode::BAD_REQUEST, code, format!("search parameter '{}': {}", i.parameter, i.message))
            .at(i.parameter)
    }
}
