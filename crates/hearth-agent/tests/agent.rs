//! End-to-end tests: the real agent binary, run natively, with the test acting as the worker
//! (frames on the agent's stdin/stdout) and a shell + curl `bootstrap` (or the test itself)
//! acting as the runtime.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hearth_proto::{AgentMsg, Frame, HostMsg, InvokeMeta, SandboxConfig, read_frame, write_frame};
use serde_json::{Value, json};

/// Longest wait for anything; a hang fails the test instead of blocking it.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A runtime in the style of AWS's custom-runtime tutorial; what it does depends on `"mode"`.
const CURL_BOOTSTRAP: &str = r#"#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
post() { curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' "$@"; }
echo "init: handler=$_HANDLER cwd=$(pwd) api=$AWS_LAMBDA_RUNTIME_API hearth_vars=$(env | grep -c '^HEARTH_')"
echo "init on stderr" >&2
while true; do
  HEADERS="$(mktemp)"
  EVENT="$(curl -sS --noproxy '*' -D "$HEADERS" "$API/invocation/next")" || exit 10
  ID="$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | cut -d' ' -f2 | tr -d '\r\n')"
  case "$EVENT" in
    *'"mode":"echo"'*)
      cat "$HEADERS"
      i=0
      while [ $i -lt 3000 ]; do echo "log line $i of $ID ........................................"; i=$((i+1)); done
      echo "stderr line for $ID" >&2
      echo "last line before the response of $ID"
      post --data-binary "$EVENT" "$API/invocation/$ID/response" >/dev/null ;;
    *'"mode":"error"'*)
      echo "failing $ID"
      post -H 'Lambda-Runtime-Function-Error-Type: MyError' \
        --data-binary '{"errorMessage":"boom","errorType":"MyError","stackTrace":[]}' \
        "$API/invocation/$ID/error" >/dev/null ;;
    *'"mode":"error-text"'*)
      post --data-binary 'plain failure' "$API/invocation/$ID/error" >/dev/null ;;
    *'"mode":"probe"'*)
      wrong=$(post --data-binary '"wrong"' "$API/invocation/not-$ID/response")
      first=$(post --data-binary '"first"' "$API/invocation/$ID/response")
      second=$(post --data-binary '"second"' "$API/invocation/$ID/response")
      initerr=$(post --data-binary '{}' "$API/init/error")
      echo "probe wrong=$wrong first=$first second=$second initerr=$initerr" ;;
    *'"mode":"exit"'*)
      echo "exiting mid-invocation"
      exit 3 ;;
    *'"mode":"kill"'*)
      kill -9 $$ ;;
  esac
  rm -f "$HEADERS"
done
"#;

/// A runtime that never calls the API: the test speaks HTTP to the agent itself.
const IDLE_BOOTSTRAP: &str = "#!/bin/sh\nexec sleep 600\n";

/// A temporary directory with a task root holding `bootstrap` (if any) with `mode`.
fn task_dir(bootstrap: Option<&str>, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let task_root = dir.path().join("task");
    std::fs::create_dir(&task_root).expect("task root");
    if let Some(script) = bootstrap {
        let path = task_root.join("bootstrap");
        std::fs::write(&path, script).expect("write bootstrap");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("chmod bootstrap");
    }
    (dir, task_root)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The agent under test; it is shut down (or killed) on drop.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    frames: Receiver<Frame<AgentMsg>>,
    addr: String,
    task_root: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(bootstrap: Option<&str>, env: &[(&str, &str)]) -> Agent {
        Agent::start_with_mode(bootstrap, 0o755, env)
    }

    fn start_with_mode(bootstrap: Option<&str>, mode: u32, env: &[(&str, &str)]) -> Agent {
        let (dir, task_root) = task_dir(bootstrap, mode);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth-agent"));
        cmd.env("HEARTH_SECRET", "must not reach the runtime")
            .env("LAMBDA_TASK_ROOT", &task_root)
            .env("LAMBDA_RUNTIME_DIR", dir.path().join("runtime"))
            .env("_HANDLER", "app.handler")
            .env("TMPDIR", dir.path())
            .env_remove("AWS_LAMBDA_INITIALIZATION_TYPE")
            .env_remove("HEARTH_AGENT_DEFER")
            .envs(env.iter().copied());
        Agent::launch(cmd, dir, task_root)
    }

    /// An agent in a pre-created sandbox: a generic environment (`own_env` added), waiting
    /// for [`Agent::configure`]. Its own `LAMBDA_TASK_ROOT` points at an empty directory, so
    /// the runtime starts only if the configured environment is the one used.
    fn start_deferred(bootstrap: Option<&str>, own_env: &[(&str, &str)]) -> Agent {
        let (dir, task_root) = task_dir(bootstrap, 0o755);
        let decoy = dir.path().join("not-the-task-root");
        std::fs::create_dir(&decoy).expect("decoy task root");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth-agent"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HEARTH_AGENT_DEFER", "1")
            .env("LAMBDA_TASK_ROOT", &decoy)
            .env("LAMBDA_RUNTIME_DIR", &decoy)
            .env("PROCESS_ONLY", "from the agent's own environment")
            .envs(own_env.iter().copied());
        Agent::launch(cmd, dir, task_root)
    }

    fn launch(mut cmd: Command, dir: tempfile::TempDir, task_root: PathBuf) -> Agent {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = cmd
            .env("HEARTH_AGENT_LISTEN", &addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(frame) = read_frame::<_, AgentMsg>(&mut stdout) {
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let task_root = task_root.canonicalize().expect("canonical task root");
        Agent {
            child,
            stdin,
            frames,
            addr,
            task_root,
            dir,
        }
    }

    /// Send `Configure`: the Lambda variables a worker would set (task root and runtime
    /// directory pointing into the test's directory), this machine's `PATH`, and `extra`.
    fn configure(&mut self, extra: &[(&str, &str)]) {
        let mut env = vec![
            format!("LAMBDA_TASK_ROOT={}", self.task_root.display()),
            format!(
                "LAMBDA_RUNTIME_DIR={}",
                self.dir.path().join("runtime").display()
            ),
            "_HANDLER=function.handler".to_string(),
            format!("TMPDIR={}", self.dir.path().display()),
            format!("PATH={}", std::env::var("PATH").unwrap_or_default()),
            "HEARTH_SECRET=must not reach the runtime".to_string(),
        ];
        env.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
        self.send(HostMsg::Configure(SandboxConfig { env }), b"");
    }

    fn send(&mut self, msg: HostMsg, body: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        write_frame(stdin, &msg, body).expect("write frame");
    }

    fn invoke(&mut self, request_id: &str, event: &Value) {
        let meta = InvokeMeta {
            request_id: request_id.into(),
            deadline_ms: 1_700_000_000_123,
            invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            trace_id: "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
                .into(),
            client_context: Some("eyJjdXN0b20iOnt9fQ==".into()),
            cognito_identity: Some(r#"{"cognitoIdentityId":"id"}"#.into()),
        };
        self.send(HostMsg::Invoke(meta), event.to_string().as_bytes());
    }

    fn recv(&self) -> Frame<AgentMsg> {
        match self.frames.recv_timeout(TIMEOUT) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout) => panic!("no frame from the agent in {TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the agent closed its stdout"),
        }
    }

    /// The next frame that is not a `Log`, and the log text that came before it.
    fn next_event(&self) -> (Frame<AgentMsg>, String) {
        let mut logs = Vec::new();
        loop {
            let frame = self.recv();
            if frame.msg == AgentMsg::Log {
                assert!(!frame.body.is_empty(), "empty Log frame");
                logs.extend_from_slice(&frame.body);
            } else {
                return (frame, String::from_utf8_lossy(&logs).into_owned());
            }
        }
    }

    fn expect_hello(&self) {
        let frame = self.recv();
        assert_eq!(
            frame.msg,
            AgentMsg::Hello {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                protocol: hearth_proto::PROTOCOL_VERSION
            }
        );
    }

    fn expect_init_done(&self) -> String {
        let (frame, logs) = self.next_event();
        match frame.msg {
            AgentMsg::InitDone { init_ms } => assert!(init_ms > 0.0 && init_ms < 20_000.0),
            other => panic!("expected InitDone, got {other:?} (logs: {logs})"),
        }
        logs
    }

    /// The agent closes stdout (no frame may follow) and exits.
    fn expect_end(&mut self) -> ExitStatus {
        match self.frames.recv_timeout(TIMEOUT) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok(frame) => panic!("unexpected frame {:?}", frame.msg),
            Err(RecvTimeoutError::Timeout) => panic!("the agent did not close its stdout"),
        }
        self.wait()
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.addr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Closing stdin makes the agent stop its runtime; kill it if that does not work.
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client for poking the Runtime API directly.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

impl Client {
    fn connect(addr: &str) -> Client {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        Client {
            r: BufReader::new(stream.try_clone().expect("clone")),
            w: stream,
        }
    }

    fn send_raw(&mut self, raw: &[u8]) {
        self.w.write_all(raw).expect("send");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read line");
        line.trim_end().to_string()
    }

    fn response(&mut self) -> Resp {
        let status_line = self.line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header");
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if status < 200 {
            return resp; // interim response: no body
        }
        let len: usize = resp
            .header("content-length")
            .expect("content-length")
            .parse()
            .expect("length");
        resp.body.resize(len, 0);
        self.r.read_exact(&mut resp.body).expect("body");
        resp
    }

    fn request(&mut self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Resp {
        let mut raw = format!(
            "{method} /2018-06-01/runtime/{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            raw.push_str(h);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        self.send_raw(&raw);
        self.response()
    }

    /// True if the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

fn error_type(resp: &Resp) -> String {
    resp.json()["errorType"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn invocations_round_trip_with_headers_and_ordered_logs() {
    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    let logs = agent.expect_init_done();
    // The environment: Lambda variables pass through, HEARTH_* do not, cwd is the task root.
    assert!(logs.contains("handler=app.handler"), "{logs}");
    assert!(logs.contains(&format!("api={}", agent.addr)), "{logs}");
    assert!(logs.contains("hearth_vars=0"), "{logs}");
    assert!(
        logs.contains(&format!("cwd={}", agent.task_root.display())),
        "{logs}"
    );
    assert!(logs.contains("init on stderr"), "{logs}");

    for id in ["req-1", "req-2"] {
        let event = json!({"mode": "echo", "id": id, "payload": "x".repeat(1000)});
        agent.invoke(id, &event);
        let (frame, logs) = agent.next_event();
        assert_eq!(
            frame.msg,
            AgentMsg::Response {
                request_id: id.into()
            },
            "logs: {logs}"
        );
        let body: Value = serde_json::from_slice(&frame.body).expect("JSON response");
        assert_eq!(body, event);

        // Every line the runtime wrote before posting came before the Response frame.
        for i in 0..3000 {
            assert!(logs.contains(&format!("log line {i} of {id} ")), "line {i}");
        }
        assert!(logs.contains(&format!("stderr line for {id}")));
        assert!(logs.contains(&format!("last line before the response of {id}")));

        // Headers of `next`, as dumped by curl.
        for header in [
            "Content-Type: application/json".to_string(),
            format!("Lambda-Runtime-Aws-Request-Id: {id}"),
            "Lambda-Runtime-Deadline-Ms: 1700000000123".into(),
            "Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:f"
                .into(),
            "Lambda-Runtime-Trace-Id: Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1".into(),
            "Lambda-Runtime-Client-Context: eyJjdXN0b20iOnt9fQ==".into(),
            r#"Lambda-Runtime-Cognito-Identity: {"cognitoIdentityId":"id"}"#.into(),
        ] {
            assert!(logs.contains(&header), "missing {header:?} in {logs}");
        }
    }
}

#[test]
fn function_errors_via_the_error_endpoint() {
    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.expect_init_done();

    agent.invoke("e-1", &json!({"mode": "error"}));
    let (frame, logs) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::FunctionError {
            request_id: "e-1".into(),
            error_type: "MyError".into()
        }
    );
    assert!(
        logs.contains("failing e-1"),
        "logs before the error: {logs}"
    );
    let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
    assert_eq!(
        doc,
        json!({"errorMessage": "boom", "errorType": "MyError", "stackTrace": []})
    );

    // No header, not JSON: wrapped into an error document of type Unhandled.
    agent.invoke("e-2", &json!({"mode": "error-text"}));
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::FunctionError {
            request_id: "e-2".into(),
            error_type: "Unhandled".into()
        }
    );
    let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
    assert_eq!(
        doc,
        json!({"errorMessage": "plain failure", "errorType": "Unhandled"})
    );
}

#[test]
fn wrong_request_id_is_400_and_double_response_is_403() {
    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.expect_init_done();

    agent.invoke("p-1", &json!({"mode": "probe"}));
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::Response {
            request_id: "p-1".into()
        }
    );
    assert_eq!(frame.body, b"\"first\"", "only the first answer counts");

    // The status codes the runtime saw are logged before its next response.
    agent.invoke("p-2", &json!({"mode": "echo"}));
    let (frame, logs) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::Response { .. }));
    assert!(
        logs.contains("probe wrong=400 first=202 second=403 initerr=403"),
        "{logs}"
    );
}

#[test]
fn init_error_is_forwarded_and_then_the_runtime_exits() {
    let script = r#"#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
post() { curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' "$@"; }
echo "about to fail init"
first=$(post -H 'Lambda-Runtime-Function-Error-Type: Runtime.ConfigError' \
  --data-binary '{"errorMessage":"bad config","errorType":"Runtime.ConfigError"}' "$API/init/error")
second=$(post --data-binary '{}' "$API/init/error")
next=$(curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' "$API/invocation/next")
echo "codes $first $second $next"
exit 1
"#;
    let mut agent = Agent::start(Some(script), &[]);
    agent.expect_hello();
    let (frame, logs) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::InitError {
            error_type: "Runtime.ConfigError".into()
        }
    );
    assert!(logs.contains("about to fail init"), "{logs}");
    let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
    assert_eq!(
        doc,
        json!({"errorMessage": "bad config", "errorType": "Runtime.ConfigError"})
    );
    let (frame, logs) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "exit status 1".into()
        }
    );
    assert!(logs.contains("codes 202 403 403"), "{logs}");
    assert!(agent.expect_end().success());
}

#[test]
fn runtime_exiting_before_next_is_an_init_error() {
    let mut agent = Agent::start(Some("#!/bin/sh\necho dying\nexit 2\n"), &[]);
    agent.expect_hello();
    let (frame, logs) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::InitError {
            error_type: "Runtime.ExitError".into()
        }
    );
    assert!(logs.contains("dying"));
    let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
    assert_eq!(
        doc,
        json!({"errorMessage": "Runtime exited with error: exit status 2", "errorType": "Runtime.ExitError"})
    );
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "exit status 2".into()
        }
    );
    assert!(agent.expect_end().success());
}

#[test]
fn runtime_exiting_mid_invocation() {
    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.expect_init_done();
    agent.invoke("x-1", &json!({"mode": "exit"}));
    let (frame, logs) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "exit status 3".into()
        }
    );
    assert!(logs.contains("exiting mid-invocation"), "{logs}");
    assert!(agent.expect_end().success());

    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.expect_init_done();
    agent.invoke("x-2", &json!({"mode": "kill"}));
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "signal: killed".into()
        }
    );
    assert!(agent.expect_end().success());
}

#[test]
fn missing_or_non_executable_bootstrap_is_an_invalid_entrypoint() {
    if std::path::Path::new("/opt/bootstrap").exists() {
        eprintln!("skipped: /opt/bootstrap exists on this machine");
        return;
    }
    // Missing, and present but not executable (skipped like a missing one).
    for script in [None, Some("#!/bin/sh\n")] {
        let mut agent = Agent::start_with_mode(script, 0o644, &[]);
        agent.expect_hello();
        let frame = agent.recv();
        assert_eq!(
            frame.msg,
            AgentMsg::InitError {
                error_type: "Runtime.InvalidEntrypoint".into()
            }
        );
        let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
        assert_eq!(doc["errorType"], "Runtime.InvalidEntrypoint");
        let message = doc["errorMessage"].as_str().expect("message");
        assert!(
            message.starts_with("Couldn't find valid bootstrap(s): [")
                && message.contains("/task/bootstrap /opt/bootstrap ")
                && message.contains("/runtime/bootstrap]"),
            "{message}"
        );
        agent.send(HostMsg::Shutdown, b"");
        assert!(agent.expect_end().success());
    }
}

#[test]
fn shutdown_and_stdin_eof_stop_the_runtime() {
    // Shutdown frame: the runtime (waiting in `next`) gets SIGTERM.
    let mut agent = Agent::start(Some(CURL_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.expect_init_done();
    agent.send(HostMsg::Shutdown, b"");
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "signal: terminated".into()
        }
    );
    assert!(agent.expect_end().success());

    // Stdin EOF, with a runtime that ignores SIGTERM: SIGKILL after the grace period.
    let script = "#!/bin/sh\ntrap '' TERM\necho ready\nwhile true; do sleep 0.05; done\n";
    let mut agent = Agent::start(Some(script), &[]);
    agent.expect_hello();
    let frame = agent.recv();
    assert_eq!(
        (frame.msg, frame.body),
        (AgentMsg::Log, b"ready\n".to_vec())
    );
    let t = Instant::now();
    agent.stdin.take();
    let (frame, _) = agent.next_event();
    // It never called `next`, so its exit also ends init.
    assert_eq!(
        frame.msg,
        AgentMsg::InitError {
            error_type: "Runtime.ExitError".into()
        }
    );
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::RuntimeExit {
            status: "signal: killed".into()
        }
    );
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    assert!(agent.expect_end().success());
}

#[test]
fn runtime_api_state_rules_over_raw_http() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let mut c = agent.client();

    // Before any invocation: unknown request id.
    let r = c.request("POST", "invocation/nope/response", &[], b"{}");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"errorMessage": "Invalid request ID", "errorType": "InvalidRequestID"})
    );

    // Two pipelined requests on one keep-alive connection: 404 and 405.
    c.send_raw(
        b"GET /2018-06-01/runtime/nowhere HTTP/1.1\r\nHost: x\r\n\r\n\
          DELETE /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(c.response().status, 404);
    let r = c.response();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    assert_eq!(c.request("GET", "init/error", &[], b"").status, 405);

    // Not a SnapStart sandbox.
    let r = c.request("GET", "restore/next", &[], b"");
    assert_eq!(r.status, 403);
    assert_eq!(error_type(&r), "Runtime.NotASnapshot");

    // An invocation queued before `next` is handed out at once; the first `next` ends init.
    agent.invoke("r-1", &json!({"hello": "world"}));
    let r = c.request("GET", "invocation/next", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"hello": "world"}));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("r-1"));
    assert_eq!(
        r.header("lambda-runtime-deadline-ms"),
        Some("1700000000123")
    );
    agent.expect_init_done();

    // While r-1 is unanswered: another `next` and a late init/error are invalid.
    let mut c2 = agent.client();
    let r = c2.request("GET", "invocation/next", &[], b"");
    assert_eq!(
        (r.status, error_type(&r).as_str()),
        (403, "InvalidStateTransition")
    );
    let r = c2.request("POST", "init/error", &[], b"{}");
    assert_eq!(
        (r.status, error_type(&r).as_str()),
        (403, "InvalidStateTransition")
    );
    assert_eq!(
        c2.request("POST", "invocation/r-2/response", &[], b"{}")
            .status,
        400
    );

    // A chunked response body.
    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/r-1/response HTTP/1.1\r\nHost: x\r\n\
          Transfer-Encoding: chunked\r\n\r\n6\r\n{\"ok\":\r\n5\r\ntrue}\r\n0\r\n\r\n",
    );
    let r = c.response();
    assert_eq!((r.status, r.json()), (202, json!({"status": "OK"})));
    let frame = agent.recv();
    assert_eq!(
        frame.msg,
        AgentMsg::Response {
            request_id: "r-1".into()
        }
    );
    assert_eq!(frame.body, br#"{"ok":true}"#);

    // Answering twice, or with an error after the response.
    let r = c.request("POST", "invocation/r-1/response", &[], b"{}");
    assert_eq!(
        (r.status, error_type(&r).as_str()),
        (403, "InvalidStateTransition")
    );
    let r = c.request("POST", "invocation/r-1/error", &[], b"{}");
    assert_eq!(r.status, 403);

    // Malformed HTTP: 400, then the connection is closed.
    let mut bad = agent.client();
    bad.send_raw(b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(bad.response().status, 400);
    assert!(bad.closed());

    // No frames were caused by the rejected requests.
    assert!(
        agent
            .frames
            .recv_timeout(Duration::from_millis(200))
            .is_err()
    );
}

#[test]
fn a_waiting_next_gets_the_invocation_on_its_own_connection() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let next = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n";

    // A `next` whose connection closes while it waits is forgotten: the invocation goes to the
    // runtime's next `next`, on another connection.
    let mut gone = agent.client();
    gone.send_raw(next);
    agent.expect_init_done();
    drop(gone);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = agent.client();
    c.send_raw(next);
    std::thread::sleep(Duration::from_millis(100));
    agent.invoke("p-1", &json!({"n": 1}));
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("p-1"));
    assert_eq!(r.json(), json!({"n": 1}));
    let r = c.request("POST", "invocation/p-1/response", &[], b"1");
    assert_eq!(r.status, 202);
    assert_eq!(
        agent.recv().msg,
        AgentMsg::Response {
            request_id: "p-1".into()
        }
    );

    // Two `next`s waiting at once on two connections: each gets one invocation, and the
    // second only once the first is answered.
    c.send_raw(next);
    let mut c2 = agent.client();
    c2.send_raw(next);
    std::thread::sleep(Duration::from_millis(100));
    agent.invoke("p-2", &json!({"n": 2}));
    agent.invoke("p-3", &json!({"n": 3}));
    let r = c.response();
    assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("p-2"));
    assert_eq!(
        c.request("POST", "invocation/p-2/response", &[], b"2")
            .status,
        202
    );
    let r = c2.response();
    assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("p-3"));
    assert_eq!(
        c2.request("POST", "invocation/p-3/response", &[], b"3")
            .status,
        202
    );
    for id in ["p-2", "p-3"] {
        assert_eq!(
            agent.recv().msg,
            AgentMsg::Response {
                request_id: id.into()
            }
        );
    }

    // A waiting `next` that asked to close its connection gets its invocation, then the close.
    let mut once = agent.client();
    once.send_raw(
        b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    std::thread::sleep(Duration::from_millis(100));
    agent.invoke("p-4", &json!({"n": 4}));
    let r = once.response();
    assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("p-4"));
    assert!(once.closed());
    assert_eq!(
        c.request("POST", "invocation/p-4/response", &[], b"4")
            .status,
        202
    );
    assert_eq!(
        agent.recv().msg,
        AgentMsg::Response {
            request_id: "p-4".into()
        }
    );
}

#[test]
fn oversized_response_fails_the_invocation() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let mut c = agent.client();
    agent.invoke("big-1", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    agent.expect_init_done();

    let body = vec![b'a'; hearth_proto::MAX_SYNC_PAYLOAD + 1];
    let r = c.request("POST", "invocation/big-1/response", &[], &body);
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    let frame = agent.recv();
    assert_eq!(
        frame.msg,
        AgentMsg::FunctionError {
            request_id: "big-1".into(),
            error_type: "Function.ResponseSizeTooLarge".into()
        }
    );
    let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
    assert_eq!(doc["errorType"], "Function.ResponseSizeTooLarge");
    assert!(
        doc["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("exceeded maximum allowed payload size")),
        "{doc}"
    );

    // With `Expect: 100-continue` the body is refused before it is sent.
    agent.invoke("big-2", &json!({}));
    let mut c = agent.client();
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/big-2/response HTTP/1.1\r\nHost: x\r\n\
          Content-Length: 7000000\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(c.response().status, 413);
    assert!(matches!(
        agent.recv().msg,
        AgentMsg::FunctionError { error_type, .. } if error_type == "Function.ResponseSizeTooLarge"
    ));

    // A body under the limit with `Expect: 100-continue` gets the interim response first.
    agent.invoke("ok-3", &json!({}));
    assert_eq!(c_next(&agent), "ok-3");
    let mut c = agent.client();
    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/ok-3/response HTTP/1.1\r\nHost: x\r\n\
          Content-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(c.response().status, 100);
    c.send_raw(b"{}");
    assert_eq!(c.response().status, 202);
    assert_eq!(
        agent.recv().msg,
        AgentMsg::Response {
            request_id: "ok-3".into()
        }
    );
}

/// Take the next invocation on a fresh connection; returns its request id.
fn c_next(agent: &Agent) -> String {
    let r = agent.client().request("GET", "invocation/next", &[], b"");
    assert_eq!(r.status, 200);
    r.header("lambda-runtime-aws-request-id")
        .expect("request id")
        .to_string()
}

#[test]
fn snap_start_restore_hooks() {
    let mut agent = Agent::start(
        Some(IDLE_BOOTSTRAP),
        &[("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")],
    );
    agent.expect_hello();

    let addr = agent.addr.clone();
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let r = Client::connect(&addr).request("GET", "restore/next", &[], b"");
        let _ = tx.send(r);
    });
    assert_eq!(agent.recv().msg, AgentMsg::RestoreReady);
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "restore/next must block until the worker restores"
    );
    agent.send(HostMsg::Restore, b"");
    let r = done.recv_timeout(TIMEOUT).expect("restore/next answered");
    assert_eq!((r.status, r.body.len()), (200, 0));

    let mut c = agent.client();
    let r = c.request(
        "POST",
        "restore/error",
        &["Lambda-Runtime-Function-Error-Type: Runtime.AfterRestoreError"],
        br#"{"errorMessage":"hook failed"}"#,
    );
    assert_eq!(r.status, 202);
    let frame = agent.recv();
    assert_eq!(
        frame.msg,
        AgentMsg::RestoreError {
            error_type: "Runtime.AfterRestoreError".into()
        }
    );
    assert_eq!(frame.body, br#"{"errorMessage":"hook failed"}"#);

    // Then the normal flow; restore/next is over once init is.
    agent.invoke("s-1", &json!({}));
    assert_eq!(c_next(&agent), "s-1");
    agent.expect_init_done();
    let r = c.request("GET", "restore/next", &[], b"");
    assert_eq!(r.status, 403);
}

#[test]
fn malformed_frame_from_the_worker_exits_1() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let stdin = agent.stdin.as_mut().expect("stdin");
    stdin.write_all(b"\x09garbage-frame").expect("write");
    stdin.flush().expect("flush");
    assert_eq!(agent.wait().code(), Some(1));
}

/// [`CURL_BOOTSTRAP`] that first leaves a mark next to itself and shows what it was given.
fn configured_bootstrap() -> String {
    CURL_BOOTSTRAP.replacen(
        "#!/bin/sh\n",
        "#!/bin/sh\ntouch \"$(dirname \"$0\")/started\"\n\
         echo \"configured: greeting=$GREETING own=${PROCESS_ONLY:-unset} root=$LAMBDA_TASK_ROOT\"\n",
        1,
    )
}

#[test]
fn deferred_start_runs_the_runtime_with_the_configured_environment() {
    let mut agent = Agent::start_deferred(Some(&configured_bootstrap()), &[]);
    agent.expect_hello();
    // Nothing starts before Configure.
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.frames.try_recv().is_err(), "a frame before configure");
    assert!(!agent.task_root.join("started").exists(), "runtime started");

    let sent = Instant::now();
    agent.configure(&[("GREETING", "hello from configure")]);
    let (frame, logs) = agent.next_event();
    let since_configure_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let AgentMsg::InitDone { init_ms } = frame.msg else {
        panic!("expected InitDone, got {:?} (logs: {logs})", frame.msg);
    };
    // Timed from Configure, not from the agent's start a second earlier.
    assert!(
        init_ms > 0.0 && init_ms <= since_configure_ms,
        "init {init_ms} ms, configure sent {since_configure_ms} ms ago"
    );
    // Only the configured environment reaches the runtime, minus HEARTH_*, plus the API.
    let root = agent.task_root.display();
    assert!(
        logs.contains(&format!(
            "configured: greeting=hello from configure own=unset root={root}"
        )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "init: handler=function.handler cwd={root} api={} hearth_vars=0",
            agent.addr
        )),
        "{logs}"
    );

    // From here on as always.
    let event = json!({"mode": "echo", "id": "d-1"});
    agent.invoke("d-1", &event);
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::Response {
            request_id: "d-1".into()
        }
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&frame.body).expect("JSON"),
        event
    );
    agent.send(HostMsg::Shutdown, b"");
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::RuntimeExit { .. }));
    assert!(agent.expect_end().success());
}

#[test]
fn deferred_agent_refuses_a_first_frame_other_than_configure() {
    let bootstrap = configured_bootstrap();
    type FirstFrame = fn(&mut Agent);
    let refusals: [(&str, FirstFrame); 3] = [
        ("invoke", |a| a.invoke("early", &json!({}))),
        ("restore", |a| a.send(HostMsg::Restore, b"")),
        ("a bad entry", |a| {
            let env = vec!["GOOD=1".into(), "NO_VALUE".into()];
            a.send(HostMsg::Configure(SandboxConfig { env }), b"");
        }),
    ];
    for (what, first) in refusals {
        let mut agent = Agent::start_deferred(Some(&bootstrap), &[]);
        agent.expect_hello();
        first(&mut agent);
        let frame = agent.recv();
        assert_eq!(
            frame.msg,
            AgentMsg::InitError {
                error_type: "Sandbox.NotConfigured".into()
            },
            "{what}"
        );
        let doc: Value = serde_json::from_slice(&frame.body).expect("JSON");
        assert_eq!(doc["errorType"], "Sandbox.NotConfigured");
        assert!(
            doc["errorMessage"]
                .as_str()
                .is_some_and(|m| m.starts_with("hearth sandbox not configured: ")),
            "{doc}"
        );
        assert_eq!(agent.expect_end().code(), Some(1), "{what}");
        assert!(!agent.task_root.join("started").exists(), "{what}");
    }

    // Shut down, or its stdin closed, before it was configured: a quiet exit 0.
    let mut agent = Agent::start_deferred(Some(&bootstrap), &[]);
    agent.expect_hello();
    agent.send(HostMsg::Shutdown, b"");
    assert!(agent.expect_end().success());
    let mut agent = Agent::start_deferred(Some(&bootstrap), &[]);
    agent.expect_hello();
    agent.stdin.take();
    assert!(agent.expect_end().success());
    assert!(!agent.task_root.join("started").exists());

    // A malformed first frame exits 1, as it does later.
    let mut agent = Agent::start_deferred(Some(&bootstrap), &[]);
    agent.expect_hello();
    let stdin = agent.stdin.as_mut().expect("stdin");
    stdin.write_all(b"\x09garbage-frame").expect("write");
    stdin.flush().expect("flush");
    assert_eq!(agent.expect_end().code(), Some(1));

    // Configure is the first frame or none: a second one, or one to a direct start, is a
    // protocol error.
    let mut agent = Agent::start_deferred(Some(&bootstrap), &[]);
    agent.expect_hello();
    agent.configure(&[]);
    agent.expect_init_done();
    agent.configure(&[]);
    assert_eq!(agent.wait().code(), Some(1));
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.configure(&[]);
    assert_eq!(agent.wait().code(), Some(1));
}

#[test]
fn deferred_snap_start_mode_comes_from_the_configured_environment() {
    // The agent's own environment says SnapStart, the configuration does not: no hooks.
    let mut agent = Agent::start_deferred(
        Some(IDLE_BOOTSTRAP),
        &[("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")],
    );
    agent.expect_hello();
    agent.configure(&[("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")]);
    let r = agent.client().request("GET", "restore/next", &[], b"");
    assert_eq!(
        (r.status, error_type(&r).as_str()),
        (403, "Runtime.NotASnapshot")
    );

    // Configured for SnapStart: restore/next waits for the worker's Restore.
    let mut agent = Agent::start_deferred(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    agent.configure(&[("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")]);
    let addr = agent.addr.clone();
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let r = Client::connect(&addr).request("GET", "restore/next", &[], b"");
        let _ = tx.send(r);
    });
    assert_eq!(agent.recv().msg, AgentMsg::RestoreReady);
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "restore/next must block until the worker restores"
    );
    agent.send(HostMsg::Restore, b"");
    let r = done.recv_timeout(TIMEOUT).expect("restore/next answered");
    assert_eq!((r.status, r.body.len()), (200, 0));

    agent.invoke("s-1", &json!({}));
    assert_eq!(c_next(&agent), "s-1");
    agent.expect_init_done();
}

/// A prestart that records its pid and start, reads the configuration from fd 3, declines it
/// when it has `DECLINE=1`, and otherwise answers `y` and becomes the runtime directory's
/// bootstrap with exactly the configured environment.
const TEST_PRESTART: &str = r#"#!/bin/bash
echo $$ > "$PRESTART_MARK/pid"
echo "$AWS_LAMBDA_RUNTIME_API" > "$PRESTART_MARK/api"
sleep 0.3
printf r >&4
mapfile -d '' -t vars <&3
for kv in "${vars[@]}"; do
  [ "$kv" = DECLINE=1 ] && { printf 'nthe test says so' >&4; exit 0; }
done
printf y >&4
exec 3<&- 4>&-
echo "prestart took over: pid=$$"
exec env -i "${vars[@]}" "$(dirname "$0")/bootstrap"
"#;

impl Agent {
    /// A deferred agent whose runtime directory holds [`TEST_PRESTART`] and, as its bootstrap,
    /// [`configured_bootstrap`]; the task root holds `task_bootstrap` if given.
    fn start_prestarted(task_bootstrap: Option<&str>) -> (Agent, PathBuf) {
        let (dir, task_root) = task_dir(task_bootstrap, 0o755);
        let runtime = dir.path().join("runtime");
        let mark = dir.path().join("mark");
        std::fs::create_dir_all(&mark).expect("mark dir");
        std::fs::create_dir_all(&runtime).expect("runtime dir");
        for (name, script) in [
            ("prestart", TEST_PRESTART.to_string()),
            ("bootstrap", configured_bootstrap()),
        ] {
            let path = runtime.join(name);
            std::fs::write(&path, script).expect("write script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth-agent"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HEARTH_AGENT_DEFER", "1")
            .env("LAMBDA_RUNTIME_DIR", &runtime)
            .env("PRESTART_MARK", &mark)
            .env("PROCESS_ONLY", "from the agent's own environment");
        (Agent::launch(cmd, dir, task_root), mark)
    }
}

/// The prestart's pid, once it has started (before any configuration).
fn prestart_pid(mark: &std::path::Path) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(mark.join("pid"))
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the prestart did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is gone (or a zombie nobody waits for: not ours to reap, so count it gone).
fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if state.is_empty() || zombie {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_prestarted_runtime_starts_before_configure_and_becomes_the_runtime() {
    let (mut agent, mark) = Agent::start_prestarted(None);
    agent.expect_hello();
    // Hello came once the prestart had loaded; it started with the agent's own platform
    // variables and the API address, before Configure.
    let pid: i32 = std::fs::read_to_string(mark.join("pid"))
        .expect("the prestart ran before Hello")
        .trim()
        .parse()
        .expect("pid");
    let api = std::fs::read_to_string(mark.join("api")).expect("api file");
    assert_eq!(api.trim(), agent.addr);
    assert!(!agent.task_root.join("started").exists());

    agent.configure(&[("GREETING", "hello prestart")]);
    let logs = agent.expect_init_done();
    // The same process took over, and runs with the configured environment only.
    assert!(
        logs.contains(&format!("prestart took over: pid={pid}")),
        "{logs}"
    );
    let root = agent.task_root.display().to_string();
    assert!(
        logs.contains(&format!(
            "configured: greeting=hello prestart own=unset root={root}"
        )),
        "{logs}"
    );
    assert!(logs.contains("hearth_vars=0"), "{logs}");
    let event = json!({"mode": "echo", "id": "p-1"});
    agent.invoke("p-1", &event);
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::Response {
            request_id: "p-1".into()
        }
    );
    agent.send(HostMsg::Shutdown, b"");
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::RuntimeExit { .. }));
    assert!(agent.expect_end().success());
    assert!(gone(pid));
}

#[test]
fn a_declined_or_overridden_prestart_is_killed_and_the_bootstrap_starts_fresh() {
    // Declined: the runtime directory's bootstrap starts as a new process.
    let (mut agent, mark) = Agent::start_prestarted(None);
    agent.expect_hello();
    let pid = prestart_pid(&mark);
    agent.configure(&[("GREETING", "fresh"), ("DECLINE", "1")]);
    let logs = agent.expect_init_done();
    assert!(!logs.contains("prestart took over"), "{logs}");
    assert!(
        logs.contains("configured: greeting=fresh own=unset"),
        "{logs}"
    );
    assert!(gone(pid), "the declined prestart is still running");
    agent.send(HostMsg::Shutdown, b"");
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::RuntimeExit { .. }));
    assert!(agent.expect_end().success());

    // A bootstrap in the task root takes precedence: the prestart is not asked at all.
    let task_bootstrap =
        configured_bootstrap().replacen("#!/bin/sh\n", "#!/bin/sh\necho \"task bootstrap\"\n", 1);
    let (mut agent, mark) = Agent::start_prestarted(Some(&task_bootstrap));
    agent.expect_hello();
    let pid = prestart_pid(&mark);
    agent.configure(&[("GREETING", "task")]);
    let logs = agent.expect_init_done();
    assert!(logs.contains("task bootstrap"), "{logs}");
    assert!(!logs.contains("prestart took over"), "{logs}");
    assert!(gone(pid), "the unused prestart is still running");
    agent.send(HostMsg::Shutdown, b"");
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::RuntimeExit { .. }));
    assert!(agent.expect_end().success());

    // Shut down before any configuration: the prestart goes with the agent.
    let (mut agent, mark) = Agent::start_prestarted(None);
    agent.expect_hello();
    let pid = prestart_pid(&mark);
    agent.send(HostMsg::Shutdown, b"");
    assert!(agent.expect_end().success());
    assert!(gone(pid), "the prestart outlived its agent");
}

/// The frames that follow, up to and including the first that is not a `StreamChunk` or `Log`;
/// chunk bodies in the order they came.
fn stream_frames(agent: &Agent) -> (Vec<Vec<u8>>, Frame<AgentMsg>) {
    let mut chunks = Vec::new();
    loop {
        let (frame, _) = agent.next_event();
        match frame.msg {
            AgentMsg::StreamChunk { .. } => chunks.push(frame.body),
            _ => return (chunks, frame),
        }
    }
}

#[test]
fn streamed_responses_are_forwarded_as_they_arrive() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let mut c = agent.client();
    agent.invoke("s-1", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    agent.expect_init_done();

    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/s-1/response HTTP/1.1\r\nHost: x\r\n\
          Lambda-Runtime-Function-Response-Mode: streaming\r\nContent-Type: text/plain\r\n\
          Transfer-Encoding: chunked\r\n\
          Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\
          \r\n6\r\nfirst ",
    );
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::StreamStart {
            request_id: "s-1".into(),
            content_type: Some("text/plain".into())
        }
    );
    // The first chunk reaches the worker while the request is still open.
    let (frame, _) = agent.next_event();
    assert_eq!(
        (frame.msg, frame.body),
        (
            AgentMsg::StreamChunk {
                request_id: "s-1".into()
            },
            b"first ".to_vec()
        )
    );
    c.send_raw(b"\r\n6\r\nsecond\r\n0\r\n\r\n");
    let (chunks, end) = stream_frames(&agent);
    assert_eq!(chunks.concat(), b"second");
    assert_eq!(
        end.msg,
        AgentMsg::StreamEnd {
            request_id: "s-1".into()
        }
    );
    let r = c.response();
    assert_eq!(r.status, 202);

    // An error in the trailers after some bytes: a function error with the decoded document.
    agent.invoke("s-2", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/s-2/response HTTP/1.1\r\nHost: x\r\n\
          Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n\r\n\
          4\r\npart\r\n0\r\nLambda-Runtime-Function-Error-Type: Stream.Broke\r\n\
          Lambda-Runtime-Function-Error-Body: eyJlcnJvck1lc3NhZ2UiOiJtaWQtc3RyZWFtIn0=\r\n\r\n",
    );
    let (frame, _) = agent.next_event();
    assert!(matches!(
        frame.msg,
        AgentMsg::StreamStart {
            content_type: None,
            ..
        }
    ));
    let (chunks, end) = stream_frames(&agent);
    assert_eq!(chunks.concat(), b"part");
    assert_eq!(
        end.msg,
        AgentMsg::FunctionError {
            request_id: "s-2".into(),
            error_type: "Stream.Broke".into()
        }
    );
    let doc: Value = serde_json::from_slice(&end.body).expect("JSON");
    assert_eq!(doc, json!({"errorMessage": "mid-stream"}));
    assert_eq!(c.response().status, 202);

    // A stream broken off (the runtime's connection closes mid-body): truncated.
    agent.invoke("s-3", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    let mut c3 = agent.client();
    c3.send_raw(
        b"POST /2018-06-01/runtime/invocation/s-3/response HTTP/1.1\r\nHost: x\r\n\
          Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n\r\n\
          9\r\nincom",
    );
    drop(c3);
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::StreamStart { .. }));
    let (chunks, end) = stream_frames(&agent);
    assert_eq!(chunks.concat(), b"incom");
    assert_eq!(
        end.msg,
        AgentMsg::FunctionError {
            request_id: "s-3".into(),
            error_type: "Runtime.TruncatedResponse".into()
        }
    );

    // A buffered (not streamed) response with an error trailer is a function error too.
    agent.invoke("s-4", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    c.send_raw(
        b"POST /2018-06-01/runtime/invocation/s-4/response HTTP/1.1\r\nHost: x\r\n\
          Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\
          Lambda-Runtime-Function-Error-Type: Reader.Failed\r\n\r\n",
    );
    assert_eq!(c.response().status, 202);
    let (frame, _) = agent.next_event();
    assert_eq!(
        frame.msg,
        AgentMsg::FunctionError {
            request_id: "s-4".into(),
            error_type: "Reader.Failed".into()
        }
    );
}

#[test]
fn streamed_responses_past_the_limit_fail_the_invocation() {
    let mut agent = Agent::start(Some(IDLE_BOOTSTRAP), &[]);
    agent.expect_hello();
    let mut c = agent.client();
    agent.invoke("l-1", &json!({}));
    assert_eq!(c.request("GET", "invocation/next", &[], b"").status, 200);
    agent.expect_init_done();
    let total = hearth_proto::MAX_STREAM_PAYLOAD + 1;
    let mut raw = format!(
        "POST /2018-06-01/runtime/invocation/l-1/response HTTP/1.1\r\nHost: x\r\n\
         Lambda-Runtime-Function-Response-Mode: streaming\r\nContent-Length: {total}\r\n\r\n"
    )
    .into_bytes();
    raw.resize(raw.len() + total, b'z');
    // Written from another thread: the agent stops reading at the limit.
    let mut w = c.w.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&raw);
    });
    let (frame, _) = agent.next_event();
    assert!(matches!(frame.msg, AgentMsg::StreamStart { .. }));
    let (chunks, end) = stream_frames(&agent);
    // Everything up to the limit was forwarded; the piece that crossed it was not.
    let forwarded: usize = chunks.iter().map(Vec::len).sum();
    let max = hearth_proto::MAX_STREAM_PAYLOAD;
    assert!(
        forwarded <= max && forwarded > max - hearth_proto::STREAM_CHUNK,
        "{forwarded}"
    );
    assert!(chunks.iter().all(|c| c.len() <= hearth_proto::STREAM_CHUNK));
    assert_eq!(
        end.msg,
        AgentMsg::FunctionError {
            request_id: "l-1".into(),
            error_type: "Function.ResponseSizeTooLarge".into()
        }
    );
    assert_eq!(c.response().status, 413);
    drop(c);
    let _ = writer.join();
}
