//! The few rewrites the gateway makes to a request body, each a splice at
//! the exact byte span of the value it changes.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::Endpoint;
use super::request::{analyze, is_null, stream_options};
use crate::error::ApiError;

/// Rewrites the gateway may make to a body (DESIGN: "body unchanged except
/// the few documented rewrites").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Set `stream_options.include_usage = true` (chat and completions only:
    /// other routes report usage unasked or do not stream).
    pub include_usage: bool,
    /// Set the endpoint's max-tokens field to this value (chat, completions,
    /// responses, messages; embeddings and other routes have none).
    pub max_tokens: Option<u64>,
}

/// One change to the body: replace `start..end` with `text`.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// Where a borrowed raw value sits in `body`.
fn span(body: &[u8], raw: &RawValue) -> Result<(usize, usize), ApiError> {
    let base = body.as_ptr() as usize;
    let at = raw.get().as_ptr() as usize;
    let start = at
        .checked_sub(base)
        .filter(|s| s + raw.get().len() <= body.len())
        .ok_or_else(|| ApiError::internal("rewrite: a field is not inside the body"))?;
    Ok((start, start + raw.get().len()))
}

/// The position just after the `{` that opens the object at `body[from..]`.
fn after_brace(body: &[u8], from: usize) -> Result<usize, ApiError> {
    let skip = body[from..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len() - from);
    if body.get(from + skip) != Some(&b'{') {
        return Err(ApiError::internal("rewrite: the body is not an object"));
    }
    Ok(from + skip + 1)
}

/// Returns the body with the rewrites of `rw` applied, or the same `Bytes`
/// when nothing changes.
///
/// Only what must change is touched: an absent field is spliced in right
/// after the opening `{`, a present value is replaced in place (its exact
/// byte span, from the borrowed parse). This keeps every other byte, where a
/// round trip through `serde_json::Value` would reorder keys and round
/// numbers beyond `f64`/`u64`. A chat body without a max-tokens field gets
/// `max_completion_tokens` (OpenAI's current name; reasoning models refuse
/// `max_tokens`); one with both gets both set.
pub fn rewrite(endpoint: Endpoint, body: &Bytes, rw: &Rewrite) -> Result<Bytes, ApiError> {
    let want_usage = rw.include_usage && endpoint.usage_on_request();
    let want_max = rw.max_tokens.filter(|_| {
        matches!(
            endpoint,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages
        )
    });
    if !want_usage && want_max.is_none() {
        return Ok(body.clone());
    }
    let (_, f) = analyze(endpoint, body)?;
    let mut edits: Vec<Edit> = Vec::new();
    let mut members: Vec<String> = Vec::new();
    let usage_object = r#"{"include_usage":true}"#;

    if want_usage {
        match f.stream_options {
            None => members.push(format!(r#""stream_options":{usage_object}"#)),
            Some(raw) if is_null(raw) => {
                let (start, end) = span(body, raw)?;
                edits.push(Edit {
                    start,
                    end,
                    text: usage_object.to_owned(),
                });
            }
            Some(raw) => {
                let options = stream_options(raw)?;
                match options.include_usage {
                    Some(v) if v.get() == "true" => {}
                    Some(v) => {
                        let (start, end) = span(body, v)?;
                        edits.push(Edit {
                            start,
                            end,
                            text: "true".to_owned(),
                        });
                    }
                    None if options.keys == 0 => {
                        let (start, end) = span(body, raw)?;
                        edits.push(Edit {
                            start,
                            end,
                            text: usage_object.to_owned(),
                        });
                    }
                    None => {
                        let (start, _) = span(body, raw)?;
                        let at = after_brace(body, start)?;
                        edits.push(Edit {
                            start: at,
                            end: at,
                            text: r#""include_usage":true,"#.to_owned(),
                        });
                    }
                }
            }
        }
    }

    if let Some(max) = want_max {
        let value = max.to_string();
        let (present, absent_name): (Vec<&RawValue>, &str) = match endpoint {
            Endpoint::Chat => (
                [f.max_completion_tokens, f.max_tokens]
                    .into_iter()
                    .flatten()
                    .collect(),
                "max_completion_tokens",
            ),
            Endpoint::Completions | Endpoint::Messages => {
                (f.max_tokens.into_iter().collect(), "max_tokens")
            }
            _ => (
                f.max_output_tokens.into_iter().collect(),
                "max_output_tokens",
            ),
        };
        if present.is_empty() {
            members.push(format!(r#""{absent_name}":{value}"#));
        }
        for raw in present {
            if raw.get() != value {
                let (start, end) = span(body, raw)?;
                edits.push(Edit {
                    start,
                    end,
                    text: value.clone(),
                });
            }
        }
    }

    if !members.is_empty() {
        let at = after_brace(body, 0)?;
        let mut text = members.join(",");
        if f.keys > 0 {
            text.push(',');
        }
        edits.push(Edit {
            start: at,
            end: at,
            text,
        });
    }
    splice(body, edits)
}

/// The body with the edits applied (the same `Bytes` when there are none).
fn splice(body: &Bytes, mut edits: Vec<Edit>) -> Result<Bytes, ApiError> {
    if edits.is_empty() {
        return Ok(body.clone());
    }
    edits.sort_by_key(|e| (e.start, e.end));
    let extra: usize = edits.iter().map(|e| e.text.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for e in &edits {
        if e.start < at {
            return Err(ApiError::internal("rewrite: overlapping edits"));
        }
        out.extend_from_slice(&body[at..e.start]);
        out.extend_from_slice(e.text.as_bytes());
        at = e.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

/// A chat body with its messages' roles renamed by `map` (an upstream's
/// `role_map`: `model` → `assistant` for a Space that speaks OpenAI's roles
/// to Gemini's clients). Only the role values change, in place; a body
/// without messages, or none to rename, is the same `Bytes`.
pub fn rename_roles(body: &Bytes, map: &[(String, String)]) -> Result<Bytes, ApiError> {
    #[derive(serde::Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Messages<'a> {
        #[serde(borrow)]
        messages: Option<Vec<Role<'a>>>,
    }
    if map.is_empty() {
        return Ok(body.clone());
    }
    // The body was inspected already: one that does not parse here has no
    // messages to rename.
    let Ok(Messages {
        messages: Some(messages),
    }) = serde_json::from_slice::<Messages>(body)
    else {
        return Ok(body.clone());
    };
    let mut edits = Vec::new();
    for raw in messages.iter().filter_map(|m| m.role) {
        let Ok(role) = serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()) else {
            continue;
        };
        if let Some((_, to)) = map.iter().find(|(from, _)| *from == role) {
            let (start, end) = span(body, raw)?;
            let text = serde_json::to_string(to)
                .map_err(|e| ApiError::internal(format!("rewrite: {e}")))?;
            edits.push(Edit { start, end, text });
        }
    }
    splice(body, edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::inspect;

    fn rewritten(endpoint: Endpoint, body: &str, rw: Rewrite) -> String {
        let out = rewrite(endpoint, &Bytes::copy_from_slice(body.as_bytes()), &rw).unwrap();
        let back = inspect(endpoint, &out).unwrap();
        if rw.include_usage {
            assert!(back.include_usage);
        }
        if let Some(m) = rw.max_tokens {
            assert_eq!(back.max_tokens, Some(m));
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn rewrite_splices_and_replaces() {
        let both = Rewrite {
            include_usage: true,
            max_tokens: Some(64),
        };
        let body =
            r#"{"model":"m","messages":[],"temperature":0.1000000000000000055511151231257827}"#;
        assert_eq!(
            rewritten(Endpoint::Chat, body, both),
            r#"{"stream_options":{"include_usage":true},"max_completion_tokens":64,"model":"m","messages":[],"temperature":0.1000000000000000055511151231257827}"#
        );
        assert_eq!(
            rewritten(
                Endpoint::Chat,
                r#" { "model" : "m", "max_tokens" : 4096, "stream_options" : { "x" : 1 } } "#,
                both
            ),
            r#" { "model" : "m", "max_tokens" : 64, "stream_options" : {"include_usage":true, "x" : 1 } } "#
        );
        assert_eq!(
            rewritten(
                Endpoint::Chat,
                r#"{"model":"m","stream_options":{"include_usage":false},"max_tokens":9,"max_completion_tokens":9}"#,
                both
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64,"max_completion_tokens":64}"#
        );
        assert_eq!(
            rewritten(
                Endpoint::Chat,
                r#"{"model":"m","stream_options":null,"max_tokens":null}"#,
                both
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64}"#
        );
        assert_eq!(
            rewritten(
                Endpoint::Chat,
                r#"{"model":"m","stream_options": { }}"#,
                both
            ),
            r#"{"max_completion_tokens":64,"model":"m","stream_options": {"include_usage":true}}"#
        );
        assert_eq!(
            rewritten(Endpoint::Completions, r#"{"model":"m"}"#, both),
            r#"{"stream_options":{"include_usage":true},"max_tokens":64,"model":"m"}"#
        );
        // Responses: only the max field (usage arrives unasked).
        assert_eq!(
            rewritten(
                Endpoint::Responses,
                r#"{"model":"m","max_output_tokens":1000}"#,
                both
            ),
            r#"{"model":"m","max_output_tokens":64}"#
        );
        // Nothing to change: the same buffer.
        let body = Bytes::from_static(
            br#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64}"#,
        );
        for endpoint in [
            Endpoint::Chat,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::Other,
        ] {
            let out = rewrite(endpoint, &body, &both).unwrap();
            assert_eq!(out.as_ptr(), body.as_ptr());
        }
        let out = rewrite(Endpoint::Chat, &body, &Rewrite::default()).unwrap();
        assert_eq!(out.as_ptr(), body.as_ptr());
        // A body inspect refuses is refused.
        assert!(rewrite(Endpoint::Chat, &Bytes::from_static(b"{\"model\":1}"), &both).is_err());
    }

    #[test]
    fn rewrite_caps_anthropic_max_tokens() {
        let both = Rewrite {
            include_usage: true,
            max_tokens: Some(64),
        };
        assert_eq!(
            rewritten(
                Endpoint::Messages,
                r#"{"model":"c","max_tokens":4096,"messages":[],"stream":true}"#,
                both
            ),
            r#"{"model":"c","max_tokens":64,"messages":[],"stream":true}"#
        );
    }
}

#[cfg(test)]
mod role_tests {
    use super::*;

    #[test]
    fn renames_only_mapped_roles_in_place() {
        let map = vec![("model".to_owned(), "assistant".to_owned())];
        let body = Bytes::from_static(
            br#"{"model":"gemini-x","messages":[{"role":"user","content":"model"},{"content":"hi", "role" : "model"}],"n":1.10}"#,
        );
        let out = rename_roles(&body, &map).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"gemini-x","messages":[{"role":"user","content":"model"},{"content":"hi", "role" : "assistant"}],"n":1.10}"#
        );
        let plain = Bytes::from_static(br#"{"messages":[{"role":"user"}]}"#);
        assert_eq!(rename_roles(&plain, &map).unwrap().as_ptr(), plain.as_ptr());
    }
}
