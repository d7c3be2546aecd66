//! The schema table: every published `.avsc`, its Confluent schema id, and the typed codec.
//!
//! payerx does not need a Schema Registry: ids are fixed here and published in the README
//! (id = 100 × family + version), so a consumer outside payerx decodes any topic with the
//! `.avsc` files alone. A deployment that runs a Confluent Schema Registry can register the same
//! files under the same ids.

use std::sync::OnceLock;

use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value, Schema};
use serde::{de::DeserializeOwned, Serialize};

use crate::{codec, wire, ResourceChanged, SchemaError};

pub struct SchemaInfo {
    /// Confluent schema id written in the frame.
    pub id: u32,
    /// Record name (the event type).
    pub name: &'static str,
    pub version: i32,
    /// Path of the `.avsc` relative to `schemas/avro/`.
    pub file: &'static str,
    pub avsc: &'static str,
    parsed: OnceLock<Schema>,
}

impl SchemaInfo {
    const fn new(id: u32, name: &'static str, version: i32, file: &'static str, avsc: &'static str) -> Self {
        SchemaInfo { id, name, version, file, avsc, parsed: OnceLock::new() }
    }

    /// The parsed schema. The `.avsc` files are compiled in and checked by tests, so a parse
    /// failure is a build defect, not a runtime condition.
    pub fn schema(&self) -> &Schema {
        self.parsed.get_or_init(|| {
            #[allow(clippy::expect_used)]
            Schema::parse_str(self.avsc).expect("compiled-in .avsc parses (checked by tests)")
        })
    }
}

/// Every schema version ever published, oldest first within a name. Never remove or edit an
/// entry: add a new version with defaults for its new fields.
pub static SCHEMAS: [SchemaInfo; 5] = [
    SchemaInfo::new(
        101,
        "ResourceChanged",
        1,
        "resource-changed/v1.avsc",
        include_str!("../avro/resource-changed/v1.avsc"),
    ),
    SchemaInfo::new(201, "AuditRecorded", 1, "audit-recorded/v1.avsc", include_str!("../avro/audit-recorded/v1.avsc")),
    SchemaInfo::new(
        301,
        "AttachmentEvent",
        1,
        "attachment-event/v1.avsc",
        include_str!("../avro/attachment-event/v1.avsc"),
    ),
    SchemaInfo::new(
        401,
        "MemberMatchRequested",
        1,
        "member-match-request/v1.avsc",
        include_str!("../avro/member-match-request/v1.avsc"),
    ),
    SchemaInfo::new(
        501,
        "MemberMatchDecided",
        1,
        "member-match-decision/v1.avsc",
        include_str!("../avro/member-match-decision/v1.avsc"),
    ),
];

pub fn by_id(id: u32) -> Option<&'static SchemaInfo> {
    SCHEMAS.iter().find(|s| s.id == id)
}

/// The newest version of a schema name (what payerx writes and reads into).
pub fn latest(name: &str) -> Option<&'static SchemaInfo> {
    SCHEMAS.iter().filter(|s| s.name == name).max_by_key(|s| s.version)
}

/// A typed event with a published schema. Events on hot paths also have a direct codec
/// (`crate::codec`) for their newest schema, held byte-equal to apache-avro by tests.
pub trait Event: Serialize + DeserializeOwned {
    const NAME: &'static str;

    /// The framed value written straight from the struct, when this event has a direct encoder.
    fn encode_direct(&self) -> Option<Vec<u8>> {
        None
    }

    /// The event read straight from a datum of schema `id`, when a direct decoder knows that id.
    fn decode_direct(_id: u32, _datum: &[u8]) -> Option<Result<Self, SchemaError>> {
        None
    }
}

impl Event for ResourceChanged {
    const NAME: &'static str = ResourceChanged::EVENT_TYPE;

    fn encode_direct(&self) -> Option<Vec<u8>> {
        Some(codec::encode_resource_changed(self))
    }

    fn decode_direct(id: u32, datum: &[u8]) -> Option<Result<Self, SchemaError>> {
        (id == codec::RESOURCE_CHANGED_SCHEMA_ID).then(|| codec::decode_resource_changed(datum))
    }
}

impl Event for crate::events::AuditRecorded {
    const NAME: &'static str = crate::events::AuditRecorded::EVENT_TYPE;

    fn encode_direct(&self) -> Option<Vec<u8>> {
        Some(codec::encode_audit_recorded(self))
    }
}

impl Event for crate::events::AttachmentEvent {
    const NAME: &'static str = crate::events::AttachmentEvent::EVENT_TYPE;
}

impl Event for crate::events::MemberMatchRequested {
    const NAME: &'static str = crate::events::MemberMatchRequested::EVENT_TYPE;
}

impl Event for crate::events::MemberMatchDecided {
    const NAME: &'static str = crate::events::MemberMatchDecided::EVENT_TYPE;
}

/// Encodes with the newest schema of `E`, framed the Confluent way.
pub fn encode_event<E: Event>(event: &E) -> Result<Vec<u8>, SchemaError> {
    match event.encode_direct() {
        Some(bytes) => Ok(bytes),
        None => via_apache_avro::encode(event),
    }
}

/// Decodes a framed value written with any version of `E`'s schema into the newest shape.
pub fn decode_event<E: Event>(bytes: &[u8]) -> Result<E, SchemaError> {
    let (id, datum) = wire::unframe(bytes)?;
    match E::decode_direct(id, datum) {
        Some(decoded) => decoded,
        None => via_apache_avro::decode(bytes),
    }
}

/// The general route through apache-avro, with schema resolution from any older version.
pub(crate) mod via_apache_avro {
    use super::*;

    pub fn encode<E: Event>(event: &E) -> Result<Vec<u8>, SchemaError> {
        let info = latest(E::NAME).ok_or_else(|| SchemaError::Avro(format!("no schema named {}", E::NAME)))?;
        let value = to_value(event)?.resolve(info.schema())?;
        let datum = to_avro_datum(info.schema(), value)?;
        Ok(wire::frame(info.id, &datum))
    }

    pub fn decode<E: Event>(bytes: &[u8]) -> Result<E, SchemaError> {
        let (id, datum) = wire::unframe(bytes)?;
        let writer = by_id(id).ok_or(SchemaError::UnknownSchemaId(id))?;
        if writer.name != E::NAME {
            return Err(SchemaError::Avro(format!("schema id {id} is {}, expected {}", writer.name, E::NAME)));
        }
        let reader = latest(E::NAME).unwrap_or(writer);
        let mut cursor = datum;
        let value = from_avro_datum(writer.schema(), &mut cursor, Some(reader.schema()))?;
        Ok(from_value::<E>(&value)?)
    }
}

/// Decodes any framed payerx value into JSON (for `payerx events`), whatever its type.
pub fn decode_to_json(bytes: &[u8]) -> Result<(u32, &'static str, serde_json::Value), SchemaError> {
    let (id, datum) = wire::unframe(bytes)?;
    let writer = by_id(id).ok_or(SchemaError::UnknownSchemaId(id))?;
    let mut cursor = datum;
    let value = from_avro_datum(writer.schema(), &mut cursor, None)?;
    Ok((id, writer.name, avro_to_json(value)))
}

/// Plain JSON for any Avro value: unions unwrapped, enums as their symbol, timestamps as numbers.
fn avro_to_json(v: apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as A;
    use serde_json::Value as J;
    match v {
        A::Null => J::Null,
        A::Boolean(b) => J::Bool(b),
        A::Int(i) | A::Date(i) | A::TimeMillis(i) => J::from(i),
        A::Long(i) | A::TimeMicros(i) | A::TimestampMillis(i) | A::TimestampMicros(i) => J::from(i),
        A::LocalTimestampMillis(i) | A::LocalTimestampMicros(i) => J::from(i),
        A::Float(f) => J::from(f),
        A::Double(f) => J::from(f),
        A::String(s) | A::Enum(_, s) => J::String(s),
        A::Uuid(u) => J::String(u.to_string()),
        A::Bytes(b) | A::Fixed(_, b) => J::String(String::from_utf8_lossy(&b).into_owned()),
        A::Union(_, inner) => avro_to_json(*inner),
        A::Array(items) => J::Array(items.into_iter().map(avro_to_json).collect()),
        A::Map(m) => J::Object(m.into_iter().map(|(k, v)| (k, avro_to_json(v))).collect()),
        A::Record(fields) => J::Object(fields.into_iter().map(|(k, v)| (k, avro_to_json(v))).collect()),
        other => J::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use apache_avro::schema_compatibility::SchemaCompatibility;

    fn sample() -> ResourceChanged {
        ResourceChanged {
            envelope: Envelope::new("ResourceChanged", 1, "corr-1".into(), Some("client-a".into())),
            mode: WriteMode::Transaction,
            changes: vec![
                ResourceChange {
                    action: ChangeAction::Upsert,
                    resource_type: "Patient".into(),
                    resource_id: "p1".into(),
                    resource: Some(r#"{"resourceType":"Patient","id":"p1"}"#.into()),
                    if_match: Some(3),
                    created: false,
                },
                ResourceChange {
                    action: ChangeAction::Delete,
                    resource_type: "Coverage".into(),
                    resource_id: "c1".into(),
                    resource: None,
                    if_match: None,
                    created: false,
                },
            ],
        }
    }

    #[test]
    fn every_schema_parses_and_ids_are_unique() {
        let mut ids = std::collections::HashSet::new();
        for s in &SCHEMAS {
            assert!(ids.insert(s.id), "duplicate schema id {}", s.id);
            assert_eq!(s.id, 100 * (s.id / 100) + s.version as u32, "id scheme for {}", s.file);
            let parsed = Schema::parse_str(s.avsc).unwrap_or_else(|e| panic!("{}: {e}", s.file));
            assert_eq!(parsed.name().map(|n| n.name.as_str()), Some(s.name));
        }
    }

    /// Evolution rule: every version of a schema reads data written with every older version.
    #[test]
    fn every_version_reads_every_older_one() {
        for newer in &SCHEMAS {
            for older in SCHEMAS.iter().filter(|o| o.name == newer.name && o.version <= newer.version) {
                let r = SchemaCompatibility::can_read(older.schema(), newer.schema());
                assert!(r.is_ok(), "{} v{} cannot read v{}: {r:?}", newer.name, newer.version, older.version);
            }
        }
    }

    /// The compatibility check above is not vacuous: a new field without a default is caught.
    #[test]
    fn compatibility_check_catches_a_breaking_change() {
        let info = latest("ResourceChanged").expect("schema");
        let broken = info.avsc.replacen(
            r#""fields": ["#,
            r#""fields": [{"name": "added_without_default", "type": "string"},"#,
            1,
        );
        let broken = Schema::parse_str(&broken).expect("parses");
        assert!(SchemaCompatibility::can_read(info.schema(), &broken).is_err());
    }

    #[test]
    fn round_trip_with_confluent_framing() {
        let ev = sample();
        let bytes = encode_event(&ev).expect("encode");
        assert_eq!(bytes[0], 0);
        assert_eq!(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]), 101);
        let back: ResourceChanged = decode_event(&bytes).expect("decode");
        assert_eq!(back, ev);
        let (_, name, json) = decode_to_json(&bytes).expect("json");
        assert_eq!(name, "ResourceChanged");
        assert_eq!(json["changes"][1]["action"], "DELETE");
        assert_eq!(json["envelope"]["client_id"], "client-a");
    }

    /// Each `.avsc` is self-contained (outside consumers load one file), so the envelope is
    /// repeated in each: it must be the same record everywhere.
    #[test]
    fn every_schema_carries_the_same_envelope() {
        let envelope = |s: &SchemaInfo| {
            let v: serde_json::Value = serde_json::from_str(s.avsc).expect("json");
            v["fields"][0].clone()
        };
        let first = envelope(&SCHEMAS[0]);
        assert_eq!(first["name"], "envelope");
        for s in &SCHEMAS {
            assert_eq!(envelope(s), first, "{} has a different envelope", s.file);
        }
    }

    #[test]
    fn audit_round_trip() {
        let ev = crate::events::AuditRecorded {
            envelope: Envelope::new("AuditRecorded", 1, "c".into(), Some("app".into())),
            action: "fhir.read".into(),
            outcome: crate::events::AuditOutcome::Failure,
            http_status: Some(403),
            client_id: Some("app".into()),
            subject: None,
            patient: Some("p1".into()),
            resource_type: Some("Patient".into()),
            resource_id: Some("p2".into()),
            request: Some("GET /fhir/Patient/p2".into()),
            scope: Some("patient/*.rs".into()),
            detail: "outside the patient compartment".into(),
        };
        let bytes = encode_event(&ev).expect("encode");
        assert_eq!(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]), 201);
        assert_eq!(decode_event::<crate::events::AuditRecorded>(&bytes).expect("decode"), ev);
    }

    /// Every field of the attachments contract survives the trip, the nested records and the
    /// `final` field (a Rust keyword) included.
    #[test]
    fn attachment_event_round_trip() {
        use crate::events::*;
        let id = |v: &str| Some(Identifier { system: Some("http://hl7.org/fhir/sid/us-npi".into()), value: v.into() });
        let mut ev = AttachmentEvent::new(
            Envelope::new("AttachmentEvent", 1, "c".into(), Some("ehr".into())),
            AttachmentEventKind::Linked,
            "PA-1".into(),
        );
        ev.submission_id = Some("sub-1".into());
        ev.attach_to = Some(AttachTo::Preauthorization);
        ev.member_id = Some(Identifier { system: None, value: "M1".into() });
        (ev.payer_id, ev.organization_id, ev.provider_id, ev.admin_ref_number) = (id("p"), id("o"), id("pr"), id("a"));
        ev.service_date = Some("2026-11-01".into());
        ev.is_final = Some(false);
        ev.attachments = vec![SubmittedAttachment {
            index: 2,
            line_items: vec!["1".into(), "3".into()],
            code: Some(r#"{"coding":[{"code":"11506-3"}]}"#.into()),
            resource_type: "DocumentReference".into(),
            resource: r#"{"resourceType":"DocumentReference"}"#.into(),
            document_reference: Some("DocumentReference/d1".into()),
            content: vec![AttachmentContent {
                path: "/content/0/attachment".into(),
                content_type: Some("application/pdf".into()),
                source_url: None,
                blob: Some(Blob {
                    sha256: "ab".repeat(32),
                    sha1: "x".into(),
                    size: 1 << 40,
                    location: "file:///b".into(),
                }),
            }],
        }];
        ev.case_ref = Some("Claim/c1".into());
        ev.case_patient = Some("Patient/p1".into());
        ev.case_items = vec!["1".into()];
        ev.case_identifiers = vec![Identifier { system: Some("urn:pa".into()), value: "PA-1".into() }];
        ev.case_members = vec![Identifier { system: None, value: "M1".into() }];
        ev.unknown_line_items = vec!["3".into()];
        ev.reason = Some("r".into());
        ev.outcome = Some("{}".into());
        let bytes = encode_event(&ev).expect("encode");
        assert_eq!(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]), 301);
        assert_eq!(decode_event::<AttachmentEvent>(&bytes).expect("decode"), ev);
        let (_, _, json) = decode_to_json(&bytes).expect("json");
        assert_eq!(json["final"], false);
        assert_eq!(json["attach_to"], "PREAUTHORIZATION");
        // Every kind maps to its `.avsc` symbol (enums are positional in Avro).
        for (kind, symbol) in [
            (AttachmentEventKind::CaseOpened, "CASE_OPENED"),
            (AttachmentEventKind::Submitted, "SUBMITTED"),
            (AttachmentEventKind::Fetched, "FETCHED"),
            (AttachmentEventKind::Held, "HELD"),
            (AttachmentEventKind::Linked, "LINKED"),
            (AttachmentEventKind::Rejected, "REJECTED"),
            (AttachmentEventKind::FetchFailed, "FETCH_FAILED"),
        ] {
            ev.kind = kind;
            let bytes = encode_event(&ev).expect("encode");
            assert_eq!(decode_event::<AttachmentEvent>(&bytes).expect("decode").kind, kind);
            assert_eq!(decode_to_json(&bytes).expect("json").2["kind"], symbol);
        }
    }

    /// Both member-match contracts survive the trip with every field set, and every outcome
    /// symbol is in the `.avsc` in the enum's order.
    #[test]
    fn member_match_round_trip() {
        let mut req = MemberMatchRequested::new(
            Envelope::new("MemberMatchRequested", 1, "c".into(), Some("payer-b".into())),
            MemberMatchRequestKind::BulkMember,
            "ab12".into(),
        );
        req.member_patient = Some(r#"{"resourceType":"Patient"}"#.into());
        req.coverage_to_match = Some("{}".into());
        req.coverage_to_link = Some("{}".into());
        req.consent = Some("{}".into());
        req.problem = Some("p".into());
        req.bulk_job = Some("job".into());
        req.bulk_index = Some(7);
        req.bulk_total = Some(9);
        req.requester = Some("[]".into());
        let bytes = encode_event(&req).expect("encode");
        assert_eq!(decode_event::<MemberMatchRequested>(&bytes).expect("decode"), req);
        assert_eq!(req.key(), "client/payer-b");

        for outcome in MemberMatchOutcome::ALL {
            let mut d = MemberMatchDecided::new(
                Envelope::new("MemberMatchDecided", 1, "c".into(), None),
                outcome,
                "r".into(),
                "h".into(),
            );
            d.rule = Some("identifier".into());
            d.patient_id = Some("p1".into());
            d.retry_after_s = Some(30);
            d.repeated = true;
            d.bulk_index = Some(3);
            let bytes = encode_event(&d).expect("encode");
            assert_eq!(decode_event::<MemberMatchDecided>(&bytes).expect("decode"), d);
            let (_, _, json) = decode_to_json(&bytes).expect("json");
            assert_eq!(json["outcome"], outcome.as_str());
            assert_eq!(MemberMatchOutcome::parse(outcome.as_str()), Some(outcome));
        }
    }

    #[test]
    fn unknown_schema_id_is_an_error() {
        let bytes = wire::frame(999, &[0]);
        assert!(matches!(decode_event::<ResourceChanged>(&bytes), Err(SchemaError::UnknownSchemaId(999))));
    }
}

#[cfg(test)]
mod published_registry {
    use super::SCHEMAS;

    /// `avro/registry.json` (what outside consumers read) lists exactly the schemas payerx writes.
    #[test]
    fn registry_json_matches_the_table() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../avro/registry.json")).expect("registry.json parses");
        let entries = json.as_array().expect("an array");
        assert_eq!(entries.len(), SCHEMAS.len());
        for s in &SCHEMAS {
            let e = entries
                .iter()
                .find(|e| e["id"] == s.id)
                .unwrap_or_else(|| panic!("schema id {} missing from registry.json", s.id));
            assert_eq!(e["name"], s.name);
            assert_eq!(e["version"], s.version);
            assert_eq!(e["file"], s.file);
        }
        // Every topic a schema is published for is one payerx creates, with that value schema.
        for e in entries {
            for t in e["topics"].as_array().expect("topics") {
                let t = t.as_str().expect("topic name");
                assert!(
                    crate::topics::ALL.iter().any(|(name, schema)| *name == t && *schema == e["name"]),
                    "{t} ({}) is not in topics::ALL",
                    e["name"]
                );
            }
        }
        assert!(crate::topics::ALL.iter().all(|(name, _)| entries
            .iter()
            .any(|e| e["topics"].as_array().is_some_and(|ts| ts.iter().any(|t| t == name)))));
    }
}
