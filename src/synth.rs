//! Deterministic synthetic payer data for benchmarks: members as Patient, Coverage and
//! ExplanationOfBenefit resources shaped like CARIN Blue Button 2.x (C4BB-Patient,
//! C4BB-Coverage, C4BB-ExplanationOfBenefit-Inpatient-Institutional and
//! -Professional-NonClinician), 2–6 KB each as compact JSON, and valid for payerx's validator.
//!
//! The same `(n, seed, id_prefix)` always yields the same resources, and each member's content
//! depends only on `(seed, member)`, so a run is reproducible and phases can share payloads.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

/// The three resources of one member, in this order.
const KINDS: usize = 3;

/// xorshift64*: tiny, fast, deterministic; plenty for synthetic data (not for anything secret).
struct Rng(u64);

impl Rng {
    /// Mixes seed and member with splitmix64 so neighbouring members get unrelated streams.
    fn new(seed: u64, member: u64) -> Self {
        let mut z = seed.wrapping_add(member.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // xorshift must never hold 0.
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi` (the modulo bias is irrelevant here).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + (self.next() % 10) as u8)).collect()
    }

    /// Money in USD with cents, as a FHIR decimal.
    fn money(&mut self, lo_cents: u64, hi_cents: u64) -> Value {
        json!({"value": cents(self.range(lo_cents, hi_cents)), "currency": "USD"})
    }
}

fn cents(c: u64) -> f64 {
    c as f64 / 100.0
}

/// `YYYY-MM-DD` of `days` after 2015-01-01 (claims).
fn date(days: u64) -> String {
    ymd(time::macros::date!(2015 - 01 - 01) + time::Duration::days(days as i64))
}

/// `YYYY-MM-DD` of `days` after 1940-01-01 (birth dates).
fn birth_date(days: u64) -> String {
    ymd(time::macros::date!(1940 - 01 - 01) + time::Duration::days(days as i64))
}

fn ymd(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

const GIVEN: &[&str] = &[
    "Olivia", "Liam", "Emma", "Noah", "Ava", "Elijah", "Sophia", "Mateo", "Isabella", "Lucas", "Mia", "Amelia",
    "James", "Harper", "Benjamin", "Evelyn", "Henry", "Aiden", "Priya", "Wei",
];
const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Nguyen",
    "Patel",
    "Kim",
    "Okafor",
    "Schmidt",
    "Rossi",
    "Cohen",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Pittsburgh", "PA", "152"),
    ("Columbus", "OH", "432"),
    ("Austin", "TX", "787"),
    ("Denver", "CO", "802"),
    ("Raleigh", "NC", "276"),
    ("Madison", "WI", "537"),
    ("Portland", "OR", "972"),
    ("Richmond", "VA", "232"),
];
const STREETS: &[&str] = &["Main Street", "Oak Avenue", "Maple Drive", "Cedar Lane", "Elm Street", "Park Road"];
const ICD10: &[&str] = &["I50.9", "E11.9", "J18.9", "N17.9", "I10", "E78.5", "K21.9", "M54.5", "J44.1", "F41.1"];
const CPT: &[&str] = &["99213", "99214", "99203", "97110", "97140", "90837", "80053", "85025", "71046", "93000"];
const HCPCS: &[&str] = &["A0428", "E0114", "E0601", "J1100", "G0439", "A4253"];
const REVENUE: &[&str] = &["0120", "0250", "0300", "0320", "0450", "0636", "0730"];
const DRG: &[&str] = &["291", "292", "190", "871", "470", "392"];
const POS: &[&str] = &["11", "12", "22", "23", "81"];

const C4BB: &str = "http://hl7.org/fhir/us/carin-bb";
const ADJUDICATION: &str = "http://terminology.hl7.org/CodeSystem/adjudication";
const PAYER: &str = "Organization/payer-1";

fn coding(system: &str, code: &str) -> Value {
    json!({"coding": [{"system": system, "code": code}]})
}

fn coding_display(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}]})
}

fn ids(prefix: &str, member: u64) -> (String, String, String) {
    (format!("{prefix}pat-{member}"), format!("{prefix}cov-{member}"), format!("{prefix}eob-{member}"))
}

fn patient(prefix: &str, member: u64, rng: &mut Rng) -> Value {
    let (pat, _, _) = ids(prefix, member);
    let given = rng.pick(GIVEN);
    let middle = rng.pick(GIVEN);
    let family = rng.pick(FAMILY);
    let female = rng.next() % 2 == 0;
    let birth = birth_date(rng.range(0, 25_000));
    let (city, state, zip) = rng.pick(CITIES);
    let member_no = rng.digits(11);
    let phone = format!("({}) 555-{}", rng.digits(3), rng.digits(4));
    json!({
        "resourceType": "Patient",
        "id": pat,
        "meta": {"profile": [format!("{C4BB}/StructureDefinition/C4BB-Patient|2.0.0")]},
        "text": {
            "status": "generated",
            "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{given} {family}, born {birth}</div>")
        },
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
                    {"url": "text", "valueString": "White"}
                ]
            },
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5", "display": "Not Hispanic or Latino"}},
                    {"url": "text", "valueString": "Not Hispanic or Latino"}
                ]
            },
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                "valueCode": if female { "F" } else { "M" }
            }
        ],
        "identifier": [
            {
                "type": coding_display("http://terminology.hl7.org/CodeSystem/v2-0203", "MB", "Member Number"),
                "system": "https://example-payer.org/fhir/memberidentifier",
                "value": member_no
            },
            {
                "type": coding_display(&format!("{C4BB}/CodeSystem/C4BBIdentifierType"), "um", "Unique Member ID"),
                "system": "https://example-payer.org/fhir/patientuniquememberid",
                "value": format!("{member_no}-{member}")
            }
        ],
        "active": true,
        "name": [{"use": "official", "text": format!("{given} {middle} {family}"), "family": family, "given": [given, middle]}],
        "telecom": [
            {"system": "phone", "value": phone, "use": "home", "rank": 1},
            {"system": "email", "value": format!("{}.{}{}@example.org", given.to_lowercase(), family.to_lowercase(), member)}
        ],
        "gender": if female { "female" } else { "male" },
        "birthDate": birth,
        "address": [{
            "use": "home",
            "type": "physical",
            "line": [format!("{} {}", rng.range(1, 9999), rng.pick(STREETS))],
            "city": city,
            "state": state,
            "postalCode": format!("{zip}{}", rng.digits(2)),
            "country": "US"
        }],
        "maritalStatus": coding("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", if rng.next() % 2 == 0 { "M" } else { "S" }),
        "communication": [{"language": coding("urn:ietf:bcp:47", "en-US"), "preferred": true}],
        "managingOrganization": {"reference": PAYER, "display": "Example Health Plan"}
    })
}

fn coverage(prefix: &str, member: u64, rng: &mut Rng) -> Value {
    let (pat, cov, _) = ids(prefix, member);
    let year = 2020 + rng.range(0, 4);
    let subscriber_id = rng.digits(11);
    let group = rng.digits(6);
    let (plan, plan_name) =
        rng.pick(&[("GOLD-PPO", "Gold PPO"), ("SILVER-HMO", "Silver HMO"), ("BRONZE-EPO", "Bronze EPO")]);
    let copay = |kind: &str, rng: &mut Rng| {
        json!({
            "type": coding("http://terminology.hl7.org/CodeSystem/coverage-copay-type", kind),
            "valueMoney": rng.money(1000, 7500)
        })
    };
    json!({
        "resourceType": "Coverage",
        "id": cov,
        "meta": {"profile": [format!("{C4BB}/StructureDefinition/C4BB-Coverage|2.0.0")]},
        "identifier": [{
            "type": coding_display("http://terminology.hl7.org/CodeSystem/v2-0203", "MB", "Member Number"),
            "system": "https://example-payer.org/fhir/memberidentifier",
            "value": subscriber_id
        }],
        "status": "active",
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIP", "display": "health insurance plan policy"}],
            "text": "health insurance plan policy"
        },
        "subscriber": {"reference": format!("Patient/{pat}")},
        "subscriberId": subscriber_id,
        "beneficiary": {"reference": format!("Patient/{pat}")},
        "dependent": "01",
        "relationship": coding_display("http://terminology.hl7.org/CodeSystem/subscriber-relationship", "self", "Self"),
        "period": {"start": format!("{year}-01-01"), "end": format!("{year}-12-31")},
        "payor": [{"reference": PAYER, "display": "Example Health Plan"}],
        "class": [
            {"type": coding("http://terminology.hl7.org/CodeSystem/coverage-class", "group"), "value": group, "name": "Example Employer Group"},
            {"type": coding("http://terminology.hl7.org/CodeSystem/coverage-class", "plan"), "value": plan, "name": plan_name}
        ],
        "network": "Example Premier Network",
        "costToBeneficiary": [
            copay("gpvisit", rng),
            copay("spvisit", rng),
            {
                "type": coding("http://terminology.hl7.org/CodeSystem/coverage-copay-type", "emergency"),
                "valueMoney": rng.money(10000, 30000),
                "exception": [{
                    "type": coding("http://terminology.hl7.org/CodeSystem/ex-coverage-financial-exception", "retired"),
                    "period": {"start": format!("{year}-01-01")}
                }]
            }
        ]
    })
}

/// Line-level adjudication: submitted, eligible, deductible or copay, benefit.
fn item_adjudication(rng: &mut Rng, submitted_cents: u64) -> (Vec<Value>, [u64; 3]) {
    let eligible = submitted_cents * rng.range(60, 95) / 100;
    let member_share = eligible * rng.range(0, 25) / 100;
    let benefit = eligible - member_share;
    let share_code = if rng.next() % 2 == 0 { "deductible" } else { "copay" };
    let adj = vec![
        json!({"category": coding(ADJUDICATION, "submitted"), "amount": {"value": cents(submitted_cents), "currency": "USD"}}),
        json!({"category": coding(ADJUDICATION, "eligible"), "amount": {"value": cents(eligible), "currency": "USD"}}),
        json!({"category": coding(ADJUDICATION, share_code), "amount": {"value": cents(member_share), "currency": "USD"}}),
        json!({"category": coding(ADJUDICATION, "benefit"), "amount": {"value": cents(benefit), "currency": "USD"}}),
    ];
    (adj, [submitted_cents, eligible, benefit])
}

fn money(c: u64) -> Value {
    json!({"value": cents(c), "currency": "USD"})
}

fn eob(prefix: &str, member: u64, rng: &mut Rng) -> Value {
    let (pat, cov, eob) = ids(prefix, member);
    let institutional = rng.next() % 2 == 0;
    let start_day = rng.range(2000, 3600);
    let days = if institutional { rng.range(1, 9) } else { 0 };
    let (start, end) = (date(start_day), date(start_day + days));
    let created = format!("{}T00:00:00-05:00", date(start_day + days + rng.range(3, 20)));
    // Item counts vary the size: about 4-6.5 KB (institutional headers are larger).
    let items = rng.range(1, if institutional { 2 } else { 3 }) as usize;
    let mut totals = [0u64; 3];
    let mut item = Vec::with_capacity(items);
    for seq in 1..=items {
        let submitted = rng.range(5_000, 900_000);
        let (adjudication, t) = item_adjudication(rng, submitted);
        for (sum, v) in totals.iter_mut().zip(t) {
            *sum += v;
        }
        let serviced_day = date(start_day + rng.range(0, days));
        let mut line = if institutional {
            json!({
                "sequence": seq,
                "revenue": coding("https://www.nubc.org/CodeSystem/RevenueCodes", rng.pick(REVENUE)),
                "productOrService": coding("http://www.ama-assn.org/go/cpt", rng.pick(CPT)),
                "servicedDate": serviced_day,
                "quantity": {"value": rng.range(1, 5), "unit": "units"}
            })
        } else {
            let hcpcs = rng.next() % 3 == 0;
            json!({
                "sequence": seq,
                "careTeamSequence": [1],
                "diagnosisSequence": [1],
                "productOrService": if hcpcs {
                    coding("https://bluebutton.cms.gov/resources/codesystem/hcpcs", rng.pick(HCPCS))
                } else {
                    coding("http://www.ama-assn.org/go/cpt", rng.pick(CPT))
                },
                "servicedDate": serviced_day,
                "locationCodeableConcept": coding("https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set", rng.pick(POS)),
                "quantity": {"value": rng.range(1, 3)}
            })
        };
        line["adjudication"] = Value::Array(adjudication);
        item.push(line);
    }
    let (profile, claim_type, id_prefix) = if institutional {
        ("C4BB-ExplanationOfBenefit-Inpatient-Institutional", "institutional", "IP")
    } else {
        ("C4BB-ExplanationOfBenefit-Professional-NonClinician", "professional", "PR")
    };
    let npi = rng.digits(10);
    let care_team = if institutional {
        json!([
            {"sequence": 1, "provider": {"reference": format!("Practitioner/npi-{npi}")}, "role": coding(&format!("{C4BB}/CodeSystem/C4BBClaimCareTeamRole"), "attending")},
            {"sequence": 2, "provider": {"reference": format!("Practitioner/npi-{}", rng.digits(10))}, "role": coding(&format!("{C4BB}/CodeSystem/C4BBClaimCareTeamRole"), "referring")}
        ])
    } else {
        json!([
            {"sequence": 1, "provider": {"reference": format!("Practitioner/npi-{npi}")}, "role": coding(&format!("{C4BB}/CodeSystem/C4BBClaimCareTeamRole"), "performing")}
        ])
    };
    let info_type = format!("{C4BB}/CodeSystem/C4BBSupportingInfoType");
    let mut supporting = vec![
        json!({"sequence": 1, "category": coding(&info_type, "clmrecvddate"), "timingDate": date(start_day + days + 1)}),
        json!({
            "sequence": 2,
            "category": coding(&info_type, "billingnetworkcontractingstatus"),
            "code": coding(&format!("{C4BB}/CodeSystem/C4BBPayerAdjudicationStatus"), "contracted")
        }),
    ];
    if institutional {
        supporting.push(json!({
            "sequence": 3,
            "category": coding(&info_type, "admissionperiod"),
            "timingPeriod": {"start": format!("{start}T08:30:00-05:00"), "end": format!("{end}T11:00:00-05:00")}
        }));
        supporting.push(json!({"sequence": 4, "category": coding(&info_type, "typeofbill"), "code": coding("https://www.nubc.org/CodeSystem/TypeOfBill", "0111")}));
        supporting.push(json!({
            "sequence": 5,
            "category": coding(&info_type, "drg"),
            "code": coding("https://www.cms.gov/Medicare/Medicare-Fee-for-Service-Payment/AcuteInpatientPPS/MS-DRG-Classifications-and-Software", rng.pick(DRG))
        }));
    }
    let mut diagnosis = vec![json!({
        "sequence": 1,
        "diagnosisCodeableConcept": coding("http://hl7.org/fhir/sid/icd-10-cm", rng.pick(ICD10)),
        "type": [coding("http://terminology.hl7.org/CodeSystem/ex-diagnosistype", "principal")]
    })];
    for seq in 2..=rng.range(1, 3) {
        diagnosis.push(json!({
            "sequence": seq,
            "diagnosisCodeableConcept": coding("http://hl7.org/fhir/sid/icd-10-cm", rng.pick(ICD10)),
            "type": [coding(&format!("{C4BB}/CodeSystem/C4BBClaimDiagnosisType"), "secondary")]
        }));
    }
    let [submitted, eligible, benefit] = totals;
    let mut v = json!({
        "resourceType": "ExplanationOfBenefit",
        "id": eob,
        "meta": {"profile": [format!("{C4BB}/StructureDefinition/{profile}|2.0.0")]},
        "identifier": [{
            "type": coding_display(&format!("{C4BB}/CodeSystem/C4BBIdentifierType"), "uc", "Unique Claim ID"),
            "system": "https://example-payer.org/fhir/claimid",
            "value": format!("{id_prefix}-{}-{}", &start[..4], rng.digits(9))
        }],
        "status": "active",
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": claim_type}],
            "text": if institutional { "Institutional" } else { "Professional" }
        },
        "use": "claim",
        "patient": {"reference": format!("Patient/{pat}")},
        "billablePeriod": {"start": start, "end": end},
        "created": created,
        "insurer": {"reference": PAYER, "display": "Example Health Plan"},
        "provider": {"reference": format!("Organization/provider-{}", rng.range(1, 500))},
        "payee": {
            "type": coding("http://terminology.hl7.org/CodeSystem/payeetype", "provider"),
            "party": {"reference": format!("Practitioner/npi-{npi}")}
        },
        "outcome": "complete",
        "careTeam": care_team,
        "supportingInfo": supporting,
        "diagnosis": diagnosis,
        "insurance": [{"focal": true, "coverage": {"reference": format!("Coverage/{cov}")}}],
        "item": item,
        "adjudication": [{
            "category": coding(&format!("{C4BB}/CodeSystem/C4BBAdjudicationDiscriminator"), "benefitpaymentstatus"),
            "reason": coding(&format!("{C4BB}/CodeSystem/C4BBPayerAdjudicationStatus"), "innetwork")
        }],
        "total": [
            {"category": coding(ADJUDICATION, "submitted"), "amount": money(submitted)},
            {"category": coding(ADJUDICATION, "eligible"), "amount": money(eligible)},
            {"category": coding(ADJUDICATION, "benefit"), "amount": money(benefit)},
            {"category": coding(&format!("{C4BB}/CodeSystem/C4BBAdjudication"), "paidtoprovider"), "amount": money(benefit)}
        ],
        "payment": {
            "type": coding("http://terminology.hl7.org/CodeSystem/ex-paymenttype", "complete"),
            "date": date(start_day + days + rng.range(21, 45)),
            "amount": money(benefit)
        }
    });
    if institutional {
        v["subType"] = coding(&format!("{C4BB}/CodeSystem/C4BBInstitutionalClaimSubType"), "inpatient");
    }
    v
}

/// One resource: index `i` is member `i / 3`, and `i % 3` picks Patient, Coverage or
/// ExplanationOfBenefit. Every id starts with `id_prefix` (which must keep ids valid FHIR ids).
pub fn resource(i: u64, seed: u64, id_prefix: &str) -> Value {
    let member = i / KINDS as u64;
    // One stream per (member, kind), so every resource is independent of generation order.
    let kind = (i % KINDS as u64) as usize;
    let mut rng = Rng::new(seed ^ (kind as u64).wrapping_mul(0xA24B_AED4_963E_E407), member);
    match kind {
        0 => patient(id_prefix, member, &mut rng),
        1 => coverage(id_prefix, member, &mut rng),
        _ => eob(id_prefix, member, &mut rng),
    }
}

/// `n` resources cycling Patient, Coverage, ExplanationOfBenefit (each Coverage and EOB refers
/// to the Patient just before it).
pub fn resources(n: usize, seed: u64, id_prefix: &str) -> impl Iterator<Item = Value> {
    let prefix = id_prefix.to_string();
    (0..n as u64).map(move |i| resource(i, seed, &prefix))
}

/// Writes `n` resources as NDJSON to `path`; returns the bytes written.
pub fn write_ndjson(path: &Path, n: usize, seed: u64, id_prefix: &str) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut bytes = 0u64;
    let mut line = Vec::with_capacity(8192);
    for r in resources(n, seed, id_prefix) {
        line.clear();
        serde_json::to_writer(&mut line, &r)?;
        line.push(b'\n');
        out.write_all(&line)?;
        bytes += line.len() as u64;
    }
    out.flush()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn every_resource_validates_and_is_sized_like_real_claims() {
        let mut total = 0usize;
        let mut eob_sizes = Vec::new();
        let all: Vec<Value> = resources(300, 42, "t-").collect();
        for (i, r) in all.iter().enumerate() {
            let rtype = r["resourceType"].as_str().unwrap();
            let id = r["id"].as_str().unwrap();
            assert_eq!(rtype, ["Patient", "Coverage", "ExplanationOfBenefit"][i % 3], "{i}");
            if let Err(oo) = processors::validate_processor::check_resource(r, rtype, id, None) {
                panic!("{rtype}/{id} is invalid: {oo:?}\n{r:#}");
            }
            let size = r.to_string().len();
            total += size;
            assert!((1_500..=7_000).contains(&size), "{rtype}/{id} is {size} bytes");
            if rtype == "ExplanationOfBenefit" {
                eob_sizes.push(size);
            }
        }
        let avg = total / all.len();
        assert!((2_000..=6_000).contains(&avg), "average {avg} bytes");
        // Item counts vary, so EOB sizes do too.
        let (min, max) = (eob_sizes.iter().min().unwrap(), eob_sizes.iter().max().unwrap());
        assert!(max - min > 1_500, "EOB sizes {min}..{max}");
    }

    #[test]
    fn deterministic_and_linked() {
        let a: Vec<Value> = resources(30, 7, "x-").collect();
        let b: Vec<Value> = resources(30, 7, "x-").collect();
        assert_eq!(a, b);
        let c: Vec<Value> = resources(30, 8, "x-").collect();
        assert_ne!(a, c);
        assert_eq!(a[1]["beneficiary"]["reference"], "Patient/x-pat-0");
        assert_eq!(a[5]["patient"]["reference"], "Patient/x-pat-1");
        assert_eq!(a[5]["insurance"][0]["coverage"]["reference"], "Coverage/x-cov-1");
        let ids: std::collections::HashSet<_> = a.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), a.len(), "ids are unique");
    }

    #[test]
    fn ndjson_round_trips() {
        let dir = std::env::temp_dir().join(format!("payerx-synth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.ndjson");
        let bytes = write_ndjson(&path, 10, 1, "n-").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bytes, text.len() as u64);
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines, resources(10, 1, "n-").collect::<Vec<_>>());
    }
}
