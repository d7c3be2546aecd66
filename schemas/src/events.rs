//! Typed events. Field names follow the `.avsc` files exactly; serde maps between them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The envelope every event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: String,
    pub event_type: String,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
    pub correlation_id: String,
    /// `event_id` of the event this one derives from.
    pub causation_id: Option<String>,
    pub client_id: Option<String>,
    pub schema_version: i32,
}

/// Namespace for deterministic ids of derived events (UUIDv5).
const DERIVED_NS: Uuid = Uuid::from_u128(0x6a1f_4c2e_9b7d_4e0a_8c3f_2d5e_7b91_a0c4);

impl Envelope {
    /// A fresh envelope for an event that starts a flow (a client request).
    pub fn new(event_type: &str, schema_version: i32, correlation_id: String, client_id: Option<String>) -> Self {
        Envelope {
            event_id: Uuid::now_v7().to_string(),
            event_type: event_type.to_string(),
            occurred_at: now_micros(),
            correlation_id,
            causation_id: None,
            client_id,
            schema_version,
        }
    }

    /// The envelope of an event derived from the record at `topic/partition/offset`: its id is a
    /// UUIDv5 of those coordinates and `index`, so a redelivered input produces the same ids.
    pub fn derived(
        &self,
        event_type: &str,
        schema_version: i32,
        topic: &str,
        partition: i32,
        offset: i64,
        index: u32,
    ) -> Self {
        Envelope {
            event_id: derived_event_id(topic, partition, offset, index).to_string(),
            event_type: event_type.to_string(),
            // Kept from the input, so a redelivery derives exactly the same event.
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(self.event_id.clone()),
            client_id: self.client_id.clone(),
            schema_version,
        }
    }

    /// The event a client waits on: the one that started this flow.
    pub fn origin_id(&self) -> &str {
        self.causation_id.as_deref().unwrap_or(&self.event_id)
    }
}

pub fn derived_event_id(topic: &str, partition: i32, offset: i64, index: u32) -> Uuid {
    Uuid::new_v5(&DERIVED_NS, format!("{topic}/{partition}/{offset}/{index}").as_bytes())
}

pub fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WriteMode {
    Single,
    BatchEntry,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeAction {
    Upsert,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceChange {
    pub action: ChangeAction,
    pub resource_type: String,
    pub resource_id: String,
    /// JSON text of the resource (UPSERT only).
    pub resource: Option<String>,
    pub if_match: Option<i64>,
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceChanged {
    pub envelope: Envelope,
    pub mode: WriteMode,
    pub changes: Vec<ResourceChange>,
}

impl ResourceChanged {
    pub const EVENT_TYPE: &'static str = "ResourceChanged";

    /// The record key: the resource for a single change, the transaction for a transaction.
    pub fn key(&self) -> String {
        match (self.mode, self.changes.as_slice()) {
            (WriteMode::Transaction, _) | (_, []) => {
                format!("Bundle/{}", self.envelope.correlation_id)
            }
            (_, [first, ..]) => format!("{}/{}", first.resource_type, first.resource_id),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditOutcome {
    Success,
    Failure,
}

/// An audit record: a token issued or refused, or a FHIR data access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecorded {
    pub envelope: Envelope,
    pub action: String,
    pub outcome: AuditOutcome,
    pub http_status: Option<i32>,
    pub client_id: Option<String>,
    pub subject: Option<String>,
    pub patient: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub request: Option<String>,
    pub scope: Option<String>,
    pub detail: String,
}

impl AuditRecorded {
    pub const EVENT_TYPE: &'static str = "AuditRecorded";

    /// Keyed by the patient whose data it concerns, else by the client.
    pub fn key(&self) -> String {
        match (&self.patient, &self.client_id) {
            (Some(p), _) => format!("Patient/{p}"),
            (None, Some(c)) => format!("client/{c}"),
            (None, None) => "anonymous".into(),
        }
    }
}
