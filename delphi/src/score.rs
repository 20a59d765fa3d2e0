//! Scoring an explanation: how well it lets a reader tell the latent's activating examples
//! from silent ones.
//!
//! - **Detection**: the LLM reads plain excerpts and says which contain what the explanation
//!   describes.
//! - **Fuzzing**: the LLM reads excerpts with tokens marked and says whether the marks sit on
//!   what the explanation describes; activating excerpts carry their true marks, silent ones
//!   as many random marks as an activating excerpt has active tokens on average.
//! - **Embedding**: no LLM; the cosine similarity between the explanation's and each
//!   excerpt's sentence embeddings, summarised by the ROC AUC.
//! - **Intruder**: no explanation; the LLM sees marked activating excerpts of one quantile
//!   and one silent excerpt with random marks, and must name the odd one out (Paulo and
//!   Belrose 2025): how recognisable the latent itself is.
//! - **Simulation**: the LLM, given the explanation, predicts the latent's activation (0-10)
//!   on every token of each excerpt; the expected value of its belief is correlated with the
//!   true activations (OpenAI's and delphi's all-at-once simulation, read from the model's
//!   log-probabilities).
//!
//! Per-example records follow delphi's shapes so its analysis scripts read our files.

use std::collections::BTreeMap;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::embedding::{cosine, SentenceEmbedder};
use crate::examples::normalized;
use crate::llm::{
    AnswerFormat, ChatRequest, ContinuationRequest, Llm, ReadRequest, TokenLogprobs, Usage,
};
use crate::metrics::{pearson, roc_auc, ClassificationSummary, Confusion};
use crate::prompts::{
    active_tokens, classifier_messages, highlight, intruder_messages, parse_intruder,
    parse_predictions, simulation_answer, simulation_messages, surprisal_prompt, ClassifierTask,
    RESPONSE_MARKER, SIMULATION_LEVELS, SURPRISAL_PLACEHOLDER,
};
use crate::Result;

/// The scorers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Scorer {
    /// Plain excerpts: does the explanation's concept occur?
    Detection,
    /// Marked excerpts: are the marks on the explanation's concept?
    #[value(alias = "fuzz")]
    Fuzzing,
    /// Sentence-embedding similarity of explanation and excerpt (no LLM).
    Embedding,
    /// Find the silent excerpt among marked activating ones (no explanation).
    Intruder,
    /// Predict each token's activation from the explanation (needs a model whose prompt
    /// log-probabilities can be read: a local one).
    Simulation,
    /// How much less surprising the explanation makes activating excerpts than silent ones
    /// (needs a model whose prompt log-probabilities can be read: a local one).
    Surprisal,
}

impl Scorer {
    /// The folder name under `scores/` (delphi's names: `detection`, `fuzz`, `embedding`).
    pub fn dir_name(self) -> &'static str {
        match self {
            Scorer::Detection => "detection",
            Scorer::Fuzzing => "fuzz",
            Scorer::Embedding => "embedding",
            Scorer::Intruder => "intruder",
            Scorer::Simulation => "simulation",
            Scorer::Surprisal => "surprisal",
        }
    }

    /// The scorer named `name` (`fuzz`, delphi's name, for fuzzing too); an unknown name is
    /// an error listing the known ones.
    pub fn parse(name: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).map_err(|_| {
            let known: Vec<String> = <Self as clap::ValueEnum>::value_variants()
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value)
                .map(|v| v.get_name().to_string())
                .collect();
            crate::Error::Invalid(format!(
                "unknown scorer '{name}' (known: {})",
                known.join(", ")
            ))
        })
    }

    /// Whether the scorer judges an explanation (all but the intruder scorer).
    pub fn uses_explanation(self) -> bool {
        self != Scorer::Intruder
    }
}

/// An excerpt to score, with what is known about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Text of each token.
    pub tokens: Vec<String>,
    /// The latent's activation per token.
    pub activations: Vec<f32>,
    /// Whether the latent fires in it.
    pub activating: bool,
    /// Quantile of an activating example (0 = strongest), -1 for a silent one (delphi's
    /// `distance`).
    pub distance: i64,
}

/// Settings of the LLM scorers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreConfig {
    /// Excerpts per prompt (delphi's CLI default 5).
    pub examples_per_prompt: usize,
    /// Upper bound on each answer's tokens.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Ask for token log-probabilities, giving a probability per excerpt and hence an AUC.
    pub logprobs: bool,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            examples_per_prompt: 5,
            max_tokens: 50,
            temperature: 0.0,
            logprobs: false,
        }
    }
}

impl ScoreConfig {
    /// Refuses settings no prompt can be made with: fewer than 1 excerpt per prompt, or
    /// answers of 0 tokens.
    pub fn validate(&self) -> Result<()> {
        if self.examples_per_prompt == 0 {
            return Err(crate::Error::Invalid(
                "examples_per_prompt (--examples-per-prompt) must be at least 1".into(),
            ));
        }
        if self.max_tokens == 0 {
            return Err(crate::Error::Invalid(
                "the scorer's max_tokens (--scorer-max-tokens) must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// One scored excerpt, in the shape of delphi's `ClassifierOutput`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifiedSample {
    /// Text of each token.
    pub str_tokens: Vec<String>,
    /// The latent's activation per token.
    pub activations: Vec<f32>,
    /// Quantile (activating) or -1 (silent).
    pub distance: i64,
    /// Whether the latent fires in it.
    pub activating: bool,
    /// The LLM's answer; `None` when it could not be read.
    pub prediction: Option<bool>,
    /// P(answer is 1), from log-probabilities when available.
    pub probability: Option<f64>,
    /// Whether the prediction matches; `None` without a prediction.
    pub correct: Option<bool>,
    /// The marked text shown for fuzzing (absent for detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highlighted: Option<String>,
}

/// One excerpt's similarity to the explanation, in the shape of delphi's embedding scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddedSample {
    /// The excerpt.
    pub text: String,
    /// Quantile (activating) or -1 (silent).
    pub distance: i64,
    /// Whether the latent fires in it.
    pub activating: bool,
    /// Cosine similarity between explanation and excerpt.
    pub similarity: f64,
}

/// Outcome of one LLM scorer on one latent.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierScore {
    /// Per excerpt.
    pub samples: Vec<ClassifiedSample>,
    /// Prompts whose answer could not be read.
    pub failed_prompts: usize,
    /// Tokens spent.
    pub usage: Usage,
}

/// Metrics of a latent's classified samples.
pub fn classifier_summary(samples: &[ClassifiedSample]) -> (ClassificationSummary, Option<f64>) {
    let summary =
        Confusion::from_pairs(samples.iter().map(|s| (s.activating, s.prediction))).summary();
    let with_probability: Vec<&ClassifiedSample> =
        samples.iter().filter(|s| s.probability.is_some()).collect();
    let auc = if with_probability.is_empty() {
        None
    } else {
        let labels: Vec<bool> = with_probability.iter().map(|s| s.activating).collect();
        let scores: Vec<f64> = with_probability
            .iter()
            .map(|s| s.probability.unwrap_or(0.0))
            .collect();
        roc_auc(&labels, &scores)
    };
    (summary, auc)
}

/// AUC of the similarities of a latent's embedded samples.
pub fn embedding_auc(samples: &[EmbeddedSample]) -> Option<f64> {
    let labels: Vec<bool> = samples.iter().map(|s| s.activating).collect();
    let scores: Vec<f64> = samples.iter().map(|s| s.similarity).collect();
    roc_auc(&labels, &scores)
}

/// One intruder prompt, in the shape of delphi's `IntruderSentence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntruderSentence {
    /// The excerpts as shown (marked), the intruder among them.
    pub examples: Vec<String>,
    /// Where the intruder is among them.
    pub intruder_index: usize,
    /// The quantile the activating excerpts come from (0 = strongest).
    pub chosen_quantile: i64,
    /// Per excerpt, the latent's activation per token.
    pub activations: Vec<Vec<f32>>,
    /// Per excerpt, the text of each token.
    pub tokens: Vec<Vec<String>>,
    /// The intruder's distance (-1: a silent excerpt).
    pub intruder_distance: i64,
}

/// One intruder prompt's outcome, in the shape of delphi's `IntruderResult`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntruderResult {
    /// What the LLM wrote before `[RESPONSE]:` (its reasoning).
    pub interpretation: String,
    /// The prompt's excerpts.
    pub sample: IntruderSentence,
    /// The excerpt the LLM named; `None` when its answer could not be read.
    pub prediction: Option<usize>,
    /// Where the intruder was.
    pub correct_index: usize,
    /// Whether it was found (false when the answer could not be read, as in delphi).
    pub correct: bool,
}

/// Outcome of the intruder scorer on one latent.
#[derive(Debug, Clone, PartialEq)]
pub struct IntruderScore {
    /// Per prompt.
    pub results: Vec<IntruderResult>,
    /// Prompts whose answer could not be read.
    pub failed_prompts: usize,
    /// Tokens spent.
    pub usage: Usage,
}

/// Share of a latent's intruder prompts whose intruder was found (an unreadable answer
/// counts as not found, as in delphi); `None` without prompts.
pub fn intruder_accuracy(results: &[IntruderResult]) -> Option<f64> {
    (!results.is_empty()).then(|| {
        let found = results.iter().filter(|r| r.correct).count();
        found as f64 / results.len() as f64
    })
}

/// Pearson's correlation as delphi writes it: a number, or the string `"nan"` when it is
/// undefined (constant activations or predictions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correlation(pub f64);

impl Serialize for Correlation {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            serializer.serialize_f64(self.0)
        } else {
            serializer.serialize_str("nan")
        }
    }
}

impl<'de> Deserialize<'de> for Correlation {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(f64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Number(value) => Ok(Self(value)),
            Written::Text(text) if text == "nan" => Ok(Self(f64::NAN)),
            Written::Text(text) => Err(serde::de::Error::custom(format!(
                "a correlation is a number or \"nan\", got {text:?}"
            ))),
        }
    }
}

/// One excerpt's simulated activations, in the shape of delphi's `SequenceSimulation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceSimulation {
    /// Text of each token.
    pub tokens: Vec<String>,
    /// The expected value of the model's belief about each token's activation (0-10).
    pub expected_activations: Vec<f64>,
    /// The scale of the values: `"simulated_normalized_activations"` (0-10).
    pub activation_scale: String,
    /// Left empty, as delphi does.
    pub distribution_values: Vec<Vec<u8>>,
    /// Left empty, as delphi does.
    pub distribution_probabilities: Vec<Vec<f64>>,
    /// Always `null` (no calibration).
    pub uncalibrated_simulation: Option<Box<SequenceSimulation>>,
}

/// One excerpt's simulation and its score, in the shape of delphi's
/// `ScoredSequenceSimulation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredSequenceSimulation {
    /// Quantile (activating) or -1 (silent).
    pub distance: i64,
    /// The simulated activations.
    pub simulation: SequenceSimulation,
    /// The true activations, 0-10 relative to the latent's maximum (0 for silent excerpts).
    pub true_activations: Vec<u8>,
    /// Correlation of simulated and true activations over this excerpt's tokens.
    pub ev_correlation_score: Correlation,
    /// Always 0, as in delphi.
    pub rsquared_score: i64,
    /// Always 0, as in delphi.
    pub absolute_dev_explained_score: i64,
}

/// A group of simulated excerpts and its score, in the shape of delphi's `ScoredSimulation`:
/// one group per quantile (`distance` quantile + 1) and, when there are silent excerpts, one
/// of all excerpts (`distance` 0), last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredSimulation {
    /// The group: 0 for all excerpts, q + 1 for the activating excerpts of quantile q.
    pub distance: i64,
    /// Its excerpts.
    pub scored_sequence_simulations: Vec<ScoredSequenceSimulation>,
    /// Correlation over all of the group's tokens concatenated (not a mean of excerpts').
    pub ev_correlation_score: Correlation,
    /// Always 0, as in delphi.
    pub rsquared_score: i64,
    /// Always 0, as in delphi.
    pub absolute_dev_explained_score: i64,
}

/// Refuses a reading response that does not hold one entry per text asked about: `llm`
/// `did` `got` of the `asked` `what` (e.g. "read 3 answers of 5").
fn check_read_all(llm: &dyn Llm, did: &str, got: usize, asked: usize, what: &str) -> Result<()> {
    if got == asked {
        return Ok(());
    }
    Err(crate::Error::Llm {
        backend: llm.name(),
        message: format!("{did} {got} {what} of {asked}"),
    })
}

/// One excerpt's surprisal, in the shape of delphi's `SurprisalOutput`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurprisalOutput {
    /// The excerpt's text (its tokens joined).
    pub text: String,
    /// Quantile of an activating excerpt (0 = strongest), -1 for a silent one.
    pub distance: i64,
    /// The surprisal (negative log-probability, nats) of each of the text's tokens (the
    /// scorer model's tokens) after the placeholder description.
    pub no_explanation: Vec<f64>,
    /// The same after the explanation.
    pub explanation: Vec<f64>,
    /// The latent's activation per token (the subject model's tokens).
    pub activations: Vec<f32>,
}

impl SurprisalOutput {
    /// How much the explanation lowers the text's mean surprisal per token (nats); `None`
    /// for a text of no tokens.
    pub fn surprisal_decrease(&self) -> Option<f64> {
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        (!self.explanation.is_empty() && self.explanation.len() == self.no_explanation.len())
            .then(|| mean(&self.no_explanation) - mean(&self.explanation))
    }

    /// Whether the latent fires anywhere in the excerpt (read from the activations, not
    /// `distance`: delphi's files give silent excerpts near activating ones a positive one).
    pub fn activating(&self) -> bool {
        self.activations.iter().any(|&a| a > 0.0)
    }
}

/// Outcome of the surprisal scorer on one latent.
#[derive(Debug, Clone, PartialEq)]
pub struct SurprisalScore {
    /// Per excerpt, as delphi writes them.
    pub outputs: Vec<SurprisalOutput>,
    /// Tokens spent.
    pub usage: Usage,
}

/// A latent's surprisal score: the ROC AUC of telling activating from silent excerpts by how
/// much the explanation lowers their mean surprisal; `None` without both kinds.
pub fn surprisal_auc(outputs: &[SurprisalOutput]) -> Option<f64> {
    let (labels, scores): (Vec<bool>, Vec<f64>) = outputs
        .iter()
        .filter_map(|o| Some((o.activating(), o.surprisal_decrease()?)))
        .unzip();
    roc_auc(&labels, &scores)
}

/// Runs the surprisal scorer (delphi's, after Paulo et al. 2024): a base model reads each
/// excerpt's text after a few-shot prompt ending with the explanation, and again after one
/// ending with a placeholder description; an explanation that fits the latent makes the
/// activating excerpts less surprising than the silent ones. Each prompt goes in one
/// request with all excerpts (the backend batches them after the prompt's KV cache).
/// Unlike delphi, every token of the text is scored (its first one too, after the prompt).
pub async fn surprisal(
    llm: &dyn Llm,
    explanation: &str,
    samples: &[Sample],
) -> Result<SurprisalScore> {
    let texts: Vec<String> = samples.iter().map(|s| s.tokens.concat()).collect();
    let mut usage = Usage::default();
    let mut surprisals = Vec::with_capacity(2);
    for description in [SURPRISAL_PLACEHOLDER, explanation] {
        let response = llm
            .continuation_logprobs(ContinuationRequest {
                prompt: surprisal_prompt(description),
                texts: texts.clone(),
            })
            .await?;
        check_read_all(llm, "scored", response.logprobs.len(), texts.len(), "texts")?;
        usage.add(response.usage);
        surprisals.push(response.logprobs);
    }
    let negated = |logprobs: &[f32]| logprobs.iter().map(|&lp| -(lp as f64)).collect();
    let outputs = samples
        .iter()
        .zip(texts)
        .zip(surprisals[0].iter().zip(&surprisals[1]))
        .map(|((sample, text), (without, with))| SurprisalOutput {
            text,
            distance: sample.distance,
            no_explanation: negated(without),
            explanation: negated(with),
            activations: sample.activations.clone(),
        })
        .collect();
    Ok(SurprisalScore { outputs, usage })
}

/// Outcome of the simulation scorer on one latent.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulationScore {
    /// The groups, as delphi writes them.
    pub groups: Vec<ScoredSimulation>,
    /// Tokens spent.
    pub usage: Usage,
}

/// A latent's simulation score: the correlation over all excerpts (the `distance` 0 group),
/// `None` without one or when it is undefined.
pub fn simulation_correlation(groups: &[ScoredSimulation]) -> Option<f64> {
    groups
        .iter()
        .find(|g| g.distance == 0)
        .map(|g| g.ev_correlation_score.0)
        .filter(|r| r.is_finite())
}

/// The expected activation of one token on delphi's 0-10 scale, from the log-probabilities
/// of the levels ([`SIMULATION_LEVELS`] order): the expected level, normalised over the
/// levels, times 10 / the top level. `None` when no level has any probability.
fn expected_level(logprobs: &[f32]) -> Option<f64> {
    let weights: Vec<f64> = logprobs.iter().map(|&lp| (lp as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let top = (SIMULATION_LEVELS.len() - 1) as f64;
    (total > 0.0 && total.is_finite()).then(|| {
        weights
            .iter()
            .enumerate()
            .map(|(level, w)| level as f64 * w)
            .sum::<f64>()
            / total
            * (10.0 / top)
    })
}

/// Runs the simulation scorer: for every excerpt, the model reads the explanation and the
/// excerpt's tokens with their activations hidden, and its expected activation per token is
/// compared with the true one (activating excerpts' activations scaled 0-10 against
/// `max_activation`, the latent's maximum; 0 for silent excerpts). All excerpts go in one
/// request (the backend batches them); an LLM error fails the scorer, as for [`classify`].
pub async fn simulate(
    llm: &dyn Llm,
    explanation: &str,
    samples: &[Sample],
    max_activation: f32,
) -> Result<SimulationScore> {
    if let Some(s) = samples
        .iter()
        .find(|s| s.activations.len() != s.tokens.len())
    {
        return Err(crate::Error::Invalid(format!(
            "an excerpt has {} tokens but {} activations",
            s.tokens.len(),
            s.activations.len()
        )));
    }
    let response = llm
        .read(ReadRequest {
            messages: simulation_messages(explanation),
            answers: samples
                .iter()
                .map(|s| simulation_answer(&s.tokens))
                .collect(),
            candidates: SIMULATION_LEVELS.iter().map(|l| l.to_string()).collect(),
        })
        .await?;
    check_read_all(
        llm,
        "read",
        response.logprobs.len(),
        samples.len(),
        "answers",
    )?;
    // A server reports only its most likely tokens at each place: where no level is among
    // them, the expected level is 0, as in OpenAI's simulator. Where no level is read anywhere,
    // the model cannot write them at all.
    let read: Vec<Vec<Option<f64>>> = response
        .logprobs
        .iter()
        .map(|answer| answer.iter().map(|levels| expected_level(levels)).collect())
        .collect();
    let places = read.iter().flatten().count();
    let unread = read
        .iter()
        .flatten()
        .filter(|level| level.is_none())
        .count();
    if unread > 0 && unread == places {
        return Err(crate::Error::Llm {
            backend: llm.name(),
            message: "no activation level 0-9 is a token the model could write".into(),
        });
    }
    if unread > 0 {
        tracing::debug!(
            "simulation: {unread} of {places} places had no level among the tokens read (level 0)"
        );
    }
    let mut scored = Vec::with_capacity(samples.len());
    for (sample, read) in samples.iter().zip(&read) {
        let expected: Vec<f64> = read.iter().map(|level| level.unwrap_or(0.0)).collect();
        if expected.len() != sample.tokens.len() {
            return Err(crate::Error::Llm {
                backend: llm.name(),
                message: format!(
                    "the answer was read at {} places for {} tokens",
                    read.len(),
                    sample.tokens.len()
                ),
            });
        }
        let true_activations = if sample.activating {
            normalized(&sample.activations, max_activation)
        } else {
            vec![0; sample.tokens.len()]
        };
        scored.push(ScoredSequenceSimulation {
            distance: sample.distance,
            ev_correlation_score: Correlation(pearson(&levels_f64(&true_activations), &expected)),
            simulation: SequenceSimulation {
                tokens: sample.tokens.clone(),
                expected_activations: expected,
                activation_scale: "simulated_normalized_activations".into(),
                distribution_values: Vec::new(),
                distribution_probabilities: Vec::new(),
                uncalibrated_simulation: None,
            },
            true_activations,
            rsquared_score: 0,
            absolute_dev_explained_score: 0,
        });
    }
    // Quantile groups in the order their first excerpt comes, then all excerpts.
    let mut quantiles: Vec<i64> = Vec::new();
    for s in scored.iter().filter(|s| s.distance >= 0) {
        if !quantiles.contains(&s.distance) {
            quantiles.push(s.distance);
        }
    }
    let mut groups: Vec<ScoredSimulation> = quantiles
        .into_iter()
        .map(|q| {
            let members = scored.iter().filter(|s| s.distance == q).cloned().collect();
            simulation_group(q + 1, members)
        })
        .collect();
    if samples.iter().any(|s| !s.activating) {
        groups.push(simulation_group(0, scored));
    }
    Ok(SimulationScore {
        groups,
        usage: response.usage,
    })
}

fn levels_f64(levels: &[u8]) -> Vec<f64> {
    levels.iter().map(|&l| l as f64).collect()
}

/// A group scored by the correlation over its excerpts' tokens concatenated.
fn simulation_group(distance: i64, members: Vec<ScoredSequenceSimulation>) -> ScoredSimulation {
    let truth: Vec<f64> = members
        .iter()
        .flat_map(|m| levels_f64(&m.true_activations))
        .collect();
    let expected: Vec<f64> = members
        .iter()
        .flat_map(|m| m.simulation.expected_activations.iter().copied())
        .collect();
    ScoredSimulation {
        distance,
        ev_correlation_score: Correlation(pearson(&truth, &expected)),
        scored_sequence_simulations: members,
        rsquared_score: 0,
        absolute_dev_explained_score: 0,
    }
}

/// `count` random tokens of `tokens` marked (all of them when there are fewer).
fn random_marks(tokens: usize, count: usize, rng: &mut rand::rngs::StdRng) -> Vec<bool> {
    let mut marked = vec![false; tokens];
    for i in rand::seq::index::sample(rng, tokens, count.min(tokens)) {
        marked[i] = true;
    }
    marked
}

/// Refuses settings the intruder scorer cannot use: fewer than 3 excerpts per prompt
/// leaves no odd one out.
pub fn check_intruder_config(config: &ScoreConfig) -> Result<()> {
    config.validate()?;
    if config.examples_per_prompt < 3 {
        return Err(crate::Error::Invalid(format!(
            "the intruder scorer needs at least 3 excerpts per prompt, got {}",
            config.examples_per_prompt
        )));
    }
    Ok(())
}

/// Runs the intruder scorer on `samples`: one prompt per silent excerpt (the intruder),
/// shown among up to [`ScoreConfig::examples_per_prompt`]` - 1` activating excerpts of one
/// quantile (quantiles taken in turn, excerpts drawn with `seed`) at a random position.
/// Activating excerpts carry their true marks, the intruder as many random marks as they
/// have on average, rounded up (delphi: the rounded-down mean count of tokens with any
/// activation, even those too weak to be marked). As for [`classify`], an LLM error fails
/// the scorer and an unreadable answer is counted. No prompt without both kinds of excerpt;
/// fewer than 3 excerpts per prompt is refused, and a quantile with only one activating
/// excerpt is not shown (there would be no odd one out).
pub async fn intrude(
    llm: &dyn Llm,
    samples: &[Sample],
    config: &ScoreConfig,
    seed: u64,
) -> Result<IntruderScore> {
    check_intruder_config(config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut quantiles: BTreeMap<i64, Vec<&Sample>> = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.activating) {
        quantiles.entry(sample.distance).or_default().push(sample);
    }
    // With one activating excerpt there is no odd one out (and chance would be 1/2).
    quantiles.retain(|_, group| group.len() >= 2);
    let silent = samples.iter().filter(|s| !s.activating);
    let per_prompt = config.examples_per_prompt - 1;
    let mut prompts = Vec::new();
    for (intruder, (&quantile, group)) in silent.zip(quantiles.iter().cycle()) {
        let chosen: Vec<&Sample> = group
            .choose_multiple(&mut rng, per_prompt.min(group.len()))
            .copied()
            .collect();
        let marks: Vec<Vec<bool>> = chosen
            .iter()
            .map(|s| active_tokens(&s.activations))
            .collect();
        let marked: usize = marks.iter().flatten().filter(|&&m| m).count();
        let n_marks = marked.div_ceil(chosen.len()).max(1);
        let intruder_marks = random_marks(intruder.tokens.len(), n_marks, &mut rng);
        let at = rng.random_range(0..=chosen.len());
        let mut shown: Vec<(&Sample, Vec<bool>)> = chosen.into_iter().zip(marks).collect();
        shown.insert(at, (intruder, intruder_marks));
        prompts.push(IntruderSentence {
            examples: shown.iter().map(|(s, m)| highlight(&s.tokens, m)).collect(),
            intruder_index: at,
            chosen_quantile: quantile,
            activations: shown.iter().map(|(s, _)| s.activations.clone()).collect(),
            tokens: shown.iter().map(|(s, _)| s.tokens.clone()).collect(),
            intruder_distance: intruder.distance,
        });
    }
    let requests = prompts.iter().map(|prompt| {
        llm.chat(ChatRequest {
            messages: intruder_messages(&prompt.examples),
            max_tokens: config.max_tokens,
            temperature: config.temperature,
            top_logprobs: None,
            format: None,
        })
    });
    let responses = futures::future::try_join_all(requests).await?;
    let mut usage = Usage::default();
    let mut failed_prompts = 0;
    let results = prompts
        .into_iter()
        .zip(responses)
        .map(|(sample, response)| {
            usage.add(response.usage);
            let prediction = parse_intruder(&response.text, sample.examples.len());
            if prediction.is_none() {
                failed_prompts += 1;
                let shown: String = response.text.chars().take(200).collect();
                tracing::warn!(
                    "intruder answer without {RESPONSE_MARKER} and a number below {}: {shown:?}",
                    sample.examples.len()
                );
            }
            // The reasoning: everything before the last marker.
            let interpretation = response
                .text
                .rsplit_once(RESPONSE_MARKER)
                .map_or(response.text.as_str(), |(before, _)| before)
                .trim()
                .to_string();
            IntruderResult {
                interpretation,
                correct_index: sample.intruder_index,
                correct: prediction == Some(sample.intruder_index),
                prediction,
                sample,
            }
        })
        .collect();
    Ok(IntruderScore {
        results,
        failed_prompts,
        usage,
    })
}

/// Marks for every sample: the true active tokens of activating samples; for fuzzing, random
/// tokens of silent ones, as many as activating samples have tokens with any activation on
/// average, rounded up (at least one). That count, delphi's, includes tokens too weak to be
/// marked, so decoys tend to carry more marks than true excerpts; kept for comparable scores.
fn marks(
    task: ClassifierTask,
    samples: &[Sample],
    rng: &mut rand::rngs::StdRng,
) -> Vec<Option<Vec<bool>>> {
    if task == ClassifierTask::Detection {
        return vec![None; samples.len()];
    }
    let active: Vec<Vec<bool>> = samples
        .iter()
        .map(|s| active_tokens(&s.activations))
        .collect();
    let activating: Vec<usize> = samples
        .iter()
        .filter(|s| s.activating)
        .map(|s| s.activations.iter().filter(|&&a| a > 0.0).count())
        .collect();
    let mean = activating.iter().sum::<usize>() as f64 / activating.len().max(1) as f64;
    let n_marks = (mean.ceil() as usize).max(1);
    samples
        .iter()
        .zip(active)
        .map(|(sample, active)| {
            Some(if sample.activating {
                active
            } else {
                random_marks(sample.tokens.len(), n_marks, rng)
            })
        })
        .collect()
}

/// P(1) for each 0/1 answer token, from the alternatives' log-probabilities; `None` unless
/// exactly `expected` answer tokens are found.
fn answer_probabilities(logprobs: &[TokenLogprobs], expected: usize) -> Option<Vec<f64>> {
    let probabilities: Vec<f64> = logprobs
        .iter()
        .filter(|t| matches!(t.token.trim(), "0" | "1"))
        .map(|t| {
            let mass = |digit: &str| -> f64 {
                t.top
                    .iter()
                    .filter(|(tok, _)| tok.trim() == digit)
                    .map(|(_, lp)| (*lp as f64).exp())
                    .sum()
            };
            let (one, zero) = (mass("1"), mass("0"));
            if one + zero > 0.0 {
                one / (one + zero)
            } else if t.token.trim() == "1" {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    (probabilities.len() == expected).then_some(probabilities)
}

/// Runs detection or fuzzing on `samples`: shuffled with `seed`, asked in prompts of
/// [`ScoreConfig::examples_per_prompt`], all prompts in flight together (the client bounds
/// concurrency). An LLM error fails the whole scorer (nothing partial is returned); an
/// unreadable answer leaves that prompt's predictions empty and is counted.
pub async fn classify(
    llm: &dyn Llm,
    task: ClassifierTask,
    explanation: &str,
    mut samples: Vec<Sample>,
    config: &ScoreConfig,
    seed: u64,
) -> Result<ClassifierScore> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    samples.shuffle(&mut rng);
    let marks = marks(task, &samples, &mut rng);
    let texts: Vec<String> = samples
        .iter()
        .zip(&marks)
        .map(|(s, m)| match m {
            Some(marked) => highlight(&s.tokens, marked),
            None => s.tokens.concat(),
        })
        .collect();
    config.validate()?;
    let per_prompt = config.examples_per_prompt;
    let batches: Vec<std::ops::Range<usize>> = (0..samples.len())
        .step_by(per_prompt)
        .map(|start| start..(start + per_prompt).min(samples.len()))
        .collect();
    let requests = batches.iter().map(|range| {
        let request = ChatRequest {
            messages: classifier_messages(task, explanation, &texts[range.clone()]),
            max_tokens: config.max_tokens,
            temperature: config.temperature,
            top_logprobs: config.logprobs.then_some(5),
            format: Some(AnswerFormat::ZeroOneList { len: range.len() }),
        };
        llm.chat(request)
    });
    let responses = futures::future::try_join_all(requests).await?;
    let mut out = Vec::with_capacity(samples.len());
    let mut usage = Usage::default();
    let mut failed_prompts = 0;
    for (range, response) in batches.into_iter().zip(responses) {
        usage.add(response.usage);
        let predictions = parse_predictions(&response.text, range.len());
        if predictions.is_none() {
            failed_prompts += 1;
            let shown: String = response.text.chars().take(200).collect();
            tracing::warn!(
                "unreadable scorer answer ({} excerpts asked): {shown:?}",
                range.len()
            );
        }
        let probabilities = response
            .logprobs
            .as_deref()
            .and_then(|lp| answer_probabilities(lp, range.len()));
        for (j, i) in range.enumerate() {
            let sample = &samples[i];
            let prediction = predictions.as_ref().map(|p| p[j]);
            out.push(ClassifiedSample {
                str_tokens: sample.tokens.clone(),
                activations: sample.activations.clone(),
                distance: sample.distance,
                activating: sample.activating,
                prediction,
                probability: probabilities.as_ref().map(|p| p[j]),
                correct: prediction.map(|p| p == sample.activating),
                highlighted: marks[i].is_some().then(|| texts[i].clone()),
            });
        }
    }
    Ok(ClassifierScore {
        samples: out,
        failed_prompts,
        usage,
    })
}

/// Scores an explanation by sentence-embedding similarity to each sample's text.
pub fn embed_score(
    embedder: &SentenceEmbedder,
    explanation: &str,
    samples: &[Sample],
) -> Result<Vec<EmbeddedSample>> {
    let texts: Vec<String> = samples.iter().map(|s| s.tokens.concat()).collect();
    let mut inputs: Vec<&str> = vec![explanation];
    inputs.extend(texts.iter().map(String::as_str));
    let vectors = embedder.embed(&inputs)?;
    let query = &vectors[0];
    Ok(samples
        .iter()
        .zip(texts)
        .zip(&vectors[1..])
        .map(|((sample, text), vector)| EmbeddedSample {
            text,
            distance: sample.distance,
            activating: sample.activating,
            similarity: cosine(query, vector) as f64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{BoxFuture, ChatResponse, ReadResponse};

    /// Answers every prompt by marking excerpts that contain "cat" (detection) or whose marks
    /// are on "cat" (fuzzing); returns garbage for prompts containing "broken".
    struct CatJudge;

    impl Llm for CatJudge {
        fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
            Box::pin(async move {
                let prompt = &request.messages.last().unwrap().content;
                let answers: Vec<&str> = prompt
                    .lines()
                    .filter(|l| l.starts_with("Example "))
                    .map(|l| {
                        if l.contains("cat") && !l.contains("<< ") {
                            "1"
                        } else {
                            "0"
                        }
                    })
                    .collect();
                let text = if prompt.contains("broken") {
                    "I am not sure.".to_string()
                } else {
                    format!("[{}]", answers.join(", "))
                };
                Ok(ChatResponse {
                    text,
                    logprobs: None,
                    truncated: false,
                    usage: Usage {
                        prompt_tokens: 10,
                        completion_tokens: 3,
                    },
                })
            })
        }
        fn name(&self) -> String {
            "cat judge".into()
        }
    }

    fn sample(text: &[&str], acts: &[f32]) -> Sample {
        let activating = acts.iter().any(|&a| a > 0.0);
        Sample {
            tokens: text.iter().map(|t| t.to_string()).collect(),
            activations: acts.to_vec(),
            activating,
            distance: if activating { 0 } else { -1 },
        }
    }

    fn samples() -> Vec<Sample> {
        let mut s = Vec::new();
        for _ in 0..6 {
            s.push(sample(&["a", " cat", " sat"], &[0.0, 5.0, 0.0]));
            s.push(sample(&["a", " dog", " sat"], &[0.0, 0.0, 0.0]));
        }
        s
    }

    #[test]
    fn detection_with_a_perfect_judge_scores_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let config = ScoreConfig {
            examples_per_prompt: 5,
            ..ScoreConfig::default()
        };
        let score = rt
            .block_on(classify(
                &CatJudge,
                ClassifierTask::Detection,
                "cats",
                samples(),
                &config,
                1,
            ))
            .unwrap();
        assert_eq!(score.samples.len(), 12);
        assert_eq!(score.failed_prompts, 0);
        assert_eq!(
            score.usage,
            Usage {
                prompt_tokens: 30,
                completion_tokens: 9
            }
        );
        let (summary, auc) = classifier_summary(&score.samples);
        assert_eq!(summary.balanced_accuracy, Some(1.0));
        assert_eq!(auc, None);
        assert!(score
            .samples
            .iter()
            .all(|s| s.correct == Some(true) && s.highlighted.is_none()));
    }

    #[test]
    fn fuzzing_marks_true_tokens_and_random_tokens_on_silent_samples() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let score = rt
            .block_on(classify(
                &CatJudge,
                ClassifierTask::Fuzzing,
                "cats",
                samples(),
                &ScoreConfig::default(),
                3,
            ))
            .unwrap();
        for s in &score.samples {
            let text = s.highlighted.as_deref().unwrap();
            assert_eq!(text.matches("<<").count(), 1, "{text}");
            if s.activating {
                assert_eq!(text, "a<< cat>> sat");
            }
        }
    }

    /// As in delphi, a decoy gets as many marks as true excerpts have tokens with any
    /// activation (here 2: one marked, one below the marking threshold), not marked tokens.
    #[test]
    fn fuzzing_decoys_count_every_active_token() {
        let samples = vec![
            sample(&["a", " cat", " sat", "."], &[0.1, 5.0, 0.0, 0.0]),
            sample(&["a", " dog", " sat", "."], &[0.0; 4]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let marks = marks(ClassifierTask::Fuzzing, &samples, &mut rng);
        let count = |m: &Option<Vec<bool>>| m.as_ref().unwrap().iter().filter(|&&b| b).count();
        assert_eq!(marks[0], Some(vec![false, true, false, false]));
        assert_eq!(count(&marks[1]), 2);
    }

    #[test]
    fn unreadable_answers_are_counted_not_guessed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let score = rt
            .block_on(classify(
                &CatJudge,
                ClassifierTask::Detection,
                "broken",
                samples(),
                &ScoreConfig::default(),
                1,
            ))
            .unwrap();
        assert_eq!(score.failed_prompts, 3);
        assert!(score
            .samples
            .iter()
            .all(|s| s.prediction.is_none() && s.correct.is_none()));
        let (summary, _) = classifier_summary(&score.samples);
        assert_eq!(summary.confusion.failed, 12);
        assert_eq!(summary.balanced_accuracy, None);
    }

    /// Names the excerpt without "cat" as the intruder, or always `fixed` when given;
    /// rambles without an answer when the prompt holds "dog" and `ramble` is set.
    struct OddOneOut {
        fixed: Option<usize>,
        ramble: bool,
    }

    impl Llm for OddOneOut {
        fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
            Box::pin(async move {
                let prompt = &request.messages.last().unwrap().content;
                let odd = prompt
                    .lines()
                    .filter(|l| l.starts_with("Example "))
                    .position(|l| !l.contains("cat"))
                    .unwrap();
                let text = match (self.fixed, self.ramble) {
                    (_, true) => "They all look alike to me.".to_string(),
                    (Some(n), _) => format!("[RESPONSE]: {n}"),
                    (None, _) => format!("No cat there. [RESPONSE]: {odd}"),
                };
                Ok(ChatResponse {
                    text,
                    logprobs: None,
                    truncated: false,
                    usage: Usage {
                        prompt_tokens: 10,
                        completion_tokens: 5,
                    },
                })
            })
        }
        fn name(&self) -> String {
            "odd one out".into()
        }
    }

    /// Two quantiles of activating cat excerpts (3 and 2 of them) and 6 silent dog excerpts.
    fn quantiled_samples() -> Vec<Sample> {
        let cat = |distance| Sample {
            distance,
            ..sample(&["a", " cat", " sat"], &[0.0, 5.0, 0.0])
        };
        let dog = sample(&["a", " dog", " sat"], &[0.0, 0.0, 0.0]);
        let mut s = vec![cat(0), cat(0), cat(0), cat(1), cat(1)];
        s.extend(std::iter::repeat_n(dog, 6));
        s
    }

    #[test]
    fn intruder_prompts_hide_one_silent_excerpt_among_marked_activating_ones() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let samples = quantiled_samples();
        assert_eq!(samples.iter().filter(|s| !s.activating).count(), 6);
        let judge = OddOneOut {
            fixed: None,
            ramble: false,
        };
        let config = ScoreConfig::default();
        let score = rt.block_on(intrude(&judge, &samples, &config, 7)).unwrap();
        // One prompt per silent excerpt, quantiles in turn.
        assert_eq!(score.results.len(), 6);
        let quantiles: Vec<i64> = score
            .results
            .iter()
            .map(|r| r.sample.chosen_quantile)
            .collect();
        assert_eq!(quantiles, vec![0, 1, 0, 1, 0, 1]);
        for r in &score.results {
            let sample = &r.sample;
            // Quantile 0 has 3 excerpts, quantile 1 has 2 (fewer than the 4 allowed).
            assert_eq!(sample.examples.len(), 4 - sample.chosen_quantile as usize);
            for (i, text) in sample.examples.iter().enumerate() {
                assert_eq!(text.matches("<<").count(), 1, "{text}");
                if i == sample.intruder_index {
                    assert!(text.contains("dog") && sample.intruder_distance == -1);
                } else {
                    assert_eq!(text, "a<< cat>> sat");
                }
            }
            assert_eq!((r.prediction, r.correct), (Some(r.correct_index), true));
            assert_eq!(r.interpretation, "No cat there.");
        }
        assert_eq!(intruder_accuracy(&score.results), Some(1.0));
        assert_eq!(
            (score.failed_prompts, score.usage.completion_tokens),
            (0, 30)
        );
        // The same seed gives the same prompts; the intruder's place varies.
        let again = rt.block_on(intrude(&judge, &samples, &config, 7)).unwrap();
        assert_eq!(again, score);
        let places: std::collections::BTreeSet<usize> =
            score.results.iter().map(|r| r.correct_index).collect();
        assert!(places.len() > 1, "{places:?}");

        // A judge that always names excerpt 0 is right where the intruder was put first;
        // unreadable answers count as misses.
        let first = rt
            .block_on(intrude(
                &OddOneOut {
                    fixed: Some(0),
                    ramble: false,
                },
                &samples,
                &config,
                7,
            ))
            .unwrap();
        let at_zero = score
            .results
            .iter()
            .filter(|r| r.correct_index == 0)
            .count();
        assert_eq!(
            intruder_accuracy(&first.results),
            Some(at_zero as f64 / 6.0)
        );
        let lost = rt
            .block_on(intrude(
                &OddOneOut {
                    fixed: None,
                    ramble: true,
                },
                &samples,
                &config,
                7,
            ))
            .unwrap();
        assert_eq!(lost.failed_prompts, 6);
        assert!(lost
            .results
            .iter()
            .all(|r| r.prediction.is_none() && !r.correct));
        assert_eq!(intruder_accuracy(&lost.results), Some(0.0));
        let two = ScoreConfig {
            examples_per_prompt: 2,
            ..ScoreConfig::default()
        };
        let refused = rt.block_on(intrude(&judge, &samples, &two, 7)).unwrap_err();
        assert!(refused.to_string().contains("at least 3"), "{refused}");
        // Without silent excerpts there is nothing to ask.
        let only_active: Vec<Sample> = samples.into_iter().filter(|s| s.activating).collect();
        let none = rt
            .block_on(intrude(&judge, &only_active, &config, 7))
            .unwrap();
        assert!(none.results.is_empty() && intruder_accuracy(&none.results).is_none());
    }

    /// Reads simulation prompts: a token holding "cat" is believed 6 or 9 with equal odds
    /// (7.5 of 9, 25/3 on delphi's 0-10 scale), any other token 0 for sure; level 5 is not a
    /// token of this model.
    struct CatSimulator;

    impl Llm for CatSimulator {
        fn chat(&self, _: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
            unreachable!("the simulation scorer only reads")
        }
        fn read(&self, request: ReadRequest) -> BoxFuture<'_, Result<ReadResponse>> {
            Box::pin(async move {
                assert_eq!(request.candidates, SIMULATION_LEVELS);
                let prompt = &request.messages.last().unwrap().content;
                assert!(prompt.ends_with("cats"), "{prompt}");
                let read = |piece: &String| {
                    let token = piece.rsplit('\n').next().unwrap();
                    assert!(token.ends_with('\t'), "{piece:?}");
                    let mut levels = vec![f32::NEG_INFINITY; 10];
                    if token.contains("cat") {
                        levels[6] = 0.5f32.ln();
                        levels[9] = 0.5f32.ln();
                    } else {
                        levels[0] = 0.0;
                    }
                    levels
                };
                let logprobs: Vec<Vec<Vec<f32>>> = request
                    .answers
                    .iter()
                    .map(|answer| answer.iter().map(read).collect())
                    .collect();
                Ok(ReadResponse {
                    usage: Usage {
                        prompt_tokens: 100 * logprobs.len() as u64,
                        completion_tokens: 0,
                    },
                    logprobs,
                })
            })
        }
        fn name(&self) -> String {
            "cat simulator".into()
        }
    }

    #[test]
    fn simulation_correlates_expected_and_true_activations_as_delphi() {
        let mut samples = vec![
            sample(&[" the", " cat", " sat"], &[0.0, 4.0, 0.0]),
            sample(&[" a", " cat"], &[0.0, 1.0]),
            sample(&[" dog", " cat"], &[0.0, 0.0]),
        ];
        samples[1].distance = 1;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let score = runtime
            .block_on(simulate(&CatSimulator, "Mentions of cats", &samples, 4.0))
            .unwrap();
        assert_eq!(score.usage.prompt_tokens, 300);
        let distances: Vec<i64> = score.groups.iter().map(|g| g.distance).collect();
        assert_eq!(distances, [1, 2, 0]);
        let all = &score.groups[2];
        let sims = &all.scored_sequence_simulations;
        // True levels: ceil(10 a / 4) for activating excerpts, 0 for the silent one.
        assert_eq!(sims[0].true_activations, [0, 10, 0]);
        assert_eq!(sims[1].true_activations, [0, 3]);
        assert_eq!(sims[2].true_activations, [0, 0]);
        let cat = 7.5 * 10.0 / 9.0;
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(
            &sims[0].simulation.expected_activations,
            &[0.0, cat, 0.0]
        ));
        assert!(close(&sims[2].simulation.expected_activations, &[0.0, cat]));
        // Over all tokens concatenated (statistics.correlation in Python).
        let r = all.ev_correlation_score.0;
        assert!((r - 0.6159131805828746).abs() < 1e-12, "{r}");
        assert_eq!(simulation_correlation(&score.groups), Some(r));
        assert!((score.groups[0].ev_correlation_score.0 - 1.0).abs() < 1e-12);
        assert_eq!(score.groups[0].scored_sequence_simulations.len(), 1);
        // delphi's file shape; an undefined correlation is written "nan" and read back.
        let json = serde_json::to_value(&score.groups).unwrap();
        let silent = &json[2]["scored_sequence_simulations"][2];
        assert_eq!(silent["ev_correlation_score"], "nan");
        assert_eq!(silent["distance"], -1);
        assert_eq!(
            silent["simulation"]["activation_scale"],
            "simulated_normalized_activations"
        );
        assert_eq!(silent["rsquared_score"], 0);
        let back: Vec<ScoredSimulation> = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        assert!(serde_json::from_str::<Correlation>("\"inf\"").is_err());
        // Without silent excerpts there is no group of all, hence no latent score.
        let only_active = runtime
            .block_on(simulate(
                &CatSimulator,
                "Mentions of cats",
                &samples[..2],
                4.0,
            ))
            .unwrap();
        assert!(only_active.groups.iter().all(|g| g.distance > 0));
        assert_eq!(simulation_correlation(&only_active.groups), None);
        // Activations that do not match the tokens are refused, not scored.
        let mut bad = samples[0].clone();
        bad.activations.pop();
        let error = runtime
            .block_on(simulate(&CatSimulator, "Mentions of cats", &[bad], 4.0))
            .unwrap_err()
            .to_string();
        assert_eq!(error, "an excerpt has 3 tokens but 2 activations");
    }

    /// [`CatSimulator`] that reads no level at all after the tokens holding `blind` (as a
    /// server reporting only its most likely tokens may).
    struct Blind(&'static str);

    impl Llm for Blind {
        fn chat(&self, _: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
            unreachable!("the simulation scorer only reads")
        }
        fn read(&self, request: ReadRequest) -> BoxFuture<'_, Result<ReadResponse>> {
            Box::pin(async move {
                let answers = request.answers.clone();
                let mut read = CatSimulator.read(request).await?;
                for (answer, rows) in answers.iter().zip(&mut read.logprobs) {
                    for (piece, row) in answer.iter().zip(rows) {
                        if piece.rsplit('\n').next().unwrap().contains(self.0) {
                            row.fill(f32::NEG_INFINITY);
                        }
                    }
                }
                Ok(read)
            })
        }
        fn name(&self) -> String {
            "blind simulator".into()
        }
    }

    /// A place where no level was read counts as level 0 (OpenAI's simulator); no level
    /// read anywhere is an error.
    #[test]
    fn places_without_a_level_read_count_as_level_0() {
        let samples = vec![sample(&[" the", " cat", " sat"], &[0.0, 4.0, 0.0])];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let simulate_with =
            |llm: &dyn Llm| runtime.block_on(simulate(llm, "Mentions of cats", &samples, 4.0));
        let expected = |score: SimulationScore| {
            score.groups[0].scored_sequence_simulations[0]
                .simulation
                .expected_activations
                .clone()
        };
        let cat = 7.5 * 10.0 / 9.0;
        assert_eq!(
            expected(simulate_with(&CatSimulator).unwrap()),
            [0.0, cat, 0.0]
        );
        assert_eq!(expected(simulate_with(&Blind("cat")).unwrap()), [0.0; 3]);
        let error = simulate_with(&Blind("")).unwrap_err().to_string();
        assert!(error.contains("no activation level 0-9"), "{error}");
    }

    #[test]
    fn a_model_that_cannot_read_prompts_fails_the_simulation() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let error = runtime
            .block_on(simulate(
                &CatJudge,
                "cats",
                &[sample(&[" cat"], &[1.0])],
                1.0,
            ))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cat judge: this backend cannot read"),
            "{error}"
        );
        let error = runtime
            .block_on(surprisal(&CatJudge, "cats", &[sample(&[" cat"], &[1.0])]))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cat judge: this backend cannot read"),
            "{error}"
        );
    }

    #[test]
    fn surprisal_auc_ranks_excerpts_by_the_fall_in_mean_surprisal() {
        let output = |activating: bool, without: &[f64], with: &[f64]| SurprisalOutput {
            text: String::new(),
            distance: if activating { 0 } else { -1 },
            no_explanation: without.to_vec(),
            explanation: with.to_vec(),
            activations: vec![if activating { 2.0 } else { 0.0 }],
        };
        let outputs = [
            output(true, &[3.0, 5.0], &[1.0, 3.0]), // falls by 2
            output(false, &[3.0], &[2.5]),          // falls by 0.5
            output(true, &[1.0], &[0.0]),           // falls by 1
            output(false, &[], &[]),                // no tokens: left out
        ];
        assert_eq!(outputs[0].surprisal_decrease(), Some(2.0));
        assert_eq!(outputs[3].surprisal_decrease(), None);
        assert_eq!(surprisal_auc(&outputs), Some(1.0));
        assert_eq!(surprisal_auc(&outputs[..1]), None, "one class only");
        let reversed = [output(true, &[1.0], &[1.0]), output(false, &[2.0], &[1.0])];
        assert_eq!(surprisal_auc(&reversed), Some(0.0));
    }

    #[test]
    fn probabilities_come_from_the_answer_tokens() {
        let token = |t: &str, one: f32, zero: f32| TokenLogprobs {
            token: t.into(),
            logprob: 0.0,
            top: vec![
                ("1".into(), one.ln()),
                ("0".into(), zero.ln()),
                (",".into(), 0.01f32.ln()),
            ],
        };
        let comma = TokenLogprobs {
            token: ",".into(),
            logprob: 0.0,
            top: vec![],
        };
        let lp = vec![token("1", 0.6, 0.2), comma.clone(), token(" 0", 0.1, 0.3)];
        let p = answer_probabilities(&lp, 2).unwrap();
        assert!(
            (p[0] - 0.75).abs() < 1e-6 && (p[1] - 0.25).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(answer_probabilities(&lp, 3), None);
    }
}
