//! Batching by backlog: writes wait for the end of the task's round of
//! work, not for a clock.
//!
//! A frame that makes a quiet connection owe a flush is not written by the
//! code that queued it. The connection joins this thread's *cork*: a list
//! of connections owed a flush, written by one flush task. Tokio runs a
//! task spawned from a worker in its LIFO slot, next after the task that
//! spawned it, so the flush runs as soon as the current task's poll ends,
//! and takes everything queued by then:
//!
//! * under light load that is the one request the task handled: the frame
//!   leaves within microseconds, and a reply and the room message before it
//!   (a sender that is a member) leave in one `sendmsg`;
//! * under heavy load a reader's poll handles every frame its client had
//!   sent meanwhile, and the flushes of large rooms wait behind other tasks
//!   ([`super::writer::flush_spread`]), so a member's queue holds more by the
//!   time it is written: the busier the server, the larger the batches,
//!   with no timer. This is what uWebSockets' cork does per loop iteration.
//!
//! One flush task per round, not per connection: a fanout to a thousand
//! members adds them to the cork in one call and costs one task. (A flush
//! that first yielded, to gather every task's frames until tokio's next
//! look at the I/O driver, cost about 1.3 µs more per delivery in the chat
//! load for no lower latency: measured and dropped.)

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
