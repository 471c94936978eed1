//! The page, its style sheet, script and icon, compiled into the binary.

use axum::extract::Path;
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};

use super::api::not_found;

const INDEX_HTML: &str = include_str!("assets/index.html");

/// `(name, content type, bytes)` of everything under `/assets/`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "kiosk.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/kiosk.css"),
    ),
    (
        "kiosk.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/kiosk.js"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("assets/icon.svg"),
    ),
];

/// The browser may load nothing but this server's own files: a kiosk stays
/// usable (and private) without any network.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(super) async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page is tiny; always fetching it keeps it in step with the binary.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

pub(super) async fn asset(Path(file): Path<String>, uri: Uri) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => not_found(uri).await.into_response(),
    }
}
