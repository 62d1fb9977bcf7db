//! The path the mock routes on, normalised as ASGI and Go servers do before
//! routing: a gateway that classifies the raw path and forwards it is caught
//! serving work it did not price.

use std::borrow::Cow;

/// `raw` with percent-escapes decoded (`%2F` included, as ASGI servers do),
/// empty and `.` segments dropped, `..` resolved (never above the root) and
/// no trailing `/`. Invalid escapes stay as they are; bytes that are not
/// UTF-8 after decoding become U+FFFD.
///
/// `/v1/chat/%63ompletions`, `/v1//chat/completions`,
/// `/v1/x/../chat/completions` and `/v1/chat/completions/` all give
/// `/v1/chat/completions`.
pub fn normalise_path(raw: &str) -> Cow<'_, str> {
    let clean = !raw.contains('%')
        && !raw.contains("//")
        && !raw.contains("/.")
        && raw.starts_with('/')
        && (raw.len() == 1 || !raw.ends_with('/'));
    if clean {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode(raw.as_bytes());
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() {
        path.push('/');
    }
    Cow::Owned(path)
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |byte: u8| char::from(byte).to_digit(16);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(high), Some(low)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                // Two hex digits make one byte: high * 16 + low ≤ 255.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disguised_paths_normalise_to_the_route_they_reach() {
        for raw in [
            "/v1/chat/completions",
            "/v1/chat/%63ompletions",
            "/v1/chat/%63%6F%6d%70letions",
            "/v1//chat/completions",
            "//v1/chat//completions",
            "/v1/x/../chat/completions",
            "/v1/./chat/./completions",
            "/v1/chat/completions/",
            "/v1/chat/completions//",
            "/v1/chat%2Fcompletions",
            "/v1/chat/x/%2e%2e/completions",
            "/v1/chat/completions/.",
            "/../../v1/chat/completions",
        ] {
            assert_eq!(normalise_path(raw), "/v1/chat/completions", "{raw:?}");
        }
    }

    #[test]
    fn clean_paths_are_borrowed_and_odd_ones_kept_sensible() {
        assert!(matches!(normalise_path("/v1/models"), Cow::Borrowed(_)));
        assert!(matches!(normalise_path("/"), Cow::Borrowed(_)));
        assert_eq!(normalise_path(""), "/");
        assert_eq!(normalise_path("/.."), "/");
        assert_eq!(normalise_path("/v1/.."), "/");
        assert_eq!(normalise_path("/v1/files/file-abc"), "/v1/files/file-abc");
        // Invalid or cut escapes stay literal.
        assert_eq!(normalise_path("/v1/a%zzb"), "/v1/a%zzb");
        assert_eq!(normalise_path("/v1/a%4"), "/v1/a%4");
        assert_eq!(normalise_path("/v1/a%"), "/v1/a%");
        // A decoded space or NUL is kept; non-UTF-8 bytes become U+FFFD.
        assert_eq!(normalise_path("/v1/a%20b"), "/v1/a b");
        assert_eq!(normalise_path("/v1/a%00"), "/v1/a\0");
        assert_eq!(normalise_path("/v1/%ff"), "/v1/\u{fffd}");
        // A dot segment only counts as a whole segment.
        assert_eq!(normalise_path("/v1/.well-known/x"), "/v1/.well-known/x");
        assert_eq!(normalise_path("/v1/..x/y"), "/v1/..x/y");
    }
}
