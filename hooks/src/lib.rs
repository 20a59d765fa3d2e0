//! The hook runtime of eleuther-interp: run Pythia / GPT-NeoX (and Llama-family) models on
//! candle, read or replace the tensor at any hook point, and cache activations over a dataset
//! to disk or stream them to a trainer.
//!
//! The flow follows the modules: [`source`] (where weights come from) -> [`config`] (what the
//! model is) -> [`Model`] (the forward pass) -> [`HookPoint`] / [`Hooks`] (what to read or
//! edit) -> [`data`] (text to token chunks) -> [`activations`] (batches of hook-point tensors,
//! cached or streamed).

pub mod activations;
pub mod atomic;
pub mod chat_template;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod cuda_kernels;
pub mod data;
pub mod digest;
mod error;
pub mod fetch;
mod gguf;
mod hookpoint;
mod hooks;
pub mod memory;
mod model;
pub mod optim;
pub mod progress;
pub mod sampling;
pub mod source;
pub mod synthetic;
mod tokenizer;
mod unembed;
pub mod weights;

pub use error::{Error, Result};
pub use gguf::{gguf_header, gguf_tokenizer, GGUF_ARCHITECTURES};
pub use hookpoint::{AttentionName, HookPoint};
pub use hooks::{ForwardOutput, Hooks, ReplaceFn};
pub use model::{
    dtype_name, parse_device, parse_dtype, GenerateOptions, KvCache, LoadOptions, Model,
};
pub use tokenizer::Tokenizer;
pub use unembed::{FinalNorm, Unembedding};

pub use candle_core;
