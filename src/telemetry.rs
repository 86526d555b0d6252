//! Logs and metrics; [`otel`] exports traces.
//!
//! Metric families are built once per process (or once per test) into a [`Metrics`] value that
//! is passed to whoever records, never a process global, so parallel tests do not share
//! counters. Every label value comes from a closed enum ([`Label`]); a path, user id, kid or raw
//! error string can never become a label, which keeps cardinality bounded by the code.
//!
//! Counters are resolved per label value at start-up, so recording on the request path is one
//! atomic add: no label hashing and no lock.

pub(crate) mod otel;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::{Deserialize, Serialize};

/// A closed set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in declaration order; `index()` is the position in this list.
    const ALL: &'static [Self];
    fn as_label(self) -> &'static str;
    fn index(self) -> usize;
}

/// Declares a fieldless enum together with its [`Label`] implementation.
#[macro_export]
macro_rules! label_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }
        impl $crate::telemetry::Label for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_label(self) -> &'static str { match self { $(Self::$variant => $label),+ } }
            fn index(self) -> usize { self as usize }
        }
    };
}

/// A counter family with one label whose values are a closed enum, pre-resolved.
pub struct LabeledCounter<L: Label> {
    counters: Vec<IntCounter>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> LabeledCounter<L> {
    fn register(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("metric registered once");
        let counters = L::ALL
            .iter()
            .map(|l| vec.with_label_values(&[l.as_label()]))
            .collect();
        Self {
            counters,
            _label: std::marker::PhantomData,
        }
    }

    pub fn inc(&self, label: L) {
        self.counters[label.index()].inc();
    }

    pub fn get(&self, label: L) -> u64 {
        self.counters[label.index()].get()
    }
}

label_enum! {
    /// How a proxied request ended.
    pub enum Outcome {
        Forwarded => "forwarded",
        Anonymous => "anonymous",
        Unauthorized => "unauthorized",
        Forbidden => "forbidden",
        BadRequest => "bad_request",
        Unavailable => "unavailable",
        UpstreamError => "upstream_error",
        ForwardAuthAllowed => "forward_auth_allowed",
        Webhook => "webhook",
        /// A CORS preflight forwarded unauthenticated or answered by clerkgate.
        Preflight => "preflight",
        /// A page load sent to Clerk's handshake (307).
        Handshake => "handshake",
        /// A signed-out page load sent to `browser.sign_in_url` (307).
        SignInRedirect => "sign_in_redirect",
        /// Forwarded to Clerk's Frontend API (`browser.fapi_proxy_path`).
        FapiProxy => "fapi_proxy",
    }
}

/// A counter family with two closed labels, pre-resolved as a matrix.
pub struct LabeledCounter2<A: Label, B: Label> {
    counters: Vec<IntCounter>,
    _labels: std::marker::PhantomData<(A, B)>,
}

impl<A: Label, B: Label> LabeledCounter2<A, B> {
    fn register(registry: &Registry, name: &str, help: &str, labels: [&str; 2]) -> Self {
        let vec = IntCounterVec::new(Opts::new(name, help), &labels).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("metric registered once");
        let mut counters = Vec::with_capacity(A::ALL.len() * B::ALL.len());
        for a in A::ALL {
            for b in B::ALL {
                counters.push(vec.with_label_values(&[a.as_label(), b.as_label()]));
            }
        }
        Self {
            counters,
            _labels: std::marker::PhantomData,
        }
    }

    pub fn inc(&self, a: A, b: B) {
        self.counters[a.index() * B::ALL.len() + b.index()].inc();
    }

    pub fn get(&self, a: A, b: B) -> u64 {
        self.counters[a.index() * B::ALL.len() + b.index()].get()
    }
}

label_enum! {
    /// Clerk webhook event types clerkgate distinguishes; everything else is `other`.
    pub enum WebhookEventType {
        SessionCreated => "session.created",
        SessionPending => "session.pending",
        SessionEnded => "session.ended",
        SessionRemoved => "session.removed",
        SessionRevoked => "session.revoked",
        UserCreated => "user.created",
        UserUpdated => "user.updated",
        UserDeleted => "user.deleted",
        Other => "other",
        /// Refused before the payload could be trusted.
        Unverified => "unverified",
    }
}

label_enum! {
    /// What happened to a webhook delivery.
    pub enum WebhookResult {
        Processed => "processed",
        Duplicate => "duplicate",
        Malformed => "malformed",
        BadSignature => "bad_signature",
        Stale => "stale",
        TooLarge => "too_large",
        Unconfigured => "unconfigured",
        ForwardFailed => "forward_failed",
        /// Another delivery of the same id held the claim for longer than we wait.
        InProgress => "in_progress",
    }
}

label_enum! {
    /// Result of consulting session state for a verified token.
    pub enum SessionCheckResult {
        Allowed => "allowed",
        SessionRevoked => "session_revoked",
        UserRevoked => "user_revoked",
        Inactive => "inactive",
        Unavailable => "unavailable",
        FailOpen => "fail_open",
    }
}

label_enum! {
    /// Backend API endpoints clerkgate calls.
    pub enum ApiEndpoint {
        SessionsGet => "sessions_get",
        SessionsList => "sessions_list",
        SessionsRevoke => "sessions_revoke",
        SessionsCreate => "sessions_create",
        UsersGet => "users_get",
        UsersList => "users_list",
        UsersUpdate => "users_update",
        UsersMetadataUpdate => "users_metadata_update",
        UsersDelete => "users_delete",
        UsersCount => "users_count",
        UsersMetadataReplace => "users_metadata_replace",
        UsersBan => "users_ban",
        UsersUnban => "users_unban",
        UsersLock => "users_lock",
        UsersUnlock => "users_unlock",
        UsersOrganizationMemberships => "users_organization_memberships",
        SessionsToken => "sessions_token",
        SessionsVerify => "sessions_verify",
        ClientsHandshakePayload => "clients_handshake_payload",
        SessionsRefresh => "sessions_refresh",
        ApiKeysVerify => "api_keys_verify",
        M2mTokensVerify => "m2m_tokens_verify",
        OauthTokensVerify => "oauth_access_tokens_verify",
    }
}

label_enum! {
    /// Result of one Backend API call.
    pub enum ApiResult {
        Ok => "ok",
        NotFound => "not_found",
        RateLimited => "rate_limited",
        /// Any other 4xx: Clerk refused the request itself (validation, permissions).
        ClientError => "client_error",
        Error => "error",
        Timeout => "timeout",
        BudgetExhausted => "budget_exhausted",
    }
}

label_enum! {
    /// Routes of the pod-local Clerk API (`local_api`); `unknown` for anything else.
    pub enum LocalApiRoute {
        UsersGet => "users_get",
        UsersList => "users_list",
        UsersUpdate => "users_update",
        UsersMetadataUpdate => "users_metadata_update",
        UsersDelete => "users_delete",
        SessionsGet => "sessions_get",
        SessionsList => "sessions_list",
        SessionsRevoke => "sessions_revoke",
        SessionsCreate => "sessions_create",
        TokensVerify => "tokens_verify",
        UsersCount => "users_count",
        UsersMetadataReplace => "users_metadata_replace",
        UsersBan => "users_ban",
        UsersUnban => "users_unban",
        UsersLock => "users_lock",
        UsersUnlock => "users_unlock",
        UsersOrganizationMemberships => "users_organization_memberships",
        SessionsToken => "sessions_token",
        SessionsVerify => "sessions_verify",
        Jwks => "jwks",
        Unknown => "unknown",
    }
}

label_enum! {
    /// How a local API request ended.
    pub enum LocalApiResult {
        /// 2xx.
        Ok => "ok",
        /// Clerk answered 404.
        NotFound => "not_found",
        /// Clerk refused the request (a 4xx other than 404 and 429).
        ClientError => "client_error",
        /// 429, from Clerk or from clerkgate's own budgets.
        RateLimited => "rate_limited",
        /// The local API bearer token was missing or wrong.
        Unauthorized => "unauthorized",
        /// clerkgate refused the request: unknown route, bad id, bad body.
        BadRequest => "bad_request",
        /// `POST /v1/tokens/verify` rejected the token.
        TokenInvalid => "token_invalid",
        /// Clerk failed (5xx), was unreachable or answered something unreadable.
        UpstreamError => "upstream_error",
        /// Clerk did not answer within the deadline.
        Timeout => "timeout",
        /// clerkgate cannot answer now (verification keys unavailable).
        Unavailable => "unavailable",
    }
}

label_enum! {
    /// Why a request failed authentication (Clerk's reason vocabulary).
    pub enum AuthFailure {
        SessionTokenMissing => "session-token-missing",
        TokenInvalid => "token-invalid",
        TokenTooLarge => "token-too-large",
        TokenInvalidAlgorithm => "token-invalid-algorithm",
        TokenTypeMismatch => "token-type-mismatch",
        TokenInvalidSignature => "token-invalid-signature",
        TokenVerificationFailed => "token-verification-failed",
        TokenExpired => "token-expired",
        TokenNotActiveYet => "token-not-active-yet",
        TokenIatInTheFuture => "token-iat-in-the-future",
        TokenInvalidIssuer => "token-invalid-issuer",
        TokenInvalidAuthorizedParties => "token-invalid-authorized-parties",
        JwkKidMismatch => "jwk-kid-mismatch",
        SessionPending => "session-pending",
        SessionTokenButNoClientUat => "session-token-but-no-client-uat",
        SessionTokenIatBeforeClientUat => "session-token-iat-before-client-uat",
        KeysUnavailable => "jwk-remote-failed-to-load",
        SessionRevoked => "session-revoked",
        UserRevoked => "user-revoked",
        SessionCheckUnavailable => "session-check-unavailable",
        TokenRevoked => "token-revoked",
        SecretKeyInvalid => "secret-key-invalid",
        MachineVerifyUnavailable => "machine-verify-unavailable",
    }
}

label_enum! {
    /// The token types Clerk's SDK distinguishes (`TokenType`), for machine metrics.
    pub enum MachineTokenLabel {
        ApiKey => "api_key",
        M2mToken => "m2m_token",
        OauthToken => "oauth_token",
    }
}

label_enum! {
    /// Result of one machine-token verification.
    pub enum MachineResult {
        Ok => "ok",
        /// Answered from the verification cache (or by joining an identical call in flight).
        CacheHit => "cache_hit",
        Invalid => "invalid",
        Revoked => "revoked",
        Expired => "expired",
        MachineScopeMissing => "machine_scope_missing",
        Unavailable => "unavailable",
    }
}

label_enum! {
    /// What went wrong talking to the upstream.
    pub enum UpstreamErrorKind {
        Connect => "connect",
        Timeout => "timeout",
        Protocol => "protocol",
        Upgrade => "upgrade",
    }
}

label_enum! {
    /// Result of one JWKS fetch.
    pub enum JwksFetchResult {
        Ok => "ok",
        HttpError => "http_error",
        Unauthorized => "unauthorized",
        Network => "network",
        Timeout => "timeout",
        TooLarge => "too_large",
        Invalid => "invalid",
        NoUsableKeys => "no_usable_keys",
    }
}

/// Every metric family clerkgate exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: LabeledCounter<Outcome>,
    pub request_duration: Histogram,
    pub auth_failures: LabeledCounter<AuthFailure>,
    pub upstream_errors: LabeledCounter<UpstreamErrorKind>,
    pub jwks_fetches: LabeledCounter<JwksFetchResult>,
    pub jwks_keys: IntGauge,
    pub jwks_age_seconds: IntGauge,
    pub token_cache_hits: IntCounter,
    pub token_cache_misses: IntCounter,
    pub token_cache_evictions: IntCounter,
    pub spoofed_headers: IntCounter,
    pub ready: IntGauge,
    pub webhook_events: LabeledCounter2<WebhookEventType, WebhookResult>,
    pub revoked_sessions: IntGauge,
    pub session_checks: LabeledCounter<SessionCheckResult>,
    pub clerk_api_requests: LabeledCounter2<ApiEndpoint, ApiResult>,
    pub local_api_requests: LabeledCounter2<LocalApiRoute, LocalApiResult>,
    pub user_cache_hits: IntCounter,
    pub user_cache_misses: IntCounter,
    pub fleet_connected: IntGauge,
    pub fleet_events: LabeledCounter2<FleetDirection, FleetEventKind>,
    pub fleet_propagation: Histogram,
    pub upstream_duration: Histogram,
    pub machine_verifications: LabeledCounter2<MachineTokenLabel, MachineResult>,
    pub machine_cache_entries: IntGauge,
}

label_enum! {
    /// Whether a fleet event was sent to Redis or received from another replica.
    pub enum FleetDirection {
        Out => "out",
        In => "in",
    }
}

label_enum! {
    /// What a fleet event carries.
    pub enum FleetEventKind {
        SessionRevoked => "session_revoked",
        UserRevoked => "user_revoked",
        SessionStatus => "session_status",
        UserChanged => "user_changed",
        SessionChanged => "session_changed",
        Resync => "resync",
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let int_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        // Request-shaped latencies: 100 us to 30 s.
        const LATENCY: &[f64] = &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ];
        let upstream_duration = histogram(
            "clerkgate_upstream_duration_seconds",
            "Time from the request sent upstream to the upstream's response head: the part of \
             clerkgate_request_duration_seconds that is the upstream's, not clerkgate's.",
            LATENCY,
        );
        let fleet_propagation = histogram(
            "clerkgate_fleet_propagation_seconds",
            "Time from a state change on one replica to its application on this one.",
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ],
        );
        let request_duration = histogram(
            "clerkgate_request_duration_seconds",
            "Time from request head received to response head sent (or rejection).",
            LATENCY,
        );
        let build_info = IntGaugeVec::new(
            Opts::new("clerkgate_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_start_time_seconds, ...: read from /proc at scrape time only.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");

        Self {
            requests: LabeledCounter::register(
                &registry,
                "clerkgate_requests_total",
                "Requests handled on the proxy listener, by outcome.",
                "outcome",
            ),
            request_duration,
            auth_failures: LabeledCounter::register(
                &registry,
                "clerkgate_auth_failures_total",
                "Requests rejected by token verification, by Clerk reason code.",
                "reason",
            ),
            upstream_errors: LabeledCounter::register(
                &registry,
                "clerkgate_upstream_errors_total",
                "Failed attempts to reach the upstream, by kind.",
                "kind",
            ),
            jwks_fetches: LabeledCounter::register(
                &registry,
                "clerkgate_jwks_fetches_total",
                "JWKS fetches, by result.",
                "result",
            ),
            jwks_keys: int_gauge("clerkgate_jwks_keys", "Usable verification keys held."),
            jwks_age_seconds: int_gauge(
                "clerkgate_jwks_age_seconds",
                "Seconds since the held key set was last fetched successfully (0 for a pinned PEM).",
            ),
            token_cache_hits: int_counter(
                "clerkgate_token_cache_hits_total",
                "Requests whose token was found in the verified-token cache.",
            ),
            token_cache_misses: int_counter(
                "clerkgate_token_cache_misses_total",
                "Requests whose token needed a full verification.",
            ),
            token_cache_evictions: int_counter(
                "clerkgate_token_cache_evictions_total",
                "Cached tokens dropped before they expired because auth.token_cache_capacity was reached.",
            ),
            spoofed_headers: int_counter(
                "clerkgate_spoofed_headers_total",
                "Client-sent headers with a reserved identity name (removed or rejected).",
            ),
            ready: int_gauge("clerkgate_ready", "1 when /readyz answers 200."),
            webhook_events: LabeledCounter2::register(
                &registry,
                "clerkgate_webhook_events_total",
                "Clerk webhook deliveries, by event type and result.",
                ["type", "result"],
            ),
            revoked_sessions: int_gauge(
                "clerkgate_revoked_sessions",
                "Session ids currently on the deny-list.",
            ),
            session_checks: LabeledCounter::register(
                &registry,
                "clerkgate_session_checks_total",
                "Session-state checks of verified tokens, by result.",
                "result",
            ),
            clerk_api_requests: LabeledCounter2::register(
                &registry,
                "clerkgate_clerk_api_requests_total",
                "Calls to the Clerk Backend API, by endpoint and result.",
                ["endpoint", "result"],
            ),
            local_api_requests: LabeledCounter2::register(
                &registry,
                "clerkgate_local_api_requests_total",
                "Requests to the pod-local Clerk API, by route and result.",
                ["route", "result"],
            ),
            user_cache_hits: int_counter(
                "clerkgate_user_cache_hits_total",
                "Local API user reads served without a Backend API call of their own.",
            ),
            user_cache_misses: int_counter(
                "clerkgate_user_cache_misses_total",
                "Local API user reads that fetched the user from the Backend API.",
            ),
            fleet_connected: int_gauge(
                "clerkgate_fleet_connected",
                "1 while the fleet store (Redis) is connected and followed; 0 otherwise or when off.",
            ),
            fleet_events: LabeledCounter2::register(
                &registry,
                "clerkgate_fleet_events_total",
                "Fleet state events sent to Redis (out) or applied from other replicas (in).",
                ["direction", "kind"],
            ),
            fleet_propagation,
            upstream_duration,
            machine_verifications: LabeledCounter2::register(
                &registry,
                "clerkgate_machine_verifications_total",
                "Machine-token verifications (API keys, M2M and OAuth tokens), by type and result.",
                ["type", "result"],
            ),
            machine_cache_entries: int_gauge(
                "clerkgate_machine_cache_entries",
                "Opaque machine-token verdicts cached (passes and refusals).",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `[log]`: how clerkgate writes its logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` overrides it when set.
    pub level: String,
    /// One info line per proxied request (target `clerkgate::access`): method, path without
    /// query, status, outcome, reason code, total and upstream time, request id.
    pub access: bool,
    /// Include the verified user id in access lines.
    pub access_user_id: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
            access: true,
            access_user_id: false,
        }
    }
}

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops).
pub fn init_logging(config: &LogConfig) {
    init_logging_with(config, None);
}

/// [`init_logging`], plus the OpenTelemetry layer when trace export is on ([`otel`]). Without
/// it the subscriber is exactly the plain one; with it, the log layer's filter also excludes
/// the exported spans, so log lines keep their shape.
pub fn init_logging_with(config: &LogConfig, otel: Option<otel::BoxedLayer>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(otel) = otel else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match config.format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.try_init(),
        };
        return;
    };
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = filter.and(filter_fn(otel::not_exported));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: otel::BoxedLayer = match config.format {
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(vec![fmt, otel])
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_auth_failure_label_is_exported_with_zero() {
        let m = Metrics::new();
        m.auth_failures.inc(AuthFailure::TokenExpired);
        let text = m.encode();
        for l in AuthFailure::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", l.as_label())),
                "{}",
                l.as_label()
            );
        }
        assert!(text.contains("clerkgate_auth_failures_total{reason=\"token-expired\"} 1"));
        assert!(text.contains("clerkgate_build_info"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_describe_this_process() {
        let m = Metrics::new();
        let text = m.encode();
        let value = |name: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
            line[name.len() + 1..].trim().parse().expect("a number")
        };
        // This test process has stdin/out/err and the test harness's files open, a non-zero
        // RSS, and started within the last day, after the Unix epoch.
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        let _ = value("process_cpu_seconds_total");
        let _ = value("process_threads");
    }
}
