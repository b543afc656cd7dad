//! The work of a step: today a simulated wait that fails with a configured probability.

use crate::config::FailureRates;
use crate::domain::order::Step;
use uuid::Uuid;

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
