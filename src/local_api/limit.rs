//! A fixed-window limit per key: Clerk allows 10 `PATCH /v1/users/{id}` (and metadata) calls per
//! 10 s per user (clerk-protocol.md section 3), and one chatty caller should hear it from
//! clerkgate, not spend the shared instance budget on 429s.
//!
//! The windows live in a bounded cache; under memory pressure a user's window may be evicted
//! early, which only makes the limit more permissive (Clerk's own 429 still arrives and is
//! passed on).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// One key's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: Instant,
    used: u32,
}

impl Window {
    /// Takes one call at `now`, or says how long until the window reopens.
    fn take(&mut self, now: Instant, limit: u32, length: Duration) -> Result<(), Duration> {
        if now.saturating_duration_since(self.start) >= length {
            *self = Window {
                start: now,
                used: 0,
            };
        }
        if self.used >= limit {
            return Err((self.start + length).saturating_duration_since(now));
        }
        self.used += 1;
        Ok(())
    }
}

/// `limit` calls per `length` for each key.
pub(crate) struct PerKey {
    limit: u32,
    length: Duration,
    windows: moka::sync::Cache<String, Arc<Mutex<Window>>>,
}

impl PerKey {
    pub(crate) fn new(limit: u32, length: Duration, max_keys: u64) -> Self {
        Self {
            limit,
            length,
            windows: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                // Always admit a new key: under TinyLFU a full map would refuse it, and every
                // call would then start a fresh, never-exhausted window.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(length)
                .build(),
        }
    }

    /// Takes one call for `key` at `now`; `Err` carries whole seconds to wait (at least 1).
    pub(crate) fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        let window = self.windows.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Window {
                start: now,
                used: 0,
            }))
        });
        let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
        w.take(now, self.limit, self.length)
            .map_err(|left| (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_allows_its_limit_then_reopens() {
        let t0 = Instant::now();
        let ten = Duration::from_secs(10);
        let mut w = Window { start: t0, used: 0 };
        for _ in 0..3 {
            assert_eq!(w.take(t0, 3, ten), Ok(()));
        }
        assert_eq!(
            w.take(t0 + Duration::from_secs(4), 3, ten),
            Err(Duration::from_secs(6))
        );
        assert_eq!(w.take(t0 + ten, 3, ten), Ok(()), "a new window");
        assert_eq!(w.used, 1);
    }

    #[test]
    fn keys_are_limited_independently() {
        let limits = PerKey::new(2, Duration::from_secs(10), 100);
        let now = Instant::now();
        assert_eq!(limits.take("user_1", now), Ok(()));
        assert_eq!(limits.take("user_1", now), Ok(()));
        assert_eq!(limits.take("user_1", now), Err(10));
        assert_eq!(limits.take("user_2", now), Ok(()));
        assert_eq!(
            limits.take("user_1", now + Duration::from_millis(9_500)),
            Err(1),
            "rounded up, never 0"
        );
    }
}
