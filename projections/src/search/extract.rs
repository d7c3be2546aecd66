//! Index values of a resource, from the registry's paths. Pure: the projection stores what this
//! returns, in the same transaction as the resource row.

use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

use super::dates::{self, Range};
use super::registry::{self, ParamType, SearchParam};
use crate::resources::Members;

/// Longest text kept in an index column (in bytes, at a char boundary): PostgreSQL refuses
/// B-tree entries beyond about 2.7 kB, and a search value is cut the same way.
pub const MAX_TEXT: usize = 512;

/// One value of one parameter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexValue {
    /// `system` is empty when the value has none.
    Token {
        system: String,
        code: String,
    },
    String {
        normalized: String,
        exact: String,
    },
    /// `target` is the id of a relative reference, or the whole URL of an absolute one.
    Reference {
        target_type: String,
        target: String,
    },
    Uri(String),
    Date(Range),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

impl PartialOrd for Range {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Range {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.lo, self.hi).cmp(&(other.lo, other.hi))
    }
}

impl std::hash::Hash for Range {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.lo, self.hi).hash(state)
    }
}

/// Cuts `s` to at most `MAX_TEXT` bytes.
pub fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// For string matching: lower case, accents removed, whitespace collapsed.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    let mut push = |c: char, out: &mut String| {
        if c.is_whitespace() {
            space = !out.is_empty();
        } else {
            if space {
                out.push(' ');
                space = false;
            }
            out.extend(c.to_lowercase());
        }
    };
    if s.is_ascii() {
        s.chars().for_each(|c| push(c, &mut out));
    } else {
        s.nfd().filter(|c| !unicode_normalization::char::is_combining_mark(*c)).for_each(|c| push(c, &mut out));
    }
    clip(out)
}

/// `Patient/1`, `Patient/1/_history/2`, `https://x/fhir/Patient/1` → (type, target); `None` for
/// contained (`#…`) and unparseable references.
pub fn parse_reference(reference: &str) -> Option<(String, String)> {
    let r = reference.trim();
    if r.is_empty() || r.starts_with('#') {
        return None;
    }
    if r.starts_with("urn:") {
        return Some((String::new(), clip(r.to_string())));
    }
    let without_history = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let mut segs = without_history.rsplit('/');
    let id = segs.next().filter(|s| !s.is_empty())?;
    let rtype = segs.next().filter(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))?;
    if r.contains("://") {
        Some((rtype.to_string(), clip(without_history.to_string())))
    } else if segs.next().is_none() {
        Some((rtype.to_string(), clip(id.to_string())))
    } else {
        None
    }
}

fn collect<'a>(v: &'a Value, path: &[&str], out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect(i, path, out)),
        Value::Object(map) => match path.split_first() {
            None => out.push(v),
            Some((seg, rest)) => match seg.strip_suffix("[x]") {
                // A choice element: `servicedDate`, `servicedPeriod`, …
                Some(stem) => {
                    for (k, child) in map {
                        if k.strip_prefix(stem).is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase())) {
                            collect(child, rest, out);
                        }
                    }
                }
                None => {
                    if let Some(child) = map.get(*seg) {
                        collect(child, rest, out);
                    }
                }
            },
        },
        other if path.is_empty() => out.push(other),
        _ => {}
    }
}

fn text(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).map(|s| clip(s.to_string())).unwrap_or_default()
}

fn tokens(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => out.push(IndexValue::Token { system: String::new(), code: clip(s.clone()) }),
        Value::Bool(b) => out.push(IndexValue::Token { system: String::new(), code: b.to_string() }),
        Value::Object(m) => {
            if let Some(codings) = m.get("coding").and_then(Value::as_array) {
                // CodeableConcept
                for c in codings {
                    tokens(c, out);
                }
            } else if let Some(value) = m.get("value").and_then(Value::as_str) {
                // Identifier, ContactPoint
                out.push(IndexValue::Token { system: text(m.get("system")), code: clip(value.to_string()) });
            } else if let Some(code) = m.get("code").and_then(Value::as_str) {
                // Coding
                out.push(IndexValue::Token { system: text(m.get("system")), code: clip(code.to_string()) });
            }
        }
        _ => {}
    }
}

/// The parts of a HumanName or Address that name it.
const NAME_PARTS: &[&str] =
    &["text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country"];

fn strings(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => {
            out.push(IndexValue::String { normalized: normalize(s), exact: clip(s.clone()) });
        }
        Value::Object(m) => {
            for part in NAME_PARTS {
                match m.get(*part) {
                    Some(Value::Array(items)) => items.iter().for_each(|i| strings(i, out)),
                    Some(s @ Value::String(_)) => strings(s, out),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn date_ranges(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => out.extend(dates::parse(s).map(IndexValue::Date)),
        Value::Object(m) => {
            // Period: an open end reaches to the start or end of time.
            let start = m.get("start").and_then(Value::as_str).and_then(dates::parse);
            let end = m.get("end").and_then(Value::as_str).and_then(dates::parse);
            if start.is_some() || end.is_some() {
                out.push(IndexValue::Date(Range {
                    lo: start.map_or(dates::MIN, |r| r.lo),
                    hi: end.map_or(dates::MAX, |r| r.hi),
                }));
            }
        }
        _ => {}
    }
}

fn references(p: &SearchParam, v: &Value, out: &mut Vec<IndexValue>) {
    let Some((target_type, target)) = v.get("reference").and_then(Value::as_str).and_then(parse_reference) else {
        return;
    };
    if p.targets.is_empty() || target_type.is_empty() || p.targets.contains(&target_type.as_str()) {
        out.push(IndexValue::Reference { target_type, target });
    }
}

/// Every index entry of `resource`, sorted and without duplicates.
pub fn extract_value(resource: &Value) -> Vec<IndexEntry> {
    let rtype = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
    let mut out = Vec::new();
    let mut values = Vec::new();
    let mut found = Vec::new();
    let compiled = registry::type_index(rtype).map(|t| t.compiled.as_slice()).unwrap_or(&[]);
    for (p, paths) in compiled {
        found.clear();
        for path in paths {
            collect(resource, path, &mut found);
        }
        values.clear();
        for v in &found {
            match p.kind {
                ParamType::Token => tokens(v, &mut values),
                ParamType::String => strings(v, &mut values),
                ParamType::Date => date_ranges(v, &mut values),
                ParamType::Reference => references(p, v, &mut values),
                ParamType::Uri => {
                    if let Some(s) = v.as_str() {
                        values.push(IndexValue::Uri(clip(s.to_string())));
                    }
                }
            }
        }
        out.extend(values.drain(..).map(|value| IndexEntry { param: p.code, value }));
    }
    // A value a covered parameter holds is not stored again under the covering one: the planner
    // reads both (registry::COVERS).
    let mut covered: Vec<IndexEntry> = Vec::new();
    for (_, code, narrower) in registry::COVERS.iter().filter(|(base, _, _)| *base == rtype) {
        let held: Vec<&IndexValue> = out.iter().filter(|e| narrower.contains(&e.param)).map(|e| &e.value).collect();
        covered.extend(out.iter().filter(|e| e.param == *code && held.contains(&&e.value)).cloned());
    }
    if !covered.is_empty() {
        out.retain(|e| !covered.contains(e));
    }
    if rtype != "Patient" {
        for pid in schemas::compartment::patients_of(resource) {
            out.push(IndexEntry {
                param: registry::COMPARTMENT,
                value: IndexValue::Reference { target_type: "Patient".into(), target: clip(pid) },
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The index entries of a stored resource body. Only the top-level elements the registry and the
/// compartment rules look at are parsed: the projection runs this for every version it applies.
pub fn extract(resource_type: &str, json: &str) -> Result<Vec<IndexEntry>, serde_json::Error> {
    let owned;
    let roots: &[&str] = match registry::type_index(resource_type) {
        Some(t) => &t.roots,
        // No parameters of its own; its compartment still counts (e.g. a Condition's subject).
        None if resource_type != "Patient" => {
            owned = schemas::compartment::roots(resource_type);
            &owned
        }
        None => &[],
    };
    if roots.is_empty() {
        return Ok(vec![]);
    }
    let wanted = |k: &str| {
        roots.iter().any(|head| match head.strip_suffix("[x]") {
            Some(stem) => k.strip_prefix(stem).is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase())),
            None => *head == k,
        })
    };
    let members: Members = serde_json::from_str(json)?;
    let mut partial = Map::new();
    for (k, v) in members.0 {
        if wanted(&k) {
            partial.insert(k, serde_json::from_str(v.get())?);
        }
    }
    partial.insert("resourceType".into(), Value::String(resource_type.to_string()));
    Ok(extract_value(&Value::Object(partial)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn tok(system: &str, code: &str) -> IndexValue {
        IndexValue::Token { system: system.into(), code: code.into() }
    }

    fn of(entries: &[IndexEntry], param: &str) -> Vec<IndexValue> {
        entries.iter().filter(|e| e.param == param).map(|e| e.value.clone()).collect()
    }

    #[test]
    fn patient_tokens_strings_and_dates() {
        let p = json!({"resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "urn:mbi", "value": "1EG4"}, {"value": "bare"}],
            "name": [{"family": "Ørsted-Müller", "given": ["José  María", "Ana"], "text": "Dr. José Müller"}],
            "gender": "female", "birthDate": "1980-02", "active": true});
        let e = extract("Patient", &p.to_string()).unwrap();
        assert_eq!(of(&e, "identifier"), [tok("", "bare"), tok("urn:mbi", "1EG4")]);
        assert_eq!(of(&e, "gender"), [tok("", "female")]);
        let family = of(&e, "family");
        assert_eq!(family, [IndexValue::String { normalized: "ørsted-muller".into(), exact: "Ørsted-Müller".into() }]);
        let given: Vec<String> = of(&e, "given")
            .into_iter()
            .map(|v| match v {
                IndexValue::String { normalized, .. } => normalized,
                _ => String::new(),
            })
            .collect();
        assert_eq!(given, ["ana", "jose maria"]);
        // `name` covers family and given: only its other part (text) is stored under it again.
        assert_eq!(
            of(&e, "name"),
            [IndexValue::String { normalized: "dr. jose muller".into(), exact: "Dr. José Müller".into() }]
        );
        let Some(IndexValue::Date(r)) = of(&e, "birthdate").first().cloned() else { panic!("no birthdate") };
        assert_eq!(Some(r), dates::parse("1980-02"));
        assert!(of(&e, registry::COMPARTMENT).is_empty(), "a Patient is its own compartment");
    }

    #[test]
    fn references_are_normalized_and_filtered_by_target() {
        let eob = json!({"resourceType": "ExplanationOfBenefit", "id": "e1",
            "patient": {"reference": "Patient/p1/_history/3"},
            "provider": {"reference": "https://other.example/fhir/Organization/o1"},
            "insurance": [{"coverage": {"reference": "Coverage/c1"}}, {"coverage": {"reference": "#contained"}}],
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "pharmacy"}], "text": "Rx"},
            "billablePeriod": {"start": "2024-01-01"},
            "item": [{"servicedDate": "2024-01-05"}, {"servicedPeriod": {"start": "2024-02-01", "end": "2024-02-03"}}],
            "payee": {"party": {"reference": "Patient/p2"}},
            "created": "2024-03-01T10:00:00Z"});
        let e = extract("ExplanationOfBenefit", &eob.to_string()).unwrap();
        let r = |t: &str, id: &str| IndexValue::Reference { target_type: t.into(), target: id.into() };
        assert_eq!(of(&e, "patient"), [r("Patient", "p1")]);
        assert_eq!(of(&e, "provider"), [r("Organization", "https://other.example/fhir/Organization/o1")]);
        assert_eq!(of(&e, "coverage"), [r("Coverage", "c1")]);
        assert_eq!(of(&e, "type"), [tok("http://terminology.hl7.org/CodeSystem/claim-type", "pharmacy")]);
        assert_eq!(of(&e, "service-date").len(), 3, "billablePeriod and both item.serviced[x]");
        assert!(of(&e, "service-date")
            .contains(&IndexValue::Date(Range { lo: dates::parse("2024-01-01").unwrap().lo, hi: dates::MAX })));
        assert_eq!(of(&e, "service-start-date").len(), 3);
        assert_eq!(of(&e, registry::COMPARTMENT), [r("Patient", "p1"), r("Patient", "p2")]);
        // A subject that is not a Patient is not a DocumentReference's `patient`.
        let doc = json!({"resourceType": "DocumentReference", "subject": {"reference": "Group/g"},
            "context": {"related": [{"reference": "Claim/c9"}]}});
        let e = extract_value(&doc);
        assert!(of(&e, "patient").is_empty());
        assert_eq!(of(&e, "subject"), [r("Group", "g")]);
        assert_eq!(of(&e, "related"), [r("Claim", "c9")]);
    }

    #[test]
    fn reference_forms() {
        assert_eq!(parse_reference("Patient/1"), Some(("Patient".into(), "1".into())));
        assert_eq!(parse_reference("Patient/1/_history/2"), Some(("Patient".into(), "1".into())));
        assert_eq!(
            parse_reference("http://h/fhir/Patient/1/_history/2"),
            Some(("Patient".into(), "http://h/fhir/Patient/1".into()))
        );
        assert_eq!(parse_reference("urn:uuid:abc"), Some((String::new(), "urn:uuid:abc".into())));
        for none in ["#c", "", "1", "a/b/c", "patient/1", "Patient/"] {
            assert_eq!(parse_reference(none), None, "{none}");
        }
    }

    #[test]
    fn normalization_and_limits() {
        assert_eq!(normalize("  Ángela \t DE  la Cruz "), "angela de la cruz");
        assert_eq!(normalize("ÇA"), "ca");
        let long = "é".repeat(400);
        assert!(clip(long).len() <= MAX_TEXT);
        assert!(extract("Patient", "[1]").is_err());
        assert!(extract("Binary", "not even JSON").unwrap().is_empty(), "nothing to index: nothing parsed");
        // Values of the wrong shape are skipped, not fatal.
        let odd = json!({"resourceType": "Patient", "birthDate": 3, "gender": {"x": 1}, "name": "Bob"});
        assert_eq!(
            extract_value(&odd),
            [IndexEntry { param: "name", value: IndexValue::String { normalized: "bob".into(), exact: "Bob".into() } }]
        );
    }
}
