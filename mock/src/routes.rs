//! One request from head to answer: normalise the path, read the body,
//! record it, check the key, read the knobs, apply the fault, dispatch to
//! the endpoint, count the work, add the account headers.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::answer::{
    Answer, Api, JSON_CONTENT_TYPE, Reply, SSE_CONTENT_TYPE, account_headers, respond,
};
use crate::body::MockBody;
use crate::error::{ApiError, status_fault};
use crate::fault::Fault;
use crate::knobs::Knobs;
use crate::path::normalise_path;
use crate::server::{SeenRequest, State};
use crate::{anthropic, objects, openai, responses};

pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let seq = state.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let path = normalise_path(parts.uri.path());
    let api = Api::of(&path, &parts.headers);
    state.served.received(&path);
    let mut response = answer(&state, seq, &parts, &path, api, body).await;
    account_headers(api, seq, response.headers_mut());
    Ok(response)
}

async fn answer(
    state: &Arc<State>,
    seq: u64,
    parts: &Parts,
    path: &str,
    api: Api,
    body: Incoming,
) -> Response<MockBody> {
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return ApiError::invalid("could not read the request body".into(), None)
                .response(api, seq);
        }
    };
    if state.opts.record_requests {
        state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(SeenRequest {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                route: path.to_owned(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
    }
    if let Err(error) = admit(state, api, &parts.headers) {
        return error.response(api, seq);
    }
    let knobs = match Knobs::read(&parts.headers, state) {
        Ok(knobs) => knobs,
        Err(error) => return error.response(api, seq),
    };
    match knobs.fault {
        Some(Fault::Stall) => std::future::pending::<()>().await,
        Some(Fault::SlowFirstByte(wait)) => tokio::time::sleep(wait).await,
        Some(Fault::Status(status)) => return status_fault(status).response(api, seq),
        Some(Fault::Garbage) => return garbage(&body),
        _ => {}
    }
    let reply = match dispatch(state, seq, parts, path, &body, &knobs) {
        Ok(reply) => reply,
        Err(error) => return error.response(api, seq),
    };
    state
        .served
        .answered(path, reply.status.is_success(), reply.work.as_ref());
    let body = match reply.answer {
        Answer::Json(json) => MockBody::buffered(json, knobs.cut()),
        Answer::Stream(script, error_event) => {
            let model = reply.work.map(|work| work.model).unwrap_or_default();
            MockBody::stream(script, error_event, &knobs, state, model)
        }
    };
    respond(reply.status, reply.content_type, body)
}

/// The upstream key, in the provider's header, and Anthropic's required
/// `anthropic-version`.
fn admit(state: &State, api: Api, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(key) = &state.opts.require_key {
        match api {
            Api::OpenAi => check_bearer(headers, key)?,
            Api::Anthropic => anthropic::check_key(headers, key)?,
        }
    }
    if api == Api::Anthropic {
        anthropic::check_version(headers)?;
    }
    Ok(())
}

fn check_bearer(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    let Some(given) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
            None,
        ));
    };
    let given = given.to_str().unwrap_or("");
    if given.strip_prefix("Bearer ") == Some(key) {
        return Ok(());
    }
    Err(ApiError::unauthorized(
        "Incorrect API key provided.".into(),
        Some("invalid_api_key"),
    ))
}

/// The endpoints, by normalised path and method.
fn dispatch(
    state: &Arc<State>,
    seq: u64,
    parts: &Parts,
    path: &str,
    body: &Bytes,
    knobs: &Knobs,
) -> Result<Reply, ApiError> {
    let method = &parts.method;
    let get = method == Method::GET;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(ApiError::not_found(method, path));
    };
    // `name/{id}` with a single id segment.
    let id_of = |prefix: &str| {
        rest.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|id| !id.is_empty() && !id.contains('/'))
    };
    let json = || parse_object(body);
    match rest {
        "chat/completions" if post => openai::chat(seq, &json()?, knobs),
        "completions" if post => openai::completions(seq, &json()?, knobs),
        "embeddings" if post => openai::embeddings(&json()?),
        "responses" if post => responses::create(state, seq, &json()?, knobs),
        "models" if get => Ok(openai::models(state, &parts.headers)),
        "audio/transcriptions" if post => objects::transcription(&parts.headers, body, knobs),
        "files" if get => Ok(objects::list_files(state)),
        "files" if post => objects::create_file(state, seq, &parts.headers, body),
        "batches" if get => Ok(objects::list_batches(state)),
        "batches" if post => objects::create_batch(state, seq, &json()?),
        "messages" if post => anthropic::messages(seq, &json()?, knobs),
        "messages/count_tokens" if post => anthropic::count_tokens(&json()?),
        "chat/completions"
        | "completions"
        | "embeddings"
        | "responses"
        | "models"
        | "audio/transcriptions"
        | "files"
        | "batches"
        | "messages"
        | "messages/count_tokens" => Err(not_allowed(method, path)),
        _ => {
            if let Some(id) = id_of("models") {
                return match get {
                    true => openai::model(state, id),
                    false => Err(not_allowed(method, path)),
                };
            }
            if let Some(id) = id_of("responses") {
                return match () {
                    () if get => objects::get_response(state, id),
                    () if delete => objects::delete_response(state, id),
                    () => Err(not_allowed(method, path)),
                };
            }
            if let Some(id) = id_of("files") {
                return match () {
                    () if get => objects::get_file(state, id),
                    () if delete => objects::delete_file(state, id),
                    () => Err(not_allowed(method, path)),
                };
            }
            if let Some(id) = rest
                .strip_prefix("files/")
                .and_then(|r| r.strip_suffix("/content"))
                .filter(|id| !id.is_empty() && !id.contains('/'))
            {
                return match get {
                    true => objects::file_content(state, id),
                    false => Err(not_allowed(method, path)),
                };
            }
            if let Some(id) = id_of("batches") {
                return match get {
                    true => objects::get_batch(state, id),
                    false => Err(not_allowed(method, path)),
                };
            }
            Err(ApiError::not_found(method, path))
        }
    }
}

fn not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(format!("Invalid method for URL ({method} {path})"), None)
    }
}

/// 200 with the expected content type and a body that is neither JSON nor SSE.
fn garbage(body: &Bytes) -> Response<MockBody> {
    let streamed = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|request| request.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    let content_type = if streamed {
        SSE_CONTENT_TYPE
    } else {
        JSON_CONTENT_TYPE
    };
    let junk = Bytes::from_static(
        b"<html><body>502 upstream hiccup</body></html>\r\n\x00\xff{\"id\":\"chatcmpl-\x7f,,usage:{{\ndata: {not json\n\n",
    );
    respond(StatusCode::OK, content_type, MockBody::buffered(junk, None))
}

pub(crate) fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "The request body must be a JSON object.".into(),
            None,
        )),
        Err(error) => Err(ApiError {
            code: Some("invalid_json"),
            ..ApiError::invalid(
                format!("We could not parse the JSON body of your request. ({error})"),
                None,
            )
        }),
    }
}
