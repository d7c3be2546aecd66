//! Content-addressed blob store: the claim-check half of large attachments (DESIGN §4).
//!
//! Blobs are addressed by their SHA-256 (lowercase hex) and stored once. Writes stream through a
//! [`BlobWriter`] that hashes (SHA-256 for the address, SHA-1 for FHIR `Attachment.hash`) and
//! counts as bytes arrive; content becomes visible under its hash only when complete (temp file
//! and rename locally, multipart upload and server-side copy on object storage), and an
//! abandoned writer leaves nothing behind. Reads stream too ([`BlobStore::open`]).
//!
//! Backends, chosen by one URL ([`BlobLocation`]): a local folder (layout `sha256/ab/cd/<hash>`),
//! or `s3://bucket/prefix` on S3-compatible storage through `object_store`.
//!
//! [`BlobWriter`] is blocking (`std::io::Write`): use it from `spawn_blocking` or a plain thread,
//! never directly on an async worker (the object-store backend drives its uploads with
//! `Handle::block_on`). Parsing and hashing are CPU work that belongs off the async workers anyway.

pub mod bench;
mod local;
mod object;

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// What a stored blob is known by: enough for an event to carry instead of the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// SHA-256 of the content, lowercase hex: the blob's address.
    pub sha256: String,
    /// SHA-1 of the content, standard base64: the value of FHIR R4 `Attachment.hash`.
    pub sha1_base64: String,
    /// Size in bytes.
    pub size: u64,
    /// Where it lives, as a URL (`file:///…/sha256/ab/cd/<hash>`, `s3://bucket/prefix/sha256/…`).
    pub location: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("'{0}' is not a SHA-256 digest (64 lowercase hex characters)")]
    InvalidHash(String),
    #[error("invalid blob store '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("blob store I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("object store error: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("the object store backend must be opened inside a Tokio runtime")]
    NoRuntime,
}

impl BlobError {
    /// Whether trying again later may succeed (storage unreachable or full) rather than the
    /// request or configuration being wrong.
    pub fn is_retriable(&self) -> bool {
        match self {
            BlobError::Io(_) | BlobError::ObjectStore(_) => true,
            BlobError::TooLarge { .. }
            | BlobError::InvalidHash(_)
            | BlobError::InvalidUrl { .. }
            | BlobError::NoRuntime => false,
        }
    }
}

/// Where blobs live, parsed from one setting (`--blob-store`).
///
/// `s3://bucket[/prefix]` selects S3-compatible storage; `file:///path` or a plain path a local
/// folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl FromStr for BlobLocation {
    type Err = BlobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| BlobError::InvalidUrl { url: s.to_string(), reason: reason.to_string() };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("the bucket name is missing (s3://bucket/prefix)"));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if prefix.split('/').any(|p| p == "." || p == "..") {
                return Err(invalid("the prefix may not contain '.' or '..' segments"));
            }
            Ok(BlobLocation::S3 { bucket: bucket.to_string(), prefix })
        } else if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(invalid("the path is missing (file:///path)"));
            }
            Ok(BlobLocation::Local(PathBuf::from(path)))
        } else if s.contains("://") {
            Err(invalid("use a folder path, file:///path or s3://bucket/prefix"))
        } else if s.is_empty() {
            Err(invalid("empty"))
        } else {
            Ok(BlobLocation::Local(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for BlobLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobLocation::Local(p) => write!(f, "{}", p.display()),
            BlobLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            BlobLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Everything needed to open a [`BlobStore`].
#[derive(Debug, Clone)]
pub struct BlobStoreConfig {
    pub location: BlobLocation,
    /// S3 endpoint for S3-compatible servers (MinIO, s3s, …); AWS when unset (or `AWS_ENDPOINT`).
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP endpoints (local test servers).
    pub s3_allow_http: bool,
    /// Multipart part size; at most `part_size × (1 + 2 in flight)` bytes are buffered per writer.
    pub part_size: usize,
}

/// Default multipart part size: S3's 5 MiB minimum, to keep per-upload memory small.
pub const DEFAULT_PART_SIZE: usize = 5 * 1024 * 1024;

impl BlobStoreConfig {
    pub fn new(location: BlobLocation) -> Self {
        BlobStoreConfig { location, s3_endpoint: None, s3_allow_http: false, part_size: DEFAULT_PART_SIZE }
    }
}

enum Backend {
    Local(local::LocalBackend),
    Object(object::ObjectBackend),
}

/// The content-addressed blob store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    backend: Arc<Backend>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore").field("url", &self.url()).finish()
    }
}

/// A blob being read: its size and its content as a stream of chunks.
pub struct BlobRead {
    pub size: u64,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
}

impl BlobRead {
    /// The content as an `AsyncRead`.
    pub fn into_async_read(self) -> impl tokio::io::AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.stream)
    }
}

impl BlobStore {
    /// Opens the store a configuration names. S3 needs a Tokio runtime (its writers drive uploads
    /// on it), so call this from async code.
    pub fn from_config(config: &BlobStoreConfig) -> Result<Self, BlobError> {
        match &config.location {
            BlobLocation::Local(root) => Self::local(root),
            BlobLocation::S3 { bucket, prefix } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_allow_http(config.s3_allow_http);
                if let Some(endpoint) = &config.s3_endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                let s3 = builder.build()?;
                Self::object_store(Arc::new(s3), prefix, config.location.to_string(), config.part_size)
            }
        }
    }

    /// A local folder (created if missing).
    pub fn local(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        Ok(BlobStore { backend: Arc::new(Backend::Local(local::LocalBackend::new(root.into())?)) })
    }

    /// Any `object_store` backend, keys under `prefix`; `url` is how locations are written
    /// (`s3://bucket/prefix`). Must be called inside a Tokio runtime.
    pub fn object_store(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        url: String,
        part_size: usize,
    ) -> Result<Self, BlobError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| BlobError::NoRuntime)?;
        let backend = object::ObjectBackend::new(store, prefix, url, part_size.max(1), handle);
        Ok(BlobStore { backend: Arc::new(Backend::Object(backend)) })
    }

    /// The store's URL (folder path or `s3://…`), for logs.
    pub fn url(&self) -> String {
        match &*self.backend {
            Backend::Local(b) => b.root().display().to_string(),
            Backend::Object(b) => b.url().to_string(),
        }
    }

    /// A streaming writer with no size limit. Blocking: see the crate docs.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
        self.writer_limited(None)
    }

    /// A streaming writer that fails with [`BlobError::TooLarge`] (and discards what it wrote)
    /// once more than `max_size` bytes arrive.
    pub fn writer_limited(&self, max_size: Option<u64>) -> Result<BlobWriter, BlobError> {
        let sink = match &*self.backend {
            Backend::Local(b) => Sink::Local(b.sink()?),
            Backend::Object(b) => Sink::Object(b.sink()),
        };
        Ok(BlobWriter { sha256: Sha256::new(), sha1: Sha1::new(), size: 0, max_size, sink })
    }

    /// Stores everything `reader` yields. Blocking.
    pub fn put_reader(&self, mut reader: impl Read, max_size: Option<u64>) -> Result<BlobRef, BlobError> {
        let mut w = self.writer_limited(max_size)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            w.write_chunk(&buf[..n])?;
        }
        w.finish()
    }

    /// Streams a blob's content; `None` when absent.
    pub async fn open(&self, sha256: &str) -> Result<Option<BlobRead>, BlobError> {
        check_hash(sha256)?;
        match &*self.backend {
            Backend::Local(b) => b.open(sha256).await,
            Backend::Object(b) => b.open(sha256).await,
        }
    }

    pub async fn exists(&self, sha256: &str) -> Result<bool, BlobError> {
        check_hash(sha256)?;
        match &*self.backend {
            Backend::Local(b) => b.exists(sha256).await,
            Backend::Object(b) => b.exists(sha256).await,
        }
    }

    /// Removes a blob; `false` when it was absent. The caller owns the question whether other
    /// events still reference the same content (blobs are shared by hash).
    pub async fn delete(&self, sha256: &str) -> Result<bool, BlobError> {
        check_hash(sha256)?;
        match &*self.backend {
            Backend::Local(b) => b.delete(sha256).await,
            Backend::Object(b) => b.delete(sha256).await,
        }
    }
}

/// `sha256/ab/cd/<hash>`: the key of a blob below the store's root. Two levels of fan-out keep
/// folders small on local file systems.
pub fn key_of(sha256: &str) -> String {
    format!("sha256/{}/{}/{}", &sha256[0..2], &sha256[2..4], sha256)
}

fn check_hash(sha256: &str) -> Result<(), BlobError> {
    // Also what keeps a caller-provided hash from escaping the store's folder.
    if sha256.len() == 64 && sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(BlobError::InvalidHash(sha256.chars().take(80).collect()))
    }
}

enum Sink {
    Local(local::LocalSink),
    Object(object::ObjectSink),
}

/// A blob being written: hashes, counts and stores bytes as they arrive. Dropping it without
/// [`finish`](Self::finish) discards everything written.
pub struct BlobWriter {
    sha256: Sha256,
    sha1: Sha1,
    size: u64,
    max_size: Option<u64>,
    sink: Sink,
}

impl BlobWriter {
    pub fn write_chunk(&mut self, buf: &[u8]) -> Result<(), BlobError> {
        let size = self.size + buf.len() as u64;
        if let Some(limit) = self.max_size {
            if size > limit {
                return Err(BlobError::TooLarge { limit });
            }
        }
        self.sha256.update(buf);
        self.sha1.update(buf);
        match &mut self.sink {
            Sink::Local(s) => s.write(buf)?,
            Sink::Object(s) => s.write(buf)?,
        }
        self.size = size;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob visible under its hash (or finds it already there) and returns its
    /// reference.
    pub fn finish(self) -> Result<BlobRef, BlobError> {
        let sha256 = hex(&self.sha256.finalize());
        let sha1_base64 = base64::engine::general_purpose::STANDARD.encode(self.sha1.finalize());
        let location = match self.sink {
            Sink::Local(s) => s.commit(&sha256)?,
            Sink::Object(s) => s.commit(&sha256)?,
        };
        Ok(BlobRef { sha256, sha1_base64, size: self.size, location })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf).map_err(|e| match e {
            BlobError::Io(e) => e,
            other => io::Error::other(other),
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Content is durable only at `finish`; nothing to gain from flushing earlier.
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests;
