//! Messages between hearth's parts.
//!
//! The worker and the agent inside each sandbox speak over the sandbox's stdin (worker → agent)
//! and stdout (agent → worker). Pipes are the one channel that survives a gVisor checkpoint and
//! restore (the restored clone gets fresh pipes), and they need no network inside the sandbox.
//!
//! A frame is
//!
//! ```text
//! u8 version | u32 BE header length | u32 BE body length | header (JSON) | body (raw bytes)
//! ```
//!
//! The header is a small JSON object ([`HostMsg`] or [`AgentMsg`]); the body carries payloads
//! (events, responses, logs) as raw bytes so a 6 MB payload is not base64-inflated. A reader
//! rejects a frame of another version, or one past [`MAX_HEADER`] / [`MAX_BODY`], and the
//! channel is then dead: a sandbox that sends garbage is destroyed, never trusted.
//!
//! # Configuration in the first frame
//!
//! A sandbox may be created before it is known which function it will serve (a pool of
//! pre-created sandboxes per runtime image). Its process environment is then generic, and the
//! agent, started with `HEARTH_AGENT_DEFER=1`, says `Hello` and waits: the worker's first frame
//! is [`HostMsg::Configure`], which carries the function's whole Lambda environment. Only then
//! does the agent start the runtime. The alternative, a configuration file on a mount filled at
//! claim time, needs one more mount per sandbox and a file the runtime could read; a frame
//! needs neither, and an environment (Lambda caps user variables at 4 KB) fits the header.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of the frame format and message set (3: streamed responses, [`AgentMsg::StreamStart`],
/// [`AgentMsg::StreamChunk`], [`AgentMsg::StreamEnd`]).
pub const PROTOCOL_VERSION: u8 = 3;
/// Largest header accepted.
pub const MAX_HEADER: u32 = 64 * 1024;
/// Largest body accepted (payloads are limited to 6 MB well before this).
pub const MAX_BODY: u32 = 16 * 1024 * 1024;
/// Largest response or event payload Lambda accepts on the synchronous path (6 MB).
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Largest streamed response (`Lambda-Runtime-Function-Response-Mode: streaming`) Lambda
/// accepts (20 MiB); past it the invocation ends with `Function.ResponseSizeTooLarge`.
pub const MAX_STREAM_PAYLOAD: usize = 20 * 1024 * 1024;
/// Largest body of one [`AgentMsg::StreamChunk`]: a streamed response's bytes are forwarded as
/// they arrive, in frames of at most this size.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame i/o: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the channel")]
    Closed,
    #[error("frame version {0} is not supported (expected {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("frame too large: header {header} bytes, body {body} bytes")]
    TooLarge { header: u32, body: u32 },
    #[error("bad frame header: {0}")]
    Header(#[from] serde_json::Error),
}

/// Worker → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// The function this sandbox serves; the first frame to an agent started with
    /// `HEARTH_AGENT_DEFER=1` (and only to such an agent), with an empty body. The agent then
    /// starts the runtime with this environment; any other first frame ends the sandbox.
    Configure(SandboxConfig),
    /// Run one invocation; the frame body is the event payload.
    Invoke(InvokeMeta),
    /// The sandbox was just restored from a snapshot: answer the runtime's `restore/next`.
    Restore,
    /// Stop the runtime and exit.
    Shutdown,
}

/// A function's configuration for a sandbox created before the function was known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// The runtime's whole environment as `KEY=VALUE` entries: the Lambda variables
    /// (`_HANDLER`, `AWS_LAMBDA_*`, `LAMBDA_TASK_ROOT`, `PATH`, ...) and the function's own.
    /// The agent adds `AWS_LAMBDA_RUNTIME_API` and drops `HEARTH_*` entries; its own process
    /// environment does not reach the runtime.
    pub env: Vec<String>,
}

/// What the runtime learns about an invocation through `/runtime/invocation/next` headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvokeMeta {
    pub request_id: String,
    /// Deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    pub invoked_function_arn: String,
    pub trace_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognito_identity: Option<String>,
}

/// Agent → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// The agent is up and has started the runtime, or (started with `HEARTH_AGENT_DEFER=1`)
    /// is listening and waits for [`HostMsg::Configure`] to start it.
    Hello { agent_version: String, protocol: u8 },
    /// The runtime called `next` for the first time: init is over.
    InitDone { init_ms: f64 },
    /// Init failed (the runtime posted `init/error`, or exited before its first `next`).
    /// The body is the error document (`{"errorMessage","errorType",...}`).
    InitError { error_type: String },
    /// The runtime answered an invocation; the body is the response payload.
    Response { request_id: String },
    /// The runtime started a streamed response (`Lambda-Runtime-Function-Response-Mode:
    /// streaming`); `content_type` is its `Content-Type`. [`AgentMsg::StreamChunk`] frames
    /// follow, then [`AgentMsg::StreamEnd`], or [`AgentMsg::FunctionError`] when the runtime
    /// reported an error in the trailers, broke the stream off or exceeded
    /// [`MAX_STREAM_PAYLOAD`] (the bytes already sent stay sent).
    StreamStart {
        request_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
    },
    /// Bytes of a streamed response as the runtime sent them (at most [`STREAM_CHUNK`]).
    StreamChunk { request_id: String },
    /// The streamed response ended without an error.
    StreamEnd { request_id: String },
    /// The runtime reported a function error; the body is the error document.
    FunctionError {
        request_id: String,
        error_type: String,
    },
    /// Output the runtime wrote to stdout or stderr; the body holds the bytes.
    Log,
    /// The runtime called `restore/next` (snapshot-ready) or its after-restore hooks finished.
    RestoreReady,
    /// The runtime's after-restore hook failed; the body is the error document.
    RestoreError { error_type: String },
    /// The runtime process exited; `status` reads like `exit status 1` or `signal: killed`.
    RuntimeExit { status: String },
}

/// A decoded frame: header message plus body bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<M> {
    pub msg: M,
    pub body: Vec<u8>,
}

impl<M> Frame<M> {
    pub fn new(msg: M, body: Vec<u8>) -> Self {
        Frame { msg, body }
    }
}

/// Encode a frame into bytes.
pub fn encode<M: Serialize>(msg: &M, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = serde_json::to_vec(msg)?;
    let (hl, bl) = (header.len() as u32, body.len() as u32);
    if hl > MAX_HEADER || bl > MAX_BODY || body.len() > MAX_BODY as usize {
        return Err(FrameError::TooLarge {
            header: hl,
            body: bl,
        });
    }
    let mut out = Vec::with_capacity(9 + header.len() + body.len());
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&hl.to_be_bytes());
    out.extend_from_slice(&bl.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    Ok(out)
}

/// Write one frame and flush.
pub fn write_frame<W: Write, M: Serialize>(
    w: &mut W,
    msg: &M,
    body: &[u8],
) -> Result<(), FrameError> {
    let bytes = encode(msg, body)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Parse the 9-byte prefix: returns (header length, body length).
pub fn parse_prefix(prefix: &[u8; 9]) -> Result<(u32, u32), FrameError> {
    if prefix[0] != PROTOCOL_VERSION {
        return Err(FrameError::Version(prefix[0]));
    }
    let hl = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    let bl = u32::from_be_bytes([prefix[5], prefix[6], prefix[7], prefix[8]]);
    if hl > MAX_HEADER || bl > MAX_BODY {
        return Err(FrameError::TooLarge {
            header: hl,
            body: bl,
        });
    }
    Ok((hl, bl))
}

/// Read one frame (blocking). A clean end of stream before a frame starts is [`FrameError::Closed`].
pub fn read_frame<R: Read, M: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Frame<M>, FrameError> {
    let mut prefix = [0u8; 9];
    let mut got = 0;
    while got < prefix.len() {
        let n = r.read(&mut prefix[got..])?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Io(io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    let (hl, bl) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; hl as usize];
    r.read_exact(&mut header)?;
    let mut body = vec![0u8; bl as usize];
    r.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&header)?;
    Ok(Frame { msg, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_host_and_agent_messages() {
        let meta = InvokeMeta {
            request_id: "r1".into(),
            deadline_ms: 42,
            invoked_function_arn: "arn".into(),
            trace_id: "t".into(),
            client_context: None,
            cognito_identity: Some("c".into()),
        };
        let bytes = encode(&HostMsg::Invoke(meta.clone()), b"{\"a\":1}").unwrap();
        let f: Frame<HostMsg> = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(f.msg, HostMsg::Invoke(meta));
        assert_eq!(f.body, b"{\"a\":1}");

        let bytes = encode(
            &AgentMsg::RuntimeExit {
                status: "exit status 2".into(),
            },
            b"",
        )
        .unwrap();
        let f: Frame<AgentMsg> = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(
            f.msg,
            AgentMsg::RuntimeExit {
                status: "exit status 2".into()
            }
        );
    }

    #[test]
    fn stream_frames_round_trip_with_flat_headers() {
        let start = AgentMsg::StreamStart {
            request_id: "r1".into(),
            content_type: Some("text/plain".into()),
        };
        let mut bytes = encode(&start, b"").unwrap();
        bytes.extend(
            encode(
                &AgentMsg::StreamChunk {
                    request_id: "r1".into(),
                },
                b"abc",
            )
            .unwrap(),
        );
        bytes.extend(
            encode(
                &AgentMsg::StreamEnd {
                    request_id: "r1".into(),
                },
                b"",
            )
            .unwrap(),
        );
        let (hl, _) = parse_prefix(bytes[..9].try_into().unwrap()).unwrap();
        let header: serde_json::Value = serde_json::from_slice(&bytes[9..9 + hl as usize]).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"type": "stream_start", "request_id": "r1", "content_type": "text/plain"})
        );
        let mut r = &bytes[..];
        assert_eq!(read_frame::<_, AgentMsg>(&mut r).unwrap().msg, start);
        let chunk = read_frame::<_, AgentMsg>(&mut r).unwrap();
        assert_eq!(
            (chunk.msg, chunk.body),
            (
                AgentMsg::StreamChunk {
                    request_id: "r1".into()
                },
                b"abc".to_vec()
            )
        );
        assert_eq!(
            read_frame::<_, AgentMsg>(&mut r).unwrap().msg,
            AgentMsg::StreamEnd {
                request_id: "r1".into()
            }
        );
        // Without a content type the field is left out, and an old-style header still reads.
        let bare = AgentMsg::StreamStart {
            request_id: "r2".into(),
            content_type: None,
        };
        let bytes = encode(&bare, b"").unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("content_type"));
        assert_eq!(
            read_frame::<_, AgentMsg>(&mut &bytes[..]).unwrap().msg,
            bare
        );
        assert_eq!(bytes[0], 3, "streamed responses are protocol version 3");
    }

    #[test]
    fn configure_round_trips_with_a_flat_header() {
        let msg = HostMsg::Configure(SandboxConfig {
            env: vec!["_HANDLER=function.handler".into(), "EMPTY=".into()],
        });
        let bytes = encode(&msg, b"").unwrap();
        let (hl, bl) = parse_prefix(bytes[..9].try_into().unwrap()).unwrap();
        assert_eq!(bl, 0);
        let header: serde_json::Value = serde_json::from_slice(&bytes[9..9 + hl as usize]).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"type": "configure", "env": ["_HANDLER=function.handler", "EMPTY="]})
        );
        let f: Frame<HostMsg> = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(f.msg, msg);
    }

    #[test]
    fn rejects_other_versions_oversize_and_truncation() {
        let mut bytes = encode(&HostMsg::Shutdown, b"").unwrap();
        bytes[0] = 9;
        assert!(matches!(
            read_frame::<_, HostMsg>(&mut &bytes[..]),
            Err(FrameError::Version(9))
        ));

        let mut big = vec![PROTOCOL_VERSION];
        big.extend_from_slice(&1u32.to_be_bytes());
        big.extend_from_slice(&(MAX_BODY + 1).to_be_bytes());
        assert!(matches!(
            read_frame::<_, HostMsg>(&mut &big[..]),
            Err(FrameError::TooLarge { .. })
        ));

        let bytes = encode(&HostMsg::Shutdown, b"xyz").unwrap();
        assert!(read_frame::<_, HostMsg>(&mut &bytes[..bytes.len() - 1]).is_err());
        assert!(matches!(
            read_frame::<_, HostMsg>(&mut &b""[..]),
            Err(FrameError::Closed)
        ));
    }
}
