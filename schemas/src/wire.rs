//! Confluent wire framing: magic byte `0x00`, 4-byte big-endian schema id, then the Avro datum.

use crate::SchemaError;

pub const MAGIC: u8 = 0;

pub fn frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Splits a framed value into its schema id and datum.
pub fn unframe(value: &[u8]) -> Result<(u32, &[u8]), SchemaError> {
    if value.len() < 5 {
        return Err(SchemaError::Framing(format!("{} bytes, need at least 5", value.len())));
    }
    if value[0] != MAGIC {
        return Err(SchemaError::Framing(format!("magic byte {:#04x}, expected 0x00", value[0])));
    }
    let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok((id, &value[5..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = frame(0x0102_0304, b"abc");
        assert_eq!(v, [0, 1, 2, 3, 4, b'a', b'b', b'c']);
        let (id, d) = unframe(&v).expect("framed");
        assert_eq!(id, 0x0102_0304);
        assert_eq!(d, b"abc");
    }

    #[test]
    fn rejects_short_and_bad_magic() {
        assert!(unframe(&[0, 0, 0]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 1]).is_err());
    }
}
