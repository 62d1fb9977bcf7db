//! Objects an upstream account stores for whoever holds its key: files,
//! batches and stored responses, and the transcription endpoint that takes a
//! file upload. Every caller sees every object (one upstream account is
//! shared by all of a gateway's tenants): that is the leak a gateway must
//! scope.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};

use crate::answer::{Answer, Reply};
use crate::error::ApiError;
use crate::knobs::Knobs;
use crate::plan::{Plan, answer_text, text_tokens, unix_now};
use crate::served::{Tokens, Work};
use crate::server::State;

/// Most stored responses kept: every stored `POST /v1/responses` adds one,
/// and benches send millions. The oldest go first.
const MAX_STORED_RESPONSES: usize = 1024;

/// What the server stores, in creation order.
#[derive(Default)]
pub(crate) struct Objects {
    /// Taken only by the object routes and stored responses.
    inner: Mutex<Stored>,
}

#[derive(Default)]
struct Stored {
    /// `(file object, content)`.
    files: Vec<(Value, Bytes)>,
    /// Batch objects.
    batches: Vec<Value>,
    /// `(id, finished response object)`, at most [`MAX_STORED_RESPONSES`].
    responses: VecDeque<(String, Value)>,
}

impl Objects {
    fn with<T>(&self, change: impl FnOnce(&mut Stored) -> T) -> T {
        change(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn keep_response(&self, id: &str, response: Value) {
        self.with(|stored| {
            if stored.responses.len() >= MAX_STORED_RESPONSES {
                stored.responses.pop_front();
            }
            stored.responses.push_back((id.to_owned(), response));
        });
    }
}

fn id_of(object: &Value) -> &str {
    object.get("id").and_then(Value::as_str).unwrap_or("")
}

fn no_such(kind: &str, id: &str, param: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::invalid(format!("No such {kind}: '{id}'"), Some(param))
    }
}

/// OpenAI's list envelope.
fn list(data: Vec<Value>) -> Reply {
    let first = data.first().map(|o| id_of(o).to_owned());
    let last = data.last().map(|o| id_of(o).to_owned());
    Reply::json(&json!({
        "object": "list",
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": false,
    }))
}

pub(crate) fn get_response(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        stored
            .responses
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, response)| Reply::json(response))
            .ok_or_else(|| no_such_response(id))
    })
}

pub(crate) fn delete_response(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        let at = stored
            .responses
            .iter()
            .position(|(known, _)| known == id)
            .ok_or_else(|| no_such_response(id))?;
        stored.responses.remove(at);
        Ok(Reply::json(
            &json!({"id": id, "object": "response", "deleted": true}),
        ))
    })
}

fn no_such_response(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::invalid(
            format!("Response with id '{id}' not found."),
            Some("response_id"),
        )
    }
}

pub(crate) fn create_file(
    state: &State,
    seq: u64,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Reply, ApiError> {
    let parts = multipart(headers, body)?;
    let purpose = field_text(&parts, "purpose")?.to_owned();
    let file = parts
        .iter()
        .find(|part| part.name == "file")
        .ok_or_else(|| ApiError::missing("file"))?;
    let object = json!({
        "id": format!("file-{:08x}{seq:016x}", state.nonce),
        "object": "file",
        "bytes": file.data.len(),
        "created_at": unix_now(),
        "expires_at": null,
        "filename": file.filename.as_deref().unwrap_or("upload"),
        "purpose": purpose,
        "status": "processed",
        "status_details": null,
    });
    let reply = Reply::json(&object);
    let content = file.data.clone();
    state
        .objects
        .with(|stored| stored.files.push((object, content)));
    Ok(reply)
}

pub(crate) fn list_files(state: &State) -> Reply {
    list(state.objects.with(|stored| {
        stored
            .files
            .iter()
            .map(|(object, _)| object.clone())
            .collect()
    }))
}

pub(crate) fn get_file(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        stored
            .files
            .iter()
            .find(|(object, _)| id_of(object) == id)
            .map(|(object, _)| Reply::json(object))
            .ok_or_else(|| no_such("File object", id, "id"))
    })
}

pub(crate) fn delete_file(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        let at = stored
            .files
            .iter()
            .position(|(object, _)| id_of(object) == id)
            .ok_or_else(|| no_such("File object", id, "id"))?;
        stored.files.remove(at);
        Ok(Reply::json(
            &json!({"id": id, "object": "file", "deleted": true}),
        ))
    })
}

pub(crate) fn file_content(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        stored
            .files
            .iter()
            .find(|(object, _)| id_of(object) == id)
            .map(|(_, content)| Reply {
                status: StatusCode::OK,
                content_type: "application/octet-stream",
                answer: Answer::Json(content.clone()),
                work: None,
            })
            .ok_or_else(|| no_such("File object", id, "id"))
    })
}

pub(crate) fn create_batch(
    state: &State,
    seq: u64,
    request: &Map<String, Value>,
) -> Result<Reply, ApiError> {
    let text = |name: &'static str| match request.get(name) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.as_str()),
        None | Some(Value::Null) => Err(ApiError::missing(name)),
        Some(_) => Err(ApiError::wrong_type(name, "a string")),
    };
    let input_file_id = text("input_file_id")?;
    let endpoint = text("endpoint")?;
    let window = text("completion_window")?;
    let created = unix_now();
    let object = json!({
        "id": format!("batch_{:08x}{seq:016x}", state.nonce),
        "object": "batch",
        "endpoint": endpoint,
        "errors": null,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": created,
        "in_progress_at": null,
        "expires_at": created + 86_400,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": request.get("metadata").cloned().unwrap_or(Value::Null),
    });
    state.objects.with(|stored| {
        if !stored
            .files
            .iter()
            .any(|(file, _)| id_of(file) == input_file_id)
        {
            return Err(no_such("File object", input_file_id, "input_file_id"));
        }
        let reply = Reply::json(&object);
        stored.batches.push(object);
        Ok(reply)
    })
}

pub(crate) fn list_batches(state: &State) -> Reply {
    list(state.objects.with(|stored| stored.batches.clone()))
}

pub(crate) fn get_batch(state: &State, id: &str) -> Result<Reply, ApiError> {
    state.objects.with(|stored| {
        stored
            .batches
            .iter()
            .find(|batch| id_of(batch) == id)
            .map(Reply::json)
            .ok_or_else(|| no_such("batch", id, "batch_id"))
    })
}

/// `POST /v1/audio/transcriptions` (multipart `file`, `model`): the text,
/// and usage in `gpt-4o-transcribe`'s token form (audio tokens: a quarter of
/// the file's bytes).
pub(crate) fn transcription(
    headers: &HeaderMap,
    body: &Bytes,
    knobs: &Knobs,
) -> Result<Reply, ApiError> {
    let parts = multipart(headers, body)?;
    let model = field_text(&parts, "model")?.to_owned();
    let file = parts
        .iter()
        .find(|part| part.name == "file")
        .ok_or_else(|| ApiError::missing("file"))?;
    let audio = text_tokens(file.data.len());
    let plan = Plan::new(audio, None, knobs, 0, 0);
    let output = plan.completion();
    let mut answer = json!({"text": answer_text(plan.visible)});
    if plan.usage {
        answer["usage"] = json!({
            "type": "tokens",
            "input_tokens": audio,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
            "output_tokens": output,
            "total_tokens": audio + output,
        });
    }
    let work = Work {
        model,
        tokens: Tokens {
            input: audio,
            output,
            ..Tokens::default()
        },
    };
    Ok(Reply::json_work(&answer, work))
}

/// One part of a `multipart/form-data` body.
struct Part {
    /// The form field's name.
    name: String,
    /// Set for file fields.
    filename: Option<String>,
    /// The part's content.
    data: Bytes,
}

fn field_text<'a>(parts: &'a [Part], name: &'static str) -> Result<&'a str, ApiError> {
    let part = parts
        .iter()
        .find(|part| part.name == name)
        .ok_or_else(|| ApiError::missing(name))?;
    std::str::from_utf8(&part.data).map_err(|_| ApiError::wrong_type(name, "a UTF-8 string"))
}

/// The parts of a `multipart/form-data` body (RFC 7578), as far as the
/// mock needs them: names, file names and contents.
fn multipart(headers: &HeaderMap, body: &Bytes) -> Result<Vec<Part>, ApiError> {
    let bad = |why: &str| ApiError::invalid(format!("Invalid multipart body: {why}."), None);
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Err(ApiError::invalid(
            "Expected a multipart/form-data body.".into(),
            None,
        ));
    }
    let boundary = content_type
        .split(';')
        .filter_map(|param| param.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no boundary"))?;
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut at = find(body, delimiter, 0).ok_or_else(|| bad("no opening boundary"))?;
    loop {
        at += delimiter.len();
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        // The rest of the boundary line.
        let line_end = find(body, b"\r\n", at).ok_or_else(|| bad("cut boundary line"))?;
        let head_start = line_end + 2;
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or_else(|| bad("cut part head"))?;
        let head = String::from_utf8_lossy(&body[head_start..head_end]);
        let data_start = head_end + 4;
        let next = find(body, delimiter, data_start).ok_or_else(|| bad("no closing boundary"))?;
        // The CRLF before the delimiter belongs to the delimiter.
        let data_end = next.saturating_sub(2).max(data_start);
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            let Some((header, value)) = line.split_once(':') else {
                continue;
            };
            if !header.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in value.split(';').map(str::trim) {
                if let Some(v) = param.strip_prefix("name=") {
                    name = Some(v.trim_matches('"').to_owned());
                } else if let Some(v) = param.strip_prefix("filename=") {
                    filename = Some(v.trim_matches('"').to_owned());
                }
            }
        }
        parts.push(Part {
            name: name.ok_or_else(|| bad("a part without a name"))?,
            filename,
            data: body.slice(data_start..data_end),
        });
        at = next;
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|at| at + from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn multipart_parts_are_read_with_names_files_and_contents() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\r\n\r\n--XyZ--\r\n",
        );
        let parts = multipart(&headers, &body).expect("parses");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), &parts[0].data[..]),
            ("purpose", &b"batch"[..])
        );
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(&parts[1].data[..], b"{\"a\":1}\r\n");
        for bad in [
            &b"nothing"[..],
            b"--XyZ\r\nno head end",
            b"--XyZ\r\nA: b\r\n\r\nunclosed",
        ] {
            assert!(multipart(&headers, &Bytes::copy_from_slice(bad)).is_err());
        }
        assert!(
            multipart(&HeaderMap::new(), &body).is_err(),
            "needs the content type"
        );
    }
}
