//! Unit tests of the account state machine: every operation and every refusal.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::*;

/// A fixed "now" for tests that do not move time (2026-01-01T00:00:00Z).
const T0: u64 = 1_767_225_600_000;

fn account_id() -> AccountId {
    AccountId::parse("player-42").expect("a valid account id")
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).expect("a valid idempotency key")
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn no_meta() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn gem() -> Currency {
    Currency::parse("GEM").expect("a valid currency")
}

fn open_event(overdraft_limit: u64) -> Event {
    Event {
        lsn: 1,
        account: account_id(),
        seq: 0,
        at_ms: T0,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency: gem(),
            overdraft_limit,
            metadata: Metadata::new(meta(&[("tier", "gold")])).expect("valid metadata"),
        },
        outcome: None,
    }
}

fn open(overdraft_limit: u64) -> Account {
    Account::open(&open_event(overdraft_limit)).expect("a valid open event")
}

fn credit(amount: i128) -> Request {
    Request::Credit {
        amount,
        metadata: no_meta(),
    }
}

fn debit(amount: i128) -> Request {
    Request::Debit {
        amount,
        metadata: no_meta(),
    }
}

fn hold(amount: i128, expires_in_secs: Option<i128>) -> Request {
    Request::Hold {
        amount,
        expires_in_secs,
        metadata: no_meta(),
    }
}

fn capture(hold_id: Uuid, amount: Option<i128>) -> Request {
    Request::Capture {
        hold_id,
        amount,
        metadata: no_meta(),
    }
}

fn release(hold_id: Uuid) -> Request {
    Request::Release {
        hold_id,
        metadata: no_meta(),
    }
}

/// A hold id of the shape the engine makes (v7), distinct per `n`.
fn hold_uuid(n: u128) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + n)
}

/// The event that carries `body` as the account's next change.
fn next_event(account: &Account, k: Option<&str>, body: EventBody, at_ms: u64) -> Event {
    let lsn = account.last_lsn() + 1;
    Event {
        lsn,
        account: account.id().clone(),
        seq: account.seq() + 1,
        at_ms,
        tx_id: Uuid::from_u128(0x0193_0000_0000_7000_9000_0000_0000_0000 + u128::from(lsn)),
        idempotency_key: k.map(key),
        body,
        outcome: None,
    }
}

/// Decides a request that must be accepted, checks and applies its event, returns the receipt.
fn exec_at(
    account: &mut Account,
    k: Option<&str>,
    request: Request,
    now_ms: u64,
    hold_id: Uuid,
) -> Arc<Receipt> {
    exec_kept(account, Retention::UNLIMITED, k, request, now_ms, hold_id)
}

/// `exec_at` with a retention.
fn exec_kept(
    account: &mut Account,
    retention: Retention,
    k: Option<&str>,
    request: Request,
    now_ms: u64,
    hold_id: Uuid,
) -> Arc<Receipt> {
    let fresh = Fresh { now_ms, hold_id };
    let decision = account
        .decide(k.map(key).as_ref(), &request, fresh)
        .expect("the request is accepted");
    let Decision::Apply(body) = decision else {
        panic!("expected a new event, got {decision:?}");
    };
    let event = next_event(account, k, body, now_ms);
    account
        .check(&event)
        .expect("check accepts a decided event");
    account
        .apply(&event, retention)
        .expect("apply accepts a decided event")
}

/// `exec_at` at T0, with a fresh hold id derived from the account's seq.
fn exec(account: &mut Account, k: Option<&str>, request: Request) -> Arc<Receipt> {
    let hold_id = hold_uuid(u128::from(account.seq()) + 1);
    exec_at(account, k, request, T0, hold_id)
}

/// Places a hold of `amount` with the default lifetime and returns its id.
fn place_hold(account: &mut Account, amount: i128) -> Uuid {
    let receipt = exec(account, None, hold(amount, None));
    receipt
        .hold
        .as_ref()
        .expect("a hold receipt names its hold")
        .id
}

/// Decides a request that must be refused and returns the refusal.
fn refuse(account: &Account, k: Option<&str>, request: &Request) -> OpError {
    let fresh = Fresh {
        now_ms: T0,
        hold_id: hold_uuid(10_000),
    };
    match account.decide(k.map(key).as_ref(), request, fresh) {
        Err(error) => error,
        Ok(decision) => panic!("expected a refusal, got {decision:?}"),
    }
}

/// Decides a request that must be an idempotent replay and returns the stored entry.
fn replay(account: &Account, k: &str, request: &Request) -> IdempotencyEntry {
    let fresh = Fresh {
        now_ms: T0 + 5,
        hold_id: hold_uuid(20_000),
    };
    match account.decide(Some(&key(k)), request, fresh) {
        Ok(Decision::Replay(entry)) => entry,
        other => panic!("expected a replay, got {other:?}"),
    }
}

fn assert_validation(error: OpError) {
    assert!(
        matches!(error, OpError::Validation(_)),
        "expected validation_failed, got {error:?}"
    );
}

/// Everything observable about an account, to show that a refusal changed nothing.
#[derive(Debug, PartialEq)]
struct Observed {
    view: AccountView,
    history: Vec<Transaction>,
    holds: Vec<Hold>,
    deadlines: Vec<(u64, Uuid)>,
    last_lsn: u64,
    entries: Vec<Option<(Request, Receipt, u64, u64)>>,
}

fn observe(account: &Account, keys: &[&str]) -> Observed {
    Observed {
        view: account.view(),
        history: account.history().to_vec(),
        holds: account.holds_after(None).cloned().collect(),
        deadlines: account.open_deadlines().collect(),
        last_lsn: account.last_lsn(),
        entries: keys
            .iter()
            .map(|k| {
                account.idempotency_entry(&key(k)).map(|e| {
                    (
                        e.request.clone(),
                        (*e.receipt).clone(),
                        e.lsn,
                        e.created_at_ms,
                    )
                })
            })
            .collect(),
    }
}

fn too_many_keys() -> BTreeMap<String, String> {
    (0..17)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect()
}

/// Metadata maps that break one limit each.
fn bad_metadata() -> Vec<BTreeMap<String, String>> {
    vec![
        too_many_keys(),
        BTreeMap::from([(String::new(), "v".to_string())]),
        BTreeMap::from([("k".repeat(41), "v".to_string())]),
        BTreeMap::from([("k".to_string(), "v".repeat(501))]),
    ]
}

/// Metadata maps exactly at the limits.
fn edge_metadata() -> Vec<BTreeMap<String, String>> {
    vec![
        (0..16)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
        BTreeMap::from([("k".repeat(40), "é".repeat(500))]),
        BTreeMap::from([("x".to_string(), String::new())]),
    ]
}

// ----- open -----

#[test]
fn open_starts_empty_with_the_given_fields() {
    // Goal: an opened account has seq 0, no money, no holds, and the fields of its open event.
    let account = open(25);
    let view = account.view();
    assert_eq!(view.id, account_id());
    assert_eq!(view.currency, gem());
    assert_eq!(view.balance, 0);
    assert_eq!(view.held, 0);
    assert_eq!(view.available, 0);
    assert_eq!(view.overdraft_limit, 25);
    assert_eq!(view.open_holds, 0);
    assert_eq!(view.seq, 0);
    assert_eq!(view.created_at_ms, T0);
    assert_eq!(view.metadata.to_map(), meta(&[("tier", "gold")]));
    assert_eq!(account.last_lsn(), 1);
    assert!(account.history().is_empty());
    assert_eq!(account.holds_after(None).count(), 0);
    assert!(account.due_holds(u64::MAX).is_empty());
}

#[test]
fn open_refuses_events_that_cannot_start_an_account() {
    // Goal: Account::open refuses a non-open event, a non-zero seq and an overdraft above 2^53-1.
    let mut not_open = open_event(0);
    not_open.seq = 1;
    not_open.body = EventBody::Credit {
        amount: Amount::new(5).expect("valid"),
        metadata: Metadata::empty(),
    };
    assert!(Account::open(&not_open).is_err());

    let mut nonzero_seq = open_event(0);
    nonzero_seq.seq = 1;
    assert!(Account::open(&nonzero_seq).is_err());

    assert!(Account::open(&open_event(AMOUNT_MAX)).is_ok());
    assert!(Account::open(&open_event(AMOUNT_MAX + 1)).is_err());
}

// ----- credit -----

#[test]
fn credit_adds_money_and_records_one_transaction() {
    // Goal: a credit raises balance and available, adds one transaction and remembers its key.
    let mut account = open(0);
    let request = Request::Credit {
        amount: 150,
        metadata: meta(&[("order", "A-1")]),
    };
    let receipt = exec_at(
        &mut account,
        Some("c1"),
        request.clone(),
        T0 + 7,
        hold_uuid(1),
    );
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Credit);
    assert_eq!(tx.amount, 150);
    assert_eq!(tx.seq, 1);
    assert_eq!(tx.account_id, account_id());
    assert_eq!(tx.hold_id, None);
    assert_eq!(tx.transfer_id, None);
    assert_eq!((tx.balance, tx.held, tx.available), (150, 0, 150));
    assert_eq!(tx.created_at_ms, T0 + 7);
    assert_eq!(tx.metadata.to_map(), meta(&[("order", "A-1")]));
    assert_eq!(Some(tx.id), account.history().get(0).map(|t| t.id));
    assert!(receipt.hold.is_none());
    assert_eq!(receipt.account, account.view());
    assert_eq!(account.balance(), 150);
    assert_eq!(account.available(), 150);
    assert_eq!(account.seq(), 1);
    assert_eq!(account.last_lsn(), 2);
    assert_eq!(account.history().to_vec(), vec![tx.clone()]);

    let entry = account
        .idempotency_entry(&key("c1"))
        .expect("a successful keyed request is remembered");
    assert_eq!(entry.request, request);
    assert_eq!(*entry.receipt, *receipt);
    assert_eq!(entry.lsn, 2);
    assert_eq!(entry.created_at_ms, T0 + 7);
}

#[test]
fn credit_without_a_key_is_applied_and_not_remembered() {
    // Goal: a request without a key is applied each time it is sent (no idempotency).
    let mut account = open(0);
    exec(&mut account, None, credit(10));
    exec(&mut account, None, credit(10));
    assert_eq!(account.balance(), 20);
    assert_eq!(account.seq(), 2);
}

#[test]
fn credit_up_to_the_balance_limit_and_not_beyond() {
    // Goal: a balance may reach 2^53-1 exactly; a credit that would pass it is balance_limit_exceeded.
    let mut account = open(0);
    exec(&mut account, None, credit(i128::from(AMOUNT_MAX) - 10));
    exec(&mut account, None, credit(10));
    assert_eq!(account.balance(), AMOUNT_MAX as i64);
    let before = observe(&account, &[]);
    assert_eq!(
        refuse(&account, Some("over"), &credit(1)),
        OpError::BalanceLimitExceeded {
            balance: AMOUNT_MAX as i64,
            amount: 1
        }
    );
    assert_eq!(observe(&account, &[]), before);
    assert!(account.idempotency_entry(&key("over")).is_none());
}

#[test]
fn credit_of_the_largest_amount_twice_is_refused_the_second_time() {
    // Goal: two credits of 2^53-1 cannot both pass; the second reports the balance and amount.
    let mut account = open(0);
    exec(&mut account, None, credit(i128::from(AMOUNT_MAX)));
    assert_eq!(
        refuse(&account, None, &credit(i128::from(AMOUNT_MAX))),
        OpError::BalanceLimitExceeded {
            balance: AMOUNT_MAX as i64,
            amount: AMOUNT_MAX
        }
    );
}

#[test]
fn credit_into_an_overdrawn_account_counts_from_the_negative_balance() {
    // Goal: the balance limit applies to balance + amount, also when the balance is negative.
    let mut account = open(100);
    exec(&mut account, None, debit(100));
    assert_eq!(account.balance(), -100);
    let receipt = exec(&mut account, None, credit(i128::from(AMOUNT_MAX)));
    assert_eq!(receipt.transaction.balance, AMOUNT_MAX as i64 - 100);
    exec(&mut account, None, credit(100));
    assert!(matches!(
        refuse(&account, None, &credit(1)),
        OpError::BalanceLimitExceeded { .. }
    ));
}

// ----- debit -----

#[test]
fn debit_removes_money_down_to_zero() {
    // Goal: a debit lowers balance; the whole available amount may be debited, one more may not.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let receipt = exec(&mut account, Some("d1"), debit(60));
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Debit);
    assert_eq!(tx.amount, 60);
    assert_eq!(tx.seq, 2);
    assert_eq!((tx.balance, tx.held, tx.available), (40, 0, 40));
    exec(&mut account, None, debit(40));
    assert_eq!(account.balance(), 0);
    assert_eq!(
        refuse(&account, None, &debit(1)),
        OpError::InsufficientFunds {
            available: 0,
            overdraft_limit: 0,
            amount: 1
        }
    );
}

#[test]
fn debit_beyond_available_is_insufficient_funds_and_changes_nothing() {
    // Goal: a debit larger than available is refused with the numbers, leaving no trace.
    let mut account = open(0);
    exec(&mut account, None, credit(50));
    let before = observe(&account, &["d"]);
    assert_eq!(
        refuse(&account, Some("d"), &debit(51)),
        OpError::InsufficientFunds {
            available: 50,
            overdraft_limit: 0,
            amount: 51
        }
    );
    assert_eq!(observe(&account, &["d"]), before);
}

#[test]
fn debit_counts_held_money_as_unavailable() {
    // Goal: money reserved by an open hold cannot be debited.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    place_hold(&mut account, 70);
    assert_eq!(
        refuse(&account, None, &debit(31)),
        OpError::InsufficientFunds {
            available: 30,
            overdraft_limit: 0,
            amount: 31
        }
    );
    exec(&mut account, None, debit(30));
    assert_eq!(account.available(), 0);
    assert_eq!(account.balance(), 70);
}

// ----- overdraft -----

#[test]
fn overdraft_lets_available_reach_minus_the_limit_and_no_lower() {
    // Goal: with overdraft_limit 100, available may reach exactly -100 but never below.
    let mut account = open(100);
    exec(&mut account, None, credit(20));
    let receipt = exec(&mut account, None, debit(120));
    assert_eq!(receipt.transaction.available, -100);
    assert_eq!(account.balance(), -100);
    assert_eq!(
        refuse(&account, None, &debit(1)),
        OpError::InsufficientFunds {
            available: -100,
            overdraft_limit: 100,
            amount: 1
        }
    );
    assert!(matches!(
        refuse(&account, None, &hold(1, None)),
        OpError::InsufficientFunds { .. }
    ));
}

#[test]
fn overdraft_applies_to_holds_too() {
    // Goal: a hold may use the overdraft, so available reaches -limit through a hold.
    let mut account = open(40);
    exec(&mut account, None, credit(10));
    let hold_id = place_hold(&mut account, 50);
    assert_eq!(account.available(), -40);
    assert_eq!(account.balance(), 10);
    assert_eq!(account.held(), 50);
    assert_eq!(
        refuse(&account, None, &hold(1, None)),
        OpError::InsufficientFunds {
            available: -40,
            overdraft_limit: 40,
            amount: 1
        }
    );
    // Capturing the hold takes the balance below zero, within the overdraft.
    exec(&mut account, None, capture(hold_id, None));
    assert_eq!(account.balance(), -40);
    assert_eq!(account.available(), -40);
    assert_eq!(account.held(), 0);
}

// ----- hold -----

#[test]
fn hold_reserves_money_with_the_default_lifetime() {
    // Goal: a hold without expires_in_secs reserves its amount for 3600 s and records one transaction.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = hold_uuid(77);
    let request = Request::Hold {
        amount: 30,
        expires_in_secs: None,
        metadata: meta(&[("sku", "sword")]),
    };
    let receipt = exec_at(&mut account, Some("h1"), request, T0 + 1, hold_id);
    let h = receipt
        .hold
        .as_ref()
        .expect("a hold receipt names its hold");
    assert_eq!(h.id, hold_id);
    assert_eq!(h.account_id, account_id());
    assert_eq!(h.amount.get(), 30);
    assert_eq!(h.captured, 0);
    assert_eq!(h.status, HoldStatus::Open);
    assert_eq!(h.created_at_ms, T0 + 1);
    assert_eq!(
        h.expires_at_ms,
        T0 + 1 + u64::from(HOLD_EXPIRES_SECS_DEFAULT) * 1000
    );
    assert_eq!(h.metadata.to_map(), meta(&[("sku", "sword")]));
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Hold);
    assert_eq!(tx.amount, 30);
    assert_eq!(tx.hold_id, Some(hold_id));
    assert_eq!((tx.balance, tx.held, tx.available), (100, 30, 70));
    assert_eq!(account.hold(&hold_id), Some(h));
    assert_eq!(account.view().open_holds, 1);
    assert_eq!(account.held(), 30);
    assert_eq!(account.available(), 70);
    assert_eq!(account.balance(), 100);
    assert_eq!(
        account.open_deadlines().collect::<Vec<_>>(),
        vec![(h.expires_at_ms, hold_id)]
    );
}

#[test]
fn hold_with_an_explicit_lifetime_at_both_bounds() {
    // Goal: expires_in_secs 1 and 2592000 are accepted and set the deadline from now.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let short = exec_at(&mut account, None, hold(1, Some(1)), T0, hold_uuid(1));
    let long = exec_at(
        &mut account,
        None,
        hold(1, Some(i128::from(HOLD_EXPIRES_SECS_MAX))),
        T0,
        hold_uuid(2),
    );
    let short = short.hold.as_ref().expect("hold");
    let long = long.hold.as_ref().expect("hold");
    assert_eq!(short.expires_at_ms, T0 + 1000);
    assert_eq!(long.expires_at_ms, T0 + 2_592_000_000);
    assert_eq!(account.held(), 2);
}

#[test]
fn hold_lifetime_out_of_bounds_is_validation() {
    // Goal: expires_in_secs of 0, negative or above 2592000 is validation_failed.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    for secs in [
        0,
        -1,
        i128::from(HOLD_EXPIRES_SECS_MAX) + 1,
        i128::MAX,
        i128::MIN,
    ] {
        assert_validation(refuse(&account, None, &hold(10, Some(secs))));
    }
    assert_eq!(account.held(), 0);
}

#[test]
fn hold_beyond_available_is_insufficient_funds() {
    // Goal: a hold larger than available (balance minus other holds) is refused.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    place_hold(&mut account, 60);
    assert_eq!(
        refuse(&account, None, &hold(41, None)),
        OpError::InsufficientFunds {
            available: 40,
            overdraft_limit: 0,
            amount: 41
        }
    );
    place_hold(&mut account, 40);
    assert_eq!(account.available(), 0);
    assert_eq!(account.held(), 100);
    assert_eq!(account.view().open_holds, 2);
}

// ----- capture -----

#[test]
fn capture_of_the_whole_hold() {
    // Goal: a capture without amount takes the whole hold: balance drops, held drops, hold ends captured.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 30);
    let receipt = exec(&mut account, Some("cap"), capture(hold_id, None));
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Capture);
    assert_eq!(tx.amount, 30);
    assert_eq!(tx.hold_id, Some(hold_id));
    assert_eq!(tx.seq, 3);
    assert_eq!((tx.balance, tx.held, tx.available), (70, 0, 70));
    let h = receipt.hold.as_ref().expect("capture names its hold");
    assert_eq!(h.status, HoldStatus::Captured);
    assert_eq!(h.captured, 30);
    assert_eq!(h.amount.get(), 30);
    assert_eq!(account.hold(&hold_id), Some(h));
    assert_eq!(account.view().open_holds, 0);
    assert!(account.open_deadlines().next().is_none());
}

#[test]
fn partial_capture_releases_the_rest_in_one_transaction() {
    // Goal: capturing 12 of a 30 hold debits 12, frees 18, ends the hold captured, in one transaction.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 30);
    let seq_before = account.seq();
    let receipt = exec(&mut account, None, capture(hold_id, Some(12)));
    assert_eq!(account.seq(), seq_before + 1);
    assert_eq!(account.history().len(), 3);
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Capture);
    assert_eq!(tx.amount, 12);
    assert_eq!((tx.balance, tx.held, tx.available), (88, 0, 88));
    let h = account.hold(&hold_id).expect("the hold stays known");
    assert_eq!(h.status, HoldStatus::Captured);
    assert_eq!(h.captured, 12);
    assert_eq!(h.amount.get(), 30);
    assert_eq!(account.held(), 0);
    assert_eq!(account.view().open_holds, 0);
}

#[test]
fn capture_of_exactly_the_hold_amount_is_accepted() {
    // Goal: an explicit capture amount equal to the hold is allowed (the bound is inclusive).
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 30);
    let receipt = exec(&mut account, None, capture(hold_id, Some(30)));
    assert_eq!(receipt.transaction.amount, 30);
    assert_eq!(account.balance(), 70);
}

#[test]
fn capture_larger_than_the_hold_is_amount_exceeds_hold() {
    // Goal: a capture above the hold amount is amount_exceeds_hold and leaves the hold open.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 30);
    let before = observe(&account, &["x"]);
    assert_eq!(
        refuse(&account, Some("x"), &capture(hold_id, Some(31))),
        OpError::AmountExceedsHold {
            amount: 31,
            hold: 30
        }
    );
    assert_eq!(observe(&account, &["x"]), before);
}

#[test]
fn capture_leaves_other_holds_alone() {
    // Goal: capturing one hold changes only that hold; the other stays open and held.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let first = place_hold(&mut account, 30);
    let second = place_hold(&mut account, 20);
    exec(&mut account, None, capture(first, Some(5)));
    assert_eq!(
        account.hold(&second).map(|h| h.status),
        Some(HoldStatus::Open)
    );
    assert_eq!(account.held(), 20);
    assert_eq!(account.balance(), 95);
    assert_eq!(account.available(), 75);
    assert_eq!(account.view().open_holds, 1);
}

// ----- release -----

#[test]
fn release_frees_the_hold_without_moving_money() {
    // Goal: a release ends the hold released, frees its amount and keeps the balance.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 30);
    let receipt = exec(&mut account, Some("rel"), release(hold_id));
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Release);
    assert_eq!(tx.amount, 30);
    assert_eq!(tx.hold_id, Some(hold_id));
    assert_eq!((tx.balance, tx.held, tx.available), (100, 0, 100));
    let h = receipt.hold.as_ref().expect("release names its hold");
    assert_eq!(h.status, HoldStatus::Released);
    assert_eq!(h.captured, 0);
    assert_eq!(account.hold(&hold_id), Some(h));
    assert_eq!(account.view().open_holds, 0);
    assert!(account.open_deadlines().next().is_none());
}

// ----- hold_not_found and hold_not_open -----

#[test]
fn capture_or_release_of_an_unknown_hold_is_hold_not_found() {
    // Goal: naming a hold the account does not have is hold_not_found with the id.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    place_hold(&mut account, 10);
    let unknown = hold_uuid(999);
    assert_eq!(
        refuse(&account, None, &capture(unknown, None)),
        OpError::HoldNotFound(unknown)
    );
    assert_eq!(
        refuse(&account, None, &capture(unknown, Some(1))),
        OpError::HoldNotFound(unknown)
    );
    assert_eq!(
        refuse(&account, None, &release(unknown)),
        OpError::HoldNotFound(unknown)
    );
}

#[test]
fn a_hold_that_ended_is_hold_not_open_with_its_status() {
    // Goal: capture or release of a captured, released or expired hold is hold_not_open naming the status.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let captured = place_hold(&mut account, 10);
    let released = place_hold(&mut account, 10);
    let expired = exec_at(&mut account, None, hold(10, Some(1)), T0, hold_uuid(500))
        .hold
        .as_ref()
        .expect("hold")
        .id;
    exec(&mut account, None, capture(captured, None));
    exec(&mut account, None, release(released));
    let body = account
        .decide_expire(&expired, T0 + 1000)
        .expect("the hold is due");
    let event = next_event(&account, None, body, T0 + 1000);
    account
        .apply(&event, Retention::UNLIMITED)
        .expect("expire applies");

    for (hold_id, status) in [
        (captured, HoldStatus::Captured),
        (released, HoldStatus::Released),
        (expired, HoldStatus::Expired),
    ] {
        assert_eq!(
            refuse(&account, None, &capture(hold_id, None)),
            OpError::HoldNotOpen(status)
        );
        assert_eq!(
            refuse(&account, None, &capture(hold_id, Some(1))),
            OpError::HoldNotOpen(status)
        );
        assert_eq!(
            refuse(&account, None, &release(hold_id)),
            OpError::HoldNotOpen(status)
        );
    }
    assert_eq!(account.balance(), 90);
    assert_eq!(account.held(), 0);
}

// ----- expire -----

#[test]
fn expire_only_when_the_deadline_has_come() {
    // Goal: decide_expire says nothing before the deadline and expires the hold from the deadline on.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let receipt = exec_at(&mut account, None, hold(25, Some(60)), T0, hold_uuid(1));
    let hold_id = receipt.hold.as_ref().expect("hold").id;
    let deadline = T0 + 60_000;
    assert_eq!(account.decide_expire(&hold_id, T0), None);
    assert_eq!(account.decide_expire(&hold_id, deadline - 1), None);
    assert!(account.due_holds(deadline - 1).is_empty());
    assert_eq!(
        account.decide_expire(&hold_id, deadline),
        Some(EventBody::Expire { hold_id })
    );
    assert_eq!(account.due_holds(deadline), vec![hold_id]);
    assert_eq!(
        account.decide_expire(&hold_id, deadline + 10_000),
        Some(EventBody::Expire { hold_id })
    );
}

#[test]
fn expire_releases_the_hold_as_one_expire_transaction() {
    // Goal: applying an expire frees the amount, ends the hold expired and writes one expire transaction.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let receipt = exec_at(&mut account, None, hold(25, Some(60)), T0, hold_uuid(1));
    let hold_id = receipt.hold.as_ref().expect("hold").id;
    let now = T0 + 61_000;
    let body = account.decide_expire(&hold_id, now).expect("due");
    let event = next_event(&account, None, body, now);
    let receipt = account
        .apply(&event, Retention::UNLIMITED)
        .expect("expire applies");
    let tx = &receipt.transaction;
    assert_eq!(tx.kind, TxKind::Expire);
    assert_eq!(tx.amount, 25);
    assert_eq!(tx.hold_id, Some(hold_id));
    assert_eq!(tx.seq, 3);
    assert_eq!(tx.created_at_ms, now);
    assert!(tx.metadata.is_empty());
    assert_eq!((tx.balance, tx.held, tx.available), (100, 0, 100));
    let h = receipt.hold.as_ref().expect("expire names its hold");
    assert_eq!(h.status, HoldStatus::Expired);
    assert_eq!(h.captured, 0);
    assert_eq!(account.view().open_holds, 0);
    assert!(account.due_holds(u64::MAX).is_empty());
    // An expired hold does not expire again.
    assert_eq!(account.decide_expire(&hold_id, u64::MAX), None);
}

#[test]
fn expire_ignores_unknown_and_ended_holds() {
    // Goal: decide_expire is None for an unknown hold and for holds already captured or released.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let captured = place_hold(&mut account, 10);
    let released = place_hold(&mut account, 10);
    exec(&mut account, None, capture(captured, Some(3)));
    exec(&mut account, None, release(released));
    assert_eq!(account.decide_expire(&hold_uuid(12345), u64::MAX), None);
    assert_eq!(account.decide_expire(&captured, u64::MAX), None);
    assert_eq!(account.decide_expire(&released, u64::MAX), None);
    assert!(account.due_holds(u64::MAX).is_empty());
}

#[test]
fn due_holds_lists_open_holds_by_deadline() {
    // Goal: due_holds returns exactly the open holds due at now, earliest deadline first.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let late = exec_at(&mut account, None, hold(1, Some(30)), T0, hold_uuid(1));
    let early = exec_at(&mut account, None, hold(1, Some(10)), T0, hold_uuid(2));
    let later = exec_at(&mut account, None, hold(1, Some(90)), T0, hold_uuid(3));
    let late = late.hold.as_ref().expect("hold").id;
    let early = early.hold.as_ref().expect("hold").id;
    let later = later.hold.as_ref().expect("hold").id;
    assert_eq!(account.due_holds(T0 + 30_000), vec![early, late]);
    exec(&mut account, None, release(early));
    assert_eq!(account.due_holds(T0 + 30_000), vec![late]);
    assert_eq!(account.due_holds(T0 + 90_000), vec![late, later]);
}

// ----- validation -----

#[test]
fn out_of_range_amounts_are_validation_for_every_operation() {
    // Goal: amount 0, negative or above 2^53-1 is validation_failed for credit, debit, hold and capture.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 50);
    let before = observe(&account, &["v"]);
    for amount in [
        0,
        -1,
        -100,
        i128::from(AMOUNT_MAX) + 1,
        i128::from(u64::MAX),
        i128::MAX,
        i128::MIN,
    ] {
        assert_validation(refuse(&account, Some("v"), &credit(amount)));
        assert_validation(refuse(&account, Some("v"), &debit(amount)));
        assert_validation(refuse(&account, Some("v"), &hold(amount, None)));
        assert_validation(refuse(&account, Some("v"), &capture(hold_id, Some(amount))));
    }
    assert_eq!(observe(&account, &["v"]), before);
}

#[test]
fn metadata_out_of_limits_is_validation_for_every_operation() {
    // Goal: metadata with 17 keys, an empty or 41-char key, or a 501-char value is validation_failed everywhere.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 50);
    let before = observe(&account, &[]);
    for metadata in bad_metadata() {
        let requests = [
            Request::Credit {
                amount: 1,
                metadata: metadata.clone(),
            },
            Request::Debit {
                amount: 1,
                metadata: metadata.clone(),
            },
            Request::Hold {
                amount: 1,
                expires_in_secs: None,
                metadata: metadata.clone(),
            },
            Request::Capture {
                hold_id,
                amount: None,
                metadata: metadata.clone(),
            },
            Request::Release {
                hold_id,
                metadata: metadata.clone(),
            },
        ];
        for request in &requests {
            assert_validation(refuse(&account, None, request));
        }
    }
    assert_eq!(observe(&account, &[]), before);
}

#[test]
fn metadata_at_the_limits_is_accepted_and_stored() {
    // Goal: metadata exactly at the limits (16 keys, 40-char key, 500-char value) is stored as given.
    let mut account = open(0);
    for metadata in edge_metadata() {
        let receipt = exec(
            &mut account,
            None,
            Request::Credit {
                amount: 1,
                metadata: metadata.clone(),
            },
        );
        assert_eq!(receipt.transaction.metadata.to_map(), metadata);
        let hold_id = exec(
            &mut account,
            None,
            Request::Hold {
                amount: 1,
                expires_in_secs: None,
                metadata: metadata.clone(),
            },
        )
        .hold
        .as_ref()
        .expect("hold")
        .id;
        assert_eq!(
            account.hold(&hold_id).map(|h| h.metadata.to_map()),
            Some(metadata.clone())
        );
        let receipt = exec(
            &mut account,
            None,
            Request::Release {
                hold_id,
                metadata: metadata.clone(),
            },
        );
        assert_eq!(receipt.transaction.metadata.to_map(), metadata);
    }
    assert_eq!(account.balance(), 3);
}

// ----- idempotency -----

#[test]
fn replay_of_each_operation_returns_the_stored_receipt_and_applies_nothing() {
    // Goal: the same key with the same request is a Replay carrying the original receipt, for every operation.
    let mut account = open(0);
    let credit_req = credit(100);
    let credit_receipt = exec(&mut account, Some("k-credit"), credit_req.clone());
    let debit_req = debit(10);
    let debit_receipt = exec(&mut account, Some("k-debit"), debit_req.clone());
    let hold_req = hold(20, Some(60));
    let hold_receipt = exec(&mut account, Some("k-hold"), hold_req.clone());
    let first = hold_receipt.hold.as_ref().expect("hold").id;
    let second = place_hold(&mut account, 15);
    let capture_req = capture(first, Some(5));
    let capture_receipt = exec(&mut account, Some("k-capture"), capture_req.clone());
    let release_req = release(second);
    let release_receipt = exec(&mut account, Some("k-release"), release_req.clone());

    let keys = ["k-credit", "k-debit", "k-hold", "k-capture", "k-release"];
    let before = observe(&account, &keys);
    let cases = [
        ("k-credit", &credit_req, &credit_receipt, 2),
        ("k-debit", &debit_req, &debit_receipt, 3),
        ("k-hold", &hold_req, &hold_receipt, 4),
        ("k-capture", &capture_req, &capture_receipt, 6),
        ("k-release", &release_req, &release_receipt, 7),
    ];
    for (k, request, receipt, lsn) in cases {
        let entry = replay(&account, k, request);
        assert_eq!(*entry.receipt, **receipt, "replay of {k}");
        assert_eq!(entry.request, *request);
        assert_eq!(entry.lsn, lsn);
        assert_eq!(entry.created_at_ms, T0);
    }
    assert_eq!(observe(&account, &keys), before);
}

#[test]
fn replay_wins_over_the_current_state() {
    // Goal: a replay answers the original outcome even when the request would now be refused.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let debit_receipt = exec(&mut account, Some("d"), debit(100));
    // Now the funds are gone, yet the retry replays instead of insufficient_funds.
    assert_eq!(*replay(&account, "d", &debit(100)).receipt, *debit_receipt);
    // A captured hold replays its capture instead of hold_not_open.
    exec(&mut account, None, credit(50));
    let hold_id = place_hold(&mut account, 50);
    let capture_receipt = exec(&mut account, Some("c"), capture(hold_id, None));
    assert_eq!(
        *replay(&account, "c", &capture(hold_id, None)).receipt,
        *capture_receipt
    );
    assert_eq!(
        refuse(&account, Some("other"), &capture(hold_id, None)),
        OpError::HoldNotOpen(HoldStatus::Captured)
    );
}

#[test]
fn a_key_used_for_a_different_request_is_reused() {
    // Goal: the same key with another kind, amount, metadata or hold is idempotency_key_reused.
    let mut account = open(0);
    exec(&mut account, Some("k"), credit(100));
    let hold_id = place_hold(&mut account, 10);
    let before = observe(&account, &["k"]);
    let others = [
        credit(101),
        debit(100),
        hold(100, None),
        Request::Credit {
            amount: 100,
            metadata: meta(&[("a", "b")]),
        },
        capture(hold_id, None),
        release(hold_id),
    ];
    for request in &others {
        assert_eq!(
            refuse(&account, Some("k"), request),
            OpError::IdempotencyKeyReused,
            "{request:?}"
        );
    }
    assert_eq!(observe(&account, &["k"]), before);
}

#[test]
fn absent_and_explicit_optional_fields_are_different_requests() {
    // Goal: expires_in_secs absent vs 3600, and capture amount absent vs the full amount, are different requests.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let default_hold = exec(&mut account, Some("h-default"), hold(10, None));
    let default_hold_id = default_hold.hold.as_ref().expect("hold").id;
    exec(&mut account, Some("h-explicit"), hold(10, Some(3600)));
    assert_eq!(
        refuse(&account, Some("h-default"), &hold(10, Some(3600))),
        OpError::IdempotencyKeyReused
    );
    assert_eq!(
        refuse(&account, Some("h-explicit"), &hold(10, None)),
        OpError::IdempotencyKeyReused
    );
    assert_eq!(
        *replay(&account, "h-default", &hold(10, None)).receipt,
        *default_hold
    );

    exec(
        &mut account,
        Some("cap-full"),
        capture(default_hold_id, None),
    );
    assert_eq!(
        refuse(
            &account,
            Some("cap-full"),
            &capture(default_hold_id, Some(10))
        ),
        OpError::IdempotencyKeyReused
    );
    let third = place_hold(&mut account, 10);
    exec(&mut account, Some("cap-given"), capture(third, Some(10)));
    assert_eq!(
        refuse(&account, Some("cap-given"), &capture(third, None)),
        OpError::IdempotencyKeyReused
    );
    replay(&account, "cap-given", &capture(third, Some(10)));
}

#[test]
fn a_refused_request_leaves_its_key_free() {
    // Goal: a refusal is not remembered, so a retry with the same key is evaluated afresh.
    let mut account = open(0);
    assert!(matches!(
        refuse(&account, Some("k"), &debit(50)),
        OpError::InsufficientFunds { .. }
    ));
    assert!(account.idempotency_entry(&key("k")).is_none());
    exec(&mut account, None, credit(50));
    let receipt = exec(&mut account, Some("k"), debit(50));
    assert_eq!(receipt.transaction.kind, TxKind::Debit);
    assert_eq!(account.balance(), 0);
    // And a refused request with a different body under that key, before, did not bind it either.
    let mut other = open(0);
    assert_validation(refuse(&other, Some("k2"), &credit(0)));
    exec(&mut other, Some("k2"), credit(5));
    assert_eq!(other.balance(), 5);
}

#[test]
fn expire_events_leave_no_idempotency_entry() {
    // Goal: an expiry is not a client request and is remembered under no key.
    let mut account = open(0);
    exec(&mut account, Some("c"), credit(10));
    let hold_id = place_hold(&mut account, 10);
    let body = account.decide_expire(&hold_id, u64::MAX).expect("due");
    let event = next_event(&account, None, body, T0 + 1);
    account
        .apply(&event, Retention::UNLIMITED)
        .expect("expire applies");
    assert!(account.idempotency_entry(&key("c")).is_some());
    assert_eq!(account.history().len(), 3);
}

// ----- which error wins -----

#[test]
fn reused_beats_validation() {
    // Goal: a known key with a different, invalid request is idempotency_key_reused, not validation_failed.
    let mut account = open(0);
    exec(&mut account, Some("k"), credit(10));
    assert_eq!(
        refuse(&account, Some("k"), &credit(0)),
        OpError::IdempotencyKeyReused
    );
    assert_eq!(
        refuse(
            &account,
            Some("k"),
            &Request::Credit {
                amount: 10,
                metadata: too_many_keys()
            }
        ),
        OpError::IdempotencyKeyReused
    );
    assert_eq!(
        refuse(&account, Some("k"), &hold(10, Some(0))),
        OpError::IdempotencyKeyReused
    );
}

#[test]
fn validation_beats_hold_not_found() {
    // Goal: an invalid capture amount or metadata on an unknown hold is validation_failed.
    let account = open(0);
    let unknown = hold_uuid(4242);
    assert_validation(refuse(&account, None, &capture(unknown, Some(0))));
    assert_validation(refuse(
        &account,
        None,
        &capture(unknown, Some(i128::from(AMOUNT_MAX) + 1)),
    ));
    assert_validation(refuse(
        &account,
        None,
        &Request::Release {
            hold_id: unknown,
            metadata: too_many_keys(),
        },
    ));
    assert_validation(refuse(
        &account,
        None,
        &Request::Capture {
            hold_id: unknown,
            amount: None,
            metadata: too_many_keys(),
        },
    ));
}

#[test]
fn validation_beats_hold_not_open() {
    // Goal: an invalid amount on a hold that has ended is validation_failed, not hold_not_open.
    let mut account = open(0);
    exec(&mut account, None, credit(10));
    let hold_id = place_hold(&mut account, 10);
    exec(&mut account, None, release(hold_id));
    assert_validation(refuse(&account, None, &capture(hold_id, Some(-3))));
}

#[test]
fn hold_not_found_beats_amount_checks() {
    // Goal: an unknown hold is hold_not_found even when the amount is larger than any hold or than the funds.
    let mut account = open(0);
    exec(&mut account, None, credit(10));
    place_hold(&mut account, 5);
    let unknown = hold_uuid(4242);
    assert_eq!(
        refuse(
            &account,
            None,
            &capture(unknown, Some(i128::from(AMOUNT_MAX)))
        ),
        OpError::HoldNotFound(unknown)
    );
}

#[test]
fn hold_not_open_beats_amount_exceeds_hold() {
    // Goal: an over-large capture of an ended hold is hold_not_open, not amount_exceeds_hold.
    let mut account = open(0);
    exec(&mut account, None, credit(10));
    let hold_id = place_hold(&mut account, 5);
    exec(&mut account, None, capture(hold_id, Some(2)));
    assert_eq!(
        refuse(&account, None, &capture(hold_id, Some(6))),
        OpError::HoldNotOpen(HoldStatus::Captured)
    );
}

#[test]
fn validation_beats_funds_and_balance_limit() {
    // Goal: invalid metadata or lifetime is validation_failed even when the money check would also fail.
    let mut account = open(0);
    exec(&mut account, None, credit(i128::from(AMOUNT_MAX)));
    assert_validation(refuse(
        &account,
        None,
        &Request::Credit {
            amount: 1,
            metadata: too_many_keys(),
        },
    ));
    let empty = open(0);
    assert_validation(refuse(
        &empty,
        None,
        &Request::Debit {
            amount: 1,
            metadata: too_many_keys(),
        },
    ));
    assert_validation(refuse(&empty, None, &hold(1, Some(0))));
    assert_validation(refuse(
        &empty,
        None,
        &Request::Hold {
            amount: 1,
            expires_in_secs: None,
            metadata: too_many_keys(),
        },
    ));
}

// ----- seq -----

#[test]
fn seq_moves_by_one_per_event_of_every_kind() {
    // Goal: credit, debit, hold, capture, release and expire each add exactly 1 to seq and one history entry.
    let mut account = open(10);
    let mut expected = 0;
    let mut step = |account: &mut Account, receipt: Arc<Receipt>| {
        expected += 1;
        assert_eq!(account.seq(), expected);
        assert_eq!(receipt.transaction.seq, expected);
        assert_eq!(receipt.account.seq, expected);
        assert_eq!(account.history().len() as u64, expected);
    };
    let r = exec(&mut account, None, credit(100));
    step(&mut account, r);
    let r = exec(&mut account, None, debit(5));
    step(&mut account, r);
    let r = exec(&mut account, None, hold(10, Some(5)));
    let h1 = r.hold.as_ref().expect("hold").id;
    step(&mut account, r);
    let r = exec(&mut account, None, hold(10, None));
    let h2 = r.hold.as_ref().expect("hold").id;
    step(&mut account, r);
    let r = exec(&mut account, None, hold(10, None));
    let h3 = r.hold.as_ref().expect("hold").id;
    step(&mut account, r);
    let r = exec(&mut account, None, capture(h2, Some(4)));
    step(&mut account, r);
    let r = exec(&mut account, None, release(h3));
    step(&mut account, r);
    let body = account.decide_expire(&h1, T0 + 5000).expect("due");
    let event = next_event(&account, None, body, T0 + 5000);
    let r = account
        .apply(&event, Retention::UNLIMITED)
        .expect("expire applies");
    step(&mut account, r);
    let seqs: Vec<u64> = account.history().iter().map(|t| t.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
    assert_eq!(account.balance(), 100 - 5 - 4);
    assert_eq!(account.held(), 0);
}

// ----- apply refusing events -----

/// An account with money and one open hold, and that hold's id.
fn busy_account() -> (Account, Uuid) {
    let mut account = open(0);
    exec(&mut account, Some("k1"), credit(100));
    let hold_id = place_hold(&mut account, 40);
    (account, hold_id)
}

/// Asserts that `apply` (and `check`) refuse `event` and that the account is unchanged.
fn assert_refused(account: &mut Account, event: &Event) {
    let before = observe(account, &["k1", "k9"]);
    assert!(
        account.apply(event, Retention::UNLIMITED).is_err(),
        "apply accepted {event:?}"
    );
    assert_eq!(observe(account, &["k1", "k9"]), before, "{event:?}");
}

fn credit_body(amount: u64) -> EventBody {
    EventBody::Credit {
        amount: Amount::new(i128::from(amount)).expect("valid amount"),
        metadata: Metadata::empty(),
    }
}

#[test]
fn apply_refuses_a_seq_that_does_not_follow() {
    // Goal: an event whose seq is not seq + 1 (repeat, gap or zero) is refused and changes nothing.
    let (mut account, _) = busy_account();
    for seq in [0, account.seq(), account.seq() + 2, u64::MAX] {
        let mut event = next_event(&account, None, credit_body(1), T0);
        event.seq = seq;
        assert!(account.check(&event).is_err());
        assert_refused(&mut account, &event);
    }
    let good = next_event(&account, None, credit_body(1), T0);
    account
        .apply(&good, Retention::UNLIMITED)
        .expect("the right seq still applies");
    assert_eq!(account.balance(), 101);
}

#[test]
fn apply_refuses_an_event_of_another_account() {
    // Goal: an event naming another account is refused and changes nothing.
    let (mut account, _) = busy_account();
    let mut event = next_event(&account, None, credit_body(1), T0);
    event.account = AccountId::parse("player-7").expect("valid id");
    assert!(account.check(&event).is_err());
    assert_refused(&mut account, &event);
}

#[test]
fn apply_refuses_an_lsn_that_does_not_increase() {
    // Goal: an event whose lsn is not above the last applied lsn is refused; a gap in lsn is fine.
    let (mut account, _) = busy_account();
    let last = account.last_lsn();
    for lsn in [0, 1, last] {
        let mut event = next_event(&account, None, credit_body(1), T0);
        event.lsn = lsn;
        assert_refused(&mut account, &event);
    }
    let mut later = next_event(&account, None, credit_body(1), T0);
    later.lsn = last + 10;
    account
        .apply(&later, Retention::UNLIMITED)
        .expect("a larger lsn applies");
    assert_eq!(account.last_lsn(), last + 10);
}

#[test]
fn apply_refuses_events_naming_an_unknown_hold() {
    // Goal: capture, release and expire events of a hold the account lacks are refused.
    let (mut account, _) = busy_account();
    let unknown = hold_uuid(31337);
    let bodies = [
        EventBody::Capture {
            hold_id: unknown,
            amount: Amount::new(1).expect("valid"),
            amount_given: true,
            metadata: Metadata::empty(),
        },
        EventBody::Release {
            hold_id: unknown,
            metadata: Metadata::empty(),
        },
        EventBody::Expire { hold_id: unknown },
    ];
    for body in bodies {
        let event = next_event(&account, None, body, T0);
        assert!(account.check(&event).is_err());
        assert_refused(&mut account, &event);
    }
}

#[test]
fn apply_refuses_ending_a_hold_twice() {
    // Goal: after a hold ended, capture, release and expire events for it are refused (a hold ends once).
    let (mut account, hold_id) = busy_account();
    let release_event = next_event(
        &account,
        None,
        EventBody::Release {
            hold_id,
            metadata: Metadata::empty(),
        },
        T0,
    );
    account
        .apply(&release_event, Retention::UNLIMITED)
        .expect("first end applies");
    let bodies = [
        EventBody::Capture {
            hold_id,
            amount: Amount::new(1).expect("valid"),
            amount_given: true,
            metadata: Metadata::empty(),
        },
        EventBody::Release {
            hold_id,
            metadata: Metadata::empty(),
        },
        EventBody::Expire { hold_id },
    ];
    for body in bodies {
        let event = next_event(&account, None, body, T0);
        assert_refused(&mut account, &event);
    }
    assert_eq!(
        account.hold(&hold_id).map(|h| h.status),
        Some(HoldStatus::Released)
    );
}

#[test]
fn apply_refuses_a_key_applied_twice() {
    // Goal: a second event carrying an idempotency key already remembered is refused.
    let (mut account, _) = busy_account();
    let event = next_event(&account, Some("k1"), credit_body(5), T0);
    assert!(account.check(&event).is_err());
    assert_refused(&mut account, &event);
    let fresh_key = next_event(&account, Some("k9"), credit_body(5), T0);
    account
        .apply(&fresh_key, Retention::UNLIMITED)
        .expect("a new key applies");
    assert!(account.idempotency_entry(&key("k9")).is_some());
}

#[test]
fn apply_refuses_events_that_break_the_rules() {
    // Goal: events the rules forbid (second open, keyed expire, reused hold id, overdraw, over-limit
    // credit, capture above the hold) are refused without changing anything.
    let (mut account, hold_id) = busy_account();
    let bodies_and_keys: Vec<(EventBody, Option<&str>)> = vec![
        (open_event(0).body, None),
        (EventBody::Expire { hold_id }, Some("k9")),
        (
            EventBody::Hold {
                hold_id,
                amount: Amount::new(1).expect("valid"),
                expires_at_ms: T0 + 1,
                expires_in_secs: None,
                metadata: Metadata::empty(),
            },
            None,
        ),
        (
            EventBody::Debit {
                amount: Amount::new(61).expect("valid"),
                metadata: Metadata::empty(),
            },
            None,
        ),
        (
            EventBody::Hold {
                hold_id: hold_uuid(999),
                amount: Amount::new(61).expect("valid"),
                expires_at_ms: T0 + 1,
                expires_in_secs: None,
                metadata: Metadata::empty(),
            },
            None,
        ),
        (credit_body(AMOUNT_MAX - 99), None),
        (
            EventBody::Capture {
                hold_id,
                amount: Amount::new(41).expect("valid"),
                amount_given: true,
                metadata: Metadata::empty(),
            },
            None,
        ),
    ];
    for (body, k) in bodies_and_keys {
        let event = next_event(&account, k, body, T0);
        assert!(account.check(&event).is_err(), "check accepted {event:?}");
        assert_refused(&mut account, &event);
    }
    // The limits themselves are accepted.
    let at_limit = next_event(&account, None, credit_body(AMOUNT_MAX - 100), T0);
    assert!(account.check(&at_limit).is_ok());
}

#[test]
fn check_is_pure_and_agrees_with_apply() {
    // Goal: check never changes the account, and apply accepts what check accepts.
    let (mut account, hold_id) = busy_account();
    let event = next_event(
        &account,
        Some("k9"),
        EventBody::Capture {
            hold_id,
            amount: Amount::new(40).expect("valid"),
            amount_given: false,
            metadata: Metadata::empty(),
        },
        T0,
    );
    let before = observe(&account, &["k1", "k9"]);
    account.check(&event).expect("a valid capture");
    account
        .check(&event)
        .expect("still valid: check changed nothing");
    assert_eq!(observe(&account, &["k1", "k9"]), before);
    let receipt = account
        .apply(&event, Retention::UNLIMITED)
        .expect("apply agrees with check");
    assert_eq!(receipt.transaction.amount, 40);
    let entry = account.idempotency_entry(&key("k9")).expect("remembered");
    // amount_given = false means the request named no amount.
    assert_eq!(entry.request, capture(hold_id, None));
}

#[test]
fn apply_refuses_a_capture_without_amount_that_takes_less_than_the_hold() {
    // Goal: an event claiming a whole-hold capture (no amount given) but taking less is
    // refused, so a damaged log cannot store a partial receipt under a full-capture request.
    let mut account = open(0);
    exec(&mut account, None, credit(100));
    let hold_id = place_hold(&mut account, 40);
    let before = account.view();
    let event = Event {
        lsn: account.last_lsn() + 1,
        account: account.id().clone(),
        seq: account.seq() + 1,
        at_ms: 10,
        tx_id: Uuid::from_u128(999),
        idempotency_key: None,
        body: EventBody::Capture {
            hold_id,
            amount: Amount::new(10).expect("amount"),
            amount_given: false,
            metadata: Metadata::empty(),
        },
        outcome: None,
    };
    assert!(account.apply(&event, Retention::UNLIMITED).is_err());
    assert_eq!(account.view(), before);
}

// ---------------------------------------------------------------------------------------
// Retention: bounded history, keys and ended holds
// ---------------------------------------------------------------------------------------

const HOUR_MS: u64 = 60 * 60 * 1000;

#[test]
fn history_keeps_the_newest_transactions_up_to_the_limit() {
    // Goal: memory per account is bounded by the limit, the kept window ends at seq, and
    // invariant 4 still holds over what is dropped.
    let mut account = open(0);
    let retention = Retention {
        history: 10,
        ttl_ms: u64::MAX,
    };
    for i in 0..100 {
        exec_kept(
            &mut account,
            retention,
            None,
            credit(i + 1),
            T0,
            hold_uuid(i as u128 + 1),
        );
        let history = account.history();
        assert!(history.len() <= 10);
        assert_eq!(
            history.iter().next_back().map(|t| t.seq),
            Some(account.seq())
        );
        for (older, newer) in history.iter().zip(history.iter().skip(1)) {
            assert_eq!(newer.seq, older.seq + 1);
        }
    }
    let seqs: Vec<u64> = account.history().iter().map(|t| t.seq).collect();
    assert_eq!(seqs, (91..=100).collect::<Vec<u64>>());
    assert_eq!(account.balance(), (1..=100).sum::<i64>());
}

#[test]
fn keys_are_remembered_for_the_ttl_and_forgotten_at_the_first_change_after_it() {
    let mut account = open(0);
    let retention = Retention {
        history: 1000,
        ttl_ms: 24 * HOUR_MS,
    };
    exec_kept(
        &mut account,
        retention,
        Some("k1"),
        credit(50),
        T0,
        hold_uuid(1),
    );
    // Still there just before the TTL, even after another change.
    exec_kept(
        &mut account,
        retention,
        None,
        credit(1),
        T0 + 24 * HOUR_MS - 1,
        hold_uuid(2),
    );
    assert!(account.idempotency_entry(&key("k1")).is_some());
    let _ = replay(&account, "k1", &credit(50));
    // The first change at or after the TTL forgets it; the same key is then a new request.
    exec_kept(
        &mut account,
        retention,
        None,
        credit(1),
        T0 + 24 * HOUR_MS,
        hold_uuid(3),
    );
    assert!(account.idempotency_entry(&key("k1")).is_none());
    let again = exec_kept(
        &mut account,
        retention,
        Some("k1"),
        credit(50),
        T0 + 25 * HOUR_MS,
        hold_uuid(4),
    );
    assert_eq!(again.account.balance, 102);
}

#[test]
fn ended_holds_are_forgotten_after_the_ttl_open_ones_never() {
    let mut account = open(0);
    let retention = Retention {
        history: 1000,
        ttl_ms: HOUR_MS,
    };
    exec_kept(&mut account, retention, None, credit(100), T0, hold_uuid(1));
    let ended = exec_kept(
        &mut account,
        retention,
        None,
        hold(10, Some(86_400)),
        T0,
        hold_uuid(2),
    );
    let ended = ended.hold.as_ref().expect("hold").id;
    let open_hold = exec_kept(
        &mut account,
        retention,
        None,
        hold(20, Some(86_400)),
        T0,
        hold_uuid(3),
    );
    let open_hold = open_hold.hold.as_ref().expect("hold").id;
    exec_kept(
        &mut account,
        retention,
        None,
        release(ended),
        T0 + 1,
        hold_uuid(4),
    );
    assert_eq!(
        account.hold(&ended).map(|h| h.status),
        Some(HoldStatus::Released)
    );
    exec_kept(
        &mut account,
        retention,
        None,
        credit(1),
        T0 + 1 + HOUR_MS,
        hold_uuid(5),
    );
    assert!(
        account.hold(&ended).is_none(),
        "ended an hour ago: forgotten"
    );
    assert_eq!(
        account.hold(&open_hold).map(|h| h.status),
        Some(HoldStatus::Open)
    );
    assert_eq!(account.held(), 20);
    // A late capture of the forgotten hold is refused as unknown, never applied.
    assert_eq!(
        refuse(&account, None, &capture(ended, None)),
        OpError::HoldNotFound(ended)
    );
}

#[test]
fn running_totals_past_i64_wrap_and_money_stays_conserved() {
    // Goal: the conservation totals are kept modulo 2^64; a long life of the largest
    // credits and debits passes i64's range without a panic or a false alarm, and the
    // account still round-trips through its parts.
    let mut account = open(0);
    let retention = Retention {
        history: 4,
        ttl_ms: u64::MAX,
    };
    let max = i128::from(AMOUNT_MAX);
    for i in 0..1100u64 {
        let id = hold_uuid(u128::from(i));
        exec_kept(&mut account, retention, None, credit(max), T0, id);
        exec_kept(&mut account, retention, None, debit(max), T0, id);
    }
    exec_kept(&mut account, retention, None, credit(5), T0, hold_uuid(1));
    // 1100 credits of 2^53-1 sum past 2^63.
    assert_eq!(account.balance(), 5);
    assert_eq!(account.external_net(), 5);
    let parts = account.parts();
    assert!(
        parts.total_in < 0,
        "the credit total wrapped: {}",
        parts.total_in
    );
    let back = Account::from_parts(parts).expect("the parts are consistent");
    assert_eq!(back.view(), account.view());
    assert_eq!(account.history().len(), 4);
}

#[test]
fn replay_with_the_same_retention_rebuilds_the_same_memory() {
    // Goal: pruning depends only on the events and the retention, so a replay forgets
    // exactly what the live account forgot.
    let retention = Retention {
        history: 4,
        ttl_ms: HOUR_MS,
    };
    let mut live = open(0);
    let mut events = Vec::new();
    for i in 0..30u64 {
        let at = T0 + i * HOUR_MS / 4;
        let k = format!("k{i}");
        let request = if i % 3 == 2 { debit(1) } else { credit(2) };
        let decision = live
            .decide(
                Some(&key(&k)),
                &request,
                Fresh {
                    now_ms: at,
                    hold_id: hold_uuid(u128::from(i)),
                },
            )
            .expect("accepted");
        let Decision::Apply(body) = decision else {
            panic!("expected an event");
        };
        let event = next_event(&live, Some(&k), body, at);
        live.apply(&event, retention).expect("apply");
        events.push(event);
    }
    let mut replayed = Account::open(&open_event(0)).expect("open");
    for event in &events {
        replayed.apply(event, retention).expect("replay");
    }
    assert_eq!(replayed.view(), live.view());
    assert_eq!(replayed.history(), live.history());
    for i in 0..30 {
        let k = key(&format!("k{i}"));
        assert_eq!(
            replayed.idempotency_entry(&k).map(|e| e.lsn),
            live.idempotency_entry(&k).map(|e| e.lsn),
            "key k{i}"
        );
    }
    // The last hour of keys is kept, older ones are gone.
    assert!(live.idempotency_entry(&key("k29")).is_some());
    assert!(live.idempotency_entry(&key("k0")).is_none());
}

// ---------------------------------------------------------------------------------------
// Transfers

fn other_id() -> AccountId {
    AccountId::parse("house").expect("a valid account id")
}

fn transfer_request(to: &AccountId, amount: i128) -> Request {
    Request::Transfer {
        to: to.clone(),
        amount,
        metadata: meta(&[("prize", "weekly")]),
    }
}

fn transfer_uuid(n: u128) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_b000_0000_0000_0000 + n)
}

/// Debits `account` by a transfer to "house" under key `k`; returns the event.
fn transfer_out(account: &mut Account, k: &str, amount: i128, id: Uuid) -> Event {
    let request = transfer_request(&other_id(), amount);
    let Ok(Decision::Apply(body)) = account.decide_transfer(Some(&key(k)), &request, id, &gem())
    else {
        panic!("the transfer is refused");
    };
    let event = next_event(account, Some(k), body, T0);
    account
        .apply(&event, Retention::UNLIMITED)
        .expect("apply the debit");
    event
}

/// "house", opened at lsn 100 with the given balance credited.
fn house(balance: i128) -> Account {
    let mut house = Account::open(&Event {
        lsn: 100,
        account: other_id(),
        seq: 0,
        at_ms: T0,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency: gem(),
            overdraft_limit: 0,
            metadata: Metadata::empty(),
        },
        outcome: None,
    })
    .expect("open house");
    if balance > 0 {
        exec(&mut house, None, credit(balance));
    }
    house
}

#[test]
fn a_transfer_checks_in_api_order_and_debits_once() {
    // Goal: validation, then the same-account rule, then currency, then funds; the debit
    // is one transfer_out transaction naming the transfer, and a retry is a replay.
    let mut a = open(0);
    exec(&mut a, None, credit(100));
    let usd = Currency::parse("USD").expect("currency");
    let decide = |a: &Account, request: &Request, currency: &Currency| {
        a.decide_transfer(Some(&key("t")), request, transfer_uuid(1), currency)
    };
    let huge = transfer_request(&other_id(), i128::from(AMOUNT_MAX) + 1);
    assert!(matches!(
        decide(&a, &huge, &usd),
        Err(OpError::Validation(_))
    ));
    let to_self = transfer_request(&account_id(), 5);
    assert!(matches!(
        decide(&a, &to_self, &gem()),
        Err(OpError::Validation(_))
    ));
    assert!(matches!(
        decide(&a, &transfer_request(&other_id(), 500), &usd),
        Err(OpError::CurrencyMismatch { .. })
    ));
    assert!(matches!(
        decide(&a, &transfer_request(&other_id(), 101), &gem()),
        Err(OpError::InsufficientFunds { .. })
    ));
    let event = transfer_out(&mut a, "t", 30, transfer_uuid(1));
    assert_eq!(a.balance(), 70);
    assert_eq!(a.seq(), 2);
    let tx = &a.history().get(1).expect("kept");
    assert_eq!(tx.kind, TxKind::TransferOut);
    assert_eq!(tx.transfer_id, Some(transfer_uuid(1)));
    assert_eq!(tx.amount, 30);
    assert_eq!(a.external_net(), 100, "a transfer is not external money");
    match decide(&a, &transfer_request(&other_id(), 30), &gem()) {
        Ok(Decision::Replay(entry)) => {
            assert_eq!(entry.lsn, event.lsn);
            assert_eq!(
                entry.receipt.transaction.transfer_id,
                Some(transfer_uuid(1))
            );
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(
        decide(&a, &transfer_request(&other_id(), 31), &gem()).err(),
        Some(OpError::IdempotencyKeyReused)
    );
    // `decide` alone cannot decide a transfer: it needs the destination's currency.
    assert!(matches!(
        refuse(&a, None, &transfer_request(&other_id(), 1)),
        OpError::Validation(_)
    ));
}

#[test]
fn transfer_events_keep_the_invariants_and_refuse_what_cannot_follow() {
    // Goal: check() refuses transfer events that would break a rule, without changing
    // anything; a destination at the limit refuses the credit, and the refund restores
    // the source.
    let mut a = open(0);
    exec(&mut a, None, credit(100));
    let id = transfer_uuid(2);
    transfer_out(&mut a, "t2", 60, id);
    let mut h = house(i128::from(AMOUNT_MAX) - 10);
    let amount = Amount::new(60).expect("amount");
    assert_eq!(
        h.decide_transfer_in(id, a.id(), &gem(), amount, &Metadata::empty()),
        Err(TransferFailure::BalanceLimitExceeded)
    );
    let usd = Currency::parse("USD").expect("currency");
    assert_eq!(
        h.decide_transfer_in(id, a.id(), &usd, amount, &Metadata::empty()),
        Err(TransferFailure::CurrencyMismatch)
    );
    // A forced credit over the limit is refused by check.
    let forced = next_event(
        &h,
        None,
        EventBody::TransferIn {
            transfer_id: id,
            from: account_id(),
            amount,
            metadata: Metadata::empty(),
        },
        T0,
    );
    assert!(h.apply(&forced, Retention::UNLIMITED).is_err());
    assert_eq!(h.seq(), 1, "nothing changed");
    // A transfer event with a key other than the debit, or from the account to itself.
    let keyed = Event {
        idempotency_key: Some(key("k")),
        ..forced.clone()
    };
    assert!(h.check(&keyed).is_err());
    let from_self = next_event(
        &h,
        None,
        EventBody::TransferIn {
            transfer_id: id,
            from: other_id(),
            amount: Amount::new(1).expect("amount"),
            metadata: Metadata::empty(),
        },
        T0,
    );
    assert!(h.check(&from_self).is_err());
    let unkeyed_out = next_event(
        &a,
        None,
        EventBody::TransferOut {
            transfer_id: transfer_uuid(3),
            to: other_id(),
            amount: Amount::new(1).expect("amount"),
            metadata: Metadata::empty(),
        },
        T0,
    );
    assert!(
        a.check(&unkeyed_out).is_err(),
        "a debit needs its request's key"
    );
    // The refund.
    let body = a
        .decide_transfer_refund(
            id,
            &other_id(),
            amount,
            TransferFailure::BalanceLimitExceeded,
        )
        .expect("the refund fits");
    let refund = next_event(&a, None, body, T0 + 1);
    a.apply(&refund, Retention::UNLIMITED)
        .expect("apply the refund");
    assert_eq!((a.balance(), a.seq()), (100, 3));
    let tx = &a.history().get(2).expect("kept");
    assert_eq!(tx.kind, TxKind::TransferIn);
    assert_eq!(tx.transfer_id, Some(id));
    let parts = a.parts();
    assert_eq!(parts.transfers_net, 0);
    assert_eq!(
        Account::from_parts(parts).expect("parts").balance(),
        100,
        "parts round-trip with the transfer totals"
    );
}

#[test]
fn the_transfer_book_records_each_event_once_and_refuses_repeats() {
    // Goal: the book is idempotent by LSN (replay over a fuzzy snapshot) and refuses an id
    // used twice, an end without a start, and a second end.
    let mut a = open(0);
    exec(&mut a, None, credit(100));
    let id = transfer_uuid(4);
    let out = transfer_out(&mut a, "t4", 25, id);
    let mut book = TransferBook::default();
    book.record(&out, Some(a.view())).expect("debit");
    book.record(&out, None)
        .expect("the same debit again is a no-op");
    assert_eq!(book.in_flight(), (1, 25));
    assert_eq!(book.pending(), vec![id]);
    let again = Event {
        lsn: out.lsn + 50,
        ..out.clone()
    };
    assert!(
        book.record(&again, Some(a.view())).is_err(),
        "id used twice"
    );

    let mut h = house(0);
    let body = h
        .decide_transfer_in(
            id,
            a.id(),
            &gem(),
            Amount::new(25).expect("amount"),
            &Metadata::empty(),
        )
        .expect("credit");
    let inn = next_event(&h, None, body, T0 + 2);
    h.apply(&inn, Retention::UNLIMITED)
        .expect("apply the credit");
    let ended_before = Event {
        lsn: out.lsn,
        ..inn.clone()
    };
    assert!(book.record(&ended_before, Some(h.view())).is_err());
    assert_eq!(book.check_new(&inn), Ok(()), "the credit may be written");
    assert!(
        book.check_new(&out).is_err(),
        "a second debit with the id may not"
    );
    book.record(&inn, Some(h.view())).expect("credit");
    book.record(&inn, None)
        .expect("the same credit again is a no-op");
    assert!(
        book.check_new(&inn).is_err(),
        "a second end may not be written"
    );
    let record = book.get(&id).expect("the transfer");
    assert_eq!(record.status, TransferStatus::Completed);
    assert_eq!(record.to_account.as_ref().map(|v| v.balance), Some(25));
    assert_eq!((record.out_lsn, record.end_lsn), (out.lsn, inn.lsn));
    assert_eq!(book.in_flight(), (0, 0));
    let twice = Event {
        lsn: inn.lsn + 1,
        ..inn.clone()
    };
    assert!(book.record(&twice, Some(h.view())).is_err(), "ended twice");
    let unknown = EventBody::TransferIn {
        transfer_id: transfer_uuid(99),
        from: account_id(),
        amount: Amount::new(1).expect("amount"),
        metadata: Metadata::empty(),
    };
    let unknown = Event {
        body: unknown,
        ..twice
    };
    assert!(
        book.record(&unknown, Some(h.view())).is_err(),
        "never started"
    );

    // Records round-trip through from_records; a pending one is never pruned.
    let records: Vec<TransferRecord> = book.records().map(|r| (**r).clone()).collect();
    let mut copy = TransferBook::from_records(records).expect("valid records");
    assert_eq!(
        copy.get(&id).map(|r| r.status),
        Some(TransferStatus::Completed)
    );
    assert_eq!(copy.prune(|_| true), 1);
    assert!(copy.is_empty());
}

#[test]
fn the_kept_history_reads_back_every_field_and_a_snapshot_cannot_bend_it() {
    // Goal: history is kept compact (no account id, no seq, no available, one link), and
    // reading it back gives exactly the transactions the receipts gave; parts whose
    // transactions do not fit that form (a link the kind does not have, an available
    // that is not balance - held) are refused, not silently changed.
    let retention = Retention {
        history: 3,
        ttl_ms: u64::MAX,
    };
    let mut account = open(0);
    let receipts = [
        exec_kept(&mut account, retention, None, credit(50), T0, hold_uuid(1)),
        exec_kept(
            &mut account,
            retention,
            None,
            hold(20, None),
            T0,
            hold_uuid(2),
        ),
        exec_kept(
            &mut account,
            retention,
            None,
            capture(hold_uuid(2), Some(5)),
            T0,
            hold_uuid(3),
        ),
        exec_kept(&mut account, retention, None, debit(7), T0, hold_uuid(4)),
    ];
    let given: Vec<Transaction> = receipts.iter().map(|r| r.transaction.clone()).collect();
    let history = account.history();
    // The oldest was forgotten (limit 3); the rest read back field for field.
    assert_eq!(history.to_vec(), given[1..].to_vec());
    assert_eq!(history.first_seq(), Some(2));
    assert_eq!(history.get(0).map(|t| t.hold_id), Some(Some(hold_uuid(2))));
    assert_eq!(history.get(3), None);
    assert_eq!(
        history.range(1..9).map(|t| t.seq).collect::<Vec<_>>(),
        vec![3, 4],
        "a range past the end is clamped"
    );
    let (from, to) = (2, 1);
    assert_eq!(
        history.range(from..to).count(),
        0,
        "a backward range is empty"
    );
    let back = Account::from_parts(account.parts()).expect("consistent parts");
    assert_eq!(back.history(), account.history());

    let bent = |bend: fn(&mut Transaction)| {
        let mut parts = account.parts();
        bend(&mut parts.history[1]);
        Account::from_parts(parts).map(|_| ())
    };
    // The capture names its hold; a transfer id beside it, or no hold, is refused.
    assert!(bent(|t| t.transfer_id = Some(hold_uuid(9))).is_err());
    assert!(bent(|t| t.hold_id = None).is_err());
    assert!(bent(|t| t.available += 1).is_err());
    // The debit names nothing.
    let mut parts = account.parts();
    parts.history[2].hold_id = Some(hold_uuid(9));
    assert!(Account::from_parts(parts).is_err());
}
