//! AWS's event-stream encoding (`application/vnd.amazon.eventstream`), as
//! `InvokeWithResponseStream` answers: a sequence of self-delimiting binary messages.
//!
//! ```text
//! u32 BE total length | u32 BE headers length | u32 BE CRC32 of the 8 bytes before
//! headers | payload | u32 BE CRC32 of everything before it
//! ```
//!
//! Each header is `u8 name length | name | u8 value type | value`; only strings (type 7:
//! `u16 BE length | bytes`) are needed here (`:event-type`, `:content-type`, `:message-type`).
//! SDKs check both CRCs and drop the connection on a mismatch, so the encoder is pure and
//! tested against an independent decoder. Only encoding lives here: hearth never reads event
//! streams.

/// The header value type of a string.
const STRING: u8 = 7;

/// One `event` message: `:event-type` `event_type`, `:content-type` `content_type`, the payload.
pub fn event(event_type: &str, content_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut headers = Vec::new();
    for (name, value) in [
        (":event-type", event_type),
        (":content-type", content_type),
        (":message-type", "event"),
    ] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(STRING);
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let total = 12 + headers.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload);
    let message_crc = crc32fast::hash(&out);
    out.extend_from_slice(&message_crc.to_be_bytes());
    out
}

/// A `PayloadChunk` event: bytes of the function's response.
pub fn payload_chunk(bytes: &[u8]) -> Vec<u8> {
    event("PayloadChunk", "application/octet-stream", bytes)
}

/// The `InvokeComplete` event that ends every stream: the error (its type and the error
/// document) when the invocation failed, and the log's tail with `LogType: Tail`.
pub fn invoke_complete(error: Option<(&str, &str)>, log_result: Option<&str>) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    if let Some((code, details)) = error {
        body.insert("ErrorCode".into(), code.into());
        body.insert("ErrorDetails".into(), details.into());
    }
    if let Some(log) = log_result {
        body.insert("LogResult".into(), log.into());
    }
    let payload = serde_json::Value::Object(body).to_string();
    event("InvokeComplete", "application/json", payload.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded message: its headers and payload.
    type Message = (Vec<(String, String)>, Vec<u8>);

    /// A decoder written from the format's description, independent of the encoder.
    fn decode(mut bytes: &[u8]) -> Vec<Message> {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let total = be(&bytes[0..4]) as usize;
            let headers_len = be(&bytes[4..8]) as usize;
            let msg = &bytes[..total];
            assert_eq!(be(&msg[8..12]), crc32fast::hash(&msg[..8]), "prelude CRC");
            assert_eq!(
                be(&msg[total - 4..]),
                crc32fast::hash(&msg[..total - 4]),
                "message CRC"
            );
            let mut h = &msg[12..12 + headers_len];
            let mut headers = Vec::new();
            while !h.is_empty() {
                let n = h[0] as usize;
                let name = String::from_utf8(h[1..1 + n].to_vec()).expect("name");
                assert_eq!(h[1 + n], 7, "string header");
                let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
                let value = String::from_utf8(h[4 + n..4 + n + len].to_vec()).expect("value");
                headers.push((name, value));
                h = &h[4 + n + len..];
            }
            out.push((headers, msg[12 + headers_len..total - 4].to_vec()));
            bytes = &bytes[total..];
        }
        out
    }

    #[test]
    fn messages_decode_with_valid_crcs() {
        let mut stream = payload_chunk(b"hello ");
        stream.extend(payload_chunk(b""));
        stream.extend(invoke_complete(None, Some("bG9n")));
        let msgs = decode(&stream);
        assert_eq!(msgs.len(), 3);
        let header = |i: usize, name: &str| {
            msgs[i]
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(0, ":event-type").as_deref(), Some("PayloadChunk"));
        assert_eq!(header(0, ":message-type").as_deref(), Some("event"));
        assert_eq!(
            header(0, ":content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(msgs[0].1, b"hello ");
        assert!(msgs[1].1.is_empty());
        assert_eq!(header(2, ":event-type").as_deref(), Some("InvokeComplete"));
        let body: serde_json::Value = serde_json::from_slice(&msgs[2].1).expect("JSON");
        assert_eq!(body, serde_json::json!({"LogResult": "bG9n"}));

        let done = invoke_complete(Some(("Sandbox.Timedout", r#"{"errorMessage":"t"}"#)), None);
        let msgs = decode(&done);
        let body: serde_json::Value = serde_json::from_slice(&msgs[0].1).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"ErrorCode": "Sandbox.Timedout", "ErrorDetails": r#"{"errorMessage":"t"}"#})
        );
    }

    #[test]
    fn a_known_message_has_aws_framing() {
        // An empty payload: 12-byte prelude, three headers, 4-byte CRC.
        let msg = payload_chunk(b"");
        let headers_len = (1 + 11 + 1 + 2 + 12) + (1 + 13 + 1 + 2 + 24) + (1 + 13 + 1 + 2 + 5);
        assert_eq!(&msg[4..8], &(headers_len as u32).to_be_bytes());
        assert_eq!(msg.len(), 12 + headers_len + 4);
        assert_eq!(&msg[0..4], &(msg.len() as u32).to_be_bytes());
        // A flipped payload byte breaks the message CRC.
        let mut bad = payload_chunk(b"x");
        let n = bad.len();
        bad[n - 5] ^= 1;
        let crc = u32::from_be_bytes([bad[n - 4], bad[n - 3], bad[n - 2], bad[n - 1]]);
        assert_ne!(crc, crc32fast::hash(&bad[..n - 4]));
    }
}
