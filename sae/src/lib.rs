//! TopK sparse autoencoders (Gao et al. 2024) compatible with EleutherAI's `sparsify`:
//! the same parameters, `cfg.json` + `sae.safetensors` files, encoder, decoder and FVU.
//!
//! Flow: [`SaeConfig`] (what `cfg.json` says) -> [`Sae`] (parameters, encode / decode /
//! forward, files) -> [`train`] (FVU objective, optional AuxK and Multi-TopK, hand-written
//! sparse gradients, decoder norm constraint, Adam with sparsify's schedule, dead-latent
//! tracking, checkpoints) over an activation source from the hook runtime (a model run or
//! an activation cache; [`train::train_many`] trains one SAE per hook point in one pass) ->
//! [`cli`] (the `sae train` / `sae eval` command line, also behind Python's `sae` script).
//!
//! [`Sae::load`] also reads SAELens SAEs (`sae_weights.safetensors`: TopK, ReLU or
//! JumpReLU, see [`Sae::load_sae_lens`]) for inference and evaluation.
//!
//! candle has no TopK: the CPU path uses the kernels in `kernels` (rows in parallel,
//! partial selection, sparse decode of the `k` chosen decoder rows); on a CUDA device (the
//! `cuda` feature) our own kernels in [`cuda`] do the same; other devices and dtypes fall
//! back to generic tensor ops (sort-based TopK, which is slow and, on CUDA, limited to rows
//! of about 8k latents by candle's bitonic sort).

pub mod cli;
pub mod cuda;
pub mod hub;
mod kernels;
mod sae;
pub mod train;

pub use sae::{
    fvu, natural_order, sae_folder_names, sae_folders, Activation, ForwardOutput, Sae, SaeConfig,
};

/// Errors of SAE files, inference and training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the hook runtime (activations, files).
    #[error(transparent)]
    Hooks(#[from] hooks::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A bad SAE file, config or argument (the message names the file, tensor or field).
    #[error("{0}")]
    Sae(String),
    /// An SAE file or folder that is not there (the message names it).
    #[error("{0}")]
    NotFound(String),
    /// Training stopped (bad options, data ran out, non-finite loss).
    #[error("{0}")]
    Training(String),
    /// The CUDA kernels could not be compiled or launched.
    #[error("{0}")]
    Cuda(String),
}

/// The largest number of active latents the GPU's TopK kernel selects per token.
pub const GPU_MAX_K: usize = 4096;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The `k` largest entries of each row of `x: [N, n]`: `(values [N, k], indices [N, k] u32)`
/// by decreasing value, equal values by increasing index. candle has no TopK: this runs our
/// kernels on the CPU (f32) and on CUDA devices (f32 and bf16, rows of any width), and a
/// sort elsewhere.
pub fn topk(
    x: &candle_core::Tensor,
    k: usize,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let (_, n) = x
        .dims2()
        .map_err(|_| Error::Sae(format!("topk needs a 2-D tensor, got shape {:?}", x.dims())))?;
    if k == 0 || k > n {
        return Err(Error::Sae(format!(
            "topk: k must be between 1 and the row width {n}, got {k}"
        )));
    }
    kernels::topk(x, k)
}

/// Seeded test data (candle's own `randn` on the CPU cannot be seeded).
#[cfg(test)]
pub(crate) fn uniform(
    shape: &[usize],
    center: f32,
    half_width: f32,
    seed: u64,
) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| center + rng.random_range(-half_width..half_width))
        .collect();
    candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap()
}
