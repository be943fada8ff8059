//! The library's error type.
//!
//! Policy: every error names what failed and where (which object, which file, which snapshot),
//! because the person reading it is an on-call engineer who cannot attach a debugger. Errors
//! that an operator must react to differently have their own variant, and each variant maps to
//! one documented process exit code ([`Error::exit_code`]); the binaries never invent codes.
//! Secrets never appear in an error: only object names, paths and counts do.

use std::path::PathBuf;

/// Result type of the kluis library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Process exit codes, documented in the README. They are API: scripts depend on them.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any failure not listed below.
    pub const FAILURE: i32 = 1;
    /// Bad command line or configuration.
    pub const USAGE: i32 = 2;
    /// The backup was committed, but some files could not be read.
    pub const INCOMPLETE: i32 = 3;
    /// The source failed (a dump tool's error, a database that is down, a command's non-zero
    /// exit); nothing was committed.
    pub const SOURCE_FAILED: i32 = 4;
    /// The restore target (a database server, its tools) failed or refused the data.
    pub const TARGET_FAILED: i32 = 5;
    /// A restore drill ran and failed one of its checks (its report says which).
    pub const DRILL_FAILED: i32 = 6;
    /// No repository at the given location.
    pub const NO_REPOSITORY: i32 = 10;
    /// No key slot opens with the given password or key file.
    pub const WRONG_PASSWORD: i32 = 12;
    /// Data in the repository is corrupt or has been tampered with.
    pub const CORRUPT: i32 = 13;
    /// The key is write-only, and the command needs to read what it cannot.
    pub const WRITE_ONLY: i32 = 14;
    /// Interrupted by SIGINT or SIGTERM.
    pub const INTERRUPTED: i32 = 130;
}

/// Everything that can go wrong in the kluis library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no kluis repository at {location} (run `kluis init` first, or check --repo)")]
    RepositoryNotFound { location: String },

    #[error("a repository already exists at {location}")]
    RepositoryExists { location: String },

    #[error(
        "wrong password or key file: none of the {slots} key slot(s) of {location} opens with it"
    )]
    WrongPassword { location: String, slots: usize },

    #[error("{object}: corrupt or tampered data: {detail}")]
    Corrupt { object: String, detail: String },

    #[error(
        "{object}: format version {found} is newer than this kluis supports (version {supported}); upgrade kluis to read this repository"
    )]
    NewerFormat {
        object: String,
        found: u32,
        supported: u32,
    },

    #[error("blob {0} is not in the index")]
    MissingBlob(crate::id::BlobId),

    #[error("{object}: object is missing from the repository")]
    MissingObject { object: String },

    #[error("storage {operation} of {object} failed: {source}")]
    Store {
        operation: &'static str,
        object: String,
        /// Boxed: object_store's error is large and `Error` travels in every `Result`.
        #[source]
        source: Box<object_store::Error>,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: secret file is accessible by group or others (mode {mode:04o}); run `chmod 600` on it",
        path.display()
    )]
    InsecureSecretFile { path: PathBuf, mode: u32 },

    #[error(
        "{}: secret file belongs to uid {owner}, not to this user (uid {user}) or root: whoever owns it can replace the secret; `chown` it",
        path.display()
    )]
    SecretFileOwner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },

    #[error("no snapshot matches {0}")]
    SnapshotNotFound(String),

    #[error("snapshot id prefix {prefix} is ambiguous: it matches {matches}")]
    AmbiguousSnapshot { prefix: String, matches: String },

    #[error("{0}")]
    InvalidInput(String),

    /// A source (a dump tool, a command, a database) failed; nothing was committed.
    #[error("{0}; no snapshot was committed")]
    SourceFailed(String),

    /// The restore target (a database) refused the data; the message quotes its tool.
    #[error("{0}")]
    TargetFailed(String),

    /// Another process's work collides with this one (a prune that condemned data a backup
    /// reused, a prune already running); nothing was changed, and running again resolves it.
    #[error("{0}")]
    Conflict(String),

    /// The key that opened this object was destroyed by `kluis erase`: on purpose, the data
    /// cannot be recovered. The message names the object, the epoch and the erasure.
    #[error("{0}")]
    KeyDestroyed(String),

    /// The repository was opened with a write-only key slot, which backs up and reads
    /// nothing it did not write (docs/FORMAT.md §3.5).
    #[error("this key is write-only: it cannot {0} (it can only back up); use a full key")]
    WriteOnly(String),

    #[error("check found {0} problem(s) in the repository")]
    CheckFailed(usize),

    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// A database client's failure while kluis restores into (or prepares) a database: the
    /// same message, as the restore target's failure rather than a backup source's.
    pub fn on_target(self) -> Error {
        match self {
            Error::SourceFailed(m) => Error::TargetFailed(m),
            e => e,
        }
    }

    /// The process exit code an operator's script sees for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::RepositoryNotFound { .. } => exit::NO_REPOSITORY,
            Error::WrongPassword { .. } => exit::WRONG_PASSWORD,
            Error::Corrupt { .. }
            | Error::MissingObject { .. }
            | Error::MissingBlob(_)
            | Error::CheckFailed(_) => exit::CORRUPT,
            Error::Interrupted => exit::INTERRUPTED,
            Error::SourceFailed(_) => exit::SOURCE_FAILED,
            Error::TargetFailed(_) => exit::TARGET_FAILED,
            Error::WriteOnly(_) => exit::WRITE_ONLY,
            Error::InvalidInput(_)
            | Error::InsecureSecretFile { .. }
            | Error::SecretFileOwner { .. } => exit::USAGE,
            _ => exit::FAILURE,
        }
    }

    pub(crate) fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            object: object.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidInput(message.into())
    }
}

/// Finds the exit code for an error chain built with `anyhow` at a binary's edge.
pub fn exit_code_of(error: &(dyn std::error::Error + 'static)) -> i32 {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(kluis) = e.downcast_ref::<Error>() {
            return kluis.exit_code();
        }
        current = e.source();
    }
    exit::FAILURE
}
