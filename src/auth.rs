//! JWT authentication: the key the server trusts, the claims it reads, and
//! minting tokens for `chorus token` and the start-up banner.
//!
//! Tokens are checked before the WebSocket upgrade (and again on `refresh`),
//! so everything here is synchronous and cheap for HS256; RS256 and ES256 cost
//! tens of microseconds per check and are the expensive part of a connection
//! storm.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::room::RoomPatterns;

/// The longest `sub` the protocol allows, in bytes.
pub const MAX_SUB_BYTES: usize = 128;

/// What a valid token says about its holder.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user id, shown to others as `from`.
    pub sub: Arc<str>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    pub rooms: RoomPatterns,
}

/// Why a token was refused; the message is safe to show the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send 'Authorization: Bearer <jwt>' or ?token=<jwt>")]
    Missing,
    #[error("{0}")]
    Invalid(String),
}

impl AuthError {
    /// A short label for the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(_) => "invalid",
        }
    }
}

/// Checks tokens against the one key and algorithm the server is configured with.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// The claims as they appear in the token, before our own checks.
#[derive(Deserialize)]
struct RawClaims {
    // Optional here so that a missing one is named in the error, not "malformed".
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    // Parsed only so that a non-numeric `iat` is refused.
    #[serde(default)]
    #[allow(dead_code)]
    iat: Option<u64>,
}

/// Issuer and audience the server insists on, when configured.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Why a key could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the JWT secret must not be empty")]
    EmptySecret,
    #[error("{0} is neither an RSA nor an EC (P-256) public key in PEM form")]
    UnknownPem(String),
}

impl Verifier {
    pub fn from_secret(secret: &[u8], expect: &Expectations) -> Result<Self, KeyError> {
        let key = DecodingKey::from_secret(secret).map_err(|_| KeyError::EmptySecret)?;
        Ok(Self::new(key, Algorithm::HS256, expect))
    }

    /// Loads an RSA (RS256) or EC P-256 (ES256) public key; the key's type
    /// decides the algorithm, so a token signed with anything else is refused.
    pub fn from_public_key_pem(pem: &[u8], name: &str, expect: &Expectations) -> Result<Self, KeyError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256, expect));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, Algorithm::ES256, expect));
        }
        Err(KeyError::UnknownPem(name.to_owned()))
    }

    fn new(key: DecodingKey, algorithm: Algorithm, expect: &Expectations) -> Self {
        let mut validation = Validation::new(algorithm);
        // Expiry is enforced to the second on open connections too, so the
        // upgrade check uses the same clock with no extra leeway.
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned(), "sub".to_owned()]);
        // A configured issuer or audience is required, not only checked when present.
        if let Some(issuer) = &expect.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        match &expect.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        Self { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let raw = data.claims;
        let (Some(sub), Some(exp)) = (raw.sub, raw.exp) else {
            return Err(AuthError::Invalid("missing claim sub or exp".into()));
        };
        if sub.is_empty() || sub.len() > MAX_SUB_BYTES {
            return Err(AuthError::Invalid("sub must be 1 to 128 bytes".into()));
        }
        let rooms = match raw.rooms {
            None => RoomPatterns::any(),
            Some(list) => RoomPatterns::parse(&list).map_err(|e| AuthError::Invalid(e.to_string()))?,
        };
        Ok(Claims { sub: sub.into(), exp, rooms })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "token expired".into(),
        K::ImmatureSignature => "token not yet valid (nbf)".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm => "token signed with an algorithm this server does not accept".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed token".into(),
        _ => format!("invalid token: {e}"),
    }
}

/// Seconds since the Unix epoch, as JWT counts time.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What `chorus token` and the start-up banner put in a token.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl NewToken {
    pub fn new(sub: &str, ttl: Duration) -> Self {
        let now = unix_now();
        Self { sub: sub.to_owned(), exp: now + ttl.as_secs(), iat: now, rooms: None, iss: None, aud: None }
    }

    /// Signs with an HS256 shared secret.
    pub fn sign_hs256(&self, secret: &[u8]) -> Result<String, jsonwebtoken::errors::Error> {
        let key = EncodingKey::from_secret(secret)?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), self, &key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::RoomName;

    const SECRET: &[u8] = b"test-secret";

    fn verifier(expect: Expectations) -> Verifier {
        Verifier::from_secret(SECRET, &expect).unwrap()
    }

    fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
        let key = EncodingKey::from_secret(secret).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    fn err(v: &Verifier, token: &str) -> String {
        v.verify(token).unwrap_err().to_string()
    }

    #[test]
    fn minted_token_round_trips() {
        let mut t = NewToken::new("alice", Duration::from_secs(60));
        t.rooms = Some(vec!["lobby".into(), "team-*".into()]);
        let claims = verifier(Expectations::default()).verify(&t.sign_hs256(SECRET).unwrap()).unwrap();
        assert_eq!(&*claims.sub, "alice");
        assert!(claims.rooms.allows(&RoomName::parse("team-x").unwrap()));
        assert!(!claims.rooms.allows(&RoomName::parse("other").unwrap()));
    }

    #[test]
    fn refuses_bad_signature_expired_and_immature() {
        let v = verifier(Expectations::default());
        let now = unix_now();
        let ok = serde_json::json!({"sub": "a", "exp": now + 60});
        assert_eq!(err(&v, &sign(&ok, b"other")), "bad signature");
        assert_eq!(err(&v, &sign(&serde_json::json!({"sub": "a", "exp": now - 1}), SECRET)), "token expired");
        let early = serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now + 30});
        assert_eq!(err(&v, &sign(&early, SECRET)), "token not yet valid (nbf)");
        assert_eq!(err(&v, "not.a.token"), "malformed token");
    }

    #[test]
    fn requires_sub_and_exp_and_checks_sub_length() {
        let v = verifier(Expectations::default());
        let now = unix_now();
        assert!(err(&v, &sign(&serde_json::json!({"sub": "a"}), SECRET)).contains("exp"));
        assert!(v.verify(&sign(&serde_json::json!({"exp": now + 60}), SECRET)).is_err());
        assert!(v.verify(&sign(&serde_json::json!({"sub": "", "exp": now + 60}), SECRET)).is_err());
        let long = "x".repeat(129);
        assert!(v.verify(&sign(&serde_json::json!({"sub": long, "exp": now + 60}), SECRET)).is_err());
        let bad_rooms = serde_json::json!({"sub": "a", "exp": now + 60, "rooms": ["a b"]});
        assert!(v.verify(&sign(&bad_rooms, SECRET)).is_err());
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let v = verifier(Expectations { issuer: Some("me".into()), audience: Some("chat".into()) });
        let now = unix_now();
        let good = serde_json::json!({"sub": "a", "exp": now + 60, "iss": "me", "aud": "chat"});
        assert!(v.verify(&sign(&good, SECRET)).is_ok());
        let bad_iss = serde_json::json!({"sub": "a", "exp": now + 60, "iss": "you", "aud": "chat"});
        assert_eq!(err(&v, &sign(&bad_iss, SECRET)), "wrong issuer");
        let bad_aud = serde_json::json!({"sub": "a", "exp": now + 60, "iss": "me", "aud": "x"});
        assert_eq!(err(&v, &sign(&bad_aud, SECRET)), "wrong audience");
    }

    #[test]
    fn refuses_other_algorithms() {
        let v = verifier(Expectations::default());
        let claims = serde_json::json!({"sub": "a", "exp": unix_now() + 60});
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap();
        assert!(err(&v, &hs512).contains("algorithm"));
        // alg: none, hand-made: header {"alg":"none","typ":"JWT"}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(v.verify(none).is_err());
    }
}
