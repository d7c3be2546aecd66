//! The one error type of the auth crate. On the OAuth endpoints it renders as the RFC 6749 §5.2
//! JSON error (`{error, error_description}`); where a FHIR client meets it (a bearer token
//! refused by the resource server) it renders as an OperationOutcome with a `WWW-Authenticate`
//! challenge (RFC 6750 §3).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::{IssueType, OperationOutcome};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    InvalidRequest(String),
    /// Client authentication failed (unknown client, bad secret or assertion, disabled client).
    #[error("client authentication failed: {0}")]
    InvalidClient(String),
    /// A code, refresh token or credential that is invalid, expired, revoked or not the client's.
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error("unsupported grant_type {0:?}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    AccessDenied(String),
    /// A bearer token that is missing, malformed, expired, revoked or not ours.
    #[error("{0}")]
    InvalidToken(String),
    /// A valid token whose scopes do not grant the request (for the resource server).
    #[error("{0}")]
    InsufficientScope(String),
    #[error("{0}")]
    NotFound(String),
    /// Something payerx depends on (the database, a JWKS endpoint) is unreachable for now.
    #[error("{0}")]
    Unavailable(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<projections::ProjectionError> for AuthError {
    fn from(e: projections::ProjectionError) -> Self {
        match e {
            projections::ProjectionError::Db(e) => AuthError::Db(e),
            other if other.is_retriable() => AuthError::Unavailable(other.to_string()),
            other => AuthError::Internal(other.to_string()),
        }
    }
}

impl AuthError {
    /// The RFC 6749 / 6750 error code.
    pub fn oauth_code(&self) -> &'static str {
        match self {
            AuthError::InvalidRequest(_) | AuthError::NotFound(_) => "invalid_request",
            AuthError::InvalidClient(_) => "invalid_client",
            AuthError::InvalidGrant(_) => "invalid_grant",
            AuthError::UnauthorizedClient(_) => "unauthorized_client",
            AuthError::UnsupportedGrantType(_) => "unsupported_grant_type",
            AuthError::InvalidScope(_) => "invalid_scope",
            AuthError::AccessDenied(_) => "access_denied",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::InsufficientScope(_) => "insufficient_scope",
            AuthError::Unavailable(_) => "temporarily_unavailable",
            AuthError::Db(e) if is_retriable(e) => "temporarily_unavailable",
            AuthError::Db(_) | AuthError::Internal(_) => "server_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::InvalidClient(_) | AuthError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            AuthError::InsufficientScope(_) | AuthError::AccessDenied(_) => StatusCode::FORBIDDEN,
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Db(e) if is_retriable(e) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Db(_) | AuthError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// What the caller is told. Internal details stay in the log.
    pub fn description(&self) -> String {
        match self {
            AuthError::Db(e) if is_retriable(e) => "the authorization database is unavailable; retry later".to_string(),
            AuthError::Db(_) | AuthError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    fn log_if_internal(&self) {
        if matches!(self, AuthError::Db(_) | AuthError::Internal(_)) {
            tracing::error!(error = %self, "authorization server error");
        }
    }

    /// The RFC 6749 §5.2 response of the token, introspection and revocation endpoints.
    /// `basic_attempted`: the client tried HTTP Basic, so `invalid_client` carries a Basic
    /// challenge (§5.2 requires it).
    pub fn oauth_response(&self, basic_attempted: bool) -> Response {
        self.log_if_internal();
        // RFC 6749 asks for 400 on every error except invalid_client (401) and server errors.
        let status = match self {
            AuthError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
            AuthError::Db(_) | AuthError::Internal(_) | AuthError::Unavailable(_) => self.status(),
            _ => StatusCode::BAD_REQUEST,
        };
        let body = json!({"error": self.oauth_code(), "error_description": self.description()});
        let mut resp = (status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        no_store(h);
        if matches!(self, AuthError::InvalidClient(_)) && basic_attempted {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"payerx\""));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        resp
    }

    /// The OperationOutcome a FHIR client gets.
    pub fn to_outcome(&self) -> OperationOutcome {
        let code = match self {
            AuthError::InvalidToken(_) | AuthError::InvalidClient(_) => IssueType::Login,
            AuthError::InsufficientScope(_) | AuthError::AccessDenied(_) | AuthError::UnauthorizedClient(_) => {
                IssueType::Forbidden
            }
            AuthError::NotFound(_) => IssueType::NotFound,
            AuthError::Unavailable(_) => IssueType::Transient,
            AuthError::Db(e) if is_retriable(e) => IssueType::Transient,
            AuthError::Db(_) | AuthError::Internal(_) => IssueType::Exception,
            _ => IssueType::Invalid,
        };
        OperationOutcome::error(code, self.description())
    }

    /// The `WWW-Authenticate` challenge for a refused bearer token (RFC 6750 §3).
    pub fn bearer_challenge(&self) -> Option<String> {
        let desc = self.description().replace(['"', '\\'], "'");
        match self {
            AuthError::InvalidToken(_) => {
                Some(format!("Bearer realm=\"payerx\", error=\"invalid_token\", error_description=\"{desc}\""))
            }
            AuthError::InsufficientScope(_) => {
                Some(format!("Bearer realm=\"payerx\", error=\"insufficient_scope\", error_description=\"{desc}\""))
            }
            _ => None,
        }
    }
}

/// Renders as a FHIR OperationOutcome, for the resource server's endpoints.
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        self.log_if_internal();
        let mut resp = (self.status(), self.to_outcome().to_json().to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json; charset=utf-8"));
        if let Some(challenge) = self.bearer_challenge().and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(header::WWW_AUTHENTICATE, challenge);
        }
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        resp
    }
}

/// `Cache-Control: no-store` and `Pragma: no-cache`: tokens must never be cached (RFC 6749 §5.1).
pub(crate) fn no_store(h: &mut axum::http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn is_retriable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed)
        || e.to_string().contains("database is locked")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn oauth_errors_render_per_rfc6749() {
        let r = AuthError::InvalidGrant("code already used".into()).oauth_response(false);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()[header::PRAGMA], "no-cache");
        let r = AuthError::InvalidClient("bad secret".into()).oauth_response(true);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic"));
        let r = AuthError::InvalidClient("bad assertion".into()).oauth_response(false);
        assert!(!r.headers().contains_key(header::WWW_AUTHENTICATE));
        let r = AuthError::Internal("secret detail".into()).oauth_response(false);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn bearer_errors_render_as_operation_outcome() {
        let r = AuthError::InvalidToken("token expired".into()).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().contains("invalid_token"));
        assert!(r.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/fhir+json"));
        let oo = AuthError::InsufficientScope("no scope for Coverage".into()).to_outcome();
        assert_eq!(oo.to_json()["issue"][0]["code"], "forbidden");
        assert_eq!(AuthError::Internal("x".into()).description(), "internal error");
    }
}
