//! Runs one order's remaining steps and rollbacks under its lease, writing every transition through
//! the lease's [`Writer`].
//!
//! What to do next always comes from the document ([`Order::next_action`](crate::domain::order::Order::next_action)), so the same loop starts a
//! new order, resumes one another node left half done, and finishes a rollback.

use crate::clock::now;
use crate::domain::order::{Action, State, Step};
use crate::engine::interrupt::Interrupts;
use crate::engine::lease::Lease;
use crate::engine::steps::{StepOutcome, Steps};
use crate::engine::write::{Halt, Writer};
use crate::ops::metrics as m;
use crate::store::Versioned;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the node stops: `drain` asks the pipeline to stop at the next step boundary; `abort` stops it
/// at once, in the middle of a step.
#[derive(Clone, Default)]
pub struct Stop {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
}

pub struct Pipeline {
    node_id: String,
    steps: Arc<dyn Steps>,
    writer: Writer,
    interrupts: Interrupts,
}

impl Pipeline {
    pub fn new(
        node_id: String,
        steps: Arc<dyn Steps>,
        writer: Writer,
        interrupts: Interrupts,
    ) -> Pipeline {
        Pipeline {
            node_id,
            steps,
            writer,
            interrupts,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Runs `order` until it is terminal, returning the terminal state.
    pub async fn run(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<State, Halt> {
        loop {
            match self.next(order, lease, stop).await {
                Ok(Some(state)) => return Ok(state),
                // A cancel came in: what comes next is decided again from the document.
                Ok(None) | Err(Halt::Redirected) => {}
                Err(halt) => return Err(halt),
            }
        }
    }

    /// Takes the next action the document calls for; returns the terminal state once there is one.
    async fn next(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Option<State>, Halt> {
        self.see_intent(order, lease).await?;
        let action = order.order.next_action();
        if matches!(action, Action::Run(_) | Action::RollBack(_)) && stop.drain.is_cancelled() {
            return Err(Halt::Interrupted);
        }
        match action {
            Action::Run(step) => self.run_step(order, step, lease, stop).await?,
            Action::RollBack(step) => self.roll_back(order, step, lease, stop).await?,
            Action::Complete | Action::Fail | Action::Cancel => {
                let state = self
                    .writer
                    .commit(order, lease, "finish", |o| o.finish(now()))
                    .await?;
                tracing::debug!(state = %state, "order finished");
                return Ok(Some(state));
            }
            Action::Done => return Ok(Some(order.order.state)),
        }
        Ok(None)
    }

    /// Marks an intent recorded since the last commit as seen. Acting on it is the business of the
    /// request that recorded it (cancel, later); until then the order goes on.
    async fn see_intent(&self, order: &mut Versioned, lease: &Lease) -> Result<(), Halt> {
        let unseen = order
            .order
            .intent
            .as_ref()
            .is_some_and(|intent| intent.seen_by.is_none());
        if unseen {
            let kind = self
                .writer
                .commit(order, lease, "see_intent", |o| {
                    o.see_intent(&self.node_id, now())
                })
                .await?;
            tracing::info!(intent = ?kind, "intent seen");
        }
        Ok(())
    }

    async fn run_step(
        &self,
        order: &mut Versioned,
        step: Step,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<(), Halt> {
        self.writer
            .commit(order, lease, "start_step", |o| {
                o.start_step(step, &self.node_id, now())
            })
            .await?;
        tracing::debug!(order.step = %step, "step started");
        let started = Instant::now();
        let running = self.interrupts.register(order.order.order_id);
        let outcome = self.call(lease, stop, running.token(), |cancel| {
            self.steps.run(&order.order, step, cancel)
        });
        let outcome = outcome.await;
        drop(running);
        if let Err(Halt::Redirected) = outcome {
            // Interrupted by a cancel recorded in the document: take it up, then roll back.
            if self.writer.take_up_intent(order).await {
                tracing::info!(order.step = %step, "step interrupted by a cancel");
            }
            return Err(Halt::Redirected);
        }
        match outcome? {
            StepOutcome::Done => {
                self.writer
                    .commit(order, lease, "complete_step", |o| o.complete_step(now()))
                    .await?;
                tracing::debug!(order.step = %step, "step completed");
            }
            StepOutcome::Failed { reason } => {
                self.writer
                    .commit(order, lease, "fail_step", |o| {
                        o.fail_step(reason.clone(), now())
                    })
                    .await?;
                metrics::counter!(m::STEP_FAILURES, "step" => step.as_str()).increment(1);
                tracing::debug!(order.step = %step, "step failed; rolling back");
            }
            StepOutcome::NotNow => return Err(Halt::NotNow),
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
        self.writer
            .commit(order, lease, "start_rollback", |o| {
                o.start_rollback(step, &self.node_id, now())
            })
            .await?;
        tracing::debug!(order.step = %step, "rollback started");
        // A rollback is never interrupted: it is what a cancel asks for.
        let never = CancellationToken::new();
        let outcome = self.call(lease, stop, &never, |cancel| {
            self.steps.roll_back(&order.order, step, cancel)
        });
        match outcome.await? {
            StepOutcome::Done => {}
            StepOutcome::Failed { reason } => {
                tracing::warn!(order.step = %step, %reason, "rollback failed; handing the order back to try it again");
                return Err(Halt::NotNow);
            }
            StepOutcome::NotNow => return Err(Halt::NotNow),
        }
        self.writer
            .commit(order, lease, "complete_rollback", |o| {
                o.complete_rollback(step, now())
            })
            .await?;
        metrics::counter!(m::ROLLBACKS, "step" => step.as_str()).increment(1);
        tracing::debug!(order.step = %step, "rollback completed");
        Ok(())
    }

    /// Waits for one call of the steps, unless the lease is lost, the node aborts, the call is
    /// interrupted or its timeout passes first; the call's token fires in each of those cases.
    async fn call<'a>(
        &'a self,
        lease: &Lease,
        stop: &Stop,
        interrupted: &CancellationToken,
        call: impl FnOnce(CancellationToken) -> futures::future::BoxFuture<'a, StepOutcome>,
    ) -> Result<StepOutcome, Halt> {
        let cancel = CancellationToken::new();
        let _cancel_on_return = cancel.clone().drop_guard();
        let timeout = self.steps.timeout();
        let running = call(cancel.clone());
        tokio::select! {
            outcome = running => Ok(outcome),
            _ = lease.lost() => Err(Halt::Fenced),
            _ = stop.abort.cancelled() => Err(Halt::Interrupted),
            _ = interrupted.cancelled() => Err(Halt::Redirected),
            _ = sleep_or_never(timeout) => Ok(StepOutcome::NotNow),
        }
    }
}

async fn sleep_or_never(timeout: Option<std::time::Duration>) {
    match timeout {
        Some(timeout) => tokio::time::sleep(timeout).await,
        None => std::future::pending().await,
    }
}
