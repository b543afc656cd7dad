//! Reads the nodes' lease audits (`ORDERLY_AUDIT_LOG`) and the orders' revision history, and checks the
//! two guarantees order by order:
//! - every order is terminal, and exactly one revision of its history is terminal;
//! - no two lease intervals of one order overlap, across all nodes;
//! - every write a node made lies inside its own interval, by the node's clock and by the server's
//!   timestamp of the revision; every revision in the history was written by someone the audit names;
//! - a node acks, naks or terminates a message only after letting go of a lease it still held;
//! - no step recorded complete was started again.

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

/// How far a stamp converted from a monotonic deadline may be off from a direct clock read.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::microseconds(200);

/// Every complete line of every audit file. A last line without its newline is one the node is still
/// writing while the file is read; it is left for the next read.
pub fn read(paths: &[&Path]) -> Vec<Value> {
    let mut lines = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            lines.push(serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("audit line of {} is not JSON ({e}): {line}", path.display())
            }));
        }
    }
    lines
}

fn stamp(line: &Value, field: &str) -> DateTime<Utc> {
    line[field]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("audit line without a time in {field}: {line}"))
}

/// One node's hold on one delivery of an order.
#[derive(Debug, Clone)]
pub struct Interval {
    pub node: String,
    pub delivery: u64,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// `finished`, `released`, `fenced`, `lost`, `dropped`, or `died` for a node the test killed.
    pub why: String,
}

/// One order handed from one node to the next.
#[derive(Debug, Clone)]
pub struct Handover {
    pub order_id: Uuid,
    pub from: Interval,
    pub to: Interval,
}

/// What the check found besides violations (which panic).
#[derive(Debug, Default)]
pub struct Report {
    pub orders: usize,
    pub intervals: usize,
    pub handovers: Vec<Handover>,
    /// Step runs beyond the first, from the final documents' `runs`: steps started again after their
    /// node stopped in the middle of them.
    pub steps_rerun: usize,
    pub given_up: usize,
    /// Writes a node sent without getting an answer, which the server did apply (inside the node's
    /// interval).
    pub unconfirmed_applied: usize,
    /// Of those, writes the server stored after their sender's interval ended (and before anyone
    /// else's began).
    pub unconfirmed_applied_late: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Revisions that recorded a cancel request (written without a lease, by the node that took
    /// the request).
    pub cancels_recorded: usize,
    /// Claims whose answer never came and which the server's history shows were not applied.
    pub claims_never_applied: usize,
    /// Handovers of retried orders whose intervals overlap on the clock, but where every write of
    /// the first holder was stored before the second holder's first write was sent.
    pub handovers_by_revision: usize,
}

impl Report {
    /// Handovers that started from an interval ended with `why`.
    pub fn handovers_after(&self, why: &str) -> Vec<&Handover> {
        self.handovers
            .iter()
            .filter(|h| h.from.why == why)
            .collect()
    }
}

/// From one time to another.
pub type Span = (DateTime<Utc>, DateTime<Utc>);

/// What the test did outside the nodes: nodes it killed (and when: a node restarted under the same id
/// can die more than once), and revisions it wrote itself.
#[derive(Debug, Default)]
pub struct Outside {
    pub died: HashMap<String, Vec<DateTime<Utc>>>,
    /// When nodes were stopped (SIGSTOP): from when the test saw the node stopped until it sent
    /// SIGCONT, or killed it.
    pub stopped: HashMap<String, Vec<Span>>,
    pub revisions: HashSet<u64>,
}

impl Outside {
    /// `node` was stopped from `from` to `to`.
    pub fn stopped(&mut self, node: &str, from: DateTime<Utc>, to: DateTime<Utc>) {
        self.stopped
            .entry(node.to_owned())
            .or_default()
            .push((from, to));
    }

    /// The parts of `interval` in which its node ran: a node that died without recording the end
    /// of its lease is taken to have held it until it died, but it did nothing while it was stopped.
    /// A part cut short by a stop ends as `stopped`.
    fn running_parts(&self, interval: &Interval) -> Vec<Interval> {
        if !interval.why.starts_with("died") {
            return vec![interval.clone()];
        }
        let mut stops: Vec<Span> = self
            .stopped
            .get(&interval.node)
            .into_iter()
            .flatten()
            .copied()
            .filter(|(from, to)| *from < interval.end && *to > interval.start)
            .collect();
        stops.sort();
        let mut parts = Vec::new();
        let mut start = interval.start;
        for (from, to) in stops {
            if from > start {
                parts.push(Interval {
                    start,
                    end: from,
                    why: "stopped".to_owned(),
                    ..interval.clone()
                });
            }
            start = start.max(to);
        }
        if start < interval.end {
            parts.push(Interval {
                start,
                ..interval.clone()
            });
        }
        parts
    }

    /// The first time `node` was killed at or after `since`.
    fn death_after(&self, node: &str, since: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.died
            .get(node)?
            .iter()
            .copied()
            .filter(|died| *died >= since)
            .min()
    }
}

/// Checks `ids` against the audit `lines` and the `orders` bucket. Panics on the first violation.
pub async fn check(orders: &kv::Store, ids: &[Uuid], lines: &[Value], outside: &Outside) -> Report {
    let mut by_order: HashMap<Uuid, Vec<&Value>> = HashMap::new();
    for line in lines {
        let id: Uuid = line["order_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("audit line without an order id: {line}"));
        by_order.entry(id).or_default().push(line);
    }
    let mut report = Report {
        orders: ids.len(),
        ..Report::default()
    };
    for id in ids {
        let lines = by_order.remove(id).unwrap_or_default();
        check_order(orders, *id, &lines, outside, &mut report, Attempts::One).await;
    }
    report
}

/// Checks the leases of orders that were cancelled and retried many times: no two intervals of an
/// order overlap. Their writes and settlements are not held to intervals (each retry's message is
/// delivery 1 again, and those lines do not name their message), nor their histories (the bucket
/// keeps 32 revisions of an order, fewer than such an order has).
pub async fn check_leases(
    orders: &kv::Store,
    ids: &[Uuid],
    lines: &[Value],
    outside: &Outside,
) -> Report {
    let mut report = Report {
        orders: ids.len(),
        ..Report::default()
    };
    for id in ids {
        let key = id.to_string();
        let lines: Vec<&Value> = lines
            .iter()
            .filter(|l| l["order_id"].as_str() == Some(key.as_str()))
            .collect();
        check_order(orders, *id, &lines, outside, &mut report, Attempts::Many).await;
    }
    report
}

/// How many attempts the orders checked may have had.
#[derive(Clone, Copy, PartialEq)]
enum Attempts {
    /// One: the whole history is checked.
    One,
    /// Any number (they were retried): the leases alone are checked.
    Many,
}

async fn check_order(
    orders: &kv::Store,
    id: Uuid,
    lines: &[&Value],
    outside: &Outside,
    report: &mut Report,
    attempts: Attempts,
) {
    let revisions = history(orders, id).await;
    // The holders the server's history shows, and from when it shows every revision (the bucket
    // keeps the last 32 of an order).
    let holders: HashSet<(String, u64, u64)> = revisions
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.value).ok())
        .filter_map(|doc| {
            let owner = &doc["owner"];
            Some((
                owner["node"].as_str()?.to_owned(),
                owner["delivery"].as_u64()?,
                owner["stream_seq"].as_u64()?,
            ))
        })
        .collect();
    let complete_since = revisions.first().map(|r| {
        if r.revision == 1 {
            DateTime::<Utc>::MIN_UTC
        } else {
            r.written
        }
    });

    // Intervals, from claims and their ends; those of claims that were never applied apart.
    let mut intervals: Vec<Interval> = Vec::new();
    let mut never_held: Vec<Interval> = Vec::new();
    let mut claimed: Vec<(&Value, Interval)> = Vec::new();
    for (at, claim) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l["event"] == "claim")
    {
        let node = claim["node"].as_str().expect("node").to_owned();
        let delivery = claim["delivery"].as_u64().expect("delivery");
        let stream_seq = claim["stream_seq"].as_u64();
        // A claim whose answer never came is recorded with revision 0: it may have been applied.
        // When the history holds every revision since the claim was sent and none shows it, it
        // was not, and the node never held the order under it.
        let never_applied = claim["revision"].as_u64() == Some(0)
            && complete_since.is_some_and(|since| since <= stamp(claim, "start"))
            && stream_seq.is_some_and(|seq| !holders.contains(&(node.clone(), delivery, seq)));
        let not_held = never_applied;
        let start = stamp(claim, "start");
        // The node's own lines are in the order it wrote them: its claim's end is the next end it
        // wrote for that delivery (a server that lost a delivery can hand out the same number again).
        // Two messages of one order can both be at delivery 1 on one node: the end names the
        // message too.
        let end = lines[at + 1..].iter().find(|l| {
            l["event"] == "lease_end"
                && l["node"] == claim["node"]
                && l["delivery"] == delivery
                && (l["stream_seq"].is_null() || l["stream_seq"].as_u64() == stream_seq)
        });
        let (end, why) = match (end, outside.death_after(&node, start)) {
            (Some(end), _) => (stamp(end, "end"), end["why"].as_str().expect("why").to_owned()),
            (None, Some(died)) => (died, "died".to_owned()),
            (None, None) => panic!(
                "order {id}: the interval of {node} (delivery {delivery}) never ended, and the node was not killed"
            ),
        };
        assert!(
            end >= start,
            "order {id}: interval of {node} ends before it starts"
        );
        let interval = Interval {
            node,
            delivery,
            start,
            end,
            why,
        };
        if not_held {
            // Its acks and naks still fall in it; it overlaps nobody, as it held nothing.
            report.claims_never_applied += 1;
            never_held.push(interval);
        } else {
            claimed.push((claim, interval));
        }
    }
    // A retried order's history is cut to the bucket's last 32 revisions, so a claim whose answer
    // never came can seldom be shown not applied. Applied or not, its node did no work on the order
    // until one of its writes was confirmed: a worker runs no step after an unanswered write, and
    // reads the order again before it goes on. Its interval of work starts at that write; without
    // one, it did none. (A commit names no message: one made inside the interval of another of the
    // node's messages at the same delivery is taken for that message's.)
    for (at, (claim, interval)) in claimed.iter().enumerate() {
        if attempts == Attempts::One || claim["revision"].as_u64() != Some(0) {
            intervals.push(interval.clone());
            continue;
        }
        let others: Vec<&Interval> = claimed
            .iter()
            .enumerate()
            .filter(|(other, (_, i))| {
                *other != at && i.node == interval.node && i.delivery == interval.delivery
            })
            .map(|(_, (_, i))| i)
            .collect();
        let first_confirmed = lines
            .iter()
            .filter(|l| {
                l["event"] == "commit"
                    && l["node"] == interval.node.as_str()
                    && l["delivery"] == interval.delivery
            })
            .map(|l| stamp(l, "sent"))
            .filter(|sent| *sent >= interval.start && *sent <= interval.end)
            .filter(|sent| !others.iter().any(|o| o.start <= *sent && *sent <= o.end))
            .min();
        never_held.push(interval.clone());
        if let Some(start) = first_confirmed {
            intervals.push(Interval {
                start,
                ..interval.clone()
            });
        }
    }
    // A node killed while its first write under a delivery (its claim) was in flight recorded no
    // claim, only the sending: if that write was applied, the node held the order from the sending
    // until it died.
    let refused: HashSet<(Option<&str>, Option<&str>)> = lines
        .iter()
        .filter(|l| l["event"] == "refused")
        .map(|l| (l["node"].as_str(), l["sent"].as_str()))
        .collect();
    for sending in lines.iter().filter(|l| l["event"] == "sending") {
        let node = sending["node"].as_str().expect("node");
        if refused.contains(&(Some(node), sending["sent"].as_str())) {
            // The store refused it: the document had changed, nothing was written.
            continue;
        }
        let delivery = sending["delivery"].as_u64().expect("delivery");
        let sent = stamp(sending, "sent");
        let covered = intervals
            .iter()
            .chain(&never_held)
            .any(|i| i.node == node && i.delivery == delivery && i.start <= sent);
        if covered {
            continue;
        }
        if let Some(died) = outside.death_after(node, sent) {
            intervals.push(Interval {
                node: node.to_owned(),
                delivery,
                start: sent,
                end: died,
                why: "died while claiming".to_owned(),
            });
        }
    }
    intervals.sort_by_key(|i| i.start);
    let mut running: Vec<Interval> = intervals
        .iter()
        .flat_map(|i| outside.running_parts(i))
        .collect();
    running.sort_by_key(|i| i.start);
    for pair in running.windows(2) {
        if pair[0].why == "stopped"
            && pair[0].node == pair[1].node
            && pair[0].delivery == pair[1].delivery
            && pair[0].end <= pair[1].start
        {
            // The same holder, stopped and running again: no handover.
            continue;
        }
        if pair[0].end > pair[1].start
            && attempts == Attempts::Many
            && written_before(lines, &pair[0], &pair[1])
        {
            // A retry's message can reach a node while the node before it still waits for the
            // answer to its last write: the two spans overlap on the clock only.
            report.handovers_by_revision += 1;
            report.handovers.push(Handover {
                order_id: id,
                from: pair[0].clone(),
                to: pair[1].clone(),
            });
            continue;
        }
        assert!(
            pair[0].end <= pair[1].start,
            "order {id}: lease intervals overlap: {:?} and {:?}\n{}",
            pair[0],
            pair[1],
            account(lines, &revisions)
        );
        report.handovers.push(Handover {
            order_id: id,
            from: pair[0].clone(),
            to: pair[1].clone(),
        });
    }
    report.intervals += intervals.len();
    if attempts == Attempts::Many {
        // Each retry's message is delivery 1 again, and only claims and lease ends name their
        // message: the writes and settlements of a retried order cannot be told apart by message.
        return;
    }
    let interval_of = |line: &Value| -> &Interval {
        // The latest interval of the line's node and delivery that began before the line was written.
        let at = stamp(line, "at");
        intervals
            .iter()
            .chain(&never_held)
            .filter(|i| line["node"] == i.node.as_str() && line["delivery"] == i.delivery)
            .filter(|i| i.start <= at)
            .max_by_key(|i| i.start)
            .unwrap_or_else(|| {
                panic!(
                    "order {id}: a write outside any claim of its node: {line}\n{}",
                    account(lines, &revisions)
                )
            })
    };

    // Writes, by revision; and the writes that were answered, by node and sending time.
    let mut writes: HashMap<u64, &Value> = HashMap::new();
    let confirmed: HashSet<(Option<&str>, Option<&str>)> = lines
        .iter()
        .filter(|l| l["event"] == "commit")
        .map(|l| (l["node"].as_str(), l["sent"].as_str()))
        .collect();
    for line in lines
        .iter()
        .filter(|l| matches!(l["event"].as_str(), Some("create" | "commit")))
    {
        let revision = line["revision"].as_u64().expect("revision");
        writes.insert(revision, line);
        if line["event"] == "commit" {
            let interval = interval_of(line);
            assert!(
                stamp(line, "sent") >= interval.start
                    && stamp(line, "at") <= interval.end + CLOCK_SLACK,
                "order {id}: a write outside its node's interval {interval:?}: {line}\n{}",
                account(lines, &revisions)
            );
        }
        if line["change"] == "give_up" {
            // Written under the lease of the delivery that gave the order up, so held to its
            // interval like every commit above.
            report.given_up += 1;
        }
    }

    // A node acks, naks or terminates only a message whose lease it let go while still holding it.
    for settled in lines.iter().filter(|l| l["event"] == "settled") {
        let interval = interval_of(settled);
        assert!(
            matches!(interval.why.as_str(), "finished" | "released" | "dropped"),
            "order {id}: {} settled a message whose lease had ended as {}: {settled}\n{}",
            interval.node,
            interval.why,
            account(lines, &revisions)
        );
        assert!(
            stamp(settled, "at") >= interval.end,
            "order {id}: settled before its interval ended: {settled}\n{}",
            account(lines, &revisions)
        );
    }

    // No step recorded complete was started again, by the nodes' own account.
    let mut commits: Vec<&&Value> = lines.iter().filter(|l| l["event"] == "commit").collect();
    commits.sort_by_key(|l| l["revision"].as_u64());
    let mut completed = HashSet::new();
    for commit in commits {
        let step = commit["step"].as_str().unwrap_or_default().to_owned();
        let change = commit["change"].as_str().unwrap_or_default();
        // A write can carry the next transition: `complete_step+start_step` completes the step
        // before the one it starts, `complete_step+finish` the last one.
        let parts: Vec<&str> = change.split('+').collect();
        for part in &parts {
            match *part {
                "start_step" => assert!(
                    !completed.contains(&step),
                    "order {id}: step {step} was started again after it completed: {commit}"
                ),
                "complete_step" => {
                    let done = match parts.get(1) {
                        Some(&"start_step") => previous_step(&step),
                        Some(&"finish") => STEPS[3],
                        _ => step.as_str(),
                    };
                    completed.insert(done.to_owned());
                }
                _ => {}
            }
        }
    }

    // The server's history: each revision was written by someone the audit names, inside their
    // interval by the server's clock, and exactly one revision is terminal.
    let mut terminal = 0;
    let mut last_state = String::new();
    let mut last_doc = Value::Null;
    // By the server's account too: no revision shows a step running again after one showed it complete.
    let mut completed_steps = HashSet::new();
    // The first revision that holds an accepted cancel: no step starts after it.
    let mut cancelled_from: Option<Value> = None;
    let mut previous = Value::Null;
    for (index, entry) in revisions.iter().enumerate() {
        let written = entry.written;
        if let Ok(doc) = serde_json::from_slice::<Value>(&entry.value) {
            let state = doc["state"].as_str().unwrap_or_default().to_owned();
            if matches!(state.as_str(), "Completed" | "Failed" | "Cancelled") {
                terminal += 1;
            }
            if let Some(cancelling) = &cancelled_from {
                assert!(
                    no_step_started_since(cancelling, &doc),
                    "order {id}: revision {} starts a step after the cancel was recorded in {cancelling}",
                    entry.revision
                );
            } else if matches!(state.as_str(), "Cancelling" | "Cancelled") {
                cancelled_from = Some(doc.clone());
            }
            for step in doc["steps"].as_array().into_iter().flatten() {
                let name = step["step_name"].as_str().unwrap_or_default().to_owned();
                match step["status"].as_str() {
                    Some("Completed") => {
                        completed_steps.insert(name);
                    }
                    Some("Running") => assert!(
                        !completed_steps.contains(&name),
                        "order {id}: revision {} runs step {name} again after it completed",
                        entry.revision
                    ),
                    _ => {}
                }
            }
            last_state = state;
            last_doc = doc;
        }
        let doc = serde_json::from_slice::<Value>(&entry.value).unwrap_or(Value::Null);
        let requested = is_cancel_request(&previous, &doc);
        previous = doc;
        if outside.revisions.contains(&entry.revision) {
            continue;
        }
        if requested {
            // A cancel recorded by whoever took the request: no lease, no audit line.
            report.cancels_recorded += 1;
            continue;
        }
        // A create whose answer its node never got (or that was in flight when the node died)
        // explains the first revision, if it was sent before the revision was stored (a create
        // needs no lease: the key was free).
        if index == 0
            && !writes.contains_key(&entry.revision)
            && lines.iter().any(|l| {
                matches!(
                    l["event"].as_str(),
                    Some("create_unconfirmed" | "create_sending")
                ) && stamp(l, "sent") <= written
            })
        {
            continue;
        }
        let Some(line) = writes.get(&entry.revision) else {
            // A write whose answer the node never got: the node sent it inside its interval, and the
            // server stored it before any later holder's interval began. (A write held up in the
            // network, or in the client across a reconnect, can arrive after its sender fenced; the
            // compare-and-set then refuses it if another node claimed the order in between.)
            let explained = lines
                .iter()
                .filter(|l| {
                    // Unanswered, or in flight when its node died: a sending no commit answered.
                    l["event"] == "unconfirmed"
                        || l["event"] == "sending"
                            && !confirmed.contains(&(l["node"].as_str(), l["sent"].as_str()))
                })
                .find(|l| {
                    let interval = interval_of(l);
                    let sent = stamp(l, "sent");
                    sent <= written
                        && sent >= interval.start
                        && sent <= interval.end + CLOCK_SLACK
                        && intervals
                            .iter()
                            .filter(|later| later.start > interval.start)
                            .all(|later| later.start >= written)
                })
                .map(|l| written > interval_of(l).end + CLOCK_SLACK);
            if explained == Some(true) {
                report.unconfirmed_applied_late += 1;
            }
            let explained = explained.is_some();
            assert!(
                explained,
                "order {id}: revision {} (written {written}) is in no node's audit: {}\naudit:\n{}",
                entry.revision,
                String::from_utf8_lossy(&entry.value),
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            report.unconfirmed_applied += 1;
            continue;
        };
        if line["event"] == "commit" {
            let interval = interval_of(line);
            assert!(
                written >= interval.start && written <= interval.end + CLOCK_SLACK,
                "order {id}: revision {} was stored at {written}, outside its writer's interval {interval:?}",
                entry.revision
            );
        }
    }
    assert_eq!(
        terminal, 1,
        "order {id}: {terminal} terminal revisions in its history (last state {last_state})"
    );
    report.steps_rerun += last_doc["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| s["runs"].as_u64().unwrap_or(1).saturating_sub(1) as usize)
                .sum::<usize>()
        })
        .unwrap_or_default();
    match last_state.as_str() {
        "Completed" => report.completed += 1,
        "Failed" => report.failed += 1,
        "Cancelled" => report.cancelled += 1,
        other => panic!("order {id} ended in state {other:?}"),
    }
}

/// Whether `doc` is `previous` with a cancel recorded and nothing a lease holder decides changed: the
/// same steps, owner, attempt and delivery; only the state (to `Cancelling`, or `Cancelled` for an
/// order nobody had picked up), the intent, and the times that go with them.
fn is_cancel_request(previous: &Value, doc: &Value) -> bool {
    if previous.is_null()
        || doc["intent"]["kind"] != "cancel"
        || previous["intent"] == doc["intent"]
    {
        return false;
    }
    let state_ok = match doc["state"].as_str() {
        Some("Cancelling") => matches!(previous["state"].as_str(), Some("Running" | "Queued")),
        Some("Cancelled") => previous["state"] == "Queued" && doc["steps"] == serde_json::json!([]),
        _ => false,
    };
    let kept = [
        "steps",
        "owner",
        "attempt",
        "message_seq",
        "retries",
        "payload",
        "start_time",
    ]
    .iter()
    .all(|field| previous[field] == doc[field]);
    state_ok && kept
}

/// Whether `doc` started no step that `cancelling` (the revision that recorded the cancel) had not
/// started: no new step record, no step started again.
fn no_step_started_since(cancelling: &Value, doc: &Value) -> bool {
    let before = cancelling["steps"].as_array().cloned().unwrap_or_default();
    let after = doc["steps"].as_array().cloned().unwrap_or_default();
    after.len() == before.len()
        && before
            .iter()
            .zip(&after)
            .all(|(b, a)| b["step_start_time"] == a["step_start_time"] && b["runs"] == a["runs"])
}

/// Whether `first` let the order go of its own accord, every write it sent was either refused or
/// stored under a revision older than the write that opened `then`, and `then` opened with a
/// confirmed write. A compare-and-set succeeds only on the revision its sender read last, so the
/// node of `then` had read a revision at least as new as `first`'s last write before it sent its
/// own: `first` had done all it did to the order by then. (After its last write a node only settles
/// its own message, which for a retried order is not the message `then` holds.)
fn written_before(lines: &[&Value], first: &Interval, then: &Interval) -> bool {
    if !matches!(first.why.as_str(), "finished" | "released") {
        return false;
    }
    let of =
        |i: &Interval, l: &&&Value| l["node"] == i.node.as_str() && l["delivery"] == i.delivery;
    let Some(opened) = lines
        .iter()
        .filter(|l| l["event"] == "commit" && of(then, l) && stamp(l, "sent") == then.start)
        .find_map(|l| l["revision"].as_u64())
    else {
        return false;
    };
    let answered = |event: &str, sending: &Value| {
        lines
            .iter()
            .find(|l| l["event"] == event && of(first, l) && l["sent"] == sending["sent"])
    };
    lines
        .iter()
        .filter(|l| l["event"] == "sending" && of(first, l))
        .filter(|l| (first.start..=first.end).contains(&stamp(l, "sent")))
        .all(|sending| {
            answered("refused", sending).is_some()
                || answered("commit", sending)
                    .and_then(|c| c["revision"].as_u64())
                    .is_some_and(|revision| revision < opened)
        })
}

/// The order's audit lines and the revisions the bucket keeps (who held it, in what state), for a
/// failed check to show what happened.
fn account(lines: &[&Value], revisions: &[Revision]) -> String {
    let mut text = String::from("audit lines:\n");
    for line in lines {
        text.push_str(&format!("  {line}\n"));
    }
    text.push_str("revisions:\n");
    for r in revisions {
        let doc: Value = serde_json::from_slice(&r.value).unwrap_or_default();
        text.push_str(&format!(
            "  {} at {}: state {} step {} retries {} owner {} message_seq {} intent {} retry_request {}\n",
            r.revision,
            r.written,
            doc["state"],
            doc["current_step"],
            doc["retries"],
            doc["owner"],
            doc["message_seq"],
            doc["intent"],
            doc["retry_request"],
        ));
    }
    text
}

/// One stored revision of an order's document.
struct Revision {
    revision: u64,
    written: DateTime<Utc>,
    value: bytes::Bytes,
}

/// Every stored revision of the order's document, oldest first. Read with direct gets, which any
/// replica answers, so that it works on a cluster that lost a server.
async fn history(orders: &kv::Store, id: Uuid) -> Vec<Revision> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let subject = format!("$KV.orders.{id}");
    let mut revisions = Vec::new();
    let mut next = 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match orders
            .stream
            .direct_get_next_for_subject(subject.as_str(), Some(next))
            .await
        {
            Ok(message) => {
                next = message.sequence + 1;
                let operation = message.headers.get("KV-Operation").map(|v| v.to_string());
                if operation.is_some_and(|op| op != "PUT") {
                    continue;
                }
                revisions.push(Revision {
                    revision: message.sequence,
                    written: DateTime::from_timestamp_nanos(
                        i64::try_from(message.time.unix_timestamp_nanos())
                            .expect("a time in range"),
                    ),
                    value: message.payload,
                });
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return revisions,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot read the history of order {id}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Median and maximum of `values`, in seconds.
pub fn median_max(values: &mut [f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[values.len() - 1])
}

const STEPS: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];

/// The step that runs before `step`.
fn previous_step(step: &str) -> &'static str {
    let at = STEPS
        .iter()
        .position(|s| *s == step)
        .unwrap_or_else(|| panic!("a step named {step}"));
    STEPS[at
        .checked_sub(1)
        .unwrap_or_else(|| panic!("a step before {step}"))]
}

/// Whether an audit line is a write that ended its order (alone, or carried by the write of the
/// last step's completion or rollback).
pub fn finishes(line: &Value) -> bool {
    line["event"] == "commit"
        && line["change"]
            .as_str()
            .is_some_and(|change| change.split('+').any(|part| part == "finish"))
}
