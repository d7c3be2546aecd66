//! Direct Avro codecs for the events on hot paths. apache-avro's serde route
//! (`to_value` → `resolve` → datum, and back) costs more than the work a resource change or an
//! audit record describes; these read and write the same bytes straight from the structs.
//! `encode_event`/`decode_event` use them through [`crate::Event`]; tests hold them
//! byte-for-byte equal to apache-avro on the published schemas, so the contract cannot drift.

use crate::events::{AuditOutcome, AuditRecorded, ChangeAction, Envelope, ResourceChange, ResourceChanged, WriteMode};
use crate::SchemaError;

/// Schema ids these codecs write and read; a test checks each is its name's newest version.
pub const RESOURCE_CHANGED_SCHEMA_ID: u32 = 101;
pub const AUDIT_RECORDED_SCHEMA_ID: u32 = 201;

struct Writer(Vec<u8>);

impl Writer {
    fn framed(schema_id: u32, capacity: usize) -> Writer {
        let mut out = Vec::with_capacity(5 + capacity);
        out.push(crate::wire::MAGIC);
        out.extend_from_slice(&schema_id.to_be_bytes());
        Writer(out)
    }

    fn long(&mut self, n: i64) {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            self.0.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }

    fn string(&mut self, s: &str) {
        self.long(s.len() as i64);
        self.0.extend_from_slice(s.as_bytes());
    }

    /// `["null", "string"]`.
    fn opt_string(&mut self, s: Option<&str>) {
        match s {
            None => self.long(0),
            Some(s) => {
                self.long(1);
                self.string(s);
            }
        }
    }

    /// `["null", "long"]` and `["null", "int"]` (ints are written as longs).
    fn opt_long(&mut self, n: Option<i64>) {
        match n {
            None => self.long(0),
            Some(n) => {
                self.long(1);
                self.long(n);
            }
        }
    }

    fn envelope(&mut self, e: &Envelope) {
        self.string(&e.event_id);
        self.string(&e.event_type);
        self.long(e.occurred_at);
        self.string(&e.correlation_id);
        self.opt_string(e.causation_id.as_deref());
        self.opt_string(e.client_id.as_deref());
        self.long(i64::from(e.schema_version));
    }
}

/// A cursor over one datum; every read checks bounds, so a truncated or hostile value is an
/// error, never a panic or a huge allocation.
struct Reader<'a>(&'a [u8]);

fn malformed(what: &str) -> SchemaError {
    SchemaError::Avro(format!("malformed datum: {what}"))
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Result<i64, SchemaError> {
        let mut z: u64 = 0;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(malformed("truncated or overlong varint"))
    }

    fn int(&mut self) -> Result<i32, SchemaError> {
        i32::try_from(self.long()?).map_err(|_| malformed("int out of range"))
    }

    /// An index into `n` choices (union branch, enum symbol).
    fn index(&mut self, n: usize, what: &str) -> Result<usize, SchemaError> {
        let i = self.long()?;
        usize::try_from(i).ok().filter(|&i| i < n).ok_or_else(|| malformed(&format!("{what} index {i}")))
    }

    fn str(&mut self) -> Result<&'a str, SchemaError> {
        let len = usize::try_from(self.long()?).map_err(|_| malformed("negative length"))?;
        if len > self.0.len() {
            return Err(malformed("string runs past the end"));
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).map_err(|_| malformed("string is not UTF-8"))
    }

    fn string(&mut self) -> Result<String, SchemaError> {
        self.str().map(str::to_string)
    }

    fn opt_string(&mut self) -> Result<Option<String>, SchemaError> {
        Ok(match self.index(2, "union")? {
            0 => None,
            _ => Some(self.string()?),
        })
    }

    fn opt_long(&mut self) -> Result<Option<i64>, SchemaError> {
        Ok(match self.index(2, "union")? {
            0 => None,
            _ => Some(self.long()?),
        })
    }

    fn boolean(&mut self) -> Result<bool, SchemaError> {
        match self.0.split_first() {
            Some((&b @ (0 | 1), rest)) => {
                self.0 = rest;
                Ok(b == 1)
            }
            _ => Err(malformed("boolean")),
        }
    }

    /// The item count of the next array block (0 ends the array); a negative count is followed
    /// by the block's byte size, which a reader that decodes every item does not need.
    fn block(&mut self) -> Result<usize, SchemaError> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        let n = usize::try_from(n.unsigned_abs()).map_err(|_| malformed("array block"))?;
        // Every item takes at least one byte, so a count beyond the bytes left is a lie.
        if n > self.0.len() {
            return Err(malformed("array block larger than the datum"));
        }
        Ok(n)
    }

    fn envelope(&mut self) -> Result<Envelope, SchemaError> {
        Ok(Envelope {
            event_id: self.string()?,
            event_type: self.string()?,
            occurred_at: self.long()?,
            correlation_id: self.string()?,
            causation_id: self.opt_string()?,
            client_id: self.opt_string()?,
            schema_version: self.int()?,
        })
    }

    fn end(self) -> Result<(), SchemaError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(malformed(&format!("{} bytes after the record", self.0.len())))
        }
    }
}

const WRITE_MODES: [WriteMode; 3] = [WriteMode::Single, WriteMode::BatchEntry, WriteMode::Transaction];

/// The Confluent-framed value of a `ResourceChanged` (schema id 101).
pub fn encode_resource_changed(ev: &ResourceChanged) -> Vec<u8> {
    let size: usize = ev.changes.iter().map(|c| 32 + c.resource.as_ref().map_or(0, String::len)).sum();
    let mut w = Writer::framed(RESOURCE_CHANGED_SCHEMA_ID, 160 + size);
    w.envelope(&ev.envelope);
    w.long(WRITE_MODES.iter().position(|m| *m == ev.mode).unwrap_or(0) as i64);
    if !ev.changes.is_empty() {
        w.long(ev.changes.len() as i64);
        for c in &ev.changes {
            w.long(if c.action == ChangeAction::Upsert { 0 } else { 1 });
            w.string(&c.resource_type);
            w.string(&c.resource_id);
            w.opt_string(c.resource.as_deref());
            w.opt_long(c.if_match);
            w.0.push(u8::from(c.created));
        }
    }
    w.long(0);
    w.0
}

/// Reads a `ResourceChanged` datum written with schema id 101 (older or newer ids go through
/// apache-avro's schema resolution instead).
pub fn decode_resource_changed(datum: &[u8]) -> Result<ResourceChanged, SchemaError> {
    let mut r = Reader(datum);
    let envelope = r.envelope()?;
    let mode = WRITE_MODES[r.index(WRITE_MODES.len(), "WriteMode")?];
    let mut changes = Vec::new();
    loop {
        let n = r.block()?;
        if n == 0 {
            break;
        }
        changes.reserve(n);
        for _ in 0..n {
            changes.push(ResourceChange {
                action: if r.index(2, "ChangeAction")? == 0 { ChangeAction::Upsert } else { ChangeAction::Delete },
                resource_type: r.string()?,
                resource_id: r.string()?,
                resource: r.opt_string()?,
                if_match: r.opt_long()?,
                created: r.boolean()?,
            });
        }
    }
    r.end()?;
    Ok(ResourceChanged { envelope, mode, changes })
}

/// The Confluent-framed value of an `AuditRecorded` (schema id 201).
pub fn encode_audit_recorded(ev: &AuditRecorded) -> Vec<u8> {
    let mut w = Writer::framed(AUDIT_RECORDED_SCHEMA_ID, 256);
    w.envelope(&ev.envelope);
    w.string(&ev.action);
    w.long(if ev.outcome == AuditOutcome::Success { 0 } else { 1 });
    w.opt_long(ev.http_status.map(i64::from));
    for field in [&ev.client_id, &ev.subject, &ev.patient, &ev.resource_type, &ev.resource_id, &ev.request, &ev.scope] {
        w.opt_string(field.as_deref());
    }
    w.string(&ev.detail);
    w.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::registry::{decode_event, encode_event, latest, via_apache_avro};

    fn audit(mask: u32) -> AuditRecorded {
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

    fn change(mask: u32, i: u32) -> ResourceChange {
        ResourceChange {
            action: if (mask + i) & 1 == 0 { ChangeAction::Upsert } else { ChangeAction::Delete },
            resource_type: "ExplanationOfBenefit".into(),
            resource_id: format!("eob-{i}"),
            resource: (mask & 2 != 0).then(|| {
                format!(
                    "{{\"resourceType\":\"ExplanationOfBenefit\",\"id\":\"eob-{i}\",\"x\":\"{}\"}}",
                    "ü".repeat(i as usize * 40)
                )
            }),
            if_match: (mask & 4 != 0).then_some(if i == 0 { -1 } else { i64::MAX - i64::from(i) }),
            created: mask & 8 != 0,
        }
    }

    fn resource_changed(mask: u32) -> ResourceChanged {
        let mut envelope =
            Envelope::new("ResourceChanged", 1, "corr".into(), (mask & 16 != 0).then(|| "client".into()));
        envelope.causation_id = (mask & 32 != 0).then(|| "cause".into());
        envelope.occurred_at = if mask & 64 == 0 { 0 } else { i64::MIN + 1 };
        let count = [0, 1, 3, 70][(mask >> 7) as usize & 3];
        ResourceChanged {
            envelope,
            mode: WRITE_MODES[(mask >> 9) as usize % 3],
            changes: (0..count).map(|i| change(mask, i)).collect(),
        }
    }

    #[test]
    fn the_codecs_are_the_newest_schemas() {
        assert_eq!(latest("ResourceChanged").map(|s| s.id), Some(RESOURCE_CHANGED_SCHEMA_ID));
        assert_eq!(latest("AuditRecorded").map(|s| s.id), Some(AUDIT_RECORDED_SCHEMA_ID));
    }

    #[test]
    fn audit_writes_the_same_bytes_as_apache_avro() {
        for mask in 0..1024 {
            let ev = audit(mask);
            let ours = encode_audit_recorded(&ev);
            assert_eq!(ours, via_apache_avro::encode(&ev).unwrap(), "mask {mask}");
            assert_eq!(encode_event(&ev).unwrap(), ours, "encode_event takes the direct route");
            assert_eq!(via_apache_avro::decode::<AuditRecorded>(&ours).unwrap(), ev);
        }
    }

    #[test]
    fn resource_changed_reads_and_writes_the_same_bytes_as_apache_avro() {
        for mask in 0..(1 << 11) {
            let ev = resource_changed(mask);
            let ours = encode_resource_changed(&ev);
            assert_eq!(ours, via_apache_avro::encode(&ev).unwrap(), "mask {mask}");
            assert_eq!(encode_event(&ev).unwrap(), ours, "encode_event takes the direct route");
            assert_eq!(decode_event::<ResourceChanged>(&ours).unwrap(), ev, "mask {mask}");
            assert_eq!(decode_resource_changed(&ours[5..]).unwrap(), ev, "mask {mask}");
        }
    }

    /// Avro writers may split an array into blocks and give a negative count with a byte size.
    #[test]
    fn resource_changed_reads_blocked_arrays() {
        let ev = resource_changed(2 | (3 << 7));
        let ours = encode_resource_changed(&ev);
        let mut w = Writer(Vec::new());
        w.envelope(&ev.envelope);
        w.long(0);
        let head = w.0.len();
        let body = &ours[5 + head..];
        // Re-block: the count (70) as -2 with a size, then the rest as one positive block.
        let mut items = Reader(body);
        assert_eq!(items.long().unwrap(), 70);
        let start = items.0;
        let mut walk = Reader(start);
        for _ in 0..2 {
            walk.index(2, "a").unwrap();
            walk.str().unwrap();
            walk.str().unwrap();
            walk.opt_string().unwrap();
            walk.opt_long().unwrap();
            walk.boolean().unwrap();
        }
        let two = start.len() - walk.0.len();
        let mut re = Writer(w.0.clone());
        re.long(-2);
        re.long(two as i64);
        re.0.extend_from_slice(&start[..two]);
        re.long(68);
        re.0.extend_from_slice(walk.0);
        assert_eq!(decode_resource_changed(&re.0).unwrap(), ev);
    }

    #[test]
    fn malformed_resource_changed_is_an_error_not_a_panic() {
        let ours = encode_resource_changed(&resource_changed(2 | 16 | (2 << 7)));
        let datum = &ours[5..];
        for cut in 0..datum.len() {
            assert!(decode_resource_changed(&datum[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = datum.to_vec();
        trailing.push(0);
        assert!(decode_resource_changed(&trailing).is_err());
        // A huge array count must not allocate: it is checked against the bytes left.
        let mut w = Writer(Vec::new());
        w.envelope(&resource_changed(0).envelope);
        w.long(0);
        w.long(i64::MAX);
        assert!(decode_resource_changed(&w.0).is_err());
        let mut w = Writer(Vec::new());
        w.envelope(&resource_changed(0).envelope);
        w.long(3);
        assert!(decode_resource_changed(&w.0).is_err(), "enum index out of range");
    }
}
