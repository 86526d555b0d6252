//! Fleet state on Redis: a revocation seen by one replica is enforced by all.
//!
//! clerkgate runs as one sidecar per pod, and Clerk delivers each webhook to one of them. Each
//! replica keeps its in-memory store as the hot path (a request never waits on Redis) and
//! mirrors every state change into Redis, where the other replicas pick it up:
//!
//! - **Durable entries** (the truth a replica loads when it starts or reconnects), with a TTL of
//!   the retention (`sessions.duration_seconds`): `{P}:deny:s:{sid}`, `{P}:deny:u:{user}` (the
//!   cut-off in ms; only ever raised), `{P}:status:{sid}`.
//! - **A change feed**, the stream `{P}:feed` (`XADD ... MAXLEN ~ 100000`), that every replica
//!   follows with `XREAD BLOCK` from the last id it saw. Fields: `k` kind, `v` id, `a` argument,
//!   `r` replica, `t` time in ms (for the propagation histogram).
//! - **Webhook claims**: `{P}:whc:{svix-id}` (`SET NX PX`, one winner fleet-wide) and the
//!   progress `{P}:wh:{svix-id}` (`a` applied, `d` delivered).
//!
//! `{P}` is `{fleet.key_prefix}:{issuer}`, so two Clerk instances never share state.
//!
//! Catch-up rule: on every (re)connect a replica (1) re-writes everything it holds
//! (`SET NX`, so a Redis that came back empty is re-seeded), (2) notes the feed's last id,
//! (3) loads every durable entry, then (4) follows the feed from the id of step 2. A replica that
//! re-seeded something announces it with a `resync` event, on which every follower loads the
//! durable entries again: trimming the feed can therefore never lose state, and after an outage
//! every replica converges to the union of what happened. While Redis is unreachable, changes
//! are applied locally (and re-seeded on return); with `on_unavailable = "fail_closed"`
//! readiness and session-bearing requests answer 503 instead.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::error::ConfigError;
use crate::revocations::{
    Availability, Changed, Denied, Guard, InMemoryStore, OpenStreams, SessionRef, SessionStatus,
    SessionStore,
};
use crate::telemetry::{FleetDirection, FleetEventKind, Label, Metrics};
use crate::webhook::ledger::{
    ClaimFuture, LocalLedger, WebhookClaim, WebhookLedger, WebhookProgress,
};

/// `[fleet]`: shared session state for a fleet of replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `redis://host:6379/0` or `rediss://user:pass@host:6380/0`; empty = this process only.
    pub redis_url: RedisUrl,
    /// Keys are `{key_prefix}:{issuer}:...`.
    pub key_prefix: String,
    /// `serve_local` (keep serving from local state, catch up on reconnect) or `fail_closed`
    /// (readiness and session-bearing requests 503 while Redis is unreachable).
    pub on_unavailable: OnUnavailable,
    /// Connect and command timeout for Redis.
    pub connect_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            redis_url: RedisUrl(String::new()),
            key_prefix: "clerkgate".into(),
            on_unavailable: OnUnavailable::ServeLocal,
            connect_timeout_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    ServeLocal,
    FailClosed,
}

/// A Redis URL whose password never appears in `check-config` output or logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `REDACTED`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) if self.0.is_empty() => String::new(),
            Err(_) => "[unparseable]".into(),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl Config {
    /// `connect_timeout_ms`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn enabled(&self) -> bool {
        !self.redis_url.0.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                "fleet.connect_timeout_ms",
                "must be at least 1",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "fleet.key_prefix",
                "must be non-empty without whitespace",
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        let url = url::Url::parse(&self.redis_url.0)
            .map_err(|e| ConfigError::new("fleet.redis_url", format!("not a URL ({e})")))?;
        if url.scheme() != "redis" && url.scheme() != "rediss" {
            return Err(ConfigError::new(
                "fleet.redis_url",
                "must start with redis:// or rediss:// (TLS)",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::new("fleet.redis_url", "needs a host"));
        }
        redis::Client::open(self.redis_url.0.as_str())
            .map_err(|e| ConfigError::new("fleet.redis_url", e.to_string()))?;
        Ok(())
    }
}

/// Whether the link to Redis is up; read on the request path (`fail_closed`) and by readiness.
pub struct Link {
    up: AtomicBool,
    /// The first connection attempt is over (state loaded, or Redis unreachable): until then
    /// a new replica is not ready, so it never serves a token the fleet already revoked.
    settled: AtomicBool,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

impl Availability for Link {
    fn is_up(&self) -> bool {
        Link::is_up(self)
    }
}

/// One state change, as it travels on the feed.
#[derive(Debug, Clone)]
struct Event {
    kind: FleetEventKind,
    id: String,
    arg: String,
}

fn kind_code(kind: FleetEventKind) -> &'static str {
    match kind {
        FleetEventKind::SessionRevoked => "s",
        FleetEventKind::UserRevoked => "u",
        FleetEventKind::SessionStatus => "st",
        FleetEventKind::UserChanged => "cu",
        FleetEventKind::SessionChanged => "cs",
        FleetEventKind::Resync => "resync",
    }
}

fn kind_of(code: &str) -> Option<FleetEventKind> {
    FleetEventKind::ALL
        .iter()
        .copied()
        .find(|k| kind_code(*k) == code)
}

/// Raises a user's cut-off, never lowers it, and keeps the retention TTL.
const RAISE_CUTOFF: &str = "local c = redis.call('GET', KEYS[1]) \
    if (not c) or tonumber(c) < tonumber(ARGV[1]) then \
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end return 1";

/// The outcome of a fleet-wide webhook claim.
pub enum FleetClaim {
    /// This replica acts; the progress is what any replica completed before.
    Won(WebhookProgress),
    /// Another replica held the claim for longer than we wait.
    Busy,
    /// Redis cannot be asked.
    Unavailable,
}

/// The shared store's client: publisher, follower and webhook claims.
pub struct Fleet {
    client: redis::Client,
    url: RedisUrl,
    prefix: String,
    replica: String,
    fail_closed: bool,
    timeout: Duration,
    retention_ms: u64,
    webhook_retention_ms: u64,
    link: Arc<Link>,
    local: Arc<InMemoryStore>,
    tx: mpsc::UnboundedSender<Event>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// The publisher connection while up, for webhook claims.
    conn: Mutex<Option<MultiplexedConnection>>,
    guard: OnceLock<Weak<Guard>>,
    metrics: Arc<Metrics>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn replica_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Redis = redis::RedisResult<()>;

impl Fleet {
    pub fn new(
        config: &Config,
        issuer: &str,
        local: Arc<InMemoryStore>,
        retention: Duration,
        webhook_retention: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ConfigError> {
        // Small writes answered at once: without TCP_NODELAY, Nagle and delayed ACKs add tens of
        // milliseconds to every propagated revocation.
        let info = redis::IntoConnectionInfo::into_connection_info(config.redis_url.0.as_str())
            .map_err(|e| ConfigError::new("fleet.redis_url", e.to_string()))?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info)
            .map_err(|e| ConfigError::new("fleet.redis_url", e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            client,
            url: config.redis_url.clone(),
            prefix: format!("{}:{issuer}", config.key_prefix),
            replica: replica_id(),
            fail_closed: config.on_unavailable == OnUnavailable::FailClosed,
            timeout: config.connect_timeout(),
            retention_ms: retention.as_millis() as u64,
            webhook_retention_ms: webhook_retention.as_millis() as u64,
            link: Arc::new(Link {
                up: AtomicBool::new(false),
                settled: AtomicBool::new(false),
            }),
            local,
            tx,
            rx: Mutex::new(Some(rx)),
            conn: Mutex::new(None),
            guard: OnceLock::new(),
            metrics,
        }))
    }

    pub fn link(&self) -> Arc<Link> {
        self.link.clone()
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// The guard whose caches and listener events from other replicas reach.
    pub fn attach(&self, guard: &Arc<Guard>) {
        let _ = self.guard.set(Arc::downgrade(guard));
    }

    fn key(&self, part: &str, id: &str) -> String {
        format!("{}:{part}:{id}", self.prefix)
    }

    fn feed(&self) -> String {
        format!("{}:feed", self.prefix)
    }

    /// Queues a local change for the other replicas. Never blocks; while Redis is down the
    /// change stays local and the re-seed on reconnect carries it.
    fn publish(&self, kind: FleetEventKind, id: &str, arg: String) {
        if !self.link.is_up() {
            return;
        }
        let _ = self.tx.send(Event {
            kind,
            id: id.to_owned(),
            arg,
        });
    }

    fn connection_config(&self, response: Duration) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(response))
    }

    /// Runs until `shutdown`: connects, re-seeds, loads, follows and publishes; reconnects with
    /// a backoff after any failure.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = self.session(&mut rx);
            tokio::select! {
                result = session => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, redis = %self.url.redacted(), "fleet store unreachable; serving from local state");
                    }
                }
                () = &mut shutdown => {
                    self.set_down();
                    return;
                }
            }
            self.link.settled.store(true, Ordering::Release);
            if self.set_down() {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut shutdown => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Marks the link down; returns whether it was up.
    fn set_down(&self) -> bool {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.metrics.fleet_connected.set(0);
        self.link.up.swap(false, Ordering::AcqRel)
    }

    async fn session(&self, rx: &mut mpsc::UnboundedReceiver<Event>) -> Redis {
        let mut publisher = self
            .client
            .get_multiplexed_async_connection_with_config(&self.connection_config(self.timeout))
            .await?;
        let follower = self
            .client
            .get_multiplexed_async_connection_with_config(
                &self.connection_config(self.timeout + Duration::from_millis(FOLLOW_BLOCK_MS)),
            )
            .await?;
        let reseeded = self.reseed(&mut publisher).await?;
        let start = self.feed_tail(&mut publisher).await?;
        self.load(&mut publisher).await?;
        // Changes queued before the link went down are covered by the re-seed.
        while rx.try_recv().is_ok() {}
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(publisher.clone());
        self.link.up.store(true, Ordering::Release);
        self.link.settled.store(true, Ordering::Release);
        self.metrics.fleet_connected.set(1);
        tracing::info!(redis = %self.url.redacted(), reseeded, "fleet store connected");
        if reseeded > 0 {
            self.write(
                &mut publisher,
                &Event {
                    kind: FleetEventKind::Resync,
                    id: String::new(),
                    arg: String::new(),
                },
            )
            .await?;
        }
        tokio::select! {
            r = self.publish_loop(rx, publisher) => r,
            r = self.follow(follower, start) => r,
        }
    }

    /// Writes everything held locally that Redis may lack; returns how many entries.
    async fn reseed(&self, con: &mut MultiplexedConnection) -> redis::RedisResult<usize> {
        let held = self.local.held();
        let total = held.sessions.len() + held.users.len() + held.statuses.len();
        for chunk in held.sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for sid in chunk {
                pipe.cmd("SET")
                    .arg(self.key("deny:s", sid))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.retention_ms)
                    .ignore();
            }
            pipe.query_async::<()>(con).await?;
        }
        for chunk in held.users.chunks(500) {
            let mut pipe = redis::pipe();
            for (user, at) in chunk {
                pipe.cmd("EVAL")
                    .arg(RAISE_CUTOFF)
                    .arg(1)
                    .arg(self.key("deny:u", user))
                    .arg(*at)
                    .arg(self.retention_ms)
                    .ignore();
            }
            pipe.query_async::<()>(con).await?;
        }
        for chunk in held.statuses.chunks(500) {
            let mut pipe = redis::pipe();
            for (sid, status) in chunk {
                pipe.cmd("SET")
                    .arg(self.key("status", sid))
                    .arg(status.as_str())
                    .arg("NX")
                    .arg("PX")
                    .arg(self.retention_ms)
                    .ignore();
            }
            pipe.query_async::<()>(con).await?;
        }
        Ok(total)
    }

    /// The id of the newest feed entry, or `0-0`.
    async fn feed_tail(&self, con: &mut MultiplexedConnection) -> redis::RedisResult<String> {
        let last: StreamRangeIds = redis::cmd("XREVRANGE")
            .arg(self.feed())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(con)
            .await?;
        Ok(last.0.into_iter().next().unwrap_or_else(|| "0-0".into()))
    }

    /// Loads every durable entry into the local store.
    async fn load(&self, con: &mut MultiplexedConnection) -> Redis {
        for (part, kind) in [
            ("deny:s", FleetEventKind::SessionRevoked),
            ("deny:u", FleetEventKind::UserRevoked),
            ("status", FleetEventKind::SessionStatus),
        ] {
            let base = format!("{}:{part}:", self.prefix);
            let pattern = format!("{base}*");
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(con)
                    .await?;
                if !keys.is_empty() {
                    let values: Vec<Option<String>> =
                        redis::cmd("MGET").arg(&keys).query_async(con).await?;
                    for (key, value) in keys.iter().zip(values) {
                        let (Some(id), Some(value)) = (key.strip_prefix(&base), value) else {
                            continue;
                        };
                        self.apply_local(kind, id, &value).await;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        self.metrics
            .revoked_sessions
            .set(self.local.denied_sessions() as i64);
        Ok(())
    }

    async fn publish_loop(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
        mut con: MultiplexedConnection,
    ) -> Redis {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Some(event)) => self.write(&mut con, &event).await?,
                Ok(None) => return Ok(()),
                // Idle: a PING notices a Redis that stopped answering (paused, partitioned).
                Err(_) => redis::cmd("PING").query_async::<()>(&mut con).await?,
            }
        }
    }

    /// The durable entry (when the kind has one) and the feed entry, in one round trip.
    async fn write(&self, con: &mut MultiplexedConnection, event: &Event) -> Redis {
        let mut pipe = redis::pipe();
        match event.kind {
            FleetEventKind::SessionRevoked => {
                pipe.cmd("SET")
                    .arg(self.key("deny:s", &event.id))
                    .arg(1)
                    .arg("PX")
                    .arg(self.retention_ms)
                    .ignore();
            }
            FleetEventKind::UserRevoked => {
                pipe.cmd("EVAL")
                    .arg(RAISE_CUTOFF)
                    .arg(1)
                    .arg(self.key("deny:u", &event.id))
                    .arg(&event.arg)
                    .arg(self.retention_ms)
                    .ignore();
            }
            FleetEventKind::SessionStatus => {
                pipe.cmd("SET")
                    .arg(self.key("status", &event.id))
                    .arg(&event.arg)
                    .arg("PX")
                    .arg(self.retention_ms)
                    .ignore();
            }
            FleetEventKind::UserChanged
            | FleetEventKind::SessionChanged
            | FleetEventKind::Resync => {}
        }
        pipe.cmd("XADD")
            .arg(self.feed())
            .arg("MAXLEN")
            .arg("~")
            .arg(FEED_MAXLEN)
            .arg("*")
            .arg("k")
            .arg(kind_code(event.kind))
            .arg("v")
            .arg(&event.id)
            .arg("a")
            .arg(&event.arg)
            .arg("r")
            .arg(&self.replica)
            .arg("t")
            .arg(now_ms())
            .ignore();
        pipe.query_async::<()>(con).await?;
        self.metrics
            .fleet_events
            .inc(FleetDirection::Out, event.kind);
        Ok(())
    }

    async fn follow(&self, mut con: MultiplexedConnection, mut last: String) -> Redis {
        let feed = self.feed();
        loop {
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(FOLLOW_BLOCK_MS)
                .arg("STREAMS")
                .arg(&feed)
                .arg(&last)
                .query_async(&mut con)
                .await?;
            let Some(reply) = reply else { continue };
            for key in reply.keys {
                for entry in key.ids {
                    last = entry.id.clone();
                    let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
                    if field("r") == self.replica {
                        continue;
                    }
                    let Some(kind) = kind_of(&field("k")) else {
                        continue;
                    };
                    if let Ok(sent) = field("t").parse::<u64>() {
                        let lag = now_ms().saturating_sub(sent);
                        self.metrics.fleet_propagation.observe(lag as f64 / 1000.0);
                    }
                    self.metrics.fleet_events.inc(FleetDirection::In, kind);
                    if kind == FleetEventKind::Resync {
                        // Cheap to ask for: only sent by a replica that re-seeded after an outage.
                        let mut con = con.clone();
                        self.load(&mut con).await?;
                        continue;
                    }
                    self.apply_local(kind, &field("v"), &field("a")).await;
                }
            }
        }
    }

    /// Applies another replica's change to this process only (never published again).
    async fn apply_local(&self, kind: FleetEventKind, id: &str, arg: &str) {
        let guard = self.guard.get().and_then(Weak::upgrade);
        match kind {
            FleetEventKind::SessionRevoked => self.local.deny_session(id),
            FleetEventKind::UserRevoked => {
                if let Ok(at) = arg.parse() {
                    self.local.deny_user_before(id, at);
                }
            }
            FleetEventKind::SessionStatus => {
                self.local.set_status(id, SessionStatus::parse(arg));
                if let Some(g) = &guard {
                    g.forget(id).await;
                }
            }
            FleetEventKind::UserChanged => {
                if let Some(g) = &guard {
                    g.notify_local(Changed::User(id));
                }
            }
            FleetEventKind::SessionChanged => {
                if let Some(g) = &guard {
                    g.forget(id).await;
                    g.notify_local(Changed::Session(id));
                }
            }
            FleetEventKind::Resync => {}
        }
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.link.is_up() {
            return None;
        }
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Claims a webhook id fleet-wide, waiting up to `wait` for another replica's claim.
    pub async fn claim_webhook(&self, id: &str, wait: Duration) -> FleetClaim {
        let Some(mut con) = self.connection() else {
            return FleetClaim::Unavailable;
        };
        let claim = self.key("whc", id);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let won: Result<Option<String>, _> = redis::cmd("SET")
                .arg(&claim)
                .arg(&self.replica)
                .arg("NX")
                .arg("PX")
                .arg((wait + Duration::from_secs(5)).as_millis() as u64)
                .query_async(&mut con)
                .await;
            match won {
                Ok(Some(_)) => break,
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Ok(None) => return FleetClaim::Busy,
                Err(_) => return FleetClaim::Unavailable,
            }
        }
        let progress: Result<Option<String>, _> = redis::cmd("GET")
            .arg(self.key("wh", id))
            .query_async(&mut con)
            .await;
        match progress {
            Ok(p) => {
                let p = p.unwrap_or_default();
                FleetClaim::Won(WebhookProgress {
                    applied: p.contains('a'),
                    delivered: p.contains('d'),
                })
            }
            Err(_) => FleetClaim::Unavailable,
        }
    }

    /// Records the winner's progress and releases its claim.
    pub async fn release_webhook(&self, id: &str, progress: WebhookProgress) {
        let Some(mut con) = self.connection() else {
            return;
        };
        let mut value = String::new();
        if progress.applied {
            value.push('a');
        }
        if progress.delivered {
            value.push('d');
        }
        let mut pipe = redis::pipe();
        if !value.is_empty() {
            pipe.cmd("SET")
                .arg(self.key("wh", id))
                .arg(value)
                .arg("PX")
                .arg(self.webhook_retention_ms)
                .ignore();
        }
        pipe.cmd("DEL").arg(self.key("whc", id)).ignore();
        if let Err(e) = pipe.query_async::<()>(&mut con).await {
            tracing::warn!(error = %e, "fleet store: webhook claim not released; it expires by itself");
        }
    }
}

/// How long one `XREAD` blocks before asking again (and noticing a dead link).
const FOLLOW_BLOCK_MS: u64 = 1000;
/// The feed keeps about this many entries; a replica further behind re-loads the durable
/// entries instead (every reconnect does).
const FEED_MAXLEN: u64 = 100_000;

/// The ids of an `XREVRANGE` answer.
struct StreamRangeIds(Vec<String>);

impl redis::FromRedisValue for StreamRangeIds {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let entries: Vec<(String, redis::Value)> = redis::from_redis_value(v)?;
        Ok(Self(entries.into_iter().map(|(id, _)| id).collect()))
    }
}

/// The session store of a replica in a fleet: the in-memory store on the hot path, with every
/// change also sent to the other replicas; and its webhook ledger, whose claims hold
/// fleet-wide.
pub struct FleetStore {
    local: Arc<InMemoryStore>,
    ledger: LocalLedger,
    /// Ids this replica also claimed in Redis (released there too, in the background). A
    /// process holds at most one claim per id, so the id is the key.
    fleet_claims: Mutex<std::collections::HashSet<String>>,
    fleet: Arc<Fleet>,
}

impl FleetStore {
    pub fn new(local: Arc<InMemoryStore>, ledger: LocalLedger, fleet: Arc<Fleet>) -> Self {
        Self {
            local,
            ledger,
            fleet_claims: Mutex::default(),
            fleet,
        }
    }

    fn fleet_claims(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.fleet_claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process first, then fleet-wide: one replica acts on a delivery that reached
    /// several.
    async fn claim_both(&self, id: &str, wait: Duration) -> WebhookClaim {
        let mut progress = match self.ledger.claim_local(id, wait).await {
            WebhookClaim::Won(progress) => progress,
            other => return other,
        };
        match self.fleet.claim_webhook(id, wait).await {
            FleetClaim::Won(done) => {
                progress.applied |= done.applied;
                progress.delivered |= done.delivered;
                self.fleet_claims().insert(id.to_owned());
                WebhookClaim::Won(progress)
            }
            FleetClaim::Busy => {
                self.ledger.release(id, progress);
                WebhookClaim::Busy
            }
            FleetClaim::Unavailable if self.fleet.fail_closed() => {
                self.ledger.release(id, progress);
                WebhookClaim::Unavailable
            }
            // serve_local: applied here, carried to Redis by the re-seed on reconnect.
            FleetClaim::Unavailable => WebhookClaim::Won(progress),
        }
    }
}

impl SessionStore for FleetStore {
    fn deny_session(&self, sid: &str) {
        self.local.deny_session(sid);
        self.fleet
            .publish(FleetEventKind::SessionRevoked, sid, String::new());
    }

    fn deny_user_before(&self, user_id: &str, at_ms: u64) {
        self.local.deny_user_before(user_id, at_ms);
        self.fleet
            .publish(FleetEventKind::UserRevoked, user_id, at_ms.to_string());
    }

    fn check(&self, session: &SessionRef<'_>) -> Result<(), Denied> {
        self.local.check(session)
    }

    fn set_status(&self, sid: &str, status: SessionStatus) {
        self.local.set_status(sid, status);
        self.fleet.publish(
            FleetEventKind::SessionStatus,
            sid,
            status.as_str().to_owned(),
        );
    }

    fn status(&self, sid: &str) -> Option<SessionStatus> {
        self.local.status(sid)
    }

    fn denied_sessions(&self) -> u64 {
        self.local.denied_sessions()
    }

    fn open_streams(&self) -> &Arc<OpenStreams> {
        self.local.open_streams()
    }

    fn changed(&self, what: Changed<'_>) {
        match what {
            Changed::User(id) => self
                .fleet
                .publish(FleetEventKind::UserChanged, id, String::new()),
            Changed::Session(id) => {
                self.fleet
                    .publish(FleetEventKind::SessionChanged, id, String::new())
            }
        }
    }
}

impl WebhookLedger for FleetStore {
    fn claim<'a>(&'a self, id: &'a str, wait: Duration) -> ClaimFuture<'a> {
        Box::pin(self.claim_both(id, wait))
    }

    fn release(&self, id: &str, progress: WebhookProgress) {
        // Before the local release: a waiter it wakes may win the id and claim it fleet-wide.
        let held_in_fleet = self.fleet_claims().remove(id);
        self.ledger.release(id, progress);
        if held_in_fleet {
            let (fleet, id) = (self.fleet.clone(), id.to_owned());
            tokio::spawn(async move { fleet.release_webhook(&id, progress).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let url = RedisUrl("rediss://app:s3cret@redis.example:6380/0".into());
        assert_eq!(url.redacted(), "rediss://app:REDACTED@redis.example:6380/0");
        assert!(!format!("{url:?}").contains("s3cret"));
        let plain = RedisUrl("redis://127.0.0.1:6379/0".into());
        assert_eq!(plain.redacted(), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = |url: &str| Config {
            redis_url: RedisUrl(url.into()),
            ..Config::default()
        };
        for url in ["http://redis:6379", "not a url", "redis://"] {
            assert_eq!(
                bad(url).validate().unwrap_err().key,
                "fleet.redis_url",
                "{url}"
            );
        }
        assert!(bad("redis://127.0.0.1:6379/0").validate().is_ok());
        assert!(Config::default().validate().is_ok(), "off by default");
        let c = Config {
            connect_timeout_ms: 0,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "fleet.connect_timeout_ms");
    }

    #[test]
    fn kind_codes_round_trip() {
        for kind in FleetEventKind::ALL {
            assert_eq!(kind_of(kind_code(*kind)), Some(*kind));
        }
    }
}
