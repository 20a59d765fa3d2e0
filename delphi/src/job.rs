//! Batch jobs: explain and score many latents, writing one explanation file and one file
//! per scorer and latent, atomically. Re-running skips what is on disk, so an interrupted or
//! partly failed job is finished by running it again; `shard i/n` splits the latents
//! deterministically so that n machines can share a job and their merged output equals one
//! machine's.
//!
//! Output layout (delphi's): `explanations/<hookpoint>_latent<i>.txt` (a JSON string),
//! `scores/<scorer>/<hookpoint>_latent<i>.txt` (a JSON list of per-excerpt records),
//! `run_config.json`, and `summary.json` (written by [`summarize`]).
//!
//! What counts as done: an explanation that parsed and was not cut off at `max_tokens`, and
//! a scorer's results whose answers could all be read (unless
//! [`RunOptions::keep_unreadable`]); anything else is left for the next run.
//! `run_config.json` holds the settings and the [`Sources`] the results were made from; a
//! rerun with other settings or from other sources is refused.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use hooks::Tokenizer;

use crate::embedding::SentenceEmbedder;
use crate::examples::{build_examples, latent_seed, Example, ExampleConfig, LatentExamples, Skip};
use crate::explain::{explain, ExplainConfig};
use crate::latents::{CacheIdentity, LatentCache, TokenTable};
use crate::llm::{Llm, Usage};
use crate::metrics::{median, Confusion};
use crate::prompts::{ClassifierTask, ShownExample};
use crate::score::{
    check_intruder_config, classifier_summary, classify, embed_score, embedding_auc, intrude,
    intruder_accuracy, simulate, simulation_correlation, surprisal, surprisal_auc,
    ClassifiedSample, EmbeddedSample, IntruderResult, Sample, ScoreConfig, ScoredSimulation,
    Scorer, SurprisalOutput,
};
use crate::{Error, Result};

/// Which part of a job this process runs: latents whose index is `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This process's part, from 0.
    pub index: usize,
    /// Number of parts.
    pub count: usize,
}

impl Shard {
    /// The whole job.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n` (0 <= i < n).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "shard '{text}' must be i/n with 0 <= i < n, e.g. 0/4"
            ))
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Whether `latent` belongs to this shard.
    pub fn contains(&self, latent: u32) -> bool {
        latent as usize % self.count == self.index
    }

    /// Refuses a second run of this shard into `output` while one runs (the same command
    /// started twice would ask the LLM twice for every latent); other shards run side by side.
    fn lock(&self, output: &Path) -> Result<hooks::atomic::FolderLock> {
        let name = format!(
            ".eleuther-interp-shard-{}-of-{}.lock",
            self.index, self.count
        );
        Ok(hooks::atomic::lock_folder_as(output, &name)?)
    }
}

/// Everything that decides a job's results (saved as `run_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Hook points whose latents are explained.
    pub hookpoints: Vec<String>,
    /// Latent indices to explain at each hook point.
    pub latents: Range<u32>,
    /// Scorers to run.
    pub scorers: Vec<Scorer>,
    /// Example construction.
    pub examples: ExampleConfig,
    /// Explainer settings.
    pub explain: ExplainConfig,
    /// Scorer settings.
    pub score: ScoreConfig,
    /// How the job cached its own latents (`delphi run --data`: data files, sequence length,
    /// token limit); `None` when it reads a given cache. A rerun with other data settings is
    /// refused before the cache is touched.
    #[serde(default)]
    pub data: Option<String>,
}

/// What a job's results were made from besides its settings, recorded in `run_config.json`
/// by [`run_job`]; a rerun from another cache, tokenizer or LLM is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    /// The latent cache (its data, model, SAEs and size).
    pub latent_cache: CacheIdentity,
    /// Fingerprint of the tokenizer that turns token ids into the text shown to the LLM.
    pub tokenizer: String,
    /// The explainer model ([`Llm::model_id`]).
    pub explainer: String,
    /// The scorer model.
    pub scorer: String,
    /// Where the explainer was reached ([`Llm::name`], without credentials); recorded for
    /// reference only, not compared, since a server may move.
    pub explainer_endpoint: String,
}

impl Sources {
    /// The sources of a job over `cache` shown through `tokenizer` to `models`.
    pub fn of(cache: &LatentCache, tokenizer: &Tokenizer, models: &JobModels<'_>) -> Self {
        let mut vocab: Vec<(u32, String)> = tokenizer
            .inner()
            .get_vocab(true)
            .into_iter()
            .map(|(text, id)| (id, text))
            .collect();
        vocab.sort_unstable();
        let tokenizer = vocab
            .iter()
            .fold(hooks::digest::Fnv::default(), |h, (id, text)| {
                h.u32s(&[*id]).bytes(text.as_bytes())
            })
            .hex();
        Self {
            latent_cache: cache.identity(),
            tokenizer,
            explainer: models.explainer.model_id(),
            scorer: models.scorer.model_id(),
            explainer_endpoint: models.explainer.name(),
        }
    }

    /// The first recorded source that differs from `other`, as (what, recorded, now).
    fn difference(&self, other: &Sources) -> Option<(&'static str, String, String)> {
        let cache = |c: &CacheIdentity| {
            format!(
                "{} sequences of {} tokens, model {}, tokens {}, SAEs {:?}",
                c.sequences,
                c.seq_len,
                c.model.as_deref().unwrap_or("not recorded"),
                c.tokens,
                c.saes
            )
        };
        if self.latent_cache != other.latent_cache {
            return Some((
                "latent cache",
                cache(&self.latent_cache),
                cache(&other.latent_cache),
            ));
        }
        [
            ("tokenizer", &self.tokenizer, &other.tokenizer),
            ("explainer model", &self.explainer, &other.explainer),
            ("scorer model", &self.scorer, &other.scorer),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
        .map(|(what, a, b)| (what, a.clone(), b.clone()))
    }
}

/// What `run_config.json` holds: the settings, and what the results were made from
/// (absent in folders of earlier versions).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    #[serde(flatten)]
    config: JobConfig,
    #[serde(default)]
    sources: Option<Sources>,
}

impl JobConfig {
    /// Refuses settings that cannot work with `cache`, before anything is written: example
    /// and scorer settings ([`ExampleConfig::validate`], the window width against the
    /// cache's sequence length, [`ScoreConfig::validate`], the intruder's 3 excerpts per
    /// prompt), hook points the cache lacks and latents past a hook point's width.
    pub fn validate(&self, cache: &LatentCache) -> Result<()> {
        self.validate_settings()?;
        self.examples.check_seq_len(cache.tokens().seq_len())?;
        for hookpoint in &self.hookpoints {
            cache.check_latents(hookpoint, self.latents.clone())?;
        }
        Ok(())
    }

    /// The checks of [`JobConfig::validate`] that need no cache: for the command line to
    /// run before it caches latents.
    pub fn validate_settings(&self) -> Result<()> {
        self.examples.validate()?;
        self.score.validate()?;
        if self.scorers.contains(&Scorer::Intruder) {
            check_intruder_config(&self.score)?;
            let per_quantile = self.examples.n_test / self.examples.n_quantiles;
            if per_quantile < 2 {
                return Err(Error::Invalid(format!(
                    "the intruder scorer shows activating excerpts of one quantile per prompt, \
                     and n_test {} (--n-test) gives each of the {} quantiles (--n-quantiles) \
                     {per_quantile}: it needs at least 2, else there is no odd one out",
                    self.examples.n_test, self.examples.n_quantiles
                )));
            }
        }
        if self.explain.max_tokens == 0 {
            return Err(Error::Invalid(
                "the explainer's max_tokens (--explainer-max-tokens) must be at least 1".into(),
            ));
        }
        if self.examples.n_non_activating == 0 {
            return Err(Error::Invalid(
                "--n-non-activating must be at least 1: every scorer tells activating excerpts \
                 from silent ones"
                    .into(),
            ));
        }
        if self.hookpoints.is_empty() || self.scorers.is_empty() || self.latents.is_empty() {
            return Err(Error::Invalid(
                "a job needs at least one hook point, one latent and one scorer".into(),
            ));
        }
        Ok(())
    }
}

/// How a job runs (does not change its results).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output folder.
    pub output: PathBuf,
    /// This process's part of the job.
    pub shard: Shard,
    /// Latents processed at once (their requests share the client's concurrency limit).
    pub concurrency: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Write a scorer's results even when some of its answers could not be read (their
    /// predictions are null, counted as failed parses), instead of leaving them for the next
    /// run to retry: for a model that cannot keep to the answer format.
    pub keep_unreadable: bool,
}

/// The models a job talks to.
pub struct JobModels<'a> {
    /// Writes explanations.
    pub explainer: &'a dyn Llm,
    /// Answers detection and fuzzing prompts.
    pub scorer: &'a dyn Llm,
    /// Embeds texts for the embedding scorer.
    pub embedder: Option<&'a SentenceEmbedder>,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Latents of this shard in the job.
    pub latents: u64,
    /// Latents with an explanation and every score on disk at the end.
    pub complete: u64,
    /// Latents skipped because they fire too rarely.
    pub skipped: u64,
    /// Latents skipped because, after the explainer's examples, fewer activating windows
    /// were left than the test set asks for ([`crate::examples::Skip::TooFewTestExamples`]).
    #[serde(default)]
    pub short_test_sets: u64,
    /// Explanations that could not be parsed, or were cut off at the explainer's
    /// `max_tokens` (not written; retried next run).
    pub explanation_failures: u64,
    /// Latents with a scorer whose answers could not all be read (not written unless
    /// [`RunOptions::keep_unreadable`]; retried next run).
    #[serde(default)]
    pub unreadable_scores: u64,
    /// Latents where a request or file write failed (retried next run), with the reason.
    pub errors: Vec<String>,
    /// Tokens spent in this run.
    pub usage: Usage,
}

fn file_stem(hookpoint: &str, latent: u32) -> String {
    format!("{}_latent{latent}", hookpoint.replace('/', "--"))
}

fn explanation_path(output: &Path, hookpoint: &str, latent: u32) -> PathBuf {
    output
        .join("explanations")
        .join(format!("{}.txt", file_stem(hookpoint, latent)))
}

fn score_path(output: &Path, scorer: Scorer, hookpoint: &str, latent: u32) -> PathBuf {
    output
        .join("scores")
        .join(scorer.dir_name())
        .join(format!("{}.txt", file_stem(hookpoint, latent)))
}

fn write_json_file<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string(value).map_err(|e| Error::file(path, e.to_string()))?;
    hooks::atomic::write(path, text.as_bytes())?;
    Ok(())
}

fn read_json_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    read_json_or(path, |e| {
        format!("unreadable result file: {e}; delete it and run the job again to redo it")
    })
}

/// A JSON file of the job folder; `damaged` says what to do about one that does not parse.
fn read_json_or<T: for<'de> Deserialize<'de>>(
    path: &Path,
    damaged: impl FnOnce(serde_json::Error) -> String,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, damaged(e)))
}

/// A detection, fuzzing or embedding score file's records; one holding none is damaged (a
/// scored latent has its test examples at least). An intruder file may hold none: a latent
/// without silent excerpts gets no intruder prompt.
fn read_score_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let records: Vec<T> = read_json_file(path)?;
    if records.is_empty() {
        return Err(Error::file(
            path,
            "unreadable result file: no scored excerpts in it; delete it and run the job again to redo it",
        ));
    }
    Ok(records)
}

/// The settings recorded in `output/run_config.json` (all runs of the job so far).
pub fn read_run_config(output: &Path) -> Result<JobConfig> {
    Ok(read_run_record(&output.join("run_config.json"))?.config)
}

/// `run_config.json`: a damaged one is not "delete it and redo" as a result file is, since
/// without it no result in the folder can be checked against a run.
fn read_run_record(path: &Path) -> Result<RunRecord> {
    read_json_or(path, |e| {
        format!(
            "damaged ({e}): it records what the folder's results were made from, and they \
             cannot be checked against this run without it; restore it from a copy, or move \
             it, explanations/ and scores/ out of the folder to redo them"
        )
    })
}

/// Refuses an output folder holding results of other settings (mixing them would make the
/// scores incomparable); reads `run_config.json`, writes nothing. Returns what is recorded.
fn check_settings_in(output: &Path, config: &JobConfig) -> Result<Option<RunRecord>> {
    let path = output.join("run_config.json");
    if !path.is_file() {
        if let Some(result) = some_result_in(output) {
            return Err(Error::file(
                &path,
                format!(
                    "missing, but the folder holds results ({}): what they were made from is \
                     unknown; restore run_config.json, or use a new output folder",
                    result.display()
                ),
            ));
        }
        return Ok(None);
    }
    let existing = read_run_record(&path)?;
    // Folders from before the data settings were recorded have none: not compared.
    let compare_data = existing.config.data.is_some();
    #[derive(Serialize)]
    struct Settings<'a> {
        examples: &'a ExampleConfig,
        explain: &'a ExplainConfig,
        score: &'a ScoreConfig,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Option<String>>,
    }
    fn settings(c: &JobConfig, compare_data: bool) -> Settings<'_> {
        Settings {
            examples: &c.examples,
            explain: &c.explain,
            score: &c.score,
            data: compare_data.then_some(&c.data),
        }
    }
    let changed = hooks::checkpoint::differences(
        &settings(&existing.config, compare_data),
        &settings(config, compare_data),
    );
    if !changed.is_empty() {
        return Err(Error::file(
            &path,
            format!("the results there were made with other settings ({changed}); use a new output folder"),
        ));
    }
    Ok(Some(existing))
}

/// A result file in `output` (an explanation or a score), if there is one.
fn some_result_in(output: &Path) -> Option<PathBuf> {
    let files_in = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
    };
    let scores = files_in(output.join("scores")).flat_map(files_in);
    files_in(output.join("explanations"))
        .chain(scores)
        .find(|path| path.is_file())
}

/// Refuses an output folder holding results of other settings, writing nothing: for
/// callers that must check before preparing a job's inputs (the command line checks before
/// it extends a latent cache).
pub fn check_settings(output: &Path, config: &JobConfig) -> Result<()> {
    check_settings_in(output, config).map(|_| ())
}

/// Writes `run_config.json`, refusing an output folder that holds results of other settings
/// or made from other sources. A rerun of part of the job (fewer latents, hook points or
/// scorers) keeps the record of the whole: hook points and scorers are merged, latents
/// become the smallest range covering both.
fn check_run_config(output: &Path, config: &JobConfig, sources: &Sources) -> Result<()> {
    let path = output.join("run_config.json");
    let mut merged = config.clone();
    if let Some(existing) = check_settings_in(output, config)? {
        if let Some((what, recorded, now)) = existing
            .sources
            .as_ref()
            .and_then(|recorded| recorded.difference(sources))
        {
            return Err(Error::file(
                &path,
                format!(
                    "the results there were made from another {what} ({recorded}; now {now}); \
                     use a new output folder"
                ),
            ));
        }
        let old = existing.config;
        merged.hookpoints = old.hookpoints.clone();
        for hookpoint in &config.hookpoints {
            if !merged.hookpoints.contains(hookpoint) {
                merged.hookpoints.push(hookpoint.clone());
            }
        }
        merged.scorers = old.scorers.clone();
        for scorer in &config.scorers {
            if !merged.scorers.contains(scorer) {
                merged.scorers.push(*scorer);
            }
        }
        merged.latents =
            old.latents.start.min(config.latents.start)..old.latents.end.max(config.latents.end);
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    write_json_file(
        &path,
        &RunRecord {
            config: merged,
            sources: Some(sources.clone()),
        },
    )
}

/// Text of each token of an example.
fn token_texts(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<Vec<String>> {
    tokens
        .iter()
        .map(|&t| Ok(tokenizer.token_text(t)?))
        .collect()
}

/// The explainer's view of a latent's `train` examples: token texts, activations and their
/// 0-10 normalisation against the latent's maximum.
pub fn explainer_examples(
    tokenizer: &Tokenizer,
    examples: &LatentExamples,
) -> Result<Vec<ShownExample>> {
    examples
        .train
        .iter()
        .map(|example: &Example| {
            Ok(ShownExample {
                tokens: token_texts(tokenizer, &example.tokens)?,
                activations: example.activations.clone(),
                normalized: example.normalized(examples.max_activation),
            })
        })
        .collect()
}

/// The scoring samples of a latent: its held-out activating examples and silent windows.
pub fn scoring_samples(tokenizer: &Tokenizer, examples: &LatentExamples) -> Result<Vec<Sample>> {
    let activating = examples.test.iter().map(|e| (e, true));
    let silent = examples.non_activating.iter().map(|e| (e, false));
    activating
        .chain(silent)
        .map(|(e, activating)| {
            Ok(Sample {
                tokens: token_texts(tokenizer, &e.tokens)?,
                activations: e.activations.clone(),
                activating,
                distance: e.quantile.map_or(-1, |q| q as i64),
            })
        })
        .collect()
}

/// Counters shared by the latents in flight.
#[derive(Default)]
struct Counters {
    complete: AtomicU64,
    skipped: AtomicU64,
    short_test_sets: AtomicU64,
    explanation_failures: AtomicU64,
    unreadable_scores: AtomicU64,
    errors: Mutex<Vec<String>>,
    usage: Mutex<Usage>,
    /// Latents in a row whose LLM requests kept failing until the retries ran out
    /// ([`Error::Unreachable`], [`Error::Unusable`]), since the last that got
    /// answers: when they reach [`GIVE_UP_AFTER`] x the concurrency, the job stops starting
    /// latents (an unreachable server would otherwise cost every latent its retries).
    llm_failures_in_a_row: AtomicU64,
}

/// See [`Counters::llm_failures_in_a_row`].
const GIVE_UP_AFTER: u64 = 2;

impl Counters {
    fn spend(&self, usage: Usage) {
        self.usage.lock().expect("usage lock").add(usage);
    }
}

/// Outcome of one latent.
enum Outcome {
    Complete,
    Skipped(Skip),
    NoExplanation,
    /// A scorer's answers could not all be read; its results were not written.
    Unreadable,
}

/// Explains and scores one latent, skipping the files already on disk. The intruder scorer
/// needs no explanation: it runs even when the explanation fails, and a job with no other
/// scorer asks for none.
#[allow(clippy::too_many_arguments)]
async fn process_latent(
    hookpoint: &str,
    latent: u32,
    firings: &[crate::latents::Firing],
    tokens: &TokenTable,
    tokenizer: &Tokenizer,
    models: &JobModels<'_>,
    config: &JobConfig,
    options: &RunOptions,
    counters: &Counters,
) -> Result<Outcome> {
    let output = options.output.as_path();
    let seed = latent_seed(config.examples.seed, hookpoint, latent);
    let examples = match build_examples(firings, tokens, &config.examples, seed)? {
        Ok(examples) => examples,
        Err(skip) => return Ok(Outcome::Skipped(skip)),
    };
    let needs_explanation = config.scorers.iter().any(|s| s.uses_explanation());
    let path = explanation_path(output, hookpoint, latent);
    let explanation: Option<String> = if !needs_explanation {
        None
    } else if path.is_file() {
        Some(read_json_file(&path)?)
    } else {
        // Scores of an earlier explanation (whose file was deleted to redo it) would stay
        // beside the new one, or beside none.
        for &scorer in <Scorer as clap::ValueEnum>::value_variants() {
            if !scorer.uses_explanation() {
                continue;
            }
            let stale = score_path(output, scorer, hookpoint, latent);
            if stale.is_file() {
                std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
            }
        }
        let shown_examples = explainer_examples(tokenizer, &examples)?;
        let answer = explain(models.explainer, &shown_examples, &config.explain).await?;
        counters.spend(answer.usage);
        if let Some(text) = &answer.explanation {
            write_json_file(&path, text)?;
        } else if answer.truncated {
            tracing::warn!(
                "{hookpoint} latent {latent}: the explanation was cut off at {} tokens \
                 (raise --explainer-max-tokens): {:?}",
                config.explain.max_tokens,
                answer.answer
            );
        } else {
            tracing::warn!(
                "{hookpoint} latent {latent}: no [EXPLANATION]: line in the answer: {:?}",
                answer.answer
            );
        }
        answer.explanation
    };
    let samples = scoring_samples(tokenizer, &examples)?;
    let mut unreadable = false;
    // Results with unreadable answers are left for the next run unless asked to keep them.
    let mut keep = |failed_prompts: usize, scorer: Scorer| {
        if failed_prompts == 0 || options.keep_unreadable {
            return true;
        }
        tracing::warn!(
            "{hookpoint} latent {latent}: {failed_prompts} {} answers could not be read; \
             not written, the next run asks again",
            scorer.dir_name()
        );
        unreadable = true;
        false
    };
    for &scorer in &config.scorers {
        let path = score_path(output, scorer, hookpoint, latent);
        if path.is_file() {
            continue;
        }
        let explanation = match (scorer, &explanation) {
            (Scorer::Intruder, _) => "",
            (_, Some(text)) => text.as_str(),
            (_, None) => continue,
        };
        let task = match scorer {
            Scorer::Detection => ClassifierTask::Detection,
            Scorer::Fuzzing => ClassifierTask::Fuzzing,
            Scorer::Embedding => {
                let embedder = models.embedder.ok_or_else(|| {
                    Error::Invalid("the embedding scorer needs a sentence embedder".into())
                })?;
                let scored =
                    tokio::task::block_in_place(|| embed_score(embedder, explanation, &samples))?;
                write_json_file(&path, &scored)?;
                continue;
            }
            Scorer::Simulation => {
                let score = simulate(
                    models.scorer,
                    explanation,
                    &samples,
                    examples.max_activation,
                )
                .await?;
                counters.spend(score.usage);
                write_json_file(&path, &score.groups)?;
                continue;
            }
            Scorer::Surprisal => {
                let score = surprisal(models.scorer, explanation, &samples).await?;
                counters.spend(score.usage);
                write_json_file(&path, &score.outputs)?;
                continue;
            }
            Scorer::Intruder => {
                let score =
                    intrude(models.scorer, &samples, &config.score, seed ^ scorer as u64).await?;
                counters.spend(score.usage);
                if keep(score.failed_prompts, scorer) {
                    write_json_file(&path, &score.results)?;
                }
                continue;
            }
        };
        let score = classify(
            models.scorer,
            task,
            explanation,
            samples.clone(),
            &config.score,
            seed ^ scorer as u64,
        )
        .await?;
        counters.spend(score.usage);
        if keep(score.failed_prompts, scorer) {
            write_json_file(&path, &score.samples)?;
        }
    }
    Ok(if needs_explanation && explanation.is_none() {
        Outcome::NoExplanation
    } else if unreadable {
        Outcome::Unreadable
    } else {
        Outcome::Complete
    })
}

/// Refuses a scorer model that cannot do what the job's scorers need: the simulation and
/// surprisal scorers read prompt log-probabilities ([`Llm::reads_prompts`]).
pub fn check_scorer_model(config: &JobConfig, scorer: &dyn Llm) -> Result<()> {
    let reading = [Scorer::Simulation, Scorer::Surprisal];
    if let Some(needs) = reading.iter().find(|s| config.scorers.contains(s)) {
        if !scorer.reads_prompts() {
            return Err(Error::Invalid(format!(
                "the {} scorer reads the model's log-probabilities at every token of a \
                 prompt, which {} cannot give: use a local GGUF model (--explainer local), or \
                 a vLLM server with its model's tokenizer (--server-tokenizer)",
                needs.dir_name(),
                scorer.name()
            )));
        }
    }
    Ok(())
}

/// Runs this shard of a job: every latent of `config.latents` at every hook point that
/// belongs to `options.shard`. Latents whose requests fail are reported, not fatal; their
/// files are simply missing, so the next run retries them. So are a scorer's results when
/// some of its answers could not be read (unless [`RunOptions::keep_unreadable`]). Settings
/// are checked ([`JobConfig::validate`]) before anything is written. Runs on tokio's
/// multi-threaded runtime (the embedding scorer computes on the thread it was given).
pub async fn run_job(
    cache: &LatentCache,
    tokenizer: &Tokenizer,
    models: &JobModels<'_>,
    config: &JobConfig,
    options: &RunOptions,
) -> Result<RunReport> {
    config.validate(cache)?;
    if config.scorers.contains(&Scorer::Embedding) && models.embedder.is_none() {
        return Err(Error::Invalid(
            "the embedding scorer needs a sentence embedder".into(),
        ));
    }
    check_scorer_model(config, models.scorer)?;
    let _lock = options.shard.lock(&options.output)?;
    check_run_config(
        &options.output,
        config,
        &Sources::of(cache, tokenizer, models),
    )?;
    // Files a killed run was writing: hidden, but delphi's own analysis scripts read them.
    let scores = options.output.join("scores");
    for folder in std::iter::once(options.output.join("explanations"))
        .chain(config.scorers.iter().map(|s| scores.join(s.dir_name())))
    {
        hooks::atomic::remove_abandoned_temp_files(&folder, |name| name.ends_with(".txt"));
    }
    let mut work = Vec::new();
    for hookpoint in &config.hookpoints {
        let mut firings = cache.firings_of(hookpoint, config.latents.clone(), |l| {
            options.shard.contains(l)
        })?;
        for latent in config
            .latents
            .clone()
            .filter(|&l| options.shard.contains(l))
        {
            work.push((
                hookpoint.as_str(),
                latent,
                firings.remove(&latent).unwrap_or_default(),
            ));
        }
    }
    let counters = Counters::default();
    let bar = hooks::progress::bar(options.progress, Some(work.len() as u64), "latents");
    let total = work.len() as u64;
    let give_up = GIVE_UP_AFTER * options.concurrency.max(1) as u64;
    let results = futures::stream::iter(work.iter())
        .map(|(hookpoint, latent, firings)| {
            let counters = &counters;
            let bar = &bar;
            async move {
                let in_a_row = counters.llm_failures_in_a_row.load(Ordering::Relaxed);
                if in_a_row >= give_up {
                    counters.errors.lock().expect("errors lock").push(format!(
                        "{hookpoint} latent {latent}: not tried: the LLM failed for {in_a_row} latents in a row"
                    ));
                    bar.inc(1);
                    return;
                }
                let outcome = process_latent(
                    hookpoint,
                    *latent,
                    firings,
                    cache.tokens(),
                    tokenizer,
                    models,
                    config,
                    options,
                    counters,
                )
                .await;
                let count = |counter: &AtomicU64| {
                    counter.fetch_add(1, Ordering::Relaxed);
                };
                match &outcome {
                    // Only a backend that keeps failing: a refused request (say, too long)
                    // says nothing about the next latent's.
                    Err(Error::Unreachable { .. } | Error::Unusable { .. }) => {
                        count(&counters.llm_failures_in_a_row)
                    }
                    Ok(Outcome::Complete | Outcome::NoExplanation | Outcome::Unreadable) => {
                        counters.llm_failures_in_a_row.store(0, Ordering::Relaxed)
                    }
                    _ => {}
                }
                match outcome {
                    Ok(Outcome::Complete) => count(&counters.complete),
                    Ok(Outcome::Skipped(Skip::TooFewWindows { .. })) => count(&counters.skipped),
                    Ok(Outcome::Skipped(Skip::TooFewTestExamples { .. })) => {
                        count(&counters.short_test_sets)
                    }
                    Ok(Outcome::NoExplanation) => count(&counters.explanation_failures),
                    Ok(Outcome::Unreadable) => count(&counters.unreadable_scores),
                    Err(error) => {
                        tracing::warn!("{hookpoint} latent {latent}: {error}");
                        counters
                            .errors
                            .lock()
                            .expect("errors lock")
                            .push(format!("{hookpoint} latent {latent}: {error}"));
                    }
                }
                let usage = *counters.usage.lock().expect("usage lock");
                let failures = counters.errors.lock().expect("errors lock").len() as u64
                    + counters.explanation_failures.load(Ordering::Relaxed)
                    + counters.unreadable_scores.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "{failures} failed, {} tokens",
                    usage.prompt_tokens + usage.completion_tokens
                ));
                bar.inc(1);
            }
        })
        .buffer_unordered(options.concurrency.max(1));
    results.collect::<Vec<()>>().await;
    bar.finish_and_clear();
    let mut errors = counters.errors.into_inner().expect("errors lock");
    errors.sort();
    Ok(RunReport {
        latents: total,
        complete: counters.complete.into_inner(),
        skipped: counters.skipped.into_inner(),
        short_test_sets: counters.short_test_sets.into_inner(),
        explanation_failures: counters.explanation_failures.into_inner(),
        unreadable_scores: counters.unreadable_scores.into_inner(),
        errors,
        usage: counters.usage.into_inner().expect("usage lock"),
    })
}

/// Aggregate results of one scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerSummary {
    /// Latents with a score file.
    pub latents: u64,
    /// Median over latents of the balanced accuracy (detection, fuzzing).
    pub median_balanced_accuracy: Option<f64>,
    /// Median over latents of F1 (detection, fuzzing).
    pub median_f1: Option<f64>,
    /// Median over latents of the ROC AUC (embedding; detection and fuzzing with logprobs).
    pub median_auc: Option<f64>,
    /// Counts pooled over all latents' excerpts (delphi's aggregate), with failed parses.
    pub pooled: Option<Confusion>,
    /// Median over latents of the share of prompts whose intruder was found (intruder).
    #[serde(default)]
    pub median_accuracy: Option<f64>,
    /// Prompts whose answer could not be read (intruder).
    #[serde(default)]
    pub failed_prompts: Option<u64>,
    /// Median over latents of the correlation of simulated and true activations over all
    /// excerpts (simulation).
    #[serde(default)]
    pub median_correlation: Option<f64>,
}

/// The summary of a job's output folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Latents with an explanation file.
    pub explained: u64,
    /// Per scorer (delphi's folder names).
    pub scorers: BTreeMap<String, ScorerSummary>,
}

/// Summarises every result in `output` for the job's latents (all shards), writes
/// `summary.json` atomically and returns it.
pub fn summarize(output: &Path, config: &JobConfig) -> Result<JobSummary> {
    let mut explained = 0;
    // Every damaged result file, named at once (not one per run).
    let mut damaged = Vec::new();
    let mut scorers = BTreeMap::new();
    for &scorer in &config.scorers {
        let (mut accuracies, mut f1s, mut aucs) = (Vec::new(), Vec::new(), Vec::new());
        let mut pooled: Option<Confusion> = None;
        let (mut found_shares, mut failed_prompts) = (Vec::new(), None);
        let mut correlations = Vec::new();
        let mut latents = 0;
        for hookpoint in &config.hookpoints {
            for latent in config.latents.clone() {
                let path = score_path(output, scorer, hookpoint, latent);
                if !path.is_file() {
                    continue;
                }
                latents += 1;
                let mut add = || -> Result<()> {
                    match scorer {
                        Scorer::Embedding => {
                            let samples: Vec<EmbeddedSample> = read_score_file(&path)?;
                            aucs.extend(embedding_auc(&samples));
                        }
                        Scorer::Simulation => {
                            let groups: Vec<ScoredSimulation> = read_score_file(&path)?;
                            correlations.extend(simulation_correlation(&groups));
                        }
                        Scorer::Surprisal => {
                            let outputs: Vec<SurprisalOutput> = read_score_file(&path)?;
                            aucs.extend(surprisal_auc(&outputs));
                        }
                        Scorer::Intruder => {
                            let results: Vec<IntruderResult> = read_json_file(&path)?;
                            found_shares.extend(intruder_accuracy(&results));
                            *failed_prompts.get_or_insert(0) +=
                                results.iter().filter(|r| r.prediction.is_none()).count() as u64;
                        }
                        Scorer::Detection | Scorer::Fuzzing => {
                            let samples: Vec<ClassifiedSample> = read_score_file(&path)?;
                            let (summary, auc) = classifier_summary(&samples);
                            pooled
                                .get_or_insert_with(Confusion::default)
                                .add(&summary.confusion);
                            accuracies.extend(summary.balanced_accuracy);
                            f1s.extend(summary.f1);
                            aucs.extend(auc);
                        }
                    }
                    Ok(())
                };
                if let Err(e) = add() {
                    damaged.push(e.to_string());
                }
            }
        }
        scorers.insert(
            scorer.dir_name().to_string(),
            ScorerSummary {
                latents,
                median_balanced_accuracy: median(&accuracies),
                median_f1: median(&f1s),
                median_auc: median(&aucs),
                pooled,
                median_accuracy: median(&found_shares),
                failed_prompts,
                median_correlation: median(&correlations),
            },
        );
    }
    for hookpoint in &config.hookpoints {
        for latent in config.latents.clone() {
            explained += explanation_path(output, hookpoint, latent).is_file() as u64;
        }
    }
    if !damaged.is_empty() {
        return Err(Error::Invalid(format!(
            "{} unreadable result files:\n{}",
            damaged.len(),
            damaged.join("\n")
        )));
    }
    let summary = JobSummary { explained, scorers };
    write_json_file(&output.join("summary.json"), &summary)?;
    Ok(summary)
}

/// The summary as a table for people.
pub fn summary_table(summary: &JobSummary) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut out = format!(
        "{} latents explained\n{:<10} {:>8} {:>14} {:>10} {:>10} {:>10} {:>12} {:>14}\n",
        summary.explained,
        "scorer",
        "latents",
        "balanced acc.",
        "F1",
        "AUC",
        "accuracy",
        "correlation",
        "failed parses"
    );
    for (name, s) in &summary.scorers {
        let failed = s
            .pooled
            .map(|p| p.failed)
            .or(s.failed_prompts)
            .map_or("-".to_string(), |f| f.to_string());
        out.push_str(&format!(
            "{:<10} {:>8} {:>14} {:>10} {:>10} {:>10} {:>12} {:>14}\n",
            name,
            s.latents,
            cell(s.median_balanced_accuracy),
            cell(s.median_f1),
            cell(s.median_auc),
            cell(s.median_accuracy),
            cell(s.median_correlation),
            failed
        ));
    }
    out.push_str(
        "(medians over latents; accuracy: intruder prompts whose intruder was found; \
         correlation: simulated and true activations over all excerpts' tokens; failed \
         parses: excerpts, or intruder prompts, without a usable answer)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged result says how to redo it (a rerun alone would stop at it again).
    #[test]
    fn an_unreadable_result_says_to_delete_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.0_latent1.txt");
        std::fs::write(&path, "").unwrap();
        let message = read_json_file::<Vec<f32>>(&path).unwrap_err().to_string();
        assert!(
            message.contains("layers.0_latent1.txt: unreadable result file: EOF")
                && message.ends_with("delete it and run the job again to redo it"),
            "{message}"
        );
        // A score file of no records is as damaged.
        std::fs::write(&path, "[]").unwrap();
        let message = read_score_file::<f32>(&path).unwrap_err().to_string();
        assert!(
            message.contains("layers.0_latent1.txt: unreadable result file: no scored excerpts")
                && message.ends_with("delete it and run the job again to redo it"),
            "{message}"
        );
        std::fs::write(&path, "[0.5]").unwrap();
        assert_eq!(read_score_file::<f32>(&path).unwrap(), vec![0.5]);
    }

    /// The summary names every damaged score file at once, so one rerun redoes them all.
    #[test]
    fn the_summary_names_every_damaged_result() {
        let dir = tempfile::tempdir().unwrap();
        let config = JobConfig {
            hookpoints: vec!["layers.0".into()],
            latents: 0..4,
            scorers: vec![Scorer::Detection, Scorer::Embedding],
            examples: ExampleConfig::default(),
            explain: ExplainConfig::default(),
            score: ScoreConfig::default(),
            data: None,
        };
        for (scorer, latent, text) in [
            (Scorer::Detection, 0, "[{\"str_tok"),
            (Scorer::Detection, 2, "[]"),
            (Scorer::Embedding, 3, ""),
        ] {
            let path = score_path(dir.path(), scorer, "layers.0", latent);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let message = summarize(dir.path(), &config).unwrap_err().to_string();
        assert!(message.contains("3 unreadable result files"), "{message}");
        for file in [
            "detection/layers.0_latent0.txt",
            "detection/layers.0_latent2.txt",
            "embedding/layers.0_latent3.txt",
        ] {
            assert!(message.contains(file), "{file}: {message}");
        }
        assert!(!dir.path().join("summary.json").exists());
    }

    #[test]
    fn shards_partition_the_latents() {
        let shards: Vec<Shard> = (0..3)
            .map(|i| Shard::parse(&format!("{i}/3")).unwrap())
            .collect();
        for latent in 0..100 {
            assert_eq!(shards.iter().filter(|s| s.contains(latent)).count(), 1);
        }
        for bad in ["3/3", "1", "a/b", "0/0"] {
            assert!(Shard::parse(bad).unwrap_err().to_string().contains(bad));
        }
    }

    #[test]
    fn file_names_follow_delphi() {
        let out = Path::new("/r");
        assert_eq!(
            explanation_path(out, "layers.6", 3),
            Path::new("/r/explanations/layers.6_latent3.txt")
        );
        assert_eq!(
            score_path(out, Scorer::Fuzzing, "layer_5/width_16k", 7),
            Path::new("/r/scores/fuzz/layer_5--width_16k_latent7.txt")
        );
    }
}
