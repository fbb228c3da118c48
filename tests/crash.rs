//! Crash tests of the real `coffer` binary: concurrent clients move money while the process is
//! killed with SIGKILL at a random moment, again and again on the same data directory; after
//! every restart the recovered state must be exactly what the acknowledged operations imply
//! (plus, for each request that got no answer, what the idempotency-key lookup says happened).
//! A second test checks that SIGTERM shuts down gracefully with exit status 0 and loses
//! nothing.
//!
//! The mix includes transfers (`POST /v1/transfers`): between random pairs of the accounts,
//! many to one hot account, and some to a "whale" account kept near the balance limit, which
//! refuses them, so those end `failed` with the source refunded. A transfer is two log events
//! (transfer_out, transfer_in), so a kill can land between them; recovery must finish it
//! before `/readyz` is 200. After every restart each applied transfer is looked up with
//! `GET /v1/transfers/{id}`, both accounts' histories must name it exactly once per side,
//! money is conserved (the sum of all balances is what the credits, debits and captures
//! imply) and `coffer_transfers_in_flight` is 0.
//!
//! The seed of the random choices is printed; set `COFFER_CRASH_SEED` to replay a run's
//! choices (the kill moment still depends on timing).
//!
//! After every kill, `coffer wal verify` counts the transfers the killed server left half done
//! (transfer_out without its end); the restarted server must log that it finished exactly
//! those, and each must belong to a request that got no answer and is found applied.
//!
//! `soak` (ignored; `scripts/crash-soak.sh` runs it) is the same kill cycle, many times:
//! `COFFER_SOAK_CYCLES` (default 50) cycles of the binary `COFFER_BIN` (default the one cargo
//! built for this test), writing its summary as JSON to `COFFER_SOAK_SUMMARY` when set.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{coffer_bin as default_bin, http_client, ServerProcess};
use serde_json::{json, Value};

/// Number of SIGKILL/restart cycles in the crash test.
const KILL_CYCLES: usize = 8;
/// WAL segment size in the crash test: small, so kills also land around segment rotation.
const CRASH_SEGMENT_BYTES: u64 = 256 * 1024;
/// Concurrent clients driving the mixed load.
const CLIENTS: usize = 8;
/// Concurrent clients that only transfer small amounts to the hot account, so that many
/// transfers are in flight (some between their two halves) when the server is killed.
const HOT_CLIENTS: usize = 8;
/// Bounds of the amount of a hot client's transfer.
const HOT_TRANSFER_MAX: u64 = 50;
/// Accounts the load is spread over (credits, debits, holds, transfers between them).
const ACCOUNTS: usize = 6;
/// The account many clients transfer to at once.
const HOT: usize = 0;
/// An account beyond the load's, credited once up to near the balance limit: every transfer
/// to it is refused by the destination after the source was debited, so the source is
/// refunded and the transfer ends `failed`.
const WHALE: usize = ACCOUNTS;
/// 2^53 - 1, the largest amount and balance.
const AMOUNT_MAX: u64 = 9_007_199_254_740_991;
/// The whale's balance: any transfer of more than `AMOUNT_MAX - WHALE_BALANCE` to it fails.
const WHALE_BALANCE: u64 = AMOUNT_MAX - 100;
/// Bounds of the amount of a transfer to the whale (all above its room).
const WHALE_TRANSFER_MIN: u64 = 101;
const WHALE_TRANSFER_MAX: u64 = 400;
/// Bounds of the random time the load runs before the kill.
const KILL_AFTER_MS_MIN: u64 = 100;
const KILL_AFTER_MS_MAX: u64 = 600;
/// Upper bound of requests one client sends in one cycle.
const OPS_PER_CLIENT_MAX: usize = 20_000;
/// Upper bound of the time one client drives load in one cycle.
const LOAD_DEADLINE: Duration = Duration::from_secs(15);
/// How long a graceful shutdown may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Kill cycles of the soak when `COFFER_SOAK_CYCLES` is not set, and the most it accepts.
const SOAK_CYCLES_DEFAULT: usize = 50;
const SOAK_CYCLES_MAX: usize = 100_000;
/// Time bound of the whole soak: a fixed part plus a part per cycle (a cycle normally takes
/// a few seconds; one that hangs is cut by this bound, and the summary says so).
const SOAK_DEADLINE_BASE: Duration = Duration::from_secs(120);
const SOAK_DEADLINE_PER_CYCLE: Duration = Duration::from_secs(60);
/// How many failure messages the soak summary keeps.
const SOAK_FAILURES_KEPT: usize = 10;

// ---------------------------------------------------------------------------------------
// Randomness: a small seeded generator (SplitMix64), so a failing run's choices can be replayed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn index(&mut self, len: usize) -> usize {
        (self.next() % len as u64) as usize
    }
}

fn seed() -> u64 {
    if let Ok(text) = std::env::var("COFFER_CRASH_SEED") {
        if let Ok(seed) = text.trim().parse() {
            return seed;
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

// ---------------------------------------------------------------------------------------
// The server process.

/// Starts `bin serve` on `data_dir` as [`common::process::start_server`] does, with every
/// transaction kept listable (so each one can be checked after a restart) and frequent
/// snapshots (so kills also land while one is written), then `extra_args`.
async fn start_server(
    bin: &Path,
    data_dir: &Path,
    logs: &Path,
    extra_args: &[&str],
) -> ServerProcess {
    let mut args = vec![
        "--history-limit",
        "100000000",
        "--snapshot-every-records",
        "300",
    ];
    args.extend_from_slice(extra_args);
    common::process::start_server(bin, data_dir, logs, &args).await
}

// ---------------------------------------------------------------------------------------
// Operations, their outcomes, and the model of what they imply.

fn account_name(index: usize) -> String {
    if index == WHALE {
        "crash-whale".to_string()
    } else {
        format!("crash-acct-{index}")
    }
}

/// A hold the model knows about.
#[derive(Clone, Debug)]
struct HoldRef {
    id: String,
    account: usize,
    amount: u64,
}

#[derive(Clone, Debug)]
enum Op {
    Credit(u64),
    Debit(u64),
    Hold(u64),
    /// `None` captures the whole hold.
    Capture(HoldRef, Option<u64>),
    Release(HoldRef),
    /// From the `Sent`'s account to `to`; `note` adds metadata to the request.
    Transfer {
        to: usize,
        amount: u64,
        note: bool,
    },
}

impl Op {
    fn account(&self, account: usize) -> usize {
        match self {
            Op::Capture(hold, _) | Op::Release(hold) => hold.account,
            _ => account,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Credit(_) => "credit",
            Op::Debit(_) => "debit",
            Op::Hold(_) => "hold",
            Op::Capture(..) => "capture",
            Op::Release(_) => "release",
            Op::Transfer { .. } => "transfer",
        }
    }

    /// Path and JSON body of the request.
    fn request(&self, account: usize) -> (String, Value) {
        let acct = account_name(account);
        match self {
            Op::Credit(a) => (format!("/v1/accounts/{acct}/credits"), json!({"amount": a})),
            Op::Debit(a) => (format!("/v1/accounts/{acct}/debits"), json!({"amount": a})),
            Op::Hold(a) => (format!("/v1/accounts/{acct}/holds"), json!({"amount": a})),
            Op::Capture(h, amount) => (
                format!("/v1/accounts/{acct}/holds/{}/capture", h.id),
                match amount {
                    Some(a) => json!({"amount": a}),
                    None => json!({}),
                },
            ),
            Op::Release(h) => (
                format!("/v1/accounts/{acct}/holds/{}/release", h.id),
                json!({}),
            ),
            Op::Transfer { to, amount, note } => {
                let mut body = json!({"from": acct, "to": account_name(*to), "amount": amount});
                if *note {
                    body["metadata"] = transfer_note();
                }
                ("/v1/transfers".to_string(), body)
            }
        }
    }

    fn success_status(&self) -> u16 {
        match self {
            Op::Credit(_) | Op::Debit(_) | Op::Hold(_) | Op::Transfer { .. } => 201,
            Op::Capture(..) | Op::Release(_) => 200,
        }
    }
}

/// The metadata of a transfer sent with `note`.
fn transfer_note() -> Value {
    json!({"purpose": "crash-test"})
}

/// Whether an answer is that of a transfer the destination refused after the source was
/// debited: it happened (the key is remembered with this answer) and ended `failed`.
fn is_failed_transfer(op: &Op, status: u16, body: &Value) -> bool {
    matches!(op, Op::Transfer { .. }) && status == 409 && body["code"] == "balance_limit_exceeded"
}

/// Whether an answer says the request left no trace (the only refusal this load provokes).
fn is_refusal_for_funds(status: u16, body: &Value) -> bool {
    status == 409 && body["code"] == "insufficient_funds"
}

/// Whether an answer is a stopping server's refusal (nothing applied, retry elsewhere).
fn is_shutting_down(status: u16, body: &Value) -> bool {
    status == 503 && body["code"] == "shutting_down"
}

/// The transfer id a failed transfer's problem names in its detail ("transfer ID failed and
/// its N went back to ...").
fn failed_transfer_id(body: &Value) -> Option<String> {
    let detail = body["detail"].as_str()?;
    let mut words = detail.split_whitespace();
    while let Some(word) = words.next() {
        if word == "transfer" {
            if let Some(id) = words.next() {
                if uuid::Uuid::parse_str(id).is_ok() {
                    return Some(id.to_string());
                }
            }
        }
    }
    None
}

#[derive(Clone, Debug)]
enum Outcome {
    /// A 2xx answer: the change is durable.
    Acked { status: u16, body: Value },
    /// A non-2xx answer: nothing was applied.
    Refused { status: u16, body: Value },
    /// No answer before the process died: may or may not have happened.
    Unanswered(String),
}

#[derive(Clone, Debug)]
struct Sent {
    account: usize,
    key: String,
    op: Op,
    outcome: Outcome,
}

impl Sent {
    fn describe(&self) -> String {
        format!(
            "{} {:?} on {} (key {})",
            self.op.kind(),
            self.op,
            account_name(self.account),
            self.key
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldState {
    Open,
    Captured(u64),
    Released,
}

#[derive(Clone, Debug, Default)]
struct AccountModel {
    balance: i64,
    held: u64,
    seq: u64,
    kinds: BTreeMap<&'static str, u64>,
}

/// A transfer that happened (acknowledged, found by the key lookup, or applied by a retry).
#[derive(Clone, Debug)]
struct TransferModel {
    id: String,
    from: usize,
    to: usize,
    amount: u64,
    /// Refused by the destination, the source refunded.
    failed: bool,
    metadata: Value,
    /// The `transfer` of the answer (completed transfers): `GET /v1/transfers/{id}` must
    /// return exactly this.
    answer: Option<Value>,
}

/// What the applied operations imply.
#[derive(Default)]
struct Model {
    accounts: Vec<AccountModel>,
    holds: BTreeMap<String, (HoldRef, HoldState)>,
    /// Applied transfers, in the order the model learnt them.
    transfers: Vec<TransferModel>,
    transfer_ids: BTreeSet<String>,
    /// Money that came in or went out: credits minus debits and captures. Transfers move
    /// money between accounts, so the sum of all balances must equal this.
    external: i128,
    /// Every applied key: account, key, status, response body.
    applied: Vec<(usize, String, u16, Value)>,
    /// Keys answered with an error: the lookup must not know them.
    refused: Vec<(usize, String)>,
    /// Counters for the report.
    acked: usize,
    resolved_happened: usize,
    resolved_not_happened: usize,
    retried: usize,
    /// Transfers answered 201 / answered as failed (refunded) under load.
    transfers_acked: usize,
    transfers_failed: usize,
    /// Transfers without an answer at a kill, and what the lookup on `from` found.
    transfers_unanswered: usize,
    transfers_resolved_happened: usize,
    transfers_resolved_not_happened: usize,
}

impl Model {
    fn new() -> Model {
        Model {
            accounts: vec![AccountModel::default(); ACCOUNTS + 1],
            ..Model::default()
        }
    }

    /// Records that `sent` was applied exactly once with this answer; checks that the answer
    /// is consistent with the request and that nothing is applied twice.
    fn apply(&mut self, sent: &Sent, status: u16, body: &Value) {
        if let Op::Transfer { to, amount, note } = &sent.op {
            self.apply_transfer(sent, *to, *amount, *note, status, body);
            return;
        }
        let what = sent.describe();
        assert_eq!(
            status,
            sent.op.success_status(),
            "{what}: unexpected status"
        );
        let tx = &body["transaction"];
        assert_eq!(
            tx["kind"],
            sent.op.kind(),
            "{what}: transaction kind in {body}"
        );
        assert_eq!(
            tx["account_id"],
            account_name(sent.account),
            "{what}: account in {body}"
        );
        let account = &mut self.accounts[sent.account];
        match &sent.op {
            Op::Credit(a) => {
                assert_eq!(tx["amount"], *a, "{what}: amount in {body}");
                account.balance += *a as i64;
                self.external += i128::from(*a);
            }
            Op::Debit(a) => {
                assert_eq!(tx["amount"], *a, "{what}: amount in {body}");
                account.balance -= *a as i64;
                self.external -= i128::from(*a);
            }
            Op::Hold(a) => {
                assert_eq!(tx["amount"], *a, "{what}: amount in {body}");
                let id = body["hold"]["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: no hold id in {body}"))
                    .to_string();
                let hold = HoldRef {
                    id: id.clone(),
                    account: sent.account,
                    amount: *a,
                };
                let previous = self.holds.insert(id, (hold, HoldState::Open));
                assert!(previous.is_none(), "{what}: hold id reused in {body}");
                account.held += *a;
            }
            Op::Capture(hold, amount) => {
                let captured = amount.unwrap_or(hold.amount);
                assert_eq!(tx["amount"], captured, "{what}: captured amount in {body}");
                let entry = self
                    .holds
                    .get_mut(&hold.id)
                    .unwrap_or_else(|| panic!("{what}: capture of an unknown hold"));
                assert_eq!(
                    entry.1,
                    HoldState::Open,
                    "{what}: the hold was already ended: applied twice?"
                );
                entry.1 = HoldState::Captured(captured);
                account.balance -= captured as i64;
                self.external -= i128::from(captured);
                account.held -= hold.amount;
            }
            Op::Transfer { .. } => unreachable!("transfers are applied above"),
            Op::Release(hold) => {
                let entry = self
                    .holds
                    .get_mut(&hold.id)
                    .unwrap_or_else(|| panic!("{what}: release of an unknown hold"));
                assert_eq!(
                    entry.1,
                    HoldState::Open,
                    "{what}: the hold was already ended: applied twice?"
                );
                entry.1 = HoldState::Released;
                account.held -= hold.amount;
            }
        }
        account.seq += 1;
        *account.kinds.entry(sent.op.kind()).or_default() += 1;
        self.applied
            .push((sent.account, sent.key.clone(), status, body.clone()));
    }

    /// Records that the transfer `sent` happened exactly once with this answer: 201 and
    /// `completed`, or the destination's refusal (the source refunded, `failed`).
    fn apply_transfer(
        &mut self,
        sent: &Sent,
        to: usize,
        amount: u64,
        note: bool,
        status: u16,
        body: &Value,
    ) {
        let what = sent.describe();
        let from = sent.account;
        let metadata = if note { transfer_note() } else { json!({}) };
        let (id, failed, answer) = if status == 201 {
            let t = &body["transfer"];
            assert_eq!(t["status"], "completed", "{what}: status in {body}");
            assert_eq!(t["from"], account_name(from), "{what}: from in {body}");
            assert_eq!(t["to"], account_name(to), "{what}: to in {body}");
            assert_eq!(t["amount"], amount, "{what}: amount in {body}");
            assert_eq!(t["metadata"], metadata, "{what}: metadata in {body}");
            assert_eq!(
                body["from_account"]["id"],
                account_name(from),
                "{what}: from_account in {body}"
            );
            assert_eq!(
                body["to_account"]["id"],
                account_name(to),
                "{what}: to_account in {body}"
            );
            let id = t["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no transfer id in {body}"))
                .to_string();
            (id, false, Some(t.clone()))
        } else if is_failed_transfer(&sent.op, status, body) {
            assert_eq!(
                to, WHALE,
                "{what}: only transfers to the whale can be refused by the destination: {body}"
            );
            let id = failed_transfer_id(body)
                .unwrap_or_else(|| panic!("{what}: no transfer id in the refusal {body}"));
            (id, true, None)
        } else {
            panic!("{what}: unexpected answer {status} {body}");
        };
        assert!(
            self.transfer_ids.insert(id.clone()),
            "{what}: transfer id {id} applied twice: {body}"
        );
        let source = &mut self.accounts[from];
        source.seq += 1;
        *source.kinds.entry("transfer_out").or_default() += 1;
        if failed {
            // Debited, then refunded: the refund is listed as a transfer_in of the source.
            source.seq += 1;
            *source.kinds.entry("transfer_in").or_default() += 1;
        } else {
            source.balance -= amount as i64;
            let destination = &mut self.accounts[to];
            destination.balance += amount as i64;
            destination.seq += 1;
            *destination.kinds.entry("transfer_in").or_default() += 1;
        }
        self.transfers.push(TransferModel {
            id,
            from,
            to,
            amount,
            failed,
            metadata,
            answer,
        });
        self.applied
            .push((from, sent.key.clone(), status, body.clone()));
    }

    /// Per account, per transfer id, the (kind, amount) of the transactions the applied
    /// transfers imply, sorted.
    fn transfer_transactions(&self) -> Vec<BTreeMap<String, Vec<(String, u64)>>> {
        let mut expected = vec![BTreeMap::<String, Vec<(String, u64)>>::new(); ACCOUNTS + 1];
        for t in &self.transfers {
            let out = (String::from("transfer_out"), t.amount);
            let inn = (String::from("transfer_in"), t.amount);
            if t.failed {
                let mut both = vec![out, inn];
                both.sort();
                expected[t.from].insert(t.id.clone(), both);
            } else {
                expected[t.from].insert(t.id.clone(), vec![out]);
                expected[t.to].insert(t.id.clone(), vec![inn]);
            }
        }
        expected
    }

    fn open_holds(&self) -> Vec<HoldRef> {
        self.holds
            .values()
            .filter(|(_, state)| *state == HoldState::Open)
            .map(|(hold, _)| hold.clone())
            .collect()
    }

    fn open_hold_count(&self, account: usize) -> u64 {
        self.holds
            .values()
            .filter(|(h, s)| h.account == account && *s == HoldState::Open)
            .count() as u64
    }
}

// ---------------------------------------------------------------------------------------
// Load.

/// One client: sends random operations one after another until the server stops answering,
/// `stop` is set, or its bounds are reached. Holds it is given (and those it creates) are its
/// own: no other client captures or releases them. A `hot_only` client only transfers small
/// amounts from random accounts to the hot one.
async fn client_load(
    base: String,
    client_id: usize,
    cycle: usize,
    mut rng: Rng,
    mut holds: Vec<HoldRef>,
    hot_only: bool,
    stop: Arc<AtomicBool>,
) -> Vec<Sent> {
    let http = http_client();
    let started = Instant::now();
    let mut sent = Vec::new();
    for n in 0..OPS_PER_CLIENT_MAX {
        if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_DEADLINE {
            break;
        }
        let mut account = rng.index(ACCOUNTS);
        let roll = rng.range(0, 99);
        let op = if hot_only {
            account = (HOT + 1 + rng.index(ACCOUNTS - 1)) % ACCOUNTS;
            Op::Transfer {
                to: HOT,
                amount: rng.range(1, HOT_TRANSFER_MAX),
                note: roll == 0,
            }
        } else if roll < 28 || (roll >= 80 && holds.is_empty()) {
            Op::Credit(rng.range(1, 1000))
        } else if roll < 42 {
            Op::Debit(rng.range(1, 800))
        } else if roll < 56 {
            Op::Hold(rng.range(1, 300))
        } else if roll < 80 {
            // Transfers: many to the hot account, random pairs, a few to the whale (refused
            // by it, so refunded).
            let kind = rng.range(0, 9);
            let (to, amount) = if kind < 4 {
                (HOT, rng.range(1, 300))
            } else if kind < 9 {
                (rng.index(ACCOUNTS), rng.range(1, 500))
            } else {
                (WHALE, rng.range(WHALE_TRANSFER_MIN, WHALE_TRANSFER_MAX))
            };
            if account == to {
                account = (to + 1 + rng.index(ACCOUNTS - 1)) % ACCOUNTS;
            }
            Op::Transfer {
                to,
                amount,
                note: rng.range(0, 3) == 0,
            }
        } else {
            let hold = holds.swap_remove(rng.index(holds.len()));
            if roll < 83 {
                Op::Capture(hold, None)
            } else if roll < 91 {
                let amount = rng.range(1, hold.amount);
                Op::Capture(hold, Some(amount))
            } else {
                Op::Release(hold)
            }
        };
        let account = op.account(account);
        let key = format!("c{cycle}-t{client_id}-n{n}");
        let outcome = send(&http, &base, account, &key, &op).await;
        if let (Outcome::Acked { body, .. }, Op::Hold(amount)) = (&outcome, &op) {
            if let Some(id) = body["hold"]["id"].as_str() {
                holds.push(HoldRef {
                    id: id.to_string(),
                    account,
                    amount: *amount,
                });
            }
        }
        let unanswered = matches!(outcome, Outcome::Unanswered(_));
        sent.push(Sent {
            account,
            key,
            op,
            outcome,
        });
        if unanswered {
            break;
        }
    }
    sent
}

/// Sends one operation with its key and classifies the answer.
async fn send(http: &reqwest::Client, base: &str, account: usize, key: &str, op: &Op) -> Outcome {
    let (path, body) = op.request(account);
    let response = http
        .post(format!("{base}{path}"))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return Outcome::Unanswered(error.to_string()),
    };
    let status = response.status().as_u16();
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(error) => return Outcome::Unanswered(format!("body: {error}")),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|error| {
        panic!(
            "answer to {key} is not JSON ({error}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    if (200..300).contains(&status) {
        Outcome::Acked { status, body }
    } else {
        Outcome::Refused { status, body }
    }
}

/// Runs `CLIENTS` clients against `server` for a random while, then ends the server with
/// `end` (SIGKILL or SIGTERM) and returns what every client sent.
async fn run_load_until(
    server: &mut ServerProcess,
    model: &Model,
    cycle: usize,
    rng: &mut Rng,
    end: impl FnOnce(&mut ServerProcess),
) -> Vec<Sent> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut holds: Vec<Vec<HoldRef>> = vec![Vec::new(); CLIENTS + HOT_CLIENTS];
    for (i, hold) in model.open_holds().into_iter().enumerate() {
        holds[i % CLIENTS].push(hold);
    }
    let mut tasks = Vec::new();
    for (client_id, holds) in holds.into_iter().enumerate() {
        tasks.push(tokio::spawn(client_load(
            server.base.clone(),
            client_id,
            cycle,
            Rng(rng.next()),
            holds,
            client_id >= CLIENTS,
            stop.clone(),
        )));
    }
    let delay = rng.range(KILL_AFTER_MS_MIN, KILL_AFTER_MS_MAX);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    end(server);
    // Clients stop on their own at their first unanswered request, so requests in flight at
    // the end stay in flight; the flag only bounds how long that may take.
    let flag = stop.clone();
    let bound = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        flag.store(true, Ordering::Relaxed);
    });
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a load client panicked"));
    }
    bound.abort();
    all
}

/// How many acknowledged requests of a cycle are sent again after the restart.
const REPLAYS_PER_CYCLE: usize = 16;

/// Takes the answers of one cycle into the model; returns the unanswered requests and a
/// random sample of the acknowledged ones.
fn record_answers(model: &mut Model, sent: Vec<Sent>, rng: &mut Rng) -> (Vec<Sent>, Vec<Sent>) {
    let mut unanswered = Vec::new();
    let mut acked = Vec::new();
    for s in sent {
        match &s.outcome {
            Outcome::Acked { status, body } => {
                let (status, body) = (*status, body.clone());
                model.apply(&s, status, &body);
                model.acked += 1;
                if matches!(s.op, Op::Transfer { .. }) {
                    model.transfers_acked += 1;
                }
                acked.push(s);
            }
            Outcome::Refused { status, body } if is_failed_transfer(&s.op, *status, body) => {
                // The destination refused after the debit: it happened, and the source was
                // refunded. Its key is remembered with this answer.
                let (status, body) = (*status, body.clone());
                model.apply(&s, status, &body);
                model.transfers_failed += 1;
                acked.push(s);
            }
            Outcome::Refused { status, body } => {
                // Under this load the only other refusals that can happen are a lack of
                // funds and, for a request that reached a server stopping at SIGTERM,
                // 503 shutting_down; neither applied anything (checked after the restart).
                assert!(
                    is_refusal_for_funds(*status, body) || is_shutting_down(*status, body),
                    "{}: unexpected refusal {status} {body}",
                    s.describe()
                );
                model.refused.push((s.account, s.key.clone()));
            }
            Outcome::Unanswered(_) => {
                if matches!(s.op, Op::Transfer { .. }) {
                    model.transfers_unanswered += 1;
                }
                unanswered.push(s)
            }
        }
    }
    let mut sample = Vec::new();
    while sample.len() < REPLAYS_PER_CYCLE && !acked.is_empty() {
        sample.push(acked.swap_remove(rng.index(acked.len())));
    }
    (unanswered, sample)
}

/// Sends acknowledged requests again with their keys after a restart: each must be answered
/// as a replay with the original status and body, and change nothing.
async fn replay_acknowledged(server: &ServerProcess, model: &mut Model, acked: Vec<Sent>) {
    let http = http_client();
    for s in acked {
        let what = s.describe();
        let (Outcome::Acked { status, body } | Outcome::Refused { status, body }) = &s.outcome
        else {
            panic!("{what} was not answered");
        };
        let (path, request) = s.op.request(s.account);
        let response = http
            .post(server.url(&path))
            .header("Idempotency-Key", &s.key)
            .json(&request)
            .send()
            .await
            .unwrap_or_else(|e| panic!("replay of {what}: {e}"));
        let got = response.status().as_u16();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let answer: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("replay of {what}: body is not JSON: {e}"));
        model.retried += 1;
        assert!(
            replayed,
            "replay of acknowledged {what} after a restart is not marked as a replay ({got} {answer})"
        );
        assert_eq!(
            got, *status,
            "replay of {what}: status differs from the original"
        );
        assert_eq!(
            &answer, body,
            "replay of {what}: body differs from the original"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Checks against a running server.

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .json::<Value>()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"));
    (status, body)
}

async fn lookup_key(
    http: &reqwest::Client,
    server: &ServerProcess,
    account: usize,
    key: &str,
) -> (u16, Value) {
    let url = server.url(&format!(
        "/v1/accounts/{}/idempotency-keys/{key}",
        account_name(account)
    ));
    get_json(http, &url).await
}

/// Finds out, for each unanswered request, whether it happened (lookup 200: it is applied to
/// the model with the stored response) or not (404). Returns them with the verdict.
async fn resolve_unanswered(
    server: &ServerProcess,
    model: &mut Model,
    unanswered: Vec<Sent>,
) -> Vec<(Sent, bool)> {
    let http = http_client();
    let mut resolved = Vec::new();
    for s in unanswered {
        let (status, body) = lookup_key(&http, server, s.account, &s.key).await;
        match status {
            200 => {
                assert_eq!(body["key"], s.key.as_str(), "lookup of {}", s.describe());
                let original = body["status"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("lookup without status: {body}"));
                model.apply(&s, original as u16, &body["response"]);
                model.resolved_happened += 1;
                if matches!(s.op, Op::Transfer { .. }) {
                    model.transfers_resolved_happened += 1;
                }
                resolved.push((s, true));
            }
            404 => {
                assert_eq!(
                    body["code"],
                    "unknown_idempotency_key",
                    "lookup of {}",
                    s.describe()
                );
                model.resolved_not_happened += 1;
                if matches!(s.op, Op::Transfer { .. }) {
                    model.transfers_resolved_not_happened += 1;
                }
                resolved.push((s, false));
            }
            other => panic!("lookup of {}: unexpected {other} {body}", s.describe()),
        }
    }
    resolved
}

/// Sends every unanswered request again with its key after the restart. One that happened
/// must be answered as a replay of the stored outcome; one that did not is evaluated afresh
/// (and, if it succeeds now, must be a replay when sent a third time). Nothing is applied
/// twice: the account checks that follow count every change.
async fn retry_unanswered(server: &ServerProcess, model: &mut Model, resolved: Vec<(Sent, bool)>) {
    let http = http_client();
    for (s, happened) in resolved {
        let what = s.describe();
        let (path, body) = s.op.request(s.account);
        let url = server.url(&path);
        let mut attempts = if happened { 1 } else { 2 };
        let mut expect_replay = happened;
        while attempts > 0 {
            attempts -= 1;
            let response = http
                .post(&url)
                .header("Idempotency-Key", &s.key)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("retry of {what}: {e}"));
            let status = response.status().as_u16();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            let answer: Value = response
                .json()
                .await
                .unwrap_or_else(|e| panic!("retry of {what}: body is not JSON: {e}"));
            model.retried += 1;
            if expect_replay {
                assert!(replayed, "retry of {what} that already happened: not marked as a replay ({status} {answer})");
                let stored = model
                    .applied
                    .iter()
                    .find(|(a, k, _, _)| *a == s.account && *k == s.key)
                    .unwrap_or_else(|| panic!("{what} is not in the model"));
                assert_eq!(
                    status, stored.2,
                    "retry of {what}: status differs from the original"
                );
                assert_eq!(
                    answer, stored.3,
                    "retry of {what}: body differs from the original"
                );
                break;
            }
            assert!(
                !replayed,
                "retry of {what} that never happened was answered as a replay ({status} {answer})"
            );
            if (200..300).contains(&status) || is_failed_transfer(&s.op, status, &answer) {
                model.apply(&s, status, &answer);
                expect_replay = true;
            } else {
                assert!(
                    is_refusal_for_funds(status, &answer),
                    "retry of {what}: unexpected {status} {answer}"
                );
                model.refused.push((s.account, s.key.clone()));
                break;
            }
        }
    }
}

/// Runs `check` over `items` on a few concurrent tasks; returns the failures.
async fn check_all<T, E, F, Fut>(items: Vec<T>, check: F) -> Vec<E>
where
    T: Send + 'static,
    E: Send + 'static,
    F: Fn(reqwest::Client, T) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
{
    const WORKERS: usize = 8;
    let mut chunks: Vec<Vec<T>> = (0..WORKERS).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        chunks[i % WORKERS].push(item);
    }
    let mut tasks = Vec::new();
    for chunk in chunks {
        let check = check.clone();
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            let mut errors = Vec::new();
            for item in chunk {
                if let Err(e) = check(http.clone(), item).await {
                    errors.push(e);
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("a check task panicked"));
    }
    errors
}

/// Panics with the first failures, if there are any.
fn assert_none_failed(errors: &[String]) {
    assert!(
        errors.is_empty(),
        "{} check(s) failed, first ones:\n{}",
        errors.len(),
        errors
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every account's balance, held, available, open holds and seq equal the model, and its
/// transaction list has exactly `seq` entries numbered `seq..1` with the model's kinds; each
/// applied transfer is named by exactly one transfer_out of its source and one transfer_in of
/// its destination (a failed one: a transfer_out and the refund's transfer_in, both of the
/// source) with its amount, and no other transaction names a transfer. Then money is
/// conserved: the balances add up to the credits minus the debits and captures, and no
/// transfer is in flight.
async fn check_accounts(server: &ServerProcess, model: &Model, when: &str) {
    let http = http_client();
    let expected_transfers = model.transfer_transactions();
    let mut balances: i128 = 0;
    for (index, expected) in model.accounts.iter().enumerate() {
        let name = account_name(index);
        let (status, account) = get_json(&http, &server.url(&format!("/v1/accounts/{name}"))).await;
        assert_eq!(status, 200, "{when}: GET {name}: {account}");
        assert_eq!(
            account["balance"], expected.balance,
            "{when}: balance of {name}: {account}"
        );
        assert_eq!(
            account["held"], expected.held,
            "{when}: held of {name}: {account}"
        );
        assert_eq!(
            account["available"],
            expected.balance - expected.held as i64,
            "{when}: available of {name}: {account}"
        );
        assert_eq!(
            account["open_holds"],
            model.open_hold_count(index),
            "{when}: open holds of {name}: {account}"
        );
        assert!(
            expected.balance >= expected.held as i64,
            "{when}: {name} was driven below zero available (balance {}, held {}) by acknowledged operations",
            expected.balance,
            expected.held
        );
        assert_eq!(
            account["seq"], expected.seq,
            "{when}: seq of {name}: {account}"
        );

        balances += i128::from(
            account["balance"]
                .as_i64()
                .unwrap_or_else(|| panic!("{when}: balance of {name}: {account}")),
        );

        let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut transfers: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut next_seq = expected.seq;
        let mut before: Option<u64> = None;
        for _page in 0..10_000 {
            let mut url = server.url(&format!("/v1/accounts/{name}/transactions?limit=1000"));
            if let Some(b) = before {
                url.push_str(&format!("&before_seq={b}"));
            }
            let (status, page) = get_json(&http, &url).await;
            assert_eq!(status, 200, "{when}: transactions of {name}: {page}");
            let txs = page["transactions"].as_array().expect("transactions array");
            for tx in txs {
                assert_eq!(
                    tx["seq"], next_seq,
                    "{when}: transactions of {name} out of order"
                );
                next_seq -= 1;
                let kind = match tx["kind"].as_str() {
                    Some("credit") => "credit",
                    Some("debit") => "debit",
                    Some("hold") => "hold",
                    Some("capture") => "capture",
                    Some("release") => "release",
                    Some("transfer_out") => "transfer_out",
                    Some("transfer_in") => "transfer_in",
                    other => panic!("{when}: unexpected transaction kind {other:?} on {name}"),
                };
                *kinds.entry(kind).or_default() += 1;
                match (kind, tx["transfer_id"].as_str()) {
                    ("transfer_out" | "transfer_in", Some(id)) => {
                        let amount = tx["amount"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("{when}: amount of {tx}"));
                        let entry = transfers.entry(id.to_string()).or_default();
                        entry.push((kind.to_string(), amount));
                        entry.sort();
                    }
                    ("transfer_out" | "transfer_in", None) => {
                        panic!("{when}: {kind} of {name} without a transfer_id: {tx}")
                    }
                    (_, None) => {}
                    (_, Some(_)) => panic!("{when}: {kind} of {name} names a transfer: {tx}"),
                }
            }
            match page["next"].as_str() {
                Some(cursor) => before = Some(cursor.parse().expect("numeric cursor")),
                None => break,
            }
        }
        assert_eq!(
            next_seq, 0,
            "{when}: {name} lists fewer transactions than seq"
        );
        assert_eq!(
            kinds, expected.kinds,
            "{when}: transaction kinds of {name} differ from the acknowledged operations"
        );
        let want = &expected_transfers[index];
        if &transfers != want {
            let missing: Vec<String> = want
                .iter()
                .filter(|(id, txs)| transfers.get(*id) != Some(*txs))
                .take(5)
                .map(|(id, txs)| format!("{id}: want {txs:?}, listed {:?}", transfers.get(id)))
                .collect();
            let unknown: Vec<&String> = transfers
                .keys()
                .filter(|id| !want.contains_key(*id))
                .take(5)
                .collect();
            panic!(
                "{when}: the transfer transactions of {name} differ from the applied transfers: \
                 {} listed, {} applied; differing: {missing:?}; unknown to the model: {unknown:?}",
                transfers.len(),
                want.len()
            );
        }
    }

    // Conservation: transfers move money but never create or destroy it.
    let model_balances: i128 = model.accounts.iter().map(|a| i128::from(a.balance)).sum();
    assert_eq!(
        model_balances, model.external,
        "{when}: the model itself does not conserve money"
    );
    assert_eq!(
        balances, model.external,
        "{when}: the sum of all balances is not the acknowledged credits minus debits and captures"
    );
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{when}: GET /metrics: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("{when}: GET /metrics body: {e}"));
    for gauge in [
        "coffer_transfers_in_flight",
        "coffer_transfers_in_flight_amount",
    ] {
        let value = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{gauge} ")))
            .unwrap_or_else(|| panic!("{when}: no {gauge} in /metrics"));
        assert_eq!(
            value.trim(),
            "0",
            "{when}: {gauge} is not 0 once the server is ready and quiet"
        );
    }
}

/// Every hold the model knows is found with the model's status, amount and captured amount.
async fn check_holds(server: &ServerProcess, model: &Model, when: &str) {
    let base = server.base.clone();
    let holds: Vec<(HoldRef, HoldState)> = model.holds.values().cloned().collect();
    let when = when.to_string();
    let errors = check_all(holds, move |http, (hold, state)| {
        let base = base.clone();
        let when = when.clone();
        async move {
            let url = format!(
                "{base}/v1/accounts/{}/holds/{}",
                account_name(hold.account),
                hold.id
            );
            let response = http.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.map_err(|e| format!("GET {url}: {e}"))?;
            let (status_name, captured) = match state {
                HoldState::Open => ("open", 0),
                HoldState::Captured(c) => ("captured", c),
                HoldState::Released => ("released", 0),
            };
            if status != 200
                || body["status"] != status_name
                || body["amount"] != hold.amount
                || body["captured"] != captured
            {
                return Err(format!(
                    "{when}: hold {} should be {status_name} (amount {}, captured {captured}), got {status} {body}",
                    hold.id, hold.amount
                ));
            }
            Ok(())
        }
    })
    .await;
    assert_none_failed(&errors);
}

/// `GET /v1/transfers/{id}` of every transfer in `transfers`: a completed one returns exactly
/// the `transfer` of its answer, a failed one says `failed` with the destination's refusal.
/// Returns how many were checked.
async fn check_transfers(
    server: &ServerProcess,
    transfers: Vec<TransferModel>,
    when: &str,
) -> usize {
    let base = server.base.clone();
    let count = transfers.len();
    let when = when.to_string();
    let errors = check_all(transfers, move |http, t| {
        let base = base.clone();
        let when = when.clone();
        async move {
            let url = format!("{base}/v1/transfers/{}", t.id);
            let response = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = response.status().as_u16();
            let body: Value = response
                .json()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let what = format!(
                "{when}: transfer {} of {} from {} to {}",
                t.id,
                t.amount,
                account_name(t.from),
                account_name(t.to)
            );
            if status != 200 {
                return Err(format!("{what}: GET answered {status} {body}"));
            }
            if let Some(answer) = &t.answer {
                if &body != answer {
                    return Err(format!(
                        "{what}: GET {body} differs from the answer {answer}"
                    ));
                }
            }
            let (status_name, failure) = if t.failed {
                ("failed", json!("balance_limit_exceeded"))
            } else {
                ("completed", Value::Null)
            };
            if body["id"] != t.id.as_str()
                || body["status"] != status_name
                || body["from"] != account_name(t.from)
                || body["to"] != account_name(t.to)
                || body["amount"] != t.amount
                || body["metadata"] != t.metadata
                || body["failure_code"] != failure
            {
                return Err(format!(
                    "{what}: should be {status_name}, GET answered {body}"
                ));
            }
            Ok(())
        }
    })
    .await;
    assert_none_failed(&errors);
    count
}

/// How many transfers the recovery logged in `log` it finished ("finishing transfers a crash
/// left half done transfers=N").
fn finished_by_recovery(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("finishing transfers a crash left half done"))
        .map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("transfers="))
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no transfer count in the log line {line:?}"))
        })
        .sum()
}

/// Runs `bin wal verify` on the data directory of a killed server (an offline recovery of it
/// that writes nothing) and returns how many transfers it found half done: transfer_out in
/// the log without its end. Panics if the log does not verify.
async fn half_done_transfers(bin: &Path, data_dir: &Path) -> usize {
    let mut command = Command::new(bin);
    command.args(["wal", "verify", "--data-dir"]).arg(data_dir);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the wal verify task")
        .unwrap_or_else(|e| panic!("run {} wal verify: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "wal verify of the killed server's data failed ({}):\n{stdout}{stderr}",
        output.status
    );
    // "transfers: N remembered, M half done (...)"
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("transfers: "))
        .find_map(|line| {
            let (before, _) = line.split_once(" half done")?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| {
            panic!("no count of half-done transfers in wal verify's output:\n{stdout}")
        })
}

/// What the idempotency-key lookups found.
#[derive(Debug, Default)]
struct KeyCheck {
    /// Applied keys found with their original status and response.
    verified: usize,
    /// Applied keys the lookup does not know: acknowledged operations that were lost.
    lost: Vec<String>,
    /// Every other failure: a different answer, a refused key that is known, a lookup error.
    wrong: Vec<String>,
}

enum KeyFault {
    Lost(String),
    Wrong(String),
}

impl KeyCheck {
    fn failures(&self) -> impl Iterator<Item = &String> {
        self.lost.iter().chain(&self.wrong)
    }

    fn is_ok(&self) -> bool {
        self.lost.is_empty() && self.wrong.is_empty()
    }

    fn assert_ok(&self) {
        if !self.is_ok() {
            let first: Vec<String> = self.failures().take(10).cloned().collect();
            panic!(
                "{} acknowledged operation(s) lost, {} other key check(s) failed, first ones:\n{}",
                self.lost.len(),
                self.wrong.len(),
                first.join("\n")
            );
        }
    }
}

/// Looks up every applied key (it must be known with its original status and response) and
/// every refused key (it must be unknown).
async fn check_keys(
    server: &ServerProcess,
    applied: Vec<(usize, String, u16, Value)>,
    refused: Vec<(usize, String)>,
    when: &str,
) -> KeyCheck {
    let base = server.base.clone();
    let when_applied = when.to_string();
    let applied_count = applied.len();
    let faults = check_all(applied, move |http, (account, key, status, response)| {
        let base = base.clone();
        let when = when_applied.clone();
        async move {
            let url = format!(
                "{base}/v1/accounts/{}/idempotency-keys/{key}",
                account_name(account)
            );
            let wrong = |e: String| KeyFault::Wrong(format!("GET {url}: {e}"));
            let answer = http
                .get(&url)
                .send()
                .await
                .map_err(|e| wrong(e.to_string()))?;
            let got = answer.status().as_u16();
            let body: Value = answer.json().await.map_err(|e| wrong(e.to_string()))?;
            if got == 404 && body["code"] == "unknown_idempotency_key" {
                return Err(KeyFault::Lost(format!(
                    "{when}: acknowledged key {key} on {} is lost: {got} {body}",
                    account_name(account)
                )));
            }
            if got != 200 {
                return Err(KeyFault::Wrong(format!(
                    "{when}: lookup of acknowledged key {key} on {}: {got} {body}",
                    account_name(account)
                )));
            }
            if body["status"] != status
                || body["response"] != response
                || body["key"] != key.as_str()
            {
                return Err(KeyFault::Wrong(format!(
                    "{when}: key {key}: lookup {body} differs from the original {status} {response}"
                )));
            }
            Ok(())
        }
    })
    .await;
    let mut check = KeyCheck {
        verified: applied_count - faults.len(),
        ..KeyCheck::default()
    };
    for fault in faults {
        match fault {
            KeyFault::Lost(e) => check.lost.push(e),
            KeyFault::Wrong(e) => check.wrong.push(e),
        }
    }
    let base = server.base.clone();
    let when = when.to_string();
    let errors = check_all(refused, move |http, (account, key)| {
        let base = base.clone();
        let when = when.clone();
        async move {
            let url = format!(
                "{base}/v1/accounts/{}/idempotency-keys/{key}",
                account_name(account)
            );
            let answer = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let got = answer.status().as_u16();
            if got != 404 {
                let body = answer.text().await.unwrap_or_default();
                return Err(format!("{when}: refused key {key} is known: {got} {body}"));
            }
            Ok(())
        }
    })
    .await;
    check.wrong.extend(errors);
    check
}

/// Creates the load's accounts and the whale, and credits the whale up to near the balance
/// limit (an operation the model applies like any other).
async fn create_accounts(server: &ServerProcess, model: &mut Model) {
    let http = http_client();
    for index in 0..=WHALE {
        let name = account_name(index);
        let response = http
            .put(server.url(&format!("/v1/accounts/{name}")))
            .json(&json!({"currency": "GEM"}))
            .send()
            .await
            .expect("create an account");
        assert_eq!(response.status(), 201, "create {name}");
    }
    let op = Op::Credit(WHALE_BALANCE);
    let key = "setup-whale".to_string();
    let outcome = send(&http, &server.base, WHALE, &key, &op).await;
    let Outcome::Acked { status, body } = &outcome else {
        panic!("credit of the whale: {outcome:?}");
    };
    let (status, body) = (*status, body.clone());
    let sent = Sent {
        account: WHALE,
        key,
        op,
        outcome,
    };
    model.apply(&sent, status, &body);
}

/// Where the model stood before a cycle's load: what `verify_after_restart` checks is what
/// came after.
#[derive(Clone, Copy, Debug, Default)]
struct Marks {
    applied: usize,
    refused: usize,
    transfers: usize,
}

impl Marks {
    fn of(model: &Model) -> Marks {
        Marks {
            applied: model.applied.len(),
            refused: model.refused.len(),
            transfers: model.transfers.len(),
        }
    }
}

/// After a restart: resolves the unanswered requests, looks up the keys applied since
/// `marks.applied` and refused since `marks.refused`, checks the accounts (with every
/// transfer's transactions and money conservation), the holds and `GET /v1/transfers/{id}`
/// of the transfers applied since `marks.transfers`, retries the unanswered requests and
/// checks the accounts again (and the transfers the retries applied). Panics on a
/// discrepancy, except when a key lookup failed: then it returns at once with the lookups,
/// so that the caller can count what was lost before it fails. Also returns how many
/// transfers were verified.
async fn verify_after_restart(
    server: &ServerProcess,
    model: &mut Model,
    unanswered: Vec<Sent>,
    acked_sample: Vec<Sent>,
    marks: Marks,
    when: &str,
) -> (KeyCheck, usize) {
    let resolved = resolve_unanswered(server, model, unanswered).await;
    let keys = check_keys(
        server,
        model.applied[marks.applied..].to_vec(),
        model.refused[marks.refused..].to_vec(),
        when,
    )
    .await;
    if !keys.is_ok() {
        return (keys, 0);
    }
    check_accounts(server, model, when).await;
    check_holds(server, model, when).await;
    let before_retries = model.transfers.len();
    let mut transfers =
        check_transfers(server, model.transfers[marks.transfers..].to_vec(), when).await;
    retry_unanswered(server, model, resolved).await;
    replay_acknowledged(server, model, acked_sample).await;
    let when = format!("{when}, after the retries");
    check_accounts(server, model, &when).await;
    transfers += check_transfers(server, model.transfers[before_retries..].to_vec(), &when).await;
    (keys, transfers)
}

// ---------------------------------------------------------------------------------------
// The kill cycle, shared by the crash test and the soak.

/// What a run of kill cycles did. Kept up to date while it runs, so that a soak that fails or
/// runs out of time still reports how far it got.
#[derive(Clone, Debug, Default)]
struct CrashStats {
    seed: u64,
    /// SIGKILL/restart cycles whose recovered state was verified.
    cycles: usize,
    /// Requests sent under load.
    requests: usize,
    /// Requests answered 2xx under load.
    acknowledged: usize,
    /// Acknowledged operations verified after the SIGKILL that followed them: key lookup with
    /// the original status and response, and their effect on balances, holds and seq.
    acknowledged_verified: usize,
    /// Requests refused (insufficient funds), under load or when retried.
    refused: usize,
    /// Requests without an answer when the server was killed.
    unanswered: usize,
    /// Unanswered requests the lookup after the restart found applied / not applied.
    resolved_happened: usize,
    resolved_not_happened: usize,
    /// Requests sent again after a restart (unanswered ones and a sample of acknowledged ones).
    retried: usize,
    holds: usize,
    /// Applied operations (acknowledged, found applied, or applied by a retry) looked up once
    /// more at the end, on the last recovered state.
    rechecked_at_end: usize,
    /// Applied operations whose key the lookup no longer knew after a restart.
    lost: usize,
    /// Transfers that happened (acknowledged, found applied, or applied by a retry), and of
    /// them those that ended `failed` with the source refunded.
    transfers: usize,
    transfers_failed: usize,
    /// Transfers answered under load: 201, and failed (the destination refused).
    transfers_acknowledged: usize,
    transfers_failed_answered: usize,
    /// Transfers without an answer at a kill, and what the lookup on `from` found.
    transfers_unanswered: usize,
    transfers_resolved_happened: usize,
    transfers_resolved_not_happened: usize,
    /// Transfers verified after the restart that followed them (`GET /v1/transfers/{id}`
    /// besides the key lookup, histories and conservation that every restart checks).
    transfers_verified: usize,
    /// Transfers the recovery found half done (transfer_out without its end) and finished
    /// before `/readyz` turned 200, as its log says.
    transfers_finished_by_recovery: usize,
    /// Transfers checked with `GET /v1/transfers/{id}` once more at the end.
    transfers_rechecked_at_end: usize,
    /// The first failure messages.
    failures: Vec<String>,
}

impl CrashStats {
    /// Takes the model's counters.
    fn take_counts(&mut self, model: &Model) {
        self.acknowledged = model.acked;
        self.refused = model.refused.len();
        self.resolved_happened = model.resolved_happened;
        self.resolved_not_happened = model.resolved_not_happened;
        self.retried = model.retried;
        self.holds = model.holds.len();
        self.transfers = model.transfers.len();
        self.transfers_failed = model.transfers.iter().filter(|t| t.failed).count();
        self.transfers_acknowledged = model.transfers_acked;
        self.transfers_failed_answered = model.transfers_failed;
        self.transfers_unanswered = model.transfers_unanswered;
        self.transfers_resolved_happened = model.transfers_resolved_happened;
        self.transfers_resolved_not_happened = model.transfers_resolved_not_happened;
    }

    /// Counts the lost keys of `keys` and keeps the first failure messages.
    fn take_key_failures(&mut self, keys: &KeyCheck) {
        self.lost += keys.lost.len();
        let room = SOAK_FAILURES_KEPT.saturating_sub(self.failures.len());
        self.failures.extend(keys.failures().take(room).cloned());
    }
}

fn update_stats(stats: &Mutex<CrashStats>, change: impl FnOnce(&mut CrashStats)) {
    change(
        &mut stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
}

/// Runs `bin` on a fresh data directory under `root` and kills it `cycles` times: each cycle
/// drives `CLIENTS` clients, SIGKILLs the server at a random moment, restarts it on the same
/// data directory and verifies the recovered state against the model of what was
/// acknowledged; at the end every key of every cycle is looked up once more. Panics at the
/// first discrepancy; `stats` is updated as it goes.
async fn run_kill_cycles(
    bin: PathBuf,
    cycles: usize,
    seed: u64,
    root: PathBuf,
    stats: Arc<Mutex<CrashStats>>,
) {
    let started = Instant::now();
    println!(
        "crash test seed: {seed} (set COFFER_CRASH_SEED to replay the choices), binary {}",
        bin.display()
    );
    update_stats(&stats, |s| s.seed = seed);
    let mut rng = Rng(seed);
    let data = root.join("data");
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");

    let mut model = Model::new();
    let mut unanswered: Vec<Sent> = Vec::new();
    let mut acked_sample: Vec<Sent> = Vec::new();
    let mut marks = Marks::default();
    let mut acked_last_cycle = 0;
    let mut finished_by_recovery_total = 0;
    let mut half_done_at_kill = 0;
    let mut in_flight_at_kill = 0;
    let segment_bytes = CRASH_SEGMENT_BYTES.to_string();
    for cycle in 0..=cycles {
        let mut server =
            start_server(&bin, &data, &logs, &["--wal-segment-bytes", &segment_bytes]).await;
        let when = format!("after restart {cycle}");
        if cycle == 0 {
            create_accounts(&server, &mut model).await;
        } else {
            // Transfers the recovery finished can only be ones whose request got no answer
            // (an answer waits for both halves to be durable), and each must be found applied.
            let finished = finished_by_recovery(&server.log_text());
            assert_eq!(
                finished,
                half_done_at_kill,
                "{when}: wal verify found {half_done_at_kill} transfer(s) half done in the \
                 killed server's log, the recovery says it finished {finished}; log:\n{}",
                server.log_text()
            );
            let happened_before = model.transfers_resolved_happened;
            let (keys, transfers_verified) = verify_after_restart(
                &server,
                &mut model,
                std::mem::take(&mut unanswered),
                std::mem::take(&mut acked_sample),
                marks,
                &when,
            )
            .await;
            finished_by_recovery_total += finished;
            update_stats(&stats, |s| {
                s.take_counts(&model);
                s.take_key_failures(&keys);
                s.transfers_finished_by_recovery = finished_by_recovery_total;
                if keys.is_ok() {
                    s.cycles = cycle;
                    s.acknowledged_verified += acked_last_cycle;
                    s.transfers_verified += transfers_verified;
                }
            });
            keys.assert_ok();
            let happened = model.transfers_resolved_happened - happened_before;
            assert!(
                finished <= happened,
                "{when}: the recovery finished {finished} transfer(s), but only {happened} \
                 unanswered transfer(s) were found applied; log:\n{}",
                server.log_text()
            );
            if finished > 0 {
                eprintln!(
                    "{when}: the recovery finished {finished} transfer(s) a crash left half done"
                );
            }
        }
        if cycle == cycles {
            // The end: every key of every cycle once more, on the last recovered state.
            let keys = check_keys(
                &server,
                model.applied.clone(),
                model.refused.clone(),
                "at the end",
            )
            .await;
            update_stats(&stats, |s| {
                s.rechecked_at_end = keys.verified;
                s.take_key_failures(&keys);
            });
            keys.assert_ok();
            let rechecked = check_transfers(&server, model.transfers.clone(), "at the end").await;
            update_stats(&stats, |s| s.transfers_rechecked_at_end = rechecked);
            break;
        }
        marks = Marks::of(&model);
        let acked_before = model.acked;
        let sent = run_load_until(&mut server, &model, cycle, &mut rng, |s| s.sigkill()).await;
        let sent_count = sent.len();
        (unanswered, acked_sample) = record_answers(&mut model, sent, &mut rng);
        in_flight_at_kill += unanswered.len();
        acked_last_cycle = model.acked - acked_before;
        update_stats(&stats, |s| {
            s.requests += sent_count;
            s.unanswered = in_flight_at_kill;
            s.take_counts(&model);
        });
        let first_error = unanswered.iter().find_map(|s| match &s.outcome {
            Outcome::Unanswered(error) => Some(error.as_str()),
            _ => None,
        });
        println!(
            "cycle {cycle}: {sent_count} requests, {acked_last_cycle} acknowledged, {} unanswered at the kill (e.g. {first_error:?})",
            unanswered.len()
        );
        assert!(
            acked_last_cycle > 0,
            "cycle {cycle}: no operation was acknowledged before the kill; log:\n{}",
            server.log_text()
        );
        drop(server);
        half_done_at_kill = half_done_transfers(&bin, &data).await;
    }
    println!(
        "crash test: {cycles} kills, {} acknowledged, {} unanswered ({} had happened, {} had not), {} refused, {} retries, {} holds, {:?}",
        model.acked,
        in_flight_at_kill,
        model.resolved_happened,
        model.resolved_not_happened,
        model.refused.len(),
        model.retried,
        model.holds.len(),
        started.elapsed()
    );
    let s = stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    eprintln!(
        "crash test transfers: {} happened ({} completed, {} failed and refunded); {} answered 201 \
         and {} answered failed under load; {} unanswered at a kill ({} had happened, {} had \
         not); {} finished by the recovery; {} verified after the restart that followed them \
         (GET, both histories, key lookup, conservation, in-flight gauge 0), {} rechecked at \
         the end",
        s.transfers,
        s.transfers - s.transfers_failed,
        s.transfers_failed,
        s.transfers_acknowledged,
        s.transfers_failed_answered,
        s.transfers_unanswered,
        s.transfers_resolved_happened,
        s.transfers_resolved_not_happened,
        s.transfers_finished_by_recovery,
        s.transfers_verified,
        s.transfers_rechecked_at_end,
    );
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged_and_applies_nothing_twice() {
    // Goal: across repeated SIGKILLs under concurrent load, the recovered state is exactly what the acknowledged (and looked-up unanswered) operations imply.
    let root = tempfile::tempdir().expect("temp dir");
    let stats = Arc::new(Mutex::new(CrashStats::default()));
    run_kill_cycles(
        default_bin(),
        KILL_CYCLES,
        seed(),
        root.path().to_path_buf(),
        stats.clone(),
    )
    .await;
    let stats = stats.lock().expect("stats").clone();
    assert_eq!(stats.cycles, KILL_CYCLES);
    assert!(
        stats.transfers > stats.transfers_failed && stats.transfers_failed > 0,
        "the load should have made completed and failed transfers: {stats:?}"
    );
    assert_eq!(
        stats.transfers_verified, stats.transfers,
        "every transfer should have been verified after the restart that followed it"
    );
    assert_eq!(stats.transfers_rechecked_at_end, stats.transfers);
}

/// `COFFER_SOAK_CYCLES`, or the default.
fn soak_cycles() -> usize {
    let Ok(text) = std::env::var("COFFER_SOAK_CYCLES") else {
        return SOAK_CYCLES_DEFAULT;
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=SOAK_CYCLES_MAX).contains(&n) => n,
        _ => panic!(
            "COFFER_SOAK_CYCLES must be a whole number in 1..={SOAK_CYCLES_MAX}, got {text:?}"
        ),
    }
}

/// The message of a task's panic (cut to a few thousand characters: some carry a server log).
fn panic_message(error: tokio::task::JoinError) -> String {
    const MAX_CHARS: usize = 4000;
    let message = match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".to_string()),
        Err(error) => error.to_string(),
    };
    if message.chars().count() > MAX_CHARS {
        let cut: String = message.chars().take(MAX_CHARS).collect();
        format!("{cut}...")
    } else {
        message
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: scripts/crash-soak.sh [CYCLES] runs it"]
async fn soak() {
    // Goal: the crash test's kill cycle, COFFER_SOAK_CYCLES times in a row on one data directory, loses no acknowledged operation; the figures go to COFFER_SOAK_SUMMARY as JSON.
    let started = Instant::now();
    let cycles = soak_cycles();
    let bin = std::env::var_os("COFFER_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_bin);
    assert!(bin.is_file(), "COFFER_BIN {} is not a file", bin.display());
    let summary_path = std::env::var_os("COFFER_SOAK_SUMMARY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let seed = seed();
    let root = tempfile::tempdir().expect("temp dir");
    let stats = Arc::new(Mutex::new(CrashStats::default()));
    let deadline = SOAK_DEADLINE_BASE + SOAK_DEADLINE_PER_CYCLE * cycles as u32;
    // A task of its own, so that a panic in it is caught here and still summarized; aborting
    // it at the deadline drops (SIGKILLs) its server.
    let mut run = tokio::spawn(run_kill_cycles(
        bin.clone(),
        cycles,
        seed,
        root.path().to_path_buf(),
        stats.clone(),
    ));
    let (result, failure) = match tokio::time::timeout(deadline, &mut run).await {
        Ok(Ok(())) => ("ok", None),
        Ok(Err(error)) => ("failed", Some(panic_message(error))),
        Err(_) => {
            run.abort();
            let _ = run.await;
            (
                "timed_out",
                Some(format!("the soak did not finish within {deadline:?}")),
            )
        }
    };
    let stats = stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let result = if stats.lost > 0 { "lost" } else { result };
    // A failed run keeps its data directory and server logs for a post-mortem.
    let kept = if result == "ok" {
        None
    } else {
        Some(root.keep())
    };
    // Failed key lookups are listed one by one already; any other failure is the panic.
    let mut failures = stats.failures.clone();
    if let Some(failure) = &failure {
        if failures.is_empty() {
            failures.push(failure.clone());
        }
    }
    let summary = json!({
        "result": result,
        "cycles_requested": cycles,
        "cycles": stats.cycles,
        "binary": bin.display().to_string(),
        "seed": stats.seed,
        "requests": stats.requests,
        "acknowledged": stats.acknowledged,
        "acknowledged_verified": stats.acknowledged_verified,
        "refused": stats.refused,
        "unanswered": stats.unanswered,
        "unanswered_resolved": stats.resolved_happened + stats.resolved_not_happened,
        "resolved_happened": stats.resolved_happened,
        "resolved_not_happened": stats.resolved_not_happened,
        "retried": stats.retried,
        "holds": stats.holds,
        "rechecked_at_end": stats.rechecked_at_end,
        "transfers": stats.transfers,
        "transfers_completed": stats.transfers - stats.transfers_failed,
        "transfers_failed_refunded": stats.transfers_failed,
        "transfers_acknowledged": stats.transfers_acknowledged,
        "transfers_failed_answered": stats.transfers_failed_answered,
        "transfers_unanswered": stats.transfers_unanswered,
        "transfers_resolved_happened": stats.transfers_resolved_happened,
        "transfers_resolved_not_happened": stats.transfers_resolved_not_happened,
        "transfers_finished_by_recovery": stats.transfers_finished_by_recovery,
        "transfers_verified": stats.transfers_verified,
        "transfers_rechecked_at_end": stats.transfers_rechecked_at_end,
        "lost": stats.lost,
        "failures": failures,
        "kept_dir": kept.as_ref().map(|p| p.display().to_string()),
        "duration_secs": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    let text = serde_json::to_string_pretty(&summary).expect("summary as JSON");
    match &summary_path {
        Some(path) => std::fs::write(path, format!("{text}\n"))
            .unwrap_or_else(|e| panic!("write the summary to {}: {e}", path.display())),
        None => println!("{text}"),
    }
    assert_eq!(
        stats.lost, 0,
        "{} acknowledged operation(s) lost; data kept in {kept:?}",
        stats.lost
    );
    if let Some(failure) = failure {
        panic!("the crash soak failed ({result}); data kept in {kept:?}: {failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_with_status_zero_and_loses_nothing() {
    // Goal: SIGTERM under load ends the process with exit status 0 and every acknowledged operation is there after a restart.
    let seed = seed();
    println!("sigterm test seed: {seed}");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().expect("temp dir");
    let data = root.path().join("data");
    let logs = root.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");

    let mut model = Model::new();
    let bin = default_bin();
    let mut server = start_server(&bin, &data, &logs, &[]).await;
    create_accounts(&server, &mut model).await;
    let sent = run_load_until(&mut server, &model, 0, &mut rng, |s| s.sigterm()).await;
    let exit = server.wait_exit(EXIT_TIMEOUT).await;
    let log = server.log_text();
    let status =
        exit.unwrap_or_else(|| panic!("no exit within {EXIT_TIMEOUT:?} of SIGTERM; log:\n{log}"));
    assert!(
        status.success(),
        "SIGTERM should end coffer with status 0, got {status:?}; log:\n{log}"
    );
    drop(server);
    let (unanswered, acked_sample) = record_answers(&mut model, sent, &mut rng);
    assert!(model.acked > 0, "nothing was acknowledged before SIGTERM");
    println!(
        "sigterm test: {} acknowledged, {} unanswered",
        model.acked,
        unanswered.len()
    );

    let server = start_server(&bin, &data, &logs, &[]).await;
    let log = server.log_text();
    assert!(
        !log.contains("torn_tail_cut=true"),
        "a graceful shutdown should leave no torn tail; log:\n{log}"
    );
    let (keys, transfers_verified) = verify_after_restart(
        &server,
        &mut model,
        unanswered,
        acked_sample,
        Marks::default(),
        "after SIGTERM",
    )
    .await;
    keys.assert_ok();
    assert_eq!(transfers_verified, model.transfers.len());
    assert_eq!(
        finished_by_recovery(&log),
        0,
        "a graceful shutdown should leave no transfer half done; log:\n{log}"
    );
    // In-flight requests are finished before the exit, so a request that got no answer
    // never reached the engine.
    assert_eq!(
        model.resolved_happened, 0,
        "a request applied during the graceful shutdown was never answered"
    );
}
