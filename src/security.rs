//! Joins the authorization server (`auth`) to the resource server (`ingest`): bearer tokens are
//! verified by `auth`, scopes answer ingest's questions, and the authorization server's security
//! events go to the audit topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use auth::{AuditRecord, AuditSink, AuthServer, ScopeSet};
use ingest::access::{Grants, Principal, Rejected, TokenVerifier};
use ingest::audit::{AuditEntry, AuditLog};
use schemas::smart::{Context, Interaction};

struct Scopes(ScopeSet);

impl Grants for Scopes {
    fn contexts_allowing(&self, resource_type: &str, interaction: Interaction) -> Vec<Context> {
        self.0.contexts_allowing(resource_type, interaction)
    }

    fn has_context(&self, context: Context) -> bool {
        self.0.has_context(context)
    }
}

/// Bearer tokens checked by payerx's own authorization server (and its external issuer).
///
/// A verified token is remembered for `cache_ttl` (and never past its `exp`): verifying means a
/// signature check and two database reads (revoked token, disabled client), which would
/// otherwise cost more than the read it guards. Revocation and disabling a client therefore
/// take effect within `cache_ttl` (`--token-cache-secs`, 0 turns the cache off).
pub struct Verifier {
    server: Arc<AuthServer>,
    cache_ttl: Duration,
    cache: Mutex<HashMap<String, (Arc<Principal>, Instant)>>,
}

/// Most tokens remembered at once; the cache is cleared when it is full.
const CACHE_MAX: usize = 50_000;

impl Verifier {
    pub fn new(server: Arc<AuthServer>, cache_ttl: Duration) -> Verifier {
        Verifier { server, cache_ttl, cache: Mutex::new(HashMap::new()) }
    }
}

#[async_trait]
impl TokenVerifier for Verifier {
    async fn verify(&self, bearer: &str) -> Result<Arc<Principal>, Rejected> {
        if !self.cache_ttl.is_zero() {
            if let Ok(cache) = self.cache.lock() {
                if let Some((p, until)) = cache.get(bearer) {
                    if Instant::now() < *until {
                        return Ok(Arc::clone(p));
                    }
                }
            }
        }
        let p = self.server.verify_bearer(bearer).await.map_err(|e| Rejected(e.to_string()))?;
        let until = {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
            let left = Duration::from_secs(u64::try_from(p.expires_at - now).unwrap_or(0));
            Instant::now() + left.min(self.cache_ttl)
        };
        let principal = Arc::new(Principal {
            client_id: p.client_id,
            subject: p.sub,
            patient: p.patient,
            fhir_user: p.fhir_user,
            scope: p.scopes.to_string(),
            grants: Arc::new(Scopes(p.scopes)),
            organizations: p
                .organizations
                .into_iter()
                .map(|o| schemas::Identifier { system: Some(o.system), value: o.value })
                .collect(),
        });
        if !self.cache_ttl.is_zero() {
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(bearer.to_string(), (Arc::clone(&principal), until));
            }
        }
        Ok(principal)
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
