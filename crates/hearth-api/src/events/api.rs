//! The event-invoke configuration operations, on the function's record.

use serde::{Deserialize, Serialize};

use super::config::{self, EventInvokeRecord, Slot};
use crate::error::ApiError;
use crate::model::ListParams;
use crate::state::AppState;
use crate::store::FunctionRecord;
use crate::validate::Qualifier;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventInvokeConfigIn {
    pub maximum_retry_attempts: Option<i64>,
    pub maximum_event_age_in_seconds: Option<i64>,
    pub destination_config: Option<DestinationConfigIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfigIn {
    pub on_success: Option<DestinationIn>,
    pub on_failure: Option<DestinationIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationIn {
    pub destination: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionEventInvokeConfig {
    /// Seconds since the epoch (botocore's timestamp format for this shape).
    pub last_modified: f64,
    pub function_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_retry_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_event_age_in_seconds: Option<u32>,
    pub destination_config: DestinationConfigOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfigOut {
    pub on_success: DestinationOut,
    pub on_failure: DestinationOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListFunctionEventInvokeConfigsResponse {
    pub function_event_invoke_configs: Vec<FunctionEventInvokeConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
}

/// Validated changes: `None` leaves a field as it is; `Some(None)` clears it.
#[derive(Debug, Default)]
struct Changes {
    max_retries: Option<Option<u32>>,
    max_age_s: Option<Option<u32>>,
    on_success: Option<Option<String>>,
    on_failure: Option<Option<String>>,
}

fn changes(state: &AppState, req: EventInvokeConfigIn) -> Result<Changes, ApiError> {
    let c = state.config();
    let dest = |d: Option<DestinationIn>, slot| -> Result<Option<Option<String>>, ApiError> {
        match d {
            None => Ok(None),
            Some(DestinationIn { destination }) => match destination.filter(|a| !a.is_empty()) {
                None => Ok(Some(None)),
                Some(arn) => {
                    config::validate_destination(&arn, slot, &c.region, &c.account_id)?;
                    Ok(Some(Some(arn)))
                }
            },
        }
    };
    let dc = req.destination_config.unwrap_or_default();
    Ok(Changes {
        max_retries: req
            .maximum_retry_attempts
            .map(config::validate_retries)
            .transpose()?
            .map(Some),
        max_age_s: req
            .maximum_event_age_in_seconds
            .map(config::validate_max_age)
            .transpose()?
            .map(Some),
        on_success: dest(dc.on_success, Slot::OnSuccess)?,
        on_failure: dest(dc.on_failure, Slot::OnFailure)?,
    })
}

/// The function and the qualifier key a request names (`$LATEST` without one).
fn target(
    state: &AppState,
    function: &str,
    query: Option<String>,
) -> Result<(String, String), ApiError> {
    state.name_and_qualifier(function, query, "$LATEST")
}

fn check_qualifier(state: &AppState, rec: &FunctionRecord, q: &str) -> Result<(), ApiError> {
    let exists = match Qualifier::parse(q)? {
        Qualifier::Latest => true,
        Qualifier::Version(n) => rec.versions.contains_key(&n),
        Qualifier::Alias(a) => rec.aliases.contains_key(&a),
    };
    if exists {
        Ok(())
    } else {
        Err(state.function_not_found(&rec.name, Some(q)))
    }
}

fn wire(state: &AppState, name: &str, q: &str, r: &EventInvokeRecord) -> FunctionEventInvokeConfig {
    FunctionEventInvokeConfig {
        last_modified: r.last_modified,
        function_arn: state.config().qualified_arn(name, q),
        maximum_retry_attempts: r.max_retries,
        maximum_event_age_in_seconds: r.max_age_s,
        destination_config: DestinationConfigOut {
            on_success: DestinationOut {
                destination: r.on_success.clone(),
            },
            on_failure: DestinationOut {
                destination: r.on_failure.clone(),
            },
        },
    }
}

fn not_configured(state: &AppState, name: &str, q: &str) -> ApiError {
    ApiError::not_found(format!(
        "The function {} doesn't have an EventInvokeConfig",
        state.config().qualified_arn(name, q)
    ))
}

fn epoch_s() -> f64 {
    super::now_ms() as f64 / 1000.0
}

/// `PutFunctionEventInvokeConfig` (`replace`: every field as given) and
/// `UpdateFunctionEventInvokeConfig` (only the fields given change).
pub async fn put(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    req: EventInvokeConfigIn,
    replace: bool,
) -> Result<FunctionEventInvokeConfig, ApiError> {
    let (name, q) = target(state, function, qualifier)?;
    let ch = changes(state, req)?;
    let (key, qk) = (name.clone(), q.clone());
    let st = state.clone();
    let saved = state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                check_qualifier(&st, rec, &qk)?;
                let mut r = match (replace, rec.event_invoke.get(&qk)) {
                    (false, Some(old)) => old.clone(),
                    _ => EventInvokeRecord {
                        max_retries: None,
                        max_age_s: None,
                        on_success: None,
                        on_failure: None,
                        last_modified: 0.0,
                    },
                };
                if let Some(v) = ch.max_retries {
                    r.max_retries = v;
                }
                if let Some(v) = ch.max_age_s {
                    r.max_age_s = v;
                }
                if let Some(v) = ch.on_success {
                    r.on_success = v;
                }
                if let Some(v) = ch.on_failure {
                    r.on_failure = v;
                }
                r.last_modified = epoch_s();
                rec.event_invoke.insert(qk.clone(), r.clone());
                Ok::<_, ApiError>(r)
            })
        })
        .await?
        .ok_or_else(|| state.function_not_found(&name, None))?;
    tracing::info!(function = %name, qualifier = %q, "event invoke config saved");
    Ok(wire(state, &name, &q, &saved))
}

pub async fn get(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<FunctionEventInvokeConfig, ApiError> {
    let (name, q) = target(state, function, qualifier)?;
    let rec = state.load(&name).await?;
    check_qualifier(state, &rec, &q)?;
    rec.event_invoke
        .get(&q)
        .map(|r| wire(state, &name, &q, r))
        .ok_or_else(|| not_configured(state, &name, &q))
}

pub async fn delete(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<(), ApiError> {
    let (name, q) = target(state, function, qualifier)?;
    let (key, qk) = (name.clone(), q.clone());
    let st = state.clone();
    state
        .blocking(move |s| {
            s.store().update(&key, |rec, _| {
                check_qualifier(&st, rec, &qk)?;
                match rec.event_invoke.remove(&qk) {
                    Some(_) => Ok(()),
                    None => Err(not_configured(&st, &rec.name, &qk)),
                }
            })
        })
        .await?
        .ok_or_else(|| state.function_not_found(&name, None))
}

pub async fn list(
    state: &AppState,
    function: &str,
    params: ListParams,
) -> Result<ListFunctionEventInvokeConfigsResponse, ApiError> {
    let name = state.parse_ref(function)?.name;
    let max = match params.max_items.as_deref() {
        None => 50,
        Some(m) => match m.parse::<usize>() {
            Ok(n @ 1..=50) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "1 validation error detected: Value '{m}' at 'maxItems' failed to satisfy \
                     constraint: Member must have value between 1 and 50"
                )));
            }
        },
    };
    let rec = state.load(&name).await?;
    let mut all: Vec<_> = rec
        .event_invoke
        .iter()
        .filter(|(q, _)| {
            params
                .marker
                .as_ref()
                .is_none_or(|m| q.as_str() > m.as_str())
        })
        .map(|(q, r)| (q.clone(), wire(state, &name, q, r)))
        .collect();
    let next_marker = (all.len() > max).then(|| all[max - 1].0.clone());
    all.truncate(max);
    Ok(ListFunctionEventInvokeConfigsResponse {
        function_event_invoke_configs: all.into_iter().map(|(_, c)| c).collect(),
        next_marker,
    })
}
