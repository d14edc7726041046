//! Convergent chunk encryption and manifest sealing (AES-256-GCM-SIV, BLAKE3).

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use bytes::Bytes;

use crate::error::StoreError;
use crate::keys::ScopeKeys;
use crate::manifest::{ChunkId, ChunkKey, ChunkRef, MANIFEST_FORMAT, Manifest, ManifestEnvelope};

/// Bytes the AEAD adds to every message (the tag).
pub const TAG_LEN: usize = 16;

const MANIFEST_MAGIC: &[u8; 8] = b"HSMANIF1";
const NONCE_LEN: usize = 12;

/// A chunk ready to store.
pub(crate) struct SealedChunk {
    pub(crate) id: ChunkId,
    pub(crate) key: ChunkKey,
    pub(crate) len: u32,
    pub(crate) ciphertext: Bytes,
}

impl SealedChunk {
    pub(crate) fn chunk_ref(&self) -> ChunkRef {
        ChunkRef {
            id: self.id,
            key: self.key,
            len: self.len,
        }
    }
}

/// Encrypts one chunk convergently: key = keyed hash of the plaintext, fixed all-zero nonce
/// (each key encrypts exactly one plaintext, so the nonce is never reused with another
/// message), id = hash of the ciphertext.
pub(crate) fn seal_chunk(chunk_secret: &[u8; 32], plaintext: &[u8]) -> SealedChunk {
    let key = *blake3::keyed_hash(chunk_secret, plaintext).as_bytes();
    let cipher = Aes256GcmSiv::new(&key.into());
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    cipher
        .encrypt_in_place(&Nonce::default(), b"", &mut buf)
        .expect("AES-GCM-SIV encrypts up to 2^36 bytes; a chunk is at most 512 KiB");
    SealedChunk {
        id: ChunkId::of_ciphertext(&buf),
        key: ChunkKey(key),
        len: u32::try_from(plaintext.len()).expect("a chunk is at most 512 KiB"),
        ciphertext: Bytes::from(buf),
    }
}

/// Decrypts and verifies one chunk: the ciphertext hashes to the id, the tag verifies under the
/// key, the plaintext has the recorded length and its keyed hash is the key.
pub(crate) fn open_chunk(
    chunk_secret: &[u8; 32],
    chunk: &ChunkRef,
    ciphertext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let corrupt = || StoreError::Corrupt { chunk: chunk.id };
    if !ciphertext_matches(&chunk.id, ciphertext) {
        return Err(corrupt());
    }
    let cipher = Aes256GcmSiv::new(&chunk.key.0.into());
    let mut buf = ciphertext.to_vec();
    cipher
        .decrypt_in_place(&Nonce::default(), b"", &mut buf)
        .map_err(|_| corrupt())?;
    if buf.len() != chunk.len as usize
        || blake3::keyed_hash(chunk_secret, &buf) != blake3::Hash::from(chunk.key.0)
    {
        return Err(corrupt());
    }
    Ok(buf)
}

/// Whether `ciphertext` is the object named `id` (constant-time compare).
pub(crate) fn ciphertext_matches(id: &ChunkId, ciphertext: &[u8]) -> bool {
    blake3::hash(ciphertext) == blake3::Hash::from(id.0)
}

/// Associated data binding a sealed manifest to its scope and name, so a manifest copied to
/// another name or scope fails to open.
fn manifest_aad(tag: &str, name: &str) -> Vec<u8> {
    let mut aad = b"hearth-store manifest v1\0".to_vec();
    aad.extend_from_slice(tag.as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[derive(serde::Serialize)]
struct ManifestEnvelopeRef<'a> {
    v: u32,
    manifest: &'a Manifest,
}

/// Seals a manifest: `magic ‖ nonce ‖ AES-256-GCM-SIV(manifest key, nonce, json, aad)` with a
/// random nonce.
pub(crate) fn seal_manifest(keys: &ScopeKeys, name: &str, manifest: &Manifest) -> Vec<u8> {
    let json = serde_json::to_vec(&ManifestEnvelopeRef {
        v: MANIFEST_FORMAT,
        manifest,
    })
    .expect("a manifest (strings, numbers, maps) always serializes");
    let nonce: [u8; NONCE_LEN] = rand::random();
    let cipher = Aes256GcmSiv::new(&keys.manifest_key.into());
    let mut buf = Vec::with_capacity(MANIFEST_MAGIC.len() + NONCE_LEN + json.len() + TAG_LEN);
    let mut body = json;
    cipher
        .encrypt_in_place(
            &Nonce::from(nonce),
            &manifest_aad(&keys.tag, name),
            &mut body,
        )
        .expect("AES-GCM-SIV encrypts up to 2^36 bytes");
    buf.extend_from_slice(MANIFEST_MAGIC);
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(&body);
    buf
}

/// Opens a sealed manifest; any modification, or the wrong scope or name, gives
/// [`StoreError::Tampered`].
pub(crate) fn open_manifest(
    keys: &ScopeKeys,
    name: &str,
    data: &[u8],
) -> Result<Manifest, StoreError> {
    let tampered = || StoreError::Tampered {
        name: name.to_owned(),
    };
    let rest = data.strip_prefix(MANIFEST_MAGIC).ok_or_else(tampered)?;
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(tampered());
    }
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| tampered())?;
    let cipher = Aes256GcmSiv::new(&keys.manifest_key.into());
    let mut buf = body.to_vec();
    cipher
        .decrypt_in_place(
            &Nonce::from(nonce),
            &manifest_aad(&keys.tag, name),
            &mut buf,
        )
        .map_err(|_| tampered())?;
    let envelope: ManifestEnvelope = serde_json::from_slice(&buf).map_err(|_| tampered())?;
    if envelope.v != MANIFEST_FORMAT || !envelope.manifest.is_well_formed() {
        return Err(tampered());
    }
    Ok(envelope.manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Scope, Secrets};

    #[test]
    fn chunk_round_trip_and_verification() {
        let s = Secrets::from_master_key([1; 32]);
        let keys = s.scope_keys(&Scope::Shared).unwrap();
        let sealed = seal_chunk(&keys.chunk_secret, b"hello world");
        assert_eq!(sealed.ciphertext.len(), 11 + TAG_LEN);
        let r = sealed.chunk_ref();
        assert_eq!(
            open_chunk(&keys.chunk_secret, &r, &sealed.ciphertext).unwrap(),
            b"hello world"
        );
        // Deterministic.
        let again = seal_chunk(&keys.chunk_secret, b"hello world");
        assert_eq!(again.id, sealed.id);
        assert_eq!(again.ciphertext, sealed.ciphertext);

        // Any flipped bit fails.
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.ciphertext.to_vec();
            bad[i] ^= 0x01;
            assert!(matches!(
                open_chunk(&keys.chunk_secret, &r, &bad),
                Err(StoreError::Corrupt { .. })
            ));
        }
        // A manifest entry with the right id but a wrong key or length fails.
        let mut wrong_key = r.clone();
        wrong_key.key.0[0] ^= 1;
        assert!(open_chunk(&keys.chunk_secret, &wrong_key, &sealed.ciphertext).is_err());
        let mut wrong_len = r.clone();
        wrong_len.len += 1;
        assert!(open_chunk(&keys.chunk_secret, &wrong_len, &sealed.ciphertext).is_err());
        // The key checks against the scope's chunk secret.
        let other = s.scope_keys(&Scope::Owner("x".into())).unwrap();
        assert!(open_chunk(&other.chunk_secret, &r, &sealed.ciphertext).is_err());
    }

    #[test]
    fn manifest_seal_binds_scope_and_name() {
        let s = Secrets::from_master_key([2; 32]);
        let a = s.scope_keys(&Scope::Owner("a".into())).unwrap();
        let b = s.scope_keys(&Scope::Owner("b".into())).unwrap();
        let sealed_chunk = seal_chunk(&a.chunk_secret, b"x");
        let m = Manifest {
            size: 1,
            chunks: vec![sealed_chunk.chunk_ref()],
            meta: [("k".to_owned(), "v".to_owned())].into(),
        };
        let sealed = seal_manifest(&a, "n", &m);
        assert_eq!(open_manifest(&a, "n", &sealed).unwrap(), m);
        // Random nonce: sealing twice differs.
        assert_ne!(seal_manifest(&a, "n", &m), sealed);
        assert!(matches!(
            open_manifest(&b, "n", &sealed),
            Err(StoreError::Tampered { .. })
        ));
        assert!(open_manifest(&a, "m", &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x80;
            assert!(open_manifest(&a, "n", &bad).is_err(), "byte {i}");
        }
        assert!(open_manifest(&a, "n", &sealed[..sealed.len() - 1]).is_err());
        assert!(open_manifest(&a, "n", b"").is_err());
    }
}
