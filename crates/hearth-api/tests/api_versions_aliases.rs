//! Versions (publish, list, immutability) and aliases (CRUD, weighted routing, preconditions).

mod common;

use common::*;
use serde_json::{Value, json};

fn versions_of(v: &Value) -> Vec<String> {
    v["Versions"]
        .as_array()
        .expect("Versions")
        .iter()
        .map(|c| c["Version"].as_str().expect("v").to_string())
        .collect()
}

#[tokio::test]
async fn publish_versions_are_immutable_copies() {
    let api = Api::new().await;
    let created = api
        .create("f", json!({"Description": "first"}))
        .await
        .json();

    let v1 = api
        .post(
            &format!("{}/versions", fpath("f")),
            json!({"Description": "release 1"}),
        )
        .await;
    v1.assert_status(201);
    let v1 = v1.json();
    assert_eq!(v1["Version"], "1");
    assert_eq!(v1["FunctionArn"], format!("{ARN_PREFIX}f:1"));
    assert_eq!(v1["Description"], "release 1");
    assert_eq!(v1["CodeSha256"], created["CodeSha256"]);

    // Nothing changed: publishing again returns version 1.
    let again = api
        .post(&format!("{}/versions", fpath("f")), json!({}))
        .await;
    again.assert_status(201);
    assert_eq!(again.json()["Version"], "1");

    // Change $LATEST; version 1 keeps the old code and configuration.
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"ZipFile": b64(&handler_zip("v2"))}),
    )
    .await
    .assert_status(200);
    api.put(
        &format!("{}/configuration", fpath("f")),
        json!({"MemorySize": 512}),
    )
    .await
    .assert_status(200);
    let still = api
        .get(&format!("{}/configuration?Qualifier=1", fpath("f")))
        .await
        .json();
    assert_eq!(still["CodeSha256"], created["CodeSha256"]);
    assert_eq!(still["MemorySize"], 128);
    assert_eq!(still["Version"], "1");

    // A stale RevisionId or CodeSha256 is refused.
    let latest = api
        .get(&format!("{}/configuration", fpath("f")))
        .await
        .json();
    api.post(
        &format!("{}/versions", fpath("f")),
        json!({"RevisionId": created["RevisionId"]}),
    )
    .await
    .assert_error(412, "PreconditionFailedException");
    api.post(
        &format!("{}/versions", fpath("f")),
        json!({"CodeSha256": created["CodeSha256"]}),
    )
    .await
    .assert_error(400, "InvalidParameterValueException");
    let v2 = api
        .post(
            &format!("{}/versions", fpath("f")),
            json!({"RevisionId": latest["RevisionId"], "CodeSha256": latest["CodeSha256"]}),
        )
        .await;
    v2.assert_status(201);
    let v2 = v2.json();
    assert_eq!(v2["Version"], "2");
    assert_eq!(v2["MemorySize"], 512);
    assert_eq!(
        v2["Description"], "first",
        "a version without its own description keeps $LATEST's"
    );

    // Listing: $LATEST (qualified ARN) then the versions, paginated.
    let list = api.get(&format!("{}/versions", fpath("f"))).await.json();
    assert_eq!(versions_of(&list), ["$LATEST", "1", "2"]);
    assert_eq!(
        list["Versions"][0]["FunctionArn"],
        format!("{ARN_PREFIX}f:$LATEST")
    );
    assert!(list.get("NextMarker").is_none());
    let p1 = api
        .get(&format!("{}/versions?MaxItems=2", fpath("f")))
        .await
        .json();
    assert_eq!(versions_of(&p1), ["$LATEST", "1"]);
    let marker = p1["NextMarker"].as_str().expect("marker");
    let p2 = api
        .get(&format!(
            "{}/versions?MaxItems=2&Marker={marker}",
            fpath("f")
        ))
        .await
        .json();
    assert_eq!(versions_of(&p2), ["2"]);
    assert!(p2.get("NextMarker").is_none());

    api.post(&format!("{}/versions", fpath("missing")), json!({}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.get(&format!("{}/versions", fpath("missing")))
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn create_with_publish_makes_version_one() {
    let api = Api::new().await;
    let r = api.create("f", json!({"Publish": true})).await;
    r.assert_status(201);
    assert_eq!(r.json()["Version"], "1");
    let list = api.get(&format!("{}/versions", fpath("f"))).await.json();
    assert_eq!(versions_of(&list), ["$LATEST", "1"]);
}

async fn with_two_versions(api: &Api) {
    api.create("f", json!({"Publish": true}))
        .await
        .assert_status(201);
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"ZipFile": b64(&handler_zip("v2")), "Publish": true}),
    )
    .await
    .assert_status(200);
}

#[tokio::test]
async fn alias_lifecycle() {
    let api = Api::new().await;
    with_two_versions(&api).await;
    let base = format!("{}/aliases", fpath("f"));

    let r = api
        .post(
            &base,
            json!({"Name": "live", "FunctionVersion": "1", "Description": "prod"}),
        )
        .await;
    r.assert_status(201);
    let a = r.json();
    assert_eq!(a["AliasArn"], format!("{ARN_PREFIX}f:live"));
    assert_eq!(a["Name"], "live");
    assert_eq!(a["FunctionVersion"], "1");
    assert_eq!(a["Description"], "prod");
    assert!(a.get("RoutingConfig").is_none());
    let rev = a["RevisionId"].as_str().expect("rev").to_string();

    api.post(&base, json!({"Name": "live", "FunctionVersion": "2"}))
        .await
        .assert_error(409, "ResourceConflictException");
    api.post(&base, json!({"Name": "123", "FunctionVersion": "1"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(&base, json!({"Name": "x", "FunctionVersion": "9"}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.post(&base, json!({"Name": "x", "FunctionVersion": "abc"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(&base, json!({"FunctionVersion": "1"}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    api.post(
        &format!("{}/aliases", fpath("missing")),
        json!({"Name": "x", "FunctionVersion": "1"}),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    api.post(&base, json!({"Name": "dev", "FunctionVersion": "$LATEST"}))
        .await
        .assert_status(201);

    let got = api.get(&format!("{base}/live")).await;
    got.assert_status(200);
    assert_eq!(got.json(), a);
    api.get(&format!("{base}/nope"))
        .await
        .assert_error(404, "ResourceNotFoundException");

    // GetFunction through an alias shows the version it points at.
    let conf = api
        .get(&format!("{}/configuration?Qualifier=live", fpath("f")))
        .await
        .json();
    assert_eq!(conf["Version"], "1");
    let conf = api
        .get(&format!("{}/configuration", fpath("f:dev")))
        .await
        .json();
    assert_eq!(conf["Version"], "$LATEST");

    // Update with a stale revision fails; with the right one succeeds.
    api.put(
        &format!("{base}/live"),
        json!({"FunctionVersion": "2", "RevisionId": "stale"}),
    )
    .await
    .assert_error(412, "PreconditionFailedException");
    let up = api
        .put(
            &format!("{base}/live"),
            json!({"FunctionVersion": "2", "RevisionId": rev}),
        )
        .await;
    up.assert_status(200);
    let up = up.json();
    assert_eq!(up["FunctionVersion"], "2");
    assert_eq!(up["Description"], "prod", "unchanged fields stay");
    assert_ne!(up["RevisionId"], rev);
    api.put(&format!("{base}/nope"), json!({"FunctionVersion": "2"}))
        .await
        .assert_error(404, "ResourceNotFoundException");

    // Listing, filtering, paging.
    let all = api.get(&base).await.json();
    let names: Vec<&str> = all["Aliases"]
        .as_array()
        .expect("a")
        .iter()
        .map(|a| a["Name"].as_str().expect("n"))
        .collect();
    assert_eq!(names, ["dev", "live"]);
    let only2 = api.get(&format!("{base}?FunctionVersion=2")).await.json();
    assert_eq!(only2["Aliases"].as_array().expect("a").len(), 1);
    assert_eq!(only2["Aliases"][0]["Name"], "live");
    let p1 = api.get(&format!("{base}?MaxItems=1")).await.json();
    assert_eq!(p1["Aliases"][0]["Name"], "dev");
    let m = p1["NextMarker"].as_str().expect("marker");
    let p2 = api
        .get(&format!("{base}?MaxItems=1&Marker={m}"))
        .await
        .json();
    assert_eq!(p2["Aliases"][0]["Name"], "live");
    assert!(p2.get("NextMarker").is_none());

    api.delete(&format!("{base}/live")).await.assert_status(204);
    api.get(&format!("{base}/live"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(&format!("{base}/live")).await.assert_status(204);
    // Version 2 is free to delete now.
    api.delete(&format!("{}?Qualifier=2", fpath("f")))
        .await
        .assert_status(204);
}

#[tokio::test]
async fn routing_config_rules() {
    let api = Api::new().await;
    with_two_versions(&api).await;
    let base = format!("{}/aliases", fpath("f"));
    let bad = [
        json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 1.5}}}),
        json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": -0.1}}}),
        json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"1": 0.5}}}),
        json!({"Name": "a", "FunctionVersion": "$LATEST", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}}}),
        json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.1, "3": 0.1}}}),
        json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"$LATEST": 0.1}}}),
    ];
    for body in bad {
        api.post(&base, body.clone())
            .await
            .assert_error(400, "InvalidParameterValueException");
    }
    api.post(&base, json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"7": 0.1}}}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    assert_eq!(
        api.get(&base).await.json()["Aliases"],
        json!([]),
        "nothing created"
    );

    let ok = api
        .post(&base, json!({"Name": "a", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.25}}}))
        .await;
    ok.assert_status(201);
    assert_eq!(
        ok.json()["RoutingConfig"],
        json!({"AdditionalVersionWeights": {"2": 0.25}})
    );
    // A version used for routing cannot be deleted.
    api.delete(&format!("{}?Qualifier=2", fpath("f")))
        .await
        .assert_error(409, "ResourceConflictException");
    // Clearing the routing.
    let cleared = api
        .put(
            &format!("{base}/a"),
            json!({"RoutingConfig": {"AdditionalVersionWeights": {}}}),
        )
        .await;
    cleared.assert_status(200);
    assert!(cleared.json().get("RoutingConfig").is_none());
    api.delete(&format!("{}?Qualifier=2", fpath("f")))
        .await
        .assert_status(204);
}

#[tokio::test]
async fn weighted_alias_routes_invocations() {
    let api = Api::new().await;
    with_two_versions(&api).await;
    api.post(
        &format!("{}/aliases", fpath("f")),
        json!({"Name": "live", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.3}}}),
    )
    .await
    .assert_status(201);

    let n = 2000;
    let mut twos = 0;
    for _ in 0..n {
        let r = api.invoke("f", "?Qualifier=live", &[], b"{}").await;
        r.assert_status(200);
        match r.header("x-amz-executed-version").as_deref() {
            Some("2") => twos += 1,
            Some("1") => {}
            other => panic!("executed version {other:?}"),
        }
    }
    // p = 0.3, σ = sqrt(2000·0.3·0.7) ≈ 20.5: accept ±5σ.
    assert!(
        (497..=703).contains(&twos),
        "{twos} of {n} went to version 2"
    );

    // The invoker got the version that was reported, with the alias ARN as invoked ARN.
    let calls = api.invoker.calls();
    assert_eq!(calls.len(), n);
    let spec_twos = calls.iter().filter(|c| c.spec.version == "2").count();
    assert_eq!(spec_twos, twos);
    assert!(
        calls
            .iter()
            .all(|c| c.invoked_arn == format!("{ARN_PREFIX}f:live"))
    );
    let v1_sha = api
        .get(&format!("{}/configuration?Qualifier=1", fpath("f")))
        .await
        .json()["CodeSha256"]
        .clone();
    assert!(
        calls
            .iter()
            .filter(|c| c.spec.version == "1")
            .all(|c| c.spec.code_sha256 == v1_sha)
    );
}
