//! The one error type of the store.

use std::path::PathBuf;
use std::sync::Arc;

use crate::manifest::ChunkId;

/// Everything that can go wrong in the store.
///
/// The type is `Clone` (sources are kept behind `Arc`) so that one failed fetch can be handed to
/// every reader that waited on it.
///
/// What the caller should do: [`StoreError::NotFound`], [`StoreError::InvalidName`] and
/// [`StoreError::Tampered`] are final; [`StoreError::Origin`] and [`StoreError::Io`] may be
/// transient (retry); [`StoreError::Corrupt`] and [`StoreError::MissingChunk`] mean the stored
/// data is damaged or was collected while still in use, and retrying will not help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No manifest by that name in that scope.
    #[error("manifest {name} not found")]
    NotFound {
        /// The manifest name.
        name: String,
    },
    /// A chunk the manifest names is not in the origin.
    #[error("chunk {chunk} is missing from the origin")]
    MissingChunk {
        /// The missing chunk.
        chunk: ChunkId,
    },
    /// A chunk failed verification (ciphertext hash, AEAD tag, plaintext key or length).
    #[error("chunk {chunk} is corrupt")]
    Corrupt {
        /// The corrupt chunk.
        chunk: ChunkId,
    },
    /// A manifest failed to open: modified, truncated, moved to another name, or sealed under
    /// another scope.
    #[error("manifest {name} failed to open (tampered with, or sealed under another scope)")]
    Tampered {
        /// The manifest name.
        name: String,
    },
    /// A manifest name or owner id that the store does not accept.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The master-key file is unusable.
    #[error("secrets file {path}: {reason}")]
    Secrets {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Local file system error (cache, source or destination files, key file).
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Error from the origin object store.
    #[error("origin: {0}")]
    Origin(#[source] Arc<object_store::Error>),
    /// The collector found a state it cannot reason about safely (for example a manifest without
    /// a ref list) and swept nothing.
    #[error("store is inconsistent: {0}")]
    Inconsistent(String),
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        StoreError::Origin(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Task(e.to_string())
    }
}
