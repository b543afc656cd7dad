//! The figures of a run: as a table on stdout and as JSON (`--json PATH`), the same numbers.

use super::mix;
use super::phases::{Drain, Memory, Overhead, Reads, Scale};
use serde::Serialize;

/// Everything a run measured, with what it was measured against.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub parameters: Parameters,
    /// The operations per completed order the floor replays (see `bench::mix`).
    pub op_mix: serde_json::Value,
    /// Median over the rounds of the floor's orders per second: Orderly's operations with none of
    /// its own work, at the same concurrency.
    pub floor_orders_per_s: f64,
    /// Median over the rounds of the nodes' orders per second draining preloaded orders with
    /// zero-time steps (clock from the nodes' start to an empty work queue).
    pub orders_per_s: f64,
    /// orders_per_s / floor_orders_per_s (median of the rounds' ratios).
    pub ratio_to_floor: f64,
    /// Writes to the `orders` bucket per completed order, counted from its stream in the drains.
    pub writes_per_order: f64,
    /// The writes the floor makes per order.
    pub floor_writes_per_order: f64,
    /// Messages on `orders.events.>` per completed order, counted in the drains.
    pub events_per_order: f64,
    /// The events the floor publishes per order.
    pub floor_events_per_order: f64,
    /// Steady-state orders per second at N nodes with steps of `scaling_step_ms`, against the ideal.
    pub scaling: Vec<Scale>,
    /// An order's complete_time - start_time - 4 × step, at moderate load: median and 99th centile.
    pub overhead_p50_ms: f64,
    pub overhead_p99_ms: f64,
    /// `GET /orders/{id}` per second on one node, at `query_concurrency` keep-alive connections.
    pub query_per_s: f64,
    pub query_p50_ms: f64,
    pub query_p99_ms: f64,
    /// KV gets of the same keys per second at the same concurrency: the floor of the query.
    pub kv_get_per_s: f64,
    pub kv_get_p50_ms: f64,
    pub kv_get_p99_ms: f64,
    /// query_per_s / kv_get_per_s.
    pub query_ratio_to_kv: f64,
    /// A node's resident memory with all 50 workers holding an order (long steps).
    pub rss_busy_mib: f64,
    /// The same node with `rss_queued_orders` more orders waiting in the stream.
    pub rss_queued_mib: f64,
    pub rss_queued_orders: usize,
    /// Each round's raw figures.
    pub rounds: Vec<Round>,
}

/// How the run was made.
#[derive(Debug, Clone, Serialize)]
pub struct Parameters {
    pub orders: usize,
    pub nodes: usize,
    pub rounds: usize,
    pub max_nodes: usize,
    pub quick: bool,
    pub scaling_step_ms: f64,
    pub scaling_warm_up_s: f64,
    pub scaling_window_s: f64,
    pub overhead_load: f64,
    pub overhead_s: f64,
    pub overhead_orders: usize,
    pub query_concurrency: usize,
    pub query_s: f64,
    pub rss_queued_orders: usize,
    /// `private` (a nats-server the run started) or `given` (`--nats-url`).
    pub nats_server: &'static str,
    pub nats_server_version: String,
    pub cores: usize,
    pub orderly_version: &'static str,
    pub build: &'static str,
}

/// One round: the floor, then the nodes, on the same number of orders.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: usize,
    pub floor_orders_per_s: f64,
    #[serde(flatten)]
    pub nodes: Drain,
    pub ratio_to_floor: f64,
}

/// The median of `values` (0 when there are none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl Report {
    /// The report of a run's phases: medians over the rounds, the rest as measured.
    pub fn new(
        parameters: Parameters,
        rounds: Vec<Round>,
        scaling: Vec<Scale>,
        overhead: &Overhead,
        reads: &Reads,
        memory: &Memory,
    ) -> Report {
        Report {
            parameters,
            op_mix: mix::ORDERLY.summary(),
            floor_orders_per_s: median(rounds.iter().map(|r| r.floor_orders_per_s)),
            orders_per_s: median(rounds.iter().map(|r| r.nodes.orders_per_s)),
            ratio_to_floor: median(rounds.iter().map(|r| r.ratio_to_floor)),
            writes_per_order: median(rounds.iter().map(|r| r.nodes.writes_per_order)),
            floor_writes_per_order: mix::ORDERLY.writes.len() as f64,
            events_per_order: median(rounds.iter().map(|r| r.nodes.events_per_order)),
            floor_events_per_order: mix::ORDERLY.events() as f64,
            scaling,
            overhead_p50_ms: overhead.p50_ms,
            overhead_p99_ms: overhead.p99_ms,
            query_per_s: reads.http_per_s,
            query_p50_ms: reads.http_p50_ms,
            query_p99_ms: reads.http_p99_ms,
            kv_get_per_s: reads.kv_per_s,
            kv_get_p50_ms: reads.kv_p50_ms,
            kv_get_p99_ms: reads.kv_p99_ms,
            query_ratio_to_kv: reads.http_per_s / reads.kv_per_s,
            rss_busy_mib: memory.busy_mib,
            rss_queued_mib: memory.queued_mib,
            rss_queued_orders: memory.queued_orders,
            rounds,
        }
    }

    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let p = &self.parameters;
        let mut rows: Vec<[String; 4]> = vec![[
            "figure".into(),
            "value".into(),
            "floor".into(),
            "ratio".into(),
        ]];
        let mut row = |figure: String, value: String, floor: String, ratio: String| {
            rows.push([figure, value, floor, ratio]);
        };
        row(
            format!(
                "orders/s, {} node(s), {} orders, 0s steps (median of {})",
                p.nodes, p.orders, p.rounds
            ),
            format!("{:.0}", self.orders_per_s),
            format!("{:.0}", self.floor_orders_per_s),
            format!("{:.2}", self.ratio_to_floor),
        );
        row(
            "KV writes per order".into(),
            format!("{:.2}", self.writes_per_order),
            format!("{:.0}", self.floor_writes_per_order),
            format!("{:.2}", self.writes_per_order / self.floor_writes_per_order),
        );
        row(
            "events per order".into(),
            format!("{:.2}", self.events_per_order),
            format!("{:.0}", self.floor_events_per_order),
            format!("{:.2}", self.events_per_order / self.floor_events_per_order),
        );
        for scale in &self.scaling {
            row(
                format!(
                    "orders/s, {} node(s), {:.0}ms steps",
                    scale.nodes, p.scaling_step_ms
                ),
                format!("{:.1}", scale.orders_per_s),
                format!("{:.1} (ideal)", scale.ideal_orders_per_s),
                format!("{:.2}", scale.efficiency),
            );
        }
        row(
            format!(
                "overhead p50 / p99 ms ({:.0} % load, {} orders)",
                p.overhead_load * 100.0,
                p.overhead_orders
            ),
            format!("{:.1} / {:.1}", self.overhead_p50_ms, self.overhead_p99_ms),
            "0 (ideal)".into(),
            "".into(),
        );
        row(
            format!("GET /orders/{{id}} per s ({} conns)", p.query_concurrency),
            format!("{:.0}", self.query_per_s),
            format!("{:.0} (KV get)", self.kv_get_per_s),
            format!("{:.2}", self.query_ratio_to_kv),
        );
        row(
            "GET /orders/{id} p99 ms".into(),
            format!("{:.2}", self.query_p99_ms),
            format!("{:.2} (KV get)", self.kv_get_p99_ms),
            "".into(),
        );
        row(
            "node RSS MiB, 50 busy workers".into(),
            format!("{:.1}", self.rss_busy_mib),
            "".into(),
            "".into(),
        );
        row(
            format!("node RSS MiB, + {} queued orders", self.rss_queued_orders),
            format!("{:.1}", self.rss_queued_mib),
            "".into(),
            "".into(),
        );
        let widths: Vec<usize> = (0..4)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, r) in rows.iter().enumerate() {
            let line = format!(
                "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3]
            );
            out.push_str(line.trim_end());
            out.push('\n');
            if n == 0 {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 6));
                out.push('\n');
            }
        }
        out.push_str(&format!(
            "nats-server {} ({}), {} cores, orderly {} ({} build)\n",
            p.nats_server_version, p.nats_server, p.cores, p.orderly_version, p.build
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }
}
