//! A node whose steps are Rust code of its own, through the `Steps` seam: Orderly as a library.
//!
//! Scheduling reserves one unit of the payload's `sku` from an in-memory stock of 3 per SKU and fails
//! the order ("out of stock") when none is left; its rollback puts the unit back. The other steps do
//! nothing but answer. The node takes every other setting as the `orderly` binary does (flags and
//! environment), so `NATS_URL=nats://127.0.0.1:4222 cargo run --example own_steps` runs one.

use clap::Parser;
use futures::future::BoxFuture;
use orderly::{Config, Step, StepCall, StepOutcome, StepOutput, Steps};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Units left per SKU, and who holds them: (order id, attempt) per reservation.
#[derive(Default)]
struct Stock {
    left: Mutex<HashMap<String, u32>>,
    held: Mutex<HashMap<(uuid::Uuid, u32), String>>,
}

const UNITS_PER_SKU: u32 = 3;

impl Stock {
    /// Reserves a unit for the call's order, once per (order, attempt): a step run again after a
    /// takeover finds its reservation made.
    fn reserve(&self, call: &StepCall<'_>) -> StepOutcome {
        let sku = serde_json::from_str::<serde_json::Value>(call.order.payload.get())
            .ok()
            .and_then(|payload| payload["sku"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "none".into());
        let key = (call.order.order_id, call.attempt);
        let (Ok(mut left), Ok(mut held)) = (self.left.lock(), self.held.lock()) else {
            return StepOutcome::NotNow {
                reason: "the stock is unavailable".into(),
            };
        };
        if let std::collections::hash_map::Entry::Vacant(entry) = held.entry(key) {
            let units = left.entry(sku.clone()).or_insert(UNITS_PER_SKU);
            if *units == 0 {
                return StepOutcome::Failed {
                    reason: format!("{sku} is out of stock"),
                };
            }
            *units -= 1;
            entry.insert(sku.clone());
        }
        let answer = serde_json::json!({ "reserved": sku, "left": left.get(&sku) }).to_string();
        match RawValue::from_string(answer) {
            Ok(output) => StepOutcome::Done {
                output: Some(StepOutput(output)),
            },
            Err(_) => StepOutcome::done(),
        }
    }

    fn release(&self, call: &StepCall<'_>) {
        let key = (call.order.order_id, call.attempt);
        if let (Ok(mut left), Ok(mut held)) = (self.left.lock(), self.held.lock()) {
            if let Some(sku) = held.remove(&key) {
                *left.entry(sku).or_insert(UNITS_PER_SKU) += 1;
            }
        }
    }
}

impl Steps for Stock {
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            match call.step {
                Step::Scheduling => self.reserve(&call),
                _ => StepOutcome::done(),
            }
        })
    }

    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            if call.step == Step::Scheduling {
                self.release(&call);
            }
            StepOutcome::done()
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let config = Config::parse();
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    orderly::run_with(config, Arc::new(Stock::default()), shutdown).await
}
