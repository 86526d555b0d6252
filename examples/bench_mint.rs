//! Token material for the load benchmark (`bench/run.py`), and the "one core doing only the RSA
//! verify" baseline it compares cold verification with.
//!
//! ```sh
//! cargo build --release --example bench_mint
//! # one fresh RSA-2048 key; everything signed with it goes to DIR
//! target/release/examples/bench_mint mint --out DIR --issuer https://clerk.bench.example \
//!     --azp https://app.bench.example --count 100000 --invalid 10000 --ttl 2592000
//! # RS256 verifications per second on one thread, same key, same tokens, same primitive
//! taskset -c 1 target/release/examples/bench_mint verify-bench --dir DIR --seconds 3
//! ```
//!
//! `mint` writes:
//! - `public.pem`: the SPKI public key (clerkgate's `clerk.jwt_key`, the SDK's `jwtKey`);
//! - `jwks.json`: the same key as a JWKS (Envoy's `local_jwks`);
//! - `token.txt`: one valid token (the "one repeated token" and cookie scenarios);
//! - `tokens.txt`: `--count` distinct valid tokens, one per line (each its own `sub`, `sid`,
//!   `jti`); the first 10k rotate in the distinct-token scenarios, all of them fill the cache for
//!   the RSS check;
//! - `invalid.txt`: `--invalid` distinct tokens, each a valid token with one bit flipped inside
//!   its signature, so only the signature check can refuse them;
//! - `meta.json`: issuer, azp, kid, the single token's `iat` (its `__client_uat`), expiry.
//!
//! `verify-bench` loads `public.pem` with clerkgate's own PEM loader and parses the first 10k
//! tokens with clerkgate's own parser up front, then calls only `ParsedPublicKey::verify_sig`
//! (aws-lc-rs RSASSA-PKCS1-v1_5 SHA-256, what clerkgate's verifier calls, and what the criterion
//! bench `rsa_verify_baseline` measures) round-robin over them for `--seconds`, on the calling
//! thread. It prints one JSON line: `{"verifies":N,"seconds":S,"verifies_per_second":R}`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use clerkgate::auth::jwks::Key;
use clerkgate::auth::token;
use clerkgate::dev::signing::{SigningKey, jwks_json, session_claims};

const KID: &str = "ins_2benchClerkgateLoadTest0";
/// How many distinct tokens the verify baseline cycles through (the rotating scenario's count).
const VERIFY_POOL: usize = 10_000;

fn usage() -> ! {
    eprintln!(
        "usage:\n  bench_mint mint --out DIR --issuer URL --azp ORIGIN [--count N] [--invalid N] \
         [--ttl SECONDS]\n  bench_mint verify-bench --dir DIR [--seconds S]"
    );
    std::process::exit(64)
}

/// `--name value` pairs after the subcommand.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn number(args: &[String], name: &str, default: u64) -> u64 {
    flag(args, name).map_or(default, |v| v.parse().unwrap_or_else(|_| usage()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mint") => mint(&args[1..]),
        Some("verify-bench") => verify_bench(&args[1..]),
        _ => usage(),
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn claims(issuer: &str, azp: &str, sub: &str, now: u64, ttl: u64) -> Value {
    let mut c = session_claims(issuer, sub, now, ttl);
    c["azp"] = json!(azp);
    c
}

/// The same token with one bit flipped in the middle of its signature (not in the last base64
/// character, whose low bits may be padding).
fn break_signature(token: &str) -> String {
    let (input, signature) = token.rsplit_once('.').expect("compact JWT");
    let mut raw = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("base64url signature");
    let middle = raw.len() / 2;
    raw[middle] ^= 0x01;
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
}

fn write(dir: &Path, name: &str, contents: &str) {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn mint(args: &[String]) {
    let out = PathBuf::from(flag(args, "--out").unwrap_or_else(|| usage()));
    let issuer = flag(args, "--issuer").unwrap_or_else(|| usage());
    let azp = flag(args, "--azp").unwrap_or_else(|| usage());
    let count = usize::try_from(number(args, "--count", 10_000)).unwrap_or_else(|_| usage());
    let invalid = usize::try_from(number(args, "--invalid", 10_000)).unwrap_or_else(|_| usage());
    let ttl = number(args, "--ttl", 30 * 24 * 3600);
    fs::create_dir_all(&out).expect("create the output directory");

    let started = Instant::now();
    let key = SigningKey::generate(KID).expect("RSA key generation");
    let now = now_s();

    let single = key.mint(&claims(&issuer, &azp, "user_bench_single", now, ttl));

    // RSA-2048 signing is the slow part (~1 ms each): spread it over every core.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = count.div_ceil(threads).max(1);
    let mut tokens: Vec<String> = Vec::with_capacity(count);
    std::thread::scope(|scope| {
        let key = &key;
        let (issuer, azp) = (&issuer, &azp);
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(count);
                scope.spawn(move || {
                    (start..end)
                        .map(|i| {
                            key.mint(&claims(issuer, azp, &format!("user_bench{i:06}"), now, ttl))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            tokens.extend(handle.join().expect("minting thread"));
        }
    });
    let broken: Vec<String> = tokens
        .iter()
        .cycle()
        .take(invalid)
        .map(|t| break_signature(t))
        .collect();

    write(&out, "public.pem", &key.public_key_pem());
    write(&out, "jwks.json", &jwks_json([&key]));
    write(&out, "token.txt", &format!("{single}\n"));
    write(&out, "tokens.txt", &(tokens.join("\n") + "\n"));
    write(&out, "invalid.txt", &(broken.join("\n") + "\n"));
    let meta = json!({
        "issuer": issuer,
        "azp": azp,
        "kid": KID,
        "iat": now,
        "exp": now + ttl,
        "count": tokens.len(),
        "invalid": broken.len(),
        "client_uat": now,
    });
    write(&out, "meta.json", &format!("{meta:#}\n"));
    println!(
        "minted {} valid + {} invalid tokens into {} in {:.1}s",
        tokens.len() + 1,
        broken.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
}

fn verify_bench(args: &[String]) {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or_else(|| usage()));
    let seconds: f64 =
        flag(args, "--seconds").map_or(3.0, |v| v.parse().unwrap_or_else(|_| usage()));
    let pem = fs::read_to_string(dir.join("public.pem")).expect("read public.pem");
    let key = Key::from_pem(&pem).expect("public.pem is an RSA public key");
    let text = fs::read_to_string(dir.join("tokens.txt")).expect("read tokens.txt");
    let pool: Vec<(Vec<u8>, Vec<u8>)> = text
        .lines()
        .take(VERIFY_POOL)
        .map(|t| {
            let parsed = token::parse(t).expect("minted token parses");
            (
                parsed.signing_input().as_bytes().to_vec(),
                parsed.signature.clone(),
            )
        })
        .collect();
    assert!(!pool.is_empty(), "tokens.txt is empty");

    // Round-robin over the whole pool, so the loop does not replay one input from L1.
    let measure = |budget: Duration| {
        let started = Instant::now();
        let mut done: u64 = 0;
        let mut index = 0usize;
        while started.elapsed() < budget {
            for _ in 0..256 {
                let (input, signature) = &pool[index];
                key.public
                    .verify_sig(std::hint::black_box(input), std::hint::black_box(signature))
                    .expect("minted tokens verify");
                index = (index + 1) % pool.len();
            }
            done += 256;
        }
        (done, started.elapsed().as_secs_f64())
    };
    // A short warm-up (caches, CPU frequency), then the measurement.
    let _ = measure(Duration::from_millis(300));
    let (done, elapsed) = measure(Duration::from_secs_f64(seconds));
    println!(
        "{}",
        json!({
            "verifies": done,
            "seconds": elapsed,
            "verifies_per_second": done as f64 / elapsed,
        })
    );
}
