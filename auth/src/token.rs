//! `POST /auth/token` (RFC 6749 §4.1.3, §6, §4.4; SMART Backend Services), client
//! authentication (public, `client_secret_basic`, `private_key_jwt` per RFC 7523),
//! `POST /auth/introspect` (RFC 7662) and `POST /auth/revoke` (RFC 7009).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::ClientKind;
use crate::authorize::form_pairs;
use crate::crypto::{is_valid_code_verifier, now, pkce_s256_matches, token_hash, verify_secret, HashCost};
use crate::error::no_store;
use crate::jwks::{jwks_keys, select_key};
use crate::scopes::{Context, ScopeSet};
use crate::server::{cors, peek, AuthServer, Grant, LEEWAY_SECS};
use crate::store::{self, ClientRecord};
use crate::{AuditRecord, AuthError};

pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The furthest in the future a client assertion may expire (SMART Backend Services).
const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

/// Request parameters, each at most once (RFC 6749 §3.2).
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    /// Form-encoded as RFC 6749 requires; JSON objects of strings are accepted too, since payer
    /// API pages (and the apps written against them) send `application/json`.
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Params, AuthError> {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let pairs: Vec<(String, String)> =
            if content_type.trim_start().to_ascii_lowercase().starts_with("application/json") {
                let v: Value = serde_json::from_slice(body)
                    .map_err(|e| AuthError::InvalidRequest(format!("the body is not JSON: {e}")))?;
                let obj =
                    v.as_object().ok_or_else(|| AuthError::InvalidRequest("the body is not a JSON object".into()))?;
                obj.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => Ok((k.clone(), s.clone())),
                        Value::Number(n) => Ok((k.clone(), n.to_string())),
                        _ => Err(AuthError::InvalidRequest(format!("{k} must be a string"))),
                    })
                    .collect::<Result<_, _>>()?
            } else {
                form_pairs(body)
            };
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if map.insert(k.clone(), v).is_some() {
                return Err(AuthError::InvalidRequest(format!("the {k} parameter is repeated")));
            }
        }
        Ok(Params(map))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str) -> Result<&str, AuthError> {
        self.get(name).ok_or_else(|| AuthError::InvalidRequest(format!("{name} is required")))
    }
}

/// `Authorization: Basic base64(client_id:client_secret)`, each part form-urlencoded first
/// (RFC 6749 §2.3.1; ids and secrets payerx issues need no encoding, so both forms agree).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| AuthError::InvalidClient("malformed Authorization header".into()))?;
    let Some((scheme, creds)) = value.trim().split_once(' ') else {
        return Err(AuthError::InvalidClient("malformed Authorization header".into()));
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::InvalidClient("the token endpoint takes HTTP Basic client authentication".into()));
    }
    let decoded = STANDARD
        .decode(creds.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| AuthError::InvalidClient("malformed Basic credentials".into()))?;
    let (id, secret) =
        decoded.split_once(':').ok_or_else(|| AuthError::InvalidClient("malformed Basic credentials".into()))?;
    let unescape = |s: &str| form_pairs(format!("v={s}").as_bytes()).pop().map(|(_, v)| v).unwrap_or_default();
    Ok(Some((unescape(id), unescape(secret))))
}

fn has_basic(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("basic"))
}

#[derive(Deserialize)]
struct AssertionClaims {
    exp: i64,
    jti: Option<String>,
}

fn ok_json(body: &Value) -> Response {
    let mut resp = (StatusCode::OK, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    no_store(h);
    cors(h);
    resp
}

fn oauth_error(e: &AuthError, basic: bool) -> Response {
    let mut resp = e.oauth_response(basic);
    cors(resp.headers_mut());
    resp
}

impl AuthServer {
    /// Authenticates the client of a token, introspection or revocation request.
    pub(crate) async fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<ClientRecord, AuthError> {
        let basic = basic_credentials(headers)?;
        let client_id_param = params.get("client_id");
        if params.get("client_secret").is_some() {
            return Err(AuthError::InvalidClient(
                "client_secret_post is not supported: send the secret with HTTP Basic".into(),
            ));
        }
        let client = match (basic, params.get("client_assertion")) {
            (Some(_), Some(_)) => {
                return Err(AuthError::InvalidRequest("use exactly one client authentication method".into()))
            }
            (Some((id, secret)), None) => {
                if client_id_param.is_some_and(|c| c != id) {
                    return Err(AuthError::InvalidClient("client_id differs from the Basic credentials".into()));
                }
                let client = store::get_client(&self.db, &id).await?;
                // Unknown clients cost a hash check too, so timing does not tell which ids exist.
                let ok =
                    verify_secret(secret, client.as_ref().and_then(|c| c.secret_hash.clone()), HashCost::RandomSecret)
                        .await;
                match client {
                    Some(c) if ok && c.kind == ClientKind::ConfidentialSymmetric => c,
                    _ => return Err(AuthError::InvalidClient("wrong client_id or client_secret".into())),
                }
            }
            (None, Some(assertion)) => {
                if params.get("client_assertion_type") != Some(JWT_BEARER) {
                    return Err(AuthError::InvalidClient(format!("client_assertion_type must be {JWT_BEARER}")));
                }
                self.verify_client_assertion(assertion, client_id_param).await?
            }
            (None, None) => {
                let id = client_id_param.ok_or_else(|| AuthError::InvalidClient("no client authentication".into()))?;
                match store::get_client(&self.db, id).await? {
                    Some(c) if c.kind == ClientKind::Public => c,
                    Some(c) => {
                        return Err(AuthError::InvalidClient(format!(
                            "this client must authenticate with {}",
                            c.kind.auth_method()
                        )))
                    }
                    None => return Err(AuthError::InvalidClient("unknown client".into())),
                }
            }
        };
        if !client.enabled {
            return Err(AuthError::InvalidClient("the client is disabled".into()));
        }
        Ok(client)
    }

    /// RFC 7523 §3 + SMART Backend Services: RS384 or ES384, `iss` = `sub` = client_id,
    /// `aud` = the token endpoint, `exp` at most five minutes ahead, a `jti` never seen before,
    /// signed by a key from the client's JWKS.
    async fn verify_client_assertion(
        &self,
        assertion: &str,
        client_id: Option<&str>,
    ) -> Result<ClientRecord, AuthError> {
        let bad = |m: &str| AuthError::InvalidClient(format!("client assertion: {m}"));
        let (header, payload) = peek(assertion).map_err(|_| bad("not a JWT"))?;
        let alg = match header["alg"].as_str() {
            Some("RS384") => Algorithm::RS384,
            Some("ES384") => Algorithm::ES384,
            other => return Err(bad(&format!("alg must be RS384 or ES384, not {other:?}"))),
        };
        let iss = payload["iss"].as_str().ok_or_else(|| bad("no iss"))?;
        if client_id.is_some_and(|c| c != iss) {
            return Err(bad("iss differs from client_id"));
        }
        let client = match store::get_client(&self.db, iss).await? {
            Some(c) if c.kind == ClientKind::ConfidentialAsymmetric => c,
            Some(_) => return Err(bad("this client is not registered for private_key_jwt")),
            None => return Err(bad("unknown client")),
        };
        let kid = header["kid"].as_str();
        let key = match (&client.jwks, &client.jwks_url) {
            (Some(inline), _) => {
                let v: Value =
                    serde_json::from_str(inline).map_err(|e| AuthError::Internal(format!("stored jwks: {e}")))?;
                select_key(&jwks_keys(&v).unwrap_or_default(), kid, alg)
            }
            (None, Some(url)) => self.jwks.key(url, kid, alg).await,
            (None, None) => return Err(bad("the client has no JWKS")),
        }
        .map_err(|e| match e {
            AuthError::InvalidToken(m) => bad(&m),
            other => other,
        })?;
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_audience(&[self.urls.token.as_str()]);
        v.set_issuer(&[client.client_id.as_str()]);
        v.sub = Some(client.client_id.clone());
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                bad(&match e.kind() {
                    K::ExpiredSignature => "expired".to_string(),
                    K::InvalidAudience => format!("aud must be {}", self.urls.token),
                    K::InvalidSubject => "sub must equal iss (the client_id)".to_string(),
                    K::InvalidSignature => "bad signature".to_string(),
                    K::MissingRequiredClaim(c) => format!("no {c} claim"),
                    other => format!("{other:?}"),
                })
            })?
            .claims;
        let now = now();
        if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + i64::try_from(LEEWAY_SECS).unwrap_or(0) {
            return Err(bad("exp is more than five minutes in the future"));
        }
        let jti = claims.jti.filter(|j| !j.is_empty() && j.len() <= 512).ok_or_else(|| bad("no jti"))?;
        // Recorded only after the signature checked, so forged assertions cannot burn ids.
        if !store::record_assertion_jti(&self.db, &client.client_id, &jti, claims.exp.max(now)).await? {
            return Err(bad("this jti was already used (replay)"));
        }
        Ok(client)
    }

    async fn grant_authorization_code(&self, headers: &HeaderMap, params: &Params) -> Result<Value, AuthError> {
        let client = self.authenticate_client(headers, params).await?;
        let code = params.require("code")?;
        let redirect_uri = params.require("redirect_uri")?;
        let verifier = params
            .get("code_verifier")
            .ok_or_else(|| AuthError::InvalidRequest("code_verifier is required (PKCE)".into()))?;
        let hash = token_hash(code);
        let record = store::get_code(&self.db, &hash)
            .await?
            .ok_or_else(|| AuthError::InvalidGrant("unknown or expired authorization code".into()))?;
        // Spent on first presentation, whatever follows: a code is tried once.
        if !store::consume_code(&self.db, &hash).await? {
            // RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for.
            store::revoke_family(&self.db, &record.family_id, now()).await?;
            self.audit(AuditRecord {
                action: "token.reuse_detected".into(),
                outcome: "failure".into(),
                client_id: Some(record.client_id.clone()),
                sub: Some(record.member_id.clone()),
                patient: Some(record.patient_id.clone()),
                detail: "authorization code used twice; its tokens are revoked".into(),
                scope: None,
            });
            return Err(AuthError::InvalidGrant("the authorization code was already used".into()));
        }
        if record.client_id != client.client_id {
            return Err(AuthError::InvalidGrant("the authorization code was issued to another client".into()));
        }
        if record.expires_at < now() {
            return Err(AuthError::InvalidGrant("the authorization code has expired".into()));
        }
        if record.redirect_uri != redirect_uri {
            return Err(AuthError::InvalidGrant("redirect_uri differs from the authorization request".into()));
        }
        if !is_valid_code_verifier(verifier) || !pkce_s256_matches(verifier, &record.code_challenge) {
            return Err(AuthError::InvalidGrant("code_verifier does not match the code_challenge".into()));
        }
        let member = store::member_by_id(&self.db, &record.member_id)
            .await?
            .ok_or_else(|| AuthError::InvalidGrant("the member no longer exists".into()))?;
        let scope = ScopeSet::parse(&record.scope);
        self.issue(Grant {
            client_id: client.client_id,
            member_id: Some(member.member_id),
            username: Some(member.username),
            patient: Some(record.patient_id),
            refresh_ceiling: scope.wants_refresh().then(|| scope.clone()),
            scope,
            family_id: Some(record.family_id),
            auth_time: Some(record.auth_time),
            nonce: record.nonce,
            grant_type: "authorization_code",
        })
        .await
    }

    async fn grant_refresh_token(&self, headers: &HeaderMap, params: &Params) -> Result<Value, AuthError> {
        let client = self.authenticate_client(headers, params).await?;
        let token = params.require("refresh_token")?;
        let hash = token_hash(token);
        let record = store::get_refresh(&self.db, &hash)
            .await?
            .ok_or_else(|| AuthError::InvalidGrant("unknown refresh token".into()))?;
        if record.client_id != client.client_id {
            return Err(AuthError::InvalidGrant("the refresh token was issued to another client".into()));
        }
        let reuse = || async {
            // A rotated token came back: someone holds a copy. Revoke the whole grant.
            store::revoke_family(&self.db, &record.family_id, now()).await?;
            self.audit(AuditRecord {
                action: "token.reuse_detected".into(),
                outcome: "failure".into(),
                client_id: Some(record.client_id.clone()),
                sub: record.member_id.clone(),
                patient: record.patient_id.clone(),
                detail: "rotated refresh token used again; the grant is revoked".into(),
                scope: None,
            });
            Err::<Value, _>(AuthError::InvalidGrant("the refresh token was already used; the grant is revoked".into()))
        };
        match record.status.as_str() {
            "active" => {}
            "rotated" => return reuse().await,
            _ => return Err(AuthError::InvalidGrant("the refresh token has been revoked".into())),
        }
        if record.expires_at < now() {
            return Err(AuthError::InvalidGrant("the refresh token has expired".into()));
        }
        let ceiling = ScopeSet::parse(&record.scope);
        let scope = match params.get("scope") {
            Some(s) => {
                let requested = ScopeSet::parse(s);
                if !requested.is_subset_of(&ceiling) {
                    return Err(AuthError::InvalidScope(
                        "a refresh may narrow the granted scopes, never widen them".into(),
                    ));
                }
                requested
            }
            None => ceiling.clone(),
        };
        if !store::rotate_refresh(&self.db, &hash).await? {
            return reuse().await;
        }
        let member = match &record.member_id {
            Some(id) => Some(
                store::member_by_id(&self.db, id)
                    .await?
                    .ok_or_else(|| AuthError::InvalidGrant("the member no longer exists".into()))?,
            ),
            None => None,
        };
        self.issue(Grant {
            client_id: client.client_id,
            member_id: record.member_id,
            username: member.map(|m| m.username),
            patient: record.patient_id,
            scope,
            family_id: Some(record.family_id),
            auth_time: Some(record.auth_time),
            nonce: None,
            refresh_ceiling: Some(ceiling),
            grant_type: "refresh_token",
        })
        .await
    }

    async fn grant_client_credentials(&self, headers: &HeaderMap, params: &Params) -> Result<Value, AuthError> {
        let client = self.authenticate_client(headers, params).await?;
        if !client.kind.is_confidential() {
            return Err(AuthError::UnauthorizedClient("client_credentials needs a confidential client".into()));
        }
        let requested = params.get("scope").map(ScopeSet::parse).unwrap_or_else(|| client.scope.clone());
        // No user, no patient: only system/ scopes mean anything here.
        let scope = requested
            .intersect_allowed(&client.scope)
            .filter(|s| s.as_resource().is_some_and(|r| r.context == Context::System));
        if scope.is_empty() {
            return Err(AuthError::InvalidScope(
                "none of the requested system/ scopes is allowed for this client".into(),
            ));
        }
        self.issue(Grant {
            client_id: client.client_id,
            member_id: None,
            username: None,
            patient: None,
            scope,
            family_id: None,
            auth_time: None,
            nonce: None,
            refresh_ceiling: None,
            grant_type: "client_credentials",
        })
        .await
    }

    fn refused(&self, headers: &HeaderMap, params: Option<&Params>, action: &str, e: &AuthError) {
        let client_id = params
            .and_then(|p| p.get("client_id").map(str::to_string))
            .or_else(|| basic_credentials(headers).ok().flatten().map(|(id, _)| id));
        let grant = params.and_then(|p| p.get("grant_type")).unwrap_or("-");
        self.audit(AuditRecord {
            action: action.into(),
            outcome: "failure".into(),
            client_id,
            sub: None,
            patient: None,
            detail: format!("{grant}: {}: {}", e.oauth_code(), e.description()),
            scope: None,
        });
    }

    async fn introspect_inner(&self, headers: &HeaderMap, params: &Params) -> Result<Value, AuthError> {
        let client = self.authenticate_client(headers, params).await?;
        if !client.kind.is_confidential() {
            return Err(AuthError::InvalidClient("introspection needs a confidential client".into()));
        }
        let token = params.require("token")?;
        // Access tokens are JWTs; refresh tokens are opaque.
        if token.split('.').count() == 3 {
            return match self.verify_access_token(token, true).await {
                Ok(v) => {
                    let p = v.principal;
                    let mut out = json!({
                        "active": true,
                        "scope": p.scopes.to_string(),
                        "client_id": p.client_id,
                        "token_type": "Bearer",
                        "exp": p.expires_at,
                        "iss": p.issuer,
                        "aud": self.urls.fhir_base,
                    });
                    for (k, val) in [("iat", v.iat.map(|i| json!(i))), ("sub", p.sub.map(|s| json!(s)))] {
                        if let Some(val) = val {
                            out[k] = val;
                        }
                    }
                    if let Some(j) = p.jti {
                        out["jti"] = json!(j);
                    }
                    if let Some(pt) = p.patient {
                        out["patient"] = json!(pt);
                    }
                    if let Some(u) = p.fhir_user {
                        out["fhirUser"] = json!(u);
                    }
                    Ok(out)
                }
                Err(AuthError::InvalidToken(_)) => Ok(json!({"active": false})),
                Err(e) => Err(e),
            };
        }
        let Some(r) = store::get_refresh(&self.db, &token_hash(token)).await? else {
            return Ok(json!({"active": false}));
        };
        if r.status != "active"
            || r.expires_at < now()
            || !matches!(store::client_status(&self.db, &r.client_id).await?, Some((true, _)))
        {
            return Ok(json!({"active": false}));
        }
        let mut out = json!({
            "active": true,
            "scope": r.scope,
            "client_id": r.client_id,
            "token_type": "refresh_token",
            "exp": r.expires_at,
            "iat": r.issued_at,
            "iss": self.urls.issuer,
            "sub": r.member_id.clone().unwrap_or_else(|| r.client_id.clone()),
        });
        if let Some(p) = r.patient_id {
            out["patient"] = json!(p);
        }
        Ok(out)
    }

    async fn revoke_inner(&self, headers: &HeaderMap, params: &Params) -> Result<(), AuthError> {
        let client = self.authenticate_client(headers, params).await?;
        let token = params.require("token")?;
        let mut audit = AuditRecord {
            action: "token.revoked".into(),
            outcome: "success".into(),
            client_id: Some(client.client_id.clone()),
            sub: None,
            patient: None,
            detail: String::new(),
            scope: None,
        };
        if token.split('.').count() == 3 {
            // Expired or not, a token of ours that this client holds can be revoked.
            if let Ok(v) = self.verify_access_token(token, false).await {
                let p = v.principal;
                if v.own && p.client_id == client.client_id {
                    if let Some(jti) = &p.jti {
                        store::revoke_jti(&self.db, jti, p.expires_at).await?;
                        audit.sub = p.sub;
                        audit.patient = p.patient;
                        audit.detail = "access token".into();
                        self.audit(audit);
                    }
                }
            }
            return Ok(());
        }
        if let Some(r) = store::get_refresh(&self.db, &token_hash(token)).await? {
            // RFC 7009 §2.1: revoking a refresh token ends the grant, access tokens included.
            if r.client_id == client.client_id {
                store::revoke_family(&self.db, &r.family_id, now()).await?;
                audit.sub = r.member_id;
                audit.patient = r.patient_id;
                audit.detail = "refresh token and its grant".into();
                self.audit(audit);
            }
        }
        // Unknown tokens, or another client's, are not an error (RFC 7009 §2.2).
        Ok(())
    }
}

/// `POST /auth/token`.
pub(crate) async fn token(State(s): State<Arc<AuthServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let basic = has_basic(&headers);
    let params = match Params::parse(&headers, &body) {
        Ok(p) => p,
        Err(e) => {
            s.refused(&headers, None, "token.refused", &e);
            return oauth_error(&e, basic);
        }
    };
    s.maybe_sweep();
    let result = match params.get("grant_type") {
        Some("authorization_code") => s.grant_authorization_code(&headers, &params).await,
        Some("refresh_token") => s.grant_refresh_token(&headers, &params).await,
        Some("client_credentials") => s.grant_client_credentials(&headers, &params).await,
        Some(other) => Err(AuthError::UnsupportedGrantType(other.to_string())),
        None => Err(AuthError::InvalidRequest("grant_type is required".into())),
    };
    match result {
        Ok(body) => ok_json(&body),
        Err(e) => {
            s.refused(&headers, Some(&params), "token.refused", &e);
            oauth_error(&e, basic)
        }
    }
}

/// `POST /auth/introspect`: callers authenticate as a confidential client (a resource server
/// registered as one); public clients are refused.
pub(crate) async fn introspect(State(s): State<Arc<AuthServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let basic = has_basic(&headers);
    let result = match Params::parse(&headers, &body) {
        Ok(params) => s.introspect_inner(&headers, &params).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => ok_json(&body),
        Err(e) => oauth_error(&e, basic),
    }
}

/// `POST /auth/revoke`: 200 for any token once the client is authenticated.
pub(crate) async fn revoke(State(s): State<Arc<AuthServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let basic = has_basic(&headers);
    let params = match Params::parse(&headers, &body) {
        Ok(p) => p,
        Err(e) => return oauth_error(&e, basic),
    };
    match s.revoke_inner(&headers, &params).await {
        Ok(()) => {
            let mut resp = StatusCode::OK.into_response();
            no_store(resp.headers_mut());
            cors(resp.headers_mut());
            resp
        }
        Err(e) => {
            s.refused(&headers, Some(&params), "token.revoke_refused", &e);
            oauth_error(&e, basic)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn parses_basic_credentials() {
        // base64("my-client:s3cr%2Bt") — the secret is form-urlencoded per RFC 6749 §2.3.1.
        let h = headers(&[(header::AUTHORIZATION, "Basic bXktY2xpZW50OnMzY3IlMkJ0")]);
        assert_eq!(basic_credentials(&h).unwrap(), Some(("my-client".into(), "s3cr+t".into())));
        assert_eq!(basic_credentials(&HeaderMap::new()).unwrap(), None);
        assert!(basic_credentials(&headers(&[(header::AUTHORIZATION, "Basic !!!")])).is_err());
        assert!(basic_credentials(&headers(&[(header::AUTHORIZATION, "Bearer abc")])).is_err());
    }

    #[test]
    fn params_refuse_repeats_and_accept_json() {
        let form = headers(&[(header::CONTENT_TYPE, "application/x-www-form-urlencoded")]);
        assert!(Params::parse(&form, b"grant_type=a&grant_type=b").is_err());
        let p = Params::parse(&form, b"grant_type=client_credentials&scope=system%2F*.rs").unwrap();
        assert_eq!(p.get("scope"), Some("system/*.rs"));
        let json_h = headers(&[(header::CONTENT_TYPE, "application/json")]);
        let p = Params::parse(&json_h, br#"{"grant_type":"authorization_code","code":"x"}"#).unwrap();
        assert_eq!(p.get("code"), Some("x"));
        assert!(Params::parse(&json_h, b"[1]").is_err());
    }
}
