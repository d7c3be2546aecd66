//! payerx's SMART on FHIR authorization server (SMART App Launch 2.x) and the token check the
//! FHIR endpoints rely on.
//!
//! - Standalone patient launch: authorization code + PKCE `S256` with a login and a consent page
//!   (`/auth/authorize`, `/auth/login`, `/auth/consent`).
//! - `/auth/token`: `authorization_code`, `refresh_token` (rotating), `client_credentials`
//!   (SMART Backend Services). Clients are public, `client_secret_basic` or `private_key_jwt`
//!   (RS384 / ES384 assertions, RFC 7523).
//! - `/auth/introspect` (RFC 7662, callers authenticate as a confidential client),
//!   `/auth/revoke` (RFC 7009), `/auth/jwks`, `/auth/.well-known/openid-configuration`.
//! - [`AuthServer::verify_bearer`]: payerx's own access tokens (ES256 JWTs) and, optionally, those
//!   of one external OpenID provider ([`ExternalIssuer`]).
//!
//! Everything lives in the views database (SQLite or PostgreSQL) in `auth_*` tables that
//! [`admin::init`] creates; see `store.rs` for what each holds.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub mod admin;
mod authorize;
mod crypto;
mod error;
mod jwks;
mod keys;
mod pages;
pub mod scopes;
mod server;
mod store;
mod token;

pub use admin::{ClientCreated, ClientInfo, ClientKind, MemberCreated, NewClient, OrganizationId};
pub use error::AuthError;
pub use keys::PUBLISHED_KEYS;
pub use scopes::{Context, Interaction, Scope, ScopeSet};
pub use server::AuthServer;
pub use store::init;

/// How the authorization server is set up.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The public base URL, e.g. `http://127.0.0.1:8080`: the FHIR base is `{base_url}/fhir`
    /// (the `aud` of every access token), the issuer `{base_url}/auth`.
    pub base_url: String,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime, renewed on every use (so: how long an unused grant lives).
    pub refresh_ttl: Duration,
    /// Authorization code lifetime.
    pub code_ttl: Duration,
    /// Another OpenID provider whose access tokens payerx also accepts.
    pub external: Option<ExternalIssuer>,
}

impl AuthConfig {
    /// The defaults: access tokens for 15 minutes, refresh tokens for 30 days, codes for 60 s.
    pub fn new(base_url: impl Into<String>) -> AuthConfig {
        AuthConfig {
            base_url: base_url.into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            code_ttl: Duration::from_secs(60),
            external: None,
        }
    }
}

/// An external OpenID provider (e.g. the payer's enterprise IdP) whose JWT access tokens
/// [`AuthServer::verify_bearer`] accepts: `iss` must equal `issuer`, `aud` the FHIR base, and the
/// signature must check against a key at `jwks_url` (fetched, cached, fetched again for an
/// unknown `kid`). Its `scope` (or `scp`) and `patient` / `fhirUser` claims are mapped as for
/// payerx's own tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIssuer {
    pub issuer: String,
    pub jwks_url: String,
}

impl ExternalIssuer {
    pub fn new(issuer: impl Into<String>, jwks_url: impl Into<String>) -> ExternalIssuer {
        ExternalIssuer { issuer: issuer.into(), jwks_url: jwks_url.into() }
    }
}

/// Who a verified bearer token speaks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub client_id: String,
    /// The member (payerx tokens: the member's stable id) or, for backend services, the client.
    pub sub: Option<String>,
    /// The patient in context: the bare id (`123`), as in SMART's `patient` launch parameter.
    pub patient: Option<String>,
    /// `Patient/123`: relative to the FHIR base.
    pub fhir_user: Option<String>,
    pub scopes: ScopeSet,
    pub issuer: String,
    pub jti: Option<String>,
    /// `exp`, epoch seconds.
    pub expires_at: i64,
    /// The organizations the client is registered to act for (`payerx clients add
    /// --organization`); empty for a client unknown here.
    pub organizations: Vec<OrganizationId>,
}

/// Receives the security events of the authorization server. `record` must not block: an
/// implementation hands the record to a queue (payerx appends it to the audit topic). Records
/// never hold secrets or tokens.
pub trait AuditSink: Send + Sync {
    fn record(&self, event: AuditRecord);
}

/// One security event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// `token.issued`, `token.refused`, `token.revoked`, `token.reuse_detected`,
    /// `login.succeeded`, `login.failed`, `login.locked`, `consent.approved`, `consent.denied`,
    /// `authorize.refused`.
    pub action: String,
    /// `success` or `failure`.
    pub outcome: String,
    pub client_id: Option<String>,
    pub sub: Option<String>,
    pub patient: Option<String>,
    /// The grant type, or why it was refused.
    pub detail: String,
    pub scope: Option<String>,
}

/// Drops every record (for tools and tests that have no audit topic).
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _event: AuditRecord) {}
}

/// Writes every record to the log as a structured `tracing` event.
pub struct TracingAudit;

impl AuditSink for TracingAudit {
    fn record(&self, e: AuditRecord) {
        tracing::info!(
            target: "payerx::audit",
            action = %e.action,
            outcome = %e.outcome,
            client_id = e.client_id.as_deref().unwrap_or(""),
            sub = e.sub.as_deref().unwrap_or(""),
            patient = e.patient.as_deref().unwrap_or(""),
            scope = e.scope.as_deref().unwrap_or(""),
            detail = %e.detail,
            "audit"
        );
    }
}

/// Keeps the records in memory, for tests.
#[derive(Default)]
pub struct MemoryAudit {
    records: std::sync::Mutex<Vec<AuditRecord>>,
}

impl MemoryAudit {
    pub fn new() -> Arc<MemoryAudit> {
        Arc::new(MemoryAudit::default())
    }

    pub fn records(&self) -> Vec<AuditRecord> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl AuditSink for MemoryAudit {
    fn record(&self, event: AuditRecord) {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}
