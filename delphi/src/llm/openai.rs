//! A client for any OpenAI-compatible `/chat/completions` server (vLLM, SGLang, llama.cpp
//! server, Ollama, OpenRouter, OpenAI): bounded concurrency, timeouts, retries with
//! exponential backoff and jitter that honour `Retry-After`, per-request sampling settings,
//! token accounting. The API key comes from an environment variable and is never logged.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{BoxFuture, ChatRequest, ChatResponse, Llm, TokenLogprobs, Usage};
use crate::{Error, Result};

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
        }
    }

    /// The URL requests go to, as shown in logs, errors and `run_config.json`: without
    /// credentials (`user:password@`) or a query string (which may carry a key).
    fn shown_endpoint(&self) -> String {
        let endpoint = self.endpoint();
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

    /// The URL requests go to.
    fn endpoint(&self) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/chat/completions") {
            url.to_string()
        } else {
            format!("{url}/chat/completions")
        }
    }
}

/// An OpenAI-compatible chat-completions client.
pub struct OpenAiClient {
    config: OpenAiConfig,
    endpoint: String,
    /// `endpoint` without credentials, for messages.
    shown: String,
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
        Ok(Self {
            endpoint: config.endpoint(),
            shown: config.shown_endpoint(),
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

    async fn attempt(&self, body: &Value) -> std::result::Result<ChatResponse, Failure> {
        let mut builder = self.http.post(&self.endpoint).json(body);
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
        let text = read_body(response).await?;
        if !status.is_success() {
            let message = format!("HTTP {status}: {}", snippet(&text));
            let code = status.as_u16();
            return Err(if code == 408 || code == 429 || status.is_server_error() {
                Failure::Transient(message, retry_after)
            } else {
                Failure::Final(message)
            });
        }
        parse_response(&text).map_err(|message| Failure::Transient(message, None))
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

    /// Sends a request, retrying transient failures. A request slot is held only while an
    /// attempt is in flight, not while waiting to retry, so one rate-limited request does
    /// not hold up the others.
    async fn chat_with_retries(&self, request: ChatRequest) -> Result<ChatResponse> {
        let body = self.body(&request);
        let mut retry = 0;
        loop {
            let permit = self
                .in_flight
                .acquire()
                .await
                .expect("semaphore is never closed");
            let outcome = self.attempt(&body).await;
            drop(permit);
            match outcome {
                Ok(response) => {
                    self.usage.lock().expect("usage lock").add(response.usage);
                    return Ok(response);
                }
                Err(Failure::Final(message)) => return Err(self.error(message)),
                Err(Failure::Transient(message, after)) => {
                    if retry >= self.config.max_retries {
                        return Err(Error::Unreachable {
                            backend: self.shown.clone(),
                            message: format!(
                                "{message} (gave up after {} retries)",
                                self.config.max_retries
                            ),
                        });
                    }
                    let wait = self.retry_wait(retry, after);
                    tracing::warn!(
                        "{}: {message}; retrying in {:.1} s",
                        self.shown,
                        wait.as_secs_f64()
                    );
                    *self.retries.lock().expect("retries lock") += 1;
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
            }
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Llm {
            backend: self.shown.clone(),
            message,
        }
    }
}

impl Llm for OpenAiClient {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
        Box::pin(self.chat_with_retries(request))
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

/// A reply's body as text, up to [`MAX_REPLY_BYTES`].
async fn read_body(mut response: reqwest::Response) -> std::result::Result<String, Failure> {
    let failed = |e: reqwest::Error| {
        Failure::Transient(
            format!("reading the body failed: {}", without_url(&e)),
            None,
        )
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(Failure::Final(format!(
                "the reply is longer than {} MiB: does the server honour max_tokens?",
                MAX_REPLY_BYTES >> 20
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
    let count = |field: &str| {
        value
            .get("usage")
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let truncated = choice.get("finish_reason").and_then(Value::as_str) == Some("length");
    Ok(ChatResponse {
        text: content.to_string(),
        truncated,
        logprobs,
        usage: Usage {
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
        },
    })
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
    }

    #[test]
    fn credentials_in_the_url_are_not_shown() {
        let config = OpenAiConfig::new("https://me:s3cret@h:1/v1/chat/completions?key=abc123", "m");
        assert_eq!(config.shown_endpoint(), "https://h:1/v1/chat/completions");
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
