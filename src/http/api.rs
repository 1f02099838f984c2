//! The HTTP API for backends: publish to a room and read its history
//! (PROTOCOL.md section 6), with the same authorization as WebSockets.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{authorize, json, query_param, ApiError, HttpResponse};
use crate::auth::Claims;
use crate::bus::BusError;
use crate::protocol::inbound;
use crate::protocol::outbound::{write_json_array, write_json_string};
use crate::room::RoomName;
use crate::state::ServerState;

#[derive(Deserialize)]
struct PublishBody {
    body: Box<RawValue>,
}

/// `POST /rooms/{room}/messages` with `{"body": ...}`.
pub async fn publish(state: &Arc<ServerState>, req: Request<Incoming>, room: &str) -> Result<HttpResponse, ApiError> {
    let (claims, room) = authorize(state, &req, Some(room))?;
    let sub = claims.sub.clone();
    publish_as(state, req, claims, room).await.map_err(|e| e.by(&sub))
}

async fn publish_as(
    state: &Arc<ServerState>,
    req: Request<Incoming>,
    claims: Claims,
    room: Option<RoomName>,
) -> Result<HttpResponse, ApiError> {
    let room = room.ok_or_else(|| ApiError::bad_request("missing room"))?;
    let limit = state.config.max_message_bytes;
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("body larger than {limit} bytes");
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message));
        }
        Err(e) => return Err(ApiError::bad_request(format!("could not read body: {e}"))),
    };
    // serde would also read a JSON array positionally into the struct.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request("body must be {\"body\": <json>}"));
    }
    let parsed: PublishBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body must be {{\"body\": <json>}}: {e}")))?;
    let seq = state.bus.publish(&room, &claims.sub, &parsed.body).await.map_err(unavailable)?;
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"room\":");
    write_json_string(&mut out, room.as_str());
    out.extend_from_slice(format!(",\"seq\":{seq}}}").as_bytes());
    Ok(json(StatusCode::OK, out))
}

/// `GET /rooms/{room}/history?before=&limit=`.
pub async fn history(state: &Arc<ServerState>, req: Request<Incoming>, room: &str) -> Result<HttpResponse, ApiError> {
    let (claims, room) = authorize(state, &req, Some(room))?;
    history_of(state, &req, room).await.map_err(|e| e.by(&claims.sub))
}

async fn history_of(
    state: &Arc<ServerState>,
    req: &Request<Incoming>,
    room: Option<RoomName>,
) -> Result<HttpResponse, ApiError> {
    let room: RoomName = room.ok_or_else(|| ApiError::bad_request("missing room"))?;
    let before = number_param(req, "before")?;
    let limit = inbound::limit(number_param(req, "limit")?).map_err(ApiError::bad_request)?;
    let messages = state.bus.history(&room, before, limit).await.map_err(unavailable)?;
    let mut out = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 48);
    out.extend_from_slice(b"{\"room\":");
    write_json_string(&mut out, room.as_str());
    out.extend_from_slice(b",\"messages\":");
    write_json_array(&mut out, messages.iter().map(|m| &m[..]));
    out.push(b'}');
    Ok(json(StatusCode::OK, out))
}

/// `GET /rooms/{room}/presence`: who is in the room, as the `presence` answer.
pub async fn presence(state: &Arc<ServerState>, req: &Request<Incoming>, room: &str) -> Result<HttpResponse, ApiError> {
    let (_, room) = authorize(state, req, Some(room))?;
    let room: RoomName = room.ok_or_else(|| ApiError::bad_request("missing room"))?;
    let body = state
        .presence
        .json(&room)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))?;
    Ok(json(StatusCode::OK, body))
}

fn unavailable(e: BusError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}

/// A query parameter that must be a whole number when present.
fn number_param(req: &Request<Incoming>, name: &str) -> Result<Option<u64>, ApiError> {
    match query_param(req, name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ApiError::bad_request(format!("{name} must be a whole number"))),
    }
}
