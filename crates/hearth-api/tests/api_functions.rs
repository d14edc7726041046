//! Functions: create, get, list (paginated), update code and configuration, delete;
//! validation; authentication; persistence across restarts.

mod common;

use common::*;
use http::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn create_get_and_configuration_shape() {
    let api = Api::new().await;
    let r = api
        .create(
            "hello",
            json!({
                "Description": "says hello",
                "MemorySize": 256,
                "Timeout": 30,
                "Environment": {"Variables": {"GREETING": "hi"}},
                "Tags": {"team": "a"},
                "Architectures": ["x86_64"],
                "SomeFutureField": {"x": 1},
            }),
        )
        .await;
    r.assert_status(201);
    let c = r.json();
    assert_eq!(c["FunctionName"], "hello");
    assert_eq!(c["FunctionArn"], format!("{ARN_PREFIX}hello"));
    assert_eq!(c["Runtime"], "python3.11");
    assert_eq!(c["Handler"], "app.handler");
    assert_eq!(c["Role"], ROLE);
    assert_eq!(c["MemorySize"], 256);
    assert_eq!(c["Timeout"], 30);
    assert_eq!(c["Description"], "says hello");
    assert_eq!(c["Version"], "$LATEST");
    assert_eq!(c["Environment"]["Variables"]["GREETING"], "hi");
    assert_eq!(c["State"], "Active");
    assert_eq!(c["LastUpdateStatus"], "Successful");
    assert_eq!(c["PackageType"], "Zip");
    assert_eq!(c["Architectures"], json!(["x86_64"]));
    assert_eq!(c["EphemeralStorage"]["Size"], 512);
    assert_eq!(
        c["SnapStart"],
        json!({"ApplyOn": "None", "OptimizationStatus": "Off"})
    );
    assert_eq!(c["TracingConfig"]["Mode"], "PassThrough");
    assert_eq!(
        c["LoggingConfig"],
        json!({"LogFormat": "Text", "LogGroup": "/aws/lambda/hello"})
    );
    let zip = handler_zip("v1");
    assert_eq!(c["CodeSize"], zip.len());
    assert_eq!(c["CodeSha256"], b64(&sha2_digest(&zip)));
    assert!(uuid::Uuid::parse_str(c["RevisionId"].as_str().expect("rev")).is_ok());
    let lm = c["LastModified"].as_str().expect("LastModified");
    assert!(
        chrono::DateTime::parse_from_str(lm, "%Y-%m-%dT%H:%M:%S%.3f%z").is_ok(),
        "{lm}"
    );
    assert!(lm.ends_with("+0000") && lm.len() == 28, "{lm}");
    assert!(c.get("StateReasonCode").is_none());

    let g = api.get(&fpath("hello")).await;
    g.assert_status(200);
    let g = g.json();
    assert_eq!(g["Configuration"], c);
    assert_eq!(g["Code"]["RepositoryType"], "S3");
    let location = g["Code"]["Location"].as_str().expect("Location");
    assert!(
        location.starts_with("http://localhost:9000/hearth/v1/code/"),
        "{location}"
    );
    assert_eq!(g["Tags"], json!({"team": "a"}));
    assert!(g.get("Concurrency").is_none());

    let conf = api.get(&format!("{}/configuration", fpath("hello"))).await;
    conf.assert_status(200);
    assert_eq!(conf.json(), c);

    // The code is unpacked, content-addressed.
    let hex = hex::encode(sha2_digest(&zip));
    let unpacked = api.data_dir().join("code").join(hex).join("app.py");
    assert!(unpacked.is_file(), "{unpacked:?}");

    // Full and partial ARNs name the same function.
    for name in [
        format!("{ARN_PREFIX}hello"),
        "000000000000:function:hello".to_string(),
    ] {
        let r = api.get(&format!("{}/configuration", fpath(&name))).await;
        r.assert_status(200);
        assert_eq!(r.json()["FunctionName"], "hello");
    }
}

fn sha2_digest(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

#[tokio::test]
async fn create_validation_rejects_and_stores_nothing() {
    let api = Api::new().await;
    let long_desc = "d".repeat(257);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"Runtime": "nodejs20.x"}), "runtime"),
        (json!({"Runtime": null}), "no runtime"),
        (json!({"Handler": null}), "python needs a handler"),
        (json!({"Handler": "has space"}), "handler pattern"),
        (json!({"Role": "not-an-arn"}), "role"),
        (json!({"Role": null}), "no role"),
        (json!({"MemorySize": 64}), "memory low"),
        (json!({"MemorySize": 10241}), "memory high"),
        (json!({"Timeout": 0}), "timeout low"),
        (json!({"Timeout": 901}), "timeout high"),
        (json!({"MemorySize": "lots"}), "wrong type"),
        (
            json!({"Environment": {"Variables": {"1BAD": "x"}}}),
            "env key",
        ),
        (
            json!({"Environment": {"Variables": {"AWS_REGION": "x"}}}),
            "reserved env",
        ),
        (
            json!({"Environment": {"Variables": {"BIG": "x".repeat(4100)}}}),
            "env size",
        ),
        (
            json!({"Environment": {"Variables": {"N": 1}}}),
            "env value type",
        ),
        (json!({"Architectures": ["arm64"]}), "arch"),
        (json!({"Description": long_desc}), "description"),
        (json!({"PackageType": "Image"}), "image"),
        (json!({"Code": {"S3Bucket": "b", "S3Key": "k"}}), "s3 code"),
        (json!({"Code": {"ImageUri": "x"}}), "image code"),
        (json!({"Code": {}}), "no zip"),
        (json!({"Code": {"ZipFile": "!!!not base64"}}), "bad base64"),
        (json!({"Code": null}), "no code"),
        (
            json!({"Layers": ["arn:aws:lambda:us-east-1:000000000000:layer:x:1"]}),
            "layers",
        ),
        (json!({"EphemeralStorage": {"Size": 100}}), "ephemeral"),
        (json!({"SnapStart": {"ApplyOn": "Always"}}), "snapstart"),
    ];
    for (extra, what) in cases {
        let r = api.create("f", extra).await;
        assert_eq!(
            r.status.as_u16(),
            400,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.error_type().as_deref(),
            Some("InvalidParameterValueException"),
            "{what}"
        );
    }
    for bad_name in ["", "has space", "a.b", &"x".repeat(65)] {
        let r = api.create(bad_name, json!({})).await;
        r.assert_error(400, "InvalidParameterValueException");
    }
    let r = api
        .post("/2015-03-31/functions", json!("not an object"))
        .await;
    assert_eq!(r.status.as_u16(), 400);
    let r = api
        .send(
            Method::POST,
            "/2015-03-31/functions",
            &[],
            b"{broken".to_vec(),
        )
        .await;
    r.assert_error(400, "InvalidRequestContentException");

    let list = api.get("/2015-03-31/functions").await.json();
    assert_eq!(list["Functions"], json!([]), "nothing was created");
    let code = api.data_dir().join("code");
    let stored = std::fs::read_dir(&code).map(|d| d.count()).unwrap_or(0);
    assert_eq!(stored, 0, "no code stored for rejected requests");
}

#[tokio::test]
async fn provided_runtime_needs_no_handler_and_duplicates_conflict() {
    let api = Api::new().await;
    let zip = zip_of(&[("bootstrap", b"#!/bin/sh\necho hi\n", 0o755)]);
    let r = api
        .create(
            "shell",
            json!({"Runtime": "provided.al2023", "Handler": null, "Code": {"ZipFile": b64(&zip)}}),
        )
        .await;
    r.assert_status(201);
    assert!(r.json().get("Handler").is_none());
    let again = api.create("shell", json!({"Runtime": "provided"})).await;
    again.assert_error(409, "ResourceConflictException");
    assert!(
        again.json()["message"]
            .as_str()
            .expect("msg")
            .contains("shell")
    );
    // The bootstrap kept its execute bit.
    use std::os::unix::fs::PermissionsExt;
    let hex = hex::encode(sha2_digest(&zip));
    let mode = std::fs::metadata(api.data_dir().join("code").join(hex).join("bootstrap"))
        .expect("bootstrap")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[tokio::test]
async fn get_missing_is_404_with_lambda_message() {
    let api = Api::new().await;
    let r = api.get(&fpath("nope")).await;
    r.assert_error(404, "ResourceNotFoundException");
    assert_eq!(
        r.json()["Message"],
        format!("Function not found: {ARN_PREFIX}nope")
    );
    assert_eq!(r.json()["Type"], "User");
    api.create("f", json!({})).await.assert_status(201);
    let r = api.get(&format!("{}?Qualifier=7", fpath("f"))).await;
    r.assert_error(404, "ResourceNotFoundException");
    assert_eq!(
        r.json()["message"],
        format!("Function not found: {ARN_PREFIX}f:7")
    );
    let r = api
        .get(&format!(
            "{}/configuration?Qualifier=nosuchalias",
            fpath("f")
        ))
        .await;
    r.assert_error(404, "ResourceNotFoundException");
    // Another account's or region's ARN is not here.
    let r = api
        .get(&fpath("arn:aws:lambda:eu-west-1:000000000000:function:f"))
        .await;
    r.assert_error(404, "ResourceNotFoundException");
    // Mismatched qualifiers.
    let r = api.get(&format!("{}?Qualifier=2", fpath("f:1"))).await;
    r.assert_error(400, "InvalidParameterValueException");
}

#[tokio::test]
async fn list_functions_paginates() {
    let api = Api::new().await;
    let mut names: Vec<String> = (0..57).map(|i| format!("fn-{i:03}")).collect();
    for n in &names {
        api.create(n, json!({})).await.assert_status(201);
    }
    names.sort();

    // Default page: 50, then the rest.
    let p1 = api.get("/2015-03-31/functions").await.json();
    assert_eq!(p1["Functions"].as_array().expect("list").len(), 50);
    let marker = p1["NextMarker"].as_str().expect("more remain").to_string();
    let p2 = api
        .get(&format!("/2015-03-31/functions?Marker={}", urlenc(&marker)))
        .await
        .json();
    assert_eq!(p2["Functions"].as_array().expect("list").len(), 7);
    assert!(p2.get("NextMarker").is_none(), "no marker on the last page");

    // Small pages collect every name exactly once, in order.
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let q = match &marker {
            Some(m) => format!("?MaxItems=10&Marker={}", urlenc(m)),
            None => "?MaxItems=10".to_string(),
        };
        let page = api.get(&format!("/2015-03-31/functions{q}")).await.json();
        let fns = page["Functions"].as_array().expect("list");
        assert!(fns.len() <= 10);
        seen.extend(
            fns.iter()
                .map(|f| f["FunctionName"].as_str().expect("name").to_string()),
        );
        match page.get("NextMarker").and_then(Value::as_str) {
            Some(m) => marker = Some(m.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, names);

    // MaxItems above 50 still gives 50; invalid values are rejected.
    let big = api.get("/2015-03-31/functions?MaxItems=500").await.json();
    assert_eq!(big["Functions"].as_array().expect("list").len(), 50);
    api.get("/2015-03-31/functions?MaxItems=0")
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.get("/2015-03-31/functions?Marker=%%%")
        .await
        .assert_status(400);
    api.get("/2015-03-31/functions?Marker=bm90LWEtbWFya2Vy")
        .await
        .assert_error(400, "InvalidParameterValueException");
}

fn urlenc(s: &str) -> String {
    hearth_api::sigv4::encode_query_component(s)
}

#[tokio::test]
async fn list_functions_all_versions() {
    let api = Api::new().await;
    api.create("a", json!({"Publish": true}))
        .await
        .assert_status(201);
    api.create("b", json!({})).await.assert_status(201);
    let plain = api.get("/2015-03-31/functions").await.json();
    let versions: Vec<&str> = plain["Functions"]
        .as_array()
        .expect("l")
        .iter()
        .map(|f| f["Version"].as_str().expect("v"))
        .collect();
    assert_eq!(versions, ["$LATEST", "$LATEST"]);
    let all = api
        .get("/2015-03-31/functions?FunctionVersion=ALL")
        .await
        .json();
    let pairs: Vec<(String, String)> = all["Functions"]
        .as_array()
        .expect("l")
        .iter()
        .map(|f| {
            (
                f["FunctionName"].as_str().expect("n").into(),
                f["Version"].as_str().expect("v").into(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("a".into(), "$LATEST".into()),
            ("a".into(), "1".into()),
            ("b".into(), "$LATEST".into())
        ]
    );
    // Paging one at a time walks the same sequence.
    let mut walked = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let q = match &marker {
            Some(m) => format!("?FunctionVersion=ALL&MaxItems=1&Marker={}", urlenc(m)),
            None => "?FunctionVersion=ALL&MaxItems=1".into(),
        };
        let page = api.get(&format!("/2015-03-31/functions{q}")).await.json();
        for f in page["Functions"].as_array().expect("l") {
            walked.push((
                f["FunctionName"].as_str().expect("n").to_string(),
                f["Version"].as_str().expect("v").to_string(),
            ));
        }
        match page.get("NextMarker").and_then(Value::as_str) {
            Some(m) => marker = Some(m.into()),
            None => break,
        }
    }
    assert_eq!(walked, pairs);
    api.get("/2015-03-31/functions?FunctionVersion=SOME")
        .await
        .assert_error(400, "InvalidParameterValueException");
}

#[tokio::test]
async fn update_code_and_configuration() {
    let api = Api::new().await;
    let created = api
        .create("f", json!({"Environment": {"Variables": {"A": "1"}}}))
        .await
        .json();
    let rev0 = created["RevisionId"].as_str().expect("rev").to_string();

    let zip2 = handler_zip("v2");
    let r = api
        .put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(&zip2)}),
        )
        .await;
    r.assert_status(200);
    let c = r.json();
    assert_eq!(c["CodeSha256"], b64(&sha2_digest(&zip2)));
    assert_eq!(c["CodeSize"], zip2.len());
    assert_eq!(c["Version"], "$LATEST");
    let rev1 = c["RevisionId"].as_str().expect("rev").to_string();
    assert_ne!(rev0, rev1);
    assert_eq!(api.invoker.retired(), ["f"]);

    // A stale RevisionId is refused and changes nothing.
    let r = api
        .put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(&handler_zip("v3")), "RevisionId": rev0}),
        )
        .await;
    r.assert_error(412, "PreconditionFailedException");
    let r = api
        .put(
            &format!("{}/configuration", fpath("f")),
            json!({"Timeout": 9, "RevisionId": rev0}),
        )
        .await;
    r.assert_error(412, "PreconditionFailedException");
    let now = api
        .get(&format!("{}/configuration", fpath("f")))
        .await
        .json();
    assert_eq!(now["CodeSha256"], b64(&sha2_digest(&zip2)));
    assert_eq!(now["Timeout"], 3);
    assert_eq!(now["RevisionId"], rev1);

    // Configuration update with the right revision.
    let r = api
        .put(
            &format!("{}/configuration", fpath("f")),
            json!({
                "RevisionId": rev1, "Timeout": 60, "MemorySize": 1024, "Description": "new",
                "Handler": "app.other", "Environment": {"Variables": {"B": "2"}},
                "SnapStart": {"ApplyOn": "PublishedVersions"},
            }),
        )
        .await;
    r.assert_status(200);
    let c = r.json();
    assert_eq!(c["Timeout"], 60);
    assert_eq!(c["MemorySize"], 1024);
    assert_eq!(c["Description"], "new");
    assert_eq!(c["Handler"], "app.other");
    assert_eq!(c["Environment"]["Variables"], json!({"B": "2"}));
    assert_eq!(c["SnapStart"]["ApplyOn"], "PublishedVersions");
    assert_eq!(c["CodeSha256"], b64(&sha2_digest(&zip2)), "code unchanged");
    assert_eq!(api.invoker.retired(), ["f", "f"]);

    // Clearing the environment.
    let c = api
        .put(
            &format!("{}/configuration", fpath("f")),
            json!({"Environment": {}}),
        )
        .await
        .json();
    assert!(c.get("Environment").is_none());

    // Invalid updates change nothing.
    let before = api
        .get(&format!("{}/configuration", fpath("f")))
        .await
        .json();
    for bad in [
        json!({"MemorySize": 1}),
        json!({"Runtime": "java21"}),
        json!({"Environment": {"Variables": {"AWS_LAMBDA_FUNCTION_NAME": "x"}}}),
        json!({"Timeout": "x"}),
        json!({"Role": "nope"}),
    ] {
        api.put(&format!("{}/configuration", fpath("f")), bad)
            .await
            .assert_error(400, "InvalidParameterValueException");
    }
    assert_eq!(
        api.get(&format!("{}/configuration", fpath("f")))
            .await
            .json(),
        before
    );

    // Code update errors.
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"S3Bucket": "b", "S3Key": "k"}),
    )
    .await
    .assert_error(400, "InvalidParameterValueException");
    api.put(
        &format!("{}/code", fpath("missing")),
        json!({"ZipFile": b64(&zip2)}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.put(
        &format!("{}/configuration", fpath("missing")),
        json!({"Timeout": 5}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");

    // DryRun validates without changing the function.
    let dry = api
        .put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(&handler_zip("v9")), "DryRun": true}),
        )
        .await;
    dry.assert_status(200);
    assert_eq!(
        api.get(&format!("{}/configuration", fpath("f")))
            .await
            .json(),
        before
    );

    // Update code with Publish returns the new version.
    let r = api
        .put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(&handler_zip("v4")), "Publish": true}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["Version"], "1");
    assert_eq!(r.json()["FunctionArn"], format!("{ARN_PREFIX}f:1"));
}

#[tokio::test]
async fn delete_function_and_versions() {
    let api = Api::new().await;
    api.create("f", json!({"Publish": true}))
        .await
        .assert_status(201);
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"ZipFile": b64(&handler_zip("v2")), "Publish": true}),
    )
    .await
    .assert_status(200);
    api.post(
        &format!("{}/aliases", fpath("f")),
        json!({"Name": "live", "FunctionVersion": "2"}),
    )
    .await
    .assert_status(201);

    api.delete(&format!("{}?Qualifier=2", fpath("f")))
        .await
        .assert_error(409, "ResourceConflictException");
    api.delete(&format!("{}?Qualifier=$LATEST", fpath("f")))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.delete(&format!("{}?Qualifier=live", fpath("f")))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.delete(&format!("{}?Qualifier=9", fpath("f")))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(&format!("{}?Qualifier=1", fpath("f")))
        .await
        .assert_status(204);
    api.get(&format!("{}?Qualifier=1", fpath("f")))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.get(&format!("{}?Qualifier=2", fpath("f")))
        .await
        .assert_status(200);

    api.delete(&fpath("f")).await.assert_status(204);
    api.get(&fpath("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(&fpath("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    assert!(api.invoker.retired().iter().filter(|n| *n == "f").count() >= 3);

    // The name is free again; versions start from 1.
    let r = api.create("f", json!({"Publish": true})).await;
    r.assert_status(201);
    assert_eq!(r.json()["Version"], "1");
}

#[tokio::test]
async fn authentication_is_required_and_failures_change_nothing() {
    let api = Api::new().await;
    let body = json!({
        "FunctionName": "sneaky", "Runtime": "python3.11", "Role": ROLE, "Handler": "app.handler",
        "Code": {"ZipFile": b64(&handler_zip("x"))},
    })
    .to_string()
    .into_bytes();

    let r = api
        .send_as(
            None,
            Method::POST,
            "/2015-03-31/functions",
            &[],
            body.clone(),
        )
        .await;
    r.assert_error(403, "MissingAuthenticationTokenException");
    let r = api
        .send_as(
            Some(("AKIDUNKNOWN", SECRET)),
            Method::POST,
            "/2015-03-31/functions",
            &[],
            body.clone(),
        )
        .await;
    r.assert_error(403, "UnrecognizedClientException");
    assert_eq!(
        r.json()["message"],
        "The security token included in the request is invalid."
    );
    let r = api
        .send_as(
            Some((AKID, "wrong-secret")),
            Method::POST,
            "/2015-03-31/functions",
            &[],
            body.clone(),
        )
        .await;
    r.assert_error(403, "InvalidSignatureException");

    // Unknown routes need a signature too.
    api.send_as(None, Method::GET, "/nope", &[], vec![])
        .await
        .assert_error(403, "MissingAuthenticationTokenException");
    api.get("/nope")
        .await
        .assert_error(404, "UnknownOperationException");
    api.send(Method::PATCH, "/2015-03-31/functions", &[], vec![])
        .await
        .assert_error(404, "UnknownOperationException");

    // An old signature is expired.
    let mut headers = http::HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("localhost:9000"));
    let params = hearth_api::sigv4::SigningParams {
        access_key_id: AKID,
        secret_access_key: SECRET,
        region: "us-east-1",
        service: "lambda",
        time: chrono::Utc::now() - chrono::TimeDelta::minutes(20),
        content_sha256_header: true,
    };
    for (k, v) in hearth_api::sigv4::sign(
        &Method::POST,
        "http://localhost:9000/2015-03-31/functions",
        &headers,
        &body,
        &params,
    )
    .expect("sign")
    {
        headers.insert(k, v);
    }
    let r = api
        .send_raw(
            Method::POST,
            "/2015-03-31/functions",
            headers.clone(),
            body.clone(),
        )
        .await;
    r.assert_error(403, "InvalidSignatureException");
    assert!(
        r.json()["message"]
            .as_str()
            .expect("m")
            .starts_with("Signature expired")
    );

    // A signed request whose body was swapped.
    let mut headers = http::HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("localhost:9000"));
    let params = hearth_api::sigv4::SigningParams {
        time: chrono::Utc::now(),
        content_sha256_header: false,
        ..params
    };
    for (k, v) in hearth_api::sigv4::sign(
        &Method::POST,
        "http://localhost:9000/2015-03-31/functions",
        &headers,
        b"{}",
        &params,
    )
    .expect("sign")
    {
        headers.insert(k, v);
    }
    api.send_raw(Method::POST, "/2015-03-31/functions", headers, body.clone())
        .await
        .assert_error(403, "InvalidSignatureException");

    let list = api.get("/2015-03-31/functions").await.json();
    assert_eq!(list["Functions"], json!([]), "nothing was created");
    assert!(!api.data_dir().join("code").exists(), "no code stored");
}

#[tokio::test]
async fn restart_keeps_everything() {
    let mut api = Api::new().await;
    api.create(
        "keep",
        json!({"Publish": true, "Environment": {"Variables": {"K": "v"}}}),
    )
    .await
    .assert_status(201);
    api.alias("keep", "live", "1").await;
    api.put(
        &format!("/2017-10-31/functions/{}/concurrency", "keep"),
        json!({"ReservedConcurrentExecutions": 5}),
    )
    .await
    .assert_status(200);
    api.invoke("keep", "", &[], b"{\"x\":1}")
        .await
        .assert_status(200);
    // Code.Location is a fresh presigned URL every time; the rest must not change.
    let without_location = |mut g: Value| {
        g["Code"]["Location"].take();
        g
    };
    let before = without_location(api.get(&fpath("keep")).await.json());
    let versions_before = api.get(&format!("{}/versions", fpath("keep"))).await.json();

    api.restart().await;

    assert_eq!(
        without_location(api.get(&fpath("keep")).await.json()),
        before
    );
    assert_eq!(
        api.get(&format!("{}/versions", fpath("keep"))).await.json(),
        versions_before
    );
    let alias = api.get(&format!("{}/aliases/live", fpath("keep"))).await;
    alias.assert_status(200);
    assert_eq!(alias.json()["FunctionVersion"], "1");
    let logs = api.get("/hearth/v1/functions/keep/logs").await;
    assert!(String::from_utf8_lossy(&logs.body).contains("hello from keep"));
    // And it keeps working: the next version is 2.
    api.put(
        &format!("{}/code", fpath("keep")),
        json!({"ZipFile": b64(&handler_zip("v2"))}),
    )
    .await
    .assert_status(200);
    let v = api
        .post(&format!("{}/versions", fpath("keep")), json!({}))
        .await;
    v.assert_status(201);
    assert_eq!(v.json()["Version"], "2");
}
