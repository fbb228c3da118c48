//! The reference model of one account: plain integers and maps, written from docs/API.md's rules
//! without reusing the state machine, so that the two can disagree. The simulation and the
//! property tests feed it the acknowledged requests and compare.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::domain::{
    AccountView, Currency, Field, Hold, HoldStatus, Invalid, OpError, Receipt, Request,
    Transaction, TransferFailure, TransferStatus, TxKind, AMOUNT_MAX, HOLD_EXPIRES_SECS_DEFAULT,
    HOLD_EXPIRES_SECS_MAX,
};
use crate::engine::Conservation;

/// A hold as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelHold {
    /// Amount reserved.
    pub amount: u64,
    /// Amount captured.
    pub captured: u64,
    /// Status.
    pub status: HoldStatus,
    /// Deadline (unix ms).
    pub expires_at_ms: u64,
}

/// One account as the model sees it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Overdraft limit.
    pub overdraft: u64,
    /// Balance.
    pub balance: i128,
    /// Sum of credits.
    pub credits: i128,
    /// Sum of debits.
    pub debits: i128,
    /// Sum of captures.
    pub captures: i128,
    /// Transfers received (and refunds) minus transfers sent.
    pub transfers_net: i128,
    /// Every hold.
    pub holds: BTreeMap<Uuid, ModelHold>,
    /// Hold ids in creation order, to pick from.
    pub hold_order: Vec<Uuid>,
    /// Successful requests by idempotency key.
    pub keys: HashMap<String, Request>,
    /// Events so far.
    pub seq: u64,
}

/// What the model says a request does.
#[derive(Debug)]
pub enum Expect {
    /// Answered again from its key.
    Replay,
    /// Refused.
    Refuse(OpError),
    /// Applied.
    Apply,
}

fn valid_amount(amount: i128) -> Option<u64> {
    (1..=i128::from(AMOUNT_MAX))
        .contains(&amount)
        .then_some(amount as u64)
}

fn valid_metadata(metadata: &BTreeMap<String, String>) -> bool {
    metadata.len() <= 16
        && metadata.iter().all(|(k, v)| {
            let key_chars = k.chars().count();
            (1..=40).contains(&key_chars) && v.chars().count() <= 500
        })
}

fn invalid() -> OpError {
    OpError::Validation(Invalid::new(Field::Request, ""))
}

/// Validation messages are free text; compares only the kind of a validation refusal.
pub fn normalize(error: OpError) -> OpError {
    match error {
        OpError::Validation(_) => invalid(),
        other => other,
    }
}

impl Model {
    /// A new account with this overdraft limit.
    pub fn new(overdraft: u64) -> Model {
        Model {
            overdraft,
            ..Model::default()
        }
    }

    /// Sum of the open holds.
    pub fn held(&self) -> u64 {
        self.holds
            .values()
            .filter(|h| h.status == HoldStatus::Open)
            .map(|h| h.amount)
            .sum()
    }

    /// Number of open holds.
    pub fn open_count(&self) -> usize {
        self.holds
            .values()
            .filter(|h| h.status == HoldStatus::Open)
            .count()
    }

    /// Balance minus held.
    pub fn available(&self) -> i128 {
        self.balance - i128::from(self.held())
    }

    /// What a request would do now.
    pub fn evaluate(&self, key: Option<&str>, request: &Request) -> Expect {
        if let Some(previous) = key.and_then(|k| self.keys.get(k)) {
            return if previous == request {
                Expect::Replay
            } else {
                Expect::Refuse(OpError::IdempotencyKeyReused)
            };
        }
        match self.evaluate_fresh(request) {
            Ok(()) => Expect::Apply,
            Err(error) => Expect::Refuse(error),
        }
    }

    /// docs/API.md's order: validation, hold lookup, hold state, amount vs hold, then money.
    pub fn evaluate_fresh(&self, request: &Request) -> Result<(), OpError> {
        match request {
            Request::Credit { amount, metadata } => {
                let amount = valid_amount(*amount).ok_or_else(invalid)?;
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                if self.balance + i128::from(amount) > i128::from(AMOUNT_MAX) {
                    return Err(OpError::BalanceLimitExceeded {
                        balance: self.balance as i64,
                        amount,
                    });
                }
                Ok(())
            }
            Request::Debit { amount, metadata } => {
                let amount = valid_amount(*amount).ok_or_else(invalid)?;
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                self.funds(amount)
            }
            Request::Hold {
                amount,
                expires_in_secs,
                metadata,
            } => {
                let amount = valid_amount(*amount).ok_or_else(invalid)?;
                if let Some(secs) = expires_in_secs {
                    if !(1..=i128::from(HOLD_EXPIRES_SECS_MAX)).contains(secs) {
                        return Err(invalid());
                    }
                }
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                self.funds(amount)
            }
            Request::Capture {
                hold_id,
                amount,
                metadata,
            } => {
                let amount = match amount {
                    Some(a) => Some(valid_amount(*a).ok_or_else(invalid)?),
                    None => None,
                };
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                let hold = self.open_hold(hold_id)?;
                match amount {
                    Some(a) if a > hold.amount => Err(OpError::AmountExceedsHold {
                        amount: a,
                        hold: hold.amount,
                    }),
                    _ => Ok(()),
                }
            }
            Request::Release { hold_id, metadata } => {
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                self.open_hold(hold_id).map(|_| ())
            }
            // The source's side of a transfer; the caller checks what needs the destination
            // (a different account, the same currency) in docs/API.md's order.
            Request::Transfer {
                amount, metadata, ..
            } => {
                let amount = valid_amount(*amount).ok_or_else(invalid)?;
                if !valid_metadata(metadata) {
                    return Err(invalid());
                }
                self.funds(amount)
            }
        }
    }

    /// What a transfer from this account would do now (docs/API.md): the key first (a transfer
    /// without one is refused: every POST that moves money needs one; replay or reuse),
    /// then validation (amount, metadata, a destination other than the source), then
    /// the currencies, then the funds. `to_currency` is the destination's currency; the
    /// caller answers 404 first when either account does not exist.
    pub fn evaluate_transfer(
        &self,
        key: Option<&str>,
        request: &Request,
        same_account: bool,
        from_currency: &Currency,
        to_currency: &Currency,
    ) -> Expect {
        let Some(key) = key else {
            return Expect::Refuse(invalid());
        };
        if let Some(previous) = self.keys.get(key) {
            return if previous == request {
                Expect::Replay
            } else {
                Expect::Refuse(OpError::IdempotencyKeyReused)
            };
        }
        let Request::Transfer {
            amount, metadata, ..
        } = request
        else {
            return self.evaluate(Some(key), request);
        };
        let Some(amount) = valid_amount(*amount) else {
            return Expect::Refuse(invalid());
        };
        if !valid_metadata(metadata) || same_account {
            return Expect::Refuse(invalid());
        }
        if from_currency != to_currency {
            return Expect::Refuse(OpError::CurrencyMismatch {
                from: from_currency.clone(),
                to: to_currency.clone(),
            });
        }
        match self.funds(amount) {
            Ok(()) => Expect::Apply,
            Err(error) => Expect::Refuse(error),
        }
    }

    /// Credits minus debits and captures: the money this account brought in from outside
    /// (transfers only move money between accounts).
    pub fn external(&self) -> i128 {
        self.credits - self.debits - self.captures
    }

    /// Whether this account can receive `amount` by a transfer (the balance limit).
    pub fn can_receive(&self, amount: u64) -> bool {
        self.balance + i128::from(amount) <= i128::from(AMOUNT_MAX)
    }

    /// The destination's half of a transfer, or the refund of a failed one to its source:
    /// one `transfer_in` transaction.
    pub fn receive(&mut self, amount: u64) {
        self.balance += i128::from(amount);
        self.transfers_net += i128::from(amount);
        self.seq += 1;
    }

    fn open_hold(&self, hold_id: &Uuid) -> Result<&ModelHold, OpError> {
        let hold = self
            .holds
            .get(hold_id)
            .ok_or(OpError::HoldNotFound(*hold_id))?;
        if hold.status != HoldStatus::Open {
            return Err(OpError::HoldNotOpen(hold.status));
        }
        Ok(hold)
    }

    fn funds(&self, amount: u64) -> Result<(), OpError> {
        if i128::from(amount) > self.available() + i128::from(self.overdraft) {
            return Err(OpError::InsufficientFunds {
                available: self.available() as i64,
                overdraft_limit: self.overdraft,
                amount,
            });
        }
        Ok(())
    }

    /// Applies an accepted request; returns the kind and amount its transaction must show.
    pub fn commit(
        &mut self,
        key: Option<&str>,
        request: &Request,
        new_hold: Option<Uuid>,
        now_ms: u64,
    ) -> (TxKind, u64) {
        let amount_of = |a: i128| u64::try_from(a).expect("an accepted amount is positive");
        let result = match request {
            Request::Credit { amount, .. } => {
                let a = amount_of(*amount);
                self.balance += i128::from(a);
                self.credits += i128::from(a);
                (TxKind::Credit, a)
            }
            Request::Debit { amount, .. } => {
                let a = amount_of(*amount);
                self.balance -= i128::from(a);
                self.debits += i128::from(a);
                (TxKind::Debit, a)
            }
            Request::Hold {
                amount,
                expires_in_secs,
                ..
            } => {
                let a = amount_of(*amount);
                let secs = expires_in_secs.map_or(u64::from(HOLD_EXPIRES_SECS_DEFAULT), amount_of);
                let id = new_hold.expect("an accepted hold has an id");
                self.holds.insert(
                    id,
                    ModelHold {
                        amount: a,
                        captured: 0,
                        status: HoldStatus::Open,
                        expires_at_ms: now_ms + secs * 1000,
                    },
                );
                self.hold_order.push(id);
                (TxKind::Hold, a)
            }
            Request::Capture {
                hold_id, amount, ..
            } => {
                let hold = self.holds.get_mut(hold_id).expect("an accepted capture");
                let c = amount.map_or(hold.amount, amount_of);
                hold.status = HoldStatus::Captured;
                hold.captured = c;
                self.balance -= i128::from(c);
                self.captures += i128::from(c);
                (TxKind::Capture, c)
            }
            Request::Release { hold_id, .. } => {
                let hold = self.holds.get_mut(hold_id).expect("an accepted release");
                hold.status = HoldStatus::Released;
                (TxKind::Release, hold.amount)
            }
            Request::Transfer { amount, .. } => {
                let a = amount_of(*amount);
                self.balance -= i128::from(a);
                self.transfers_net -= i128::from(a);
                (TxKind::TransferOut, a)
            }
        };
        self.seq += 1;
        if let Some(k) = key {
            self.keys.insert(k.to_string(), request.clone());
        }
        result
    }

    /// Open holds due at `now_ms`, by (deadline, id): the order the state machine uses.
    pub fn due(&self, now_ms: u64) -> Vec<Uuid> {
        let mut due: Vec<(u64, Uuid)> = self
            .holds
            .iter()
            .filter(|(_, h)| h.status == HoldStatus::Open && h.expires_at_ms <= now_ms)
            .map(|(id, h)| (h.expires_at_ms, *id))
            .collect();
        due.sort();
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// Expires one hold; returns the amount released.
    pub fn expire(&mut self, hold_id: &Uuid) -> u64 {
        let hold = self.holds.get_mut(hold_id).expect("a due hold");
        hold.status = HoldStatus::Expired;
        self.seq += 1;
        hold.amount
    }
}

/// How the model says a transfer whose source was debited ends (docs/API.md, DESIGN.md): the
/// destination is credited unless that would push its balance over the limit; then the
/// source is refunded, unless even that would push the source's balance over the limit
/// (credits since the debit), and the money stays in flight until a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferEnd {
    /// `transfer_in` on the destination.
    Completed,
    /// `transfer_in` (the refund) on the source; the transfer failed.
    Refunded,
    /// Neither side can take the money now.
    Stuck,
}

impl TransferEnd {
    /// What the second half of a transfer of `amount` does now.
    pub fn decide(from: &Model, to: &Model, amount: u64) -> TransferEnd {
        if to.can_receive(amount) {
            TransferEnd::Completed
        } else if from.can_receive(amount) {
            TransferEnd::Refunded
        } else {
            TransferEnd::Stuck
        }
    }

    /// The transfer status this end shows.
    pub fn status(self) -> TransferStatus {
        match self {
            TransferEnd::Completed => TransferStatus::Completed,
            TransferEnd::Refunded => TransferStatus::Failed(TransferFailure::BalanceLimitExceeded),
            TransferEnd::Stuck => TransferStatus::Pending,
        }
    }
}

/// A request that differs from `request` under the same key (a reuse the engine must
/// refuse), often only in an optional field being absent rather than given explicitly with
/// its default. `model` is the account's, for the hold a capture names.
pub fn different(request: &Request, model: &Model) -> Request {
    match request.clone() {
        Request::Transfer {
            to,
            amount,
            metadata,
        } => Request::Transfer {
            to,
            amount: amount.checked_add(1).unwrap_or(amount - 1),
            metadata,
        },
        Request::Credit { amount, metadata } => Request::Credit {
            amount: amount.checked_add(1).unwrap_or(amount - 1),
            metadata,
        },
        Request::Debit { amount, metadata } => Request::Debit {
            amount: amount.checked_add(1).unwrap_or(amount - 1),
            metadata,
        },
        Request::Hold {
            amount,
            expires_in_secs,
            metadata,
        } => Request::Hold {
            amount,
            expires_in_secs: match expires_in_secs {
                None => Some(i128::from(HOLD_EXPIRES_SECS_DEFAULT)),
                Some(_) => None,
            },
            metadata,
        },
        Request::Capture {
            hold_id,
            amount,
            metadata,
        } => Request::Capture {
            hold_id,
            amount: match amount {
                None => Some(
                    model
                        .holds
                        .get(&hold_id)
                        .map_or(1, |h| i128::from(h.amount)),
                ),
                Some(_) => None,
            },
            metadata,
        },
        Request::Release { hold_id, metadata } => Request::Release {
            hold_id,
            metadata: if metadata.is_empty() {
                BTreeMap::from([("note".to_string(), "n".to_string())])
            } else {
                BTreeMap::new()
            },
        },
    }
}

/// Fails with a message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Fails with both values unless they are equal.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $what:expr) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: {:?} != {:?}", $what, left, right));
        }
    }};
}

pub(crate) use {ensure, ensure_eq};

/// The account's public numbers against the model, and invariants 1-3 on them.
pub fn check_view(view: &AccountView, model: &Model) -> Result<(), String> {
    ensure_eq!(i128::from(view.balance), model.balance, "balance");
    ensure_eq!(view.held, model.held(), "held");
    ensure_eq!(
        i128::from(view.available),
        i128::from(view.balance) - i128::from(view.held),
        "available = balance - held"
    );
    ensure!(
        i128::from(view.available) >= -i128::from(view.overdraft_limit),
        "invariant 1: available {} below -{}",
        view.available,
        view.overdraft_limit
    );
    ensure!(view.balance <= AMOUNT_MAX as i64, "balance over AMOUNT_MAX");
    ensure_eq!(view.overdraft_limit, model.overdraft, "overdraft limit");
    ensure_eq!(view.open_holds as usize, model.open_count(), "open holds");
    ensure_eq!(view.seq, model.seq, "seq");
    ensure_eq!(
        model.balance,
        model.external() + model.transfers_net,
        "invariant 3 in the model"
    );
    Ok(())
}

/// Money conservation (invariant 3) over all accounts: in the models themselves (the sum
/// of balances plus the money in flight equals the sum of credits minus debits and
/// captures), and the engine's sums against the models'. `in_flight` is the sum of the
/// amounts of the transfers the model has debited and not yet ended.
pub fn check_conservation<'a>(
    models: impl IntoIterator<Item = &'a Model>,
    in_flight: u64,
    got: &Conservation,
) -> Result<(), String> {
    let (mut balances, mut external) = (0i128, 0i128);
    for model in models {
        balances += model.balance;
        external += model.external();
    }
    let in_flight = i128::from(in_flight);
    ensure_eq!(
        balances + in_flight,
        external,
        "invariant 3 in the model: balances + in flight = credits - debits - captures"
    );
    ensure_eq!(got.balances, balances, "sum of balances");
    ensure_eq!(got.in_flight, in_flight, "money in flight");
    ensure_eq!(
        got.external,
        external as i64,
        "credits - debits - captures (modulo 2^64)"
    );
    ensure!(got.holds(), "invariant 3: money is not conserved: {got:?}");
    Ok(())
}

/// Every hold against the model; held equals the sum of the open holds (invariant 2).
pub fn check_holds<'a>(
    holds: impl Iterator<Item = &'a Hold>,
    held: u64,
    model: &Model,
) -> Result<(), String> {
    let got: BTreeMap<Uuid, ModelHold> = holds
        .map(|h| {
            (
                h.id,
                ModelHold {
                    amount: h.amount.get(),
                    captured: h.captured,
                    status: h.status,
                    expires_at_ms: h.expires_at_ms,
                },
            )
        })
        .collect();
    ensure_eq!(&got, &model.holds, "holds");
    let open_sum: u64 = got
        .values()
        .filter(|h| h.status == HoldStatus::Open)
        .map(|h| h.amount)
        .sum();
    ensure_eq!(open_sum, held, "invariant 2: held is the sum of open holds");
    Ok(())
}

/// The change a transaction makes to the balance.
fn balance_change(tx: &Transaction) -> i128 {
    match tx.kind {
        TxKind::Credit | TxKind::TransferIn => i128::from(tx.amount),
        TxKind::Debit | TxKind::Capture | TxKind::TransferOut => -i128::from(tx.amount),
        TxKind::Hold | TxKind::Release | TxKind::Expire => 0,
    }
}

/// History oldest first, the newest transactions with consecutive seqs ending at the
/// account's seq (invariant 4; from seq 1 when nothing was trimmed); money is conserved
/// along it (invariant 3) and available never goes below the overdraft (invariant 1).
pub fn check_history(history: &[Transaction], view: &AccountView) -> Result<(), String> {
    let first = history.first().map_or(1, |t| t.seq);
    ensure_eq!(
        first + history.len() as u64,
        view.seq + 1,
        "history ends at the account's seq"
    );
    let mut balance: i128 = match history.first() {
        Some(tx) if tx.seq > 1 => i128::from(tx.balance) - balance_change(tx),
        _ => 0,
    };
    for (i, tx) in history.iter().enumerate() {
        ensure_eq!(tx.seq, first + i as u64, "invariant 4: seq");
        ensure_eq!(&tx.account_id, &view.id, "transaction account");
        balance += balance_change(tx);
        ensure_eq!(
            i128::from(tx.balance),
            balance,
            format!("invariant 3 at seq {}", tx.seq)
        );
        ensure_eq!(
            i128::from(tx.available),
            i128::from(tx.balance) - i128::from(tx.held),
            "available = balance - held"
        );
        ensure!(
            i128::from(tx.available) >= -i128::from(view.overdraft_limit),
            "invariant 1 at seq {}",
            tx.seq
        );
    }
    ensure_eq!(
        balance,
        i128::from(view.balance),
        "balance at the end of history"
    );
    Ok(())
}

/// A fresh receipt against the model just after the commit.
pub fn check_receipt(
    receipt: &Receipt,
    model: &Model,
    kind: TxKind,
    amount: u64,
    hold_id: Option<Uuid>,
) -> Result<(), String> {
    let tx = &receipt.transaction;
    ensure_eq!(tx.kind, kind, "kind");
    ensure_eq!(tx.amount, amount, "amount");
    ensure_eq!(tx.seq, model.seq, "seq");
    ensure_eq!(i128::from(tx.balance), model.balance, "balance");
    ensure_eq!(tx.held, model.held(), "held");
    ensure_eq!(tx.hold_id, hold_id, "hold id");
    ensure_eq!(receipt.account.seq, model.seq, "account seq");
    ensure_eq!(receipt.account.balance, tx.balance, "account balance");
    ensure_eq!(receipt.account.held, tx.held, "account held");
    match (hold_id, &receipt.hold) {
        (Some(id), Some(hold)) => {
            let want = model
                .holds
                .get(&id)
                .ok_or_else(|| "hold not in model".to_string())?;
            ensure_eq!(hold.id, id, "hold id");
            ensure_eq!(hold.status, want.status, "hold status");
            ensure_eq!(hold.captured, want.captured, "hold captured");
            ensure_eq!(hold.amount.get(), want.amount, "hold amount");
        }
        (None, None) => {}
        (want, got) => return Err(format!("receipt hold {got:?}, expected {want:?}")),
    }
    Ok(())
}
