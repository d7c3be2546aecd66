//! `payerx bench attachments`: CDex `$submit-attachment` under load, beside the raw blob-store
//! write rate of the same bytes (the floor), in one run on one machine.
//!
//! - **small**: `--submissions` documents of `--size-kb` (100 KB by default) from `--concurrency`
//!   clients, each to one of 32 open prior-auth cases: submissions/s, p50/p99 to the 200, and
//!   from the 200 to the LINKED event on the attachments topic (end to end);
//! - **large**: one document of each `--large-mb` size (50 and 250 MB), its body generated while
//!   it is sent (the bench holds no copy): MB/s of attachment bytes and the process's peak RSS;
//! - **floor**: the blob store alone writing the same sizes (hashing included).
//!
//! The request limit is raised to fit the largest document (`--large-mb`), as a payer would
//! for such documents; the default limit is 100 MB.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::Args;
use schemas::{topics, AttachmentEvent, AttachmentEventKind};
use serde_json::json;
use tokio::sync::Mutex;

use crate::bench::{peak_rss_kib, reset_peak_rss, status_kib, Latency};
use crate::bench_auth::{backend_client, finish, fresh_backend};
use crate::config::{BackendArgs, ServeArgs};
use crate::App;

#[derive(Debug, Clone, Args)]
pub struct AttachmentBenchArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Small submissions to send.
    #[arg(long, default_value_t = 2000)]
    pub submissions: usize,
    /// Size of each small document, KB (10^3 bytes).
    #[arg(long, default_value_t = 100)]
    pub size_kb: usize,
    /// Concurrent clients for the small submissions.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Sizes of the large single documents, MB (10^6 bytes of document; the body is 4/3 of it).
    #[arg(long, value_delimiter = ',', default_value = "50,250")]
    pub large_mb: Vec<u64>,
    /// Print one JSON object with every figure on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

const CASES: usize = 32;

/// Pseudo-random bytes, different per `seed`, so the store never dedupes one run's documents.
fn document(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = b"%PDF-1.7\n".to_vec();
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn parameters_around(tracking: &str, member: &str) -> (String, String) {
    let p = json!({"resourceType": "Parameters", "parameter": [
        {"name": "TrackingId", "valueIdentifier": {"value": tracking}},
        {"name": "AttachTo", "valueCode": "preauthorization"},
        {"name": "ProviderId", "valueIdentifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}},
        {"name": "MemberId", "valueIdentifier": {"value": member}},
        {"name": "Attachment", "part": [{"name": "Content", "resource": {"resourceType": "DocumentReference", "status": "current",
            "content": [{"attachment": {"contentType": "application/pdf", "data": "@@DATA@@"}}]}}]},
        {"name": "Final", "valueBoolean": false}
    ]})
    .to_string();
    let (head, tail) = p.split_once("@@DATA@@").unwrap_or((&p, ""));
    (head.to_string(), tail.to_string())
}

/// A body whose base64 is produced while it is sent: memory stays at one chunk.
fn streamed_body(tracking: &str, member: &str, size: u64, seed: u64) -> (reqwest::Body, u64) {
    let (head, tail) = parameters_around(tracking, member);
    const RAW_CHUNK: usize = 48 * 1024; // a multiple of 3: no padding inside
    let chunks = size.div_ceil(RAW_CHUNK as u64);
    let body_len = head.len() as u64 + size.div_ceil(3) * 4 + tail.len() as u64;
    let parts = futures::stream::iter(
        std::iter::once(Ok::<_, std::io::Error>(bytes::Bytes::from(head)))
            .chain((0..chunks).map(move |i| {
                let n = ((size - i * RAW_CHUNK as u64) as usize).min(RAW_CHUNK);
                Ok(bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(document(seed ^ i, n))))
            }))
            .chain(std::iter::once(Ok(bytes::Bytes::from(tail)))),
    );
    (reqwest::Body::wrap_stream(parts), body_len)
}

/// Open cases: Claims with tracking identifiers, fed like a payer's own prior auths.
async fn open_cases(client: &reqwest::Client, base: &str, tag: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut cases = Vec::new();
    for i in 0..CASES {
        let (tracking, member) = (format!("BENCH-{tag}-{i}"), format!("M-{tag}-{i}"));
        let claim = json!({"resourceType": "Claim", "id": format!("bench-{tag}-{i}"), "status": "active",
            "identifier": [{"system": "urn:payer:pa", "value": tracking}],
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
            "use": "preauthorization", "patient": {"reference": format!("Patient/{member}"), "identifier": {"value": member}},
            "created": "2026-11-20", "provider": {"reference": "Organization/prov"}, "priority": {"coding": [{"code": "normal"}]},
            "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/c"}}]});
        let r = client.put(format!("{base}/fhir/Claim/bench-{tag}-{i}")).body(claim.to_string()).send().await?;
        anyhow::ensure!(r.status().is_success(), "opening case {i}: {}", r.status());
        cases.push((tracking, member));
    }
    Ok(cases)
}

/// Records when each submission's LINKED event appears on the attachments topic.
fn watch_links(app: &App, topic: String) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let (log, out, stop) = (app.log.clone(), seen.clone(), app.shutdown.clone());
    tokio::spawn(async move {
        let parts = log.partitions(&topic).await?;
        let mut c = log.assigned_consumer(&(0..parts).map(|p| (topic.clone(), p, 0)).collect::<Vec<_>>()).await?;
        while !stop.is_cancelled() {
            for r in c.poll(1000, Duration::from_millis(50)).await? {
                if let Ok(ev) = schemas::decode_event::<AttachmentEvent>(&r.value) {
                    if ev.kind == AttachmentEventKind::Linked {
                        if let Some(s) = ev.submission_id {
                            out.lock().await.entry(s).or_insert_with(Instant::now);
                        }
                    }
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    seen
}

struct Figures {
    name: String,
    count: usize,
    bytes: u64,
    seconds: f64,
    latency: Option<Latency>,
    linked: Option<Latency>,
    peak_rss_kib: Option<u64>,
}

impl Figures {
    fn row(&self) -> String {
        let ms = |l: &Option<Latency>| {
            l.as_ref().map_or("n/a".to_string(), |l| format!("{:.1}/{:.1} ms", l.p50_ms, l.p99_ms))
        };
        format!(
            "{:<38} {:>6} {:>10.1} {:>9.1} {:>10.1} {:>18} {:>18} {:>12}",
            self.name,
            self.count,
            self.count as f64 / self.seconds.max(1e-9),
            self.bytes as f64 / 1e6 / self.seconds.max(1e-9),
            self.seconds,
            ms(&self.latency),
            ms(&self.linked),
            self.peak_rss_kib.map_or("n/a".into(), |k| format!("{} MiB", k / 1024)),
        )
    }

    fn json(&self) -> serde_json::Value {
        let l = |l: &Option<Latency>| l.as_ref().map(|l| json!({"p50_ms": l.p50_ms, "p99_ms": l.p99_ms}));
        json!({"phase": self.name, "count": self.count, "bytes": self.bytes, "seconds": self.seconds,
               "per_s": self.count as f64 / self.seconds.max(1e-9), "mb_per_s": self.bytes as f64 / 1e6 / self.seconds.max(1e-9),
               "latency_to_200": l(&self.latency), "latency_200_to_linked": l(&self.linked), "rss_growth_kib": self.peak_rss_kib})
    }
}

async fn small(args: &AttachmentBenchArgs, app: &App, client: &reqwest::Client, tag: &str) -> anyhow::Result<Figures> {
    let base = app.base_url();
    let cases = Arc::new(open_cases(client, &base, tag).await?);
    let links = app.links.clone().context("payerx started without its views")?;
    for (tracking, _) in cases.iter() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while links.tracking(tracking).await?.cases.is_empty() {
            anyhow::ensure!(Instant::now() < deadline, "case {tracking} never opened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let linked = watch_links(app, topics::full(&app.topic_prefix, topics::ATTACHMENTS));
    let size = args.size_kb * 1000;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    eprintln!(
        "bench: attachments: {} submissions of {} KB from {} clients",
        args.submissions, args.size_kb, args.concurrency
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, base, cases, next, n) =
            (client.clone(), base.clone(), cases.clone(), next.clone(), args.submissions);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (tracking, member) = &cases[i % CASES];
                let (head, tail) = parameters_around(tracking, member);
                let body = format!(
                    "{head}{}{tail}",
                    base64::engine::general_purpose::STANDARD.encode(document(i as u64 + 1, size))
                );
                let t = Instant::now();
                let r = client.post(format!("{base}/fhir/$submit-attachment")).body(body).send().await?;
                let status = r.status();
                let submission =
                    r.headers().get("x-payerx-submission").and_then(|v| v.to_str().ok()).map(str::to_string);
                let text = r.text().await?;
                let done = Instant::now();
                if status != 200 {
                    bail!("$submit-attachment answered {status}: {text:.300}");
                }
                out.push((done - t, done, submission.context("no x-payerx-submission header")?));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let seen = linked.lock().await;
        if answered.iter().all(|(_, _, s)| seen.contains_key(s)) {
            break;
        }
        drop(seen);
        anyhow::ensure!(Instant::now() < deadline, "not every submission was linked within 300 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = linked.lock().await;
    let to_linked =
        answered.iter().filter_map(|(_, at, s)| seen.get(s).map(|l| l.saturating_duration_since(*at))).collect();
    Ok(Figures {
        name: format!("submit {} KB (concurrency {})", args.size_kb, args.concurrency),
        count: answered.len(),
        bytes: (answered.len() * size) as u64,
        seconds,
        latency: Latency::from("request", answered.iter().map(|(l, _, _)| *l).collect()),
        linked: Latency::from("200 to LINKED", to_linked),
        peak_rss_kib: None,
    })
}

async fn large(app: &App, client: &reqwest::Client, tag: &str, mb: u64) -> anyhow::Result<Figures> {
    let base = app.base_url();
    let size = mb * 1_000_000;
    let (body, len) = streamed_body(&format!("BENCH-{tag}-0"), &format!("M-{tag}-0"), size, mb ^ 0xABCD);
    let rss_base = status_kib("VmRSS:");
    reset_peak_rss();
    eprintln!("bench: attachments: one {mb} MB document ({:.0} MB body)", len as f64 / 1e6);
    let t = Instant::now();
    let r = client
        .post(format!("{base}/fhir/$submit-attachment"))
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(body)
        .send()
        .await?;
    let status = r.status();
    let text = r.text().await?;
    let elapsed = t.elapsed();
    if status != 200 {
        bail!("{mb} MB document: {status}: {text:.300}");
    }
    Ok(Figures {
        name: format!("submit one {mb} MB document"),
        count: 1,
        bytes: size,
        seconds: elapsed.as_secs_f64(),
        latency: None,
        linked: None,
        peak_rss_kib: growth(rss_base),
    })
}

/// The blob store alone writing `count` blobs of `size`, from `concurrency` threads (as many
/// as the clients of the phase it is the floor of).
async fn floor(app: &App, name: String, count: usize, size: u64, concurrency: usize) -> anyhow::Result<Figures> {
    let store = app.blobs.clone().context("payerx started without its blob store")?;
    let base = status_kib("VmRSS:");
    reset_peak_rss();
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.clamp(1, count.max(1)))
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::task::spawn_blocking(move || {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    blobs::bench::write_rate(&store, size)?;
                }
                Ok::<_, blobs::BlobError>(())
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    Ok(Figures {
        name,
        count,
        bytes: count as u64 * size,
        seconds: t.elapsed().as_secs_f64(),
        latency: None,
        linked: None,
        peak_rss_kib: growth(base),
    })
}

/// How far the peak rose above `base` (VmRSS at the phase's start): what the phase itself held.
fn growth(base: Option<u64>) -> Option<u64> {
    Some(peak_rss_kib()?.saturating_sub(base?))
}

pub async fn run(args: AttachmentBenchArgs) -> anyhow::Result<()> {
    let (backend, dir) = fresh_backend(&args.backend);
    let mut serve = ServeArgs::new(backend.clone());
    let largest = args.large_mb.iter().copied().max().unwrap_or(0) * 1_000_000;
    serve.max_attachment_request_bytes = serve.max_attachment_request_bytes.max(largest / 3 * 4 + 1_000_000);
    let app = App::start(serve).await?;
    let result = async {
        let base = app.base_url();
        let client = backend_client(&base, &backend, args.concurrency, Duration::from_secs(900)).await?;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let mut rows = vec![small(&args, &app, &client, &tag).await?];
        rows.push(
            floor(
                &app,
                format!("floor: blob store, {} × {} KB", args.submissions, args.size_kb),
                args.submissions,
                args.size_kb as u64 * 1000,
                args.concurrency,
            )
            .await?,
        );
        for &mb in &args.large_mb {
            rows.push(large(&app, &client, &tag, mb).await?);
            rows.push(floor(&app, format!("floor: blob store, one {mb} MB"), 1, mb * 1_000_000, 1).await?);
        }
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    let rows = finish(app, dir, result).await?;
    let mut out = format!(
        "\npayerx bench attachments: {}, {} CPUs\n{:<38} {:>6} {:>10} {:>9} {:>10} {:>18} {:>18} {:>9}\n",
        crate::bench::backends_label(&backend),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        "phase",
        "count",
        "per s",
        "MB/s",
        "seconds",
        "p50/p99 to 200",
        "p50/p99 to LINKED",
        "RSS growth"
    );
    for r in &rows {
        out.push_str(&r.row());
        out.push('\n');
    }
    let ratio = |a: &Figures, b: &Figures| (a.bytes as f64 / a.seconds) / (b.bytes as f64 / b.seconds).max(1e-9);
    let mut ratios = Vec::new();
    for pair in rows.chunks(2) {
        if let [measured, floor] = pair {
            ratios.push((measured.name.clone(), ratio(measured, floor)));
            out.push_str(&format!("ratio to the floor (MB/s): {} {:.2}\n", measured.name, ratio(measured, floor)));
        }
    }
    out.push_str(
        "notes: RSS growth = the process's peak (VmHWM, server and bench in one process) above its RSS when the phase began; \
         the large bodies are generated while sent, so the bench holds no copy; MB = 10^6 bytes of document.\n",
    );
    crate::bench::print_report(
        args.json,
        &out,
        json!({"bench": "attachments", "phases": rows.iter().map(Figures::json).collect::<Vec<_>>(),
               "ratios_to_floor": ratios.into_iter().map(|(n, r)| json!({"phase": n, "ratio": r})).collect::<Vec<_>>()}),
    );
    Ok(())
}
