//! The search parameters payerx serves: one table, read by the resource projection (which index
//! rows to keep), the query planner (what a parameter means) and the CapabilityStatement.
//!
//! To add a parameter, add a row: its FHIR code, the resource type, the type, the element path
//! (a FHIRPath subset: `Type.a.b`, unions with `|`, choice types as `x[x]`), the reference
//! targets, and the canonical URL of its SearchParameter. Then `payerx replay --projection
//! resources` indexes what was written before.

use std::collections::HashMap;
use std::sync::OnceLock;

/// `SearchParameter.type`, the ones payerx indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Token,
    String,
    Date,
    Reference,
    Uri,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::String => "string",
            ParamType::Date => "date",
            ParamType::Reference => "reference",
            ParamType::Uri => "uri",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct SearchParam {
    pub code: &'static str,
    pub base: &'static str,
    pub kind: ParamType,
    /// FHIRPath subset, e.g. `ExplanationOfBenefit.billablePeriod | ExplanationOfBenefit.item.serviced[x]`.
    pub expression: &'static str,
    /// Reference targets; a reference to another type is not indexed (FHIR's `where(resolve() is …)`).
    pub targets: &'static [&'static str],
    /// Canonical URL of the SearchParameter.
    pub definition: &'static str,
}

impl SearchParam {
    /// The element paths, relative to the resource: `[["billablePeriod"], ["item", "serviced[x]"]]`.
    pub fn paths(&self) -> Vec<Vec<&'static str>> {
        self.expression
            .split('|')
            .filter_map(|p| {
                let mut segs = p.trim().split('.');
                let head = segs.next()?;
                (head == self.base).then(|| segs.collect::<Vec<_>>()).filter(|s| !s.is_empty())
            })
            .collect()
    }
}

macro_rules! params {
    ($( $base:literal $code:literal $kind:ident $expr:literal [$($t:literal),*] $prefix:ident $def:literal ;)*) => {
        &[$( SearchParam {
            code: $code,
            base: $base,
            kind: ParamType::$kind,
            expression: $expr,
            targets: &[$($t),*],
            definition: concat_def!($prefix, $def),
        } ),*]
    };
}

macro_rules! concat_def {
    (HL7, $d:literal) => {
        concat!("http://hl7.org/fhir/SearchParameter/", $d)
    };
    (CARIN, $d:literal) => {
        concat!("http://hl7.org/fhir/us/carin-bb/SearchParameter/", $d)
    };
}

/// Standard FHIR R4 names; CARIN BB where R4 has none for ExplanationOfBenefit.
pub static PARAMS: &[SearchParam] = params![
    "Patient" "identifier" Token "Patient.identifier" [] HL7 "Patient-identifier";
    "Patient" "family" String "Patient.name.family" [] HL7 "individual-family";
    "Patient" "given" String "Patient.name.given" [] HL7 "individual-given";
    "Patient" "name" String "Patient.name" [] HL7 "Patient-name";
    "Patient" "birthdate" Date "Patient.birthDate" [] HL7 "individual-birthdate";
    "Patient" "gender" Token "Patient.gender" [] HL7 "individual-gender";
    "Coverage" "identifier" Token "Coverage.identifier" [] HL7 "Coverage-identifier";
    "Coverage" "patient" Reference "Coverage.beneficiary" ["Patient"] HL7 "Coverage-patient";
    "Coverage" "beneficiary" Reference "Coverage.beneficiary" ["Patient"] HL7 "Coverage-beneficiary";
    "Coverage" "subscriber" Reference "Coverage.subscriber" ["Patient", "RelatedPerson"] HL7 "Coverage-subscriber";
    "Coverage" "payor" Reference "Coverage.payor" ["Organization", "Patient", "RelatedPerson"] HL7 "Coverage-payor";
    "Coverage" "status" Token "Coverage.status" [] HL7 "Coverage-status";
    "Claim" "identifier" Token "Claim.identifier" [] HL7 "Claim-identifier";
    "Claim" "patient" Reference "Claim.patient" ["Patient"] HL7 "Claim-patient";
    "Claim" "use" Token "Claim.use" [] HL7 "Claim-use";
    "Claim" "status" Token "Claim.status" [] HL7 "Claim-status";
    "Claim" "created" Date "Claim.created" [] HL7 "Claim-created";
    "Claim" "provider" Reference "Claim.provider" ["Practitioner", "Organization", "PractitionerRole"] HL7 "Claim-provider";
    "Claim" "insurer" Reference "Claim.insurer" ["Organization"] HL7 "Claim-insurer";
    "ClaimResponse" "identifier" Token "ClaimResponse.identifier" [] HL7 "ClaimResponse-identifier";
    "ClaimResponse" "request" Reference "ClaimResponse.request" ["Claim"] HL7 "ClaimResponse-request";
    "ClaimResponse" "patient" Reference "ClaimResponse.patient" ["Patient"] HL7 "ClaimResponse-patient";
    "ClaimResponse" "outcome" Token "ClaimResponse.outcome" [] HL7 "ClaimResponse-outcome";
    "ClaimResponse" "created" Date "ClaimResponse.created" [] HL7 "ClaimResponse-created";
    "DocumentReference" "identifier" Token "DocumentReference.masterIdentifier | DocumentReference.identifier" [] HL7 "clinical-identifier";
    "DocumentReference" "patient" Reference "DocumentReference.subject" ["Patient"] HL7 "clinical-patient";
    "DocumentReference" "subject" Reference "DocumentReference.subject" ["Patient", "Practitioner", "Group", "Device"] HL7 "DocumentReference-subject";
    "DocumentReference" "related" Reference "DocumentReference.context.related" [] HL7 "DocumentReference-related";
    "DocumentReference" "type" Token "DocumentReference.type" [] HL7 "clinical-type";
    "DocumentReference" "category" Token "DocumentReference.category" [] HL7 "DocumentReference-category";
    "DocumentReference" "date" Date "DocumentReference.date" [] HL7 "DocumentReference-date";
    "DocumentReference" "status" Token "DocumentReference.status" [] HL7 "DocumentReference-status";
    "ExplanationOfBenefit" "identifier" Token "ExplanationOfBenefit.identifier" [] HL7 "ExplanationOfBenefit-identifier";
    "ExplanationOfBenefit" "patient" Reference "ExplanationOfBenefit.patient" ["Patient"] HL7 "ExplanationOfBenefit-patient";
    "ExplanationOfBenefit" "type" Token "ExplanationOfBenefit.type" [] CARIN "explanationofbenefit-type";
    "ExplanationOfBenefit" "created" Date "ExplanationOfBenefit.created" [] HL7 "ExplanationOfBenefit-created";
    "ExplanationOfBenefit" "service-date" Date "ExplanationOfBenefit.billablePeriod | ExplanationOfBenefit.item.serviced[x]" [] CARIN "explanationofbenefit-service-date";
    "ExplanationOfBenefit" "service-start-date" Date "ExplanationOfBenefit.billablePeriod.start | ExplanationOfBenefit.item.servicedDate | ExplanationOfBenefit.item.servicedPeriod.start" [] CARIN "explanationofbenefit-service-start-date";
    "ExplanationOfBenefit" "billable-period-start" Date "ExplanationOfBenefit.billablePeriod.start" [] CARIN "explanationofbenefit-billable-period-start";
    "ExplanationOfBenefit" "provider" Reference "ExplanationOfBenefit.provider" ["Practitioner", "Organization", "PractitionerRole"] HL7 "ExplanationOfBenefit-provider";
    "ExplanationOfBenefit" "coverage" Reference "ExplanationOfBenefit.insurance.coverage" ["Coverage"] HL7 "ExplanationOfBenefit-coverage";
    "ExplanationOfBenefit" "claim" Reference "ExplanationOfBenefit.claim" ["Claim"] HL7 "ExplanationOfBenefit-claim";
    "ExplanationOfBenefit" "insurer" Reference "ExplanationOfBenefit.insurer" ["Organization"] CARIN "explanationofbenefit-insurer";
    "ExplanationOfBenefit" "payee" Reference "ExplanationOfBenefit.payee.party" ["Practitioner", "Organization", "PractitionerRole", "Patient", "RelatedPerson"] HL7 "ExplanationOfBenefit-payee";
    "ExplanationOfBenefit" "care-team" Reference "ExplanationOfBenefit.careTeam.provider" ["Practitioner", "Organization", "PractitionerRole"] HL7 "ExplanationOfBenefit-care-team";
    "Organization" "identifier" Token "Organization.identifier" [] HL7 "Organization-identifier";
    "Organization" "name" String "Organization.name | Organization.alias" [] HL7 "Organization-name";
    "Practitioner" "identifier" Token "Practitioner.identifier" [] HL7 "Practitioner-identifier";
    "Practitioner" "name" String "Practitioner.name" [] HL7 "Practitioner-name";
    "Group" "identifier" Token "Group.identifier" [] HL7 "Group-identifier";
    "Group" "member" Reference "Group.member.entity" ["Patient", "Practitioner", "PractitionerRole", "Device", "Medication", "Substance", "Group"] HL7 "Group-member";
    "Questionnaire" "url" Uri "Questionnaire.url" [] HL7 "Questionnaire-url";
    "Questionnaire" "status" Token "Questionnaire.status" [] HL7 "Questionnaire-status";
    "Provenance" "target" Reference "Provenance.target" [] HL7 "Provenance-target";
    "Provenance" "patient" Reference "Provenance.target" ["Patient"] HL7 "Provenance-patient";
];

/// Parameters whose values always include every value of narrower parameters of the same type:
/// `Patient.name` covers its `family` and `given` parts, and Coverage `patient` is the same
/// element as `beneficiary`. The projection stores a shared value once, under the narrower
/// parameter, and the planner reads a parameter's rows together with those of the parameters it
/// covers ([`row_codes`]): a Patient had four index rows of its names twice, a Coverage its
/// beneficiary twice. (A view built before keeps its extra rows; they match the same searches.)
pub static COVERS: &[(&str, &str, &[&str])] =
    &[("Patient", "name", &["family", "given"]), ("Coverage", "patient", &["beneficiary"])];

/// The parameters `code` of `resource_type` covers (see [`COVERS`]).
pub fn covered_by(resource_type: &str, code: &str) -> &'static [&'static str] {
    COVERS.iter().find(|(t, c, _)| *t == resource_type && *c == code).map_or(&[], |(_, _, covered)| covered)
}

/// The `param` values of the index rows that hold the values of parameter `code`.
pub fn row_codes(resource_type: &str, code: &'static str) -> impl Iterator<Item = &'static str> {
    std::iter::once(code).chain(covered_by(resource_type, code).iter().copied())
}

/// Parameters every resource type has, answered from the resource row itself.
pub static COMMON: &[(&str, ParamType, &str)] = &[
    ("_id", ParamType::Token, "http://hl7.org/fhir/SearchParameter/Resource-id"),
    ("_lastUpdated", ParamType::Date, "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"),
];

/// The hidden index parameter that records which patients' compartments a resource is in.
pub const COMPARTMENT: &str = "_compartment";

/// What the projection needs per resource type, computed once.
pub struct TypeIndex {
    pub params: Vec<&'static SearchParam>,
    /// Each parameter with its paths split into segments.
    pub compiled: Vec<(&'static SearchParam, Vec<Vec<&'static str>>)>,
    /// Top-level elements the parameters and the compartment rules read (`serviced[x]` kept as is).
    pub roots: Vec<&'static str>,
}

fn by_type() -> &'static HashMap<&'static str, TypeIndex> {
    static INDEX: OnceLock<HashMap<&'static str, TypeIndex>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut m: HashMap<&str, TypeIndex> = HashMap::new();
        for p in PARAMS {
            let t = m.entry(p.base).or_insert_with(|| TypeIndex { params: vec![], compiled: vec![], roots: vec![] });
            let paths = p.paths();
            t.roots.extend(paths.iter().map(|path| path[0]));
            t.params.push(p);
            t.compiled.push((p, paths));
        }
        for (rtype, t) in m.iter_mut() {
            if *rtype != "Patient" {
                t.roots.extend(schemas::compartment::roots(rtype));
            }
            t.roots.sort_unstable();
            t.roots.dedup();
        }
        m
    })
}

/// The registry's view of a resource type; `None` when it has no indexed parameters.
pub fn type_index(resource_type: &str) -> Option<&'static TypeIndex> {
    by_type().get(resource_type)
}

/// The indexed parameters of a resource type.
pub fn params_of(resource_type: &str) -> &'static [&'static SearchParam] {
    type_index(resource_type).map(|t| t.params.as_slice()).unwrap_or(&[])
}

pub fn lookup(resource_type: &str, code: &str) -> Option<&'static SearchParam> {
    params_of(resource_type).iter().copied().find(|p| p.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_per_type_and_paths_parse() {
        let mut seen = std::collections::HashSet::new();
        for p in PARAMS {
            assert!(seen.insert((p.base, p.code)), "{}:{} twice", p.base, p.code);
            assert!(!p.paths().is_empty(), "{}:{} has no path on its own type", p.base, p.code);
            assert!(p.definition.starts_with("http://hl7.org/fhir/"));
            assert_eq!(
                p.kind == ParamType::Reference,
                !p.targets.is_empty() || p.code == "related" || p.code == "target"
            );
        }
        // A covered parameter's values are always values of the covering one: same type, its
        // paths inside the covering parameter's, no reference target the covering one refuses.
        for (base, code, covered) in COVERS {
            let p = lookup(base, code).unwrap_or_else(|| panic!("{base}:{code}"));
            for c in *covered {
                let q = lookup(base, c).unwrap_or_else(|| panic!("{base}:{c}"));
                assert_eq!(p.kind, q.kind, "{base}:{code} / {c}");
                assert!(q.paths().iter().all(|qp| p.paths().iter().any(|pp| qp.starts_with(pp))), "{base}:{c}");
                assert!(p.targets.is_empty() || q.targets.iter().all(|t| p.targets.contains(t)), "{base}:{c}");
                assert!(covered_by(base, c).is_empty(), "{base}:{c} covers too: rows would be dropped twice");
            }
        }
        assert_eq!(row_codes("Patient", "name").collect::<Vec<_>>(), ["name", "family", "given"]);
        assert_eq!(row_codes("Patient", "family").collect::<Vec<_>>(), ["family"]);
        let sd = lookup("ExplanationOfBenefit", "service-date").map(SearchParam::paths);
        assert_eq!(sd, Some(vec![vec!["billablePeriod"], vec!["item", "serviced[x]"]]));
        assert!(lookup("Patient", "nope").is_none());
        assert!(params_of("Basic").is_empty());
    }
}
