//! Test harness: the router over a temporary data directory, a recording fake invoker,
//! requests signed with hearth's own `sigv4::sign`, zips built with the `zip` crate.
#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use base64::Engine;
use hearth_api::code::CodeLimits;
use hearth_api::invoker::{InvokeError, InvokeRequest, InvokeResult, Invoker};
use hearth_api::sigv4::{SigningParams, encode_path_segment, sign};
use hearth_api::{ApiConfig, AppState, app};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

pub const AKID: &str = "AKIDHEARTHTEST";
pub const SECRET: &str = "hearth-test-secret";
pub const ROLE: &str = "arn:aws:iam::000000000000:role/lambda-role";
pub const ARN_PREFIX: &str = "arn:aws:lambda:us-east-1:000000000000:function:";

/// What the fake invoker does with the next invocations.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Return the payload, with a log naming the function and version.
    Echo,
    /// Fail as the function: `function_error` with an error document.
    FunctionError,
    /// Fail as the function for this function only; echo for the others.
    FailOnly(String),
    /// Return a payload this many bytes long.
    BigResponse(usize),
    /// Return exactly this payload.
    Reply(Vec<u8>),
    Throttle(String),
    NotReady(String),
    Service(String),
    /// Stream a response (to the request's response sink; gathered without one).
    Stream(Streamed),
}

/// A streamed response the fake produces.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub content_type: Option<String>,
    pub chunks: Vec<Vec<u8>>,
    /// After the chunks, the invocation ends only once this is notified.
    pub hold: Option<Arc<tokio::sync::Notify>>,
    /// The stream ends in a function error with this document.
    pub error: Option<Vec<u8>>,
}

/// A recording fake of the worker side.
pub struct FakeInvoker {
    pub mode: Mutex<Mode>,
    pub calls: Mutex<Vec<InvokeRequest>>,
    pub retired: Mutex<Vec<String>>,
}

impl FakeInvoker {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeInvoker {
            mode: Mutex::new(Mode::Echo),
            calls: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
        })
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    pub fn calls(&self) -> Vec<InvokeRequest> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn retired(&self) -> Vec<String> {
        self.retired.lock().expect("lock").clone()
    }
}

#[async_trait::async_trait]
impl Invoker for FakeInvoker {
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        let mode = self.mode.lock().expect("lock").clone();
        let log = format!(
            "START RequestId: fake Version: {}\nhello from {}\nEND RequestId: fake\n",
            req.spec.version, req.spec.name
        );
        self.calls.lock().expect("lock").push(req.clone());
        // Like the worker, the fake streams its log to the request's sink.
        if let Some(sink) = &req.log {
            sink.0.write(log.as_bytes());
        }
        match mode {
            Mode::Echo => Ok(InvokeResult {
                payload: req.payload.to_vec(),
                function_error: false,
                log,
            }),
            Mode::FailOnly(name) if name != req.spec.name => Ok(InvokeResult {
                payload: req.payload.to_vec(),
                function_error: false,
                log,
            }),
            Mode::FunctionError | Mode::FailOnly(_) => Ok(InvokeResult {
                payload: br#"{"errorMessage":"boom","errorType":"Exception","stackTrace":[]}"#
                    .to_vec(),
                function_error: true,
                log,
            }),
            Mode::BigResponse(n) => Ok(InvokeResult {
                payload: vec![b'x'; n],
                function_error: false,
                log,
            }),
            Mode::Reply(payload) => Ok(InvokeResult {
                payload,
                function_error: false,
                log,
            }),
            Mode::Stream(s) => {
                let mut gathered = Vec::new();
                match &req.response {
                    Some(sink) => {
                        sink.0.start(s.content_type.as_deref());
                        for chunk in &s.chunks {
                            sink.0.chunk(chunk);
                        }
                    }
                    None => s.chunks.iter().for_each(|c| gathered.extend_from_slice(c)),
                }
                if let Some(hold) = &s.hold {
                    hold.notified().await;
                }
                Ok(InvokeResult {
                    function_error: s.error.is_some(),
                    payload: s.error.unwrap_or(gathered),
                    log,
                })
            }
            Mode::Throttle(reason) => Err(InvokeError::TooManyRequests { reason }),
            Mode::NotReady(m) => Err(InvokeError::NotReady(m)),
            Mode::Service(m) => Err(InvokeError::Service(m)),
        }
    }

    fn retire(&self, function_name: &str) {
        self.retired
            .lock()
            .expect("lock")
            .push(function_name.to_string());
    }
}

/// A response, buffered.
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_string())
    }

    /// The `X-Amzn-ErrorType`.
    pub fn error_type(&self) -> Option<String> {
        self.header("x-amzn-errortype")
    }

    /// Assert a Lambda error of this status and type.
    pub fn assert_error(&self, status: u16, kind: &str) {
        assert_eq!(
            (self.status.as_u16(), self.error_type().as_deref()),
            (status, Some(kind)),
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert!(body["message"].is_string(), "no message in {body}");
        assert!(
            body["Type"] == "User" || body["Type"] == "Service",
            "{body}"
        );
    }

    pub fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "error {:?}: {}",
            self.error_type(),
            String::from_utf8_lossy(&self.body)
        );
    }
}

/// The API over a temporary data directory.
pub struct Api {
    pub dir: tempfile::TempDir,
    pub invoker: Arc<FakeInvoker>,
    pub router: Option<Router>,
    pub config: ApiConfig,
    pub limits: CodeLimits,
}

impl Api {
    pub async fn new() -> Self {
        Self::build(|_| {}, CodeLimits::default()).await
    }

    pub async fn with(tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        Self::build(tweak, CodeLimits::default()).await
    }

    pub async fn with_limits(limits: CodeLimits) -> Self {
        Self::build(|_| {}, limits).await
    }

    async fn build(tweak: impl FnOnce(&mut ApiConfig), limits: CodeLimits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ApiConfig::new(dir.path().join("data"));
        config.credentials = vec![(AKID.into(), SECRET.into())];
        tweak(&mut config);
        let invoker = FakeInvoker::new();
        let state = AppState::with_code_limits(config.clone(), limits, invoker.clone())
            .await
            .expect("state");
        Api {
            dir,
            invoker,
            router: Some(app(state)),
            config,
            limits,
        }
    }

    /// Drop the router (and with it the database) and start again on the same data dir.
    pub async fn restart(&mut self) {
        self.router = None;
        // Background tasks (the event dispatcher) let go of the databases within moments.
        let mut tries = 0;
        let state = loop {
            match AppState::with_code_limits(self.config.clone(), self.limits, self.invoker.clone())
                .await
            {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        self.router = Some(app(state));
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.config.data_dir.clone()
    }

    /// Send a request signed with `secret` (None: unsigned).
    pub async fn send_as(
        &self,
        creds: Option<(&str, &str)>,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Resp {
        let mut map = HeaderMap::new();
        map.insert("host", HeaderValue::from_static("localhost:9000"));
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        if let Some((akid, secret)) = creds {
            let url = format!("http://localhost:9000{path_and_query}");
            let params = SigningParams {
                access_key_id: akid,
                secret_access_key: secret,
                region: "us-east-1",
                service: "lambda",
                time: chrono::Utc::now(),
                content_sha256_header: false,
            };
            for (k, v) in sign(&method, &url, &map, &body, &params).expect("sign") {
                map.insert(k, v);
            }
        }
        self.send_raw(method, path_and_query, map, body).await
    }

    /// A signed request whose response body is left open, to be read as it arrives.
    pub async fn send_open(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> http::Response<Body> {
        let mut map = HeaderMap::new();
        map.insert("host", HeaderValue::from_static("localhost:9000"));
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let url = format!("http://localhost:9000{path_and_query}");
        let params = SigningParams {
            access_key_id: AKID,
            secret_access_key: SECRET,
            region: "us-east-1",
            service: "lambda",
            time: chrono::Utc::now(),
            content_sha256_header: false,
        };
        for (k, v) in sign(&method, &url, &map, &body, &params).expect("sign") {
            map.insert(k, v);
        }
        let mut req = Request::builder().method(method).uri(path_and_query);
        for (k, v) in &map {
            req = req.header(k, v);
        }
        let req = req.body(Body::from(body)).expect("request");
        let router = self.router.clone().expect("running");
        router.oneshot(req).await.expect("infallible")
    }

    pub async fn send_raw(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path_and_query);
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let req = req.body(Body::from(body)).expect("request");
        let router = self.router.clone().expect("running");
        let resp = router.oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body")
            .to_vec();
        assert!(
            headers.contains_key("x-amzn-requestid"),
            "every response has a request id"
        );
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Resp {
        self.send_as(Some((AKID, SECRET)), method, path, headers, body)
            .await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], Vec::new()).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, &[], Vec::new()).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.send(
            Method::PUT,
            path,
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
    }

    /// CreateFunction with a small python handler; `extra` fields override the defaults.
    /// Publish `function`'s `$LATEST` as a new version (expects 201).
    pub async fn publish(&self, function: &str) {
        self.post(&format!("{}/versions", fpath(function)), json!({}))
            .await
            .assert_status(201);
    }

    /// Create alias `alias` of `function` on `version` (expects 201).
    pub async fn alias(&self, function: &str, alias: &str, version: &str) {
        self.post(
            &format!("{}/aliases", fpath(function)),
            json!({"Name": alias, "FunctionVersion": version}),
        )
        .await
        .assert_status(201);
    }

    pub async fn create(&self, name: &str, extra: Value) -> Resp {
        let mut body = json!({
            "FunctionName": name,
            "Runtime": "python3.11",
            "Role": ROLE,
            "Handler": "app.handler",
            "Code": {"ZipFile": b64(&handler_zip("v1"))},
        });
        merge(&mut body, extra);
        self.post("/2015-03-31/functions", body).await
    }

    pub async fn invoke(
        &self,
        function: &str,
        query: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Resp {
        let path = format!(
            "/2015-03-31/functions/{}/invocations{query}",
            encode_path_segment(function)
        );
        self.send(Method::POST, &path, headers, payload.to_vec())
            .await
    }
}

pub fn fpath(name: &str) -> String {
    format!("/2015-03-31/functions/{}", encode_path_segment(name))
}

fn merge(base: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A zip from (name, contents, unix mode) entries.
pub fn zip_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data, mode) in entries {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        w.start_file(*name, opts).expect("start");
        w.write_all(data).expect("write");
    }
    w.finish().expect("finish").into_inner()
}

/// A python handler zip whose content varies with `tag`.
pub fn handler_zip(tag: &str) -> Vec<u8> {
    let src =
        format!("def handler(event, context):\n    return {{'tag': '{tag}', 'event': event}}\n");
    zip_of(&[("app.py", src.as_bytes(), 0o644)])
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A chunk store over memory whose puts can be held, for interleavings with the front end.
pub mod gated {
    use std::fmt;
    use std::sync::{Arc, Mutex};

    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };
    use tokio::sync::oneshot;

    struct Gate {
        prefix: String,
        contains: String,
        reached: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    }

    /// Wraps an in-memory object store; can hold the next put of a path, *after* the put has
    /// landed.
    pub struct Gated {
        inner: InMemory,
        gate: Mutex<Option<Gate>>,
    }

    /// A held put: wait for `reached`, then send on `release`.
    pub struct Held {
        pub reached: oneshot::Receiver<()>,
        pub release: oneshot::Sender<()>,
    }

    impl Gated {
        pub fn new() -> Arc<Self> {
            Arc::new(Gated {
                inner: InMemory::new(),
                gate: Mutex::new(None),
            })
        }

        /// Hold the next put of a path that starts with `prefix` and contains `contains`, once
        /// it is stored.
        pub fn hold_after_put(&self, prefix: &str, contains: &str) -> Held {
            let (reached_tx, reached) = oneshot::channel();
            let (release, release_rx) = oneshot::channel();
            *self.gate.lock().expect("gate") = Some(Gate {
                prefix: prefix.to_string(),
                contains: contains.to_string(),
                reached: reached_tx,
                release: release_rx,
            });
            Held { reached, release }
        }
    }

    impl fmt::Debug for Gated {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Gated")
        }
    }

    impl fmt::Display for Gated {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Gated")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Gated {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            let result = self.inner.put_opts(location, payload, opts).await;
            let gate = {
                let mut g = self.gate.lock().expect("gate");
                match &*g {
                    Some(gate)
                        if location.as_ref().starts_with(&gate.prefix)
                            && location.as_ref().contains(&gate.contains) =>
                    {
                        g.take()
                    }
                    _ => None,
                }
            };
            if let Some(gate) = gate {
                let _ = gate.reached.send(());
                let _ = gate.release.await;
            }
            result
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A chunk store over `origin`, as the front end's.
    pub fn chunk_store(origin: Arc<Gated>) -> hearth_store::ChunkStore {
        hearth_store::ChunkStore::with_object_store(
            origin,
            None,
            hearth_store::Secrets::from_master_key([9; 32]),
        )
    }
}
