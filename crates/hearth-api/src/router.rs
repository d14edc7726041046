//! HTTP: the routes of the Lambda REST API (plus hearth's own log endpoint), the SigV4 gate
//! every request passes, the presigned package downloads, and the server loop.
//!
//! Handlers only translate: path, query, headers and body in; a call into
//! [`crate::functions`] or [`crate::invoke`] with plain values; status, headers and JSON out.
//! Every request first gets an id (`x-amzn-RequestId` on every response, and the request's
//! tracing span: `trace_request`). Then the gate (`authenticate`) runs on every route, the
//! unknown ones included, except the one that serves packages by presigned URL
//! (`GET /hearth/v1/code/<sha256>`, see [`crate::download`]): it checks its own signature.
//! The gate reads the body under a size limit (6 MB for invocations, enough for a 50 MB zip in base64
//! otherwise; more is `RequestTooLargeException` before anything is parsed; a moderately
//! oversized body is drained first so the client reads the error rather than a reset), and
//! verifies the SigV4 signature over it. Why a middleware rather than an extractor per
//! handler: the signature covers the body, so the gate must own the body before any handler
//! runs, and a route that forgets an extractor would be an unsigned route.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hearth_proto::MAX_SYNC_PAYLOAD;
use http_body_util::BodyExt;
use tracing::Instrument;

use crate::error::{ApiError, ErrorKind};
use crate::events;
use crate::functions;
use crate::invoke::{self, InvokeCommand, InvokeOutcome};
use crate::layers;
use crate::model::{LayerListParams, ListParams, parse_json};
use crate::sigv4;
use crate::state::AppState;
use crate::stream;
use crate::validate;

/// The front end's router: every route behind SigV4 but the presigned package download.
pub fn app(state: AppState) -> Router {
    const F: &str = "/2015-03-31/functions";
    let signed = Router::new()
        .route(F, post(create_function).get(list_functions))
        .route(
            "/2015-03-31/functions/",
            post(create_function).get(list_functions),
        )
        .route(
            &format!("{F}/{{function}}"),
            get(get_function).delete(delete_function),
        )
        .route(
            &format!("{F}/{{function}}/configuration"),
            get(get_configuration).put(update_configuration),
        )
        .route(&format!("{F}/{{function}}/code"), put(update_code))
        .route(
            &format!("{F}/{{function}}/versions"),
            post(publish_version).get(list_versions),
        )
        .route(
            &format!("{F}/{{function}}/aliases"),
            post(create_alias).get(list_aliases),
        )
        .route(
            &format!("{F}/{{function}}/aliases/{{alias}}"),
            get(get_alias).put(update_alias).delete(delete_alias),
        )
        .route(
            &format!("{F}/{{function}}/invocations"),
            post(invoke_function),
        )
        .route(
            "/2021-11-15/functions/{function}/response-streaming-invocations",
            post(invoke_with_response_stream),
        )
        .route(
            "/2017-10-31/functions/{function}/concurrency",
            put(put_concurrency).delete(delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{function}/concurrency",
            get(get_concurrency),
        )
        .route("/2018-10-31/layers", get(list_layers))
        .route("/2018-10-31/layers/", get(list_layers))
        .route(
            "/2018-10-31/layers/{layer}/versions",
            post(publish_layer_version).get(list_layer_versions),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}",
            get(get_layer_version).delete(delete_layer_version),
        )
        .route(
            &format!("{F}/{{function}}/policy"),
            post(add_permission).get(get_policy),
        )
        .route(
            &format!("{F}/{{function}}/policy/{{statement}}"),
            axum::routing::delete(remove_permission),
        )
        .route(
            "/2021-10-31/functions/{function}/url",
            post(create_url_config)
                .get(get_url_config)
                .put(update_url_config)
                .delete(delete_url_config),
        )
        .route(
            "/2021-10-31/functions/{function}/urls",
            get(list_url_configs),
        )
        .route("/2016-08-19/account-settings", get(account_settings))
        .route("/2016-08-19/account-settings/", get(account_settings))
        .route(
            "/2019-09-25/functions/{function}/event-invoke-config",
            put(put_event_config)
                .post(update_event_config)
                .get(get_event_config)
                .delete(delete_event_config),
        )
        .route(
            "/2019-09-25/functions/{function}/event-invoke-config/list",
            get(list_event_configs),
        )
        .route("/hearth/v1/functions/{function}/logs", get(function_logs))
        .route(
            "/hearth/v1/functions/{function}/status",
            get(function_status),
        )
        .route("/hearth/v1/metrics", get(metrics))
        .route("/hearth/v1/failed-events", get(list_failed_events))
        .route(
            "/hearth/v1/failed-events/{event}",
            get(get_failed_event).delete(delete_failed_event),
        )
        .route(
            "/hearth/v1/failed-events/{event}/redrive",
            post(redrive_failed_event),
        )
        .fallback(unknown_operation)
        .method_not_allowed_fallback(unknown_operation)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route(
            &format!("{}{{sha256}}", crate::download::PATH_PREFIX),
            get(download_code),
        )
        .merge(signed)
        // Function URLs are answered before the API's routes and their SigV4 gate.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::urls::serve::intercept,
        ))
        .layer(middleware::from_fn(trace_request))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serve the API on `listener` until `shutdown` resolves (then finish in-flight requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "lambda api listening");
    }
    // The peer address is a function URL event's `sourceIp`.
    let app = app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

// ---- the gate -------------------------------------------------------------------------------

/// The request id, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Whether a path is one of the invoke operations (`Invoke`, `InvokeWithResponseStream`).
fn is_invocation(path: &str) -> bool {
    path.ends_with("/invocations") || path.ends_with("/response-streaming-invocations")
}

fn body_limit(state: &AppState, path: &str) -> u64 {
    if is_invocation(path) {
        MAX_SYNC_PAYLOAD as u64
    } else {
        // A zip at the limit, base64-encoded, plus room for the rest of the JSON.
        state.code().limits().max_zipped_bytes.div_ceil(3) * 4 + 1024 * 1024
    }
}

fn too_large(path: &str, limit: u64) -> ApiError {
    let operation = if is_invocation(path) {
        " for the InvokeFunction operation"
    } else {
        ""
    };
    ApiError::too_large(format!(
        "Request must be smaller than {limit} bytes{operation}"
    ))
}

/// Give the request an id and a span, and log its outcome.
async fn trace_request(mut req: Request, next: Next) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.uri().path(),
        function = tracing::field::Empty,
        version = tracing::field::Empty,
    );
    req.extensions_mut().insert(RequestId(request_id.clone()));
    async move {
        let started = Instant::now();
        let mut response = next.run(req).await;
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-amzn-requestid", v);
        }
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request done"
        );
        response
    }
    .instrument(span)
    .await
}

/// The SigV4 gate.
async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match admit(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => {
            tracing::info!(error = %e.kind, "request refused");
            e.into_response()
        }
    }
}

/// Read the body (bounded) and verify the signature over it.
async fn admit(state: &AppState, req: Request) -> Result<Request, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let limit = body_limit(state, &path);
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain_cap = limit.saturating_add(DRAIN_EXTRA);
    if declared.is_some_and(|n| n > drain_cap) {
        return Err(too_large(&path, limit));
    }
    let bytes = read_body(body, limit, drain_cap)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => too_large(&path, limit),
            BodyError::Read(e) => {
                ApiError::bad_content(format!("could not read the request body: {e}"))
            }
        })?;
    let verified = sigv4::verify(
        &parts,
        &bytes,
        &state.config().credentials,
        chrono::Utc::now(),
    )?;
    tracing::debug!(access_key_id = %verified.access_key_id, "signature verified");
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// How far past its limit a request body is still read (and discarded) before answering 413:
/// a client that is still sending when the server answers and closes sees a broken connection
/// instead of the error, so moderately oversized bodies are drained first.
const DRAIN_EXTRA: u64 = 16 * 1024 * 1024;

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// Read a body of at most `limit` bytes; past that, keep reading (discarding) up to `drain_cap`
/// so the 413 reaches the client, then fail.
async fn read_body(mut body: Body, limit: u64, drain_cap: u64) -> Result<Bytes, BodyError> {
    let mut buf = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > drain_cap {
            return Err(BodyError::TooLarge);
        }
        if total <= limit {
            buf.extend_from_slice(&data);
        } else if !buf.is_empty() {
            buf = Vec::new();
        }
    }
    if total > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(buf))
}

async fn unknown_operation() -> ApiError {
    ApiError::new(ErrorKind::UnknownOperation, "Unknown operation")
}

// ---- extraction ------------------------------------------------------------------------------

/// Path parameters and the query string, with extraction failures as Lambda errors.
struct Params {
    function: String,
    alias: Option<String>,
    event: Option<String>,
    layer: Option<String>,
    version: Option<String>,
    query: HashMap<String, String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(mut path): Path<HashMap<String, String>> = Path::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(format!("invalid path: {}", e.body_text())))?;
        let Query(query): Query<HashMap<String, String>> = Query::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::invalid(format!("invalid query string: {}", e.body_text())))?;
        Ok(Params {
            function: path.remove("function").unwrap_or_default(),
            alias: path.remove("alias"),
            event: path.remove("event"),
            layer: path.remove("layer"),
            version: path.remove("version"),
            query,
        })
    }
}

impl Params {
    fn q(&self, key: &str) -> Option<String> {
        self.query.get(key).cloned()
    }

    fn list(&self) -> ListParams {
        ListParams {
            marker: self.q("Marker"),
            max_items: self.q("MaxItems"),
            function_version: self.q("FunctionVersion"),
        }
    }

    fn alias(&self) -> &str {
        self.alias.as_deref().unwrap_or_default()
    }

    fn layer(&self) -> &str {
        self.layer.as_deref().unwrap_or_default()
    }

    fn version(&self) -> &str {
        self.version.as_deref().unwrap_or_default()
    }

    fn layer_list(&self) -> LayerListParams {
        LayerListParams {
            compatible_runtime: self.q("CompatibleRuntime"),
            compatible_architecture: self.q("CompatibleArchitecture"),
            marker: self.q("Marker"),
            max_items: self.q("MaxItems"),
        }
    }
}

/// A query for the routes without path parameters.
struct QueryOnly(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryOnly {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Query(query) = Query::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::invalid(format!("invalid query string: {}", e.body_text())))?;
        Ok(QueryOnly(query))
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---- handlers --------------------------------------------------------------------------------

async fn create_function(State(s): State<AppState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let config = functions::create_function(&s, parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(config)))
}

async fn list_functions(
    State(s): State<AppState>,
    QueryOnly(q): QueryOnly,
) -> ApiResult<impl IntoResponse> {
    let params = ListParams {
        marker: q.get("Marker").cloned(),
        max_items: q.get("MaxItems").cloned(),
        function_version: q.get("FunctionVersion").cloned(),
    };
    Ok(Json(functions::list_functions(&s, params).await?))
}

async fn get_function(
    State(s): State<AppState>,
    p: Params,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let endpoint = client_endpoint(&uri, &headers)?;
    Ok(Json(
        functions::get_function(&s, &p.function, p.q("Qualifier"), &endpoint).await?,
    ))
}

/// The endpoint the client used: download URLs handed back to it go there.
fn client_endpoint(uri: &axum::http::Uri, headers: &HeaderMap) -> ApiResult<String> {
    crate::download::endpoint_of(
        header_string(headers, "host")?.as_deref(),
        uri.authority().map(|a| a.as_str()),
        header_string(headers, "x-forwarded-proto")?.as_deref(),
    )
    .ok_or_else(|| ApiError::invalid("this operation needs a valid Host header"))
}

async fn delete_function(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    functions::delete_function(&s, &p.function, p.q("Qualifier")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_configuration(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::get_function_configuration(&s, &p.function, p.q("Qualifier")).await?,
    ))
}

async fn update_configuration(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::update_function_configuration(&s, &p.function, parse_json(&body)?).await?,
    ))
}

async fn update_code(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::update_function_code(&s, &p.function, parse_json(&body)?).await?,
    ))
}

async fn publish_version(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let config = functions::publish_version(&s, &p.function, parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(config)))
}

async fn list_versions(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::list_versions(&s, &p.function, p.list()).await?,
    ))
}

async fn create_alias(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let alias = functions::create_alias(&s, &p.function, parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(alias)))
}

async fn list_aliases(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::list_aliases(&s, &p.function, p.list()).await?,
    ))
}

async fn get_alias(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::get_alias(&s, &p.function, p.alias()).await?,
    ))
}

async fn update_alias(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::update_alias(&s, &p.function, p.alias(), parse_json(&body)?).await?,
    ))
}

async fn delete_alias(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    functions::delete_alias(&s, &p.function, p.alias()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_concurrency(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::put_function_concurrency(&s, &p.function, parse_json(&body)?).await?,
    ))
}

async fn get_concurrency(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        functions::get_function_concurrency(&s, &p.function).await?,
    ))
}

async fn delete_concurrency(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    functions::delete_function_concurrency(&s, &p.function).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn publish_layer_version(
    State(s): State<AppState>,
    p: Params,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let endpoint = client_endpoint(&uri, &headers)?;
    let req = parse_json(&body)?;
    let layer = layers::publish_layer_version(&s, p.layer(), req, &endpoint).await?;
    Ok((StatusCode::CREATED, Json(layer)))
}

async fn get_layer_version(
    State(s): State<AppState>,
    p: Params,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let endpoint = client_endpoint(&uri, &headers)?;
    Ok(Json(
        layers::get_layer_version(&s, p.layer(), p.version(), &endpoint).await?,
    ))
}

async fn delete_layer_version(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    layers::delete_layer_version(&s, p.layer(), p.version()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_layer_versions(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        layers::list_layer_versions(&s, p.layer(), p.layer_list()).await?,
    ))
}

/// `ListLayers`, or `GetLayerVersionByArn` with `?find=LayerVersion` (same path).
async fn list_layers(
    State(s): State<AppState>,
    QueryOnly(q): QueryOnly,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(find) = q.get("find") {
        if find != "LayerVersion" {
            return Err(ApiError::invalid(format!(
                "Unsupported find {find:?}: only LayerVersion"
            )));
        }
        let endpoint = client_endpoint(&uri, &headers)?;
        let arn = q.get("Arn").map(String::as_str);
        return Ok(
            Json(layers::get_layer_version_by_arn(&s, arn, &endpoint).await?).into_response(),
        );
    }
    let params = LayerListParams {
        compatible_runtime: q.get("CompatibleRuntime").cloned(),
        compatible_architecture: q.get("CompatibleArchitecture").cloned(),
        marker: q.get("Marker").cloned(),
        max_items: q.get("MaxItems").cloned(),
    };
    Ok(Json(layers::list_layers(&s, params).await?).into_response())
}

async fn add_permission(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let statement =
        crate::policy::add(&s, &p.function, p.q("Qualifier"), parse_json(&body)?).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "Statement": statement })),
    ))
}

async fn get_policy(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        crate::policy::get(&s, &p.function, p.q("Qualifier")).await?,
    ))
}

async fn remove_permission(
    State(s): State<AppState>,
    p: Params,
    Path(path): Path<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let sid = path
        .get("statement")
        .map(String::as_str)
        .unwrap_or_default();
    crate::policy::remove(&s, &p.function, sid, p.q("Qualifier"), p.q("RevisionId")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_url_config(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let config = crate::urls::create(&s, &p.function, p.q("Qualifier"), parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(config)))
}

async fn get_url_config(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        crate::urls::get(&s, &p.function, p.q("Qualifier")).await?,
    ))
}

async fn update_url_config(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        crate::urls::update(&s, &p.function, p.q("Qualifier"), parse_json(&body)?).await?,
    ))
}

async fn delete_url_config(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    crate::urls::delete(&s, &p.function, p.q("Qualifier")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_url_configs(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        crate::urls::list(&s, &p.function, p.q("Marker"), p.q("MaxItems")).await?,
    ))
}

async fn account_settings(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(functions::get_account_settings(&s).await?))
}

fn header_string(headers: &HeaderMap, name: &str) -> ApiResult<Option<String>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid(format!("header {name} is not valid text")))
        })
        .transpose()
}

async fn invoke_function(
    State(s): State<AppState>,
    p: Params,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let cmd = InvokeCommand {
        function_name: p.function.clone(),
        qualifier: p.q("Qualifier"),
        invocation_type: header_string(&headers, "x-amz-invocation-type")?,
        log_type: header_string(&headers, "x-amz-log-type")?,
        client_context: header_string(&headers, "x-amz-client-context")?,
        payload: body,
        request_id,
    };
    match invoke::invoke(&s, cmd).await? {
        InvokeOutcome::DryRun => Ok(StatusCode::NO_CONTENT.into_response()),
        InvokeOutcome::Accepted => Ok(StatusCode::ACCEPTED.into_response()),
        InvokeOutcome::Completed {
            executed_version,
            payload,
            function_error,
            log_result,
        } => {
            let mut response = (StatusCode::OK, payload).into_response();
            let h = response.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let mut set = |name: &'static str, value: &str| {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            };
            set("x-amz-executed-version", &executed_version);
            if let Some(e) = &function_error {
                set("x-amz-function-error", e);
            }
            if let Some(l) = &log_result {
                set("x-amz-log-result", l);
            }
            Ok(response)
        }
    }
}

/// `InvokeWithResponseStream`: errors before the function streams are Lambda's JSON errors;
/// after that, HTTP 200 with an event stream (`PayloadChunk`s as the function produces them,
/// then `InvokeComplete`), see [`crate::stream`].
async fn invoke_with_response_stream(
    State(s): State<AppState>,
    p: Params,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    use futures::StreamExt as _;

    let invocation_type = header_string(&headers, "x-amz-invocation-type")?;
    if let Some(other) = invocation_type
        .as_deref()
        .filter(|t| !matches!(*t, "RequestResponse" | "DryRun"))
    {
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{other}' at 'invocationType' failed to \
             satisfy constraint: Member must satisfy enum value set: [RequestResponse, DryRun]"
        )));
    }
    let cmd = InvokeCommand {
        function_name: p.function.clone(),
        qualifier: p.q("Qualifier"),
        invocation_type,
        log_type: header_string(&headers, "x-amz-log-type")?,
        client_context: header_string(&headers, "x-amz-client-context")?,
        payload: body,
        request_id,
    };
    let mut running = match stream::start(&s, cmd).await? {
        stream::Started::DryRun => return Ok(StatusCode::NO_CONTENT.into_response()),
        stream::Started::Running(running) => running,
    };
    let executed_version = running.executed_version.clone();
    let body = match running.next().await {
        Some(stream::Piece::Done(Err(e))) => return Err(e),
        Some(stream::Piece::Done(Ok(outcome))) => Body::from(stream::buffered_events(outcome)),
        Some(stream::Piece::Start(_)) => {
            Body::from_stream(stream::events(running).map(Ok::<_, std::convert::Infallible>))
        }
        Some(stream::Piece::Chunk(first)) => Body::from_stream(
            futures::stream::once(
                async move { Bytes::from(crate::eventstream::payload_chunk(&first)) },
            )
            .chain(stream::events(running))
            .map(Ok::<_, std::convert::Infallible>),
        ),
        None => return Err(ApiError::internal("the invocation task ended early")),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.amazon.eventstream"),
    );
    if let Ok(v) = HeaderValue::from_str(&executed_version) {
        h.insert("x-amz-executed-version", v);
    }
    Ok(response)
}

async fn put_event_config(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        events::api::put(&s, &p.function, p.q("Qualifier"), parse_json(&body)?, true).await?,
    ))
}

async fn update_event_config(
    State(s): State<AppState>,
    p: Params,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        events::api::put(&s, &p.function, p.q("Qualifier"), parse_json(&body)?, false).await?,
    ))
}

async fn get_event_config(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        events::api::get(&s, &p.function, p.q("Qualifier")).await?,
    ))
}

async fn delete_event_config(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    events::api::delete(&s, &p.function, p.q("Qualifier")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_event_configs(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(events::api::list(&s, &p.function, p.list()).await?))
}

/// `GET /hearth/v1/functions/{name}/status`: the function's asynchronous queue.
async fn function_status(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    validate::function_name(&p.function)?;
    Ok(Json(events::status(&s, &p.function).await?))
}

/// `GET /hearth/v1/metrics`: Prometheus' text format.
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    metrics_response(&s)
}

/// The metrics as an HTTP response (also served, unauthenticated, by [`serve_metrics`]).
fn metrics_response(s: &AppState) -> Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(s, now),
    )
        .into_response()
}

/// Serves only `GET /metrics`, unauthenticated, for a Prometheus scraper on a listener of
/// its own (`hearth up --metrics-listen`).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { metrics_response(&s) }),
        )
        .with_state(state);
    axum::serve(listener, app).await
}

/// `GET /hearth/v1/failed-events[?function=NAME]`.
async fn list_failed_events(
    State(s): State<AppState>,
    QueryOnly(q): QueryOnly,
) -> ApiResult<impl IntoResponse> {
    let failed = events::list_failed(&s, q.get("function").cloned()).await?;
    Ok(Json(serde_json::json!({ "FailedEvents": failed })))
}

fn event_id(p: &Params) -> ApiResult<String> {
    let id = p.event.clone().unwrap_or_default();
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::invalid(format!("invalid event id {id:?}")));
    }
    Ok(id)
}

async fn get_failed_event(State(s): State<AppState>, p: Params) -> ApiResult<impl IntoResponse> {
    Ok(Json(events::get_failed(&s, &event_id(&p)?).await?))
}

async fn delete_failed_event(State(s): State<AppState>, p: Params) -> ApiResult<StatusCode> {
    events::delete_failed(&s, &event_id(&p)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn redrive_failed_event(
    State(s): State<AppState>,
    p: Params,
) -> ApiResult<impl IntoResponse> {
    let id = events::redrive(&s, &event_id(&p)?).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "EventId": id })),
    ))
}

/// `GET /hearth/v1/functions/{name}/logs?tail_bytes=N`: the function's recent log as text.
async fn function_logs(State(s): State<AppState>, p: Params) -> ApiResult<Response> {
    let name = p.function.clone();
    validate::function_name(&name)?;
    let tail_bytes = p
        .q("tail_bytes")
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::invalid(format!("invalid tail_bytes {v:?}")))
        })
        .transpose()?;
    s.load(&name).await?;
    let text = s
        .blocking(move |st| Ok(st.logs().tail(&name, tail_bytes)?))
        .await?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// `GET /hearth/v1/code/<sha256>?Expires=…&Signature=…`: a package, by presigned URL (no
/// SigV4; see [`crate::download`]).
async fn download_code(
    State(s): State<AppState>,
    Path(sha256): Path<String>,
    QueryOnly(q): QueryOnly,
) -> ApiResult<Response> {
    let package = functions::download_package(
        &s,
        &sha256,
        q.get("Expires").map(String::as_str),
        q.get("Signature").map(String::as_str),
    )
    .await?;
    let mut response = Body::from_stream(package.bytes).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(package.size));
    Ok(response)
}
