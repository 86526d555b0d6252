//! The Clerk Backend API client: the one holder of the secret key.
//!
//! Every call carries `Authorization: Bearer <secret>` and `Clerk-API-Version`, has a timeout,
//! stays under a client-side budget below Clerk's limit (100 requests per 10 s in development,
//! 1000 in production), and honours a 429's `Retry-After` by refusing further calls locally until
//! then, as Clerk's SDK-authoring guide asks. Errors are a closed enum; Clerk's error body is kept
//! for callers that pass it on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::API_VERSION;
use crate::config::Secret;
use crate::telemetry::{ApiEndpoint, ApiResult, Metrics};

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

impl ApiError {
    fn result(&self) -> ApiResult {
        match self {
            Self::NotFound => ApiResult::NotFound,
            Self::RateLimited { .. } => ApiResult::RateLimited,
            Self::Status(_) | Self::Network(_) | Self::Invalid => ApiResult::Error,
            Self::Timeout => ApiResult::Timeout,
            Self::Budget => ApiResult::BudgetExhausted,
        }
    }
}

/// Largest Backend API response body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than the cap")]
    TooLarge,
    #[error("body read failed: {0}")]
    Read(String),
    #[error("body read timed out")]
    Timeout,
}

/// Reads a response body, refusing to hold more than `max` bytes: a hostile or broken endpoint
/// cannot make us buffer without bound.
pub async fn read_capped(resp: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
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

impl Budget {
    fn take(&self) -> Result<(), ApiError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(until) = s.paused_until {
            if now < until {
                return Err(ApiError::RateLimited {
                    retry_after_seconds: (until - now).as_secs().max(1),
                });
            }
            s.paused_until = None;
        }
        if now.duration_since(s.window_start) >= WINDOW {
            s.window_start = now;
            s.used = 0;
        }
        if s.used >= self.limit {
            return Err(ApiError::Budget);
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
        let result = self.get_session_inner(id).await;
        let label = match &result {
            Ok(_) => ApiResult::Ok,
            Err(e) => e.result(),
        };
        self.metrics
            .clerk_api_requests
            .inc(ApiEndpoint::SessionsGet, label);
        result
    }

    async fn get_session_inner(&self, id: &str) -> Result<Session, ApiError> {
        // Ids come from verified tokens, but a path segment is still only ever an id.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ApiError::NotFound);
        }
        self.budget.take()?;
        let url = self
            .base
            .join(&format!("v1/sessions/{id}"))
            .map_err(|_| ApiError::Invalid)?;
        let resp = self
            .http
            .get(url)
            .bearer_auth(self.secret.expose())
            .header("Clerk-API-Version", API_VERSION)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    ApiError::Timeout
                } else {
                    ApiError::Network(e.without_url().to_string())
                }
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after_seconds = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(10)
                .clamp(1, 3600);
            self.budget.pause(retry_after_seconds);
            return Err(ApiError::RateLimited {
                retry_after_seconds,
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ApiError::NotFound);
        }
        if !status.is_success() {
            return Err(ApiError::Status(status.as_u16()));
        }
        let body = read_capped(resp, MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::Invalid)?;
        serde_json::from_slice(&body).map_err(|_| ApiError::Invalid)
    }
}
