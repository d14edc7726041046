//! Per-function invocation logs for `hearth logs`: `<data-dir>/logs/<function-name>.log`.
//!
//! While an invocation runs, the worker streams its log (init output, `START`, the runtime's
//! output, `END`, `REPORT`) here through a [`crate::invoker::LogSink`] in pieces of at most
//! 64 KB, so no invocation's output is held in memory. A file is bounded: when it passes
//! [`LogStore::MAX_BYTES`] it is cut to its last [`LogStore::KEEP_BYTES`] (at a line start),
//! written to a temporary file and renamed over the old one, so a reader never sees a torn
//! file. This is a convenience for a single machine, not CloudWatch: there are no streams,
//! no retention settings, and a function's log goes when the function is deleted.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;

/// The log directory.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    /// Appends and truncations are serialized (they are short).
    lock: Mutex<()>,
}

impl LogStore {
    /// A file is cut back when it grows past this.
    pub const MAX_BYTES: u64 = 2 * 1024 * 1024;
    /// What is kept when a file is cut back.
    pub const KEEP_BYTES: u64 = 1024 * 1024;

    pub fn new(dir: PathBuf) -> Self {
        LogStore {
            dir,
            lock: Mutex::new(()),
        }
    }

    fn path(&self, function: &str) -> PathBuf {
        // Function names are `[a-zA-Z0-9-_]+`, so they are safe file names.
        self.dir.join(format!("{function}.log"))
    }

    /// Append an invocation's log (ending it with a newline if it has none).
    pub fn append(&self, function: &str, text: &str) -> io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        self.append_bytes(function, text.as_bytes())?;
        if !text.ends_with('\n') {
            self.append_bytes(function, b"\n")?;
        }
        Ok(())
    }

    /// Append a piece of a running invocation's log as it is.
    pub fn append_bytes(&self, function: &str, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        fs::create_dir_all(&self.dir)?;
        let path = self.path(function);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.write_all(bytes)?;
        let len = file.metadata()?.len();
        if len > Self::MAX_BYTES {
            let mut tail = read_tail(&path, Self::KEEP_BYTES)?;
            if let Some(newline) = tail.iter().position(|&b| b == b'\n') {
                tail.drain(..=newline);
            }
            let tmp = self.dir.join(format!(".{function}.log.tmp"));
            fs::write(&tmp, &tail)?;
            fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// The last `bytes` bytes of a function's log (all of it if `None`); empty if there is none.
    pub fn tail(&self, function: &str, bytes: Option<u64>) -> io::Result<Vec<u8>> {
        match read_tail(&self.path(function), bytes.unwrap_or(u64::MAX)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            other => other,
        }
    }

    /// Forget a function's log.
    pub fn remove(&self, function: &str) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match fs::remove_file(self.path(function)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn read_tail(path: &std::path::Path, bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut out)?;
    // Do not start in the middle of a UTF-8 character.
    let skip = out
        .iter()
        .take(3)
        .take_while(|&&b| b & 0xC0 == 0x80)
        .count();
    out.drain(..skip);
    Ok(out)
}

/// The [`crate::invoker::LogSink`] of one invocation: appends to its function's log file.
pub struct FunctionLog {
    pub logs: std::sync::Arc<LogStore>,
    pub function: String,
}

impl crate::invoker::LogSink for FunctionLog {
    fn write(&self, bytes: &[u8]) {
        if let Err(e) = self.logs.append_bytes(&self.function, bytes) {
            tracing::warn!(function = %self.function, error = %e, "could not append to the invocation log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_tail_bound_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LogStore::new(dir.path().join("logs"));
        assert!(logs.tail("f", None).expect("tail").is_empty());
        logs.append("f", "START a\nEND a").expect("append");
        logs.append("f", "START b\nEND b\n").expect("append");
        assert_eq!(
            logs.tail("f", None).expect("tail"),
            b"START a\nEND a\nSTART b\nEND b\n"
        );
        assert_eq!(logs.tail("f", Some(6)).expect("tail"), b"END b\n");

        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..2100 {
            logs.append("g", &line).expect("append");
        }
        let all = logs.tail("g", None).expect("tail");
        assert!(all.len() as u64 <= LogStore::MAX_BYTES, "{}", all.len());
        assert!(
            all.len() as u64 >= LogStore::KEEP_BYTES - 1024,
            "{}",
            all.len()
        );
        assert!(all.starts_with(b"xxx") && all.ends_with(b"x\n"));
        assert_eq!(all.len() % 1024, 0, "cut at a line start");

        logs.remove("f").expect("remove");
        assert!(logs.tail("f", None).expect("tail").is_empty());
        logs.remove("never").expect("removing nothing is fine");
    }
}
