//! The authorization server: its state, discovery documents, router, token minting and the
//! bearer-token check.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use jsonwebtoken::{Algorithm, Header, Validation};
use projections::Db;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::crypto::{b64url_decode, now, random_token, token_hash};
use crate::jwks::JwksCache;
use crate::keys::{self, KeyRing};
use crate::scopes::{Scope, ScopeSet};
use crate::store::{self, RefreshRecord};
use crate::{authorize, token, AuditRecord, AuditSink, AuthConfig, AuthError, Principal};

/// Clock skew tolerated on `exp` / `nbf`.
pub(crate) const LEEWAY_SECS: u64 = 10;
/// How often a running server looks for a key rotated by another process.
const KEY_REFRESH: Duration = Duration::from_secs(60);
/// The least time between two reloads forced by an unknown `kid`.
const KEY_RELOAD_MIN: Duration = Duration::from_secs(5);
/// How often expired rows are deleted.
const SWEEP_EVERY_SECS: i64 = 600;
/// `typ` of payerx access tokens (RFC 9068), so an id_token is never taken for one.
const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Algorithms accepted from the external issuer (never HMAC or `none`).
const EXTERNAL_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

pub(crate) struct Urls {
    pub fhir_base: String,
    pub issuer: String,
    pub authorize: String,
    pub token: String,
    pub introspect: String,
    pub revoke: String,
    pub jwks: String,
    /// The path the auth pages live under, for the CSRF cookie.
    pub cookie_path: String,
    pub secure_cookies: bool,
}

impl Urls {
    fn new(base_url: &str) -> Urls {
        let base = base_url.trim_end_matches('/');
        let issuer = format!("{base}/auth");
        let cookie_path = url::Url::parse(&issuer).map(|u| u.path().to_string()).unwrap_or_else(|_| "/auth".into());
        Urls {
            fhir_base: format!("{base}/fhir"),
            authorize: format!("{issuer}/authorize"),
            token: format!("{issuer}/token"),
            introspect: format!("{issuer}/introspect"),
            revoke: format!("{issuer}/revoke"),
            jwks: format!("{issuer}/jwks"),
            secure_cookies: base.starts_with("https:"),
            cookie_path,
            issuer,
        }
    }
}

pub struct AuthServer {
    pub(crate) db: Db,
    pub(crate) config: AuthConfig,
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) urls: Urls,
    keys: RwLock<Arc<KeyRing>>,
    keys_loaded: Mutex<Instant>,
    pub(crate) jwks: JwksCache,
    last_sweep: AtomicI64,
}

/// What one grant hands out: the subject, the patient in context, the scopes of this access
/// token, and for refreshable grants the family and the scope ceiling.
pub(crate) struct Grant {
    pub client_id: String,
    /// Member grants: the member's id. Backend services: none (sub is the client).
    pub member_id: Option<String>,
    pub username: Option<String>,
    pub patient: Option<String>,
    pub scope: ScopeSet,
    pub family_id: Option<String>,
    pub auth_time: Option<i64>,
    pub nonce: Option<String>,
    /// Issue a refresh token whose ceiling is this scope.
    pub refresh_ceiling: Option<ScopeSet>,
    pub grant_type: &'static str,
}

/// The claims payerx reads from an access token (its own or the external issuer's).
#[derive(Debug, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: Option<String>,
    exp: i64,
    iat: Option<i64>,
    jti: Option<String>,
    client_id: Option<String>,
    azp: Option<String>,
    cid: Option<String>,
    scope: Option<Value>,
    scp: Option<Value>,
    patient: Option<String>,
    #[serde(rename = "fhirUser")]
    fhir_user: Option<String>,
}

/// A verified access token: the principal plus what introspection also reports.
pub(crate) struct Verified {
    pub principal: Principal,
    pub iat: Option<i64>,
    /// Issued by payerx (not the external issuer).
    pub own: bool,
}

impl AuthServer {
    /// Creates the tables if missing and makes sure a signing key exists.
    pub async fn new(db: Db, config: AuthConfig, audit: Arc<dyn AuditSink>) -> Result<Arc<Self>, AuthError> {
        if url::Url::parse(&config.base_url).is_err() {
            return Err(AuthError::InvalidRequest(format!("base_url {:?} is not an absolute URL", config.base_url)));
        }
        store::init(&db).await?;
        let ring = keys::load(&db).await?;
        Ok(Arc::new(AuthServer {
            urls: Urls::new(&config.base_url),
            db,
            config,
            audit,
            keys: RwLock::new(Arc::new(ring)),
            keys_loaded: Mutex::new(Instant::now()),
            jwks: JwksCache::new(),
            last_sweep: AtomicI64::new(0),
        }))
    }

    /// `/auth/...`: authorize, login, consent, token, introspect, revoke, jwks and the OpenID
    /// and SMART discovery documents under `/auth/.well-known/`. The SMART document at
    /// `{fhir base}/.well-known/smart-configuration` belongs to the FHIR router: serve
    /// [`AuthServer::smart_configuration`] there.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/auth/.well-known/openid-configuration", get(openid_configuration).options(preflight))
            .route("/auth/.well-known/smart-configuration", get(smart_configuration).options(preflight))
            .route("/auth/jwks", get(jwks).options(preflight))
            .route("/auth/authorize", get(authorize::start))
            .route("/auth/login", post(authorize::login))
            .route("/auth/consent", post(authorize::consent))
            .route("/auth/token", post(token::token).options(preflight))
            .route("/auth/introspect", post(token::introspect).options(preflight))
            .route("/auth/revoke", post(token::revoke).options(preflight))
            .layer(DefaultBodyLimit::max(64 * 1024))
            .with_state(self.clone())
    }

    pub fn issuer(&self) -> &str {
        &self.urls.issuer
    }

    pub fn fhir_base(&self) -> &str {
        &self.urls.fhir_base
    }

    pub fn token_endpoint(&self) -> &str {
        &self.urls.token
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The SMART App Launch discovery document (`{fhir base}/.well-known/smart-configuration`).
    pub fn smart_configuration(&self) -> Value {
        let u = &self.urls;
        json!({
            "issuer": u.issuer,
            "jwks_uri": u.jwks,
            "authorization_endpoint": u.authorize,
            "token_endpoint": u.token,
            "introspection_endpoint": u.introspect,
            "revocation_endpoint": u.revoke,
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": scopes_supported(),
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "context-standalone-patient",
                "permission-offline",
                "permission-online",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
                "sso-openid-connect"
            ],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "private_key_jwt"],
        })
    }

    /// The OpenID Provider metadata (`{issuer}/.well-known/openid-configuration`).
    pub fn openid_configuration(&self) -> Value {
        let u = &self.urls;
        json!({
            "issuer": u.issuer,
            "authorization_endpoint": u.authorize,
            "token_endpoint": u.token,
            "jwks_uri": u.jwks,
            "introspection_endpoint": u.introspect,
            "revocation_endpoint": u.revoke,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": scopes_supported(),
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "preferred_username"],
        })
    }

    // -----------------------------------------------------------------------------------------
    // Keys

    fn ring(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the published keys again (after a rotation by another process, or at once after
    /// [`crate::admin::rotate_keys`] in this one).
    pub async fn reload_keys(&self) -> Result<(), AuthError> {
        let ring = keys::load(&self.db).await?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        *self.keys_loaded.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Rotates the signing key and starts using it at once.
    pub async fn rotate_keys(&self) -> Result<crate::admin::KeyRotated, AuthError> {
        let rotated = crate::admin::rotate_keys(&self.db).await?;
        self.reload_keys().await?;
        Ok(rotated)
    }

    fn keys_age(&self) -> Duration {
        self.keys_loaded.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// The ring to sign with, reloaded now and then so a rotation elsewhere is picked up.
    async fn signing_ring(&self) -> Arc<KeyRing> {
        if self.keys_age() > KEY_REFRESH {
            if let Err(e) = self.reload_keys().await {
                tracing::warn!(error = %e, "could not reload signing keys; keeping the current ones");
            }
        }
        self.ring()
    }

    /// The published JWKS.
    pub fn jwks(&self) -> Value {
        self.ring().jwks()
    }

    fn sign(&self, ring: &KeyRing, typ: &str, claims: &Value) -> Result<String, AuthError> {
        let key = ring.current().ok_or_else(|| AuthError::Internal("no signing key".into()))?;
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.to_string());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| AuthError::Internal(format!("signing: {e}")))
    }

    // -----------------------------------------------------------------------------------------
    // Issuing

    /// Mints the token response for a grant (the access token, and the refresh and id tokens
    /// the grant's scopes call for), recording what is needed to revoke them later.
    pub(crate) async fn issue(&self, g: Grant) -> Result<Value, AuthError> {
        let now = now();
        let ring = self.signing_ring().await;
        let access_ttl = secs(self.config.access_ttl);
        let exp = now + access_ttl;
        let jti = uuid::Uuid::new_v4().to_string();
        let sub = g.member_id.clone().unwrap_or_else(|| g.client_id.clone());
        let fhir_user = g.patient.as_ref().map(|p| format!("Patient/{p}"));
        let scope = g.scope.to_string();
        let mut claims = json!({
            "iss": self.urls.issuer,
            "sub": sub,
            "aud": self.urls.fhir_base,
            "exp": exp,
            "iat": now,
            "jti": jti,
            "client_id": g.client_id,
            "scope": scope,
        });
        if let Some(p) = &g.patient {
            claims["patient"] = json!(p);
        }
        if let Some(u) = &fhir_user {
            claims["fhirUser"] = json!(u);
        }
        let access_token = self.sign(&ring, ACCESS_TOKEN_TYP, &claims)?;
        store::record_access_token(&self.db, &jti, &g.client_id, g.family_id.as_deref(), exp).await?;

        let mut body = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": access_ttl,
            "scope": scope,
        });
        if let Some(p) = &g.patient {
            body["patient"] = json!(p);
        }
        if g.scope.contains(&Scope::OpenId) && g.member_id.is_some() {
            let mut id = json!({
                "iss": self.urls.issuer,
                "sub": sub,
                "aud": g.client_id,
                "azp": g.client_id,
                "exp": exp,
                "iat": now,
                "auth_time": g.auth_time.unwrap_or(now),
            });
            if let Some(n) = &g.nonce {
                id["nonce"] = json!(n);
            }
            if g.scope.contains(&Scope::FhirUser) {
                if let Some(u) = &fhir_user {
                    id["fhirUser"] = json!(u);
                }
            }
            if g.scope.contains(&Scope::Profile) {
                if let Some(name) = &g.username {
                    id["preferred_username"] = json!(name);
                }
            }
            body["id_token"] = json!(self.sign(&ring, "JWT", &id)?);
        }
        if let (Some(ceiling), Some(family_id)) = (&g.refresh_ceiling, &g.family_id) {
            // online_access is for a user at the app: a shorter life than offline access.
            let ttl = if ceiling.contains(&Scope::OfflineAccess) {
                secs(self.config.refresh_ttl)
            } else {
                secs(self.config.refresh_ttl).min(24 * 3600)
            };
            let refresh_token = random_token(32);
            store::insert_refresh(
                &self.db,
                &RefreshRecord {
                    token_hash: token_hash(&refresh_token),
                    family_id: family_id.clone(),
                    client_id: g.client_id.clone(),
                    member_id: g.member_id.clone(),
                    patient_id: g.patient.clone(),
                    scope: ceiling.to_string(),
                    auth_time: g.auth_time.unwrap_or(now),
                    issued_at: now,
                    expires_at: now + ttl,
                    status: "active".to_string(),
                },
            )
            .await?;
            body["refresh_token"] = json!(refresh_token);
        }
        self.audit(AuditRecord {
            action: "token.issued".into(),
            outcome: "success".into(),
            client_id: Some(g.client_id.clone()),
            sub: Some(sub),
            patient: g.patient.clone(),
            detail: g.grant_type.to_string(),
            scope: Some(scope),
        });
        Ok(body)
    }

    pub(crate) fn audit(&self, record: AuditRecord) {
        self.audit.record(record);
    }

    /// Deletes expired codes, tokens, pending authorizations and assertion ids now (it also
    /// happens by itself every few minutes while the server issues tokens).
    pub async fn sweep_expired(&self) -> Result<(), AuthError> {
        store::sweep(&self.db, now()).await
    }

    /// Deletes expired rows every few minutes, in the background.
    pub(crate) fn maybe_sweep(self: &Arc<Self>) {
        let now = now();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < SWEEP_EVERY_SECS
            || self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store::sweep(&this.db, now).await {
                tracing::warn!(error = %e, "sweeping expired authorization rows failed");
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // Verifying

    /// Checks a bearer token for the FHIR endpoints: payerx's own access tokens, or the external
    /// issuer's. Refuses `alg: none` and HMAC, unknown keys, bad signatures, expired tokens (10 s
    /// leeway), another audience, revoked tokens and tokens of disabled clients.
    pub async fn verify_bearer(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_access_token(token, true).await.map(|v| v.principal)
    }

    pub(crate) async fn verify_access_token(&self, token: &str, check_exp: bool) -> Result<Verified, AuthError> {
        let (header, payload) = peek(token)?;
        let alg_name = header["alg"].as_str().unwrap_or_default();
        if alg_name.eq_ignore_ascii_case("none") || alg_name.is_empty() {
            return Err(AuthError::InvalidToken("unsigned tokens (alg none) are not accepted".into()));
        }
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| AuthError::InvalidToken(format!("unsupported signing algorithm {alg_name:?}")))?;
        let kid = header["kid"].as_str();
        let iss = payload["iss"].as_str().unwrap_or_default();

        let (key, own) = if iss == self.urls.issuer {
            if header["typ"].as_str() != Some(ACCESS_TOKEN_TYP) {
                return Err(AuthError::InvalidToken("not an access token (typ is not at+jwt)".into()));
            }
            let kid = kid.ok_or_else(|| AuthError::InvalidToken("the token has no kid".into()))?;
            let key = match self.ring().find(kid) {
                Some(k) => Some((k.alg, k.decoding.clone())),
                None if self.keys_age() > KEY_RELOAD_MIN => {
                    // Maybe rotated by another process since we last looked.
                    self.reload_keys().await?;
                    self.ring().find(kid).map(|k| (k.alg, k.decoding.clone()))
                }
                None => None,
            };
            let (key_alg, key) = key.ok_or_else(|| AuthError::InvalidToken(format!("unknown signing key {kid:?}")))?;
            if key_alg != alg {
                return Err(AuthError::InvalidToken(format!("the key {kid:?} does not sign with {alg_name}")));
            }
            (key, true)
        } else if let Some(ext) = self.config.external.as_ref().filter(|e| e.issuer == iss) {
            if !EXTERNAL_ALGS.contains(&alg) {
                return Err(AuthError::InvalidToken(format!("unsupported signing algorithm {alg_name:?}")));
            }
            let key = self.jwks.key(&ext.jwks_url, kid, alg).await?;
            (key, false)
        } else {
            return Err(AuthError::InvalidToken(format!("tokens from issuer {iss:?} are not accepted")));
        };

        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = check_exp;
        v.validate_nbf = true;
        v.set_issuer(&[iss]);
        v.set_audience(&[self.urls.fhir_base.clone(), format!("{}/", self.urls.fhir_base)]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            AuthError::InvalidToken(match e.kind() {
                K::ExpiredSignature => "the token has expired".to_string(),
                K::InvalidAudience => format!("the token is not for {}", self.urls.fhir_base),
                K::InvalidSignature => "bad token signature".to_string(),
                K::ImmatureSignature => "the token is not valid yet".to_string(),
                K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
                other => format!("invalid token: {other:?}"),
            })
        })?;
        let c = data.claims;
        if own && c.jti.is_none() {
            return Err(AuthError::InvalidToken("the token has no jti".into()));
        }
        if let Some(jti) = &c.jti {
            if store::is_jti_revoked(&self.db, jti).await? {
                return Err(AuthError::InvalidToken("the token has been revoked".into()));
            }
        }
        let client_id = c.client_id.or(c.azp).or(c.cid).or_else(|| c.sub.clone()).unwrap_or_default();
        // Own tokens need a registered, enabled client; an external issuer's clients may be
        // unknown here, but one registered and disabled here is refused there too.
        let organizations = match (own, store::client_status(&self.db, &client_id).await?) {
            (_, Some((true, organizations))) => organizations,
            (false, None) => Vec::new(),
            _ => return Err(AuthError::InvalidToken("the client of this token is disabled".into())),
        };
        let scopes = match c.scope.or(c.scp) {
            Some(Value::String(s)) => ScopeSet::parse(&s),
            Some(Value::Array(a)) => ScopeSet::parse(&a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
            _ => ScopeSet::default(),
        };
        let fhir_user = c.fhir_user.map(|u| relative_reference(&self.urls.fhir_base, &u));
        let patient = c
            .patient
            .map(|p| p.strip_prefix("Patient/").map(str::to_string).unwrap_or(p))
            .or_else(|| fhir_user.as_deref().and_then(|u| u.strip_prefix("Patient/")).map(str::to_string));
        Ok(Verified {
            principal: Principal {
                client_id,
                sub: c.sub,
                patient,
                fhir_user,
                scopes,
                issuer: c.iss,
                jti: c.jti,
                expires_at: c.exp,
                organizations,
            },
            iat: c.iat,
            own,
        })
    }
}

/// `{fhir_base}/Patient/1` → `Patient/1`. Another server's absolute URL keeps its last two
/// segments when they look like `Type/id`; anything else is kept as it is.
fn relative_reference(fhir_base: &str, u: &str) -> String {
    if let Some(rest) = u.strip_prefix(fhir_base) {
        return rest.trim_start_matches('/').to_string();
    }
    match u.rsplit('/').collect::<Vec<_>>().as_slice() {
        [id, ty, ..] if u.contains("://") && ty.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
            format!("{ty}/{id}")
        }
        _ => u.to_string(),
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2).max(1)
}

/// The header and payload of a JWT, unverified (to choose the key that verifies it).
pub(crate) fn peek(token: &str) -> Result<(Value, Value), AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::InvalidToken("not a JWT".into()));
    };
    let decode = |s: &str| -> Option<Value> { serde_json::from_slice(&b64url_decode(s)?).ok() };
    match (decode(h), decode(p)) {
        (Some(h @ Value::Object(_)), Some(p @ Value::Object(_))) => Ok((h, p)),
        _ => Err(AuthError::InvalidToken("not a JWT".into())),
    }
}

fn scopes_supported() -> Vec<&'static str> {
    vec![
        "openid",
        "fhirUser",
        "profile",
        "launch/patient",
        "offline_access",
        "online_access",
        "patient/*.rs",
        "patient/*.read",
        "patient/ExplanationOfBenefit.rs",
        "patient/Coverage.rs",
        "patient/Patient.rs",
        "patient/Organization.rs",
        "patient/Practitioner.rs",
        "user/*.rs",
        "user/*.read",
        "system/*.rs",
        "system/*.read",
    ]
}

fn json_response(status: StatusCode, body: &Value, cache: &'static str) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    cors(h);
    resp
}

/// Browser apps call the token endpoint and read discovery from another origin. No cookies are
/// involved in these endpoints, so any origin may.
pub(crate) fn cors(h: &mut axum::http::HeaderMap) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

async fn preflight() -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    cors(h);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type, accept"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    resp
}

async fn smart_configuration(State(s): State<Arc<AuthServer>>) -> Response {
    json_response(StatusCode::OK, &s.smart_configuration(), "public, max-age=300")
}

async fn openid_configuration(State(s): State<Arc<AuthServer>>) -> Response {
    json_response(StatusCode::OK, &s.openid_configuration(), "public, max-age=300")
}

async fn jwks(State(s): State<Arc<AuthServer>>) -> Response {
    // Reload if stale so a rotation elsewhere is published promptly.
    let ring = s.signing_ring().await;
    json_response(StatusCode::OK, &ring.jwks(), "public, max-age=300")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_follow_the_base_url() {
        let u = Urls::new("https://plan.example/payerx/");
        assert_eq!(u.fhir_base, "https://plan.example/payerx/fhir");
        assert_eq!(u.issuer, "https://plan.example/payerx/auth");
        assert_eq!(u.token, "https://plan.example/payerx/auth/token");
        assert_eq!(u.cookie_path, "/payerx/auth");
        assert!(u.secure_cookies);
        let local = Urls::new("http://127.0.0.1:8080");
        assert_eq!(local.cookie_path, "/auth");
        assert!(!local.secure_cookies);
    }

    #[test]
    fn fhir_user_becomes_relative() {
        let base = "https://plan.example/fhir";
        assert_eq!(relative_reference(base, "https://plan.example/fhir/Patient/1"), "Patient/1");
        assert_eq!(relative_reference(base, "Patient/1"), "Patient/1");
        assert_eq!(relative_reference(base, "https://idp.example/r4/Patient/7"), "Patient/7");
        assert_eq!(relative_reference(base, "urn:uuid:1234"), "urn:uuid:1234");
    }

    #[test]
    fn peek_takes_only_three_part_json_tokens() {
        assert!(peek("abc").is_err());
        assert!(peek("a.b.c.d").is_err());
        assert!(peek("bm90IGpzb24.e30.x").is_err(), "a header that is not JSON");
        let (h, p) = peek("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.").unwrap();
        assert_eq!(h["alg"], "none");
        assert_eq!(p["iss"], "x");
    }
}
