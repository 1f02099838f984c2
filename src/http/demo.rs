//! The chat page (clients/chat) and the client module (clients/js), built
//! into the binary, and `POST /demo/token`, which hands whoever asks a token
//! for the name they chose. This is what lets a newcomer run `chorus serve`,
//! open two tabs and chat. Because it mints tokens for anyone, it is served
//! only when the server made its own secret or `--demo` was given
//! (`Config::demo_secret`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::{check_origin, json, ApiError, HttpResponse};
use crate::auth::NewToken;
use crate::state::ServerState;

/// How long a demo token lives; the page's client refreshes it before then.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The largest `POST /demo/token` body read.
const MAX_TOKEN_REQUEST: usize = 1024;

/// A file of the page: its path under `/demo/`, type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("../../clients/chat/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "chat.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../clients/chat/chat.js"),
    },
    Asset {
        name: "chat.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../clients/chat/chat.css"),
    },
    Asset {
        name: "chorus.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../clients/js/chorus.js"),
    },
    Asset {
        name: "chorus.d.ts",
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("../../clients/js/chorus.d.ts"),
    },
];

/// `GET /`: the page.
pub fn index() -> HttpResponse {
    asset_response("text/html; charset=utf-8", INDEX)
}

/// `GET /demo/{name}`: a file of the page, or 404.
pub fn asset(name: &str) -> Result<HttpResponse, ApiError> {
    ASSETS
        .iter()
        .find(|a| a.name == name)
        .map(|a| asset_response(a.content_type, a.body))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file"))
}

fn asset_response(content_type: &'static str, body: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; a restarted newer server must not
    // run yesterday's client.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Deserialize)]
struct TokenRequest {
    name: String,
}

/// `POST /demo/token` with `{"name": ...}`: `{"token": ..., "exp": ...}`.
pub async fn token(state: &ServerState, secret: &str, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    check_origin(state, &req)?;
    let bytes = Limited::new(req.into_body(), MAX_TOKEN_REQUEST)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("could not read body: {e}")))?
        .to_bytes();
    let request: TokenRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body must be {{\"name\": \"...\"}}: {e}")))?;
    let name = request.name.trim();
    if !valid_name(name) {
        return Err(ApiError::bad_request("name must be 1 to 32 of A-Z a-z 0-9 _ - . : @"));
    }
    let mut token = NewToken::new(name, DEMO_TOKEN_TTL);
    token.iss = state.config.jwt_issuer.clone();
    token.aud = state.config.jwt_audience.clone();
    let jwt = token
        .sign_hs256(secret.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let body = serde_json::json!({"token": jwt, "sub": name, "exp": token.exp});
    Ok(json(StatusCode::OK, body.to_string().into_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("alice"));
        assert!(valid_name("a.b-c_d:e@f"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(33)));
        assert!(!valid_name("<script>"));
        assert!(!valid_name("two words"));
    }

    #[test]
    fn every_page_file_is_served() {
        for name in ["chat.js", "chat.css", "chorus.js", "chorus.d.ts"] {
            assert_eq!(asset(name).unwrap().status(), StatusCode::OK, "{name}");
        }
        assert!(asset("../Cargo.toml").is_err());
        assert!(INDEX.contains("/demo/chat.js"));
    }
}
