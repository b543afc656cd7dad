//! What a node does to NATS for one order that completes, written once: the floor replays exactly
//! this, so the ratio of the nodes to the floor is Orderly's own cost. When the node's writes change,
//! this list changes with them (a unit test keeps its index entries consistent with its states).
//!
//! Where each operation comes from in the node, for an order published straight into `ORDERS` and
//! run through its four steps with no failure:
//!
//! - the pull: `queue::pull` (`consumer.fetch().max_messages(free workers)`, 50 workers a node);
//! - the read: `queue::process` reads the document before creating it (`OrderStore::get`, a KV get
//!   that finds nothing);
//! - the writes: `queue::process` creates the `Queued` document (`OrderStore::create`, a KV create),
//!   then the pipeline writes under the lease (`engine::write`, `OrderStore::update`, a KV
//!   compare-and-set each): the claim with the start of the first step, each step's completion with
//!   the start of the next, and the last completion with the finish;
//! - the index: `OrderStore::create`/`update` publish an index entry, awaited, before each write that
//!   changes the state the index shows (`OrderIndex::announce`: here `Queued`, `Running`,
//!   `Completed`) and, once the write succeeded, purge the order's older entries in the background
//!   (`OrderIndex::settle`, a `STREAM.PURGE` request not awaited by the order), except after the
//!   create;
//! - the events: one core publish on `orders.events.<id>` after each write (`ops::events`);
//! - the ack: one double ack, waiting for the server's reply (`queue::settle`, `lease::confirm`).

use serde::Serialize;

/// One write of the order's document.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Write {
    /// What the write records.
    pub records: Change,
    /// The state the document is in after it.
    pub state: &'static str,
    /// Whether it changes the state the index shows: an entry is published before it and the
    /// order's older entries purged after it.
    pub indexed: bool,
}

/// What a write records in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The `Queued` document (a KV create).
    Create,
    /// The claim by the worker and the start of the first step (a compare-and-set).
    ClaimAndStart,
    /// The completion of step `n` (0-based) and the start of step `n + 1` (a compare-and-set).
    CompleteAndStart(usize),
    /// The completion of the last step and the order's end, `Completed` (a compare-and-set).
    CompleteAndFinish,
}

/// The operations of one completed order.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpMix {
    /// Messages pulled from the work-queue consumer.
    pub pulls: u32,
    /// KV gets before the create (the document is not there yet).
    pub kv_gets: u32,
    /// The document's writes, in order.
    pub writes: &'static [Write],
    /// Core publishes of an event after each write.
    pub events_per_write: u32,
    /// Double acks of the work message.
    pub double_acks: u32,
}

/// The node's operations per completed order, with steps that write their completion and the next
/// step's start together.
pub const ORDERLY: OpMix = OpMix {
    pulls: 1,
    kv_gets: 1,
    writes: &[
        Write {
            records: Change::Create,
            state: "Queued",
            indexed: true,
        },
        Write {
            records: Change::ClaimAndStart,
            state: "Running",
            indexed: true,
        },
        Write {
            records: Change::CompleteAndStart(0),
            state: "Running",
            indexed: false,
        },
        Write {
            records: Change::CompleteAndStart(1),
            state: "Running",
            indexed: false,
        },
        Write {
            records: Change::CompleteAndStart(2),
            state: "Running",
            indexed: false,
        },
        Write {
            records: Change::CompleteAndFinish,
            state: "Completed",
            indexed: true,
        },
    ],
    events_per_write: 1,
    double_acks: 1,
};

impl Write {
    /// Whether the order's older index entries are purged after it.
    pub fn purges(&self) -> bool {
        self.indexed && self.records != Change::Create
    }
}

impl OpMix {
    pub fn kv_creates(&self) -> usize {
        self.writes
            .iter()
            .filter(|w| w.records == Change::Create)
            .count()
    }

    pub fn kv_updates(&self) -> usize {
        self.writes.len() - self.kv_creates()
    }

    /// Index entries published (and awaited).
    pub fn index_publishes(&self) -> usize {
        self.writes.iter().filter(|w| w.indexed).count()
    }

    /// Index purges sent in the background: after each indexed write but the create, whose key
    /// was free (`OrderStore::create`).
    pub fn index_purges(&self) -> usize {
        self.writes.iter().filter(|w| w.purges()).count()
    }

    pub fn events(&self) -> usize {
        self.writes.len() * self.events_per_write as usize
    }

    /// The mix as figures, for the report.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "pulls": self.pulls,
            "kv_gets": self.kv_gets,
            "kv_creates": self.kv_creates(),
            "kv_updates": self.kv_updates(),
            "index_publishes": self.index_publishes(),
            "index_purges": self.index_purges(),
            "events": self.events(),
            "double_acks": self.double_acks,
            "writes": self.writes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_written_exactly_when_the_state_changes() {
        let mut shown: Option<&str> = None;
        for write in ORDERLY.writes {
            assert_eq!(write.indexed, shown != Some(write.state), "{write:?}");
            shown = Some(write.state);
        }
    }

    #[test]
    fn one_create_then_five_compare_and_sets() {
        assert_eq!(ORDERLY.writes[0].records, Change::Create);
        assert_eq!(ORDERLY.kv_creates(), 1);
        assert_eq!(ORDERLY.kv_updates(), 5);
        assert_eq!(ORDERLY.events(), 6);
        assert_eq!(ORDERLY.index_publishes(), 3);
        assert_eq!(ORDERLY.index_purges(), 2);
        assert_eq!(ORDERLY.writes.last().map(|w| w.state), Some("Completed"));
    }
}
