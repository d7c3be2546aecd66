//! Small crypto helpers: random tokens, hashes for looking tokens up, argon2 for passwords and
//! client secrets, PKCE.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::AuthError;

/// Seconds since the epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Microseconds since the epoch (orders signing keys created within one second).
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `bytes` random bytes from the OS, base64url without padding.
pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// SHA-256, base64url. High-entropy tokens (codes, refresh tokens, CSRF tokens) are stored and
/// looked up by this hash, so a copy of the database holds nothing a client could present.
pub(crate) fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Constant-time equality of two strings of public length.
pub(crate) fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// PKCE S256 (RFC 7636 §4.6): `BASE64URL(SHA256(verifier)) == challenge`.
pub(crate) fn pkce_s256_matches(verifier: &str, challenge: &str) -> bool {
    ct_eq(&b64url(&Sha256::digest(verifier.as_bytes())), challenge)
}

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~"`.
pub(crate) fn is_valid_code_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// An S256 challenge is a base64url SHA-256: 43 characters.
pub(crate) fn is_valid_s256_challenge(c: &str) -> bool {
    c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How much work an argon2id hash costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashCost {
    /// Member passwords: the OWASP-recommended argon2id setting (19 MiB, 2 passes).
    Password,
    /// Client secrets: 256 random bits, beyond any brute force, so the hash needs salt but not
    /// much memory; a light setting keeps the token endpoint cheap to call (4 MiB, 1 pass).
    RandomSecret,
}

fn hasher(cost: HashCost) -> Argon2<'static> {
    match cost {
        HashCost::Password => Argon2::default(),
        HashCost::RandomSecret => match argon2::Params::new(4096, 1, 1, None) {
            Ok(p) => Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p),
            Err(_) => Argon2::default(),
        },
    }
}

/// An argon2id hash (PHC string) with a fresh salt.
fn hash_secret_blocking(secret: &str, cost: HashCost) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    hasher(cost)
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Internal(format!("argon2: {e}")))
}

/// The parameters come from the PHC string, so hashes of either cost verify here.
fn verify_secret_blocking(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(secret.as_bytes(), &h).is_ok())
}

/// Hashes off the async threads: argon2 is deliberately slow.
pub(crate) async fn hash_secret(secret: String, cost: HashCost) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || hash_secret_blocking(&secret, cost))
        .await
        .map_err(|e| AuthError::Internal(format!("hashing task: {e}")))?
}

/// Verifies in constant time (argon2 compares the digests in constant time). `None` stands for
/// an unknown account: a hash of the same cost is still checked so the answer takes as long
/// either way.
pub(crate) async fn verify_secret(secret: String, phc: Option<String>, cost: HashCost) -> bool {
    tokio::task::spawn_blocking(move || match phc {
        Some(phc) => verify_secret_blocking(&secret, &phc),
        None => {
            let _ = verify_secret_blocking(&secret, dummy_hash(cost));
            false
        }
    })
    .await
    .unwrap_or(false)
}

fn dummy_hash(cost: HashCost) -> &'static str {
    static PASSWORD: OnceLock<String> = OnceLock::new();
    static SECRET: OnceLock<String> = OnceLock::new();
    let cell = match cost {
        HashCost::Password => &PASSWORD,
        HashCost::RandomSecret => &SECRET,
    };
    cell.get_or_init(|| hash_secret_blocking("payerx-dummy-secret", cost).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_s256_matches(verifier, challenge));
        assert!(!pkce_s256_matches("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx", challenge));
        assert!(is_valid_code_verifier(verifier));
        assert!(!is_valid_code_verifier("short"));
        assert!(!is_valid_code_verifier(&"a".repeat(129)));
        assert!(!is_valid_code_verifier(&format!("{}+", "a".repeat(43))));
        assert!(is_valid_s256_challenge(challenge));
        assert!(!is_valid_s256_challenge("plain-challenge"));
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "abcd"));
    }

    #[test]
    fn random_tokens_are_distinct_and_url_safe() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(token_hash("x"), token_hash("x"));
        assert_ne!(token_hash("x"), token_hash("y"));
    }

    #[tokio::test]
    async fn argon2_round_trip() {
        for cost in [HashCost::Password, HashCost::RandomSecret] {
            let h = hash_secret("correct horse".into(), cost).await.unwrap();
            assert!(h.starts_with("$argon2id$"));
            assert!(verify_secret("correct horse".into(), Some(h.clone()), cost).await);
            assert!(!verify_secret("wrong horse".into(), Some(h), cost).await);
            assert!(!verify_secret("anything".into(), None, cost).await);
            assert!(!verify_secret("anything".into(), Some("not a hash".into()), cost).await);
        }
        let light = hash_secret("x".into(), HashCost::RandomSecret).await.unwrap();
        assert!(light.contains("m=4096,t=1,p=1"), "{light}");
    }
}
