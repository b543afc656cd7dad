//! The one way to write an order's document under a lease.
//!
//! Fencing rests on one rule: a node writes (and settles the message) only while its lease is held,
//! and a write counts only if it is answered before the lease's deadline. [`Writer`] is that rule, for
//! the pipeline, for giving up, and for anything that writes under a lease later. Each write is a
//! compare-and-set on the revision the node last saw, written into the audit as sent, then confirmed
//! or unconfirmed; the first confirmed write of a delivery opens the lease's audit interval.
//!
//! A write refused because someone else wrote the document is a lost lease, unless what was written
//! is only an intent recorded for the owner (see the `intent` module): then the owner's change
//! is applied again on top of it and the order goes on.

use crate::domain::order::{CurrentStep, Order, TransitionError};
use crate::engine::lease::Lease;
use crate::ops::audit::Stamp;
use crate::ops::events::Events;
use crate::ops::metrics as m;
use crate::store::{OrderStore, StoreError, Versioned};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why a write under a lease did not happen, or did not count.
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    /// The node is shutting down; progress so far is recorded, and the order can be handed back.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The work cannot go on now (a rollback failed): the order is handed back to go on later.
    #[error("the step cannot run now")]
    NotNow,
    /// The node could not confirm its lease in time and stopped working on the order.
    #[error("self-fenced: lease could not be confirmed in time")]
    Fenced,
    /// Someone else wrote the order: this node no longer owns it.
    #[error("lease lost")]
    LeaseLost(#[source] StoreError),
    /// The order store failed in a way that may pass.
    #[error(transparent)]
    Store(StoreError),
    /// The document does not allow the transition: it was written by something else.
    #[error(transparent)]
    Invalid(#[from] TransitionError),
    /// A request from outside (a cancel) changed what comes next: the pipeline decides again from
    /// the document, which now holds the request.
    #[error("a request changed what comes next")]
    Redirected,
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        if e.is_conflict() {
            Halt::LeaseLost(e)
        } else {
            Halt::Store(e)
        }
    }
}

/// How many intents in a row a single write gives way to before it counts as a lost lease.
const MAX_REBASES: usize = 3;

/// Writes order documents under leases, and publishes each change as an event.
#[derive(Clone)]
pub struct Writer {
    store: OrderStore,
    events: Events,
}

impl Writer {
    pub fn new(store: OrderStore, events: Events) -> Writer {
        Writer { store, events }
    }

    pub fn store(&self) -> &OrderStore {
        &self.store
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Applies `change` (named `what` in the audit) to a copy of the document and writes it, if the
    /// lease is still held. On success `order` is the written document.
    pub async fn commit<T>(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        what: &str,
        mut change: impl FnMut(&mut Order) -> Result<T, TransitionError>,
    ) -> Result<T, Halt> {
        self.commit_named(order, lease, |o| change(o).map(|result| (result, what)))
            .await
    }

    /// As [`Writer::commit`], for a change that names itself: one that may carry the next
    /// transition along (`complete_step+start_step`), which it knows only once applied.
    pub async fn commit_named<T, N: AsRef<str>>(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        mut change: impl FnMut(&mut Order) -> Result<(T, N), TransitionError>,
    ) -> Result<T, Halt> {
        let mut rebases = 0;
        loop {
            let mut next = order.order.clone();
            let (result, what) = match change(&mut next) {
                Ok(changed) => changed,
                // The change was planned before a request came in, and no longer fits.
                Err(_) if rebases > 0 => return Err(Halt::Redirected),
                Err(e) => return Err(e.into()),
            };
            match self
                .write(
                    lease,
                    what.as_ref(),
                    Some(&order.order),
                    &next,
                    order.revision,
                )
                .await
            {
                Ok(written) => {
                    *order = written;
                    return Ok(result);
                }
                Err(Halt::LeaseLost(conflict)) if rebases < MAX_REBASES => {
                    // Perhaps an intent recorded for the owner: then the change goes on top of it.
                    match self.intent_only(order).await {
                        Some(stored) => {
                            rebases += 1;
                            *order = stored;
                        }
                        None => return Err(Halt::LeaseLost(conflict)),
                    }
                }
                Err(halt) => return Err(halt),
            }
        }
    }

    /// Writes `next` over `revision`, which holds `before` (`None` when the stored document is
    /// unreadable), if the lease is still held; the answer must arrive before the lease's deadline.
    pub async fn write(
        &self,
        lease: &Lease,
        what: &str,
        before: Option<&Order>,
        next: &Order,
        revision: u64,
    ) -> Result<Versioned, Halt> {
        if !lease.is_held() {
            return Err(Halt::Fenced);
        }
        let sent = lease.sending(what);
        let written = tokio::select! {
            written = tokio::time::timeout_at(
                lease.deadline().into(),
                self.store.update(next, revision),
            ) => written,
            _ = lease.lost() => {
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
        };
        // When the answer arrived: the lease is checked after this, so a write confirmed here was
        // answered inside the lease's interval, whenever its audit line gets written.
        let answered = Stamp::now();
        let written = match written {
            Ok(Ok(written)) if lease.is_held() => written,
            Ok(Ok(_)) => {
                // Answered, but after the lease ended (its connection was lost meanwhile): the write
                // may have been stored after the node's interval, so it counts as unanswered.
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
            Ok(Err(e)) => {
                if e.is_conflict() {
                    lease.refused(what, sent);
                } else {
                    lease.unconfirmed(what, sent);
                }
                return Err(e.into());
            }
            Err(_) => {
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
        };
        if !lease.is_claimed() {
            lease.claimed(written.revision, sent);
        }
        let step = match written.order.current_step {
            CurrentStep::Step(step) => Some(step),
            CurrentStep::Terminal(_) => None,
        };
        lease.committed(what, step, written.revision, sent, answered);
        match before {
            Some(before) => self.events.transition(before, &written.order).await,
            None => self.events.created(&written.order).await,
        }
        Ok(written)
    }

    /// Takes up an intent recorded since `order` was last written, if that is all that changed
    /// (see [`Order::only_intent_added`]); returns whether there was one.
    pub async fn take_up_intent(&self, order: &mut Versioned) -> bool {
        match self.intent_only(order).await {
            Some(stored) => {
                *order = stored;
                true
            }
            None => false,
        }
    }

    /// The stored document, if it differs from `mine` only by an intent recorded since.
    async fn intent_only(&self, mine: &Versioned) -> Option<Versioned> {
        let stored = self.store.get(mine.order.order_id).await.ok()??;
        (stored.revision > mine.revision && mine.order.only_intent_added(&stored.order))
            .then_some(stored)
    }
}

/// The first pause after a store failure; the pause doubles up to 5 s.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest pause between two tries of an order whose store is unavailable. The node keeps the
/// order (and its lease) meanwhile: an outage of the store, however long, uses up no delivery.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Paces the tries of an order that is kept while the order store is unavailable.
pub struct StoreRetry {
    pause: Duration,
    tries: u32,
}

impl Default for StoreRetry {
    fn default() -> StoreRetry {
        StoreRetry {
            pause: RETRY_DELAY,
            tries: 0,
        }
    }
}

impl StoreRetry {
    /// Logs (the first and every tenth time) and counts a failed try, then waits before the next.
    /// Returns false when the lease was lost or `stop` fired meanwhile: no more tries.
    pub async fn wait(
        &mut self,
        error: &StoreError,
        lease: &Lease,
        stop: &CancellationToken,
    ) -> bool {
        self.tries += 1;
        if self.tries == 1 || self.tries.is_multiple_of(10) {
            tracing::warn!(%error, tries = self.tries, "order store unavailable; keeping the order and trying again");
        }
        metrics::counter!(m::STORE_RETRIES).increment(1);
        let waited = tokio::select! {
            _ = tokio::time::sleep(self.pause) => true,
            _ = lease.lost() => false,
            _ = stop.cancelled() => false,
        };
        self.pause = (self.pause * 2).min(MAX_RETRY_DELAY);
        waited
    }
}
