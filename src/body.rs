//! Bodies: reading them with a cap (a client's request, a Clerk or Frontend API answer), and
//! the one helper that builds clerkgate's own JSON answers. A leaf: it imports nothing from the
//! crate, so any module may use it.
//!
//! A hostile or broken peer must not make the process buffer without bound: every body read
//! into memory goes through one of the two readers here, each refusing past `max` bytes.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("body larger than the cap")]
    TooLarge,
    #[error("body read failed: {0}")]
    Read(String),
    #[error("body read timed out")]
    Timeout,
}

/// Reads a request body, refusing to hold more than `max` bytes.
pub(crate) async fn read_capped<B>(body: B, max: usize) -> Result<Bytes, BodyError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// Reads an HTTP client's response body, refusing to hold more than `max` bytes (a declared
/// `Content-Length` above it is refused before reading).
pub(crate) async fn read_response_capped(
    resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    use futures_util::StreamExt;
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                BodyError::Timeout
            } else {
                BodyError::Read(e.without_url().to_string())
            }
        })?;
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// One of clerkgate's own JSON answers: `Content-Type: application/json` (when there is a
/// body) and `Cache-Control: no-store` (an answer about one caller's credentials is never
/// shared by a cache). Callers add any further headers.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let body = body.into();
    let has_body = !body.is_empty();
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if has_body {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_past_the_cap_is_too_large() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_capped(body, 9).await, Err(BodyError::TooLarge));
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_capped(body, 10).await.unwrap(), "0123456789");
    }

    #[test]
    fn json_answers_are_never_cached_and_typed_only_with_a_body() {
        let r = json(StatusCode::OK, "{}");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let r = json(StatusCode::NO_CONTENT, Bytes::new());
        assert!(r.headers().get(header::CONTENT_TYPE).is_none());
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    }
}
