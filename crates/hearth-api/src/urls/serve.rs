//! Serving function URLs on the API's listener.
//!
//! [`intercept`] runs before the Lambda API's SigV4 gate and takes the requests that are URL
//! requests: a `Host` of the form `<url-id>.lambda-url.<region>.<anything>` (any path), or the
//! path form `/lambda-url/<url-id>/…` on any host. Everything else goes on to the API routes.
//! Why on the API listener rather than one of its own: one port to expose and to put a TLS
//! proxy in front of, and the `FunctionUrl` works wherever the API endpoint does.
//!
//! A URL request is answered in this order: an unknown url-id is 403 (as Lambda, which does
//! not say whether a URL exists); a CORS preflight is answered from the URL's `Cors` without
//! invoking anything (browsers do not sign preflights, so this comes before the signature
//! check); an `AWS_IAM` URL needs a SigV4 signature (service `lambda`) from hearth's
//! credentials, else 403; then the 2.0 event ([`super::event`]) goes through the same
//! [`invoke::invoke`] as a synchronous `Invoke` (resolution of the alias, limits, worker), and
//! the result is mapped back. Failures answer as Lambda's URLs do: a function error or a
//! malformed result 502, a throttle 429, a request over 6 MB 413.
//!
//! A `RESPONSE_STREAM` URL runs the same invocation through [`crate::stream`] and answers as
//! soon as the function starts streaming, with chunked transfer and each chunk forwarded as it
//! arrives: status, headers and cookies from the stream's prelude ([`super::prelude`]) when the
//! function streams with its content type, else status 200 and the whole stream as the body.
//! A function that answers in one piece gets its payload sent as the body (status 200). An
//! error after the head went out can only end the response early: the connection is closed
//! before the chunked body's end, which clients report as an incomplete response.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hearth_proto::MAX_SYNC_PAYLOAD;

use super::event::{self, IamCaller, UrlRequest};
use super::{AuthType, InvokeMode, PATH_PREFIX, UNQUALIFIED, UrlRecord, is_url_id, prelude};
use crate::error::{ApiError, ErrorKind};
use crate::invoke::{self, InvokeCommand, InvokeOutcome};
use crate::router::RequestId;
use crate::sigv4;
use crate::state::AppState;
use crate::stream::{self, Piece};

/// Which URL a request is for, and the path the function sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTarget {
    pub url_id: String,
    pub raw_path: String,
}

/// The url-id in a `Host` of the form `<url-id>.lambda-url.<region>.<domain>[:port]`.
pub fn host_url_id(host: &str) -> Option<String> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    (labels.len() >= 4
        && labels[1] == "lambda-url"
        && !labels[2].is_empty()
        && is_url_id(labels[0]))
    .then(|| labels[0].to_string())
}

/// Whether (and where) a request is a URL request.
pub fn target(host: Option<&str>, path: &str) -> Option<UrlTarget> {
    if let Some(url_id) = host.and_then(host_url_id) {
        return Some(UrlTarget {
            url_id,
            raw_path: path.to_string(),
        });
    }
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, tail),
        None => (rest, ""),
    };
    is_url_id(id).then(|| UrlTarget {
        url_id: id.to_string(),
        raw_path: format!("/{tail}"),
    })
}

/// The middleware: URL requests are answered here, the rest go on.
pub async fn intercept(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::to_string);
    match target(host.as_deref(), req.uri().path()) {
        None => next.run(req).await,
        Some(t) => handle(&state, t, host.unwrap_or_default(), req).await,
    }
}

fn message(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "Message": text }).to_string(),
    )
        .into_response()
}

fn forbidden() -> Response {
    message(StatusCode::FORBIDDEN, "Forbidden")
}

fn internal_error() -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [(header::CONTENT_TYPE, "application/json")],
        "Internal Server Error",
    )
        .into_response()
}

/// The function (name and URL key) and URL configuration of `url_id`.
async fn lookup(
    state: &AppState,
    url_id: &str,
) -> Result<Option<(String, String, UrlRecord)>, ApiError> {
    let id = url_id.to_string();
    let rec = state
        .blocking(move |s| Ok(s.store().function_by_url(&id)?))
        .await?;
    Ok(rec.and_then(|rec| {
        rec.function_urls
            .iter()
            .find(|(_, u)| u.url_id == url_id)
            .map(|(k, u)| (rec.name.clone(), k.clone(), u.clone()))
    }))
}

async fn handle(state: &AppState, t: UrlTarget, host: String, req: Request) -> Response {
    let (name, key, url) = match lookup(state, &t.url_id).await {
        Ok(Some(found)) => found,
        Ok(None) => return forbidden(),
        Err(e) => {
            tracing::warn!(error = %e, "function url lookup failed");
            return message(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
        }
    };
    tracing::Span::current().record("function", name.as_str());
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);

    // A CORS preflight, answered from the configuration.
    if let (Some(cors), Some(origin)) = (&url.cors, &origin)
        && req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut response = StatusCode::OK.into_response();
        add_headers(&mut response, event::preflight_headers(cors, origin));
        return response;
    }

    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let source_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_SYNC_PAYLOAD).await else {
        return message(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    };

    let iam = match url.auth_type {
        AuthType::None => None,
        AuthType::AwsIam => {
            match sigv4::verify(
                &parts,
                &body,
                &state.config().credentials,
                chrono::Utc::now(),
            ) {
                Ok(v) if v.service == "lambda" => Some(IamCaller {
                    access_key_id: v.access_key_id,
                }),
                Ok(v) => {
                    tracing::info!(service = %v.service, "function url: signed for another service");
                    return forbidden();
                }
                Err(e) => {
                    tracing::info!(error = %e, "function url: signature refused");
                    return forbidden();
                }
            }
        }
    };

    let protocol = match parts.version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    };
    let scheme = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http")
        .to_string();
    let config = state.config();
    let ev = event::build_event(&UrlRequest {
        method: parts.method.as_str(),
        raw_path: &t.raw_path,
        raw_query: parts.uri.query().unwrap_or_default(),
        headers: &parts.headers,
        body: &body,
        source_ip: &source_ip,
        protocol,
        scheme: &scheme,
        url_id: &t.url_id,
        domain_name: &host,
        account_id: &config.account_id,
        request_id: &request_id,
        now: chrono::Utc::now(),
        iam,
    });
    let cmd = InvokeCommand {
        function_name: name,
        qualifier: (key != UNQUALIFIED).then_some(key),
        invocation_type: None,
        log_type: None,
        client_context: None,
        payload: ev.to_string().into(),
        request_id,
    };
    let streaming = url.invoke_mode == InvokeMode::ResponseStream;
    let mut response = if streaming {
        streamed(state, cmd).await
    } else {
        buffered(state, cmd).await
    };
    if let (Some(cors), Some(origin)) = (&url.cors, &origin) {
        add_headers(&mut response, event::response_headers(cors, origin));
    }
    response
}

/// A `BUFFERED` URL: the function's result, mapped to HTTP.
async fn buffered(state: &AppState, cmd: InvokeCommand) -> Response {
    match invoke::invoke(state, cmd).await {
        Ok(InvokeOutcome::Completed {
            payload,
            function_error: None,
            ..
        }) => match event::map_result(&payload) {
            Ok(r) => {
                let mut response = Response::new(Body::from(r.body));
                *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
                add_headers(&mut response, r.headers);
                response
            }
            Err(e) => {
                tracing::info!(error = %e, "function url: result is not a valid response");
                internal_error()
            }
        },
        // A function error (an exception, a timeout, a crash); Accepted and DryRun cannot
        // happen for a RequestResponse invocation.
        Ok(_) => internal_error(),
        Err(e) => invoke_error(&e),
    }
}

/// A `RESPONSE_STREAM` URL: the function's stream, forwarded as it arrives.
async fn streamed(state: &AppState, cmd: InvokeCommand) -> Response {
    use futures::StreamExt as _;

    let mut running = match stream::start(state, cmd).await {
        Ok(stream::Started::Running(running)) => running,
        // Not asked for: a URL invocation is RequestResponse.
        Ok(stream::Started::DryRun) => return internal_error(),
        Err(e) => return invoke_error(&e),
    };
    let mut head = Vec::new();
    let content_type = match running.next().await {
        Some(Piece::Start(content_type)) => content_type,
        Some(Piece::Chunk(bytes)) => {
            head.extend_from_slice(&bytes);
            None
        }
        Some(Piece::Done(Ok(InvokeOutcome::Completed {
            payload,
            function_error: None,
            ..
        }))) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                payload,
            )
                .into_response();
        }
        Some(Piece::Done(Err(e))) => return invoke_error(&e),
        Some(Piece::Done(Ok(_))) | None => return internal_error(),
    };
    let (status, headers) = if content_type.as_deref() == Some(prelude::CONTENT_TYPE) {
        loop {
            match prelude::scan(&head) {
                Ok(prelude::Scan::Done { head: h, body_at }) => {
                    head.drain(..body_at);
                    break (h.status, h.headers);
                }
                Ok(prelude::Scan::More) => {}
                Err(e) => {
                    tracing::info!(error = %e, "function url: streamed response without a valid prelude");
                    return internal_error();
                }
            }
            match running.next().await {
                Some(Piece::Chunk(bytes)) => head.extend_from_slice(&bytes),
                Some(Piece::Start(_)) => {}
                Some(Piece::Done(_)) | None => {
                    tracing::info!(error = %prelude::PreludeError::Ended, "function url: streamed response without a valid prelude");
                    return internal_error();
                }
            }
        }
    } else {
        let content_type = content_type.unwrap_or_else(|| "application/octet-stream".to_string());
        (200, vec![("content-type".to_string(), content_type)])
    };
    let rest = futures::stream::unfold(Some(running), |state| async move {
        let mut running = state?;
        match running.next().await? {
            Piece::Chunk(bytes) => Some((Ok(bytes), Some(running))),
            Piece::Start(_) => Some((Ok(bytes::Bytes::new()), Some(running))),
            Piece::Done(Ok(InvokeOutcome::Completed {
                function_error: None,
                ..
            })) => None,
            Piece::Done(outcome) => {
                let why = match outcome {
                    Ok(InvokeOutcome::Completed { payload, .. }) => {
                        stream::function_error(&payload).0
                    }
                    Ok(_) => "no result".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::info!(error = %why, "function url: the stream ended in an error");
                Some((Err(std::io::Error::other(why)), None))
            }
        }
    });
    let body = futures::stream::once(async move { Ok(bytes::Bytes::from(head)) }).chain(rest);
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    add_headers(&mut response, headers);
    response
}

/// A failure to run the function, as a URL caller sees it.
fn invoke_error(e: &ApiError) -> Response {
    tracing::info!(error = %e, "function url: invocation refused");
    match e.kind {
        ErrorKind::TooManyRequests => message(StatusCode::TOO_MANY_REQUESTS, "Rate Exceeded."),
        ErrorKind::RequestTooLarge => {
            message(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
        }
        ErrorKind::ResourceNotFound => forbidden(),
        _ => internal_error(),
    }
}

/// Add headers (those the function or the CORS configuration set); `set-cookie` repeats,
/// any other name replaces. Names or values HTTP cannot carry are dropped.
fn add_headers(response: &mut Response, headers: Vec<(String, String)>) {
    let h = response.headers_mut();
    for (name, value) in headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            tracing::debug!("function url: dropped a header that HTTP cannot carry");
            continue;
        };
        if name == header::SET_COOKIE {
            h.append(name, value);
        } else {
            h.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "abcdefghijklmnopqrstuvwxyz012345";

    #[test]
    fn host_and_path_forms() {
        let host = format!("{ID}.lambda-url.us-east-1.localhost:9000");
        assert_eq!(
            target(Some(&host), "/x/y"),
            Some(UrlTarget {
                url_id: ID.into(),
                raw_path: "/x/y".into()
            })
        );
        let upper = format!("{}.LAMBDA-URL.eu-west-1.example.com", ID.to_uppercase());
        assert_eq!(host_url_id(&upper).as_deref(), Some(ID));
        assert_eq!(
            target(Some("127.0.0.1:9000"), &format!("/lambda-url/{ID}/a/b")),
            Some(UrlTarget {
                url_id: ID.into(),
                raw_path: "/a/b".into()
            })
        );
        assert_eq!(
            target(Some("127.0.0.1:9000"), &format!("/lambda-url/{ID}"))
                .map(|t| t.raw_path)
                .as_deref(),
            Some("/")
        );
        // The Lambda API's own paths and malformed ids are not URL requests.
        assert_eq!(
            target(Some("127.0.0.1:9000"), "/2015-03-31/functions"),
            None
        );
        assert_eq!(target(Some("127.0.0.1:9000"), "/lambda-url/short/"), None);
        assert_eq!(host_url_id(&format!("{ID}.lambda-url.localhost")), None);
        assert_eq!(host_url_id(&format!("{ID}.example.us-east-1.com")), None);
    }
}
