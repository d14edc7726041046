//! The agent's stdout: frames to the worker, and the runtime's output as `Log` frames.
//!
//! Every writer goes through one [`Output`] behind a mutex. A thread that has a frame to send
//! (an [`Emitter`]) takes the lock, forwards whatever the runtime's stdout and stderr pipes hold
//! right now as `Log` frames, and writes its frame, all on its own thread: so output the runtime
//! wrote before an HTTP request always reaches the worker before the frame that request caused,
//! and a response costs no hand-off to another thread (inside gVisor every hand-off and every
//! system call is a round trip through the sentry). The pump thread only waits for runtime
//! output that no frame carries along and forwards it the same way.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hearth_proto::{AgentMsg, write_frame};

/// Largest `Log` frame body; more pending output is split over several frames.
const LOG_FRAME: usize = 64 * 1024;
/// Most bytes taken from one pipe per drain, so a runtime that never stops writing cannot
/// starve the requested frames (a pipe never holds more than this when the writer is blocked).
const DRAIN_CAP: usize = 4 * 1024 * 1024;

/// Set once a shutdown starts: a worker that hung up then is no error.
pub static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Set when the worker broke the protocol: the agent exits 1 whichever thread exits first
/// (killing the runtime makes the reaper report its exit and exit too).
pub static PROTOCOL_FAILED: AtomicBool = AtomicBool::new(false);

/// `code`, or 1 once the protocol failed.
pub fn exit_code(code: i32) -> i32 {
    if PROTOCOL_FAILED.load(Ordering::SeqCst) {
        1
    } else {
        code
    }
}

/// One of the runtime's output pipes. Its descriptor stays open (and out of the poll set once
/// the pipe ended) until the agent exits, so a descriptor the pump is polling is never closed
/// and reused under it.
struct LogPipe {
    fd: OwnedFd,
    open: bool,
}

/// The agent's stdout and the runtime's output pipes.
struct Output {
    out: Box<dyn Write + Send>,
    logs: Vec<LogPipe>,
    runtime_pid: Option<i32>,
    buf: Vec<u8>,
}

/// The shared [`Output`] both handles lock.
#[derive(Clone)]
struct Shared(Arc<Mutex<Output>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle to send frames; cheap to clone. A send writes on the calling thread.
#[derive(Clone)]
pub struct Emitter {
    output: Shared,
}

impl Emitter {
    /// Write a frame, after all runtime output pending right now.
    pub fn send(&self, msg: AgentMsg, body: Vec<u8>) {
        let mut o = self.output.lock();
        o.drain_logs();
        o.write(&msg, &body);
    }

    /// Forward the runtime output pending now, flush and exit the process.
    pub fn exit(&self, code: i32) -> ! {
        let mut o = self.output.lock();
        o.drain_logs();
        let _ = o.out.flush();
        std::process::exit(exit_code(code));
    }
}

/// The pump's handle; [`Pump::run`] takes over the calling thread.
pub struct Pump {
    output: Shared,
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

/// An emitter and a pump writing to the process's stdout.
pub fn channel() -> (Emitter, Pump) {
    channel_to(Box::new(io::stdout()))
}

fn channel_to(out: Box<dyn Write + Send>) -> (Emitter, Pump) {
    let output = Shared(Arc::new(Mutex::new(Output {
        out,
        logs: Vec::new(),
        runtime_pid: None,
        buf: vec![0; LOG_FRAME],
    })));
    (
        Emitter {
            output: output.clone(),
        },
        Pump { output },
    )
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

/// `poll` the descriptors; `timeout_ms` -1 waits. Interrupted or failed polls report nothing
/// ready (the callers poll again or drain on their next frame).
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` holds fds.len() initialised pollfd structs.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(n as usize)
}

impl Output {
    fn pollfds(&self) -> Vec<libc::pollfd> {
        self.logs
            .iter()
            .filter(|p| p.open)
            .map(|p| libc::pollfd {
                fd: p.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect()
    }

    /// Forward everything readable now on the runtime's pipes, as coalesced `Log` frames. One
    /// `poll` finds the pipes that hold anything; only those are read.
    fn drain_logs(&mut self) {
        let mut fds = self.pollfds();
        if fds.is_empty() || poll(&mut fds, 0).unwrap_or(0) == 0 {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut len = 0;
        for p in fds.iter().filter(|p| p.revents != 0) {
            let mut taken = 0;
            let mut closed = false;
            while taken < DRAIN_CAP {
                if len == buf.len() {
                    self.write(&AgentMsg::Log, &buf);
                    len = 0;
                }
                match read_fd(p.fd, &mut buf[len..]) {
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
                for log in self.logs.iter_mut().filter(|l| l.fd.as_raw_fd() == p.fd) {
                    log.open = false;
                }
            }
        }
        if len > 0 {
            self.write(&AgentMsg::Log, &buf[..len]);
        }
        self.buf = buf;
    }

    fn write(&mut self, msg: &AgentMsg, body: &[u8]) {
        if let Err(e) = write_frame(&mut self.out, msg, body) {
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

impl Pump {
    /// Forward this pipe (the runtime's stdout or stderr) as `Log` frames.
    pub fn attach(&mut self, fd: OwnedFd) -> io::Result<()> {
        set_nonblocking(fd.as_raw_fd())?;
        self.output.lock().logs.push(LogPipe { fd, open: true });
        Ok(())
    }

    /// The runtime's pid: killed (with its process group) if the worker channel breaks.
    pub fn set_runtime(&mut self, pid: i32) {
        self.output.lock().runtime_pid = Some(pid);
    }

    /// Write a frame right away, draining nothing (the `Hello` that must come first, or the
    /// `InitError` refusing a deferred start).
    pub fn write_now(&self, msg: &AgentMsg, body: &[u8]) {
        self.output.lock().write(msg, body);
    }

    /// Forward runtime output as it comes, until every pipe has ended; then the thread ends.
    pub fn run(self) {
        loop {
            let mut fds = self.output.lock().pollfds();
            if fds.is_empty() {
                return;
            }
            match poll(&mut fds, -1) {
                Ok(0) => continue,
                Ok(_) => self.output.lock().drain_logs(),
                Err(e) => self.output.lock().fail(&format!("poll: {e}")),
            }
        }
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

    /// A stdout the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        /// The frames written since the last call.
        fn frames(&self) -> Vec<Frame<AgentMsg>> {
            let bytes = std::mem::take(&mut *self.0.lock().expect("sink"));
            let mut out = bytes.as_slice();
            let mut frames = Vec::new();
            while !out.is_empty() {
                frames.push(read_frame(&mut out).expect("frame"));
            }
            frames
        }
    }

    use std::os::fd::FromRawFd;

    #[test]
    fn pending_output_is_written_before_a_sent_frame() {
        let sink = Sink::default();
        let (emitter, mut pump) = channel_to(Box::new(sink.clone()));
        let (stdout_r, mut stdout_w) = pipe();
        let (stderr_r, mut stderr_w) = pipe();
        pump.attach(stdout_r).expect("attach");
        pump.attach(stderr_r).expect("attach");

        // Three writes on stdout and one on stderr, then the frame: one coalesced Log first.
        for chunk in [b"one\n", b"two\n", b"six\n"] {
            stdout_w.write_all(chunk).expect("write");
        }
        stderr_w.write_all(b"err\n").expect("write");
        let response = AgentMsg::Response {
            request_id: "r".into(),
        };
        emitter.send(response.clone(), b"body".to_vec());
        let got = sink.frames();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].msg, AgentMsg::Log);
        assert_eq!(got[0].body, b"one\ntwo\nsix\nerr\n");
        assert_eq!(
            (&got[1].msg, got[1].body.as_slice()),
            (&response, &b"body"[..])
        );

        // Nothing pending: the next frame comes alone.
        emitter.send(AgentMsg::RestoreReady, Vec::new());
        let got = sink.frames();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].msg, AgentMsg::RestoreReady);
    }

    #[test]
    fn large_output_is_split_into_bounded_frames_and_eof_detaches() {
        let sink = Sink::default();
        let (_emitter, mut pump) = channel_to(Box::new(sink.clone()));
        let (r, mut w) = pipe();
        // SAFETY: F_SETPIPE_SZ on a pipe we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024) };
        pump.attach(r).expect("attach");
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).expect("write");
        drop(w);

        // The pump forwards it all and ends once its only pipe has ended.
        let pumping = std::thread::spawn(move || pump.run());
        pumping.join().expect("pump");
        let got = sink.frames();
        assert!(got.len() >= 3 && got.iter().all(|f| f.body.len() <= LOG_FRAME));
        let joined: Vec<u8> = got.into_iter().flat_map(|f| f.body).collect();
        assert_eq!(joined, data);
    }

    #[test]
    fn the_pump_forwards_output_no_frame_carries() {
        let sink = Sink::default();
        let (_emitter, mut pump) = channel_to(Box::new(sink.clone()));
        let (r, mut w) = pipe();
        pump.attach(r).expect("attach");
        let pumping = std::thread::spawn(move || pump.run());
        w.write_all(b"hello\n").expect("write");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            seen = sink.frames();
        }
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            (&seen[0].msg, seen[0].body.as_slice()),
            (&AgentMsg::Log, &b"hello\n"[..])
        );
        drop(w);
        pumping.join().expect("pump");
    }
}
