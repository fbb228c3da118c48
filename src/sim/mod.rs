//! Deterministic simulation: the real engine on a simulated disk, driven by one source of
//! choices (a seed, or a fuzzer's bytes), with crashes and storage faults injected at
//! random, and every answer checked against a reference model fed only what was
//! acknowledged.
//!
//! Everything runs on one thread: a current-thread tokio runtime for the engine's actors and
//! callers, the WAL in [`WriterMode::Manual`] so the driver decides when each group commit
//! happens, a [`ManualClock`], fixed id seeds, and a [`SimStorage`] that crashes and fails
//! only when told to. The same choices therefore give the same run, byte for byte: a failing
//! seed reproduces exactly.
//!
//! What a run does, step by step (each choice drawn from the source):
//! - clients submit requests (single or batched, valid and invalid, fresh keys, retries of
//!   earlier keys with the same or a different request), transfers between the accounts
//!   (completed, refused, failed at the destination's balance limit and refunded) and open
//!   accounts;
//! - the driver lets tasks run, and commits the WAL (one group commit for what is queued);
//! - the clock moves and due holds expire;
//! - a write or sync fails (the engine must stop writing and acknowledge nothing more);
//! - the machine crashes (unsynced writes survive as a prefix, the last one torn at any
//!   byte), or shuts down gracefully; recovery runs, sometimes with a flipped bit on a read
//!   (which it must detect);
//! - after a crash, every request that was not answered is sent again with its key, in the
//!   order first sent: whether it survived or not, the model then agrees with the engine.
//!   Both halves of a transfer are queued before one group commit, so a crash can keep its
//!   debit and lose its credit: recovery must then finish it (credit, or refund), and the
//!   model learns the debit and the end each at its place in the log.
//!
//! Checked: every answer against the model (applied, refused with the right error, replayed
//! with the byte-identical receipt); at quiet points, every account, hold, history,
//! idempotency entry and transfer against the model (invariants 1-4 of DESIGN.md), money
//! conservation over all accounts, no transfer half done; replay of the log (accounts and
//! transfer book) equals the live state; nothing acknowledged is lost and nothing is applied twice
//! (invariant 5: a lost or doubled operation shows as a wrong balance, seq or receipt).

pub mod model;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::{Clock, ManualClock};
use crate::domain::{
    Account, AccountId, AccountView, Currency, FastMap, IdempotencyKey, Metadata, Receipt, Request,
    Retention, TransferBook, TransferRecord, TransferStatus, TxKind, AMOUNT_MAX,
    HOLD_EXPIRES_SECS_MAX,
};
use crate::engine::{EngineError, Executed, TransferOutcome};
use crate::storage::sim::{Fault, SimStorage};
use crate::wal::WriterMode;
use crate::{Engine, EngineConfig};
use model::{
    check_conservation, check_history, check_holds, check_receipt, check_view, different, ensure,
    ensure_eq, normalize, Expect, Model, TransferEnd,
};

/// A source of choices.
pub trait Choices {
    /// A number below `n` (0 when `n` is 0 or 1).
    fn below(&mut self, n: u64) -> u64;
    /// Whether the source has run dry (a fuzzer's input is finite; a seed never is).
    fn exhausted(&self) -> bool {
        false
    }
}

/// Choices from a seed (SplitMix64: tiny, fast, and the same on every platform forever,
/// which is what "a seed reproduces" needs).
#[derive(Debug, Clone)]
pub struct SeedChoices {
    state: u64,
}

impl SeedChoices {
    /// Choices from `seed`.
    pub fn new(seed: u64) -> SeedChoices {
        SeedChoices { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Choices for SeedChoices {
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Choices read from bytes (a fuzzer's input): one byte per choice below 256, eight above;
/// zeros once the bytes run out.
#[derive(Debug, Clone)]
pub struct ByteChoices<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteChoices<'a> {
    /// Choices from `bytes`.
    pub fn new(bytes: &'a [u8]) -> ByteChoices<'a> {
        ByteChoices { bytes }
    }
}

impl Choices for ByteChoices<'_> {
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let width = if n <= 256 { 1 } else { 8 };
        let take = width.min(self.bytes.len());
        let (head, rest) = self.bytes.split_at(take);
        self.bytes = rest;
        let value = head.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        value % n
    }

    fn exhausted(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// How big a run is.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Steps to take (a fuzzer's input may end sooner).
    pub steps: u32,
    /// WAL segment size: small, so runs cross many segment boundaries.
    pub segment_bytes: u64,
}

impl SimOptions {
    /// What the `crash_recovery` fuzz target runs: shorter runs, smaller segments.
    pub fn fuzz() -> SimOptions {
        SimOptions {
            steps: 150,
            segment_bytes: 2048,
        }
    }
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            steps: 300,
            segment_bytes: 4096,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SimReport {
    /// Steps taken.
    pub steps: u64,
    /// Requests applied and acknowledged.
    pub applied: u64,
    /// Requests refused (and acknowledged as refused).
    pub refused: u64,
    /// Requests answered as replays of their key.
    pub replayed: u64,
    /// Group commits.
    pub commits: u64,
    /// Crashes (power loss).
    pub crashes: u64,
    /// Graceful restarts.
    pub restarts: u64,
    /// Failed writes or syncs injected.
    pub storage_faults: u64,
    /// Bit flips on read that recovery detected.
    pub read_flips_detected: u64,
    /// Requests left unanswered by a crash and sent again after recovery.
    pub resent_after_crash: u64,
    /// Holds expired.
    pub expired: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Full state checks against the model and against a replay of the log.
    pub checks: u64,
    /// Transfers that ended completed (answered, or learned after a crash).
    pub transfers_completed: u64,
    /// Transfers that ended failed, the source refunded.
    pub transfers_failed: u64,
    /// Transfers a crash left half done (debited, not credited) that recovery finished.
    pub transfers_finished_by_recovery: u64,
}

impl SimReport {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &SimReport) {
        self.steps += other.steps;
        self.applied += other.applied;
        self.refused += other.refused;
        self.replayed += other.replayed;
        self.commits += other.commits;
        self.crashes += other.crashes;
        self.restarts += other.restarts;
        self.storage_faults += other.storage_faults;
        self.read_flips_detected += other.read_flips_detected;
        self.resent_after_crash += other.resent_after_crash;
        self.expired += other.expired;
        self.snapshots += other.snapshots;
        self.checks += other.checks;
        self.transfers_completed += other.transfers_completed;
        self.transfers_failed += other.transfers_failed;
        self.transfers_finished_by_recovery += other.transfers_finished_by_recovery;
    }
}

/// Runs one simulation from a seed. The error names the seed and what went wrong.
pub fn run_seed(seed: u64, options: &SimOptions) -> Result<SimReport, String> {
    let mut choices = SeedChoices::new(seed);
    run(&mut choices, options).map_err(|error| format!("seed {seed}: {error}"))
}

/// Runs one simulation from a source of choices.
pub fn run(choices: &mut dyn Choices, options: &SimOptions) -> Result<SimReport, String> {
    let mut sim = Sim {
        choices,
        options: options.clone(),
        disk: SimStorage::new(),
        clock: Arc::new(ManualClock::new(T_START)),
        life: None,
        lives: 0,
        accounts: BTreeMap::new(),
        receipts: HashMap::new(),
        sent: Vec::new(),
        inflight: VecDeque::new(),
        unresolved: Vec::new(),
        transfers: HashMap::new(),
        in_flight: BTreeMap::new(),
        recovered_lsn: 0,
        next_key: 0,
        report: SimReport::default(),
        trace: std::env::var_os("COFFER_SIM_TRACE").is_some(),
    };
    sim.run()?;
    Ok(sim.report)
}

/// Start of the simulated clock (2026-01-01T00:00:00Z).
const T_START: u64 = 1_767_225_600_000;
/// Where the simulated data directory is.
const DATA_DIR: &str = "/sim/data";
/// The account names clients use; some are never opened (requests to them get 404).
const NAMES: [&str; 5] = ["a0", "a1", "a2", "a3", "a4"];
/// A short history, so that runs page past what is kept; keys and ended holds forever, so
/// that the model knows what is remembered.
const SIM_RETENTION: Retention = Retention {
    history: 16,
    ttl_ms: u64::MAX,
};
/// Requests in flight at most at once.
const INFLIGHT_MAX: usize = 6;
/// Group commits a drain may take before the run is declared stuck.
const DRAIN_COMMITS_MAX: usize = 64;

/// A request as a client sends it: every one has a key, so that one left unanswered by a
/// crash can be sent again safely.
#[derive(Debug, Clone)]
struct Op {
    account: String,
    key: String,
    request: Request,
}

/// What one client task does.
#[derive(Debug, Clone)]
enum Job {
    Open {
        account: String,
        currency: String,
        overdraft: u64,
    },
    Ops {
        ops: Vec<Op>,
        /// Through `execute_batch` (else `execute`, one op).
        batch: bool,
    },
    /// `Engine::transfer`: `op.account` is the source (the key's scope).
    Transfer { op: Op },
}

impl Job {
    /// Whether the job names this account.
    fn touches(&self, name: &str) -> bool {
        match self {
            Job::Open { account, .. } => account == name,
            Job::Ops { ops, .. } => ops.iter().any(|op| op.account == name),
            Job::Transfer { op } => {
                op.account == name
                    || matches!(&op.request, Request::Transfer { to, .. } if to.as_str() == name)
            }
        }
    }
}

enum Output {
    Open(Result<(bool, AccountView), EngineError>),
    Ops(Vec<Result<Executed, EngineError>>),
    Transfer(Result<TransferOutcome, EngineError>),
}

/// What recovery shows of an unanswered request, learned in log order.
enum Learned {
    Op(Op, Arc<Receipt>),
    /// A transfer's debit survived.
    TransferOut(Op, Arc<TransferRecord>),
    /// A transfer ended (in the log before the crash, or finished by recovery).
    TransferEnd(Arc<TransferRecord>),
}

struct InFlight {
    job: Job,
    handle: JoinHandle<Output>,
    /// Sent again after a crash: it may have been applied before.
    resent: bool,
}

struct Acct {
    currency: String,
    model: Model,
}

/// One run of the process: a runtime and the engine in it.
struct Life {
    rt: Runtime,
    engine: Engine,
}

struct Sim<'c> {
    choices: &'c mut dyn Choices,
    options: SimOptions,
    disk: SimStorage,
    clock: Arc<ManualClock>,
    life: Option<Life>,
    lives: u64,
    accounts: BTreeMap<String, Acct>,
    /// Acknowledged receipts by (account, key).
    receipts: HashMap<(String, String), Arc<Receipt>>,
    /// Every keyed request sent, for retries.
    sent: Vec<Op>,
    inflight: VecDeque<InFlight>,
    /// Jobs a crash or a storage failure left unanswered, in the order first sent.
    unresolved: Vec<Job>,
    /// Transfers acknowledged or learned, as they ended, by (source, key).
    transfers: HashMap<(String, String), Arc<TransferRecord>>,
    /// Transfers the model has debited and not ended: id to (from, to, amount). Only a
    /// transfer whose refund does not fit either (after a crash) stays here.
    in_flight: BTreeMap<Uuid, (String, String, u64)>,
    /// The last LSN recovery found in the log (what it writes itself comes after).
    recovered_lsn: u64,
    next_key: u64,
    report: SimReport,
    /// Print each step to stderr (`COFFER_SIM_TRACE=1`).
    trace: bool,
}

impl Sim<'_> {
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("sim: {}", what());
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.choices.below(n)
    }

    fn life(&self) -> Result<&Life, String> {
        self.life
            .as_ref()
            .ok_or_else(|| "no engine running".to_string())
    }

    fn engine(&self) -> Result<Engine, String> {
        Ok(self.life()?.engine.clone())
    }

    fn run(&mut self) -> Result<(), String> {
        self.boot()?;
        for index in 0..2 {
            self.submit_open(Some(index))?;
        }
        self.drain()?;
        for _ in 0..self.options.steps {
            if self.choices.exhausted() {
                break;
            }
            self.report.steps += 1;
            match self.below(100) {
                0..=39 if self.inflight.len() < INFLIGHT_MAX => self.submit_ops()?,
                0..=39 => self.commit()?,
                40..=49 => {
                    let n = 1 + self.below(8) as usize;
                    self.run_tasks(n)?;
                }
                50..=71 => self.commit()?,
                72..=77 => self.tick()?,
                78..=80 => self.storage_fault()?,
                81..=85 => self.crash()?,
                86..=89 if self.inflight.len() < INFLIGHT_MAX => self.submit_open(None)?,
                86..=89 => self.commit()?,
                90..=92 => self.restart()?,
                93..=95 => self.snapshot()?,
                _ => {
                    self.drain()?;
                    self.check_all()?;
                }
            }
            self.collect()?;
        }
        self.drain()?;
        self.check_all()?;
        self.crash()
    }

    // -----------------------------------------------------------------------------------
    // Process lifecycle
    // -----------------------------------------------------------------------------------

    /// Starts the engine on the disk as it is: recovery (with, sometimes, a flipped bit on
    /// a read, which it must detect), then the requests a crash left unanswered.
    fn boot(&mut self) -> Result<(), String> {
        self.lives += 1;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let mut config = EngineConfig::new(DATA_DIR);
        config.segment_bytes_max = self.options.segment_bytes;
        config.mailbox_capacity = 64;
        config.actors = 1 + self.below(2) as usize;
        config.clock = self.clock.clone();
        config.storage = Arc::new(self.disk.clone());
        config.wal_writer = WriterMode::Manual;
        config.expiry_sweep = None;
        config.id_seed = Some(self.lives << 24);
        config.retention = SIM_RETENTION;
        config.snapshot_every_records = None;
        config.snapshot_interval = None;
        let flip = self.below(8) == 0;
        if flip {
            let bit = self.below(1 << 20);
            self.disk.arm(Fault::ReadFlip { bit });
        }
        let faults_before = self.disk.stats().faults;
        let opened = {
            let _context = rt.enter();
            Engine::open(config.clone())
        };
        let flipped = self.disk.stats().faults > faults_before;
        self.disk.disarm();
        let (engine, recovered) = match opened {
            // A flipped bit in a snapshot is detected by skipping it for the one before.
            Ok((engine, report)) if flipped && report.damaged_snapshots > 0 => {
                self.report.read_flips_detected += 1;
                (engine, report)
            }
            Ok((engine, _)) if flipped => {
                drop(engine);
                return Err("recovery read a flipped bit and did not notice".into());
            }
            Ok(opened) => opened,
            Err(_) if flipped => {
                self.report.read_flips_detected += 1;
                let _context = rt.enter();
                Engine::open(config)
                    .map_err(|e| format!("recovery failed after a transient read fault: {e}"))?
            }
            Err(error) => return Err(format!("recovery failed: {error}")),
        };
        self.recovered_lsn = recovered.last_lsn;
        self.life = Some(Life { rt, engine });
        let engine = self.engine()?;
        let recovery = self.spawn_task(async move { engine.finish_recovery().await })?;
        self.pump(recovery)?
            .map_err(|e| format!("finish_recovery: {e}"))?;
        let unresolved = std::mem::take(&mut self.unresolved);
        self.report.resent_after_crash += unresolved.len() as u64;
        self.learn_survivors(&unresolved)?;
        // No transfer is half done now; money is conserved.
        self.check_conservation()?;
        for job in unresolved {
            self.spawn_in_order(job, true)?;
        }
        self.drain()?;
        ensure!(
            self.unresolved.is_empty(),
            "requests sent again after recovery failed: {:?}",
            self.unresolved
        );
        self.check_all()
    }

    /// Teaches the model which unanswered requests survived the crash: those whose key is
    /// remembered. They are learned in LSN order, the order the actors applied them (a key
    /// sent twice may have been refused the first time and applied the second, after a
    /// credit sent in between); each must be exactly what the model computes at that point.
    /// A refused request left no trace either way. Sent again afterwards, a survivor must
    /// come back as a replay and a lost one be applied fresh. A transfer whose debit survived
    /// is learned in two places of that order: its debit, and its end (the credit or refund,
    /// in the log before the crash, or written by recovery after everything replayed), read
    /// from the transfer book; recovery must have ended it unless neither side can take the
    /// money.
    fn learn_survivors(&mut self, unresolved: &[Job]) -> Result<(), String> {
        let engine = self.engine()?;
        // Accounts first: every change of an account comes after its opening.
        for job in unresolved {
            let Job::Open {
                account,
                currency,
                overdraft,
            } = job
            else {
                continue;
            };
            if self.accounts.contains_key(account) {
                continue;
            }
            let id = AccountId::parse(account).map_err(|e| e.reason)?;
            if let Ok(view) = self.life()?.rt.block_on(engine.account(&id)) {
                if view.currency.as_str() == currency && view.overdraft_limit == *overdraft {
                    self.trace(|| format!("survived: open {account}"));
                    self.accounts.insert(
                        account.clone(),
                        Acct {
                            currency: currency.clone(),
                            model: Model::new(*overdraft),
                        },
                    );
                }
            }
        }
        let mut survivors: BTreeMap<u64, Learned> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        // Transfers whose refund did not fit before: recovery tried them again.
        for id in self.in_flight.keys() {
            let record = self
                .life()?
                .rt
                .block_on(engine.transfer_record(id))
                .map_err(|e| format!("transfer {id} in flight: {e}"))?;
            if record.end_lsn != 0 {
                survivors.insert(record.end_lsn, Learned::TransferEnd(record));
            }
        }
        for job in unresolved {
            let ops = match job {
                Job::Ops { ops, .. } => ops.as_slice(),
                Job::Transfer { op } => std::slice::from_ref(op),
                Job::Open { .. } => continue,
            };
            for op in ops {
                let Some(acct) = self.accounts.get(&op.account) else {
                    continue;
                };
                if acct.model.keys.contains_key(&op.key)
                    || !seen.insert((op.account.clone(), op.key.clone()))
                {
                    continue;
                }
                let id = AccountId::parse(&op.account).map_err(|e| e.reason)?;
                let key = IdempotencyKey::parse(&op.key).map_err(|e| e.reason)?;
                let entry = self
                    .life()?
                    .rt
                    .block_on(engine.idempotency_entry(&id, &key))
                    .map_err(|e| e.to_string())?;
                let Some(entry) = entry else { continue };
                if entry.request != op.request {
                    // Another request under the same key survived: it comes up in turn.
                    seen.remove(&(op.account.clone(), op.key.clone()));
                    continue;
                }
                let transfer = match (&op.request, entry.receipt.transaction.transfer_id) {
                    (Request::Transfer { .. }, Some(id)) => id,
                    (Request::Transfer { .. }, None) => {
                        return Err(format!("{op:?}: remembered without a transfer id"))
                    }
                    _ => {
                        survivors.insert(entry.lsn, Learned::Op(op.clone(), entry.receipt));
                        continue;
                    }
                };
                // The debit survived. Recovery has finished the transfer: its end is in
                // the log, before the crash or just after recovery.
                let record = self
                    .life()?
                    .rt
                    .block_on(engine.transfer_record(&transfer))
                    .map_err(|e| format!("{op:?}: its transfer {transfer}: {e}"))?;
                ensure_eq!(record.out_lsn, entry.lsn, "the debit's LSN in the book");
                if record.end_lsn != 0 {
                    survivors.insert(record.end_lsn, Learned::TransferEnd(record.clone()));
                }
                survivors.insert(entry.lsn, Learned::TransferOut(op.clone(), record));
            }
        }
        let recovered_lsn = self.recovered_lsn;
        for (lsn, learned) in survivors {
            match learned {
                Learned::Op(op, receipt) => {
                    self.trace(|| format!("survived: {op:?}"));
                    let executed = Executed {
                        receipt,
                        replayed: false,
                    };
                    self.verify_op(op, Ok(executed))
                        .map_err(|e| format!("a request that survived a crash: {e}"))?;
                }
                Learned::TransferOut(op, record) => {
                    self.trace(|| format!("survived: {op:?}"));
                    self.learn_transfer_out(&op, record)
                        .map_err(|e| format!("a transfer that survived a crash: {e}"))?;
                }
                Learned::TransferEnd(record) => {
                    let by_recovery = lsn > recovered_lsn;
                    self.trace(|| {
                        format!(
                            "transfer {} ended {:?}{}",
                            record.id,
                            record.status,
                            if by_recovery { " by recovery" } else { "" }
                        )
                    });
                    if by_recovery {
                        self.report.transfers_finished_by_recovery += 1;
                    }
                    self.learn_transfer_end(record)?;
                }
            }
        }
        // What is still in flight is what recovery could not finish either.
        for (id, (from, to, amount)) in &self.in_flight {
            let (from, to) = (self.acct(from)?, self.acct(to)?);
            ensure_eq!(
                TransferEnd::decide(&from.model, &to.model, *amount),
                TransferEnd::Stuck,
                format!("transfer {id} left half done by recovery")
            );
        }
        Ok(())
    }

    fn acct(&self, name: &str) -> Result<&Acct, String> {
        self.accounts
            .get(name)
            .ok_or_else(|| format!("account {name} unknown to the model"))
    }

    fn acct_mut(&mut self, name: &str) -> Result<&mut Acct, String> {
        self.accounts
            .get_mut(name)
            .ok_or_else(|| format!("account {name} unknown to the model"))
    }

    /// A transfer's debit, acknowledged or learned: the model must accept it (the source's
    /// rules), and the record show the source just after it.
    fn learn_transfer_out(&mut self, op: &Op, record: Arc<TransferRecord>) -> Result<(), String> {
        let Request::Transfer { to, .. } = &op.request else {
            return Err(format!("{op:?} is not a transfer"));
        };
        let to_currency =
            Currency::parse(&self.acct(to.as_str())?.currency).map_err(|e| e.reason)?;
        let acct = self.acct_mut(&op.account)?;
        let from_currency = Currency::parse(&acct.currency).map_err(|e| e.reason)?;
        let expect = acct.model.evaluate_transfer(
            Some(&op.key),
            &op.request,
            op.account == to.as_str(),
            &from_currency,
            &to_currency,
        );
        ensure!(
            matches!(expect, Expect::Apply),
            "{op:?} debited, the model expected {expect:?}"
        );
        let (kind, amount) = acct.model.commit(Some(&op.key), &op.request, None, 0);
        ensure_eq!(kind, TxKind::TransferOut, "kind");
        check_view(&record.from_account, &acct.model)
            .map_err(|e| format!("{op:?}: the source after the debit: {e}"))?;
        ensure_eq!(record.from.as_str(), op.account.as_str(), "transfer source");
        ensure_eq!(&record.to, to, "transfer destination");
        ensure_eq!(record.amount.get(), amount, "transfer amount");
        ensure_eq!(
            record.key.as_ref().map(|k| k.as_str()),
            Some(op.key.as_str()),
            "transfer key"
        );
        self.in_flight.insert(
            record.id,
            (op.account.clone(), to.as_str().to_string(), amount),
        );
        self.transfers
            .insert((op.account.clone(), op.key.clone()), record);
        Ok(())
    }

    /// A transfer's end, answered or learned: the model decides it from the two accounts as
    /// they are at that point of the log (credit, else refund, else still in flight).
    /// A refusal the model expected: the same one, once normalized.
    fn refused(
        &mut self,
        op: &impl std::fmt::Debug,
        want: crate::domain::OpError,
        got: crate::domain::OpError,
    ) -> Result<(), String> {
        ensure_eq!(
            normalize(want),
            normalize(got),
            format!("refusal of {op:?}")
        );
        self.report.refused += 1;
        Ok(())
    }

    fn learn_transfer_end(&mut self, record: Arc<TransferRecord>) -> Result<(), String> {
        let (from, to, amount) = self
            .in_flight
            .get(&record.id)
            .cloned()
            .ok_or_else(|| format!("transfer {} ended, never debited", record.id))?;
        let end = TransferEnd::decide(&self.acct(&from)?.model, &self.acct(&to)?.model, amount);
        ensure_eq!(
            record.status,
            end.status(),
            format!("how transfer {} ended", record.id)
        );
        match end {
            TransferEnd::Completed => {
                let to_model = &mut self.acct_mut(&to)?.model;
                to_model.receive(amount);
                let view = record
                    .to_account
                    .as_ref()
                    .ok_or("a completed transfer without its destination")?;
                check_view(view, to_model)
                    .map_err(|e| format!("transfer {}: the destination: {e}", record.id))?;
                self.report.transfers_completed += 1;
            }
            TransferEnd::Refunded => {
                self.acct_mut(&from)?.model.receive(amount);
                ensure!(
                    record.to_account.is_none(),
                    "a failed transfer with a destination"
                );
                self.report.transfers_failed += 1;
            }
            TransferEnd::Stuck => return Ok(()),
        }
        self.in_flight.remove(&record.id);
        if let Some(key) = record.key.as_ref() {
            self.transfers
                .insert((from, key.as_str().to_string()), record.clone());
        }
        Ok(())
    }

    /// The process dies: its tasks and the engine are dropped without another write. What
    /// was in flight is unanswered.
    fn kill(&mut self) {
        while let Some(flight) = self.inflight.pop_front() {
            self.unresolved.push(flight.job);
        }
        if let Some(life) = self.life.take() {
            drop(life.engine);
            drop(life.rt);
        }
    }

    /// Power loss at this instant, then recovery.
    fn crash(&mut self) -> Result<(), String> {
        self.trace(|| "crash".to_string());
        self.report.crashes += 1;
        let choices = &mut *self.choices;
        self.disk.crash(&mut |n| choices.below(n));
        self.kill();
        self.boot()
    }

    /// A graceful shutdown (everything queued is written first), then a restart.
    fn restart(&mut self) -> Result<(), String> {
        self.run_tasks(4)?;
        self.engine()?.shutdown();
        self.run_tasks(8)?;
        self.collect()?;
        self.report.restarts += 1;
        self.trace(|| "restart".to_string());
        self.kill();
        self.boot()
    }

    /// A write or sync fails during a group commit: nothing of it may be acknowledged,
    /// and the engine must refuse every later write. Then the machine goes down.
    fn storage_fault(&mut self) -> Result<(), String> {
        self.run_tasks(4)?;
        let engine = self.engine()?;
        if engine.wal_queued_bytes() == 0 {
            return self.crash();
        }
        let fault = if self.below(2) == 0 {
            Fault::Write {
                written: self.below(600) as usize,
            }
        } else {
            Fault::Sync
        };
        self.disk.arm(fault);
        self.trace(|| format!("fault: {fault:?}"));
        self.report.storage_faults += 1;
        ensure!(
            engine.commit_wal().is_err(),
            "a group commit with a failing {fault:?} reported success"
        );
        ensure!(
            engine.storage_failed(),
            "the engine did not notice {fault:?}"
        );
        self.run_tasks(8)?;
        self.collect()?;
        // A write after the failure must be refused, never acknowledged.
        if let Some(name) = self.accounts.keys().next().cloned() {
            let op = self.fresh_op(name, credit(1));
            self.spawn(
                Job::Ops {
                    ops: vec![op],
                    batch: false,
                },
                false,
            )?;
            self.run_tasks(8)?;
            let _ = engine.commit_wal();
            self.run_tasks(8)?;
            self.collect()?;
        }
        self.crash()
    }

    /// A snapshot while nothing is in flight; sometimes a write or sync of it fails, and
    /// sometimes the machine crashes right after (a crash in the middle of writing it).
    fn snapshot(&mut self) -> Result<(), String> {
        self.drain()?;
        let fault = match self.below(6) {
            0 => Some(Fault::Write {
                written: self.below(4096) as usize,
            }),
            1 => Some(Fault::Sync),
            _ => None,
        };
        if let Some(fault) = fault {
            self.disk.arm(fault);
        }
        let engine = self.engine()?;
        let taking = self.spawn_task(async move { engine.snapshot().await })?;
        let result = self.pump(taking)?;
        self.disk.disarm();
        self.trace(|| format!("snapshot (fault {fault:?}): {result:?}"));
        match (fault, result) {
            (None, Err(error)) => return Err(format!("snapshot failed without a fault: {error}")),
            (_, Ok(_)) => self.report.snapshots += 1,
            (Some(_), Err(_)) => self.report.storage_faults += 1,
        }
        ensure!(
            !self.engine()?.storage_failed(),
            "a failed snapshot stopped the WAL"
        );
        if fault.is_some() && self.below(2) == 0 {
            return self.crash();
        }
        self.check_all()
    }

    // -----------------------------------------------------------------------------------
    // Running tasks and commits
    // -----------------------------------------------------------------------------------

    fn run_tasks(&mut self, turns: usize) -> Result<(), String> {
        self.life()?.rt.block_on(async {
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
        });
        Ok(())
    }

    fn spawn_task<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<JoinHandle<T>, String> {
        Ok(self.life()?.rt.spawn(future))
    }

    /// Runs a task to its end, committing the WAL whenever it waits.
    fn pump<T>(&mut self, handle: JoinHandle<T>) -> Result<T, String> {
        for _ in 0..DRAIN_COMMITS_MAX {
            self.run_tasks(8)?;
            if handle.is_finished() {
                return self
                    .life()?
                    .rt
                    .block_on(handle)
                    .map_err(|e| format!("task failed: {e}"));
            }
            self.engine()?
                .commit_wal()
                .map_err(|e| format!("commit: {e}"))?;
        }
        Err("a task did not finish".into())
    }

    /// One group commit of whatever is queued, then the answers it releases.
    fn commit(&mut self) -> Result<(), String> {
        self.run_tasks(4)?;
        if self
            .engine()?
            .commit_wal()
            .map_err(|e| format!("commit without a fault failed: {e}"))?
        {
            self.trace(|| "commit".to_string());
            self.report.commits += 1;
        }
        self.run_tasks(8)?;
        self.collect()
    }

    /// Commits until every request in flight is answered.
    fn drain(&mut self) -> Result<(), String> {
        for _ in 0..DRAIN_COMMITS_MAX {
            self.commit()?;
            if self.inflight.is_empty() && self.engine()?.wal_queued_bytes() == 0 {
                return Ok(());
            }
        }
        Err(format!(
            "{} requests still unanswered after {DRAIN_COMMITS_MAX} commits",
            self.inflight.len()
        ))
    }

    /// The clock moves; every due hold expires, in the model and in the engine.
    fn tick(&mut self) -> Result<(), String> {
        self.drain()?;
        let secs = [1, 5, 60, 600, 3600, 7200][self.below(6) as usize];
        self.clock.advance_ms(secs * 1000);
        self.trace(|| format!("clock +{secs}s"));
        let now = self.clock.now_ms();
        let mut due = 0;
        for acct in self.accounts.values_mut() {
            for hold in acct.model.due(now) {
                acct.model.expire(&hold);
                due += 1;
            }
        }
        let engine = self.engine()?;
        let expiring = self.spawn_task(async move { engine.expire_due().await })?;
        let expired = self
            .pump(expiring)?
            .map_err(|e| format!("expire_due: {e}"))?;
        ensure_eq!(expired as u64, due, "holds expired");
        self.report.expired += due;
        self.check_all()
    }

    // -----------------------------------------------------------------------------------
    // Clients
    // -----------------------------------------------------------------------------------

    fn spawn(&mut self, job: Job, resent: bool) -> Result<(), String> {
        let engine = self.engine()?;
        let handle = match &job {
            Job::Open {
                account,
                currency,
                overdraft,
            } => {
                let id = AccountId::parse(account).map_err(|e| e.reason)?;
                let currency = Currency::parse(currency).map_err(|e| e.reason)?;
                let overdraft = *overdraft;
                self.spawn_task(async move {
                    Output::Open(
                        engine
                            .open_account(id, currency, overdraft, Metadata::empty())
                            .await,
                    )
                })?
            }
            Job::Ops { ops, batch } => {
                let mut parsed = Vec::with_capacity(ops.len());
                for op in ops {
                    parsed.push((
                        AccountId::parse(&op.account).map_err(|e| e.reason)?,
                        Some(IdempotencyKey::parse(&op.key).map_err(|e| e.reason)?),
                        op.request.clone(),
                    ));
                }
                if *batch || parsed.len() != 1 {
                    self.spawn_task(async move { Output::Ops(engine.execute_batch(parsed).await) })?
                } else {
                    self.spawn_task(async move {
                        let mut results = Vec::new();
                        for (id, key, request) in parsed {
                            results.push(engine.execute(&id, key, request).await);
                        }
                        Output::Ops(results)
                    })?
                }
            }
            Job::Transfer { op } => {
                let from = AccountId::parse(&op.account).map_err(|e| e.reason)?;
                let key = IdempotencyKey::parse(&op.key).map_err(|e| e.reason)?;
                let request = op.request.clone();
                self.spawn_task(async move {
                    Output::Transfer(engine.transfer(&from, Some(key), request).await)
                })?
            }
        };
        self.trace(|| format!("send{}: {job:?}", if resent { " (again)" } else { "" }));
        self.inflight.push_back(InFlight {
            job,
            handle,
            resent,
        });
        Ok(())
    }

    fn submit_open(&mut self, index: Option<usize>) -> Result<(), String> {
        let index = index.unwrap_or_else(|| self.below(NAMES.len() as u64) as usize);
        let account = NAMES[index].to_string();
        // Mostly the parameters it has (or would get), sometimes others (409 when it exists).
        let currency = if self.below(8) == 0 { "USD" } else { "GEM" }.to_string();
        let overdraft = [0, 0, 0, 100][self.below(4) as usize];
        self.spawn(
            Job::Open {
                account,
                currency,
                overdraft,
            },
            false,
        )
    }

    /// Sends a job so that each account sees it in the order sent. Requests reach an
    /// account's actor through its mailbox, but a transfer takes both accounts' locks
    /// directly when its task first runs (tasks start in the order sent): one sent while an
    /// earlier job on either account may still wait in a mailbox could overtake it, and the
    /// answers, checked in the order sent, would disagree with the model. Such a transfer
    /// waits until the jobs before it are answered.
    fn spawn_in_order(&mut self, job: Job, resent: bool) -> Result<(), String> {
        if let Job::Transfer { op } = &job {
            let to = match &op.request {
                Request::Transfer { to, .. } => to.as_str().to_string(),
                _ => op.account.clone(),
            };
            if self
                .inflight
                .iter()
                .any(|f| f.job.touches(&op.account) || f.job.touches(&to))
            {
                self.drain()?;
            }
        }
        self.spawn(job, resent)
    }

    /// A transfer: mostly between accounts that exist, sometimes to itself or to one never
    /// opened; now and then a retry of an earlier transfer's key (same or another amount).
    fn submit_transfer(&mut self) -> Result<(), String> {
        let earlier: Vec<usize> = (0..self.sent.len())
            .filter(|&i| matches!(self.sent[i].request, Request::Transfer { .. }))
            .collect();
        let op = if !earlier.is_empty() && self.below(5) == 0 {
            let pick = earlier[self.below(earlier.len() as u64) as usize];
            let mut op = self.sent[pick].clone();
            if self.below(3) == 0 {
                let model = self
                    .accounts
                    .get(&op.account)
                    .map(|a| a.model.clone())
                    .unwrap_or_default();
                op.request = different(&op.request, &model);
            }
            op
        } else {
            let opened: Vec<String> = self.accounts.keys().cloned().collect();
            let pick = |sim: &mut Self| {
                if opened.is_empty() || sim.below(12) == 0 {
                    NAMES[sim.below(NAMES.len() as u64) as usize].to_string()
                } else {
                    opened[sim.below(opened.len() as u64) as usize].clone()
                }
            };
            let from = pick(self);
            let mut to = pick(self);
            if to == from && self.below(4) != 0 {
                to = pick(self);
            }
            let request = Request::Transfer {
                to: AccountId::parse(&to).map_err(|e| e.reason)?,
                amount: self.amount(),
                metadata: self.metadata(),
            };
            self.fresh_op(from, request)
        };
        self.spawn_in_order(Job::Transfer { op }, false)
    }

    fn submit_ops(&mut self) -> Result<(), String> {
        if self.below(4) == 0 {
            return self.submit_transfer();
        }
        let count = if self.below(4) == 0 {
            1 + self.below(6)
        } else {
            1
        };
        let batch = count > 1 || self.below(3) == 0;
        let mut ops = Vec::new();
        for _ in 0..count {
            ops.push(self.make_op());
        }
        self.spawn(Job::Ops { ops, batch }, false)
    }

    fn fresh_op(&mut self, account: String, request: Request) -> Op {
        self.next_key += 1;
        let op = Op {
            account,
            key: format!("k{}", self.next_key),
            request,
        };
        self.sent.push(op.clone());
        op
    }

    fn make_op(&mut self) -> Op {
        if !self.sent.is_empty() && self.below(6) == 0 {
            let pick = self.below(self.sent.len() as u64) as usize;
            let mut op = self.sent[pick].clone();
            // Transfers are retried as transfers (`submit_transfer`), not in a batch.
            if !matches!(op.request, Request::Transfer { .. }) {
                if self.below(3) == 0 {
                    let model = self
                        .accounts
                        .get(&op.account)
                        .map(|a| a.model.clone())
                        .unwrap_or_default();
                    op.request = different(&op.request, &model);
                }
                return op;
            }
        }
        let opened: Vec<String> = self.accounts.keys().cloned().collect();
        let account = if opened.is_empty() || self.below(12) == 0 {
            NAMES[self.below(NAMES.len() as u64) as usize].to_string()
        } else {
            let pick = self.below(opened.len() as u64) as usize;
            opened[pick].clone()
        };
        let request = match self.below(10) {
            0..=2 => Request::Credit {
                amount: self.amount(),
                metadata: self.metadata(),
            },
            3..=5 => Request::Debit {
                amount: self.amount(),
                metadata: self.metadata(),
            },
            6..=7 => {
                let expires_in_secs = match self.below(6) {
                    0 => None,
                    1 => Some(0),
                    2 => Some(i128::from(HOLD_EXPIRES_SECS_MAX) + 1),
                    _ => Some(1 + i128::from(self.below(7200))),
                };
                Request::Hold {
                    amount: self.amount(),
                    expires_in_secs,
                    metadata: self.metadata(),
                }
            }
            8 => Request::Capture {
                hold_id: self.hold_of(&account),
                amount: if self.below(2) == 0 {
                    None
                } else {
                    Some(self.amount())
                },
                metadata: self.metadata(),
            },
            _ => Request::Release {
                hold_id: self.hold_of(&account),
                metadata: self.metadata(),
            },
        };
        self.fresh_op(account, request)
    }

    fn amount(&mut self) -> i128 {
        match self.below(24) {
            0 => 0,
            1 => -5,
            2 => i128::from(AMOUNT_MAX) + 1,
            3 => i128::from(AMOUNT_MAX),
            4..=6 => 1 + i128::from(self.below(1000)),
            _ => 1 + i128::from(self.below(60)),
        }
    }

    fn metadata(&mut self) -> BTreeMap<String, String> {
        match self.below(12) {
            0 => BTreeMap::from([("order".to_string(), "o-1".to_string())]),
            1 => BTreeMap::from([("k".repeat(41), String::new())]),
            _ => BTreeMap::new(),
        }
    }

    /// A hold of the account the model knows (any status), or one no account has.
    fn hold_of(&mut self, account: &str) -> Uuid {
        let holds: Vec<Uuid> = self
            .accounts
            .get(account)
            .map(|a| a.model.hold_order.clone())
            .unwrap_or_default();
        if holds.is_empty() || self.below(8) == 0 {
            Uuid::from_u128(0x0bad_0000_0000_7000_8000_0000_0000_0000 + u128::from(self.below(4)))
        } else {
            holds[self.below(holds.len() as u64) as usize]
        }
    }

    // -----------------------------------------------------------------------------------
    // Checking answers
    // -----------------------------------------------------------------------------------

    /// Takes the answered jobs at the front of the queue, oldest first, and checks each
    /// against the model in the order sent (the order each account's actor applied them).
    fn collect(&mut self) -> Result<(), String> {
        while self
            .inflight
            .front()
            .is_some_and(|flight| flight.handle.is_finished())
        {
            let Some(flight) = self.inflight.pop_front() else {
                break;
            };
            let output = self
                .life()?
                .rt
                .block_on(flight.handle)
                .map_err(|e| format!("client task failed: {e}"))?;
            self.verify(flight.job, output, flight.resent)?;
        }
        Ok(())
    }

    fn verify(&mut self, job: Job, output: Output, resent: bool) -> Result<(), String> {
        self.trace(|| format!("answered{}: {job:?}", if resent { " (resent)" } else { "" }));
        match (job, output) {
            (
                Job::Open {
                    account,
                    currency,
                    overdraft,
                },
                Output::Open(result),
            ) => self.verify_open(account, currency, overdraft, result),
            (Job::Ops { ops, batch }, Output::Ops(results)) => {
                ensure_eq!(ops.len(), results.len(), "answers in a batch");
                if results.iter().any(unanswered) {
                    self.unresolved.push(Job::Ops { ops, batch });
                    return Ok(());
                }
                for (op, result) in ops.into_iter().zip(results) {
                    self.verify_op(op, result)?;
                }
                Ok(())
            }
            (Job::Transfer { op }, Output::Transfer(result)) => {
                if unanswered(&result) {
                    self.unresolved.push(Job::Transfer { op });
                    return Ok(());
                }
                self.verify_transfer(op, result)
            }
            _ => Err("a job got another job's answer".into()),
        }
    }

    fn verify_open(
        &mut self,
        account: String,
        currency: String,
        overdraft: u64,
        result: Result<(bool, AccountView), EngineError>,
    ) -> Result<(), String> {
        if unanswered(&result) {
            self.unresolved.push(Job::Open {
                account,
                currency,
                overdraft,
            });
            return Ok(());
        }
        match (self.accounts.get(&account), result) {
            (Some(acct), Ok((created, view))) => {
                ensure!(!created, "account {account} created twice");
                ensure_eq!(acct.currency.as_str(), currency.as_str(), "currency");
                ensure_eq!(acct.model.overdraft, overdraft, "overdraft");
                ensure_eq!(view.currency.as_str(), currency.as_str(), "currency shown");
                ensure_eq!(view.overdraft_limit, overdraft, "overdraft shown");
                // A read is not ordered with requests still queued at the account's actor,
                // so its balance may be from before them; quiet points check it in full.
                Ok(())
            }
            (Some(acct), Err(EngineError::AccountExists { .. })) => {
                ensure!(
                    acct.currency != currency || acct.model.overdraft != overdraft,
                    "account {account} refused as existing with the same fields"
                );
                Ok(())
            }
            (None, Ok((created, view))) => {
                ensure!(created, "account {account} existed before it was opened");
                ensure_eq!(view.currency.as_str(), currency.as_str(), "currency");
                let acct = Acct {
                    currency,
                    model: Model::new(overdraft),
                };
                check_view(&view, &acct.model)?;
                self.accounts.insert(account, acct);
                Ok(())
            }
            (_, got) => Err(format!("open {account}: unexpected answer {got:?}")),
        }
    }

    /// A transfer's answer against the model: 404 when either account is unknown, then the
    /// source's rules with the destination (`evaluate_transfer`); a new transfer ends as the
    /// model says, with both halves done.
    fn verify_transfer(
        &mut self,
        op: Op,
        result: Result<TransferOutcome, EngineError>,
    ) -> Result<(), String> {
        let Request::Transfer { to, .. } = &op.request else {
            return Err(format!("{op:?} sent as a transfer"));
        };
        let (Some(from_acct), Some(to_acct)) = (
            self.accounts.get(&op.account),
            self.accounts.get(to.as_str()),
        ) else {
            ensure!(
                matches!(result, Err(EngineError::AccountNotFound(_))),
                "{op:?} with an account never opened: {result:?}"
            );
            self.report.refused += 1;
            return Ok(());
        };
        let from_currency = Currency::parse(&from_acct.currency).map_err(|e| e.reason)?;
        let to_currency = Currency::parse(&to_acct.currency).map_err(|e| e.reason)?;
        let expect = from_acct.model.evaluate_transfer(
            Some(&op.key),
            &op.request,
            op.account == to.as_str(),
            &from_currency,
            &to_currency,
        );
        match (expect, result) {
            (Expect::Replay, Ok(outcome)) => {
                ensure!(outcome.replayed, "{op:?}: a replay not marked as one");
                if self.in_flight.contains_key(&outcome.record.id) {
                    // Its refund did not fit before; a retry drives it again.
                    self.learn_transfer_end(outcome.record.clone())?;
                }
                let stored = self
                    .transfers
                    .get(&(op.account.clone(), op.key.clone()))
                    .ok_or_else(|| format!("{op:?}: replay of a transfer never acknowledged"))?;
                ensure_eq!(*outcome.record, **stored, "replayed transfer");
                self.report.replayed += 1;
                Ok(())
            }
            (Expect::Refuse(want), Err(EngineError::Op(got))) => self.refused(&op, want, got),
            (Expect::Apply, Ok(outcome)) => {
                ensure!(
                    !outcome.replayed,
                    "{op:?}: a fresh transfer answered as a replay"
                );
                ensure!(
                    outcome.record.status != TransferStatus::Pending,
                    "{op:?}: answered half done"
                );
                self.learn_transfer_out(&op, outcome.record.clone())
                    .map_err(|e| format!("{op:?}: {e}"))?;
                self.learn_transfer_end(outcome.record)
                    .map_err(|e| format!("{op:?}: {e}"))?;
                self.report.applied += 1;
                Ok(())
            }
            (expect, got) => Err(format!(
                "{op:?}: the model expected {expect:?}, the engine answered {got:?}"
            )),
        }
    }

    /// Money conservation over all accounts, against the model's sums and what it has in
    /// flight. Only at quiet points.
    fn check_conservation(&self) -> Result<(), String> {
        let in_flight: u64 = self.in_flight.values().map(|(_, _, amount)| amount).sum();
        let got = self.engine()?.conservation();
        check_conservation(self.accounts.values().map(|a| &a.model), in_flight, &got)
    }

    fn verify_op(&mut self, op: Op, result: Result<Executed, EngineError>) -> Result<(), String> {
        let now = self.clock.now_ms();
        let Some(acct) = self.accounts.get_mut(&op.account) else {
            ensure!(
                matches!(result, Err(EngineError::AccountNotFound(_))),
                "{op:?} on an account never opened: {result:?}"
            );
            self.report.refused += 1;
            return Ok(());
        };
        let expect = acct.model.evaluate(Some(&op.key), &op.request);
        match (expect, result) {
            (Expect::Replay, Ok(executed)) => {
                ensure!(executed.replayed, "{op:?}: a replay not marked as one");
                let stored = self
                    .receipts
                    .get(&(op.account.clone(), op.key.clone()))
                    .ok_or_else(|| format!("{op:?}: replay of a receipt never acknowledged"))?;
                ensure_eq!(*executed.receipt, **stored, "replayed receipt");
                self.report.replayed += 1;
                Ok(())
            }
            (Expect::Refuse(want), Err(EngineError::Op(got))) => self.refused(&op, want, got),
            (Expect::Apply, Ok(executed)) => {
                ensure!(
                    !executed.replayed,
                    "{op:?}: a fresh request answered as a replay"
                );
                let receipt = executed.receipt;
                let new_hold = match op.request {
                    Request::Hold { .. } => receipt.hold.as_ref().map(|h| h.id),
                    _ => None,
                };
                let (kind, amount) = acct.model.commit(Some(&op.key), &op.request, new_hold, now);
                let hold_id = match &op.request {
                    Request::Capture { hold_id, .. } | Request::Release { hold_id, .. } => {
                        Some(*hold_id)
                    }
                    _ => new_hold,
                };
                check_receipt(&receipt, &acct.model, kind, amount, hold_id)
                    .map_err(|e| format!("{op:?}: {e}"))?;
                self.receipts.insert((op.account, op.key), receipt);
                self.report.applied += 1;
                Ok(())
            }
            (expect, got) => Err(format!(
                "{op:?}: the model expected {expect:?}, the engine answered {got:?}"
            )),
        }
    }

    // -----------------------------------------------------------------------------------
    // Checking state
    // -----------------------------------------------------------------------------------

    /// Every account, hold, history and idempotency entry against the model, and the log
    /// replayed from the disk against the live state. Only at quiet points (nothing in
    /// flight, nothing queued), where everything shown is durable.
    fn check_all(&mut self) -> Result<(), String> {
        let engine = self.engine()?;
        ensure!(
            self.inflight.is_empty() && engine.wal_queued_bytes() == 0,
            "state checked while requests are in flight"
        );
        self.report.checks += 1;
        let (replayed, book) = replay_disk(&self.disk)?;
        self.check_conservation()?;
        let rt = &self.life()?.rt;
        // Every transfer as it ended (or still in flight, if its refund does not fit), live
        // and in the book a fresh recovery rebuilds.
        let in_flight: u64 = self.in_flight.values().map(|(_, _, amount)| amount).sum();
        ensure_eq!(
            book.in_flight(),
            (self.in_flight.len(), u128::from(in_flight)),
            "transfers in flight after a replay of the log"
        );
        for ((from, key), stored) in &self.transfers {
            let live = rt
                .block_on(engine.transfer_record(&stored.id))
                .map_err(|e| format!("transfer under {from}/{key}: {e}"))?;
            ensure_eq!(*live, **stored, format!("transfer under {from}/{key}"));
            ensure_eq!(
                book.get(&stored.id).map(|r| &**r),
                Some(&**stored),
                format!("transfer under {from}/{key} replayed from the log")
            );
        }
        for name in NAMES {
            let id = AccountId::parse(name).map_err(|e| e.reason)?;
            let found = rt.block_on(engine.account(&id));
            let Some(acct) = self.accounts.get(name) else {
                ensure!(
                    matches!(found, Err(EngineError::AccountNotFound(_))),
                    "account {name} exists but was never acknowledged: {found:?}"
                );
                ensure!(
                    !replayed.contains_key(&id),
                    "{name} in the log, never opened"
                );
                continue;
            };
            let view = found.map_err(|e| format!("account {name}: {e}"))?;
            check_view(&view, &acct.model).map_err(|e| format!("account {name}: {e}"))?;
            ensure_eq!(view.currency.as_str(), acct.currency.as_str(), "currency");
            let (holds, _) = rt
                .block_on(engine.holds(&id, None, None, 100_000))
                .map_err(|e| e.to_string())?;
            check_holds(holds.iter(), view.held, &acct.model)
                .map_err(|e| format!("account {name}: {e}"))?;
            let (mut history, _) = rt
                .block_on(engine.transactions(&id, None, 1_000_000))
                .map_err(|e| e.to_string())?;
            history.reverse();
            check_history(&history, &view).map_err(|e| format!("account {name}: {e}"))?;
            for (key, request) in &acct.model.keys {
                let parsed = IdempotencyKey::parse(key).map_err(|e| e.reason)?;
                let entry = rt
                    .block_on(engine.idempotency_entry(&id, &parsed))
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("account {name}: key {key} forgotten"))?;
                ensure_eq!(&entry.request, request, format!("request under {key}"));
                if let Request::Transfer { .. } = request {
                    // A transfer's key keeps its debit; the answer is the transfer.
                    let stored = self
                        .transfers
                        .get(&(name.to_string(), key.clone()))
                        .ok_or_else(|| format!("transfer key {key} without a transfer"))?;
                    let tx = &entry.receipt.transaction;
                    ensure_eq!(tx.kind, TxKind::TransferOut, format!("kind under {key}"));
                    ensure_eq!(
                        tx.transfer_id,
                        Some(stored.id),
                        format!("transfer under {key}")
                    );
                    ensure_eq!(
                        &entry.receipt.account,
                        &stored.from_account,
                        format!("source under {key}")
                    );
                    continue;
                }
                let stored = self
                    .receipts
                    .get(&(name.to_string(), key.clone()))
                    .ok_or_else(|| format!("key {key} without a receipt"))?;
                ensure_eq!(&*entry.receipt, &**stored, format!("receipt under {key}"));
            }
            let from_log = replayed
                .get(&id)
                .ok_or_else(|| format!("account {name} missing from the log"))?;
            ensure_eq!(
                from_log.view(),
                view,
                format!("invariant 4: {name} replayed from the log")
            );
        }
        Ok(())
    }
}

/// An answer that says nothing about the outcome: the request may or may not have been
/// applied, and the client must send it again.
fn unanswered<T>(result: &Result<T, EngineError>) -> bool {
    matches!(
        result,
        Err(EngineError::StorageFailure | EngineError::ShuttingDown)
    )
}

fn credit(amount: i128) -> Request {
    Request::Credit {
        amount,
        metadata: BTreeMap::new(),
    }
}

/// The accounts and transfers as a fresh recovery from the disk (snapshot and log) sees
/// them.
fn replay_disk(
    disk: &SimStorage,
) -> Result<(FastMap<AccountId, Box<Account>>, TransferBook), String> {
    crate::engine::recover_state(disk, Path::new(DATA_DIR), SIM_RETENTION, false, 2)
        .map(|recovered| {
            let accounts = recovered
                .accounts
                .into_iter()
                .flat_map(crate::engine::Table::into_accounts)
                .map(|account| (account.id().clone(), Box::new(account)))
                .collect();
            (accounts, recovered.transfers)
        })
        .map_err(|e| format!("recovery from the disk: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_choices_read_one_byte_below_256_and_zero_when_dry() {
        let mut choices = ByteChoices::new(&[7, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(choices.below(10), 7);
        assert_eq!(choices.below(1000), 258);
        assert!(choices.exhausted());
        assert_eq!(choices.below(10), 0);
    }
}
