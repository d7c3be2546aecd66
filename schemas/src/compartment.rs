//! The FHIR R4 Patient compartment: which reference elements put a resource in a patient's
//! compartment. Generated from HL7's CompartmentDefinition and SearchParameter expressions
//! (`scripts/gen-patient-compartment.py` → `data/patient-compartment.tsv`).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

static TABLE: &str = include_str!("../data/patient-compartment.tsv");

/// resource type → element paths (dot-separated, relative to the resource).
fn index() -> &'static HashMap<&'static str, Vec<Vec<&'static str>>> {
    static INDEX: OnceLock<HashMap<&'static str, Vec<Vec<&'static str>>>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut m: HashMap<&str, Vec<Vec<&str>>> = HashMap::new();
        for line in TABLE.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let mut cols = line.split('\t');
            let (Some(rtype), Some(_param), Some(paths)) = (cols.next(), cols.next(), cols.next()) else { continue };
            let entry = m.entry(rtype).or_default();
            for p in paths.split('|') {
                entry.push(p.split('.').collect());
            }
        }
        m
    })
}

/// Whether resources of this type can belong to a patient's compartment at all. Types outside
/// it (Organization, Practitioner, …) are not patient-specific.
pub fn has_patient_compartment(rtype: &str) -> bool {
    rtype == "Patient" || index().contains_key(rtype)
}

/// The top-level elements whose references decide compartment membership (e.g. `patient`,
/// `payee` for ExplanationOfBenefit): what a caller must keep of a resource for `patients_of`.
pub fn roots(rtype: &str) -> Vec<&'static str> {
    let mut out: Vec<&str> =
        index().get(rtype).map(|ps| ps.iter().filter_map(|p| p.first().copied()).collect()).unwrap_or_default();
    out.sort_unstable();
    out.dedup();
    out
}

fn collect<'a>(v: &'a Value, path: &[&str], out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect(i, path, out)),
        Value::Object(map) => match path.split_first() {
            None => out.push(v),
            Some((first, rest)) => {
                if let Some(child) = map.get(*first) {
                    collect(child, rest, out);
                }
            }
        },
        _ => {}
    }
}

/// `Patient/123`, `https://host/fhir/Patient/123` or `Patient/123/_history/2` → `123`.
pub fn patient_id_of_reference(reference: &str) -> Option<&str> {
    let idx = reference.rfind("Patient/")?;
    if idx > 0 && !reference[..idx].ends_with('/') {
        return None;
    }
    reference[idx + "Patient/".len()..].split('/').next().filter(|id| !id.is_empty())
}

/// The ids of the patients whose compartment `resource` is in.
pub fn patients_of(resource: &Value) -> Vec<String> {
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else { return vec![] };
    if rtype == "Patient" {
        return resource.get("id").and_then(Value::as_str).map(|id| vec![id.to_string()]).unwrap_or_default();
    }
    let Some(paths) = index().get(rtype) else { return vec![] };
    let mut refs = Vec::new();
    for p in paths {
        collect(resource, p, &mut refs);
    }
    let mut out: Vec<String> = refs
        .into_iter()
        .filter_map(|r| r.get("reference").and_then(Value::as_str))
        .filter_map(patient_id_of_reference)
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether `resource` is in the compartment of patient `patient_id`.
pub fn in_patient_compartment(resource: &Value, patient_id: &str) -> bool {
    patients_of(resource).iter().any(|p| p == patient_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_covers_the_payer_resources() {
        for t in
            ["ExplanationOfBenefit", "Coverage", "Claim", "Observation", "Condition", "Encounter", "DocumentReference"]
        {
            assert!(has_patient_compartment(t), "{t}");
        }
        assert!(has_patient_compartment("Patient"));
        assert!(!has_patient_compartment("Organization"));
        assert!(!has_patient_compartment("Practitioner"));
    }

    #[test]
    fn membership_follows_the_compartment_paths() {
        let eob = json!({"resourceType": "ExplanationOfBenefit", "patient": {"reference": "Patient/p1"}, "payee": {"party": {"reference": "Patient/p2"}}});
        assert_eq!(patients_of(&eob), ["p1", "p2"]);
        let cov = json!({"resourceType": "Coverage", "beneficiary": {"reference": "https://payer.example/fhir/Patient/m9"}, "payor": [{"reference": "Organization/o"}]});
        assert!(in_patient_compartment(&cov, "m9"));
        assert!(!in_patient_compartment(&cov, "o"));
        let cond = json!({"resourceType": "Condition", "subject": {"reference": "Group/g1"}});
        assert!(patients_of(&cond).is_empty());
        assert_eq!(roots("ExplanationOfBenefit"), ["patient", "payee"]);
        assert!(roots("Organization").is_empty());
        let p = json!({"resourceType": "Patient", "id": "p1"});
        assert!(in_patient_compartment(&p, "p1") && !in_patient_compartment(&p, "p2"));
        // A reference to a resource merely named like a patient is not one.
        assert_eq!(patient_id_of_reference("RelatedPatient/x"), None);
        assert_eq!(patient_id_of_reference("Patient/a/_history/3"), Some("a"));
    }
}
