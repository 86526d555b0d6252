//! Benchmarks of the per-request token path. Each measured operation sits next to the bare
//! primitive it is built on, so clerkgate's own overhead reads as a ratio, not as a number that
//! only means something on the machine that produced it.
//!
//! - `rsa_verify_baseline`: aws-lc-rs RS256 `verify_sig` on one signing input, the primitive.
//! - `verify_cold`: `token::parse` + `Verifier::verify`, and `Authenticator::authenticate` on a
//!   guaranteed cache miss, over 1000 distinct tokens. Compare with `rsa_verify_baseline`.
//! - `verify_warm`: `authenticate` on a cache hit. Compare with `sha256_baseline`, the SHA-256
//!   of the same token that every request pays for its cache key.
//! - `header_rewrite`: strip reserved, hop-by-hop and token headers, set `X-Forwarded-*`, insert
//!   the identity; next to inserting the identity alone.
//! - `fpm_decode`: `clerk::claims::fpm_permissions` on clerk-protocol.md section 1.3 vectors.
//!
//! Short run: `cargo bench --bench verify -- --warm-up-time 1 --measurement-time 2`.
//! Under `cargo test --all-targets` criterion runs every benchmark once (test mode, a debug
//! build), so the shared fixture is built once, lazily, with token minting spread over the
//! cores: about 3 s there.

use std::hint::black_box;
use std::sync::{Arc, OnceLock};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{self, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use clerkgate::auth::cache::TokenCache;
use clerkgate::auth::identity::{HeadersConfig, Identity, IdentityBuilder};
use clerkgate::auth::jwks::{JwksSettings, Key, KeyStore};
use clerkgate::auth::token::{self, CookieNames};
use clerkgate::auth::verify::Verifier;
use clerkgate::auth::{self, Authenticator};
use clerkgate::clerk;
use clerkgate::dev::signing::{SigningKey, session_claims};
use clerkgate::proxy::headers;
use clerkgate::telemetry::Metrics;

const ISSUER: &str = "https://clerk.bench.example";
/// Distinct tokens the cold benchmarks rotate through. Large enough that the measured loop does
/// not replay one token's bytes from L1 every iteration.
const POOL: usize = 1000;
/// Tokens must outlive any benchmark run: an expired token would measure the rejection path.
const TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// The five-feature org vector of clerk-protocol.md section 1.3.
const FEA: &str = "o:billing,o:email,o:fraud,o:instance,o:staging_plans";
const PER: &str = "manage,read";
const FPM: &str = "3,3,3,3,1";

/// Everything the benchmarks share, built once on first use.
struct Fixture {
    /// The RS256 key of the tokens, as a JWK-derived verification key (pure-path benches).
    key: Key,
    /// `POOL` distinct tokens, each with its own `sub`, `sid` and `jti`.
    pool: Vec<String>,
    /// One more token, kept out of the pool so the cold benches never evict it from the cache.
    warm: String,
    /// A fixed "now" inside every token's validity window.
    now_ms: u64,
    /// Built as `app::App::build` builds it, from a pinned-PEM `[clerk]` section.
    auth: Authenticator,
    /// Current-thread: `authenticate` never waits on I/O with a PEM key, and a single thread keeps
    /// scheduler noise out of the numbers.
    rt: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

/// A typical v2 session with an active organization, so that building the identity decodes
/// `fpm` and sets the org headers as it would for most B2B traffic.
fn claims(i: usize, now_s: u64) -> Value {
    let mut c = session_claims(ISSUER, &format!("user_bench{i:06}"), now_s, TTL_SECONDS);
    c["fea"] = json!(FEA);
    c["o"] = json!({
        "id": "org_2benchAcmeInc",
        "slg": "acme",
        "rol": "admin",
        "per": PER,
        "fpm": FPM,
    });
    c
}

fn build_fixture() -> Fixture {
    let signing = SigningKey::generate("ins_bench").expect("RSA-2048 key generation");
    let now_ms = auth::now_ms();
    let now_s = now_ms / 1000;
    // RSA signing dominates set-up; split it over the cores so a test-mode run (debug build,
    // 1000 signatures) stays short.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let pool: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let signing = &signing;
                s.spawn(move || {
                    (t..POOL)
                        .step_by(threads)
                        .map(|i| (i, signing.mint(&claims(i, now_s))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut minted: Vec<(usize, String)> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect();
        minted.sort_by_key(|(i, _)| *i);
        minted.into_iter().map(|(_, t)| t).collect()
    });
    let warm = signing.mint(&claims(POOL, now_s));

    let cfg = clerk::Config {
        jwt_key: Some(signing.public_key_pem()),
        issuer: Some(ISSUER.into()),
        ..Default::default()
    };
    let instance = cfg.resolve().expect("bench [clerk] section resolves");
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(
        KeyStore::new(&instance, JwksSettings::from_config(&cfg), metrics.clone())
            .expect("PEM key store"),
    );
    let auth_cfg = auth::Config::default();
    let verifier = Verifier::new(
        instance.issuers.clone(),
        instance.authorized_parties.clone(),
        auth_cfg.allow_missing_azp,
        auth_cfg.clock_skew_ms,
        auth_cfg.pending_as_signed_out,
    );
    let auth = Authenticator::new(
        verifier,
        keys,
        TokenCache::new(auth_cfg.token_cache_capacity, auth_cfg.clock_skew_ms),
        IdentityBuilder::new(&HeadersConfig::default()),
        metrics,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let key = Key::from_jwk_value(&signing.jwk(), None).expect("JWK of the signing key");

    // A bench that silently measured a rejection would be worse than none.
    let first = token::parse(&pool[0]).expect("minted token parses");
    auth.verifier()
        .verify(first, &key, now_ms)
        .expect("minted token verifies against its JWK");
    let identity = rt
        .block_on(auth.authenticate(&warm, now_ms))
        .expect("warm token authenticates");
    assert!(identity.org().is_some(), "bench tokens carry an active org");

    Fixture {
        key,
        pool,
        warm,
        now_ms,
        auth,
        rt,
    }
}

/// Yields the pool's tokens in order, wrapping around.
fn rotating(pool: &'static [String]) -> impl FnMut() -> &'static str {
    let mut next = 0;
    move || {
        let t = pool[next].as_str();
        next = (next + 1) % pool.len();
        t
    }
}

fn rsa_verify_baseline(c: &mut Criterion) {
    let fx = fixture();
    let parsed = token::parse(&fx.pool[0]).expect("token parses");
    let input = parsed.signing_input().as_bytes();
    let signature = parsed.signature.as_slice();
    let mut g = c.benchmark_group("rsa_verify_baseline");
    g.bench_function("rs256_2048_verify_sig", |b| {
        b.iter(|| {
            fx.key
                .public
                .verify_sig(black_box(input), black_box(signature))
                .expect("valid signature")
        })
    });
    g.finish();
}

fn verify_cold(c: &mut Criterion) {
    let fx = fixture();
    let mut g = c.benchmark_group("verify_cold");
    g.bench_function("parse_and_verify", |b| {
        let mut next = rotating(&fx.pool);
        b.iter(|| {
            let parsed = token::parse(black_box(next())).expect("token parses");
            fx.auth
                .verifier()
                .verify(parsed, &fx.key, fx.now_ms)
                .expect("token verifies")
        })
    });
    g.bench_function("authenticate_cache_miss", |b| {
        let mut next = rotating(&fx.pool);
        // Each token's cache entry is dropped in the (untimed) set-up, so every timed call is a
        // miss: hash, lookup, parse, key lookup, verify, identity build and cache insert. A batch
        // is at most `POOL` consecutive tokens, so no token appears twice within one.
        b.to_async(&fx.rt).iter_batched(
            || {
                let t = next();
                fx.auth.cache().invalidate(&TokenCache::key(t));
                t
            },
            |t| async move {
                fx.auth
                    .authenticate(t, fx.now_ms)
                    .await
                    .expect("token authenticates")
            },
            BatchSize::NumIterations(POOL as u64),
        )
    });
    g.finish();
}

fn verify_warm(c: &mut Criterion) {
    let fx = fixture();
    let mut g = c.benchmark_group("verify_warm");
    g.bench_function("authenticate_cache_hit", |b| {
        b.to_async(&fx.rt).iter(|| async {
            fx.auth
                .authenticate(black_box(&fx.warm), fx.now_ms)
                .await
                .expect("cached token authenticates")
        })
    });
    g.finish();
}

fn sha256_baseline(c: &mut Criterion) {
    let fx = fixture();
    let mut g = c.benchmark_group("sha256_baseline");
    g.bench_function("token_digest", |b| {
        b.iter(|| {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, black_box(&fx.warm).as_bytes())
        })
    });
    g.finish();
}

/// A browser-like request carrying the token both as a bearer and as `__session`, plus a
/// spoofed identity header that must not survive.
fn typical_request(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut set = |name: header::HeaderName, value: &str| {
        h.append(
            name,
            HeaderValue::from_str(value).expect("valid header value"),
        );
    };
    set(header::HOST, "api.example.com");
    set(
        header::USER_AGENT,
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    );
    set(header::ACCEPT, "application/json, text/plain, */*");
    set(header::ACCEPT_ENCODING, "gzip, deflate, br, zstd");
    set(
        header::COOKIE,
        &format!("theme=dark; __session={token}; __client_uat=1732590000"),
    );
    set(header::AUTHORIZATION, &format!("Bearer {token}"));
    set(
        header::HeaderName::from_static("x-forwarded-for"),
        "203.0.113.7",
    );
    set(header::HeaderName::from_static("x-user-id"), "user_spoofed");
    h
}

/// What the proxy inserts: the cached identity headers plus the claims header, built from the
/// request's own token (`IdentityBuilder::claims_header`).
fn insert_identity(h: &mut HeaderMap, identity: &Identity, builder: &IdentityBuilder, token: &str) {
    identity.insert_headers(builder, h);
    if let Some((name, value)) = builder.claims_header(token) {
        h.insert(name, value);
    }
}

fn header_rewrite(c: &mut Criterion) {
    let fx = fixture();
    let identity: Arc<Identity> = fx
        .rt
        .block_on(fx.auth.authenticate(&fx.warm, fx.now_ms))
        .expect("warm token authenticates");
    let request = typical_request(&fx.warm);
    let reserved = fx.auth.builder().reserved();
    let cookies = CookieNames::new(None);
    // Formatted once per connection by the server (`ConnInfo::peer_ip`).
    let peer = HeaderValue::from_static("10.0.0.7");
    let host = request.get(header::HOST).cloned();

    let mut g = c.benchmark_group("header_rewrite");
    g.bench_function("identity_headers_only", |b| {
        b.iter_batched(
            || request.clone(),
            |mut h| {
                insert_identity(&mut h, &identity, fx.auth.builder(), &fx.warm);
                h
            },
            BatchSize::SmallInput,
        )
    });
    // The same order as the proxy path: strip what the client may not send, then set ours.
    g.bench_function("full_rewrite", |b| {
        b.iter_batched(
            || request.clone(),
            |mut h| {
                headers::strip_reserved(&mut h, reserved);
                headers::strip_hop_by_hop(&mut h, false);
                headers::strip_token(&mut h, &cookies);
                headers::set_forwarded(&mut h, &peer, false, host.clone(), false);
                insert_identity(&mut h, &identity, fx.auth.builder(), &fx.warm);
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn fpm_decode(c: &mut Criterion) {
    let per_54 = (0..54)
        .map(|i| format!("permission_{i}"))
        .collect::<Vec<_>>()
        .join(",");
    // The expected grants of section 1.3, so a regression cannot make the bench measure nothing.
    assert_eq!(clerk::claims::fpm_permissions(FEA, PER, FPM).len(), 9);
    assert_eq!(
        clerk::claims::fpm_permissions("o:feature", &per_54, "9007199254740995").len(),
        3
    );
    let mut g = c.benchmark_group("fpm_decode");
    g.bench_function("five_features", |b| {
        b.iter(|| clerk::claims::fpm_permissions(black_box(FEA), black_box(PER), black_box(FPM)))
    });
    g.bench_function("fifty_four_permissions", |b| {
        b.iter(|| {
            clerk::claims::fpm_permissions(
                black_box("o:feature"),
                black_box(&per_54),
                black_box("9007199254740995"),
            )
        })
    });
    g.finish();
}

/// The Svix check on a typical `session.ended` delivery, next to the bare HMAC-SHA256 over the
/// same signed bytes.
fn webhook_signature(c: &mut Criterion) {
    use clerkgate::webhook::signature::{self, Delivery, WebhookSecret};
    let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let body = serde_json::to_vec(&json!({
        "type": "session.ended", "object": "event", "timestamp": 1_716_883_200_000u64,
        "instance_id": "ins_2GIoQhbUpy0hX7B2cVkuTMinXoD",
        "data": {"id": "sess_2abc", "object": "session", "status": "ended", "user_id": "user_2abc",
                 "client_id": "client_2abc", "last_active_at": 1_716_883_200_000u64,
                 "expire_at": 1_717_488_000_000u64, "abandon_at": 1_719_475_200_000u64}
    }))
    .unwrap();
    let ts = 1_716_883_200i64;
    let sig = format!("v1,AAAA v1,BBBB {}", secret.sign("msg_2abc", ts, &body));
    let delivery = Delivery {
        id: "msg_2abc",
        timestamp: ts,
        signatures: &sig,
    };
    assert!(signature::verify(&delivery, &body, &secret, ts, 300).is_ok());
    let mut g = c.benchmark_group("webhook_signature");
    g.bench_function("verify_three_entries", |b| {
        b.iter(|| signature::verify(black_box(&delivery), black_box(&body), &secret, ts, 300))
    });
    g.finish();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"raw-key-bytes-of-24-byte");
    let mut signed = format!("msg_2abc.{ts}.").into_bytes();
    signed.extend_from_slice(&body);
    let mut g = c.benchmark_group("hmac_sha256_baseline");
    g.bench_function("signed_content", |b| {
        b.iter(|| aws_lc_rs::hmac::sign(&key, black_box(&signed)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Without gnuplot, criterion renders its charts with plotters, which on the 2-core dev box
    // took about 130 s of a 180 s short run. The numbers (terminal and
    // target/criterion/*/new/estimates.json) and baseline comparisons do not need the charts;
    // drop this line locally to get them.
    config = Criterion::default().without_plots();
    targets =
        rsa_verify_baseline,
        verify_cold,
        verify_warm,
        sha256_baseline,
        header_rewrite,
        fpm_decode,
        webhook_signature,
}
criterion_main!(benches);
