//! Logit lens and tuned lens (Belrose et al. 2023) on the hook runtime: train translators
//! with the reference recipe, evaluate lenses per layer, save and load them (our format and
//! tuned-lens's `params.pt`).
//!
//! Flow: [`TunedLens`] (parameters, files) -> [`loss`] (objective and its hand-written
//! gradient) -> [`train`] (optimiser loop over an activation source, checkpoints) ->
//! [`eval`] (per-layer metrics) -> [`cli`] (`lens train`, `lens eval`, `lens sweep`,
//! `lens plot`).

pub mod cli;
pub mod cuda;
mod decode;
pub mod eval;
pub mod hub;
mod kernels;
pub mod loss;
pub mod plot;
mod source;
pub mod sweep;
pub mod train;
pub mod trajectory;
mod tuned_lens;

pub use decode::DecodeDtype;
pub use source::{default_seq_len, LensData};
pub use tuned_lens::{lens_input, unembedding_hash, LensConfig, TunedLens, UNEMBED_HASH_PREFIX};

/// Errors of lens training, evaluation and files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the hook runtime (model, data, activations, files).
    #[error(transparent)]
    Hooks(#[from] hooks::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A lens file or a lens that does not fit the model.
    #[error("{0}")]
    Lens(String),
    /// Training stopped (data ran out, non-finite loss, a checkpoint from another run).
    #[error("{0}")]
    Training(String),
    /// Training options that cannot work, named with their values.
    #[error("{0}")]
    Options(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
