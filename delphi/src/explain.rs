//! Asking a language model what a latent detects.

use serde::{Deserialize, Serialize};

use crate::llm::{ChatRequest, Llm, Usage};
use crate::prompts::{explainer_messages, parse_explanation, ShownExample};
use crate::{Error, Result};

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
    /// The parsed explanation; `None` when the answer had no `[EXPLANATION]:` line, or when
    /// it was cut off at `max_tokens` before that line ended (a cut answer's last line may be
    /// half a sentence; a whole explanation line followed by cut chatter is kept).
    pub explanation: Option<String>,
    /// The raw answer.
    pub answer: String,
    /// Whether the answer stopped at `max_tokens` (the server's `finish_reason: "length"`).
    pub truncated: bool,
    /// Tokens spent.
    pub usage: Usage,
}

/// Explains a latent from its examples (at least one: an empty prompt is refused, since
/// any answer to it would be made up).
pub async fn explain(
    llm: &dyn Llm,
    examples: &[ShownExample],
    config: &ExplainConfig,
) -> Result<Explanation> {
    if examples.is_empty() {
        return Err(Error::Invalid(
            "no examples to explain: the explainer would get an empty prompt".into(),
        ));
    }
    let request = ChatRequest {
        messages: explainer_messages(examples, config.show_activations),
        max_tokens: config.max_tokens,
        temperature: config.temperature,
        top_logprobs: None,
        format: None,
    };
    let response = llm.chat(request).await?;
    Ok(Explanation {
        explanation: if response.truncated {
            // Only whole lines: the last one stopped where the tokens ran out.
            parse_explanation(&response.text[..response.text.rfind('\n').unwrap_or(0)])
        } else {
            parse_explanation(&response.text)
        },
        truncated: response.truncated,
        answer: response.text,
        usage: response.usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{BoxFuture, ChatResponse};

    /// Answers with a fixed text, marked as cut off at max_tokens or not.
    struct Fixed {
        text: &'static str,
        truncated: bool,
    }

    impl Llm for Fixed {
        fn chat(&self, _: ChatRequest) -> BoxFuture<'_, Result<ChatResponse>> {
            Box::pin(async move {
                Ok(ChatResponse {
                    text: self.text.into(),
                    logprobs: None,
                    usage: Usage::default(),
                    truncated: self.truncated,
                })
            })
        }
        fn name(&self) -> String {
            "fixed".into()
        }
    }

    fn explain_with(llm: &Fixed, examples: &[ShownExample]) -> Result<Explanation> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(explain(llm, examples, &ExplainConfig::default()))
    }

    #[test]
    fn no_examples_no_prompt_and_a_cut_answer_is_no_explanation() {
        let whole = Fixed {
            text: "[EXPLANATION]: The token \"Malaysia\" and other country names.",
            truncated: false,
        };
        let error = explain_with(&whole, &[]).unwrap_err().to_string();
        assert!(error.contains("no examples"), "{error}");
        let example = ShownExample {
            tokens: vec!["a".into(), " cat".into()],
            activations: vec![0.0, 1.0],
            normalized: vec![0, 10],
        };
        let answer = explain_with(&whole, std::slice::from_ref(&example)).unwrap();
        assert_eq!(
            answer.explanation.as_deref(),
            Some("The token \"Malaysia\" and other country names.")
        );
        let cut = Fixed {
            text: "[EXPLANATION]: The token \"Malaysia\"",
            truncated: true,
        };
        let answer = explain_with(&cut, std::slice::from_ref(&example)).unwrap();
        assert!(answer.truncated && answer.explanation.is_none());
        // A whole explanation line, then chatter cut off, is an explanation.
        let chatter = Fixed {
            text: "[EXPLANATION]: Country names.\nI hope this helps, and in fact",
            truncated: true,
        };
        let answer = explain_with(&chatter, &[example]).unwrap();
        assert_eq!(answer.explanation.as_deref(), Some("Country names."));
    }
}
