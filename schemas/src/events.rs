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

impl ResourceChange {
    /// An unconditional upsert of `resource` (FHIR JSON) as `resource_type/resource_id`.
    pub fn upsert(resource_type: &str, resource_id: &str, resource: String) -> Self {
        ResourceChange {
            action: ChangeAction::Upsert,
            resource_type: resource_type.to_string(),
            resource_id: resource_id.to_string(),
            resource: Some(resource),
            if_match: None,
            created: false,
        }
    }
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

/// What happened to an attachment set; see `avro/attachment-event/v1.avsc` for which fields each
/// kind fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttachmentEventKind {
    CaseOpened,
    Submitted,
    Fetched,
    Held,
    Linked,
    Rejected,
    /// Content sent by URL could not be fetched; `reason` names the URL and why. Last, as in
    /// the `.avsc` symbols (Avro enums are positional).
    FetchFailed,
}

/// CDex `AttachTo`, and the `Claim.use` of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttachTo {
    Claim,
    Preauthorization,
}

impl AttachTo {
    /// The FHIR code (`claim`, `preauthorization`).
    pub fn code(self) -> &'static str {
        match self {
            AttachTo::Claim => "claim",
            AttachTo::Preauthorization => "preauthorization",
        }
    }

    pub fn from_code(code: &str) -> Option<AttachTo> {
        match code {
            "claim" => Some(AttachTo::Claim),
            "preauthorization" => Some(AttachTo::Preauthorization),
            _ => None,
        }
    }
}

/// A FHIR Identifier reduced to what matching needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub system: Option<String>,
    pub value: String,
}

/// Bytes in the content-addressed blob store (claim check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub sha256: String,
    pub sha1: String,
    pub size: i64,
    pub location: String,
}

/// One attachment inside a Content resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentContent {
    pub path: String,
    pub content_type: Option<String>,
    pub source_url: Option<String>,
    pub blob: Option<Blob>,
}

impl AttachmentContent {
    /// Sent by URL and not fetched yet.
    pub fn awaits_fetch(&self) -> bool {
        self.blob.is_none() && self.source_url.is_some()
    }
}

/// One CDex `Attachment` parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmittedAttachment {
    pub index: i32,
    pub line_items: Vec<String>,
    pub code: Option<String>,
    pub resource_type: String,
    pub resource: String,
    pub document_reference: Option<String>,
    pub content: Vec<AttachmentContent>,
}

impl SubmittedAttachment {
    /// Some of its content was sent by URL and waits for the fetcher.
    pub fn awaits_fetch(&self) -> bool {
        self.content.iter().any(AttachmentContent::awaits_fetch)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentEvent {
    pub envelope: Envelope,
    pub kind: AttachmentEventKind,
    pub tracking_id: String,
    pub submission_id: Option<String>,
    pub attach_to: Option<AttachTo>,
    pub member_id: Option<Identifier>,
    pub payer_id: Option<Identifier>,
    pub organization_id: Option<Identifier>,
    pub provider_id: Option<Identifier>,
    pub admin_ref_number: Option<Identifier>,
    pub service_date: Option<String>,
    #[serde(rename = "final")]
    pub is_final: Option<bool>,
    pub attachments: Vec<SubmittedAttachment>,
    pub case_ref: Option<String>,
    pub case_patient: Option<String>,
    pub case_items: Vec<String>,
    pub case_identifiers: Vec<Identifier>,
    pub case_members: Vec<Identifier>,
    pub unknown_line_items: Vec<String>,
    pub reason: Option<String>,
    pub outcome: Option<String>,
}

impl AttachmentEvent {
    pub const EVENT_TYPE: &'static str = "AttachmentEvent";

    /// An event of `kind` for `tracking_id` with every optional field empty.
    pub fn new(envelope: Envelope, kind: AttachmentEventKind, tracking_id: String) -> Self {
        AttachmentEvent {
            envelope,
            kind,
            tracking_id,
            submission_id: None,
            attach_to: None,
            member_id: None,
            payer_id: None,
            organization_id: None,
            provider_id: None,
            admin_ref_number: None,
            service_date: None,
            is_final: None,
            attachments: Vec::new(),
            case_ref: None,
            case_patient: None,
            case_items: Vec::new(),
            case_identifiers: Vec::new(),
            case_members: Vec::new(),
            unknown_line_items: Vec::new(),
            reason: None,
            outcome: None,
        }
    }

    /// The record key: the tracking id, so a case's story stays in order on one partition.
    pub fn key(&self) -> String {
        self.tracking_id.clone()
    }
}

/// What a `MemberMatchRequested` is: see `avro/member-match-request/v1.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberMatchRequestKind {
    Single,
    BulkMember,
    BulkClosed,
}

/// A `$member-match` request (or one member of a bulk request), as ingest appends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberMatchRequested {
    pub envelope: Envelope,
    pub kind: MemberMatchRequestKind,
    pub request_hash: String,
    pub member_patient: Option<String>,
    pub coverage_to_match: Option<String>,
    pub coverage_to_link: Option<String>,
    pub consent: Option<String>,
    pub problem: Option<String>,
    pub bulk_job: Option<String>,
    pub bulk_index: Option<i32>,
    pub bulk_total: Option<i32>,
    pub requester: Option<String>,
}

impl MemberMatchRequested {
    pub const EVENT_TYPE: &'static str = "MemberMatchRequested";

    /// A request of `kind` with every optional field empty.
    pub fn new(envelope: Envelope, kind: MemberMatchRequestKind, request_hash: String) -> Self {
        MemberMatchRequested {
            envelope,
            kind,
            request_hash,
            member_patient: None,
            coverage_to_match: None,
            coverage_to_link: None,
            consent: None,
            problem: None,
            bulk_job: None,
            bulk_index: None,
            bulk_total: None,
            requester: None,
        }
    }

    /// The record key: the requesting client, so one client's attempts stay in order (the
    /// brute-force counter depends on it).
    pub fn key(&self) -> String {
        member_match_key(self.envelope.client_id.as_deref())
    }
}

/// The key of both member-match topics.
pub fn member_match_key(client_id: Option<&str>) -> String {
    format!("client/{}", client_id.unwrap_or("anonymous"))
}

/// How a member-match request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberMatchOutcome {
    Matched,
    NoMatch,
    MultipleMatches,
    ConsentRefused,
    Throttled,
    Invalid,
    BulkCompleted,
}

impl MemberMatchOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberMatchOutcome::Matched => "MATCHED",
            MemberMatchOutcome::NoMatch => "NO_MATCH",
            MemberMatchOutcome::MultipleMatches => "MULTIPLE_MATCHES",
            MemberMatchOutcome::ConsentRefused => "CONSENT_REFUSED",
            MemberMatchOutcome::Throttled => "THROTTLED",
            MemberMatchOutcome::Invalid => "INVALID",
            MemberMatchOutcome::BulkCompleted => "BULK_COMPLETED",
        }
    }

    /// Every outcome, in the order of the `.avsc` symbols (Avro enums are positional).
    pub const ALL: [MemberMatchOutcome; 7] = [
        MemberMatchOutcome::Matched,
        MemberMatchOutcome::NoMatch,
        MemberMatchOutcome::MultipleMatches,
        MemberMatchOutcome::ConsentRefused,
        MemberMatchOutcome::Throttled,
        MemberMatchOutcome::Invalid,
        MemberMatchOutcome::BulkCompleted,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// A failed attempt for the brute-force counter.
    pub fn is_failed_attempt(self) -> bool {
        matches!(self, MemberMatchOutcome::NoMatch | MemberMatchOutcome::MultipleMatches)
    }
}

/// The decision on one member-match request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberMatchDecided {
    pub envelope: Envelope,
    pub outcome: MemberMatchOutcome,
    pub request_id: String,
    pub request_hash: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub patient_id: Option<String>,
    pub member_identifier_system: Option<String>,
    pub member_identifier_value: Option<String>,
    pub identifiers_hash: Option<String>,
    pub demographics_hash: Option<String>,
    pub consent_policy: Option<String>,
    pub consent_start: Option<String>,
    pub consent_end: Option<String>,
    pub coverage_to_link: Option<String>,
    pub consent: Option<String>,
    pub retry_after_s: Option<i64>,
    pub repeated: bool,
    pub bulk_job: Option<String>,
    pub bulk_index: Option<i32>,
    pub bulk_total: Option<i32>,
}

impl MemberMatchDecided {
    pub const EVENT_TYPE: &'static str = "MemberMatchDecided";

    /// A decision with every optional field empty.
    pub fn new(envelope: Envelope, outcome: MemberMatchOutcome, request_id: String, request_hash: String) -> Self {
        MemberMatchDecided {
            envelope,
            outcome,
            request_id,
            request_hash,
            rule: None,
            reason: None,
            patient_id: None,
            member_identifier_system: None,
            member_identifier_value: None,
            identifiers_hash: None,
            demographics_hash: None,
            consent_policy: None,
            consent_start: None,
            consent_end: None,
            coverage_to_link: None,
            consent: None,
            retry_after_s: None,
            repeated: false,
            bulk_job: None,
            bulk_index: None,
            bulk_total: None,
        }
    }

    pub fn key(&self) -> String {
        member_match_key(self.envelope.client_id.as_deref())
    }
}
