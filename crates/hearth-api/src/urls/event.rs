//! The pure half of a function URL: an HTTP request in, Lambda's payload format 2.0 event out;
//! the function's result in, an HTTP response out; and the CORS headers. No I/O and no clock
//! (the caller passes the time), so every rule is tested here without a server.
//!
//! Decisions where Lambda's documentation leaves room:
//! - `body` is text when the `Content-Type` is textual (`text/*`, JSON, XML, JavaScript, and
//!   their `+json`/`+xml` kinds) and the bytes are UTF-8; anything else (a form post or no
//!   content type included, as Lambda does) is base64 with `isBase64Encoded: true`. No body, no
//!   `body` field.
//! - `cookies` takes every `Cookie` header's pairs; the `cookie` header itself is not repeated
//!   in `headers`. Repeated headers and query parameters are joined with commas.
//! - Query parameters are percent-decoded (`+` stays `+`); `rawQueryString` is as sent.
//! - A result that is a JSON object with `statusCode` is a structured response; any other JSON
//!   is the body of a 200 `application/json` response (a JSON string gives its text). A result
//!   that is not JSON, or a structured response that is malformed, is a 502.

use axum::http::HeaderMap;
use base64::Engine;
use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};

use super::Cors;

/// The caller of an `AWS_IAM` URL, as `requestContext.authorizer.iam` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamCaller {
    pub access_key_id: String,
}

/// What the event is built from.
#[derive(Debug, Clone)]
pub struct UrlRequest<'a> {
    pub method: &'a str,
    /// The path the function sees (the path form's `/lambda-url/<id>` prefix removed).
    pub raw_path: &'a str,
    /// The query string as sent, without `?`.
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub source_ip: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub protocol: &'a str,
    /// `http` or `https` (`x-forwarded-proto`).
    pub scheme: &'a str,
    pub url_id: &'a str,
    /// `requestContext.domainName`.
    pub domain_name: &'a str,
    pub account_id: &'a str,
    pub request_id: &'a str,
    pub now: DateTime<Utc>,
    pub iam: Option<IamCaller>,
}

/// Whether a body of this `Content-Type` goes to the function as text.
pub fn is_text(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return false };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some((kind, sub)) = mime.split_once('/') else {
        return false;
    };
    kind == "text"
        || matches!(sub, "json" | "xml" | "javascript")
        || sub.ends_with("+json")
        || sub.ends_with("+xml")
}

fn joined(values: impl Iterator<Item = String>) -> String {
    values.collect::<Vec<_>>().join(",")
}

/// Lambda's payload format 2.0 event for one URL request.
pub fn build_event(r: &UrlRequest<'_>) -> Value {
    let text = |v: &axum::http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let mut headers = Map::new();
    for name in r.headers.keys() {
        if name == "cookie" {
            continue;
        }
        let value = joined(r.headers.get_all(name).iter().map(text));
        headers.insert(name.as_str().to_string(), Value::String(value));
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(Value::as_str) {
        Some(prior) => format!("{prior}, {}", r.source_ip),
        None => r.source_ip.to_string(),
    };
    headers.insert("x-forwarded-for".into(), Value::String(forwarded_for));
    headers
        .entry("x-forwarded-proto")
        .or_insert_with(|| Value::String(r.scheme.to_string()));

    let cookies: Vec<Value> = r
        .headers
        .get_all("cookie")
        .iter()
        .flat_map(|v| {
            text(v)
                .split(';')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| Value::String(c.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();

    let mut query: Vec<(String, String)> = Vec::new();
    for pair in r.raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let (k, v) = (decode(k), decode(v));
        match query.iter_mut().find(|(name, _)| *name == k) {
            Some((_, existing)) => {
                existing.push(',');
                existing.push_str(&v);
            }
            None => query.push((k, v)),
        }
    }

    let user_agent = r.headers.get("user-agent").map(text).unwrap_or_default();
    let mut context = json!({
        "accountId": r.account_id,
        "apiId": r.url_id,
        "domainName": r.domain_name,
        "domainPrefix": r.url_id,
        "http": {
            "method": r.method,
            "path": r.raw_path,
            "protocol": r.protocol,
            "sourceIp": r.source_ip,
            "userAgent": user_agent,
        },
        "requestId": r.request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": r.now.format("%d/%b/%Y:%H:%M:%S +0000").to_string(),
        "timeEpoch": r.now.timestamp_millis(),
    });
    if let Some(iam) = &r.iam {
        context["authorizer"] = json!({
            "iam": {
                "accessKey": iam.access_key_id,
                "accountId": r.account_id,
                "callerId": iam.access_key_id,
                "cognitoIdentity": null,
                "principalOrgId": null,
                "userArn": format!("arn:aws:iam::{}:root", r.account_id),
                "userId": r.account_id,
            }
        });
    }

    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": r.raw_path,
        "rawQueryString": r.raw_query,
        "headers": headers,
        "requestContext": context,
        "isBase64Encoded": false,
    });
    if !cookies.is_empty() {
        event["cookies"] = Value::Array(cookies);
    }
    if !query.is_empty() {
        let q: Map<String, Value> = query
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        event["queryStringParameters"] = Value::Object(q);
    }
    if !r.body.is_empty() {
        let content_type = r.headers.get("content-type").map(text);
        match std::str::from_utf8(r.body) {
            Ok(s) if is_text(content_type.as_deref()) => {
                event["body"] = Value::String(s.to_string());
            }
            _ => {
                event["body"] =
                    Value::String(base64::engine::general_purpose::STANDARD.encode(r.body));
                event["isBase64Encoded"] = Value::Bool(true);
            }
        }
    }
    event
}

/// An HTTP response made from a function's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlResponse {
    pub status: u16,
    /// Names as the function wrote them; `set-cookie` may repeat.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a result cannot be an HTTP response (the caller gets a 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    #[error("the function's result is not JSON")]
    NotJson,
    #[error("statusCode must be an integer from 100 to 599")]
    Status,
    #[error("headers must be an object of strings")]
    Headers,
    #[error("cookies must be a list of strings")]
    Cookies,
    #[error("body is marked base64 but is not")]
    Base64,
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Map a function's result to the URL's response, as Lambda does.
pub fn map_result(payload: &[u8]) -> Result<UrlResponse, ResultError> {
    let value: Value = serde_json::from_slice(payload).map_err(|_| ResultError::NotJson)?;
    let json_type = ("content-type".to_string(), "application/json".to_string());
    let obj = match value {
        Value::Object(o) if o.contains_key("statusCode") => o,
        Value::String(s) => {
            return Ok(UrlResponse {
                status: 200,
                headers: vec![json_type],
                body: s.into_bytes(),
            });
        }
        _ => {
            return Ok(UrlResponse {
                status: 200,
                headers: vec![json_type],
                body: payload.to_vec(),
            });
        }
    };
    let status = obj
        .get("statusCode")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|n| (100..=599).contains(n))
        .ok_or(ResultError::Status)? as u16;
    let mut headers = Vec::new();
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                headers.push((k.clone(), scalar_text(v).ok_or(ResultError::Headers)?));
            }
        }
        Some(_) => return Err(ResultError::Headers),
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(json_type);
    }
    match obj.get("cookies") {
        None | Some(Value::Null) => {}
        Some(Value::Array(cs)) => {
            for c in cs {
                let c = c.as_str().ok_or(ResultError::Cookies)?;
                headers.push(("set-cookie".to_string(), c.to_string()));
            }
        }
        Some(_) => return Err(ResultError::Cookies),
    }
    let body = match obj.get("body") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let base64 = obj
        .get("isBase64Encoded")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let body = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|_| ResultError::Base64)?
    } else {
        body.into_bytes()
    };
    Ok(UrlResponse {
        status,
        headers,
        body,
    })
}

/// The `Access-Control-Allow-Origin` value for `origin`, if the configuration allows it.
fn allowed_origin(cors: &Cors, origin: &str) -> Option<String> {
    let origins = cors.allow_origins.as_deref().unwrap_or_default();
    if origins.iter().any(|o| o == origin) {
        return Some(origin.to_string());
    }
    if origins.iter().any(|o| o == "*") {
        // A credentialed response cannot use the wildcard.
        return Some(if cors.allow_credentials == Some(true) {
            origin.to_string()
        } else {
            "*".to_string()
        });
    }
    None
}

/// The answer to a CORS preflight (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`); the function is not invoked. An origin the configuration
/// does not allow gets no CORS headers, so the browser refuses the request.
pub fn preflight_headers(cors: &Cors, origin: &str) -> Vec<(String, String)> {
    let Some(allow_origin) = allowed_origin(cors, origin) else {
        return Vec::new();
    };
    let mut h = vec![
        ("access-control-allow-origin".to_string(), allow_origin),
        ("vary".to_string(), "Origin".to_string()),
    ];
    let list = |v: &Option<Vec<String>>| v.as_ref().filter(|v| !v.is_empty()).map(|v| v.join(","));
    if let Some(m) = list(&cors.allow_methods) {
        h.push(("access-control-allow-methods".into(), m));
    }
    if let Some(m) = list(&cors.allow_headers) {
        h.push(("access-control-allow-headers".into(), m));
    }
    if let Some(n) = cors.max_age {
        h.push(("access-control-max-age".into(), n.to_string()));
    }
    if cors.allow_credentials == Some(true) {
        h.push(("access-control-allow-credentials".into(), "true".into()));
    }
    h
}

/// CORS headers added to (and replacing the function's in) an ordinary response to a request
/// from `origin`.
pub fn response_headers(cors: &Cors, origin: &str) -> Vec<(String, String)> {
    let Some(allow_origin) = allowed_origin(cors, origin) else {
        return Vec::new();
    };
    let mut h = vec![
        ("access-control-allow-origin".to_string(), allow_origin),
        ("vary".to_string(), "Origin".to_string()),
    ];
    if let Some(e) = cors.expose_headers.as_ref().filter(|v| !v.is_empty()) {
        h.push(("access-control-expose-headers".into(), e.join(",")));
    }
    if cors.allow_credentials == Some(true) {
        h.push(("access-control-allow-credentials".into(), "true".into()));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn request<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> UrlRequest<'a> {
        UrlRequest {
            method: "POST",
            raw_path: "/a/b",
            raw_query: "x=1&y=%20two&x=3&flag",
            headers,
            body,
            source_ip: "10.0.0.9",
            protocol: "HTTP/1.1",
            scheme: "http",
            url_id: "abcdefghijklmnopqrstuvwxyz012345",
            domain_name: "abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.localhost",
            account_id: "000000000000",
            request_id: "req-1",
            now: DateTime::from_timestamp_millis(1_583_348_638_390).expect("time"),
            iam: None,
        }
    }

    #[test]
    fn event_fields() {
        let mut h = HeaderMap::new();
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.append("cookie", HeaderValue::from_static("c1=v1; c2=v2"));
        h.append("cookie", HeaderValue::from_static("c3=v3"));
        h.insert("user-agent", HeaderValue::from_static("tester/1"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let e = build_event(&request(&h, br#"{"k":1}"#));
        assert_eq!(e["version"], "2.0");
        assert_eq!(e["routeKey"], "$default");
        assert_eq!(e["rawPath"], "/a/b");
        assert_eq!(e["rawQueryString"], "x=1&y=%20two&x=3&flag");
        assert_eq!(e["cookies"], json!(["c1=v1", "c2=v2", "c3=v3"]));
        assert_eq!(e["headers"]["x-multi"], "a,b");
        assert_eq!(e["headers"]["x-forwarded-for"], "10.0.0.9");
        assert!(e["headers"].get("cookie").is_none());
        assert_eq!(
            e["queryStringParameters"],
            json!({"x": "1,3", "y": " two", "flag": ""})
        );
        let c = &e["requestContext"];
        assert_eq!(c["http"]["method"], "POST");
        assert_eq!(c["http"]["path"], "/a/b");
        assert_eq!(c["http"]["sourceIp"], "10.0.0.9");
        assert_eq!(c["http"]["userAgent"], "tester/1");
        assert_eq!(c["time"], "04/Mar/2020:19:03:58 +0000");
        assert_eq!(c["timeEpoch"], 1_583_348_638_390i64);
        assert_eq!(c["apiId"], "abcdefghijklmnopqrstuvwxyz012345");
        assert_eq!(c["stage"], "$default");
        assert!(c.get("authorizer").is_none());
        assert_eq!(e["body"], r#"{"k":1}"#);
        assert_eq!(e["isBase64Encoded"], false);
    }

    #[test]
    fn binary_and_empty_bodies() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        let e = build_event(&request(&h, &[0, 159, 255]));
        assert_eq!(e["body"], "AJ//");
        assert_eq!(e["isBase64Encoded"], true);
        let none = HeaderMap::new();
        let e = build_event(&request(&none, b""));
        assert!(e.get("body").is_none());
        assert!(e.get("cookies").is_none());
        assert_eq!(e["isBase64Encoded"], false);
        // Text content type but not UTF-8: base64.
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let e = build_event(&request(&h, &[0xff, 0xfe]));
        assert_eq!(e["isBase64Encoded"], true);
    }

    #[test]
    fn text_types() {
        for t in [
            "text/plain",
            "text/html; charset=utf-8",
            "application/json",
            "application/vnd.api+json",
            "application/xml",
            "application/javascript",
        ] {
            assert!(is_text(Some(t)), "{t}");
        }
        for t in [
            "application/octet-stream",
            "image/png",
            "multipart/form-data",
        ] {
            assert!(!is_text(Some(t)), "{t}");
        }
        assert!(!is_text(None));
    }

    #[test]
    fn structured_results() {
        let r = map_result(
            br#"{"statusCode": 201, "headers": {"X-A": "1", "content-type": "text/plain", "n": 5},
                 "cookies": ["a=1; Path=/", "b=2"], "body": "made"}"#,
        )
        .expect("mapped");
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"made");
        assert!(r.headers.contains(&("X-A".into(), "1".into())));
        assert!(r.headers.contains(&("n".into(), "5".into())));
        assert!(
            r.headers
                .contains(&("content-type".into(), "text/plain".into()))
        );
        let cookies: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(cookies, ["a=1; Path=/", "b=2"]);

        let b = map_result(br#"{"statusCode": 200, "body": "AAEC", "isBase64Encoded": true}"#)
            .expect("mapped");
        assert_eq!(b.body, [0, 1, 2]);
        assert!(
            b.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
    }

    #[test]
    fn shortcut_results() {
        let s = map_result(br#""hello""#).expect("mapped");
        assert_eq!((s.status, s.body.as_slice()), (200, &b"hello"[..]));
        let o = map_result(br#"{"a": 1}"#).expect("mapped");
        assert_eq!((o.status, o.body.as_slice()), (200, &br#"{"a": 1}"#[..]));
        assert_eq!(
            o.headers,
            [("content-type".to_string(), "application/json".to_string())]
        );
        let n = map_result(b"42").expect("mapped");
        assert_eq!(n.body, b"42");
    }

    #[test]
    fn bad_results() {
        assert_eq!(map_result(b"not json"), Err(ResultError::NotJson));
        assert_eq!(
            map_result(br#"{"statusCode": 700}"#),
            Err(ResultError::Status)
        );
        assert_eq!(
            map_result(br#"{"statusCode": 200, "headers": {"a": {}}}"#),
            Err(ResultError::Headers)
        );
        assert_eq!(
            map_result(br#"{"statusCode": 200, "cookies": "a=1"}"#),
            Err(ResultError::Cookies)
        );
        assert_eq!(
            map_result(br#"{"statusCode": 200, "body": "%%", "isBase64Encoded": true}"#),
            Err(ResultError::Base64)
        );
    }

    #[test]
    fn cors_rules() {
        let cors = Cors {
            allow_origins: Some(vec!["https://a.example".into()]),
            allow_methods: Some(vec!["GET".into(), "POST".into()]),
            allow_headers: Some(vec!["x-custom".into()]),
            expose_headers: Some(vec!["x-out".into()]),
            max_age: Some(600),
            allow_credentials: Some(true),
        };
        let h = preflight_headers(&cors, "https://a.example");
        let get = |h: &[(String, String)], k: &str| {
            h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        assert_eq!(
            get(&h, "access-control-allow-origin").as_deref(),
            Some("https://a.example")
        );
        assert_eq!(
            get(&h, "access-control-allow-methods").as_deref(),
            Some("GET,POST")
        );
        assert_eq!(get(&h, "access-control-max-age").as_deref(), Some("600"));
        assert_eq!(
            get(&h, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert!(preflight_headers(&cors, "https://evil.example").is_empty());
        let r = response_headers(&cors, "https://a.example");
        assert_eq!(
            get(&r, "access-control-expose-headers").as_deref(),
            Some("x-out")
        );
        let any = Cors {
            allow_origins: Some(vec!["*".into()]),
            ..Default::default()
        };
        assert_eq!(
            get(
                &response_headers(&any, "https://b.example"),
                "access-control-allow-origin"
            )
            .as_deref(),
            Some("*")
        );
    }
}
