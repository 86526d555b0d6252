//! The local API's copies of Clerk users and sessions: bounded, with a TTL, concurrent misses for
//! one id coalesced into one Backend API call, and invalidation that cannot lose a race.
//!
//! The race: a read starts fetching user U, a `PATCH` of U completes and invalidates, then the
//! read's (pre-`PATCH`) answer arrives and is stored. Deleting the entry cannot prevent that, and
//! a read arriving after the `PATCH` would even join the stale fetch. So every id maps to one of
//! [`STRIPES`] epoch counters and the epoch is part of the cache key: invalidating bumps the epoch,
//! and every later read uses a new key that neither the stale entry nor the stale fetch can
//! answer. The cost is that an invalidation also drops the other ids of its stripe (1 in
//! [`STRIPES`]), and orphaned entries occupy capacity until their TTL or eviction.
//!
//! An entry is Clerk's answer for one id in one `Clerk-API-Version` (the version is part of the
//! key: another version may answer another shape), and is either the object (a 2xx) or Clerk's
//! 404 for it. A 404 lives only `missing_ttl`, so a burst of reads of a deleted or not yet
//! created user costs one Backend API call, and a `user.created` webhook or a write invalidates
//! it like any other entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::revocations::{ChangeListener, Changed};

/// Epoch counters per cache (8 KiB each).
pub(crate) const STRIPES: usize = 1024;

/// One cached answer of Clerk's: a 2xx object, or a 404 (kept for the missing TTL only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cached {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Entries live the cache's TTL, 404s only `missing`.
struct Lifetimes {
    missing: Duration,
}

impl moka::Expiry<(String, u64), Cached> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &(String, u64),
        value: &Cached,
        _created_at: Instant,
    ) -> Option<Duration> {
        // `None` leaves the entry to the cache-wide `time_to_live`.
        (value.status == StatusCode::NOT_FOUND).then_some(self.missing)
    }
}

/// Clerk's answers for one kind of Clerk object, by id and API version.
pub(crate) struct ObjectCache {
    entries: moka::future::Cache<(String, u64), Cached>,
    epochs: Box<[AtomicU64]>,
}

/// FNV-1a: cheap, and stable across runs (unlike `DefaultHasher`'s random keys it needs none).
fn stripe(id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % STRIPES as u64) as usize
}

impl ObjectCache {
    /// Entries live `ttl`; 404 entries (see [`Cached`]) at most `missing_ttl`.
    pub(crate) fn new(capacity: u64, ttl: Duration, missing_ttl: Duration) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .expire_after(Lifetimes {
                    missing: missing_ttl,
                })
                .build(),
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The cached answer for `id` in API `version`, or the result of `fetch`, which runs at
    /// most once for any number of concurrent callers (they all get its result). Errors are
    /// returned to every waiter and not cached. The flag is `true` when this call ran `fetch`.
    pub(crate) async fn get_or_fetch<F, E>(
        &self,
        id: &str,
        version: &str,
        fetch: F,
    ) -> Result<(Cached, bool), Arc<E>>
    where
        F: Future<Output = Result<Cached, E>>,
        E: Send + Sync + 'static,
    {
        let epoch = self.epochs[stripe(id)].load(Ordering::Acquire);
        let mut key = String::with_capacity(version.len() + 1 + id.len());
        key.push_str(version);
        key.push(' ');
        key.push_str(id);
        let entry = self
            .entries
            .entry((key, epoch))
            .or_try_insert_with(fetch)
            .await?;
        let fetched = entry.is_fresh();
        Ok((entry.into_value(), fetched))
    }

    /// Makes every later read of `id` (in every API version) go to Clerk, including reads that
    /// would otherwise have joined a fetch already in flight.
    pub(crate) fn invalidate(&self, id: &str) {
        self.epochs[stripe(id)].fetch_add(1, Ordering::AcqRel);
    }
}

/// The user and session caches, told about webhook-reported changes through the session guard.
pub(crate) struct Caches {
    pub users: ObjectCache,
    pub sessions: ObjectCache,
}

impl ChangeListener for Caches {
    fn changed(&self, what: Changed<'_>) {
        match what {
            Changed::User(id) => self.users.invalidate(id),
            Changed::Session(id) => self.sessions.invalidate(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache() -> ObjectCache {
        ObjectCache::new(100, Duration::from_secs(60), Duration::from_secs(60))
    }

    fn ok(body: &'static str) -> Cached {
        Cached {
            status: StatusCode::OK,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    async fn get_in(
        c: &ObjectCache,
        id: &str,
        version: &str,
        calls: &AtomicUsize,
        answer: Cached,
    ) -> Cached {
        c.get_or_fetch(id, version, async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(answer)
        })
        .await
        .unwrap()
        .0
    }

    async fn get(c: &ObjectCache, id: &str, calls: &AtomicUsize, body: &'static str) -> Bytes {
        get_in(c, id, "v", calls, ok(body)).await.body
    }

    #[tokio::test]
    async fn hits_misses_and_invalidation() {
        let c = cache();
        let calls = AtomicUsize::new(0);
        assert_eq!(get(&c, "user_1", &calls, "v1").await, "v1");
        assert_eq!(get(&c, "user_1", &calls, "v2").await, "v1", "a hit");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        c.invalidate("user_1");
        assert_eq!(get(&c, "user_1", &calls, "v2").await, "v2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn errors_are_shared_but_not_cached() {
        let c = cache();
        let err = c
            .get_or_fetch("user_1", "v", async { Err::<Cached, _>("down") })
            .await
            .unwrap_err();
        assert_eq!(*err, "down");
        let calls = AtomicUsize::new(0);
        assert_eq!(get(&c, "user_1", &calls, "up").await, "up");
    }

    #[tokio::test]
    async fn a_read_after_invalidation_does_not_join_a_stale_fetch() {
        let c = Arc::new(cache());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let stale = tokio::spawn({
            let c = c.clone();
            async move {
                c.get_or_fetch("user_1", "v", async move {
                    let _ = started_tx.send(());
                    let _ = released.await;
                    Ok::<_, ()>(ok("before"))
                })
                .await
                .unwrap()
            }
        });
        started.await.unwrap();
        // The write completes while the read is in flight.
        c.invalidate("user_1");
        let calls = AtomicUsize::new(0);
        assert_eq!(get(&c, "user_1", &calls, "after").await, "after");
        let _ = release.send(());
        assert_eq!(stale.await.unwrap(), (ok("before"), true));
        assert_eq!(get(&c, "user_1", &calls, "later").await, "after");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn versions_are_cached_apart_and_invalidated_together() {
        let c = cache();
        let calls = AtomicUsize::new(0);
        assert_eq!(
            get_in(&c, "user_1", "2025", &calls, ok("old")).await,
            ok("old")
        );
        assert_eq!(
            get_in(&c, "user_1", "2026", &calls, ok("new")).await,
            ok("new")
        );
        assert_eq!(
            get_in(&c, "user_1", "2025", &calls, ok("x")).await,
            ok("old")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        c.invalidate("user_1");
        assert_eq!(get_in(&c, "user_1", "2025", &calls, ok("a")).await, ok("a"));
        assert_eq!(get_in(&c, "user_1", "2026", &calls, ok("b")).await, ok("b"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_404_lives_only_the_missing_ttl() {
        let c = ObjectCache::new(100, Duration::from_secs(60), Duration::from_millis(300));
        let calls = AtomicUsize::new(0);
        let missing = Cached {
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(b"{}"),
        };
        assert_eq!(
            get_in(&c, "user_1", "v", &calls, missing.clone()).await,
            missing
        );
        assert_eq!(
            get_in(&c, "user_1", "v", &calls, ok("x")).await,
            missing,
            "a hit"
        );
        assert_eq!(
            get_in(&c, "user_2", "v", &calls, ok("found")).await,
            ok("found")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            get_in(&c, "user_1", "v", &calls, ok("now")).await,
            ok("now")
        );
        assert_eq!(
            get_in(&c, "user_2", "v", &calls, ok("y")).await,
            ok("found"),
            "still cached"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn stripes_spread_ids() {
        let used: std::collections::HashSet<usize> =
            (0..4096).map(|i| stripe(&format!("user_{i}"))).collect();
        assert!(used.len() > STRIPES / 2, "{}", used.len());
        assert_eq!(stripe("user_1"), stripe("user_1"));
    }
}
