//! Manifests, chunk references, names and where things live in the origin.
//!
//! Origin layout (all under the origin's root):
//!
//! ```text
//! chunks/<first two hex digits of id>/<id>   ciphertext of one chunk, id = hex(blake3(ciphertext))
//! manifests/<scope tag>/<name>               sealed manifest (magic, nonce, AES-256-GCM-SIV)
//! refs/<scope tag>/<name>                    plain ref list: the manifest's chunk ids, one a line
//! ```
//!
//! The scope tag is `shared` or `o-` followed by a keyed hash of the owner id, so a listing of
//! the origin does not reveal owner ids.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::CHUNK_SIZE;
use crate::error::StoreError;

/// Longest manifest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// Name of a stored chunk: the BLAKE3 hash of its ciphertext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of a ciphertext.
    pub fn of_ciphertext(ciphertext: &[u8]) -> Self {
        ChunkId(*blake3::hash(ciphertext).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Error parsing a [`ChunkId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a chunk id (64 lower-case hex digits): {0:?}")]
pub struct ParseChunkIdError(String);

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower_hex = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut out = [0u8; 32];
        if !lower_hex || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(ParseChunkIdError(s.chars().take(80).collect()));
        }
        Ok(ChunkId(out))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The key a chunk is encrypted under: the keyed BLAKE3 hash of its plaintext under the scope's
/// chunk secret. Knowing it lets one decrypt the chunk, so it lives only in sealed manifests.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey(pub [u8; 32]);

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

impl Serialize for ChunkKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ChunkKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(ChunkKey(out))
    }
}

/// One chunk of an artifact, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// Where the ciphertext is stored.
    pub id: ChunkId,
    /// The key that decrypts it (and the keyed hash its plaintext must have).
    pub key: ChunkKey,
    /// Plaintext length: [`CHUNK_SIZE`] for all but the last chunk.
    pub len: u32,
}

/// An artifact: its chunks in order, its length and free-form metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Total plaintext length in bytes.
    pub size: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// Caller metadata (for example what a snapshot depends on).
    pub meta: BTreeMap<String, String>,
}

/// The serialized form: a version number around the manifest.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestEnvelope {
    pub(crate) v: u32,
    pub(crate) manifest: Manifest,
}

pub(crate) const MANIFEST_FORMAT: u32 = 1;

impl Manifest {
    /// Checks the chunk lengths against the fixed chunking: every chunk but the last is exactly
    /// [`CHUNK_SIZE`], the last is 1..=[`CHUNK_SIZE`], and they add up to `size`.
    pub fn is_well_formed(&self) -> bool {
        let n = self.chunks.len();
        let mut total: u64 = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            let len = c.len as usize;
            let ok = if i + 1 < n {
                len == CHUNK_SIZE
            } else {
                (1..=CHUNK_SIZE).contains(&len)
            };
            if !ok {
                return false;
            }
            total += u64::from(c.len);
        }
        total == self.size
    }

    /// The distinct chunk ids, sorted: the content of the ref list.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.chunks.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// What a put stored, or what a get read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// The manifest name.
    pub name: String,
    /// Artifact length in bytes.
    pub size: u64,
    /// Number of chunks in the manifest.
    pub chunks: usize,
    /// Chunks this put uploaded that the origin did not have (0 for reads).
    pub new_chunks: usize,
    /// Ciphertext bytes this put added to the origin (0 for reads).
    pub new_bytes: u64,
    /// The manifest's metadata.
    pub meta: BTreeMap<String, String>,
}

/// Checks a manifest name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._/-]`, `/`-separated
/// segments that are neither empty nor `.` or `..` (so no leading, trailing or doubled `/`).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let fail = |reason| {
        Err(StoreError::InvalidName {
            name: name.chars().take(MAX_NAME_LEN).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("too long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        return fail("only A-Z a-z 0-9 . _ / - are allowed");
    }
    if name.starts_with('/') {
        return fail("leading /");
    }
    for seg in name.split('/') {
        match seg {
            "" => return fail("empty path segment"),
            "." | ".." => return fail("`.` and `..` segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a string that could start a valid name.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    // A prefix may end in `/` ("fn/") or in a partial segment ("fn/ab"); check it as a name
    // with a placeholder completing the last segment.
    validate_name(&format!("{prefix}x")).map_err(|e| match e {
        StoreError::InvalidName { reason, .. } => StoreError::InvalidName {
            name: prefix.to_owned(),
            reason,
        },
        other => other,
    })
}

pub(crate) const CHUNKS_DIR: &str = "chunks";
pub(crate) const MANIFESTS_DIR: &str = "manifests";
pub(crate) const REFS_DIR: &str = "refs";

/// Where a chunk's ciphertext is stored.
pub fn chunk_path(id: &ChunkId) -> ObjectPath {
    let hex = id.to_hex();
    ObjectPath::from(format!("{CHUNKS_DIR}/{}/{hex}", &hex[..2]))
}

/// Where the sealed manifest `name` of scope `tag` is stored (`name` must be valid).
pub fn manifest_path(tag: &str, name: &str) -> ObjectPath {
    ObjectPath::from(format!("{MANIFESTS_DIR}/{tag}/{name}"))
}

/// Where the ref list of manifest `name` of scope `tag` is stored (`name` must be valid).
pub fn refs_path(tag: &str, name: &str) -> ObjectPath {
    ObjectPath::from(format!("{REFS_DIR}/{tag}/{name}"))
}

/// Splits `<dir>/<tag>/<name>` back into tag and name.
pub(crate) fn split_tagged(dir: &str, location: &ObjectPath) -> Option<(String, String)> {
    let rest = location.as_ref().strip_prefix(dir)?.strip_prefix('/')?;
    let (tag, name) = rest.split_once('/')?;
    Some((tag.to_owned(), name.to_owned()))
}

/// The chunk id of a `chunks/xx/<id>` location, if it is one.
pub(crate) fn chunk_id_of(location: &ObjectPath) -> Option<ChunkId> {
    let rest = location
        .as_ref()
        .strip_prefix(CHUNKS_DIR)?
        .strip_prefix('/')?;
    let (fan, id) = rest.split_once('/')?;
    let id: ChunkId = id.parse().ok()?;
    (id.to_hex()[..2] == *fan).then_some(id)
}

/// Serializes a ref list: sorted distinct ids, one a line.
pub(crate) fn encode_refs(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 65);
    for id in ids {
        out.extend_from_slice(id.to_hex().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Parses a ref list; `None` if any line is not a chunk id.
pub(crate) fn decode_refs(data: &[u8]) -> Option<Vec<ChunkId>> {
    let text = std::str::from_utf8(data).ok()?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "fn/abc/v1.zip", "A-Z_0.9", "x/y/z", "..a", "a.."] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "..", "a/../b", "./a", "a/.", "a b", "a\\b", "ä", "a#1",
        ] {
            assert!(
                matches!(validate_name(bad), Err(StoreError::InvalidName { .. })),
                "{bad}"
            );
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("fn/").is_ok());
        assert!(validate_prefix("fn/a").is_ok());
        assert!(validate_prefix("/fn").is_err());
        assert!(validate_prefix("fn//").is_err());
    }

    #[test]
    fn chunk_ids_and_paths() {
        let id = ChunkId::of_ciphertext(b"hello");
        let hex = id.to_hex();
        assert_eq!(hex.parse::<ChunkId>(), Ok(id));
        assert!(hex.to_uppercase().parse::<ChunkId>().is_err());
        assert!(hex[..63].parse::<ChunkId>().is_err());
        let p = chunk_path(&id);
        assert_eq!(p.as_ref(), format!("chunks/{}/{hex}", &hex[..2]));
        assert_eq!(chunk_id_of(&p), Some(id));
        assert_eq!(chunk_id_of(&ObjectPath::from("chunks/zz/abc")), None);
        let m = manifest_path("shared", "fn/a");
        assert_eq!(
            split_tagged(MANIFESTS_DIR, &m),
            Some(("shared".into(), "fn/a".into()))
        );
        let ids = vec![id, ChunkId::of_ciphertext(b"x")];
        assert_eq!(decode_refs(&encode_refs(&ids)), Some(ids));
        assert_eq!(decode_refs(b"nope\n"), None);
        assert_eq!(decode_refs(b""), Some(vec![]));
    }

    #[test]
    fn well_formed() {
        let c = |len| ChunkRef {
            id: ChunkId([0; 32]),
            key: ChunkKey([0; 32]),
            len,
        };
        let full = CHUNK_SIZE as u32;
        let m = |size, chunks| Manifest {
            size,
            chunks,
            meta: BTreeMap::new(),
        };
        assert!(m(0, vec![]).is_well_formed());
        assert!(m(5, vec![c(5)]).is_well_formed());
        assert!(m(u64::from(full) + 1, vec![c(full), c(1)]).is_well_formed());
        assert!(!m(2, vec![c(1), c(1)]).is_well_formed());
        assert!(!m(0, vec![c(0)]).is_well_formed());
        assert!(!m(6, vec![c(5)]).is_well_formed());
        assert!(!m(u64::from(full) + 1, vec![c(full + 1)]).is_well_formed());
    }
}
