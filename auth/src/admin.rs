//! Administration, for the CLI: register and disable apps, add members, rotate signing keys.
//! Every function creates the tables first, so it works on a fresh database.

use std::fmt;
use std::str::FromStr;

use projections::Db;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto::{hash_secret, now, random_token, HashCost};
use crate::jwks::jwks_keys;
use crate::scopes::{Context, Scope, ScopeSet};
use crate::store::{self, ClientRecord, MemberRecord};
use crate::AuthError;

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// A browser or native app that cannot keep a secret: PKCE only.
    #[default]
    Public,
    /// `client_secret_basic`.
    ConfidentialSymmetric,
    /// `private_key_jwt` (SMART Backend Services, payer-to-payer).
    ConfidentialAsymmetric,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Public => "public",
            ClientKind::ConfidentialSymmetric => "confidential-symmetric",
            ClientKind::ConfidentialAsymmetric => "confidential-asymmetric",
        }
    }

    /// The `token_endpoint_auth_method` (RFC 7591) of this kind.
    pub fn auth_method(self) -> &'static str {
        match self {
            ClientKind::Public => "none",
            ClientKind::ConfidentialSymmetric => "client_secret_basic",
            ClientKind::ConfidentialAsymmetric => "private_key_jwt",
        }
    }

    pub fn is_confidential(self) -> bool {
        self != ClientKind::Public
    }
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ClientKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public" => Ok(ClientKind::Public),
            "confidential-symmetric" => Ok(ClientKind::ConfidentialSymmetric),
            "confidential-asymmetric" => Ok(ClientKind::ConfidentialAsymmetric),
            other => Err(format!(
                "unknown client kind {other:?}: use public, confidential-symmetric or confidential-asymmetric"
            )),
        }
    }
}

/// A client to register.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NewClient {
    pub name: String,
    pub kind: ClientKind,
    /// Exact-match redirect URIs (required unless the client only uses client_credentials).
    pub redirect_uris: Vec<String>,
    /// Asymmetric clients: where their JWKS is published ...
    pub jwks_url: Option<String>,
    /// ... or the JWKS itself (`{"keys": [...]}`).
    pub jwks: Option<Value>,
    /// The scopes the client may ever be granted, space-separated.
    pub scope: String,
    /// The organizations the client acts for (a payer's NPI, say). A payer's Consent for
    /// `$member-match` must name one of them as its recipient.
    #[serde(default)]
    pub organizations: Vec<OrganizationId>,
}

/// An organization identifier, `system|value` on the command line and in listings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct OrganizationId {
    pub system: String,
    pub value: String,
}

impl std::str::FromStr for OrganizationId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('|') {
            Some((system, value)) if !system.trim().is_empty() && !value.trim().is_empty() => {
                Ok(OrganizationId { system: system.trim().to_string(), value: value.trim().to_string() })
            }
            _ => Err(format!("organization {s:?}: use SYSTEM|VALUE, e.g. http://hl7.org/fhir/sid/us-npi|1234567893")),
        }
    }
}

impl TryFrom<String> for OrganizationId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::fmt::Display for OrganizationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}|{}", self.system, self.value)
    }
}

impl Serialize for OrganizationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A registered client, as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientInfo {
    pub client_id: String,
    pub name: String,
    pub kind: ClientKind,
    pub token_endpoint_auth_method: String,
    pub redirect_uris: Vec<String>,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    pub enabled: bool,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<OrganizationId>,
}

/// The answer to [`add_client`]: the only time the secret is shown. Serializes to one flat
/// JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientCreated {
    pub client_id: String,
    /// Confidential-symmetric clients only. Stored as an argon2 hash: it cannot be shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub name: String,
    pub kind: ClientKind,
    pub token_endpoint_auth_method: String,
    pub redirect_uris: Vec<String>,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    pub enabled: bool,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<OrganizationId>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberCreated {
    pub member_id: String,
    pub username: String,
    /// `Patient/{id}`.
    pub patient: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRotated {
    /// The new signing key.
    pub kid: String,
    /// Every published key, newest first.
    pub published: Vec<String>,
}

/// Creates the auth tables if they are missing.
pub async fn init(db: &Db) -> Result<(), AuthError> {
    store::init(db).await
}

fn info(c: &ClientRecord) -> ClientInfo {
    ClientInfo {
        client_id: c.client_id.clone(),
        name: c.name.clone(),
        kind: c.kind,
        token_endpoint_auth_method: c.kind.auth_method().to_string(),
        redirect_uris: c.redirect_uris.clone(),
        scope: c.scope.to_string(),
        jwks_url: c.jwks_url.clone(),
        jwks: c.jwks.as_deref().and_then(|j| serde_json::from_str(j).ok()),
        enabled: c.enabled,
        created_at: c.created_at,
        organizations: c.organizations.clone(),
    }
}

/// An absolute `http(s)` URL, or a private-use scheme of a native app (RFC 8252 §7.1); never a
/// fragment (RFC 6749 §3.1.2).
fn validate_redirect_uri(uri: &str) -> Result<(), AuthError> {
    let parsed = url::Url::parse(uri)
        .map_err(|e| AuthError::InvalidRequest(format!("redirect URI {uri:?} is not absolute: {e}")))?;
    if parsed.fragment().is_some() {
        return Err(AuthError::InvalidRequest(format!("redirect URI {uri:?} must not have a fragment")));
    }
    if matches!(parsed.scheme(), "javascript" | "data" | "file" | "vbscript") {
        return Err(AuthError::InvalidRequest(format!("redirect URI {uri:?} has a forbidden scheme")));
    }
    Ok(())
}

fn validate_jwks_url(u: &str) -> Result<(), AuthError> {
    let parsed = url::Url::parse(u).map_err(|e| AuthError::InvalidRequest(format!("jwks_url {u:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(AuthError::InvalidRequest(format!("jwks_url {u:?} must be http(s)")));
    }
    Ok(())
}

/// Inline JWKS: public keys only, each RSA or EC with a `kid`.
fn validate_inline_jwks(jwks: &Value) -> Result<(), AuthError> {
    let keys = jwks_keys(jwks).ok_or_else(|| AuthError::InvalidRequest("jwks must be {\"keys\": [...]}".into()))?;
    if keys.is_empty() {
        return Err(AuthError::InvalidRequest("jwks has no keys".into()));
    }
    for k in &keys {
        if k.get("d").is_some() || k.get("p").is_some() {
            return Err(AuthError::InvalidRequest("jwks must hold public keys only (found a private key)".into()));
        }
        if !matches!(k["kty"].as_str(), Some("RSA" | "EC")) {
            return Err(AuthError::InvalidRequest("jwks keys must be RSA or EC".into()));
        }
        if k["kid"].as_str().is_none() {
            return Err(AuthError::InvalidRequest("every jwks key needs a kid".into()));
        }
        serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone())
            .map_err(|e| AuthError::InvalidRequest(format!("jwks key {}: {e}", k["kid"])))?;
    }
    Ok(())
}

/// Registers a client. Its secret (confidential-symmetric) is in the answer and nowhere else.
pub async fn add_client(db: &Db, new: NewClient) -> Result<ClientCreated, AuthError> {
    init(db).await?;
    let kind = new.kind;
    let name = new.name.trim().to_string();
    if name.is_empty() {
        return Err(AuthError::InvalidRequest("a client needs a name".into()));
    }
    for uri in &new.redirect_uris {
        validate_redirect_uri(uri)?;
    }
    let scope = ScopeSet::parse(&new.scope);
    if scope.is_empty() {
        return Err(AuthError::InvalidRequest("a client needs at least one allowed scope".into()));
    }
    if let Some(Scope::Other(s)) = scope.iter().find(|s| matches!(s, Scope::Other(_))) {
        return Err(AuthError::InvalidRequest(format!("unknown scope {s:?}")));
    }
    let has_system = scope.resource_scopes().any(|r| r.context == Context::System);
    let has_user_facing = scope.resource_scopes().any(|r| r.context != Context::System);
    if kind == ClientKind::Public && has_system {
        return Err(AuthError::InvalidRequest("system/ scopes need a confidential client".into()));
    }
    if kind == ClientKind::Public && new.redirect_uris.is_empty() {
        return Err(AuthError::InvalidRequest("a public client needs at least one redirect URI".into()));
    }
    if has_user_facing && new.redirect_uris.is_empty() {
        return Err(AuthError::InvalidRequest("patient/ and user/ scopes need a redirect URI for the launch".into()));
    }
    let (jwks_url, jwks) = match kind {
        ClientKind::ConfidentialAsymmetric => match (&new.jwks_url, &new.jwks) {
            (Some(u), None) => {
                validate_jwks_url(u)?;
                (Some(u.clone()), None)
            }
            (None, Some(j)) => {
                validate_inline_jwks(j)?;
                (None, Some(j.to_string()))
            }
            _ => {
                return Err(AuthError::InvalidRequest(
                    "a confidential-asymmetric client needs exactly one of jwks_url and jwks".into(),
                ))
            }
        },
        _ if new.jwks_url.is_some() || new.jwks.is_some() => {
            return Err(AuthError::InvalidRequest(format!("a {kind} client has no JWKS")))
        }
        _ => (None, None),
    };
    let secret = (kind == ClientKind::ConfidentialSymmetric).then(|| random_token(32));
    let secret_hash = match &secret {
        Some(s) => Some(hash_secret(s.clone(), HashCost::RandomSecret).await?),
        None => None,
    };
    let record = ClientRecord {
        client_id: uuid::Uuid::new_v4().to_string(),
        name,
        kind,
        secret_hash,
        redirect_uris: new.redirect_uris,
        scope,
        jwks_url,
        jwks,
        enabled: true,
        created_at: now(),
        organizations: new.organizations,
    };
    store::insert_client(db, &record).await?;
    let i = info(&record);
    Ok(ClientCreated {
        client_id: i.client_id,
        client_secret: secret,
        name: i.name,
        kind: i.kind,
        token_endpoint_auth_method: i.token_endpoint_auth_method,
        redirect_uris: i.redirect_uris,
        scope: i.scope,
        jwks_url: i.jwks_url,
        jwks: i.jwks,
        enabled: i.enabled,
        created_at: i.created_at,
        organizations: i.organizations,
    })
}

pub async fn list_clients(db: &Db) -> Result<Vec<ClientInfo>, AuthError> {
    init(db).await?;
    Ok(store::list_clients(db).await?.iter().map(info).collect())
}

pub async fn get_client(db: &Db, client_id: &str) -> Result<Option<ClientInfo>, AuthError> {
    init(db).await?;
    Ok(store::get_client(db, client_id).await?.as_ref().map(info))
}

/// Replaces the organizations a client acts for (none: the client speaks for no organization,
/// and a member-match Consent's recipient is checked against CoverageToLink's payor instead).
pub async fn set_client_organizations(
    db: &Db,
    client_id: &str,
    organizations: &[OrganizationId],
) -> Result<(), AuthError> {
    init(db).await?;
    if store::get_client(db, client_id).await?.is_none() {
        return Err(AuthError::NotFound(format!("no client {client_id:?}")));
    }
    store::set_client_organizations(db, client_id, organizations).await
}

/// Disables a client: it can no longer get tokens, and its unexpired access tokens stop
/// verifying at once. Its refresh tokens stay refused while it is disabled.
pub async fn disable_client(db: &Db, client_id: &str) -> Result<(), AuthError> {
    init(db).await?;
    if !store::set_client_enabled(db, client_id, false).await? {
        return Err(AuthError::NotFound(format!("no client {client_id:?}")));
    }
    Ok(())
}

pub async fn enable_client(db: &Db, client_id: &str) -> Result<(), AuthError> {
    init(db).await?;
    if !store::set_client_enabled(db, client_id, true).await? {
        return Err(AuthError::NotFound(format!("no client {client_id:?}")));
    }
    Ok(())
}

/// A FHIR id (`[A-Za-z0-9\-\.]{1,64}`).
fn is_fhir_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Adds a member who can sign in on the login page, linked to their Patient resource.
/// `patient_id` is `Patient/ID` or `ID`.
pub async fn add_member(db: &Db, username: &str, password: &str, patient_id: &str) -> Result<MemberCreated, AuthError> {
    init(db).await?;
    let username = username.trim();
    if username.is_empty() || username.len() > 256 {
        return Err(AuthError::InvalidRequest("a username must have 1 to 256 characters".into()));
    }
    if password.chars().count() < 8 {
        return Err(AuthError::InvalidRequest("a password needs at least 8 characters".into()));
    }
    let id = patient_id.trim().strip_prefix("Patient/").unwrap_or(patient_id.trim());
    if !is_fhir_id(id) {
        return Err(AuthError::InvalidRequest(format!("{patient_id:?} is not Patient/ID or a FHIR id")));
    }
    if store::member_by_username(db, username).await?.is_some() {
        return Err(AuthError::InvalidRequest(format!("the username {username:?} is taken")));
    }
    let record = MemberRecord {
        member_id: uuid::Uuid::new_v4().to_string(),
        username: username.to_string(),
        password_hash: hash_secret(password.to_string(), HashCost::Password).await?,
        patient_id: id.to_string(),
        failed_logins: 0,
        locked_until: 0,
    };
    store::insert_member(db, &record, now()).await?;
    Ok(MemberCreated { member_id: record.member_id, username: record.username, patient: format!("Patient/{id}") })
}

/// Creates a new signing key, which signs from now on; the previous keys stay published (up to
/// [`crate::keys::PUBLISHED_KEYS`] in all) so tokens they signed keep verifying. A running
/// server picks the new key up within a minute, or at once through
/// [`crate::AuthServer::reload_keys`].
pub async fn rotate_keys(db: &Db) -> Result<KeyRotated, AuthError> {
    init(db).await?;
    let kid = crate::keys::create_key(db).await?;
    let published = store::recent_keys(db, crate::keys::PUBLISHED_KEYS).await?.into_iter().map(|k| k.kid).collect();
    Ok(KeyRotated { kid, published })
}
