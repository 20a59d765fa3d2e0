//! Scoring an explanation: how well it lets a reader tell the latent's activating examples
//! from silent ones.
//!
//! - **Detection**: the LLM reads plain excerpts and says which contain what the explanation
//!   describes.
//! - **Fuzzing**: the LLM reads excerpts with tokens marked and says whether the marks sit on
//!   what the explanation describes; activating excerpts carry their true marks, silent ones
//!   as many random marks as an activating excerpt has on average.
//! - **Embedding**: no LLM; the cosine similarity between the explanation's and each
//!   excerpt's sentence embeddings, summarised by the ROC AUC.
//!
//! Per-example records follow delphi's shapes so its analysis scripts read our files.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::embedding::{cosine, SentenceEmbedder};
use crate::llm::{ChatRequest, Llm, TokenLogprobs, Usage};
use crate::metrics::{roc_auc, ClassificationSummary, Confusion};
use crate::prompts::{
    active_tokens, classifier_messages, highlight, parse_predictions, ClassifierTask,
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
    Fuzzing,
    /// Sentence-embedding similarity of explanation and excerpt (no LLM).
    Embedding,
}

impl Scorer {
    /// The folder name under `scores/` (delphi's names: `detection`, `fuzz`, `embedding`).
    pub fn dir_name(self) -> &'static str {
        match self {
            Scorer::Detection => "detection",
            Scorer::Fuzzing => "fuzz",
            Scorer::Embedding => "embedding",
        }
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

/// Marks for every sample: the true active tokens of activating samples; for fuzzing, random
/// tokens of silent ones, as many as activating samples have on average (at least one).
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
        .zip(&active)
        .filter(|(s, _)| s.activating)
        .map(|(_, a)| a.iter().filter(|&&m| m).count())
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
                let mut marked = vec![false; sample.tokens.len()];
                for i in rand::seq::index::sample(rng, marked.len(), n_marks.min(marked.len())) {
                    marked[i] = true;
                }
                marked
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
    let per_prompt = config.examples_per_prompt.max(1);
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
    use crate::llm::{BoxFuture, ChatResponse};

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
