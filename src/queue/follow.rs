//! Following the shared consumer as it is now, not as it was when the node started.
//!
//! An operator can edit the `workers` consumer while nodes run (`nats consumer edit`), and the server
//! applies a new redelivery window at once, to deliveries already out. An operator (or a script) can
//! also delete it. The node therefore reads the consumer's configuration every [`POLL`]:
//! - a changed window is published to every lease at once ([`Windows`]): a shorter one shortens
//!   every lease, and one that has already run out ends it (the lease self-fences);
//! - a deleted consumer ends every lease at once (its deliveries are forgotten by the server), and
//!   so does one found created again since the last read (another node recreated it first); the
//!   consumer is created again, paused for longer than any old lease can last, so that no order
//!   is handed out again while a node may still be working on it. While it is missing the node takes
//!   no work and reports not ready, saying why.

use crate::engine::connection::Connection;
use crate::engine::window::{Windows, MIN_REPLICATED_WINDOW, WINDOW_METADATA};
use crate::ops::metrics as m;
use crate::ops::rate::RateLimited;
use crate::queue::setup::{consumer_config, Layout, CONSUMER};
use crate::task::Task;
use async_nats::jetstream::{consumer, context::ConsumerInfoErrorKind, stream::Stream};
use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the consumer's configuration is read.
pub const POLL: Duration = Duration::from_millis(250);

/// The shortest window that can be announced while orders run: leases shorten as soon as their node
/// reads the announcement, which is at most one heartbeat after the last in-progress ack and one poll
/// later, and must still have their margin left then. A replicated consumer's margin is wider.
pub fn safe_shrink(replicated: bool) -> Duration {
    if replicated {
        MIN_REPLICATED_WINDOW
    } else {
        Duration::from_secs(2)
    }
}

/// What the node knows of the consumer, for readiness and for the fetch loop.
#[derive(Clone, Default)]
pub struct Health {
    problem: Arc<Mutex<Option<String>>>,
}

impl Health {
    /// Why the node cannot take work now, if it cannot.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }
}

/// The windows of a consumer's configuration.
pub fn windows_of(info: &consumer::Info) -> Windows {
    let announced = info
        .config
        .metadata
        .get(WINDOW_METADATA)
        .and_then(|value| humantime::parse_duration(value.trim()).ok())
        .filter(|window| !window.is_zero());
    Windows {
        ack_wait: info.config.ack_wait,
        backoff: info.config.backoff.clone(),
        created: to_chrono(info.created),
        announced,
        replicated: info
            .cluster
            .as_ref()
            .is_some_and(|cluster| !cluster.replicas.is_empty()),
    }
}

fn to_chrono(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond()).unwrap_or_default()
}

/// Reads the consumer every [`POLL`] and keeps the node's [`Windows`] and [`Health`] equal to it.
pub struct Follow {
    stream: Stream,
    layout: Layout,
    windows: watch::Sender<Windows>,
    health: Health,
    /// Ended (as a lost connection ends them) when the consumer is deleted or changes leader.
    leases: Connection,
    /// The consumer's leader on a cluster, and since when.
    leader: Option<(String, Option<time::OffsetDateTime>)>,
}

/// Which server leads the consumer, and since when (`None` on a single server).
fn leader_of(info: &consumer::Info) -> Option<(String, Option<time::OffsetDateTime>)> {
    let cluster = info.cluster.as_ref()?;
    Some((cluster.leader.clone()?, cluster.leader_since))
}

impl Follow {
    pub fn new(
        stream: Stream,
        layout: Layout,
        first: &consumer::Info,
        leases: Connection,
    ) -> Follow {
        Follow {
            stream,
            layout,
            windows: watch::channel(windows_of(first)).0,
            health: Health::default(),
            leases,
            leader: leader_of(first),
        }
    }

    /// The windows leases read; always the consumer's latest.
    pub fn windows(&self) -> watch::Receiver<Windows> {
        self.windows.subscribe()
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// A new consumer leader works from the replicated state, which can lag behind the in-progress
    /// acks the old one confirmed: it may hand out an order whose holder's last heartbeats it never
    /// saw. Every lease taken before the change ends.
    /// `ended`: [`Follow::adopt`] already ended every lease and said why.
    fn follow_leader(
        &mut self,
        leader: Option<(String, Option<time::OffsetDateTime>)>,
        ended: bool,
    ) {
        if leader.is_some() && leader != self.leader {
            if self.leader.is_some() && !ended {
                tracing::warn!(
                    leader = leader.as_ref().map(|(name, _)| name.as_str()).unwrap_or_default(),
                    was = self.leader.as_ref().map(|(name, _)| name.as_str()).unwrap_or_default(),
                    "the consumer {CONSUMER} has a new leader: ending every lease taken under the old one"
                );
                self.leases.lost();
            }
            self.leader = leader;
        }
    }

    /// What in the consumer's configuration, as edited since the node started, this node cannot
    /// work with: it then takes no new work until the consumer is put right.
    fn incompatible(&self, info: &consumer::Info) -> Option<String> {
        let actual = &info.config;
        let wanted = consumer_config(self.layout);
        let mut wrong = Vec::new();
        let windows = windows_of(info);
        if windows.replicated && windows.shortest() < MIN_REPLICATED_WINDOW {
            wrong.push(format!(
                "its shortest window is {}, and a replicated consumer needs at least {}",
                humantime::format_duration(windows.shortest()),
                humantime::format_duration(MIN_REPLICATED_WINDOW)
            ));
        }
        if actual.ack_policy != wanted.ack_policy {
            wrong.push(format!("ack_policy is {:?}", actual.ack_policy));
        }
        if actual.filter_subject != wanted.filter_subject {
            wrong.push(format!("filter_subject is {:?}", actual.filter_subject));
        }
        if actual.max_deliver != wanted.max_deliver {
            wrong.push(format!(
                "max_deliver is {} (a limit strands orders in the stream)",
                actual.max_deliver
            ));
        }
        (!wrong.is_empty()).then(|| {
            format!(
                "consumer {CONSUMER} was changed: {}; see nats/README.md",
                wrong.join(", ")
            )
        })
    }

    /// Takes the consumer's configuration as read now, from a read that named `leader`. Returns
    /// whether it ended every lease because the consumer reports another creation time.
    fn adopt(&self, new: Windows, leader: &Option<(String, Option<time::OffsetDateTime>)>) -> bool {
        let old = self.windows.borrow().clone();
        if old == new {
            return false;
        }
        let recreated = old.created != new.created;
        if recreated {
            // The consumer was deleted and created again (by another node, or by an operator)
            // between two reads: every delivery this node holds came from the old one, which the
            // server has forgotten. Its in-progress acks would still be answered, so end the leases
            // here; the new consumer is paused for longer than a poll. On a cluster, a server that
            // restarted also reports a creation time of its own once it leads the consumer: the
            // leases end all the same (see `follow_leader`), and the line says both.
            if leader.is_some() && *leader == self.leader {
                tracing::error!("the consumer {CONSUMER} was created again: ending every lease taken through the old one");
            } else {
                tracing::warn!(
                    leader = leader.as_ref().map(|(name, _)| name.as_str()).unwrap_or_default(),
                    was = self.leader.as_ref().map(|(name, _)| name.as_str()).unwrap_or_default(),
                    created = %new.created,
                    was_created = %old.created,
                    "the consumer {CONSUMER} has a new leader, which reports another creation time (a restarted server does; so does a consumer created again): ending every lease taken through the old one"
                );
            }
            self.leases.lost();
        }
        if old.ack_wait == new.ack_wait
            && old.backoff == new.backoff
            && old.announced == new.announced
        {
            self.windows.send_replace(new);
            return recreated;
        }
        tracing::warn!(
            ack_wait = %humantime::format_duration(new.ack_wait),
            backoff = ?new.backoff,
            announced = ?new.announced,
            was_ack_wait = %humantime::format_duration(old.ack_wait),
            was_backoff = ?old.backoff,
            was_announced = ?old.announced,
            "the consumer's redelivery windows changed; leases follow them from now on"
        );
        let safe = safe_shrink(new.replicated);
        if new.announced.is_some_and(|a| a < safe) {
            tracing::error!(
                announced = ?new.announced,
                "a window shorter than {} was announced: a running lease may not learn of it in time",
                humantime::format_duration(safe)
            );
        }
        if new.server_shortest() < old.shortest() {
            // The server applies the shorter window at once to deliveries already out. A node that
            // is running learns of it within a poll; one that is paused or cut off does not, and its
            // lease may outlast the server's new deadline.
            tracing::error!(
                window = %humantime::format_duration(new.server_shortest()),
                was = %humantime::format_duration(old.shortest()),
                "the consumer's window was shortened without being announced first (metadata {WINDOW_METADATA}); a node that is paused or cut off now may still be working on an order the server hands out again. See nats/README.md, \"Changing the ack wait\""
            );
        }
        self.windows.send_replace(new);
        recreated
    }

    /// The consumer is gone: every delivery it made is forgotten by the server. End every lease,
    /// then create it again, paused until no old lease can still be running.
    async fn recreate(&self) {
        let problem = format!("consumer {CONSUMER} is missing; recreating it");
        if self.health.problem().as_deref() != Some(problem.as_str()) {
            tracing::error!(
                "the consumer {CONSUMER} was deleted: ending every lease and recreating it"
            );
            self.health.set(Some(problem));
        }
        self.leases.lost();
        let longest = self
            .windows
            .borrow()
            .longest()
            .max(self.layout.ack_wait * 4);
        let paused_for = longest + Duration::from_secs(1);
        let mut config = consumer_config(self.layout);
        config.pause_until = Some(time::OffsetDateTime::now_utc() + paused_for);
        let started = Instant::now();
        match self.stream.create_consumer(config).await {
            Ok(_) => tracing::warn!(
                paused_for = %humantime::format_duration(paused_for),
                took_ms = started.elapsed().as_millis() as u64,
                "recreated the consumer {CONSUMER}, paused until every old lease has ended"
            ),
            // Another node recreated it first: its next read finds it.
            Err(e) => {
                tracing::info!(error = %e, "did not recreate the consumer (another node may have)")
            }
        }
    }
}

impl Task for Follow {
    const NAME: &'static str = "consumer follower";

    async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut errors = RateLimited::new(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(POLL) => {}
            }
            match self.stream.consumer_info(CONSUMER).await {
                Ok(info) => {
                    let problem = self.incompatible(&info).or_else(|| {
                        info.paused.then(|| {
                            let remaining = info.pause_remaining.unwrap_or_default();
                            format!(
                                "consumer {CONSUMER} is paused for another {}",
                                humantime::format_duration(Duration::from_secs(
                                    remaining.as_secs()
                                ))
                            )
                        })
                    });
                    if problem.is_some() && problem != self.health.problem() {
                        tracing::error!(
                            problem = problem.as_deref().unwrap_or_default(),
                            "not taking work"
                        );
                    }
                    self.health.set(problem);
                    let leader = leader_of(&info);
                    let ended = self.adopt(windows_of(&info), &leader);
                    self.follow_leader(leader, ended);
                }
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                    self.recreate().await;
                }
                Err(e) => {
                    metrics::counter!(m::QUEUE_POLL_ERRORS).increment(1);
                    if let Some(skipped) = errors.allow() {
                        tracing::warn!(error = %e, skipped, "cannot read the consumer's configuration; leases keep their own deadlines");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::window::LeaseTiming;

    #[test]
    fn a_shrink_to_the_safe_length_is_learnt_before_the_server_can_redeliver() {
        // The server may redeliver at last heartbeat + new window; the node learns at most one
        // heartbeat and one poll after that heartbeat, and must still be inside its margin.
        for replicated in [false, true] {
            let timing = LeaseTiming::for_window(safe_shrink(replicated), replicated);
            let learnt = crate::engine::window::MAX_HEARTBEAT + POLL;
            assert!(
                learnt < timing.window - timing.margin,
                "{learnt:?} vs {timing:?}"
            );
        }
    }
}
