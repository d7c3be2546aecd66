//! The payerx binary: `serve`, `load`, `events`, `replay`, `bench`.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "payerx",
    version,
    about = "Event-sourced payer interoperability platform (Da Vinci CDex, PDex, Patient Access)"
)]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long, global = true, env = "PAYERX_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run payerx: the HTTP API, the processors and the projections (or the roles chosen).
    Serve(Box<payerx::ServeArgs>),
    /// Feed NDJSON or Bundle files into the log, through the same checks as the API.
    Load(payerx::load::LoadArgs),
    /// Print a topic's events as JSON lines.
    Events(payerx::events::EventsArgs),
    /// Write synthetic payer data (Patient, Coverage, CARIN BB ExplanationOfBenefit) as NDJSON.
    Generate(GenerateArgs),
    /// Rebuild a projection from the log and swap it in without downtime.
    Replay(payerx::replay::ReplayArgs),
    /// Register, list, disable or enable API clients.
    #[command(subcommand)]
    Clients(payerx::admin::ClientsCommand),
    /// Link member logins to Patients.
    #[command(subcommand)]
    Members(payerx::admin::MembersCommand),
    /// Rotate the token signing key.
    #[command(subcommand)]
    Keys(payerx::admin::KeysCommand),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(payerx::bench::BenchCommand),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Resources to write (cycling Patient, Coverage, ExplanationOfBenefit).
    #[arg(long, default_value_t = 1000)]
    resources: usize,
    /// Same seed, same data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prefix of every resource id (to load several sets side by side).
    #[arg(long, default_value = "syn-")]
    id_prefix: String,
    /// Output file (.ndjson), ready for `payerx load`.
    #[arg(long)]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_env("PAYERX_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match cli.command {
        Command::Serve(args) => payerx::App::start(*args).await?.run_until_signal().await,
        Command::Load(args) => payerx::load::run(args).await,
        Command::Events(args) => payerx::events::run(args).await,
        Command::Replay(args) => payerx::replay::run(args).await,
        Command::Generate(g) => {
            let bytes = payerx::synth::write_ndjson(&g.out, g.resources, g.seed, &g.id_prefix)?;
            println!("{}", serde_json::json!({"file": g.out, "resources": g.resources, "bytes": bytes}));
            Ok(())
        }
        Command::Bench(cmd) => payerx::bench::run(cmd).await,
        Command::Clients(cmd) => payerx::admin::clients(cmd).await,
        Command::Members(cmd) => payerx::admin::members(cmd).await,
        Command::Keys(cmd) => payerx::admin::keys(cmd).await,
    }
}
