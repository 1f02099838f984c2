//! The hyper service: routes, the checks every authenticated route shares
//! (origin, token, room), and JSON error responses.

mod admin;
mod api;
mod demo;
mod upgrade;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{AuthError, Claims};
use crate::room::RoomName;
use crate::state::{unix_millis, ServerState};

pub type HttpResponse = Response<Full<Bytes>>;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// `--listen`: clients, the HTTP API, and the probes unless there is an admin listener.
    Public,
    /// `--admin-listen`: the probes, metrics and the admin API, nothing else.
    Admin,
}

/// The hyper service function.
pub async fn handle(state: Arc<ServerState>, face: Face, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    // The path only: the query may hold a token.
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let answer = match face {
        Face::Public => route(&state, req).await,
        Face::Admin => admin::route(&state, req).await,
    };
    Ok(answer.unwrap_or_else(|e| {
        e.log(&method, &path);
        e.into_response()
    }))
}

/// The probes and metrics, wherever they are served; `None` for other paths.
async fn operations(state: &ServerState, method: &Method, segments: &[&str]) -> Option<Result<HttpResponse, ApiError>> {
    match (method, segments) {
        (&Method::GET, ["healthz"]) => Some(Ok(text(StatusCode::OK, "ok"))),
        (&Method::GET, ["readyz"]) => Some(Ok(readiness(state).await)),
        (&Method::GET, ["metrics"]) => Some(Ok(metrics(state))),
        (_, ["healthz" | "readyz" | "metrics"]) => Some(Err(method_not_allowed())),
        _ => None,
    }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "bad_request", "method not allowed")
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The path split into segments after the leading `/`.
fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

async fn route(state: &Arc<ServerState>, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    let segments = segments(&path);
    let method = req.method().clone();
    // With an admin listener, the probes and metrics live there only.
    if state.config.admin_listen.is_none() {
        if let Some(answer) = operations(state, &method, &segments).await {
            return answer;
        }
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["ws"]) => upgrade::upgrade(state, req, None),
        (&Method::GET, ["ws", room]) => upgrade::upgrade(state, req, Some(room)),
        (&Method::POST, ["rooms", room, "messages"]) => api::publish(state, req, room).await,
        (&Method::GET, ["rooms", room, "history"]) => api::history(state, req, room).await,
        (&Method::GET, ["rooms", room, "presence"]) => api::presence(state, &req, room).await,
        (_, [""] | ["demo", ..]) => demo_route(state, req, &segments).await,
        (_, ["ws"] | ["ws", _] | ["rooms", _, "messages" | "history" | "presence"]) => Err(method_not_allowed()),
        _ => Err(not_found()),
    }
}

/// The chat page and its token route, when the page is on.
async fn demo_route(state: &ServerState, req: Request<Incoming>, segments: &[&str]) -> Result<HttpResponse, ApiError> {
    let Some(secret) = &state.config.demo_secret else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route (the chat page needs --demo)"));
    };
    match (req.method(), segments) {
        (&Method::GET, [""]) => Ok(demo::index()),
        (&Method::POST, ["demo", "token"]) => demo::token(state, secret, req).await,
        (&Method::GET, ["demo", name]) => demo::asset(name),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")),
    }
}

/// 200 when every configured backend answers, else 503 naming the ones that do not.
async fn readiness(state: &ServerState) -> HttpResponse {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        let body = serde_json::json!({"error": "unavailable", "message": "draining: this node is shutting down", "backends": []});
        return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string().into_bytes());
    }
    let unready = state.bus.unready_backends().await;
    if unready.is_empty() {
        return text(StatusCode::OK, "ready");
    }
    let body = serde_json::json!({"error": "unavailable", "message": format!("not ready: {}", unready.join(", ")), "backends": unready});
    json(StatusCode::SERVICE_UNAVAILABLE, body.to_string().into_bytes())
}

fn metrics(state: &ServerState) -> HttpResponse {
    state.metrics.rooms.set(state.bus.registry().room_count() as i64);
    state.metrics.record_memory(state.bus.registry());
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    response
}

/// An HTTP error answer: status and `{"error": code, "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The user, once the token was checked: for the log line.
    sub: Option<Arc<str>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), sub: None }
    }

    /// Names the user who made the failed request, for the log.
    pub fn by(mut self, sub: &Arc<str>) -> Self {
        self.sub = Some(sub.clone());
        self
    }

    /// One `debug` line per failed request, with the user where known and
    /// never a token (neither the query nor an unredacted message).
    fn log(&self, method: &Method, path: &str) {
        tracing::debug!(
            method = %method,
            path = %crate::logging::redact(path),
            status = self.status.as_u16(),
            code = self.code,
            sub = self.sub.as_deref(),
            "request failed: {}",
            crate::logging::redact(&self.message)
        );
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn into_response(self) -> HttpResponse {
        let body = serde_json::json!({"error": self.code, "message": self.message});
        json(self.status, body.to_string().into_bytes())
    }
}

pub fn json(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The checks before any authenticated route: the origin, the token, the
/// room name, and that the token allows the room.
fn authorize<B>(
    state: &ServerState,
    req: &Request<B>,
    room: Option<&str>,
) -> Result<(Claims, Option<RoomName>), ApiError> {
    check_origin(state, req)?;
    let claims = authenticate(state, req)?;
    let Some(room) = room else {
        return Ok((claims, None));
    };
    let room = RoomName::parse(room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !claims.rooms.allows(&room) {
        state.metrics.auth_failure("room");
        return Err(ApiError::forbidden(format!("token does not allow room {room}")).by(&claims.sub));
    }
    Ok((claims, Some(room)))
}

fn check_origin<B>(state: &ServerState, req: &Request<B>) -> Result<(), ApiError> {
    let (Some(allowed), Some(origin)) = (&state.config.allowed_origins, req.headers().get(ORIGIN)) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    if allowed.iter().any(|a| a == origin) {
        return Ok(());
    }
    state.metrics.auth_failure("origin");
    Err(ApiError::forbidden(format!("origin {origin:?} is not allowed")))
}

fn authenticate<B>(state: &ServerState, req: &Request<B>) -> Result<Claims, ApiError> {
    let verified = match bearer_token(req) {
        Some(token) => state.config.verifier.verify(&token),
        None => Err(AuthError::Missing),
    };
    let claims = verified.map_err(|e| {
        state.metrics.auth_failure(e.reason());
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", e.to_string())
    })?;
    if let Some(until) = state.admin.bans.banned_until(&claims.sub, unix_millis()) {
        state.metrics.auth_failure("banned");
        let message = format!("user is banned until {until} (Unix milliseconds)");
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", message).by(&claims.sub));
    }
    Ok(claims)
}

/// The token from `Authorization: Bearer`, else from `?token=`.
fn bearer_token<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    let header = req.headers().get(AUTHORIZATION).and_then(|h| h.to_str().ok());
    // The scheme name is case-insensitive (RFC 7235).
    let token =
        header.and_then(|h| h.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("bearer ")).map(|_| &h[7..]));
    if let Some(token) = token {
        return Some(Cow::Borrowed(token.trim()));
    }
    query_param(req, "token")
}

pub fn query_param<'r, B>(req: &'r Request<B>, name: &str) -> Option<Cow<'r, str>> {
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>, query: &str) -> Request<()> {
        let mut builder = Request::builder().uri(format!("/ws{query}"));
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_header_wins() {
        assert_eq!(bearer_token(&request(Some("Bearer abc"), "")).as_deref(), Some("abc"));
        assert_eq!(bearer_token(&request(Some("bearer abc"), "")).as_deref(), Some("abc"));
        assert_eq!(bearer_token(&request(Some("BEARER abc"), "?token=q")).as_deref(), Some("abc"));
        assert_eq!(bearer_token(&request(Some("Basic abc"), "?token=q")).as_deref(), Some("q"));
        assert_eq!(bearer_token(&request(None, "?a=1&token=q%2B")).as_deref(), Some("q+"));
        assert_eq!(bearer_token(&request(Some("Bear"), "")), None);
    }
}
