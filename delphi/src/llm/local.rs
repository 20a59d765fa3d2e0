//! A GGUF chat model run in process, so the explain/score pipeline works with no server
//! (tests, demos, small jobs).
//!
//! The model is the hook runtime's ([`hooks::Model`], checked against transformers at every
//! layer), loaded once: it generates answers and reads prompts' log-probabilities. By default
//! every tensor is dequantized to f32 when the file is loaded, which is what transformers
//! does with a GGUF file: answers match it to float rounding (2.7e-5 nats on the fixture).
//! [`LocalOptions::quantized`] keeps the blocks' quantized projection weights instead (3.8x
//! (Q8_0) to 7x (Q4_0) less memory for them, for bigger models), multiplied with
//! 8-bit-quantized activations as llama.cpp does; that moves the top log-probabilities by up
//! to 0.24 nats on the fixture (the next-token distribution's KL to transformers stays under
//! 0.008 nats). (On x86, candle 0.11 has SIMD
//! dot products only for Q4_0, Q8_0 and the K-quants: SmolLM2's Q4_1 runs a scalar loop,
//! generating at a third of the f32 rate here; docs/benchmarks.md.)
//!
//! The tokenizer is the one hooks rebuilds from the GGUF metadata ([`hooks::Model::tokenizer`]:
//! byte-level BPE, `tokenizer.ggml.model = gpt2`, as in Llama 3, Qwen2 and SmolLM files), and
//! the prompt is rendered with the Jinja chat template the file declares in
//! `tokenizer.chat_template`, as transformers' `apply_chat_template` renders it (ChatML, Llama
//! 3's headers, ...; `hooks::chat_template` says what differs). An answer ends at the
//! file's EOS, end-of-turn or end-of-message token, or at an added token of
//! [`hooks::chat_template::END_OF_TURN`].
//!
//! Checked against transformers in `delphi/tests/local_llm.rs` with the fixture
//! `tests/fixtures/delphi/local_llm.json`.
//!
//! Requests run on tokio's blocking pool, two per core at a time (the others wait, holding no
//! memory). Their prompts are processed one at a time (the matmuls use every core already);
//! each then generates its answer beside the others, each on its own KV cache
//! ([`hooks::KvCache`]). The KV cache of the shared start of prompts (everything before the
//! last message: the system prompt and few-shot turns of the explainer and scorer prompts) is
//! kept for the next requests, so only the new part is processed.
//!
//! [`Llm::read`] and [`Llm::continuation_logprobs`] need the log-probabilities at many
//! positions: the prompt is run once into a KV cache, then the texts in batches after it, and
//! the unembedding is applied at the reading points only.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, IndexOp, Tensor};
use hooks::sampling::{argmax, log_softmax, sample, top_k};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;

use super::{
    AnswerFormat, BoxFuture, ChatRequest, ChatResponse, ContinuationRequest, ContinuationResponse,
    Llm, Message, ReadRequest, ReadResponse, TokenLogprobs, Usage,
};
use crate::{Error, Result};
use hooks::chat_template::{turn_end_ids, ChatTemplate};

/// How many prompt starts keep their KV cache by default (least recently used dropped first).
/// Each costs `2 * layers * kv_heads * head_dim * 4` bytes per token: 46 KB for SmolLM2-135M,
/// so about 90 MB for a 2,000-token few-shot prompt.
pub const DEFAULT_PREFIX_CACHE: usize = 4;

/// How many requests compute at once through [`Llm`]: two per core, so that every core has
/// work while one request is between steps; more only adds KV caches (each prompt start of
/// about 2,000 tokens is 90 MB for SmolLM2-135M).
fn computing_slots() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Answers read in one forward pass by [`Llm::read`] (a simulation scorer's excerpts of
/// about 500 tokens: 4,000 rows per pass).
const READ_BATCH: usize = 8;

/// The context assumed for a file that states none (`llama.context_length`): Llama 2's.
pub const DEFAULT_CONTEXT: usize = 4096;

/// Prompt tokens processed per forward pass: bounds the attention scores' memory
/// (`heads * chunk * context * 4` bytes) for long prompts.
const PREFILL_CHUNK: usize = 512;

/// How a [`LocalLlm`] samples and caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalOptions {
    /// Seed of sampled (temperature > 0) answers, mixed with each prompt's token ids.
    pub seed: u64,
    /// How many prompt starts keep their KV cache (0 turns the reuse off).
    pub prefix_cache: usize,
    /// Keep the weights in the file's quantized types (less memory, 8-bit activations)
    /// instead of dequantizing them to f32 at load.
    pub quantized: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            prefix_cache: DEFAULT_PREFIX_CACHE,
            quantized: false,
        }
    }
}

/// A chat model from a GGUF file (`general.architecture` `llama` or `qwen2`, a `gpt2`
/// tokenizer and a chat template), answering [`ChatRequest`]s on the CPU.
///
/// Temperature 0 is greedy (argmax). Otherwise tokens are drawn from `softmax(logits / T)`
/// with a generator seeded from [`LocalOptions::seed`] and the prompt's token ids, so the
/// same prompt with the same seed gives the same answer whatever order requests come in.
/// Reported log-probabilities are those of the model (`log_softmax(logits)`, before any
/// temperature). Generation stops at a token that ends the turn (the file's EOS, end-of-turn
/// and end-of-message tokens, and the vocabulary's [`hooks::chat_template::END_OF_TURN`] tokens), after
/// `max_tokens`, or when the context is full.
///
/// A request with an [`AnswerFormat`] is held to it: at each step only the tokens that keep
/// the answer a start of that format are candidates (greedy or sampled among them as above),
/// and generation ends when the answer is whole. The reported log-probabilities are still
/// the model's, over the whole vocabulary, but the alternatives listed are the allowed
/// tokens.
#[derive(Clone)]
pub struct LocalLlm {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    path: PathBuf,
    tokenizer: hooks::Tokenizer,
    template: ChatTemplate,
    /// Tokens that end the answer.
    stop_ids: Vec<u32>,
    context_len: usize,
    seed: u64,
    prefix_capacity: usize,
    model: hooks::Model,
    /// The KV caches of prompt starts, most recently used last. Held while a prompt is
    /// processed, so prompts are processed one at a time.
    prefixes: Mutex<VecDeque<Prefix>>,
    /// Requests computing at once through [`Llm`]; the others wait before they hold a KV cache
    /// of their own, so a job's memory does not grow with the requests it has in flight.
    computing: Arc<Semaphore>,
    /// The tokens whose text is made only of [`AnswerFormat::ALPHABET`]'s characters, a digit
    /// only on its own, with that text: the candidates of a formatted answer (found on first
    /// use).
    format_tokens: OnceLock<Vec<(u32, String)>>,
}

/// A chat prompt's token ids, and how many of them are the conversation before its last
/// message (whose KV cache is kept for the next prompts that start the same way).
struct Prompt {
    ids: Vec<u32>,
    start: usize,
}

/// A prompt start and its KV cache.
struct Prefix {
    ids: Vec<u32>,
    cache: hooks::KvCache,
}

impl std::fmt::Debug for LocalLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLlm")
            .field("path", &self.shared.path)
            .field("context_len", &self.shared.context_len)
            .field("seed", &self.shared.seed)
            .finish()
    }
}

impl LocalLlm {
    /// Loads a GGUF chat model (e.g. [`hooks::fetch::smollm2_gguf`]'s SmolLM2-135M-Instruct).
    /// Errors name the file and what is missing or unsupported: not a GGUF file, an
    /// architecture other than `llama` or `qwen2`, no `gpt2` tokenizer, no chat template or
    /// one that does not compile.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, LocalOptions::default())
    }

    /// [`LocalLlm::load`] with a sampling seed, prefix-cache size and weight format.
    pub fn load_with(path: &Path, options: LocalOptions) -> Result<Self> {
        let (content, _) = hooks::gguf_header(path)?;
        let string = |key: &str| match content.metadata.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Error::file(
                path,
                format!("GGUF metadata '{key}' must be a string, got {other:?}"),
            )),
            None => Err(Error::file(
                path,
                format!("GGUF metadata '{key}' is missing"),
            )),
        };
        let architecture = string("general.architecture")?;
        if !hooks::GGUF_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(Error::file(
                path,
                format!(
                    "general.architecture '{architecture}' is not supported (supported: {})",
                    hooks::GGUF_ARCHITECTURES.join(", ")
                ),
            ));
        }
        let template = ChatTemplate::from_gguf(&content.metadata)
            .map_err(|message| Error::file(path, message))?;
        let files = hooks::source::ModelFiles {
            config: None,
            tokenizer: None,
            weights: hooks::weights::WeightFiles::Gguf(path.to_path_buf()),
            origin: path.display().to_string(),
            revision: None,
        };
        let load = hooks::LoadOptions {
            quantized: options.quantized,
            ..hooks::LoadOptions::default()
        };
        let model = hooks::Model::from_files(&files, &load)?;
        let tokenizer = model
            .tokenizer()
            .map_err(|_| {
                Error::file(
                    path,
                    "has no tokenizer this crate can rebuild (needs tokenizer.ggml.model = gpt2)",
                )
            })?
            .clone();
        let stop_ids = turn_end_ids(Some(&content.metadata), &tokenizer);
        let context_len = model.context_len().unwrap_or(DEFAULT_CONTEXT);
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        // Quantized weights give other answers: a job records them apart.
        let name = match options.quantized {
            true => format!("{file} (quantized weights)"),
            false => file,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                name,
                path: path.to_path_buf(),
                tokenizer,
                template,
                stop_ids,
                context_len,
                seed: options.seed,
                prefix_capacity: options.prefix_cache,
                model,
                prefixes: Mutex::new(VecDeque::new()),
                format_tokens: OnceLock::new(),
                computing: Arc::new(Semaphore::new(computing_slots())),
            }),
        })
    }

    /// The most tokens a prompt plus its answer can have: the file's `llama.context_length`
    /// ([`DEFAULT_CONTEXT`] when it has none).
    pub fn context_len(&self) -> usize {
        self.shared.context_len
    }

    /// The tokenizer built from the file.
    pub fn tokenizer(&self) -> &hooks::Tokenizer {
        &self.shared.tokenizer
    }

    /// The prompt text the chat template makes of `messages`, ending with the opening of the
    /// assistant's turn (`add_generation_prompt`). A template may refuse a conversation (e.g.
    /// roles that do not alternate): its message is the error.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.shared.render(messages, true)
    }

    /// The prompt's token ids (the rendered text tokenized with special tokens recognised and
    /// nothing added, as transformers' `apply_chat_template` does).
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        Ok(self.shared.tokenizer.encode(&self.render(messages)?)?)
    }

    /// How many of the prompt's tokens ([`Self::prompt_ids`]) are the conversation before its
    /// last message, whose KV cache is kept for the next prompts that start the same way (0:
    /// nothing is kept, e.g. for a single message).
    pub fn prompt_start(&self, messages: &[Message]) -> Result<usize> {
        Ok(self.shared.prompt(messages)?.start)
    }

    /// The model's log-probabilities of every vocabulary id as the first token of the answer
    /// to `messages` (blocking). For scoring by comparing a few candidate tokens directly.
    pub fn next_token_logprobs(&self, messages: &[Message]) -> Result<Vec<f32>> {
        let prompt = self.shared.prompt(messages)?;
        let (_, logits) = self.shared.prefill(&prompt)?;
        Ok(log_softmax(&logits))
    }

    /// Reads `request` on the calling thread (blocking), as [`Llm::read`].
    pub fn read_blocking(&self, request: &ReadRequest) -> Result<ReadResponse> {
        self.shared.read(request)
    }

    /// Scores `request`'s texts on the calling thread (blocking), as
    /// [`Llm::continuation_logprobs`].
    pub fn continuation_logprobs_blocking(
        &self,
        request: &ContinuationRequest,
    ) -> Result<ContinuationResponse> {
        self.shared.continuation_logprobs(request)
    }

    /// Answers `request` on the calling thread (blocking; waits while another request runs).
    /// [`Llm::chat`] runs this on tokio's blocking pool.
    pub fn generate(&self, request: &ChatRequest) -> Result<ChatResponse> {
        self.shared.generate(request)
    }
}

impl Shared {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::Llm {
            backend: self.name.clone(),
            message: message.into(),
        }
    }

    /// [`ChatTemplate::render`], its refusals as errors of this model.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template
            .render(messages, add_generation_prompt)
            .map_err(|message| self.error(format!("the chat template: {message}")))
    }

    /// The prompt of `messages` and its start shared with other prompts.
    fn prompt(&self, messages: &[Message]) -> Result<Prompt> {
        let ids = self.prompt_ids(messages)?;
        let start = shared_start(&self.template, &self.tokenizer, messages, &ids)?;
        Ok(Prompt { ids, start })
    }

    /// The token ids of the prompt of `messages`, which fits the context with room for one
    /// answer token.
    fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        if messages.is_empty() {
            return Err(Error::Invalid(
                "a chat request needs at least one message".into(),
            ));
        }
        let ids = self.tokenizer.encode(&self.render(messages, true)?)?;
        if ids.len() >= self.context_len {
            return Err(self.error(format!(
                "the prompt has {} tokens, more than the model's context of {} leaves room for \
                 (at least one answer token)",
                ids.len(),
                self.context_len
            )));
        }
        Ok(ids)
    }

    fn generate(&self, request: &ChatRequest) -> Result<ChatResponse> {
        if !(request.temperature >= 0.0 && request.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                request.temperature
            )));
        }
        let prompt = self.prompt(&request.messages)?;
        let mut usage = Usage {
            prompt_tokens: prompt.ids.len() as u64,
            completion_tokens: 0,
        };
        if request.max_tokens == 0 {
            return Ok(ChatResponse {
                text: String::new(),
                logprobs: request.top_logprobs.map(|_| Vec::new()),
                usage,
                truncated: true,
            });
        }
        let (mut cache, mut scores) = self.prefill(&prompt)?;

        let mut rng = StdRng::seed_from_u64(
            self.seed ^ hooks::digest::Fnv::default().u32s(&prompt.ids).finish(),
        );
        let mut generated = Vec::new();
        let mut logprobs = request.top_logprobs.map(|_| Vec::new());
        let mut truncated = false;
        let mut answer = String::new();
        loop {
            let pick = |scores: &[f32], rng: &mut StdRng| {
                if request.temperature == 0.0 {
                    argmax(scores)
                } else {
                    sample(scores, request.temperature, rng)
                }
            };
            // With a format: the allowed tokens, and their scores.
            let allowed = match request.format {
                None => None,
                Some(format) => {
                    let candidates = self.continuations(format, &answer, scores.len())?;
                    let candidate_scores: Vec<f32> = candidates
                        .iter()
                        .map(|&(id, _)| scores[id as usize])
                        .collect();
                    Some((candidates, candidate_scores))
                }
            };
            let token = match &allowed {
                None => pick(&scores, &mut rng),
                Some((candidates, candidate_scores)) => {
                    let (id, text) = candidates[pick(candidate_scores, &mut rng) as usize];
                    answer.push_str(text);
                    id
                }
            };
            usage.completion_tokens += 1;
            if self.stop_ids.contains(&token) {
                break;
            }
            if let (Some(list), Some(k)) = (logprobs.as_mut(), request.top_logprobs) {
                let lp = log_softmax(&scores);
                // A model's rows past its tokenizer's vocabulary (padding) have no text.
                let text = |id: u32| {
                    self.tokenizer
                        .token_text(id)
                        .unwrap_or_else(|_| format!("<{id}>"))
                };
                // With a format, the alternatives are the allowed tokens (the others could not
                // have been chosen): how sure the model was between the allowed 0 and 1.
                let top = match &allowed {
                    None => top_k(&lp, k as usize),
                    Some((candidates, candidate_scores)) => top_k(candidate_scores, k as usize)
                        .into_iter()
                        .map(|i| candidates[i as usize].0)
                        .collect(),
                };
                list.push(TokenLogprobs {
                    token: text(token),
                    logprob: lp[token as usize],
                    top: top
                        .into_iter()
                        .map(|id| (text(id), lp[id as usize]))
                        .collect(),
                });
            }
            generated.push(token);
            if request
                .format
                .is_some_and(|format| format.is_complete(&answer))
            {
                break;
            }
            if generated.len() >= request.max_tokens as usize || cache.len() >= self.context_len {
                truncated = true;
                break;
            }
            scores = self.advance(&mut cache, &[token])?;
        }
        Ok(ChatResponse {
            // Sampled padding rows (past the tokenizer's vocabulary) have no text.
            text: self.tokenizer.decode(
                &generated
                    .iter()
                    .copied()
                    .filter(|&id| (id as usize) < self.tokenizer.vocab_size())
                    .collect::<Vec<_>>(),
            )?,
            logprobs,
            usage,
            truncated,
        })
    }

    /// Reads `request`'s answers: the prompt (as for [`Self::generate`]) is run once into a
    /// KV cache, which each answer continues with its pieces (each
    /// tokenized on its own), and the candidates' log-probabilities are taken at each piece's
    /// last token ([`Self::read_after`]).
    fn read(&self, request: &ReadRequest) -> Result<ReadResponse> {
        let prompt = self.prompt_ids(&request.messages)?;
        let encode = |text: &str| Ok(self.tokenizer.encode(text)?);
        // Per answer: its ids after the prompt and where each piece ends among them.
        let sequences = request.answer_ids(encode)?;
        let candidates = request.candidate_ids(encode)?;
        let mut logprobs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); sequences.len()];
        self.read_after(&prompt, &sequences, |answer, _, row| {
            logprobs[answer].push(
                candidates
                    .iter()
                    .map(|id| id.and_then(|id| row.get(id as usize).copied()))
                    .map(|lp| lp.unwrap_or(f32::NEG_INFINITY))
                    .collect(),
            )
        })?;
        Ok(ReadResponse {
            logprobs,
            usage: Self::reading_usage(prompt.len(), &sequences),
        })
    }

    /// The log-probability of every token of `request`'s texts, each continuing the plain
    /// prompt (no chat template): all but the prompt's last token go into the KV cache, and
    /// each text is read from that last token on, the log-probabilities taken at every
    /// position for the token that follows ([`Self::read_after`]).
    fn continuation_logprobs(&self, request: &ContinuationRequest) -> Result<ContinuationResponse> {
        let prompt = self.tokenizer.encode(&request.prompt)?;
        let Some((&last, cached)) = prompt.split_last() else {
            return Err(Error::Invalid(
                "a continuation request needs a prompt that makes tokens".into(),
            ));
        };
        let texts = request
            .texts
            .iter()
            .map(|text| self.tokenizer.encode(text))
            .collect::<hooks::Result<Vec<Vec<u32>>>>()?;
        let sequences: Vec<(Vec<u32>, Vec<usize>)> = texts
            .iter()
            .map(|ids| {
                let mut read = vec![last];
                read.extend(ids);
                (read, (0..ids.len()).collect())
            })
            .collect();
        let mut logprobs: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        // A token past the model's logits (an id the tokenizer added) can never be predicted.
        self.read_after(cached, &sequences, |text, position, row| {
            let token = texts[text][position] as usize;
            logprobs[text].push(row.get(token).copied().unwrap_or(f32::NEG_INFINITY))
        })?;
        Ok(ContinuationResponse {
            logprobs,
            usage: Self::reading_usage(cached.len(), &sequences),
        })
    }

    /// What reading `sequences` after a prompt of `prompt` tokens would cost through an API:
    /// the prompt once per sequence with something to read.
    fn reading_usage(prompt: usize, sequences: &[(Vec<u32>, Vec<usize>)]) -> Usage {
        Usage {
            prompt_tokens: sequences
                .iter()
                .filter(|(_, ends)| !ends.is_empty())
                .map(|(ids, _)| (prompt + ids.len()) as u64)
                .sum(),
            completion_tokens: 0,
        }
    }

    /// Runs `cached` once into a KV cache, continues it with each of
    /// `sequences` (token ids, and the positions among them to read), in batches of
    /// [`READ_BATCH`], right-padded (a causal model's earlier positions do not see the
    /// padding), and hands `read(sequence, reading point, log-probabilities of the next
    /// token)` every reading point, in order. The unembedding is applied at those points
    /// only; with nothing to read, nothing runs.
    fn read_after(
        &self,
        cached: &[u32],
        sequences: &[(Vec<u32>, Vec<usize>)],
        mut read: impl FnMut(usize, usize, &[f32]),
    ) -> Result<()> {
        if sequences.iter().all(|(_, ends)| ends.is_empty()) {
            return Ok(());
        }
        if let Some((ids, _)) = sequences
            .iter()
            .find(|(ids, _)| cached.len() + ids.len() > self.context_len)
        {
            return Err(self.error(format!(
                "the prompt and a text to read have {} tokens, more than the model's context \
                 of {}",
                cached.len() + ids.len(),
                self.context_len
            )));
        }
        let unembedding = self.model.unembedding();
        let mut prompt_cache = hooks::KvCache::new();
        if !cached.is_empty() {
            self.extend(&mut prompt_cache, cached)?;
        }
        for (batch_index, batch) in sequences.chunks(READ_BATCH).enumerate() {
            let width = batch.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
            let mut padded = Vec::with_capacity(batch.len() * width);
            let mut rows = Vec::new();
            for (i, (ids, ends)) in batch.iter().enumerate() {
                padded.extend(ids);
                padded.resize((i + 1) * width, 0);
                rows.extend(ends.iter().map(|&end| (i * width + end) as u32));
            }
            if rows.is_empty() {
                continue;
            }
            let ids = Tensor::from_vec(padded, (batch.len(), width), &Device::Cpu)?;
            let mut hooks = hooks::Hooks::capture_only([hooks::HookPoint::FinalNorm]);
            let out = self
                .model
                .forward_cached(&ids, &mut hooks, &mut prompt_cache.clone())?;
            let normed = out
                .captures
                .get(&hooks::HookPoint::FinalNorm)
                .ok_or_else(|| self.error("the reading pass captured no final norm"))?;
            let d = normed.dim(2)?;
            let at_ends = normed
                .reshape((batch.len() * width, d))?
                .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
            let logits: Vec<Vec<f32>> = unembedding
                .project(&at_ends)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2()?;
            let mut logits = logits.into_iter();
            for (i, (_, ends)) in batch.iter().enumerate() {
                for (point, row) in logits.by_ref().take(ends.len()).enumerate() {
                    read(batch_index * READ_BATCH + i, point, &log_softmax(&row));
                }
            }
        }
        Ok(())
    }

    /// The tokens that keep `answer` a start of `format`, with their text, among the first
    /// `logits` ids (those the model scores); never empty: an answer that cannot go on is an
    /// error naming the format.
    fn continuations(
        &self,
        format: AnswerFormat,
        answer: &str,
        logits: usize,
    ) -> Result<Vec<(u32, &str)>> {
        let tokens = self.format_tokens.get_or_init(|| {
            (0..self.tokenizer.vocab_size() as u32)
                .filter_map(|id| {
                    let text = self.tokenizer.token_text(id).ok()?;
                    let in_alphabet = !text.is_empty()
                        && text.chars().all(|c| AnswerFormat::ALPHABET.contains(c));
                    // A digit is a token of its own (a leading space allowed), so that the
                    // scorer reads each answer's probability from one token's alternatives.
                    let digits = text.chars().filter(char::is_ascii_digit).count();
                    let digit_alone = digits == 0 || (digits == 1 && text.trim_start().len() == 1);
                    (in_alphabet && digit_alone).then_some((id, text))
                })
                .collect()
        });
        let candidates: Vec<(u32, &str)> = tokens
            .iter()
            .filter(|(id, _)| (*id as usize) < logits)
            .filter(|(_, text)| format.admits_prefix(&format!("{answer}{text}")))
            .map(|(id, text)| (*id, text.as_str()))
            .collect();
        if candidates.is_empty() {
            return Err(self.error(format!(
                "no token of the vocabulary continues the answer {answer:?} as {format}"
            )));
        }
        Ok(candidates)
    }

    /// A KV cache that has seen the prompt and the logits after its last token.
    ///
    /// A prompt is always run in two parts: everything before its last message
    /// ([`Prompt::start`]), then the rest. The first part's cache is kept, and reused only by
    /// prompts with exactly that first part, so each answer depends on its prompt alone, never
    /// on what ran before:
    /// float rounding depends on how tokens are chunked, and with quantized weights
    /// ([`LocalOptions::quantized`]) that flips 8-bit activation steps, which moved
    /// SmolLM2-135M's top log-probability by up to 0.25 nats (measured when this model was
    /// candle's quantized Llama).
    fn prefill(&self, prompt: &Prompt) -> Result<(hooks::KvCache, Vec<f32>)> {
        let mut prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let (ids, split) = (&prompt.ids, prompt.start);
        let mut cache = if split == 0 {
            hooks::KvCache::new()
        } else if let Some(i) = prefixes.iter().position(|p| p.ids == ids[..split]) {
            let prefix = prefixes.remove(i).expect("index from position");
            let cache = prefix.cache.clone();
            prefixes.push_back(prefix);
            cache
        } else {
            let mut cache = hooks::KvCache::new();
            self.extend(&mut cache, &ids[..split])?;
            if self.prefix_capacity > 0 {
                if prefixes.len() >= self.prefix_capacity {
                    prefixes.pop_front();
                }
                prefixes.push_back(Prefix {
                    ids: ids[..split].to_vec(),
                    cache: cache.clone(),
                });
            }
            cache
        };
        let logits = self.advance(&mut cache, &ids[split..])?;
        Ok((cache, logits))
    }

    /// Runs `ids` after `cache` (which keeps them), [`PREFILL_CHUNK`] at a time (a cached
    /// pass runs through every layer); the final norm's output `[1, t, width]` at the last
    /// chunk's `t` positions.
    fn extend(&self, cache: &mut hooks::KvCache, ids: &[u32]) -> Result<Tensor> {
        let mut last = None;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let mut hooks = hooks::Hooks::capture_only([hooks::HookPoint::FinalNorm]);
            let out =
                self.model
                    .forward_cached(&Tensor::new(chunk, &Device::Cpu)?, &mut hooks, cache)?;
            last = out.captures.get(&hooks::HookPoint::FinalNorm).cloned();
        }
        last.ok_or_else(|| Error::Invalid("no tokens to process".into()))
    }

    /// [`Self::extend`], then the logits after the last of `ids` (f32).
    fn advance(&self, cache: &mut hooks::KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let normed = self.extend(cache, ids)?;
        let at_last = normed.i((0, normed.dim(1)? - 1))?.unsqueeze(0)?;
        let logits = self.model.unembedding().project(&at_last)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

impl LocalLlm {
    /// Runs `work` on tokio's blocking pool (on this thread outside tokio).
    fn off_the_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Shared) -> Result<T> + Send + 'static,
    ) -> BoxFuture<'_, Result<T>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let slot = Arc::clone(&shared.computing)
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed");
                    runtime
                        .spawn_blocking(move || {
                            let _slot = slot;
                            work(&shared)
                        })
                        .await
                        .map_err(|e| Error::Llm {
                            backend: self.shared.name.clone(),
                            message: format!("the model's task failed: {e}"),
                        })?
                }
                // Not inside tokio (e.g. a plain executor): compute here.
                Err(_) => work(&shared),
            }
        })
    }
}

impl Llm for LocalLlm {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
        self.off_the_runtime(move |shared| shared.generate(&request))
    }

    fn read(&self, request: ReadRequest) -> BoxFuture<'_, Result<ReadResponse>> {
        self.off_the_runtime(move |shared| shared.read(&request))
    }

    fn continuation_logprobs(
        &self,
        request: ContinuationRequest,
    ) -> BoxFuture<'_, Result<ContinuationResponse>> {
        self.off_the_runtime(move |shared| shared.continuation_logprobs(&request))
    }

    fn reads_prompts(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        self.shared.name.clone()
    }
}

/// How many of `ids`, the prompt of `messages` (rendered by `template`, tokenized by
/// `tokenizer`), are the conversation before its last message: its rendering (no generation
/// prompt) when the prompt begins with it token for token and goes on past it, else 0
/// (nothing is shared: one message, or a template that renders earlier messages differently
/// once more follow, or refuses the shorter conversation).
fn shared_start(
    template: &ChatTemplate,
    tokenizer: &hooks::Tokenizer,
    messages: &[Message],
    ids: &[u32],
) -> Result<usize> {
    let before = &messages[..messages.len().saturating_sub(1)];
    if before.is_empty() {
        return Ok(0);
    }
    let Ok(text) = template.render(before, false) else {
        return Ok(0);
    };
    let start = tokenizer.encode(&text)?;
    Ok(match ids.starts_with(&start) && start.len() < ids.len() {
        true => start.len(),
        false => 0,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn refuses_missing_and_non_llama_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.gguf");
        let err = LocalLlm::load(&missing).unwrap_err().to_string();
        assert!(err.contains("absent.gguf"), "{err}");

        let not_gguf = dir.path().join("text.gguf");
        std::fs::write(&not_gguf, "hello").unwrap();
        let err = LocalLlm::load(&not_gguf).unwrap_err().to_string();
        assert!(
            err.contains("text.gguf") && err.contains("not a readable GGUF"),
            "{err}"
        );

        let write = |name: &str, metadata: &[(&str, &Value)]| {
            let path = dir.path().join(name);
            let mut file = std::fs::File::create(&path).unwrap();
            candle_core::quantized::gguf_file::write(&mut file, metadata, &[]).unwrap();
            path
        };
        let gpt2 = write(
            "gpt2.gguf",
            &[("general.architecture", &Value::String("gpt2".into()))],
        );
        let err = LocalLlm::load(&gpt2).unwrap_err().to_string();
        assert!(
            err.contains("gpt2.gguf")
                && err.contains("'gpt2' is not supported (supported: llama, qwen2)"),
            "{err}"
        );

        let llama = Value::String("llama".into());
        let untemplated = write("untemplated.gguf", &[("general.architecture", &llama)]);
        let err = LocalLlm::load(&untemplated).unwrap_err().to_string();
        assert!(
            err.contains("untemplated.gguf")
                && err.contains("'tokenizer.chat_template' is missing"),
            "{err}"
        );

        let template = Value::String("{% for message in messages %}{{ message.content }}".into());
        let unclosed = write(
            "unclosed.gguf",
            &[
                ("general.architecture", &llama),
                ("tokenizer.chat_template", &template),
            ],
        );
        let err = LocalLlm::load(&unclosed).unwrap_err().to_string();
        assert!(
            err.contains("unclosed.gguf")
                && err.contains("tokenizer.chat_template: syntax error")
                && err.contains("chat_template:1"),
            "{err}"
        );
    }

    /// The shared start is the earlier messages' rendering where the prompt begins with it,
    /// and nothing where a template renders them differently once another follows, refuses
    /// the shorter conversation, or renders the last message as nothing.
    #[test]
    fn the_shared_start_is_the_earlier_messages_only_when_they_render_the_same() {
        let tokenizer = hooks::Tokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json"),
            None,
        )
        .unwrap();
        let messages = [
            Message::system("Be brief."),
            Message::user("Hi"),
            Message::assistant("Hello."),
            Message::user("Bye"),
        ];
        let start = |source: &str, messages: &[Message]| {
            let template = ChatTemplate::new(source, BTreeMap::new()).unwrap();
            let text = template.render(messages, true).unwrap();
            let ids = tokenizer.encode(&text).unwrap();
            let start = shared_start(&template, &tokenizer, messages, &ids).unwrap();
            (start, ids)
        };
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let (at, ids) = start(chatml, &messages);
        let before = ChatTemplate::new(chatml, BTreeMap::new())
            .unwrap()
            .render(&messages[..3], false)
            .unwrap();
        assert_eq!(at, tokenizer.encode(&before).unwrap().len());
        assert!(at > 0 && at < ids.len());
        assert_eq!(start(chatml, &messages[..1]).0, 0);
        // The system message moved into the last user turn: earlier turns change.
        let folded = "{% for m in messages[1:] %}{% if loop.last %}{{ messages[0].content }} {% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        assert_eq!(start(folded, &messages).0, 0);
        // The shorter conversation is refused (it must end with a user turn).
        let strict = "{% if messages[-1].role != 'user' %}{{ raise_exception('end with a user turn') }}{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        assert!(start(strict, &messages[..2]).0 == 0 && start(strict, &messages).0 == 0);
        // The last message renders as nothing: the start would be the whole prompt.
        let blind = "{% for m in messages %}{% if not (loop.last and add_generation_prompt) %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}";
        assert_eq!(start(blind, &messages).0, 0);
    }
}
