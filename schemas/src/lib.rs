//! The payerx event contract, shared by every crate: Avro schemas and the typed events they
//! describe, topic names and keys, the Confluent wire framing, and FHIR OperationOutcome builders.
//! Nothing here does IO, so every crate can depend on it cheaply.

pub mod codec;
pub mod compartment;
pub mod events;
pub mod outcome;
pub mod registry;
pub mod smart;
pub mod topics;
pub mod wire;

pub use events::{
    AttachTo, AttachmentContent, AttachmentEvent, AttachmentEventKind, AuditOutcome, AuditRecorded, Blob, ChangeAction,
    Envelope, Identifier, MemberMatchDecided, MemberMatchOutcome, MemberMatchRequestKind, MemberMatchRequested,
    ResourceChange, ResourceChanged, SubmittedAttachment, WriteMode,
};
pub use outcome::{IssueSeverity, IssueType, OperationOutcome};
pub use registry::{decode_event, encode_event, Event, SchemaInfo, SCHEMAS};

/// Errors from encoding or decoding events.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("value is not Confluent-framed: {0}")]
    Framing(String),
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    #[error("avro: {0}")]
    Avro(String),
}

impl From<apache_avro::Error> for SchemaError {
    fn from(e: apache_avro::Error) -> Self {
        SchemaError::Avro(e.to_string())
    }
}
