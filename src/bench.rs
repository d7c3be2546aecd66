//! `payerx bench`: throughput and latency figures, always beside a floor measured in the same
//! run on the same machine.

use clap::{Args, Subcommand};

use crate::config::BackendArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The payer feed: HTTP API and `payerx load` against the raw log append rate.
    Ingest(IngestBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct IngestBenchArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Resources per phase.
    #[arg(long, default_value_t = 20_000)]
    pub resources: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ingest(_args) => anyhow::bail!("bench ingest is not built yet"),
    }
}
