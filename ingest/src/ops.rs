//! Operations endpoints and request observation: `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use projections::ResourceStore;
use runtime::Log;
use schemas::topics;
use serde_json::json;

use crate::error::ApiError;

/// What the operations endpoints look at; every role has one.
pub struct OpsState {
    pub log: Arc<dyn Log>,
    /// Absent in a processors-only process.
    pub store: Option<Arc<ResourceStore>>,
    pub topic_prefix: String,
    pub metrics: Option<PrometheusHandle>,
    /// Set once start-up (topics, migrations, listeners) is done.
    pub ready: Arc<AtomicBool>,
}

pub type SharedOps = Arc<OpsState>;

/// The admin listener: `/metrics`, `/healthz`, `/readyz`. Kept off the public listener so
/// metrics need no token and are not exposed to API clients.
pub fn admin_router(ops: SharedOps) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Liveness: the process is up and serving.
pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(json!({"status": "ok"})))
}

/// Readiness: start-up finished, and the log and the view store answer.
pub async fn readyz(State(state): State<SharedOps>) -> Response {
    let mut checks = serde_json::Map::new();
    let started = state.ready.load(Ordering::Acquire);
    checks.insert("startup".into(), json!(if started { "ok" } else { "starting" }));
    let log_ok = match state.log.partitions(&topics::full(&state.topic_prefix, topics::FHIR_CHANGES)).await {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    let db_ok = match &state.store {
        Some(store) => Some(match store.outcome("00000000-0000-0000-0000-000000000000").await {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }),
        None => None,
    };
    let ready = started && log_ok == "ok" && db_ok.as_deref().is_none_or(|d| d == "ok");
    checks.insert("log".into(), json!(log_ok));
    if let Some(db_ok) = db_ok {
        checks.insert("views".into(), json!(db_ok));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({"status": if ready { "ready" } else { "not ready" }, "checks": checks}))).into_response()
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<SharedOps>) -> Result<Response, ApiError> {
    let Some(h) = &state.metrics else {
        return Err(ApiError::not_found("metrics are not enabled in this process"));
    };
    let mut resp = h.render().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    Ok(resp)
}

/// Records request latency by route and status, and logs each request.
pub async fn observe(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    metrics::histogram!("payerx_http_request_duration_seconds", "method" => method.to_string(), "route" => route.clone(), "status" => status.to_string())
        .record(elapsed.as_secs_f64());
    tracing::debug!(%method, route, status, elapsed_ms = elapsed.as_millis() as u64, "request");
    resp
}
