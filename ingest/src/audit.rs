//! The audit trail: every token issued or refused and every FHIR data access becomes an
//! `AuditRecorded` event on `payerx.audit`. Records are appended in batches by a background task,
//! so a read does not wait for a log commit; when the log falls behind, callers wait (the channel
//! is bounded) rather than records being dropped.

use std::sync::Arc;
use std::time::Duration;

use runtime::{Log, Record};
use schemas::topics::{self, headers};
use schemas::{AuditOutcome, AuditRecorded, Envelope};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Records waiting to be appended, at most.
const QUEUE: usize = 10_000;
/// Records per append.
const BATCH: usize = 2000;
/// How long the appender waits for a batch to fill: the most an audit record waits for the log.
const LINGER: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct AuditLog {
    /// The entry and when it happened; the envelope (ids) and the encoding are made by the
    /// appender, off the request path.
    tx: mpsc::Sender<(AuditEntry, i64)>,
}

/// What to record; the envelope is added here.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub action: String,
    pub success: bool,
    pub http_status: Option<u16>,
    pub client_id: Option<String>,
    pub subject: Option<String>,
    pub patient: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub request: Option<String>,
    pub scope: Option<String>,
    pub detail: String,
    pub correlation_id: Option<String>,
}

impl AuditEntry {
    fn into_event(self, occurred_at: i64) -> AuditRecorded {
        let corr = self.correlation_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut envelope = Envelope::new(AuditRecorded::EVENT_TYPE, 1, corr, self.client_id.clone());
        envelope.occurred_at = occurred_at;
        AuditRecorded {
            envelope,
            action: self.action,
            outcome: if self.success { AuditOutcome::Success } else { AuditOutcome::Failure },
            http_status: self.http_status.map(i32::from),
            client_id: self.client_id,
            subject: self.subject,
            patient: self.patient,
            resource_type: self.resource_type,
            resource_id: self.resource_id,
            request: self.request,
            scope: self.scope,
            detail: self.detail,
        }
    }
}

impl AuditLog {
    /// Starts the appender. It drains what is queued and stops once every `AuditLog` clone is
    /// dropped.
    pub fn start(log: Arc<dyn Log>, topic_prefix: &str) -> (AuditLog, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let topic = topics::full(topic_prefix, topics::AUDIT);
        (AuditLog { tx }, tokio::spawn(append_loop(log, topic, rx)))
    }

    /// Queues a record, waiting while the queue is full.
    pub async fn record(&self, entry: AuditEntry) {
        if self.tx.send((entry, schemas::events::now_micros())).await.is_err() {
            tracing::error!("audit appender stopped; audit record lost");
            metrics::counter!("payerx_audit_lost_total").increment(1);
        }
    }

    /// Queues a record from synchronous code; when the queue is full a task waits for room.
    pub fn record_now(&self, entry: AuditEntry) {
        match self.tx.try_send((entry, schemas::events::now_micros())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(ev).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit appender stopped; audit record lost");
                metrics::counter!("payerx_audit_lost_total").increment(1);
            }
        }
    }
}

async fn append_loop(log: Arc<dyn Log>, topic: String, mut rx: mpsc::Receiver<(AuditEntry, i64)>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // Linger a moment for more: one append per record would wake the log writer (and pay a
        // commit) on every API request.
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = &mut linger => break,
            }
        }
        let records: Vec<Record> = batch
            .drain(..)
            .map(|(entry, at)| {
                let ev = entry.into_event(at);
                Record::new(topic.clone(), ev.key(), schemas::codec::encode_audit_recorded(&ev))
                    .header(headers::EVENT_TYPE, AuditRecorded::EVENT_TYPE)
                    .header(headers::EVENT_ID, ev.envelope.event_id.clone())
                    .header(headers::CORRELATION_ID, ev.envelope.correlation_id.clone())
            })
            .collect();
        let n = records.len() as u64;
        let mut backoff = Duration::from_millis(50);
        // Audit records are kept while the log may still take them; a permanent refusal (a
        // missing topic, a misconfiguration) is reported loudly instead of blocking shutdown.
        loop {
            match log.append(records.clone()).await {
                Ok(_) => {
                    metrics::counter!("payerx_events_appended_total", "topic" => topic.clone()).increment(n);
                    break;
                }
                Err(e) if e.is_retriable() => {
                    tracing::warn!(error = %e, ?backoff, "audit append failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %e, records = n, "audit records refused by the log and lost");
                    metrics::counter!("payerx_audit_lost_total").increment(n);
                    break;
                }
            }
        }
    }
}
