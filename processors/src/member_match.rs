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

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// Reads a `$member-match` Parameters (HRex names, and the older `OldCoverage`/`NewCoverage`).
pub fn parse_request(params: &Value) -> Result<MatchRequest, RequestProblem> {
    let _ = params;
    todo!()
}

/// Reads one `MemberBundle` parameter of `$bulk-member-match` (its `part`s).
pub fn parse_member_bundle(param: &Value, at: &str) -> Result<MatchRequest, RequestProblem> {
    let _ = (param, at);
    todo!()
}

/// Normalizes a name part for comparison.
pub fn normalize_name(s: &str) -> String {
    let _ = s;
    todo!()
}

/// The index entry of a stored Patient (`None` when it has no id).
pub fn member_from_patient(patient: &Value) -> Option<MemberRecord> {
    let _ = patient;
    todo!()
}

/// The index entry of a stored Coverage.
pub fn coverage_from(coverage: &Value) -> Option<CoverageRecord> {
    let _ = coverage;
    todo!()
}

/// The identifier returned as `MemberIdentifier`: the Patient's MB (member number) identifier,
/// else MC, else MR, else its first identifier with a value.
pub fn member_identifier(patient: &Value) -> Option<IdKey> {
    let _ = patient;
    todo!()
}

/// What to look up for a request.
pub fn probe(req: &MatchRequest) -> Probe {
    let _ = req;
    todo!()
}

/// Decides from the candidates the host found: `by_identifier` are the members reached through
/// the probe's identifiers (directly or via a Coverage's beneficiary, deduplicated by patient);
/// `by_demographics` are the members with the probe's family name and birth date (looked up only
/// when `by_identifier` is empty).
pub fn decide(probe: &Probe, by_identifier: &[MemberRecord], by_demographics: &[MemberRecord]) -> Verdict {
    let _ = (probe, by_identifier, by_demographics);
    todo!()
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
    let _ = (consent, member_patient, requester, policy, today);
    todo!()
}

/// The organization identifiers of the CoverageToLink's payor(s) (contained Organizations
/// resolved, or `payor.identifier`).
pub fn requester_identifiers(coverage_to_link: &Value) -> Vec<IdKey> {
    let _ = coverage_to_link;
    todo!()
}

/// SHA-256 hex digests of the request's identifiers and of its demographics, for the decision
/// event (analysts can join on them without seeing PHI).
pub fn input_hashes(probe: &Probe) -> (String, String) {
    let _ = probe;
    todo!()
}

/// SHA-256 hex of the request's content (canonical JSON of the four inputs), so a retried
/// request is recognized.
pub fn request_hash(req: &MatchRequest) -> String {
    let _ = req;
    todo!()
}
