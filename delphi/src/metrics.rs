//! Metrics of a scorer's predictions: the confusion counts, balanced accuracy, precision,
//! recall, F1, and the ROC AUC when the scorer gave probabilities; the Pearson correlation of
//! simulated and true activations.

use serde::{Deserialize, Serialize};

/// Counts of a binary classifier's outcomes; predictions that could not be parsed are
/// counted in `failed` and left out of the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Activating examples predicted activating.
    pub true_positives: u64,
    /// Non-activating examples predicted non-activating.
    pub true_negatives: u64,
    /// Non-activating examples predicted activating.
    pub false_positives: u64,
    /// Activating examples predicted non-activating.
    pub false_negatives: u64,
    /// Examples without a usable prediction.
    pub failed: u64,
}

impl Confusion {
    /// Counts `(is_activating, prediction)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, Option<bool>)>) -> Self {
        let mut counts = Self::default();
        for (actual, predicted) in pairs {
            match (actual, predicted) {
                (_, None) => counts.failed += 1,
                (true, Some(true)) => counts.true_positives += 1,
                (false, Some(false)) => counts.true_negatives += 1,
                (false, Some(true)) => counts.false_positives += 1,
                (true, Some(false)) => counts.false_negatives += 1,
            }
        }
        counts
    }

    /// Adds another set of counts (to pool latents).
    pub fn add(&mut self, other: &Confusion) {
        self.true_positives += other.true_positives;
        self.true_negatives += other.true_negatives;
        self.false_positives += other.false_positives;
        self.false_negatives += other.false_negatives;
        self.failed += other.failed;
    }

    /// Activating examples with a prediction.
    pub fn positives(&self) -> u64 {
        self.true_positives + self.false_negatives
    }

    /// Non-activating examples with a prediction.
    pub fn negatives(&self) -> u64 {
        self.true_negatives + self.false_positives
    }

    /// Mean of the true-positive and true-negative rates; `None` without both classes.
    pub fn balanced_accuracy(&self) -> Option<f64> {
        let tpr = ratio(self.true_positives, self.positives())?;
        let tnr = ratio(self.true_negatives, self.negatives())?;
        Some((tpr + tnr) / 2.0)
    }

    /// TP / (TP + FP); `None` when nothing was predicted activating.
    pub fn precision(&self) -> Option<f64> {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    /// TP / P; `None` without activating examples.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_positives, self.positives())
    }

    /// Harmonic mean of precision and recall, 2 TP / (2 TP + FP + FN); `None` without
    /// activating examples. A scorer that never answers 1 scores 0 (as in delphi), not
    /// `None`: its latent counts in the median.
    pub fn f1(&self) -> Option<f64> {
        if self.positives() == 0 {
            return None;
        }
        ratio(
            2 * self.true_positives,
            2 * self.true_positives + self.false_positives + self.false_negatives,
        )
    }

    /// The summary written to score files.
    pub fn summary(&self) -> ClassificationSummary {
        ClassificationSummary {
            confusion: *self,
            balanced_accuracy: self.balanced_accuracy(),
            precision: self.precision(),
            recall: self.recall(),
            f1: self.f1(),
        }
    }
}

/// Confusion counts with the metrics derived from them (absent where undefined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationSummary {
    /// The counts.
    #[serde(flatten)]
    pub confusion: Confusion,
    /// See [`Confusion::balanced_accuracy`].
    pub balanced_accuracy: Option<f64>,
    /// See [`Confusion::precision`].
    pub precision: Option<f64>,
    /// See [`Confusion::recall`].
    pub recall: Option<f64>,
    /// See [`Confusion::f1`].
    pub f1: Option<f64>,
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// Area under the ROC curve of `scores` for telling `labels` apart: the probability that a
/// random positive scores above a random negative, ties counting one half (the Mann-Whitney
/// statistic, equal to scikit-learn's `roc_auc_score`). `None` without both classes or
/// with a non-finite score.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Option<f64> {
    assert_eq!(labels.len(), scores.len(), "one score per label");
    if scores.iter().any(|s| !s.is_finite()) {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) over groups of tied scores.
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        positive_rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let p = positives as f64;
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// Pearson's correlation of `x` and `y` (NaN when either is constant or they are empty, as
/// numpy's `corrcoef`, which delphi's simulation scorer uses).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "pearson needs pairs");
    let n = x.len() as f64;
    let (mean_x, mean_y) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mean_x, b - mean_y);
        xy += dx * dy;
        xx += dx * dx;
        yy += dy * dy;
    }
    if xx == 0.0 || yy == 0.0 {
        return f64::NAN;
    }
    xy / (xx * yy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_matches_python_statistics() {
        // statistics.correlation([1, 2, 3, 4], [1, 2, 5, 4]) and the second pair likewise.
        assert!(
            (pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 5.0, 4.0]) - 0.848528137423857).abs()
                < 1e-12
        );
        let r = pearson(&[0.0, 0.0, 10.0, 3.0, 0.0], &[0.5, 0.2, 7.9, 4.1, 1.0]);
        assert!((r - 0.9794843983971692).abs() < 1e-12);
        assert!(pearson(&[1.0, 1.0], &[0.0, 3.0]).is_nan());
        assert!(pearson(&[], &[]).is_nan());
    }

    #[test]
    fn hand_computed_confusion_metrics() {
        // 6 positives: 4 found, 1 missed, 1 unparsed; 4 negatives: 3 rejected, 1 false alarm.
        let pairs = [
            (true, Some(true)),
            (true, Some(true)),
            (true, Some(true)),
            (true, Some(true)),
            (true, Some(false)),
            (true, None),
            (false, Some(false)),
            (false, Some(false)),
            (false, Some(false)),
            (false, Some(true)),
        ];
        let c = Confusion::from_pairs(pairs);
        assert_eq!(
            (
                c.true_positives,
                c.false_negatives,
                c.true_negatives,
                c.false_positives,
                c.failed
            ),
            (4, 1, 3, 1, 1)
        );
        // TPR 4/5, TNR 3/4 -> (0.8 + 0.75) / 2.
        assert!((c.balanced_accuracy().unwrap() - 0.775).abs() < 1e-12);
        assert!((c.precision().unwrap() - 0.8).abs() < 1e-12);
        assert!((c.recall().unwrap() - 0.8).abs() < 1e-12);
        assert!((c.f1().unwrap() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn undefined_metrics_are_none_not_nan() {
        let only_positives = Confusion::from_pairs([(true, Some(false)), (true, Some(false))]);
        assert_eq!(only_positives.balanced_accuracy(), None);
        assert_eq!(only_positives.precision(), None);
        assert_eq!(only_positives.recall(), Some(0.0));
        assert_eq!(only_positives.f1(), Some(0.0));
        let only_negatives = Confusion::from_pairs([(false, Some(false)), (false, Some(true))]);
        assert_eq!(only_negatives.f1(), None);
        let json = serde_json::to_string(&only_positives.summary()).unwrap();
        assert!(json.contains("\"precision\":null"), "{json}");
    }

    #[test]
    fn auc_matches_hand_computed_cases() {
        // Perfect and inverted separation.
        assert_eq!(
            roc_auc(&[true, true, false, false], &[0.9, 0.8, 0.2, 0.1]),
            Some(1.0)
        );
        assert_eq!(
            roc_auc(&[true, true, false, false], &[0.1, 0.2, 0.8, 0.9]),
            Some(0.0)
        );
        // Pairs (p, n): (0.8, 0.1) win, (0.8, 0.4) win, (0.35, 0.1) win, (0.35, 0.4) loss: 3/4.
        assert_eq!(
            roc_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]),
            Some(0.75)
        );
        // A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
        assert_eq!(roc_auc(&[true, true, false], &[0.5, 0.9, 0.5]), Some(0.75));
        // Ties across classes: positives .3 .6 .2 .9 against negatives .3 .1 .6 win
        // 1.5 + 2.5 + 1 + 3 = 8 of 12 pairs.
        let labels = [true, false, true, true, false, false, true];
        let scores = [0.3, 0.3, 0.6, 0.2, 0.1, 0.6, 0.9];
        assert!((roc_auc(&labels, &scores).unwrap() - 8.0 / 12.0).abs() < 1e-12);
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
        assert_eq!(roc_auc(&[true, false], &[f64::NAN, 0.2]), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
