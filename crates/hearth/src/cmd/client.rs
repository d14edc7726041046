//! The daily commands: `hearth fn deploy|ls|rm|status`, `hearth invoke`, `hearth logs`,
//! `hearth events` (the failed-events store of asynchronous invocations).
//!
//! They speak the same signed Lambda API as boto3 (hearth's own SigV4 signer), reading the
//! endpoint and keys from the standard `AWS_*` variables or, when those are unset, from
//! `<data-dir>/client.env` written by `hearth up`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Args, Subcommand};
use hearth_api::sigv4::{SigningParams, encode_path_segment, sign};
use serde_json::{Value, json};

#[derive(Args, Clone)]
pub struct Conn {
    /// hearth's endpoint (default: $AWS_ENDPOINT_URL, else <data-dir>/client.env).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Data directory of a local `hearth up`, to read client.env from.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value_os_t = super::default_data_dir())]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum FnCmd {
    /// Zip a directory and create the function, or update its code if it exists.
    Deploy(DeployArgs),
    /// List functions.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a function.
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// A function's asynchronous queue: depth, oldest event, successes, retries, failures.
    Status {
        name: String,
        /// Print the JSON as returned.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Asynchronous invocations that failed for good (retries exhausted, too old, or the function
/// gone): every one is kept until deleted or re-driven.
#[derive(Subcommand)]
pub enum EventsCmd {
    /// List failed events (oldest failure first).
    List {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print one failed event: its record (request payload, last response), as JSON.
    Show {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Queue failed events again as new asynchronous invocations (fresh retries).
    Redrive {
        /// Event ids.
        ids: Vec<String>,
        /// Every failed event (of `--function`, if given).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        function: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete failed events.
    Rm {
        ids: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    /// Directory holding the function's code (zipped as is; `bootstrap` keeps its exec bit).
    dir: PathBuf,
    /// Function name (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Runtime: python3.11, provided, provided.al2, provided.al2023.
    #[arg(long, default_value = "python3.11")]
    runtime: String,
    /// Handler, e.g. `app.handler`.
    #[arg(long, default_value = "app.handler")]
    handler: String,
    /// Memory in MB (128–10240).
    #[arg(long)]
    memory: Option<u32>,
    /// Timeout in seconds (1–900).
    #[arg(long)]
    timeout: Option<u32>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Execution role ARN (recorded only).
    #[arg(long, default_value = "arn:aws:iam::000000000000:role/hearth")]
    role: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct InvokeArgs {
    /// Function name, name:qualifier or ARN.
    name: String,
    /// JSON payload (default `{}`; `-` reads stdin).
    payload: Option<String>,
    /// Version or alias.
    #[arg(long)]
    qualifier: Option<String>,
    /// Print the invocation's log (last 4 KB) to stderr.
    #[arg(long)]
    log: bool,
    /// Invoke asynchronously (`Event`): queue it and print its request id.
    #[arg(long = "async", conflicts_with = "log")]
    event: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Function name.
    name: String,
    /// How many bytes from the end of the log.
    #[arg(long, default_value_t = 16384)]
    bytes: u64,
    #[command(flatten)]
    conn: Conn,
}

/// A signed client for hearth's API.
struct Client {
    endpoint: String,
    key: String,
    secret: String,
    region: String,
    agent: ureq::Agent,
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Turn a Lambda error reply into an error with its type and message.
    fn check(self) -> anyhow::Result<Reply> {
        if self.status < 300 {
            return Ok(self);
        }
        let kind = self
            .headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("Error")
            .to_string();
        let msg = self.json()["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_default();
        bail!("{kind} (HTTP {}): {msg}", self.status)
    }
}

impl Conn {
    fn client(&self) -> anyhow::Result<Client> {
        let mut vars: std::collections::HashMap<String, String> = std::env::vars().collect();
        let env_file = self.data_dir.join("client.env");
        if (!vars.contains_key("AWS_ACCESS_KEY_ID") || self.endpoint_url.is_none())
            && let Ok(text) = std::fs::read_to_string(&env_file)
        {
            for line in text.lines() {
                if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                    vars.entry(k.to_string()).or_insert_with(|| v.to_string());
                }
            }
        }
        let get = |k: &str| {
            vars.get(k).cloned().with_context(|| {
                format!(
                    "{k} is not set and {} has none: start `hearth up` or source its client.env",
                    env_file.display()
                )
            })
        };
        let endpoint = match &self.endpoint_url {
            Some(e) => e.clone(),
            None => get("AWS_ENDPOINT_URL")?,
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(960)))
            .build();
        Ok(Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            key: get("AWS_ACCESS_KEY_ID")?,
            secret: get("AWS_SECRET_ACCESS_KEY")?,
            region: vars
                .get("AWS_DEFAULT_REGION")
                .or_else(|| vars.get("AWS_REGION"))
                .cloned()
                .unwrap_or_else(|| "us-east-1".into()),
            agent: ureq::Agent::new_with_config(config),
        })
    }
}

impl Client {
    fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        extra: &[(&str, String)],
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{}", self.endpoint, path_and_query);
        let method = http::Method::from_bytes(method.as_bytes())?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        for (k, v) in extra {
            headers.insert(
                http::HeaderName::from_bytes(k.as_bytes())?,
                http::HeaderValue::from_str(v)?,
            );
        }
        let params = SigningParams {
            access_key_id: &self.key,
            secret_access_key: &self.secret,
            region: &self.region,
            service: "lambda",
            time: chrono::Utc::now(),
            content_sha256_header: false,
        };
        let signed = sign(&method, &url, &headers, body, &params)
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        let mut req = http::Request::builder().method(method).uri(&url);
        for (k, v) in headers.iter().chain(signed.iter().map(|(k, v)| (k, v))) {
            req = req.header(k, v);
        }
        let req = req.body(body.to_vec())?;
        let mut resp = self
            .agent
            .run(req)
            .with_context(|| format!("cannot reach hearth at {}", self.endpoint))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.body_mut().read_to_vec()?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

pub fn run_fn(cmd: FnCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FnCmd::Deploy(args) => deploy(args),
        FnCmd::Ls { conn } => {
            let c = conn.client()?;
            let mut marker: Option<String> = None;
            println!(
                "{:<32} {:<16} {:>7} {:>8}  LAST MODIFIED",
                "NAME", "RUNTIME", "MEMORY", "TIMEOUT"
            );
            loop {
                let q = match &marker {
                    Some(m) => format!("/2015-03-31/functions/?Marker={}", encode_path_segment(m)),
                    None => "/2015-03-31/functions/".to_string(),
                };
                let page = c.call("GET", &q, b"", &[])?.check()?.json();
                for f in page["Functions"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<16} {:>7} {:>8}  {}",
                        f["FunctionName"].as_str().unwrap_or(""),
                        f["Runtime"].as_str().unwrap_or(""),
                        f["MemorySize"].as_u64().unwrap_or(0),
                        f["Timeout"].as_u64().unwrap_or(0),
                        f["LastModified"].as_str().unwrap_or("")
                    );
                }
                match page["NextMarker"].as_str() {
                    Some(m) => marker = Some(m.to_string()),
                    None => break,
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FnCmd::Rm { name, conn } => {
            let c = conn.client()?;
            c.call(
                "DELETE",
                &format!("/2015-03-31/functions/{}", encode_path_segment(&name)),
                b"",
                &[],
            )?
            .check()?;
            eprintln!("deleted {name}");
            Ok(ExitCode::SUCCESS)
        }
        FnCmd::Status { name, json, conn } => {
            let c = conn.client()?;
            let v = c
                .call(
                    "GET",
                    &format!("/hearth/v1/functions/{}/status", encode_path_segment(&name)),
                    b"",
                    &[],
                )?
                .check()?
                .json();
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let a = &v["Async"];
            let n = |k: &str| a[k].as_u64().unwrap_or(0);
            println!("{name}: asynchronous invocations");
            println!(
                "  queued:              {} ({} running)",
                n("Depth"),
                n("Running")
            );
            match a["OldestEventAgeSeconds"].as_f64() {
                Some(age) => println!("  oldest event:        {age:.1} s"),
                None => println!("  oldest event:        -"),
            }
            println!(
                "  since start:         {} succeeded, {} retried, {} failed, {} throttled",
                n("Succeeded"),
                n("Retried"),
                n("Failed"),
                n("Throttled")
            );
            println!(
                "  failed events kept:  {} (hearth events list --function {name})",
                n("FailedEventsStored")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn run_events(cmd: EventsCmd) -> anyhow::Result<ExitCode> {
    let list = |c: &Client, function: Option<&str>| -> anyhow::Result<Vec<Value>> {
        let path = match function {
            Some(f) => format!(
                "/hearth/v1/failed-events?function={}",
                encode_path_segment(f)
            ),
            None => "/hearth/v1/failed-events".to_string(),
        };
        let v = c.call("GET", &path, b"", &[])?.check()?.json();
        Ok(v["FailedEvents"].as_array().cloned().unwrap_or_default())
    };
    match cmd {
        EventsCmd::List { function, conn } => {
            let c = conn.client()?;
            let events = list(&c, function.as_deref())?;
            println!(
                "{:<36} {:<24} {:<18} {:>8}  FAILED AT",
                "EVENT ID", "FUNCTION", "CONDITION", "ATTEMPTS"
            );
            for e in &events {
                let at = e["FailedMs"]
                    .as_i64()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_default();
                println!(
                    "{:<36} {:<24} {:<18} {:>8}  {at}",
                    e["EventId"].as_str().unwrap_or(""),
                    e["FunctionName"].as_str().unwrap_or(""),
                    e["Condition"].as_str().unwrap_or(""),
                    e["Attempts"].as_u64().unwrap_or(0),
                );
            }
            eprintln!("{} failed event(s)", events.len());
            Ok(ExitCode::SUCCESS)
        }
        EventsCmd::Show { id, conn } => {
            let c = conn.client()?;
            let v = c
                .call(
                    "GET",
                    &format!("/hearth/v1/failed-events/{}", encode_path_segment(&id)),
                    b"",
                    &[],
                )?
                .check()?
                .json();
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        EventsCmd::Redrive {
            ids,
            all,
            function,
            conn,
        } => {
            let c = conn.client()?;
            let ids: Vec<String> = if all {
                list(&c, function.as_deref())?
                    .iter()
                    .filter_map(|e| e["EventId"].as_str().map(String::from))
                    .collect()
            } else if ids.is_empty() {
                bail!("name the events to re-drive, or pass --all");
            } else {
                ids
            };
            for id in &ids {
                let v = c
                    .call(
                        "POST",
                        &format!(
                            "/hearth/v1/failed-events/{}/redrive",
                            encode_path_segment(id)
                        ),
                        b"",
                        &[],
                    )?
                    .check()?
                    .json();
                println!("{id} -> {}", v["EventId"].as_str().unwrap_or(""));
            }
            eprintln!("re-drove {} event(s)", ids.len());
            Ok(ExitCode::SUCCESS)
        }
        EventsCmd::Rm { ids, conn } => {
            let c = conn.client()?;
            for id in &ids {
                c.call(
                    "DELETE",
                    &format!("/hearth/v1/failed-events/{}", encode_path_segment(id)),
                    b"",
                    &[],
                )?
                .check()?;
            }
            eprintln!("deleted {} event(s)", ids.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Zip a directory (deterministic order, unix modes kept), showing progress.
fn zip_dir(dir: &Path) -> anyhow::Result<(Vec<u8>, usize)> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            } else if ft.is_symlink() {
                bail!(
                    "{} is a symbolic link: Lambda packages cannot hold links",
                    e.path().display()
                );
            }
        }
    }
    files.sort();
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("zipping {bar:30} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut out);
        for f in &files {
            let rel = f.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
            let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(mode);
            zip.start_file(rel.clone(), opts)?;
            let mut src = std::fs::File::open(f)?;
            let mut buf = [0u8; 64 * 1024];
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                zip.write_all(&buf[..n])?;
                bar.inc(n as u64);
            }
            bar.set_message(rel);
        }
        zip.finish()?;
    }
    bar.finish_and_clear();
    Ok((out.into_inner(), files.len()))
}

fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.client()?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .dir
            .canonicalize()?
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot name the function after the directory: give --name")?,
    };
    let (zip, count) = zip_dir(&args.dir)?;
    eprintln!("package: {count} files zipped to {} bytes", zip.len());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&zip);
    let mut vars = serde_json::Map::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
        vars.insert(k.to_string(), Value::String(v.to_string()));
    }
    let path = format!("/2015-03-31/functions/{}", encode_path_segment(&name));
    let exists = c.call("GET", &path, b"", &[])?.status == 200;
    let mut config = json!({ "Runtime": args.runtime, "Handler": args.handler });
    if let Some(m) = args.memory {
        config["MemorySize"] = json!(m);
    }
    if let Some(t) = args.timeout {
        config["Timeout"] = json!(t);
    }
    if !vars.is_empty() {
        config["Environment"] = json!({ "Variables": vars });
    }
    let result = if exists {
        let body = serde_json::to_vec(&json!({ "ZipFile": b64 }))?;
        c.call("PUT", &format!("{path}/code"), &body, &[])?
            .check()?;
        let body = serde_json::to_vec(&config)?;
        c.call("PUT", &format!("{path}/configuration"), &body, &[])?
            .check()?
            .json()
    } else {
        config["FunctionName"] = json!(name);
        config["Role"] = json!(args.role);
        config["Code"] = json!({ "ZipFile": b64 });
        let body = serde_json::to_vec(&config)?;
        c.call("POST", "/2015-03-31/functions", &body, &[])?
            .check()?
            .json()
    };
    println!(
        "{} {}\n  arn:    {}\n  sha256: {}\n  state:  {}",
        if exists { "updated" } else { "created" },
        name,
        result["FunctionArn"].as_str().unwrap_or(""),
        result["CodeSha256"].as_str().unwrap_or(""),
        result["State"].as_str().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_invoke(args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.client()?;
    let payload = match args.payload.as_deref() {
        None => b"{}".to_vec(),
        Some("-") => {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v)?;
            v
        }
        Some(p) => p.as_bytes().to_vec(),
    };
    let mut path = format!(
        "/2015-03-31/functions/{}/invocations",
        encode_path_segment(&args.name)
    );
    if let Some(q) = &args.qualifier {
        path.push_str(&format!("?Qualifier={}", encode_path_segment(q)));
    }
    if args.event {
        let reply = c
            .call(
                "POST",
                &path,
                &payload,
                &[("x-amz-invocation-type", "Event".to_string())],
            )?
            .check()?;
        let id = reply
            .headers
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut extra = vec![("x-amz-invocation-type", "RequestResponse".to_string())];
    if args.log {
        extra.push(("x-amz-log-type", "Tail".to_string()));
    }
    let reply = c.call("POST", &path, &payload, &extra)?.check()?;
    if let Some(log) = reply
        .headers
        .get("x-amz-log-result")
        .and_then(|v| v.to_str().ok())
    {
        let text = base64::engine::general_purpose::STANDARD
            .decode(log)
            .unwrap_or_default();
        eprint!("{}", String::from_utf8_lossy(&text));
    }
    std::io::stdout().write_all(&reply.body)?;
    println!();
    if reply.headers.contains_key("x-amz-function-error") {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.client()?;
    let path = format!(
        "/hearth/v1/functions/{}/logs?tail_bytes={}",
        encode_path_segment(&args.name),
        args.bytes
    );
    let reply = c.call("GET", &path, b"", &[])?.check()?;
    std::io::stdout().write_all(&reply.body)?;
    Ok(ExitCode::SUCCESS)
}

/// Create a python3.11 function with this `app.py` unless it exists (for the benchmarks).
fn ensure_python_function(c: &Client, name: &str, code: &[u8]) -> anyhow::Result<()> {
    let path = format!("/2015-03-31/functions/{}", encode_path_segment(name));
    if c.call("GET", &path, b"", &[])?.status != 404 {
        return Ok(());
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        z.start_file("app.py", zip::write::SimpleFileOptions::default())?;
        z.write_all(code)?;
        z.finish()?;
    }
    let body = json!({
        "FunctionName": name, "Runtime": "python3.11", "Handler": "app.handler",
        "Role": "arn:aws:iam::000000000000:role/hearth",
        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(buf.into_inner()) },
    });
    c.call(
        "POST",
        "/2015-03-31/functions",
        &serde_json::to_vec(&body)?,
        &[],
    )?
    .check()?;
    Ok(())
}

#[derive(Args)]
pub struct MetricsArgs {
    #[command(flatten)]
    conn: Conn,
}

/// `hearth metrics`: the server's metrics (Prometheus' text format).
pub fn run_metrics(args: MetricsArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.client()?;
    let r = c.call("GET", "/hearth/v1/metrics", b"", &[])?.check()?;
    print!("{}", String::from_utf8_lossy(&r.body));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ApiBenchArgs {
    /// Function to invoke (created as a trivial python3.11 echo function if missing).
    #[arg(long, default_value = "hearth-bench-echo")]
    function: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Invocations in all.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Stop after this many seconds even if not all requests were sent.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    #[command(flatten)]
    conn: Conn,
}

/// What a load run measured.
pub struct LoadResult {
    pub clients: usize,
    /// Latencies of the successful invocations, sorted.
    pub lat: Vec<std::time::Duration>,
    pub failed: usize,
    pub throttled: usize,
    pub secs: f64,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.lat.len() as f64 / self.secs.max(1e-9)
    }
}

impl Conn {
    /// The server whose `client.env` is in `data_dir`.
    pub fn for_data_dir(data_dir: &std::path::Path) -> Self {
        Self {
            endpoint_url: None,
            data_dir: data_dir.to_path_buf(),
        }
    }
}

/// `clients` concurrent clients invoking `function` (created as a trivial python3.11 echo
/// function if missing) `requests` times in all, after one warm-up call; each response must
/// echo its request.
pub fn run_load(
    conn: &Conn,
    function: &str,
    clients: usize,
    requests: usize,
    max_seconds: u64,
) -> anyhow::Result<LoadResult> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let c = conn.client()?;
    let path = format!("/2015-03-31/functions/{}", encode_path_segment(function));
    ensure_python_function(
        &c,
        function,
        b"def handler(event, context):\n    return event\n",
    )?;
    let invoke_path = format!("{path}/invocations");
    // One warm-up call so the first sandbox exists.
    c.call("POST", &invoke_path, b"{}", &[])?.check()?;
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(max_seconds);
    let started = std::time::Instant::now();
    let mut threads = Vec::new();
    for _ in 0..clients {
        let c = conn.client()?;
        let next = next.clone();
        let p = invoke_path.clone();
        threads.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let (mut failed, mut throttled) = (0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests || std::time::Instant::now() > deadline {
                    break;
                }
                let body = format!("{{\"i\":{i}}}");
                let t = std::time::Instant::now();
                match c.call("POST", &p, body.as_bytes(), &[]) {
                    Ok(r)
                        if r.status == 200
                            && !r.headers.contains_key("x-amz-function-error")
                            && r.json() == json!({ "i": i }) =>
                    {
                        lat.push(t.elapsed())
                    }
                    Ok(r) if r.status == 429 => throttled += 1,
                    _ => failed += 1,
                }
            }
            (lat, failed, throttled)
        }));
    }
    let (mut lat, mut failed, mut throttled) = (Vec::new(), 0, 0);
    for t in threads {
        let (l, f, th) = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        lat.extend(l);
        failed += f;
        throttled += th;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    Ok(LoadResult {
        clients,
        lat,
        failed,
        throttled,
        secs,
    })
}

/// `hearth bench api`: concurrent clients invoking one function; prints throughput and latency
/// percentiles, and fails if any request failed unexpectedly.
pub fn api_bench(args: ApiBenchArgs) -> anyhow::Result<ExitCode> {
    let r = run_load(
        &args.conn,
        &args.function,
        args.clients,
        args.requests,
        args.max_seconds,
    )?;
    println!(
        "hearth bench api: {} clients, {} ok, {} failed, {} throttled in {:.1} s -> {:.1} invokes/s",
        r.clients,
        r.lat.len(),
        r.failed,
        r.throttled,
        r.secs,
        r.throughput()
    );
    println!(
        "latency p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        super::bench::pct(&r.lat, 0.5),
        super::bench::pct(&r.lat, 0.9),
        super::bench::pct(&r.lat, 0.99),
        r.lat
            .last()
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    );
    Ok(if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Args)]
pub struct AsyncBenchArgs {
    /// Function to invoke (created as a trivial python3.11 function that logs its start time).
    #[arg(long, default_value = "hearth-bench-async")]
    function: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Length of each phase, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Code of the async benchmark's function: one line per start, with the host's clock.
const ASYNC_BENCH_CODE: &[u8] = b"import json, time\ndef handler(event, context):\n    print('BENCH-START ' + json.dumps({'id': context.aws_request_id, 't': time.time()}))\n    return event\n";

fn epoch_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `clients` threads calling `f(client, i)` until `secs` have passed, each at most once per
/// `interval` (none: as fast as they can). Returns what the calls returned.
fn run_clients<T: Send + 'static>(
    conn: &Conn,
    clients: usize,
    secs: f64,
    interval: Option<std::time::Duration>,
    f: impl Fn(&Client, usize) -> Option<T> + Send + Sync + 'static,
) -> anyhow::Result<(Vec<T>, usize, f64)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let end = started + std::time::Duration::from_secs_f64(secs);
    let mut threads = Vec::new();
    for k in 0..clients {
        let c = conn.client()?;
        let (f, next) = (f.clone(), next.clone());
        threads.push(std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut failed = 0usize;
            // Spread paced clients evenly over one interval.
            let mut due = started
                + interval
                    .map(|i| i * k as u32 / clients as u32)
                    .unwrap_or_default();
            while std::time::Instant::now() < end {
                if let Some(i) = interval {
                    let now = std::time::Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    due += i;
                }
                match f(&c, next.fetch_add(1, Ordering::Relaxed)) {
                    Some(v) => out.push(v),
                    None => failed += 1,
                }
            }
            (out, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in threads {
        let (o, f) = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        all.extend(o);
        failed += f;
    }
    Ok((all, failed, started.elapsed().as_secs_f64()))
}

/// Wait until the function's asynchronous queue is empty; returns the seconds waited.
fn drain(c: &Client, function: &str, limit_s: u64) -> anyhow::Result<f64> {
    let t = std::time::Instant::now();
    let path = format!(
        "/hearth/v1/functions/{}/status",
        encode_path_segment(function)
    );
    loop {
        let v = c.call("GET", &path, b"", &[])?.check()?.json();
        if v["Async"]["Depth"].as_u64() == Some(0) {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed().as_secs() > limit_s {
            bail!("the queue did not drain in {limit_s} s: {}", v["Async"]);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `hearth bench async`: sync invokes/s; accepted events/s (durable, while they also run);
/// how fast the queue drains; and the delay from acknowledgement to the start of execution at
/// half the accepted rate and at half the rate the queue drains.
pub fn async_bench(args: AsyncBenchArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.client()?;
    let name = args.function.clone();
    let path = format!("/2015-03-31/functions/{}", encode_path_segment(&name));
    ensure_python_function(&c, &name, ASYNC_BENCH_CODE)?;
    let invoke = Arc::new(format!("{path}/invocations"));
    c.call("POST", &invoke, b"{}", &[])?.check()?;
    let secs = args.seconds as f64;

    // 1. Synchronous invokes, the baseline.
    let p = invoke.clone();
    let (ok, failed, took) = run_clients(&args.conn, args.clients, secs, None, move |c, _| {
        c.call("POST", &p, b"{}", &[])
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ())
    })?;
    let sync_rate = ok.len() as f64 / took;
    println!(
        "sync invokes:   {sync_rate:.0}/s ({} ok, {failed} failed, {} clients)",
        ok.len(),
        args.clients
    );

    // 2. Events as fast as the clients can send them.
    let event = |p: Arc<String>| {
        move |c: &Client, i: usize| {
            let body = format!("{{\"i\":{i}}}");
            let r = c
                .call(
                    "POST",
                    &p,
                    body.as_bytes(),
                    &[("x-amz-invocation-type", "Event".to_string())],
                )
                .ok()?;
            let acked = epoch_s();
            (r.status == 202).then(|| {
                let id = r
                    .headers
                    .get("x-amzn-requestid")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                (id, acked)
            })
        }
    };
    let (acked, failed, took) =
        run_clients(&args.conn, args.clients, secs, None, event(invoke.clone()))?;
    let accept_rate = acked.len() as f64 / took;
    println!(
        "events accepted: {accept_rate:.0}/s durably ({} acknowledged, {failed} refused, {took:.1} s)",
        acked.len()
    );
    let drained = drain(&c, &name, 600)?;
    let exec_rate = acked.len() as f64 / (took + drained);
    println!("queue drained {drained:.1} s after the last accept: {exec_rate:.0} events run/s");

    // 3. Delay from acknowledgement to the start, at paced rates.
    let report = |label: &str, rate: f64| -> anyhow::Result<()> {
        let rate = rate.max(1.0);
        let interval = std::time::Duration::from_secs_f64(args.clients as f64 / rate);
        let (acked, failed, took) = run_clients(
            &args.conn,
            args.clients,
            secs,
            Some(interval),
            event(invoke.clone()),
        )?;
        drain(&c, &name, 600)?;
        let log = c
            .call(
                "GET",
                &format!(
                    "/hearth/v1/functions/{}/logs?tail_bytes={}",
                    encode_path_segment(&name),
                    64 * 1024 * 1024
                ),
                b"",
                &[],
            )?
            .check()?;
        let mut starts = std::collections::HashMap::new();
        for line in String::from_utf8_lossy(&log.body).lines() {
            if let Some(i) = line.find("BENCH-START ")
                && let Ok(v) = serde_json::from_str::<Value>(&line[i + 12..])
                && let (Some(id), Some(t)) = (v["id"].as_str(), v["t"].as_f64())
            {
                starts.entry(id.to_string()).or_insert(t);
            }
        }
        let mut delays: Vec<std::time::Duration> = acked
            .iter()
            .filter_map(|(id, t)| starts.get(id).map(|s| (s - t).max(0.0)))
            .map(std::time::Duration::from_secs_f64)
            .collect();
        delays.sort();
        println!(
            "{label}: {:.0}/s offered, {} acknowledged ({failed} refused) in {took:.1} s; ack -> start p50={:.1} ms p99={:.1} ms max={:.1} ms ({} matched)",
            rate,
            acked.len(),
            super::bench::pct(&delays, 0.5),
            super::bench::pct(&delays, 0.99),
            delays
                .last()
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
            delays.len()
        );
        Ok(())
    };
    report("at half the accepted rate", accept_rate / 2.0)?;
    report("at half the drain rate   ", exec_rate / 2.0)?;
    Ok(ExitCode::SUCCESS)
}
