//! `payerx load PATH`: feeds NDJSON files, Bundle JSON files, or a folder of them into the log
//! through the same checks and events as the HTTP API, with a progress bar and a final count.
//! NDJSON is read in blocks of whole lines, so memory does not grow with the file.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use runtime::{Log, Record};
use schemas::topics::{self, headers};
use schemas::{ChangeAction, Envelope, OperationOutcome, ResourceChange, ResourceChanged, WriteMode};
use serde_json::Value;

use crate::config::BackendArgs;

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// An .ndjson file, a Bundle .json file, or a folder of them (searched recursively).
    pub path: PathBuf,
    /// Events per append (one durable commit each).
    #[arg(long, default_value_t = 1000)]
    pub chunk: usize,
    /// Threads that parse and validate (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// NDJSON lines longer than this are rejected unread (the HTTP API's body limit by default).
    #[arg(long, env = "PAYERX_MAX_LINE_BYTES", default_value_t = MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// Print at most this many rejected lines in full.
    #[arg(long, default_value_t = 20)]
    pub show_rejects: usize,
    /// No progress bar (for scripts).
    #[arg(long)]
    pub quiet: bool,
}

/// `--max-line-bytes` by default: the HTTP API's body limit.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

impl LoadArgs {
    /// The command's defaults for `path`, quiet.
    pub fn new(backend: BackendArgs, path: PathBuf) -> LoadArgs {
        LoadArgs {
            backend,
            path,
            chunk: 1000,
            workers: None,
            max_line_bytes: MAX_LINE_BYTES,
            show_rejects: 20,
            quiet: true,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    pub accepted: u64,
    pub rejected: u64,
    pub files: u64,
}

/// One unit of input: a resource (from NDJSON or a batch/collection Bundle) or a whole
/// transaction Bundle.
enum Item {
    Event(ResourceChanged),
    Rejected(String, OperationOutcome),
}

fn files_under(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("ndjson" | "json" | "jsonl")) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `raw` is the resource's own text when it is used unchanged (it has an id): kept as it is
/// rather than serialized again.
fn upsert(mut resource: Value, raw: Option<&str>, correlation: &str) -> Result<ResourceChanged, OperationOutcome> {
    let rtype = resource.get("resourceType").and_then(Value::as_str).unwrap_or("").to_string();
    let mut raw = raw;
    let id = match resource.get("id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => {
            raw = None;
            // Like POST: payerx assigns the id.
            let id = uuid::Uuid::new_v4().to_string();
            resource["id"] = Value::String(id.clone());
            id
        }
    };
    let change = ResourceChange {
        action: ChangeAction::Upsert,
        resource_type: rtype,
        resource_id: id,
        resource: None,
        if_match: None,
        created: false,
    };
    processors::validate_processor::check_resource(&resource, &change.resource_type, &change.resource_id, None)?;
    let text = raw.map_or_else(|| resource.to_string(), str::to_string);
    Ok(entry_event(ResourceChange { resource: Some(text), ..change }, correlation))
}

fn entry_event(change: ResourceChange, correlation: &str) -> ResourceChanged {
    ResourceChanged {
        envelope: Envelope::new(ResourceChanged::EVENT_TYPE, 1, correlation.to_string(), Some("payerx-load".into())),
        mode: WriteMode::BatchEntry,
        changes: vec![change],
    }
}

/// The common NDJSON line, a resource with an id, checked on a tree that borrows from the line
/// and stored as the line itself: no `serde_json::Value` is built (that cost more than the
/// check). `None` for everything else (not JSON, a Bundle, no id), which [`items_of`] handles
/// with the same outcome it always had. `origin` names the line, and is only formatted for a
/// rejection.
fn resource_line(text: &str, origin: &dyn Fn() -> String, correlation: &str) -> Option<Item> {
    use processors::validate::Json;
    let doc = Json::parse(text).ok()?;
    let rtype = doc.str("resourceType").unwrap_or("");
    if rtype == "Bundle" {
        return None;
    }
    let id = doc.str("id")?;
    Some(match processors::validate_processor::check_json(&doc, rtype, id, None) {
        Ok(()) => Item::Event(entry_event(
            ResourceChange {
                action: ChangeAction::Upsert,
                resource_type: rtype.to_string(),
                resource_id: id.to_string(),
                resource: Some(text.trim().to_string()),
                if_match: None,
                created: false,
            },
            correlation,
        )),
        Err(oo) => Item::Rejected(origin(), oo),
    })
}

/// Items of one parsed JSON document: a resource, or the entries of a Bundle.
fn items_of(doc: Value, raw: Option<&str>, origin: &str, correlation: &str) -> Vec<Item> {
    let is_bundle = doc.get("resourceType").and_then(Value::as_str) == Some("Bundle");
    let kind = doc.get("type").and_then(Value::as_str).unwrap_or("").to_string();
    if !is_bundle || !matches!(kind.as_str(), "batch" | "transaction" | "collection" | "searchset") {
        return vec![match upsert(doc, raw, correlation) {
            Ok(e) => Item::Event(e),
            Err(oo) => Item::Rejected(origin.to_string(), oo),
        }];
    }
    let entries = doc.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
    if kind == "transaction" {
        let mut changes = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let Some(resource) = e.get("resource").cloned() else {
                continue;
            };
            match upsert(resource, None, correlation) {
                Ok(ev) => changes.extend(ev.changes),
                Err(oo) => {
                    let at = format!("{origin} entry {i}");
                    return vec![Item::Rejected(at, oo)];
                }
            }
        }
        return vec![Item::Event(ResourceChanged {
            envelope: Envelope::new(
                ResourceChanged::EVENT_TYPE,
                1,
                correlation.to_string(),
                Some("payerx-load".into()),
            ),
            mode: WriteMode::Transaction,
            changes,
        })];
    }
    entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| e.get("resource").cloned().map(|r| (i, r)))
        .map(|(i, r)| match upsert(r, None, correlation) {
            Ok(e) => Item::Event(e),
            Err(oo) => Item::Rejected(format!("{origin} entry {i}"), oo),
        })
        .collect()
}

/// Bytes read from an NDJSON file at a time.
const READ_BYTES: usize = 256 * 1024;
/// A block of NDJSON lines is handed to the workers at `--chunk` lines or at this many bytes,
/// whichever comes first (plus at most one line: a block holds whole lines).
const BLOCK_BYTES: usize = 8 * 1024 * 1024;

/// Input as read, before any parsing (that happens on the workers).
enum Raw {
    /// Whole lines of an NDJSON file, as read: split, but not yet decoded or parsed.
    Lines(Lines),
    /// Input refused before parsing (an NDJSON line over the length limit).
    Refused {
        origin: String,
        why: String,
    },
    Document {
        origin: String,
        doc: Result<Value, String>,
    },
}

/// Consecutive lines of one NDJSON file in one buffer, so the reader neither copies nor
/// allocates per line.
struct Lines {
    file: Arc<str>,
    text: Vec<u8>,
    /// `(start, end, line number)` of each line in `text` that is not blank.
    lines: Vec<(usize, usize, u64)>,
}

/// Reads every file and sends its input in chunks; runs on a blocking thread.
fn read_all(
    files: Vec<PathBuf>,
    chunk: usize,
    max_line: usize,
    tx: tokio::sync::mpsc::Sender<Vec<Raw>>,
    bar: ProgressBar,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let flush = |buf: &mut Vec<Raw>| -> anyhow::Result<()> {
        if !buf.is_empty() {
            tx.blocking_send(std::mem::take(buf)).map_err(|_| anyhow::anyhow!("appender stopped"))?;
        }
        Ok(())
    };
    let mut send = |item: Raw, now: bool| -> anyhow::Result<()> {
        buf.push(item);
        if now || buf.len() >= chunk {
            flush(&mut buf)?;
        }
        Ok(())
    };
    for f in files {
        let name = f.display().to_string();
        let file = std::fs::File::open(&f).with_context(|| format!("opening {name}"))?;
        let ndjson = matches!(f.extension().and_then(|e| e.to_str()), Some("ndjson" | "jsonl"));
        if ndjson {
            read_ndjson(file, name.into(), chunk, max_line, &mut send, &bar)?;
        } else {
            // A Bundle file is one JSON document: parsed whole (bounded by the file).
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let doc = serde_json::from_reader::<_, Value>(BufReader::new(file)).map_err(|e| e.to_string());
            send(Raw::Document { origin: name, doc }, true)?;
            bar.inc(len);
        }
    }
    flush(&mut buf)
}

/// Splits one NDJSON file into blocks of whole lines (`chunk` lines at most, or about
/// `BLOCK_BYTES`). A line longer than `max_line` is refused and skipped without being held, so
/// memory stays bounded whatever the file holds.
fn read_ndjson(
    mut file: impl Read,
    name: Arc<str>,
    chunk: usize,
    max_line: usize,
    send: &mut impl FnMut(Raw, bool) -> anyhow::Result<()>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let block = |file: &Arc<str>, text: Vec<u8>| Lines { file: file.clone(), text, lines: Vec::with_capacity(chunk) };
    // Each block starts at this size, whatever the one before grew to for a long line.
    let capacity = BLOCK_BYTES.min(chunk * 4096) + READ_BYTES;
    let mut cur = block(&name, Vec::with_capacity(capacity));
    // The current line starts at `start` of `cur.text`; newlines are searched for from `scan`.
    let (mut start, mut scan, mut line_no) = (0usize, 0usize, 1u64);
    // Inside a line over the limit, whose bytes are being dropped.
    let mut skipping = false;
    loop {
        while let Some(i) = memchr::memchr(b'\n', &cur.text[scan..]).map(|i| scan + i) {
            if skipping {
                // The end of a line refused below.
            } else if i - start > max_line {
                send(refuse_long(&name, line_no, max_line), false)?;
            } else if !cur.text[start..i].trim_ascii().is_empty() {
                cur.lines.push((start, i, line_no));
            }
            (start, scan, line_no, skipping) = (i + 1, i + 1, line_no + 1, false);
            if cur.lines.len() >= chunk || start >= BLOCK_BYTES {
                // The bytes after the last whole line start the next block.
                let mut next = Vec::with_capacity(capacity.max(cur.text.len() - start));
                next.extend_from_slice(&cur.text[start..]);
                cur.text.truncate(start);
                let full = std::mem::replace(&mut cur, block(&name, next));
                send(Raw::Lines(full), true)?;
                (start, scan) = (0, 0);
            }
        }
        scan = cur.text.len();
        if !skipping && scan - start > max_line {
            send(refuse_long(&name, line_no, max_line), false)?;
            skipping = true;
        }
        if skipping {
            cur.text.truncate(start);
            scan = start;
        }
        let n = (&mut file)
            .take(READ_BYTES as u64)
            .read_to_end(&mut cur.text)
            .with_context(|| format!("reading {name}"))?;
        if n == 0 {
            // The last line may have no end of line.
            if !skipping && !cur.text[start..].trim_ascii().is_empty() {
                cur.lines.push((start, cur.text.len(), line_no));
            }
            if !cur.lines.is_empty() {
                send(Raw::Lines(cur), true)?;
            }
            return Ok(());
        }
        bar.inc(n as u64);
    }
}

fn refuse_long(file: &str, line_no: u64, max_line: usize) -> Raw {
    let why = format!("the line is longer than {max_line} bytes (--max-line-bytes)");
    Raw::Refused { origin: format!("{file}:{line_no}"), why }
}

/// Parses, checks and encodes one chunk: the appendable records and the rejections.
/// The record of a checked write (`upsert` ran `check_resource` on every change), for the change
/// topic, as the HTTP API appends it.
pub fn record(topic: &str, ev: &ResourceChanged) -> Result<Record, schemas::SchemaError> {
    Ok(Record::new(topic.to_string(), ev.key(), schemas::encode_event(ev)?)
        .header(headers::EVENT_TYPE, ResourceChanged::EVENT_TYPE)
        .header(headers::EVENT_ID, ev.envelope.event_id.clone())
        .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone()))
}

fn prepare(chunk: Vec<Raw>, correlation: &str, topic: &str) -> (Vec<Record>, Vec<(String, OperationOutcome)>) {
    let mut records = Vec::with_capacity(chunk.len());
    let mut rejected = Vec::new();
    let not_json = |e: String| OperationOutcome::error(schemas::IssueType::Structure, format!("not valid JSON: {e}"));
    let mut emit = |item: Item| match item {
        Item::Event(ev) => match record(topic, &ev) {
            Ok(r) => records.push(r),
            Err(e) => rejected.push((
                ev.key(),
                OperationOutcome::error(schemas::IssueType::Exception, format!("cannot encode: {e}")),
            )),
        },
        Item::Rejected(origin, oo) => rejected.push((origin, oo)),
    };
    for raw in chunk {
        match raw {
            Raw::Lines(block) => {
                for &(start, end, n) in &block.lines {
                    let origin = || format!("{}:{n}", block.file);
                    let text = match std::str::from_utf8(&block.text[start..end]) {
                        Ok(text) => text,
                        Err(e) => {
                            let why = format!("the line is not valid UTF-8 (at byte {})", e.valid_up_to());
                            emit(Item::Rejected(origin(), OperationOutcome::error(schemas::IssueType::Structure, why)));
                            continue;
                        }
                    };
                    if let Some(item) = resource_line(text, &origin, correlation) {
                        emit(item);
                        continue;
                    }
                    match serde_json::from_str::<Value>(text) {
                        Ok(doc) => {
                            items_of(doc, Some(text.trim()), &origin(), correlation).into_iter().for_each(&mut emit)
                        }
                        Err(e) => emit(Item::Rejected(origin(), not_json(e.to_string()))),
                    }
                }
            }
            Raw::Refused { origin, why } => {
                emit(Item::Rejected(origin, OperationOutcome::error(schemas::IssueType::TooLong, why)));
            }
            Raw::Document { origin, doc: Ok(doc) } => {
                items_of(doc, None, &origin, correlation).into_iter().for_each(&mut emit);
            }
            Raw::Document { origin, doc: Err(e) } => emit(Item::Rejected(origin, not_json(e))),
        }
    }
    (records, rejected)
}

/// Loads `args.path` into `log`. Rejected items are reported on stderr (the first few in full).
///
/// Reading, checking and appending overlap: one thread reads, `--workers` threads parse and
/// validate chunks, and appends are committed in input order (so two versions of a resource in
/// one file keep their order), two in flight. At most `--chunk` × (4 × `--workers` + 4) items are
/// held at once: read and queued, being prepared, prepared and queued, and being appended.
pub async fn load_into(log: Arc<dyn Log>, args: &LoadArgs) -> anyhow::Result<LoadReport> {
    use futures::StreamExt;

    let files = files_under(&args.path)?;
    let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let topic = topics::full(&args.backend.topic_prefix, topics::FHIR_CHANGES);
    let correlation = uuid::Uuid::now_v7().to_string();
    let mut report = LoadReport { files: files.len() as u64, ..Default::default() };
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Raw>>(workers * 2);
    let reader = {
        let bar = bar.clone();
        let (chunk, max_line) = (args.chunk.max(1), args.max_line_bytes.max(1));
        tokio::task::spawn_blocking(move || read_all(files, chunk, max_line, tx, bar))
    };
    // The workers are driven by a task of their own: `buffered` starts the next chunk only when
    // it is polled, so polling it from the loop below (which waits for appends) left one worker
    // idle for the length of every append, and the CPU went to the stages instead.
    let (ptx, mut prx) = tokio::sync::mpsc::channel(workers);
    let preparing = tokio::spawn(async move {
        let mut prepared = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(|chunk| {
                let (corr, topic) = (correlation.clone(), topic.clone());
                tokio::task::spawn_blocking(move || prepare(chunk, &corr, &topic))
            })
            .buffered(workers);
        while let Some(done) = prepared.next().await {
            if ptx.send(done).await.is_err() {
                break; // the append loop stopped on an error, which it reports
            }
        }
    });
    let mut inflight: std::collections::VecDeque<tokio::task::JoinHandle<Result<usize, runtime::LogError>>> =
        Default::default();
    while let Some(done) = prx.recv().await {
        let (records, rejected) = done?;
        for (origin, oo) in rejected {
            report.rejected += 1;
            if report.rejected <= args.show_rejects as u64 {
                bar.suspend(|| eprintln!("rejected {origin}: {}", oo.summary()));
            }
        }
        let log = log.clone();
        inflight.push_back(tokio::spawn(async move {
            let n = records.len();
            log.append(records).await.map(|_| n)
        }));
        if inflight.len() >= 2 {
            if let Some(h) = inflight.pop_front() {
                report.accepted += h.await?? as u64;
            }
        }
        bar.set_message(format!("{} accepted, {} rejected", report.accepted, report.rejected));
    }
    for h in inflight {
        report.accepted += h.await?? as u64;
    }
    preparing.await?;
    reader.await??;
    bar.finish_with_message(format!("{} accepted, {} rejected", report.accepted, report.rejected));
    Ok(report)
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let log = args.backend.open_log().await?;
    let report = load_into(log, &args).await?;
    println!(
        "{}",
        serde_json::json!({"files": report.files, "accepted": report.accepted, "rejected": report.rejected})
    );
    if report.rejected > 0 {
        anyhow::bail!("{} item(s) rejected", report.rejected);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A line as (origin, bytes).
    type Line = (String, Vec<u8>);

    /// What the reader sent: each line, and the origin of each refusal.
    fn read(path: &Path, chunk: usize, max_line: usize) -> (Vec<Raw>, Vec<Line>, Vec<String>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        read_all(vec![path.to_path_buf()], chunk, max_line, tx, ProgressBar::hidden()).unwrap();
        let raws: Vec<Raw> = std::iter::from_fn(|| rx.try_recv().ok()).flatten().collect();
        let (mut lines, mut refused) = (vec![], vec![]);
        for raw in &raws {
            match raw {
                Raw::Lines(b) => {
                    assert!(b.lines.len() <= chunk, "a block holds at most --chunk lines");
                    for &(s, e, n) in &b.lines {
                        lines.push((format!("{}:{n}", b.file), b.text[s..e].to_vec()));
                    }
                }
                Raw::Refused { origin, .. } => refused.push(origin.clone()),
                Raw::Document { .. } => panic!("an NDJSON file gives lines"),
            }
        }
        (raws, lines, refused)
    }

    /// Line endings (LF, CRLF, none at the end), blank lines, lines longer than one read, a line
    /// over the limit (refused, not held), a line that is not UTF-8, line numbers, and the origin
    /// each rejection names; the same whatever the block size.
    #[test]
    fn ndjson_lines_are_read_whole_and_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feed.ndjson");
        let ok = |id: &str, pad: usize| {
            format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"text":"{}"}}]}}"#, "x".repeat(pad))
        };
        let bad = r#"{"resourceType":"Patient","id":"b","birthDate":"1980-99-01"}"#;
        let max_line = 2 * READ_BYTES;
        let long = ok("long", READ_BYTES + 1000);
        let too_long = ok("too-long", max_line + 1);
        let mut text = format!("{}\r\n\n{}\n  \r\n{bad}\r\n{long}\n{too_long}\n", ok("a", 1), ok("c", 1)).into_bytes();
        let not_utf8: &[u8] = b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}";
        text.extend_from_slice(not_utf8);
        text.extend_from_slice(b"\r\n");
        text.extend_from_slice(format!("{too_long}\r\n{}", ok("z", 1)).as_bytes());
        std::fs::write(&path, &text).unwrap();

        let at = |n: usize| format!("{}:{n}", path.display());
        let want: Vec<Line> = [(1, ok("a", 1)), (3, ok("c", 1)), (5, bad.to_string()), (6, long.clone())]
            .into_iter()
            .map(|(n, t)| (at(n), t.into_bytes()))
            .chain([(at(8), not_utf8.to_vec()), (at(10), ok("z", 1).into_bytes())])
            .collect();
        for chunk in [1, 2, 1000] {
            let (raws, lines, refused) = read(&path, chunk, max_line);
            let strip =
                |l: &[Line]| -> Vec<Line> { l.iter().map(|(o, t)| (o.clone(), t.trim_ascii().to_vec())).collect() };
            assert_eq!(strip(&lines), want, "chunk {chunk}");
            assert_eq!(refused, [at(7), at(9)], "chunk {chunk}");

            let (records, rejected) = prepare(raws, "c", "fhir.changes");
            assert_eq!(records.len(), 4, "a, c, long and z");
            let mut origins: Vec<&str> = rejected.iter().map(|(o, _)| o.as_str()).collect();
            origins.sort_by_key(|o| o.rsplit(':').next().and_then(|n| n.parse::<u32>().ok()));
            assert_eq!(origins, [at(5), at(7), at(8), at(9)], "each rejection names its file and line");
            let why: Vec<String> = rejected.iter().map(|(_, oo)| oo.summary()).collect();
            assert!(why.iter().any(|w| w.contains("not valid UTF-8")), "{why:?}");
            assert!(why.iter().filter(|w| w.contains("--max-line-bytes")).count() == 2, "{why:?}");
        }
    }
}
