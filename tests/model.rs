//! Property tests against a reference model: random command sequences (credits, debits,
//! holds, full, partial and over-large captures, releases, clock moves with expiry, retries
//! with earlier keys, invalid values, bursts of one request) run through the pure account
//! state machine (`decide` + `apply`) and through the engine. Transfers between the accounts
//! (of two currencies) are in the mix: completed ones, refused ones (same account, unknown
//! destination, currency mismatch, insufficient funds, invalid values), ones the destination
//! refuses at its balance limit (failed, the source refunded), retried ones, and at the
//! domain level ones whose second half comes a step later. After every step the outcome and
//! the state must match a plain-integer model and the invariants of DESIGN.md, money
//! conservation over all accounts included. At the end the domain's events are written as a
//! WAL segment and replayed into fresh accounts and a fresh transfer book, and the engine is
//! shut down and reopened (twice, with time passing while it is down): the recovered state
//! must equal what was acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use coffer::clock::ManualClock;
use coffer::domain::{
    Account, AccountId, AccountView, Currency, Decision, Event, EventBody, Fresh, Hold, HoldStatus,
    IdempotencyEntry, IdempotencyKey, Metadata, OpError, Receipt, Request, Retention, Transaction,
    TransferBook, TransferFailure, TransferRecord, TransferStatus, TxKind, AMOUNT_MAX,
    HOLD_EXPIRES_SECS_DEFAULT, HOLD_EXPIRES_SECS_MAX,
};
use coffer::engine::{EngineError, TransferOutcome};
use coffer::sim::model::{self, different, normalize, Expect, Model, TransferEnd};
use coffer::wal::codec::{encode_event, encode_frame};
use coffer::wal::reader::segment_name;
use coffer::{Engine, EngineConfig};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use uuid::Uuid;

/// Start of the fake clock (2026-01-01T00:00:00Z).
const T_START: u64 = 1_767_225_600_000;
/// A hold id no account ever has.
const UNKNOWN_HOLD: Uuid = Uuid::from_u128(0x0bad_0000_0000_7000_8000_0000_0000_0001);
/// An account id no run opens.
const UNKNOWN_ACCOUNT: &str = "nobody";

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// Metadata shapes: valid ones and ones that break a limit.
#[derive(Clone, Copy, Debug)]
enum MetaShape {
    Empty,
    Note,
    TooManyKeys,
    LongValue,
    /// Valid and as large as allowed: 16 keys of 40 and values of 500 multi-byte characters.
    Largest,
}

impl MetaShape {
    fn build(self) -> BTreeMap<String, String> {
        match self {
            MetaShape::Empty => BTreeMap::new(),
            MetaShape::Note => BTreeMap::from([("note".to_string(), "n".to_string())]),
            MetaShape::TooManyKeys => (0..17)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            MetaShape::LongValue => BTreeMap::from([("v".to_string(), "x".repeat(501))]),
            MetaShape::Largest => (0..16)
                .map(|i| (format!("{i:02}{}", "🦀".repeat(38)), "é🦀".repeat(250)))
                .collect(),
        }
    }
}

/// How a capture names its amount, resolved against the hold it targets.
#[derive(Clone, Copy, Debug)]
enum CapAmount {
    /// No amount: the whole hold.
    Absent,
    /// Exactly the hold's amount.
    Exact,
    /// Some amount in 1..=hold amount.
    Below(Index),
    /// More than the hold (amount_exceeds_hold).
    Over(u64),
    /// A raw value, possibly invalid.
    Raw(i128),
}

/// Which hold a capture or release names.
#[derive(Clone, Copy, Debug)]
enum HoldPick {
    /// One of the open holds (any hold if none is open).
    Open(Index),
    /// Any hold the account ever had, open or ended.
    Any(Index),
    /// A hold the account never had.
    Unknown,
}

/// Which account a transfer goes to.
#[derive(Clone, Copy, Debug)]
enum ToPick {
    /// One of the other accounts (of the same currency or not).
    Other(Index),
    /// The source itself (validation_failed).
    Same,
    /// An account that does not exist (account_not_found).
    Unknown,
    /// This account (for scenarios written by hand).
    Exactly(usize),
}

/// How a retry changes an earlier keyed request.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// The same request: a replay if it succeeded.
    Same,
    /// A different request under the same key: reused if it succeeded.
    Different,
    /// The same request and key on another account: keys are scoped per account.
    OtherAccount,
}

#[derive(Clone, Debug)]
enum Cmd {
    Credit {
        acct: usize,
        amount: i128,
        keyed: bool,
        meta: MetaShape,
    },
    Debit {
        acct: usize,
        amount: i128,
        keyed: bool,
        meta: MetaShape,
    },
    Hold {
        acct: usize,
        amount: i128,
        expires: Option<i128>,
        keyed: bool,
        meta: MetaShape,
    },
    Capture {
        acct: usize,
        hold: HoldPick,
        amount: CapAmount,
        keyed: bool,
    },
    Release {
        acct: usize,
        hold: HoldPick,
        keyed: bool,
        meta: MetaShape,
    },
    Transfer {
        from: usize,
        to: ToPick,
        amount: i128,
        keyed: bool,
        meta: MetaShape,
        /// At the domain level: the second half (credit or refund) comes after the next
        /// step's command, which may change either side in between. The engine always runs
        /// both halves at once.
        delay: bool,
    },
    /// A keyed credit that brings the balance to `slack` below the limit, so that
    /// transfers to the account fail (and its refunds may have to wait).
    Fill { acct: usize, slack: u64 },
    /// Move the clock. Eager: expire every due hold at once. Lazy: the next request's
    /// account expires its due holds before deciding (as the engine's actor does), and the
    /// others are expired after that request.
    Advance { ms: u64, lazy: bool },
    /// Send an earlier keyed request again.
    Retry { pick: Index, change: Change },
    /// Send an earlier keyed transfer again (if there was one).
    RetryTransfer { pick: Index, change: Change },
    /// The same request sent three times at once (the domain level sends them one after
    /// the other).
    Burst(Box<Cmd>),
}

/// Mostly valid amounts up to `typical`, sometimes out of range or near the balance limit.
fn amount_strategy(typical: i128) -> impl Strategy<Value = i128> {
    let max = i128::from(AMOUNT_MAX);
    prop_oneof![
        40 => 1i128..=typical,
        1 => Just(0i128),
        1 => -300i128..0,
        1 => (max - 300)..=max,
        1 => Just(max + 1),
        1 => Just(i128::MAX),
    ]
}

fn meta_strategy() -> impl Strategy<Value = MetaShape> {
    prop_oneof![
        30 => Just(MetaShape::Empty),
        6 => Just(MetaShape::Note),
        1 => Just(MetaShape::TooManyKeys),
        1 => Just(MetaShape::LongValue),
        1 => Just(MetaShape::Largest),
    ]
}

fn expires_strategy() -> impl Strategy<Value = Option<i128>> {
    let max = i128::from(HOLD_EXPIRES_SECS_MAX);
    prop_oneof![
        3 => Just(None),
        8 => (1i128..=60).prop_map(Some),
        1 => Just(Some(i128::from(HOLD_EXPIRES_SECS_DEFAULT))),
        1 => Just(Some(max)),
        1 => Just(Some(0)),
        1 => Just(Some(max + 1)),
        1 => (-5i128..0).prop_map(Some),
    ]
}

fn cap_amount_strategy() -> impl Strategy<Value = CapAmount> {
    prop_oneof![
        3 => Just(CapAmount::Absent),
        2 => Just(CapAmount::Exact),
        3 => any::<Index>().prop_map(CapAmount::Below),
        2 => (1u64..=5).prop_map(CapAmount::Over),
        1 => amount_strategy(150).prop_map(CapAmount::Raw),
    ]
}

fn hold_pick_strategy() -> impl Strategy<Value = HoldPick> {
    prop_oneof![
        6 => any::<Index>().prop_map(HoldPick::Open),
        3 => any::<Index>().prop_map(HoldPick::Any),
        1 => Just(HoldPick::Unknown),
    ]
}

fn to_pick_strategy() -> impl Strategy<Value = ToPick> {
    prop_oneof![
        10 => any::<Index>().prop_map(ToPick::Other),
        1 => Just(ToPick::Same),
        1 => Just(ToPick::Unknown),
    ]
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => Just(Change::Same),
        2 => Just(Change::Different),
        1 => Just(Change::OtherAccount),
    ]
}

fn cmd_strategy(accounts: usize) -> impl Strategy<Value = Cmd> {
    let base = base_cmd_strategy(accounts).boxed();
    prop_oneof![
        12 => base.clone(),
        1 => base.prop_map(|cmd| Cmd::Burst(Box::new(cmd))),
    ]
}

fn base_cmd_strategy(accounts: usize) -> impl Strategy<Value = Cmd> {
    let acct = 0..accounts;
    let keyed = prop::bool::weighted(0.85);
    prop_oneof![
        4 => (acct.clone(), amount_strategy(300), keyed, meta_strategy())
            .prop_map(|(acct, amount, keyed, meta)| Cmd::Credit { acct, amount, keyed, meta }),
        3 => (acct.clone(), amount_strategy(150), keyed, meta_strategy())
            .prop_map(|(acct, amount, keyed, meta)| Cmd::Debit { acct, amount, keyed, meta }),
        6 => (
            acct.clone(),
            amount_strategy(150),
            expires_strategy(),
            keyed,
            meta_strategy()
        )
            .prop_map(|(acct, amount, expires, keyed, meta)| Cmd::Hold {
                acct,
                amount,
                expires,
                keyed,
                meta
            }),
        5 => (acct.clone(), hold_pick_strategy(), cap_amount_strategy(), keyed)
            .prop_map(|(acct, hold, amount, keyed)| Cmd::Capture { acct, hold, amount, keyed }),
        3 => (acct.clone(), hold_pick_strategy(), keyed, meta_strategy())
            .prop_map(|(acct, hold, keyed, meta)| Cmd::Release { acct, hold, keyed, meta }),
        6 => (
            acct.clone(),
            to_pick_strategy(),
            amount_strategy(200),
            keyed,
            meta_strategy(),
            prop::bool::weighted(0.3)
        )
            .prop_map(|(from, to, amount, keyed, meta, delay)| Cmd::Transfer {
                from,
                to,
                amount,
                keyed,
                meta,
                delay
            }),
        1 => (acct, prop_oneof![Just(0u64), 0u64..=400])
            .prop_map(|(acct, slack)| Cmd::Fill { acct, slack }),
        3 => (prop_oneof![0u64..=2_000, 1_000u64..=70_000], any::<bool>())
            .prop_map(|(ms, lazy)| Cmd::Advance { ms, lazy }),
        4 => (any::<Index>(), change_strategy())
            .prop_map(|(pick, change)| Cmd::Retry { pick, change }),
        2 => (any::<Index>(), change_strategy())
            .prop_map(|(pick, change)| Cmd::RetryTransfer { pick, change }),
    ]
}

/// Usually a funding credit per account first (so holds and debits can succeed early),
/// then random commands.
fn scenario_strategy(
    accounts: usize,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Cmd>> {
    (
        prop::collection::vec(prop::option::weighted(0.9, 100i128..=1000), accounts),
        prop::collection::vec(cmd_strategy(accounts), len),
    )
        .prop_map(|(funding, cmds)| {
            funding
                .into_iter()
                .enumerate()
                .filter_map(|(acct, amount)| {
                    amount.map(|amount| Cmd::Credit {
                        acct,
                        amount,
                        keyed: true,
                        meta: MetaShape::Empty,
                    })
                })
                .chain(cmds)
                .collect()
        })
}

/// How long the engine stays down between shutdown and reopen.
fn downtime_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0u64..=70_000]
}

fn overdrafts_strategy(accounts: usize) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(prop_oneof![3 => Just(0u64), 1 => 1u64..=100], accounts)
}

// ---------------------------------------------------------------------------------------
// Turning commands into requests
// ---------------------------------------------------------------------------------------

enum Step {
    Op {
        acct: usize,
        key: Option<String>,
        request: Request,
    },
    /// Three copies of one request at once.
    Burst {
        acct: usize,
        key: Option<String>,
        request: Request,
    },
    Advance {
        ms: u64,
        lazy: bool,
    },
    Nothing,
}

/// Every keyed request sent so far (accepted or not), for retries.
type Sent = Vec<(usize, String, Request)>;

fn pick_hold(model: &Model, pick: HoldPick) -> Uuid {
    let open: Vec<Uuid> = model
        .hold_order
        .iter()
        .filter(|id| model.holds.get(id).map(|h| h.status) == Some(HoldStatus::Open))
        .copied()
        .collect();
    match pick {
        HoldPick::Open(index) if !open.is_empty() => open[index.index(open.len())],
        HoldPick::Open(index) | HoldPick::Any(index) if !model.hold_order.is_empty() => {
            model.hold_order[index.index(model.hold_order.len())]
        }
        _ => UNKNOWN_HOLD,
    }
}

/// The account and hold a capture or release names: the picked account's holds, or, when
/// it never had one, the holds of the next account that has (so most of these commands
/// reach a real hold).
fn target(models: &[Model], acct: usize, pick: HoldPick) -> (usize, Uuid) {
    if let HoldPick::Unknown = pick {
        return (acct, UNKNOWN_HOLD);
    }
    let owner = (0..models.len())
        .map(|i| (acct + i) % models.len())
        .find(|&i| !models[i].hold_order.is_empty())
        .unwrap_or(acct);
    (owner, pick_hold(&models[owner], pick))
}

fn resolve(
    cmd: &Cmd,
    ids: &[AccountId],
    models: &[Model],
    sent: &Sent,
    next_key: &mut u64,
) -> Step {
    let mut fresh_key = |keyed: bool| {
        keyed.then(|| {
            *next_key += 1;
            let mut key = format!("key-{next_key}");
            if next_key.is_multiple_of(5) {
                // Now and then the longest key allowed (255 visible ASCII bytes).
                key.push_str(&"~".repeat(255 - key.len()));
            }
            key
        })
    };
    match cmd {
        Cmd::Credit {
            acct,
            amount,
            keyed,
            meta,
        } => Step::Op {
            acct: *acct,
            key: fresh_key(*keyed),
            request: Request::Credit {
                amount: *amount,
                metadata: meta.build(),
            },
        },
        Cmd::Debit {
            acct,
            amount,
            keyed,
            meta,
        } => Step::Op {
            acct: *acct,
            key: fresh_key(*keyed),
            request: Request::Debit {
                amount: *amount,
                metadata: meta.build(),
            },
        },
        Cmd::Hold {
            acct,
            amount,
            expires,
            keyed,
            meta,
        } => Step::Op {
            acct: *acct,
            key: fresh_key(*keyed),
            request: Request::Hold {
                amount: *amount,
                expires_in_secs: *expires,
                metadata: meta.build(),
            },
        },
        Cmd::Capture {
            acct,
            hold,
            amount,
            keyed,
        } => {
            let (acct, hold_id) = target(models, *acct, *hold);
            let model = &models[acct];
            let hold_amount = model.holds.get(&hold_id).map_or(10, |h| h.amount);
            let amount = match amount {
                CapAmount::Absent => None,
                CapAmount::Exact => Some(i128::from(hold_amount)),
                CapAmount::Below(index) => {
                    let below = index.index(usize::try_from(hold_amount).unwrap_or(usize::MAX));
                    Some(below as i128 + 1)
                }
                CapAmount::Over(extra) => Some(i128::from(hold_amount + extra)),
                CapAmount::Raw(raw) => Some(*raw),
            };
            Step::Op {
                acct,
                key: fresh_key(*keyed),
                request: Request::Capture {
                    hold_id,
                    amount,
                    metadata: BTreeMap::new(),
                },
            }
        }
        Cmd::Release {
            acct,
            hold,
            keyed,
            meta,
        } => {
            let (acct, hold_id) = target(models, *acct, *hold);
            Step::Op {
                acct,
                key: fresh_key(*keyed),
                request: Request::Release {
                    hold_id,
                    metadata: meta.build(),
                },
            }
        }
        Cmd::Transfer {
            from,
            to,
            amount,
            keyed,
            meta,
            ..
        } => {
            let to = match to {
                ToPick::Other(index) => {
                    let others: Vec<usize> = (0..ids.len()).filter(|i| i != from).collect();
                    match others.get(index.index(others.len().max(1))) {
                        Some(&other) => ids[other].clone(),
                        None => ids[*from].clone(),
                    }
                }
                ToPick::Same => ids[*from].clone(),
                ToPick::Exactly(to) => ids[*to].clone(),
                ToPick::Unknown => AccountId::parse(UNKNOWN_ACCOUNT).expect("a valid account id"),
            };
            Step::Op {
                acct: *from,
                key: fresh_key(*keyed),
                request: Request::Transfer {
                    to,
                    amount: *amount,
                    metadata: meta.build(),
                },
            }
        }
        Cmd::Fill { acct, slack } => {
            let room = i128::from(AMOUNT_MAX) - models[*acct].balance - i128::from(*slack);
            Step::Op {
                acct: *acct,
                key: fresh_key(true),
                request: Request::Credit {
                    amount: room.min(i128::from(AMOUNT_MAX)),
                    metadata: BTreeMap::new(),
                },
            }
        }
        Cmd::Burst(inner) => match resolve(inner, ids, models, sent, next_key) {
            Step::Op { acct, key, request } => Step::Burst { acct, key, request },
            other => other,
        },
        Cmd::Advance { ms, lazy } => Step::Advance {
            ms: *ms,
            lazy: *lazy,
        },
        Cmd::Retry { pick, change } | Cmd::RetryTransfer { pick, change } => {
            let transfers_only = matches!(cmd, Cmd::RetryTransfer { .. });
            let sent: Vec<&(usize, String, Request)> = sent
                .iter()
                .filter(|(_, _, r)| !transfers_only || matches!(r, Request::Transfer { .. }))
                .collect();
            if sent.is_empty() {
                return Step::Nothing;
            }
            let (acct, key, request) = sent[pick.index(sent.len())];
            let (acct, request) = match change {
                Change::Same => (*acct, request.clone()),
                Change::Different => (*acct, different(request, &models[*acct])),
                Change::OtherAccount => ((*acct + 1) % models.len(), request.clone()),
            };
            Step::Op {
                acct,
                key: Some(key.clone()),
                request,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checks shared by both levels
// ---------------------------------------------------------------------------------------

fn account_ids(n: usize) -> Vec<AccountId> {
    // Account 0 has a short id; the others the longest id allowed (128 bytes), so the WAL
    // codec carries both.
    (0..n)
        .map(|i| {
            let mut id = format!("acct-{i}");
            if i > 0 {
                id.push_str(".:_");
                id.push_str(&"Z".repeat(128 - id.len()));
            }
            AccountId::parse(&id).expect("a valid account id")
        })
        .collect()
}

fn gem() -> Currency {
    Currency::parse("GEM").expect("a valid currency")
}

/// Currencies of the accounts: the last one of three or more is in USD, the others in GEM,
/// so that some transfers are refused for their currencies.
fn currencies(n: usize) -> Vec<Currency> {
    (0..n)
        .map(|i| {
            if n >= 3 && i == n - 1 {
                Currency::parse("USD").expect("a valid currency")
            } else {
                gem()
            }
        })
        .collect()
}

/// What the model says a transfer from account `from` does: `None` for 404 (the destination
/// does not exist), else what the source's model says given the destination.
fn expect_transfer(
    ids: &[AccountId],
    currencies: &[Currency],
    models: &[Model],
    from: usize,
    key: Option<&str>,
    request: &Request,
) -> Option<(Expect, usize)> {
    let Request::Transfer { to, .. } = request else {
        return None;
    };
    let to = ids.iter().position(|id| id == to)?;
    let expect = models[from].evaluate_transfer(
        key,
        request,
        to == from,
        &currencies[from],
        &currencies[to],
    );
    Some((expect, to))
}

/// Money conservation over the whole engine or state machine against the models.
fn check_conservation(
    models: &[Model],
    in_flight: u64,
    got: &coffer::engine::Conservation,
) -> Result<(), TestCaseError> {
    model::check_conservation(models, in_flight, got).map_err(fail)
}

fn parse_key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).expect("generated keys are valid")
}

/// Of concurrent identical requests with one key (`(replayed, answer)` each), exactly one is
/// applied and the others replay its answer; returns that answer.
fn the_one_applied<T: PartialEq + std::fmt::Debug>(
    answers: Vec<(bool, T)>,
) -> Result<T, TestCaseError> {
    let (mut fresh, replayed): (Vec<_>, Vec<_>) =
        answers.into_iter().partition(|(replayed, _)| !replayed);
    prop_assert_eq!(fresh.len(), 1, "exactly one copy is applied");
    let (_, applied) = fresh.remove(0);
    for (_, other) in &replayed {
        prop_assert_eq!(other, &applied, "the copies replay the one applied");
    }
    Ok(applied)
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

// The reference model and its checks live in `coffer::sim::model` (the simulation uses
// them too); these adapt their errors to proptest's.

fn check_view(view: &AccountView, model: &Model) -> Result<(), TestCaseError> {
    model::check_view(view, model).map_err(fail)
}

fn check_holds<'a>(
    holds: impl Iterator<Item = &'a Hold>,
    held: u64,
    model: &Model,
) -> Result<(), TestCaseError> {
    model::check_holds(holds, held, model).map_err(fail)
}

fn check_history(history: &[Transaction], view: &AccountView) -> Result<(), TestCaseError> {
    model::check_history(history, view).map_err(fail)
}

fn check_receipt(
    receipt: &Receipt,
    model: &Model,
    kind: TxKind,
    amount: u64,
    hold_id: Option<Uuid>,
) -> Result<(), TestCaseError> {
    model::check_receipt(receipt, model, kind, amount, hold_id).map_err(fail)
}

/// An idempotency entry as comparable values.
type EntryParts = (Request, Receipt, u64, u64);

fn entry_parts(entry: &IdempotencyEntry) -> EntryParts {
    (
        entry.request.clone(),
        (*entry.receipt).clone(),
        entry.lsn,
        entry.created_at_ms,
    )
}

fn all_keys(sent: &Sent) -> Vec<String> {
    let mut keys: Vec<String> = sent.iter().map(|(_, k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    keys
}

// ---------------------------------------------------------------------------------------
// a. Domain level: decide + apply against the model, then WAL replay
// ---------------------------------------------------------------------------------------

struct DomainRun {
    ids: Vec<AccountId>,
    accounts: Vec<Account>,
    models: Vec<Model>,
    /// Every event applied, in LSN order (LSN = index + 1).
    events: Vec<Event>,
    now_ms: u64,
    /// The clock moved but due holds were not expired yet.
    lazy: bool,
    next_hold: u128,
    next_key: u64,
    sent: Sent,
    receipts: HashMap<(usize, String), Arc<Receipt>>,
    currencies: Vec<Currency>,
    /// The transfer book, fed every applied event as the engine feeds it.
    book: TransferBook,
    /// Transfers whose source was debited and whose second half has not happened yet:
    /// (id, from, to), oldest first.
    pending: Vec<(Uuid, usize, usize)>,
}

impl DomainRun {
    fn new(overdrafts: &[u64]) -> Result<DomainRun, TestCaseError> {
        let ids = account_ids(overdrafts.len());
        let currencies = currencies(overdrafts.len());
        let mut run = DomainRun {
            ids: ids.clone(),
            currencies: currencies.clone(),
            book: TransferBook::default(),
            pending: Vec::new(),
            accounts: Vec::new(),
            models: Vec::new(),
            events: Vec::new(),
            now_ms: T_START,
            lazy: false,
            next_hold: 1,
            next_key: 0,
            sent: Vec::new(),
            receipts: HashMap::new(),
        };
        for ((id, overdraft), currency) in ids.into_iter().zip(overdrafts).zip(currencies) {
            let event = Event {
                lsn: run.next_lsn(),
                account: id,
                seq: 0,
                at_ms: T_START,
                tx_id: Uuid::nil(),
                idempotency_key: None,
                body: EventBody::Opened {
                    currency,
                    overdraft_limit: *overdraft,
                    metadata: Metadata::empty(),
                },
                outcome: None,
            };
            run.accounts
                .push(Account::open(&event).map_err(|e| fail(format!("open: {e}")))?);
            run.models.push(Model::new(*overdraft));
            run.events.push(event);
        }
        Ok(run)
    }

    fn next_lsn(&self) -> u64 {
        self.events.len() as u64 + 1
    }

    /// Builds, checks and applies the next event of account `acct`.
    fn apply(
        &mut self,
        acct: usize,
        key: Option<&str>,
        body: EventBody,
    ) -> Result<Arc<Receipt>, TestCaseError> {
        let lsn = self.next_lsn();
        let account = &mut self.accounts[acct];
        let event = Event {
            lsn,
            account: self.ids[acct].clone(),
            seq: account.seq() + 1,
            at_ms: self.now_ms,
            tx_id: Uuid::from_u128(0x0193_0000_0000_7000_9000_0000_0000_0000 + u128::from(lsn)),
            idempotency_key: key.map(parse_key),
            body,
            outcome: None,
        };
        account
            .check(&event)
            .map_err(|e| fail(format!("check refused a decided event: {e}")))?;
        let receipt = account
            .apply(&event, Retention::UNLIMITED)
            .map_err(|e| fail(format!("apply refused a checked event: {e}")))?;
        self.book
            .record(&event, Some(account.view()))
            .map_err(|e| fail(format!("the transfer book refused {event:?}: {e}")))?;
        self.events.push(event);
        Ok(receipt)
    }

    fn step(&mut self, cmd: &Cmd) -> Result<(), TestCaseError> {
        // Transfers delayed by the step before end after this step's command.
        let due = std::mem::take(&mut self.pending);
        let delay = matches!(cmd, Cmd::Transfer { delay: true, .. });
        match resolve(cmd, &self.ids, &self.models, &self.sent, &mut self.next_key) {
            Step::Nothing => Ok(()),
            Step::Advance { ms, lazy } => {
                self.now_ms += ms;
                self.lazy = lazy;
                if lazy {
                    Ok(())
                } else {
                    self.expire_all()
                }
            }
            Step::Op { acct, key, request } => {
                if self.lazy {
                    self.expire_account(acct)?;
                }
                self.send(acct, key, request, delay)?;
                self.lazy = false;
                self.expire_all()
            }
            Step::Burst { acct, key, request } => {
                if self.lazy {
                    self.expire_account(acct)?;
                }
                for _ in 0..3 {
                    self.send(acct, key.clone(), request.clone(), delay)?;
                }
                self.lazy = false;
                self.expire_all()
            }
        }?;
        self.finish_transfers(due)?;
        self.check_all()
    }

    fn send(
        &mut self,
        acct: usize,
        key: Option<String>,
        request: Request,
        delay: bool,
    ) -> Result<(), TestCaseError> {
        match request {
            Request::Transfer { .. } => self.transfer(acct, key, request, delay),
            _ => self.op(acct, key, request),
        }
    }

    /// The source's half of a transfer through `decide_transfer` (the engine answers 404 for
    /// an unknown destination before it asks the state machine), then, unless delayed, the
    /// second half.
    fn transfer(
        &mut self,
        from: usize,
        key: Option<String>,
        request: Request,
        delay: bool,
    ) -> Result<(), TestCaseError> {
        let Some((expect, to)) = expect_transfer(
            &self.ids,
            &self.currencies,
            &self.models,
            from,
            key.as_deref(),
            &request,
        ) else {
            // 404: nothing is decided, nothing is remembered.
            return Ok(());
        };
        let transfer_id =
            Uuid::from_u128(0x0193_0000_0000_7000_a000_0000_0000_0000 + self.next_hold);
        self.next_hold += 1;
        let parsed_key = key.as_deref().map(parse_key);
        let decision = self.accounts[from].decide_transfer(
            parsed_key.as_ref(),
            &request,
            transfer_id,
            &self.currencies[to],
        );
        match (expect, decision) {
            (Expect::Replay, Ok(Decision::Replay(entry))) => {
                let k = key.clone().ok_or_else(|| fail("replay without a key"))?;
                let stored = self
                    .receipts
                    .get(&(from, k))
                    .ok_or_else(|| fail("replay of an unknown receipt"))?;
                prop_assert_eq!(&*entry.receipt, &**stored, "replay of a transfer");
                prop_assert_eq!(&entry.request, &request);
            }
            (Expect::Refuse(want), Err(got)) => {
                prop_assert_eq!(normalize(want), normalize(got), "refusal of {:?}", request);
            }
            (Expect::Apply, Ok(Decision::Apply(body))) => {
                prop_assert!(
                    matches!(&body, EventBody::TransferOut { transfer_id: id, .. } if *id == transfer_id),
                    "a transfer decided as {:?}",
                    body
                );
                let before = self.models[from].clone();
                let receipt = self.apply(from, key.as_deref(), body)?;
                let model = &mut self.models[from];
                let (kind, amount) = model.commit(key.as_deref(), &request, None, self.now_ms);
                check_receipt(&receipt, model, kind, amount, None)?;
                prop_assert_eq!(receipt.transaction.transfer_id, Some(transfer_id));
                let record = self
                    .book
                    .get(&transfer_id)
                    .ok_or_else(|| fail("a debited transfer missing from the book"))?;
                prop_assert_eq!(record.status, TransferStatus::Pending);
                prop_assert_eq!(&record.from_account, &receipt.account);
                prop_assert_eq!(&record.key, &parsed_key);
                if let Some(k) = &key {
                    self.receipts.insert((from, k.clone()), receipt);
                }
                if delay {
                    self.pending.push((transfer_id, from, to));
                } else {
                    self.finish_transfers(vec![(transfer_id, from, to)])?;
                    let status = self.book.get(&transfer_id).map(|r| r.status);
                    if let Some(TransferStatus::Failed(_)) = status {
                        // Refunded at once: the balance is back, and seq moved by two.
                        let after = &self.models[from];
                        prop_assert_eq!(after.balance, before.balance);
                        prop_assert_eq!(after.seq, before.seq + 2);
                        prop_assert_eq!(self.accounts[from].view().seq, before.seq + 2);
                    }
                }
            }
            (expect, got) => {
                prop_assert!(
                    false,
                    "{:?} from account {}: model expected {:?}, state machine said {:?}",
                    request,
                    from,
                    expect,
                    got
                );
            }
        }
        if let Some(k) = key {
            self.sent.push((from, k, request));
        }
        Ok(())
    }

    /// The second half of these pending transfers, oldest first: `decide_transfer_in` on
    /// the destination, else `decide_transfer_refund` on the source, as the model says; one
    /// that neither side can take stays pending.
    fn finish_transfers(
        &mut self,
        transfers: Vec<(Uuid, usize, usize)>,
    ) -> Result<(), TestCaseError> {
        for (id, from, to) in transfers {
            let record = self
                .book
                .get(&id)
                .cloned()
                .ok_or_else(|| fail("a pending transfer missing from the book"))?;
            prop_assert_eq!(record.status, TransferStatus::Pending);
            let amount = record.amount.get();
            let end = TransferEnd::decide(&self.models[from], &self.models[to], amount);
            let credit = self.accounts[to].decide_transfer_in(
                id,
                &self.ids[from],
                &self.currencies[from],
                record.amount,
                &record.metadata,
            );
            let (receiver, body) = match (end, credit) {
                (TransferEnd::Completed, Ok(body)) => (to, body),
                (TransferEnd::Refunded | TransferEnd::Stuck, Err(failure)) => {
                    prop_assert_eq!(failure, TransferFailure::BalanceLimitExceeded);
                    let refund = self.accounts[from].decide_transfer_refund(
                        id,
                        &self.ids[to],
                        record.amount,
                        failure,
                    );
                    match (end, refund) {
                        (TransferEnd::Refunded, Ok(body)) => (from, body),
                        (TransferEnd::Stuck, Err(OpError::BalanceLimitExceeded { .. })) => {
                            // Neither side can take the money now: it stays in flight.
                            self.pending.push((id, from, to));
                            continue;
                        }
                        (end, got) => {
                            return Err(fail(format!(
                                "refund of {id}: model said {end:?}, state machine {got:?}"
                            )))
                        }
                    }
                }
                (end, got) => {
                    return Err(fail(format!(
                        "transfer {id}: model said {end:?}, state machine {got:?}"
                    )))
                }
            };
            let receipt = self.apply(receiver, None, body)?;
            self.models[receiver].receive(amount);
            check_receipt(
                &receipt,
                &self.models[receiver],
                TxKind::TransferIn,
                amount,
                None,
            )?;
            prop_assert_eq!(receipt.transaction.transfer_id, Some(id));
            let ended = self
                .book
                .get(&id)
                .ok_or_else(|| fail("an ended transfer missing from the book"))?;
            prop_assert_eq!(ended.status, end.status());
            match end {
                TransferEnd::Completed => {
                    prop_assert_eq!(ended.to_account.as_ref(), Some(&receipt.account))
                }
                _ => prop_assert_eq!(ended.to_account.as_ref(), None),
            }
        }
        Ok(())
    }

    fn op(
        &mut self,
        acct: usize,
        key: Option<String>,
        request: Request,
    ) -> Result<(), TestCaseError> {
        let expect = self.models[acct].evaluate(key.as_deref(), &request);
        let fresh = Fresh {
            now_ms: self.now_ms,
            hold_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + self.next_hold),
        };
        self.next_hold += 1;
        let parsed_key = key.as_deref().map(parse_key);
        let decision = self.accounts[acct].decide(parsed_key.as_ref(), &request, fresh);
        match (expect, decision) {
            (Expect::Replay, Ok(Decision::Replay(entry))) => {
                let k = key.clone().ok_or_else(|| fail("replay without a key"))?;
                let stored = self
                    .receipts
                    .get(&(acct, k))
                    .ok_or_else(|| fail("replay of an unknown receipt"))?;
                prop_assert_eq!(
                    &*entry.receipt,
                    &**stored,
                    "replay returns the stored receipt"
                );
                prop_assert_eq!(&entry.request, &request);
            }
            (Expect::Refuse(want), Err(got)) => {
                prop_assert_eq!(normalize(want), normalize(got), "refusal of {:?}", request);
            }
            (Expect::Apply, Ok(Decision::Apply(body))) => {
                let new_hold = match &body {
                    EventBody::Hold { hold_id, .. } => Some(*hold_id),
                    _ => None,
                };
                let receipt = self.apply(acct, key.as_deref(), body)?;
                let model = &mut self.models[acct];
                let (kind, amount) = model.commit(key.as_deref(), &request, new_hold, self.now_ms);
                let hold_id = match &request {
                    Request::Capture { hold_id, .. } | Request::Release { hold_id, .. } => {
                        Some(*hold_id)
                    }
                    _ => new_hold,
                };
                check_receipt(&receipt, model, kind, amount, hold_id)?;
                if let Some(k) = &key {
                    self.receipts.insert((acct, k.clone()), receipt);
                }
            }
            (expect, got) => {
                prop_assert!(
                    false,
                    "{:?} on account {}: model expected {:?}, state machine said {:?}",
                    request,
                    acct,
                    expect,
                    got
                );
            }
        }
        if let Some(k) = key {
            self.sent.push((acct, k, request));
        }
        Ok(())
    }

    fn expire_all(&mut self) -> Result<(), TestCaseError> {
        for acct in 0..self.accounts.len() {
            self.expire_account(acct)?;
        }
        Ok(())
    }

    /// Expires the account's due holds, one event each, as the engine does.
    fn expire_account(&mut self, acct: usize) -> Result<(), TestCaseError> {
        let now = self.now_ms;
        {
            let due = self.models[acct].due(now);
            prop_assert_eq!(&self.accounts[acct].due_holds(now), &due);
            for (id, hold) in &self.models[acct].holds {
                if !due.contains(id) {
                    prop_assert_eq!(
                        self.accounts[acct].decide_expire(id, now),
                        None,
                        "{:?} is not due",
                        hold
                    );
                }
            }
            for hold_id in due {
                let body = self.accounts[acct]
                    .decide_expire(&hold_id, now)
                    .ok_or_else(|| fail("a due hold does not expire"))?;
                let receipt = self.apply(acct, None, body)?;
                let amount = self.models[acct].expire(&hold_id);
                check_receipt(
                    &receipt,
                    &self.models[acct],
                    TxKind::Expire,
                    amount,
                    Some(hold_id),
                )?;
            }
        }
        Ok(())
    }

    fn check_all(&self) -> Result<(), TestCaseError> {
        for (acct, account) in self.accounts.iter().enumerate() {
            let model = &self.models[acct];
            let view = account.view();
            check_view(&view, model)?;
            check_holds(account.holds_after(None), view.held, model)?;
            check_history(&account.history().to_vec(), &view)?;
            let events = self
                .events
                .iter()
                .filter(|e| e.account == self.ids[acct] && e.seq > 0)
                .count();
            prop_assert_eq!(view.seq, events as u64, "invariant 4: seq counts events");
        }
        // Money is conserved over all accounts, the pending transfers' money in flight.
        let in_flight: u64 = self
            .pending
            .iter()
            .filter_map(|(id, ..)| self.book.get(id))
            .map(|r| r.amount.get())
            .sum();
        prop_assert_eq!(
            self.book.in_flight(),
            (self.pending.len(), u128::from(in_flight))
        );
        let got = coffer::engine::Conservation {
            balances: self.accounts.iter().map(|a| i128::from(a.balance())).sum(),
            in_flight: i128::from(in_flight),
            external: self
                .accounts
                .iter()
                .map(Account::external_net)
                .fold(0, i64::wrapping_add),
        };
        check_conservation(&self.models, in_flight, &got)
    }

    /// Writes the events as one WAL segment, replays it into fresh accounts and compares.
    fn replay_and_compare(&self) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().map_err(fail)?;
        let mut bytes = Vec::new();
        for event in &self.events {
            let mut payload = Vec::new();
            encode_event(event, &mut payload);
            encode_frame(event.lsn, &payload, &mut bytes);
        }
        std::fs::write(dir.path().join(segment_name(1)), &bytes).map_err(fail)?;

        let mut replayed: HashMap<AccountId, Account> = HashMap::new();
        let mut book = TransferBook::default();
        let mut decoded = Vec::new();
        let outcome = coffer::wal::replay(dir.path(), true, |event| {
            decoded.push(event.clone());
            if let EventBody::Opened { .. } = event.body {
                let account = Account::open(&event).map_err(|e| e.to_string())?;
                replayed.insert(event.account.clone(), account);
                return Ok(());
            }
            let account = replayed
                .get_mut(&event.account)
                .ok_or_else(|| format!("event for unknown account {}", event.account))?;
            account
                .apply(&event, Retention::UNLIMITED)
                .map_err(|e| e.to_string())?;
            book.record(&event, Some(account.view()))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| fail(format!("replay failed: {e}")))?;
        prop_assert_eq!(outcome.records, self.events.len() as u64);
        prop_assert_eq!(outcome.last_lsn, self.events.len() as u64);
        prop_assert!(outcome.tail_cut.is_none());
        prop_assert_eq!(&decoded, &self.events, "decode(encode(event)) is the event");

        // The transfer book rebuilt from the log is the live one, pending transfers included.
        prop_assert_eq!(book.in_flight(), self.book.in_flight());
        prop_assert_eq!(book.len(), self.book.len());
        for record in self.book.records() {
            prop_assert_eq!(
                book.get(&record.id),
                Some(record),
                "transfer {} replayed",
                record.id
            );
        }
        let keys = all_keys(&self.sent);
        for (acct, live) in self.accounts.iter().enumerate() {
            let back = replayed
                .get(&self.ids[acct])
                .ok_or_else(|| fail("account missing after replay"))?;
            prop_assert_eq!(back.view(), live.view());
            prop_assert_eq!(back.history(), live.history());
            prop_assert_eq!(back.last_lsn(), live.last_lsn());
            let live_holds: Vec<&Hold> = live.holds_after(None).collect();
            let back_holds: Vec<&Hold> = back.holds_after(None).collect();
            prop_assert_eq!(back_holds, live_holds);
            prop_assert_eq!(
                back.open_deadlines().collect::<Vec<_>>(),
                live.open_deadlines().collect::<Vec<_>>()
            );
            for k in &keys {
                let key = parse_key(k);
                // Only successes are remembered, each under its own request.
                prop_assert_eq!(
                    live.idempotency_entry(&key).map(|e| e.request.clone()),
                    self.models[acct].keys.get(k).cloned(),
                    "remembered request of key {} on account {}",
                    k,
                    acct
                );
                prop_assert_eq!(
                    back.idempotency_entry(&key).map(entry_parts),
                    live.idempotency_entry(&key).map(entry_parts),
                    "idempotency entry {} of account {}",
                    k,
                    acct
                );
            }
        }
        Ok(())
    }
}

fn run_domain(overdrafts: &[u64], cmds: &[Cmd]) -> Result<(), TestCaseError> {
    let mut run = DomainRun::new(overdrafts)?;
    for cmd in cmds {
        run.step(cmd)?;
    }
    run.replay_and_compare()
}

/// A transfer whose destination refuses (at its balance limit) while its source cannot take
/// the refund either (credited to the limit between the two halves) stays pending, with its
/// money in flight, until a debit makes room; then the refund goes through. Replay of the
/// log gives back the same book.
#[test]
fn a_refund_that_does_not_fit_waits_in_flight() {
    let transfer = Cmd::Transfer {
        from: 0,
        to: ToPick::Exactly(1),
        amount: 50,
        keyed: true,
        meta: MetaShape::Empty,
        delay: true,
    };
    let cmds = [
        Cmd::Credit {
            acct: 0,
            amount: 100,
            keyed: true,
            meta: MetaShape::Empty,
        },
        Cmd::Fill { acct: 1, slack: 0 },
        transfer,
        Cmd::Fill { acct: 0, slack: 0 },
    ];
    let mut run = DomainRun::new(&[0, 0, 0, 0]).expect("accounts");
    for cmd in &cmds {
        run.step(cmd).expect("a step");
    }
    run.step(&Cmd::Advance { ms: 0, lazy: false })
        .expect("a step");
    assert_eq!(
        run.pending.len(),
        1,
        "the refund does not fit: still in flight"
    );
    assert_eq!(run.book.in_flight(), (1, 50));
    run.replay_and_compare()
        .expect("replay with a transfer in flight");
    run.step(&Cmd::Debit {
        acct: 0,
        amount: 100,
        keyed: true,
        meta: MetaShape::Empty,
    })
    .expect("a debit");
    run.step(&Cmd::Advance { ms: 0, lazy: false })
        .expect("a step");
    assert!(run.pending.is_empty(), "refunded once there was room");
    assert_eq!(run.book.in_flight(), (0, 0));
    let record = run.book.records().next().expect("the transfer");
    assert_eq!(
        record.status,
        TransferStatus::Failed(TransferFailure::BalanceLimitExceeded)
    );
    assert_eq!(run.models[0].balance, i128::from(AMOUNT_MAX) - 50);
    run.replay_and_compare().expect("replay");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Goal: every step of a random command sequence matches the reference model and keeps
    /// the invariants, and replaying the written WAL gives back exactly the live state.
    #[test]
    fn domain_matches_model_and_replay(
        overdrafts in overdrafts_strategy(4),
        cmds in scenario_strategy(4, 1..60),
    ) {
        run_domain(&overdrafts, &cmds)?;
    }
}

// ---------------------------------------------------------------------------------------
// b. Engine level: acknowledged outcomes survive shutdown and reopen
// ---------------------------------------------------------------------------------------

/// Everything the engine shows about the accounts, to compare across a restart.
#[derive(Debug, PartialEq)]
struct EngineObserved {
    views: Vec<AccountView>,
    transactions: Vec<Vec<Transaction>>,
    holds: Vec<Vec<Hold>>,
    entries: Vec<Vec<Option<EntryParts>>>,
}

async fn observe_engine(
    engine: &Engine,
    ids: &[AccountId],
    keys: &[String],
) -> Result<EngineObserved, TestCaseError> {
    let mut observed = EngineObserved {
        views: Vec::new(),
        transactions: Vec::new(),
        holds: Vec::new(),
        entries: Vec::new(),
    };
    for id in ids {
        observed.views.push(
            engine
                .account(id)
                .await
                .map_err(|e| fail(format!("{e:?}")))?,
        );
        let (txs, next) = engine
            .transactions(id, None, 1000)
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        prop_assert!(next.is_none());
        observed.transactions.push(txs);
        let (holds, next) = engine
            .holds(id, None, None, 1000)
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        prop_assert!(next.is_none());
        observed.holds.push(holds);
        let mut entries = Vec::new();
        for k in keys {
            let entry = engine
                .idempotency_entry(id, &parse_key(k))
                .await
                .map_err(|e| fail(format!("{e:?}")))?;
            entries.push(entry.as_ref().map(entry_parts));
        }
        observed.entries.push(entries);
    }
    Ok(observed)
}

/// The engine run's memory: the models and everything acknowledged so far.
struct EngineRun {
    ids: Vec<AccountId>,
    clock: Arc<ManualClock>,
    models: Vec<Model>,
    now_ms: u64,
    /// The clock moved but due holds were not expired yet.
    lazy: bool,
    next_key: u64,
    sent: Sent,
    receipts: HashMap<(usize, String), Arc<Receipt>>,
    /// Every acknowledged new outcome: account and receipt.
    acked: Vec<(usize, Arc<Receipt>)>,
    currencies: Vec<Currency>,
    /// Acknowledged transfers by source and key.
    transfers: HashMap<(usize, String), Arc<TransferRecord>>,
    /// Every acknowledged transfer, keyed or not.
    acked_transfers: Vec<Arc<TransferRecord>>,
}

impl EngineRun {
    async fn step(&mut self, engine: &Engine, cmd: &Cmd) -> Result<(), TestCaseError> {
        match resolve(cmd, &self.ids, &self.models, &self.sent, &mut self.next_key) {
            Step::Nothing => {}
            Step::Advance { ms, lazy } => {
                self.clock.advance_ms(ms);
                self.now_ms += ms;
                self.lazy = lazy;
                if !lazy {
                    self.expire_all(engine).await?;
                }
            }
            Step::Op { acct, key, request } => {
                if self.lazy {
                    // The actor expires the account's due holds before it decides.
                    let model = &mut self.models[acct];
                    for hold_id in model.due(self.now_ms) {
                        model.expire(&hold_id);
                    }
                }
                self.op(engine, acct, key, request).await?;
                if self.lazy {
                    self.lazy = false;
                    self.expire_all(engine).await?;
                }
            }
            Step::Burst { acct, key, request } => {
                if self.lazy {
                    let model = &mut self.models[acct];
                    for hold_id in model.due(self.now_ms) {
                        model.expire(&hold_id);
                    }
                }
                match (key, &request) {
                    (Some(key), Request::Transfer { .. }) => {
                        self.burst_transfer(engine, acct, key, request).await?
                    }
                    (Some(key), _) => self.burst(engine, acct, key, request).await?,
                    // Without a key the copies are independent requests.
                    (None, _) => self.op(engine, acct, None, request).await?,
                }
                if self.lazy {
                    self.lazy = false;
                    self.expire_all(engine).await?;
                }
            }
        }
        // Money is conserved (nothing is in flight between steps); expiry moves no money.
        check_conservation(&self.models, 0, &engine.conservation())?;
        if self.lazy {
            // Other accounts' due holds may be expired by the background sweeper at any
            // moment: only their durable views are checked, after the next expiry.
            return Ok(());
        }
        for (acct, id) in self.ids.iter().enumerate() {
            let view = engine
                .account(id)
                .await
                .map_err(|e| fail(format!("{e:?}")))?;
            check_view(&view, &self.models[acct])?;
        }
        Ok(())
    }

    /// Records an acknowledged new outcome in the model and checks its receipt.
    fn accept(
        &mut self,
        acct: usize,
        key: Option<&str>,
        request: &Request,
        receipt: Arc<Receipt>,
    ) -> Result<(), TestCaseError> {
        let new_hold = match request {
            Request::Hold { .. } => Some(
                receipt
                    .hold
                    .as_ref()
                    .ok_or_else(|| fail("hold receipt without a hold"))?
                    .id,
            ),
            _ => None,
        };
        let model = &mut self.models[acct];
        let (kind, amount) = model.commit(key, request, new_hold, self.now_ms);
        let hold_id = match request {
            Request::Capture { hold_id, .. } | Request::Release { hold_id, .. } => Some(*hold_id),
            _ => new_hold,
        };
        check_receipt(&receipt, model, kind, amount, hold_id)?;
        prop_assert_eq!(receipt.transaction.created_at_ms, self.now_ms);
        if let Some(k) = key {
            self.receipts.insert((acct, k.to_string()), receipt.clone());
        }
        self.acked.push((acct, receipt));
        Ok(())
    }

    /// Sends three copies of a keyed request at once: exactly one is applied, the others
    /// replay it with the same receipt (or all get the same refusal).
    async fn burst(
        &mut self,
        engine: &Engine,
        acct: usize,
        key: String,
        request: Request,
    ) -> Result<(), TestCaseError> {
        let expect = self.models[acct].evaluate(Some(&key), &request);
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let engine = engine.clone();
                let id = self.ids[acct].clone();
                let key = parse_key(&key);
                let request = request.clone();
                tokio::spawn(async move { engine.execute(&id, Some(key), request).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.map_err(|e| fail(format!("task: {e}")))?);
        }
        match expect {
            Expect::Refuse(want) => {
                for result in results {
                    match result {
                        Err(EngineError::Op(got)) => {
                            prop_assert_eq!(normalize(want.clone()), normalize(got))
                        }
                        other => prop_assert!(false, "expected {:?}, got {:?}", want, other),
                    }
                }
            }
            Expect::Replay => {
                let stored = self
                    .receipts
                    .get(&(acct, key.clone()))
                    .ok_or_else(|| fail("replay of an unknown receipt"))?;
                for result in results {
                    let executed = result.map_err(|e| fail(format!("{e:?}")))?;
                    prop_assert!(executed.replayed);
                    prop_assert_eq!(&*executed.receipt, &**stored);
                }
            }
            Expect::Apply => {
                let mut answers = Vec::new();
                for result in results {
                    let executed = result.map_err(|e| fail(format!("{e:?}")))?;
                    answers.push((executed.replayed, executed.receipt));
                }
                let receipt = the_one_applied(answers)?;
                self.accept(acct, Some(&key), &request, receipt)?;
            }
        }
        self.sent.push((acct, key, request));
        Ok(())
    }

    async fn expire_all(&mut self, engine: &Engine) -> Result<(), TestCaseError> {
        engine
            .expire_due()
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        for model in &mut self.models {
            for hold_id in model.due(self.now_ms) {
                model.expire(&hold_id);
            }
        }
        Ok(())
    }

    /// Records an acknowledged new transfer in the models and checks its record: the source
    /// just after the debit, how it ended (completed, or failed with the source refunded,
    /// as the model says), the destination just after the credit, the key's stored receipt.
    async fn accept_transfer(
        &mut self,
        engine: &Engine,
        (from, to): (usize, usize),
        key: Option<&str>,
        request: &Request,
        record: Arc<TransferRecord>,
    ) -> Result<(), TestCaseError> {
        let before = self.models[from].clone();
        let (kind, amount) = self.models[from].commit(key, request, None, self.now_ms);
        prop_assert_eq!(kind, TxKind::TransferOut);
        prop_assert_eq!(&record.from, &self.ids[from]);
        prop_assert_eq!(&record.to, &self.ids[to]);
        prop_assert_eq!(record.amount.get(), amount);
        prop_assert_eq!(record.created_at_ms, self.now_ms);
        prop_assert_eq!(record.key.clone(), key.map(parse_key));
        check_view(&record.from_account, &self.models[from])?;
        let end = TransferEnd::decide(&self.models[from], &self.models[to], amount);
        prop_assert_eq!(record.status, end.status(), "transfer {:?}", request);
        match end {
            TransferEnd::Completed => {
                self.models[to].receive(amount);
                let view = record
                    .to_account
                    .as_ref()
                    .ok_or_else(|| fail("a completed transfer without its destination"))?;
                if self.lazy {
                    // The sweeper may or may not have expired the destination's due holds.
                    prop_assert_eq!(i128::from(view.balance), self.models[to].balance);
                } else {
                    check_view(view, &self.models[to])?;
                }
            }
            TransferEnd::Refunded => {
                self.models[from].receive(amount);
                prop_assert!(record.to_account.is_none());
                // Refused by the destination: the source has its money back, two
                // transactions later.
                prop_assert_eq!(self.models[from].balance, before.balance);
                prop_assert_eq!(self.models[from].seq, before.seq + 2);
            }
            TransferEnd::Stuck => {
                return Err(fail(
                    "a refund refused right after its debit (nothing ran in between)",
                ))
            }
        }
        let by_id = engine
            .transfer_record(&record.id)
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        prop_assert_eq!(&*by_id, &*record);
        if let Some(k) = key {
            let entry = engine
                .idempotency_entry(&self.ids[from], &parse_key(k))
                .await
                .map_err(|e| fail(format!("{e:?}")))?
                .ok_or_else(|| fail("the key of a transfer is not remembered"))?;
            prop_assert_eq!(&entry.request, request);
            let tx = &entry.receipt.transaction;
            prop_assert_eq!(tx.kind, TxKind::TransferOut);
            prop_assert_eq!(tx.transfer_id, Some(record.id));
            prop_assert_eq!(tx.amount, amount);
            prop_assert_eq!(&entry.receipt.account, &record.from_account);
            self.receipts
                .insert((from, k.to_string()), entry.receipt.clone());
            self.acked.push((from, entry.receipt));
            self.transfers.insert((from, k.to_string()), record.clone());
        }
        self.acked_transfers.push(record);
        Ok(())
    }

    /// A transfer through `Engine::transfer`, checked against the model.
    async fn transfer(
        &mut self,
        engine: &Engine,
        from: usize,
        key: Option<String>,
        request: Request,
    ) -> Result<(), TestCaseError> {
        let expect = expect_transfer(
            &self.ids,
            &self.currencies,
            &self.models,
            from,
            key.as_deref(),
            &request,
        );
        let got = engine
            .transfer(
                &self.ids[from],
                key.as_deref().map(parse_key),
                request.clone(),
            )
            .await;
        self.check_transfer_answer(engine, from, key.as_deref(), &request, expect, got)
            .await?;
        if let Some(k) = key {
            self.sent.push((from, k, request));
        }
        Ok(())
    }

    async fn check_transfer_answer(
        &mut self,
        engine: &Engine,
        from: usize,
        key: Option<&str>,
        request: &Request,
        expect: Option<(Expect, usize)>,
        got: Result<TransferOutcome, EngineError>,
    ) -> Result<(), TestCaseError> {
        match (expect, got) {
            (None, Err(EngineError::AccountNotFound(_))) => {}
            (Some((Expect::Replay, _)), Ok(outcome)) if outcome.replayed => {
                let k = key.ok_or_else(|| fail("replay without a key"))?;
                let stored = self
                    .transfers
                    .get(&(from, k.to_string()))
                    .ok_or_else(|| fail("replay of a transfer never acknowledged"))?;
                prop_assert_eq!(&*outcome.record, &**stored, "replayed transfer");
            }
            (Some((Expect::Refuse(want), _)), Err(EngineError::Op(got))) => {
                prop_assert_eq!(normalize(want), normalize(got), "refusal of {:?}", request);
            }
            (Some((Expect::Apply, to)), Ok(outcome)) if !outcome.replayed => {
                self.accept_transfer(engine, (from, to), key, request, outcome.record)
                    .await?;
            }
            (expect, got) => {
                prop_assert!(
                    false,
                    "{:?} from account {}: model expected {:?}, engine said {:?}",
                    request,
                    from,
                    expect,
                    got
                );
            }
        }
        Ok(())
    }

    /// Three copies of a keyed transfer at once: exactly one debits, the others answer
    /// with the same transfer as replays (or all get the same refusal).
    async fn burst_transfer(
        &mut self,
        engine: &Engine,
        from: usize,
        key: String,
        request: Request,
    ) -> Result<(), TestCaseError> {
        let expect = expect_transfer(
            &self.ids,
            &self.currencies,
            &self.models,
            from,
            Some(&key),
            &request,
        );
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let engine = engine.clone();
                let id = self.ids[from].clone();
                let key = parse_key(&key);
                let request = request.clone();
                tokio::spawn(async move { engine.transfer(&id, Some(key), request).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.map_err(|e| fail(format!("task: {e}")))?);
        }
        if let Some((Expect::Apply, to)) = expect {
            let mut answers = Vec::new();
            for result in results {
                let outcome = result.map_err(|e| fail(format!("{e:?}")))?;
                answers.push((outcome.replayed, outcome.record));
            }
            let record = the_one_applied(answers)?;
            self.accept_transfer(engine, (from, to), Some(&key), &request, record)
                .await?;
        } else {
            for result in results {
                let expect = expect_transfer(
                    &self.ids,
                    &self.currencies,
                    &self.models,
                    from,
                    Some(&key),
                    &request,
                );
                self.check_transfer_answer(engine, from, Some(&key), &request, expect, result)
                    .await?;
            }
        }
        self.sent.push((from, key, request));
        Ok(())
    }

    async fn op(
        &mut self,
        engine: &Engine,
        acct: usize,
        key: Option<String>,
        request: Request,
    ) -> Result<(), TestCaseError> {
        if let Request::Transfer { .. } = request {
            return self.transfer(engine, acct, key, request).await;
        }
        let expect = self.models[acct].evaluate(key.as_deref(), &request);
        let got = engine
            .execute(
                &self.ids[acct],
                key.as_deref().map(parse_key),
                request.clone(),
            )
            .await;
        match (expect, got) {
            (Expect::Replay, Ok(executed)) if executed.replayed => {
                let k = key.clone().ok_or_else(|| fail("replay without a key"))?;
                let stored = self
                    .receipts
                    .get(&(acct, k))
                    .ok_or_else(|| fail("replay of an unknown receipt"))?;
                prop_assert_eq!(&*executed.receipt, &**stored);
            }
            (Expect::Refuse(want), Err(EngineError::Op(got))) => {
                prop_assert_eq!(normalize(want), normalize(got), "refusal of {:?}", request);
            }
            (Expect::Apply, Ok(executed)) if !executed.replayed => {
                self.accept(acct, key.as_deref(), &request, executed.receipt)?;
            }
            (expect, got) => {
                prop_assert!(
                    false,
                    "{:?} on account {}: model expected {:?}, engine said {:?}",
                    request,
                    acct,
                    expect,
                    got.map(|e| e.replayed)
                );
            }
        }
        if let Some(k) = key {
            self.sent.push((acct, k, request));
        }
        Ok(())
    }

    /// Shuts the engine down, lets `downtime_ms` pass, reopens the directory and checks that
    /// the recovered engine shows exactly what was acknowledged and then expires what fell
    /// due meanwhile; returns the reopened engine.
    async fn restart(
        &mut self,
        engine: Engine,
        config: &EngineConfig,
        downtime_ms: u64,
    ) -> Result<Engine, TestCaseError> {
        if self.lazy {
            self.lazy = false;
            self.expire_all(&engine).await?;
        }
        let keys = all_keys(&self.sent);
        let before = observe_engine(&engine, &self.ids, &keys).await?;
        for (acct, model) in self.models.iter().enumerate() {
            check_holds(before.holds[acct].iter(), before.views[acct].held, model)?;
            let mut history = before.transactions[acct].clone();
            history.reverse();
            check_history(&history, &before.views[acct])?;
        }
        engine.shutdown();
        drop(engine);
        // Time passes while the engine is down.
        self.clock.advance_ms(downtime_ms);
        self.now_ms += downtime_ms;

        let (engine, report) =
            Engine::open(config.clone()).map_err(|e| fail(format!("reopen: {e}")))?;
        let events: u64 = self.ids.len() as u64 + self.models.iter().map(|m| m.seq).sum::<u64>();
        prop_assert_eq!(report.records, events, "every event is in the log once");
        prop_assert!(report.tail_cut.is_none());
        let after = observe_engine(&engine, &self.ids, &keys).await?;
        prop_assert_eq!(
            &after,
            &before,
            "the reopened engine shows what was acknowledged"
        );
        for (acct, entries) in after.entries.iter().enumerate() {
            for (k, entry) in keys.iter().zip(entries) {
                // Only successes are remembered, each under its own request.
                prop_assert_eq!(
                    entry.as_ref().map(|(request, ..)| request),
                    self.models[acct].keys.get(k),
                    "remembered request of key {} on account {}",
                    k,
                    acct
                );
            }
        }

        // Every acknowledged outcome is in the recovered history and, if keyed, remembered.
        for (acct, receipt) in &self.acked {
            let seq = receipt.transaction.seq;
            let found = after.transactions[*acct].iter().find(|t| t.seq == seq);
            prop_assert_eq!(found, Some(&receipt.transaction));
        }
        for ((acct, k), receipt) in &self.receipts {
            let entry = engine
                .idempotency_entry(&self.ids[*acct], &parse_key(k))
                .await
                .map_err(|e| fail(format!("{e:?}")))?
                .ok_or_else(|| fail(format!("acknowledged key {k} forgotten")))?;
            prop_assert_eq!(&*entry.receipt, &**receipt);
        }
        // Every acknowledged transfer is in the recovered book as it was answered, and
        // money is conserved with nothing in flight.
        for record in &self.acked_transfers {
            let back = engine
                .transfer_record(&record.id)
                .await
                .map_err(|e| fail(format!("transfer {} after reopen: {e:?}", record.id)))?;
            prop_assert_eq!(&*back, &**record);
        }
        check_conservation(&self.models, 0, &engine.conservation())?;
        // Holds whose deadline passed while the engine was down expire before serving.
        let expired = engine
            .finish_recovery()
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        let mut due = 0;
        for model in &mut self.models {
            for hold_id in model.due(self.now_ms) {
                model.expire(&hold_id);
                due += 1;
            }
        }
        prop_assert_eq!(
            expired,
            due,
            "holds due after the downtime expire at recovery"
        );
        for (acct, id) in self.ids.iter().enumerate() {
            let view = engine
                .account(id)
                .await
                .map_err(|e| fail(format!("{e:?}")))?;
            check_view(&view, &self.models[acct])?;
            let (holds, _) = engine
                .holds(id, None, None, 1000)
                .await
                .map_err(|e| fail(format!("{e:?}")))?;
            check_holds(holds.iter(), view.held, &self.models[acct])?;
        }
        Ok(engine)
    }
}

async fn run_engine(
    overdrafts: &[u64],
    before_restart: &[Cmd],
    after_restart: &[Cmd],
    downtimes: (u64, u64),
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let clock = Arc::new(ManualClock::new(T_START));
    let mut config = EngineConfig::new(dir.path());
    config.clock = clock.clone();
    let (engine, _) = Engine::open(config.clone()).map_err(|e| fail(format!("open: {e}")))?;
    engine
        .finish_recovery()
        .await
        .map_err(|e| fail(format!("{e:?}")))?;

    let ids = account_ids(overdrafts.len());
    let currencies = currencies(overdrafts.len());
    let mut models = Vec::new();
    for ((id, overdraft), currency) in ids.iter().zip(overdrafts).zip(&currencies) {
        let (created, view) = engine
            .open_account(id.clone(), currency.clone(), *overdraft, Metadata::empty())
            .await
            .map_err(|e| fail(format!("{e:?}")))?;
        prop_assert!(created);
        prop_assert_eq!(view.seq, 0);
        models.push(Model::new(*overdraft));
    }
    let mut run = EngineRun {
        ids,
        clock,
        models,
        now_ms: T_START,
        lazy: false,
        next_key: 0,
        sent: Vec::new(),
        receipts: HashMap::new(),
        acked: Vec::new(),
        currencies,
        transfers: HashMap::new(),
        acked_transfers: Vec::new(),
    };

    for cmd in before_restart {
        run.step(&engine, cmd).await?;
    }
    let engine = run.restart(engine, &config, downtimes.0).await?;
    // The recovered engine goes on: retries of keys from before the restart replay,
    // holds placed before it can be captured, seq continues without a gap.
    for cmd in after_restart {
        run.step(&engine, cmd).await?;
    }
    let engine = run.restart(engine, &config, downtimes.1).await?;
    engine.shutdown();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Goal: through the engine, every outcome matches the reference model; after each
    /// shutdown and reopen of the same directory every account, transaction, hold and
    /// idempotency entry is exactly what was acknowledged, holds that fell due while it was
    /// down expire at recovery, and work goes on from there.
    #[test]
    fn engine_matches_model_across_restarts(
        overdrafts in overdrafts_strategy(3),
        before_restart in scenario_strategy(3, 1..30),
        after_restart in prop::collection::vec(cmd_strategy(3), 0..30),
        downtimes in (downtime_strategy(), downtime_strategy()),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(fail)?;
        runtime.block_on(run_engine(&overdrafts, &before_restart, &after_restart, downtimes))?;
    }
}

/// Regression: `Engine::transfer` without an idempotency key panicked ("decided event
/// refused by check": `decide_transfer` accepted what `check` refuses). It is refused as
/// invalid now, and nothing moves.
#[test]
fn a_transfer_without_a_key_is_refused_and_moves_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (engine, _) = Engine::open(EngineConfig::new(dir.path())).expect("open");
        engine.finish_recovery().await.expect("recovery");
        let ids = account_ids(2);
        for id in &ids {
            engine
                .open_account(id.clone(), gem(), 0, Metadata::empty())
                .await
                .expect("open an account");
        }
        engine
            .execute(&ids[0], Some(parse_key("fund")), credit_request(50))
            .await
            .expect("a credit");
        let request = Request::Transfer {
            to: ids[1].clone(),
            amount: 10,
            metadata: BTreeMap::new(),
        };
        let got = engine.transfer(&ids[0], None, request).await;
        assert!(
            matches!(got, Err(EngineError::Op(OpError::Validation(_)))),
            "{got:?}"
        );
        let from = engine.account(&ids[0]).await.expect("the source");
        let to = engine.account(&ids[1]).await.expect("the destination");
        assert_eq!((from.balance, from.seq), (50, 1));
        assert_eq!((to.balance, to.seq), (0, 0));
        assert!(engine.conservation().holds());
        engine.shutdown();
    });
}

fn credit_request(amount: i128) -> Request {
    Request::Credit {
        amount,
        metadata: BTreeMap::new(),
    }
}
