//! Deployment packages after upload: the presigned download URL of `GetFunction`
//! (`Code.Location`), and packages shared by functions being created, updated and deleted at
//! once (a release of unused code never takes a package a function is about to reference;
//! `DryRun` stores nothing).

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::gated::{Gated, chunk_store};
use common::*;
use hearth_store::{ChunkStore, Scope};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{Value, json};
use sha2::Digest;

fn account() -> Scope {
    Scope::Owner("000000000000".into())
}

/// Whether the chunk store still holds package `zip` (what workers fetch code from), whole:
/// its manifest reads back and its ref list (what protects its chunks from the collector) is
/// there too.
async fn package_stored(store: &ChunkStore, zip: &[u8]) -> bool {
    use object_store::ObjectStoreExt;
    let name = format!("code/{}", sha256_hex(zip));
    let tag = store.scope_tag(&account()).expect("tag");
    let refs = store
        .origin()
        .head(&hearth_store::manifest::refs_path(&tag, &name))
        .await
        .is_ok();
    match store.get_bytes(&account(), &name).await {
        Ok(bytes) => {
            assert_eq!(bytes, zip, "stored package differs");
            assert!(refs, "{name} has a manifest but no ref list");
            true
        }
        Err(hearth_store::StoreError::NotFound { .. }) => false,
        Err(e) => panic!("reading {name}: {e}"),
    }
}

/// An API whose chunk store is over a gated in-memory origin.
async fn api_with_chunks() -> (Api, Arc<Gated>, ChunkStore) {
    let origin = Gated::new();
    let store = chunk_store(origin.clone());
    let s = store.clone();
    let api = Api::with(move |c| c.chunk_store = Some(s)).await;
    (api, origin, store)
}

/// The path and query of a `Code.Location` (the harness sends requests without a host).
fn path_of(location: &str) -> String {
    let rest = location
        .strip_prefix("http://localhost:9000")
        .unwrap_or_else(|| panic!("not on the endpoint the client used: {location}"));
    rest.to_string()
}

/// GET without any credentials.
async fn download(api: &Api, path_and_query: &str) -> Resp {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost:9000"));
    api.send_raw(Method::GET, path_and_query, headers, Vec::new())
        .await
}

async fn location(api: &Api, function: &str) -> String {
    let g = api.get(&fpath(function)).await;
    g.assert_status(200);
    let g = g.json();
    assert_eq!(g["Code"]["RepositoryType"], "S3");
    g["Code"]["Location"]
        .as_str()
        .expect("Code.Location")
        .to_string()
}

fn b64_sha256(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

/// A package of incompressible bytes spanning several 512 KiB chunks.
fn big_zip() -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..1_300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let src = b"def handler(event, context):\n    return event\n";
    zip_of(&[("app.py", src, 0o644), ("blob.bin", &data, 0o644)])
}

/// Issue 7, item 2: `Code.Location` was a `file://` path into the data directory. It is now
/// a URL on the endpoint the client used that downloads, without credentials, bytes that hash
/// to `CodeSha256`; with and without a chunk store, for a package of one or several chunks.
#[tokio::test]
async fn regression_7_2_code_location_downloads_the_package() {
    let local = Api::new().await;
    let (chunked, _, _) = api_with_chunks().await;
    for api in [&local, &chunked] {
        for (name, zip) in [("small", handler_zip("dl")), ("big", big_zip())] {
            let r = api
                .create(name, json!({"Code": {"ZipFile": b64(&zip)}}))
                .await;
            r.assert_status(201);
            let sha = r.json()["CodeSha256"].as_str().expect("sha").to_string();
            let url = location(api, name).await;
            assert!(!url.contains("file:"), "{url}");
            assert!(
                !url.contains(api.data_dir().to_string_lossy().as_ref()),
                "{url}"
            );
            let r = download(api, &path_of(&url)).await;
            r.assert_status(200);
            assert_eq!(r.header("content-type").as_deref(), Some("application/zip"));
            assert_eq!(b64_sha256(&r.body), sha);
            assert_eq!(r.body, zip);
        }
    }
}

/// The URL goes to the host (and scheme, behind a TLS proxy) the client reached.
#[tokio::test]
async fn code_location_follows_the_host_header() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    for (headers, prefix) in [
        (vec![], "http://localhost:9000/hearth/v1/code/"),
        (
            vec![("x-forwarded-proto", "https")],
            "https://localhost:9000/hearth/v1/code/",
        ),
    ] {
        let r = api.send(Method::GET, &fpath("f"), &headers, vec![]).await;
        r.assert_status(200);
        let url = r.json()["Code"]["Location"]
            .as_str()
            .expect("Location")
            .to_string();
        assert!(url.starts_with(prefix), "{url}");
    }
}

/// A published version's URL serves that version's package, not `$LATEST`'s.
#[tokio::test]
async fn version_urls_serve_that_versions_package() {
    let (api, _, _) = api_with_chunks().await;
    let v1 = handler_zip("one");
    api.create("f", json!({"Code": {"ZipFile": b64(&v1)}, "Publish": true}))
        .await
        .assert_status(201);
    let v2 = handler_zip("two");
    api.put(
        &format!("{}/code", fpath("f")),
        json!({"ZipFile": b64(&v2)}),
    )
    .await
    .assert_status(200);
    let url = location(&api, "f:1").await;
    assert_eq!(download(&api, &path_of(&url)).await.body, v1);
    let url = location(&api, "f").await;
    assert_eq!(download(&api, &path_of(&url)).await.body, v2);
}

fn with_query(path: &str, key: &str, value: &str) -> String {
    let (base, query) = path.split_once('?').expect("query");
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k == key => format!("{k}={value}"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

fn query_value(path: &str, key: &str) -> String {
    path.split_once('?')
        .expect("query")
        .1
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
        .expect(key)
}

/// Tampered URLs (signature, expiry, package, missing parameters) are refused with 403 and
/// reveal nothing; an expired one too.
#[tokio::test]
async fn tampered_and_expired_urls_are_refused() {
    let api = Api::new().await;
    api.create("f", json!({})).await.assert_status(201);
    let other = handler_zip("other");
    api.create("g", json!({"Code": {"ZipFile": b64(&other)}}))
        .await
        .assert_status(201);
    let path = path_of(&location(&api, "f").await);
    download(&api, &path).await.assert_status(200);

    let signature = query_value(&path, "Signature");
    let mut flipped = signature.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let expires: i64 = query_value(&path, "Expires").parse().expect("expires");
    let f_hex = path
        .split_once('?')
        .and_then(|(p, _)| p.rsplit('/').next())
        .expect("hex")
        .to_string();
    let tampered = [
        with_query(
            &path,
            "Signature",
            &String::from_utf8(flipped).expect("ascii"),
        ),
        with_query(&path, "Expires", &(expires + 3600).to_string()),
        path.replace(&f_hex, &sha256_hex(&other)),
        path.split_once('?').expect("query").0.to_string(),
        with_query(&path, "Signature", ""),
        with_query(&path, "Expires", "soon"),
    ];
    for bad in &tampered {
        let r = download(&api, bad).await;
        r.assert_error(403, "AccessDeniedException");
        assert_ne!(r.body, handler_zip("v1"));
    }
    // Unknown (well-formed) package names are refused the same way, before any lookup.
    let unknown = path.replace(&f_hex, &"0".repeat(64));
    download(&api, &unknown)
        .await
        .assert_error(403, "AccessDeniedException");

    // A URL past its lifetime.
    let short = Api::with(|c| c.code_url_ttl = Duration::ZERO).await;
    short.create("f", json!({})).await.assert_status(201);
    let path = path_of(&location(&short, "f").await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = download(&short, &path).await;
    r.assert_error(403, "AccessDeniedException");
    assert_eq!(r.json()["message"], "Request has expired");
}

/// A URL of a package that has since been released is a 404, not a 5xx.
#[tokio::test]
async fn a_released_package_is_not_found() {
    let (api, _, store) = api_with_chunks().await;
    let zip = handler_zip("gone");
    api.create("f", json!({"Code": {"ZipFile": b64(&zip)}}))
        .await
        .assert_status(201);
    let path = path_of(&location(&api, "f").await);
    api.delete(&fpath("f")).await.assert_status(204);
    assert!(!package_stored(&store, &zip).await);
    download(&api, &path)
        .await
        .assert_error(404, "ResourceNotFoundException");
}

/// Issue 7, item 6: a create stores its package, then commits its record; a release of unused
/// code (after deleting another function that used the same package) that ran in between
/// deleted the package, and the new function could never run. The create here is held after
/// its package is stored, while the delete and its release run.
#[tokio::test]
async fn regression_7_6_a_release_during_a_create_spares_its_package() {
    let (api, origin, store) = api_with_chunks().await;
    let shared = handler_zip("shared");
    api.create("a", json!({"Code": {"ZipFile": b64(&shared)}}))
        .await
        .assert_status(201);

    let held = origin.hold_after_put("manifests/", "/code/");
    let (created, ()) = tokio::join!(
        api.create("b", json!({"Code": {"ZipFile": b64(&shared)}})),
        async {
            held.reached.await.expect("the create stored its package");
            api.delete(&fpath("a")).await.assert_status(204);
            held.release.send(()).expect("release");
        }
    );
    created.assert_status(201);
    assert!(
        package_stored(&store, &shared).await,
        "the release took b's package"
    );
}

/// The same for an update that switches a function to a package another function (being
/// deleted) used.
#[tokio::test]
async fn regression_7_6_a_release_during_an_update_spares_its_package() {
    let (api, origin, store) = api_with_chunks().await;
    let shared = handler_zip("shared");
    api.create("a", json!({"Code": {"ZipFile": b64(&shared)}}))
        .await
        .assert_status(201);
    let own = handler_zip("own");
    api.create("c", json!({"Code": {"ZipFile": b64(&own)}}))
        .await
        .assert_status(201);

    let held = origin.hold_after_put("manifests/", "/code/");
    let c_code = format!("{}/code", fpath("c"));
    let (updated, ()) = tokio::join!(api.put(&c_code, json!({"ZipFile": b64(&shared)})), async {
        held.reached.await.expect("the update stored its package");
        api.delete(&fpath("a")).await.assert_status(204);
        held.release.send(()).expect("release");
    });
    updated.assert_status(200);
    assert!(package_stored(&store, &shared).await);
    // c's old package is unused now, and released by the next release.
    api.create("d", json!({})).await.assert_status(201);
    api.delete(&fpath("d")).await.assert_status(204);
    assert!(!package_stored(&store, &own).await);
    assert!(package_stored(&store, &shared).await);
}

/// Issue 7, item 6: `UpdateFunctionCode` with `DryRun` validates the package and answers the
/// configuration it would have, and stores nothing anywhere.
#[tokio::test]
async fn regression_7_6_dry_run_stores_nothing() {
    for chunks in [false, true] {
        let (api, store) = if chunks {
            let (api, _, store) = api_with_chunks().await;
            (api, Some(store))
        } else {
            (Api::new().await, None)
        };
        api.create("f", json!({})).await.assert_status(201);
        let before = api
            .get(&format!("{}/configuration", fpath("f")))
            .await
            .json();
        let listing = |dir: &str| -> Vec<String> {
            std::fs::read_dir(api.data_dir().join(dir))
                .map(|d| {
                    d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (code_before, zips_before) = (listing("code"), listing("packages"));
        let manifests = async || match &store {
            Some(s) => s.list(&account(), "").await.expect("list"),
            None => Vec::new(),
        };
        let manifests_before = manifests().await;

        let new = handler_zip("dry");
        let r = api
            .put(
                &format!("{}/code", fpath("f")),
                json!({"ZipFile": b64(&new), "DryRun": true}),
            )
            .await;
        r.assert_status(200);
        assert_eq!(r.json()["CodeSha256"], b64_sha256(&new));
        assert_eq!(r.json()["CodeSize"], new.len());
        // A bad package is refused as it would be for real.
        api.put(
            &format!("{}/code", fpath("f")),
            json!({"ZipFile": b64(b"junk"), "DryRun": true}),
        )
        .await
        .assert_error(400, "InvalidParameterValueException");

        assert_eq!(listing("code"), code_before, "chunks {chunks}");
        assert_eq!(listing("packages"), zips_before, "chunks {chunks}");
        assert_eq!(manifests().await, manifests_before, "chunks {chunks}");
        let after: Value = api
            .get(&format!("{}/configuration", fpath("f")))
            .await
            .json();
        assert_eq!(after, before);
    }
}

/// Many functions sharing one package, created, switched and deleted at once: whenever a
/// create or update has returned, and at the end, every function's package is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_updates_and_deletes_sharing_a_package() {
    let (api, _, store) = api_with_chunks().await;
    let api = Arc::new(api);
    let shared = handler_zip("shared");
    let other = handler_zip("other");
    let mut tasks = Vec::new();
    for t in 0..6 {
        let (api, store, shared, other) =
            (api.clone(), store.clone(), shared.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..8 {
                let name = format!("f{t}");
                let first = if (t + round) % 2 == 0 {
                    &shared
                } else {
                    &other
                };
                let r = api
                    .create(&name, json!({"Code": {"ZipFile": b64(first)}}))
                    .await;
                r.assert_status(201);
                assert!(package_stored(&store, first).await, "{name} round {round}");
                let second = if first == &shared { &other } else { &shared };
                let r = api
                    .put(
                        &format!("{}/code", fpath(&name)),
                        json!({"ZipFile": b64(second)}),
                    )
                    .await;
                r.assert_status(200);
                assert!(package_stored(&store, second).await, "{name} round {round}");
                if round < 7 {
                    api.delete(&fpath(&name)).await.assert_status(204);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let list = api.get("/2015-03-31/functions").await.json();
    let functions = list["Functions"].as_array().expect("functions");
    assert_eq!(functions.len(), 6);
    for f in functions {
        let hex = base64::engine::general_purpose::STANDARD
            .decode(f["CodeSha256"].as_str().expect("sha"))
            .map(hex::encode)
            .expect("base64");
        let zip = if hex == sha256_hex(&shared) {
            &shared
        } else {
            &other
        };
        assert!(package_stored(&store, zip).await, "{}", f["FunctionName"]);
    }
}
