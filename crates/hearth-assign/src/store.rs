//! One partition's durable storage: the Raft journal and the applied partition, in one redb file.
//!
//! Tables: `log` (index → a JSON entry), `meta` (the vote, the committed and last purged log
//! ids) and `snapshot` (the last snapshot: the serialized [`Partition`] with the log id and
//! membership it reflects). Every journal write and vote commits durably before openraft is
//! told it is done. The applied partition itself lives in memory: at open it is loaded from
//! the last snapshot, and openraft re-applies the committed entries after it.

use std::fmt::Debug;
use std::io;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::TypeConfig;
use crate::partition::{Partition, Response};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const CURRENT: &str = "current";

fn ioerr<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

fn decode_err<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Opens (or creates) a partition's database and returns its journal and state machine.
pub fn open(path: &Path) -> io::Result<(LogStore, StateMachine)> {
    let db = Database::create(path).map_err(ioerr)?;
    let tx = db.begin_write().map_err(ioerr)?;
    {
        tx.open_table(LOG).map_err(ioerr)?;
        tx.open_table(META).map_err(ioerr)?;
        tx.open_table(SNAPSHOT).map_err(ioerr)?;
    }
    tx.commit().map_err(ioerr)?;
    let db = Arc::new(db);
    let sm = StateMachine::load(db.clone())?;
    Ok((LogStore { db }, sm))
}

/// The Raft journal of one partition.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> io::Result<Option<T>> {
        let tx = self.db.begin_read().map_err(ioerr)?;
        let table = tx.open_table(META).map_err(ioerr)?;
        match table.get(key).map_err(ioerr)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(decode_err),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(decode_err)?;
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(ioerr)?;
            {
                let mut table = tx.open_table(META).map_err(ioerr)?;
                table.insert(key, bytes.as_slice()).map_err(ioerr)?;
            }
            tx.commit().map_err(ioerr)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(ioerr)?
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let tx = self.db.begin_read().map_err(ioerr)?;
        let table = tx.open_table(LOG).map_err(ioerr)?;
        let mut out = Vec::new();
        for item in table.range(start..).map_err(ioerr)? {
            let (k, v) = item.map_err(ioerr)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(serde_json::from_slice(v.value()).map_err(decode_err)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<TypeConfig>>> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let purged: Option<LogIdOf<TypeConfig>> = self.get_meta(PURGED)?;
        let last = {
            let tx = self.db.begin_read().map_err(ioerr)?;
            let table = tx.open_table(LOG).map_err(ioerr)?;
            match table.last().map_err(ioerr)? {
                Some((_, v)) => {
                    let entry: EntryOf<TypeConfig> =
                        serde_json::from_slice(v.value()).map_err(decode_err)?;
                    Some(entry.log_id())
                }
                None => None,
            }
        };
        Ok(LogState {
            last_log_id: last.or(purged),
            last_purged_log_id: purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> io::Result<()> {
        self.put_meta(VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        self.put_meta(COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogIdOf<TypeConfig>>> {
        Ok(self
            .get_meta::<Option<LogIdOf<TypeConfig>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            rows.push((
                entry.index(),
                serde_json::to_vec(&entry).map_err(decode_err)?,
            ));
        }
        let db = self.db.clone();
        // Durable (redb fsyncs every commit) before openraft is told; readable when this returns.
        let res = blocking(move || {
            let tx = db.begin_write().map_err(ioerr)?;
            {
                let mut table = tx.open_table(LOG).map_err(ioerr)?;
                for (index, bytes) in &rows {
                    table.insert(*index, bytes.as_slice()).map_err(ioerr)?;
                }
            }
            tx.commit().map_err(ioerr)
        })
        .await;
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let from = last.map_or(0, |id| id.index() + 1);
        self.remove_range(from, u64::MAX).await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> io::Result<()> {
        self.put_meta(PURGED, &log_id).await?;
        self.remove_range(0, log_id.index()).await
    }
}

impl LogStore {
    /// Removes the entries with indexes in `from..=to`.
    async fn remove_range(&self, from: u64, to: u64) -> io::Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(ioerr)?;
            {
                let mut table = tx.open_table(LOG).map_err(ioerr)?;
                table.retain_in(from..=to, |_, _| false).map_err(ioerr)?;
            }
            tx.commit().map_err(ioerr)
        })
        .await
    }
}

/// What a snapshot holds: the partition and the point of the journal it reflects.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    partition: Partition,
}

#[derive(Default)]
struct Applied {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    partition: Partition,
}

/// The applied state of one partition, shared with readers (status, tests).
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    inner: Arc<Mutex<Applied>>,
}

impl StateMachine {
    fn load(db: Arc<Database>) -> io::Result<Self> {
        let applied = {
            let tx = db.begin_read().map_err(ioerr)?;
            let table = tx.open_table(SNAPSHOT).map_err(ioerr)?;
            match table.get(CURRENT).map_err(ioerr)? {
                Some(v) => {
                    let (_, body) = decode_snapshot(v.value())?;
                    Applied {
                        last_applied: body.last_applied,
                        membership: body.membership,
                        partition: body.partition,
                    }
                }
                None => Applied::default(),
            }
        };
        Ok(Self {
            db,
            inner: Arc::new(Mutex::new(applied)),
        })
    }

    /// Runs `f` on the applied partition (a read: it may lag the leader).
    pub async fn read<T>(&self, f: impl FnOnce(&Partition) -> T) -> T {
        f(&self.inner.lock().await.partition)
    }

    async fn persist(&self, meta: &SnapshotMetaOf<TypeConfig>, data: Vec<u8>) -> io::Result<()> {
        let meta_bytes = serde_json::to_vec(meta).map_err(decode_err)?;
        let db = self.db.clone();
        blocking(move || {
            // [u32 meta length][meta JSON][snapshot body JSON]
            let len = u32::try_from(meta_bytes.len()).map_err(ioerr)?;
            let mut row = Vec::with_capacity(4 + meta_bytes.len() + data.len());
            row.extend_from_slice(&len.to_le_bytes());
            row.extend_from_slice(&meta_bytes);
            row.extend_from_slice(&data);
            let tx = db.begin_write().map_err(ioerr)?;
            {
                let mut table = tx.open_table(SNAPSHOT).map_err(ioerr)?;
                table.insert(CURRENT, row.as_slice()).map_err(ioerr)?;
            }
            tx.commit().map_err(ioerr)
        })
        .await
    }
}

fn split_snapshot(row: &[u8]) -> io::Result<(&[u8], &[u8])> {
    let (len, rest) = row
        .split_first_chunk::<4>()
        .ok_or_else(|| decode_err("short snapshot row"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(decode_err("short snapshot row"));
    }
    Ok(rest.split_at(len))
}

fn decode_snapshot(row: &[u8]) -> io::Result<(SnapshotMetaOf<TypeConfig>, SnapshotBody)> {
    let (meta, body) = split_snapshot(row)?;
    Ok((
        serde_json::from_slice(meta).map_err(decode_err)?,
        serde_json::from_slice(body).map_err(decode_err)?,
    ))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Self::SnapshotData>> {
        let (meta, data) = {
            let inner = self.inner.lock().await;
            let body = SnapshotBody {
                last_applied: inner.last_applied,
                membership: inner.membership.clone(),
                partition: inner.partition.clone(),
            };
            let data = serde_json::to_vec(&body).map_err(decode_err)?;
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
            };
            (meta, data)
        };
        self.persist(&meta, data.clone()).await?;
        Ok(SnapshotOf::<TypeConfig, Self::SnapshotData> {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            inner.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::Ok,
                EntryPayload::Normal(cmd) => inner.partition.apply(cmd),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id), m);
                    Response::Ok
                }
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> io::Result<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(decode_err)?;
        self.persist(meta, data).await?;
        let mut inner = self.inner.lock().await;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.partition = body.partition;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>> {
        let tx = self.db.begin_read().map_err(ioerr)?;
        let table = tx.open_table(SNAPSHOT).map_err(ioerr)?;
        let Some(row) = table.get(CURRENT).map_err(ioerr)? else {
            return Ok(None);
        };
        let (meta, body) = split_snapshot(row.value())?;
        Ok(Some(SnapshotOf::<TypeConfig, Self::SnapshotData> {
            meta: serde_json::from_slice(meta).map_err(decode_err)?,
            snapshot: Cursor::new(body.to_vec()),
        }))
    }
}
