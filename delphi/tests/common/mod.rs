//! A loopback OpenAI-compatible chat-completions server for tests: answers like a model
//! would (explanations, 0/1 lists), deterministically from the prompt, and injects faults
//! on chosen requests. `/completions` requests (a `prompt` instead of `messages`) go to a
//! handler the test sets ([`TestServer::on_completions`]).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Reply with this HTTP status (and a JSON error body).
    Status(u16),
    /// Reply 429 with `Retry-After: seconds`.
    RateLimited(u32),
    /// Wait this long before answering normally (to trip the client's timeout).
    Delay(Duration),
    /// Announce a longer body than is sent, then close the connection.
    Truncated,
    /// Reply 200 with a body that is not JSON.
    NotJson,
    /// Answer the next explainer prompt without the [EXPLANATION]: line (waits at the head
    /// of the queue for one, so scorer requests arriving first do not use it up).
    NoMarker,
    /// Answer the next explainer prompt with its first half and `finish_reason: "length"`
    /// (an answer cut at `max_tokens`; waits for an explainer prompt like `NoMarker`).
    CutOff,
    /// Answer the next detection or fuzzing prompt in prose, without a 0/1 list (waits at
    /// the head of the queue for one).
    Prose,
}

/// What answers a `/completions` request body.
pub type CompletionsHandler = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// The state shared with the server task.
#[derive(Default)]
pub struct ServerState {
    /// Faults for the next requests, in arrival order (then normal answers).
    pub faults: VecDeque<Fault>,
    /// Every request body received.
    pub requests: Vec<Value>,
    /// The path of every request received (`/v1/chat/completions`...).
    pub paths: Vec<String>,
    /// Answers `/completions` requests.
    pub completions: Option<CompletionsHandler>,
    /// Added to every answer (the "model latency").
    pub latency: Duration,
}

/// A running test server.
pub struct TestServer {
    /// `http://127.0.0.1:PORT/v1`.
    pub url: String,
    /// Faults and the request log.
    pub state: Arc<Mutex<ServerState>>,
}

impl TestServer {
    /// Starts a server on a free loopback port on the current tokio runtime.
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, state).await;
                });
            }
        });
        TestServer { url, state }
    }

    /// Queues faults for the next requests.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// Answers `/completions` requests with `handler` (from the request body).
    pub fn on_completions(&self, handler: impl Fn(&Value) -> Value + Send + Sync + 'static) {
        self.state.lock().unwrap().completions = Some(Arc::new(handler));
    }

    /// The paths of the requests received so far.
    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many received requests were explainer prompts.
    pub fn explainer_requests(&self) -> usize {
        self.requests().iter().filter(|r| is_explainer(r)).count()
    }
}

fn is_explainer(request: &Value) -> bool {
    request["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .contains("[EXPLANATION]:")
}

fn is_classifier(request: &Value) -> bool {
    let system = request["messages"][0]["content"].as_str().unwrap_or("");
    !is_explainer(request) && !system.contains("[RESPONSE]:")
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    state: Arc<Mutex<ServerState>>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let request: Value =
        serde_json::from_slice(&buffer[header_end..header_end + length]).unwrap_or(Value::Null);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (fault, latency, completions) = {
        let mut state = state.lock().unwrap();
        state.requests.push(request.clone());
        state.paths.push(path.clone());
        let fault = match state.faults.front() {
            Some(Fault::NoMarker | Fault::CutOff) if !is_explainer(&request) => Fault::None,
            Some(Fault::Prose) if !is_classifier(&request) => Fault::None,
            _ => state.faults.pop_front().unwrap_or(Fault::None),
        };
        (fault, state.latency, state.completions.clone())
    };
    tokio::time::sleep(latency).await;
    let reply = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    let text = match fault {
        Fault::Status(code) => reply(
            &format!("{code} Error"),
            "",
            "{\"error\":{\"message\":\"injected\"}}",
        ),
        Fault::RateLimited(seconds) => reply(
            "429 Too Many Requests",
            &format!("retry-after: {seconds}\r\n"),
            "{\"error\":\"slow down\"}",
        ),
        Fault::Truncated => {
            let body = answer_body(&request, false);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len() + 100
            );
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(&body.as_bytes()[..body.len() / 2]).await?;
            return socket.shutdown().await;
        }
        Fault::NotJson => reply("200 OK", "", "<html>gateway hiccup</html>"),
        Fault::Delay(wait) => {
            tokio::time::sleep(wait).await;
            reply("200 OK", "", &answer_body(&request, false))
        }
        Fault::NoMarker => reply("200 OK", "", &answer_body(&request, true)),
        Fault::CutOff => {
            let mut body: Value = serde_json::from_str(&answer_body(&request, false)).unwrap();
            let content = body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string();
            let half: String = content.chars().take(content.chars().count() - 4).collect();
            body["choices"][0]["message"]["content"] = json!(half);
            body["choices"][0]["finish_reason"] = json!("length");
            reply("200 OK", "", &body.to_string())
        }
        Fault::Prose => {
            let mut body: Value = serde_json::from_str(&answer_body(&request, false)).unwrap();
            body["choices"][0]["message"]["content"] = json!("They all look about the same.");
            reply("200 OK", "", &body.to_string())
        }
        Fault::None => match (
            path.ends_with("/completions") && !path.ends_with("/chat/completions"),
            completions,
        ) {
            (true, Some(handler)) => reply("200 OK", "", &handler(&request).to_string()),
            (true, None) => reply("404 Not Found", "", "{\"error\":\"no /completions here\"}"),
            (false, _) => reply("200 OK", "", &answer_body(&request, false)),
        },
    };
    socket.write_all(text.as_bytes()).await?;
    socket.shutdown().await
}

/// A deterministic "model": the explainer names the first marked token of its last prompt;
/// scorers answer 1 for excerpts that contain that word (detection) or whose marks hold it
/// (fuzzing), judged from the explanation text; the intruder scorer names the first excerpt
/// whose marked text is not the most common one.
fn answer_body(request: &Value, no_marker: bool) -> String {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let last = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let system = messages
        .first()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let marked = |line: &str| -> String {
        line.split("<<")
            .skip(1)
            .filter_map(|s| s.split(">>").next())
            .collect()
    };
    let content = if system.contains("[RESPONSE]:") {
        let marks: Vec<String> = last
            .lines()
            .filter(|l| l.starts_with("Example "))
            .map(marked)
            .collect();
        let common = marks
            .iter()
            .max_by_key(|m| marks.iter().filter(|o| o == m).count())
            .cloned()
            .unwrap_or_default();
        let odd = marks.iter().position(|m| *m != common).unwrap_or(0);
        format!("This one differs. [RESPONSE]: {odd}")
    } else if is_explainer(request) {
        let word = last
            .split("<<")
            .nth(1)
            .and_then(|s| s.split(">>").next())
            .unwrap_or("?")
            .trim()
            .to_string();
        if no_marker {
            format!("The examples mention {word}.")
        } else {
            format!("Looking at the marks.\n[EXPLANATION]: the token \"{word}\"")
        }
    } else {
        let word = last.split('"').nth(1).unwrap_or("?").to_string();
        let answers: Vec<&str> = last
            .lines()
            .filter(|l| l.starts_with("Example "))
            .map(|l| {
                let hit = if l.contains("<<") {
                    marked(l).contains(&word)
                } else {
                    l.contains(&word)
                };
                if hit {
                    "1"
                } else {
                    "0"
                }
            })
            .collect();
        format!("[{}]", answers.join(", "))
    };
    json!({
        "id": "test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    })
    .to_string()
}
