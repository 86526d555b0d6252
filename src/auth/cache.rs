//! The verified-token cache: a repeat token costs a SHA-256 and a lookup, not an RSA verify and a
//! JSON parse.
//!
//! Keyed by SHA-256 of the whole token (a collision would hand one token's identity to another,
//! so the hash must be collision resistant, and the whole digest is compared), bounded by
//! `auth.token_cache_capacity`. An entry lives until its token's `exp` plus the clock skew; the
//! caller re-checks that on every hit, and expired entries are the first to be reused.
//!
//! Built for memory and for the hit path rather than taken from a general-purpose cache: 100k
//! cached tokens should cost a few MiB beyond the identities themselves. The cache is split into
//! shards by digest byte, each a `Mutex` held for one table probe. A shard is a slab of slots
//! (digest, identity, deadline, reference bit) plus a hash table of slot indices (4 bytes
//! each), hashed by the digest's first eight bytes, which SHA-256 has already made uniform.
//! Shards draw new slots from one cache-wide budget, so a shard that gets more than its share
//! of tokens does not evict while the cache has room. Once the budget is spent, the shard a
//! new token lands in evicts one of its own entries with CLOCK (second chance): an expired
//! slot, or the first slot not hit since the hand last passed it, approximating
//! least-recently-used without reordering anything on a hit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;

use super::identity::Identity;

pub type CacheKey = [u8; 32];

/// At most this many shards; fewer for small capacities so that every shard holds some.
const MAX_SHARDS: usize = 64;
/// Entries per shard below which fewer shards are used.
const MIN_PER_SHARD: u64 = 256;

struct Slot {
    key: CacheKey,
    identity: Option<Arc<Identity>>,
    /// `exp` plus skew in Unix milliseconds, with [`REFERENCED`] set when the slot was hit
    /// since the clock hand last passed (one word instead of two: 48 bytes a slot, not 56).
    until: u64,
}

const REFERENCED: u64 = 1 << 63;

impl Slot {
    fn until_ms(&self) -> u64 {
        self.until & !REFERENCED
    }

    fn referenced(&self) -> bool {
        self.until & REFERENCED != 0
    }
}

struct Shard {
    /// Slot indices, hashed by [`hash`] of the slot's key.
    table: HashTable<u32>,
    slots: Vec<Slot>,
    /// Emptied slots (invalidated), reused before the clock runs.
    free: Vec<u32>,
    hand: usize,
    /// This shard's share of the capacity (the table is sized for it); a shard may hold more
    /// while the cache as a whole has room, see [`TokenCache::slots`].
    share: usize,
}

fn hash(key: &CacheKey) -> u64 {
    u64::from_le_bytes([
        key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
    ])
}

impl Shard {
    fn new(share: usize) -> Self {
        Self {
            // Sized for the share plus the usual spread of a uniform hash over the shards:
            // rehashing while traffic fills the cache is rare.
            table: HashTable::with_capacity(share + share / 8),
            // Reserved, not touched: pages count towards RSS only once slots are written, and
            // the slab never moves while it fills.
            slots: Vec::with_capacity(share),
            free: Vec::new(),
            hand: 0,
            share,
        }
    }

    fn find(&self, key: &CacheKey) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash(key), |&i| slots[i as usize].key == *key)
            .map(|&i| i as usize)
    }

    fn remove_from_table(&mut self, index: usize) {
        let key = self.slots[index].key;
        if let Ok(entry) = self.table.find_entry(hash(&key), |&i| i as usize == index) {
            entry.remove();
        }
    }

    /// A slot to fill: a free one, a new one while the cache-wide budget lasts, or the clock's
    /// victim. `None` only when the budget is spent and this shard has no slot at all.
    fn claim(&mut self, now_ms: u64, budget: &AtomicU64) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            return Some(i as usize);
        }
        let granted = budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if granted {
            if self.slots.len() == self.slots.capacity() {
                // Past the share (a fuller than average shard): a little at a time.
                self.slots.reserve_exact((self.share / 16).max(16));
            }
            self.slots.push(Slot {
                key: [0; 32],
                identity: None,
                until: 0,
            });
            return Some(self.slots.len() - 1);
        }
        if self.slots.is_empty() {
            return None;
        }
        // Two sweeps at most: the first clears every reference bit it passes.
        let len = self.slots.len();
        for _ in 0..2 * len {
            let i = self.hand;
            self.hand = (self.hand + 1) % len;
            let slot = &mut self.slots[i];
            if slot.until_ms() <= now_ms || !slot.referenced() {
                self.remove_from_table(i);
                return Some(i);
            }
            slot.until &= !REFERENCED;
        }
        // Unreachable (the first sweep cleared every bit), but stay total.
        let i = self.hand;
        self.remove_from_table(i);
        Some(i)
    }
}

/// Verified identities by token hash.
pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    /// Slots not yet allocated to any shard: `auth.token_cache_capacity` at start. A shard
    /// takes one per new slot and evicts only when none is left, so the bound is exact for the
    /// whole cache and a shard fuller than its share does not evict early.
    slots: AtomicU64,
    skew_ms: u64,
    /// Entries dropped before their token expired because the cache was full.
    evictions: Option<prometheus::IntCounter>,
}

impl TokenCache {
    /// `capacity` 0 disables caching.
    pub fn new(capacity: u64, skew_ms: u64) -> Self {
        let shards = (capacity / MIN_PER_SHARD).clamp(1, MAX_SHARDS as u64) as usize;
        let shards = if capacity == 0 {
            0
        } else {
            // A power of two, so the shard is a mask of one digest byte.
            1 << (usize::BITS - 1 - shards.leading_zeros())
        };
        let base = capacity.checked_div(shards as u64).unwrap_or(0);
        let extra = capacity.checked_rem(shards as u64).unwrap_or(0);
        Self {
            shards: (0..shards as u64)
                .map(|i| Mutex::new(Shard::new((base + u64::from(i < extra)) as usize)))
                .collect(),
            slots: AtomicU64::new(capacity),
            skew_ms,
            evictions: None,
        }
    }

    /// Counts entries evicted while their token was still valid (the capacity is too small
    /// for the tokens in use: each one costs a full verification when it comes back).
    pub fn with_eviction_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.evictions = Some(counter);
        self
    }

    pub fn key(token: &str) -> CacheKey {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        key
    }

    fn shard(&self, key: &CacheKey) -> Option<MutexGuard<'_, Shard>> {
        if self.shards.is_empty() {
            return None;
        }
        // The table hashes bytes 0..8; the shard comes from another byte.
        let shard = &self.shards[key[31] as usize & (self.shards.len() - 1)];
        // Nothing here panics while holding the lock; a poisoned shard is still consistent.
        Some(shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The identity cached for `key`, expired or not: the caller checks `exp`.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Identity>> {
        let mut shard = self.shard(key)?;
        let i = shard.find(key)?;
        let slot = &mut shard.slots[i];
        slot.until |= REFERENCED;
        slot.identity.clone()
    }

    pub fn insert(&self, key: CacheKey, identity: Arc<Identity>) {
        self.insert_at(key, identity, super::now_ms());
    }

    fn insert_at(&self, key: CacheKey, identity: Arc<Identity>, now_ms: u64) {
        // Capped below the reference bit (year 292 million; a token claiming more is simply
        // kept until evicted, and re-checked against its exp on every hit).
        let until_ms = identity
            .exp_ms
            .saturating_add(self.skew_ms)
            .min(!REFERENCED);
        if until_ms <= now_ms {
            return;
        }
        let Some(mut shard) = self.shard(&key) else {
            return;
        };
        let slot = Slot {
            key,
            identity: Some(identity),
            until: until_ms,
        };
        if let Some(i) = shard.find(&key) {
            shard.slots[i] = slot;
            return;
        }
        let Some(i) = shard.claim(now_ms, &self.slots) else {
            return;
        };
        let old = &shard.slots[i];
        if old.identity.is_some()
            && old.until_ms() > now_ms
            && let Some(evictions) = &self.evictions
        {
            evictions.inc();
        }
        // The evicted identity (if any) is dropped here, under the lock: a few frees.
        shard.slots[i] = slot;
        let Shard { table, slots, .. } = &mut *shard;
        table.insert_unique(hash(&key), i as u32, |&j| hash(&slots[j as usize].key));
    }

    pub fn invalidate(&self, key: &CacheKey) {
        let Some(mut shard) = self.shard(key) else {
            return;
        };
        if let Some(i) = shard.find(key) {
            shard.remove_from_table(i);
            shard.slots[i].identity = None;
            shard.slots[i].until = 0;
            shard.free.push(i as u32);
        }
    }

    /// Entries currently held.
    pub fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).table.len() as u64)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::IdentityParts;

    const NOW: u64 = 1_800_000_000_000;

    fn identity(user: &str, exp_ms: u64) -> Arc<Identity> {
        Arc::new(Identity::new(IdentityParts {
            user_id: user,
            exp_ms,
            ..IdentityParts::default()
        }))
    }

    fn key(n: u32) -> CacheKey {
        TokenCache::key(&format!("token-{n}"))
    }

    fn user(cache: &TokenCache, n: u32) -> Option<String> {
        cache.get(&key(n)).map(|i| i.user_id().to_owned())
    }

    #[test]
    fn hit_miss_and_invalidate() {
        let cache = TokenCache::new(100, 0);
        cache.insert_at(key(1), identity("user_1", NOW + 60_000), NOW);
        assert_eq!(user(&cache, 1).as_deref(), Some("user_1"));
        assert_eq!(user(&cache, 2), None);
        // Re-inserting the same token replaces, never duplicates.
        cache.insert_at(key(1), identity("user_1b", NOW + 60_000), NOW);
        assert_eq!(user(&cache, 1).as_deref(), Some("user_1b"));
        assert_eq!(cache.len(), 1);
        cache.invalidate(&key(1));
        assert_eq!(user(&cache, 1), None);
        assert!(cache.is_empty());
        // The freed slot is reused.
        cache.insert_at(key(3), identity("user_3", NOW + 60_000), NOW);
        assert_eq!(user(&cache, 3).as_deref(), Some("user_3"));
    }

    #[test]
    fn capacity_zero_caches_nothing_and_expired_tokens_are_not_cached() {
        let off = TokenCache::new(0, 0);
        off.insert_at(key(1), identity("user_1", NOW + 60_000), NOW);
        assert_eq!(user(&off, 1), None);
        let cache = TokenCache::new(10, 5_000);
        cache.insert_at(key(1), identity("user_1", NOW - 5_000), NOW);
        assert_eq!(user(&cache, 1), None, "exp + skew already passed");
        cache.insert_at(key(2), identity("user_2", NOW - 4_999), NOW);
        assert_eq!(
            user(&cache, 2).as_deref(),
            Some("user_2"),
            "within the skew"
        );
    }

    #[test]
    fn bounded_by_capacity_whatever_the_traffic() {
        for capacity in [1u64, 3, 255, 256, 1000, 20_000] {
            let cache = TokenCache::new(capacity, 0);
            let total = capacity as u32 * 3 + 7;
            for n in 0..total {
                cache.insert_at(key(n), identity("u", NOW + 60_000), NOW);
            }
            assert_eq!(cache.len(), capacity, "capacity {capacity}");
            // The newest token is always kept.
            assert!(user(&cache, total - 1).is_some(), "capacity {capacity}");
        }
    }

    #[test]
    fn a_cache_filled_to_capacity_evicts_nothing() {
        // Digests spread over the shards unevenly (binomially): a shard fuller than its share
        // must not evict while the cache as a whole has room.
        for capacity in [1_000u64, 20_000, 100_000] {
            let cache = TokenCache::new(capacity, 0);
            for n in 0..capacity as u32 {
                cache.insert_at(key(n), identity("u", NOW + 60_000), NOW);
            }
            let missing = (0..capacity as u32)
                .filter(|&n| cache.get(&key(n)).is_none())
                .count();
            assert_eq!(missing, 0, "capacity {capacity}");
            assert_eq!(cache.len(), capacity);
        }
    }

    #[test]
    fn entries_hit_recently_survive_eviction() {
        // One shard (capacity below MIN_PER_SHARD): the clock sees every entry.
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let cache = TokenCache::new(100, 0).with_eviction_counter(evictions.clone());
        for n in 0..100 {
            cache.insert_at(key(n), identity("u", NOW + 60_000), NOW);
        }
        for n in 0..10 {
            assert!(user(&cache, n).is_some());
        }
        // 50 newcomers: the 10 hit entries are passed over, unreferenced ones go.
        for n in 100..150 {
            cache.insert_at(key(n), identity("u", NOW + 60_000), NOW);
        }
        for n in 0..10 {
            assert!(user(&cache, n).is_some(), "hit entry {n} evicted");
        }
        let old_left = (10..100).filter(|&n| user(&cache, n).is_some()).count();
        assert_eq!(old_left, 40, "exactly the unreferenced ones were replaced");
        assert_eq!(evictions.get(), 50, "every live entry replaced is counted");
        assert_eq!(cache.len(), 100);
    }

    #[test]
    fn expired_entries_are_reused_before_live_ones() {
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let cache = TokenCache::new(10, 0).with_eviction_counter(evictions.clone());
        for n in 0..10 {
            // Tokens 0..5 expire at NOW + 1 s, the rest later; all are hit once.
            let exp = if n < 5 { NOW + 1_000 } else { NOW + 60_000 };
            cache.insert_at(key(n), identity("u", exp), NOW);
            assert!(user(&cache, n).is_some());
        }
        for n in 10..15 {
            cache.insert_at(key(n), identity("u", NOW + 60_000), NOW + 2_000);
        }
        for n in 0..5 {
            assert_eq!(user(&cache, n), None, "expired entry {n} kept");
        }
        assert_eq!(
            evictions.get(),
            0,
            "reusing expired entries is not an eviction"
        );
        for n in 5..15 {
            assert!(user(&cache, n).is_some(), "live entry {n} evicted");
        }
    }

    #[test]
    fn shards_split_the_capacity_exactly() {
        for capacity in [1u64, 255, 256, 513, 16_383, 16_384, 100_000, 1_000_003] {
            let cache = TokenCache::new(capacity, 0);
            let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().share).sum();
            assert_eq!(total as u64, capacity);
            assert!(cache.shards.len().is_power_of_two());
            assert!(cache.shards.len() <= MAX_SHARDS);
        }
    }
}
