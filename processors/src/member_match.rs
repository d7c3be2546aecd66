//! Da Vinci HRex `$member-match`, the pure part: reading the request Parameters, reducing Patients
//! and Coverages to member-index entries, deciding a match from candidates the host looked up,
//! and judging whether a Consent can be honoured. No IO: the host (the member-match projection)
//! keeps the index and performs the lookups a [`Probe`] asks for.
//!
//! The rules, in order (the one that decided is recorded in the decision):
//! 1. `identifier`: an identifier from the request (CoverageToMatch `subscriberId`, its
//!    `identifier`s, MemberPatient `identifier`s such as MB/MC) finds Patients directly or through
//!    a Coverage's beneficiary; those whose demographics agree (birth date, family name, first
//!    given name, gender when both sides have one) are the candidates.
//! 2. `demographics`: when no identifier finds anyone, normalized family name + first given name
//!    + birth date (+ gender) over the whole index; several → narrowed by postal code / telecom.
//!
//! Exactly one candidate is a match; none or several are refusals (HRex: at most one match).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// An identifier as the index keys it: system (may be absent) and value, both as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdKey {
    pub system: Option<String>,
    pub value: String,
}

/// A Patient reduced to what matching compares (all strings already normalized).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MemberRecord {
    pub patient_id: String,
    /// Normalized family names (letters and digits only: case, accents, spaces, hyphens and
    /// apostrophes removed), one per `name`.
    pub families: Vec<String>,
    /// Normalized given names: every given token of every name (hyphenated and multiple given
    /// names split into tokens).
    pub given: Vec<String>,
    /// `YYYY-MM-DD` (or the precision given).
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    /// Postal codes, first 5 characters.
    pub postal_codes: Vec<String>,
    /// Telecom values normalized (digits only for phones, lowercase for emails).
    pub telecoms: Vec<String>,
    pub identifiers: Vec<IdKey>,
    /// The identifier payerx returns as `MemberIdentifier` (see [`member_identifier`]).
    pub member_identifier: Option<IdKey>,
    /// The member's coverage periods here (from the Coverages whose beneficiary it is), attached
    /// by the host when it looks the member up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coverage_periods: Vec<Period>,
}

/// A `Period`: `start` and `end` as given (any FHIR date/dateTime precision); open when absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Period {
    pub start: Option<String>,
    pub end: Option<String>,
}

impl Period {
    pub fn of(v: &Value) -> Option<Period> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let p = Period { start: text("start"), end: text("end") };
        (p.start.is_some() || p.end.is_some()).then_some(p)
    }

    /// Whether the two periods share a day, compared at the coarser precision of each pair of
    /// bounds (a coverage ending `2024` overlaps one starting `2024-06-01`).
    pub fn overlaps(&self, other: &Period) -> bool {
        let before = |end: &Option<String>, start: &Option<String>| match (end, start) {
            (Some(e), Some(s)) => {
                let n = e.len().min(s.len()).min(10);
                e.get(..n).unwrap_or(e) < s.get(..n).unwrap_or(s)
            }
            _ => false,
        };
        !before(&self.end, &other.start) && !before(&other.end, &self.start)
    }

    fn show(&self) -> String {
        format!("{}..{}", self.start.as_deref().unwrap_or(""), self.end.as_deref().unwrap_or(""))
    }
}

/// A Coverage reduced to what matching needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CoverageRecord {
    pub coverage_id: String,
    /// Patient id of `beneficiary` (`Patient/{id}` references only).
    pub beneficiary: Option<String>,
    pub subscriber_id: Option<String>,
    pub identifiers: Vec<IdKey>,
    pub payors: Vec<String>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub status: Option<String>,
}

/// A `$member-match` request, read from its Parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchRequest {
    pub member_patient: Value,
    pub coverage_to_match: Value,
    pub coverage_to_link: Option<Value>,
    pub consent: Option<Value>,
}

/// Why a request cannot be processed at all.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestProblem {
    /// 400 for malformed Parameters, 422 for well-formed but unprocessable input (e.g. a
    /// Coverage or Consent that does not point at the MemberPatient).
    pub status: u16,
    pub message: String,
    /// FHIRPath of the offending element, e.g. `Parameters.parameter[1].resource.beneficiary`.
    pub expression: String,
}

/// What the host must look up for a request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Probe {
    /// Identifiers to look up in the Patient identifier index and in Coverage
    /// identifiers/subscriber ids.
    pub identifiers: Vec<IdKey>,
    /// The request's member, normalized like the index.
    pub member: MemberRecord,
    /// `CoverageToMatch.period`: when given, a member is matched only if one of its coverages
    /// here overlaps it (or none of them states a period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_period: Option<Period>,
}

/// How a request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    Identifier,
    Demographics,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Identifier => "identifier",
            Rule::Demographics => "demographics",
        }
    }
}

/// The matcher's verdict on candidates.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Matched { patient_id: String, rule: Rule },
    NoMatch { reason: String },
    Multiple { rule: Rule, count: usize },
}

/// What a Consent grants, when it can be honoured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentTerms {
    /// The HRex policy URI (`…hrex-consent.html#regular` or `#sensitive`).
    pub policy: String,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
}

/// The payer's consent settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConsentPolicy {
    /// Policy URIs this payer can honour.
    pub supported: Vec<String>,
    /// This payer's organization identifiers; when non-empty, a Consent's source actor must
    /// name one of them.
    pub payer_identifiers: Vec<IdKey>,
}

pub const POLICY_REGULAR: &str = "http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html#regular";
pub const POLICY_SENSITIVE: &str =
    "http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html#sensitive";

/// The parameter (or `part`) names `$member-match` reads, with the older names the seed page uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    MemberPatient,
    CoverageToMatch,
    CoverageToLink,
    Consent,
}

impl Slot {
    fn from_name(name: &str) -> Option<Slot> {
        match name {
            "MemberPatient" => Some(Slot::MemberPatient),
            "CoverageToMatch" | "OldCoverage" => Some(Slot::CoverageToMatch),
            "CoverageToLink" | "NewCoverage" => Some(Slot::CoverageToLink),
            "Consent" => Some(Slot::Consent),
            _ => None,
        }
    }

    fn resource_type(self) -> &'static str {
        match self {
            Slot::MemberPatient => "Patient",
            Slot::CoverageToMatch | Slot::CoverageToLink => "Coverage",
            Slot::Consent => "Consent",
        }
    }

    fn index(self) -> usize {
        match self {
            Slot::MemberPatient => 0,
            Slot::CoverageToMatch => 1,
            Slot::CoverageToLink => 2,
            Slot::Consent => 3,
        }
    }
}

fn bad_request(message: String, expression: String) -> RequestProblem {
    RequestProblem { status: 400, message, expression }
}

fn unprocessable(message: String, expression: String) -> RequestProblem {
    RequestProblem { status: 422, message, expression }
}

/// Reads a `$member-match` Parameters (HRex names, and the older `OldCoverage`/`NewCoverage`).
pub fn parse_request(params: &Value) -> Result<MatchRequest, RequestProblem> {
    match params.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => {}
        Some(other) => {
            return Err(bad_request(
                format!("$member-match takes a Parameters resource, not a {other}"),
                "Parameters".into(),
            ))
        }
        None => {
            return Err(bad_request(
                "$member-match takes a Parameters resource; the body has no resourceType".into(),
                "Parameters".into(),
            ))
        }
    }
    let entries = match params.get("parameter") {
        None => &[][..],
        Some(Value::Array(entries)) => entries.as_slice(),
        Some(_) => {
            return Err(bad_request("Parameters.parameter must be an array".into(), "Parameters.parameter".into()))
        }
    };
    read_inputs(entries, "Parameters.parameter", false)
}

/// Reads one `MemberBundle` parameter of `$bulk-member-match` (its `part`s).
pub fn parse_member_bundle(param: &Value, at: &str) -> Result<MatchRequest, RequestProblem> {
    if let Some(name) = param.get("name") {
        if name.as_str() != Some("MemberBundle") {
            return Err(bad_request(format!("expected a MemberBundle parameter, found {name}"), at.to_string()));
        }
    }
    match param.get("part") {
        Some(Value::Array(parts)) => read_inputs(parts, &format!("{at}.part"), true),
        Some(_) => Err(bad_request(format!("{at}.part must be an array"), format!("{at}.part"))),
        None => Err(bad_request(
            "MemberBundle has no parts; it must carry MemberPatient, CoverageToMatch and Consent".into(),
            at.to_string(),
        )),
    }
}

/// One input found in the list: its position, the name it was given under, its resource.
type Found<'a> = (usize, &'a str, &'a Value);

/// Reads the inputs from a `parameter` (or `part`) list whose FHIRPath is `list`.
fn read_inputs(entries: &[Value], list: &str, consent_required: bool) -> Result<MatchRequest, RequestProblem> {
    let mut found: [Option<Found<'_>>; 4] = [None; 4];
    for (i, entry) in entries.iter().enumerate() {
        let here = format!("{list}[{i}]");
        let Some(name) = entry.get("name").and_then(Value::as_str) else {
            return Err(bad_request(format!("{here} has no name"), here));
        };
        let Some(slot) = Slot::from_name(name) else {
            return Err(bad_request(
                format!(
                    "unknown parameter '{name}': $member-match takes MemberPatient, CoverageToMatch, \
                     CoverageToLink and Consent"
                ),
                here,
            ));
        };
        let expected = slot.resource_type();
        let resource = match entry.get("resource") {
            Some(resource @ Value::Object(_)) => resource,
            _ => return Err(bad_request(format!("parameter {name} must carry a {expected} in its resource"), here)),
        };
        match resource.get("resourceType").and_then(Value::as_str) {
            Some(rt) if rt == expected => {}
            Some(rt) => return Err(bad_request(format!("parameter {name} must be a {expected}, not a {rt}"), here)),
            None => {
                return Err(bad_request(
                    format!("parameter {name} has a resource without resourceType; it must be a {expected}"),
                    here,
                ))
            }
        }
        if let Some((j, first, _)) = found[slot.index()] {
            let message = if first == name {
                format!("parameter {name} appears more than once (also at {list}[{j}])")
            } else {
                format!(
                    "parameter {name} duplicates {first} at {list}[{j}] (OldCoverage and NewCoverage \
                     are the older names of CoverageToMatch and CoverageToLink)"
                )
            };
            return Err(bad_request(message, here));
        }
        found[slot.index()] = Some((i, name, resource));
    }

    let [member_patient, coverage_to_match, coverage_to_link, consent] = found;
    let Some(member_patient) = member_patient else {
        return Err(bad_request("missing parameter MemberPatient (the member's Patient)".into(), list.to_string()));
    };
    let Some(coverage_to_match) = coverage_to_match else {
        return Err(bad_request(
            "missing parameter CoverageToMatch (the Coverage to match, formerly OldCoverage)".into(),
            list.to_string(),
        ));
    };
    if consent_required && consent.is_none() {
        return Err(bad_request("missing parameter Consent (a MemberBundle requires one)".into(), list.to_string()));
    }

    let member_id = member_patient.2.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
    let mut references = vec![(coverage_to_match, "beneficiary")];
    references.extend(coverage_to_link.map(|found| (found, "beneficiary")));
    references.extend(consent.map(|found| (found, "patient")));
    for ((i, name, resource), element) in references {
        let at = format!("{list}[{i}].resource.{element}");
        check_points_at_member(resource, element, name, at, member_id)?;
    }

    Ok(MatchRequest {
        member_patient: member_patient.2.clone(),
        coverage_to_match: coverage_to_match.2.clone(),
        coverage_to_link: coverage_to_link.map(|found| found.2.clone()),
        consent: consent.map(|found| found.2.clone()),
    })
}

/// 422 unless `resource.element` is a local reference to the MemberPatient (`member_id`).
fn check_points_at_member(
    resource: &Value,
    element: &str,
    param: &str,
    at: String,
    member_id: Option<&str>,
) -> Result<(), RequestProblem> {
    let reference = resource.get(element).and_then(|r| r.get("reference")).and_then(Value::as_str);
    match (reference, member_id) {
        (None, _) if resource.get(element).is_none() => {
            Err(unprocessable(format!("{param}.{element} is missing; it must reference the MemberPatient"), at))
        }
        (None, _) => Err(unprocessable(
            format!(
                "{param}.{element} has no literal reference; it must reference the MemberPatient \
                 (Patient/{{id}}) within the request"
            ),
            at,
        )),
        (Some(reference), None) => Err(unprocessable(
            format!(
                "{param}.{element} is '{reference}', but the MemberPatient has no id, so nothing can \
                 reference it; give MemberPatient an id and reference it as Patient/{{id}}"
            ),
            at,
        )),
        (Some(reference), Some(id)) if local_patient_id(reference) == Some(id) => Ok(()),
        (Some(reference), Some(id)) => Err(unprocessable(
            format!(
                "{param}.{element} must reference the MemberPatient as Patient/{id} (references are \
                 local to the request); found '{reference}'"
            ),
            at,
        )),
    }
}

/// The Patient id of a local reference: `Patient/{id}` or a bare `{id}`, without any
/// `/_history/{vid}` suffix. `None` for absolute URLs, contained (`#`) and other types.
fn local_patient_id(reference: &str) -> Option<&str> {
    let rest = reference.strip_prefix("Patient/").unwrap_or(reference);
    let id = rest.split_once("/_history/").map_or(rest, |(id, _)| id);
    (!id.is_empty() && !id.contains(['/', ':', '#'])).then_some(id)
}

/// Normalizes a name part for comparison.
pub fn normalize_name(s: &str) -> String {
    s.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric() && !is_combining_mark(*c))
        .collect()
}

/// Separators between given-name tokens: whitespace and hyphens.
fn is_given_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '-' | '\u{2010}' | '\u{2011}')
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// An Identifier as an index key (`None` without a value).
fn id_key(identifier: &Value) -> Option<IdKey> {
    let value = identifier.get("value").and_then(Value::as_str).filter(|v| !v.trim().is_empty())?;
    let system = identifier.get("system").and_then(Value::as_str).filter(|s| !s.is_empty());
    Some(IdKey { system: system.map(str::to_string), value: value.to_string() })
}

/// The contained resource a `#id` reference names, when it is of `resource_type`.
fn contained<'a>(resource: &'a Value, reference: &str, resource_type: &str) -> Option<&'a Value> {
    let id = reference.strip_prefix('#')?;
    array(resource, "contained").iter().find(|c| {
        c.get("id").and_then(Value::as_str) == Some(id)
            && c.get("resourceType").and_then(Value::as_str) == Some(resource_type)
    })
}

/// A telecom value normalized: phones to their last 10 digits, emails lowercased.
fn normalize_telecom(contact: &Value) -> Option<String> {
    let value = text(contact, "value")?;
    let system = contact.get("system").and_then(Value::as_str);
    let email = system == Some("email") || (system.is_none() && value.contains('@'));
    if email {
        return Some(value.to_lowercase());
    }
    if !matches!(system, None | Some("phone") | Some("sms")) {
        return None;
    }
    let digits: Vec<char> = value.chars().filter(char::is_ascii_digit).collect();
    let keep = digits.len().saturating_sub(10);
    let phone: String = digits[keep..].iter().collect();
    (!phone.is_empty()).then_some(phone)
}

/// A Patient reduced to a record whether or not it has an id (`patient_id` empty then).
fn record_of(patient: &Value) -> MemberRecord {
    let mut record = MemberRecord {
        patient_id: patient.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
        ..MemberRecord::default()
    };
    for name in array(patient, "name") {
        if let Some(family) = name.get("family").and_then(Value::as_str) {
            let family = normalize_name(family);
            if !family.is_empty() {
                push_unique(&mut record.families, family);
            }
        }
        for given in array(name, "given").iter().filter_map(Value::as_str) {
            for token in given.split(is_given_separator) {
                let token = normalize_name(token);
                if !token.is_empty() {
                    push_unique(&mut record.given, token);
                }
            }
        }
    }
    record.birth_date = text(patient, "birthDate").map(str::to_string);
    record.gender = text(patient, "gender").map(str::to_lowercase);
    for address in array(patient, "address") {
        if let Some(code) = text(address, "postalCode") {
            push_unique(&mut record.postal_codes, code.chars().take(5).collect());
        }
    }
    for contact in array(patient, "telecom") {
        if let Some(value) = normalize_telecom(contact) {
            push_unique(&mut record.telecoms, value);
        }
    }
    for identifier in array(patient, "identifier").iter().filter_map(id_key) {
        push_unique(&mut record.identifiers, identifier);
    }
    record.member_identifier = member_identifier(patient);
    record
}

/// The index entry of a stored Patient (`None` when it has no id).
pub fn member_from_patient(patient: &Value) -> Option<MemberRecord> {
    if patient.get("resourceType").is_some_and(|rt| rt != "Patient") {
        return None;
    }
    let record = record_of(patient);
    (!record.patient_id.is_empty()).then_some(record)
}

/// The index entry of a stored Coverage.
pub fn coverage_from(coverage: &Value) -> Option<CoverageRecord> {
    if coverage.get("resourceType").is_some_and(|rt| rt != "Coverage") {
        return None;
    }
    let coverage_id = coverage.get("id").and_then(Value::as_str).filter(|id| !id.is_empty())?;
    let beneficiary = coverage
        .get("beneficiary")
        .and_then(|b| b.get("reference"))
        .and_then(Value::as_str)
        .filter(|r| r.starts_with("Patient/"))
        .and_then(local_patient_id)
        .map(str::to_string);
    let mut identifiers = Vec::new();
    for identifier in array(coverage, "identifier").iter().filter_map(id_key) {
        push_unique(&mut identifiers, identifier);
    }
    let mut payors = Vec::new();
    for payor in array(coverage, "payor") {
        if let Some(reference) = payor.get("reference").and_then(Value::as_str) {
            match contained(coverage, reference, "Organization") {
                Some(org) => {
                    for key in array(org, "identifier").iter().filter_map(id_key) {
                        push_unique(&mut payors, key.value);
                    }
                }
                None if !reference.starts_with('#') => push_unique(&mut payors, reference.to_string()),
                None => {}
            }
        }
        if let Some(key) = payor.get("identifier").and_then(id_key) {
            push_unique(&mut payors, key.value);
        }
    }
    let period = coverage.get("period").unwrap_or(&Value::Null);
    Some(CoverageRecord {
        coverage_id: coverage_id.to_string(),
        beneficiary,
        subscriber_id: text(coverage, "subscriberId").map(str::to_string),
        identifiers,
        payors,
        period_start: text(period, "start").map(str::to_string),
        period_end: text(period, "end").map(str::to_string),
        status: text(coverage, "status").map(str::to_string),
    })
}

/// Whether some `coding` of the CodeableConcept at `value.key` has `code`.
fn has_code(value: &Value, key: &str, code: &str) -> bool {
    value
        .get(key)
        .map(|concept| array(concept, "coding").iter().any(|c| c.get("code").and_then(Value::as_str) == Some(code)))
        .unwrap_or(false)
}

/// The identifier returned as `MemberIdentifier`: the Patient's MB (member number) identifier,
/// else MC, else MR, else its first identifier with a value.
pub fn member_identifier(patient: &Value) -> Option<IdKey> {
    let identifiers = array(patient, "identifier");
    for code in ["MB", "MC", "MR"] {
        let typed = identifiers.iter().filter(|i| has_code(i, "type", code)).find_map(id_key);
        if typed.is_some() {
            return typed;
        }
    }
    // Another payer's member id (HRex UMB) recorded on the Patient is not ours to return.
    identifiers.iter().filter(|i| !has_code(i, "type", "UMB")).find_map(id_key)
}

/// What to look up for a request.
pub fn probe(req: &MatchRequest) -> Probe {
    let member = record_of(&req.member_patient);
    let mut identifiers = member.identifiers.clone();
    for identifier in array(&req.coverage_to_match, "identifier").iter().filter_map(id_key) {
        push_unique(&mut identifiers, identifier);
    }
    if let Some(subscriber) = req.coverage_to_match.get("subscriberId").and_then(Value::as_str) {
        if !subscriber.trim().is_empty() {
            push_unique(&mut identifiers, IdKey { system: None, value: subscriber.to_string() });
        }
    }
    let coverage_period = req.coverage_to_match.get("period").and_then(Period::of);
    Probe { identifiers, member, coverage_period }
}

/// The candidates without repeats of a patient (first kept).
fn distinct(candidates: &[MemberRecord]) -> Vec<&MemberRecord> {
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for candidate in candidates {
        if !seen.contains(&candidate.patient_id.as_str()) {
            seen.push(&candidate.patient_id);
            out.push(candidate);
        }
    }
    out
}

/// Whether a candidate's demographics agree with the request's. `birth_date_required`: the
/// request must carry a birth date and the candidate the same one (demographics rule); otherwise
/// birth dates must be equal only when both sides have one (identifier rule).
fn demographics_agree(request: &MemberRecord, candidate: &MemberRecord, birth_date_required: bool) -> bool {
    let birth_date = match (&request.birth_date, &candidate.birth_date) {
        (Some(a), Some(b)) => a == b,
        _ => !birth_date_required,
    };
    let family = request.families.iter().any(|f| candidate.families.contains(f));
    let given = match (request.given.first(), candidate.given.first()) {
        (Some(r), Some(c)) => candidate.given.contains(r) || request.given.contains(c),
        _ => false,
    };
    let gender = match (request.gender.as_deref(), candidate.gender.as_deref()) {
        (Some(a), Some(b)) if a != "unknown" && b != "unknown" => a == b,
        _ => true,
    };
    birth_date && family && given && gender
}

fn verdict(candidates: &[&MemberRecord], rule: Rule, none: &str) -> Verdict {
    match candidates {
        [] => Verdict::NoMatch { reason: none.to_string() },
        [one] => Verdict::Matched { patient_id: one.patient_id.clone(), rule },
        several => Verdict::Multiple { rule, count: several.len() },
    }
}

/// NoMatch reason when no member is found at all.
pub const NO_MEMBER: &str = "no member with these identifiers or demographics";
/// NoMatch reason when an identifier finds a member whose demographics differ (which field
/// differs is deliberately not said).
pub const DEMOGRAPHICS_DIFFER: &str =
    "a member was found by identifier, but the MemberPatient demographics do not agree with that member's";

/// Decides from the candidates the host found: `by_identifier` are the members reached through
/// the probe's identifiers (directly or via a Coverage's beneficiary, deduplicated by patient);
/// `by_demographics` are the members with the probe's family name and birth date (looked up only
/// when `by_identifier` is empty).
///
/// When the request gives `CoverageToMatch.period`, a candidate whose coverages here all state
/// periods that miss it is not the member the request describes; with no candidate left the
/// answer says so.
pub fn decide(probe: &Probe, by_identifier: &[MemberRecord], by_demographics: &[MemberRecord]) -> Verdict {
    let Some(asked) = &probe.coverage_period else { return decide_by_person(probe, by_identifier, by_demographics) };
    let covered = |m: &&MemberRecord| {
        let stated: Vec<&Period> = m.coverage_periods.iter().filter(|p| p.start.is_some() || p.end.is_some()).collect();
        stated.is_empty() || stated.iter().any(|p| p.overlaps(asked))
    };
    let keep = |c: &[MemberRecord]| -> Vec<MemberRecord> { c.iter().filter(covered).cloned().collect() };
    let (ids, demo) = (keep(by_identifier), keep(by_demographics));
    let verdict = decide_by_person(probe, &ids, &demo);
    if let (Verdict::NoMatch { .. }, Verdict::Matched { .. }) =
        (&verdict, decide_by_person(probe, by_identifier, by_demographics))
    {
        // Say why, without the periods held here.
        return Verdict::NoMatch {
            reason: format!("no member was covered here during CoverageToMatch.period ({})", asked.show()),
        };
    }
    verdict
}

fn decide_by_person(probe: &Probe, by_identifier: &[MemberRecord], by_demographics: &[MemberRecord]) -> Verdict {
    let request = &probe.member;
    if !by_identifier.is_empty() {
        let agreeing: Vec<&MemberRecord> =
            distinct(by_identifier).into_iter().filter(|c| demographics_agree(request, c, false)).collect();
        return verdict(&agreeing, Rule::Identifier, DEMOGRAPHICS_DIFFER);
    }
    let agreeing: Vec<&MemberRecord> =
        distinct(by_demographics).into_iter().filter(|c| demographics_agree(request, c, true)).collect();
    let has_contact = !request.postal_codes.is_empty() || !request.telecoms.is_empty();
    if agreeing.len() > 1 && has_contact {
        let narrowed: Vec<&MemberRecord> = agreeing
            .iter()
            .copied()
            .filter(|c| {
                c.postal_codes.iter().any(|p| request.postal_codes.contains(p))
                    || c.telecoms.iter().any(|t| request.telecoms.contains(t))
            })
            .collect();
        if !narrowed.is_empty() {
            return verdict(&narrowed, Rule::Demographics, NO_MEMBER);
        }
    }
    verdict(&agreeing, Rule::Demographics, NO_MEMBER)
}

fn role_is(actor: &Value, code: &str) -> bool {
    has_code(actor, "role", code)
}

/// The organization identifiers a Consent actor names (a contained Organization via `#id`, or
/// the reference's logical identifier).
fn actor_identifiers(consent: &Value, actor: &Value) -> Vec<IdKey> {
    let mut out = Vec::new();
    let Some(reference) = actor.get("reference") else {
        return out;
    };
    if let Some(org) =
        reference.get("reference").and_then(Value::as_str).and_then(|r| contained(consent, r, "Organization"))
    {
        for key in array(org, "identifier").iter().filter_map(id_key) {
            push_unique(&mut out, key);
        }
    }
    if let Some(key) = reference.get("identifier").and_then(id_key) {
        push_unique(&mut out, key);
    }
    out
}

fn show_ids(ids: &[IdKey]) -> String {
    let shown: Vec<String> = ids.iter().map(|k| format!("{}|{}", k.system.as_deref().unwrap_or(""), k.value)).collect();
    if shown.is_empty() {
        "none".into()
    } else {
        shown.join(", ")
    }
}

/// The date part (`YYYY-MM-DD`, or less when less precise) of a date or dateTime.
fn date_part(s: &str) -> &str {
    let s = s.trim();
    s.get(..10).unwrap_or(s)
}

fn looks_like_date(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() >= 4 && bytes[..4].iter().all(u8::is_ascii_digit)
}

/// `today` truncated to the precision of `bound`, for comparing with it.
fn at_precision<'a>(today: &'a str, bound: &str) -> &'a str {
    today.get(..bound.len()).unwrap_or(today)
}

/// Whether `consent` can be honoured at `today` (`YYYY-MM-DD`) for a request whose requesting
/// payer is identified by `requester` (the CoverageToLink payor's identifiers).
pub fn check_consent(
    consent: &Value,
    member_patient: &Value,
    requester: &[IdKey],
    policy: &ConsentPolicy,
    today: &str,
) -> Result<ConsentTerms, String> {
    if consent.get("resourceType").and_then(Value::as_str) != Some("Consent") {
        return Err("the Consent parameter does not hold a Consent resource".into());
    }
    match consent.get("status").and_then(Value::as_str) {
        Some("active") => {}
        Some(status) => {
            return Err(format!("the Consent's status is '{status}'; only an active Consent can be honoured"))
        }
        None => return Err("the Consent has no status; only an active Consent can be honoured".into()),
    }
    let member_id = member_patient.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
    let patient = consent.get("patient").and_then(|p| p.get("reference")).and_then(Value::as_str);
    match (patient.and_then(local_patient_id), member_id) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err("the Consent's patient does not reference the MemberPatient".into()),
    }

    let asked: Vec<&str> = array(consent, "policy").iter().filter_map(|p| text(p, "uri")).collect();
    let Some(chosen) = asked.iter().find(|uri| policy.supported.iter().any(|s| s == *uri)) else {
        let honoured =
            if policy.supported.is_empty() { "no consent policy".to_string() } else { policy.supported.join(" or ") };
        return Err(if asked.is_empty() {
            format!("the Consent names no policy (Consent.policy.uri); this payer honours only {honoured}")
        } else {
            format!("this payer honours only {honoured}; the Consent asks for {}", asked.join(" and "))
        });
    };

    let provision = consent.get("provision").unwrap_or(&Value::Null);
    if let Some(kind) = provision.get("type").and_then(Value::as_str) {
        if kind != "permit" {
            return Err(format!("the Consent's provision.type is '{kind}'; only a permit can be honoured"));
        }
    }
    let Some(period) = provision.get("period") else {
        return Err("the Consent has no provision.period; the period it is valid for is required".into());
    };
    let today = date_part(today);
    let start = text(period, "start").map(date_part);
    let end = text(period, "end").map(date_part);
    let (Some(start), Some(end)) = (start, end) else {
        return Err("the Consent's provision.period needs both a start and an end".into());
    };
    for (bound, name) in [(start, "start"), (end, "end")] {
        if !looks_like_date(bound) {
            return Err(format!("the Consent's provision.period.{name} '{bound}' is not a date"));
        }
    }
    if at_precision(today, start) < start {
        return Err(format!("the Consent is not yet in force: its period starts {start}, today is {today}"));
    }
    if at_precision(today, end) > end {
        return Err(format!("the Consent has expired: its period ended {end}, today is {today}"));
    }

    if requester.is_empty() {
        return Err("the Consent's recipient cannot be verified: the requesting payer is unknown (its client is \
             registered with no organization, and CoverageToLink names no payor identifier)"
            .into());
    }
    let actors = array(provision, "actor");
    let recipients: Vec<IdKey> =
        actors.iter().filter(|a| role_is(a, "IRCP")).flat_map(|a| actor_identifiers(consent, a)).collect();
    if recipients.is_empty() {
        return Err("the Consent names no recipient organization identifier (provision.actor with role IRCP)".into());
    }
    if !recipients.iter().any(|r| requester.contains(r)) {
        return Err(format!(
            "the Consent's recipients ({}) do not include the requesting payer ({})",
            show_ids(&recipients),
            show_ids(requester)
        ));
    }
    if !policy.payer_identifiers.is_empty() {
        let names_us = actors
            .iter()
            .filter(|a| role_is(a, "performer"))
            .flat_map(|a| actor_identifiers(consent, a))
            .any(|id| policy.payer_identifiers.contains(&id));
        if !names_us {
            return Err(format!(
                "the Consent does not name this payer ({}) as the source of the disclosure \
                 (provision.actor with role performer)",
                show_ids(&policy.payer_identifiers)
            ));
        }
    }
    Ok(ConsentTerms {
        policy: (*chosen).to_string(),
        period_start: text(period, "start").map(str::to_string),
        period_end: text(period, "end").map(str::to_string),
    })
}

/// The organization identifiers of the CoverageToLink's payor(s) (contained Organizations
/// resolved, or `payor.identifier`).
pub fn requester_identifiers(coverage_to_link: &Value) -> Vec<IdKey> {
    let mut out = Vec::new();
    for payor in array(coverage_to_link, "payor") {
        if let Some(org) =
            payor.get("reference").and_then(Value::as_str).and_then(|r| contained(coverage_to_link, r, "Organization"))
        {
            for key in array(org, "identifier").iter().filter_map(id_key) {
                push_unique(&mut out, key);
            }
        }
        if let Some(key) = payor.get("identifier").and_then(id_key) {
            push_unique(&mut out, key);
        }
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// SHA-256 hex digests of the request's identifiers and of its demographics, for the decision
/// event (analysts can join on them without seeing PHI).
pub fn input_hashes(probe: &Probe) -> (String, String) {
    let mut lines: Vec<String> = probe
        .identifiers
        .iter()
        .map(|k| format!("{}|{}", k.system.as_deref().unwrap_or("").trim(), k.value.trim()))
        .collect();
    lines.sort();
    lines.dedup();
    let member = &probe.member;
    let demographics = format!(
        "{}|{}|{}|{}",
        member.families.first().map_or("", String::as_str),
        member.given.first().map_or("", String::as_str),
        member.birth_date.as_deref().unwrap_or(""),
        member.gender.as_deref().unwrap_or(""),
    );
    (sha256_hex(lines.join("\n").as_bytes()), sha256_hex(demographics.as_bytes()))
}

/// `value` with every object's keys in sorted order (whatever map the build of serde_json uses).
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// SHA-256 hex of the request's content (canonical JSON of the four inputs) and of the payer it
/// is made for, so a retried request is recognized, and one made for another payer is not.
pub fn request_hash(req: &MatchRequest, requester: &[IdKey]) -> String {
    let mut inputs = serde_json::Map::new();
    inputs.insert("requester".into(), serde_json::to_value(requester).unwrap_or(Value::Null));
    inputs.insert("Consent".into(), req.consent.clone().unwrap_or(Value::Null));
    inputs.insert("CoverageToLink".into(), req.coverage_to_link.clone().unwrap_or(Value::Null));
    inputs.insert("CoverageToMatch".into(), req.coverage_to_match.clone());
    inputs.insert("MemberPatient".into(), req.member_patient.clone());
    let text = serde_json::to_string(&canonical(&Value::Object(inputs))).unwrap_or_default();
    sha256_hex(text.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    const SEED_REQUEST: &str = include_str!("validate/testdata/seed001-member-match-request.json");
    const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
    const OLD_PAYER_NPI: &str = "9876543210";
    const NEW_PAYER_NPI: &str = "0123456789";
    const TODAY: &str = "2024-06-15";

    fn npi(value: &str) -> IdKey {
        IdKey { system: Some(NPI.into()), value: value.into() }
    }

    fn patient(id: &str, family: &str, given: &[&str], birth_date: &str) -> Value {
        json!({
            "resourceType": "Patient",
            "id": id,
            "name": [{"family": family, "given": given}],
            "gender": "female",
            "birthDate": birth_date,
        })
    }

    fn coverage(id: &str, beneficiary: &str, subscriber_id: &str) -> Value {
        json!({
            "resourceType": "Coverage",
            "id": id,
            "status": "active",
            "subscriberId": subscriber_id,
            "beneficiary": {"reference": beneficiary},
            "payor": [{"identifier": {"system": NPI, "value": OLD_PAYER_NPI}}],
        })
    }

    fn link_coverage(beneficiary: &str) -> Value {
        json!({
            "resourceType": "Coverage",
            "id": "new",
            "status": "active",
            "beneficiary": {"reference": beneficiary},
            "payor": [{"identifier": {"system": NPI, "value": NEW_PAYER_NPI}}],
        })
    }

    fn consent(policy: &str, start: &str, end: &str, recipient: &str) -> Value {
        json!({
            "resourceType": "Consent",
            "status": "active",
            "patient": {"reference": "Patient/1"},
            "policy": [{"uri": policy}],
            "provision": {
                "type": "permit",
                "period": {"start": start, "end": end},
                "actor": [
                    {
                        "role": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "performer"
                        }]},
                        "reference": {"identifier": {"system": NPI, "value": OLD_PAYER_NPI}}
                    },
                    {
                        "role": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP"
                        }]},
                        "reference": {"identifier": {"system": NPI, "value": recipient}}
                    }
                ]
            }
        })
    }

    fn params(entries: Vec<(&str, Value)>) -> Value {
        let parameter: Vec<Value> =
            entries.into_iter().map(|(name, resource)| json!({"name": name, "resource": resource})).collect();
        json!({"resourceType": "Parameters", "parameter": parameter})
    }

    fn member_patient() -> Value {
        patient("1", "Person", &["Patricia", "Ann"], "1974-12-25")
    }

    fn hrex_request() -> Value {
        params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1")),
            ("CoverageToLink", link_coverage("Patient/1")),
            ("Consent", consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI)),
        ])
    }

    fn problem(params: &Value) -> RequestProblem {
        parse_request(params).unwrap_err()
    }

    fn member(patient: Value) -> MemberRecord {
        member_from_patient(&patient).unwrap()
    }

    fn request_for(member_patient: Value, subscriber_id: &str) -> MatchRequest {
        MatchRequest {
            member_patient,
            coverage_to_match: coverage("old", "Patient/1", subscriber_id),
            coverage_to_link: None,
            consent: None,
        }
    }

    fn probe_for(member_patient: Value) -> Probe {
        probe(&request_for(member_patient, "SUB-1"))
    }

    fn matched(patient_id: &str, rule: Rule) -> Verdict {
        Verdict::Matched { patient_id: patient_id.into(), rule }
    }

    // ---- parsing ----

    #[test]
    fn seed_request_parses_with_old_names() {
        let params: Value = serde_json::from_str(SEED_REQUEST).unwrap();
        let req = parse_request(&params).unwrap();
        assert_eq!(req.member_patient["id"], "1");
        assert_eq!(req.coverage_to_match["id"], "9876B1");
        assert_eq!(req.coverage_to_link.as_ref().unwrap()["id"], "AA87654");
        assert_eq!(req.consent, None);
        // NewCoverage's payor is a contained Organization.
        assert_eq!(requester_identifiers(req.coverage_to_link.as_ref().unwrap()), vec![npi(NEW_PAYER_NPI)]);
        let probe = probe(&req);
        let values: Vec<&str> = probe.identifiers.iter().map(|k| k.value.as_str()).collect();
        assert_eq!(values, ["564730725596728", "DH10001235"]);
        assert_eq!(probe.member.families, ["parker"]);
        assert_eq!(probe.member.birth_date.as_deref(), Some("1937-07-28"));
    }

    #[test]
    fn hrex_names_parse() {
        let req = parse_request(&hrex_request()).unwrap();
        assert_eq!(req.member_patient, member_patient());
        assert_eq!(req.coverage_to_match["id"], "old");
        assert_eq!(req.coverage_to_link.unwrap()["id"], "new");
        assert_eq!(req.consent.unwrap()["resourceType"], "Consent");
    }

    #[test]
    fn body_must_be_parameters() {
        let p = problem(&member_patient());
        assert_eq!(p.status, 400);
        assert!(p.message.contains("Parameters") && p.message.contains("Patient"), "{}", p.message);
    }

    #[test]
    fn missing_member_patient_is_400() {
        let p = problem(&params(vec![("CoverageToMatch", coverage("old", "Patient/1", "SUB-1"))]));
        assert_eq!(p.status, 400);
        assert!(p.message.contains("MemberPatient"), "{}", p.message);
        assert_eq!(p.expression, "Parameters.parameter");
    }

    #[test]
    fn missing_coverage_to_match_is_400() {
        let p = problem(&params(vec![("MemberPatient", member_patient())]));
        assert_eq!(p.status, 400);
        assert!(p.message.contains("CoverageToMatch"), "{}", p.message);
    }

    #[test]
    fn coverage_under_new_and_old_name_is_a_duplicate() {
        let p = problem(&params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1")),
            ("OldCoverage", coverage("old2", "Patient/1", "SUB-1")),
        ]));
        assert_eq!(p.status, 400);
        assert!(p.message.contains("OldCoverage"), "{}", p.message);
        assert_eq!(p.expression, "Parameters.parameter[2]");
    }

    #[test]
    fn wrong_resource_type_is_400() {
        let p = problem(&params(vec![("MemberPatient", member_patient()), ("CoverageToMatch", member_patient())]));
        assert_eq!(p.status, 400);
        assert!(p.message.contains("CoverageToMatch must be a Coverage"), "{}", p.message);
        assert_eq!(p.expression, "Parameters.parameter[1]");
    }

    #[test]
    fn unknown_parameter_is_400() {
        let p = problem(&params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1")),
            ("Subscriber", member_patient()),
        ]));
        assert_eq!(p.status, 400);
        assert!(p.message.contains("'Subscriber'"), "{}", p.message);
        assert_eq!(p.expression, "Parameters.parameter[2]");
    }

    #[test]
    fn beneficiary_naming_another_patient_is_422() {
        let p = problem(&params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/other", "SUB-1")),
        ]));
        assert_eq!(p.status, 422);
        assert_eq!(p.expression, "Parameters.parameter[1].resource.beneficiary");
        assert!(p.message.contains("Patient/other"), "{}", p.message);
    }

    #[test]
    fn absolute_link_beneficiary_is_422() {
        let p = problem(&params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1")),
            ("CoverageToLink", link_coverage("http://example.org/Patient/1")),
        ]));
        assert_eq!(p.status, 422);
        assert_eq!(p.expression, "Parameters.parameter[2].resource.beneficiary");
    }

    #[test]
    fn consent_patient_must_be_the_member_patient() {
        let mut c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        c["patient"]["reference"] = json!("Patient/2");
        let p = problem(&params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1")),
            ("NewCoverage", link_coverage("Patient/1")),
            ("Consent", c),
        ]));
        assert_eq!(p.status, 422);
        assert_eq!(p.expression, "Parameters.parameter[3].resource.patient");
    }

    #[test]
    fn member_patient_without_id_cannot_be_referenced() {
        let mut mp = member_patient();
        mp.as_object_mut().unwrap().remove("id");
        let p =
            problem(&params(vec![("MemberPatient", mp), ("CoverageToMatch", coverage("old", "Patient/1", "SUB-1"))]));
        assert_eq!(p.status, 422);
        assert!(p.message.contains("no id"), "{}", p.message);
    }

    #[test]
    fn bare_id_and_versioned_references_are_local() {
        let ok = params(vec![
            ("MemberPatient", member_patient()),
            ("CoverageToMatch", coverage("old", "1", "SUB-1")),
            ("CoverageToLink", link_coverage("Patient/1/_history/3")),
        ]);
        assert!(parse_request(&ok).is_ok());
        let contained =
            params(vec![("MemberPatient", member_patient()), ("CoverageToMatch", coverage("old", "#1", "SUB-1"))]);
        assert_eq!(problem(&contained).status, 422);
    }

    #[test]
    fn member_bundle_parts_parse_and_need_consent() {
        let request = hrex_request();
        let bundle = json!({"name": "MemberBundle", "part": request["parameter"].clone()});
        let req = parse_member_bundle(&bundle, "Parameters.parameter[4]").unwrap();
        assert_eq!(req.coverage_to_match["id"], "old");
        assert!(req.consent.is_some());

        let mut without_consent = bundle.clone();
        without_consent["part"].as_array_mut().unwrap().pop();
        let p = parse_member_bundle(&without_consent, "Parameters.parameter[4]").unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.message.contains("Consent"), "{}", p.message);
        assert_eq!(p.expression, "Parameters.parameter[4].part");

        let mut foreign = bundle;
        foreign["part"][1]["resource"]["beneficiary"]["reference"] = json!("Patient/9");
        let p = parse_member_bundle(&foreign, "Parameters.parameter[4]").unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.expression, "Parameters.parameter[4].part[1].resource.beneficiary");
    }

    // ---- normalization and index entries ----

    #[test]
    fn names_normalize_accents_case_and_punctuation() {
        assert_eq!(normalize_name("José"), "jose");
        assert_eq!(normalize_name("JOSÉ"), normalize_name("jose"));
        assert_eq!(normalize_name("O'Brien"), "obrien");
        assert_eq!(normalize_name("Smith-Jones"), "smithjones");
        assert_eq!(normalize_name("Smith Jones"), normalize_name("Smith-Jones"));
        assert_eq!(normalize_name(" Núñez Jr. "), "nunezjr");
        assert_eq!(normalize_name("Zoë"), "zoe");
    }

    #[test]
    fn given_names_split_into_tokens() {
        let record = member(patient("1", "Smith-Jones", &["Mary-Jane", "Lou Ellen"], "1980-01-01"));
        assert_eq!(record.given, ["mary", "jane", "lou", "ellen"]);
        assert_eq!(record.families, ["smithjones"]);
    }

    #[test]
    fn hyphenated_given_matches_separate_given_names() {
        let probe = probe_for(patient("1", "Smith Jones", &["Mary-Jane"], "1980-01-01"));
        let candidate = member(patient("p7", "Smith-Jones", &["Mary", "Jane"], "1980-01-01"));
        assert_eq!(decide(&probe, &[candidate], &[]), matched("p7", Rule::Identifier));
    }

    #[test]
    fn patient_record_keeps_contacts_and_identifiers() {
        let p = json!({
            "resourceType": "Patient",
            "id": "p1",
            "name": [{"family": "Ávila", "given": ["Ana"]}],
            "gender": "Female",
            "birthDate": "1990-02-03",
            "address": [{"postalCode": "90210-1234"}, {"postalCode": " 10001 "}],
            "telecom": [
                {"system": "phone", "value": "+1 (555) 123-4567"},
                {"system": "email", "value": " Ana.Avila@Example.ORG "},
                {"system": "url", "value": "https://example.org"}
            ],
            "identifier": [{"system": "urn:x", "value": "A1"}, {"system": "urn:y"}]
        });
        let record = member(p);
        assert_eq!(record.patient_id, "p1");
        assert_eq!(record.families, ["avila"]);
        assert_eq!(record.gender.as_deref(), Some("female"));
        assert_eq!(record.postal_codes, ["90210", "10001"]);
        assert_eq!(record.telecoms, ["5551234567", "ana.avila@example.org"]);
        assert_eq!(record.identifiers, [IdKey { system: Some("urn:x".into()), value: "A1".into() }]);
        assert_eq!(record.member_identifier, Some(IdKey { system: Some("urn:x".into()), value: "A1".into() }));
        assert_eq!(member_from_patient(&json!({"resourceType": "Patient"})), None);
    }

    #[test]
    fn member_identifier_prefers_mb_then_mc_then_mr() {
        let typed = |code: &str, value: &str| {
            json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": code}]},
                   "system": format!("urn:{code}"), "value": value})
        };
        let p = json!({"identifier": [json!({"system": "urn:plain", "value": "P"}), typed("MR", "R"), typed("MC", "C"), typed("MB", "B")]});
        assert_eq!(member_identifier(&p).unwrap().value, "B");
        let p = json!({"identifier": [typed("MR", "R"), typed("MC", "C")]});
        assert_eq!(member_identifier(&p).unwrap().value, "C");
        let p = json!({"identifier": [json!({"system": "urn:plain", "value": "P"}), typed("MR", "R")]});
        assert_eq!(member_identifier(&p).unwrap().value, "R");
        let p = json!({"identifier": [json!({"system": "urn:none"}), typed("UMB", "theirs"), json!({"value": "P"})]});
        assert_eq!(member_identifier(&p), Some(IdKey { system: None, value: "P".into() }));
    }

    #[test]
    fn coverage_record_reads_relative_beneficiary_only() {
        let mut c = coverage("c1", "Patient/7/_history/3", "SUB-9");
        c["contained"] =
            json!([{"resourceType": "Organization", "id": "payer", "identifier": [{"system": NPI, "value": "111"}]}]);
        c["payor"] = json!([{"reference": "#payer"}, {"reference": "Organization/acme"}]);
        c["period"] = json!({"start": "2020-01-01"});
        let record = coverage_from(&c).unwrap();
        assert_eq!(record.coverage_id, "c1");
        assert_eq!(record.beneficiary.as_deref(), Some("7"));
        assert_eq!(record.subscriber_id.as_deref(), Some("SUB-9"));
        assert_eq!(record.payors, ["111", "Organization/acme"]);
        assert_eq!(record.period_start.as_deref(), Some("2020-01-01"));
        assert_eq!(record.period_end, None);
        assert_eq!(record.status.as_deref(), Some("active"));
        let absolute = coverage("c2", "http://example.org/Patient/7", "SUB-9");
        assert_eq!(coverage_from(&absolute).unwrap().beneficiary, None);
    }

    // ---- matching ----

    #[test]
    fn probe_includes_subscriber_id_without_system() {
        let mut mp = member_patient();
        mp["identifier"] = json!([{"system": "urn:mb", "value": "M1"}]);
        let mut req = request_for(mp, "SUB-1");
        req.coverage_to_match["identifier"] =
            json!([{"system": "urn:cov", "value": "C1"}, {"system": "urn:mb", "value": "M1"}]);
        let probe = probe(&req);
        assert_eq!(
            probe.identifiers,
            [
                IdKey { system: Some("urn:mb".into()), value: "M1".into() },
                IdKey { system: Some("urn:cov".into()), value: "C1".into() },
                IdKey { system: None, value: "SUB-1".into() },
            ]
        );
    }

    #[test]
    fn one_member_found_by_subscriber_id_matches() {
        let probe = probe_for(member_patient());
        let found = member(patient("p1", "PERSON", &["Patricia"], "1974-12-25"));
        assert_eq!(decide(&probe, &[found.clone(), found], &[]), matched("p1", Rule::Identifier));
    }

    fn period(start: Option<&str>, end: Option<&str>) -> Period {
        Period { start: start.map(str::to_string), end: end.map(str::to_string) }
    }

    #[test]
    fn periods_overlap_at_the_coarser_precision() {
        let y2024 = period(Some("2024-01-01"), Some("2024-12-31"));
        assert!(y2024.overlaps(&period(Some("2024-12-31"), None)), "a shared last day");
        assert!(!y2024.overlaps(&period(Some("2025-01-01"), None)));
        assert!(y2024.overlaps(&period(None, Some("2024"))), "a year-precision end");
        assert!(!y2024.overlaps(&period(None, Some("2023-12-31"))));
        assert!(period(None, None).overlaps(&y2024), "open both ways");
        assert!(period(Some("2024-06-01T00:00:00Z"), None).overlaps(&y2024), "dateTime bounds");
    }

    #[test]
    fn coverage_to_match_period_must_meet_a_coverage_here() {
        let mut req = request_for(member_patient(), "SUB-1");
        req.coverage_to_match["period"] = json!({"start": "2023-01-01", "end": "2023-12-31"});
        let probe = probe(&req);
        assert_eq!(probe.coverage_period, Some(period(Some("2023-01-01"), Some("2023-12-31"))));
        let mut found = member(patient("p1", "PERSON", &["Patricia"], "1974-12-25"));
        // No coverage period known here: the period is no evidence against the member.
        assert_eq!(decide(&probe, &[found.clone()], &[]), matched("p1", Rule::Identifier));
        found.coverage_periods = vec![period(Some("2020-01-01"), Some("2021-12-31"))];
        let verdict = decide(&probe, &[found.clone()], &[]);
        let Verdict::NoMatch { reason } = verdict else { panic!("expected NoMatch, got {verdict:?}") };
        assert!(reason.contains("CoverageToMatch.period") && !reason.contains("2020"), "{reason}");
        found.coverage_periods.push(period(Some("2023-07-01"), None));
        assert_eq!(decide(&probe, &[found.clone()], &[]), matched("p1", Rule::Identifier));
        // Two members by demographics, one covered then: the period tells them apart.
        let mut other = member(patient("p2", "PERSON", &["Patricia"], "1974-12-25"));
        other.coverage_periods = vec![period(Some("2010-01-01"), Some("2011-01-01"))];
        let mut by_name = req.clone();
        by_name.coverage_to_match.as_object_mut().unwrap().remove("subscriberId");
        assert_eq!(decide(&super::probe(&by_name), &[], &[found, other]), matched("p1", Rule::Demographics));
    }

    #[test]
    fn identifier_found_but_birth_date_differs_is_no_match() {
        let probe = probe_for(member_patient());
        let found = member(patient("p1", "Person", &["Patricia"], "1975-12-25"));
        let other = member(patient("p2", "Person", &["Patricia"], "1974-12-25"));
        let verdict = decide(&probe, &[found], &[other]);
        let Verdict::NoMatch { reason } = verdict else { panic!("expected NoMatch, got {verdict:?}") };
        assert_eq!(reason, DEMOGRAPHICS_DIFFER);
        assert!(!reason.contains("birth"));
    }

    #[test]
    fn shared_subscriber_id_matches_the_member_with_the_birth_date() {
        let probe = probe_for(member_patient());
        let parent = member(patient("parent", "Person", &["Patricia"], "1950-03-01"));
        let child = member(patient("child", "Person", &["Patricia"], "1974-12-25"));
        assert_eq!(decide(&probe, &[parent.clone(), child.clone()], &[]), matched("child", Rule::Identifier));
        assert_eq!(decide(&probe, &[child, parent], &[]), matched("child", Rule::Identifier));
    }

    #[test]
    fn twins_are_told_apart_by_given_name() {
        let ann = member(patient("ann", "Person", &["Ann"], "2001-05-05"));
        let beth = member(patient("beth", "Person", &["Beth"], "2001-05-05"));
        let twins = [ann, beth];
        let ask = |given: &str| decide(&probe_for(patient("1", "Person", &[given], "2001-05-05")), &twins, &[]);
        assert_eq!(ask("Ann"), matched("ann", Rule::Identifier));
        assert_eq!(ask("Beth"), matched("beth", Rule::Identifier));
        assert!(matches!(ask("Cara"), Verdict::NoMatch { .. }));
    }

    #[test]
    fn two_members_with_the_same_demographics_are_multiple() {
        let probe = probe_for(member_patient());
        let a = member(patient("a", "Person", &["Patricia"], "1974-12-25"));
        let b = member(patient("b", "Person", &["Patricia", "Ann"], "1974-12-25"));
        assert_eq!(
            decide(&probe, &[], &[a.clone(), b.clone()]),
            Verdict::Multiple { rule: Rule::Demographics, count: 2 }
        );
        assert_eq!(decide(&probe, &[a.clone(), b], &[]), Verdict::Multiple { rule: Rule::Identifier, count: 2 });
        assert_eq!(decide(&probe, &[], &[a.clone(), a]), matched("a", Rule::Demographics));
    }

    #[test]
    fn demographic_matches_are_narrowed_by_postal_code() {
        let mut mp = member_patient();
        mp["address"] = json!([{"postalCode": "90210-0001"}]);
        let probe = probe_for(mp);
        let mut here = patient("here", "Person", &["Patricia"], "1974-12-25");
        here["address"] = json!([{"postalCode": "90210"}]);
        let mut there = patient("there", "Person", &["Patricia"], "1974-12-25");
        there["address"] = json!([{"postalCode": "10001"}]);
        let candidates = [member(there), member(here)];
        assert_eq!(decide(&probe, &[], &candidates), matched("here", Rule::Demographics));
        // Without a postal code in the request there is nothing to narrow by.
        assert_eq!(
            decide(&probe_for(member_patient()), &[], &candidates),
            Verdict::Multiple { rule: Rule::Demographics, count: 2 }
        );
    }

    #[test]
    fn demographics_need_a_birth_date_in_the_request() {
        let mut mp = member_patient();
        mp.as_object_mut().unwrap().remove("birthDate");
        let candidate = member(patient("p1", "Person", &["Patricia"], "1974-12-25"));
        assert_eq!(
            decide(&probe_for(mp), &[], std::slice::from_ref(&candidate)),
            Verdict::NoMatch { reason: NO_MEMBER.into() }
        );
        assert_eq!(decide(&probe_for(member_patient()), &[], &[candidate]), matched("p1", Rule::Demographics));
    }

    #[test]
    fn gender_must_agree_unless_unknown() {
        let probe = probe_for(member_patient());
        let mut male = patient("p1", "Person", &["Patricia"], "1974-12-25");
        male["gender"] = json!("male");
        assert!(matches!(decide(&probe, &[member(male.clone())], &[]), Verdict::NoMatch { .. }));
        male["gender"] = json!("unknown");
        assert_eq!(decide(&probe, &[member(male)], &[]), matched("p1", Rule::Identifier));
    }

    #[test]
    fn nobody_found_is_no_match() {
        assert_eq!(decide(&probe_for(member_patient()), &[], &[]), Verdict::NoMatch { reason: NO_MEMBER.into() });
    }

    // ---- consent ----

    fn payer_policy() -> ConsentPolicy {
        ConsentPolicy { supported: vec![POLICY_REGULAR.into()], payer_identifiers: vec![npi(OLD_PAYER_NPI)] }
    }

    fn judge(consent: &Value, requester: &[IdKey]) -> Result<ConsentTerms, String> {
        check_consent(consent, &member_patient(), requester, &payer_policy(), TODAY)
    }

    fn refusal(consent: &Value) -> String {
        judge(consent, &[npi(NEW_PAYER_NPI)]).unwrap_err()
    }

    #[test]
    fn consent_is_honoured() {
        let c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        assert_eq!(
            judge(&c, &[npi(NEW_PAYER_NPI)]),
            Ok(ConsentTerms {
                policy: POLICY_REGULAR.into(),
                period_start: Some("2024-01-01".into()),
                period_end: Some("2024-12-31".into()),
            })
        );
    }

    #[test]
    fn consent_period_bounds_are_inclusive_days() {
        let c = consent(POLICY_REGULAR, "2024-06-15T09:00:00-05:00", "2024-06-15T10:00:00Z", NEW_PAYER_NPI);
        assert!(judge(&c, &[npi(NEW_PAYER_NPI)]).is_ok());
    }

    #[test]
    fn expired_consent_is_refused() {
        let reason = refusal(&consent(POLICY_REGULAR, "2024-01-01", "2024-06-14", NEW_PAYER_NPI));
        assert!(reason.contains("expired") && reason.contains("2024-06-14"), "{reason}");
    }

    #[test]
    fn future_consent_is_refused() {
        let reason = refusal(&consent(POLICY_REGULAR, "2024-06-16", "2025-06-16", NEW_PAYER_NPI));
        assert!(reason.contains("not yet in force"), "{reason}");
    }

    #[test]
    fn consent_without_period_is_refused() {
        let mut c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        c["provision"].as_object_mut().unwrap().remove("period");
        assert!(refusal(&c).contains("provision.period"));
    }

    #[test]
    fn sensitive_policy_is_refused_when_only_regular_is_supported() {
        let reason = refusal(&consent(POLICY_SENSITIVE, "2024-01-01", "2024-12-31", NEW_PAYER_NPI));
        assert!(reason.contains(POLICY_REGULAR) && reason.contains(POLICY_SENSITIVE), "{reason}");
    }

    #[test]
    fn inactive_or_deny_consent_is_refused() {
        let mut c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        c["status"] = json!("inactive");
        assert!(refusal(&c).contains("inactive"));
        let mut c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        c["provision"]["type"] = json!("deny");
        assert!(refusal(&c).contains("deny"));
    }

    #[test]
    fn consent_for_another_recipient_is_refused() {
        let reason = refusal(&consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", "1111111111"));
        assert!(reason.contains("recipients") && reason.contains("1111111111"), "{reason}");
    }

    #[test]
    fn consent_recipient_may_be_a_contained_organization() {
        let mut c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", "1111111111");
        c["contained"] = json!([{"resourceType": "Organization", "id": "new", "identifier": [{"system": NPI, "value": NEW_PAYER_NPI}]}]);
        c["provision"]["actor"][1]["reference"] = json!({"reference": "#new"});
        assert!(judge(&c, &[npi(NEW_PAYER_NPI)]).is_ok());
    }

    #[test]
    fn consent_without_requester_is_refused() {
        let c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        let reason = judge(&c, &[]).unwrap_err();
        assert!(reason.contains("cannot be verified") && reason.contains("CoverageToLink"), "{reason}");
    }

    #[test]
    fn consent_must_name_this_payer_as_source_when_configured() {
        let c = consent(POLICY_REGULAR, "2024-01-01", "2024-12-31", NEW_PAYER_NPI);
        let other_payer = ConsentPolicy { payer_identifiers: vec![npi("5555555555")], ..payer_policy() };
        let reason = check_consent(&c, &member_patient(), &[npi(NEW_PAYER_NPI)], &other_payer, TODAY).unwrap_err();
        assert!(reason.contains("performer"), "{reason}");
    }

    #[test]
    fn requester_comes_from_link_payor() {
        let mut link = link_coverage("Patient/1");
        link["contained"] =
            json!([{"resourceType": "Organization", "id": "p", "identifier": [{"system": NPI, "value": "222"}]}]);
        link["payor"] = json!([{"reference": "#p"}, {"identifier": {"system": NPI, "value": NEW_PAYER_NPI}}]);
        assert_eq!(requester_identifiers(&link), [npi("222"), npi(NEW_PAYER_NPI)]);
    }

    // ---- hashes ----

    #[test]
    fn request_hash_ignores_key_order() {
        let a: Value = serde_json::from_str(
            r#"{"resourceType":"Patient","id":"1","name":[{"family":"Person","given":["Ann"]}],"birthDate":"1974-12-25"}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"birthDate":"1974-12-25","name":[{"given":["Ann"],"family":"Person"}],"id":"1","resourceType":"Patient"}"#,
        )
        .unwrap();
        let hash = |p: Value| request_hash(&request_for(p, "SUB-1"), &[]);
        assert_eq!(hash(a.clone()), hash(b));
        assert_eq!(hash(a.clone()).len(), 64);
        let mut changed = a.clone();
        changed["birthDate"] = json!("1974-12-26");
        assert_ne!(hash(a), hash(changed));
    }

    #[test]
    fn request_hash_sees_every_input() {
        let base = parse_request(&hrex_request()).unwrap();
        let mut without_consent = base.clone();
        without_consent.consent = None;
        let mut other_link = base.clone();
        other_link.coverage_to_link.as_mut().unwrap()["id"] = json!("new2");
        let mut other_match = base.clone();
        other_match.coverage_to_match["subscriberId"] = json!("SUB-2");
        let hashes = [&base, &without_consent, &other_link, &other_match].map(|r| request_hash(r, &[]));
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn old_and_new_names_hash_alike() {
        let params: Value = serde_json::from_str(SEED_REQUEST).unwrap();
        let mut renamed = params.clone();
        renamed["parameter"][1]["name"] = json!("CoverageToMatch");
        renamed["parameter"][2]["name"] = json!("CoverageToLink");
        let (a, b) = (parse_request(&params).unwrap(), parse_request(&renamed).unwrap());
        assert_eq!(request_hash(&a, &[]), request_hash(&b, &[]));
        let payer = IdKey { system: Some("http://hl7.org/fhir/sid/us-npi".into()), value: "1".into() };
        assert_ne!(request_hash(&a, &[]), request_hash(&a, &[payer]), "another requesting payer, another request");
    }

    #[test]
    fn input_hashes_hide_values_and_ignore_order() {
        let mut p1 = probe_for(member_patient());
        let (ids, demo) = input_hashes(&p1);
        assert_eq!(ids.len(), 64);
        assert!(ids.chars().all(|c| c.is_ascii_hexdigit()));
        p1.identifiers.insert(0, IdKey { system: Some("urn:a".into()), value: "Z".into() });
        let (ids_more, _) = input_hashes(&p1);
        assert_ne!(ids, ids_more);
        p1.identifiers.rotate_left(1);
        assert_eq!(input_hashes(&p1).0, ids_more);
        p1.member.birth_date = Some("1974-12-26".into());
        assert_ne!(input_hashes(&p1).1, demo);
    }
}
