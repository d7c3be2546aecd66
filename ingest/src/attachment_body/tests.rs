use std::path::Path;

use axum::body::Body;
use axum::response::IntoResponse;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;
use sha1::Digest as _;

use super::*;

fn store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::local(dir.path().join("blobs")).expect("store");
    (dir, store)
}

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

fn parse_with(body: &str, store: &BlobStore, limits: &Limits) -> Result<AttachmentBody, BodyError> {
    parse_blocking(body.as_bytes(), store, limits)
}

fn parse(body: &str, store: &BlobStore) -> Result<AttachmentBody, BodyError> {
    parse_with(body, store, &Limits::default())
}

fn bytes_of(blob: &BlobRef) -> Vec<u8> {
    std::fs::read(blob.location.strip_prefix("file://").expect("file location")).expect("blob file")
}

/// A reader that hands out at most `n` bytes per call: every chunk boundary gets exercised.
struct Trickle<'a>(&'a [u8], usize);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.len().min(self.1).min(buf.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

fn cdex_body(pdf: &[u8], answer: &[u8]) -> String {
    json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "TrackingId", "valueIdentifier": {"system": "http://example.org/provider", "value": "11234657"}},
            {"name": "AttachTo", "valueCode": "claim"},
            {"name": "Attachment", "part": [
                {"name": "LineItem", "valueString": "1"},
                {"name": "Content", "resource": {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "content": [{"attachment": {"contentType": "application/pdf", "data": B64.encode(pdf), "title": "note"}}]
                }}
            ]},
            {"name": "Attachment", "part": [
                {"name": "Content", "resource": {
                    "resourceType": "QuestionnaireResponse",
                    "status": "completed",
                    "item": [{"linkId": "1", "answer": [{"valueAttachment": {"contentType": "image/png", "data": B64.encode(answer)}}]}]
                }}
            ]}
        ]
    })
    .to_string()
}

#[test]
fn extracts_document_reference_and_questionnaire_attachments() {
    let (_dir, store) = store();
    let pdf: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let png = b"\x89PNG not really".to_vec();
    let body = cdex_body(&pdf, &png);
    let got = parse(&body, &store).expect("parse");

    let mut expected: Value = serde_json::from_str(&body).expect("json");
    expected["parameter"][2]["part"][1]["resource"]["content"][0]["attachment"]
        .as_object_mut()
        .expect("attachment")
        .remove("data");
    expected["parameter"][3]["part"][0]["resource"]["item"][0]["answer"][0]["valueAttachment"]
        .as_object_mut()
        .expect("answer")
        .remove("data");
    assert_eq!(got.parameters, expected);
    assert_eq!(got.body_bytes, body.len() as u64);

    assert_eq!(got.attachments.len(), 2);
    let doc = &got.attachments[0];
    assert_eq!(doc.pointer, "/parameter/2/part/1/resource/content/0/attachment");
    assert_eq!(doc.expression, "Parameters.parameter[2].part[1].resource.content[0].attachment");
    assert!(got.parameters.pointer(&doc.pointer).is_some());
    assert_eq!(bytes_of(&doc.blob), pdf);
    assert_eq!(doc.blob.size, pdf.len() as u64);
    assert_eq!(doc.blob.sha1_base64, B64.encode(sha1::Sha1::digest(&pdf)));
    let sha256: String = sha2::Sha256::digest(&pdf).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(doc.blob.sha256, sha256);

    let qr = &got.attachments[1];
    assert_eq!(qr.pointer, "/parameter/3/part/0/resource/item/0/answer/0/valueAttachment");
    assert_eq!(bytes_of(&qr.blob), png);
}

#[test]
fn every_chunk_boundary_gives_the_same_result() {
    let (_dir, store) = store();
    let body = cdex_body(b"hello attachment world", b"x");
    let whole = parse(&body, &store).expect("parse");
    for n in [1, 2, 3, 5, 7, 64] {
        let got = parse_blocking(Trickle(body.as_bytes(), n), &store, &Limits::default()).expect("trickled");
        assert_eq!(got, whole, "chunks of {n}");
    }
}

#[test]
fn dedupes_identical_attachments() {
    let (dir, store) = store();
    let body = cdex_body(b"same bytes", b"same bytes");
    let got = parse(&body, &store).expect("parse");
    assert_eq!(got.attachments[0].blob, got.attachments[1].blob);
    assert_eq!(files_under(dir.path()).len(), 1, "{:?}", files_under(dir.path()));
}

#[test]
fn data_outside_attachments_is_kept_as_is() {
    let (dir, store) = store();
    let body = json!({
        "resourceType": "Parameters",
        "data": "QUJD",
        "meta": {"data": "not base64 at all"},
        "parameter": [
            {"name": "data", "valueBase64Binary": "QUJD"},
            {"name": "x", "resource": {"resourceType": "Binary", "data": "QUJD"}},
            {"name": "y", "attachment": "a string, not an Attachment"},
            {"name": "z", "valueAttachment": {"url": "http://example.org/doc.pdf", "_data": {"id": "d"}}}
        ]
    })
    .to_string();
    let got = parse(&body, &store).expect("parse");
    assert_eq!(got.parameters, serde_json::from_str::<Value>(&body).expect("json"));
    assert!(got.attachments.is_empty());
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn base64_whitespace_and_escapes_are_tolerated() {
    let (_dir, store) = store();
    for data in [r"QUJD", r"QU JD", r"QU\nJD", r"Q\r\nU\tJD ", r"\u0051UJD", r"QU\/J"] {
        let body = format!(r#"{{"parameter":[{{"valueAttachment":{{"data":"{data}"}}}}]}}"#);
        let got = parse(&body, &store);
        if data == r"QU\/J" {
            // `\/` is '/', a base64 character; "QU/J" decodes fine.
            assert_eq!(bytes_of(&got.expect("parse").attachments[0].blob), B64.decode("QU/J").expect("b64"));
        } else {
            assert_eq!(bytes_of(&got.expect(data).attachments[0].blob), b"ABC", "{data}");
        }
    }
    // Multi-line (PEM-style) data over many chunks.
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
    let wrapped: Vec<String> =
        B64.encode(&bytes).as_bytes().chunks(76).map(|l| String::from_utf8_lossy(l).into()).collect();
    let body = json!({"parameter": [{"valueAttachment": {"data": wrapped.join("\n")}}]}).to_string();
    assert_eq!(bytes_of(&parse(&body, &store).expect("parse").attachments[0].blob), bytes);
}

#[test]
fn invalid_base64_is_400_naming_the_element_and_stores_nothing() {
    let (dir, store) = store();
    let cases = [
        ("QU*D", "invalid character '*' at character"),
        ("QUJ", "multiple of 4"),
        ("QQ=", "multiple of 4"),
        ("QUJDQQ", "multiple of 4"),
        ("QQ==QUJD", "follows the '=' padding"),
        ("QR==", "non-zero unused bits"),
        ("QU-_", "invalid character '-'"),
        ("=QUJ", "padding"),
    ];
    let big_prefix = "QUJD".repeat(40_000);
    for (data, msg) in cases {
        // Both alone and after more than one decode chunk of valid data (the blob is then partly written).
        for prefix in ["", big_prefix.as_str()] {
            let body = json!({"resourceType": "Parameters", "parameter": [{"name": "Attachment", "part": [
                {"name": "Content", "resource": {"content": [{"attachment": {"data": format!("{prefix}{data}")}}]}}
            ]}]})
            .to_string();
            let err = parse(&body, &store).expect_err(data);
            assert!(matches!(err, BodyError::InvalidBase64 { .. }), "{data}: {err}");
            assert!(err.to_string().contains(msg), "{data}: {err}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
            assert_eq!(err.expression(), Some("Parameters.parameter[0].part[0].resource.content[0].attachment.data"));
        }
    }
    for (body, msg) in [
        (r#"{"valueAttachment":{"data":""}}"#, "attachment data is empty"),
        (r#"{"valueAttachment":{"data":"   "}}"#, "attachment data is empty"),
        (r#"{"valueAttachment":{"data":42}}"#, "must be a base64 string"),
        (r#"{"valueAttachment":{"data":"QUJD","data":"QUJD"}}"#, "duplicate member 'data'"),
        (r#"{"valueAttachment":{"data":"\u00e9"}}"#, "invalid character"),
    ] {
        let err = parse(body, &store).expect_err(body);
        assert!(err.to_string().contains(msg), "{body}: {err}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    assert!(
        files_under(dir.path()).iter().all(|p| p.ends_with(
            // Only the complete "ABC" of the duplicate-data case may remain, under its hash.
            "sha256/b5/d4/b5d4045c3f466fa91fe2cc6abe79232a1a57cdf104f7a26e716e0a1e2789df78"
        )),
        "{:?}",
        files_under(dir.path())
    );
}

/// Every escape JSON has (and a surrogate pair) decodes in the rest of the body as serde_json
/// decodes it.
#[test]
fn escapes_outside_attachments_decode_as_in_serde_json() {
    let (_dir, store) = store();
    let body = r#"{"resourceType":"Parameters","parameter":[{"name":"q\"\\\/\b\f\n\r\t","valueString":"caf\u00e9 \ud83d\ude00 \u002F"}]}"#;
    let got = parse(body, &store).expect("parse");
    let want: Value = serde_json::from_str(body).expect("serde_json");
    assert_eq!(got.parameters, want);
    assert_eq!(got.parameters["parameter"][0]["valueString"], "café 😀 /");
}

#[test]
fn malformed_json_is_400_with_line_and_column() {
    let (dir, store) = store();
    let cases: &[(&str, &str, u64, u64)] = &[
        ("", "empty", 1, 1),
        ("{\"a\" 1}", "expected ':'", 1, 6),
        ("{\n  \"a\": [1, 2\n", "inside an array", 3, 1),
        ("{\"a\": tru}", "invalid literal", 1, 10),
        ("{\"a\": 01}", "invalid number", 1, 7),
        ("{\"a\": 1.}", "invalid number", 1, 7),
        ("{\"a\": \"x\ny\"}", "control character", 1, 9),
        ("{\"a\": \"\\q\"}", "invalid escape", 1, 10),
        ("{\"a\": \"\\ud800\"}", "unpaired surrogate", 1, 15),
        ("{\"a\": 1,}", "expected a member name", 1, 9),
        ("{\"a\": 1} x", "after the JSON object", 1, 10),
        ("{\"a\": \"unterminated", "unterminated string", 1, 20),
        // Truncated inside attachment data: the half-written blob is dropped.
        ("{\"valueAttachment\": {\"data\": \"QUJDQUJD", "unterminated string", 1, 39),
    ];
    for (body, msg, line, column) in cases {
        match parse(body, &store) {
            Err(BodyError::Syntax { message, line: l, column: c }) => {
                assert!(message.contains(msg), "{body:?}: {message}");
                assert_eq!((l, c), (*line, *column), "{body:?}: {message}");
            }
            other => panic!("{body:?}: {other:?}"),
        }
    }
    let err = parse("{\"a\": \"\u{0}\"}", &store).expect_err("nul");
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    let err = parse_blocking(&b"{\"a\": \"\xff\"}"[..], &store, &Limits::default()).expect_err("utf-8");
    assert!(err.to_string().contains("UTF-8"), "{err}");
    let err = parse("[1]", &store).expect_err("array");
    assert!(matches!(err, BodyError::Invalid { .. }), "{err}");
    let err = parse(r#"{"a": 1, "a": 2}"#, &store).expect_err("duplicate");
    assert_eq!(err.expression(), Some("Parameters.a"));
    assert!(files_under(dir.path()).is_empty(), "{:?}", files_under(dir.path()));
}

#[test]
fn nesting_is_bounded() {
    let (_dir, store) = store();
    let limits = Limits::default();
    let nested = |depth: usize| format!("{{\"a\":{}1{}}}", "[".repeat(depth - 1), "]".repeat(depth - 1));
    parse(&nested(64), &store).expect("64 levels are fine");
    let err = parse(&nested(65), &store).expect_err("65 levels");
    assert!(matches!(err, BodyError::TooDeep { limit: 64, line: 1, column: 69 }), "{err}");
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    // Deep enough to overflow the stack of a recursive parser without the limit.
    let err = parse(&nested(1_000_000), &store).expect_err("very deep");
    assert!(matches!(err, BodyError::TooDeep { .. }));
    assert_eq!(limits.max_depth, 64);
}

#[test]
fn strings_are_bounded_except_attachment_data() {
    let (_dir, store) = store();
    let limits = Limits { max_string_bytes: 100, ..Limits::default() };
    let long = "x".repeat(101);
    for body in [
        format!(r#"{{"parameter":[{{"name":"a","valueString":"{long}"}}]}}"#),
        format!(r#"{{"parameter":[{{"{long}":1}}]}}"#),
        format!(r#"{{"parameter":[{{"name":"a","valueDecimal":1{}}}]}}"#, "0".repeat(100)),
        format!(r#"{{"parameter":[{{"name":"a","valueString":"{}\u00e9"}}]}}"#, "x".repeat(99)),
    ] {
        let err = parse_with(&body, &store, &limits).expect_err(&body);
        assert!(matches!(err, BodyError::StringTooLong { limit: 100, .. }), "{err}");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.expression().is_some_and(|e| e.starts_with("Parameters.parameter[0]")), "{err}");
    }
    let ok = format!(r#"{{"parameter":[{{"name":"a","valueString":"{}"}}]}}"#, "x".repeat(100));
    parse_with(&ok, &store, &limits).expect("exactly at the limit");
    // Attachment data is not a "string" for this limit.
    let data = B64.encode(vec![7u8; 10_000]);
    let body = format!(r#"{{"parameter":[{{"valueAttachment":{{"data":"{data}"}}}}]}}"#);
    assert_eq!(parse_with(&body, &store, &limits).expect("big data").attachments[0].blob.size, 10_000);
}

#[test]
fn json_outside_attachments_is_bounded() {
    let (_dir, store) = store();
    let limits = Limits { max_json_bytes: 200_000, ..Limits::default() };
    // A 1.3 MB body that is mostly attachment data is fine...
    let data = B64.encode(vec![1u8; 1_000_000]);
    let body = format!(r#"{{"parameter":[{{"valueAttachment":{{"data":"{data}"}}}}]}}"#);
    parse_with(&body, &store, &limits).expect("data does not count");
    // ...a body with 300 kB of other JSON is not.
    let items: Vec<String> = (0..30_000).map(|i| format!("\"s{i:05}\"")).collect();
    let body = format!(r#"{{"parameter":[{}]}}"#, items.join(","));
    let err = parse_with(&body, &store, &limits).expect_err("too much JSON");
    assert!(matches!(err, BodyError::JsonTooLarge { limit: 200_000 }), "{err}");
    assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn counted_body_over_the_limit_is_413_and_leaves_no_blob() {
    let (dir, store) = store();
    let limits = Limits { max_request_bytes: 500_000, ..Limits::default() };
    let data = B64.encode(vec![3u8; 600_000]);
    let body = format!(r#"{{"parameter":[{{"valueAttachment":{{"data":"{data}"}}}}]}}"#);
    let err = parse_with(&body, &store, &limits).expect_err("too large");
    assert!(matches!(err, BodyError::TooLarge { limit: 500_000 }), "{err}");
    assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(files_under(dir.path()).is_empty(), "{:?}", files_under(dir.path()));
}

fn chunked(body: String, chunk: usize) -> Body {
    let chunks: Vec<Result<bytes::Bytes, io::Error>> =
        body.into_bytes().chunks(chunk).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    Body::from_stream(futures::stream::iter(chunks))
}

#[tokio::test]
async fn async_reader_streams_and_enforces_limits() {
    let (dir, store) = store();
    let body = cdex_body(b"pdf bytes", b"png bytes");
    let got = read_attachment_body(chunked(body.clone(), 13), None, &store, &Limits::default()).await.expect("read");
    assert_eq!(got.attachments.len(), 2);
    assert_eq!(got.body_bytes, body.len() as u64);

    // Content-Length over the limit: refused before reading (reading this body would fail differently).
    let unreadable = Body::from_stream(futures::stream::iter(vec![Err::<bytes::Bytes, _>(io::Error::other("boom"))]));
    let limits = Limits { max_request_bytes: 1000, ..Limits::default() };
    let err = read_attachment_body(unreadable, Some(1001), &store, &limits).await.expect_err("content-length");
    assert!(matches!(err, BodyError::TooLarge { limit: 1000 }), "{err}");

    // Chunked, no Content-Length: refused once the count passes the limit.
    let big = format!(r#"{{"parameter":[{{"valueAttachment":{{"data":"{}"}}}}]}}"#, B64.encode(vec![0u8; 3000]));
    let err = read_attachment_body(chunked(big, 100), None, &store, &limits).await.expect_err("counted");
    assert!(matches!(err, BodyError::TooLarge { limit: 1000 }), "{err}");

    // A body that breaks off mid-stream is a 400, not a 500, and leaves no blob behind.
    let broken = Body::from_stream(futures::stream::iter(vec![
        Ok(bytes::Bytes::from_static(br#"{"valueAttachment":{"data":"QUJD"#)),
        Err(io::Error::other("connection reset")),
    ]));
    let err = read_attachment_body(broken, None, &store, &Limits::default()).await.expect_err("broken");
    assert!(matches!(err, BodyError::Read(_)), "{err}");
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    let blobs_left = files_under(dir.path()).len();
    assert_eq!(blobs_left, 2, "the two attachments of the first body only");
}

#[tokio::test]
async fn errors_render_as_operation_outcomes() {
    let (_dir, store) = store();
    let body = r#"{"parameter":[{"valueAttachment":{"data":"QU*D"}}]}"#.to_string();
    let err = read_attachment_body(chunked(body, 8), None, &store, &Limits::default()).await.expect_err("bad");
    let resp = ApiError::from(err).into_response();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    let oo: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "invalid");
    assert_eq!(oo["issue"][0]["expression"][0], "Parameters.parameter[0].valueAttachment.data");

    let resp = ApiError::from(BodyError::TooLarge { limit: 10 }).into_response();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    let oo: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(oo["issue"][0]["code"], "too-long");
}
