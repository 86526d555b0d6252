//! The raw HTTP/1.1 client: writes bytes exactly as given (reqwest would normalise request
//! targets, header spellings and framing) and parses what comes back, and the framing helpers
//! the raw upstream shares with it. The one hand-written HTTP/1.1 parser of the test suite.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// One response as a client got it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The `reason` of clerkgate's JSON refusal body, or `""`.
    pub fn reason(&self) -> String {
        serde_json::from_slice::<Value>(self.body.trim_ascii())
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A `GET` of `target` with these header lines written byte for byte, `Host: host` first and
/// `Connection: close` last.
pub fn get_request(target: &str, host: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    request
}

/// Writes `bytes` on a fresh connection and parses every response read until the server ends
/// the exchange (the bytes must let it, e.g. with `Connection: close`). A server that resets
/// the connection still yields what it sent before.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<Reply> {
    parse_responses(&exchange(addr, bytes).await)
}

/// The raw bytes a server answers to `bytes`, up to EOF or a reset (bounded by [`WAIT`]).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let run = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(bytes).await;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the server ended the exchange in time")
}

/// Reads one response head (up to and including the blank line) from a connection. `None`
/// when the server closed (or reset) the connection before a complete head; panics after
/// [`WAIT`].
pub async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => return None,
            Err(_) => panic!("no response head within {WAIT:?}"),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The status code of a response head.
#[track_caller]
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {head:?}"))
}

/// Reads one complete `Content-Length`-framed response from a keep-alive connection; `None`
/// when the connection ends first.
pub async fn read_response(stream: &mut TcpStream) -> Option<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return parse_responses(&buf).into_iter().next();
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Parses consecutive HTTP/1.1 responses (Content-Length or chunked bodies; a response
/// without either runs to the end of the bytes).
pub fn parse_responses(mut bytes: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(head_end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = status_of(lines.next().unwrap_or_default());
        let mut headers = HeaderMap::new();
        for line in lines {
            if let Some((name, value)) = line.split_once(':')
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                )
            {
                headers.append(name, value);
            }
        }
        let rest = &bytes[head_end + 4..];
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let length = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if chunked {
            dechunk(rest).unwrap_or_else(|| (rest.to_vec(), rest.len()))
        } else if let Some(len) = length {
            let len = len.min(rest.len());
            (rest[..len].to_vec(), len)
        } else {
            (rest.to_vec(), rest.len())
        };
        out.push(Reply {
            status,
            headers,
            body,
        });
        bytes = &rest[used..];
    }
    out
}

/// Decodes a chunked body; returns the data and the bytes consumed (trailers included), or
/// `None` while it is incomplete.
pub fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut data = Vec::new();
    let mut pos = 0;
    loop {
        let line_end = pos + find(&bytes[pos..], b"\r\n")?;
        let line = std::str::from_utf8(&bytes[pos..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            loop {
                let end = pos + find(&bytes[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some((data, pos));
                }
            }
        }
        data.extend_from_slice(bytes.get(pos..pos + size)?);
        pos += size + 2;
    }
}

/// The length of the first complete request in `buf` (head and `Content-Length` or chunked
/// body), if there is one yet.
pub fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut length = 0;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim() {
                "content-length" => length = value.trim().parse().ok()?,
                "transfer-encoding" => chunked = value.contains("chunked"),
                _ => {}
            }
        }
    }
    if chunked {
        return dechunk(&buf[head_end..]).map(|(_, used)| head_end + used);
    }
    (buf.len() >= head_end + length).then_some(head_end + length)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
