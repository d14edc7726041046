//! The Invoke operation: resolve what to run, hand it to the [`Invoker`](crate::invoker::Invoker),
//! shape what comes back the way Lambda does.
//!
//! Resolution: the function name may be a name, `name:qualifier`, or a full or partial ARN;
//! the qualifier (from the name or `?Qualifier=`) is `$LATEST`, a version number, or an alias.
//! An alias with `RoutingConfig` sends each invocation to its additional version with the
//! configured probability ([`pick_version`]). The chosen version's configuration becomes an
//! immutable [`FunctionSpec`] (its code directory is content-addressed).
//!
//! Lambda's rule that a *function* failure is not an HTTP error holds: exceptions, timeouts,
//! crashes and responses over 6 MB answer HTTP 200 with `X-Amz-Function-Error: Unhandled`. Only
//! failures to run at all are errors: throttling (429), not ready (502), internal (500).
//! An asynchronous (`Event`) invocation is checked the same way (with Lambda's 1 MB limit on
//! its payload), queued durably and answered 202 ([`crate::events`]).

use base64::Engine;
use bytes::Bytes;
use hearth_proto::MAX_SYNC_PAYLOAD;
use rand::Rng;

use crate::error::ApiError;
use crate::invoker::{InvokeError, InvokeRequest};
use crate::state::AppState;
use crate::store::AliasRecord;
use crate::validate::{self, Qualifier};

/// The most of the log returned in `X-Amz-Log-Result`.
pub const LOG_TAIL_BYTES: usize = 4096;
/// Lambda's limit on the base64 `X-Amz-Client-Context` header.
pub const MAX_CLIENT_CONTEXT: usize = 3583;
/// `Retry-After` sent with a throttle.
pub const RETRY_AFTER_S: u32 = 1;

/// One Invoke request, parsed from HTTP.
#[derive(Debug, Clone)]
pub struct InvokeCommand {
    /// `FunctionName` as in the path (decoded).
    pub function_name: String,
    /// `?Qualifier=`.
    pub qualifier: Option<String>,
    /// `X-Amz-Invocation-Type`.
    pub invocation_type: Option<String>,
    /// `X-Amz-Log-Type`.
    pub log_type: Option<String>,
    /// `X-Amz-Client-Context` (base64).
    pub client_context: Option<String>,
    pub payload: Bytes,
    /// The request's id (also the invocation's id).
    pub request_id: String,
}

/// What an Invoke answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// `DryRun`: everything checked, nothing run (HTTP 204).
    DryRun,
    /// `Event`: queued durably (HTTP 202).
    Accepted,
    /// The function ran (HTTP 200), successfully or not.
    Completed {
        executed_version: String,
        payload: Vec<u8>,
        /// `X-Amz-Function-Error`.
        function_error: Option<String>,
        /// `X-Amz-Log-Result`: base64 of the log's last 4 KB, when `Tail` was asked for.
        log_result: Option<String>,
    },
}

/// Which version an alias sends this invocation to.
pub fn pick_version<R: Rng + ?Sized>(alias: &AliasRecord, rng: &mut R) -> String {
    if let Some((version, weight)) = alias.additional_version_weights.iter().next()
        && rng.random::<f64>() < *weight
    {
        return version.clone();
    }
    alias.function_version.clone()
}

enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

pub async fn invoke(state: &AppState, cmd: InvokeCommand) -> Result<InvokeOutcome, ApiError> {
    match resolve(state, cmd).await? {
        Resolved::DryRun => Ok(InvokeOutcome::DryRun),
        Resolved::Accepted => Ok(InvokeOutcome::Accepted),
        Resolved::Run(ready) => run(state, *ready).await,
    }
}

/// An Invoke checked and resolved: what [`resolve`] leaves to do.
#[derive(Debug)]
pub enum Resolved {
    /// `DryRun`: everything checked, nothing to run.
    DryRun,
    /// `Event`: queued durably.
    Accepted,
    /// A synchronous invocation of one version, ready for [`run`].
    Run(Box<Ready>),
}

/// A synchronous invocation, resolved to the version it runs.
#[derive(Debug)]
pub struct Ready {
    /// `X-Amz-Executed-Version`.
    pub executed_version: String,
    request: InvokeRequest,
    /// `LogType: Tail`.
    tail: bool,
}

impl Ready {
    /// Send a streamed response to `target` as the function produces it (see
    /// [`ResponseSink`](crate::invoker::ResponseSink) for what reaches it and what stays in
    /// the outcome).
    pub fn stream_to(&mut self, target: crate::invoker::ResponseTarget) {
        self.request.response = Some(target);
    }
}

/// Everything of an Invoke up to running the function: the checks, the resolution of the
/// version, and for `Event` the durable queueing.
pub async fn resolve(state: &AppState, cmd: InvokeCommand) -> Result<Resolved, ApiError> {
    let invocation_type = match cmd.invocation_type.as_deref() {
        None | Some("RequestResponse") => InvocationType::RequestResponse,
        Some("Event") => InvocationType::Event,
        Some("DryRun") => InvocationType::DryRun,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'invocationType' failed to \
                 satisfy constraint: Member must satisfy enum value set: [Event, \
                 RequestResponse, DryRun]"
            )));
        }
    };
    let tail = match cmd.log_type.as_deref() {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'logType' failed to satisfy \
                 constraint: Member must satisfy enum value set: [None, Tail]"
            )));
        }
    };
    if cmd.payload.len() > MAX_SYNC_PAYLOAD {
        return Err(ApiError::too_large(format!(
            "Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction \
             operation"
        )));
    }

    let fref = state.parse_ref(&cmd.function_name)?;
    let qualifier = validate::merge_qualifier(fref.qualifier, cmd.qualifier)?;
    let parsed = qualifier.as_deref().map(Qualifier::parse).transpose()?;
    let rec = state.load(&fref.name).await?;
    let name = rec.name.clone();

    // Resolve the version to run (an alias may route between two).
    let executed_version = match &parsed {
        None | Some(Qualifier::Latest) => "$LATEST".to_string(),
        Some(Qualifier::Version(n)) => n.to_string(),
        Some(Qualifier::Alias(alias)) => match rec.aliases.get(alias) {
            Some(a) => pick_version(a, &mut rand::rng()),
            None => return Err(state.function_not_found(&name, qualifier.as_deref())),
        },
    };
    let version = if executed_version == "$LATEST" {
        rec.latest.clone()
    } else {
        executed_version
            .parse::<u64>()
            .ok()
            .and_then(|n| rec.versions.get(&n).cloned())
            .ok_or_else(|| state.function_not_found(&name, qualifier.as_deref()))?
    };
    tracing::Span::current().record("version", executed_version.as_str());

    let is_event = matches!(invocation_type, InvocationType::Event);
    if is_event && cmd.payload.len() > crate::events::MAX_ASYNC_PAYLOAD {
        return Err(ApiError::too_large(format!(
            "Request must be smaller than {} bytes for the InvokeFunction operation",
            crate::events::MAX_ASYNC_PAYLOAD
        )));
    }
    if !cmd.payload.is_empty()
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&cmd.payload)
    {
        return Err(ApiError::bad_content(format!(
            "Could not parse request body into json: Could not parse payload into json: {e}"
        )));
    }
    let client_context = cmd
        .client_context
        .as_deref()
        .map(decode_client_context)
        .transpose()?;
    if matches!(invocation_type, InvocationType::DryRun) {
        return Ok(Resolved::DryRun);
    }

    if let Some(st) = version.state.as_deref() {
        return Err(ApiError::new(
            crate::error::ErrorKind::ResourceConflict,
            format!(
                "The operation cannot be performed at this time. The function is currently in the \
                 following state: {st}{}",
                version
                    .state_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        ));
    }
    if is_event {
        crate::events::accept(
            state,
            &name,
            qualifier,
            &cmd.payload,
            client_context,
            &cmd.request_id,
        )
        .await?;
        tracing::info!(function = %name, bytes = cmd.payload.len(), "event queued");
        return Ok(Resolved::Accepted);
    }

    let config = state.config();
    let reserved_total = state.blocking(|s| Ok(s.store().reserved_total()?)).await?;
    let unreserved_limit = u64::from(config.account_concurrency)
        .saturating_sub(reserved_total)
        .try_into()
        .unwrap_or(0);
    let spec = state.function_spec(&name, &executed_version, &version);
    let invoked_arn = match &qualifier {
        Some(q) => config.qualified_arn(&name, q),
        None => config.function_arn(&name),
    };
    let request = InvokeRequest {
        request_id: cmd.request_id,
        spec,
        invoked_arn,
        // Lambda hands a function `{}` when the caller sent no payload.
        payload: if cmd.payload.is_empty() {
            bytes::Bytes::from_static(b"{}")
        } else {
            cmd.payload
        },
        client_context,
        reserved_concurrency: rec.reserved_concurrency,
        unreserved_limit,
        log: Some(crate::invoker::LogTarget(std::sync::Arc::new(
            crate::logs::FunctionLog {
                logs: state.logs().clone(),
                function: name.clone(),
            },
        ))),
        response: None,
    };
    Ok(Resolved::Run(Box::new(Ready {
        executed_version,
        request,
        tail,
    })))
}

/// Run a resolved invocation and shape its result as Lambda does.
pub async fn run(state: &AppState, ready: Ready) -> Result<InvokeOutcome, ApiError> {
    let Ready {
        executed_version,
        request,
        tail,
    } = ready;
    let name = request.spec.name.clone();
    let result = state.invoker().invoke(request).await.map_err(|e| match e {
        InvokeError::TooManyRequests { reason } => ApiError::throttled(reason, RETRY_AFTER_S),
        InvokeError::NotReady(message) => {
            ApiError::new(crate::error::ErrorKind::ResourceNotReady, message)
        }
        // The embedded invoker is always the leader; a networked front end forwards first.
        e @ InvokeError::NotLeader { .. } => {
            ApiError::new(crate::error::ErrorKind::ResourceNotReady, e.to_string())
        }
        InvokeError::Service(detail) => ApiError::internal(format!("invoker: {detail}")),
    })?;

    // The log itself was streamed to the log store while the function ran; the result
    // carries its end.
    let log = result.log;
    let log_result = tail.then(|| {
        let bytes = log.as_bytes();
        let tail = &bytes[bytes.len().saturating_sub(LOG_TAIL_BYTES)..];
        base64::engine::general_purpose::STANDARD.encode(tail)
    });

    let (payload, function_error) = if result.payload.len() > MAX_SYNC_PAYLOAD {
        let doc = serde_json::json!({
            "errorMessage": format!(
                "Response payload size ({} bytes) exceeded maximum allowed payload size \
                 ({MAX_SYNC_PAYLOAD} bytes).",
                result.payload.len()
            ),
            "errorType": "Function.ResponseSizeTooLarge",
        });
        (doc.to_string().into_bytes(), Some("Unhandled".to_string()))
    } else {
        (
            result.payload,
            result.function_error.then(|| "Unhandled".to_string()),
        )
    };
    tracing::info!(
        function = %name,
        version = %executed_version,
        function_error = function_error.is_some(),
        response_bytes = payload.len(),
        "invoked"
    );
    Ok(InvokeOutcome::Completed {
        executed_version,
        payload,
        function_error,
        log_result,
    })
}

fn decode_client_context(b64: &str) -> Result<String, ApiError> {
    let invalid =
        || ApiError::bad_content("Client context must be a valid Base64-encoded JSON object.");
    if b64.len() > MAX_CLIENT_CONTEXT {
        return Err(ApiError::bad_content(format!(
            "Client context must be at most {MAX_CLIENT_CONTEXT} bytes (base64-encoded)"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(_)) => Ok(text),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    #[test]
    fn weighted_pick_follows_the_weight() {
        let alias = AliasRecord {
            name: "live".into(),
            function_version: "1".into(),
            description: String::new(),
            additional_version_weights: BTreeMap::from([("2".to_string(), 0.3)]),
            revision_id: "r".into(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 10_000;
        let twos = (0..n)
            .filter(|_| pick_version(&alias, &mut rng) == "2")
            .count();
        // 0.3 ± 5 standard deviations (σ ≈ 0.0046).
        assert!((2770..=3230).contains(&twos), "{twos}");
        let plain = AliasRecord {
            additional_version_weights: BTreeMap::new(),
            ..alias
        };
        assert!((0..100).all(|_| pick_version(&plain, &mut rng) == "1"));
    }

    #[test]
    fn client_context_rules() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            decode_client_context(&b64(r#"{"custom":{"a":1}}"#)).expect("ok"),
            r#"{"custom":{"a":1}}"#
        );
        assert!(decode_client_context("%%%").is_err());
        assert!(decode_client_context(&b64("not json")).is_err());
        assert!(decode_client_context(&b64("[1]")).is_err());
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(3000));
        assert!(decode_client_context(&b64(&big)).is_err());
    }
}
