//! `GET /fhir/metadata`: a CapabilityStatement that states exactly what this build implements.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::error::fhir_response;
use crate::fhir::base_url;
use crate::SharedState;

pub fn capability_statement(base: &str, max_body_bytes: usize) -> Value {
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "history-instance"},
        {"code": "update"}, {"code": "create"}, {"code": "delete"}
    ]);
    let resources: Vec<Value> = processors::validate::resource_types()
        .map(|t| {
            json!({
                "type": t,
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": false,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported"
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "software": {"name": "payerx", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "payerx payer interoperability platform", "url": format!("{base}/fhir")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": format!(
                "Every write becomes an event on the log and is answered once the read view shows it; if that takes longer than the \
                 configured wait, the answer is 202 with a Content-Location to poll. Request bodies are limited to {max_body_bytes} bytes \
                 (413 beyond); Bundles to 10000 entries. Search is not implemented yet."
            ),
            "resource": resources,
            "interaction": [
                {"code": "batch", "documentation": "Each entry is applied on its own; POST, PUT and DELETE entries."},
                {"code": "transaction", "documentation": "All entries apply together or none does; urn:uuid fullUrls are resolved."}
            ]
        }]
    })
}

pub async fn metadata(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let base = base_url(&state, &headers);
    fhir_response(StatusCode::OK, &capability_statement(&base, state.config.max_body_bytes))
}
