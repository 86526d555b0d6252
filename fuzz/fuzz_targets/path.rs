//! `clerkgate::proxy::path::normalize` on arbitrary request paths, under both encoded-slash
//! policies.
//!
//! Checks for every path that normalises: the forwarded (`upstream`) form is a fixed point
//! (normalising it again, under either policy, gives the same `upstream` and `matching`), has
//! no `//`, no `.`/`..` segment (raw, percent-decoded, or before `;params`), is ASCII; the
//! `matching` form has no `//`, `;`, `\`, control character or dot segment; both forms have
//! the same number of segments; and a path accepted under `reject` normalises identically
//! under `decode` (the policies only differ on encoded slashes). (Route matching is a function
//! of `matching`, so a fixed point also means the same route.)
#![no_main]

use clerkgate::proxy::path::{EncodedSlashes, NormalizedPath, normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let reject = normalize(&raw, EncodedSlashes::Reject);
    let decode = normalize(&raw, EncodedSlashes::Decode);
    if let Ok(p) = &reject {
        let d = decode
            .as_ref()
            .expect("accepted under reject, refused under decode");
        assert_eq!(p.upstream, d.upstream, "{raw:?}: the policies disagree");
        assert_eq!(p.matching, d.matching, "{raw:?}: the policies disagree");
    }
    for p in [reject, decode].iter().flatten() {
        check(&raw, p);
    }
});

fn check(raw: &str, p: &NormalizedPath<'_>) {
    let (u, m): (&str, &str) = (&p.upstream, &p.matching);
    assert!(
        u.starts_with('/') && m.starts_with('/'),
        "{raw:?} -> {u:?} / {m:?}"
    );
    assert!(
        !u.contains("//") && !m.contains("//"),
        "{raw:?} -> {u:?} / {m:?}"
    );
    assert!(u.is_ascii() && !u.contains('\\'), "{raw:?} -> {u:?}");
    assert!(!m.contains(';') && !m.contains('\\'), "{raw:?} -> {m:?}");
    assert!(
        !m.bytes().any(|b| b < 0x20 || b == 0x7f),
        "{raw:?} -> {m:?}"
    );
    for segment in u.split('/') {
        let name = segment.split(';').next().unwrap_or("");
        let decoded = percent_decode(name);
        for form in [segment, name, decoded.as_str()] {
            assert!(
                form != "." && form != "..",
                "{raw:?} -> {u:?}: dot segment {segment:?}"
            );
        }
    }
    assert!(
        !m.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} -> {m:?}"
    );
    assert_eq!(
        u.matches('/').count(),
        m.matches('/').count(),
        "{raw:?}: {u:?} and {m:?} differ in segment count"
    );
    for policy in [EncodedSlashes::Reject, EncodedSlashes::Decode] {
        let again = normalize(u, policy)
            .unwrap_or_else(|e| panic!("{raw:?}: forwarded {u:?} does not renormalise: {e:?}"));
        assert_eq!(
            again.upstream, u,
            "{raw:?}: forwarded form is not a fixed point"
        );
        assert_eq!(
            again.matching, m,
            "{raw:?}: renormalised matching form differs"
        );
    }
}

/// Percent-decodes what decodes; invalid escapes are left as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}
