//! `payerx events`: prints the events of a topic as JSON lines, decoded with the published
//! schemas (the same thing a consumer outside payerx does with the `.avsc` files).

use std::io::Write;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Map, Value};

use crate::config::BackendArgs;

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Topic, with or without the prefix (e.g. `fhir.changes` or `payerx.fhir.changes`).
    #[arg(long)]
    pub topic: String,
    /// Start at the first event instead of the end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Keep printing new events until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
}

pub fn render(r: &runtime::Consumed) -> Value {
    let headers: Map<String, Value> =
        r.headers.iter().map(|(k, v)| (k.clone(), Value::String(String::from_utf8_lossy(v).into_owned()))).collect();
    let mut out = json!({
        "topic": r.topic, "partition": r.partition, "offset": r.offset, "key": r.key,
        "timestamp_ms": r.timestamp_ms, "headers": headers,
    });
    match schemas::registry::decode_to_json(&r.value) {
        Ok((id, name, value)) => {
            out["schema_id"] = json!(id);
            out["type"] = json!(name);
            out["value"] = value;
        }
        Err(e) => out["decode_error"] = json!(e.to_string()),
    }
    out
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let log = args.backend.open_log().await?;
    let topic = if args.topic.starts_with(&args.backend.topic_prefix) {
        args.topic.clone()
    } else {
        schemas::topics::full(&args.backend.topic_prefix, &args.topic)
    };
    let parts = log.partitions(&topic).await?;
    let ends = log.end_offsets(&topic).await?;
    let assignment: Vec<(String, i32, i64)> = (0..parts)
        .map(|p| (topic.clone(), p, if args.from_beginning { 0 } else { ends.get(p as usize).copied().unwrap_or(0) }))
        .collect();
    let mut consumer = log.assigned_consumer(&assignment).await?;
    // Without --follow, stop once every partition is read up to where it ended at start.
    let mut position: Vec<i64> = assignment.iter().map(|(_, _, o)| *o).collect();
    let caught_up = |position: &[i64]| position.iter().zip(&ends).all(|(p, e)| p >= e);
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    while args.follow || !caught_up(&position) {
        let batch = consumer.poll(500, Duration::from_millis(300)).await?;
        let mut out = stdout.lock();
        for r in &batch {
            if let Some(p) = position.get_mut(r.partition as usize) {
                *p = r.offset + 1;
            }
            writeln!(out, "{}", render(r))?;
            printed += 1;
            if args.limit.is_some_and(|l| printed >= l) {
                return Ok(());
            }
        }
    }
    Ok(())
}
