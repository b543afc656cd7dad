//! The order domain, free of I/O: steps, states, the JSON document stored in the `orders` bucket, and
//! the transitions between states.
//!
//! The document is the single authority on how far an order got. [`Order::next_action`] derives what
//! has to happen next purely from it, so a node that takes an order over resumes exactly where the
//! previous owner's last recorded transition left it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use super::intent::{Intent, IntentKind};
use super::limits::{bounded_reason, ATTEMPT_ROOM, DOCUMENT_LIMIT, HISTORY_KEPT};

/// The four processing steps, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Step {
    Scheduling,
    #[serde(rename = "Pre-Processing")]
    PreProcessing,
    Processing,
    #[serde(rename = "Post-Processing")]
    PostProcessing,
}

impl Step {
    pub const ALL: [Step; 4] = [
        Step::Scheduling,
        Step::PreProcessing,
        Step::Processing,
        Step::PostProcessing,
    ];

    /// The step's name on the wire and in logs ("Pre-Processing").
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Scheduling => "Scheduling",
            Step::PreProcessing => "Pre-Processing",
            Step::Processing => "Processing",
            Step::PostProcessing => "Post-Processing",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The step after this one, or `None` after the last.
    pub fn next(self) -> Option<Step> {
        Step::ALL.get(self.index() + 1).copied()
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Step {
    type Err = String;

    /// Accepts the wire name ("Pre-Processing") and, for convenience in config, the name without the
    /// dash or in any case ("preprocessing").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let folded: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        Step::ALL
            .into_iter()
            .find(|step| step.as_str().replace('-', "").to_lowercase() == folded)
            .ok_or_else(|| {
                format!("unknown step {s:?} (expected Scheduling, Pre-Processing, Processing or Post-Processing)")
            })
    }
}

/// Where the order is as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum State {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is running its steps.
    Running,
    /// A step failed; the steps done so far are being undone in reverse order.
    RollingBack,
    /// A cancel was accepted; the steps done so far are being undone in reverse order, and the order
    /// will end `Cancelled`. No step starts any more.
    Cancelling,
    Completed,
    Failed,
    Cancelled,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Queued,
        State::Running,
        State::RollingBack,
        State::Cancelling,
        State::Completed,
        State::Failed,
        State::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "Queued",
            State::Running => "Running",
            State::RollingBack => "RollingBack",
            State::Cancelling => "Cancelling",
            State::Completed => "Completed",
            State::Failed => "Failed",
            State::Cancelled => "Cancelled",
        }
    }
}

impl FromStr for State {
    type Err = String;

    /// Accepts the names the document uses ("RollingBack"), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = State::ALL.iter().map(|state| state.as_str()).collect();
                format!("unknown state {s:?} (expected one of {})", names.join(", "))
            })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of `current_step`: one of the four steps, then a terminal marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CurrentStep {
    Step(Step),
    Terminal(Terminal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Terminal {
    Completed,
    Failed,
    Cancelled,
}

/// How one step's record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum StepStatus {
    Running,
    Completed,
    Failed,
    RollingBack,
    RolledBack,
}

/// How the order came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// `POST /orders`.
    Http,
    /// A request on `orders.create`.
    Nats,
    /// Published straight into the `ORDERS` stream.
    Stream,
}

impl Interface {
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Http => "http",
            Interface::Nats => "nats",
            Interface::Stream => "stream",
        }
    }

    /// The interface named by `name` (as written by [`Interface::as_str`]).
    pub fn parse(name: &str) -> Option<Interface> {
        [Interface::Http, Interface::Nats, Interface::Stream]
            .into_iter()
            .find(|i| i.as_str() == name)
    }
}

/// One step's record in `steps[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepRecord {
    pub step_name: Step,
    pub status: StepStatus,
    pub step_start_time: DateTime<Utc>,
    pub step_complete_time: Option<DateTime<Utc>>,
    /// The node that ran (or is running) the step.
    pub node: String,
    /// The delivery attempt of the order's message when the step (last) started.
    pub attempt: u32,
    /// How many times the step was started: more than 1 when its node stopped in the middle of it.
    pub runs: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_complete_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_node: Option<String>,
    /// What the step's code answered when it completed the step (a JSON object), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub output: Option<StepOutput>,
}

/// A step's answer, as its code gave it: a JSON value kept exactly as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepOutput(pub Box<RawValue>);

impl PartialEq for StepOutput {
    fn eq(&self, other: &StepOutput) -> bool {
        self.0.get() == other.0.get()
    }
}

/// Why the owner is waiting before it runs a step: the step's code cannot take it now (a step
/// service has no instance running). Written when the wait starts, cleared by the next transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Waiting {
    pub step: Step,
    pub since: DateTime<Utc>,
    pub reason: String,
}

/// Who works on the order right now: the node and the message delivery it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Owner {
    pub node: String,
    /// The delivery count of the message the node holds (1 = first delivery).
    pub delivery: u32,
    /// The stream sequence of the message the node holds.
    #[serde(default)]
    pub stream_seq: u64,
    pub claimed_at: DateTime<Utc>,
}

/// The order's document: the value of key `<order_id>` in the `orders` bucket, and the reply to a query.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    pub order_id: Uuid,
    pub state: State,
    pub current_step: CurrentStep,
    /// When the order was accepted.
    pub start_time: DateTime<Utc>,
    /// When it reached `Completed` or `Failed`.
    pub complete_time: Option<DateTime<Utc>>,
    pub steps: Vec<StepRecord>,
    /// The step that failed, on a failed order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The delivery attempt of the order's message that is (or was last) working on it; 0 while queued.
    pub attempt: u32,
    #[serde(default)]
    pub owner: Option<Owner>,
    /// The stream sequence of the work message that carries the order, once a worker claimed it. A
    /// second message for the same order (submitted again after the duplicate window) is recognised
    /// by its different sequence.
    #[serde(default)]
    pub message_seq: Option<u64>,
    pub submitted_via: Interface,
    pub updated_at: DateTime<Utc>,
    /// The order's payload, exactly as submitted: a JSON object (an order recorded as failed when
    /// its work message carried anything else keeps that).
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<RawValue>,
    /// A request from outside for the node that owns the order; absent unless one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Box<Intent>>,
    /// How many times the order was retried after it ended `Failed` or `Cancelled`; absent until the
    /// first retry.
    #[serde(default, skip_serializing_if = "never_retried")]
    pub retries: u32,
    /// The earlier attempts of a retried order, oldest first: the last [`HISTORY_KEPT`] at most, and
    /// fewer when they would leave the document too little room for another attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<EarlierAttempt>,
    /// How many of the oldest earlier attempts were dropped from `history` to keep the document
    /// within its size; absent when none were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_dropped: u32,
    /// A retry asked for and not yet recorded: its work message is on its way, and only a message
    /// with this retry's number and key starts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_request: Option<RetryRequest>,
    /// Why the owner is waiting to run a step, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

fn never_retried(retries: &u32) -> bool {
    *retries == 0
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many bytes `value` takes as JSON.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// A retry on its way: recorded in the terminal document before its work message is published, so
/// that a node starts a retry only when the document asked for it (a work message alone, which a
/// submitter can publish, cannot), and only from the message whose id carries this key (which nobody
/// can publish first, since nobody knows it before it is recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetryRequest {
    /// The number the retry will have (`retries + 1`).
    pub retry: u32,
    /// A random key, part of the work message's id.
    pub key: String,
    pub requested_at: DateTime<Utc>,
}

/// An attempt of a retried order, as it ended: kept in the document's `history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EarlierAttempt {
    /// 0 for the first attempt, then 1, 2, ... for each retry.
    pub retry: u32,
    pub state: State,
    pub start_time: DateTime<Utc>,
    pub complete_time: Option<DateTime<Utc>>,
    pub steps: Vec<StepRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Box<Intent>>,
}

/// What a cancel request comes to, decided by the document alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAnswer {
    /// The order is `Cancelled` (now, or already): `200`.
    Cancelled,
    /// The order is on its way to `Cancelled` (`Cancelling`): `202`. It will end `Cancelled`.
    Accepted,
}

/// A request the order's state does not allow (`409`): the order will not be cancelled or retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {attempted} an order that is {state}")]
pub struct Refused {
    pub attempted: &'static str,
    pub state: State,
}

/// What has to happen next to an order, derived from its document alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run this step (from its start, also when a previous run was interrupted).
    Run(Step),
    /// Undo this step.
    RollBack(Step),
    /// All four steps are done: mark the order `Completed`.
    Complete,
    /// Every step that needed undoing is rolled back: mark the order `Failed`.
    Fail,
    /// Every step done before a cancel is rolled back: mark the order `Cancelled`.
    Cancel,
    /// The order is terminal; nothing is left to do.
    Done,
}

/// A transition that does not fit the document's current state. Seeing one means a bug or a document
/// written by something else; the caller must not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {attempted} an order in state {state} (next action: {next:?})")]
pub struct TransitionError {
    pub attempted: &'static str,
    pub state: State,
    pub next: Action,
}

impl Order {
    /// A new order, accepted at `now` and waiting for a worker.
    pub fn queued(
        order_id: Uuid,
        payload: Box<RawValue>,
        via: Interface,
        now: DateTime<Utc>,
    ) -> Order {
        Order {
            order_id,
            state: State::Queued,
            current_step: CurrentStep::Step(Step::Scheduling),
            start_time: now,
            complete_time: None,
            steps: Vec::new(),
            failed_step: None,
            failure_reason: None,
            attempt: 0,
            owner: None,
            message_seq: None,
            submitted_via: via,
            updated_at: now,
            payload,
            intent: None,
            retries: 0,
            history: Vec::new(),
            history_dropped: 0,
            retry_request: None,
            waiting: None,
        }
    }

    /// An order whose submission can never be processed (for example a payload that is not a JSON
    /// object): it is recorded as failed without running any step.
    pub fn rejected(
        order_id: Uuid,
        payload: Box<RawValue>,
        reason: String,
        now: DateTime<Utc>,
    ) -> Order {
        let mut order = Order::queued(order_id, payload, Interface::Stream, now);
        order.state = State::Failed;
        order.current_step = CurrentStep::Terminal(Terminal::Failed);
        order.complete_time = Some(now);
        order.failure_reason = Some(bounded_reason(reason));
        order
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    pub fn next_action(&self) -> Action {
        match self.state {
            State::Completed | State::Failed | State::Cancelled => Action::Done,
            State::Cancelling => self
                .next_rollback()
                .map_or(Action::Cancel, Action::RollBack),
            State::Queued | State::Running => match self.steps.last() {
                None => Action::Run(Step::Scheduling),
                Some(last) => match last.status {
                    StepStatus::Running => Action::Run(last.step_name),
                    StepStatus::Completed => {
                        last.step_name.next().map_or(Action::Complete, Action::Run)
                    }
                    // A failed step always moves the order to RollingBack; treat a stray one the same.
                    StepStatus::Failed | StepStatus::RollingBack | StepStatus::RolledBack => {
                        self.next_rollback().map_or(Action::Fail, Action::RollBack)
                    }
                },
            },
            State::RollingBack => self.next_rollback().map_or(Action::Fail, Action::RollBack),
        }
    }

    /// The latest step not rolled back yet, if any. A step interrupted by a cancel (still recorded
    /// running) may have done part of its work, so it is rolled back like the others.
    fn next_rollback(&self) -> Option<Step> {
        self.steps
            .iter()
            .rev()
            .find(|record| record.status != StepStatus::RolledBack)
            .map(|record| record.step_name)
    }

    fn expect(
        &self,
        attempted: &'static str,
        wanted: impl Fn(Action) -> bool,
    ) -> Result<(), TransitionError> {
        let next = self.next_action();
        if wanted(next) {
            Ok(())
        } else {
            Err(TransitionError {
                attempted,
                state: self.state,
                next,
            })
        }
    }

    /// Takes the order for `owner`: from now on its writes are the order's writes.
    pub fn claim(&mut self, owner: Owner) -> Result<(), TransitionError> {
        self.expect("claim", |next| next != Action::Done)?;
        self.attempt = owner.delivery;
        self.updated_at = owner.claimed_at;
        self.message_seq = Some(owner.stream_seq);
        if self.state == State::Queued {
            self.state = State::Running;
        }
        self.owner = Some(owner);
        Ok(())
    }

    /// Marks the recorded intent as seen by `node`, the order's owner; returns what it asks for.
    pub fn see_intent(
        &mut self,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<super::intent::IntentKind, TransitionError> {
        let Some(intent) = self.intent.as_mut() else {
            return Err(TransitionError {
                attempted: "see the intent of",
                state: self.state,
                next: self.next_action(),
            });
        };
        intent.seen_by = Some(node.to_owned());
        intent.seen_at = Some(now);
        Ok(intent.kind)
    }

    /// Whether `stored` is this document with an intent recorded and nothing else changed: the
    /// write of a requester, not of another owner. It is, when applying the stored intent to this
    /// document gives exactly the stored document.
    pub fn only_intent_added(&self, stored: &Order) -> bool {
        let Some(intent) = stored.intent.as_deref() else {
            return false;
        };
        if stored.intent == self.intent {
            return false;
        }
        let mut expected = self.clone();
        expected.apply_intent(intent.clone());
        // Compared as written, not as JSON values: a payload or an output may hold what a JSON value
        // cannot (a number out of range, a lone surrogate, deep nesting), and is kept byte for byte.
        match (serde_json::to_vec(&expected), serde_json::to_vec(stored)) {
            (Ok(expected), Ok(stored)) => expected == stored,
            _ => false,
        }
    }

    /// Records `intent` and what it does to the document at once. A cancel of an order nobody ever
    /// picked up ends it `Cancelled` here; any other cancel moves it to `Cancelling`, for its owner
    /// (or the next one) to roll back what is done. The change depends on the document and the
    /// intent alone, so the owner can tell it from any other write ([`Order::only_intent_added`]).
    fn apply_intent(&mut self, intent: Intent) {
        let at = intent.requested_at;
        match intent.kind {
            IntentKind::Cancel if self.never_picked_up() => {
                self.state = State::Cancelled;
                self.current_step = CurrentStep::Terminal(Terminal::Cancelled);
                self.complete_time = Some(at);
            }
            IntentKind::Cancel => self.state = State::Cancelling,
        }
        self.intent = Some(Box::new(intent));
        self.updated_at = at;
    }

    fn never_picked_up(&self) -> bool {
        self.state == State::Queued && self.owner.is_none() && self.steps.is_empty()
    }

    /// Asks for the order to be cancelled. The answer is final: `Cancelled` and `Accepted` mean the
    /// order will end `Cancelled`, a refusal that it will not (it ended, or is rolling back after a
    /// failure and will end `Failed`). Returns whether the document changed.
    pub fn request_cancel(&mut self, intent: Intent) -> Result<(CancelAnswer, bool), Refused> {
        match self.state {
            State::Cancelled => Ok((CancelAnswer::Cancelled, false)),
            State::Cancelling => Ok((CancelAnswer::Accepted, false)),
            State::Completed | State::Failed | State::RollingBack => Err(Refused {
                attempted: "cancel",
                state: self.state,
            }),
            State::Queued | State::Running => {
                self.apply_intent(Intent {
                    kind: IntentKind::Cancel,
                    ..intent
                });
                let answer = if self.state == State::Cancelled {
                    CancelAnswer::Cancelled
                } else {
                    CancelAnswer::Accepted
                };
                Ok((answer, true))
            }
        }
    }

    /// Records that retry number `retries + 1` was asked for, with the `key` its work message's id
    /// carries. Only a `Failed` or `Cancelled` order can be retried.
    pub fn request_retry(&mut self, key: String, now: DateTime<Utc>) -> Result<u32, Refused> {
        self.retryable()?;
        let retry = self.retries + 1;
        self.retry_request = Some(RetryRequest {
            retry,
            key,
            requested_at: now,
        });
        Ok(retry)
    }

    fn retryable(&self) -> Result<(), Refused> {
        if matches!(self.state, State::Failed | State::Cancelled) {
            Ok(())
        } else {
            Err(Refused {
                attempted: "retry",
                state: self.state,
            })
        }
    }

    /// Starts the order again from `Scheduling`, as retry number `retries + 1`, keeping the attempt
    /// that ended in `history`. Only a `Failed` or `Cancelled` order can be retried. The oldest
    /// attempts are dropped from `history` while it holds more than [`HISTORY_KEPT`], or while the
    /// document would leave less than [`ATTEMPT_ROOM`] for the new attempt.
    pub fn retry(&mut self, now: DateTime<Utc>) -> Result<(), Refused> {
        self.retryable()?;
        self.history.push(EarlierAttempt {
            retry: self.retries,
            state: self.state,
            start_time: self.start_time,
            complete_time: self.complete_time,
            steps: std::mem::take(&mut self.steps),
            failed_step: self.failed_step.take(),
            failure_reason: self.failure_reason.take(),
            intent: self.intent.take(),
        });
        self.retries = self.retries.saturating_add(1);
        self.retry_request = None;
        self.state = State::Queued;
        self.current_step = CurrentStep::Step(Step::Scheduling);
        self.start_time = now;
        self.complete_time = None;
        self.attempt = 0;
        self.owner = None;
        self.message_seq = None;
        self.updated_at = now;
        self.trim_history();
        Ok(())
    }

    /// Drops the oldest earlier attempts while there are more than [`HISTORY_KEPT`] or the document
    /// leaves less than [`ATTEMPT_ROOM`] below [`DOCUMENT_LIMIT`].
    fn trim_history(&mut self) {
        let mut total = encoded_len(self);
        let budget = DOCUMENT_LIMIT - ATTEMPT_ROOM;
        while !self.history.is_empty() && (self.history.len() > HISTORY_KEPT || total > budget) {
            let dropped = self.history.remove(0);
            // The entry and the comma after it.
            total = total.saturating_sub(encoded_len(&dropped) + 1);
            self.history_dropped = self.history_dropped.saturating_add(1);
        }
    }

    /// Gives the order back (for another node to continue) without changing its progress.
    pub fn release(&mut self, now: DateTime<Utc>) {
        self.owner = None;
        self.waiting = None;
        self.updated_at = now;
    }

    /// Starts `step` on `node`. A step whose previous run was interrupted starts over.
    pub fn start_step(
        &mut self,
        step: Step,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        self.expect("start step", |next| next == Action::Run(step))?;
        let record = StepRecord {
            step_name: step,
            status: StepStatus::Running,
            step_start_time: now,
            step_complete_time: None,
            node: node.to_owned(),
            attempt: self.attempt,
            runs: 1,
            rollback_start_time: None,
            rollback_complete_time: None,
            rollback_node: None,
            output: None,
        };
        self.waiting = None;
        match self.steps.last_mut() {
            Some(last) if last.step_name == step && last.status == StepStatus::Running => {
                let runs = last.runs + 1;
                *last = StepRecord { runs, ..record };
            }
            _ => self.steps.push(record),
        }
        self.state = State::Running;
        self.current_step = CurrentStep::Step(step);
        self.updated_at = now;
        Ok(())
    }

    fn running_record(
        &mut self,
        attempted: &'static str,
    ) -> Result<&mut StepRecord, TransitionError> {
        let state = self.state;
        let next = self.next_action();
        let stepping = matches!(state, State::Running | State::Cancelling);
        match self.steps.last_mut() {
            Some(last) if stepping && last.status == StepStatus::Running => Ok(last),
            _ => Err(TransitionError {
                attempted,
                state,
                next,
            }),
        }
    }

    /// The running step finished successfully, answering `output`.
    pub fn complete_step(
        &mut self,
        output: Option<StepOutput>,
        now: DateTime<Utc>,
    ) -> Result<Step, TransitionError> {
        let record = self.running_record("complete step")?;
        record.status = StepStatus::Completed;
        record.step_complete_time = Some(now);
        record.output = output;
        let step = record.step_name;
        self.waiting = None;
        self.updated_at = now;
        Ok(step)
    }

    /// The owner waits before it runs (or rolls back) `step` again, for `reason`. The document says so until the
    /// next transition; a wait already recorded for the same step is kept as it is.
    pub fn wait(
        &mut self,
        step: Step,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        self.expect("wait", |next| {
            next == Action::Run(step) || next == Action::RollBack(step)
        })?;
        if self.waiting.as_ref().is_some_and(|w| w.step == step) {
            return Ok(());
        }
        self.waiting = Some(Waiting {
            step,
            since: now,
            reason,
        });
        self.updated_at = now;
        Ok(())
    }

    /// The running step failed: the order starts rolling back (or goes on rolling back, when a cancel
    /// came first: it still ends `Cancelled`).
    pub fn fail_step(
        &mut self,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<Step, TransitionError> {
        let record = self.running_record("fail step")?;
        record.status = StepStatus::Failed;
        record.step_complete_time = Some(now);
        let step = record.step_name;
        self.waiting = None;
        if self.state == State::Running {
            self.state = State::RollingBack;
        }
        self.failed_step = Some(step);
        self.failure_reason = Some(bounded_reason(reason));
        self.updated_at = now;
        Ok(step)
    }

    /// Starts undoing `step` on `node`.
    pub fn start_rollback(
        &mut self,
        step: Step,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        self.expect("start rollback", |next| next == Action::RollBack(step))?;
        let record = self
            .steps
            .iter_mut()
            .rev()
            .find(|record| record.step_name == step)
            .expect("next_action names a recorded step");
        record.status = StepStatus::RollingBack;
        record.rollback_start_time = Some(now);
        record.rollback_node = Some(node.to_owned());
        self.waiting = None;
        self.current_step = CurrentStep::Step(step);
        self.updated_at = now;
        Ok(())
    }

    /// The rollback of `step` finished.
    pub fn complete_rollback(
        &mut self,
        step: Step,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        let state = self.state;
        let next = self.next_action();
        let record = self
            .steps
            .iter_mut()
            .rev()
            .find(|record| record.step_name == step && record.status == StepStatus::RollingBack)
            .ok_or(TransitionError {
                attempted: "complete rollback",
                state,
                next,
            })?;
        record.status = StepStatus::RolledBack;
        record.rollback_complete_time = Some(now);
        self.waiting = None;
        self.updated_at = now;
        Ok(())
    }

    /// Marks the order terminal: `Completed` after the last step, `Failed` after the last rollback
    /// of a failure, `Cancelled` after the last rollback of a cancel.
    pub fn finish(&mut self, now: DateTime<Utc>) -> Result<State, TransitionError> {
        let (state, marker) = match self.next_action() {
            Action::Complete => (State::Completed, Terminal::Completed),
            Action::Fail => (State::Failed, Terminal::Failed),
            Action::Cancel => (State::Cancelled, Terminal::Cancelled),
            next => {
                return Err(TransitionError {
                    attempted: "finish",
                    state: self.state,
                    next,
                })
            }
        };
        self.state = state;
        self.current_step = CurrentStep::Terminal(marker);
        self.complete_time = Some(now);
        self.owner = None;
        self.waiting = None;
        self.updated_at = now;
        Ok(state)
    }

    /// Ends the order without running what is left, for an order that cannot go on (for example one
    /// whose deliveries are exhausted): `Failed`, or `Cancelled` when a cancel was accepted (that
    /// answer stands). A step left running is marked failed.
    pub fn abandon(&mut self, reason: String, now: DateTime<Utc>) -> Result<(), TransitionError> {
        self.expect("abandon", |next| next != Action::Done)?;
        if let Some(last) = self.steps.last_mut() {
            if matches!(last.status, StepStatus::Running) {
                last.status = StepStatus::Failed;
                last.step_complete_time = Some(now);
                self.failed_step = Some(last.step_name);
            }
        }
        if self.state == State::Cancelling {
            self.state = State::Cancelled;
            self.current_step = CurrentStep::Terminal(Terminal::Cancelled);
        } else {
            self.state = State::Failed;
            self.current_step = CurrentStep::Terminal(Terminal::Failed);
        }
        self.failure_reason = Some(reason);
        self.complete_time = Some(now);
        self.owner = None;
        self.waiting = None;
        self.updated_at = now;
        Ok(())
    }
}

/// Parses an order id as it appears in a subject, key or URL: a UUID in its canonical lower-case,
/// hyphenated form, so that the same order has one spelling everywhere.
pub fn parse_order_id(s: &str) -> Result<Uuid, InvalidOrderId> {
    match Uuid::parse_str(s) {
        Ok(id) if id.hyphenated().to_string() == s => Ok(id),
        _ => Err(InvalidOrderId(s.chars().take(80).collect())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid order id {0:?}: expected a UUID in lower-case hyphenated form, like 0192f5c4-6b1e-7c3a-9d2e-8f1a2b3c4d5e")]
pub struct InvalidOrderId(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn payload() -> Box<RawValue> {
        RawValue::from_string(r#"{"customer":"ada"}"#.to_owned()).unwrap()
    }

    /// A claimed order whose payload is `json`.
    fn with_payload(json: &str) -> Order {
        let payload = RawValue::from_string(json.to_owned()).unwrap();
        let mut order = Order::queued(Uuid::now_v7(), payload, Interface::Http, t(0));
        order
            .claim(Owner {
                node: "n1".into(),
                delivery: 1,
                stream_seq: 1,
                claimed_at: t(1),
            })
            .unwrap();
        order
    }

    fn new_order() -> Order {
        with_payload(payload().get())
    }

    /// Drives an order the way the pipeline does; `fail_at` makes that step fail.
    fn drive(order: &mut Order, fail_at: Option<Step>) {
        let mut clock = 10;
        loop {
            clock += 1;
            match order.next_action() {
                Action::Run(step) => {
                    order.start_step(step, "n1", t(clock)).unwrap();
                    clock += 1;
                    if Some(step) == fail_at {
                        order.fail_step(format!("{step} failed"), t(clock)).unwrap();
                    } else {
                        order.complete_step(None, t(clock)).unwrap();
                    }
                }
                Action::RollBack(step) => {
                    order.start_rollback(step, "n1", t(clock)).unwrap();
                    clock += 1;
                    order.complete_rollback(step, t(clock)).unwrap();
                }
                Action::Complete | Action::Fail | Action::Cancel => {
                    order.finish(t(clock)).unwrap();
                }
                Action::Done => return,
            }
        }
    }

    #[test]
    fn success_runs_all_four_steps_in_order() {
        let mut order = new_order();
        drive(&mut order, None);
        assert_eq!(order.state, State::Completed);
        assert_eq!(
            order.current_step,
            CurrentStep::Terminal(Terminal::Completed)
        );
        let names: Vec<Step> = order.steps.iter().map(|r| r.step_name).collect();
        assert_eq!(names, Step::ALL);
        for record in &order.steps {
            assert_eq!(record.status, StepStatus::Completed);
            assert!(record.step_complete_time.unwrap() > record.step_start_time);
            assert!(record.rollback_start_time.is_none());
        }
        for pair in order.steps.windows(2) {
            assert!(pair[1].step_start_time >= pair[0].step_complete_time.unwrap());
        }
        assert!(order.complete_time.is_some());
        assert!(order.owner.is_none());
    }

    #[test]
    fn a_wait_is_recorded_once_and_cleared_by_the_next_transition() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        assert!(order.wait(Step::Processing, "no".into(), t(3)).is_err());
        order
            .wait(Step::Scheduling, "no responders".into(), t(3))
            .unwrap();
        order.wait(Step::Scheduling, "again".into(), t(9)).unwrap();
        let waiting = order.waiting.clone().unwrap();
        assert_eq!(
            (waiting.step, waiting.since, waiting.reason.as_str()),
            (Step::Scheduling, t(3), "no responders")
        );
        let output = RawValue::from_string(r#"{"slot":1}"#.into()).unwrap();
        order
            .complete_step(Some(StepOutput(output)), t(10))
            .unwrap();
        assert!(order.waiting.is_none());
        let json = serde_json::to_value(&order).unwrap();
        assert_eq!(json["steps"][0]["output"], serde_json::json!({ "slot": 1 }));
        assert!(json.get("waiting").is_none());
    }

    #[test]
    fn failure_at_each_step_rolls_back_done_steps_in_reverse() {
        for (k, failing) in Step::ALL.into_iter().enumerate() {
            let mut order = new_order();
            drive(&mut order, Some(failing));
            assert_eq!(order.state, State::Failed, "failing at {failing}");
            assert_eq!(order.current_step, CurrentStep::Terminal(Terminal::Failed));
            assert_eq!(order.failed_step, Some(failing));
            assert_eq!(
                order.failure_reason.as_deref(),
                Some(format!("{failing} failed").as_str())
            );
            assert_eq!(order.steps.len(), k + 1, "no step after the failed one ran");
            assert!(order
                .steps
                .iter()
                .all(|r| r.status == StepStatus::RolledBack));
            // Rollbacks run k, k-1, ..., 1: each starts after the later step's rollback completed.
            for pair in order.steps.windows(2) {
                let later_done = pair[1].rollback_complete_time.unwrap();
                assert!(pair[0].rollback_start_time.unwrap() >= later_done);
            }
            let last = order.steps.last().unwrap();
            assert!(last.rollback_start_time.unwrap() >= last.step_complete_time.unwrap());
        }
    }

    #[test]
    fn an_interrupted_step_runs_again_from_its_start() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.complete_step(None, t(3)).unwrap();
        order.start_step(Step::PreProcessing, "n1", t(4)).unwrap();
        // n1 dies here; n2 takes over on the second delivery.
        assert_eq!(order.next_action(), Action::Run(Step::PreProcessing));
        order
            .claim(Owner {
                node: "n2".into(),
                delivery: 2,
                stream_seq: 1,
                claimed_at: t(9),
            })
            .unwrap();
        order.start_step(Step::PreProcessing, "n2", t(10)).unwrap();
        let record = &order.steps[1];
        assert_eq!(
            (record.node.as_str(), record.attempt, record.runs),
            ("n2", 2, 2)
        );
        assert_eq!(record.step_start_time, t(10));
        assert_eq!(order.steps.len(), 2);
        // A completed step is never offered again.
        assert!(order.start_step(Step::Scheduling, "n2", t(11)).is_err());
    }

    #[test]
    fn an_interrupted_rollback_resumes_with_the_same_step() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.complete_step(None, t(3)).unwrap();
        order.start_step(Step::PreProcessing, "n1", t(4)).unwrap();
        order.fail_step("boom".into(), t(5)).unwrap();
        order
            .start_rollback(Step::PreProcessing, "n1", t(6))
            .unwrap();
        assert_eq!(order.next_action(), Action::RollBack(Step::PreProcessing));
        order
            .start_rollback(Step::PreProcessing, "n2", t(7))
            .unwrap();
        order.complete_rollback(Step::PreProcessing, t(8)).unwrap();
        assert_eq!(order.next_action(), Action::RollBack(Step::Scheduling));
    }

    #[test]
    fn transitions_out_of_order_are_refused() {
        let mut order = new_order();
        assert!(order.start_step(Step::Processing, "n1", t(2)).is_err());
        assert!(order.complete_step(None, t(2)).is_err());
        assert!(order.finish(t(2)).is_err());
        drive(&mut order, None);
        assert!(order
            .claim(Owner {
                node: "n2".into(),
                delivery: 2,
                stream_seq: 1,
                claimed_at: t(99)
            })
            .is_err());
        assert!(order.abandon("late".into(), t(99)).is_err());
    }

    #[test]
    fn abandon_fails_a_running_order() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.abandon("deliveries exhausted".into(), t(3)).unwrap();
        assert_eq!(order.state, State::Failed);
        assert_eq!(order.failed_step, Some(Step::Scheduling));
        assert_eq!(order.next_action(), Action::Done);
    }

    #[test]
    fn document_uses_the_contract_names() {
        let mut order = new_order();
        drive(&mut order, Some(Step::Processing));
        let json = serde_json::to_value(&order).unwrap();
        for field in [
            "order_id",
            "current_step",
            "start_time",
            "complete_time",
            "steps",
            "state",
            "failed_step",
            "failure_reason",
            "attempt",
            "payload",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["current_step"], "Failed");
        assert_eq!(json["state"], "Failed");
        assert_eq!(json["failed_step"], "Processing");
        assert_eq!(json["payload"]["customer"], "ada");
        assert_eq!(json["start_time"], "2027-01-15T08:00:00Z");
        let step = &json["steps"][1];
        assert_eq!(step["step_name"], "Pre-Processing");
        for field in [
            "step_start_time",
            "step_complete_time",
            "rollback_start_time",
            "rollback_complete_time",
            "node",
            "attempt",
        ] {
            assert!(step.get(field).is_some(), "missing steps[].{field}");
        }
        let back: Order = serde_json::from_value(json).unwrap();
        assert_eq!(back.steps, order.steps);
        assert_eq!(back.payload.get(), r#"{"customer":"ada"}"#);
    }

    #[test]
    fn queued_document_has_no_steps_yet() {
        let order = Order::queued(Uuid::now_v7(), payload(), Interface::Nats, t(0));
        let json = serde_json::to_value(&order).unwrap();
        assert_eq!(json["state"], "Queued");
        assert_eq!(json["current_step"], "Scheduling");
        assert_eq!(json["complete_time"], serde_json::Value::Null);
        assert_eq!(json["steps"], serde_json::json!([]));
        assert_eq!(json["submitted_via"], "nats");
    }

    #[test]
    fn step_names_parse_leniently() {
        assert_eq!("Pre-Processing".parse::<Step>(), Ok(Step::PreProcessing));
        assert_eq!("postprocessing".parse::<Step>(), Ok(Step::PostProcessing));
        assert!("Shipping".parse::<Step>().is_err());
    }

    #[test]
    fn order_ids_have_one_spelling() {
        let id = Uuid::now_v7();
        assert_eq!(parse_order_id(&id.to_string()), Ok(id));
        assert!(parse_order_id(&id.to_string().to_uppercase()).is_err());
        assert!(parse_order_id(&id.simple().to_string()).is_err());
        assert!(parse_order_id("not-an-id").is_err());
    }

    #[test]
    fn an_intent_is_told_from_a_takeover() {
        use crate::domain::intent::{Intent, IntentKind};
        // new_order() is claimed by n1's first delivery.
        let mine = new_order();
        let mut asked = mine.clone();
        asked
            .request_cancel(Intent::new(IntentKind::Cancel, None, t(1)))
            .unwrap();
        assert!(mine.only_intent_added(&asked));
        // An intent written with anything else changed is not an intent alone.
        let mut more = asked.clone();
        more.attempt += 1;
        assert!(!mine.only_intent_added(&more));
        // The same intent seen twice is no news.
        assert!(!asked.only_intent_added(&asked));
        // Another owner, with or without an intent, is a takeover.
        let mut taken = asked.clone();
        taken.owner.as_mut().expect("owner").delivery = 2;
        assert!(!mine.only_intent_added(&taken));
        let mut moved = mine.clone();
        moved.attempt += 1;
        assert!(!mine.only_intent_added(&moved));
    }

    #[test]
    fn an_intent_is_told_from_a_takeover_whatever_the_payload_holds() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        for payload in [r#"{"a":1e400}"#, r#"{"a":"\ud800"}"#, deep.as_str()] {
            let order = with_payload(payload);
            let mut stored = order.clone();
            stored.request_cancel(cancel_intent(5)).unwrap();
            assert!(order.only_intent_added(&stored), "{payload}");
            let mut taken = stored.clone();
            taken.owner.as_mut().unwrap().node = "n2".into();
            assert!(!order.only_intent_added(&taken), "{payload}");
        }
    }

    /// An order that ran every step, each answering `output`, and was then cancelled with `reason`.
    fn cancelled_with(output: &str, reason: &str) -> Order {
        let mut order = new_order();
        for step in Step::ALL {
            order.start_step(step, "n1", t(2)).unwrap();
            let out = StepOutput(RawValue::from_string(output.to_owned()).unwrap());
            order.complete_step(Some(out), t(3)).unwrap();
        }
        order.state = State::Cancelled;
        order.current_step = CurrentStep::Terminal(Terminal::Cancelled);
        order.intent = Some(Box::new(
            Intent::new(IntentKind::Cancel, None, t(4))
                .with_request(Interface::Http, Some(reason.into())),
        ));
        order
    }

    #[test]
    fn retries_keep_the_document_within_its_limit() {
        let output = format!(
            "{{\"x\":\"{}\"}}",
            "a".repeat(crate::domain::limits::MAX_OUTPUT - 8)
        );
        let reason = "\u{1}".repeat(crate::domain::limits::MAX_REASON);
        let mut order = cancelled_with(&output, &reason);
        for n in 1..=200u32 {
            order.retry(t(10)).unwrap();
            assert!(
                encoded_len(&order) <= DOCUMENT_LIMIT - ATTEMPT_ROOM,
                "retry {n}"
            );
            assert!(order.history.len() <= HISTORY_KEPT);
            assert_eq!(
                order.history_dropped as usize + order.history.len(),
                n as usize
            );
            // The next attempt runs every step with the largest outputs and is cancelled again.
            let ran = cancelled_with(&output, &reason);
            order.steps = ran.steps;
            order.intent = ran.intent;
            order.state = State::Cancelled;
            assert!(encoded_len(&order) <= DOCUMENT_LIMIT, "attempt {n}");
        }
        // Small attempts are kept by number, not by size.
        let mut small = new_order();
        small.state = State::Failed;
        for _ in 0..50 {
            small.retry(t(10)).unwrap();
            small.state = State::Failed;
        }
        assert_eq!(small.history.len(), HISTORY_KEPT);
        assert_eq!(small.history_dropped as usize, 50 - HISTORY_KEPT);
        assert_eq!(small.history.last().unwrap().retry, 49);
    }

    #[test]
    fn a_retry_is_asked_for_only_of_an_ended_order_and_recorded_once() {
        let mut running = new_order();
        assert!(running.request_retry("k".into(), t(5)).is_err());
        let mut failed = new_order();
        drive(&mut failed, Some(Step::Processing));
        assert_eq!(failed.request_retry("k".into(), t(5)), Ok(1));
        assert_eq!(failed.retry_request.as_ref().unwrap().key, "k");
        failed.retry(t(6)).unwrap();
        assert_eq!(failed.retry_request, None);
        assert_eq!(failed.retries, 1);
    }

    #[test]
    fn a_long_failure_reason_is_cut() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.fail_step("x".repeat(100_000), t(3)).unwrap();
        let kept = order.failure_reason.unwrap();
        assert_eq!(kept.chars().count(), crate::domain::limits::MAX_REASON + 1);
    }

    fn cancel_intent(at: i64) -> Intent {
        Intent::new(IntentKind::Cancel, Some("n9".into()), t(at))
            .with_request(Interface::Http, Some("changed my mind".into()))
    }

    #[test]
    fn a_cancel_before_any_pickup_ends_the_order_at_once() {
        let mut order = Order::queued(Uuid::now_v7(), payload(), Interface::Http, t(0));
        let before = order.clone();
        assert_eq!(
            order.request_cancel(cancel_intent(5)),
            Ok((CancelAnswer::Cancelled, true))
        );
        assert_eq!(order.state, State::Cancelled);
        assert_eq!(
            order.current_step,
            CurrentStep::Terminal(Terminal::Cancelled)
        );
        assert_eq!(order.complete_time, Some(t(5)));
        assert!(before.only_intent_added(&order));
        assert_eq!(order.next_action(), Action::Done);
        // Asking again changes nothing and gets the same answer.
        assert_eq!(
            order.request_cancel(cancel_intent(6)),
            Ok((CancelAnswer::Cancelled, false))
        );
    }

    #[test]
    fn a_cancel_of_a_running_order_rolls_back_what_was_started_and_ends_cancelled() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.complete_step(None, t(3)).unwrap();
        order.start_step(Step::PreProcessing, "n1", t(4)).unwrap();
        let mine = order.clone();
        assert_eq!(
            order.request_cancel(cancel_intent(5)),
            Ok((CancelAnswer::Accepted, true))
        );
        assert_eq!(order.state, State::Cancelling);
        assert!(mine.only_intent_added(&order));
        // No step starts after the cancel; the interrupted one is rolled back first.
        assert!(order.start_step(Step::Processing, "n1", t(6)).is_err());
        assert_eq!(order.next_action(), Action::RollBack(Step::PreProcessing));
        assert_eq!(
            order.request_cancel(cancel_intent(6)),
            Ok((CancelAnswer::Accepted, false))
        );
        drive(&mut order, None);
        assert_eq!(order.state, State::Cancelled);
        assert!(order
            .steps
            .iter()
            .all(|r| r.status == StepStatus::RolledBack));
        assert_eq!(order.steps[1].step_complete_time, None, "interrupted");
        let intent = order.intent.as_deref().unwrap();
        assert_eq!(intent.via, Some(Interface::Http));
        assert_eq!(intent.reason.as_deref(), Some("changed my mind"));
    }

    #[test]
    fn a_step_that_ends_after_the_cancel_is_recorded_and_rolled_back() {
        for fails in [false, true] {
            let mut order = new_order();
            order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
            order.request_cancel(cancel_intent(3)).unwrap();
            if fails {
                order.fail_step("boom".into(), t(4)).unwrap();
            } else {
                order.complete_step(None, t(4)).unwrap();
            }
            assert_eq!(order.state, State::Cancelling);
            assert_eq!(order.next_action(), Action::RollBack(Step::Scheduling));
            // Finishing the order as completed is refused: the cancel stands.
            assert!(order.finish(t(5)).is_err());
            drive(&mut order, None);
            assert_eq!(order.state, State::Cancelled);
        }
    }

    #[test]
    fn a_cancel_is_refused_once_the_outcome_is_decided() {
        let mut rolling = new_order();
        rolling.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        rolling.fail_step("boom".into(), t(3)).unwrap();
        let mut failed = rolling.clone();
        drive(&mut failed, None);
        let mut completed = new_order();
        drive(&mut completed, None);
        for (mut order, state) in [
            (rolling, State::RollingBack),
            (failed, State::Failed),
            (completed, State::Completed),
        ] {
            let before = order.clone();
            assert_eq!(
                order.request_cancel(cancel_intent(9)),
                Err(Refused {
                    attempted: "cancel",
                    state
                })
            );
            assert_eq!(order.updated_at, before.updated_at, "nothing changed");
        }
    }

    #[test]
    fn a_cancelled_order_given_up_stays_cancelled() {
        let mut order = new_order();
        order.start_step(Step::Scheduling, "n1", t(2)).unwrap();
        order.request_cancel(cancel_intent(3)).unwrap();
        order.abandon("gave up".into(), t(4)).unwrap();
        assert_eq!(order.state, State::Cancelled);
    }

    #[test]
    fn a_retry_starts_a_new_attempt_and_keeps_the_old_one() {
        let mut order = new_order();
        drive(&mut order, Some(Step::Processing));
        let failed = order.clone();
        order.retry(t(50)).unwrap();
        assert_eq!(order.state, State::Queued);
        assert_eq!(order.retries, 1);
        assert_eq!(order.next_action(), Action::Run(Step::Scheduling));
        assert!(order.steps.is_empty() && order.failure_reason.is_none());
        let earlier = &order.history[0];
        assert_eq!((earlier.retry, earlier.state), (0, State::Failed));
        assert_eq!(earlier.steps, failed.steps);
        assert_eq!(earlier.failed_step, Some(Step::Processing));
        // Only an order that ended Failed or Cancelled runs again.
        assert_eq!(order.retry(t(51)).unwrap_err().state, State::Queued);
        let mut completed = new_order();
        drive(&mut completed, None);
        assert!(completed.retry(t(52)).is_err());
        // The document keeps both attempts through a round trip.
        let back: Order = serde_json::from_value(serde_json::to_value(&order).unwrap()).unwrap();
        assert_eq!(back.history, order.history);
    }

    #[test]
    fn states_parse_by_their_names() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        assert_eq!("cancelled".parse::<State>(), Ok(State::Cancelled));
        assert!("Done".parse::<State>().is_err());
    }
}
