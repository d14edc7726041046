//! Durable function metadata in redb (`<data-dir>/meta.redb`).
//!
//! One record per function, keyed by name: its `$LATEST` configuration, its published
//! versions (immutable copies), its aliases, its reserved concurrency and tags, stored as JSON.
//! A second table mirrors each function's reservation so the front end can sum reservations on
//! every invoke without decoding every function.
//!
//! Every change is one read-modify-write inside one redb write transaction
//! ([`Store::update`]): redb runs write transactions one at a time, so concurrent updates of a
//! function serialize, and a closure that fails (a validation error, a `RevisionId` that does
//! not match) aborts the transaction, leaving nothing changed. Commits are durable (fsync)
//! before they return.
//!
//! Why one JSON record per function rather than a table per kind: a function's versions,
//! aliases and reservation change together under the same rules (an alias must point at an
//! existing version; a version an alias uses cannot be deleted), and keeping them in one
//! record makes each such rule one atomic check. Records are small (configuration only; code
//! lives in the content-addressed code directory, see [`crate::code`]).
//!
//! redb's API is synchronous; the router calls the store from `tokio::task::spawn_blocking`.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// name → JSON [`FunctionRecord`].
const FUNCTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("functions");
/// name → reserved concurrency (only functions with a reservation).
const RESERVED: TableDefinition<&str, u32> = TableDefinition::new("reserved_concurrency");
/// layer name → JSON [`LayerRecord`].
const LAYERS: TableDefinition<&str, &[u8]> = TableDefinition::new("layers");
/// function URL id → the name of the function whose record holds the URL (an index kept by
/// [`Store::create`], [`Store::update`] and [`Store::remove`] in the record's transaction).
const FUNCTION_URLS: TableDefinition<&str, &str> = TableDefinition::new("function_urls");

/// Errors of the metadata store. All of them are internal faults to a caller.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record {name:?}: {source}")]
    Corrupt {
        name: String,
        source: serde_json::Error,
    },
    #[error("encoding function record: {0}")]
    Encode(serde_json::Error),
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

pub use hearth_core::code::CodeRef;

/// One function version's code and configuration: `$LATEST` (mutable) or a published version
/// (an immutable copy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub runtime: String,
    pub role: String,
    pub handler: Option<String>,
    pub description: String,
    pub timeout_s: u32,
    pub memory_mb: u32,
    pub environment: BTreeMap<String, String>,
    pub ephemeral_storage_mb: u32,
    /// `SnapStart.ApplyOn`: `None` or `PublishedVersions`.
    pub snap_start_apply_on: String,
    pub code: CodeRef,
    /// `2024-01-01T00:00:00.000+0000`.
    pub last_modified: String,
    pub revision_id: String,
    /// `State`: `None` means `Active`; `Pending` while a snapshot is being made, `Failed` if
    /// that failed (with the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// `DeadLetterConfig.TargetArn` (validated: an SQS queue ARN naming a queue of the
    /// failed-events store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_target: Option<String>,
    /// `Layers`, in order: each layer version's ARN and package, copied when the function was
    /// configured, so deleting a layer version leaves this function as it was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<FunctionLayer>,
}

/// One layer version a function version uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionLayer {
    /// The layer version ARN (`arn:aws:lambda:REGION:ACCOUNT:layer:NAME:VERSION`).
    pub arn: String,
    /// The layer's package (named by its SHA-256, as function code is).
    pub code: CodeRef,
    /// Bytes the package unpacks to (for the 250 MB limit on code and layers together).
    pub unzipped_size: u64,
}

impl VersionRecord {
    /// Same code and configuration (ignoring time, revision and description): publishing such
    /// a `$LATEST` again would create an identical version.
    pub fn same_content(&self, other: &VersionRecord) -> bool {
        self.runtime == other.runtime
            && self.role == other.role
            && self.handler == other.handler
            && self.timeout_s == other.timeout_s
            && self.memory_mb == other.memory_mb
            && self.environment == other.environment
            && self.ephemeral_storage_mb == other.ephemeral_storage_mb
            && self.snap_start_apply_on == other.snap_start_apply_on
            && self.code == other.code
            && self.dead_letter_target == other.dead_letter_target
            && self.layers == other.layers
    }
}

/// An alias: a name pointing at a version, optionally routing a share of invocations to a
/// second version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub name: String,
    pub function_version: String,
    pub description: String,
    /// `RoutingConfig.AdditionalVersionWeights`: at most one entry, version → weight in [0, 1].
    pub additional_version_weights: BTreeMap<String, f64>,
    pub revision_id: String,
}

/// Everything hearth knows about one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    pub latest: VersionRecord,
    /// Published versions by number.
    pub versions: BTreeMap<u64, VersionRecord>,
    /// The number the next published version gets (numbers are never reused).
    pub next_version: u64,
    pub aliases: BTreeMap<String, AliasRecord>,
    pub reserved_concurrency: Option<u32>,
    pub tags: BTreeMap<String, String>,
    /// Event-invoke configuration by qualifier (`$LATEST`, a version, an alias).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub event_invoke: BTreeMap<String, crate::events::config::EventInvokeRecord>,
    /// Function URLs by qualifier (`$LATEST` for the unqualified function, or an alias).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub function_urls: BTreeMap<String, crate::urls::UrlRecord>,
    /// Resource-based policy statements by qualifier (`$LATEST` for the unqualified function),
    /// in the order they were added (see [`crate::policy`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policy: BTreeMap<String, Vec<serde_json::Value>>,
}

impl FunctionRecord {
    fn url_ids(&self) -> impl Iterator<Item = &str> {
        self.function_urls.values().map(|u| u.url_id.as_str())
    }
}

/// One layer version: an immutable package with its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerVersionRecord {
    pub description: String,
    pub license_info: Option<String>,
    pub compatible_runtimes: Vec<String>,
    pub compatible_architectures: Vec<String>,
    /// `CreatedDate`, as `LastModified` is written.
    pub created_date: String,
    pub code: CodeRef,
    /// Bytes the package unpacks to.
    pub unzipped_size: u64,
}

/// A layer: its versions (deleted ones are gone) and the number the next one gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub name: String,
    pub versions: BTreeMap<u64, LayerVersionRecord>,
    /// Version numbers count up from 1 and are never reused, even after every version of the
    /// layer was deleted (the record stays for that).
    pub next_version: u64,
}

/// The metadata database.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<FunctionRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        name: name.to_string(),
        source,
    })
}

fn encode(record: &FunctionRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(StoreError::Encode)
}

impl Store {
    /// Open (or create) the database file.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(FUNCTIONS).map_err(db_err)?;
            txn.open_table(RESERVED).map_err(db_err)?;
            txn.open_table(LAYERS).map_err(db_err)?;
            txn.open_table(FUNCTION_URLS).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// One function's record.
    pub fn get(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(FUNCTIONS).map_err(db_err)?;
        let value = table.get(name).map_err(db_err)?;
        value.map(|v| decode(name, v.value())).transpose()
    }

    /// Insert a new function. Returns `false` (and changes nothing) if the name is taken.
    pub fn create(&self, record: &FunctionRecord) -> Result<bool, StoreError> {
        let bytes = encode(record)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(FUNCTIONS).map_err(db_err)?;
            if table.get(record.name.as_str()).map_err(db_err)?.is_some() {
                return Ok(false);
            }
            table
                .insert(record.name.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            let mut reserved = txn.open_table(RESERVED).map_err(db_err)?;
            if let Some(n) = record.reserved_concurrency {
                reserved.insert(record.name.as_str(), n).map_err(db_err)?;
            }
            let mut urls = txn.open_table(FUNCTION_URLS).map_err(db_err)?;
            for id in record.url_ids() {
                urls.insert(id, record.name.as_str()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    /// Read-modify-write one function atomically. `f` gets the record and the sum of the
    /// other functions' reservations. Returns `Ok(None)` if the function does not exist; if
    /// `f` fails, nothing is written.
    pub fn update<T, E>(
        &self,
        name: &str,
        f: impl FnOnce(&mut FunctionRecord, u64) -> Result<T, E>,
    ) -> Result<Option<T>, E>
    where
        E: From<StoreError>,
    {
        let txn = self.db.begin_write().map_err(db_err)?;
        let out = {
            let mut table = txn.open_table(FUNCTIONS).map_err(db_err)?;
            let mut reserved = txn.open_table(RESERVED).map_err(db_err)?;
            let current = match table.get(name).map_err(db_err)? {
                Some(v) => decode(name, v.value())?,
                None => return Ok(None),
            };
            let mut others = 0u64;
            for entry in reserved.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                if k.value() != name {
                    others += u64::from(v.value());
                }
            }
            let mut record = current.clone();
            let out = f(&mut record, others)?;
            // The name is the key: a closure cannot rename a function.
            record.name = name.to_string();
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(db_err)?;
            match record.reserved_concurrency {
                Some(n) => {
                    reserved.insert(name, n).map_err(db_err)?;
                }
                None => {
                    reserved.remove(name).map_err(db_err)?;
                }
            }
            let mut urls = txn.open_table(FUNCTION_URLS).map_err(db_err)?;
            for id in current.url_ids() {
                if !record.url_ids().any(|n| n == id) {
                    urls.remove(id).map_err(db_err)?;
                }
            }
            for id in record.url_ids() {
                urls.insert(id, name).map_err(db_err)?;
            }
            out
        };
        txn.commit().map_err(db_err)?;
        Ok(Some(out))
    }

    /// Delete a function; returns its last record.
    pub fn remove(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let old = {
            let mut table = txn.open_table(FUNCTIONS).map_err(db_err)?;
            let old = match table.remove(name).map_err(db_err)? {
                Some(v) => Some(decode(name, v.value())?),
                None => None,
            };
            txn.open_table(RESERVED)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
            let mut urls = txn.open_table(FUNCTION_URLS).map_err(db_err)?;
            for id in old.iter().flat_map(|r| r.url_ids()) {
                urls.remove(id).map_err(db_err)?;
            }
            old
        };
        txn.commit().map_err(db_err)?;
        Ok(old)
    }

    /// Up to `limit` functions in name order, starting at `from` (inclusive) if given.
    pub fn list(
        &self,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FunctionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(FUNCTIONS).map_err(db_err)?;
        let iter = match from {
            Some(start) => table.range(start..).map_err(db_err)?,
            None => table.iter().map_err(db_err)?,
        };
        let mut out = Vec::new();
        for entry in iter.take(limit) {
            let (k, v) = entry.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The function that has the function URL `url_id`.
    pub fn function_by_url(&self, url_id: &str) -> Result<Option<FunctionRecord>, StoreError> {
        let name = {
            let txn = self.db.begin_read().map_err(db_err)?;
            let table = txn.open_table(FUNCTION_URLS).map_err(db_err)?;
            let value = table.get(url_id).map_err(db_err)?;
            value.map(|v| v.value().to_string())
        };
        match name {
            Some(name) => self.get(&name),
            None => Ok(None),
        }
    }

    /// Every function (account-wide figures).
    pub fn all(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        self.list(None, usize::MAX)
    }

    /// Sum of all reserved concurrency.
    pub fn reserved_total(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(RESERVED).map_err(db_err)?;
        let mut total = 0u64;
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            total += u64::from(v.value());
        }
        Ok(total)
    }
}

// ---- layers --------------------------------------------------------------------------------

fn decode_layer(name: &str, bytes: &[u8]) -> Result<LayerRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        name: format!("layer {name}"),
        source,
    })
}

impl Store {
    /// One layer's record.
    pub fn layer(&self, name: &str) -> Result<Option<LayerRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LAYERS).map_err(db_err)?;
        let value = table.get(name).map_err(db_err)?;
        value.map(|v| decode_layer(name, v.value())).transpose()
    }

    /// Read-modify-write one layer atomically; a layer that does not exist yet starts empty
    /// (`f` may leave it so: an empty new record is not written). If `f` fails, nothing is
    /// written.
    pub fn update_layer<T, E>(
        &self,
        name: &str,
        f: impl FnOnce(&mut LayerRecord) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let txn = self.db.begin_write().map_err(db_err)?;
        let out = {
            let mut table = txn.open_table(LAYERS).map_err(db_err)?;
            let existing = match table.get(name).map_err(db_err)? {
                Some(v) => Some(decode_layer(name, v.value())?),
                None => None,
            };
            let existed = existing.is_some();
            let mut record = existing.unwrap_or_else(|| LayerRecord {
                name: name.to_string(),
                versions: BTreeMap::new(),
                next_version: 1,
            });
            let out = f(&mut record)?;
            record.name = name.to_string();
            if existed || record.next_version > 1 {
                let bytes = serde_json::to_vec(&record).map_err(StoreError::Encode)?;
                table.insert(name, bytes.as_slice()).map_err(db_err)?;
            }
            out
        };
        txn.commit().map_err(db_err)?;
        Ok(out)
    }

    /// Every layer, in name order.
    pub fn layers(&self) -> Result<Vec<LayerRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LAYERS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.push(decode_layer(k.value(), v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(code: &str) -> VersionRecord {
        VersionRecord {
            runtime: "python3.11".into(),
            role: "arn:aws:iam::000000000000:role/r".into(),
            handler: Some("app.handler".into()),
            description: String::new(),
            timeout_s: 3,
            memory_mb: 128,
            environment: BTreeMap::from([("A".to_string(), "1".to_string())]),
            ephemeral_storage_mb: 512,
            snap_start_apply_on: "None".into(),
            code: CodeRef {
                sha256_b64: code.into(),
                sha256_hex: code.into(),
                size: 10,
            },
            last_modified: "2024-01-01T00:00:00.000+0000".into(),
            revision_id: "r1".into(),
            state: None,
            state_reason: None,
            dead_letter_target: None,
            layers: Vec::new(),
        }
    }

    fn function(name: &str) -> FunctionRecord {
        FunctionRecord {
            name: name.into(),
            latest: version("c1"),
            versions: BTreeMap::new(),
            next_version: 1,
            aliases: BTreeMap::new(),
            reserved_concurrency: None,
            tags: BTreeMap::new(),
            event_invoke: BTreeMap::new(),
            function_urls: BTreeMap::new(),
            policy: BTreeMap::new(),
        }
    }

    #[derive(Debug)]
    enum TestError {
        Store,
        Rejected,
    }
    impl From<StoreError> for TestError {
        fn from(_: StoreError) -> Self {
            TestError::Store
        }
    }

    #[test]
    fn create_get_update_remove_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        {
            let store = Store::open(&path).expect("open");
            assert!(store.create(&function("a")).expect("create"));
            assert!(
                !store.create(&function("a")).expect("create dup"),
                "duplicate accepted"
            );
            assert!(store.create(&function("b")).expect("create"));
            let published = store
                .update("a", |rec, _| -> Result<u64, TestError> {
                    let n = rec.next_version;
                    rec.versions.insert(n, rec.latest.clone());
                    rec.next_version += 1;
                    rec.reserved_concurrency = Some(7);
                    Ok(n)
                })
                .expect("update");
            assert_eq!(published, Some(1));
            assert_eq!(store.reserved_total().expect("sum"), 7);
            let missing = store.update("zzz", |_, _| -> Result<(), TestError> { Ok(()) });
            assert!(matches!(missing, Ok(None)));
        }
        // Reopen: everything is still there.
        let store = Store::open(&path).expect("reopen");
        let a = store.get("a").expect("get").expect("a exists");
        assert_eq!(a.versions.len(), 1);
        assert_eq!(a.next_version, 2);
        assert_eq!(a.reserved_concurrency, Some(7));
        assert_eq!(store.reserved_total().expect("sum"), 7);
        let names: Vec<String> = store
            .all()
            .expect("all")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            store.remove("a").expect("remove").map(|r| r.name),
            Some("a".to_string())
        );
        assert_eq!(store.reserved_total().expect("sum"), 0);
        assert!(store.get("a").expect("get").is_none());
    }

    #[test]
    fn url_index_follows_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("meta.redb")).expect("open");
        store.create(&function("a")).expect("create");
        let url = |id: &str| crate::urls::UrlRecord {
            url_id: id.into(),
            auth_type: crate::urls::AuthType::None,
            cors: None,
            creation_time: "t".into(),
            last_modified_time: "t".into(),
            invoke_mode: crate::urls::InvokeMode::Buffered,
        };
        store
            .update("a", |rec, _| -> Result<(), TestError> {
                rec.function_urls.insert("$LATEST".into(), url("id1"));
                rec.function_urls.insert("live".into(), url("id2"));
                Ok(())
            })
            .expect("update");
        let name = |id| store.function_by_url(id).expect("lookup").map(|r| r.name);
        assert_eq!(name("id1").as_deref(), Some("a"));
        assert_eq!(name("id2").as_deref(), Some("a"));
        store
            .update("a", |rec, _| -> Result<(), TestError> {
                rec.function_urls.remove("live");
                Ok(())
            })
            .expect("update");
        assert_eq!(name("id2"), None, "a removed URL is out of the index");
        // A failed update leaves the index as it was.
        let _ = store.update("a", |rec, _| -> Result<(), TestError> {
            rec.function_urls.clear();
            Err(TestError::Rejected)
        });
        assert_eq!(name("id1").as_deref(), Some("a"));
        store.remove("a").expect("remove");
        assert_eq!(name("id1"), None, "deleting the function drops its URLs");
    }

    #[test]
    fn failed_update_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("meta.redb")).expect("open");
        store.create(&function("a")).expect("create");
        let before = store.get("a").expect("get");
        let r = store.update("a", |rec, _| -> Result<(), TestError> {
            rec.latest.memory_mb = 4096;
            rec.reserved_concurrency = Some(3);
            Err(TestError::Rejected)
        });
        assert!(matches!(r, Err(TestError::Rejected)));
        assert_eq!(store.get("a").expect("get"), before);
        assert_eq!(store.reserved_total().expect("sum"), 0);
    }

    #[test]
    fn update_sees_other_reservations_and_list_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("meta.redb")).expect("open");
        for name in ["c", "a", "b", "d"] {
            store.create(&function(name)).expect("create");
        }
        for (name, n) in [("a", 5u32), ("b", 10)] {
            store
                .update(name, |rec, _| -> Result<(), TestError> {
                    rec.reserved_concurrency = Some(n);
                    Ok(())
                })
                .expect("update");
        }
        let seen = store
            .update("a", |_, others| -> Result<u64, TestError> { Ok(others) })
            .expect("update");
        assert_eq!(seen, Some(10));
        let page: Vec<String> = store
            .list(Some("b"), 2)
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(page, ["b", "c"]);
    }

    fn layer_version(code: &str) -> LayerVersionRecord {
        LayerVersionRecord {
            description: String::new(),
            license_info: None,
            compatible_runtimes: vec!["python3.11".into()],
            compatible_architectures: Vec::new(),
            created_date: "2024-01-01T00:00:00.000+0000".into(),
            code: version(code).code,
            unzipped_size: 20,
        }
    }

    #[test]
    fn layers_are_kept_and_failed_or_empty_updates_write_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        {
            let store = Store::open(&path).expect("open");
            // Looking at a layer that does not exist leaves no record behind.
            let n = store
                .update_layer("ghost", |l| -> Result<usize, TestError> {
                    Ok(l.versions.len())
                })
                .expect("update");
            assert_eq!(n, 0);
            assert!(store.layer("ghost").expect("get").is_none());
            for code in ["c1", "c2"] {
                store
                    .update_layer("lib", |l| -> Result<(), TestError> {
                        let n = l.next_version;
                        l.next_version += 1;
                        l.versions.insert(n, layer_version(code));
                        Ok(())
                    })
                    .expect("publish");
            }
            let r = store.update_layer("lib", |l| -> Result<(), TestError> {
                l.versions.clear();
                Err(TestError::Rejected)
            });
            assert!(matches!(r, Err(TestError::Rejected)));
            assert_eq!(
                store.layer("lib").expect("get").map(|l| l.versions.len()),
                Some(2)
            );
            store
                .update_layer("lib", |l| -> Result<(), TestError> {
                    l.versions.clear();
                    Ok(())
                })
                .expect("delete all");
        }
        // Reopened: the emptied layer still knows its next number.
        let store = Store::open(&path).expect("reopen");
        let lib = store.layer("lib").expect("get").expect("kept");
        assert!(lib.versions.is_empty());
        assert_eq!(lib.next_version, 3);
        let names: Vec<String> = store
            .layers()
            .expect("layers")
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["lib"]);
    }
}
