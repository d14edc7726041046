//! Restore into a created sandbox by talking to its sentry's control socket, instead of
//! executing `runsc restore` (which costs a Go binary's start, the container's state load and a
//! spec read before it sends the same two calls).
//!
//! The sentry serves gVisor's uRPC on a unix stream socket whose path runsc records in the
//! container's state file (`controlSocketPath`). A call is one JSON object
//! `{"method": M, "arg": A}`, with any file descriptors attached (SCM_RIGHTS) to its first
//! bytes; the answer is one JSON object `{"success": bool, "err": E, "result": R}`. A restore
//! with loopback-only networking is two calls, as runsc makes them: `Network.CreateLinksAndRoutes`
//! with the default loopback link, then `containerManager.Restore` with the checkpoint's state
//! file, page metadata and page file. Afterwards the state file says `running`, so runsc's
//! `kill`, `delete` and `state` treat the container as runsc's own restore would leave it.
//!
//! Whether the installed runsc speaks this protocol is probed (`probe.rs`); when it does not,
//! the engine runs `runsc restore`.

use std::fs::File;
use std::io::{BufReader, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("container state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container state {0} is not what this runsc writes: {1}")]
    Format(PathBuf, String),
    #[error("container {id} is {status}, not created")]
    NotCreated { id: String, status: String },
    #[error("checkpoint file {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the sentry refused {method}: {err}")]
    Refused { method: &'static str, err: String },
}

/// The uRPC calls take at most this long (a restore of a large image reads all of it).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn state_path(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}_sandbox:{id}.state"))
}

fn lock_path(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}_sandbox:{id}.lock"))
}

/// Restore the checkpoint in `image_dir` into the created root container `id` (whose sandbox
/// has the same id) under runsc root `root`. `loopback_only` is true for `--network=none`
/// sandboxes, whose network stack the restore must be given first.
pub fn restore(
    root: &Path,
    id: &str,
    image_dir: &Path,
    loopback_only: bool,
) -> Result<(), ControlError> {
    let state = state_path(root, id);
    let lock = lock_path(root, id);
    // runsc serialises every command on a container with an exclusive lock on this file.
    let lock_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(|source| ControlError::State {
            path: lock.clone(),
            source,
        })?;
    lock_file.lock().map_err(|source| ControlError::State {
        path: lock.clone(),
        source,
    })?;
    let bytes = std::fs::read(&state).map_err(|source| ControlError::State {
        path: state.clone(),
        source,
    })?;
    let mut doc: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ControlError::Format(state.clone(), e.to_string()))?;
    let status = doc["status"].as_str().unwrap_or("").to_string();
    if status != "created" {
        return Err(ControlError::NotCreated {
            id: id.to_string(),
            status,
        });
    }
    let Some(socket) = doc["sandbox"]["controlSocketPath"]
        .as_str()
        .map(String::from)
    else {
        return Err(ControlError::Format(
            state.clone(),
            "no sandbox.controlSocketPath".into(),
        ));
    };
    let open = |name: &str| {
        let path = image_dir.join(name);
        File::open(&path).map_err(|source| ControlError::Image { path, source })
    };
    let mut files = vec![open("checkpoint.img")?];
    let have_pages = image_dir.join("pages.img").exists();
    if have_pages {
        files.push(open("pages_meta.img")?);
        files.push(open("pages.img")?);
    }
    let mut conn = Conn::connect(&socket)?;
    if loopback_only {
        conn.call("Network.CreateLinksAndRoutes", loopback_args(), &[])?;
    }
    conn.call(
        "containerManager.Restore",
        json!({ "HavePagesFile": have_pages, "HaveDeviceFile": false }),
        &files.iter().map(|f| f.as_fd()).collect::<Vec<_>>(),
    )?;
    doc["status"] = json!("running");
    let out =
        serde_json::to_vec(&doc).map_err(|e| ControlError::Format(state.clone(), e.to_string()))?;
    std::fs::write(&state, out).map_err(|source| ControlError::State {
        path: state.clone(),
        source,
    })?;
    drop(lock_file);
    Ok(())
}

/// runsc's default loopback link (`lo`, 127.0.0.1/8 and ::1/128 with their routes), in the
/// JSON Go's encoder makes of it: addresses as text, masks as base64 bytes.
fn loopback_args() -> Value {
    json!({
        "LoopbackLinks": [{
            "Name": "lo",
            "Addresses": [
                { "Address": "127.0.0.1", "PrefixLen": 8 },
                { "Address": "::1", "PrefixLen": 128 }
            ],
            "Routes": [
                { "Destination": { "IP": "127.0.0.0", "Mask": "/wAAAA==" }, "Gateway": null },
                { "Destination": { "IP": "::1", "Mask": "/////////////////////w==" }, "Gateway": null }
            ],
            "GVisorGRO": false
        }],
        "FDBasedLinks": null,
        "XDPLinks": null,
        "PCAP": false,
        "LogPackets": false,
        "NATBlob": false,
        "DisconnectOk": false
    })
}

struct Conn {
    path: String,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn connect(path: &str) -> Result<Self, ControlError> {
        let err = |source| ControlError::Socket {
            path: path.to_string(),
            source,
        };
        // A socket path too long for sockaddr_un is reached through /proc/self/fd.
        let stream = if path.len() >= 108 {
            let f = File::options()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(path)
                .map_err(err)?;
            UnixStream::connect(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(err)?
        } else {
            UnixStream::connect(path).map_err(err)?
        };
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(err)?;
        let reader = BufReader::new(stream.try_clone().map_err(err)?);
        Ok(Conn {
            path: path.to_string(),
            stream,
            reader,
        })
    }

    fn call(
        &mut self,
        method: &'static str,
        arg: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ControlError> {
        let err = |source| ControlError::Socket {
            path: self.path.clone(),
            source,
        };
        let data = serde_json::to_vec(&json!({ "method": method, "arg": arg }))
            .map_err(|e| err(std::io::Error::other(e)))?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = if raw.is_empty() {
            0
        } else {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&data)],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .map_err(|e| err(std::io::Error::from(e)))?
        };
        self.stream.write_all(&data[sent..]).map_err(err)?;
        let mut de = serde_json::Deserializer::from_reader(&mut self.reader);
        let answer: Value =
            serde::Deserialize::deserialize(&mut de).map_err(|e| err(std::io::Error::other(e)))?;
        if answer["success"].as_bool() == Some(true) {
            Ok(answer["result"].clone())
        } else {
            Err(ControlError::Refused {
                method,
                err: answer["err"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A stand-in sentry: answers each call with `answers` in turn, recording what it got.
    fn fake_sentry(
        dir: &Path,
        answers: Vec<Value>,
    ) -> (String, std::thread::JoinHandle<Vec<(Value, usize)>>) {
        let sock = dir.join("ctl.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let handle = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut reader = conn.try_clone().expect("clone");
            let mut writer = conn;
            for answer in answers {
                // Read one JSON object with any descriptors that came with its first bytes.
                let mut buf = vec![0u8; 65536];
                let mut cmsg = nix::cmsg_space!([i32; 8]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg = nix::sys::socket::recvmsg::<()>(
                    reader.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                )
                .expect("recvmsg");
                let mut nfds = 0;
                for c in msg.cmsgs().expect("cmsgs") {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                        nfds += fds.len();
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                    }
                }
                let n = msg.bytes;
                let mut bytes = buf[..n].to_vec();
                while serde_json::from_slice::<Value>(&bytes).is_err() {
                    let mut more = [0u8; 4096];
                    let m = reader.read(&mut more).expect("read");
                    assert!(m > 0, "call cut short");
                    bytes.extend_from_slice(&more[..m]);
                }
                got.push((serde_json::from_slice(&bytes).expect("json"), nfds));
                writer
                    .write_all(&serde_json::to_vec(&answer).expect("answer"))
                    .expect("write");
            }
            got
        });
        (sock.display().to_string(), handle)
    }

    fn setup(dir: &Path, socket: &str, status: &str) {
        let state = json!({
            "id": "s1",
            "status": status,
            "sandbox": { "id": "s1", "controlSocketPath": socket, "pid": 1 },
            "saver": { "rootDir": dir.display().to_string() }
        });
        std::fs::write(state_path(dir, "s1"), state.to_string()).expect("state");
        let img = dir.join("img");
        std::fs::create_dir_all(&img).expect("img");
        for f in ["checkpoint.img", "pages_meta.img", "pages.img"] {
            std::fs::write(img.join(f), b"x").expect("file");
        }
    }

    #[test]
    fn restore_sends_runsc_calls_and_marks_running() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = json!({ "success": true, "err": "", "result": {} });
        let (sock, sentry) = fake_sentry(dir.path(), vec![ok.clone(), ok]);
        setup(dir.path(), &sock, "created");
        restore(dir.path(), "s1", &dir.path().join("img"), true).expect("restore");
        let got = sentry.join().expect("sentry");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0["method"], "Network.CreateLinksAndRoutes");
        assert_eq!(got[0].0["arg"]["LoopbackLinks"][0]["Name"], "lo");
        assert_eq!(got[0].1, 0);
        assert_eq!(got[1].0["method"], "containerManager.Restore");
        assert_eq!(got[1].0["arg"]["HavePagesFile"], true);
        assert_eq!(
            got[1].1, 3,
            "state, page metadata and pages files are passed"
        );
        let state: Value =
            serde_json::from_slice(&std::fs::read(state_path(dir.path(), "s1")).expect("read"))
                .expect("json");
        assert_eq!(state["status"], "running");
        assert_eq!(state["saver"]["rootDir"], dir.path().display().to_string());
    }

    #[test]
    fn refusal_is_reported_and_state_unchanged() {
        let dir = tempfile::tempdir().expect("tmp");
        let no = json!({ "success": false, "err": "cannot restore a started container", "result": null });
        let (sock, sentry) = fake_sentry(dir.path(), vec![no]);
        setup(dir.path(), &sock, "created");
        let e = restore(dir.path(), "s1", &dir.path().join("img"), false).expect_err("refused");
        assert!(
            e.to_string().contains("cannot restore a started container"),
            "{e}"
        );
        sentry.join().expect("sentry");
        let state: Value =
            serde_json::from_slice(&std::fs::read(state_path(dir.path(), "s1")).expect("read"))
                .expect("json");
        assert_eq!(state["status"], "created");
    }

    #[test]
    fn only_created_containers_are_restored() {
        let dir = tempfile::tempdir().expect("tmp");
        setup(dir.path(), "/nonexistent.sock", "running");
        let e = restore(dir.path(), "s1", &dir.path().join("img"), true).expect_err("running");
        assert!(matches!(e, ControlError::NotCreated { .. }), "{e}");
    }
}
