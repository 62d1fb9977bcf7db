//! Which API operation a request path names, read from its canonical form.

use crate::error::ApiError;

/// Which API operation a request names, read from its canonical path
/// ([`classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/responses`
    Responses,
    /// `/v1/models` and `/v1/models/{id}`: the model list, never upstream work.
    Models,
    /// `/v1/messages`: Anthropic's Messages API.
    Messages,
    /// `/v1/messages/count_tokens`: Anthropic's free token count.
    CountTokens,
    /// Any other path under `/v1/`.
    Other,
}

impl Endpoint {
    /// The endpoint of a request path, `Other` when [`classify`] refuses it.
    /// Kept for callers that have not moved to `classify` yet: it reads the
    /// same canonical path, but cannot refuse, so prefer `classify`.
    pub fn from_path(path: &str) -> Endpoint {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        classify(path).map_or(Endpoint::Other, |(e, _)| e)
    }

    /// The endpoint of a canonical path (see [`classify`]).
    fn of_canonical(path: &str) -> Endpoint {
        match path {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            "/v1/messages/count_tokens" => Endpoint::CountTokens,
            "/v1/models" => Endpoint::Models,
            p => match p.strip_prefix("/v1/models/") {
                Some(id) if !id.contains('/') => Endpoint::Models,
                _ => Endpoint::Other,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Models => "models",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Other => "other",
        }
    }

    /// Whether a streamed answer reports usage only when asked with
    /// `stream_options.include_usage`.
    pub fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// Known APIs priced by their model's price (a model is required).
    pub fn priced_by_model(self) -> bool {
        matches!(
            self,
            Endpoint::Chat
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::Embeddings
                | Endpoint::Messages
        )
    }

    /// Anthropic's API: its errors are in Anthropic's shape, its upstream
    /// request carries `anthropic-version`.
    pub fn speaks_anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::CountTokens)
    }

    /// APIs that generate completion tokens (a `max_tokens` bound applies).
    pub fn produces_tokens(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages
        )
    }
}

/// A request path in canonical form: what the endpoint is classified on and
/// what is forwarded upstream, so that the gateway and an upstream that
/// normalises paths (ASGI, Go's `ServeMux`) always agree on the operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Canonical(String);

impl Canonical {
    /// The path, starting with `/v1/`, without a query.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Canonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid_path(why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_path",
        format!("The request path cannot be used: {why}."),
    )
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Classifies a request path (the URI's path, without its query) on its
/// canonical form, which is also the path to forward.
///
/// Canonical form: percent-escapes of unreserved characters (`A–Z a–z 0–9
/// - . _ ~`) decoded, other escapes kept with upper-case hex; empty
/// segments (`//`, a trailing `/`) removed; `.` and `..` segments resolved.
///
/// Refused with 400 `invalid_path`, because an upstream could read them as
/// a different path than the gateway: an encoded `/` (`%2F`) or `\` (raw or
/// `%5C`), NUL (raw or `%00`), `;` (path parameters), a malformed escape,
/// bytes that are not UTF-8 once every escape is decoded, a `..` that climbs
/// above `/`, and anything not under `/v1/`.
pub fn classify(raw_path: &str) -> Result<(Endpoint, Canonical), ApiError> {
    if already_canonical(raw_path) {
        // What clients send: nothing to decode or resolve (one allocation
        // instead of three; the slow path gives the same answer, tested).
        return Ok((
            Endpoint::of_canonical(raw_path),
            Canonical(raw_path.to_owned()),
        ));
    }
    classify_slow(raw_path)
}

/// `/v1/…` of unreserved characters only, with no empty, `.` or `..`
/// segment: its canonical form is itself.
fn already_canonical(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix("/v1/") else {
        return false;
    };
    // One pass over the bytes (no per-segment search): each segment is
    // non-empty, unreserved, and not `.` or `..`.
    let dot_segment = |len: usize, dots: usize| len == 0 || (dots == len && len <= 2);
    let (mut len, mut dots) = (0, 0);
    for &b in rest.as_bytes() {
        if b == b'/' {
            if dot_segment(len, dots) {
                return false;
            }
            (len, dots) = (0, 0);
        } else if unreserved(b) {
            len += 1;
            dots += usize::from(b == b'.');
        } else {
            return false;
        }
    }
    !dot_segment(len, dots)
}

fn classify_slow(raw_path: &str) -> Result<(Endpoint, Canonical), ApiError> {
    let raw = raw_path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(invalid_path("it must start with `/v1/`"));
    }
    // The path with unreserved escapes decoded, and the fully decoded bytes
    // (only to check that the upstream's decoding yields UTF-8).
    let mut path = Vec::with_capacity(raw.len());
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let byte = match (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(invalid_path("it has a malformed percent-escape")),
                };
                match byte {
                    b'/' | b'\\' => {
                        return Err(invalid_path("an encoded `/` or `\\` is not allowed"));
                    }
                    0 => return Err(invalid_path("NUL is not allowed")),
                    _ => {}
                }
                if unreserved(byte) {
                    path.push(byte);
                } else {
                    path.push(b'%');
                    path.extend_from_slice(format!("{byte:02X}").as_bytes());
                }
                decoded.push(byte);
                i += 3;
                continue;
            }
            0 => return Err(invalid_path("NUL is not allowed")),
            b'\\' => return Err(invalid_path("`\\` is not allowed")),
            b';' => return Err(invalid_path("`;` path parameters are not allowed")),
            _ => {}
        }
        path.push(b);
        decoded.push(b);
        i += 1;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(invalid_path("it is not UTF-8 once decoded"));
    }
    let path = String::from_utf8(path).map_err(|_| invalid_path("it is not UTF-8"))?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(invalid_path("`..` climbs above `/`"));
                }
            }
            s => segments.push(s),
        }
    }
    if segments.len() < 2 || segments[0] != "v1" {
        return Err(invalid_path("only paths under `/v1/` are served here"));
    }
    let mut canonical = String::with_capacity(path.len());
    for s in &segments {
        canonical.push('/');
        canonical.push_str(s);
    }
    Ok((Endpoint::of_canonical(&canonical), Canonical(canonical)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions?x=1"),
            Endpoint::Chat
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Endpoint::Completions
        );
        assert_eq!(Endpoint::from_path("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(Endpoint::from_path("/v1/responses"), Endpoint::Responses);
        assert_eq!(Endpoint::from_path("/v1/responses/resp_1"), Endpoint::Other);
        assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Models);
        assert_eq!(
            Endpoint::from_path("/v1/chat/%63ompletions"),
            Endpoint::Chat
        );
        assert_eq!(
            Endpoint::from_path("/v1/chat%2Fcompletions"),
            Endpoint::Other
        );
        assert_eq!(Endpoint::Chat.as_str(), "chat");
        assert_eq!(Endpoint::Other.as_str(), "other");
    }

    /// The fast path answers exactly as the full one, on paths made of the
    /// characters that matter (escapes, dots, slashes, separators).
    #[test]
    fn fast_path_agrees_with_the_full_one() {
        let alphabet: &[&str] = &[
            "/",
            "v1",
            "chat",
            "completions",
            ".",
            "..",
            "%63",
            "%2F",
            "~",
            "-",
            "_",
            "a",
            ";",
            "\\",
            "%",
            "x.y",
            "",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut p = String::from("/v1/");
            for _ in 0..(seed % 6) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                p.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let fast = already_canonical(&p).then(|| (Endpoint::of_canonical(&p), p.clone()));
            let slow = classify_slow(&p).map(|(e, c)| (e, c.as_str().to_owned()));
            if let Some(f) = fast {
                assert_eq!(Some(f), slow.ok(), "{p}");
            }
        }
        assert!(already_canonical("/v1/chat/completions"));
        assert!(!already_canonical("/v1/chat//completions"));
        assert!(!already_canonical("/v1/chat/completions/"));
        assert!(!already_canonical("/v1/./chat"));
        assert!(!already_canonical("/v1/chat/.."));
        assert!(!already_canonical("/v1/"));
        assert!(!already_canonical("/v1/chat%2Fx"));
        assert!(already_canonical("/v1/.../x"));
        assert!(already_canonical("/v1/a.b/c"));
    }

    fn canon(raw: &str) -> (Endpoint, String) {
        let (e, c) = classify(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        (e, c.as_str().to_owned())
    }

    #[test]
    fn classifies_the_canonical_path() {
        let chat = (Endpoint::Chat, "/v1/chat/completions".to_owned());
        for raw in [
            "/v1/chat/completions",
            "/v1/chat/%63ompletions",
            "/v1/chat/%63%6F%6dpletions",
            "/v1//chat/completions",
            "//v1/chat//completions//",
            "/v1/x/../chat/completions",
            "/v1/x/%2E%2e/chat/completions",
            "/v1/./chat/./completions",
            "/v1/chat/completions/",
            "/v1/chat/completions/.",
            "/v1/chat/completions/x/..",
            "/%76%31/chat/completions",
        ] {
            assert_eq!(canon(raw), chat, "{raw}");
        }
        for (raw, endpoint, path) in [
            ("/v1/completions", Endpoint::Completions, "/v1/completions"),
            ("/v1/embeddings/", Endpoint::Embeddings, "/v1/embeddings"),
            ("/v1/responses", Endpoint::Responses, "/v1/responses"),
            (
                "/v1/responses/resp_1",
                Endpoint::Other,
                "/v1/responses/resp_1",
            ),
            ("/v1/models", Endpoint::Models, "/v1/models"),
            ("/v1/models/gpt-4o", Endpoint::Models, "/v1/models/gpt-4o"),
            ("/v1/models/a/b", Endpoint::Other, "/v1/models/a/b"),
            ("/v1/messages", Endpoint::Messages, "/v1/messages"),
            (
                "/v1/messages/count_tokens",
                Endpoint::CountTokens,
                "/v1/messages/count_tokens",
            ),
            // Reserved and non-ASCII escapes stay escaped, in upper case.
            ("/v1/files/a%3fb", Endpoint::Other, "/v1/files/a%3Fb"),
            (
                "/v1/files/caf%c3%a9",
                Endpoint::Other,
                "/v1/files/caf%C3%A9",
            ),
            ("/v1/files/a%25b", Endpoint::Other, "/v1/files/a%25b"),
            // An escaped escape is not decoded twice.
            (
                "/v1/chat/%2563ompletions",
                Endpoint::Other,
                "/v1/chat/%2563ompletions",
            ),
        ] {
            assert_eq!(canon(raw), (endpoint, path.to_owned()), "{raw}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_canonical() {
        for raw in [
            "",
            "v1/chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/chat%5Ccompletions",
            "/v1/chat\\completions",
            "/v1/chat/completions%00",
            "/v1/chat/completions\0",
            "/v1/chat/completions;x=1",
            "/v1/chat;/completions",
            "/v1/chat/completions%",
            "/v1/chat/completions%4",
            "/v1/chat/completions%zz",
            "/v1/files/%ff",
            "/v1/files/%c3",
            "/v1/../../etc/passwd",
            "/..",
            "/v1",
            "/v1/",
            "/v1/..",
            "/v2/chat/completions",
            "/v1/../v2/x",
            "/api/v1/keys",
            "/",
        ] {
            let e = classify(raw).expect_err(raw);
            assert_eq!((e.status.as_u16(), e.code), (400, "invalid_path"), "{raw}");
        }
    }

    /// Random paths over the characters that matter, through the fuzz
    /// target's property (seeded, so it is the same run every time).
    #[test]
    fn random_paths_keep_the_canonical_property() {
        let alphabet = b"/.%2eEfF5cC0v1;a~";
        let mut state = 0x9E37_79B9u32;
        for _ in 0..20_000 {
            let mut path = b"/v1/".to_vec();
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            for _ in 0..(state % 16) {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                path.push(alphabet[(state >> 8) as usize % alphabet.len()]);
            }
            crate::fuzzing::canonical_path(&path);
        }
    }
}
