//! The boundary between the front end and the worker side (assignment + sandboxes).
//! Both sides depend on this crate, not on each other.
//!
//! The front end resolves a request to a [`FunctionSpec`] (one immutable version of a
//! function's code and configuration) and hands it to an [`Invoker`]. In `hearth up` the
//! invoker is in-process (no RPC); a networked implementation can sit behind the same trait.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything a worker needs to run one version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Function name (not an ARN).
    pub name: String,
    /// `$LATEST` or a published version number.
    pub version: String,
    /// Unqualified function ARN, `arn:aws:lambda:<region>:<account>:function:<name>`.
    pub arn: String,
    /// Runtime identifier as given at creation (`python3.11`, `provided.al2023`, ...).
    pub runtime: String,
    pub handler: String,
    pub memory_mb: u32,
    pub timeout_s: u32,
    pub env: BTreeMap<String, String>,
    /// Base64 SHA-256 of the deployment package, as Lambda reports `CodeSha256`: it names the
    /// package (the chunk-store artifact [`crate::code::code_artifact`] of its hex form), which
    /// a worker unpacks into its own code cache and mounts read-only at `/var/task`. No host
    /// path crosses this boundary.
    pub code_sha256: String,
    /// Base64 SHA-256 of each of the version's layers' packages, in the function's order: a
    /// worker unpacks each like code and merges them, later over earlier, into the sandbox's
    /// read-only `/opt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// Changes whenever code or configuration changes; sandboxes are pooled per revision.
    pub revision_id: String,
    /// Cold starts restore from this version's snapshot when one exists (SnapStart).
    #[serde(default)]
    pub snap_start: bool,
    /// Size of `/tmp` in MB (`EphemeralStorage.Size`, 512–10240).
    #[serde(default = "default_ephemeral_mb")]
    pub ephemeral_storage_mb: u32,
    /// The function may reach the network (subject to the server's policy). Off when the
    /// function's environment sets `HEARTH_NETWORK=none`.
    #[serde(default = "default_true")]
    pub egress: bool,
}

fn default_ephemeral_mb() -> u32 {
    512
}

fn default_true() -> bool {
    true
}

/// The environment variable a function sets to `none` to run without network access.
pub const NETWORK_ENV: &str = "HEARTH_NETWORK";

/// Whether a function's environment opts out of networking.
pub fn egress_wanted(env: &BTreeMap<String, String>) -> bool {
    env.get(NETWORK_ENV).map(|v| v.as_str()) != Some("none")
}

/// Where an invocation's log goes while it runs: the worker writes init output, `START`, the
/// runtime's output, `END` and `REPORT` here as they arrive (in pieces of at most
/// [`LOG_FLUSH_BYTES`], cut at line ends where possible), so no invocation's output is held in
/// memory whatever the function prints.
pub trait LogSink: Send + Sync {
    fn write(&self, bytes: &[u8]);
}

/// The worker flushes an invocation's log to its sink at least every this many bytes.
pub const LOG_FLUSH_BYTES: usize = 64 * 1024;

/// A shareable [`LogSink`].
#[derive(Clone)]
pub struct LogTarget(pub std::sync::Arc<dyn LogSink>);

impl std::fmt::Debug for LogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogTarget")
    }
}

/// Where a streamed response goes while the function produces it (`InvokeWithResponseStream`,
/// a `RESPONSE_STREAM` function URL). When the runtime streams its response
/// (`Lambda-Runtime-Function-Response-Mode: streaming`), the worker calls
/// [`ResponseSink::start`] once, then [`ResponseSink::chunk`] for every piece as it arrives;
/// the [`InvokeResult`] then carries no payload (or the error document, when the stream ended
/// in a function error: the bytes already sent stay sent). A runtime that answers in one piece
/// never reaches the sink: its payload is in the result as usual. Without a sink a streamed
/// response is gathered into the result's payload (Lambda's buffered `Invoke` of a streaming
/// function).
pub trait ResponseSink: Send + Sync {
    /// The runtime started a streamed response with this `Content-Type`.
    fn start(&self, content_type: Option<&str>);
    /// The next bytes of the response.
    fn chunk(&self, bytes: &[u8]);
}

/// A shareable [`ResponseSink`].
#[derive(Clone)]
pub struct ResponseTarget(pub std::sync::Arc<dyn ResponseSink>);

impl std::fmt::Debug for ResponseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseTarget")
    }
}

/// One synchronous invocation.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// The invocation's id: `x-amzn-RequestId` to the caller, `Lambda-Runtime-Aws-Request-Id`
    /// to the runtime, and the id in the `START`/`END`/`REPORT` log lines.
    pub request_id: String,
    pub spec: FunctionSpec,
    /// The ARN the caller invoked (qualified with the version or alias used).
    pub invoked_arn: String,
    pub payload: bytes::Bytes,
    /// Decoded `X-Amz-Client-Context` (JSON text), if any.
    pub client_context: Option<String>,
    /// The function's reserved concurrency, if set (`PutFunctionConcurrency`).
    pub reserved_concurrency: Option<u32>,
    /// Concurrency available to functions without a reservation: the account limit minus the
    /// sum of all reservations.
    pub unreserved_limit: u32,
    /// Where the invocation's log is streamed; `None` keeps only the tail in the result.
    pub log: Option<LogTarget>,
    /// Where a streamed response goes as it arrives; `None` gathers it into the result.
    pub response: Option<ResponseTarget>,
}

/// Lambda's default account concurrency.
pub const DEFAULT_ACCOUNT_CONCURRENCY: u32 = 1000;

impl InvokeRequest {
    /// An invocation of `spec` (its unqualified ARN) with `payload` and a new request id; no
    /// reservation, the default account concurrency, no client context, log sink or response
    /// stream. Callers change what they need.
    pub fn new(spec: FunctionSpec, payload: impl Into<bytes::Bytes>) -> Self {
        InvokeRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            invoked_arn: spec.arn.clone(),
            spec,
            payload: payload.into(),
            client_context: None,
            reserved_concurrency: None,
            unreserved_limit: DEFAULT_ACCOUNT_CONCURRENCY,
            log: None,
            response: None,
        }
    }
}

/// What came back from the function.
#[derive(Debug, Clone, Default)]
pub struct InvokeResult {
    /// The response payload, or the error document when `function_error` is set.
    pub payload: Vec<u8>,
    /// The function failed (exception, timeout, crash, out of memory): the front end answers
    /// HTTP 200 with `X-Amz-Function-Error: Unhandled`.
    pub function_error: bool,
    /// The end of the invocation's log (at most [`LOG_TAIL_BYTES`]): init output if this
    /// invocation ran init, then `START`, the runtime's output, `END` and `REPORT` lines. The
    /// whole log went to the request's [`LogSink`].
    pub log: String,
}

/// The most of an invocation's log a result carries (the front end returns the last 4 KB of
/// it with `LogType: Tail`).
pub const LOG_TAIL_BYTES: usize = 64 * 1024;

/// Why an invocation did not reach the function.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// Concurrency limit reached; `reason` is Lambda's `Reason` value
    /// (`ReservedFunctionConcurrentInvocationLimitExceeded`, `ConcurrentInvocationLimitExceeded`).
    #[error("rate exceeded: {reason}")]
    TooManyRequests { reason: String },
    /// The platform cannot run this function right now (e.g. its runtime image is missing).
    #[error("{0}")]
    NotReady(String),
    /// This member does not decide for the function (a follower of its partition); `leader`
    /// is the one that does, when known.
    #[error("not the leader{}", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    /// An internal fault; the message is for logs, not for the caller.
    #[error("service error: {0}")]
    Service(String),
}

/// What a caller of an [`Invoker`] does about an [`InvokeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Try again later: the limit or condition may pass (the front end answers 429 or 502,
    /// which SDKs retry).
    Retry,
    /// Send the request to this member instead (or find the leader, when `None`).
    Forward(Option<String>),
    /// Nothing will change by retrying here: report the failure.
    GiveUp,
}

impl InvokeError {
    /// What to do about this error.
    pub fn next_step(&self) -> NextStep {
        match self {
            InvokeError::TooManyRequests { .. } | InvokeError::NotReady(_) => NextStep::Retry,
            InvokeError::NotLeader { leader } => NextStep::Forward(leader.clone()),
            InvokeError::Service(_) => NextStep::GiveUp,
        }
    }
}

/// Runs invocations. Implemented by the worker side.
#[async_trait::async_trait]
pub trait Invoker: Send + Sync + 'static {
    /// Run one invocation to completion (or failure of the function).
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError>;
    /// The function was deleted or changed: drop its idle sandboxes (in-flight ones finish).
    fn retire(&self, function_name: &str);

    /// Prepare a version for fast cold starts (SnapStart: boot, init, checkpoint). Called when
    /// a version with SnapStart is published; the version is `Pending` until this returns.
    /// The error is the reason shown in the version's `StateReason`.
    async fn prepare(&self, _spec: FunctionSpec) -> Result<(), String> {
        Ok(())
    }

    /// Whether sandboxes restored from snapshots keep outbound network access (the engine can
    /// checkpoint a sandbox with network). When not, SnapStart versions run without network
    /// and their configuration says so.
    fn snapshots_keep_network(&self) -> bool {
        true
    }

    /// One published version was deleted: release what was kept for it (its snapshot).
    fn forget_version(&self, _function_arn: &str, _version: &str) {}

    /// The function (its unqualified ARN) was deleted: release everything kept for it.
    fn forget(&self, function_arn: &str) {
        self.retire(function_name_of(function_arn));
    }
}

/// The function name in an unqualified function ARN (`...:function:<name>`).
pub fn function_name_of(function_arn: &str) -> &str {
    function_arn.rsplit(':').next().unwrap_or(function_arn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_says_what_to_do() {
        let throttled = InvokeError::TooManyRequests {
            reason: "ConcurrentInvocationLimitExceeded".into(),
        };
        assert_eq!(throttled.next_step(), NextStep::Retry);
        assert_eq!(
            InvokeError::NotReady("image".into()).next_step(),
            NextStep::Retry
        );
        let follower = InvokeError::NotLeader {
            leader: Some("10.0.0.2:7000".into()),
        };
        assert_eq!(
            follower.next_step(),
            NextStep::Forward(Some("10.0.0.2:7000".into()))
        );
        assert_eq!(
            follower.to_string(),
            "not the leader (the leader is 10.0.0.2:7000)"
        );
        assert_eq!(
            InvokeError::Service("bug".into()).next_step(),
            NextStep::GiveUp
        );
        assert_eq!(function_name_of("arn:aws:lambda:r:1:function:f"), "f");
    }
}
