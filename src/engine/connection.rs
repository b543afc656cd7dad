//! The node's connections to NATS as leases see them: each loss starts a new epoch, and a lease lasts no
//! longer than the epoch it was taken in.

use std::collections::VecDeque;
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

/// How many losses a connection remembers the time of. Anyone who can publish a work message with a
/// header block the client cannot parse can make the node lose its fetch connection, as often as
/// they like: the record of losses must not grow with them.
const REMEMBERED_LOSSES: usize = 1024;

#[derive(Default)]
struct ConnectionInner {
    losses: Mutex<Losses>,
    changed: tokio::sync::Notify,
}

/// The losses of a connection: the epoch is their number; the times of the last
/// [`REMEMBERED_LOSSES`] are kept.
struct Losses {
    forgotten: usize,
    recent: VecDeque<Instant>,
    /// Before every loss: what a loss whose time was forgotten is taken to have happened at.
    origin: Instant,
}

impl Default for Losses {
    fn default() -> Losses {
        Losses {
            forgotten: 0,
            recent: VecDeque::new(),
            origin: Instant::now(),
        }
    }
}

impl Losses {
    fn count(&self) -> usize {
        self.forgotten + self.recent.len()
    }

    /// When loss number `n` (from 0) happened. A forgotten one is taken to have happened before any:
    /// a lease that old ends at once, which is always safe.
    fn at(&self, n: usize) -> Option<Instant> {
        match n.checked_sub(self.forgotten) {
            None => Some(self.origin),
            Some(i) => self.recent.get(i).copied(),
        }
    }

    fn push(&mut self, at: Instant) {
        if self.recent.len() == REMEMBERED_LOSSES {
            self.recent.pop_front();
            self.forgotten += 1;
        }
        self.recent.push_back(at);
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("losses", &self.losses())
            .finish()
    }
}

impl Connection {
    fn with<T>(&self, f: impl FnOnce(&mut Losses) -> T) -> T {
        f(&mut self.inner.losses.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The connection was lost: every lease taken before now ends now.
    pub fn lost(&self) {
        self.with(|losses| losses.push(Instant::now()));
        self.inner.changed.notify_waiters();
    }

    fn epoch(&self) -> usize {
        self.with(|losses| losses.count())
    }

    /// When the connection was first lost after `epoch`, if it was.
    fn lost_since(&self, epoch: usize) -> Option<Instant> {
        self.with(|losses| losses.at(epoch))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_without_end_are_remembered_within_a_bound_and_end_old_leases_at_once() {
        let connection = Connection::default();
        let first = connection.current();
        assert_eq!(first.ended(), None);
        connection.lost();
        let lost_at = first.ended().expect("the first loss ended it");
        let second = connection.current();
        for _ in 0..3 * REMEMBERED_LOSSES {
            connection.lost();
        }
        assert_eq!(connection.losses(), 3 * REMEMBERED_LOSSES + 1);
        assert_eq!(connection.with(|l| l.recent.len()), REMEMBERED_LOSSES);
        // Forgotten losses end their leases no later than they really did.
        assert!(first.ended().expect("ended") <= lost_at);
        assert!(second.ended().is_some());
        let now = connection.current();
        assert_eq!(now.ended(), None);
        connection.lost();
        assert!(now.ended().is_some());
    }
}
