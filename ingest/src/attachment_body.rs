//! The streaming `$submit-attachment` body reader (claim-check, DESIGN §4).
//!
//! Reads a FHIR `Parameters` body as it arrives and never holds the attachment bytes whole: the
//! `data` string of every Attachment is base64-decoded while it streams in, hashed and written
//! to the blob store; only the rest of the JSON is kept, as a `serde_json::Value` without those
//! `data` members, plus a list of where each attachment was and its [`BlobRef`].
//!
//! Which objects are Attachments: the value of a member named `attachment`
//! (DocumentReference.content.attachment), `valueAttachment` (QuestionnaireResponse answers,
//! extensions, parameters), `contentAttachment`, `sourceAttachment`, `presentedForm` or `photo`
//! (an object, or each object of an array), at any depth. Member order cannot decide more (a
//! `resourceType` may come after `data`), so any other large string, such as a contained
//! `Binary.data`, meets the string limit instead.
//!
//! Rules, with the status each failure gets ([`BodyError::status`]):
//! - Content-Length above `max_request_bytes` → 413 before anything is read; a body that grows
//!   past it while streaming → 413 as soon as it does, and the partial blob is discarded.
//! - Non-attachment JSON over `max_json_bytes`, or any other string (member names and numbers
//!   included) over `max_string_bytes` → 413 naming the limit: the request is well-formed but too
//!   large for this server.
//! - Malformed JSON → 400 with line and column (1-based, columns counted in bytes); nesting deeper
//!   than `max_depth` → 400; duplicate member names → 400.
//! - Attachment data: standard base64 alphabet with canonical `=` padding, as FHIR
//!   `base64Binary` requires. Whitespace (space, tab, CR, LF, also as JSON escapes) is skipped,
//!   because the FHIR datatype allows it (`\s*` between groups) and PEM-style line breaks are
//!   common. Anything else (URL-safe alphabet, missing padding, data after padding, non-zero
//!   trailing bits, empty or non-string data) → 400 naming the element, e.g.
//!   `Parameters.parameter[3].part[2].resource.content[0].attachment.data`.
//!
//! From a handler (the store and limits live in the app state):
//!
//! ```text
//! async fn submit_attachment(State(s): State<SharedState>, headers: HeaderMap, body: Body)
//!     -> Result<Response, ApiError> {
//!     let got = read_attachment_body(body, content_length(&headers), &s.blobs, &s.limits).await?;
//!     // got.parameters: the Parameters without `data`; got.attachments: pointer + BlobRef each.
//! }
//! ```

use std::io::{self, Read};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use blobs::{BlobError, BlobRef, BlobStore, BlobWriter};
use futures::TryStreamExt;
use processors::validate::{short_escape, surrogate_pair};
use schemas::IssueType;
use serde_json::{Map, Value};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::ApiError;

/// How much a `$submit-attachment` request may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The whole body, attachment data included.
    pub max_request_bytes: u64,
    /// The body without attachment data: what ends up in memory as JSON.
    pub max_json_bytes: u64,
    /// Any string other than attachment data (member names and numbers too).
    pub max_string_bytes: usize,
    /// Nesting of arrays and objects.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 100 * 1000 * 1000,
            max_json_bytes: 16 * 1024 * 1024,
            max_string_bytes: 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// One inline attachment moved to the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedAttachment {
    /// JSON pointer of the Attachment object in [`AttachmentBody::parameters`], e.g.
    /// `/parameter/5/part/2/resource/content/0/attachment` (its `data` member is gone).
    pub pointer: String,
    /// The same place as a FHIRPath-style expression, for OperationOutcomes:
    /// `Parameters.parameter[5].part[2].resource.content[0].attachment`.
    pub expression: String,
    pub blob: BlobRef,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentBody {
    /// The Parameters resource with every extracted `data` member removed.
    pub parameters: Value,
    /// In document order.
    pub attachments: Vec<ExtractedAttachment>,
    /// Bytes read from the body.
    pub body_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the request JSON without attachment data exceeds the limit of {limit} bytes")]
    JsonTooLarge { limit: u64 },
    #[error("{expression}: a string exceeds the limit of {limit} bytes (only attachment data may be longer)")]
    StringTooLong { limit: usize, expression: String },
    #[error("the body is not valid JSON: {message} at line {line}, column {column}")]
    Syntax { message: String, line: u64, column: u64 },
    #[error("the JSON nests deeper than {limit} levels at line {line}, column {column}")]
    TooDeep { limit: usize, line: u64, column: u64 },
    #[error("{expression}: invalid base64: {message}")]
    InvalidBase64 { expression: String, message: String },
    #[error("{expression}: {message}")]
    Invalid { expression: String, message: String },
    #[error("could not read the request body: {0}")]
    Read(String),
    #[error("could not store the attachment: {0}")]
    Blob(BlobError),
    #[error("the body reader failed: {0}")]
    Internal(String),
}

impl BodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } | BodyError::JsonTooLarge { .. } | BodyError::StringTooLong { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BodyError::Blob(BlobError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Syntax { .. }
            | BodyError::TooDeep { .. }
            | BodyError::InvalidBase64 { .. }
            | BodyError::Invalid { .. }
            | BodyError::Read(_) => StatusCode::BAD_REQUEST,
            BodyError::Blob(e) if e.is_retriable() => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Blob(_) | BodyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The element at fault, when there is one.
    pub fn expression(&self) -> Option<&str> {
        match self {
            BodyError::StringTooLong { expression, .. }
            | BodyError::InvalidBase64 { expression, .. }
            | BodyError::Invalid { expression, .. } => Some(expression),
            _ => None,
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let status = e.status();
        let err = match &e {
            BodyError::Blob(b) if b.is_retriable() => {
                return ApiError::unavailable(format!("the attachment store is unavailable: {b}"))
            }
            BodyError::Blob(BlobError::TooLarge { .. }) => ApiError::new(status, IssueType::TooLong, e.to_string()),
            BodyError::Blob(_) | BodyError::Internal(_) => return ApiError::internal(&e),
            BodyError::TooLarge { .. } | BodyError::JsonTooLarge { .. } | BodyError::StringTooLong { .. } => {
                ApiError::new(status, IssueType::TooLong, e.to_string())
            }
            BodyError::Syntax { .. } | BodyError::TooDeep { .. } => {
                ApiError::new(status, IssueType::Structure, e.to_string())
            }
            BodyError::InvalidBase64 { .. } | BodyError::Invalid { .. } | BodyError::Read(_) => {
                ApiError::new(status, IssueType::Invalid, e.to_string())
            }
        };
        match e.expression() {
            Some(x) => err.at(x),
            None => err,
        }
    }
}

/// `Content-Length`, when present and numeric.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// Reads a `$submit-attachment` body from an axum handler: streams it on a blocking thread
/// (parsing, decoding and hashing are CPU work), bridging the async body to `std::io::Read`.
pub async fn read_attachment_body(
    body: Body,
    content_length: Option<u64>,
    store: &BlobStore,
    limits: &Limits,
) -> Result<AttachmentBody, BodyError> {
    if let Some(len) = content_length {
        if len > limits.max_request_bytes {
            return Err(BodyError::TooLarge { limit: limits.max_request_bytes });
        }
    }
    let reader = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let handle = tokio::runtime::Handle::current();
    let (store, limits) = (store.clone(), limits.clone());
    tokio::task::spawn_blocking(move || parse_blocking(SyncIoBridge::new_with_handle(reader, handle), &store, &limits))
        .await
        .map_err(|e| BodyError::Internal(e.to_string()))?
}

/// The reader itself, over any blocking source. Blob writes happen on the calling thread.
pub fn parse_blocking(src: impl Read, store: &BlobStore, limits: &Limits) -> Result<AttachmentBody, BodyError> {
    let mut p = Parser {
        src,
        buf: vec![0; BUF_SIZE],
        pos: 0,
        len: 0,
        received: 0,
        eof: false,
        line: 1,
        line_start: 0,
        data_bytes: 0,
        data_start: None,
        limits,
        store,
        path: Vec::new(),
        attachments: Vec::new(),
    };
    match p.peek_non_ws()? {
        Some(b'{') => {}
        Some(_) => {
            return Err(BodyError::Invalid {
                expression: "Parameters".into(),
                message: "the body must be a JSON object (a FHIR Parameters resource)".into(),
            })
        }
        None => return Err(p.syntax("the body is empty")),
    }
    let parameters = p.value(0, false)?;
    if p.peek_non_ws()?.is_some() {
        return Err(p.syntax("unexpected data after the JSON object"));
    }
    p.check_json_size()?;
    Ok(AttachmentBody { parameters, attachments: p.attachments, body_bytes: p.received })
}

const BUF_SIZE: usize = 64 * 1024;
/// Base64 characters decoded at a time (a multiple of 4, so groups never straddle two chunks).
const B64_CHUNK: usize = 64 * 1024;

/// Member names whose value is an Attachment (or a list of them) in FHIR R4.
fn holds_attachments(name: &str) -> bool {
    matches!(
        name,
        "attachment" | "valueAttachment" | "contentAttachment" | "sourceAttachment" | "presentedForm" | "photo"
    )
}

enum Seg {
    Key(String),
    Index(usize),
}

struct Parser<'a, R> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Bytes read from `src` so far.
    received: u64,
    eof: bool,
    line: u64,
    /// Offset of the first byte of the current line.
    line_start: u64,
    /// Raw bytes of finished attachment data strings (they do not count as JSON).
    data_bytes: u64,
    /// Offset where the attachment data string being streamed began.
    data_start: Option<u64>,
    limits: &'a Limits,
    store: &'a BlobStore,
    path: Vec<Seg>,
    attachments: Vec<ExtractedAttachment>,
}

impl<R: Read> Parser<'_, R> {
    /// Offset of `buf[pos]` in the body.
    fn offset(&self) -> u64 {
        self.received - (self.len - self.pos) as u64
    }

    fn syntax(&self, message: &str) -> BodyError {
        let offset = self.offset();
        BodyError::Syntax { message: message.into(), line: self.line, column: offset - self.line_start + 1 }
    }

    fn expression(&self) -> String {
        let mut s = String::from("Parameters");
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    fn pointer(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            s.push('/');
            match seg {
                Seg::Key(k) => s.push_str(&k.replace('~', "~0").replace('/', "~1")),
                Seg::Index(i) => s.push_str(&i.to_string()),
            }
        }
        s
    }

    fn check_json_size(&self) -> Result<(), BodyError> {
        // Called with everything received also consumed: received = JSON + attachment data.
        let in_data = self.data_start.map_or(0, |start| self.offset() - start);
        if self.offset() - self.data_bytes - in_data > self.limits.max_json_bytes {
            return Err(BodyError::JsonTooLarge { limit: self.limits.max_json_bytes });
        }
        Ok(())
    }

    /// Ensures `buf[pos]` is available; false at the end of the body.
    fn fill(&mut self) -> Result<bool, BodyError> {
        if self.pos < self.len {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        self.check_json_size()?;
        let n = loop {
            match self.src.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BodyError::Read(e.to_string())),
            }
        };
        self.pos = 0;
        self.len = n;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.received += n as u64;
        if self.received > self.limits.max_request_bytes {
            return Err(BodyError::TooLarge { limit: self.limits.max_request_bytes });
        }
        Ok(true)
    }

    fn next_byte(&mut self) -> Result<Option<u8>, BodyError> {
        if !self.fill()? {
            return Ok(None);
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(Some(b))
    }

    fn peek_non_ws(&mut self) -> Result<Option<u8>, BodyError> {
        loop {
            if !self.fill()? {
                return Ok(None);
            }
            match self.buf[self.pos] {
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'\n' => {
                    self.pos += 1;
                    self.line += 1;
                    self.line_start = self.offset();
                }
                b => return Ok(Some(b)),
            }
        }
    }

    fn expect(&mut self, want: u8, what: &str) -> Result<(), BodyError> {
        match self.peek_non_ws()? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.syntax(&format!("expected {what}"))),
            None => Err(self.syntax(&format!("unexpected end of the body, expected {what}"))),
        }
    }

    fn enter(&self, depth: usize) -> Result<usize, BodyError> {
        if depth >= self.limits.max_depth {
            let column = self.offset() - self.line_start + 1;
            return Err(BodyError::TooDeep { limit: self.limits.max_depth, line: self.line, column });
        }
        Ok(depth + 1)
    }

    /// A value; `attachment` says objects here (or in this array) are Attachments.
    fn value(&mut self, depth: usize, attachment: bool) -> Result<Value, BodyError> {
        match self.peek_non_ws()? {
            None => Err(self.syntax("unexpected end of the body")),
            Some(b'{') => self.object(depth, attachment),
            Some(b'[') => self.array(depth, attachment),
            Some(b'"') => {
                self.pos += 1;
                Ok(Value::String(self.string()?))
            }
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.syntax("unexpected character")),
        }
    }

    fn literal(&mut self, word: &[u8], value: Value) -> Result<Value, BodyError> {
        for &w in word {
            // Peek first, so the error points at the offending character.
            if !self.fill()? || self.buf[self.pos] != w {
                return Err(self.syntax("invalid literal (expected true, false or null)"));
            }
            self.pos += 1;
        }
        Ok(value)
    }

    fn number(&mut self) -> Result<Value, BodyError> {
        let start = self.syntax("invalid number");
        let mut text = Vec::new();
        while self.fill()? {
            let b = self.buf[self.pos];
            if !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                break;
            }
            if text.len() >= self.limits.max_string_bytes {
                return Err(BodyError::StringTooLong {
                    limit: self.limits.max_string_bytes,
                    expression: self.expression(),
                });
            }
            text.push(b);
            self.pos += 1;
        }
        // serde_json decides what a valid JSON number is (and rejects `01`, `1.`, `-`).
        match serde_json::from_slice::<serde_json::Number>(&text) {
            Ok(n) => Ok(Value::Number(n)),
            Err(_) => Err(start),
        }
    }

    fn array(&mut self, depth: usize, attachment: bool) -> Result<Value, BodyError> {
        let depth = self.enter(depth)?;
        self.pos += 1;
        let mut items = Vec::new();
        if self.peek_non_ws()? == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.path.push(Seg::Index(items.len()));
            // Only an array directly under an attachment member holds Attachments.
            let item = match self.peek_non_ws()? {
                Some(b'{') => self.value(depth, attachment)?,
                _ => self.value(depth, false)?,
            };
            self.path.pop();
            items.push(item);
            match self.peek_non_ws()? {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                Some(_) => return Err(self.syntax("expected ',' or ']'")),
                None => return Err(self.syntax("unexpected end of the body inside an array")),
            }
        }
    }

    fn object(&mut self, depth: usize, attachment: bool) -> Result<Value, BodyError> {
        let depth = self.enter(depth)?;
        self.pos += 1;
        let mut map = Map::new();
        let mut saw_data = false;
        if self.peek_non_ws()? == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            match self.peek_non_ws()? {
                Some(b'"') => self.pos += 1,
                Some(_) => return Err(self.syntax("expected a member name")),
                None => return Err(self.syntax("unexpected end of the body inside an object")),
            }
            let name = self.string()?;
            self.expect(b':', "':'")?;
            self.path.push(Seg::Key(name));
            let is_data = attachment && matches!(self.path.last(), Some(Seg::Key(k)) if k == "data");
            if is_data {
                if saw_data {
                    return Err(self.invalid("duplicate member 'data'"));
                }
                saw_data = true;
                self.attachment_data()?;
                self.path.pop();
            } else {
                let child_attachments = matches!(self.path.last(), Some(Seg::Key(k)) if holds_attachments(k));
                let value = self.value(depth, child_attachments)?;
                let Some(Seg::Key(name)) = self.path.pop() else {
                    return Err(BodyError::Internal("path out of step".into()));
                };
                if map.contains_key(&name) {
                    self.path.push(Seg::Key(name));
                    return Err(self.invalid("duplicate member name"));
                }
                map.insert(name, value);
            }
            match self.peek_non_ws()? {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                Some(_) => return Err(self.syntax("expected ',' or '}'")),
                None => return Err(self.syntax("unexpected end of the body inside an object")),
            }
        }
    }

    fn invalid(&self, message: &str) -> BodyError {
        BodyError::Invalid { expression: self.expression(), message: message.into() }
    }

    /// The rest of a string after its opening quote, unescaped, at most `max_string_bytes`.
    fn string(&mut self) -> Result<String, BodyError> {
        let limit = self.limits.max_string_bytes;
        let mut out = Vec::new();
        loop {
            if !self.fill()? {
                return Err(self.syntax("unterminated string"));
            }
            let rest = &self.buf[self.pos..self.len];
            let run = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).unwrap_or(rest.len());
            if out.len() + run > limit {
                return Err(BodyError::StringTooLong { limit, expression: self.expression() });
            }
            out.extend_from_slice(&rest[..run]);
            self.pos += run;
            if self.pos == self.len {
                continue;
            }
            match self.buf[self.pos] {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => {
                    self.pos += 1;
                    let c = self.escape()?;
                    let mut tmp = [0u8; 4];
                    let enc = c.encode_utf8(&mut tmp);
                    if out.len() + enc.len() > limit {
                        return Err(BodyError::StringTooLong { limit, expression: self.expression() });
                    }
                    out.extend_from_slice(enc.as_bytes());
                }
                _ => return Err(self.syntax("control character in a string (it must be escaped)")),
            }
        }
        String::from_utf8(out).map_err(|_| self.syntax("a string is not valid UTF-8"))
    }

    /// An escape sequence after its backslash.
    fn escape(&mut self) -> Result<char, BodyError> {
        let c = match self.next_byte()? {
            Some(b'u') => {
                let hi = self.hex4()?;
                if (0xD800..0xDC00).contains(&hi) {
                    if self.next_byte()? != Some(b'\\') || self.next_byte()? != Some(b'u') {
                        return Err(self.syntax("unpaired surrogate in a \\u escape"));
                    }
                    let lo = self.hex4()?;
                    surrogate_pair(hi, lo).ok_or_else(|| self.syntax("unpaired surrogate in a \\u escape"))?
                } else {
                    char::from_u32(hi).ok_or_else(|| self.syntax("unpaired surrogate in a \\u escape"))?
                }
            }
            Some(letter) => short_escape(letter).ok_or_else(|| self.syntax("invalid escape sequence"))?,
            None => return Err(self.syntax("unterminated string")),
        };
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, BodyError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.next_byte()? {
                Some(b) => (b as char).to_digit(16),
                None => None,
            };
            v = v * 16 + d.ok_or_else(|| self.syntax("invalid \\u escape"))?;
        }
        Ok(v)
    }

    /// An Attachment's `data`: decoded and stored while it streams; the object keeps no trace of
    /// it, [`ExtractedAttachment`] records where it was.
    fn attachment_data(&mut self) -> Result<(), BodyError> {
        match self.peek_non_ws()? {
            Some(b'"') => self.pos += 1,
            Some(_) => return Err(self.invalid("attachment data must be a base64 string")),
            None => return Err(self.syntax("unexpected end of the body")),
        }
        let writer = self.store.writer_limited(Some(self.limits.max_request_bytes)).map_err(BodyError::Blob)?;
        let mut dec = Base64Sink::new(writer);
        self.data_start = Some(self.offset());
        let streamed = self.stream_data(&mut dec);
        let start = self.data_start.take().unwrap_or(0);
        streamed?;
        // Everything between the quotes is data; the closing quote is JSON.
        self.data_bytes += self.offset() - 1 - start;
        let blob = dec.finish().map_err(|e| self.b64_error(e))?;
        self.path.pop();
        let (pointer, expression) = (self.pointer(), self.expression());
        self.path.push(Seg::Key("data".into()));
        self.attachments.push(ExtractedAttachment { pointer, expression, blob });
        Ok(())
    }

    fn stream_data(&mut self, dec: &mut Base64Sink) -> Result<(), BodyError> {
        loop {
            if !self.fill()? {
                return Err(self.syntax("unterminated string"));
            }
            let rest = &self.buf[self.pos..self.len];
            let run = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).unwrap_or(rest.len());
            let fed = dec.feed(&rest[..run]);
            fed.map_err(|e| self.b64_error(e))?;
            self.pos += run;
            if self.pos == self.len {
                continue;
            }
            match self.buf[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Ok(());
                }
                b'\\' => {
                    self.pos += 1;
                    let c = self.escape()?;
                    // Escaped characters are fine (`\/`, `\n`), as long as they are base64 or whitespace.
                    let mut tmp = [0u8; 4];
                    dec.feed(c.encode_utf8(&mut tmp).as_bytes()).map_err(|e| self.b64_error(e))?;
                }
                _ => return Err(self.syntax("control character in a string (it must be escaped)")),
            }
        }
    }

    fn b64_error(&self, e: B64Error) -> BodyError {
        match e {
            B64Error::Invalid(message) => BodyError::InvalidBase64 { expression: self.expression(), message },
            B64Error::Empty => self.invalid("attachment data is empty"),
            B64Error::Blob(b) => BodyError::Blob(b),
        }
    }
}

enum B64Error {
    Invalid(String),
    Empty,
    Blob(BlobError),
}

/// Base64 decoding in 4-aligned chunks, straight into the blob writer.
struct Base64Sink {
    writer: BlobWriter,
    pending: Vec<u8>,
    out: Vec<u8>,
    /// Base64 characters seen (whitespace not counted), for error positions.
    chars: u64,
    padded: bool,
}

impl Base64Sink {
    fn new(writer: BlobWriter) -> Self {
        Base64Sink {
            writer,
            pending: Vec::with_capacity(B64_CHUNK),
            out: vec![0; B64_CHUNK / 4 * 3],
            chars: 0,
            padded: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<(), B64Error> {
        for &b in bytes {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => continue,
                b'=' => self.padded = true,
                _ if self.padded => {
                    return Err(B64Error::Invalid(format!(
                        "character {} follows the '=' padding (whitespace not counted)",
                        self.chars + 1
                    )))
                }
                _ => {}
            }
            self.pending.push(b);
            self.chars += 1;
            if self.pending.len() == B64_CHUNK {
                self.decode_pending()?;
            }
        }
        Ok(())
    }

    fn decode_pending(&mut self) -> Result<(), B64Error> {
        let base = self.chars - self.pending.len() as u64;
        let n = base64::engine::general_purpose::STANDARD.decode_slice(&self.pending, &mut self.out).map_err(|e| {
            use base64::{DecodeError, DecodeSliceError};
            let message = match e {
                DecodeSliceError::DecodeError(DecodeError::InvalidByte(at, byte)) => {
                    format!("invalid character {:?} at character {}", byte as char, base + at as u64 + 1)
                }
                DecodeSliceError::DecodeError(DecodeError::InvalidLength(_)) => {
                    "the length is not a multiple of 4 ('=' padding is required)".to_string()
                }
                DecodeSliceError::DecodeError(DecodeError::InvalidLastSymbol(at, byte)) => format!(
                    "the last character {:?} (character {}) has non-zero unused bits",
                    byte as char,
                    base + at as u64 + 1
                ),
                DecodeSliceError::DecodeError(DecodeError::InvalidPadding) => {
                    "missing or misplaced '=' padding (the length must be a multiple of 4)".to_string()
                }
                DecodeSliceError::OutputSliceTooSmall => "decoder buffer too small".to_string(),
            };
            B64Error::Invalid(message)
        })?;
        self.pending.clear();
        self.writer.write_chunk(&self.out[..n]).map_err(B64Error::Blob)
    }

    fn finish(mut self) -> Result<BlobRef, B64Error> {
        if self.chars == 0 {
            return Err(B64Error::Empty);
        }
        if !self.pending.is_empty() {
            self.decode_pending()?;
        }
        self.writer.finish().map_err(B64Error::Blob)
    }
}

#[cfg(test)]
mod tests;
