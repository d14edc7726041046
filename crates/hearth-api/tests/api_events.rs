//! Asynchronous invocation through the router, with the recording fake invoker: 202 and 413,
//! the event-invoke configuration, retries on Lambda's schedule (scaled down), destinations
//! with Lambda's record, the failed-events store and re-drive, throttles, and a restart that
//! keeps what was queued.

mod common;

use std::time::{Duration, Instant};

use common::{ARN_PREFIX, Api, Mode};
use serde_json::{Value, json};

const EVENT: &[(&str, &str)] = &[("x-amz-invocation-type", "Event")];
const RETRY_MS: u64 = 150;

async fn api() -> Api {
    Api::with(|c| {
        c.async_config.policy.retry_base_ms = RETRY_MS;
        c.async_config.policy.throttle_min_ms = 10;
        c.async_config.policy.throttle_max_ms = 50;
    })
    .await
}

/// Wait (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn calls_of(api: &Api, name: &str) -> Vec<hearth_api::invoker::InvokeRequest> {
    api.invoker
        .calls()
        .into_iter()
        .filter(|c| c.spec.name == name)
        .collect()
}

async fn failed(api: &Api) -> Vec<Value> {
    let r = api.get("/hearth/v1/failed-events").await;
    r.assert_status(200);
    r.json()["FailedEvents"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

const CFG: &str = "/2019-09-25/functions/f/event-invoke-config";

#[tokio::test]
async fn an_event_is_acknowledged_202_and_runs_with_its_request_id() {
    let api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    let r = api.invoke("f", "", EVENT, br#"{"n":1}"#).await;
    r.assert_status(202);
    assert!(r.body.is_empty());
    let id = r.header("x-amzn-requestid").expect("id");
    until("the event to run", || !calls_of(&api, "f").is_empty()).await;
    let call = &calls_of(&api, "f")[0];
    assert_eq!(call.request_id, id, "the invocation keeps the request id");
    assert_eq!(&call.payload[..], br#"{"n":1}"#);
    assert_eq!(call.spec.version, "$LATEST");

    // Lambda's async limit is 1 MB; the sync limit (6 MB) still applies to RequestResponse.
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(1_048_576));
    api.invoke("f", "", EVENT, big.as_bytes())
        .await
        .assert_error(413, "RequestTooLargeException");
    api.invoke("f", "", EVENT, b"not json")
        .await
        .assert_error(400, "InvalidRequestContentException");
    api.invoke("nope", "", EVENT, b"{}")
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.invoke("f", "?Qualifier=7", EVENT, b"{}")
        .await
        .assert_error(404, "ResourceNotFoundException");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls_of(&api, "f").len(), 1, "refused events run nothing");
}

#[tokio::test]
async fn event_invoke_config_round_trip_and_validation() {
    let api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    api.get(CFG)
        .await
        .assert_error(404, "ResourceNotFoundException");
    let sink = format!("{ARN_PREFIX}sink");
    let put = api
        .put(
            CFG,
            json!({"MaximumRetryAttempts": 1, "DestinationConfig": {"OnSuccess": {"Destination": sink}}}),
        )
        .await;
    put.assert_status(200);
    let v = put.json();
    assert_eq!(v["FunctionArn"], format!("{ARN_PREFIX}f:$LATEST"));
    assert_eq!(v["MaximumRetryAttempts"], 1);
    assert!(v.get("MaximumEventAgeInSeconds").is_none());
    assert_eq!(v["DestinationConfig"]["OnSuccess"]["Destination"], sink);
    assert!(v["LastModified"].as_f64().expect("epoch seconds") > 1.6e9);

    // Update merges; Put replaces.
    let up = api
        .post(CFG, json!({"MaximumEventAgeInSeconds": 120}))
        .await;
    up.assert_status(200);
    let v = up.json();
    assert_eq!(
        (
            v["MaximumRetryAttempts"].clone(),
            v["MaximumEventAgeInSeconds"].clone()
        ),
        (json!(1), json!(120))
    );
    assert_eq!(v["DestinationConfig"]["OnSuccess"]["Destination"], sink);
    let v = api
        .put(CFG, json!({"MaximumRetryAttempts": 0}))
        .await
        .json();
    assert!(v.get("MaximumEventAgeInSeconds").is_none());
    assert!(
        v["DestinationConfig"]["OnSuccess"]
            .get("Destination")
            .is_none()
    );
    assert_eq!(api.get(CFG).await.json(), v);

    for (body, want) in [
        (
            json!({"MaximumRetryAttempts": 3}),
            "less than or equal to 2",
        ),
        (
            json!({"MaximumEventAgeInSeconds": 59}),
            "greater than or equal to 60",
        ),
        (
            json!({"MaximumEventAgeInSeconds": 21601}),
            "less than or equal to 21600",
        ),
        (
            json!({"DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sns:us-east-1:000000000000:t"}}}),
            "cannot deliver to sns",
        ),
        (
            json!({"DestinationConfig": {"OnSuccess": {"Destination": "arn:aws:sqs:us-east-1:000000000000:q"}}}),
            "OnSuccess",
        ),
    ] {
        let r = api.put(CFG, body.clone()).await;
        r.assert_error(400, "InvalidParameterValueException");
        assert!(
            r.json()["message"].as_str().expect("m").contains(want),
            "{body}: {}",
            r.json()
        );
    }
    assert_eq!(
        api.get(CFG).await.json(),
        v,
        "refused changes change nothing"
    );

    // Per qualifier: a version or alias must exist.
    api.put(&format!("{CFG}?Qualifier=3"), json!({}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.post("/2015-03-31/functions/f/versions", json!({}))
        .await
        .assert_status(201);
    api.put(
        &format!("{CFG}?Qualifier=1"),
        json!({"MaximumRetryAttempts": 2}),
    )
    .await
    .assert_status(200);
    let list = api.get(&format!("{CFG}/list")).await.json();
    let arns: Vec<&str> = list["FunctionEventInvokeConfigs"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["FunctionArn"].as_str().expect("arn"))
        .collect();
    assert_eq!(
        arns,
        [format!("{ARN_PREFIX}f:$LATEST"), format!("{ARN_PREFIX}f:1")]
    );
    let page = api.get(&format!("{CFG}/list?MaxItems=1")).await.json();
    assert_eq!(
        page["FunctionEventInvokeConfigs"].as_array().map(Vec::len),
        Some(1)
    );
    let next = page["NextMarker"].as_str().expect("marker");
    let rest = api.get(&format!("{CFG}/list?Marker={next}")).await.json();
    assert_eq!(
        rest["FunctionEventInvokeConfigs"][0]["FunctionArn"],
        format!("{ARN_PREFIX}f:1")
    );

    let del = api.delete(CFG).await;
    del.assert_status(204);
    api.get(CFG)
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(CFG)
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.get("/2019-09-25/functions/nope/event-invoke-config")
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn failures_retry_on_schedule_then_go_to_on_failure_and_the_store() {
    let api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    api.create("sink", json!({})).await.assert_status(201);
    let sink = format!("{ARN_PREFIX}sink");
    api.put(
        CFG,
        json!({"DestinationConfig": {"OnFailure": {"Destination": sink}}}),
    )
    .await
    .assert_status(200);
    api.invoker.set(Mode::FailOnly("f".into()));
    let started = Instant::now();
    let r = api.invoke("f", "", EVENT, br#"{"k":"v"}"#).await;
    r.assert_status(202);
    let id = r.header("x-amzn-requestid").expect("id");
    until("the failure record at the sink", || {
        !calls_of(&api, "sink").is_empty()
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        calls_of(&api, "f").len(),
        3,
        "one attempt and two retries (the default)"
    );
    // Retries wait the base delay, then twice it.
    assert!(
        elapsed >= Duration::from_millis(3 * RETRY_MS),
        "{elapsed:?}"
    );

    let rec: Value = serde_json::from_slice(&calls_of(&api, "sink")[0].payload).expect("record");
    assert_eq!(rec["version"], "1.0");
    assert!(rec["timestamp"].as_str().expect("ts").ends_with('Z'));
    let ctx = &rec["requestContext"];
    assert_eq!(ctx["requestId"], id.as_str());
    assert_eq!(ctx["functionArn"], format!("{ARN_PREFIX}f:$LATEST"));
    assert_eq!(ctx["condition"], "RetriesExhausted");
    assert_eq!(ctx["approximateInvokeCount"], 3);
    assert_eq!(rec["requestPayload"], json!({"k": "v"}));
    assert_eq!(rec["responseContext"]["statusCode"], 200);
    assert_eq!(rec["responseContext"]["executedVersion"], "$LATEST");
    assert_eq!(rec["responseContext"]["functionError"], "Unhandled");
    assert_eq!(rec["responsePayload"]["errorMessage"], "boom");

    // Kept in the failed-events store too; the status says so.
    let stored = failed(&api).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["EventId"], id.as_str());
    assert_eq!(stored[0]["Condition"], "RetriesExhausted");
    assert_eq!(
        stored[0]["Record"]["requestContext"]["approximateInvokeCount"],
        3
    );
    let status = api.get("/hearth/v1/functions/f/status").await.json();
    assert_eq!(status["Async"]["Retried"], 2);
    assert_eq!(status["Async"]["Failed"], 1);
    assert_eq!(status["Async"]["Depth"], 0);
    assert_eq!(status["Async"]["FailedEventsStored"], 1);

    // Re-drive: a new event, fresh retries; it succeeds now and leaves the store.
    api.invoker.set(Mode::Echo);
    let r = api
        .post(&format!("/hearth/v1/failed-events/{id}/redrive"), json!({}))
        .await;
    r.assert_status(202);
    let new_id = r.json()["EventId"].as_str().expect("id").to_string();
    assert_ne!(new_id, id);
    until("the re-driven event", || calls_of(&api, "f").len() == 4).await;
    let last = calls_of(&api, "f").pop().expect("call");
    assert_eq!(last.request_id, new_id);
    assert_eq!(&last.payload[..], br#"{"k":"v"}"#);
    assert!(failed(&api).await.is_empty());
    api.get(&format!("/hearth/v1/failed-events/{id}"))
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn success_goes_to_on_success_and_zero_retries_fail_at_once_to_a_dead_letter_queue() {
    let api = api().await;
    let dlq = "arn:aws:sqs:us-east-1:000000000000:my-dlq";
    api.create("f", json!({"DeadLetterConfig": {"TargetArn": dlq}}))
        .await
        .assert_status(201);
    let conf = api
        .get("/2015-03-31/functions/f/configuration")
        .await
        .json();
    assert_eq!(conf["DeadLetterConfig"]["TargetArn"], dlq);
    api.create("sink", json!({})).await.assert_status(201);
    let sink = format!("{ARN_PREFIX}sink:$LATEST");
    api.put(
        CFG,
        json!({"MaximumRetryAttempts": 0, "DestinationConfig": {"OnSuccess": {"Destination": sink}}}),
    )
    .await
    .assert_status(200);
    let r = api.invoke("f", "", EVENT, br#"{"ok":true}"#).await;
    r.assert_status(202);
    until("the success record", || !calls_of(&api, "sink").is_empty()).await;
    let rec: Value = serde_json::from_slice(&calls_of(&api, "sink")[0].payload).expect("record");
    assert_eq!(rec["requestContext"]["condition"], "Success");
    assert_eq!(rec["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(rec["responsePayload"], json!({"ok": true}));
    assert!(rec["responseContext"].get("functionError").is_none());

    api.invoker.set(Mode::FailOnly("f".into()));
    let r = api.invoke("f", "", EVENT, b"{}").await;
    r.assert_status(202);
    until("the failure in the store", || {
        calls_of(&api, "f").len() == 2
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stored = loop {
        let s = failed(&api).await;
        if !s.is_empty() || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0]["Attempts"], 1,
        "no retries with MaximumRetryAttempts 0"
    );
    assert_eq!(stored[0]["Queues"], json!(["my-dlq"]));
    assert_eq!(
        calls_of(&api, "sink").len(),
        1,
        "OnSuccess only gets successes"
    );

    // A DLQ must be a queue: a function is refused, and so is SNS.
    for arn in [
        format!("{ARN_PREFIX}sink"),
        "arn:aws:sns:us-east-1:000000000000:t".into(),
    ] {
        api.put(
            "/2015-03-31/functions/f/configuration",
            json!({"DeadLetterConfig": {"TargetArn": arn}}),
        )
        .await
        .assert_error(400, "InvalidParameterValueException");
    }
    // An empty TargetArn removes it.
    let conf = api
        .put(
            "/2015-03-31/functions/f/configuration",
            json!({"DeadLetterConfig": {"TargetArn": ""}}),
        )
        .await
        .json();
    assert!(conf.get("DeadLetterConfig").is_none(), "{conf}");
}

#[tokio::test]
async fn throttled_events_wait_and_all_run_none_counted_as_retries() {
    let api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    api.put(CFG, json!({"MaximumRetryAttempts": 0}))
        .await
        .assert_status(200);
    api.invoker.set(Mode::Throttle(
        "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
    ));
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = api
            .invoke("f", "", EVENT, format!(r#"{{"i":{i}}}"#).as_bytes())
            .await;
        r.assert_status(202);
        ids.push(r.header("x-amzn-requestid").expect("id"));
    }
    until("throttled attempts", || api.invoker.calls().len() > 40).await;
    let status = api.get("/hearth/v1/functions/f/status").await.json();
    assert_eq!(status["Async"]["Depth"], 20, "{status}");
    assert!(status["Async"]["Throttled"].as_u64().expect("n") > 0);
    assert!(status["Async"]["OldestEventAgeSeconds"].as_f64().is_some());
    let before = api.invoker.calls().len();
    api.invoker.set(Mode::Echo);
    until("every event to run", || {
        let ran: std::collections::HashSet<String> = api.invoker.calls()[before..]
            .iter()
            .map(|c| c.request_id.clone())
            .collect();
        ids.iter().all(|id| ran.contains(id))
    })
    .await;
    // The last attempts commit their outcome just after they ran.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = api.get("/hearth/v1/functions/f/status").await.json();
        if status["Async"]["Depth"] == 0 || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(failed(&api).await.is_empty(), "throttles are not failures");
    assert_eq!(status["Async"]["Depth"], 0);
    assert_eq!(status["Async"]["Retried"], 0);
    assert_eq!(status["Async"]["Succeeded"], 20);
}

#[tokio::test]
async fn queued_events_survive_a_restart() {
    let mut api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    api.invoker.set(Mode::Throttle("x".into()));
    let mut ids = Vec::new();
    for _ in 0..10 {
        let r = api.invoke("f", "", EVENT, b"{}").await;
        r.assert_status(202);
        ids.push(r.header("x-amzn-requestid").expect("id"));
    }
    api.restart().await;
    let before = api.invoker.calls().len();
    api.invoker.set(Mode::Echo);
    until("the queued events to run after the restart", || {
        let ran: std::collections::HashSet<String> = api.invoker.calls()[before..]
            .iter()
            .map(|c| c.request_id.clone())
            .collect();
        ids.iter().all(|id| ran.contains(id))
    })
    .await;
}

#[tokio::test]
async fn events_of_a_deleted_function_are_kept_as_failed() {
    let api = api().await;
    api.create("f", json!({})).await.assert_status(201);
    api.invoker.set(Mode::Throttle("x".into()));
    api.invoke("f", "", EVENT, b"{}").await.assert_status(202);
    api.delete("/2015-03-31/functions/f")
        .await
        .assert_status(204);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = failed(&api).await;
        if let Some(e) = s.first() {
            assert_eq!(e["Condition"], "FunctionNotFound");
            break;
        }
        assert!(Instant::now() < deadline, "the event was not kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
