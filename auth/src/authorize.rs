//! The standalone patient launch (SMART App Launch 2.x, RFC 6749 §4.1, RFC 7636):
//! `GET /auth/authorize` checks the request and shows the login page, `POST /auth/login` signs
//! the member in and shows the consent page, `POST /auth/consent` redirects back to the app with
//! a code (or `access_denied`).
//!
//! Until the redirect URI is known to be registered for the client, errors are shown on a page
//! and never redirected (RFC 6749 §4.1.2.1). Every form carries the pending authorization's id
//! and a CSRF token stored (hashed) on it; a `SameSite=Lax` cookie set on the first page must
//! come back too, so another site can neither post these forms nor hand a victim a half-finished
//! authorization.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::crypto::{ct_eq, is_valid_s256_challenge, now, random_token, token_hash, verify_secret, HashCost};
use crate::pages::{consent_page, error_page, login_page};
use crate::scopes::{Context, Scope, ScopeSet};
use crate::server::AuthServer;
use crate::store::{self, ClientRecord, CodeRecord, PendingRecord};
use crate::AuditRecord;

/// How long a member has to sign in and decide.
const PENDING_TTL_SECS: i64 = 600;
/// Wrong passwords one pending authorization may see before it is dropped.
const MAX_PENDING_ATTEMPTS: i64 = 10;
/// Failed sign-ins in a row that lock an account, and for how long.
const LOCKOUT_AFTER: i64 = 5;
const LOCKOUT_SECS: i64 = 15 * 60;
const COOKIE_PREFIX: &str = "payerx_authz_";

/// Decoded `application/x-www-form-urlencoded` pairs, in order.
pub(crate) fn form_pairs(raw: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(raw).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// The value of a parameter that must appear at most once (RFC 6749 §3.1): `Err(())` when it
/// is repeated.
fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, ()> {
    let mut values = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let first = values.next();
    match values.next() {
        Some(_) => Err(()),
        None => Ok(first.filter(|v| !v.is_empty())),
    }
}

fn see_other(location: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The registered redirect URI with `params` added to its query.
fn redirect_to(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    match url::Url::parse(redirect_uri) {
        Ok(mut u) => {
            u.query_pairs_mut().extend_pairs(params);
            see_other(u.as_str())
        }
        Err(_) => error_page(StatusCode::BAD_REQUEST, "The app's redirect URI is not a valid URL."),
    }
}

fn redirect_error(redirect_uri: &str, state: Option<&str>, error: &str, description: &str) -> Response {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(s) = state {
        params.push(("state", s));
    }
    redirect_to(redirect_uri, &params)
}

/// A server-side failure during the launch, as a page (the member is in a browser).
fn failure_page(e: crate::AuthError) -> Response {
    tracing::error!(error = %e, "authorization page failed");
    error_page(e.status(), "The health plan's sign-in service is unavailable right now. Try again shortly.")
}

fn cookie_name(pending_id: &str) -> String {
    format!("{COOKIE_PREFIX}{pending_id}")
}

fn set_cookie(resp: &mut Response, s: &AuthServer, name: &str, value: &str, max_age: i64) {
    let secure = if s.urls.secure_cookies { "; Secure" } else { "" };
    let cookie =
        format!("{name}={value}; Path={}; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}", s.urls.cookie_path);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// `GET /auth/authorize`.
pub(crate) async fn start(State(s): State<Arc<AuthServer>>, RawQuery(query): RawQuery) -> Response {
    let pairs = form_pairs(query.unwrap_or_default().as_bytes());
    let refuse = |detail: &str, client_id: Option<&str>| {
        s.audit(AuditRecord {
            action: "authorize.refused".into(),
            outcome: "failure".into(),
            client_id: client_id.map(str::to_string),
            sub: None,
            patient: None,
            detail: detail.to_string(),
            scope: None,
        });
    };

    // Before the redirect URI is trusted, every error is a page.
    let Ok(Some(client_id)) = single(&pairs, "client_id") else {
        refuse("missing or repeated client_id", None);
        return error_page(StatusCode::BAD_REQUEST, "The request has no client_id (or more than one).");
    };
    let client = match store::get_client(&s.db, client_id).await {
        Ok(Some(c)) if c.enabled => c,
        Ok(_) => {
            refuse("unknown or disabled client", Some(client_id));
            return error_page(
                StatusCode::BAD_REQUEST,
                "This app is not registered with the health plan, or it has been disabled.",
            );
        }
        Err(e) => return failure_page(e),
    };
    let Ok(Some(redirect_uri)) = single(&pairs, "redirect_uri") else {
        refuse("missing or repeated redirect_uri", Some(client_id));
        return error_page(StatusCode::BAD_REQUEST, "The request has no redirect_uri (or more than one).");
    };
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        refuse("redirect_uri not registered", Some(client_id));
        return error_page(
            StatusCode::BAD_REQUEST,
            "The redirect_uri does not exactly match a redirect URI registered for this app.",
        );
    }

    // From here on, errors go back to the app.
    let state = single(&pairs, "state").ok().flatten();
    let fail = |error: &str, description: &str| {
        refuse(description, Some(client_id));
        redirect_error(redirect_uri, state, error, description)
    };
    for name in ["response_type", "scope", "state", "code_challenge", "code_challenge_method", "aud", "nonce"] {
        if single(&pairs, name).is_err() {
            return fail("invalid_request", &format!("the {name} parameter is repeated"));
        }
    }
    if single(&pairs, "request").ok().flatten().is_some() || single(&pairs, "request_uri").ok().flatten().is_some() {
        return fail("request_not_supported", "request objects are not supported");
    }
    match single(&pairs, "response_type").ok().flatten() {
        Some("code") => {}
        Some(_) => return fail("unsupported_response_type", "only response_type=code is supported"),
        None => return fail("invalid_request", "response_type is required"),
    }
    let Some(state) = state else {
        return fail("invalid_request", "state is required");
    };
    let challenge = single(&pairs, "code_challenge").ok().flatten();
    match single(&pairs, "code_challenge_method").ok().flatten() {
        Some("S256") => {}
        Some("plain") => return fail("invalid_request", "PKCE method plain is not allowed: use S256"),
        Some(_) => return fail("invalid_request", "code_challenge_method must be S256"),
        None => return fail("invalid_request", "PKCE is required: code_challenge_method=S256"),
    }
    let Some(challenge) = challenge.filter(|c| is_valid_s256_challenge(c)) else {
        return fail("invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)");
    };
    if let Some(aud) = single(&pairs, "aud").ok().flatten() {
        if aud.trim_end_matches('/') != s.urls.fhir_base {
            return fail("invalid_request", &format!("aud must be this FHIR server, {}", s.urls.fhir_base));
        }
    }
    let requested = ScopeSet::parse(single(&pairs, "scope").ok().flatten().unwrap_or_default());
    // A member grants patient/user access only; system scopes are for backend services.
    let scope = requested
        .intersect_allowed(&client.scope)
        .filter(|sc| sc.as_resource().is_none_or(|r| r.context != Context::System));
    if scope.is_empty() {
        return fail("invalid_scope", "none of the requested scopes is allowed for this app");
    }

    let pending_id = random_token(16);
    let csrf = random_token(32);
    let browser = random_token(32);
    let record = PendingRecord {
        pending_id: pending_id.clone(),
        client_id: client.client_id.clone(),
        redirect_uri: redirect_uri.to_string(),
        state: state.to_string(),
        code_challenge: challenge.to_string(),
        scope: scope.to_string(),
        nonce: single(&pairs, "nonce").ok().flatten().map(str::to_string),
        csrf_hash: token_hash(&csrf),
        browser_hash: token_hash(&browser),
        stage: "login".into(),
        member_id: None,
        attempts: 0,
        auth_time: None,
        expires_at: now() + PENDING_TTL_SECS,
    };
    if let Err(e) = store::insert_pending(&s.db, &record).await {
        return failure_page(e);
    }
    s.maybe_sweep();
    let mut resp = login_page(&client.name, &pending_id, &csrf, "", None);
    set_cookie(&mut resp, &s, &cookie_name(&pending_id), &browser, PENDING_TTL_SECS);
    resp
}

/// The pending authorization a form belongs to, after checking its stage, CSRF token, browser
/// cookie and expiry; or the page to show instead.
async fn checked_pending(
    s: &AuthServer,
    pairs: &[(String, String)],
    headers: &HeaderMap,
    stage: &str,
) -> Result<(PendingRecord, ClientRecord), Response> {
    let expired = || error_page(StatusCode::BAD_REQUEST, "This sign-in request has expired or was already used.");
    let pending_id = single(pairs, "pending").ok().flatten().ok_or_else(expired)?;
    let pending = match store::get_pending(&s.db, pending_id).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err(expired()),
        Err(e) => return Err(failure_page(e)),
    };
    let csrf = single(pairs, "csrf").ok().flatten().unwrap_or_default();
    if !ct_eq(&token_hash(csrf), &pending.csrf_hash) {
        return Err(error_page(StatusCode::FORBIDDEN, "The form could not be verified (CSRF check failed)."));
    }
    let cookie = cookie_value(headers, &cookie_name(&pending.pending_id)).unwrap_or_default();
    if !ct_eq(&token_hash(&cookie), &pending.browser_hash) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "This browser did not start this sign-in request (its cookie is missing). Enable cookies and start again.",
        ));
    }
    if pending.expires_at < now() || pending.stage != stage {
        return Err(expired());
    }
    let client = match store::get_client(&s.db, &pending.client_id).await {
        Ok(Some(c)) if c.enabled => c,
        Ok(_) => return Err(error_page(StatusCode::BAD_REQUEST, "This app has been disabled.")),
        Err(e) => return Err(failure_page(e)),
    };
    Ok((pending, client))
}

/// `POST /auth/login`.
pub(crate) async fn login(State(s): State<Arc<AuthServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let pairs = form_pairs(&body);
    let (pending, client) = match checked_pending(&s, &pairs, &headers, "login").await {
        Ok(p) => p,
        Err(page) => return page,
    };
    let username = single(&pairs, "username").ok().flatten().map(str::trim).unwrap_or_default();
    let password = single(&pairs, "password").ok().flatten().unwrap_or_default();
    let again = |msg: &str| login_page(&client.name, &pending.pending_id, pairs_csrf(&pairs), username, Some(msg));
    if username.is_empty() || password.is_empty() {
        return again("Enter your username and password.");
    }
    if pending.attempts >= MAX_PENDING_ATTEMPTS {
        let _ = store::take_pending(&s.db, &pending.pending_id).await;
        return error_page(StatusCode::FORBIDDEN, "Too many failed sign-in attempts.");
    }
    let member = match store::member_by_username(&s.db, username).await {
        Ok(m) => m,
        Err(e) => return failure_page(e),
    };
    let now = now();
    let audit = |action: &str, sub: Option<String>, patient: Option<String>, detail: &str| {
        s.audit(AuditRecord {
            action: action.into(),
            outcome: if action == "login.succeeded" { "success" } else { "failure" }.into(),
            client_id: Some(client.client_id.clone()),
            sub,
            patient,
            detail: detail.into(),
            scope: None,
        });
    };
    if let Some(m) = member.as_ref().filter(|m| m.locked_until > now) {
        audit("login.failed", Some(m.member_id.clone()), Some(m.patient_id.clone()), "account locked");
        return again("Too many failed sign-ins: this account is locked for a few minutes. Try again later.");
    }
    let ok =
        verify_secret(password.to_string(), member.as_ref().map(|m| m.password_hash.clone()), HashCost::Password).await;
    let (true, Some(member)) = (ok, member.clone()) else {
        if let Err(e) = store::count_pending_attempt(&s.db, &pending.pending_id).await {
            return failure_page(e);
        }
        if let Some(m) = &member {
            match store::record_login_failure(&s.db, &m.member_id, LOCKOUT_AFTER, now + LOCKOUT_SECS).await {
                Ok(true) => audit("login.locked", Some(m.member_id.clone()), Some(m.patient_id.clone()), "locked"),
                Ok(false) => {}
                Err(e) => return failure_page(e),
            }
        }
        audit(
            "login.failed",
            member.as_ref().map(|m| m.member_id.clone()),
            member.as_ref().map(|m| m.patient_id.clone()),
            if member.is_some() { "wrong password" } else { "unknown username" },
        );
        return again("The username or password is incorrect.");
    };
    if let Err(e) = store::reset_login_failures(&s.db, &member.member_id).await {
        return failure_page(e);
    }
    // A fresh CSRF token for the consent form: the login form's token is spent.
    let csrf = random_token(32);
    match store::advance_pending_to_consent(&s.db, &pending.pending_id, &member.member_id, now, &token_hash(&csrf))
        .await
    {
        Ok(true) => {}
        Ok(false) => return error_page(StatusCode::BAD_REQUEST, "This sign-in request was already used."),
        Err(e) => return failure_page(e),
    }
    audit("login.succeeded", Some(member.member_id.clone()), Some(member.patient_id.clone()), "password");
    let scopes: Vec<Scope> = ScopeSet::parse(&pending.scope).iter().cloned().collect();
    consent_page(&client.name, &member.username, &pending.pending_id, &csrf, &scopes)
}

fn pairs_csrf(pairs: &[(String, String)]) -> &str {
    single(pairs, "csrf").ok().flatten().unwrap_or_default()
}

/// `POST /auth/consent`.
pub(crate) async fn consent(State(s): State<Arc<AuthServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let pairs = form_pairs(&body);
    let (pending, client) = match checked_pending(&s, &pairs, &headers, "consent").await {
        Ok(p) => p,
        Err(page) => return page,
    };
    let decision = single(&pairs, "decision").ok().flatten();
    if !matches!(decision, Some("approve" | "deny")) {
        return error_page(StatusCode::BAD_REQUEST, "Choose Allow or Deny.");
    }
    // Taking the row makes the decision single-use: a double submit issues one code.
    match store::take_pending(&s.db, &pending.pending_id).await {
        Ok(true) => {}
        Ok(false) => return error_page(StatusCode::BAD_REQUEST, "This sign-in request was already used."),
        Err(e) => return failure_page(e),
    }
    let Some(member) = (match &pending.member_id {
        Some(id) => match store::member_by_id(&s.db, id).await {
            Ok(m) => m,
            Err(e) => return failure_page(e),
        },
        None => None,
    }) else {
        return error_page(StatusCode::BAD_REQUEST, "The signed-in member no longer exists.");
    };
    let mut audit = AuditRecord {
        action: "consent.denied".into(),
        outcome: "failure".into(),
        client_id: Some(client.client_id.clone()),
        sub: Some(member.member_id.clone()),
        patient: Some(member.patient_id.clone()),
        detail: "member denied access".into(),
        scope: None,
    };
    let mut resp = if decision == Some("deny") {
        s.audit(audit);
        redirect_error(&pending.redirect_uri, Some(&pending.state), "access_denied", "the member denied access")
    } else {
        let ticked: HashSet<&str> = pairs.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.as_str()).collect();
        // Only what was asked for can be granted; the launch scopes stay whatever the boxes say.
        let granted = ScopeSet::parse(&pending.scope)
            .filter(|sc| sc.is_required_for_launch() || ticked.contains(sc.to_string().as_str()));
        let code = random_token(32);
        let record = CodeRecord {
            code_hash: token_hash(&code),
            client_id: client.client_id.clone(),
            redirect_uri: pending.redirect_uri.clone(),
            code_challenge: pending.code_challenge.clone(),
            scope: granted.to_string(),
            member_id: member.member_id.clone(),
            patient_id: member.patient_id.clone(),
            nonce: pending.nonce.clone(),
            auth_time: pending.auth_time.unwrap_or_else(now),
            family_id: uuid::Uuid::new_v4().to_string(),
            used: false,
            expires_at: now() + i64::try_from(s.config.code_ttl.as_secs()).unwrap_or(60).max(1),
        };
        if let Err(e) = store::insert_code(&s.db, &record).await {
            return failure_page(e);
        }
        audit.action = "consent.approved".into();
        audit.outcome = "success".into();
        audit.detail = "member approved access".into();
        audit.scope = Some(granted.to_string());
        s.audit(audit);
        redirect_to(&pending.redirect_uri, &[("code", &code), ("state", &pending.state)])
    };
    set_cookie(&mut resp, &s, &cookie_name(&pending.pending_id), "", 0);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn repeated_parameters_are_detected() {
        let pairs = form_pairs(b"a=1&b=2&a=3&c=");
        assert!(single(&pairs, "a").is_err());
        assert_eq!(single(&pairs, "b"), Ok(Some("2")));
        assert_eq!(single(&pairs, "c"), Ok(None), "empty counts as absent");
        assert_eq!(single(&pairs, "d"), Ok(None));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("x=1; payerx_authz_abc=secret; y=2"));
        assert_eq!(cookie_value(&h, "payerx_authz_abc").as_deref(), Some("secret"));
        assert_eq!(cookie_value(&h, "payerx_authz_zzz"), None);
    }

    #[test]
    fn error_redirects_keep_the_registered_query() {
        let r = redirect_error("https://app.example/cb?x=1", Some("st"), "access_denied", "no");
        let loc = r.headers()[header::LOCATION].to_str().unwrap();
        assert_eq!(loc, "https://app.example/cb?x=1&error=access_denied&error_description=no&state=st");
    }
}
