//! Presigned download URLs for deployment packages: `GetFunction`'s `Code.Location`.
//!
//! Lambda answers `GetFunction` with a presigned S3 URL that downloads the package for ten
//! minutes without credentials. hearth serves the package itself, at
//! `GET /hearth/v1/code/<sha256-hex>?Expires=<unix seconds>&Signature=<hex>` on the endpoint
//! the client used (the `Host` of its `GetFunction` request), outside the SigV4 gate. The
//! signature is an HMAC-SHA256, under a key kept in the data directory (`download.key`), of
//! the account, the package and the expiry; the bytes served are the zip whose SHA-256 is
//! `CodeSha256`. An expired URL, or one with anything changed, is refused with 403
//! `AccessDeniedException`.
//!
//! Why not SigV4 query signing (as S3 presigns): that would sign with a client's secret key,
//! which the server would have to pick and could later rotate away; a server-held key is
//! enough because the server is the only party that signs and verifies. Why a key of its own
//! rather than one derived from the access keys: the URL must stay valid across a restart
//! with other credentials, and leaking a URL must not help anyone forge SigV4 requests.
//!
//! Everything here is pure (the clock is passed in); the route lives in [`crate::router`].

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How long a download URL works, as in Lambda.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// The route's path prefix.
pub const PATH_PREFIX: &str = "/hearth/v1/code/";

const KEY_LEN: usize = 32;

/// Why a download URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownloadError {
    /// Past its expiry.
    #[error("Request has expired")]
    Expired,
    /// Missing or malformed parameters, or a signature that does not match.
    #[error("The request signature is not valid for this URL")]
    Invalid,
}

/// The signing key of download URLs.
#[derive(Clone)]
pub struct DownloadKey([u8; KEY_LEN]);

impl std::fmt::Debug for DownloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DownloadKey(..)")
    }
}

impl DownloadKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DownloadKey(bytes)
    }

    /// The key in the file at `path`, created (mode 0600, random) if missing. A file of the
    /// wrong length is an error, not silently replaced (that would void every URL issued).
    pub fn load_or_create(path: &Path) -> io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => {
                let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is not a {KEY_LEN}-byte key", path.display()),
                    )
                })?;
                return Ok(DownloadKey(key));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key: [u8; KEY_LEN] = rand::random();
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&key)?;
        file.sync_all()?;
        // Two servers starting at once on one data directory: the first key wins.
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        fs::remove_file(&tmp)?;
        Self::load_or_create(path)
    }

    fn mac(&self, account: &str, sha256_hex: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(
            format!("hearth-code-download/1\n{account}\n{sha256_hex}\n{expires}").as_bytes(),
        );
        mac
    }

    /// The URL of package `sha256_hex` of `account` under `endpoint` (`http://host:port`),
    /// valid until `expires`.
    pub fn presign(
        &self,
        endpoint: &str,
        account: &str,
        sha256_hex: &str,
        expires: DateTime<Utc>,
    ) -> String {
        let expires = expires.timestamp();
        let signature = hex::encode(
            self.mac(account, sha256_hex, expires)
                .finalize()
                .into_bytes(),
        );
        format!("{endpoint}{PATH_PREFIX}{sha256_hex}?Expires={expires}&Signature={signature}")
    }

    /// Check the parameters of a download of `sha256_hex` at `now`. The signature is checked
    /// first (in constant time), so a changed expiry reads as invalid, not as expired.
    pub fn verify(
        &self,
        account: &str,
        sha256_hex: &str,
        expires: Option<&str>,
        signature: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), DownloadError> {
        let expires = expires
            .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|e| e.parse::<i64>().ok())
            .ok_or(DownloadError::Invalid)?;
        let signature = signature
            .and_then(|s| hex::decode(s).ok())
            .ok_or(DownloadError::Invalid)?;
        if !is_sha256_hex(sha256_hex) {
            return Err(DownloadError::Invalid);
        }
        self.mac(account, sha256_hex, expires)
            .verify_slice(&signature)
            .map_err(|_| DownloadError::Invalid)?;
        if now.timestamp() > expires {
            return Err(DownloadError::Expired);
        }
        Ok(())
    }
}

/// 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The endpoint a client reached, from its request's `Host` (or the URI's authority, as
/// HTTP/2 sends it) and `X-Forwarded-Proto`: what a URL handed back to it must start with.
/// `None` if there is no usable host.
pub fn endpoint_of(
    host: Option<&str>,
    uri_authority: Option<&str>,
    forwarded_proto: Option<&str>,
) -> Option<String> {
    let host = host.or(uri_authority)?;
    let authority: http::uri::Authority = host.parse().ok()?;
    if authority.as_str().contains('@') {
        return None; // user info has no place in a Host
    }
    let scheme = match forwarded_proto {
        Some("https") => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn query(url: &str, key: &str) -> Option<String> {
        let q = url.split_once('?')?.1;
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }

    #[test]
    fn presigned_urls_verify_until_they_expire() {
        let key = DownloadKey::from_bytes([7; 32]);
        let now = Utc::now();
        let url = key.presign("http://h:9000", "000000000000", HEX, now + DEFAULT_TTL);
        assert!(url.starts_with(&format!("http://h:9000/hearth/v1/code/{HEX}?Expires=")));
        let (e, s) = (query(&url, "Expires"), query(&url, "Signature"));
        let check = |account: &str, hex: &str, e: Option<&str>, s: Option<&str>, at| {
            key.verify(account, hex, e, s, at)
        };
        assert_eq!(
            check("000000000000", HEX, e.as_deref(), s.as_deref(), now),
            Ok(())
        );
        let later = now + DEFAULT_TTL + chrono::TimeDelta::seconds(1);
        assert_eq!(
            check("000000000000", HEX, e.as_deref(), s.as_deref(), later),
            Err(DownloadError::Expired)
        );
        // Anything changed: another package, account, expiry or key; a missing parameter.
        let other_hex = HEX.replace('9', "8");
        let longer = (now + DEFAULT_TTL * 10).timestamp().to_string();
        let bad = [
            check("000000000000", &other_hex, e.as_deref(), s.as_deref(), now),
            check("111111111111", HEX, e.as_deref(), s.as_deref(), now),
            check("000000000000", HEX, Some(&longer), s.as_deref(), now),
            check("000000000000", HEX, None, s.as_deref(), now),
            check("000000000000", HEX, e.as_deref(), None, now),
            check("000000000000", HEX, e.as_deref(), Some("zz"), now),
            check("000000000000", HEX, Some("-1"), s.as_deref(), now),
            DownloadKey::from_bytes([8; 32]).verify(
                "000000000000",
                HEX,
                e.as_deref(),
                s.as_deref(),
                now,
            ),
        ];
        for (i, r) in bad.into_iter().enumerate() {
            assert_eq!(r, Err(DownloadError::Invalid), "case {i}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("download.key");
        let a = DownloadKey::load_or_create(&path).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = DownloadKey::load_or_create(&path).expect("reload");
        assert_eq!(a.0, b.0);
        fs::write(&path, b"short").expect("write");
        assert!(DownloadKey::load_or_create(&path).is_err());
        assert_eq!(
            fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporaries"
        );
    }

    #[test]
    fn endpoints_come_from_the_host() {
        assert_eq!(
            endpoint_of(Some("127.0.0.1:9000"), None, None).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(
            endpoint_of(None, Some("h.example"), Some("https")).as_deref(),
            Some("https://h.example")
        );
        assert_eq!(endpoint_of(Some("a@b"), None, None), None);
        assert_eq!(endpoint_of(Some("bad host"), None, None), None);
        assert_eq!(endpoint_of(None, None, None), None);
    }
}
