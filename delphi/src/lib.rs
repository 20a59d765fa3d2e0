//! Delphi-style automated interpretability (Paulo et al. 2024) for SAE latents: find where
//! each latent fires, ask a language model to explain it in words, then score that
//! explanation by how well a model can predict the latent's activity from it.
//!
//! Flow: [`latents`] (sparse latent cache on disk) -> [`examples`] (context windows:
//! explainer set, disjoint test set, non-activating set) -> [`prompts`] (message lists and
//! answer parsing) -> [`llm`] (OpenAI-compatible HTTP or local GGUF) -> [`explain`] ->
//! [`score`] (detection, fuzzing, embedding, intruder, simulation; [`metrics`]) -> [`job`] (resumable,
//! shardable batch runs) -> [`cli`] (`delphi cache`, `delphi run`, `delphi summary`).

pub mod cli;
pub mod embedding;
pub mod examples;
pub mod explain;
pub mod job;
pub mod latents;
pub mod llm;
pub mod metrics;
pub mod prompts;
pub mod score;

/// Errors of latent caching, example building, LLM calls and jobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the hook runtime (model, data, files).
    #[error(transparent)]
    Hooks(#[from] hooks::Error),
    /// From the SAE crate (loading, encoding).
    #[error(transparent)]
    Sae(#[from] sae::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong (in the message already, so not a `source()`: `{:#}` chains
        /// would print it twice).
        cause: std::io::Error,
    },
    /// A file whose content is not what it should be (the message names the field or tensor).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A request to a language model failed for good (refused, or answered in a way no
    /// retry would change).
    #[error("{backend}: {message}")]
    Llm {
        /// The backend (URL or model file).
        backend: String,
        /// What went wrong.
        message: String,
    },
    /// A language model kept failing transiently (down, overloaded, timing out) until the
    /// retries ran out.
    #[error("{backend}: {message}")]
    Unreachable {
        /// The backend (URL).
        backend: String,
        /// The last failure.
        message: String,
    },
    /// A language model answers, but cannot serve the job as it was set up (a vLLM server
    /// running another model than the tokenizer given): every request would fail alike.
    #[error("{backend}: {message}")]
    Unusable {
        /// The backend (URL).
        backend: String,
        /// What does not fit.
        message: String,
    },
    /// Bad options or arguments.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<std::path::PathBuf>, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause,
        }
    }
    /// A malformed file.
    pub fn file(path: impl Into<std::path::PathBuf>, message: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
