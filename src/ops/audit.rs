//! The lease audit: an opt-in JSON-lines log (`ORDERLY_AUDIT_LOG=path`) of every interval in which this
//! node held an order's lease and of every write it made to the order's document.
//!
//! One line per event, written with a single `write` call so that a line survives a `kill -9` of the
//! node the moment it is written:
//! - `create_sending`: the node is about to send a create of the order's document, at `sent`;
//! - `create`: the node created the order's document (revision `revision`);
//! - `claim`: the node claimed delivery `delivery` of the order; its interval starts at `start` (taken
//!   before the claim was sent);
//! - `sending`: the node is about to send a write under the lease for delivery `delivery` (`change`), at
//!   `sent`: if the node dies before the answer, this line still names the write;
//! - `commit`: a compare-and-set write under the lease (`change`, `step`), sent at `sent` and confirmed at
//!   `at` as revision `revision`;
//! - `unconfirmed`: a write under the lease whose answer did not come (in time): it may or may not have
//!   been applied;
//! - `lease_end`: the interval ended at `end` (the earlier of the moment the node let go and its
//!   self-fence deadline), and `why`;
//! - `settled`: the node acked, nakked or terminated the message (`outcome`), after the interval ended
//!   while the lease was still held;
//! - `give_up`: a node ended an order whose deliveries the server had exhausted, outside any lease.
//!
//! Times are RFC 3339 UTC with microseconds. The fault tests read these files to prove that no order's
//! intervals overlap across nodes and that no write lies outside its writer's interval.

use crate::domain::order::Step;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

/// Where the audit goes; a no-op unless a file was configured. Cheap to clone.
#[derive(Clone, Default)]
pub struct Audit {
    sink: Option<Arc<Sink>>,
}

struct Sink {
    node: String,
    file: Mutex<File>,
}

/// Why a lease interval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseEnd {
    /// The order reached a terminal state (or was found terminal).
    Finished,
    /// The node recorded its progress and handed the message back.
    Released,
    /// The node could not confirm the lease in time and stopped.
    Fenced,
    /// A compare-and-set failed: someone else wrote the order.
    Lost,
    /// The node stopped working on the order for another reason (a store error, a bad document).
    Dropped,
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    Create {
        revision: u64,
    },
    /// A create about to be sent.
    CreateSending {
        sent: Stamp,
    },
    /// A create whose answer the node did not get: it may have been stored.
    CreateUnconfirmed {
        sent: Stamp,
    },
    Claim {
        delivery: u32,
        stream_seq: u64,
        revision: u64,
        start: Stamp,
    },
    Sending {
        delivery: u32,
        change: &'a str,
        sent: Stamp,
    },
    Commit {
        delivery: u32,
        change: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<Step>,
        revision: u64,
        sent: Stamp,
    },
    Unconfirmed {
        delivery: u32,
        change: &'a str,
        sent: Stamp,
    },
    /// A write the store refused because the document had changed: it was certainly not applied.
    Refused {
        delivery: u32,
        change: &'a str,
        sent: Stamp,
    },
    LeaseEnd {
        delivery: u32,
        stream_seq: u64,
        end: Stamp,
        why: LeaseEnd,
    },
    Settled {
        delivery: u32,
        outcome: &'a str,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    node: &'a str,
    order_id: Uuid,
    #[serde(flatten)]
    event: Event<'a>,
    at: Stamp,
}

/// A wall-clock time as written in the audit.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(pub DateTime<Utc>);

impl Stamp {
    pub fn now() -> Stamp {
        Stamp(Utc::now())
    }

    /// The wall-clock time of a monotonic `instant`.
    pub fn of(instant: Instant) -> Stamp {
        let now = Instant::now();
        let wall = Utc::now();
        let shift = if instant >= now {
            chrono::Duration::from_std(instant - now)
        } else {
            chrono::Duration::from_std(now - instant).map(|d| -d)
        };
        Stamp(wall + shift.unwrap_or_default())
    }
}

impl Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

impl Audit {
    /// An audit that writes nothing.
    pub fn off() -> Audit {
        Audit::default()
    }

    /// Appends to `path`, creating it if needed.
    pub fn open(path: &Path, node: &str) -> std::io::Result<Audit> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Audit {
            sink: Some(Arc::new(Sink {
                node: node.to_owned(),
                file: Mutex::new(file),
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    pub fn created(&self, order_id: Uuid, revision: u64) {
        self.write(order_id, Event::Create { revision });
    }

    /// A create is about to be sent at `sent`.
    pub fn create_sending(&self, order_id: Uuid, sent: Stamp) {
        self.write(order_id, Event::CreateSending { sent });
    }

    /// A create sent at `sent` got no answer: the document may exist.
    pub fn create_unconfirmed(&self, order_id: Uuid, sent: Stamp) {
        self.write(order_id, Event::CreateUnconfirmed { sent });
    }

    pub fn claimed(
        &self,
        order_id: Uuid,
        delivery: u32,
        stream_seq: u64,
        revision: u64,
        start: Stamp,
    ) {
        self.write(
            order_id,
            Event::Claim {
                delivery,
                stream_seq,
                revision,
                start,
            },
        );
    }

    pub fn committed(
        &self,
        order_id: Uuid,
        delivery: u32,
        change: &str,
        step: Option<Step>,
        revision: u64,
        (sent, answered): (Stamp, Stamp),
    ) {
        // Stamped when the answer arrived (the lease was checked then), not when the line is written.
        self.write_at(
            order_id,
            Event::Commit {
                delivery,
                change,
                step,
                revision,
                sent,
            },
            answered,
        );
    }

    pub fn sending(&self, order_id: Uuid, delivery: u32, change: &str, sent: Stamp) {
        self.write(
            order_id,
            Event::Sending {
                delivery,
                change,
                sent,
            },
        );
    }

    pub fn unconfirmed(&self, order_id: Uuid, delivery: u32, change: &str, sent: Stamp) {
        self.write(
            order_id,
            Event::Unconfirmed {
                delivery,
                change,
                sent,
            },
        );
    }

    pub fn refused(&self, order_id: Uuid, delivery: u32, change: &str, sent: Stamp) {
        self.write(
            order_id,
            Event::Refused {
                delivery,
                change,
                sent,
            },
        );
    }

    pub fn lease_ended(
        &self,
        order_id: Uuid,
        delivery: u32,
        stream_seq: u64,
        end: Stamp,
        why: LeaseEnd,
    ) {
        self.write(
            order_id,
            Event::LeaseEnd {
                delivery,
                stream_seq,
                end,
                why,
            },
        );
    }

    pub fn settled(&self, order_id: Uuid, delivery: u32, outcome: &str) {
        self.write(order_id, Event::Settled { delivery, outcome });
    }

    fn write(&self, order_id: Uuid, event: Event<'_>) {
        self.write_at(order_id, event, Stamp::now());
    }

    fn write_at(&self, order_id: Uuid, event: Event<'_>, at: Stamp) {
        let Some(sink) = &self.sink else { return };
        let line = Line {
            node: &sink.node,
            order_id,
            event,
            at,
        };
        let mut bytes = serde_json::to_vec(&line).expect("an audit line always serializes");
        bytes.push(b'\n');
        let mut file = sink.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&bytes) {
            tracing::error!(error = %e, "cannot write the lease audit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_the_node_and_order() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&path, "node-a").expect("audit opens");
        let id = Uuid::now_v7();
        let start = Stamp::now();
        audit.claimed(id, 2, 7, 11, start);
        audit.committed(
            id,
            2,
            "start_step",
            Some(Step::PreProcessing),
            12,
            (start, Stamp::now()),
        );
        audit.lease_ended(id, 2, 7, Stamp::now(), LeaseEnd::Released);
        let text = std::fs::read_to_string(&path).expect("audit readable");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "claim");
        assert_eq!(lines[0]["node"], "node-a");
        assert_eq!(lines[0]["order_id"], id.to_string());
        assert_eq!(lines[0]["delivery"], 2);
        assert_eq!(lines[1]["step"], "Pre-Processing");
        assert_eq!(lines[1]["revision"], 12);
        assert_eq!(lines[2]["why"], "released");
        let end: DateTime<Utc> = lines[2]["end"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("end is RFC 3339");
        assert!(end >= start.0);
    }

    #[test]
    fn an_instant_maps_to_the_wall_clock() {
        let later = Instant::now() + std::time::Duration::from_secs(3);
        let gap = Stamp::of(later).0 - Utc::now();
        assert!((2900..=3000).contains(&gap.num_milliseconds()), "{gap}");
    }
}
