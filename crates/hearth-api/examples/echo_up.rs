//! The Lambda API with an echo invoker instead of sandboxes: for trying boto3 and the AWS CLI
//! against the front end on a machine without runsc or runtime images.
//!
//! It takes `hearth up`'s flags (`--data-dir`, `--listen`, `--region`, `--account-concurrency`;
//! others are ignored) and writes `<data-dir>/client.env` like `hearth up`, so the e2e fixtures
//! can start it in place of the real binary (`HEARTH_BIN=target/debug/examples/echo_up`).
//! Every invocation returns its payload (a handler that returns its event), except a payload
//! with `"fail"` set, which fails as the function with that message.
//!
//! ```text
//! cargo run -p hearth-api --example echo_up -- up --data-dir /tmp/h --listen 127.0.0.1:9000
//! ```

use std::sync::Arc;

use hearth_api::invoker::{InvokeError, InvokeRequest, InvokeResult, Invoker};
use hearth_api::{ApiConfig, AppState, serve};

struct Echo;

#[async_trait::async_trait]
impl Invoker for Echo {
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        let id = uuid::Uuid::new_v4();
        let fail = serde_json::from_slice::<serde_json::Value>(&req.payload)
            .ok()
            .and_then(|v| v.get("fail").filter(|f| !f.is_null()).cloned());
        let log = format!(
            "START RequestId: {id} Version: {}\necho {} bytes\nEND RequestId: {id}\n\
             REPORT RequestId: {id}\tDuration: 0.10 ms\tBilled Duration: 1 ms\tMemory Size: {} MB\n",
            req.spec.version,
            req.payload.len(),
            req.spec.memory_mb
        );
        if let Some(message) = fail {
            let doc = serde_json::json!({
                "errorMessage": message.as_str().map_or_else(|| message.to_string(), str::to_string),
                "errorType": "Exception",
                "stackTrace": [],
            });
            return Ok(InvokeResult {
                payload: doc.to_string().into_bytes(),
                function_error: true,
                log,
            });
        }
        let payload = if req.payload.is_empty() {
            b"null".to_vec()
        } else {
            req.payload.to_vec()
        };
        Ok(InvokeResult {
            payload,
            function_error: false,
            log,
        })
    }

    fn retire(&self, _function_name: &str) {}
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut data_dir = std::path::PathBuf::from("hearth-data");
    let mut listen = "127.0.0.1:9000".to_string();
    let mut config_region = "us-east-1".to_string();
    let mut concurrency = 1000u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data-dir" => data_dir = args.next().ok_or("--data-dir needs a value")?.into(),
            "--listen" => listen = args.next().ok_or("--listen needs a value")?,
            "--region" => config_region = args.next().ok_or("--region needs a value")?,
            "--account-concurrency" => {
                concurrency = args
                    .next()
                    .ok_or("--account-concurrency needs a value")?
                    .parse()?;
            }
            _ => {}
        }
    }
    let (key, secret) = (
        "AKIDHEARTHECHO".to_string(),
        "hearth-echo-secret".to_string(),
    );
    let mut config = ApiConfig::new(&data_dir);
    config.region = config_region.clone();
    config.credentials = vec![(key.clone(), secret.clone())];
    config.account_concurrency = concurrency;
    let state = AppState::new(config, Arc::new(Echo)).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    std::fs::write(
        data_dir.join("client.env"),
        format!(
            "export AWS_ENDPOINT_URL={endpoint}\nexport AWS_ACCESS_KEY_ID={key}\n\
             export AWS_SECRET_ACCESS_KEY={secret}\nexport AWS_DEFAULT_REGION={config_region}\n"
        ),
    )?;
    println!("echo api on {endpoint}");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    serve(listener, state, shutdown).await?;
    Ok(())
}
