//! The authorization server's tables in the views database, and every query on them. Statements
//! use only what SQLite and PostgreSQL both accept (TEXT, BIGINT; booleans as 0/1; `$n`
//! placeholders in order of first use); times are epoch seconds.

use projections::Db;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::admin::{ClientKind, OrganizationId};
use crate::scopes::ScopeSet;
use crate::AuthError;

const SCHEMA: &[&str] = &[
    // Registered apps. Secrets only as argon2 hashes; redirect URIs as a JSON array.
    "CREATE TABLE IF NOT EXISTS auth_clients (
        client_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        secret_hash TEXT,
        redirect_uris TEXT NOT NULL,
        scope TEXT NOT NULL,
        jwks_url TEXT,
        jwks TEXT,
        enabled BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    // The organizations a client acts for (a payer's NPI, say): a Consent's recipient must be
    // one of them. A table of its own, so databases created before it need no migration.
    "CREATE TABLE IF NOT EXISTS auth_client_organizations (
        client_id TEXT NOT NULL,
        system TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (client_id, system, value)
    )",
    // Members who sign in on the login page; failed_logins / locked_until drive the lockout.
    "CREATE TABLE IF NOT EXISTS auth_members (
        member_id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        failed_logins BIGINT NOT NULL,
        locked_until BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    // An authorization request between GET /authorize and the consent decision. The CSRF token
    // and the browser cookie are stored as hashes and bound to this row.
    "CREATE TABLE IF NOT EXISTS auth_pending (
        pending_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        state TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        scope TEXT NOT NULL,
        nonce TEXT,
        csrf_hash TEXT NOT NULL,
        browser_hash TEXT NOT NULL,
        stage TEXT NOT NULL,
        member_id TEXT,
        attempts BIGINT NOT NULL,
        auth_time BIGINT,
        expires_at BIGINT NOT NULL
    )",
    // Authorization codes by hash; `used` makes them single-use, `family_id` ties the tokens
    // issued from one code together so a replayed code can revoke them.
    "CREATE TABLE IF NOT EXISTS auth_codes (
        code_hash TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        scope TEXT NOT NULL,
        member_id TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        nonce TEXT,
        auth_time BIGINT NOT NULL,
        family_id TEXT NOT NULL,
        used BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    )",
    // Refresh tokens by hash. `scope` is the grant's ceiling; status active | rotated | revoked.
    "CREATE TABLE IF NOT EXISTS auth_refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        family_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        member_id TEXT,
        patient_id TEXT,
        scope TEXT NOT NULL,
        auth_time BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        status TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS auth_refresh_tokens_family ON auth_refresh_tokens (family_id)",
    // Access tokens issued (ids only), so a grant's tokens can be revoked together.
    "CREATE TABLE IF NOT EXISTS auth_access_tokens (
        jti TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        family_id TEXT,
        expires_at BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS auth_access_tokens_family ON auth_access_tokens (family_id)",
    // Revoked access tokens, checked by verify_bearer until they would have expired anyway.
    "CREATE TABLE IF NOT EXISTS auth_revoked_tokens (
        jti TEXT PRIMARY KEY,
        expires_at BIGINT NOT NULL
    )",
    // Client assertion ids seen (RFC 7523 §3 replay protection), kept until their exp.
    "CREATE TABLE IF NOT EXISTS auth_assertion_jtis (
        client_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (client_id, jti)
    )",
    // payerx's own signing keys. The private key is kept as PKCS#8 PEM in the database: whoever
    // can read this table can mint tokens, so the views database must be protected as a secret.
    "CREATE TABLE IF NOT EXISTS auth_signing_keys (
        kid TEXT PRIMARY KEY,
        alg TEXT NOT NULL,
        private_pem TEXT NOT NULL,
        public_jwk TEXT NOT NULL,
        created_us BIGINT NOT NULL
    )",
];

/// Creates the auth tables if they are missing. Idempotent.
pub async fn init(db: &Db) -> Result<(), AuthError> {
    for stmt in SCHEMA {
        db.execute_ddl(stmt).await?;
    }
    Ok(())
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone)]
pub(crate) struct ClientRecord {
    pub client_id: String,
    pub name: String,
    pub kind: ClientKind,
    pub secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub scope: ScopeSet,
    pub jwks_url: Option<String>,
    pub jwks: Option<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub organizations: Vec<OrganizationId>,
}

fn client_from_row(row: &AnyRow) -> Result<ClientRecord, AuthError> {
    let kind: String = row.try_get("kind")?;
    let uris: String = row.try_get("redirect_uris")?;
    let scope: String = row.try_get("scope")?;
    Ok(ClientRecord {
        client_id: row.try_get("client_id")?,
        name: row.try_get("name")?,
        kind: kind.parse().map_err(AuthError::Internal)?,
        secret_hash: row.try_get("secret_hash")?,
        redirect_uris: serde_json::from_str(&uris).map_err(|e| AuthError::Internal(format!("redirect_uris: {e}")))?,
        scope: ScopeSet::parse(&scope),
        jwks_url: row.try_get("jwks_url")?,
        jwks: row.try_get("jwks")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_at: row.try_get("created_at")?,
        organizations: Vec::new(),
    })
}

const CLIENT_COLUMNS: &str =
    "client_id, name, kind, secret_hash, redirect_uris, scope, jwks_url, jwks, enabled, created_at";

pub(crate) async fn insert_client(db: &Db, c: &ClientRecord) -> Result<(), AuthError> {
    let uris = serde_json::to_string(&c.redirect_uris).map_err(|e| AuthError::Internal(e.to_string()))?;
    sqlx::query(&format!(
        "INSERT INTO auth_clients ({CLIENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    ))
    .bind(&c.client_id)
    .bind(&c.name)
    .bind(c.kind.as_str())
    .bind(c.secret_hash.clone())
    .bind(uris)
    .bind(c.scope.to_string())
    .bind(c.jwks_url.clone())
    .bind(c.jwks.clone())
    .bind(flag(c.enabled))
    .bind(c.created_at)
    .execute(&db.pool)
    .await?;
    set_client_organizations(db, &c.client_id, &c.organizations).await
}

/// Replaces the organizations a client acts for.
pub(crate) async fn set_client_organizations(
    db: &Db,
    client_id: &str,
    organizations: &[OrganizationId],
) -> Result<(), AuthError> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("DELETE FROM auth_client_organizations WHERE client_id = $1").bind(client_id).execute(&mut *tx).await?;
    for o in organizations {
        sqlx::query(
            "INSERT INTO auth_client_organizations (client_id, system, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(client_id)
        .bind(&o.system)
        .bind(&o.value)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn with_organizations(db: &Db, mut c: ClientRecord) -> Result<ClientRecord, AuthError> {
    c.organizations = client_status(db, &c.client_id).await?.map(|(_, o)| o).unwrap_or_default();
    Ok(c)
}

pub(crate) async fn get_client(db: &Db, client_id: &str) -> Result<Option<ClientRecord>, AuthError> {
    let row = sqlx::query(&format!("SELECT {CLIENT_COLUMNS} FROM auth_clients WHERE client_id = $1"))
        .bind(client_id)
        .fetch_optional(&db.pool)
        .await?;
    match row.as_ref().map(client_from_row).transpose()? {
        Some(c) => Ok(Some(with_organizations(db, c).await?)),
        None => Ok(None),
    }
}

pub(crate) async fn list_clients(db: &Db) -> Result<Vec<ClientRecord>, AuthError> {
    let rows = sqlx::query(&format!("SELECT {CLIENT_COLUMNS} FROM auth_clients ORDER BY created_at, client_id"))
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(with_organizations(db, client_from_row(row)?).await?);
    }
    Ok(out)
}

/// Returns whether the client exists.
pub(crate) async fn set_client_enabled(db: &Db, client_id: &str, enabled: bool) -> Result<bool, AuthError> {
    let r = sqlx::query("UPDATE auth_clients SET enabled = $1 WHERE client_id = $2")
        .bind(flag(enabled))
        .bind(client_id)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// `Some((enabled, organizations))` for a registered client, `None` for an unknown one: what
/// every verified token needs to know about its client, in one statement.
pub(crate) async fn client_status(db: &Db, client_id: &str) -> Result<Option<(bool, Vec<OrganizationId>)>, AuthError> {
    let rows = sqlx::query(
        "SELECT c.enabled, o.system, o.value FROM auth_clients c
         LEFT JOIN auth_client_organizations o ON o.client_id = c.client_id WHERE c.client_id = $1
         ORDER BY o.system, o.value",
    )
    .bind(client_id)
    .fetch_all(&db.pool)
    .await?;
    let Some(first) = rows.first() else { return Ok(None) };
    let enabled = first.try_get::<i64, _>(0)? != 0;
    let mut organizations = Vec::new();
    for row in &rows {
        if let (Some(system), Some(value)) =
            (row.try_get::<Option<String>, _>(1)?, row.try_get::<Option<String>, _>(2)?)
        {
            organizations.push(OrganizationId { system, value });
        }
    }
    Ok(Some((enabled, organizations)))
}

// ---------------------------------------------------------------------------------------------
// Members

#[derive(Debug, Clone)]
pub(crate) struct MemberRecord {
    pub member_id: String,
    pub username: String,
    pub password_hash: String,
    pub patient_id: String,
    pub failed_logins: i64,
    pub locked_until: i64,
}

fn member_from_row(row: &AnyRow) -> Result<MemberRecord, AuthError> {
    Ok(MemberRecord {
        member_id: row.try_get("member_id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
        patient_id: row.try_get("patient_id")?,
        failed_logins: row.try_get("failed_logins")?,
        locked_until: row.try_get("locked_until")?,
    })
}

const MEMBER_COLUMNS: &str = "member_id, username, password_hash, patient_id, failed_logins, locked_until";

pub(crate) async fn insert_member(db: &Db, m: &MemberRecord, now: i64) -> Result<(), AuthError> {
    sqlx::query(&format!(
        "INSERT INTO auth_members ({MEMBER_COLUMNS}, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(&m.member_id)
    .bind(&m.username)
    .bind(&m.password_hash)
    .bind(&m.patient_id)
    .bind(m.failed_logins)
    .bind(m.locked_until)
    .bind(now)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub(crate) async fn member_by_username(db: &Db, username: &str) -> Result<Option<MemberRecord>, AuthError> {
    let row = sqlx::query(&format!("SELECT {MEMBER_COLUMNS} FROM auth_members WHERE username = $1"))
        .bind(username)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(member_from_row).transpose()
}

pub(crate) async fn member_by_id(db: &Db, member_id: &str) -> Result<Option<MemberRecord>, AuthError> {
    let row = sqlx::query(&format!("SELECT {MEMBER_COLUMNS} FROM auth_members WHERE member_id = $1"))
        .bind(member_id)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(member_from_row).transpose()
}

/// Counts a failed sign-in; at `max` failures in a row the account locks until `lock_until`.
/// Returns whether it is now locked.
pub(crate) async fn record_login_failure(
    db: &Db,
    member_id: &str,
    max: i64,
    lock_until: i64,
) -> Result<bool, AuthError> {
    sqlx::query("UPDATE auth_members SET failed_logins = failed_logins + 1 WHERE member_id = $1")
        .bind(member_id)
        .execute(&db.pool)
        .await?;
    let r = sqlx::query(
        "UPDATE auth_members SET locked_until = $1, failed_logins = 0 WHERE member_id = $2 AND failed_logins >= $3",
    )
    .bind(lock_until)
    .bind(member_id)
    .bind(max)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

pub(crate) async fn reset_login_failures(db: &Db, member_id: &str) -> Result<(), AuthError> {
    sqlx::query("UPDATE auth_members SET failed_logins = 0, locked_until = 0 WHERE member_id = $1")
        .bind(member_id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pending authorizations

#[derive(Debug, Clone)]
pub(crate) struct PendingRecord {
    pub pending_id: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub state: String,
    pub code_challenge: String,
    pub scope: String,
    pub nonce: Option<String>,
    pub csrf_hash: String,
    pub browser_hash: String,
    pub stage: String,
    pub member_id: Option<String>,
    pub attempts: i64,
    pub auth_time: Option<i64>,
    pub expires_at: i64,
}

pub(crate) async fn insert_pending(db: &Db, p: &PendingRecord) -> Result<(), AuthError> {
    sqlx::query(
        "INSERT INTO auth_pending (pending_id, client_id, redirect_uri, state, code_challenge, scope, nonce, \
         csrf_hash, browser_hash, stage, member_id, attempts, auth_time, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&p.pending_id)
    .bind(&p.client_id)
    .bind(&p.redirect_uri)
    .bind(&p.state)
    .bind(&p.code_challenge)
    .bind(&p.scope)
    .bind(p.nonce.clone())
    .bind(&p.csrf_hash)
    .bind(&p.browser_hash)
    .bind(&p.stage)
    .bind(p.member_id.clone())
    .bind(p.attempts)
    .bind(p.auth_time)
    .bind(p.expires_at)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub(crate) async fn get_pending(db: &Db, pending_id: &str) -> Result<Option<PendingRecord>, AuthError> {
    let row = sqlx::query(
        "SELECT pending_id, client_id, redirect_uri, state, code_challenge, scope, nonce, csrf_hash, browser_hash, \
         stage, member_id, attempts, auth_time, expires_at FROM auth_pending WHERE pending_id = $1",
    )
    .bind(pending_id)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(PendingRecord {
        pending_id: row.try_get("pending_id")?,
        client_id: row.try_get("client_id")?,
        redirect_uri: row.try_get("redirect_uri")?,
        state: row.try_get("state")?,
        code_challenge: row.try_get("code_challenge")?,
        scope: row.try_get("scope")?,
        nonce: row.try_get("nonce")?,
        csrf_hash: row.try_get("csrf_hash")?,
        browser_hash: row.try_get("browser_hash")?,
        stage: row.try_get("stage")?,
        member_id: row.try_get("member_id")?,
        attempts: row.try_get("attempts")?,
        auth_time: row.try_get("auth_time")?,
        expires_at: row.try_get("expires_at")?,
    }))
}

pub(crate) async fn count_pending_attempt(db: &Db, pending_id: &str) -> Result<(), AuthError> {
    sqlx::query("UPDATE auth_pending SET attempts = attempts + 1 WHERE pending_id = $1")
        .bind(pending_id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Moves a pending authorization from login to consent, with a fresh CSRF token. Conditional on
/// the stage, so two racing logins cannot both advance it.
pub(crate) async fn advance_pending_to_consent(
    db: &Db,
    pending_id: &str,
    member_id: &str,
    auth_time: i64,
    csrf_hash: &str,
) -> Result<bool, AuthError> {
    let r = sqlx::query(
        "UPDATE auth_pending SET stage = 'consent', member_id = $1, auth_time = $2, csrf_hash = $3 \
         WHERE pending_id = $4 AND stage = 'login'",
    )
    .bind(member_id)
    .bind(auth_time)
    .bind(csrf_hash)
    .bind(pending_id)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Deletes a pending authorization; whether this call was the one that removed it (so a
/// double-submitted consent form issues one code, not two).
pub(crate) async fn take_pending(db: &Db, pending_id: &str) -> Result<bool, AuthError> {
    let r = sqlx::query("DELETE FROM auth_pending WHERE pending_id = $1").bind(pending_id).execute(&db.pool).await?;
    Ok(r.rows_affected() > 0)
}

// ---------------------------------------------------------------------------------------------
// Authorization codes

#[derive(Debug, Clone)]
pub(crate) struct CodeRecord {
    pub code_hash: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub scope: String,
    pub member_id: String,
    pub patient_id: String,
    pub nonce: Option<String>,
    pub auth_time: i64,
    pub family_id: String,
    pub used: bool,
    pub expires_at: i64,
}

pub(crate) async fn insert_code(db: &Db, c: &CodeRecord) -> Result<(), AuthError> {
    sqlx::query(
        "INSERT INTO auth_codes (code_hash, client_id, redirect_uri, code_challenge, scope, member_id, patient_id, \
         nonce, auth_time, family_id, used, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&c.code_hash)
    .bind(&c.client_id)
    .bind(&c.redirect_uri)
    .bind(&c.code_challenge)
    .bind(&c.scope)
    .bind(&c.member_id)
    .bind(&c.patient_id)
    .bind(c.nonce.clone())
    .bind(c.auth_time)
    .bind(&c.family_id)
    .bind(flag(c.used))
    .bind(c.expires_at)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub(crate) async fn get_code(db: &Db, code_hash: &str) -> Result<Option<CodeRecord>, AuthError> {
    let row = sqlx::query(
        "SELECT code_hash, client_id, redirect_uri, code_challenge, scope, member_id, patient_id, nonce, auth_time, \
         family_id, used, expires_at FROM auth_codes WHERE code_hash = $1",
    )
    .bind(code_hash)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(CodeRecord {
        code_hash: row.try_get("code_hash")?,
        client_id: row.try_get("client_id")?,
        redirect_uri: row.try_get("redirect_uri")?,
        code_challenge: row.try_get("code_challenge")?,
        scope: row.try_get("scope")?,
        member_id: row.try_get("member_id")?,
        patient_id: row.try_get("patient_id")?,
        nonce: row.try_get("nonce")?,
        auth_time: row.try_get("auth_time")?,
        family_id: row.try_get("family_id")?,
        used: row.try_get::<i64, _>("used")? != 0,
        expires_at: row.try_get("expires_at")?,
    }))
}

/// Marks a code used; false when it already was (atomic, so a code is redeemed once).
pub(crate) async fn consume_code(db: &Db, code_hash: &str) -> Result<bool, AuthError> {
    let r = sqlx::query("UPDATE auth_codes SET used = 1 WHERE code_hash = $1 AND used = 0")
        .bind(code_hash)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

// ---------------------------------------------------------------------------------------------
// Refresh tokens

#[derive(Debug, Clone)]
pub(crate) struct RefreshRecord {
    pub token_hash: String,
    pub family_id: String,
    pub client_id: String,
    pub member_id: Option<String>,
    pub patient_id: Option<String>,
    pub scope: String,
    pub auth_time: i64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub status: String,
}

pub(crate) async fn insert_refresh(db: &Db, r: &RefreshRecord) -> Result<(), AuthError> {
    sqlx::query(
        "INSERT INTO auth_refresh_tokens (token_hash, family_id, client_id, member_id, patient_id, scope, auth_time, \
         issued_at, expires_at, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&r.token_hash)
    .bind(&r.family_id)
    .bind(&r.client_id)
    .bind(r.member_id.clone())
    .bind(r.patient_id.clone())
    .bind(&r.scope)
    .bind(r.auth_time)
    .bind(r.issued_at)
    .bind(r.expires_at)
    .bind(&r.status)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub(crate) async fn get_refresh(db: &Db, token_hash: &str) -> Result<Option<RefreshRecord>, AuthError> {
    let row = sqlx::query(
        "SELECT token_hash, family_id, client_id, member_id, patient_id, scope, auth_time, issued_at, expires_at, \
         status FROM auth_refresh_tokens WHERE token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(RefreshRecord {
        token_hash: row.try_get("token_hash")?,
        family_id: row.try_get("family_id")?,
        client_id: row.try_get("client_id")?,
        member_id: row.try_get("member_id")?,
        patient_id: row.try_get("patient_id")?,
        scope: row.try_get("scope")?,
        auth_time: row.try_get("auth_time")?,
        issued_at: row.try_get("issued_at")?,
        expires_at: row.try_get("expires_at")?,
        status: row.try_get("status")?,
    }))
}

/// Marks an active refresh token rotated; false when it was not active (reuse or a race).
pub(crate) async fn rotate_refresh(db: &Db, token_hash: &str) -> Result<bool, AuthError> {
    let r =
        sqlx::query("UPDATE auth_refresh_tokens SET status = 'rotated' WHERE token_hash = $1 AND status = 'active'")
            .bind(token_hash)
            .execute(&db.pool)
            .await?;
    Ok(r.rows_affected() > 0)
}

/// Revokes every refresh token and every unexpired access token of one grant.
pub(crate) async fn revoke_family(db: &Db, family_id: &str, now: i64) -> Result<(), AuthError> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("UPDATE auth_refresh_tokens SET status = 'revoked' WHERE family_id = $1")
        .bind(family_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO auth_revoked_tokens (jti, expires_at) SELECT jti, expires_at FROM auth_access_tokens \
         WHERE family_id = $1 AND expires_at > $2 ON CONFLICT DO NOTHING",
    )
    .bind(family_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Access tokens, revocation, assertion replay

pub(crate) async fn record_access_token(
    db: &Db,
    jti: &str,
    client_id: &str,
    family_id: Option<&str>,
    expires_at: i64,
) -> Result<(), AuthError> {
    sqlx::query("INSERT INTO auth_access_tokens (jti, client_id, family_id, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(jti)
        .bind(client_id)
        .bind(family_id.map(str::to_string))
        .bind(expires_at)
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub(crate) async fn revoke_jti(db: &Db, jti: &str, expires_at: i64) -> Result<(), AuthError> {
    sqlx::query("INSERT INTO auth_revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(jti)
        .bind(expires_at)
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub(crate) async fn is_jti_revoked(db: &Db, jti: &str) -> Result<bool, AuthError> {
    let row =
        sqlx::query("SELECT jti FROM auth_revoked_tokens WHERE jti = $1").bind(jti).fetch_optional(&db.pool).await?;
    Ok(row.is_some())
}

/// Records a client assertion's `jti`; false when the client used it before (a replay).
pub(crate) async fn record_assertion_jti(
    db: &Db,
    client_id: &str,
    jti: &str,
    expires_at: i64,
) -> Result<bool, AuthError> {
    let r = sqlx::query(
        "INSERT INTO auth_assertion_jtis (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(client_id)
    .bind(jti)
    .bind(expires_at)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Deletes what has expired: nothing in these rows can be used after its expiry anyway.
/// Expired assertion ids may go too: an assertion past its `exp` is refused before its id is
/// looked at.
pub(crate) async fn sweep(db: &Db, now: i64) -> Result<(), AuthError> {
    for stmt in [
        "DELETE FROM auth_pending WHERE expires_at < $1",
        "DELETE FROM auth_codes WHERE expires_at < $1",
        "DELETE FROM auth_refresh_tokens WHERE expires_at < $1",
        "DELETE FROM auth_access_tokens WHERE expires_at < $1",
        "DELETE FROM auth_revoked_tokens WHERE expires_at < $1",
        "DELETE FROM auth_assertion_jtis WHERE expires_at < $1",
    ] {
        sqlx::query(stmt).bind(now).execute(&db.pool).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Signing keys

#[derive(Debug, Clone)]
pub(crate) struct KeyRow {
    pub kid: String,
    pub alg: String,
    pub private_pem: String,
    pub public_jwk: String,
    pub created_us: i64,
}

pub(crate) async fn insert_key(db: &Db, k: &KeyRow) -> Result<(), AuthError> {
    sqlx::query(
        "INSERT INTO auth_signing_keys (kid, alg, private_pem, public_jwk, created_us) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&k.kid)
    .bind(&k.alg)
    .bind(&k.private_pem)
    .bind(&k.public_jwk)
    .bind(k.created_us)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// The newest `limit` keys, newest first.
pub(crate) async fn recent_keys(db: &Db, limit: i64) -> Result<Vec<KeyRow>, AuthError> {
    let rows = sqlx::query(
        "SELECT kid, alg, private_pem, public_jwk, created_us FROM auth_signing_keys \
         ORDER BY created_us DESC, kid DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(KeyRow {
                kid: row.try_get("kid")?,
                alg: row.try_get("alg")?,
                private_pem: row.try_get("private_pem")?,
                public_jwk: row.try_get("public_jwk")?,
                created_us: row.try_get("created_us")?,
            })
        })
        .collect()
}
