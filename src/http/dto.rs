//! JSON shapes: request bodies (strict: unknown fields refused, numbers must be JSON
//! integers) and response bodies (serialized straight from domain values).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::schema::{self, AccountIdSchema, CurrencySchema, MetadataSchema};
use crate::domain::{
    AccountView, Hold, Metadata, Receipt, Transaction, TransferRecord, TransferStatus,
};

/// A JSON number whose exact value is an integer, kept wide so that out-of-range values
/// reach validation (422) while a string, boolean, null or a number with a fractional part
/// is a type error (400).
///
/// The number is read from its literal text, never through a float: `46`, `46.0`, `4.6e1`
/// and `460e-1` are all 46, while `4503599627370497.5` and `3000000000000000.1` stay
/// fractions (a float would round them to integers). JSON Schema calls `46.0` an integer
/// too, so a client that writes integers as `46.0` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonInt(pub i128);

impl<'de> Deserialize<'de> for JsonInt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<JsonInt, D::Error> {
        // The raw text of the value. It borrows from the request body, which every caller
        // parses from a byte slice.
        let raw = <&'de RawValue>::deserialize(deserializer)?;
        let text = raw.get().trim();
        match exact_integer(text) {
            Ok(value) => Ok(JsonInt(value)),
            Err(NotInteger::Fraction) => Err(de::Error::invalid_value(
                de::Unexpected::Other("a number with a fractional part"),
                &"an integer",
            )),
            Err(NotInteger::NotNumber) => Err(de::Error::invalid_type(
                unexpected_json(text),
                &"an integer",
            )),
        }
    }
}

/// Why a JSON value is not an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotInteger {
    /// A number whose exact value has a fractional part.
    Fraction,
    /// Not a number at all.
    NotNumber,
}

/// Integers beyond this many decimal digits are out of every range anyway; they saturate.
const EXACT_DIGITS_MAX: i64 = 38;

/// The exact value of a JSON number literal (`-?int(.frac)?([eE][+-]?exp)?`) if it is an
/// integer. Magnitudes beyond `i128` saturate (they are out of every range, so 422).
pub(crate) fn exact_integer(text: &str) -> Result<i128, NotInteger> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], Some(&rest[at + 1..])),
        None => (rest, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((int_part, frac_part)) => (int_part, frac_part),
        None => (mantissa, ""),
    };
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(int_part) || (mantissa.contains('.') && !digits_only(frac_part)) {
        return Err(NotInteger::NotNumber);
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(exp) => {
            let (sign, digits) = match exp.as_bytes().first() {
                Some(b'-') => (-1, &exp[1..]),
                Some(b'+') => (1, &exp[1..]),
                _ => (1, exp),
            };
            if !digits_only(digits) {
                return Err(NotInteger::NotNumber);
            }
            // Saturates: any exponent past a billion decides the matter as well as the real
            // one (the body holds at most a million digits).
            let magnitude = digits
                .trim_start_matches('0')
                .parse::<i64>()
                .unwrap_or(if digits.trim_start_matches('0').is_empty() {
                    0
                } else {
                    1_000_000_000
                })
                .min(1_000_000_000);
            sign * magnitude
        }
    };
    // The value is `significant × 10^scale`, with no leading or trailing zero digits.
    let all_digits = format!("{int_part}{frac_part}");
    let significant = all_digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    let frac_len = i64::try_from(frac_part.len()).unwrap_or(i64::MAX);
    let trailing = i64::try_from(significant.len() - trimmed.len()).unwrap_or(i64::MAX);
    let scale = exponent - frac_len + trailing;
    if scale < 0 {
        return Err(NotInteger::Fraction);
    }
    let width = i64::try_from(trimmed.len()).unwrap_or(i64::MAX);
    let saturated = if negative { i128::MIN } else { i128::MAX };
    if width + scale > EXACT_DIGITS_MAX {
        return Ok(saturated);
    }
    let mut value: i128 = 0;
    for digit in trimmed.bytes() {
        value = value * 10 + i128::from(digit - b'0');
    }
    for _ in 0..scale {
        value *= 10;
    }
    Ok(if negative { -value } else { value })
}

/// How serde should name a JSON value that is not a number, for the error message.
fn unexpected_json(text: &str) -> de::Unexpected<'_> {
    match text.as_bytes().first() {
        Some(b'"') => de::Unexpected::Other("a string"),
        Some(b't') => de::Unexpected::Bool(true),
        Some(b'f') => de::Unexpected::Bool(false),
        Some(b'n') => de::Unexpected::Other("null"),
        Some(b'[') => de::Unexpected::Seq,
        Some(b'{') => de::Unexpected::Map,
        _ => de::Unexpected::Other("a value"),
    }
}

/// For optional integer fields: absent is `None`, but an explicit `null` is refused.
fn present_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<JsonInt>, D::Error> {
    JsonInt::deserialize(d).map(Some)
}

/// For optional metadata: absent is empty; an explicit `null`, a non-string value or a key
/// given twice is refused (a silently dropped duplicate would be a typo passing).
fn present_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct MapVisitor;
    impl<'de> Visitor<'de> for MapVisitor {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = BTreeMap::new();
            while let Some((key, value)) = access.next_entry::<String, String>()? {
                if map.contains_key(&key) {
                    return Err(de::Error::custom(format!("duplicate metadata key {key:?}")));
                }
                map.insert(key, value);
            }
            Ok(map)
        }
    }
    d.deserialize_map(MapVisitor)
}

/// `PUT /v1/accounts/{id}`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AccountRequest, description = "The account to open: its currency and optional overdraft limit and metadata.")]
pub struct AccountBody {
    /// Currency code.
    #[schema(value_type = CurrencySchema)]
    pub currency: String,
    /// Overdraft limit.
    #[serde(default, deserialize_with = "present_int")]
    #[schema(schema_with = schema::overdraft_limit)]
    pub overdraft_limit: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../credits` and `.../debits`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = MoveRequest, description = "A credit or debit.")]
pub struct MoveBody {
    /// Amount, in the account's minor unit.
    #[schema(schema_with = schema::amount)]
    pub amount: JsonInt,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../holds`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HoldRequest, description = "A hold.")]
pub struct HoldBody {
    /// Amount to hold, in the account's minor unit.
    #[schema(schema_with = schema::amount)]
    pub amount: JsonInt,
    /// Lifetime in seconds.
    #[serde(default, deserialize_with = "present_int")]
    #[schema(schema_with = schema::expires_in_secs)]
    pub expires_in_secs: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../capture`
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CaptureRequest, description = "A capture; an empty body is the same as `{}`.")]
pub struct CaptureBody {
    /// Amount to capture (default: all).
    #[serde(default, deserialize_with = "present_int")]
    #[schema(schema_with = schema::capture_amount)]
    pub amount: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../release`
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ReleaseRequest, description = "A release; an empty body is the same as `{}`.")]
pub struct ReleaseBody {
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/transfers`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TransferRequest, description = "A transfer from one account to another of the same currency.")]
pub struct TransferBody {
    /// Source account id.
    #[schema(value_type = AccountIdSchema)]
    pub from: String,
    /// Destination account id; must differ from `from` (else 422 validation_failed).
    #[schema(value_type = AccountIdSchema)]
    pub to: String,
    /// Amount, in the accounts' minor unit.
    #[schema(schema_with = schema::amount)]
    pub amount: JsonInt,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    #[schema(value_type = MetadataSchema)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/batch`: the operations stay raw JSON text here so that one malformed operation
/// is answered on its own (400 in its result) instead of refusing the whole batch, and so
/// that their numbers are read exactly (see [`JsonInt`]).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchRequest, description = "Up to 1,000 operations.")]
pub struct BatchBody<'a> {
    /// The operations, 1..=1000.
    #[serde(borrow)]
    #[schema(value_type = Vec<schema::BatchOperation>, min_items = 1, max_items = 1000)]
    pub operations: Vec<&'a RawValue>,
}

/// One operation of a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchOpBody {
    /// credit, debit, hold, capture or release.
    pub op: String,
    /// Account id.
    pub account: String,
    /// The operation's own idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Amount (required for credit, debit, hold; optional for capture).
    #[serde(default, deserialize_with = "present_int")]
    pub amount: Option<JsonInt>,
    /// Hold id (capture, release).
    #[serde(default)]
    pub hold_id: Option<String>,
    /// Hold lifetime (hold).
    #[serde(default, deserialize_with = "present_int")]
    pub expires_in_secs: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// Query of `GET .../holds`. A parameter given empty (`?limit=&after=`) counts as absent.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HoldsQuery {
    /// Only holds of this status; absent or empty lists every status.
    #[param(schema_with = schema::query_hold_status)]
    pub status: Option<String>,
    /// Page size, 1..=1000 (default 100, also when empty).
    #[param(schema_with = schema::query_list_limit)]
    pub limit: Option<String>,
    /// Cursor: the `next` of the previous page (a hold id); lists holds created after it.
    /// Absent or empty: the first page.
    #[param(schema_with = schema::query_after_hold)]
    pub after: Option<String>,
}

/// Query of `GET .../transactions`. A parameter given empty counts as absent.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TransactionsQuery {
    /// Page size, 1..=1000 (default 100, also when empty).
    #[param(schema_with = schema::query_list_limit)]
    pub limit: Option<String>,
    /// Cursor: the `next` of the previous page; lists transactions with a smaller seq.
    /// Absent or empty: the newest first.
    #[param(schema_with = schema::query_before_seq)]
    pub before_seq: Option<String>,
}

/// Query of `GET /v1/events`
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Cursor: only events after it (`next` of the previous page, or an event's `cursor`).
    /// Omitted: from the oldest event kept.
    #[param(schema_with = schema::query_event_cursor)]
    pub after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(schema_with = schema::query_list_limit)]
    pub limit: Option<String>,
    /// How long to wait (ms) for an event when none is newer than `after` (long poll).
    #[param(schema_with = schema::query_wait_ms)]
    pub wait_ms: Option<String>,
    /// Only this account's transactions.
    #[param(schema_with = schema::query_account)]
    pub account: Option<String>,
    /// Only transactions of this kind.
    #[param(schema_with = schema::query_tx_kind)]
    pub kind: Option<String>,
}

/// Event-stream cursors: opaque to clients, here `e` followed by the 16 lowercase hex digits
/// of the log position (LSN) of the last record the page looked at. Fixed width, so cursors
/// also sort in commit order as strings.
pub mod cursor {
    const PREFIX: char = 'e';
    const DIGITS: usize = 16;

    /// The cursor of a position.
    pub fn encode(lsn: u64) -> String {
        format!("{PREFIX}{lsn:016x}")
    }

    /// The position of a cursor; `None` if the text is not one this server makes.
    pub fn decode(text: &str) -> Option<u64> {
        let hex = text.strip_prefix(PREFIX)?;
        if hex.len() != DIGITS
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cursors_round_trip_and_refuse_anything_else() {
            for lsn in [0, 1, 255, u64::MAX] {
                assert_eq!(decode(&encode(lsn)), Some(lsn));
            }
            assert_eq!(encode(255), "e00000000000000ff");
            for bad in [
                "",
                "e",
                "e00000000000000FF",
                "x00000000000000ff",
                "e0ff",
                "e+0000000000000ff",
                "e00000000000000ff0",
            ] {
                assert_eq!(decode(bad), None, "{bad:?}");
            }
        }
    }
}

/// One event of the stream: `{"cursor", "transaction"}`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Event)]
pub struct EventJson<'a> {
    /// Opaque position of this event; pass it as `after` (or `Last-Event-ID`) to continue
    /// after it.
    #[schema(schema_with = schema::event_cursor)]
    pub cursor: String,
    /// The transaction, exactly as `GET .../transactions` shows it.
    pub transaction: TransactionJson<'a>,
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-22T01:02:03.456Z`.
pub struct Timestamp(pub u64);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let time = UNIX_EPOCH + Duration::from_millis(self.0);
        s.collect_str(&humantime::format_rfc3339_millis(time))
    }
}

/// Metadata as a JSON object.
pub struct MetadataJson<'a>(pub &'a Metadata);

impl Serialize for MetadataJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// An account: `available = balance - held`, never below `-overdraft_limit`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Account, examples(json!({"id": "player-42", "currency": "GEM", "balance": 1500,
    "held": 200, "available": 1300, "overdraft_limit": 0, "open_holds": 1, "seq": 7,
    "created_at": "2026-11-22T01:02:03.456Z", "metadata": {}})))]
pub struct AccountJson<'a> {
    #[schema(value_type = AccountIdSchema)]
    id: &'a str,
    #[schema(value_type = CurrencySchema)]
    currency: &'a str,
    /// Posted money, in minor units. Negative only with an overdraft.
    #[schema(schema_with = schema::signed_money)]
    balance: i64,
    /// Sum of the open holds.
    #[schema(schema_with = schema::unsigned_money)]
    held: u64,
    /// balance - held; never below -overdraft_limit.
    #[schema(schema_with = schema::signed_money)]
    available: i64,
    /// How far available may go below zero.
    #[schema(schema_with = schema::unsigned_money)]
    overdraft_limit: u64,
    /// Number of open holds.
    #[schema(schema_with = schema::count)]
    open_holds: u32,
    /// Number of changes so far (0 for a new account).
    #[schema(schema_with = schema::count)]
    seq: u64,
    #[schema(schema_with = schema::timestamp)]
    created_at: Timestamp,
    #[schema(value_type = MetadataSchema)]
    metadata: MetadataJson<'a>,
}

impl<'a> From<&'a AccountView> for AccountJson<'a> {
    fn from(a: &'a AccountView) -> AccountJson<'a> {
        AccountJson {
            id: a.id.as_str(),
            currency: a.currency.as_str(),
            balance: a.balance,
            held: a.held,
            available: a.available,
            overdraft_limit: a.overdraft_limit,
            open_holds: a.open_holds,
            seq: a.seq,
            created_at: Timestamp(a.created_at_ms),
            metadata: MetadataJson(&a.metadata),
        }
    }
}

/// One change of one account; `balance`, `held` and `available` are the values just after
/// it.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Transaction)]
pub struct TransactionJson<'a> {
    /// UUID v7.
    #[schema(schema_with = schema::uuid)]
    id: String,
    #[schema(value_type = AccountIdSchema)]
    account_id: &'a str,
    /// The account's seq after this change: 1, 2, 3, ... with no gap.
    #[schema(schema_with = schema::seq)]
    seq: u64,
    /// What changed.
    #[schema(schema_with = schema::tx_kind)]
    kind: &'static str,
    /// The amount moved: for a capture the captured amount, for a release or expire the
    /// hold's amount, for a transfer half the transfer's amount.
    #[schema(schema_with = schema::amount)]
    amount: u64,
    /// The hold of a hold, capture, release or expire; null otherwise.
    #[schema(schema_with = schema::uuid_or_null, required = true)]
    hold_id: Option<String>,
    /// The transfer of a transfer_out or transfer_in; null otherwise.
    #[schema(schema_with = schema::uuid_or_null, required = true)]
    transfer_id: Option<String>,
    /// Balance just after this change.
    #[schema(schema_with = schema::signed_money)]
    balance: i64,
    /// Held just after this change.
    #[schema(schema_with = schema::unsigned_money)]
    held: u64,
    /// Available just after this change.
    #[schema(schema_with = schema::signed_money)]
    available: i64,
    #[schema(schema_with = schema::timestamp)]
    created_at: Timestamp,
    /// The metadata of the request ({} for expire).
    #[schema(value_type = MetadataSchema)]
    metadata: MetadataJson<'a>,
}

impl<'a> From<&'a Transaction> for TransactionJson<'a> {
    fn from(t: &'a Transaction) -> TransactionJson<'a> {
        TransactionJson {
            id: t.id.to_string(),
            account_id: t.account_id.as_str(),
            seq: t.seq,
            kind: t.kind.as_str(),
            amount: t.amount,
            hold_id: t.hold_id.map(|h| h.to_string()),
            transfer_id: t.transfer_id.map(|h| h.to_string()),
            balance: t.balance,
            held: t.held,
            available: t.available,
            created_at: Timestamp(t.created_at_ms),
            metadata: MetadataJson(&t.metadata),
        }
    }
}

/// Money reserved on an account until captured, released or expired.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Hold)]
pub struct HoldJson<'a> {
    /// UUID v7; ids sort in creation order.
    #[schema(schema_with = schema::uuid)]
    id: String,
    #[schema(value_type = AccountIdSchema)]
    account_id: &'a str,
    /// The amount held.
    #[schema(schema_with = schema::amount)]
    amount: u64,
    /// What the capture took; 0 unless captured.
    #[schema(schema_with = schema::unsigned_money)]
    captured: u64,
    #[schema(schema_with = schema::hold_status)]
    status: &'static str,
    #[schema(schema_with = schema::timestamp)]
    created_at: Timestamp,
    /// The deadline: an open hold is expired at this time.
    #[schema(schema_with = schema::timestamp)]
    expires_at: Timestamp,
    #[schema(value_type = MetadataSchema)]
    metadata: MetadataJson<'a>,
}

impl<'a> From<&'a Hold> for HoldJson<'a> {
    fn from(h: &'a Hold) -> HoldJson<'a> {
        HoldJson {
            id: h.id.to_string(),
            account_id: h.account_id.as_str(),
            amount: h.amount.get(),
            captured: h.captured,
            status: h.status.as_str(),
            created_at: Timestamp(h.created_at_ms),
            expires_at: Timestamp(h.expires_at_ms),
            metadata: MetadataJson(&h.metadata),
        }
    }
}

/// Money moved from one account to another, exactly once.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Transfer)]
pub struct TransferJson<'a> {
    /// UUID v7.
    #[schema(schema_with = schema::uuid)]
    id: String,
    #[schema(value_type = AccountIdSchema)]
    from: &'a str,
    #[schema(value_type = AccountIdSchema)]
    to: &'a str,
    #[schema(schema_with = schema::amount)]
    amount: u64,
    /// `pending` only while the transfer is between its halves (or until recovery finishes
    /// it); `failed` when the destination refused and the source was refunded.
    #[schema(schema_with = schema::transfer_status)]
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::transfer_failure_code)]
    failure_code: Option<&'static str>,
    #[schema(schema_with = schema::timestamp)]
    created_at: Timestamp,
    #[schema(value_type = MetadataSchema)]
    metadata: MetadataJson<'a>,
}

impl<'a> From<&'a TransferRecord> for TransferJson<'a> {
    fn from(t: &'a TransferRecord) -> TransferJson<'a> {
        TransferJson {
            id: t.id.to_string(),
            from: t.from.as_str(),
            to: t.to.as_str(),
            amount: t.amount.get(),
            status: t.status.as_str(),
            failure_code: match t.status {
                TransferStatus::Failed(failure) => Some(failure.code()),
                _ => None,
            },
            created_at: Timestamp(t.created_at_ms),
            metadata: MetadataJson(&t.metadata),
        }
    }
}

/// The body answering a transfer: `{"transfer", "from_account", "to_account"}`, each
/// account just after its half (`to_account` is null while the transfer is pending).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TransferReceipt)]
pub struct TransferReceiptJson<'a> {
    transfer: TransferJson<'a>,
    from_account: AccountJson<'a>,
    #[schema(required = true)]
    to_account: Option<AccountJson<'a>>,
}

impl<'a> From<&'a TransferRecord> for TransferReceiptJson<'a> {
    fn from(t: &'a TransferRecord) -> TransferReceiptJson<'a> {
        TransferReceiptJson {
            transfer: TransferJson::from(t),
            from_account: AccountJson::from(&t.from_account),
            to_account: t.to_account.as_ref().map(AccountJson::from),
        }
    }
}

/// The answer to a change: the transaction and the account just after it; `hold` is
/// present for holds, captures and releases.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Receipt)]
pub struct ReceiptJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = HoldJson)]
    hold: Option<HoldJson<'a>>,
    transaction: TransactionJson<'a>,
    account: AccountJson<'a>,
}

impl<'a> From<&'a Receipt> for ReceiptJson<'a> {
    fn from(r: &'a Receipt) -> ReceiptJson<'a> {
        ReceiptJson {
            hold: r.hold.as_ref().map(HoldJson::from),
            transaction: TransactionJson::from(&r.transaction),
            account: AccountJson::from(&r.account),
        }
    }
}

/// The answer to a hold, capture or release: the hold, the transaction and the account
/// just after it. (The same shape as [`ReceiptJson`] with `hold` always present.)
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HoldReceipt, description = "The answer to a hold, capture or release: the hold, the transaction and the account just after it.")]
#[allow(dead_code)] // Documentation only: the answers are ReceiptJson.
pub struct HoldReceiptDoc<'a> {
    hold: HoldJson<'a>,
    transaction: TransactionJson<'a>,
    account: AccountJson<'a>,
}

/// A page of an account's holds, oldest first.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HoldPage)]
pub struct HoldPage<'a> {
    /// At most `limit` holds.
    #[schema(max_items = 1000)]
    pub holds: Vec<HoldJson<'a>>,
    /// Pass as `after` for the next page; null when there is certainly nothing more.
    #[schema(schema_with = schema::uuid_or_null, required = true)]
    pub next: Option<String>,
}

/// A page of an account's transactions, newest first.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TransactionPage)]
pub struct TransactionPage<'a> {
    /// At most `limit` transactions.
    #[schema(max_items = 1000)]
    pub transactions: Vec<TransactionJson<'a>>,
    /// Pass as `before_seq` for the next (older) page; null when there is certainly nothing
    /// more.
    #[schema(schema_with = schema::seq_cursor, required = true)]
    pub next: Option<String>,
}

/// What a request with an idempotency key was answered.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = IdempotencyLookup)]
pub struct IdempotencyLookup<'a> {
    /// The key looked up.
    #[schema(schema_with = schema::idempotency_key)]
    pub key: &'a str,
    /// The HTTP status of the original answer (404 and 409 only for a transfer that ended
    /// failed, 202 for one still pending).
    #[schema(schema_with = schema::lookup_status)]
    pub status: u16,
    /// The original answer's body, unchanged: a Receipt, or for a transfer key a
    /// TransferReceipt (or, for a failed transfer, the Problem it was answered with).
    #[schema(schema_with = schema::lookup_response)]
    pub response: serde_json::Value,
    /// When the original request was applied.
    #[schema(schema_with = schema::timestamp)]
    pub created_at: Timestamp,
}

/// `GET /healthz`: the process runs.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always `ok`.
    #[schema(schema_with = schema::const_ok)]
    pub status: &'static str,
}

/// `GET /readyz`: recovery is done and writes are accepted.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// Always `ready`.
    #[schema(schema_with = schema::const_ready)]
    pub status: &'static str,
}

/// One result of a batch: exactly what the operation's single endpoint would have answered.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchResult)]
#[allow(dead_code)] // Documentation only: batch answers are written directly as bytes.
pub struct BatchResultDoc<'a> {
    /// The HTTP status the single endpoint would have answered.
    #[schema(minimum = 200, maximum = 599)]
    status: u16,
    /// The body the single endpoint would have answered: a receipt, or a problem.
    #[schema(schema_with = schema::batch_result_body, required = true)]
    body: Option<ReceiptJson<'a>>,
    /// True when this answers an earlier request with the same key (the single endpoint's
    /// Idempotent-Replayed: true).
    replayed: bool,
}

/// The answer to a batch: one result per operation, in order.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchResponse)]
#[allow(dead_code)] // Documentation only: batch answers are written directly as bytes.
pub struct BatchResponseDoc<'a> {
    #[schema(max_items = 1000)]
    results: Vec<BatchResultDoc<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_literals_are_integers_and_fractions_are_not() {
        for (text, value) in [
            ("46", 46),
            ("-46", -46),
            ("46.0", 46),
            ("4.6e1", 46),
            ("4.6E+1", 46),
            ("460e-1", 46),
            ("0.0", 0),
            ("-0", 0),
            ("0e999999999999999999999", 0),
            ("9007199254740991.000", 9_007_199_254_740_991),
            ("1e20", 100_000_000_000_000_000_000),
        ] {
            assert_eq!(exact_integer(text), Ok(value), "{text}");
        }
        for text in [
            "4503599627370497.5",
            "3000000000000000.1",
            "1.5",
            "1e-1",
            "100e-3",
            "1e-999999999999999999999",
        ] {
            assert_eq!(exact_integer(text), Err(NotInteger::Fraction), "{text}");
        }
        for text in [
            "\"5\"", "true", "null", "[]", "{}", "", "-", "1.", ".5", "1e",
        ] {
            assert_eq!(exact_integer(text), Err(NotInteger::NotNumber), "{text}");
        }
    }

    #[test]
    fn huge_integers_saturate_out_of_every_range() {
        assert_eq!(exact_integer("1e400"), Ok(i128::MAX));
        assert_eq!(exact_integer("-1e400"), Ok(i128::MIN));
        assert_eq!(exact_integer(&"9".repeat(60)), Ok(i128::MAX));
        assert_eq!(exact_integer("1e999999999999999999999"), Ok(i128::MAX));
    }

    #[test]
    fn json_fields_read_numbers_from_their_text() {
        let body: MoveBody = serde_json::from_str(r#"{"amount": 4.6e1}"#).expect("46");
        assert_eq!(body.amount, JsonInt(46));
        let error = serde_json::from_str::<MoveBody>(r#"{"amount": 4503599627370497.5}"#)
            .expect_err("a fraction");
        assert!(error.to_string().contains("fractional"), "{error}");
        let error = serde_json::from_str::<MoveBody>(r#"{"amount": "5"}"#).expect_err("a string");
        assert!(error.to_string().contains("expected an integer"), "{error}");
    }
}
