//! The settings of a run: what the flags say, with `--quick`'s shorter defaults where they say
//! nothing.

use super::{phases, Args};
use std::time::Duration;

/// The settings of a run, with `--quick`'s defaults applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub orders: usize,
    pub nodes: usize,
    pub rounds: usize,
    pub max_nodes: usize,
    pub step: Duration,
    pub window: phases::Window,
    pub overhead_load: f64,
    pub overhead_for: Duration,
    pub query_concurrency: usize,
    pub query_for: Duration,
    pub rss_queued: usize,
    pub rss_sample: Duration,
    pub quick: bool,
}

impl Plan {
    pub fn new(args: &Args) -> Plan {
        let quick = args.quick;
        let pick = |given: Option<u64>, full: u64, short: u64| {
            given.unwrap_or(if quick { short } else { full }) as usize
        };
        let secs = |full: u64, short: u64| Duration::from_secs(if quick { short } else { full });
        Plan {
            orders: pick(args.orders, 20_000, 2_000),
            nodes: args.nodes as usize,
            rounds: pick(args.rounds, 3, 1),
            max_nodes: pick(args.max_nodes, 16, 2),
            step: args.scaling_step,
            window: phases::Window {
                warm_up: secs(3, 1),
                measure: secs(10, 3),
            },
            overhead_load: 0.3,
            overhead_for: secs(20, 4),
            query_concurrency: 64,
            query_for: secs(10, 2),
            rss_queued: pick(args.rss_queued_orders, 100_000, 10_000),
            rss_sample: secs(2, 1),
            quick,
        }
    }

    /// 1, 2, 4, 8, 16 ... nodes, up to `max_nodes` (and `max_nodes` itself).
    pub fn scaling_nodes(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = std::iter::successors(Some(1), |n| Some(n * 2))
            .take_while(|n| *n <= self.max_nodes)
            .collect();
        if counts.last() != Some(&self.max_nodes) {
            counts.push(self.max_nodes);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn quick_shrinks_what_was_not_given() {
        let cli = Cli::try_parse_from(["bench", "--quick", "--orders", "500"]).unwrap();
        let plan = Plan::new(&cli.args);
        assert_eq!(plan.orders, 500);
        assert_eq!(plan.rounds, 1);
        assert_eq!(plan.scaling_nodes(), [1, 2]);
        let full = Plan::new(&Cli::try_parse_from(["bench"]).unwrap().args);
        assert_eq!(full.scaling_nodes(), [1, 2, 4, 8, 16]);
        assert_eq!(full.rss_queued, 100_000);
        let odd = Cli::try_parse_from(["bench", "--max-nodes", "3"]).unwrap();
        assert_eq!(Plan::new(&odd.args).scaling_nodes(), [1, 2, 3]);
    }
}
