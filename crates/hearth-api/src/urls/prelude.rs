//! The HTTP metadata at the start of a streamed function URL response.
//!
//! A function behind a `RESPONSE_STREAM` URL that wants to set the status, headers or cookies
//! streams with the `Content-Type` `application/vnd.awslambda.http-integration-response` and
//! starts its stream with a JSON object (`statusCode`, `headers`, `cookies`) followed by 8 NUL
//! bytes; the rest is the body (this is what Node.js's `awslambda.HttpResponseStream.from`
//! writes). Any other stream is the body itself, with status 200. Pure: [`scan`] looks at what
//! has arrived so far and says whether the prelude is complete.

/// The `Content-Type` of a stream that begins with a prelude.
pub const CONTENT_TYPE: &str = "application/vnd.awslambda.http-integration-response";
/// What ends the prelude.
pub const DELIMITER: [u8; 8] = [0; 8];
/// The most bytes the prelude (with its delimiter) may take.
pub const MAX_PRELUDE: usize = 16 * 1024;

/// Why a prelude cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreludeError {
    #[error("no prelude delimiter in the first {MAX_PRELUDE} bytes")]
    TooLong,
    #[error("the stream ended before its prelude")]
    Ended,
    #[error("the prelude is not a JSON object: {0}")]
    NotJson(String),
    #[error("the prelude's statusCode is not an HTTP status: {0}")]
    Status(String),
}

/// The response's head, from a prelude.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// `headers`, then one `set-cookie` per cookie.
    pub headers: Vec<(String, String)>,
}

/// How far the prelude got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// The delimiter has not arrived yet.
    More,
    /// The head, and where the body starts in what was scanned.
    Done { head: Head, body_at: usize },
}

/// Look for a complete prelude at the start of `buf` (everything streamed so far).
pub fn scan(buf: &[u8]) -> Result<Scan, PreludeError> {
    let Some(at) = buf.windows(DELIMITER.len()).position(|w| w == DELIMITER) else {
        return if buf.len() >= MAX_PRELUDE {
            Err(PreludeError::TooLong)
        } else {
            Ok(Scan::More)
        };
    };
    if at + DELIMITER.len() > MAX_PRELUDE {
        return Err(PreludeError::TooLong);
    }
    let head = parse(&buf[..at])?;
    Ok(Scan::Done {
        head,
        body_at: at + DELIMITER.len(),
    })
}

fn parse(json: &[u8]) -> Result<Head, PreludeError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| PreludeError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(PreludeError::NotJson("not an object".into()));
    };
    let status = match map.get("statusCode") {
        None | Some(serde_json::Value::Null) => 200,
        Some(v) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (100..=599).contains(n))
            .ok_or_else(|| PreludeError::Status(v.to_string()))?,
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut headers = Vec::new();
    if let Some(serde_json::Value::Object(h)) = map.get("headers") {
        headers.extend(h.iter().map(|(k, v)| (k.clone(), text(v))));
    }
    if let Some(serde_json::Value::Array(cookies)) = map.get("cookies") {
        headers.extend(cookies.iter().map(|c| ("set-cookie".to_string(), text(c))));
    }
    Ok(Head { status, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_delimiter(json: &str, body: &[u8]) -> Vec<u8> {
        let mut v = json.as_bytes().to_vec();
        v.extend_from_slice(&DELIMITER);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_complete_prelude_gives_the_head_and_where_the_body_starts() {
        let buf = with_delimiter(
            r#"{"statusCode":201,"headers":{"x-a":"b","x-n":5},"cookies":["a=1","b=2"]}"#,
            b"body",
        );
        let Ok(Scan::Done { head, body_at }) = scan(&buf) else {
            panic!("complete");
        };
        assert_eq!(head.status, 201);
        assert_eq!(
            head.headers,
            vec![
                ("x-a".into(), "b".into()),
                ("x-n".into(), "5".into()),
                ("set-cookie".into(), "a=1".into()),
                ("set-cookie".into(), "b=2".into())
            ]
        );
        assert_eq!(&buf[body_at..], b"body");
        // A prelude without a status is a 200.
        let Ok(Scan::Done { head, .. }) = scan(&with_delimiter("{}", b"")) else {
            panic!("complete");
        };
        assert_eq!((head.status, head.headers.len()), (200, 0));
    }

    #[test]
    fn partial_and_broken_preludes() {
        // The delimiter split over two chunks: not complete until all 8 NULs are there.
        let mut buf = b"{\"statusCode\":200}\0\0\0".to_vec();
        assert_eq!(scan(&buf), Ok(Scan::More));
        buf.extend_from_slice(&[0; 5]);
        assert!(matches!(scan(&buf), Ok(Scan::Done { body_at, .. }) if body_at == buf.len()));

        assert_eq!(scan(&vec![b' '; MAX_PRELUDE]), Err(PreludeError::TooLong));
        assert!(matches!(
            scan(&with_delimiter("not json", b"")),
            Err(PreludeError::NotJson(_))
        ));
        assert!(matches!(
            scan(&with_delimiter("[1]", b"")),
            Err(PreludeError::NotJson(_))
        ));
        assert!(matches!(
            scan(&with_delimiter(r#"{"statusCode":42}"#, b"")),
            Err(PreludeError::Status(_))
        ));
        assert!(matches!(
            scan(&with_delimiter(r#"{"statusCode":"200"}"#, b"")),
            Err(PreludeError::Status(_))
        ));
    }
}
