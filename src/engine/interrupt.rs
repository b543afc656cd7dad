//! Interrupting a running step when a cancel is accepted for its order.
//!
//! The document is the authority: a cancel is accepted by writing it there, and the owner would see
//! it at its next write anyway. [`Interrupts`] only makes that sooner: the pipeline registers each
//! step it runs, and a wake-up for the order (checked against the document by whoever delivers it)
//! stops waiting for the step, so its rollback starts at once instead of after the step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The steps running on this node that a cancel may interrupt, by order.
#[derive(Clone, Default)]
pub struct Interrupts {
    /// Each registration is numbered, so that a late drop cannot remove a newer one.
    running: Arc<Mutex<HashMap<Uuid, (u64, CancellationToken)>>>,
    registrations: Arc<AtomicU64>,
}

/// A step registered as running; it is unregistered when this is dropped.
pub struct Running {
    interrupts: Interrupts,
    order_id: Uuid,
    number: u64,
    token: CancellationToken,
}

impl Running {
    /// Fires when the step is interrupted.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.interrupts.lock();
        if running
            .get(&self.order_id)
            .is_some_and(|(number, _)| *number == self.number)
        {
            running.remove(&self.order_id);
        }
    }
}

impl Interrupts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (u64, CancellationToken)>> {
        // A panic elsewhere while the map was held leaves it consistent: every change is one call.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a step of `order_id` as running here.
    pub fn register(&self, order_id: Uuid) -> Running {
        let token = CancellationToken::new();
        let number = self.registrations.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(order_id, (number, token.clone()));
        Running {
            interrupts: self.clone(),
            order_id,
            number,
            token,
        }
    }

    /// Whether a step of `order_id` is running here.
    pub fn is_running(&self, order_id: Uuid) -> bool {
        self.lock().contains_key(&order_id)
    }

    /// Interrupts the step of `order_id` running here, if any; returns whether there was one.
    pub fn interrupt(&self, order_id: Uuid) -> bool {
        match self.lock().get(&order_id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_registered_step_is_interrupted() {
        let interrupts = Interrupts::default();
        let id = Uuid::now_v7();
        assert!(!interrupts.interrupt(id));
        let running = interrupts.register(id);
        assert!(interrupts.is_running(id));
        assert!(interrupts.interrupt(id));
        assert!(running.token().is_cancelled());
        drop(running);
        assert!(!interrupts.is_running(id));
        // A step registered again gets a fresh token.
        let again = interrupts.register(id);
        assert!(!again.token().is_cancelled());
    }
}
