//! Memory stays bounded by configuration, not by the attachment (DESIGN §8): a ~90 MB
//! `$submit-attachment` body, generated on the fly and never held whole, streams through the
//! reader into a blob store while a counting global allocator records the peak heap.
//!
//! Its own test binary (one allocator, one test) so nothing else moves the peak. The counting
//! allocator comes from the `cap` crate, which keeps `unsafe` (a `GlobalAlloc` impl) out of this
//! workspace, where it is forbidden.

use std::alloc::System;

use axum::body::Body;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blobs::BlobStore;
use bytes::Bytes;
use cap::Cap;
use ingest::attachment_body::{read_attachment_body, Limits};
use sha2::Digest as _;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const MIB: usize = 1024 * 1024;
/// Raw attachment bytes: 67.5 MB, 90 MB once base64-encoded.
const RAW_BYTES: usize = 67_500_000;
/// Raw bytes per generated piece (a multiple of 3, so pieces encode without padding).
const PIECE: usize = 48 * 1024;

/// Deterministic content, piece by piece.
fn raw_piece(index: usize, len: usize) -> Vec<u8> {
    let mut x = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pieces() -> impl Iterator<Item = Vec<u8>> {
    (0..RAW_BYTES.div_ceil(PIECE)).map(|i| raw_piece(i, PIECE.min(RAW_BYTES - i * PIECE)))
}

/// The request body as a lazy stream of chunks: JSON head, base64 data piece by piece, JSON tail.
fn body() -> Body {
    let head = Bytes::from_static(
        br#"{"resourceType":"Parameters","parameter":[{"name":"TrackingId","valueIdentifier":{"value":"t1"}},{"name":"Attachment","part":[{"name":"Content","resource":{"resourceType":"DocumentReference","status":"current","content":[{"attachment":{"contentType":"application/pdf","data":""#,
    );
    let tail = Bytes::from_static(br#""}}]}}]}]}"#);
    let data = pieces().map(|p| Ok::<_, std::io::Error>(Bytes::from(B64.encode(p))));
    let chunks = std::iter::once(Ok(head)).chain(data).chain(std::iter::once(Ok(tail)));
    Body::from_stream(futures::stream::iter(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_mb_attachment_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path()).expect("store");
    let mut expected = sha2::Sha256::new();
    for p in pieces() {
        expected.update(&p);
    }
    let expected: String = expected.finalize().iter().map(|b| format!("{b:02x}")).collect();

    let before = ALLOC.allocated();
    let got = read_attachment_body(body(), None, &store, &Limits::default()).await.expect("read");
    let peak = ALLOC.max_allocated();
    println!(
        "streamed {} body bytes ({} bytes of attachment): heap before {:.2} MiB, peak {:.2} MiB",
        got.body_bytes,
        got.attachments[0].blob.size,
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64
    );
    assert!(got.body_bytes > 90_000_000, "{}", got.body_bytes);
    assert_eq!(got.attachments.len(), 1);
    assert_eq!(got.attachments[0].blob.size, RAW_BYTES as u64);
    assert_eq!(got.attachments[0].blob.sha256, expected);
    // Measured: under 1 MiB (64 KiB read buffer, 64 KiB base64 chunk, 256 KiB file buffer).
    assert!(peak < 8 * MIB, "peak heap {peak} bytes while streaming a 90 MB body");

    // The bound is not vacuous: buffering a body less than half that size and parsing it with
    // serde_json (what `fhir::json_body` does) pushes the recorded peak well past it.
    let mut buffered = Vec::with_capacity(40 * MIB + 16);
    buffered.extend_from_slice(br#"{"data":""#);
    while buffered.len() < 40 * MIB {
        buffered.extend_from_slice(b"QUJDQUJD");
    }
    buffered.extend_from_slice(br#""}"#);
    let parsed: serde_json::Value = serde_json::from_slice(&buffered).expect("json");
    assert!(parsed["data"].is_string());
    let buffering_peak = ALLOC.max_allocated();
    println!("buffering a 40 MiB body instead: peak {:.1} MiB", buffering_peak as f64 / MIB as f64);
    assert!(buffering_peak > 64 * MIB, "body + parsed copy: {buffering_peak}");
}
