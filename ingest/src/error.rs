//! The one error type of the HTTP edge: every failure renders as a FHIR OperationOutcome with the
//! right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::{IssueType, OperationOutcome};

pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub outcome: OperationOutcome,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueType, msg: impl Into<String>) -> Self {
        ApiError { status, outcome: OperationOutcome::error(code, msg), retry_after: None }
    }

    pub fn with_outcome(status: StatusCode, outcome: OperationOutcome) -> Self {
        ApiError { status, outcome, retry_after: None }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.outcome = self.outcome.at(expression);
        self
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, IssueType::Invalid, msg)
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueType::NotFound, msg)
    }

    /// The log or the view store is unreachable for now: the client may retry.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            outcome: OperationOutcome::error(IssueType::Transient, msg),
            retry_after: Some(2),
        }
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        tracing::error!(error = %msg, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, IssueType::Exception, format!("internal error: {msg}"))
    }
}

impl From<projections::ProjectionError> for ApiError {
    fn from(e: projections::ProjectionError) -> Self {
        if let projections::ProjectionError::Search(issue) = e {
            return issue.into();
        }
        if e.is_retriable() {
            ApiError::unavailable(format!("the read view is unavailable: {e}"))
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<runtime::LogError> for ApiError {
    fn from(e: runtime::LogError) -> Self {
        if e.is_retriable() {
            ApiError::unavailable(format!("the event log is unavailable: {e}"))
        } else {
            ApiError::internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = fhir_response(self.status, &self.outcome.to_json());
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// A FHIR JSON response.
pub fn fhir_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json; charset=utf-8"));
    resp
}

/// A FHIR JSON response from an already serialized body.
pub fn fhir_raw(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json; charset=utf-8"));
    resp
}
