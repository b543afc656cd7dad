//! Runs one order's remaining steps and rollbacks under its lease, writing every transition through
//! the lease's [`Writer`].
//!
//! What to do next always comes from the document ([`Order::next_action`](crate::domain::order::Order::next_action)), so the same loop starts a
//! new order, resumes one another node left half done, and finishes a rollback.

use crate::clock::now;
use crate::domain::order::{Action, Order, Owner, State, Step, TransitionError};
use crate::domain::payload::{depth, MAX_DEPTH};
use crate::engine::interrupt::Interrupts;
use crate::engine::lease::Lease;
use crate::engine::steps::{StepCall, StepOutcome, Steps, MAX_OUTPUT};
use crate::engine::write::{Halt, Writer};
use crate::ops::metrics as m;
use crate::store::Versioned;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How the node stops: `drain` asks the pipeline to stop at the next step boundary; `abort` stops it
/// at once, in the middle of a step.
#[derive(Clone, Default)]
pub struct Stop {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
}

/// What a write began along with its own change (see [`Pipeline::commit`]): a step or a rollback,
/// whose call comes next without a write of its own, or the order's end.
pub type Begun = Option<Action>;

/// The name, in the lease audit, of the write that begins `action`.
fn write_name(action: Action) -> &'static str {
    Call::of(action).map_or("finish", Call::start_name)
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

    /// Claims `order` for `owner` and, in the same write, begins what the document calls for next
    /// (normally the first step; see [`Pipeline::commit`]). Returns what the claim began, for
    /// [`Pipeline::run`].
    pub async fn claim(
        &self,
        order: &mut Versioned,
        owner: Owner,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Begun, Halt> {
        let ((), begun) = self
            .commit(order, lease, stop, "claim", |o| o.claim(owner.clone()))
            .await?;
        Ok(begun)
    }

    /// Runs `order` until it is terminal, returning the terminal state. `begun` is what the last
    /// write (the claim) began along with its own change.
    pub async fn run(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
        mut begun: Begun,
    ) -> Result<State, Halt> {
        loop {
            match self.next(order, lease, stop, &mut begun).await {
                Ok(Some(state)) => return Ok(state),
                Ok(None) => {}
                // A cancel came in: what comes next is decided again from the document.
                Err(Halt::Redirected) => begun = None,
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
        begun: &mut Begun,
    ) -> Result<Option<State>, Halt> {
        self.see_intent(order, lease, stop, begun).await?;
        let action = order.order.next_action();
        let Some(call) = Call::of(action) else {
            if action == Action::Done {
                return Ok(Some(order.order.state));
            }
            // Complete, Fail or Cancel, which the write before did not carry out along with its own.
            let state = self
                .writer
                .commit(order, lease, "finish", |o| o.finish(now()))
                .await?;
            tracing::debug!(state = %state, "order finished");
            return Ok(Some(state));
        };
        if begun.take() != Some(action) {
            if stop.drain.is_cancelled() {
                return Err(Halt::Interrupted);
            }
            self.begin(order, call, lease).await?;
        }
        *begun = match call {
            Call::Run(step) => self.run_step(order, step, lease, stop).await?,
            Call::RollBack(step) => self.roll_back(order, step, lease, stop).await?,
        };
        Ok(None)
    }

    /// Writes `change` (named `what` in the audit) and, in the same write, the next transition that
    /// needs no work before it: the next step's or rollback's start, or the order's end. A step that
    /// completes and the next one that starts are one write, as are the last step's completion and
    /// the order's end; the document records both, with their times. Nothing is begun while an
    /// intent waits to be seen, nor a step or a rollback while the node drains. Returns the change's
    /// result and what was begun.
    async fn commit<T>(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
        what: &'static str,
        mut change: impl FnMut(&mut Order) -> Result<T, TransitionError>,
    ) -> Result<(T, Begun), Halt> {
        self.writer
            .commit_named(order, lease, |o| {
                let result = change(o)?;
                let begun = self.carry(o, stop)?;
                let name = match begun {
                    Some(action) => Cow::Owned(format!("{what}+{}", write_name(action))),
                    None => Cow::Borrowed(what),
                };
                Ok(((result, begun), name))
            })
            .await
    }

    /// Applies to `order` the transition it calls for next, if that needs no work first (see
    /// [`Pipeline::commit`]).
    fn carry(&self, order: &mut Order, stop: &Stop) -> Result<Begun, TransitionError> {
        if order.intent.as_ref().is_some_and(|i| i.seen_by.is_none()) {
            return Ok(None);
        }
        let draining = stop.drain.is_cancelled();
        let action = order.next_action();
        match (action, Call::of(action)) {
            (_, Some(call)) if !draining => call.start(order, &self.node_id)?,
            (Action::Complete | Action::Fail | Action::Cancel, _) => {
                order.finish(now())?;
            }
            _ => return Ok(None),
        }
        Ok(Some(action))
    }

    /// Marks an intent recorded since the last commit as seen, beginning what comes next in the same
    /// write. Acting on it is the business of the request that recorded it (a cancel moved the order
    /// to `Cancelling`); the rollbacks it calls for follow from the document.
    async fn see_intent(
        &self,
        order: &mut Versioned,
        lease: &Lease,
        stop: &Stop,
        begun: &mut Begun,
    ) -> Result<(), Halt> {
        let unseen = order
            .order
            .intent
            .as_ref()
            .is_some_and(|intent| intent.seen_by.is_none());
        if unseen {
            let (kind, carried) = self
                .commit(order, lease, stop, "see_intent", |o| {
                    o.see_intent(&self.node_id, now())
                })
                .await?;
            *begun = carried;
            tracing::info!(intent = ?kind, "intent seen");
        }
        Ok(())
    }

    /// Records the start of `call` in a write of its own (when no earlier write began it).
    async fn begin(&self, order: &mut Versioned, call: Call, lease: &Lease) -> Result<(), Halt> {
        self.writer
            .commit(order, lease, call.start_name(), |o| {
                call.start(o, &self.node_id)
            })
            .await
    }

    /// Runs `step`, recorded started, and records how it ended; returns what that write began.
    async fn run_step(
        &self,
        order: &mut Versioned,
        step: Step,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Begun, Halt> {
        tracing::debug!(order.step = %step, "step started");
        let started = Instant::now();
        let running = self.interrupts.register(order.order.order_id);
        let outcome = self
            .call_until_taken(order, Call::Run(step), lease, stop, running.token())
            .await;
        drop(running);
        if let Err(Halt::Redirected) = outcome {
            // Interrupted by a cancel recorded in the document: take it up, then roll back.
            if self.writer.take_up_intent(order).await {
                tracing::info!(order.step = %step, "step interrupted by a cancel");
            }
            return Err(Halt::Redirected);
        }
        let begun = match bounded(outcome?) {
            StepOutcome::Done { output } => {
                let ((), begun) = self
                    .commit(order, lease, stop, "complete_step", |o| {
                        o.complete_step(output.clone(), now()).map(drop)
                    })
                    .await?;
                tracing::debug!(order.step = %step, "step completed");
                begun
            }
            StepOutcome::Failed { reason } => {
                let ((), begun) = self
                    .commit(order, lease, stop, "fail_step", |o| {
                        o.fail_step(reason.clone(), now()).map(drop)
                    })
                    .await?;
                metrics::counter!(m::STEP_FAILURES, "step" => step.as_str()).increment(1);
                tracing::debug!(order.step = %step, %reason, "step failed; rolling back");
                begun
            }
            StepOutcome::NotNow { .. } => return Err(Halt::NotNow),
        };
        metrics::histogram!(m::STEP_DURATION, "step" => step.as_str())
            .record(started.elapsed().as_secs_f64());
        Ok(begun)
    }

    /// Rolls back `step`, recorded rolling back, and records that it is undone; returns what that
    /// write began.
    async fn roll_back(
        &self,
        order: &mut Versioned,
        step: Step,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Begun, Halt> {
        tracing::debug!(order.step = %step, "rollback started");
        // A rollback is never interrupted: it is what a cancel asks for.
        let never = CancellationToken::new();
        let outcome = self
            .call_until_taken(order, Call::RollBack(step), lease, stop, &never)
            .await?;
        match outcome {
            StepOutcome::Done { .. } => {}
            StepOutcome::Failed { reason } => {
                tracing::warn!(order.step = %step, %reason, "rollback failed; handing the order back to try it again");
                return Err(Halt::NotNow);
            }
            StepOutcome::NotNow { .. } => return Err(Halt::NotNow),
        }
        let ((), begun) = self
            .commit(order, lease, stop, "complete_rollback", |o| {
                o.complete_rollback(step, now())
            })
            .await?;
        metrics::counter!(m::ROLLBACKS, "step" => step.as_str()).increment(1);
        tracing::debug!(order.step = %step, "rollback completed");
        Ok(begun)
    }

    /// Calls the steps until they take the call. While they answer "not now" (a step service has
    /// no instance running), the node keeps the order and its lease, records once in the document
    /// why it waits, and calls again after a pause: the wait uses up no delivery, however long it
    /// lasts. A drain hands a waiting order back at once.
    async fn call_until_taken(
        &self,
        order: &mut Versioned,
        call: Call,
        lease: &Lease,
        stop: &Stop,
        interrupted: &CancellationToken,
    ) -> Result<StepOutcome, Halt> {
        let step = call.step();
        let mut pause = Pause::default();
        loop {
            let reason = match self
                .call(&order.order, call, lease, stop, interrupted)
                .await?
            {
                StepOutcome::NotNow { reason } => reason,
                taken => return Ok(taken),
            };
            metrics::counter!(m::STEP_UNAVAILABLE, "step" => step.as_str()).increment(1);
            if order.order.waiting.is_none() {
                tracing::warn!(order.step = %step, %reason, "the step cannot be run now; keeping the order and calling again");
                self.writer
                    .commit(order, lease, "wait", |o| {
                        o.wait(step, reason.clone(), now())
                    })
                    .await?;
                if order.order.next_action() != call.action() {
                    return Err(Halt::Redirected);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause.next()) => {}
                _ = lease.lost() => return Err(Halt::Fenced),
                _ = stop.drain.cancelled() => return Err(Halt::Interrupted),
                _ = stop.abort.cancelled() => return Err(Halt::Interrupted),
                _ = interrupted.cancelled() => return Err(Halt::Redirected),
            }
        }
    }

    /// Waits for one call of the steps, unless the lease is lost, the node aborts, the call is
    /// interrupted or its timeout passes first (the step fails then); the call's token fires in each
    /// of those cases. An interrupted run is still waited for, up to its timeout, when the steps ask
    /// for it ([`Steps::awaits_interrupted_runs`]), so that its rollback comes after it.
    async fn call(
        &self,
        order: &Order,
        call: Call,
        lease: &Lease,
        stop: &Stop,
        interrupted: &CancellationToken,
    ) -> Result<StepOutcome, Halt> {
        let cancel = CancellationToken::new();
        let _cancel_on_return = cancel.clone().drop_guard();
        let step = call.step();
        let details = StepCall {
            order,
            step,
            attempt: order.retries + 1,
            run: order
                .steps
                .iter()
                .rev()
                .find(|record| record.step_name == step)
                .map_or(1, |record| record.runs),
            fence: lease.claim_revision(),
            cancel: cancel.clone(),
        };
        let timeout = self.steps.timeout();
        let running = match call {
            Call::Run(_) => self.steps.run(details),
            Call::RollBack(_) => self.steps.roll_back(details),
        };
        let timed_out = sleep_or_never(timeout);
        tokio::pin!(running, timed_out);
        tokio::select! {
            outcome = &mut running => Ok(outcome),
            _ = lease.lost() => Err(Halt::Fenced),
            _ = stop.abort.cancelled() => Err(Halt::Interrupted),
            _ = interrupted.cancelled() => {
                if matches!(call, Call::Run(_)) && self.steps.awaits_interrupted_runs() {
                    tokio::select! {
                        _ = &mut running => {}
                        _ = &mut timed_out => {}
                        _ = lease.lost() => return Err(Halt::Fenced),
                        _ = stop.abort.cancelled() => return Err(Halt::Interrupted),
                    }
                }
                Err(Halt::Redirected)
            }
            _ = &mut timed_out => {
                metrics::counter!(m::STEP_TIMEOUTS, "step" => step.as_str()).increment(1);
                let waited = humantime::format_duration(timeout.unwrap_or_default());
                Ok(StepOutcome::Failed {
                    reason: format!("{call} timed out: no answer within {waited} (the step timeout)"),
                })
            }
        }
    }
}

/// Which call of the steps the pipeline makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Run(Step),
    RollBack(Step),
}

impl Call {
    /// The call `action` asks for, if it asks for one.
    fn of(action: Action) -> Option<Call> {
        match action {
            Action::Run(step) => Some(Call::Run(step)),
            Action::RollBack(step) => Some(Call::RollBack(step)),
            Action::Complete | Action::Fail | Action::Cancel | Action::Done => None,
        }
    }

    /// Records in `order` that `node` starts the call.
    fn start(self, order: &mut Order, node: &str) -> Result<(), TransitionError> {
        match self {
            Call::Run(step) => order.start_step(step, node, now()),
            Call::RollBack(step) => order.start_rollback(step, node, now()),
        }
    }

    /// The name of that change in the lease audit.
    fn start_name(self) -> &'static str {
        match self {
            Call::Run(_) => "start_step",
            Call::RollBack(_) => "start_rollback",
        }
    }

    fn step(self) -> Step {
        match self {
            Call::Run(step) | Call::RollBack(step) => step,
        }
    }

    /// The action of the document this call carries out.
    fn action(self) -> Action {
        match self {
            Call::Run(step) => Action::Run(step),
            Call::RollBack(step) => Action::RollBack(step),
        }
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Call::Run(step) => write!(f, "{step}"),
            Call::RollBack(step) => write!(f, "the rollback of {step}"),
        }
    }
}

/// A step's output larger or deeper than the document allows fails the step instead.
fn bounded(outcome: StepOutcome) -> StepOutcome {
    match outcome {
        StepOutcome::Done {
            output: Some(output),
        } if output.0.get().len() > MAX_OUTPUT => StepOutcome::Failed {
            reason: format!(
                "the step's output is {} bytes, more than the {MAX_OUTPUT} a step may answer",
                output.0.get().len()
            ),
        },
        StepOutcome::Done {
            output: Some(output),
        } if depth(output.0.get()) > MAX_DEPTH => StepOutcome::Failed {
            reason: format!(
                "the step's output is nested more than {MAX_DEPTH} arrays or objects deep"
            ),
        },
        outcome => outcome,
    }
}

/// The pauses between calls of a step that cannot run now: 1 s, 2 s, 4 s, then every 5 s.
struct Pause(Duration);

impl Default for Pause {
    fn default() -> Pause {
        Pause(Duration::from_secs(1))
    }
}

impl Pause {
    fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        pause
    }
}

async fn sleep_or_never(timeout: Option<Duration>) {
    match timeout {
        Some(timeout) => tokio::time::sleep(timeout).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_five_seconds() {
        let mut pause = Pause::default();
        let secs: Vec<u64> = (0..6).map(|_| pause.next().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 5, 5, 5]);
    }
}
