//! Invoke (resolution, headers, limits, error mapping), concurrency, account settings, and
//! hearth's log endpoint.

mod common;

use base64::Engine;
use common::*;
use hearth_proto::MAX_SYNC_PAYLOAD;
use serde_json::json;

#[tokio::test]
async fn invoke_passes_the_right_spec_and_echoes() {
    let api = Api::new().await;
    api.create(
        "echo",
        json!({"MemorySize": 256, "Timeout": 7, "Environment": {"Variables": {"K": "v"}}}),
    )
    .await
    .assert_status(201);
    let r = api.invoke("echo", "", &[], br#"{"hello": "world"}"#).await;
    r.assert_status(200);
    assert_eq!(r.body, br#"{"hello": "world"}"#);
    assert_eq!(
        r.header("x-amz-executed-version").as_deref(),
        Some("$LATEST")
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(r.header("x-amz-function-error").is_none());
    assert!(
        r.header("x-amz-log-result").is_none(),
        "no log without Tail"
    );
    assert!(r.header("x-amzn-requestid").is_some());

    let calls = api.invoker.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.spec.name, "echo");
    assert_eq!(c.spec.version, "$LATEST");
    assert_eq!(c.spec.arn, format!("{ARN_PREFIX}echo"));
    assert_eq!(c.invoked_arn, format!("{ARN_PREFIX}echo"));
    assert_eq!(c.spec.runtime, "python3.11");
    assert_eq!(c.spec.handler, "app.handler");
    assert_eq!(c.spec.memory_mb, 256);
    assert_eq!(c.spec.timeout_s, 7);
    assert_eq!(c.spec.env.get("K").map(String::as_str), Some("v"));
    // The spec names the package; no host path crosses the boundary. The front end keeps
    // the unpacked package under that name.
    let hex = hearth_core::code::CodeRef::hex_of(&c.spec.code_sha256).expect("a SHA-256");
    let unpacked = api.data_dir().join("code").join(&hex);
    assert!(unpacked.join("app.py").is_file(), "{unpacked:?}");
    let conf = api
        .get(&format!("{}/configuration", fpath("echo")))
        .await
        .json();
    assert_eq!(c.spec.code_sha256, conf["CodeSha256"]);
    assert_eq!(c.spec.revision_id, conf["RevisionId"]);
    assert_eq!(c.reserved_concurrency, None);
    assert_eq!(c.unreserved_limit, 1000);
    assert!(c.client_context.is_none());
}

#[tokio::test]
async fn invoke_resolves_names_arns_and_qualifiers() {
    let api = Api::new().await;
    api.create("f", json!({"Publish": true}))
        .await
        .assert_status(201);
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"ZipFile": b64(&handler_zip("v2"))}),
    )
    .await
    .assert_status(200);
    api.alias("f", "live", "1").await;

    let cases = [
        ("f", "", "$LATEST", format!("{ARN_PREFIX}f")),
        ("f", "?Qualifier=1", "1", format!("{ARN_PREFIX}f:1")),
        (
            "f",
            "?Qualifier=%24LATEST",
            "$LATEST",
            format!("{ARN_PREFIX}f:$LATEST"),
        ),
        ("f:1", "", "1", format!("{ARN_PREFIX}f:1")),
        ("f:live", "", "1", format!("{ARN_PREFIX}f:live")),
        ("f", "?Qualifier=live", "1", format!("{ARN_PREFIX}f:live")),
        (
            &format!("{ARN_PREFIX}f") as &str,
            "",
            "$LATEST",
            format!("{ARN_PREFIX}f"),
        ),
        (
            &format!("{ARN_PREFIX}f:live") as &str,
            "",
            "1",
            format!("{ARN_PREFIX}f:live"),
        ),
        (
            "000000000000:function:f:1",
            "",
            "1",
            format!("{ARN_PREFIX}f:1"),
        ),
    ]
    .map(|(a, b, c, d)| (a.to_string(), b, c, d));
    for (name, query, version, invoked) in cases {
        let r = api.invoke(&name, query, &[], b"{}").await;
        r.assert_status(200);
        assert_eq!(
            r.header("x-amz-executed-version").as_deref(),
            Some(version),
            "{name}{query}"
        );
        let last = api.invoker.calls().pop().expect("call");
        assert_eq!(last.invoked_arn, invoked, "{name}{query}");
        assert_eq!(last.spec.version, version);
    }
    let v1 = api
        .invoker
        .calls()
        .into_iter()
        .find(|c| c.spec.version == "1")
        .expect("v1 call");
    let v1_conf = api
        .get(&format!("{}/configuration?Qualifier=1", fpath("f")))
        .await
        .json();
    assert_eq!(v1.spec.code_sha256, v1_conf["CodeSha256"]);
    assert_eq!(v1.spec.revision_id, v1_conf["RevisionId"]);

    let calls_before = api.invoker.calls().len();
    for (name, query) in [
        ("nope", ""),
        ("f", "?Qualifier=9"),
        ("f", "?Qualifier=nosuch"),
        ("f:9", ""),
    ] {
        let r = api.invoke(name, query, &[], b"{}").await;
        r.assert_error(404, "ResourceNotFoundException");
        assert!(
            r.json()["Message"]
                .as_str()
                .expect("m")
                .starts_with("Function not found: arn:aws:lambda:")
        );
    }
    api.invoke("f:1", "?Qualifier=2", &[], b"{}")
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.invoke("bad name!", "", &[], b"{}")
        .await
        .assert_error(400, "InvalidParameterValueException");
    assert_eq!(api.invoker.calls().len(), calls_before, "nothing ran");
}

#[tokio::test]
async fn invocation_types_log_tail_and_client_context() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);

    let dry = api
        .invoke("f", "", &[("x-amz-invocation-type", "DryRun")], b"{}")
        .await;
    dry.assert_status(204);
    assert!(dry.body.is_empty());
    api.invoke("f", "", &[("x-amz-invocation-type", "Sometimes")], b"{}")
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.invoke("f", "", &[("x-amz-log-type", "Everything")], b"{}")
        .await
        .assert_error(400, "InvalidParameterValueException");
    assert!(
        api.invoker.calls().is_empty(),
        "DryRun and refused invocations run nothing"
    );

    let tail = api
        .invoke(
            "f",
            "",
            &[
                ("x-amz-invocation-type", "RequestResponse"),
                ("x-amz-log-type", "Tail"),
            ],
            b"{}",
        )
        .await;
    tail.assert_status(200);
    let log = base64::engine::general_purpose::STANDARD
        .decode(tail.header("x-amz-log-result").expect("log result"))
        .expect("base64");
    let log = String::from_utf8(log).expect("utf8");
    assert!(log.contains("hello from f"), "{log}");

    let ctx = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{"k":"v"}}"#);
    api.invoke("f", "", &[("x-amz-client-context", &ctx)], b"{}")
        .await
        .assert_status(200);
    let last = api.invoker.calls().pop().expect("call");
    assert_eq!(
        last.client_context.as_deref(),
        Some(r#"{"custom":{"k":"v"}}"#)
    );
    let calls = api.invoker.calls().len();
    for bad in [
        "@@@",
        &base64::engine::general_purpose::STANDARD.encode("not json"),
    ] {
        api.invoke("f", "", &[("x-amz-client-context", bad)], b"{}")
            .await
            .assert_error(400, "InvalidRequestContentException");
    }
    let huge = base64::engine::general_purpose::STANDARD
        .encode(format!(r#"{{"a":"{}"}}"#, "x".repeat(3000)));
    api.invoke("f", "", &[("x-amz-client-context", &huge)], b"{}")
        .await
        .assert_error(400, "InvalidRequestContentException");
    assert_eq!(api.invoker.calls().len(), calls);
}

#[tokio::test]
async fn payload_rules() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    // An empty payload is accepted; JSON scalars are JSON.
    api.invoke("f", "", &[], b"").await.assert_status(200);
    // No payload: the function gets `{}`, as on Lambda.
    assert_eq!(&api.invoker.calls().pop().expect("call").payload[..], b"{}");
    api.invoke("f", "", &[], b"42").await.assert_status(200);
    api.invoke("f", "", &[], b"\"text\"")
        .await
        .assert_status(200);
    let calls = api.invoker.calls().len();
    api.invoke("f", "", &[], b"not json")
        .await
        .assert_error(400, "InvalidRequestContentException");
    api.invoke("f", "", &[], b"{\"a\":")
        .await
        .assert_error(400, "InvalidRequestContentException");

    // Exactly 6 MB is fine; one byte more is 413.
    let mut at_limit = vec![b' '; MAX_SYNC_PAYLOAD];
    at_limit[0] = b'1';
    api.invoke("f", "", &[], &at_limit).await.assert_status(200);
    let mut over = at_limit.clone();
    over.push(b' ');
    api.invoke("f", "", &[], &over)
        .await
        .assert_error(413, "RequestTooLargeException");
    assert_eq!(api.invoker.calls().len(), calls + 1);
}

#[tokio::test]
async fn function_errors_are_http_200() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    api.invoker.set(Mode::FunctionError);
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorMessage"], "boom");

    api.invoker.set(Mode::BigResponse(MAX_SYNC_PAYLOAD + 1));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "Function.ResponseSizeTooLarge");

    api.invoker.set(Mode::BigResponse(MAX_SYNC_PAYLOAD));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_status(200);
    assert!(r.header("x-amz-function-error").is_none());
    assert_eq!(r.body.len(), MAX_SYNC_PAYLOAD);
}

#[tokio::test]
async fn invoker_failures_map_to_lambda_errors() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);

    api.invoker.set(Mode::Throttle(
        "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
    ));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_error(429, "TooManyRequestsException");
    assert_eq!(
        r.json()["Reason"],
        "ReservedFunctionConcurrentInvocationLimitExceeded"
    );
    assert!(r.header("retry-after").is_some());

    api.invoker.set(Mode::NotReady(
        "the python3.11 runtime image is not installed".into(),
    ));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_error(502, "ResourceNotReadyException");
    assert!(
        r.json()["message"]
            .as_str()
            .expect("m")
            .contains("runtime image")
    );

    api.invoker.set(Mode::Service(
        "sandbox 42 on /var/lib/secret exploded".into(),
    ));
    let r = api.invoke("f", "", &[], b"{}").await;
    r.assert_error(500, "ServiceException");
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        !text.contains("secret") && !text.contains("sandbox 42"),
        "{text}"
    );
}

#[tokio::test]
async fn concurrency_reservations() {
    let api = Api::with(|c| c.account_concurrency = 100).await;
    api.create("a", json!({})).await.assert_status(201);
    api.create("b", json!({})).await.assert_status(201);
    let put = |name: &str| format!("/2017-10-31/functions/{name}/concurrency");
    let get = |name: &str| format!("/2019-09-30/functions/{name}/concurrency");

    let none = api.get(&get("a")).await;
    none.assert_status(200);
    assert_eq!(none.json(), json!({}));

    let r = api
        .put(&put("a"), json!({"ReservedConcurrentExecutions": 50}))
        .await;
    r.assert_status(200);
    assert_eq!(r.json(), json!({"ReservedConcurrentExecutions": 50}));
    assert_eq!(
        api.get(&get("a")).await.json(),
        json!({"ReservedConcurrentExecutions": 50})
    );
    assert_eq!(
        api.get(&fpath("a")).await.json()["Concurrency"],
        json!({"ReservedConcurrentExecutions": 50})
    );

    // min unreserved = min(100, 100/10) = 10: b may take 40, not 41.
    api.put(&put("b"), json!({"ReservedConcurrentExecutions": 41}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.put(&put("b"), json!({"ReservedConcurrentExecutions": -1}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.put(&put("b"), json!({}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.put(&put("b"), json!({"ReservedConcurrentExecutions": 40}))
        .await
        .assert_status(200);
    // a may be re-set within its own share.
    api.put(&put("a"), json!({"ReservedConcurrentExecutions": 50}))
        .await
        .assert_status(200);
    api.put(&put("missing"), json!({"ReservedConcurrentExecutions": 1}))
        .await
        .assert_error(404, "ResourceNotFoundException");

    let settings = api.get("/2016-08-19/account-settings").await.json();
    assert_eq!(settings["AccountLimit"]["ConcurrentExecutions"], 100);
    assert_eq!(
        settings["AccountLimit"]["UnreservedConcurrentExecutions"],
        10
    );

    // The invoker learns the reservation and the unreserved pool.
    api.invoke("a", "", &[], b"{}").await.assert_status(200);
    let c = api.invoker.calls().pop().expect("call");
    assert_eq!(c.reserved_concurrency, Some(50));
    assert_eq!(c.unreserved_limit, 10);

    api.delete(&put("a")).await.assert_status(204);
    assert_eq!(api.get(&get("a")).await.json(), json!({}));
    assert!(
        api.get(&fpath("a"))
            .await
            .json()
            .get("Concurrency")
            .is_none()
    );
    api.invoke("a", "", &[], b"{}").await.assert_status(200);
    let c = api.invoker.calls().pop().expect("call");
    assert_eq!(c.reserved_concurrency, None);
    assert_eq!(c.unreserved_limit, 60);
    // Deleting a function frees its reservation.
    api.delete(&fpath("b")).await.assert_status(204);
    let settings = api.get("/2016-08-19/account-settings").await.json();
    assert_eq!(
        settings["AccountLimit"]["UnreservedConcurrentExecutions"],
        100
    );
}

#[tokio::test]
async fn account_settings_usage() {
    let api = Api::new().await;
    let empty = api.get("/2016-08-19/account-settings").await;
    empty.assert_status(200);
    let empty = empty.json();
    assert_eq!(
        empty["AccountUsage"],
        json!({"TotalCodeSize": 0, "FunctionCount": 0})
    );
    assert_eq!(empty["AccountLimit"]["CodeSizeUnzipped"], 262_144_000u64);
    assert_eq!(empty["AccountLimit"]["CodeSizeZipped"], 52_428_800u64);
    assert_eq!(empty["AccountLimit"]["ConcurrentExecutions"], 1000);
    assert_eq!(
        empty["AccountLimit"]["UnreservedConcurrentExecutions"],
        1000
    );
    assert!(empty["AccountLimit"]["TotalCodeSize"].as_u64().expect("n") > 0);

    let size = handler_zip("v1").len() as u64;
    api.create("a", json!({})).await.assert_status(201);
    api.create("b", json!({"Publish": true}))
        .await
        .assert_status(201);
    let s = api.get("/2016-08-19/account-settings").await.json();
    assert_eq!(s["AccountUsage"]["FunctionCount"], 2);
    assert_eq!(
        s["AccountUsage"]["TotalCodeSize"],
        3 * size,
        "$LATEST of a and b, and b's version 1"
    );
}

#[tokio::test]
async fn logs_endpoint() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let empty = api.get("/hearth/v1/functions/f/logs").await;
    empty.assert_status(200);
    assert!(empty.body.is_empty());
    for _ in 0..3 {
        api.invoke("f", "", &[], b"{}").await.assert_status(200);
    }
    let all = api.get("/hearth/v1/functions/f/logs").await;
    all.assert_status(200);
    assert_eq!(
        all.header("content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    let text = String::from_utf8(all.body.clone()).expect("utf8");
    assert_eq!(text.matches("hello from f").count(), 3, "{text}");
    let tail = api.get("/hearth/v1/functions/f/logs?tail_bytes=20").await;
    assert_eq!(tail.body.len(), 20);
    assert!(text.ends_with(std::str::from_utf8(&tail.body).expect("utf8")));
    assert!(api.data_dir().join("logs").join("f.log").is_file());

    api.get("/hearth/v1/functions/f/logs?tail_bytes=abc")
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.get("/hearth/v1/functions/nope/logs")
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.send_as(
        None,
        http::Method::GET,
        "/hearth/v1/functions/f/logs",
        &[],
        vec![],
    )
    .await
    .assert_error(403, "MissingAuthenticationTokenException");

    // Deleting the function removes its log.
    api.delete(&fpath("f")).await.assert_status(204);
    assert!(!api.data_dir().join("logs").join("f.log").exists());
}
