//! `payerx replay --projection NAME`: rebuilds a view from offset 0 into fresh tables and swaps
//! it in while the old one keeps serving.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use projections::replay::ReplayReport;
use projections::resources::ResourceProjection;
use projections::Projection;

use crate::config::BackendArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProjectionName {
    /// The FHIR resource view (current versions and history).
    Resources,
    /// The CDex attachment links (cases, held and linked attachments, closed sets).
    AttachmentLinks,
    /// The member index and the member-match decisions, links and bulk jobs (decisions are
    /// restored from the decisions topic, not made again).
    MemberMatch,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[arg(long, value_enum)]
    pub projection: ProjectionName,
    #[arg(long)]
    pub quiet: bool,
}

pub async fn replay(backend: &BackendArgs, which: ProjectionName, quiet: bool) -> anyhow::Result<ReplayReport> {
    let log = backend.open_log().await?;
    let db = backend.open_db().await?;
    let projection: Arc<dyn Projection> = match which {
        ProjectionName::Resources => Arc::new(ResourceProjection::new(&backend.topic_prefix)),
        ProjectionName::AttachmentLinks => Arc::new(projections::LinkProjection::new(&backend.topic_prefix)),
        // Requests still undecided are decided with the defaults; every decided one is restored.
        ProjectionName::MemberMatch => Arc::new(projections::MemberMatchProjection::new(
            &backend.topic_prefix,
            crate::config::MemberMatchArgs::default().processor_config(),
        )),
    };
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let report = projections::replay::replay(&db, log, projection, move |applied, end| {
        b.set_length(end as u64);
        b.set_position(applied as u64);
    })
    .await?;
    bar.finish();
    Ok(report)
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let r = replay(&args.backend, args.projection, args.quiet).await?;
    println!(
        "{}",
        serde_json::json!({"projection": format!("{:?}", args.projection).to_lowercase(), "events": r.events,
                           "old_generation": r.old_generation, "new_generation": r.new_generation})
    );
    Ok(())
}
