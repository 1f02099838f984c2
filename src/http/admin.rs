//! The admin listener (`--admin-listen`, PROTOCOL.md section 10): the
//! probes, the metrics and the admin API, on an address that operators bind
//! privately. It has no authentication of its own, so nothing a client may
//! reach is served here, and none of this is served to clients.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use super::{json, method_not_allowed, not_found, operations, query_param, segments, ApiError, HttpResponse};
use crate::admin::{self, Outcome};
use crate::protocol::outbound::write_json_string;
use crate::state::ServerState;

/// The longest `sub` a token may carry (PROTOCOL.md section 1).
const MAX_SUB_BYTES: usize = 128;

pub async fn route(state: &Arc<ServerState>, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    let segments = segments(&path);
    let method = req.method().clone();
    if let Some(answer) = operations(state, &method, &segments).await {
        return answer;
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["admin", "users", sub, "disconnect"]) => disconnect(state, &req, sub).await,
        (_, ["admin", "users", _, "disconnect"]) => Err(method_not_allowed()),
        _ => Err(not_found()),
    }
}

/// `POST /admin/users/{sub}/disconnect[?ban=DURATION]`.
async fn disconnect(state: &Arc<ServerState>, req: &Request<Incoming>, sub: &str) -> Result<HttpResponse, ApiError> {
    let sub =
        percent_decode(sub).ok_or_else(|| ApiError::bad_request("the user id is not valid percent-encoded UTF-8"))?;
    if sub.is_empty() || sub.len() > MAX_SUB_BYTES {
        return Err(ApiError::bad_request(format!("a user id is 1 to {MAX_SUB_BYTES} bytes")));
    }
    let ban = match query_param(req, "ban") {
        None => None,
        Some(text) => Some(ban_duration(&text)?),
    };
    match admin::disconnect(state, &sub, ban).await {
        Ok(outcome) => Ok(json(StatusCode::OK, answer(&sub, outcome))),
        Err((outcome, e)) => {
            let message = format!(
                "closed {} connection(s) on this node{}, but the other nodes could not be told: {e}",
                outcome.closed,
                if outcome.banned_until.is_some() { " and banned the user here" } else { "" }
            );
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message))
        }
    }
}

fn ban_duration(text: &str) -> Result<Duration, ApiError> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| ApiError::bad_request(format!("ban must be a duration with a unit (10m, 1h): {e}")))?;
    if duration.is_zero() {
        return Err(ApiError::bad_request("ban must be longer than zero"));
    }
    // Far enough for any real ban, near enough that milliseconds since the epoch stay exact in JSON.
    if duration > Duration::from_secs(100 * 365 * 24 * 3600) {
        return Err(ApiError::bad_request("ban must be at most 100 years"));
    }
    Ok(duration)
}

/// `{"sub":..,"closed":N,"banned_until":..}`.
fn answer(sub: &str, outcome: Outcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + sub.len());
    out.extend_from_slice(b"{\"sub\":");
    write_json_string(&mut out, sub);
    let until = outcome.banned_until.map_or_else(|| "null".to_owned(), |u| u.to_string());
    out.extend_from_slice(format!(",\"closed\":{},\"banned_until\":{until}}}", outcome.closed).as_bytes());
    out
}

/// A path segment's `%XX` escapes decoded (`+` stays a plus in a path).
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_in_the_path_are_percent_decoded() {
        assert_eq!(percent_decode("alice").as_deref(), Some("alice"));
        assert_eq!(percent_decode("a%20b%2Fc+d").as_deref(), Some("a b/c+d"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn bans_take_a_positive_duration_with_a_unit() {
        assert_eq!(ban_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(ban_duration("10").is_err());
        assert!(ban_duration("0s").is_err());
        assert!(ban_duration("1000years").is_err());
    }
}
