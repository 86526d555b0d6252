//! The verified-token cache: a repeat token costs a SHA-256 and a lookup, not an RSA verify and a
//! JSON parse.
//!
//! Keyed by SHA-256 of the whole token (a collision would hand one token's identity to another,
//! so the hash must be collision resistant), bounded by `auth.token_cache_capacity`, each entry
//! expiring at its token's `exp` plus the clock skew. The caller still re-checks expiry on every
//! hit because eviction is lazy, and session deny-lists are consulted after the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::identity::Identity;

pub type CacheKey = [u8; 32];

struct ExpireAtTokenExp {
    skew_ms: u64,
}

impl moka::Expiry<CacheKey, Arc<Identity>> for ExpireAtTokenExp {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<Identity>,
        _: Instant,
    ) -> Option<Duration> {
        let until = value.exp_ms.saturating_add(self.skew_ms);
        Some(Duration::from_millis(until.saturating_sub(super::now_ms())))
    }
}

/// Verified identities by token hash.
pub struct TokenCache {
    inner: moka::sync::Cache<CacheKey, Arc<Identity>>,
}

impl TokenCache {
    pub fn new(capacity: u64, skew_ms: u64) -> Self {
        Self {
            inner: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(ExpireAtTokenExp { skew_ms })
                .build(),
        }
    }

    pub fn key(token: &str) -> CacheKey {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        key
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Identity>> {
        self.inner.get(key)
    }

    pub fn insert(&self, key: CacheKey, identity: Arc<Identity>) {
        self.inner.insert(key, identity);
    }

    pub fn invalidate(&self, key: &CacheKey) {
        self.inner.invalidate(key);
    }

    /// Entries currently held (approximate; moka counts lazily).
    pub fn len(&self) -> u64 {
        self.inner.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
