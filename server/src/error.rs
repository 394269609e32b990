//! Errors as OpenAI's clients expect them: the status code, and `{"error": {"message", "type",
//! "param", "code"}}` — 400 for a bad field (named in `param`), 401 for a bad or missing API key,
//! 404 for an unknown model, 413 for a body over the limit, 429 when the queue is full (with
//! `Retry-After`), 503 while the engine loads or the server drains, 500 for a failure of fastkv's.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match param {
            Some(p) => format!("invalid {p}: {message}"),
            None => message,
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key the server was \
                      started with (--api-key)"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn unknown_model(asked: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{asked}` does not exist here; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than {limit} bytes (--max-body-bytes)"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// A library error: a bad value is the client's (400, naming its field under `prefix`), a full
    /// queue a retryable 429, shutting down a 503, anything else the server's (500).
    pub fn from_library(e: &fastkv::Error, prefix: Option<&str>) -> Self {
        match e {
            fastkv::Error::InvalidArgument { field, .. } => {
                let param = match prefix {
                    Some(p) => format!("{p}.{field}"),
                    None => field.to_string(),
                };
                ApiError { param: Some(param), ..ApiError::invalid(None, e.to_string()) }
            }
            fastkv::Error::Tokenizer(_) | fastkv::Error::Unsupported { .. } => ApiError::invalid(None, e.to_string()),
            fastkv::Error::QueueFull { .. } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            fastkv::Error::ShuttingDown => ApiError::unavailable(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
