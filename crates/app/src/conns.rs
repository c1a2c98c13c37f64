//! Open connections and their graceful end. hyper-util's
//! `GracefulShutdown` does not take a connection that can be upgraded
//! (WebSocket), so this is the same idea in a few lines: every connection,
//! and every tunnel an upgrade made, holds a [`Watcher`]; a drain tells
//! them all, then waits until the last one is dropped.

use tokio::sync::watch;

pub(crate) struct Conns {
    tx: watch::Sender<bool>,
}

/// One open connection or tunnel.
pub(crate) struct Watcher(watch::Receiver<bool>);

impl Conns {
    pub(crate) fn new() -> Self {
        Conns {
            tx: watch::channel(false).0,
        }
    }

    pub(crate) fn watcher(&self) -> Watcher {
        Watcher(self.tx.subscribe())
    }

    /// Connections and tunnels open.
    pub(crate) fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Tells every connection to finish, and returns once all are gone.
    pub(crate) async fn shutdown(&self) {
        self.tx.send_replace(true);
        self.tx.closed().await;
    }
}

impl Watcher {
    /// Returns once a drain has begun.
    pub(crate) async fn stopping(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}
