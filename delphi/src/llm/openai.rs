//! A client for any OpenAI-compatible `/chat/completions` server (vLLM, SGLang, llama.cpp
//! server, Ollama, OpenRouter, OpenAI): bounded concurrency, timeouts, retries with
//! exponential backoff and jitter that honour `Retry-After`, per-request sampling settings,
//! token accounting. The API key comes from an environment variable and is never logged.
//!
//! With a [`PromptReader`] (the served model's tokenizer and chat template) it also reads
//! prompt log-probabilities from a vLLM server, for the simulation and surprisal scorers:
//! prompts go to `/completions` as token ids with vLLM's `prompt_logprobs`, so every reading
//! point is a known position.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{
    BoxFuture, ChatRequest, ChatResponse, ContinuationRequest, ContinuationResponse, Llm,
    ReadRequest, ReadResponse, TokenLogprobs, Usage,
};
use crate::{Error, Result};
use hooks::chat_template::ChatTemplate;

/// How many of the most likely tokens a [`PromptReader`] asks for at each prompt position
/// by default (`prompt_logprobs`); OpenAI's simulator read 15.
pub const DEFAULT_PROMPT_LOGPROBS: u32 = 20;

/// The served model's tokenizer and chat template, with which an [`OpenAiClient`] reads
/// prompt log-probabilities from a vLLM server ([`Llm::read`],
/// [`Llm::continuation_logprobs`]): prompts are rendered and tokenized here, exactly as a
/// local model's would be, and sent as token ids to `/completions` with `prompt_logprobs`;
/// vLLM answers with, at every position, the log-probability of the token there and of the
/// `top` most likely ones. A candidate outside those reads as impossible (`-inf`), as in
/// OpenAI's simulator.
pub struct PromptReader {
    source: String,
    tokenizer: hooks::Tokenizer,
    template: ChatTemplate,
    top: u32,
    /// Whether a reply has shown that the server tokenizes as `tokenizer` does.
    verified: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PromptReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptReader")
            .field("source", &self.source)
            .field("top", &self.top)
            .finish()
    }
}

impl PromptReader {
    /// The tokenizer and chat template of `model`, named as [`hooks::Model::load`] takes it
    /// (hub id, folder or `.gguf` file; nothing but the tokenizer files is fetched), reading
    /// the `top` most likely tokens at each position.
    pub fn for_model(model: &str, top: u32) -> Result<Self> {
        if top == 0 {
            return Err(Error::Invalid(
                "prompt log-probabilities: read at least 1 token per position".into(),
            ));
        }
        let hooks::chat_template::ModelChat {
            tokenizer,
            template,
            ..
        } = hooks::chat_template::ModelChat::for_model(model, None)?;
        // Pieces of answers are tokenized on their own: a tokenizer that marks the start of
        // every text (SentencePiece's leading space, U+2581) would add a space to each.
        let first = tokenizer.encode("Hello")?.first().copied();
        let marked = first
            .and_then(|id| tokenizer.inner().id_to_token(id))
            .is_some_and(|token| token.starts_with('\u{2581}'));
        if marked {
            return Err(Error::Invalid(format!(
                "{model}: its tokenizer marks the start of every text (a SentencePiece-style \
                 leading space), so the pieces of answers cannot be tokenized on their own; \
                 reading prompts needs a byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM, GPT-2 \
                 families)"
            )));
        }
        Ok(Self {
            source: model.to_string(),
            tokenizer,
            template,
            top,
            verified: Default::default(),
        })
    }

    /// Token ids of `text` (nothing added).
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text)?)
    }

    /// Refuses a server whose model tokenizes otherwise: the prompt's own tokens, as the
    /// server writes them back (`decoded_token`: the token decoded alone in recent vLLM
    /// versions, with transformers' clean-up of spaces before punctuation, or its vocabulary
    /// entry in older ones), must read as this tokenizer's tokens of the same ids at most
    /// places. A different tokenizer's ids stand for other text, and its log-probabilities
    /// would be read at the wrong tokens without a sign. Tokens written as nothing or as
    /// U+FFFD (parts of a character, special tokens left out) are not compared, nor is
    /// anything on a server that writes no text; at least [`Self::CHECKED_TOKENS`] tokens
    /// must be compared before a server is refused, and more than half of them must differ
    /// (special tokens a server writes otherwise stay a minority). Once a reply passes, later
    /// ones are not checked.
    fn check_served_tokens(
        &self,
        ids: &[u32],
        read: &PromptLogprobs,
    ) -> std::result::Result<(), String> {
        use std::sync::atomic::Ordering;
        if self.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (mut checked, mut differing) = (0, Vec::new());
        for (at, (&id, position)) in ids.iter().zip(&read.positions).enumerate() {
            let Some(served) = position.as_ref().and_then(|p| p.get(&id)?.text.as_deref()) else {
                continue;
            };
            if served.is_empty() || served.contains('\u{fffd}') {
                continue;
            }
            checked += 1;
            let piece = self.tokenizer.inner().id_to_token(id);
            let decoded = self.tokenizer.decode(&[id]).unwrap_or_default();
            let readings = [piece.unwrap_or_default(), clean_up_spaces(&decoded)];
            if decoded != served && !readings.iter().any(|r| r == served) {
                differing.push(format!(
                    "token {id} at position {at} is {decoded:?} here but {served:?} on the server"
                ));
            }
        }
        if checked < Self::CHECKED_TOKENS {
            return Ok(());
        }
        if differing.len() * 2 > checked {
            return Err(format!(
                "the served model does not tokenize as {} does: {} of {checked} prompt tokens \
                 read otherwise on the server (e.g. {}); give --server-tokenizer the served \
                 model's own tokenizer",
                self.source,
                differing.len(),
                differing[..differing.len().min(3)].join("; ")
            ));
        }
        self.verified.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Tokens compared before a server may be refused (a short prompt says too little).
    const CHECKED_TOKENS: usize = 4;
}

/// `text` with transformers' `clean_up_tokenization_spaces` applied (what a server's
/// `decode` may do): no space before `.`, `?`, `!`, `,` and English contractions.
fn clean_up_spaces(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |text, (from, to)| text.replace(from, to))
}

/// Settings of an [`OpenAiClient`].
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The server's API root (`http://localhost:8000/v1`) or its full chat-completions URL.
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Name of the environment variable holding the API key; none sends no key.
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Time limit of one HTTP request.
    pub timeout: Duration,
    /// Retries after the first attempt of a request before it fails.
    pub max_retries: u32,
    /// Wait before the first retry; doubles each retry up to [`Self::max_backoff`].
    pub initial_backoff: Duration,
    /// Longest wait between retries of our own backoff. A server's `Retry-After` is honoured
    /// up to [`Self::timeout`] (a longer one would stall a request far past its time limit).
    pub max_backoff: Duration,
    /// Prices in dollars per million prompt and completion tokens, for the cost estimate.
    pub price_per_million: Option<(f64, f64)>,
    /// The served model's tokenizer and chat template, to read prompt log-probabilities
    /// (vLLM only); without it the reading scorers refuse this client.
    pub prompt_reader: Option<Arc<PromptReader>>,
}

impl OpenAiConfig {
    /// Defaults for a server at `url` serving `model`: 16 requests in flight, 120 s timeout,
    /// 8 retries from 1 s doubling to 30 s.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key_env: None,
            concurrency: 16,
            timeout: Duration::from_secs(120),
            max_retries: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            price_per_million: None,
            prompt_reader: None,
        }
    }

    /// The URL chat requests go to.
    fn endpoint(&self) -> String {
        self.endpoint_of("chat/completions")
    }

    /// The URL prompt readings go to (`/completions` beside `/chat/completions`).
    fn completions_endpoint(&self) -> String {
        self.endpoint_of("completions")
    }

    /// The API root (the URL without a trailing `/chat/completions`) joined with `path`, the
    /// URL's query string (e.g. Azure's `api-version`) kept at the end.
    fn endpoint_of(&self, path: &str) -> String {
        // A fragment is never sent.
        let url = self.url.split('#').next().unwrap_or_default();
        let (url, query) = match url.split_once('?') {
            Some((url, query)) => (url, format!("?{query}")),
            None => (url, String::new()),
        };
        let url = url.trim_end_matches('/');
        let root = url.strip_suffix("/chat/completions").unwrap_or(url);
        format!("{root}/{path}{query}")
    }
}

/// `endpoint` as shown in logs, errors and `run_config.json`: without credentials
/// (`user:password@`) or a query string (which may carry a key).
fn shown(endpoint: &str) -> String {
    let endpoint = endpoint.split(['?', '#']).next().unwrap_or_default();
    match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => endpoint.to_string(),
    }
}

/// An OpenAI-compatible chat-completions client.
pub struct OpenAiClient {
    config: OpenAiConfig,
    endpoint: String,
    completions_endpoint: String,
    /// `endpoint` without credentials, for messages.
    shown: String,
    /// `completions_endpoint` without credentials, for messages.
    shown_completions: String,
    api_key: Option<String>,
    http: reqwest::Client,
    in_flight: Semaphore,
    usage: Mutex<Usage>,
    retries: Mutex<u64>,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key itself is never printed.
        f.debug_struct("OpenAiClient")
            .field("endpoint", &self.shown)
            .field("model", &self.config.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// One request to the server: where it goes, what it sends, how its reply is read and what
/// the reply cost.
struct Call<'a, T> {
    endpoint: &'a str,
    /// `endpoint` as messages show it.
    shown: &'a str,
    body: Value,
    parse: fn(&str) -> std::result::Result<T, Failure>,
    usage: fn(&T) -> Usage,
    /// The longest reply read.
    max_bytes: usize,
    /// The request setting that bounds the reply's length, named when it is too long.
    bounded_by: &'static str,
}

/// How one attempt ended when it did not produce a response.
enum Failure {
    /// Worth retrying (server error, 408/429, timeout, broken connection or body), after at
    /// least this long when the server said so.
    Transient(String, Option<Duration>),
    /// Retrying cannot help (other 4xx).
    Final(String),
}

/// Whether `url` starts with `http://` or `https://`, in any case (what the client can
/// reach).
pub fn is_http_url(url: &str) -> bool {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    matches!(scheme.as_deref(), Some("http" | "https"))
}

impl OpenAiClient {
    /// A client for `config`; reads the API key from `config.api_key_env` when set (an unset
    /// or empty variable is an error, so a job does not run unauthenticated by mistake).
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        if !is_http_url(&config.url) {
            return Err(Error::Invalid(format!(
                "the server URL '{}' must start with http:// or https://",
                config.url
            )));
        }
        if config.concurrency == 0 {
            return Err(Error::Invalid("concurrency must be at least 1".into()));
        }
        if config.timeout.is_zero() {
            return Err(Error::Invalid(
                "the request timeout (--timeout) must be positive".into(),
            ));
        }
        let api_key = match &config.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(key) if !key.is_empty() => Some(key),
                _ => {
                    return Err(Error::Invalid(format!(
                        "the API key variable {var} is not set (or empty)"
                    )))
                }
            },
        };
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Invalid(format!("cannot build the HTTP client: {e}")))?;
        let (endpoint, completions_endpoint) = (config.endpoint(), config.completions_endpoint());
        Ok(Self {
            shown: shown(&endpoint),
            shown_completions: shown(&completions_endpoint),
            endpoint,
            completions_endpoint,
            in_flight: Semaphore::new(config.concurrency),
            config,
            api_key,
            http,
            usage: Mutex::new(Usage::default()),
            retries: Mutex::new(0),
        })
    }

    /// Tokens spent so far by all requests of this client.
    pub fn usage(&self) -> Usage {
        *self.usage.lock().expect("usage lock")
    }

    /// Retries made so far (all requests).
    pub fn retries(&self) -> u64 {
        *self.retries.lock().expect("retries lock")
    }

    /// Estimated dollars spent so far, when prices are configured.
    pub fn cost(&self) -> Option<f64> {
        let (prompt, completion) = self.config.price_per_million?;
        let usage = self.usage();
        Some(
            (usage.prompt_tokens as f64 * prompt + usage.completion_tokens as f64 * completion)
                / 1e6,
        )
    }

    fn body(&self, request: &ChatRequest) -> Value {
        let mut body = json!({
            "model": self.config.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        });
        if let Some(top) = request.top_logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(top);
        }
        body
    }

    /// One attempt at `call`.
    async fn attempt<T>(&self, call: &Call<'_, T>) -> std::result::Result<T, Failure> {
        let mut builder = self.http.post(call.endpoint).json(&call.body);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        let response = builder.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "connection failed"
            };
            Failure::Transient(format!("request {what}: {}", without_url(&e)), None)
        })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = read_body(response, call.max_bytes, call.bounded_by).await?;
        if !status.is_success() {
            let message = format!("HTTP {status}: {}", snippet(&text));
            let code = status.as_u16();
            return Err(if code == 408 || code == 429 || status.is_server_error() {
                Failure::Transient(message, retry_after)
            } else {
                Failure::Final(message)
            });
        }
        (call.parse)(&text)
    }

    fn backoff(&self, retry: u32) -> Duration {
        let base = self.config.initial_backoff.as_secs_f64() * 2f64.powi(retry as i32);
        let capped = base.min(self.config.max_backoff.as_secs_f64());
        let jitter = rand::rng().random_range(0.8..1.2);
        Duration::from_secs_f64(capped * jitter)
    }

    /// How long to wait before retry number `retry`: the server's `Retry-After` capped at
    /// the request timeout, else our backoff.
    fn retry_wait(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(after) => after.min(self.config.timeout),
            None => self.backoff(retry),
        }
    }

    /// Makes `call`, retrying transient failures. A request slot is held only while an
    /// attempt is in flight, not while waiting to retry, so one rate-limited request does not
    /// hold up the others.
    async fn with_retries<T>(&self, call: Call<'_, T>) -> Result<T> {
        let mut retry = 0;
        loop {
            let permit = self
                .in_flight
                .acquire()
                .await
                .expect("semaphore is never closed");
            let outcome = self.attempt(&call).await;
            drop(permit);
            match outcome {
                Ok(response) => {
                    self.usage
                        .lock()
                        .expect("usage lock")
                        .add((call.usage)(&response));
                    return Ok(response);
                }
                Err(Failure::Final(message)) => {
                    return Err(Error::Llm {
                        backend: call.shown.to_string(),
                        message,
                    })
                }
                Err(Failure::Transient(message, after)) => {
                    if retry >= self.config.max_retries {
                        return Err(Error::Unreachable {
                            backend: call.shown.to_string(),
                            message: format!(
                                "{message} (gave up after {} retries)",
                                self.config.max_retries
                            ),
                        });
                    }
                    let wait = self.retry_wait(retry, after);
                    tracing::warn!(
                        "{}: {message}; retrying in {:.1} s",
                        call.shown,
                        wait.as_secs_f64()
                    );
                    *self.retries.lock().expect("retries lock") += 1;
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
            }
        }
    }

    /// An error of reading prompts, named after the `/completions` endpoint.
    fn error(&self, message: String) -> Error {
        Error::Llm {
            backend: self.shown_completions.clone(),
            message,
        }
    }

    /// The [`PromptReader`], or the error of a client that has none.
    fn reader(&self) -> Result<&PromptReader> {
        self.config.prompt_reader.as_deref().ok_or_else(|| {
            self.error(
                "reading a prompt's log-probabilities needs the served model's tokenizer \
                 (--server-tokenizer) and a vLLM server"
                    .into(),
            )
        })
    }

    /// What vLLM reports at every position of `ids` (`prompt_logprobs`): the
    /// log-probabilities of the token there and of the reader's most likely ones, by token
    /// id (`None` at the first position, which nothing predicts).
    async fn prompt_logprobs(
        &self,
        reader: &PromptReader,
        ids: Vec<u32>,
    ) -> Result<PromptLogprobs> {
        let count = ids.len();
        let body = json!({
            "model": self.config.model,
            "prompt": &ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": reader.top,
        });
        let read = self
            .with_retries(Call {
                endpoint: &self.completions_endpoint,
                shown: &self.shown_completions,
                body,
                parse: parse_prompt_logprobs,
                usage: |r| r.usage,
                // Each position lists about `top + 1` entries of some 80 bytes.
                max_bytes: MAX_REPLY_BYTES.max(count * (reader.top as usize + 1) * 160),
                bounded_by: "prompt_logprobs",
            })
            .await?;
        if read.positions.len() != count {
            return Err(self.error(format!(
                "prompt_logprobs has {} positions for a prompt of {count} tokens",
                read.positions.len()
            )));
        }
        reader
            .check_served_tokens(&ids, &read)
            .map_err(|message| Error::Unusable {
                backend: self.shown_completions.clone(),
                message,
            })?;
        Ok(read)
    }

    /// [`Llm::read`] through `prompt_logprobs`: each answer is one request, its pieces
    /// tokenized on their own after the rendered prompt, and one more token after the last
    /// piece so that every reading point has a position after it (where vLLM reports the
    /// distribution of the next token).
    async fn read_prompts(&self, request: ReadRequest) -> Result<ReadResponse> {
        let reader = self.reader()?;
        if request.messages.is_empty() {
            return Err(Error::Invalid(
                "a chat request needs at least one message".into(),
            ));
        }
        let text = reader
            .template
            .render(&request.messages, true)
            .map_err(|message| self.error(format!("the chat template: {message}")))?;
        let prompt = reader.encode(&text)?;
        let encode = |text: &str| reader.encode(text);
        let candidates = request.candidate_ids(encode)?;
        let answers = request
            .answer_ids(encode)?
            .into_iter()
            .map(|(answer, ends)| {
                let (prompt, candidates) = (&prompt, &candidates);
                async move {
                    if ends.is_empty() {
                        return Ok((Vec::new(), Usage::default()));
                    }
                    let mut ids = prompt.clone();
                    ids.extend(&answer);
                    // Any token will do: only the distribution at its position is read.
                    ids.push(answer[0]);
                    let read = self.prompt_logprobs(reader, ids).await?;
                    let rows = ends
                        .iter()
                        .map(|&end| {
                            let position = read.positions[prompt.len() + end + 1].as_ref();
                            // vLLM also reports the token actually there, whatever its rank:
                            // only the most likely tokens are read, as for every other place.
                            let read_as = |id: u32| {
                                let token = position?.get(&id)?;
                                let ranked_out =
                                    token.rank.is_some_and(|rank| rank > u64::from(reader.top));
                                (!ranked_out).then_some(token.logprob)
                            };
                            candidates
                                .iter()
                                .map(|id| id.and_then(read_as).unwrap_or(f32::NEG_INFINITY))
                                .collect()
                        })
                        .collect::<Vec<Vec<f32>>>();
                    Ok((rows, read.usage))
                }
            });
        let (logprobs, usage) = all_of(answers).await?;
        Ok(ReadResponse { logprobs, usage })
    }

    /// [`Llm::continuation_logprobs`] through `prompt_logprobs`: each text is one request,
    /// the plain prompt's ids then the text's; each text token's log-probability is the one
    /// vLLM reports for it at its position.
    async fn read_continuations(
        &self,
        request: ContinuationRequest,
    ) -> Result<ContinuationResponse> {
        let reader = self.reader()?;
        let prompt = reader.encode(&request.prompt)?;
        if prompt.is_empty() {
            return Err(Error::Invalid(
                "a continuation request needs a prompt that makes tokens".into(),
            ));
        }
        let texts = request.texts.iter().map(|text| {
            let prompt = &prompt;
            async move {
                let text_ids = reader.encode(text)?;
                if text_ids.is_empty() {
                    return Ok((Vec::new(), Usage::default()));
                }
                let mut ids = prompt.clone();
                ids.extend(&text_ids);
                let read = self.prompt_logprobs(reader, ids).await?;
                let logprobs = text_ids
                    .iter()
                    .enumerate()
                    .map(|(j, id)| {
                        let at = prompt.len() + j;
                        read.positions[at]
                            .as_ref()
                            .and_then(|position| position.get(id))
                            .map(|token| token.logprob)
                            .ok_or_else(|| {
                                self.error(format!(
                                    "prompt_logprobs has no log-probability for the prompt's \
                                     own token {id} at position {at}"
                                ))
                            })
                    })
                    .collect::<Result<Vec<f32>>>()?;
                Ok((logprobs, read.usage))
            }
        });
        let (logprobs, usage) = all_of(texts).await?;
        Ok(ContinuationResponse { logprobs, usage })
    }
}

/// The results of `requests`, run concurrently (the client's semaphore bounds the HTTP
/// requests in flight), in order, and their total usage.
async fn all_of<T>(
    requests: impl IntoIterator<Item = impl std::future::Future<Output = Result<(T, Usage)>>>,
) -> Result<(Vec<T>, Usage)> {
    let mut usage = Usage::default();
    let results = futures::future::try_join_all(requests)
        .await?
        .into_iter()
        .map(|(result, spent)| {
            usage.add(spent);
            result
        })
        .collect();
    Ok((results, usage))
}

impl Llm for OpenAiClient {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
        Box::pin(self.with_retries(Call {
            endpoint: &self.endpoint,
            shown: &self.shown,
            body: self.body(&request),
            parse: |text| parse_response(text).map_err(|message| Failure::Transient(message, None)),
            usage: |r| r.usage,
            max_bytes: MAX_REPLY_BYTES,
            bounded_by: "max_tokens",
        }))
    }

    fn read(&self, request: ReadRequest) -> BoxFuture<'_, Result<ReadResponse>> {
        Box::pin(self.read_prompts(request))
    }

    fn continuation_logprobs(
        &self,
        request: ContinuationRequest,
    ) -> BoxFuture<'_, Result<ContinuationResponse>> {
        Box::pin(self.read_continuations(request))
    }

    fn reads_prompts(&self) -> bool {
        self.config.prompt_reader.is_some()
    }

    fn name(&self) -> String {
        format!("{} at {}", self.config.model, self.shown)
    }

    fn model_id(&self) -> String {
        self.config.model.clone()
    }
}

/// A reqwest error without the URL (which could carry credentials in its query).
fn without_url(error: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = error;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// The `Retry-After` header in seconds (the HTTP-date form, and a number of seconds no
/// duration holds, are treated as absent).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let seconds: f64 = value.trim().parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The start of a body, for error messages.
fn snippet(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// The most bytes of a reply read: a chat answer of a few hundred tokens, with their
/// log-probabilities, is well under a megabyte; a server that ignores `max_tokens` is cut off
/// here rather than filling memory.
const MAX_REPLY_BYTES: usize = 16 << 20;

/// A reply's body as text, up to `max_bytes` (else an error naming the request setting
/// `bounded_by` that should have kept it shorter).
async fn read_body(
    mut response: reqwest::Response,
    max_bytes: usize,
    bounded_by: &str,
) -> std::result::Result<String, Failure> {
    let failed = |e: reqwest::Error| {
        Failure::Transient(
            format!("reading the body failed: {}", without_url(&e)),
            None,
        )
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > max_bytes {
            return Err(Failure::Final(format!(
                "the reply is longer than {} MiB: does the server honour {bounded_by}?",
                max_bytes >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Reads a chat-completions body: the first choice's text, its log-probabilities when
/// present, whether it was cut at `max_tokens` (`finish_reason: "length"`), and the token
/// usage.
fn parse_response(text: &str) -> std::result::Result<ChatResponse, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("the response is not JSON ({e}): {}", snippet(text)))?;
    let choice = value
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| format!("the response has no choices[0]: {}", snippet(text)))?;
    let content = match choice.get("message").and_then(|m| m.get("content")) {
        Some(Value::String(content)) => content.as_str(),
        // No text, on purpose: a refusal, or a reasoning model that spent `max_tokens`
        // thinking. Retrying would only repeat it; the caller finds nothing to read.
        Some(Value::Null) => "",
        Some(other) => {
            return Err(format!(
                "choices[0].message.content is not a string but {other}: {}",
                snippet(text)
            ))
        }
        None => {
            return Err(format!(
                "choices[0].message.content is missing: {}",
                snippet(text)
            ))
        }
    };
    let logprobs = choice
        .get("logprobs")
        .and_then(|l| l.get("content"))
        .and_then(Value::as_array)
        .map(|tokens| tokens.iter().map(parse_token_logprobs).collect())
        .transpose()?;
    let truncated = choice.get("finish_reason").and_then(Value::as_str) == Some("length");
    Ok(ChatResponse {
        text: content.to_string(),
        truncated,
        logprobs,
        usage: usage_of(&value),
    })
}

/// What vLLM reports of one token at one prompt position.
#[derive(Debug, Clone, PartialEq)]
struct ServedToken {
    logprob: f32,
    /// 1 = most likely, when given.
    rank: Option<u64>,
    /// The server's text of the token (`decoded_token`), when given.
    text: Option<String>,
}

/// What vLLM reports at one prompt position, by token id.
type PositionLogprobs = HashMap<u32, ServedToken>;

/// What vLLM's `prompt_logprobs` gives for one prompt.
struct PromptLogprobs {
    /// Per position (`None` where the server gives nothing: the first position).
    positions: Vec<Option<PositionLogprobs>>,
    usage: Usage,
}

/// Reads a `/completions` body with vLLM's `choices[0].prompt_logprobs`: per position `null`
/// or `{"<token id>": {"logprob": x, "rank": r, "decoded_token": t}, ...}` (vLLM writes the
/// log-probability of an impossible token as -9999). A reply that is JSON but has none is a
/// final error: the server is not vLLM, and asking again will not change that.
fn parse_prompt_logprobs(text: &str) -> std::result::Result<PromptLogprobs, Failure> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Failure::Transient(
            format!("the response is not JSON ({e}): {}", snippet(text)),
            None,
        )
    })?;
    let entry = |id: &String, entry: &Value| -> std::result::Result<(u32, ServedToken), String> {
        let id = id
            .parse::<u32>()
            .map_err(|_| format!("prompt_logprobs has a key {id:?}, not a token id"))?;
        let logprob = entry
            .get("logprob")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("prompt_logprobs entry {id} has no numeric logprob: {entry}"))?;
        let served = ServedToken {
            logprob: logprob as f32,
            rank: entry.get("rank").and_then(Value::as_u64),
            text: entry
                .get("decoded_token")
                .and_then(Value::as_str)
                .map(String::from),
        };
        Ok((id, served))
    };
    let positions = value
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("prompt_logprobs"))
        .and_then(Value::as_array)
        .ok_or_else(|| {
            format!(
                "the response has no choices[0].prompt_logprobs (only vLLM's server reads \
                 prompts): {}",
                snippet(text)
            )
        })
        .and_then(|positions| {
            positions
                .iter()
                .map(|position| match position {
                    Value::Null => Ok(None),
                    Value::Object(tokens) => tokens
                        .iter()
                        .map(|(id, value)| entry(id, value))
                        .collect::<std::result::Result<HashMap<_, _>, String>>()
                        .map(Some),
                    other => Err(format!(
                        "a prompt_logprobs position is {other}, not an object"
                    )),
                })
                .collect::<std::result::Result<Vec<_>, String>>()
        })
        .map_err(Failure::Final)?;
    Ok(PromptLogprobs {
        positions,
        usage: usage_of(&value),
    })
}

/// A reply's `usage` (zeros where absent).
fn usage_of(value: &Value) -> Usage {
    let count = |field: &str| {
        value
            .get("usage")
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    }
}

fn parse_token_logprobs(value: &Value) -> std::result::Result<TokenLogprobs, String> {
    let pair = |v: &Value| -> Option<(String, f32)> {
        Some((
            v.get("token")?.as_str()?.to_string(),
            v.get("logprob")?.as_f64()? as f32,
        ))
    };
    let (token, logprob) =
        pair(value).ok_or_else(|| format!("a logprobs entry lacks token/logprob: {value}"))?;
    let top = value
        .get("top_logprobs")
        .and_then(Value::as_array)
        .map(|alternatives| alternatives.iter().filter_map(pair).collect())
        .unwrap_or_default();
    Ok(TokenLogprobs {
        token,
        logprob,
        top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Message;

    #[test]
    fn endpoint_accepts_api_root_or_full_url() {
        assert_eq!(
            OpenAiConfig::new("http://h:1/v1/", "m").endpoint(),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            OpenAiConfig::new("http://h:1/v1/chat/completions", "m").endpoint(),
            "http://h:1/v1/chat/completions"
        );
        // A query string (Azure's api-version) stays at the end of both endpoints.
        let azure = OpenAiConfig::new("https://h/v1/chat/completions/?api-version=2024", "m");
        assert_eq!(
            azure.endpoint(),
            "https://h/v1/chat/completions?api-version=2024"
        );
        assert_eq!(
            azure.completions_endpoint(),
            "https://h/v1/completions?api-version=2024"
        );
        let fragment = OpenAiConfig::new("https://h/v1/chat/completions#top", "m");
        assert_eq!(fragment.completions_endpoint(), "https://h/v1/completions");
    }

    #[test]
    fn credentials_in_the_url_are_not_shown() {
        let config = OpenAiConfig::new("https://me:s3cret@h:1/v1/chat/completions?key=abc123", "m");
        assert_eq!(shown(&config.endpoint()), "https://h:1/v1/chat/completions");
        let client = OpenAiClient::new(config).unwrap();
        for shown in [
            client.name(),
            format!("{client:?}"),
            client.error("x".into()).to_string(),
        ] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("abc123"),
                "{shown}"
            );
        }
        assert_eq!(client.model_id(), "m");
    }

    #[test]
    fn parses_content_logprobs_and_usage() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"[1,0]"},
            "logprobs":{"content":[{"token":"[","logprob":-0.01,"top_logprobs":[{"token":"[","logprob":-0.01}]},
            {"token":"1","logprob":-0.2,"top_logprobs":[{"token":"1","logprob":-0.2},{"token":"0","logprob":-1.7}]}]}}],
            "usage":{"prompt_tokens":12,"completion_tokens":5}}"#;
        let response = parse_response(body).unwrap();
        assert_eq!(response.text, "[1,0]");
        assert!(!response.truncated);
        let cut = r#"{"choices":[{"message":{"content":"The tok"},"finish_reason":"length"}]}"#;
        assert!(parse_response(cut).unwrap().truncated);
        let done = r#"{"choices":[{"message":{"content":"Done."},"finish_reason":"stop"}]}"#;
        assert!(!parse_response(done).unwrap().truncated);
        let thought = r#"{"choices":[{"message":{"content":null,"reasoning_content":"Hm"},
            "finish_reason":"length"}],"usage":{"prompt_tokens":7,"completion_tokens":9}}"#;
        let thought = parse_response(thought).unwrap();
        assert_eq!((thought.text.as_str(), thought.truncated), ("", true));
        assert_eq!(thought.usage.completion_tokens, 9);
        let refused = r#"{"choices":[{"message":{"content":null,"refusal":"No."}}]}"#;
        assert_eq!(parse_response(refused).unwrap().text, "");
        assert_eq!(
            response.usage,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 5
            }
        );
        let logprobs = response.logprobs.unwrap();
        assert_eq!(
            logprobs[1].top,
            vec![("1".to_string(), -0.2), ("0".to_string(), -1.7)]
        );
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(parse_response("{\"choi").unwrap_err().contains("not JSON"));
        assert!(parse_response("{\"choices\":[]}")
            .unwrap_err()
            .contains("choices[0]"));
        assert!(parse_response("{\"choices\":[{\"message\":{}}]}")
            .unwrap_err()
            .contains("content is missing"));
        assert!(
            parse_response("{\"choices\":[{\"message\":{\"content\":5}}]}")
                .unwrap_err()
                .contains("content is not a string but 5")
        );
    }

    /// vLLM's prompt log-probabilities are read by token id with their ranks; a reply that is
    /// JSON without them (not a vLLM server) or with a malformed entry is final (retrying
    /// cannot help), one that is not JSON may be retried.
    #[test]
    fn reads_prompt_logprobs_and_refuses_servers_without_them() {
        let reply = r#"{"choices": [{"index": 0, "text": " ", "prompt_logprobs": [null,
            {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
             "9": {"logprob": -9999.0, "rank": 4000, "decoded_token": "b"}}]}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1}}"#;
        let read = parse_prompt_logprobs(reply).ok().unwrap();
        assert!(read.positions[0].is_none());
        let second = read.positions[1].as_ref().unwrap();
        let served = |logprob, rank, text: &str| ServedToken {
            logprob,
            rank: Some(rank),
            text: Some(text.into()),
        };
        assert_eq!(second[&5], served(-0.5, 1, "a"));
        assert_eq!(second[&9], served(-9999.0, 4000, "b"));
        assert_eq!(
            (read.usage.prompt_tokens, read.usage.completion_tokens),
            (2, 1)
        );
        let failure = |text: &str| match parse_prompt_logprobs(text) {
            Err(Failure::Final(message)) => format!("final: {message}"),
            Err(Failure::Transient(message, _)) => format!("transient: {message}"),
            Ok(_) => "read".into(),
        };
        let llama_cpp = r#"{"choices": [{"index": 0, "text": " "}]}"#;
        assert!(
            failure(llama_cpp).starts_with("final: the response has no choices[0].prompt_logprobs")
        );
        let text_logprob =
            r#"{"choices": [{"prompt_logprobs": [null, {"5": {"logprob": "-inf"}}]}]}"#;
        assert!(
            failure(text_logprob).contains("final: prompt_logprobs entry 5 has no numeric logprob")
        );
        let word_key = r#"{"choices": [{"prompt_logprobs": [null, {"a": {"logprob": -1.0}}]}]}"#;
        assert!(failure(word_key).contains("key \"a\", not a token id"));
        assert!(failure("<html>").starts_with("transient: the response is not JSON"));
    }

    /// The prompt's own tokens as the server writes them back: decoded alone (recent vLLM,
    /// spaces before punctuation cleaned up or not) or as vocabulary entries (older vLLM)
    /// pass, and so does a minority of others (special tokens a server may write otherwise);
    /// tokens written as nothing or U+FFFD are not compared. A majority of other texts means
    /// another tokenizer, and is refused naming the tokens, once 4 tokens could be compared;
    /// a reader that passed once checks no more.
    #[test]
    fn a_server_that_tokenizes_otherwise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pythia = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/gpt-neox-20b-tokenizer.json");
        std::fs::copy(pythia, dir.path().join("tokenizer.json")).unwrap();
        let config = json!({"chat_template": "{{ messages[0].content }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let reader = || PromptReader::for_model(dir.path().to_str().unwrap(), 20).unwrap();
        let ids = reader().encode("The cat sat on the mat .").unwrap();
        assert_eq!(ids.len(), 7);
        let served = |texts: [Option<&str>; 6]| PromptLogprobs {
            positions: std::iter::once(None)
                .chain(ids[1..].iter().zip(texts).map(|(&id, text)| {
                    let token = ServedToken {
                        logprob: -1.0,
                        rank: Some(1),
                        text: text.map(String::from),
                    };
                    Some(HashMap::from([(id, token)]))
                }))
                .collect(),
            usage: Usage::default(),
        };
        let check = |texts| reader().check_served_tokens(&ids, &served(texts));
        let [cat, sat, on, the, mat, stop] =
            [" cat", " sat", " on", " the", " mat", " ."].map(Some);
        check([cat, sat, on, the, mat, stop]).unwrap();
        check([cat, sat, on, the, mat, Some(".")]).unwrap();
        let pieces = [
            "\u{120}cat",
            "\u{120}sat",
            "\u{120}on",
            "\u{120}the",
            "\u{120}mat",
            "\u{120}.",
        ];
        check(pieces.map(Some)).unwrap();
        check([cat, Some("<|x|>"), on, Some("<|y|>"), mat, stop]).unwrap();
        check([None; 6]).unwrap();
        // Not compared: nothing, U+FFFD; then too few are left to refuse.
        let unread = [
            Some(""),
            Some("\u{fffd}"),
            Some("x"),
            Some("y"),
            Some("z"),
            None,
        ];
        check(unread).unwrap();
        let other = [cat, Some(" dog"), Some("x"), Some("y"), mat, Some("z")];
        let err = check(other).unwrap_err();
        assert!(
            err.contains("4 of 6 prompt tokens read otherwise on the server")
                && err.contains(&format!(
                    "token {} at position 2 is \" sat\" here but \" dog\"",
                    ids[2]
                )),
            "{err}"
        );
        let passed = reader();
        passed
            .check_served_tokens(&ids, &served([cat, sat, on, the, mat, stop]))
            .unwrap();
        passed.check_served_tokens(&ids, &served(other)).unwrap();
    }

    /// A SentencePiece-style tokenizer (a leading space marks every text) is refused for
    /// reading prompts: each answer piece would gain a space.
    #[test]
    fn prompt_readers_refuse_tokenizers_that_mark_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "post_processor": null, "decoder": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                              "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab":
                {"[UNK]": 0, "\u{2581}Hello": 1, "\u{2581}world": 2, "\u{2581}": 3}},
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let config = json!({"chat_template": "{{ messages[0].content }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let err = PromptReader::for_model(dir.path().to_str().unwrap(), 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("marks the start of every text"), "{err}");
    }

    /// A server that ignores max_tokens does not fill memory: the reply is cut off, and the
    /// request fails without retries.
    #[tokio::test]
    async fn replies_past_the_size_limit_are_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = vec![0u8; 65536];
                let _ = socket.read(&mut request).await;
                let length = MAX_REPLY_BYTES + 1024;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n");
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&vec![b' '; length]).await;
            }
        });
        let client = OpenAiClient::new(OpenAiConfig::new(url, "m")).unwrap();
        let request = ChatRequest {
            messages: vec![Message::user("hello")],
            max_tokens: 4,
            temperature: 0.0,
            top_logprobs: None,
            format: None,
        };
        let message = client.chat(request).await.unwrap_err().to_string();
        assert!(
            message.contains("the reply is longer than 16 MiB: does the server honour max_tokens?"),
            "{message}"
        );
        assert_eq!(client.retries(), 0);
    }

    #[test]
    fn retry_after_is_capped_at_the_request_timeout() {
        let mut config = OpenAiConfig::new("http://127.0.0.1:9/v1", "m");
        config.timeout = Duration::from_secs(5);
        let client = OpenAiClient::new(config).unwrap();
        let wait = |after: u64| client.retry_wait(0, Some(Duration::from_secs(after)));
        assert_eq!(wait(600), Duration::from_secs(5));
        assert_eq!(wait(2), Duration::from_secs(2));
        let mut zero = OpenAiConfig::new("http://127.0.0.1:9/v1", "m");
        zero.timeout = Duration::ZERO;
        let message = OpenAiClient::new(zero).unwrap_err().to_string();
        assert!(message.contains("--timeout"), "{message}");
        let header = |value: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers)
        };
        assert_eq!(header(" 2.5 "), Some(Duration::from_millis(2500)));
        for unusable in ["1e20", "-1", "NaN", "inf", "Wed, 21 Oct 2026 07:28:00 GMT"] {
            assert_eq!(header(unusable), None, "{unusable}");
        }
        // Without Retry-After: the first backoff, 1 s with +-20 % jitter.
        let backoff = client.retry_wait(0, None).as_secs_f64();
        assert!((0.8..=1.2).contains(&backoff), "{backoff}");
    }

    #[test]
    fn only_http_urls_of_any_case_are_servers() {
        for url in [
            "http://h:8000/v1",
            "https://h/v1",
            "HTTP://h/v1",
            "Https://h",
        ] {
            assert!(is_http_url(url), "{url}");
        }
        for url in ["ftp://h", "h:8000/v1", "local", "httpx://h", ""] {
            assert!(!is_http_url(url), "{url}");
        }
        let message = OpenAiClient::new(OpenAiConfig::new("ftp://x", "m"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("'ftp://x' must start with http:// or https://"),
            "{message}"
        );
    }

    #[test]
    fn missing_key_variable_is_an_error_and_keys_are_not_printed() {
        let mut config = OpenAiConfig::new("http://127.0.0.1:9/v1", "m");
        config.api_key_env = Some("EI_TEST_KEY_THAT_IS_NOT_SET".into());
        let error = OpenAiClient::new(config.clone()).unwrap_err().to_string();
        assert!(error.contains("EI_TEST_KEY_THAT_IS_NOT_SET"), "{error}");
        config.api_key_env = Some("PATH".into());
        let client = OpenAiClient::new(config).unwrap();
        let printed = format!("{client:?}");
        assert!(printed.contains("<set>") && !printed.contains(&std::env::var("PATH").unwrap()));
    }
}
