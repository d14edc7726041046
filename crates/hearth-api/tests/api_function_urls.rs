//! Function URLs: the configuration operations, and requests to a URL through the router (the
//! 2.0 event the function gets, the mapping of its result, CORS, `AWS_IAM`).
mod common;

use common::*;
use hearth_api::sigv4::{SigningParams, sign};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{Value, json};

const URL: &str = "/2021-10-31/functions/f/url";

/// The function `f` with a URL (`extra` merged into the request); returns the url-id.
async fn with_url(api: &Api, extra: Value) -> String {
    api.create("f", json!({})).await.assert_status(201);
    let mut body = json!({"AuthType": "NONE"});
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    let r = api.post(URL, body).await;
    r.assert_status(201);
    url_id(&r.json())
}

fn url_id(config: &Value) -> String {
    let url = config["FunctionUrl"].as_str().expect("FunctionUrl");
    let id = url
        .strip_prefix("http://127.0.0.1:9000/lambda-url/")
        .and_then(|rest| rest.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected FunctionUrl {url}"));
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{id}"
    );
    id.to_string()
}

/// A request to a URL (unsigned), with the `Host` given or `127.0.0.1:9000`.
async fn call(
    api: &Api,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut map = HeaderMap::new();
    map.insert("host", HeaderValue::from_static("127.0.0.1:9000"));
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    api.send_raw(method, path_and_query, map, body.to_vec())
        .await
}

/// A request to a URL signed with `secret` for `service`.
async fn call_signed(api: &Api, path_and_query: &str, secret: &str, service: &str) -> Resp {
    let mut map = HeaderMap::new();
    map.insert("host", HeaderValue::from_static("127.0.0.1:9000"));
    let url = format!("http://127.0.0.1:9000{path_and_query}");
    let params = SigningParams {
        access_key_id: AKID,
        secret_access_key: secret,
        region: "us-east-1",
        service,
        time: chrono::Utc::now(),
        content_sha256_header: false,
    };
    for (k, v) in sign(&Method::GET, &url, &map, b"", &params).expect("sign") {
        map.insert(k, v);
    }
    api.send_raw(Method::GET, path_and_query, map, Vec::new())
        .await
}

fn all(resp: &Resp, name: &str) -> Vec<String> {
    resp.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect()
}

#[tokio::test]
async fn url_config_lifecycle() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let cors =
        json!({"AllowOrigins": ["https://app.example"], "AllowMethods": ["GET"], "MaxAge": 60});
    let r = api
        .post(URL, json!({"AuthType": "NONE", "Cors": cors}))
        .await;
    r.assert_status(201);
    let c = r.json();
    let id = url_id(&c);
    assert_eq!(c["FunctionArn"], format!("{ARN_PREFIX}f"));
    assert_eq!(c["AuthType"], "NONE");
    assert_eq!(c["InvokeMode"], "BUFFERED");
    assert_eq!(c["Cors"], cors);
    assert!(c["CreationTime"].as_str().is_some_and(|t| t.ends_with('Z')));

    api.post(URL, json!({"AuthType": "NONE"}))
        .await
        .assert_error(409, "ResourceConflictException");

    let g = api.get(URL).await;
    g.assert_status(200);
    assert_eq!(url_id(&g.json()), id);
    assert!(g.json()["LastModifiedTime"].is_string());

    // Update: the fields given change; the URL stays.
    let u = api.put(URL, json!({"AuthType": "AWS_IAM"})).await;
    u.assert_status(200);
    let u = u.json();
    assert_eq!(u["AuthType"], "AWS_IAM");
    assert_eq!(u["Cors"], cors);
    assert_eq!(url_id(&u), id);

    // A URL on an alias (not on a version).
    api.publish("f").await;
    api.alias("f", "live", "1").await;
    let a = api
        .post(
            &format!("{URL}?Qualifier=live"),
            json!({"AuthType": "NONE"}),
        )
        .await;
    a.assert_status(201);
    let alias_id = url_id(&a.json());
    assert_ne!(alias_id, id);
    assert_eq!(a.json()["FunctionArn"], format!("{ARN_PREFIX}f:live"));

    let l = api.get("/2021-10-31/functions/f/urls").await;
    l.assert_status(200);
    assert_eq!(
        l.json()["FunctionUrlConfigs"].as_array().map(Vec::len),
        Some(2)
    );
    let p1 = api
        .get("/2021-10-31/functions/f/urls?MaxItems=1")
        .await
        .json();
    assert_eq!(p1["FunctionUrlConfigs"].as_array().map(Vec::len), Some(1));
    let marker = p1["NextMarker"].as_str().expect("marker");
    let p2 = api
        .get(&format!(
            "/2021-10-31/functions/f/urls?MaxItems=1&Marker={marker}"
        ))
        .await
        .json();
    assert_eq!(p2["FunctionUrlConfigs"].as_array().map(Vec::len), Some(1));
    assert!(p2.get("NextMarker").is_none());
    assert_ne!(
        p1["FunctionUrlConfigs"][0]["FunctionUrl"],
        p2["FunctionUrlConfigs"][0]["FunctionUrl"]
    );

    // Deleting the alias deletes its URL.
    api.delete(&format!("{}/aliases/live", fpath("f")))
        .await
        .assert_status(204);
    let path = format!("/lambda-url/{alias_id}/");
    call(&api, Method::GET, &path, &[], b"")
        .await
        .assert_status(403);

    api.delete(URL).await.assert_status(204);
    api.get(URL)
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(URL)
        .await
        .assert_error(404, "ResourceNotFoundException");
    let l = api.get("/2021-10-31/functions/f/urls").await.json();
    assert_eq!(l["FunctionUrlConfigs"], json!([]));
    let path = format!("/lambda-url/{id}/");
    call(&api, Method::GET, &path, &[], b"")
        .await
        .assert_status(403);
}

#[tokio::test]
async fn deleting_the_function_deletes_its_url() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    let path = format!("/lambda-url/{id}/");
    call(&api, Method::GET, &path, &[], b"")
        .await
        .assert_status(200);
    api.delete(&fpath("f")).await.assert_status(204);
    call(&api, Method::GET, &path, &[], b"")
        .await
        .assert_status(403);
    // A new function of that name starts without a URL.
    api.create("f", json!({})).await.assert_status(201);
    api.get(URL)
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn url_config_validation() {
    let api = Api::new().await;
    api.post(
        "/2021-10-31/functions/nope/url",
        json!({"AuthType": "NONE"}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.create("f", json!({})).await.assert_status(201);
    api.post(URL, json!({}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(URL, json!({"AuthType": "OPEN"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(URL, json!({"AuthType": "NONE", "InvokeMode": "FAST"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(&format!("{URL}?Qualifier=1"), json!({"AuthType": "NONE"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(
        &format!("{URL}?Qualifier=nosuch"),
        json!({"AuthType": "NONE"}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.post(URL, json!({"AuthType": "NONE", "Cors": {"MaxAge": 90000}}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(
        URL,
        json!({"AuthType": "NONE", "Cors": {"AllowMethods": ["FETCH"]}}),
    )
    .await
    .assert_error(400, "InvalidParameterValueException");
    api.put(URL, json!({"AuthType": "NONE"}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    // Nothing above was stored; the invoke mode is kept and can be changed.
    api.get(URL)
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.post(URL, json!({"AuthType": "NONE"}))
        .await
        .assert_status(201);
    assert_eq!(api.get(URL).await.json()["InvokeMode"], "BUFFERED");
    api.put(URL, json!({"InvokeMode": "RESPONSE_STREAM"}))
        .await
        .assert_status(200);
    assert_eq!(api.get(URL).await.json()["InvokeMode"], "RESPONSE_STREAM");
    api.put(URL, json!({"InvokeMode": "STREAMING"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.put(URL, json!({"AuthType": "AWS_IAM"}))
        .await
        .assert_status(200);
    assert_eq!(
        api.get(URL).await.json()["InvokeMode"],
        "RESPONSE_STREAM",
        "an update without InvokeMode keeps it"
    );
    api.put(URL, json!({"InvokeMode": "BUFFERED", "AuthType": "NONE"}))
        .await
        .assert_status(200);
    api.get("/2021-10-31/functions/f/urls?MaxItems=0")
        .await
        .assert_error(400, "InvalidParameterValueException");
    // The operations are behind SigV4 like the rest of the API.
    api.send_as(None, Method::GET, URL, &[], Vec::new())
        .await
        .assert_status(403);
}

#[tokio::test]
async fn the_function_gets_a_2_0_event() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    // The fake invoker echoes: the response body is the event.
    let r = call(
        &api,
        Method::GET,
        &format!("/lambda-url/{id}/some/path?a=1&b=x%20y&a=2"),
        &[
            ("cookie", "c1=v1; c2=v2"),
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("user-agent", "url-test/1.0"),
        ],
        b"",
    )
    .await;
    r.assert_status(200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let e = r.json();
    assert_eq!(e["version"], "2.0");
    assert_eq!(e["routeKey"], "$default");
    assert_eq!(e["rawPath"], "/some/path");
    assert_eq!(e["rawQueryString"], "a=1&b=x%20y&a=2");
    assert_eq!(e["cookies"], json!(["c1=v1", "c2=v2"]));
    assert_eq!(e["queryStringParameters"], json!({"a": "1,2", "b": "x y"}));
    assert_eq!(e["headers"]["x-custom"], "one,two");
    assert_eq!(e["headers"]["user-agent"], "url-test/1.0");
    assert_eq!(e["headers"]["host"], "127.0.0.1:9000");
    assert!(e["headers"].get("cookie").is_none());
    assert_eq!(e["isBase64Encoded"], false);
    assert!(e.get("body").is_none());
    let c = &e["requestContext"];
    assert_eq!(c["accountId"], "000000000000");
    assert_eq!(c["apiId"], id.as_str());
    assert_eq!(c["domainPrefix"], id.as_str());
    assert_eq!(c["domainName"], "127.0.0.1:9000");
    assert_eq!(c["http"]["method"], "GET");
    assert_eq!(c["http"]["path"], "/some/path");
    assert_eq!(c["http"]["protocol"], "HTTP/1.1");
    assert_eq!(c["http"]["userAgent"], "url-test/1.0");
    assert!(c["http"]["sourceIp"].is_string());
    assert_eq!(c["routeKey"], "$default");
    assert_eq!(c["stage"], "$default");
    assert_eq!(
        Some(c["requestId"].as_str().expect("id").to_string()),
        r.header("x-amzn-requestid")
    );
    let time = c["time"].as_str().expect("time");
    assert!(
        chrono::NaiveDateTime::parse_from_str(time, "%d/%b/%Y:%H:%M:%S +0000").is_ok(),
        "{time}"
    );
    let epoch = c["timeEpoch"].as_i64().expect("epoch");
    assert!((chrono::Utc::now().timestamp_millis() - epoch).abs() < 60_000);

    // It went through the Invoke path: $LATEST, the unqualified ARN.
    let calls = api.invoker.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].spec.name, "f");
    assert_eq!(calls[0].spec.version, "$LATEST");
    assert_eq!(calls[0].invoked_arn, format!("{ARN_PREFIX}f"));
}

#[tokio::test]
async fn bodies_text_and_base64() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    let path = format!("/lambda-url/{id}/upload");
    let bin = [0u8, 1, 2, 0xff, 0xfe];
    let r = call(
        &api,
        Method::POST,
        &path,
        &[("content-type", "application/octet-stream")],
        &bin,
    )
    .await;
    r.assert_status(200);
    let e = r.json();
    assert_eq!(e["isBase64Encoded"], true);
    assert_eq!(e["body"], b64(&bin));
    assert_eq!(e["requestContext"]["http"]["method"], "POST");

    let r = call(
        &api,
        Method::PUT,
        &path,
        &[("content-type", "application/json")],
        br#"{"k": "v"}"#,
    )
    .await;
    let e = r.json();
    assert_eq!(e["isBase64Encoded"], false);
    assert_eq!(e["body"], r#"{"k": "v"}"#);
}

#[tokio::test]
async fn host_routing() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    let host = format!("{id}.lambda-url.us-east-1.example.com");
    let mut map = HeaderMap::new();
    map.insert("host", HeaderValue::from_str(&host).expect("host"));
    let r = api.send_raw(Method::GET, "/x/y?z=1", map, Vec::new()).await;
    r.assert_status(200);
    let e = r.json();
    assert_eq!(e["rawPath"], "/x/y");
    assert_eq!(e["requestContext"]["domainName"], host.as_str());
    // An unknown url-id in the host form: 403, and no Lambda API behind it.
    let mut map = HeaderMap::new();
    let other = format!("{}.lambda-url.us-east-1.example.com", "z".repeat(32));
    map.insert("host", HeaderValue::from_str(&other).expect("host"));
    let r = api
        .send_raw(Method::GET, "/2015-03-31/functions", map, Vec::new())
        .await;
    r.assert_status(403);
    assert_eq!(r.json(), json!({"Message": "Forbidden"}));
}

#[tokio::test]
async fn results_map_to_responses() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    let path = format!("/lambda-url/{id}/");
    let reply = |v: Value| Mode::Reply(v.to_string().into_bytes());

    api.invoker.set(reply(json!({
        "statusCode": 201,
        "headers": {"x-made-by": "test", "content-type": "text/plain"},
        "cookies": ["a=1; Path=/", "b=2; HttpOnly"],
        "body": "created",
    })));
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(201);
    assert_eq!(r.body, b"created");
    assert_eq!(r.header("x-made-by").as_deref(), Some("test"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(all(&r, "set-cookie"), ["a=1; Path=/", "b=2; HttpOnly"]);

    api.invoker.set(reply(json!({
        "statusCode": 200,
        "headers": {"content-type": "image/png"},
        "body": b64(&[137, 80, 78, 71, 0, 255]),
        "isBase64Encoded": true,
    })));
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(200);
    assert_eq!(r.body, [137, 80, 78, 71, 0, 255]);

    // The shortcuts: a string is the body; other JSON is the body as it is.
    api.invoker.set(reply(json!("hello world")));
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(200);
    assert_eq!(r.body, b"hello world");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    api.invoker
        .set(Mode::Reply(br#"{"message": "no status"}"#.to_vec()));
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(200);
    assert_eq!(r.body, br#"{"message": "no status"}"#);

    // A result that is no response.
    api.invoker.set(reply(json!({"statusCode": "teapot"})));
    call(&api, Method::GET, &path, &[], b"")
        .await
        .assert_status(502);
}

#[tokio::test]
async fn failures_answer_as_lambda_urls_do() {
    let api = Api::new().await;
    let id = with_url(&api, json!({})).await;
    let path = format!("/lambda-url/{id}/");
    api.invoker.set(Mode::FunctionError);
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(502);
    assert_eq!(r.body, b"Internal Server Error");
    api.invoker.set(Mode::Throttle(
        "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
    ));
    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(429);
    assert!(r.json()["Message"].is_string());
    let r = call(
        &api,
        Method::GET,
        &format!("/lambda-url/{}/", "q".repeat(32)),
        &[],
        b"",
    )
    .await;
    r.assert_status(403);
    assert_eq!(r.json(), json!({"Message": "Forbidden"}));
}

#[tokio::test]
async fn cors_preflight_and_response_headers() {
    let api = Api::new().await;
    let id = with_url(
        &api,
        json!({"Cors": {
            "AllowOrigins": ["https://app.example"],
            "AllowMethods": ["GET", "POST"],
            "AllowHeaders": ["x-custom"],
            "ExposeHeaders": ["x-made-by"],
            "MaxAge": 300,
            "AllowCredentials": true,
        }}),
    )
    .await;
    let path = format!("/lambda-url/{id}/");
    let r = call(
        &api,
        Method::OPTIONS,
        &path,
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-custom"),
        ],
        b"",
    )
    .await;
    r.assert_status(200);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("access-control-allow-methods").as_deref(),
        Some("GET,POST")
    );
    assert_eq!(
        r.header("access-control-allow-headers").as_deref(),
        Some("x-custom")
    );
    assert_eq!(r.header("access-control-max-age").as_deref(), Some("300"));
    assert_eq!(
        r.header("access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert!(
        api.invoker.calls().is_empty(),
        "a preflight invokes nothing"
    );

    // Another origin gets no CORS headers.
    let r = call(
        &api,
        Method::OPTIONS,
        &path,
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    )
    .await;
    assert!(r.header("access-control-allow-origin").is_none());

    // An ordinary request from the allowed origin.
    let r = call(
        &api,
        Method::GET,
        &path,
        &[("origin", "https://app.example")],
        b"",
    )
    .await;
    r.assert_status(200);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("access-control-expose-headers").as_deref(),
        Some("x-made-by")
    );
    assert_eq!(api.invoker.calls().len(), 1);
}

#[tokio::test]
async fn aws_iam_urls_need_a_valid_signature() {
    let api = Api::new().await;
    let id = with_url(&api, json!({"AuthType": "AWS_IAM"})).await;
    let path = format!("/lambda-url/{id}/private?x=1");

    let r = call(&api, Method::GET, &path, &[], b"").await;
    r.assert_status(403);
    assert_eq!(r.json(), json!({"Message": "Forbidden"}));
    let r = call_signed(&api, &path, "wrong-secret", "lambda").await;
    r.assert_status(403);
    assert_eq!(r.json(), json!({"Message": "Forbidden"}));
    call_signed(&api, &path, SECRET, "s3")
        .await
        .assert_status(403);
    assert!(api.invoker.calls().is_empty());

    let r = call_signed(&api, &path, SECRET, "lambda").await;
    r.assert_status(200);
    let e = r.json();
    assert_eq!(e["rawPath"], "/private");
    assert_eq!(e["requestContext"]["authorizer"]["iam"]["accessKey"], AKID);
}

#[tokio::test]
async fn an_alias_url_invokes_the_alias() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    api.publish("f").await;
    api.alias("f", "live", "1").await;
    let r = api
        .post(
            &format!("{URL}?Qualifier=live"),
            json!({"AuthType": "NONE"}),
        )
        .await;
    r.assert_status(201);
    let id = url_id(&r.json());
    call(&api, Method::GET, &format!("/lambda-url/{id}"), &[], b"")
        .await
        .assert_status(200);
    let calls = api.invoker.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].spec.version, "1");
    assert_eq!(calls[0].invoked_arn, format!("{ARN_PREFIX}f:live"));
    // The unqualified function has no URL of its own.
    api.get(URL)
        .await
        .assert_error(404, "ResourceNotFoundException");
}
