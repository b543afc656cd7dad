//! Runs one order's remaining steps and rollbacks, writing every transition to the order's document with
//! a compare-and-set, and only while the node still holds the order's lease.
//!
//! What to do next always comes from the document ([`Order::next_action`]), so the same loop starts a
//! new order, resumes one another node left half done, and finishes a rollback.

use crate::clock::now;
use crate::domain::order::{Action, CurrentStep, Order, State, Step, TransitionError};
use crate::engine::lease::Lease;
use crate::engine::steps::FailureDraw;
use crate::ops::metrics as m;
use crate::store::{OrderStore, StoreError, Versioned};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Why the pipeline stopped before the order reached a terminal state.
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    /// The node is shutting down; progress so far is recorded, and the order can be handed back.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The node could not confirm its lease in time and stopped working on the order.
    #[error("self-fenced: lease could not be confirmed in time")]
    Fenced,
    /// Someone else wrote the order: this node no longer owns it.
    #[error("lease lost: {0}")]
    LeaseLost(StoreError),
    /// The order store failed in a way that may pass.
    #[error(transparent)]
    Store(StoreError),
    /// The document does not allow the transition: it was written by something else.
    #[error(transparent)]
    Invalid(#[from] TransitionError),
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

/// How the node stops: `drain` asks the pipeline to stop at the next step boundary; `abort` stops it
/// at once, in the middle of a step.
#[derive(Clone, Default)]
pub struct Stop {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
}

pub struct Pipeline {
    pub node_id: String,
    pub step_duration: Duration,
    pub rollback_duration: Duration,
    pub failures: FailureDraw,
    pub store: OrderStore,
    pub events: crate::ops::events::Events,
}

impl Pipeline {
    /// Runs `order` until it is terminal, returning the terminal state.
    pub async fn run(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<State, Halt> {
        loop {
            let action = order.order.next_action();
            if matches!(action, Action::Run(_) | Action::RollBack(_)) && stop.drain.is_cancelled() {
                return Err(Halt::Interrupted);
            }
            match action {
                Action::Run(step) => self.run_step(order, step, lease, stop).await?,
                Action::RollBack(step) => self.roll_back(order, step, lease, stop).await?,
                Action::Complete | Action::Fail => {
                    let state = self
                        .commit(order, lease, "finish", |o| o.finish(now()))
                        .await?;
                    tracing::debug!(state = %state, "order finished");
                    return Ok(state);
                }
                Action::Done => return Ok(order.order.state),
            }
        }
    }

    async fn run_step(
        &self,
        order: &mut Versioned,
        step: Step,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<(), Halt> {
        self.commit(order, lease, "start_step", |o| {
            o.start_step(step, &self.node_id, now())
        })
        .await?;
        tracing::debug!(order.step = %step, "step started");
        let started = Instant::now();
        self.wait(self.step_duration, lease, stop).await?;
        let attempt = order.order.attempt;
        if self.failures.fails(order.order.order_id, step, attempt) {
            let reason = format!(
                "{step} failed (simulated failure, rate {})",
                self.failures.rates.get(step)
            );
            self.commit(order, lease, "fail_step", |o| o.fail_step(reason, now()))
                .await?;
            metrics::counter!(m::STEP_FAILURES, "step" => step.as_str()).increment(1);
            tracing::debug!(order.step = %step, "step failed; rolling back");
        } else {
            self.commit(order, lease, "complete_step", |o| o.complete_step(now()))
                .await?;
            tracing::debug!(order.step = %step, "step completed");
        }
        metrics::histogram!(m::STEP_DURATION, "step" => step.as_str())
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn roll_back(
        &self,
        order: &mut Versioned,
        step: Step,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<(), Halt> {
        self.commit(order, lease, "start_rollback", |o| {
            o.start_rollback(step, &self.node_id, now())
        })
        .await?;
        tracing::debug!(order.step = %step, "rollback started");
        self.wait(self.rollback_duration, lease, stop).await?;
        self.commit(order, lease, "complete_rollback", |o| {
            o.complete_rollback(step, now())
        })
        .await?;
        metrics::counter!(m::ROLLBACKS, "step" => step.as_str()).increment(1);
        tracing::debug!(order.step = %step, "rollback completed");
        Ok(())
    }

    /// Waits out a step, unless the lease is lost or the node aborts first.
    async fn wait(&self, duration: Duration, lease: &Lease, stop: &Stop) -> Result<(), Halt> {
        tokio::select! {
            _ = tokio::time::sleep(duration) => Ok(()),
            _ = lease.lost() => Err(Halt::Fenced),
            _ = stop.abort.cancelled() => Err(Halt::Interrupted),
        }
    }

    /// Applies `change` (named `what` in the audit) to a copy of the document and writes it with a
    /// compare-and-set, if the lease is still held; the write must be answered before the lease's
    /// deadline.
    pub async fn commit<T>(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        what: &str,
        change: impl FnOnce(&mut Order) -> Result<T, TransitionError>,
    ) -> Result<T, Halt> {
        let mut next = order.order.clone();
        let result = change(&mut next)?;
        if !lease.is_held() {
            return Err(Halt::Fenced);
        }
        let sent = lease.sending(what);
        let written = tokio::select! {
            written = tokio::time::timeout_at(
                lease.deadline().into(),
                self.store.update(&next, order.revision),
            ) => written,
            _ = lease.lost() => {
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
        };
        let written = match written {
            Ok(Ok(written)) if lease.is_held() => written,
            Ok(Ok(_)) => {
                // Answered, but after the lease ended (its connection was lost meanwhile): the write
                // may have been stored after the node's interval, so it counts as unanswered.
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
            Ok(Err(e)) => {
                if !e.is_conflict() {
                    lease.unconfirmed(what, sent);
                }
                return Err(e.into());
            }
            Err(_) => {
                lease.unconfirmed(what, sent);
                return Err(Halt::Fenced);
            }
        };
        let step = match written.order.current_step {
            CurrentStep::Step(step) => Some(step),
            CurrentStep::Terminal(_) => None,
        };
        lease.committed(what, step, written.revision, sent);
        self.events.transition(&order.order, &written.order).await;
        *order = written;
        Ok(result)
    }
}
