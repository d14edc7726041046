//! `serve` on a real listener (127.0.0.1:0): signed requests over TCP, graceful shutdown.

mod common;

use std::sync::Arc;

use common::{AKID, FakeInvoker, SECRET};
use hearth_api::sigv4::{SigningParams, sign};
use hearth_api::{ApiConfig, AppState, serve};
use http::{HeaderMap, HeaderValue, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw_request(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: &[u8],
    signed: bool,
) -> String {
    let host = addr.to_string();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_str(&host).expect("host"));
    if signed {
        let params = SigningParams {
            access_key_id: AKID,
            secret_access_key: SECRET,
            region: "us-east-1",
            service: "lambda",
            time: chrono::Utc::now(),
            content_sha256_header: true,
        };
        for (k, v) in sign(
            &method,
            &format!("http://{host}{path}"),
            &headers,
            body,
            &params,
        )
        .expect("sign")
        {
            headers.insert(k, v);
        }
    }
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in &headers {
        req.push_str(&format!("{k}: {}\r\n", v.to_str().expect("ascii")));
    }
    req.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(req.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn serves_signed_requests_and_shuts_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ApiConfig::new(dir.path());
    config.credentials = vec![(AKID.into(), SECRET.into())];
    let state = AppState::new(config, FakeInvoker::new() as Arc<_>)
        .await
        .expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let ok = raw_request(addr, Method::GET, "/2016-08-19/account-settings", b"", true).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"ConcurrentExecutions\":1000"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("x-amzn-requestid:"),
        "{ok}"
    );

    let unsigned = raw_request(
        addr,
        Method::GET,
        "/2016-08-19/account-settings",
        b"",
        false,
    )
    .await;
    assert!(unsigned.starts_with("HTTP/1.1 403"), "{unsigned}");
    assert!(
        unsigned
            .to_ascii_lowercase()
            .contains("x-amzn-errortype: missingauthenticationtokenexception"),
        "{unsigned}"
    );

    // An oversized invocation is read to its end and answered 413, not reset mid-upload.
    let big = vec![b' '; hearth_proto::MAX_SYNC_PAYLOAD + 1024 * 1024];
    let too_big = raw_request(
        addr,
        Method::POST,
        "/2015-03-31/functions/f/invocations",
        &big,
        true,
    )
    .await;
    assert!(
        too_big.starts_with("HTTP/1.1 413"),
        "{}",
        &too_big[..too_big.len().min(300)]
    );
    assert!(too_big.contains("RequestTooLargeException"), "{too_big}");

    let _ = stop.send(());
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("server stops after shutdown")
        .expect("join");
    result.expect("serve returned ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}
