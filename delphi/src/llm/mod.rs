//! The language models that explain and score: one [`Llm`] interface, implemented by an
//! OpenAI-compatible HTTP client ([`openai::OpenAiClient`]) and by a GGUF model run in
//! process ([`local::LocalLlm`]).

pub mod local;
pub mod openai;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::Result;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The asking side (our prompts).
    User,
    /// The model's side (few-shot answers and its replies).
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Author of the message.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// One chat completion to make, with its own sampling settings (never shared between
/// requests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far; the model answers the last message.
    pub messages: Vec<Message>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// When set, ask for this many alternatives (with log-probabilities) per generated token.
    pub top_logprobs: Option<u8>,
    /// When set, the shape the answer must take. The local model is held to it while it
    /// generates; an HTTP server is not sent it (the prompt asks for the shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<AnswerFormat>,
}

/// The shape of an answer that a parser reads, for backends that can hold generation to it:
/// a model too small to follow the prompt's instructions still gives a readable answer, and
/// its choices (which 0s and 1s) are still its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// `[1, 0, 1]`: `len` zeros and ones, separated by a comma and a space, in brackets (the
    /// detection and fuzzing scorers' answer; `len` 0 admits only `[]`, which no scorer asks).
    ZeroOneList {
        /// How many zeros and ones.
        len: usize,
    },
}

impl AnswerFormat {
    /// Every character any answer of this format can hold.
    pub const ALPHABET: &'static str = "[]01, ";

    /// Whether `text` is the start of (or all of) an answer of this format.
    pub fn admits_prefix(&self, text: &str) -> bool {
        match *self {
            Self::ZeroOneList { len } => {
                text.len() <= zero_one_list_len(len)
                    && text.bytes().enumerate().all(|(i, byte)| match i {
                        0 => byte == b'[',
                        _ if i + 1 == zero_one_list_len(len) => byte == b']',
                        _ => match (i - 1) % 3 {
                            0 => byte == b'0' || byte == b'1',
                            1 => byte == b',',
                            _ => byte == b' ',
                        },
                    })
            }
        }
    }

    /// Whether `text` is a whole answer of this format.
    pub fn is_complete(&self, text: &str) -> bool {
        match *self {
            Self::ZeroOneList { len } => {
                text.len() == zero_one_list_len(len) && self.admits_prefix(text)
            }
        }
    }
}

/// Characters of a `[d, d, ..., d]` list of `len` digits: `[`, then 3 per digit but the last
/// (digit, comma, space), then the last digit and `]`.
fn zero_one_list_len(len: usize) -> usize {
    if len == 0 {
        2
    } else {
        len.saturating_mul(3)
    }
}

impl std::fmt::Display for AnswerFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ZeroOneList { len } => write!(f, "a list of {len} zeros and ones, [1, 0, ...]"),
        }
    }
}

/// A generated token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at this position (including the chosen one), best first.
    pub top: Vec<(String, f32)>,
}

/// Tokens spent by requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompts.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

impl Usage {
    /// Adds another request's usage.
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The generated text.
    pub text: String,
    /// Per generated token, when [`ChatRequest::top_logprobs`] asked for them and the backend
    /// supports it.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// Tokens spent.
    pub usage: Usage,
    /// Whether generation stopped at [`ChatRequest::max_tokens`] (or a full context) rather
    /// than at the end of the answer: OpenAI's `finish_reason: "length"`.
    pub truncated: bool,
}

/// A conversation read rather than answered: the model's next-token log-probabilities at
/// chosen points of answers that the prompt already holds (prompt log-probabilities, as
/// vLLM's `prompt_logprobs`), for scorers that need the model's belief at many places of a
/// text without generating it (the simulation scorer). Several answers to one conversation
/// are read in one request, so that a backend can batch them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadRequest {
    /// The conversation up to the answers (ending with the user's message).
    pub messages: Vec<Message>,
    /// The answers, each in pieces: the model's belief about the next token is read after
    /// each piece, with the conversation and the answer's earlier pieces in view. Each piece
    /// is tokenized on its own (so a reading point always falls at a piece's end; a server
    /// tokenizing the whole text may merge tokens across the boundaries).
    pub answers: Vec<Vec<String>>,
    /// The tokens (as text) whose log-probabilities are read.
    pub candidates: Vec<String>,
}

impl ReadRequest {
    /// Per answer, its token ids (each piece tokenized on its own by `encode`) and where each
    /// piece ends among them; a piece that makes no tokens is an error.
    pub(crate) fn answer_ids(
        &self,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
    ) -> Result<Vec<(Vec<u32>, Vec<usize>)>> {
        self.answers
            .iter()
            .map(|answer| {
                let mut ids = Vec::new();
                let mut ends = Vec::with_capacity(answer.len());
                for piece in answer {
                    let piece_ids = encode(piece)?;
                    if piece_ids.is_empty() {
                        return Err(crate::Error::Invalid(format!(
                            "the answer piece {piece:?} makes no tokens"
                        )));
                    }
                    ids.extend(piece_ids);
                    ends.push(ids.len() - 1);
                }
                Ok((ids, ends))
            })
            .collect()
    }

    /// The id of each candidate that is one token (`None` for the others: they can never be
    /// the next token).
    pub(crate) fn candidate_ids(
        &self,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
    ) -> Result<Vec<Option<u32>>> {
        self.candidates
            .iter()
            .map(|text| {
                let ids = encode(text)?;
                Ok((ids.len() == 1).then(|| ids[0]))
            })
            .collect()
    }
}

/// What [`Llm::read`] gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadResponse {
    /// Per answer, per piece, per candidate: its natural-log probability as the next token
    /// (`-inf` for a candidate that is not one token of the model's vocabulary).
    pub logprobs: Vec<Vec<Vec<f32>>>,
    /// Tokens spent: prompt tokens (a server also counts the one token it generates per
    /// request, and the one read after each answer).
    pub usage: Usage,
}

/// Texts scored rather than answered: the log-probability of every token of several
/// continuations of one plain-text prompt, with no chat template (a base model's view, as the
/// surprisal scorer asks for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuationRequest {
    /// The text before each continuation.
    pub prompt: String,
    /// The continuations, each tokenized on its own.
    pub texts: Vec<String>,
}

/// What [`Llm::continuation_logprobs`] gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuationResponse {
    /// Per text, per token of it: its natural-log probability after the prompt and the
    /// text's earlier tokens.
    pub logprobs: Vec<Vec<f32>>,
    /// Tokens spent: prompt tokens (a server also counts the one token it generates per
    /// request).
    pub usage: Usage,
}

/// The error of a `backend` that cannot read prompt log-probabilities.
fn cannot_read_prompts(backend: String) -> crate::Error {
    crate::Error::Llm {
        backend,
        message: "this backend cannot read a prompt's log-probabilities (a local GGUF model can, \
                  and a vLLM server given its model's tokenizer)"
            .into(),
    }
}

/// A future that can be sent between threads, as returned by [`Llm::chat`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A chat model: anything that answers a [`ChatRequest`]. Implementations bound their own
/// concurrency and retry transient failures; an error returned here is final for that request.
pub trait Llm: Send + Sync {
    /// Answers one request.
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>>;
    /// Reads `request`'s answer without generating ([`ReadRequest`]). Only backends that see
    /// the model's logits at every prompt position can ([`Llm::reads_prompts`]); the others
    /// refuse.
    fn read(&self, request: ReadRequest) -> BoxFuture<'_, Result<ReadResponse>> {
        let _ = request;
        Box::pin(async move { Err(cannot_read_prompts(self.name())) })
    }
    /// Scores `request`'s texts ([`ContinuationRequest`]); like [`Llm::read`], only backends
    /// that see the logits at every prompt position can.
    fn continuation_logprobs(
        &self,
        request: ContinuationRequest,
    ) -> BoxFuture<'_, Result<ContinuationResponse>> {
        let _ = request;
        Box::pin(async move { Err(cannot_read_prompts(self.name())) })
    }
    /// Whether [`Llm::read`] and [`Llm::continuation_logprobs`] work, checked before a job
    /// that needs them starts.
    fn reads_prompts(&self) -> bool {
        false
    }
    /// A short name for logs and result files (model name, URL or GGUF file name).
    fn name(&self) -> String;
    /// What decides the answers, recorded in `run_config.json` so that a rerun with another
    /// model is refused: the model name without where it is served (a server may move).
    fn model_id(&self) -> String {
        self.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_one_lists_are_recognised_character_by_character() {
        let three = AnswerFormat::ZeroOneList { len: 3 };
        for prefix in [
            "",
            "[",
            "[1",
            "[1,",
            "[1, ",
            "[1, 0",
            "[1, 0, 1",
            "[1, 0, 1]",
        ] {
            assert!(three.admits_prefix(prefix), "{prefix:?}");
        }
        assert!(three.is_complete("[1, 0, 1]"));
        for bad in [
            "1",
            "[2",
            "[1,0",
            "[1 ,",
            "[1, 0]",
            "[1, 0, 1, ",
            "[1, 0, 1] ",
            "[[",
            "]",
        ] {
            assert!(!three.admits_prefix(bad), "{bad:?}");
        }
        assert!(!three.is_complete("[1, 0, 1"));
        let one = AnswerFormat::ZeroOneList { len: 1 };
        assert!(one.is_complete("[0]") && !one.admits_prefix("[0,"));
        // Every complete answer is one the classifier scorers' parser reads.
        let answer = "[0, 1, 1, 0, 0]";
        assert!(AnswerFormat::ZeroOneList { len: 5 }.is_complete(answer));
        assert_eq!(
            crate::prompts::parse_predictions(answer, 5),
            Some(vec![false, true, true, false, false])
        );
        assert!(answer.chars().all(|c| AnswerFormat::ALPHABET.contains(c)));
    }
}
