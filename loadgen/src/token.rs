//! Tokens like a real client's: one HS256 JWT per connection, each with its
//! own `sub` (`lg-<n>`) and an `exp` that outlives the run, or one token read
//! from a file and shared by every connection.

use std::path::Path;

use anyhow::{bail, Context, Result};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;

pub enum TokenSource {
    /// Mint `sub = <prefix><n>` tokens with this key.
    Secret { key: EncodingKey, prefix: String, iat: u64, exp: u64 },
    /// The same token for every connection.
    Fixed(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

impl TokenSource {
    /// From `--jwt-secret` or `--token-file`; `now` and `lifetime` (seconds)
    /// set `iat` and `exp`.
    pub fn new(secret: Option<&str>, token_file: Option<&Path>, prefix: &str, now: u64, lifetime: u64) -> Result<Self> {
        match (secret, token_file) {
            (Some(s), None) => {
                let key = EncodingKey::from_secret(s.as_bytes()).context("--jwt-secret is not a usable HS256 key")?;
                Ok(TokenSource::Secret { key, prefix: prefix.to_string(), iat: now, exp: now + lifetime })
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --token-file {}", path.display()))?;
                let token = text.trim();
                if token.is_empty() {
                    bail!("--token-file {} is empty", path.display());
                }
                Ok(TokenSource::Fixed(token.to_string()))
            }
            (Some(_), Some(_)) => bail!("give either --jwt-secret or --token-file, not both"),
            (None, None) => bail!(
                "no credentials: give --jwt-secret SECRET (or CHORUS_JWT_SECRET) to mint tokens, \
                 or --token-file FILE holding one token"
            ),
        }
    }

    /// The token of connection `n`.
    pub fn token_for(&self, n: usize) -> Result<String> {
        match self {
            TokenSource::Secret { key, prefix, iat, exp } => {
                let sub = format!("{prefix}{n}");
                let claims = Claims { sub: &sub, iat: *iat, exp: *exp };
                encode(&Header::default(), &claims, key).context("cannot sign token")
            }
            TokenSource::Fixed(t) => Ok(t.clone()),
        }
    }

    /// Whether every connection shares one identity.
    pub fn is_shared(&self) -> bool {
        matches!(self, TokenSource::Fixed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct C {
        sub: String,
        exp: u64,
    }

    #[test]
    fn mints_per_connection_subs() {
        let now = crate::clock::Clock::new().unix_secs();
        let src = TokenSource::new(Some("s3cret"), None, "lg-", now, 60).unwrap();
        let t = src.token_for(7).unwrap();
        let v = Validation::default();
        let d = decode::<C>(&t, &DecodingKey::from_secret(b"s3cret").unwrap(), &v).unwrap();
        assert_eq!(d.claims.sub, "lg-7");
        assert_eq!(d.claims.exp, now + 60);
    }

    #[test]
    fn needs_credentials() {
        assert!(TokenSource::new(None, None, "lg-", 0, 1).is_err());
    }
}
