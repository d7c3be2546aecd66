//! Raw blob-store write rate (the floor for attachment ingest):
//!   cargo run --release -p blobs --example write_rate -- [DIR] [MB]
//! Writes MB (default 50) megabytes of fresh content into a local store in DIR (default a temp
//! folder) three times and prints each rate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir =
        args.next().map(std::path::PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("payerx-blob-bench"));
    let mb: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(50);
    let store = blobs::BlobStore::local(&dir)?;
    for _ in 0..3 {
        let rate = blobs::bench::write_rate(&store, mb * 1_000_000)?;
        println!("{} MB in {:.3} s: {:.0} MB/s", mb, rate.elapsed.as_secs_f64(), rate.mb_per_s());
        std::fs::remove_file(rate.blob.location.trim_start_matches("file://"))?;
    }
    Ok(())
}
