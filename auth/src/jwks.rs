//! Other parties' public keys: a client's JWKS (inline or at its `jwks_url`) and the external
//! identity provider's. Remote sets are cached and fetched again when stale or when a token names
//! a `kid` the cached set lacks (the other side rotated), at most once per [`REFETCH_INTERVAL`]
//! so tokens with made-up `kid`s cannot make payerx hammer the other side.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use crate::AuthError;

const FRESH_FOR: Duration = Duration::from_secs(600);
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 256 * 1024;

struct Entry {
    keys: Vec<Value>,
    fetched: Instant,
}

pub(crate) struct JwksCache {
    http: reqwest::Client,
    entries: Mutex<HashMap<String, Entry>>,
    /// Last refetch for an unknown `kid`, per URL.
    attempts: Mutex<HashMap<String, Instant>>,
    /// Last failed fetch, per URL.
    failures: Mutex<HashMap<String, Instant>>,
}

impl JwksCache {
    pub fn new() -> JwksCache {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        JwksCache {
            http,
            entries: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, url: &str) -> Option<(Vec<Value>, bool)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(url).map(|e| (e.keys.clone(), e.fetched.elapsed() < FRESH_FOR))
    }

    /// Whether a refetch of `url` for an unknown `kid` may start now (and if so, notes it).
    fn may_refetch(&self, url: &str) -> bool {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        match attempts.get(url) {
            Some(t) if t.elapsed() < REFETCH_INTERVAL => false,
            _ => {
                attempts.insert(url.to_string(), Instant::now());
                true
            }
        }
    }

    /// Whether the last fetch of `url` failed a moment ago (then do not try again yet).
    fn failed_recently(&self, url: &str) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.get(url).is_some_and(|t| t.elapsed() < REFETCH_INTERVAL)
    }

    fn note_failure(&self, url: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).insert(url.to_string(), Instant::now());
    }

    async fn fetch(&self, url: &str) -> Result<Vec<Value>, AuthError> {
        let resp = self
            .http
            .get(url)
            .header("accept", "application/json, application/jwk-set+json")
            .send()
            .await
            .map_err(|e| AuthError::Unavailable(format!("fetching the JWKS at {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(AuthError::Unavailable(format!("fetching the JWKS at {url}: HTTP {}", resp.status())));
        }
        let body = resp.bytes().await.map_err(|e| AuthError::Unavailable(format!("reading the JWKS at {url}: {e}")))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(AuthError::Unavailable(format!("the JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes")));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| AuthError::Unavailable(format!("the JWKS at {url} is not JSON: {e}")))?;
        let keys =
            jwks_keys(&v).ok_or_else(|| AuthError::Unavailable(format!("the JWKS at {url} has no keys array")))?;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_string(), Entry { keys: keys.clone(), fetched: Instant::now() });
        Ok(keys)
    }

    /// The key at `url` for a token signed with `alg` under `kid`.
    pub async fn key(&self, url: &str, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let cached = self.cached(url);
        if let Some((keys, fresh)) = &cached {
            if *fresh {
                if let Ok(k) = select_key(keys, kid, alg) {
                    return Ok(k);
                }
            }
        }
        // A cold or stale cache is fetched unless that just failed; a fresh one that lacks
        // the kid is fetched again at most once per REFETCH_INTERVAL.
        let fetch = match &cached {
            Some((_, true)) => self.may_refetch(url),
            _ => !self.failed_recently(url),
        };
        if fetch {
            match self.fetch(url).await {
                Ok(keys) => return select_key(&keys, kid, alg),
                Err(e) => {
                    self.note_failure(url);
                    // A stale copy beats no copy while the other side is down.
                    return match &cached {
                        Some((keys, _)) => select_key(keys, kid, alg).map_err(|_| e),
                        None => Err(e),
                    };
                }
            }
        }
        match cached {
            Some((keys, _)) => select_key(&keys, kid, alg),
            None => Err(AuthError::Unavailable(format!("the JWKS at {url} could not be fetched; retry shortly"))),
        }
    }
}

/// The `keys` array of a JWK Set.
pub(crate) fn jwks_keys(v: &Value) -> Option<Vec<Value>> {
    v.get("keys")?.as_array().cloned()
}

/// Which JWK key type and curve an algorithm needs.
fn alg_fits(alg: Algorithm, jwk: &Value) -> bool {
    let kty = jwk["kty"].as_str().unwrap_or_default();
    let crv = jwk["crv"].as_str().unwrap_or_default();
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => kty == "RSA",
        Algorithm::ES256 => kty == "EC" && crv == "P-256",
        Algorithm::ES384 => kty == "EC" && crv == "P-384",
        Algorithm::EdDSA => kty == "OKP" && crv == "Ed25519",
        // Symmetric algorithms never verify against published keys.
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => false,
    }
}

fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// Picks the key for `kid` (or, without a `kid`, the one key that fits `alg`), checking it may
/// sign with `alg`.
pub(crate) fn select_key(keys: &[Value], kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
    let usable = |k: &&Value| {
        alg_fits(alg, k)
            && k.get("use").and_then(Value::as_str).is_none_or(|u| u == "sig")
            && k.get("alg").and_then(Value::as_str).is_none_or(|a| a == alg_name(alg))
    };
    let candidates: Vec<&Value> = match kid {
        Some(kid) => keys.iter().filter(|k| k["kid"].as_str() == Some(kid)).collect(),
        None => keys.iter().filter(usable).collect(),
    };
    let jwk = match (kid, candidates.as_slice()) {
        (Some(kid), []) => return Err(AuthError::InvalidToken(format!("no published key has kid {kid:?}"))),
        (None, []) => return Err(AuthError::InvalidToken(format!("no published key fits {}", alg_name(alg)))),
        (None, [_, _, ..]) => {
            return Err(AuthError::InvalidToken("the token has no kid and several keys could have signed it".into()))
        }
        (_, [only, ..]) => *only,
    };
    if !usable(&jwk) {
        return Err(AuthError::InvalidToken(format!("the key {:?} is not for {}", jwk["kid"], alg_name(alg))));
    }
    let parsed: Jwk =
        serde_json::from_value(jwk.clone()).map_err(|e| AuthError::InvalidToken(format!("unusable JWK: {e}")))?;
    DecodingKey::from_jwk(&parsed).map_err(|e| AuthError::InvalidToken(format!("unusable JWK: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn ec(kid: &str, crv: &str) -> Value {
        // A valid P-256 point (the RFC 7517 appendix A.1 example); the curve name is what is tested.
        json!({"kty": "EC", "crv": crv, "kid": kid,
               "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"})
    }

    #[test]
    fn selects_by_kid_and_alg() {
        let keys = vec![ec("a", "P-256"), ec("b", "P-384")];
        assert!(select_key(&keys, Some("a"), Algorithm::ES256).is_ok());
        assert!(select_key(&keys, Some("a"), Algorithm::ES384).is_err(), "curve must fit alg");
        assert!(select_key(&keys, Some("a"), Algorithm::RS384).is_err());
        assert!(select_key(&keys, Some("a"), Algorithm::HS256).is_err(), "never HMAC with a public key");
        assert!(select_key(&keys, Some("zzz"), Algorithm::ES256).is_err());
        // Without a kid: only when exactly one key fits.
        assert!(select_key(&keys, None, Algorithm::ES256).is_ok());
        let two = vec![ec("a", "P-256"), ec("c", "P-256")];
        assert!(select_key(&two, None, Algorithm::ES256).is_err());
        // A key pinned to another alg, or for encryption, is refused.
        let mut pinned = ec("p", "P-256");
        pinned["alg"] = json!("ES384");
        assert!(select_key(&[pinned], Some("p"), Algorithm::ES256).is_err());
        let mut enc = ec("e", "P-256");
        enc["use"] = json!("enc");
        assert!(select_key(&[enc], Some("e"), Algorithm::ES256).is_err());
    }
}
