//! Joins the authorization server (`auth`) to the resource server (`ingest`): bearer tokens are
//! verified by `auth`, scopes answer ingest's questions, and the authorization server's security
//! events go to the audit topic.

use std::sync::Arc;

use async_trait::async_trait;
use auth::{AuditRecord, AuditSink, AuthServer, Context, Interaction, ScopeSet};
use ingest::access::{self, Grants, Principal, Rejected, ScopeContext, TokenVerifier};
use ingest::audit::{AuditEntry, AuditLog};

struct Scopes(ScopeSet);

fn interaction(i: access::Interaction) -> Interaction {
    match i {
        access::Interaction::Create => Interaction::Create,
        access::Interaction::Read => Interaction::Read,
        access::Interaction::Update => Interaction::Update,
        access::Interaction::Delete => Interaction::Delete,
        access::Interaction::Search => Interaction::Search,
    }
}

fn context(c: Context) -> ScopeContext {
    match c {
        Context::Patient => ScopeContext::Patient,
        Context::User => ScopeContext::User,
        Context::System => ScopeContext::System,
    }
}

impl Grants for Scopes {
    fn contexts_allowing(&self, resource_type: &str, i: access::Interaction) -> Vec<ScopeContext> {
        self.0.contexts_allowing(resource_type, interaction(i)).into_iter().map(context).collect()
    }

    fn has_context(&self, c: ScopeContext) -> bool {
        let c = match c {
            ScopeContext::Patient => Context::Patient,
            ScopeContext::User => Context::User,
            ScopeContext::System => Context::System,
        };
        self.0.has_context(c)
    }
}

/// Bearer tokens checked by payerx's own authorization server (and its external issuer).
pub struct Verifier(pub Arc<AuthServer>);

#[async_trait]
impl TokenVerifier for Verifier {
    async fn verify(&self, bearer: &str) -> Result<Principal, Rejected> {
        let p = self.0.verify_bearer(bearer).await.map_err(|e| Rejected(e.to_string()))?;
        Ok(Principal {
            client_id: p.client_id,
            subject: p.sub,
            patient: p.patient,
            fhir_user: p.fhir_user,
            scope: p.scopes.to_string(),
            grants: Arc::new(Scopes(p.scopes)),
        })
    }
}

/// The authorization server's security events, onto `payerx.audit`.
pub struct AuditTopic(pub AuditLog);

impl AuditSink for AuditTopic {
    fn record(&self, e: AuditRecord) {
        self.0.record_now(AuditEntry {
            action: e.action,
            success: e.outcome == "success",
            client_id: e.client_id,
            subject: e.sub,
            patient: e.patient,
            scope: e.scope,
            detail: e.detail,
            ..AuditEntry::default()
        });
    }
}
