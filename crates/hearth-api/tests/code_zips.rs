//! Deployment packages: malicious and broken zips are rejected with nothing stored; good ones
//! are unpacked content-addressed with normalized permissions.

mod common;

use std::io::{Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use hearth_api::code::{CodeError, CodeLimits, CodeStore};
use hearth_api::error::UNZIP_MESSAGE;
use serde_json::json;

fn small_limits() -> CodeLimits {
    CodeLimits {
        max_zipped_bytes: 64 * 1024,
        max_unzipped_bytes: 1024 * 1024,
        max_entries: 5,
    }
}

fn symlink_zip() -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    w.start_file("app.py", opts).expect("start");
    w.write_all(b"x = 1\n").expect("write");
    w.add_symlink("link", "/etc/passwd", opts).expect("symlink");
    w.finish().expect("finish").into_inner()
}

/// A zip whose one entry inflates to `real` bytes of zeros but declares `declared` bytes.
fn lying_zip(real: usize, declared: u32) -> Vec<u8> {
    let mut zip = zip_of(&[("bomb.bin", &vec![0u8; real], 0o644)]);
    let mut patched = 0;
    let mut i = 0;
    while i + 4 <= zip.len() {
        let sig = &zip[i..i + 4];
        let offset = if sig == b"PK\x03\x04" {
            Some(22)
        } else if sig == b"PK\x01\x02" {
            Some(24)
        } else {
            None
        };
        if let Some(o) = offset {
            zip[i + o..i + o + 4].copy_from_slice(&declared.to_le_bytes());
            patched += 1;
        }
        i += 1;
    }
    assert_eq!(patched, 2, "patched the local and central headers");
    zip
}

/// Nothing but the (possibly empty) code and zip directories; no temporaries, no stray files.
fn assert_nothing_stored(data: &Path) {
    for dir in ["code", "packages"] {
        let entries: Vec<_> = std::fs::read_dir(data.join(dir))
            .map(|d| d.map(|e| e.expect("entry").file_name()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "stored in {dir}: {entries:?}");
    }
    assert!(!data.join("evil").exists() && !data.join("code").join("evil").exists());
}

#[tokio::test]
async fn malicious_and_broken_zips_are_rejected_over_http() {
    let api = Api::with_limits(small_limits()).await;
    let big_random: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let stored_big = {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("big.bin", opts).expect("start");
        w.write_all(&big_random).expect("write");
        w.finish().expect("finish").into_inner()
    };
    let mut corrupt = zip_of(&[("app.py", &b"print('hello world')\n".repeat(50), 0o644)]);
    corrupt[40] ^= 0xff; // inside the compressed data
    let six: Vec<(String, Vec<u8>, u32)> = (0..6)
        .map(|i| (format!("f{i}"), vec![b'x'], 0o644))
        .collect();
    let six_refs: Vec<(&str, &[u8], u32)> = six
        .iter()
        .map(|(n, d, m)| (n.as_str(), d.as_slice(), *m))
        .collect();

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "not a zip",
            b"this is not a zip file".to_vec(),
            400,
            "InvalidParameterValueException",
        ),
        (
            "empty bytes",
            Vec::new(),
            400,
            "InvalidParameterValueException",
        ),
        (
            "truncated",
            handler_zip("v1")[..30].to_vec(),
            400,
            "InvalidParameterValueException",
        ),
        (
            "corrupt data",
            corrupt,
            400,
            "InvalidParameterValueException",
        ),
        (
            "parent escape",
            zip_of(&[("../evil", b"x", 0o644)]),
            400,
            "InvalidParameterValueException",
        ),
        (
            "nested escape",
            zip_of(&[("a/../../evil", b"x", 0o644)]),
            400,
            "InvalidParameterValueException",
        ),
        (
            "absolute",
            zip_of(&[("/abs/evil", b"x", 0o644)]),
            400,
            "InvalidParameterValueException",
        ),
        (
            "symlink",
            symlink_zip(),
            400,
            "InvalidParameterValueException",
        ),
        (
            "too many entries",
            zip_of(&six_refs),
            400,
            "InvalidParameterValueException",
        ),
        (
            "declared too big",
            zip_of(&[("zeros", &vec![0u8; 2 * 1024 * 1024], 0o644)]),
            400,
            "InvalidParameterValueException",
        ),
        (
            "lying bomb",
            lying_zip(2 * 1024 * 1024, 100),
            400,
            "InvalidParameterValueException",
        ),
        (
            "zipped too big",
            stored_big,
            413,
            "RequestTooLargeException",
        ),
        (
            "duplicate entries",
            {
                let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
                let opts = zip::write::SimpleFileOptions::default();
                w.start_file("a", opts).expect("start");
                w.write_all(b"1").expect("w");
                w.add_directory("a/", opts).expect("dir");
                w.start_file("a/b", opts).expect("start");
                w.write_all(b"2").expect("w");
                w.finish().expect("finish").into_inner()
            },
            400,
            "InvalidParameterValueException",
        ),
    ];
    // Lambda's one message for a package it cannot unpack.
    let unzippable = [
        "not a zip",
        "empty bytes",
        "truncated",
        "corrupt data",
        "parent escape",
        "nested escape",
        "absolute",
        "symlink",
        "lying bomb",
        "duplicate entries",
    ];
    for (what, zip, status, kind) in cases {
        let r = api
            .create("f", json!({"Code": {"ZipFile": b64(&zip)}}))
            .await;
        assert_eq!(
            (r.status.as_u16(), r.error_type().as_deref()),
            (status, Some(kind)),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if unzippable.contains(&what) {
            assert_eq!(r.json()["message"], UNZIP_MESSAGE, "{what}");
        }
        assert_nothing_stored(&api.data_dir());
        api.get(&fpath("f"))
            .await
            .assert_error(404, "ResourceNotFoundException");
    }

    // The same rules on UpdateFunctionCode leave the function as it was.
    api.create("g", json!({})).await.assert_status(201);
    let before = api
        .get(&format!("{}/configuration", fpath("g")))
        .await
        .json();
    for zip in [
        zip_of(&[("../evil", b"x", 0o644)]),
        symlink_zip(),
        b"junk".to_vec(),
    ] {
        let r = api
            .put(
                &format!("{}/code", fpath("g")),
                json!({"ZipFile": b64(&zip)}),
            )
            .await;
        r.assert_error(400, "InvalidParameterValueException");
        assert_eq!(r.json()["message"], UNZIP_MESSAGE);
    }
    assert_eq!(
        api.get(&format!("{}/configuration", fpath("g")))
            .await
            .json(),
        before
    );
    let code_dirs = std::fs::read_dir(api.data_dir().join("code"))
        .expect("code")
        .count();
    assert_eq!(code_dirs, 1, "only g's package");
}

#[test]
fn code_store_rules_directly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CodeStore::new(dir.path().join("code"), small_limits());
    let err = store
        .store_zip(&lying_zip(2 * 1024 * 1024, 100))
        .expect_err("bomb");
    assert!(matches!(err, CodeError::Invalid(_)), "{err:?}");
    let err = store
        .store_zip(&zip_of(&[("../x", b"x", 0o644)]))
        .expect_err("escape");
    assert!(matches!(err, CodeError::UnsafePath(_)), "{err:?}");
    let err = store.store_zip(&symlink_zip()).expect_err("symlink");
    assert!(matches!(err, CodeError::Symlink(_)), "{err:?}");
    let err = store
        .store_zip(&zip_of(&[("z", &vec![0u8; 1024 * 1024 + 1], 0o644)]))
        .expect_err("big");
    assert!(matches!(err, CodeError::UnzippedTooLarge { .. }), "{err:?}");
    // Several entries that together pass the unzipped limit.
    let half = vec![0u8; 600 * 1024];
    let err = store
        .store_zip(&zip_of(&[("a", &half, 0o644), ("b", &half, 0o644)]))
        .expect_err("sum");
    assert!(matches!(err, CodeError::UnzippedTooLarge { .. }), "{err:?}");
    let leftovers = std::fs::read_dir(dir.path().join("code"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "failed unpacks leave nothing behind");
}

#[test]
fn permissions_are_normalized_and_packages_shared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CodeStore::new(dir.path().join("code"), CodeLimits::default());
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = |mode| zip::write::SimpleFileOptions::default().unix_permissions(mode);
    for (name, mode) in [
        ("bootstrap", 0o755),
        ("private", 0o600),
        ("setuid", 0o4755),
        ("open", 0o666),
        ("lib/run.sh", 0o700),
    ] {
        w.start_file(name, opts(mode)).expect("start");
        w.write_all(b"data").expect("write");
    }
    w.add_directory("empty/", opts(0o700)).expect("dir");
    w.start_file("./dot/file.txt", opts(0o644)).expect("start");
    w.write_all(b"dot").expect("write");
    let zip = w.finish().expect("finish").into_inner();

    let stored = store.store_zip(&zip).expect("store");
    assert_eq!(stored.size, zip.len() as u64);
    assert_eq!(stored.dir, dir.path().join("code").join(&stored.sha256_hex));
    let mode = |p: &str| {
        std::fs::metadata(stored.dir.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bootstrap"), 0o755);
    assert_eq!(mode("private"), 0o644);
    assert_eq!(mode("setuid"), 0o755);
    assert_eq!(mode("open"), 0o644);
    assert_eq!(mode("lib/run.sh"), 0o755);
    assert_eq!(mode("lib"), 0o755);
    assert_eq!(mode("empty"), 0o755);
    assert_eq!(
        std::fs::read(stored.dir.join("dot/file.txt")).expect("dot"),
        b"dot"
    );

    // The same zip again reuses the directory; a crash leftover is cleaned at start-up.
    let again = store.store_zip(&zip).expect("store again");
    assert_eq!(again, stored);
    std::fs::create_dir(dir.path().join("code").join(".tmp-crashed")).expect("mkdir");
    store.clean_temp().expect("clean");
    let names: Vec<String> = std::fs::read_dir(dir.path().join("code"))
        .expect("code")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, std::slice::from_ref(&stored.sha256_hex));
}

/// `check_zip` (for `DryRun`) applies the rules of `store_zip` and writes nothing.
#[test]
fn checking_a_zip_applies_every_rule_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("code");
    let store = CodeStore::new(root.clone(), small_limits()).with_zip_dir(dir.path().join("zips"));
    let half = vec![0u8; 600 * 1024];
    let duplicate = {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("a", opts).expect("start");
        w.write_all(b"1").expect("w");
        w.start_file("a/b", opts).expect("start");
        w.write_all(b"2").expect("w");
        w.finish().expect("finish").into_inner()
    };
    let long_name = "n".repeat(256);
    let bad = [
        b"junk".to_vec(),
        lying_zip(2 * 1024 * 1024, 100),
        zip_of(&[("../x", b"x", 0o644)]),
        symlink_zip(),
        zip_of(&[("a", &half, 0o644), ("b", &half, 0o644)]),
        duplicate,
        zip_of(&[(long_name.as_str(), b"x", 0o644)]),
    ];
    let checked: Vec<CodeError> = bad
        .iter()
        .map(|zip| store.check_zip(zip).expect_err("check accepted a bad zip"))
        .collect();
    assert!(!root.exists() && !dir.path().join("zips").exists());
    for (zip, checked) in bad.iter().zip(checked) {
        let stored = store.store_zip(zip).expect_err("store accepted a bad zip");
        assert_eq!(
            std::mem::discriminant(&checked),
            std::mem::discriminant(&stored),
            "{checked:?} vs {stored:?}"
        );
    }
    let good = handler_zip("dry");
    let code = store.check_zip(&good).expect("check");
    assert!(
        !store.dir_for(&code.sha256_hex).exists(),
        "a check unpacked"
    );
    let kept = store.zip_path(&code.sha256_hex).expect("zip dir");
    assert!(!kept.exists(), "a check kept the zip");
    let stored = store.store_zip(&good).expect("store");
    assert_eq!(code, stored.code_ref());
    // Stored zips are kept byte for byte where the store keeps zips.
    assert_eq!(std::fs::read(kept).expect("kept zip"), good);
}
