//! Reading the request fields every endpoint shares, with OpenAI's errors
//! for missing or mistyped ones.

use serde_json::{Map, Value};

use crate::error::ApiError;

pub(crate) fn model_name(request: &Map<String, Value>) -> Result<&str, ApiError> {
    match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        None | Some(Value::Null) => Err(ApiError::invalid(
            "you must provide a model parameter".into(),
            Some("model"),
        )),
        Some(_) => Err(ApiError::wrong_type("model", "a non-empty string")),
    }
}

pub(crate) fn flag(request: &Map<String, Value>, name: &'static str) -> Result<bool, ApiError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ApiError::wrong_type(name, "a boolean")),
    }
}

/// `stream_options.include_usage`; like OpenAI, `stream_options` without
/// `stream` is an error (a gateway that injects it must check `stream`).
pub(crate) fn include_usage(request: &Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    match request.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.".into(),
            Some("stream_options"),
        )),
        Some(Value::Object(options)) => flag(options, "include_usage"),
        Some(_) => Err(ApiError::wrong_type("stream_options", "an object")),
    }
}

/// The lowest of the given output bounds that are present.
pub(crate) fn max_tokens(
    request: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<u64>, ApiError> {
    let mut bound: Option<u64> = None;
    for &name in names {
        match request.get(name) {
            None | Some(Value::Null) => {}
            Some(value) => match (value.as_u64(), value.as_i64()) {
                (Some(n), _) if n >= 1 => bound = Some(bound.map_or(n, |b| b.min(n))),
                // 0 or negative
                (_, Some(_)) => {
                    return Err(ApiError {
                        code: Some("integer_below_min_value"),
                        ..ApiError::invalid(
                            format!(
                                "Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead."
                            ),
                            Some(name),
                        )
                    });
                }
                _ => return Err(ApiError::wrong_type(name, "an integer")),
            },
        }
    }
    Ok(bound)
}
