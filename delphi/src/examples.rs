//! Context windows around a latent's activity: the examples shown to the explainer, a
//! disjoint held-out set for scoring, and windows where the latent never fires.
//!
//! Follows delphi's conventions (fixed, non-overlapping windows of `example_ctx_len` tokens,
//! ranked by their largest activation, equal-count quantiles with quantile 0 holding the
//! strongest windows, activations normalised to 0-10 with `ceil(10 a / max)`), with one
//! deliberate difference: the explainer's examples and the test examples never overlap
//! (delphi draws both from the same pool with the same seed).

use std::collections::{BTreeMap, HashSet};

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::latents::{Firing, TokenTable};
use crate::{Error, Result};

/// How explainer examples are chosen among the activating windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainSampling {
    /// The same number from each quantile (delphi's default, the paper's best).
    Quantiles,
    /// The strongest windows only.
    Top,
    /// Uniformly at random.
    Random,
}

/// Settings of example construction (delphi's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleConfig {
    /// Tokens per window; must divide the cache's sequence length.
    pub example_ctx_len: usize,
    /// Latents firing in fewer windows are skipped.
    pub min_examples: usize,
    /// Examples shown to the explainer.
    pub n_train: usize,
    /// Activating examples held out for scoring.
    pub n_test: usize,
    /// Quantiles of the ranked windows.
    pub n_quantiles: usize,
    /// Windows where the latent is silent, for scoring.
    pub n_non_activating: usize,
    /// How explainer examples are drawn.
    pub train_sampling: TrainSampling,
    /// Seed of every random choice (combined with the hook point and latent).
    pub seed: u64,
}

impl Default for ExampleConfig {
    fn default() -> Self {
        Self {
            example_ctx_len: 32,
            min_examples: 200,
            n_train: 40,
            n_test: 50,
            n_quantiles: 10,
            n_non_activating: 50,
            train_sampling: TrainSampling::Quantiles,
            seed: 22,
        }
    }
}

impl ExampleConfig {
    /// Refuses settings that cannot give every quantile an example: `n_quantiles` of at
    /// least 1, and `n_train` (with quantile sampling) and `n_test` (always drawn per
    /// quantile) of at least `n_quantiles`, else a quantile's share, `n / n_quantiles`,
    /// would be 0 and the explainer would get no example at all. `example_ctx_len` must
    /// be positive; [`ExampleConfig::check_seq_len`] checks it against a cache.
    pub fn validate(&self) -> Result<()> {
        if self.n_quantiles == 0 {
            return Err(Error::Invalid(
                "n_quantiles (--n-quantiles) must be at least 1".into(),
            ));
        }
        if self.example_ctx_len == 0 {
            return Err(Error::Invalid(
                "example_ctx_len (--example-ctx-len) must be at least 1".into(),
            ));
        }
        let below = |name: &str, flag: &str, value: usize| {
            Error::Invalid(format!(
                "{name} {value} (--{flag}) is below n_quantiles {} (--n-quantiles): examples are \
                 drawn n / n_quantiles per quantile, which would be 0",
                self.n_quantiles
            ))
        };
        if self.train_sampling == TrainSampling::Quantiles && self.n_train < self.n_quantiles {
            return Err(below("n_train", "n-train", self.n_train));
        }
        if self.n_train == 0 {
            return Err(Error::Invalid(
                "n_train (--n-train) must be at least 1: the explainer needs examples".into(),
            ));
        }
        if self.n_test < self.n_quantiles {
            return Err(below("n_test", "n-test", self.n_test));
        }
        Ok(())
    }

    /// Refuses an `example_ctx_len` that does not divide a cache's sequence length.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<()> {
        let width = self.example_ctx_len;
        if width == 0 || !seq_len.is_multiple_of(width) {
            return Err(Error::Invalid(format!(
                "example_ctx_len {width} (--example-ctx-len) must divide the cache's sequence length {seq_len}"
            )));
        }
        Ok(())
    }

    /// Activating test examples a scored latent gets: `n_test / n_quantiles` from each
    /// quantile (`n_test` rounded down to a multiple of `n_quantiles`).
    pub fn test_count(&self) -> usize {
        self.n_test / self.n_quantiles.max(1) * self.n_quantiles
    }
}

/// One window of tokens with the latent's activation at each token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Index of the window in the cache (sequence * windows per sequence + offset).
    pub window: u64,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Activation per token (0 where the latent is silent).
    pub activations: Vec<f32>,
    /// Quantile of an activating window (0 = strongest); `None` for a silent window.
    pub quantile: Option<usize>,
}

impl Example {
    /// The largest activation in the window.
    pub fn max_activation(&self) -> f32 {
        self.activations.iter().copied().fold(0.0, f32::max)
    }

    /// Activations scaled to integers 0-10 relative to `max` (the latent's maximum): any
    /// positive activation maps to at least 1.
    pub fn normalized(&self, max: f32) -> Vec<u8> {
        normalized(&self.activations, max)
    }
}

/// `activations` scaled to integers 0-10 relative to `max` (the latent's maximum), rounded
/// up, so any positive activation maps to at least 1 (delphi's `normalized_activations`).
pub fn normalized(activations: &[f32], max: f32) -> Vec<u8> {
    activations
        .iter()
        .map(|&a| {
            if a <= 0.0 || max <= 0.0 {
                0
            } else {
                (10.0 * a / max).ceil().clamp(1.0, 10.0) as u8
            }
        })
        .collect()
}

/// The examples of one latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentExamples {
    /// Shown to the explainer.
    pub train: Vec<Example>,
    /// Activating examples for scoring, disjoint from `train`.
    pub test: Vec<Example>,
    /// Windows where the latent never fires, for scoring.
    pub non_activating: Vec<Example>,
    /// The latent's largest activation in the cache.
    pub max_activation: f32,
    /// Windows in which it fires at least once.
    pub activating_windows: usize,
}

/// Why a latent got no examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// It fires in fewer windows than [`ExampleConfig::min_examples`].
    TooFewWindows {
        /// Windows with activity.
        found: usize,
        /// The minimum.
        needed: usize,
    },
    /// After the explainer's examples were taken, fewer activating windows are left for
    /// scoring than [`ExampleConfig::test_count`] asks for: its scores would rest on fewer
    /// (or no) activating excerpts than the other latents', so it is not scored at all.
    TooFewTestExamples {
        /// Activating test examples that could be drawn.
        found: usize,
        /// The number asked for.
        needed: usize,
    },
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::TooFewWindows { found, needed } => {
                write!(
                    f,
                    "fires in {found} windows, fewer than the {needed} required"
                )
            }
            Skip::TooFewTestExamples { found, needed } => write!(
                f,
                "only {found} of the {needed} activating test examples are left after the explainer's"
            ),
        }
    }
}

/// A seed for one latent, so that its examples do not depend on which other latents are in
/// the same job or shard.
pub fn latent_seed(seed: u64, hookpoint: &str, latent: u32) -> u64 {
    // FNV-1a over the hook point, then mixed with the seed and latent.
    let h = hooks::digest::Fnv::default()
        .bytes(hookpoint.as_bytes())
        .finish();
    hooks::digest::mix64(h ^ seed.wrapping_mul(0x9e3779b97f4a7c15) ^ ((latent as u64) << 1))
}

/// Builds the examples of one latent from where it fired.
pub fn build_examples(
    firings: &[Firing],
    tokens: &TokenTable,
    config: &ExampleConfig,
    seed: u64,
) -> Result<std::result::Result<LatentExamples, Skip>> {
    config.validate()?;
    config.check_seq_len(tokens.seq_len())?;
    let width = config.example_ctx_len;
    let per_seq = tokens.seq_len() / width;
    let total_windows = (tokens.sequences() * per_seq) as u64;

    // Activity per window (BTreeMap: windows in cache order).
    let mut by_window: BTreeMap<u64, Vec<(usize, f32)>> = BTreeMap::new();
    for f in firings {
        if f.seq as usize >= tokens.sequences() || f.pos as usize >= tokens.seq_len() {
            return Err(Error::Invalid(format!(
                "firing at sequence {} position {} is outside the cache's {} x {} tokens",
                f.seq,
                f.pos,
                tokens.sequences(),
                tokens.seq_len()
            )));
        }
        let window = f.seq as u64 * per_seq as u64 + f.pos as u64 / width as u64;
        by_window
            .entry(window)
            .or_default()
            .push((f.pos as usize % width, f.value));
    }
    if by_window.len() < config.min_examples.max(1) {
        return Ok(Err(Skip::TooFewWindows {
            found: by_window.len(),
            needed: config.min_examples.max(1),
        }));
    }
    let window_example = |window: u64, activity: &[(usize, f32)]| {
        let mut activations = vec![0.0; width];
        for &(offset, value) in activity {
            activations[offset] = value;
        }
        Example {
            window,
            tokens: tokens.window(window, width).to_vec(),
            activations,
            quantile: None,
        }
    };
    let mut ranked: Vec<Example> = by_window
        .iter()
        .map(|(&w, activity)| window_example(w, activity))
        .collect();
    ranked.sort_by(|a, b| {
        b.max_activation()
            .total_cmp(&a.max_activation())
            .then(a.window.cmp(&b.window))
    });
    let max_activation = ranked[0].max_activation();
    let n = ranked.len();
    let bounds: Vec<(usize, usize)> = (0..config.n_quantiles)
        .map(|q| (q * n / config.n_quantiles, (q + 1) * n / config.n_quantiles))
        .collect();
    // An example's label is the bucket it is drawn from.
    for (q, &(start, end)) in bounds.iter().enumerate() {
        for example in &mut ranked[start..end] {
            example.quantile = Some(q);
        }
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut taken = vec![false; n];
    let train_ranks: Vec<usize> = match config.train_sampling {
        TrainSampling::Top => (0..config.n_train.min(n)).collect(),
        TrainSampling::Random => sample(&mut rng, n, config.n_train.min(n))
            .into_iter()
            .collect(),
        TrainSampling::Quantiles => per_quantile(
            &mut rng,
            &bounds,
            &taken,
            config.n_train / config.n_quantiles,
        ),
    };
    for &r in &train_ranks {
        taken[r] = true;
    }
    let test_ranks = per_quantile(
        &mut rng,
        &bounds,
        &taken,
        config.n_test / config.n_quantiles,
    );
    if test_ranks.len() < config.test_count() {
        return Ok(Err(Skip::TooFewTestExamples {
            found: test_ranks.len(),
            needed: config.test_count(),
        }));
    }
    let pick = |ranks: &[usize]| -> Vec<Example> {
        let mut ranks = ranks.to_vec();
        ranks.sort_unstable();
        ranks.iter().map(|&r| ranked[r].clone()).collect()
    };

    let silent_count = total_windows - by_window.len() as u64;
    let wanted = (config.n_non_activating as u64).min(silent_count);
    let mut silent = HashSet::new();
    while (silent.len() as u64) < wanted {
        let window = rng.random_range(0..total_windows);
        if !by_window.contains_key(&window) {
            silent.insert(window);
        }
    }
    let mut silent: Vec<u64> = silent.into_iter().collect();
    silent.sort_unstable();
    Ok(Ok(LatentExamples {
        train: pick(&train_ranks),
        test: pick(&test_ranks),
        non_activating: silent.into_iter().map(|w| window_example(w, &[])).collect(),
        max_activation,
        activating_windows: n,
    }))
}

/// Up to `each` not-yet-taken ranks drawn at random from every quantile.
fn per_quantile(
    rng: &mut rand::rngs::StdRng,
    bounds: &[(usize, usize)],
    taken: &[bool],
    each: usize,
) -> Vec<usize> {
    let mut chosen = Vec::new();
    for &(start, end) in bounds {
        let free: Vec<usize> = (start..end).filter(|&r| !taken[r]).collect();
        let count = each.min(free.len());
        chosen.extend(sample(rng, free.len(), count).into_iter().map(|i| free[i]));
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 sequences of 64 tokens (80 windows of 32); the latent fires once in each of the
    /// first `active` windows with strength equal to 1 + window index.
    fn fixture(active: u64) -> (Vec<Firing>, TokenTable) {
        let tokens = TokenTable::new((0..40 * 64).map(|t| t as u32).collect(), 64).unwrap();
        let firings = (0..active)
            .map(|w| Firing {
                seq: (w / 2) as u32,
                pos: ((w % 2) * 32 + 5) as u32,
                value: 1.0 + w as f32,
            })
            .collect();
        (firings, tokens)
    }

    fn config() -> ExampleConfig {
        ExampleConfig {
            min_examples: 20,
            n_train: 10,
            n_test: 10,
            n_quantiles: 5,
            n_non_activating: 15,
            ..ExampleConfig::default()
        }
    }

    #[test]
    fn train_test_and_silent_sets_are_disjoint_and_well_formed() {
        let (firings, tokens) = fixture(30);
        let ex = build_examples(&firings, &tokens, &config(), 7)
            .unwrap()
            .unwrap();
        assert_eq!(
            (ex.train.len(), ex.test.len(), ex.non_activating.len()),
            (10, 10, 15)
        );
        assert_eq!(ex.activating_windows, 30);
        assert_eq!(ex.max_activation, 30.0);
        let train: HashSet<u64> = ex.train.iter().map(|e| e.window).collect();
        let test: HashSet<u64> = ex.test.iter().map(|e| e.window).collect();
        let silent: HashSet<u64> = ex.non_activating.iter().map(|e| e.window).collect();
        assert!(train.is_disjoint(&test));
        assert_eq!(silent.len(), 15, "silent windows are distinct");
        assert!(
            silent.iter().all(|&w| w >= 30),
            "silent windows have no activity"
        );
        // Two examples from each of the 5 quantiles; quantile 0 holds the 6 strongest.
        for q in 0..5 {
            assert_eq!(ex.train.iter().filter(|e| e.quantile == Some(q)).count(), 2);
            assert_eq!(ex.test.iter().filter(|e| e.quantile == Some(q)).count(), 2);
        }
        for e in ex.train.iter().filter(|e| e.quantile == Some(0)) {
            assert!(e.max_activation() >= 25.0);
        }
        // Window tokens and the activation position match the cache.
        let e = &ex.train[0];
        assert_eq!(e.tokens[0], (e.window * 32) as u32);
        assert_eq!(e.activations[5], 1.0 + e.window as f32);
        assert_eq!(e.activations.iter().filter(|&&a| a > 0.0).count(), 1);
    }

    #[test]
    fn same_seed_same_examples_other_seed_other_examples() {
        let (firings, tokens) = fixture(30);
        let a = build_examples(&firings, &tokens, &config(), 7)
            .unwrap()
            .unwrap();
        let b = build_examples(&firings, &tokens, &config(), 7)
            .unwrap()
            .unwrap();
        let c = build_examples(&firings, &tokens, &config(), 8)
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a.train, c.train);
        assert_ne!(
            latent_seed(22, "layers.3", 1),
            latent_seed(22, "layers.3", 2)
        );
        assert_ne!(
            latent_seed(22, "layers.3", 1),
            latent_seed(22, "layers.4", 1)
        );
    }

    #[test]
    fn rare_latents_are_skipped_and_bad_widths_refused() {
        let (firings, tokens) = fixture(10);
        assert_eq!(
            build_examples(&firings, &tokens, &config(), 0)
                .unwrap()
                .unwrap_err(),
            Skip::TooFewWindows {
                found: 10,
                needed: 20
            }
        );
        let bad = ExampleConfig {
            example_ctx_len: 30,
            ..config()
        };
        let message = build_examples(&firings, &tokens, &bad, 0)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("30") && message.contains("64"),
            "{message}"
        );
    }

    #[test]
    fn settings_that_leave_a_quantile_without_examples_are_refused() {
        let (firings, tokens) = fixture(30);
        for (bad, flag) in [
            (
                ExampleConfig {
                    n_train: 4,
                    ..config()
                },
                "--n-train",
            ),
            (
                ExampleConfig {
                    n_test: 0,
                    ..config()
                },
                "--n-test",
            ),
            (
                ExampleConfig {
                    n_quantiles: 0,
                    ..config()
                },
                "--n-quantiles",
            ),
            (
                ExampleConfig {
                    n_train: 0,
                    train_sampling: TrainSampling::Top,
                    ..config()
                },
                "--n-train",
            ),
        ] {
            let message = bad.validate().unwrap_err().to_string();
            assert!(message.contains(flag), "{message}");
            let built = build_examples(&firings, &tokens, &bad, 0).unwrap_err();
            assert_eq!(built.to_string(), message);
        }
        // Top sampling draws n_train overall, so fewer than n_quantiles is fine there.
        let top = ExampleConfig {
            n_train: 3,
            train_sampling: TrainSampling::Top,
            ..config()
        };
        assert!(top.validate().is_ok());
    }

    #[test]
    fn a_latent_whose_test_set_comes_up_short_is_skipped() {
        // 21 windows, 20 of them for the explainer: 1 is left of the 20 test examples asked.
        let (firings, tokens) = fixture(21);
        let config = ExampleConfig {
            n_train: 20,
            n_test: 20,
            ..config()
        };
        assert_eq!(
            build_examples(&firings, &tokens, &config, 3)
                .unwrap()
                .unwrap_err(),
            Skip::TooFewTestExamples {
                found: 1,
                needed: 20
            }
        );
        // With enough windows the test set is complete.
        let (firings, tokens) = fixture(40);
        let ex = build_examples(&firings, &tokens, &config, 3)
            .unwrap()
            .unwrap();
        assert_eq!((ex.train.len(), ex.test.len()), (20, 20));
    }

    #[test]
    fn quantile_labels_are_the_buckets_examples_are_drawn_from() {
        // 33 windows in 5 quantiles: buckets of 6 or 7 ranks, so rank * 5 / 33 would
        // disagree with the bucket bounds at their edges.
        let n = 33;
        let (firings, tokens) = fixture(n);
        let config = ExampleConfig {
            n_train: 10,
            n_test: 15,
            ..config()
        };
        let bounds: Vec<(u64, u64)> = (0..5).map(|q| (q * n / 5, (q + 1) * n / 5)).collect();
        for seed in 0..20 {
            let ex = build_examples(&firings, &tokens, &config, seed)
                .unwrap()
                .unwrap();
            for e in ex.train.iter().chain(&ex.test) {
                // Strength 1 + window: the strongest window (rank 0) is the last one.
                let rank = n - 1 - e.window;
                let bucket = bounds.iter().position(|&(a, b)| a <= rank && rank < b);
                assert_eq!(e.quantile, bucket, "rank {rank}");
            }
            for q in 0..5 {
                assert_eq!(ex.test.iter().filter(|e| e.quantile == Some(q)).count(), 3);
            }
        }
    }

    #[test]
    fn normalisation_is_ceil_of_tenths_of_the_maximum() {
        let e = Example {
            window: 0,
            tokens: vec![0; 5],
            activations: vec![0.0, 0.01, 2.5, 5.0, 10.0],
            quantile: Some(0),
        };
        assert_eq!(e.normalized(10.0), vec![0, 1, 3, 5, 10]);
    }
}
