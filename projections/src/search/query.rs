//! A search request's parameters parsed into a typed query. Pure: the planner turns this into
//! SQL, the HTTP edge builds links from it.

use super::dates::{self, Range};
use super::extract::{clip, normalize, parse_reference};
use super::registry::{self, ParamType, SearchParam};
use crate::ProjectionError;

/// Results per page when `_count` is absent, and the most a page may hold.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

/// A parameter the query cannot honour, named as the client wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchIssue {
    pub parameter: String,
    pub message: String,
    /// The parameter itself is unknown or unsupported (rather than its value being wrong).
    pub unknown: bool,
}

impl std::fmt::Display for SearchIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.parameter, self.message)
    }
}

/// FHIR search prefixes for ordered values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateCond {
    pub prefix: Prefix,
    pub range: Range,
}

/// How one value matches the `(value, system)` columns of the text index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextMatch {
    /// `value = v`, and `system = s` when given (`Some("")`: no system).
    Eq { value: String, system: Option<String> },
    /// `value = v` and `system` one of `types` (any when empty): a bare reference id.
    EqAnyType { value: String, types: Vec<String> },
    /// Token `system|`.
    System(String),
    /// String default: the normalized value starts with this.
    Prefix(String),
    /// String `:contains`.
    Contains(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `_id`: any of these.
    Ids(Vec<String>),
    /// `_lastUpdated`: any of these.
    LastUpdated(Vec<DateCond>),
    /// `:missing=true|false`.
    Missing {
        param: &'static SearchParam,
        missing: bool,
    },
    Text {
        param: &'static SearchParam,
        any_of: Vec<TextMatch>,
    },
    Dates {
        param: &'static SearchParam,
        any_of: Vec<DateCond>,
    },
}

/// `_include=Source:param[:Target]` or `_revinclude=…`; `params` holds every reference
/// parameter of `source` for `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source: String,
    pub params: Vec<&'static str>,
    pub target: Option<String>,
}

/// A parsed search of one resource type. Filters are ANDed; each filter ORs its values.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub resource_type: String,
    pub filters: Vec<Filter>,
    pub count: usize,
    /// `_sort=-_id`.
    pub descending: bool,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    /// `_summary=count` (or `_count=0`): the total only.
    pub summary_count: bool,
    /// `_total=accurate|estimate`.
    pub total: bool,
    /// Resume after this id (the `next` link's `_cursor`).
    pub cursor: Option<String>,
    /// Parameters ignored under `Prefer: handling=lenient`, with why.
    pub ignored: Vec<SearchIssue>,
    /// The parameters that shaped the result, as given, for `self` and `next` links.
    pub link_params: Vec<(String, String)>,
}

/// How to read parameters.
#[derive(Debug, Clone, Default)]
pub struct ParseOptions {
    /// `Prefer: handling=lenient`: unknown parameters are ignored (and reported) instead of refused.
    pub lenient: bool,
    /// This server's FHIR base (`https://host/fhir`), so absolute references to it match local ones.
    pub base: Option<String>,
}

fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn invalid(parameter: &str, message: impl Into<String>) -> SearchIssue {
    SearchIssue { parameter: parameter.to_string(), message: message.into(), unknown: false }
}

fn unknown(parameter: &str, message: impl Into<String>) -> SearchIssue {
    SearchIssue { parameter: parameter.to_string(), message: message.into(), unknown: true }
}

/// Splits on `sep` where it is not escaped with `\`; escapes stay for `unescape` at the end.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        let Some(cur) = out.last_mut() else { break };
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            cur.push(c);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&n @ (',' | '|' | '$' | '\\')) = chars.peek() {
                out.push(n);
                chars.next();
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// `ge2020-01-01` → (Ge, range of 2020-01-01).
pub fn parse_date_cond(parameter: &str, v: &str) -> Result<DateCond, SearchIssue> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("ne") => (Prefix::Ne, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some("sa") => (Prefix::Sa, &v[2..]),
        Some("eb") => (Prefix::Eb, &v[2..]),
        Some("ap") => return Err(invalid(parameter, "the prefix 'ap' (approximately) is not supported")),
        _ => (Prefix::Eq, v),
    };
    let range = dates::parse(rest).ok_or_else(|| {
        invalid(
            parameter,
            format!(
                "'{v}' is not a date: use [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]], prefixes eq ne gt lt ge le sa eb"
            ),
        )
    })?;
    Ok(DateCond { prefix, range })
}

/// The `(type, target)` a reference search value names, or `None` for a bare id.
fn reference_value(v: &str, base: Option<&str>) -> Option<(String, String)> {
    let local = base.and_then(|b| v.strip_prefix(b.trim_end_matches('/'))).and_then(|r| r.strip_prefix('/'));
    parse_reference(local.unwrap_or(v))
}

fn text_matches(
    p: &'static SearchParam,
    parameter: &str,
    modifier: Option<&str>,
    raw: &str,
    opts: &ParseOptions,
) -> Result<Vec<TextMatch>, SearchIssue> {
    let mut out = Vec::new();
    for v in split_escaped(raw, ',') {
        if v.is_empty() {
            return Err(invalid(parameter, "an empty value matches nothing; leave the parameter out instead"));
        }
        let m = match (p.kind, modifier) {
            (ParamType::String, None) => TextMatch::Prefix(normalize(&unescape(&v))),
            (ParamType::String, Some("exact")) => {
                let exact = clip(unescape(&v));
                TextMatch::Eq { value: normalize(&exact), system: Some(exact) }
            }
            (ParamType::String, Some("contains")) => TextMatch::Contains(normalize(&unescape(&v))),
            (ParamType::Token, None) => match split_escaped(&v, '|').as_slice() {
                [code] => TextMatch::Eq { value: clip(unescape(code)), system: None },
                [system, code] if code.is_empty() => TextMatch::System(clip(unescape(system))),
                [system, code] => TextMatch::Eq { value: clip(unescape(code)), system: Some(clip(unescape(system))) },
                _ => {
                    return Err(invalid(
                        parameter,
                        format!("'{v}' is not a token: use code, system|code, |code or system|"),
                    ))
                }
            },
            (ParamType::Uri, None) => TextMatch::Eq { value: clip(unescape(&v)), system: None },
            (ParamType::Reference, modifier) => {
                let v = unescape(&v);
                let typed = match modifier {
                    None => None,
                    Some(t)
                        if (p.targets.is_empty() || p.targets.contains(&t))
                            && t.starts_with(|c: char| c.is_ascii_uppercase()) =>
                    {
                        Some(t)
                    }
                    Some(t) => {
                        return Err(invalid(
                            parameter,
                            format!("{} cannot refer to '{t}' (targets: {})", p.code, p.targets.join(", ")),
                        ))
                    }
                };
                match (reference_value(&v, opts.base.as_deref()), typed) {
                    (Some((t, _)), Some(want)) if t != want => {
                        return Err(invalid(parameter, format!("'{v}' is not a {want} reference")));
                    }
                    (Some((t, target)), _) => {
                        if !t.is_empty() && !p.targets.is_empty() && !p.targets.contains(&t.as_str()) {
                            return Err(invalid(
                                parameter,
                                format!("{} cannot refer to '{t}' (targets: {})", p.code, p.targets.join(", ")),
                            ));
                        }
                        TextMatch::Eq { value: target, system: Some(t) }
                    }
                    (None, _) if v.contains('/') || v.contains(':') => {
                        return Err(invalid(
                            parameter,
                            format!("'{v}' is not a reference: use Type/id, id or an absolute URL"),
                        ));
                    }
                    (None, Some(want)) => TextMatch::Eq { value: clip(v), system: Some(want.to_string()) },
                    (None, None) => match p.targets {
                        [one] => TextMatch::Eq { value: clip(v), system: Some(one.to_string()) },
                        many => {
                            TextMatch::EqAnyType { value: clip(v), types: many.iter().map(|t| t.to_string()).collect() }
                        }
                    },
                }
            }
            (_, Some(m)) => {
                return Err(invalid(
                    parameter,
                    format!("the modifier ':{m}' is not supported on {} parameters", p.kind.as_str()),
                ))
            }
            (ParamType::Date, None) => return Err(invalid(parameter, "a date parameter takes dates")),
        };
        out.push(m);
    }
    Ok(out)
}

fn date_conds(parameter: &str, raw: &str) -> Result<Vec<DateCond>, SearchIssue> {
    raw.split(',').map(|v| parse_date_cond(parameter, v)).collect()
}

/// Parses one `Type:param[:Target]` (or `*`) of `_include` / `_revinclude`.
fn parse_include(parameter: &str, v: &str, search_type: &str, rev: bool) -> Result<Include, SearchIssue> {
    let parts: Vec<&str> = v.split(':').collect();
    let (source, code, target) = match parts.as_slice() {
        ["*"] if !rev => (search_type, "*", None),
        [s, c] => (*s, *c, None),
        [s, c, t] => (*s, *c, Some(t.to_string())),
        _ => return Err(invalid(parameter, format!("'{v}' is not Type:parameter[:TargetType]"))),
    };
    if !rev && source != search_type {
        return Err(invalid(
            parameter,
            format!("'{v}': _include starts from the searched type {search_type} (_include:iterate is not supported)"),
        ));
    }
    let refs: Vec<&'static SearchParam> =
        registry::params_of(source).iter().copied().filter(|p| p.kind == ParamType::Reference).collect();
    let params: Vec<&'static str> = if code == "*" {
        refs.iter().map(|p| p.code).collect()
    } else {
        match refs.iter().find(|p| p.code == code) {
            Some(p) => {
                if let Some(t) = &target {
                    if !p.targets.is_empty() && !p.targets.contains(&t.as_str()) {
                        return Err(invalid(parameter, format!("'{v}': {source}:{code} cannot refer to {t}")));
                    }
                }
                vec![p.code]
            }
            None => {
                return Err(invalid(parameter, format!("'{v}': {source} has no reference search parameter '{code}'")))
            }
        }
    };
    if rev && target.as_deref().is_some_and(|t| t != search_type) {
        return Err(invalid(parameter, format!("'{v}': the target type must be {search_type}")));
    }
    Ok(Include { source: source.to_string(), params, target })
}

impl SearchQuery {
    /// Parses `params` (repeated names are ANDed, commas OR) of a search on `resource_type`.
    pub fn parse(
        resource_type: &str,
        params: &[(String, String)],
        opts: &ParseOptions,
    ) -> Result<SearchQuery, ProjectionError> {
        Self::parse_issue(resource_type, params, opts).map_err(ProjectionError::Search)
    }

    /// `parse` with the issue itself as the error.
    pub fn parse_issue(
        resource_type: &str,
        params: &[(String, String)],
        opts: &ParseOptions,
    ) -> Result<SearchQuery, SearchIssue> {
        let mut q = SearchQuery {
            resource_type: resource_type.to_string(),
            filters: vec![],
            count: DEFAULT_COUNT,
            descending: false,
            includes: vec![],
            revincludes: vec![],
            summary_count: false,
            total: false,
            cursor: None,
            ignored: vec![],
            link_params: vec![],
        };
        for (name, value) in params {
            match q.apply(name, value, opts) {
                Ok(true) => q.link_params.push((name.clone(), value.clone())),
                Ok(false) => {}
                Err(issue) if issue.unknown && opts.lenient => q.ignored.push(issue),
                Err(issue) => return Err(issue),
            }
        }
        Ok(q)
    }

    /// Applies one parameter; `Ok(true)` when it belongs in the links.
    fn apply(&mut self, name: &str, value: &str, opts: &ParseOptions) -> Result<bool, SearchIssue> {
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name, None),
        };
        let rtype = self.resource_type.clone();
        match (code, modifier) {
            ("_count", None) => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= MAX_COUNT)
                    .ok_or_else(|| invalid(name, format!("_count must be an integer from 0 to {MAX_COUNT}")))?;
                self.count = n;
                self.summary_count |= n == 0;
                return Ok(false);
            }
            ("_cursor", None) => {
                if !is_valid_id(value) {
                    return Err(invalid(name, "not a paging cursor of this server"));
                }
                self.cursor = Some(value.to_string());
                return Ok(false);
            }
            ("_sort", None) => match value {
                "_id" => self.descending = false,
                "-_id" => self.descending = true,
                _ => {
                    return Err(unknown(
                        name,
                        format!("sorting by '{value}' is not supported: results are ordered by _id (or -_id), which keeps paging exact while data changes"),
                    ))
                }
            },
            ("_summary", None) => match value {
                "count" => self.summary_count = true,
                "false" => {}
                _ => return Err(unknown(name, format!("_summary={value} is not supported (count, false)"))),
            },
            ("_total", None) => match value {
                "accurate" | "estimate" => self.total = true,
                "none" => self.total = false,
                _ => return Err(invalid(name, "_total must be none, estimate or accurate")),
            },
            ("_format", None) if matches!(value, "json" | "application/json" | "application/fhir+json") => return Ok(false),
            ("_pretty", None) => return Ok(false),
            ("_include", None) => {
                for v in value.split(',') {
                    self.includes.push(parse_include(name, v, &rtype, false)?);
                }
            }
            ("_revinclude", None) => {
                for v in value.split(',') {
                    self.revincludes.push(parse_include(name, v, &rtype, true)?);
                }
            }
            ("_id", None) => {
                let ids: Vec<String> = value.split(',').map(str::to_string).collect();
                if let Some(bad) = ids.iter().find(|id| !is_valid_id(id)) {
                    return Err(invalid(name, format!("'{bad}' is not a valid id")));
                }
                self.filters.push(Filter::Ids(ids));
            }
            ("_lastUpdated", None) => self.filters.push(Filter::LastUpdated(date_conds(name, value)?)),
            _ => {
                let p = registry::lookup(&rtype, code).ok_or_else(|| {
                    unknown(name, format!("'{code}' is not a search parameter of {rtype} on this server; see GET /fhir/metadata"))
                })?;
                if modifier == Some("missing") {
                    let missing = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid(name, ":missing takes true or false")),
                    };
                    self.filters.push(Filter::Missing { param: p, missing });
                } else if p.kind == ParamType::Date {
                    if let Some(m) = modifier {
                        return Err(invalid(name, format!("the modifier ':{m}' is not supported on date parameters")));
                    }
                    self.filters.push(Filter::Dates { param: p, any_of: date_conds(name, value)? });
                } else {
                    self.filters.push(Filter::Text { param: p, any_of: text_matches(p, name, modifier, value, opts)? });
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn parse(rtype: &str, q: &str) -> Result<SearchQuery, SearchIssue> {
        SearchQuery::parse_issue(
            rtype,
            &pairs(q),
            &ParseOptions { lenient: false, base: Some("https://payer.example/fhir".into()) },
        )
    }

    fn texts(q: &SearchQuery, i: usize) -> Vec<TextMatch> {
        match &q.filters[i] {
            Filter::Text { any_of, .. } => any_of.clone(),
            other => panic!("not a text filter: {other:?}"),
        }
    }

    fn eq(value: &str, system: Option<&str>) -> TextMatch {
        TextMatch::Eq { value: value.into(), system: system.map(str::to_string) }
    }

    #[test]
    fn tokens_and_or() {
        let q = parse("Patient", "identifier=urn:mbi|1,|2,3&identifier=urn:x|&gender=female").unwrap();
        assert_eq!(q.filters.len(), 3, "repeats AND");
        assert_eq!(texts(&q, 0), [eq("1", Some("urn:mbi")), eq("2", Some("")), eq("3", None)]);
        assert_eq!(texts(&q, 1), [TextMatch::System("urn:x".into())]);
        let q = parse("Patient", r"identifier=a\,b|c\|d").unwrap();
        assert_eq!(texts(&q, 0), [eq("c|d", Some("a,b"))], "escaped separators");
    }

    #[test]
    fn strings_and_modifiers() {
        let q = parse("Patient", "name=JOSÉ&family:exact=Müller&given:contains=an").unwrap();
        assert_eq!(texts(&q, 0), [TextMatch::Prefix("jose".into())]);
        assert_eq!(texts(&q, 1), [eq("muller", Some("Müller"))]);
        assert_eq!(texts(&q, 2), [TextMatch::Contains("an".into())]);
        let q = parse("Patient", "birthdate:missing=true").unwrap();
        assert!(matches!(q.filters[0], Filter::Missing { missing: true, .. }));
        for bad in ["gender:contains=x", "birthdate:exact=2020", "name:missing=maybe", "name=", "gender:text=x"] {
            let issue = parse("Patient", bad).unwrap_err();
            assert_eq!(issue.parameter, bad.split('=').next().unwrap(), "{bad}");
            assert!(!issue.unknown, "{bad}");
        }
    }

    #[test]
    fn references_in_every_form() {
        let q = parse("ExplanationOfBenefit", "patient=Patient/p1&patient=p2&patient=https://payer.example/fhir/Patient/p3/_history/2&patient=https://other/fhir/Patient/p4&patient:Patient=p5").unwrap();
        assert_eq!(texts(&q, 0), [eq("p1", Some("Patient"))]);
        assert_eq!(texts(&q, 1), [eq("p2", Some("Patient"))], "one target type: a bare id is that type");
        assert_eq!(texts(&q, 2), [eq("p3", Some("Patient"))], "our own base is local");
        assert_eq!(texts(&q, 3), [eq("https://other/fhir/Patient/p4", Some("Patient"))]);
        assert_eq!(texts(&q, 4), [eq("p5", Some("Patient"))]);
        let q = parse("ExplanationOfBenefit", "provider=o1").unwrap();
        assert_eq!(
            texts(&q, 0),
            [TextMatch::EqAnyType {
                value: "o1".into(),
                types: vec!["Practitioner".into(), "Organization".into(), "PractitionerRole".into()]
            }]
        );
        assert_eq!(parse("ExplanationOfBenefit", "patient=Organization/o").unwrap_err().parameter, "patient");
        assert_eq!(parse("ExplanationOfBenefit", "patient:Group=g").unwrap_err().parameter, "patient:Group");
        assert_eq!(parse("ExplanationOfBenefit", "patient=a/b/c").unwrap_err().parameter, "patient");
    }

    #[test]
    fn dates_with_prefixes() {
        let q =
            parse("ExplanationOfBenefit", "service-date=ge2024-01&service-date=lt2024-02-15T10:00:00Z,eq2023").unwrap();
        let Filter::Dates { any_of, .. } = &q.filters[1] else { panic!() };
        assert_eq!(any_of.len(), 2);
        assert_eq!(any_of[0].prefix, Prefix::Lt);
        assert_eq!(any_of[1], DateCond { prefix: Prefix::Eq, range: dates::parse("2023").unwrap() });
        for bad in ["created=2024-13", "created=ap2024", "_lastUpdated=yesterday", "created=gt"] {
            assert_eq!(parse("ExplanationOfBenefit", bad).unwrap_err().parameter, bad.split('=').next().unwrap());
        }
    }

    #[test]
    fn result_parameters() {
        let q = parse("ExplanationOfBenefit", "_count=2&_include=ExplanationOfBenefit:patient,ExplanationOfBenefit:provider:Organization&_revinclude=Provenance:target&_sort=-_id&_total=accurate&_cursor=e-1").unwrap();
        assert_eq!((q.count, q.descending, q.total, q.cursor.as_deref()), (2, true, true, Some("e-1")));
        assert_eq!(
            q.includes[1],
            Include {
                source: "ExplanationOfBenefit".into(),
                params: vec!["provider"],
                target: Some("Organization".into())
            }
        );
        assert_eq!(q.revincludes[0].params, ["target"]);
        assert_eq!(
            parse("Coverage", "_include=*").unwrap().includes[0].params,
            ["patient", "beneficiary", "subscriber", "payor"]
        );
        assert!(q.link_params.iter().all(|(k, _)| k != "_count" && k != "_cursor"), "links add those themselves");
        for bad in [
            "_count=1001",
            "_count=x",
            "_include=Patient:x",
            "_include=Coverage:payor",
            "_revinclude=Provenance:target:Patient",
            "_cursor=../x",
            "_id=a b",
        ] {
            assert!(parse("ExplanationOfBenefit", bad).is_err(), "{bad}");
        }
        assert!(parse("Patient", "_count=0").unwrap().summary_count);
    }

    #[test]
    fn unknown_parameters_refused_or_reported() {
        let issue = parse("Patient", "shoe-size=42").unwrap_err();
        assert!(issue.unknown && issue.parameter == "shoe-size");
        assert!(parse("Patient", "_sort=_lastUpdated").unwrap_err().unknown);
        let lenient = ParseOptions { lenient: true, base: None };
        let q = SearchQuery::parse_issue("Patient", &pairs("shoe-size=42&gender=male&_elements=id"), &lenient).unwrap();
        assert_eq!(q.ignored.iter().map(|i| i.parameter.as_str()).collect::<Vec<_>>(), ["shoe-size", "_elements"]);
        assert_eq!(q.filters.len(), 1);
        // Lenient or not, a bad value of a known parameter is an error.
        assert!(SearchQuery::parse_issue("Patient", &pairs("birthdate=soon"), &lenient).is_err());
    }
}
