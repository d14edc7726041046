//! The Lambda Runtime API (`/2018-06-01/runtime/...`): the invocation state machine shared by
//! the connection threads, the worker reader and the reaper, and the per-connection loop.
//!
//! Responses are read whole (up to 6 MB) and sent as one frame, except a streamed response
//! (`Lambda-Runtime-Function-Response-Mode: streaming`): its connection thread forwards the
//! body as it arrives, in `StreamChunk` frames, without buffering it, and reads the error a
//! runtime may report in the trailers once the body ends. A streamed response is not retried
//! or re-read: what was forwarded is the caller's.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hearth_proto::{AgentMsg, InvokeMeta, MAX_STREAM_PAYLOAD, MAX_SYNC_PAYLOAD, STREAM_CHUNK};
use serde_json::{Value, json};

use crate::http::{self, Body, BodyStream, Framing, Head, HttpError};
use crate::output::Emitter;

/// Where init stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// The runtime is initialising: it has neither called `next` nor posted `init/error`.
    Running,
    /// The runtime posted `init/error`, exited before its first `next`, or never started.
    Failed,
    /// The runtime called `next` once: init is over.
    Done,
}

/// The invocation handed to the runtime most recently.
struct Current {
    request_id: String,
    answered: bool,
}

/// A `next` long-poll parked on its connection. The thread that queues the next invocation
/// (the worker reader) writes the answer straight onto the socket: the connection's own thread
/// stays blocked reading the runtime's next request, with no hand-off between the two (inside
/// gVisor a hand-off between threads costs round trips through the sentry).
struct Parked {
    conn: u64,
    stream: TcpStream,
    keep_alive: bool,
}

struct State {
    init: Init,
    /// At most one parked `next` (other concurrent ones wait on the condvar).
    parked: Option<Parked>,
    /// Invocations from the worker that no `next` has taken yet.
    pending: VecDeque<(InvokeMeta, Vec<u8>)>,
    current: Option<Current>,
    /// The worker sent `Restore` and no `restore/next` has consumed it yet.
    restored: bool,
    runtime_exited: bool,
}

/// State shared by every thread of the agent.
pub struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    out: Emitter,
    snap_start: bool,
    started: Instant,
}

/// An answer to one request.
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// The invocation this reply hands out (`next`): put back if the reply cannot be written.
    handed_out: Option<InvokeMeta>,
}

impl Reply {
    fn new(status: u16, body: Vec<u8>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body,
            handed_out: None,
        }
    }

    fn accepted() -> Self {
        Reply::new(202, br#"{"status":"OK"}"#.to_vec())
    }

    fn error(status: u16, error_type: &str, message: &str) -> Self {
        Reply::new(status, error_doc(error_type, message))
    }

    fn invalid_state(message: &str) -> Self {
        Reply::error(403, "InvalidStateTransition", message)
    }
}

/// `{"errorMessage": …, "errorType": …}`.
pub fn error_doc(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"errorMessage": message, "errorType": error_type}))
        .unwrap_or_default()
}

/// The error type and error document of an error a runtime posted: the type comes from the
/// `Lambda-Runtime-Function-Error-Type` header, else the body's `errorType`, else `default`;
/// a body that is not a JSON object is wrapped into an error document.
pub fn runtime_error(header: Option<&str>, body: Vec<u8>, default: &str) -> (String, Vec<u8>) {
    let parsed = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    };
    let from_body = parsed
        .as_ref()
        .and_then(|m| m.get("errorType"))
        .and_then(Value::as_str);
    let error_type = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .or(from_body.filter(|t| !t.is_empty()))
        .unwrap_or(default)
        .to_string();
    let doc = if parsed.is_some() {
        body
    } else {
        error_doc(&error_type, &String::from_utf8_lossy(&body))
    };
    (error_type, doc)
}

impl Shared {
    pub fn new(out: Emitter, snap_start: bool, started: Instant) -> Self {
        Shared {
            state: Mutex::new(State {
                init: Init::Running,
                parked: None,
                pending: VecDeque::new(),
                current: None,
                restored: false,
                runtime_exited: false,
            }),
            cond: Condvar::new(),
            out,
            snap_start,
            started,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// The worker sent an invocation.
    pub fn invoke(&self, meta: InvokeMeta, event: Vec<u8>) {
        let mut st = self.lock();
        st.pending.push_back((meta, event));
        if !self.dispatch(st) {
            self.cond.notify_all();
        }
    }

    /// Hand the first queued invocation to a parked `next`, if there is one and no invocation
    /// is out: true if it was written to the parked connection. The write happens after the
    /// state lock is released (a runtime slow to read a large event holds up no one else).
    fn dispatch<'a>(&'a self, mut st: MutexGuard<'a, State>) -> bool {
        loop {
            if st.parked.is_none() || st.current.as_ref().is_some_and(|c| !c.answered) {
                return false;
            }
            let Some((meta, event)) = st.pending.pop_front() else {
                return false;
            };
            let Some(parked) = st.parked.take() else {
                return false;
            };
            let request_id = meta.request_id.clone();
            st.current = Some(Current {
                request_id: request_id.clone(),
                answered: false,
            });
            drop(st);
            let reply = invocation_reply(meta, event);
            let mut stream = &parked.stream;
            let written = http::write_response(
                &mut stream,
                reply.status,
                &reply.headers,
                &reply.body,
                parked.keep_alive,
            );
            if written.is_ok() {
                if !parked.keep_alive {
                    let _ = parked.stream.shutdown(Shutdown::Both);
                }
                return true;
            }
            // The runtime hung up on its `next`: the invocation waits for another.
            st = self.lock();
            if st
                .current
                .as_ref()
                .is_some_and(|c| c.request_id == request_id && !c.answered)
                && let Some(meta) = reply.handed_out
            {
                st.current = None;
                st.pending.push_front((meta, reply.body));
            }
        }
    }

    /// The connection `conn` ended: a `next` parked on it waits no more.
    pub fn unpark(&self, conn: u64) {
        let mut st = self.lock();
        if st.parked.as_ref().is_some_and(|p| p.conn == conn) {
            st.parked = None;
        }
    }

    /// The worker says the sandbox was restored from a snapshot.
    pub fn restored(&self) {
        self.lock().restored = true;
        self.cond.notify_all();
    }

    /// Init failed before the runtime could start (no bootstrap).
    pub fn fail_init(&self, error_type: &str, message: &str) {
        let mut st = self.lock();
        st.init = Init::Failed;
        self.out.send(
            AgentMsg::InitError {
                error_type: error_type.into(),
            },
            error_doc(error_type, message),
        );
    }

    /// The reaper saw the runtime exit: report it (as an init error too if init never ended),
    /// then exit.
    pub fn runtime_exited(&self, status: String) {
        let mut st = self.lock();
        if st.init == Init::Running {
            st.init = Init::Failed;
            let message = if status == "exit status 0" {
                "Runtime exited without providing a reason".to_string()
            } else {
                format!("Runtime exited with error: {status}")
            };
            self.out.send(
                AgentMsg::InitError {
                    error_type: "Runtime.ExitError".into(),
                },
                error_doc("Runtime.ExitError", &message),
            );
        }
        st.runtime_exited = true;
        self.cond.notify_all();
        self.out.send(AgentMsg::RuntimeExit { status }, Vec::new());
        self.out.exit(0)
    }

    /// Wait up to `timeout` for the runtime to exit; true if it did.
    pub fn wait_runtime_exit(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .cond
            .wait_timeout_while(st, timeout, |st| !st.runtime_exited)
            .unwrap_or_else(|e| e.into_inner());
        st.runtime_exited
    }

    /// Forward the runtime's pending output and exit.
    pub fn exit(&self, code: i32) -> ! {
        self.out.exit(code)
    }

    /// Put back an invocation whose `next` reply could not be delivered.
    fn requeue(&self, meta: InvokeMeta, event: Vec<u8>) {
        let mut st = self.lock();
        if st
            .current
            .as_ref()
            .is_some_and(|c| c.request_id == meta.request_id && !c.answered)
        {
            st.current = None;
            st.pending.push_front((meta, event));
            if !self.dispatch(st) {
                self.cond.notify_all();
            }
        }
    }

    /// Route one request; `trailers` are a chunked body's trailer fields.
    pub fn route(&self, head: &Head, body: Body, trailers: &[(String, String)]) -> Reply {
        let Some(rest) = head.path.strip_prefix("/2018-06-01/runtime/") else {
            return not_found();
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let method = match segments.as_slice() {
            ["invocation", "next"] | ["restore", "next"] => "GET",
            ["invocation", _, "response" | "error"] | ["init" | "restore", "error"] => "POST",
            _ => return not_found(),
        };
        if head.method != method {
            let mut reply = Reply::error(405, "MethodNotAllowed", "method not allowed");
            reply.headers.push(("Allow", method.into()));
            return reply;
        }
        let error_type = head.header("Lambda-Runtime-Function-Error-Type");
        match segments.as_slice() {
            ["invocation", "next"] => self.next(),
            ["invocation", id, "response"] => match trailer_error(trailers) {
                // An error reported in the trailers of a response (as a streamed response
                // reports a mid-stream error) makes the invocation a function error.
                Some((error_type, doc)) => {
                    self.answer(id, Body::Full(doc), Some(Some(&error_type)))
                }
                None => self.answer(id, body, None),
            },
            ["invocation", id, _] => self.answer(id, body, Some(error_type)),
            ["init", _] => self.init_error(error_type, body),
            ["restore", "next"] => self.restore_next(),
            _ => self.restore_error(error_type, body),
        }
    }

    /// The start of every `next`: a refusal while an invocation is out or after a failed init;
    /// otherwise end init on the first call, forget the answered invocation and say nothing.
    fn begin_next(&self, st: &mut State) -> Option<Reply> {
        if st.current.as_ref().is_some_and(|c| !c.answered) {
            return Some(Reply::invalid_state(
                "the current invocation has not been answered",
            ));
        }
        match st.init {
            Init::Failed => {
                return Some(Reply::invalid_state("init failed: the runtime should exit"));
            }
            Init::Running => {
                st.init = Init::Done;
                let init_ms = self.started.elapsed().as_secs_f64() * 1000.0;
                self.out.send(AgentMsg::InitDone { init_ms }, Vec::new());
            }
            Init::Done => {}
        }
        st.current = None;
        None
    }

    /// `GET /runtime/invocation/next` on connection `conn`: the reply now (a queued invocation
    /// or a refusal), or `None` once parked: the next invocation is then written onto `stream`
    /// by whoever queues it. With a `next` already parked elsewhere it long-polls as
    /// [`Shared::route`] does.
    pub fn next_or_park(&self, conn: u64, stream: &TcpStream, keep_alive: bool) -> Option<Reply> {
        let mut st = self.lock();
        if let Some(reply) = self.begin_next(&mut st) {
            return Some(reply);
        }
        if st.parked.is_none()
            && st.pending.is_empty()
            && let Ok(stream) = stream.try_clone()
        {
            st.parked = Some(Parked {
                conn,
                stream,
                keep_alive,
            });
            return None;
        }
        Some(self.wait_next(st))
    }

    /// `GET /runtime/invocation/next`: end init on the first call, then long-poll.
    fn next(&self) -> Reply {
        let mut st = self.lock();
        if let Some(reply) = self.begin_next(&mut st) {
            return reply;
        }
        self.wait_next(st)
    }

    /// Wait for an invocation no other `next` has taken and hand it out.
    fn wait_next(&self, mut st: MutexGuard<'_, State>) -> Reply {
        let (meta, event) = loop {
            // Another long-poll may have taken an invocation meanwhile: wait for it to end.
            let free = st.current.as_ref().is_none_or(|c| c.answered);
            if let Some(next) = free.then(|| st.pending.pop_front()).flatten() {
                break next;
            }
            st = self.wait(st);
        };
        st.current = Some(Current {
            request_id: meta.request_id.clone(),
            answered: false,
        });
        drop(st);
        invocation_reply(meta, event)
    }

    /// `POST /runtime/invocation/{id}/response` (`error_type` None) or `.../error`.
    fn answer(&self, id: &str, body: Body, error_type: Option<Option<&str>>) -> Reply {
        let mut st = self.lock();
        match st.current.as_mut() {
            Some(c) if c.request_id == id && c.answered => {
                return Reply::invalid_state(&format!("invocation {id} was already answered"));
            }
            Some(c) if c.request_id == id => c.answered = true,
            _ => return Reply::error(400, "InvalidRequestID", "Invalid request ID"),
        }
        let request_id = id.to_string();
        let Body::Full(body) = body else {
            let message = format!(
                "Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."
            );
            self.out.send(
                AgentMsg::FunctionError {
                    request_id,
                    error_type: "Function.ResponseSizeTooLarge".into(),
                },
                error_doc("Function.ResponseSizeTooLarge", &message),
            );
            return Reply::error(413, "RequestEntityTooLarge", &message);
        };
        match error_type {
            None => self.out.send(AgentMsg::Response { request_id }, body),
            Some(header) => {
                let (error_type, doc) = runtime_error(header, body, "Unhandled");
                self.out.send(
                    AgentMsg::FunctionError {
                        request_id,
                        error_type,
                    },
                    doc,
                );
            }
        }
        self.release(st);
        Reply::accepted()
    }

    /// The current invocation was answered: an invocation queued meanwhile goes to a waiting
    /// `next`.
    fn release<'a>(&'a self, st: MutexGuard<'a, State>) {
        if !st.pending.is_empty() && !self.dispatch(st) {
            self.cond.notify_all();
        }
    }

    /// `POST /runtime/invocation/{id}/response` with `Lambda-Runtime-Function-Response-Mode:
    /// streaming`: the body is forwarded to the worker as it arrives (`StreamStart`, then
    /// `StreamChunk`s), and ends in `StreamEnd`, or in `FunctionError` when the trailers
    /// report an error, the runtime breaks the body off (`Runtime.TruncatedResponse`) or sends
    /// more than [`MAX_STREAM_PAYLOAD`] (`Function.ResponseSizeTooLarge`). The bytes already
    /// forwarded stay forwarded. `None`: no reply can be written (the connection broke).
    fn stream(&self, id: &str, head: &Head, r: &mut impl io::BufRead) -> Option<Reply> {
        {
            let mut st = self.lock();
            match st.current.as_mut() {
                Some(c) if c.request_id == id && c.answered => {
                    return Some(Reply::invalid_state(&format!(
                        "invocation {id} was already answered"
                    )));
                }
                Some(c) if c.request_id == id => c.answered = true,
                _ => return Some(Reply::error(400, "InvalidRequestID", "Invalid request ID")),
            }
            self.out.send(
                AgentMsg::StreamStart {
                    request_id: id.to_string(),
                    content_type: head.header("Content-Type").map(str::to_string),
                },
                Vec::new(),
            );
            self.release(st);
        }
        let fail = |error_type: &str, message: &str| {
            self.out.send(
                AgentMsg::FunctionError {
                    request_id: id.to_string(),
                    error_type: error_type.to_string(),
                },
                error_doc(error_type, message),
            );
        };
        let mut body = BodyStream::new(head.framing);
        let mut sent = 0usize;
        loop {
            match body.next(r, STREAM_CHUNK) {
                Ok(Some(piece)) => {
                    sent += piece.len();
                    if sent > MAX_STREAM_PAYLOAD {
                        let message = format!(
                            "Response payload size exceeded maximum allowed payload size \
                             ({MAX_STREAM_PAYLOAD} bytes)."
                        );
                        fail("Function.ResponseSizeTooLarge", &message);
                        return Some(Reply::error(413, "RequestEntityTooLarge", &message));
                    }
                    self.out.send(
                        AgentMsg::StreamChunk {
                            request_id: id.to_string(),
                        },
                        piece,
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    fail(
                        "Runtime.TruncatedResponse",
                        &format!("the runtime's streamed response broke off: {e}"),
                    );
                    return match e {
                        HttpError::Io(_) => None,
                        HttpError::Malformed(_) => {
                            Some(Reply::error(400, "InvalidRequest", &e.to_string()))
                        }
                    };
                }
            }
        }
        match trailer_error(body.trailers()) {
            Some((error_type, doc)) => self.out.send(
                AgentMsg::FunctionError {
                    request_id: id.to_string(),
                    error_type,
                },
                doc,
            ),
            None => self.out.send(
                AgentMsg::StreamEnd {
                    request_id: id.to_string(),
                },
                Vec::new(),
            ),
        }
        Some(Reply::accepted())
    }

    /// `POST /runtime/init/error`: only while init runs.
    fn init_error(&self, header: Option<&str>, body: Body) -> Reply {
        let Body::Full(body) = body else {
            return too_large();
        };
        let mut st = self.lock();
        if st.init != Init::Running {
            return Reply::invalid_state("init/error is only allowed during init");
        }
        st.init = Init::Failed;
        let (error_type, doc) = runtime_error(header, body, "Runtime.Unknown");
        self.out.send(AgentMsg::InitError { error_type }, doc);
        Reply::accepted()
    }

    /// `GET /runtime/restore/next`: snapshot-ready; returns once the worker restored us.
    fn restore_next(&self) -> Reply {
        if !self.snap_start {
            return Reply::error(
                403,
                "Runtime.NotASnapshot",
                "not a snapshot: restore hooks are only available with SnapStart",
            );
        }
        let mut st = self.lock();
        if st.init != Init::Running {
            return Reply::invalid_state("restore/next is only allowed during init");
        }
        self.out.send(AgentMsg::RestoreReady, Vec::new());
        while !st.restored {
            st = self.wait(st);
        }
        st.restored = false;
        Reply::new(200, Vec::new())
    }

    /// `POST /runtime/restore/error`.
    fn restore_error(&self, header: Option<&str>, body: Body) -> Reply {
        let Body::Full(body) = body else {
            return too_large();
        };
        let (error_type, doc) = runtime_error(header, body, "Runtime.Unknown");
        self.out.send(AgentMsg::RestoreError { error_type }, doc);
        Reply::accepted()
    }
}

/// The error a runtime reported in a response's trailers: `Lambda-Runtime-Function-Error-Type`
/// and `Lambda-Runtime-Function-Error-Body` (base64 of the error document; a body that is not
/// base64 is taken as the message). `None` when there is no error type.
fn trailer_error(trailers: &[(String, String)]) -> Option<(String, Vec<u8>)> {
    let field = |name: &str| {
        trailers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let error_type = field("Lambda-Runtime-Function-Error-Type").filter(|t| !t.is_empty())?;
    let body = field("Lambda-Runtime-Function-Error-Body").unwrap_or_default();
    let body = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap_or_else(|_| body.as_bytes().to_vec());
    Some(runtime_error(Some(error_type), body, "Unhandled"))
}

/// Whether a request is a streamed invocation response; its request id if so.
fn streamed_response(head: &Head) -> Option<&str> {
    let streaming = head
        .header("Lambda-Runtime-Function-Response-Mode")
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("streaming"));
    let id = head
        .path
        .strip_prefix("/2018-06-01/runtime/invocation/")?
        .strip_suffix("/response")?;
    (streaming && head.method == "POST" && !id.contains('/')).then_some(id)
}

/// The answer to a `next` that hands out this invocation.
fn invocation_reply(meta: InvokeMeta, event: Vec<u8>) -> Reply {
    let mut headers = vec![
        ("Lambda-Runtime-Aws-Request-Id", meta.request_id.clone()),
        ("Lambda-Runtime-Deadline-Ms", meta.deadline_ms.to_string()),
        (
            "Lambda-Runtime-Invoked-Function-Arn",
            meta.invoked_function_arn.clone(),
        ),
        ("Lambda-Runtime-Trace-Id", meta.trace_id.clone()),
    ];
    if let Some(cc) = &meta.client_context {
        headers.push(("Lambda-Runtime-Client-Context", cc.clone()));
    }
    if let Some(ci) = &meta.cognito_identity {
        headers.push(("Lambda-Runtime-Cognito-Identity", ci.clone()));
    }
    Reply {
        status: 200,
        headers,
        body: event,
        handed_out: Some(meta),
    }
}

fn not_found() -> Reply {
    Reply::error(404, "NotFound", "no such Runtime API endpoint")
}

fn too_large() -> Reply {
    Reply::error(
        413,
        "RequestEntityTooLarge",
        &format!("payload exceeds {MAX_SYNC_PAYLOAD} bytes"),
    )
}

/// Accept connections forever, one thread each.
pub fn serve(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hearth-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("runtime-api-conn".into())
            .spawn(move || connection(&shared, stream));
        if let Err(e) = spawned {
            eprintln!("hearth-agent: cannot start a connection thread: {e}");
        }
    }
}

/// Numbers the connections, so a parked `next` knows its own.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Unparks the connection's `next` however the connection ends.
struct ConnectionEnd<'a>(&'a Shared, u64);

impl Drop for ConnectionEnd<'_> {
    fn drop(&mut self) {
        self.0.unpark(self.1);
    }
}

/// Whether a request is `GET /runtime/invocation/next`.
fn is_next(head: &Head) -> bool {
    head.method == "GET" && head.path == "/2018-06-01/runtime/invocation/next"
}

/// Serve requests on one connection until it closes, fails or asks to close.
fn connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let _end = ConnectionEnd(shared, id);
    let mut r = BufReader::new(stream);
    loop {
        let head = match http::read_head(&mut r) {
            Ok(Some(head)) => head,
            Ok(None) | Err(HttpError::Io(_)) => return,
            Err(e @ HttpError::Malformed(_)) => return bad_request(&mut w, &e),
        };
        if let Some(id) = streamed_response(&head) {
            if head.expect_continue && http::write_continue(&mut w).is_err() {
                return;
            }
            let Some(reply) = shared.stream(id, &head, &mut r) else {
                return;
            };
            // A refused stream's body is still unread: the connection cannot serve another.
            let keep_alive = head.keep_alive && reply.status == 202;
            let written = http::write_response(
                &mut w,
                reply.status,
                &reply.headers,
                &reply.body,
                keep_alive,
            );
            if written.is_err() || !keep_alive {
                return;
            }
            continue;
        }
        let fits = !matches!(head.framing, Framing::Length(n) if n > MAX_SYNC_PAYLOAD as u64);
        let wants_body = head.framing != Framing::Length(0);
        if head.expect_continue && fits && wants_body && http::write_continue(&mut w).is_err() {
            return;
        }
        let (body, trailers) =
            match http::read_body_and_trailers(&mut r, head.framing, MAX_SYNC_PAYLOAD) {
                Ok(read) => read,
                Err(HttpError::Io(_)) => return,
                Err(e @ HttpError::Malformed(_)) => return bad_request(&mut w, &e),
            };
        let too_large = body == Body::TooLarge;
        let keep_alive = head.keep_alive && !too_large;
        let reply = if is_next(&head) && !too_large {
            match shared.next_or_park(id, &w, keep_alive) {
                Some(reply) => reply,
                // Parked: the invocation is written onto this connection when it comes.
                None => continue,
            }
        } else {
            shared.route(&head, body, &trailers)
        };
        let written = http::write_response(
            &mut w,
            reply.status,
            &reply.headers,
            &reply.body,
            keep_alive,
        );
        if written.is_err() {
            if let Some(meta) = reply.handed_out {
                shared.requeue(meta, reply.body);
            }
            return;
        }
        if too_large {
            // The unread rest of the body is still coming: swallow some of it before closing,
            // so the client reads our 413 instead of a connection reset.
            let _ = w.shutdown(Shutdown::Write);
            let _ = r.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
            let _ = io::copy(&mut r.take(64 << 20), &mut io::sink());
            return;
        }
        if !keep_alive {
            return;
        }
    }
}

fn bad_request(w: &mut TcpStream, e: &HttpError) {
    let body = error_doc("InvalidRequest", &e.to_string());
    let _ = http::write_response(w, 400, &[], &body, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_error_documents() {
        let (t, doc) = runtime_error(Some("MyError"), br#"{"errorMessage":"x"}"#.to_vec(), "U");
        assert_eq!(
            (t.as_str(), doc.as_slice()),
            ("MyError", &br#"{"errorMessage":"x"}"#[..])
        );

        let (t, _) = runtime_error(None, br#"{"errorType":"Body.Type"}"#.to_vec(), "U");
        assert_eq!(t, "Body.Type");

        let (t, doc) = runtime_error(Some(" "), b"plain text".to_vec(), "Unhandled");
        assert_eq!(t, "Unhandled");
        let doc: Value = serde_json::from_slice(&doc).expect("test");
        assert_eq!(
            doc,
            json!({"errorMessage": "plain text", "errorType": "Unhandled"})
        );

        // A JSON value that is not an object is wrapped too.
        let (_, doc) = runtime_error(Some("T"), b"[1]".to_vec(), "U");
        let doc: Value = serde_json::from_slice(&doc).expect("test");
        assert_eq!(doc, json!({"errorMessage": "[1]", "errorType": "T"}));
    }
}
