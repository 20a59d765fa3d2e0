//! Asking a language model what a latent detects.

use serde::{Deserialize, Serialize};

use crate::llm::{ChatRequest, Llm, Usage};
use crate::prompts::{explainer_messages, parse_explanation, ShownExample};
use crate::Result;

/// Settings of the explainer call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainConfig {
    /// Show the `Activations:` line under each example (delphi's default).
    pub show_activations: bool,
    /// Upper bound on the answer's tokens.
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy, reproducible).
    pub temperature: f32,
}

impl Default for ExplainConfig {
    fn default() -> Self {
        Self {
            show_activations: true,
            max_tokens: 300,
            temperature: 0.0,
        }
    }
}

/// What the explainer answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The parsed explanation; `None` when the answer had no `[EXPLANATION]:` line.
    pub explanation: Option<String>,
    /// The raw answer.
    pub answer: String,
    /// Tokens spent.
    pub usage: Usage,
}

/// Explains a latent from its examples.
pub async fn explain(
    llm: &dyn Llm,
    examples: &[ShownExample],
    config: &ExplainConfig,
) -> Result<Explanation> {
    let request = ChatRequest {
        messages: explainer_messages(examples, config.show_activations),
        max_tokens: config.max_tokens,
        temperature: config.temperature,
        top_logprobs: None,
    };
    let response = llm.chat(request).await?;
    Ok(Explanation {
        explanation: parse_explanation(&response.text),
        answer: response.text,
        usage: response.usage,
    })
}
