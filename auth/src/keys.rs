//! payerx's own signing keys: ES256 (P-256), generated on first start, kept in the database,
//! published as a JWKS. The newest key signs; the newest [`PUBLISHED_KEYS`] stay published and
//! verify, so tokens signed before a rotation stay valid until they expire.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use projections::Db;
use rand::rngs::OsRng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::crypto::{b64url, now_us};
use crate::store::{self, KeyRow};
use crate::AuthError;

/// How many keys stay published (and accepted). Rotate no more often than every access-token
/// lifetime and tokens never outlive their key.
pub const PUBLISHED_KEYS: i64 = 3;

pub(crate) struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub public_jwk: Value,
}

/// The published keys, newest (the signing key) first.
pub(crate) struct KeyRing {
    pub keys: Vec<SigningKey>,
}

impl KeyRing {
    pub fn current(&self) -> Option<&SigningKey> {
        self.keys.first()
    }

    pub fn find(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>()})
    }
}

/// RFC 7638 thumbprint of an EC public key: a `kid` that names the key itself.
fn thumbprint(crv: &str, x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#);
    b64url(&Sha256::digest(canonical.as_bytes()))
}

/// A fresh P-256 key: its row for the database.
fn generate() -> Result<KeyRow, AuthError> {
    let secret = p256::SecretKey::random(&mut OsRng);
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| AuthError::Internal(format!("encoding the signing key: {e}")))?;
    let jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string())
        .map_err(|e| AuthError::Internal(format!("public JWK: {e}")))?;
    let (x, y) = (jwk["x"].as_str().unwrap_or_default(), jwk["y"].as_str().unwrap_or_default());
    let kid = thumbprint("P-256", x, y);
    let public = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
    Ok(KeyRow {
        kid,
        alg: "ES256".to_string(),
        private_pem: pem.to_string(),
        public_jwk: public.to_string(),
        created_us: now_us(),
    })
}

/// Creates a new signing key, which becomes the current one. Returns its `kid`.
pub(crate) async fn create_key(db: &Db) -> Result<String, AuthError> {
    let row = generate()?;
    store::insert_key(db, &row).await?;
    tracing::info!(kid = %row.kid, "created a new token signing key");
    Ok(row.kid)
}

fn parse_row(row: &KeyRow) -> Result<SigningKey, AuthError> {
    let alg: Algorithm = row
        .alg
        .parse()
        .map_err(|_| AuthError::Internal(format!("signing key {}: unknown alg {}", row.kid, row.alg)))?;
    let public_jwk: Value = serde_json::from_str(&row.public_jwk)
        .map_err(|e| AuthError::Internal(format!("signing key {}: public JWK: {e}", row.kid)))?;
    let encoding = EncodingKey::from_ec_pem(row.private_pem.as_bytes())
        .map_err(|e| AuthError::Internal(format!("signing key {}: {e}", row.kid)))?;
    let decoding = DecodingKey::from_ec_components(
        public_jwk["x"].as_str().unwrap_or_default(),
        public_jwk["y"].as_str().unwrap_or_default(),
    )
    .map_err(|e| AuthError::Internal(format!("signing key {}: {e}", row.kid)))?;
    Ok(SigningKey { kid: row.kid.clone(), alg, encoding, decoding, public_jwk })
}

/// Loads the published keys, creating the first one when there is none.
pub(crate) async fn load(db: &Db) -> Result<KeyRing, AuthError> {
    let mut rows = store::recent_keys(db, PUBLISHED_KEYS).await?;
    if rows.is_empty() {
        create_key(db).await?;
        rows = store::recent_keys(db, PUBLISHED_KEYS).await?;
    }
    let keys = rows.iter().map(parse_row).collect::<Result<Vec<_>, _>>()?;
    Ok(KeyRing { keys })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn generated_keys_sign_and_verify() {
        let row = generate().unwrap();
        let key = parse_row(&row).unwrap();
        assert_eq!(key.alg, Algorithm::ES256);
        assert_eq!(key.public_jwk["kid"], row.kid.as_str());
        assert!(key.public_jwk.get("d").is_none(), "the private part is never published");
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &json!({"sub": "x", "exp": 4_000_000_000u64}), &key.encoding).unwrap();
        let v = jsonwebtoken::Validation::new(Algorithm::ES256);
        jsonwebtoken::decode::<Value>(&token, &key.decoding, &v).unwrap();
    }
}
