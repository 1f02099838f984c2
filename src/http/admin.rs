//! The admin listener (`--admin-listen`, PROTOCOL.md section 10): the
//! probes, the metrics and the admin API, on an address that operators bind
//! privately. It has no authentication of its own, so nothing a client may
//! reach is served here, and none of this is served to clients.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;

use super::{not_found, operations, segments, ApiError, HttpResponse};
use crate::state::ServerState;

pub async fn route(state: &Arc<ServerState>, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    let segments = segments(&path);
    let method = req.method().clone();
    if let Some(answer) = operations(state, &method, &segments).await {
        return answer;
    }
    Err(not_found())
}
