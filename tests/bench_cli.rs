//! `orderly bench --quick`: the real binary, with its own private nats-server and node processes,
//! writes every figure it promises. It asserts nothing about speed: only that each figure was
//! measured (a finite number above zero).

mod common;

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The figures the JSON report must carry, each a finite number above zero.
const FIGURES: [&str; 16] = [
    "floor_orders_per_s",
    "orders_per_s",
    "ratio_to_floor",
    "writes_per_order",
    "events_per_order",
    "overhead_p50_ms",
    "overhead_p99_ms",
    "query_per_s",
    "query_p99_ms",
    "query_p50_ms",
    "kv_get_per_s",
    "kv_get_p99_ms",
    "query_ratio_to_kv",
    "rss_busy_mib",
    "rss_queued_mib",
    "rss_queued_orders",
];

#[test]
fn quick_bench_reports_every_figure() {
    let dir = common::temp_dir("bench-cli");
    let json = dir.path().join("bench.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .env_remove("NATS_URL")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the orderly binary starts");
    // About 30 s on 2 cores in a debug build; the limit only stops a hung run.
    let deadline = Instant::now() + Duration::from_secs(110);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the bench process") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("orderly bench --quick did not finish in 110s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut table = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut table)
        .expect("the table");
    assert!(status.success(), "orderly bench failed: {status}\n{table}");
    assert!(table.contains("floor"), "no table on stdout:\n{table}");

    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    for figure in FIGURES {
        let value = report[figure].as_f64();
        assert!(
            value.is_some_and(|v| v.is_finite() && v > 0.0),
            "{figure} is {:?}",
            report[figure]
        );
    }
    let scaling = report["scaling"].as_array().expect("scaling");
    assert!(!scaling.is_empty());
    for entry in scaling {
        for figure in ["nodes", "orders_per_s", "ideal_orders_per_s"] {
            let value = entry[figure].as_f64();
            assert!(value.is_some_and(|v| v > 0.0), "scaling {figure}: {entry}");
        }
        let efficiency = entry["efficiency"].as_f64().expect("efficiency");
        assert!(efficiency > 0.0 && efficiency <= 1.5, "{entry}");
    }
    let parameters = &report["parameters"];
    assert_eq!(parameters["quick"], true);
    assert!(parameters["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(parameters["nats_server_version"].is_string());
    assert!(!report["rounds"].as_array().expect("rounds").is_empty());
}
