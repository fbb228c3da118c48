//! What a stopping server answers: every request that arrives after the stop began is
//! refused here (503 `shutting_down`), so that a client can tell a stop from load.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::kinds;
use super::{ApiError, AppState};

/// Inside authentication: a server that has begun to stop answers every request but
/// `/healthz` with 503 `shutting_down` (and closes the connection), so that a client can
/// tell a stop from load and retry elsewhere. Requests already running finish.
pub(crate) async fn refuse_when_stopping(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.is_stopping() && request.uri().path() != "/healthz" {
        let mut response =
            ApiError::of(kinds::SHUTTING_DOWN, "the server is shutting down").into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    next.run(request).await
}
