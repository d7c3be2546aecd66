//! Topic names and their keys. The prefix is configurable (`--topic-prefix`), so several payerx
//! installations can share one Kafka cluster; names below are relative to it.

/// Writes as received by ingest (or produced by the payer's own systems), before validation.
/// Key: `{resourceType}/{id}` for single writes and batch entries, `Bundle/{transaction id}` for
/// transactions.
pub const FHIR_SUBMISSIONS: &str = "fhir.submissions";
/// Validated writes, the input of the resource projection. Same key as the submissions.
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
    /// Submissions: the validation rules (`processors::validate_processor::RULES`) that payerx's
    /// own edge (HTTP ingest, `payerx load`) already passed this record through. The validate
    /// processor does not repeat a check with the same rules; without the header, or with other
    /// rules (another payerx version), it validates. Only payerx should write this header, so
    /// give other producers on the submissions topic no way to set it (Kafka ACLs / interceptor).
    pub const VALIDATED: &str = "payerx.validated";
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
