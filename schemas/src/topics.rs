//! Topic names and their keys. The prefix is configurable (`--topic-prefix`), so several payerx
//! installations can share one Kafka cluster; names below are relative to it.

/// Writes still to be checked: those the payer's own systems produce, and the resources payerx
/// derives itself (attachment DocumentReferences, bulk-match Groups). The validate processor
/// forwards the well-formed ones to [`FHIR_CHANGES`]. Key: `{resourceType}/{id}` for single
/// writes and batch entries, `Bundle/{transaction id}` for transactions.
pub const FHIR_SUBMISSIONS: &str = "fhir.submissions";
/// Every accepted write, the input of the resource projection: the writes payerx's edges (the
/// HTTP API, `payerx load`) checked before appending them here, and the submissions the validate
/// processor passed. Same keys as the submissions.
pub const FHIR_CHANGES: &str = "fhir.changes";
/// Dead letters of the validate processor: the original value, with the reason in headers.
pub const VALIDATE_DLQ: &str = "fhir.submissions.dlq";

/// Audit records (`AuditRecorded`): tokens issued or refused, every FHIR data access. Key: the
/// patient (`Patient/{id}`) when there is one, else `client/{client_id}`.
pub const AUDIT: &str = "audit";

/// Attachment sets (Da Vinci CDex), `AttachmentEvent`: cases opened, submissions, fetches, held,
/// linked and rejected attachments. Key: the tracking id.
pub const ATTACHMENTS: &str = "attachments";
/// Dead letters of the attachment-link projection.
pub const ATTACHMENTS_DLQ: &str = "attachments.dlq";

/// `$member-match` and `$bulk-member-match` requests (`MemberMatchRequested`), with the
/// requester's demographics (PHI). Key: `client/{client_id}`.
pub const MEMBER_MATCH_REQUESTS: &str = "member-match.requests";
/// Member-match decisions (`MemberMatchDecided`): outcome, rule, hashed inputs, and for matches
/// the CoverageToLink and Consent later data requests are judged by. Key: `client/{client_id}`.
pub const MEMBER_MATCH_DECISIONS: &str = "member-match.decisions";
/// Dead letters of the member-match projection (undecodable requests).
pub const MEMBER_MATCH_DLQ: &str = "member-match.requests.dlq";

/// Every topic payerx creates at start-up, with its value schema name (DLQs carry the value of
/// their input topic).
pub const ALL: &[(&str, &str)] = &[
    (FHIR_SUBMISSIONS, "ResourceChanged"),
    (FHIR_CHANGES, "ResourceChanged"),
    (VALIDATE_DLQ, "ResourceChanged"),
    (AUDIT, "AuditRecorded"),
    (ATTACHMENTS, "AttachmentEvent"),
    (ATTACHMENTS_DLQ, "AttachmentEvent"),
    (MEMBER_MATCH_REQUESTS, "MemberMatchRequested"),
    (MEMBER_MATCH_DECISIONS, "MemberMatchDecided"),
    (MEMBER_MATCH_DLQ, "MemberMatchRequested"),
];

/// Header names used on every record. Values are UTF-8.
pub mod headers {
    pub const EVENT_TYPE: &str = "payerx.event-type";
    pub const CORRELATION_ID: &str = "payerx.correlation-id";
    pub const EVENT_ID: &str = "payerx.event-id";
    /// Dead letters: why the record could not be processed.
    pub const ERROR_REASON: &str = "payerx.error.reason";
    /// Dead letters: the stage that refused it.
    pub const ERROR_STAGE: &str = "payerx.error.stage";
    /// Dead letters: JSON OperationOutcome describing the problem.
    pub const ERROR_OUTCOME: &str = "payerx.error.outcome";
    /// Dead letters: where the record came from, `topic/partition/offset`.
    pub const ERROR_SOURCE: &str = "payerx.error.source";
}

/// A full topic name: `prefix` + relative name. An empty prefix is allowed.
pub fn full(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}
