//! Property tests (proptest) for the hardening issue: what the upstream receives, over real
//! sockets, for generated requests and tokens; and pure properties of path normalisation and
//! header stripping. The fuzz targets in `fuzz/` check the same functions with coverage
//! guidance; these run on stable in `cargo test` with a bounded number of cases.
//!
//! - [`requests`]: no client header under a reserved name reaches the upstream; a token that
//!   verification rejects reaches nothing (one clerkgate per property, on a shared runtime).
//! - [`pure`]: normalisation is idempotent and route matching agrees across spellings of a
//!   path; `strip_reserved` leaves nothing reserved and nothing else changed.
//! - [`regressions`]: inputs the fuzzers found, replayed.

mod pure;
mod regressions;
mod requests;

use proptest::test_runner::Config;

/// A proptest configuration with `cases` cases and no failure files written into the source
/// tree (a failure prints its minimal input; it then becomes a test in [`regressions`]).
pub fn cases(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// `base` with each letter's case and each `-` chosen by `flips`.
pub fn spell(base: &str, flips: &[(bool, bool)]) -> String {
    base.chars()
        .zip(flips.iter().chain(std::iter::repeat(&(false, false))))
        .map(|(c, (upper, underscore))| match c {
            '-' if *underscore => '_',
            c if *upper => c.to_ascii_uppercase(),
            c => c,
        })
        .collect()
}
