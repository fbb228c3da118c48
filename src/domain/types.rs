//! Value types with their invariants in the type: account ids, currencies, amounts,
//! metadata and idempotency keys. Constructors validate; fields are private.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A hash map keyed by client-chosen strings (account ids, idempotency keys): aHash is
/// several times faster than SipHash and still randomly seeded, so clients cannot aim
/// collisions at it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// The largest amount and the largest balance: 2^53-1, so every JSON client reads it exactly.
pub const AMOUNT_MAX: u64 = (1 << 53) - 1;
/// Account ids are 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub const ACCOUNT_ID_BYTES_MAX: usize = 128;
/// Currencies are 1..=16 bytes of `[A-Z0-9_]`.
pub const CURRENCY_BYTES_MAX: usize = 16;
/// Metadata holds at most this many keys.
pub const METADATA_KEYS_MAX: usize = 16;
/// Metadata keys are 1..=40 characters.
pub const METADATA_KEY_CHARS_MAX: usize = 40;
/// Metadata values are at most 500 characters.
pub const METADATA_VALUE_CHARS_MAX: usize = 500;
/// Idempotency keys are 1..=255 visible ASCII characters.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Default hold lifetime when the request names none.
pub const HOLD_EXPIRES_SECS_DEFAULT: u32 = 3600;
/// Longest hold lifetime a request may ask for (30 days).
pub const HOLD_EXPIRES_SECS_MAX: u32 = 2_592_000;

/// A value a request is refused for: which one, and why. A well-formed value out of bounds
/// maps to 422 `validation_failed`, a malformed id or key to 400 `invalid_request`; the HTTP
/// layer names `field` where the client put the value (a JSON pointer, a header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The value at fault.
    pub field: Field,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    /// `field` is refused because of `reason`.
    pub fn new(field: Field, reason: impl Into<String>) -> Invalid {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The parts of a request a refusal can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// An account id (the path's, a transfer's `from`, a batch operation's `account`).
    AccountId,
    /// The destination of a transfer.
    To,
    /// An amount.
    Amount,
    /// A hold's lifetime.
    ExpiresInSecs,
    /// Metadata.
    Metadata,
    /// A currency.
    Currency,
    /// An overdraft limit.
    OverdraftLimit,
    /// An idempotency key.
    IdempotencyKey,
    /// The request as a whole (a request of the wrong kind for the call: a caller's bug,
    /// not one of the client's values).
    Request,
}

/// An account id: 1..=128 bytes of `[A-Za-z0-9._:-]`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// Parses an account id, refusing anything outside the allowed alphabet and length.
    pub fn parse(text: &str) -> Result<AccountId, Invalid> {
        if text.is_empty() || text.len() > ACCOUNT_ID_BYTES_MAX {
            return Err(Invalid::new(
                Field::AccountId,
                format!("account id must be 1..={ACCOUNT_ID_BYTES_MAX} characters"),
            ));
        }
        let ok = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !ok {
            return Err(Invalid::new(
                Field::AccountId,
                "account id may contain only A-Z a-z 0-9 . _ : -",
            ));
        }
        Ok(AccountId(Arc::from(text)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A currency code: 1..=16 bytes of `[A-Z0-9_]`.
///
/// A thin pointer (8 bytes, where `Arc<str>` takes 16): every account holds one, and the
/// account must stay within its memory budget (see `engine::registry`). The codes are
/// shared ([`Currencies`]), so the second indirection costs nothing in memory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Currency(Arc<String>);

/// Equal currencies sharing one allocation: accounts use a handful of currencies, and a
/// million accounts should not carry a million copies of "GEM". Used where accounts are
/// created (recovery, snapshots, the engine); bounded, so odd codes are simply not shared.
#[derive(Debug, Default, Clone)]
pub struct Currencies(Vec<Currency>);

impl Currencies {
    /// Most currencies kept for sharing.
    pub const MAX: usize = 256;

    /// The currencies kept, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = &Currency> {
        self.0.iter()
    }

    /// The shared copy of `currency`.
    pub fn share(&mut self, currency: Currency) -> Currency {
        if let Some(known) = self.0.iter().find(|known| **known == currency) {
            return known.clone();
        }
        if self.0.len() < Currencies::MAX {
            self.0.push(currency.clone());
        }
        currency
    }
}

impl Currency {
    /// Parses a currency code.
    pub fn parse(text: &str) -> Result<Currency, Invalid> {
        let ok = !text.is_empty()
            && text.len() <= CURRENCY_BYTES_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(Invalid::new(
                Field::Currency,
                format!("currency must be 1..={CURRENCY_BYTES_MAX} characters of A-Z 0-9 _"),
            ));
        }
        Ok(Currency(Arc::new(text.to_string())))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// A positive amount in minor units: 1..=2^53-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(u64);

impl Amount {
    /// Accepts 1..=AMOUNT_MAX. The input is wide so that out-of-range requests
    /// (negative, huge) reach validation instead of failing to parse.
    pub fn new(value: i128) -> Result<Amount, Invalid> {
        if value < 1 || value > i128::from(AMOUNT_MAX) {
            return Err(Invalid::new(
                Field::Amount,
                format!("amount must be an integer in 1..={AMOUNT_MAX}"),
            ));
        }
        // The range check above makes this conversion exact.
        Ok(Amount(value as u64))
    }

    /// The amount in minor units.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The amount as a signed balance delta. Exact: AMOUNT_MAX < i64::MAX.
    pub fn signed(self) -> i64 {
        self.0 as i64
    }
}

/// Free-form metadata: at most 16 string keys of 1..=40 chars, values of at most 500 chars.
/// Shared, because the same map is stored in a transaction, a hold and an idempotency entry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Metadata(Option<Arc<BTreeMap<String, String>>>);

impl Metadata {
    /// Validates a map against the metadata limits.
    pub fn new(map: BTreeMap<String, String>) -> Result<Metadata, Invalid> {
        if map.len() > METADATA_KEYS_MAX {
            return Err(Invalid::new(
                Field::Metadata,
                format!("metadata may have at most {METADATA_KEYS_MAX} keys"),
            ));
        }
        for (key, value) in &map {
            let key_chars = key.chars().count();
            if key_chars == 0 || key_chars > METADATA_KEY_CHARS_MAX {
                return Err(Invalid::new(
                    Field::Metadata,
                    format!("metadata keys must be 1..={METADATA_KEY_CHARS_MAX} characters"),
                ));
            }
            if value.chars().count() > METADATA_VALUE_CHARS_MAX {
                return Err(Invalid::new(
                    Field::Metadata,
                    format!(
                        "metadata values must be at most {METADATA_VALUE_CHARS_MAX} characters"
                    ),
                ));
            }
        }
        if map.is_empty() {
            return Ok(Metadata(None));
        }
        Ok(Metadata(Some(Arc::new(map))))
    }

    /// An empty map, as a constant.
    pub const EMPTY: Metadata = Metadata(None);

    /// An empty map.
    pub fn empty() -> Metadata {
        Metadata(None)
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    /// Whether the map has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the map, for comparing requests.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.as_deref().cloned().unwrap_or_default()
    }
}

/// An idempotency key: 1..=255 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Parses a key; the error says why it is refused.
    pub fn parse(text: &str) -> Result<IdempotencyKey, Invalid> {
        if text.is_empty() || text.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(Invalid::new(
                Field::IdempotencyKey,
                format!("Idempotency-Key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} characters"),
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Invalid::new(
                Field::IdempotencyKey,
                "Idempotency-Key must be visible ASCII characters",
            ));
        }
        Ok(IdempotencyKey(text.into()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_id_limits() {
        assert!(AccountId::parse("player-42").is_ok());
        assert!(AccountId::parse("a.b_c:d-E9").is_ok());
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse(&"a".repeat(128)).is_ok());
        assert!(AccountId::parse(&"a".repeat(129)).is_err());
        assert!(AccountId::parse("a b").is_err());
        assert!(AccountId::parse("a/b").is_err());
        assert!(AccountId::parse("é").is_err());
    }

    #[test]
    fn currency_limits() {
        assert!(Currency::parse("GEM").is_ok());
        assert!(Currency::parse("USD_2").is_ok());
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("").is_err());
        assert!(Currency::parse(&"A".repeat(16)).is_ok());
        assert!(Currency::parse(&"A".repeat(17)).is_err());
    }

    #[test]
    fn amount_limits() {
        assert!(Amount::new(0).is_err());
        assert!(Amount::new(-1).is_err());
        assert_eq!(Amount::new(1).map(Amount::get), Ok(1));
        assert_eq!(
            Amount::new(i128::from(AMOUNT_MAX)).map(Amount::get),
            Ok(AMOUNT_MAX)
        );
        assert!(Amount::new(i128::from(AMOUNT_MAX) + 1).is_err());
    }

    #[test]
    fn metadata_limits() {
        let ok: BTreeMap<String, String> = (0..16).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(Metadata::new(ok).map(|m| m.len()), Ok(16));
        let too_many: BTreeMap<String, String> =
            (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(Metadata::new(too_many).is_err());
        let empty_key = BTreeMap::from([(String::new(), "v".to_string())]);
        assert!(Metadata::new(empty_key).is_err());
        let long_key = BTreeMap::from([("k".repeat(41), "v".to_string())]);
        assert!(Metadata::new(long_key).is_err());
        let long_value = BTreeMap::from([("k".to_string(), "é".repeat(501))]);
        assert!(Metadata::new(long_value).is_err());
        let max_value = BTreeMap::from([("k".to_string(), "é".repeat(500))]);
        assert!(Metadata::new(max_value).is_ok());
        assert!(Metadata::new(BTreeMap::new()).is_ok_and(|m| m.is_empty()));
    }

    #[test]
    fn idempotency_key_limits() {
        assert!(IdempotencyKey::parse("k1").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("a b").is_err());
        assert!(IdempotencyKey::parse("a\u{7f}").is_err());
    }
}
