#![allow(clippy::unwrap_used, clippy::expect_used)]

use schemas::outcome::{Issue, IssueSeverity, IssueType};
use serde_json::{json, Value};

use super::table::Index;
use super::{is_resource_type, is_valid_id, validate_json, validate_resource, Json, MAX_ISSUES};

const SEEDS: [(&str, &str); 4] = [
    ("seed001-member-match-request.json", include_str!("testdata/seed001-member-match-request.json")),
    ("seed001-member-match-response.json", include_str!("testdata/seed001-member-match-response.json")),
    ("seed001-member-match-failure.json", include_str!("testdata/seed001-member-match-failure.json")),
    ("seed001-everything-provenance.json", include_str!("testdata/seed001-everything-provenance.json")),
];
const PATIENT: &str = include_str!("testdata/carinbb-patient.json");
const COVERAGE: &str = include_str!("testdata/carinbb-coverage.json");
const EOB: &str = include_str!("testdata/carinbb-eob-inpatient.json");

fn parse(s: &str) -> Value {
    serde_json::from_str(s).expect("test fixture is JSON")
}

/// The issues found in `v`; every test also checks that the borrowed tree (`Json`, what load and
/// the validate processor walk) gets exactly the same answer as `serde_json::Value`.
fn issues(v: &Value) -> Vec<Issue> {
    let text = v.to_string();
    let borrowed = validate_json(&Json::parse(&text).expect("serialized JSON parses"));
    let found = match validate_resource(v) {
        Ok(()) => vec![],
        Err(issues) => {
            assert!(!issues.is_empty(), "Err must carry issues");
            issues
        }
    };
    assert_eq!(borrowed.err().unwrap_or_default(), found, "the two trees disagree on {text}");
    found
}

fn assert_valid(name: &str, v: &Value) {
    let found = issues(v);
    assert!(found.is_empty(), "{name} should be valid, got: {found:#?}");
}

/// Exactly one issue, with this code and expression; returns its diagnostics.
fn one(v: &Value, code: IssueType, expression: &str) -> String {
    let found = issues(v);
    assert_eq!(found.len(), 1, "expected one issue at {expression}, got: {found:#?}");
    let issue = &found[0];
    assert_eq!(issue.severity, IssueSeverity::Error);
    assert_eq!(issue.code, code, "{issue:#?}");
    let want: Vec<String> = if expression.is_empty() { vec![] } else { vec![expression.to_string()] };
    assert_eq!(issue.expression, want, "{issue:#?}");
    issue.diagnostics.clone().expect("diagnostics")
}

fn patient(extra: Value) -> Value {
    let mut p = json!({"resourceType": "Patient", "id": "p1"});
    for (k, v) in extra.as_object().expect("object") {
        p[k] = v.clone();
    }
    p
}

// ---- the table ---------------------------------------------------------------------------------

#[test]
fn table_loads_without_problems() {
    let idx = Index::get();
    assert!(idx.problems.is_empty(), "{:#?}", idx.problems);
    assert_eq!(idx.resources.len(), 146, "R4 has 146 concrete resource types");
    for t in [
        "Patient",
        "ExplanationOfBenefit",
        "Coverage",
        "Bundle",
        "Parameters",
        "Binary",
        "OperationOutcome",
        "Provenance",
    ] {
        assert!(is_resource_type(t), "{t}");
    }
    for t in ["Resource", "DomainResource", "SubscriptionStatus", "HumanName", "patient", "Patient.contact", ""] {
        assert!(!is_resource_type(t), "{t}");
    }
    // backbone paths and contentReference targets are types of their own
    for t in [
        "ExplanationOfBenefit.item.adjudication",
        "ExplanationOfBenefit.item.detail.subDetail",
        "Questionnaire.item",
        "Element",
    ] {
        assert!(idx.type_id(t).is_some(), "{t}");
    }
}

/// The per-type name tables find every element the table defines (by name, however long), and
/// nothing else: not near misses that share the first and last eight bytes, a prefix, or a length.
#[test]
fn element_names_are_found_exactly() {
    let idx = Index::get();
    let mut names = 0;
    for td in &idx.types {
        let all: Vec<(String, u16)> = td.elems.iter().map(|(n, e)| (n.to_string(), e.slot)).collect();
        assert_eq!(all.len(), td.elems.len());
        for (name, slot) in &all {
            names += 1;
            assert_eq!(td.elems.get(name).map(|e| e.slot), Some(*slot), "{}.{name}", td.name);
            let mut middle = name.clone().into_bytes();
            if middle.len() > 16 {
                // same first and last eight bytes, same length, different middle
                middle[8] = if middle[8] == b'Q' { b'R' } else { b'Q' };
            }
            for miss in [
                format!("{name}x"),
                format!("_{name}"),
                name[..name.len() - 1].to_string(),
                String::from_utf8(middle).expect("ASCII"),
            ] {
                if !all.iter().any(|(n, _)| *n == miss) {
                    assert!(td.elems.get(&miss).is_none(), "{}: {miss} is not an element", td.name);
                }
            }
        }
        assert!(td.elems.get("").is_none());
    }
    assert!(names > 5000, "{names} element names");
}

#[test]
fn ids() {
    assert!(is_valid_id("c4bb-patient-1") && is_valid_id("A.b-9") && is_valid_id(&"a".repeat(64)));
    assert!(
        !is_valid_id("")
            && !is_valid_id(&"a".repeat(65))
            && !is_valid_id("a/b")
            && !is_valid_id("a_b")
            && !is_valid_id("ä")
    );
}

// ---- valid resources -----------------------------------------------------------------------------

#[test]
fn seed_resources_are_valid() {
    for (name, text) in SEEDS {
        assert_valid(name, &parse(text));
    }
}

#[test]
fn carin_bb_resources_are_valid() {
    assert_valid("patient", &parse(PATIENT));
    assert_valid("coverage", &parse(COVERAGE));
    assert_valid("eob", &parse(EOB));
}

#[test]
fn bundle_of_them_is_valid() {
    let mut entries = vec![];
    for text in [PATIENT, COVERAGE, EOB, SEEDS[3].1] {
        let r = parse(text);
        let url = format!(
            "https://payer.example.org/fhir/{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        entries.push(json!({"fullUrl": url, "resource": r, "search": {"mode": "match"}}));
    }
    let bundle = json!({
        "resourceType": "Bundle", "id": "b1", "type": "searchset", "total": 4,
        "link": [{"relation": "self", "url": "https://payer.example.org/fhir/Patient/c4bb-patient-1/$everything"}],
        "entry": entries
    });
    assert_valid("searchset bundle", &bundle);

    let tx = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{
            "fullUrl": "urn:uuid:c757873d-ec9a-4326-a141-556f43239520",
            "resource": parse(PATIENT),
            "request": {"method": "PUT", "url": "Patient/c4bb-patient-1"}
        }]
    });
    assert_valid("transaction bundle", &tx);
}

// ---- each class of error ---------------------------------------------------------------------------

#[test]
fn bad_date() {
    let d = one(&patient(json!({"birthDate": "1980-13-45"})), IssueType::Value, "Patient.birthDate");
    assert_eq!(d, "Patient.birthDate: '1980-13-45' is not a valid FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)");
    one(&patient(json!({"birthDate": "2023-02-29"})), IssueType::Value, "Patient.birthDate");
    assert_valid("leap day", &patient(json!({"birthDate": "2024-02-29"})));
}

#[test]
fn array_versus_single() {
    let d = one(&patient(json!({"name": {"family": "Example"}})), IssueType::Structure, "Patient.name");
    assert_eq!(d, "Patient.name must be an array (cardinality 0..*)");
    let d = one(&patient(json!({"birthDate": ["1980-01-01"]})), IssueType::Structure, "Patient.birthDate");
    assert_eq!(d, "Patient.birthDate must not be an array (cardinality 0..1)");
    one(&patient(json!({"name": [{"given": "Pat"}]})), IssueType::Structure, "Patient.name[0].given");
}

#[test]
fn unknown_elements() {
    let d = one(&patient(json!({"foo": 1})), IssueType::Structure, "Patient.foo");
    assert_eq!(d, "Unknown element 'foo' in Patient");
    let d = one(
        &patient(json!({"name": [{"family": "X", "surname": "Y"}]})),
        IssueType::Structure,
        "Patient.name[0].surname",
    );
    assert_eq!(d, "Unknown element 'surname' in Patient.name[0] (HumanName)");
    // a backbone element
    let d = one(
        &patient(json!({"contact": [{"relationshipp": []}]})),
        IssueType::Structure,
        "Patient.contact[0].relationshipp",
    );
    assert!(d.contains("(Patient.contact)"), "{d}");
    // resourceType is only a property of a resource, not of a datatype
    one(
        &patient(json!({"maritalStatus": {"resourceType": "CodeableConcept", "text": "M"}})),
        IssueType::Structure,
        "Patient.maritalStatus.resourceType",
    );
    // elements Medplum adds to Meta are not R4
    one(&patient(json!({"meta": {"project": "x"}})), IssueType::Structure, "Patient.meta.project");
}

#[test]
fn wrong_json_types() {
    let d = one(&patient(json!({"active": "true"})), IssueType::Structure, "Patient.active");
    assert_eq!(d, "Patient.active is a FHIR boolean and must be a JSON boolean (true or false), found a string 'true'");
    one(&patient(json!({"name": [{"given": ["Pat", 7]}]})), IssueType::Structure, "Patient.name[0].given[1]");
    one(&patient(json!({"maritalStatus": "M"})), IssueType::Structure, "Patient.maritalStatus");
    one(&patient(json!({"multipleBirthInteger": "2"})), IssueType::Structure, "Patient.multipleBirthInteger");
    let q = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": "12.5"}});
    let d = one(&q, IssueType::Structure, "Observation.valueQuantity.value");
    assert!(d.contains("FHIR decimal") && d.contains("JSON number"), "{d}");
    one(&patient(json!({"text": "hello"})), IssueType::Structure, "Patient.text");
}

#[test]
fn numbers() {
    let d = one(&patient(json!({"multipleBirthInteger": 1.5})), IssueType::Value, "Patient.multipleBirthInteger");
    assert_eq!(d, "Patient.multipleBirthInteger: 1.5 is not a valid FHIR integer (a whole number)");
    one(&patient(json!({"multipleBirthInteger": 2_147_483_648_i64})), IssueType::Value, "Patient.multipleBirthInteger");
    assert_valid("negative integer", &patient(json!({"multipleBirthInteger": -3})));
    // positiveInt
    let mut eob = parse(EOB);
    eob["item"][1]["sequence"] = json!(0);
    let d = one(&eob, IssueType::Value, "ExplanationOfBenefit.item[1].sequence");
    assert_eq!(d, "ExplanationOfBenefit.item[1].sequence: 0 is out of range for a FHIR positiveInt (1..2147483647)");
    // unsignedInt
    let b = json!({"resourceType": "Bundle", "type": "searchset", "total": -1});
    one(&b, IssueType::Value, "Bundle.total");
    // decimal accepts any JSON number, including integers and exponents
    let q = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 1e3}});
    assert_valid("decimal", &q);
}

#[test]
fn primitive_formats() {
    let d = one(&patient(json!({"gender": " male"})), IssueType::Value, "Patient.gender");
    assert!(d.contains("not a valid FHIR code"), "{d}");
    one(&patient(json!({"meta": {"lastUpdated": "2024-01-01"}})), IssueType::Value, "Patient.meta.lastUpdated");
    one(&patient(json!({"deceasedDateTime": "2024-01-01T10:00:00"})), IssueType::Value, "Patient.deceasedDateTime");
    assert_valid("dateTime", &patient(json!({"deceasedDateTime": "2024-01-01T10:00:00.5+05:30"})));
    one(
        &patient(json!({"identifier": [{"system": "http://example.org/ids with space", "value": "1"}]})),
        IssueType::Value,
        "Patient.identifier[0].system",
    );
    // oid and uuid are typed in ValueSet.expansion.identifier (uri) ... use Extension value[x]
    let ext = |v: Value| patient(json!({"extension": [{"url": "http://example.org/x", "valueOid": v}]}));
    assert_valid("oid", &ext(json!("urn:oid:2.16.840.1.113883")));
    one(&ext(json!("2.16.840.1.113883")), IssueType::Value, "Patient.extension[0].valueOid");
    let ext = |v: Value| patient(json!({"extension": [{"url": "http://example.org/x", "valueUuid": v}]}));
    assert_valid("uuid", &ext(json!("urn:uuid:c757873d-ec9a-4326-a141-556f43239520")));
    one(
        &ext(json!("urn:uuid:C757873D-EC9A-4326-A141-556F43239520")),
        IssueType::Value,
        "Patient.extension[0].valueUuid",
    );
    let photo = |data: &str| patient(json!({"photo": [{"contentType": "image/png", "data": data}]}));
    assert_valid("base64", &photo("iVBORw0KGgo="));
    let d = one(&photo("iVBORw0KGgo*"), IssueType::Value, "Patient.photo[0].data");
    assert!(d.contains("base64Binary"), "{d}");
    let obs =
        |t: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueTime": t});
    assert_valid("time", &obs("23:59:59"));
    one(&obs("25:00:00"), IssueType::Value, "Observation.valueTime");
    let d =
        one(&patient(json!({"text": {"status": "generated", "div": "hello"}})), IssueType::Value, "Patient.text.div");
    assert!(d.contains("xhtml"), "{d}");
}

#[test]
fn empty_and_null() {
    let d = one(&patient(json!({"gender": ""})), IssueType::Value, "Patient.gender");
    assert_eq!(d, "Patient.gender: empty string is not a valid FHIR code (omit the element instead)");
    one(&patient(json!({"maritalStatus": {}})), IssueType::Structure, "Patient.maritalStatus");
    one(&patient(json!({"name": []})), IssueType::Structure, "Patient.name");
    one(&patient(json!({"birthDate": null})), IssueType::Structure, "Patient.birthDate");
    one(&patient(json!({"name": [null]})), IssueType::Structure, "Patient.name[0]");
    one(&patient(json!({"name": [{"family": ""}]})), IssueType::Value, "Patient.name[0].family");
}

#[test]
fn resource_type_and_id() {
    let d = one(&json!({"id": "x"}), IssueType::Required, "");
    assert_eq!(d, "The resource has no resourceType");
    let d = one(&json!({"resourceType": "Patiant"}), IssueType::Invalid, "resourceType");
    assert_eq!(d, "Unknown resourceType 'Patiant': not an R4 (4.0.1) resource type");
    one(&json!({"resourceType": "DomainResource"}), IssueType::Invalid, "resourceType");
    one(&json!({"resourceType": "SubscriptionStatus"}), IssueType::Invalid, "resourceType");
    one(&json!({"resourceType": 7}), IssueType::Invalid, "resourceType");
    one(&json!(["Patient"]), IssueType::Structure, "");
    let d = one(&patient(json!({"id": "a_b"})), IssueType::Value, "Patient.id");
    assert!(d.contains("'a_b' is not a valid FHIR id"), "{d}");
    one(&patient(json!({"id": "x".repeat(65)})), IssueType::Value, "Patient.id");
    one(&patient(json!({"id": 12})), IssueType::Structure, "Patient.id");
}

#[test]
fn required_elements() {
    let found = issues(&json!({"resourceType": "Coverage", "id": "c"}));
    let exprs: Vec<_> = found.iter().map(|i| (i.code, i.expression[0].as_str())).collect();
    assert_eq!(
        exprs,
        vec![
            (IssueType::Required, "Coverage.status"),
            (IssueType::Required, "Coverage.beneficiary"),
            (IssueType::Required, "Coverage.payor")
        ]
    );
    assert_eq!(found[2].diagnostics.as_deref(), Some("Coverage.payor: missing required element (cardinality 1..*)"));
    // in a backbone element
    let mut eob = parse(EOB);
    eob["item"][0].as_object_mut().unwrap().remove("sequence");
    one(&eob, IssueType::Required, "ExplanationOfBenefit.item[0].sequence");
    // in a datatype
    one(&patient(json!({"extension": [{"valueString": "x"}]})), IssueType::Required, "Patient.extension[0].url");
    one(&patient(json!({"text": {"status": "generated"}})), IssueType::Required, "Patient.text.div");
    // a required choice element
    let d = one(
        &json!({"resourceType": "Library", "status": "draft", "type": {"text": "x"}, "useContext": [{"code": {"code": "focus"}}]}),
        IssueType::Required,
        "Library.useContext[0].value",
    );
    assert!(d.contains("one of valueCodeableConcept, valueQuantity, valueRange, valueReference"), "{d}");
    // a primitive present only through its extension is present
    let ext = json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]});
    let cov = json!({"resourceType": "Coverage", "_status": ext, "beneficiary": {"reference": "Patient/1"}, "payor": [{"display": "P"}]});
    assert_valid("status by extension", &cov);
}

#[test]
fn choice_types() {
    assert_valid("deceasedBoolean", &patient(json!({"deceasedBoolean": true})));
    assert_valid("deceasedDateTime", &patient(json!({"deceasedDateTime": "2020-04"})));
    one(&patient(json!({"deceasedString": "yes"})), IssueType::Structure, "Patient.deceasedString");
    one(&patient(json!({"deceased": true})), IssueType::Structure, "Patient.deceased");
    let d = one(
        &patient(json!({"deceasedBoolean": true, "deceasedDateTime": "2020"})),
        IssueType::Structure,
        "Patient.deceased",
    );
    assert!(d.contains("'deceasedBoolean' and 'deceasedDateTime'"), "{d}");
    // the type of the chosen variant is enforced
    one(&patient(json!({"deceasedDateTime": true})), IssueType::Structure, "Patient.deceasedDateTime");
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "BP"},
        "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        "effectivePeriod": {"start": "2024-01-01T10:00:00Z"},
        "component": [{"code": {"text": "x"}, "valueCodeableConcept": {"text": "y"}}]});
    assert_valid("observation", &obs);
    // extensions: one value[x] at most, of an allowed type
    let ext = |e: Value| patient(json!({"extension": [e]}));
    assert_valid("valueMeta (4.0.1)", &ext(json!({"url": "http://x.org/e", "valueMeta": {"versionId": "1"}})));
    one(
        &ext(json!({"url": "http://x.org/e", "valueString": "a", "valueCode": "b"})),
        IssueType::Structure,
        "Patient.extension[0].value",
    );
    one(
        &ext(json!({"url": "http://x.org/e", "valueNarrative": {"status": "generated"}})),
        IssueType::Structure,
        "Patient.extension[0].valueNarrative",
    );
    one(
        &ext(json!({"url": "http://x.org/e", "valueCodeableConcept": "x"})),
        IssueType::Structure,
        "Patient.extension[0].valueCodeableConcept",
    );
    // a primitive choice and its extension are the same variant
    assert_valid(
        "valueString + _valueString",
        &ext(json!({"url": "http://x.org/e", "valueString": "a", "_valueString": {"id": "v"}})),
    );
}

#[test]
fn primitive_extensions() {
    let dar = json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}]});
    assert_valid("_birthDate with value", &patient(json!({"birthDate": "1970", "_birthDate": dar})));
    assert_valid("_birthDate alone", &patient(json!({"_birthDate": dar})));
    let d = one(&patient(json!({"_birthDate": "1970"})), IssueType::Structure, "Patient.birthDate");
    assert!(d.contains("'_birthDate' must be a JSON object"), "{d}");
    one(&patient(json!({"_birthDate": {}})), IssueType::Structure, "Patient.birthDate");
    one(&patient(json!({"_birthDate": [dar]})), IssueType::Structure, "Patient.birthDate");
    one(
        &patient(json!({"_birthDate": {"extension": [{"valueCode": "x"}]}})),
        IssueType::Required,
        "Patient.birthDate.extension[0].url",
    );
    one(&patient(json!({"_birthDate": {"foo": 1}})), IssueType::Structure, "Patient.birthDate.foo");
    // not on complex elements
    let d = one(&patient(json!({"_maritalStatus": dar})), IssueType::Structure, "Patient.maritalStatus");
    assert!(d.contains("not a primitive element"), "{d}");
    one(&patient(json!({"_foo": dar})), IssueType::Structure, "Patient._foo");
    // repeating primitives: arrays lined up, null where one side has nothing
    let name = |n: Value| patient(json!({"name": [n]}));
    assert_valid("given + _given", &name(json!({"given": ["Pat", null], "_given": [null, dar]})));
    assert_valid("_given alone", &name(json!({"_given": [dar]})));
    one(&name(json!({"given": ["Pat", null]})), IssueType::Structure, "Patient.name[0].given[1]");
    one(
        &name(json!({"given": ["Pat", null], "_given": [dar, null]})),
        IssueType::Structure,
        "Patient.name[0].given[1]",
    );
    one(&name(json!({"given": ["Pat", "Q"], "_given": [null]})), IssueType::Structure, "Patient.name[0].given");
    one(&name(json!({"given": ["Pat"], "_given": dar})), IssueType::Structure, "Patient.name[0].given");
    one(&name(json!({"given": ["Pat"], "_given": ["x"]})), IssueType::Structure, "Patient.name[0].given[0]");
}

#[test]
fn contained_resources() {
    let mut cov = parse(COVERAGE);
    cov["contained"] = json!([{"resourceType": "Organization", "id": "payer", "name": "Old Plan", "foo": true}]);
    let d = one(&cov, IssueType::Structure, "Coverage.contained[0].foo");
    assert_eq!(d, "Unknown element 'foo' in Coverage.contained[0] (Organization)");
    cov["contained"] = json!([{"id": "payer", "name": "Old Plan"}]);
    let d = one(&cov, IssueType::Required, "Coverage.contained[0]");
    assert_eq!(d, "Coverage.contained[0] has no resourceType");
    cov["contained"] = json!([{"resourceType": "Organization", "id": "#payer"}]);
    one(&cov, IssueType::Value, "Coverage.contained[0].id");
    cov["contained"] = json!({"resourceType": "Organization", "id": "payer"});
    one(&cov, IssueType::Structure, "Coverage.contained");
    cov["contained"] = json!(["Organization/payer"]);
    one(&cov, IssueType::Structure, "Coverage.contained[0]");
}

#[test]
fn nested_resources_in_bundle_and_parameters() {
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": parse(COVERAGE)},
        {"resource": patient(json!({"birthDate": "1980-13-45"}))},
        {"resource": {"resourceType": "Claimm"}}
    ]});
    let found = issues(&bundle);
    let exprs: Vec<_> = found.iter().map(|i| (i.code, i.expression[0].as_str())).collect();
    assert_eq!(
        exprs,
        vec![
            (IssueType::Value, "Bundle.entry[1].resource.birthDate"),
            (IssueType::Invalid, "Bundle.entry[2].resource.resourceType")
        ]
    );
    assert_eq!(
        found[0].diagnostics.as_deref(),
        Some("Bundle.entry[1].resource.birthDate: '1980-13-45' is not a valid FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)")
    );
    assert_eq!(
        found[1].diagnostics.as_deref(),
        Some("Bundle.entry[2].resource: Unknown resourceType 'Claimm': not an R4 (4.0.1) resource type")
    );

    let mut params = parse(SEEDS[0].1);
    params["parameter"][1]["resource"]["period"]["start"] = json!("2011-5-23");
    one(&params, IssueType::Value, "Parameters.parameter[1].resource.period.start");
    // parameter.part is a contentReference to Parameters.parameter
    let p = json!({"resourceType": "Parameters", "parameter": [{"name": "a", "part": [{"name": "b", "valueInteger": "1"}]}]});
    one(&p, IssueType::Structure, "Parameters.parameter[0].part[0].valueInteger");
    let p = json!({"resourceType": "Parameters", "parameter": [{"name": "a", "part": [{"valueBoolean": true}]}]});
    one(&p, IssueType::Required, "Parameters.parameter[0].part[0].name");
}

#[test]
fn deeply_nested_backbone_elements() {
    let mut eob = parse(EOB);
    eob["item"][0]["detail"][0]["subDetail"][0]["adjudication"][0]["amount"]["value"] = json!("0.00");
    one(&eob, IssueType::Structure, "ExplanationOfBenefit.item[0].detail[0].subDetail[0].adjudication[0].amount.value");

    let mut eob = parse(EOB);
    eob["item"][1]["servicedDate"] = json!("02/11/2024");
    let d = one(&eob, IssueType::Value, "ExplanationOfBenefit.item[1].servicedDate");
    assert_eq!(d, "ExplanationOfBenefit.item[1].servicedDate: '02/11/2024' is not a valid FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)");

    // Questionnaire.item.item -> Questionnaire.item, three levels down
    let q = json!({"resourceType": "Questionnaire", "status": "active", "item": [
        {"linkId": "1", "type": "group", "item": [
            {"linkId": "1.1", "type": "group", "item": [
                {"linkId": "1.1.1", "type": "boolean", "enableWhen": [{"question": "1", "operator": "exists", "answerBoolean": "yes"}]}
            ]}
        ]}
    ]});
    one(&q, IssueType::Structure, "Questionnaire.item[0].item[0].item[0].enableWhen[0].answerBoolean");
}

#[test]
fn issues_are_bounded() {
    let mut p = patient(json!({}));
    for i in 0..250 {
        p[format!("unknown{i}")] = json!(i);
    }
    let found = issues(&p);
    assert_eq!(found.len(), MAX_ISSUES);
    assert_eq!(found[0].expression, vec!["Patient.unknown0".to_string()]);
}

#[test]
fn every_issue_names_an_element() {
    let mut eob = parse(EOB);
    eob["status"] = json!("");
    eob["item"][0]["quantity"]["value"] = json!("4");
    eob["created"] = json!("yesterday");
    eob["total"] = json!({"amount": {}});
    let found = issues(&eob);
    assert_eq!(found.len(), 4, "{found:#?}");
    for issue in &found {
        assert!(issue.expression[0].starts_with("ExplanationOfBenefit."), "{issue:#?}");
        let d = issue.diagnostics.as_deref().unwrap();
        assert!(d.contains(issue.expression[0].as_str()), "{issue:#?}");
    }
}

/// Documents as written, for what a serialized `Value` never contains (repeated keys, number
/// spellings, escapes): the tape must agree with `serde_json::Value` on every one.
#[test]
fn the_tape_agrees_with_serde_json_on_documents_as_written() {
    let cases = [
        // repeated keys: the last value counts, at the first position
        (r#"{"resourceType":"Patient","id":"p","birthDate":"bad","birthDate":"2020-01-01"}"#, 0),
        (r#"{"resourceType":"Patient","id":"p","birthDate":"2020-01-01","birthDate":"bad"}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","gender":"male","gender":"","active":1,"active":true}"#, 1),
        // number spellings in integer and decimal elements
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":-0}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":1E2}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":2.0}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":18446744073709551615}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":99999999999999999999999}"#, 1),
        (r#"{"resourceType":"Patient","id":"p","multipleBirthInteger":-2147483648}"#, 0),
        (
            r#"{"resourceType":"Observation","id":"o","status":"final","code":{"text":"t"},"valueQuantity":{"value":1.5e-3}}"#,
            0,
        ),
        // escapes in keys and values
        (r#"{"resourceType":"Patient","id":"p","\u0067ender":"male"}"#, 0),
        (r#"{"resourceType":"Patient","id":"p","name":[{"family":"O\"Neil\u00e9"}],"gender":"ma\u006ce"}"#, 0),
        (r#"{"resourceType":"Patient","id":"p","birthDate":"2020\u002d01-01"}"#, 0),
        // repeated keys inside nested objects and a primitive's `_x` sibling
        (
            r#"{"resourceType":"Patient","id":"p","name":[{"given":["a",null],"_given":[null,{"id":"x"}],"_given":[null,null]}]}"#,
            1,
        ),
        (
            r#"{"resourceType":"Patient","id":"p","name":[{"given":["a",null],"_given":[null,null],"_given":[null,{"id":"x"}]}]}"#,
            0,
        ),
    ];
    for (text, want) in cases {
        let value: Value = serde_json::from_str(text).expect("the case is JSON");
        let from_value = validate_resource(&value).err().unwrap_or_default();
        let from_tape = validate_json(&Json::parse(text).expect("the tape reads it")).err().unwrap_or_default();
        assert_eq!(from_tape, from_value, "the trees disagree on {text}");
        assert_eq!(from_value.len(), want, "{text}: {from_value:#?}");
    }
}

/// Mutated fixtures (bytes deleted, repeated or replaced by JSON punctuation, deterministic):
/// the tape accepts exactly what serde_json accepts, and the walker reports the same issues over
/// both.
#[test]
fn the_tape_agrees_with_serde_json_on_mutated_resources() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let pieces =
        ["\"", ",", ":", "{", "}", "[", "]", "null", "0", "-1.5e3", "\\", "\\u00e9", "\"a\":1", "\"id\":\"x\""];
    let (mut parsed, mut refused) = (0, 0);
    for fixture in [PATIENT, COVERAGE, EOB] {
        let compact = parse(fixture).to_string();
        for _ in 0..400 {
            let mut text = compact.clone();
            for _ in 0..1 + next(3) {
                let mut at = next(text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let end = (at + 1 + next(6)).min(text.len());
                let end = (end..=text.len()).find(|&e| text.is_char_boundary(e)).unwrap_or(text.len());
                match next(3) {
                    0 => text.replace_range(at..end, ""),
                    1 => text.insert_str(at, pieces[next(pieces.len())]),
                    _ => {
                        let copy = text[at..end].to_string();
                        text.insert_str(at, &copy);
                    }
                }
            }
            let by_serde = serde_json::from_str::<Value>(&text);
            match (Json::parse(&text), by_serde) {
                (Ok(doc), Ok(value)) => {
                    parsed += 1;
                    assert_eq!(validate_json(&doc), validate_resource(&value), "the trees disagree on {text}");
                }
                (Err(_), Err(_)) => refused += 1,
                (Ok(_), Err(e)) => panic!("the tape took what serde_json refuses ({e}): {text}"),
                (Err(e), Ok(_)) => panic!("the tape refused what serde_json takes ({e}): {text}"),
            }
        }
    }
    // Both outcomes are exercised, so the comparison means something.
    assert!(parsed > 100 && refused > 100, "parsed {parsed}, refused {refused}");
}

/// Large objects and arrays on the paths that pair or deduplicate: repeated keys in long runs, and
/// a long primitive array of nulls lined up with its `_x` array. The tape has no random access, so
/// these are walked in step rather than looked up by index (which would be quadratic); the
/// answers must still match `serde_json::Value`'s.
#[test]
fn long_repeats_and_long_paired_arrays_agree_with_serde_json() {
    let n = 20_000;
    let repeated = format!(
        r#"{{"resourceType":"Patient","id":"p",{},{},"gender":""}}"#,
        vec![r#""active":true"#; n].join(","),
        vec![r#""gender":"male""#; n].join(",")
    );
    let nulls = vec!["null"; n].join(",");
    let ids = vec![r#"{"id":"x"}"#; n].join(",");
    let paired = format!(r#"{{"resourceType":"Patient","id":"p","name":[{{"given":[{nulls}],"_given":[{ids}]}}]}}"#);
    let unpaired =
        format!(r#"{{"resourceType":"Patient","id":"p","name":[{{"given":[{nulls},null],"_given":[{ids},null]}}]}}"#);
    let values = vec![r#""a""#; n].join(",");
    let extensions_of_values = format!(
        r#"{{"resourceType":"Patient","id":"p","name":[{{"given":[{values}],"_given":[{}]}}]}}"#,
        vec!["null"; n].join(",")
    );
    // The last `gender` (empty) is the one that counts: one issue.
    for (text, want) in [(&repeated, 1), (&paired, 0), (&unpaired, 1), (&extensions_of_values, 0)] {
        let value: Value = serde_json::from_str(text).expect("the case is JSON");
        let from_value = validate_resource(&value).err().unwrap_or_default();
        let from_tape = validate_json(&Json::parse(text).expect("the tape reads it")).err().unwrap_or_default();
        assert_eq!(from_tape, from_value, "the trees disagree");
        assert_eq!(from_value.len(), want, "{from_value:#?}");
    }
}
