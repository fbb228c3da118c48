//! What a request's answer tells its connection. HTTP/1.1 keeps a connection open for the
//! next request only if the server read this request's body to its end: hyper closes the
//! connection when a body is left unread (it cannot find where the next request starts),
//! and it may already have written the answer's headers by then, without
//! `Connection: close`. A client pool would then send its next request into a closed socket
//! and lose it. So every answer to a request whose body was not read to the end says
//! `Connection: close`, and the refusals made before a body is needed (401, 429) read and
//! discard a small body first, so that the connection stays usable.
//!
//! A server that is stopping refuses new requests here too (503 `shutting_down`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, SizeHint};

use super::error::kinds;
use super::{ApiError, AppState};

/// A refusal reads and discards a body of at most this many bytes to keep the connection.
pub const DISCARD_BODY_BYTES_MAX: usize = 64 * 1024;
/// ... and waits at most this long for it.
pub const DISCARD_BODY_WAIT: Duration = Duration::from_secs(1);

/// Outermost layer: tracks whether the request body is read to its end, and adds
/// `Connection: close` to the answer when it was not.
pub(crate) async fn close_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let done = Arc::new(AtomicBool::new(hyper::body::Body::is_end_stream(&body)));
    let tracked = Tracked {
        inner: body,
        done: done.clone(),
    };
    let mut response = next
        .run(Request::from_parts(parts, Body::new(tracked)))
        .await;
    // Acquire pairs with the Release of the body's last read, which happened before the
    // handler answered.
    if !done.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and discards the body of a request that is refused before its body is needed, if
/// it is small and arrives quickly, so that the connection stays open for the next request
/// (otherwise [`close_unread`] closes it).
pub(crate) async fn discard_body(request: Request) {
    let body = request.into_body();
    let small = hyper::body::Body::size_hint(&body)
        .upper()
        .is_some_and(|upper| upper <= DISCARD_BODY_BYTES_MAX as u64);
    if small {
        let read = axum::body::to_bytes(body, DISCARD_BODY_BYTES_MAX);
        let _ = tokio::time::timeout(DISCARD_BODY_WAIT, read).await;
    }
}

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

/// A request body that records when it has been read to its end.
struct Tracked {
    inner: Body,
    done: Arc<AtomicBool>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if ended {
            self.done.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
