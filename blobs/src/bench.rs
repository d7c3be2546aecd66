//! The floor for attachment ingest: how fast the store takes raw bytes (hashing included).

use std::time::{Duration, Instant};

use crate::{BlobError, BlobRef, BlobStore};

#[derive(Debug, Clone)]
pub struct WriteRate {
    pub blob: BlobRef,
    pub elapsed: Duration,
}

impl WriteRate {
    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.blob.size as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes `bytes` of fresh pseudo-random content (unique per call, so dedupe never short-cuts it)
/// in 64 KiB chunks and times it up to the blob being visible. Blocking: run it in
/// `spawn_blocking`. The blob stays; delete it with [`BlobStore::delete`].
pub fn write_rate(store: &BlobStore, bytes: u64) -> Result<WriteRate, BlobError> {
    const CHUNK: usize = 64 * 1024;
    let mut state = uuid::Uuid::new_v4().as_u128() as u64 | 1;
    let mut chunk = vec![0u8; CHUNK];
    for word in chunk.chunks_mut(8) {
        state = xorshift(state);
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    let start = Instant::now();
    let mut w = store.writer()?;
    let mut left = bytes;
    while left > 0 {
        // Cheap variation per chunk so no two chunks are alike.
        state = xorshift(state);
        chunk[..8].copy_from_slice(&state.to_le_bytes());
        let n = left.min(CHUNK as u64) as usize;
        w.write_chunk(&chunk[..n])?;
        left -= n as u64;
    }
    let blob = w.finish()?;
    Ok(WriteRate { blob, elapsed: start.elapsed() })
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
