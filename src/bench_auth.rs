//! `payerx bench auth`: what authorization costs. The same read load (`GET /fhir/Patient/{id}`
//! from concurrent keep-alive clients) against payerx with its authorization server and against
//! payerx with `--insecure-no-auth`, in alternating rounds of one run, on the same machine. The
//! ratio of the two is the figure; absolute numbers move with the machine.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::config::{BackendArgs, ServeArgs};
use crate::App;

#[derive(Debug, Clone, Args)]
pub struct AuthBenchArgs {
    /// Backend (embedded by default; Kafka + Postgres with the usual flags). Each round gets fresh state.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Requests per round.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Rounds per mode (alternating, to spread machine noise over both).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

struct Round {
    secure: bool,
    per_s: f64,
    p50: Duration,
    p99: Duration,
}

const PATIENTS: usize = 200;

pub(crate) fn fresh_backend(base: &BackendArgs) -> (BackendArgs, Option<std::path::PathBuf>) {
    let mut b = base.clone();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    if b.kafka_brokers.is_some() {
        b.topic_prefix = format!("benchauth-{tag}.");
        (b, None)
    } else {
        let dir = std::env::temp_dir().join(format!("payerx-bench-auth-{tag}"));
        b.data_dir = dir.clone();
        (b, Some(dir))
    }
}

/// Stops a bench's payerx and removes its scratch folder (from [`fresh_backend`]), then hands
/// back what the bench measured.
pub(crate) async fn finish<T>(
    app: crate::App,
    dir: Option<std::path::PathBuf>,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    app.stop().await?;
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

/// An HTTP client for a bench: FHIR JSON, a `system/*.*` token from [`token`], no proxy, up to
/// `pool` idle connections and `timeout` per request.
pub(crate) async fn backend_client(
    base: &str,
    backend: &BackendArgs,
    pool: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("content-type", "application/fhir+json".parse()?);
    headers.insert("authorization", format!("Bearer {}", token(base, backend).await?).parse()?);
    Ok(reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .pool_max_idle_per_host(pool)
        .timeout(timeout)
        .build()?)
}

/// A `system/*.*` backend client registered in `backend`, and a token for it from `base`.
pub(crate) async fn token(base: &str, backend: &BackendArgs) -> anyhow::Result<String> {
    let db = backend.open_db().await?;
    let c = auth::admin::add_client(
        &db,
        auth::NewClient {
            name: "bench".into(),
            kind: auth::ClientKind::ConfidentialSymmetric,
            redirect_uris: vec![],
            jwks_url: None,
            jwks: None,
            scope: "system/*.*".into(),
            organizations: Vec::new(),
        },
    )
    .await?;
    let r = reqwest::Client::new()
        .post(format!("{base}/auth/token"))
        .basic_auth(&c.client_id, c.client_secret.as_deref())
        .form(&[("grant_type", "client_credentials"), ("scope", "system/*.*")])
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "token request: {}", r.status());
    let v: serde_json::Value = r.json().await?;
    v["access_token"].as_str().map(str::to_string).context("no access_token")
}

async fn round(args: &AuthBenchArgs, secure: bool) -> anyhow::Result<Round> {
    let (backend, dir) = fresh_backend(&args.backend);
    let mut serve = ServeArgs::new(backend.clone());
    serve.insecure_no_auth = !secure;
    let app = App::start(serve).await?;
    let base = app.base_url();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("content-type", "application/fhir+json".parse()?);
    if secure {
        headers.insert("authorization", format!("Bearer {}", token(&base, &backend).await?).parse()?);
    }
    let client =
        reqwest::Client::builder().default_headers(headers).pool_max_idle_per_host(args.concurrency).build()?;
    for i in 0..PATIENTS {
        let body = serde_json::json!({"resourceType": "Patient", "id": format!("b{i}"), "name": [{"family": "Bench", "given": ["A"]}], "birthDate": "1980-01-01"});
        let r = client.put(format!("{base}/fhir/Patient/b{i}")).body(body.to_string()).send().await?;
        anyhow::ensure!(r.status().is_success(), "seeding: {}", r.status());
    }
    let per_client = args.requests.div_ceil(args.concurrency.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency.max(1) {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for n in 0..per_client {
                let t = Instant::now();
                let r = client.get(format!("{base}/fhir/Patient/b{}", (c * 7919 + n) % PATIENTS)).send().await?;
                let ok = r.status() == 200;
                r.bytes().await?;
                anyhow::ensure!(ok, "GET answered non-200");
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(args.requests);
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    let r = Round { secure, per_s: lat.len() as f64 / elapsed.as_secs_f64(), p50: at(0.5), p99: at(0.99) };
    finish(app, dir, Ok(r)).await
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(args: AuthBenchArgs) -> anyhow::Result<()> {
    let mut rounds = Vec::new();
    for i in 0..args.rounds.max(1) * 2 {
        // Alternate which mode goes first, so warm-up and drift hit both.
        let secure = (i % 2 == 0) ^ (i / 2 % 2 == 1);
        let r = round(&args, secure).await?;
        eprintln!(
            "bench auth: round {} {:>9}: {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            i + 1,
            if r.secure { "auth" } else { "no-auth" },
            r.per_s,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
        rounds.push(r);
    }
    let pick =
        |secure: bool, f: &dyn Fn(&Round) -> f64| median(rounds.iter().filter(|r| r.secure == secure).map(f).collect());
    let (a_rps, n_rps) = (pick(true, &|r| r.per_s), pick(false, &|r| r.per_s));
    let (a_p99, n_p99) = (pick(true, &|r| r.p99.as_secs_f64() * 1e3), pick(false, &|r| r.p99.as_secs_f64() * 1e3));
    let (a_p50, n_p50) = (pick(true, &|r| r.p50.as_secs_f64() * 1e3), pick(false, &|r| r.p50.as_secs_f64() * 1e3));
    let ratio = a_rps / n_rps;
    let log = if args.backend.kafka_brokers.is_some() { "kafka" } else { "embedded" };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"bench": "auth", "log": log, "requests_per_round": args.requests, "concurrency": args.concurrency,
                "rounds": args.rounds, "auth": {"per_s": a_rps, "p50_ms": a_p50, "p99_ms": a_p99},
                "no_auth": {"per_s": n_rps, "p50_ms": n_p50, "p99_ms": n_p99}, "throughput_ratio": ratio, "goal_ratio": 0.9})
        );
    } else {
        println!(
            "payerx bench auth: GET /fhir/Patient/{{id}}, {} requests x {} rounds per mode, concurrency {}, {log} log",
            args.requests, args.rounds, args.concurrency
        );
        println!("mode        req/s (median)   p50 ms   p99 ms");
        println!("auth        {a_rps:>14.0}   {a_p50:>6.2}   {a_p99:>6.2}");
        println!("no-auth     {n_rps:>14.0}   {n_p50:>6.2}   {n_p99:>6.2}");
        println!(
            "throughput ratio auth/no-auth: {ratio:.3} (goal >= 0.9: {})",
            if ratio >= 0.9 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
