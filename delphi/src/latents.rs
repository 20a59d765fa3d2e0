//! The latent cache: where each SAE latent fires over a dataset, stored sparsely on disk.
//!
//! Our layout (`write_latent_cache`) is a folder with `config.json` and shards
//! `shards/<first>_<end>.safetensors`, each covering sequences `first..end` (end exclusive)
//! and holding `tokens` `[n, seq_len]` (u32) plus, per hook point, `<hookpoint>.locations`
//! `[N, 3]` (sequence counted from the shard's first, position, latent: u16 when all fit, as
//! with up to 65536 latents, else u32) and `<hookpoint>.activations` `[N]` (f16): 8 bytes per
//! activation, like delphi's files.
//! Memory is bounded by one shard; shards are written atomically, so an interrupted run
//! resumes after the last complete shard.
//!
//! [`LatentCache::open`] also reads delphi's layout (`<hookpoint>/<start>_<end>.safetensors`
//! with `locations` `[N, 3]` u16/u32 holding `latent - start`, `activations` f16 and the full
//! `tokens` matrix in every file, `end` inclusive).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::DType;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use hooks::activations::{ActivationSource, ModelActivations};
use hooks::{HookPoint, Model};
use sae::Sae;

use crate::{Error, Result};

/// One activation of a latent: where and how strongly it fired.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// Sequence index in the cache.
    pub seq: u32,
    /// Token position in the sequence.
    pub pos: u32,
    /// Activation value.
    pub value: f32,
}

/// The cached token sequences, all of one length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTable {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl TokenTable {
    /// Sequences of `seq_len` tokens laid end to end.
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self> {
        if seq_len == 0 || !tokens.len().is_multiple_of(seq_len) {
            return Err(Error::Invalid(format!(
                "{} tokens do not make whole sequences of {seq_len}",
                tokens.len()
            )));
        }
        Ok(Self { tokens, seq_len })
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.tokens.len() / self.seq_len
    }

    /// Tokens of window `index` when sequences are cut into windows of `width` tokens.
    pub fn window(&self, index: u64, width: usize) -> &[u32] {
        let start = index as usize * width;
        &self.tokens[start..start + width]
    }
}

/// What `config.json` of our cache records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Always [`CACHE_FORMAT`].
    pub format: String,
    /// The model that produced the activations.
    pub model: String,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Hook point name -> number of latents of its SAE.
    pub hookpoints: BTreeMap<String, u32>,
    /// Sequences per shard (the last may be shorter).
    pub sequences_per_shard: usize,
    /// Set once every requested sequence is in a shard.
    pub complete: bool,
    /// Hook point name -> fingerprint of its SAE (configuration and parameters), so that
    /// resuming with another SAE is refused. Empty in caches of earlier versions.
    #[serde(default)]
    pub saes: BTreeMap<String, String>,
    /// Sequences in the shards, recorded once complete, so that a shard added by hand is
    /// found. Absent while the cache is written, and in caches of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequences: Option<u64>,
    /// The dtype the model computed in (`float32`, `bfloat16`...), so that resuming in
    /// another precision is refused. Absent in caches of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Tokens at whose positions no firing is recorded ([`WriteOptions::excluded_token`]).
    /// Absent in caches of earlier versions, which recorded every position (and every
    /// activation above 0, not [`FIRING_THRESHOLD`]); such a cache is extended as it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded_tokens: Option<Vec<u32>>,
}

/// A fingerprint of an SAE: its configuration and every parameter's f32 values.
pub fn sae_digest(sae: &Sae) -> Result<String> {
    let config = serde_json::to_string(sae.config())
        .map_err(|e| Error::Invalid(format!("cannot serialise an SAE config: {e}")))?;
    let mut hash = hooks::digest::Fnv::default().bytes(config.as_bytes());
    for parameter in sae.parameters() {
        let values = parameter
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        hash = hash.u32s(
            &parameter
                .dims()
                .iter()
                .map(|&d| d as u32)
                .collect::<Vec<_>>(),
        );
        hash = hash.u32s(&bits);
    }
    Ok(hash.hex())
}

/// What a latent cache was made from, as recorded in a job's `run_config.json`: results
/// made from another cache are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIdentity {
    /// [`CACHE_FORMAT`], or `delphi` for delphi's layout.
    pub format: String,
    /// The model that produced the activations, when the cache records it.
    pub model: Option<String>,
    /// Hook point name -> number of latents (when known).
    pub hookpoints: BTreeMap<String, Option<u32>>,
    /// Hook point name -> SAE fingerprint, when the cache records it.
    pub saes: BTreeMap<String, String>,
    /// Cached sequences.
    pub sequences: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Fingerprint of every cached token id (the data).
    pub tokens: String,
    /// Tokens whose positions record no firing, when the cache records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded_tokens: Option<Vec<u32>>,
}

/// The `format` field of our cache's `config.json`.
pub const CACHE_FORMAT: &str = "eleuther-interp latent cache v2";

/// What every version of our cache's `format` starts with.
const CACHE_FORMAT_FAMILY: &str = "eleuther-interp latent cache";

/// One SAE to run at a hook point while caching.
pub struct CacheTarget<'a> {
    /// The hook point name (the SAE's folder name, e.g. `layers.6`).
    pub name: String,
    /// Where its input is read.
    pub point: HookPoint,
    /// The SAE.
    pub sae: &'a Sae,
}

/// Options of [`write_latent_cache`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Sequences per shard file.
    pub sequences_per_shard: usize,
    /// Stop after this many sequences.
    pub max_sequences: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
    /// A token whose positions record no firings: the document separator, where activations
    /// are outliers that would crowd every latent's top examples (delphi's `filter_bos`).
    pub excluded_token: Option<u32>,
}

/// Smallest activation recorded as a firing (delphi keeps `|a| > 1e-5`).
pub const FIRING_THRESHOLD: f32 = 1e-5;

/// Runs `model` over `chunks` and writes where each target SAE's latents fire to `dir`,
/// resuming after the shards already there. Returns the number of sequences cached.
pub fn write_latent_cache(
    model: &Model,
    chunks: hooks::data::ChunkStream,
    targets: &[CacheTarget<'_>],
    dir: &Path,
    options: &WriteOptions,
) -> Result<u64> {
    if targets.is_empty() {
        return Err(Error::Invalid("no SAEs to cache".into()));
    }
    if options.sequences_per_shard == 0 || options.batch_size == 0 {
        return Err(Error::Invalid(
            "batch size and sequences per shard must be positive".into(),
        ));
    }
    let seq_len = chunks.seq_len();
    let mut excluded = options.excluded_token;
    let mut config = CacheConfig {
        format: CACHE_FORMAT.into(),
        model: model.origin().to_string(),
        seq_len,
        hookpoints: targets
            .iter()
            .map(|t| (t.name.clone(), t.sae.num_latents() as u32))
            .collect(),
        sequences_per_shard: options.sequences_per_shard,
        complete: false,
        saes: targets
            .iter()
            .map(|t| Ok((t.name.clone(), sae_digest(t.sae)?)))
            .collect::<Result<_>>()?,
        sequences: None,
        dtype: Some(hooks::dtype_name(model.dtype()).to_string()),
        excluded_tokens: Some(options.excluded_token.into_iter().collect()),
    };
    let shards_dir = dir.join("shards");
    std::fs::create_dir_all(&shards_dir).map_err(|e| Error::io(&shards_dir, e))?;
    // Held to the end: another run into this folder is refused meanwhile.
    let _lock = hooks::atomic::lock_folder(dir)?;
    hooks::atomic::remove_abandoned_temp_files(&shards_dir, |name| name.ends_with(".safetensors"));
    let config_path = dir.join("config.json");
    if config_path.is_file() {
        let existing = read_config(&config_path)?;
        if existing.excluded_tokens.is_none() {
            // Made by an earlier version, which recorded every position: extended as made.
            if excluded.is_some() {
                tracing::warn!(
                    "{}: a cache of an earlier version, which records latents at every token \
                     (the separator included): it is extended as it was made",
                    config_path.display()
                );
            }
            excluded = None;
            config.excluded_tokens = None;
        }
        // A cache of an earlier version records no SAE fingerprints nor dtype: it is taken
        // as is.
        let comparable = CacheConfig {
            complete: false,
            sequences: None,
            saes: match existing.saes.is_empty() {
                true => config.saes.clone(),
                false => existing.saes.clone(),
            },
            dtype: existing.dtype.clone().or_else(|| config.dtype.clone()),
            ..existing
        };
        if comparable != config {
            let changed = hooks::checkpoint::differences(&comparable, &config);
            return Err(Error::file(
                &config_path,
                format!(
                    "holds a cache made with other settings or SAEs ({changed}; an SAE is named by a digest of its weights and settings, \
                     excluded_tokens by --keep-bos); use another output folder or delete this one"
                ),
            ));
        }
    }
    let done = shard_ranges(&shards_dir)?.last().map_or(0, |(r, _)| r.end);
    let mut chunks = chunks;
    check_cached_data(&shards_dir, &mut chunks)?;
    // Only now, with the data checked, is the cache marked as being written.
    hooks::atomic::write_json(&config_path, &config)?;
    let points: Vec<HookPoint> = targets.iter().map(|t| t.point).collect();
    // The limit counts from the start of the data: the cached sequences use it up.
    let mut source = ModelActivations::new(
        model,
        chunks,
        points,
        options.batch_size,
        DType::F32,
        options.max_sequences.map(|m| m.saturating_sub(done)),
    )?;
    let bar = hooks::progress::bar(options.progress, options.max_sequences, "sequences");
    bar.set_position(done);
    let mut shard = ShardBuffer::new(targets.len(), done);
    // Activations past f16's range, per target.
    let mut saturated = vec![0u64; targets.len()];
    while let Some(batch) = source.next_batch()? {
        let sequences = batch.tokens.len() / seq_len;
        for (slot, target) in targets.iter().enumerate() {
            let x = &batch.activations[&target.point];
            let (acts, indices) = target.sae.encode(x)?;
            let acts = acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let indices = indices.to_vec2::<u32>()?;
            let base = shard.sequences as usize * seq_len;
            for (row, (acts, indices)) in acts.iter().zip(&indices).enumerate() {
                let excluded_here = excluded == Some(batch.tokens[row]);
                let token = base + row;
                // The sequence is stored relative to the shard's first one.
                let (seq, pos) = (token / seq_len, token % seq_len);
                for (&a, &latent) in acts.iter().zip(indices) {
                    if a.is_nan() {
                        return Err(Error::Invalid(format!(
                            "{}: the SAE gave latent {latent} a NaN activation at sequence {} \
                             position {pos}: check the model's activations and the SAE's weights",
                            target.name,
                            shard.first + seq as u64
                        )));
                    }
                    if a > FIRING_THRESHOLD && !excluded_here {
                        // f16 holds up to 65504; larger values are kept at that, and counted.
                        let stored = half::f16::from_f32(a.min(F16_LARGEST));
                        if a > F16_LARGEST {
                            saturated[slot] += 1;
                        }
                        shard.locations[slot].extend([seq as u32, pos as u32, latent]);
                        shard.values[slot].push(stored);
                    }
                }
            }
        }
        shard.tokens.extend_from_slice(&batch.tokens);
        shard.sequences += sequences as u64;
        bar.inc(sequences as u64);
        if shard.sequences as usize >= options.sequences_per_shard {
            shard.write(&shards_dir, targets, seq_len)?;
            shard = ShardBuffer::new(targets.len(), shard.first + shard.sequences);
        }
    }
    if shard.sequences > 0 {
        shard.write(&shards_dir, targets, seq_len)?;
    }
    bar.finish_and_clear();
    for (target, &count) in targets.iter().zip(&saturated).filter(|(_, &c)| c > 0) {
        tracing::warn!(
            "{}: {count} activations were above {F16_LARGEST}, the largest float16 the cache \
             stores, and are kept as {F16_LARGEST} (the order among them is lost); is the SAE \
             meant for these activations?",
            target.name
        );
    }
    let total = shard.first + shard.sequences;
    if total == 0 {
        // A complete cache of nothing would have every latent skipped as too rare.
        return Err(Error::Invalid(format!(
            "the data yields no complete sequence of {seq_len} tokens; give more data or a shorter --seq-len"
        )));
    }
    hooks::atomic::write_json(
        &config_path,
        &CacheConfig {
            complete: true,
            sequences: Some(total),
            ..config
        },
    )?;
    Ok(total)
}

/// Reads the data's first chunks, as many as the shards in `shards_dir` hold, and refuses
/// data that does not begin with the cached tokens (resuming from other data would append
/// sequences of another dataset).
fn check_cached_data(shards_dir: &Path, chunks: &mut hooks::data::ChunkStream) -> Result<()> {
    let mut seen = 0;
    for (first, end, path) in numbered_files(shards_dir)? {
        let bytes = read_file(&path)?;
        let cached = parse(&path, &bytes)
            .and_then(|st| read_u32s(&path, &st, "tokens"))
            .map_err(|e| {
                Error::Invalid(format!(
                    "{e}; a damaged shard cannot be resumed from: delete it and the shards after \
                     it and run `delphi cache` again to recompute them"
                ))
            })?;
        let data = chunks.next_chunks((end - first) as usize)?;
        seen += data.len() as u64;
        if (data.len() as u64) < end - first {
            return Err(Error::Invalid(format!(
                "the cache in {} already holds {end} sequences but the data has only {seen}",
                shards_dir.parent().unwrap_or(shards_dir).display()
            )));
        }
        if data.concat() != cached {
            return Err(Error::file(
                &path,
                format!(
                    "the cached sequences {first}..{end} differ from the data's: the cache was \
                     made from other data (or another tokenizer or --seq-len); use another output folder"
                ),
            ));
        }
    }
    Ok(())
}

/// The largest finite f16, where larger activations are kept.
const F16_LARGEST: f32 = 65504.0;

/// The entries of one shard being filled.
struct ShardBuffer {
    first: u64,
    sequences: u64,
    tokens: Vec<u32>,
    locations: Vec<Vec<u32>>,
    values: Vec<Vec<half::f16>>,
}

impl ShardBuffer {
    fn new(targets: usize, first: u64) -> Self {
        Self {
            first,
            sequences: 0,
            tokens: Vec::new(),
            locations: vec![Vec::new(); targets],
            values: vec![Vec::new(); targets],
        }
    }

    fn write(&self, dir: &Path, targets: &[CacheTarget<'_>], seq_len: usize) -> Result<()> {
        fn view(
            dtype: Dtype,
            shape: Vec<usize>,
            bytes: &[u8],
        ) -> Result<safetensors::tensor::TensorView<'_>> {
            safetensors::tensor::TensorView::new(dtype, shape, bytes)
                .map_err(|e| Error::Invalid(format!("shard tensor: {e}")))
        }
        let tokens: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let mut buffers = Vec::with_capacity(targets.len());
        for slot in 0..targets.len() {
            let locations = &self.locations[slot];
            let (dtype, bytes): (Dtype, Vec<u8>) =
                if locations.iter().all(|&v| v <= u16::MAX as u32) {
                    (
                        Dtype::U16,
                        locations
                            .iter()
                            .flat_map(|&v| (v as u16).to_le_bytes())
                            .collect(),
                    )
                } else {
                    (
                        Dtype::U32,
                        locations.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    )
                };
            let values: Vec<u8> = self.values[slot]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            buffers.push((dtype, bytes, values));
        }
        let mut views = vec![(
            "tokens".to_string(),
            view(Dtype::U32, vec![self.sequences as usize, seq_len], &tokens)?,
        )];
        for ((target, (dtype, locations, values)), slot) in targets.iter().zip(&buffers).zip(0..) {
            let count = self.values[slot].len();
            views.push((
                format!("{}.locations", target.name),
                view(*dtype, vec![count, 3], locations)?,
            ));
            views.push((
                format!("{}.activations", target.name),
                view(Dtype::F16, vec![count], values)?,
            ));
        }
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| Error::Invalid(format!("cannot serialise a shard: {e}")))?;
        let end = self.first + self.sequences;
        let path = dir.join(format!("{}_{end}.safetensors", self.first));
        hooks::atomic::write(&path, &bytes)?;
        Ok(())
    }
}

fn read_config(path: &Path) -> Result<CacheConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let not_ours =
        |e: serde_json::Error| Error::file(path, format!("not a latent cache config: {e}"));
    let value: serde_json::Value = serde_json::from_str(&text).map_err(not_ours)?;
    let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != CACHE_FORMAT {
        return Err(Error::file(
            path,
            format!(
                "latent cache format '{format}' is no longer read (this version reads \
                 '{CACHE_FORMAT}'); re-run `delphi cache` to rebuild it"
            ),
        ));
    }
    serde_json::from_value(value).map_err(not_ours)
}

/// Whether `config.json` in a cache folder is one of ours, of any format version (delphi's
/// own caches have none).
fn is_our_config(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format")?.as_str().map(str::to_string))
        .is_some_and(|format| format.starts_with(CACHE_FORMAT_FAMILY))
}

/// `<a>_<b>.safetensors` file names in `dir` as ranges, sorted.
fn numbered_files(dir: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if let Some((a, b)) = stem.split_once('_') {
            if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                files.push((a, b, path));
            }
        }
    }
    files.sort_by_key(|f| (f.0, f.1));
    Ok(files)
}

/// delphi's split files of one hook point, `<first>_<last>.safetensors` holding latents
/// `first..=last`, checked to tile `0..=last` without gaps or overlaps, so that no latent's
/// firings are lost or counted twice.
fn delphi_splits(files: Vec<(u64, u64, PathBuf)>) -> Result<Vec<(u32, u32, PathBuf)>> {
    let mut expected = 0u64;
    let mut splits = Vec::with_capacity(files.len());
    for (first, last, path) in files {
        let latent = |n: u64| u32::try_from(n).ok().filter(|&n| n < u32::MAX);
        let (Some(first32), Some(last32)) = (latent(first), latent(last)) else {
            return Err(Error::file(
                &path,
                "latent numbers past 2^32 - 1 in its name",
            ));
        };
        if last < first {
            return Err(Error::file(
                &path,
                format!("names latents {first} to {last}: the first is after the last"),
            ));
        }
        if first != expected {
            let problem = if first < expected {
                format!(
                    "overlaps the split before it (which ends at latent {})",
                    expected - 1
                )
            } else {
                format!("leaves latents {expected}..{first} in no split file (one is missing)")
            };
            return Err(Error::file(
                &path,
                format!("names latents {first} to {last}: {problem}"),
            ));
        }
        expected = last + 1;
        splits.push((first32, last32, path));
    }
    Ok(splits)
}

/// Our shards with the sequences each holds, checked to tile `0..end` without gaps.
fn shard_ranges(dir: &Path) -> Result<Vec<(Range<u64>, PathBuf)>> {
    let mut expected = 0;
    let mut ranges = Vec::new();
    for (first, end, path) in numbered_files(dir)? {
        if first != expected || end <= first {
            return Err(Error::file(
                &path,
                format!(
                    "shard covers sequences {first}..{end} but the previous shards end at {expected}: \
                     a shard is missing; delete the shards from sequence {expected} on and run \
                     `delphi cache` again to recompute them"
                ),
            ));
        }
        expected = end;
        ranges.push((first..end, path));
    }
    Ok(ranges)
}

/// Which layout a cache folder has.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    /// Shards with the index of their first sequence.
    Ours { shards: Vec<(u32, PathBuf)> },
    Delphi {
        files: BTreeMap<String, Vec<(u32, u32, PathBuf)>>,
    },
}

/// A latent cache opened for reading: ours or delphi's.
#[derive(Debug)]
pub struct LatentCache {
    dir: PathBuf,
    layout: Layout,
    tokens: TokenTable,
    hookpoints: BTreeMap<String, Option<u32>>,
    /// The model and SAE fingerprints, when the cache records them (ours).
    model: Option<String>,
    saes: BTreeMap<String, String>,
    /// Tokens whose positions record no firing, when the cache records it (ours).
    excluded_tokens: Option<Vec<u32>>,
}

impl LatentCache {
    /// Opens a cache written by [`write_latent_cache`] or by delphi (its `latents/` folder).
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        // Ours has shards/ beside its config: a damaged config is then reported as such,
        // not taken for delphi's layout.
        let ours_damaged = config_path.is_file() && dir.join("shards").is_dir();
        if !config_path.exists() && dir.join("shards").is_dir() {
            return Err(Error::file(
                &config_path,
                "missing: the folder has our latent cache's shards/ but not its config.json",
            ));
        }
        if is_our_config(&config_path) || ours_damaged {
            Self::open_ours(dir, read_config(&config_path)?)
        } else {
            Self::open_delphi(dir)
        }
    }

    fn open_ours(dir: &Path, config: CacheConfig) -> Result<Self> {
        if !config.complete {
            return Err(Error::file(
                dir.join("config.json"),
                "the cache is incomplete (its writer stopped early): re-run the caching command to finish it",
            ));
        }
        if let Some((hookpoint, _)) = config.hookpoints.iter().find(|(_, &width)| width == 0) {
            return Err(Error::file(
                dir.join("config.json"),
                format!("records 0 latents for {hookpoint}: the file is damaged"),
            ));
        }
        let shards_dir = dir.join("shards");
        let ranges = shard_ranges(&shards_dir)?;
        let end = ranges.last().map_or(0, |(r, _)| r.end);
        if let Some(sequences) = config.sequences.filter(|&s| s != end) {
            return Err(Error::file(
                &shards_dir,
                format!(
                    "the shards hold sequences 0..{end}, but config.json records {sequences}: \
                     a shard was added or removed by hand"
                ),
            ));
        }
        let shards: Vec<(u32, PathBuf)> = ranges
            .into_iter()
            .map(|(range, path)| (range.start as u32, path))
            .collect();
        let mut tokens = Vec::new();
        for (_, path) in &shards {
            let bytes = read_file(path)?;
            let st = parse(path, &bytes)?;
            tokens.extend(read_u32s(path, &st, "tokens")?);
        }
        if end.checked_mul(config.seq_len as u64) != Some(tokens.len() as u64) {
            return Err(Error::file(
                dir.join("config.json"),
                format!(
                    "records seq_len {}, but the shards hold {} tokens for {end} sequences",
                    config.seq_len,
                    tokens.len()
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            layout: Layout::Ours { shards },
            tokens: TokenTable::new(tokens, config.seq_len)?,
            hookpoints: config
                .hookpoints
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect(),
            model: Some(config.model),
            saes: config.saes,
            excluded_tokens: config.excluded_tokens,
        })
    }

    fn open_delphi(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if !path.is_dir() {
                continue;
            }
            let splits = delphi_splits(numbered_files(&path)?)?;
            if !splits.is_empty() {
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                files.insert(name, splits);
            }
        }
        let first = files.values().next().and_then(|s| s.first()).ok_or_else(|| {
            Error::file(
                dir,
                format!(
                    "is neither our latent cache (config.json with format '{CACHE_FORMAT}') nor delphi's \
                     (<hookpoint>/<start>_<end>.safetensors)"
                ),
            )
        })?;
        let path = first.2.clone();
        let bytes = read_file(&path)?;
        let st = parse(&path, &bytes)?;
        let view = tensor(&path, &st, "tokens")?;
        let shape = view.shape().to_vec();
        if shape.len() != 2 {
            return Err(Error::file(
                &path,
                format!("'tokens' has shape {shape:?}, expected [sequences, ctx_len]"),
            ));
        }
        let tokens = TokenTable::new(read_u32s(&path, &st, "tokens")?, shape[1])?;
        let hookpoints = files
            .iter()
            .map(|(name, splits)| (name.clone(), splits.last().map(|s| s.1 + 1)))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            layout: Layout::Delphi { files },
            tokens,
            hookpoints,
            model: None,
            saes: BTreeMap::new(),
            excluded_tokens: None,
        })
    }

    /// What the cache was made from (for `run_config.json`): format, model and SAE
    /// fingerprints when recorded, hook points, size and a fingerprint of its tokens.
    pub fn identity(&self) -> CacheIdentity {
        CacheIdentity {
            format: match self.layout {
                Layout::Ours { .. } => CACHE_FORMAT.to_string(),
                Layout::Delphi { .. } => "delphi".to_string(),
            },
            model: self.model.clone(),
            hookpoints: self.hookpoints.clone(),
            saes: self.saes.clone(),
            sequences: self.tokens.sequences(),
            seq_len: self.tokens.seq_len(),
            tokens: hooks::digest::Fnv::default()
                .u32s(&self.tokens.tokens)
                .hex(),
            excluded_tokens: self.excluded_tokens.clone(),
        }
    }

    /// The cached tokens.
    pub fn tokens(&self) -> &TokenTable {
        &self.tokens
    }

    /// Hook point names with their number of latents (when known).
    pub fn hookpoints(&self) -> &BTreeMap<String, Option<u32>> {
        &self.hookpoints
    }

    /// Refuses a hook point the cache lacks, and latents at or past its number of latents
    /// when the cache knows it (a latent index past the SAE's width is a mistake, not a
    /// latent that never fires).
    pub fn check_latents(&self, hookpoint: &str, latents: Range<u32>) -> Result<()> {
        let Some(width) = self.hookpoints.get(hookpoint) else {
            return Err(Error::Invalid(format!(
                "the cache in {} has no hook point '{hookpoint}' (it has: {})",
                self.dir.display(),
                self.hookpoints
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        match width {
            Some(width) if latents.end > *width => Err(Error::Invalid(format!(
                "latents {}..{} reach past the end: {hookpoint} has {width} latents in the cache \
                 in {}",
                latents.start,
                latents.end,
                self.dir.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Where `latent` of `hookpoint` fires, in cache order; an error for a latent past the
    /// hook point's width ([`LatentCache::check_latents`]).
    pub fn latent_firings(&self, hookpoint: &str, latent: u32) -> Result<Vec<Firing>> {
        self.check_latents(hookpoint, 0..0)?;
        if let Some(Some(width)) = self.hookpoints.get(hookpoint) {
            if latent >= *width {
                return Err(Error::Invalid(format!(
                    "latent {latent} is out of range ({hookpoint} has {width} latents)"
                )));
            }
        }
        let end = latent.checked_add(1).ok_or_else(|| {
            Error::Invalid(format!("latent {latent} is out of range for {hookpoint}"))
        })?;
        Ok(self
            .firings(hookpoint, latent..end)?
            .remove(&latent)
            .unwrap_or_default())
    }

    /// Where each latent in `latents` of `hookpoint` fires, by latent (latents that never
    /// fire are absent), in cache order. Refuses what [`LatentCache::check_latents`] refuses.
    pub fn firings(
        &self,
        hookpoint: &str,
        latents: Range<u32>,
    ) -> Result<BTreeMap<u32, Vec<Firing>>> {
        self.firings_of(hookpoint, latents, |_| true)
    }

    /// [`LatentCache::firings`] of the latents in `latents` that `wanted` keeps (a job's
    /// shard), holding no others' in memory on the way.
    pub fn firings_of(
        &self,
        hookpoint: &str,
        latents: Range<u32>,
        wanted: impl Fn(u32) -> bool,
    ) -> Result<BTreeMap<u32, Vec<Firing>>> {
        self.check_latents(hookpoint, latents.clone())?;
        let (sequences, seq_len) = (self.tokens.sequences(), self.tokens.seq_len());
        let mut out: BTreeMap<u32, Vec<Firing>> = BTreeMap::new();
        // `last_latent`: the last latent the file may hold (inclusive).
        let mut keep = |path: &Path,
                        locations: Vec<u32>,
                        values: Vec<f32>,
                        first_seq: u32,
                        first_latent: u32,
                        last_latent: u32|
         -> Result<()> {
            if locations.len() != values.len() * 3 {
                return Err(Error::file(
                    path,
                    format!(
                        "{} locations for {} activations",
                        locations.len() / 3,
                        values.len()
                    ),
                ));
            }
            for (loc, value) in locations.chunks_exact(3).zip(values) {
                let seq = (loc[0].checked_add(first_seq))
                    .filter(|&seq| (seq as usize) < sequences && (loc[1] as usize) < seq_len);
                let latent = (loc[2].checked_add(first_latent)).filter(|&l| l <= last_latent);
                let (Some(seq), Some(latent)) = (seq, latent) else {
                    return Err(Error::file(
                        path,
                        format!(
                            "holds a firing (sequence {} + {first_seq}, position {}, latent {} + \
                             {first_latent}) outside the cache's {sequences} x {seq_len} tokens \
                             or past the file's last latent, {last_latent}: the file is damaged",
                            loc[0], loc[1], loc[2]
                        ),
                    ));
                };
                if latents.contains(&latent) && wanted(latent) {
                    out.entry(latent).or_default().push(Firing {
                        seq,
                        pos: loc[1],
                        value,
                    });
                }
            }
            Ok(())
        };
        match &self.layout {
            Layout::Ours { shards } => {
                let width = self.hookpoints.get(hookpoint).copied().flatten();
                let last = width.map_or(u32::MAX, |w| w.saturating_sub(1));
                for (first, path) in shards {
                    let bytes = read_file(path)?;
                    let st = parse(path, &bytes)?;
                    let locations = read_u32s(path, &st, &format!("{hookpoint}.locations"))?;
                    let values = read_f32s(path, &st, &format!("{hookpoint}.activations"))?;
                    keep(path, locations, values, *first, 0, last)?;
                }
            }
            Layout::Delphi { files } => {
                for (start, end, path) in &files[hookpoint] {
                    if *end < latents.start || *start >= latents.end {
                        continue;
                    }
                    let bytes = read_file(path)?;
                    let st = parse(path, &bytes)?;
                    let locations = read_u32s(path, &st, "locations")?;
                    let values = read_f32s(path, &st, "activations")?;
                    keep(path, locations, values, 0, *start, *end)?;
                }
            }
        }
        for firings in out.values_mut() {
            firings.sort_by_key(|f| (f.seq, f.pos));
        }
        Ok(out)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))
}

fn tensor<'a>(
    path: &Path,
    st: &'a SafeTensors<'a>,
    name: &str,
) -> Result<safetensors::tensor::TensorView<'a>> {
    st.tensor(name)
        .map_err(|_| Error::file(path, format!("missing tensor '{name}'")))
}

/// An integer tensor of any width as u32 (delphi writes u16 or u32 locations, int64 tokens).
fn read_u32s(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<Vec<u32>> {
    let view = tensor(path, st, name)?;
    let data = view.data();
    let bad = |v: i128| Error::file(path, format!("'{name}' holds {v}, outside 0..2^32"));
    let convert = |v: i128| u32::try_from(v).map_err(|_| bad(v));
    match view.dtype() {
        Dtype::U8 => Ok(data.iter().map(|&b| b as u32).collect()),
        Dtype::U16 => Ok(data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
            .collect()),
        Dtype::U32 => Ok(data
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| convert(i32::from_le_bytes(b.try_into().unwrap()) as i128))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| convert(i64::from_le_bytes(b.try_into().unwrap()) as i128))
            .collect(),
        Dtype::U64 => data
            .chunks_exact(8)
            .map(|b| convert(u64::from_le_bytes(b.try_into().unwrap()) as i128))
            .collect(),
        other => Err(Error::file(
            path,
            format!("'{name}' has dtype {other:?}, expected an integer type"),
        )),
    }
}

/// A float tensor (f16, bf16 or f32) of activations as f32, every value finite (an
/// infinity or NaN would make scores that cannot be written as JSON).
fn read_f32s(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<Vec<f32>> {
    let view = tensor(path, st, name)?;
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()),
        other => Err(Error::file(
            path,
            format!("'{name}' has dtype {other:?}, expected a float type"),
        )),
    }?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(at) => Err(Error::file(
            path,
            format!(
                "'{name}' holds {} at index {at}: the shard is damaged; recompute the cache (for \
                 one made by `delphi cache`: delete this shard and those after it and run the \
                 command again)",
                values[at]
            ),
        )),
        None => Ok(values),
    }
}
