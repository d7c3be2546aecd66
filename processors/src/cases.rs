//! The cases processor: every Claim the payer knows (a PAS prior-auth request accepted by
//! `Claim/$submit`, or a claim or prior auth fed in through the payer feed) opens a case for
//! CDex attachments under each of its identifiers. It re-keys the Claim from `Claim/{id}` to the
//! tracking id, so the attachment-link projection sees a case and its attachments in order on
//! one partition of the attachments topic, whichever arrived first.

use runtime::{Consumed, ProcessError, Processor, Record};
use schemas::topics::{self, headers};
use schemas::{
    AttachTo, AttachmentEvent, AttachmentEventKind, ChangeAction, Identifier, IssueType, OperationOutcome,
    ResourceChanged,
};
use serde_json::Value;

pub struct CasesProcessor {
    changes: String,
    attachments: String,
    dead_letters: String,
}

impl CasesProcessor {
    pub const NAME: &'static str = "cases";

    pub fn new(topic_prefix: &str) -> Self {
        CasesProcessor {
            changes: topics::full(topic_prefix, topics::FHIR_CHANGES),
            attachments: topics::full(topic_prefix, topics::ATTACHMENTS),
            dead_letters: topics::full(topic_prefix, topics::ATTACHMENTS_DLQ),
        }
    }
}

fn identifier(v: &Value) -> Option<Identifier> {
    let value = v.get("value")?.as_str()?.trim();
    (!value.is_empty()).then(|| Identifier {
        system: v.get("system").and_then(Value::as_str).map(str::to_string),
        value: value.to_string(),
    })
}

fn identifiers(v: Option<&Value>) -> Vec<Identifier> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(identifier).collect()
}

/// `Type/id` of a relative reference, if the element is one.
fn reference(v: Option<&Value>) -> Option<&str> {
    v?.get("reference")?.as_str()
}

/// A case as the link projection needs it, from one Claim and the resources written with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub claim_ref: String,
    pub patient: Option<String>,
    pub tracking_ids: Vec<Identifier>,
    pub attach_to: Option<AttachTo>,
    pub items: Vec<String>,
    pub members: Vec<Identifier>,
}

/// The cases opened by one write: each upserted Claim with at least one identifier. Member
/// identifiers come from the Claim's patient reference (its `identifier`, or the Patient and
/// Coverage written in the same event, as a PAS Bundle carries them).
pub fn cases_of(ev: &ResourceChanged) -> Vec<Case> {
    let parsed: Vec<(&str, &str, Value)> = ev
        .changes
        .iter()
        .filter(|c| c.action == ChangeAction::Upsert)
        .filter(|c| matches!(c.resource_type.as_str(), "Claim" | "Patient" | "Coverage"))
        .filter_map(|c| {
            let v = serde_json::from_str(c.resource.as_deref()?).ok()?;
            Some((c.resource_type.as_str(), c.resource_id.as_str(), v))
        })
        .collect();
    let mut out = Vec::new();
    for (rtype, id, claim) in &parsed {
        if *rtype != "Claim" {
            continue;
        }
        let tracking_ids = identifiers(claim.get("identifier"));
        if tracking_ids.is_empty() {
            continue;
        }
        let patient = claim.get("patient");
        let mut members: Vec<Identifier> =
            patient.and_then(|p| p.get("identifier")).and_then(identifier).into_iter().collect();
        if let Some(pref) = reference(patient) {
            // The member's Patient and Coverage: written with the Claim (a PAS Bundle), or
            // contained in it (`#id` references), as payerx stores PAS requests.
            let contained =
                claim.get("contained").and_then(Value::as_array).into_iter().flatten().filter_map(|r| {
                    Some((r.get("resourceType")?.as_str()?, format!("#{}", r.get("id")?.as_str()?), r))
                });
            let written = parsed.iter().map(|(t, pid, v)| (*t, format!("{t}/{pid}"), v));
            for (t, at, v) in written.chain(contained) {
                match t {
                    "Patient" if pref == at => members.extend(identifiers(v.get("identifier"))),
                    "Coverage" if reference(v.get("beneficiary")) == Some(pref) => {
                        members.extend(identifiers(v.get("identifier")));
                        if let Some(s) = v.get("subscriberId").and_then(Value::as_str) {
                            members.push(Identifier { system: None, value: s.to_string() });
                        }
                    }
                    _ => {}
                }
            }
        }
        members.dedup();
        let items = claim
            .get("item")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("sequence").and_then(Value::as_i64))
            .map(|s| s.to_string())
            .collect();
        out.push(Case {
            claim_ref: format!("Claim/{id}"),
            // A contained patient means nothing outside the Claim.
            patient: reference(patient).filter(|r| !r.starts_with('#')).map(str::to_string),
            tracking_ids,
            attach_to: claim.get("use").and_then(Value::as_str).and_then(AttachTo::from_code),
            items,
            members,
        });
    }
    out
}

impl Processor for CasesProcessor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.changes.clone()]
    }

    fn dead_letter_topic(&self) -> String {
        self.dead_letters.clone()
    }

    fn process(&self, input: &Consumed) -> Result<Vec<Record>, ProcessError> {
        // Most changes are not Claims: skip them before decoding anything.
        if !input.key.starts_with("Claim/") && !input.key.starts_with("Bundle/") {
            return Ok(Vec::new());
        }
        let ev: ResourceChanged = schemas::decode_event(&input.value).map_err(|e| {
            let oo = OperationOutcome::error(IssueType::Structure, format!("not a ResourceChanged event: {e}"));
            ProcessError::Permanent { reason: oo.summary(), outcome: Some(oo.to_json().to_string()) }
        })?;
        let mut out = Vec::new();
        for case in cases_of(&ev) {
            for tracking in &case.tracking_ids {
                let envelope = ev.envelope.derived(
                    AttachmentEvent::EVENT_TYPE,
                    1,
                    &input.topic,
                    input.partition,
                    input.offset,
                    out.len() as u32,
                );
                let mut opened =
                    AttachmentEvent::new(envelope, AttachmentEventKind::CaseOpened, tracking.value.clone());
                opened.attach_to = case.attach_to;
                opened.case_ref = Some(case.claim_ref.clone());
                opened.case_patient = case.patient.clone();
                opened.case_items = case.items.clone();
                opened.case_identifiers = case.tracking_ids.clone();
                opened.case_members = case.members.clone();
                let value = schemas::encode_event(&opened)
                    .map_err(|e| ProcessError::Permanent { reason: e.to_string(), outcome: None })?;
                out.push(
                    Record::new(self.attachments.clone(), opened.key(), value)
                        .header(headers::EVENT_TYPE, AttachmentEvent::EVENT_TYPE)
                        .header(headers::EVENT_ID, opened.envelope.event_id.clone())
                        .header(headers::CORRELATION_ID, opened.envelope.correlation_id.clone()),
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use schemas::{Envelope, ResourceChange, WriteMode};
    use serde_json::json;

    fn upsert(rtype: &str, id: &str, v: Value) -> ResourceChange {
        ResourceChange::upsert(rtype, id, v.to_string())
    }

    fn consumed(ev: &ResourceChanged) -> Consumed {
        Consumed {
            topic: "payerx.fhir.changes".into(),
            partition: 0,
            offset: 7,
            key: ev.key(),
            value: schemas::encode_event(ev).unwrap(),
            headers: vec![],
            timestamp_ms: 0,
        }
    }

    fn pas_bundle() -> ResourceChanged {
        ResourceChanged {
            envelope: Envelope::new("ResourceChanged", 1, "c".into(), None),
            mode: WriteMode::Transaction,
            changes: vec![
                upsert(
                    "Patient",
                    "p1",
                    json!({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mb", "value": "M-1"}]}),
                ),
                upsert(
                    "Coverage",
                    "cov1",
                    json!({"resourceType": "Coverage", "id": "cov1", "subscriberId": "S-9", "beneficiary": {"reference": "Patient/p1"}}),
                ),
                upsert(
                    "Claim",
                    "c1",
                    json!({"resourceType": "Claim", "id": "c1", "use": "preauthorization",
                    "identifier": [{"system": "urn:payerx:tracking-id", "value": "PA-1"}, {"value": "EHR-77"}],
                    "patient": {"reference": "Patient/p1"},
                    "item": [{"sequence": 1}, {"sequence": 2}]}),
                ),
            ],
        }
    }

    #[test]
    fn a_pas_claim_opens_a_case_per_identifier_with_its_members() {
        let p = CasesProcessor::new("payerx.");
        let input = consumed(&pas_bundle());
        let out = p.process(&input).unwrap();
        assert_eq!(out.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["PA-1", "EHR-77"]);
        let ev: AttachmentEvent = schemas::decode_event(&out[0].value).unwrap();
        assert_eq!(ev.kind, AttachmentEventKind::CaseOpened);
        assert_eq!(ev.case_ref.as_deref(), Some("Claim/c1"));
        assert_eq!(ev.attach_to, Some(AttachTo::Preauthorization));
        assert_eq!(ev.case_items, ["1", "2"]);
        assert_eq!(ev.case_identifiers.iter().map(|i| i.value.as_str()).collect::<Vec<_>>(), ["PA-1", "EHR-77"]);
        let members: Vec<&str> = ev.case_members.iter().map(|m| m.value.as_str()).collect();
        assert_eq!(members, ["M-1", "S-9"]);
        assert_eq!(out[0].topic, "payerx.attachments");
        assert_eq!(p.process(&input).unwrap()[1].value, out[1].value, "a redelivery derives the same events");
    }

    #[test]
    fn members_come_from_contained_resources_too() {
        let claim = json!({"resourceType": "Claim", "id": "c3", "use": "claim", "identifier": [{"value": "T3"}],
        "patient": {"reference": "#pat"},
        "contained": [
            {"resourceType": "Patient", "id": "pat", "identifier": [{"value": "M-3"}]},
            {"resourceType": "Coverage", "id": "cov", "subscriberId": "S-3", "beneficiary": {"reference": "#pat"}}
        ]});
        let ev = ResourceChanged {
            envelope: Envelope::new("ResourceChanged", 1, "c".into(), None),
            mode: WriteMode::Single,
            changes: vec![upsert("Claim", "c3", claim)],
        };
        let cases = cases_of(&ev);
        let members: Vec<&str> = cases[0].members.iter().map(|m| m.value.as_str()).collect();
        assert_eq!(members, ["M-3", "S-3"]);
        assert_eq!(cases[0].patient, None);
        assert_eq!(cases[0].attach_to, Some(AttachTo::Claim));
    }

    #[test]
    fn other_changes_open_nothing() {
        let p = CasesProcessor::new("payerx.");
        let mut ev = pas_bundle();
        ev.changes.pop();
        assert!(p.process(&consumed(&ev)).unwrap().is_empty());
        let claim_without_identifier = ResourceChanged {
            envelope: Envelope::new("ResourceChanged", 1, "c".into(), None),
            mode: WriteMode::Single,
            changes: vec![upsert("Claim", "c2", json!({"resourceType": "Claim", "id": "c2", "use": "claim"}))],
        };
        assert!(p.process(&consumed(&claim_without_identifier)).unwrap().is_empty());
    }
}
