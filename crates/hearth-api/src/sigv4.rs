//! AWS Signature Version 4: verifying requests (the server) and signing them (hearth's CLI).
//!
//! Every hearth API request must carry a SigV4 `Authorization` header, exactly as boto3 and the
//! AWS CLI send it to Lambda, so existing tools work unchanged and a server that knows the
//! secret can check the request as AWS does. The algorithm, from the AWS SigV4 spec:
//!
//! 1. canonical request = method, canonical URI, canonical query, canonical headers, signed
//!    header names, hex SHA-256 of the payload (or the `X-Amz-Content-Sha256` value);
//! 2. string to sign = `AWS4-HMAC-SHA256`, the request time, the credential scope
//!    (`date/region/service/aws4_request`) and the hex SHA-256 of the canonical request;
//! 3. signing key = HMAC chain `"AWS4"+secret` → date → region → service → `aws4_request`;
//!    signature = hex HMAC(signing key, string to sign).
//!
//! The canonical URI is the request path *as received* (already percent-encoded once by the
//! client), with dot segments and empty segments removed, percent-encoded again: non-S3 services
//! double-encode, so a Lambda ARN in the path (`arn%3Aaws%3A…`) is signed as `arn%253Aaws%253A…`.
//! The canonical query decodes every name and value and re-encodes them (RFC 3986 unreserved
//! characters kept), sorted by name then value.
//!
//! What is checked, and in this order: an `Authorization` header is present
//! ([`SigError::Missing`]), well formed ([`SigError::Incomplete`]), names a known access key
//! ([`SigError::UnknownAccessKey`]), the request time (`X-Amz-Date`) is within 15 minutes of
//! now and matches the credential scope ([`SigError::Invalid`]), `host` is signed, a
//! `X-Amz-Content-Sha256` header (if any) matches the body, and the signature matches
//! ([`SigError::Mismatch`], compared in constant time). The scope's region and service are
//! not required to equal hearth's (they are covered by the signature anyway), so a client
//! configured for another region still works against a single-region hearth. Presigned URLs
//! (query-string auth) and `UNSIGNED-PAYLOAD` are not accepted.

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};
use sha2::{Digest, Sha256};

/// The only algorithm SigV4 defines for HMAC signing.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far the request time may be from the server's clock.
pub const MAX_CLOCK_SKEW: TimeDelta = TimeDelta::minutes(15);
/// `X-Amz-Date` format.
const AMZ_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Like [`UNRESERVED`], keeping `/` (for paths).
const UNRESERVED_PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// Headers botocore never signs (proxies rewrite them).
const UNSIGNABLE: [&str; 4] = ["authorization", "user-agent", "expect", "x-amzn-trace-id"];

/// Why a request's signature was not accepted (or a request could not be signed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// No `Authorization` header.
    #[error("missing authentication token")]
    Missing,
    /// The `Authorization` header (or the date header) is malformed.
    #[error("{0}")]
    Incomplete(String),
    /// The access key id is not one of the configured credentials.
    #[error("the security token included in the request is invalid")]
    UnknownAccessKey,
    /// The request is signed, but not acceptably: expired, wrong scope date, unsigned host,
    /// payload hash header not matching the body.
    #[error("{0}")]
    Invalid(String),
    /// The signature is not the one the secret gives.
    #[error("signature does not match")]
    Mismatch,
    /// `sign` was given something it cannot sign (a bad URL or header).
    #[error("cannot sign request: {0}")]
    Unsignable(String),
}

/// A request that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key_id: String,
    pub region: String,
    pub service: String,
}

/// What [`sign`] needs besides the request itself.
#[derive(Debug, Clone)]
pub struct SigningParams<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    /// e.g. `us-east-1`.
    pub region: &'a str,
    /// `lambda` for hearth's API.
    pub service: &'a str,
    /// The signing time (normally now).
    pub time: DateTime<Utc>,
    /// Also send (and sign) `X-Amz-Content-Sha256`.
    pub content_sha256_header: bool,
}

/// Percent-encode one path segment the way AWS SDKs do (RFC 3986 unreserved characters kept),
/// e.g. a function ARN before it goes into a URL.
pub fn encode_path_segment(segment: &str) -> String {
    percent_encode(segment.as_bytes(), UNRESERVED).to_string()
}

/// Percent-encode a query-string name or value the way AWS SDKs do.
pub fn encode_query_component(value: &str) -> String {
    percent_encode(value.as_bytes(), UNRESERVED).to_string()
}

/// Sign a request. Returns the headers to add to it: `Authorization`, `X-Amz-Date` and, if
/// asked for, `X-Amz-Content-Sha256`.
///
/// `url` must already be percent-encoded (use [`encode_path_segment`] for path segments): it is
/// signed as it will be sent. `headers` are the headers the request will carry; all of them
/// are signed except `Authorization`, `User-Agent`, `Expect` and `X-Amzn-Trace-Id`. `Host` is
/// taken from `headers` if present, else from the URL (default ports omitted, as HTTP clients
/// send it); it is signed but not returned, since HTTP clients add it themselves.
pub fn sign(
    method: &Method,
    url: &str,
    headers: &HeaderMap,
    body: &[u8],
    params: &SigningParams<'_>,
) -> Result<Vec<(HeaderName, HeaderValue)>, SigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| SigError::Unsignable(format!("bad url {url:?}: {e}")))?;
    let amz_date = params.time.format(AMZ_DATE_FORMAT).to_string();
    let date = params.time.format("%Y%m%d").to_string();
    let payload_hash = hex::encode(Sha256::digest(body));

    let mut canonical: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if UNSIGNABLE.contains(&name) || name == "x-amz-date" || name == "x-amz-content-sha256" {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| SigError::Unsignable(format!("header {name} is not visible ASCII")))?;
        canonical.push((name.to_string(), trim_all(value)));
    }
    if !headers.contains_key(http::header::HOST) {
        let authority = uri
            .authority()
            .ok_or_else(|| SigError::Unsignable(format!("url {url:?} has no host")))?;
        let default_port = match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        };
        let host = match authority.port_u16() {
            Some(port) if Some(port) != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_string(),
        };
        canonical.push(("host".to_string(), host));
    }
    canonical.push(("x-amz-date".to_string(), amz_date.clone()));
    if params.content_sha256_header {
        canonical.push(("x-amz-content-sha256".to_string(), payload_hash.clone()));
    }
    // Merge repeated names (values joined by ','), sort by name.
    canonical.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(String, String)> = Vec::new();
    for (name, value) in canonical {
        match merged.last_mut() {
            Some((last, joined)) if *last == name => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => merged.push((name, value)),
        }
    }
    let signed_headers = merged
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");

    let canonical_request = canonical_request(
        method.as_str(),
        uri.path(),
        uri.query().unwrap_or(""),
        &merged,
        &signed_headers,
        &payload_hash,
    );
    let scope = format!("{date}/{}/{}/aws4_request", params.region, params.service);
    let signature = signature(
        params.secret_access_key,
        &date,
        params.region,
        params.service,
        &string_to_sign(&amz_date, &scope, &canonical_request),
    );
    let authorization = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        params.access_key_id
    );
    let header = |v: String| {
        HeaderValue::from_str(&v).map_err(|_| SigError::Unsignable(format!("bad header {v:?}")))
    };
    let mut out = vec![
        (http::header::AUTHORIZATION, header(authorization)?),
        (HeaderName::from_static("x-amz-date"), header(amz_date)?),
    ];
    if params.content_sha256_header {
        out.push((
            HeaderName::from_static("x-amz-content-sha256"),
            header(payload_hash)?,
        ));
    }
    Ok(out)
}

/// Verify a request's SigV4 signature against `credentials` (access key id, secret) at time
/// `now`. `body` is the complete request body.
pub fn verify(
    parts: &http::request::Parts,
    body: &[u8],
    credentials: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<Verified, SigError> {
    let Some(auth) = parts.headers.get(http::header::AUTHORIZATION) else {
        return Err(SigError::Missing);
    };
    let auth = auth
        .to_str()
        .map_err(|_| SigError::Incomplete("Authorization header is not valid ASCII".into()))?;
    let auth = parse_authorization(auth)?;

    let secret = credentials
        .iter()
        .find(|(key, _)| key == auth.access_key_id)
        .map(|(_, secret)| secret.as_str())
        .ok_or(SigError::UnknownAccessKey)?;

    let amz_date = header_str(&parts.headers, "x-amz-date").ok_or_else(|| {
        SigError::Incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' \
             header."
                .into(),
        )
    })?;
    let time = NaiveDateTime::parse_from_str(amz_date, AMZ_DATE_FORMAT)
        .map_err(|_| SigError::Incomplete(format!("X-Amz-Date {amz_date:?} is not a valid date")))?
        .and_utc();
    if amz_date.get(..8) != Some(auth.date) {
        return Err(SigError::Invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date \
             from HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            amz_date.get(..8).unwrap_or_default()
        )));
    }
    let fmt = |t: DateTime<Utc>| t.format(AMZ_DATE_FORMAT).to_string();
    if time < now - MAX_CLOCK_SKEW {
        return Err(SigError::Invalid(format!(
            "Signature expired: {} is now earlier than {} ({} - 15 min.)",
            fmt(time),
            fmt(now - MAX_CLOCK_SKEW),
            fmt(now)
        )));
    }
    if time > now + MAX_CLOCK_SKEW {
        return Err(SigError::Invalid(format!(
            "Signature not yet current: {} is still later than {} ({} + 15 min.)",
            fmt(time),
            fmt(now + MAX_CLOCK_SKEW),
            fmt(now)
        )));
    }

    let signed: Vec<&str> = auth.signed_headers.split(';').collect();
    if !signed.contains(&"host") {
        return Err(SigError::Invalid(
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    let mut canonical = Vec::with_capacity(signed.len());
    for name in &signed {
        let mut values: Vec<String> = parts
            .headers
            .get_all(*name)
            .iter()
            .map(|v| trim_all(&String::from_utf8_lossy(v.as_bytes())))
            .collect();
        if values.is_empty()
            && *name == "host"
            && let Some(authority) = parts.uri.authority()
        {
            values.push(authority.as_str().to_string());
        }
        canonical.push((name.to_string(), values.join(",")));
    }

    let body_hash = hex::encode(Sha256::digest(body));
    let payload_hash = match header_str(&parts.headers, "x-amz-content-sha256") {
        None => body_hash,
        Some(claimed) if claimed.eq_ignore_ascii_case(&body_hash) => claimed.to_string(),
        Some("UNSIGNED-PAYLOAD") => {
            return Err(SigError::Invalid("UNSIGNED-PAYLOAD is not accepted".into()));
        }
        Some(_) => {
            return Err(SigError::Invalid(
                "The provided 'x-amz-content-sha256' header does not match what was computed."
                    .into(),
            ));
        }
    };

    let canonical_request = canonical_request(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &canonical,
        auth.signed_headers,
        &payload_hash,
    );
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let expected = signature(
        secret,
        auth.date,
        auth.region,
        auth.service,
        &string_to_sign(amz_date, &scope, &canonical_request),
    );
    if !constant_time_eq(
        expected.as_bytes(),
        auth.signature.to_ascii_lowercase().as_bytes(),
    ) {
        return Err(SigError::Mismatch);
    }
    Ok(Verified {
        access_key_id: auth.access_key_id.to_string(),
        region: auth.region.to_string(),
        service: auth.service.to_string(),
    })
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug)]
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, SigError> {
    let rest = value.trim().strip_prefix(ALGORITHM).ok_or_else(|| {
        SigError::Incomplete(format!(
            "Authorization header must use the {ALGORITHM} algorithm"
        ))
    })?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for item in rest.split(',') {
        let Some((key, val)) = item.trim().split_once('=') else {
            continue;
        };
        match key.trim() {
            "Credential" => credential = Some(val.trim()),
            "SignedHeaders" => signed_headers = Some(val.trim()),
            "Signature" => signature = Some(val.trim()),
            _ => {}
        }
    }
    let missing = |what: &str| {
        SigError::Incomplete(format!(
            "Authorization header requires '{what}' parameter. Authorization={value}"
        ))
    };
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let signed_headers = signed_headers.ok_or_else(|| missing("SignedHeaders"))?;
    let signature = signature.ok_or_else(|| missing("Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(SigError::Incomplete(format!(
            "Credential should be scoped to a valid region, not a malformed scope: {credential}"
        )));
    };
    if terminator != "aws4_request" || date.len() != 8 || access_key_id.is_empty() {
        return Err(SigError::Incomplete(format!(
            "Credential should be scoped with a valid terminator: 'aws4_request', not \
             '{credential}'."
        )));
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Trim and collapse runs of whitespace to one space (SigV4's "Trimall").
fn trim_all(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn canonical_request(
    method: &str,
    raw_path: &str,
    raw_query: &str,
    headers: &[(String, String)],
    signed_headers: &str,
    payload_hash: &str,
) -> String {
    let mut out = String::new();
    out.push_str(method);
    out.push('\n');
    out.push_str(&canonical_uri(raw_path));
    out.push('\n');
    out.push_str(&canonical_query(raw_query));
    out.push('\n');
    for (name, value) in headers {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(signed_headers);
    out.push('\n');
    out.push_str(payload_hash);
    out
}

/// The path as received, normalized (dot and empty segments removed) and encoded again.
fn canonical_uri(raw_path: &str) -> String {
    let normalized = remove_dot_segments(raw_path);
    let normalized = if normalized.is_empty() {
        "/".to_string()
    } else {
        normalized
    };
    percent_encode(normalized.as_bytes(), UNRESERVED_PATH).to_string()
}

/// RFC 3986 §5.2.4, also dropping empty segments (what botocore signs).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let first = if path.starts_with('/') { "/" } else { "" };
    let last = if path.ends_with('/') && !out.is_empty() {
        "/"
    } else {
        ""
    };
    format!("{first}{}{last}", out.join("/"))
}

/// Names and values decoded, re-encoded with unreserved characters kept, sorted.
fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let reencode = |s: &str| {
                let bytes: Vec<u8> = percent_decode_str(s).collect();
                percent_encode(&bytes, UNRESERVED).to_string()
            };
            (reencode(k), reencode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Hex signature of `string_to_sign` with the key derived from `secret` and the scope.
fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex::encode(hmac(&k_signing, string_to_sign.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn vector_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2015, 8, 30, 12, 36, 0)
            .single()
            .expect("valid time")
    }

    fn params(service: &'static str) -> SigningParams<'static> {
        SigningParams {
            access_key_id: AKID,
            secret_access_key: SECRET,
            region: "us-east-1",
            service,
            time: vector_time(),
            content_sha256_header: false,
        }
    }

    fn creds() -> Vec<(String, String)> {
        vec![(AKID.to_string(), SECRET.to_string())]
    }

    /// Build the request `sign` describes, as a server would receive it.
    fn signed_request(
        method: Method,
        url: &str,
        extra: &[(&str, &str)],
        body: &[u8],
        p: &SigningParams<'_>,
    ) -> http::request::Parts {
        let mut headers = HeaderMap::new();
        for (k, v) in extra {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let added = sign(&method, url, &headers, body, p).expect("sign");
        let uri: http::Uri = url.parse().expect("uri");
        let mut builder = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        if !headers.contains_key("host") {
            let a = uri.authority().expect("authority");
            builder = builder.header("host", a.as_str());
        }
        for (k, v) in headers.iter().chain(added.iter().map(|(k, v)| (k, v))) {
            builder = builder.header(k, v);
        }
        builder.body(()).expect("request").into_parts().0
    }

    /// AWS's published SigV4 test suite, "get-vanilla".
    #[test]
    fn aws_test_vector_get_vanilla() {
        let added = sign(
            &Method::GET,
            "https://example.amazonaws.com/",
            &HeaderMap::new(),
            b"",
            &params("service"),
        )
        .expect("sign");
        let auth = added
            .iter()
            .find(|(k, _)| k == http::header::AUTHORIZATION)
            .map(|(_, v)| v.to_str().expect("ascii").to_string())
            .expect("authorization header");
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        let date = added.iter().find(|(k, _)| k == "x-amz-date").expect("date");
        assert_eq!(date.1, "20150830T123600Z");
    }

    #[test]
    fn vector_verifies_as_received() {
        let parts = signed_request(
            Method::GET,
            "https://example.amazonaws.com/",
            &[],
            b"",
            &params("service"),
        );
        let v = verify(&parts, b"", &creds(), vector_time()).expect("verify");
        assert_eq!(v.access_key_id, AKID);
        assert_eq!(v.service, "service");
    }

    #[test]
    fn round_trip_with_arn_path_query_and_body() {
        let url = format!(
            "http://127.0.0.1:9000/2015-03-31/functions/{}/invocations?Qualifier={}",
            encode_path_segment("arn:aws:lambda:us-east-1:000000000000:function:f"),
            encode_query_component("$LATEST")
        );
        let body = br#"{"hello": "world"}"#;
        let p = SigningParams {
            content_sha256_header: true,
            ..params("lambda")
        };
        let parts = signed_request(
            Method::POST,
            &url,
            &[
                ("x-amz-log-type", "Tail"),
                ("content-type", "application/json"),
            ],
            body,
            &p,
        );
        assert!(parts.uri.path().contains("arn%3Aaws"));
        verify(&parts, body, &creds(), vector_time()).expect("verify");
    }

    #[test]
    fn tampering_fails() {
        let url = "http://localhost:9000/2015-03-31/functions/f/invocations";
        let body = b"{\"a\":1}";
        let p = params("lambda");
        let parts = signed_request(Method::POST, url, &[("x-amz-log-type", "Tail")], body, &p);

        // body
        assert_eq!(
            verify(&parts, b"{\"a\":2}", &creds(), vector_time()),
            Err(SigError::Mismatch)
        );
        // signed header
        let mut h = parts.clone();
        h.headers
            .insert("x-amz-log-type", HeaderValue::from_static("None"));
        assert_eq!(
            verify(&h, body, &creds(), vector_time()),
            Err(SigError::Mismatch)
        );
        // path
        let mut u = parts.clone();
        u.uri = "/2015-03-31/functions/g/invocations".parse().expect("uri");
        assert_eq!(
            verify(&u, body, &creds(), vector_time()),
            Err(SigError::Mismatch)
        );
        // method
        let mut m = parts.clone();
        m.method = Method::PUT;
        assert_eq!(
            verify(&m, body, &creds(), vector_time()),
            Err(SigError::Mismatch)
        );
        // query added
        let mut q = parts.clone();
        q.uri = "/2015-03-31/functions/f/invocations?Qualifier=1"
            .parse()
            .expect("uri");
        assert_eq!(
            verify(&q, body, &creds(), vector_time()),
            Err(SigError::Mismatch)
        );
        // wrong secret
        let wrong = vec![(AKID.to_string(), "other".to_string())];
        assert_eq!(
            verify(&parts, body, &wrong, vector_time()),
            Err(SigError::Mismatch)
        );
        // untouched passes
        verify(&parts, body, &creds(), vector_time()).expect("verify");
    }

    #[test]
    fn unknown_key_missing_and_malformed() {
        let p = params("lambda");
        let parts = signed_request(Method::GET, "http://h/x", &[], b"", &p);
        let other = vec![("AKIDOTHER".to_string(), SECRET.to_string())];
        assert_eq!(
            verify(&parts, b"", &other, vector_time()),
            Err(SigError::UnknownAccessKey)
        );

        let mut none = parts.clone();
        none.headers.remove(http::header::AUTHORIZATION);
        assert_eq!(
            verify(&none, b"", &creds(), vector_time()),
            Err(SigError::Missing)
        );

        let mut bad = parts.clone();
        bad.headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("AWS4-HMAC-SHA256 Credential=x"),
        );
        assert!(matches!(
            verify(&bad, b"", &creds(), vector_time()),
            Err(SigError::Incomplete(_))
        ));

        let mut basic = parts.clone();
        basic.headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        assert!(matches!(
            verify(&basic, b"", &creds(), vector_time()),
            Err(SigError::Incomplete(_))
        ));

        let mut nodate = parts;
        nodate.headers.remove("x-amz-date");
        assert!(matches!(
            verify(&nodate, b"", &creds(), vector_time()),
            Err(SigError::Incomplete(_))
        ));
    }

    #[test]
    fn clock_skew_limits() {
        let p = params("lambda");
        let parts = signed_request(Method::GET, "http://h/x", &[], b"", &p);
        let t = vector_time();
        verify(&parts, b"", &creds(), t + TimeDelta::minutes(14)).expect("within skew");
        verify(&parts, b"", &creds(), t - TimeDelta::minutes(14)).expect("within skew");
        match verify(&parts, b"", &creds(), t + TimeDelta::minutes(16)) {
            Err(SigError::Invalid(msg)) => assert!(msg.starts_with("Signature expired"), "{msg}"),
            other => panic!("expected expiry, got {other:?}"),
        }
        match verify(&parts, b"", &creds(), t - TimeDelta::minutes(16)) {
            Err(SigError::Invalid(msg)) => assert!(msg.contains("not yet current"), "{msg}"),
            other => panic!("expected not-yet-current, got {other:?}"),
        }
    }

    #[test]
    fn content_sha256_header_must_match_body() {
        let p = SigningParams {
            content_sha256_header: true,
            ..params("lambda")
        };
        let parts = signed_request(Method::PUT, "http://h/x", &[], b"body", &p);
        verify(&parts, b"body", &creds(), vector_time()).expect("verify");
        assert!(matches!(
            verify(&parts, b"other", &creds(), vector_time()),
            Err(SigError::Invalid(_))
        ));
    }

    #[test]
    fn host_must_be_signed() {
        // Signed without host: craft by removing host from the signed list.
        let p = params("lambda");
        let mut parts = signed_request(Method::GET, "http://h/x", &[], b"", &p);
        let auth = parts.headers[http::header::AUTHORIZATION]
            .to_str()
            .expect("ascii");
        let auth = auth.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date");
        parts.headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&auth).expect("value"),
        );
        assert!(matches!(
            verify(&parts, b"", &creds(), vector_time()),
            Err(SigError::Invalid(_))
        ));
    }

    #[test]
    fn canonical_pieces() {
        assert_eq!(
            canonical_uri("/2015-03-31/functions/a%3Ab"),
            "/2015-03-31/functions/a%253Ab"
        );
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a/./b/../c//d/"), "/a/c/d/");
        assert_eq!(
            canonical_query("b=2&a=%24LATEST&a=1"),
            "a=%24LATEST&a=1&b=2"
        );
        assert_eq!(
            canonical_query("Marker=abc%2B%2F%3D%20d"),
            "Marker=abc%2B%2F%3D%20d"
        );
        assert_eq!(canonical_query("x=a b"), "x=a%20b");
        assert_eq!(trim_all("  a   b \t c "), "a b c");
        assert_eq!(encode_path_segment("name:$LATEST"), "name%3A%24LATEST");
    }
}
