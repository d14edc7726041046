//! Invocations whose response is streamed to the caller as the function produces it:
//! `InvokeWithResponseStream` and function URLs in `RESPONSE_STREAM` mode.
//!
//! Both go through [`invoke::resolve`] and [`invoke::run`] exactly as `Invoke` does (names,
//! aliases, limits, the worker); the only difference is a
//! [`ResponseSink`](crate::invoker::ResponseSink) on the request. [`start`] runs the
//! invocation in a task of its own and hands back a [`Running`] whose [`Piece`]s arrive in
//! order: `Start` when the runtime began a streamed response, its `Chunk`s, and always one
//! `Done` with the outcome. A caller waits for the first piece before answering: a `Done`
//! first means nothing was streamed (an error before the function ran is then a normal Lambda
//! error, a buffered response goes out whole); a `Start` first means the HTTP response can
//! begin, and a later failure can only be reported in-band.
//!
//! Chunks travel over an unbounded channel: the worker cannot wait for a slow client without
//! holding its sandbox, and a stream is bounded by Lambda's 20 MiB limit in the agent.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::ApiError;
use crate::eventstream;
use crate::invoke::{self, InvokeCommand, InvokeOutcome, Resolved};
use crate::invoker::{ResponseSink, ResponseTarget};
use crate::state::AppState;

/// What a streamed invocation produces, in order.
#[derive(Debug)]
pub enum Piece {
    /// The runtime began a streamed response, with this `Content-Type`.
    Start(Option<String>),
    /// Bytes of the response.
    Chunk(Bytes),
    /// The invocation ended: for a streamed response the outcome's payload is empty, or the
    /// error document when it ended in a function error.
    Done(Result<InvokeOutcome, ApiError>),
}

struct ChannelSink(mpsc::UnboundedSender<Piece>);

impl ResponseSink for ChannelSink {
    fn start(&self, content_type: Option<&str>) {
        let _ = self.0.send(Piece::Start(content_type.map(str::to_string)));
    }
    fn chunk(&self, bytes: &[u8]) {
        let _ = self.0.send(Piece::Chunk(Bytes::copy_from_slice(bytes)));
    }
}

/// An invocation running with a streamed response.
#[derive(Debug)]
pub struct Running {
    /// `X-Amz-Executed-Version`.
    pub executed_version: String,
    rx: mpsc::UnboundedReceiver<Piece>,
}

impl Running {
    /// The next piece; `None` only after `Done` (or if the invocation's task died).
    pub async fn next(&mut self) -> Option<Piece> {
        self.rx.recv().await
    }
}

/// How [`start`] went.
#[derive(Debug)]
pub enum Started {
    /// `DryRun`: checked, nothing run.
    DryRun,
    Running(Running),
}

/// Check and resolve `cmd` (errors here are the caller's to answer as Lambda errors), then run
/// it in the background with a streamed response. `cmd` must be synchronous or `DryRun`.
pub async fn start(state: &AppState, cmd: InvokeCommand) -> Result<Started, ApiError> {
    let mut ready = match invoke::resolve(state, cmd).await? {
        Resolved::DryRun => return Ok(Started::DryRun),
        Resolved::Accepted => {
            return Err(ApiError::internal(
                "an asynchronous invocation reached the streaming path",
            ));
        }
        Resolved::Run(ready) => ready,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    ready.stream_to(ResponseTarget(Arc::new(ChannelSink(tx.clone()))));
    let executed_version = ready.executed_version.clone();
    let state = state.clone();
    tokio::spawn(
        async move {
            let outcome = invoke::run(&state, *ready).await;
            let _ = tx.send(Piece::Done(outcome));
        }
        .instrument(tracing::Span::current()),
    );
    Ok(Started::Running(Running {
        executed_version,
        rx,
    }))
}

/// The error type and document of a function error's payload (`errorType`, else `Unhandled`).
pub fn function_error(doc: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(doc).into_owned();
    let error_type = serde_json::from_slice::<serde_json::Value>(doc)
        .ok()
        .and_then(|v| v.get("errorType")?.as_str().map(str::to_string))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "Unhandled".to_string());
    (error_type, text)
}

/// The `InvokeComplete` event for how an invocation ended: `ErrorCode` is the error type
/// (`errorType` of a function error, the service error's name otherwise), `ErrorDetails` the
/// error document (as the runtime's `Lambda-Runtime-Function-Error-Body` carries it).
pub fn complete_event(done: Option<Result<InvokeOutcome, ApiError>>) -> Vec<u8> {
    match done {
        Some(Ok(InvokeOutcome::Completed {
            payload,
            function_error,
            log_result,
            ..
        })) => {
            let error = function_error.map(|_| self::function_error(&payload));
            eventstream::invoke_complete(
                error.as_ref().map(|(t, d)| (t.as_str(), d.as_str())),
                log_result.as_deref(),
            )
        }
        Some(Ok(_)) => eventstream::invoke_complete(None, None),
        Some(Err(e)) => {
            let details = e.body().to_string();
            eventstream::invoke_complete(Some((e.kind.name(), &details)), None)
        }
        None => eventstream::invoke_complete(
            Some((
                "ServiceException",
                "the invocation ended without an outcome",
            )),
            None,
        ),
    }
}

/// The event-stream body of an `InvokeWithResponseStream` whose function answered in one
/// piece: its payload as one `PayloadChunk` (none for an error or an empty payload), then
/// `InvokeComplete`.
pub fn buffered_events(outcome: InvokeOutcome) -> Vec<u8> {
    let mut out = Vec::new();
    if let InvokeOutcome::Completed {
        payload,
        function_error: None,
        ..
    } = &outcome
        && !payload.is_empty()
    {
        out.extend(eventstream::payload_chunk(payload));
    }
    out.extend(complete_event(Some(Ok(outcome))));
    out
}

/// The rest of a streamed `InvokeWithResponseStream`, as event-stream messages: a
/// `PayloadChunk` per chunk as it arrives, then `InvokeComplete`.
pub fn events(running: Running) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::unfold(Some(running), |state| async move {
        let mut running = state?;
        match running.next().await {
            Some(Piece::Chunk(bytes)) => Some((
                Bytes::from(eventstream::payload_chunk(&bytes)),
                Some(running),
            )),
            // Only one start is sent; a repeated one carries nothing.
            Some(Piece::Start(_)) => Some((Bytes::new(), Some(running))),
            Some(Piece::Done(done)) => Some((Bytes::from(complete_event(Some(done))), None)),
            None => Some((Bytes::from(complete_event(None)), None)),
        }
    })
}
