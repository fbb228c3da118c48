//! JSON Schemas of the values the API takes and gives, for the OpenAPI document. Their bounds
//! come from the same constants the parsers and the domain check, so the document cannot
//! promise what the server refuses.

use std::borrow::Cow;

use serde_json::json;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, Discriminator, Object, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{KnownFormat, Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::{
    HoldStatus, TransferStatus, TxKind, ACCOUNT_ID_BYTES_MAX, AMOUNT_MAX, CURRENCY_BYTES_MAX,
    HOLD_EXPIRES_SECS_DEFAULT, HOLD_EXPIRES_SECS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, METADATA_KEYS_MAX,
    METADATA_KEY_CHARS_MAX, METADATA_VALUE_CHARS_MAX,
};

/// The pattern of an account id (docs/API.md: 1..=128 of `[A-Za-z0-9._:-]`).
pub const ACCOUNT_ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";
/// The pattern of a currency (docs/API.md: 1..=16 of `[A-Z0-9_]`).
pub const CURRENCY_PATTERN: &str = "^[A-Z0-9_]{1,16}$";
/// The pattern of an idempotency key (1..=255 visible ASCII characters).
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";

const _: () = assert!(ACCOUNT_ID_BYTES_MAX == 128);
const _: () = assert!(CURRENCY_BYTES_MAX == 16);
const _: () = assert!(IDEMPOTENCY_KEY_BYTES_MAX == 255);

/// The largest amount (2^53-1 fits an i64 with room to spare).
const AMOUNT_MAX_I64: i64 = AMOUNT_MAX as i64;
const _: () = assert!(AMOUNT_MAX_I64 as u64 == AMOUNT_MAX);

/// An integer schema within `minimum..=maximum`.
pub fn integer(minimum: i64, maximum: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(minimum))
        .maximum(Some(maximum))
}

/// `amount`: an integer in 1..=2^53-1.
pub fn amount() -> Object {
    integer(1, AMOUNT_MAX_I64).build()
}

/// `amount` of a capture: optional, the whole hold when absent.
pub fn capture_amount() -> Object {
    integer(1, AMOUNT_MAX_I64)
        .description(Some("How much to capture; absent means the whole hold."))
        .build()
}

/// `overdraft_limit`: an integer in 0..=2^53-1, default 0.
pub fn overdraft_limit() -> Object {
    integer(0, AMOUNT_MAX_I64)
        .default(Some(json!(0)))
        .description(Some("How far available may go below zero."))
        .build()
}

/// `expires_in_secs`: 1..=2592000, default 3600.
pub fn expires_in_secs() -> Object {
    integer(1, i64::from(HOLD_EXPIRES_SECS_MAX))
        .default(Some(json!(HOLD_EXPIRES_SECS_DEFAULT)))
        .description(Some(
            "Lifetime of the hold. For idempotency, an absent value and an explicit 3600 are different requests.",
        ))
        .build()
}

/// A signed money value (balance, available): within ±(2^53-1).
pub fn signed_money() -> Object {
    integer(-AMOUNT_MAX_I64, AMOUNT_MAX_I64).build()
}

/// An unsigned money value (held, captured): within 0..=2^53-1.
pub fn unsigned_money() -> Object {
    integer(0, AMOUNT_MAX_I64).build()
}

/// A count or sequence number: 0 and up.
pub fn count() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .build()
}

/// A UUID string.
pub fn uuid() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .build()
}

/// A UUID string or null.
pub fn uuid_or_null() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .build()
}

/// An RFC 3339 UTC time with milliseconds.
pub fn timestamp() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .description(Some(
            "RFC 3339, UTC, milliseconds, e.g. 2026-11-22T01:02:03.456Z.",
        ))
        .build()
}

/// A string that is one of `values`.
pub fn one_of_strings(values: impl IntoIterator<Item = &'static str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

/// A transaction's `kind`.
pub fn tx_kind() -> Object {
    one_of_strings(TxKind::ALL.map(TxKind::as_str))
}

/// A hold's `status`.
pub fn hold_status() -> Object {
    one_of_strings(HOLD_STATUSES.map(HoldStatus::as_str))
}

/// Every hold status.
pub const HOLD_STATUSES: [HoldStatus; 4] = [
    HoldStatus::Open,
    HoldStatus::Captured,
    HoldStatus::Released,
    HoldStatus::Expired,
];

/// A transfer's `status`.
pub fn transfer_status() -> Object {
    one_of_strings(
        [
            TransferStatus::Pending,
            TransferStatus::Completed,
            TransferStatus::Failed(crate::domain::TransferFailure::AccountNotFound),
        ]
        .map(TransferStatus::as_str),
    )
}

/// A failed transfer's `failure_code`.
pub fn transfer_failure_code() -> Object {
    use crate::domain::TransferFailure;
    let mut object = one_of_strings(
        [
            TransferFailure::AccountNotFound,
            TransferFailure::CurrencyMismatch,
            TransferFailure::BalanceLimitExceeded,
        ]
        .map(TransferFailure::code),
    );
    object.description = Some("Only on a failed transfer: why the destination refused.".into());
    object
}

/// An idempotency key: 1..=255 visible ASCII characters.
pub fn idempotency_key() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(IDEMPOTENCY_KEY_BYTES_MAX))
        .pattern(Some(IDEMPOTENCY_KEY_PATTERN))
        .build()
}

/// The `AccountId` component.
pub struct AccountIdSchema;

impl PartialSchema for AccountIdSchema {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(ACCOUNT_ID_PATTERN))
            .min_length(Some(1))
            .max_length(Some(ACCOUNT_ID_BYTES_MAX))
            .examples([json!("player-42")])
            .into()
    }
}

impl ToSchema for AccountIdSchema {
    fn name() -> Cow<'static, str> {
        "AccountId".into()
    }
}

/// The `Currency` component.
pub struct CurrencySchema;

impl PartialSchema for CurrencySchema {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(CURRENCY_PATTERN))
            .min_length(Some(1))
            .max_length(Some(CURRENCY_BYTES_MAX))
            .examples([json!("GEM"), json!("EUR")])
            .into()
    }
}

impl ToSchema for CurrencySchema {
    fn name() -> Cow<'static, str> {
        "Currency".into()
    }
}

/// The `Metadata` component.
pub struct MetadataSchema;

impl PartialSchema for MetadataSchema {
    fn schema() -> RefOr<Schema> {
        let value = ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(METADATA_VALUE_CHARS_MAX));
        let key = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(METADATA_KEY_CHARS_MAX))
            .build();
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "Free-form string pairs, stored and returned as given: at most 16 keys of 1..=40 characters, values of at most 500 characters (characters are Unicode scalar values). Absent is the same as {}; null or a key given twice is refused (400). Values outside the limits are 422.",
            ))
            .max_properties(Some(METADATA_KEYS_MAX))
            .additional_properties(Some(value))
            .property_names(Some(key))
            .into()
    }
}

impl ToSchema for MetadataSchema {
    fn name() -> Cow<'static, str> {
        "Metadata".into()
    }
}

/// A transaction's `seq`: 1 and up.
pub fn seq() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .build()
}

/// The `next` cursor of a transactions page: a seq as a decimal string, or null.
pub fn seq_cursor() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some("^[1-9][0-9]*$"))
        .build()
}

/// The original status in an idempotency-key lookup.
pub fn lookup_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .enum_values(Some([200, 201, 202, 404, 409]))
        .build()
}

/// The original body in an idempotency-key lookup.
pub fn lookup_response() -> Schema {
    Schema::OneOf(
        OneOfBuilder::new()
            .item(Ref::from_schema_name("Receipt"))
            .item(Ref::from_schema_name("TransferReceipt"))
            .item(Ref::from_schema_name("Problem"))
            .build(),
    )
}

/// The body of one batch result.
pub fn batch_result_body() -> Schema {
    Schema::OneOf(
        OneOfBuilder::new()
            .item(Ref::from_schema_name("Receipt"))
            .item(Ref::from_schema_name("Problem"))
            .build(),
    )
}

/// The constant `ok`.
pub fn const_ok() -> Object {
    one_of_strings(["ok"])
}

/// The constant `ready`.
pub fn const_ready() -> Object {
    one_of_strings(["ready"])
}

/// The `BatchOperation` component: a `oneOf` of one named schema per `op` (see
/// [`BATCH_OPS`]), each with exactly the fields of its single endpoint's body plus `op`,
/// `account` and its own `idempotency_key`, told apart by `op` (a discriminator with a
/// mapping, so that generated clients pick the variant by it instead of by trial).
pub struct BatchOperation;

/// Each batch `op` and the name of its schema.
pub const BATCH_OPS: [(&str, &str); 5] = [
    ("credit", "BatchCredit"),
    ("debit", "BatchDebit"),
    ("hold", "BatchHold"),
    ("capture", "BatchCapture"),
    ("release", "BatchRelease"),
];

impl PartialSchema for BatchOperation {
    fn schema() -> RefOr<Schema> {
        let mapping = BATCH_OPS.map(|(op, name)| (op, format!("#/components/schemas/{name}")));
        let mut one_of = OneOfBuilder::new()
            .description(Some(
                "One operation of a batch, with the fields of its single endpoint's body plus `op`, `account` and its own `idempotency_key` (scoped to `account`). A malformed operation is answered with 400 in its own result; the rest of the batch proceeds.",
            ))
            .discriminator(Some(Discriminator::with_mapping("op", mapping)));
        for (_, name) in BATCH_OPS {
            one_of = one_of.item(Ref::from_schema_name(name));
        }
        one_of.into()
    }
}

impl ToSchema for BatchOperation {
    fn name() -> Cow<'static, str> {
        "BatchOperation".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        for (op, name) in BATCH_OPS {
            schemas.push((name.to_string(), batch_variant(op).into()));
        }
    }
}

/// The schema of one batch `op`.
fn batch_variant(op: &'static str) -> Object {
    let amount = || RefOr::from(Schema::Object(amount()));
    let hold_id = || RefOr::from(Schema::Object(uuid()));
    let fields: Vec<(&'static str, RefOr<Schema>, bool)> = match op {
        "credit" | "debit" => vec![("amount", amount(), true)],
        "hold" => vec![
            ("amount", amount(), true),
            (
                "expires_in_secs",
                RefOr::from(Schema::Object(expires_in_secs())),
                false,
            ),
        ],
        "capture" => vec![
            ("hold_id", hold_id(), true),
            (
                "amount",
                RefOr::from(Schema::Object(capture_amount())),
                false,
            ),
        ],
        _ => vec![("hold_id", hold_id(), true)],
    };
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .property("op", one_of_strings([op]))
        .required("op")
        .property("account", Ref::from_schema_name("AccountId"))
        .required("account")
        .property("idempotency_key", idempotency_key())
        .required("idempotency_key");
    for (name, schema, required) in fields {
        object = object.property(name, schema);
        if required {
            object = object.required(name);
        }
    }
    object
        .property("metadata", Ref::from_schema_name("Metadata"))
        .build()
}

/// `limit` of a list: 1..=1000, default 100.
pub fn list_limit() -> Object {
    integer(1, LIST_LIMIT_MAX_I64)
        .default(Some(json!(super::LIST_LIMIT_DEFAULT)))
        .build()
}

const LIST_LIMIT_MAX_I64: i64 = super::LIST_LIMIT_MAX as i64;

/// `before_seq` of the transactions list: a seq, 1..=2^64-1 (what the server parses).
pub fn before_seq() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(u64::MAX))
        .build()
}

/// The pattern of an event-stream cursor (`dto::cursor`): `e` and 16 lowercase hex digits.
pub const EVENT_CURSOR_PATTERN: &str = "^e[0-9a-f]{16}$";

/// An event-stream cursor.
pub fn event_cursor() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(EVENT_CURSOR_PATTERN))
        .examples([json!("e00000000000003e8")])
        .build()
}

/// `wait_ms` of the event stream: 0..=30000 (default 0).
pub fn wait_ms() -> Object {
    integer(0, super::events::EVENTS_WAIT_MS_MAX as i64)
        .default(Some(json!(0)))
        .build()
}

/// An account id as a query parameter.
pub fn account_id() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(ACCOUNT_ID_PATTERN))
        .min_length(Some(1))
        .max_length(Some(ACCOUNT_ID_BYTES_MAX))
        .build()
}

/// A query parameter's schema: `value`, or the empty string, which the server takes as the
/// parameter being absent (docs/API.md's list URL is the template `?status=open&limit=&after=`, so
/// clients may send unused parameters empty). The non-empty form keeps `value`'s exact bounds,
/// format or enum; only a zero-length string is added. `meaning` describes the parameter
/// (utoipa does not carry a field's doc comment into a `schema_with` parameter).
pub fn or_empty(value: Object, meaning: &str) -> Schema {
    let empty = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(0));
    AnyOfBuilder::new()
        .item(value)
        .item(empty)
        .description(Some(format!(
            "{meaning} An empty value counts as absent, the same as leaving the parameter out."
        )))
        .into()
}

/// `status` of the holds list, or empty (absent).
pub fn query_hold_status() -> Schema {
    or_empty(
        hold_status(),
        "Only holds of this status; absent lists every status.",
    )
}

/// `limit` of a list, or empty (absent: the default).
pub fn query_list_limit() -> Schema {
    or_empty(list_limit(), "Page size, 1..=1000 (default 100).")
}

/// `after` of the holds list (a hold id), or empty (absent: the first page).
pub fn query_after_hold() -> Schema {
    or_empty(
        uuid(),
        "Cursor: the `next` of the previous page (a hold id); lists holds created after it.",
    )
}

/// `before_seq` of the transactions list, or empty (absent: the newest first).
pub fn query_before_seq() -> Schema {
    or_empty(
        before_seq(),
        "Cursor: the `next` of the previous page; lists transactions with a smaller seq.",
    )
}

/// `after` of the event stream (a cursor), or empty (absent: the oldest event kept).
pub fn query_event_cursor() -> Schema {
    or_empty(
        event_cursor(),
        "Cursor: only events after it (`next` of the previous page, or an event's `cursor`); absent: from the oldest event kept.",
    )
}

/// `wait_ms` of the event stream, or empty (absent: 0).
pub fn query_wait_ms() -> Schema {
    or_empty(
        wait_ms(),
        "How long to wait (ms) for an event when none is newer than `after` (long poll), 0..=30000 (default 0).",
    )
}

/// `account` filter of the event stream, or empty (absent: every account).
pub fn query_account() -> Schema {
    or_empty(account_id(), "Only this account's transactions.")
}

/// `kind` filter of the event stream, or empty (absent: every kind).
pub fn query_tx_kind() -> Schema {
    or_empty(tx_kind(), "Only transactions of this kind.")
}
