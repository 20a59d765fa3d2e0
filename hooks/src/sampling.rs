//! Picking the next token from a model's scores: greedy, sampled at a temperature, or the
//! `k` most likely, with log-probabilities accumulated in f64.

use rand::rngs::StdRng;
use rand::Rng;

/// The index of the largest score (the first one on ties, as torch's argmax on CPU).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` in f64 accumulation.
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
    let log_sum = max as f64 + sum.ln();
    scores
        .iter()
        .map(|&s| (s as f64 - log_sum) as f32)
        .collect()
}

/// The ids of the `k` largest values, largest first (lower id first on ties).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(ids.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    ids.select_nth_unstable_by(k - 1, order);
    ids.truncate(k);
    ids.sort_by(order);
    ids
}

/// A draw from `softmax(scores / temperature)`.
pub fn sample(scores: &[f32], temperature: f32, rng: &mut StdRng) -> u32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = scores
        .iter()
        .map(|&s| (((s - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target < 0.0 {
            return i as u32;
        }
    }
    // Rounding left a sliver: the last token with any weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn log_softmax_and_top_k() {
        let scores = [1.0f32, 3.0, 2.0, 3.0];
        let lp = log_softmax(&scores);
        let z: f64 = scores.iter().map(|&s| (s as f64).exp()).sum();
        for (l, s) in lp.iter().zip(scores) {
            assert!((*l as f64 - (s as f64 - z.ln())).abs() < 1e-6);
        }
        assert_eq!(top_k(&lp, 3), [1, 3, 2]);
        assert_eq!(top_k(&lp, 10), [1, 3, 2, 0]);
        assert!(top_k(&lp, 0).is_empty());
        assert_eq!(argmax(&scores), 1);
    }

    #[test]
    fn sampling_follows_the_tempered_distribution_and_is_seeded() {
        let scores = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..4000)
                .map(|_| sample(&scores, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        assert!(!a.contains(&2), "a token of probability 0 was drawn");
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        // p(1) = 0.75; 4000 draws: standard error 0.007.
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        // At temperature 0.5 the odds square: p(1) = 9/10.
        let mut rng = StdRng::seed_from_u64(1);
        let cold = (0..4000)
            .filter(|_| sample(&scores, 0.5, &mut rng) == 1)
            .count() as f64
            / 4000.0;
        assert!((cold - 0.9).abs() < 0.03, "{cold}");
    }
}
