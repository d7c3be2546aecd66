//! `payerx load PATH`: feeds NDJSON files, Bundle JSON files, or a folder of them into the log
//! through the same checks and events as the HTTP API, with a progress bar and a final count.
//! NDJSON is streamed line by line, so memory does not grow with the file.

use std::io::{BufRead, BufReader};
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
    /// Print at most this many rejected lines in full.
    #[arg(long, default_value_t = 20)]
    pub show_rejects: usize,
    /// No progress bar (for scripts).
    #[arg(long)]
    pub quiet: bool,
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
/// with the same outcome it always had.
fn resource_line(text: &mut String, origin: &str, correlation: &str) -> Option<Item> {
    use processors::validate::Json;
    let doc = Json::parse(text).ok()?;
    let rtype = doc.str("resourceType").unwrap_or("");
    if rtype == "Bundle" {
        return None;
    }
    let id = doc.str("id")?;
    let checked = processors::validate_processor::check_json(&doc, rtype, id, None);
    let (rtype, id) = (rtype.to_string(), id.to_string());
    drop(doc);
    Some(match checked {
        Ok(()) => Item::Event(entry_event(
            ResourceChange {
                action: ChangeAction::Upsert,
                resource_type: rtype,
                resource_id: id,
                // The line itself (no copy); `lines()` already took its end of line.
                resource: Some(take_trimmed(text)),
                if_match: None,
                created: false,
            },
            correlation,
        )),
        Err(oo) => Item::Rejected(origin.to_string(), oo),
    })
}

/// The string, without surrounding whitespace, reusing its buffer when there is none.
fn take_trimmed(text: &mut String) -> String {
    let trimmed = text.trim();
    if trimmed.len() == text.len() {
        std::mem::take(text)
    } else {
        trimmed.to_string()
    }
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

/// Input as read, before any parsing of NDJSON lines (that happens on the workers).
enum Raw {
    Line { origin: String, text: String },
    Document { origin: String, doc: Result<Value, String> },
}

/// Reads every file and sends its input in chunks; runs on a blocking thread.
fn read_all(
    files: Vec<PathBuf>,
    chunk: usize,
    tx: tokio::sync::mpsc::Sender<Vec<Raw>>,
    bar: ProgressBar,
) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(chunk);
    let send = |buf: &mut Vec<Raw>| -> anyhow::Result<()> {
        if !buf.is_empty() {
            tx.blocking_send(std::mem::take(buf)).map_err(|_| anyhow::anyhow!("appender stopped"))?;
        }
        Ok(())
    };
    for f in files {
        let name = f.display().to_string();
        let file = std::fs::File::open(&f).with_context(|| format!("opening {name}"))?;
        let ndjson = matches!(f.extension().and_then(|e| e.to_str()), Some("ndjson" | "jsonl"));
        if ndjson {
            for (n, line) in BufReader::with_capacity(1 << 20, file).lines().enumerate() {
                let line = line.with_context(|| format!("reading {name}"))?;
                bar.inc(line.len() as u64 + 1);
                if line.trim().is_empty() {
                    continue;
                }
                buf.push(Raw::Line { origin: format!("{name}:{}", n + 1), text: line });
                if buf.len() >= chunk {
                    send(&mut buf)?;
                }
            }
        } else {
            // A Bundle file is one JSON document: parsed whole (bounded by the file).
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let doc = serde_json::from_reader::<_, Value>(BufReader::new(file)).map_err(|e| e.to_string());
            buf.push(Raw::Document { origin: name, doc });
            bar.inc(len);
            send(&mut buf)?;
        }
    }
    send(&mut buf)
}

/// Parses, checks and encodes one chunk: the appendable records and the rejections.
/// The submissions record of a checked write (`upsert` ran `check_resource` on every change, so
/// the record carries `headers::VALIDATED`).
pub fn record(topic: &str, ev: &ResourceChanged) -> Result<Record, schemas::SchemaError> {
    Ok(Record::new(topic.to_string(), ev.key(), schemas::encode_event(ev)?)
        .header(headers::EVENT_TYPE, ResourceChanged::EVENT_TYPE)
        .header(headers::EVENT_ID, ev.envelope.event_id.clone())
        .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone())
        .header(headers::VALIDATED, processors::validate_processor::RULES))
}

fn prepare(chunk: Vec<Raw>, correlation: &str, topic: &str) -> (Vec<Record>, Vec<(String, OperationOutcome)>) {
    let mut records = Vec::with_capacity(chunk.len());
    let mut rejected = Vec::new();
    let not_json = |e: String| OperationOutcome::error(schemas::IssueType::Structure, format!("not valid JSON: {e}"));
    for raw in chunk {
        let items = match raw {
            Raw::Line { origin, mut text } => match resource_line(&mut text, &origin, correlation) {
                Some(item) => vec![item],
                None => match serde_json::from_str::<Value>(&text) {
                    Ok(doc) => items_of(doc, Some(text.trim()), &origin, correlation),
                    Err(e) => vec![Item::Rejected(origin, not_json(e.to_string()))],
                },
            },
            Raw::Document { origin, doc: Ok(doc) } => items_of(doc, None, &origin, correlation),
            Raw::Document { origin, doc: Err(e) } => vec![Item::Rejected(origin, not_json(e))],
        };
        for item in items {
            match item {
                Item::Event(ev) => match record(topic, &ev) {
                    Ok(r) => records.push(r),
                    Err(e) => rejected.push((
                        ev.key(),
                        OperationOutcome::error(schemas::IssueType::Exception, format!("cannot encode: {e}")),
                    )),
                },
                Item::Rejected(origin, oo) => rejected.push((origin, oo)),
            }
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
    let topic = topics::full(&args.backend.topic_prefix, topics::FHIR_SUBMISSIONS);
    let correlation = uuid::Uuid::now_v7().to_string();
    let mut report = LoadReport { files: files.len() as u64, ..Default::default() };
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Raw>>(workers * 2);
    let reader = {
        let bar = bar.clone();
        let chunk = args.chunk.max(1);
        tokio::task::spawn_blocking(move || read_all(files, chunk, tx, bar))
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

    /// Line endings (LF, CRLF, none at the end), blank lines, a line longer than the reader's
    /// first guess, line numbers, and the origin a rejection names.
    #[test]
    fn ndjson_lines_are_read_whole_and_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feed.ndjson");
        let ok = |id: &str| format!(r#"{{"resourceType":"Patient","id":"{id}","gender":"female"}}"#);
        let bad = r#"{"resourceType":"Patient","id":"b","birthDate":"1980-99-01"}"#;
        let long = format!(r#"{{"resourceType":"Patient","id":"long","name":[{{"text":"{}"}}]}}"#, "x".repeat(9000));
        let text = format!("{}\r\n\n{}\n  \r\n{bad}\r\n{long}\n{}", ok("a"), ok("c"), ok("z"));
        std::fs::write(&path, text).unwrap();

        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        read_all(vec![path.clone()], 1000, tx, ProgressBar::hidden()).unwrap();
        let lines: Vec<(String, String)> = std::iter::from_fn(|| rx.try_recv().ok())
            .flatten()
            .map(|raw| match raw {
                Raw::Line { origin, text } => (origin, text),
                Raw::Document { .. } => panic!("an NDJSON file gives lines"),
            })
            .collect();
        let at = |n: usize| format!("{}:{n}", path.display());
        let want =
            [(at(1), ok("a")), (at(3), ok("c")), (at(5), bad.to_string()), (at(6), long.clone()), (at(7), ok("z"))];
        assert_eq!(lines, want);

        let raws = lines.into_iter().map(|(origin, text)| Raw::Line { origin, text }).collect();
        let (records, rejected) = prepare(raws, "c", "fhir.submissions");
        assert_eq!(records.len(), 4);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, at(5), "a rejection names its file and line");
    }
}
