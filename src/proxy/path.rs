//! Canonical request paths: the one path that route rules are matched against and that is
//! forwarded upstream.
//!
//! A proxy that matches rules against the raw path while the upstream resolves a normalised
//! one can be steered around its own rules: `/public/../admin`, `/public/%2e%2e/admin`,
//! `//admin`, `/public/..;/admin` (Tomcat drops `;params` and then resolves `..`) and
//! `/admin;x/secret` all name `/admin...` to some upstream while looking like something else to
//! a naive matcher. So [`normalize`] computes a single canonical path and returns it in two
//! spellings of the same resource:
//!
//! - `upstream`: a valid RFC 3986 path (section 3.3), with percent-encodings normalised as in
//!   section 6.2.2 (unreserved characters decoded, every other encoding kept with uppercase hex),
//!   dot segments removed as in section 5.2.4 and empty segments merged. `;params` are kept as
//!   sent, because upstreams (session ids, matrix parameters) may rely on them.
//! - `matching`: the same segments fully percent-decoded with `;params` dropped, which is what
//!   route patterns compare against.
//!
//! Both are derived from one segment list, so there is no spelling of a request for which the
//! proxy decides on one resource while the upstream receives a path to another. Anything this
//! module cannot canonicalise unambiguously is an error, and the caller rejects the request.

use std::borrow::Cow;

/// What to do with `%2F`, `%5C` and a raw `\` in a path.
///
/// Servers disagree about them: some treat `%2F` as data inside a segment, some decode it into
/// a separator, and several (IIS, Windows-backed file servers, some Java containers) treat `\`
/// as `/`. No single reading is safe for every upstream, so the default refuses the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    /// Fail with [`PathError::EncodedSlash`].
    Reject,
    /// Decode to `/` and treat as a separator in both forms; the upstream receives real
    /// slashes, so it cannot read the path differently from the matcher.
    Decode,
}

impl Default for EncodedSlashes {
    /// Fail closed: an operator has to opt in to accepting encoded separators.
    fn default() -> Self {
        Self::Reject
    }
}

/// Why a request path has no canonical form. The messages never echo the path, so they are
/// safe to show to clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum PathError {
    /// Empty, `*`, or absolute-form: not the origin-form of RFC 9112 section 3.2.1.
    #[error("request path does not start with '/'")]
    NotOriginForm,
    /// A `%` not followed by two hex digits (RFC 3986 section 2.1).
    #[error("request path has an invalid percent-encoding")]
    BadPercentEncoding,
    /// `%2F`, `%5C` or a raw `\` while the policy is [`EncodedSlashes::Reject`].
    #[error("request path contains an encoded slash or a backslash")]
    EncodedSlash,
    /// A C0 control character or DEL, raw or percent-encoded (`%00` truncates paths in C
    /// string handling; CR/LF enable header and log injection upstream).
    #[error("request path contains a control character")]
    ControlCharacter,
    /// The percent-decoded bytes are not UTF-8, so there is no string to match rules against.
    #[error("request path does not decode to UTF-8")]
    NonUtf8,
    /// A segment name ending in `.` or a space (`/admin./`, `/admin%20/`): Windows and IIS,
    /// and several Java and Python stacks, drop those and serve `/admin/`, while the route
    /// rules would see another name.
    #[error("request path has a segment ending in a dot or a space")]
    AmbiguousSegment,
}

impl PathError {
    /// Stable reason code for metrics labels and rejection bodies.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::NotOriginForm => "path-not-origin-form",
            Self::BadPercentEncoding => "path-bad-percent-encoding",
            Self::EncodedSlash => "path-encoded-slash",
            Self::ControlCharacter => "path-control-character",
            Self::NonUtf8 => "path-non-utf8",
            Self::AmbiguousSegment => "path-ambiguous-segment",
        }
    }
}

/// The canonical path. `upstream` is what is forwarded (valid URI path: unreserved chars
/// decoded, every other percent-encoding kept with uppercase hex, dot segments removed per
/// RFC 3986 5.2.4, empty segments merged, `;params` kept as sent). `matching` is the same path
/// fully percent-decoded with `;params` removed from every segment: it is what route patterns
/// compare against.
///
/// A field is `Cow::Borrowed` exactly when it equals the input, so the caller can skip
/// rebuilding the request URI when `upstream` is borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath<'a> {
    pub upstream: Cow<'a, str>,
    pub matching: Cow<'a, str>,
}

/// Canonicalise the path component of a request target (without the query).
///
/// Segment rules:
/// - a segment is a dot segment when its percent-decoded form, cut at the first `;` (raw or
///   decoded), is `.` or `..`; so `..;`, `%2e%2E` and `.;x` all count. `..` at the root stays at
///   the root.
/// - a segment whose name is empty (`//`, or `/;x/`) is dropped, params and all, so every
///   upstream sees the same number of segments as the matcher.
/// - a trailing slash is kept, including the one a final dot segment leaves (`/a/.` is `/a/`).
pub fn normalize(raw: &str, slashes: EncodedSlashes) -> Result<NormalizedPath<'_>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if is_canonical(bytes) {
        return Ok(NormalizedPath {
            upstream: Cow::Borrowed(raw),
            matching: Cow::Borrowed(raw),
        });
    }
    let (upstream, matching) = canonicalize(bytes, slashes)?;
    Ok(NormalizedPath {
        upstream: borrow_if_same(raw, upstream),
        matching: borrow_if_same(raw, matching),
    })
}

/// Characters that appear in a canonical path exactly as they are: RFC 3986 `pchar` (section
/// 3.3) without `%` and `;`, plus `/`. Anything else needs the slow path, either because it may
/// need rewriting (`%`, non-ASCII, space) or because it changes what a segment means (`;`).
const VERBATIM: [bool; 256] = byte_class(b"-._~!$&'()*+,=:@/");

/// RFC 3986 section 2.3: encodings of these are equivalent to the characters themselves, so
/// they are decoded in the upstream form (section 6.2.2.2).
const UNRESERVED: [bool; 256] = byte_class(b"-._~");

/// ASCII letters and digits plus `extra`.
const fn byte_class(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 128 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// One pass over the bytes deciding whether the path is already canonical. Runs on every
/// request, so it only classifies bytes and compares the (short) segment it just closed.
fn is_canonical(bytes: &[u8]) -> bool {
    // bytes[0] is the leading '/', checked by the caller.
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if b == b'/' {
            // An empty segment here is `//`; the last segment may be empty (trailing slash).
            if needs_slow_path(&bytes[segment_start..i]) {
                return false;
            }
            segment_start = i + 1;
        } else if !VERBATIM[usize::from(b)] {
            return false;
        }
    }
    let last = &bytes[segment_start..];
    last.is_empty() || !needs_slow_path(last)
}

/// Whether a closed segment (between slashes) needs the slow path: empty, a dot segment, or
/// a name ending in `.` (which is refused there unless it is a dot segment).
fn needs_slow_path(segment: &[u8]) -> bool {
    segment.is_empty() || segment.last() == Some(&b'.')
}

fn borrow_if_same(raw: &str, built: String) -> Cow<'_, str> {
    if built == raw {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(built)
    }
}

/// The slow path: decode, split and resolve the path, building both forms side by side.
fn canonicalize(bytes: &[u8], slashes: EncodedSlashes) -> Result<(String, String), PathError> {
    let mut out = Output::with_capacity(bytes.len());
    out.open_segment();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'/' => {
                out.close_segment(false)?;
                out.open_segment();
                i += 1;
            }
            b'\\' => {
                separator_allowed(slashes)?;
                out.close_segment(false)?;
                out.open_segment();
                i += 1;
            }
            b'%' => {
                let decoded = match (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) {
                    (Some(hi), Some(lo)) => (hi << 4) | lo,
                    _ => return Err(PathError::BadPercentEncoding),
                };
                i += 3;
                if decoded == b'/' || decoded == b'\\' {
                    separator_allowed(slashes)?;
                    out.close_segment(false)?;
                    out.open_segment();
                } else {
                    out.push_encoded(decoded)?;
                }
            }
            b => {
                out.push_raw(b)?;
                i += 1;
            }
        }
    }
    out.close_segment(true)?;
    out.finish()
}

fn separator_allowed(slashes: EncodedSlashes) -> Result<(), PathError> {
    match slashes {
        EncodedSlashes::Reject => Err(PathError::EncodedSlash),
        EncodedSlashes::Decode => Ok(()),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Both forms under construction. Each holds `/seg/seg...` with every kept segment prefixed by
/// `/` and no `/` inside a segment (decoded separators always split), so removing the last
/// segment for `..` is a truncation at the last `/` and the two forms stay in step.
struct Output {
    upstream: String,
    matching: Vec<u8>,
    /// Where the open segment (including its leading `/`) starts in each form.
    upstream_start: usize,
    matching_start: usize,
    /// Index in `matching` of the first `;` of the open segment: where its params begin.
    params_start: Option<usize>,
    trailing_slash: bool,
}

impl Output {
    fn with_capacity(len: usize) -> Self {
        Self {
            upstream: String::with_capacity(len),
            matching: Vec::with_capacity(len),
            upstream_start: 0,
            matching_start: 0,
            params_start: None,
            trailing_slash: false,
        }
    }

    fn open_segment(&mut self) {
        self.upstream_start = self.upstream.len();
        self.upstream.push('/');
        self.matching_start = self.matching.len();
        self.matching.push(b'/');
        self.params_start = None;
    }

    /// A byte that arrived unencoded.
    fn push_raw(&mut self, b: u8) -> Result<(), PathError> {
        self.push_matching(b)?;
        if VERBATIM[usize::from(b)] || b == b';' {
            self.upstream.push(char::from(b));
        } else {
            // Not allowed raw in a URI path (space, `"`, `?`, `#`, non-ASCII, ...). Encoding it
            // keeps its meaning as data and makes the forwarded target valid.
            self.push_percent(b);
        }
        Ok(())
    }

    /// A byte that arrived percent-encoded (other than a separator).
    fn push_encoded(&mut self, b: u8) -> Result<(), PathError> {
        self.push_matching(b)?;
        if UNRESERVED[usize::from(b)] {
            self.upstream.push(char::from(b));
        } else {
            // Reserved characters mean something different encoded (`%3B` is data, `;` starts
            // params), so they stay encoded; hex is uppercased (RFC 3986 section 6.2.2.1).
            self.push_percent(b);
        }
        Ok(())
    }

    fn push_matching(&mut self, b: u8) -> Result<(), PathError> {
        if is_control(b) {
            return Err(PathError::ControlCharacter);
        }
        // A decoded `%3B` also starts params here. Some upstreams decode before stripping
        // params, so `..%3B` must count as `..` and `admin%3Bx` must match as `admin`; for an
        // upstream that keeps `%3B` as data the matcher then sees a shorter name than the
        // resource, never a different one.
        if b == b';' && self.params_start.is_none() {
            self.params_start = Some(self.matching.len());
        }
        self.matching.push(b);
        Ok(())
    }

    fn push_percent(&mut self, b: u8) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        self.upstream.push('%');
        self.upstream.push(char::from(HEX[usize::from(b >> 4)]));
        self.upstream.push(char::from(HEX[usize::from(b & 0x0f)]));
    }

    /// Resolve the open segment against what came before it (RFC 3986 section 5.2.4).
    fn close_segment(&mut self, is_last: bool) -> Result<(), PathError> {
        let segment_end = self.matching.len();
        // The whole decoded segment, params included: params are forwarded, so they must not
        // smuggle undecodable bytes either.
        if std::str::from_utf8(&self.matching[self.matching_start + 1..segment_end]).is_err() {
            return Err(PathError::NonUtf8);
        }
        let name_end = self.params_start.unwrap_or(segment_end);
        match &self.matching[self.matching_start + 1..name_end] {
            b"" | b"." => self.drop_open_segment(),
            b".." => {
                self.drop_open_segment();
                // Removes the previous segment; at the root there is none and nothing happens.
                if let Some(at) = self.upstream.rfind('/') {
                    self.upstream.truncate(at);
                }
                if let Some(at) = self.matching.iter().rposition(|&b| b == b'/') {
                    self.matching.truncate(at);
                }
            }
            name if matches!(name.last(), Some(b'.' | b' ')) => {
                return Err(PathError::AmbiguousSegment);
            }
            _ => {
                // A real segment: both forms keep it, the matching form without its params.
                self.matching.truncate(name_end);
                return Ok(());
            }
        }
        // An empty or dot segment at the end leaves a directory: `/a/.` and `/a/b/..` are `/a/`.
        if is_last {
            self.trailing_slash = true;
        }
        Ok(())
    }

    fn drop_open_segment(&mut self) {
        self.upstream.truncate(self.upstream_start);
        self.matching.truncate(self.matching_start);
    }

    fn finish(mut self) -> Result<(String, String), PathError> {
        // Empty means every segment resolved away: the root. Otherwise a final empty or dot
        // segment left a directory, which keeps its trailing slash.
        if self.upstream.is_empty() || self.trailing_slash {
            self.upstream.push('/');
            self.matching.push(b'/');
        }
        // Every segment was validated in close_segment and `;` is ASCII, so this cannot fail;
        // mapping the error keeps the function free of panics regardless.
        let matching = String::from_utf8(self.matching).map_err(|_| PathError::NonUtf8)?;
        Ok((self.upstream, matching))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EncodedSlashes::{Decode, Reject};

    /// Expected outcome for one input: `(upstream, matching)` or an error.
    type Expected = Result<(&'static str, &'static str), PathError>;

    fn ok(upstream: &'static str, matching: &'static str) -> Expected {
        Ok((upstream, matching))
    }

    /// Both forms are `path`.
    fn same(path: &'static str) -> Expected {
        Ok((path, path))
    }

    /// Cases whose outcome does not depend on the encoded-slash policy.
    fn policy_independent_cases() -> Vec<(&'static str, Expected)> {
        vec![
            // Ordinary paths.
            ("/", same("/")),
            ("/a/b", same("/a/b")),
            ("/a/b/", same("/a/b/")),
            ("/a:b@c!$&'()*+,=/-._~", same("/a:b@c!$&'()*+,=/-._~")),
            ("/a/..b/.c/b.d", same("/a/..b/.c/b.d")),
            ("/caf%C3%A9", ok("/caf%C3%A9", "/café")),
            ("/caf%c3%a9", ok("/caf%C3%A9", "/café")),
            ("/café", ok("/caf%C3%A9", "/café")),
            ("/a%20b", ok("/a%20b", "/a b")),
            ("/a b", ok("/a%20b", "/a b")),
            ("/%41", ok("/A", "/A")),
            ("/%7e%2D%5F%2E%61%30", ok("/~-_.a0", "/~-_.a0")),
            ("/%21%40", ok("/%21%40", "/!@")),
            ("/a%3Fb%23c", ok("/a%3Fb%23c", "/a?b#c")),
            ("/a?b#c", ok("/a%3Fb%23c", "/a?b#c")),
            ("/a\"{}|", ok("/a%22%7B%7D%7C", "/a\"{}|")),
            ("/files/a%25b", ok("/files/a%25b", "/files/a%b")),
            // Double encoding is decoded once: `%252e%252e` is data, not a dot segment.
            (
                "/public/%252e%252e/admin",
                ok("/public/%252e%252e/admin", "/public/%2e%2e/admin"),
            ),
            // Dot segments (RFC 3986 section 5.2.4) and the root.
            ("/public/../admin", same("/admin")),
            ("/a/./b", same("/a/b")),
            ("/a/b/../../../c", same("/c")),
            ("/../admin", same("/admin")),
            ("/../../admin", same("/admin")),
            ("/..", same("/")),
            ("/.", same("/")),
            ("/./", same("/")),
            ("/a/..", same("/")),
            ("/a/.", same("/a/")),
            ("/a/b/..", same("/a/")),
            ("/a/b/../", same("/a/")),
            ("/a/./", same("/a/")),
            // Encoded dots.
            ("/public/%2e%2e/admin", same("/admin")),
            ("/public/%2E%2e/admin", same("/admin")),
            ("/public/.%2e/admin", same("/admin")),
            ("/public/%2e./admin", same("/admin")),
            ("/public/%2e/admin", same("/public/admin")),
            // Empty segments.
            ("//admin", same("/admin")),
            ("///admin//x//", same("/admin/x/")),
            ("//", same("/")),
            // Path parameters: kept upstream, dropped for matching, and stripped before the
            // dot-segment check (Tomcat resolves `/public/..;/admin` to `/admin`).
            ("/public/..;/admin", same("/admin")),
            ("/public/..;jsessionid=x/admin", same("/admin")),
            ("/public/%2e%2e;x/admin", same("/admin")),
            ("/public/.;x/y", same("/public/y")),
            ("/admin;x/secret", ok("/admin;x/secret", "/admin/secret")),
            ("/admin;/secret", ok("/admin;/secret", "/admin/secret")),
            ("/a;x;y=z/b;c", ok("/a;x;y=z/b;c", "/a/b")),
            ("/x;a=%41%2c", ok("/x;a=A%2C", "/x")),
            ("/;x/admin", same("/admin")),
            ("/a/;x", same("/a/")),
            // An encoded `;` also ends the name for matching but stays encoded upstream.
            ("/public/..%3B/admin", same("/admin")),
            ("/public/..%3bx/admin", same("/admin")),
            (
                "/admin%3Bx/secret",
                ok("/admin%3Bx/secret", "/admin/secret"),
            ),
            ("/a%3bb", ok("/a%3Bb", "/a")),
            // A name ending in a dot or a space is what Windows, IIS and several Java and
            // Python stacks trim: refused rather than matched as another name.
            ("/admin./secret", Err(PathError::AmbiguousSegment)),
            ("/admin%2e/secret", Err(PathError::AmbiguousSegment)),
            ("/admin%2E", Err(PathError::AmbiguousSegment)),
            ("/admin%20/secret", Err(PathError::AmbiguousSegment)),
            ("/admin /secret", Err(PathError::AmbiguousSegment)),
            ("/admin.%20/secret", Err(PathError::AmbiguousSegment)),
            ("/admin.;x/secret", Err(PathError::AmbiguousSegment)),
            ("/admin%20;x/secret", Err(PathError::AmbiguousSegment)),
            ("/a/.../b", Err(PathError::AmbiguousSegment)),
            ("/a/..%20/b", Err(PathError::AmbiguousSegment)),
            ("/public/x.", Err(PathError::AmbiguousSegment)),
            ("/%20", Err(PathError::AmbiguousSegment)),
            // Inside a name they are data.
            ("/a.b/c%20d", ok("/a.b/c%20d", "/a.b/c d")),
            // Bad percent-encoding.
            ("/%zz", Err(PathError::BadPercentEncoding)),
            ("/%4", Err(PathError::BadPercentEncoding)),
            ("/a%", Err(PathError::BadPercentEncoding)),
            ("/%4g", Err(PathError::BadPercentEncoding)),
            ("/%%41", Err(PathError::BadPercentEncoding)),
            ("/%+1", Err(PathError::BadPercentEncoding)),
            ("/%é", Err(PathError::BadPercentEncoding)),
            ("/a;%zz", Err(PathError::BadPercentEncoding)),
            // Control characters, decoded or raw.
            ("/%00", Err(PathError::ControlCharacter)),
            ("/a%00.html", Err(PathError::ControlCharacter)),
            ("/a%0d%0aX-Injected:1", Err(PathError::ControlCharacter)),
            ("/%1F", Err(PathError::ControlCharacter)),
            ("/%7f", Err(PathError::ControlCharacter)),
            ("/a\tb", Err(PathError::ControlCharacter)),
            ("/a\0b", Err(PathError::ControlCharacter)),
            ("/a\u{7f}", Err(PathError::ControlCharacter)),
            ("/a;x=%00", Err(PathError::ControlCharacter)),
            // Decoded bytes that are not UTF-8, including in params.
            ("/%C3", Err(PathError::NonUtf8)),
            ("/%FF", Err(PathError::NonUtf8)),
            ("/%C3%28", Err(PathError::NonUtf8)),
            ("/%C3A", Err(PathError::NonUtf8)),
            ("/%ED%A0%80", Err(PathError::NonUtf8)),
            ("/a;%FF", Err(PathError::NonUtf8)),
            ("/%FF/..", Err(PathError::NonUtf8)),
            // Not origin-form.
            ("", Err(PathError::NotOriginForm)),
            ("*", Err(PathError::NotOriginForm)),
            ("a/b", Err(PathError::NotOriginForm)),
            ("http://host/a", Err(PathError::NotOriginForm)),
            ("%2Fadmin", Err(PathError::NotOriginForm)),
            ("\\admin", Err(PathError::NotOriginForm)),
        ]
    }

    /// Cases involving `%2F`, `%5C` or `\`: `(input, under Reject, under Decode)`.
    fn slash_cases() -> Vec<(&'static str, Expected, Expected)> {
        let rejected = Err(PathError::EncodedSlash);
        vec![
            ("/a%2Fb", rejected, same("/a/b")),
            ("/a%2fb", rejected, same("/a/b")),
            ("/a%5Cb", rejected, same("/a/b")),
            ("/a%5cb", rejected, same("/a/b")),
            ("/a\\b", rejected, same("/a/b")),
            ("/%2Fadmin", rejected, same("/admin")),
            ("/\\admin", rejected, same("/admin")),
            ("/public/%2e%2e%2fadmin", rejected, same("/admin")),
            ("/public/..%2Fadmin", rejected, same("/admin")),
            ("/public/..%5cadmin", rejected, same("/admin")),
            ("/public/..\\admin", rejected, same("/admin")),
            ("/public\\..\\admin", rejected, same("/admin")),
            ("/public/..;x%2Fadmin", rejected, same("/admin")),
            ("/a%2F", rejected, same("/a/")),
            ("/a%2F%2F%2Fb", rejected, same("/a/b")),
            // A UTF-8 sequence cut by a decoded separator is two invalid segments.
            ("/%C3%2F%A9", rejected, Err(PathError::NonUtf8)),
            // `%252F` is a literal `%2F` in the name, never a separator.
            (
                "/a%252Fb",
                ok("/a%252Fb", "/a%2Fb"),
                ok("/a%252Fb", "/a%2Fb"),
            ),
        ]
    }

    fn actual(raw: &str, slashes: EncodedSlashes) -> Result<(String, String), PathError> {
        normalize(raw, slashes).map(|p| (p.upstream.into_owned(), p.matching.into_owned()))
    }

    fn expected_owned(expected: Expected) -> Result<(String, String), PathError> {
        expected.map(|(u, m)| (u.to_owned(), m.to_owned()))
    }

    fn all_cases() -> Vec<(&'static str, EncodedSlashes, Expected)> {
        let mut cases = Vec::new();
        for (raw, expected) in policy_independent_cases() {
            cases.push((raw, Reject, expected));
            cases.push((raw, Decode, expected));
        }
        for (raw, reject, decode) in slash_cases() {
            cases.push((raw, Reject, reject));
            cases.push((raw, Decode, decode));
        }
        cases
    }

    #[test]
    fn every_case_normalizes_to_the_expected_forms() {
        let mut failures = Vec::new();
        for (raw, slashes, expected) in all_cases() {
            let got = actual(raw, slashes);
            if got != expected_owned(expected) {
                failures.push(format!(
                    "{raw:?} ({slashes:?}): got {got:?}, want {expected:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn canonical_paths_are_borrowed_without_rewriting() {
        for raw in [
            "/",
            "/a",
            "/a/b/",
            "/public/index.html",
            "/a/..b/.c/b.d",
            "/a:b@c!$&'()*+,=-._~",
        ] {
            for slashes in [Reject, Decode] {
                let path = normalize(raw, slashes).expect("canonical path");
                assert!(
                    matches!(path.upstream, Cow::Borrowed(s) if s == raw),
                    "{raw:?}"
                );
                assert!(
                    matches!(path.matching, Cow::Borrowed(s) if s == raw),
                    "{raw:?}"
                );
            }
        }
    }

    #[test]
    fn a_form_equal_to_the_input_is_borrowed_on_the_slow_path() {
        let path = normalize("/admin;x/secret", Reject).expect("valid");
        assert!(matches!(path.upstream, Cow::Borrowed("/admin;x/secret")));
        assert!(matches!(path.matching, Cow::Owned(ref s) if s == "/admin/secret"));

        let path = normalize("/caf%C3%A9", Reject).expect("valid");
        assert!(matches!(path.upstream, Cow::Borrowed("/caf%C3%A9")));
        assert!(matches!(path.matching, Cow::Owned(ref s) if s == "/café"));
    }

    /// The forwarded path must mean the same thing if the upstream normalises it again;
    /// otherwise the upstream could still resolve something other than what was matched.
    #[test]
    fn upstream_form_is_a_fixed_point_with_the_same_matching_form() {
        for (raw, slashes, _) in all_cases() {
            let Ok(first) = normalize(raw, slashes) else {
                continue;
            };
            let again = normalize(&first.upstream, Reject)
                .unwrap_or_else(|e| panic!("{raw:?}: upstream {:?} -> {e:?}", first.upstream));
            assert!(
                matches!(again.upstream, Cow::Borrowed(_)),
                "{raw:?}: upstream {:?} renormalised to {:?}",
                first.upstream,
                again.upstream
            );
            assert_eq!(again.matching, first.matching, "{raw:?}");
        }
    }

    /// Holds for every successful result: the matcher never sees anything ambiguous.
    fn assert_matching_form_is_unambiguous(raw: &str, path: &NormalizedPath<'_>) {
        let m: &str = &path.matching;
        assert!(m.starts_with('/'), "{raw:?} -> {m:?}");
        assert!(!m.contains("//"), "{raw:?} -> {m:?}");
        assert!(!m.contains(';'), "{raw:?} -> {m:?}");
        assert!(!m.contains('\\'), "{raw:?} -> {m:?}");
        assert!(!m.bytes().any(is_control), "{raw:?} -> {m:?}");
        assert!(
            !m.split('/').any(|s| s == "." || s == ".."),
            "{raw:?} -> {m:?}"
        );
        let u: &str = &path.upstream;
        assert!(u.starts_with('/') && !u.contains("//"), "{raw:?} -> {u:?}");
        assert!(u.is_ascii() && !u.contains('\\'), "{raw:?} -> {u:?}");
        assert_eq!(
            u.matches('/').count(),
            m.matches('/').count(),
            "{raw:?}: forms differ in segment count: {u:?} vs {m:?}"
        );
    }

    #[test]
    fn every_short_path_over_a_hostile_alphabet_is_canonical_and_stable() {
        const ALPHABET: &[u8] = b"/.%2efF5c;a\\";
        const MAX_LEN: u32 = 5;
        let mut buf = Vec::new();
        for len in 0..=MAX_LEN {
            for mut n in 0..ALPHABET.len().pow(len) {
                buf.clear();
                buf.push(b'/');
                for _ in 0..len {
                    buf.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                let raw = std::str::from_utf8(&buf).expect("ASCII alphabet");
                for slashes in [Reject, Decode] {
                    // The fast path may only skip work the slow path would not have done.
                    if is_canonical(&buf) {
                        let slow = canonicalize(&buf, slashes);
                        assert_eq!(slow, Ok((raw.to_owned(), raw.to_owned())), "{raw:?}");
                    }
                    if let Ok(path) = normalize(raw, slashes) {
                        assert_matching_form_is_unambiguous(raw, &path);
                        let again = normalize(&path.upstream, Reject);
                        assert_eq!(
                            again.as_ref().map(|p| &p.upstream),
                            Ok(&path.upstream),
                            "{raw:?}"
                        );
                        assert_eq!(again.map(|p| p.matching), Ok(path.matching), "{raw:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn table_results_satisfy_the_matching_invariants() {
        for (raw, slashes, _) in all_cases() {
            if let Ok(path) = normalize(raw, slashes) {
                assert_matching_form_is_unambiguous(raw, &path);
            }
        }
    }

    #[test]
    fn error_labels_are_distinct_and_kebab_case() {
        let all = [
            PathError::NotOriginForm,
            PathError::BadPercentEncoding,
            PathError::EncodedSlash,
            PathError::ControlCharacter,
            PathError::NonUtf8,
        ];
        let labels: Vec<&str> = all.iter().map(PathError::as_label).collect();
        for (i, label) in labels.iter().enumerate() {
            assert!(label.starts_with("path-"), "{label}");
            assert!(
                label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{label}"
            );
            assert!(!labels[..i].contains(label), "duplicate {label}");
        }
        assert_eq!(PathError::EncodedSlash.as_label(), "path-encoded-slash");
        assert_eq!(
            PathError::BadPercentEncoding.as_label(),
            "path-bad-percent-encoding"
        );
    }

    #[test]
    fn encoded_slash_policy_defaults_to_reject_and_reads_snake_case() {
        assert_eq!(EncodedSlashes::default(), Reject);
        assert_eq!(
            serde_json::from_str::<EncodedSlashes>("\"decode\"").expect("decode"),
            Decode
        );
        assert_eq!(
            serde_json::from_str::<EncodedSlashes>("\"reject\"").expect("reject"),
            Reject
        );
        assert!(serde_json::from_str::<EncodedSlashes>("\"Decode\"").is_err());
        assert_eq!(
            serde_json::to_string(&Decode).expect("serialize"),
            "\"decode\""
        );
    }
}
