//! The pull loop: fetches work messages from the shared consumer, never more than there are free
//! workers, and hands each to a worker task that runs its order under a lease.
//!
//! Every message ends in an explicit outcome (see [`crate::queue::settle`]). A message that arrives
//! after the node stopped reading a batch (it is draining, or the fetch failed) is handed back at once
//! rather than left to wait out its ack wait.

use crate::engine::connection::Connection;
use crate::engine::lease::{Holder, Lease};
use crate::engine::pipeline::Stop;
use crate::engine::window::Windows;
use crate::ops::audit::LeaseEnd;
use crate::ops::metrics as m;
use crate::ops::rate::RateLimited;
use crate::queue::follow::Health;
use crate::queue::process::{Processor, Timing};
use crate::queue::settle::{NakReason, Outcome, Settlement};
use crate::task::Task;
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{Stream, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long one pull waits for messages before asking again, at most. A lease is counted from the
/// moment the pull was sent, so a pull must expire well inside the lease window.
const FETCH_EXPIRES: Duration = Duration::from_secs(2);

fn fetch_expiry(window: Duration) -> Duration {
    (window / 5).clamp(Duration::from_millis(100), FETCH_EXPIRES)
}

/// The pull loop of one node.
pub struct Puller {
    /// The shared consumer, on the connection that fetches (and only fetches).
    consumer: PullConsumer,
    /// The connection leases live on: every in-progress ack, ack, nak and term goes through it.
    leases: jetstream::Context,
    /// The lease connection as leases see it: a lease ends when the connection it was taken on is lost.
    connection: Connection,
    /// Whether the consumer can be fetched from.
    health: Health,
    windows: watch::Receiver<Windows>,
    workers: usize,
    processor: Arc<Processor>,
    /// Fires when the node's grace period is over: orders stop in the middle of a step.
    abort: CancellationToken,
}

/// Why the node stopped reading a batch before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Draining,
    Failed,
}

impl Puller {
    pub fn new(
        consumer: PullConsumer,
        leases: jetstream::Context,
        connection: Connection,
        health: Health,
        workers: usize,
        processor: Processor,
        abort: CancellationToken,
    ) -> Puller {
        Puller {
            consumer,
            leases,
            connection,
            health,
            windows: processor.windows(),
            workers,
            processor: Arc::new(processor),
            abort,
        }
    }
}

impl Task for Puller {
    const NAME: &'static str = "workers";

    /// Runs until `drain` fires, then waits for in-flight orders to be finished or handed back.
    async fn run(self, drain: CancellationToken) -> anyhow::Result<()> {
        let stop = Stop {
            drain,
            abort: self.abort.clone(),
        };
        let mut pull_errors = RateLimited::new(Duration::from_secs(10));
        let slots = Arc::new(Semaphore::new(self.workers));
        let mut tasks = JoinSet::new();
        metrics::gauge!(m::WORKERS_TOTAL).set(self.workers as f64);
        metrics::gauge!(m::WORKERS_BUSY).set(0.0);
        while !stop.drain.is_cancelled() {
            reap(&mut tasks);
            let permits = tokio::select! {
                _ = stop.drain.cancelled() => break,
                permits = take_free(&slots) => permits,
            };
            if let Some(problem) = self.health.problem() {
                // No consumer to fetch from (it is being recreated): take no work meanwhile.
                drop(permits);
                if let Some(skipped) = pull_errors.allow() {
                    tracing::warn!(%problem, skipped, "not taking work");
                }
                pause(&stop.drain, Duration::from_millis(250)).await;
                continue;
            }
            self.fetch(permits, &mut tasks, &stop, &mut pull_errors)
                .await;
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
        Ok(())
    }
}

impl Puller {
    /// One pull for as many messages as `permits` allows; each message is started on a worker task.
    async fn fetch(
        &self,
        mut permits: OwnedSemaphorePermit,
        tasks: &mut JoinSet<()>,
        stop: &Stop,
        pull_errors: &mut RateLimited,
    ) {
        let expires = fetch_expiry(self.windows.borrow().shortest());
        // The server cannot deliver before it was asked: a safe anchor for the leases.
        let timing = Timing {
            anchor: Instant::now(),
            connection: self.connection.current(),
        };
        let batch = self
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
                pause(&stop.drain, Duration::from_secs(1)).await;
                return;
            }
        };
        // The server answers the pull by its expiry; a little more covers the way back.
        let until = timing.anchor + expires + Duration::from_millis(500);
        let stopped = read_batch(&mut batch, &stop.drain, until, |next| match next {
            Ok(message) => {
                let message = self.rebind(message);
                match permits.split(1) {
                    Some(permit) => self.start(message, permit, timing.clone(), stop, tasks),
                    None => {
                        tracing::error!("received more messages than requested; handing one back");
                        let settlement = self.unprocessed(message, &timing);
                        tasks.spawn(async move {
                            settlement
                                .settle(Outcome::Nak(NakReason::OverBatch), LeaseEnd::Released)
                                .await;
                        });
                    }
                }
                true
            }
            Err(e) => {
                if let Some(skipped) = pull_errors.allow() {
                    tracing::warn!(error = %e, skipped, "error while pulling from the work queue");
                }
                false
            }
        })
        .await;
        if let Some((stopped, rest)) = stopped {
            let reason = match stopped {
                Stopped::Draining => NakReason::Shutdown,
                Stopped::Failed => NakReason::FetchError,
            };
            if !rest.is_empty() {
                tracing::info!(
                    messages = rest.len(),
                    reason = reason.as_str(),
                    "handing back messages that arrived after the node stopped reading"
                );
            }
            for message in rest {
                let settlement = self.unprocessed(self.rebind(message), &timing);
                settlement
                    .settle(Outcome::Nak(reason), LeaseEnd::Released)
                    .await;
            }
        }
    }

    /// The message, settled through the lease connection, which a bad message cannot drop.
    fn rebind(&self, message: jetstream::Message) -> jetstream::Message {
        jetstream::Message {
            message: message.message,
            context: self.leases.clone(),
        }
    }

    /// A message the node hands back without looking at its order, under a lease anchored like the
    /// others of its batch.
    fn unprocessed(&self, message: jetstream::Message, timing: &Timing) -> Settlement {
        let delivery = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let holder = Holder::unaudited(uuid::Uuid::nil(), delivery);
        let lease = Lease::new(
            self.windows.clone(),
            timing.anchor,
            holder,
            timing.connection.clone(),
        );
        Settlement::new(Arc::new(message), lease)
    }

    /// Runs `message` on a worker task that holds `permit` until it is done.
    fn start(
        &self,
        message: jetstream::Message,
        permit: OwnedSemaphorePermit,
        timing: Timing,
        stop: &Stop,
        tasks: &mut JoinSet<()>,
    ) {
        let processor = self.processor.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            processor.stats().busy.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(m::WORKERS_BUSY).increment(1.0);
            processor.handle(message, timing, stop).await;
            processor.stats().busy.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(m::WORKERS_BUSY).decrement(1.0);
            drop(permit);
        });
    }
}

/// Reads `batch`, giving each item to `take` (which returns false to stop reading: the batch
/// failed), until the batch ends. If the node stops reading first (`drain` fires, or the batch fails),
/// returns why, with the messages that still arrive until the batch ends or `until` passes: the
/// server counts them as delivered, and they must be handed back.
async fn read_batch<S, T, E>(
    batch: &mut S,
    drain: &CancellationToken,
    until: Instant,
    mut take: impl FnMut(Result<T, E>) -> bool,
) -> Option<(Stopped, Vec<T>)>
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    let stopped = loop {
        let next = tokio::select! {
            biased;
            _ = drain.cancelled() => break Stopped::Draining,
            next = batch.next() => next,
        };
        match next {
            None => return None,
            Some(item) => {
                if !take(item) {
                    break Stopped::Failed;
                }
            }
        }
    };
    let mut rest = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until.into(), batch.next()).await {
        rest.push(message);
    }
    Some((stopped, rest))
}

/// Waits for a free worker, then takes every other free one too.
async fn take_free(slots: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    let mut permits = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let free = slots.available_permits();
    if free > 0 {
        if let Ok(more) = slots.clone().try_acquire_many_owned(free as u32) {
            permits.merge(more);
        }
    }
    permits
}

/// Collects the worker tasks that ended, reporting any that panicked.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done {
            tracing::error!(error = %e, "order task panicked");
        }
    }
}

/// Sleeps `duration`, or less if `drain` fires.
async fn pause(drain: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    #[test]
    fn pulls_expire_well_inside_the_lease_window() {
        assert_eq!(fetch_expiry(Duration::from_secs(30)), FETCH_EXPIRES);
        assert_eq!(
            fetch_expiry(Duration::from_secs(1)),
            Duration::from_millis(200)
        );
        for (window, replicated) in [
            (Duration::from_secs(1), false),
            (crate::engine::window::MIN_REPLICATED_WINDOW, true),
        ] {
            let timing = crate::engine::window::LeaseTiming::for_window(window, replicated);
            assert!(fetch_expiry(timing.window) < timing.window - timing.margin);
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_batch_read_to_its_end_leaves_nothing_to_hand_back() {
        let (tx, mut rx) = mpsc::unbounded::<Result<u32, String>>();
        for n in 1..=3 {
            tx.unbounded_send(Ok(n)).expect("open");
        }
        drop(tx);
        let mut taken = Vec::new();
        let rest = read_batch(&mut rx, &CancellationToken::new(), soon(), |item| {
            taken.push(item.expect("ok"));
            true
        })
        .await;
        assert_eq!(taken, [1, 2, 3]);
        assert!(rest.is_none());
    }

    #[tokio::test]
    async fn messages_delivered_after_the_drain_are_handed_back() {
        let (tx, mut rx) = mpsc::unbounded::<Result<u32, String>>();
        for n in 1..=4 {
            tx.unbounded_send(Ok(n)).expect("open");
        }
        let drain = CancellationToken::new();
        let mut taken = Vec::new();
        let later = tx.clone();
        let rest = read_batch(&mut rx, &drain, soon(), |item| {
            taken.push(item.expect("ok"));
            if taken.len() == 2 {
                // The node starts draining with two messages of the batch not yet read, and the
                // server sends one more before the pull ends.
                drain.cancel();
                later.unbounded_send(Ok(5)).expect("open");
                later.close_channel();
            }
            true
        })
        .await;
        assert_eq!(taken, [1, 2]);
        assert_eq!(rest, Some((Stopped::Draining, vec![3, 4, 5])));
    }

    #[tokio::test]
    async fn messages_after_a_failed_fetch_are_handed_back() {
        let (tx, mut rx) = mpsc::unbounded::<Result<u32, String>>();
        tx.unbounded_send(Ok(1)).expect("open");
        tx.unbounded_send(Err("leadership change".into()))
            .expect("open");
        tx.unbounded_send(Ok(2)).expect("open");
        // The pull never ends on its own: the rest is read until its expiry.
        let until = Instant::now() + Duration::from_millis(200);
        let mut taken = Vec::new();
        let rest = read_batch(
            &mut rx,
            &CancellationToken::new(),
            until,
            |item| match item {
                Ok(n) => {
                    taken.push(n);
                    true
                }
                Err(_) => false,
            },
        )
        .await;
        assert_eq!(taken, [1]);
        assert_eq!(rest, Some((Stopped::Failed, vec![2])));
        drop(tx);
    }
}
