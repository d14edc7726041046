//! Asynchronous invocation: `Invoke` with `X-Amz-Invocation-Type: Event`.
//!
//! An event is checked as a synchronous call would be (function, qualifier, JSON payload, and
//! Lambda's 1 MB asynchronous limit), committed to the durable queue ([`queue`], group commit)
//! and only then answered 202 with its request id. The dispatcher ([`run`]) takes events in the
//! order the [`sched::Scheduler`] gives (round robin between functions, a global cap on attempts
//! in flight) and runs each through the same path as a synchronous call ([`crate::invoke`]:
//! aliases, concurrency limits, the invoker). After an attempt, [`sched::after_attempt`] decides:
//! finished (its destination gets Lambda's record), a retry after Lambda's back-off (durable: the
//! event is rewritten with its run count and due time), or, when throttled, back into its lane.
//! An event older than its `MaximumEventAgeInSeconds` is not run again.
//!
//! Every event that fails for good is kept in the failed-events store (the `failed` table), with
//! its record, whatever destinations are configured: a user lists, inspects and re-drives them
//! (`hearth events`). Delivery is at least once: an event leaves the queue in the same commit
//! that stores what it produced, so a crash between an attempt and that commit runs the attempt
//! again after restart (only the attempts in flight at the crash can repeat).

pub mod api;
pub mod config;
pub mod queue;
pub mod sched;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, ErrorKind};
use crate::invoke::{InvokeCommand, InvokeOutcome};
use crate::state::AppState;
use config::{Destination, Effective};
use queue::{Event, EventHeader, Op, Queue};
use sched::{Condition, Decision, Finished, Outcome, Policy, Scheduler};

/// Lambda's limit on an asynchronous invocation's payload.
pub const MAX_ASYNC_PAYLOAD: usize = 1_048_576;
/// Destination deliveries that may follow one another (Lambda stops recursive loops after 16).
pub const MAX_DEPTH: u32 = 16;

/// Settings of the asynchronous path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncConfig {
    pub policy: Policy,
    /// Attempts in flight at once, over all functions.
    pub concurrency: usize,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        AsyncConfig {
            policy: Policy::default(),
            concurrency: 32,
        }
    }
}

/// The queue, the scheduler and what wakes the dispatcher.
pub struct Events {
    queue: Queue,
    sched: std::sync::Mutex<Scheduler>,
    policy: Policy,
    wake: Arc<tokio::sync::Notify>,
    stopping: AtomicBool,
}

impl Drop for Events {
    fn drop(&mut self) {
        // The dispatcher holds only the notifier while it waits: let it see the state is gone.
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Events {
    /// Open `<data-dir>/events.redb`; what an earlier run left queued is scheduled again.
    pub fn open(path: &std::path::Path, config: AsyncConfig) -> Result<Events, queue::QueueError> {
        Events::from_queue(Queue::open(path)?, config)
    }

    /// The queue over another event log (the assignment service's, in a cluster).
    pub fn with_log(
        log: Arc<dyn hearth_core::eventlog::EventLog>,
        config: AsyncConfig,
    ) -> Result<Events, queue::QueueError> {
        Events::from_queue(Queue::with_log(log)?, config)
    }

    fn from_queue(
        (queue, found): (Queue, Vec<(u64, EventHeader)>),
        config: AsyncConfig,
    ) -> Result<Events, queue::QueueError> {
        let mut sched = Scheduler::new(config.policy, config.concurrency);
        let now = now_ms();
        let count = found.len();
        for (seq, h) in found {
            sched.add(&h.function, seq, h.accepted_ms, h.due_ms, now);
        }
        if count > 0 {
            tracing::info!(events = count, "asynchronous events resumed");
        }
        Ok(Events {
            queue,
            sched: std::sync::Mutex::new(sched),
            policy: config.policy,
            wake: Arc::new(tokio::sync::Notify::new()),
            stopping: AtomicBool::new(false),
        })
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        // A panic while holding the lock leaves consistent counters (every method is short and
        // total), so a poisoned lock is used as is.
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an event durably; returns when it is committed.
    pub async fn enqueue(&self, header: EventHeader, payload: Vec<u8>) -> Result<u64, ApiError> {
        let seq = self.queue.next_seq();
        let (function, accepted, due) =
            (header.function.clone(), header.accepted_ms, header.due_ms);
        self.queue
            .commit(vec![Op::Put(seq, Event { header, payload })])
            .await
            .map_err(|e| match e {
                queue::QueueError::Log(hearth_core::eventlog::EventLogError::Full(why)) => {
                    ApiError {
                        message: format!("The asynchronous event queue is full: {why}"),
                        ..ApiError::throttled("EventQueueFull", 1)
                    }
                }
                other => ApiError::internal(other),
            })?;
        self.sched().add(&function, seq, accepted, due, now_ms());
        self.wake.notify_one();
        Ok(seq)
    }

    /// One function's queue and counters.
    pub fn stats(&self, function: &str) -> sched::LaneStats {
        self.sched().stats(function)
    }

    /// Every function's queue and counters (functions with events queued or counted since
    /// start), and the attempts in flight over all of them.
    pub fn all_stats(&self) -> (Vec<(String, sched::LaneStats)>, usize) {
        let s = self.sched();
        let all = s
            .functions()
            .into_iter()
            .map(|f| {
                let st = s.stats(&f);
                (f, st)
            })
            .collect();
        (all, s.inflight())
    }

    /// Stop dispatching (attempts in flight finish; what is queued stays queued).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn queue(&self) -> &Queue {
        &self.queue
    }
}

/// The dispatcher: runs until [`Events::stop`] or until the state is dropped. While it waits
/// it holds only the notifier, so dropping the last [`AppState`] closes the databases.
pub async fn run(state: crate::state::WeakState) {
    loop {
        let Some(strong) = state.upgrade() else {
            return;
        };
        let events = strong.events().clone();
        if events.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = now_ms();
        let picked = events.sched().next(now);
        if let Some((function, seq)) = picked {
            tokio::spawn(async move { attempt(&strong, function, seq).await });
            continue;
        }
        let wait = events
            .sched()
            .next_wake()
            .map(|w| w.saturating_sub(now).max(1))
            .unwrap_or(60_000);
        let wake = events.wake.clone();
        drop(events);
        drop(strong);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

/// The last attempt's response, kept with an event between retries and in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastAttempt {
    pub executed_version: String,
    pub function_error: Option<String>,
    pub payload: String,
}

/// What an event ended as, for its record.
struct Ending<'a> {
    condition: Condition,
    runs: u32,
    last: Option<&'a LastAttempt>,
}

/// Lambda's destination record.
fn record(state: &AppState, ev: &Event, end: &Ending<'_>) -> Value {
    let c = state.config();
    let version = end
        .last
        .map(|l| l.executed_version.clone())
        .or_else(|| ev.header.qualifier.clone())
        .unwrap_or_else(|| "$LATEST".into());
    let mut rec = json!({
        "version": "1.0",
        "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "requestContext": {
            "requestId": ev.header.id,
            "functionArn": c.qualified_arn(&ev.header.function, &version),
            "condition": end.condition.as_str(),
            "approximateInvokeCount": end.runs,
        },
        "requestPayload": as_json(&ev.payload),
    });
    if let Some(last) = end.last {
        let mut ctx = json!({"statusCode": 200, "executedVersion": last.executed_version});
        if let Some(fe) = &last.function_error {
            ctx["functionError"] = json!(fe);
        }
        rec["responseContext"] = ctx;
        rec["responsePayload"] = as_json(last.payload.as_bytes());
    }
    rec
}

/// A payload as JSON where it is JSON, else as a string.
fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// What the failed-events store keeps of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FailedEvent {
    pub event_id: String,
    pub function_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualifier: Option<String>,
    /// `RetriesExhausted`, `EventAgeExceeded`, or why it could not run at all.
    pub condition: String,
    pub accepted_ms: u64,
    pub failed_ms: u64,
    pub attempts: u32,
    /// The SQS-named queues (`OnFailure`, `DeadLetterConfig`) it was delivered to.
    #[serde(default)]
    pub queues: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Lambda's destination record (with the request payload).
    pub record: Value,
}

fn failed_key(f: &FailedEvent) -> String {
    // Ordered by failure time, unique by event id.
    format!("{:016x}-{}", f.failed_ms, f.event_id)
}

/// The key of a failed event, found by its event id.
fn find_failed(q: &Queue, id: &str) -> Result<Option<(String, FailedEvent)>, ApiError> {
    for (key, bytes) in q.failed().map_err(ApiError::internal)? {
        if key.ends_with(id) && key.len() == id.len() + 17 {
            let f: FailedEvent = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
            return Ok(Some((key, f)));
        }
    }
    Ok(None)
}

async fn attempt(state: &AppState, function: String, seq: u64) {
    let events = state.events().clone();
    let finished = match attempt_inner(state, &function, seq).await {
        Ok((finished, added)) => {
            let mut s = events.sched();
            for (f, seq, accepted) in added {
                s.add(&f, seq, accepted, accepted, now_ms());
            }
            finished
        }
        Err(e) => {
            tracing::warn!(function = %function, seq, error = %e, "asynchronous attempt failed; it will run again");
            Finished::Throttled
        }
    };
    events.sched().finish(&function, seq, finished, now_ms());
    events.wake.notify_one();
}

/// Effects of an attempt that ended: what changes durably, and the events it adds.
type Added = Vec<(String, u64, u64)>;

async fn attempt_inner(
    state: &AppState,
    function: &str,
    seq: u64,
) -> Result<(Finished, Added), ApiError> {
    let events = state.events().clone();
    let loaded = {
        let events = events.clone();
        tokio::task::spawn_blocking(move || events.queue().get(seq))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
    };
    let Some(mut ev) = loaded else {
        return Ok((Finished::Removed { success: false }, vec![]));
    };
    let header = ev.header.clone();
    let record_result = state.load(function).await;
    let rec = match record_result {
        Ok(r) => r,
        Err(e) if e.kind == ErrorKind::ResourceNotFound => {
            return cannot_run(state, &ev, seq, "FunctionNotFound", &e.message, None).await;
        }
        Err(e) => return Err(e),
    };
    let qualifier_key = header
        .qualifier
        .clone()
        .unwrap_or_else(|| "$LATEST".to_string());
    let dead_letter = dead_letter_of(&rec, &qualifier_key);
    let eff = Effective::new(rec.event_invoke.get(&qualifier_key), dead_letter.as_deref());

    let now = now_ms();
    let prior = header.last.clone();
    if sched::expired(header.accepted_ms, now, eff.max_age_s) {
        let end = Ending {
            condition: Condition::EventAgeExceeded,
            runs: header.runs,
            last: prior.as_ref(),
        };
        return finish(state, &ev, seq, &eff, &end).await;
    }

    let cmd = InvokeCommand {
        function_name: header.function.clone(),
        qualifier: header.qualifier.clone(),
        invocation_type: None,
        log_type: None,
        client_context: header
            .client_context
            .as_ref()
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
        payload: bytes::Bytes::from(ev.payload.clone()),
        request_id: header.id.clone(),
    };
    let (outcome, last) = match crate::invoke::invoke(state, cmd).await {
        Ok(InvokeOutcome::Completed {
            executed_version,
            payload,
            function_error,
            ..
        }) => {
            let outcome = if function_error.is_some() {
                Outcome::FunctionError
            } else {
                Outcome::Success
            };
            (
                outcome,
                Some(LastAttempt {
                    executed_version,
                    function_error,
                    payload: String::from_utf8_lossy(&payload).into_owned(),
                }),
            )
        }
        Ok(InvokeOutcome::DryRun | InvokeOutcome::Accepted) => (Outcome::Success, None),
        Err(e)
            if e.kind == ErrorKind::TooManyRequests
                || e.kind == ErrorKind::ResourceConflict
                || e.kind.status().is_server_error() =>
        {
            tracing::debug!(function, error = %e, "asynchronous attempt throttled");
            (Outcome::Throttled, None)
        }
        Err(e) => {
            // The function, version or alias is gone, or the request can no longer run.
            let condition = if e.kind == ErrorKind::ResourceNotFound {
                "FunctionNotFound"
            } else {
                e.kind.name()
            };
            return cannot_run(state, &ev, seq, condition, &e.message, prior.as_ref()).await;
        }
    };
    match sched::after_attempt(
        outcome,
        header.runs,
        eff.max_retries,
        now_ms(),
        &events.policy,
    ) {
        Decision::Requeue => Ok((Finished::Throttled, vec![])),
        Decision::Retry { at_ms, runs } => {
            ev.header.runs = runs;
            ev.header.due_ms = at_ms;
            ev.header.last = last;
            events
                .queue()
                .commit(vec![Op::Put(seq, ev)])
                .await
                .map_err(ApiError::internal)?;
            Ok((Finished::Retry { at_ms }, vec![]))
        }
        Decision::Finish(condition) => {
            let runs = header.runs + u32::from(last.is_some());
            let end = Ending {
                condition,
                runs,
                last: last.as_ref(),
            };
            finish(state, &ev, seq, &eff, &end).await
        }
    }
}

/// The DLQ of the version a qualifier runs (an alias: its main version).
fn dead_letter_of(rec: &crate::store::FunctionRecord, qualifier: &str) -> Option<String> {
    let version = match rec.aliases.get(qualifier) {
        Some(alias) => alias.function_version.clone(),
        None => qualifier.to_string(),
    };
    if version == "$LATEST" {
        return rec.latest.dead_letter_target.clone();
    }
    version
        .parse::<u64>()
        .ok()
        .and_then(|n| rec.versions.get(&n))
        .and_then(|v| v.dead_letter_target.clone())
}

/// A destination delivery: a new event for the destination function.
fn delivery(
    state: &AppState,
    ev: &Event,
    dest: &Destination,
    record: &Value,
) -> Option<(u64, Event)> {
    let Destination::Function {
        name, qualifier, ..
    } = dest
    else {
        return None;
    };
    if ev.header.depth + 1 > MAX_DEPTH {
        tracing::warn!(
            function = %ev.header.function,
            destination = %name,
            "destination chain longer than {MAX_DEPTH}: not delivered (the record stays in the failed-events store if it failed)"
        );
        return None;
    }
    let now = now_ms();
    let header = EventHeader {
        id: uuid::Uuid::new_v4().to_string(),
        function: name.clone(),
        qualifier: qualifier.clone(),
        accepted_ms: now,
        due_ms: now,
        runs: 0,
        client_context: None,
        depth: ev.header.depth + 1,
        last: None,
    };
    Some((
        state.events().queue().next_seq(),
        Event {
            header,
            payload: record.to_string().into_bytes(),
        },
    ))
}

async fn finish(
    state: &AppState,
    ev: &Event,
    seq: u64,
    eff: &Effective,
    end: &Ending<'_>,
) -> Result<(Finished, Added), ApiError> {
    let rec = record(state, ev, end);
    let mut ops = vec![Op::Delete(seq)];
    let mut added = Vec::new();
    let success = end.condition == Condition::Success;
    let targets: Vec<&Destination> = if success {
        eff.on_success.iter().collect()
    } else {
        eff.on_failure
            .iter()
            .chain(eff.dead_letter.iter())
            .collect()
    };
    for dest in &targets {
        if let Some((dseq, dev)) = delivery(state, ev, dest, &rec) {
            added.push((dev.header.function.clone(), dseq, dev.header.accepted_ms));
            ops.push(Op::Put(dseq, dev));
        }
    }
    if !success {
        let queues = targets
            .iter()
            .filter_map(|d| match d {
                Destination::Queue { name, .. } => Some(name.clone()),
                Destination::Function { .. } => None,
            })
            .collect();
        let failed = FailedEvent {
            event_id: ev.header.id.clone(),
            function_name: ev.header.function.clone(),
            qualifier: ev.header.qualifier.clone(),
            condition: end.condition.as_str().to_string(),
            accepted_ms: ev.header.accepted_ms,
            failed_ms: now_ms(),
            attempts: end.runs,
            queues,
            error: end.last.map(|l| l.payload.clone()),
            record: rec.clone(),
        };
        ops.push(Op::PutFailed(
            failed_key(&failed),
            serde_json::to_vec(&failed).map_err(ApiError::internal)?,
        ));
        tracing::info!(
            function = %ev.header.function,
            event = %ev.header.id,
            condition = end.condition.as_str(),
            attempts = end.runs,
            "asynchronous event failed"
        );
    }
    state
        .events()
        .queue()
        .commit(ops)
        .await
        .map_err(ApiError::internal)?;
    Ok((Finished::Removed { success }, added))
}

/// Move an event that cannot run at all into the failed-events store (one commit).
async fn cannot_run(
    state: &AppState,
    ev: &Event,
    seq: u64,
    condition: &str,
    message: &str,
    last: Option<&LastAttempt>,
) -> Result<(Finished, Added), ApiError> {
    let runs = ev.header.runs;
    let end = Ending {
        condition: Condition::RetriesExhausted,
        runs,
        last,
    };
    let mut rec = record(state, ev, &end);
    rec["requestContext"]["condition"] = json!(condition);
    let failed = FailedEvent {
        event_id: ev.header.id.clone(),
        function_name: ev.header.function.clone(),
        qualifier: ev.header.qualifier.clone(),
        condition: condition.to_string(),
        accepted_ms: ev.header.accepted_ms,
        failed_ms: now_ms(),
        attempts: runs,
        queues: vec![],
        error: Some(message.to_string()),
        record: rec,
    };
    tracing::info!(function = %ev.header.function, event = %ev.header.id, condition, "asynchronous event cannot run");
    let ops = vec![
        Op::Delete(seq),
        Op::PutFailed(
            failed_key(&failed),
            serde_json::to_vec(&failed).map_err(ApiError::internal)?,
        ),
    ];
    state
        .events()
        .queue()
        .commit(ops)
        .await
        .map_err(ApiError::internal)?;
    Ok((Finished::Removed { success: false }, vec![]))
}

// ---- the failed-events store, for the CLI ------------------------------------------------

/// Failed events, oldest failure first, optionally of one function.
pub async fn list_failed(
    state: &AppState,
    function: Option<String>,
) -> Result<Vec<FailedEvent>, ApiError> {
    let events = state.events().clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (_, bytes) in events.queue().failed().map_err(ApiError::internal)? {
            let f: FailedEvent = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
            if function
                .as_ref()
                .is_none_or(|name| *name == f.function_name)
            {
                out.push(f);
            }
        }
        Ok(out)
    })
    .await
    .map_err(ApiError::internal)?
}

async fn failed_by_id(state: &AppState, id: &str) -> Result<(String, FailedEvent), ApiError> {
    let events = state.events().clone();
    let key = id.to_string();
    tokio::task::spawn_blocking(move || find_failed(events.queue(), &key))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("No failed event with id {id}")))
}

pub async fn get_failed(state: &AppState, id: &str) -> Result<FailedEvent, ApiError> {
    Ok(failed_by_id(state, id).await?.1)
}

pub async fn delete_failed(state: &AppState, id: &str) -> Result<(), ApiError> {
    let (key, _) = failed_by_id(state, id).await?;
    state
        .events()
        .queue()
        .commit(vec![Op::DeleteFailed(key)])
        .await
        .map_err(ApiError::internal)
}

/// Queue a failed event again (a new event id, fresh retries) and drop it from the store, in
/// one commit. Returns the new event's id.
pub async fn redrive(state: &AppState, id: &str) -> Result<String, ApiError> {
    let (key, failed) = failed_by_id(state, id).await?;
    state.load(&failed.function_name).await?;
    let payload = failed
        .record
        .get("requestPayload")
        .map(|p| p.to_string().into_bytes())
        .unwrap_or_else(|| b"{}".to_vec());
    let now = now_ms();
    let header = EventHeader {
        id: uuid::Uuid::new_v4().to_string(),
        function: failed.function_name.clone(),
        qualifier: failed.qualifier.clone(),
        accepted_ms: now,
        due_ms: now,
        runs: 0,
        client_context: None,
        depth: 0,
        last: None,
    };
    let events = state.events();
    let seq = events.queue().next_seq();
    let new_id = header.id.clone();
    let function = header.function.clone();
    events
        .queue()
        .commit(vec![
            Op::DeleteFailed(key),
            Op::Put(seq, Event { header, payload }),
        ])
        .await
        .map_err(ApiError::internal)?;
    events.sched().add(&function, seq, now, now, now);
    events.wake.notify_one();
    tracing::info!(function = %function, from = %id, event = %new_id, "failed event re-driven");
    Ok(new_id)
}

/// `hearth fn status`: a function's asynchronous queue.
pub async fn status(state: &AppState, function: &str) -> Result<Value, ApiError> {
    state.load(function).await?;
    let stats = state.events().stats(function);
    let stored = list_failed(state, Some(function.to_string())).await?.len();
    let now = now_ms();
    Ok(json!({
        "FunctionName": function,
        "Async": {
            "Depth": stats.depth,
            "Running": stats.running,
            "OldestEventAgeSeconds": stats.oldest_accepted_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0),
            "Succeeded": stats.counters.succeeded,
            "Failed": stats.counters.failed,
            "Retried": stats.counters.retried,
            "Throttled": stats.counters.throttled,
            "FailedEventsStored": stored,
        }
    }))
}

/// Accept an `Event` invocation: durable before it is acknowledged.
pub async fn accept(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    payload: &[u8],
    client_context: Option<String>,
    request_id: &str,
) -> Result<(), ApiError> {
    let now = now_ms();
    let header = EventHeader {
        id: request_id.to_string(),
        function: function.to_string(),
        qualifier,
        accepted_ms: now,
        due_ms: now,
        runs: 0,
        client_context,
        depth: 0,
        last: None,
    };
    let payload = if payload.is_empty() {
        b"{}".to_vec()
    } else {
        payload.to_vec()
    };
    state.events().enqueue(header, payload).await?;
    Ok(())
}

/// Shared handle.
pub type SharedEvents = Arc<Events>;
