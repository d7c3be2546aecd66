//! The validate processor: reads write submissions, forwards the well-formed ones to
//! `fhir.changes`, and dead-letters the rest with an OperationOutcome naming the element.
//! payerx's edges (the HTTP API, `payerx load`) run the same [`check_change`] themselves and
//! append what passes straight to `fhir.changes`, so API clients get their 400 at once and a
//! checked write is not copied through the log twice; this stage guards everything else that
//! produces to the submissions topic.

use runtime::{Consumed, ProcessError, Processor, Record};
use schemas::topics::{self, headers};
use schemas::{ChangeAction, IssueType, OperationOutcome, ResourceChange, ResourceChanged};

use crate::validate::{is_resource_type, is_valid_id, validate_json, validate_resource, Json};
use schemas::outcome::Issue;

/// Checks one change. `prefix` names where it sits in the request (e.g. `Bundle.entry[2]`), so
/// issue expressions point at the exact element.
pub fn check_change(change: &ResourceChange, prefix: Option<&str>) -> Result<(), OperationOutcome> {
    let at = |expr: &str| match prefix {
        Some(p) => rebase(expr, &change.resource_type, p),
        None => expr.to_string(),
    };
    if !is_resource_type(&change.resource_type) {
        return Err(OperationOutcome::error(
            IssueType::NotSupported,
            format!("'{}' is not a FHIR R4 resource type", change.resource_type),
        )
        .at(at("resourceType")));
    }
    if !is_valid_id(&change.resource_id) {
        return Err(OperationOutcome::error(
            IssueType::Value,
            format!("'{}' is not a valid id (1-64 of A-Z a-z 0-9 - .)", change.resource_id),
        )
        .at(at(&format!("{}.id", change.resource_type))));
    }
    match change.action {
        ChangeAction::Delete => Ok(()),
        ChangeAction::Upsert => {
            let Some(body) = change.resource.as_deref() else {
                return Err(OperationOutcome::error(IssueType::Required, "an upsert needs a resource body")
                    .at(at(&change.resource_type)));
            };
            match Json::parse(body) {
                Ok(value) => check_json(&value, &change.resource_type, &change.resource_id, prefix),
                // serde_json words the error (the message clients always got), and reads the
                // rare document the tape refuses but JSON allows (deeper nesting).
                Err(_) => match serde_json::from_str::<serde_json::Value>(body) {
                    Ok(value) => check_resource(&value, &change.resource_type, &change.resource_id, prefix),
                    Err(e) => {
                        Err(OperationOutcome::error(IssueType::Structure, format!("resource is not valid JSON: {e}"))
                            .at(at(&change.resource_type)))
                    }
                },
            }
        }
    }
}

/// Checks a parsed resource against the write's type and id, then the R4 structure rules.
pub fn check_resource(
    value: &serde_json::Value,
    rtype: &str,
    id: &str,
    prefix: Option<&str>,
) -> Result<(), OperationOutcome> {
    let member = |k: &str| value.get(k).and_then(|v| v.as_str());
    check(member("resourceType"), member("id"), rtype, id, prefix, || validate_resource(value))
}

/// [`check_resource`] for a resource parsed with [`Json::parse`] (no `serde_json::Value` built).
pub fn check_json(value: &Json, rtype: &str, id: &str, prefix: Option<&str>) -> Result<(), OperationOutcome> {
    let member = |k: &str| value.str(k);
    check(member("resourceType"), member("id"), rtype, id, prefix, || validate_json(value))
}

fn check(
    body_type: Option<&str>,
    body_id: Option<&str>,
    rtype: &str,
    id: &str,
    prefix: Option<&str>,
    validate: impl FnOnce() -> Result<(), Vec<Issue>>,
) -> Result<(), OperationOutcome> {
    let at = |expr: &str| match prefix {
        Some(p) => rebase(expr, rtype, p),
        None => expr.to_string(),
    };
    if body_type != Some(rtype) {
        return Err(OperationOutcome::error(
            IssueType::Invalid,
            format!(
                "resourceType is {}, but the write is for {rtype}",
                body_type.map_or("missing".to_string(), |t| format!("'{t}'"))
            ),
        )
        .at(at("resourceType")));
    }
    match body_id {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(OperationOutcome::error(
                IssueType::Invalid,
                format!("resource id '{body_id}' does not match the id '{id}' it is written under"),
            )
            .at(at(&format!("{rtype}.id"))))
        }
        None => {
            return Err(
                OperationOutcome::error(IssueType::Required, "resource has no id").at(at(&format!("{rtype}.id")))
            )
        }
    }
    validate().map_err(|issues| {
        let mut oo = OperationOutcome { issue: Vec::with_capacity(issues.len()) };
        for mut i in issues {
            if let Some(p) = prefix {
                // Inside a Bundle the FHIRPath continues from the entry: `Bundle.entry[1].resource.birthDate`.
                i.expression = i.expression.into_iter().map(|e| rebase(&e, rtype, p)).collect();
                i.diagnostics = i.diagnostics.map(|d| match d.split_once(": ") {
                    Some((path, rest)) if path.starts_with(rtype) => format!("{}: {rest}", rebase(path, rtype, p)),
                    _ => d,
                });
            }
            oo.push(i);
        }
        oo
    })
}

/// `Patient.birthDate` under prefix `Bundle.entry[1].resource` → `Bundle.entry[1].resource.birthDate`.
fn rebase(expression: &str, rtype: &str, prefix: &str) -> String {
    match expression.strip_prefix(rtype) {
        Some("") => prefix.to_string(),
        Some(rest) if rest.starts_with('.') => format!("{prefix}{rest}"),
        _ => format!("{prefix}.{expression}"),
    }
}

pub struct ValidateProcessor {
    submissions: String,
    changes: String,
    dead_letters: String,
}

impl ValidateProcessor {
    pub const NAME: &'static str = "validate";

    pub fn new(topic_prefix: &str) -> Self {
        ValidateProcessor {
            submissions: topics::full(topic_prefix, topics::FHIR_SUBMISSIONS),
            changes: topics::full(topic_prefix, topics::FHIR_CHANGES),
            dead_letters: topics::full(topic_prefix, topics::VALIDATE_DLQ),
        }
    }
}

fn permanent(oo: OperationOutcome) -> ProcessError {
    ProcessError::Permanent { reason: oo.summary(), outcome: Some(oo.to_json().to_string()) }
}

impl Processor for ValidateProcessor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.submissions.clone()]
    }

    fn dead_letter_topic(&self) -> String {
        self.dead_letters.clone()
    }

    fn process(&self, input: &Consumed) -> Result<Vec<Record>, ProcessError> {
        let ev: ResourceChanged = schemas::decode_event(&input.value).map_err(|e| {
            permanent(OperationOutcome::error(IssueType::Structure, format!("not a ResourceChanged event: {e}")))
        })?;
        if ev.changes.is_empty() {
            return Err(permanent(OperationOutcome::error(IssueType::Required, "the event has no changes")));
        }
        let many = ev.changes.len() > 1;
        for (i, c) in ev.changes.iter().enumerate() {
            let prefix = many.then(|| format!("Bundle.entry[{i}].resource"));
            check_change(c, prefix.as_deref()).map_err(permanent)?;
        }
        let out = ResourceChanged {
            envelope: ev.envelope.derived(
                ResourceChanged::EVENT_TYPE,
                1,
                &input.topic,
                input.partition,
                input.offset,
                0,
            ),
            mode: ev.mode,
            changes: ev.changes,
        };
        let value = schemas::encode_event(&out)
            .map_err(|e| ProcessError::Permanent { reason: e.to_string(), outcome: None })?;
        Ok(vec![Record::new(self.changes.clone(), input.key.clone(), value)
            .header(headers::EVENT_TYPE, ResourceChanged::EVENT_TYPE)
            .header(headers::EVENT_ID, out.envelope.event_id.clone())
            .header(headers::CORRELATION_ID, out.envelope.correlation_id.clone())])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use schemas::{Envelope, WriteMode};

    fn change(body: &str, rtype: &str, id: &str) -> ResourceChange {
        ResourceChange {
            action: ChangeAction::Upsert,
            resource_type: rtype.into(),
            resource_id: id.into(),
            resource: Some(body.into()),
            if_match: None,
            created: false,
        }
    }

    fn consumed(ev: &ResourceChanged) -> Consumed {
        Consumed {
            topic: "payerx.fhir.submissions".into(),
            partition: 1,
            offset: 42,
            key: ev.key(),
            value: schemas::encode_event(ev).unwrap(),
            headers: vec![],
            timestamp_ms: 0,
        }
    }

    fn event(changes: Vec<ResourceChange>) -> ResourceChanged {
        ResourceChanged {
            envelope: Envelope::new("ResourceChanged", 1, "c".into(), None),
            mode: WriteMode::Single,
            changes,
        }
    }

    #[test]
    fn forwards_a_valid_write_with_a_deterministic_id() {
        let p = ValidateProcessor::new("payerx.");
        let input = consumed(&event(vec![change(
            r#"{"resourceType":"Patient","id":"p1","gender":"female"}"#,
            "Patient",
            "p1",
        )]));
        let out = p.process(&input).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "payerx.fhir.changes");
        assert_eq!(out[0].key, "Patient/p1");
        let again = p.process(&input).unwrap();
        assert_eq!(out[0].value, again[0].value, "redelivery derives the same event");
        let fwd: ResourceChanged = schemas::decode_event(&out[0].value).unwrap();
        assert_eq!(
            fwd.envelope.causation_id.as_deref(),
            Some(schemas::decode_event::<ResourceChanged>(&input.value).unwrap().envelope.event_id.as_str())
        );
    }

    #[test]
    fn refuses_with_the_element_named() {
        let p = ValidateProcessor::new("payerx.");
        let bad = r#"{"resourceType":"Patient","id":"p1","birthDate":"1980-13-45"}"#;
        let err = p.process(&consumed(&event(vec![change(bad, "Patient", "p1")]))).unwrap_err();
        let ProcessError::Permanent { outcome: Some(oo), .. } = err else { panic!("expected a permanent error") };
        assert!(oo.contains("Patient.birthDate"), "{oo}");
    }

    #[test]
    fn transaction_entries_are_named_by_index() {
        let ok = change(r#"{"resourceType":"Patient","id":"a"}"#, "Patient", "a");
        let bad = change(r#"{"resourceType":"Patient","id":"b","active":"yes"}"#, "Patient", "b");
        let err = check_change(&bad, Some("Bundle.entry[1].resource")).unwrap_err();
        assert!(err.issue[0].expression[0].starts_with("Bundle.entry[1].resource.active"), "{:?}", err);
        assert!(check_change(&ok, None).is_ok());
    }

    #[test]
    fn unknown_type_bad_id_and_mismatches() {
        assert!(check_change(&change(r#"{"resourceType":"Patience","id":"a"}"#, "Patience", "a"), None).is_err());
        let e = check_change(&change(r#"{"resourceType":"Patient","id":"a b"}"#, "Patient", "a b"), None).unwrap_err();
        assert_eq!(e.issue[0].expression, vec!["Patient.id"]);
        let e = check_change(&change(r#"{"resourceType":"Patient","id":"x"}"#, "Patient", "y"), None).unwrap_err();
        assert_eq!(e.issue[0].expression, vec!["Patient.id"]);
        let e = check_change(&change(r#"{"resourceType":"Coverage","id":"x"}"#, "Patient", "x"), None).unwrap_err();
        assert_eq!(e.issue[0].expression, vec!["resourceType"]);
        let e = check_change(&change("{not json", "Patient", "x"), None).unwrap_err();
        assert_eq!(e.issue[0].code, IssueType::Structure);
    }

    #[test]
    fn undecodable_input_is_dead_lettered() {
        let p = ValidateProcessor::new("payerx.");
        let input = Consumed {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: "k".into(),
            value: b"garbage".to_vec(),
            headers: vec![],
            timestamp_ms: 0,
        };
        assert!(matches!(p.process(&input), Err(ProcessError::Permanent { .. })));
    }
}
