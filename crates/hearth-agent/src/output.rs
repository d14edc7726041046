//! The output pump: the one thread that writes the agent's stdout.
//!
//! It polls the runtime's stdout and stderr pipes plus a control pipe. Other threads hand it
//! frames through an [`Emitter`] (a channel, then one byte on the control pipe to wake it).
//! Before writing any batch of requested frames it drains whatever the runtime's pipes hold and
//! writes that as `Log` frames first: so output the runtime wrote before an HTTP request always
//! reaches the worker before the frame that request caused.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};

use hearth_proto::{AgentMsg, write_frame};

/// Largest `Log` frame body; more pending output is split over several frames.
const LOG_FRAME: usize = 64 * 1024;
/// Most bytes taken from one pipe per drain, so a runtime that never stops writing cannot
/// starve the requested frames (a pipe never holds more than this when the writer is blocked).
const DRAIN_CAP: usize = 4 * 1024 * 1024;

/// Set once a shutdown starts: a worker that hung up then is no error.
pub static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Set when the worker broke the protocol: the agent exits 1 whichever thread exits first
/// (killing the runtime makes the pump report its exit and exit too).
pub static PROTOCOL_FAILED: AtomicBool = AtomicBool::new(false);

/// `code`, or 1 once the protocol failed.
pub fn exit_code(code: i32) -> i32 {
    if PROTOCOL_FAILED.load(Ordering::SeqCst) {
        1
    } else {
        code
    }
}

enum Cmd {
    Frame(AgentMsg, Vec<u8>),
    Exit(i32),
}

/// A handle to ask the pump for frames; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Emitter {
    tx: Sender<Cmd>,
    wake: Arc<OwnedFd>,
}

impl Emitter {
    /// Queue a frame; it is written after all runtime output pending right now.
    pub fn send(&self, msg: AgentMsg, body: Vec<u8>) {
        self.push(Cmd::Frame(msg, body));
    }

    /// Queue an exit: the pump writes everything queued before it, flushes and exits.
    pub fn exit(&self, code: i32) {
        self.push(Cmd::Exit(code));
    }

    fn push(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            // SAFETY: writes one byte from a live buffer to a pipe we own. A full pipe (EAGAIN)
            // already holds a wake-up, so the result does not matter.
            let _ = unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }
}

/// The pump's state; [`Pump::run`] takes over the calling thread.
pub struct Pump {
    rx: Receiver<Cmd>,
    wake: OwnedFd,
    logs: Vec<OwnedFd>,
    runtime_pid: Option<i32>,
    buf: Vec<u8>,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Create a connected emitter and pump.
pub fn channel() -> io::Result<(Emitter, Pump)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both descriptors and nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let (tx, rx) = mpsc::channel();
    let emitter = Emitter {
        tx,
        wake: Arc::new(w),
    };
    let pump = Pump {
        rx,
        wake: r,
        logs: Vec::new(),
        runtime_pid: None,
        buf: vec![0; LOG_FRAME],
    };
    Ok((emitter, pump))
}

enum Read {
    Data(usize),
    Empty,
    Closed,
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> Read {
    loop {
        // SAFETY: reads at most buf.len() bytes into a live, exclusively borrowed buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Read::Data(n as usize);
        }
        if n == 0 {
            return Read::Closed;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Read::Empty,
            _ => return Read::Closed,
        }
    }
}

impl Pump {
    /// Forward this pipe (the runtime's stdout or stderr) as `Log` frames.
    pub fn attach(&mut self, fd: OwnedFd) -> io::Result<()> {
        set_nonblocking(fd.as_raw_fd())?;
        self.logs.push(fd);
        Ok(())
    }

    /// The runtime's pid: killed (with its process group) if the worker channel breaks.
    pub fn set_runtime(&mut self, pid: i32) {
        self.runtime_pid = Some(pid);
    }

    /// Write a frame right away, before [`Pump::run`] starts (the `Hello` that must come first,
    /// or the `InitError` refusing a deferred start).
    pub fn write_now(&self, msg: &AgentMsg, body: &[u8]) {
        self.write(&mut io::stdout().lock(), msg, body);
    }

    /// Run the pump forever; the process exits from here on an `Exit` or a dead stdout.
    pub fn run(mut self) -> ! {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        loop {
            let mut fds: Vec<libc::pollfd> = std::iter::once(&self.wake)
                .chain(&self.logs)
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` holds fds.len() initialised pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.fail(&format!("poll: {e}"));
            }
            if fds[1..].iter().any(|p| p.revents != 0) {
                self.drain_logs(&mut out);
            }
            if fds[0].revents != 0 {
                while let Read::Data(_) = read_fd(self.wake.as_raw_fd(), &mut [0u8; 256]) {}
                self.run_commands(&mut out);
            }
        }
    }

    /// Write every queued command, each batch after the runtime output pending when it was taken.
    fn run_commands(&mut self, out: &mut impl Write) {
        loop {
            // Drain first: every command taken below was queued before this point, so any
            // output the runtime produced before causing it is in the pipes now.
            self.drain_logs(out);
            let batch: Vec<Cmd> = self.rx.try_iter().collect();
            if batch.is_empty() {
                return;
            }
            for cmd in batch {
                match cmd {
                    Cmd::Frame(msg, body) => self.write(out, &msg, &body),
                    Cmd::Exit(code) => {
                        let _ = out.flush();
                        std::process::exit(exit_code(code));
                    }
                }
            }
        }
    }

    /// Read everything readable now from the runtime's pipes, as coalesced `Log` frames.
    fn drain_logs(&mut self, out: &mut impl Write) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut len = 0;
        let mut i = 0;
        while i < self.logs.len() {
            let fd = self.logs[i].as_raw_fd();
            let mut taken = 0;
            let mut closed = false;
            while taken < DRAIN_CAP {
                if len == buf.len() {
                    self.write(out, &AgentMsg::Log, &buf);
                    len = 0;
                }
                match read_fd(fd, &mut buf[len..]) {
                    Read::Data(n) => {
                        len += n;
                        taken += n;
                    }
                    Read::Empty => break,
                    Read::Closed => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                self.logs.remove(i);
            } else {
                i += 1;
            }
        }
        if len > 0 {
            self.write(out, &AgentMsg::Log, &buf[..len]);
        }
        self.buf = buf;
    }

    fn write(&self, out: &mut impl Write, msg: &AgentMsg, body: &[u8]) {
        if let Err(e) = write_frame(out, msg, body) {
            self.fail(&format!("cannot write to the worker: {e}"));
        }
    }

    /// The channel to the worker is gone: nothing more can be reported, so stop everything.
    fn fail(&self, why: &str) -> ! {
        let shutting_down = SHUTTING_DOWN.load(Ordering::SeqCst);
        if !shutting_down {
            eprintln!("hearth-agent: {why}");
        }
        if let Some(pid) = self.runtime_pid {
            crate::process::signal_group(pid, libc::SIGKILL);
        }
        std::process::exit(exit_code(if shutting_down { 0 } else { 1 }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::{Frame, read_frame};
    use std::fs::File;

    fn pipe() -> (OwnedFd, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: just created, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn frames(mut out: &[u8]) -> Vec<Frame<AgentMsg>> {
        let mut frames = Vec::new();
        while !out.is_empty() {
            frames.push(read_frame(&mut out).expect("frame"));
        }
        frames
    }

    #[test]
    fn pending_output_is_written_before_requested_frames() {
        let (emitter, mut pump) = channel().expect("channel");
        let (stdout_r, mut stdout_w) = pipe();
        let (stderr_r, mut stderr_w) = pipe();
        pump.attach(stdout_r).expect("attach");
        pump.attach(stderr_r).expect("attach");

        // Three writes on stdout and one on stderr, then the request: one coalesced Log first.
        for chunk in [b"one\n", b"two\n", b"six\n"] {
            stdout_w.write_all(chunk).expect("write");
        }
        stderr_w.write_all(b"err\n").expect("write");
        let response = AgentMsg::Response {
            request_id: "r".into(),
        };
        emitter.send(response.clone(), b"body".to_vec());

        let mut out = Vec::new();
        pump.run_commands(&mut out);
        let got = frames(&out);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].msg, AgentMsg::Log);
        assert_eq!(got[0].body, b"one\ntwo\nsix\nerr\n");
        assert_eq!(
            (&got[1].msg, got[1].body.as_slice()),
            (&response, &b"body"[..])
        );

        // Nothing pending, nothing queued: nothing written.
        let mut out = Vec::new();
        pump.run_commands(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn large_output_is_split_into_bounded_frames_and_eof_detaches() {
        let (_emitter, mut pump) = channel().expect("channel");
        let (r, mut w) = pipe();
        // SAFETY: F_SETPIPE_SZ on a pipe we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024) };
        pump.attach(r).expect("attach");
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).expect("write");
        drop(w);

        let mut out = Vec::new();
        pump.drain_logs(&mut out);
        let got = frames(&out);
        assert!(got.len() >= 3 && got.iter().all(|f| f.body.len() <= LOG_FRAME));
        let joined: Vec<u8> = got.into_iter().flat_map(|f| f.body).collect();
        assert_eq!(joined, data);
        assert!(pump.logs.is_empty(), "a closed pipe is no longer polled");
    }
}
