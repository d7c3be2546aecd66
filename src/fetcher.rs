//! The attachment fetcher: CDex content sent by `attachment.url` is fetched here, in the
//! processors role, never inside the `$submit-attachment` request.
//!
//! It reads the attachments topic in its own consumer group. For each SUBMITTED event with
//! content still to fetch it checks every URL against the [`Policy`] (SSRF defence: schemes,
//! and the resolved addresses, which are then the only ones connected to, so DNS rebinding
//! cannot slip past the check), streams the body into the blob store, checks the size and hash
//! the DocumentReference declared, and appends FETCHED (every URL of the submission stored, the
//! resource rewritten to point at payerx's Binary) or FETCH_FAILED (the reason names the URL and
//! why), keyed by the tracking id. Outputs are appended before the input offset is committed
//! (at-least-once) and carry ids derived from the input, so a redelivery repeats the same ids;
//! the link projection decides a submission once, so the first FETCHED/FETCH_FAILED wins.
//!
//! The decisions (policy, address classes, verification, the events) are pure functions below;
//! the IO (DNS, HTTP, blob writes, the log) is in [`Fetcher`] and [`run`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use blobs::{BlobError, BlobStore};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::Url;
use runtime::processor::RunOptions;
use runtime::{Consumed, Log, LogError, Record};
use schemas::topics::{self, headers};
use schemas::{AttachmentEvent, AttachmentEventKind, Blob, IssueType, OperationOutcome, SubmittedAttachment};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Stage name; the consumer group is `{topic prefix}attachment-fetch`.
pub const STAGE: &str = "attachment-fetch";

/// One `--attachment-fetch-allow` entry: a host name, an IP address or a CIDR block that may
/// be fetched from even though it is private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name as written in URLs (lowercase).
    Host(String),
    /// An address block; a single address is a /32 or /128.
    Net { addr: IpAddr, prefix: u8 },
}

impl FromStr for AllowEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty entry".into());
        }
        let (ip, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        if let Ok(addr) = ip.parse::<IpAddr>() {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("'{s}': the prefix length must be a number from 0 to {max}"))?,
            };
            return Ok(AllowEntry::Net { addr, prefix });
        }
        if prefix.is_some() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err(format!("'{s}' is neither a host name, an IP address nor a CIDR block"));
        }
        Ok(AllowEntry::Host(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Host(h) => f.write_str(h),
            AllowEntry::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

impl AllowEntry {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (AllowEntry::Net { addr: IpAddr::V4(net), prefix }, IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*net) & mask == u32::from(ip) & mask
            }
            (AllowEntry::Net { addr: IpAddr::V6(net), prefix }, IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                u128::from(*net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why an address may not be fetched from without an allow-list entry; `None` for a public one.
pub fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            // IPv4 inside IPv6 (mapped, or the NAT64 well-known prefix) is judged as IPv4.
            let seg = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_class(v4);
            }
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return v4_class(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else {
                None
            }
        }
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && o[1] & 0xc0 == 64 {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// Which URLs may be fetched: the SSRF defence. Pure; the fetcher applies it to every hop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<AllowEntry>,
    pub allow_http: bool,
}

impl Policy {
    fn host_allowed(&self, host: &str) -> bool {
        self.allow.iter().any(|a| matches!(a, AllowEntry::Host(h) if h.eq_ignore_ascii_case(host)))
    }

    /// The checks that need no DNS: scheme, a host, and the address when the host is one.
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err("plain http is not allowed (https only; see --attachment-fetch-allow-http)".into()),
            other => {
                let allowed = if self.allow_http { "https and http" } else { "https" };
                return Err(format!("the scheme '{other}' is not allowed (only {allowed})"));
            }
        }
        match url.host() {
            None => Err("the URL has no host".into()),
            Some(url::Host::Domain(_)) => Ok(()),
            Some(url::Host::Ipv4(ip)) => self.check_addrs(&ip.to_string(), &[IpAddr::V4(ip)]),
            Some(url::Host::Ipv6(ip)) => self.check_addrs(&ip.to_string(), &[IpAddr::V6(ip)]),
        }
    }

    /// The addresses `host` resolved to: every one must be public or allow-listed (a mixed
    /// answer is refused rather than filtered, so what is connected to is what was checked).
    pub fn check_addrs(&self, host: &str, addrs: &[IpAddr]) -> Result<(), String> {
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        if self.host_allowed(host) {
            return Ok(());
        }
        for ip in addrs {
            if let Some(class) = forbidden_class(*ip) {
                if !self.allow.iter().any(|a| a.contains(*ip)) {
                    return Err(format!(
                        "{host} is a {class} address ({ip}), not allowed unless listed in --attachment-fetch-allow"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How a fetch ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The policy refused the URL or a redirect (permanent).
    Refused(String),
    /// Not a usable URL, too many redirects, a redirect without Location (permanent).
    Invalid(String),
    Dns(String),
    Connect(String),
    Timeout(Duration),
    Status(u16),
    TooLarge(u64),
    /// The bytes are not what the DocumentReference declared (permanent).
    Mismatch(String),
    /// Any other transport failure while talking to the server.
    Transport(String),
    /// payerx's own blob store failed: not the submitter's fault, retried until it works.
    Store(String),
}

impl FetchError {
    /// Whether another attempt may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            FetchError::Dns(_)
            | FetchError::Connect(_)
            | FetchError::Timeout(_)
            | FetchError::Transport(_)
            | FetchError::Store(_) => true,
            FetchError::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            FetchError::Refused(_) | FetchError::Invalid(_) | FetchError::TooLarge(_) | FetchError::Mismatch(_) => {
                false
            }
        }
    }

    fn issue_type(&self) -> IssueType {
        match self {
            FetchError::Refused(_) => IssueType::Security,
            FetchError::Timeout(_) => IssueType::Timeout,
            FetchError::TooLarge(_) => IssueType::TooLong,
            FetchError::Mismatch(_) | FetchError::Invalid(_) => IssueType::Value,
            FetchError::Status(404) | FetchError::Status(410) => IssueType::NotFound,
            _ => IssueType::Transient,
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Refused(why) => write!(f, "refused by the fetch policy: {why}"),
            FetchError::Invalid(why) => f.write_str(why),
            FetchError::Dns(why) => write!(f, "DNS lookup failed: {why}"),
            FetchError::Connect(why) => write!(f, "connection failed: {why}"),
            FetchError::Timeout(d) => write!(f, "timed out after {} s", d.as_secs_f64()),
            FetchError::Status(s) => write!(f, "the server answered HTTP {s}"),
            FetchError::TooLarge(limit) => write!(f, "the content is larger than the limit of {limit} bytes"),
            FetchError::Mismatch(why) => f.write_str(why),
            FetchError::Transport(why) => write!(f, "transfer failed: {why}"),
            FetchError::Store(why) => write!(f, "the blob store failed: {why}"),
        }
    }
}

/// Checks the bytes against the `size` and `hash` (base64 SHA-1) the Attachment declared.
pub fn verify(attachment: &Value, blob: &Blob) -> Result<(), FetchError> {
    if let Some(size) = attachment.get("size").and_then(Value::as_i64) {
        if size != blob.size {
            return Err(FetchError::Mismatch(format!(
                "attachment.size is {size}, but the fetched content has {} bytes",
                blob.size
            )));
        }
    }
    if let Some(hash) = attachment.get("hash").and_then(Value::as_str) {
        if hash != blob.sha1 {
            return Err(FetchError::Mismatch(format!(
                "attachment.hash is {hash}, but the SHA-1 of the fetched content is {}",
                blob.sha1
            )));
        }
    }
    Ok(())
}

/// Where payerx serves a blob: `{base}/fhir/Binary/{sha256}` with a public base URL, else the
/// FHIR-relative `Binary/{sha256}` (resolved against the server's FHIR base by clients).
pub fn binary_url(public_base: Option<&str>, sha256: &str) -> String {
    match public_base {
        Some(base) => format!("{}/fhir/Binary/{sha256}", base.trim_end_matches('/')),
        None => format!("Binary/{sha256}"),
    }
}

/// What one fetched URL gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub blob: Blob,
    /// The response's Content-Type, used when the Attachment declared none.
    pub content_type: Option<String>,
}

/// The URLs of a SUBMITTED event still to fetch: (attachment position, content position, URL).
pub fn plan(ev: &AttachmentEvent) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    if ev.kind != AttachmentEventKind::Submitted {
        return out;
    }
    for (i, a) in ev.attachments.iter().enumerate() {
        for (j, c) in a.content.iter().enumerate() {
            if let (true, Some(url)) = (c.awaits_fetch(), &c.source_url) {
                out.push((i, j, url.clone()));
            }
        }
    }
    out
}

/// The attachments of `ev` that waited for a fetch, with the fetched content filled in and
/// their resource's Attachment objects pointing at payerx. `got` follows [`plan`]'s order.
/// Fails when the bytes contradict the declared size or hash.
pub fn fetched_attachments(
    ev: &AttachmentEvent,
    got: &[((usize, usize, String), Fetched)],
    public_base: Option<&str>,
) -> Result<Vec<SubmittedAttachment>, (String, FetchError)> {
    let mut out: Vec<SubmittedAttachment> = Vec::new();
    for ((i, j, url), f) in got {
        let Some(original) = ev.attachments.get(*i) else { continue };
        if out.last().map(|a| a.index) != Some(original.index) {
            out.push(original.clone());
        }
        let Some(a) = out.last_mut() else { continue };
        let mut resource: Value = serde_json::from_str(&a.resource)
            .map_err(|e| (url.clone(), FetchError::Invalid(format!("the content resource is not JSON: {e}"))))?;
        let Some(c) = a.content.get_mut(*j) else { continue };
        if let Some(obj) = resource.pointer_mut(&c.path) {
            verify(obj, &f.blob).map_err(|e| (url.clone(), e))?;
            obj["url"] = Value::String(binary_url(public_base, &f.blob.sha256));
            obj["size"] = Value::from(f.blob.size);
            obj["hash"] = Value::String(f.blob.sha1.clone());
            if obj.get("contentType").is_none() {
                if let Some(ct) = &f.content_type {
                    obj["contentType"] = Value::String(ct.clone());
                }
            }
        }
        if c.content_type.is_none() {
            c.content_type = f.content_type.clone();
        }
        c.blob = Some(f.blob.clone());
        a.resource = resource.to_string();
    }
    Ok(out)
}

/// FETCHED or FETCH_FAILED for the SUBMITTED event `ev` (envelope already derived).
pub fn outcome_event(
    ev: &AttachmentEvent,
    envelope: schemas::Envelope,
    result: Result<Vec<SubmittedAttachment>, (String, FetchError, u32)>,
) -> AttachmentEvent {
    let kind = if result.is_ok() { AttachmentEventKind::Fetched } else { AttachmentEventKind::FetchFailed };
    let mut out = AttachmentEvent::new(envelope, kind, ev.tracking_id.clone());
    out.submission_id = ev.submission_id.clone();
    out.attach_to = ev.attach_to;
    out.member_id = ev.member_id.clone();
    out.is_final = ev.is_final;
    match result {
        Ok(attachments) => out.attachments = attachments,
        Err((url, e, attempts)) => {
            out.attachments = ev.attachments.iter().filter(|a| a.awaits_fetch()).cloned().collect();
            let tries = if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() };
            let reason = format!("could not fetch {url}: {e}{tries}");
            out.outcome = Some(OperationOutcome::error(e.issue_type(), reason.clone()).to_json().to_string());
            out.reason = Some(reason);
        }
    }
    out
}

/// Settings of the fetcher (`--attachment-fetch-*`).
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub policy: Policy,
    /// For connecting (TCP and TLS) to one address.
    pub connect_timeout: Duration,
    /// For one whole attempt: DNS, redirects and the body.
    pub timeout: Duration,
    pub max_bytes: u64,
    pub max_redirects: usize,
    /// Attempts after the first for retriable failures (timeouts, connection errors, 5xx).
    pub retries: u32,
    /// Wait before the first retry; doubled each time.
    pub retry_backoff: Duration,
    /// Base of the Binary URLs written into fetched attachments; relative when unset.
    pub public_base: Option<String>,
}

/// The IO side: DNS, HTTP and the blob store.
pub struct Fetcher {
    pub config: FetchConfig,
    pub blobs: BlobStore,
}

impl Fetcher {
    /// One attempt at `url`, redirects followed (each hop checked), within the overall timeout.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, self.fetch_inner(url)).await.map_err(|_| FetchError::Timeout(timeout))?
    }

    async fn fetch_inner(&self, url: &str) -> Result<Fetched, FetchError> {
        let mut url = Url::parse(url).map_err(|e| FetchError::Invalid(format!("not a valid URL: {e}")))?;
        for _ in 0..=self.config.max_redirects {
            self.config.policy.check_url(&url).map_err(FetchError::Refused)?;
            let mut builder = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // A proxy would connect to addresses the policy never saw.
                .no_proxy()
                .connect_timeout(self.config.connect_timeout);
            if let Some(url::Host::Domain(host)) = url.host() {
                let port = url.port_or_known_default().unwrap_or(443);
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| FetchError::Dns(format!("{host}: {e}")))?
                    .collect();
                let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
                self.config.policy.check_addrs(host, &ips).map_err(FetchError::Refused)?;
                // Connect to exactly the addresses checked: a second lookup could differ.
                builder = builder.resolve_to_addrs(host, &addrs);
            }
            let client = builder.build().map_err(|e| FetchError::Transport(e.to_string()))?;
            let resp = client.get(url.clone()).send().await.map_err(transport)?;
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| FetchError::Invalid(format!("HTTP {} without a Location", status.as_u16())))?;
                url = url
                    .join(location)
                    .map_err(|e| FetchError::Invalid(format!("redirect to an invalid URL '{location}': {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status(status.as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > self.config.max_bytes) {
                return Err(FetchError::TooLarge(self.config.max_bytes));
            }
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
                .filter(|v| !v.is_empty());
            let blob = self.store(resp).await?;
            return Ok(Fetched { blob, content_type });
        }
        Err(FetchError::Invalid(format!("more than {} redirects", self.config.max_redirects)))
    }

    /// Streams the body into the blob store: the (blocking) writer runs on a blocking thread
    /// and receives chunks through a small channel, so memory stays bounded.
    async fn store(&self, resp: reqwest::Response) -> Result<Blob, FetchError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(8);
        let (store, max) = (self.blobs.clone(), self.config.max_bytes);
        let writer = tokio::task::spawn_blocking(move || -> Result<Option<blobs::BlobRef>, BlobError> {
            let mut w = store.writer_limited(Some(max))?;
            while let Some(chunk) = rx.blocking_recv() {
                match chunk {
                    Some(bytes) => w.write_chunk(&bytes)?,
                    None => return w.finish().map(Some),
                }
            }
            Ok(None) // the download failed: dropping the writer discards what it wrote
        });
        let mut body = resp.bytes_stream();
        let mut failed = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if tx.send(Some(bytes)).await.is_err() {
                        break; // the writer stopped: its error says why
                    }
                }
                Err(e) => {
                    failed = Some(transport(e));
                    break;
                }
            }
        }
        if failed.is_none() {
            let _ = tx.send(None).await;
        }
        drop(tx);
        let written = writer.await.map_err(|e| FetchError::Store(e.to_string()))?;
        match (written, failed) {
            (Err(BlobError::TooLarge { limit }), _) => Err(FetchError::TooLarge(limit)),
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(FetchError::Store(e.to_string())),
            (Ok(Some(b)), None) => Ok(Blob {
                sha256: b.sha256,
                sha1: b.sha1_base64,
                size: i64::try_from(b.size).unwrap_or(i64::MAX),
                location: b.location,
            }),
            (Ok(None), None) => Err(FetchError::Transport("the body ended unexpectedly".into())),
        }
    }

    /// [`Self::fetch`] with retries for what may succeed later. `None` when `shutdown` fired.
    pub async fn fetch_with_retries(
        &self,
        url: &str,
        shutdown: &CancellationToken,
    ) -> Option<Result<Fetched, (FetchError, u32)>> {
        let mut backoff = self.config.retry_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = tokio::select! {
                r = self.fetch(url) => r,
                _ = shutdown.cancelled() => return None,
            };
            match result {
                Ok(f) => return Some(Ok(f)),
                // payerx's own storage: never the submitter's fault, so never a FETCH_FAILED.
                Err(FetchError::Store(e)) => {
                    tracing::warn!(url, error = e, "blob store failed while fetching, retrying");
                    attempts -= 1;
                }
                Err(e) if e.is_retriable() && attempts <= self.config.retries => {
                    metrics::counter!("payerx_attachment_fetch_retries_total").increment(1);
                    tracing::info!(url, error = %e, attempt = attempts, ?backoff, "attachment fetch failed, retrying");
                }
                Err(e) => return Some(Err((e, attempts))),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }

    /// The FETCHED or FETCH_FAILED event for one SUBMITTED record, or `None` when there is
    /// nothing to fetch (or `shutdown` fired first).
    pub async fn handle(
        &self,
        input: &Consumed,
        ev: &AttachmentEvent,
        shutdown: &CancellationToken,
    ) -> Option<AttachmentEvent> {
        let todo = plan(ev);
        if todo.is_empty() {
            return None;
        }
        let mut got = Vec::with_capacity(todo.len());
        let mut failure = None;
        for (i, j, url) in todo {
            match self.fetch_with_retries(&url, shutdown).await? {
                Ok(f) => got.push(((i, j, url), f)),
                Err((e, attempts)) => {
                    failure = Some((url, e, attempts));
                    break;
                }
            }
        }
        let result = match failure {
            Some(f) => Err(f),
            None => fetched_attachments(ev, &got, self.config.public_base.as_deref()).map_err(|(u, e)| (u, e, 1)),
        };
        // The link projection also derives events from this record: a stage-qualified topic
        // keeps the two sets of ids apart.
        let envelope = ev.envelope.derived(
            AttachmentEvent::EVENT_TYPE,
            1,
            &format!("{}#{STAGE}", input.topic),
            input.partition,
            input.offset,
            0,
        );
        let out = outcome_event(ev, envelope, result);
        metrics::counter!("payerx_attachment_fetches_total", "outcome" => if out.kind == AttachmentEventKind::Fetched { "fetched" } else { "failed" }).increment(1);
        Some(out)
    }
}

fn transport(e: reqwest::Error) -> FetchError {
    // The innermost cause says it best ("Connection refused", "tls handshake eof", …).
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        FetchError::Transport(format!("timed out: {detail}"))
    } else if e.is_connect() {
        FetchError::Connect(detail)
    } else {
        FetchError::Transport(detail)
    }
}

fn record(topic: &str, ev: &AttachmentEvent) -> Result<Record, schemas::SchemaError> {
    let value = schemas::encode_event(ev)?;
    Ok(Record::new(topic.to_string(), ev.key(), value)
        .header(headers::EVENT_TYPE, AttachmentEvent::EVENT_TYPE)
        .header(headers::EVENT_ID, ev.envelope.event_id.clone())
        .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone()))
}

/// Runs the fetcher until `shutdown`: a fetch in progress is abandoned, its record left
/// uncommitted, so the next start fetches it again.
pub async fn run(
    log: Arc<dyn Log>,
    fetcher: Arc<Fetcher>,
    topic_prefix: &str,
    shutdown: CancellationToken,
) -> Result<(), LogError> {
    let topic = topics::full(topic_prefix, topics::ATTACHMENTS);
    let group = format!("{topic_prefix}{STAGE}");
    let opts = RunOptions::default();
    let mut consumer =
        runtime::processor::retry(&opts, &shutdown, || log.group_consumer(&group, std::slice::from_ref(&topic)))
            .await?;
    tracing::info!(group, "attachment fetcher started");
    while !shutdown.is_cancelled() {
        let batch = tokio::select! {
            r = consumer.poll(100, opts.poll_wait) => r,
            _ = shutdown.cancelled() => break,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) if e.is_retriable() => {
                tracing::warn!(error = %e, "poll failed, retrying");
                tokio::time::sleep(opts.initial_backoff).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut next: Vec<(String, i32, i64)> = Vec::new();
        let mut interrupted = false;
        for input in &batch {
            let ev = match schemas::decode_event::<AttachmentEvent>(&input.value) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(source = input.coordinates(), error = %e, "undecodable event skipped by the attachment fetcher");
                    set_next(&mut next, input);
                    continue;
                }
            };
            if plan(&ev).is_empty() {
                set_next(&mut next, input);
                continue;
            }
            let Some(out) = fetcher.handle(input, &ev, &shutdown).await else {
                // Shutting down mid-fetch: this record stays uncommitted and is fetched again.
                interrupted = true;
                break;
            };
            set_next(&mut next, input);
            match record(&topic, &out) {
                Ok(r) => {
                    runtime::processor::retry(&opts, &CancellationToken::new(), || log.append(vec![r.clone()])).await?;
                }
                Err(e) => tracing::error!(error = %e, "attachment fetch outcome not encodable"),
            }
            // Fetches are slow: commit as soon as an outcome is durable, not once per batch.
            runtime::processor::commit(&mut *consumer, &opts, &next).await?;
        }
        runtime::processor::commit(&mut *consumer, &opts, &next).await?;
        if interrupted {
            break;
        }
    }
    tracing::info!("attachment fetcher stopped");
    Ok(())
}

fn set_next(next: &mut Vec<(String, i32, i64)>, input: &Consumed) {
    match next.iter_mut().find(|(t, p, _)| *t == input.topic && *p == input.partition) {
        Some(n) => n.2 = input.offset + 1,
        None => next.push((input.topic.clone(), input.partition, input.offset + 1)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn allow(entries: &[&str]) -> Policy {
        Policy { allow: entries.iter().map(|e| e.parse().unwrap()).collect(), allow_http: false }
    }

    #[test]
    fn only_https_unless_http_is_allowed() {
        let p = Policy::default();
        assert_eq!(p.check_url(&url("https://ehr.example/doc.pdf")), Ok(()));
        assert!(p.check_url(&url("http://ehr.example/doc.pdf")).unwrap_err().contains("plain http"));
        for refused in ["file:///etc/passwd", "ftp://ehr.example/x", "gopher://ehr.example/", "data:text/plain,x"] {
            let why = p.check_url(&url(refused)).unwrap_err();
            assert!(why.contains("scheme") && why.contains("not allowed"), "{refused}: {why}");
        }
        let http = Policy { allow_http: true, ..Policy::default() };
        assert_eq!(http.check_url(&url("http://ehr.example/doc.pdf")), Ok(()));
        assert!(http.check_url(&url("file:///etc/passwd")).is_err());
    }

    #[test]
    fn every_non_public_address_class_is_refused() {
        let p = Policy::default();
        for (ip, class) in [
            ("127.0.0.1", "loopback"),
            ("10.255.255.1", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "shared"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a00:1", "private"),
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(forbidden_class(addr).unwrap_or("").starts_with(class), "{ip}: {:?}", forbidden_class(addr));
            let why = p.check_addrs("h.example", &[addr]).unwrap_err();
            assert!(why.contains(class) && why.contains("--attachment-fetch-allow"), "{why}");
            // The same address written into the URL is refused without any DNS.
            let literal = if addr.is_ipv6() { format!("https://[{ip}]/x") } else { format!("https://{ip}/x") };
            assert!(p.check_url(&url(&literal)).is_err(), "{literal}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"] {
            assert_eq!(forbidden_class(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn a_mixed_dns_answer_is_refused_not_filtered() {
        let p = Policy::default();
        let ips = ["93.184.216.34".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        assert!(p.check_addrs("rebind.example", &ips).unwrap_err().contains("10.0.0.5"));
        assert!(p.check_addrs("nothing.example", &[]).is_err());
    }

    #[test]
    fn the_allow_list_takes_hosts_addresses_and_cidrs() {
        let p = allow(&["127.0.0.1", "10.20.0.0/16", "Docs.Internal", "fd00::/8"]);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(p.check_addrs("127.0.0.1", &[lo]), Ok(()));
        assert!(p.check_addrs("x", &["127.0.0.2".parse().unwrap()]).is_err());
        assert_eq!(p.check_addrs("x", &["10.20.3.4".parse().unwrap()]), Ok(()));
        assert!(p.check_addrs("x", &["10.21.0.1".parse().unwrap()]).is_err());
        assert_eq!(p.check_addrs("docs.internal", &["192.168.0.9".parse().unwrap()]), Ok(()));
        assert_eq!(p.check_addrs("x", &["fd12::1".parse().unwrap()]), Ok(()));
        assert_eq!(p.check_url(&url("https://127.0.0.1:8443/doc")), Ok(()));
        assert!(p.check_url(&url("http://127.0.0.1:8443/doc")).is_err(), "the allow-list does not allow http");
        for bad in ["", "10.0.0.0/33", "a b", "host/8", "::/129"] {
            assert!(bad.parse::<AllowEntry>().is_err(), "{bad:?}");
        }
        assert_eq!("0.0.0.0/0".parse::<AllowEntry>().unwrap().to_string(), "0.0.0.0/0");
        assert!("0.0.0.0/0".parse::<AllowEntry>().unwrap().contains("10.1.1.1".parse().unwrap()));
    }

    fn blob(size: i64) -> Blob {
        Blob { sha256: "ab".repeat(32), sha1: "c2hhMQ==".into(), size, location: "file:///b".into() }
    }

    fn submitted(resource: Value) -> AttachmentEvent {
        let mut ev = AttachmentEvent::new(
            schemas::Envelope::new("AttachmentEvent", 1, "c".into(), None),
            AttachmentEventKind::Submitted,
            "T1".into(),
        );
        ev.submission_id = Some("s1".into());
        ev.attachments = vec![SubmittedAttachment {
            index: 3,
            line_items: vec![],
            code: None,
            resource_type: "DocumentReference".into(),
            resource: resource.to_string(),
            document_reference: None,
            content: vec![schemas::AttachmentContent {
                path: "/content/0/attachment".into(),
                content_type: None,
                source_url: Some("https://ehr.example/d".into()),
                blob: None,
            }],
        }];
        ev
    }

    #[test]
    fn fetched_content_points_at_payerx_and_is_verified() {
        let ev = submitted(serde_json::json!({"resourceType": "DocumentReference",
            "content": [{"attachment": {"url": "https://ehr.example/d", "size": 4}}]}));
        let todo = plan(&ev);
        assert_eq!(todo, [(0, 0, "https://ehr.example/d".to_string())]);
        let got = vec![(todo[0].clone(), Fetched { blob: blob(4), content_type: Some("application/pdf".into()) })];
        let out = fetched_attachments(&ev, &got, Some("https://payer.example/")).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].index, 3);
        assert!(!out[0].awaits_fetch());
        assert_eq!(out[0].content[0].content_type.as_deref(), Some("application/pdf"));
        let r: Value = serde_json::from_str(&out[0].resource).unwrap();
        let a = &r["content"][0]["attachment"];
        assert_eq!(a["url"], format!("https://payer.example/fhir/Binary/{}", "ab".repeat(32)));
        assert_eq!((a["size"].as_i64(), a["hash"].as_str()), (Some(4), Some("c2hhMQ==")));
        assert_eq!(a["contentType"], "application/pdf");
        let relative = fetched_attachments(&ev, &got, None).unwrap();
        assert!(relative[0].resource.contains(&format!("\"Binary/{}\"", "ab".repeat(32))));

        let wrong = vec![(todo[0].clone(), Fetched { blob: blob(5), content_type: None })];
        let (u, e) = fetched_attachments(&ev, &wrong, None).unwrap_err();
        assert_eq!(u, "https://ehr.example/d");
        assert!(e.to_string().contains("attachment.size is 4") && !e.is_retriable(), "{e}");
        let mut hashed = submitted(serde_json::json!({"resourceType": "DocumentReference",
            "content": [{"attachment": {"url": "https://ehr.example/d", "hash": "AAAA"}}]}));
        let e = fetched_attachments(&hashed, &got, None).unwrap_err().1;
        assert!(e.to_string().contains("attachment.hash is AAAA"), "{e}");
        hashed.kind = AttachmentEventKind::Fetched;
        assert!(plan(&hashed).is_empty(), "only SUBMITTED events are fetched");
    }

    #[test]
    fn a_failure_names_the_url_why_and_the_attempts() {
        let ev = submitted(serde_json::json!({"resourceType": "DocumentReference"}));
        let env = ev.envelope.clone();
        let out = outcome_event(
            &ev,
            env,
            Err(("https://ehr.example/d".into(), FetchError::Connect("Connection refused".into()), 4)),
        );
        assert_eq!(out.kind, AttachmentEventKind::FetchFailed);
        assert_eq!(out.submission_id.as_deref(), Some("s1"));
        let reason = out.reason.unwrap();
        assert_eq!(
            reason,
            "could not fetch https://ehr.example/d: connection failed: Connection refused (after 4 attempts)"
        );
        let oo: Value = serde_json::from_str(&out.outcome.unwrap()).unwrap();
        assert_eq!(oo["issue"][0]["diagnostics"], reason);
        assert!(FetchError::Status(503).is_retriable() && !FetchError::Status(404).is_retriable());
        assert!(!FetchError::Refused("x".into()).is_retriable() && !FetchError::TooLarge(1).is_retriable());
    }

    /// A local server: `/doc` bytes, `/big` too large, `/to-private` and `/to-file` redirects,
    /// `/loop` redirecting to itself.
    async fn server() -> String {
        use axum::response::IntoResponse;
        use axum::routing::get;
        let redirect = |to: &'static str| move || async move { (axum::http::StatusCode::FOUND, [("location", to)]) };
        let app = axum::Router::new()
            .route("/doc", get(|| async { ([("content-type", "application/pdf")], "%PDF-1.4 x").into_response() }))
            .route("/big", get(|| async { vec![b'x'; 4096] }))
            .route("/to-private", get(redirect("http://10.255.255.1/x")))
            .route("/to-file", get(redirect("file:///etc/passwd")))
            .route("/to-doc", get(redirect("/doc")))
            .route("/loop", get(redirect("/loop")))
            .route("/gone", get(|| async { axum::http::StatusCode::NOT_FOUND }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn fetcher(dir: &std::path::Path, allow_list: &[&str]) -> Fetcher {
        Fetcher {
            config: FetchConfig {
                policy: Policy { allow_http: true, ..allow(allow_list) },
                connect_timeout: Duration::from_secs(2),
                timeout: Duration::from_secs(5),
                max_bytes: 1024,
                max_redirects: 3,
                retries: 0,
                retry_backoff: Duration::from_millis(1),
                public_base: None,
            },
            blobs: BlobStore::local(dir).unwrap(),
        }
    }

    #[tokio::test]
    async fn fetches_stream_into_the_store_and_every_redirect_is_checked_again() {
        let base = server().await;
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), &["127.0.0.1"]);
        let got = f.fetch(&format!("{base}/to-doc")).await.unwrap();
        assert_eq!(got.blob.size, 10);
        assert_eq!(got.content_type.as_deref(), Some("application/pdf"));
        assert!(f.blobs.exists(&got.blob.sha256).await.unwrap());
        let e = f.fetch(&format!("{base}/to-private")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Refused(why) if why.contains("10.255.255.1")), "{e}");
        let e = f.fetch(&format!("{base}/to-file")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Refused(why) if why.contains("'file'")), "{e}");
        assert!(f.fetch(&format!("{base}/loop")).await.unwrap_err().to_string().contains("more than 3 redirects"));
        assert_eq!(f.fetch(&format!("{base}/big")).await.unwrap_err(), FetchError::TooLarge(1024));
        assert_eq!(f.fetch(&format!("{base}/gone")).await.unwrap_err(), FetchError::Status(404));
        // Without the allow-list the local server itself is refused, before any connection.
        let strict = fetcher(dir.path(), &[]);
        let e = strict.fetch(&format!("{base}/doc")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Refused(why) if why.contains("loopback")), "{e}");
        // A closed port: a connection error, retried, then given up.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut retrying = fetcher(dir.path(), &["127.0.0.1"]);
        retrying.config.retries = 2;
        let (e, attempts) = retrying
            .fetch_with_retries(&format!("http://{closed}/x"), &CancellationToken::new())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, FetchError::Connect(_)), "{e}");
        assert_eq!(attempts, 3);
    }
}
