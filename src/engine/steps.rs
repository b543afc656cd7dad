//! The work of a step, behind one seam: [`Steps`] runs a step and rolls one back. The pipeline calls
//! it under the order's lease and decides what the outcome means for the document; a step never
//! writes the document itself.
//!
//! [`Simulated`] is the implementation a node runs unless it is given another one: each step waits
//! its duration and fails with the configured probability, drawn from a seed when one is set.

use crate::domain::order::{Order, Step, StepOutput};
use futures::future::BoxFuture;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use crate::domain::limits::MAX_OUTPUT;

/// What running a step (or rolling one back) came to.
#[derive(Debug, Clone)]
pub enum StepOutcome {
    /// The step is done (for a rollback: undone), with what its code answered, if anything: it is
    /// stored in the step's record as `output` (at most [`MAX_OUTPUT`] bytes).
    Done { output: Option<StepOutput> },
    /// The step failed for the order: the steps done so far are rolled back and the order fails.
    /// A rollback cannot fail this way; one that reports it is tried again on a later delivery.
    Failed { reason: String },
    /// The step cannot run now (what it needs is away): the owner keeps the order and its lease and
    /// calls again after a pause (1 s, 2 s, 4 s, then every 5 s), using up no delivery.
    NotNow { reason: String },
}

impl StepOutcome {
    /// Done, without an output.
    pub fn done() -> StepOutcome {
        StepOutcome::Done { output: None }
    }
}

/// One call of the steps: which step of which order, and who is calling.
#[derive(Debug, Clone)]
pub struct StepCall<'a> {
    /// The order's document as stored, payload included.
    pub order: &'a Order,
    pub step: Step,
    /// The order's attempt: 1, then one more for each retry of the order.
    pub attempt: u32,
    /// How many times this step was started in this attempt (its record's `runs`): more than 1 when
    /// a node stopped in the middle of it and another started it again.
    pub run: u32,
    /// The revision of the order's document at which the calling node claimed it. It strictly
    /// increases each time the order changes hands, so code that remembers the highest fence it saw
    /// for an order can refuse a call from an owner that has since lost it.
    pub fence: u64,
    /// Fires when the pipeline stops waiting for the call: the lease ended, the node is stopping,
    /// a cancel interrupted the step or its timeout passed. The call's future is dropped then; the
    /// token lets work the call handed elsewhere stop.
    pub cancel: CancellationToken,
}

/// The work of the four steps. An implementation must be safe to run again for the same order and
/// step: a node that dies in the middle of a step leaves it to be run again from its start by another
/// node (with the same `attempt`, a higher `run` and a higher `fence`).
pub trait Steps: Send + Sync + 'static {
    /// Runs `call.step` of `call.order`.
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome>;

    /// Undoes `call.step` of `call.order`, which completed (or was interrupted) earlier.
    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome>;

    /// How long one call may take before it fails the step (a rollback that takes longer is tried
    /// again later); `None`: as long as it takes (the lease is kept alive meanwhile).
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Whether a run interrupted by a cancel is still waited for, up to [`Steps::timeout`], before
    /// its rollback is called; its answer is not used then. For steps whose work goes on elsewhere
    /// once the node stops waiting (step handlers over NATS), so that the rollback does not arrive
    /// while the run still works. A rollback must be safe during or before a run all the same: a
    /// node that dies mid-run, or a run past its timeout, leaves its rollback to arrive while the run
    /// may still be working.
    fn awaits_interrupted_runs(&self) -> bool {
        false
    }
}

/// Today's steps: each waits its duration and fails with the configured probability.
#[derive(Debug, Clone)]
pub struct Simulated {
    pub step_duration: Duration,
    pub rollback_duration: Duration,
    pub failures: FailureDraw,
}

impl Steps for Simulated {
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            if !waited(self.step_duration, &call.cancel).await {
                return interrupted();
            }
            let (order, step) = (call.order, call.step);
            // A retry draws anew: its number goes in the high bits, so a first run draws as before.
            let attempt = order.attempt | (order.retries << 16);
            if self.failures.fails(order.order_id, step, attempt) {
                StepOutcome::Failed {
                    reason: format!(
                        "{step} failed (simulated failure, rate {})",
                        self.failures.rates.get(step)
                    ),
                }
            } else {
                StepOutcome::done()
            }
        })
    }

    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            if waited(self.rollback_duration, &call.cancel).await {
                StepOutcome::done()
            } else {
                interrupted()
            }
        })
    }
}

/// The answer of a call the pipeline stopped waiting for (it is not read).
fn interrupted() -> StepOutcome {
    StepOutcome::NotNow {
        reason: "interrupted".into(),
    }
}

/// Sleeps `duration`; false if `cancel` fired first. A zero duration takes no time at all: a timer,
/// even an elapsed one, fires only at the runtime's next millisecond tick.
async fn waited(duration: Duration, cancel: &CancellationToken) -> bool {
    if duration.is_zero() {
        return !cancel.is_cancelled();
    }
    tokio::select! {
        _ = tokio::time::sleep(duration) => true,
        _ = cancel.cancelled() => false,
    }
}

/// The failure probability of each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRates([f64; 4]);

impl FailureRates {
    pub fn uniform(p: f64) -> FailureRates {
        FailureRates([p; 4])
    }

    pub fn get(&self, step: Step) -> f64 {
        self.0[step.index()]
    }
}

impl Default for FailureRates {
    fn default() -> Self {
        FailureRates::uniform(0.05)
    }
}

impl FromStr for FailureRates {
    type Err = String;

    /// `P` sets every step; `STEP=P` sets one; later entries win. Steps named by no entry (and by no
    /// bare number) never fail, so `Processing=1` makes exactly Processing fail, every time.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("empty: give a probability like 0.05, or STEP=P entries".into());
        }
        let mut rates = FailureRates::uniform(0.0);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => rates = FailureRates::uniform(parse_probability(part)?),
                Some((step, p)) => {
                    let step: Step = step.trim().parse()?;
                    rates.0[step.index()] = parse_probability(p.trim())?;
                }
            }
        }
        Ok(rates)
    }
}

impl fmt::Display for FailureRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = Step::ALL
            .iter()
            .map(|step| format!("{step}={}", self.get(*step)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

/// Decides whether a step fails.
#[derive(Debug, Clone)]
pub struct FailureDraw {
    pub rates: FailureRates,
    pub seed: Option<u64>,
}

impl FailureDraw {
    /// With a seed, the draw is a function of (seed, order id, step, attempt) only.
    pub fn fails(&self, order_id: Uuid, step: Step, attempt: u32) -> bool {
        let p = self.rates.get(step);
        let x = match self.seed {
            Some(seed) => seeded_unit(seed, order_id, step, attempt),
            None => rand::random::<f64>(),
        };
        x < p
    }
}

/// A number in [0, 1) derived from the inputs by FNV-1a and a SplitMix64 finaliser: stable across
/// platforms and Rust versions.
fn seeded_unit(seed: u64, order_id: Uuid, step: Step, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = seed
        .to_le_bytes()
        .into_iter()
        .chain(*order_id.as_bytes())
        .chain([step.index() as u8])
        .chain(attempt.to_le_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_draws_are_reproducible_and_near_the_rate() {
        let draw = FailureDraw {
            rates: FailureRates::uniform(0.05),
            seed: Some(42),
        };
        let ids: Vec<Uuid> = (0..20_000u128).map(Uuid::from_u128).collect();
        let first: Vec<bool> = ids
            .iter()
            .map(|id| draw.fails(*id, Step::Processing, 1))
            .collect();
        let again: Vec<bool> = ids
            .iter()
            .map(|id| draw.fails(*id, Step::Processing, 1))
            .collect();
        assert_eq!(first, again);
        let rate = first.iter().filter(|f| **f).count() as f64 / ids.len() as f64;
        assert!((0.04..0.06).contains(&rate), "rate {rate}");
        let other_step: Vec<bool> = ids
            .iter()
            .map(|id| draw.fails(*id, Step::Scheduling, 1))
            .collect();
        assert_ne!(first, other_step);
    }

    #[test]
    fn certain_and_impossible_rates() {
        let id = Uuid::now_v7();
        let always = FailureDraw {
            rates: FailureRates::uniform(1.0),
            seed: None,
        };
        let never = FailureDraw {
            rates: FailureRates::uniform(0.0),
            seed: Some(1),
        };
        for step in Step::ALL {
            assert!(always.fails(id, step, 1));
            assert!(!never.fails(id, step, 1));
        }
    }
}
