//! JSON shapes: request bodies (strict: unknown fields refused, numbers must be JSON
//! integers) and response bodies (serialized straight from domain values).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::domain::{
    AccountView, Hold, Metadata, Receipt, Transaction, TransferRecord, TransferStatus,
};

/// A JSON integer, kept wide so that out-of-range values reach validation (422) while a
/// string, fraction, boolean or null is a type error (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonInt(pub i128);

/// Floats at or above this magnitude are integers too large for any amount; smaller ones
/// are refused as not being written as integers.
const EXACT_FLOAT_LIMIT: f64 = 9_007_199_254_740_992.0;

impl<'de> Deserialize<'de> for JsonInt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<JsonInt, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = JsonInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonInt, E> {
                Ok(JsonInt(i128::from(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonInt, E> {
                Ok(JsonInt(i128::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonInt, E> {
                // serde_json hands integers beyond 64 bits over as floats: keep them as
                // out-of-range integers (422). Anything else written with a fraction or an
                // exponent is not an integer (400). `as` saturates, which is what we want.
                if v.is_finite() && v.fract() == 0.0 && v.abs() >= EXACT_FLOAT_LIMIT {
                    return Ok(JsonInt(v as i128));
                }
                Err(E::invalid_type(de::Unexpected::Float(v), &self))
            }
        }
        deserializer.deserialize_any(IntVisitor)
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    /// Currency code.
    pub currency: String,
    /// Overdraft limit.
    #[serde(default, deserialize_with = "present_int")]
    pub overdraft_limit: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../credits` and `.../debits`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    /// Amount.
    pub amount: JsonInt,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../holds`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    /// Amount.
    pub amount: JsonInt,
    /// Lifetime in seconds.
    #[serde(default, deserialize_with = "present_int")]
    pub expires_in_secs: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../capture`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureBody {
    /// Amount to capture (default: all).
    #[serde(default, deserialize_with = "present_int")]
    pub amount: Option<JsonInt>,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../release`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/transfers`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    /// Source account id.
    pub from: String,
    /// Destination account id.
    pub to: String,
    /// Amount.
    pub amount: JsonInt,
    /// Metadata.
    #[serde(default, deserialize_with = "present_map")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/batch`: the operations stay raw JSON here so that one malformed operation is
/// answered on its own (400 in its result) instead of refusing the whole batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The operations, 1..=1000.
    pub operations: Vec<serde_json::Value>,
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

/// Query of `GET .../holds`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldsQuery {
    /// Status filter.
    pub status: Option<String>,
    /// Page size.
    pub limit: Option<String>,
    /// Cursor.
    pub after: Option<String>,
}

/// Query of `GET .../transactions`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionsQuery {
    /// Page size.
    pub limit: Option<String>,
    /// Cursor: only transactions with a smaller seq.
    pub before_seq: Option<String>,
}

/// Query of `GET /v1/events`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Cursor: only events after it.
    pub after: Option<String>,
    /// Page size.
    pub limit: Option<String>,
    /// How long to wait for an event when there is none yet.
    pub wait_ms: Option<String>,
    /// Only this account's transactions.
    pub account: Option<String>,
    /// Only this kind.
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
#[derive(Serialize)]
pub struct EventJson<'a> {
    /// The event's position.
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

/// An Account resource.
#[derive(Serialize)]
pub struct AccountJson<'a> {
    id: &'a str,
    currency: &'a str,
    balance: i64,
    held: u64,
    available: i64,
    overdraft_limit: u64,
    open_holds: u32,
    seq: u64,
    created_at: Timestamp,
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

/// A Transaction resource.
#[derive(Serialize)]
pub struct TransactionJson<'a> {
    id: String,
    account_id: &'a str,
    seq: u64,
    kind: &'static str,
    amount: u64,
    hold_id: Option<String>,
    transfer_id: Option<String>,
    balance: i64,
    held: u64,
    available: i64,
    created_at: Timestamp,
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

/// A Hold resource.
#[derive(Serialize)]
pub struct HoldJson<'a> {
    id: String,
    account_id: &'a str,
    amount: u64,
    captured: u64,
    status: &'static str,
    created_at: Timestamp,
    expires_at: Timestamp,
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

/// A Transfer resource.
#[derive(Serialize)]
pub struct TransferJson<'a> {
    id: String,
    from: &'a str,
    to: &'a str,
    amount: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_code: Option<&'static str>,
    created_at: Timestamp,
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
/// account just after its half.
#[derive(Serialize)]
pub struct TransferReceiptJson<'a> {
    transfer: TransferJson<'a>,
    from_account: AccountJson<'a>,
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

/// The body answering a change: `{"hold"?, "transaction", "account"}`.
#[derive(Serialize)]
pub struct ReceiptJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
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
