//! The JSON endpoints: submit, look up and cancel jobs, list models and
//! stored pictures, and serve a stored picture.
//!
//! Errors carry the same `{"code", "message", "field"}` object as a failed
//! MQTT result, under `"error"`, with an HTTP status derived from the code.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{events, gallery, AppState};
use crate::daemon::intake;
use crate::mqtt::messages::{ErrorBody, ErrorCode};

/// Gallery size when `limit` is not given.
const DEFAULT_IMAGES: usize = 24;
/// Upper bound of `limit`: each entry costs a sidecar read.
pub(super) const MAX_IMAGES: usize = 200;

/// An error answer: the MQTT error object and its HTTP status.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        ApiError::from(ErrorBody::invalid_field(field, reason))
    }

    fn not_found(field: Option<&str>, message: String) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody {
                code: ErrorCode::InvalidRequest,
                message,
                field: field.map(str::to_string),
            },
        }
    }

    fn internal(message: String) -> Self {
        ApiError::from(ErrorBody::new(ErrorCode::Internal, message))
    }
}

impl From<ErrorBody> for ApiError {
    fn from(body: ErrorBody) -> Self {
        ApiError {
            status: status_for(body.code),
            body,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.body }))).into_response()
    }
}

/// The request's fault → 400; a full queue → 429; the daemon's state
/// (stopping, disk full, broken model, internal error) → 503.
pub(super) fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest | ErrorCode::UnknownModel | ErrorCode::TooLarge => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Busy => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Cancelled
        | ErrorCode::StorageFull
        | ErrorCode::ModelError
        | ErrorCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Refuses state-changing requests that another web site's page makes
/// through the visitor's browser (which marks them with its `Origin`).
/// Clients that send no `Origin` (curl, scripts) are not browsers' pages.
fn check_same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if origin_host.is_some() && origin_host == host {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::FORBIDDEN,
        body: ErrorBody::new(
            ErrorCode::InvalidRequest,
            "requests from other web sites' pages are refused",
        ),
    })
}

pub(super) fn check_job_id(id: &str) -> Result<(), ApiError> {
    intake::check_id(id).map_err(|reason| ApiError::invalid("id", reason))
}

pub(super) fn unknown_job(id: &str) -> ApiError {
    ApiError::not_found(
        Some("id"),
        format!("id: no job '{id}' is queued, running, recently failed or stored"),
    )
}

/// `POST /api/generate`: the body is an MQTT request (JSON or a bare prompt).
pub(super) async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_same_origin(&headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::from(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "payload is over the limit of {} bytes",
                    state.limits.max_payload_bytes
                ),
            ))
        } else {
            ApiError::invalid("payload", rejection.body_text())
        }
    })?;
    let id = state.gateway.submit(body.to_vec()).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}

/// `GET /api/jobs/{id}`: the latest status, or the result once finished.
pub(super) async fn job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_job_id(&id)?;
    let event = state
        .gateway
        .lookup(&id)
        .await
        .ok_or_else(|| unknown_job(&id))?;
    Ok(Json(events::event_json(&event, &state.output_dir)))
}

/// `POST /api/jobs/{id}/cancel`: like the MQTT cancel message; the job's
/// result (state `cancelled`) follows on its event stream.
pub(super) async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_same_origin(&headers)?;
    check_job_id(&id)?;
    state.gateway.cancel(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}

/// `GET /api/models`: the retained MQTT `models` message, plus the limits
/// the page needs to offer sensible choices.
pub(super) async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let source = state.models.clone();
    // Reads every bundle's manifest from disk.
    let message = tokio::task::spawn_blocking(move || source())
        .await
        .map_err(|err| ApiError::internal(format!("listing models: {err}")))?;
    let mut value = serde_json::to_value(&message)
        .map_err(|err| ApiError::internal(format!("encoding the models list: {err}")))?;
    if let Value::Object(map) = &mut value {
        let limits = &state.limits;
        map.insert(
            "limits".into(),
            json!({
                "max_steps": limits.max_steps,
                "max_pixels": limits.max_pixels,
                "max_prompt_chars": limits.max_prompt_chars,
                "queue": limits.queue,
            }),
        );
    }
    Ok(Json(value))
}

#[derive(Deserialize)]
pub(super) struct ImagesQuery {
    limit: Option<String>,
}

/// `GET /api/images?limit=N`: the newest stored pictures with their parameters.
pub(super) async fn images(
    State(state): State<AppState>,
    query: Result<Query<ImagesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::invalid("query", rejection))?;
    let limit = parse_limit(query.limit.as_deref())?;
    let output_dir = state.output_dir.clone();
    let listed = tokio::task::spawn_blocking(move || gallery::recent(&output_dir, limit))
        .await
        .map_err(|err| ApiError::internal(format!("listing pictures: {err}")))?
        .map_err(|err| ApiError::internal(format!("listing pictures: {err:#}")))?;
    Ok(Json(json!({ "images": listed })))
}

fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_IMAGES);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_IMAGES).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            "limit",
            format!("must be a whole number from 1 to {MAX_IMAGES}, got '{text}'"),
        )),
    }
}

/// `GET /images/{date}/{id}.png`: a stored picture. Only a validated date
/// folder and id ever reach the file system.
pub(super) async fn image_file(
    State(state): State<AppState>,
    Path((date, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = gallery::picture_path(&state.output_dir, &date, &file)
        .map_err(|(field, reason)| ApiError::invalid(field, reason))?;
    match tokio::fs::read(&path).await {
        Ok(png) => Ok((
            [
                (header::CONTENT_TYPE, "image/png"),
                // A stored picture never changes under its name.
                (header::CACHE_CONTROL, "private, max-age=86400"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            png,
        )
            .into_response()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(ApiError::not_found(
            None,
            format!("no stored picture {date}/{file}"),
        )),
        Err(err) => Err(ApiError::internal(format!("reading {date}/{file}: {err}"))),
    }
}

pub(super) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(None, format!("nothing at {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_http_statuses() {
        assert_eq!(status_for(ErrorCode::InvalidRequest), 400);
        assert_eq!(status_for(ErrorCode::UnknownModel), 400);
        assert_eq!(status_for(ErrorCode::TooLarge), 400);
        assert_eq!(status_for(ErrorCode::Busy), 429);
        assert_eq!(status_for(ErrorCode::StorageFull), 503);
        assert_eq!(status_for(ErrorCode::Internal), 503);
    }

    #[test]
    fn only_pages_of_this_server_may_post() {
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(name.clone(), value.parse().unwrap());
            }
            map
        };
        let host = (header::HOST, "127.0.0.1:8080");
        assert!(check_same_origin(&headers(std::slice::from_ref(&host))).is_ok());
        let same = (header::ORIGIN, "http://127.0.0.1:8080");
        assert!(check_same_origin(&headers(&[host.clone(), same])).is_ok());
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
            let err =
                check_same_origin(&headers(&[host.clone(), (header::ORIGIN, origin)])).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{origin}");
        }
    }

    #[test]
    fn limit_is_bounded() {
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_IMAGES);
        assert_eq!(parse_limit(Some("5")).unwrap(), 5);
        for bad in ["0", "201", "-1", "ten", ""] {
            let err = parse_limit(Some(bad)).unwrap_err();
            assert_eq!(err.body.field.as_deref(), Some("limit"), "{bad}");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
    }
}
