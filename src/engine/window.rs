//! The consumer's redelivery windows as a node knows them, and the timing of a lease they give: how
//! often to send heartbeats, and how long before the window ends to stop.

use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::watch;

/// The longest interval between two in-progress acks, whatever the window. A window shortened while
/// orders run takes effect on the server at once, counted from the last in-progress ack it received;
/// the node learns of it within the consumer poll (`follow::POLL`). Frequent heartbeats keep that sum
/// well inside any window an operator may set (see `follow::safe_shrink`).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(1);

/// How much earlier than its old leader a replicated consumer's new leader may date a delivery, at
/// most, besides in-progress acks lost with the old leader. A server that restarts, or catches up
/// from a snapshot, restores the consumer's pending deliveries from its stored state, which keeps
/// their times to the whole second, rounded down (nats-server `encodeConsumerState`: "Downsample to
/// seconds"); if it then becomes leader it redelivers up to a second early.
pub const REPLICA_LAG: Duration = Duration::from_secs(1);

/// The shortest ack wait a replicated consumer may have: its margin ([`LeaseTiming`]) takes a
/// second and two heartbeats, and what is left must still hold a heartbeat's delay and a poll.
pub const MIN_REPLICATED_WINDOW: Duration = Duration::from_secs(3);

/// The consumer's redelivery windows, as the node last read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    pub ack_wait: Duration,
    /// With a backoff list the server uses `backoff[n-1]` for delivery n (the last entry repeats)
    /// and ignores `ack_wait`.
    pub backoff: Vec<Duration>,
    /// When the consumer was created: a claim older than this was made through a consumer that no
    /// longer exists.
    pub created: DateTime<Utc>,
    /// A shorter window announced in the consumer's metadata ([`WINDOW_METADATA`]) before the
    /// consumer's own windows are shortened: leases use it at once, so that by the time the server
    /// applies the shorter window no lease counts on the longer one, even on a node that was paused.
    pub announced: Option<Duration>,
    /// The consumer has replicas: another server may become its leader while leases run.
    pub replicated: bool,
}

/// The consumer metadata key that announces a shorter window (`nats consumer edit ORDERS workers
/// --metadata orderly_window:2s`): see "Changing the ack wait" in nats/README.md.
pub const WINDOW_METADATA: &str = "orderly_window";

impl Windows {
    /// Windows of a consumer with no backoff list.
    pub fn fixed(ack_wait: Duration) -> Windows {
        Windows {
            ack_wait,
            backoff: Vec::new(),
            created: DateTime::<Utc>::MIN_UTC,
            announced: None,
            replicated: false,
        }
    }

    /// The timing a lease on delivery `delivered` must keep to: the consumer's window for it, or the
    /// announced one if that is shorter.
    pub fn timing(&self, delivered: u32) -> LeaseTiming {
        let window = LeaseTiming::window_for_delivery(self.ack_wait, &self.backoff, delivered);
        LeaseTiming::for_window(
            self.announced.map_or(window, |a| a.min(window)),
            self.replicated,
        )
    }

    /// The shortest window the server itself gives any delivery.
    pub fn server_shortest(&self) -> Duration {
        self.backoff.iter().copied().min().unwrap_or(self.ack_wait)
    }

    /// The shortest window a lease keeps to.
    pub fn shortest(&self) -> Duration {
        let server = self.server_shortest();
        self.announced.map_or(server, |a| a.min(server))
    }

    /// The longest window any delivery gets.
    pub fn longest(&self) -> Duration {
        self.backoff.iter().copied().max().unwrap_or(self.ack_wait)
    }

    /// A source of windows that never changes (for tools and tests).
    pub fn constant(self) -> watch::Receiver<Windows> {
        watch::channel(self).1
    }
}

/// The timing of a lease, derived from the redelivery window in force for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long the server waits before redelivering.
    pub window: Duration,
    /// How often the holder sends an in-progress ack.
    pub heartbeat: Duration,
    /// How long before the window ends the holder stops working.
    pub margin: Duration,
}

impl LeaseTiming {
    /// The timing for `window`, on a consumer that is `replicated` or not.
    pub fn for_window(window: Duration, replicated: bool) -> LeaseTiming {
        let heartbeat = (window / 10).min(MAX_HEARTBEAT);
        let margin = if replicated {
            // The server answers an in-progress ack before its replicas have it: a new leader may
            // not know of the last two the holder saw confirmed, and may date the one before to
            // the whole second.
            (window / 5).max(REPLICA_LAG + heartbeat * 2)
        } else {
            window / 5
        };
        LeaseTiming {
            window,
            heartbeat,
            margin,
        }
    }

    /// The redelivery window in force for delivery number `delivered` (1 = first): `backoff[n-1]`
    /// (the last entry once past the end) when the consumer has a backoff list, else `ack_wait`.
    pub fn window_for_delivery(
        ack_wait: Duration,
        backoff: &[Duration],
        delivered: u32,
    ) -> Duration {
        match backoff {
            [] => ack_wait,
            list => {
                let index = (delivered.max(1) as usize - 1).min(list.len() - 1);
                list[index]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_backoff_when_set() {
        let ack_wait = Duration::from_secs(30);
        assert_eq!(LeaseTiming::window_for_delivery(ack_wait, &[], 3), ack_wait);
        let backoff = [Duration::from_secs(5), Duration::from_secs(10)];
        assert_eq!(
            LeaseTiming::window_for_delivery(ack_wait, &backoff, 1),
            Duration::from_secs(5)
        );
        assert_eq!(
            LeaseTiming::window_for_delivery(ack_wait, &backoff, 2),
            Duration::from_secs(10)
        );
        assert_eq!(
            LeaseTiming::window_for_delivery(ack_wait, &backoff, 9),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn a_replicated_consumer_widens_the_margin() {
        let single = LeaseTiming::for_window(Duration::from_secs(30), false);
        let replicated = LeaseTiming::for_window(Duration::from_secs(30), true);
        assert_eq!(
            single, replicated,
            "a long window's fifth covers it already"
        );
        let short = LeaseTiming::for_window(MIN_REPLICATED_WINDOW, true);
        assert!(
            short.margin >= REPLICA_LAG + short.heartbeat * 2,
            "{short:?}"
        );
        // What is left still holds several heartbeats.
        assert!(
            short.window - short.margin >= short.heartbeat * 4,
            "{short:?}"
        );
        let mut windows = Windows::fixed(MIN_REPLICATED_WINDOW);
        windows.replicated = true;
        assert_eq!(windows.timing(1), short);
    }
}
