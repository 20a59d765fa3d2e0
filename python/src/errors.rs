//! How `hooks` errors become Python exceptions: the message is always the Rust error's
//! `Display`; the class tells what kind of mistake it was.
//!
//! | `hooks::Error` | Python |
//! | --- | --- |
//! | `UnknownHookPoint`, `TokenOutOfRange`, `InvalidArgument`, `Config`, `BadWeight` | `ValueError` |
//! | `ModelNotFound`, `NotCached`, `NotOnHub`, `Io` (not found), missing data / cache / tokenizer files | `FileNotFoundError` |
//! | `Io` (already exists: a file where a folder is written) | `FileExistsError` |
//! | everything else | `RuntimeError` |

use pyo3::exceptions::{PyFileExistsError, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

use hooks::Error;

/// The Python exception class a `hooks` error maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `ValueError`: a bad argument (name, id, value, config).
    Value,
    /// `FileNotFoundError`: a model, file or folder that does not exist.
    NotFound,
    /// `FileExistsError`: a file in the way of one to be written.
    Exists,
    /// `RuntimeError`: anything else.
    Runtime,
}

/// Classifies a `hooks` error.
pub fn error_kind(error: &Error) -> ErrorKind {
    match error {
        Error::UnknownHookPoint { .. }
        | Error::TokenOutOfRange { .. }
        | Error::InvalidArgument(_)
        | Error::Config { .. }
        | Error::BadWeight { .. } => ErrorKind::Value,
        Error::ModelNotFound { .. } | Error::NotCached { .. } | Error::NotOnHub { .. } => {
            ErrorKind::NotFound
        }
        Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
            ErrorKind::NotFound
        }
        Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::AlreadyExists => {
            ErrorKind::Exists
        }
        Error::Data { message, .. } | Error::Cache { message, .. }
            if message == "file not found" || message == "no such folder" =>
        {
            ErrorKind::NotFound
        }
        Error::Tokenizer(message) if message.ends_with(": file not found") => ErrorKind::NotFound,
        _ => ErrorKind::Runtime,
    }
}

/// The Python exception for a `hooks` error, with the error's `Display` as its message.
pub fn to_py_err(error: Error) -> PyErr {
    let message = error.to_string();
    match error_kind(&error) {
        ErrorKind::Value => PyValueError::new_err(message),
        ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
        ErrorKind::Exists => PyFileExistsError::new_err(message),
        ErrorKind::Runtime => PyRuntimeError::new_err(message),
    }
}

/// Converts `hooks` results (and anything convertible into `hooks::Error`) to `PyResult`.
pub trait IntoPyResult<T> {
    /// The value, or the mapped Python exception.
    fn into_py_result(self) -> pyo3::PyResult<T>;
}

impl<T, E: Into<Error>> IntoPyResult<T> for Result<T, E> {
    fn into_py_result(self) -> pyo3::PyResult<T> {
        self.map_err(|e| to_py_err(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let value = Error::InvalidArgument("x".into());
        assert_eq!(error_kind(&value), ErrorKind::Value);
        let token = Error::TokenOutOfRange {
            token: 9,
            position: 0,
            vocab_size: 5,
        };
        assert_eq!(error_kind(&token), ErrorKind::Value);
        let missing = Error::ModelNotFound {
            spec: "m".into(),
            message: "gone".into(),
        };
        assert_eq!(error_kind(&missing), ErrorKind::NotFound);
        let io = Error::io("/nope", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(error_kind(&io), ErrorKind::NotFound);
        let denied = Error::io(
            "/nope",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(error_kind(&denied), ErrorKind::Runtime);
        let exists = Error::io(
            "/x",
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        );
        assert_eq!(error_kind(&exists), ErrorKind::Exists);
        let data = Error::Data {
            path: "/x.txt".into(),
            message: "file not found".into(),
        };
        assert_eq!(error_kind(&data), ErrorKind::NotFound);
        assert_eq!(
            error_kind(&Error::Tokenizer("bad".into())),
            ErrorKind::Runtime
        );
    }
}
