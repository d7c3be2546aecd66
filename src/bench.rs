//! `payerx bench`: throughput and latency figures, always beside a floor measured in the same
//! run on the same machine.
//!
//! `bench ingest` runs three phases, each on fresh state (a new temp folder on the embedded
//! tier; new topic prefixes and resource ids on Kafka, with the same database):
//!
//! - **floor**: the same payloads, already encoded as the `ResourceChanged` events `payerx load`
//!   makes, appended to the log alone (chunks of 1000, two in flight, like load);
//! - **load**: `payerx load` of an NDJSON file into a running payerx (processors and
//!   projections), timed to acknowledgement (every append durable) and to visibility (every
//!   resource readable from the view);
//! - **http**: `PUT /fhir/{type}/{id}` from concurrent clients; payerx answers a write once it
//!   is visible in the view, so one request's latency is its latency to visibility.
//!
//! Floor and load run in `--rounds` pairs, back to back (the floor first, while the payerx that
//! load feeds is already up and idle), and the report takes the round with the median ratio: a
//! shared machine's speed moves within minutes, and a floor lasts about a second. http (and
//! `--stages`) run once, after the first round. `--stages` adds each stage alone and the CPU
//! cost per resource of each step, to show where the time goes. Rates are reported as ratios to
//! the floor of the same round.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use projections::resources::{ResourceProjection, NAME as RESOURCES};
use projections::worker::{active_generation, load_offsets};
use projections::ResourceStore;
use runtime::Record;
use schemas::topics;
use schemas::{ChangeAction, Envelope, ResourceChange, ResourceChanged, WriteMode};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{BackendArgs, Role, ServeArgs};
use crate::load::LoadArgs;
use crate::{synth, App};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The payer feed: HTTP API and `payerx load` against the raw log append rate.
    Ingest(IngestBenchArgs),
    /// What authorization costs: authorized reads against the same with --insecure-no-auth.
    Auth(crate::bench_auth::AuthBenchArgs),
    /// CDex attachments: submissions/s, large bodies, time to "linked", beside the blob store.
    Attachments(crate::bench_attachments::AttachmentBenchArgs),
    /// Da Vinci $member-match over the log beside the matcher in-process, and the bulk path.
    MemberMatch(crate::bench_member_match::MemberMatchBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct IngestBenchArgs {
    /// Backend to measure: embedded by default, Kafka + Postgres with `--kafka-brokers` and
    /// `--database-url`. Every phase gets fresh state of its own (temp folders, new topic
    /// prefixes), so `--data-dir` and `--topic-prefix` are not used.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Resources per phase (floor and load).
    #[arg(long, default_value_t = 20_000)]
    pub resources: usize,
    /// Resources written through the HTTP API (one request each, so fewer by default).
    #[arg(long, default_value_t = 5_000)]
    pub http_resources: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seed of the synthetic resources.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rounds of (floor, load), each pair back to back on fresh state; the ratio reported is
    /// the median round's, since a shared machine's speed moves within minutes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=99))]
    pub rounds: u16,
    /// Nice value of the stages in the payerx being measured (as `payerx serve --stages-nice`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub stages_nice: i32,
    /// How long to wait for the view to show every resource before failing, in seconds.
    #[arg(long, default_value_t = 600)]
    pub visible_timeout_secs: u64,
    /// Print one JSON object with every figure on stdout at the end (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also run each stage alone (load with no roles running, the validate processor alone,
    /// the projection alone) and time each step's CPU cost per resource: where the time goes.
    #[arg(long)]
    pub stages: bool,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ingest(args) => ingest(args).await,
        BenchCommand::Auth(args) => crate::bench_auth::run(args).await,
        BenchCommand::Attachments(args) => crate::bench_attachments::run(args).await,
        BenchCommand::MemberMatch(args) => crate::bench_member_match::run(args).await,
    }
}

/// Appends per chunk, as `payerx load` does.
const CHUNK: usize = 1000;
/// How often the cheap visibility check (the projection's stored offsets) runs.
const VISIBLE_POLL: Duration = Duration::from_millis(10);

/// `embedded log + SQLite views`, `Kafka log + PostgreSQL views`, … for a report's title.
pub(crate) fn backends_label(backend: &BackendArgs) -> String {
    format!(
        "{} log + {} views",
        if backend.kafka_brokers.is_some() { "Kafka" } else { "embedded" },
        if backend.database_url.as_deref().is_some_and(|u| u.starts_with("postgres")) {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    )
}

/// Prints a bench's table, or with `--json` the table on stderr and `figures` on stdout.
pub(crate) fn print_report(json: bool, table: &str, figures: serde_json::Value) {
    if json {
        eprint!("{table}");
        println!("{figures}");
    } else {
        print!("{table}");
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    /// What one sample is.
    of: &'static str,
    samples: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    pub(crate) fn from(of: &'static str, mut samples: Vec<Duration>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1e3
        };
        Some(Latency {
            of,
            samples: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
struct Phase {
    name: &'static str,
    resources: u64,
    /// Compact JSON bytes of the resources (the same measure in every phase).
    payload_bytes: u64,
    seconds: f64,
    resources_per_s: f64,
    mb_per_s: f64,
    latency: Option<Latency>,
    /// VmHWM in KiB: the process-wide peak during this phase (reset at its start when the
    /// kernel allows; cumulative otherwise).
    peak_rss_kib: Option<u64>,
    /// Resident anonymous memory (heap) and file-backed memory (SQLite's mmap of its files)
    /// when the phase ended, KiB: what of the peak is the process's own.
    rss_anon_kib_at_end: Option<u64>,
    rss_file_kib_at_end: Option<u64>,
}

impl Phase {
    fn new(
        name: &'static str,
        resources: u64,
        payload_bytes: u64,
        elapsed: Duration,
        latency: Option<Latency>,
        peak_rss_kib: Option<u64>,
    ) -> Phase {
        let s = elapsed.as_secs_f64().max(1e-9);
        Phase {
            name,
            resources,
            payload_bytes,
            seconds: s,
            resources_per_s: resources as f64 / s,
            mb_per_s: payload_bytes as f64 / s / 1e6,
            latency,
            peak_rss_kib,
            rss_anon_kib_at_end: status_kib("RssAnon:"),
            rss_file_kib_at_end: status_kib("RssFile:"),
        }
    }
}

/// One floor and the load measured right after it.
#[derive(Debug, Clone, Serialize)]
struct Round {
    floor: Phase,
    load_ack: Phase,
    load_vis: Phase,
    /// Where this process's CPU went while load ran (until acknowledged); Linux only.
    load_cpu: Option<CpuSplit>,
}

impl Round {
    fn ratio(&self, p: &Phase) -> f64 {
        p.resources_per_s / self.floor.resources_per_s.max(1e-9)
    }

    /// The round whose acknowledged-load ratio is the median (the upper one of an even count).
    fn median(rounds: &[Round]) -> Option<&Round> {
        let mut by_ratio: Vec<&Round> = rounds.iter().collect();
        by_ratio.sort_by(|a, b| a.ratio(&a.load_ack).total_cmp(&b.ratio(&b.load_ack)));
        by_ratio.get(by_ratio.len() / 2).copied()
    }
}

/// A temp folder for one phase, removed when dropped (also on errors).
struct Scratch(PathBuf);

impl Scratch {
    fn new(run: &str, phase: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("payerx-bench-{run}-{phase}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("bench: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A `kB` field of /proc/self/status.
pub(crate) fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set (VmHWM) of this process, KiB.
pub(crate) fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0), so each phase reports its own peak.
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time used by this process's threads while a phase ran, by role (from the threads' names),
/// to show what competes with `payerx load` when the stages run beside it.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct CpuSplit {
    cpu_seconds: f64,
    /// CPU seconds per wall second: how many CPUs were busy on average.
    cpus_busy: f64,
    /// (role, share of `cpu_seconds`), largest first.
    shares: Vec<(&'static str, f64)>,
}

/// The role a thread plays, by the name payerx, tokio, sqlx or librdkafka gave it.
fn thread_role(name: &str) -> &'static str {
    if name.starts_with("payerx-stages") {
        "stages"
    } else if name.starts_with("sqlx-sqlite") {
        "views database"
    } else if name.starts_with("payerx-log-writ") {
        "log writer"
    } else if name.starts_with("payerx-log-chec") {
        "log checkpoints"
    } else if name.starts_with("rdk:") || name.starts_with("rdkafka") {
        "kafka client"
    } else {
        "load (read, parse, validate, encode)"
    }
}

/// Thread name and CPU clock ticks (user + system) from one `/proc/self/task/*/stat` line. The
/// name sits in parentheses and may hold spaces or parentheses itself, so fields are counted
/// from the last `)`.
fn parse_task_stat(stat: &str) -> Option<(String, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

/// Every thread of this process: id → (name, CPU ticks). Empty where /proc is missing.
fn thread_ticks() -> std::collections::HashMap<String, (String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Default::default();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), parse_task_stat(&stat)?))
        })
        .collect()
}

/// The CPU used between two [`thread_ticks`] snapshots over `wall`. Threads that ended in between
/// are not counted (the stages' and load's threads live through the phase).
fn cpu_split(
    before: &std::collections::HashMap<String, (String, u64)>,
    after: &std::collections::HashMap<String, (String, u64)>,
    ticks_per_second: f64,
    wall: Duration,
) -> Option<CpuSplit> {
    let mut by_role: Vec<(&'static str, u64)> = Vec::new();
    for (tid, (name, ticks)) in after {
        let used = ticks.saturating_sub(before.get(tid).map_or(0, |(_, t)| *t));
        let role = thread_role(name);
        match by_role.iter_mut().find(|(r, _)| *r == role) {
            Some((_, t)) => *t += used,
            None => by_role.push((role, used)),
        }
    }
    let total: u64 = by_role.iter().map(|(_, t)| t).sum();
    if total == 0 {
        return None;
    }
    by_role.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let cpu_seconds = total as f64 / ticks_per_second;
    Some(CpuSplit {
        cpu_seconds,
        cpus_busy: cpu_seconds / wall.as_secs_f64().max(1e-9),
        shares: by_role.into_iter().filter(|(_, t)| *t > 0).map(|(r, t)| (r, t as f64 / total as f64)).collect(),
    })
}

/// /proc reports thread CPU time in USER_HZ ticks, 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shares: Vec<String> = self.shares.iter().map(|(r, s)| format!("{r} {:.0}%", s * 100.0)).collect();
        write!(f, "{} (of {:.1} CPU-seconds, {:.2} CPUs busy)", shares.join(", "), self.cpu_seconds, self.cpus_busy)
    }
}

struct Run {
    args: IngestBenchArgs,
    /// Short random id: temp folders, topic prefixes and resource ids of this run.
    id: String,
    kafka: bool,
    rss_per_phase: bool,
}

impl Run {
    /// The backend of one phase: its own folder, and on Kafka its own topics (and consumer
    /// groups, which take the same prefix).
    fn backend(&self, dir: &Path, phase: &str) -> BackendArgs {
        let mut b = self.args.backend.clone();
        b.data_dir = dir.join("data");
        if self.kafka {
            b.topic_prefix = format!("bench-{}-{phase}.", self.id);
        }
        b
    }

    /// Resource ids unique to this run and phase, so phases sharing a database never collide.
    fn id_prefix(&self, phase: &str) -> String {
        format!("b{}{phase}-", self.id)
    }

    fn reset_rss(&self) {
        if self.rss_per_phase {
            reset_peak_rss();
        }
    }
}

/// The `ResourceChanged` record `payerx load` appends for one resource (same mode, client,
/// key and headers), so the floor appends byte-for-byte comparable records.
fn load_record(topic: &str, correlation: &str, rtype: &str, id: &str, text: String) -> anyhow::Result<Record> {
    let ev = ResourceChanged {
        envelope: Envelope::new(ResourceChanged::EVENT_TYPE, 1, correlation.to_string(), Some("payerx-load".into())),
        mode: WriteMode::BatchEntry,
        changes: vec![ResourceChange {
            action: ChangeAction::Upsert,
            resource_type: rtype.to_string(),
            resource_id: id.to_string(),
            resource: Some(text),
            if_match: None,
            created: false,
        }],
    };
    Ok(crate::load::record(topic, &ev)?)
}

/// `run.args.resources` synthetic resources as load's records for `topic`, in chunks of 1000,
/// and their payload bytes.
async fn encoded_chunks(run: &Run, phase: &str, topic: String) -> anyhow::Result<(Vec<Vec<Record>>, u64)> {
    let (n, seed, prefix) = (run.args.resources, run.args.seed, run.id_prefix(phase));
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let correlation = uuid::Uuid::now_v7().to_string();
        let mut bytes = 0u64;
        let mut chunks: Vec<Vec<Record>> = Vec::with_capacity(n.div_ceil(CHUNK));
        for r in synth::resources(n, seed, &prefix) {
            let text = r.to_string();
            bytes += text.len() as u64;
            if chunks.last().is_none_or(|c| c.len() >= CHUNK) {
                chunks.push(Vec::with_capacity(CHUNK));
            }
            if let Some(c) = chunks.last_mut() {
                let (rtype, id) = (r["resourceType"].as_str(), r["id"].as_str());
                c.push(load_record(&topic, &correlation, rtype.unwrap_or_default(), id.unwrap_or_default(), text)?);
            }
        }
        Ok((chunks, bytes))
    })
    .await?
}

/// Appends every chunk with two appends in flight (one committing while the next waits), as
/// `payerx load` does; returns each append's latency.
async fn append_all(log: &Arc<dyn runtime::Log>, chunks: Vec<Vec<Record>>) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(chunks.len());
    let mut inflight: VecDeque<tokio::task::JoinHandle<Result<Duration, runtime::LogError>>> = VecDeque::new();
    for chunk in chunks {
        let log = log.clone();
        inflight.push_back(tokio::spawn(async move {
            let t = Instant::now();
            log.append(chunk).await.map(|_| t.elapsed())
        }));
        if inflight.len() >= 2 {
            if let Some(h) = inflight.pop_front() {
                latencies.push(h.await??);
            }
        }
    }
    for h in inflight {
        latencies.push(h.await??);
    }
    Ok(latencies)
}

/// A floor ready to run: its own log, and the records encoded up front (the floor is the
/// log's own rate, not the generator's).
struct FloorInput {
    _scratch: Scratch,
    log: Arc<dyn runtime::Log>,
    chunks: Vec<Vec<Record>>,
    bytes: u64,
}

async fn floor_input(run: &Run, round: usize) -> anyhow::Result<FloorInput> {
    let phase = format!("floor{round}");
    let scratch = Scratch::new(&run.id, &phase)?;
    let backend = run.backend(&scratch.0, &phase);
    let log = backend.open_log().await?;
    // The topic `payerx load` appends to.
    let topic = topics::full(&backend.topic_prefix, topics::FHIR_CHANGES);
    let (chunks, bytes) = encoded_chunks(run, &phase, topic).await?;
    Ok(FloorInput { _scratch: scratch, log, chunks, bytes })
}

async fn floor(run: &Run, input: FloorInput) -> anyhow::Result<Phase> {
    let n = run.args.resources;
    let FloorInput { _scratch: scratch, log, chunks, bytes } = input;
    eprintln!("bench: floor: appending {n} records to the {} log", log.backend());
    run.reset_rss();
    let start = Instant::now();
    let latencies = append_all(&log, chunks).await?;
    let elapsed = start.elapsed();
    let rss = peak_rss_kib();
    drop(log);
    if !run.kafka {
        wait_closed(&scratch.0.join("data").join("log.sqlite-wal")).await;
    }
    Ok(Phase::new(
        "floor (log append)",
        n as u64,
        bytes,
        elapsed,
        Latency::from("append of 1000 records", latencies),
        rss,
    ))
}

/// Waits until a closed embedded log's last connection has checkpointed and removed its WAL, so
/// the checkpoint of what the floor appended does not run during the load measured next.
async fn wait_closed(wal: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while wal.exists() {
        if Instant::now() >= deadline {
            eprintln!("bench: {} still exists a minute after its log closed", wal.display());
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops the app after a phase; the phase's own error, if any, is the one reported.
async fn finish<T>(app: App, result: anyhow::Result<T>) -> anyhow::Result<T> {
    let stopped = app.stop().await;
    let value = result?;
    stopped.context("stopping payerx after the phase")?;
    Ok(value)
}

/// Visible resources of the three synthetic types in the view.
async fn visible(store: &ResourceStore) -> anyhow::Result<i64> {
    let mut sum = 0;
    for t in ["Patient", "Coverage", "ExplanationOfBenefit"] {
        sum += store.count(t).await?;
    }
    Ok(sum)
}

/// Waits until the view shows `target` resources. The cheap check (events the projection has
/// applied from this phase's change topic, stored with its rows) runs often; the exact count
/// confirms it, so polling does not steal much CPU from the pipeline being measured.
async fn wait_visible(
    store: &ResourceStore,
    changes_topic: &str,
    prefix: &str,
    events: u64,
    target: i64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let projection = ResourceProjection::new(prefix);
    let mut last_report = Instant::now();
    loop {
        let generation = active_generation(store.db(), &projection).await?;
        let applied: i64 = load_offsets(store.db(), RESOURCES, generation)
            .await?
            .iter()
            .filter(|((t, _), _)| t == changes_topic)
            .map(|(_, o)| *o)
            .sum();
        if applied >= events as i64 && visible(store).await? >= target {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            bail!(
                "the view shows {} of {target} resources after {timeout:?} ({applied} change events applied)",
                visible(store).await?
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("bench:   … {applied} of {events} change events applied to the view");
            last_report = Instant::now();
        }
        tokio::time::sleep(VISIBLE_POLL).await;
    }
}

/// One round: the floor, then `payerx load` right after it, into a payerx already running
/// (idle during the floor) so nothing but the NDJSON reader's start separates the two.
async fn round(run: &Run, round: usize) -> anyhow::Result<Round> {
    let n = run.args.resources;
    let phase = format!("load{round}");
    let scratch = Scratch::new(&run.id, &phase)?;
    let backend = run.backend(&scratch.0, &phase);
    let path = scratch.0.join("resources.ndjson");
    let bytes = {
        let (path, seed, prefix) = (path.clone(), run.args.seed, run.id_prefix(&phase));
        tokio::task::spawn_blocking(move || synth::write_ndjson(&path, n, seed, &prefix))
            .await?
            .context("writing the NDJSON input")?
    };
    let floor_input = floor_input(run, round).await.context("encoding the floor's records")?;
    let mut serve = ServeArgs::new(backend.clone());
    serve.roles = vec![Role::Processors, Role::Projections];
    serve.stages_nice = run.args.stages_nice;
    let app = App::start(serve).await?;
    let result = async {
        let store = app.store.clone().context("payerx started without its views")?;
        let before = visible(&store).await?;
        let floor = floor(run, floor_input).await.context("floor phase")?;
        let load_args = LoadArgs { chunk: CHUNK, ..LoadArgs::new(backend.clone(), path.clone()) };
        eprintln!("bench: load: {n} resources ({:.1} MB of NDJSON) through payerx load", bytes as f64 / 1e6);
        run.reset_rss();
        let ticks = thread_ticks();
        let start = Instant::now();
        // The app's own log handle: one writer per embedded log file, as in one process.
        let report = crate::load::load_into(app.log.clone(), &load_args).await?;
        let acked = start.elapsed();
        let load_cpu = cpu_split(&ticks, &thread_ticks(), TICKS_PER_SECOND, acked);
        if report.rejected > 0 || report.accepted != n as u64 {
            bail!("payerx load accepted {} and rejected {} of {n}", report.accepted, report.rejected);
        }
        let rss_ack = peak_rss_kib();
        eprintln!("bench: load: acknowledged in {:.2} s; waiting for the view", acked.as_secs_f64());
        let changes = topics::full(&backend.topic_prefix, topics::FHIR_CHANGES);
        let done = wait_visible(
            &store,
            &changes,
            &backend.topic_prefix,
            n as u64,
            before + n as i64,
            Duration::from_secs(run.args.visible_timeout_secs),
        )
        .await?;
        let rss = peak_rss_kib();
        Ok(Round {
            floor,
            load_ack: Phase::new("load (acknowledged)", n as u64, bytes, acked, None, rss_ack),
            load_vis: Phase::new("load (visible)", n as u64, bytes, done - start, None, rss),
            load_cpu,
        })
    }
    .await;
    finish(app, result).await
}

async fn http(run: &Run) -> anyhow::Result<Phase> {
    let n = run.args.http_resources;
    let concurrency = run.args.concurrency.max(1);
    let scratch = Scratch::new(&run.id, "http")?;
    let backend = run.backend(&scratch.0, "http");
    let mut serve = ServeArgs::new(backend.clone());
    // Long enough that no write answers 202 (still pending): every response means visible.
    serve.write_wait_ms = 120_000;
    serve.stages_nice = run.args.stages_nice;
    let serve_backend = serve.backend.clone();
    let app = App::start(serve).await?;
    let result = async {
        let store = app.store.clone().context("payerx started without its views")?;
        let base = app.base_url();
        let (seed, prefix) = (run.args.seed, run.id_prefix("http"));
        let items: Vec<(String, String)> = synth::resources(n, seed, &prefix)
            .map(|r| {
                let url = format!(
                    "{base}/fhir/{}/{}",
                    r["resourceType"].as_str().unwrap_or_default(),
                    r["id"].as_str().unwrap_or_default()
                );
                (url, r.to_string())
            })
            .collect();
        let bytes: u64 = items.iter().map(|(_, b)| b.len() as u64).sum();
        let items = Arc::new(items);
        // As a payer feed would: a backend client with a system/*.* token (authorization is on).
        let mut auth_headers = reqwest::header::HeaderMap::new();
        let token = crate::bench_auth::token(&base, &serve_backend).await?;
        auth_headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        let client = reqwest::Client::builder()
            .no_proxy()
            .default_headers(auth_headers)
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            .build()?;
        let before = visible(&store).await?;
        eprintln!("bench: http: {n} PUTs from {concurrency} concurrent clients to {base}");
        run.reset_rss();
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (items, next, client) = (items.clone(), next.clone(), client.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((url, body)) = items.get(i) else {
                            break;
                        };
                        let t = Instant::now();
                        let sent = client
                            .put(url)
                            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
                            .body(body.clone())
                            .send()
                            .await;
                        match sent {
                            Ok(resp) => {
                                let status = resp.status();
                                let text = resp.text().await.unwrap_or_default();
                                latencies.push(t.elapsed());
                                // 200/201 only: 202 would mean "accepted, not yet visible".
                                if status != reqwest::StatusCode::OK && status != reqwest::StatusCode::CREATED {
                                    errors.push(format!("PUT {url}: {status}: {text:.300}"));
                                }
                            }
                            Err(e) => errors.push(format!("PUT {url}: {e}")),
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(n);
        let mut errors = Vec::new();
        for w in workers {
            let (l, e) = w.await?;
            latencies.extend(l);
            errors.extend(e);
        }
        let elapsed = start.elapsed();
        let rss = peak_rss_kib();
        if !errors.is_empty() {
            for e in errors.iter().take(5) {
                eprintln!("bench: http: {e}");
            }
            bail!("{} of {n} HTTP writes failed", errors.len());
        }
        // The contract says a 2xx write is visible; check it rather than trust it.
        let now = visible(&store).await?;
        if now != before + n as i64 {
            bail!("after {n} successful PUTs the view shows {} new resources", now - before);
        }
        Ok(Phase::new(
            "http PUT (acknowledged = visible)",
            n as u64,
            bytes,
            elapsed,
            Latency::from("PUT until visible", latencies),
            rss,
        ))
    }
    .await;
    finish(app, result).await
}

// ---- stages alone (--stages) -------------------------------------------------------------------

/// `payerx load` into a log with no roles running: load's own ceiling on this machine.
async fn load_alone(run: &Run) -> anyhow::Result<Phase> {
    let n = run.args.resources;
    let scratch = Scratch::new(&run.id, "alone")?;
    let backend = run.backend(&scratch.0, "alone");
    let path = scratch.0.join("resources.ndjson");
    let bytes = {
        let (path, seed, prefix) = (path.clone(), run.args.seed, run.id_prefix("alone"));
        tokio::task::spawn_blocking(move || synth::write_ndjson(&path, n, seed, &prefix))
            .await?
            .context("writing the NDJSON input")?
    };
    let log = backend.open_log().await?;
    let load_args = LoadArgs { chunk: CHUNK, ..LoadArgs::new(backend.clone(), path) };
    eprintln!("bench: stages: payerx load with nothing else running");
    run.reset_rss();
    let start = Instant::now();
    let report = crate::load::load_into(log.clone(), &load_args).await?;
    let elapsed = start.elapsed();
    if report.accepted != n as u64 {
        bail!("payerx load accepted {} of {n}", report.accepted);
    }
    Ok(Phase::new("load alone (acknowledged)", n as u64, bytes, elapsed, None, peak_rss_kib()))
}

/// The validate processor alone: submissions appended beforehand, timed until every one has
/// been forwarded to the change topic.
async fn processor_alone(run: &Run) -> anyhow::Result<Phase> {
    let n = run.args.resources;
    let scratch = Scratch::new(&run.id, "validate")?;
    let backend = run.backend(&scratch.0, "validate");
    let submissions = topics::full(&backend.topic_prefix, topics::FHIR_SUBMISSIONS);
    let changes = topics::full(&backend.topic_prefix, topics::FHIR_CHANGES);
    let (chunks, bytes) = encoded_chunks(run, "validate", submissions).await?;
    {
        let log = backend.open_log().await?;
        append_all(&log, chunks).await?;
    }
    let mut serve = ServeArgs::new(backend);
    serve.roles = vec![Role::Processors];
    eprintln!("bench: stages: the validate processor alone");
    run.reset_rss();
    let app = App::start(serve).await?;
    let start = Instant::now();
    let result = async {
        let deadline = start + Duration::from_secs(run.args.visible_timeout_secs);
        loop {
            let forwarded: i64 = app.log.end_offsets(&changes).await?.iter().sum();
            if forwarded >= n as i64 {
                return Ok(start.elapsed());
            }
            if Instant::now() >= deadline {
                bail!("the validate processor forwarded {forwarded} of {n} in time");
            }
            tokio::time::sleep(VISIBLE_POLL).await;
        }
    }
    .await;
    let rss = peak_rss_kib();
    let elapsed = finish(app, result).await?;
    Ok(Phase::new("validate processor alone", n as u64, bytes, elapsed, None, rss))
}

/// The resource projection alone: change events appended beforehand, timed until the view
/// shows every resource.
async fn projection_alone(run: &Run) -> anyhow::Result<Phase> {
    let n = run.args.resources;
    let scratch = Scratch::new(&run.id, "project")?;
    let backend = run.backend(&scratch.0, "project");
    let changes = topics::full(&backend.topic_prefix, topics::FHIR_CHANGES);
    let (chunks, bytes) = encoded_chunks(run, "project", changes.clone()).await?;
    {
        let log = backend.open_log().await?;
        append_all(&log, chunks).await?;
    }
    let mut serve = ServeArgs::new(backend.clone());
    serve.roles = vec![Role::Projections];
    eprintln!("bench: stages: the resource projection alone");
    let app = App::start(serve).await?;
    let result = async {
        let store = app.store.clone().context("payerx started without its views")?;
        // Counted before the clock starts: the projection may already be applying.
        let before = visible(&store).await?;
        run.reset_rss();
        let start = Instant::now();
        let done = wait_visible(
            &store,
            &changes,
            &backend.topic_prefix,
            n as u64,
            before + n as i64,
            Duration::from_secs(run.args.visible_timeout_secs),
        )
        .await?;
        anyhow::Ok(done - start)
    }
    .await;
    let rss = peak_rss_kib();
    let elapsed = finish(app, result).await?;
    Ok(Phase::new("resource projection alone", n as u64, bytes, elapsed, None, rss))
}

#[derive(Debug, Clone, Serialize)]
struct CpuStep {
    step: &'static str,
    /// Microseconds of one thread per resource.
    us_per_resource: f64,
}

/// CPU cost of each step a resource goes through, one thread, no IO, in steady state (each
/// result dropped at once, so the allocator recycles memory as in the pipeline).
fn cpu_steps(n: usize, seed: u64) -> anyhow::Result<Vec<CpuStep>> {
    use runtime::Processor;
    use std::hint::black_box;
    let values: Vec<Value> = synth::resources(n, seed, "cpu-").collect();
    let texts: Vec<String> = values.iter().map(Value::to_string).collect();
    let mut steps = Vec::new();
    let mut step = |name: &'static str, t: Instant| {
        steps.push(CpuStep { step: name, us_per_resource: t.elapsed().as_secs_f64() * 1e6 / n as f64 })
    };
    let t = Instant::now();
    for l in &texts {
        black_box(serde_json::from_str::<Value>(l)?);
    }
    step("parse JSON (serde_json::Value)", t);
    let t = Instant::now();
    for v in &values {
        let (rtype, id) = (v["resourceType"].as_str().unwrap_or_default(), v["id"].as_str().unwrap_or_default());
        processors::validate_processor::check_resource(v, rtype, id, None)
            .map_err(|oo| anyhow::anyhow!("{}", oo.summary()))?;
    }
    step("validate (check_resource)", t);
    let t = Instant::now();
    for v in &values {
        black_box(v.to_string());
    }
    step("serialize JSON", t);
    let t = Instant::now();
    let mut rows = 0usize;
    for (v, text) in values.iter().zip(&texts) {
        let rtype = v["resourceType"].as_str().unwrap_or_default();
        rows += black_box(projections::search::extract::extract(rtype, text)?).len();
    }
    step("search index values (projection)", t);
    eprintln!("bench: stages: {:.1} search index rows per resource", rows as f64 / n as f64);
    let topic = "bench.fhir.submissions";
    let t = Instant::now();
    for (v, text) in values.iter().zip(&texts) {
        let (rtype, id) = (v["resourceType"].as_str().unwrap_or_default(), v["id"].as_str().unwrap_or_default());
        black_box(load_record(topic, "c", rtype, id, text.clone())?);
    }
    step("envelope + Avro encode + record (of serialized JSON)", t);
    let records = values
        .iter()
        .zip(texts)
        .map(|(v, text)| {
            let (rtype, id) = (v["resourceType"].as_str().unwrap_or_default(), v["id"].as_str().unwrap_or_default());
            load_record(topic, "c", rtype, id, text)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t = Instant::now();
    for r in &records {
        black_box(schemas::decode_event::<ResourceChanged>(&r.value)?);
    }
    step("Avro decode", t);
    let processor = processors::ValidateProcessor::new("bench.");
    let consumed: Vec<runtime::Consumed> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| runtime::Consumed {
            topic: r.topic,
            partition: 0,
            offset: i as i64,
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp_ms: 0,
        })
        .collect();
    let t = Instant::now();
    for c in &consumed {
        black_box(processor.process(c).map_err(|e| anyhow::anyhow!("validate processor: {e}"))?);
    }
    step("validate processor, a submission (decode, parse, validate, encode)", t);
    Ok(steps)
}

fn fmt_rss(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or("n/a".into(), |ms| if ms < 10.0 { format!("{ms:.2} ms") } else { format!("{ms:.1} ms") })
}

fn table(out: &mut String, phases: &[Phase]) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "{:<34} {:>9} {:>8} {:>12} {:>7} {:>10} {:>10} {:>10}  {:>9}  latency sample",
        "phase", "resources", "seconds", "resources/s", "MB/s", "p50", "p99", "p99.9", "peak RSS"
    );
    for p in phases {
        let l = p.latency.as_ref();
        let _ = writeln!(
            out,
            "{:<34} {:>9} {:>8.2} {:>12.0} {:>7.1} {:>10} {:>10} {:>10}  {:>9}  {}",
            p.name,
            p.resources,
            p.seconds,
            p.resources_per_s,
            p.mb_per_s,
            fmt_ms(l.map(|l| l.p50_ms)),
            fmt_ms(l.map(|l| l.p99_ms)),
            fmt_ms(l.map(|l| l.p999_ms)),
            fmt_rss(p.peak_rss_kib),
            l.map_or("n/a (load reports no per-item times)", |l| l.of),
        );
    }
}

async fn ingest(args: IngestBenchArgs) -> anyhow::Result<()> {
    if args.resources == 0 {
        bail!("--resources must be at least 1");
    }
    let kafka = args.backend.kafka_brokers.is_some();
    let postgres = args.backend.database_url.as_deref().is_some_and(|u| u.starts_with("postgres"));
    let label = backends_label(&args.backend);
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let rss_per_phase = reset_peak_rss();
    let run = Run { args: args.clone(), id, kafka, rss_per_phase };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("bench: ingest on {label}, {cpus} CPUs, run {}", run.id);

    // Each round is a floor and a load back to back, so both see the same machine; http and
    // the stages run once, after the first round.
    let mut rounds: Vec<Round> = Vec::new();
    let mut http = None;
    let mut stage_phases = Vec::new();
    let mut cpu = Vec::new();
    for i in 1..=usize::from(args.rounds) {
        let r = round(&run, i).await.with_context(|| format!("round {i}"))?;
        eprintln!(
            "bench: round {i}: floor {:.0} resources/s, load acknowledged {:.0} ({:.2} of the floor), visible {:.0}",
            r.floor.resources_per_s,
            r.load_ack.resources_per_s,
            r.ratio(&r.load_ack),
            r.load_vis.resources_per_s
        );
        rounds.push(r);
        if i == 1 && args.http_resources > 0 {
            let h = self::http(&run).await.context("http phase")?;
            eprintln!("bench: http: {:.0} resources/s", h.resources_per_s);
            http = Some(h);
        }
        if i == 1 && args.stages {
            stage_phases.push(load_alone(&run).await.context("load alone")?);
            stage_phases.push(processor_alone(&run).await.context("validate processor alone")?);
            stage_phases.push(projection_alone(&run).await.context("projection alone")?);
            let (k, seed) = (args.resources.min(5_000), args.seed);
            eprintln!("bench: stages: CPU per resource over {k} resources, one thread");
            cpu = tokio::task::spawn_blocking(move || cpu_steps(k, seed)).await??;
        }
    }
    let median = Round::median(&rounds).context("no round ran")?;
    let (floor, load_ack, load_vis) = (&median.floor, &median.load_ack, &median.load_vis);
    let ratio = |p: &Phase| median.ratio(p);
    let avg_bytes = floor.payload_bytes / floor.resources.max(1);
    let mut phases = vec![floor.clone(), load_ack.clone(), load_vis.clone()];
    phases.extend(http.clone());
    // The goals: load ≥ 20,000/s on the embedded backends, and ≥ half the floor.
    let goal_rate = (!kafka).then_some(load_ack.resources_per_s >= 20_000.0);
    let goal_half = ratio(load_ack) >= 0.5;
    let per_round = rounds
        .iter()
        .map(|r| {
            format!("{:.0}/{:.0} = {:.2}", r.load_ack.resources_per_s, r.floor.resources_per_s, r.ratio(&r.load_ack))
        })
        .collect::<Vec<_>>()
        .join(", ");

    let mut out = String::new();
    {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "\npayerx bench ingest: {label}; {} resources/phase ({avg_bytes} B average: Patient, Coverage, CARIN BB EOB), HTTP {} at concurrency {}, {cpus} CPUs",
            args.resources, args.http_resources, args.concurrency
        );
        let _ = writeln!(out, "load acknowledged / floor, each round: {per_round}; the table shows the median round");
        table(&mut out, &phases);
        let _ = writeln!(
            out,
            "ratios to the floor: load acknowledged {:.2}, load visible {:.2}{}",
            ratio(load_ack),
            ratio(load_vis),
            http.as_ref().map_or(String::new(), |h| format!(", http {:.3}", ratio(h)))
        );
        if let Some(cpu) = &median.load_cpu {
            let _ = writeln!(out, "CPU of this process while load ran (median round): {cpu}");
        }
        let _ = writeln!(
            out,
            "goals: load ≥ 20,000 resources/s on embedded: {}; load ≥ 0.5 × floor: {}",
            match goal_rate {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "n/a (not embedded)",
            },
            if goal_half { "met" } else { "NOT met" }
        );
        if !stage_phases.is_empty() {
            let _ = writeln!(
                out,
                "\nstages alone (same {} resources, fresh state each, nothing else running):",
                args.resources
            );
            table(&mut out, &stage_phases);
            let _ = writeln!(
                out,
                "ratios to the floor: {}",
                stage_phases.iter().map(|p| format!("{} {:.2}", p.name, ratio(p))).collect::<Vec<_>>().join(", ")
            );
            let _ = writeln!(out, "CPU per resource, one thread, no IO:");
            for c in &cpu {
                let _ = writeln!(
                    out,
                    "  {:<56} {:>8.1} µs  (≤ {:>7.0} resources/s per core)",
                    c.step,
                    c.us_per_resource,
                    1e6 / c.us_per_resource.max(1e-9)
                );
            }
        }
        let _ = writeln!(
            out,
            "notes: peak RSS is the process-wide VmHWM {} (it includes the bench's own inputs, and memory the allocator kept from earlier phases); \
             load visible = from load start until the view shows all; http latency = request until the write is visible (payerx answers after the view has it), client on the same machine.",
            if run.rss_per_phase { "reset at the start of each phase" } else { "since process start (cumulative: the kernel refused a reset)" }
        );
    }
    if args.json {
        eprint!("{out}");
        let report = json!({
            "bench": "ingest",
            "backend": {"log": if kafka { "kafka" } else { "embedded" }, "views": if postgres { "postgres" } else { "sqlite" }},
            "cpus": cpus,
            "resources": args.resources,
            "http_resources": args.http_resources,
            "concurrency": args.concurrency,
            "seed": args.seed,
            "rounds": rounds,
            "avg_resource_bytes": avg_bytes,
            "peak_rss_scope": if run.rss_per_phase { "phase" } else { "process" },
            "phases": phases,
            "ratios_to_floor": {
                "load_acknowledged": ratio(load_ack),
                "load_visible": ratio(load_vis),
                "http": http.as_ref().map(ratio),
            },
            "goals": {
                "load_at_least_20000_per_s_embedded": goal_rate,
                "load_at_least_half_floor": goal_half,
            },
            "stages": {
                "phases": stage_phases,
                "ratios_to_floor": stage_phases.iter().map(|p| (p.name.to_string(), json!(ratio(p)))).collect::<serde_json::Map<_, _>>(),
                "cpu_per_resource": cpu,
            },
        });
        println!("{report}");
    } else {
        print!("{out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(per_s: f64) -> Phase {
        Phase::new("p", per_s as u64, 0, Duration::from_secs(1), None, None)
    }

    fn round(floor: f64, load: f64) -> Round {
        Round { floor: phase(floor), load_ack: phase(load), load_vis: phase(load / 10.0), load_cpu: None }
    }

    #[test]
    fn thread_cpu_is_read_from_proc_stat_and_grouped_by_role() {
        // A name with a space and a parenthesis; utime 250 and stime 50 are fields 14 and 15.
        let line = "4242 (payerx-stages) x) S 1 1 1 0 -1 4194368 10 0 0 0 250 50 0 0 30 10 9 0 100 0 0";
        assert_eq!(parse_task_stat(line), Some(("payerx-stages) x".to_string(), 300)));
        assert_eq!(parse_task_stat("4242 (short) S 1"), None);

        let snap = |rows: &[(&str, &str, u64)]| {
            rows.iter().map(|(tid, name, t)| (tid.to_string(), (name.to_string(), *t))).collect()
        };
        let before = snap(&[("1", "tokio-rt-worker", 100), ("2", "payerx-log-writ", 10), ("3", "payerx-stages", 0)]);
        let after = snap(&[
            ("1", "tokio-rt-worker", 160),
            ("2", "payerx-log-writ", 40),
            ("3", "payerx-stages", 5),
            ("4", "sqlx-sqlite-worker-3", 5), // started during the phase: all of it counts
        ]);
        let split = cpu_split(&before, &after, 100.0, Duration::from_millis(500)).expect("CPU was used");
        assert_eq!(split.cpu_seconds, 1.0);
        assert_eq!(split.cpus_busy, 2.0);
        let roles: Vec<&str> = split.shares.iter().map(|(r, _)| *r).collect();
        assert_eq!(roles, ["load (read, parse, validate, encode)", "log writer", "stages", "views database"]);
        assert_eq!(split.shares[0].1, 0.6);
        assert!(cpu_split(&before, &before, 100.0, Duration::from_secs(1)).is_none(), "no CPU used, no split");
        // Where /proc exists, this process's own threads are found (the test's included).
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(!thread_ticks().is_empty());
        }
    }

    #[test]
    fn the_reported_round_is_the_one_with_the_median_ratio_not_the_median_rates() {
        // Ratios 0.30, 0.60, 0.45: the fastest load and the fastest floor are in other rounds.
        let rounds = [round(100_000.0, 30_000.0), round(50_000.0, 30_000.0), round(80_000.0, 36_000.0)];
        let m = Round::median(&rounds).map(|r| r.ratio(&r.load_ack));
        assert_eq!(m, Some(0.45));
        assert!(Round::median(&[]).is_none());
        // An even count reports the upper of the two middle rounds.
        let even = [round(100.0, 10.0), round(100.0, 40.0), round(100.0, 20.0), round(100.0, 30.0)];
        assert_eq!(Round::median(&even).map(|r| r.ratio(&r.load_ack)), Some(0.3));
    }
}
