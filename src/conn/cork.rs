//! Batching by backlog: writes wait for the end of the scheduler's round,
//! not for a clock.
//!
//! A frame that makes a quiet connection owe a flush is not written by the
//! task that queued it. The connection joins this thread's *cork*: a list
//! of connections owed a flush, written by one flush task that first
//! yields. Tokio runs a yielded task only after the tasks that were ready
//! before it and its next look at the I/O driver, so the flush runs once
//! the current round of work is done:
//!
//! * under light load the round is the one task that queued the frame: the
//!   flush follows within microseconds, and a reply and the room message
//!   before it (a sender that is a member) leave in one `sendmsg`;
//! * under heavy load the round holds many readers' publishes, and every
//!   frame they queued for a member leaves in that member's one write. The
//!   busier the server, the more a round holds and the larger the batches,
//!   with no timer: this is what uWebSockets' cork does per loop iteration.
//!
//! One flush task per round, not per connection: a fanout to a thousand
//! members adds them to the cork in one call and costs one task.

use std::cell::RefCell;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use super::writer;
use super::Connection;

/// The connections owed a flush in one round; `None` once its flush task
/// took them, so that later ones start a new round.
type Round = Mutex<Option<Vec<Arc<Connection>>>>;

thread_local! {
    /// This thread's open round. The flush task may run on another thread
    /// (work stealing): the round is shared, and sealed when taken.
    static OPEN_ROUND: RefCell<Option<Arc<Round>>> = const { RefCell::new(None) };
}

/// Flushes `conn` at the end of this round.
pub fn defer_one(conn: &Arc<Connection>) {
    defer(std::iter::once(conn.clone()));
}

/// Flushes every connection in `conns` at the end of this round. Outside a
/// runtime (start-up, a plain test) there is no round: they are written now.
pub fn defer(conns: impl IntoIterator<Item = Arc<Connection>>) {
    let mut conns = conns.into_iter().peekable();
    if conns.peek().is_none() {
        return;
    }
    let Ok(runtime) = Handle::try_current() else {
        return writer::flush_spread(conns.collect());
    };
    OPEN_ROUND.with_borrow_mut(|open| {
        if let Some(round) = open.as_ref() {
            if let Some(pending) = round.lock().as_mut() {
                pending.extend(conns);
                return;
            }
        }
        let round = Arc::new(Mutex::new(Some(conns.collect())));
        *open = Some(round.clone());
        runtime.spawn(flush_at_end_of_round(round));
    });
}

async fn flush_at_end_of_round(round: Arc<Round>) {
    tokio::task::yield_now().await;
    let pending = round.lock().take();
    if let Some(pending) = pending {
        writer::flush_spread(pending);
    }
}

/// Waits until the round this thread has open, if any, was flushed: for
/// benches and tests that time or check a whole round.
pub async fn round_flushed() {
    let Some(round) = OPEN_ROUND.with_borrow(|open| open.clone()) else {
        return;
    };
    while round.lock().is_some() {
        tokio::task::yield_now().await;
    }
}
