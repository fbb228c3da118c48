//! `GET /v1/events`: the committed transactions of all accounts in commit order, as JSON
//! pages (with an optional long poll) or as Server-Sent Events. See `engine/events.rs` for
//! where they come from; this module parses the query, picks the representation, and
//! counts consumers and deliveries for `/metrics`.

use std::convert::Infallible;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::dto::{cursor, EventJson, EventsQuery, TransactionJson};
use super::guard::RequestDeadline;
use super::{json, list_limit, parse_query, ApiError, ApiResult, AppState};
use crate::domain::{AccountId, TxKind};
use crate::engine::{Engine, EngineError, EventFilter, EventPage};

/// `wait_ms` may be at most this (30 s).
pub const EVENTS_WAIT_MS_MAX: u64 = 30_000;
/// How long one wait of a Server-Sent Events stream lasts before a keep-alive comment.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// A long poll answers this long before the request timeout would cut it.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);
/// Encoded SSE chunks queued for a slow client before the reader waits for it.
const SSE_QUEUE_CHUNKS: usize = 4;
/// The `field` of a problem about the `Last-Event-ID` header.
const LAST_EVENT_ID: &str = "header:Last-Event-ID";

/// Counters of the event stream for `/metrics`.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Long polls waiting and SSE streams open now.
    pub consumers: AtomicU64,
    /// Events sent, in pages and streams.
    pub delivered: AtomicU64,
}

/// Counts a consumer while it lives.
struct Consumer<'a>(&'a AtomicU64);

impl<'a> Consumer<'a> {
    fn new(count: &'a AtomicU64) -> Consumer<'a> {
        // Relaxed: a gauge for /metrics, no ordering with anything else.
        count.fetch_add(1, Ordering::Relaxed);
        Consumer(count)
    }
}

impl Drop for Consumer<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request asks for, parsed and validated.
struct Ask {
    after: Option<u64>,
    /// Where `after` came from (`query:after` or the `Last-Event-ID` header), for a
    /// problem about it.
    after_field: &'static str,
    limit: usize,
    wait: Duration,
    filter: EventFilter,
    sse: bool,
}

/// Read committed transactions of all accounts in commit order
///
/// Committed (durable) transactions of all accounts in commit (log) order, each with an
/// opaque `cursor`. Pass `next` as `after` to continue; an empty page returns the same
/// position back, so a consumer simply polls again. `wait_ms` long-polls until an event
/// commits or the time is up. With `Accept: text/event-stream` the same events come as
/// Server-Sent Events (`id:` the cursor, `data:` the event JSON), resumable with
/// `Last-Event-ID`. Delivery is at least once: de-duplicate by `transaction.id`. Account
/// creation is not a transaction and is not an event. Events stay readable while their WAL
/// segments are kept (`--event-retention` after a snapshot covers them); an older cursor is
/// 410 `cursor_expired`, never a silent gap.
#[utoipa::path(get, path = "/v1/events", operation_id = "listEvents", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "With `Accept: text/event-stream`: resume after this cursor (takes the place of `after`).", pattern = "^e[0-9a-f]{16}$"),
    ),
    responses(
        (status = 200, description = "One page of events (or, with `Accept: text/event-stream`, an endless stream of them: `id: CURSOR` and `data: Event JSON` per event, `: keep-alive` comments while idle, and an `event: error` with a Problem body that ends the stream).",
            content(
                (PageJson = "application/json"),
                (String = "text/event-stream"),
            )),
        EventsProblems,
    ))]
pub(crate) async fn get_events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    deadline: Option<Extension<RequestDeadline>>,
) -> ApiResult {
    let ask = parse_ask(query.as_deref(), &headers)?;
    let engine = state.ready()?.clone();
    if ask.sse {
        return sse(state, engine, ask).await;
    }
    // A long poll ends before the request timeout would answer 503 in its place.
    let mut wait = ask.wait;
    if let Some(Extension(RequestDeadline(at))) = deadline {
        let left = at.saturating_duration_since(tokio::time::Instant::now().into_std());
        wait = wait.min(left.saturating_sub(DEADLINE_MARGIN));
    }
    let stats = &state.inner.events;
    let _consumer = Consumer::new(&stats.consumers);
    let mut stopping = state.stopping();
    let page = tokio::select! {
        page = engine.events(ask.after, ask.limit, &ask.filter, wait) => page.map_err(|e| ask.problem(e))?,
        _ = stopping.wait_for(|stop| *stop) => return Err(EngineError::ShuttingDown.into()),
    };
    stats
        .delivered
        .fetch_add(page.events.len() as u64, Ordering::Relaxed);
    Ok(json(StatusCode::OK, &PageJson::from(&page)))
}

/// A page of the event stream.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = EventPage)]
pub(crate) struct PageJson<'a> {
    /// At most `limit` events, in commit order.
    #[schema(max_items = 1000)]
    events: Vec<EventJson<'a>>,
    /// Pass as `after` next time: the same cursor back when there was nothing new.
    #[schema(schema_with = super::schema::event_cursor)]
    next: String,
}

super::openapi::problems!(
    EventsProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        CURSOR_EXPIRED,
        RATE_LIMITED,
        INTERNAL_ERROR,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

impl<'a> From<&'a EventPage> for PageJson<'a> {
    fn from(page: &'a EventPage) -> PageJson<'a> {
        PageJson {
            events: page
                .events
                .iter()
                .map(|(lsn, tx)| EventJson {
                    cursor: cursor::encode(*lsn),
                    transaction: TransactionJson::from(tx),
                })
                .collect(),
            next: cursor::encode(page.next),
        }
    }
}

fn parse_ask(query: Option<&str>, headers: &HeaderMap) -> Result<Ask, ApiError> {
    let query: EventsQuery = parse_query(query)?;
    let limit = list_limit(query.limit.as_deref())?;
    let wait_ms = match query.wait_ms.as_deref() {
        None => 0,
        Some(text) => Some(text)
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()) && t.len() <= 5)
            .and_then(|t| u64::from_str(t).ok())
            .filter(|ms| *ms <= EVENTS_WAIT_MS_MAX)
            .ok_or_else(|| {
                ApiError::invalid_at(
                    "query:wait_ms",
                    format!("wait_ms must be an integer in 0..={EVENTS_WAIT_MS_MAX}"),
                )
            })?,
    };
    let account = match query.account.as_deref() {
        None => None,
        Some(text) => Some(
            AccountId::parse(text).map_err(|e| ApiError::invalid_at("query:account", e.reason))?,
        ),
    };
    let kind = match query.kind.as_deref() {
        None => None,
        Some(text) => Some(TxKind::parse(text).ok_or_else(|| {
            let kinds: Vec<&str> = TxKind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::invalid_at(
                "query:kind",
                format!("kind must be one of {}", kinds.join(", ")),
            )
        })?),
    };
    let mut after =
        match query.after.as_deref() {
            None => None,
            Some(text) => Some(cursor::decode(text).ok_or_else(|| {
                ApiError::invalid_at("query:after", "after is not a valid cursor")
            })?),
        };
    let mut after_field = "query:after";
    let sse = accepts_event_stream(headers);
    if sse {
        // A reconnecting EventSource resumes after the last event it received.
        if let Some(value) = headers.get("last-event-id") {
            let text = value.to_str().map_err(|_| {
                ApiError::invalid_at(LAST_EVENT_ID, "Last-Event-ID is not a valid cursor")
            })?;
            if !text.is_empty() {
                after_field = LAST_EVENT_ID;
                after = Some(cursor::decode(text).ok_or_else(|| {
                    ApiError::invalid_at(LAST_EVENT_ID, "Last-Event-ID is not a valid cursor")
                })?);
            }
        }
    }
    Ok(Ask {
        after,
        after_field,
        limit,
        wait: Duration::from_millis(wait_ms),
        filter: EventFilter { account, kind },
        sse,
    })
}

impl Ask {
    /// The answer to a failed read: a cursor past the end of the log is named where the
    /// client gave it.
    fn problem(&self, error: EngineError) -> ApiError {
        let problem = ApiError::from(error);
        if problem.field() == Some("query:after") {
            problem.at(self.after_field)
        } else {
            problem
        }
    }
}

/// Whether the client asks for `text/event-stream` (and not only for JSON).
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let media = item.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("text/event-stream")
        })
}

/// Answers with a Server-Sent Events stream. The first read happens before the answer, so a
/// bad or expired cursor is an ordinary error response; later pages stream as they commit.
async fn sse(state: AppState, engine: Engine, ask: Ask) -> ApiResult {
    let first = engine
        .events(ask.after, ask.limit, &ask.filter, Duration::ZERO)
        .await
        .map_err(|e| ask.problem(e))?;
    let (tx, rx) = mpsc::channel::<Bytes>(SSE_QUEUE_CHUNKS);
    tokio::spawn(stream_events(state, engine, ask, first, tx));
    let mut response = Response::new(Body::new(SseBody { rx }));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Feeds an SSE stream until the client goes away, the server stops or a read fails. A stop
/// or a failure sends an `error` event with the problem body (503 `shutting_down` for a
/// stop) before the stream ends, so the client can tell it from a dropped connection; it
/// reconnects with `Last-Event-ID`.
async fn stream_events(
    state: AppState,
    engine: Engine,
    ask: Ask,
    first: EventPage,
    tx: mpsc::Sender<Bytes>,
) {
    let stats = &state.inner.events;
    let _consumer = Consumer::new(&stats.consumers);
    let mut stopping = state.stopping();
    let mut page = first;
    loop {
        let chunk = sse_chunk(&page);
        let count = page.events.len() as u64;
        if tx.send(chunk).await.is_err() {
            return;
        }
        stats.delivered.fetch_add(count, Ordering::Relaxed);
        let next = Some(page.next);
        let read = tokio::select! {
            read = engine.events(next, ask.limit, &ask.filter, SSE_KEEPALIVE) => read,
            _ = stopping.wait_for(|stop| *stop) => Err(EngineError::ShuttingDown),
        };
        page = match read {
            Ok(page) => page,
            Err(error) => {
                let body = ask.problem(error).body();
                let _ = tx
                    .send(Bytes::from(format!("event: error\ndata: {body}\n\n")))
                    .await;
                return;
            }
        };
    }
}

/// The SSE text of a page: one event per transaction, `id:` its cursor; a comment when the
/// page is empty (a keep-alive through proxies).
fn sse_chunk(page: &EventPage) -> Bytes {
    if page.events.is_empty() {
        return Bytes::from_static(b": keep-alive\n\n");
    }
    let mut out = Vec::with_capacity(page.events.len() * 400);
    for (lsn, tx) in &page.events {
        let event = EventJson {
            cursor: cursor::encode(*lsn),
            transaction: TransactionJson::from(tx),
        };
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(event.cursor.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // JSON from serde_json has no raw newline, so one data line holds it.
        if serde_json::to_writer(&mut out, &event).is_err() {
            tracing::error!("event serialization failed");
        }
        out.extend_from_slice(b"\n\n");
    }
    Bytes::from(out)
}

/// A response body fed by a channel of chunks; it ends when the sender is dropped.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
