//! The on-disk activation cache: sharded safetensors plus a manifest.
//!
//! Layout of a cache folder:
//! - `shards/shard-000000.safetensors`: `tokens` (u32 `[n]`) and one `[n, width]` tensor per
//!   hook point, named by its canonical name;
//! - `progress.json`: written atomically after every shard while the job runs, so an
//!   interrupted job resumes after the last complete shard;
//! - `manifest.json`: written last, atomically; a cache without it is incomplete and is
//!   never read as if it were complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{
    check_positions_to_skip, first_non_finite, rows_after_first_positions, ActivationBatch,
    ActivationSource, ModelActivations,
};
use crate::data::DataSpec;
use crate::{atomic, dtype_name, parse_dtype, Error, HookPoint, Result};

const FORMAT: &str = "eleuther-interp.activations";
const VERSION: u32 = 1;

/// What was cached and how: equal settings are required to resume a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSettings {
    /// Model origin (hub id at revision, folder or file).
    pub model: String,
    /// The revision: the hub's, or a local folder's sub-folder; none if not given.
    pub revision: Option<String>,
    /// `gpt_neox` or `llama`.
    pub architecture: String,
    /// Canonical hook point names, in forward order.
    pub hook_points: Vec<String>,
    /// Width of each hook point's tensors.
    pub widths: Vec<usize>,
    /// Dtype the model ran in.
    pub compute_dtype: String,
    /// Whether the model kept block-quantized weights ([`crate::Model::quantized`]); false
    /// when a manifest from before this field was added does not say.
    #[serde(default)]
    pub quantized_weights: bool,
    /// Dtype the activations are stored in.
    pub dtype: String,
    /// The dataset and chunking.
    pub data: DataSpec,
    /// Chunk limit, if any.
    pub max_chunks: Option<u64>,
}

impl CacheSettings {
    /// How the model computed: its dtype, and whether it kept quantized weights.
    pub fn computed_in(&self) -> String {
        match self.quantized_weights {
            true => format!("{} with quantized weights", self.compute_dtype),
            false => self.compute_dtype.clone(),
        }
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name relative to the cache folder.
    pub file: String,
    /// Token rows in the shard.
    pub tokens: u64,
}

/// The description of a complete cache (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `eleuther-interp.activations`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// What was cached.
    pub settings: CacheSettings,
    /// Total token rows.
    pub tokens: u64,
    /// Number of `seq_len` chunks.
    pub chunks: u64,
    /// Bytes of source text consumed, with the EOS token's text before each document (see
    /// [`crate::data::ChunkStream::text_bytes`]; documents alone in caches begun before
    /// 2026-12-02); 0 for pre-tokenized data.
    pub text_bytes: u64,
    /// The shards, in dataset order.
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    settings: CacheSettings,
    shards: Vec<ShardInfo>,
    chunks: u64,
    text_bytes: u64,
    /// The data behind the shards done ([`crate::data::ChunkStream::fingerprint_after`]);
    /// absent from caches begun before it was recorded.
    #[serde(default)]
    data_fingerprint: Option<String>,
    /// `text_bytes` and `data_fingerprint` as they were after each shard, so that a resume
    /// can go on from the shards before a damaged one; absent from older caches.
    #[serde(default)]
    after_shard: Vec<AfterShard>,
}

/// Where a cache job stood after writing one shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AfterShard {
    text_bytes: u64,
    data_fingerprint: Option<String>,
}

impl Progress {
    /// Forgets the shards from `first` on (the first damaged one), going back to where the
    /// job stood before it, if the progress file recorded that (from the start, always);
    /// `None` otherwise.
    fn cut_before(mut self, first: usize, seq_len: u64) -> Option<Progress> {
        if first > 0 && self.after_shard.len() != self.shards.len() {
            return None;
        }
        self.shards.truncate(first);
        self.after_shard.truncate(first);
        let before = self.after_shard.last();
        self.chunks = self.shards.iter().map(|s| s.tokens).sum::<u64>() / seq_len;
        self.text_bytes = before.map_or(0, |b| b.text_bytes);
        self.data_fingerprint = before.and_then(|b| b.data_fingerprint.clone());
        Some(self)
    }
}

/// Options for writing a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// A shard is written once its activation bytes reach this: whole forward batches, so it
    /// may pass it by up to one batch.
    pub max_shard_bytes: usize,
    /// Start again instead of resuming, deleting the cache's own files there (its manifest,
    /// progress file and shards; other files are left alone).
    pub overwrite: bool,
    /// Show a progress bar (only drawn on a terminal).
    pub progress: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            max_shard_bytes: 256 << 20,
            overwrite: false,
            progress: true,
        }
    }
}

/// What a caching job did.
#[derive(Debug, Clone)]
pub struct CacheSummary {
    /// The finished manifest.
    pub manifest: Manifest,
    /// Chunks found already done from an earlier run.
    pub resumed_chunks: u64,
    /// Tokens computed in this run.
    pub new_tokens: u64,
    /// Bytes written in this run.
    pub bytes_written: u64,
    /// Wall time of this run.
    pub seconds: f64,
    /// Whether the cache was already complete (nothing done).
    pub already_complete: bool,
}

/// Where a cache job stands after a batch (see [`ActivationCache::write_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheProgress {
    /// Tokens cached so far, by this run and the earlier ones it resumes.
    pub tokens: u64,
    /// Tokens computed by this run.
    pub new_tokens: u64,
    /// Shards written so far, the one this batch completed included (batches since the last
    /// are written in a later one).
    pub shards: usize,
}

/// How a cache's settings and this run's differ (see [`crate::checkpoint::differences`]),
/// naming the flag behind `max_chunks`, which is not one itself.
fn settings_changes(saved: &CacheSettings, now: &CacheSettings) -> String {
    let changed = crate::checkpoint::differences(saved, now);
    if saved.max_chunks == now.max_chunks {
        return changed;
    }
    format!("{changed}; max_chunks is --max-tokens over data.seq_len")
}

fn cache_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Cache {
        path: path.into(),
        message: message.into(),
    }
}

impl ActivationCache {
    /// Runs `source` to the end and writes its activations to `dir`, resuming a previous
    /// run with the same settings.
    pub fn write(
        source: &mut ModelActivations,
        data: &DataSpec,
        dir: &Path,
        options: &CacheOptions,
    ) -> Result<CacheSummary> {
        Self::write_with(source, data, dir, options, |_| Ok(()))
    }

    /// [`ActivationCache::write`] calling `after_batch` with where the job stands after every
    /// batch. An error from it stops the job: what was computed is first written as a shard,
    /// so running the job again resumes there (used for Ctrl-C and progress reporting from
    /// Python).
    ///
    /// A run that fails before its first shard removes the cache folder it created (and its
    /// `shards/`), when they are still empty. Another job writing to `dir` meanwhile is
    /// refused (see [`atomic::lock_folder`]).
    pub fn write_with(
        source: &mut ModelActivations,
        data: &DataSpec,
        dir: &Path,
        options: &CacheOptions,
        after_batch: impl FnMut(&CacheProgress) -> Result<()>,
    ) -> Result<CacheSummary> {
        let new_dir = !dir.exists();
        let lock = atomic::lock_folder(dir)?;
        let result = Self::write_shards(source, data, dir, options, after_batch);
        if result.is_err() {
            // `remove_dir` removes only empty folders: nothing written is lost.
            if std::fs::remove_dir(dir.join("shards")).is_ok() && new_dir {
                let _ = std::fs::remove_file(dir.join(atomic::LOCK_FILE));
                drop(lock);
                let _ = std::fs::remove_dir(dir);
            }
        }
        result
    }

    /// The body of [`ActivationCache::write_with`].
    fn write_shards(
        source: &mut ModelActivations,
        data: &DataSpec,
        dir: &Path,
        options: &CacheOptions,
        mut after_batch: impl FnMut(&CacheProgress) -> Result<()>,
    ) -> Result<CacheSummary> {
        let started = Instant::now();
        if source.skip_positions != 0 {
            // Readers find each row's position from whole sequences.
            return Err(Error::InvalidArgument(
                "an activation cache stores whole sequences: cache without skipping positions (readers can skip them)".into(),
            ));
        }
        let model = source.model();
        let dtype = source.dtype;
        let settings = CacheSettings {
            model: model.origin().to_string(),
            revision: model.revision().map(str::to_string),
            architecture: model.config().model_type().to_string(),
            hook_points: source.points.iter().map(|p| model.hook_name(*p)).collect(),
            widths: source
                .points
                .iter()
                .map(|p| model.config().width(*p))
                .collect::<Result<_>>()?,
            compute_dtype: dtype_name(model.dtype()).to_string(),
            quantized_weights: model.quantized(),
            dtype: dtype_name(dtype).to_string(),
            data: data.clone(),
            max_chunks: source.chunks_left,
        };
        let names: BTreeMap<HookPoint, String> = source
            .points
            .iter()
            .map(|p| (*p, model.hook_name(*p)))
            .collect();

        let manifest_path = dir.join("manifest.json");
        let progress_path = dir.join("progress.json");
        let is_shard = |name: &str| name.starts_with("shard-") && name.ends_with(".safetensors");
        if options.overwrite && dir.exists() {
            for file in ["manifest.json", "progress.json"] {
                let _ = std::fs::remove_file(dir.join(file));
            }
            // Only the cache's own shards: other files in the folder are left alone.
            if let Ok(entries) = std::fs::read_dir(dir.join("shards")) {
                for entry in entries.flatten() {
                    if entry.file_name().to_str().is_some_and(is_shard) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        // The shard (and progress.json) a killed run was writing.
        let freed = crate::atomic::remove_abandoned_temp_files(dir, |name| name == "progress.json")
            + crate::atomic::remove_abandoned_temp_files(&dir.join("shards"), is_shard);
        if freed > 0 {
            tracing::info!("removed {freed} bytes of files a killed run left half-written");
        }
        if manifest_path.exists() {
            let existing = read_manifest(dir)?;
            if existing.settings != settings {
                let changed = settings_changes(&existing.settings, &settings);
                return Err(cache_error(
                    dir,
                    format!("already holds a complete cache made with other settings ({changed}); choose another folder or pass --overwrite"),
                ));
            }
            return Ok(CacheSummary {
                manifest: existing,
                resumed_chunks: 0,
                new_tokens: 0,
                bytes_written: 0,
                seconds: 0.0,
                already_complete: true,
            });
        }
        std::fs::create_dir_all(dir.join("shards"))
            .map_err(|e| Error::io(dir.join("shards"), e))?;

        // The shard files a resume from before a damaged shard gives up.
        let mut cut_shards: Vec<String> = Vec::new();
        let mut progress = if progress_path.exists() {
            let progress: Progress = read_json(&progress_path)?;
            if progress.settings != settings {
                let changed = settings_changes(&progress.settings, &settings);
                return Err(cache_error(
                    dir,
                    format!("holds an unfinished cache made with other settings ({changed}); choose another folder or pass --overwrite"),
                ));
            }
            check_shard_names(&progress_path, &progress.shards)?;
            let listed =
                (progress.shards.iter()).try_fold(0u64, |sum, s| sum.checked_add(s.tokens));
            if listed.is_none()
                || progress.chunks.checked_mul(settings.data.seq_len as u64) != listed
            {
                return Err(cache_error(
                    &progress_path,
                    format!(
                        "records {} chunks of {} tokens done, but its shards hold {} tokens; \
                         pass --overwrite to start again",
                        progress.chunks,
                        settings.data.seq_len,
                        listed.map_or("more than 2^64".into(), |n| n.to_string())
                    ),
                ));
            }
            // A shard torn by a power cut (renamed before its data reached the disk) or
            // damaged by hand must not end up in a manifest: the job goes on from the shards
            // before it.
            let damaged = progress.shards.iter().enumerate().find_map(|(i, shard)| {
                let problem = if dir.join(&shard.file).is_file() {
                    with_checked_shard(dir, &settings, shard, |_| ()).err()
                } else {
                    Some(cache_error(&dir.join(&shard.file), "missing"))
                };
                problem.map(|problem| (i, problem))
            });
            match damaged {
                None => progress,
                // Not damage: a file that cannot be opened now (permissions, resources).
                Some((_, problem @ Error::Io { .. })) => return Err(problem),
                Some((i, problem)) => {
                    let file = progress.shards[i].file.clone();
                    let later: Vec<String> = progress.shards[i..]
                        .iter()
                        .map(|s| s.file.clone())
                        .collect();
                    let Some(cut) = progress.cut_before(i, settings.data.seq_len as u64) else {
                        return Err(cache_error(
                            dir,
                            format!(
                                "progress.json lists shard {file} but it cannot be resumed from ({problem}), \
                                 and, written by an older version, it does not record where the job stood \
                                 before that shard; pass --overwrite to start again"
                            ),
                        ));
                    };
                    tracing::warn!(
                        "shard {file} cannot be resumed from ({problem}): going on from the {i} \
                         shards before it; it and the {} after it are computed again",
                        later.len() - 1
                    );
                    // Deleted once the data is known to be the same (below).
                    cut_shards = later;
                    cut
                }
            }
        } else {
            Progress {
                settings: settings.clone(),
                shards: Vec::new(),
                chunks: 0,
                text_bytes: 0,
                data_fingerprint: None,
                after_shard: Vec::new(),
            }
        };
        let resumed_chunks = progress.chunks;
        if resumed_chunks > 0 {
            let skipped = source.skip_chunks(resumed_chunks)?;
            if skipped != resumed_chunks {
                return Err(cache_error(
                    dir,
                    format!("progress.json records {resumed_chunks} chunks done but the dataset now has only {skipped}"),
                ));
            }
            let now = source.chunks().fingerprint_after(resumed_chunks);
            crate::checkpoint::check_data(progress.data_fingerprint.as_deref(), now.as_deref())
                .map_err(|m| {
                    let advice = "use the original data, another folder, or pass --overwrite";
                    cache_error(dir, format!("holds an unfinished cache that {m}; {advice}"))
                })?;
            tracing::info!(
                "resuming after {resumed_chunks} chunks in {} shards",
                progress.shards.len()
            );
        }
        if !cut_shards.is_empty() {
            for file in &cut_shards {
                let path = dir.join(file);
                if path.exists() {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
            atomic::write_json(&progress_path, &progress)?;
        }
        // Text bytes: those of the resumed shards, plus what this run reads past them.
        let (resumed_bytes, skipped_bytes) = (progress.text_bytes, source.chunks().text_bytes());

        let seq_len = data.seq_len as u64;
        let bar = crate::progress::bar(
            options.progress,
            source.chunks_left.map(|c| (c + resumed_chunks) * seq_len),
            "tokens",
        );
        bar.set_position(resumed_chunks * seq_len);

        let mut pending: Vec<ActivationBatch> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut new_tokens = 0u64;
        let mut bytes_written = 0u64;
        // Writes the pending batches as a shard; `read` is the data stream so far (no batch is
        // read ahead), whose text bytes and fingerprint the shard's progress entry records.
        let mut flush = |pending: &mut Vec<ActivationBatch>,
                         progress: &mut Progress,
                         read: &crate::data::ChunkStream|
         -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let text_bytes = resumed_bytes + read.text_bytes() - skipped_bytes;
            let data_read = read.fingerprint();
            let rows: usize = pending.iter().map(ActivationBatch::len).sum();
            let tokens: Vec<u32> = pending
                .iter()
                .flat_map(|b| b.tokens.iter().copied())
                .collect();
            let file = format!("shards/shard-{:06}.safetensors", progress.shards.len());
            let mut tensors = vec![(
                "tokens".to_string(),
                vec![Tensor::new(tokens.as_slice(), &Device::Cpu)?],
            )];
            for point in pending[0].activations.keys() {
                let parts = pending
                    .iter()
                    .map(|b| b.activations[point].clone())
                    .collect();
                tensors.push((names[point].clone(), parts));
            }
            // A value the stored dtype cannot hold (float16 stops at 65504) or a NaN of the
            // model is refused now, not found later by a trainer.
            for (point, parts) in tensors.iter().skip(1) {
                let mut rows_before = 0;
                for part in parts {
                    if let Some((row, value)) = first_non_finite(part, |_| true)? {
                        return Err(Error::InvalidArgument(format!(
                            "'{point}' holds {value} in sequence {} (stored as {}): {}",
                            progress.chunks + ((rows_before + row) / seq_len as usize) as u64,
                            settings.dtype,
                            "the model gave a NaN or infinity, or its activations exceed the \
                             stored dtype (float16 holds up to 65504; --store-dtype bfloat16 \
                             or float32 holds more)"
                        )));
                    }
                    rows_before += part.dim(0)?;
                }
            }
            let shard_bytes: usize = pending.iter().map(ActivationBatch::activation_bytes).sum();
            pending.clear();
            atomic::write_safetensors(&dir.join(&file), &tensors)?;
            bytes_written += shard_bytes as u64;
            progress.chunks += rows as u64 / seq_len;
            progress.after_shard.push(AfterShard {
                text_bytes,
                data_fingerprint: data_read.clone(),
            });
            progress.text_bytes = text_bytes;
            progress.data_fingerprint = data_read;
            progress.shards.push(ShardInfo {
                file,
                tokens: rows as u64,
            });
            atomic::write_json(&progress_path, progress)
        };

        while let Some(batch) = source.next_batch()? {
            new_tokens += batch.len() as u64;
            bar.inc(batch.len() as u64);
            pending_bytes += batch.activation_bytes();
            pending.push(batch);
            if pending_bytes >= options.max_shard_bytes {
                flush(&mut pending, &mut progress, source.chunks())?;
                pending_bytes = 0;
            }
            let now = CacheProgress {
                tokens: resumed_chunks * seq_len + new_tokens,
                new_tokens,
                shards: progress.shards.len(),
            };
            if let Err(error) = after_batch(&now) {
                flush(&mut pending, &mut progress, source.chunks())?;
                bar.abandon();
                return Err(error);
            }
        }
        flush(&mut pending, &mut progress, source.chunks())?;
        bar.finish_and_clear();

        if progress.chunks == 0 {
            return Err(Error::Data {
                path: data.paths.first().cloned().unwrap_or_default(),
                message: format!(
                    "the dataset yields no complete chunk of {} tokens ({} tokens in all)",
                    data.seq_len,
                    source.chunks().tokens_read()
                ),
            });
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            tokens: progress.shards.iter().map(|s| s.tokens).sum(),
            chunks: progress.chunks,
            text_bytes: progress.text_bytes,
            shards: progress.shards,
            settings,
        };
        atomic::write_json(&manifest_path, &manifest)?;
        let _ = std::fs::remove_file(&progress_path);
        Ok(CacheSummary {
            manifest,
            resumed_chunks,
            new_tokens,
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
            already_complete: false,
        })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| cache_error(path, format!("unreadable: {e}")))
}

/// Refuses a shard listing (of `listing`, for messages) that names a file outside the
/// cache folder (an absolute path, `..`) or the same file twice (read twice as data).
fn check_shard_names(listing: &Path, shards: &[ShardInfo]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for shard in shards {
        let inside = Path::new(&shard.file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(cache_error(
                listing,
                format!(
                    "shard '{}' is not a file inside the cache folder",
                    shard.file
                ),
            ));
        }
        if !seen.insert(&shard.file) {
            return Err(cache_error(
                listing,
                format!("lists shard '{}' twice", shard.file),
            ));
        }
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let manifest: Manifest = read_json(&path)?;
    check_shard_names(&path, &manifest.shards)?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(cache_error(
            &path,
            format!(
                "format '{}' version {} is not {FORMAT} version {VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    Ok(manifest)
}

/// Runs `f` on the header of shard `info` of the cache in `dir` (its data mapped, not read)
/// once the header is checked against `settings`: see [`check_layout`].
fn with_checked_shard<T>(
    dir: &Path,
    settings: &CacheSettings,
    info: &ShardInfo,
    f: impl FnOnce(&safetensors::SafeTensors<'_>) -> T,
) -> Result<T> {
    let path = dir.join(&info.file);
    let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: the map lives only inside this call; a cache's shards are not rewritten
    // while it is read (a rebuild writes new files and renames them over).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let tensors = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| cache_error(&path, format!("unreadable shard: {e}")))?;
    check_layout(settings, &path, info.tokens, |name| {
        let view = tensors.tensor(name).ok()?;
        Some((view.shape().to_vec(), DType::try_from(view.dtype()).ok()))
    })?;
    Ok(f(&tensors))
}

/// Checks a shard's tensors, found through `tensor(name) -> (shape, dtype)` (`None`: a
/// dtype candle does not read): `tokens` as `[rows]` u32, with the manifest's `rows`, and
/// each hook point as `[rows, width]` in the cache's dtype.
fn check_layout(
    settings: &CacheSettings,
    path: &Path,
    rows: u64,
    tensor: impl Fn(&str) -> Option<(Vec<usize>, Option<DType>)>,
) -> Result<()> {
    let dtype = parse_dtype(&settings.dtype)?;
    let expected = std::iter::once(("tokens", None, DType::U32)).chain(
        settings
            .hook_points
            .iter()
            .zip(&settings.widths)
            .map(|(name, &width)| (name.as_str(), Some(width), dtype)),
    );
    for (name, width, dtype) in expected {
        let (dims, found) = tensor(name)
            .ok_or_else(|| cache_error(path, format!("shard has no tensor '{name}'")))?;
        let shape: Vec<usize> = std::iter::once(rows as usize).chain(width).collect();
        if dims != shape || found != Some(dtype) {
            let found = found.map_or("an unreadable dtype".into(), |d| format!("{d:?}"));
            return Err(cache_error(
                path,
                format!(
                    "tensor '{name}' is {found} {dims:?}, but manifest.json says {shape:?} \
                     {dtype:?}"
                ),
            ));
        }
    }
    Ok(())
}

/// A complete activation cache on disk.
#[derive(Debug, Clone)]
pub struct ActivationCache {
    dir: PathBuf,
    manifest: Manifest,
    points: Vec<HookPoint>,
}

/// The order in which a cache is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOrder {
    /// Dataset order.
    Sequential,
    /// Shards in random order, rows shuffled within a buffer of `buffer_tokens` rows.
    Shuffled {
        /// Random seed: the same seed gives the same order.
        seed: u64,
        /// Rows held in memory for shuffling (bounds memory).
        buffer_tokens: usize,
    },
}

impl ActivationCache {
    /// Opens a complete cache, checking the manifest and that every shard exists.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(cache_error(dir, "no such folder"));
        }
        if !dir.join("manifest.json").is_file() {
            let message = match read_json::<Progress>(&dir.join("progress.json")) {
                Ok(p) => format!(
                    "incomplete: {} shards ({} chunks) written but no manifest.json; run the caching job again with the same settings to finish it",
                    p.shards.len(),
                    p.chunks
                ),
                Err(_) => "no manifest.json: not an activation cache, or a cache that never finished a shard".into(),
            };
            return Err(cache_error(dir, message));
        }
        let manifest = read_manifest(dir)?;
        let settings = &manifest.settings;
        if settings.widths.len() != settings.hook_points.len() {
            return Err(cache_error(
                dir,
                format!(
                    "manifest.json lists {} hook points but {} widths",
                    settings.hook_points.len(),
                    settings.widths.len()
                ),
            ));
        }
        let points = manifest
            .settings
            .hook_points
            .iter()
            .map(|name| {
                HookPoint::parse(name).ok_or_else(|| {
                    cache_error(
                        dir,
                        format!("manifest.json names unknown hook point '{name}'"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if manifest.shards.is_empty() {
            return Err(cache_error(dir, "manifest.json lists no shards"));
        }
        parse_dtype(&settings.dtype)
            .map_err(|e| cache_error(dir, format!("manifest.json dtype: {e}")))?;
        // Checked: the numbers come from a file a user may have edited.
        let shard_tokens = manifest
            .shards
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.tokens));
        let sequence_tokens = manifest.chunks.checked_mul(settings.data.seq_len as u64);
        if shard_tokens != Some(manifest.tokens) || sequence_tokens != Some(manifest.tokens) {
            let shown = |n: Option<u64>| n.map_or("more than 2^64".into(), |n| n.to_string());
            return Err(cache_error(
                dir,
                format!(
                    "manifest.json disagrees with itself: tokens {}, its shards' tokens sum to {}, \
                     and {} sequences of {} make {}",
                    manifest.tokens,
                    shown(shard_tokens),
                    manifest.chunks,
                    settings.data.seq_len,
                    shown(sequence_tokens)
                ),
            ));
        }
        for shard in &manifest.shards {
            if !dir.join(&shard.file).is_file() {
                return Err(cache_error(dir, format!("shard {} is missing", shard.file)));
            }
        }
        Ok(ActivationCache {
            dir: dir.to_path_buf(),
            manifest,
            points,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The cached hook points.
    pub fn hook_points(&self) -> &[HookPoint] {
        &self.points
    }

    /// Reads every shard's header (not its data) and checks that it covers the file and
    /// holds the tensors, shapes and dtypes the manifest describes: a truncated or foreign
    /// shard is found now rather than when a trainer reaches it.
    pub fn check_shards(&self) -> Result<()> {
        for info in &self.manifest.shards {
            self.with_checked_shard(info, |_| ())?;
        }
        Ok(())
    }

    /// Runs `f` on the header of shard `info` once it is checked against the manifest.
    fn with_checked_shard<T>(
        &self,
        info: &ShardInfo,
        f: impl FnOnce(&safetensors::SafeTensors<'_>) -> T,
    ) -> Result<T> {
        with_checked_shard(&self.dir, &self.manifest.settings, info, f)
    }

    /// A fingerprint (64-bit FNV-1a) of every token id the cache holds, in order: the text
    /// its activations were computed from. Training checkpoints record it, so that a run
    /// resumed over a cache rebuilt from other data is refused. Reads only the shards'
    /// token tensors.
    pub fn tokens_fingerprint(&self) -> Result<String> {
        let mut hash = crate::data::FNV_OFFSET;
        for info in &self.manifest.shards {
            self.with_checked_shard(info, |tensors| {
                let tokens = tensors.tensor("tokens").expect("checked");
                let ids = tokens.data().chunks_exact(4);
                hash = crate::data::fnv1a_ids(
                    hash,
                    ids.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
            })?;
        }
        Ok(format!(
            "{hash:016x} (FNV-1a of the {} tokens of the activation cache)",
            self.manifest.tokens
        ))
    }

    /// A reader yielding batches of `batch_tokens` rows (the last may be smaller).
    pub fn reader(&self, batch_tokens: usize, order: ReadOrder) -> Result<CacheReader> {
        if batch_tokens == 0 {
            return Err(Error::InvalidArgument("batch size must be positive".into()));
        }
        let mut shard_order: Vec<usize> = (0..self.manifest.shards.len()).collect();
        let rng = match order {
            ReadOrder::Sequential => None,
            ReadOrder::Shuffled { seed, .. } => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                shard_order.shuffle(&mut rng);
                Some(rng)
            }
        };
        let buffer_tokens = match order {
            ReadOrder::Sequential => batch_tokens,
            ReadOrder::Shuffled { buffer_tokens, .. } => buffer_tokens.max(batch_tokens),
        };
        Ok(CacheReader {
            cache: self.clone(),
            shard_order: shard_order.into_iter().rev().collect(),
            pool: None,
            batch_tokens,
            buffer_tokens,
            rng,
            skip_positions: 0,
            order,
            fingerprint: std::sync::OnceLock::new(),
            vocab_size: None,
        })
    }

    /// Shard `index`, without the rows at the first `skip_positions` positions of each of
    /// its sequences (shards hold whole `seq_len`-token sequences, so row `i` is at
    /// position `i % seq_len`).
    /// With `vocab_size`, a token id past it is an error that locates it.
    fn load_shard(
        &self,
        index: usize,
        skip_positions: usize,
        vocab_size: Option<usize>,
    ) -> Result<ActivationBatch> {
        let info = &self.manifest.shards[index];
        let path = self.dir.join(&info.file);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            cache_error(
                &path,
                format!("unreadable shard: {}", crate::weights::root_cause(&e)),
            )
        })?;
        check_layout(&self.manifest.settings, &path, info.tokens, |name| {
            tensors
                .get(name)
                .map(|t| (t.dims().to_vec(), Some(t.dtype())))
        })?;
        let tokens: Vec<u32> = tensors.remove("tokens").expect("checked").to_vec1()?;
        let seq_len = self.manifest.settings.data.seq_len.max(1);
        // Row `row` of this shard, as a place in the cache's data.
        let place = |row: usize| {
            let rows_before: u64 = self.manifest.shards[..index].iter().map(|s| s.tokens).sum();
            format!(
                "sequence {} of the cache, position {}",
                (rows_before + row as u64) / seq_len as u64,
                row % seq_len
            )
        };
        if let Some((row, id)) = vocab_size
            .and_then(|vocab| (tokens.iter().enumerate()).find(|(_, &id)| id as usize >= vocab))
        {
            let settings = &self.manifest.settings;
            return Err(cache_error(
                &path,
                format!(
                    "token id {id} ({}) is out of range for the model's vocabulary of {}: the \
                     cache was made with model '{}' ({})",
                    place(row),
                    vocab_size.unwrap_or_default(),
                    settings.model,
                    settings.architecture
                ),
            ));
        }
        let mut activations = BTreeMap::new();
        for (point, name) in self.points.iter().zip(&self.manifest.settings.hook_points) {
            let rows = tensors.remove(name).expect("checked");
            // A damaged shard is named here, not as a row of a shuffled batch downstream
            // (rows the reader leaves out are not checked).
            let kept = |row: usize| row % seq_len >= skip_positions;
            if let Some((row, value)) = first_non_finite(&rows, kept)? {
                return Err(cache_error(
                    &path,
                    format!("'{name}' holds {value} in row {row} ({})", place(row)),
                ));
            }
            activations.insert(*point, rows);
        }
        let batch = ActivationBatch {
            tokens,
            activations,
        };
        if skip_positions == 0 {
            return Ok(batch);
        }
        if !batch.len().is_multiple_of(seq_len) {
            return Err(cache_error(
                &path,
                format!(
                    "shard has {} rows, not whole sequences of {seq_len} tokens, so row positions are unknown",
                    batch.len()
                ),
            ));
        }
        batch.select(&rows_after_first_positions(
            batch.len(),
            seq_len,
            skip_positions,
        ))
    }
}

/// Reads a cache batch by batch, holding at most one shuffle buffer plus one shard.
pub struct CacheReader {
    cache: ActivationCache,
    /// Shards still to read, next one last.
    shard_order: Vec<usize>,
    /// Rows loaded and (when shuffling) permuted, not yet returned.
    pool: Option<ActivationBatch>,
    batch_tokens: usize,
    buffer_tokens: usize,
    rng: Option<rand::rngs::StdRng>,
    /// Positions at the start of each sequence whose rows are left out.
    skip_positions: usize,
    order: ReadOrder,
    /// [`ActivationCache::tokens_fingerprint`], read on first use (`None`: unreadable).
    fingerprint: std::sync::OnceLock<Option<String>>,
    /// Token ids must be below this (see [`CacheReader::check_tokens_below`]).
    vocab_size: Option<usize>,
}

impl CacheReader {
    /// Checks every token id read against the vocabulary of the model that will use them
    /// (as next-token targets, say): a cache of another model's data is refused, naming the
    /// shard and where in it, instead of indexing past the model's logits.
    pub fn check_tokens_below(mut self, vocab_size: usize) -> Self {
        self.vocab_size = Some(vocab_size);
        self
    }

    fn pool_len(&self) -> usize {
        self.pool.as_ref().map_or(0, ActivationBatch::len)
    }

    /// Loads shards until the pool holds `buffer_tokens` rows (or no shards remain), then
    /// permutes the pool when shuffling.
    fn refill(&mut self) -> Result<()> {
        let mut parts: Vec<ActivationBatch> = self.pool.take().into_iter().collect();
        let mut rows: usize = parts.iter().map(ActivationBatch::len).sum();
        let mut loaded = false;
        while rows < self.buffer_tokens {
            let Some(index) = self.shard_order.pop() else {
                break;
            };
            let shard = self
                .cache
                .load_shard(index, self.skip_positions, self.vocab_size)?;
            rows += shard.len();
            parts.push(shard);
            loaded = true;
        }
        if parts.is_empty() {
            return Ok(());
        }
        let mut pool = if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            ActivationBatch::concat(&parts)?
        };
        if let (Some(rng), true) = (self.rng.as_mut(), loaded) {
            let mut order: Vec<u32> = (0..pool.len() as u32).collect();
            order.shuffle(rng);
            pool = pool.select(&order)?;
        }
        self.pool = Some(pool);
        Ok(())
    }
}

impl ActivationSource for CacheReader {
    fn hook_points(&self) -> &[HookPoint] {
        &self.cache.points
    }

    /// What the cache holds (model, data, token count, dtypes), not where it lies, and the
    /// order.
    fn describe(&self) -> String {
        let order = match self.order {
            ReadOrder::Sequential => "in order".to_string(),
            // The buffer's size decides the order as much as the seed does.
            ReadOrder::Shuffled { seed, .. } => format!(
                "shuffled with seed {seed} (in a buffer of {} tokens)",
                self.buffer_tokens
            ),
        };
        let m = &self.cache.manifest;
        let data: Vec<String> = m
            .settings
            .data
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "an activation cache of model {} over {} ({} tokens) read {order} (computed in {}, stored in {})",
            m.settings.model,
            data.join(", "),
            m.tokens,
            m.settings.computed_in(),
            m.settings.dtype
        )
    }

    fn skip_first_positions(&mut self, positions: usize) -> Result<()> {
        if self.pool.is_some() || self.shard_order.len() < self.cache.manifest.shards.len() {
            return Err(Error::InvalidArgument(
                "skip the first positions before reading the cache".into(),
            ));
        }
        check_positions_to_skip(positions, self.cache.manifest.settings.data.seq_len)?;
        self.skip_positions = positions;
        Ok(())
    }

    /// The whole cache's tokens, whatever rows were read: a shuffled reader's rows are no
    /// prefix of the data, and a resumed run reads the same cache.
    fn data_fingerprint(&self, rows: u64) -> Option<String> {
        let _ = rows;
        self.fingerprint
            .get_or_init(|| self.cache.tokens_fingerprint().ok())
            .clone()
    }

    /// The cache's tokens, less the positions skipped in each sequence.
    fn rows_in_all(&self) -> Option<u64> {
        let seq_len = self.cache.manifest.settings.data.seq_len;
        let kept = seq_len.checked_sub(self.skip_positions)? as u64;
        Some(self.cache.manifest.chunks * kept)
    }

    fn next_batch(&mut self) -> Result<Option<ActivationBatch>> {
        let low_water = if self.rng.is_some() {
            self.buffer_tokens / 2
        } else {
            self.batch_tokens
        };
        if self.pool_len() < low_water.max(self.batch_tokens) && !self.shard_order.is_empty() {
            self.refill()?;
        }
        let Some(pool) = self.pool.take() else {
            return Ok(None);
        };
        if pool.len() <= self.batch_tokens {
            return Ok((!pool.is_empty()).then_some(pool));
        }
        let n = self.batch_tokens;
        let take = |t: &Tensor, start: usize, len: usize| t.narrow(0, start, len);
        let mut head = BTreeMap::new();
        let mut tail = BTreeMap::new();
        for (point, tensor) in &pool.activations {
            head.insert(*point, take(tensor, 0, n)?);
            tail.insert(*point, take(tensor, n, pool.len() - n)?);
        }
        self.pool = Some(ActivationBatch {
            tokens: pool.tokens[n..].to_vec(),
            activations: tail,
        });
        Ok(Some(ActivationBatch {
            tokens: pool.tokens[..n].to_vec(),
            activations: head,
        }))
    }
}
