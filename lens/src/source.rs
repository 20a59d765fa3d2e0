//! Where a lens's activations come from: the model run over a dataset (streaming, no disk)
//! or an activation cache made by `hooks cache`. Shared by the `lens` command and Python.

use std::path::{Path, PathBuf};

use hooks::activations::{ActivationCache, ActivationSource, ModelActivations, ReadOrder};
use hooks::data::DataSpec;
use hooks::Model;

use crate::train::{required_hook_points, LossKind};
use crate::{Error, Result};

/// The data a lens is trained or evaluated on.
#[derive(Debug, Clone, PartialEq)]
pub struct LensData {
    /// Text or token files to run the model over (empty when `activations` is given).
    pub data: Vec<PathBuf>,
    /// An activation cache with embed and every `layers.{i}`.
    pub activations: Option<PathBuf>,
    /// Format of the data files (see `hooks::data::DataFormat::parse`).
    pub format: Option<String>,
    /// JSON field / parquet column with the text.
    pub text_field: String,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Sequences of `data` a shuffled read draws from at random
    /// ([`hooks::data::ChunkStream::shuffled`]; [`hooks::data::SHUFFLED_SEQUENCES`] by
    /// default); 1 reads them in data order.
    pub shuffle_sequences: usize,
}

/// Tokens per sequence when none is given: an activation cache's own (its rows were made
/// in sequences of that length), else 2048, as tuned-lens.
pub fn default_seq_len(activations: Option<&Path>) -> Result<usize> {
    Ok(match activations {
        Some(dir) => ActivationCache::open(dir)?.manifest().settings.data.seq_len,
        None => 2048,
    })
}

impl LensData {
    /// The dataset spec of `data`.
    pub fn spec(&self) -> DataSpec {
        DataSpec {
            paths: self.data.clone(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            seq_len: self.seq_len,
        }
    }

    /// The order a lens trains in with `loss`, shuffled with `seed`: a cache's rows shuffled
    /// for the KL, in order for next-token targets, which need whole sequences; a model
    /// stream's sequences shuffled for either.
    pub fn training_order(&self, loss: LossKind, seed: u64) -> ReadOrder {
        match (loss, &self.activations) {
            (LossKind::Ce, Some(_)) => ReadOrder::Sequential,
            _ => ReadOrder::Shuffled {
                seed,
                buffer_tokens: 1 << 16,
            },
        }
    }

    /// Checks what can be checked before a model is loaded: positive sizes, data files or an
    /// activation cache (not both), files that exist in a known format, a cache that opens.
    pub fn check(&self) -> Result<()> {
        if self.seq_len == 0 || self.batch_size == 0 {
            return Err(Error::Lens(
                "sequence length and batch size must be positive".into(),
            ));
        }
        match (&self.activations, self.data.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Lens(
                    "give data files or an activation cache, not both".into(),
                ))
            }
            (None, true) => {
                return Err(Error::Lens("give data files or an activation cache".into()))
            }
            (Some(dir), true) => {
                ActivationCache::open(dir)?;
            }
            (None, false) => self.spec().check()?,
        }
        Ok(())
    }

    /// Opens the source a lens over `model` needs (every lens input and the last layer).
    /// A cache is read in `order`; the model is run over at most `max_tokens` tokens,
    /// rounded up to whole sequences, which `order` shuffled takes in a random order with
    /// its seed (from a pool of [`LensData::shuffle_sequences`], as tuned-lens shuffles its
    /// training data).
    pub fn open<'m>(
        &self,
        model: &'m Model,
        order: ReadOrder,
        max_tokens: Option<u64>,
    ) -> Result<Box<dyn ActivationSource + Send + 'm>> {
        self.check()?;
        let points = required_hook_points(model.config().num_layers());
        if let Some(dir) = &self.activations {
            let cache = ActivationCache::open(dir)?;
            let names: Vec<String> = points.iter().map(|p| model.hook_name(*p)).collect();
            if let Some(missing) = names
                .iter()
                .find(|n| !cache.manifest().settings.hook_points.contains(n))
            {
                return Err(Error::Lens(format!(
                    "activation cache {} lacks hook point '{missing}'; a lens needs {}",
                    dir.display(),
                    names.join(", ")
                )));
            }
            let settings = &cache.manifest().settings;
            if settings.architecture != model.config().model_type() {
                return Err(Error::Lens(format!(
                    "activation cache {} was made with model {} ({}), not a {} model like {}",
                    dir.display(),
                    settings.model,
                    settings.architecture,
                    model.config().model_type(),
                    model.origin()
                )));
            }
            if !hooks::source::same_origin(&settings.model, model.origin()) {
                tracing::warn!(
                    "activation cache {} was made with model {}, not {}: a lens must be trained \
                     and evaluated on its own model's activations",
                    dir.display(),
                    settings.model,
                    model.origin()
                );
            }
            let width = model.config().hidden_size();
            if let Some((name, w)) = settings
                .hook_points
                .iter()
                .zip(&settings.widths)
                .find(|(n, &w)| names.contains(n) && w != width)
            {
                return Err(Error::Lens(format!(
                    "activation cache {} holds {name} with width {w} (made with model {}), but this model's width is {width}",
                    dir.display(),
                    settings.model
                )));
            }
            // Read in order, rows are whole sequences: next-token targets and per-sequence
            // statistics follow the cache's length (shuffled rows, for the KL, do not).
            if order == ReadOrder::Sequential && settings.data.seq_len != self.seq_len {
                return Err(Error::Lens(format!(
                    "activation cache {} holds sequences of {} tokens, not {}: pass that sequence length",
                    dir.display(),
                    settings.data.seq_len,
                    self.seq_len
                )));
            }
            // The tokens are next-token targets, rows of the model's logits.
            let reader = cache.reader(self.seq_len * self.batch_size, order)?;
            return Ok(Box::new(
                reader.check_tokens_below(model.config().vocab_size()),
            ));
        }
        let mut chunks = self.spec().chunks(model.tokenizer().ok())?;
        if let ReadOrder::Shuffled { seed, .. } = order {
            if self.shuffle_sequences > 1 {
                chunks = chunks.shuffled(seed, self.shuffle_sequences);
            }
        }
        let max_chunks = max_tokens.map(|t| t.div_ceil(self.seq_len as u64));
        Ok(Box::new(ModelActivations::new(
            model,
            chunks,
            points,
            self.batch_size,
            model.dtype(),
            max_chunks,
        )?))
    }

    /// The factor from nats per token to bits per byte of the text (`tokens / bytes / ln 2`)
    /// over the first `tokens` tokens of `data`; `None` for a cache or pre-tokenized data.
    pub fn nats_to_bits_per_byte(&self, model: &Model, tokens: u64) -> Result<Option<f64>> {
        if self.activations.is_some() {
            return Ok(None);
        }
        let mut chunks = self.spec().chunks(model.tokenizer().ok())?;
        chunks.skip_chunks(tokens / self.seq_len as u64)?;
        Ok((chunks.text_bytes() > 0).then(|| {
            chunks.tokens_read() as f64 / chunks.text_bytes() as f64 / std::f64::consts::LN_2
        }))
    }
}
