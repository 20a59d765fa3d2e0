//! Continuing a prompt token by token through the hook runtime, the hooks applied at every
//! step: generation under steering, ablation or patching.

use candle_core::{DType, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{KvCache, Model};
use crate::sampling::{argmax, sample};
use crate::{Error, Hooks, Result};

/// How [`Model::generate`] picks tokens and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to add.
    pub max_new_tokens: usize,
    /// 0 takes the most likely token (greedy); above 0, tokens are drawn from
    /// `softmax(logits / temperature)`.
    pub temperature: f32,
    /// Seed of the draws (unused when greedy).
    pub seed: u64,
    /// Tokens that end the continuation (kept as its last token); `None` for the tokenizer's
    /// end-of-sequence token, if it has one.
    pub stop_tokens: Option<Vec<u32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            seed: 0,
            stop_tokens: None,
        }
    }
}

impl Model {
    /// The tokens that continue `prompt` (the prompt left out): one pass over the prompt, then
    /// one pass per new token on a KV cache, each through `hooks`. A replacement therefore
    /// edits every step, seeing the prompt's positions in the first pass and one new position
    /// in each later one (`[1, seq, width]`, then `[1, 1, width]`); a fixed-shape replacement
    /// fits the first pass only. Stops after `max_new_tokens`, after a stop token, or when the
    /// next token would lie past the model's context length (or its sliding window, which
    /// this runtime does not implement).
    pub fn generate(
        &self,
        prompt: &[u32],
        hooks: &mut Hooks,
        options: &GenerateOptions,
    ) -> Result<Vec<u32>> {
        if !(options.temperature.is_finite() && options.temperature >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be a finite number >= 0 (0 is greedy), got {}",
                options.temperature
            )));
        }
        if !hooks.wants_logits() {
            return Err(Error::InvalidArgument(
                "generation needs the logits, but these hooks stop the pass before them".into(),
            ));
        }
        let stop = match &options.stop_tokens {
            Some(tokens) => tokens.clone(),
            None => self.tokenizer.iter().filter_map(|t| t.eos_id()).collect(),
        };
        // Positions past a sliding window are refused (not implemented), so stop before one.
        let limit = self.context_len();
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut cache = KvCache::new();
        let mut input = prompt.to_vec();
        let mut generated = Vec::new();
        while generated.len() < options.max_new_tokens {
            if limit.is_some_and(|max| !generated.is_empty() && cache.len() >= max) {
                break;
            }
            let ids = Tensor::new(input.as_slice(), &self.device)?;
            let logits = self
                .forward_cached(&ids, hooks, &mut cache)?
                .logits
                .ok_or_else(|| Error::InvalidArgument("the pass computed no logits".into()))?;
            let scores: Vec<f32> = logits
                .i((0, input.len() - 1))?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let token = if options.temperature == 0.0 {
                argmax(&scores)
            } else {
                sample(&scores, options.temperature, &mut rng)
            };
            generated.push(token);
            if stop.contains(&token) {
                break;
            }
            input = vec![token];
        }
        Ok(generated)
    }
}
