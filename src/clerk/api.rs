//! The Clerk Backend API client: the one holder of the secret key.
//!
//! Every call carries `Authorization: Bearer <secret>` and `Clerk-API-Version`, has a timeout,
//! stays under a client-side budget below Clerk's limit (100 requests per 10 s in development,
//! 1000 in production), and honours a 429's `Retry-After` by refusing further calls locally until
//! then, as Clerk's SDK-authoring guide asks. Errors are a closed enum; Clerk's error body is kept
//! for callers that pass it on.
//!
//! Two layers: [`BackendApi::call`] sends one request and hands back whatever Clerk answered
//! ([`Answer`], error statuses included) or why there was no answer ([`CallError`]); typed
//! methods such as [`BackendApi::get_session`] sit on top. Only `GET` is ever retried (bounded,
//! with jittered backoff): a retried `PATCH`, `DELETE` or `POST` could apply twice.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;

use super::API_VERSION;
use crate::body::{BodyError, read_response_capped};
use crate::secret::Secret;
use crate::telemetry::{ApiEndpoint, ApiResult, Label, Metrics};

/// Why a call did not return the resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("rate limited; retry after {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    #[error("Backend API answered {0}")]
    Status(u16),
    #[error("Backend API timed out")]
    Timeout,
    #[error("Backend API unreachable: {0}")]
    Network(String),
    #[error("client-side request budget exhausted")]
    Budget,
    #[error("unexpected response body")]
    Invalid,
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Paused {
                retry_after_seconds,
            } => Self::RateLimited {
                retry_after_seconds,
            },
            CallError::Budget { .. } => Self::Budget,
            CallError::Timeout => Self::Timeout,
            CallError::Network(why) => Self::Network(why),
            CallError::Invalid => Self::Invalid,
        }
    }
}

/// Why a call got no answer from Clerk. Any answer, an error status included, is an [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A 429's `Retry-After` is still running: no call was made.
    #[error("paused by Clerk's Retry-After for {retry_after_seconds} more s")]
    Paused { retry_after_seconds: u64 },
    /// The client-side budget for this 10 s window is spent: no call was made.
    #[error("client-side request budget exhausted for {retry_after_seconds} more s")]
    Budget { retry_after_seconds: u64 },
    #[error("Backend API timed out")]
    Timeout,
    #[error("Backend API unreachable: {0}")]
    Network(String),
    /// A body above the cap, or a 2xx body that is not JSON.
    #[error("unexpected response body")]
    Invalid,
}

impl CallError {
    fn result(&self) -> ApiResult {
        match self {
            Self::Paused { .. } => ApiResult::RateLimited,
            Self::Budget { .. } => ApiResult::BudgetExhausted,
            Self::Timeout => ApiResult::Timeout,
            Self::Network(_) | Self::Invalid => ApiResult::Error,
        }
    }

    /// Worth another attempt of an idempotent call: the request may never have arrived.
    fn retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Network(_) => true,
            Self::Paused { .. } | Self::Budget { .. } | Self::Invalid => false,
        }
    }
}

/// What Clerk answered: any status (429 included, with the pause already applied), the body
/// capped and, for a 2xx, checked to be JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: reqwest::StatusCode,
    pub body: Bytes,
    /// A 429's `Retry-After` in seconds, clamped to 1..=3600 (10 when absent or unreadable).
    pub retry_after_seconds: Option<u64>,
}

impl Answer {
    fn result(&self) -> ApiResult {
        let s = self.status;
        if s.is_success() {
            ApiResult::Ok
        } else if s == reqwest::StatusCode::NOT_FOUND {
            ApiResult::NotFound
        } else if s == reqwest::StatusCode::TOO_MANY_REQUESTS {
            ApiResult::RateLimited
        } else if s.is_client_error() {
            ApiResult::ClientError
        } else {
            ApiResult::Error
        }
    }

    /// A gateway-style failure in front of or inside Clerk, worth retrying an idempotent call.
    fn retryable(&self) -> bool {
        matches!(self.status.as_u16(), 500 | 502 | 503 | 504)
    }
}

/// One Backend API request.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The metric label.
    pub endpoint: ApiEndpoint,
    pub method: reqwest::Method,
    /// Relative to the API base, e.g. `v1/users/user_123`. Ids in it are validated by the caller.
    pub path: &'a str,
    /// Passed through unchanged (`limit=10&user_id=user_1`).
    pub query: Option<&'a str>,
    /// A JSON body, sent as `application/json`.
    pub body: Option<Bytes>,
    /// Timeout of each attempt; `None` keeps the client's default.
    pub timeout: Option<Duration>,
    /// Extra attempts after a timeout, a network error or a 500/502/503/504. Ignored unless the
    /// method is `GET`.
    pub retries: u32,
    /// Largest response body accepted.
    pub max_body_bytes: usize,
    /// `Clerk-API-Version` to send; `None` sends clerkgate's own ([`API_VERSION`]). The local
    /// API passes its caller's on, so an SDK pinned to another version keeps its semantics.
    pub api_version: Option<&'a str>,
}

/// Base of the retry backoff: attempt `n` (from 0) waits between `BASE * 2^n / 2` and
/// `BASE * 2^n`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The wait before retry number `retry` (0 for the first retry), "equal jitter": half fixed,
/// half drawn from `random`, so a fleet of sidecars that failed together does not retry in
/// lockstep.
pub(crate) fn backoff(retry: u32, random: u32) -> Duration {
    let cap = BACKOFF_BASE.saturating_mul(1u32 << retry.min(6));
    let half = cap / 2;
    let jitter_ms = half.as_millis() as u64;
    let extra = if jitter_ms == 0 {
        0
    } else {
        u64::from(random) % (jitter_ms + 1)
    };
    half + Duration::from_millis(extra)
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // Jitter, not a secret: a failed RNG read only loses the spread.
    let _ = aws_lc_rs::rand::fill(&mut buf);
    u32::from_le_bytes(buf)
}

/// `Retry-After` as whole seconds (RFC 9110 section 10.2.3; Clerk sends delay-seconds), clamped.
fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(10)
        .clamp(1, 3600)
}

/// Largest Backend API response body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The part of Clerk's Session object clerkgate uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub user_id: Option<String>,
}

/// A fixed-window request budget: at most `limit` calls per 10 s window, plus a pause set by a
/// 429's `Retry-After`.
struct Budget {
    limit: u32,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    window_start: Instant,
    used: u32,
    paused_until: Option<Instant>,
}

const WINDOW: Duration = Duration::from_secs(10);

/// Whole seconds until `until`, rounded up, at least 1 (a `Retry-After` of 0 invites a spin).
fn seconds_until(now: Instant, until: Instant) -> u64 {
    let left = until.saturating_duration_since(now);
    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
}

impl Budget {
    fn take(&self) -> Result<(), CallError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(until) = s.paused_until {
            if now < until {
                return Err(CallError::Paused {
                    retry_after_seconds: seconds_until(now, until),
                });
            }
            s.paused_until = None;
        }
        if now.duration_since(s.window_start) >= WINDOW {
            s.window_start = now;
            s.used = 0;
        }
        if s.used >= self.limit {
            return Err(CallError::Budget {
                retry_after_seconds: seconds_until(now, s.window_start + WINDOW),
            });
        }
        s.used += 1;
        Ok(())
    }

    fn pause(&self, seconds: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.paused_until = Some(Instant::now() + Duration::from_secs(seconds));
    }
}

/// A Backend API client for one instance.
pub struct BackendApi {
    http: reqwest::Client,
    base: reqwest::Url,
    secret: Secret,
    budget: Budget,
    metrics: Arc<Metrics>,
}

impl BackendApi {
    pub fn new(
        base: reqwest::Url,
        secret: Secret,
        timeout: Duration,
        budget_per_10s: u32,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("clerkgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base,
            secret,
            budget: Budget {
                limit: budget_per_10s,
                state: Mutex::new(BudgetState {
                    window_start: Instant::now(),
                    used: 0,
                    paused_until: None,
                }),
            },
            metrics,
        })
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn get_session(&self, id: &str) -> Result<Session, ApiError> {
        // Ids come from verified tokens, but a path segment is still only ever an id.
        if !is_id(id) {
            return Err(ApiError::NotFound);
        }
        let path = format!("v1/sessions/{id}");
        let answer = self
            .call(Call {
                endpoint: ApiEndpoint::SessionsGet,
                method: reqwest::Method::GET,
                path: &path,
                query: None,
                body: None,
                timeout: None,
                retries: 0,
                max_body_bytes: MAX_BODY_BYTES,
                api_version: None,
            })
            .await?;
        let status = answer.status;
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(ApiError::RateLimited {
                retry_after_seconds: answer.retry_after_seconds.unwrap_or(10),
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ApiError::NotFound);
        }
        if !status.is_success() {
            return Err(ApiError::Status(status.as_u16()));
        }
        serde_json::from_slice(&answer.body).map_err(|_| ApiError::Invalid)
    }

    /// Sends `call`, retrying a `GET` up to `call.retries` times. Every attempt takes from the
    /// budget and is counted in `clerkgate_clerk_api_requests_total`.
    pub async fn call(&self, call: Call<'_>) -> Result<Answer, CallError> {
        self.call_as(call, None).await
    }

    /// [`Self::call`] with another bearer than the instance secret key (a machine secret key
    /// for `POST /m2m_tokens/verify`); the budget and any `Retry-After` pause are still shared.
    pub async fn call_as(
        &self,
        call: Call<'_>,
        bearer: Option<&Secret>,
    ) -> Result<Answer, CallError> {
        let retries = if call.method == reqwest::Method::GET {
            call.retries
        } else {
            0
        };
        let mut attempt = 0;
        loop {
            let span =
                crate::telemetry::otel::backend_api_span(call.endpoint.as_label(), &call.method);
            let attempt_call = self.attempt(&call, bearer);
            let result = tracing::Instrument::instrument(attempt_call, span.clone()).await;
            let label = match &result {
                Ok(answer) => answer.result(),
                Err(e) => e.result(),
            };
            let status = result.as_ref().ok().map(|a| a.status.as_u16());
            crate::telemetry::otel::record_backend_api(&span, status, label.as_label());
            self.metrics.clerk_api_requests.inc(call.endpoint, label);
            let retry = match &result {
                Ok(answer) => answer.retryable(),
                Err(e) => e.retryable(),
            };
            if !retry || attempt >= retries {
                return result;
            }
            tokio::time::sleep(backoff(attempt, random_u32())).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, call: &Call<'_>, bearer: Option<&Secret>) -> Result<Answer, CallError> {
        self.budget.take()?;
        let mut url = self.base.join(call.path).map_err(|_| CallError::Invalid)?;
        url.set_query(call.query.filter(|q| !q.is_empty()));
        let mut req = self
            .http
            .request(call.method.clone(), url)
            .bearer_auth(bearer.unwrap_or(&self.secret).expose())
            .header("Clerk-API-Version", call.api_version.unwrap_or(API_VERSION))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(timeout) = call.timeout {
            req = req.timeout(timeout);
        }
        if let Some(body) = &call.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                CallError::Timeout
            } else {
                CallError::Network(e.without_url().to_string())
            }
        })?;
        let status = resp.status();
        let retry_after_seconds = (status == reqwest::StatusCode::TOO_MANY_REQUESTS).then(|| {
            let seconds = retry_after(resp.headers());
            // Clerk blocks further requests for that long; asking earlier only extends it.
            self.budget.pause(seconds);
            seconds
        });
        let body = read_response_capped(resp, call.max_body_bytes)
            .await
            .map_err(|e| match e {
                BodyError::Timeout => CallError::Timeout,
                BodyError::Read(why) => CallError::Network(why),
                BodyError::TooLarge => CallError::Invalid,
            })?;
        if status.is_success()
            && !body.is_empty()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
        {
            return Err(CallError::Invalid);
        }
        Ok(Answer {
            status,
            body: Bytes::from(body),
            retry_after_seconds,
        })
    }
}

/// A Clerk object id as it may appear in a path: `user_…`, `sess_…`; ASCII letters, digits and
/// `_`, at most 128 bytes. Anything else never reaches a URL.
pub(crate) fn is_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_its_jitter_band() {
        for (retry, low, high) in [(0, 50, 100), (1, 100, 200), (2, 200, 400)] {
            for random in [0, 1, 77, u32::MAX] {
                let d = backoff(retry, random).as_millis();
                assert!((low..=high).contains(&d), "retry {retry}: {d} ms");
            }
        }
        assert_eq!(backoff(0, 0), Duration::from_millis(50));
        // Huge retry counts saturate instead of overflowing.
        assert!(backoff(1000, 5) <= BACKOFF_BASE * 64);
    }

    #[test]
    fn retry_after_is_clamped_and_defaults_to_ten_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), 10);
        for (value, expected) in [
            ("7", 7),
            (" 3 ", 3),
            ("0", 1),
            ("999999", 3600),
            ("soon", 10),
        ] {
            h.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            assert_eq!(retry_after(&h), expected, "{value}");
        }
    }

    #[test]
    fn budget_refuses_past_its_limit_and_during_a_pause() {
        let budget = Budget {
            limit: 2,
            state: Mutex::new(BudgetState {
                window_start: Instant::now(),
                used: 0,
                paused_until: None,
            }),
        };
        assert_eq!(budget.take(), Ok(()));
        assert_eq!(budget.take(), Ok(()));
        assert!(matches!(
            budget.take(),
            Err(CallError::Budget { retry_after_seconds }) if (1..=10).contains(&retry_after_seconds)
        ));
        budget.pause(7);
        assert!(matches!(
            budget.take(),
            Err(CallError::Paused { retry_after_seconds }) if (6..=7).contains(&retry_after_seconds)
        ));
    }

    #[test]
    fn answers_are_labelled_by_status_class() {
        let answer = |status: u16| Answer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            body: Bytes::new(),
            retry_after_seconds: None,
        };
        for (status, label, retry) in [
            (200, ApiResult::Ok, false),
            (204, ApiResult::Ok, false),
            (404, ApiResult::NotFound, false),
            (429, ApiResult::RateLimited, false),
            (422, ApiResult::ClientError, false),
            (500, ApiResult::Error, true),
            (503, ApiResult::Error, true),
            (501, ApiResult::Error, false),
        ] {
            assert_eq!(answer(status).result(), label, "{status}");
            assert_eq!(answer(status).retryable(), retry, "{status}");
        }
    }

    #[test]
    fn only_plain_ids_are_ids() {
        for ok in ["user_2abc", "sess_1", "A9_z"] {
            assert!(is_id(ok), "{ok}");
        }
        for bad in [
            "",
            "user/1",
            "../v1/jwks",
            "user_1?x=1",
            "user 1",
            "usér",
            &"a".repeat(129),
        ] {
            assert!(!is_id(bad), "{bad}");
        }
    }
}
