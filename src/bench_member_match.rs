//! `payerx bench member-match`: Da Vinci `$member-match` over the log, beside the same matcher
//! called in-process on the same index (the floor), and the bulk path, in one run on one machine.
//!
//! - **load**: `--members` members (a Patient with an MB identifier and a Coverage with a
//!   subscriber id each) through `payerx load`, then wait for the member index;
//! - **over the log**: `--requests` matches at each `--concurrency` level through the HTTP API
//!   (ingest → requests topic → member-match processor → decisions topic → ingest), every one a
//!   different member (no repeated-request shortcut): p50/p99 latency and matches/s;
//! - **floor**: the same requests decided in-process (`MemberMatchStore::decide_direct`: the
//!   index lookups and the rules, no HTTP, no log) at the same concurrency;
//! - **bulk**: one `$bulk-member-match` of `--bulk-members` members, its body generated while
//!   it is sent: members/s from kick-off to the completed manifest, and the process's RSS growth.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use processors::member_match::{MatchRequest, Verdict};
use serde_json::{json, Value};

use crate::bench::{peak_rss_kib, reset_peak_rss, status_kib, Latency};
use crate::bench_auth::{backend_client, finish, fresh_backend};
use crate::config::{BackendArgs, ServeArgs};
use crate::App;

#[derive(Debug, Clone, Args)]
pub struct MemberMatchBenchArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Members in the index.
    #[arg(long, default_value_t = 100_000)]
    pub members: usize,
    /// Matches per concurrency level.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Concurrency levels (clients sending one request at a time each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Members in the one bulk request.
    #[arg(long, default_value_t = 10_000)]
    pub bulk_members: usize,
    /// Print one JSON object with every figure on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

const FAMILIES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "García",
    "Miller",
    "Davis",
    "Rodríguez",
    "Martínez",
    "Hernández",
    "López",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Pérez",
    "Thompson",
    "White",
    "Harris",
    "Sánchez",
    "Clark",
    "Ramírez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "O'Brien",
    "Smith-Jones",
];
const GIVEN: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "José",
    "María",
    "Mary-Jane",
    "Ana",
    "Luis",
    "Chen",
    "Wei",
    "Fatima",
    "Omar",
    "Priya",
];

/// Member `i`'s demographics, spread so that family + birth date rarely collide.
fn demographics(i: usize) -> (&'static str, &'static str, String) {
    let family = FAMILIES[i % FAMILIES.len()];
    let given = GIVEN[(i / FAMILIES.len()) % GIVEN.len()];
    let days = (i * 7919) % (365 * 80);
    let (y, d) = (1930 + days / 365, days % 365);
    (family, given, format!("{y:04}-{:02}-{:02}", d / 28 % 12 + 1, d % 28 + 1))
}

fn member_lines(i: usize, tag: &str) -> String {
    let (family, given, birth) = demographics(i);
    let patient = json!({"resourceType": "Patient", "id": format!("{tag}-{i}"),
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                        "system": "https://payer.example/member", "value": format!("M{tag}{i}")}],
        "name": [{"family": family, "given": [given]}], "gender": if i % 2 == 0 { "female" } else { "male" },
        "birthDate": birth, "address": [{"postalCode": format!("{:05}", i % 99_999)}]});
    let coverage = json!({"resourceType": "Coverage", "id": format!("{tag}-c{i}"), "status": "active",
        "subscriberId": format!("S{tag}{i}"), "beneficiary": {"reference": format!("Patient/{tag}-{i}")},
        "payor": [{"reference": "Organization/payer"}], "period": {"start": "2020-01-01", "end": "2025-12-31"}});
    format!("{patient}\n{coverage}\n")
}

const NPI: &str = "http://hl7.org/fhir/sid/us-npi";

fn coverage_to_link() -> Value {
    json!({"resourceType": "Coverage", "id": "new", "status": "active",
        "contained": [{"resourceType": "Organization", "id": "np", "identifier": [{"system": NPI, "value": "0123456789"}]}],
        "beneficiary": {"reference": "Patient/1"}, "payor": [{"reference": "#np"}]})
}

fn consent() -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IDSCL"}]}],
        "patient": {"reference": "Patient/1"}, "policy": [{"uri": processors::member_match::POLICY_REGULAR}],
        "provision": {"type": "permit", "period": {"start": "2020-01-01", "end": "2099-12-31"},
            "actor": [{"role": {"coding": [{"code": "IRCP"}]}, "reference": {"identifier": {"system": NPI, "value": "0123456789"}}}]}})
}

/// The four inputs asking for member `i`.
fn inputs(i: usize, tag: &str) -> [Value; 4] {
    let (family, given, birth) = demographics(i);
    [
        json!({"resourceType": "Patient", "id": "1", "name": [{"family": family, "given": [given]}],
               "gender": if i % 2 == 0 { "female" } else { "male" }, "birthDate": birth}),
        json!({"resourceType": "Coverage", "id": "old", "status": "active", "subscriberId": format!("S{tag}{i}"),
               "beneficiary": {"reference": "Patient/1"}, "payor": [{"reference": "Organization/payer"}]}),
        coverage_to_link(),
        consent(),
    ]
}

fn parameters(i: usize, tag: &str) -> Value {
    let [p, m, l, c] = inputs(i, tag);
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": p}, {"name": "CoverageToMatch", "resource": m},
        {"name": "CoverageToLink", "resource": l}, {"name": "Consent", "resource": c}]})
}

struct Row {
    name: String,
    count: usize,
    seconds: f64,
    latency: Option<Latency>,
    rss_growth_kib: Option<u64>,
}

impl Row {
    fn per_s(&self) -> f64 {
        self.count as f64 / self.seconds.max(1e-9)
    }

    fn text(&self) -> String {
        let l = self.latency.as_ref();
        format!(
            "{:<44} {:>7} {:>9.2} {:>10.0} {:>9} {:>9} {:>9} {:>11}",
            self.name,
            self.count,
            self.seconds,
            self.per_s(),
            l.map_or("n/a".into(), |l| format!("{:.2} ms", l.p50_ms)),
            l.map_or("n/a".into(), |l| format!("{:.2} ms", l.p99_ms)),
            l.map_or("n/a".into(), |l| format!("{:.1} ms", l.max_ms)),
            self.rss_growth_kib.map_or("n/a".into(), |k| format!("{} MiB", k / 1024)),
        )
    }

    fn json(&self) -> Value {
        json!({"phase": self.name, "count": self.count, "seconds": self.seconds, "per_s": self.per_s(),
               "p50_ms": self.latency.as_ref().map(|l| l.p50_ms), "p99_ms": self.latency.as_ref().map(|l| l.p99_ms),
               "max_ms": self.latency.as_ref().map(|l| l.max_ms),
               "rss_growth_kib": self.rss_growth_kib})
    }
}

/// Runs `n` jobs from `concurrency` tasks; each job returns its latency.
async fn drive<F, Fut>(n: usize, concurrency: usize, job: F) -> anyhow::Result<(f64, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (job, next) = (job.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                job(i).await?;
                out.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((start.elapsed().as_secs_f64(), all))
}

async fn load_members(app: &App, args: &MemberMatchBenchArgs, backend: &BackendArgs, tag: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("payerx-bench-members-{tag}.ndjson"));
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..args.members {
            f.write_all(member_lines(i, tag).as_bytes())?;
        }
        f.flush()?;
    }
    eprintln!("bench: member-match: loading {} members ({} resources)", args.members, args.members * 2);
    let t = Instant::now();
    let load_args = crate::load::LoadArgs { show_rejects: 5, ..crate::load::LoadArgs::new(backend.clone(), path) };
    let report = crate::load::load_into(app.log.clone(), &load_args).await;
    let _ = std::fs::remove_file(&load_args.path);
    let report = report?;
    if report.rejected > 0 {
        bail!("payerx load rejected {} of the members", report.rejected);
    }
    let store = app.matches.clone().context("payerx started without its views")?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let n = store.member_count().await?;
        if n as usize >= args.members {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the member index holds {n} of {} after 30 min", args.members);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Coverages are indexed after their Patients; wait for the last one too.
    let last = parameters(args.members - 1, tag);
    let req = processors::member_match::parse_request(&last).map_err(|p| anyhow::anyhow!(p.message))?;
    while !matches!(store.decide_direct(&req).await?, Verdict::Matched { .. }) {
        anyhow::ensure!(Instant::now() < deadline, "the last member never became matchable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The read view too: measure matching in a steady state, not beside a projection catching up.
    let view = app.store.clone().context("payerx started without its views")?;
    while view.count("Coverage").await? < args.members as i64 {
        anyhow::ensure!(Instant::now() < deadline, "the read view never caught up with the load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("bench: member-match: index and read view ready in {:.1} s", t.elapsed().as_secs_f64());
    // The load left hundreds of MB of dirty pages; flushing them now keeps the kernel's
    // writeback of the load out of the matching latencies (it stalls any writer for tens of ms).
    let flushed = std::process::Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
    eprintln!("bench: member-match: load flushed to disk: {flushed}");
    Ok(())
}

async fn over_the_log(
    client: &reqwest::Client,
    base: &str,
    tag: &str,
    first: usize,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let (client, url, tag) = (client.clone(), format!("{base}/fhir/Patient/$member-match"), tag.to_string());
    let (seconds, lat) = drive(n, concurrency, move |i| {
        let (client, url) = (client.clone(), url.clone());
        let body = parameters(first + i, &tag).to_string();
        async move {
            let r = client.post(&url).body(body).send().await?;
            let status = r.status();
            let text = r.text().await?;
            if status != 200 {
                bail!("$member-match answered {status}: {text:.300}");
            }
            Ok(())
        }
    })
    .await?;
    Ok(Row {
        name: format!("$member-match over the log, concurrency {concurrency}"),
        count: n,
        seconds,
        latency: Latency::from("request", lat),
        rss_growth_kib: None,
    })
}

async fn floor(app: &App, tag: &str, first: usize, n: usize, concurrency: usize) -> anyhow::Result<Row> {
    let store = app.matches.clone().context("payerx started without its views")?;
    let tag = tag.to_string();
    let (seconds, lat) = drive(n, concurrency, move |i| {
        let store = store.clone();
        let [p, m, l, c] = inputs(first + i, &tag);
        async move {
            let req =
                MatchRequest { member_patient: p, coverage_to_match: m, coverage_to_link: Some(l), consent: Some(c) };
            match store.decide_direct(&req).await? {
                Verdict::Matched { .. } => Ok(()),
                other => bail!("in-process matcher: {other:?}"),
            }
        }
    })
    .await?;
    Ok(Row {
        name: format!("floor: matcher in-process, concurrency {concurrency}"),
        count: n,
        seconds,
        latency: Latency::from("decision", lat),
        rss_growth_kib: None,
    })
}

/// A bulk request body generated while it is sent (the bench holds no copy).
fn bulk_body(first: usize, members: usize, tag: &str) -> reqwest::Body {
    let tag = tag.to_string();
    let parts = futures::stream::iter((0..=members + 1).map(move |k| {
        let chunk = match k {
            0 => "{\"resourceType\":\"Parameters\",\"parameter\":[".to_string(),
            k if k == members + 1 => "]}".to_string(),
            k => {
                let i = k - 1;
                let [p, m, l, c] = inputs(first + i, &tag);
                let bundle = json!({"name": "MemberBundle", "part": [
                    {"name": "MemberPatient", "resource": p}, {"name": "CoverageToMatch", "resource": m},
                    {"name": "CoverageToLink", "resource": l}, {"name": "Consent", "resource": c}]});
                format!("{}{bundle}", if i == 0 { "" } else { "," })
            }
        };
        Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
    }));
    reqwest::Body::wrap_stream(parts)
}

async fn bulk(client: &reqwest::Client, base: &str, tag: &str, first: usize, members: usize) -> anyhow::Result<Row> {
    eprintln!("bench: member-match: one $bulk-member-match of {members} members");
    let rss_base = status_kib("VmRSS:");
    reset_peak_rss();
    let t = Instant::now();
    let r = client
        .post(format!("{base}/fhir/Group/$bulk-member-match"))
        .header("prefer", "respond-async")
        .body(bulk_body(first, members, tag))
        .send()
        .await?;
    let status = r.status();
    let location = r.headers().get("content-location").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = r.text().await?;
    if status != 202 {
        bail!("$bulk-member-match answered {status}: {text:.300}");
    }
    let location = location.context("no Content-Location")?;
    let manifest: Value = loop {
        let r = client.get(&location).send().await?;
        match r.status().as_u16() {
            202 => tokio::time::sleep(Duration::from_millis(100)).await,
            200 => break r.json().await?,
            other => bail!("bulk status {other}: {:.300}", r.text().await?),
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(3600), "the bulk job did not finish within an hour");
    };
    let seconds = t.elapsed().as_secs_f64();
    let matched = manifest["extension"]["MatchedMembers"].as_i64().unwrap_or(0);
    anyhow::ensure!(matched as usize == members, "bulk matched {matched} of {members}: {manifest}");
    // Fetch the MatchedMembers output too (streamed page by page).
    let url = manifest["output"][0]["url"].as_str().context("no output url")?;
    let bytes = client.get(url).send().await?.bytes().await?.len();
    eprintln!("bench: member-match: MatchedMembers.ndjson is {:.1} MB", bytes as f64 / 1e6);
    Ok(Row {
        name: format!("$bulk-member-match, {members} members"),
        count: members,
        seconds,
        latency: None,
        rss_growth_kib: peak_rss_kib().zip(rss_base).map(|(p, b)| p.saturating_sub(b)),
    })
}

pub async fn run(args: MemberMatchBenchArgs) -> anyhow::Result<()> {
    let levels = args.concurrency.len();
    anyhow::ensure!(
        args.members >= args.requests * levels + args.bulk_members,
        "--members must cover every distinct request: at least {} for these settings",
        args.requests * levels + args.bulk_members
    );
    let (backend, dir) = fresh_backend(&args.backend);
    let serve = ServeArgs::new(backend.clone());
    let app = App::start(serve).await?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let result = async {
        let base = app.base_url();
        let pool = args.concurrency.iter().copied().max().unwrap_or(1);
        let client = backend_client(&base, &backend, pool, Duration::from_secs(3600)).await?;
        load_members(&app, &args, &backend, &tag).await?;
        let mut rows = Vec::new();
        for (k, &c) in args.concurrency.iter().enumerate() {
            let first = k * args.requests;
            eprintln!("bench: member-match: {} requests at concurrency {c}", args.requests);
            rows.push(over_the_log(&client, &base, &tag, first, args.requests, c).await?);
            rows.push(floor(&app, &tag, first, args.requests, c).await?);
        }
        // The bulk asks for members no single request asked for.
        rows.push(bulk(&client, &base, &tag, levels * args.requests, args.bulk_members).await?);
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    let rows = finish(app, dir, result).await?;
    let mut out = format!(
        "\npayerx bench member-match: {}, {} members, {} CPUs\n{:<44} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9} {:>11}\n",
        crate::bench::backends_label(&backend),
        args.members,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        "phase",
        "count",
        "seconds",
        "per s",
        "p50",
        "p99",
        "max",
        "RSS growth"
    );
    for r in &rows {
        out.push_str(&r.text());
        out.push('\n');
    }
    let mut ratios = Vec::new();
    for (pair, c) in rows.chunks(2).zip(&args.concurrency) {
        if let [log, floor] = pair {
            let r = log.per_s() / floor.per_s().max(1e-9);
            out.push_str(&format!("ratio to the floor (matches/s) at concurrency {c}: {r:.2}\n"));
            ratios.push(json!({"concurrency": c, "ratio": r}));
        }
    }
    let embedded =
        backend.kafka_brokers.is_none() && !backend.database_url.as_deref().is_some_and(|u| u.starts_with("postgres"));
    // The goal is stated for the embedded backends only.
    if let Some(p99) = args
        .concurrency
        .iter()
        .position(|&c| c == 16)
        .filter(|_| embedded)
        .and_then(|k| rows.get(2 * k))
        .and_then(|r| r.latency.as_ref())
        .map(|l| l.p99_ms)
    {
        out.push_str(&format!(
            "goal: p99 under 20 ms at concurrency 16 on the embedded backends: {} ({p99:.2} ms)\n",
            if p99 < 20.0 { "met" } else { "NOT met" }
        ));
    }
    out.push_str(
        "notes: over the log = HTTP request until the 200 (ingest appends the request, the member-match processor decides \
         and appends the decision, ingest answers from it), client in the same process; every request asks for a different \
         member; floor = the same lookups and rules in-process on the same index; bulk = kick-off until the completed \
         manifest, RSS growth = the process's peak above its RSS when the bulk began (its body is generated while sent).\n",
    );
    crate::bench::print_report(
        args.json,
        &out,
        json!({"bench": "member-match", "members": args.members, "phases": rows.iter().map(Row::json).collect::<Vec<_>>(),
               "ratios_to_floor": ratios}),
    );
    Ok(())
}
