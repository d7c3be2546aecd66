use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;

use super::*;

// "abc": the FIPS 180 test vector.
const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const ABC_SHA1_B64: &str = "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=";

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

async fn read_all(store: &BlobStore, sha256: &str) -> Vec<u8> {
    let r = store.open(sha256).await.expect("open").expect("present");
    let size = r.size;
    let chunks: Vec<Bytes> = r.stream.try_collect().await.expect("read");
    let data = chunks.concat();
    assert_eq!(data.len() as u64, size);
    data
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

#[tokio::test]
async fn local_round_trip_hashes_and_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path().join("blobs")).expect("open");
    let blob = tokio::task::spawn_blocking({
        let store = store.clone();
        move || {
            let mut w = store.writer().expect("writer");
            w.write_all(b"a").expect("write");
            w.write_all(b"bc").expect("write");
            w.finish()
        }
    })
    .await
    .expect("join")
    .expect("finish");
    assert_eq!(blob.sha256, ABC_SHA256);
    assert_eq!(blob.sha1_base64, ABC_SHA1_B64);
    assert_eq!(blob.size, 3);
    assert!(blob.location.starts_with("file:///"), "{}", blob.location);
    assert!(blob.location.ends_with(&format!("/blobs/sha256/ba/78/{ABC_SHA256}")), "{}", blob.location);
    assert!(store.exists(ABC_SHA256).await.expect("exists"));
    assert_eq!(read_all(&store, ABC_SHA256).await, b"abc");
    assert!(store.delete(ABC_SHA256).await.expect("delete"));
    assert!(!store.delete(ABC_SHA256).await.expect("delete"));
    assert!(store.open(ABC_SHA256).await.expect("open").is_none());
}

#[tokio::test]
async fn dedupe_stores_once_and_leaves_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path()).expect("open");
    let data = content(300_000, 7);
    let a = store.put_reader(&data[..], None).expect("first");
    let b = store.put_reader(&data[..], None).expect("second");
    assert_eq!(a, b);
    let files = files_under(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).expect("read"), data);
}

#[tokio::test]
async fn abandoned_and_oversized_writes_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path()).expect("open");
    {
        let mut w = store.writer().expect("writer");
        w.write_chunk(b"abc").expect("write");
        assert_eq!(files_under(dir.path()).len(), 1, "the temp file exists while writing");
        // dropped without finish
    }
    let mut w = store.writer_limited(Some(4)).expect("writer");
    w.write_chunk(b"abc").expect("within the limit");
    assert!(matches!(w.write_chunk(b"de"), Err(BlobError::TooLarge { limit: 4 })));
    drop(w);
    assert!(files_under(dir.path()).is_empty(), "{:?}", files_under(dir.path()));
    assert!(!store.exists(ABC_SHA256).await.expect("exists"));
}

#[tokio::test]
async fn hashes_are_checked_before_touching_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path()).expect("open");
    for bad in ["../../etc/passwd", &ABC_SHA256.to_uppercase(), "abc", ""] {
        assert!(matches!(store.open(bad).await, Err(BlobError::InvalidHash(_))), "{bad}");
        assert!(matches!(store.exists(bad).await, Err(BlobError::InvalidHash(_))), "{bad}");
    }
}

#[test]
fn locations_parse() {
    assert_eq!(
        "s3://bucket/a/b/".parse::<BlobLocation>().expect("s3"),
        BlobLocation::S3 { bucket: "bucket".into(), prefix: "a/b".into() }
    );
    assert_eq!(
        "s3://bucket".parse::<BlobLocation>().expect("s3"),
        BlobLocation::S3 { bucket: "bucket".into(), prefix: "".into() }
    );
    assert_eq!("./data/blobs".parse::<BlobLocation>().expect("path"), BlobLocation::Local("./data/blobs".into()));
    assert_eq!("file:///var/blobs".parse::<BlobLocation>().expect("file"), BlobLocation::Local("/var/blobs".into()));
    for bad in ["s3://", "s3:///x", "gs://b/p", "", "s3://b/../x"] {
        assert!(bad.parse::<BlobLocation>().is_err(), "{bad}");
    }
    assert_eq!("s3://b/p".parse::<BlobLocation>().expect("s3").to_string(), "s3://b/p");
}

/// The object-store path, on object_store's own local file system backend (the S3 server test is
/// in `tests/s3.rs`, integration tier). Tiny parts force real multipart uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_backend_small_and_multipart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("fs");
    let store = BlobStore::object_store(Arc::new(fs), "pre/fix", "test://x/pre/fix".into(), 1024).expect("open");
    let small = b"abc".to_vec();
    let big = content(10_000, 3);
    let (s, b, again) = tokio::task::spawn_blocking({
        let store = store.clone();
        let (small, big) = (small.clone(), big.clone());
        move || {
            let s = store.put_reader(&small[..], None).expect("small");
            let b = store.put_reader(&big[..], None).expect("big");
            let again = store.put_reader(&big[..], None).expect("big again");
            // Abandoned after several parts: nothing shows up under a hash.
            let mut w = store.writer().expect("writer");
            w.write_chunk(&content(5000, 9)).expect("write");
            drop(w);
            (s, b, again)
        }
    })
    .await
    .expect("join");
    assert_eq!(s.sha256, ABC_SHA256);
    assert_eq!(s.location, format!("test://x/pre/fix/sha256/ba/78/{ABC_SHA256}"));
    assert_eq!(b, again);
    assert_eq!(read_all(&store, &s.sha256).await, small);
    assert_eq!(read_all(&store, &b.sha256).await, big);
    let names: Vec<String> = files_under(dir.path())
        .iter()
        .map(|p| p.strip_prefix(dir.path()).expect("under").display().to_string())
        .collect();
    let blobs: Vec<&String> = names.iter().filter(|n| n.starts_with("pre/fix/sha256/")).collect();
    assert_eq!(blobs.len(), 2, "{names:?}");
    assert!(store.delete(&b.sha256).await.expect("delete"));
    assert!(!store.exists(&b.sha256).await.expect("exists"));
}

#[tokio::test]
async fn bench_write_rate_writes_unique_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path()).expect("open");
    let a = bench::write_rate(&store, 200_000).expect("bench");
    let b = bench::write_rate(&store, 200_000).expect("bench");
    assert_eq!(a.blob.size, 200_000);
    assert_ne!(a.blob.sha256, b.blob.sha256);
    assert!(a.mb_per_s() > 0.0);
}
