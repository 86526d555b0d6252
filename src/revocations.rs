//! Revocation state at the edge: the deny-lists and session statuses, behind one small
//! interface ([`SessionStore`]), and the [`Guard`] the request path consults. (The config
//! section keeps its user-facing name, `[sessions]`.)
//!
//! Clerk session tokens are stateless and live about 60 s, so every SDK keeps accepting a revoked
//! session until `exp`. clerkgate closes that window: Clerk webhooks (and the Backend API, in
//! `api` mode) feed this store, and the proxy consults it after signature verification on every
//! request, verified-token cache hits included.
//!
//! The in-memory store is the hot path; a fleet shares state through another implementation of
//! the same trait (`fleet::FleetStore`, Redis), which is why the trait is all the [`Guard`]
//! sees. Callers outside this module reach the state only through the [`Guard`]: a check, and
//! the few typed writes the webhook handler and the local API need. Every map is bounded, and
//! entries live `duration_seconds` (`CLERK_SESSION_DURATION`).
//!
//! This module knows nothing of tokens: it is asked about a [`SessionRef`] (session id, user,
//! issue time) and answers with its own [`RevocationError`], which `auth` maps to its refusals.
//! Webhook idempotency (the `svix-id` table) lives with the webhook handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::error::ConfigError;

/// `[sessions]`: how revocation is enforced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `webhook` (deny-list fed by webhooks), `api` (also ask the Backend API once per session),
    /// or `off`.
    pub check: CheckMode,
    /// `CLERK_SESSION_DURATION`: seconds revocations and session state are retained.
    pub duration_seconds: u64,
    /// Most entries in each map (deny-lists, statuses, webhook ids).
    pub max_entries: u64,
    /// `api` mode: seconds a session status from the Backend API is trusted.
    pub status_ttl_seconds: u64,
    /// `api` mode: longest a request waits for the Backend API before the failure policy applies.
    pub api_timeout_ms: u64,
    /// `api` mode: Backend API calls allowed per 10 s (Clerk allows 100 in development, 1000 in
    /// production; stay below).
    pub api_budget_per_10s: u32,
    /// `api` mode: let requests through when the Backend API cannot answer.
    pub fail_open: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            check: CheckMode::Webhook,
            duration_seconds: 86_400,
            max_entries: 100_000,
            status_ttl_seconds: 60,
            api_timeout_ms: 1_000,
            api_budget_per_10s: 90,
            fail_open: false,
        }
    }
}

/// Upper bound of any retention setting (the maps' TTLs must stay representable).
pub const MAX_RETENTION_SECONDS: u64 = 10 * 365 * 86_400;

impl Config {
    /// `duration_seconds` (how long a revocation is kept).
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.duration_seconds)
    }

    /// `status_ttl_seconds`, at least one second.
    pub fn status_ttl(&self) -> Duration {
        Duration::from_secs(self.status_ttl_seconds.max(1))
    }

    /// `api_timeout_ms`.
    pub fn api_timeout(&self) -> Duration {
        Duration::from_millis(self.api_timeout_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("sessions.duration_seconds", self.duration_seconds),
            ("sessions.status_ttl_seconds", self.status_ttl_seconds),
        ] {
            if v == 0 || v > MAX_RETENTION_SECONDS {
                return Err(ConfigError::new(key, "must be between 1 and 10 years"));
            }
        }
        if self.max_entries == 0 {
            return Err(ConfigError::new(
                "sessions.max_entries",
                "must be at least 1",
            ));
        }
        if self.check == CheckMode::Api && self.api_budget_per_10s == 0 {
            return Err(ConfigError::new(
                "sessions.api_budget_per_10s",
                "must be at least 1 in api mode",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckMode {
    Webhook,
    Api,
    Off,
}

/// What a check needs to know about a verified session: built by `auth` from the identity, so
/// this module never sees tokens or claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef<'a> {
    /// `sid`, absent on tokens without a session.
    pub sid: Option<&'a str>,
    /// `sub`.
    pub user_id: &'a str,
    /// `iat` in milliseconds; `None` is denied by any cut-off of its user.
    pub issued_at_ms: Option<u64>,
}

/// A Clerk session status (Clerk's `Session.status`), plus what clerkgate records when Clerk
/// does not know the session or names a status this version does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    Active,
    Pending,
    Revoked,
    Ended,
    Removed,
    Expired,
    Abandoned,
    Replaced,
    /// The Backend API answered 404: a session Clerk does not know is not active.
    NotFound,
    /// A status this version does not know: never active.
    Unknown,
}

impl SessionStatus {
    const ALL: [Self; 10] = [
        Self::Active,
        Self::Pending,
        Self::Revoked,
        Self::Ended,
        Self::Removed,
        Self::Expired,
        Self::Abandoned,
        Self::Replaced,
        Self::NotFound,
        Self::Unknown,
    ];

    /// Clerk's spelling (and the fleet's wire form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Pending => "pending",
            Self::Revoked => "revoked",
            Self::Ended => "ended",
            Self::Removed => "removed",
            Self::Expired => "expired",
            Self::Abandoned => "abandoned",
            Self::Replaced => "replaced",
            Self::NotFound => "not_found",
            Self::Unknown => "unknown",
        }
    }

    /// Parses Clerk's spelling; anything else is [`Self::Unknown`].
    pub fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .unwrap_or(Self::Unknown)
    }

    /// Whether tokens of a session in this status are accepted (`pending` is the verifier's
    /// business: `auth.pending_as_signed_out`).
    pub fn accepts_tokens(self) -> bool {
        matches!(self, Self::Active | Self::Pending)
    }
}

/// The store's answer: why a session is on a deny-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Session,
    User,
}

/// The [`Guard`]'s answer: why a verified token is no longer accepted, or why that cannot be
/// told now. `auth` maps it to its own refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// The session was revoked, ended or removed (or is otherwise not active).
    #[error("session revoked or ended")]
    SessionRevoked,
    /// The user was deleted, banned or locked after the token was issued.
    #[error("user deleted, banned or locked")]
    UserRevoked,
    /// The state cannot be checked now (Backend API or fleet store unavailable).
    #[error("session state cannot be checked")]
    Unavailable,
}

/// Whether shared state can be trusted right now (the fleet store's link, under
/// `fleet.on_unavailable = "fail_closed"`).
pub trait Availability: Send + Sync {
    fn is_up(&self) -> bool;
}

/// The interface behind the [`Guard`]: the in-memory store, or the fleet store around it.
pub trait SessionStore: Send + Sync {
    /// Denies a session id from now on.
    fn deny_session(&self, sid: &str);
    /// Denies every token of a user issued before `at_ms` (deletion, ban, lock).
    fn deny_user_before(&self, user_id: &str, at_ms: u64);
    /// Checks a verified session against the deny-lists. Hot path: no I/O.
    fn check(&self, session: &SessionRef<'_>) -> Result<(), Denied>;
    /// Records a session's status (from a webhook or the Backend API).
    fn set_status(&self, sid: &str, status: SessionStatus);
    /// A recorded session status.
    fn status(&self, sid: &str) -> Option<SessionStatus>;
    /// Denied sessions currently held (for the gauge).
    fn denied_sessions(&self) -> u64;
    /// A Clerk object changed (caches elsewhere must drop it); a shared store tells the other
    /// replicas. This process's own listener is told by the [`Guard`].
    fn changed(&self, _what: Changed<'_>) {}
    /// The registry of long-lived streams closed on revocation.
    fn open_streams(&self) -> &Arc<OpenStreams>;
}

/// The long-lived connections open for a session (WebSocket tunnels): when the session or its
/// user is revoked, here or on any replica of the fleet, they are closed, not only the next
/// request refused. Registration happens once per tunnel, never per request.
#[derive(Default)]
pub struct OpenStreams {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<u64, OpenStream>>,
}

struct OpenStream {
    session: Option<String>,
    user: String,
    /// `iat` in ms; `None` is closed by any cut-off of its user.
    issued_ms: Option<u64>,
    close: Arc<tokio::sync::Notify>,
}

/// One registered stream; dropping it unregisters. `closed()` resolves when it must close.
pub struct StreamHandle {
    id: u64,
    streams: Arc<OpenStreams>,
    close: Arc<tokio::sync::Notify>,
}

impl StreamHandle {
    /// Resolves once the stream's session or user was revoked.
    pub async fn closed(&self) {
        self.close.notified().await;
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

impl OpenStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, OpenStream>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream opened by `session`.
    pub fn register(self: &Arc<Self>, session: &SessionRef<'_>) -> StreamHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        self.lock().insert(
            id,
            OpenStream {
                session: session.sid.map(str::to_owned),
                user: session.user_id.to_owned(),
                issued_ms: session.issued_at_ms,
                close: close.clone(),
            },
        );
        StreamHandle {
            id,
            streams: self.clone(),
            close,
        }
    }

    /// How many streams are open (for tests and debugging).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn close_where(&self, revoked: impl Fn(&OpenStream) -> bool) {
        let open = self.lock();
        for stream in open.values().filter(|s| revoked(s)) {
            // A stored permit: a tunnel not yet waiting still sees it.
            stream.close.notify_one();
        }
    }

    fn close_session(&self, sid: &str) {
        if self.is_empty() {
            return;
        }
        self.close_where(|s| s.session.as_deref() == Some(sid));
    }

    fn close_user_before(&self, user: &str, at_ms: u64) {
        if self.is_empty() {
            return;
        }
        self.close_where(|s| s.user == user && s.issued_ms.is_none_or(|iat| iat < at_ms));
    }
}

/// Everything an [`InMemoryStore`] holds that other replicas need: what a replica re-writes
/// into a shared store that lost it.
#[derive(Debug, Default)]
pub struct Held {
    pub sessions: Vec<String>,
    pub users: Vec<(String, u64)>,
    pub statuses: Vec<(String, SessionStatus)>,
}

/// The default, per-process store.
pub struct InMemoryStore {
    sessions: moka::sync::Cache<String, ()>,
    users: moka::sync::Cache<String, u64>,
    statuses: moka::sync::Cache<String, SessionStatus>,
    /// Set once anything was ever denied: until then the hot path skips both lookups.
    any_denied: AtomicBool,
    /// Tunnels to close when their session or user is denied (by whatever path).
    streams: Arc<OpenStreams>,
}

impl InMemoryStore {
    /// Entries live `duration`; each map holds at most `max_entries`.
    pub fn new(duration: Duration, max_entries: u64) -> Self {
        Self {
            sessions: bounded(max_entries, duration),
            users: bounded(max_entries, duration),
            statuses: bounded(max_entries, duration),
            any_denied: AtomicBool::new(false),
            streams: Arc::default(),
        }
    }

    /// A copy of the deny-lists and statuses (for re-seeding a shared store).
    pub fn held(&self) -> Held {
        Held {
            sessions: self.sessions.iter().map(|(k, _)| (*k).clone()).collect(),
            users: self.users.iter().map(|(k, v)| ((*k).clone(), v)).collect(),
            statuses: self
                .statuses
                .iter()
                .map(|(k, v)| ((*k).clone(), v))
                .collect(),
        }
    }
}

/// A bounded map that always admits a new entry and, when full, drops the least recently
/// used one. moka's default TinyLFU policy would instead refuse a new key that is no more
/// popular than those held: the newest revocation would be the one lost.
pub(crate) fn bounded<V: Clone + Send + Sync + 'static>(
    max_entries: u64,
    ttl: Duration,
) -> moka::sync::Cache<String, V> {
    moka::sync::Cache::builder()
        .max_capacity(max_entries)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .time_to_live(ttl)
        .build()
}

impl SessionStore for InMemoryStore {
    fn deny_session(&self, sid: &str) {
        self.sessions.insert(sid.to_owned(), ());
        self.any_denied.store(true, Ordering::Release);
        self.streams.close_session(sid);
    }

    fn deny_user_before(&self, user_id: &str, at_ms: u64) {
        // Keep the latest cut-off if several events arrive.
        let at = self
            .users
            .get(user_id)
            .map_or(at_ms, |prev| prev.max(at_ms));
        self.users.insert(user_id.to_owned(), at);
        self.any_denied.store(true, Ordering::Release);
        self.streams.close_user_before(user_id, at);
    }

    fn check(&self, session: &SessionRef<'_>) -> Result<(), Denied> {
        if !self.any_denied.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(sid) = session.sid
            && self.sessions.contains_key(sid)
        {
            return Err(Denied::Session);
        }
        if let Some(cutoff_ms) = self.users.get(session.user_id) {
            // Tokens issued at or after the cut-off (a new sign-in after an unban) pass; no
            // `iat` means we cannot tell, so deny.
            if session.issued_at_ms.is_none_or(|iat| iat < cutoff_ms) {
                return Err(Denied::User);
            }
        }
        Ok(())
    }

    fn set_status(&self, sid: &str, status: SessionStatus) {
        self.statuses.insert(sid.to_owned(), status);
    }

    fn status(&self, sid: &str) -> Option<SessionStatus> {
        self.statuses.get(sid)
    }

    fn denied_sessions(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }

    fn open_streams(&self) -> &Arc<OpenStreams> {
        &self.streams
    }
}

/// A Clerk object a webhook reported as changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed<'a> {
    User(&'a str),
    Session(&'a str),
}

/// Holds copies of Clerk objects outside this store (the local API's caches) and must drop
/// them when a webhook reports a change. Registered once with [`Guard::set_change_listener`],
/// because the webhook handler reaches per-process state only through the [`Guard`].
pub trait ChangeListener: Send + Sync {
    /// Cheap and non-blocking: it runs inside the webhook handler.
    fn changed(&self, what: Changed<'_>);
}

/// The one door into revocation state: what authentication calls after verification (the
/// deny-lists, and in `api` mode the session's status from the Backend API), and the typed
/// writes of the webhook handler and the local API.
///
/// Session statuses live in the store (webhook-reported, shared with the fleet, kept for the
/// retention). In `api` mode the Backend API's answers are held separately for
/// `status_ttl_seconds` only, with concurrent misses coalesced into one call: they are a
/// short-lived answer cache that must expire quickly, never state to share or re-seed.
pub struct Guard {
    mode: CheckMode,
    store: Arc<dyn SessionStore>,
    api: Option<Arc<crate::clerk::api::BackendApi>>,
    api_answers: moka::future::Cache<String, SessionStatus>,
    timeout: Duration,
    fail_open: bool,
    metrics: Arc<crate::telemetry::Metrics>,
    listener: std::sync::OnceLock<Arc<dyn ChangeListener>>,
    /// The fleet store's link, when `fleet.on_unavailable = "fail_closed"`: while it is down,
    /// session-bearing requests are refused (503) instead of served from local state alone.
    fail_closed_link: std::sync::OnceLock<Arc<dyn Availability>>,
}

impl Guard {
    pub fn new(
        config: &Config,
        store: Arc<dyn SessionStore>,
        api: Option<Arc<crate::clerk::api::BackendApi>>,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Self {
        Self {
            mode: config.check,
            store,
            api,
            api_answers: moka::future::Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(config.status_ttl())
                .build(),
            timeout: config.api_timeout(),
            fail_open: config.fail_open,
            metrics,
            listener: std::sync::OnceLock::new(),
            fail_closed_link: std::sync::OnceLock::new(),
        }
    }

    /// Refuse session-bearing requests while `link` is down (`fleet.on_unavailable =
    /// "fail_closed"`). Set once at start-up.
    pub fn fail_closed_on(&self, link: Arc<dyn Availability>) {
        let _ = self.fail_closed_link.set(link);
    }

    /// Revokes a session (a webhook's `session.revoked`/`ended`/`removed`, or the local API's
    /// revoke): denied from now on, with `status` recorded and any cached answer dropped.
    pub async fn revoke_session(&self, sid: &str, status: SessionStatus) {
        self.store.deny_session(sid);
        self.store.set_status(sid, status);
        self.forget(sid).await;
    }

    /// Denies every token of `user_id` issued before `at_ms` (deletion, ban, lock).
    pub fn cut_off_user(&self, user_id: &str, at_ms: u64) {
        self.store.deny_user_before(user_id, at_ms);
    }

    /// Records a session's status reported by a webhook (and drops any cached answer).
    pub async fn set_status(&self, sid: &str, status: SessionStatus) {
        self.store.set_status(sid, status);
        self.forget(sid).await;
    }

    /// Denied sessions currently held (for the gauge).
    pub fn denied_sessions(&self) -> u64 {
        self.store.denied_sessions()
    }

    /// Registers a long-lived stream (a WebSocket tunnel) of `session`: the handle resolves
    /// `closed()` when the session or its user is revoked, here or on another replica.
    pub fn watch(&self, session: &SessionRef<'_>) -> StreamHandle {
        self.store.open_streams().register(session)
    }

    /// Registers the listener told about webhook-reported changes. Set once at start-up; a
    /// second call is ignored.
    pub fn set_change_listener(&self, listener: Arc<dyn ChangeListener>) {
        let _ = self.listener.set(listener);
    }

    /// Tells the listener, if any, that a webhook reported `what` as changed, and the store
    /// (which tells the other replicas when it is shared).
    pub fn changed(&self, what: Changed<'_>) {
        self.store.changed(what);
        self.notify_local(what);
    }

    /// Tells only this process's listener (a change another replica reported).
    pub fn notify_local(&self, what: Changed<'_>) {
        if let Some(listener) = self.listener.get() {
            listener.changed(what);
        }
    }

    /// Forgets a cached Backend API answer (a webhook changed the status).
    pub async fn forget(&self, sid: &str) {
        self.api_answers.invalidate(sid).await;
    }

    /// Whether `session` is still accepted. Hot path: the deny-lists are in memory; only `api`
    /// mode may wait, on a status the Backend API has not answered within `status_ttl_seconds`.
    pub async fn check(&self, session: &SessionRef<'_>) -> Result<(), RevocationError> {
        use crate::telemetry::SessionCheckResult as R;
        if self.mode == CheckMode::Off {
            return Ok(());
        }
        if let Some(link) = self.fail_closed_link.get()
            && !link.is_up()
        {
            self.metrics.session_checks.inc(R::Unavailable);
            return Err(RevocationError::Unavailable);
        }
        match self.store.check(session) {
            Ok(()) => {}
            Err(Denied::Session) => {
                self.metrics.session_checks.inc(R::SessionRevoked);
                return Err(RevocationError::SessionRevoked);
            }
            Err(Denied::User) => {
                self.metrics.session_checks.inc(R::UserRevoked);
                return Err(RevocationError::UserRevoked);
            }
        }
        let (CheckMode::Api, Some(api), Some(sid)) = (self.mode, &self.api, session.sid) else {
            return Ok(());
        };
        let status = match self.store.status(sid) {
            Some(status) => Ok(status),
            None => {
                let api = api.clone();
                let id = sid.to_owned();
                let fetch = async move {
                    api.get_session(&id)
                        .await
                        .map(|s| SessionStatus::parse(&s.status))
                        .or_else(|e| match e {
                            // A session Clerk does not know is not active.
                            crate::clerk::api::ApiError::NotFound => Ok(SessionStatus::NotFound),
                            e => Err(e),
                        })
                };
                // Boxed: the Backend API call's state stays out of every request's future.
                match Box::pin(tokio::time::timeout(
                    self.timeout,
                    self.api_answers.try_get_with(sid.to_owned(), fetch),
                ))
                .await
                {
                    Ok(Ok(status)) => Ok(status),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
            }
        };
        match status {
            Ok(status) if status.accepts_tokens() => {
                self.metrics.session_checks.inc(R::Allowed);
                Ok(())
            }
            Ok(_) => {
                self.metrics.session_checks.inc(R::Inactive);
                Err(RevocationError::SessionRevoked)
            }
            Err(why) if self.fail_open => {
                tracing::warn!(error = %why, "session check failed; failing open as configured");
                self.metrics.session_checks.inc(R::FailOpen);
                Ok(())
            }
            Err(why) => {
                tracing::warn!(error = %why, "session check failed; refusing (sessions.fail_open = false)");
                self.metrics.session_checks.inc(R::Unavailable);
                Err(RevocationError::Unavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session<'a>(sub: &'a str, sid: Option<&'a str>, iat: Option<i64>) -> SessionRef<'a> {
        SessionRef {
            sid,
            user_id: sub,
            issued_at_ms: iat.map(|s| (s.max(0) as u64).saturating_mul(1000)),
        }
    }

    fn store() -> InMemoryStore {
        InMemoryStore::new(Duration::from_secs(60), 100)
    }

    #[test]
    fn a_full_deny_list_keeps_the_newest_revocations() {
        let s = InMemoryStore::new(Duration::from_secs(60), 20);
        for i in 0..60 {
            let sid = format!("sess_{i}");
            let user = format!("user_{i}");
            s.deny_session(&sid);
            s.deny_user_before(&user, 5_000);
            // Eviction runs in moka's maintenance; run it as a busy process would.
            s.sessions.run_pending_tasks();
            s.users.run_pending_tasks();
            let latest = session("user_x", Some(&sid), Some(1));
            assert_eq!(
                s.check(&latest),
                Err(Denied::Session),
                "revocation {i} dropped"
            );
            let banned = session(&user, None, Some(1));
            assert_eq!(s.check(&banned), Err(Denied::User), "ban {i} dropped");
        }
        assert!(s.denied_sessions() <= 20, "the bound holds");
    }

    #[test]
    fn denied_sessions_and_users_are_refused() {
        let s = store();
        let ok = session("user_1", Some("sess_1"), Some(1_000));
        assert_eq!(s.check(&ok), Ok(()));
        s.deny_session("sess_1");
        assert_eq!(s.check(&ok), Err(Denied::Session));
        assert_eq!(
            s.check(&session("user_1", Some("sess_2"), Some(1_000))),
            Ok(())
        );
        s.deny_user_before("user_2", 2_000_000);
        assert_eq!(
            s.check(&session("user_2", Some("sess_3"), Some(1_999))),
            Err(Denied::User)
        );
        assert_eq!(
            s.check(&session("user_2", Some("sess_4"), Some(2_000))),
            Ok(()),
            "new sign-in after the cut-off"
        );
        assert_eq!(s.check(&session("user_2", None, None)), Err(Denied::User));
    }

    #[test]
    fn statuses_round_trip_clerks_spelling() {
        for status in SessionStatus::ALL {
            assert_eq!(SessionStatus::parse(status.as_str()), status);
        }
        assert_eq!(SessionStatus::parse("frozen"), SessionStatus::Unknown);
        assert_eq!(SessionStatus::parse("Active"), SessionStatus::Unknown);
        let accepted: Vec<_> = SessionStatus::ALL
            .into_iter()
            .filter(|s| s.accepts_tokens())
            .collect();
        assert_eq!(accepted, [SessionStatus::Active, SessionStatus::Pending]);
        let s = store();
        s.set_status("sess_1", SessionStatus::Ended);
        assert_eq!(s.status("sess_1"), Some(SessionStatus::Ended));
        assert_eq!(s.status("sess_2"), None);
    }
}
