//! The one error type of the library: every variant renders as one line that names the file or
//! flag at fault and what was expected.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// A configuration value (a `config.json` field, a flag) that is malformed or unsupported.
    Config(String),
    /// A file problem, with the path it concerns.
    File { path: PathBuf, message: String },
    /// A bad command-line value.
    Usage(String),
    /// The requested backend was not compiled in, or is not available here.
    Backend(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// Puts a path in front of a config error (which file the field came from).
    pub fn in_file(self, path: impl AsRef<Path>) -> Self {
        match self {
            Error::Config(m) => Error::file(path, m),
            other => other,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(m) | Error::Usage(m) | Error::Backend(m) => f.write_str(m),
            Error::File { path, message } => write!(f, "{}: {message}", path.display()),
        }
    }
}

impl std::error::Error for Error {}

impl From<fewstep_schedulers::ConfigError> for Error {
    fn from(e: fewstep_schedulers::ConfigError) -> Self {
        Error::Config(e.0)
    }
}
