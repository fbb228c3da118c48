//! The one place where failures become HTTP answers: RFC 9457 problem+json with a stable
//! machine-readable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::domain::{Field, Invalid, OpError, TransferFailure, TransferRecord};
use crate::engine::EngineError;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `insufficient_funds`.
    pub code: &'static str,
    /// Short human title.
    pub title: &'static str,
    /// What exactly is wrong.
    pub detail: String,
    /// Seconds for `Retry-After`, on 429 and 503.
    pub retry_after_secs: Option<u32>,
    /// The RFC 9457 extension members of the body, when it has any (boxed: most answers
    /// have none, and the error travels in every `Result` of the HTTP layer).
    pub members: Option<Box<Members>>,
}

/// The extension members of a problem body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// Where the offending value is (see [`ApiError::at`]), when one value is at fault.
    pub field: Option<String>,
    /// With 409 `insufficient_funds`: the account's available money and the amount asked.
    pub funds: Option<Funds>,
    /// With 410 `cursor_expired`: the oldest cursor still available.
    pub oldest_cursor: Option<String>,
}

/// The numbers of an `insufficient_funds` answer (members `available` and `requested`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Funds {
    /// The account's `available` when the request was decided (negative with an overdraft).
    pub available: i64,
    /// The amount the request needed.
    pub requested: u64,
}

/// One kind of error answer: status, stable code, title, and what the OpenAPI document says
/// about it. Every [`ApiError`] is made from one of the kinds in [`kinds`], and the document
/// lists each endpoint's errors as kinds too, so the two cannot disagree on a status or code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorKind {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Short human title.
    pub title: &'static str,
    /// `Retry-After` seconds sent with it, if any (429 sends its own wait).
    pub retry_after_secs: Option<u32>,
    /// When it is answered (the document's description).
    pub meaning: &'static str,
    /// A typical `detail` (the document's example).
    pub example_detail: &'static str,
}

/// Every kind of error answer.
pub mod kinds {
    use super::ErrorKind;
    use axum::http::StatusCode;

    const fn kind(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        meaning: &'static str,
        example_detail: &'static str,
    ) -> ErrorKind {
        ErrorKind {
            status,
            code,
            title,
            retry_after_secs: None,
            meaning,
            example_detail,
        }
    }

    const fn retry(mut kind: ErrorKind) -> ErrorKind {
        kind.retry_after_secs = Some(1);
        kind
    }

    /// 400: malformed JSON, wrong types, bad ids, bad query, bad key format.
    pub const INVALID_REQUEST: ErrorKind = kind(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "Invalid request",
        "invalid_request: malformed JSON, a body that is not an object, an unknown field, a field of the wrong JSON type (a string, a number with a fractional part, null or a boolean where an integer is expected; null for metadata), a missing required field, a malformed account id, hold id or key in the path, a malformed non-empty query parameter (an empty one counts as absent), or an Idempotency-Key that is empty, longer than 255 characters, not visible ASCII or given twice",
        "invalid JSON body: unknown field `amont`, expected `amount` or `metadata` at line 1 column 8",
    );
    /// 400: a money-moving request without `Idempotency-Key`.
    pub const IDEMPOTENCY_KEY_MISSING: ErrorKind = kind(
        StatusCode::BAD_REQUEST,
        "idempotency_key_missing",
        "Idempotency-Key missing",
        "idempotency_key_missing: no Idempotency-Key header (for a batch operation: no idempotency_key)",
        "this request moves money and needs an Idempotency-Key header",
    );
    /// 401: no bearer token, or not a configured one.
    pub const UNAUTHORIZED: ErrorKind = kind(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "unauthorized: tokens are configured and the request has no `Authorization: Bearer` with one of them (comes before every other error)",
        "this endpoint needs Authorization: Bearer with a valid token",
    );
    /// 404: no account with this id.
    pub const ACCOUNT_NOT_FOUND: ErrorKind = kind(
        StatusCode::NOT_FOUND,
        "account_not_found",
        "Account not found",
        "account_not_found: no account with this id",
        "no account with id player-42",
    );
    /// 404: no hold with this id on the account.
    pub const HOLD_NOT_FOUND: ErrorKind = kind(
        StatusCode::NOT_FOUND,
        "hold_not_found",
        "Hold not found",
        "hold_not_found: the account has no hold with this id",
        "no hold 0193a5c4-7d2e-7f00-8000-000000000001 on this account",
    );
    /// 404: no transfer with this id.
    pub const TRANSFER_NOT_FOUND: ErrorKind = kind(
        StatusCode::NOT_FOUND,
        "transfer_not_found",
        "Transfer not found",
        "transfer_not_found: no transfer with this id (or it is older than the retention)",
        "no transfer 0193a5c4-7d2e-7f00-8000-000000000001",
    );
    /// 404: the key was not used on this account (or is forgotten).
    pub const UNKNOWN_IDEMPOTENCY_KEY: ErrorKind = kind(
        StatusCode::NOT_FOUND,
        "unknown_idempotency_key",
        "Unknown idempotency key",
        "unknown_idempotency_key: no successful request with this key on this account (within the retention)",
        "no request with key order-1 on this account",
    );
    /// 404: a path that names no endpoint.
    pub const NOT_FOUND: ErrorKind = kind(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found",
        "not_found: no such endpoint",
        "no such endpoint",
    );
    /// 405: a known path with another method.
    pub const METHOD_NOT_ALLOWED: ErrorKind = kind(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        "method_not_allowed: the path exists but not with this method (Allow lists the methods)",
        "this endpoint does not take this method",
    );
    /// 409: `PUT` of an existing account with other fields.
    pub const ACCOUNT_EXISTS: ErrorKind = kind(
        StatusCode::CONFLICT,
        "account_exists",
        "Account exists",
        "account_exists: the account exists with a different currency or overdraft_limit (the detail names them)",
        "the account exists with currency GEM and overdraft_limit 0",
    );
    /// 409: not enough available money.
    pub const INSUFFICIENT_FUNDS: ErrorKind = kind(
        StatusCode::CONFLICT,
        "insufficient_funds",
        "Insufficient funds",
        "insufficient_funds: amount is more than available + overdraft_limit",
        "available 1300 is less than 2000",
    );
    /// 409: the hold is captured, released or expired.
    pub const HOLD_NOT_OPEN: ErrorKind = kind(
        StatusCode::CONFLICT,
        "hold_not_open",
        "Hold not open",
        "hold_not_open: the hold is captured, released or expired (the detail names its status)",
        "the hold is expired",
    );
    /// 409: a credit would push the balance past 2^53-1.
    pub const BALANCE_LIMIT_EXCEEDED: ErrorKind = kind(
        StatusCode::CONFLICT,
        "balance_limit_exceeded",
        "Balance limit exceeded",
        "balance_limit_exceeded: the balance would exceed 9007199254740991",
        "balance 9007199254740000 plus 5000 would exceed 9007199254740991",
    );
    /// 409: a transfer between accounts of different currencies.
    pub const CURRENCY_MISMATCH: ErrorKind = kind(
        StatusCode::CONFLICT,
        "currency_mismatch",
        "Currency mismatch",
        "currency_mismatch: the two accounts have different currencies; nothing moved",
        "the source holds GEM and the destination EUR",
    );
    /// 413: the body is over its limit.
    pub const PAYLOAD_TOO_LARGE: ErrorKind = kind(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "Payload too large",
        "payload_too_large: the body is larger than 65,536 bytes (1 MiB for POST /v1/batch)",
        "request bodies are limited to 65536 bytes",
    );
    /// 422: a well-formed value out of bounds.
    pub const VALIDATION_FAILED: ErrorKind = kind(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "Validation failed",
        "validation_failed: a well-formed value out of bounds: an integer amount outside 1..=9007199254740991, a currency outside ^[A-Z0-9_]{1,16}$, an overdraft_limit outside 0..=9007199254740991, expires_in_secs outside 1..=2592000, metadata outside its limits, a transfer from an account to itself, or a batch with no operation or more than 1000",
        "amount must be an integer in 1..=9007199254740991",
    );
    /// 422: the key was used for a different request.
    pub const IDEMPOTENCY_KEY_REUSED: ErrorKind = kind(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "Idempotency key reused",
        "idempotency_key_reused: this Idempotency-Key was used on this account for a different request; nothing was applied",
        "this Idempotency-Key was used for a different request",
    );
    /// 422: a capture of more than the hold.
    pub const AMOUNT_EXCEEDS_HOLD: ErrorKind = kind(
        StatusCode::UNPROCESSABLE_ENTITY,
        "amount_exceeds_hold",
        "Amount exceeds hold",
        "amount_exceeds_hold: the capture amount is more than the hold's amount",
        "capture of 300 is more than the hold's 200",
    );
    /// 429: over the rate limit.
    pub const RATE_LIMITED: ErrorKind = kind(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Rate limited",
        "rate_limited: this token (or client IP without tokens) is over --rate-limit; retry after Retry-After seconds",
        "too many requests for this client; retry after the Retry-After seconds",
    );
    /// 410: the events after a cursor are no longer kept.
    pub const CURSOR_EXPIRED: ErrorKind = kind(
        StatusCode::GONE,
        "cursor_expired",
        "Cursor expired",
        "cursor_expired: the events after this cursor are no longer kept; `oldest_cursor` is the oldest one that is (start there, knowing that the events in between are lost to this consumer)",
        "the events after this cursor are no longer kept; the oldest available cursor is e00000000000003e8",
    );
    /// 500: an answer the server could not produce (a failed read of the log).
    pub const INTERNAL_ERROR: ErrorKind = kind(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "Internal error",
        "internal_error: the server could not answer (reading the log failed); the error is logged",
        "the server could not answer; the error is logged",
    );
    /// 503: recovery is still running.
    pub const NOT_READY: ErrorKind = retry(kind(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "Not ready",
        "not_ready: recovery is still running (Retry-After: 1)",
        "recovery is still running",
    ));
    /// 503: the log failed; writes are stopped.
    pub const STORAGE_FAILURE: ErrorKind = kind(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_failure",
        "Storage failure",
        "storage_failure: the write-ahead log could not be written or synced; writes are stopped and nothing unsynced is acknowledged or shown",
        "the write-ahead log could not be written or synced; writes are stopped",
    );
    /// 503: a mailbox stayed full, or the request timed out.
    pub const OVERLOADED: ErrorKind = retry(kind(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "Overloaded",
        "overloaded: an account actor's mailbox stayed full (nothing was applied), or the request took longer than --request-timeout (a change may still be applied: retry with the same Idempotency-Key); Retry-After: 1",
        "the server has too much queued work; nothing was applied, retry later",
    ));
    /// 503: the server is shutting down.
    pub const SHUTTING_DOWN: ErrorKind = retry(kind(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "Shutting down",
        "shutting_down: the server is stopping: a request that arrives after the stop began, a long poll or event stream cut short by it, or a change the stopping engine no longer takes (nothing was applied; retry on a running server, Retry-After: 1)",
        "the server is shutting down",
    ));

    /// Every kind, in the order of the error table of the documentation: the codes the
    /// server can answer with, which the OpenAPI document lists as the `code` enum.
    pub const ALL: &[ErrorKind] = &[
        INVALID_REQUEST,
        IDEMPOTENCY_KEY_MISSING,
        UNAUTHORIZED,
        ACCOUNT_NOT_FOUND,
        HOLD_NOT_FOUND,
        TRANSFER_NOT_FOUND,
        UNKNOWN_IDEMPOTENCY_KEY,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        ACCOUNT_EXISTS,
        INSUFFICIENT_FUNDS,
        HOLD_NOT_OPEN,
        BALANCE_LIMIT_EXCEEDED,
        CURRENCY_MISMATCH,
        CURSOR_EXPIRED,
        PAYLOAD_TOO_LARGE,
        VALIDATION_FAILED,
        IDEMPOTENCY_KEY_REUSED,
        AMOUNT_EXCEEDS_HOLD,
        RATE_LIMITED,
        INTERNAL_ERROR,
        NOT_READY,
        STORAGE_FAILURE,
        OVERLOADED,
        SHUTTING_DOWN,
    ];
}

impl ApiError {
    /// An answer of `kind` with `detail`.
    pub fn of(kind: ErrorKind, detail: impl Into<String>) -> ApiError {
        ApiError {
            status: kind.status,
            code: kind.code,
            title: kind.title,
            detail: detail.into(),
            retry_after_secs: kind.retry_after_secs,
            members: None,
        }
    }

    /// Where the offending value is, if the answer names it.
    pub fn field(&self) -> Option<&str> {
        self.members.as_ref().and_then(|m| m.field.as_deref())
    }

    fn members_mut(&mut self) -> &mut Members {
        self.members.get_or_insert_with(Box::default)
    }

    /// The same answer naming where the offending value is: a JSON pointer into the body
    /// (`/amount`, `/operations/3/account`; `""` is the whole body), or `header:NAME`,
    /// `query:NAME`, `path:NAME` for a header, query parameter or path parameter.
    pub fn at(mut self, field: impl Into<String>) -> ApiError {
        self.members_mut().field = Some(field.into());
        self
    }

    /// 400 `invalid_request` for the value at `field`.
    pub fn invalid_at(field: &str, detail: impl Into<String>) -> ApiError {
        ApiError::invalid(detail).at(field)
    }

    /// 422 `validation_failed` for a value out of bounds, named where a single endpoint
    /// takes it (see [`body_field`]).
    pub fn out_of_bounds(invalid: Invalid) -> ApiError {
        let error = ApiError::validation(invalid.reason);
        match body_field(invalid.field) {
            Some(field) => error.at(field),
            None => error,
        }
    }

    /// The answer as a result of operation `index` of a batch: a body pointer moves under
    /// `/operations/{index}`, and the Idempotency-Key header of a single endpoint is the
    /// operation's own `idempotency_key`.
    pub fn in_operation(mut self, index: usize) -> ApiError {
        let Some(members) = self.members.as_mut() else {
            return self;
        };
        members.field = members.field.take().map(|field| {
            if field == IDEMPOTENCY_KEY_HEADER {
                format!("/operations/{index}/idempotency_key")
            } else if field.is_empty() || field.starts_with('/') {
                format!("/operations/{index}{field}")
            } else {
                field
            }
        });
        self
    }

    /// 400 `invalid_request`: malformed JSON, wrong types, bad ids, bad query.
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::of(kinds::INVALID_REQUEST, detail)
    }

    /// 400 `idempotency_key_missing`.
    pub fn key_missing() -> ApiError {
        ApiError::of(
            kinds::IDEMPOTENCY_KEY_MISSING,
            "this request moves money and needs an Idempotency-Key header",
        )
        .at(IDEMPOTENCY_KEY_HEADER)
    }

    /// 422 `validation_failed`: a well-formed value out of bounds.
    pub fn validation(detail: impl Into<String>) -> ApiError {
        ApiError::of(kinds::VALIDATION_FAILED, detail)
    }

    /// 413 `payload_too_large`.
    pub fn too_large(limit_bytes: usize) -> ApiError {
        ApiError::of(
            kinds::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {limit_bytes} bytes"),
        )
    }

    /// 503 `not_ready`.
    pub fn not_ready() -> ApiError {
        ApiError::of(kinds::NOT_READY, "recovery is still running")
    }

    /// 401 `unauthorized`: no bearer token, or not a configured one.
    pub fn unauthorized() -> ApiError {
        ApiError::of(
            kinds::UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer with a valid token",
        )
    }

    /// 429 `rate_limited`, to be retried after `retry_after_secs`.
    pub fn rate_limited(retry_after_secs: u32) -> ApiError {
        let mut e = ApiError::of(
            kinds::RATE_LIMITED,
            "too many requests for this client; retry after the Retry-After seconds",
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 503 `overloaded`: the request took longer than the request timeout. A change it
    /// carried may still be applied; retrying with the same Idempotency-Key tells.
    pub fn timed_out(timeout: std::time::Duration) -> ApiError {
        ApiError::of(
            kinds::OVERLOADED,
            format!(
                "the request took longer than {} ms; a change may still be applied, retry with the same Idempotency-Key",
                timeout.as_millis()
            ),
        )
    }

    /// 503 `overloaded`: an account actor's mailbox stayed full.
    pub fn overloaded() -> ApiError {
        ApiError::of(
            kinds::OVERLOADED,
            "the server has too much queued work; nothing was applied, retry later",
        )
    }

    /// 503 `storage_failure`.
    pub fn storage_failure() -> ApiError {
        ApiError::of(
            kinds::STORAGE_FAILURE,
            "the write-ahead log could not be written or synced; writes are stopped",
        )
    }

    /// 404 for a path that names no resource.
    pub fn no_route() -> ApiError {
        ApiError::of(kinds::NOT_FOUND, "no such endpoint")
    }

    /// 405 for a known path with another method.
    pub fn method_not_allowed() -> ApiError {
        ApiError::of(
            kinds::METHOD_NOT_ALLOWED,
            "this endpoint does not take this method",
        )
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::AccountNotFound(id) => ApiError::of(
                kinds::ACCOUNT_NOT_FOUND,
                format!("no account with id {id}"),
            ),
            EngineError::AccountExists {
                currency,
                overdraft_limit,
            } => ApiError::of(
                kinds::ACCOUNT_EXISTS,
                format!(
                    "the account exists with currency {currency} and overdraft_limit {overdraft_limit}"
                ),
            ),
            EngineError::Op(refusal) => refusal.into(),
            EngineError::StorageFailure => ApiError::storage_failure(),
            EngineError::TransferNotFound(id) => ApiError::of(
                kinds::TRANSFER_NOT_FOUND,
                format!("no transfer {id}"),
            ),
            EngineError::Overloaded => ApiError::overloaded(),
            EngineError::CursorExpired { floor } => {
                let oldest = super::dto::cursor::encode(floor);
                let mut e = ApiError::of(
                    kinds::CURSOR_EXPIRED,
                    format!(
                        "the events after this cursor are no longer kept; the oldest available cursor is {oldest}"
                    ),
                );
                e.members_mut().oldest_cursor = Some(oldest);
                e
            }
            EngineError::CursorAhead { durable } => ApiError::invalid_at(
                "query:after",
                format!(
                    "the cursor is past the end of the log (the newest cursor is {}): it was not made by this server",
                    super::dto::cursor::encode(durable)
                ),
            ),
            EngineError::Internal => ApiError::of(
                kinds::INTERNAL_ERROR,
                "the server could not answer; the error is logged",
            ),
            EngineError::ShuttingDown => {
                ApiError::of(kinds::SHUTTING_DOWN, "the server is shutting down")
            }
        }
    }
}

impl From<OpError> for ApiError {
    fn from(refusal: OpError) -> ApiError {
        match refusal {
            OpError::IdempotencyKeyReused => ApiError::of(
                kinds::IDEMPOTENCY_KEY_REUSED,
                "this Idempotency-Key was used for a different request",
            ),
            OpError::Validation(invalid) => ApiError::out_of_bounds(invalid),
            OpError::HoldNotFound(id) => ApiError::of(
                kinds::HOLD_NOT_FOUND,
                format!("no hold {id} on this account"),
            ),
            OpError::HoldNotOpen(status) => ApiError::of(
                kinds::HOLD_NOT_OPEN,
                format!("the hold is {}", status.as_str()),
            ),
            OpError::AmountExceedsHold { amount, hold } => ApiError::of(
                kinds::AMOUNT_EXCEEDS_HOLD,
                format!("capture of {amount} is more than the hold's {hold}"),
            ),
            OpError::InsufficientFunds {
                available,
                overdraft_limit,
                amount,
            } => {
                let mut error = ApiError::of(
                    kinds::INSUFFICIENT_FUNDS,
                    if overdraft_limit == 0 {
                        format!("available {available} is less than {amount}")
                    } else {
                        format!(
                            "available {available} plus overdraft_limit {overdraft_limit} is less than {amount}"
                        )
                    },
                );
                error.members_mut().funds = Some(Funds {
                    available,
                    requested: amount,
                });
                error
            }
            OpError::CurrencyMismatch { from, to } => ApiError::of(
                kinds::CURRENCY_MISMATCH,
                format!(
                    "the source holds {} and the destination {}",
                    from.as_str(),
                    to.as_str()
                ),
            ),
            OpError::BalanceLimitExceeded { balance, amount } => ApiError::of(
                kinds::BALANCE_LIMIT_EXCEEDED,
                format!(
                    "balance {balance} plus {amount} would exceed {}",
                    crate::domain::AMOUNT_MAX
                ),
            ),
        }
    }
}

impl ApiError {
    /// The answer to a transfer its destination refused after the source was debited: the
    /// error of the refusal, saying that the source was refunded.
    pub fn transfer_failed(record: &TransferRecord, failure: TransferFailure) -> ApiError {
        let refunded = format!(
            "transfer {} failed and its {} went back to {}",
            record.id,
            record.amount.get(),
            record.from
        );
        match failure {
            TransferFailure::AccountNotFound => ApiError::of(
                kinds::ACCOUNT_NOT_FOUND,
                format!("no account with id {}: {refunded}", record.to),
            ),
            TransferFailure::CurrencyMismatch => ApiError::of(
                kinds::CURRENCY_MISMATCH,
                format!("{} has another currency: {refunded}", record.to),
            ),
            TransferFailure::BalanceLimitExceeded => ApiError::of(
                kinds::BALANCE_LIMIT_EXCEEDED,
                format!(
                    "the balance of {} would exceed {}: {refunded}",
                    record.to,
                    crate::domain::AMOUNT_MAX
                ),
            ),
        }
    }

    /// The problem+json body.
    pub fn body(&self) -> serde_json::Value {
        let funds = self.members.as_ref().and_then(|m| m.funds);
        serde_json::to_value(ProblemJson {
            r#type: format!("urn:coffer:error:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            field: self.field(),
            available: funds.map(|f| f.available),
            requested: funds.map(|f| f.requested),
            oldest_cursor: self
                .members
                .as_ref()
                .and_then(|m| m.oldest_cursor.as_deref()),
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

/// RFC 9457 problem details. Clients should branch on `code` and tolerate codes they do not
/// know.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Problem)]
pub struct ProblemJson<'a> {
    /// `urn:coffer:error:{code}`.
    #[schema(examples("urn:coffer:error:insufficient_funds"))]
    pub r#type: String,
    /// Short human title.
    #[schema(examples("Insufficient funds"))]
    pub title: &'a str,
    /// The HTTP status of the answer (for a batch result, of that result).
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What exactly is wrong.
    pub detail: &'a str,
    /// Stable, machine-readable: one of the codes of [`kinds::ALL`].
    #[schema(schema_with = problem_code)]
    pub code: &'a str,
    /// With 400 `invalid_request`, 400 `idempotency_key_missing` and 422 `validation_failed`,
    /// when one value is at fault: where it is. A JSON pointer into the body (`/amount`,
    /// `/metadata`, `/operations/3/account`; `""` for the body as a whole), or
    /// `header:Idempotency-Key`, `query:limit`, `path:hold_id` for a header, a query
    /// parameter or a path parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(examples(
        "/amount",
        "/operations/3/idempotency_key",
        "header:Idempotency-Key",
        "query:limit"
    ))]
    pub field: Option<&'a str>,
    /// With `insufficient_funds`: the account's available money when the request was decided
    /// (negative only with an overdraft).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = super::schema::signed_money)]
    pub available: Option<i64>,
    /// With `insufficient_funds`: the amount the request needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = super::schema::amount)]
    pub requested: Option<u64>,
    /// With `cursor_expired`: the oldest cursor still available.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^e[0-9a-f]{16}$")]
    pub oldest_cursor: Option<&'a str>,
}

/// Where a single endpoint takes each value a domain refusal can name (`None`: no value of
/// the client's is at fault).
pub fn body_field(field: Field) -> Option<&'static str> {
    match field {
        Field::Amount => Some("/amount"),
        Field::ExpiresInSecs => Some("/expires_in_secs"),
        Field::Metadata => Some("/metadata"),
        Field::Currency => Some("/currency"),
        Field::OverdraftLimit => Some("/overdraft_limit"),
        Field::To => Some("/to"),
        Field::IdempotencyKey => Some(IDEMPOTENCY_KEY_HEADER),
        Field::AccountId | Field::Request => None,
    }
}

/// The `field` of a problem about the `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "header:Idempotency-Key";

/// The schema of a problem's `code`: every code the server answers with.
fn problem_code() -> utoipa::openapi::schema::Object {
    let mut codes: Vec<&'static str> = Vec::new();
    for kind in kinds::ALL {
        if !codes.contains(&kind.code) {
            codes.push(kind.code);
        }
    }
    let mut object = super::schema::one_of_strings(codes);
    object.examples = vec![serde_json::json!("insufficient_funds")];
    object
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
