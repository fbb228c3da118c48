//! The account state machine: `decide` turns a request into an event (or a refusal) without
//! changing anything; `apply` changes the state by an event. The live path and WAL replay both
//! call `apply`, so replay cannot disagree with what was acknowledged. No I/O, no clock: time
//! and fresh ids come in as arguments.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use uuid::Uuid;

use super::types::*;

/// The kind of a transaction (one change of one account).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxKind {
    /// Money added.
    Credit,
    /// Money removed.
    Debit,
    /// Money reserved by a new hold.
    Hold,
    /// A hold turned into a debit (fully or partly; the rest is released).
    Capture,
    /// A hold dropped by request.
    Release,
    /// A hold dropped because its deadline passed.
    Expire,
    /// Money sent to another account by a transfer.
    TransferOut,
    /// Money received by a transfer; also the refund of a failed transfer to its source.
    TransferIn,
}

impl TxKind {
    /// Every kind, in the order of docs/API.md.
    pub const ALL: [TxKind; 8] = [
        TxKind::Credit,
        TxKind::Debit,
        TxKind::Hold,
        TxKind::Capture,
        TxKind::Release,
        TxKind::Expire,
        TxKind::TransferOut,
        TxKind::TransferIn,
    ];

    /// Parses an API name.
    pub fn parse(text: &str) -> Option<TxKind> {
        TxKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// The API name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Credit => "credit",
            TxKind::Debit => "debit",
            TxKind::Hold => "hold",
            TxKind::Capture => "capture",
            TxKind::Release => "release",
            TxKind::Expire => "expire",
            TxKind::TransferOut => "transfer_out",
            TxKind::TransferIn => "transfer_in",
        }
    }
}

/// The status of a hold. A hold ends exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldStatus {
    /// Funds are reserved.
    Open,
    /// Captured (fully or partly).
    Captured,
    /// Released by request.
    Released,
    /// Released because its deadline passed.
    Expired,
}

impl HoldStatus {
    /// The API name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Open => "open",
            HoldStatus::Captured => "captured",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }

    /// Parses an API name.
    pub fn parse(text: &str) -> Option<HoldStatus> {
        match text {
            "open" => Some(HoldStatus::Open),
            "captured" => Some(HoldStatus::Captured),
            "released" => Some(HoldStatus::Released),
            "expired" => Some(HoldStatus::Expired),
            _ => None,
        }
    }
}

/// A hold on an account's funds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Hold id (UUID v7).
    pub id: Uuid,
    /// The account it holds funds of.
    pub account_id: AccountId,
    /// The reserved amount.
    pub amount: Amount,
    /// What a capture took (0 until captured).
    pub captured: u64,
    /// Where it is in its life.
    pub status: HoldStatus,
    /// When it was placed (unix ms).
    pub created_at_ms: u64,
    /// When it expires if still open (unix ms).
    pub expires_at_ms: u64,
    /// The metadata given when it was placed.
    pub metadata: Metadata,
}

/// One change of one account, with the balances just after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Transaction id (UUID v7).
    pub id: Uuid,
    /// The account changed.
    pub account_id: AccountId,
    /// The account's sequence number after this change.
    pub seq: u64,
    /// What happened.
    pub kind: TxKind,
    /// The amount moved (for a release or expire: the amount released).
    pub amount: u64,
    /// The hold involved, if any.
    pub hold_id: Option<Uuid>,
    /// The transfer involved, if any.
    pub transfer_id: Option<Uuid>,
    /// Balance after.
    pub balance: i64,
    /// Held after.
    pub held: u64,
    /// Available after (balance - held).
    pub available: i64,
    /// When it happened (unix ms).
    pub created_at_ms: u64,
    /// The metadata given with the request.
    pub metadata: Metadata,
}

/// A transaction as an account keeps it in its history: without the account's id (the
/// account has it), its seq (the kept ones are consecutive and end at the account's), the
/// available balance (balance - held) and the link its kind rules out. 80 bytes instead of
/// the resource's 128, for each of up to `--history-limit` transactions of every account;
/// and keeping one takes no reference to the id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kept {
    id: Uuid,
    /// The hold (hold, capture, release, expire) or the transfer (transfer kinds) involved;
    /// nil for a credit or a debit.
    link: Uuid,
    amount: u64,
    balance: i64,
    held: u64,
    created_at_ms: u64,
    metadata: Metadata,
    kind: TxKind,
}

// The point of `Kept`: pinned, so that a new field shows up here.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Kept>() == 80);

/// Which link a kind of transaction has.
enum Link {
    None,
    Hold,
    Transfer,
}

impl TxKind {
    fn link(self) -> Link {
        match self {
            TxKind::Credit | TxKind::Debit => Link::None,
            TxKind::Hold | TxKind::Capture | TxKind::Release | TxKind::Expire => Link::Hold,
            TxKind::TransferOut | TxKind::TransferIn => Link::Transfer,
        }
    }
}

impl Kept {
    /// `None` if the transaction's links are not those of its kind (only a damaged
    /// snapshot has such a transaction).
    fn of(tx: Transaction) -> Option<Kept> {
        let link = match (tx.kind.link(), tx.hold_id, tx.transfer_id) {
            (Link::None, None, None) => Uuid::nil(),
            (Link::Hold, Some(id), None) | (Link::Transfer, None, Some(id)) => id,
            _ => return None,
        };
        if tx.available != tx.balance.saturating_sub_unsigned(tx.held) {
            return None;
        }
        Some(Kept {
            id: tx.id,
            link,
            amount: tx.amount,
            balance: tx.balance,
            held: tx.held,
            created_at_ms: tx.created_at_ms,
            metadata: tx.metadata,
            kind: tx.kind,
        })
    }

    /// The transaction resource, of `account` at `seq`.
    fn transaction(&self, account: &AccountId, seq: u64) -> Transaction {
        let (hold_id, transfer_id) = match self.kind.link() {
            Link::None => (None, None),
            Link::Hold => (Some(self.link), None),
            Link::Transfer => (None, Some(self.link)),
        };
        Transaction {
            id: self.id,
            account_id: account.clone(),
            seq,
            kind: self.kind,
            amount: self.amount,
            hold_id,
            transfer_id,
            balance: self.balance,
            held: self.held,
            available: self.balance.saturating_sub_unsigned(self.held),
            created_at_ms: self.created_at_ms,
            metadata: self.metadata.clone(),
        }
    }
}

/// The transactions an account keeps, oldest first, with consecutive seqs ending at the
/// account's `seq()`; read as transaction resources, built on demand.
#[derive(Clone, Copy)]
pub struct History<'a> {
    account: &'a AccountId,
    /// The account's seq: the newest kept transaction's.
    last_seq: u64,
    kept: &'a VecDeque<Kept>,
}

impl<'a> History<'a> {
    /// Transactions kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }
    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
    /// The seq of the oldest one kept.
    pub fn first_seq(&self) -> Option<u64> {
        (!self.kept.is_empty()).then(|| self.seq_of(0))
    }
    /// The seq of the `i`-th oldest (`Account::check_invariants` keeps `len <= last_seq`).
    fn seq_of(&self, i: usize) -> u64 {
        (self.last_seq + 1 + i as u64).saturating_sub(self.kept.len() as u64)
    }
    /// The `i`-th oldest.
    pub fn get(&self, i: usize) -> Option<Transaction> {
        let kept = self.kept.get(i)?;
        Some(kept.transaction(self.account, self.seq_of(i)))
    }
    /// The ones at positions `range` (oldest first); an out-of-bounds range is clamped.
    pub fn range(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl DoubleEndedIterator<Item = Transaction> + ExactSizeIterator + 'a {
        let end = range.end.min(self.kept.len());
        let start = range.start.min(end);
        let (account, first) = (self.account, self.seq_of(start));
        self.kept
            .range(start..end)
            .enumerate()
            .map(move |(i, kept)| kept.transaction(account, first + i as u64))
    }
    /// All of them, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Transaction> + ExactSizeIterator + 'a {
        self.range(0..self.kept.len())
    }
    /// All of them, oldest first, in a vector.
    pub fn to_vec(&self) -> Vec<Transaction> {
        self.iter().collect()
    }
}

impl PartialEq for History<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.account == other.account && self.last_seq == other.last_seq && self.kept == other.kept
    }
}

impl std::fmt::Debug for History<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A point-in-time copy of an account's public fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    /// Account id.
    pub id: AccountId,
    /// Currency.
    pub currency: Currency,
    /// Posted money.
    pub balance: i64,
    /// Sum of open holds.
    pub held: u64,
    /// balance - held.
    pub available: i64,
    /// How far `available` may go below zero.
    pub overdraft_limit: u64,
    /// Number of open holds.
    pub open_holds: u32,
    /// Number of changes so far.
    pub seq: u64,
    /// When it was opened (unix ms).
    pub created_at_ms: u64,
    /// Metadata given at creation.
    pub metadata: Metadata,
}

/// What a successful change returns: the transaction, the account after it and the hold
/// it touched. Stored with the idempotency key and returned again on a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The transaction written.
    pub transaction: Transaction,
    /// The account just after.
    pub account: AccountView,
    /// The hold just after (hold, capture, release, expire).
    pub hold: Option<Hold>,
}

/// A client request as parsed, before validation. Equality of two requests is what
/// "same request" means for idempotency; numbers are wide so out-of-range values survive
/// parsing and are refused by validation with a clear message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `POST .../credits`
    Credit {
        /// Amount as given.
        amount: i128,
        /// Metadata as given (absent = empty).
        metadata: BTreeMap<String, String>,
    },
    /// `POST .../debits`
    Debit {
        /// Amount as given.
        amount: i128,
        /// Metadata as given.
        metadata: BTreeMap<String, String>,
    },
    /// `POST .../holds`
    Hold {
        /// Amount as given.
        amount: i128,
        /// Lifetime as given (absent = default).
        expires_in_secs: Option<i128>,
        /// Metadata as given.
        metadata: BTreeMap<String, String>,
    },
    /// `POST .../holds/{id}/capture`
    Capture {
        /// The hold.
        hold_id: Uuid,
        /// Amount as given (absent = the whole hold).
        amount: Option<i128>,
        /// Metadata as given.
        metadata: BTreeMap<String, String>,
    },
    /// `POST .../holds/{id}/release`
    Release {
        /// The hold.
        hold_id: Uuid,
        /// Metadata as given.
        metadata: BTreeMap<String, String>,
    },
    /// `POST /v1/transfers`, as seen by the source account (the key's scope).
    Transfer {
        /// The destination.
        to: AccountId,
        /// Amount as given.
        amount: i128,
        /// Metadata as given.
        metadata: BTreeMap<String, String>,
    },
}

/// An event: the outcome of a decision, as written to the WAL and applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Log sequence number (assigned by the WAL).
    pub lsn: u64,
    /// The account it changes.
    pub account: AccountId,
    /// The account's seq after it (0 for `Opened`).
    pub seq: u64,
    /// When it happened (unix ms).
    pub at_ms: u64,
    /// The transaction id (nil for `Opened`).
    pub tx_id: Uuid,
    /// The idempotency key of the request that caused it, if any.
    pub idempotency_key: Option<IdempotencyKey>,
    /// What happened.
    pub body: EventBody,
    /// The transaction's figures as recorded in the log (format version 3 on): its amount
    /// and the balances just after it. `None` for `Opened` and for records of older versions.
    /// When present, `check` refuses the event unless they are what applying it gives.
    pub outcome: Option<Outcome>,
}

/// What a transaction shows besides its event: the amount it moved (for a release or an
/// expire, the hold's amount, which the event does not carry) and the account's `balance` and
/// `held` just after it. Recorded with each event so that the event stream can show the
/// Transaction resource from the log alone, and checked on replay like every other field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The transaction's amount.
    pub amount: u64,
    /// The balance just after.
    pub balance: i64,
    /// The sum of open holds just after.
    pub held: u64,
}

impl Transaction {
    /// The Transaction resource of an event that records its outcome; `None` for `Opened`
    /// (not a transaction) and for events without an outcome (older log records). The live
    /// path builds the same value in `apply` (asserted), so the event stream and the
    /// transactions list show identical transactions.
    pub fn of_event(event: &Event) -> Option<Transaction> {
        let outcome = event.outcome?;
        let (kind, hold_id, transfer_id, metadata) = match &event.body {
            EventBody::Opened { .. } => return None,
            EventBody::Credit { metadata, .. } => (TxKind::Credit, None, None, metadata),
            EventBody::Debit { metadata, .. } => (TxKind::Debit, None, None, metadata),
            EventBody::Hold {
                hold_id, metadata, ..
            } => (TxKind::Hold, Some(*hold_id), None, metadata),
            EventBody::Capture {
                hold_id, metadata, ..
            } => (TxKind::Capture, Some(*hold_id), None, metadata),
            EventBody::Release { hold_id, metadata } => {
                (TxKind::Release, Some(*hold_id), None, metadata)
            }
            EventBody::Expire { hold_id } => (TxKind::Expire, Some(*hold_id), None, &EMPTY),
            EventBody::TransferOut {
                transfer_id,
                metadata,
                ..
            } => (TxKind::TransferOut, None, Some(*transfer_id), metadata),
            EventBody::TransferIn {
                transfer_id,
                metadata,
                ..
            } => (TxKind::TransferIn, None, Some(*transfer_id), metadata),
            // A refund is money coming back by the same transfer: a `transfer_in`.
            EventBody::TransferRefund { transfer_id, .. } => {
                (TxKind::TransferIn, None, Some(*transfer_id), &EMPTY)
            }
        };
        Some(Transaction {
            id: event.tx_id,
            account_id: event.account.clone(),
            seq: event.seq,
            kind,
            amount: outcome.amount,
            hold_id,
            transfer_id,
            balance: outcome.balance,
            held: outcome.held,
            available: outcome.balance.checked_sub_unsigned(outcome.held)?,
            created_at_ms: event.at_ms,
            metadata: metadata.clone(),
        })
    }
}

static EMPTY: Metadata = Metadata::EMPTY;

/// What an event does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventBody {
    /// The account was created.
    Opened {
        /// Its currency.
        currency: Currency,
        /// Its overdraft limit.
        overdraft_limit: u64,
        /// Its metadata.
        metadata: Metadata,
    },
    /// Money added.
    Credit {
        /// Amount.
        amount: Amount,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// Money removed.
    Debit {
        /// Amount.
        amount: Amount,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// A hold placed.
    Hold {
        /// The new hold's id.
        hold_id: Uuid,
        /// Amount reserved.
        amount: Amount,
        /// Deadline (unix ms).
        expires_at_ms: u64,
        /// The lifetime the request named, if it named one (for idempotent comparison).
        expires_in_secs: Option<u32>,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// A hold captured, fully or partly; the rest is released.
    Capture {
        /// The hold.
        hold_id: Uuid,
        /// Amount captured.
        amount: Amount,
        /// Whether the request named the amount (for idempotent comparison).
        amount_given: bool,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// A hold released by request.
    Release {
        /// The hold.
        hold_id: Uuid,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// A hold released because its deadline passed.
    Expire {
        /// The hold.
        hold_id: Uuid,
    },
    /// The first half of a transfer, on its source: the money leaves.
    TransferOut {
        /// The transfer.
        transfer_id: Uuid,
        /// Where the money goes.
        to: AccountId,
        /// Amount.
        amount: Amount,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// The second half of a transfer, on its destination: the money arrives.
    TransferIn {
        /// The transfer.
        transfer_id: Uuid,
        /// Where the money came from.
        from: AccountId,
        /// Amount.
        amount: Amount,
        /// Metadata of the request.
        metadata: Metadata,
    },
    /// The end of a transfer the destination refused, on its source: the money comes back.
    TransferRefund {
        /// The transfer.
        transfer_id: Uuid,
        /// The destination that refused.
        to: AccountId,
        /// Amount.
        amount: Amount,
        /// Why the destination refused.
        failure: TransferFailure,
    },
}

impl EventBody {
    /// Whether this is one of the three events of a transfer.
    pub fn is_transfer(&self) -> bool {
        matches!(
            self,
            EventBody::TransferOut { .. }
                | EventBody::TransferIn { .. }
                | EventBody::TransferRefund { .. }
        )
    }
}

/// Why the destination of a transfer refused it after the source was debited. Such a
/// transfer ends `failed` and its source is refunded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferFailure {
    /// The destination does not exist.
    AccountNotFound,
    /// The destination has another currency.
    CurrencyMismatch,
    /// The credit would push the destination's balance over the limit.
    BalanceLimitExceeded,
}

impl TransferFailure {
    /// The API error code of the refusal.
    pub fn code(self) -> &'static str {
        match self {
            TransferFailure::AccountNotFound => "account_not_found",
            TransferFailure::CurrencyMismatch => "currency_mismatch",
            TransferFailure::BalanceLimitExceeded => "balance_limit_exceeded",
        }
    }

    /// The code as stored in the log and in snapshots.
    pub fn tag(self) -> u8 {
        match self {
            TransferFailure::AccountNotFound => 1,
            TransferFailure::CurrencyMismatch => 2,
            TransferFailure::BalanceLimitExceeded => 3,
        }
    }

    /// The failure of a stored tag.
    pub fn from_tag(tag: u8) -> Option<TransferFailure> {
        match tag {
            1 => Some(TransferFailure::AccountNotFound),
            2 => Some(TransferFailure::CurrencyMismatch),
            3 => Some(TransferFailure::BalanceLimitExceeded),
            _ => None,
        }
    }
}

/// Why a request is refused. These are expected outcomes, not failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpError {
    /// The key was used for a different request.
    IdempotencyKeyReused,
    /// A well-formed value is out of bounds (which one, and why).
    Validation(Invalid),
    /// No such hold on this account.
    HoldNotFound(Uuid),
    /// The hold has already ended.
    HoldNotOpen(HoldStatus),
    /// A capture larger than the hold.
    AmountExceedsHold {
        /// Requested capture.
        amount: u64,
        /// The hold's amount.
        hold: u64,
    },
    /// Not enough available money.
    InsufficientFunds {
        /// Available now.
        available: i64,
        /// Overdraft allowed.
        overdraft_limit: u64,
        /// Requested amount.
        amount: u64,
    },
    /// A credit would push the balance over AMOUNT_MAX.
    BalanceLimitExceeded {
        /// Balance now.
        balance: i64,
        /// Requested amount.
        amount: u64,
    },
    /// A transfer between accounts of different currencies.
    CurrencyMismatch {
        /// The source's currency.
        from: Currency,
        /// The destination's currency.
        to: Currency,
    },
}

impl From<Invalid> for OpError {
    fn from(invalid: Invalid) -> OpError {
        OpError::Validation(invalid)
    }
}

/// A successful outcome remembered under its idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyEntry {
    /// The request, to tell a replay from a reuse.
    pub request: Request,
    /// The response it got.
    pub receipt: Arc<Receipt>,
    /// The LSN of the event that carried it: a replay is answered once this is durable.
    pub lsn: u64,
    /// When it happened (unix ms).
    pub created_at_ms: u64,
}

/// What `decide` says to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// The key was seen with the same request: answer with the stored outcome.
    Replay(IdempotencyEntry),
    /// Write and apply this event.
    Apply(EventBody),
}

/// Fresh values the engine supplies to a decision, so that `decide` stays pure.
#[derive(Clone, Copy, Debug)]
pub struct Fresh {
    /// Now (unix ms).
    pub now_ms: u64,
    /// An id for a new hold, if the request places one.
    pub hold_id: Uuid,
}

/// How much an account remembers besides its balances and open holds. Pruning happens
/// while an event is applied and depends only on the events and these numbers, so a replay
/// with the same retention rebuilds exactly the same memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Newest transactions kept in memory (older ones stay in the WAL).
    pub history: usize,
    /// Idempotency keys, and holds that ended, are kept at least this long (ms) after they
    /// were stored or ended; they are dropped at the account's first event after that.
    pub ttl_ms: u64,
}

impl Retention {
    /// Remember everything (tests, offline tools).
    pub const UNLIMITED: Retention = Retention {
        history: usize::MAX,
        ttl_ms: u64::MAX,
    };
}

/// Everything an account holds, as plain values: what a snapshot stores. Derived fields
/// (open-hold count, deadline index, the order keys are pruned in) are rebuilt from these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountParts {
    /// Account id.
    pub id: AccountId,
    /// Currency.
    pub currency: Currency,
    /// Overdraft limit.
    pub overdraft_limit: u64,
    /// Metadata given at creation.
    pub metadata: Metadata,
    /// When it was opened (unix ms).
    pub created_at_ms: u64,
    /// Posted balance.
    pub balance: i64,
    /// Sum of open holds.
    pub held: u64,
    /// Number of changes.
    pub seq: u64,
    /// LSN of its last event.
    pub last_lsn: u64,
    /// Every hold it remembers (open ones, and ended ones within the retention), by id.
    pub holds: Vec<Hold>,
    /// Ended holds in the order they ended, with the time.
    pub ended_holds: Vec<(u64, Uuid)>,
    /// The newest transactions it keeps, oldest first.
    pub history: Vec<Transaction>,
    /// Remembered keys in the order they were stored.
    pub keys: Vec<(IdempotencyKey, IdempotencyEntry)>,
    /// Sum of credits (for the conservation check), modulo 2^64 (see [`Account`]).
    pub total_in: i64,
    /// Sum of debits and captures, modulo 2^64.
    pub total_out: i64,
    /// Transfers received (and refunds) minus transfers sent, modulo 2^64.
    pub transfers_net: i64,
}

/// What an account remembers beyond balances and history, once it has any.
#[derive(Clone, Debug, Default)]
struct Extras {
    /// Sum of open holds.
    held: u64,
    /// Number of open holds.
    open_holds: u32,
    holds: BTreeMap<Uuid, Hold>,
    /// Open holds by deadline, for expiry.
    deadlines: BTreeSet<(u64, Uuid)>,
    idempotency: FastMap<IdempotencyKey, IdempotencyEntry>,
    /// Keys in the order they were stored, with the time: pruned oldest first.
    key_order: VecDeque<(u64, IdempotencyKey)>,
    /// Holds that ended, in the order they ended, with the time.
    ended_holds: VecDeque<(u64, Uuid)>,
}

impl Extras {
    fn is_empty(&self) -> bool {
        self.holds.is_empty() && self.idempotency.is_empty()
    }
}

/// The extras of an account that has none.
fn no_extras() -> &'static Extras {
    static EMPTY: std::sync::OnceLock<Extras> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Extras::default)
}

/// An account and everything it remembers. Fields with invariants are private.
///
/// Small on purpose (issue 5: an idle account costs at most 256 bytes, registry included):
/// whatever an idle account does not use is boxed and allocated on first use, and what the
/// account remembers ([`Retention`]) is passed to `apply` rather than stored per account.
#[derive(Clone, Debug)]
pub struct Account {
    id: AccountId,
    currency: Currency,
    overdraft_limit: u64,
    metadata: Metadata,
    created_at_ms: u64,
    balance: i64,
    seq: u64,
    last_lsn: u64,
    /// Holds (with their sum and count), keys and their queues: allocated on first use, so
    /// an idle account does not pay for empty collections.
    extras: Option<Box<Extras>>,
    /// The newest transactions, oldest first, with consecutive seqs ending at `seq`; at
    /// most the retention's `history`. Allocated at the first transaction.
    // Boxed on purpose: one pointer (8 bytes) in every account instead of a 32-byte deque.
    #[allow(clippy::box_collection)]
    history: Option<Box<VecDeque<Kept>>>,
    /// Running totals for the conservation check (invariant 3): credits; debits and
    /// captures; transfers received minus sent. Modulo 2^64 (wrapping): the sums of a long
    /// life may pass i64's range, and the check `balance = in - out + net` holds exactly
    /// modulo 2^64 because the balance itself stays far inside it.
    total_in: i64,
    total_out: i64,
    transfers_net: i64,
}

impl Account {
    /// Creates an account from its `Opened` event.
    pub fn open(event: &Event) -> Result<Account, ApplyError> {
        let EventBody::Opened {
            currency,
            overdraft_limit,
            metadata,
        } = &event.body
        else {
            return Err(ApplyError("first event of an account is not an open"));
        };
        if event.seq != 0 {
            return Err(ApplyError("open event with non-zero seq"));
        }
        if *overdraft_limit > AMOUNT_MAX {
            return Err(ApplyError("overdraft limit out of range"));
        }
        Ok(Account {
            id: event.account.clone(),
            currency: currency.clone(),
            overdraft_limit: *overdraft_limit,
            metadata: metadata.clone(),
            created_at_ms: event.at_ms,
            balance: 0,
            seq: 0,
            last_lsn: event.lsn,
            extras: None,
            history: None,
            total_in: 0,
            total_out: 0,
            transfers_net: 0,
        })
    }

    /// Account id.
    pub fn id(&self) -> &AccountId {
        &self.id
    }
    /// Currency.
    pub fn currency(&self) -> &Currency {
        &self.currency
    }
    /// Overdraft limit.
    pub fn overdraft_limit(&self) -> u64 {
        self.overdraft_limit
    }
    /// Posted balance.
    pub fn balance(&self) -> i64 {
        self.balance
    }
    /// Sum of open holds.
    pub fn held(&self) -> u64 {
        self.ex().held
    }
    /// balance - held. Exact: both are bounded far below i64's range.
    pub fn available(&self) -> i64 {
        self.balance - self.held() as i64
    }
    /// Number of changes so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// LSN of the last event applied.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }
    /// Credits minus debits and captures: what this account added to the money of the
    /// whole engine (transfers only move it between accounts).
    /// Modulo 2^64, like the totals it comes from.
    pub fn external_net(&self) -> i64 {
        self.total_in.wrapping_sub(self.total_out)
    }
    /// A hold by id.
    pub fn hold(&self, id: &Uuid) -> Option<&Hold> {
        self.ex().holds.get(id)
    }
    /// Holds in id (= creation) order, starting after `after`.
    pub fn holds_after(&self, after: Option<Uuid>) -> impl Iterator<Item = &Hold> {
        use std::ops::Bound;
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        self.ex()
            .holds
            .range((start, Bound::Unbounded))
            .map(|(_, h)| h)
    }
    /// The newest transactions kept (at most the retention's `history`), oldest first, with
    /// consecutive seqs ending at `seq()`.
    pub fn history(&self) -> History<'_> {
        static NONE: VecDeque<Kept> = VecDeque::new();
        History {
            account: &self.id,
            last_seq: self.seq,
            kept: self.history.as_deref().unwrap_or(&NONE),
        }
    }
    /// Reads the newest kept transaction's amount (0 if none): nothing needs the figure, but
    /// replay calls it before decoding a record so that the history's cold cache lines,
    /// which applying the record writes, are on their way meanwhile.
    pub fn touch_history(&self) -> u64 {
        self.history
            .as_deref()
            .and_then(|kept| kept.back())
            .map_or(0, |kept| kept.amount)
    }
    /// The remembered outcome of an idempotency key.
    pub fn idempotency_entry(&self, key: &IdempotencyKey) -> Option<&IdempotencyEntry> {
        self.ex().idempotency.get(key)
    }
    /// Open holds whose deadline is at or before `now_ms`, earliest first.
    pub fn due_holds(&self, now_ms: u64) -> Vec<Uuid> {
        self.ex()
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .map(|(_, id)| *id)
            .collect()
    }
    /// Deadlines of all open holds.
    pub fn open_deadlines(&self) -> impl Iterator<Item = (u64, Uuid)> + '_ {
        self.ex().deadlines.iter().copied()
    }

    /// A copy of the public fields.
    pub fn view(&self) -> AccountView {
        AccountView {
            id: self.id.clone(),
            currency: self.currency.clone(),
            balance: self.balance,
            held: self.held(),
            available: self.available(),
            overdraft_limit: self.overdraft_limit,
            open_holds: self.ex().open_holds,
            seq: self.seq,
            created_at_ms: self.created_at_ms,
            metadata: self.metadata.clone(),
        }
    }

    /// The account as plain values (a copy of what it keeps).
    pub fn parts(&self) -> AccountParts {
        let keys = self
            .ex()
            .key_order
            .iter()
            .filter_map(|(_, key)| Some((key.clone(), self.ex().idempotency.get(key)?.clone())))
            .collect();
        AccountParts {
            id: self.id.clone(),
            currency: self.currency.clone(),
            overdraft_limit: self.overdraft_limit,
            metadata: self.metadata.clone(),
            created_at_ms: self.created_at_ms,
            balance: self.balance,
            held: self.held(),
            seq: self.seq,
            last_lsn: self.last_lsn,
            holds: self.ex().holds.values().cloned().collect(),
            ended_holds: self.ex().ended_holds.iter().copied().collect(),
            history: self.history().to_vec(),
            keys,
            total_in: self.total_in,
            total_out: self.total_out,
            transfers_net: self.transfers_net,
        }
    }

    /// Rebuilds an account from its parts (a snapshot). Refuses parts that break an
    /// invariant, without panicking: they come from a file. Its history is trimmed to the
    /// retention at its next event.
    pub fn from_parts(parts: AccountParts) -> Result<Account, ApplyError> {
        let mut holds = BTreeMap::new();
        let mut deadlines = BTreeSet::new();
        let mut open_holds: u32 = 0;
        let mut held: u64 = 0;
        for hold in parts.holds {
            if hold.account_id != parts.id {
                return Err(ApplyError("snapshot: a hold of another account"));
            }
            if hold.status == HoldStatus::Open {
                open_holds = open_holds
                    .checked_add(1)
                    .ok_or(ApplyError("snapshot: too many open holds"))?;
                held = held
                    .checked_add(hold.amount.get())
                    .ok_or(ApplyError("snapshot: held overflows"))?;
                deadlines.insert((hold.expires_at_ms, hold.id));
            }
            if holds.insert(hold.id, hold).is_some() {
                return Err(ApplyError("snapshot: a hold id twice"));
            }
        }
        if held != parts.held {
            return Err(ApplyError("snapshot: held is not the sum of open holds"));
        }
        for (_, id) in &parts.ended_holds {
            match holds.get(id) {
                Some(hold) if hold.status != HoldStatus::Open => {}
                _ => return Err(ApplyError("snapshot: an ended hold that is not ended")),
            }
        }
        let available = i128::from(parts.balance) - i128::from(parts.held);
        if available < -i128::from(parts.overdraft_limit)
            || parts.balance > AMOUNT_MAX as i64
            || parts.overdraft_limit > AMOUNT_MAX
        {
            return Err(ApplyError("snapshot: balance out of bounds"));
        }
        if parts.balance
            != parts
                .total_in
                .wrapping_sub(parts.total_out)
                .wrapping_add(parts.transfers_net)
        {
            return Err(ApplyError("snapshot: balance is not credits - debits"));
        }
        let dropped = parts
            .seq
            .checked_sub(parts.history.len() as u64)
            .ok_or(ApplyError("snapshot: more history than seq"))?;
        // Room as the live account would have it (the deque doubles as it grows): an exact
        // fit would reallocate at the account's next event, for every account restored.
        let mut history = VecDeque::with_capacity(parts.history.len().next_power_of_two());
        for (i, tx) in parts.history.into_iter().enumerate() {
            if tx.seq != dropped + 1 + i as u64 || tx.account_id != parts.id {
                return Err(ApplyError("snapshot: history out of step with seq"));
            }
            history.push_back(Kept::of(tx).ok_or(ApplyError(
                "snapshot: a transaction whose links or available do not fit it",
            ))?);
        }
        let mut idempotency = FastMap::default();
        let mut key_order = VecDeque::with_capacity(parts.keys.len());
        for (key, entry) in parts.keys {
            key_order.push_back((entry.created_at_ms, key.clone()));
            if idempotency.insert(key, entry).is_some() {
                return Err(ApplyError("snapshot: a key twice"));
            }
        }
        let extras = Extras {
            held,
            open_holds,
            holds,
            deadlines,
            idempotency,
            key_order,
            ended_holds: parts.ended_holds.into_iter().collect(),
        };
        let mut account = Account {
            id: parts.id,
            currency: parts.currency,
            overdraft_limit: parts.overdraft_limit,
            metadata: parts.metadata,
            created_at_ms: parts.created_at_ms,
            balance: parts.balance,
            seq: parts.seq,
            last_lsn: parts.last_lsn,
            extras: None,
            history: (!history.is_empty()).then(|| Box::new(history)),
            total_in: parts.total_in,
            total_out: parts.total_out,
            transfers_net: parts.transfers_net,
        };
        if !extras.is_empty() {
            account.extras = Some(Box::new(extras));
        }
        Ok(account)
    }

    /// Decides what a request does, without changing anything.
    /// Order of checks (docs/API.md): idempotency, validation, hold lookup, hold state, amounts.
    pub fn decide(
        &self,
        key: Option<&IdempotencyKey>,
        request: &Request,
        fresh: Fresh,
    ) -> Result<Decision, OpError> {
        if let Some(replay) = self.replay_of(key, request)? {
            return Ok(replay);
        }
        let body = match request {
            Request::Credit { amount, metadata } => {
                let amount = Amount::new(*amount)?;
                let metadata = Metadata::new(metadata.clone())?;
                self.check_credit(amount)?;
                EventBody::Credit { amount, metadata }
            }
            Request::Debit { amount, metadata } => {
                let amount = Amount::new(*amount)?;
                let metadata = Metadata::new(metadata.clone())?;
                self.check_funds(amount)?;
                EventBody::Debit { amount, metadata }
            }
            Request::Hold {
                amount,
                expires_in_secs,
                metadata,
            } => self.decide_hold(*amount, *expires_in_secs, metadata, fresh)?,
            Request::Capture {
                hold_id,
                amount,
                metadata,
            } => {
                let requested = amount.map(Amount::new).transpose()?;
                let metadata = Metadata::new(metadata.clone())?;
                let hold = self.open_hold(hold_id)?;
                let amount = match requested {
                    Some(a) if a > hold.amount => {
                        return Err(OpError::AmountExceedsHold {
                            amount: a.get(),
                            hold: hold.amount.get(),
                        })
                    }
                    Some(a) => a,
                    None => hold.amount,
                };
                EventBody::Capture {
                    hold_id: *hold_id,
                    amount,
                    amount_given: requested.is_some(),
                    metadata,
                }
            }
            Request::Release { hold_id, metadata } => {
                let metadata = Metadata::new(metadata.clone())?;
                self.open_hold(hold_id)?;
                EventBody::Release {
                    hold_id: *hold_id,
                    metadata,
                }
            }
            Request::Transfer { .. } => {
                return Err(OpError::Validation(Invalid::new(
                    Field::Request,
                    "a transfer is decided with its destination (decide_transfer)",
                )))
            }
        };
        Ok(Decision::Apply(body))
    }

    /// The idempotency rule shared by every request: a key seen with the same request is a
    /// replay of the stored outcome; with another request, a reuse.
    fn replay_of(
        &self,
        key: Option<&IdempotencyKey>,
        request: &Request,
    ) -> Result<Option<Decision>, OpError> {
        match key.and_then(|k| self.ex().idempotency.get(k)) {
            Some(entry) if entry.request == *request => Ok(Some(Decision::Replay(entry.clone()))),
            Some(_) => Err(OpError::IdempotencyKeyReused),
            None => Ok(None),
        }
    }

    /// Decides the first half of a transfer from this account: the same idempotency rules
    /// as [`Account::decide`], then validation (amount, metadata, a different destination),
    /// the destination's currency (`to_currency`, which the caller read from it), funds.
    /// A transfer needs a key (its answer is kept under it, and `check` refuses a
    /// `TransferOut` without one): without one it is refused as invalid.
    pub fn decide_transfer(
        &self,
        key: Option<&IdempotencyKey>,
        request: &Request,
        transfer_id: Uuid,
        to_currency: &Currency,
    ) -> Result<Decision, OpError> {
        let Request::Transfer {
            to,
            amount,
            metadata,
        } = request
        else {
            return Err(OpError::Validation(Invalid::new(
                Field::Request,
                "not a transfer",
            )));
        };
        if key.is_none() {
            return Err(OpError::Validation(Invalid::new(
                Field::IdempotencyKey,
                "a transfer needs an idempotency key",
            )));
        }
        if let Some(replay) = self.replay_of(key, request)? {
            return Ok(replay);
        }
        let amount = Amount::new(*amount)?;
        let metadata = Metadata::new(metadata.clone())?;
        if *to == self.id {
            return Err(OpError::Validation(Invalid::new(
                Field::To,
                "from and to must be different accounts",
            )));
        }
        if *to_currency != self.currency {
            return Err(OpError::CurrencyMismatch {
                from: self.currency.clone(),
                to: to_currency.clone(),
            });
        }
        self.check_funds(amount)?;
        Ok(Decision::Apply(EventBody::TransferOut {
            transfer_id,
            to: to.clone(),
            amount,
            metadata,
        }))
    }

    /// Decides the refund of a transfer the destination refused: a credit back to this
    /// account, refused only if it would now push the balance over the limit.
    pub fn decide_transfer_refund(
        &self,
        transfer_id: Uuid,
        to: &AccountId,
        amount: Amount,
        failure: TransferFailure,
    ) -> Result<EventBody, OpError> {
        self.check_credit(amount)?;
        Ok(EventBody::TransferRefund {
            transfer_id,
            to: to.clone(),
            amount,
            failure,
        })
    }

    /// Decides the second half of a transfer on its destination: a credit, refused only by
    /// the balance limit (or a currency the caller found different).
    pub fn decide_transfer_in(
        &self,
        transfer_id: Uuid,
        from: &AccountId,
        from_currency: &Currency,
        amount: Amount,
        metadata: &Metadata,
    ) -> Result<EventBody, TransferFailure> {
        if *from_currency != self.currency || *from == self.id {
            return Err(TransferFailure::CurrencyMismatch);
        }
        self.check_credit(amount)
            .map_err(|_| TransferFailure::BalanceLimitExceeded)?;
        Ok(EventBody::TransferIn {
            transfer_id,
            from: from.clone(),
            amount,
            metadata: metadata.clone(),
        })
    }

    /// Decides whether a hold expires now: only an open hold whose deadline has passed.
    pub fn decide_expire(&self, hold_id: &Uuid, now_ms: u64) -> Option<EventBody> {
        let hold = self.ex().holds.get(hold_id)?;
        if hold.status != HoldStatus::Open || hold.expires_at_ms > now_ms {
            return None;
        }
        Some(EventBody::Expire { hold_id: *hold_id })
    }

    fn decide_hold(
        &self,
        amount: i128,
        expires_in_secs: Option<i128>,
        metadata: &BTreeMap<String, String>,
        fresh: Fresh,
    ) -> Result<EventBody, OpError> {
        let amount = Amount::new(amount)?;
        let secs = match expires_in_secs {
            None => None,
            Some(s) if (1..=i128::from(HOLD_EXPIRES_SECS_MAX)).contains(&s) => Some(s as u32),
            Some(_) => {
                return Err(OpError::Validation(Invalid::new(
                    Field::ExpiresInSecs,
                    format!("expires_in_secs must be an integer in 1..={HOLD_EXPIRES_SECS_MAX}"),
                )))
            }
        };
        let metadata = Metadata::new(metadata.clone())?;
        self.check_funds(amount)?;
        let lifetime_ms = u64::from(secs.unwrap_or(HOLD_EXPIRES_SECS_DEFAULT)) * 1000;
        let expires_at_ms = fresh.now_ms.checked_add(lifetime_ms).ok_or_else(|| {
            OpError::Validation(Invalid::new(Field::ExpiresInSecs, "clock out of range"))
        })?;
        Ok(EventBody::Hold {
            hold_id: fresh.hold_id,
            amount,
            expires_at_ms,
            expires_in_secs: secs,
            metadata,
        })
    }

    fn open_hold(&self, hold_id: &Uuid) -> Result<&Hold, OpError> {
        let hold = self
            .ex()
            .holds
            .get(hold_id)
            .ok_or(OpError::HoldNotFound(*hold_id))?;
        if hold.status != HoldStatus::Open {
            return Err(OpError::HoldNotOpen(hold.status));
        }
        Ok(hold)
    }

    fn check_credit(&self, amount: Amount) -> Result<(), OpError> {
        match self.balance.checked_add(amount.signed()) {
            Some(b) if b <= AMOUNT_MAX as i64 => Ok(()),
            _ => Err(OpError::BalanceLimitExceeded {
                balance: self.balance,
                amount: amount.get(),
            }),
        }
    }

    fn check_funds(&self, amount: Amount) -> Result<(), OpError> {
        // available + overdraft >= amount, in i128 so that no combination can overflow.
        let room = i128::from(self.available()) + i128::from(self.overdraft_limit);
        if i128::from(amount.get()) > room {
            return Err(OpError::InsufficientFunds {
                available: self.available(),
                overdraft_limit: self.overdraft_limit,
                amount: amount.get(),
            });
        }
        Ok(())
    }

    /// Checks, without changing anything, that `event` can follow this state. The live path
    /// calls it before writing the event to the log, so the log never holds an event that
    /// replay would refuse; `apply` calls it again.
    pub fn check(&self, event: &Event) -> Result<(), ApplyError> {
        let outcome = self.outcome_of(event)?;
        match event.outcome {
            Some(recorded) if recorded != outcome => Err(ApplyError(
                "the recorded balances after the event differ from the computed ones",
            )),
            _ => Ok(()),
        }
    }

    /// Checks that `event` can follow this state, as [`Account::check`], ignoring the
    /// outcome it may record, and computes that outcome: what the live path records with the
    /// event (computed under the account's lock, before the event is written).
    pub fn outcome_of(&self, event: &Event) -> Result<Outcome, ApplyError> {
        if event.account != self.id {
            return Err(ApplyError("event for another account"));
        }
        if event.seq != self.seq + 1 {
            return Err(ApplyError("event seq does not follow the account's seq"));
        }
        if let Some(key) = &event.idempotency_key {
            if self.ex().idempotency.contains_key(key) {
                return Err(ApplyError("idempotency key applied twice"));
            }
            if matches!(
                event.body,
                EventBody::Expire { .. }
                    | EventBody::TransferIn { .. }
                    | EventBody::TransferRefund { .. }
            ) {
                return Err(ApplyError(
                    "an event no request caused has an idempotency key",
                ));
            }
        }
        // (amount, balance delta, held after) of the event, once it is known to be allowed.
        let (amount, delta, held) = match &event.body {
            EventBody::Opened { .. } => return Err(ApplyError("account opened twice")),
            EventBody::Credit { amount, .. } => {
                self.check_credit(*amount)
                    .map_err(|_| ApplyError("credit over the balance limit"))?;
                (*amount, amount.signed(), self.held())
            }
            EventBody::Debit { amount, .. } => {
                self.check_funds(*amount)
                    .map_err(|_| ApplyError("debit beyond available funds"))?;
                (*amount, -amount.signed(), self.held())
            }
            EventBody::Hold {
                hold_id, amount, ..
            } => {
                if self.ex().holds.contains_key(hold_id) {
                    return Err(ApplyError("hold id used twice"));
                }
                self.check_funds(*amount)
                    .map_err(|_| ApplyError("hold beyond available funds"))?;
                let held = self.held().checked_add(amount.get());
                (*amount, 0, held.ok_or(ApplyError("held overflows"))?)
            }
            EventBody::Capture {
                hold_id,
                amount,
                amount_given,
                ..
            } => {
                let hold = self.check_open(hold_id)?;
                if *amount > hold.amount {
                    return Err(ApplyError("capture larger than its hold"));
                }
                if !amount_given && *amount != hold.amount {
                    return Err(ApplyError(
                        "capture without an amount must take the whole hold",
                    ));
                }
                let held = self.held().checked_sub(hold.amount.get());
                let held = held.ok_or(ApplyError("held below zero"))?;
                (*amount, -amount.signed(), held)
            }
            EventBody::Release { hold_id, .. } | EventBody::Expire { hold_id } => {
                let hold = self.check_open(hold_id)?;
                let held = self.held().checked_sub(hold.amount.get());
                (hold.amount, 0, held.ok_or(ApplyError("held below zero"))?)
            }
            EventBody::TransferOut { to, amount, .. } => {
                if *to == self.id {
                    return Err(ApplyError("transfer to the same account"));
                }
                if event.idempotency_key.is_none() {
                    return Err(ApplyError("transfer without an idempotency key"));
                }
                self.check_funds(*amount)
                    .map_err(|_| ApplyError("transfer beyond available funds"))?;
                (*amount, -amount.signed(), self.held())
            }
            EventBody::TransferIn { from, amount, .. } => {
                if *from == self.id {
                    return Err(ApplyError("transfer from the same account"));
                }
                self.check_credit(*amount)
                    .map_err(|_| ApplyError("transfer over the balance limit"))?;
                (*amount, amount.signed(), self.held())
            }
            EventBody::TransferRefund { to, amount, .. } => {
                if *to == self.id {
                    return Err(ApplyError("refund of a transfer to the same account"));
                }
                self.check_credit(*amount)
                    .map_err(|_| ApplyError("refund over the balance limit"))?;
                (*amount, amount.signed(), self.held())
            }
        };
        let balance = self
            .balance
            .checked_add(delta)
            .ok_or(ApplyError("balance overflows"))?;
        Ok(Outcome {
            amount: amount.get(),
            balance,
            held,
        })
    }

    fn check_open(&self, hold_id: &Uuid) -> Result<&Hold, ApplyError> {
        let hold = self
            .ex()
            .holds
            .get(hold_id)
            .ok_or(ApplyError("event names an unknown hold"))?;
        if hold.status != HoldStatus::Open {
            return Err(ApplyError("event ends a hold that is not open"));
        }
        Ok(hold)
    }

    /// Applies an event. Used by the live path and by replay alike. Refuses (without
    /// changing anything) an event that cannot follow this state, which in replay means a
    /// corrupt log. Asserts the invariants of DESIGN.md afterwards.
    pub fn apply(
        &mut self,
        event: &Event,
        retention: Retention,
    ) -> Result<Arc<Receipt>, ApplyError> {
        self.check(event)?;
        self.apply_checked(event, retention)
    }

    /// `apply` for an event that `check` accepted against this very state (the live path
    /// checks before writing the event to the log, under the account's lock, and does not
    /// pay for the same checks twice). Still refuses an LSN that does not advance, and still
    /// asserts every invariant afterwards.
    pub fn apply_checked(
        &mut self,
        event: &Event,
        retention: Retention,
    ) -> Result<Arc<Receipt>, ApplyError> {
        self.apply_inner(event, retention, true)?
            .ok_or(ApplyError("no receipt for an applied event"))
    }

    /// `apply` for WAL replay: the same checks, changes and assertions, but a receipt is
    /// built only where it is remembered (under an idempotency key); nobody reads the others.
    pub fn replay(&mut self, event: &Event, retention: Retention) -> Result<(), ApplyError> {
        self.check(event)?;
        self.apply_inner(event, retention, false).map(|_| ())
    }

    fn apply_inner(
        &mut self,
        event: &Event,
        retention: Retention,
        want_receipt: bool,
    ) -> Result<Option<Arc<Receipt>>, ApplyError> {
        if event.lsn <= self.last_lsn {
            return Err(ApplyError("event lsn does not follow the account's lsn"));
        }
        debug_assert_eq!(
            self.check(event),
            Ok(()),
            "apply_checked on an unchecked event"
        );
        let seq_before = self.seq;
        let (kept, hold) = self.mutate(event);
        if let Some(outcome) = &event.outcome {
            // Paired with the check before the change: the recorded figures are the state.
            assert_eq!(
                outcome.balance, self.balance,
                "recorded balance after the event"
            );
            assert_eq!(outcome.held, self.held(), "recorded held after the event");
            assert_eq!(outcome.amount, kept.amount, "recorded amount of the event");
            debug_assert_eq!(
                Transaction::of_event(event),
                Some(kept.transaction(&self.id, event.seq))
            );
        }
        self.seq = event.seq;
        self.last_lsn = event.lsn;
        if let Some(hold) = hold.as_ref().filter(|h| h.status != HoldStatus::Open) {
            self.ex_mut().ended_holds.push_back((event.at_ms, hold.id));
        }
        // Only a keyed event remembers its request (replay of unkeyed ones builds none).
        let request = event
            .idempotency_key
            .as_ref()
            .and_then(|_| Account::request_of(&event.body));
        let keyed = request.is_some();
        let receipt = if want_receipt || keyed {
            let transaction = kept.transaction(&self.id, event.seq);
            self.remember(kept, retention.history);
            Some(Arc::new(Receipt {
                transaction,
                account: self.view(),
                hold,
            }))
        } else {
            self.remember(kept, retention.history);
            None
        };
        if let (Some(key), Some(request), Some(receipt)) =
            (&event.idempotency_key, request, &receipt)
        {
            self.ex_mut().idempotency.insert(
                key.clone(),
                IdempotencyEntry {
                    request,
                    receipt: receipt.clone(),
                    lsn: event.lsn,
                    created_at_ms: event.at_ms,
                },
            );
            self.ex_mut()
                .key_order
                .push_back((event.at_ms, key.clone()));
        }
        self.prune(event.at_ms, retention.ttl_ms);
        assert_eq!(self.seq, seq_before + 1, "invariant 4: seq moves by one");
        self.check_invariants();
        Ok(receipt)
    }

    /// Adds the newest transaction to the history, forgetting the oldest beyond `limit`.
    fn remember(&mut self, kept: Kept, limit: usize) {
        self.history
            .get_or_insert_with(Box::default)
            .push_back(kept);
        self.keep_history(limit);
    }

    /// Forgets the oldest transactions beyond `limit` (for an account restored from a
    /// snapshot taken with a larger limit; `apply` keeps to its limit by itself).
    pub fn keep_history(&mut self, limit: usize) {
        if let Some(history) = self.history.as_deref_mut() {
            while history.len() > limit {
                history.pop_front();
            }
        }
    }

    /// Forgets keys and ended holds older than `ttl` ms at `now_ms`.
    fn prune(&mut self, now_ms: u64, ttl: u64) {
        let Some(extras) = self.extras.as_deref_mut() else {
            return;
        };
        while let Some((at, _)) = extras.key_order.front() {
            if at.saturating_add(ttl) > now_ms {
                break;
            }
            if let Some((_, key)) = extras.key_order.pop_front() {
                extras.idempotency.remove(&key);
            }
        }
        while let Some((at, _)) = extras.ended_holds.front() {
            if at.saturating_add(ttl) > now_ms {
                break;
            }
            if let Some((_, id)) = extras.ended_holds.pop_front() {
                extras.holds.remove(&id);
            }
        }
        if extras.is_empty() {
            self.extras = None;
        }
    }

    fn ex(&self) -> &Extras {
        self.extras.as_deref().unwrap_or_else(|| no_extras())
    }

    fn ex_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// The request an event answers, as remembered under its idempotency key: what "the same
    /// request" is compared with on a retry. Built only for keyed events; `None` for events no
    /// request caused (expire, a transfer's second half or refund).
    fn request_of(body: &EventBody) -> Option<Request> {
        Some(match body {
            EventBody::Credit { amount, metadata } => Request::Credit {
                amount: i128::from(amount.get()),
                metadata: metadata.to_map(),
            },
            EventBody::Debit { amount, metadata } => Request::Debit {
                amount: i128::from(amount.get()),
                metadata: metadata.to_map(),
            },
            EventBody::Hold {
                amount,
                expires_in_secs,
                metadata,
                ..
            } => Request::Hold {
                amount: i128::from(amount.get()),
                expires_in_secs: expires_in_secs.map(i128::from),
                metadata: metadata.to_map(),
            },
            EventBody::Capture {
                hold_id,
                amount,
                amount_given,
                metadata,
            } => Request::Capture {
                hold_id: *hold_id,
                amount: amount_given.then_some(i128::from(amount.get())),
                metadata: metadata.to_map(),
            },
            EventBody::Release { hold_id, metadata } => Request::Release {
                hold_id: *hold_id,
                metadata: metadata.to_map(),
            },
            EventBody::TransferOut {
                to,
                amount,
                metadata,
                ..
            } => Request::Transfer {
                to: to.clone(),
                amount: i128::from(amount.get()),
                metadata: metadata.to_map(),
            },
            EventBody::Opened { .. }
            | EventBody::Expire { .. }
            | EventBody::TransferIn { .. }
            | EventBody::TransferRefund { .. } => return None,
        })
    }

    /// Changes balances and holds by an event that `check` accepted.
    fn mutate(&mut self, event: &Event) -> (Kept, Option<Hold>) {
        let mut hold_after = None;
        let mut transfer = None;
        let (kind, amount, hold_id, metadata) = match &event.body {
            EventBody::Opened { .. } => unreachable!("check refuses a second open"),
            EventBody::Credit { amount, metadata } => {
                self.balance += amount.signed();
                self.total_in = self.total_in.wrapping_add(amount.signed());
                (TxKind::Credit, *amount, None, metadata.clone())
            }
            EventBody::Debit { amount, metadata } => {
                self.balance -= amount.signed();
                self.total_out = self.total_out.wrapping_add(amount.signed());
                (TxKind::Debit, *amount, None, metadata.clone())
            }
            EventBody::Hold {
                hold_id,
                amount,
                expires_at_ms,
                metadata,
                ..
            } => {
                let hold = Hold {
                    id: *hold_id,
                    account_id: self.id.clone(),
                    amount: *amount,
                    captured: 0,
                    status: HoldStatus::Open,
                    created_at_ms: event.at_ms,
                    expires_at_ms: *expires_at_ms,
                    metadata: metadata.clone(),
                };
                let extras = self.ex_mut();
                extras.held += amount.get();
                extras.open_holds += 1;
                extras.deadlines.insert((*expires_at_ms, *hold_id));
                extras.holds.insert(*hold_id, hold.clone());
                hold_after = Some(hold);
                (TxKind::Hold, *amount, Some(*hold_id), metadata.clone())
            }
            EventBody::Capture {
                hold_id,
                amount,
                metadata,
                ..
            } => {
                let hold = self.end_hold(hold_id, HoldStatus::Captured, amount.get());
                self.balance -= amount.signed();
                self.total_out = self.total_out.wrapping_add(amount.signed());
                hold_after = Some(hold);
                (TxKind::Capture, *amount, Some(*hold_id), metadata.clone())
            }
            EventBody::Release { hold_id, metadata } => {
                let hold = self.end_hold(hold_id, HoldStatus::Released, 0);
                let amount = hold.amount;
                hold_after = Some(hold);
                (TxKind::Release, amount, Some(*hold_id), metadata.clone())
            }
            EventBody::Expire { hold_id } => {
                let hold = self.end_hold(hold_id, HoldStatus::Expired, 0);
                let amount = hold.amount;
                hold_after = Some(hold);
                (TxKind::Expire, amount, Some(*hold_id), Metadata::empty())
            }
            EventBody::TransferOut {
                transfer_id,
                amount,
                metadata,
                ..
            } => {
                self.balance -= amount.signed();
                self.transfers_net = self.transfers_net.wrapping_sub(amount.signed());
                transfer = Some(*transfer_id);
                (TxKind::TransferOut, *amount, None, metadata.clone())
            }
            // A refund is money coming back by the same transfer: a `transfer_in`.
            EventBody::TransferIn {
                transfer_id,
                amount,
                ..
            }
            | EventBody::TransferRefund {
                transfer_id,
                amount,
                ..
            } => {
                self.balance += amount.signed();
                self.transfers_net = self.transfers_net.wrapping_add(amount.signed());
                transfer = Some(*transfer_id);
                let metadata = match &event.body {
                    EventBody::TransferIn { metadata, .. } => metadata.clone(),
                    _ => Metadata::empty(),
                };
                (TxKind::TransferIn, *amount, None, metadata)
            }
        };
        let kept = Kept {
            id: event.tx_id,
            link: hold_id.or(transfer).unwrap_or(Uuid::nil()),
            amount: amount.get(),
            balance: self.balance,
            held: self.held(),
            created_at_ms: event.at_ms,
            metadata,
            kind,
        };
        (kept, hold_after)
    }

    /// Ends an open hold (checked by `check`) exactly once.
    fn end_hold(&mut self, hold_id: &Uuid, status: HoldStatus, captured: u64) -> Hold {
        let hold = self
            .ex_mut()
            .holds
            .get_mut(hold_id)
            .expect("check() found this hold open under the same borrow");
        assert_eq!(
            hold.status,
            HoldStatus::Open,
            "invariant 2: a hold ends once"
        );
        hold.status = status;
        hold.captured = captured;
        let hold = hold.clone();
        let extras = self.ex_mut();
        extras.held -= hold.amount.get();
        extras.open_holds -= 1;
        extras.deadlines.remove(&(hold.expires_at_ms, hold.id));
        hold
    }

    /// Invariants 1-3 of DESIGN.md. Cheap checks always; the O(holds) cross-check in debug.
    fn check_invariants(&self) {
        assert!(
            i128::from(self.available()) >= -i128::from(self.overdraft_limit),
            "invariant 1: available below -overdraft_limit"
        );
        assert!(
            self.balance <= AMOUNT_MAX as i64,
            "balance above AMOUNT_MAX"
        );
        assert_eq!(
            self.balance,
            self.external_net().wrapping_add(self.transfers_net),
            "invariant 3: balance is not credits - debits - captures + transfers in - out"
        );
        assert_eq!(
            self.ex().deadlines.len(),
            self.ex().open_holds as usize,
            "invariant 2: deadline index out of step with open holds"
        );
        assert!(
            self.history
                .as_ref()
                .is_none_or(|h| h.len() as u64 <= self.seq),
            "invariant 4: more history than seq"
        );
        debug_assert_eq!(
            self.ex()
                .holds
                .values()
                .filter(|h| h.status == HoldStatus::Open)
                .map(|h| h.amount.get())
                .sum::<u64>(),
            self.held(),
            "invariant 2: held is not the sum of open holds"
        );
    }
}

/// An event that cannot follow the state it is applied to. In replay this means a
/// corrupt or foreign log; on the live path it is a bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub &'static str);
