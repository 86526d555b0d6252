//! Revocation state at the edge: the deny-lists and session statuses, behind one small
//! interface ([`SessionStore`]), and the [`Guard`] the request path consults. (The config
//! section keeps its user-facing name, `[sessions]`.)
//!
//! Clerk session tokens are stateless and live about 60 s, so every SDK keeps accepting a revoked
//! session until `exp`. clerkgate closes that window: Clerk webhooks (and the Backend API, in
//! `api` mode) feed this store, and the proxy consults it after signature verification on every
//! request, verified-token cache hits included.
//!
//! The in-memory store is the default; a fleet will share state through another implementation
//! of the same trait (Redis), which is why the trait is all the proxy and the webhook handler
//! see. Every map is bounded, and entries live `duration_seconds` (`CLERK_SESSION_DURATION`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::identity::Identity;
use crate::config::ConfigError;

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

/// Why a verified token is no longer accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Session,
    User,
}

/// What happened to a webhook id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WebhookProgress {
    /// The local state change was applied.
    pub applied: bool,
    /// The event reached the upstream (or forwarding is off).
    pub delivered: bool,
}

/// The answer to "may I process this webhook id?".
pub enum WebhookClaim {
    /// This caller holds the claim until it calls [`SessionStore::release_webhook`]; the
    /// progress is what earlier deliveries of the id completed.
    Won(WebhookProgress),
    /// Another caller holds the claim. The receiver's `changed()` returns (with an error)
    /// when that claim is released: then claim again and read its outcome.
    Busy(tokio::sync::watch::Receiver<()>),
}

/// The interface the proxy and the webhook handler use.
pub trait SessionStore: Send + Sync {
    /// Denies a session id from now on.
    fn deny_session(&self, sid: &str);
    /// Denies every token of a user issued before `at_ms` (deletion, ban, lock).
    fn deny_user_before(&self, user_id: &str, at_ms: u64);
    /// Checks a verified identity against the deny-lists. Hot path: no I/O.
    fn check(&self, identity: &Identity) -> Result<(), Denied>;
    /// Records a session's status (from a webhook or the Backend API).
    fn set_status(&self, sid: &str, status: &str);
    /// A recorded session status.
    fn status(&self, sid: &str) -> Option<Arc<str>>;
    /// Progress of a webhook id (default when never seen).
    fn webhook_progress(&self, id: &str) -> WebhookProgress;
    fn set_webhook_progress(&self, id: &str, progress: WebhookProgress);
    /// Claims a webhook id atomically: of concurrent deliveries of one id (Svix retries do
    /// overlap) exactly one wins and acts; the others wait for its outcome. A shared store
    /// must offer the same guarantee across replicas.
    fn claim_webhook(&self, id: &str) -> WebhookClaim;
    /// Records the winner's progress and releases its claim, waking the waiters.
    fn release_webhook(&self, id: &str, progress: WebhookProgress);
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

    /// Registers a stream opened by `identity`.
    pub fn register(self: &Arc<Self>, identity: &Identity) -> StreamHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        self.lock().insert(
            id,
            OpenStream {
                session: identity.session_id().map(str::to_owned),
                user: identity.user_id().to_owned(),
                issued_ms: identity.iat.map(|s| (s.max(0) as u64).saturating_mul(1000)),
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
    pub statuses: Vec<(String, Arc<str>)>,
}

/// The default, per-process store.
pub struct InMemoryStore {
    sessions: moka::sync::Cache<String, ()>,
    users: moka::sync::Cache<String, u64>,
    statuses: moka::sync::Cache<String, Arc<str>>,
    webhooks: moka::sync::Cache<String, WebhookProgress>,
    /// Webhook ids being processed now; dropping the sender wakes every waiter.
    claims: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<()>>>,
    /// Set once anything was ever denied: until then the hot path skips both lookups.
    any_denied: AtomicBool,
    /// Tunnels to close when their session or user is denied (by whatever path).
    streams: Arc<OpenStreams>,
}

impl InMemoryStore {
    /// `webhook_retention` must cover the Svix tolerance window (and retries within it).
    pub fn new(duration: Duration, max_entries: u64, webhook_retention: Duration) -> Self {
        Self {
            sessions: bounded(max_entries, duration),
            users: bounded(max_entries, duration),
            statuses: bounded(max_entries, duration),
            webhooks: bounded(max_entries, webhook_retention),
            claims: std::sync::Mutex::new(std::collections::HashMap::new()),
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
fn bounded<V: Clone + Send + Sync + 'static>(
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

    fn check(&self, identity: &Identity) -> Result<(), Denied> {
        if !self.any_denied.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(sid) = identity.session_id()
            && self.sessions.contains_key(sid)
        {
            return Err(Denied::Session);
        }
        if let Some(cutoff_ms) = self.users.get(identity.user_id()) {
            // Tokens issued at or after the cut-off (a new sign-in after an unban) pass; no
            // `iat` means we cannot tell, so deny.
            let issued_ms = identity.iat.map(|s| (s.max(0) as u64).saturating_mul(1000));
            if issued_ms.is_none_or(|iat| iat < cutoff_ms) {
                return Err(Denied::User);
            }
        }
        Ok(())
    }

    fn set_status(&self, sid: &str, status: &str) {
        self.statuses.insert(sid.to_owned(), Arc::from(status));
    }

    fn status(&self, sid: &str) -> Option<Arc<str>> {
        self.statuses.get(sid)
    }

    fn webhook_progress(&self, id: &str) -> WebhookProgress {
        self.webhooks.get(id).unwrap_or_default()
    }

    fn set_webhook_progress(&self, id: &str, progress: WebhookProgress) {
        self.webhooks.insert(id.to_owned(), progress);
    }

    fn claim_webhook(&self, id: &str) -> WebhookClaim {
        // Nothing panics under this lock; a poisoned map is still the set of claims.
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = claims.get(id) {
            return WebhookClaim::Busy(held.subscribe());
        }
        claims.insert(id.to_owned(), tokio::sync::watch::Sender::new(()));
        drop(claims);
        WebhookClaim::Won(self.webhook_progress(id))
    }

    fn release_webhook(&self, id: &str, progress: WebhookProgress) {
        // Progress first, so a waiter woken by the release reads the outcome.
        self.set_webhook_progress(id, progress);
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
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

/// What the proxy calls after verification: the deny-lists, and in `api` mode the session's
/// status from the Backend API (cached, concurrent misses coalesced into one call).
pub struct Guard {
    mode: CheckMode,
    store: Arc<dyn SessionStore>,
    api: Option<Arc<crate::clerk::api::BackendApi>>,
    statuses: moka::future::Cache<String, Arc<str>>,
    timeout: Duration,
    fail_open: bool,
    metrics: Arc<crate::telemetry::Metrics>,
    listener: std::sync::OnceLock<Arc<dyn ChangeListener>>,
    /// The fleet store's link, when `fleet.on_unavailable = "fail_closed"`: while it is down,
    /// session-bearing requests are refused (503) instead of served from local state alone.
    fail_closed_link: std::sync::OnceLock<Arc<crate::fleet::Link>>,
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
            statuses: moka::future::Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(Duration::from_secs(config.status_ttl_seconds.max(1)))
                .build(),
            timeout: Duration::from_millis(config.api_timeout_ms),
            fail_open: config.fail_open,
            metrics,
            listener: std::sync::OnceLock::new(),
            fail_closed_link: std::sync::OnceLock::new(),
        }
    }

    /// Refuse session-bearing requests while `link` is down (`fleet.on_unavailable =
    /// "fail_closed"`). Set once at start-up.
    pub fn fail_closed_on(&self, link: Arc<crate::fleet::Link>) {
        let _ = self.fail_closed_link.set(link);
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
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

    /// Forgets a cached status (a webhook changed it).
    pub async fn forget(&self, sid: &str) {
        self.statuses.invalidate(sid).await;
    }

    pub async fn check(&self, identity: &Identity) -> Result<(), crate::auth::AuthError> {
        use crate::auth::AuthError;
        use crate::telemetry::SessionCheckResult as R;
        if self.mode == CheckMode::Off {
            return Ok(());
        }
        if let Some(link) = self.fail_closed_link.get()
            && !link.is_up()
        {
            self.metrics.session_checks.inc(R::Unavailable);
            return Err(AuthError::SessionCheckUnavailable);
        }
        match self.store.check(identity) {
            Ok(()) => {}
            Err(Denied::Session) => {
                self.metrics.session_checks.inc(R::SessionRevoked);
                return Err(AuthError::SessionRevoked);
            }
            Err(Denied::User) => {
                self.metrics.session_checks.inc(R::UserRevoked);
                return Err(AuthError::UserRevoked);
            }
        }
        let (CheckMode::Api, Some(api), Some(sid)) = (self.mode, &self.api, identity.session_id())
        else {
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
                        .map(|s| Arc::<str>::from(s.status.as_str()))
                        .or_else(|e| match e {
                            // A session Clerk does not know is not active.
                            crate::clerk::api::ApiError::NotFound => Ok(Arc::from("not_found")),
                            e => Err(e),
                        })
                };
                match tokio::time::timeout(
                    self.timeout,
                    self.statuses.try_get_with(sid.to_owned(), fetch),
                )
                .await
                {
                    Ok(Ok(status)) => Ok(status),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
            }
        };
        match status {
            Ok(status) if &*status == "active" || &*status == "pending" => {
                self.metrics.session_checks.inc(R::Allowed);
                Ok(())
            }
            Ok(_) => {
                self.metrics.session_checks.inc(R::Inactive);
                Err(AuthError::SessionRevoked)
            }
            Err(why) if self.fail_open => {
                tracing::warn!(error = %why, "session check failed; failing open as configured");
                self.metrics.session_checks.inc(R::FailOpen);
                Ok(())
            }
            Err(why) => {
                tracing::warn!(error = %why, "session check failed; refusing (sessions.fail_open = false)");
                self.metrics.session_checks.inc(R::Unavailable);
                Err(AuthError::SessionCheckUnavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::IdentityParts;

    fn identity(sub: &str, sid: Option<&str>, iat: Option<i64>) -> Identity {
        Identity::new(IdentityParts {
            user_id: sub,
            session_id: sid,
            iat,
            ..IdentityParts::default()
        })
    }

    fn store() -> InMemoryStore {
        InMemoryStore::new(Duration::from_secs(60), 100, Duration::from_secs(600))
    }

    #[test]
    fn a_full_deny_list_keeps_the_newest_revocations() {
        let s = InMemoryStore::new(Duration::from_secs(60), 20, Duration::from_secs(600));
        let done = WebhookProgress {
            applied: true,
            delivered: true,
        };
        for i in 0..60 {
            s.deny_session(&format!("sess_{i}"));
            s.deny_user_before(&format!("user_{i}"), 5_000);
            s.set_webhook_progress(&format!("msg_{i}"), done);
            // Eviction runs in moka's maintenance; run it as a busy process would.
            s.sessions.run_pending_tasks();
            s.users.run_pending_tasks();
            s.webhooks.run_pending_tasks();
            let latest = identity("user_x", Some(&format!("sess_{i}")), Some(1));
            assert_eq!(
                s.check(&latest),
                Err(Denied::Session),
                "revocation {i} dropped"
            );
            let banned = identity(&format!("user_{i}"), None, Some(1));
            assert_eq!(s.check(&banned), Err(Denied::User), "ban {i} dropped");
            assert_eq!(
                s.webhook_progress(&format!("msg_{i}")),
                done,
                "webhook id {i} forgotten"
            );
        }
        assert!(s.denied_sessions() <= 20, "the bound holds");
    }

    #[test]
    fn denied_sessions_and_users_are_refused() {
        let s = store();
        let ok = identity("user_1", Some("sess_1"), Some(1_000));
        assert_eq!(s.check(&ok), Ok(()));
        s.deny_session("sess_1");
        assert_eq!(s.check(&ok), Err(Denied::Session));
        assert_eq!(
            s.check(&identity("user_1", Some("sess_2"), Some(1_000))),
            Ok(())
        );
        s.deny_user_before("user_2", 2_000_000);
        assert_eq!(
            s.check(&identity("user_2", Some("sess_3"), Some(1_999))),
            Err(Denied::User)
        );
        assert_eq!(
            s.check(&identity("user_2", Some("sess_4"), Some(2_000))),
            Ok(()),
            "new sign-in after the cut-off"
        );
        assert_eq!(s.check(&identity("user_2", None, None)), Err(Denied::User));
    }

    #[test]
    fn webhook_progress_is_remembered() {
        let s = store();
        assert_eq!(s.webhook_progress("msg_1"), WebhookProgress::default());
        let p = WebhookProgress {
            applied: true,
            delivered: false,
        };
        s.set_webhook_progress("msg_1", p);
        assert_eq!(s.webhook_progress("msg_1"), p);
    }

    #[tokio::test]
    async fn one_claim_per_webhook_id_and_waiters_see_the_outcome() {
        let s = store();
        let WebhookClaim::Won(first) = s.claim_webhook("msg_1") else {
            panic!("the first claim wins");
        };
        assert_eq!(first, WebhookProgress::default());
        let WebhookClaim::Busy(mut waiter) = s.claim_webhook("msg_1") else {
            panic!("a second claim while the first is held must wait");
        };
        assert!(
            matches!(s.claim_webhook("msg_2"), WebhookClaim::Won(_)),
            "other ids are independent"
        );
        let done = WebhookProgress {
            applied: true,
            delivered: true,
        };
        s.release_webhook("msg_1", done);
        tokio::time::timeout(Duration::from_secs(1), waiter.changed())
            .await
            .expect("the release wakes the waiter")
            .expect_err("the claim's sender is gone");
        let WebhookClaim::Won(after) = s.claim_webhook("msg_1") else {
            panic!("released: the next claim wins");
        };
        assert_eq!(after, done, "and reads the winner's outcome");
    }
}
