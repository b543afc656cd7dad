//! The pull loop: fetches work messages from the shared consumer, never more than there are free
//! workers, and runs each order under a lease kept alive by confirmed in-progress acks.
//!
//! Every message ends in an explicit outcome: acked after its order's terminal state is written,
//! nakked when the node hands it back, terminated when it can never be processed, or left alone when
//! the node lost the lease (then it is another node's, and touching it would be wrong).

use crate::clock::now;
use crate::domain::order::{parse_order_id, Interface, Order, Owner, State};
use crate::domain::payload::{shown_payload, validate_payload};
use crate::engine::lease::{Connection, Epoch, Holder, Lease, Windows};
use crate::engine::pipeline::{Halt, Pipeline, Stop};
use crate::ops::audit::{Audit, LeaseEnd, Stamp};
use crate::ops::metrics as m;
use crate::ops::rate::RateLimited;
use crate::ops::stats::WorkerStats;
use crate::queue::follow::Health;
use crate::queue::give_up::{ending, record_given_up, Ending};
use crate::queue::setup::{SUBMIT_PREFIX, VIA_HEADER};
use crate::store::{OrderStore, StoreError};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chrono::SubsecRound;
use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How long one pull waits for messages before asking again, at most. A lease is counted from the
/// moment the pull was sent, so a pull must expire well inside the lease window.
const FETCH_EXPIRES: Duration = Duration::from_secs(2);

fn fetch_expiry(window: Duration) -> Duration {
    (window / 5).clamp(Duration::from_millis(100), FETCH_EXPIRES)
}
/// Delay before a message handed back because of a store failure is redelivered.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest pause between two tries of an order whose store is unavailable. The node keeps the
/// order (and its lease) meanwhile: an outage of the store, however long, uses up no delivery.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

pub struct Worker {
    pub stream: jetstream::stream::Stream,
    /// The shared consumer, on the connection that fetches (and only fetches).
    pub consumer: PullConsumer,
    /// The connection leases live on: every in-progress ack, ack, nak and term goes through it.
    pub leases: jetstream::Context,
    pub store: OrderStore,
    pub pipeline: Arc<Pipeline>,
    pub workers: usize,
    pub stats: Arc<WorkerStats>,
    pub audit: Audit,
    /// The NATS connection as leases see it: a lease ends when the connection it was taken on is lost.
    pub connection: Connection,
    /// The consumer's redelivery windows as they are now.
    pub windows: tokio::sync::watch::Receiver<Windows>,
    /// Whether the consumer can be fetched from.
    pub health: Health,
    /// Deliveries after which the order is given up (`ORDERLY_MAX_DELIVER`).
    pub max_deliver: u32,
}

impl Worker {
    /// Runs until `stop.drain` fires, then waits for in-flight orders to be finished or handed back.
    pub async fn run(self, stop: Stop) {
        let this = Arc::new(self);
        let mut pull_errors = RateLimited::new(Duration::from_secs(10));
        let slots = Arc::new(Semaphore::new(this.workers));
        let mut tasks = JoinSet::new();
        metrics::gauge!(m::WORKERS_TOTAL).set(this.workers as f64);
        metrics::gauge!(m::WORKERS_BUSY).set(0.0);
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "order task panicked");
                }
            }
            let mut permits = tokio::select! {
                _ = stop.drain.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let free = slots.available_permits();
            if free > 0 {
                if let Ok(more) = slots.clone().try_acquire_many_owned(free as u32) {
                    permits.merge(more);
                }
            }
            if let Some(problem) = this.health.problem() {
                // No consumer to fetch from (it is being recreated): take no work meanwhile.
                drop(permits);
                if let Some(skipped) = pull_errors.allow() {
                    tracing::warn!(%problem, skipped, "not taking work");
                }
                tokio::select! {
                    _ = stop.drain.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                }
            }
            let expires = fetch_expiry(this.windows.borrow().shortest());
            // The server cannot deliver before it was asked: a safe anchor for the leases.
            let asked = Instant::now();
            let connection = this.connection.current();
            let batch = this
                .consumer
                .fetch()
                .max_messages(permits.num_permits())
                .expires(expires)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    if let Some(skipped) = pull_errors.allow() {
                        tracing::warn!(error = %e, skipped, "cannot pull from the work queue; retrying");
                    }
                    drop(permits);
                    tokio::select! {
                        _ = stop.drain.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.drain.cancelled() => break,
                    next = batch.next() => next,
                };
                let message = match next {
                    None => break,
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        if let Some(skipped) = pull_errors.allow() {
                            tracing::warn!(error = %e, skipped, "error while pulling from the work queue");
                        }
                        break;
                    }
                };
                // Settled through the lease connection, which a bad message cannot drop.
                let message = jetstream::Message {
                    message: message.message,
                    context: this.leases.clone(),
                };
                let Some(permit) = permits.split(1) else {
                    tracing::error!("received more messages than requested; handing one back");
                    nak(&message, None, "over_batch").await;
                    continue;
                };
                let worker = this.clone();
                let stop = stop.clone();
                let timing = Timing {
                    anchor: asked,
                    connection: connection.clone(),
                };
                tasks.spawn(async move {
                    worker.stats.busy.fetch_add(1, Ordering::Relaxed);
                    metrics::gauge!(m::WORKERS_BUSY).increment(1.0);
                    worker.handle(message, timing, stop).await;
                    worker.stats.busy.fetch_sub(1, Ordering::Relaxed);
                    metrics::gauge!(m::WORKERS_BUSY).decrement(1.0);
                    drop(permit);
                });
            }
        }
        tracing::info!(
            in_flight = tasks.len(),
            "stopped fetching; waiting for in-flight orders"
        );
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "order task panicked");
            }
        }
    }

    async fn handle(&self, message: jetstream::Message, timing: Timing, stop: Stop) {
        let (delivered, stream_seq, published) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.stream_sequence,
                chrono::DateTime::from_timestamp(
                    info.published.unix_timestamp(),
                    info.published.nanosecond(),
                ),
            ),
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "message without JetStream metadata; terminating it");
                term(&message, "no_metadata").await;
                return;
            }
        };
        let key = message
            .subject
            .strip_prefix(SUBMIT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(message.subject.as_str())
            .to_owned();
        let span = tracing::info_span!("order", order.id = %key, msg.stream_seq = stream_seq, msg.delivered = delivered);
        async {
            let parsed = parse_order_id(&key);
            let holder = Holder {
                order_id: parsed.as_ref().copied().unwrap_or_default(),
                delivery: delivered,
                audit: self.audit.clone(),
            };
            let lease = Lease::new(self.windows.clone(), timing.anchor, holder, timing.connection);
            if !lease.is_held() {
                // The node was paused (or starved) between asking for the message and reading it: the
                // server may have handed it to another node already.
                tracing::warn!("message read after its lease could have ended; leaving it for redelivery");
                metrics::counter!(m::SELF_FENCES).increment(1);
                return;
            }
            if delivered > 1 {
                metrics::counter!(m::REDELIVERIES).increment(1);
            }
            let order_id = match parsed {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = %e, "poison message: terminating it");
                    term(&message, "invalid_id").await;
                    return;
                }
            };
            let delivery = Delivery {
                order_id,
                delivered,
                stream_seq,
                published: published.map_or_else(now, |t| t.trunc_subsecs(3)),
            };
            let message = Arc::new(message);
            let done = CancellationToken::new();
            // Heartbeats stop with this task, even if processing panics.
            let _heartbeats = done.clone().drop_guard();
            tokio::spawn(lease.clone().keep_alive(message.clone(), done.clone()));
            if delivered > self.max_deliver {
                // Every delivery the order was allowed ended without an outcome (its holders died or
                // lost it): it ends here, under this delivery's lease.
                let reason = format!(
                    "gave up after {} deliveries: no node finished the order within the delivery limit (ORDERLY_MAX_DELIVER)",
                    self.max_deliver
                );
                self.give_up(&message, &delivery, &lease, reason).await;
            } else {
                let outcome = self.process_until_done(&message, &delivery, &lease, &stop).await;
                self.settle(&message, &delivery, outcome, &lease).await;
            }
            done.cancel();
        }
        .instrument(span)
        .await
    }

    /// Processes the order, trying again while the order store is unavailable for as long as the
    /// lease is held: an outage of the store is no fault of the order and uses up no delivery.
    async fn process_until_done(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Processed, Failure> {
        let mut retry = StoreRetry::default();
        loop {
            let outcome = self.process(message, delivery, lease, stop).await;
            let error = match &outcome {
                Err(Failure::Store(e)) | Err(Failure::Halt(Halt::Store(e))) if e.is_passing() => e,
                _ => return outcome,
            };
            if !retry.wait(error, lease, &stop.drain).await {
                return outcome;
            }
        }
    }

    /// Loads (or creates) the order, claims it and runs its pipeline.
    async fn process(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Processed, Failure> {
        let order_id = delivery.order_id;
        let payload = match validate_payload(&message.payload) {
            Ok(payload) => payload,
            Err(reason) => return self.reject(order_id, message, reason).await,
        };
        let mut order = match self.store.get(order_id).await.map_err(Failure::from)? {
            Some(order) => order,
            None => {
                // A node's intake publishes first and writes the document after; a worker that gets
                // here first writes it with the interface the message names.
                let via = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(VIA_HEADER))
                    .and_then(|v| Interface::parse(v.as_str()))
                    .unwrap_or(Interface::Stream);
                let queued = Order::queued(order_id, payload, via, delivery.published);
                match self.store.create(&queued).await {
                    Ok(created) => {
                        if via == Interface::Stream {
                            // Intake counted the others when it accepted them.
                            metrics::counter!(m::ORDERS_SUBMITTED, "interface" => via.as_str())
                                .increment(1);
                        }
                        self.pipeline.events.created(&created.order).await;
                        created
                    }
                    Err(StoreError::Exists(_)) => {
                        self.store.get(order_id).await?.ok_or_else(|| {
                            Failure::Store(StoreError::Unavailable(
                                "order vanished while being created".into(),
                            ))
                        })?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if order.order.is_terminal() {
            tracing::info!(state = %order.order.state, "order already terminal; acknowledging its message");
            return Ok(Processed::AlreadyTerminal);
        }
        if let Some(carrier) = order
            .order
            .message_seq
            .filter(|seq| *seq != delivery.stream_seq)
        {
            // The order was submitted again after the duplicate window. While the message that carries
            // it exists, that one is the order's; this copy is ended. If it is gone, this one takes over.
            if self.message_exists(carrier).await? {
                tracing::warn!(
                    carrier,
                    "second message for an order that another message carries; terminating it"
                );
                return Err(Failure::Poison("duplicate"));
            }
        }
        let consumer_created = self.windows.borrow().created;
        let ours = order.order.owner.as_ref().is_some_and(|owner| {
            owner.node == self.pipeline.node_id
                && owner.stream_seq == delivery.stream_seq
                && owner.delivery == delivery.delivered
                && lease.is_claimed()
        });
        if let Some(owner) = order.order.owner.as_ref().filter(|owner| {
            // A claim made through a consumer that was since deleted and created again is stale
            // whatever its delivery number: the new consumer counts from 1 and was paused until
            // every old lease had ended.
            !ours
                && owner.stream_seq == delivery.stream_seq
                && owner.delivery >= delivery.delivered
                && owner.claimed_at >= consumer_created
        }) {
            // The server hands a message out again only once the previous delivery's window is over,
            // and every holder stops before its window ends: a claim by an older delivery is stale and
            // is taken over. A claim by this or a later delivery means this one is stale.
            tracing::error!(owner.node = %owner.node, owner.delivery = owner.delivery, "the order is claimed by the same or a later delivery of its message; leaving it alone");
            return Err(Failure::NotOurs);
        }
        let first_pickup = order.order.attempt == 0;
        if !ours {
            // (A retry after a store outage finds its own claim and goes on under it.)
            let owner = Owner {
                node: self.pipeline.node_id.clone(),
                delivery: delivery.delivered,
                stream_seq: delivery.stream_seq,
                claimed_at: now(),
            };
            let start = Stamp::now();
            self.pipeline
                .commit(&mut order, lease, "claim", |o| o.claim(owner))
                .await
                .map_err(Failure::Halt)?;
            lease.claimed(delivery.stream_seq, order.revision, start);
        }
        if first_pickup {
            let waited = (now() - order.order.start_time)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
        }
        metrics::gauge!(m::ORDERS_IN_FLIGHT).increment(1.0);
        let result = self.pipeline.run(&mut order, lease, stop).await;
        metrics::gauge!(m::ORDERS_IN_FLIGHT).decrement(1.0);
        match result {
            Ok(state) => Ok(Processed::Finished(state, order.order)),
            Err(Halt::Interrupted) => {
                // Record that nobody holds the order any more, then hand it back.
                let released = self
                    .pipeline
                    .commit(&mut order, lease, "release", |o| {
                        o.release(now());
                        Ok(())
                    })
                    .await;
                if let Err(e) = released {
                    tracing::warn!(error = %e, "cannot record the hand-back");
                }
                Err(Failure::Halt(Halt::Interrupted))
            }
            Err(halt) => Err(Failure::Halt(halt)),
        }
    }

    /// Whether the stream still holds the message with sequence `seq`.
    async fn message_exists(&self, seq: u64) -> Result<bool, Failure> {
        match self.stream.get_raw_message(seq).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(false)
            }
            Err(e) => Err(Failure::Store(StoreError::Unavailable(format!(
                "cannot look up message {seq}: {e}"
            )))),
        }
    }

    /// Records an order whose message can never be processed as failed, then has it terminated.
    async fn reject(
        &self,
        order_id: Uuid,
        message: &jetstream::Message,
        reason: String,
    ) -> Result<Processed, Failure> {
        tracing::warn!(%reason, bytes = message.payload.len(), "poison message: recording the order as failed and terminating it");
        let order = Order::rejected(order_id, shown_payload(&message.payload), reason, now());
        match self.store.create(&order).await {
            Ok(created) => self.pipeline.events.created(&created.order).await,
            Err(StoreError::Exists(_)) => {}
            Err(e) => tracing::warn!(error = %e, "cannot record the rejected order"),
        }
        Err(Failure::Poison("invalid_payload"))
    }

    /// Gives the message its outcome, but only while the lease is held: a node that lost it (paused,
    /// cut off, or overtaken) neither acks, naks nor terminates the message.
    async fn settle(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        outcome: Result<Processed, Failure>,
        lease: &Lease,
    ) {
        match outcome {
            Ok(Processed::Finished(state, order)) => {
                match state {
                    State::Completed => self.stats.completed.fetch_add(1, Ordering::Relaxed),
                    _ => self.stats.failed.fetch_add(1, Ordering::Relaxed),
                };
                let outcome = if state == State::Completed {
                    "completed"
                } else {
                    "failed"
                };
                metrics::counter!(m::ORDERS_FINISHED, "outcome" => outcome).increment(1);
                if let Some(done) = order.complete_time {
                    let took = (done - order.start_time).to_std().unwrap_or_default();
                    metrics::histogram!(m::ORDER_DURATION).record(took.as_secs_f64());
                }
                tracing::info!(state = %state, "order finished");
                if lease.end(LeaseEnd::Finished) {
                    ack(message).await;
                    lease.settled("ack");
                } else {
                    tracing::warn!("lease ended before the ack; the next delivery finds the order finished and acks it");
                }
            }
            Ok(Processed::AlreadyTerminal) => {
                if lease.end(LeaseEnd::Finished) {
                    ack(message).await;
                    lease.settled("ack");
                }
            }
            Err(Failure::Poison(reason)) => {
                if lease.end(LeaseEnd::Dropped) {
                    term(message, reason).await;
                    lease.settled("term");
                }
            }
            Err(Failure::Halt(Halt::Interrupted)) => {
                if lease.end(LeaseEnd::Released) {
                    tracing::info!("handing the order back for another node to continue");
                    nak(message, None, "shutdown").await;
                    lease.settled("nak");
                }
            }
            Err(Failure::Halt(Halt::Fenced)) => {
                // Counted where the lease was given up; the message is no longer ours to touch.
                lease.end(LeaseEnd::Fenced);
                tracing::warn!("stopped working on the order: lease not confirmed in time");
            }
            Err(Failure::Halt(Halt::LeaseLost(e))) => {
                lease.end(LeaseEnd::Lost);
                metrics::counter!(m::LEASES_LOST).increment(1);
                tracing::warn!(error = %e, "another writer took the order; dropping it without ack or nak");
            }
            Err(Failure::NotOurs) => {
                lease.end(LeaseEnd::Lost);
                metrics::counter!(m::LEASES_LOST).increment(1);
            }
            Err(Failure::Halt(Halt::Invalid(e))) => {
                tracing::error!(error = %e, "order document does not allow the next transition; terminating its message");
                if lease.end(LeaseEnd::Dropped) {
                    term(message, "invalid_document").await;
                    lease.settled("term");
                }
            }
            Err(Failure::Halt(Halt::Store(e))) | Err(Failure::Store(e)) => {
                if !e.is_passing() && delivery.delivered >= self.max_deliver && lease.is_held() {
                    // The order's own fault (its document is unreadable) on its last delivery.
                    let reason = format!("gave up after {} deliveries: {e}", delivery.delivered);
                    self.give_up(message, delivery, lease, reason).await;
                } else if lease.end(LeaseEnd::Dropped) {
                    tracing::warn!(error = %e, "cannot get on with the order (order store); handing the message back for a retry");
                    nak(message, Some(RETRY_DELAY), "store_unavailable").await;
                    lease.settled("nak");
                }
            }
        }
        lease.end(LeaseEnd::Dropped);
    }

    /// Ends the order `Failed` with `reason`, written under the lease, then terminates its message.
    /// While the order store is unavailable it keeps the lease and tries again: the order is not
    /// left for nobody to end.
    async fn give_up(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        lease: &Lease,
        reason: String,
    ) {
        let mut retry = StoreRetry::default();
        let settle = loop {
            match self.try_give_up(message, delivery, lease, &reason).await {
                Ok(GaveUp::LeaseEnded) => return,
                Ok(settle) => break settle,
                Err(e) => {
                    if !retry.wait(&e, lease, &CancellationToken::new()).await {
                        lease.end(LeaseEnd::Fenced);
                        return;
                    }
                }
            }
        };
        if lease.end(LeaseEnd::Finished) {
            match settle {
                GaveUp::AlreadyTerminal => {
                    ack(message).await;
                    lease.settled("ack");
                }
                GaveUp::Duplicate => {
                    term(message, "duplicate").await;
                    lease.settled("term");
                }
                _ => {
                    term(message, "deliveries_exhausted").await;
                    lease.settled("term");
                }
            }
        }
    }

    /// One try of [`Worker::give_up`]; `Err` for a store failure that may pass.
    async fn try_give_up(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        lease: &Lease,
        reason: &str,
    ) -> Result<GaveUp, StoreError> {
        let ending = ending(&self.store, delivery.order_id, &message.payload, reason).await?;
        let (revision, before, after) = match ending {
            Ending::Terminal => return Ok(GaveUp::AlreadyTerminal),
            Ending::Created(created) => {
                record_given_up("last_delivery", reason);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.pipeline.events.created(&created.order).await;
                return Ok(GaveUp::Ended);
            }
            Ending::Replace {
                revision,
                before,
                after,
            } => (revision, before, after),
        };
        let carrier = before.as_ref().and_then(|order| order.message_seq);
        if let Some(carrier) = carrier.filter(|seq| *seq != delivery.stream_seq) {
            // Another message carries the order (it may be running under that message's lease):
            // only this copy is spent.
            return match self.message_exists(carrier).await {
                Ok(true) => Ok(GaveUp::Duplicate),
                Ok(false) => {
                    self.write_given_up(delivery, lease, reason, revision, before, after)
                        .await
                }
                Err(Failure::Store(e)) => Err(e),
                Err(_) => Ok(GaveUp::LeaseEnded),
            };
        }
        self.write_given_up(delivery, lease, reason, revision, before, after)
            .await
    }

    async fn write_given_up(
        &self,
        delivery: &Delivery,
        lease: &Lease,
        reason: &str,
        revision: u64,
        before: Option<Order>,
        after: Order,
    ) -> Result<GaveUp, StoreError> {
        if !lease.is_held() {
            lease.end(LeaseEnd::Fenced);
            return Ok(GaveUp::LeaseEnded);
        }
        let sent = lease.sending("give_up");
        let written =
            tokio::time::timeout_at(lease.deadline().into(), self.store.update(&after, revision))
                .await;
        match written {
            Ok(Ok(_)) if !lease.is_held() => {
                lease.unconfirmed("give_up", sent);
                lease.end(LeaseEnd::Fenced);
                Ok(GaveUp::LeaseEnded)
            }
            Ok(Ok(written)) => {
                if !lease.is_claimed() {
                    lease.claimed(delivery.stream_seq, written.revision, sent);
                }
                lease.committed("give_up", None, written.revision, sent);
                record_given_up("last_delivery", reason);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                match &before {
                    Some(before) => {
                        self.pipeline
                            .events
                            .transition(before, &written.order)
                            .await
                    }
                    None => self.pipeline.events.created(&written.order).await,
                }
                Ok(GaveUp::Ended)
            }
            Ok(Err(e)) if e.is_conflict() => {
                lease.end(LeaseEnd::Lost);
                metrics::counter!(m::LEASES_LOST).increment(1);
                tracing::warn!(error = %e, "another writer took the order while it was being given up; dropping it");
                Ok(GaveUp::LeaseEnded)
            }
            Ok(Err(e)) => {
                lease.unconfirmed("give_up", sent);
                Err(e)
            }
            Err(_) => {
                lease.unconfirmed("give_up", sent);
                lease.end(LeaseEnd::Fenced);
                Ok(GaveUp::LeaseEnded)
            }
        }
    }
}

/// How a give-up try ended.
enum GaveUp {
    /// The order was written `Failed` (or created so): terminate the message.
    Ended,
    /// The order was terminal already: ack the message.
    AlreadyTerminal,
    /// Another message carries the order: only this copy is spent.
    Duplicate,
    /// The lease ended: nothing more may be done with the message.
    LeaseEnded,
}

/// Paces the tries of an order that is kept while the order store is unavailable.
struct StoreRetry {
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
    async fn wait(&mut self, error: &StoreError, lease: &Lease, stop: &CancellationToken) -> bool {
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

/// What one delivery of a work message says about itself.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    order_id: Uuid,
    /// 1 on the first delivery.
    delivered: u32,
    stream_seq: u64,
    /// When the stream stored the message.
    published: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone)]
struct Timing {
    anchor: Instant,
    connection: Epoch,
}

enum Processed {
    Finished(State, Order),
    AlreadyTerminal,
}

enum Failure {
    Poison(&'static str),
    /// A later delivery of the message holds the order.
    NotOurs,
    Store(StoreError),
    Halt(Halt),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// Acknowledges and waits for the server's confirmation.
async fn ack(message: &jetstream::Message) {
    match crate::engine::lease::confirm(message, AckKind::Ack).await {
        Ok(()) => metrics::counter!(m::MESSAGES_ACKED).increment(1),
        Err(e) => {
            tracing::warn!(error = %e, "ack not confirmed; a later delivery will find the order terminal and ack it")
        }
    }
}

async fn nak(message: &jetstream::Message, delay: Option<Duration>, reason: &'static str) {
    match message.ack_with(AckKind::Nak(delay)).await {
        Ok(()) => metrics::counter!(m::MESSAGES_NAKED, "reason" => reason).increment(1),
        Err(e) => {
            tracing::warn!(error = %e, "cannot nak; the message is redelivered after its ack wait")
        }
    }
}

async fn term(message: &jetstream::Message, reason: &'static str) {
    match message.ack_with(AckKind::Term).await {
        Ok(()) => metrics::counter!(m::MESSAGES_TERMINATED, "reason" => reason).increment(1),
        Err(e) => tracing::warn!(error = %e, "cannot terminate the message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_expire_well_inside_the_lease_window() {
        assert_eq!(fetch_expiry(Duration::from_secs(30)), FETCH_EXPIRES);
        assert_eq!(
            fetch_expiry(Duration::from_secs(1)),
            Duration::from_millis(200)
        );
        for (window, replicated) in [
            (Duration::from_secs(1), false),
            (crate::engine::lease::MIN_REPLICATED_WINDOW, true),
        ] {
            let timing = crate::engine::lease::LeaseTiming::for_window(window, replicated);
            assert!(fetch_expiry(timing.window) < timing.window - timing.margin);
        }
    }
}
