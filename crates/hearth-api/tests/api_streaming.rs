//! `InvokeWithResponseStream` through the router with the fake invoker: the event-stream
//! encoding (decoded here with the CRCs checked), chunks reaching the caller before the
//! invocation ends, in-band errors, and the errors answered before a stream starts.
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::*;
use http::Method;
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn stream_path(name: &str) -> String {
    format!("/2021-11-15/functions/{name}/response-streaming-invocations")
}

/// One decoded event-stream message: its `:event-type` and payload.
#[derive(Debug, PartialEq)]
struct Event {
    event_type: String,
    content_type: String,
    payload: Vec<u8>,
}

/// Decode whole messages from the front of `buf` (checking both CRCs), leaving a partial one.
fn decode(buf: &mut Vec<u8>) -> Vec<Event> {
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut out = Vec::new();
    while buf.len() >= 12 && buf.len() >= be(&buf[0..4]) {
        let total = be(&buf[0..4]);
        let headers_len = be(&buf[4..8]);
        let msg: Vec<u8> = buf.drain(..total).collect();
        assert_eq!(
            be(&msg[8..12]) as u32,
            crc32fast::hash(&msg[..8]),
            "prelude CRC"
        );
        assert_eq!(
            be(&msg[total - 4..]) as u32,
            crc32fast::hash(&msg[..total - 4]),
            "message CRC"
        );
        let mut h = &msg[12..12 + headers_len];
        let (mut event_type, mut content_type, mut message_type) =
            (String::new(), String::new(), String::new());
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = std::str::from_utf8(&h[1..1 + n]).expect("name").to_string();
            assert_eq!(h[1 + n], 7, "a string header");
            let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = std::str::from_utf8(&h[4 + n..4 + n + len])
                .expect("value")
                .to_string();
            match name.as_str() {
                ":event-type" => event_type = value,
                ":content-type" => content_type = value,
                ":message-type" => message_type = value,
                other => panic!("unexpected header {other}"),
            }
            h = &h[4 + n + len..];
        }
        assert_eq!(message_type, "event");
        out.push(Event {
            event_type,
            content_type,
            payload: msg[12 + headers_len..total - 4].to_vec(),
        });
    }
    out
}

/// Read the body until `n` more events arrived (or it ends).
async fn read_events(body: &mut Body, buf: &mut Vec<u8>, n: usize) -> Vec<Event> {
    let mut events = decode(buf);
    while events.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event in time");
        match frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    buf.extend_from_slice(data);
                }
                events.extend(decode(buf));
            }
            Some(Err(e)) => panic!("body error: {e}"),
            None => break,
        }
    }
    events
}

fn complete(event: &Event) -> Value {
    assert_eq!(event.event_type, "InvokeComplete");
    assert_eq!(event.content_type, "application/json");
    serde_json::from_slice(&event.payload).expect("JSON")
}

fn chunk(event: &Event) -> &[u8] {
    assert_eq!(event.event_type, "PayloadChunk");
    assert_eq!(event.content_type, "application/octet-stream");
    &event.payload
}

#[tokio::test]
async fn chunks_reach_the_caller_before_the_invocation_ends() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let hold = Arc::new(tokio::sync::Notify::new());
    api.invoker.set(Mode::Stream(Streamed {
        content_type: Some("text/plain".into()),
        chunks: vec![b"one ".to_vec(), b"two".to_vec()],
        hold: Some(hold.clone()),
        error: None,
    }));
    let resp = api
        .send_open(
            Method::POST,
            &stream_path("f"),
            &[("x-amz-log-type", "Tail")],
            br#"{"k":1}"#.to_vec(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.amazon.eventstream"
    );
    assert_eq!(resp.headers()["x-amz-executed-version"], "$LATEST");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    // Both chunks arrive while the function still runs (it is held).
    let events = read_events(&mut body, &mut buf, 2).await;
    assert_eq!(events.len(), 2);
    assert_eq!(chunk(&events[0]), b"one ");
    assert_eq!(chunk(&events[1]), b"two");
    hold.notify_one();
    let events = read_events(&mut body, &mut buf, 1).await;
    assert_eq!(events.len(), 1);
    let done = complete(&events[0]);
    assert!(done.get("ErrorCode").is_none(), "{done}");
    let log = done["LogResult"].as_str().expect("LogResult with Tail");
    let log =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, log).expect("base64");
    assert!(String::from_utf8_lossy(&log).contains("hello from f"));
    assert!(body.frame().await.is_none(), "nothing after InvokeComplete");
    assert!(buf.is_empty());

    // The request carried a response sink; the function got the payload.
    let calls = api.invoker.calls();
    assert!(calls[0].response.is_some());
    assert_eq!(&calls[0].payload[..], br#"{"k":1}"#);
}

#[tokio::test]
async fn a_mid_stream_error_ends_in_invoke_complete() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let doc = br#"{"errorMessage":"broke","errorType":"Stream.Broke"}"#.to_vec();
    api.invoker.set(Mode::Stream(Streamed {
        chunks: vec![b"partial".to_vec()],
        error: Some(doc.clone()),
        ..Streamed::default()
    }));
    let r = api
        .send(Method::POST, &stream_path("f"), &[], b"{}".to_vec())
        .await;
    r.assert_status(200);
    assert!(r.header("x-amz-function-error").is_none());
    let mut buf = r.body.clone();
    let events = decode(&mut buf);
    assert!(buf.is_empty());
    assert_eq!(events.len(), 2);
    assert_eq!(chunk(&events[0]), b"partial");
    let done = complete(&events[1]);
    assert_eq!(done["ErrorCode"], "Stream.Broke");
    let details: Value =
        serde_json::from_str(done["ErrorDetails"].as_str().expect("details")).expect("JSON");
    assert_eq!(details["errorMessage"], "broke");
    assert!(done.get("LogResult").is_none(), "no Tail asked for");
}

#[tokio::test]
async fn a_function_that_does_not_stream_answers_in_one_chunk() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let r = api
        .send(Method::POST, &stream_path("f"), &[], br#"{"a":1}"#.to_vec())
        .await;
    r.assert_status(200);
    let mut buf = r.body.clone();
    let events = decode(&mut buf);
    assert_eq!(events.len(), 2);
    assert_eq!(chunk(&events[0]), br#"{"a":1}"#);
    assert_eq!(complete(&events[1]), json!({}));

    // A function error without a stream: no chunk, the error in InvokeComplete.
    api.invoker.set(Mode::FunctionError);
    let r = api
        .send(Method::POST, &stream_path("f"), &[], b"{}".to_vec())
        .await;
    r.assert_status(200);
    let mut buf = r.body.clone();
    let events = decode(&mut buf);
    assert_eq!(events.len(), 1);
    assert_eq!(complete(&events[0])["ErrorCode"], "Exception");
}

#[tokio::test]
async fn errors_before_the_stream_are_lambda_errors() {
    let api = Api::new().await;
    api.send(Method::POST, &stream_path("missing"), &[], b"{}".to_vec())
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.create("f", json!({})).await.assert_status(201);
    api.send(
        Method::POST,
        &stream_path("f"),
        &[("x-amz-invocation-type", "Event")],
        b"{}".to_vec(),
    )
    .await
    .assert_error(400, "InvalidParameterValueException");
    api.send(Method::POST, &stream_path("f"), &[], b"not json".to_vec())
        .await
        .assert_error(400, "InvalidRequestContentException");
    let r = api
        .send(
            Method::POST,
            &stream_path("f"),
            &[("x-amz-invocation-type", "DryRun")],
            b"{}".to_vec(),
        )
        .await;
    r.assert_status(204);
    assert!(api.invoker.calls().is_empty(), "DryRun runs nothing");

    api.invoker
        .set(Mode::Throttle("ConcurrentInvocationLimitExceeded".into()));
    let r = api
        .send(Method::POST, &stream_path("f"), &[], b"{}".to_vec())
        .await;
    r.assert_error(429, "TooManyRequestsException");
    assert_eq!(r.json()["Reason"], "ConcurrentInvocationLimitExceeded");
    api.send(
        Method::POST,
        &format!("{}?Qualifier=nope", stream_path("f")),
        &[],
        b"{}".to_vec(),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn buffered_invoke_of_a_streaming_function_gets_the_whole_response() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    api.invoker.set(Mode::Stream(Streamed {
        chunks: vec![b"\"ab".to_vec(), b"c\"".to_vec()],
        ..Streamed::default()
    }));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_status(200);
    assert_eq!(r.body, b"\"abc\"");
    assert!(api.invoker.calls()[0].response.is_none());
}

/// `f` with a `RESPONSE_STREAM` URL; the path of that URL.
async fn streaming_url(api: &Api) -> String {
    api.create("f", json!({})).await.assert_status(201);
    let r = api
        .post(
            "/2021-10-31/functions/f/url",
            json!({"AuthType": "NONE", "InvokeMode": "RESPONSE_STREAM"}),
        )
        .await;
    r.assert_status(201);
    assert_eq!(r.json()["InvokeMode"], "RESPONSE_STREAM");
    let url = r.json()["FunctionUrl"].as_str().expect("url").to_string();
    url.strip_prefix("http://127.0.0.1:9000")
        .expect("path form")
        .to_string()
}

/// An unsigned URL request with its body left open.
async fn open_url(api: &Api, path: &str) -> http::Response<Body> {
    use tower::ServiceExt;
    let req = http::Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "127.0.0.1:9000")
        .body(Body::empty())
        .expect("request");
    api.router
        .clone()
        .expect("running")
        .oneshot(req)
        .await
        .expect("infallible")
}

async fn next_bytes(body: &mut Body) -> Option<Vec<u8>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("bytes in time")?;
        let frame = frame.expect("body ok");
        if let Some(data) = frame.data_ref()
            && !data.is_empty()
        {
            return Some(data.to_vec());
        }
    }
}

#[tokio::test]
async fn a_streaming_url_takes_its_head_from_the_prelude_and_streams_the_body() {
    let api = Api::new().await;
    let path = streaming_url(&api).await;
    let hold = Arc::new(tokio::sync::Notify::new());
    let mut prelude =
        br#"{"statusCode":201,"headers":{"x-a":"b","content-type":"text/plain"},"cookies":["c=1","d=2"]}"#
            .to_vec();
    prelude.extend_from_slice(&[0, 0, 0]);
    api.invoker.set(Mode::Stream(Streamed {
        content_type: Some("application/vnd.awslambda.http-integration-response".into()),
        // The delimiter is split over two chunks, the second also carries body bytes.
        chunks: vec![prelude, b"\0\0\0\0\0first ".to_vec(), b"second".to_vec()],
        hold: Some(hold.clone()),
        error: None,
    }));
    let resp = open_url(&api, &path).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-a"], "b");
    assert_eq!(resp.headers()["content-type"], "text/plain");
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["c=1", "d=2"]);
    let mut body = resp.into_body();
    // The body arrives while the function still runs.
    let mut got = Vec::new();
    while got.len() < b"first second".len() {
        got.extend(next_bytes(&mut body).await.expect("more body"));
    }
    assert_eq!(got, b"first second");
    hold.notify_one();
    assert!(next_bytes(&mut body).await.is_none());
    // The function got the 2.0 event.
    let event: Value = serde_json::from_slice(&api.invoker.calls()[0].payload).expect("JSON");
    assert_eq!(event["version"], "2.0");
}

#[tokio::test]
async fn a_stream_without_prelude_is_the_body_with_status_200() {
    let api = Api::new().await;
    let path = streaming_url(&api).await;
    api.invoker.set(Mode::Stream(Streamed {
        content_type: Some("text/event-stream".into()),
        chunks: vec![b"data: 1\n\n".to_vec(), b"data: 2\n\n".to_vec()],
        ..Streamed::default()
    }));
    let resp = open_url(&api, &path).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"data: 1\n\ndata: 2\n\n");

    // A function that answers in one piece: its payload is the body, unmapped.
    api.invoker
        .set(Mode::Reply(br#"{"statusCode":404}"#.to_vec()));
    let resp = open_url(&api, &path).await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], br#"{"statusCode":404}"#);
}

#[tokio::test]
async fn streaming_url_failures() {
    let api = Api::new().await;
    let path = streaming_url(&api).await;
    // A function error before any byte: 502 as a buffered URL answers.
    api.invoker.set(Mode::FunctionError);
    assert_eq!(open_url(&api, &path).await.status(), 502);
    // A throttle: 429.
    api.invoker
        .set(Mode::Throttle("ConcurrentInvocationLimitExceeded".into()));
    assert_eq!(open_url(&api, &path).await.status(), 429);
    // A prelude that is not JSON: 502.
    api.invoker.set(Mode::Stream(Streamed {
        content_type: Some("application/vnd.awslambda.http-integration-response".into()),
        chunks: vec![b"not json\0\0\0\0\0\0\0\0body".to_vec()],
        ..Streamed::default()
    }));
    assert_eq!(open_url(&api, &path).await.status(), 502);
    // An error after the head went out ends the body early, as an error.
    api.invoker.set(Mode::Stream(Streamed {
        chunks: vec![b"partial".to_vec()],
        error: Some(br#"{"errorMessage":"x","errorType":"Boom"}"#.to_vec()),
        ..Streamed::default()
    }));
    let resp = open_url(&api, &path).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let failed = loop {
        match body.frame().await {
            Some(Ok(f)) => got.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or_default()),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert_eq!(got, b"partial");
    assert!(failed, "the body ends in an error, not a clean end");
}
