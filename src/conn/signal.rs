//! A wakeup for one waiting task, a few bytes in size.
//!
//! Every connection has three of these (stop reading, writing finished,
//! abort the writer), and an idle connection waits on one of them. A
//! `tokio::sync::Notify` costs about 40 bytes and its `notified()` future
//! about 70 more, held for as long as the connection idles; this costs an
//! `AtomicWaker` and a flag, and its wait holds only a reference.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

#[derive(Default)]
pub struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Raises the signal; a raise with nobody waiting is kept for the next wait.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Drops the registered waker, if any: the waiter is gone for good.
    pub fn forget_waiter(&self) {
        drop(self.waker.take());
    }

    /// Waits for a raise and consumes it. Only one task may wait at a time.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_wait(cx))
    }

    /// Polls for a raise, consuming it; registers the waker when there is none.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.raised.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A raise between the check and the registration would be lost otherwise.
        if self.raised.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_raise_before_the_wait_is_kept() {
        let signal = Signal::default();
        signal.raise();
        tokio::time::timeout(Duration::from_secs(5), signal.wait()).await.unwrap();
    }

    #[tokio::test]
    async fn a_raise_wakes_the_waiter_once() {
        let signal = Arc::new(Signal::default());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.wait().await }
        });
        tokio::task::yield_now().await;
        signal.raise();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(!signal.raised.load(Ordering::Acquire), "the raise was consumed");
    }
}
