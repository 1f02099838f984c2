//! A connection's bounded queue of outgoing frames.
//!
//! Fanout pushes into it and never waits: a full queue is a slow consumer,
//! reported to the caller, who cuts that member. The writer wakes only when
//! the queue goes from empty to non-empty, then takes everything queued in
//! one go, so a burst of frames costs one wakeup and one write.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;

use super::signal::Signal;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` frames: the peer is not reading.
    Full,
    /// A close frame is queued or the writer has stopped.
    Closed,
}

/// Where the connection stands, as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// A close frame ends the queue; the writer stops once it is written.
    Closing,
    /// The writer stops now, writing nothing more.
    Dead,
}

struct State {
    frames: VecDeque<Bytes>,
    phase: Phase,
}

pub struct Outbox {
    state: Mutex<State>,
    wake: Signal,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State { frames: VecDeque::new(), phase: Phase::Open }),
            wake: Signal::default(),
            capacity,
        }
    }

    /// Queues a frame unless the queue is full or closed.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.capacity {
            return Err(PushError::Full);
        }
        state.frames.push_back(frame);
        let was_empty = state.frames.len() == 1;
        drop(state);
        if was_empty {
            self.wake.raise();
        }
        Ok(())
    }

    /// Queues frames past the capacity: for a replay, whose size history
    /// already bounds, that must reach the client whole.
    pub fn push_all(&self, frames: impl IntoIterator<Item = Bytes>) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return Err(PushError::Closed);
        }
        state.frames.extend(frames);
        drop(state);
        self.wake.raise();
        Ok(())
    }

    /// Queues `close` as the last frame. With `discard_pending`, frames not
    /// yet written are dropped first (a slow consumer would never read them).
    /// Returns false when the connection was already closing.
    pub fn close(&self, close: Bytes, discard_pending: bool) -> bool {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return false;
        }
        if discard_pending {
            state.frames = VecDeque::new();
        }
        state.frames.push_back(close);
        state.phase = Phase::Closing;
        drop(state);
        self.wake.raise();
        true
    }

    /// Stops the writer without a close frame (the peer is gone).
    pub fn kill(&self) {
        self.state.lock().phase = Phase::Dead;
        self.wake.raise();
    }

    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// Everything queued, and the phase it was taken in.
    pub fn take(&self) -> (VecDeque<Bytes>, Phase) {
        let mut state = self.state.lock();
        (std::mem::take(&mut state.frames), state.phase)
    }

    /// Waits until something was queued or the phase changed.
    pub async fn changed(&self) {
        self.wake.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn full_queue_refuses_and_take_empties_it() {
        let q = Outbox::new(2);
        assert_eq!(q.push(frame(1)), Ok(()));
        assert_eq!(q.push(frame(2)), Ok(()));
        assert_eq!(q.push(frame(3)), Err(PushError::Full));
        let (frames, phase) = q.take();
        assert_eq!(frames.len(), 2);
        assert_eq!(phase, Phase::Open);
        assert_eq!(q.push(frame(3)), Ok(()));
    }

    #[test]
    fn close_is_last_and_refuses_more() {
        let q = Outbox::new(4);
        q.push(frame(1)).unwrap();
        assert!(q.close(frame(9), false));
        assert!(!q.close(frame(8), false));
        assert_eq!(q.push(frame(2)), Err(PushError::Closed));
        let (frames, phase) = q.take();
        assert_eq!(frames, [frame(1), frame(9)]);
        assert_eq!(phase, Phase::Closing);
    }

    #[test]
    fn slow_consumer_close_discards_pending() {
        let q = Outbox::new(1);
        q.push(frame(1)).unwrap();
        q.close(frame(9), true);
        assert_eq!(q.take().0, [frame(9)]);
    }

    #[test]
    fn replay_may_exceed_capacity() {
        let q = Outbox::new(1);
        q.push_all((0..5).map(frame)).unwrap();
        assert_eq!(q.take().0.len(), 5);
    }

    #[tokio::test]
    async fn push_wakes_a_waiting_writer() {
        let q = std::sync::Arc::new(Outbox::new(4));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.changed().await }
        });
        q.push(frame(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
