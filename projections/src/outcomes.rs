//! Write outcomes: what became of each write event, recorded by the projection that applied (or
//! refused) it, and handed to the ingest request waiting for it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The outcome of one change inside a write event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryOutcome {
    /// HTTP status for this entry (200, 201, 204, 400, 412, …).
    pub status: u16,
    pub resource_type: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// OperationOutcome JSON, when the entry failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<serde_json::Value>,
}

/// The outcome of a write event (one request, one batch entry, or one transaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub status: u16,
    pub entries: Vec<EntryOutcome>,
    /// OperationOutcome JSON for the whole event, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<serde_json::Value>,
}

/// In-process hand-off from the projection to waiting requests. Requests in another process
/// (split roles) poll `write_outcomes` instead.
#[derive(Default)]
pub struct WriteNotifier {
    waiters: Mutex<HashMap<String, oneshot::Sender<WriteOutcome>>>,
}

impl WriteNotifier {
    pub fn register(&self, event_id: &str) -> oneshot::Receiver<WriteOutcome> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(event_id.to_string(), tx);
        }
        rx
    }

    pub fn forget(&self, event_id: &str) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(event_id);
        }
    }

    /// Called after the transaction that recorded these outcomes committed.
    pub fn complete(&self, outcomes: Vec<(String, WriteOutcome)>) {
        if outcomes.is_empty() {
            return;
        }
        let Ok(mut w) = self.waiters.lock() else {
            return;
        };
        if w.is_empty() {
            return;
        }
        for (id, o) in outcomes {
            if let Some(tx) = w.remove(&id) {
                let _ = tx.send(o);
            }
        }
    }
}
