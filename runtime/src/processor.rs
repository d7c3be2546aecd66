//! The runtime that moves events through processors. A processor is a pure function from one
//! input record to output records; this loop owns everything else: consuming in a group,
//! retrying what may succeed later, dead-lettering what never will, appending outputs and only
//! then committing the input offsets (at-least-once; outputs carry deterministic ids so
//! consumers dedupe a redelivery).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use schemas::topics::headers;
use tokio_util::sync::CancellationToken;

use crate::log::{Consumed, Log, LogError, Record};

/// Why a processor could not handle a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessError {
    /// May succeed later (a dependency is down): the runtime backs off and retries the record.
    #[error("retriable: {0}")]
    Retriable(String),
    /// Never will succeed: the record goes to the stage's dead-letter topic with the reason.
    #[error("permanent: {reason}")]
    Permanent {
        reason: String,
        /// A FHIR OperationOutcome (JSON) for the submitter, carried in a header.
        outcome: Option<String>,
    },
}

/// A pure stream processor.
pub trait Processor: Send + Sync + 'static {
    /// Stage name; the consumer group is `{group_prefix}{name}`.
    fn name(&self) -> &str;
    /// Full names of the topics it reads.
    fn inputs(&self) -> Vec<String>;
    /// Full name of its dead-letter topic.
    fn dead_letter_topic(&self) -> String;
    /// The outputs for one input. Must be deterministic (same input, same outputs) so a
    /// redelivery is harmless.
    fn process(&self, input: &Consumed) -> Result<Vec<Record>, ProcessError>;
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub group_prefix: String,
    pub max_batch: usize,
    pub poll_wait: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            group_prefix: "payerx.".into(),
            max_batch: 2000,
            poll_wait: Duration::from_millis(200),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The dead-letter copy of a record: same key and value, original headers plus the reason.
pub fn dead_letter(input: &Consumed, dlq_topic: &str, stage: &str, reason: &str, outcome: Option<&str>) -> Record {
    let mut r = Record {
        topic: dlq_topic.to_string(),
        key: input.key.clone(),
        value: input.value.clone(),
        headers: input.headers.clone(),
    };
    r.headers.push((headers::ERROR_REASON.into(), reason.as_bytes().to_vec()));
    r.headers.push((headers::ERROR_STAGE.into(), stage.as_bytes().to_vec()));
    r.headers.push((headers::ERROR_SOURCE.into(), input.coordinates().into_bytes()));
    if let Some(o) = outcome {
        r.headers.push((headers::ERROR_OUTCOME.into(), o.as_bytes().to_vec()));
    }
    r
}

/// Runs `processor` until `shutdown` is cancelled. On cancellation it finishes the batch in hand
/// (outputs appended, offsets committed) and returns: SIGTERM drains, it does not drop work.
pub async fn run(
    log: Arc<dyn Log>,
    processor: Arc<dyn Processor>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), LogError> {
    let stage = processor.name().to_string();
    let group = format!("{}{}", opts.group_prefix, stage);
    let inputs = processor.inputs();
    let mut consumer = retry(&opts, &shutdown, || log.group_consumer(&group, &inputs)).await?;
    let dlq = processor.dead_letter_topic();
    tracing::info!(stage, group, "processor started");
    while !shutdown.is_cancelled() {
        let batch = tokio::select! {
            r = consumer.poll(opts.max_batch, opts.poll_wait) => r,
            _ = shutdown.cancelled() => break,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) if e.is_retriable() => {
                tracing::warn!(stage, error = %e, "poll failed, retrying");
                tokio::time::sleep(opts.initial_backoff).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if batch.is_empty() {
            continue;
        }
        let mut outputs = Vec::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut interrupted = false;
        for input in &batch {
            let mut backoff = opts.initial_backoff;
            let result = loop {
                match processor.process(input) {
                    Err(ProcessError::Retriable(msg)) => {
                        metrics::counter!("payerx_processor_retries_total", "stage" => stage.clone()).increment(1);
                        tracing::warn!(stage, source = input.coordinates(), error = msg, ?backoff, "retriable failure");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => break None,
                        }
                        backoff = (backoff * 2).min(opts.max_backoff);
                    }
                    Ok(outs) => break Some(Ok(outs)),
                    Err(ProcessError::Permanent { reason, outcome }) => break Some(Err((reason, outcome))),
                }
            };
            match result {
                None => {
                    // Stop before this record: it is neither processed nor committed.
                    interrupted = true;
                    break;
                }
                Some(Ok(outs)) => outputs.extend(outs),
                Some(Err((reason, outcome))) => {
                    metrics::counter!("payerx_dead_letters_total", "stage" => stage.clone()).increment(1);
                    tracing::info!(stage, source = input.coordinates(), reason, "dead-lettered");
                    outputs.push(dead_letter(input, &dlq, &stage, &reason, outcome.as_deref()));
                }
            }
            metrics::counter!("payerx_events_consumed_total", "topic" => input.topic.clone(), "consumer" => stage.clone()).increment(1);
            next.insert((input.topic.clone(), input.partition), input.offset + 1);
        }
        let outputs_ref = &outputs;
        if !outputs.is_empty() {
            retry(&opts, &CancellationToken::new(), || log.append(outputs_ref.clone())).await?;
            for r in &outputs {
                metrics::counter!("payerx_events_appended_total", "topic" => r.topic.clone()).increment(1);
            }
        }
        let offsets: Vec<(String, i32, i64)> = next.into_iter().map(|((t, p), o)| (t, p, o)).collect();
        commit(&mut *consumer, &opts, &offsets).await?;
        if interrupted {
            break;
        }
    }
    tracing::info!(stage, "processor stopped");
    Ok(())
}

/// Commits a group's offsets, retrying with backoff while the failure is retriable (a commit
/// that never lands would redeliver everything after a restart). Nothing to commit is a no-op.
pub async fn commit(
    consumer: &mut dyn crate::log::Consumer,
    opts: &RunOptions,
    offsets: &[(String, i32, i64)],
) -> Result<(), LogError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut backoff = opts.initial_backoff;
    loop {
        match consumer.commit(offsets).await {
            Err(e) if e.is_retriable() => {
                tracing::warn!(error = %e, ?backoff, "offset commit failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            other => return other,
        }
    }
}

/// Retries a log operation with exponential backoff while it fails with a retriable error.
/// Gives up early only when `cancel` fires.
pub async fn retry<T, F, Fut>(opts: &RunOptions, cancel: &CancellationToken, mut f: F) -> Result<T, LogError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LogError>>,
{
    let mut backoff = opts.initial_backoff;
    loop {
        match f().await {
            Err(e) if e.is_retriable() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, ?backoff, "log operation failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::embedded::EmbeddedLog;
    use crate::TopicSpec;

    /// Echoes "ok*" records to `out`, fails "retry" records retriably twice, refuses "bad".
    struct Echo {
        attempts: AtomicUsize,
    }

    impl Processor for Echo {
        fn name(&self) -> &str {
            "echo"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn dead_letter_topic(&self) -> String {
            "in.dlq".into()
        }
        fn process(&self, input: &Consumed) -> Result<Vec<Record>, ProcessError> {
            match input.value.as_slice() {
                b"retry" if self.attempts.fetch_add(1, Ordering::SeqCst) < 2 => {
                    Err(ProcessError::Retriable("not yet".into()))
                }
                b"bad" => Err(ProcessError::Permanent { reason: "refused".into(), outcome: Some("{}".into()) }),
                v => Ok(vec![Record::new("out", input.key.clone(), v.to_vec())]),
            }
        }
    }

    async fn read_all(log: &EmbeddedLog, topic: &str, n: usize) -> Vec<Consumed> {
        let mut c = log.assigned_consumer(&[(topic.into(), 0, 0)]).await.unwrap();
        let mut got = vec![];
        for _ in 0..50 {
            got.extend(c.poll(100, Duration::from_millis(100)).await.unwrap());
            if got.len() >= n {
                break;
            }
        }
        got
    }

    #[tokio::test]
    async fn retries_dead_letters_commits_and_drains() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), false).unwrap());
        let specs: Vec<TopicSpec> =
            ["in", "out", "in.dlq"].iter().map(|t| TopicSpec { name: (*t).into(), partitions: 1 }).collect();
        log.ensure_topics(&specs).await.unwrap();
        let values: [&[u8]; 4] = [b"ok1", b"retry", b"bad", b"ok2"];
        log.append(values.iter().map(|v| Record::new("in", "k", v.to_vec())).collect()).await.unwrap();

        let opts = RunOptions {
            initial_backoff: Duration::from_millis(5),
            poll_wait: Duration::from_millis(20),
            ..RunOptions::default()
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            log.clone(),
            Arc::new(Echo { attempts: AtomicUsize::new(0) }),
            opts.clone(),
            stop.clone(),
        ));
        let out = read_all(&log, "out", 3).await;
        assert_eq!(
            out.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
            vec![b"ok1".to_vec(), b"retry".to_vec(), b"ok2".to_vec()]
        );
        let dlq = read_all(&log, "in.dlq", 1).await;
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].value, b"bad");
        assert_eq!(dlq[0].header(headers::ERROR_REASON), Some("refused"));
        assert_eq!(dlq[0].header(headers::ERROR_SOURCE), Some("in/0/2"));
        stop.cancel();
        task.await.unwrap().unwrap();

        // Offsets were committed: a restarted processor sees only what is new.
        log.append(vec![Record::new("in", "k", b"ok3".to_vec())]).await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(log.clone(), Arc::new(Echo { attempts: AtomicUsize::new(9) }), opts, stop.clone()));
        let out = read_all(&log, "out", 4).await;
        assert_eq!(out.len(), 4, "nothing reprocessed, the new record processed");
        assert_eq!(out[3].value, b"ok3");
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
