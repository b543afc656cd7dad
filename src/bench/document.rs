//! The floor's order document: the shape and size of the one a node stores, built as JSON and
//! grown write by write as [`super::mix`] says, without the domain's rules.

use super::mix::Change;
use serde_json::{json, Value};

const STEPS: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];

/// A document of the shape and size of Orderly's (`domain::order::Order` as stored), growing as
/// steps are recorded.
pub struct Document(pub Value);

impl Document {
    pub fn queued(id: &str, payload: Value) -> Document {
        let now = crate::clock::now();
        Document(json!({
            "order_id": id,
            "state": "Queued",
            "current_step": STEPS[0],
            "start_time": now,
            "complete_time": null,
            "steps": [],
            "attempt": 0,
            "owner": null,
            "message_seq": null,
            "submitted_via": "stream",
            "updated_at": now,
            "payload": payload,
        }))
    }

    pub fn state(&self) -> String {
        self.0["state"].as_str().unwrap_or_default().to_owned()
    }

    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.0).unwrap_or_default().into()
    }

    pub fn apply(&mut self, change: Change, state: &str, node: &str, seq: u64) {
        let now = json!(crate::clock::now());
        let doc = &mut self.0;
        let start = |doc: &mut Value, step: usize| {
            if let Some(steps) = doc["steps"].as_array_mut() {
                steps.push(json!({
                    "step_name": STEPS[step],
                    "status": "Running",
                    "step_start_time": now,
                    "step_complete_time": null,
                    "node": node,
                    "attempt": 1,
                    "runs": 1,
                }));
            }
            doc["current_step"] = json!(STEPS[step]);
        };
        let complete = |doc: &mut Value, step: usize| {
            doc["steps"][step]["status"] = json!("Completed");
            doc["steps"][step]["step_complete_time"] = now.clone();
        };
        match change {
            Change::Create => {}
            Change::ClaimAndStart => {
                doc["attempt"] = json!(1);
                doc["message_seq"] = json!(seq);
                doc["owner"] = json!({
                    "node": node, "delivery": 1, "stream_seq": seq, "claimed_at": now,
                });
                start(doc, 0);
            }
            Change::CompleteAndStart(step) => {
                complete(doc, step);
                start(doc, step + 1);
            }
            Change::CompleteAndFinish => {
                complete(doc, STEPS.len() - 1);
                doc["current_step"] = json!("Completed");
                doc["complete_time"] = now.clone();
                doc["owner"] = Value::Null;
            }
        }
        doc["state"] = json!(state);
        doc["updated_at"] = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::mix::ORDERLY;
    use crate::domain::order::{Interface, Order, Owner, Step};

    /// The node's own document through the same writes, for comparison.
    fn node_documents(id: uuid::Uuid, payload: &str) -> Vec<usize> {
        let now = crate::clock::now();
        let raw = serde_json::value::RawValue::from_string(payload.into()).unwrap();
        let mut order = Order::queued(id, raw, Interface::Stream, now);
        let mut sizes = vec![crate::store::encode(&order).len()];
        order
            .claim(Owner {
                node: "bench-floor-0".into(),
                delivery: 1,
                stream_seq: 12345,
                claimed_at: now,
            })
            .unwrap();
        for step in Step::ALL {
            order.start_step(step, "bench-floor-0", now).unwrap();
            sizes.push(crate::store::encode(&order).len());
            order.complete_step(None, now).unwrap();
        }
        order.finish(now).unwrap();
        sizes.push(crate::store::encode(&order).len());
        sizes
    }

    /// Within 15 %, write by write (when written, 317 to 1 140 bytes, equal to the byte).
    #[test]
    fn the_floors_document_is_the_size_of_the_nodes() {
        let id = uuid::Uuid::now_v7();
        let payload = r#"{"customer":"bench","n":1234}"#;
        let mut doc = Document::queued(&id.to_string(), serde_json::from_str(payload).unwrap());
        let mut sizes = vec![];
        for write in ORDERLY.writes {
            doc.apply(write.records, write.state, "bench-floor-0", 12345);
            sizes.push(doc.encode().len());
        }
        let node = node_documents(id, payload);
        assert_eq!(sizes.len(), node.len());
        for (floor, node) in sizes.iter().zip(&node) {
            let off = (*floor as f64 - *node as f64).abs() / *node as f64;
            assert!(off < 0.15, "floor {sizes:?} against node {node:?}");
        }
    }
}
