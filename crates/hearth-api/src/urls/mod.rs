//! Function URLs: the configuration operations (`CreateFunctionUrlConfig`, `Get…`, `Update…`,
//! `Delete…`, `ListFunctionUrlConfigs`) and, in [`serve`], the HTTP endpoint each URL is.
//!
//! A URL belongs to a function unqualified (`$LATEST`) or to one of its aliases (Lambda allows
//! no version numbers). Its configuration is kept in the function's record
//! ([`FunctionRecord::function_urls`](crate::store::FunctionRecord), keyed by qualifier), so
//! deleting the function or the alias deletes the URL in the same transaction; the store keeps
//! an index from url-id to function name for serving. The url-id (32 lowercase letters and
//! digits, random) is made when the URL is created and kept until it is deleted: as on Lambda,
//! a URL created again after a delete is a different address.
//!
//! What `FunctionUrl` says depends on [`UrlBase`]: by default a path on the API's own listener
//! (`http://127.0.0.1:9000/lambda-url/<url-id>/`), which works from the machine's shell with no
//! DNS set-up (curl resolves `*.localhost` to loopback, but glibc's resolver, and so Python's
//! `urllib`, does not); with a domain (`hearth up --url-domain`), Lambda's host form
//! `https://<url-id>.lambda-url.<region>.<domain>/`. Both forms are always served.
//!
//! `InvokeMode: RESPONSE_STREAM` URLs answer with the function's streamed response as it
//! arrives ([`serve`]); `BUFFERED` ones with its whole result.

pub mod event;
pub mod prelude;
pub mod serve;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::FunctionRecord;
use crate::validate::{self, Qualifier};

/// The key of an unqualified function's URL in [`FunctionRecord::function_urls`].
pub const UNQUALIFIED: &str = "$LATEST";
/// Path prefix of the path form: `/lambda-url/<url-id>/…`.
pub const PATH_PREFIX: &str = "/lambda-url/";
/// Length of a url-id.
pub const URL_ID_LEN: usize = 32;
/// `MaxItems` of `ListFunctionUrlConfigs` (botocore's model: 1 to 50).
const MAX_LIST: usize = 50;

/// How the `FunctionUrl` a client gets back is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlBase {
    /// `<endpoint>/lambda-url/<url-id>/`, `endpoint` like `http://127.0.0.1:9000`.
    Path { endpoint: String },
    /// `<scheme>://<url-id>.lambda-url.<region>.<domain>/` (`domain` may carry a port).
    Host { scheme: String, domain: String },
}

impl Default for UrlBase {
    fn default() -> Self {
        UrlBase::Path {
            endpoint: "http://127.0.0.1:9000".to_string(),
        }
    }
}

/// Why a `--url-domain` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid function URL domain {0:?}: expected [http://|https://]host[:port]")]
pub struct UrlDomainError(pub String);

impl UrlBase {
    /// The host form for `raw`: `example.com`, `https://example.com` or `http://host:8080`
    /// (https unless a scheme says otherwise).
    pub fn domain(raw: &str) -> Result<UrlBase, UrlDomainError> {
        let (scheme, domain) = match raw.split_once("://") {
            Some((s @ ("http" | "https"), d)) => (s, d),
            Some(_) => return Err(UrlDomainError(raw.to_string())),
            None => ("https", raw),
        };
        let domain = domain.strip_suffix('/').unwrap_or(domain);
        let (host, port) = match domain.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        };
        let host_ok = !host.is_empty()
            && host.len() <= 200
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
        if !host_ok || !port_ok {
            return Err(UrlDomainError(raw.to_string()));
        }
        Ok(UrlBase::Host {
            scheme: scheme.to_string(),
            domain: domain.to_ascii_lowercase(),
        })
    }

    /// The URL of `url_id`.
    pub fn url(&self, url_id: &str, region: &str) -> String {
        match self {
            UrlBase::Path { endpoint } => {
                format!("{}{PATH_PREFIX}{url_id}/", endpoint.trim_end_matches('/'))
            }
            UrlBase::Host { scheme, domain } => {
                format!("{scheme}://{url_id}.lambda-url.{region}.{domain}/")
            }
        }
    }
}

/// `Cors`, as on the wire and as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Cors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_origins: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose_headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<i64>,
}

/// Who may call a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthType {
    /// Anyone.
    #[serde(rename = "NONE")]
    None,
    /// Requests signed (SigV4, service `lambda`) with hearth's credentials.
    #[serde(rename = "AWS_IAM")]
    AwsIam,
}

impl AuthType {
    fn parse(raw: &str) -> Result<AuthType, ApiError> {
        match raw {
            "NONE" => Ok(AuthType::None),
            "AWS_IAM" => Ok(AuthType::AwsIam),
            other => Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'authType' failed to satisfy \
                 constraint: Member must satisfy enum value set: [NONE, AWS_IAM]"
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            AuthType::None => "NONE",
            AuthType::AwsIam => "AWS_IAM",
        }
    }
}

/// How a URL answers: with the whole result, or streamed as the function produces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvokeMode {
    #[default]
    #[serde(rename = "BUFFERED")]
    Buffered,
    #[serde(rename = "RESPONSE_STREAM")]
    ResponseStream,
}

impl InvokeMode {
    fn as_str(self) -> &'static str {
        match self {
            InvokeMode::Buffered => "BUFFERED",
            InvokeMode::ResponseStream => "RESPONSE_STREAM",
        }
    }
}

/// One function URL's configuration, kept in the function's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlRecord {
    pub url_id: String,
    pub auth_type: AuthType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// `CreationTime` (`2024-01-01T00:00:00.000000Z`).
    pub creation_time: String,
    pub last_modified_time: String,
    /// Records from before streaming URLs existed are buffered.
    #[serde(default)]
    pub invoke_mode: InvokeMode,
}

/// `CreateFunctionUrlConfig`'s and `UpdateFunctionUrlConfig`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FunctionUrlConfigIn {
    pub auth_type: Option<String>,
    pub cors: Option<Cors>,
    pub invoke_mode: Option<String>,
}

/// A URL's configuration on the wire (every operation answers this shape; `Create` leaves out
/// `LastModifiedTime`, which clients ignore where the model does not name it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionUrlConfig {
    pub function_url: String,
    pub function_arn: String,
    pub auth_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    pub creation_time: String,
    pub last_modified_time: String,
    pub invoke_mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListFunctionUrlConfigsResponse {
    pub function_url_configs: Vec<FunctionUrlConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
}

/// `CreationTime` / `LastModifiedTime` format.
fn url_timestamp() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// A new url-id: 32 lowercase letters and digits.
pub fn new_url_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..URL_ID_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Whether `s` has the form of a url-id.
pub fn is_url_id(s: &str) -> bool {
    s.len() == URL_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The function and the key of its URL that a request names (`$LATEST` when unqualified).
fn target(
    state: &AppState,
    function: &str,
    query: Option<String>,
) -> Result<(String, String), ApiError> {
    let fref = state.parse_ref(function)?;
    let q = validate::merge_qualifier(fref.qualifier, query)?;
    let key = match q.as_deref().map(Qualifier::parse).transpose()? {
        None | Some(Qualifier::Latest) => UNQUALIFIED.to_string(),
        Some(Qualifier::Alias(a)) => a,
        Some(Qualifier::Version(n)) => {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{n}' at 'qualifier' failed to satisfy \
                 constraint: a function URL belongs to the unqualified function or to an \
                 alias, not to a version"
            )));
        }
    };
    Ok((fref.name, key))
}

/// An alias the URL is for must exist.
fn check_alias(state: &AppState, rec: &FunctionRecord, key: &str) -> Result<(), ApiError> {
    if key == UNQUALIFIED || rec.aliases.contains_key(key) {
        Ok(())
    } else {
        Err(state.function_not_found(&rec.name, Some(key)))
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("The resource you requested does not exist.")
}

fn arn(state: &AppState, name: &str, key: &str) -> String {
    let c = state.config();
    if key == UNQUALIFIED {
        c.function_arn(name)
    } else {
        c.qualified_arn(name, key)
    }
}

/// The wire shape of a stored URL.
pub fn wire(state: &AppState, name: &str, key: &str, r: &UrlRecord) -> FunctionUrlConfig {
    let c = state.config();
    FunctionUrlConfig {
        function_url: c.function_urls.url(&r.url_id, &c.region),
        function_arn: arn(state, name, key),
        auth_type: r.auth_type.as_str().to_string(),
        cors: r.cors.clone(),
        creation_time: r.creation_time.clone(),
        last_modified_time: r.last_modified_time.clone(),
        invoke_mode: r.invoke_mode.as_str().to_string(),
    }
}

fn invoke_mode(raw: Option<&str>) -> Result<Option<InvokeMode>, ApiError> {
    match raw {
        None => Ok(None),
        Some("BUFFERED") => Ok(Some(InvokeMode::Buffered)),
        Some("RESPONSE_STREAM") => Ok(Some(InvokeMode::ResponseStream)),
        Some(other) => Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{other}' at 'invokeMode' failed to satisfy \
             constraint: Member must satisfy enum value set: [BUFFERED, RESPONSE_STREAM]"
        ))),
    }
}

/// Methods a `Cors.AllowMethods` entry may name.
const CORS_METHODS: [&str; 7] = ["*", "GET", "PUT", "HEAD", "POST", "PATCH", "DELETE"];

/// Lambda's limits on `Cors` (botocore's model and the service's method names).
pub fn validate_cors(cors: &Cors) -> Result<(), ApiError> {
    let list = |field: &str, v: &Option<Vec<String>>, max_n: usize, min_len: usize, max_len| {
        let Some(v) = v else { return Ok(()) };
        if v.len() > max_n {
            return Err(ApiError::invalid(format!(
                "1 validation error detected: Value at 'cors.{field}' failed to satisfy \
                 constraint: Member must have length less than or equal to {max_n}"
            )));
        }
        match v.iter().find(|s| s.len() < min_len || s.len() > max_len) {
            Some(bad) => Err(ApiError::invalid(format!(
                "1 validation error detected: Value '{bad}' at 'cors.{field}' failed to \
                 satisfy constraint: Member must have length between {min_len} and {max_len}"
            ))),
            None => Ok(()),
        }
    };
    list("allowHeaders", &cors.allow_headers, 100, 0, 1024)?;
    list("exposeHeaders", &cors.expose_headers, 100, 0, 1024)?;
    list("allowOrigins", &cors.allow_origins, 100, 1, 253)?;
    list("allowMethods", &cors.allow_methods, 6, 0, 6)?;
    if let Some(bad) = cors
        .allow_methods
        .iter()
        .flatten()
        .find(|m| !CORS_METHODS.contains(&m.to_ascii_uppercase().as_str()))
    {
        return Err(ApiError::invalid(format!(
            "Invalid CORS AllowMethods value {bad:?}: expected one of {}",
            CORS_METHODS.join(", ")
        )));
    }
    if let Some(n) = cors.max_age
        && !(0..=86_400).contains(&n)
    {
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{n}' at 'cors.maxAge' failed to satisfy \
             constraint: Member must have value between 0 and 86400"
        )));
    }
    Ok(())
}

/// `CreateFunctionUrlConfig`.
pub async fn create(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    req: FunctionUrlConfigIn,
) -> Result<FunctionUrlConfig, ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let auth_type = match req.auth_type.as_deref() {
        Some(a) => AuthType::parse(a)?,
        None => {
            return Err(ApiError::invalid(
                "1 validation error detected: Value null at 'authType' failed to satisfy \
                 constraint: Member must not be null",
            ));
        }
    };
    let mode = invoke_mode(req.invoke_mode.as_deref())?.unwrap_or_default();
    if let Some(c) = &req.cors {
        validate_cors(c)?;
    }
    let (k, st) = (key.clone(), state.clone());
    let saved = state
        .blocking(move |s| {
            s.store().update(&name, |rec, _| {
                check_alias(&st, rec, &k)?;
                if rec.function_urls.contains_key(&k) {
                    return Err(ApiError::conflict(format!(
                        "Failed to create function url config for [functionArn = {}]. Error \
                         message:  FunctionUrlConfig exists for this Lambda function",
                        arn(&st, &rec.name, &k)
                    )));
                }
                let now = url_timestamp();
                let r = UrlRecord {
                    url_id: new_url_id(),
                    auth_type,
                    cors: req.cors,
                    creation_time: now.clone(),
                    last_modified_time: now,
                    invoke_mode: mode,
                };
                rec.function_urls.insert(k.clone(), r.clone());
                Ok((rec.name.clone(), r))
            })
        })
        .await?;
    let Some((name, r)) = saved else {
        return Err(state.function_not_found(&state.parse_ref(function)?.name, None));
    };
    tracing::info!(function = %name, qualifier = %key, url_id = %r.url_id, "function url created");
    Ok(wire(state, &name, &key, &r))
}

/// `UpdateFunctionUrlConfig`: the fields given replace the stored ones.
pub async fn update(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
    req: FunctionUrlConfigIn,
) -> Result<FunctionUrlConfig, ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let auth_type = req.auth_type.as_deref().map(AuthType::parse).transpose()?;
    let mode = invoke_mode(req.invoke_mode.as_deref())?;
    if let Some(c) = &req.cors {
        validate_cors(c)?;
    }
    let (k, st) = (key.clone(), state.clone());
    let saved = state
        .blocking(move |s| {
            s.store().update(&name, |rec, _| {
                check_alias(&st, rec, &k)?;
                let r = rec.function_urls.get_mut(&k).ok_or_else(not_found)?;
                if let Some(a) = auth_type {
                    r.auth_type = a;
                }
                if let Some(c) = req.cors {
                    r.cors = Some(c);
                }
                if let Some(m) = mode {
                    r.invoke_mode = m;
                }
                r.last_modified_time = url_timestamp();
                Ok((rec.name.clone(), r.clone()))
            })
        })
        .await?;
    let Some((name, r)) = saved else {
        return Err(state.function_not_found(&state.parse_ref(function)?.name, None));
    };
    Ok(wire(state, &name, &key, &r))
}

/// `GetFunctionUrlConfig`.
pub async fn get(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<FunctionUrlConfig, ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let rec = state.load(&name).await?;
    check_alias(state, &rec, &key)?;
    let r = rec.function_urls.get(&key).ok_or_else(not_found)?;
    Ok(wire(state, &rec.name, &key, r))
}

/// `DeleteFunctionUrlConfig`.
pub async fn delete(
    state: &AppState,
    function: &str,
    qualifier: Option<String>,
) -> Result<(), ApiError> {
    let (name, key) = target(state, function, qualifier)?;
    let (k, st) = (key.clone(), state.clone());
    let done = state
        .blocking(move |s| {
            s.store().update(&name, |rec, _| {
                check_alias(&st, rec, &k)?;
                rec.function_urls.remove(&k).ok_or_else(not_found)?;
                Ok(())
            })
        })
        .await?;
    match done {
        Some(()) => Ok(()),
        None => Err(state.function_not_found(&state.parse_ref(function)?.name, None)),
    }
}

/// `ListFunctionUrlConfigs`: the function's URLs in qualifier order.
pub async fn list(
    state: &AppState,
    function: &str,
    marker: Option<String>,
    max_items: Option<String>,
) -> Result<ListFunctionUrlConfigsResponse, ApiError> {
    let fref = state.parse_ref(function)?;
    if fref.qualifier.is_some() {
        return Err(ApiError::invalid(format!(
            "Unsupported qualifier in function name {function:?} for this operation"
        )));
    }
    let max = match max_items.as_deref() {
        None => MAX_LIST,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "1 validation error detected: Value '{raw}' at 'maxItems' failed to \
                     satisfy constraint: Member must have value between 1 and {MAX_LIST}"
                )));
            }
        },
    };
    let after = marker
        .as_deref()
        .map(crate::functions::decode_marker)
        .transpose()?;
    let rec = state.load(&fref.name).await?;
    let items: Vec<(String, FunctionUrlConfig)> = rec
        .function_urls
        .iter()
        .map(|(k, r)| (k.clone(), wire(state, &rec.name, k, r)))
        .collect();
    let (page, next) = crate::functions::paginate(items, after.as_ref(), max);
    Ok(ListFunctionUrlConfigsResponse {
        function_url_configs: page,
        next_marker: next.as_deref().map(crate::functions::encode_marker),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_ids_have_lambdas_form() {
        let a = new_url_id();
        assert!(is_url_id(&a), "{a}");
        assert_ne!(a, new_url_id());
        assert!(!is_url_id("ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"));
        assert!(!is_url_id("abc"));
    }

    #[test]
    fn url_bases() {
        let id = "a".repeat(32);
        assert_eq!(
            UrlBase::Path {
                endpoint: "http://127.0.0.1:9000".into()
            }
            .url(&id, "us-east-1"),
            format!("http://127.0.0.1:9000/lambda-url/{id}/")
        );
        assert_eq!(
            UrlBase::domain("example.com")
                .expect("domain")
                .url(&id, "eu-west-1"),
            format!("https://{id}.lambda-url.eu-west-1.example.com/")
        );
        assert_eq!(
            UrlBase::domain("http://Lambda.local:8080/")
                .expect("domain")
                .url(&id, "us-east-1"),
            format!("http://{id}.lambda-url.us-east-1.lambda.local:8080/")
        );
        for bad in ["", "ftp://x", "a..b", "x:0", "x:99999", "a b"] {
            assert!(UrlBase::domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cors_limits() {
        let ok = Cors {
            allow_methods: Some(vec!["GET".into(), "post".into()]),
            allow_origins: Some(vec!["*".into()]),
            max_age: Some(300),
            ..Default::default()
        };
        assert!(validate_cors(&ok).is_ok());
        let bad = [
            Cors {
                allow_methods: Some(vec!["FETCH".into()]),
                ..Default::default()
            },
            Cors {
                max_age: Some(86_401),
                ..Default::default()
            },
            Cors {
                allow_origins: Some(vec![String::new()]),
                ..Default::default()
            },
            Cors {
                allow_methods: Some(vec!["GET".into(); 7]),
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(validate_cors(&c).is_err(), "{c:?}");
        }
    }
}
