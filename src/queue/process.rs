//! One delivery of a work message, from its arrival to its settling: check it, take the lease, load or
//! create the order, claim it, run its pipeline, and turn what happened into the message's outcome.

use crate::clock::now;
use crate::domain::order::{parse_order_id, Interface, Order, Owner, State};
use crate::domain::payload::{shown_payload, validate_payload};
use crate::engine::connection::Epoch;
use crate::engine::intent::{retry, Retry};
use crate::engine::lease::{Holder, Lease};
use crate::engine::pipeline::{Begun, Pipeline, Stop};
use crate::engine::window::Windows;
use crate::engine::write::{Halt, StoreRetry};
use crate::ops::audit::{Audit, LeaseEnd};
use crate::ops::metrics as m;
use crate::ops::stats::WorkerStats;
use crate::queue::delivery::{message_exists, Delivery};
use crate::queue::give_up::GiveUp;
use crate::queue::settle::{NakReason, Outcome, Settlement, TermReason};
use crate::queue::setup::{is_asked_retry, RETRY_HEADER, SUBMIT_PREFIX, VIA_HEADER};
use crate::store::{OrderStore, StoreError, Versioned};
use async_nats::jetstream;
use chrono::SubsecRound;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// When and on which connection a message was asked for: what its lease is anchored on.
#[derive(Debug, Clone)]
pub struct Timing {
    pub anchor: Instant,
    pub connection: Epoch,
}

/// Everything a worker needs to take one delivery from arrival to outcome.
pub struct Processor {
    pipeline: Arc<Pipeline>,
    give_up: GiveUp,
    stats: Arc<WorkerStats>,
    audit: Audit,
    /// The consumer's redelivery windows as they are now.
    windows: watch::Receiver<Windows>,
    /// Deliveries after which the order is given up (`ORDERLY_MAX_DELIVER`).
    max_deliver: u32,
}

/// How processing ended, before it is turned into the message's outcome.
enum Processed {
    Finished(State, Box<Order>),
    AlreadyTerminal,
}

enum Failure {
    Poison(TermReason),
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

impl Processor {
    pub fn new(
        pipeline: Arc<Pipeline>,
        give_up: GiveUp,
        stats: Arc<WorkerStats>,
        audit: Audit,
        windows: watch::Receiver<Windows>,
        max_deliver: u32,
    ) -> Processor {
        Processor {
            pipeline,
            give_up,
            stats,
            audit,
            windows,
            max_deliver,
        }
    }

    /// The node's worker counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// The consumer's redelivery windows as they are now.
    pub fn windows(&self) -> watch::Receiver<Windows> {
        self.windows.clone()
    }

    fn store(&self) -> &OrderStore {
        self.pipeline.writer().store()
    }

    /// Takes `message` from arrival to its outcome, in a span that names the order and the delivery.
    pub async fn handle(&self, message: jetstream::Message, timing: Timing, stop: Stop) {
        let info = message.info().map(|info| {
            let published = chrono::DateTime::from_timestamp(
                info.published.unix_timestamp(),
                info.published.nanosecond(),
            );
            (
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.stream_sequence,
                published,
            )
        });
        let (delivered, stream_seq, published) = match &info {
            Ok(info) => *info,
            Err(_) => (1, 0, None),
        };
        let key = message
            .subject
            .strip_prefix(SUBMIT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(message.subject.as_str())
            .to_owned();
        let parsed = parse_order_id(&key);
        let holder = Holder {
            order_id: parsed.as_ref().copied().unwrap_or_default(),
            delivery: delivered,
            stream_seq,
            audit: self.audit.clone(),
        };
        let lease = Lease::new(
            self.windows.clone(),
            timing.anchor,
            holder,
            timing.connection,
        );
        let message = Arc::new(message);
        let settlement = Settlement::new(message.clone(), lease.clone());
        if let Err(e) = info {
            tracing::warn!(subject = %message.subject, error = %e, "message without JetStream metadata; terminating it");
            settlement
                .settle(Outcome::Term(TermReason::NoMetadata), LeaseEnd::Dropped)
                .await;
            return;
        }
        let span = tracing::info_span!("order", order.id = %key, msg.stream_seq = stream_seq, msg.delivered = delivered);
        async {
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
                    settlement
                        .settle(Outcome::Term(TermReason::InvalidId), LeaseEnd::Dropped)
                        .await;
                    return;
                }
            };
            let delivery = Delivery {
                order_id,
                delivered,
                stream_seq,
                published: published.map_or_else(now, |t| t.trunc_subsecs(3)),
            };
            let done = CancellationToken::new();
            // Heartbeats stop with this task, even if processing panics.
            let _heartbeats = done.clone().drop_guard();
            tokio::spawn(lease.clone().keep_alive(message.clone(), done.clone()));
            let delivered = AssertUnwindSafe(self.deliver(settlement, &delivery, &stop))
                .catch_unwind()
                .await;
            if let Err(panic) = delivered {
                // A bug, never an answer: the lease ends here, as at any other outcome, so that the
                // audit closes its interval and nothing works on the order under it any more.
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "worker panicked; ending the lease and handing the message back");
                metrics::counter!(m::WORKER_PANICS).increment(1);
                Settlement::new(message.clone(), lease.clone())
                    .settle(Outcome::Nak(NakReason::Panicked), LeaseEnd::Released)
                    .await;
            }
            done.cancel();
        }
        .instrument(span)
        .await
    }

    /// Runs the order of a leased delivery and settles its message.
    async fn deliver(&self, settlement: Settlement, delivery: &Delivery, stop: &Stop) {
        if delivery.delivered > self.max_deliver {
            // Every delivery the order was allowed ended without an outcome (its holders died or
            // lost it): it ends here, under this delivery's lease.
            let reason = format!(
                "gave up after {} deliveries: no node finished the order within the delivery limit (ORDERLY_MAX_DELIVER)",
                self.max_deliver
            );
            return self.give_up.run(settlement, delivery, reason).await;
        }
        let result = self.process_until_done(&settlement, delivery, stop).await;
        if let Err(Failure::Halt(Halt::Store(e)) | Failure::Store(e)) = &result {
            if !e.is_passing()
                && delivery.delivered >= self.max_deliver
                && settlement.lease().is_held()
            {
                // The order's own fault (its document is unreadable) on its last delivery.
                let reason = format!("gave up after {} deliveries: {e}", delivery.delivered);
                return self.give_up.run(settlement, delivery, reason).await;
            }
        }
        let (outcome, why) = self.conclude(result);
        settlement.settle(outcome, why).await;
    }

    /// Processes the order, trying again while the order store is unavailable for as long as the
    /// lease is held: an outage of the store is no fault of the order and uses up no delivery.
    async fn process_until_done(
        &self,
        settlement: &Settlement,
        delivery: &Delivery,
        stop: &Stop,
    ) -> Result<Processed, Failure> {
        let mut retry = StoreRetry::default();
        loop {
            let outcome = self.process(settlement, delivery, stop).await;
            let error = match &outcome {
                Err(Failure::Store(e)) | Err(Failure::Halt(Halt::Store(e))) if e.is_passing() => e,
                _ => return outcome,
            };
            if !retry.wait(error, settlement.lease(), &stop.drain).await {
                return outcome;
            }
        }
    }

    /// Loads (or creates) the order, claims it and runs its pipeline.
    async fn process(
        &self,
        settlement: &Settlement,
        delivery: &Delivery,
        stop: &Stop,
    ) -> Result<Processed, Failure> {
        let message = settlement.message();
        let lease = settlement.lease();
        let payload = match validate_payload(&message.payload) {
            Ok(payload) => payload,
            Err(reason) => return self.reject(delivery, message, reason).await,
        };
        let mut order = match self.store().get(delivery.order_id).await? {
            Some(order) => order,
            None => self.create(message, delivery, payload).await?,
        };
        if order.order.is_terminal() {
            // The work message of a retry can arrive before its requester recorded the retry: then
            // this delivery records it, and runs the new attempt.
            match self.take_up_retry(message, order).await? {
                Some(retried) => order = retried,
                None => {
                    tracing::info!("order already terminal; acknowledging its message");
                    return Ok(Processed::AlreadyTerminal);
                }
            }
        }
        if let Some(carrier) = order
            .order
            .message_seq
            .filter(|seq| *seq != delivery.stream_seq)
        {
            // The order was submitted again after the duplicate window. While the message that carries
            // it exists, that one is the order's; this copy is ended. If it is gone, this one takes over.
            if message_exists(self.give_up.stream(), carrier).await? {
                tracing::warn!(
                    carrier,
                    "second message for an order that another message carries; terminating it"
                );
                return Err(Failure::Poison(TermReason::Duplicate));
            }
        }
        let begun = match self.claim(&mut order, delivery, lease, stop).await {
            // Cancelled before anyone picked it up, while this delivery was claiming it.
            Err(Failure::Halt(Halt::Redirected)) if order.order.is_terminal() => {
                return Ok(Processed::AlreadyTerminal)
            }
            claimed => claimed?,
        };
        metrics::gauge!(m::ORDERS_IN_FLIGHT).increment(1.0);
        let result = self.pipeline.run(&mut order, lease, stop, begun).await;
        metrics::gauge!(m::ORDERS_IN_FLIGHT).decrement(1.0);
        match result {
            Ok(state) => Ok(Processed::Finished(state, Box::new(order.order))),
            Err(halt @ (Halt::Interrupted | Halt::NotNow)) => {
                // Record that nobody holds the order any more, then hand it back.
                let released = self
                    .pipeline
                    .writer()
                    .commit(&mut order, lease, "release", |o| {
                        o.release(now());
                        Ok(())
                    })
                    .await;
                if let Err(e) = released {
                    tracing::warn!(error = %e, "cannot record the hand-back");
                }
                Err(Failure::Halt(halt))
            }
            Err(halt) => Err(Failure::Halt(halt)),
        }
    }

    /// Writes the document of an order whose message arrived before it: a node's intake publishes
    /// first and writes the document after, and a worker that gets here first writes it with the
    /// interface the message names.
    async fn create(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        payload: Box<serde_json::value::RawValue>,
    ) -> Result<Versioned, Failure> {
        let via = message
            .headers
            .as_ref()
            .and_then(|h| h.get(VIA_HEADER))
            .and_then(|v| Interface::parse(v.as_str()))
            .unwrap_or(Interface::Stream);
        let queued = Order::queued(delivery.order_id, payload, via, delivery.published);
        match self.store().create(&queued).await {
            Ok(created) => {
                if via == Interface::Stream {
                    // Intake counted the others when it accepted them.
                    metrics::counter!(m::ORDERS_SUBMITTED, "interface" => via.as_str())
                        .increment(1);
                }
                self.pipeline
                    .writer()
                    .events()
                    .created(&created.order)
                    .await;
                Ok(created)
            }
            Err(StoreError::Exists(_)) => {
                self.store().get(delivery.order_id).await?.ok_or_else(|| {
                    Failure::Store(StoreError::unavailable_because(
                        "order vanished while being created",
                    ))
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The order, retried, if `message` is the work message of its next retry (see
    /// `api::control::retry`); `None` if the message carries nothing more for a terminal order.
    ///
    /// A retry the document already records is run by any message of it. One it does not record
    /// yet is recorded here only if the document asks for it (`retry_request`) and the message's id
    /// carries the request's key: a message that anyone could publish with the retry header starts
    /// nothing.
    async fn take_up_retry(
        &self,
        message: &jetstream::Message,
        order: Versioned,
    ) -> Result<Option<Versioned>, Failure> {
        let headers = message.headers.as_ref();
        let Some(number) = headers
            .and_then(|h| h.get(RETRY_HEADER))
            .and_then(|v| v.as_str().parse::<u32>().ok())
        else {
            return Ok(None);
        };
        let message_id = headers
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str());
        let asked = is_asked_retry(&order.order, number, message_id);
        if !asked && order.order.retries < number {
            tracing::warn!(
                retry = number,
                "a retry's work message that the document did not ask for; it starts nothing"
            );
            return Ok(None);
        }
        match retry(self.store(), order, number).await? {
            Retry::Recorded { order, before } => {
                if let Some(before) = before {
                    let events = self.pipeline.writer().events();
                    events.transition(&before, &order.order).await;
                    tracing::info!(retry = number, "retry recorded by its work message");
                }
                // Recorded by its requester or an earlier delivery, and perhaps run to its end.
                Ok(Some(*order).filter(|o| !o.order.is_terminal()))
            }
            Retry::Refused(_) | Retry::Other | Retry::NotFound => Ok(None),
        }
    }

    /// Claims the order for this delivery, beginning its next step in the same write, unless this
    /// delivery's lease claimed it already (a retry after a store outage goes on under its own
    /// claim). Returns what the claim began.
    async fn claim(
        &self,
        order: &mut Versioned,
        delivery: &Delivery,
        lease: &Lease,
        stop: &Stop,
    ) -> Result<Begun, Failure> {
        let node_id = self.pipeline.node_id();
        let consumer_created = self.windows.borrow().created;
        let ours = order.order.owner.as_ref().is_some_and(|owner| {
            owner.node == node_id
                && owner.stream_seq == delivery.stream_seq
                && owner.delivery == delivery.delivered
                && lease.is_claimed()
        });
        if ours {
            return Ok(None);
        }
        if let Some(owner) = order.order.owner.as_ref().filter(|owner| {
            // A claim made through a consumer that was since deleted and created again is stale
            // whatever its delivery number: the new consumer counts from 1 and was paused until
            // every old lease had ended.
            owner.stream_seq == delivery.stream_seq
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
        let owner = Owner {
            node: node_id.to_owned(),
            delivery: delivery.delivered,
            stream_seq: delivery.stream_seq,
            claimed_at: now(),
        };
        let begun = self
            .pipeline
            .claim(order, owner, lease, stop)
            .await
            .map_err(Failure::Halt)?;
        if first_pickup {
            let waited = (now() - order.order.start_time)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
        }
        Ok(begun)
    }

    /// Records an order whose message can never be processed as failed, then has it terminated.
    async fn reject(
        &self,
        delivery: &Delivery,
        message: &jetstream::Message,
        reason: String,
    ) -> Result<Processed, Failure> {
        tracing::warn!(%reason, bytes = message.payload.len(), "poison message: recording the order as failed and terminating it");
        let order = Order::rejected(
            delivery.order_id,
            shown_payload(&message.payload),
            reason,
            now(),
        );
        match self.store().create(&order).await {
            Ok(created) => {
                self.pipeline
                    .writer()
                    .events()
                    .created(&created.order)
                    .await
            }
            Err(StoreError::Exists(_)) => {}
            Err(e) => tracing::warn!(error = %e, "cannot record the rejected order"),
        }
        Err(Failure::Poison(TermReason::InvalidPayload))
    }

    /// What the message's outcome is, and how its lease ends, for what processing came to; counts
    /// and logs a finished order.
    fn conclude(&self, result: Result<Processed, Failure>) -> (Outcome, LeaseEnd) {
        match result {
            Ok(Processed::Finished(state, order)) => {
                self.finished(state, &order);
                (Outcome::Ack, LeaseEnd::Finished)
            }
            Ok(Processed::AlreadyTerminal) => (Outcome::Ack, LeaseEnd::Finished),
            Err(Failure::Poison(reason)) => (Outcome::Term(reason), LeaseEnd::Dropped),
            Err(Failure::Halt(Halt::Interrupted)) => {
                tracing::info!("handing the order back for another node to continue");
                (Outcome::Nak(NakReason::Shutdown), LeaseEnd::Released)
            }
            Err(Failure::Halt(Halt::NotNow)) => {
                tracing::info!("the step cannot run now; handing the order back");
                (Outcome::Nak(NakReason::NotNow), LeaseEnd::Released)
            }
            Err(Failure::Halt(Halt::Fenced)) => {
                // Counted where the lease was given up; the message is no longer ours to touch.
                tracing::warn!("stopped working on the order: lease not confirmed in time");
                (Outcome::Leave, LeaseEnd::Fenced)
            }
            Err(Failure::Halt(Halt::LeaseLost(e))) => {
                metrics::counter!(m::LEASES_LOST).increment(1);
                tracing::warn!(error = %e, "another writer took the order; dropping it without ack or nak");
                (Outcome::Leave, LeaseEnd::Lost)
            }
            Err(Failure::NotOurs) => {
                metrics::counter!(m::LEASES_LOST).increment(1);
                (Outcome::Leave, LeaseEnd::Lost)
            }
            Err(Failure::Halt(Halt::Redirected)) => {
                // A cancel recorded while the order was being claimed; the next delivery goes on.
                (Outcome::Nak(NakReason::NotNow), LeaseEnd::Released)
            }
            Err(Failure::Halt(Halt::Invalid(e))) => {
                tracing::error!(error = %e, "order document does not allow the next transition; terminating its message");
                (
                    Outcome::Term(TermReason::InvalidDocument),
                    LeaseEnd::Dropped,
                )
            }
            Err(Failure::Halt(Halt::Store(e)) | Failure::Store(e)) => {
                tracing::warn!(error = %e, "cannot get on with the order (order store); handing the message back for a retry");
                (Outcome::Nak(NakReason::StoreUnavailable), LeaseEnd::Dropped)
            }
        }
    }

    /// Counts and logs an order that reached its terminal state on this node.
    fn finished(&self, state: State, order: &Order) {
        let outcome = match state {
            State::Completed => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                "completed"
            }
            State::Cancelled => {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                "cancelled"
            }
            _ => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                "failed"
            }
        };
        metrics::counter!(m::ORDERS_FINISHED, "outcome" => outcome).increment(1);
        if let Some(done) = order.complete_time {
            let took = (done - order.start_time).to_std().unwrap_or_default();
            metrics::histogram!(m::ORDER_DURATION).record(took.as_secs_f64());
        }
        tracing::info!(state = %state, "order finished");
    }
}
