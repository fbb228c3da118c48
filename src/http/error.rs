//! The one place where failures become HTTP answers: RFC 9457 problem+json with a stable
//! machine-readable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::domain::{OpError, TransferFailure, TransferRecord};
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
    /// Seconds for `Retry-After`, on 503.
    pub retry_after_secs: Option<u32>,
    /// One more member of the problem body (RFC 9457 extension), e.g. the oldest cursor of
    /// a 410 `cursor_expired`.
    pub extension: Option<(&'static str, String)>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            title,
            detail: detail.into(),
            retry_after_secs: None,
            extension: None,
        }
    }

    /// 400 `invalid_request`: malformed JSON, wrong types, bad ids, bad query.
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Invalid request",
            detail,
        )
    }

    /// 400 `idempotency_key_missing`.
    pub fn key_missing() -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_missing",
            "Idempotency-Key missing",
            "this request moves money and needs an Idempotency-Key header",
        )
    }

    /// 422 `validation_failed`: a well-formed value out of bounds.
    pub fn validation(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "Validation failed",
            detail,
        )
    }

    /// 413 `payload_too_large`.
    pub fn too_large(limit_bytes: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Payload too large",
            format!("request bodies are limited to {limit_bytes} bytes"),
        )
    }

    /// 503 `not_ready`.
    pub fn not_ready() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Not ready",
            "recovery is still running",
        );
        e.retry_after_secs = Some(1);
        e
    }

    /// 401 `unauthorized`: no bearer token, or not a configured one.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "this endpoint needs Authorization: Bearer with a valid token",
        )
    }

    /// 429 `rate_limited`, to be retried after `retry_after_secs`.
    pub fn rate_limited(retry_after_secs: u32) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Rate limited",
            "too many requests for this client; retry after the Retry-After seconds",
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 503 `overloaded`: the request took longer than the request timeout. A change it
    /// carried may still be applied; retrying with the same Idempotency-Key tells.
    pub fn timed_out(timeout: std::time::Duration) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            format!(
                "the request took longer than {} ms; a change may still be applied, retry with the same Idempotency-Key",
                timeout.as_millis()
            ),
        );
        e.retry_after_secs = Some(1);
        e
    }

    /// 503 `overloaded`: an account actor's mailbox stayed full.
    pub fn overloaded() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            "the server has too much queued work; nothing was applied, retry later",
        );
        e.retry_after_secs = Some(1);
        e
    }

    /// 503 `storage_failure`.
    pub fn storage_failure() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failure",
            "Storage failure",
            "the write-ahead log could not be written or synced; writes are stopped",
        )
    }

    /// 404 for a path that names no resource.
    pub fn no_route() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            "no such endpoint",
        )
    }

    /// 405 for a known path with another method.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            "this endpoint does not take this method",
        )
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::AccountNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "account_not_found",
                "Account not found",
                format!("no account with id {id}"),
            ),
            EngineError::AccountExists {
                currency,
                overdraft_limit,
            } => ApiError::new(
                StatusCode::CONFLICT,
                "account_exists",
                "Account exists",
                format!(
                    "the account exists with currency {currency} and overdraft_limit {overdraft_limit}"
                ),
            ),
            EngineError::Op(refusal) => refusal.into(),
            EngineError::StorageFailure => ApiError::storage_failure(),
            EngineError::TransferNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "transfer_not_found",
                "Transfer not found",
                format!("no transfer {id}"),
            ),
            EngineError::Overloaded => ApiError::overloaded(),
            EngineError::CursorExpired { floor } => {
                let oldest = super::dto::cursor::encode(floor);
                let mut e = ApiError::new(
                    StatusCode::GONE,
                    "cursor_expired",
                    "Cursor expired",
                    format!(
                        "the events after this cursor are no longer kept; the oldest available cursor is {oldest}"
                    ),
                );
                e.extension = Some(("oldest_cursor", oldest));
                e
            }
            EngineError::CursorAhead { durable } => ApiError::invalid(format!(
                "the cursor is past the end of the log (the newest cursor is {}): it was not made by this server",
                super::dto::cursor::encode(durable)
            )),
            EngineError::Internal => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
                "the server could not answer; the error is logged",
            ),
            EngineError::ShuttingDown => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Shutting down",
                    "the server is shutting down",
                );
                e.retry_after_secs = Some(1);
                e
            }
        }
    }
}

impl From<OpError> for ApiError {
    fn from(refusal: OpError) -> ApiError {
        match refusal {
            OpError::IdempotencyKeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency key reused",
                "this Idempotency-Key was used for a different request",
            ),
            OpError::Validation(detail) => ApiError::validation(detail),
            OpError::HoldNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "hold_not_found",
                "Hold not found",
                format!("no hold {id} on this account"),
            ),
            OpError::HoldNotOpen(status) => ApiError::new(
                StatusCode::CONFLICT,
                "hold_not_open",
                "Hold not open",
                format!("the hold is {}", status.as_str()),
            ),
            OpError::AmountExceedsHold { amount, hold } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "amount_exceeds_hold",
                "Amount exceeds hold",
                format!("capture of {amount} is more than the hold's {hold}"),
            ),
            OpError::InsufficientFunds {
                available,
                overdraft_limit,
                amount,
            } => ApiError::new(
                StatusCode::CONFLICT,
                "insufficient_funds",
                "Insufficient funds",
                if overdraft_limit == 0 {
                    format!("available {available} is less than {amount}")
                } else {
                    format!(
                        "available {available} plus overdraft_limit {overdraft_limit} is less than {amount}"
                    )
                },
            ),
            OpError::CurrencyMismatch { from, to } => ApiError::new(
                StatusCode::CONFLICT,
                "currency_mismatch",
                "Currency mismatch",
                format!(
                    "the source holds {} and the destination {}",
                    from.as_str(),
                    to.as_str()
                ),
            ),
            OpError::BalanceLimitExceeded { balance, amount } => ApiError::new(
                StatusCode::CONFLICT,
                "balance_limit_exceeded",
                "Balance limit exceeded",
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
            TransferFailure::AccountNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "account_not_found",
                "Account not found",
                format!("no account with id {}: {refunded}", record.to),
            ),
            TransferFailure::CurrencyMismatch => ApiError::new(
                StatusCode::CONFLICT,
                "currency_mismatch",
                "Currency mismatch",
                format!("{} has another currency: {refunded}", record.to),
            ),
            TransferFailure::BalanceLimitExceeded => ApiError::new(
                StatusCode::CONFLICT,
                "balance_limit_exceeded",
                "Balance limit exceeded",
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
        let mut body = serde_json::json!({
            "type": format!("urn:coffer:error:{}", self.code),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if let (Some((name, value)), Some(map)) = (&self.extension, body.as_object_mut()) {
            map.insert((*name).to_string(), serde_json::Value::from(value.as_str()));
        }
        body
    }
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
