//! The node's connections to NATS as leases see them: each loss starts a new epoch, and a lease lasts no
//! longer than the epoch it was taken in.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The node's connection to NATS, as leases see it: a lease lasts no longer than the connection it was
/// taken on. After a reconnect the node may be talking to a restarted server that lost track of the
/// delivery (a crashed server can forget the last moments of a consumer's state and hand the message
/// out again at once), and the server answers in-progress acks for messages it no longer has, so a
/// confirmation after a reconnect proves nothing. Cheap to clone; all clones see the same state.
#[derive(Clone, Default)]
pub struct Connection {
    inner: Arc<ConnectionInner>,
}

#[derive(Default)]
struct ConnectionInner {
    /// When each loss happened, in order: the connection's epoch is the number of losses.
    losses: Mutex<Vec<Instant>>,
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("losses", &self.losses())
            .finish()
    }
}

impl Connection {
    /// The connection was lost: every lease taken before now ends now.
    pub fn lost(&self) {
        self.inner
            .losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        self.inner.changed.notify_waiters();
    }

    fn epoch(&self) -> usize {
        self.inner
            .losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// When the connection was first lost after `epoch`, if it was.
    fn lost_since(&self, epoch: usize) -> Option<Instant> {
        self.inner
            .losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(epoch)
            .copied()
    }

    /// How many times the connection was lost so far.
    pub fn losses(&self) -> usize {
        self.epoch()
    }

    /// Completes once the connection has been lost more than `seen` times.
    pub async fn wait_loss_after(&self, seen: usize) {
        loop {
            let changed = self.inner.changed.notified();
            if self.epoch() > seen {
                return;
            }
            changed.await;
        }
    }

    /// The connection as it is now, for a lease taken now.
    pub fn current(&self) -> Epoch {
        Epoch {
            connection: self.clone(),
            epoch: self.epoch(),
        }
    }
}

/// The connection a lease was taken on.
#[derive(Clone)]
pub struct Epoch {
    connection: Connection,
    epoch: usize,
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch").field("epoch", &self.epoch).finish()
    }
}

impl Epoch {
    pub(crate) fn ended(&self) -> Option<Instant> {
        self.connection.lost_since(self.epoch)
    }

    pub(crate) async fn wait_ended(&self) {
        loop {
            let changed = self.connection.inner.changed.notified();
            if self.ended().is_some() {
                return;
            }
            changed.await;
        }
    }
}
