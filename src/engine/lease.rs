//! The lease a node holds on an order while it works on it.
//!
//! The server will not hand a message to another node before (last delivery or last in-progress ack
//! it received) + the redelivery window. A node therefore counts its lease from the moment it *sent*
//! the last in-progress ack the server confirmed (or from before it asked for the message), and stops
//! working on the order at `anchor + window - margin`: before the server could redeliver it.
//!
//! The window is the one the consumer has *now*: an operator can edit it while orders run, and the
//! server applies a new window to deliveries already out. Leases read it from [`Windows`], which the
//! node keeps equal to the consumer's configuration, so a shorter window shortens every lease at once.
//!
//! A replicated consumer needs a wider margin: the server that takes over as its leader may date a
//! delivery earlier than the old leader did (see [`REPLICA_LAG`](crate::engine::window::REPLICA_LAG)).

use crate::domain::order::Step;
use crate::engine::connection::Epoch;
use crate::engine::window::{LeaseTiming, Windows};
use crate::ops::audit::{Audit, LeaseEnd, Stamp};
use crate::ops::metrics as m;
use async_nats::jetstream::{self, AckKind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A node's hold on one order's message. Cheap to clone; all clones see the same state.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

/// Which delivery of which order a lease is for, and where its audit goes.
#[derive(Clone)]
pub struct Holder {
    pub order_id: Uuid,
    /// The delivery count of the message (1 = first delivery).
    pub delivery: u32,
    /// The stream sequence of the message.
    pub stream_seq: u64,
    pub audit: Audit,
}

impl Holder {
    /// A holder whose lease is not audited.
    pub fn unaudited(order_id: Uuid, delivery: u32) -> Holder {
        Holder {
            order_id,
            delivery,
            stream_seq: 0,
            audit: Audit::off(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interval {
    Unclaimed,
    Open,
    Closed,
}

struct Inner {
    windows: watch::Receiver<Windows>,
    /// The shortest window in force since the lease was taken, in nanoseconds. A longer window set
    /// later is not trusted for this delivery (the server may keep the timer it started with); a
    /// shorter one is obeyed at once.
    shortest_window: AtomicU64,
    holder: Holder,
    connection: Epoch,
    /// Where the lease stands as an interval of the audit: opened by the node's claim on the order,
    /// closed by [`Lease::end`] or at once when the lease is fenced, so that a node killed later,
    /// while a store call is still in flight, has already recorded when its hold ended.
    interval: Mutex<Interval>,
    ended: AtomicBool,
    /// When the holder last knew the server had the delivery alive: before it asked for the message,
    /// then the sending of each confirmed in-progress ack. The lease ends at anchor + window - margin.
    anchor: Mutex<Instant>,
    /// The last moment the lease was found held: the holder may have written, acked or nakked
    /// up to then, so its interval in the audit does not end before it, even if a shorter window
    /// learnt later moves the deadline back past it.
    held_seen: Mutex<Option<Instant>>,
    /// The revision of the first write of this delivery the store confirmed (its claim): the fence
    /// step code is given. 0 until then.
    claim_revision: AtomicU64,
    lost: CancellationToken,
}

impl Lease {
    /// A lease anchored at `anchor`, a moment no later than the server's delivery of the message, on
    /// `connection` as it was at that moment, with the windows `windows` says are in force.
    pub fn new(
        windows: watch::Receiver<Windows>,
        anchor: Instant,
        holder: Holder,
        connection: Epoch,
    ) -> Lease {
        let first_window = windows.borrow().timing(holder.delivery).window;
        Lease {
            inner: Arc::new(Inner {
                windows,
                shortest_window: AtomicU64::new(nanos(first_window)),
                holder,
                connection,
                interval: Mutex::new(Interval::Unclaimed),
                ended: AtomicBool::new(false),
                anchor: Mutex::new(anchor),
                held_seen: Mutex::new(None),
                claim_revision: AtomicU64::new(0),
                lost: CancellationToken::new(),
            }),
        }
    }

    /// The timing in force now for this lease's delivery: the shortest window the consumer has had
    /// since the lease was taken.
    pub fn timing(&self) -> LeaseTiming {
        let (now, replicated) = {
            let windows = self.inner.windows.borrow();
            let now = windows.timing(self.inner.holder.delivery).window;
            (nanos(now), windows.replicated)
        };
        let before = self.inner.shortest_window.fetch_min(now, Ordering::SeqCst);
        LeaseTiming::for_window(Duration::from_nanos(before.min(now)), replicated)
    }

    pub fn holder(&self) -> &Holder {
        &self.inner.holder
    }

    /// The node's claim on the order was written as `revision`; `start` was taken before it was sent.
    /// The interval starts at the first claim: a claim written again after an unanswered one (the
    /// store failed, the order is tried again under the same lease) does not start another.
    pub fn claimed(&self, revision: u64, start: Stamp) {
        let holder = &self.inner.holder;
        let mut interval = self.interval();
        if *interval != Interval::Unclaimed {
            return;
        }
        *interval = Interval::Open;
        holder.audit.claimed(
            holder.order_id,
            holder.delivery,
            holder.stream_seq,
            revision,
            start,
        );
    }

    /// The revision of this delivery's first confirmed write (its claim of the order), 0 before.
    /// Every change of hands is a claim, a compare-and-set on a newer revision, so the fence of
    /// an order's owners strictly increases.
    pub fn claim_revision(&self) -> u64 {
        self.inner.claim_revision.load(Ordering::SeqCst)
    }

    /// Whether [`Lease::claimed`] was called.
    pub fn is_claimed(&self) -> bool {
        *self.interval() != Interval::Unclaimed
    }

    fn interval(&self) -> std::sync::MutexGuard<'_, Interval> {
        self.inner
            .interval
            .lock()
            .expect("lease lock is never poisoned")
    }

    /// Closes the audit's interval, if it is open: at now while the lease is `held`, else at the
    /// self-fence deadline (or now, if that is earlier), but never before the last moment the lease
    /// was found held. The deadline can move back: a node that learns of a shorter window late (it
    /// was cut off from the servers when the window was announced) counts the lease by it from
    /// then on, though it wrote under the longer one, which the server still kept.
    fn close(&self, why: LeaseEnd, held: bool) {
        let mut interval = self.interval();
        if *interval != Interval::Open {
            return;
        }
        *interval = Interval::Closed;
        let end = if held {
            Stamp::now()
        } else {
            let fenced = self.deadline().min(Instant::now());
            Stamp::of(self.last_held().map_or(fenced, |seen| seen.max(fenced)))
        };
        let why = if held { why } else { LeaseEnd::Fenced };
        let holder = &self.inner.holder;
        holder.audit.lease_ended(
            holder.order_id,
            holder.delivery,
            holder.stream_seq,
            end,
            why,
        );
    }

    /// A write under this lease was confirmed as `revision`.
    pub fn committed(
        &self,
        change: &str,
        step: Option<Step>,
        revision: u64,
        sent: Stamp,
        answered: Stamp,
    ) {
        // Only the first confirmed write is the claim; later ones leave it as it is.
        let _ = self.inner.claim_revision.compare_exchange(
            0,
            revision,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        let holder = &self.inner.holder;
        holder.audit.committed(
            holder.order_id,
            holder.delivery,
            change,
            step,
            revision,
            (sent, answered),
        );
    }

    /// A write under this lease (`change`) is about to be sent; `sent` is taken now.
    pub fn sending(&self, change: &str) -> Stamp {
        let holder = &self.inner.holder;
        let sent = Stamp::now();
        holder
            .audit
            .sending(holder.order_id, holder.delivery, change, sent);
        sent
    }

    /// A write under this lease sent at `sent` got no answer in time: it may have been applied.
    pub fn unconfirmed(&self, change: &str, sent: Stamp) {
        let holder = &self.inner.holder;
        if !self.is_claimed() {
            // Perhaps a claim that was applied: the interval starts when it was sent (revision 0:
            // unknown), so that the audit closes it.
            self.claimed(0, sent);
        }
        holder
            .audit
            .unconfirmed(holder.order_id, holder.delivery, change, sent);
    }

    /// A write under this lease sent at `sent` was refused: the document had changed.
    pub fn refused(&self, change: &str, sent: Stamp) {
        let holder = &self.inner.holder;
        holder
            .audit
            .refused(holder.order_id, holder.delivery, change, sent);
    }

    /// The message was acked, nakked or terminated (`outcome`).
    pub fn settled(&self, outcome: &str) {
        let holder = &self.inner.holder;
        if self.is_claimed() {
            holder
                .audit
                .settled(holder.order_id, holder.delivery, outcome);
        }
    }

    /// Lets the order go: nothing may be written, acked or nakked under the lease any more. Returns
    /// whether it was still held, i.e. whether the caller may still ack, nak or terminate the message.
    /// The audit records the interval's end: now, or the self-fence deadline if that came first.
    pub fn end(&self, why: LeaseEnd) -> bool {
        let held = self.is_held();
        self.give_up();
        if self.inner.ended.swap(true, Ordering::SeqCst) {
            return held;
        }
        if !held {
            metrics::counter!(m::SELF_FENCES).increment(1);
        }
        self.close(why, held);
        held
    }

    /// When the holder must stop: the heartbeat deadline, or the loss of the connection the lease was
    /// taken on, whichever comes first.
    pub fn deadline(&self) -> Instant {
        let timing = self.timing();
        let anchor = *self
            .inner
            .anchor
            .lock()
            .expect("lease lock is never poisoned");
        let heartbeats = anchor + timing.window - timing.margin;
        match self.inner.connection.ended() {
            Some(lost) => heartbeats.min(lost),
            None => heartbeats,
        }
    }

    /// True while the holder may still write, ack or nak.
    pub fn is_held(&self) -> bool {
        let now = Instant::now();
        let held = !self.inner.lost.is_cancelled() && now < self.deadline();
        if held {
            let mut seen = self.held_seen();
            *seen = Some(seen.map_or(now, |seen| seen.max(now)));
        }
        held
    }

    /// The last moment [`Lease::is_held`] found the lease held.
    fn last_held(&self) -> Option<Instant> {
        *self.held_seen()
    }

    fn held_seen(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.inner
            .held_seen
            .lock()
            .expect("lease lock is never poisoned")
    }

    /// Completes once the lease is lost.
    pub async fn lost(&self) {
        self.inner.lost.cancelled().await
    }

    /// Gives the lease up: nothing may be written, acked or nakked under it any more.
    pub fn give_up(&self) {
        self.inner.lost.cancel();
    }

    /// The server confirmed an in-progress ack sent at `sent`.
    fn renewed(&self, sent: Instant) {
        let mut anchor = self
            .inner
            .anchor
            .lock()
            .expect("lease lock is never poisoned");
        *anchor = (*anchor).max(sent);
    }

    /// Keeps the lease alive with confirmed in-progress acks until `done` fires, and gives it up when
    /// a confirmation does not arrive before the deadline.
    pub async fn keep_alive(self, message: Arc<jetstream::Message>, done: CancellationToken) {
        let mut windows = self.inner.windows.clone();
        windows.borrow_and_update();
        let mut next = Instant::now();
        let mut unconfirmed = 0u64;
        loop {
            let wake = next.min(self.deadline());
            tokio::select! {
                _ = done.cancelled() => return,
                _ = self.lost() => return,
                _ = self.inner.connection.wait_ended() => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
                // A new window applies at once: the deadline and the heartbeat follow it.
                _ = changed(&mut windows) => {
                    next = next.min(Instant::now() + self.timing().heartbeat);
                    continue;
                }
            }
            if Instant::now() >= self.deadline() {
                self.fence();
                return;
            }
            let sent = Instant::now();
            let confirmed = tokio::select! {
                _ = done.cancelled() => return,
                _ = self.inner.connection.wait_ended() => {
                    self.fence();
                    return;
                }
                result = tokio::time::timeout_at(self.deadline().into(), confirm(&message, AckKind::Progress)) => result,
            };
            let heartbeat = self.timing().heartbeat;
            match confirmed {
                Ok(Ok(())) => {
                    self.renewed(sent);
                    next = sent + heartbeat;
                }
                Ok(Err(e)) => {
                    // A cluster between consumer leaders answers nothing for seconds: one line per
                    // lease, the rest counted.
                    metrics::counter!(m::HEARTBEATS_UNCONFIRMED).increment(1);
                    if unconfirmed == 0 {
                        tracing::warn!(error = %e, "in-progress ack not confirmed; retrying until the lease's deadline");
                    } else {
                        tracing::debug!(error = %e, unconfirmed, "in-progress ack not confirmed; retrying");
                    }
                    unconfirmed += 1;
                    next = Instant::now() + heartbeat / 4;
                }
                Err(_) => {
                    self.fence();
                    return;
                }
            }
        }
    }

    fn fence(&self) {
        if !self.inner.lost.is_cancelled() {
            tracing::warn!("lease not confirmed in time: stopping work on this order before it can be redelivered");
            self.inner.lost.cancel();
            self.close(LeaseEnd::Fenced, false);
        }
    }
}

/// Sends `kind` for `message` and waits until the consumer answers it.
///
/// async-nats's `double_ack_with` takes whatever arrives on its reply inbox for the answer, including
/// the "no responders" status the server sends when nothing takes the message's acks: on a cluster
/// between two consumer leaders, or once the consumer is deleted. Nothing was confirmed then, and a
/// lease renewed by it outlives the server's window. A request reports that status as an error. See
/// docs/nats-client-double-ack-defect.md.
pub async fn confirm(
    message: &jetstream::Message,
    kind: AckKind,
) -> Result<(), async_nats::RequestError> {
    let Some(reply) = message.reply.clone() else {
        return Err(async_nats::RequestError::with_source(
            async_nats::RequestErrorKind::Other,
            "not a JetStream message: no reply subject",
        ));
    };
    message
        .context
        .client()
        .request(reply, kind.into())
        .await
        .map(|_| ())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Completes when the windows change; never, once nobody can change them any more.
async fn changed(windows: &mut watch::Receiver<Windows>) {
    if windows.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::connection::Connection;
    use crate::engine::window::MAX_HEARTBEAT;

    #[test]
    fn lease_ends_a_margin_before_the_window() {
        let anchor = Instant::now();
        let lease = Lease::new(
            Windows::fixed(Duration::from_secs(10)).constant(),
            anchor,
            Holder::unaudited(Uuid::nil(), 1),
            Connection::default().current(),
        );
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(8));
        assert!(lease.is_held());
        lease.renewed(anchor + Duration::from_secs(1));
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(9));
        // An older confirmation never moves the deadline back.
        lease.renewed(anchor);
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(9));
        lease.give_up();
        assert!(!lease.is_held());
    }

    #[test]
    fn a_shorter_window_shortens_the_lease_at_once() {
        let (edit, windows) = watch::channel(Windows::fixed(Duration::from_secs(30)));
        let anchor = Instant::now() - Duration::from_secs(1);
        let lease = Lease::new(
            windows,
            anchor,
            Holder::unaudited(Uuid::nil(), 2),
            Connection::default().current(),
        );
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(24));
        assert_eq!(lease.timing().heartbeat, MAX_HEARTBEAT);
        // An operator sets a backoff list: delivery 2 now has the second entry as its window.
        let mut edited = Windows::fixed(Duration::from_secs(2));
        edited.backoff = vec![Duration::from_secs(2), Duration::from_secs(5)];
        edit.send_replace(edited);
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(4));
        // A longer window set later is not trusted for this delivery.
        edit.send_replace(Windows::fixed(Duration::from_secs(60)));
        assert_eq!(lease.deadline(), anchor + Duration::from_secs(4));
        // A window that has run out already ends the lease.
        edit.send_replace(Windows::fixed(Duration::from_millis(1)));
        assert!(!lease.is_held());
    }

    #[test]
    fn an_announced_window_shortens_leases_before_the_consumer_does() {
        let mut windows = Windows::fixed(Duration::from_secs(30));
        windows.backoff = vec![Duration::from_secs(30), Duration::from_secs(60)];
        assert_eq!(windows.timing(2).window, Duration::from_secs(60));
        windows.announced = Some(Duration::from_secs(2));
        assert_eq!(windows.timing(1).window, Duration::from_secs(2));
        assert_eq!(windows.timing(2).window, Duration::from_secs(2));
        assert_eq!(windows.shortest(), Duration::from_secs(2));
        assert_eq!(windows.server_shortest(), Duration::from_secs(30));
    }

    #[test]
    fn an_expired_lease_is_not_held() {
        let lease = Lease::new(
            Windows::fixed(Duration::from_secs(1)).constant(),
            Instant::now() - Duration::from_secs(5),
            Holder::unaudited(Uuid::nil(), 1),
            Connection::default().current(),
        );
        assert!(!lease.is_held());
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;
    use crate::engine::connection::Connection;

    #[tokio::test]
    async fn a_lease_ends_when_its_connection_is_lost() {
        let connection = Connection::default();
        let windows = Windows::fixed(Duration::from_secs(30));
        let lease = Lease::new(
            windows.clone().constant(),
            Instant::now(),
            Holder::unaudited(Uuid::nil(), 1),
            connection.current(),
        );
        assert!(lease.is_held());
        connection.lost();
        assert!(!lease.is_held());
        assert!(lease.deadline() <= Instant::now());
        // A lease taken after the loss is not affected by it.
        let later = Lease::new(
            windows.constant(),
            Instant::now(),
            Holder::unaudited(Uuid::nil(), 1),
            connection.current(),
        );
        assert!(later.is_held());
        // The heartbeat task notices the loss at once.
        tokio::time::timeout(Duration::from_secs(1), later.inner.connection.wait_ended())
            .await
            .expect_err("no loss yet");
        connection.lost();
        tokio::time::timeout(Duration::from_secs(1), later.inner.connection.wait_ended())
            .await
            .expect("the loss wakes it");
    }

    /// A holder of delivery `delivery` of message `stream_seq` whose audit goes to `path`.
    fn audited(path: &std::path::Path, delivery: u32, stream_seq: u64) -> Holder {
        Holder {
            order_id: Uuid::now_v7(),
            delivery,
            stream_seq,
            audit: Audit::open(path, "node-a").expect("audit opens"),
        }
    }

    /// The lines of the audit at `path`.
    fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("audit readable")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn a_fenced_lease_closes_its_interval_at_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("audit.jsonl");
        let holder = audited(&path, 3, 7);
        let connection = Connection::default();
        let lease = Lease::new(
            Windows::fixed(Duration::from_secs(30)).constant(),
            Instant::now(),
            holder,
            connection.current(),
        );
        lease.claimed(11, Stamp::now());
        connection.lost();
        // The heartbeat task fences the lease while the worker is still inside a store call: the
        // audit records the end now, not when the worker gets back (a node killed meanwhile never
        // would).
        lease.fence();
        let lines = || audit_lines(&path);
        let after_fence = lines();
        assert_eq!(after_fence.len(), 2);
        assert_eq!(after_fence[1]["event"], "lease_end");
        assert_eq!(after_fence[1]["why"], "fenced");
        // The worker's own end later changes nothing and may not settle the message.
        assert!(!lease.end(LeaseEnd::Released));
        assert_eq!(lines().len(), 2);
    }

    #[test]
    fn a_window_learnt_late_does_not_end_the_interval_before_a_write_it_allowed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("audit.jsonl");
        let holder = audited(&path, 1, 9);
        let (edit, windows) = watch::channel(Windows::fixed(Duration::from_secs(5)));
        // Under a 5 s window the lease runs until anchor + 4 s: a second from now.
        let anchor = Instant::now() - Duration::from_secs(3);
        let lease = Lease::new(windows, anchor, holder, Connection::default().current());
        lease.claimed(12, Stamp::now());
        // A write is answered, and the lease is still held: the write counts. (The audit keeps
        // microseconds.)
        let answered = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
        assert!(lease.is_held());
        // Only now does the node learn that a 3 s window was announced (it was cut off from the
        // servers): the deadline moves back to anchor + 2.4 s, before the answer.
        let mut announced = Windows::fixed(Duration::from_secs(5));
        announced.announced = Some(Duration::from_secs(3));
        edit.send_replace(announced);
        assert!(lease.deadline() < Instant::now());
        assert!(!lease.is_held());
        lease.fence();
        let lines = audit_lines(&path);
        assert_eq!(lines[1]["event"], "lease_end");
        assert_eq!(lines[1]["why"], "fenced");
        let end: chrono::DateTime<chrono::Utc> = lines[1]["end"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("an end time");
        assert!(
            end >= answered,
            "the interval ends at {end}, before the write answered at {answered} that the lease allowed"
        );
    }
}
