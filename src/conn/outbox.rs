//! A connection's bounded queue of outgoing frames, and who may write them.
//!
//! Fanout pushes into it and never waits: a full queue is a slow consumer,
//! reported to the caller, who cuts that member. There is no writer task
//! waiting on an idle connection. Whoever pushes the first frame into an
//! empty queue with no writer takes on the flush ([`Pushed::FlushNeeded`]):
//! at the end of its round ([`super::cork`]) the flusher claims the socket
//! ([`Outbox::claim`]) and writes everything queued by then, or, when the
//! socket is full or a saturated server's window is open, hands the queue to
//! a writer task that lives only until the queue runs dry. So an idle
//! connection holds no task, and a busy one keeps at most a single task.
//!
//! Only the socket makes a reader slow: the bound counts the frames queued
//! while the socket refuses more (the last write stopped short), never the
//! frames the server holds back by its own choice (a round, a window).

use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;

/// A queue of frames, the first held inline: a quiet connection's queue
/// rarely holds more than one, and a heap queue would cost a malloc and a
/// free per delivery (3.5% of the server's CPU at 1 x 1,000 members,
/// 20 messages a second, in perf).
pub type Frames = SmallVec<[Bytes; 1]>;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The socket refuses more and `capacity` frames wait behind it: the
    /// peer is not reading.
    Full,
    /// A close frame is queued or the connection is finished.
    Closed,
}

/// What the pusher of a frame owes the connection.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a FlushNeeded push must be flushed, or the frame waits forever"]
pub enum Pushed {
    /// Someone else writes it: a writer, or an earlier pusher's flush.
    Queued,
    /// The queue was empty and nobody writes: the pusher must flush.
    FlushNeeded,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// A close frame ends the queue; the connection finishes once it is written.
    Closing,
    /// Nothing more is written.
    Dead,
}

/// Who holds the socket's write side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Nobody,
    /// A pusher's flush, writing without waiting.
    Inline,
    /// A writer task, which waits for the socket and the coalescing window.
    Task,
}

/// What [`Outbox::claim`] gave the flusher.
pub enum Claim {
    /// Nothing to do: the queue is empty or someone else writes.
    Nothing,
    /// Write these now; the phase says whether they end with a close frame.
    Write(Frames, Phase),
    /// The last write was less than a window ago: start a writer task,
    /// which waits out the window and writes what gathered by then.
    StartWriter,
}

/// What the inline writer must do once its batch went out, or did not.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterWrite {
    /// The queue is empty, or someone else writes: done.
    Done,
    /// Frames are left (unwritten, or queued meanwhile): start a writer task.
    StartWriter,
    /// The connection is finished: shut the socket down.
    Finish,
}

/// What a writer task found when it came back for more.
pub enum Next {
    /// The batch is in the writer's buffer.
    Write(Phase),
    /// The queue ran dry: the task ends, and the next pusher flushes.
    Retired,
    Finish,
}

struct State {
    frames: Frames,
    phase: Phase,
    writer: Writer,
    /// When the last batch went out: the start of the coalescing window.
    last_write: Option<Instant>,
    /// The last write stopped short: the socket is full. Only then does a
    /// long queue make the peer a slow consumer.
    refused: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        let state = State {
            frames: Frames::new(),
            phase: Phase::Open,
            writer: Writer::Nobody,
            last_write: None,
            refused: false,
        };
        Self { state: Mutex::new(state), capacity }
    }

    /// Queues a frame unless the connection is closed, or the socket
    /// refuses more and the queue behind it is full.
    pub fn push(&self, frame: Bytes) -> Result<Pushed, PushError> {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return Err(PushError::Closed);
        }
        if state.refused && state.frames.len() >= self.capacity {
            return Err(PushError::Full);
        }
        let was_empty = state.frames.is_empty();
        state.frames.push(frame);
        Ok(state.owed_flush(was_empty))
    }

    /// Queues frames past the capacity: for a replay, whose size history
    /// already bounds, that must reach the client whole.
    pub fn push_all(&self, frames: impl IntoIterator<Item = Bytes>) -> Result<Pushed, PushError> {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return Err(PushError::Closed);
        }
        let was_empty = state.frames.is_empty();
        state.frames.extend(frames);
        Ok(state.owed_flush(was_empty))
    }

    /// Queues `close` as the last frame. With `discard_pending`, frames not
    /// yet handed to a writer are dropped first (a slow consumer would never
    /// read them). `None` when the connection was already closing.
    pub fn close(&self, close: Bytes, discard_pending: bool) -> Option<Pushed> {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return None;
        }
        if discard_pending {
            state.frames = Frames::new();
        }
        let was_empty = state.frames.is_empty();
        state.frames.push(close);
        state.phase = Phase::Closing;
        Some(state.owed_flush(was_empty))
    }

    /// Stops all writing without a close frame (the peer is gone). True when
    /// nobody was writing, so the caller finishes the connection itself.
    pub fn kill(&self) -> bool {
        let mut state = self.state.lock();
        let was_dead = state.phase == Phase::Dead;
        state.phase = Phase::Dead;
        state.frames = Frames::new();
        !was_dead && state.writer == Writer::Nobody
    }

    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// For the pusher that owes a flush: takes the socket and the queue, or
    /// says to start a writer task while the coalescing window is open.
    pub fn claim(&self, window: Duration) -> Claim {
        let mut state = self.state.lock();
        if state.writer != Writer::Nobody || state.frames.is_empty() || state.phase == Phase::Dead {
            return Claim::Nothing;
        }
        if state.window_end(window).is_some_and(|end| end > Instant::now()) {
            state.writer = Writer::Task;
            return Claim::StartWriter;
        }
        state.writer = Writer::Inline;
        Claim::Write(std::mem::take(&mut state.frames), state.phase)
    }

    /// Gives the socket back after an inline write that did not end the
    /// connection. `unwritten` is what the socket did not take (it refused
    /// more), to go out first. Says `Finish` when the connection was killed
    /// meanwhile.
    pub fn release_inline(&self, unwritten: Frames, window: Duration) -> AfterWrite {
        let mut state = self.state.lock();
        // The clock is read only when a window may hold the next write back.
        if !window.is_zero() {
            state.last_write = Some(Instant::now());
        }
        state.refused = !unwritten.is_empty();
        if state.phase == Phase::Dead {
            state.writer = Writer::Nobody;
            return AfterWrite::Finish;
        }
        if !unwritten.is_empty() {
            let queued_meanwhile = std::mem::replace(&mut state.frames, unwritten);
            state.frames.extend(queued_meanwhile);
        }
        if state.frames.is_empty() {
            state.writer = Writer::Nobody;
            AfterWrite::Done
        } else {
            state.writer = Writer::Task;
            AfterWrite::StartWriter
        }
    }

    /// When the writer task may write next: the end of the window that the
    /// last write opened, if it is still open.
    pub fn writer_due(&self, window: Duration) -> Option<Instant> {
        self.state.lock().window_end(window).filter(|end| *end > Instant::now())
    }

    /// For the writer task: swaps everything queued into `batch` (empty,
    /// its memory kept from the last batch, so a busy connection queues
    /// without allocating), or retires the writer when the queue is empty.
    pub fn next_for_writer(&self, batch: &mut Frames) -> Next {
        let mut state = self.state.lock();
        match state.phase {
            Phase::Dead => {
                state.writer = Writer::Nobody;
                Next::Finish
            }
            _ if state.frames.is_empty() => {
                state.writer = Writer::Nobody;
                // An idle connection keeps no queue memory.
                state.frames = Frames::new();
                Next::Retired
            }
            phase => {
                std::mem::swap(&mut state.frames, batch);
                Next::Write(phase)
            }
        }
    }

    /// The writer task's write stopped short: the socket refuses more, and
    /// what is queued from now on counts toward the slow-consumer bound.
    pub fn refused(&self) {
        self.state.lock().refused = true;
    }

    /// The writer task wrote a whole batch: the socket takes frames again,
    /// and the window starts now.
    pub fn wrote(&self, window: Duration) {
        let mut state = self.state.lock();
        state.refused = false;
        if !window.is_zero() {
            state.last_write = Some(Instant::now());
        }
    }

    /// Writing is over, for whoever writes: a write failed, or the close
    /// frame is out.
    pub fn writer_finished(&self) {
        let mut state = self.state.lock();
        state.phase = Phase::Dead;
        state.frames = Frames::new();
        state.writer = Writer::Nobody;
    }
}

impl State {
    /// Frames were just queued: the pusher owes a flush when the queue was
    /// empty (else an earlier pusher owes it) and nobody writes.
    fn owed_flush(&self, was_empty: bool) -> Pushed {
        if was_empty && self.writer == Writer::Nobody {
            Pushed::FlushNeeded
        } else {
            Pushed::Queued
        }
    }

    fn window_end(&self, window: Duration) -> Option<Instant> {
        self.last_write.map(|at| at + window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn written(claim: Claim) -> (Vec<Bytes>, Phase) {
        match claim {
            Claim::Write(frames, phase) => (frames.into_vec(), phase),
            Claim::Nothing => panic!("claimed nothing"),
            Claim::StartWriter => panic!("asked for a writer task"),
        }
    }

    #[test]
    fn first_push_owes_the_flush_and_the_rest_ride_along() {
        let q = Outbox::new(4);
        assert_eq!(q.push(frame(1)), Ok(Pushed::FlushNeeded));
        assert_eq!(q.push(frame(2)), Ok(Pushed::Queued));
        assert_eq!(written(q.claim(Duration::ZERO)), (vec![frame(1), frame(2)], Phase::Open));
        // While the flusher writes, pushes are queued for it.
        assert_eq!(q.push(frame(3)), Ok(Pushed::Queued));
        assert!(matches!(q.claim(Duration::ZERO), Claim::Nothing));
        assert_eq!(q.release_inline(Frames::new(), Duration::ZERO), AfterWrite::StartWriter);
        let mut batch = Frames::new();
        assert!(matches!(q.next_for_writer(&mut batch), Next::Write(Phase::Open)));
        assert_eq!(batch.as_slice(), [frame(3)]);
        batch.clear();
        assert!(matches!(q.next_for_writer(&mut batch), Next::Retired));
        assert_eq!(q.push(frame(4)), Ok(Pushed::FlushNeeded), "a retired writer leaves the flush to the pusher");
    }

    #[test]
    fn only_a_queue_behind_a_refusing_socket_is_full() {
        let q = Outbox::new(2);
        let _ = q.push(frame(1));
        let _ = q.push(frame(2));
        assert_eq!(q.push(frame(3)), Ok(Pushed::Queued), "held back by the server, not refused by the socket");
        let _ = written(q.claim(Duration::ZERO));
        // The socket took one frame of three.
        assert_eq!(q.release_inline(Frames::from_iter([frame(2), frame(3)]), Duration::ZERO), AfterWrite::StartWriter);
        assert_eq!(q.push(frame(4)), Err(PushError::Full), "two wait behind a full socket");
        let mut batch = Frames::new();
        assert!(matches!(q.next_for_writer(&mut batch), Next::Write(Phase::Open)));
        assert_eq!(q.push(frame(4)), Ok(Pushed::Queued), "the writer holds the batch; one waits");
        q.refused();
        assert_eq!(q.push(frame(5)), Ok(Pushed::Queued));
        assert_eq!(q.push(frame(6)), Err(PushError::Full));
        q.wrote(Duration::ZERO);
        assert_eq!(q.push(frame(6)), Ok(Pushed::Queued), "the socket took the batch");
    }

    #[test]
    fn unwritten_bytes_go_out_first() {
        let q = Outbox::new(4);
        let _ = q.push(frame(1));
        let _ = written(q.claim(Duration::ZERO));
        let _ = q.push(frame(2));
        assert_eq!(q.release_inline(Frames::from_iter([frame(1)]), Duration::ZERO), AfterWrite::StartWriter);
        let mut batch = Frames::new();
        assert!(matches!(q.next_for_writer(&mut batch), Next::Write(Phase::Open)));
        assert_eq!(batch.as_slice(), [frame(1), frame(2)]);
    }

    #[test]
    fn a_write_inside_the_window_goes_to_a_writer_task() {
        let q = Outbox::new(4);
        let _ = q.push(frame(1));
        let _ = written(q.claim(Duration::from_secs(60)));
        assert_eq!(q.release_inline(Frames::new(), Duration::from_secs(60)), AfterWrite::Done);
        assert_eq!(q.push(frame(2)), Ok(Pushed::FlushNeeded));
        assert!(matches!(q.claim(Duration::from_secs(60)), Claim::StartWriter));
        assert!(q.writer_due(Duration::from_secs(60)).is_some());
        assert_eq!(q.push(frame(3)), Ok(Pushed::Queued), "the writer task will take it");
    }

    #[test]
    fn close_is_last_and_refuses_more() {
        let q = Outbox::new(4);
        let _ = q.push(frame(1));
        assert_eq!(q.close(frame(9), false), Some(Pushed::Queued));
        assert_eq!(q.close(frame(8), false), None);
        assert_eq!(q.push(frame(2)), Err(PushError::Closed));
        assert_eq!(written(q.claim(Duration::ZERO)), (vec![frame(1), frame(9)], Phase::Closing));
        q.writer_finished();
        assert_eq!(q.phase(), Phase::Dead);
        assert!(matches!(q.claim(Duration::ZERO), Claim::Nothing), "nothing more is written");
    }

    #[test]
    fn slow_consumer_close_discards_pending() {
        let q = Outbox::new(1);
        let _ = q.push(frame(1));
        let _ = q.close(frame(9), true);
        assert_eq!(written(q.claim(Duration::ZERO)).0, [frame(9)]);
    }

    #[test]
    fn replay_may_exceed_capacity() {
        let q = Outbox::new(1);
        assert_eq!(q.push_all((0..5).map(frame)), Ok(Pushed::FlushNeeded));
        assert_eq!(written(q.claim(Duration::ZERO)).0.len(), 5);
    }

    #[test]
    fn kill_hands_the_finish_to_whoever_writes() {
        let idle = Outbox::new(4);
        assert!(idle.kill(), "nobody writes: the caller finishes");
        assert!(!idle.kill(), "only once");
        let busy = Outbox::new(4);
        let _ = busy.push(frame(1));
        let _ = written(busy.claim(Duration::ZERO));
        assert!(!busy.kill(), "the inline writer finishes");
        assert_eq!(busy.release_inline(Frames::new(), Duration::ZERO), AfterWrite::Finish);
    }
}
