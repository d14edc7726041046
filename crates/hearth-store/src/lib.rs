//! hearth's chunk store: every artifact hearth keeps (runtime image tarballs, function code
//! zips, sandbox snapshot images of up to about 1 GB) is stored as a manifest of fixed-size,
//! content-addressed, convergently encrypted chunks.
//!
//! # Fixed 512 KiB chunks
//!
//! An artifact is cut into [`CHUNK_SIZE`] (512 KiB) pieces; the last one is shorter, and an
//! empty artifact has no chunks. Content-defined chunking (rolling hashes, as in restic or
//! casync) finds more duplicates when bytes are inserted or removed in the middle of a file, but
//! hearth's big artifacts are disk and memory images whose blocks stay at fixed offsets, and the
//! lazy file system above this crate must map a read at offset `o` to chunk `o / CHUNK_SIZE`
//! without an index. Fixed chunks give that for free; 512 KiB is large enough that a 1 GB
//! snapshot is 2048 objects (cheap to list and to fetch in parallel) and small enough that a
//! lazy read does not pull much it does not need.
//!
//! # Convergent encryption
//!
//! A chunk's key is the keyed BLAKE3 hash of its plaintext under its scope's chunk secret; the
//! chunk is encrypted with AES-256-GCM-SIV under that key with a fixed all-zero nonce (safe:
//! each key only ever encrypts the one plaintext it was derived from) and stored under
//! `hex(blake3(ciphertext))`. So identical plaintext in one scope gives identical ciphertext
//! and is stored once, while the origin only ever sees ciphertext. The keys are kept in the
//! artifact's manifest, which is itself sealed (AES-256-GCM-SIV, random nonce, the scope and
//! name as associated data) under the scope's manifest key.
//!
//! The known weakness of convergent encryption is *confirmation of a file*: whoever can compute
//! a chunk key can check whether a guessed plaintext is stored (encrypt the guess, look for its
//! id), and with guessable content with few unknowns (a config file with one password) can
//! even recover it by trying candidates. Keying the hash with a secret keeps outsiders (the
//! object storage operator, a thief of the bucket) out entirely; what remains is that parties
//! sharing a scope can confirm each other's chunks. Hence the scopes:
//!
//! - [`Scope::Shared`]: runtime images, public anyway; one platform-wide secret, so they dedupe
//!   across every function and tenant.
//! - [`Scope::Owner`]: function code and snapshots; a secret derived from the master key and the
//!   owner id, so identical chunks of two owners give unrelated ciphertexts that cannot be
//!   linked, and nobody can confirm another owner's files.
//!
//! All secrets derive from one 32-byte master key in a file ([`Secrets::load_or_create`]); see
//! the `keys` module for the derivation tree. Scope directories in the origin are named by a
//! keyed hash of the owner id, not the id.
//!
//! # Verification
//!
//! Every chunk read from anywhere is checked three ways before its bytes are returned: its
//! ciphertext hashes to its id, the AEAD tag verifies under the manifest's key, and the
//! plaintext has the recorded length and hashes (keyed) to that key. A bad chunk is never
//! returned: [`StoreError::Corrupt`]. A manifest that was modified, truncated, moved to another
//! name, or sealed under another scope fails to open: [`StoreError::Tampered`].
//!
//! # Tiers
//!
//! A read goes cache → origin:
//!
//! - **origin**: any [`object_store::ObjectStore`]: a local directory by default
//!   ([`ChunkStore::local`]), S3-compatible storage, or memory in tests. Chunks are written with
//!   put-if-absent ([`object_store::PutMode::Create`]) after a cheap existence check, so a
//!   duplicate is not uploaded again (unless it is older than the freshening age: see garbage
//!   collection below).
//! - **worker disk cache** ([`ChunkCache`]): a directory of verified ciphertext chunks bounded
//!   in bytes, least-recently-used eviction, surviving restarts. A corrupt cached chunk is
//!   dropped and fetched again from the origin.
//!
//! Concurrent readers of one chunk wait on one fetch (a single-flight table of shared futures).
//! A memory tier and the FUSE lazy file system sit above this crate and read single chunks
//! through [`ChunkStore::get_chunk`].
//!
//! # Garbage collection and why it is safe
//!
//! Deleting a manifest only releases it; [`ChunkStore::collect_garbage`] reclaims chunks by mark
//! and sweep. The collector holds no owner's keys, so next to each sealed manifest the store
//! keeps a plain *ref list* (`refs/<scope tag>/<name>`): the manifest's chunk ids, which are
//! hashes of ciphertext and reveal nothing. Mark = the union of all ref lists; sweep = delete
//! unmarked chunks that were older than a grace period when listed.
//!
//! One setting governs safety: the grace period `G` ([`ChunkStore::with_gc_grace`], default
//! 24 h). The age `F` past which a put rewrites a chunk it reuses, to refresh its modification
//! time, follows from it: `F = G / 2` ([`ChunkStore::freshen_after`]). The two cannot be set
//! apart, so `F < G` holds by construction, with `G - F = G / 2` of margin. (They once were
//! two settings, and `hearth up` collected with a 1 h grace while puts freshened only past
//! 12 h: a put reusing a released two-hour-old chunk during a sweep lost it.)
//!
//! Two mechanisms, one for each kind of concurrent put:
//!
//! - **Puts of the same store** (the same process: `hearth up` puts and collects) pin every
//!   chunk from before they look at it until their manifest is written, and the collector
//!   never deletes a pinned chunk. It claims each candidate before its last look and delete;
//!   a put that wants a claimed chunk waits until the delete is done and then uploads it
//!   again. So a put of the same store is safe whatever its duration, its chunks' ages and `G`
//!   (even zero); see the `pin` module.
//! - **Puts of other processes** sharing the origin (another front end, or `hearth store gc`
//!   run next to `hearth up`) are covered by the ages, given every process uses the same `G`:
//!   - A put writes chunks first, then the ref list, then the manifest; a delete removes the
//!     manifest, then the ref list. So a live manifest always has a ref list.
//!   - The collector lists chunks *before* it reads ref lists. A chunk a put uploaded or
//!     rewrote is at most as old as that put; unless the put ran longer than `G` before writing
//!     its ref list, the chunk is younger than `G` when listed, or its ref list is read: it
//!     survives.
//!   - A put that reuses an existing chunk without rewriting it saw it younger than `F`; it
//!     survives if the put runs less than `G - F = G / 2` (12 h by default; ages compare the
//!     origin's modification times with the collector's clock, so the margin also absorbs
//!     clock skew). An older reused chunk is rewritten; the collector checks each candidate's
//!     modification time and e-tag once more right before deleting it, so a chunk rewritten
//!     after the listing is kept, and one deleted before the rewrite is simply stored again by
//!     it. The remaining window, which would need a conditional delete that the object store
//!     API lacks, is a rewrite landing in the instant between that last look and the delete.
//!
//! And for everything else:
//!
//! - A chunk another manifest uses is in that manifest's ref list and is never deleted.
//! - A ref list without its manifest (a crash between the two writes, or mid-delete) marks
//!   while younger than `G` and is ignored after, so a crash does not pin chunks forever.
//! - A manifest found without a ref list (only possible by outside interference) stops the
//!   collection with [`StoreError::Inconsistent`] before anything is deleted; an unreadable ref
//!   list does the same.
//!
//! What grace cannot protect is a reader still using a manifest that was deleted or replaced:
//! callers must not delete an artifact a sandbox may still read lazily. A missing chunk is
//! reported as [`StoreError::MissingChunk`], never as wrong data.
//!
//! # Origin layout
//!
//! ```text
//! chunks/<2 hex>/<64 hex>      ciphertext, named by its BLAKE3 hash
//! manifests/<scope tag>/<name> sealed manifest
//! refs/<scope tag>/<name>      ref list: chunk ids, one a line
//! ```
//!
//! Names are `/`-separated `[A-Za-z0-9._-]` segments ([`validate_name`]). On a local-directory
//! origin a name cannot be both an artifact and a prefix of another (`a` and `a/b`), since `a`
//! would have to be a file and a directory.

pub mod cache;
mod crypto;
pub mod error;
mod gc;
mod keys;
pub mod manifest;
mod pin;
mod store;

/// Size of every chunk but the last: 512 KiB.
pub const CHUNK_SIZE: usize = 512 * 1024;

pub use cache::ChunkCache;
pub use crypto::TAG_LEN;
pub use error::StoreError;
pub use gc::GcReport;
pub use keys::{MAX_OWNER_LEN, Scope, Secrets};
pub use manifest::{ChunkId, ChunkKey, ChunkRef, Manifest, ManifestInfo, validate_name};
pub use store::{
    ChunkStore, DEFAULT_GC_GRACE, GET_PARALLELISM, PUT_PARALLELISM, Usage, local_origin,
};
