//! The master key, scopes and the keys derived from them.
//!
//! ```text
//! master (32 random bytes, a 0600 file)
//!  ├─ shared scope secret = derive_key("… shared scope", master)
//!  ├─ owner scope secret  = keyed_hash(derive_key("… owner scope", master), owner id)
//!  └─ owner tag           = "o-" + hex(keyed_hash(derive_key("… owner tag", master), owner id))[..32]
//! scope secret
//!  ├─ chunk secret  = derive_key("… chunk key", scope secret)    chunk key = keyed_hash(chunk secret, plaintext)
//!  └─ manifest key  = derive_key("… manifest key", scope secret) seals the scope's manifests
//! ```
//!
//! Every step is a BLAKE3 key derivation with its own context string, so no two derived keys
//! coincide and none reveals the master.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use rand::TryRngCore;
use rand::rngs::OsRng;

use crate::error::StoreError;

const CTX_SHARED: &str = "hearth-store 2025-01 shared scope secret v1";
const CTX_OWNER: &str = "hearth-store 2025-01 owner scope secret v1";
const CTX_OWNER_TAG: &str = "hearth-store 2025-01 owner scope tag v1";
const CTX_CHUNK: &str = "hearth-store 2025-01 chunk key secret v1";
const CTX_MANIFEST: &str = "hearth-store 2025-01 manifest key v1";

/// Longest owner id accepted, in bytes.
pub const MAX_OWNER_LEN: usize = 1024;

/// Who an artifact belongs to, which decides the keys it is encrypted under.
///
/// Identical plaintext deduplicates only within one scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Platform-wide (runtime images): one secret, so identical chunks dedupe across every
    /// function and tenant.
    Shared,
    /// One owner (a tenant or a function): function code and snapshots. Identical chunks of two
    /// owners give unrelated ciphertexts.
    Owner(String),
}

/// The platform's master key, from which every scope's keys derive. Cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    master: Arc<[u8; 32]>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets(..)")
    }
}

impl Secrets {
    /// Uses a given master key.
    pub fn from_master_key(master: [u8; 32]) -> Self {
        Secrets {
            master: Arc::new(master),
        }
    }

    /// A fresh random master key (tests, throw-away stores).
    pub fn generate() -> Result<Self, StoreError> {
        let mut master = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut master)
            .map_err(|e| StoreError::io("<os random>", std::io::Error::other(e.to_string())))?;
        Ok(Self::from_master_key(master))
    }

    /// Reads the 32-byte master key from `path`, creating it (random, mode 0600) if missing.
    ///
    /// Creation is atomic: the key is written to a temporary file and hard-linked into place,
    /// so two processes racing to create it end up with the same key, and nobody reads a
    /// half-written file.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        match std::fs::read(path) {
            Ok(bytes) => return Self::from_file_bytes(path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(path, e)),
        }
        let secrets = Self::generate()?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{file_name}.tmp-{}", rand::random::<u64>()));
        let write_tmp = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(secrets.master.as_ref())?;
            f.sync_all()
        };
        let linked = write_tmp().and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(secrets)
            }
            // Someone else created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
                Self::from_file_bytes(path, &bytes)
            }
            Err(e) => Err(StoreError::io(path, e)),
        }
    }

    fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<Self, StoreError> {
        let master: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Secrets {
            path: path.to_owned(),
            reason: format!("expected 32 bytes, found {}", bytes.len()),
        })?;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "master key file is readable by group or others"
                );
            }
        }
        Ok(Self::from_master_key(master))
    }

    /// The keys of one scope.
    pub(crate) fn scope_keys(&self, scope: &Scope) -> Result<ScopeKeys, StoreError> {
        let master = self.master.as_ref();
        let (tag, secret) = match scope {
            Scope::Shared => ("shared".to_owned(), blake3::derive_key(CTX_SHARED, master)),
            Scope::Owner(owner) => {
                if owner.is_empty() || owner.len() > MAX_OWNER_LEN {
                    return Err(StoreError::InvalidName {
                        name: owner.chars().take(MAX_OWNER_LEN).collect(),
                        reason: "owner id must be 1 to 1024 bytes",
                    });
                }
                let secret_key = blake3::derive_key(CTX_OWNER, master);
                let tag_key = blake3::derive_key(CTX_OWNER_TAG, master);
                let secret = *blake3::keyed_hash(&secret_key, owner.as_bytes()).as_bytes();
                let tag = blake3::keyed_hash(&tag_key, owner.as_bytes()).to_hex();
                (format!("o-{}", &tag[..32]), secret)
            }
        };
        Ok(ScopeKeys {
            tag,
            chunk_secret: blake3::derive_key(CTX_CHUNK, &secret),
            manifest_key: blake3::derive_key(CTX_MANIFEST, &secret),
        })
    }
}

/// The keys of one scope.
#[derive(Clone)]
pub(crate) struct ScopeKeys {
    /// Directory name of the scope under `manifests/` and `refs/`.
    pub(crate) tag: String,
    /// Key of the keyed hash that gives a chunk's key from its plaintext.
    pub(crate) chunk_secret: [u8; 32],
    /// Seals and opens the scope's manifests.
    pub(crate) manifest_key: [u8; 32],
}

impl fmt::Debug for ScopeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeKeys")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_derive_distinct_keys() {
        let s = Secrets::from_master_key([7; 32]);
        let shared = s.scope_keys(&Scope::Shared).unwrap();
        let a = s.scope_keys(&Scope::Owner("a".into())).unwrap();
        let b = s.scope_keys(&Scope::Owner("b".into())).unwrap();
        assert_eq!(shared.tag, "shared");
        assert!(a.tag.starts_with("o-") && a.tag.len() == 34);
        assert_ne!(a.tag, b.tag);
        let all = [&shared, &a, &b];
        for (i, x) in all.iter().enumerate() {
            assert_ne!(x.chunk_secret, x.manifest_key);
            for y in &all[i + 1..] {
                assert_ne!(x.chunk_secret, y.chunk_secret);
                assert_ne!(x.manifest_key, y.manifest_key);
            }
        }
        // Deterministic for one master, different under another.
        let a2 = s.scope_keys(&Scope::Owner("a".into())).unwrap();
        assert_eq!(a.chunk_secret, a2.chunk_secret);
        let other = Secrets::from_master_key([8; 32]);
        let a3 = other.scope_keys(&Scope::Owner("a".into())).unwrap();
        assert_ne!(a.chunk_secret, a3.chunk_secret);
        assert_ne!(a.tag, a3.tag);
        assert!(s.scope_keys(&Scope::Owner(String::new())).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let s1 = Secrets::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let s2 = Secrets::load_or_create(&path).unwrap();
        assert_eq!(s1.master, s2.master);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("master.key")]);

        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            Secrets::load_or_create(&path),
            Err(StoreError::Secrets { .. })
        ));
    }
}
