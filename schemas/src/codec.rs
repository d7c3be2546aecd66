//! Direct Avro encoders for events written on hot paths. apache-avro's serde route
//! (`to_value` → `resolve` → datum) costs more than the work an audit record describes; these
//! write the same bytes straight from the struct. Tests hold them byte-for-byte equal to
//! apache-avro's encoding of the published schema, so the contract cannot drift.

use crate::events::{AuditOutcome, AuditRecorded, Envelope};
use crate::{registry, wire};

/// Schema id this encoder writes; a test checks it is the newest `AuditRecorded`.
pub const AUDIT_RECORDED_SCHEMA_ID: u32 = 201;

fn long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// `["null", "string"]`.
fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => long(out, 0),
        Some(s) => {
            long(out, 1);
            string(out, s);
        }
    }
}

fn envelope(out: &mut Vec<u8>, e: &Envelope) {
    string(out, &e.event_id);
    string(out, &e.event_type);
    long(out, e.occurred_at);
    string(out, &e.correlation_id);
    opt_string(out, e.causation_id.as_deref());
    opt_string(out, e.client_id.as_deref());
    long(out, i64::from(e.schema_version));
}

/// The Confluent-framed value of an `AuditRecorded` (schema id 201).
pub fn encode_audit_recorded(ev: &AuditRecorded) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&wire::frame(AUDIT_RECORDED_SCHEMA_ID, &[]));
    envelope(&mut out, &ev.envelope);
    string(&mut out, &ev.action);
    long(&mut out, if ev.outcome == AuditOutcome::Success { 0 } else { 1 });
    match ev.http_status {
        None => long(&mut out, 0),
        Some(s) => {
            long(&mut out, 1);
            long(&mut out, i64::from(s));
        }
    }
    for field in [&ev.client_id, &ev.subject, &ev.patient, &ev.resource_type, &ev.resource_id, &ev.request, &ev.scope] {
        opt_string(&mut out, field.as_deref());
    }
    string(&mut out, &ev.detail);
    debug_assert!(registry::by_id(AUDIT_RECORDED_SCHEMA_ID).is_some());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::registry::{decode_event, encode_event, latest};

    fn sample(mask: u32) -> AuditRecorded {
        let opt = |bit: u32, s: &str| (mask & (1 << bit) != 0).then(|| s.to_string());
        let mut envelope = Envelope::new("AuditRecorded", 1, "corr-é".into(), opt(0, "client-1"));
        envelope.causation_id = opt(1, "cause");
        envelope.occurred_at = if mask & 1 == 0 { -5 } else { 1_790_000_000_123_456 };
        AuditRecorded {
            envelope,
            action: "fhir.read".into(),
            outcome: if mask & 4 == 0 { AuditOutcome::Success } else { AuditOutcome::Failure },
            http_status: (mask & 8 != 0).then_some(if mask & 16 == 0 { 200 } else { 70_000 }),
            client_id: opt(2, "client-1"),
            subject: opt(3, "member-ümlaut"),
            patient: opt(4, "p1"),
            resource_type: opt(5, "Patient"),
            resource_id: opt(6, "p1"),
            request: opt(7, &"GET /fhir/Patient/p1 ".repeat(20)),
            scope: opt(8, "patient/*.rs"),
            detail: if mask & 512 == 0 { String::new() } else { "refused: x".repeat(30) },
        }
    }

    #[test]
    fn writes_the_same_bytes_as_apache_avro() {
        assert_eq!(
            latest("AuditRecorded").map(|s| s.id),
            Some(AUDIT_RECORDED_SCHEMA_ID),
            "a new AuditRecorded version needs this encoder updated"
        );
        for mask in 0..1024 {
            let ev = sample(mask);
            let ours = encode_audit_recorded(&ev);
            assert_eq!(ours, encode_event(&ev).unwrap(), "mask {mask}");
            assert_eq!(decode_event::<AuditRecorded>(&ours).unwrap(), ev);
        }
    }
}
