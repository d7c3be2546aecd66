//! The HTTP edge of payerx. Thin by design: it authenticates, bounds and parses requests, rejects
//! what is malformed with an OperationOutcome, appends events, and answers — from the
//! projections' query side for reads, and from the recorded write outcome for writes. It never
//! writes a view.

pub mod access;
pub mod attachment_body;
pub mod audit;
pub mod bundle;
pub mod capability;
pub mod cdex;
pub mod error;
pub mod fhir;
pub mod member_match;
pub mod ops;
pub mod pas;
pub mod search;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use projections::{ResourceStore, WriteNotifier};
use runtime::Log;

pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub topic_prefix: String,
    /// How long a write waits for the read view before answering 202 with a status link.
    pub write_wait: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest `$submit-attachment` request (its bytes stream to the blob store).
    pub max_attachment_request_bytes: u64,
    /// Public base URL (e.g. `https://payer.example/`); derived from the request when unset.
    pub base_url: Option<String>,
    /// How long `$member-match` awaits the processor's decision before answering 503.
    pub member_match_deadline: Duration,
    /// Largest `$bulk-member-match` request (its members stream onto the log).
    pub max_bulk_member_match_bytes: u64,
    /// Consent policy URIs this payer honours (listed in the CapabilityStatement).
    pub consent_policies: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            topic_prefix: "payerx.".into(),
            write_wait: Duration::from_secs(5),
            max_body_bytes: 16 * 1024 * 1024,
            max_attachment_request_bytes: 100 * 1000 * 1000,
            base_url: None,
            member_match_deadline: Duration::from_secs(5),
            max_bulk_member_match_bytes: 256 * 1000 * 1000,
            consent_policies: vec![processors::member_match::POLICY_REGULAR.to_string()],
        }
    }
}

pub struct AppState {
    pub log: Arc<dyn Log>,
    pub store: Arc<ResourceStore>,
    /// CDex attachment sets: cases, link status, who holds each blob.
    pub links: projections::LinkStore,
    /// Attachment bytes, by SHA-256.
    pub blobs: blobs::BlobStore,
    pub notifier: Arc<WriteNotifier>,
    /// Member-match decisions awaited by this process.
    pub replies: Arc<member_match::MatchReplies>,
    /// Bulk member-match jobs and member links.
    pub matches: projections::MemberMatchStore,
    pub config: IngestConfig,
    pub ops: ops::SharedOps,
    pub audit: audit::AuditLog,
    /// Verifies bearer tokens; `None` only with `--insecure-no-auth`.
    pub verifier: Option<Arc<dyn access::TokenVerifier>>,
    /// The SMART discovery document served at `/fhir/.well-known/smart-configuration` (and
    /// summarised in the CapabilityStatement); `None` without authorization.
    pub smart_configuration: Option<serde_json::Value>,
}

pub type SharedState = Arc<AppState>;

// `/Binary/{id}` has a route of its own for GET (attachment bytes); writes stay generic.
async fn binary_update(
    state: axum::extract::State<SharedState>,
    caller: access::Caller,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Body,
) -> Result<axum::response::Response, error::ApiError> {
    fhir::update(state, caller, headers, axum::extract::Path(("Binary".into(), id)), body).await
}

async fn binary_delete(
    state: axum::extract::State<SharedState>,
    caller: access::Caller,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::response::Response, error::ApiError> {
    fhir::delete(state, caller, headers, axum::extract::Path(("Binary".into(), id))).await
}

/// The whole HTTP API.
pub fn router(state: SharedState) -> Router {
    let fhir = Router::new()
        .route("/metadata", get(capability::metadata))
        .route("/", post(bundle::batch_or_transaction))
        .route("/_writes/{event_id}", get(write::write_status))
        .route("/$submit-attachment", post(cdex::submit_attachment))
        .route("/Claim/$submit", post(pas::submit))
        .route("/Patient/$member-match", post(member_match::member_match))
        .route("/Group/$bulk-member-match", post(member_match::bulk_member_match))
        .route("/bulk-member-match-status/{job}", get(member_match::bulk_status))
        .route("/bulk-member-match-status/{job}/{file}", get(member_match::bulk_output))
        .route("/Claim/{id}/$attachments", get(cdex::case_view))
        .route("/Binary/{id}", get(cdex::binary).put(binary_update).delete(binary_delete))
        .route("/{rtype}", post(fhir::create).get(search::search_get))
        .route("/{rtype}/_search", post(search::search_post))
        .route("/{rtype}/{id}", get(fhir::read).put(fhir::update).delete(fhir::delete))
        .route("/{rtype}/{id}/_history", get(fhir::history))
        .route("/{rtype}/{id}/_history/{vid}", get(fhir::vread))
        .route("/.well-known/smart-configuration", get(capability::smart_configuration))
        .fallback(fhir::unknown_route)
        .method_not_allowed_fallback(fhir::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::authenticate));
    let probes = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .with_state(state.ops.clone());
    Router::new()
        .nest("/fhir", fhir)
        // Bodies are bounded by our own reader (413 with an OperationOutcome), not axum's default.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
        .merge(probes)
        .layer(axum::middleware::from_fn(ops::observe))
}
