//! A small server-side HTTP/1.1 parser and response writer, just enough for the Runtime API.
//!
//! Requests are read in two steps so a handler can decide about a body before reading it:
//! [`read_head`] parses the request line and headers, [`read_body`] then reads a
//! `Content-Length` or `Transfer-Encoding: chunked` body up to a limit. Both work on a
//! [`BufRead`], so bytes of a pipelined next request stay buffered for the next call.

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Longest request line, header line or chunk-size line accepted.
pub const MAX_LINE: usize = 8 * 1024;
/// Most header (or trailer) lines accepted in one request.
pub const MAX_HEADERS: usize = 100;

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The connection failed or ended mid-request: close it without answering.
    Io(io::Error),
    /// The request is not valid HTTP/1.x: answer 400 and close.
    Malformed(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) => write!(f, "connection error: {e}"),
            HttpError::Malformed(why) => write!(f, "malformed request: {why}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0 when the request has neither header).
    Length(u64),
    Chunked,
}

/// A request line plus headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub method: String,
    /// The path, without a query string (absolute-form targets are reduced to their path).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` and waits for an interim response.
    pub expect_continue: bool,
}

impl Head {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request body.
#[derive(Debug, PartialEq)]
pub enum Body {
    Full(Vec<u8>),
    /// Larger than the limit. The rest of it is left unread: the connection must be closed.
    TooLarge,
}

/// Read one line ending in LF (a CR before it is dropped). `None` on EOF before any byte.
fn read_line<R: BufRead>(r: &mut R) -> Result<Option<Vec<u8>>, HttpError> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE + 2 {
            return Err(HttpError::Malformed("line too long"));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// A line that must be there (EOF is a connection error).
fn require_line<R: BufRead>(r: &mut R) -> Result<Vec<u8>, HttpError> {
    read_line(r)?.ok_or_else(|| HttpError::Io(io::ErrorKind::UnexpectedEof.into()))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Read header (or trailer) lines up to the empty line.
fn read_fields<R: BufRead>(r: &mut R) -> Result<Vec<(String, String)>, HttpError> {
    let mut fields = Vec::new();
    loop {
        let line = require_line(r)?;
        if line.is_empty() {
            return Ok(fields);
        }
        if fields.len() == MAX_HEADERS {
            return Err(HttpError::Malformed("too many header fields"));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HttpError::Malformed("obsolete header line folding"));
        }
        let line = String::from_utf8_lossy(&line);
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header field without a colon"))?;
        if !is_token(name) {
            return Err(HttpError::Malformed("bad header field name"));
        }
        fields.push((
            name.to_string(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
}

/// Read a request line and headers. `Ok(None)`: the client closed the connection cleanly.
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Head>, HttpError> {
    // Empty lines before a request are allowed (RFC 9112 §2.2).
    let line = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let line = std::str::from_utf8(&line).map_err(|_| HttpError::Malformed("request line"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !is_token(method) || target.is_empty() {
        return Err(HttpError::Malformed("request line"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Malformed("unsupported HTTP version")),
    };
    let headers = read_fields(r)?;
    fn all<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    let values = |name: &'static str| all(&headers, name);

    let codings: Vec<String> = values("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let lengths: Vec<&str> = values("content-length").collect();
    let has_length = !lengths.is_empty();
    let framing = if !codings.is_empty() {
        if codings.last().map(String::as_str) != Some("chunked") {
            return Err(HttpError::Malformed("unsupported transfer-encoding"));
        }
        Framing::Chunked
    } else {
        let mut length = None;
        for v in lengths {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Malformed("bad content-length"));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| HttpError::Malformed("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Malformed("conflicting content-length"));
            }
            length = Some(n);
        }
        Framing::Length(length.unwrap_or(0))
    };

    let connection: Vec<String> = values("connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let keep_alive = if connection.iter().any(|t| t == "close") {
        false
    } else {
        http11 || connection.iter().any(|t| t == "keep-alive")
    }
    // A request with both framings is a smuggling attempt or a broken client: serve it once.
    && !(framing == Framing::Chunked && has_length);
    let expect_continue =
        http11 && values("expect").any(|v| v.eq_ignore_ascii_case("100-continue"));

    // Reduce an absolute-form target (`http://host/path`) to its path, and drop the query.
    let mut path = target;
    if let Some(i) = path.find("://") {
        path = path[i + 3..].find('/').map_or("/", |j| &path[i + 3 + j..]);
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p).to_string();

    Ok(Some(Head {
        method: method.to_string(),
        path,
        headers,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// Read exactly `n` bytes onto `out`.
fn read_exact_into<R: BufRead>(r: &mut R, n: u64, out: &mut Vec<u8>) -> Result<(), HttpError> {
    let got = r.take(n).read_to_end(out)?;
    if (got as u64) < n {
        return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Read the body a head announced, up to `limit` bytes.
#[cfg(test)]
pub fn read_body<R: BufRead>(r: &mut R, framing: Framing, limit: usize) -> Result<Body, HttpError> {
    read_body_and_trailers(r, framing, limit).map(|(body, _)| body)
}

/// Read the body a head announced, up to `limit` bytes, and a chunked body's trailer fields
/// (a runtime may report an error in them, as a streamed response does).
pub fn read_body_and_trailers<R: BufRead>(
    r: &mut R,
    framing: Framing,
    limit: usize,
) -> Result<(Body, Vec<(String, String)>), HttpError> {
    let mut trailers = Vec::new();
    let mut body = Vec::new();
    match framing {
        Framing::Length(n) if n > limit as u64 => return Ok((Body::TooLarge, trailers)),
        Framing::Length(n) => {
            body.reserve_exact(n as usize);
            read_exact_into(r, n, &mut body)?;
        }
        Framing::Chunked => loop {
            let size = chunk_size(&require_line(r)?)?;
            if size == 0 {
                trailers = read_fields(r)?;
                break;
            }
            if body.len() as u64 + size > limit as u64 {
                return Ok((Body::TooLarge, trailers));
            }
            read_exact_into(r, size, &mut body)?;
            if !require_line(r)?.is_empty() {
                return Err(HttpError::Malformed("chunk not followed by CRLF"));
            }
        },
    }
    Ok((Body::Full(body), trailers))
}

/// A body read piece by piece as it arrives (a streamed response): each [`BodyStream::next`]
/// returns what the connection has, without waiting for a whole chunk.
#[derive(Debug)]
pub struct BodyStream {
    framing: Framing,
    /// Bytes left in the current chunk (chunked) or in the whole body (`Content-Length`).
    left: u64,
    /// A chunk's data ended and its CRLF is still to be read.
    chunk_end: bool,
    done: bool,
    trailers: Vec<(String, String)>,
}

impl BodyStream {
    pub fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            Framing::Chunked => 0,
        };
        BodyStream {
            framing,
            left,
            chunk_end: false,
            done: false,
            trailers: Vec::new(),
        }
    }

    /// The trailer fields of a chunked body (once [`BodyStream::next`] returned `None`).
    pub fn trailers(&self) -> &[(String, String)] {
        &self.trailers
    }

    /// The next piece of the body, at most `max` bytes (`max` > 0), as soon as the connection
    /// has any; `None` at the end of the body. A connection that ends early is an
    /// [`HttpError::Io`].
    pub fn next<R: BufRead>(
        &mut self,
        r: &mut R,
        max: usize,
    ) -> Result<Option<Vec<u8>>, HttpError> {
        if self.done {
            return Ok(None);
        }
        if self.left == 0 {
            if self.framing != Framing::Chunked {
                self.done = true;
                return Ok(None);
            }
            if self.chunk_end && !require_line(r)?.is_empty() {
                return Err(HttpError::Malformed("chunk not followed by CRLF"));
            }
            self.chunk_end = false;
            let size = chunk_size(&require_line(r)?)?;
            if size == 0 {
                self.trailers = read_fields(r)?;
                self.done = true;
                return Ok(None);
            }
            self.left = size;
        }
        let buf = loop {
            match r.fill_buf() {
                Ok(buf) => break buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if buf.is_empty() {
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let n = buf
            .len()
            .min(max)
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let piece = buf[..n].to_vec();
        r.consume(n);
        self.left -= n as u64;
        if self.left == 0 && self.framing == Framing::Chunked {
            self.chunk_end = true;
        }
        Ok(Some(piece))
    }
}

/// The size on a chunk-size line (extensions ignored).
fn chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let line = String::from_utf8_lossy(line);
    let size = line.split_once(';').map_or(&*line, |(s, _)| s).trim();
    if size.is_empty() || size.len() > 16 {
        return Err(HttpError::Malformed("bad chunk size"));
    }
    u64::from_str_radix(size, 16).map_err(|_| HttpError::Malformed("bad chunk size"))
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Unknown",
    }
}

/// Write a complete response (always `Content-Type: application/json`) in one write.
/// CR and LF are removed from header values.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in headers {
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// The interim response to `Expect: 100-continue`.
pub fn write_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(r: &mut &[u8], limit: usize) -> Result<Option<(Head, Body)>, HttpError> {
        let Some(head) = read_head(r)? else {
            return Ok(None);
        };
        let body = read_body(r, head.framing, limit)?;
        Ok(Some((head, body)))
    }

    fn one(raw: &str) -> (Head, Body) {
        request(&mut raw.as_bytes(), 1024)
            .expect("valid request")
            .expect("a request")
    }

    fn malformed(raw: &str) -> &'static str {
        match request(&mut raw.as_bytes(), 1024) {
            Err(HttpError::Malformed(why)) => why,
            other => panic!("expected a malformed request, got {other:?}"),
        }
    }

    #[test]
    fn content_length_body() {
        let (head, body) = one(
            "POST /2018-06-01/runtime/invocation/abc/response HTTP/1.1\r\n\
             Host: x\r\ncontent-length: 5\r\nX-Thing:   spaced value \t\r\n\r\nhello",
        );
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/2018-06-01/runtime/invocation/abc/response");
        assert_eq!(head.framing, Framing::Length(5));
        assert_eq!(head.header("x-thing"), Some("spaced value"));
        assert_eq!(head.header("CONTENT-LENGTH"), Some("5"));
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(body, Body::Full(b"hello".to_vec()));
    }

    #[test]
    fn no_body_and_query_and_absolute_form() {
        let (head, body) = one("GET http://127.0.0.1:9001/a/b?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(head.path, "/a/b");
        assert_eq!(head.framing, Framing::Length(0));
        assert_eq!(body, Body::Full(vec![]));
        let (head, _) = one("GET /next?x=/y HTTP/1.1\r\n\r\n");
        assert_eq!(head.path, "/next");
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let (head, body) = one(
            "POST /r HTTP/1.1\nTransfer-Encoding: chunked\nExpect: 100-continue\n\n\
             5;ext=1\r\nhello\r\n7\r\n, world\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
        );
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.expect_continue);
        assert_eq!(body, Body::Full(b"hello, world0123456789".to_vec()));
    }

    #[test]
    fn chunked_trailers_are_returned() {
        let raw = "5\r\nhello\r\n0\r\nLambda-Runtime-Function-Error-Type: E.T\r\n\r\n";
        let (body, trailers) =
            read_body_and_trailers(&mut raw.as_bytes(), Framing::Chunked, 100).expect("test");
        assert_eq!(body, Body::Full(b"hello".to_vec()));
        assert_eq!(
            trailers,
            vec![(
                "Lambda-Runtime-Function-Error-Type".to_string(),
                "E.T".to_string()
            )]
        );
    }

    /// A reader that hands out its input in the given pieces, one per read, like a socket
    /// on which the client's writes arrive one at a time.
    struct Trickle(std::collections::VecDeque<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut piece) = self.0.pop_front() else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }

    type Fields = Vec<(String, String)>;

    fn pieces(
        input: &[&str],
        framing: Framing,
        max: usize,
    ) -> Result<(Vec<Vec<u8>>, Fields), HttpError> {
        let trickle = Trickle(input.iter().map(|s| s.as_bytes().to_vec()).collect());
        let mut r = std::io::BufReader::new(trickle);
        let mut body = BodyStream::new(framing);
        let mut out = Vec::new();
        while let Some(piece) = body.next(&mut r, max)? {
            out.push(piece);
        }
        assert!(body.next(&mut r, max)?.is_none(), "stays at the end");
        Ok((out, body.trailers().to_vec()))
    }

    #[test]
    fn body_stream_forwards_what_arrived_without_waiting_for_whole_chunks() {
        // The second chunk's data arrives in two reads: its first half is returned at once.
        let (got, trailers) = pieces(
            &[
                "3\r\none\r\n",
                "5\r\ntw",
                "o-2\r\n",
                "0\r\nLambda-Runtime-Function-Error-Type: Boom\r\n",
                "Lambda-Runtime-Function-Error-Body: e30=\r\n\r\n",
            ],
            Framing::Chunked,
            1024,
        )
        .expect("valid");
        assert_eq!(got, vec![b"one".to_vec(), b"tw".to_vec(), b"o-2".to_vec()]);
        assert_eq!(trailers.len(), 2);
        assert_eq!(trailers[1].1, "e30=");

        // Pieces are cut at `max`, and a Content-Length body streams too.
        let (got, _) =
            pieces(&["a\r\n0123456789\r\n0\r\n\r\n"], Framing::Chunked, 4).expect("valid");
        assert_eq!(
            got,
            vec![b"0123".to_vec(), b"4567".to_vec(), b"89".to_vec()]
        );
        let (got, trailers) = pieces(&["abc", "de"], Framing::Length(5), 1024).expect("valid");
        assert_eq!(got, vec![b"abc".to_vec(), b"de".to_vec()]);
        assert!(trailers.is_empty());
        let (got, _) = pieces(&[], Framing::Length(0), 1024).expect("valid");
        assert!(got.is_empty());
    }

    #[test]
    fn body_stream_errors() {
        // Broken off mid-chunk or before the last chunk: a connection error.
        assert!(matches!(
            pieces(&["5\r\nab"], Framing::Chunked, 1024),
            Err(HttpError::Io(_))
        ));
        assert!(matches!(
            pieces(&["2\r\nab\r\n"], Framing::Chunked, 1024),
            Err(HttpError::Io(_))
        ));
        assert!(matches!(
            pieces(&["abc"], Framing::Length(5), 1024),
            Err(HttpError::Io(_))
        ));
        assert!(matches!(
            pieces(&["2\r\nabX\r\n0\r\n\r\n"], Framing::Chunked, 1024),
            Err(HttpError::Malformed("chunk not followed by CRLF"))
        ));
        assert!(matches!(
            pieces(&["zz\r\n"], Framing::Chunked, 1024),
            Err(HttpError::Malformed("bad chunk size"))
        ));
    }

    #[test]
    fn keep_alive_pipelining_of_two_requests() {
        let raw = "POST /one HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
                   POST /two HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
                   GET /three HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = std::io::BufReader::with_capacity(7, raw.as_bytes());
        let h1 = read_head(&mut r).expect("test").expect("test");
        assert_eq!(
            read_body(&mut r, h1.framing, 100).expect("test"),
            Body::Full(b"abc".to_vec())
        );
        let h2 = read_head(&mut r).expect("test").expect("test");
        assert_eq!(h2.path, "/two");
        assert_eq!(
            read_body(&mut r, h2.framing, 100).expect("test"),
            Body::Full(b"de".to_vec())
        );
        let h3 = read_head(&mut r).expect("test").expect("test");
        assert_eq!((h3.method.as_str(), h3.path.as_str()), ("GET", "/three"));
        assert!(h1.keep_alive && h2.keep_alive && !h3.keep_alive);
        assert!(
            read_head(&mut r).expect("test").is_none(),
            "clean EOF after the last one"
        );
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        assert!(!one("GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            one("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !one("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn too_large_bodies() {
        let mut r = "POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n".as_bytes();
        assert!(matches!(
            request(&mut r, 1024),
            Ok(Some((_, Body::TooLarge)))
        ));
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n1\r\nx\r\n0\r\n\r\n",
            "a".repeat(1024)
        );
        assert!(matches!(
            request(&mut chunked.as_bytes(), 1024),
            Ok(Some((_, Body::TooLarge)))
        ));
        // Exactly the limit is fine.
        let exact = format!(
            "POST / HTTP/1.1\r\nContent-Length: 1024\r\n\r\n{}",
            "a".repeat(1024)
        );
        assert!(matches!(
            request(&mut exact.as_bytes(), 1024),
            Ok(Some((_, Body::Full(b)))) if b.len() == 1024
        ));
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(malformed("GARBAGE\r\n\r\n"), "request line");
        assert_eq!(malformed("GET /  HTTP/1.1\r\n\r\n"), "request line");
        assert_eq!(
            malformed("GET / HTTP/2.0\r\n\r\n"),
            "unsupported HTTP version"
        );
        assert_eq!(
            malformed("GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            "header field without a colon"
        );
        assert_eq!(
            malformed("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            "bad header field name"
        );
        assert_eq!(
            malformed("GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"),
            "obsolete header line folding"
        );
        assert_eq!(
            malformed("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            "bad content-length"
        );
        assert_eq!(
            malformed("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            "conflicting content-length"
        );
        assert_eq!(
            malformed("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "unsupported transfer-encoding"
        );
        assert_eq!(
            malformed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            "bad chunk size"
        );
        assert_eq!(
            malformed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n"),
            "chunk not followed by CRLF"
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + 10));
        assert_eq!(malformed(&long), "line too long");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            malformed(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            "too many header fields"
        );
    }

    #[test]
    fn truncated_requests_are_connection_errors() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: x",
            "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(
                matches!(request(&mut raw.as_bytes(), 1024), Err(HttpError::Io(_))),
                "{raw:?}"
            );
        }
        assert!(request(&mut &b""[..], 1024).expect("test").is_none());
    }

    #[test]
    fn writes_responses() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            202,
            &[("X-A", "b\r\nInjected: 1".into())],
            b"{}",
            false,
        )
        .expect("test");
        assert_eq!(
            String::from_utf8(out).expect("test"),
            "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             X-A: bInjected: 1\r\nConnection: close\r\n\r\n{}"
        );
    }
}
