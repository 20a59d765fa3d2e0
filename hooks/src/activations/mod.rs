//! Activations: batches of hook-point tensors, produced in-process by running a model over
//! a dataset ([`ModelActivations`], streaming, no disk) or read back from an on-disk cache
//! ([`ActivationCache`]). Trainers consume either through [`ActivationSource`].

mod cache;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

pub use cache::{
    ActivationCache, CacheOptions, CacheProgress, CacheReader, CacheSummary, Manifest, ReadOrder,
    ShardInfo,
};

use crate::data::ChunkStream;
use crate::{Error, HookPoint, Hooks, Model, Result};

/// Activations of `n` tokens: for each hook point a `[n, width]` tensor, row `i` belonging
/// to `tokens[i]`.
#[derive(Debug, Clone)]
pub struct ActivationBatch {
    /// The token at each row.
    pub tokens: Vec<u32>,
    /// `[n, width]` per hook point.
    pub activations: BTreeMap<HookPoint, Tensor>,
}

impl ActivationBatch {
    /// Number of token rows.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Size of the activation tensors in bytes.
    pub fn activation_bytes(&self) -> usize {
        self.activations
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Stacks batches row-wise (all must have the same hook points).
    pub fn concat(batches: &[ActivationBatch]) -> Result<ActivationBatch> {
        let first = batches
            .first()
            .ok_or_else(|| Error::InvalidArgument("no batches to concatenate".into()))?;
        let mut activations = BTreeMap::new();
        for point in first.activations.keys() {
            let parts: Vec<&Tensor> = batches.iter().map(|b| &b.activations[point]).collect();
            activations.insert(*point, Tensor::cat(&parts, 0)?);
        }
        Ok(ActivationBatch {
            tokens: batches
                .iter()
                .flat_map(|b| b.tokens.iter().copied())
                .collect(),
            activations,
        })
    }

    /// Rows `indices` of this batch, in that order.
    pub fn select(&self, indices: &[u32]) -> Result<ActivationBatch> {
        let index = Tensor::new(indices, &candle_core::Device::Cpu)?;
        let mut activations = BTreeMap::new();
        for (point, tensor) in &self.activations {
            let index = index.to_device(tensor.device())?;
            activations.insert(*point, tensor.index_select(&index, 0)?);
        }
        Ok(ActivationBatch {
            tokens: indices.iter().map(|&i| self.tokens[i as usize]).collect(),
            activations,
        })
    }
}

/// A source of activation batches: the on-disk cache reader or the in-process producer.
pub trait ActivationSource {
    /// The hook points every batch holds.
    fn hook_points(&self) -> &[HookPoint];
    /// The next batch, or `None` when the source is exhausted.
    fn next_batch(&mut self) -> Result<Option<ActivationBatch>>;

    /// Skips up to `tokens` rows without producing them where that is cheap (whole
    /// sequences of a dataset), returning how many were skipped; callers read and drop the
    /// rest. Used to resume a job. The default skips nothing.
    fn skip_tokens(&mut self, tokens: u64) -> Result<u64> {
        let _ = tokens;
        Ok(0)
    }

    /// Leaves out the rows of the first `positions` positions of every sequence (0, the
    /// default, keeps every row). Call it before reading the first batch; row counts
    /// ([`ActivationSource::skip_tokens`]) then count the rows kept. Used to keep a model's
    /// position-0 "massive activations" out of SAE training. Sources that do not know each
    /// row's position in its sequence refuse any value but 0.
    fn skip_first_positions(&mut self, positions: usize) -> Result<()> {
        if positions == 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "this activation source does not know each row's position in its sequence, so it cannot skip the first {positions} positions"
            )))
        }
    }

    /// What the source reads (model and data, or cache and order), stored in training
    /// checkpoints so that a resumed run reading something else is refused rather than
    /// mixing two runs. Empty (the default) when unknown: nothing is checked then.
    fn describe(&self) -> String {
        String::new()
    }

    /// How many rows the source gives in all, from its start, where it knows beforehand (a
    /// finished cache), so that a trainer can refuse a run the data cannot finish before its
    /// first step. `None` (the default) when unknown.
    fn rows_in_all(&self) -> Option<u64> {
        None
    }

    /// A fingerprint of the data behind the first `rows` rows produced, where the source can
    /// tell (the token ids of the whole chunks they came from), stored in training
    /// checkpoints and compared on resume, so that a run whose data changed is refused rather
    /// than mixing two datasets. `None` (the default) when unknown: nothing is checked then.
    fn data_fingerprint(&self, rows: u64) -> Option<String> {
        let _ = rows;
        None
    }
}

/// Refuses a training run of `steps` x `rows_per_step` rows before its first step when
/// `source` knows it has fewer ([`ActivationSource::rows_in_all`]), rather than stopping
/// when the data runs out with the work of the steps before thrown away.
pub fn check_rows_suffice(
    source: &dyn ActivationSource,
    steps: u64,
    rows_per_step: usize,
) -> Result<()> {
    let needed = steps.saturating_mul(rows_per_step as u64);
    match source.rows_in_all() {
        Some(available) if available < needed => Err(Error::InvalidArgument(format!(
            "the data holds {available} tokens, but {steps} steps x {rows_per_step} tokens per step need {needed}: lower the steps or the tokens per step, or provide more data"
        ))),
        _ => Ok(()),
    }
}

/// The rows to keep of `rows` rows that are whole sequences of `seq_len` tokens, one after
/// another, when the first `skip` positions of each sequence are left out.
pub(crate) fn rows_after_first_positions(rows: usize, seq_len: usize, skip: usize) -> Vec<u32> {
    (0..rows as u32)
        .filter(|&row| row as usize % seq_len >= skip)
        .collect()
}

/// The first row of `rows` (`[n, width]`) that `keep` accepts and that holds a NaN or an
/// infinity, with that value. Checked in blocks converted to f32, so that a float16 shard is
/// never copied whole; a block whose sum is finite holds none.
pub(crate) fn first_non_finite(
    rows: &Tensor,
    keep: impl Fn(usize) -> bool,
) -> Result<Option<(usize, f32)>> {
    const BLOCK: usize = 4096;
    let n = rows.dim(0)?;
    for start in (0..n).step_by(BLOCK) {
        let block = rows
            .narrow(0, start, BLOCK.min(n - start))?
            .to_dtype(DType::F32)?;
        if block.sum_all()?.to_scalar::<f32>()?.is_finite() {
            continue;
        }
        for (i, row) in block.to_vec2::<f32>()?.iter().enumerate() {
            if let Some(&value) = row.iter().find(|x| !x.is_finite()) {
                if keep(start + i) {
                    return Ok(Some((start + i, value)));
                }
            }
        }
    }
    Ok(None)
}

/// Checks that skipping the first `skip` positions of `seq_len`-token sequences leaves rows.
fn check_positions_to_skip(skip: usize, seq_len: usize) -> Result<()> {
    if skip >= seq_len {
        return Err(Error::InvalidArgument(format!(
            "cannot skip the first {skip} positions of {seq_len}-token sequences: no row would be left"
        )));
    }
    Ok(())
}

/// Runs a model over a chunked dataset and yields the activations at chosen hook points,
/// stopping each forward pass after the last hook point needed.
pub struct ModelActivations<'m> {
    model: &'m Model,
    chunks: ChunkStream,
    points: Vec<HookPoint>,
    chunks_per_batch: usize,
    dtype: DType,
    chunks_left: Option<u64>,
    /// Positions at the start of each sequence whose rows are left out.
    skip_positions: usize,
}

impl<'m> ModelActivations<'m> {
    /// Streams `points` over `chunks`, `chunks_per_batch` sequences per forward pass, with
    /// activations converted to `dtype`; at most `max_chunks` chunks when given.
    pub fn new(
        model: &'m Model,
        chunks: ChunkStream,
        points: Vec<HookPoint>,
        chunks_per_batch: usize,
        dtype: DType,
        max_chunks: Option<u64>,
    ) -> Result<Self> {
        if chunks_per_batch == 0 {
            return Err(Error::InvalidArgument("batch size must be positive".into()));
        }
        if points.is_empty() {
            return Err(Error::InvalidArgument("no hook points requested".into()));
        }
        for point in &points {
            model.config().width(*point)?; // every point has rows per token
        }
        Ok(ModelActivations {
            model,
            chunks,
            points,
            chunks_per_batch,
            dtype,
            chunks_left: max_chunks,
            skip_positions: 0,
        })
    }

    /// Skips `n` chunks of the dataset without running the model (to resume).
    pub fn skip_chunks(&mut self, n: u64) -> Result<u64> {
        let skipped = self.chunks.skip_chunks(n)?;
        if let Some(left) = self.chunks_left.as_mut() {
            *left = left.saturating_sub(skipped);
        }
        Ok(skipped)
    }

    /// Rows each chunk gives: its positions less those skipped.
    fn rows_per_chunk(&self) -> u64 {
        (self.chunks.seq_len() - self.skip_positions) as u64
    }

    /// The dataset stream (for token and byte counts).
    pub fn chunks(&self) -> &ChunkStream {
        &self.chunks
    }

    /// The model being run.
    pub fn model(&self) -> &Model {
        self.model
    }
}

impl ActivationSource for ModelActivations<'_> {
    fn hook_points(&self) -> &[HookPoint] {
        &self.points
    }

    /// The model (a local one by its full path, a hub one with its revision), the sequence
    /// length, the shuffle if any and the dtype the model computes in; not the data files,
    /// which a resumed run may extend or move.
    fn describe(&self) -> String {
        let origin = self.model.origin();
        let origin = std::fs::canonicalize(origin)
            .map_or_else(|_| origin.to_string(), |p| p.display().to_string());
        // Nothing in data order, as descriptions were before streams could be shuffled.
        let order = self
            .chunks
            .shuffling()
            .map_or(String::new(), |s| format!(", {s}"));
        format!(
            "model {origin} in sequences of {} tokens{order} (computed in {})",
            self.chunks.seq_len(),
            crate::dtype_name(self.model.dtype())
        )
    }

    fn skip_tokens(&mut self, tokens: u64) -> Result<u64> {
        let rows_per_chunk = self.rows_per_chunk();
        Ok(self.skip_chunks(tokens / rows_per_chunk)? * rows_per_chunk)
    }

    /// The fingerprint of the whole chunks the first `rows` rows span, which a resumed run
    /// has read again once it has skipped them.
    fn data_fingerprint(&self, rows: u64) -> Option<String> {
        self.chunks.fingerprint_after(rows / self.rows_per_chunk())
    }

    fn skip_first_positions(&mut self, positions: usize) -> Result<()> {
        check_positions_to_skip(positions, self.chunks.seq_len())?;
        self.skip_positions = positions;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<ActivationBatch>> {
        let want = match self.chunks_left {
            Some(0) => return Ok(None),
            Some(left) => (left as usize).min(self.chunks_per_batch),
            None => self.chunks_per_batch,
        };
        let chunks = self.chunks.next_chunks(want)?;
        if chunks.is_empty() {
            return Ok(None);
        }
        if let Some(left) = self.chunks_left.as_mut() {
            *left -= chunks.len() as u64;
        }
        let (batch, seq) = (chunks.len(), chunks[0].len());
        let tokens: Vec<u32> = chunks.concat();
        let ids = Tensor::from_vec(tokens.clone(), (batch, seq), self.model.device())?;
        let mut hooks = Hooks::capture_only(self.points.iter().copied());
        let out = self
            .model
            .forward(&ids, &mut hooks)
            .map_err(|e| self.chunks.locate_token_error(e, batch))?;
        let mut activations = BTreeMap::new();
        for point in &self.points {
            let tensor = &out.captures[point];
            let width = tensor.dim(2)?;
            activations.insert(
                *point,
                tensor.reshape((batch * seq, width))?.to_dtype(self.dtype)?,
            );
        }
        let batch = ActivationBatch {
            tokens,
            activations,
        };
        if self.skip_positions == 0 {
            return Ok(Some(batch));
        }
        let keep = rows_after_first_positions(batch.len(), seq, self.skip_positions);
        Ok(Some(batch.select(&keep)?))
    }
}
