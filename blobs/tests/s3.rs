//! The S3 backend against a real S3-compatible server (integration tier: scripts/s3.sh starts
//! s3s-fs and scripts/test-integration.sh exports its endpoint and the AWS credentials).

use blobs::{BlobError, BlobLocation, BlobStore, BlobStoreConfig};
use futures::TryStreamExt;

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

async fn read_all(store: &BlobStore, sha256: &str) -> Vec<u8> {
    let r = store.open(sha256).await.expect("open").expect("present");
    let chunks: Vec<bytes::Bytes> = r.stream.try_collect().await.expect("read");
    chunks.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration tier: needs an S3 server (scripts/test-integration.sh)"]
async fn s3_round_trip_multipart_dedupe_and_abandon() {
    let endpoint = std::env::var("PAYERX_TEST_S3_ENDPOINT").expect("PAYERX_TEST_S3_ENDPOINT");
    let prefix = format!("it-{}", uuid::Uuid::new_v4().simple());
    let location: BlobLocation = format!("s3://payerx-test/{prefix}").parse().expect("url");
    let mut config = BlobStoreConfig::new(location);
    config.s3_endpoint = Some(endpoint);
    config.s3_allow_http = true;
    let store = BlobStore::from_config(&config).expect("open");

    let small = b"abc".to_vec();
    // Over two 5 MiB parts: a real multipart upload, then the server-side copy.
    let big = content(12 * 1024 * 1024 + 17, 5);
    let (s, b, again, too_large) = tokio::task::spawn_blocking({
        let store = store.clone();
        let (small, big) = (small.clone(), big.clone());
        move || {
            let s = store.put_reader(&small[..], None).expect("small");
            let b = store.put_reader(&big[..], None).expect("big");
            let again = store.put_reader(&big[..], None).expect("again");
            let mut w = store.writer().expect("writer");
            w.write_chunk(&content(6 * 1024 * 1024, 8)).expect("write");
            drop(w);
            let too_large = store.put_reader(&big[..], Some(1 << 20));
            (s, b, again, too_large)
        }
    })
    .await
    .expect("join");
    assert_eq!(s.location, format!("s3://payerx-test/{prefix}/sha256/ba/78/{}", s.sha256));
    assert_eq!(b, again);
    assert!(matches!(too_large, Err(BlobError::TooLarge { .. })));
    assert_eq!(read_all(&store, &s.sha256).await, small);
    assert_eq!(read_all(&store, &b.sha256).await, big);
    assert_eq!(store.open(&b.sha256).await.expect("open").expect("present").size, big.len() as u64);
    assert!(store.delete(&b.sha256).await.expect("delete"));
    assert!(!store.exists(&b.sha256).await.expect("exists"));
    assert!(!store.delete(&b.sha256).await.expect("delete again"));
}
