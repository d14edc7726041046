//! Layers: publish, get (by name and version, by ARN), list, list versions, delete; their
//! validation; a function's `Layers` (order, limits, the 250 MB total); and what deleting a
//! layer version in use leaves alone.

mod common;

use common::gated::{Gated, chunk_store};
use common::*;
use hearth_api::code::CodeLimits;
use hearth_store::{ChunkStore, Scope};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{Value, json};

const LAYER_PREFIX: &str = "arn:aws:lambda:us-east-1:000000000000:layer:";

fn layer_zip(tag: &str) -> Vec<u8> {
    let src = format!("VALUE = '{tag}'\n");
    zip_of(&[("python/layerlib.py", src.as_bytes(), 0o644)])
}

fn versions_path(layer: &str) -> String {
    format!("/2018-10-31/layers/{layer}/versions")
}

async fn publish(api: &Api, layer: &str, zip: &[u8], extra: Value) -> Resp {
    let mut body = json!({"Content": {"ZipFile": b64(zip)}});
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    api.post(&versions_path(layer), body).await
}

/// Publish and return the layer version ARN.
async fn published(api: &Api, layer: &str, zip: &[u8]) -> String {
    let r = publish(api, layer, zip, json!({})).await;
    r.assert_status(201);
    r.json()["LayerVersionArn"]
        .as_str()
        .expect("LayerVersionArn")
        .to_string()
}

/// A layer version without its `Content.Location` (which carries an expiry).
fn without_location(mut v: Value) -> Value {
    if let Some(c) = v["Content"].as_object_mut() {
        c.remove("Location");
    }
    v
}

fn account() -> Scope {
    Scope::Owner("000000000000".into())
}

/// Whether the chunk store still holds the package `zip`.
async fn package_stored(store: &ChunkStore, zip: &[u8]) -> bool {
    match store
        .get_bytes(&account(), &format!("code/{}", sha256_hex(zip)))
        .await
    {
        Ok(bytes) => {
            assert_eq!(bytes, zip, "stored package differs");
            true
        }
        Err(hearth_store::StoreError::NotFound { .. }) => false,
        Err(e) => panic!("reading the package: {e}"),
    }
}

async fn api_with_chunks() -> (Api, ChunkStore) {
    let origin = Gated::new();
    let store = chunk_store(origin);
    let s = store.clone();
    let api = Api::with(move |c| c.chunk_store = Some(s)).await;
    (api, store)
}

#[tokio::test]
async fn publish_get_list_and_delete_round_trip() {
    let mut api = Api::new().await;
    let zip1 = layer_zip("one");
    let r = publish(
        &api,
        "lib",
        &zip1,
        json!({
            "Description": "first",
            "CompatibleRuntimes": ["python3.11", "python3.12"],
            "CompatibleArchitectures": ["x86_64"],
            "LicenseInfo": "MIT",
        }),
    )
    .await;
    r.assert_status(201);
    let v1 = r.json();
    assert_eq!(v1["LayerArn"], format!("{LAYER_PREFIX}lib"));
    assert_eq!(v1["LayerVersionArn"], format!("{LAYER_PREFIX}lib:1"));
    assert_eq!(v1["Version"], 1);
    assert_eq!(v1["Description"], "first");
    assert_eq!(v1["LicenseInfo"], "MIT");
    assert_eq!(
        v1["CompatibleRuntimes"],
        json!(["python3.11", "python3.12"])
    );
    assert_eq!(v1["CompatibleArchitectures"], json!(["x86_64"]));
    assert_eq!(v1["Content"]["CodeSize"], zip1.len());
    assert_eq!(
        v1["Content"]["CodeSha256"],
        b64(&hex::decode(sha256_hex(&zip1)).expect("hex"))
    );
    let created = v1["CreatedDate"].as_str().expect("CreatedDate");
    assert!(
        chrono::DateTime::parse_from_str(created, "%Y-%m-%dT%H:%M:%S%.3f%z").is_ok(),
        "{created}"
    );
    // Content.Location downloads the zip without credentials.
    let location = v1["Content"]["Location"].as_str().expect("Location");
    let path = location
        .strip_prefix("http://localhost:9000")
        .unwrap_or_else(|| panic!("{location}"));
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost:9000"));
    let d = api.send_raw(Method::GET, path, headers, Vec::new()).await;
    d.assert_status(200);
    assert_eq!(d.body, zip1);

    let zip2 = layer_zip("two");
    let r = publish(
        &api,
        "lib",
        &zip2,
        json!({"CompatibleRuntimes": ["nodejs20.x"], "CompatibleArchitectures": ["arm64"]}),
    )
    .await;
    r.assert_status(201);
    let v2 = r.json();
    assert_eq!(v2["Version"], 2);
    assert_eq!(v2["Description"], "");
    assert!(v2.get("LicenseInfo").is_none());

    // GetLayerVersion, by name and by layer ARN; GetLayerVersionByArn.
    for path in [
        format!("{}/1", versions_path("lib")),
        format!("{}/1", versions_path(&format!("{LAYER_PREFIX}lib"))),
        format!("/2018-10-31/layers?find=LayerVersion&Arn={LAYER_PREFIX}lib:1"),
    ] {
        let g = api.get(&path).await;
        g.assert_status(200);
        assert_eq!(
            without_location(g.json()),
            without_location(v1.clone()),
            "{path}"
        );
    }

    // ListLayerVersions: newest first, with filters.
    let l = api.get(&versions_path("lib")).await;
    l.assert_status(200);
    let l = l.json();
    let arns: Vec<&str> = l["LayerVersions"]
        .as_array()
        .expect("LayerVersions")
        .iter()
        .map(|v| v["LayerVersionArn"].as_str().expect("arn"))
        .collect();
    assert_eq!(
        arns,
        [
            format!("{LAYER_PREFIX}lib:2"),
            format!("{LAYER_PREFIX}lib:1")
        ]
    );
    assert!(l["LayerVersions"][0].get("Content").is_none());
    assert!(l.get("NextMarker").is_none());
    let l = api
        .get(&format!(
            "{}?CompatibleRuntime=python3.12",
            versions_path("lib")
        ))
        .await
        .json();
    assert_eq!(l["LayerVersions"].as_array().map(Vec::len), Some(1));
    assert_eq!(l["LayerVersions"][0]["Version"], 1);
    let l = api
        .get(&format!(
            "{}?CompatibleArchitecture=arm64",
            versions_path("lib")
        ))
        .await
        .json();
    assert_eq!(l["LayerVersions"][0]["Version"], 2);
    let none = api.get(&versions_path("nosuchlayer")).await;
    none.assert_status(200);
    assert_eq!(none.json()["LayerVersions"], json!([]));

    // ListLayers: each layer with its newest matching version.
    let l = api.get("/2018-10-31/layers").await;
    l.assert_status(200);
    let l = l.json();
    assert_eq!(l["Layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(l["Layers"][0]["LayerName"], "lib");
    assert_eq!(l["Layers"][0]["LayerArn"], format!("{LAYER_PREFIX}lib"));
    assert_eq!(l["Layers"][0]["LatestMatchingVersion"]["Version"], 2);
    let l = api
        .get("/2018-10-31/layers?CompatibleRuntime=python3.11")
        .await
        .json();
    assert_eq!(l["Layers"][0]["LatestMatchingVersion"]["Version"], 1);
    assert_eq!(
        l["Layers"][0]["LatestMatchingVersion"]["Description"],
        "first"
    );
    let l = api
        .get("/2018-10-31/layers?CompatibleRuntime=java21")
        .await
        .json();
    assert_eq!(l["Layers"], json!([]));

    // DeleteLayerVersion: gone, idempotent, and its number is never given again (even after
    // every version is deleted and the server restarts).
    api.delete(&format!("{}/2", versions_path("lib")))
        .await
        .assert_status(204);
    api.get(&format!("{}/2", versions_path("lib")))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.delete(&format!("{}/2", versions_path("lib")))
        .await
        .assert_status(204);
    api.delete(&format!("{}/1", versions_path("lib")))
        .await
        .assert_status(204);
    assert_eq!(
        api.get("/2018-10-31/layers").await.json()["Layers"],
        json!([])
    );
    api.restart().await;
    let r = publish(&api, "lib", &zip1, json!({})).await;
    r.assert_status(201);
    assert_eq!(r.json()["Version"], 3);
}

#[tokio::test]
async fn listings_page_with_markers() {
    let api = Api::new().await;
    for name in ["c", "a", "b"] {
        published(&api, name, &layer_zip(name)).await;
    }
    for i in 0..3 {
        published(&api, "a", &layer_zip(&format!("a{i}"))).await;
    }
    let p1 = api.get("/2018-10-31/layers?MaxItems=2").await.json();
    let names = |v: &Value| -> Vec<String> {
        v["Layers"]
            .as_array()
            .expect("Layers")
            .iter()
            .map(|l| l["LayerName"].as_str().expect("name").to_string())
            .collect()
    };
    assert_eq!(names(&p1), ["a", "b"]);
    let marker = p1["NextMarker"].as_str().expect("NextMarker");
    let p2 = api
        .get(&format!("/2018-10-31/layers?MaxItems=2&Marker={marker}"))
        .await
        .json();
    assert_eq!(names(&p2), ["c"]);
    assert!(p2.get("NextMarker").is_none());

    let versions = |v: &Value| -> Vec<u64> {
        v["LayerVersions"]
            .as_array()
            .expect("LayerVersions")
            .iter()
            .map(|l| l["Version"].as_u64().expect("n"))
            .collect()
    };
    let p1 = api
        .get(&format!("{}?MaxItems=3", versions_path("a")))
        .await
        .json();
    assert_eq!(versions(&p1), [4, 3, 2]);
    let marker = p1["NextMarker"].as_str().expect("NextMarker");
    let p2 = api
        .get(&format!(
            "{}?MaxItems=3&Marker={marker}",
            versions_path("a")
        ))
        .await
        .json();
    assert_eq!(versions(&p2), [1]);
    assert!(p2.get("NextMarker").is_none());
}

#[tokio::test]
async fn layer_requests_are_validated() {
    let api = Api::new().await;
    let zip = layer_zip("x");
    let invalid = [
        (publish(&api, "a.b", &zip, json!({})).await, "bad name"),
        (
            publish(&api, "l", b"this is not a zip", json!({})).await,
            "bad zip",
        ),
        (
            publish(&api, "l", &zip_of(&[("../evil", b"x", 0o644)]), json!({})).await,
            "unsafe path",
        ),
        (
            api.post(
                &versions_path("l"),
                json!({"Content": {"S3Bucket": "b", "S3Key": "k"}}),
            )
            .await,
            "s3 content",
        ),
        (api.post(&versions_path("l"), json!({})).await, "no content"),
        (
            publish(&api, "l", &zip, json!({"CompatibleRuntimes": ["python9"]})).await,
            "runtime",
        ),
        (
            publish(
                &api,
                "l",
                &zip,
                json!({"CompatibleArchitectures": ["sparc"]}),
            )
            .await,
            "architecture",
        ),
        (
            publish(&api, "l", &zip, json!({"LicenseInfo": "l".repeat(513)})).await,
            "license",
        ),
        (
            publish(&api, "l", &zip, json!({"Description": "d".repeat(257)})).await,
            "description",
        ),
        (api.get("/2018-10-31/layers?MaxItems=0").await, "max 0"),
        (api.get("/2018-10-31/layers?MaxItems=51").await, "max 51"),
        (
            api.get("/2018-10-31/layers?CompatibleRuntime=cobol").await,
            "filter runtime",
        ),
        (
            api.get(&format!("{}/x", versions_path("l"))).await,
            "version number",
        ),
        (
            api.get("/2018-10-31/layers?find=LayerVersion&Arn=nonsense")
                .await,
            "arn",
        ),
    ];
    for (r, what) in invalid {
        assert_eq!(
            (r.status.as_u16(), r.error_type().as_deref()),
            (400, Some("InvalidParameterValueException")),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // A bad layer zip gets exactly what a bad function zip gets.
    let bad_layer = publish(&api, "l", b"this is not a zip", json!({})).await;
    let bad_code = api
        .create("f", json!({"Code": {"ZipFile": b64(b"this is not a zip")}}))
        .await;
    assert_eq!(bad_layer.status, bad_code.status);
    assert_eq!(bad_layer.json()["message"], bad_code.json()["message"]);
    assert_eq!(
        api.get("/2018-10-31/layers").await.json()["Layers"],
        json!([])
    );

    for path in [
        format!("{}/1", versions_path("l")),
        "/2018-10-31/layers?find=LayerVersion&Arn=arn:aws:lambda:us-east-1:000000000000:layer:l:1"
            .to_string(),
        "/2018-10-31/layers?find=LayerVersion&Arn=arn:aws:lambda:eu-west-1:111111111111:layer:l:1"
            .to_string(),
    ] {
        api.get(&path)
            .await
            .assert_error(404, "ResourceNotFoundException");
    }
}

#[tokio::test]
async fn functions_take_up_to_five_existing_layers_in_order() {
    let api = Api::new().await;
    let mut arns = Vec::new();
    for name in ["l1", "l2", "l3", "l4", "l5", "l6"] {
        arns.push(published(&api, name, &layer_zip(name)).await);
    }
    let order = [arns[2].clone(), arns[0].clone()];
    let r = api.create("f", json!({"Layers": order})).await;
    r.assert_status(201);
    let c = r.json();
    let expect = json!([
        {"Arn": arns[2], "CodeSize": layer_zip("l3").len()},
        {"Arn": arns[0], "CodeSize": layer_zip("l1").len()},
    ]);
    assert_eq!(c["Layers"], expect);
    assert_eq!(
        api.get(&fpath("f")).await.json()["Configuration"]["Layers"],
        expect
    );
    let conf_path = format!("{}/configuration", fpath("f"));
    assert_eq!(api.get(&conf_path).await.json()["Layers"], expect);
    // A published version keeps its layers.
    let v = api
        .post(&format!("{}/versions", fpath("f")), json!({}))
        .await;
    v.assert_status(201);
    assert_eq!(v.json()["Layers"], expect);

    let u = api.put(&conf_path, json!({"Layers": arns[..5]})).await;
    u.assert_status(200);
    assert_eq!(u.json()["Layers"].as_array().map(Vec::len), Some(5));
    let u = api.put(&conf_path, json!({"Layers": []})).await;
    u.assert_status(200);
    assert!(u.json().get("Layers").is_none(), "no layers, no Layers");
    let g = api
        .get(&format!("{}/configuration?Qualifier=1", fpath("f")))
        .await;
    assert_eq!(g.json()["Layers"], expect, "version 1 is immutable");

    let missing = format!("{LAYER_PREFIX}l1:9");
    let other_account = "arn:aws:lambda:us-east-1:111111111111:layer:l1:1".to_string();
    let l1_again = format!("{LAYER_PREFIX}l1:1");
    let cases: [(Value, &str, String); 5] = [
        (
            json!(arns),
            "more than 5",
            "Cannot reference more than 5 layers.".into(),
        ),
        (
            json!([missing]),
            "missing",
            format!("Layer version {missing} does not exist."),
        ),
        (
            json!([other_account]),
            "other account",
            "does not exist".into(),
        ),
        (
            json!([arns[0], l1_again]),
            "same layer twice",
            "versions of the same layer".into(),
        ),
        (json!(["not-an-arn"]), "malformed", "'layers'".into()),
    ];
    for (layers, what, message) in cases {
        for r in [
            api.create("g", json!({"Layers": layers})).await,
            api.put(&conf_path, json!({"Layers": layers})).await,
        ] {
            r.assert_error(400, "InvalidParameterValueException");
            let m = r.json()["message"].as_str().expect("message").to_string();
            assert!(m.contains(message.as_str()), "{what}: {m}");
        }
    }
    api.get(&fpath("g"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    assert!(api.get(&conf_path).await.json().get("Layers").is_none());
}

/// Code and layers together unpack to at most the unzipped limit (250 MB on Lambda; small
/// here): on create, on a configuration update and on a code update.
#[tokio::test]
async fn code_and_layers_share_the_unzipped_limit() {
    let limits = CodeLimits {
        max_unzipped_bytes: 10_000,
        ..CodeLimits::default()
    };
    let api = Api::with_limits(limits).await;
    let blob = |n: usize| vec![b'x'; n];
    let layer_of = |n: usize| zip_of(&[("bin/data", &blob(n), 0o755)]);
    let small = published(&api, "small", &layer_of(3_000)).await;
    let big = published(&api, "big", &layer_of(6_000)).await;
    let code = |n: usize| {
        zip_of(&[
            ("app.py", b"def handler(e, c):\n    return 1\n", 0o644),
            ("pad.bin", &blob(n), 0o644),
        ])
    };
    // 3,000 of code + 3,000 + 6,000 of layers: too much; one layer fits.
    let r = api
        .create(
            "f",
            json!({"Code": {"ZipFile": b64(&code(3_000))}, "Layers": [small, big]}),
        )
        .await;
    r.assert_error(400, "InvalidParameterValueException");
    assert_eq!(
        r.json()["message"],
        "Layers consume more than the available size of 10000 bytes"
    );
    api.get(&fpath("f"))
        .await
        .assert_error(404, "ResourceNotFoundException");
    api.create(
        "f",
        json!({"Code": {"ZipFile": b64(&code(3_000))}, "Layers": [big]}),
    )
    .await
    .assert_status(201);
    let conf_path = format!("{}/configuration", fpath("f"));
    let r = api.put(&conf_path, json!({"Layers": [small, big]})).await;
    r.assert_error(400, "InvalidParameterValueException");
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Layers consume more than"))
    );
    let r = api
        .put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(&code(5_000))}),
        )
        .await;
    r.assert_error(400, "InvalidParameterValueException");
    // The function is as it was.
    let c = api.get(&conf_path).await.json();
    assert_eq!(c["Layers"][0]["Arn"], big);
    assert_eq!(c["CodeSize"], code(3_000).len());
}

/// Deleting a layer version that functions use leaves them as they were: their configuration
/// still lists it and its package stays in the chunk store (workers fetch it from there) until
/// no function version uses it.
#[tokio::test]
async fn a_deleted_layer_version_in_use_keeps_its_package() {
    let (api, store) = api_with_chunks().await;
    let used = layer_zip("used");
    let unused = layer_zip("unused");
    let arn = published(&api, "lib", &used).await;
    published(&api, "other", &unused).await;
    assert!(package_stored(&store, &used).await && package_stored(&store, &unused).await);
    api.create("f", json!({"Layers": [arn]}))
        .await
        .assert_status(201);

    api.delete(&format!("{}/1", versions_path("lib")))
        .await
        .assert_status(204);
    api.delete(&format!("{}/1", versions_path("other")))
        .await
        .assert_status(204);
    assert!(package_stored(&store, &used).await, "in use: kept");
    assert!(!package_stored(&store, &unused).await, "unused: released");
    let conf_path = format!("{}/configuration", fpath("f"));
    assert_eq!(api.get(&conf_path).await.json()["Layers"][0]["Arn"], arn);
    // The function's configuration can still change; the deleted version cannot be added anew.
    api.put(&conf_path, json!({"Timeout": 9}))
        .await
        .assert_status(200);
    assert!(package_stored(&store, &used).await);
    api.create("g", json!({"Layers": [arn]}))
        .await
        .assert_error(400, "InvalidParameterValueException");
    // Once no function version uses it, it goes.
    api.put(&conf_path, json!({"Layers": []}))
        .await
        .assert_status(200);
    assert!(
        !package_stored(&store, &used).await,
        "no longer used: released"
    );
}
