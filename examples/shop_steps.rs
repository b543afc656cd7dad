//! A step handler service for Orderly (`ORDERLY_STEPS=nats`) in Rust: the toy shop of
//! `examples/shop_steps.py`, behaving the same way. Each step and each rollback is an endpoint of the
//! NATS service `shop-steps` (reserve stock / release, charge / refund, pack / unpack, ship / recall);
//! the shop refuses a call whose `Orderly-Fence` is lower than the highest it has seen for the order
//! (`409 stale fence`, checked when the call arrives and again just before its effect), and makes
//! each effect at most once per (order, attempt, step). Its records are answered on `shop.records`.
//!
//! A rollback may arrive while a run of its step still works, or before a late run starts: it leaves
//! a tombstone (`rolled_back`), and a run that finds one, when it arrives or just before its effect,
//! makes no effect and answers `410` (listed in `dropped` if it had started). The last checks and
//! the effect of a run, like the tombstone and the undo of a rollback, happen under one lock, so for
//! each (order, step) either the effect comes first and the rollback undoes it, or the tombstone
//! comes first and the effect is never made.
//!
//! Settings (environment): NATS_URL (default nats://127.0.0.1:4222); SHOP_DELAY, seconds each call
//! takes; SHOP_SLOW_AT, a step: then only its run takes SHOP_DELAY; SHOP_FAIL_AT, a step whose run
//! always fails. A payload with `"card": "declined"` fails at
//! charging. Run: `cargo run --example shop_steps`.

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Each step's subject name, name in documents, effect and compensation.
const STEPS: [(&str, &str, &str, &str); 4] = [
    ("scheduling", "Scheduling", "reserve", "release"),
    ("pre-processing", "Pre-Processing", "charge", "refund"),
    ("processing", "Processing", "pack", "unpack"),
    ("post-processing", "Post-Processing", "ship", "recall"),
];

#[derive(Default)]
struct Shop {
    delay: Duration,
    slow_at: String,
    fail_at: String,
    /// Per order: `{fence, calls: [...], effects: [...]}`, the shape the Python shop keeps.
    orders: Mutex<HashMap<String, Value>>,
}

/// Why a call is refused: a service error code and its description.
type Refusal = (usize, String);

impl Shop {
    /// Runs `f` on the order's record, under the lock of all records, once the call's fence is found
    /// not stale: nothing else happens to the order between the check and `f`.
    fn fenced<T>(
        &self,
        order_id: &str,
        fence: u64,
        f: impl FnOnce(&mut Value) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut orders = self.orders.lock().map_err(|_| (500, "poisoned".into()))?;
        let record = orders
            .entry(order_id.to_owned())
            .or_insert_with(|| json!({ "fence": 0, "calls": [], "effects": [] }));
        let highest = record["fence"].as_u64().unwrap_or(0);
        if fence < highest {
            return Err((
                409,
                format!("stale fence {fence}: this order's highest fence is {highest}"),
            ));
        }
        record["fence"] = json!(fence);
        f(record)
    }

    async fn call(
        &self,
        step: usize,
        verb: &str,
        request: &service::Request,
    ) -> Result<Value, Refusal> {
        let header = |name: &str| {
            request
                .message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .ok_or((422, format!("no {name} header")))
        };
        let number = |name: &str| -> Result<u64, Refusal> {
            header(name)?
                .parse()
                .map_err(|_| (422, format!("{name} is not a number")))
        };
        let order_id = header("Orderly-Order-Id")?;
        let (fence, attempt, run) = (
            number("Orderly-Fence")?,
            number("Orderly-Attempt")?,
            number("Orderly-Run")?,
        );
        let (slug, name, action, undo) = STEPS[step];
        let tombstone = json!({ "attempt": attempt, "step": name });
        self.fenced(&order_id, fence, |record| {
            push(record, "calls", json!({ "call": verb, "step": name, "attempt": attempt, "run": run, "fence": fence }));
            if verb == "run" && listed(record, "rolled_back", &tombstone) {
                return Err((410, format!("{name} was rolled back: {action} not made")));
            }
            Ok(())
        })?;
        if self.slow_at.is_empty() || (self.slow_at.as_str(), verb) == (slug, "run") {
            tokio::time::sleep(self.delay).await;
        }
        let document: Value = serde_json::from_slice(&request.message.payload).unwrap_or_default();
        let kind = if verb == "run" { action } else { undo };
        // The fence checked again where it matters, just before the effect, and the effect (or the
        // undo) under the same lock: no rollback of the order comes between them.
        self.fenced(&order_id, fence, |record| {
            if verb == "run" && listed(record, "rolled_back", &tombstone) {
                // The rollback came while this run worked: it found nothing to undo, so make nothing.
                push(record, "dropped", json!({ "attempt": attempt, "step": name, "action": action, "run": run, "fence": fence }));
                return Err((410, format!("{name} was rolled back while it ran: {action} not made")));
            }
            if verb == "run" && self.fail_at == slug {
                return Err((422, format!("{action} refused (SHOP_FAIL_AT)")));
            }
            if verb == "run" && action == "charge" && document["payload"]["card"] == "declined" {
                return Err((422, "charge refused: card declined".into()));
            }
            if verb == "rollback" && !listed(record, "rolled_back", &tombstone) {
                // Whatever run of this step comes or ends from now on makes no effect.
                push(record, "rolled_back", tombstone.clone());
            }
            let made = |what: &str| {
                record["effects"].as_array().into_iter().flatten().find(|e| {
                    e["attempt"] == attempt && e["step"] == name && e["action"] == what
                }).cloned()
            };
            if let Some(mut effect) = made(kind) {
                effect["again"] = json!(true);
                return Ok(effect);
            }
            if verb == "rollback" && made(action).is_none() {
                // The step failed, or has not made its effect (yet: the tombstone stops it), or never ran.
                return Ok(json!({ "attempt": attempt, "step": name, "action": kind, "nothing_to_undo": true }));
            }
            let effect = json!({ "attempt": attempt, "step": name, "action": kind, "run": run, "fence": fence });
            push(record, "effects", effect.clone());
            Ok(effect)
        })
    }
}

/// Appends `item` to the record's list `list`, which is made on first use.
fn push(record: &mut Value, list: &str, item: Value) {
    if record[list].is_null() {
        record[list] = json!([]);
    }
    if let Some(items) = record[list].as_array_mut() {
        items.push(item);
    }
}

/// Whether the record's list `list` holds `item`.
fn listed(record: &Value, list: &str, item: &Value) -> bool {
    record[list]
        .as_array()
        .is_some_and(|items| items.contains(item))
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let shop = Arc::new(Shop {
        delay: Duration::from_secs_f64(
            std::env::var("SHOP_DELAY")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0.0),
        ),
        slow_at: std::env::var("SHOP_SLOW_AT")
            .unwrap_or_default()
            .to_lowercase(),
        fail_at: std::env::var("SHOP_FAIL_AT")
            .unwrap_or_default()
            .to_lowercase(),
        orders: Mutex::default(),
    });
    let client = async_nats::connect(url).await?;
    let service = client
        .service_builder()
        .description("The toy shop's Orderly step handlers")
        .start("shop-steps", "1.0.0")
        .await?;
    let mut endpoints = Vec::new();
    for (step, (slug, ..)) in STEPS.iter().enumerate() {
        let group = service.group(format!("orders.steps.{slug}"));
        for verb in ["run", "rollback"] {
            let endpoint = group
                .endpoint_builder()
                .name(format!("{slug}-{verb}"))
                .add(verb)
                .await?;
            endpoints.push(
                endpoint
                    .map(move |request| (Some((step, verb)), request))
                    .boxed(),
            );
        }
    }
    let records = service
        .endpoint_builder()
        .name("records")
        .add("shop.records")
        .await?;
    endpoints.push(records.map(|request| (None, request)).boxed());
    let mut requests = futures::stream::select_all(endpoints);
    println!("shop-steps ready");
    loop {
        let (call, request) = tokio::select! {
            next = requests.next() => match next { Some(next) => next, None => break },
            _ = tokio::signal::ctrl_c() => break,
        };
        let shop = shop.clone();
        // Each call runs on its own, so a slow one holds up no other.
        tokio::spawn(async move {
            let answer = match call {
                Some((step, verb)) => shop.call(step, verb, &request).await,
                None => Ok(shop.records(&request)),
            };
            let reply = answer
                .map(|value| value.to_string().into())
                .map_err(|(code, status)| service::error::Error { code, status });
            if let Err(e) = request.respond(reply).await {
                eprintln!("cannot answer a call: {e}");
            }
        });
    }
    Ok(())
}

impl Shop {
    /// The records of the order the request names, or of every order.
    fn records(&self, request: &service::Request) -> Value {
        let wanted = String::from_utf8_lossy(&request.message.payload)
            .trim()
            .to_owned();
        let orders = match self.orders.lock() {
            Ok(orders) => orders,
            Err(_) => return Value::Null,
        };
        if wanted.is_empty() {
            json!(*orders)
        } else {
            json!({ wanted.clone(): orders.get(&wanted) })
        }
    }
}
