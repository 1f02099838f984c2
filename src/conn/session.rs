//! One connection's reader loop: reads frames, applies the rate limit,
//! answers requests, and leaves every room when the connection ends.
//!
//! Replies go through the connection's queue like everything else, so they
//! are ordered with the room messages around them: a sender that is a member
//! gets its `message` before its `ack`.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::net::TcpStream;

use super::outbox::{Phase, PushError};
use super::rate::{Limit, TokenBucket};
use super::{Connection, Setup};
use crate::auth::Claims;
use crate::protocol::outbound::{self, ErrorCode};
use crate::protocol::{parse_request, Request, RequestKind};
use crate::registry::Since;
use crate::room::RoomName;
use crate::state::ServerState;
use crate::ws::linger::Bounds;
use crate::ws::{self, FrameReader, Incoming, PeerDeflate};

/// How long a closing connection waits for its close frame to be written.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

struct Session {
    state: Arc<ServerState>,
    conn: Arc<Connection>,
    claims: Claims,
    rooms: Vec<RoomName>,
    bucket: TokenBucket,
    /// Frames refused by the rate limit since the last one allowed.
    refused_in_a_row: u32,
}

/// Serves an upgraded connection until it closes. `early` holds bytes the
/// client sent right behind its upgrade request.
///
/// The setup runs before the returned future exists, so the future holds
/// only what the read loop needs: every idle connection carries it.
pub fn run(
    state: Arc<ServerState>,
    stream: TcpStream,
    early: Bytes,
    claims: Claims,
    room: Option<RoomName>,
    deflate: Option<PeerDeflate>,
) -> impl Future<Output = ()> + Send {
    // Boxed: the future keeps it for as long as it lives (8 bytes, not 16).
    let room = room.map(Box::new);
    let setup = Setup {
        id: state.next_connection_id(),
        sub: claims.sub.clone(),
        send_queue: state.config.send_queue,
        expires_at: claims.exp,
        now_ms: state.now_ms(),
        writer: state.writer.clone(),
        deflate,
    };
    let conn = Arc::new(Connection::new(stream, setup));
    state.connections.insert(conn.id, conn.clone());
    state.metrics.connections.inc();
    // `early` is a slice of hyper's read buffer: copy what it holds and let
    // the buffer go, or every connection keeps kilobytes it never uses.
    let mut reader = FrameReader::new(&early, state.config.max_message_bytes, deflate.is_some());
    drop(early);
    let bucket = TokenBucket::new(limit(&state), state.uptime());
    let mut session = Session { state, conn, claims, rooms: Vec::new(), bucket, refused_in_a_row: 0 };
    async move {
        if let Some(room) = room {
            Box::pin(session.join(*room, None, false, None)).await;
        }
        session.read_until_closed(&mut reader).await;
        session.end();
        Box::pin(finish_writing(&session.conn)).await;
    }
}

impl Session {
    async fn read_until_closed(&mut self, reader: &mut FrameReader) {
        loop {
            // One poll function for both waits: the future keeps no state
            // for them, and every idle connection waits here.
            let conn = &self.conn;
            let next = std::future::poll_fn(|cx| {
                if conn.poll_reader_stopped(cx).is_ready() {
                    return Poll::Ready(None);
                }
                reader.poll_next(cx, conn.socket()).map(Some)
            });
            let Some(incoming) = next.await else {
                break;
            };
            self.conn.touch(self.state.now_ms());
            match incoming {
                // Boxed, and owning the text: a request may await Redis or
                // the database, and that state should not make every idle
                // connection's future larger.
                Ok(Incoming::Text(text)) => Box::pin(self.on_text(text)).await,
                Ok(Incoming::Binary) => {
                    if self.admit(None) {
                        self.error(ErrorCode::BadRequest, "binary frames are not supported", None);
                    }
                }
                Ok(Incoming::Ping(payload)) => self.send(ws::pong_frame(&payload)),
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close(code)) => {
                    // Echo the client's code, as RFC 6455 asks.
                    self.conn.close(code.unwrap_or(1000), "");
                    return;
                }
                Err(e) => {
                    let Some((code, reason)) = e.close() else {
                        return;
                    };
                    self.conn.close(code, reason);
                    break;
                }
            }
            if self.conn.outbox.phase() != Phase::Open {
                break;
            }
        }
        // The connection is closing: its user's presence ends now, not
        // after the drain below, which may wait seconds for a silent peer.
        for room in &self.rooms {
            self.state.presence.leave(room, self.conn.id);
        }
        // Boxed, as are the other waits of a closing connection: their
        // timers would otherwise sit in every idle connection's future.
        Box::pin(self.linger(reader)).await;
    }

    /// The server has sent or queued its close: drains what the client still
    /// sends until its own close, within bounds, so that it reads ours
    /// rather than a reset (see [`ws::linger`]).
    async fn linger(&self, reader: &mut FrameReader) {
        let ended = ws::linger::drain(self.conn.socket(), reader.take_buffered(), Bounds::DEFAULT).await;
        self.state.metrics.close_linger(ended.label());
        if ended.cut() {
            tracing::debug!(conn = self.conn.id, ended = ended.label(), "client kept sending after the close");
        }
    }

    async fn on_text(&mut self, text: Bytes) {
        self.state.metrics.frames_in.inc();
        // The reader hands over only valid UTF-8.
        let text = std::str::from_utf8(&text).unwrap_or_default();
        match parse_request(text) {
            Ok(request) => {
                if self.admit(request.reference.as_deref()) {
                    self.handle(request).await;
                }
            }
            Err(bad) => {
                if self.admit(bad.reference.as_deref()) {
                    self.error(ErrorCode::BadRequest, &bad.message, bad.reference.as_deref());
                }
            }
        }
    }

    /// Applies the token bucket: a refused frame gets `rate_limited`, and a
    /// client that keeps going for a whole burst more is cut with 1008.
    fn admit(&mut self, reference: Option<&str>) -> bool {
        if self.bucket.try_take(limit(&self.state), self.state.uptime()) {
            self.refused_in_a_row = 0;
            return true;
        }
        self.state.metrics.rate_limited.inc();
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > self.state.config.burst {
            self.conn.close(1008, "flooding");
        } else {
            self.error(ErrorCode::RateLimited, "too many frames, slow down", reference);
        }
        false
    }

    async fn handle(&mut self, request: Request<'_>) {
        let reference = request.reference.as_deref();
        match request.kind {
            RequestKind::Join { room, since, epoch, presence } => {
                if self.allowed(&room, reference) {
                    let since = since.map(|seq| Since { seq, epoch: epoch.as_deref() });
                    self.join(room, since, presence, reference).await;
                }
            }
            RequestKind::Leave { room } => self.leave(&room, reference),
            RequestKind::Send { room, body } => {
                if self.allowed(&room, reference) {
                    self.publish(&room, body, reference).await;
                }
            }
            RequestKind::History { room, before, limit } => {
                if self.allowed(&room, reference) {
                    self.history(&room, before, limit, reference).await;
                }
            }
            RequestKind::Refresh { token } => self.refresh(&token, reference),
            RequestKind::Ping => self.send(outbound::pong(reference)),
            RequestKind::Presence { room } => {
                if self.allowed(&room, reference) {
                    match self.state.presence.answer(&room, reference).await {
                        Ok(answer) => self.send(answer),
                        Err(e) => self.error(ErrorCode::Unavailable, &e.to_string(), reference),
                    }
                }
            }
        }
    }

    async fn publish(&self, room: &RoomName, body: &RawValue, reference: Option<&str>) {
        match self.state.bus.publish(room, &self.claims.sub, body).await {
            Ok(seq) => {
                if let Some(reference) = reference {
                    self.send(outbound::ack(reference, room, seq));
                }
            }
            Err(e) => self.error(ErrorCode::Unavailable, &e.to_string(), reference),
        }
    }

    async fn history(&self, room: &RoomName, before: Option<u64>, limit: usize, reference: Option<&str>) {
        match self.state.bus.history(room, before, limit).await {
            Ok(messages) => self.send(outbound::history(room, messages.iter().map(|m| &m[..]))),
            Err(e) => self.error(ErrorCode::Unavailable, &e.to_string(), reference),
        }
    }

    /// Whether the token allows `room`; answers `forbidden` when not.
    fn allowed(&self, room: &RoomName, reference: Option<&str>) -> bool {
        let allowed = self.claims.rooms.allows(room);
        if !allowed {
            self.error(ErrorCode::Forbidden, &format!("token does not allow room {room}"), reference);
        }
        allowed
    }

    /// Joins `room` (`joined` is queued by the bus), then counts the
    /// connection in the room's presence, which queues `presence_state`
    /// right behind `joined` when the client asked for `presence`.
    async fn join(&mut self, room: RoomName, since: Option<Since<'_>>, presence: bool, reference: Option<&str>) {
        // A rejoin (to recover with `since`) is not a new room.
        let limit = self.state.config.max_rooms_per_connection;
        if self.rooms.len() >= limit && !self.rooms.contains(&room) {
            self.state.metrics.too_many_rooms.inc();
            let message = format!("already joined to {limit} rooms (--max-rooms-per-connection); leave one first");
            return self.error(ErrorCode::TooManyRooms, &message, reference);
        }
        match self.state.bus.join(&room, &self.conn, since).await {
            Ok(()) => {
                self.state.presence.join(&room, &self.conn, &self.claims.sub, presence).await;
                if !self.rooms.contains(&room) {
                    // One room at a time: most connections join one, and every
                    // connection keeps this list for as long as it lives.
                    self.rooms.reserve_exact(1);
                    self.rooms.push(room);
                }
            }
            Err(e) => {
                self.state.presence.leave(&room, self.conn.id);
                self.rooms.retain(|r| *r != room);
                self.error(ErrorCode::Unavailable, &e.to_string(), reference);
            }
        }
    }

    fn leave(&mut self, room: &RoomName, reference: Option<&str>) {
        let Some(index) = self.rooms.iter().position(|r| r == room) else {
            self.error(ErrorCode::NotJoined, &format!("not joined to {room}"), reference);
            return;
        };
        self.rooms.swap_remove(index);
        self.state.bus.leave(room, self.conn.id);
        self.state.presence.leave(room, self.conn.id);
        self.send(outbound::left(room));
    }

    /// Swaps in a new token for the same `sub`: new expiry, new rooms.
    fn refresh(&mut self, token: &str, reference: Option<&str>) {
        let claims = match self.state.config.verifier.verify(token) {
            Ok(claims) => claims,
            Err(e) => return self.error(ErrorCode::Forbidden, &format!("refresh refused: {e}"), reference),
        };
        if claims.sub != self.claims.sub {
            return self.error(ErrorCode::Forbidden, "refresh token is for another sub", reference);
        }
        self.conn.set_expires_at(claims.exp);
        self.send(outbound::refreshed(claims.exp));
        self.claims = claims;
    }

    fn error(&self, code: ErrorCode, message: &str, reference: Option<&str>) {
        tracing::debug!(
            conn = self.conn.id,
            sub = %self.claims.sub,
            code = code.as_str(),
            "request failed: {}",
            crate::logging::redact(message)
        );
        self.send(outbound::error(code, message, reference));
    }

    fn send(&self, frame: Bytes) {
        if self.conn.send(self.conn.own_frame(frame)) == Err(PushError::Full) {
            self.state.metrics.slow_consumers.inc();
        }
    }

    /// Leaves every room and forgets the connection; writing stops after
    /// the close frame, or at once if none was queued.
    fn end(&mut self) {
        for room in self.rooms.drain(..) {
            self.state.bus.leave(&room, self.conn.id);
            self.state.presence.leave(&room, self.conn.id);
        }
        if self.state.connections.remove(&self.conn.id).is_some() {
            self.state.metrics.connections.dec();
        }
        if self.conn.outbox.phase() == Phase::Open {
            self.conn.kill();
        }
    }
}

fn limit(state: &ServerState) -> Limit {
    Limit { rate: state.config.rate, burst: state.config.burst }
}

/// Gives the writer the linger time to get the close frame out (it may be
/// stuck on a peer that does not read), then stops it.
async fn finish_writing(conn: &Connection) {
    if tokio::time::timeout(CLOSE_LINGER, conn.writing_finished()).await.is_err() {
        conn.abort_writer();
        conn.writing_finished().await;
    }
}
