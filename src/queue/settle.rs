//! Settling: the one way a work message is acked, nakked or terminated.
//!
//! A [`Settlement`] holds a delivered message and the lease on it, and is used up by settling it, so a
//! message is settled at most once. It ends the lease first: a node that lost the lease (paused, cut
//! off, overtaken) sends nothing, since the message may be another node's by then. The audit line and
//! the metric label come from the same [`Outcome`], so what is logged, counted and sent cannot drift.

use crate::engine::lease::{confirm, Lease};
use crate::engine::write::RETRY_DELAY;
use crate::ops::audit::LeaseEnd;
use crate::ops::metrics as m;
use async_nats::jetstream::{self, AckKind};
use std::sync::Arc;
use std::time::Duration;

/// Why a message is handed back for redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakReason {
    /// The node is stopping; its progress is recorded and another node continues.
    Shutdown,
    /// The order store failed; the message comes back after [`RETRY_DELAY`].
    StoreUnavailable,
    /// The server delivered more messages than the node asked for.
    OverBatch,
    /// A fetch failed after some of its messages arrived: they are handed back at once.
    FetchError,
    /// The steps could not run the order now; it comes back after [`RETRY_DELAY`].
    NotNow,
    /// The worker panicked (a bug); the message comes back after [`RETRY_DELAY`], and its delivery
    /// counts towards the limit, so an order that always panics ends `Failed`.
    Panicked,
}

impl NakReason {
    pub const ALL: [NakReason; 6] = [
        NakReason::Shutdown,
        NakReason::StoreUnavailable,
        NakReason::OverBatch,
        NakReason::FetchError,
        NakReason::NotNow,
        NakReason::Panicked,
    ];

    /// The `reason` label of `orderly_messages_nakked_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            NakReason::Shutdown => "shutdown",
            NakReason::StoreUnavailable => "store_unavailable",
            NakReason::OverBatch => "over_batch",
            NakReason::FetchError => "fetch_error",
            NakReason::NotNow => "not_now",
            NakReason::Panicked => "panicked",
        }
    }

    /// How long the server waits before delivering the message again.
    pub fn delay(self) -> Option<Duration> {
        match self {
            NakReason::StoreUnavailable | NakReason::NotNow | NakReason::Panicked => {
                Some(RETRY_DELAY)
            }
            NakReason::Shutdown | NakReason::OverBatch | NakReason::FetchError => None,
        }
    }
}

/// Why a message is terminated: it can never be processed (or is no longer needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermReason {
    InvalidId,
    InvalidPayload,
    InvalidDocument,
    NoMetadata,
    /// Another message carries the order.
    Duplicate,
    /// The order used up its deliveries and was ended `Failed`.
    DeliveriesExhausted,
}

impl TermReason {
    pub const ALL: [TermReason; 6] = [
        TermReason::InvalidId,
        TermReason::InvalidPayload,
        TermReason::InvalidDocument,
        TermReason::NoMetadata,
        TermReason::Duplicate,
        TermReason::DeliveriesExhausted,
    ];

    /// The `reason` label of `orderly_messages_terminated_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            TermReason::InvalidId => "invalid_id",
            TermReason::InvalidPayload => "invalid_payload",
            TermReason::InvalidDocument => "invalid_document",
            TermReason::NoMetadata => "no_metadata",
            TermReason::Duplicate => "duplicate",
            TermReason::DeliveriesExhausted => "deliveries_exhausted",
        }
    }
}

/// How a message ends for the node that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The order is terminal: the message is done with.
    Ack,
    /// Hand the message back for redelivery.
    Nak(NakReason),
    /// The message can never be processed.
    Term(TermReason),
    /// The lease is gone (fenced, or the order was taken over): the message is not ours to touch.
    Leave,
}

impl Outcome {
    /// What the audit records when the message is settled this way.
    pub fn audit_name(self) -> Option<&'static str> {
        match self {
            Outcome::Ack => Some("ack"),
            Outcome::Nak(_) => Some("nak"),
            Outcome::Term(_) => Some("term"),
            Outcome::Leave => None,
        }
    }

    /// What is sent to the server for this outcome, given whether the lease was still held when it
    /// ended: nothing for a lease that was not.
    pub fn to_send(self, held: bool) -> Option<AckKind> {
        if !held {
            return None;
        }
        match self {
            Outcome::Ack => Some(AckKind::Ack),
            Outcome::Nak(reason) => Some(AckKind::Nak(reason.delay())),
            Outcome::Term(_) => Some(AckKind::Term),
            Outcome::Leave => None,
        }
    }
}

/// Registers every settling counter at zero, with each label its outcomes can carry.
pub fn zero_counters() {
    for reason in NakReason::ALL {
        metrics::counter!(m::MESSAGES_NAKED, "reason" => reason.as_str()).absolute(0);
    }
    for reason in TermReason::ALL {
        metrics::counter!(m::MESSAGES_TERMINATED, "reason" => reason.as_str()).absolute(0);
    }
    metrics::counter!(m::MESSAGES_ACKED).absolute(0);
}

/// A delivered message and the lease on it, waiting for its outcome.
pub struct Settlement {
    message: Arc<jetstream::Message>,
    lease: Lease,
}

impl Settlement {
    pub fn new(message: Arc<jetstream::Message>, lease: Lease) -> Settlement {
        Settlement { message, lease }
    }

    pub fn message(&self) -> &Arc<jetstream::Message> {
        &self.message
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Ends the lease (`why` if it was still held) and, if it was, gives the message `outcome`.
    /// Returns whether the outcome was sent.
    pub async fn settle(self, outcome: Outcome, why: LeaseEnd) -> bool {
        let held = self.lease.end(why);
        if !held && outcome == Outcome::Ack {
            tracing::warn!("lease ended before the ack; the next delivery finds the order finished and acks it");
        }
        let Some(kind) = outcome.to_send(held) else {
            return false;
        };
        let sent = match outcome {
            // The ack is confirmed by the server: an unconfirmed one leaves the order terminal, and a
            // later delivery acks it.
            Outcome::Ack => match confirm(&self.message, kind).await {
                Ok(()) => {
                    metrics::counter!(m::MESSAGES_ACKED).increment(1);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ack not confirmed; a later delivery will find the order terminal and ack it");
                    false
                }
            },
            Outcome::Nak(reason) => match self.message.ack_with(kind).await {
                Ok(()) => {
                    metrics::counter!(m::MESSAGES_NAKED, "reason" => reason.as_str()).increment(1);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot nak; the message is redelivered after its ack wait");
                    false
                }
            },
            Outcome::Term(reason) => match self.message.ack_with(kind).await {
                Ok(()) => {
                    metrics::counter!(m::MESSAGES_TERMINATED, "reason" => reason.as_str())
                        .increment(1);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot terminate the message");
                    false
                }
            },
            Outcome::Leave => false,
        };
        if let Some(name) = outcome.audit_name() {
            self.lease.settled(name);
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn outcomes() -> Vec<Outcome> {
        let mut all = vec![Outcome::Ack, Outcome::Leave];
        all.extend(NakReason::ALL.map(Outcome::Nak));
        all.extend(TermReason::ALL.map(Outcome::Term));
        all
    }

    #[test]
    fn nothing_is_sent_for_a_lease_that_ended() {
        for outcome in outcomes() {
            assert!(outcome.to_send(false).is_none(), "{outcome:?}");
        }
        assert!(Outcome::Leave.to_send(true).is_none());
        assert_eq!(Outcome::Leave.audit_name(), None);
    }

    #[test]
    fn a_held_lease_sends_what_its_outcome_says() {
        assert!(matches!(Outcome::Ack.to_send(true), Some(AckKind::Ack)));
        assert!(matches!(
            Outcome::Term(TermReason::Duplicate).to_send(true),
            Some(AckKind::Term)
        ));
        assert!(matches!(
            Outcome::Nak(NakReason::Shutdown).to_send(true),
            Some(AckKind::Nak(None))
        ));
        assert!(matches!(
            Outcome::Nak(NakReason::FetchError).to_send(true),
            Some(AckKind::Nak(None))
        ));
        assert!(matches!(
            Outcome::Nak(NakReason::StoreUnavailable).to_send(true),
            Some(AckKind::Nak(Some(d))) if d == RETRY_DELAY
        ));
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let naks: HashSet<&str> = NakReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(naks.len(), NakReason::ALL.len());
        let terms: HashSet<&str> = TermReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(terms.len(), TermReason::ALL.len());
        // The labels the dashboards and alerts were built on are still there.
        for label in ["shutdown", "store_unavailable", "over_batch"] {
            assert!(naks.contains(label), "{label}");
        }
        for label in [
            "invalid_id",
            "invalid_payload",
            "invalid_document",
            "no_metadata",
            "duplicate",
            "deliveries_exhausted",
        ] {
            assert!(terms.contains(label), "{label}");
        }
    }
}
