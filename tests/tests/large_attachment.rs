//! Attachment size limits on the real binary: a 90 MB `$submit-attachment` body is accepted
//! while the process's peak RSS stays bounded (the bytes stream to the blob store), and a
//! 120 MB body is refused with 413 under the default limit, by Content-Length and when chunked.
//! Not timed: only memory and statuses are checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use tests::{feed_client, feed_token, free_port, spawn, wait_ready};

/// `/proc/{pid}/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// A Parameters body with one DocumentReference whose base64 data (`data_len` characters) is
/// generated while it is sent: the test holds no copy.
fn body(data_len: u64) -> (reqwest::Body, u64) {
    let p = serde_json::json!({"resourceType": "Parameters", "parameter": [
        {"name": "TrackingId", "valueIdentifier": {"value": "T-LARGE"}},
        {"name": "AttachTo", "valueCode": "preauthorization"},
        {"name": "ProviderId", "valueIdentifier": {"value": "1234567893"}},
        {"name": "MemberId", "valueIdentifier": {"value": "M-LARGE"}},
        {"name": "Attachment", "part": [{"name": "Content", "resource": {"resourceType": "DocumentReference", "status": "current",
            "content": [{"attachment": {"contentType": "application/pdf", "data": "@"}}]}}]}
    ]})
    .to_string();
    let (head, tail) = p.split_once('@').unwrap();
    let (head, tail) = (head.to_string(), tail.to_string());
    const CHUNK: u64 = 64 * 1024; // base64 characters per chunk: a multiple of 4
    let data_len = data_len / 4 * 4;
    let len = head.len() as u64 + data_len + tail.len() as u64;
    let chunks = (0..data_len.div_ceil(CHUNK)).map(move |i| {
        let n = (data_len - i * CHUNK).min(CHUNK) as usize;
        let raw: Vec<u8> = (0..n / 4 * 3).map(|j| (i as usize * 7 + j * 31) as u8).collect();
        Ok::<_, std::io::Error>(bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(raw)))
    });
    let stream = futures::stream::iter(
        std::iter::once(Ok(bytes::Bytes::from(head)))
            .chain(chunks)
            .chain(std::iter::once(Ok(bytes::Bytes::from(tail)))),
    );
    (reqwest::Body::wrap_stream(stream), len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_mb_body_streams_in_bounded_memory_and_120_mb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--admin-listen".into(),
        format!("127.0.0.1:{}", free_port()),
    ];
    let log = dir.path().join("payerx.log");
    let mut child = spawn(&args, &log);
    wait_ready(&reqwest::Client::new(), &base, &log).await;
    let token = feed_token(&args, &base).await;
    let client = feed_client(&args, &base, Duration::from_secs(600)).await;
    let pid = child.id();
    let before = status_kib(pid, "VmHWM:");

    // 90 MB of body, 67.5 MB of document: accepted under the default limit of 100 MB.
    let (b, len) = body(90_000_000);
    let r = client
        .post(format!("{base}/fhir/$submit-attachment"))
        .header("content-type", "application/fhir+json")
        .header("content-length", len)
        .body(b)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let after = status_kib(pid, "VmHWM:");
    let grew_mib = (after.saturating_sub(before)) / 1024;
    eprintln!(
        "peak RSS before {} MiB, after {} MiB (+{grew_mib} MiB) for a {} MB body",
        before / 1024,
        after / 1024,
        len / 1_000_000
    );
    // A reader that buffered the body would grow by at least its 90 MB.
    assert!(grew_mib < 48, "peak RSS grew by {grew_mib} MiB for a 90 MB body");

    // 120 MB: refused with 413 by its Content-Length, before a byte of it is read (the client
    // waits for the answer after the headers, so it sees it whatever it would send next).
    let request = format!(
        "POST /fhir/$submit-attachment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: 120000000\r\n\r\n"
    );
    let (status, text) = tests::raw_request(&base, &request).await;
    assert_eq!(status, 413, "{text}");
    let oo: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("100000000"), "{oo}");
    // Chunked (no Content-Length): refused as soon as the count passes the limit. The body is
    // just over it, so the client has sent everything when the answer comes.
    let (b, _) = body(100_000_100);
    let r = client
        .post(format!("{base}/fhir/$submit-attachment"))
        .header("content-type", "application/fhir+json")
        .body(b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // The metadata documents the limit and the way around it.
    let cs: serde_json::Value = client.get(format!("{base}/fhir/metadata")).send().await.unwrap().json().await.unwrap();
    let op = cs["rest"][0]["operation"].as_array().unwrap().iter().find(|o| o["name"] == "submit-attachment").unwrap();
    let doc = op["documentation"].as_str().unwrap();
    assert!(doc.contains("100000000") && doc.contains("attachment.url"), "{doc}");
    assert!(doc.contains("fetched after the answer"), "fetching by URL is documented: {doc}");
    assert!(!doc.contains("  "), "one space between words: {doc}");
    let claim = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Claim").unwrap();
    for op in claim["operation"].as_array().unwrap() {
        assert!(!op["documentation"].as_str().unwrap().contains("  "), "{op}");
    }
    child.kill().unwrap();
    let _ = child.wait();
}
