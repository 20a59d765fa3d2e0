//! One error type for everything the hook runtime can refuse, each variant naming the
//! file, field or value at fault so the user knows what to fix.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while resolving, loading or running a model, or reading
/// and writing data and activation caches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error (in the message already, so not a `source()`:
        /// `{:#}` chains would print it twice).
        cause: std::io::Error,
    },

    /// A model's config.json (or GGUF metadata) is missing a field or has a bad value.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },

    /// The model name does not resolve to a folder, a file or a hub repository.
    #[error("model '{spec}': {message}")]
    ModelNotFound {
        /// What the user asked for.
        spec: String,
        /// Why it could not be resolved.
        message: String,
    },

    /// A hub repository's files (a model's, SAEs', a lens's) are needed but not in the local
    /// cache, and downloading is off or failed.
    #[error(
        "hub repository '{model}' (revision '{revision}') is not in the Hugging Face cache at {}{}",
        cache_dir.display(),
        reason.as_deref().map(|r| format!(" and could not be downloaded: {r}")).unwrap_or_else(|| " and HF_HUB_OFFLINE is set".into())
    )]
    NotCached {
        /// Hub repository id.
        model: String,
        /// Branch, tag or commit.
        revision: String,
        /// The cache folder that was searched.
        cache_dir: PathBuf,
        /// The download error, when a download was tried.
        reason: Option<String>,
    },

    /// Files asked for that a hub repository does not hold at that revision.
    #[error("hub repository '{repo}' (revision '{revision}') has no {}", missing.join(", "))]
    NotOnHub {
        /// The repository as its URL names it (`owner/name`, `spaces/owner/name`).
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// The paths it lacks.
        missing: Vec<String>,
    },

    /// A weight file is unreadable, truncated or not a weight file.
    #[error("weights {path}: {message}")]
    WeightFile {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor the architecture needs is absent from the weight files.
    #[error("weight '{name}' is missing from {files}")]
    MissingWeight {
        /// Tensor name.
        name: String,
        /// The files searched.
        files: String,
    },

    /// A weight tensor has the wrong shape or a non-float dtype.
    #[error("weight '{name}': {message}")]
    BadWeight {
        /// Tensor name.
        name: String,
        /// Expected versus found.
        message: String,
    },

    /// A hook point name that the model does not have.
    #[error("unknown hook point '{name}'; valid hook points: {valid}")]
    UnknownHookPoint {
        /// The name given.
        name: String,
        /// The model's hook points, comma separated.
        valid: String,
    },

    /// A token id at or beyond the model's vocabulary size.
    #[error(
        "token id {token} at position {position} is out of range for a vocabulary of {vocab_size}"
    )]
    TokenOutOfRange {
        /// The offending id.
        token: i64,
        /// Its flat position in the input.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A dataset file is malformed or yields no usable tokens.
    #[error("data {path}: {message}")]
    Data {
        /// The dataset file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// An activation cache is incomplete, corrupt or does not match the request.
    #[error("activation cache {path}: {message}")]
    Cache {
        /// The cache folder or shard.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// An argument is out of range or inconsistent with others.
    #[error("{0}")]
    InvalidArgument(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Our CUDA kernels could not be compiled or launched.
    #[error("{0}")]
    Cuda(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

/// Why `path`, which should be a file, is not one: a folder, or nothing.
pub(crate) fn not_a_file(path: &std::path::Path) -> &'static str {
    if path.is_dir() {
        "is a folder, not a file"
    } else {
        "file not found"
    }
}

/// Runs `work` (a third-party parser given a damaged file) and turns a panic in it into
/// `Err` with the panic's message, without the panic being printed: a bad input file is an
/// error, never a crash. Other threads' panics are printed as before.
pub(crate) fn without_panicking<T>(work: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::cell::Cell;
    use std::sync::Once;
    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // try_with: a panic while a thread's locals are torn down must not abort.
            if !QUIET.try_with(Cell::get).unwrap_or(false) {
                previous(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    QUIET.with(|quiet| quiet.set(false));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::without_panicking(|| 7), Ok(7));
        let divisor = std::hint::black_box(0u64);
        assert_eq!(
            super::without_panicking(|| 1 / divisor),
            Err("attempt to divide by zero".to_string())
        );
    }
}
