//! The HTTP API of `docs/API.md`: routes, parsing and answers. The only module that knows
//! about JSON. Parsing follows the API's order of errors: 413, then 400 (path, body, query,
//! key format), then 400 `idempotency_key_missing`; everything after that (404 account,
//! idempotency, 422 validation, holds, funds) is decided by the engine in the same order.

mod conn;
pub mod dto;
pub mod error;
pub mod events;
pub mod guard;
mod metrics;
pub mod openapi;
pub mod schema;

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{
    AccountId, Currency, HoldStatus, IdempotencyKey, Metadata, Receipt, Request, TransferRecord,
    TransferStatus, TxKind, AMOUNT_MAX,
};
use crate::engine::{Engine, Executed};
pub use conn::{DISCARD_BODY_BYTES_MAX, DISCARD_BODY_WAIT};
use dto::*;
pub use error::ApiError;
pub use guard::{GuardConfig, RateLimit, Tokens};
pub use metrics::HttpStats;
use openapi::problems;

/// Request bodies are limited to 64 KiB (65,536 bytes is accepted, one more is 413).
pub const HTTP_BODY_BYTES_MAX: usize = 64 * 1024;
/// List endpoints return at most this many items per page.
pub const LIST_LIMIT_MAX: usize = 1000;
/// `POST /v1/batch` bodies are limited to 1 MiB.
pub const BATCH_BODY_BYTES_MAX: usize = 1024 * 1024;
/// A batch carries at most this many operations.
pub const BATCH_OPERATIONS_MAX: usize = 1000;
/// Page size when `limit` is not given.
pub const LIST_LIMIT_DEFAULT: usize = 100;

/// Shared state of the HTTP layer. The engine is set once recovery is done; until then
/// every endpoint but `/healthz`, `/readyz` and `/metrics` answers 503 `not_ready`.
#[derive(Clone, Default)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    engine: OnceLock<Engine>,
    stats: HttpStats,
    events: events::EventStats,
    /// Set when the server stops: long polls and event streams end at once.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Default for AppInner {
    fn default() -> AppInner {
        AppInner {
            engine: OnceLock::new(),
            stats: HttpStats::default(),
            events: events::EventStats::default(),
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl AppState {
    /// A state with no engine yet (recovering).
    pub fn new() -> AppState {
        AppState::default()
    }

    /// Marks recovery as done.
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.inner.engine.set(engine);
    }

    /// Ends long polls and event streams (the server is stopping).
    pub fn begin_stop(&self) {
        self.inner.stopping.send_replace(true);
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.stopping.subscribe()
    }

    fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// The engine, once ready.
    pub fn engine(&self) -> Option<&Engine> {
        self.inner.engine.get()
    }

    fn ready(&self) -> Result<&Engine, ApiError> {
        self.engine().ok_or_else(ApiError::not_ready)
    }
}

/// How the router is guarded and what it serves.
#[derive(Debug, Clone, Default)]
pub struct RouterConfig {
    /// Authentication, rate limit and request timeout.
    pub guard: GuardConfig,
    /// Leave `/metrics` out (it is served on its own listener, see [`metrics_router`]).
    pub metrics_elsewhere: bool,
}

/// The router of every endpoint, without authentication or rate limit.
pub fn router(state: AppState) -> Router {
    router_with(state, RouterConfig::default())
}

/// The router of every endpoint, guarded as `config` says: `Connection: close` when a body
/// is left unread, request id, then counting (so 401 and 429 are counted too), then
/// authentication, then rate limit, then timeout, then 503 `shutting_down` once the server
/// stops, then the routes.
pub fn router_with(state: AppState, config: RouterConfig) -> Router {
    let routes = routes(!config.metrics_elsewhere).into_router();
    let guard = guard::Guard::new(config.guard);
    routes
        .route_layer(axum::middleware::from_fn(metrics::mark_route))
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            conn::refuse_when_stopping,
        ))
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count,
        ))
        .layer(axum::middleware::from_fn(guard::request_id))
        .layer(axum::middleware::from_fn(conn::close_unread))
        .with_state(state)
}

/// Every route, each with its documentation: the one list the router and the OpenAPI
/// document are both made from. Add a route here, with a `#[utoipa::path]` on its handler.
fn routes(with_metrics: bool) -> openapi::Routes {
    let routes = openapi::Routes::new()
        .add::<__path_put_account, _, _>(put_account)
        .add::<__path_get_account, _, _>(get_account)
        .add::<__path_post_credit, _, _>(post_credit)
        .add::<__path_post_debit, _, _>(post_debit)
        .add::<__path_post_hold, _, _>(post_hold)
        .add::<__path_list_holds, _, _>(list_holds)
        .add::<__path_get_hold, _, _>(get_hold)
        .add::<__path_post_capture, _, _>(post_capture)
        .add::<__path_post_release, _, _>(post_release)
        .add::<__path_list_transactions, _, _>(list_transactions)
        .add::<__path_get_idempotency_key, _, _>(get_idempotency_key)
        .add::<__path_post_transfer, _, _>(post_transfer)
        .add::<__path_get_transfer, _, _>(get_transfer)
        .add::<__path_post_batch, _, _>(post_batch)
        .add::<events::__path_get_events, _, _>(events::get_events)
        .add::<__path_healthz, _, _>(healthz)
        .add::<__path_readyz, _, _>(readyz)
        .add::<__path_openapi, _, _>(openapi);
    if with_metrics {
        routes.add::<metrics::__path_render, _, _>(metrics::render)
    } else {
        routes
    }
}

/// Every route the main router serves (with `/metrics`), with its methods, as registered.
pub fn route_table() -> Vec<openapi::RouteDoc> {
    routes(true).table().to_vec()
}

/// The OpenAPI 3.1 document served at `GET /openapi.json`.
pub fn openapi_json() -> &'static str {
    openapi::document_json()
}

/// The router of a separate metrics listener: `/metrics` only, without authentication.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::render))
        .fallback(|| async { ApiError::no_route() })
        .layer(axum::middleware::from_fn(guard::request_id))
        .layer(axum::middleware::from_fn(conn::close_unread))
        .with_state(state)
}

type ApiResult = Result<Response, ApiError>;

/// The `{id}` path parameter, as every account endpoint documents it.
const ACCOUNT_ID_DOC: &str = "Account id. A malformed id is 400 invalid_request.";
/// The `Idempotency-Key` header, as every endpoint that moves money documents it.
const IDEMPOTENCY_KEY_DOC: &str = "1..=255 visible ASCII characters, scoped to the account in the path (for a transfer, to `from`). The same key with the same request (method, path and parsed body) returns the original answer with `Idempotent-Replayed: true`; with a different request it is 422 idempotency_key_reused. Only successes are remembered. Absent: 400 idempotency_key_missing; malformed or given twice: 400 invalid_request.";

problems!(
    PutAccountProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_EXISTS,
        PAYLOAD_TOO_LARGE,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Create an account (or confirm it exists)
///
/// Creates the account with seq 0. Repeating the PUT with the same `currency` and
/// `overdraft_limit` answers 200 with the account as it is now; `metadata` is neither compared
/// nor changed by a repeated PUT (but it is still validated). Needs no Idempotency-Key: the
/// PUT itself is idempotent.
#[utoipa::path(put, path = "/v1/accounts/{id}", operation_id = "putAccount", tag = "accounts",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC)),
    request_body = AccountBody,
    responses(
        (status = 200, description = "The account already exists with the same currency and overdraft_limit.", body = AccountJson),
        (status = 201, description = "The account was created.", body = AccountJson),
        PutAccountProblems,
    ))]
async fn put_account(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let id = account_id(&path_param(path)?, "path:id")?;
    let body: AccountBody = parse_json(&bytes)?;
    let engine = state.ready()?;
    let currency = Currency::parse(&body.currency).map_err(ApiError::out_of_bounds)?;
    let overdraft_limit = match body.overdraft_limit {
        None => 0,
        Some(JsonInt(v)) if (0..=i128::from(AMOUNT_MAX)).contains(&v) => v as u64,
        Some(_) => {
            return Err(ApiError::validation(format!(
                "overdraft_limit must be an integer in 0..={AMOUNT_MAX}"
            ))
            .at("/overdraft_limit"))
        }
    };
    let metadata = Metadata::new(body.metadata).map_err(ApiError::out_of_bounds)?;
    let (created, view) = engine
        .open_account(id, currency, overdraft_limit, metadata)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &AccountJson::from(&view)))
}

problems!(
    GetAccountProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Read an account
#[utoipa::path(get, path = "/v1/accounts/{id}", operation_id = "getAccount", tag = "accounts",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC)),
    responses(
        (status = 200, description = "The account, as durable.", body = AccountJson),
        GetAccountProblems,
    ))]
async fn get_account(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = account_id(&path_param(path)?, "path:id")?;
    let view = state.ready()?.account(&id).await?;
    Ok(json(StatusCode::OK, &AccountJson::from(&view)))
}

problems!(
    CreditProblems = [
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        BALANCE_LIMIT_EXCEEDED,
        PAYLOAD_TOO_LARGE,
        IDEMPOTENCY_KEY_REUSED,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Credit an account
///
/// Adds `amount` to the balance: one `credit` transaction.
#[utoipa::path(post, path = "/v1/accounts/{id}/credits", operation_id = "postCredit", tag = "transactions",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body = MoveBody,
    responses(
        (status = 201, description = "Credited: the transaction and the account just after it. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = ReceiptJson, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        CreditProblems,
    ))]
async fn post_credit(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let id = account_id(&path_param(path)?, "path:id")?;
    let body: MoveBody = parse_json(&bytes)?;
    let request = Request::Credit {
        amount: body.amount.0,
        metadata: body.metadata,
    };
    execute(&state, &id, &headers, request).await
}

problems!(
    /// What a request that needs funds (a debit, a hold) can fail with.
    FundsProblems = [
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        INSUFFICIENT_FUNDS,
        PAYLOAD_TOO_LARGE,
        IDEMPOTENCY_KEY_REUSED,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Debit an account
///
/// Removes `amount` from the balance: one `debit` transaction. Needs
/// `amount <= available + overdraft_limit`.
#[utoipa::path(post, path = "/v1/accounts/{id}/debits", operation_id = "postDebit", tag = "transactions",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body = MoveBody,
    responses(
        (status = 201, description = "Debited: the transaction and the account just after it. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = ReceiptJson, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        FundsProblems,
    ))]
async fn post_debit(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let id = account_id(&path_param(path)?, "path:id")?;
    let body: MoveBody = parse_json(&bytes)?;
    let request = Request::Debit {
        amount: body.amount.0,
        metadata: body.metadata,
    };
    execute(&state, &id, &headers, request).await
}

/// Hold money
///
/// Reserves `amount` until it is captured, released or expires (`expires_in_secs`, default
/// 3600): one `hold` transaction. Needs `amount <= available + overdraft_limit`.
#[utoipa::path(post, path = "/v1/accounts/{id}/holds", operation_id = "postHold", tag = "holds",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body = HoldBody,
    responses(
        (status = 201, description = "Held: the hold, the transaction and the account just after it. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = HoldReceiptDoc, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        FundsProblems,
    ))]
async fn post_hold(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let id = account_id(&path_param(path)?, "path:id")?;
    let body: HoldBody = parse_json(&bytes)?;
    let request = Request::Hold {
        amount: body.amount.0,
        expires_in_secs: body.expires_in_secs.map(|v| v.0),
        metadata: body.metadata,
    };
    execute(&state, &id, &headers, request).await
}

problems!(
    CaptureProblems = [
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        HOLD_NOT_FOUND,
        HOLD_NOT_OPEN,
        PAYLOAD_TOO_LARGE,
        IDEMPOTENCY_KEY_REUSED,
        VALIDATION_FAILED,
        AMOUNT_EXCEEDS_HOLD,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Capture a hold
///
/// Turns the hold (or `amount` of it; the rest is released at once) into a debit: one
/// `capture` transaction. The hold ends `captured`. An empty body captures all of it.
#[utoipa::path(post, path = "/v1/accounts/{id}/holds/{hold_id}/capture", operation_id = "captureHold", tag = "holds",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("hold_id" = String, Path, format = Uuid, description = "Hold id (a UUID). Anything else is 400 invalid_request."), ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body(content = CaptureBody, description = "May be empty: the same as `{}`.", content_type = "application/json"),
    responses(
        (status = 200, description = "Captured: the hold, the transaction and the account just after it. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = HoldReceiptDoc, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        CaptureProblems,
    ))]
async fn post_capture(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let (id, hold_id) = path_param(path)?;
    let id = account_id(&id, "path:id")?;
    let hold_id = hold_id_param(&hold_id, "path:hold_id")?;
    let body: CaptureBody = parse_json_or_empty(&bytes)?;
    let request = Request::Capture {
        hold_id,
        amount: body.amount.map(|v| v.0),
        metadata: body.metadata,
    };
    execute(&state, &id, &headers, request).await
}

problems!(
    ReleaseProblems = [
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        HOLD_NOT_FOUND,
        HOLD_NOT_OPEN,
        PAYLOAD_TOO_LARGE,
        IDEMPOTENCY_KEY_REUSED,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Release a hold
///
/// Gives the held money back to `available`: one `release` transaction. The hold ends
/// `released`. An empty body is the same as `{}`.
#[utoipa::path(post, path = "/v1/accounts/{id}/holds/{hold_id}/release", operation_id = "releaseHold", tag = "holds",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("hold_id" = String, Path, format = Uuid, description = "Hold id (a UUID). Anything else is 400 invalid_request."), ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body(content = ReleaseBody, description = "May be empty: the same as `{}`.", content_type = "application/json"),
    responses(
        (status = 200, description = "Released: the hold, the transaction and the account just after it. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = HoldReceiptDoc, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        ReleaseProblems,
    ))]
async fn post_release(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let (id, hold_id) = path_param(path)?;
    let id = account_id(&id, "path:id")?;
    let hold_id = hold_id_param(&hold_id, "path:hold_id")?;
    let body: ReleaseBody = parse_json_or_empty(&bytes)?;
    let request = Request::Release {
        hold_id,
        metadata: body.metadata,
    };
    execute(&state, &id, &headers, request).await
}

/// The shared tail of every money-moving endpoint: key checks, then the engine.
async fn execute(
    state: &AppState,
    id: &AccountId,
    headers: &HeaderMap,
    request: Request,
) -> ApiResult {
    let key = idempotency_key(headers)?.ok_or_else(ApiError::key_missing)?;
    let engine = state.ready()?;
    let Executed { receipt, replayed } = engine.execute(id, Some(key), request).await?;
    let status = receipt_status(&receipt);
    let mut response = json(status, &ReceiptJson::from(&*receipt));
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

problems!(
    TransferProblems = [
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        INSUFFICIENT_FUNDS,
        CURRENCY_MISMATCH,
        BALANCE_LIMIT_EXCEEDED,
        PAYLOAD_TOO_LARGE,
        IDEMPOTENCY_KEY_REUSED,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Transfer money between two accounts
///
/// Debits `from` and credits `to` (a `transfer_out` and a `transfer_in` transaction), exactly
/// once. The Idempotency-Key is scoped to `from`. `from` equal to `to` is 422
/// validation_failed; an unknown `from` or `to` is 404; different currencies 409
/// currency_mismatch; in each case nothing moves. If the destination refuses after the source
/// was debited, the source is refunded and the answer is the refusal's error.
#[utoipa::path(post, path = "/v1/transfers", operation_id = "postTransfer", tag = "transfers",
    params(("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = IDEMPOTENCY_KEY_DOC)),
    request_body = TransferBody,
    responses(
        (status = 201, description = "Transferred: the transfer and both accounts just after their halves. On an idempotent replay the stored answer is returned again with `Idempotent-Replayed: true`.", body = TransferReceiptJson, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        (status = 202, description = "Still pending: the destination refused and so did the refund (credits during the transfer pushed the source to the balance limit); the next start finishes it.", body = TransferReceiptJson, headers(("Idempotent-Replayed" = String, description = "Present, with the value `true`, only when this answer replays an earlier request with the same Idempotency-Key."))),
        TransferProblems,
    ))]
async fn post_transfer(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(body, HTTP_BODY_BYTES_MAX).await?;
    let body: TransferBody = parse_json(&bytes)?;
    let from = account_id(&body.from, "/from")?;
    let to = account_id(&body.to, "/to")?;
    let key = idempotency_key(&headers)?.ok_or_else(ApiError::key_missing)?;
    let engine = state.ready()?;
    let request = Request::Transfer {
        to,
        amount: body.amount.0,
        metadata: body.metadata,
    };
    let outcome = engine.transfer(&from, Some(key), request).await?;
    let mut response = transfer_answer(&outcome.record);
    if outcome.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The answer to a transfer request, first or replayed: 201 with the transfer and both
/// accounts; the refusal's error if the destination refused (the source was refunded); 202
/// if it is still in flight (its refund was refused too; recovery retries it).
fn transfer_answer(record: &TransferRecord) -> Response {
    match transfer_status(record) {
        Ok(status) => json(status, &TransferReceiptJson::from(record)),
        Err(error) => error.into_response(),
    }
}

/// The status a transfer is answered with, or the refusal's error for a failed one.
fn transfer_status(record: &TransferRecord) -> Result<StatusCode, ApiError> {
    match record.status {
        TransferStatus::Failed(failure) => Err(ApiError::transfer_failed(record, failure)),
        TransferStatus::Completed => Ok(StatusCode::CREATED),
        TransferStatus::Pending => Ok(StatusCode::ACCEPTED),
    }
}

problems!(
    GetTransferProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        TRANSFER_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Read a transfer
#[utoipa::path(get, path = "/v1/transfers/{id}", operation_id = "getTransfer", tag = "transfers",
    params(("id" = String, Path, format = Uuid, description = "Transfer id (a UUID). Anything else is 400 invalid_request.")),
    responses(
        (status = 200, description = "The transfer.", body = TransferJson),
        GetTransferProblems,
    ))]
async fn get_transfer(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_param(path)?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid_at("path:id", "transfer id is not a valid UUID"))?;
    let record = state.ready()?.transfer_record(&id).await?;
    Ok(json(StatusCode::OK, &TransferJson::from(&*record)))
}

problems!(
    BatchProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        PAYLOAD_TOO_LARGE,
        VALIDATION_FAILED,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Run up to 1,000 operations in one request
///
/// Each operation is idempotent by its own key and answered in order exactly as its single
/// endpoint would, errors included (a malformed operation gets 400 in its own result). The
/// whole batch is refused only when the request itself is malformed (400), too large (413)
/// or has no operation or more than 1,000 (422). Operations are not atomic together;
/// operations on the same account apply in the order given.
#[utoipa::path(post, path = "/v1/batch", operation_id = "postBatch", tag = "batch",
    request_body = BatchBody,
    responses(
        (status = 200, description = "One result per operation, in order.", body = BatchResponseDoc),
        BatchProblems,
    ))]
async fn post_batch(State(state): State<AppState>, body: Body) -> ApiResult {
    let bytes = read_body(body, BATCH_BODY_BYTES_MAX).await?;
    let batch: BatchBody = parse_json(&bytes)?;
    if batch.operations.is_empty() || batch.operations.len() > BATCH_OPERATIONS_MAX {
        return Err(ApiError::validation(format!(
            "operations must hold 1..={BATCH_OPERATIONS_MAX} entries"
        ))
        .at("/operations"));
    }
    let engine = state.ready()?;
    let count = batch.operations.len();
    let mut early: Vec<Option<ApiError>> = (0..count).map(|_| None).collect();
    let mut valid = Vec::with_capacity(count);
    let mut valid_index = Vec::with_capacity(count);
    for (index, raw) in batch.operations.into_iter().enumerate() {
        match batch_operation(raw) {
            Ok(operation) => {
                valid.push(operation);
                valid_index.push(index);
            }
            Err(error) => early[index] = Some(error.in_operation(index)),
        }
    }
    let mut outcomes = engine.execute_batch(valid).await.into_iter();
    let mut out = Vec::with_capacity(count * 700 + 16);
    out.extend_from_slice(b"{\"results\":[");
    let mut next_valid = valid_index.into_iter().peekable();
    for (index, early) in early.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        let result = match early {
            Some(error) => Err(error),
            None => {
                debug_assert_eq!(next_valid.next(), Some(index));
                match outcomes.next() {
                    Some(Ok(executed)) => Ok(executed),
                    Some(Err(error)) => Err(ApiError::from(error).in_operation(index)),
                    None => Err(ApiError::from(crate::engine::EngineError::ShuttingDown)),
                }
            }
        };
        write_batch_result(&mut out, result);
    }
    out.extend_from_slice(b"]}");
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response())
}

/// One result of a batch: `{"status", "body", "replayed"}`, exactly what the single endpoint
/// would have answered.
fn write_batch_result(out: &mut Vec<u8>, result: Result<Executed, ApiError>) {
    let (status, replayed) = match &result {
        Ok(executed) => (receipt_status(&executed.receipt), executed.replayed),
        Err(error) => (error.status, false),
    };
    out.extend_from_slice(b"{\"status\":");
    out.extend_from_slice(status.as_u16().to_string().as_bytes());
    out.extend_from_slice(b",\"body\":");
    let written = match &result {
        Ok(executed) => serde_json::to_writer(&mut *out, &ReceiptJson::from(&*executed.receipt)),
        Err(error) => serde_json::to_writer(&mut *out, &error.body()),
    };
    if written.is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(if replayed {
        b",\"replayed\":true}"
    } else {
        b",\"replayed\":false}"
    });
}

/// Parses one batch operation with the checks of its single endpoint, in the same order:
/// 400 for syntax, path-like ids and key format, then 400 `idempotency_key_missing`. A
/// problem's `field` is relative to the operation (the caller moves it under
/// `/operations/{index}`).
fn batch_operation(
    raw: &serde_json::value::RawValue,
) -> Result<(AccountId, Option<IdempotencyKey>, Request), ApiError> {
    if !raw.get().trim_start().starts_with('{') {
        return Err(ApiError::invalid_at(
            "",
            "each operation must be a JSON object",
        ));
    }
    let op: BatchOpBody = parse_json_text(raw.get().as_bytes(), "invalid operation")?;
    let account = account_id(&op.account, "/account")?;
    let not_for = |field: &str| {
        ApiError::invalid_at(
            &format!("/{field}"),
            format!("unknown field `{field}` for op {}", op.op),
        )
    };
    let hold_id = |text: &Option<String>| match text {
        Some(text) => hold_id_param(text, "/hold_id"),
        None => Err(ApiError::invalid_at("/hold_id", "missing field `hold_id`")),
    };
    let amount = |value: Option<JsonInt>| {
        value
            .map(|v| v.0)
            .ok_or_else(|| ApiError::invalid_at("/amount", "missing field `amount`"))
    };
    let request = match op.op.as_str() {
        "credit" | "debit" => {
            if op.hold_id.is_some() {
                return Err(not_for("hold_id"));
            }
            if op.expires_in_secs.is_some() {
                return Err(not_for("expires_in_secs"));
            }
            let amount = amount(op.amount)?;
            if op.op == "credit" {
                Request::Credit {
                    amount,
                    metadata: op.metadata,
                }
            } else {
                Request::Debit {
                    amount,
                    metadata: op.metadata,
                }
            }
        }
        "hold" => {
            if op.hold_id.is_some() {
                return Err(not_for("hold_id"));
            }
            Request::Hold {
                amount: amount(op.amount)?,
                expires_in_secs: op.expires_in_secs.map(|v| v.0),
                metadata: op.metadata,
            }
        }
        "capture" => {
            if op.expires_in_secs.is_some() {
                return Err(not_for("expires_in_secs"));
            }
            Request::Capture {
                hold_id: hold_id(&op.hold_id)?,
                amount: op.amount.map(|v| v.0),
                metadata: op.metadata,
            }
        }
        "release" => {
            if op.expires_in_secs.is_some() {
                return Err(not_for("expires_in_secs"));
            }
            if op.amount.is_some() {
                return Err(not_for("amount"));
            }
            Request::Release {
                hold_id: hold_id(&op.hold_id)?,
                metadata: op.metadata,
            }
        }
        other => {
            return Err(ApiError::invalid_at(
                "/op",
                format!("op {other:?} is not one of credit, debit, hold, capture, release"),
            ))
        }
    };
    let key = match op.idempotency_key.as_deref() {
        Some(text) => IdempotencyKey::parse(text).map_err(|e| {
            ApiError::invalid_at(
                "/idempotency_key",
                e.reason.replace("Idempotency-Key", "idempotency_key"),
            )
        })?,
        None => {
            return Err(ApiError::of(
                error::kinds::IDEMPOTENCY_KEY_MISSING,
                "this operation moves money and needs its own idempotency_key",
            )
            .at("/idempotency_key"))
        }
    };
    Ok((account, Some(key), request))
}

problems!(
    ListHoldsProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// List an account's holds
///
/// Oldest first, paged by hold id.
#[utoipa::path(get, path = "/v1/accounts/{id}/holds", operation_id = "listHolds", tag = "holds",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), HoldsQuery),
    responses(
        (status = 200, description = "A page of holds.", body = HoldPage),
        ListHoldsProblems,
    ))]
async fn list_holds(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let id = account_id(&path_param(path)?, "path:id")?;
    let query: HoldsQuery = parse_query(query.as_deref())?;
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(HoldStatus::parse(s).ok_or_else(|| {
            ApiError::invalid_at(
                "query:status",
                "status must be one of open, captured, released, expired",
            )
        })?),
    };
    let limit = list_limit(query.limit.as_deref())?;
    let after = match query.after.as_deref() {
        None => None,
        Some(cursor) => Some(
            Uuid::parse_str(cursor)
                .map_err(|_| ApiError::invalid_at("query:after", "after is not a valid cursor"))?,
        ),
    };
    let (holds, next) = state.ready()?.holds(&id, status, after, limit).await?;
    let page = HoldPage {
        holds: holds.iter().map(HoldJson::from).collect(),
        next: next.map(|id| id.to_string()),
    };
    Ok(json(StatusCode::OK, &page))
}

problems!(
    GetHoldProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        HOLD_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Read a hold
#[utoipa::path(get, path = "/v1/accounts/{id}/holds/{hold_id}", operation_id = "getHold", tag = "holds",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("hold_id" = String, Path, format = Uuid, description = "Hold id (a UUID). Anything else is 400 invalid_request.")),
    responses(
        (status = 200, description = "The hold.", body = HoldJson),
        GetHoldProblems,
    ))]
async fn get_hold(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (id, hold_id) = path_param(path)?;
    let id = account_id(&id, "path:id")?;
    let hold_id = hold_id_param(&hold_id, "path:hold_id")?;
    let hold = state.ready()?.hold(&id, &hold_id).await?;
    Ok(json(StatusCode::OK, &HoldJson::from(&hold)))
}

problems!(
    ListTransactionsProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// List an account's transactions
///
/// Newest first, paged by seq. Accounts keep their last 1000 transactions in memory.
#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", operation_id = "listTransactions", tag = "transactions",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), TransactionsQuery),
    responses(
        (status = 200, description = "A page of transactions.", body = TransactionPage),
        ListTransactionsProblems,
    ))]
async fn list_transactions(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let id = account_id(&path_param(path)?, "path:id")?;
    let query: TransactionsQuery = parse_query(query.as_deref())?;
    let limit = list_limit(query.limit.as_deref())?;
    let before_seq = match query.before_seq.as_deref() {
        None => None,
        Some(text) => Some(
            Some(text)
                .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| u64::from_str(t).ok())
                .filter(|v| *v >= 1)
                .ok_or_else(|| {
                    ApiError::invalid_at(
                        "query:before_seq",
                        "before_seq must be a positive integer",
                    )
                })?,
        ),
    };
    let (transactions, next) = state.ready()?.transactions(&id, before_seq, limit).await?;
    let page = TransactionPage {
        transactions: transactions.iter().map(TransactionJson::from).collect(),
        next: next.map(|seq| seq.to_string()),
    };
    Ok(json(StatusCode::OK, &page))
}

problems!(
    KeyLookupProblems = [
        INVALID_REQUEST,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        UNKNOWN_IDEMPOTENCY_KEY,
        TRANSFER_NOT_FOUND,
        RATE_LIMITED,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN
    ]
);

/// Look up what a request with an idempotency key was answered
///
/// For a client that lost an answer: tells whether the request happened. Never applies
/// anything.
#[utoipa::path(get, path = "/v1/accounts/{id}/idempotency-keys/{key}", operation_id = "getIdempotencyKey", tag = "idempotency",
    params(("id" = schema::AccountIdSchema, Path, description = ACCOUNT_ID_DOC), ("key" = String, Path, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$", description = "The Idempotency-Key to look up (percent-encoded in the path).")),
    responses(
        (status = 200, description = "The stored outcome.", body = IdempotencyLookup),
        KeyLookupProblems,
    ))]
async fn get_idempotency_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (id, key) = path_param(path)?;
    let id = account_id(&id, "path:id")?;
    let key =
        IdempotencyKey::parse(&key).map_err(|e| ApiError::invalid_at("path:key", e.reason))?;
    let engine = state.ready()?;
    let entry = engine.idempotency_entry(&id, &key).await?.ok_or_else(|| {
        ApiError::of(
            error::kinds::UNKNOWN_IDEMPOTENCY_KEY,
            format!("no request with key {} on this account", key.as_str()),
        )
    })?;
    let transaction = &entry.receipt.transaction;
    let (status, response) = match (transaction.kind, transaction.transfer_id) {
        // A transfer's answer names both accounts: it is kept with the transfer.
        (TxKind::TransferOut, Some(transfer_id)) => {
            let record = engine.transfer_record(&transfer_id).await?;
            match transfer_status(&record) {
                Ok(status) => (
                    status,
                    serde_json::to_value(TransferReceiptJson::from(&*record))
                        .unwrap_or(serde_json::Value::Null),
                ),
                Err(error) => (error.status, error.body()),
            }
        }
        _ => (
            receipt_status(&entry.receipt),
            serde_json::to_value(ReceiptJson::from(&*entry.receipt))
                .unwrap_or(serde_json::Value::Null),
        ),
    };
    let lookup = IdempotencyLookup {
        key: key.as_str(),
        status: status.as_u16(),
        response,
        created_at: Timestamp(entry.created_at_ms),
    };
    Ok(json(StatusCode::OK, &lookup))
}

/// Liveness
///
/// 200 while the process runs, also during recovery. Never needs a token.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "service",
    security(()),
    responses((status = 200, description = "The process runs.", body = Health)))]
async fn healthz() -> Response {
    json(StatusCode::OK, &Health { status: "ok" })
}

problems!(ReadyzProblems = [NOT_READY, STORAGE_FAILURE, SHUTTING_DOWN]);

/// Readiness
///
/// 200 once recovery is done (overdue holds expired) and writes are accepted. Never needs a
/// token.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "service",
    security(()),
    responses((status = 200, description = "Ready.", body = Readiness), ReadyzProblems))]
async fn readyz(State(state): State<AppState>) -> ApiResult {
    let engine = state.ready()?;
    if engine.storage_failed() {
        return Err(ApiError::storage_failure());
    }
    Ok(json(StatusCode::OK, &Readiness { status: "ready" }))
}

problems!(OpenApiProblems = [UNAUTHORIZED, RATE_LIMITED, OVERLOADED, SHUTTING_DOWN]);

/// This document
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "service",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object, content_type = "application/json"),
        OpenApiProblems,
    ))]
async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi::document_json(),
    )
        .into_response()
}

/// The status of a successful change, first answer and replays alike, single or batched:
/// credits, debits and holds create (201); captures and releases change (200).
fn receipt_status(receipt: &Receipt) -> StatusCode {
    match receipt.transaction.kind {
        TxKind::Capture | TxKind::Release => StatusCode::OK,
        _ => StatusCode::CREATED,
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "response serialization failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes with 413.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

fn path_param<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value)
        .map_err(|e| ApiError::invalid(format!("invalid path: {e}")))
}

/// An account id given at `field` (`path:id`, `/from`, ...).
fn account_id(text: &str, field: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(text).map_err(|e| ApiError::invalid_at(field, e.reason))
}

/// A hold id given at `field`.
fn hold_id_param(text: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::invalid_at(field, "hold id is not a valid UUID"))
}

/// Parses a JSON object body. Only an object is a request: serde's derived structs would
/// also take an array of the fields in order, which must not move money.
fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::invalid_at("", "the body must be a JSON object"));
    }
    parse_json_text(bytes, "invalid JSON body")
}

/// Deserializes JSON text, naming in the problem where a value is wrong: the path serde
/// was at (`serde_path_to_error`), plus the field an unknown, missing or repeated field
/// error names, as a JSON pointer. Syntax errors name no field: the text is at fault, and
/// the detail says where (line and column).
fn parse_json_text<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let inner = error.inner();
        let problem = ApiError::invalid(format!("{what}: {inner}"));
        if !inner.is_data() {
            return problem;
        }
        let mut pointer = json_pointer(error.path());
        // An unknown field's path already ends at it; a missing one's ends at its object.
        if let Some(name) = named_field(&inner.to_string()) {
            let last = format!("/{}", escape_pointer(name));
            if !pointer.ends_with(&last) {
                pointer.push_str(&last);
            }
        }
        problem.at(pointer)
    })?;
    // As `serde_json::from_slice`: nothing but whitespace may follow the value.
    deserializer
        .end()
        .map_err(|e| ApiError::invalid(format!("{what}: {e}")))?;
    Ok(value)
}

/// The JSON pointer of a deserialization path (`""` at the top).
fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                pointer.push('/');
                pointer.push_str(&index.to_string());
            }
            Segment::Map { key } => {
                pointer.push('/');
                pointer.push_str(&escape_pointer(key));
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    pointer
}

/// RFC 6901: `~` and `/` in a member name are written `~0` and `~1`.
fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// The field that serde's `unknown field`, `missing field` and `duplicate field` errors
/// name (between backticks): the error sits at the enclosing object, the fault at the field.
fn named_field(message: &str) -> Option<&str> {
    ["unknown field `", "missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
}

/// Bodies whose fields are all optional may be empty.
fn parse_json_or_empty<'a, T: Deserialize<'a> + Default>(bytes: &'a [u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(bytes)
}

/// Parses a query string strictly: unknown or repeated parameters are 400, and so is any
/// malformed non-empty value (`limit=0`, `limit=+5`, `status=foo`). A parameter given with an
/// empty value (`?limit=&after=`) counts as absent, exactly as if it were left out: docs/API.md
/// shows the list URL as the template `?status=open&limit=&after=`, and a client written
/// against it may send the parameters it does not use empty. Refusing those would break it.
fn parse_query<T: serde::de::DeserializeOwned + Default>(
    query: Option<&str>,
) -> Result<T, ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(T::default());
    };
    let problem = |e: &dyn std::fmt::Display| {
        let message = e.to_string();
        let error = ApiError::invalid(format!("invalid query: {message}"));
        match named_field(&message) {
            Some(name) => error.at(format!("query:{name}")),
            None => error,
        }
    };
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|e| problem(&e))?;
    let kept: Vec<(String, String)> = pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    let canonical = serde_urlencoded::to_string(&kept).map_err(|e| problem(&e))?;
    serde_urlencoded::from_str(&canonical).map_err(|e| problem(&e))
}

fn list_limit(text: Option<&str>) -> Result<usize, ApiError> {
    match text {
        None => Ok(LIST_LIMIT_DEFAULT),
        Some(t) => Some(t)
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| usize::from_str(t).ok())
            .filter(|v| (1..=LIST_LIMIT_MAX).contains(v))
            .ok_or_else(|| {
                ApiError::invalid_at(
                    "query:limit",
                    format!("limit must be an integer in 1..={LIST_LIMIT_MAX}"),
                )
            }),
    }
}

/// The `Idempotency-Key` header: absent is `None`; present but malformed is 400.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_at(
            error::IDEMPOTENCY_KEY_HEADER,
            "Idempotency-Key given more than once",
        ));
    }
    let text = value.to_str().map_err(|_| {
        ApiError::invalid_at(
            error::IDEMPOTENCY_KEY_HEADER,
            "Idempotency-Key must be visible ASCII characters",
        )
    })?;
    IdempotencyKey::parse(text)
        .map(Some)
        .map_err(|e| ApiError::invalid_at(error::IDEMPOTENCY_KEY_HEADER, e.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: for<'a> Deserialize<'a>>(body: &str) -> Option<String> {
        parse_json::<T>(body.as_bytes())
            .err()
            .expect("a refusal")
            .field()
            .map(str::to_string)
    }

    #[test]
    fn body_problems_name_the_field_as_a_json_pointer() {
        let cases = [
            (r#"{"amount": "5"}"#, Some("/amount")),
            (r#"{"amount": 1.5}"#, Some("/amount")),
            (r#"{"amount": null}"#, Some("/amount")),
            (r#"{"amont": 5}"#, Some("/amont")),
            (r#"{}"#, Some("/amount")),
            (r#"{"amount": 5, "amount": 6}"#, Some("/amount")),
            (r#"{"amount": 5, "metadata": null}"#, Some("/metadata")),
            (
                r#"{"amount": 5, "metadata": {"a/b~": 5}}"#,
                Some("/metadata/a~1b~0"),
            ),
            (
                r#"{"amount": 5, "metadata": {"k": "a", "k": "b"}}"#,
                Some("/metadata"),
            ),
            (r#"[5]"#, Some("")),
            (r#"{"amount": 5,"#, None),
            (r#"{"amount": 5} x"#, None),
        ];
        for (body, field) in cases {
            assert_eq!(field_of::<MoveBody>(body).as_deref(), field, "{body}");
        }
    }

    #[test]
    fn batch_problems_name_the_operation() {
        let batch = r#"{"operations": [{"op": "credit"}]}"#;
        let body: BatchBody = parse_json(batch.as_bytes()).expect("a batch");
        let error = batch_operation(body.operations[0])
            .expect_err("no account")
            .in_operation(3);
        assert_eq!(error.field(), Some("/operations/3/account"));
        let error = parse_json::<BatchBody>(br#"{"operation": []}"#).expect_err("an unknown field");
        assert_eq!(error.field(), Some("/operation"));
        let missing = ApiError::key_missing().in_operation(2);
        assert_eq!(missing.field(), Some("/operations/2/idempotency_key"));
    }

    #[test]
    fn query_problems_name_the_parameter() {
        let error =
            parse_query::<HoldsQuery>(Some("limit=5&bogus=1")).expect_err("an unknown parameter");
        assert_eq!(error.field(), Some("query:bogus"));
        let error =
            parse_query::<HoldsQuery>(Some("limit=5&limit=6")).expect_err("a repeated parameter");
        assert_eq!(error.field(), Some("query:limit"));
    }
}
