//! The console's stylesheet and script: embedded in the binary, served
//! under names carrying a hash of their content, cached for a year.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file.
#[derive(Debug)]
pub(crate) struct Asset {
    /// The name it is served under: `console.<hash>.css`.
    pub file: String,
    content_type: &'static str,
    body: &'static str,
}

impl Asset {
    fn new(stem: &str, ext: &str, content_type: &'static str, body: &'static str) -> Asset {
        let digest = tally_core::secret::hash_secret(body);
        let hash: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Asset {
            file: format!("{stem}.{hash}.{ext}"),
            content_type,
            body,
        }
    }

    /// Where a page links it.
    pub(crate) fn url(&self) -> String {
        format!("/console/assets/{}", self.file)
    }
}

pub(crate) static CSS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "console",
        "css",
        "text/css; charset=utf-8",
        include_str!("../../assets/console.css"),
    )
});

pub(crate) static JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "console",
        "js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console.js"),
    )
});

/// `GET /console/assets/{file}`: an asset by its hashed name; any other
/// name (an old hash included) is a 404.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    for asset in [&*CSS, &*JS] {
        if asset.file == file {
            return (
                [
                    (header::CONTENT_TYPE, asset.content_type),
                    (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
                ],
                asset.body,
            )
                .into_response();
        }
    }
    (StatusCode::NOT_FOUND, "no such asset").into_response()
}
