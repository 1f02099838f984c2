//! Ctrl-C: the first one ends the run early but still reports what was
//! measured (the send or hold phase stops, the drain runs, the figures are
//! printed); a second one exits at once.
//!
//! Several runs in one process, one after the other or at once (tests),
//! each on its own runtime or sharing one, are fine: tokio keeps one
//! process-wide SIGINT registry, every [`Interrupt`] is its own listener
//! (so one Ctrl-C ends every run going on), and a listener made after a
//! Ctrl-C does not see that old one. What stays is tokio's: once the first
//! run has begun, SIGINT no longer kills the process by default, even
//! between runs.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Watches for SIGINT while a run is going.
pub struct Interrupt {
    rx: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Interrupt {
    pub fn install() -> Self {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nloadgen: interrupted; finishing up (Ctrl-C again to quit at once)");
                let _ = tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        Self { rx, task }
    }

    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Sleep for `d`, or less if interrupted; true when interrupted.
    pub async fn sleep(&self, d: Duration) -> bool {
        self.sleep_until(tokio::time::Instant::now() + d).await
    }

    /// Sleep until `at`, or less if interrupted; true when interrupted.
    pub async fn sleep_until(&self, at: tokio::time::Instant) -> bool {
        let mut rx = self.rx.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(at) => self.is_set(),
            _ = rx.wait_for(|v| *v) => true,
        }
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.task.abort();
    }
}
