//! Bytes of heap per cached token, counted by the allocator rather than read off RSS.
//!
//! Builds identities of the load benchmark's token shape (`sub`, `sid`, no organization) with
//! the real `IdentityBuilder`, inserts them into the real `TokenCache`, and reports the heap
//! growth per entry as glibc counts it (`malloc_usable_size` plus the 8-byte chunk header), so
//! a change to `Identity` or the cache shows its cost in bytes without a load run.
//!
//! ```sh
//! cargo run --release --example cache_footprint [ENTRIES]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use clerkgate::auth::cache::TokenCache;
use clerkgate::auth::identity::{HeadersConfig, IdentityBuilder};
use clerkgate::auth::verify::VerifiedClaims;
use serde_json::json;

unsafe extern "C" {
    fn malloc_usable_size(ptr: *mut u8) -> usize;
}

struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);

fn chunk(ptr: *mut u8) -> usize {
    // SAFETY: `ptr` came from the system allocator and is still live.
    unsafe { malloc_usable_size(ptr) + 8 }
}

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(chunk(p), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(chunk(ptr), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let entries: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let builder = IdentityBuilder::new(&HeadersConfig::default()).keep_claims(false);
    let exp_ms = clerkgate::auth::now_ms() + 3_600_000;
    let cache = TokenCache::new(u64::from(entries), 5_000);
    let before = IN_USE.load(Ordering::Relaxed);
    for n in 0..entries {
        let sub = format!("user_bench_{n:06}");
        let sid = format!("sess_{n:024}");
        let payload = json!({"sub": sub, "sid": sid, "v": 2});
        let claims = VerifiedClaims {
            payload: payload.as_object().cloned().unwrap_or_default(),
            sub,
            sid: Some(sid),
            iat: None,
            exp_ms,
        };
        let identity = Arc::new(builder.build(claims));
        let key = TokenCache::key(&format!("token-{n}"));
        cache.insert(key, identity.clone());
        // The proxy slices the value blob on the first hit: count that allocation too.
        let mut headers = http::HeaderMap::new();
        identity.insert_headers(&builder, &mut headers);
    }
    let after = IN_USE.load(Ordering::Relaxed);
    println!(
        "{entries} entries, {} held: {} bytes of heap per cached token (identity, value blob, slot, table)",
        cache.len(),
        (after - before) / entries as usize
    );
}
