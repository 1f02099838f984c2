//! `GET /ws` and `GET /ws/{room}`: every check happens before the upgrade,
//! so a refused client gets a plain HTTP answer, then the socket is handed
//! to a session.

use std::sync::Arc;

use futures_util::future::{Either, FutureExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_EXTENSIONS};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{authorize, ApiError, HttpResponse};
use crate::conn::session;
use crate::state::ServerState;
use crate::ws::{extension, PeerDeflate};

pub fn upgrade(
    state: &Arc<ServerState>,
    mut req: Request<Incoming>,
    room: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let (claims, room) = authorize(state, &req, room)?;
    if state.stop_accepting.is_cancelled() || state.shutdown.is_cancelled() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "shutting down"));
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::new(StatusCode::UPGRADE_REQUIRED, "bad_request", "expected a WebSocket upgrade"));
    }
    // permessage-deflate, only with --compression and when the client offers it.
    let accepted = state.config.compression_min_bytes.and_then(|min| {
        let offers = req.headers().get_all(SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok());
        extension::negotiate(offers).map(|accepted| (accepted, PeerDeflate::new(min, accepted.window_bits())))
    });
    let (mut response, upgrading) =
        fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let deflate = match accepted {
        Some((accepted, peer)) => {
            let value =
                HeaderValue::from_str(&accepted.response()).map_err(|e| ApiError::bad_request(e.to_string()))?;
            response.headers_mut().insert(SEC_WEBSOCKET_EXTENSIONS, value);
            Some(peer)
        }
        None => None,
    };
    let session_state = state.clone();
    // `then` rather than an async block: the task's future is either the
    // upgrade or the session, never both, so every connection's task is
    // only as large as its session.
    let connection = upgrading.then(move |upgraded| {
        let upgraded = match upgraded {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return Either::Right(std::future::ready(()));
            }
        };
        // We gave hyper a TcpStream, so that is what comes back.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                Either::Left(session::run(session_state, parts.io.into_inner(), parts.read_buf, claims, room, deflate))
            }
            Err(_) => {
                tracing::error!("upgraded connection is not a TcpStream");
                Either::Right(std::future::ready(()))
            }
        }
    });
    state.tasks.spawn(connection);
    Ok(response.map(|_| Full::default()))
}
